package api

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net/http"
	"strings"

	"connectrpc.com/connect"

	"github.com/wrenn/wrenn/internal/controlplane/agentclient"
	"github.com/wrenn/wrenn/internal/controlplane/store"
)

// apiError is an error with the status and code a client acts on.
type apiError struct {
	status  int
	code    string
	message string
	extra   map[string]any
}

func (e *apiError) Error() string { return e.message }

func errf(status int, code, format string, args ...any) *apiError {
	return &apiError{status: status, code: code, message: fmt.Sprintf(format, args...)}
}

func badRequest(format string, args ...any) *apiError {
	return errf(http.StatusBadRequest, "invalid_request", format, args...)
}

func notFound(what string) *apiError {
	return errf(http.StatusNotFound, "not_found", "%s not found", what)
}

func conflict(format string, args ...any) *apiError {
	return errf(http.StatusConflict, "conflict", format, args...)
}

func forbidden(format string, args ...any) *apiError {
	return errf(http.StatusForbidden, "forbidden", format, args...)
}

var errUnauthorized = errf(http.StatusUnauthorized, "unauthorized", "missing or invalid credentials")

// writeJSON answers with v as JSON.
func writeJSON(w http.ResponseWriter, status int, v any) {
	w.Header().Set("Content-Type", "application/json")
	w.WriteHeader(status)
	_ = json.NewEncoder(w).Encode(v)
}

// writeError answers {"error":{"code":...,"message":...}}; errors that are
// not apiErrors are logged and answered as 500 without their text.
func (s *Server) writeError(w http.ResponseWriter, r *http.Request, err error) {
	var ae *apiError
	if !errors.As(err, &ae) {
		ae = s.classify(r.Context(), err)
	}
	if ae.status >= 500 {
		s.log.Error("request failed", "method", r.Method, "path", r.URL.Path, "status", ae.status, "err", err)
	}
	if ae.code == "database_unavailable" {
		w.Header().Set("Retry-After", "2")
	}
	body := map[string]any{"code": ae.code, "message": ae.message}
	for k, v := range ae.extra {
		body[k] = v
	}
	writeJSON(w, ae.status, map[string]any{"error": body})
}

// classify maps store and agent errors to API errors.
func (s *Server) classify(ctx context.Context, err error) *apiError {
	var ce *connect.Error
	var qe *store.QuotaError
	switch {
	case errors.As(err, &qe):
		return errf(http.StatusTooManyRequests, "quota_exceeded", "%s; destroy or pause capsules, or ask a platform admin to raise it", qe.Error())
	case errors.Is(err, store.ErrNotFound):
		return errf(http.StatusNotFound, "not_found", "not found")
	case errors.Is(err, store.ErrConflict):
		return errf(http.StatusConflict, "conflict", "%s", err.Error())
	case errors.Is(err, store.ErrUnavailable):
		return errf(http.StatusServiceUnavailable, "database_unavailable", "the database cannot be reached; retry shortly")
	case errors.Is(err, store.ErrInvalid):
		return badRequest("a value in the request is not acceptable: %s", err.Error())
	case errors.As(err, &ce) && !connect.IsWireError(ce):
		// The call failed on our side: the agent could not be reached, or
		// what it sent was not an answer we take.
		switch ce.Code() {
		case connect.CodeDeadlineExceeded:
			return errf(http.StatusGatewayTimeout, "timeout", "the host agent did not answer in time")
		case connect.CodeCanceled:
			if ctx.Err() != nil {
				return errf(499, "canceled", "request canceled")
			}
		case connect.CodeResourceExhausted:
			return errf(http.StatusBadGateway, "agent_error", "%s", agentclient.Message(err))
		}
		return errf(http.StatusBadGateway, "host_unavailable", "the capsule's host cannot be reached")
	case errors.As(err, &ce):
		msg := agentclient.Message(err) // the agent's words, bounded
		switch ce.Code() {
		case connect.CodeNotFound:
			return errf(http.StatusNotFound, "not_found", "%s", msg)
		case connect.CodeInvalidArgument:
			return errf(http.StatusBadRequest, "invalid_request", "%s", msg)
		case connect.CodeFailedPrecondition, connect.CodeAlreadyExists:
			return errf(http.StatusConflict, "conflict", "%s", msg)
		case connect.CodePermissionDenied:
			return errf(http.StatusForbidden, "forbidden", "%s", msg)
		case connect.CodeOutOfRange:
			return errf(http.StatusUnprocessableEntity, "too_large", "%s", msg)
		case connect.CodeResourceExhausted:
			return errf(http.StatusServiceUnavailable, "host_full", "the host has no room: %s", msg)
		case connect.CodeDeadlineExceeded:
			return errf(http.StatusGatewayTimeout, "timeout", "the host agent did not answer in time")
		case connect.CodeUnavailable:
			return errf(http.StatusBadGateway, "host_unavailable", "%s", msg)
		case connect.CodeDataLoss:
			return errf(http.StatusBadGateway, "envd_error", "%s", msg)
		default:
			return errf(http.StatusBadGateway, "agent_error", "host agent error: %s", msg)
		}
	case errors.Is(err, context.DeadlineExceeded):
		return errf(http.StatusGatewayTimeout, "timeout", "the operation timed out")
	case ctx.Err() != nil:
		return errf(499, "canceled", "request canceled")
	}
	return errf(http.StatusInternalServerError, "internal", "internal error")
}

// maxJSONBody bounds JSON request bodies.
const maxJSONBody = 1 << 20

// decode reads a JSON body into v; an empty body leaves v as is when
// optional. Unknown fields are accepted (clients may be newer).
func decode(w http.ResponseWriter, r *http.Request, v any, optional bool) error {
	r.Body = http.MaxBytesReader(w, r.Body, maxJSONBody)
	dec := json.NewDecoder(r.Body)
	err := dec.Decode(v)
	switch {
	case err == nil:
	case errors.Is(err, io.EOF):
		if optional {
			return nil
		}
		return badRequest("request body is empty; expected JSON")
	default:
		var mbe *http.MaxBytesError
		var ute *json.UnmarshalTypeError
		var se *json.SyntaxError
		switch {
		case errors.As(err, &mbe):
			return errf(http.StatusRequestEntityTooLarge, "payload_too_large", "request body larger than %d bytes", maxJSONBody)
		case errors.As(err, &ute):
			return badRequest("field %q must be %s", ute.Field, ute.Type.String())
		case errors.As(err, &se):
			return badRequest("malformed JSON at byte %d", se.Offset)
		default:
			return badRequest("malformed JSON: %s", strings.TrimPrefix(err.Error(), "json: "))
		}
	}
	if dec.More() {
		return badRequest("request body has data after the JSON value")
	}
	return nil
}
