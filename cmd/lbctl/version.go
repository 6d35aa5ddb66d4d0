package main

import (
	"context"
	"fmt"
	"runtime"
	"runtime/debug"
)

// version is set at build time with -ldflags "-X main.version=...".
var version = "dev"

var versionCmd = command{
	name:    "version",
	summary: "print the lbctl version",
	run: func(ctx context.Context, e *env, args []string) error {
		fs := newFlags("version", e.stderr)
		if _, err := parseFlags(fs, args); err != nil {
			return err
		}
		rev := ""
		if bi, ok := debug.ReadBuildInfo(); ok {
			for _, s := range bi.Settings {
				if s.Key == "vcs.revision" {
					rev = " " + s.Value
				}
			}
		}
		fmt.Fprintf(e.stdout, "lbctl %s%s %s/%s %s\n", version, rev, runtime.GOOS, runtime.GOARCH, runtime.Version())
		return nil
	},
}
