package server_test

import (
	"context"
	"io"
	"net/http"
	neturl "net/url"
	"os"
	"path/filepath"
	"sort"
	"strings"
	"testing"
	"time"

	"connectrpc.com/connect"

	fspb "github.com/wrenn/wrenn/proto/envd/filesystem"
)

func TestFilesystemOperations(t *testing.T) {
	h := newHarness(t)
	ctx := testCtx(t, 30*time.Second)
	root := t.TempDir()

	mk, err := h.fs.MakeDir(ctx, connect.NewRequest(&fspb.MakeDirRequest{Path: filepath.Join(root, "a/b/c")}))
	if err != nil {
		t.Fatal(err)
	}
	if mk.Msg.GetEntry().GetType() != fspb.FileType_FILE_TYPE_DIRECTORY || mk.Msg.GetEntry().GetName() != "c" {
		t.Fatalf("mkdir entry %v", mk.Msg.GetEntry())
	}
	_, err = h.fs.MakeDir(ctx, connect.NewRequest(&fspb.MakeDirRequest{Path: filepath.Join(root, "a/b/c")}))
	wantCode(t, err, connect.CodeAlreadyExists)

	file := filepath.Join(root, "a/hello.txt")
	if err := os.WriteFile(file, []byte("hello"), 0o640); err != nil {
		t.Fatal(err)
	}
	if err := os.Symlink("hello.txt", filepath.Join(root, "a/link")); err != nil {
		t.Fatal(err)
	}
	e, err := h.stat(ctx, file)
	if err != nil {
		t.Fatal(err)
	}
	if e.GetSize() != 5 || e.GetMode() != 0o640 || e.GetPermissions() != "-rw-r-----" || e.GetType() != fspb.FileType_FILE_TYPE_FILE ||
		e.GetOwner() == "" || e.GetGroup() == "" || e.GetModifiedTime().AsTime().IsZero() || e.GetPath() != file {
		t.Fatalf("stat %v", e)
	}
	link, err := h.stat(ctx, filepath.Join(root, "a/link"))
	if err != nil {
		t.Fatal(err)
	}
	// As E2B's envd: the target resolved, its type and mode, the link's permissions.
	if link.GetType() != fspb.FileType_FILE_TYPE_FILE || link.GetSymlinkTarget() != file || link.GetMode() != 0o640 ||
		!strings.HasPrefix(link.GetPermissions(), "L") {
		t.Fatalf("symlink stat %v", link)
	}

	// Depth 1 lists a's children; depth 3 reaches c.
	list := func(depth uint32) []string {
		t.Helper()
		res, err := h.fs.ListDir(ctx, connect.NewRequest(&fspb.ListDirRequest{Path: filepath.Join(root, "a"), Depth: depth}))
		if err != nil {
			t.Fatal(err)
		}
		var names []string
		for _, e := range res.Msg.GetEntries() {
			rel, _ := filepath.Rel(root, e.GetPath())
			names = append(names, rel)
		}
		sort.Strings(names)
		return names
	}
	if got := list(1); len(got) != 3 || got[0] != "a/b" || got[1] != "a/hello.txt" || got[2] != "a/link" {
		t.Fatalf("depth 1: %v", got)
	}
	if got := list(3); len(got) != 4 || got[1] != "a/b/c" {
		t.Fatalf("depth 3: %v", got)
	}

	moved, err := h.fs.Move(ctx, connect.NewRequest(&fspb.MoveRequest{Source: file, Destination: filepath.Join(root, "new/dir/hi.txt")}))
	if err != nil {
		t.Fatal(err)
	}
	if moved.Msg.GetEntry().GetName() != "hi.txt" || moved.Msg.GetEntry().GetSize() != 5 {
		t.Fatalf("moved %v", moved.Msg.GetEntry())
	}
	if _, err := os.Stat(file); !os.IsNotExist(err) {
		t.Fatalf("source still exists: %v", err)
	}

	if _, err := h.fs.Remove(ctx, connect.NewRequest(&fspb.RemoveRequest{Path: filepath.Join(root, "a")})); err != nil {
		t.Fatal(err)
	}
	_, err = h.stat(ctx, filepath.Join(root, "a"))
	wantCode(t, err, connect.CodeNotFound)
}

