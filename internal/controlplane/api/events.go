package api

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"net/http"
	"regexp"
	"strconv"
	"strings"
	"sync"
	"time"

	"github.com/wrenn/wrenn/internal/controlplane/auth"
	"github.com/wrenn/wrenn/internal/controlplane/store"
)

// ticketTTL is how long a browser's SSE ticket may wait to be used.
const ticketTTL = 30 * time.Second

// eventWatch wakes event streams when PostgreSQL says an event was
// written (LISTEN wrenn_events); streams also poll, so a lost
// connection only delays them.
type eventWatch struct {
	once sync.Once
	mu   sync.Mutex
	ch   chan struct{}
}

// changed returns a channel closed at the next event.
func (s *Server) eventsChanged() <-chan struct{} {
	ew := &s.events
	ew.once.Do(func() {
		ew.ch = make(chan struct{})
		s.bg.Add(1)
		go func() {
			defer s.bg.Done()
			s.listenEvents(s.bgCtx)
		}()
	})
	ew.mu.Lock()
	defer ew.mu.Unlock()
	return ew.ch
}

func (s *Server) wakeEventStreams() {
	ew := &s.events
	ew.mu.Lock()
	close(ew.ch)
	ew.ch = make(chan struct{})
	ew.mu.Unlock()
}

// listenEvents holds one LISTEN connection per replica and wakes streams;
// it reconnects after errors until ctx ends.
func (s *Server) listenEvents(ctx context.Context) {
	for ctx.Err() == nil {
		conn, err := s.st.Pool.Acquire(ctx)
		if err == nil {
			_, err = conn.Exec(ctx, "LISTEN wrenn_events")
			for err == nil {
				_, err = conn.Conn().WaitForNotification(ctx)
				if err == nil {
					s.wakeEventStreams()
				}
			}
			// A connection left mid-wait is in an unknown state: close it.
			_ = conn.Conn().Close(context.WithoutCancel(ctx))
			conn.Release()
		}
		if ctx.Err() != nil {
			return
		}
		s.log.Warn("event listener lost its database connection; retrying", "err", err)
		select {
		case <-ctx.Done():
		case <-time.After(2 * time.Second):
		}
	}
}

// The streams a team's ticket may open: its event stream, and a
// capsule's terminal, exec stream or process output.
const teamEventStream = "/v1/events/stream"

var ticketScopeRE = regexp.MustCompile(`^/v1/capsules/[a-z0-9-]{1,64}/(pty|exec/stream|processes/[A-Za-z0-9._-]{1,128}/stream)$`)

// issueEventTicket gives a browser a 30-second single-use ticket for one
// stream: {"path": "/v1/capsules/<id>/pty"} names it; no body means the
// team's event stream.
func (s *Server) issueEventTicket(w http.ResponseWriter, r *http.Request, p *principal) error {
	var req struct {
		Path string `json:"path"`
	}
	if err := decode(w, r, &req, true); err != nil {
		return err
	}
	switch {
	case req.Path == "":
		req.Path = teamEventStream
	case req.Path != teamEventStream && !ticketScopeRE.MatchString(req.Path):
		return badRequest("path must be %s or a capsule's pty, exec/stream or processes/{selector}/stream", teamEventStream)
	}
	return s.ticket(w, r, p, false, req.Path)
}

func (s *Server) issueAdminEventTicket(w http.ResponseWriter, r *http.Request, p *principal) error {
	if !p.IsAdmin {
		return forbidden("this needs a platform admin")
	}
	return s.ticket(w, r, p, true, "/v1/admin/events/stream")
}

// ticket issues a ticket for one stream on behalf of p's credential: it
// works, and its stream lasts, only as long as that credential does.
func (s *Server) ticket(w http.ResponseWriter, r *http.Request, p *principal, admin bool, scope string) error {
	t := "evt_" + auth.RandomString(32)
	tk := store.Ticket{Admin: admin, Scope: scope, UserID: p.UserID, KeyID: p.KeyID, Epoch: p.Epoch, Membership: p.Membership}
	if !admin {
		tk.TeamID = p.TeamID
	}
	if err := s.st.AddEventTicket(r.Context(), auth.HashToken(t), tk, ticketTTL); err != nil {
		return err
	}
	writeJSON(w, http.StatusOK, map[string]any{"ticket": t, "expires_in": int(ticketTTL.Seconds()), "path": scope})
	return nil
}

