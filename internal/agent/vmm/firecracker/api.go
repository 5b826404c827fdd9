package firecracker

import (
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"io"
	"net"
	"net/http"
	"time"
)

// Request bodies of the Firecracker API, as its published specification
// (firecracker.yaml) defines them. Optional fields are omitted when empty:
// Firecracker rejects unknown fields and some zero values.

// BootSource is PUT /boot-source.
type BootSource struct {
	KernelImagePath string `json:"kernel_image_path"`
	BootArgs        string `json:"boot_args,omitempty"`
	InitrdPath      string `json:"initrd_path,omitempty"`
}

// Drive is PUT /drives/{drive_id}.
type Drive struct {
	DriveID      string `json:"drive_id"`
	IsRootDevice bool   `json:"is_root_device"`
	IsReadOnly   *bool  `json:"is_read_only,omitempty"`
	PathOnHost   string `json:"path_on_host,omitempty"`
	CacheType    string `json:"cache_type,omitempty"` // Unsafe | Writeback
	IOEngine     string `json:"io_engine,omitempty"`  // Sync | Async
}

// NetworkInterface is PUT /network-interfaces/{iface_id}.
type NetworkInterface struct {
	IfaceID     string `json:"iface_id"`
	HostDevName string `json:"host_dev_name"`
	GuestMAC    string `json:"guest_mac,omitempty"`
}

// MachineConfig is PUT /machine-config.
type MachineConfig struct {
	VCPUCount       int   `json:"vcpu_count"`
	MemSizeMiB      int   `json:"mem_size_mib"`
	SMT             *bool `json:"smt,omitempty"`
	TrackDirtyPages *bool `json:"track_dirty_pages,omitempty"`
}

// EntropyDevice is PUT /entropy (virtio-rng; the rate limiter is optional).
type EntropyDevice struct{}

// Logger is PUT /logger.
type Logger struct {
	LogPath string `json:"log_path,omitempty"`
	Level   string `json:"level,omitempty"` // Error | Warning | Info | Debug | Trace | Off
}

// InstanceAction is PUT /actions.
type InstanceAction struct {
	ActionType string `json:"action_type"` // FlushMetrics | InstanceStart | SendCtrlAltDel
}

// VMState is PATCH /vm.
type VMState struct {
	State string `json:"state"` // Paused | Resumed
}

// SnapshotCreate is PUT /snapshot/create.
type SnapshotCreate struct {
	SnapshotPath string `json:"snapshot_path"`
	MemFilePath  string `json:"mem_file_path"`
	SnapshotType string `json:"snapshot_type,omitempty"` // Full | Diff
}

// MemoryBackend says where restored guest memory comes from.
type MemoryBackend struct {
	BackendType string `json:"backend_type"` // File | Uffd
	BackendPath string `json:"backend_path"`
}

// SnapshotLoad is PUT /snapshot/load.
type SnapshotLoad struct {
	SnapshotPath    string         `json:"snapshot_path"`
	MemBackend      *MemoryBackend `json:"mem_backend,omitempty"`
	TrackDirtyPages bool           `json:"track_dirty_pages,omitempty"`
	ResumeVM        bool           `json:"resume_vm,omitempty"`
}

// API is a client for one Firecracker process's API socket.
type API struct {
	socket string
	http   *http.Client
}

// NewAPI returns a client for the API socket at path.
func NewAPI(socket string) *API {
	return &API{socket: socket, http: &http.Client{
		Transport: &http.Transport{DialContext: func(ctx context.Context, _, _ string) (net.Conn, error) {
			var d net.Dialer
			return d.DialContext(ctx, "unix", socket)
		}},
	}}
}

// APIError is an error answer from Firecracker.
type APIError struct {
	Method, Path string
	Status       int
	Fault        string
}

func (e *APIError) Error() string {
	return fmt.Sprintf("firecracker %s %s: %d: %s", e.Method, e.Path, e.Status, e.Fault)
}

// callTimeout bounds an API call that does no work proportional to the
// guest; snapshotTimeout one that writes or maps its memory.
const callTimeout = 30 * time.Second

