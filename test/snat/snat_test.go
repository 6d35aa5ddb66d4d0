// Package snat holds the end-to-end tests of lbctl's DSR reply rewrite (the
// snat TC egress program) on the seed's namespace topology (test/topo),
// driven through the real lbctl CLI:
//
//   - router NAT: the LB routes the backends' replies and rewrites them on
//     its client-facing interface (eth0) with one prefix rule per family;
//   - origin NAT: each backend rewrites its own replies on its public side
//     (eth1), and the replies bypass the LB.
//
// The client sends its query to a backend's own address through the LB (a
// DSR sender in the LB comes with mode dsr); the backend answers the
// client directly, and the client's unconnected socket must see the answer
// come from the VIP. Checksums are proved right by the receiving socket
// itself: with tx checksum offload turned off somewhere after the rewrite,
// the client verifies the UDP checksum and counts a wrong one in
// UdpInCsumErrors; a control case shows that counter does catch a rewrite
// that left the L4 checksum stale.
package snat

import (
	"fmt"
	"net/netip"
	"testing"

	"github.com/lbctl/lbctl/test/topo"
)

// family is what a test needs to know about IPv4 or IPv6.
type family struct {
	name       string
	vip        netip.Addr
	backend    func(int) netip.Addr
	backendNet string // the backend LAN, for router NAT prefix rules
	hostBits   int    // /32 or /128
	csumErrors string // snmp counter of UDP datagrams dropped for their checksum
	forwarded  string // snmp counter of forwarded datagrams
	reasmOK    string // snmp counter of reassembled datagrams
}

var families = []family{
	{"ipv4", topo.VIP4, topo.Backend4, "198.19.16.0/24", 32, "UdpInCsumErrors", "IpForwDatagrams", "IpReasmOKs"},
	{"ipv6", topo.VIP6, topo.Backend6, "2001:db8:16::/64", 128, "Udp6InCsumErrors", "Ip6OutForwDatagrams", "Ip6ReasmOKs"},
}

func ap(a netip.Addr, port uint16) string { return netip.AddrPortFrom(a, port).String() }

// startBackends runs test/backend on every backend: DNS on port 53 and
// UDP echo on port 7, both families.
func startBackends(t *testing.T, tp *topo.Topology) {
	t.Helper()
	for i, b := range tp.Backends {
		startBackend(t, b, "--name", fmt.Sprintf("dev%d", i+1), "--readers", "1",
			"--dns", ap(b.V4, 53), "--dns", ap(b.V6, 53),
			"--udp-echo", ap(b.V4, 7), "--udp-echo", ap(b.V6, 7))
	}
}

// sum adds a counter over hosts.
func sum(t *testing.T, hosts []*topo.Host, name string) uint64 {
	t.Helper()
	var n uint64
	for _, h := range hosts {
		n += snatCounters(t, h)[name]
	}
	return n
}

// offloadName names a subtest by the offload setting of dev.
func offloadName(on bool, dev string) string {
	if on {
		return "tx-offload-on"
	}
	return "tx-off-" + dev
}

// offloadCase is a tx checksum offload setting applied for one subtest.
type offloadCase struct {
	name string
	// off lists the devices whose tx checksum offload is turned off.
	off []struct {
		h   *topo.Host
		dev string
	}
}

func offCase(name string, devs ...any) offloadCase {
	c := offloadCase{name: name}
	for i := 0; i < len(devs); i += 2 {
		c.off = append(c.off, struct {
			h   *topo.Host
			dev string
		}{devs[i].(*topo.Host), devs[i+1].(string)})
	}
	return c
}

