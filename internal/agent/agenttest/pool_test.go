package agenttest

import (
	"context"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"connectrpc.com/connect"

	pb "github.com/wrenn/wrenn/proto/hostagent/v2"
)

// pool reads one template's warm pool from the host's report.
func (a *agent) pool(ctx context.Context, name string) *pb.WarmPoolStatus {
	a.t.Helper()
	info, err := a.client.GetHostInfo(ctx, connect.NewRequest(&pb.GetHostInfoRequest{}))
	if err != nil {
		a.t.Fatal(err)
	}
	for _, p := range info.Msg.GetWarmPools() {
		if p.GetPool().GetTemplate() == name {
			return p
		}
	}
	return &pb.WarmPoolStatus{}
}

// waitPool waits until template name's pool has ready members and none starting.
func (a *agent) waitPool(ctx context.Context, name string, ready int32) *pb.WarmPoolStatus {
	a.t.Helper()
	deadline := time.Now().Add(2 * time.Minute)
	for {
		p := a.pool(ctx, name)
		if p.GetReady() == ready && p.GetStarting() == 0 {
			return p
		}
		if time.Now().After(deadline) {
			a.t.Fatalf("pool %s: %v, want %d ready\n%s", name, p, ready, a.logTail())
		}
		time.Sleep(200 * time.Millisecond)
	}
}

