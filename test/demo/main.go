// Command demo is `make demo`: the seed's setup on the namespace topology of
// test/topo, with lbctl as the load balancer. It starts four demo backends
// (test/backend dev1..dev4: HTTP on :80, DNS on :53), then shows
//
//  1. proxy mode (`lbctl run`, mode: proxy): the blog's curl and dig loops,
//     the four answers rotating, every backend seeing the LB's address;
//  2. Direct Server Return with router NAT (mode: dsr, dsr: {nat: router}):
//     lbctl forwards each DNS query with the client's address, the backend
//     answers the client directly through the LB, which rewrites the answer's
//     source to the VIP (snat, TC egress);
//  3. DSR with origin NAT (dsr: {nat: origin}): each backend rewrites its own
//     answers (`lbctl attach`, `lbctl snat add --vip-from`), and the answers
//     take the backends' public side, bypassing the LB;
//
// IPv4 and IPv6, each answer printed like the seed's dig loop together with
// the server dig got it from: dig accepts only answers from the address it
// asked, so every DSR answer shown came from the VIP. The demo checks what
// it shows and exits 1 if something is off.
//
// --hold keeps the topology (origin NAT running) up until Ctrl-C. The
// namespaces, processes and bpffs mounts are removed on every exit path,
// Ctrl-C included. It needs root, like the tests.
package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"io"
	"os"
	"os/exec"
	"os/signal"
	"path/filepath"
	"syscall"
)

func main() {
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	code := runMain(ctx, os.Args[1:], os.Stdout, os.Stderr)
	stop()
	os.Exit(code)
}

func runMain(ctx context.Context, args []string, stdout, stderr io.Writer) int {
	fs := flag.NewFlagSet("demo", flag.ContinueOnError)
	fs.SetOutput(stderr)
	var o options
	fs.StringVar(&o.lbctl, "lbctl", "bin/lbctl", "the lbctl binary (built with go build into a temp dir if missing)")
	fs.StringVar(&o.backend, "backend", "", "the test/backend binary (default: built with go build into a temp dir)")
	fs.BoolVar(&o.hold, "hold", false, "keep the topology up after the demo until Ctrl-C")
	if err := fs.Parse(args); err != nil {
		if errors.Is(err, flag.ErrHelp) {
			return 0
		}
		return 2
	}
	if fs.NArg() > 0 {
		fmt.Fprintf(stderr, "demo: unexpected argument %q (usage: demo [--hold] [--lbctl PATH] [--backend PATH])\n", fs.Arg(0))
		return 2
	}
	if os.Geteuid() != 0 {
		fmt.Fprintln(stderr, "demo: needs root (network namespaces, BPF): run it as root, e.g. sudo make demo")
		return 1
	}
	o.out = stdout
	tmp, err := os.MkdirTemp("", "lbctl-demo-")
	if err != nil {
		fmt.Fprintf(stderr, "demo: %v\n", err)
		return 1
	}
	defer os.RemoveAll(tmp)
	o.dir = tmp
	if err := buildMissing(&o); err != nil {
		fmt.Fprintf(stderr, "demo: %v\n", err)
		return 1
	}
	err = run(ctx, o)
	switch {
	case err == nil:
		return 0
	case ctx.Err() != nil:
		fmt.Fprintln(stderr, "demo: interrupted; everything it started is removed")
		return 130
	default:
		fmt.Fprintf(stderr, "demo: %v\n", err)
		return 1
	}
}

// buildMissing builds lbctl (if o.lbctl does not exist) and the backend
// (if not given) into o.dir with `go build`.
func buildMissing(o *options) error {
	build := func(pkg, name string) (string, error) {
		out := filepath.Join(o.dir, name)
		cmd := exec.Command("go", "build", "-o", out, pkg)
		cmd.Env = append(os.Environ(), "CGO_ENABLED=0")
		if b, err := cmd.CombinedOutput(); err != nil {
			return "", fmt.Errorf("go build %s: %w: %s", pkg, err, b)
		}
		return out, nil
	}
	var err error
	if _, statErr := os.Stat(o.lbctl); o.lbctl == "" || statErr != nil {
		if o.lbctl, err = build("github.com/lbctl/lbctl/cmd/lbctl", "lbctl"); err != nil {
			return err
		}
	}
	if o.lbctl, err = filepath.Abs(o.lbctl); err != nil {
		return err
	}
	if o.backend == "" {
		if o.backend, err = build("github.com/lbctl/lbctl/test/backend", "backend"); err != nil {
			return err
		}
	}
	o.backend, err = filepath.Abs(o.backend)
	return err
}
