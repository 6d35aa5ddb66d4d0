package main

import "context"

// routedScenario is the floor any LB in the path can reach: the client
// queries the four backends directly, routed through the LB namespace
// (forwarding on, no proxy, no BPF). The load is split evenly over one
// dnsperf (wrk) per backend, with the same total concurrency as the VIP
// lines.
var routedScenario = scenario{
	name: "routed",
	run: func(ctx context.Context, e *env) ([]result, error) {
		v4, v6 := e.backendAddrs(false), e.backendAddrs(true)
		return measureLines(ctx,
			e.dnsStep(pRouted, lDNS4, v4...),
			e.dnsStep(pRouted, lDNS6, v6...),
			e.httpStep(pRouted, lHTTPKeep, false, v4...),
			e.httpStep(pRouted, lHTTPNew, true, v4...),
		)
	},
}
