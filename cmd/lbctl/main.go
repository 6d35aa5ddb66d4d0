// Command lbctl is the CLI of the lbctl data plane: it parses flags, calls
// into pkg/* and prints. Every action lives in a package under pkg/.
package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"io"
	"os"
	"os/signal"
	"sort"
	"strings"
	"syscall"

	"go.uber.org/zap"
	"go.uber.org/zap/zapcore"
)

// command is one subcommand of lbctl. Each lives in its own file
// (attach.go, snat.go, ...) and is listed in commands below.
type command struct {
	name    string
	summary string
	run     func(ctx context.Context, e *env, args []string) error
}

// commands lists every subcommand; add a new one here.
func commands() []command {
	return []command{
		versionCmd,
		runCmd,
		configCmd,
		attachCmd,
		detachCmd,
		snatCmd,
		statsCmd,
		doctorCmd,
		metricsCmd,
		statusCmd,
		traceCmd,
	}
}

// env carries what every subcommand needs: output streams, the logger and
// the global flags. Nothing in it is global state.
type env struct {
	stdout io.Writer
	stderr io.Writer
	log    *zap.Logger
	// bpffs is the root under which lbctl pins its state (lbctl/ below it).
	bpffs string
	// logFlags is true when --log-level or --log-format was given (they
	// then win over the config file's log block in lbctl run).
	logFlags bool
}

// usageError marks a command-line mistake: exit status 2.
type usageError struct{ msg string }

func (u usageError) Error() string { return u.msg }

func usagef(format string, args ...any) error {
	return usageError{msg: fmt.Sprintf(format, args...)}
}

func main() {
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	code := run(ctx, os.Args[1:], os.Stdout, os.Stderr)
	stop()
	os.Exit(code)
}

// run executes lbctl with args and returns the exit status: 0 ok, 1 runtime
// error, 2 usage error.
func run(ctx context.Context, args []string, stdout, stderr io.Writer) int {
	global := flag.NewFlagSet("lbctl", flag.ContinueOnError)
	global.SetOutput(io.Discard)
	bpffs := global.String("bpffs", envOr("LBCTL_BPFFS", "/sys/fs/bpf"), "root of the bpffs where lbctl pins its state (env LBCTL_BPFFS)")
	logFormat := global.String("log-format", "console", "log format: console or json")
	logLevel := global.String("log-level", "info", "log level: debug, info, warn, error")
	global.Usage = func() { printUsage(stderr, global) }
	if err := global.Parse(args); err != nil {
		if errors.Is(err, flag.ErrHelp) {
			printUsage(stdout, global)
			return 0
		}
		fmt.Fprintf(stderr, "lbctl: %v\n", err)
		printUsage(stderr, global)
		return 2
	}
	rest := global.Args()
	if len(rest) == 0 {
		printUsage(stderr, global)
		return 2
	}
	log, err := newLogger(*logFormat, *logLevel, stderr)
	if err != nil {
		fmt.Fprintf(stderr, "lbctl: %v\n", err)
		return 2
	}
	defer func() { _ = log.Sync() }()

	e := &env{stdout: stdout, stderr: stderr, log: log, bpffs: *bpffs}
	global.Visit(func(f *flag.Flag) { e.logFlags = e.logFlags || strings.HasPrefix(f.Name, "log-") })
	for _, c := range commands() {
		if c.name != rest[0] {
			continue
		}
		err := c.run(ctx, e, rest[1:])
		switch {
		case err == nil:
			return 0
		case errors.Is(err, flag.ErrHelp):
			return 0
		case errors.As(err, new(usageError)):
			fmt.Fprintf(stderr, "lbctl %s: %v\n", c.name, err)
			return 2
		default:
			fmt.Fprintf(stderr, "lbctl %s: %v\n", c.name, err)
			return 1
		}
	}
	fmt.Fprintf(stderr, "lbctl: unknown command %q\n", rest[0])
	printUsage(stderr, global)
	return 2
}

func printUsage(w io.Writer, global *flag.FlagSet) {
	fmt.Fprintln(w, "usage: lbctl [global flags] COMMAND [flags] [args]")
	fmt.Fprintln(w, "\ncommands:")
	cs := commands()
	sort.Slice(cs, func(i, j int) bool { return cs[i].name < cs[j].name })
	for _, c := range cs {
		fmt.Fprintf(w, "  %-10s %s\n", c.name, c.summary)
	}
	fmt.Fprintln(w, "\nglobal flags:")
	global.SetOutput(w)
	global.PrintDefaults()
	global.SetOutput(io.Discard)
}

// newFlags returns a FlagSet for a subcommand that reports errors as usage
// errors and prints its help to w.
func newFlags(name string, w io.Writer) *flag.FlagSet {
	fs := flag.NewFlagSet("lbctl "+name, flag.ContinueOnError)
	fs.SetOutput(w)
	return fs
}

// parseFlags parses args into fs, turning flag errors into usage errors.
// Flags may follow positional arguments (lbctl attach eth0 --xdp).
func parseFlags(fs *flag.FlagSet, args []string) ([]string, error) {
	var positional []string
	for {
		if err := fs.Parse(args); err != nil {
			if errors.Is(err, flag.ErrHelp) {
				return nil, err
			}
			return nil, usageError{msg: err.Error()}
		}
		args = fs.Args()
		if len(args) == 0 {
			return positional, nil
		}
		if args[0] == "--" {
			return append(positional, args[1:]...), nil
		}
		positional = append(positional, args[0])
		args = args[1:]
	}
}

func newLogger(format, level string, w io.Writer) (*zap.Logger, error) {
	var lvl zapcore.Level
	if err := lvl.UnmarshalText([]byte(level)); err != nil {
		return nil, fmt.Errorf("--log-level %q: want debug, info, warn or error", level)
	}
	encCfg := zap.NewProductionEncoderConfig()
	encCfg.EncodeTime = zapcore.ISO8601TimeEncoder
	var enc zapcore.Encoder
	switch strings.ToLower(format) {
	case "console":
		encCfg.EncodeLevel = zapcore.CapitalLevelEncoder
		enc = zapcore.NewConsoleEncoder(encCfg)
	case "json":
		enc = zapcore.NewJSONEncoder(encCfg)
	default:
		return nil, fmt.Errorf("--log-format %q: want console or json", format)
	}
	core := zapcore.NewCore(enc, zapcore.AddSync(w), lvl)
	return zap.New(core), nil
}

func envOr(key, def string) string {
	if v := os.Getenv(key); v != "" {
		return v
	}
	return def
}
