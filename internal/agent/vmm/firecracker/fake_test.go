package firecracker

import (
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"
	"unsafe"

	"golang.org/x/sys/unix"

	"github.com/wrenn/wrenn/internal/agent/vmm/firecracker/uffd"
)

// The test binary doubles as a stand-in for the firecracker binary: with
// WRENN_FAKE_FIRECRACKER=1 it serves the API on --api-sock, enforcing the
// specification's schemas and Firecracker's ordering rules, and logs every
// request to WRENN_FAKE_FC_LOG. A real Firecracker needs KVM, which this
// machine lacks; the KVM suite (kvm_test.go) runs the real one where it can.
func TestMain(m *testing.M) {
	if len(os.Args) > 1 && os.Args[1] == "uffd-handler" {
		os.Exit(HandlerMain(os.Args[2:])) // as wrenn-agent runs it
	}
	if os.Getenv("WRENN_FAKE_JAILER") == "1" {
		os.Exit(fakeJailer())
	}
	if os.Getenv("WRENN_FAKE_FIRECRACKER") == "1" {
		os.Exit(fakeFirecracker())
	}

	os.Exit(m.Run())
}

// fakeJailer stands in for Firecracker's jailer (src/jailer in
// Firecracker's repository; docs/jailer.md): it checks its command line as
// the jailer parses it, builds the jail as the jailer does (a copy of the
// exec file in <chroot base>/<exec file name>/<id>/root, whose "/", /dev,
// /dev/net and /run it gives to --uid:--gid with mode 0700, and device
// nodes for /dev/net/tun, /dev/kvm and /dev/userfaultfd), writes the pid
// of the Firecracker it starts to <root>/<exec file name>.pid and, with
// --new-pid-ns, forks it into a new PID namespace and exits. Firecracker
// runs as --uid/--gid with the jailer's arguments: "--id <id>
// --start-time-us N --start-time-cpu-us N --parent-cpu-time-us N" and
// what followed "--". One liberty: it does not chroot (this test binary
// is dynamically linked), so the stand-in firecracker reaches its jail
// through a directory descriptor, /proc/self/fd/3, and nothing else.
func fakeJailer() int {
	fail := func(format string, a ...any) int {
		fmt.Fprintf(os.Stderr, "fake jailer: "+format+"\n", a...)
		return 2
	}
	args := os.Args[1:]
	flags := map[string][]string{}
	switches := map[string]bool{}
	var rest []string
	for i := 0; i < len(args); i++ {
		switch a := args[i]; {
		case a == "--":
			rest = args[i+1:]
			i = len(args)
		case a == "--new-pid-ns" || a == "--daemonize":
			switches[a] = true
		case strings.HasPrefix(a, "--") && i+1 < len(args):
			flags[a] = append(flags[a], args[i+1])
			i++
		default:
			return fail("unexpected argument %q", a)
		}
	}
	for _, f := range []string{"--id", "--exec-file", "--uid", "--gid"} {
		if len(flags[f]) != 1 {
			return fail("flag %s missing or repeated", f)
		}
	}
	id, execFile := flags["--id"][0], flags["--exec-file"][0]
	if !validID.MatchString(id) || !strings.Contains(filepath.Base(execFile), "firecracker") {
		return fail("bad --id %q or --exec-file %q", id, execFile)
	}
	uid, err1 := strconv.Atoi(flags["--uid"][0])
	gid, err2 := strconv.Atoi(flags["--gid"][0])
	if err1 != nil || err2 != nil {
		return fail("bad --uid or --gid")
	}
	base := "/srv/jailer"
	if b := flags["--chroot-base-dir"]; len(b) == 1 {
		base = b[0]
	}
	if len(rest) != 2 || rest[0] != "--api-sock" || !strings.HasPrefix(rest[1], "/") {
		return fail("firecracker arguments %v", rest)
	}
	// The jailer's cgroup flags: a version, a parent relative to the
	// hierarchy's root, and controller files that exist in that version.
	version := map[string][]string{"1": {"cpu.cfs_period_us=", "cpu.cfs_quota_us=", "memory.limit_in_bytes=", "pids.max="},
		"2": {"cpu.max=", "memory.max=", "pids.max="}}
	if len(flags["--cgroup"]) > 0 {
		if len(flags["--cgroup-version"]) != 1 || version[flags["--cgroup-version"][0]] == nil {
			return fail("--cgroup-version %v", flags["--cgroup-version"])
		}
		if len(flags["--parent-cgroup"]) != 1 || strings.HasPrefix(flags["--parent-cgroup"][0], "/") {
			return fail("--parent-cgroup %v: want one path relative to the cgroup root", flags["--parent-cgroup"])
		}
	}
	for _, c := range flags["--cgroup"] {
		known := false
		for _, prefix := range version[flags["--cgroup-version"][0]] {
			known = known || strings.HasPrefix(c, prefix)
		}
		if !known {
			return fail("cgroup setting %q unknown to cgroup v%s", c, flags["--cgroup-version"][0])
		}
	}
	if n := flags["--netns"]; len(n) > 0 {
		if _, err := os.Stat(n[0]); err != nil {
			return fail("--netns: %v", err)
		}
	}
	root := filepath.Join(base, filepath.Base(execFile), id, "root")
	if err := os.MkdirAll(root, 0o700); err != nil {
		return fail("%v", err)
	}
	// Copy the exec file in, refusing a destination with other links.
	name := filepath.Base(execFile)
	src, err := os.Open(execFile)
	if err != nil {
		return fail("%v", err)
	}
	dst, err := os.OpenFile(filepath.Join(root, name), os.O_CREATE|os.O_WRONLY|syscall.O_NOFOLLOW, 0o755)
	if err != nil {
		return fail("%v", err)
	}
	if fi, _ := dst.Stat(); fi.Sys().(*syscall.Stat_t).Nlink > 1 {
		return fail("%s is a hard link", dst.Name())
	}
	_, err = io.Copy(dst, src)
	if err = errors.Join(err, dst.Chown(uid, gid), dst.Close(), src.Close()); err != nil {
		return fail("copy the exec file: %v", err)
	}
	for _, d := range []string{"/", "/dev", "/dev/net", "/run"} {
		p := filepath.Join(root, d)
		if err := errors.Join(os.MkdirAll(p, 0o700), os.Chmod(p, 0o700), os.Chown(p, uid, gid)); err != nil {
			return fail("%v", err)
		}
	}
	devices := map[string][2]uint32{"/dev/net/tun": {10, 200}, "/dev/kvm": {10, 232}}
	if fi, err := os.Stat("/dev/userfaultfd"); err == nil {
		rdev := fi.Sys().(*syscall.Stat_t).Rdev
		devices["/dev/userfaultfd"] = [2]uint32{unix.Major(rdev), unix.Minor(rdev)}
	}
	for p, dev := range devices {
		p = filepath.Join(root, p)
		if err := errors.Join(unix.Mknod(p, unix.S_IFCHR|0o600, int(unix.Mkdev(dev[0], dev[1]))), os.Chown(p, uid, gid)); err != nil {
			return fail("mknod %s: %v", p, err)
		}
	}
	logFile, _ := os.OpenFile(os.Getenv("WRENN_FAKE_FC_LOG"), os.O_CREATE|os.O_WRONLY|os.O_APPEND, 0o644)
	line, _ := json.Marshal(logEntry{Method: "JAILER", Path: strings.Join(args, " "), Status: 204})
	_, _ = logFile.Write(append(line, '\n'))
	jail, err := os.Open(root)
	if err != nil {
		return fail("%v", err)
	}
	now := strconv.FormatInt(time.Now().UnixMicro(), 10)
	cmd := &exec.Cmd{
		Path: "/proc/self/fd/3/" + name,
		Args: append([]string{"/" + name, "--id", id, "--start-time-us", now, "--start-time-cpu-us", "0", "--parent-cpu-time-us", "0"}, rest...),
		// The jailer clears its environment; these tell this binary to
		// play Firecracker, and where its jail and the test's log are.
		Env:        []string{"WRENN_FAKE_FIRECRACKER=1", "WRENN_FAKE_FC_ROOT=/proc/self/fd/3", "WRENN_FAKE_FC_LOG_FD=4"},
		Stdout:     os.Stdout,
		Stderr:     os.Stderr,
		ExtraFiles: []*os.File{jail, logFile},
		SysProcAttr: &syscall.SysProcAttr{
			Credential: &syscall.Credential{Uid: uint32(uid), Gid: uint32(gid)},
			Setsid:     sessionLeader(),
		},
	}
	if switches["--new-pid-ns"] {
		cmd.SysProcAttr.Cloneflags = syscall.CLONE_NEWPID
	}
	if err := cmd.Start(); err != nil {
		return fail("start firecracker: %v", err)
	}
	pidFile, err := os.OpenFile(filepath.Join(root, name+".pid"), os.O_CREATE|os.O_EXCL|os.O_WRONLY, 0o644)
	if err != nil {
		_ = cmd.Process.Kill()
		return fail("pid file: %v", err)
	}
	_, _ = fmt.Fprint(pidFile, cmd.Process.Pid)
	_ = pidFile.Close()
	if switches["--new-pid-ns"] {
		return 0 // the jailer's parent exits; Firecracker runs on
	}
	// Without a new PID namespace the real jailer execs Firecracker in
	// place; this stand-in waits for it, which keeps the same pid file.
	_ = cmd.Wait()
	return 0
}

