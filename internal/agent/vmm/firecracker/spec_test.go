package firecracker

import (
	"encoding/json"
	"fmt"
	"math"
	"regexp"
	"sort"
	"strings"
)

// The request schemas of Firecracker's published API specification
// (src/firecracker/swagger/firecracker.yaml), transcribed for the endpoints
// Wrenn calls. Firecracker refuses fields it does not know, so every body
// is checked for unknown fields as well as for required fields, types,
// enums and ranges.

type prop struct {
	typ      string // string | boolean | integer | object | array
	enum     []string
	min, max float64 // for integers; zero max means unbounded
	ref      string  // schema of a nested object
}

type schema struct {
	required []string
	props    map[string]prop
}

var schemas = map[string]schema{
	"BootSource": {required: []string{"kernel_image_path"}, props: map[string]prop{
		"boot_args": {typ: "string"}, "initrd_path": {typ: "string"}, "kernel_image_path": {typ: "string"},
	}},
	"Drive": {required: []string{"drive_id", "is_root_device"}, props: map[string]prop{
		"drive_id": {typ: "string"}, "partuuid": {typ: "string"}, "is_root_device": {typ: "boolean"},
		"cache_type": {typ: "string", enum: []string{"Unsafe", "Writeback"}}, "is_read_only": {typ: "boolean"},
		"path_on_host": {typ: "string"}, "rate_limiter": {typ: "object"},
		"io_engine": {typ: "string", enum: []string{"Sync", "Async"}}, "socket": {typ: "string"},
	}},
	"NetworkInterface": {required: []string{"host_dev_name", "iface_id"}, props: map[string]prop{
		"guest_mac": {typ: "string"}, "host_dev_name": {typ: "string"}, "iface_id": {typ: "string"},
		"mtu": {typ: "integer", min: 68, max: 65535}, "rx_rate_limiter": {typ: "object"}, "tx_rate_limiter": {typ: "object"},
	}},
	"MachineConfiguration": {required: []string{"mem_size_mib", "vcpu_count"}, props: map[string]prop{
		"cpu_template": {typ: "string", enum: []string{"C3", "T2", "T2S", "T2CL", "T2A", "V1N1", "None"}},
		"smt":          {typ: "boolean"}, "mem_size_mib": {typ: "integer"}, "track_dirty_pages": {typ: "boolean"},
		"vcpu_count": {typ: "integer", min: 1, max: 32}, "huge_pages": {typ: "string", enum: []string{"None", "Transparent", "2M"}},
	}},
	"EntropyDevice": {props: map[string]prop{"rate_limiter": {typ: "object"}}},
	"Logger": {props: map[string]prop{
		"level":    {typ: "string", enum: []string{"Error", "Warning", "Info", "Debug", "Trace", "Off"}},
		"log_path": {typ: "string"}, "show_level": {typ: "boolean"}, "show_log_origin": {typ: "boolean"}, "module": {typ: "string"},
	}},
	"InstanceActionInfo": {required: []string{"action_type"}, props: map[string]prop{
		"action_type": {typ: "string", enum: []string{"FlushMetrics", "InstanceStart", "SendCtrlAltDel"}},
	}},
	"Vm": {required: []string{"state"}, props: map[string]prop{"state": {typ: "string", enum: []string{"Paused", "Resumed"}}}},
	"SnapshotCreateParams": {required: []string{"mem_file_path", "snapshot_path"}, props: map[string]prop{
		"mem_file_path": {typ: "string"}, "snapshot_path": {typ: "string"}, "snapshot_type": {typ: "string", enum: []string{"Full", "Diff"}},
	}},
	"SnapshotLoadParams": {required: []string{"snapshot_path"}, props: map[string]prop{
		"enable_diff_snapshots": {typ: "boolean"}, "track_dirty_pages": {typ: "boolean"}, "mem_file_path": {typ: "string"},
		"mem_backend": {typ: "object", ref: "MemoryBackend"}, "snapshot_path": {typ: "string"}, "resume_vm": {typ: "boolean"},
		"network_overrides": {typ: "array"}, "vsock_override": {typ: "object"}, "clock_realtime": {typ: "boolean"},
	}},
	"MemoryBackend": {required: []string{"backend_type", "backend_path"}, props: map[string]prop{
		"backend_type": {typ: "string", enum: []string{"File", "Uffd"}}, "backend_path": {typ: "string"},
	}},
}

