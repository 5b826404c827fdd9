package filesystem

import (
	"io/fs"
	"os"
	"os/user"
	"path/filepath"
	"strconv"
	"sync"
	"syscall"

	"golang.org/x/sys/unix"

	"google.golang.org/protobuf/types/known/timestamppb"

	"github.com/wrenn/wrenn/internal/envd/xmeta"
	pb "github.com/wrenn/wrenn/proto/envd/filesystem"
)

// names caches uid and gid lookups; /etc/passwd rarely changes.
type names struct {
	mu     sync.Mutex
	users  map[uint32]string
	groups map[uint32]string
}

func newNames() *names {
	return &names{users: map[uint32]string{}, groups: map[uint32]string{}}
}

func (n *names) user(uid uint32) string {
	n.mu.Lock()
	defer n.mu.Unlock()
	if s, ok := n.users[uid]; ok {
		return s
	}
	s := strconv.FormatUint(uint64(uid), 10)
	if u, err := user.LookupId(s); err == nil {
		s = u.Username
	}
	n.users[uid] = s
	return s
}

func (n *names) group(gid uint32) string {
	n.mu.Lock()
	defer n.mu.Unlock()
	if s, ok := n.groups[gid]; ok {
		return s
	}
	s := strconv.FormatUint(uint64(gid), 10)
	if g, err := user.LookupGroupId(s); err == nil {
		s = g.Name
	}
	n.groups[gid] = s
	return s
}

// entryInfo describes path from its lstat result. A symbolic link is
// described as E2B's envd does: its target resolved to an absolute path
// (the link's own path when it cannot be), the target's type and mode
// (unspecified for a dangling link), and the link's own permissions
// string ("Lrwxrwxrwx"); E2B's SDKs and their tests expect exactly that.
func (n *names) entryInfo(path string, fi fs.FileInfo) *pb.EntryInfo {
	e := &pb.EntryInfo{
		Name:         filepath.Base(path),
		Path:         path,
		Size:         fi.Size(),
		Mode:         uint32(fi.Mode().Perm()),
		Permissions:  fi.Mode().String(),
		ModifiedTime: timestamppb.New(fi.ModTime()),
	}
	e.Metadata = xmeta.Read(path)
	switch {
	case fi.Mode()&fs.ModeSymlink != 0:
		target, err := filepath.EvalSymlinks(path)
		if err != nil {
			target = path
		}
		e.SymlinkTarget = &target
		e.Type, e.Mode = pb.FileType_FILE_TYPE_UNSPECIFIED, 0
		if ti, err := os.Stat(target); err == nil {
			e.Mode = uint32(ti.Mode().Perm())
			e.Type = pb.FileType_FILE_TYPE_FILE
			if ti.IsDir() {
				e.Type = pb.FileType_FILE_TYPE_DIRECTORY
			}
		}
	case fi.IsDir():
		e.Type = pb.FileType_FILE_TYPE_DIRECTORY
	default:
		e.Type = pb.FileType_FILE_TYPE_FILE
	}
	if st, ok := fi.Sys().(*syscall.Stat_t); ok {
		e.Owner = n.user(st.Uid)
		e.Group = n.group(st.Gid)
	}
	return e
}

// networkFS are the file systems whose changes a watch may miss (they
// happen on other machines): NFS, SMB/CIFS, 9p, FUSE, Ceph, AFS.
var networkFS = map[int64]string{
	0x6969: "nfs", 0x517b: "smb", 0xff534d42: "cifs", 0xfe534d42: "smb2", 0x01021997: "9p",
	0x65735546: "fuse", 0x00c36400: "ceph", 0x5346414f: "afs",
}

// onNetworkFS names the network file system path is on ("" for none).
func onNetworkFS(path string) string {
	var st unix.Statfs_t
	if err := unix.Statfs(path, &st); err != nil {
		return ""
	}
	return networkFS[int64(st.Type)]
}
