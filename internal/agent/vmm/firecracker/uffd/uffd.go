// Package uffd serves a restored Firecracker VM's memory lazily from its
// snapshot file through userfaultfd, so resume need not wait for all of
// guest memory to be read.
//
// Firecracker connects to the handler's Unix socket and sends, with the
// userfaultfd in SCM_RIGHTS, a JSON list of its guest memory regions. The
// handler answers each page fault by copying that page from the snapshot
// (UFFDIO_COPY), and meanwhile copies every other page in the background,
// in runs of up to prefetchRun bytes; once all pages are in, it returns
// and the VM no longer needs it: with every page present no fault can
// come (Firecracker gives memory back only through a balloon device, which
// Wrenn does not configure; its removals are still answered with zero
// pages while the handler runs).
package uffd

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"net"
	"os"
	"sync"
	"unsafe"

	"golang.org/x/sys/unix"
)

// Region is one guest memory region, as Firecracker describes it.
type Region struct {
	BaseHostVirtAddr uint64 `json:"base_host_virt_addr"`
	Size             uint64 `json:"size"`
	Offset           uint64 `json:"offset"`
	PageSize         uint64 `json:"page_size"`
	// Older Firecracker releases send only this; despite its name it is in bytes.
	PageSizeKiB uint64 `json:"page_size_kib"`
}

func (r Region) pageSize() uint64 {
	switch {
	case r.PageSize > 0:
		return r.PageSize
	case r.PageSizeKiB > 0:
		return r.PageSizeKiB
	default:
		return uint64(os.Getpagesize())
	}
}

// Linux userfaultfd ABI (include/uapi/linux/userfaultfd.h).
const (
	eventPagefault = 0x12
	eventRemove    = 0x15
	msgSize        = 32
	ioctlCopy      = 0xc028aa03 // _IOWR(0xAA, 0x03, struct uffdio_copy)
	ioctlZeropage  = 0xc020aa04 // _IOWR(0xAA, 0x04, struct uffdio_zeropage)
)

type uffdioCopy struct {
	dst, src, len, mode uint64
	copied              int64
}

type uffdioZeropage struct {
	start, len, mode uint64
	zeropage         int64
}

// Stats count what the handler did.
type Stats struct {
	Faults     int // pages copied because the guest touched them
	Prefetched int // pages copied in the background
	Zeroed     int // pages given back as zero after the balloon removed them
}

// prefetchRun is the most the background copy moves in one UFFDIO_COPY.
const prefetchRun = 2 << 20

// Handler serves one VM.
type Handler struct {
	mem   []byte // the snapshot's memory file, mapped read-only
	uffd  int
	regs  []pages
	mu    sync.Mutex
	stats Stats
}

// pages tracks one region's pages: present (copied or zeroed into the
// guest), and removed (given back by a balloon: zero on the next fault).
type pages struct {
	Region
	size             uint64 // page size
	present, removed bitmap
}

// bitmap is a set of page indexes.
type bitmap []uint64

func newBitmap(n uint64) bitmap       { return make(bitmap, (n+63)/64) }
func (b bitmap) has(i uint64) bool    { return b[i/64]&(1<<(i%64)) != 0 }
func (b bitmap) set(i uint64)         { b[i/64] |= 1 << (i % 64) }
func (b bitmap) clear(i uint64)       { b[i/64] &^= 1 << (i % 64) }
func (p *pages) count() uint64        { return p.Size / p.size }
func (p *pages) addr(i uint64) uint64 { return p.BaseHostVirtAddr + i*p.size }

// Listen creates the socket Firecracker will connect to.
func Listen(socket string) (*net.UnixListener, error) {
	_ = os.Remove(socket)
	ln, err := net.ListenUnix("unix", &net.UnixAddr{Name: socket, Net: "unix"})
	if err != nil {
		return nil, fmt.Errorf("uffd socket: %w", err)
	}
	return ln, nil
}

// Serve accepts Firecracker's connection on ln and serves memory from
// memFile. With prefetch it also copies every page not yet touched and
// returns once all are in; without, it serves faults until ctx ends.
func Serve(ctx context.Context, ln *net.UnixListener, memFile string, prefetch bool) (Stats, error) {
	f, err := os.Open(memFile)
	if err != nil {
		ln.Close()
		return Stats{}, fmt.Errorf("uffd memory file: %w", err)
	}
	defer f.Close()
	return ServeFile(ctx, ln, f, prefetch)
}

