// Package files serves envd's GET and POST /files: streamed downloads with
// Range support or gzip, and streamed uploads (multipart or raw, gzip or
// not, with the file's metadata), both as the requesting user.
package files

import (
	"compress/gzip"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"log/slog"
	"mime"
	"mime/multipart"
	"net/http"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"

	"github.com/wrenn/wrenn/internal/envd/httperr"
	"github.com/wrenn/wrenn/internal/envd/identity"
	"github.com/wrenn/wrenn/internal/envd/partfile"
	"github.com/wrenn/wrenn/internal/envd/session"
	"github.com/wrenn/wrenn/internal/envd/xmeta"
)

// Handler serves /files.
type Handler struct {
	Log *slog.Logger
}

// Entry is one written file in an upload's response.
type Entry struct {
	Path     string            `json:"path"`
	Name     string            `json:"name"`
	Type     string            `json:"type"`
	Metadata map[string]string `json:"metadata,omitempty"`
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
	w.Header().Add("Vary", "Accept-Encoding")
	gz, identity := acceptable(r.Header.Values("Accept-Encoding"))
	partial := r.Header.Get("Range") != "" || r.Header.Get("If-Modified-Since") != "" || r.Header.Get("If-None-Match") != "" || r.Header.Get("If-Range") != ""
	switch {
	case gz && !partial && r.Method == http.MethodGet:
		// Compressed as it is read (fast level: guests have little CPU).
		head := make([]byte, 512)
		n, _ := io.ReadFull(f, head)
		head = head[:n]
		ct := mime.TypeByExtension(filepath.Ext(path))
		if ct == "" {
			ct = http.DetectContentType(head) // as ServeContent would
		}
		w.Header().Set("Content-Type", ct)
		w.Header().Set("Content-Encoding", "gzip")
		zw, _ := gzip.NewWriterLevel(w, gzip.BestSpeed)
		_, err := zw.Write(head)
		if err == nil {
			_, err = io.Copy(zw, f)
		}
		if err != nil {
			h.Log.Debug("gzip download ended early", "path", path, "error", err)
		}
		_ = zw.Close()
	case !identity && !partial:
		httperr.Write(w, http.StatusNotAcceptable, "the file is sent as gzip or as it is; Accept-Encoding allows neither")
	default:
		// ServeContent handles Range, conditional requests and the content
		// type (by extension, else by sniffing the first 512 bytes).
		http.ServeContent(w, r, filepath.Base(path), fi.ModTime(), f)
	}
}

// acceptable reads Accept-Encoding: whether gzip may be sent, and whether
// the file as it is may (identity is, unless refused by name or by "*;q=0").
func acceptable(values []string) (gz, identity bool) {
	identity = true
	starRefused, identityNamed := false, false
	for _, v := range values {
		for _, item := range strings.Split(v, ",") {
			name, params, _ := strings.Cut(strings.TrimSpace(item), ";")
			name = strings.ToLower(strings.TrimSpace(name))
			q := 1.0
			if qv, ok := strings.CutPrefix(strings.TrimSpace(params), "q="); ok {
				if f, err := strconv.ParseFloat(qv, 64); err == nil {
					q = f
				}
			}
			switch name {
			case "gzip", "x-gzip":
				gz = q > 0
			case "identity":
				identityNamed, identity = true, q > 0
			case "*":
				if q > 0 && !gz {
					gz = true
				}
				starRefused = q == 0
			}
		}
	}
	if starRefused && !identityNamed {
		identity = false
	}
	return gz, identity
}

