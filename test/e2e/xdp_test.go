package e2e

import (
	"bufio"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/netip"
	"os"
	"path/filepath"
	"regexp"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"github.com/lbctl/lbctl/pkg/dataplane"
	"github.com/lbctl/lbctl/test/testenv"
	"github.com/lbctl/lbctl/test/topo"
)

// xdpConfig is DNS (dns4, dns6) and HTTP (web4, web6) through mode xdp on
// the VIP to the four backends, with nat router or origin.
func xdpConfig(nat string) string {
	var b strings.Builder
	b.WriteString("services:\n")
	for _, fam := range dsrFamilies {
		sfx := fam.name[len(fam.name)-1:]
		qtype := "A"
		if fam.vip.Is6() {
			qtype = "AAAA"
		}
		fmt.Fprintf(&b, "  - name: dns%s\n    protocol: udp\n    listen: \"%s\"\n    mode: xdp\n    dsr: {nat: %s}\n",
			sfx, netip.AddrPortFrom(fam.vip, 53), nat)
		fmt.Fprintf(&b, "    health: {type: dns, query: www.example.com, qtype: %s, interval: 1s, timeout: 900ms, fall: 2}\n    upstreams:\n", qtype)
		for i := 1; i <= 4; i++ {
			fmt.Fprintf(&b, "      - \"%s\"\n", netip.AddrPortFrom(fam.backend(i), 53))
		}
		fmt.Fprintf(&b, "  - name: web%s\n    protocol: tcp\n    listen: \"%s\"\n    mode: xdp\n    dsr: {nat: %s}\n",
			sfx, netip.AddrPortFrom(fam.vip, 80), nat)
		b.WriteString("    health: {type: tcp, interval: 1s, timeout: 900ms, fall: 2}\n    upstreams:\n")
		for i := 1; i <= 4; i++ {
			fmt.Fprintf(&b, "      - \"%s\"\n", netip.AddrPortFrom(fam.backend(i), 80))
		}
	}
	return b.String()
}

// withoutService returns cfg (as xdpConfig writes it) without service name.
func withoutService(cfg, name string) string {
	head, rest, _ := strings.Cut(cfg, "  - name: ")
	var b strings.Builder
	b.WriteString(head)
	for _, blk := range strings.Split("  - name: "+rest, "\n  - name: ") {
		blk = strings.TrimPrefix(blk, "  - name: ")
		if !strings.HasPrefix(blk, name+"\n") {
			b.WriteString("  - name: " + strings.TrimSuffix(blk, "\n") + "\n")
		}
	}
	return b.String()
}

// xdpTopology prepares the veth topology for XDP: the client sends full
// checksums (with tx offload a veth hands on a partial checksum that a NIC
// receiving from a wire never sees, and that native XDP cannot complete),
// and the switch port behind the LB's eth1 runs NAPI (GRO on), which a veth
// needs to take frames redirected in native mode.
func xdpTopology(t *testing.T, opts topo.Options) *harness {
	t.Helper()
	testenv.RequireCommand(t, "ethtool")
	h := newHarness(t, opts)
	mustRun(t, h.Client, "ethtool", "-K", "eth0", "tx", "off")
	mustRun(t, h.Switch, "ethtool", "-K", "p0", "gro", "on")
	return h
}

// xdpCounters reads the xdp_lb counters pinned on the LB.
func xdpCounters(t *testing.T, h *harness) map[string]uint64 {
	t.Helper()
	out := map[string]uint64{}
	for _, c := range snatStats(t, h.LB).XDP {
		out[c.Name] = c.Value
	}
	return out
}

