// Command wrenn-init is PID 1 in every Wrenn guest. It mounts the pseudo
// file systems, names the host, brings up loopback, writes resolv.conf,
// starts chrony when the KVM PTP clock exists, and then replaces itself
// with tini, which reaps zombies and runs envd.
//
// It is deliberately small and fast: the time from kernel start to envd
// ready is on every sandbox's critical path.
package main

import (
	"errors"
	"fmt"
	"os"
	"os/exec"
	"strconv"
	"strings"
	"syscall"

	"golang.org/x/sys/unix"

	"github.com/wrenn/wrenn/internal/guest/initcfg"
)

const (
	envdPath  = "/usr/local/bin/envd"
	tiniPath  = "/usr/bin/tini"
	runDir    = "/run/wrenn"
	tokenFile = runDir + "/envd-token" // root's alone
)

func main() {
	if err := run(); err != nil {
		logf("fatal: %v", err)
		// PID 1 must not exit: the kernel would panic and the host would
		// only see a dead VM. Halt instead, leaving the message on the console.
		for {
			_ = unix.Pause()
		}
	}
}

func logf(format string, args ...any) {
	fmt.Fprintf(os.Stderr, "wrenn-init: "+format+"\n", args...)
}

const searchPath = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"

func run() error {
	// The kernel starts init without PATH; the tools found below need one.
	_ = os.Setenv("PATH", searchPath)
	if err := mountAll(); err != nil {
		return err
	}
	cmdline, err := os.ReadFile("/proc/cmdline")
	if err != nil {
		return fmt.Errorf("read /proc/cmdline: %w", err)
	}
	cfg, err := initcfg.Parse(string(cmdline))
	if err != nil {
		return err
	}
	if err := unix.Sethostname([]byte(cfg.Hostname)); err != nil {
		return fmt.Errorf("set hostname: %w", err)
	}
	_ = os.WriteFile("/etc/hostname", []byte(cfg.Hostname+"\n"), 0o644)
	_ = os.WriteFile("/etc/hosts", []byte("127.0.0.1\tlocalhost\n127.0.1.1\t"+cfg.Hostname+"\n::1\tlocalhost ip6-localhost ip6-loopback\n"), 0o644)
	if err := linkUp("lo"); err != nil {
		return fmt.Errorf("bring up lo: %w", err)
	}
	if len(cfg.DNS) > 0 {
		// resolv.conf is often a dangling link in exported images.
		_ = os.Remove("/etc/resolv.conf")
		if err := os.WriteFile("/etc/resolv.conf", []byte(initcfg.ResolvConf(cfg.DNS)), 0o644); err != nil {
			return fmt.Errorf("write resolv.conf: %w", err)
		}
	}
	growRootFS()
	startChrony()

	argv := []string{envdPath, "--port", cfg.EnvdPort}
	if cfg.EnvdToken != "" {
		// envd starts with its token: there is no moment it answers without one.
		if err := os.MkdirAll(runDir, 0o755); err != nil {
			return fmt.Errorf("create %s: %w", runDir, err)
		}
		if err := os.WriteFile(tokenFile, []byte(cfg.EnvdToken), 0o600); err != nil {
			return fmt.Errorf("write envd's token: %w", err)
		}
		argv = append(argv, "--access-token-file", tokenFile)
	}
	env := []string{"PATH=" + searchPath, "HOME=/root", "LANG=C.UTF-8"}
	startImageServices(env)
	if _, err := os.Stat(tiniPath); err == nil {
		// -s: stay a subreaper even if something else becomes PID 1's child.
		argv = append([]string{tiniPath, "-s", "--"}, argv...)
	} else {
		logf("%s missing; running envd without a zombie reaper", tiniPath)
	}
	logf("starting %s (uptime %s)", strings.Join(argv, " "), uptime())
	return syscall.Exec(argv[0], argv, env)
}

// startHook is an image's own services: when it is executable, init starts
// it (as root, in a session of its own, in the background) before envd, as
// a build's start command is for a template built from a recipe. A memory
// template of the image saves them running once its ready check passes.
const (
	startHook = "/etc/wrenn/start"
	startLog  = "/var/log/wrenn-start.log"
)

func startImageServices(env []string) {
	fi, err := os.Stat(startHook)
	if err != nil || fi.Mode()&0o111 == 0 {
		return
	}
	out, err := os.OpenFile(startLog, os.O_CREATE|os.O_WRONLY|os.O_APPEND, 0o640)
	if err != nil {
		logf("%s: %v; not starting the image's services", startLog, err)
		return
	}
	defer out.Close() // the child has its own copy
	cmd := exec.Command(startHook)
	cmd.Dir, cmd.Env, cmd.Stdout, cmd.Stderr = "/root", env, out, out
	cmd.SysProcAttr = &syscall.SysProcAttr{Setsid: true}
	if err := cmd.Start(); err != nil {
		logf("start %s: %v", startHook, err)
		return
	}
	logf("started %s (pid %d, output in %s)", startHook, cmd.Process.Pid, startLog)
}

