// Package buildarchive reads the archive uploaded with a template build
// (tar, tar.gz or zip, told apart by their first bytes as upstream Wrenn
// does) and rewrites it as one plain tar for the build capsule to unpack,
// with every name checked to stay inside the unpacking directory and the
// unpacked size bounded.
package buildarchive

import (
	"archive/tar"
	"archive/zip"
	"bytes"
	"compress/gzip"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"path"
	"strings"
	"time"
)

// Limits on what one archive may unpack to.
const (
	MaxFiles = 100_000
	MaxBytes = 4 << 30
)

// Format names an archive's kind.
func Format(data []byte) string {
	switch {
	case len(data) >= 2 && data[0] == 0x1f && data[1] == 0x8b:
		return "tar.gz"
	case len(data) >= 4 && string(data[:4]) == "PK\x03\x04":
		return "zip"
	case len(data) >= 262 && string(data[257:262]) == "ustar":
		return "tar"
	}
	return ""
}

// Summary is what an archive holds.
type Summary struct {
	Format string
	Files  int
	Bytes  int64
}

// Check reads the whole archive without keeping it, so a bad upload is
// refused when it is submitted rather than when its build runs.
func Check(data []byte) (Summary, error) {
	return Tar(data, io.Discard)
}

// Tar writes the archive's directories, regular files and symbolic links
// as a tar stream to w (other entry kinds are skipped).
func Tar(data []byte, w io.Writer) (Summary, error) {
	sum := Summary{Format: Format(data)}
	tw := tar.NewWriter(w)
	add := func(name string, mode fs.FileMode, mtime time.Time, link string, size int64, body io.Reader) error {
		clean, err := cleanName(name)
		if err != nil || clean == "" {
			return err
		}
		sum.Files++
		sum.Bytes += size
		if sum.Files > MaxFiles || sum.Bytes > MaxBytes {
			return fmt.Errorf("the archive unpacks to more than %d files or %d GiB", MaxFiles, MaxBytes>>30)
		}
		hdr := &tar.Header{Name: clean, Mode: int64(mode.Perm()), ModTime: mtime, Format: tar.FormatPAX}
		switch {
		case mode.IsDir():
			hdr.Typeflag, hdr.Name = tar.TypeDir, clean+"/"
		case mode&fs.ModeSymlink != 0:
			hdr.Typeflag, hdr.Linkname = tar.TypeSymlink, link
		default:
			hdr.Typeflag, hdr.Size = tar.TypeReg, size
		}
		if err := tw.WriteHeader(hdr); err != nil {
			return err
		}
		if hdr.Typeflag == tar.TypeReg {
			if n, err := io.Copy(tw, io.LimitReader(body, size)); err != nil || n != size {
				return fmt.Errorf("%s: the archive ends inside the file", clean)
			}
		}
		return nil
	}
	var err error
	switch sum.Format {
	case "zip":
		err = fromZip(data, add)
	case "tar.gz":
		var gz *gzip.Reader
		if gz, err = gzip.NewReader(bytes.NewReader(data)); err == nil {
			err = fromTar(gz, add)
		}
	case "tar":
		err = fromTar(bytes.NewReader(data), add)
	default:
		return sum, errors.New("the archive must be a tar, tar.gz or zip file")
	}
	if err != nil {
		return sum, fmt.Errorf("archive (%s): %w", sum.Format, err)
	}
	return sum, tw.Close()
}

type addFunc func(name string, mode fs.FileMode, mtime time.Time, link string, size int64, body io.Reader) error

func fromTar(r io.Reader, add addFunc) error {
	tr := tar.NewReader(r)
	for {
		h, err := tr.Next()
		if err == io.EOF {
			return nil
		}
		if err != nil {
			return err
		}
		switch h.Typeflag {
		case tar.TypeDir, tar.TypeSymlink, tar.TypeReg:
			if err := add(h.Name, h.FileInfo().Mode(), h.ModTime, h.Linkname, h.Size, tr); err != nil {
				return err
			}
		}
	}
}

func fromZip(data []byte, add addFunc) error {
	zr, err := zip.NewReader(bytes.NewReader(data), int64(len(data)))
	if err != nil {
		return err
	}
	for _, f := range zr.File {
		mode := f.Mode()
		if !mode.IsDir() && !mode.IsRegular() && mode&fs.ModeSymlink == 0 {
			continue
		}
		rc, err := f.Open()
		if err != nil {
			return fmt.Errorf("%s: %w", f.Name, err)
		}
		link, size := "", int64(f.UncompressedSize64)
		if mode&fs.ModeSymlink != 0 {
			target, err := io.ReadAll(io.LimitReader(rc, 4096))
			if err != nil {
				rc.Close()
				return fmt.Errorf("%s: %w", f.Name, err)
			}
			link, size = string(target), 0
		}
		if mode.IsDir() {
			size = 0
		}
		err = add(f.Name, mode, f.Modified, link, size, rc)
		rc.Close()
		if err != nil {
			return err
		}
	}
	return nil
}

// cleanName makes an entry's name relative and refuses one that climbs
// out ("" is the archive's root itself, skipped).
func cleanName(name string) (string, error) {
	slashed := path.Clean(strings.ReplaceAll(name, "\\", "/"))
	if strings.Contains(name, "\x00") || strings.HasPrefix(slashed, "../") || slashed == ".." {
		return "", fmt.Errorf("entry %q points outside the archive", name)
	}
	return strings.TrimPrefix(path.Clean("/"+slashed), "/"), nil
}