func TestFilesystemHomeRelativePaths(t *testing.T) {
	h := newHarness(t)
	ctx := testCtx(t, 30*time.Second)
	home, _ := os.UserHomeDir()
	for _, p := range []string{"~", ".", ""} {
		e, err := h.stat(ctx, p)
		if p == "" {
			wantCode(t, err, connect.CodeInvalidArgument)
			continue
		}
		if err != nil || e.GetPath() != home {
			t.Fatalf("stat %q: %v %v, want %s", p, e.GetPath(), err, home)
		}
	}
}

func TestFilesystemBadInput(t *testing.T) {
	h := newHarness(t)
	ctx := testCtx(t, 30*time.Second)
	root := t.TempDir()
	file := filepath.Join(root, "f")
	_ = os.WriteFile(file, []byte("x"), 0o644)

	_, err := h.fs.ListDir(ctx, connect.NewRequest(&fspb.ListDirRequest{Path: file}))
	wantCode(t, err, connect.CodeInvalidArgument)
	_, err = h.fs.ListDir(ctx, connect.NewRequest(&fspb.ListDirRequest{Path: root + "/missing"}))
	wantCode(t, err, connect.CodeNotFound)
	_, err = h.fs.ListDir(ctx, connect.NewRequest(&fspb.ListDirRequest{Path: root, Depth: 1000}))
	wantCode(t, err, connect.CodeInvalidArgument)
	_, err = h.fs.MakeDir(ctx, connect.NewRequest(&fspb.MakeDirRequest{Path: file}))
	wantCode(t, err, connect.CodeInvalidArgument)
	if _, err = h.fs.Remove(ctx, connect.NewRequest(&fspb.RemoveRequest{Path: root + "/missing"})); err != nil {
		t.Fatalf("removing a missing file: %v (E2B's envd answers success)", err)
	}
	_, err = h.fs.Remove(ctx, connect.NewRequest(&fspb.RemoveRequest{Path: "/"}))
	wantCode(t, err, connect.CodeInvalidArgument)
	_, err = h.fs.Move(ctx, connect.NewRequest(&fspb.MoveRequest{Source: root + "/missing", Destination: root + "/x"}))
	wantCode(t, err, connect.CodeNotFound)
	_, err = h.stat(ctx, "bad\x00path")
	wantCode(t, err, connect.CodeInvalidArgument)
	_, err = h.fs.GetWatcherEvents(ctx, connect.NewRequest(&fspb.GetWatcherEventsRequest{WatcherId: "nope"}))
	wantCode(t, err, connect.CodeNotFound)
	_, err = h.fs.CreateWatcher(ctx, connect.NewRequest(&fspb.CreateWatcherRequest{Path: file}))
	wantCode(t, err, connect.CodeInvalidArgument)
}

