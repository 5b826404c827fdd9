package api

import (
	"context"
	"encoding/json"
	"errors"
	"net/http"
	"strings"
	"time"

	"github.com/coder/websocket"
)

// Browsers cannot set headers on a WebSocket. Besides a ticket in the URL,
// a capsule's WebSocket may carry its credentials as upstream Wrenn's do:
// the connection is accepted without any, and its first message must be
// {"type":"auth","token":"<JWT>"} within firstFrameWait.
const firstFrameWait = 5 * time.Second

// firstFrameRoutes take the first-frame form (and their platform twins).
var firstFrameRoutes = map[string]bool{
	"/v1/capsules/{id}/exec/stream":                 true,
	"/v1/capsules/{id}/pty":                         true,
	"/v1/capsules/{id}/processes/{selector}/stream": true,
}

// wantsFirstFrameAuth reports a WebSocket upgrade to such a route that
// carries no credentials of its own.
func wantsFirstFrameAuth(rt route, r *http.Request) bool {
	return firstFrameRoutes[rt.kind()] && strings.EqualFold(r.Header.Get("Upgrade"), "websocket") &&
		r.Header.Get("X-API-Key") == "" && r.Header.Get("Authorization") == "" && r.URL.Query().Get("ticket") == ""
}

// acceptedConn carries a WebSocket accepted before its handler ran.
type acceptedConn struct{}

// firstFrameAuth accepts the WebSocket and authenticates its first
// message; on failure it has told the client why and closed it.
func (s *Server) firstFrameAuth(w http.ResponseWriter, r *http.Request) (*http.Request, *principal, *websocket.Conn, error) {
	// Unauthenticated sockets are held for a while: they count against
	// the address's budget of credential-less requests.
	if wait, ok := s.public.allow("ip:" + s.clientKey(r)); !ok {
		w.Header().Set("Retry-After", wait)
		return r, nil, nil, errf(http.StatusTooManyRequests, "rate_limited", "too many requests from this address; retry after %s s", wait)
	}
	conn, err := accept(w, r)
	if err != nil {
		return r, nil, nil, err
	}
	ctx, cancel := context.WithTimeout(r.Context(), firstFrameWait)
	defer cancel()
	_, data, err := conn.Read(ctx)
	var msg struct {
		Type  string `json:"type"`
		Token string `json:"token"`
	}
	if err == nil {
		err = json.Unmarshal(data, &msg)
	}
	if err != nil || msg.Type != "auth" || msg.Token == "" {
		s.failSocket(r.Context(), conn, errf(http.StatusUnauthorized, "unauthorized",
			`authentication failed: the first message must be {"type":"auth","token":"<JWT>"} within %s`, firstFrameWait))
		return r, nil, nil, errSocketClosed
	}
	p, err := s.userPrincipal(r.Context(), msg.Token)
	if err != nil {
		s.failSocket(r.Context(), conn, err)
		return r, nil, nil, errSocketClosed
	}
	return r.WithContext(context.WithValue(r.Context(), acceptedConn{}, conn)), p, conn, nil
}

// errSocketClosed: the WebSocket was told of the failure and closed.
var errSocketClosed = errors.New("websocket closed")

// failSocket sends an error event and closes the WebSocket: policy
// violation for an authentication failure, internal error otherwise.
func (s *Server) failSocket(ctx context.Context, conn *websocket.Conn, err error) {
	var ae *apiError
	msg, code := "internal error", websocket.StatusInternalError
	if errors.As(err, &ae) {
		msg = ae.code + ": " + ae.message
		if ae.status == http.StatusUnauthorized || ae.status == http.StatusForbidden {
			code = websocket.StatusPolicyViolation
		} else {
			code = websocket.StatusNormalClosure
		}
	} else {
		s.log.Error("websocket request failed", "err", err)
	}
	_ = wsWrite(ctx, conn, streamEvent{Type: "error", Data: msg})
	_ = conn.Close(code, truncateReason(msg))
}

// truncateReason fits a close reason in a control frame (123 bytes).
func truncateReason(s string) string {
	if len(s) <= 120 {
		return s
	}
	return s[:120]
}