// testDNS queries www.example.com from the client at every backend's own
// address, through the LB, and checks that every answer comes from VIP:53
// with the backend's address as its answer, and that no datagram reached
// the client with a bad checksum. repliesCrossLB says whether the replies
// are routed through the LB (router NAT) or must bypass it (origin NAT),
// checked with the LB's forwarding counter. natHosts run the rewrite.
func testDNS(t *testing.T, tp *topo.Topology, f family, repliesCrossLB bool, natHosts []*topo.Host) {
	c := listenUDP(t, tp.Client, f.vip)
	client0, lb0 := snmp(t, tp.Client), snmp(t, tp.LB)
	rewritten0 := sum(t, natHosts, "rewritten")

	sent := 0
	for i := range tp.Backends {
		id := uint16(0x5300 + i)
		backend := f.backend(i + 1)
		dst := netip.MustParseAddrPort(ap(backend, 53))
		var answer netip.Addr
		reply, from, n, err := exchange(c, dst, dnsQuery(t, id, f.vip.Is6()), func(m []byte) bool {
			a, ok := dnsAnswer(m, id)
			answer = a
			return ok
		})
		sent += n
		if err != nil {
			t.Errorf("query %s: %v", dst, err)
			continue
		}
		if want := netip.AddrPortFrom(f.vip, 53); from != want {
			t.Errorf("query %s: answer came from %s, want the VIP %s", dst, from, want)
		}
		if answer != backend {
			t.Errorf("query %s: answer %s, want the backend's own address %s (%d bytes)", dst, answer, backend, len(reply))
		}
	}
	client1, lb1 := snmp(t, tp.Client), snmp(t, tp.LB)
	if d := client1[f.csumErrors] - client0[f.csumErrors]; d != 0 {
		t.Errorf("client %s rose by %d: a rewritten datagram arrived with a wrong checksum", f.csumErrors, d)
	}
	if t.Failed() {
		return
	}
	answers := uint64(len(tp.Backends))
	fwd := lb1[f.forwarded] - lb0[f.forwarded]
	if repliesCrossLB && fwd < uint64(sent)+answers {
		t.Errorf("LB %s rose by %d, want at least %d queries + %d replies: the replies did not cross the LB", f.forwarded, fwd, sent, answers)
	}
	if !repliesCrossLB && fwd != uint64(sent) {
		t.Errorf("LB %s rose by %d, want exactly the %d queries: replies crossed the LB", f.forwarded, fwd, sent)
	}
	if d := sum(t, natHosts, "rewritten") - rewritten0; d < answers {
		t.Errorf("snat rewrote %d packets, want at least the %d answers", d, answers)
	}
}

// testFragments echoes a 3000-byte datagram off backend 1; the reply leaves
// the backend in two or more fragments, all of which must get the VIP as
// source so that the client reassembles it.
func testFragments(t *testing.T, tp *topo.Topology, f family, natHosts []*topo.Host) {
	c := listenUDP(t, tp.Client, f.vip)
	client0 := snmp(t, tp.Client)
	frags0 := sum(t, natHosts, "fragments")

	msg := make([]byte, 3000)
	for i := range msg {
		msg[i] = byte(i*7 + i/256)
	}
	dst := netip.MustParseAddrPort(ap(f.backend(1), 7))
	reply, from, _, err := exchange(c, dst, msg, func(m []byte) bool { return len(m) == len(msg) })
	if err != nil {
		client1 := snmp(t, tp.Client)
		t.Fatalf("echo %d bytes off %s: %v (client %s rose by %d)", len(msg), dst, err,
			f.csumErrors, client1[f.csumErrors]-client0[f.csumErrors])
	}
	if want := netip.AddrPortFrom(f.vip, 7); from != want {
		t.Errorf("echo came from %s, want %s", from, want)
	}
	if string(reply) != string(msg) {
		t.Errorf("echo of %d bytes differs from what was sent", len(msg))
	}
	client1 := snmp(t, tp.Client)
	if d := client1[f.reasmOK] - client0[f.reasmOK]; d < 1 {
		t.Errorf("client %s rose by %d: the reply was not fragmented, the test proves nothing", f.reasmOK, d)
	}
	if d := client1[f.csumErrors] - client0[f.csumErrors]; d != 0 {
		t.Errorf("client %s rose by %d", f.csumErrors, d)
	}
	if d := sum(t, natHosts, "fragments") - frags0; d < 1 {
		t.Errorf("snat fragments counter rose by %d, want at least 1 later fragment rewritten", d)
	}
}

