package sandbox

import (
	"fmt"
	"slices"
	"strconv"
	"strings"

	"github.com/wrenn/wrenn/internal/guest/template"
)

// specItem is one "name:n:n..." item of an agent flag such as
// --warm-pools or --memory-templates.
type specItem struct {
	raw  string
	name string
	nums []int
}

// parseSpecList splits a comma-separated list of "name:n:..." items,
// each with one of the given numbers of counts after the template name
// (what describes the form in errors). Counts are whole numbers ≥ 0;
// callers check their own ranges. "" is no items.
func parseSpecList(s, what string, counts ...int) ([]specItem, error) {
	var out []specItem
	for _, raw := range strings.Split(s, ",") {
		raw = strings.TrimSpace(raw)
		if raw == "" {
			continue
		}
		parts := strings.Split(raw, ":")
		if !slices.Contains(counts, len(parts)-1) {
			return nil, fmt.Errorf("%q: want %s", raw, what)
		}
		if err := template.ValidateName(parts[0]); err != nil {
			return nil, fmt.Errorf("%q: %w", raw, err)
		}
		item := specItem{raw: raw, name: parts[0], nums: make([]int, len(parts)-1)}
		for i, p := range parts[1:] {
			n, err := strconv.Atoi(p)
			if err != nil || n < 0 {
				return nil, fmt.Errorf("%q: %q is not a whole number", raw, p)
			}
			item.nums[i] = n
		}
		out = append(out, item)
	}
	return out, nil
}
