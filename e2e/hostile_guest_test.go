package e2e

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"mime/multipart"
	"net/http"
	"os"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/wrenn/wrenn/internal/testutil/gobin"
	"github.com/wrenn/wrenn/pkg/wrenn"
)

// hostileGrowthMiB is what the agent's and the control plane's peak
// resident memory may grow by while a hostile guest answers every call
// they make with bombs. Each call reads at most a few MiB (4 MiB per
// envd message, 9 MiB per agent message); the rest is Go's heap slack.
const hostileGrowthMiB = 64

// A program running as root in a capsule takes over envd's port (it
// steals envd's listening socket and stops envd) and answers every call
// the agent and control plane make with gzip bombs, endless bodies,
// oversized Connect envelopes and floods of output. The reconciler's
// metrics polling meets it without any tenant call, and then every
// tenant route that reaches the guest is called. The agent's and the
// control plane's peak memory stay within hostileGrowthMiB of what they
// were, each call ends with a clear error (or a bounded stream), and the
// host keeps serving another capsule.
func TestHostileGuestCannotExhaustTheHost(t *testing.T) {
	s := startStack(t)
	c := s.client()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Minute)
	defer cancel()

	victim, err := c.CreateCapsule(ctx, wrenn.CreateCapsuleParams{MemoryMB: 256, Wait: true})
	if err != nil {
		t.Fatal(err)
	}
	bystander, err := c.CreateCapsule(ctx, wrenn.CreateCapsuleParams{MemoryMB: 256, Wait: true})
	if err != nil {
		t.Fatal(err)
	}
	prog, err := os.Open(gobin.Static(t, "internal/testutil/hostileenvd"))
	if err != nil {
		t.Fatal(err)
	}
	defer prog.Close()
	if err := c.WriteFile(ctx, victim.ID, "/tmp/hostileenvd", prog); err != nil {
		t.Fatal(err)
	}
	if res, err := c.Exec(ctx, victim.ID, wrenn.ExecParams{Cmd: "chmod", Args: []string{"+x", "/tmp/hostileenvd"}, User: "root"}); err != nil || res.ExitCode != 0 {
		t.Fatalf("chmod: %+v %v", res, err)
	}

	procs := map[string]int{"wrenn-agent": s.agent.Process.Pid, "wrenn-cp": s.cp.Process.Pid}
	time.Sleep(2 * time.Second) // let start-up allocations settle
	baseline := map[string]int64{}
	for name, pid := range procs {
		resetPeakRSS(t, pid)
		baseline[name] = peakRSSKiB(t, pid)
	}

	if _, err := c.StartProcess(ctx, victim.ID, wrenn.ExecParams{Cmd: "/bin/sh", User: "root",
		Args: []string{"-c", "setsid /tmp/hostileenvd </dev/null >/dev/null 2>&1 &"}}, "hostile"); err != nil {
		t.Fatal(err)
	}
	// It has taken over once a listing no longer comes back.
	deadline := time.Now().Add(time.Minute)
	for {
		lctx, lcancel := context.WithTimeout(ctx, 30*time.Second)
		_, err := c.ListDir(lctx, victim.ID, "/")
		lcancel()
		if err != nil {
			break
		}
		if time.Now().After(deadline) {
			t.Fatal("the hostile program did not take over envd's port")
		}
		time.Sleep(500 * time.Millisecond)
	}
	t.Log("the hostile program answers on envd's port")

	base := s.url + "/v1/capsules/" + victim.ID
	pathBody := func(depth int) func() (io.Reader, string) {
		return func() (io.Reader, string) {
			return strings.NewReader(fmt.Sprintf(`{"path":"/root","depth":%d}`, depth)), "application/json"
		}
	}
	upload := func() (io.Reader, string) {
		var b bytes.Buffer
		mw := multipart.NewWriter(&b)
		_ = mw.WriteField("path", "/tmp/x")
		fw, _ := mw.CreateFormFile("file", "x")
		_, _ = fw.Write(bytes.Repeat([]byte("x"), 1<<20))
		_ = mw.Close()
		return &b, mw.FormDataContentType()
	}
	execBody := func() (io.Reader, string) {
		return strings.NewReader(`{"cmd":"/bin/true","timeout_sec":5}`), "application/json"
	}
	type call struct {
		name, method, url string
		body              func() (io.Reader, string)
		stream            bool // a 200 with a bounded read of the body is a fine answer
	}
	var (
		listings = []call{
			{"list files", "POST", base + "/files/list", pathBody(1), false},
			{"list files deep", "POST", base + "/files/list", pathBody(8), false},
			{"mkdir", "POST", base + "/files/mkdir", pathBody(0), false},
			{"remove", "POST", base + "/files/remove", pathBody(0), false},
			{"list processes", "GET", base + "/processes", nil, false},
			{"kill process", "DELETE", base + "/processes/hostile", nil, false},
		}
		files = []call{
			{"read file", "POST", base + "/files/read", pathBody(0), true},
			{"stream read file", "POST", base + "/files/stream/read", pathBody(0), true},
			{"write file", "POST", base + "/files/write", upload, false},
			{"stream write file", "POST", base + "/files/stream/write", upload, false},
		}
		execs = []call{{"exec", "POST", base + "/exec", execBody, false}}
	)
	// run makes each call twice at once, for three rounds (which meets
	// every variant the program cycles through), and checks the answers.
	run := func(calls []call, streams int) {
		var wg sync.WaitGroup
		for range 3 {
			for _, c := range calls {
				for range 2 {
					wg.Add(1)
					go func() {
						defer wg.Done()
						var body io.Reader
						var ctype string
						if c.body != nil {
							body, ctype = c.body()
						}
						start := time.Now()
						status, text, err := s.hostileCall(ctx, c.method, c.url, body, ctype, c.stream)
						t.Logf("%-18s %d in %v: %s %v", c.name, status, time.Since(start).Round(time.Millisecond), text, err)
						switch {
						case err != nil:
							t.Errorf("%s: %v", c.name, err)
						case status == http.StatusInternalServerError:
							t.Errorf("%s: answered 500 (%s): a hostile guest must not cause internal errors", c.name, text)
						case status < 300 && !c.stream:
							t.Errorf("%s: answered %d (%s) from a guest that only sends garbage", c.name, status, text)
						}
					}()
				}
			}
			// A streamed command meets the output flood and the broken envelopes.
			for range streams {
				wg.Add(1)
				go func() {
					defer wg.Done()
					sctx, scancel := context.WithTimeout(ctx, 8*time.Second)
					defer scancel()
					var got int
					start := time.Now()
					_, err := c.ExecStream(sctx, victim.ID, wrenn.ExecParams{Cmd: "/bin/true"}, func(_ string, data []byte) { got += len(data) })
					t.Logf("%-18s in %v: %d bytes, %v", "exec stream", time.Since(start).Round(time.Millisecond), got, err)
				}()
			}
			wg.Wait()
		}
	}
	phases := []struct {
		name string
		do   func()
	}{
		// The reconciler samples metrics every second: it meets the bombs with no tenant call.
		{"reconciler alone", func() { time.Sleep(8 * time.Second) }},
		{"listings and process calls", func() { run(listings, 0) }},
		{"file reads and writes", func() { run(files, 0) }},
		{"exec", func() { run(execs, 0) }},
		{"exec stream", func() { run(nil, 2) }},
		{"everything at once", func() { run(append(append(listings, files...), execs...), 2) }},
	}
	for _, ph := range phases {
		for _, pid := range procs {
			resetPeakRSS(t, pid)
		}
		start := time.Now()
		ph.do()
		for name, pid := range procs {
			grew := (peakRSSKiB(t, pid) - baseline[name]) >> 10
			t.Logf("phase %q (%v): %s peak RSS %+d MiB over its idle peak of %d MiB (bound %d MiB)", ph.name, time.Since(start).Round(time.Second), name, grew, baseline[name]>>10, hostileGrowthMiB)
			if grew > hostileGrowthMiB {
				t.Errorf("phase %q: %s peak RSS grew by %d MiB, more than %d MiB", ph.name, name, grew, hostileGrowthMiB)
			}
		}
	}

	// Pausing asks envd to flush the guest's disks and resuming sets its
	// clock: both answer, whatever envd says.
	for _, op := range []func(context.Context, string) (wrenn.Capsule, error){c.PauseCapsule, c.ResumeCapsule} {
		octx, ocancel := context.WithTimeout(ctx, 2*time.Minute)
		sb, err := op(octx, victim.ID)
		ocancel()
		t.Logf("pause/resume under the hostile guest: %s %v", sb.Status, err)
		if errors.Is(err, context.DeadlineExceeded) {
			t.Fatalf("pause or resume did not answer: %v", err)
		}
	}

	// The host still serves the other capsule, and the victim can be destroyed.
	res, err := c.Exec(ctx, bystander.ID, wrenn.ExecParams{Cmd: "echo", Args: []string{"still here"}})
	if err != nil || string(res.Stdout) != "still here\n" {
		t.Fatalf("the bystander capsule after the attack: %+v %v", res, err)
	}
	for _, id := range []string{victim.ID, bystander.ID} {
		if _, err := c.DestroyCapsule(ctx, id); err != nil {
			t.Fatal(err)
		}
	}
	s.nothingLeft()
}

