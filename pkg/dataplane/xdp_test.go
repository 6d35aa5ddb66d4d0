package dataplane

import (
	"bytes"
	"crypto/rand"
	"encoding/hex"
	"fmt"
	"net"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"testing"

	"github.com/cilium/ebpf"
	"go.uber.org/zap"
	"golang.org/x/sys/unix"

	"github.com/lbctl/lbctl/test/testenv"
)

// XDP verdicts (enum xdp_action).
const (
	xdpAborted  = 0
	xdpDrop     = 1
	xdpPass     = 2
	xdpTX       = 3
	xdpRedirect = 4
)

var xdpVerdicts = map[uint32]string{xdpAborted: "XDP_ABORTED", xdpDrop: "XDP_DROP", xdpPass: "XDP_PASS", xdpTX: "XDP_TX", xdpRedirect: "XDP_REDIRECT"}

// The namespace the program tests run in: the client-facing interface lb0
// (the VIPs' side, also reaching a "local" backend), the backend-facing
// lb1, static neighbours for the backends so bpf_fib_lookup resolves them.
var (
	macLB0   = net.HardwareAddr{0x02, 0x00, 0x00, 0x00, 0x10, 0x00}
	macLB1   = net.HardwareAddr{0x02, 0x00, 0x00, 0x00, 0x10, 0x01}
	macLocal = net.HardwareAddr{0x02, 0x00, 0x00, 0x00, 0x20, 0x20}
	local4   = netip.MustParseAddrPort("198.18.98.20:53") // behind lb0: XDP_TX
	local6   = netip.MustParseAddrPort("[2001:db8:98::20]:53")
	noNeigh4 = netip.MustParseAddrPort("198.19.16.99:53") // routed, no neighbour: fib miss
	noNeigh6 = netip.MustParseAddrPort("[2001:db8:16::99]:53")
	vipPort4 = netip.AddrPortFrom(vip4, 53)
	vipPort6 = netip.AddrPortFrom(vip6, 53)
)

func backendMAC(i int) net.HardwareAddr { return net.HardwareAddr{0x02, 0, 0, 0, 0x30, byte(i)} }

func backendN4(i int) netip.AddrPort {
	return netip.AddrPortFrom(netip.AddrFrom4([4]byte{198, 19, 16, byte(10 + i)}), 53)
}

func backendN6(i int) netip.AddrPort {
	return netip.MustParseAddrPort(fmt.Sprintf("[2001:db8:16::%d]:53", 10+i))
}

// xdpEnv is the xdp_lb program with fresh maps, and a network namespace
// with routes and neighbours to run it in.
type xdpEnv struct {
	objs    xdpObjects
	d       *Dataplane
	ns      string
	ifindex uint32 // lb0
}