func TestFilesystemPermissionDenied(t *testing.T) {
	requireRoot(t)
	h := newHarness(t)
	ctx := testCtx(t, 30*time.Second)
	root := t.TempDir() // 0700, owned by root
	secret := filepath.Join(root, "secret")
	_ = os.WriteFile(secret, []byte("x"), 0o600)

	stat := connect.NewRequest(&fspb.StatRequest{Path: secret})
	_, err := h.fs.Stat(ctx, asUser(stat, "nobody"))
	wantCode(t, err, connect.CodePermissionDenied)
	_, err = h.fs.ListDir(ctx, asUser(connect.NewRequest(&fspb.ListDirRequest{Path: root}), "nobody"))
	wantCode(t, err, connect.CodePermissionDenied)
	_, err = h.fs.Remove(ctx, asUser(connect.NewRequest(&fspb.RemoveRequest{Path: secret}), "nobody"))
	wantCode(t, err, connect.CodePermissionDenied)
	_, err = h.fs.MakeDir(ctx, asUser(connect.NewRequest(&fspb.MakeDirRequest{Path: "/root/wrenn-nobody-dir"}), "nobody"))
	wantCode(t, err, connect.CodePermissionDenied)
	stream, err := h.fs.WatchDir(ctx, asUser(connect.NewRequest(&fspb.WatchDirRequest{Path: root}), "nobody"))
	if err == nil {
		for stream.Receive() {
		}
		err = stream.Err()
	}
	wantCode(t, err, connect.CodePermissionDenied)
	if _, err := os.Stat(secret); err != nil {
		t.Fatalf("secret was touched: %v", err)
	}

	// A directory nobody may write: what nobody makes there belongs to nobody.
	shared := filepath.Join(root, "shared")
	_ = os.Mkdir(shared, 0o755)
	_ = os.Chmod(shared, 0o777) // Mkdir is subject to the umask
	_ = os.Chmod(root, 0o755)
	_ = os.Chmod(filepath.Dir(root), 0o755) // t.TempDir's parent is private too
	mk, err := h.fs.MakeDir(ctx, asUser(connect.NewRequest(&fspb.MakeDirRequest{Path: filepath.Join(shared, "mine")}), "nobody"))
	if err != nil {
		t.Fatal(err)
	}
	if mk.Msg.GetEntry().GetOwner() != "nobody" {
		t.Fatalf("owner %q, want nobody", mk.Msg.GetEntry().GetOwner())
	}
	// The thread that acted as nobody is root again afterwards.
	for range 20 {
		if _, err := h.stat(ctx, secret); err != nil {
			t.Fatalf("root lost access after acting as nobody: %v", err)
		}
	}
}

// watchEvents watches root and returns a function that waits for an
// event, and every event seen so far.
func watchEvents(t *testing.T, h *harness, ctx context.Context, root string, recursive bool) (expect func(name string, typ fspb.EventType), seen func() []*fspb.FilesystemEvent) {
	t.Helper()
	stream, err := h.fs.WatchDir(ctx, connect.NewRequest(&fspb.WatchDirRequest{Path: root, Recursive: recursive}))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = stream.Close() })
	if !stream.Receive() || stream.Msg().GetStart() == nil {
		t.Fatalf("no start event: %v", stream.Err())
	}
	events := make(chan *fspb.FilesystemEvent, 100)
	go func() {
		for stream.Receive() {
			if ev := stream.Msg().GetFilesystem(); ev != nil {
				events <- ev
			}
		}
		close(events)
	}()
	var all []*fspb.FilesystemEvent
	expect = func(name string, typ fspb.EventType) {
		t.Helper()
		timeout := time.After(5 * time.Second)
		for {
			select {
			case ev, ok := <-events:
				if !ok {
					t.Fatalf("stream ended waiting for %v %s", typ, name)
				}
				all = append(all, ev)
				if ev.GetName() == name && ev.GetType() == typ {
					return
				}
			case <-timeout:
				t.Fatalf("no %v event for %s", typ, name)
			}
		}
	}
	return expect, func() []*fspb.FilesystemEvent { return all }
}

func TestWatchDir(t *testing.T) {
	h := newHarness(t)
	ctx := testCtx(t, 30*time.Second)
	root := t.TempDir()
	_ = os.Mkdir(filepath.Join(root, "sub"), 0o755)
	expect, _ := watchEvents(t, h, ctx, root, true)

	f := filepath.Join(root, "sub", "a.txt")
	_ = os.WriteFile(f, []byte("1"), 0o644)
	expect("sub/a.txt", fspb.EventType_EVENT_TYPE_CREATE)
	expect("sub/a.txt", fspb.EventType_EVENT_TYPE_WRITE)
	_ = os.Rename(f, filepath.Join(root, "sub", "b.txt"))
	expect("sub/a.txt", fspb.EventType_EVENT_TYPE_RENAME)
	expect("sub/b.txt", fspb.EventType_EVENT_TYPE_CREATE)
	_ = os.Chmod(filepath.Join(root, "sub", "b.txt"), 0o600)
	expect("sub/b.txt", fspb.EventType_EVENT_TYPE_CHMOD)
	_ = os.Remove(filepath.Join(root, "sub", "b.txt"))
	expect("sub/b.txt", fspb.EventType_EVENT_TYPE_REMOVE)
	// A directory created after the watch started is watched too.
	_ = os.Mkdir(filepath.Join(root, "late"), 0o755)
	expect("late", fspb.EventType_EVENT_TYPE_CREATE)
	time.Sleep(50 * time.Millisecond)
	_ = os.WriteFile(filepath.Join(root, "late", "x"), nil, 0o644)
	expect("late/x", fspb.EventType_EVENT_TYPE_CREATE)
}

