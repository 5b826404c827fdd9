package api

import (
	"context"
	"strconv"
	"testing"
	"time"

	"github.com/wrenn/wrenn/internal/controlplane/auth"
	"github.com/wrenn/wrenn/internal/controlplane/reconciler"
	"github.com/wrenn/wrenn/proto/hostagent/v2/hostagentv2connect"
)

type registered struct {
	Host struct {
		ID     string `json:"id"`
		Status string `json:"status"`
	} `json:"host"`
	Token        string `json:"token"`
	RefreshToken string `json:"refresh_token"`
}

func (c *cp) newHostToken(admin account) (string, string) {
	c.t.Helper()
	var out struct {
		Host struct {
			ID string `json:"id"`
		} `json:"host"`
		RegistrationToken string `json:"registration_token"`
	}
	c.want(c.do("POST", "/v1/hosts", creds{jwt: admin.jwt}, map[string]string{"type": "regular"}), 201).json(c.t, &out)
	return out.Host.ID, out.RegistrationToken
}

var specs = map[string]any{"arch": "x86_64", "cpu_cores": 2, "memory_mb": 8192, "disk_gb": 100, "address": "127.0.0.1:1", "vmm": "qemu", "protocol": hostagentv2connect.HostAgentServiceName}

func withToken(token string) map[string]any {
	m := map[string]any{"token": token}
	for k, v := range specs {
		m[k] = v
	}
	return m
}

func TestHostRegistration(t *testing.T) {
	c := newCP(t)
	admin := c.signup("admin@example.com")
	user := c.signup("user@example.com")
	c.want(c.do("POST", "/v1/hosts", creds{jwt: user.jwt}, map[string]string{"type": "regular"}), 403)

	hostID, token := c.newHostToken(admin)
	var reg registered
	// An agent of another protocol (upstream Wrenn's service has the same
	// name in package hostagent.v1) is refused before the token is spent.
	for _, other := range []any{"hostagent.v1.HostAgentService", nil} {
		upstream := withToken(token)
		upstream["protocol"] = other
		if r := c.want(c.do("POST", "/v1/hosts/register", creds{}, upstream), 400); r.errorCode(t) != "incompatible_agent" {
			t.Fatalf("an agent of protocol %v: %s", other, r.body)
		}
	}
	c.want(c.do("POST", "/v1/hosts/register", creds{}, withToken(token)), 201).json(t, &reg)
	if reg.Host.ID != hostID || reg.Host.Status != "online" || reg.Token == "" || reg.RefreshToken == "" {
		t.Fatalf("registration: %+v", reg)
	}
	// A used token, an unknown one and an expired one are refused.
	c.want(c.do("POST", "/v1/hosts/register", creds{}, withToken(token)), 401)
	c.want(c.do("POST", "/v1/hosts/register", creds{}, withToken("wrt_nope")), 401)
	expiredHost, expired := c.newHostToken(admin)
	if _, err := c.st.Pool.Exec(t.Context(), "UPDATE host_registration_tokens SET expires_at = now() - interval '1 second' WHERE host_id = $1", expiredHost); err != nil {
		t.Fatal(err)
	}
	c.want(c.do("POST", "/v1/hosts/register", creds{}, withToken(expired)), 401)
	// A fresh token for the pending host works; a registered host gets none.
	var again struct {
		RegistrationToken string `json:"registration_token"`
	}
	c.want(c.do("POST", "/v1/hosts/"+expiredHost+"/token", creds{jwt: admin.jwt}, nil), 201).json(t, &again)
	c.want(c.do("POST", "/v1/hosts/register", creds{}, withToken(again.RegistrationToken)), 201)
	c.want(c.do("POST", "/v1/hosts/"+hostID+"/token", creds{jwt: admin.jwt}, nil), 409)
	// Bad specs.
	bad := withToken("x")
	bad["address"] = "no-port"
	c.want(c.do("POST", "/v1/hosts/register", creds{}, bad), 400)

	// Heartbeats: only with this host's current token.
	c.want(c.do("POST", "/v1/hosts/"+hostID+"/heartbeat", creds{hostToken: reg.Token}, nil), 204)
	c.want(c.do("POST", "/v1/hosts/"+expiredHost+"/heartbeat", creds{hostToken: reg.Token}, nil), 403)
	c.want(c.do("POST", "/v1/hosts/"+hostID+"/heartbeat", creds{hostToken: "garbage"}, nil), 401)
	c.want(c.do("POST", "/v1/hosts/"+hostID+"/heartbeat", creds{jwt: admin.jwt}, nil), 401)

	// Refresh rotates both tokens; the old ones stop working.
	var ref registered
	c.want(c.do("POST", "/v1/hosts/auth/refresh", creds{}, map[string]string{"refresh_token": reg.RefreshToken}), 200).json(t, &ref)
	c.want(c.do("POST", "/v1/hosts/auth/refresh", creds{}, map[string]string{"refresh_token": reg.RefreshToken}), 401)
	c.want(c.do("POST", "/v1/hosts/"+hostID+"/heartbeat", creds{hostToken: reg.Token}, nil), 401)
	c.want(c.do("POST", "/v1/hosts/"+hostID+"/heartbeat", creds{hostToken: ref.Token}, nil), 204)

	// Silence makes a host unreachable, and unreachable hosts get no capsules.
	key := c.apiKey(admin)
	if _, err := c.st.Pool.Exec(t.Context(), "UPDATE hosts SET last_heartbeat_at = now() - interval '5 minutes'"); err != nil {
		t.Fatal(err)
	}
	rec := &reconciler.Reconciler{Store: c.st, Agents: c.srv.agents, Actions: c.srv, Log: c.srv.log, HostSilence: time.Minute}
	if ran, err := rec.Pass(context.Background()); err != nil || !ran {
		t.Fatalf("reconcile: %v %v", ran, err)
	}
	var h struct {
		Status string `json:"status"`
	}
	c.want(c.do("GET", "/v1/hosts/"+hostID, creds{jwt: admin.jwt}, nil), 200).json(t, &h)
	if h.Status != "unreachable" {
		t.Fatalf("silent host is %s", h.Status)
	}
	r := c.want(c.do("POST", "/v1/capsules", creds{key: key}, map[string]any{}), 503)
	if r.errorCode(t) != "no_capacity" {
		t.Fatal(string(r.body))
	}
	// A heartbeat brings it back.
	c.want(c.do("POST", "/v1/hosts/"+hostID+"/heartbeat", creds{hostToken: ref.Token}, nil), 204)
	c.want(c.do("GET", "/v1/hosts/"+hostID, creds{jwt: admin.jwt}, nil), 200).json(t, &h)
	if h.Status != "online" {
		t.Fatalf("host after heartbeat is %s", h.Status)
	}

	// Tags, listing rules, delete: the host's token dies with it.
	c.want(c.do("POST", "/v1/hosts/"+hostID+"/tags", creds{jwt: admin.jwt}, map[string]string{"tag": "zone=a"}), 204)
	c.want(c.do("POST", "/v1/hosts/"+hostID+"/tags", creds{jwt: admin.jwt}, map[string]string{"tag": "bad tag!"}), 400)
	var hosts []map[string]any
	c.want(c.do("GET", "/v1/hosts", creds{jwt: user.jwt}, nil), 200).json(t, &hosts)
	if len(hosts) != 0 {
		t.Fatalf("a non-admin sees shared hosts: %v", hosts)
	}
	c.want(c.do("GET", "/v1/hosts/"+hostID, creds{jwt: user.jwt}, nil), 404)
	c.want(c.do("DELETE", "/v1/hosts/"+hostID, creds{jwt: admin.jwt}, nil), 204)
	c.want(c.do("POST", "/v1/hosts/"+hostID+"/heartbeat", creds{hostToken: ref.Token}, nil), 401)
	_ = auth.HostTokenTTL
}

