package firecracker

import (
	"fmt"
	"net"
	"os"
	"runtime"
	"unsafe"

	"golang.org/x/sys/unix"
)

// setTapOwner makes the persistent TAP device tap in network namespace ns
// (a name under /var/run/netns) usable by uid and gid: a jailed
// Firecracker runs as its VM's own ids without CAP_NET_ADMIN, and the
// kernel lets such a process attach only to a TAP its ids own. It attaches
// to the device from inside the namespace (TUNSETIFF) and sets its owner
// and group (TUNSETOWNER, TUNSETGROUP), on an OS thread of its own.
func setTapOwner(ns, tap string, uid, gid int) error {
	if len(tap) >= unix.IFNAMSIZ {
		return fmt.Errorf("tap name %q is too long", tap)
	}
	done := make(chan error, 1)
	go func() {
		// The thread enters the namespace and is never handed back to the
		// scheduler for other goroutines: it ends with this goroutine.
		runtime.LockOSThread()
		done <- inNamespace(ns, func() error { return chownTap(tap, uid, gid) })
	}()
	return <-done
}

func inNamespace(ns string, fn func() error) error {
	target, err := os.Open("/var/run/netns/" + ns)
	if err != nil {
		return fmt.Errorf("network namespace %s: %w", ns, err)
	}
	defer target.Close()
	if err := unix.Setns(int(target.Fd()), unix.CLONE_NEWNET); err != nil {
		return fmt.Errorf("enter network namespace %s: %w", ns, err)
	}
	return fn()
}

func chownTap(tap string, uid, gid int) error {
	// TUNSETIFF would make a new device of a missing name.
	if _, err := net.InterfaceByName(tap); err != nil {
		return fmt.Errorf("tap %s: %w", tap, err)
	}
	fd, err := unix.Open("/dev/net/tun", unix.O_RDWR|unix.O_CLOEXEC, 0)
	if err != nil {
		return fmt.Errorf("open /dev/net/tun: %w", err)
	}
	defer unix.Close(fd)
	var req struct {
		name  [unix.IFNAMSIZ]byte
		flags uint16
		_     [22]byte
	}
	copy(req.name[:], tap)
	req.flags = unix.IFF_TAP | unix.IFF_NO_PI
	if _, _, errno := unix.Syscall(unix.SYS_IOCTL, uintptr(fd), unix.TUNSETIFF, uintptr(unsafe.Pointer(&req))); errno != 0 {
		return fmt.Errorf("attach to tap %s: %w", tap, errno)
	}
	if err := unix.IoctlSetInt(fd, unix.TUNSETOWNER, uid); err != nil {
		return fmt.Errorf("tap %s owner: %w", tap, err)
	}
	if err := unix.IoctlSetInt(fd, unix.TUNSETGROUP, gid); err != nil {
		return fmt.Errorf("tap %s group: %w", tap, err)
	}
	return nil
}
