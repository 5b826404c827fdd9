package agenttest

import (
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"connectrpc.com/connect"

	"github.com/wrenn/wrenn/internal/testutil/guestimages"
	pb "github.com/wrenn/wrenn/proto/hostagent/v2"
)

// A snapshot of a running sandbox keeps its memory: sandboxes made from it
// start by restoring that memory, with the processes it ran, and each is
// itself (host name, token, randomness, files).
func TestMemoryTemplateClones(t *testing.T) {
	a := newAgent(t)
	ctx := testCtx(t, 6*time.Minute)
	src := a.create(ctx, &pb.CreateSandboxRequest{Id: "sb-mem-origin"})
	// A server the template keeps running: it answers with its pid and a
	// random number it drew once.
	if out, code := a.sh(ctx, src.GetId(), `nohup sh -c 'echo $$ > /tmp/keeper.pid; exec sleep 100000' >/dev/null 2>&1 & sleep 0.5; cat /tmp/keeper.pid`); code != 0 || out == "" {
		t.Fatalf("start the keeper: %q", out)
	}
	snap, err := a.client.CreateSnapshot(ctx, connect.NewRequest(&pb.CreateSnapshotRequest{SandboxId: src.GetId(), Name: "with-memory"}))
	if err != nil {
		t.Fatalf("snapshot: %v\n%s", err, a.logTail())
	}
	mem := snap.Msg.GetTemplate().GetMemory()
	if mem == nil || mem.GetVmm() != extraArgs.VMM() || mem.GetMemoryMib() != 256 || mem.GetVcpus() != 1 || mem.GetSizeBytes() == 0 {
		t.Fatalf("the template's memory: %v", snap.Msg.GetTemplate())
	}
	// The origin keeps running.
	if out, code := a.sh(ctx, src.GetId(), "kill -0 $(cat /tmp/keeper.pid) && echo alive"); code != 0 || out != "alive\n" {
		t.Fatalf("origin after the snapshot: %q", out)
	}

	var clones []*pb.Sandbox
	for _, id := range []string{"sb-clone-a", "sb-clone-b"} {
		start := time.Now()
		sb := a.create(ctx, &pb.CreateSandboxRequest{Id: id, Template: "with-memory", EnvVars: map[string]string{"WHO": id}})
		t.Logf("%s from memory in %v", id, time.Since(start).Round(time.Millisecond))
		if sb.GetStartedFrom() != "memory" {
			t.Fatalf("%s started from %q (%s)\n%s", id, sb.GetStartedFrom(), sb.GetBootNote(), a.logTail())
		}
		clones = append(clones, sb)
	}
	seen := map[string]string{}
	for _, sb := range clones {
		id := sb.GetId()
		out, code := a.sh(ctx, id, `kill -0 $(cat /tmp/keeper.pid) && echo alive; hostname; echo $WHO $WRENN_SANDBOX_ID; cat /run/wrenn/.WRENN_SANDBOX_ID; head -c 16 /dev/urandom | od -An -tx1 | tr -d ' \n'; echo; echo mine > /tmp/only-`+id+`; ls /tmp | grep only-`)
		lines := strings.Split(strings.TrimSpace(out), "\n")
		if code != 0 || len(lines) != 6 || lines[0] != "alive" || lines[1] != id || lines[2] != id+" "+id || lines[3] != id || lines[5] != "only-"+id {
			t.Fatalf("%s says (%d):\n%s", id, code, out)
		}
		if other, dup := seen[lines[4]]; dup {
			t.Fatalf("%s and %s drew the same random bytes %s", id, other, lines[4])
		}
		seen[lines[4]] = id
	}
	// The origin never saw the clones' files.
	if out, _ := a.sh(ctx, src.GetId(), "ls /tmp | grep -c only- || true"); strings.TrimSpace(out) != "0" {
		t.Fatalf("the origin sees clone files: %q", out)
	}

	// Another shape boots, and says why.
	big := a.create(ctx, &pb.CreateSandboxRequest{Id: "sb-mem-big", Template: "with-memory", MemoryMib: 384})
	if big.GetStartedFrom() != "boot" || !strings.Contains(big.GetBootNote(), "256 MiB") {
		t.Fatalf("a 384 MiB sandbox: %q %q", big.GetStartedFrom(), big.GetBootNote())
	}

	// A clone pauses and resumes like any sandbox, and keeps its processes.
	c := clones[0].GetId()
	if _, err := a.client.PauseSandbox(ctx, connect.NewRequest(&pb.PauseSandboxRequest{Id: c})); err != nil {
		t.Fatal(err)
	}
	if _, err := a.client.ResumeSandbox(ctx, connect.NewRequest(&pb.ResumeSandboxRequest{Id: c})); err != nil {
		t.Fatalf("resume a clone: %v\n%s", err, a.logTail())
	}
	if out, _ := a.sh(ctx, c, "kill -0 $(cat /tmp/keeper.pid) && cat /tmp/only-"+c); out != "mine\n" {
		t.Fatalf("the clone after resume: %q", out)
	}

	// An agent killed and restarted adopts clones like any sandbox.
	a.kill()
	a.start()
	for _, sb := range clones {
		if out, _ := a.sh(ctx, sb.GetId(), "kill -0 $(cat /tmp/keeper.pid) && hostname"); out != sb.GetId()+"\n" {
			t.Fatalf("%s after an agent restart: %q\n%s", sb.GetId(), out, a.logTail())
		}
	}

	// The template cannot go while sandboxes use it.
	_, err = a.client.DeleteSnapshot(ctx, connect.NewRequest(&pb.DeleteSnapshotRequest{Name: "with-memory"}))
	wantCode(t, err, connect.CodeFailedPrecondition)

	// A damaged memory file fails the create clearly and leaves nothing.
	// (Damaged only once no sandbox maps it: a running clone reads the
	// pages it has not written from the file.)
	for _, id := range []string{"sb-mem-origin", "sb-clone-a", "sb-clone-b", "sb-mem-big"} {
		if _, err := a.client.DestroySandbox(ctx, connect.NewRequest(&pb.DestroySandboxRequest{Id: id})); err != nil {
			t.Fatal(err)
		}
	}
	ram := filepath.Join(a.dir, "images", "with-memory", "memory", "ram")
	if err := os.Truncate(ram, 1<<20); err != nil {
		t.Fatal(err)
	}
	_, err = a.client.CreateSandbox(ctx, connect.NewRequest(&pb.CreateSandboxRequest{Id: "sb-clone-bad", Template: "with-memory", Vcpus: 1, MemoryMib: 256}))
	if err == nil || !strings.Contains(err.Error(), "memory template") {
		t.Fatalf("a create from a damaged memory file: %v", err)
	}
	if _, err := os.Stat(filepath.Join(a.dir, "sandboxes", "sb-clone-bad")); !os.IsNotExist(err) {
		t.Fatalf("the failed create left its directory: %v", err)
	}

	if _, err := a.client.DeleteSnapshot(ctx, connect.NewRequest(&pb.DeleteSnapshotRequest{Name: "with-memory"})); err != nil {
		t.Fatal(err)
	}
}

