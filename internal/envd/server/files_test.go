package server_test

import (
	"bytes"
	"crypto/rand"
	"crypto/sha256"
	"encoding/json"
	"fmt"
	"io"
	mrand "math/rand/v2"
	"mime/multipart"
	"net/http"
	neturl "net/url"
	"os"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"
)

// upload posts files as multipart parts; names are the parts' file names
// unless path is given.
func (h *harness) upload(t *testing.T, query neturl.Values, parts map[string]io.Reader) (*http.Response, []byte) {
	t.Helper()
	pr, pw := io.Pipe()
	mw := multipart.NewWriter(pw)
	go func() {
		for name, r := range parts {
			w, err := mw.CreateFormFile("file", name)
			if err == nil {
				_, err = io.Copy(w, r)
			}
			if err != nil {
				pw.CloseWithError(err)
				return
			}
		}
		pw.CloseWithError(mw.Close())
	}()
	req, _ := http.NewRequest(http.MethodPost, h.url+"/files?"+query.Encode(), pr)
	req.Header.Set("Content-Type", mw.FormDataContentType())
	res, err := h.http.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	defer res.Body.Close()
	body, _ := io.ReadAll(res.Body)
	return res, body
}

func (h *harness) get(t *testing.T, query neturl.Values, header http.Header) (*http.Response, []byte) {
	t.Helper()
	req, _ := http.NewRequest(http.MethodGet, h.url+"/files?"+query.Encode(), nil)
	for k, v := range header {
		req.Header[k] = v
	}
	res, err := h.http.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	defer res.Body.Close()
	body, _ := io.ReadAll(res.Body)
	return res, body
}

func TestFilesUploadDownloadBinary(t *testing.T) {
	h := newHarness(t)
	dir := t.TempDir()
	data := make([]byte, 3<<20+17)
	_, _ = rand.Read(data)
	dest := filepath.Join(dir, "deep/er/blob.bin")

	res, body := h.upload(t, neturl.Values{"path": {dest}}, map[string]io.Reader{"ignored": bytes.NewReader(data)})
	if res.StatusCode != http.StatusOK {
		t.Fatalf("upload: %d %s", res.StatusCode, body)
	}
	var entries []map[string]string
	if err := json.Unmarshal(body, &entries); err != nil || len(entries) != 1 || entries[0]["path"] != dest || entries[0]["name"] != "blob.bin" || entries[0]["type"] != "file" {
		t.Fatalf("upload response %s (%v)", body, err)
	}
	res, got := h.get(t, neturl.Values{"path": {dest}}, nil)
	if res.StatusCode != http.StatusOK || !bytes.Equal(got, data) {
		t.Fatalf("download: %d, %d bytes, equal %v", res.StatusCode, len(got), bytes.Equal(got, data))
	}
	if !strings.Contains(res.Header.Get("Content-Disposition"), `filename=blob.bin`) {
		t.Fatalf("content disposition %q", res.Header.Get("Content-Disposition"))
	}

	// Range requests return exactly the asked-for bytes.
	res, part := h.get(t, neturl.Values{"path": {dest}}, http.Header{"Range": {"bytes=100-199"}})
	if res.StatusCode != http.StatusPartialContent || !bytes.Equal(part, data[100:200]) {
		t.Fatalf("range: %d, %d bytes", res.StatusCode, len(part))
	}

	// Content type from the extension, else sniffed.
	_ = os.WriteFile(filepath.Join(dir, "page.html"), []byte("<html></html>"), 0o644)
	_ = os.WriteFile(filepath.Join(dir, "noext"), []byte("plain words"), 0o644)
	if res, _ := h.get(t, neturl.Values{"path": {filepath.Join(dir, "page.html")}}, nil); !strings.HasPrefix(res.Header.Get("Content-Type"), "text/html") {
		t.Fatalf("html content type %q", res.Header.Get("Content-Type"))
	}
	if res, _ := h.get(t, neturl.Values{"path": {filepath.Join(dir, "noext")}}, nil); !strings.HasPrefix(res.Header.Get("Content-Type"), "text/plain") {
		t.Fatalf("sniffed content type %q", res.Header.Get("Content-Type"))
	}
}

func TestFilesUploadMany(t *testing.T) {
	h := newHarness(t)
	dir := t.TempDir()
	a, b := filepath.Join(dir, "a.txt"), filepath.Join(dir, "sub/b.txt")
	res, body := h.upload(t, nil, map[string]io.Reader{a: strings.NewReader("A"), b: strings.NewReader("B")})
	if res.StatusCode != http.StatusOK {
		t.Fatalf("upload: %d %s", res.StatusCode, body)
	}
	for path, want := range map[string]string{a: "A", b: "B"} {
		if got, _ := os.ReadFile(path); string(got) != want {
			t.Fatalf("%s = %q", path, got)
		}
	}
	// Raw bodies work too, when the path is given.
	req, _ := http.NewRequest(http.MethodPost, h.url+"/files?path="+neturl.QueryEscape(filepath.Join(dir, "raw")), strings.NewReader("raw body"))
	req.Header.Set("Content-Type", "application/octet-stream")
	raw, err := h.http.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	raw.Body.Close()
	if got, _ := os.ReadFile(filepath.Join(dir, "raw")); raw.StatusCode != http.StatusOK || string(got) != "raw body" {
		t.Fatalf("raw upload: %d %q", raw.StatusCode, got)
	}
}

