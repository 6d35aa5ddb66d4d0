package main

import (
	"context"
	"net/netip"
	"runtime"
	"strings"

	"github.com/lbctl/lbctl/test/topo"
)

// nginxTransparentRules is the seed's Method 1 set-up on the LB, exactly
// as the blog gives it (with the test topology's addresses): mark the
// backends' replies, route marked packets to local delivery.
var nginxTransparentRules = [][]string{
	{"iptables", "-t", "mangle", "-A", "PREROUTING", "-p", "tcp", "-s", "198.19.16.0/28", "--sport", "80", "-j", "MARK", "--set-xmark", "0x1/0xffffffff"},
	{"iptables", "-t", "mangle", "-A", "PREROUTING", "-p", "udp", "-s", "198.19.16.0/28", "--sport", "53", "-j", "MARK", "--set-xmark", "0x1/0xffffffff"},
	{"ip", "rule", "add", "fwmark", "1", "lookup", "100"},
	{"ip", "route", "add", "local", "0.0.0.0/0", "dev", "lo", "table", "100"},
}

// undoRule turns a set-up command of nginxTransparentRules into its removal.
func undoRule(c []string) []string {
	u := append([]string(nil), c...)
	for i, a := range u {
		switch a {
		case "-A":
			u[i] = "-D"
			return u
		case "add":
			u[i] = "del"
			return u
		}
	}
	return u
}

// nginxTransparentScenario is nginx with `proxy_bind $remote_addr
// transparent` (workers as root) and the blog's iptables mangle MARK +
// `ip rule fwmark 1 lookup 100` + `ip route add local 0.0.0.0/0 dev lo
// table 100`, all inside the LB namespace; the backends' default route is
// the LB already. IPv4, like the blog.
var nginxTransparentScenario = scenario{
	name: "nginx-transparent",
	run: func(ctx context.Context, e *env) ([]result, error) {
		lb := e.topo.LB
		for _, c := range nginxTransparentRules {
			if _, err := e.run(ctx, lb, c[0], c[1:]...); err != nil {
				return nil, err
			}
			e.addCleanup(func() {
				u := undoRule(c)
				_, _ = e.run(context.Background(), lb, u[0], u[1:]...)
			})
		}
		// The seed's troubleshooting: strict reverse-path filtering drops
		// replies addressed to the client arriving from the backend side.
		for _, key := range []string{"net.ipv4.conf.all.rp_filter", "net.ipv4.conf.eth1.rp_filter"} {
			old, err := e.run(ctx, lb, "sysctl", "-n", key)
			if err != nil {
				return nil, err
			}
			if old = strings.TrimSpace(old); old == "1" {
				if _, err := e.run(ctx, lb, "sysctl", "-qw", key+"=0"); err != nil {
					return nil, err
				}
				e.addCleanup(func() { _, _ = e.run(context.Background(), lb, "sysctl", "-qw", key+"="+old) })
			}
		}
		n := len(e.topo.Backends)
		p, err := e.startNginx(ctx, "nginx-transparent", nginxConfig{
			Workers:     runtime.NumCPU(),
			Transparent: true,
			Servers: []nginxServer{
				{Name: "dns4", Listen: netip.AddrPortFrom(topo.VIP4, 53), UDP: true, Upstreams: seedUpstreams(n, false, 53)},
				{Name: "web4", Listen: netip.AddrPortFrom(topo.VIP4, 80), Upstreams: seedUpstreams(n, false, 80)},
			},
		})
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
			e.dnsStep(pNginxTransp, lDNS4, topo.VIP4),
			e.httpStep(pNginxTransp, lHTTPKeep, false, topo.VIP4),
			e.httpStep(pNginxTransp, lHTTPNew, true, topo.VIP4),
		)
	},
}