// TestRouterNAT: the LB routes the replies of two backends and lbctl's
// snat on its client-facing eth0 rewrites them with one prefix rule per
// family.
func TestRouterNAT(t *testing.T) {
	requireTools(t)
	tp := topo.Start(t, topo.Options{LBForward: true, Backends: 2})
	startBackends(t, tp)
	lb := tp.LB
	lbctl(t, lb, "attach", "eth0")
	for _, f := range families {
		lbctl(t, lb, "snat", "add", "--src", f.backendNet, "--proto", "udp", "--sport", "53", "--to", ap(f.vip, 53))
		lbctl(t, lb, "snat", "add", "--src", f.backendNet, "--proto", "udp", "--sport", "7", "--to", f.vip.String())
		lbctl(t, lb, "snat", "add", "--src", f.backendNet, "--proto", "tcp", "--sport", "80", "--to", ap(f.vip, 80))
	}
	offloads := []offloadCase{
		offCase("tx-offload-on"),
		// The backends send complete checksums; snat updates them.
		offCase("tx-off-backends", tp.Backends[0], "eth0", tp.Backends[1], "eth0"),
		// The replies stay CHECKSUM_PARTIAL up to the LB's eth0, which
		// completes the checksum after snat from the seed it adjusted.
		offCase("tx-off-lb-eth0", lb, "eth0"),
	}
	for _, f := range families {
		for _, o := range offloads {
			t.Run(f.name+"/dns/"+o.name, func(t *testing.T) {
				for _, d := range o.off {
					txOffload(t, d.h, d.dev, false)
				}
				testDNS(t, tp, f, true, []*topo.Host{lb})
			})
		}
		t.Run(f.name+"/fragmented-reply", func(t *testing.T) { testFragments(t, tp, f, []*topo.Host{lb}) })
		for _, on := range []bool{true, false} {
			t.Run(f.name+"/tcp/"+offloadName(on, "backend1-eth0"), func(t *testing.T) {
				txOffload(t, tp.Backends[0], "eth0", on)
				testTCP(t, tp, f, true, []*topo.Host{lb})
			})
		}
	}
}

// TestOriginNAT: each backend rewrites its own replies on its public side
// (eth1, a /32 or /128 rule), and the replies reach the client through the
// router without crossing the LB.
func TestOriginNAT(t *testing.T) {
	requireTools(t, "nft")
	tp := topo.Start(t, topo.Options{OriginNAT: true, LBForward: true, Backends: 2})
	startBackends(t, tp)
	for i, b := range tp.Backends {
		lbctl(t, b, "attach", "eth1")
		for _, f := range families {
			src := netip.PrefixFrom(f.backend(i+1), f.hostBits).String()
			lbctl(t, b, "snat", "add", "--src", src, "--proto", "udp", "--sport", "53", "--to", ap(f.vip, 53))
			lbctl(t, b, "snat", "add", "--src", src, "--proto", "udp", "--sport", "7", "--to", f.vip.String())
			lbctl(t, b, "snat", "add", "--src", src, "--proto", "tcp", "--sport", "80", "--to", ap(f.vip, 80))
		}
	}
	offloads := []offloadCase{
		offCase("tx-offload-on"),
		// snat sees CHECKSUM_PARTIAL; the same veth completes the
		// checksum in software right after the egress hook.
		offCase("tx-off-backends-eth1", tp.Backends[0], "eth1", tp.Backends[1], "eth1"),
		// The checksum stays partial through the router, which completes it.
		offCase("tx-off-router-eth0", tp.Router, "eth0"),
	}
	for _, f := range families {
		for _, o := range offloads {
			t.Run(f.name+"/dns/"+o.name, func(t *testing.T) {
				for _, d := range o.off {
					txOffload(t, d.h, d.dev, false)
				}
				testDNS(t, tp, f, false, tp.Backends)
			})
		}
		t.Run(f.name+"/stale-checksum-control", func(t *testing.T) { testStaleChecksum(t, tp, f) })
		t.Run(f.name+"/fragmented-reply", func(t *testing.T) { testFragments(t, tp, f, tp.Backends) })
		for _, on := range []bool{true, false} {
			t.Run(f.name+"/tcp/"+offloadName(on, "backend1-eth1"), func(t *testing.T) {
				txOffload(t, tp.Backends[0], "eth1", on)
				testTCP(t, tp, f, false, tp.Backends)
			})
		}
	}
}
