// Package files serves envd's GET and POST /files: streamed downloads with
// Range support and streamed multipart uploads, both as the requesting user.
package files

import (
	"crypto/rand"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"mime"
	"mime/multipart"
	"net/http"
	"os"
	"path/filepath"
	"syscall"

	"github.com/wrenn/wrenn/internal/envd/httperr"
	"github.com/wrenn/wrenn/internal/envd/identity"
	"github.com/wrenn/wrenn/internal/envd/session"
)

// Handler serves /files.
type Handler struct {
	Log *slog.Logger
}

// Entry is one written file in an upload's response.
type Entry struct {
	Path string `json:"path"`
	Name string `json:"name"`
	Type string `json:"type"`
}

func (h *Handler) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	switch r.Method {
	case http.MethodGet, http.MethodHead:
		h.download(w, r)
	case http.MethodPost:
		h.upload(w, r)
	default:
		w.Header().Set("Allow", "GET, HEAD, POST")
		httperr.Write(w, http.StatusMethodNotAllowed, "method "+r.Method+" is not allowed on /files")
	}
}

func actorFor(w http.ResponseWriter, r *http.Request) (*identity.Actor, bool) {
	actor, err := identity.NewActor(session.UserFrom(r.Context()))
	if err != nil {
		httperr.Write(w, http.StatusForbidden, err.Error())
		return nil, false
	}
	return actor, true
}

func (h *Handler) download(w http.ResponseWriter, r *http.Request) {
	actor, ok := actorFor(w, r)
	if !ok {
		return
	}
	path, err := identity.ResolvePath(actor.User(), r.URL.Query().Get("path"))
	if err != nil {
		httperr.Write(w, http.StatusBadRequest, "path: "+err.Error())
		return
	}
	var f *os.File
	if err := actor.Do(func() (err error) { f, err = os.Open(path); return }); err != nil {
		httperr.Write(w, httperr.StatusFor(err), fmt.Sprintf("open %s: %v", path, identity.BareError(err)))
		return
	}
	defer f.Close()
	fi, err := f.Stat()
	if err != nil {
		httperr.Write(w, http.StatusInternalServerError, fmt.Sprintf("stat %s: %v", path, err))
		return
	}
	if fi.IsDir() {
		httperr.Write(w, http.StatusBadRequest, path+" is a directory")
		return
	}
	if !fi.Mode().IsRegular() {
		httperr.Write(w, http.StatusBadRequest, path+" is not a regular file")
		return
	}
	w.Header().Set("Content-Disposition", mime.FormatMediaType("attachment", map[string]string{"filename": filepath.Base(path)}))
	// ServeContent handles Range, conditional requests and the content type
	// (by extension, else by sniffing the first 512 bytes).
	http.ServeContent(w, r, filepath.Base(path), fi.ModTime(), f)
}

func (h *Handler) upload(w http.ResponseWriter, r *http.Request) {
	actor, ok := actorFor(w, r)
	if !ok {
		return
	}
	queryPath := r.URL.Query().Get("path")
	mediaType, _, err := mime.ParseMediaType(r.Header.Get("Content-Type"))
	if err != nil {
		httperr.Write(w, http.StatusBadRequest, "Content-Type must be multipart/form-data or application/octet-stream")
		return
	}
	var written []Entry
	switch mediaType {
	case "application/octet-stream":
		if queryPath == "" {
			httperr.Write(w, http.StatusBadRequest, "the path query parameter is required for application/octet-stream uploads")
			return
		}
		e, status, err := h.save(actor, queryPath, r.Body)
		if err != nil {
			httperr.Write(w, status, err.Error())
			return
		}
		written = append(written, e)
	case "multipart/form-data":
		mr, err := r.MultipartReader()
		if err != nil {
			httperr.Write(w, http.StatusBadRequest, "read multipart body: "+err.Error())
			return
		}
		for {
			part, err := mr.NextPart()
			if errors.Is(err, io.EOF) {
				break
			}
			if err != nil {
				httperr.Write(w, http.StatusBadRequest, "read multipart body: "+err.Error())
				return
			}
			e, status, err := h.savePart(actor, queryPath, part, len(written))
			_ = part.Close()
			if err != nil {
				httperr.Write(w, status, err.Error())
				return
			}
			if e != nil {
				written = append(written, *e)
			}
		}
		if len(written) == 0 {
			httperr.Write(w, http.StatusBadRequest, `the multipart body has no "file" part`)
			return
		}
	default:
		httperr.Write(w, http.StatusBadRequest, "Content-Type must be multipart/form-data or application/octet-stream, not "+mediaType)
		return
	}
	w.Header().Set("Content-Type", "application/json")
	_ = json.NewEncoder(w).Encode(written)
}