// sessionLeader says whether this process leads its session (the jailer
// then makes Firecracker lead a new one).
func sessionLeader() bool {
	sid, err := unix.Getsid(0)
	return err == nil && sid == os.Getpid()
}

type logEntry struct {
	Method string          `json:"method"`
	Path   string          `json:"path"`
	Body   json.RawMessage `json:"body,omitempty"`
	Status int             `json:"status"`
	Fault  string          `json:"fault,omitempty"`
	Note   string          `json:"note,omitempty"`
}

type fakeVM struct {
	mu         sync.Mutex
	root       string // the jail root when started by the jailer
	log        *os.File
	configured map[string]bool
	phase      string // config | running | paused
	trackDirty bool
}

func fakeFirecracker() int {
	socket := ""
	for i, a := range os.Args {
		if a == "--api-sock" && i+1 < len(os.Args) {
			socket = os.Args[i+1]
		}
	}
	var logFile *os.File
	var err error
	if os.Getenv("WRENN_FAKE_FC_LOG_FD") == "4" {
		logFile = os.NewFile(4, "log") // from the stand-in jailer: this user could not open it
	} else {
		logFile, err = os.OpenFile(os.Getenv("WRENN_FAKE_FC_LOG"), os.O_CREATE|os.O_WRONLY|os.O_APPEND, 0o644)
	}
	if err != nil || socket == "" {
		fmt.Fprintln(os.Stderr, "fake firecracker: need --api-sock and WRENN_FAKE_FC_LOG")
		return 2
	}
	if root := os.Getenv("WRENN_FAKE_FC_ROOT"); root != "" {
		socket = filepath.Join(root, socket)
	}
	ln, err := net.Listen("unix", socket)
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		return 1
	}
	vm := &fakeVM{log: logFile, configured: map[string]bool{}, phase: "config", root: os.Getenv("WRENN_FAKE_FC_ROOT")}
	_ = http.Serve(ln, vm)
	return 0
}

