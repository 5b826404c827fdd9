// Package migrations holds the control plane's SQL schema as goose
// migrations, embedded so that wrenn-cp applies them at start.
package migrations

import "embed"

// FS holds every *.sql migration, applied in file-name order.
//
//go:embed *.sql
var FS embed.FS