// failingReader delivers some bytes, then breaks, like a client that dies.
type failingReader struct{ left int }

func (f *failingReader) Read(p []byte) (int, error) {
	if f.left <= 0 {
		return 0, fmt.Errorf("client went away")
	}
	n := min(len(p), f.left)
	f.left -= n
	return n, nil
}

func TestFilesInterruptedUploadKeepsOldContent(t *testing.T) {
	h := newHarness(t)
	dir := t.TempDir()
	dest := filepath.Join(dir, "keep.txt")
	_ = os.WriteFile(dest, []byte("precious"), 0o644)

	pr, pw := io.Pipe()
	mw := multipart.NewWriter(pw)
	go func() {
		w, _ := mw.CreateFormFile("file", "x")
		_, err := io.Copy(w, &failingReader{left: 1 << 20})
		pw.CloseWithError(err)
	}()
	req, _ := http.NewRequest(http.MethodPost, h.url+"/files?path="+neturl.QueryEscape(dest), pr)
	req.Header.Set("Content-Type", mw.FormDataContentType())
	if res, err := h.http.Do(req); err == nil {
		res.Body.Close()
	}
	// The client may give up before envd made its temporary file: wait
	// for that file to appear (1 MiB arrives first), then to go.
	deadline := time.Now().Add(time.Second)
	for entries, _ := os.ReadDir(dir); len(entries) == 1 && time.Now().Before(deadline); entries, _ = os.ReadDir(dir) {
		time.Sleep(5 * time.Millisecond)
	}
	waitUntil(t, func() bool {
		entries, _ := os.ReadDir(dir)
		return len(entries) == 1 // the temporary file is gone
	})
	if got, _ := os.ReadFile(dest); string(got) != "precious" {
		t.Fatalf("old content replaced by %q", got)
	}
}

func TestFilesErrors(t *testing.T) {
	h := newHarness(t)
	dir := t.TempDir()
	cases := []struct {
		name   string
		query  neturl.Values
		status int
	}{
		{"no path", neturl.Values{}, http.StatusBadRequest},
		{"missing file", neturl.Values{"path": {dir + "/missing"}}, http.StatusNotFound},
		{"directory", neturl.Values{"path": {dir}}, http.StatusBadRequest},
		{"unknown user", neturl.Values{"path": {dir}, "username": {"no-such-user-wrenn"}}, http.StatusUnauthorized},
	}
	for _, tc := range cases {
		res, body := h.get(t, tc.query, nil)
		var e struct {
			Code    int    `json:"code"`
			Message string `json:"message"`
		}
		if res.StatusCode != tc.status || json.Unmarshal(body, &e) != nil || e.Code != tc.status || e.Message == "" {
			t.Errorf("%s: %d %s", tc.name, res.StatusCode, body)
		}
	}
	res, body := h.upload(t, neturl.Values{"path": {dir}}, map[string]io.Reader{"x": strings.NewReader("x")})
	if res.StatusCode != http.StatusBadRequest {
		t.Errorf("upload onto a directory: %d %s", res.StatusCode, body)
	}
	req, _ := http.NewRequest(http.MethodPost, h.url+"/files?path=x", strings.NewReader("{}"))
	req.Header.Set("Content-Type", "application/json")
	if res, err := h.http.Do(req); err != nil || res.StatusCode != http.StatusBadRequest {
		t.Errorf("json upload: %v %v", res.StatusCode, err)
	}
	req, _ = http.NewRequest(http.MethodDelete, h.url+"/files?path=x", nil)
	if res, err := h.http.Do(req); err != nil || res.StatusCode != http.StatusMethodNotAllowed {
		t.Errorf("DELETE: %v %v", res.StatusCode, err)
	}
}

