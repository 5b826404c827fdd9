package agenttest

import (
	"bytes"
	"encoding/json"
	"fmt"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/wrenn/wrenn/internal/agent/network"
	pb "github.com/wrenn/wrenn/proto/hostagent/v2"
)

// A process on the host races the agent for a booting sandbox's envd, as
// an attacker would: from the moment the VM starts it tries, as fast as it
// can, to set its own token with /init and to run a command. envd has a
// token from boot (a kernel argument the agent writes where only it can
// read), so every try is refused; the agent's first /init replaces it with
// the sandbox's own, so the boot token a guest process can read in
// /proc/cmdline opens nothing afterwards. QEMU's command line, which every
// user of the host can read, holds neither.
func TestEnvdNeverAnswersWithoutItsToken(t *testing.T) {
	const slot = 2999 // one slot: the sandbox's address is known before it exists
	a := newAgent(t, "--slots", fmt.Sprintf("%d-%d", slot, slot))
	ctx := testCtx(t, 3*time.Minute)
	alloc, err := network.ForSlot(slot)
	if err != nil {
		t.Fatal(err)
	}
	base := "http://" + alloc.SandboxIP.String() + ":49983"

	var answered, accepted atomic.Int64
	var firstAccepted atomic.Value
	stop := make(chan struct{})
	done := make(chan struct{})
	go func() {
		defer close(done)
		hc := &http.Client{Timeout: 300 * time.Millisecond}
		attempts := []struct{ path, body string }{
			{"/init", `{"accessToken":"attacker-token-0123456789"}`},
			{"/process.Process/List", `{}`},
		}
		for i := 0; ; i++ {
			select {
			case <-stop:
				return
			default:
			}
			try := attempts[i%len(attempts)]
			resp, err := hc.Post(base+try.path, "application/json", bytes.NewBufferString(try.body))
			if err != nil {
				time.Sleep(2 * time.Millisecond) // not up yet
				continue
			}
			answered.Add(1)
			if resp.StatusCode/100 == 2 {
				accepted.Add(1)
				firstAccepted.CompareAndSwap(nil, fmt.Sprintf("%s answered %d", try.path, resp.StatusCode))
			}
			resp.Body.Close()
		}
	}()
	sb := a.create(ctx, &pb.CreateSandboxRequest{Id: "sb-token-race"})
	time.Sleep(time.Second) // the attacker goes on after the agent's /init
	close(stop)
	<-done
	t.Logf("the attacker's %d answered tries", answered.Load())
	if answered.Load() == 0 {
		t.Fatal("the attacker never reached envd: the race did not run")
	}
	if n := accepted.Load(); n > 0 {
		t.Fatalf("envd accepted %d of the attacker's requests (first: %v)", n, firstAccepted.Load())
	}
	if out, code := a.sh(ctx, sb.GetId(), "echo agent works"); out != "agent works\n" || code != 0 {
		t.Fatalf("the agent's own calls: %d %q", code, out)
	}

	// The token is not on any command line on the host.
	var rec struct {
		EnvdToken string `json:"envd_token"`
	}
	data, err := os.ReadFile(filepath.Join(a.dir, "sandboxes", sb.GetId(), "sandbox.json"))
	if err != nil || json.Unmarshal(data, &rec) != nil || len(rec.EnvdToken) < 16 {
		t.Fatalf("no envd token in the sandbox record: %v", err)
	}
	// The boot token, which any process in the guest can read in
	// /proc/cmdline, died with the agent's /init: it opens nothing.
	cmdline, _ := a.sh(ctx, sb.GetId(), "cat /proc/cmdline")
	_, after, ok := strings.Cut(cmdline, "wrenn.envd_token=")
	boot := strings.Fields(after + " ")[0]
	if !ok || len(boot) < 16 || boot == rec.EnvdToken {
		t.Fatalf("no boot token of its own on the guest's command line: %q", cmdline)
	}
	for token, want := range map[string]int{boot: http.StatusUnauthorized, rec.EnvdToken: http.StatusOK} {
		req, _ := http.NewRequest("POST", base+"/process.Process/List", bytes.NewBufferString("{}"))
		req.Header.Set("Content-Type", "application/json")
		req.Header.Set("X-Access-Token", token)
		resp, err := http.DefaultClient.Do(req)
		if err != nil {
			t.Fatal(err)
		}
		resp.Body.Close()
		if resp.StatusCode != want {
			t.Fatalf("envd with the %s token: %d, want %d", map[bool]string{true: "boot", false: "sandbox's"}[token == boot], resp.StatusCode, want)
		}
	}
	ps, _ := exec.Command("ps", "-eo", "args").Output()
	if strings.Contains(string(ps), rec.EnvdToken) || strings.Contains(string(ps), boot) {
		t.Fatal("envd's token is on a command line (ps shows it)")
	}
}