type mount struct {
	source, target, fstype string
	flags                  uintptr
	data                   string
	mode                   os.FileMode
}

func mountAll() error {
	const common = unix.MS_NOSUID | unix.MS_NODEV | unix.MS_NOEXEC
	mounts := []mount{
		{"proc", "/proc", "proc", common, "", 0o555},
		{"sysfs", "/sys", "sysfs", common, "", 0o555},
		{"devtmpfs", "/dev", "devtmpfs", unix.MS_NOSUID, "mode=0755", 0o755},
		{"devpts", "/dev/pts", "devpts", unix.MS_NOSUID | unix.MS_NOEXEC, "gid=5,mode=0620,ptmxmode=0666", 0o755},
		{"tmpfs", "/dev/shm", "tmpfs", unix.MS_NOSUID | unix.MS_NODEV, "mode=1777", 0o1777},
		{"tmpfs", "/run", "tmpfs", unix.MS_NOSUID | unix.MS_NODEV, "mode=0755", 0o755},
		{"cgroup2", "/sys/fs/cgroup", "cgroup2", common, "nsdelegate", 0o555},
	}
	for _, m := range mounts {
		if err := os.MkdirAll(m.target, m.mode); err != nil {
			return fmt.Errorf("create %s: %w", m.target, err)
		}
		err := unix.Mount(m.source, m.target, m.fstype, m.flags, m.data)
		if err != nil && !errors.Is(err, unix.EBUSY) { // EBUSY: the kernel mounted it already
			return fmt.Errorf("mount %s on %s: %w", m.fstype, m.target, err)
		}
	}
	// /dev/ptmx must point at the devpts instance for PTYs to work.
	if _, err := os.Lstat("/dev/ptmx"); err != nil {
		_ = os.Symlink("pts/ptmx", "/dev/ptmx")
	}
	for link, target := range map[string]string{"/dev/fd": "/proc/self/fd", "/dev/stdin": "/proc/self/fd/0", "/dev/stdout": "/proc/self/fd/1", "/dev/stderr": "/proc/self/fd/2"} {
		_ = os.Symlink(target, link)
	}
	return nil
}

// linkUp sets IFF_UP on an interface.
func linkUp(name string) error {
	fd, err := unix.Socket(unix.AF_INET, unix.SOCK_DGRAM|unix.SOCK_CLOEXEC, 0)
	if err != nil {
		return err
	}
	defer unix.Close(fd)
	ifr, err := unix.NewIfreq(name)
	if err != nil {
		return err
	}
	if err := unix.IoctlIfreq(fd, unix.SIOCGIFFLAGS, ifr); err != nil {
		return err
	}
	ifr.SetUint16(ifr.Uint16() | unix.IFF_UP)
	return unix.IoctlIfreq(fd, unix.SIOCSIFFLAGS, ifr)
}

// growRootFS enlarges the root file system online when the host gave the
// sandbox a bigger disk than the template's image (ext4 grows while
// mounted). Images without resize2fs keep their size.
func growRootFS() {
	sectors, err := os.ReadFile("/sys/block/vda/size")
	if err != nil {
		return
	}
	n, err := strconv.ParseInt(strings.TrimSpace(string(sectors)), 10, 64)
	if err != nil {
		return
	}
	var st unix.Statfs_t
	if err := unix.Statfs("/", &st); err != nil {
		return
	}
	device, fs := n*512, int64(st.Blocks)*st.Bsize
	if device <= fs+fs/50 { // within 2%: already grown (or never enlarged)
		return
	}
	resize, err := exec.LookPath("resize2fs")
	if err != nil {
		logf("disk is %d MiB but the file system %d MiB, and the image has no resize2fs", device>>20, fs>>20)
		return
	}
	if out, err := exec.Command(resize, "/dev/vda").CombinedOutput(); err != nil {
		logf("grow root file system: %v: %s", err, out)
	}
}

// startChrony runs chronyd against the KVM PTP clock, when both exist.
// Under software emulation there is no /dev/ptp0, and envd's /init sets
// the clock from the host instead.
func startChrony() {
	if _, err := os.Stat("/dev/ptp0"); err != nil {
		return
	}
	chronyd, err := exec.LookPath("chronyd")
	if err != nil {
		return
	}
	// chronyd forks into the background itself; tini adopts it later.
	if err := exec.Command(chronyd, "-f", "/etc/chrony/chrony.conf").Run(); err != nil {
		logf("chronyd did not start: %v", err)
	}
}

func uptime() string {
	data, err := os.ReadFile("/proc/uptime")
	if err != nil {
		return "unknown"
	}
	f := strings.Fields(string(data))
	if len(f) == 0 {
		return "unknown"
	}
	return f[0] + "s"
}
