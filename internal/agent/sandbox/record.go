package sandbox

import (
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"time"

	"github.com/wrenn/wrenn/internal/agent/network"
	"github.com/wrenn/wrenn/internal/agent/vmm"
	"github.com/wrenn/wrenn/internal/egress"
)

// State is where a sandbox is in its life.
type State string

// Sandbox states.
const (
	Pending  State = "pending"  // accepted, nothing started yet
	Starting State = "starting" // the VM is booting
	Running  State = "running"
	Paused   State = "paused" // memory is in a snapshot file, no VMM runs
	Stopped  State = "stopped"
	Error    State = "error"
	// Pausing and Resuming are only ever shown (listings, GetSandbox)
	// while a pause or resume runs; records on disk keep the state the
	// sandbox is really in until the operation is done.
	Pausing  State = "pausing"
	Resuming State = "resuming"
)

// Record is everything the agent knows about one sandbox. It is written to
// $WRENN_DIR/sandboxes/<id>/sandbox.json on every change, so a restarted
// agent knows what it owned.
type Record struct {
	ID        string             `json:"id"`
	Template  string             `json:"template"`
	State     State              `json:"state"`
	Error     string             `json:"error,omitempty"` // why it is in Error
	VCPUs     int                `json:"vcpus"`
	MemoryMiB int                `json:"memory_mib"`
	DiskMiB   int                `json:"disk_mib"`
	CreatedAt time.Time          `json:"created_at"`
	ExpiresAt time.Time          `json:"expires_at"`
	Timeout   time.Duration      `json:"timeout"`
	AutoPause bool               `json:"auto_pause"`
	Metadata  map[string]string  `json:"metadata,omitempty"`
	EnvVars   map[string]string  `json:"env_vars,omitempty"`
	Egress    egress.Policy      `json:"egress"`
	EnvdToken string             `json:"envd_token"`
	Net       network.Allocation `json:"net"`
	DiskFile  string             `json:"disk_file"`           // the sandbox's own disk data (see disk.Cloner)
	DiskBase  string             `json:"disk_base,omitempty"` // the template file it was cloned from
	Spec      vmm.Spec           `json:"spec"`
	// StartedFrom is StartedBoot or StartedMemory; BootNote says why a
	// sandbox whose template has memory booted instead.
	StartedFrom string       `json:"started_from,omitempty"`
	BootNote    string       `json:"boot_note,omitempty"`
	VMM         vmm.Instance `json:"vmm"`
	// Dir is the name of the sandbox's directories (under sandboxes/ and
	// snapshots/) and of its VMM (Spec.ID) when it is not ID: a warm-pool
	// member keeps the name it was made under once a create takes it.
	Dir string `json:"dir,omitempty"`
	// Pool is set on a warm-pool member no create has taken yet: the
	// template whose pool it is in (see pool.go).
	Pool string `json:"pool,omitempty"`
	// PoolVersion is the template version the member was made from; a
	// member of an older version is drained.
	PoolVersion string `json:"pool_version,omitempty"`
	// Internal marks the agent's own VMs (the one a shipped image's memory
	// is saved from): never listed, so no control plane takes them for
	// strays to destroy.
	Internal bool `json:"internal,omitempty"`
}

// home is the name of the sandbox's directories.
func (r Record) home() string {
	if r.Dir != "" {
		return r.Dir
	}
	return r.ID
}

const recordFile = "sandbox.json"

func writeRecord(dir string, r Record) error {
	data, err := json.MarshalIndent(r, "", "  ")
	if err != nil {
		return err
	}
	tmp := filepath.Join(dir, recordFile+".tmp")
	// The record holds the envd token: readable by the agent only.
	if err := os.WriteFile(tmp, data, 0o600); err != nil {
		return fmt.Errorf("save sandbox %s: %w", r.ID, err)
	}
	if err := os.Rename(tmp, filepath.Join(dir, recordFile)); err != nil {
		return fmt.Errorf("save sandbox %s: %w", r.ID, err)
	}
	return nil
}

func readRecord(dir string) (Record, error) {
	data, err := os.ReadFile(filepath.Join(dir, recordFile))
	if err != nil {
		return Record{}, err
	}
	var r Record
	if err := json.Unmarshal(data, &r); err != nil {
		return Record{}, fmt.Errorf("corrupt %s: %w", filepath.Join(dir, recordFile), err)
	}
	if r.ID == "" || r.home() != filepath.Base(dir) {
		return Record{}, errors.New("sandbox record does not match its directory " + dir)
	}
	return r, nil
}