// checkSpread asks from fresh client sockets (new source ports) until all
// four backends answered: DNS answers from VIP:53 naming a backend, HTTP
// bodies from a backend that saw the client's own address. Returns how
// many tries it took per protocol.
func (h *harness) checkSpread(t *testing.T, fam dsrFamily) {
	t.Helper()
	vip := netip.AddrPortFrom(fam.vip, 53)
	seen := map[int]bool{}
	for k := 0; k < 200 && len(seen) < 4; k++ {
		c := h.newDNSClient(t, netip.AddrPortFrom(fam.client, 0), vip)
		got, from, err := c.askRetry(fam.typ)
		if err != nil {
			t.Fatalf("%s DNS query #%d: %v", fam.name, k, err)
		}
		if from != vip || backendOf(fam, got) == 0 {
			t.Fatalf("%s DNS query #%d: answer %s from %s; want a backend's address from %s", fam.name, k, got, from, vip)
		}
		seen[backendOf(fam, got)] = true
	}
	if len(seen) != 4 {
		t.Errorf("%s DNS: 200 client ports answered by backends %v, want all four", fam.name, seen)
	}
	web := netip.AddrPortFrom(fam.vip, 80)
	seen = map[int]bool{}
	for k := 0; k < 200 && len(seen) < 4; k++ {
		body, err := h.httpGet(web)
		if err != nil {
			t.Fatalf("%s HTTP GET #%d: %v", fam.name, k, err)
		}
		m := helloRE.FindStringSubmatch(body)
		if m == nil {
			t.Fatalf("%s HTTP GET #%d: body %q", fam.name, k, body)
		}
		from, err := netip.ParseAddrPort(m[2])
		if err != nil || from.Addr().Unmap() != fam.client {
			t.Fatalf("%s HTTP GET #%d: the backend saw the connection come from %s, want the client %s", fam.name, k, m[2], fam.client)
		}
		to, err := netip.ParseAddrPort(m[3])
		if err != nil || to.Port() != 80 || backendOf(fam, to.Addr().Unmap()) == 0 {
			t.Fatalf("%s HTTP GET #%d: connection to %s, want a backend's :80", fam.name, k, m[3])
		}
		seen[int(m[1][3]-'0')] = true
	}
	if len(seen) != 4 {
		t.Errorf("%s HTTP: 200 connections served by backends %v, want all four", fam.name, seen)
	}
}

// checkNoSocket: lbctl run holds no socket bound to a VIP port of the
// services (the kernel forwards; user space never sees a packet).
func (h *harness) checkNoSocket(t *testing.T, l *lb) {
	t.Helper()
	out := mustRun(t, h.LB, "ss", "-Hanup", "-t", "-u")
	pid := fmt.Sprintf("pid=%d,", l.cmd.Process.Pid)
	for _, line := range strings.Split(out, "\n") {
		if !strings.Contains(line, pid) {
			continue
		}
		for _, vip := range []string{topo.VIP4.String() + ":53", topo.VIP4.String() + ":80", "[" + topo.VIP6.String() + "]:53", "[" + topo.VIP6.String() + "]:80", "*:53", "*:80"} {
			if strings.Contains(line, " "+vip+" ") {
				t.Errorf("lbctl run has a socket on %s: %s", vip, line)
			}
		}
	}
}

