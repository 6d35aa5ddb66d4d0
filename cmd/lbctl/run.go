package main

import (
	"context"

	"github.com/lbctl/lbctl/pkg/daemon"
)

var runCmd = command{
	name:    "run",
	summary: "run the services of a config in the foreground (run -c FILE); SIGHUP reloads, SIGTERM drains",
	run:     runRun,
}

const runUsage = "usage: lbctl run -c FILE [--pprof]"

// runRun runs the daemon until SIGTERM/SIGINT (ctx), then returns after the
// drain: exit status 0.
func runRun(ctx context.Context, e *env, args []string) error {
	fs := newFlags("run", e.stderr)
	file := fs.String("c", "", "config file (see docs/config.md)")
	prof := fs.Bool("pprof", envOr("LBCTL_PPROF", "") == "1", "serve Go profiles under /debug/pprof/ on the control socket (env LBCTL_PPROF=1; docs/operations.md)")
	pos, err := parseFlags(fs, args)
	if err != nil {
		return err
	}
	if len(pos) > 0 {
		return usagef("unexpected argument %q (%s)", pos[0], runUsage)
	}
	if *file == "" {
		return usagef("-c FILE is required (%s)", runUsage)
	}
	opts := daemon.Options{ConfigPath: *file, BPFFS: e.bpffs, LogTo: e.stderr, Pprof: *prof}
	if e.logFlags {
		opts.Log = e.log // --log-level/--log-format win over the file's log block
	}
	return daemon.Run(ctx, opts)
}
