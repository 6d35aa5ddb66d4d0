package main

import (
	"context"
	"strings"
	"time"

	"github.com/lbctl/lbctl/test/topo"
)

var xdpOptions = lbctlOptions{mode: "xdp", nat: "router", dns4: true, dns6: true, web4: true}

// lbctlXDPScenario is `lbctl run` with mode xdp and router NAT: xdp_lb on
// the LB's client-facing interface rewrites each packet's destination to a
// backend (Maglev), the backends answer through the LB whose snat program
// rewrites the source to the VIP. No socket in user space; the backends
// see the client's address. The path says which attach mode lbctl chose
// (from `lbctl status`): native on veth, generic otherwise.
var lbctlXDPScenario = scenario{
	name:  "lbctl-xdp",
	needs: func(ctx context.Context, e *env) string { return e.lbctlSupports(ctx, xdpOptions) },
	run: func(ctx context.Context, e *env) ([]result, error) {
		p, err := e.startLbctl("lbctl-xdp", xdpOptions)
		if err != nil {
			return nil, err
		}
		if err := e.waitDNS(ctx, []*proc{p}, topo.VIP4, topo.VIP6); err != nil {
			return nil, err
		}
		if err := e.waitHTTPFrom(ctx, []*proc{p}, topo.Client4, topo.VIP4); err != nil {
			return nil, err
		}
		select {
		case <-ctx.Done():
			return nil, ctx.Err()
		case <-time.After(healthSettle):
		}
		path := pXDPNative
		status, _ := e.run(ctx, e.topo.LB, e.lbctl, "--bpffs", e.topo.LB.BPFFS, "status")
		if f, ferr := e.logFile("lbctl-xdp-status"); ferr == nil {
			_, _ = f.WriteString(status)
			f.Close()
		}
		if strings.Contains(status, "generic") && !strings.Contains(status, "native") {
			path = pXDPGeneric
		}
		return measureLines(ctx,
			e.dnsStep(path, lDNS4, topo.VIP4),
			e.dnsStep(path, lDNS6, topo.VIP6),
			e.httpStep(path, lHTTPKeep, false, topo.VIP4),
			e.httpStep(path, lHTTPNew, true, topo.VIP4),
		)
	},
}