func testXDP(t *testing.T, nat string) {
	h := xdpTopology(t, topo.Options{OriginNAT: nat == "origin"})
	h.startBackends(t)
	cfg := xdpConfig(nat)
	if nat == "origin" {
		path := h.dir + "/backends.yaml"
		if err := os.WriteFile(path, []byte(cfg), 0o644); err != nil {
			t.Fatal(err)
		}
		lbctl := binary(t, "lbctl")
		for i, b := range h.Backends {
			mustRun(t, b, lbctl, "--bpffs", b.BPFFS, "attach", "eth1")
			for _, svc := range []struct {
				name string
				src  netip.Addr
			}{{"dns4", topo.Backend4(i + 1)}, {"dns6", topo.Backend6(i + 1)}, {"web4", topo.Backend4(i + 1)}, {"web6", topo.Backend6(i + 1)}} {
				mustRun(t, b, lbctl, "--bpffs", b.BPFFS, "snat", "add", "--vip-from", path, "--service", svc.name, "--src", svc.src.String())
			}
			t.Cleanup(func() { b.Run(lbctl, "--bpffs", b.BPFFS, "detach", "eth1") })
		}
	}
	l := h.run(t, cfg)
	if !strings.Contains(l.out.String(), "xdp_lb attached") {
		t.Errorf("no attach logged:\n%s", l.out.String())
	}
	before := xdpCounters(t, h)
	for _, fam := range dsrFamilies {
		t.Run(fam.name, func(t *testing.T) { h.checkSpread(t, fam) })
	}
	after := xdpCounters(t, h)
	if got := after["redirect"] + after["tx"] - before["redirect"] - before["tx"]; got < 32 {
		t.Errorf("xdp_lb sent on %d packets, want at least the 32 queries and connections: %v", got, after)
	}
	h.checkNoSocket(t, l)
	// lbctl status: the table generation and each backend's share.
	status := mustRun(t, h.LB, binary(t, "lbctl"), "--bpffs", h.LB.BPFFS, "status")
	for i := 1; i <= 4; i++ {
		re := regexp.MustCompile(regexp.QuoteMeta(netip.AddrPortFrom(topo.VIP4, 53).String()) + `\s+udp\s+[1-9]\d*\s+` +
			regexp.QuoteMeta(netip.AddrPortFrom(topo.Backend4(i), 53).String()) + `\s+2[45]\.\d%`)
		if !re.MatchString(status) {
			t.Errorf("lbctl status lacks dev%d's generation and ~25%% share:\n%s", i, status)
		}
	}
	// A reload that drops web6 takes it out of the program at once.
	if !l.reload(t, withoutService(cfg, "web6")) {
		t.Fatalf("reload without web6 failed:\n%s", l.out.String())
	}
	for _, s := range dataplaneServices(t, h) {
		if s.VIP == netip.AddrPortFrom(topo.VIP6, 80) {
			t.Errorf("web6 still in the program after a reload removed it: %+v", s)
		}
	}
	if body, err := h.httpGet(netip.AddrPortFrom(topo.VIP6, 80)); err == nil {
		t.Errorf("web6 still answered after a reload removed it: %q", body)
	}
	out := mustRun(t, h.LB, binary(t, "lbctl"), "--bpffs", h.LB.BPFFS, "stats")
	t.Logf("lbctl stats:\n%s", out)
	l.stop(t)
	// Forwarding outlives the daemon.
	for _, fam := range dsrFamilies {
		c := h.newDNSClient(t, netip.AddrPortFrom(fam.client, 0), netip.AddrPortFrom(fam.vip, 53))
		if got, from, err := c.askRetry(fam.typ); err != nil || backendOf(fam, got) == 0 {
			t.Errorf("%s after lbctl run exited: %s from %s, %v; want XDP to keep forwarding", fam.name, got, from, err)
		}
	}
	mustRun(t, h.LB, binary(t, "lbctl"), "--bpffs", h.LB.BPFFS, "detach", "eth0")
	if l := mustRun(t, h.LB, "ip", "link", "show", "eth0"); strings.Contains(l, "xdp") {
		t.Errorf("XDP still on eth0 after lbctl detach: %s", l)
	}
}

// TestXDPRouterNAT: DNS (UDP) and HTTP (TCP) through mode xdp, IPv4 and
// IPv6, the LB routing the replies (snat on eth0): all four backends
// answer, from the VIP; each HTTP backend reports the client's own
// address; xdp_lb counted the packets; lbctl run holds no socket on the
// VIP; forwarding goes on after lbctl run exits, until lbctl detach.
func TestXDPRouterNAT(t *testing.T) { testXDP(t, "router") }

// TestXDPOriginNAT: as TestXDPRouterNAT, each backend rewriting its own
// replies (lbctl attach eth1 + snat add --vip-from) out of its public side.
func TestXDPOriginNAT(t *testing.T) { testXDP(t, "origin") }

