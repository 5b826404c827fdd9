package notify

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/http"
	"net/netip"
	"syscall"
	"time"

	"github.com/wrenn/wrenn/internal/controlplane/store"
)

// GiveUpAfter is how long an event is retried before the channel moves on
// (the failure stays visible as the channel's last_error).
const GiveUpAfter = 24 * time.Hour

// lockKey is the dispatcher's advisory lock: one replica delivers at a time.
const lockKey = 0x77726e6e00000011

// Dispatcher delivers pending events to due channels.
type Dispatcher struct {
	Store  *store.Store
	Client *http.Client
	Log    *slog.Logger
	// Interval between passes when nothing wakes it (default 2 s).
	Interval time.Duration
}

// NewClient returns the HTTP client for deliveries. Unless allowPrivate,
// it refuses to connect to loopback, private, link-local and other
// non-public addresses (checked on the resolved address, at connect time),
// so a tenant cannot aim a channel at the control plane's own network.
func NewClient(allowPrivate bool) *http.Client {
	d := &net.Dialer{Timeout: 10 * time.Second}
	if !allowPrivate {
		d.Control = func(_, address string, _ syscall.RawConn) error {
			ap, err := netip.ParseAddrPort(address)
			if err != nil {
				return fmt.Errorf("refused address %s", address)
			}
			if !PublicAddr(ap.Addr()) {
				return fmt.Errorf("refused non-public address %s", ap.Addr())
			}
			return nil
		}
	}
	tr := http.DefaultTransport.(*http.Transport).Clone()
	tr.DialContext = d.DialContext
	tr.Proxy = nil
	return &http.Client{
		Transport: tr,
		Timeout:   15 * time.Second,
		CheckRedirect: func(*http.Request, []*http.Request) error {
			return http.ErrUseLastResponse // a redirect is a failed delivery, not a new target
		},
	}
}

// PublicAddr reports whether an address is a public unicast one.
func PublicAddr(a netip.Addr) bool {
	a = a.Unmap()
	if !a.IsGlobalUnicast() || a.IsPrivate() || a.IsLoopback() || a.IsLinkLocalUnicast() {
		return false
	}
	for _, p := range []netip.Prefix{
		netip.MustParsePrefix("100.64.0.0/10"), // carrier-grade NAT
		netip.MustParsePrefix("192.0.0.0/24"),
		netip.MustParsePrefix("198.18.0.0/15"), // benchmarking
		netip.MustParsePrefix("64:ff9b::/96"),  // NAT64 can reach private IPv4
	} {
		if p.Contains(a) {
			return false
		}
	}
	return true
}

// Run delivers until ctx ends; wake (may be nil) returns a channel that
// closes when new events arrive, to start a pass early.
func (d *Dispatcher) Run(ctx context.Context, wake func() <-chan struct{}) {
	if d.Interval == 0 {
		d.Interval = 2 * time.Second
	}
	t := time.NewTicker(d.Interval)
	defer t.Stop()
	for {
		var woken <-chan struct{}
		if wake != nil {
			woken = wake()
		}
		if _, err := d.Pass(ctx); err != nil && ctx.Err() == nil {
			d.Log.Error("notification pass failed", "err", err)
		}
		select {
		case <-ctx.Done():
			return
		case <-t.C:
		case <-woken:
		}
	}
}

// Pass delivers what is due on every channel, if no other replica is.
func (d *Dispatcher) Pass(ctx context.Context) (bool, error) {
	return d.Store.TryLock(ctx, lockKey, func(ctx context.Context) error {
		chans, err := d.Store.DueChannels(ctx)
		if err != nil {
			return err
		}
		for _, ch := range chans {
			d.deliver(ctx, ch)
		}
		return nil
	})
}

// deliver sends a channel's pending events in order, stopping at the first
// failure so that order holds.
func (d *Dispatcher) deliver(ctx context.Context, ch store.Channel) {
	evs, err := d.Store.PendingEvents(ctx, ch, 100)
	if err != nil {
		d.Log.Warn("pending events", "channel", ch.ID, "err", err)
		return
	}
	for _, ev := range evs {
		m := Message{ID: ev.ID, Event: ev.Event, TeamID: ch.TeamID, ResourceID: ev.ResourceID, Timestamp: ev.CreatedAt.Unix(), Data: ev.Payload}
		err := Send(ctx, d.Client, ch.Provider, ch.Config, m)
		if err == nil {
			if err := d.Store.ChannelDelivered(ctx, ch.ID, ev.Seq, ""); err != nil {
				d.Log.Warn("record delivery", "channel", ch.ID, "err", err)
				return
			}
			continue
		}
		if errors.Is(ctx.Err(), context.Canceled) {
			return
		}
		if time.Since(ev.CreatedAt) > GiveUpAfter {
			reason := fmt.Sprintf("gave up on %s (%s) after retrying for %s: %v", ev.ID, ev.Event, GiveUpAfter, err)
			d.Log.Error("notification dropped", "channel", ch.ID, "team", ch.TeamID, "event", ev.ID, "err", err)
			_ = d.Store.ChannelDelivered(ctx, ch.ID, ev.Seq, reason)
			continue
		}
		attempts := ch.Attempts + 1
		next := time.Now().Add(backoff(attempts))
		d.Log.Warn("notification failed; will retry", "channel", ch.ID, "event", ev.ID, "attempt", attempts, "next", next.Format(time.RFC3339), "err", err)
		_ = d.Store.ChannelFailed(ctx, ch.ID, attempts, next, err.Error())
		return
	}
}

// backoff doubles from 2 s to at most 5 minutes.
func backoff(attempts int32) time.Duration {
	d := 2 * time.Second
	for i := int32(1); i < attempts && d < 5*time.Minute; i++ {
		d *= 2
	}
	return min(d, 5*time.Minute)
}
