// Package httperr writes envd's plain-HTTP error bodies, which follow the
// envd protocol: {"code": <status>, "message": "..."}.
package httperr

import (
	"encoding/json"
	"errors"
	"io/fs"
	"net/http"
	"syscall"
)

// Write sends a JSON error with the given status.
func Write(w http.ResponseWriter, status int, msg string) {
	w.Header().Set("Content-Type", "application/json")
	w.Header().Set("X-Content-Type-Options", "nosniff")
	w.WriteHeader(status)
	_ = json.NewEncoder(w).Encode(struct {
		Code    int    `json:"code"`
		Message string `json:"message"`
	}{status, msg})
}

// StatusFor picks the HTTP status for a file-system error.
func StatusFor(err error) int {
	switch {
	case errors.Is(err, fs.ErrNotExist):
		return http.StatusNotFound
	case errors.Is(err, fs.ErrPermission):
		return http.StatusForbidden
	case errors.Is(err, syscall.ENOSPC), errors.Is(err, syscall.EDQUOT):
		return http.StatusInsufficientStorage
	case errors.Is(err, syscall.EISDIR), errors.Is(err, syscall.ENOTDIR), errors.Is(err, syscall.ENAMETOOLONG), errors.Is(err, syscall.EINVAL), errors.Is(err, syscall.ELOOP):
		return http.StatusBadRequest
	default:
		return http.StatusInternalServerError
	}
}