func TestFilesAsOtherUser(t *testing.T) {
	requireRoot(t)
	h := newHarness(t)
	root := t.TempDir()
	_ = os.Chmod(root, 0o755)
	_ = os.Chmod(filepath.Dir(root), 0o755)
	secret := filepath.Join(root, "secret")
	_ = os.WriteFile(secret, []byte("root only"), 0o600)

	res, body := h.get(t, neturl.Values{"path": {secret}, "username": {"nobody"}}, nil)
	if res.StatusCode != http.StatusForbidden || strings.Contains(string(body), "root only") {
		t.Fatalf("nobody read a root file: %d %s", res.StatusCode, body)
	}
	res, body = h.upload(t, neturl.Values{"path": {secret}, "username": {"nobody"}}, map[string]io.Reader{"x": strings.NewReader("overwritten")})
	if res.StatusCode != http.StatusForbidden {
		t.Fatalf("nobody overwrote a root file: %d %s", res.StatusCode, body)
	}
	if got, _ := os.ReadFile(secret); string(got) != "root only" {
		t.Fatalf("secret is now %q", got)
	}

	// Uploads as a user create files that user owns.
	shared := filepath.Join(root, "shared")
	_ = os.Mkdir(shared, 0o755)
	_ = os.Chmod(shared, 0o777)
	dest := filepath.Join(shared, "new/file.txt")
	res, body = h.upload(t, neturl.Values{"path": {dest}, "username": {"nobody"}}, map[string]io.Reader{"x": strings.NewReader("hi")})
	if res.StatusCode != http.StatusOK {
		t.Fatalf("upload as nobody: %d %s", res.StatusCode, body)
	}
	for _, p := range []string{dest, filepath.Dir(dest)} {
		fi, err := os.Stat(p)
		if err != nil {
			t.Fatal(err)
		}
		if uid := fi.Sys().(*syscall.Stat_t).Uid; uid != 65534 {
			t.Fatalf("%s owned by uid %d, want nobody", p, uid)
		}
	}
	// As E2B's envd: missing directories are made wherever the upload
	// names them (E2B's SDK tests write /0/file as the default user), owned
	// by the user, even in a directory the user may not write (root is
	// 0755 root's here); the file is written with the user's own
	// permissions, so a directory the user cannot enter stays closed.
	anywhere := filepath.Join(root, "made", "f.txt")
	res, body = h.upload(t, neturl.Values{"path": {anywhere}, "username": {"nobody"}}, map[string]io.Reader{"x": strings.NewReader("hi")})
	if res.StatusCode != http.StatusOK {
		t.Fatalf("upload as nobody into a new directory: %d %s", res.StatusCode, body)
	}
	if fi, err := os.Stat(filepath.Dir(anywhere)); err != nil || fi.Sys().(*syscall.Stat_t).Uid != 65534 {
		t.Fatalf("the new directory: %v %v", fi, err)
	}
	closed := filepath.Join(root, "root-only")
	_ = os.Mkdir(closed, 0o700)
	res, body = h.upload(t, neturl.Values{"path": {filepath.Join(closed, "made", "f.txt")}, "username": {"nobody"}}, map[string]io.Reader{"x": strings.NewReader("hi")})
	if res.StatusCode != http.StatusForbidden {
		t.Fatalf("upload as nobody below a directory only root may enter: %d %s", res.StatusCode, body)
	}
}

// pseudoRandom is a fast, repeatable byte stream for large transfers.
type pseudoRandom struct {
	rng  *mrand.ChaCha8
	left int64
}

func (p *pseudoRandom) Read(b []byte) (int, error) {
	if p.left <= 0 {
		return 0, io.EOF
	}
	if int64(len(b)) > p.left {
		b = b[:p.left]
	}
	_, _ = p.rng.Read(b)
	p.left -= int64(len(b))
	return len(b), nil
}

func TestFilesOneGiB(t *testing.T) {
	if testing.Short() {
		t.Skip("moves 2 GiB through loopback; skipped with -short")
	}
	url, cmd := devEnvd(t)
	h := &harness{t: t, url: url, http: &http.Client{}}
	dest := filepath.Join(t.TempDir(), "big.bin")
	const size = 1 << 30

	src := &pseudoRandom{rng: mrand.NewChaCha8([32]byte{7}), left: size}
	sum := sha256.New()
	res, body := h.upload(t, neturl.Values{"path": {dest}}, map[string]io.Reader{"big": io.TeeReader(src, sum)})
	if res.StatusCode != http.StatusOK {
		t.Fatalf("upload: %d %s", res.StatusCode, body)
	}
	if fi, err := os.Stat(dest); err != nil || fi.Size() != size {
		t.Fatalf("stored %v bytes (%v)", fi.Size(), err)
	}

	req, _ := http.NewRequest(http.MethodGet, url+"/files?path="+neturl.QueryEscape(dest), nil)
	dl, err := h.http.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	defer dl.Body.Close()
	back := sha256.New()
	n, err := io.Copy(back, dl.Body)
	if err != nil || n != size {
		t.Fatalf("download: %d bytes, %v", n, err)
	}
	if !bytes.Equal(sum.Sum(nil), back.Sum(nil)) {
		t.Fatal("downloaded bytes differ from uploaded bytes")
	}
	peak := peakRSS(t, cmd.Process.Pid)
	if peak > 48<<20 {
		t.Fatalf("envd peak RSS %d MiB while moving 1 GiB each way", peak>>20)
	}
	t.Logf("1 GiB up and down; envd peak RSS %d MiB", peak>>20)
}
