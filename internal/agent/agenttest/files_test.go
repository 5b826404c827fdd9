package agenttest

import (
	"bytes"
	"crypto/sha256"
	"io"
	"math/rand/v2"
	"testing"
	"time"

	"connectrpc.com/connect"

	pb "github.com/wrenn/wrenn/proto/hostagent/v2"
)

func TestStreamingFiles(t *testing.T) {
	a := newAgent(t)
	ctx := testCtx(t, 3*time.Minute)
	sb := a.create(ctx, &pb.CreateSandboxRequest{Id: "sb-bigfiles", DiskSizeMib: 1024})

	const size = 100 << 20
	src := io.LimitReader(rand.NewChaCha8([32]byte{9}), size)
	sent := sha256.New()
	up := a.client.WriteFileStream(ctx)
	if err := up.Send(&pb.WriteFileStreamRequest{Part: &pb.WriteFileStreamRequest_Header{Header: &pb.WriteFileRequest{SandboxId: sb.GetId(), Path: "big/blob.bin"}}}); err != nil {
		t.Fatal(err)
	}
	buf := make([]byte, 1<<20)
	for {
		n, err := src.Read(buf)
		if n > 0 {
			sent.Write(buf[:n])
			if err := up.Send(&pb.WriteFileStreamRequest{Part: &pb.WriteFileStreamRequest_Data{Data: buf[:n]}}); err != nil {
				t.Fatal(err)
			}
		}
		if err == io.EOF {
			break
		}
	}
	start := time.Now()
	if _, err := up.CloseAndReceive(); err != nil {
		t.Fatal(err)
	}
	t.Logf("wrote 100 MiB through the agent (last flush %v)", time.Since(start).Round(time.Millisecond))

	down, err := a.client.ReadFileStream(ctx, connect.NewRequest(&pb.ReadFileRequest{SandboxId: sb.GetId(), Path: "big/blob.bin"}))
	if err != nil {
		t.Fatal(err)
	}
	got := sha256.New()
	var n int
	for down.Receive() {
		n += len(down.Msg().GetData())
		got.Write(down.Msg().GetData())
	}
	if err := down.Err(); err != nil || n != size || !bytes.Equal(got.Sum(nil), sent.Sum(nil)) {
		t.Fatalf("read back %d bytes, equal %v, %v", n, bytes.Equal(got.Sum(nil), sent.Sum(nil)), err)
	}

	// A stream that does not start with a header is refused.
	bad := a.client.WriteFileStream(ctx)
	_ = bad.Send(&pb.WriteFileStreamRequest{Part: &pb.WriteFileStreamRequest_Data{Data: []byte("x")}})
	_, err = bad.CloseAndReceive()
	wantCode(t, err, connect.CodeInvalidArgument)
	missing, err := a.client.ReadFileStream(ctx, connect.NewRequest(&pb.ReadFileRequest{SandboxId: sb.GetId(), Path: "nope"}))
	if err == nil {
		for missing.Receive() {
		}
		err = missing.Err()
	}
	wantCode(t, err, connect.CodeNotFound)
}
