package main

import (
	"context"
	"fmt"
	"net"

	"github.com/lbctl/lbctl/pkg/dataplane"
	"github.com/lbctl/lbctl/pkg/metrics"
)

var metricsCmd = command{
	name:    "metrics",
	summary: "serve the BPF counters on /metrics without a daemon (origin-NAT backends); lbctl run serves metrics.listen itself",
	run:     runMetrics,
}

// openReader opens the pinned state for reading, without the state lock
// (a running daemon holds it); dataplane.ErrNoState if there is none.
func openReader(e *env) (*dataplane.Dataplane, error) {
	return dataplane.Open(dataplane.Options{Root: e.bpffs, Log: e.log, NoCreate: true, ReadOnly: true})
}

func runMetrics(ctx context.Context, e *env, args []string) error {
	fs := newFlags("metrics", e.stderr)
	listen := fs.String("listen", "127.0.0.1:9100", "address:port to serve /metrics on")
	pos, err := parseFlags(fs, args)
	if err != nil {
		return err
	}
	if len(pos) > 0 {
		return usagef("unexpected argument %q (usage: lbctl metrics [--listen ADDR:PORT])", pos[0])
	}
	ln, err := net.Listen("tcp", *listen)
	if err != nil {
		return fmt.Errorf("listen on %s: %w (pass --listen with a free address)", *listen, err)
	}
	// The state is opened at each scrape: it may appear (attach) or go
	// (last detach) while this runs.
	m := metrics.New(metrics.Sources{BPF: func() (dataplane.Stats, error) {
		dp, err := openReader(e)
		if err != nil {
			return dataplane.Stats{}, err
		}
		defer dp.Close()
		return dp.Stats()
	}, XDP: func() ([]dataplane.XDPServiceState, error) {
		dp, err := openReader(e)
		if err != nil {
			return nil, err
		}
		defer dp.Close()
		return dp.XDPServices()
	}}, e.log)
	fmt.Fprintf(e.stdout, "serving http://%s/metrics\n", ln.Addr())
	return m.Serve(ctx, ln)
}
