// Package filesystem implements envd's filesystem.Filesystem Connect
// service. Every operation runs with the requesting user's file-system
// credentials, so Linux decides what that user may see and change.
package filesystem

import (
	"context"
	"errors"
	"fmt"
	"io/fs"
	"log/slog"
	"os"
	"path/filepath"
	"syscall"

	"connectrpc.com/connect"

	"github.com/wrenn/wrenn/internal/envd/identity"
	"github.com/wrenn/wrenn/internal/envd/session"
	pb "github.com/wrenn/wrenn/proto/envd/filesystem"
	"github.com/wrenn/wrenn/proto/envd/filesystem/filesystemconnect"
)

// maxListDepth bounds recursive listings so one call cannot walk forever.
const maxListDepth = 32

// Service is the filesystem.Filesystem handler.
type Service struct {
	log      *slog.Logger
	names    *names
	watchers *watcherTable
}

var _ filesystemconnect.FilesystemHandler = (*Service)(nil)

// NewService returns a filesystem service.
func NewService(log *slog.Logger) *Service {
	return &Service{log: log, names: newNames(), watchers: newWatcherTable()}
}

// Shutdown stops every polling watcher.
func (s *Service) Shutdown() { s.watchers.closeAll() }

// request resolves the caller and path of a request.
func request(ctx context.Context, path string) (*identity.Actor, string, error) {
	u := session.UserFrom(ctx)
	actor, err := identity.NewActor(u)
	if err != nil {
		return nil, "", connect.NewError(connect.CodePermissionDenied, err)
	}
	resolved, err := identity.ResolvePath(u, path)
	if err != nil {
		return nil, "", connect.NewError(connect.CodeInvalidArgument, err)
	}
	return actor, resolved, nil
}

// toConnect maps an OS error to the Connect code a client can act on.
func toConnect(op, path string, err error) error {
	wrapped := fmt.Errorf("%s %s: %w", op, path, identity.BareError(err))
	switch {
	case errors.Is(err, fs.ErrNotExist):
		return connect.NewError(connect.CodeNotFound, wrapped)
	case errors.Is(err, fs.ErrPermission):
		return connect.NewError(connect.CodePermissionDenied, wrapped)
	case errors.Is(err, fs.ErrExist):
		return connect.NewError(connect.CodeAlreadyExists, wrapped)
	case errors.Is(err, syscall.ENOTDIR), errors.Is(err, syscall.EISDIR), errors.Is(err, syscall.EINVAL), errors.Is(err, syscall.ENAMETOOLONG), errors.Is(err, syscall.ELOOP):
		return connect.NewError(connect.CodeInvalidArgument, wrapped)
	case errors.Is(err, syscall.ENOSPC), errors.Is(err, syscall.EDQUOT):
		return connect.NewError(connect.CodeResourceExhausted, wrapped)
	default:
		return connect.NewError(connect.CodeInternal, wrapped)
	}
}

// Stat describes one entry.
func (s *Service) Stat(ctx context.Context, req *connect.Request[pb.StatRequest]) (*connect.Response[pb.StatResponse], error) {
	actor, path, err := request(ctx, req.Msg.GetPath())
	if err != nil {
		return nil, err
	}
	var fi fs.FileInfo
	if err := actor.Do(func() (err error) { fi, err = os.Lstat(path); return }); err != nil {
		return nil, toConnect("stat", path, err)
	}
	return connect.NewResponse(&pb.StatResponse{Entry: s.names.entryInfo(path, fi)}), nil
}

// MakeDir creates a directory and its parents, owned by the caller.
func (s *Service) MakeDir(ctx context.Context, req *connect.Request[pb.MakeDirRequest]) (*connect.Response[pb.MakeDirResponse], error) {
	actor, path, err := request(ctx, req.Msg.GetPath())
	if err != nil {
		return nil, err
	}
	var fi fs.FileInfo
	err = actor.Do(func() error {
		if existing, err := os.Lstat(path); err == nil {
			if existing.IsDir() {
				return fs.ErrExist
			}
			return syscall.ENOTDIR
		}
		if err := os.MkdirAll(path, 0o755); err != nil {
			return err
		}
		fi, err = os.Lstat(path)
		return err
	})
	if err != nil {
		return nil, toConnect("make directory", path, err)
	}
	return connect.NewResponse(&pb.MakeDirResponse{Entry: s.names.entryInfo(path, fi)}), nil
}

