package uffd

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"net"
	"os"
	"path/filepath"
	"runtime"
	"testing"
	"time"
	"unsafe"

	"golang.org/x/sys/unix"
)

const (
	ioctlAPI          = 0xc018aa3f // _IOWR(0xAA, 0x3F, struct uffdio_api)
	ioctlRegister     = 0xc020aa00 // _IOWR(0xAA, 0x00, struct uffdio_register)
	registerModeMiss  = 1
	userfaultfdSyscal = 323 // SYS_userfaultfd on x86_64
)

// fakeFirecracker does what Firecracker does on a UFFD restore: it maps
// guest memory, registers it with a new userfaultfd and hands that to the
// handler with the region list.
func fakeFirecracker(t *testing.T, socket string, pages int) []byte {
	t.Helper()
	fd, _, errno := unix.Syscall(userfaultfdSyscal, unix.O_CLOEXEC|unix.O_NONBLOCK, 0, 0)
	if errno != 0 {
		t.Skipf("userfaultfd is not available here: %v", errno)
	}
	api := struct{ api, features, ioctls uint64 }{api: 0xAA}
	if _, _, errno := unix.Syscall(unix.SYS_IOCTL, fd, ioctlAPI, uintptr(unsafe.Pointer(&api))); errno != 0 {
		t.Fatalf("UFFDIO_API: %v", errno)
	}
	ps := os.Getpagesize()
	mem, err := unix.Mmap(-1, 0, pages*ps, unix.PROT_READ|unix.PROT_WRITE, unix.MAP_PRIVATE|unix.MAP_ANONYMOUS)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = unix.Munmap(mem) })
	base := uint64(uintptr(unsafe.Pointer(&mem[0])))
	reg := struct{ start, len, mode, ioctls uint64 }{start: base, len: uint64(len(mem)), mode: registerModeMiss}
	if _, _, errno := unix.Syscall(unix.SYS_IOCTL, fd, ioctlRegister, uintptr(unsafe.Pointer(&reg))); errno != 0 {
		t.Fatalf("UFFDIO_REGISTER: %v", errno)
	}
	conn, err := net.DialUnix("unix", nil, &net.UnixAddr{Name: socket, Net: "unix"})
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	body, _ := json.Marshal([]Region{{BaseHostVirtAddr: base, Size: uint64(len(mem)), Offset: 0, PageSize: uint64(ps)}})
	if _, _, err := conn.WriteMsgUnix(body, unix.UnixRights(int(fd)), nil); err != nil {
		t.Fatal(err)
	}
	unix.Close(int(fd)) // the handler has its own copy now
	return mem
}

// serve runs a handler over a fake Firecracker's memory of pages pages and
// returns that memory, the snapshot it must equal, and the handler's result.
func serve(t *testing.T, pages int, prefetch bool) (mem, snapshot []byte, cancel func(), done <-chan result) {
	t.Helper()
	if os.Geteuid() != 0 {
		t.Skip("userfaultfd for non-root users is off by default (vm.unprivileged_userfaultfd)")
	}
	if runtime.GOMAXPROCS(0) < 2 {
		runtime.GOMAXPROCS(2) // a faulting thread blocks until the handler answers
	}
	ps := os.Getpagesize()
	dir := t.TempDir()
	snapshot = make([]byte, pages*ps)
	for i := range pages {
		copy(snapshot[i*ps:], bytes.Repeat([]byte{byte(i*7 + 1)}, ps))
	}
	memFile := filepath.Join(dir, "memory")
	if err := os.WriteFile(memFile, snapshot, 0o600); err != nil {
		t.Fatal(err)
	}
	socket := filepath.Join(dir, "uffd.sock")
	ln, err := Listen(socket)
	if err != nil {
		t.Fatal(err)
	}
	ctx, stop := context.WithTimeout(context.Background(), 30*time.Second)
	t.Cleanup(stop)
	ch := make(chan result, 1)
	go func() {
		s, err := Serve(ctx, ln, memFile, prefetch)
		ch <- result{s, err}
	}()
	return fakeFirecracker(t, socket, pages), snapshot, stop, ch
}

type result struct {
	stats Stats
	err   error
}

func TestServesPagesOnFault(t *testing.T) {
	const pages = 64
	mem, snapshot, stop, done := serve(t, pages, false)
	ps := os.Getpagesize()
	for _, i := range []int{pages - 1, 0, pages / 2, 3} { // out of order, as a guest would
		if mem[i*ps+17] != byte(i*7+1) {
			t.Fatalf("page %d holds %d, want %d", i, mem[i*ps+17], byte(i*7+1))
		}
	}
	if !bytes.Equal(mem, snapshot) {
		t.Fatal("guest memory differs from the snapshot")
	}
	stop()
	r := <-done
	if !errors.Is(r.err, context.Canceled) || r.stats.Faults != pages || r.stats.Prefetched != 0 {
		t.Fatalf("stats %+v, %v: every page must arrive by fault, once", r.stats, r.err)
	}
}

func TestPrefetchFillsEveryPageOnce(t *testing.T) {
	const pages = 512
	mem, snapshot, _, done := serve(t, pages, true)
	_ = mem[5*os.Getpagesize()] // the guest touches a page while the rest arrive
	// The handler returns once all pages are in: from then on the memory
	// no longer depends on it.
	r := <-done
	if r.err != nil {
		t.Fatal(r.err)
	}
	if !bytes.Equal(mem, snapshot) {
		t.Fatal("guest memory differs from the snapshot")
	}
	if r.stats.Faults+r.stats.Prefetched != pages {
		t.Fatalf("stats %+v: every page must be copied exactly once", r.stats)
	}
	t.Logf("%d pages: %d on fault, %d prefetched", pages, r.stats.Faults, r.stats.Prefetched)
}

func TestRejectsBadHandshake(t *testing.T) {
	dir := t.TempDir()
	memFile := filepath.Join(dir, "memory")
	_ = os.WriteFile(memFile, make([]byte, 4096), 0o600)
	socket := filepath.Join(dir, "uffd.sock")
	ln, err := Listen(socket)
	if err != nil {
		t.Fatal(err)
	}
	done := make(chan error, 1)
	go func() {
		_, err := Serve(context.Background(), ln, memFile, true)
		done <- err
	}()
	conn, err := net.DialUnix("unix", nil, &net.UnixAddr{Name: socket, Net: "unix"})
	if err != nil {
		t.Fatal(err)
	}
	_, _ = conn.Write([]byte(`[{"base_host_virt_addr": 4096, "size": 4096}]`)) // no descriptor
	conn.Close()
	select {
	case err := <-done:
		if err == nil {
			t.Fatal("a handshake without a userfaultfd was accepted")
		}
	case <-time.After(10 * time.Second):
		t.Fatal("handler hung on a bad handshake")
	}
}
