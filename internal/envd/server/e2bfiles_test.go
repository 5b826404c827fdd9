package server_test

import (
	"bytes"
	"compress/gzip"
	"encoding/json"
	"io"
	"net/http"
	neturl "net/url"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
	"time"

	"connectrpc.com/connect"

	"github.com/wrenn/wrenn/internal/envd/signature"
	fspb "github.com/wrenn/wrenn/proto/envd/filesystem"
)

// raw sends a /files request as E2B's SDKs do, without Go's transparent
// gzip, and answers the response with its body.
func (h *harness) raw(t *testing.T, method string, query neturl.Values, header http.Header, body io.Reader) (*http.Response, []byte) {
	t.Helper()
	req, _ := http.NewRequest(method, h.url+"/files?"+query.Encode(), body)
	for k, v := range header {
		req.Header[k] = v
	}
	res, err := (&http.Client{Transport: &http.Transport{DisableCompression: true}}).Do(req)
	if err != nil {
		t.Fatal(err)
	}
	defer res.Body.Close()
	data, _ := io.ReadAll(res.Body)
	return res, data
}

// gzip both ways: a gzip upload is stored plain; a download asked for
// with gzip comes compressed, else as it is; Range stays plain.
func TestFilesGzip(t *testing.T) {
	h := newHarness(t)
	dir := t.TempDir()
	dest := filepath.Join(dir, "notes.txt")
	text := bytes.Repeat([]byte("compressible line of text\n"), 4000)
	var zbuf bytes.Buffer
	zw := gzip.NewWriter(&zbuf)
	_, _ = zw.Write(text)
	_ = zw.Close()
	res, body := h.raw(t, http.MethodPost, neturl.Values{"path": {dest}}, http.Header{"Content-Type": {"application/octet-stream"}, "Content-Encoding": {"gzip"}}, &zbuf)
	if res.StatusCode != http.StatusOK {
		t.Fatalf("gzip upload: %d %s", res.StatusCode, body)
	}
	if got, _ := os.ReadFile(dest); !bytes.Equal(got, text) {
		t.Fatalf("stored %d bytes, want the %d uncompressed", len(got), len(text))
	}
	if res, body := h.raw(t, http.MethodPost, neturl.Values{"path": {dest}}, http.Header{"Content-Type": {"application/octet-stream"}, "Content-Encoding": {"br"}}, strings.NewReader("x")); res.StatusCode != http.StatusBadRequest {
		t.Fatalf("brotli upload: %d %s", res.StatusCode, body)
	}

	res, body = h.raw(t, http.MethodGet, neturl.Values{"path": {dest}}, http.Header{"Accept-Encoding": {"gzip"}}, nil)
	if res.StatusCode != http.StatusOK || res.Header.Get("Content-Encoding") != "gzip" || len(body) >= len(text)/4 {
		t.Fatalf("gzip download: %d %q, %d bytes", res.StatusCode, res.Header.Get("Content-Encoding"), len(body))
	}
	zr, err := gzip.NewReader(bytes.NewReader(body))
	if err != nil {
		t.Fatal(err)
	}
	if plain, _ := io.ReadAll(zr); !bytes.Equal(plain, text) || !strings.HasPrefix(res.Header.Get("Content-Type"), "text/plain") {
		t.Fatalf("gunzipped %d bytes, content type %q", len(plain), res.Header.Get("Content-Type"))
	}
	res, body = h.raw(t, http.MethodGet, neturl.Values{"path": {dest}}, nil, nil)
	if res.Header.Get("Content-Encoding") != "" || !bytes.Equal(body, text) || res.Header.Get("Content-Length") != strconv.Itoa(len(text)) {
		t.Fatalf("plain download: %q %d bytes", res.Header.Get("Content-Encoding"), len(body))
	}
	res, body = h.raw(t, http.MethodGet, neturl.Values{"path": {dest}}, http.Header{"Accept-Encoding": {"gzip"}, "Range": {"bytes=0-9"}}, nil)
	if res.StatusCode != http.StatusPartialContent || string(body) != string(text[:10]) {
		t.Fatalf("range with gzip accepted: %d %q", res.StatusCode, body)
	}
	if res, _ := h.raw(t, http.MethodGet, neturl.Values{"path": {dest}}, http.Header{"Accept-Encoding": {"br, identity;q=0"}}, nil); res.StatusCode != http.StatusNotAcceptable {
		t.Fatalf("nothing acceptable: %d", res.StatusCode)
	}
}

