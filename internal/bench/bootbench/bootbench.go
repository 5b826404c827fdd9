// Package bootbench measures how fast the guest image boots to a ready
// envd under QEMU (KVM where usable, else TCG), and how big the images are.
package bootbench

import (
	"context"
	"fmt"
	"log/slog"
	"os"
	"path/filepath"
	"syscall"
	"time"

	"github.com/wrenn/wrenn/internal/bench"
	"github.com/wrenn/wrenn/internal/guest/boot"
	"github.com/wrenn/wrenn/internal/guest/kernel"
)

const suite = "guest"

// Config names the images and how many boots to time.
type Config struct {
	WrennDir string
	Boots    int
	Log      *slog.Logger
}

// Run boots the minimal image cfg.Boots times.
func Run(ctx context.Context, cfg Config) ([]bench.Result, error) {
	kernelPath, err := kernel.Pick(cfg.WrennDir)
	if err != nil {
		return nil, err
	}
	rootfs := filepath.Join(cfg.WrennDir, "images/minimal/rootfs.ext4")
	work, err := os.MkdirTemp("", "wrenn-bench-boot")
	if err != nil {
		return nil, err
	}
	defer os.RemoveAll(work)

	var wall, guest []time.Duration
	accel := ""
	for i := range cfg.Boots {
		vm, err := boot.Start(ctx, boot.Options{Kernel: kernelPath, Rootfs: rootfs, ConsoleLog: filepath.Join(work, fmt.Sprintf("console-%d.log", i))})
		if err != nil {
			return nil, err
		}
		w, err := vm.WaitReady(ctx, 2*time.Minute)
		if err == nil {
			var g time.Duration
			if g, err = vm.GuestReadyUptime(); err == nil {
				wall, guest = append(wall, w), append(guest, g)
			}
		}
		accel = vm.Accel
		vm.Stop()
		if err != nil {
			return nil, fmt.Errorf("boot %d: %w", i+1, err)
		}
		cfg.Log.Info("guest: booted", "n", i+1, "wall", w.Round(time.Millisecond))
	}
	results := []bench.Result{
		bench.Latencies(suite, "boot to envd ready, wall from QEMU start ("+accel+")", wall, "", nil),
		bench.Latencies(suite, "boot to envd ready, guest time from kernel start ("+accel+")", guest, "", nil),
	}
	for _, f := range []struct{ name, path string }{{"kernel vmlinux size", kernelPath}, {"minimal rootfs.ext4 size (disk size / allocated)", rootfs}} {
		var st syscall.Stat_t
		if err := syscall.Stat(f.path, &st); err != nil {
			return nil, fmt.Errorf("stat %s: %w", f.path, err)
		}
		r := bench.Result{Suite: suite, Name: f.name, Unit: "MiB", Value: mib(st.Size), N: 1}
		if f.path == rootfs {
			r.Baseline, r.BaselineValue = "allocated on the host", mib(st.Blocks*512)
		}
		results = append(results, r)
	}
	return results, nil
}

func mib(b int64) float64 { return float64(b) / (1 << 20) }
