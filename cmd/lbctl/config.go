package main

import (
	"context"
	"errors"
	"fmt"

	"github.com/lbctl/lbctl/pkg/config"
)

var configCmd = command{
	name:    "config",
	summary: "check a config file without running it (config check -c FILE)",
	run:     runConfig,
}

const configUsage = "usage: lbctl config check -c FILE"

// runConfig dispatches the config verbs; only check exists.
func runConfig(ctx context.Context, e *env, args []string) error {
	if len(args) == 0 {
		return usagef("missing verb (%s)", configUsage)
	}
	switch args[0] {
	case "check":
		return runConfigCheck(e, args[1:])
	case "-h", "-help", "--help":
		fmt.Fprintln(e.stdout, configUsage)
		return nil
	default:
		return usagef("unknown verb %q (%s)", args[0], configUsage)
	}
}

// runConfigCheck validates a file like nginx -t: "FILE: ok (N services)" on
// stdout, or every problem on stderr, one per line, and exit status 1.
func runConfigCheck(e *env, args []string) error {
	fs := newFlags("config check", e.stderr)
	file := fs.String("c", "", "config file to check")
	pos, err := parseFlags(fs, args)
	if err != nil {
		return err
	}
	if len(pos) > 0 {
		return usagef("unexpected argument %q (%s)", pos[0], configUsage)
	}
	if *file == "" {
		return usagef("-c FILE is required (%s)", configUsage)
	}
	cfg, err := config.Load(*file)
	var ce *config.Error
	switch {
	case errors.As(err, &ce):
		for _, p := range ce.Problems {
			fmt.Fprintln(e.stderr, p)
		}
		return fmt.Errorf("%s: %d %s", *file, len(ce.Problems), plural(len(ce.Problems), "problem", "problems"))
	case err != nil:
		return err
	}
	fmt.Fprintf(e.stdout, "%s: ok (%d %s)\n", *file, len(cfg.Services), plural(len(cfg.Services), "service", "services"))
	return nil
}

func plural(n int, one, many string) string {
	if n == 1 {
		return one
	}
	return many
}
