package identity

import (
	"fmt"
	"os"
	"runtime"

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

// NewActor prepares file operations for u. Without root, envd can act only
// as itself; asking for anyone else is a permission error.
func NewActor(u *User) (*Actor, error) {
	self := uint32(os.Geteuid())
	if self == u.UID {
		return &Actor{user: u}, nil
	}
	if self != 0 {
		return nil, fmt.Errorf("%w: envd runs as uid %d and cannot act as %q", os.ErrPermission, self, u.Name)
	}
	return &Actor{user: u, switchable: true}, nil
}

// User returns the account this actor acts as.
func (a *Actor) User() *User { return a.user }

// Do runs fn on a locked OS thread with the user's file-system credentials.
// fn should only make the system calls that need the check (open, stat,
// mkdir, rename, unlink); reads and writes on an open file need none.
func (a *Actor) Do(fn func() error) error {
	if !a.switchable {
		return fn()
	}
	runtime.LockOSThread()
	groups := make([]int, len(a.user.Groups))
	for i, g := range a.user.Groups {
		groups[i] = int(g)
	}
	// Raw, per-thread system calls: unix.Setgroups, Setfsgid and Setfsuid
	// do not broadcast to other threads as the syscall package's do.
	if err := unix.Setgroups(groups); err != nil {
		runtime.UnlockOSThread()
		return fmt.Errorf("set groups for %q: %w", a.user.Name, err)
	}
	_ = unix.Setfsgid(int(a.user.GID))
	_ = unix.Setfsuid(int(a.user.UID))
	restored := false
	defer func() {
		if restored {
			runtime.UnlockOSThread()
		}
		// Otherwise the thread stays locked and the runtime discards it
		// when this goroutine ends, so no other goroutine inherits it.
	}()
	err := fn()
	_ = unix.Setfsuid(0)
	_ = unix.Setfsgid(0)
	if unix.Setgroups([]int{0}) == nil {
		prev, _ := unix.SetfsuidRetUid(-1) // -1 changes nothing and reports the current fsuid
		restored = prev == 0
	}
	return err
}