// TestXDPRestartLosesNothing: a steady stream of DNS queries (one try
// each, no retry) goes on while lbctl run is killed (SIGKILL) and started
// again, then stopped (SIGTERM) and started again: not one query is lost.
func TestXDPRestartLosesNothing(t *testing.T) {
	h := xdpTopology(t, topo.Options{})
	h.startBackends(t)
	cfg := xdpConfig("router")
	l := h.run(t, cfg)
	fam := dsrFamilies[0]
	vip := netip.AddrPortFrom(fam.vip, 53)
	// Warm up: neighbours resolved, next hops cached.
	for k := 0; k < 16; k++ {
		c := h.newDNSClient(t, netip.AddrPortFrom(fam.client, 0), vip)
		if _, _, err := c.askRetry(fam.typ); err != nil {
			t.Fatal(err)
		}
	}
	var sent, lost atomic.Int64
	stop := make(chan struct{})
	var wg sync.WaitGroup
	for w := 0; w < 4; w++ {
		c := h.newDNSClient(t, netip.AddrPortFrom(fam.client, 0), vip)
		wg.Add(1)
		go func() {
			defer wg.Done()
			for {
				select {
				case <-stop:
					return
				default:
				}
				sent.Add(1)
				if got, from, err := c.ask(fam.typ); err != nil || from != vip || backendOf(fam, got) == 0 {
					lost.Add(1)
					t.Logf("query lost: %s from %s, %v", got, from, err)
				}
			}
		}()
	}
	waitSent := func(n int64) {
		for target := sent.Load() + n; sent.Load() < target; {
			time.Sleep(10 * time.Millisecond)
		}
	}
	waitSent(200)
	l.signal(syscall.SIGKILL)
	<-l.done
	waitSent(200)
	l = h.run(t, cfg)
	waitSent(200)
	l.stop(t)
	waitSent(200)
	l = h.run(t, cfg)
	waitSent(200)
	close(stop)
	wg.Wait()
	t.Logf("%d queries, %d lost", sent.Load(), lost.Load())
	if lost.Load() != 0 {
		t.Errorf("%d of %d queries lost across the restarts", lost.Load(), sent.Load())
	}
	if !strings.Contains(l.out.String(), "xdp_lb attached") {
		t.Errorf("the restarted daemon logged no attach:\n%s", l.out.String())
	}
}

// keepAlive is an HTTP/1.1 connection from the client that stays open.
type keepAlive struct {
	c net.Conn
	r *bufio.Reader
}

func (h *harness) dialKeepAlive(t *testing.T, addr netip.AddrPort) *keepAlive {
	t.Helper()
	var c net.Conn
	in(t, h.Client, func() (err error) {
		c, err = net.DialTimeout("tcp", addr.String(), 5*time.Second)
		return err
	})
	t.Cleanup(func() { c.Close() })
	return &keepAlive{c: c, r: bufio.NewReader(c)}
}

// get sends one request and returns the number of the backend (devN) that
// answered.
func (k *keepAlive) get() (int, error) {
	k.c.SetDeadline(time.Now().Add(5 * time.Second))
	if _, err := fmt.Fprintf(k.c, "GET / HTTP/1.1\r\nHost: www.example.com\r\n\r\n"); err != nil {
		return 0, err
	}
	resp, err := http.ReadResponse(k.r, nil)
	if err != nil {
		return 0, err
	}
	b, err := io.ReadAll(resp.Body)
	resp.Body.Close()
	if err != nil {
		return 0, err
	}
	m := helloRE.FindStringSubmatch(strings.TrimSpace(string(b)))
	if m == nil {
		return 0, fmt.Errorf("body %q", b)
	}
	return int(m[1][3] - '0'), nil
}

