// Package loopdev puts files on loop block devices through the kernel's
// loop ioctls (what losetup does, without a process per call or text to
// parse), and finds the devices a file is on.
package loopdev

import (
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strconv"
	"strings"

	"golang.org/x/sys/unix"
)

const control = "/dev/loop-control"

// Available reports whether this host can attach loop devices.
func Available() error {
	if _, err := os.Stat(control); err != nil {
		return fmt.Errorf("loop devices are not available (no %s; modprobe loop): %w", control, err)
	}
	return nil
}

// Attach puts file on a free loop device and returns the device's path.
// A read-only device refuses writes whatever the file's mode.
func Attach(file string, readOnly bool) (string, error) {
	mode, flags := os.O_RDWR, uint32(0)
	if readOnly {
		mode, flags = os.O_RDONLY, unix.LO_FLAGS_READ_ONLY
	}
	backing, err := os.OpenFile(file, mode, 0)
	if err != nil {
		return "", fmt.Errorf("attach %s to a loop device: %w", file, err)
	}
	defer backing.Close()
	ctl, err := os.OpenFile(control, os.O_RDWR, 0)
	if err != nil {
		return "", fmt.Errorf("attach %s to a loop device: %w", file, err)
	}
	defer ctl.Close()
	// Another process may take the free device between the two calls: the
	// kernel then answers EBUSY and we ask for another.
	for range 16 {
		n, err := unix.IoctlRetInt(int(ctl.Fd()), unix.LOOP_CTL_GET_FREE)
		if err != nil {
			return "", fmt.Errorf("attach %s: find a free loop device: %w", file, err)
		}
		dev := "/dev/loop" + strconv.Itoa(n)
		err = configure(dev, backing, file, flags)
		if errors.Is(err, unix.EBUSY) {
			continue
		}
		if err != nil {
			return "", fmt.Errorf("attach %s to %s: %w", file, dev, err)
		}
		return dev, nil
	}
	return "", fmt.Errorf("attach %s: every free loop device was taken before we could use it", file)
}

func configure(dev string, backing *os.File, name string, flags uint32) error {
	f, err := os.OpenFile(dev, os.O_RDWR, 0)
	if err != nil {
		return err
	}
	defer f.Close()
	cfg := unix.LoopConfig{Fd: uint32(backing.Fd())}
	cfg.Info.Flags = flags
	copy(cfg.Info.File_name[:len(cfg.Info.File_name)-1], name)
	err = unix.IoctlLoopConfigure(int(f.Fd()), &cfg)
	if !errors.Is(err, unix.EINVAL) && !errors.Is(err, unix.ENOTTY) {
		return err
	}
	// Kernels before 5.8 have no LOOP_CONFIGURE: set the file, then its flags.
	if err := unix.IoctlSetInt(int(f.Fd()), unix.LOOP_SET_FD, int(backing.Fd())); err != nil {
		return err
	}
	info := cfg.Info
	if err := unix.IoctlLoopSetStatus64(int(f.Fd()), &info); err != nil {
		_ = unix.IoctlSetInt(int(f.Fd()), unix.LOOP_CLR_FD, 0)
		return err
	}
	return nil
}

// Find lists the loop devices file is on, matched by its device and
// inode (a path can be renamed or reused; these cannot).
func Find(file string) ([]string, error) {
	var st unix.Stat_t
	if err := unix.Stat(file, &st); err != nil {
		return nil, fmt.Errorf("find loop devices of %s: %w", file, err)
	}
	bound, err := filepath.Glob("/sys/block/loop*/loop") // only bound devices have it
	if err != nil {
		return nil, err
	}
	var devs []string
	for _, b := range bound {
		dev := "/dev/" + filepath.Base(filepath.Dir(b))
		info, err := status(dev)
		if err != nil {
			continue // detached since the listing
		}
		if info.Inode == st.Ino && info.Device == st.Dev {
			devs = append(devs, dev)
		}
	}
	return devs, nil
}

func status(dev string) (*unix.LoopInfo64, error) {
	f, err := os.Open(dev)
	if err != nil {
		return nil, err
	}
	defer f.Close()
	return unix.IoctlLoopGetStatus64(int(f.Fd()))
}

// ReadOnly reports whether dev refuses writes.
func ReadOnly(dev string) bool {
	ro, err := os.ReadFile("/sys/block/" + filepath.Base(dev) + "/ro")
	return err == nil && strings.TrimSpace(string(ro)) == "1"
}

// Holders counts what holds dev open as part of another block device
// (device-mapper tables), as the kernel lists them; -1 when dev is gone.
func Holders(dev string) (int, error) {
	holders, err := os.ReadDir("/sys/block/" + filepath.Base(dev) + "/holders")
	if errors.Is(err, os.ErrNotExist) {
		return -1, nil
	}
	if err != nil {
		return 0, err
	}
	return len(holders), nil
}

// Detach frees dev; a device already free is no error.
func Detach(dev string) error {
	f, err := os.OpenFile(dev, os.O_RDONLY, 0)
	if errors.Is(err, os.ErrNotExist) {
		return nil
	}
	if err != nil {
		return fmt.Errorf("detach %s: %w", dev, err)
	}
	defer f.Close()
	if err := unix.IoctlSetInt(int(f.Fd()), unix.LOOP_CLR_FD, 0); err != nil && !errors.Is(err, unix.ENXIO) {
		return fmt.Errorf("detach %s: %w", dev, err)
	}
	return nil
}
