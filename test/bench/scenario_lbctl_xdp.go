package main

import (
	"context"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"time"

	"go.uber.org/zap"

	"github.com/lbctl/lbctl/test/topo"
)

var xdpOptions = lbctlOptions{mode: "xdp", nat: "router", dns4: true, dns6: true, web4: true}

// lbctlXDPNativeScenario and lbctlXDPGenericScenario are `lbctl run` with
// mode xdp and router NAT: xdp_lb on the LB's client-facing interface
// (eth0) rewrites each packet's destination to a backend (Maglev), the
// backends answer through the LB whose snat program rewrites the source
// to the VIP. No socket in user space; the backends see the client's
// address. lbctl run attaches natively where the driver can (veth can)
// and has no setting to force generic mode, so the generic line re-attaches
// the running daemon's xdp_lb with `lbctl attach eth0 --xdp --xdp-mode
// generic` (same pinned maps, the program moves to the generic hook). The
// mode in use is read back from the pinned links, which must show exactly
// that one mode, and labels the line.
var (
	lbctlXDPNativeScenario = scenario{
		name:  "lbctl-xdp-native",
		needs: func(ctx context.Context, e *env) string { return e.lbctlSupports(ctx, xdpOptions) },
		run:   func(ctx context.Context, e *env) ([]result, error) { return e.runXDP(ctx, "native") },
	}
	lbctlXDPGenericScenario = scenario{
		name:  "lbctl-xdp-generic",
		needs: func(ctx context.Context, e *env) string { return e.lbctlSupports(ctx, xdpOptions) },
		run:   func(ctx context.Context, e *env) ([]result, error) { return e.runXDP(ctx, "generic") },
	}
)

func (e *env) runXDP(ctx context.Context, want string) ([]result, error) {
	lb := e.topo.LB
	global := []string{"--bpffs", lb.BPFFS}
	// xdp_lb outlives lbctl run (forwarding survives the daemon): detach
	// it after the daemon has stopped (cleanups run last-in first-out).
	e.addCleanup(func() { _, _ = e.run(context.Background(), lb, e.lbctl, append(global, "detach", "eth0")...) })
	p, err := e.startLbctl("lbctl-xdp-"+want, xdpOptions)
	if err != nil {
		return nil, err
	}
	if err := e.waitDNS(ctx, []*proc{p}, topo.VIP4, topo.VIP6); err != nil {
		return nil, err
	}
	// XDP keeps the client's source: the backend must see the client.
	if err := e.waitHTTPFrom(ctx, []*proc{p}, topo.Client4, topo.VIP4); err != nil {
		return nil, err
	}
	select {
	case <-ctx.Done():
		return nil, ctx.Err()
	case <-time.After(healthSettle):
	}
	// Every service has started (each attaches xdp_lb as it starts), so
	// the program now stays where it is moved.
	if want == "generic" {
		out, err := e.run(ctx, lb, e.lbctl, append(global, "attach", "eth0", "--xdp", "--xdp-mode", "generic")...)
		if err != nil {
			return nil, err
		}
		e.log.Info("xdp_lb re-attached in generic mode", zap.String("lbctl", strings.TrimSpace(out)))
		if err := e.waitDNS(ctx, []*proc{p}, topo.VIP4, topo.VIP6); err != nil {
			return nil, err
		}
	}
	path := map[string]string{"native": pXDPNative, "generic": pXDPGeneric}
	var modes []string
	for _, m := range []string{"native", "generic"} {
		if _, err := os.Stat(filepath.Join(lb.BPFFS, "lbctl", "links", "eth0", "xdp_"+m)); err == nil {
			modes = append(modes, m)
		}
	}
	if len(modes) != 1 || modes[0] != want {
		link, _ := e.run(ctx, lb, "ip", "-d", "link", "show", "dev", "eth0")
		return nil, fmt.Errorf("xdp_lb is attached in mode(s) %v, want %s only:\n%s", modes, want, link)
	}
	got := modes[0]
	return measureLines(ctx,
		e.dnsStep(path[got], lDNS4, topo.VIP4),
		e.dnsStep(path[got], lDNS6, topo.VIP6),
		e.httpStep(path[got], lHTTPKeep, false, topo.VIP4),
		e.httpStep(path[got], lHTTPNew, true, topo.VIP4),
	)
}
