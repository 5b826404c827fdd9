package api

import (
	"context"
	"errors"
	"io"
	"io/fs"
	"mime/multipart"
	"net/http"
	"path"
	"strings"

	"connectrpc.com/connect"

	"github.com/wrenn/wrenn/internal/controlplane/agentclient"
	"github.com/wrenn/wrenn/internal/controlplane/store"
	pb "github.com/wrenn/wrenn/proto/hostagent/v2"
)

// maxWholeFile bounds files/write (as it always has); files/stream/write
// has no limit. Both pass the upload on in chunks.
const maxWholeFile = 64 << 20

type pathRequest struct {
	Path  string `json:"path"`
	Depth *int   `json:"depth"`
	User  string `json:"user"`
}

func checkPath(p string) error {
	if p == "" {
		return badRequest("path is required")
	}
	if len(p) > 4096 || strings.ContainsRune(p, 0) {
		return badRequest("path must be at most 4096 bytes without NUL")
	}
	return nil
}

// pathCall reads a {"path": ...} body and loads the running capsule it
// is about, with its agent: the start of every path-based file route.
func (s *Server) pathCall(w http.ResponseWriter, r *http.Request, p *principal) (pathRequest, store.Sandbox, agentclient.Client, error) {
	var req pathRequest
	if err := decode(w, r, &req, false); err != nil {
		return req, store.Sandbox{}, nil, err
	}
	if err := checkPath(req.Path); err != nil {
		return req, store.Sandbox{}, nil, err
	}
	if req.Depth != nil && (*req.Depth < 0 || *req.Depth > 16) {
		return req, store.Sandbox{}, nil, badRequest("depth must be between 0 and 16")
	}
	sb, c, err := s.running(r, p)
	return req, sb, c, err
}

// uploadPart finds the multipart "path" field and the "file" part, in
// either order. The file part is returned unread, for streaming.
func uploadPart(r *http.Request) (string, *multipart.Part, error) {
	mr, err := r.MultipartReader()
	if err != nil {
		return "", nil, badRequest("expected multipart/form-data with fields path and file")
	}
	var dest string
	for {
		part, err := mr.NextPart()
		if err == io.EOF {
			return "", nil, badRequest("multipart body has no file part")
		}
		if err != nil {
			return "", nil, badRequest("malformed multipart body: %v", err)
		}
		switch part.FormName() {
		case "path":
			b, err := io.ReadAll(io.LimitReader(part, 4097))
			if err != nil {
				return "", nil, badRequest("malformed multipart body: %v", err)
			}
			dest = string(b)
		case "file":
			if dest == "" {
				// The path may follow the file only in the non-streaming form; require it first here.
				return "", nil, badRequest("the path field must come before the file part")
			}
			return dest, part, checkPath(dest)
		}
	}
}

// writeFile uploads a file of at most maxWholeFile bytes. Like the stream
// variant it passes the upload on in chunks: nothing is held whole.
func (s *Server) writeFile(w http.ResponseWriter, r *http.Request, p *principal) error {
	return s.upload(w, r, p, maxWholeFile)
}

func (s *Server) streamWriteFile(w http.ResponseWriter, r *http.Request, p *principal) error {
	return s.upload(w, r, p, 0)
}

// upload streams a multipart upload to the agent; limit > 0 bounds the
// request body. A broken or oversized upload leaves no file behind (the
// agent renames its temporary file only once all of it arrived).
func (s *Server) upload(w http.ResponseWriter, r *http.Request, p *principal, limit int64) error {
	sb, c, err := s.running(r, p)
	if err != nil {
		return err
	}
	if limit > 0 {
		r.Body = http.MaxBytesReader(w, r.Body, limit+1<<20) // room for the multipart framing
	}
	dest, part, err := uploadPart(r)
	if err != nil {
		return err
	}
	// Cancelling ctx breaks the stream, which tells the agent to drop the file.
	ctx, cancel := context.WithCancel(r.Context())
	defer cancel()
	up := c.WriteFileStream(ctx)
	if err := up.Send(&pb.WriteFileStreamRequest{Part: &pb.WriteFileStreamRequest_Header{Header: &pb.WriteFileRequest{SandboxId: sb.ID, Path: dest, User: v1User(sb, r.URL.Query().Get("user"))}}}); err != nil {
		_, cerr := up.CloseAndReceive()
		return errors.Join(err, cerr)
	}
	abort := func(e error) error {
		cancel()
		_, _ = up.CloseAndReceive()
		return e
	}
	buf := make([]byte, 1<<20)
	var sent int64
	for {
		n, rerr := part.Read(buf)
		sent += int64(n)
		var mbe *http.MaxBytesError
		if limit > 0 && (sent > limit || errors.As(rerr, &mbe)) {
			return abort(errf(http.StatusRequestEntityTooLarge, "payload_too_large", "files/write takes at most %d MiB; use files/stream/write", limit>>20))
		}
		if n > 0 {
			if err := up.Send(&pb.WriteFileStreamRequest{Part: &pb.WriteFileStreamRequest_Data{Data: buf[:n]}}); err != nil {
				// The agent ended the stream: its answer says why.
				if _, cerr := up.CloseAndReceive(); cerr != nil {
					return cerr
				}
				return err
			}
		}
		if rerr == io.EOF {
			break
		}
		if rerr != nil {
			return abort(badRequest("upload interrupted: %v", rerr))
		}
	}
	if _, err := up.CloseAndReceive(); err != nil {
		return err
	}
	w.WriteHeader(http.StatusNoContent)
	return nil
}