func newXDPEnv(tb testing.TB) *xdpEnv {
	tb.Helper()
	testenv.RequireRoot(tb)
	testenv.RequireCommand(tb, "ip")
	e := &xdpEnv{}
	spec, err := loadXdp()
	if err != nil {
		tb.Fatal(err)
	}
	if err := spec.LoadAndAssign(&e.objs, nil); err != nil {
		tb.Fatalf("load xdp_lb: %v", err)
	}
	tb.Cleanup(func() { e.objs.Close() })
	e.d = &Dataplane{log: zap.NewNop(), xdpst: &xdpState{spec: spec, maps: e.objs.xdpMaps}}

	b := make([]byte, 4)
	rand.Read(b)
	e.ns = "lbt-" + hex.EncodeToString(b) + "-xdp"
	if out, err := exec.Command("ip", "netns", "add", e.ns).CombinedOutput(); err != nil {
		tb.Fatalf("ip netns add: %v: %s", err, out)
	}
	tb.Cleanup(func() { exec.Command("ip", "netns", "del", e.ns).Run() })
	cmds := [][]string{
		{"link", "add", "lb0", "address", macLB0.String(), "type", "veth", "peer", "name", "c0"},
		{"link", "add", "lb1", "address", macLB1.String(), "type", "veth", "peer", "name", "b0"},
		{"link", "set", "lb0", "up"}, {"link", "set", "c0", "up"},
		{"link", "set", "lb1", "up"}, {"link", "set", "b0", "up"},
		{"addr", "add", "198.18.98.10/24", "dev", "lb0"},
		{"addr", "add", "2001:db8:98::10/64", "dev", "lb0", "nodad"},
		{"addr", "add", "198.19.16.1/24", "dev", "lb1"},
		{"addr", "add", "2001:db8:16::1/64", "dev", "lb1", "nodad"},
		{"route", "add", "198.18.99.0/24", "via", "198.18.98.1"},
		{"-6", "route", "add", "2001:db8:99::/64", "via", "2001:db8:98::1"},
		{"neigh", "add", "198.18.98.1", "lladdr", "02:00:00:00:20:01", "dev", "lb0", "nud", "permanent"},
		{"-6", "neigh", "add", "2001:db8:98::1", "lladdr", "02:00:00:00:20:01", "dev", "lb0", "nud", "permanent"},
		{"neigh", "add", local4.Addr().String(), "lladdr", macLocal.String(), "dev", "lb0", "nud", "permanent"},
		{"-6", "neigh", "add", local6.Addr().String(), "lladdr", macLocal.String(), "dev", "lb0", "nud", "permanent"},
	}
	for i := 1; i <= 4; i++ {
		cmds = append(cmds,
			[]string{"neigh", "add", backendN4(i).Addr().String(), "lladdr", backendMAC(i).String(), "dev", "lb1", "nud", "permanent"},
			[]string{"-6", "neigh", "add", backendN6(i).Addr().String(), "lladdr", backendMAC(i).String(), "dev", "lb1", "nud", "permanent"})
	}
	for _, c := range cmds {
		if out, err := exec.Command("ip", append([]string{"-n", e.ns}, c...)...).CombinedOutput(); err != nil {
			tb.Fatalf("ip %v: %v: %s", c, err, out)
		}
	}
	for _, s := range []string{"net.ipv4.conf.all.forwarding=1", "net.ipv6.conf.all.forwarding=1"} {
		if out, err := exec.Command("ip", "netns", "exec", e.ns, "sysctl", "-qw", s).CombinedOutput(); err != nil {
			tb.Fatalf("sysctl %s: %v: %s", s, err, out)
		}
	}
	e.inNS(tb, func() error {
		ifi, err := net.InterfaceByName("lb0")
		if err != nil {
			return err
		}
		e.ifindex = uint32(ifi.Index)
		return nil
	})
	return e
}

// inNS runs fn on a thread inside the test namespace (the thread exits with fn).
func (e *xdpEnv) inNS(tb testing.TB, fn func() error) {
	tb.Helper()
	errc := make(chan error, 1)
	go func() {
		runtime.LockOSThread()
		f, err := os.Open(filepath.Join("/var/run/netns", e.ns))
		if err != nil {
			errc <- err
			return
		}
		err = unix.Setns(int(f.Fd()), unix.CLONE_NEWNET)
		f.Close()
		if err != nil {
			errc <- fmt.Errorf("setns: %w", err)
			return
		}
		errc <- fn()
	}()
	if err := <-errc; err != nil {
		tb.Fatal(err)
	}
}

// xdpMd is struct xdp_md, the context BPF_PROG_TEST_RUN takes for XDP.
type xdpMd struct {
	Data, DataEnd, DataMeta, IngressIfindex, RxQueueIndex, EgressIfindex uint32
}

// run runs the program once on in, as received on lb0.
func (e *xdpEnv) run(tb testing.TB, in []byte) (uint32, []byte) {
	tb.Helper()
	var ret uint32
	var out []byte
	e.inNS(tb, func() error {
		opts := ebpf.RunOptions{
			Data:    in,
			DataOut: make([]byte, len(in)+256),
			Context: xdpMd{DataEnd: uint32(len(in)), IngressIfindex: e.ifindex},
		}
		var err error
		ret, err = e.objs.XdpLb.Run(&opts)
		out = opts.DataOut
		return err
	})
	return ret, out
}

