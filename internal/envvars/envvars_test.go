package envvars

import (
	"strings"
	"testing"
)

func TestValidate(t *testing.T) {
	if err := Validate(map[string]string{"PATH": "/bin", "_x1": "", "GREETING": "hello world"}); err != nil {
		t.Fatal(err)
	}
	many := map[string]string{}
	for i := range MaxVars + 1 {
		many["V"+strings.Repeat("x", i)] = ""
	}
	for name, env := range map[string]map[string]string{
		"empty name":    {"": "x"},
		"equals":        {"A=B": "x"},
		"digit first":   {"1A": "x"},
		"dash":          {"MY-VAR": "x"},
		"NUL in value":  {"A": "a\x00b"},
		"long value":    {"A": strings.Repeat("x", MaxValueSize+1)},
		"too many vars": many,
	} {
		if Validate(env) == nil {
			t.Errorf("%s: accepted", name)
		}
	}
}