// streamEvents serves a team's events as Server-Sent Events. Credentials
// come as headers (SDKs) or a single-use ?ticket= (browsers).
func (s *Server) streamEvents(w http.ResponseWriter, r *http.Request, _ *principal) error {
	var p *principal
	var err error
	if t := r.URL.Query().Get("ticket"); t != "" {
		if p, err = s.useTicket(r.Context(), t, teamEventStream, false); err != nil {
			return err
		}
	} else {
		if p, err = s.authenticate(r, team); err != nil {
			return err
		}
		if wait, ok := s.limit.allow(p.limitKey); !ok {
			w.Header().Set("Retry-After", wait)
			return errf(http.StatusTooManyRequests, "rate_limited", "too many requests; retry after %s s", wait)
		}
	}
	r, stop := s.whileValid(r, p)
	defer stop()
	return s.serveEvents(w, r, p.TeamID)
}

// adminStreamEvents serves every team's events to a platform admin.
func (s *Server) adminStreamEvents(w http.ResponseWriter, r *http.Request, _ *principal) error {
	t := r.URL.Query().Get("ticket")
	if t == "" {
		return errf(http.StatusUnauthorized, "unauthorized", "the admin stream needs ?ticket= from POST /v1/admin/events/token")
	}
	p, err := s.useTicket(r.Context(), t, r.URL.Path, true)
	if err != nil {
		return err
	}
	r, stop := s.whileValid(r, p)
	defer stop()
	return s.serveEvents(w, r, "")
}

// sseEvent is the data of one SSE frame: the public API's shape (event,
// resource, sandbox for capsule events, timestamp) plus the event's id and
// its payload as data.
type sseEvent struct {
	ID        string          `json:"id,omitempty"`
	Event     string          `json:"event"`
	Resource  map[string]any  `json:"resource,omitempty"`
	Sandbox   json.RawMessage `json:"sandbox,omitempty"`
	Data      json.RawMessage `json:"data,omitempty"`
	Timestamp int64           `json:"timestamp"`
}

// serveEvents streams events after Last-Event-ID (or ?after=, or from
// now), so a client that reconnects with the last id it saw misses nothing
// still retained (7 days).
func (s *Server) serveEvents(w http.ResponseWriter, r *http.Request, teamID string) error {
	ctx := r.Context()
	after := int64(-1)
	for _, v := range []string{r.Header.Get("Last-Event-ID"), r.URL.Query().Get("after")} {
		if v == "" {
			continue
		}
		n, err := strconv.ParseInt(v, 10, 64)
		if err != nil || n < 0 {
			return badRequest("Last-Event-ID and after must be an event sequence number")
		}
		after = n
		break
	}
	if after < 0 {
		last, err := s.st.LastEventSeq(ctx)
		if err != nil {
			return err
		}
		after = last
	}
	rc := http.NewResponseController(w)
	w.Header().Set("Content-Type", "text/event-stream")
	w.Header().Set("Cache-Control", "no-store")
	w.Header().Set("X-Accel-Buffering", "no")
	w.WriteHeader(http.StatusOK)
	hello, _ := json.Marshal(sseEvent{Event: "connected", Timestamp: time.Now().Unix()})
	if _, err := fmt.Fprintf(w, "retry: 2000\nevent: connected\ndata: %s\n\n", hello); err != nil {
		return nil
	}
	_ = rc.Flush()
	keepalive := time.NewTicker(30 * time.Second)
	defer keepalive.Stop()
	for {
		wake := s.eventsChanged()
		evs, err := s.st.EventsAfter(ctx, teamID, after, 500)
		if err != nil && ctx.Err() == nil {
			if !errors.Is(err, context.Canceled) {
				s.log.Warn("event stream read", "err", err)
			}
		}
		for _, ev := range evs {
			if err := writeSSE(w, ev); err != nil {
				return nil
			}
			after = ev.Seq
		}
		if len(evs) > 0 {
			_ = rc.Flush()
		}
		if len(evs) == 500 {
			continue // more waiting
		}
		select {
		case <-ctx.Done():
			return nil
		case <-s.bgCtx.Done():
			return nil // the server is shutting down
		case <-wake:
		case <-time.After(5 * time.Second):
		case <-keepalive.C:
			if _, err := fmt.Fprint(w, ": keepalive\n\n"); err != nil {
				return nil
			}
			_ = rc.Flush()
		}
	}
}

func writeSSE(w http.ResponseWriter, ev store.Event) error {
	kind, _, _ := strings.Cut(ev.Event, ".")
	if kind == "capsule" {
		kind = "sandbox"
	}
	out := sseEvent{ID: ev.ID, Event: ev.Event, Resource: map[string]any{"id": ev.ResourceID, "type": kind},
		Data: ev.Payload, Timestamp: ev.CreatedAt.Unix()}
	if kind == "sandbox" {
		out.Sandbox = ev.Payload
	}
	data, _ := json.Marshal(out)
	_, err := fmt.Fprintf(w, "id: %d\nevent: %s\ndata: %s\n\n", ev.Seq, ev.Event, data)
	return err
}

// EventsChanged returns a channel that closes when the next lifecycle
// event is written (for the notification dispatcher).
func (s *Server) EventsChanged() <-chan struct{} { return s.eventsChanged() }