// TestXDPBackendFailure: with established HTTP keep-alive connections on
// every backend, backend 4 dies. Once health marks it down, no new
// connection and no new DNS query goes to it, and every established
// connection to the other three keeps its backend although the Maglev
// table changed under it.
func TestXDPBackendFailure(t *testing.T) {
	h := xdpTopology(t, topo.Options{})
	var procs []*process
	for i := range h.Backends {
		procs = append(procs, h.startBackend(t, i+1))
	}
	l := h.run(t, xdpConfig("router"))
	fam := dsrFamilies[0]
	web := netip.AddrPortFrom(fam.vip, 80)
	var conns []*keepAlive
	var owner []int
	onBackend := map[int]int{}
	for k := 0; k < 64 && len(conns) < 24; k++ {
		c := h.dialKeepAlive(t, web)
		n, err := c.get()
		if err != nil {
			t.Fatalf("connection #%d: %v", k, err)
		}
		conns, owner = append(conns, c), append(owner, n)
		onBackend[n]++
	}
	if len(onBackend) != 4 {
		t.Fatalf("24 connections on backends %v, want all four", onBackend)
	}
	procs[3].signal(syscall.SIGKILL)
	// Health takes dev4 out of both IPv4 services' tables.
	deadline := time.Now().Add(30 * time.Second)
	for !dev4Out(t, h, fam) {
		if time.Now().After(deadline) {
			t.Fatalf("dev4 still in the tables 30s after it died:\n%s", l.out.String())
		}
		time.Sleep(100 * time.Millisecond)
	}
	for i, c := range conns {
		if owner[i] == 4 {
			continue
		}
		n, err := c.get()
		if err != nil || n != owner[i] {
			t.Errorf("established connection #%d on dev%d: after dev4 failed got dev%d, %v; want it kept", i, owner[i], n, err)
		}
	}
	for k := 0; k < 32; k++ {
		body, err := h.httpGet(web)
		if err != nil {
			t.Fatalf("new connection #%d after dev4 failed: %v", k, err)
		}
		if strings.HasPrefix(body, "Hello from dev4") {
			t.Fatalf("new connection #%d went to the failed dev4", k)
		}
	}
	vip := netip.AddrPortFrom(fam.vip, 53)
	for k := 0; k < 32; k++ {
		c := h.newDNSClient(t, netip.AddrPortFrom(fam.client, 0), vip)
		if got, _, err := c.ask(fam.typ); err != nil || backendOf(fam, got) == 0 || backendOf(fam, got) == 4 {
			t.Fatalf("DNS query #%d after dev4 failed: %s, %v; want one of dev1-3 at once", k, got, err)
		}
	}
}

// dev4Out reports whether backend 4 has no slot left in fam's tables.
func dev4Out(t *testing.T, h *harness, fam dsrFamily) bool {
	t.Helper()
	for _, s := range dataplaneServices(t, h) {
		for _, b := range s.Backends {
			if b.Addr.Addr() == fam.backend(4) && b.Slots != 0 {
				return false
			}
		}
	}
	return true
}

// dataplaneServices reads the XDP services pinned on the LB.
func dataplaneServices(t *testing.T, h *harness) []dataplane.XDPServiceState {
	t.Helper()
	dp, err := dataplane.Open(dataplane.Options{Root: h.LB.BPFFS, NoCreate: true})
	if err != nil {
		t.Fatal(err)
	}
	defer dp.Close()
	st, err := dp.XDPServices()
	if err != nil {
		t.Fatal(err)
	}
	return st
}

// withService returns cfg (as xdpConfig writes it) with service name's
// block replaced by blk.
func withService(cfg, name, blk string) string {
	head, rest, _ := strings.Cut(cfg, "  - name: ")
	var b strings.Builder
	b.WriteString(head)
	for _, s := range strings.Split("  - name: "+rest, "\n  - name: ") {
		s = strings.TrimPrefix(s, "  - name: ")
		if strings.HasPrefix(s, name+"\n") {
			b.WriteString(blk)
			continue
		}
		b.WriteString("  - name: " + strings.TrimSuffix(s, "\n") + "\n")
	}
	return b.String()
}

// webSeen GETs VIP4:80 from the client and returns the address the backend
// saw the connection come from (the client's in mode xdp, the LB's in
// mode proxy).
func (h *harness) webSeen(t *testing.T) netip.Addr {
	t.Helper()
	body, err := h.httpGet(netip.AddrPortFrom(topo.VIP4, 80))
	if err != nil {
		t.Fatalf("GET %s: %v", topo.VIP4, err)
	}
	m := helloRE.FindStringSubmatch(body)
	if m == nil {
		t.Fatalf("GET %s: body %q", topo.VIP4, body)
	}
	from, err := netip.ParseAddrPort(m[2])
	if err != nil {
		t.Fatalf("GET %s: %q: %v", topo.VIP4, body, err)
	}
	return from.Addr().Unmap()
}

