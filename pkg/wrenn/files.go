package wrenn

import (
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"io"
	"mime/multipart"
	"net/http"
	"net/url"
	"path"
)

// FileEntry is one directory entry in a capsule.
type FileEntry struct {
	Name          string  `json:"name"`
	Path          string  `json:"path"`
	Type          string  `json:"type"` // file, directory or symlink
	Size          int64   `json:"size"`
	Mode          uint32  `json:"mode"`
	Permissions   string  `json:"permissions"`
	Owner         string  `json:"owner"`
	Group         string  `json:"group"`
	ModifiedAt    int64   `json:"modified_at"`              // Unix seconds
	SymlinkTarget *string `json:"symlink_target,omitempty"` // symlinks only
}

// WriteFile streams r into a file at dest in the capsule (parents are
// made); it is not held in memory on either side.
func (c *Client) WriteFile(ctx context.Context, id, dest string, r io.Reader) error {
	pr, pw := io.Pipe()
	mw := multipart.NewWriter(pw)
	go func() {
		err := mw.WriteField("path", dest)
		if err == nil {
			var part io.Writer
			if part, err = mw.CreateFormFile("file", path.Base(dest)); err == nil {
				if _, err = io.Copy(part, r); err == nil {
					err = mw.Close()
				}
			}
		}
		pw.CloseWithError(err)
	}()
	req, err := c.newRequest(ctx, http.MethodPost, "/v1/capsules/"+url.PathEscape(id)+"/files/stream/write", pr)
	if err != nil {
		pr.Close()
		return err
	}
	req.Header.Set("Content-Type", mw.FormDataContentType())
	resp, err := c.http.Do(req)
	if err != nil {
		return fmt.Errorf("wrenn: upload %s: %w", dest, err)
	}
	defer resp.Body.Close()
	return checkResponse(resp)
}

// ReadFile opens a file in the capsule for streaming; close it when done.
func (c *Client) ReadFile(ctx context.Context, id, src string) (io.ReadCloser, error) {
	body, _ := json.Marshal(map[string]string{"path": src})
	req, err := c.newRequest(ctx, http.MethodPost, "/v1/capsules/"+url.PathEscape(id)+"/files/stream/read", bytes.NewReader(body))
	if err != nil {
		return nil, err
	}
	req.Header.Set("Content-Type", "application/json")
	resp, err := c.http.Do(req)
	if err != nil {
		return nil, fmt.Errorf("wrenn: download %s: %w", src, err)
	}
	if err := checkResponse(resp); err != nil {
		resp.Body.Close()
		return nil, err
	}
	return resp.Body, nil
}

// ListDir lists a directory in the capsule.
func (c *Client) ListDir(ctx context.Context, id, dir string) ([]FileEntry, error) {
	var out struct {
		Entries []FileEntry `json:"entries"`
	}
	err := c.do(ctx, http.MethodPost, "/v1/capsules/"+url.PathEscape(id)+"/files/list", map[string]string{"path": dir}, &out)
	return out.Entries, err
}

// MakeDir creates a directory (and its parents) in the capsule.
func (c *Client) MakeDir(ctx context.Context, id, dir string) error {
	return c.do(ctx, http.MethodPost, "/v1/capsules/"+url.PathEscape(id)+"/files/mkdir", map[string]string{"path": dir}, nil)
}

// Remove deletes a file or a directory tree in the capsule.
func (c *Client) Remove(ctx context.Context, id, p string) error {
	return c.do(ctx, http.MethodPost, "/v1/capsules/"+url.PathEscape(id)+"/files/remove", map[string]string{"path": p}, nil)
}