// set installs svc with backends and a table of all slots on backend
// pick (-1: none).
func (e *xdpEnv) set(tb testing.TB, svc XDPService, backends []netip.AddrPort, pick int) uint32 {
	tb.Helper()
	table := make([]int, XDPTableSize)
	for i := range table {
		table[i] = pick
	}
	gen, err := e.d.SetXDPService(svc, backends, table)
	if err != nil {
		tb.Fatalf("set %s: %v", svc, err)
	}
	return gen
}

func (e *xdpEnv) counters(tb testing.TB) map[XDPCounter]uint64 {
	tb.Helper()
	cs, err := e.d.xdpCounters()
	if err != nil {
		tb.Fatal(err)
	}
	out := map[XDPCounter]uint64{}
	for i, c := range cs {
		out[XDPCounter(i)] = c.Value
	}
	return out
}

// withMACs returns frame with the Ethernet addresses replaced.
func withMACs(frame []byte, dst, src net.HardwareAddr) []byte {
	f := append([]byte(nil), frame...)
	copy(f[0:6], dst)
	copy(f[6:12], src)
	return f
}

type xdpCase struct {
	name    string
	in      []byte
	verdict uint32
	want    []byte // nil: unchanged
	count   XDPCounter
}

// xdpCases is the table: every service has all its slots on its first
// backend, so the expected backend is known.
func xdpCases() (svcs map[XDPService][]netip.AddrPort, cs []xdpCase) {
	svcs = map[XDPService][]netip.AddrPort{}
	type fam struct {
		name           string
		client         netip.AddrPort
		vip            netip.Addr
		backend        func(int) netip.AddrPort
		local, noNeigh netip.AddrPort
	}
	payload := []byte("a query for www.example.com")
	for fi, f := range []fam{
		{"v4", client4, vip4, backendN4, local4, noNeigh4},
		{"v6", client6, vip6, backendN6, local6, noNeigh6},
	} {
		for _, proto := range []Proto{UDP, TCP} {
			name := f.name + "/" + proto.String()
			port := uint16(53)
			svc := XDPService{VIP: netip.AddrPortFrom(f.vip, port), Proto: proto}
			svcs[svc] = []netip.AddrPort{f.backend(1), f.backend(2)}
			in := pkt{src: f.client, dst: svc.VIP, proto: proto, payload: payload, id: 0x4242}
			out := in
			out.dst = f.backend(1)
			cs = append(cs, xdpCase{name + "/hit", in.frame(), xdpRedirect, withMACs(out.frame(), backendMAC(1), macLB1), XDPRedirected})

			// Port rewrite: VIP:8053 -> backend:53.
			prw := XDPService{VIP: netip.AddrPortFrom(f.vip, 8053), Proto: proto}
			svcs[prw] = []netip.AddrPort{f.backend(3)}
			in2 := in
			in2.dst = prw.VIP
			out2 := in
			out2.dst = f.backend(3)
			cs = append(cs, xdpCase{name + "/port-rewrite", in2.frame(), xdpRedirect, withMACs(out2.frame(), backendMAC(3), macLB1), XDPRedirected})

			// Backend on the ingress side: XDP_TX.
			tx := XDPService{VIP: netip.AddrPortFrom(f.vip, 9053), Proto: proto}
			svcs[tx] = []netip.AddrPort{f.local}
			in3 := in
			in3.dst = tx.VIP
			out3 := in
			out3.dst = f.local
			cs = append(cs, xdpCase{name + "/tx", in3.frame(), xdpTX, withMACs(out3.frame(), macLocal, macLB0), XDPTx})

			// Routed backend without a neighbour: rewritten, to the stack.
			fm := XDPService{VIP: netip.AddrPortFrom(f.vip, 10053), Proto: proto}
			svcs[fm] = []netip.AddrPort{f.noNeigh}
			in4 := in
			in4.dst = fm.VIP
			out4 := in
			out4.dst = f.noNeigh
			cs = append(cs, xdpCase{name + "/fib-miss", in4.frame(), xdpPass, out4.frame(), XDPFibMiss})

			// No eligible backend: dropped.
			none := XDPService{VIP: netip.AddrPortFrom(f.vip, 11053+uint16(fi)), Proto: proto}
			svcs[none] = nil
			in5 := in
			in5.dst = none.VIP
			cs = append(cs, xdpCase{name + "/no-backend", in5.frame(), xdpDrop, nil, XDPDropped})

			miss := in
			miss.dst = netip.AddrPortFrom(f.vip, 54)
			cs = append(cs, xdpCase{name + "/miss-port", miss.frame(), xdpPass, nil, XDPPassed})
			miss.dst = netip.AddrPortFrom(f.backend(4).Addr(), 53)
			cs = append(cs, xdpCase{name + "/miss-address", miss.frame(), xdpPass, nil, XDPPassed})

			// Fragments of a VIP datagram (first and later), and of another.
			big := in
			big.payload = make([]byte, 300)
			for i, fr := range big.fragments(128) {
				cs = append(cs, xdpCase{fmt.Sprintf("%s/fragment-%d", name, i), fr, xdpPass, nil, XDPFragments})
			}
			big.dst = miss.dst
			cs = append(cs, xdpCase{name + "/fragment-not-vip", big.fragments(128)[1], xdpPass, nil, XDPPassed})

			// Truncated in the L4 header.
			full := in.frame()
			l4 := ethLen + 20
			if f.name == "v6" {
				l4 = ethLen + 40
			}
			cs = append(cs, xdpCase{name + "/truncated", full[:l4+6], xdpPass, nil, XDPPassed})
		}
	}
	udp4 := pkt{src: client4, dst: vipPort4, proto: UDP, payload: []byte("q")}
	c0 := udp4
	c0.udpCsum0 = true
	o0 := c0
	o0.dst = backendN4(1)
	cs = append(cs, xdpCase{"v4/udp/checksum-0", c0.frame(), xdpRedirect, withMACs(o0.frame(), backendMAC(1), macLB1), XDPRedirected})
	opt := udp4
	opt.v4Options = []byte{1, 1, 1, 0} // NOP NOP NOP EOL
	cs = append(cs, xdpCase{"v4/udp/ip-options", opt.frame(), xdpPass, nil, XDPUnsupported})
	icmp := udp4
	icmp.rawProto = protoICMP
	cs = append(cs, xdpCase{"v4/icmp", icmp.frame(), xdpPass, nil, XDPPassed})
	cs = append(cs, xdpCase{"arp", arpFrame(), xdpPass, nil, XDPPassed})
	// IPv6 with a hop-by-hop header (next header byte rewritten): not followed.
	hbh := pkt{src: client6, dst: vipPort6, proto: UDP, payload: make([]byte, 16)}.frame()
	hbh[ethLen+6] = nextHopByHop
	cs = append(cs, xdpCase{"v6/hop-by-hop", hbh, xdpPass, nil, XDPUnsupported})
	cs = append(cs, xdpCase{"ethernet-only", make([]byte, ethLen), xdpPass, nil, XDPPassed})
	return svcs, cs
}