// An agent started with --memory-templates gives a shipped image a memory
// snapshot of the shape asked, and creates of that shape start from it.
func TestShippedImageGetsMemory(t *testing.T) {
	dir := guestimages.AgentDir(t)
	// A copy of minimal of the test's own: the shared one stays untouched.
	shared := filepath.Join(dir, "images", "minimal")
	target, err := os.Readlink(shared)
	if err != nil {
		t.Fatal(err)
	}
	if err := os.Remove(shared); err != nil {
		t.Fatal(err)
	}
	if out, err := exec.Command("cp", "-a", "--sparse=always", target, shared).CombinedOutput(); err != nil {
		t.Fatalf("copy minimal: %v %s", err, out)
	}
	a := newAgentIn(t, dir, http.DefaultClient, "http", "--memory-templates", "minimal:1:256:512")
	ctx := testCtx(t, 4*time.Minute)
	var mem *pb.TemplateMemory
	for deadline := time.Now().Add(90 * time.Second); mem == nil; time.Sleep(500 * time.Millisecond) {
		info, err := a.client.GetHostInfo(ctx, connect.NewRequest(&pb.GetHostInfoRequest{}))
		if err != nil {
			t.Fatal(err)
		}
		for _, tpl := range info.Msg.GetTemplateDetails() {
			if tpl.GetName() == "minimal" {
				mem = tpl.GetMemory()
			}
		}
		if time.Now().After(deadline) {
			t.Fatalf("minimal has no memory snapshot after 90 s\n%s", a.logTail())
		}
	}
	if mem.GetVcpus() != 1 || mem.GetMemoryMib() != 256 || mem.GetDiskSizeMib() != 512 {
		t.Fatalf("minimal's memory: %v", mem)
	}
	// The VM it came from is gone.
	list, _ := a.client.ListSandboxes(ctx, connect.NewRequest(&pb.ListSandboxesRequest{}))
	if n := len(list.Msg.GetSandboxes()); n != 0 {
		t.Fatalf("%d sandboxes left after preparing the template", n)
	}
	var ids []string
	for _, id := range []string{"sb-warm-a", "sb-warm-b"} {
		start := time.Now()
		sb := a.create(ctx, &pb.CreateSandboxRequest{Id: id, DiskSizeMib: 512})
		t.Logf("%s in %v, from %s", id, time.Since(start).Round(time.Millisecond), sb.GetStartedFrom())
		if sb.GetStartedFrom() != "memory" {
			t.Fatalf("%s booted: %s", id, sb.GetBootNote())
		}
		ids = append(ids, id)
	}
	for _, id := range ids {
		if out, code := a.sh(ctx, id, "hostname; df -m / | tail -1 | awk '{print ($2 > 400)}'; echo ok > /home/user/f && cat /home/user/f"); code != 0 || out != id+"\n1\nok\n" {
			t.Fatalf("%s: %q", id, out)
		}
	}
	// Another disk size boots.
	sb := a.create(ctx, &pb.CreateSandboxRequest{Id: "sb-warm-c"})
	if sb.GetStartedFrom() != "boot" || !strings.Contains(sb.GetBootNote(), "512 MiB of disk") {
		t.Fatalf("a 208 MiB-disk sandbox: %q %q", sb.GetStartedFrom(), sb.GetBootNote())
	}
}

