package main

import (
	"context"

	"github.com/lbctl/lbctl/test/topo"
)

var transparentOptions = lbctlOptions{mode: "transparent", dns4: true, web4: true}

// lbctlTransparentScenario is `lbctl run` with mode transparent (IPv4 DNS
// and HTTP, like the nginx transparent lines): lbctl sets up its return
// steering and policy routing itself and removes them at exit; nothing
// else is configured on the LB.
var lbctlTransparentScenario = scenario{
	name:  "lbctl-transparent",
	needs: func(ctx context.Context, e *env) string { return e.lbctlSupports(ctx, transparentOptions) },
	run: func(ctx context.Context, e *env) ([]result, error) {
		p, err := e.startLbctl("lbctl-transparent", transparentOptions)
		if err != nil {
			return nil, err
		}
		if err := e.waitDNS(ctx, []*proc{p}, topo.VIP4); err != nil {
			return nil, err
		}
		// Transparent for real: the backend sees the client's address.
		if err := e.waitHTTPFrom(ctx, []*proc{p}, topo.Client4, topo.VIP4); err != nil {
			return nil, err
		}
		return measureLines(ctx,
			e.dnsStep(pTransparent, lDNS4, topo.VIP4),
			e.httpStep(pTransparent, lHTTPKeep, false, topo.VIP4),
			e.httpStep(pTransparent, lHTTPNew, true, topo.VIP4),
		)
	},
}