// An upload goes to a part file renamed over its target; a watcher sees
// the target created and written, as E2B's SDK tests expect, and nothing
// of the part file.
func TestWatchDirSeesUploadsAsWrites(t *testing.T) {
	h := newHarness(t)
	ctx := testCtx(t, 30*time.Second)
	root := t.TempDir()
	expect, seen := watchEvents(t, h, ctx, root, false)
	dest := filepath.Join(root, "notes.txt")
	for i, content := range []string{"first", "second"} {
		res, body := h.upload(t, neturl.Values{"path": {dest}}, map[string]io.Reader{"x": strings.NewReader(content)})
		if res.StatusCode != http.StatusOK {
			t.Fatalf("upload %d: %d %s", i, res.StatusCode, body)
		}
		if i == 0 {
			expect("notes.txt", fspb.EventType_EVENT_TYPE_CREATE)
		}
		expect("notes.txt", fspb.EventType_EVENT_TYPE_WRITE)
	}
	_ = os.WriteFile(filepath.Join(root, "end"), nil, 0o644)
	expect("end", fspb.EventType_EVENT_TYPE_CREATE)
	for _, ev := range seen() {
		if ev.GetName() != "notes.txt" && ev.GetName() != "end" {
			t.Fatalf("event for %q (%v): only the upload's target should show", ev.GetName(), ev.GetType())
		}
	}
}

func TestPollingWatcher(t *testing.T) {
	h := newHarness(t)
	ctx := testCtx(t, 30*time.Second)
	root := t.TempDir()
	created, err := h.fs.CreateWatcher(ctx, connect.NewRequest(&fspb.CreateWatcherRequest{Path: root, IncludeEntry: true}))
	if err != nil {
		t.Fatal(err)
	}
	id := created.Msg.GetWatcherId()
	_ = os.WriteFile(filepath.Join(root, "one"), []byte("abc"), 0o644)
	var got []*fspb.FilesystemEvent
	waitUntil(t, func() bool {
		res, err := h.fs.GetWatcherEvents(ctx, connect.NewRequest(&fspb.GetWatcherEventsRequest{WatcherId: id}))
		if err != nil {
			t.Fatal(err)
		}
		got = append(got, res.Msg.GetEvents()...)
		return len(got) >= 2
	})
	if got[0].GetName() != "one" || got[0].GetType() != fspb.EventType_EVENT_TYPE_CREATE || got[0].GetEntry().GetPath() != filepath.Join(root, "one") {
		t.Fatalf("events %v", got)
	}
	// Another user cannot read or remove this watcher.
	if os.Geteuid() == 0 {
		_, err = h.fs.GetWatcherEvents(ctx, asUser(connect.NewRequest(&fspb.GetWatcherEventsRequest{WatcherId: id}), "nobody"))
		wantCode(t, err, connect.CodeNotFound)
	}
	if _, err := h.fs.RemoveWatcher(ctx, connect.NewRequest(&fspb.RemoveWatcherRequest{WatcherId: id})); err != nil {
		t.Fatal(err)
	}
	_, err = h.fs.GetWatcherEvents(ctx, connect.NewRequest(&fspb.GetWatcherEventsRequest{WatcherId: id}))
	wantCode(t, err, connect.CodeNotFound)
}