// A fork makes sandboxes with a running sandbox's memory and disk as they
// are at that moment; the source runs on, and the copy goes with the last
// of them.
func TestFork(t *testing.T) {
	a := newAgent(t)
	ctx := testCtx(t, 5*time.Minute)
	src := a.create(ctx, &pb.CreateSandboxRequest{Id: "sb-fork-src", EnvVars: map[string]string{"FROM": "source"}})
	if out, code := a.sh(ctx, src.GetId(), `echo before > /home/user/f; nohup sh -c 'echo $$ > /tmp/keeper.pid; exec sleep 100000' >/dev/null 2>&1 & sleep 0.5; echo ok`); code != 0 {
		t.Fatalf("prepare: %q", out)
	}
	start := time.Now()
	res, err := a.client.ForkSandbox(ctx, connect.NewRequest(&pb.ForkSandboxRequest{SourceId: src.GetId(), Ids: []string{"sb-fork-a", "sb-fork-b"}}))
	if err != nil {
		t.Fatalf("fork: %v\n%s", err, a.logTail())
	}
	t.Logf("fork into 2 in %v", time.Since(start).Round(time.Millisecond))
	kids := res.Msg.GetSandboxes()
	if len(kids) != 2 || kids[0].GetSandbox().GetId() != "sb-fork-a" || kids[0].GetEnvdAccessToken() == "" || kids[0].GetEnvdAccessToken() == kids[1].GetEnvdAccessToken() {
		t.Fatalf("fork answered %v", res.Msg)
	}
	// The source runs on and writes after the fork.
	if out, code := a.sh(ctx, src.GetId(), "echo after >> /home/user/f; cat /home/user/f"); code != 0 || out != "before\nafter\n" {
		t.Fatalf("the source after the fork: %q", out)
	}
	rand := map[string]bool{}
	for _, k := range kids {
		sb := k.GetSandbox()
		if sb.GetStartedFrom() != "fork" || sb.GetVcpus() != src.GetVcpus() || sb.GetMemoryMib() != src.GetMemoryMib() {
			t.Fatalf("%s: %v", sb.GetId(), sb)
		}
		out, code := a.sh(ctx, sb.GetId(), `kill -0 $(cat /tmp/keeper.pid) && cat /home/user/f; hostname; echo "$FROM $WRENN_SANDBOX_ID $WRENN_TEMPLATE"; head -c 16 /dev/urandom | od -An -tx1 | tr -d ' \n'; echo; echo `+sb.GetId()+` >> /home/user/f`)
		lines := strings.Split(strings.TrimSpace(out), "\n")
		if code != 0 || len(lines) != 4 || lines[0] != "before" || lines[1] != sb.GetId() || lines[2] != "source "+sb.GetId()+" minimal" || rand[lines[3]] {
			t.Fatalf("%s says (%d):\n%s", sb.GetId(), code, out)
		}
		rand[lines[3]] = true
	}
	if out, _ := a.sh(ctx, "sb-fork-a", "cat /home/user/f"); out != "before\nsb-fork-a\n" {
		t.Fatalf("the first fork's file: %q", out)
	}
	// The hidden template is not offered, and goes with the last fork.
	info, _ := a.client.GetHostInfo(ctx, connect.NewRequest(&pb.GetHostInfoRequest{}))
	for _, name := range info.Msg.GetTemplates() {
		if strings.HasPrefix(name, "fork-") {
			t.Fatalf("the host offers %s", name)
		}
	}
	forkTemplates := func() []string {
		entries, _ := os.ReadDir(filepath.Join(a.dir, "images"))
		var out []string
		for _, e := range entries {
			if strings.HasPrefix(e.Name(), "fork-") {
				out = append(out, e.Name())
			}
		}
		return out
	}
	if n := len(forkTemplates()); n != 1 {
		t.Fatalf("%d fork templates on disk, want 1", n)
	}
	// Its disk is a layer of what the source had written (not a copy of
	// the whole image), and its memory is in RAM.
	meta, _ := os.ReadFile(filepath.Join(a.dir, "images", forkTemplates()[0], "metadata.json"))
	if !strings.Contains(string(meta), `"layer": true`) {
		t.Fatalf("the fork's template: %s", meta)
	}
	if ram, err := filepath.EvalSymlinks(filepath.Join(a.dir, "images", forkTemplates()[0], "memory")); err != nil || !strings.HasPrefix(ram, "/dev/shm/wrenn-forks-") {
		t.Fatalf("the fork's memory is at %q (%v), not in /dev/shm", ram, err)
	}
	for _, id := range []string{"sb-fork-a", "sb-fork-b"} {
		if _, err := a.client.DestroySandbox(ctx, connect.NewRequest(&pb.DestroySandboxRequest{Id: id})); err != nil {
			t.Fatal(err)
		}
	}
	if left := forkTemplates(); len(left) != 0 {
		t.Fatalf("the fork's template outlived its sandboxes: %v", left)
	}
	if left, _ := filepath.Glob("/dev/shm/wrenn-forks-*/fork-*"); len(left) != 0 {
		t.Fatalf("the fork's memory outlived its sandboxes: %v", left)
	}
	// A single fork restores the saved VM itself (no shared template).
	start = time.Now()
	one, err := a.client.ForkSandbox(ctx, connect.NewRequest(&pb.ForkSandboxRequest{SourceId: src.GetId(), Ids: []string{"sb-fork-one"}}))
	if err != nil {
		t.Fatalf("fork into one: %v\n%s", err, a.logTail())
	}
	t.Logf("fork into 1 in %v", time.Since(start).Round(time.Millisecond))
	if sb := one.Msg.GetSandboxes()[0].GetSandbox(); sb.GetStartedFrom() != "fork" {
		t.Fatalf("the single fork: %v", sb)
	}
	if out, code := a.sh(ctx, "sb-fork-one", `kill -0 $(cat /tmp/keeper.pid) && cat /home/user/f && hostname && echo "$FROM $WRENN_TEMPLATE"`); code != 0 || out != "before\nafter\nsb-fork-one\nsource minimal\n" {
		t.Fatalf("the single fork says (%d): %q", code, out)
	}
	// It pauses and resumes like any sandbox.
	if _, err := a.client.PauseSandbox(ctx, connect.NewRequest(&pb.PauseSandboxRequest{Id: "sb-fork-one"})); err != nil {
		t.Fatal(err)
	}
	if _, err := a.client.ResumeSandbox(ctx, connect.NewRequest(&pb.ResumeSandboxRequest{Id: "sb-fork-one"})); err != nil {
		t.Fatal(err)
	}
	if out, _ := a.sh(ctx, "sb-fork-one", "cat /home/user/f"); out != "before\nafter\n" {
		t.Fatalf("the single fork after a resume: %q", out)
	}
	if _, err := a.client.DestroySandbox(ctx, connect.NewRequest(&pb.DestroySandboxRequest{Id: "sb-fork-one"})); err != nil {
		t.Fatal(err)
	}
	if left := forkTemplates(); len(left) != 0 {
		t.Fatalf("the single fork's template outlived it: %v", left)
	}
	// Bad requests.
	_, err = a.client.ForkSandbox(ctx, connect.NewRequest(&pb.ForkSandboxRequest{SourceId: src.GetId()}))
	wantCode(t, err, connect.CodeInvalidArgument)
	_, err = a.client.ForkSandbox(ctx, connect.NewRequest(&pb.ForkSandboxRequest{SourceId: "sb-nope", Ids: []string{"sb-x1"}}))
	wantCode(t, err, connect.CodeNotFound)
	_, err = a.client.ForkSandbox(ctx, connect.NewRequest(&pb.ForkSandboxRequest{SourceId: src.GetId(), Ids: []string{src.GetId()}}))
	wantCode(t, err, connect.CodeAlreadyExists)
	if _, err := a.client.PauseSandbox(ctx, connect.NewRequest(&pb.PauseSandboxRequest{Id: src.GetId()})); err != nil {
		t.Fatal(err)
	}
	_, err = a.client.ForkSandbox(ctx, connect.NewRequest(&pb.ForkSandboxRequest{SourceId: src.GetId(), Ids: []string{"sb-fork-c"}}))
	wantCode(t, err, connect.CodeFailedPrecondition)
	if left := forkTemplates(); len(left) != 0 {
		t.Fatalf("failed forks left templates: %v", left)
	}
}

