// Package identity resolves the Linux user a request acts as, resolves the
// paths it names, and performs file operations with that user's credentials.
package identity

import (
	"errors"
	"fmt"
	"io/fs"
	"os"
	"os/user"
	"path/filepath"
	"strconv"
	"strings"
)

// ErrUnknownUser means the requested account does not exist in the guest.
var ErrUnknownUser = errors.New("unknown user")

// User is a resolved Linux account.
type User struct {
	Name   string
	UID    uint32
	GID    uint32
	Groups []uint32
	Home   string
	Shell  string
}

// Lookup resolves a user name (or numeric uid) to an account.
func Lookup(name string) (*User, error) {
	if name == "" {
		return nil, fmt.Errorf("%w: empty user name", ErrUnknownUser)
	}
	u, err := user.Lookup(name)
	if err != nil {
		var unknown user.UnknownUserError
		if errors.As(err, &unknown) {
			return nil, fmt.Errorf("%w %q", ErrUnknownUser, name)
		}
		return nil, fmt.Errorf("look up user %q: %w", name, err)
	}
	return fromOS(u)
}

// Current returns the account envd itself runs as.
func Current() (*User, error) {
	u, err := user.Current()
	if err != nil {
		return nil, fmt.Errorf("look up current user: %w", err)
	}
	return fromOS(u)
}

func fromOS(u *user.User) (*User, error) {
	uid, err := strconv.ParseUint(u.Uid, 10, 32)
	if err != nil {
		return nil, fmt.Errorf("user %q has non-numeric uid %q", u.Username, u.Uid)
	}
	gid, err := strconv.ParseUint(u.Gid, 10, 32)
	if err != nil {
		return nil, fmt.Errorf("user %q has non-numeric gid %q", u.Username, u.Gid)
	}
	res := &User{Name: u.Username, UID: uint32(uid), GID: uint32(gid), Home: u.HomeDir, Shell: "/bin/sh"}
	if res.Home == "" {
		res.Home = "/"
	}
	if gids, err := u.GroupIds(); err == nil {
		for _, g := range gids {
			if n, err := strconv.ParseUint(g, 10, 32); err == nil {
				res.Groups = append(res.Groups, uint32(n))
			}
		}
	}
	if len(res.Groups) == 0 {
		res.Groups = []uint32{res.GID}
	}
	if sh := loginShell(u.Username); sh != "" {
		res.Shell = sh
	}
	return res, nil
}

// loginShell reads the user's shell from /etc/passwd; os/user does not expose it.
func loginShell(name string) string {
	data, err := os.ReadFile("/etc/passwd")
	if err != nil {
		return ""
	}
	for _, line := range strings.Split(string(data), "\n") {
		fields := strings.Split(line, ":")
		if len(fields) == 7 && fields[0] == name {
			return fields[6]
		}
	}
	return ""
}

// ResolvePath turns a client-supplied path into a clean absolute path:
// "~" and "~/x" expand to the user's home, relative paths are taken from
// the home directory. It rejects empty paths and NUL bytes.
func ResolvePath(u *User, p string) (string, error) {
	if p == "" {
		return "", errors.New("path is empty")
	}
	if strings.ContainsRune(p, 0) {
		return "", errors.New("path contains a NUL byte")
	}
	switch {
	case p == "~":
		p = u.Home
	case strings.HasPrefix(p, "~/"):
		p = filepath.Join(u.Home, p[2:])
	case !filepath.IsAbs(p):
		p = filepath.Join(u.Home, p)
	}
	return filepath.Clean(p), nil
}

// BareError drops the *fs.PathError or *os.LinkError around an OS error, so
// a message that already names the path does not repeat it.
func BareError(err error) error {
	var pe *fs.PathError
	if errors.As(err, &pe) {
		return pe.Err
	}
	var le *os.LinkError
	if errors.As(err, &le) {
		return le.Err
	}
	return err
}