func (vm *fakeVM) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	body, _ := io.ReadAll(r.Body)
	vm.mu.Lock()
	defer vm.mu.Unlock()
	entry := logEntry{Method: r.Method, Path: r.URL.Path, Body: body}
	note, err := vm.apply(r.Method, r.URL.Path, body)
	entry.Note = note
	if err != nil {
		entry.Status, entry.Fault = http.StatusBadRequest, err.Error()
		w.Header().Set("Content-Type", "application/json")
		w.WriteHeader(http.StatusBadRequest)
		_ = json.NewEncoder(w).Encode(map[string]string{"fault_message": err.Error()})
	} else {
		entry.Status = http.StatusNoContent
		w.WriteHeader(http.StatusNoContent)
	}
	line, _ := json.Marshal(entry)
	_, _ = vm.log.Write(append(line, '\n'))
}

// apply validates a request and changes the fake VM's state as Firecracker would.
func (vm *fakeVM) apply(method, path string, body []byte) (string, error) {
	name, err := validateRequest(method, path, body)
	if err != nil {
		return "", err
	}
	var obj map[string]any
	_ = json.Unmarshal(body, &obj)
	// A jailed firecracker sees only its jail; so does this stand-in. It
	// opens what it is given as Firecracker would, as the user it runs as.
	access := map[string]int{"kernel_image_path": os.O_RDONLY, "path_on_host": os.O_RDWR, "snapshot_path": os.O_RDONLY, "mem_file_path": -1}
	for field, mode := range access {
		p, ok := obj[field].(string)
		if !ok {
			continue
		}
		if vm.root != "" {
			obj[field] = filepath.Join(vm.root, p)
		}
		if name == "SnapshotCreateParams" || mode < 0 {
			continue // written, not read
		}
		f, err := os.OpenFile(obj[field].(string), mode, 0)
		if err != nil {
			return "", fmt.Errorf("%s %q cannot be opened by uid %d: %v", field, p, os.Getuid(), err)
		}
		f.Close()
	}
	if b, ok := obj["mem_backend"].(map[string]any); ok && vm.root != "" {
		b["backend_path"] = filepath.Join(vm.root, b["backend_path"].(string))
	}
	switch name {
	case "BootSource", "Drive", "NetworkInterface", "MachineConfiguration", "EntropyDevice":
		if vm.phase != "config" {
			return "", fmt.Errorf("%s is pre-boot only", path)
		}
		vm.configured[name] = true
		if name == "MachineConfiguration" && obj["track_dirty_pages"] == true {
			vm.trackDirty = true
		}
	case "InstanceActionInfo":
		if obj["action_type"] == "InstanceStart" {
			if vm.phase != "config" || !vm.configured["BootSource"] || !vm.configured["Drive"] {
				return "", fmt.Errorf("InstanceStart needs a boot source and a drive, before boot")
			}
			vm.phase = "running"
		}
	case "Vm":
		switch {
		case obj["state"] == "Paused" && vm.phase == "running":
			vm.phase = "paused"
		case obj["state"] == "Resumed" && vm.phase == "paused":
			vm.phase = "running"
		default:
			return "", fmt.Errorf("cannot set %v while %s", obj["state"], vm.phase)
		}
	case "SnapshotCreateParams":
		if vm.phase != "paused" {
			return "", fmt.Errorf("snapshot/create needs a paused VM, not %s", vm.phase)
		}
		if err := os.WriteFile(obj["snapshot_path"].(string), []byte("vm state"), 0o600); err != nil {
			return "", err
		}
		if obj["snapshot_type"] == "Diff" {
			if !vm.trackDirty {
				return "", fmt.Errorf("diff snapshots need dirty page tracking")
			}
			// Only the second page changed since the restore: a sparse file.
			f, err := os.Create(obj["mem_file_path"].(string))
			if err != nil {
				return "", err
			}
			defer f.Close()
			_ = f.Truncate(4096 * 8)
			_, err = f.WriteAt(bytes.Repeat([]byte("dirty page"), 4096/10+1)[:4096], 4096)
			return "diff", err
		}
		mem := bytes.Repeat([]byte("guest memory page"), 4096*8/17+1)[:4096*8]
		return "full", os.WriteFile(obj["mem_file_path"].(string), mem, 0o600)
	case "SnapshotLoadParams":
		if vm.phase != "config" || len(vm.configured) > 0 {
			return "", fmt.Errorf("snapshot/load is only accepted by a fresh process")
		}
		if _, err := os.Stat(obj["snapshot_path"].(string)); err != nil {
			return "", err
		}
		backend, _ := obj["mem_backend"].(map[string]any)
		note := ""
		if backend["backend_type"] == "Uffd" {
			if note, err = uffdHandshake(backend["backend_path"].(string)); err != nil {
				return "", err
			}
		} else if f, err := os.Open(backend["backend_path"].(string)); err != nil {
			return "", fmt.Errorf("memory file cannot be opened by uid %d: %v", os.Getuid(), err)
		} else {
			f.Close()
		}
		vm.trackDirty = obj["track_dirty_pages"] == true
		vm.phase = "paused"
		if obj["resume_vm"] == true {
			vm.phase = "running"
		}
		return note, nil
	}
	return "", nil
}