// savePart writes one multipart part. The destination is the path query
// parameter (for a single file) or the part's file name.
func (h *Handler) savePart(actor *identity.Actor, queryPath string, part *multipart.Part, already int) (*Entry, int, error) {
	if part.FormName() != "file" {
		return nil, 0, nil // other form fields are not files; ignore them
	}
	dest := queryPath
	if dest == "" {
		// FileName() strips directories; the raw parameter keeps the full path.
		_, params, _ := mime.ParseMediaType(part.Header.Get("Content-Disposition"))
		dest = params["filename"]
	} else if already > 0 {
		return nil, http.StatusBadRequest, errors.New("the path query parameter names one file; to upload several, omit it and give each part its destination as its filename")
	}
	if dest == "" {
		return nil, http.StatusBadRequest, errors.New("a file part has no filename and no path query parameter was given")
	}
	e, status, err := h.save(actor, dest, part)
	if err != nil {
		return nil, status, err
	}
	return &e, 0, nil
}

// save streams src into path: parents are created and a temporary file in
// the same directory is renamed over the target only once it is complete,
// so a failed upload never leaves a truncated file behind.
func (h *Handler) save(actor *identity.Actor, dest string, src io.Reader) (Entry, int, error) {
	path, err := identity.ResolvePath(actor.User(), dest)
	if err != nil {
		return Entry{}, http.StatusBadRequest, fmt.Errorf("path: %w", err)
	}
	dir := filepath.Dir(path)
	var tmp *os.File
	err = actor.Do(func() error {
		if fi, err := os.Stat(path); err == nil && fi.IsDir() {
			return syscall.EISDIR
		}
		if err := os.MkdirAll(dir, 0o755); err != nil {
			return err
		}
		var suffix [6]byte
		_, _ = rand.Read(suffix[:])
		tmp, err = os.OpenFile(filepath.Join(dir, "."+filepath.Base(path)+".upload-"+hex.EncodeToString(suffix[:])), os.O_WRONLY|os.O_CREATE|os.O_EXCL, 0o644)
		return err
	})
	if err != nil {
		return Entry{}, httperr.StatusFor(err), fmt.Errorf("write %s: %v", path, identity.BareError(err))
	}
	tmpName := tmp.Name()
	cleanup := func() {
		_ = tmp.Close()
		_ = os.Remove(tmpName)
	}
	if _, err := io.Copy(tmp, src); err != nil {
		cleanup()
		status := httperr.StatusFor(err)
		if status == http.StatusInternalServerError {
			status = http.StatusBadRequest // most copy failures are a broken request body
		}
		return Entry{}, status, fmt.Errorf("write %s: %v", path, identity.BareError(err))
	}
	if err := tmp.Close(); err != nil {
		_ = os.Remove(tmpName)
		return Entry{}, httperr.StatusFor(err), fmt.Errorf("write %s: %v", path, identity.BareError(err))
	}
	if err := actor.Do(func() error { return os.Rename(tmpName, path) }); err != nil {
		_ = os.Remove(tmpName)
		return Entry{}, httperr.StatusFor(err), fmt.Errorf("write %s: %v", path, identity.BareError(err))
	}
	h.Log.Debug("file written", "path", path, "user", actor.User().Name)
	return Entry{Path: path, Name: filepath.Base(path), Type: "file"}, 0, nil
}