// Two control planes on one database agree: a key made on one works on
// the other, and the reconciler's pass runs on one replica at a time.
func TestTwoReplicas(t *testing.T) {
	a := newCP(t)
	var dbURL string
	if err := a.st.Pool.QueryRow(t.Context(), "SELECT current_database()").Scan(&dbURL); err != nil {
		t.Fatal(err)
	}
	cfg := a.st.Pool.Config().ConnConfig
	url := "postgres://" + cfg.User + ":" + cfg.Password + "@" + cfg.Host + ":" + itoa(int(cfg.Port)) + "/" + dbURL + "?sslmode=disable"
	b := newCPOn(t, url, a.srv.signer.Secret)
	acct := a.signup("replicas@example.com")
	key := a.apiKey(acct)
	b.want(b.do("GET", "/v1/capsules", creds{key: key}, nil), 200)
	b.want(b.do("GET", "/v1/me", creds{jwt: acct.jwt}, nil), 200)

	hold := make(chan struct{})
	inside := make(chan struct{})
	go func() {
		_, _ = a.st.TryLock(context.Background(), 0x77726e6e00000010, func(context.Context) error {
			close(inside)
			<-hold
			return nil
		})
	}()
	<-inside
	rec := &reconciler.Reconciler{Store: b.st, Agents: b.srv.agents, Actions: b.srv, Log: b.srv.log}
	ran, err := rec.Pass(context.Background())
	close(hold)
	if err != nil || ran {
		t.Fatalf("second replica ran the pass while the first held it: %v %v", ran, err)
	}
}

func itoa(n int) string { return strconv.Itoa(n) }
