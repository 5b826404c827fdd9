// Package devmapper makes and removes device-mapper devices through the
// kernel's ioctls on /dev/mapper/control: what dmsetup create, remove and
// deps do, without a process per call or text to parse. The ioctl format
// is the kernel's include/uapi/linux/dm-ioctl.h (interface version 4).
package devmapper

import (
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"time"
	"unsafe"

	"golang.org/x/sys/unix"
)

const control = "/dev/mapper/control"

// Available reports whether this host can make device-mapper devices.
func Available() error {
	if _, err := os.Stat(control); err != nil {
		return fmt.Errorf("device-mapper is not available (no %s; modprobe dm_mod dm_snapshot): %w", control, err)
	}
	return nil
}

// Target is one line of a device's table: Length sectors (512 bytes) from
// Start, mapped by the target Type ("linear", "zero", "snapshot") with
// its Params.
type Target struct {
	Start, Length uint64
	Type, Params  string
}

// Path is where a device's node is.
func Path(name string) string { return "/dev/mapper/" + name }

// headerSize is sizeof(struct dm_ioctl); every request starts with one.
const headerSize = int(unsafe.Sizeof(unix.DmIoctl{}))

// specSize is sizeof(struct dm_target_spec); a table's targets follow the
// header, each a spec and its parameters, NUL-ended and padded to 8 bytes.
const specSize = int(unsafe.Sizeof(unix.DmTargetSpec{}))

// request is one ioctl's buffer: a header, then data. It is made of
// uint64s so the kernel's structures in it are aligned.
type request struct{ words []uint64 }

func newRequest(name string, dataSize int) (*request, error) {
	if name == "" || len(name) >= unix.DM_NAME_LEN || strings.ContainsRune(name, '/') {
		return nil, fmt.Errorf("device-mapper name %q: 1-%d bytes, no '/'", name, unix.DM_NAME_LEN-1)
	}
	size := (headerSize + dataSize + 7) &^ 7
	r := &request{words: make([]uint64, size/8)}
	h := r.header()
	h.Version = [3]uint32{unix.DM_VERSION_MAJOR, 0, 0}
	h.Data_size = uint32(size)
	h.Data_start = uint32(headerSize)
	copy(h.Name[:], name)
	return r, nil
}

func (r *request) header() *unix.DmIoctl { return (*unix.DmIoctl)(unsafe.Pointer(&r.words[0])) }

func (r *request) bytes() []byte {
	return unsafe.Slice((*byte)(unsafe.Pointer(&r.words[0])), len(r.words)*8)
}

// tableRequest is a DM_TABLE_LOAD for targets.
func tableRequest(name string, targets []Target) (*request, error) {
	size := 0
	for _, t := range targets {
		if t.Type == "" || len(t.Type) >= unix.DM_MAX_TYPE_NAME || strings.ContainsRune(t.Params, 0) {
			return nil, fmt.Errorf("device-mapper target %q %q", t.Type, t.Params)
		}
		size += specLen(t)
	}
	r, err := newRequest(name, size)
	if err != nil {
		return nil, err
	}
	r.header().Target_count = uint32(len(targets))
	b := r.bytes()
	off := headerSize
	for _, t := range targets {
		spec := (*unix.DmTargetSpec)(unsafe.Pointer(&b[off]))
		spec.Sector_start, spec.Length = t.Start, t.Length
		copy(spec.Target_type[:], t.Type)
		n := specLen(t)
		spec.Next = uint32(n) // from this spec to the next one
		copy(b[off+specSize:], t.Params)
		off += n
	}
	return r, nil
}

func specLen(t Target) int { return (specSize + len(t.Params) + 1 + 7) &^ 7 }

func ioctl(cmd uint, r *request) error {
	f, err := os.OpenFile(control, os.O_RDWR, 0)
	if err != nil {
		return err
	}
	defer f.Close()
	_, _, errno := unix.Syscall(unix.SYS_IOCTL, f.Fd(), uintptr(cmd), uintptr(unsafe.Pointer(&r.words[0])))
	if errno != 0 {
		return errno
	}
	return nil
}

// Create makes device name with the table targets, active, and returns
// its node's path. A failure leaves no device.
func Create(name string, targets []Target) (string, error) {
	load, err := tableRequest(name, targets)
	if err != nil {
		return "", err
	}
	create, _ := newRequest(name, 0)
	copy(create.header().Uuid[:], uuidPrefix+name)
	if err := ioctl(unix.DM_DEV_CREATE, create); err != nil {
		return "", fmt.Errorf("device-mapper create %s: %w", name, err)
	}
	dev := create.header().Dev
	fail := func(what string, err error) (string, error) {
		_ = Remove(name)
		return "", fmt.Errorf("device-mapper %s %s: %w", what, name, err)
	}
	if err := ioctl(unix.DM_TABLE_LOAD, load); err != nil {
		return fail("load the table of", err)
	}
	resume, _ := newRequest(name, 0) // DM_DEV_SUSPEND without DM_SUSPEND_FLAG resumes: the table goes live
	if err := ioctl(unix.DM_DEV_SUSPEND, resume); err != nil {
		return fail("activate", err)
	}
	if err := makeNode(name, dev); err != nil {
		return fail("make the node of", err)
	}
	return Path(name), nil
}

// uuidPrefix marks the devices Wrenn made, in their uuid.
const uuidPrefix = "WRENN-"