// X-Metadata-* headers on an upload become the file's metadata, seen in
// the upload's answer and in Stat and ListDir; a new upload replaces it.
func TestFilesMetadata(t *testing.T) {
	h := newHarness(t)
	dir := t.TempDir()
	dest := filepath.Join(dir, "report.csv")
	up := func(header http.Header) (int, []map[string]any) {
		header.Set("Content-Type", "application/octet-stream")
		res, body := h.raw(t, http.MethodPost, neturl.Values{"path": {dest}}, header, strings.NewReader("a,b\n"))
		var out []map[string]any
		_ = json.Unmarshal(body, &out)
		return res.StatusCode, out
	}
	code, out := up(http.Header{"X-Metadata-Owner": {"data-team"}, "X-Metadata-Run-Id": {"42"}})
	if code != http.StatusOK || len(out) != 1 {
		t.Fatalf("upload: %d %v", code, out)
	}
	if md, _ := out[0]["metadata"].(map[string]any); md["owner"] != "data-team" || md["run-id"] != "42" {
		t.Fatalf("upload answer metadata %v", out[0])
	}
	st, err := h.fs.Stat(t.Context(), connect.NewRequest(&fspb.StatRequest{Path: dest}))
	if err != nil {
		t.Fatal(err)
	}
	if md := st.Msg.GetEntry().GetMetadata(); md["owner"] != "data-team" || md["run-id"] != "42" || len(md) != 2 {
		t.Fatalf("stat metadata %v", md)
	}
	if code, _ := up(http.Header{"X-Metadata-Owner": {"someone-else"}}); code != http.StatusOK {
		t.Fatal(code)
	}
	ls, err := h.fs.ListDir(t.Context(), connect.NewRequest(&fspb.ListDirRequest{Path: dir}))
	if err != nil {
		t.Fatal(err)
	}
	if md := ls.Msg.GetEntries()[0].GetMetadata(); len(md) != 1 || md["owner"] != "someone-else" {
		t.Fatalf("after a second upload the metadata is %v", md)
	}
	if code, _ := up(http.Header{"X-Metadata-Bad!key": {"x"}}); code != http.StatusBadRequest {
		t.Fatalf("a bad key: %d", code)
	}
	if code, _ := up(http.Header{"X-Metadata-Big": {strings.Repeat("x", 2000)}}); code != http.StatusBadRequest {
		t.Fatalf("a value too long: %d", code)
	}
}

// With an access token set, /files takes a signed URL instead of the
// header: the right path, operation, user and expiry, nothing else.
func TestFilesSignedURLs(t *testing.T) {
	h := newHarness(t)
	const token = "envd-signing-token"
	h.initJSON(t, `{"accessToken":"`+token+`"}`, "")
	dir := t.TempDir()
	dest := filepath.Join(dir, "signed.txt")
	exp := time.Now().Add(time.Minute).Unix()
	sign := func(path, op string, exp int64) neturl.Values {
		q := neturl.Values{"path": {path}, "signature": {signature.Make(path, op, "", token, exp)}}
		if exp != 0 {
			q.Set("signature_expiration", strconv.FormatInt(exp, 10))
		}
		return q
	}
	octet := http.Header{"Content-Type": {"application/octet-stream"}}
	if res, body := h.raw(t, http.MethodPost, sign(dest, signature.Write, exp), octet, strings.NewReader("signed upload")); res.StatusCode != http.StatusOK {
		t.Fatalf("signed upload: %d %s", res.StatusCode, body)
	}
	if res, body := h.raw(t, http.MethodGet, sign(dest, signature.Read, 0), nil, nil); res.StatusCode != http.StatusOK || string(body) != "signed upload" {
		t.Fatalf("signed download: %d %s", res.StatusCode, body)
	}
	for name, q := range map[string]neturl.Values{
		"unsigned":           {"path": {dest}},
		"write signature":    sign(dest, signature.Write, 0),
		"expired":            sign(dest, signature.Read, time.Now().Add(-time.Minute).Unix()),
		"another user's":     func() neturl.Values { q := sign(dest, signature.Read, 0); q.Set("username", "root"); return q }(),
		"path swapped after": func() neturl.Values { q := sign(dest, signature.Read, 0); q.Set("path", "/etc/shadow"); return q }(),
	} {
		if res, _ := h.raw(t, http.MethodGet, q, nil, nil); res.StatusCode != http.StatusUnauthorized {
			t.Errorf("%s: %d", name, res.StatusCode)
		}
	}
	// The header still works, and a wrong header is not rescued by a signature.
	if res, _ := h.raw(t, http.MethodGet, neturl.Values{"path": {dest}}, http.Header{"X-Access-Token": {token}}, nil); res.StatusCode != http.StatusOK {
		t.Fatalf("with the header: %d", res.StatusCode)
	}
	if res, _ := h.raw(t, http.MethodGet, sign(dest, signature.Read, 0), http.Header{"X-Access-Token": {"wrong"}}, nil); res.StatusCode != http.StatusUnauthorized {
		t.Fatalf("a wrong header with a good signature: %d", res.StatusCode)
	}
	// Signatures open /files only.
	req, _ := http.NewRequest(http.MethodGet, h.url+"/envs?"+sign(dest, signature.Read, 0).Encode(), nil)
	if res, err := http.DefaultClient.Do(req); err != nil || res.StatusCode != http.StatusUnauthorized {
		t.Fatalf("/envs with a signature: %v %v", res, err)
	}
}
