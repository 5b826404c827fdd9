// Package kvm decides whether hardware virtualisation is usable on this
// host, and reads what software emulation needs to know about the CPU.
package kvm

import (
	"os"
	"strconv"
	"strings"
)

// Usable decides between KVM and software emulation. WRENN_ACCEL=kvm or
// tcg forces the choice. Otherwise KVM needs both a /dev/kvm that opens and
// a CPU that advertises hardware virtualisation (vmx or svm): some sandboxes
// expose a /dev/kvm that creates VMs but fails to run a real kernel
// ("KVM internal error ... emulation failure").
func Usable() bool {
	switch os.Getenv("WRENN_ACCEL") {
	case "kvm":
		return true
	case "tcg":
		return false
	}
	f, err := os.OpenFile("/dev/kvm", os.O_RDWR, 0)
	if err != nil {
		return false
	}
	f.Close()
	flags := " " + cpuinfoField("flags") + " "
	return strings.Contains(flags, " vmx ") || strings.Contains(flags, " svm ")
}

// HostTSCkHz returns the host CPU's clock rate, which QEMU's emulated TSC
// follows; 0 if unknown.
func HostTSCkHz() int {
	mhz, err := strconv.ParseFloat(cpuinfoField("cpu MHz"), 64)
	if err != nil {
		return 0
	}
	return int(mhz * 1000)
}

// cpuinfoField returns the first value of a /proc/cpuinfo field.
func cpuinfoField(name string) string {
	data, err := os.ReadFile("/proc/cpuinfo")
	if err != nil {
		return ""
	}
	for _, line := range strings.Split(string(data), "\n") {
		if k, v, ok := strings.Cut(line, ":"); ok && strings.TrimSpace(k) == name {
			return strings.TrimSpace(v)
		}
	}
	return ""
}

// TCGKernelArgs are the kernel arguments a guest needs under software
// emulation: without a known TSC rate some boots hang calibrating it, and
// an unreliable TSC makes idle guests burn host CPU.
func TCGKernelArgs() []string {
	var args []string
	if khz := HostTSCkHz(); khz > 0 {
		args = append(args, "tsc_early_khz="+strconv.Itoa(khz))
	}
	return append(args, "tsc=reliable")
}