// Move renames an entry, creating the destination's parents.
func (s *Service) Move(ctx context.Context, req *connect.Request[pb.MoveRequest]) (*connect.Response[pb.MoveResponse], error) {
	actor, src, err := request(ctx, req.Msg.GetSource())
	if err != nil {
		return nil, err
	}
	_, dst, err := request(ctx, req.Msg.GetDestination())
	if err != nil {
		return nil, err
	}
	var fi fs.FileInfo
	err = actor.Do(func() error {
		if _, err := os.Lstat(src); err != nil {
			return err
		}
		if err := os.MkdirAll(filepath.Dir(dst), 0o755); err != nil {
			return err
		}
		if err := os.Rename(src, dst); err != nil {
			return err
		}
		fi, err = os.Lstat(dst)
		return err
	})
	if err != nil {
		return nil, toConnect("move", src+" to "+dst, err)
	}
	return connect.NewResponse(&pb.MoveResponse{Entry: s.names.entryInfo(dst, fi)}), nil
}

// Remove deletes a file or a whole directory tree.
func (s *Service) Remove(ctx context.Context, req *connect.Request[pb.RemoveRequest]) (*connect.Response[pb.RemoveResponse], error) {
	actor, path, err := request(ctx, req.Msg.GetPath())
	if err != nil {
		return nil, err
	}
	if path == "/" {
		return nil, connect.NewError(connect.CodeInvalidArgument, errors.New("refusing to remove /"))
	}
	// Removing what is not there succeeds, as in E2B's envd (whose SDK
	// tests remove missing files and expect no error).
	err = actor.Do(func() error { return os.RemoveAll(path) })
	if err != nil {
		return nil, toConnect("remove", path, err)
	}
	return connect.NewResponse(&pb.RemoveResponse{}), nil
}

// ListDir lists a directory, descending depth levels (0 and 1 mean one).
// Symbolic links are listed but not followed.
func (s *Service) ListDir(ctx context.Context, req *connect.Request[pb.ListDirRequest]) (*connect.Response[pb.ListDirResponse], error) {
	actor, root, err := request(ctx, req.Msg.GetPath())
	if err != nil {
		return nil, err
	}
	depth := int(req.Msg.GetDepth())
	if depth == 0 {
		depth = 1
	}
	if depth > maxListDepth {
		return nil, connect.NewError(connect.CodeInvalidArgument, fmt.Errorf("depth %d is larger than %d", depth, maxListDepth))
	}
	var entries []*pb.EntryInfo
	err = actor.Do(func() error {
		fi, err := os.Stat(root)
		if err != nil {
			return err
		}
		if !fi.IsDir() {
			return syscall.ENOTDIR
		}
		return s.list(ctx, root, depth, &entries)
	})
	if err != nil {
		return nil, toConnect("list", root, err)
	}
	return connect.NewResponse(&pb.ListDirResponse{Entries: entries}), nil
}

func (s *Service) list(ctx context.Context, dir string, depth int, out *[]*pb.EntryInfo) error {
	if err := ctx.Err(); err != nil {
		return err
	}
	des, err := os.ReadDir(dir)
	if err != nil {
		return err
	}
	for _, de := range des {
		p := filepath.Join(dir, de.Name())
		fi, err := de.Info()
		if err != nil {
			continue // removed while listing
		}
		*out = append(*out, s.names.entryInfo(p, fi))
		if depth > 1 && de.IsDir() {
			// A subdirectory the user cannot read is listed but not entered.
			if err := s.list(ctx, p, depth-1, out); err != nil && !errors.Is(err, fs.ErrPermission) {
				return err
			}
		}
	}
	return nil
}
