// Package boot starts a guest kernel and root file system under QEMU's
// microvm machine, for image tests and boot benchmarks. It uses QEMU's
// user-mode network with a host port forwarded to envd, so it needs no
// privileges. The host agent's VMM drivers do the full job (TAP devices,
// QMP, snapshots); this package only proves an image boots to envd.
package boot

import (
	"bufio"
	"context"
	"errors"
	"fmt"
	"net"
	"net/http"
	"os"
	"os/exec"
	"strconv"
	"strings"
	"time"

	"github.com/wrenn/wrenn/internal/kvm"
)

// Options describe one VM.
type Options struct {
	Kernel    string
	Rootfs    string
	MemoryMiB int
	VCPUs     int
	// ConsoleLog receives the serial console; required, it is how a
	// failed boot explains itself.
	ConsoleLog string
	// Writable keeps the guest's disk writes in the image; by default they
	// go to a temporary overlay and the image is never changed.
	Writable bool
}

// VM is a running guest.
type VM struct {
	cmd     *exec.Cmd
	EnvdURL string // http://127.0.0.1:<port>, forwarded to the guest's envd
	Console string
	Started time.Time
	Accel   string // "kvm" or "tcg"
	exited  chan struct{}
	exitErr error
}

// Start launches QEMU. The caller must Stop the VM.
func Start(ctx context.Context, o Options) (*VM, error) {
	if o.MemoryMiB == 0 {
		o.MemoryMiB = 256
	}
	if o.VCPUs == 0 {
		o.VCPUs = 1
	}
	for _, f := range []string{o.Kernel, o.Rootfs} {
		if _, err := os.Stat(f); err != nil {
			return nil, fmt.Errorf("boot: %w", err)
		}
	}
	port, err := freePort()
	if err != nil {
		return nil, err
	}
	accel, cpu := "tcg", "qemu64,+arat"
	if kvm.Usable() {
		accel, cpu = "kvm", "host"
	}
	cmdline := []string{
		"console=ttyS0", "reboot=t", "panic=-1", "quiet",
		"root=/dev/vda", "rw", "rootfstype=ext4", "init=/usr/local/bin/wrenn-init",
		// The kernel configures eth0 before init; these are QEMU's user-mode defaults.
		"ip=10.0.2.15::10.0.2.2:255.255.255.0::eth0:off",
		"wrenn.dns=10.0.2.3", "wrenn.hostname=wrenn-boot",
	}
	if accel == "tcg" {
		cmdline = append(cmdline, kvm.TCGKernelArgs()...)
	}
	drive := "id=root,file=" + o.Rootfs + ",format=raw,if=none,cache=unsafe"
	if !o.Writable {
		drive += ",snapshot=on"
	}
	args := []string{
		"-M", "microvm,acpi=off", "-accel", accel, "-cpu", cpu,
		"-m", strconv.Itoa(o.MemoryMiB), "-smp", strconv.Itoa(o.VCPUs),
		"-nodefaults", "-no-user-config", "-nographic", "-no-reboot",
		"-serial", "file:" + o.ConsoleLog,
		"-kernel", o.Kernel, "-append", strings.Join(cmdline, " "),
		"-drive", drive, "-device", "virtio-blk-device,drive=root",
		"-netdev", fmt.Sprintf("user,id=net0,hostfwd=tcp:127.0.0.1:%d-:49983", port),
		"-device", "virtio-net-device,netdev=net0",
		"-device", "virtio-rng-device",
	}
	cmd := exec.CommandContext(ctx, "qemu-system-x86_64", args...)
	var stderr strings.Builder
	cmd.Stderr = &stderr
	vm := &VM{cmd: cmd, EnvdURL: fmt.Sprintf("http://127.0.0.1:%d", port), Console: o.ConsoleLog, Accel: accel, exited: make(chan struct{})}
	vm.Started = time.Now()
	if err := cmd.Start(); err != nil {
		return nil, fmt.Errorf("start qemu: %w", err)
	}
	go func() {
		err := cmd.Wait()
		if err != nil && stderr.Len() > 0 {
			err = fmt.Errorf("%w: %s", err, strings.TrimSpace(stderr.String()))
		}
		vm.exitErr = err
		close(vm.exited)
	}()
	return vm, nil
}

// WaitReady polls envd's /health until it answers 204 and returns the time
// since QEMU started.
func (vm *VM) WaitReady(ctx context.Context, timeout time.Duration) (time.Duration, error) {
	deadline := time.Now().Add(timeout)
	client := &http.Client{Timeout: 500 * time.Millisecond}
	for {
		select {
		case <-vm.exited:
			return 0, fmt.Errorf("qemu exited before envd was ready: %v; console:\n%s", vm.exitErr, vm.ConsoleTail(30))
		case <-ctx.Done():
			return 0, ctx.Err()
		default:
		}
		res, err := client.Get(vm.EnvdURL + "/health")
		if err == nil {
			res.Body.Close()
			if res.StatusCode == http.StatusNoContent {
				return time.Since(vm.Started), nil
			}
		}
		if time.Now().After(deadline) {
			return 0, fmt.Errorf("envd not ready after %s; console:\n%s", timeout, vm.ConsoleTail(30))
		}
		time.Sleep(25 * time.Millisecond)
	}
}

// consoleLag bounds how long envd's ready line may trail its first HTTP
// answer: the serial console is slow under TCG, the socket is not.
const consoleLag = 10 * time.Second

// GuestReadyUptime reads, from the console, the guest's own uptime when
// envd started listening: the kernel-start-to-envd-ready time. Called
// once envd answers, it waits up to consoleLag for that line.
func (vm *VM) GuestReadyUptime() (time.Duration, error) {
	for deadline := time.Now().Add(consoleLag); ; time.Sleep(25 * time.Millisecond) {
		data, err := os.ReadFile(vm.Console)
		if err != nil {
			return 0, err
		}
		for _, line := range strings.Split(string(data), "\n") {
			if !strings.Contains(line, "envd listening") {
				continue
			}
			_, after, ok := strings.Cut(line, "guest_uptime=")
			if !ok {
				continue
			}
			return time.ParseDuration(strings.Fields(after)[0])
		}
		if time.Now().After(deadline) {
			return 0, errors.New("no envd ready line on the console")
		}
	}
}

// ConsoleTail returns the last n lines of the serial console.
func (vm *VM) ConsoleTail(n int) string {
	f, err := os.Open(vm.Console)
	if err != nil {
		return "(no console: " + err.Error() + ")"
	}
	defer f.Close()
	var lines []string
	sc := bufio.NewScanner(f)
	for sc.Scan() {
		lines = append(lines, sc.Text())
		if len(lines) > n {
			lines = lines[1:]
		}
	}
	return strings.Join(lines, "\n")
}

// Stop kills QEMU and waits for it.
func (vm *VM) Stop() {
	if vm.cmd.Process != nil {
		_ = vm.cmd.Process.Kill()
	}
	<-vm.exited
}

func freePort() (int, error) {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return 0, fmt.Errorf("pick a port: %w", err)
	}
	defer ln.Close()
	return ln.Addr().(*net.TCPAddr).Port, nil
}