// A fork's disk is a layer on its source's template: the template cannot
// be deleted while a fork's sandbox still stands on it.
func TestForkKeepsTheTemplateItIsALayerOf(t *testing.T) {
	a := newAgent(t)
	ctx := testCtx(t, 5*time.Minute)
	first := a.create(ctx, &pb.CreateSandboxRequest{Id: "sb-layer-first"})
	if out, code := a.sh(ctx, first.GetId(), "echo saved > /home/user/f"); code != 0 {
		t.Fatalf("prepare: %q", out)
	}
	if _, err := a.client.CreateSnapshot(ctx, connect.NewRequest(&pb.CreateSnapshotRequest{SandboxId: first.GetId(), Name: "layered"})); err != nil {
		t.Fatal(err)
	}
	src := a.create(ctx, &pb.CreateSandboxRequest{Id: "sb-layer-src", Template: "layered"})
	if out, code := a.sh(ctx, src.GetId(), "echo forked >> /home/user/f"); code != 0 {
		t.Fatalf("prepare: %q", out)
	}
	if _, err := a.client.ForkSandbox(ctx, connect.NewRequest(&pb.ForkSandboxRequest{SourceId: src.GetId(), Ids: []string{"sb-layer-kid"}})); err != nil {
		t.Fatalf("fork: %v\n%s", err, a.logTail())
	}
	for _, id := range []string{first.GetId(), src.GetId()} {
		if _, err := a.client.DestroySandbox(ctx, connect.NewRequest(&pb.DestroySandboxRequest{Id: id})); err != nil {
			t.Fatal(err)
		}
	}
	_, err := a.client.DeleteSnapshot(ctx, connect.NewRequest(&pb.DeleteSnapshotRequest{Name: "layered"}))
	wantCode(t, err, connect.CodeFailedPrecondition)
	if err == nil || !strings.Contains(err.Error(), "sb-layer-kid") {
		t.Fatalf("the refusal does not name the fork: %v", err)
	}
	if out, code := a.sh(ctx, "sb-layer-kid", "cat /home/user/f"); code != 0 || out != "saved\nforked\n" {
		t.Fatalf("the fork reads (%d) %q", code, out)
	}
	if _, err := a.client.DestroySandbox(ctx, connect.NewRequest(&pb.DestroySandboxRequest{Id: "sb-layer-kid"})); err != nil {
		t.Fatal(err)
	}
	if _, err := a.client.DeleteSnapshot(ctx, connect.NewRequest(&pb.DeleteSnapshotRequest{Name: "layered"})); err != nil {
		t.Fatalf("delete once the fork is gone: %v", err)
	}
}