// ServeFile is Serve from a memory file already open (a handler process
// that may not open the snapshot itself is given it).
func ServeFile(ctx context.Context, ln *net.UnixListener, f *os.File, prefetch bool) (Stats, error) {
	defer ln.Close()
	go func() {
		<-ctx.Done()
		ln.Close()
	}()
	conn, err := ln.AcceptUnix()
	if err != nil {
		return Stats{}, fmt.Errorf("uffd accept: %w", err)
	}
	defer conn.Close()
	regions, fd, err := receive(conn)
	if err != nil {
		return Stats{}, err
	}
	defer unix.Close(fd)

	fi, err := f.Stat()
	if err != nil {
		return Stats{}, err
	}
	mem, err := unix.Mmap(int(f.Fd()), 0, int(fi.Size()), unix.PROT_READ, unix.MAP_PRIVATE)
	if err != nil {
		return Stats{}, fmt.Errorf("uffd map memory file: %w", err)
	}
	defer unix.Munmap(mem)
	for _, r := range regions {
		if r.Offset+r.Size > uint64(len(mem)) {
			return Stats{}, fmt.Errorf("uffd region at offset %d size %d is beyond the %d-byte memory file", r.Offset, r.Size, len(mem))
		}
	}
	h := &Handler{mem: mem, uffd: fd}
	for _, r := range regions {
		ps := r.pageSize()
		if ps == 0 || ps&(ps-1) != 0 || r.Size%ps != 0 || r.BaseHostVirtAddr%ps != 0 {
			return Stats{}, fmt.Errorf("uffd region at %#x size %d: not whole %d-byte pages", r.BaseHostVirtAddr, r.Size, ps)
		}
		p := pages{Region: r, size: ps}
		p.present, p.removed = newBitmap(p.count()), newBitmap(p.count())
		h.regs = append(h.regs, p)
	}
	return h.run(ctx, prefetch)
}

// receive reads the region list and the userfaultfd from Firecracker.
func receive(conn *net.UnixConn) ([]Region, int, error) {
	buf := make([]byte, 64<<10)
	oob := make([]byte, unix.CmsgSpace(4))
	n, oobn, _, _, err := conn.ReadMsgUnix(buf, oob)
	if err != nil {
		return nil, -1, fmt.Errorf("uffd handshake: %w", err)
	}
	msgs, err := unix.ParseSocketControlMessage(oob[:oobn])
	if err != nil || len(msgs) == 0 {
		return nil, -1, errors.New("uffd handshake: no file descriptor received")
	}
	fds, err := unix.ParseUnixRights(&msgs[0])
	if err != nil || len(fds) != 1 {
		return nil, -1, errors.New("uffd handshake: expected exactly one file descriptor")
	}
	var regions []Region
	if err := json.Unmarshal(buf[:n], &regions); err != nil || len(regions) == 0 {
		unix.Close(fds[0])
		return nil, -1, fmt.Errorf("uffd handshake: bad region list %q: %v", buf[:n], err)
	}
	return regions, fds[0], nil
}

func (h *Handler) run(ctx context.Context, prefetch bool) (Stats, error) {
	prefetchDone := make(chan error, 1)
	if prefetch {
		// The background copy ends with run: Serve unmaps the memory file
		// and closes the userfaultfd once run returns.
		pctx, cancel := context.WithCancel(ctx)
		copying := make(chan struct{})
		go func() {
			defer close(copying)
			prefetchDone <- h.prefetch(pctx)
		}()
		defer func() {
			cancel()
			<-copying
		}()
	}
	msg := make([]byte, msgSize)
	for {
		select {
		case err := <-prefetchDone:
			// Every page is in; faults can no longer happen.
			h.mu.Lock()
			defer h.mu.Unlock()
			return h.stats, err
		case <-ctx.Done():
			return h.snapshotStats(), ctx.Err()
		default:
		}
		fds := []unix.PollFd{{Fd: int32(h.uffd), Events: unix.POLLIN}}
		if _, err := unix.Poll(fds, 50); err != nil && !errors.Is(err, unix.EINTR) {
			return h.snapshotStats(), fmt.Errorf("uffd poll: %w", err)
		}
		if fds[0].Revents&unix.POLLIN == 0 {
			continue
		}
		n, err := unix.Read(h.uffd, msg)
		if errors.Is(err, unix.EAGAIN) {
			continue
		}
		if err != nil || n != msgSize {
			return h.snapshotStats(), fmt.Errorf("uffd read: %v (%d bytes)", err, n)
		}
		switch msg[0] {
		case eventPagefault:
			addr := *(*uint64)(unsafe.Pointer(&msg[16]))
			if err := h.populate(addr, true); err != nil {
				return h.snapshotStats(), err
			}
		case eventRemove:
			// The balloon gave pages back; later faults there get zeros.
			start := *(*uint64)(unsafe.Pointer(&msg[8]))
			end := *(*uint64)(unsafe.Pointer(&msg[16]))
			h.markRemoved(start, end)
		}
	}
}