// route is one documented method and path, with its body's schema.
type route struct {
	method  string
	pattern *regexp.Regexp
	schema  string
	idField string // the body field that must equal the path parameter
}

var routes = []route{
	{"PUT", regexp.MustCompile(`^/boot-source$`), "BootSource", ""},
	{"PUT", regexp.MustCompile(`^/drives/([^/]+)$`), "Drive", "drive_id"},
	{"PUT", regexp.MustCompile(`^/network-interfaces/([^/]+)$`), "NetworkInterface", "iface_id"},
	{"PUT", regexp.MustCompile(`^/machine-config$`), "MachineConfiguration", ""},
	{"PUT", regexp.MustCompile(`^/entropy$`), "EntropyDevice", ""},
	{"PUT", regexp.MustCompile(`^/logger$`), "Logger", ""},
	{"PUT", regexp.MustCompile(`^/actions$`), "InstanceActionInfo", ""},
	{"PATCH", regexp.MustCompile(`^/vm$`), "Vm", ""},
	{"PUT", regexp.MustCompile(`^/snapshot/create$`), "SnapshotCreateParams", ""},
	{"PUT", regexp.MustCompile(`^/snapshot/load$`), "SnapshotLoadParams", ""},
}

// validateRequest checks one request against the specification and
// returns the schema name it matched.
func validateRequest(method, path string, body []byte) (string, error) {
	for _, r := range routes {
		m := r.pattern.FindStringSubmatch(path)
		if r.method != method || m == nil {
			continue
		}
		var obj map[string]any
		if err := json.Unmarshal(body, &obj); err != nil {
			return r.schema, fmt.Errorf("body is not a JSON object: %v", err)
		}
		if err := validate(r.schema, obj); err != nil {
			return r.schema, err
		}
		if r.idField != "" && obj[r.idField] != m[1] {
			return r.schema, fmt.Errorf("%s %q differs from the path's %q", r.idField, obj[r.idField], m[1])
		}
		if r.schema == "SnapshotLoadParams" {
			_, file := obj["mem_file_path"]
			_, backend := obj["mem_backend"]
			if file == backend {
				return r.schema, fmt.Errorf("exactly one of mem_file_path and mem_backend must be present")
			}
		}
		return r.schema, nil
	}
	return "", fmt.Errorf("%s %s is not in the API specification", method, path)
}

func validate(name string, obj map[string]any) error {
	s := schemas[name]
	for _, req := range s.required {
		if _, ok := obj[req]; !ok {
			return fmt.Errorf("%s: required field %q missing", name, req)
		}
	}
	keys := make([]string, 0, len(obj))
	for k := range obj {
		keys = append(keys, k)
	}
	sort.Strings(keys)
	for _, k := range keys {
		p, ok := s.props[k]
		if !ok {
			return fmt.Errorf("%s: unknown field %q", name, k)
		}
		if err := check(name+"."+k, p, obj[k]); err != nil {
			return err
		}
	}
	return nil
}

func check(field string, p prop, v any) error {
	switch p.typ {
	case "string":
		s, ok := v.(string)
		if !ok {
			return fmt.Errorf("%s: want a string, got %T", field, v)
		}
		if len(p.enum) > 0 && !contains(p.enum, s) {
			return fmt.Errorf("%s: %q is not one of %s", field, s, strings.Join(p.enum, ", "))
		}
	case "boolean":
		if _, ok := v.(bool); !ok {
			return fmt.Errorf("%s: want a boolean, got %T", field, v)
		}
	case "integer":
		n, ok := v.(float64)
		if !ok || n != math.Trunc(n) {
			return fmt.Errorf("%s: want an integer, got %v", field, v)
		}
		if n < p.min || (p.max > 0 && n > p.max) {
			return fmt.Errorf("%s: %v outside %v..%v", field, n, p.min, p.max)
		}
	case "object":
		o, ok := v.(map[string]any)
		if !ok {
			return fmt.Errorf("%s: want an object, got %T", field, v)
		}
		if p.ref != "" {
			return validate(p.ref, o)
		}
	case "array":
		if _, ok := v.([]any); !ok {
			return fmt.Errorf("%s: want an array, got %T", field, v)
		}
	}
	return nil
}

func contains(list []string, s string) bool {
	for _, x := range list {
		if x == s {
			return true
		}
	}
	return false
}
