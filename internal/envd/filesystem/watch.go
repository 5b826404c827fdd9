package filesystem

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"sync"
	"syscall"
	"time"

	"connectrpc.com/connect"
	"github.com/fsnotify/fsnotify"

	"github.com/wrenn/wrenn/internal/envd/identity"
	"github.com/wrenn/wrenn/internal/envd/partfile"
	"github.com/wrenn/wrenn/internal/envd/session"
	pb "github.com/wrenn/wrenn/proto/envd/filesystem"
)

// Bounds for polling watchers: a client that stops polling must not make
// envd hold events or watchers without limit.
const (
	maxBufferedEvents = 10000
	maxWatchers       = 256
)

// dirWatch turns inotify events below one directory into protocol events.
type dirWatch struct {
	root         string
	recursive    bool
	includeEntry bool
	actor        *identity.Actor
	names        *names
	w            *fsnotify.Watcher
	events       chan *pb.FilesystemEvent
	failed       chan error
	done         chan struct{}
	closeOnce    sync.Once
	// uploaded holds targets whose part file was just renamed away (over
	// them, as an upload ends); only run's goroutine touches it.
	uploaded map[string]struct{}
}

// maxPendingUploads bounds uploaded: a part file renamed elsewhere never
// has its target created.
const maxPendingUploads = 1024

func newDirWatch(actor *identity.Actor, n *names, root string, recursive, includeEntry bool) (*dirWatch, error) {
	var fi fs.FileInfo
	if err := actor.Do(func() (err error) { fi, err = os.Stat(root); return }); err != nil {
		return nil, toConnect("watch", root, err)
	}
	if !fi.IsDir() {
		return nil, toConnect("watch", root, syscall.ENOTDIR)
	}
	w, err := fsnotify.NewWatcher()
	if err != nil {
		return nil, toConnect("watch", root, err)
	}
	d := &dirWatch{
		root: root, recursive: recursive, includeEntry: includeEntry, actor: actor, names: n, w: w,
		events: make(chan *pb.FilesystemEvent, 64), failed: make(chan error, 1), done: make(chan struct{}),
		uploaded: map[string]struct{}{},
	}
	if err := d.add(root); err != nil {
		_ = w.Close()
		return nil, toConnect("watch", root, err)
	}
	go d.run()
	return d, nil
}

// add watches dir (and, when recursive, every directory below it) as the
// user: inotify itself refuses directories the user cannot read.
func (d *dirWatch) add(dir string) error {
	return d.actor.Do(func() error {
		if !d.recursive {
			return d.w.Add(dir)
		}
		return filepath.WalkDir(dir, func(p string, de fs.DirEntry, err error) error {
			if err != nil {
				if p == dir {
					return err
				}
				return nil // unreadable or vanished below the root: skip it
			}
			if !de.IsDir() {
				return nil
			}
			if err := d.w.Add(p); err != nil && p == dir {
				return err
			}
			return nil
		})
	})
}

func (d *dirWatch) run() {
	defer close(d.events)
	for {
		select {
		case <-d.done:
			return
		case err, ok := <-d.w.Errors:
			if !ok {
				return
			}
			select {
			case d.failed <- err:
			default:
			}
		case ev, ok := <-d.w.Events:
			if !ok {
				return
			}
			if d.recursive && ev.Has(fsnotify.Create) {
				if fi, err := os.Lstat(ev.Name); err == nil && fi.IsDir() {
					_ = d.add(ev.Name)
				}
			}
			for _, out := range d.translate(ev) {
				select {
				case d.events <- out:
				case <-d.done:
					return
				}
			}
		}
	}
}

