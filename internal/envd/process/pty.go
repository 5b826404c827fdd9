package process

import (
	"os"

	"github.com/creack/pty"
)

func setPTYSize(f *os.File, cols, rows uint32) error {
	return pty.Setsize(f, &pty.Winsize{Cols: uint16(cols), Rows: uint16(rows)})
}