// TestXDPProgram runs xdp_lb under BPF_PROG_TEST_RUN on every branch; the
// expected packet is built from scratch with full checksums.
func TestXDPProgram(t *testing.T) {
	e := newXDPEnv(t)
	svcs, cs := xdpCases()
	for svc, bs := range svcs {
		pick := 0
		if len(bs) == 0 {
			pick = -1
		}
		e.set(t, svc, bs, pick)
	}
	for _, c := range cs {
		t.Run(c.name, func(t *testing.T) {
			before := e.counters(t)
			ret, out := e.run(t, c.in)
			if ret != c.verdict {
				t.Fatalf("verdict %s, want %s", xdpVerdicts[ret], xdpVerdicts[c.verdict])
			}
			want := c.want
			if want == nil {
				want = c.in
			}
			if !bytes.Equal(out, want) {
				t.Fatalf("packet differs:%s\ngot  %x\nwant %x", diffPacket(out, want), out, want)
			}
			if c.want != nil {
				checkChecksums(t, out)
			}
			after := e.counters(t)
			if after[c.count] != before[c.count]+1 {
				t.Errorf("counter %s: %d -> %d, want +1", c.count, before[c.count], after[c.count])
			}
			if after[XDPSeen] != before[XDPSeen]+1 {
				t.Errorf("seen: %d -> %d, want +1", before[XDPSeen], after[XDPSeen])
			}
		})
	}
}

