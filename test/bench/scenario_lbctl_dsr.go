package main

import (
	"context"
	"fmt"
	"net/netip"
	"time"

	"github.com/lbctl/lbctl/test/topo"
)

var (
	dsrRouterOptions = lbctlOptions{mode: "dsr", nat: "router", dns4: true, dns6: true}
	dsrOriginOptions = lbctlOptions{mode: "dsr", nat: "origin", dns4: true, dns6: true}
)

// healthSettle is how long dsr/xdp services get after the first answer for
// their active checks to mark every upstream up (rise 2, interval 1s).
const healthSettle = 3 * time.Second

// lbctlDSRRouterScenario is `lbctl run` with mode dsr and router NAT: the
// LB sends each query from the client's address:port, the backends answer
// through the LB (their default route), whose snat program rewrites the
// answers to come from the VIP.
var lbctlDSRRouterScenario = scenario{
	name:  "lbctl-dsr-router",
	needs: func(ctx context.Context, e *env) string { return e.lbctlSupports(ctx, dsrRouterOptions) },
	run: func(ctx context.Context, e *env) ([]result, error) {
		return e.runDSR(ctx, "lbctl-dsr-router", pDSRRouter, dsrRouterOptions)
	},
}

// lbctlDSROriginScenario is mode dsr with origin NAT: each backend gets a
// route to the client network over its public side (eth1, through the
// router, bypassing the LB), `lbctl attach eth1` and one `lbctl snat add`
// per family rewriting its answers to the VIP; the LB only sends.
var lbctlDSROriginScenario = scenario{
	name:  "lbctl-dsr-origin",
	needs: func(ctx context.Context, e *env) string { return e.lbctlSupports(ctx, dsrOriginOptions) },
	run: func(ctx context.Context, e *env) ([]result, error) {
		if err := e.originNAT(ctx); err != nil {
			return nil, err
		}
		return e.runDSR(ctx, "lbctl-dsr-origin", pDSROrigin, dsrOriginOptions)
	},
}

func (e *env) runDSR(ctx context.Context, name, path string, o lbctlOptions) ([]result, error) {
	p, err := e.startLbctl(name, o)
	if err != nil {
		return nil, err
	}
	if err := e.waitDNS(ctx, []*proc{p}, topo.VIP4, topo.VIP6); err != nil {
		return nil, err
	}
	select {
	case <-ctx.Done():
		return nil, ctx.Err()
	case <-time.After(healthSettle):
	}
	return measureLines(ctx,
		e.dnsStep(path, lDNS4, topo.VIP4),
		e.dnsStep(path, lDNS6, topo.VIP6),
	)
}

// originNAT sets up origin NAT on every backend until the scenario's
// cleanup: the public-side route to the client network, lbctl attach on
// eth1 and the snat rules (source backend:53 -> VIP:53, both families).
func (e *env) originNAT(ctx context.Context) error {
	for i, b := range e.topo.Backends {
		n := i + 1
		routes := [][]string{
			{"ip", "-4", "route", "add", "198.18.99.0/24", "via", "198.18.100.254", "dev", "eth1"},
			{"ip", "-6", "route", "add", "2001:db8:99::/64", "via", "2001:db8:100::254", "dev", "eth1"},
		}
		for _, c := range routes {
			if _, err := e.run(ctx, b, c[0], c[1:]...); err != nil {
				return err
			}
			e.addCleanup(func() {
				u := undoRule(c)
				_, _ = e.run(context.Background(), b, u[0], u[1:]...)
			})
		}
		lb := []string{"--bpffs", b.BPFFS}
		if _, err := e.run(ctx, b, e.lbctl, append(lb, "attach", "eth1")...); err != nil {
			return err
		}
		e.addCleanup(func() { _, _ = e.run(context.Background(), b, e.lbctl, append(lb, "detach", "eth1")...) })
		for _, r := range []struct{ src, to string }{
			{netip.PrefixFrom(topo.Backend4(n), 32).String(), netip.AddrPortFrom(topo.VIP4, 53).String()},
			{netip.PrefixFrom(topo.Backend6(n), 128).String(), netip.AddrPortFrom(topo.VIP6, 53).String()},
		} {
			if _, err := e.run(ctx, b, e.lbctl, append(lb, "snat", "add", "--src", r.src, "--proto", "udp", "--sport", "53", "--to", r.to)...); err != nil {
				return fmt.Errorf("origin NAT on %s: %w", b.Role, err)
			}
		}
	}
	return nil
}
