package agenttest

import (
	"io/fs"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"connectrpc.com/connect"

	pb "github.com/wrenn/wrenn/proto/hostagent/v2"
)

// Tenant data on the host's disk (sandbox disks, snapshots of paused
// sandboxes, templates made from capsules) is readable by the agent's
// user alone: another local user (nobody) reads none of it, even where
// every directory above lets them through. Files an older agent left
// readable are made private at the next start.
func TestTenantDataIsPrivateOnDisk(t *testing.T) {
	a := newAgent(t)
	// Open the way down to WRENN_DIR as /var/lib/wrenn is (0755): only
	// the agent's own modes may keep nobody out.
	for d := a.dir; d != "/" && d != os.TempDir(); d = filepath.Dir(d) {
		if err := os.Chmod(d, 0o755); err != nil {
			t.Fatal(err)
		}
	}
	ctx := testCtx(t, 5*time.Minute)
	sb := a.create(ctx, &pb.CreateSandboxRequest{Id: "sb-private"})
	if out, code := a.rootSh(ctx, sb.GetId(), "echo the-tenant-secret-42 > /root/secret && sync"); code != 0 {
		t.Fatalf("write the secret: %d %s", code, out)
	}
	if _, err := a.client.CreateSnapshot(ctx, connect.NewRequest(&pb.CreateSnapshotRequest{SandboxId: sb.GetId(), Name: "tenant-template"})); err != nil {
		t.Fatal(err)
	}
	if _, err := a.client.PauseSandbox(ctx, connect.NewRequest(&pb.PauseSandboxRequest{Id: sb.GetId()})); err != nil {
		t.Fatal(err)
	}
	tenant := []string{filepath.Join(a.dir, "sandboxes"), filepath.Join(a.dir, "snapshots"), filepath.Join(a.dir, "images", "tenant-template")}
	checkPrivate := func(when string) {
		t.Helper()
		var files []string
		for _, root := range tenant {
			err := filepath.WalkDir(root, func(path string, d fs.DirEntry, err error) error {
				if err != nil {
					return err
				}
				fi, _ := d.Info()
				if (d.IsDir() || fi.Mode().IsRegular()) && fi.Mode().Perm()&0o077 != 0 {
					t.Errorf("%s: %s is %v, open to other users", when, path, fi.Mode().Perm())
				}
				if fi.Mode().IsRegular() {
					files = append(files, path)
				}
				return nil
			})
			if err != nil {
				t.Fatal(err)
			}
		}
		// As another user: not one of these files opens.
		for _, f := range files {
			out, err := exec.Command("setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", "head", "-c", "1", f).CombinedOutput()
			if err == nil || !strings.Contains(string(out), "Permission denied") {
				t.Errorf("%s: nobody read %s: %v %s", when, f, err, out)
			}
		}
		if len(files) < 4 {
			t.Fatalf("%s: only %d tenant files found: %v", when, len(files), files)
		}
	}
	checkPrivate("as written")

	// An older agent's files (world-readable) are made private at start.
	a.stop()
	for _, root := range tenant {
		_ = filepath.WalkDir(root, func(path string, d fs.DirEntry, err error) error {
			if err == nil && (d.IsDir() || d.Type().IsRegular()) {
				mode := os.FileMode(0o644)
				if d.IsDir() {
					mode = 0o755
				}
				_ = os.Chmod(path, mode)
			}
			return nil
		})
	}
	a.start()
	checkPrivate("after a restart")

	if _, err := a.client.ResumeSandbox(ctx, connect.NewRequest(&pb.ResumeSandboxRequest{Id: sb.GetId()})); err != nil {
		t.Fatal(err)
	}
	if out, _ := a.rootSh(ctx, sb.GetId(), "cat /root/secret"); out != "the-tenant-secret-42\n" {
		t.Fatalf("the sandbox's own data after resume: %q", out)
	}
	for _, id := range []string{sb.GetId()} {
		if _, err := a.client.DestroySandbox(ctx, connect.NewRequest(&pb.DestroySandboxRequest{Id: id})); err != nil {
			t.Fatal(err)
		}
	}
	if _, err := a.client.DeleteSnapshot(ctx, connect.NewRequest(&pb.DeleteSnapshotRequest{Name: "tenant-template"})); err != nil {
		t.Fatal(err)
	}
	a.assertClean()
}
