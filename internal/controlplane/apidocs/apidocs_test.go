package apidocs

import (
	"io"
	"net/http/httptest"
	"strings"
	"testing"
)

// /docs is Swagger UI's page over /openapi.yaml, with its assets.
func TestServesSwaggerUI(t *testing.T) {
	h := Handler()
	for path, want := range map[string]string{
		"/docs":                      "text/html",
		"/docs/swagger-ui-bundle.js": "text/javascript",
		"/docs/swagger-ui.css":       "text/css",
		"/docs/init.js":              "text/javascript",
	} {
		rec := httptest.NewRecorder()
		h.ServeHTTP(rec, httptest.NewRequest("GET", path, nil))
		body, _ := io.ReadAll(rec.Body)
		if rec.Code != 200 || !strings.HasPrefix(rec.Header().Get("Content-Type"), want) || len(body) == 0 {
			t.Errorf("%s: %d %q (%d bytes)", path, rec.Code, rec.Header().Get("Content-Type"), len(body))
		}
	}
	rec := httptest.NewRecorder()
	h.ServeHTTP(rec, httptest.NewRequest("GET", "/docs/init.js", nil))
	if !strings.Contains(rec.Body.String(), "/openapi.yaml") {
		t.Error("the page does not load the control plane's OpenAPI document")
	}
	rec = httptest.NewRecorder()
	h.ServeHTTP(rec, httptest.NewRequest("GET", "/docs/nope.js", nil))
	if rec.Code != 404 {
		t.Errorf("a missing asset: %d", rec.Code)
	}
}