// uffdHandshake plays Firecracker's part of a lazy restore with a real
// userfaultfd, then reads all of "guest memory" through it.
func uffdHandshake(socket string) (string, error) {
	// UFFD_USER_MODE_ONLY: what a process without capabilities may make
	// (the real Firecracker uses /dev/userfaultfd for full faults).
	fd, _, errno := unix.Syscall(323, unix.O_CLOEXEC|unix.O_NONBLOCK|1, 0, 0) // SYS_userfaultfd
	if errno != 0 {
		return "", fmt.Errorf("userfaultfd: %v", errno)
	}
	api := struct{ api, features, ioctls uint64 }{api: 0xAA}
	if _, _, errno := unix.Syscall(unix.SYS_IOCTL, fd, 0xc018aa3f, uintptr(unsafe.Pointer(&api))); errno != 0 {
		return "", fmt.Errorf("UFFDIO_API: %v", errno)
	}
	const size = 4096 * 8
	mem, err := unix.Mmap(-1, 0, size, unix.PROT_READ|unix.PROT_WRITE, unix.MAP_PRIVATE|unix.MAP_ANONYMOUS)
	if err != nil {
		return "", err
	}
	base := uint64(uintptr(unsafe.Pointer(&mem[0])))
	reg := struct{ start, len, mode, ioctls uint64 }{start: base, len: size, mode: 1}
	if _, _, errno := unix.Syscall(unix.SYS_IOCTL, fd, 0xc020aa00, uintptr(unsafe.Pointer(&reg))); errno != 0 {
		return "", fmt.Errorf("UFFDIO_REGISTER: %v", errno)
	}
	conn, err := net.DialUnix("unix", nil, &net.UnixAddr{Name: socket, Net: "unix"})
	if err != nil {
		return "", err
	}
	defer conn.Close()
	regions, _ := json.Marshal([]uffd.Region{{BaseHostVirtAddr: base, Size: size, PageSize: 4096}})
	if _, _, err := conn.WriteMsgUnix(regions, unix.UnixRights(int(fd)), nil); err != nil {
		return "", err
	}
	if !strings.HasPrefix(string(mem[:17]), "guest memory page") {
		return "", fmt.Errorf("lazy memory served %q", mem[:17])
	}
	return "uffd memory verified", nil
}
