package boot

import (
	"bytes"
	"context"
	"encoding/base64"
	"fmt"
	"io"
	"net/http"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"connectrpc.com/connect"

	"github.com/wrenn/wrenn/internal/guest/template"
	"github.com/wrenn/wrenn/internal/testutil/guestimages"
	pb "github.com/wrenn/wrenn/proto/envd/process"
	"github.com/wrenn/wrenn/proto/envd/process/processconnect"
)

func TestMinimalImageBootsToEnvd(t *testing.T) {
	_, kernel, rootfs := guestimages.Require(t)
	before, err := template.Checksum(rootfs)
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 3*time.Minute)
	defer cancel()
	vm, err := Start(ctx, Options{Kernel: kernel, Rootfs: rootfs, ConsoleLog: filepath.Join(t.TempDir(), "console.log")})
	if err != nil {
		t.Fatal(err)
	}
	defer vm.Stop()
	wall, err := vm.WaitReady(ctx, 90*time.Second)
	if err != nil {
		t.Fatal(err)
	}
	guest, err := vm.GuestReadyUptime()
	if err != nil {
		t.Fatalf("%v; console:\n%s", err, vm.ConsoleTail(30))
	}
	t.Logf("%s boot: envd ready %v after QEMU start, %v after kernel start", vm.Accel, wall.Round(time.Millisecond), guest)

	// The host sets the clock, a token and an env var, as the agent will.
	initBody := fmt.Sprintf(`{"timestamp":%q,"accessToken":"boot-test-token","envVars":{"WRENN_TEST":"1"}}`, time.Now().UTC().Format(time.RFC3339Nano))
	req, _ := http.NewRequestWithContext(ctx, http.MethodPost, vm.EnvdURL+"/init", strings.NewReader(initBody))
	res, err := http.DefaultClient.Do(req)
	if err != nil || res.StatusCode != http.StatusNoContent {
		t.Fatalf("/init: %v %v", res, err)
	}
	res.Body.Close()

	client := processconnect.NewProcessClient(http.DefaultClient, vm.EnvdURL)
	run := func(user, script string) (string, int32) {
		t.Helper()
		no := false
		r := connect.NewRequest(&pb.StartRequest{Process: &pb.ProcessConfig{Cmd: "/bin/bash", Args: []string{"-c", script}}, Stdin: &no})
		r.Header().Set("X-Access-Token", "boot-test-token")
		if user != "" {
			r.Header().Set("Authorization", "Basic "+base64.StdEncoding.EncodeToString([]byte(user+":")))
		}
		stream, err := client.Start(ctx, r)
		if err != nil {
			t.Fatal(err)
		}
		defer stream.Close()
		var out bytes.Buffer
		code := int32(-1)
		for stream.Receive() {
			ev := stream.Msg().GetEvent()
			out.Write(ev.GetData().GetStdout())
			out.Write(ev.GetData().GetStderr())
			if end := ev.GetEnd(); end != nil {
				code = end.GetExitCode()
			}
		}
		if err := stream.Err(); err != nil {
			t.Fatalf("%s: %v", script, err)
		}
		return out.String(), code
	}
	expect := func(user, script, want string) {
		t.Helper()
		out, code := run(user, script)
		if code != 0 || !strings.Contains(out, want) {
			t.Fatalf("%q as %q: exit %d, output %q, want %q", script, user, code, out, want)
		}
	}

	expect("", "id -un; echo $HOME; pwd", "user\n/home/user\n/home/user\n")
	expect("", "sudo -n id -u", "0\n")
	expect("root", "id -un", "root\n")
	expect("", "for b in chronyd curl wget socat sudo tini; do command -v $b >/dev/null || echo missing $b; done; echo checked", "checked")
	if out, _ := run("", "for b in chronyd curl wget socat sudo tini; do command -v $b >/dev/null || echo missing $b; done"); out != "" {
		t.Fatalf("tools: %s", out)
	}
	expect("", "grep -c PHC /etc/chrony/chrony.conf", "1\n")
	expect("", "ls /etc/ssl/certs | wc -l | awk '$1 > 50 {print \"certs ok\"}'", "certs ok")
	expect("", "cat /proc/1/comm", "tini\n")
	expect("", "hostname", "wrenn-boot\n")
	expect("", "echo $WRENN_TEST", "1\n")
	expect("", "stat -f -c %T /sys/fs/cgroup", "cgroup2fs")
	expect("", "date +%Y", time.Now().UTC().Format("2006")+"\n")
	expect("", "ip -4 addr show eth0 | grep -o 'inet [0-9.]*'", "inet 10.0.2.15")
	expect("", "echo hello > ~/note.txt && cat ~/note.txt && stat -c %U ~/note.txt", "hello\nuser\n")

	// A PTY works (devpts is mounted and /dev/ptmx points at it).
	ptyReq := connect.NewRequest(&pb.StartRequest{Process: &pb.ProcessConfig{Cmd: "/usr/bin/tty"}, Pty: &pb.PTY{Size: &pb.PTY_Size{Cols: 80, Rows: 24}}})
	ptyReq.Header().Set("X-Access-Token", "boot-test-token")
	stream, err := client.Start(ctx, ptyReq)
	if err != nil {
		t.Fatal(err)
	}
	var ptyOut bytes.Buffer
	for stream.Receive() {
		ptyOut.Write(stream.Msg().GetEvent().GetData().GetPty())
	}
	stream.Close()
	if !strings.Contains(ptyOut.String(), "/dev/pts/") {
		t.Fatalf("tty in the guest: %q", ptyOut.String())
	}

	// Files round-trip through the guest.
	dl, err := http.NewRequestWithContext(ctx, http.MethodGet, vm.EnvdURL+"/files?path=note.txt", nil)
	if err != nil {
		t.Fatal(err)
	}
	dl.Header.Set("X-Access-Token", "boot-test-token")
	res, err = http.DefaultClient.Do(dl)
	if err != nil {
		t.Fatal(err)
	}
	body, _ := io.ReadAll(res.Body)
	res.Body.Close()
	if string(body) != "hello\n" {
		t.Fatalf("download from the guest: %d %q", res.StatusCode, body)
	}

	vm.Stop()
	after, err := template.Checksum(rootfs)
	if err != nil || after != before {
		t.Fatalf("the template image changed while a guest ran on it (%v)", err)
	}
}