const (
	tcpSYN = 0x02
	tcpACK = 0x10
)

// dstOf returns the destination address and port of a (rewritten) frame.
func dstOf(t *testing.T, frame []byte) netip.AddrPort {
	t.Helper()
	p, ok := parseGo(frame)
	if !ok {
		t.Fatalf("output is not IPv4/IPv6 UDP/TCP: %x", frame)
	}
	return netip.AddrPortFrom(p.daddr(frame), uint16(frame[p.l4+2])<<8|uint16(frame[p.l4+3]))
}

// TestXDPFlows: an established TCP flow keeps its backend across table
// changes (the backend marked down), a new flow (SYN) follows the new
// table, a flow whose backend left the service moves, and UDP (no
// connection table) follows the table at once. Both families.
func TestXDPFlows(t *testing.T) {
	e := newXDPEnv(t)
	for _, f := range []struct {
		name    string
		client  netip.AddrPort
		vip     netip.Addr
		backend func(int) netip.AddrPort
	}{{"v4", client4, vip4, backendN4}, {"v6", client6, vip6, backendN6}} {
		t.Run(f.name, func(t *testing.T) {
			b1, b2 := f.backend(1), f.backend(2)
			tcp := XDPService{VIP: netip.AddrPortFrom(f.vip, 80), Proto: TCP}
			udp := XDPService{VIP: netip.AddrPortFrom(f.vip, 80), Proto: UDP}
			both := []netip.AddrPort{b1, b2}
			e.set(t, tcp, both, 0)
			e.set(t, udp, both, 0)

			syn := pkt{src: f.client, dst: tcp.VIP, proto: TCP, tcpFlags: tcpSYN}
			est := syn
			est.tcpFlags = tcpACK
			other := est // a second established flow, another client port
			other.src = netip.AddrPortFrom(f.client.Addr(), 40001)
			dgram := pkt{src: f.client, dst: udp.VIP, proto: UDP, payload: []byte("q")}
			to := func(p pkt) netip.AddrPort {
				t.Helper()
				ret, out := e.run(t, p.frame())
				if ret != xdpRedirect {
					t.Fatalf("verdict %s, want XDP_REDIRECT", xdpVerdicts[ret])
				}
				checkChecksums(t, out)
				return dstOf(t, out)
			}
			for _, p := range []pkt{syn, est, other, dgram} {
				if got := to(p); got != b1 {
					t.Fatalf("before the change: %s went to %s, want %s", p.src, got, b1)
				}
			}
			// b1 marked down: every slot now on b2, b1 still configured.
			c0 := e.counters(t)
			e.set(t, tcp, both, 1)
			e.set(t, udp, both, 1)
			if got := to(est); got != b1 {
				t.Errorf("established flow moved to %s after the table change, want it kept on %s", got, b1)
			}
			if got := to(other); got != b1 {
				t.Errorf("second established flow moved to %s, want %s", got, b1)
			}
			if c1 := e.counters(t); c1[XDPFlowHit] != c0[XDPFlowHit]+2 {
				t.Errorf("flow_hit %d -> %d, want +2", c0[XDPFlowHit], c1[XDPFlowHit])
			}
			if got := to(dgram); got != b2 {
				t.Errorf("UDP went to %s after the change, want %s (the new table)", got, b2)
			}
			newFlow := syn
			newFlow.src = netip.AddrPortFrom(f.client.Addr(), 40002)
			if got := to(newFlow); got != b2 {
				t.Errorf("new flow went to down backend %s, want %s", got, b2)
			}
			// A SYN reusing the first flow's 5-tuple is a new connection.
			if got := to(syn); got != b2 {
				t.Errorf("SYN on a reused 5-tuple went to %s, want the table's %s", got, b2)
			}
			if got := to(est); got != b2 {
				t.Errorf("the reused 5-tuple's next packet went to %s, want %s", got, b2)
			}
			// b1 leaves the service: its flows move on their next packet.
			e.set(t, tcp, []netip.AddrPort{b2}, 0)
			if got := to(other); got != b2 {
				t.Errorf("flow of a removed backend stayed on %s, want %s", got, b2)
			}
		})
	}
}

