// Package apidocs serves the API's reference at /docs: Swagger UI (the
// swagger-ui-dist npm package, copied into dist by make apidocs) over the
// control plane's /openapi.yaml.
package apidocs

import (
	"embed"
	"io/fs"
	"net/http"
)

//go:embed dist
var dist embed.FS

// Handler serves /docs and its assets under /docs/.
func Handler() http.Handler {
	files, _ := fs.Sub(dist, "dist")
	static := http.StripPrefix("/docs/", http.FileServer(http.FS(files)))
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		w.Header().Set("Cache-Control", "public, max-age=3600")
		w.Header().Set("X-Content-Type-Options", "nosniff")
		w.Header().Set("Content-Security-Policy", "default-src 'self'; style-src 'self' 'unsafe-inline'; img-src 'self' data:; frame-ancestors 'none'")
		if r.URL.Path == "/docs" || r.URL.Path == "/docs/" {
			page, _ := fs.ReadFile(files, "index.html")
			w.Header().Set("Content-Type", "text/html; charset=utf-8")
			_, _ = w.Write(page)
			return
		}
		static.ServeHTTP(w, r)
	})
}
