package api

import (
	"sync"
	"time"
)

// missTracker counts failed logins for emails that have no account, with
// the waits an account gets (loginFailuresFree, loginWait, loginMaxWait),
// so that a 429 does not tell an account exists. It is per replica and
// holds at most maxMisses emails.
type missTracker struct {
	mu     sync.Mutex
	emails map[string]*miss
}

type miss struct {
	failures int
	until    time.Time
	last     time.Time
}

const maxMisses = 100_000

// attempt counts one login for email; ok false while it must wait.
func (m *missTracker) attempt(email string) (ok bool, until time.Time) {
	now := time.Now()
	m.mu.Lock()
	defer m.mu.Unlock()
	if m.emails == nil {
		m.emails = map[string]*miss{}
	}
	x := m.emails[email]
	if x == nil {
		if len(m.emails) >= maxMisses {
			m.sweep(now)
		}
		x = &miss{}
		m.emails[email] = x
	}
	if now.Before(x.until) {
		return false, x.until
	}
	x.failures++
	x.last = now
	if x.failures >= loginFailuresFree {
		wait := loginWait << min(x.failures-loginFailuresFree, 30)
		x.until = now.Add(min(wait, loginMaxWait))
	}
	return true, time.Time{}
}

// sweep forgets emails quiet for longer than the longest wait, or all of
// them if that frees nothing.
func (m *missTracker) sweep(now time.Time) {
	for k, x := range m.emails {
		if now.Sub(x.last) > loginMaxWait {
			delete(m.emails, k)
		}
	}
	if len(m.emails) >= maxMisses {
		m.emails = map[string]*miss{}
	}
}
