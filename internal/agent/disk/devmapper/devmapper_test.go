package devmapper

import (
	"encoding/binary"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"golang.org/x/sys/unix"

	"github.com/wrenn/wrenn/internal/agent/disk/loopdev"
)

// The layout the kernel reads (include/uapi/linux/dm-ioctl.h): a 312-byte
// struct dm_ioctl, then each target as a 40-byte struct dm_target_spec,
// its parameters NUL-ended, padded to 8 bytes, "next" pointing from one
// spec to the following one.
func TestTableRequestLayout(t *testing.T) {
	if headerSize != 312 || specSize != 40 {
		t.Fatalf("struct sizes %d and %d, want 312 and 40", headerSize, specSize)
	}
	r, err := tableRequest("wrenn-sb-1", []Target{
		{Start: 0, Length: 2048, Type: "linear", Params: "/dev/loop3 0"},
		{Start: 2048, Length: 1024, Type: "zero"},
	})
	if err != nil {
		t.Fatal(err)
	}
	b := r.bytes()
	le := binary.LittleEndian
	if v := [3]uint32{le.Uint32(b[0:]), le.Uint32(b[4:]), le.Uint32(b[8:])}; v != [3]uint32{4, 0, 0} {
		t.Errorf("version %v", v)
	}
	// 312 + (40 + len("/dev/loop3 0\x00")=13 -> 56) + (40 + 1 -> 48) = 416
	if size, start, count := le.Uint32(b[12:]), le.Uint32(b[16:]), le.Uint32(b[20:]); size != 416 || start != 312 || count != 2 || len(b) != 416 {
		t.Errorf("data_size %d data_start %d target_count %d, buffer %d", size, start, count, len(b))
	}
	if name := string(b[48 : 48+10]); name != "wrenn-sb-1" || b[58] != 0 {
		t.Errorf("name %q", name)
	}
	first := b[312:]
	if le.Uint64(first[0:]) != 0 || le.Uint64(first[8:]) != 2048 || le.Uint32(first[20:]) != 56 || strings.TrimRight(string(first[24:40]), "\x00") != "linear" {
		t.Errorf("first target: % x", first[:40])
	}
	if p := string(first[40:53]); p != "/dev/loop3 0\x00" {
		t.Errorf("first parameters %q", p)
	}
	second := b[312+56:]
	if le.Uint64(second[0:]) != 2048 || le.Uint64(second[8:]) != 1024 || le.Uint32(second[20:]) != 48 || strings.TrimRight(string(second[24:40]), "\x00") != "zero" || second[40] != 0 {
		t.Errorf("second target: % x", second[:48])
	}
}

func TestBadNamesAndTargetsAreRefused(t *testing.T) {
	for _, name := range []string{"", "a/b", strings.Repeat("x", 128)} {
		if _, err := newRequest(name, 0); err == nil {
			t.Errorf("name %q accepted", name)
		}
	}
	for _, tg := range []Target{{Type: ""}, {Type: strings.Repeat("t", 16)}, {Type: "linear", Params: "a\x00b"}} {
		if _, err := tableRequest("ok", []Target{tg}); err == nil {
			t.Errorf("target %+v accepted", tg)
		}
	}
}

func TestParseDeps(t *testing.T) {
	b := make([]byte, 8+16)
	binary.LittleEndian.PutUint32(b, 2)
	binary.LittleEndian.PutUint64(b[8:], unix.Mkdev(7, 3))
	binary.LittleEndian.PutUint64(b[16:], unix.Mkdev(253, 1))
	devs, err := parseDeps(b)
	if err != nil || len(devs) != 2 || unix.Major(devs[0]) != 7 || unix.Minor(devs[0]) != 3 || unix.Major(devs[1]) != 253 {
		t.Errorf("deps %v, %v", devs, err)
	}
	binary.LittleEndian.PutUint32(b, 3)
	if _, err := parseDeps(b); err == nil {
		t.Error("a count beyond the answer was read")
	}
}

// TestCreateAndRemove runs where device-mapper exists (not on the
// project's development machines): a linear device over a loop device,
// its deps, its node, and its removal.
func TestCreateAndRemove(t *testing.T) {
	if os.Geteuid() != 0 {
		t.Skip("device-mapper needs root")
	}
	if err := Available(); err != nil {
		if os.Getenv("WRENN_REQUIRE_DM") == "1" {
			t.Fatal(err)
		}
		t.Skip(err)
	}
	file := filepath.Join(t.TempDir(), "disk")
	if err := os.WriteFile(file, nil, 0o600); err != nil {
		t.Fatal(err)
	}
	if err := os.Truncate(file, 4<<20); err != nil {
		t.Fatal(err)
	}
	loop, err := loopdev.Attach(file, false)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = loopdev.Detach(loop) })
	name := "wrenn.test-" + filepath.Base(t.TempDir())
	path, err := Create(name, []Target{{Length: 4 << 20 >> 9, Type: "linear", Params: loop + " 0"}, {Start: 4 << 20 >> 9, Length: 2048, Type: "zero"}})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = Remove(name) })
	f, err := os.Open(path)
	if err != nil {
		t.Fatal(err)
	}
	size, _ := f.Seek(0, 2)
	f.Close()
	if size != 5<<20 {
		t.Errorf("device size %d, want 5 MiB", size)
	}
	if deps, err := Deps(name); err != nil || len(deps) != 1 || "/dev/"+deps[0] != loop {
		t.Errorf("deps %v, %v; want %s", deps, err, loop)
	}
	if n, _ := loopdev.Holders(loop); n != 1 {
		t.Errorf("the loop device has %d holders", n)
	}
	if ok, err := Exists(name); !ok || err != nil {
		t.Errorf("Exists: %v, %v", ok, err)
	}
	if names, _ := Names(); !strings.Contains(strings.Join(names, " "), name) {
		t.Errorf("Names: %v", names)
	}
	if _, err := Create(name, []Target{{Length: 8, Type: "zero"}}); err == nil {
		t.Error("a second device of the same name was made")
	}
	if err := Remove(name); err != nil {
		t.Fatal(err)
	}
	if ok, err := Exists(name); ok || err != nil {
		t.Errorf("after Remove, Exists: %v, %v", ok, err)
	}
	if _, err := os.Stat(path); !os.IsNotExist(err) {
		t.Errorf("node after Remove: %v", err)
	}
	if err := Remove(name); err != nil {
		t.Errorf("removing what is gone: %v", err)
	}
}