func hasXDPService(t *testing.T, h *harness, vip netip.AddrPort) bool {
	t.Helper()
	for _, s := range dataplaneServices(t, h) {
		if s.VIP == vip {
			return true
		}
	}
	return false
}

// TestXDPReloadModeChange: a SIGHUP that moves web4 from mode xdp to mode
// proxy removes exactly its entry from xdp_lb (the other services stay
// in the program) and the proxy serves it (the backend sees the LB's
// address); moving it back puts it in the program again (the backend sees
// the client) and the proxy's listener goes.
func TestXDPReloadModeChange(t *testing.T) {
	h := xdpTopology(t, topo.Options{})
	h.startBackends(t)
	cfg := xdpConfig("router")
	proxied := withService(cfg, "web4", fmt.Sprintf("  - name: web4\n    protocol: tcp\n    listen: \"%s\"\n    mode: proxy\n    upstreams:\n      - \"%s\"\n      - \"%s\"\n",
		netip.AddrPortFrom(topo.VIP4, 80), netip.AddrPortFrom(topo.Backend4(1), 80), netip.AddrPortFrom(topo.Backend4(2), 80)))
	web4 := netip.AddrPortFrom(topo.VIP4, 80)
	others := []netip.AddrPort{netip.AddrPortFrom(topo.VIP4, 53), netip.AddrPortFrom(topo.VIP6, 53), netip.AddrPortFrom(topo.VIP6, 80)}
	l := h.run(t, cfg)
	if !hasXDPService(t, h, web4) {
		t.Fatalf("web4 not in xdp_lb at start")
	}
	if from := h.webSeen(t); from != topo.Client4 {
		t.Fatalf("mode xdp: the backend saw %s, want the client %s", from, topo.Client4)
	}

	if !l.reload(t, proxied) {
		t.Fatalf("reload web4 -> proxy failed:\n%s", l.out.String())
	}
	if hasXDPService(t, h, web4) {
		t.Errorf("web4 still in xdp_lb after the reload moved it to mode proxy: %+v", dataplaneServices(t, h))
	}
	for _, o := range others {
		if !hasXDPService(t, h, o) {
			t.Errorf("%s left xdp_lb, but only web4 changed mode", o)
		}
	}
	for range 4 {
		if from := h.webSeen(t); from != topo.LBUp4 {
			t.Fatalf("after xdp -> proxy: the backend saw %s, want the LB's %s (the proxy)\n%s", from, topo.LBUp4, l.out.String())
		}
	}

	if !l.reload(t, cfg) {
		t.Fatalf("reload web4 -> xdp failed:\n%s", l.out.String())
	}
	if !hasXDPService(t, h, web4) {
		t.Errorf("web4 not in xdp_lb after the reload moved it back to mode xdp")
	}
	for range 4 {
		if from := h.webSeen(t); from != topo.Client4 {
			t.Fatalf("after proxy -> xdp: the backend saw %s, want the client %s", from, topo.Client4)
		}
	}
	h.checkNoSocket(t, l)

	// The same VIP under another name (web4 goes, web4b comes, both
	// xdp): the new service's entry stays, whatever order the old one
	// stops in.
	renamed := strings.Replace(cfg, "  - name: web4\n", "  - name: web4b\n", 1)
	if !l.reload(t, renamed) {
		t.Fatalf("reload web4 -> web4b failed:\n%s", l.out.String())
	}
	l.waitOutput(t, "service stopped\t{\"service\": \"web4\"}", 1)
	if !hasXDPService(t, h, web4) {
		t.Errorf("web4b not in xdp_lb: removing web4 took the entry web4b had just set")
	}
	for range 4 {
		if from := h.webSeen(t); from != topo.Client4 {
			t.Fatalf("after web4 -> web4b: the backend saw %s, want the client %s", from, topo.Client4)
		}
	}
	l.stop(t)
	mustRun(t, h.LB, binary(t, "lbctl"), "--bpffs", h.LB.BPFFS, "detach", "eth0")
}

