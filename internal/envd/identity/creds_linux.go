package identity

import (
	"fmt"
	"os"
	"runtime"
	"syscall"

	"golang.org/x/sys/unix"
)

// Actor performs file operations as one user. When envd runs as root it
// switches the calling OS thread's file-system uid, gid and groups for the
// duration of the operation, so the kernel applies exactly the permission
// checks it would apply to that user, and new files belong to that user.
type Actor struct {
	user       *User
	switchable bool // envd is root and the target is someone else
}

// mustSwitch reports whether acting as u needs envd to switch identity:
// false when envd already is u. Without root, envd can act only as
// itself; asking for anyone else is a permission error.
func mustSwitch(u *User) (bool, error) {
	self := uint32(os.Geteuid())
	if self == u.UID {
		return false, nil
	}
	if self != 0 {
		return false, fmt.Errorf("%w: envd runs as uid %d and cannot act as %q", os.ErrPermission, self, u.Name)
	}
	return true, nil
}

// NewActor prepares file operations for u.
func NewActor(u *User) (*Actor, error) {
	switchable, err := mustSwitch(u)
	if err != nil {
		return nil, err
	}
	return &Actor{user: u, switchable: switchable}, nil
}

// Credential is what a process started as u needs: nil when envd already
// is u, else u's uid, gid and groups.
func Credential(u *User) (*syscall.Credential, error) {
	switchable, err := mustSwitch(u)
	if err != nil || !switchable {
		return nil, err
	}
	return &syscall.Credential{Uid: u.UID, Gid: u.GID, Groups: u.Groups}, nil
}

// User returns the account this actor acts as.
func (a *Actor) User() *User { return a.user }

// Do runs fn on a locked OS thread with the user's file-system credentials.
// fn should only make the system calls that need the check (open, stat,
// mkdir, rename, unlink); reads and writes on an open file need none.
//
// The thread's own credentials are restored afterwards, also when fn
// panics. If they cannot be restored, the goroutine ends instead of
// returning: its thread stays locked and the Go runtime discards it, so no
// other code ever runs with the borrowed identity.
func (a *Actor) Do(fn func() error) error {
	if !a.switchable {
		return fn()
	}
	runtime.LockOSThread()
	saved, err := unix.Getgroups()
	if err != nil {
		runtime.UnlockOSThread()
		return fmt.Errorf("read groups: %w", err)
	}
	defer func() {
		if restore(saved) {
			runtime.UnlockOSThread()
			return
		}
		runtime.Goexit()
	}()
	if err := a.become(); err != nil {
		return err
	}
	return fn()
}

// become switches this thread's file-system identity. The unix package's
// Setgroups, Setfsgid and Setfsuid are raw per-thread system calls; the
// syscall package's versions would change every thread of envd.
func (a *Actor) become() error {
	groups := make([]int, len(a.user.Groups))
	for i, g := range a.user.Groups {
		groups[i] = int(g)
	}
	if err := unix.Setgroups(groups); err != nil {
		return fmt.Errorf("set groups for %q: %w", a.user.Name, err)
	}
	if err := unix.Setfsgid(int(a.user.GID)); err != nil {
		return fmt.Errorf("set fsgid for %q: %w", a.user.Name, err)
	}
	if err := unix.Setfsuid(int(a.user.UID)); err != nil {
		return fmt.Errorf("set fsuid for %q: %w", a.user.Name, err)
	}
	return nil
}

// restore returns this thread to root's file-system identity and reports
// whether it verifiably did. fsuid goes first: returning it to 0 gives the
// thread back the capabilities that leaving root dropped.
func restore(groups []int) bool {
	_ = unix.Setfsuid(0)
	_ = unix.Setfsgid(0)
	if unix.Setgroups(groups) != nil {
		return false
	}
	// setfsuid(-1) changes nothing and returns the current fsuid.
	uid, _ := unix.SetfsuidRetUid(-1)
	gid, _ := unix.SetfsgidRetGid(-1)
	return uid == 0 && gid == 0
}