// makeNode gives the device its /dev/mapper node, for dev and no other
// (minor numbers are reused: a node left by an earlier device of the
// name would open another sandbox's disk). Where udev runs, its rules
// make it (as they do for dmsetup), and we wait a little for that;
// elsewhere (containers, hosts without udev), or if udev is late, we
// make it as libdevmapper does.
func makeNode(name string, dev uint64) error {
	path := Path(name)
	if _, err := os.Stat("/run/udev/control"); err == nil {
		for deadline := time.Now().Add(2 * time.Second); time.Now().Before(deadline); time.Sleep(20 * time.Millisecond) {
			if nodeIs(path, dev) {
				return nil
			}
		}
	}
	if nodeIs(path, dev) {
		return nil
	}
	if err := os.Remove(path); err != nil && !errors.Is(err, os.ErrNotExist) {
		return err
	}
	err := unix.Mknod(path, unix.S_IFBLK|0o600, int(dev))
	if errors.Is(err, os.ErrExist) && nodeIs(path, dev) {
		return nil // udev made it a moment late
	}
	return err
}

// nodeIs reports whether path is (or links to) the block device dev.
func nodeIs(path string, dev uint64) bool {
	var st unix.Stat_t
	return unix.Stat(path, &st) == nil && st.Mode&unix.S_IFMT == unix.S_IFBLK && st.Rdev == dev
}

// Remove removes device name and its node; one that is gone is no error.
// A device still open (a VMM that has not quite exited) is tried again
// for a few seconds, as dmsetup --retry does.
func Remove(name string) error {
	var err error
	for range 25 {
		r, rerr := newRequest(name, 0)
		if rerr != nil {
			return rerr
		}
		err = ioctl(unix.DM_DEV_REMOVE, r)
		if !errors.Is(err, unix.EBUSY) {
			break
		}
		time.Sleep(200 * time.Millisecond)
	}
	if err != nil && !errors.Is(err, unix.ENXIO) {
		return fmt.Errorf("device-mapper remove %s: %w", name, err)
	}
	removeNode(name)
	return nil
}

// removeNode removes a device's /dev/mapper node if it is still there
// (udev removes its own; one we made, or one a crash left, we do).
func removeNode(name string) {
	if fi, err := os.Lstat(Path(name)); err == nil && fi.Mode()&(os.ModeDevice|os.ModeSymlink) != 0 {
		_ = os.Remove(Path(name))
	}
}

// Exists reports whether device name is there. Only the kernel's "no such
// device" is false: any other failure is an error, never a guess.
func Exists(name string) (bool, error) {
	r, err := newRequest(name, 0)
	if err != nil {
		return false, err
	}
	switch err := ioctl(unix.DM_DEV_STATUS, r); {
	case err == nil:
		return true, nil
	case errors.Is(err, unix.ENXIO):
		removeNode(name) // a node without its device names nothing, or something else
		return false, nil
	default:
		return false, fmt.Errorf("device-mapper status of %s: %w", name, err)
	}
}

// Deps returns the kernel names ("loop3", "dm-1") of the block devices
// device name's table uses.
func Deps(name string) ([]string, error) {
	for size := 4096; size <= 1<<20; size *= 4 {
		r, err := newRequest(name, size)
		if err != nil {
			return nil, err
		}
		if err := ioctl(unix.DM_TABLE_DEPS, r); err != nil {
			return nil, fmt.Errorf("device-mapper deps of %s: %w", name, err)
		}
		h := r.header()
		if h.Flags&unix.DM_BUFFER_FULL_FLAG != 0 {
			continue
		}
		if h.Data_size <= h.Data_start {
			return nil, nil // no live table: it uses nothing
		}
		if int(h.Data_size) > len(r.words)*8 {
			return nil, fmt.Errorf("device-mapper deps of %s: the kernel answered data %d-%d of a %d-byte buffer", name, h.Data_start, h.Data_size, len(r.words)*8)
		}
		devs, err := parseDeps(r.bytes()[h.Data_start:h.Data_size])
		if err != nil {
			return nil, fmt.Errorf("device-mapper deps of %s: %w", name, err)
		}
		var names []string
		for _, d := range devs {
			link, err := os.Readlink(fmt.Sprintf("/sys/dev/block/%d:%d", unix.Major(d), unix.Minor(d)))
			if err != nil {
				return nil, fmt.Errorf("device-mapper deps of %s: %w", name, err)
			}
			names = append(names, filepath.Base(link))
		}
		return names, nil
	}
	return nil, fmt.Errorf("device-mapper deps of %s: too many", name)
}

// parseDeps reads a struct dm_target_deps: a count, padding, then that
// many device numbers.
func parseDeps(b []byte) ([]uint64, error) {
	if len(b) < 8 {
		return nil, errors.New("short answer")
	}
	n := int(*(*uint32)(unsafe.Pointer(&b[0])))
	if n < 0 || 8+8*n > len(b) {
		return nil, fmt.Errorf("answer of %d bytes cannot hold %d devices", len(b), n)
	}
	out := make([]uint64, n)
	for i := range out {
		out[i] = *(*uint64)(unsafe.Pointer(&b[8+8*i]))
	}
	return out, nil
}

// Names lists the device-mapper devices on the host, by name.
func Names() ([]string, error) {
	files, err := filepath.Glob("/sys/block/dm-*/dm/name")
	if err != nil {
		return nil, err
	}
	var names []string
	for _, f := range files {
		b, err := os.ReadFile(f)
		if err != nil {
			continue // removed since the listing
		}
		names = append(names, strings.TrimSpace(string(b)))
	}
	return names, nil
}
