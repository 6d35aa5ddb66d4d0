package main

import (
	"context"
	"net/netip"
	"runtime"

	"github.com/lbctl/lbctl/test/topo"
)

// nginxScenario is the seed's standard proxy: nginx's stream module
// (Debian's libnginx-mod-stream) on the LB, one worker per core,
// `listen 53 udp; proxy_responses 1; proxy_timeout 1s;` for DNS over IPv4
// and IPv6, and a stream TCP proxy on port 80 for the HTTP lines (L4, as
// lbctl is). Upstreams see the LB's address.
var nginxScenario = scenario{
	name: "nginx",
	run: func(ctx context.Context, e *env) ([]result, error) {
		n := len(e.topo.Backends)
		p, err := e.startNginx(ctx, "nginx-proxy", nginxConfig{
			Workers: runtime.NumCPU(),
			Servers: []nginxServer{
				{Name: "dns4", Listen: netip.AddrPortFrom(topo.VIP4, 53), UDP: true, Upstreams: seedUpstreams(n, false, 53)},
				{Name: "dns6", Listen: netip.AddrPortFrom(topo.VIP6, 53), UDP: true, Upstreams: seedUpstreams(n, true, 53)},
				{Name: "web4", Listen: netip.AddrPortFrom(topo.VIP4, 80), Upstreams: seedUpstreams(n, false, 80)},
			},
		})
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
			e.dnsStep(pNginx, lDNS4, topo.VIP4),
			e.dnsStep(pNginx, lDNS6, topo.VIP6),
			e.httpStep(pNginx, lHTTPKeep, false, topo.VIP4),
			e.httpStep(pNginx, lHTTPNew, true, topo.VIP4),
		)
	},
}
