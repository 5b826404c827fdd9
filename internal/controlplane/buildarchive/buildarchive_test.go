package buildarchive

import (
	"archive/tar"
	"archive/zip"
	"bytes"
	"compress/gzip"
	"io"
	"strings"
	"testing"
)

type entry struct{ name, body string }

func makeTar(t *testing.T, entries []entry) []byte {
	t.Helper()
	var buf bytes.Buffer
	tw := tar.NewWriter(&buf)
	for _, e := range entries {
		h := &tar.Header{Name: e.name, Mode: 0o644, Size: int64(len(e.body)), Typeflag: tar.TypeReg}
		if strings.HasSuffix(e.name, "/") {
			h.Typeflag, h.Size, h.Mode = tar.TypeDir, 0, 0o755
		}
		if err := tw.WriteHeader(h); err != nil {
			t.Fatal(err)
		}
		_, _ = tw.Write([]byte(e.body))
	}
	_ = tw.Close()
	return buf.Bytes()
}

func makeZip(t *testing.T, entries []entry) []byte {
	t.Helper()
	var buf bytes.Buffer
	zw := zip.NewWriter(&buf)
	for _, e := range entries {
		w, err := zw.Create(e.name)
		if err != nil {
			t.Fatal(err)
		}
		_, _ = w.Write([]byte(e.body))
	}
	_ = zw.Close()
	return buf.Bytes()
}

func gz(data []byte) []byte {
	var buf bytes.Buffer
	w := gzip.NewWriter(&buf)
	_, _ = w.Write(data)
	_ = w.Close()
	return buf.Bytes()
}

// read lists the names and bodies of a tar stream.
func read(t *testing.T, data []byte) map[string]string {
	t.Helper()
	out := map[string]string{}
	tr := tar.NewReader(bytes.NewReader(data))
	for {
		h, err := tr.Next()
		if err == io.EOF {
			return out
		}
		if err != nil {
			t.Fatal(err)
		}
		b, _ := io.ReadAll(tr)
		out[h.Name] = string(b)
	}
}

// Each accepted kind becomes the same plain tar.
func TestEveryFormatBecomesATar(t *testing.T) {
	files := []entry{{"site/", ""}, {"site/index.html", "<h1>hi</h1>"}, {"conf/a.conf", "x=1\n"}}
	for name, data := range map[string][]byte{
		"tar": makeTar(t, files), "tar.gz": gz(makeTar(t, files)), "zip": makeZip(t, files),
	} {
		var out bytes.Buffer
		sum, err := Tar(data, &out)
		if err != nil {
			t.Fatalf("%s: %v", name, err)
		}
		got := read(t, out.Bytes())
		if sum.Format != name || got["site/index.html"] != "<h1>hi</h1>" || got["conf/a.conf"] != "x=1\n" {
			t.Fatalf("%s: %+v %q", name, sum, got)
		}
	}
}

func TestRefusesWhatClimbsOutOrIsNotAnArchive(t *testing.T) {
	for name, data := range map[string][]byte{
		"climbing tar": makeTar(t, []entry{{"ok", "1"}, {"a/../../etc/passwd", "x"}}),
		"climbing zip": makeZip(t, []entry{{"..\\evil", "x"}}),
		"text":         []byte("just some text that is not an archive at all"),
		"cut gzip":     gz(makeTar(t, []entry{{"a", strings.Repeat("x", 5000)}}))[:40],
	} {
		if _, err := Check(data); err == nil {
			t.Errorf("%s: accepted", name)
		}
	}
	// Absolute names are made relative, as tar itself does.
	var out bytes.Buffer
	if _, err := Tar(makeTar(t, []entry{{"/abs/file", "y"}}), &out); err != nil || read(t, out.Bytes())["abs/file"] != "y" {
		t.Fatalf("absolute name: %v %q", err, read(t, out.Bytes()))
	}
}