// xdpHook says how xdp_lb is attached to the LB's eth0: the pinned links
// lbctl keeps, and the kernel's own view (ip link: "xdpgeneric" for
// generic, "xdp" for native).
func xdpHook(t *testing.T, h *harness) string {
	t.Helper()
	var pins []string
	for _, m := range []string{"native", "generic"} {
		if _, err := os.Stat(filepath.Join(h.LB.BPFFS, "lbctl", "links", "eth0", "xdp_"+m)); err == nil {
			pins = append(pins, m)
		}
	}
	first, _, _ := strings.Cut(mustRun(t, h.LB, "ip", "link", "show", "eth0"), "\n")
	kernel := "none"
	for _, f := range strings.Fields(first) {
		switch f {
		case "xdpgeneric":
			kernel = "generic"
		case "xdp":
			kernel = "native"
		}
	}
	return fmt.Sprintf("pinned %v, kernel %s", pins, kernel)
}

// TestXDPModeConfig: the config's xdp.mode decides how lbctl run attaches
// xdp_lb (generic here, although the veth supports native); a SIGHUP to
// native moves the hook, and the services go on forwarding; an unknown
// mode is refused by the reload; a daemon started again with xdp.mode
// absent (auto) adopts the mode attached before instead of moving it.
func TestXDPModeConfig(t *testing.T) {
	h := xdpTopology(t, topo.Options{})
	h.startBackends(t)
	cfg := xdpConfig("router")
	l := h.run(t, "xdp: {mode: generic}\n"+cfg)
	if got, want := xdpHook(t, h), "pinned [generic], kernel generic"; got != want {
		t.Fatalf("xdp.mode generic: %s, want %s\n%s", got, want, l.out.String())
	}
	if st := mustRun(t, h.LB, binary(t, "lbctl"), "--bpffs", h.LB.BPFFS, "status", "--json"); !strings.Contains(st, `"attach_mode": "generic"`) {
		t.Errorf("lbctl status does not say generic:\n%s", st)
	}
	h.checkSpread(t, dsrFamilies[0])

	if !l.reload(t, "xdp: {mode: native}\n"+cfg) {
		t.Fatalf("reload to xdp.mode native failed:\n%s", l.out.String())
	}
	if got, want := xdpHook(t, h), "pinned [native], kernel native"; got != want {
		t.Errorf("after the reload to native: %s, want %s", got, want)
	}
	if !strings.Contains(l.out.String(), "xdp_lb moved to another XDP mode") {
		t.Errorf("the move to native is not logged:\n%s", l.out.String())
	}
	h.checkSpread(t, dsrFamilies[0])
	h.checkSpread(t, dsrFamilies[1])

	if l.reload(t, "xdp: {mode: driver}\n"+cfg) {
		t.Fatalf("reload with xdp.mode driver succeeded")
	}
	if !strings.Contains(l.out.String(), `xdp.mode: unknown xdp mode \"driver\"`) && !strings.Contains(l.out.String(), `xdp.mode: unknown xdp mode "driver"`) {
		t.Errorf("the refused reload does not name xdp.mode:\n%s", l.out.String())
	}
	if !l.reload(t, "xdp: {mode: generic}\n"+cfg) {
		t.Fatalf("reload back to generic failed:\n%s", l.out.String())
	}
	l.stop(t)
	// Auto adopts what is attached: a restart never moves the hook.
	l = h.run(t, cfg)
	if got, want := xdpHook(t, h), "pinned [generic], kernel generic"; got != want {
		t.Errorf("restarted with xdp.mode auto over a generic attachment: %s, want %s (adopted)", got, want)
	}
	h.checkSpread(t, dsrFamilies[0])
	l.stop(t)
	mustRun(t, h.LB, binary(t, "lbctl"), "--bpffs", h.LB.BPFFS, "detach", "eth0")
}
