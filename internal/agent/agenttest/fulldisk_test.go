package agenttest

import (
	"net/http"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"connectrpc.com/connect"

	"github.com/wrenn/wrenn/internal/testutil/fulldisk"
	"github.com/wrenn/wrenn/internal/testutil/guestimages"
	pb "github.com/wrenn/wrenn/proto/hostagent/v2"
)

// TestFullDisk fills the file system under WRENN_DIR and checks the promise:
// every refused request says why, nothing running or paused is lost, a
// guest's writes wait instead of failing, and everything works again once
// space is freed — with nothing left behind.
func TestFullDisk(t *testing.T) {
	dir := guestimages.AgentDirIn(t, fulldisk.Mount(t, 1024))
	a := newAgentIn(t, dir, http.DefaultClient, "http", "--min-free-mib", "64")
	ctx := testCtx(t, 6*time.Minute)

	paused := a.create(ctx, &pb.CreateSandboxRequest{Id: "sb-full-paused"})
	if out, code := a.sh(ctx, paused.GetId(), "echo kept-while-paused > $HOME/mark && sync"); code != 0 {
		t.Fatalf("write mark: %s", out)
	}
	if _, err := a.client.PauseSandbox(ctx, connect.NewRequest(&pb.PauseSandboxRequest{Id: paused.GetId()})); err != nil {
		t.Fatalf("pause: %v", err)
	}
	running := a.create(ctx, &pb.CreateSandboxRequest{Id: "sb-full-running"})
	if out, code := a.sh(ctx, running.GetId(), "echo kept-while-running > $HOME/mark && sync"); code != 0 {
		t.Fatalf("write mark: %s", out)
	}
	// A guest that keeps writing while the host fills up: 24 MiB in
	// half-MiB steps, each synced to its disk, then a checksum.
	if out, code := a.sh(ctx, running.GetId(),
		"nohup sh -c 'for i in $(seq 48); do head -c 512K /dev/urandom >> $HOME/big; sync; sleep 0.5; done; md5sum $HOME/big > $HOME/big.md5' >/dev/null 2>&1 &"); code != 0 {
		t.Fatalf("start writer: %s", out)
	}

	filler := fulldisk.Fill(t, dir)

	// A create is refused with the reason, and leaves nothing.
	_, err := a.client.CreateSandbox(ctx, connect.NewRequest(&pb.CreateSandboxRequest{Id: "sb-full-new", Template: "minimal", Vcpus: 1, MemoryMib: 256}))
	wantCode(t, err, connect.CodeResourceExhausted)
	if !strings.Contains(err.Error(), "free disk space under WRENN_DIR") {
		t.Fatalf("create error does not say the disk is full: %v", err)
	}
	t.Logf("create on a full disk: %v", err)
	if _, err := os.Stat(filepath.Join(dir, "sandboxes", "sb-full-new")); !os.IsNotExist(err) {
		t.Fatalf("a refused create left its directory: %v", err)
	}

	// A pause is refused and the sandbox stays running (its guest may be
	// held by now, waiting for its disk writes: see below).
	_, err = a.client.PauseSandbox(ctx, connect.NewRequest(&pb.PauseSandboxRequest{Id: running.GetId()}))
	wantCode(t, err, connect.CodeResourceExhausted)
	if got, err := a.client.GetSandbox(ctx, connect.NewRequest(&pb.GetSandboxRequest{Id: running.GetId()})); err != nil || got.Msg.GetSandbox().GetState() != pb.SandboxState_SANDBOX_STATE_RUNNING {
		t.Fatalf("after a refused pause: %v %v", got, err)
	}

	// A resume is refused and the sandbox stays paused, snapshot intact.
	_, err = a.client.ResumeSandbox(ctx, connect.NewRequest(&pb.ResumeSandboxRequest{Id: paused.GetId()}))
	wantCode(t, err, connect.CodeResourceExhausted)
	got, err := a.client.GetSandbox(ctx, connect.NewRequest(&pb.GetSandboxRequest{Id: paused.GetId()}))
	if err != nil || got.Msg.GetSandbox().GetState() != pb.SandboxState_SANDBOX_STATE_PAUSED {
		t.Fatalf("after a refused resume: %v %v", got, err)
	}

	// Saving a template is refused and installs nothing.
	_, err = a.client.CreateSnapshot(ctx, connect.NewRequest(&pb.CreateSnapshotRequest{SandboxId: running.GetId(), Name: "full-tpl"}))
	wantCode(t, err, connect.CodeResourceExhausted)
	if _, err := os.Stat(filepath.Join(dir, "images", "full-tpl")); !os.IsNotExist(err) {
		t.Fatalf("a refused template save left files: %v", err)
	}

	// The guest's writes meet the full disk: QEMU holds the VM instead of
	// failing them, and the writer finishes, every byte there, once there
	// is room.
	stalled := false
	for deadline := time.Now().Add(60 * time.Second); time.Now().Before(deadline); time.Sleep(time.Second) {
		if strings.Contains(a.logTail(), "sandbox stopped by a full disk") {
			stalled = true
			break
		}
	}
	if !stalled {
		t.Fatalf("the agent never reported the VM stopped by the full disk:\n%s", a.logTail())
	}
	if err := os.Remove(filler); err != nil {
		t.Fatal(err)
	}
	for deadline := time.Now().Add(90 * time.Second); ; time.Sleep(time.Second) {
		out, code := a.sh(ctx, running.GetId(), "cat $HOME/big.md5 2>/dev/null && md5sum $HOME/big && stat -c %s $HOME/big")
		if lines := strings.Fields(out); code == 0 && len(lines) == 5 {
			if lines[0] != lines[2] || lines[4] != "25165824" {
				t.Fatalf("the file written across the full disk is damaged or short: %q", out)
			}
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("the writer never finished after space was freed: %q\n%s", out, a.logTail())
		}
	}
	if !strings.Contains(a.logTail(), "sandbox continues") {
		t.Errorf("the agent did not log that the sandbox continued:\n%s", a.logTail())
	}

	// Everything works again.
	if _, err := a.client.ResumeSandbox(ctx, connect.NewRequest(&pb.ResumeSandboxRequest{Id: paused.GetId()})); err != nil {
		t.Fatalf("resume after space freed: %v\n%s", err, a.logTail())
	}
	if out, _ := a.sh(ctx, paused.GetId(), "cat $HOME/mark"); strings.TrimSpace(out) != "kept-while-paused" {
		t.Fatalf("paused sandbox lost its data: %q", out)
	}
	if _, err := a.client.PauseSandbox(ctx, connect.NewRequest(&pb.PauseSandboxRequest{Id: running.GetId()})); err != nil {
		t.Fatalf("pause after space freed: %v\n%s", err, a.logTail())
	}
	if _, err := a.client.ResumeSandbox(ctx, connect.NewRequest(&pb.ResumeSandboxRequest{Id: running.GetId()})); err != nil {
		t.Fatalf("resume: %v", err)
	}
	if out, _ := a.sh(ctx, running.GetId(), "cat $HOME/mark"); strings.TrimSpace(out) != "kept-while-running" {
		t.Fatalf("running sandbox lost its data: %q", out)
	}
	fresh := a.create(ctx, &pb.CreateSandboxRequest{Id: "sb-full-new"})
	for _, id := range []string{fresh.GetId(), paused.GetId(), running.GetId()} {
		if _, err := a.client.DestroySandbox(ctx, connect.NewRequest(&pb.DestroySandboxRequest{Id: id})); err != nil {
			t.Fatalf("destroy %s: %v", id, err)
		}
	}
}