// hostileCall makes one API call with the admin's key and returns its
// status and the start of its body; at most 32 MiB of a streamed body is
// read.
func (s *stack) hostileCall(ctx context.Context, method, url string, body io.Reader, ctype string, stream bool) (int, string, error) {
	ctx, cancel := context.WithTimeout(ctx, 90*time.Second)
	defer cancel()
	req, err := http.NewRequestWithContext(ctx, method, url, body)
	if err != nil {
		return 0, "", err
	}
	req.Header.Set("X-API-Key", s.key)
	if ctype != "" {
		req.Header.Set("Content-Type", ctype)
	}
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		return 0, "", err
	}
	defer resp.Body.Close()
	if stream && resp.StatusCode == http.StatusOK {
		n, err := io.Copy(io.Discard, io.LimitReader(resp.Body, 32<<20))
		return resp.StatusCode, fmt.Sprintf("%d bytes streamed (%v)", n, err), nil
	}
	// An error is short, except a command's timeout, which carries the
	// output so far: at most 1 MiB of each stream, escaped as JSON.
	limit := int64(64 << 10)
	if resp.StatusCode == http.StatusBadGateway {
		limit = 16 << 20
	}
	data, err := io.ReadAll(io.LimitReader(resp.Body, limit))
	if err != nil {
		return resp.StatusCode, "", err
	}
	if int64(len(data)) == limit {
		return resp.StatusCode, "", fmt.Errorf("a %d answer of %d KiB or more", resp.StatusCode, limit>>10)
	}
	var e struct {
		Error struct{ Code, Message string } `json:"error"`
	}
	if resp.StatusCode >= 300 && json.Unmarshal(data, &e) != nil {
		return resp.StatusCode, string(data), fmt.Errorf("the error answer is not the API's JSON")
	}
	return resp.StatusCode, e.Error.Code + ": " + e.Error.Message, nil
}

// resetPeakRSS clears a process's recorded peak resident set (VmHWM).
func resetPeakRSS(t *testing.T, pid int) {
	t.Helper()
	if err := os.WriteFile(fmt.Sprintf("/proc/%d/clear_refs", pid), []byte("5"), 0); err != nil {
		t.Fatal(err)
	}
}

// peakRSSKiB reads a process's peak resident set (VmHWM) in KiB.
func peakRSSKiB(t *testing.T, pid int) int64 {
	t.Helper()
	status, err := os.ReadFile(fmt.Sprintf("/proc/%d/status", pid))
	if err != nil {
		t.Fatal(err)
	}
	for _, line := range strings.Split(string(status), "\n") {
		if rest, ok := strings.CutPrefix(line, "VmHWM:"); ok {
			n, err := strconv.ParseInt(strings.TrimSuffix(strings.TrimSpace(rest), " kB"), 10, 64)
			if err != nil {
				t.Fatal(err)
			}
			return n
		}
	}
	t.Fatalf("no VmHWM in /proc/%d/status", pid)
	return 0
}
