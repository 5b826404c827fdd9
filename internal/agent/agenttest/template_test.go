package agenttest

import (
	"slices"
	"testing"
	"time"

	"connectrpc.com/connect"

	"github.com/wrenn/wrenn/internal/testutil/guestimages"
	pb "github.com/wrenn/wrenn/proto/hostagent/v2"
)

func TestSnapshotToTemplateAndStartFromIt(t *testing.T) {
	a := newAgent(t)
	ctx := testCtx(t, 3*time.Minute)
	src := a.create(ctx, &pb.CreateSandboxRequest{Id: "sb-origin"})
	if out, code := a.sh(ctx, src.GetId(), "echo 'made in origin' > ~/marker.txt && sudo sh -c 'echo system > /etc/wrenn-marker'"); code != 0 {
		t.Fatalf("prepare: %q", out)
	}
	start := time.Now()
	snap, err := a.client.CreateSnapshot(ctx, connect.NewRequest(&pb.CreateSnapshotRequest{SandboxId: src.GetId(), Name: "with-marker"}))
	if err != nil {
		t.Fatalf("create snapshot: %v\n%s", err, a.logTail())
	}
	t.Logf("snapshot to template in %v", time.Since(start).Round(time.Millisecond))
	if tpl := snap.Msg.GetTemplate(); tpl.GetParent() != "minimal" || tpl.GetSizeBytes() == 0 || len(tpl.GetSha256()) != 64 {
		t.Fatalf("template %v", tpl)
	}
	// The origin keeps running and writing.
	if out, code := a.sh(ctx, src.GetId(), "echo after >> ~/marker.txt && cat ~/marker.txt"); code != 0 || out != "made in origin\nafter\n" {
		t.Fatalf("origin after snapshot: %q", out)
	}
	child := a.create(ctx, &pb.CreateSandboxRequest{Id: "sb-child", Template: "with-marker"})
	if out, _ := a.sh(ctx, child.GetId(), "cat ~/marker.txt /etc/wrenn-marker"); out != "made in origin\nsystem\n" {
		t.Fatalf("child sees %q", out)
	}
	_, err = a.client.CreateSnapshot(ctx, connect.NewRequest(&pb.CreateSnapshotRequest{SandboxId: src.GetId(), Name: "with-marker"}))
	wantCode(t, err, connect.CodeAlreadyExists)
	_, err = a.client.CreateSnapshot(ctx, connect.NewRequest(&pb.CreateSnapshotRequest{SandboxId: src.GetId(), Name: "Bad Name"}))
	wantCode(t, err, connect.CodeInvalidArgument)
	_, err = a.client.DeleteSnapshot(ctx, connect.NewRequest(&pb.DeleteSnapshotRequest{Name: "with-marker"}))
	wantCode(t, err, connect.CodeFailedPrecondition) // sb-child's disk is an overlay of it

	// A paused sandbox can be saved too.
	if _, err := a.client.PauseSandbox(ctx, connect.NewRequest(&pb.PauseSandboxRequest{Id: src.GetId()})); err != nil {
		t.Fatal(err)
	}
	if _, err := a.client.FlattenRootfs(ctx, connect.NewRequest(&pb.FlattenRootfsRequest{SandboxId: src.GetId(), Name: "from-paused"})); err != nil {
		t.Fatal(err)
	}
	for _, id := range []string{child.GetId(), src.GetId()} {
		if _, err := a.client.DestroySandbox(ctx, connect.NewRequest(&pb.DestroySandboxRequest{Id: id})); err != nil {
			t.Fatal(err)
		}
	}
	for _, name := range []string{"with-marker", "from-paused"} {
		if _, err := a.client.DeleteSnapshot(ctx, connect.NewRequest(&pb.DeleteSnapshotRequest{Name: name})); err != nil {
			t.Fatal(err)
		}
	}
	_, err = a.client.DeleteSnapshot(ctx, connect.NewRequest(&pb.DeleteSnapshotRequest{Name: "with-marker"}))
	wantCode(t, err, connect.CodeNotFound)
	info, _ := a.client.GetHostInfo(ctx, connect.NewRequest(&pb.GetHostInfoRequest{}))
	want := slices.Sorted(slices.Values(guestimages.ShippedImages))
	if got := slices.Sorted(slices.Values(info.Msg.GetTemplates())); !slices.Equal(got, want) {
		t.Fatalf("templates left: %v, want only the shipped images %v", info.Msg.GetTemplates(), guestimages.ShippedImages)
	}
}