// TestXDPServiceState: generations count table swaps, shares follow the
// table, flows spread over every backend, counters per service and
// backend add up, and deleting a service passes its packets.
func TestXDPServiceState(t *testing.T) {
	e := newXDPEnv(t)
	svc := XDPService{VIP: vipPort4, Proto: UDP}
	bs := []netip.AddrPort{backendN4(1), backendN4(2), backendN4(3), backendN4(4)}
	table := make([]int, XDPTableSize)
	for i := range table {
		table[i] = i % 4
	}
	for want := uint32(1); want <= 3; want++ {
		gen, err := e.d.SetXDPService(svc, bs, table)
		if err != nil {
			t.Fatal(err)
		}
		if gen != want {
			t.Fatalf("generation %d, want %d", gen, want)
		}
	}
	const flows = 400
	seen := map[netip.AddrPort]int{}
	var nbytes uint64
	for i := range flows {
		p := pkt{src: netip.AddrPortFrom(client4.Addr(), uint16(20000+i)), dst: vipPort4, proto: UDP, payload: []byte("q")}
		f := p.frame()
		nbytes += uint64(len(f))
		ret, out := e.run(t, f)
		if ret != xdpRedirect {
			t.Fatalf("verdict %s", xdpVerdicts[ret])
		}
		seen[dstOf(t, out)]++
	}
	st, err := e.d.XDPServices()
	if err != nil {
		t.Fatal(err)
	}
	if len(st) != 1 || st[0].XDPService != svc || st[0].Generation != 3 {
		t.Fatalf("services %+v, want %s at generation 3", st, svc)
	}
	if st[0].Packets != flows || st[0].Bytes != nbytes {
		t.Errorf("service counted %d packets %d bytes, want %d, %d", st[0].Packets, st[0].Bytes, flows, nbytes)
	}
	var slots int
	for _, b := range st[0].Backends {
		slots += b.Slots
		if b.Slots < XDPTableSize/4 || b.Slots > XDPTableSize/4+1 {
			t.Errorf("backend %s has %d slots, want about %d", b.Addr, b.Slots, XDPTableSize/4)
		}
		if b.Packets != uint64(seen[b.Addr]) || seen[b.Addr] == 0 {
			t.Errorf("backend %s: counter %d packets, %d seen going there (want equal, > 0)", b.Addr, b.Packets, seen[b.Addr])
		}
	}
	if slots != XDPTableSize || len(st[0].Backends) != 4 {
		t.Errorf("%d backends with %d slots, want 4 with %d", len(st[0].Backends), slots, XDPTableSize)
	}
	if err := e.d.DelXDPService(svc); err != nil {
		t.Fatal(err)
	}
	in := pkt{src: client4, dst: vipPort4, proto: UDP, payload: []byte("q")}.frame()
	if ret, out := e.run(t, in); ret != xdpPass || !bytes.Equal(out, in) {
		t.Errorf("after delete: %s, changed=%v; want XDP_PASS unchanged", xdpVerdicts[ret], !bytes.Equal(out, in))
	}
	if st, err := e.d.XDPServices(); err != nil || len(st) != 0 {
		t.Errorf("after delete: %v, %v; want none", st, err)
	}
}