func (h *Handler) snapshotStats() Stats {
	h.mu.Lock()
	defer h.mu.Unlock()
	return h.stats
}

// page finds the region and page index holding addr.
func (h *Handler) page(addr uint64) (*pages, uint64, bool) {
	for i := range h.regs {
		r := &h.regs[i]
		if addr >= r.BaseHostVirtAddr && addr < r.BaseHostVirtAddr+r.Size {
			return r, (addr - r.BaseHostVirtAddr) / r.size, true
		}
	}
	return nil, 0, false
}

// copyIn copies n pages from page i of r out of the memory file; pages
// already present in the guest (EEXIST) are taken as done, one by one.
func (h *Handler) copyIn(r *pages, i, n uint64) (uint64, error) {
	src := r.Offset + i*r.size
	for tries := 0; ; tries++ {
		c := uffdioCopy{dst: r.addr(i), src: uint64(uintptr(unsafe.Pointer(&h.mem[src]))), len: n * r.size}
		_, _, errno := unix.Syscall(unix.SYS_IOCTL, uintptr(h.uffd), ioctlCopy, uintptr(unsafe.Pointer(&c)))
		switch {
		case errno == 0:
			return n, nil
		case errno == unix.EAGAIN && tries < 100:
			continue // the guest's mappings were changing: again
		case errno == unix.EEXIST && n == 1:
			return 1, nil
		case errno == unix.EEXIST:
			for k := range n {
				if _, err := h.copyIn(r, i+k, 1); err != nil {
					return k, err
				}
			}
			return n, nil
		default:
			return 0, fmt.Errorf("uffd copy of %d bytes to %#x: %w", c.len, c.dst, errno)
		}
	}
}

// populate makes the page holding addr present, once: from the memory
// file, or zero after a balloon removed it.
func (h *Handler) populate(addr uint64, fault bool) error {
	r, i, ok := h.page(addr)
	if !ok {
		return fmt.Errorf("uffd fault at %#x outside every guest region", addr)
	}
	h.mu.Lock()
	defer h.mu.Unlock()
	switch {
	case r.removed.has(i):
		if err := h.zero(r.addr(i), r.size); err != nil {
			return err
		}
		r.removed.clear(i)
		r.present.set(i)
		return nil
	case r.present.has(i):
		return nil // a fault raced with the background copy of its page
	}
	if _, err := h.copyIn(r, i, 1); err != nil {
		return err
	}
	r.present.set(i)
	if fault {
		h.stats.Faults++
	} else {
		h.stats.Prefetched++
	}
	return nil
}

func (h *Handler) zero(page, size uint64) error {
	z := uffdioZeropage{start: page, len: size}
	if _, _, errno := unix.Syscall(unix.SYS_IOCTL, uintptr(h.uffd), ioctlZeropage, uintptr(unsafe.Pointer(&z))); errno != 0 && errno != unix.EEXIST {
		return fmt.Errorf("uffd zero page at %#x: %w", page, errno)
	}
	h.stats.Zeroed++
	return nil
}

// markRemoved notes pages a balloon gave back: their next fault gets zeros.
func (h *Handler) markRemoved(start, end uint64) {
	h.mu.Lock()
	defer h.mu.Unlock()
	for _, r := range h.regs {
		lo, hi := max(start, r.BaseHostVirtAddr), min(end, r.BaseHostVirtAddr+r.Size)
		for a := lo &^ (r.size - 1); a < hi; a += r.size {
			i := (a - r.BaseHostVirtAddr) / r.size
			r.present.clear(i)
			r.removed.set(i)
		}
	}
}

// prefetch copies every page not yet present, in runs of absent pages of
// up to prefetchRun bytes, so the VM stops depending on this handler soon
// after resume. Faults wait at most one run.
func (h *Handler) prefetch(ctx context.Context) error {
	for ri := range h.regs {
		r := &h.regs[ri]
		maxRun := max(prefetchRun/r.size, 1)
		for i := uint64(0); i < r.count(); {
			if ctx.Err() != nil {
				return ctx.Err()
			}
			h.mu.Lock()
			n := uint64(0)
			for i+n < r.count() && n < maxRun && !r.present.has(i+n) && !r.removed.has(i+n) {
				n++
			}
			if n == 0 {
				h.mu.Unlock()
				i++
				continue
			}
			copied, err := h.copyIn(r, i, n)
			for k := range copied {
				r.present.set(i + k)
			}
			h.stats.Prefetched += int(copied)
			h.mu.Unlock()
			if err != nil {
				return err
			}
			i += n
		}
	}
	return nil
}
