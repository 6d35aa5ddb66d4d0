package main

import (
	"context"

	"github.com/lbctl/lbctl/test/topo"
)

var proxyOptions = lbctlOptions{mode: "proxy", dns4: true, dns6: true, web4: true}

// lbctlProxyScenario is `lbctl run` with mode proxy: the same services,
// upstreams and UDP session rules (responses 1, timeout 1s) as the nginx
// standard proxy lines.
var lbctlProxyScenario = scenario{
	name:  "lbctl-proxy",
	needs: func(ctx context.Context, e *env) string { return e.lbctlSupports(ctx, proxyOptions) },
	run: func(ctx context.Context, e *env) ([]result, error) {
		p, err := e.startLbctl("lbctl-proxy", proxyOptions)
		if err != nil {
			return nil, err
		}
		if err := e.waitDNS(ctx, []*proc{p}, topo.VIP4, topo.VIP6); err != nil {
			return nil, err
		}
		if err := e.waitHTTP(ctx, []*proc{p}, topo.VIP4); err != nil {
			return nil, err
		}
		return measureLines(ctx,
			e.dnsStep(pProxy, lDNS4, topo.VIP4),
			e.dnsStep(pProxy, lDNS6, topo.VIP6),
			e.httpStep(pProxy, lHTTPKeep, false, topo.VIP4),
			e.httpStep(pProxy, lHTTPNew, true, topo.VIP4),
		)
	},
}