// translate maps one inotify event to protocol events; fsnotify may merge
// several operations into one event. An upload is written to a part file
// and renamed over its target; clients (E2B's SDKs among them) expect to
// see the target written, as if the upload had written it in place, and
// nothing of the part file.
func (d *dirWatch) translate(ev fsnotify.Event) []*pb.FilesystemEvent {
	if target, ok := partfile.Target(ev.Name); ok {
		if ev.Has(fsnotify.Rename) {
			if len(d.uploaded) >= maxPendingUploads {
				clear(d.uploaded)
			}
			d.uploaded[target] = struct{}{}
		}
		return nil
	}
	if _, ok := d.uploaded[ev.Name]; ok && ev.Has(fsnotify.Create) {
		delete(d.uploaded, ev.Name)
		ev.Op |= fsnotify.Write
	}
	name, err := filepath.Rel(d.root, ev.Name)
	if err != nil {
		name = ev.Name
	}
	var entry *pb.EntryInfo
	if d.includeEntry && !ev.Has(fsnotify.Remove) && !ev.Has(fsnotify.Rename) {
		if fi, err := os.Lstat(ev.Name); err == nil {
			entry = d.names.entryInfo(ev.Name, fi)
		}
	}
	ops := []struct {
		op fsnotify.Op
		t  pb.EventType
	}{
		{fsnotify.Create, pb.EventType_EVENT_TYPE_CREATE},
		{fsnotify.Write, pb.EventType_EVENT_TYPE_WRITE},
		{fsnotify.Remove, pb.EventType_EVENT_TYPE_REMOVE},
		{fsnotify.Rename, pb.EventType_EVENT_TYPE_RENAME},
		{fsnotify.Chmod, pb.EventType_EVENT_TYPE_CHMOD},
	}
	var out []*pb.FilesystemEvent
	for _, o := range ops {
		if ev.Has(o.op) {
			out = append(out, &pb.FilesystemEvent{Name: name, Type: o.t, Entry: entry})
		}
	}
	return out
}

func (d *dirWatch) close() {
	d.closeOnce.Do(func() {
		close(d.done)
		_ = d.w.Close()
	})
}

// networkAllowed refuses to watch a network file system unless asked:
// changes made on other machines would not be seen.
func networkAllowed(root string, allow bool) error {
	if fsType := onNetworkFS(root); fsType != "" && !allow {
		return connect.NewError(connect.CodeFailedPrecondition,
			fmt.Errorf("%s is on a network file system (%s), where changes made elsewhere are not seen; set allowNetworkMounts to watch it anyway", root, fsType))
	}
	return nil
}

// WatchDir streams changes below a directory until the client leaves.
func (s *Service) WatchDir(ctx context.Context, req *connect.Request[pb.WatchDirRequest], stream *connect.ServerStream[pb.WatchDirResponse]) error {
	actor, root, err := request(ctx, req.Msg.GetPath())
	if err != nil {
		return err
	}
	if err := networkAllowed(root, req.Msg.GetAllowNetworkMounts()); err != nil {
		return err
	}
	d, err := newDirWatch(actor, s.names, root, req.Msg.GetRecursive(), req.Msg.GetIncludeEntry())
	if err != nil {
		return err
	}
	defer d.close()
	if err := stream.Send(&pb.WatchDirResponse{Event: &pb.WatchDirResponse_Start{Start: &pb.WatchDirResponse_StartEvent{}}}); err != nil {
		return err
	}
	interval := session.KeepaliveInterval(req.Header())
	keepalive := time.NewTicker(interval)
	defer keepalive.Stop()
	for {
		select {
		case <-ctx.Done():
			return nil
		case err := <-d.failed:
			return connect.NewError(connect.CodeInternal, fmt.Errorf("watch %s: %w", root, err))
		case ev, ok := <-d.events:
			if !ok {
				return nil
			}
			if err := stream.Send(&pb.WatchDirResponse{Event: &pb.WatchDirResponse_Filesystem{Filesystem: ev}}); err != nil {
				return err
			}
			keepalive.Reset(interval)
		case <-keepalive.C:
			if err := stream.Send(&pb.WatchDirResponse{Event: &pb.WatchDirResponse_Keepalive{Keepalive: &pb.WatchDirResponse_KeepAlive{}}}); err != nil {
				return err
			}
		}
	}
}

// pollWatcher buffers events for a client that polls GetWatcherEvents.
type pollWatcher struct {
	d       *dirWatch
	owner   uint32
	mu      sync.Mutex
	pending []*pb.FilesystemEvent
	dropped int
}

