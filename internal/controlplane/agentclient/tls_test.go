package agentclient

import (
	"path/filepath"
	"testing"

	"github.com/wrenn/wrenn/internal/testutil/testcerts"
)

func TestTLSConfig(t *testing.T) {
	dir := t.TempDir()
	ca := testcerts.Issue(t, dir, "ca", testcerts.CA, nil)
	cli := testcerts.Issue(t, dir, "cp", testcerts.Client, ca)
	if cfg, err := TLSConfig("", "", ""); cfg != nil || err != nil {
		t.Fatalf("nothing set: %v %v", cfg, err)
	}
	cfg, err := TLSConfig(ca.CertFile, cli.CertFile, cli.KeyFile)
	if err != nil || cfg.RootCAs == nil || len(cfg.Certificates) != 1 {
		t.Fatalf("full config: %+v %v", cfg, err)
	}
	for name, files := range map[string][3]string{
		"missing CA file":   {filepath.Join(dir, "nope.pem"), "", ""},
		"CA is not PEM":     {cli.KeyFile + "x", "", ""},
		"cert without key":  {ca.CertFile, cli.CertFile, ""},
		"key is not a cert": {ca.CertFile, cli.KeyFile, cli.KeyFile},
	} {
		if _, err := TLSConfig(files[0], files[1], files[2]); err == nil {
			t.Errorf("%s: accepted", name)
		}
	}
}
