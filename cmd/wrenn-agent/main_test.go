package main

import (
	"slices"
	"testing"
)

func TestWithoutRegisterToken(t *testing.T) {
	cases := []struct {
		args, rest []string
		token      string
		found      bool
	}{
		{[]string{"--register", "wrt_x", "--address", "1.2.3.4:5"}, []string{"--address", "1.2.3.4:5"}, "wrt_x", true},
		{[]string{"-register=wrt_y", "--dir", "/d"}, []string{"--dir", "/d"}, "wrt_y", true},
		{[]string{"--dir", "/d"}, []string{"--dir", "/d"}, "", false},
		{[]string{"--register"}, []string{"--register"}, "", false},
		{[]string{"--", "--register", "x"}, []string{"--", "--register", "x"}, "", false},
		{[]string{"--registered", "x"}, []string{"--registered", "x"}, "", false},
	}
	for _, c := range cases {
		rest, token, found := withoutRegisterToken(c.args)
		if !slices.Equal(rest, c.rest) || token != c.token || found != c.found {
			t.Errorf("%q: %q %q %v", c.args, rest, token, found)
		}
	}
}