// snapshotTimeout allows memoryMiB of guest memory to be written or read
// at 50 MiB/s, a slow disk's pace, on top of callTimeout.
func snapshotTimeout(memoryMiB int) time.Duration {
	return callTimeout + time.Duration(memoryMiB)*time.Second/50
}

func (a *API) do(ctx context.Context, method, path string, body any) error {
	return a.doWithin(ctx, callTimeout, method, path, body)
}

func (a *API) doWithin(ctx context.Context, timeout time.Duration, method, path string, body any) error {
	ctx, cancel := context.WithTimeout(ctx, timeout)
	defer cancel()
	data, err := json.Marshal(body)
	if err != nil {
		return err
	}
	req, err := http.NewRequestWithContext(ctx, method, "http://localhost"+path, bytes.NewReader(data))
	if err != nil {
		return err
	}
	req.Header.Set("Content-Type", "application/json")
	req.Header.Set("Accept", "application/json")
	res, err := a.http.Do(req)
	if err != nil {
		return fmt.Errorf("firecracker %s %s: %w", method, path, err)
	}
	defer res.Body.Close()
	if res.StatusCode/100 == 2 {
		return nil
	}
	var fault struct {
		FaultMessage string `json:"fault_message"`
	}
	raw, _ := io.ReadAll(io.LimitReader(res.Body, 64<<10))
	if json.Unmarshal(raw, &fault) != nil || fault.FaultMessage == "" {
		fault.FaultMessage = string(raw)
	}
	return &APIError{Method: method, Path: path, Status: res.StatusCode, Fault: fault.FaultMessage}
}

// PutLogger configures Firecracker's own log.
func (a *API) PutLogger(ctx context.Context, l Logger) error {
	return a.do(ctx, http.MethodPut, "/logger", l)
}

// PutBootSource sets the kernel and its arguments.
func (a *API) PutBootSource(ctx context.Context, b BootSource) error {
	return a.do(ctx, http.MethodPut, "/boot-source", b)
}

// PutDrive adds a block device.
func (a *API) PutDrive(ctx context.Context, d Drive) error {
	return a.do(ctx, http.MethodPut, "/drives/"+d.DriveID, d)
}

// PutNetworkInterface adds a network device backed by a TAP.
func (a *API) PutNetworkInterface(ctx context.Context, n NetworkInterface) error {
	return a.do(ctx, http.MethodPut, "/network-interfaces/"+n.IfaceID, n)
}

// PutMachineConfig sets vCPUs and memory.
func (a *API) PutMachineConfig(ctx context.Context, m MachineConfig) error {
	return a.do(ctx, http.MethodPut, "/machine-config", m)
}

// PutEntropy adds a virtio-rng device.
func (a *API) PutEntropy(ctx context.Context) error {
	return a.do(ctx, http.MethodPut, "/entropy", EntropyDevice{})
}

// Start boots the configured VM.
func (a *API) Start(ctx context.Context) error {
	return a.do(ctx, http.MethodPut, "/actions", InstanceAction{ActionType: "InstanceStart"})
}

// Pause stops the vCPUs.
func (a *API) Pause(ctx context.Context) error {
	return a.do(ctx, http.MethodPatch, "/vm", VMState{State: "Paused"})
}

// Resume continues the vCPUs.
func (a *API) Resume(ctx context.Context) error {
	return a.do(ctx, http.MethodPatch, "/vm", VMState{State: "Resumed"})
}

// CreateSnapshot writes the paused VM's state and its memoryMiB of memory,
// allowing time in proportion.
func (a *API) CreateSnapshot(ctx context.Context, s SnapshotCreate, memoryMiB int) error {
	return a.doWithin(ctx, snapshotTimeout(memoryMiB), http.MethodPut, "/snapshot/create", s)
}

// LoadSnapshot restores a VM of memoryMiB into a fresh Firecracker process.
func (a *API) LoadSnapshot(ctx context.Context, s SnapshotLoad, memoryMiB int) error {
	return a.doWithin(ctx, snapshotTimeout(memoryMiB), http.MethodPut, "/snapshot/load", s)
}