func (h *Handler) upload(w http.ResponseWriter, r *http.Request) {
	actor, ok := actorFor(w, r)
	if !ok {
		return
	}
	queryPath := r.URL.Query().Get("path")
	meta, err := xmeta.FromHeaders(r.Header)
	if err != nil {
		httperr.Write(w, http.StatusBadRequest, err.Error())
		return
	}
	switch enc := strings.ToLower(strings.TrimSpace(r.Header.Get("Content-Encoding"))); enc {
	case "", "identity":
	case "gzip", "x-gzip":
		zr, err := gzip.NewReader(r.Body)
		if err != nil {
			httperr.Write(w, http.StatusBadRequest, "the body is not gzip: "+err.Error())
			return
		}
		defer zr.Close()
		r.Body = io.NopCloser(zr)
	default:
		httperr.Write(w, http.StatusBadRequest, "Content-Encoding "+enc+" is not supported: send gzip or nothing")
		return
	}
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
		e, status, err := h.save(actor, queryPath, r.Body, meta)
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
			e, status, err := h.savePart(actor, queryPath, part, len(written), meta)
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
func (h *Handler) savePart(actor *identity.Actor, queryPath string, part *multipart.Part, already int, meta map[string]string) (*Entry, int, error) {
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
	e, status, err := h.save(actor, dest, part, meta)
	if err != nil {
		return nil, status, err
	}
	return &e, 0, nil
}

// save streams src into path: parents are created and a temporary file in
// the same directory is renamed over the target only once it is complete
// (with its metadata, which replaces any the old file had), so a failed
// upload never leaves a truncated file behind.
func (h *Handler) save(actor *identity.Actor, dest string, src io.Reader, meta map[string]string) (Entry, int, error) {
	path, err := identity.ResolvePath(actor.User(), dest)
	if err != nil {
		return Entry{}, http.StatusBadRequest, fmt.Errorf("path: %w", err)
	}
	dir := filepath.Dir(path)
	if err := makeParents(dir, actor.User()); err != nil {
		return Entry{}, httperr.StatusFor(err), fmt.Errorf("write %s: %v", path, identity.BareError(err))
	}
	var tmp *os.File
	err = actor.Do(func() error {
		if fi, err := os.Stat(path); err == nil && fi.IsDir() {
			return syscall.EISDIR
		}
		if err := os.MkdirAll(dir, 0o755); err != nil {
			return err
		}
		tmp, err = os.OpenFile(partfile.Name(path), os.O_WRONLY|os.O_CREATE|os.O_EXCL, 0o644)
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
	if len(meta) > 0 {
		if err := actor.Do(func() error { return xmeta.Set(tmpName, meta) }); err != nil {
			_ = os.Remove(tmpName)
			status := httperr.StatusFor(err)
			if errors.Is(err, xmeta.ErrInvalid) {
				status = http.StatusBadRequest
			}
			return Entry{}, status, fmt.Errorf("write %s: %v", path, identity.BareError(err))
		}
	}
	if err := actor.Do(func() error { return os.Rename(tmpName, path) }); err != nil {
		_ = os.Remove(tmpName)
		return Entry{}, httperr.StatusFor(err), fmt.Errorf("write %s: %v", path, identity.BareError(err))
	}
	h.Log.Debug("file written", "path", path, "user", actor.User().Name)
	return Entry{Path: path, Name: filepath.Base(path), Type: "file", Metadata: meta}, 0, nil
}

// makeParents creates the missing directories above an upload as E2B's
// envd does: as root, each owned by the uploading user, so an upload may
// name a new directory anywhere (E2B's SDK tests write /0/file as the
// default user; whoever holds the sandbox's token can act as root in any
// case). The file itself is still written with the user's permissions, so
// another user's file is not overwritten. Without root, envd makes them
// as itself.
func makeParents(dir string, u *identity.User) error {
	if os.Geteuid() != 0 {
		return nil // the user's own MkdirAll follows
	}
	var missing []string
	for d := dir; ; d = filepath.Dir(d) {
		if _, err := os.Lstat(d); err == nil {
			break
		} else if !errors.Is(err, fs.ErrNotExist) {
			return err
		}
		missing = append(missing, d)
		if d == filepath.Dir(d) {
			break
		}
	}
	for i := len(missing) - 1; i >= 0; i-- {
		if err := os.Mkdir(missing[i], 0o755); err != nil && !errors.Is(err, fs.ErrExist) {
			return err
		}
		if err := os.Lchown(missing[i], int(u.UID), int(u.GID)); err != nil {
			return err
		}
	}
	return nil
}
