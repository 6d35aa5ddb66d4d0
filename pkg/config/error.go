package config

import (
	"fmt"
	"strings"
)

// Problem is one thing wrong with a config file.
type Problem struct {
	File  string
	Line  int    // 1-based; every problem has one
	Field string // path such as services[1].upstreams[2]; "" for the document itself
	Msg   string
}

// String formats the problem as "file:line: field: msg".
func (p Problem) String() string {
	if p.Field == "" {
		return fmt.Sprintf("%s:%d: %s", p.File, p.Line, p.Msg)
	}
	return fmt.Sprintf("%s:%d: %s: %s", p.File, p.Line, p.Field, p.Msg)
}

// Error lists every problem of a config, ordered by line.
type Error struct {
	Problems []Problem
}

// Error returns one problem per line.
func (e *Error) Error() string {
	lines := make([]string, len(e.Problems))
	for i, p := range e.Problems {
		lines[i] = p.String()
	}
	return strings.Join(lines, "\n")
}