// readFile and streamReadFile both pass the file on in chunks as the
// agent sends them; neither holds it whole.
func (s *Server) readFile(w http.ResponseWriter, r *http.Request, p *principal) error {
	return s.streamReadFile(w, r, p)
}

func (s *Server) streamReadFile(w http.ResponseWriter, r *http.Request, p *principal) error {
	req, sb, c, err := s.pathCall(w, r, p)
	if err != nil {
		return err
	}
	stream, err := c.ReadFileStream(r.Context(), connect.NewRequest(&pb.ReadFileRequest{SandboxId: sb.ID, Path: req.Path, User: v1User(sb, req.User)}))
	if err != nil {
		return err
	}
	defer stream.Close()
	// The first chunk decides the status: errors such as a missing file
	// arrive before any data.
	if !stream.Receive() {
		if err := stream.Err(); err != nil {
			return err
		}
	}
	w.Header().Set("Content-Type", "application/octet-stream")
	w.WriteHeader(http.StatusOK)
	rc := http.NewResponseController(w)
	for first := true; ; first = false {
		if !first && !stream.Receive() {
			break
		}
		if _, err := w.Write(stream.Msg().GetData()); err != nil {
			return nil
		}
		_ = rc.Flush()
	}
	if err := stream.Err(); err != nil {
		// Headers are sent: abort the response so the client sees a broken transfer, not a short file.
		s.log.Warn("file stream broke", "capsule", sb.ID, "err", err)
		panic(http.ErrAbortHandler)
	}
	return nil
}

// fileEntryJSON is a directory entry, in upstream Wrenn's shape.
type fileEntryJSON struct {
	Name          string  `json:"name"`
	Path          string  `json:"path"`
	Type          string  `json:"type"` // file, directory or symlink
	Size          int64   `json:"size"`
	Mode          uint32  `json:"mode"`
	Permissions   string  `json:"permissions"`
	Owner         string  `json:"owner"`
	Group         string  `json:"group"`
	ModifiedAt    int64   `json:"modified_at"`
	SymlinkTarget *string `json:"symlink_target,omitempty"`
}

func toEntry(e *pb.FileEntry) fileEntryJSON {
	mode := fs.FileMode(e.GetMode() & 0o777)
	typ := e.GetType()
	if e.GetIsDir() {
		typ, mode = "directory", mode|fs.ModeDir
	}
	if typ == "" {
		typ = "file" // an agent from before types were reported
	}
	perms := e.GetPermissions()
	if perms == "" {
		perms = mode.String()
	}
	return fileEntryJSON{Name: e.GetName(), Path: e.GetPath(), Type: typ, Size: e.GetSize(), Mode: e.GetMode(),
		Permissions: perms, Owner: e.GetOwner(), Group: e.GetGroup(), ModifiedAt: e.GetModifiedAt().AsTime().Unix(),
		SymlinkTarget: e.SymlinkTarget}
}

func (s *Server) listDir(w http.ResponseWriter, r *http.Request, p *principal) error {
	req, sb, c, err := s.pathCall(w, r, p)
	if err != nil {
		return err
	}
	depth := 1 // 0 (non-recursive) and 1 both mean the directory's own entries
	if req.Depth != nil && *req.Depth > 1 {
		depth = *req.Depth
	}
	resp, err := c.ListDir(r.Context(), connect.NewRequest(&pb.ListDirRequest{SandboxId: sb.ID, Path: req.Path, User: v1User(sb, req.User), Depth: uint32(depth)}))
	if err != nil {
		return err
	}
	out := make([]fileEntryJSON, 0, len(resp.Msg.GetEntries()))
	for _, e := range resp.Msg.GetEntries() {
		out = append(out, toEntry(e))
	}
	writeJSON(w, http.StatusOK, map[string]any{"entries": out})
	return nil
}

func (s *Server) makeDir(w http.ResponseWriter, r *http.Request, p *principal) error {
	req, sb, c, err := s.pathCall(w, r, p)
	if err != nil {
		return err
	}
	if _, err := c.MakeDir(r.Context(), connect.NewRequest(&pb.MakeDirRequest{SandboxId: sb.ID, Path: req.Path, User: v1User(sb, req.User)})); err != nil {
		return err
	}
	writeJSON(w, http.StatusOK, map[string]any{"entry": fileEntryJSON{Name: path.Base(req.Path), Path: req.Path, Type: "directory", Permissions: (fs.ModeDir | 0o755).String()}})
	return nil
}

func (s *Server) removePath(w http.ResponseWriter, r *http.Request, p *principal) error {
	req, sb, c, err := s.pathCall(w, r, p)
	if err != nil {
		return err
	}
	if _, err := c.RemovePath(r.Context(), connect.NewRequest(&pb.RemovePathRequest{SandboxId: sb.ID, Path: req.Path, User: v1User(sb, req.User)})); err != nil {
		return err
	}
	w.WriteHeader(http.StatusNoContent)
	return nil
}