func (p *pollWatcher) collect() {
	for ev := range p.d.events {
		p.mu.Lock()
		if len(p.pending) >= maxBufferedEvents {
			// Keep the newest events; the oldest are least useful to a late poller.
			p.pending = p.pending[1:]
			p.dropped++
		}
		p.pending = append(p.pending, ev)
		p.mu.Unlock()
	}
}

func (p *pollWatcher) take() []*pb.FilesystemEvent {
	p.mu.Lock()
	defer p.mu.Unlock()
	out := p.pending
	p.pending = nil
	return out
}

type watcherTable struct {
	mu   sync.Mutex
	byID map[string]*pollWatcher
}

func newWatcherTable() *watcherTable { return &watcherTable{byID: map[string]*pollWatcher{}} }

func (t *watcherTable) closeAll() {
	t.mu.Lock()
	defer t.mu.Unlock()
	for id, w := range t.byID {
		w.d.close()
		delete(t.byID, id)
	}
}

// get returns a watcher owned by the calling user; another user's watcher
// is reported as missing.
func (t *watcherTable) get(ctx context.Context, id string) (*pollWatcher, error) {
	t.mu.Lock()
	w, ok := t.byID[id]
	t.mu.Unlock()
	if !ok || w.owner != session.UserFrom(ctx).UID {
		return nil, connect.NewError(connect.CodeNotFound, fmt.Errorf("no watcher with id %q", id))
	}
	return w, nil
}

// CreateWatcher starts a polling watcher and returns its id.
func (s *Service) CreateWatcher(ctx context.Context, req *connect.Request[pb.CreateWatcherRequest]) (*connect.Response[pb.CreateWatcherResponse], error) {
	actor, root, err := request(ctx, req.Msg.GetPath())
	if err != nil {
		return nil, err
	}
	s.watchers.mu.Lock()
	full := len(s.watchers.byID) >= maxWatchers
	s.watchers.mu.Unlock()
	if full {
		return nil, connect.NewError(connect.CodeResourceExhausted, fmt.Errorf("too many watchers (%d); remove some first", maxWatchers))
	}
	if err := networkAllowed(root, req.Msg.GetAllowNetworkMounts()); err != nil {
		return nil, err
	}
	d, err := newDirWatch(actor, s.names, root, req.Msg.GetRecursive(), req.Msg.GetIncludeEntry())
	if err != nil {
		return nil, err
	}
	var raw [12]byte
	if _, err := rand.Read(raw[:]); err != nil {
		d.close()
		return nil, connect.NewError(connect.CodeInternal, fmt.Errorf("watcher id: %w", err))
	}
	id := hex.EncodeToString(raw[:])
	pw := &pollWatcher{d: d, owner: actor.User().UID}
	go pw.collect()
	s.watchers.mu.Lock()
	s.watchers.byID[id] = pw
	s.watchers.mu.Unlock()
	return connect.NewResponse(&pb.CreateWatcherResponse{WatcherId: id}), nil
}

// GetWatcherEvents returns and clears the events seen since the last call.
func (s *Service) GetWatcherEvents(ctx context.Context, req *connect.Request[pb.GetWatcherEventsRequest]) (*connect.Response[pb.GetWatcherEventsResponse], error) {
	w, err := s.watchers.get(ctx, req.Msg.GetWatcherId())
	if err != nil {
		return nil, err
	}
	select {
	case werr := <-w.d.failed:
		return nil, connect.NewError(connect.CodeInternal, fmt.Errorf("watcher %s failed: %w", req.Msg.GetWatcherId(), werr))
	default:
	}
	return connect.NewResponse(&pb.GetWatcherEventsResponse{Events: w.take()}), nil
}

// RemoveWatcher stops a polling watcher.
func (s *Service) RemoveWatcher(ctx context.Context, req *connect.Request[pb.RemoveWatcherRequest]) (*connect.Response[pb.RemoveWatcherResponse], error) {
	w, err := s.watchers.get(ctx, req.Msg.GetWatcherId())
	if err != nil {
		return nil, err
	}
	s.watchers.mu.Lock()
	delete(s.watchers.byID, req.Msg.GetWatcherId())
	s.watchers.mu.Unlock()
	w.d.close()
	return connect.NewResponse(&pb.RemoveWatcherResponse{}), nil
}
