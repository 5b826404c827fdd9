package api

import (
	"bytes"
	"errors"
	"net/http"
	"net/http/httptest"
	"testing"
)

// FuzzDecodeRequests feeds arbitrary bodies to the JSON decoding and
// validation of the API's largest request types: every outcome is a
// value that passed validation or a 4xx error, never a panic or a 5xx.
func FuzzDecodeRequests(f *testing.F) {
	for _, s := range []string{`{"template":"minimal","vcpus":2,"memory_mb":512,"metadata":{"a":"b"},"envs":{"K":"V"}}`,
		`{"cmd":"ls","args":["-l"],"timeout_sec":5}`, `{"vcpus":-1}`, `{"memory_mb":1e309}`, `[]`, `{"cmd":"\u0000"}`, ``, `{"a":`} {
		f.Add([]byte(s))
	}
	f.Fuzz(func(t *testing.T, body []byte) {
		check := func(err error) {
			if err == nil {
				return
			}
			var ae *apiError
			if !errors.As(err, &ae) || ae.status < 400 || ae.status > 499 {
				t.Fatalf("body %q: error %v is not a 4xx", body, err)
			}
		}
		var create createCapsuleRequest
		err := decode(httptest.NewRecorder(), httptest.NewRequest(http.MethodPost, "/", bytes.NewReader(body)), &create, true)
		if err == nil {
			err = create.validate()
			if err == nil && (*create.VCPUs < 1 || *create.MemoryMB < 128 || *create.TimeoutSec < 0 || !templateNameRE.MatchString(create.Template)) {
				t.Fatalf("body %q: accepted %+v", body, create)
			}
		}
		check(err)
		var exec execRequest
		err = decode(httptest.NewRecorder(), httptest.NewRequest(http.MethodPost, "/", bytes.NewReader(body)), &exec, false)
		if err == nil {
			err = exec.validate()
			if err == nil && exec.Cmd == "" {
				t.Fatalf("body %q: accepted an exec without a command", body)
			}
		}
		check(err)
	})
}

// FuzzHostRegistration feeds arbitrary bodies to the host registration
// request's decoding and checks: accepted specs always name a usable
// agent address.
func FuzzHostRegistration(f *testing.F) {
	for _, s := range []string{`{"token":"wrt_x","address":"10.0.0.5:50051","arch":"x86_64","cpu_cores":4,"memory_mb":8192}`,
		`{"address":"https://h:1"}`, `{"address":"h:0"}`, `{"address":"[::1]:50051"}`, `{"address":"a b:1"}`, `{"cpu_cores":-5}`} {
		f.Add([]byte(s))
	}
	f.Fuzz(func(t *testing.T, body []byte) {
		var req struct {
			Token string `json:"token"`
			hostSpecsJSON
		}
		if err := decode(httptest.NewRecorder(), httptest.NewRequest(http.MethodPost, "/", bytes.NewReader(body)), &req, false); err != nil {
			return
		}
		if err := req.validate(); err != nil {
			var ae *apiError
			if !errors.As(err, &ae) || ae.status != http.StatusBadRequest {
				t.Fatalf("body %q: %v", body, err)
			}
			return
		}
		if !validAgentAddress(req.Address) || req.CPUCores < 0 || req.MemoryMB < 0 {
			t.Fatalf("body %q: accepted %+v", body, req.hostSpecsJSON)
		}
	})
}