// TestXDPSetServiceErrors: bad input is refused with the reason.
func TestXDPSetServiceErrors(t *testing.T) {
	e := newXDPEnv(t)
	ok := make([]int, XDPTableSize)
	svc := XDPService{VIP: vipPort4, Proto: UDP}
	for _, c := range []struct {
		name  string
		svc   XDPService
		bs    []netip.AddrPort
		table []int
	}{
		{"short table", svc, []netip.AddrPort{backendN4(1)}, ok[:100]},
		{"slot out of range", svc, nil, ok},
		{"family mismatch", svc, []netip.AddrPort{backendN6(1)}, ok},
		{"no port", XDPService{VIP: netip.AddrPortFrom(vip4, 0), Proto: UDP}, []netip.AddrPort{backendN4(1)}, ok},
		{"bad proto", XDPService{VIP: vipPort4, Proto: 1}, []netip.AddrPort{backendN4(1)}, ok},
	} {
		if _, err := e.d.SetXDPService(c.svc, c.bs, c.table); err == nil {
			t.Errorf("%s: accepted", c.name)
		}
	}
	if err := e.d.DelXDPService(svc); !errorsIs(err, ErrNoService) {
		t.Errorf("delete of a missing service: %v, want ErrNoService", err)
	}
}

// TestXDPSwapNeverDrops: while the table of a service is swapped between
// "every slot on backend 1" and "every slot on backend 2" as fast as the
// Go side can, packets of many flows are forwarded to one of the two,
// never dropped or passed: no packet sees a table being cleared or
// half-filled.
func TestXDPSwapNeverDrops(t *testing.T) {
	e := newXDPEnv(t)
	svc := XDPService{VIP: vipPort4, Proto: UDP}
	bs := []netip.AddrPort{backendN4(1), backendN4(2)}
	e.set(t, svc, bs, 0)
	stop := make(chan struct{})
	swapped := make(chan int)
	go func() {
		n := 0
		defer func() { swapped <- n }()
		for {
			select {
			case <-stop:
				return
			default:
			}
			table := make([]int, XDPTableSize)
			for i := range table {
				table[i] = n % 2
			}
			if _, err := e.d.SetXDPService(svc, bs, table); err != nil {
				t.Errorf("swap %d: %v", n, err)
				return
			}
			n++
		}
	}()
	seen := map[netip.AddrPort]int{}
	e.inNS(t, func() error {
		for i := 0; i < 20000; i++ {
			in := pkt{src: netip.AddrPortFrom(client4.Addr(), uint16(1024+i%50000)), dst: vipPort4, proto: UDP, payload: []byte("q")}.frame()
			opts := ebpf.RunOptions{Data: in, DataOut: make([]byte, len(in)+256), Context: xdpMd{DataEnd: uint32(len(in)), IngressIfindex: e.ifindex}}
			ret, err := e.objs.XdpLb.Run(&opts)
			if err != nil {
				return err
			}
			if ret != xdpRedirect {
				return fmt.Errorf("packet %d: verdict %s during table swaps, want XDP_REDIRECT", i, xdpVerdicts[ret])
			}
			p, _ := parseGo(opts.DataOut)
			seen[netip.AddrPortFrom(p.daddr(opts.DataOut), 53)]++
		}
		return nil
	})
	close(stop)
	n := <-swapped
	t.Logf("20000 packets during %d table swaps: %v", n, seen)
	if n < 2 {
		t.Errorf("only %d swaps happened during the run", n)
	}
	for a := range seen {
		if a != bs[0] && a != bs[1] {
			t.Errorf("packet sent to %s, not a backend", a)
		}
	}
}