// A warm pool keeps sandboxes of a template ready: creates that fit take
// one (each its own: id, host name, environment, randomness, files), the
// pool refills, other shapes start as before, members are never listed,
// survive an agent restart, and go with their template.
func TestWarmPool(t *testing.T) {
	a := newAgent(t)
	ctx := testCtx(t, 8*time.Minute)
	src := a.create(ctx, &pb.CreateSandboxRequest{Id: "sb-pool-origin"})
	if _, code := a.sh(ctx, src.GetId(), `nohup sh -c 'echo $$ > /tmp/keeper.pid; exec sleep 100000' >/dev/null 2>&1 & sleep 0.5`); code != 0 {
		t.Fatal("start the keeper")
	}
	if _, err := a.client.CreateSnapshot(ctx, connect.NewRequest(&pb.CreateSnapshotRequest{SandboxId: src.GetId(), Name: "pooled"})); err != nil {
		t.Fatalf("snapshot: %v\n%s", err, a.logTail())
	}
	if _, err := a.client.DestroySandbox(ctx, connect.NewRequest(&pb.DestroySandboxRequest{Id: src.GetId()})); err != nil {
		t.Fatal(err)
	}
	res, err := a.client.SetWarmPools(ctx, connect.NewRequest(&pb.SetWarmPoolsRequest{Pools: []*pb.WarmPool{{Template: "pooled", Size: 2}}}))
	if err != nil {
		t.Fatal(err)
	}
	if len(res.Msg.GetPools()) != 1 || res.Msg.GetPools()[0].GetPool().GetMemoryMib() != 256 {
		t.Fatalf("the pool's shape: %v", res.Msg.GetPools())
	}
	a.waitPool(ctx, "pooled", 2)
	if list, _ := a.client.ListSandboxes(ctx, connect.NewRequest(&pb.ListSandboxesRequest{})); len(list.Msg.GetSandboxes()) != 0 {
		t.Fatalf("members are listed as sandboxes: %v", list.Msg.GetSandboxes())
	}

	// Three creates at once: two take the members, one of them each.
	ids := []string{"sb-pool-a", "sb-pool-b", "sb-pool-c"}
	got := make([]*pb.Sandbox, len(ids))
	took := make([]time.Duration, len(ids))
	var wg sync.WaitGroup
	for i, id := range ids {
		wg.Add(1)
		go func() {
			defer wg.Done()
			start := time.Now()
			r, err := a.client.CreateSandbox(ctx, connect.NewRequest(&pb.CreateSandboxRequest{Id: id, Template: "pooled", Vcpus: 1, MemoryMib: 256,
				EnvVars: map[string]string{"WHO": id}, Metadata: map[string]string{"n": fmt.Sprint(i)}}))
			took[i] = time.Since(start)
			if err != nil {
				t.Errorf("create %s: %v", id, err)
				return
			}
			got[i] = r.Msg.GetSandbox()
		}()
	}
	wg.Wait()
	if t.Failed() {
		t.FailNow()
	}
	fromPool := 0
	seen := map[string]string{}
	for i, sb := range got {
		id := ids[i]
		t.Logf("%s started from %s in %v", id, sb.GetStartedFrom(), took[i].Round(time.Millisecond))
		if sb.GetStartedFrom() == "pool" {
			fromPool++
		}
		if sb.GetId() != id || sb.GetMetadata()["n"] != fmt.Sprint(i) {
			t.Fatalf("create %s answered %v", id, sb)
		}
		out, code := a.sh(ctx, id, `kill -0 $(cat /tmp/keeper.pid) && echo alive; hostname; echo $WHO $WRENN_SANDBOX_ID; cat /run/wrenn/.WRENN_SANDBOX_ID; head -c 16 /dev/urandom | od -An -tx1 | tr -d ' \n'; echo; echo mine > /tmp/only-`+id+`; ls /tmp | grep only-`)
		lines := strings.Split(strings.TrimSpace(out), "\n")
		if code != 0 || len(lines) != 6 || lines[0] != "alive" || lines[1] != id || lines[2] != id+" "+id || lines[3] != id || lines[5] != "only-"+id {
			t.Fatalf("%s says (%d):\n%s", id, code, out)
		}
		if other, dup := seen[lines[4]]; dup {
			t.Fatalf("%s and %s drew the same random bytes", id, other)
		}
		seen[lines[4]] = id
	}
	if fromPool < 2 {
		t.Fatalf("%d of 3 creates came from a pool of 2", fromPool)
	}
	// The pool refills; another shape is not its business.
	p := a.waitPool(ctx, "pooled", 2)
	if p.GetClaims() != int64(fromPool) {
		t.Fatalf("claims %d, want %d", p.GetClaims(), fromPool)
	}
	big := a.create(ctx, &pb.CreateSandboxRequest{Id: "sb-pool-big", Template: "pooled", MemoryMib: 384})
	if big.GetStartedFrom() != "boot" {
		t.Fatalf("a 384 MiB sandbox started from %q", big.GetStartedFrom())
	}
	if a.pool(ctx, "pooled").GetMisses() < 1 {
		t.Fatal("a create the pool could not serve is not counted as a miss")
	}

	// A sandbox from the pool pauses and resumes like any.
	if _, err := a.client.PauseSandbox(ctx, connect.NewRequest(&pb.PauseSandboxRequest{Id: "sb-pool-a"})); err != nil {
		t.Fatalf("pause: %v\n%s", err, a.logTail())
	}
	if _, err := a.client.ResumeSandbox(ctx, connect.NewRequest(&pb.ResumeSandboxRequest{Id: "sb-pool-a"})); err != nil {
		t.Fatalf("resume: %v\n%s", err, a.logTail())
	}
	if out, _ := a.sh(ctx, "sb-pool-a", "kill -0 $(cat /tmp/keeper.pid) && cat /tmp/only-sb-pool-a"); out != "mine\n" {
		t.Fatalf("after resume: %q", out)
	}

	// And one is saved as a template of its own, memory and all.
	if _, err := a.client.CreateSnapshot(ctx, connect.NewRequest(&pb.CreateSnapshotRequest{SandboxId: "sb-pool-b", Name: "from-pooled"})); err != nil {
		t.Fatalf("snapshot a sandbox from the pool: %v\n%s", err, a.logTail())
	}
	again := a.create(ctx, &pb.CreateSandboxRequest{Id: "sb-pool-again", Template: "from-pooled"})
	if out, _ := a.sh(ctx, again.GetId(), "kill -0 $(cat /tmp/keeper.pid) && hostname && cat /tmp/only-sb-pool-b"); again.GetStartedFrom() != "memory" || out != "sb-pool-again\nmine\n" {
		t.Fatalf("from the pooled sandbox's snapshot (%s): %q", again.GetStartedFrom(), out)
	}
	if _, err := a.client.DestroySandbox(ctx, connect.NewRequest(&pb.DestroySandboxRequest{Id: again.GetId()})); err != nil {
		t.Fatal(err)
	}
	if _, err := a.client.DeleteSnapshot(ctx, connect.NewRequest(&pb.DeleteSnapshotRequest{Name: "from-pooled"})); err != nil {
		t.Fatal(err)
	}

	// kill -9 and a restart: sandboxes and members are adopted.
	a.kill()
	a.start()
	for _, id := range ids {
		if out, _ := a.sh(ctx, id, "hostname"); out != id+"\n" {
			t.Fatalf("%s after an agent restart: %q\n%s", id, out, a.logTail())
		}
	}
	a.waitPool(ctx, "pooled", 2)

	// The template stays while sandboxes use it, and goes with its pool.
	_, err = a.client.DeleteSnapshot(ctx, connect.NewRequest(&pb.DeleteSnapshotRequest{Name: "pooled"}))
	wantCode(t, err, connect.CodeFailedPrecondition)
	for _, id := range append(ids, "sb-pool-big") {
		if _, err := a.client.DestroySandbox(ctx, connect.NewRequest(&pb.DestroySandboxRequest{Id: id})); err != nil {
			t.Fatal(err)
		}
	}
	if _, err := a.client.DeleteSnapshot(ctx, connect.NewRequest(&pb.DeleteSnapshotRequest{Name: "pooled"})); err != nil {
		t.Fatalf("delete the pooled template: %v\n%s", err, a.logTail())
	}
	if p := a.pool(ctx, "pooled"); p.GetReady()+p.GetStarting() != 0 {
		t.Fatalf("members left after the template went: %v", p)
	}
	if left, _ := os.ReadDir(filepath.Join(a.dir, "sandboxes")); len(left) != 0 {
		t.Fatalf("left in sandboxes/: %v", left)
	}
	_, _ = a.client.SetWarmPools(ctx, connect.NewRequest(&pb.SetWarmPoolsRequest{}))
}
