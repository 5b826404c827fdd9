package firecracker

import (
	"errors"
	"fmt"
	"io"
	"os"

	"golang.org/x/sys/unix"
)

// mergeDiff writes a diff snapshot's memory file onto its base. Firecracker
// writes a diff memory file as a sparse file holding only the pages dirtied
// since the last snapshot, at their own offsets; everything else is a hole.
func mergeDiff(base, diff string) error {
	src, err := os.Open(diff)
	if err != nil {
		return fmt.Errorf("merge diff snapshot: %w", err)
	}
	defer src.Close()
	dst, err := os.OpenFile(base, os.O_WRONLY, 0)
	if err != nil {
		return fmt.Errorf("merge diff snapshot: %w", err)
	}
	fi, err := src.Stat()
	if err != nil {
		dst.Close()
		return err
	}
	size := fi.Size()
	buf := make([]byte, 1<<20)
	for off := int64(0); off < size; {
		data, err := unix.Seek(int(src.Fd()), off, unix.SEEK_DATA)
		if errors.Is(err, unix.ENXIO) {
			break // only holes remain
		}
		if err != nil {
			dst.Close()
			return fmt.Errorf("merge diff snapshot: find data: %w", err)
		}
		hole, err := unix.Seek(int(src.Fd()), data, unix.SEEK_HOLE)
		if err != nil {
			dst.Close()
			return fmt.Errorf("merge diff snapshot: find hole: %w", err)
		}
		for pos := data; pos < hole; {
			n, err := src.ReadAt(buf[:min(int64(len(buf)), hole-pos)], pos)
			if n > 0 {
				if _, werr := dst.WriteAt(buf[:n], pos); werr != nil {
					dst.Close()
					return fmt.Errorf("merge diff snapshot: %w", werr)
				}
				pos += int64(n)
			}
			if err != nil && !errors.Is(err, io.EOF) {
				dst.Close()
				return fmt.Errorf("merge diff snapshot: %w", err)
			}
			if err != nil {
				break
			}
		}
		off = hole
	}
	if err := dst.Sync(); err != nil {
		dst.Close()
		return err
	}
	return dst.Close()
}
