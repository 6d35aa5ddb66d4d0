package dataplane

import (
	"bytes"
	"encoding/binary"
	"errors"
	"fmt"
	"net"
	"net/netip"
	"syscall"
	"testing"

	"github.com/cilium/ebpf"
	"go.uber.org/zap"
	"golang.org/x/sys/unix"

	"github.com/lbctl/lbctl/test/testenv"
)

// skbCtx is struct __sk_buff (192 bytes) for BPF_PROG_TEST_RUN's context:
// only mark (offset 8) matters here; len and pkt_type must be 0 on input.
type skbCtx struct {
	Len, PktType, Mark uint32
	Rest               [45]uint32
}

const testMark = 0x1062

var (
	upstream4 = netip.MustParseAddrPort("198.19.16.11:80")
	upstream6 = netip.MustParseAddrPort("[2001:db8:16::11]:80")
)

// steerProgT is the steer program with fresh, unpinned maps.
type steerProgT struct {
	objs steerObjects
	d    *Dataplane
}

func newSteerProg(tb testing.TB, checkSocket bool) *steerProgT {
	tb.Helper()
	testenv.RequireRoot(tb)
	spec, err := loadSteer()
	if err != nil {
		tb.Fatalf("load steer spec: %v", err)
	}
	if err := spec.Variables["steer_mark"].Set(uint32(testMark)); err != nil {
		tb.Fatalf("set mark: %v", err)
	}
	check := uint8(0)
	if checkSocket {
		check = 1
	}
	if err := spec.Variables["steer_check_socket"].Set(check); err != nil {
		tb.Fatalf("set socket check: %v", err)
	}
	sp := &steerProgT{}
	if err := spec.LoadAndAssign(&sp.objs, nil); err != nil {
		tb.Fatalf("load steer: %v", err)
	}
	tb.Cleanup(func() { sp.objs.Close() })
	sp.d = &Dataplane{log: zap.NewNop(), steer: sp.objs.steerMaps}
	return sp
}

func (sp *steerProgT) add(tb testing.TB, proto Proto, aps ...netip.AddrPort) {
	tb.Helper()
	for _, ap := range aps {
		if err := sp.d.AddSteerUpstream(proto, ap); err != nil {
			tb.Fatalf("add %s %s: %v", proto, ap, err)
		}
	}
}

// run runs the program on in with skb->mark = markIn and returns the
// output frame and mark.
func (sp *steerProgT) run(tb testing.TB, in []byte, markIn uint32) ([]byte, uint32) {
	tb.Helper()
	ctxIn, ctxOut := skbCtx{Mark: markIn}, skbCtx{}
	opts := ebpf.RunOptions{Data: in, DataOut: make([]byte, len(in)+256), Context: &ctxIn, ContextOut: &ctxOut}
	ret, err := sp.objs.SteerIngress.Run(&opts)
	if err != nil {
		tb.Fatalf("run steer: %v", err)
	}
	if ret != tcActUnspec {
		tb.Fatalf("steer returned %d, want TC_ACT_UNSPEC (pass)", int32(ret))
	}
	return opts.DataOut, ctxOut.Mark
}

func (sp *steerProgT) counters(tb testing.TB) Stats {
	tb.Helper()
	cs, err := sp.d.SteerCounters()
	if err != nil {
		tb.Fatalf("counters: %v", err)
	}
	return Stats{Steer: cs}
}

type steerCase struct {
	name    string
	proto   Proto            // protocol of the configured upstream
	up      []netip.AddrPort // configured upstreams
	in      []byte
	steered bool
	count   SteerCounter // counter that must rise by one
}

func steerCases() []steerCase {
	var cs []steerCase
	for _, f := range []struct {
		name        string
		up, client  netip.AddrPort
		otherAddr   netip.Addr
		wrongFamily netip.AddrPort
	}{
		{"v4", upstream4, client4, netip.MustParseAddr("198.19.16.12"), upstream6},
		{"v6", upstream6, client6, netip.MustParseAddr("2001:db8:16::12"), upstream4},
	} {
		for _, proto := range []Proto{TCP, UDP} {
			base := pkt{src: f.up, dst: f.client, proto: proto, payload: []byte("HTTP/1.1 200 OK"), id: 0x42}
			name := fmt.Sprintf("%s/%s", f.name, proto)
			cs = append(cs, steerCase{name: name + "/match", proto: proto, up: []netip.AddrPort{f.up}, in: base.frame(), steered: true, count: SteerSteered})
			miss := base
			miss.src = netip.AddrPortFrom(f.otherAddr, f.up.Port())
			cs = append(cs, steerCase{name: name + "/miss-address", proto: proto, up: []netip.AddrPort{f.up}, in: miss.frame(), count: SteerNotMatched})
			miss = base
			miss.src = netip.AddrPortFrom(f.up.Addr(), 8080)
			cs = append(cs, steerCase{name: name + "/miss-port", proto: proto, up: []netip.AddrPort{f.up}, in: miss.frame(), count: SteerNotMatched})
			cs = append(cs, steerCase{name: name + "/miss-proto", proto: UDP + TCP - proto, up: []netip.AddrPort{f.up}, in: base.frame(), count: SteerNotMatched})
			// The destination port of a packet to the upstream is not its source.
			toUp := pkt{src: f.client, dst: f.up, proto: proto, payload: []byte("GET /")}
			cs = append(cs, steerCase{name: name + "/miss-towards-upstream", proto: proto, up: []netip.AddrPort{f.up}, in: toUp.frame(), count: SteerNotMatched})
			cs = append(cs, steerCase{name: name + "/miss-other-family", proto: proto, up: []netip.AddrPort{f.wrongFamily}, in: base.frame(), count: SteerNotMatched})
		}
	}
	udp4 := pkt{src: upstream4, dst: client4, proto: UDP, payload: []byte("answer"), id: 7}
	opts := udp4
	opts.v4Options = []byte{0x94, 0x04, 0, 0}
	icmp := udp4
	icmp.proto, icmp.rawProto = 0, protoICMP
	full4 := udp4.frame()
	full6 := pkt{src: upstream6, dst: client6, proto: TCP, payload: []byte("x")}.frame()
	ups := []netip.AddrPort{upstream4, upstream6}
	return append(cs,
		steerCase{name: "v4/udp/ip-options", proto: UDP, up: ups, in: opts.frame(), steered: true, count: SteerSteered},
		steerCase{name: "non-ip/arp", proto: UDP, up: ups, in: arpFrame(), count: SteerNotParsed},
		steerCase{name: "v4/icmp", proto: UDP, up: ups, in: icmp.frame(), count: SteerNotParsed},
		steerCase{name: "truncated/v4-udp-header", proto: UDP, up: ups, in: full4[:ethLen+20+6], count: SteerNotParsed},
		steerCase{name: "truncated/v6-tcp-header", proto: TCP, up: ups, in: full6[:ethLen+40+16], count: SteerNotParsed},
	)
}

// TestSteerProgram: the table of packets, each through a fresh program.
// The frame never changes; the mark is set exactly when the source is a
// configured upstream of the packet's protocol, and a mark set before on a
// packet that does not match is kept.
func TestSteerProgram(t *testing.T) {
	for _, c := range steerCases() {
		t.Run(c.name, func(t *testing.T) {
			sp := newSteerProg(t, false)
			sp.add(t, c.proto, c.up...)
			for _, markIn := range []uint32{0, 7} {
				out, mark := sp.run(t, append([]byte(nil), c.in...), markIn)
				if !bytes.Equal(out, c.in) {
					t.Fatalf("frame changed:%s", diffPacket(out, c.in))
				}
				want := markIn
				if c.steered {
					want = testMark
				}
				if mark != want {
					t.Errorf("mark in %#x: out %#x, want %#x", markIn, mark, want)
				}
			}
			st := sp.counters(t)
			if got := st.SteerCounter(SteerSeen); got != 2 {
				t.Errorf("seen = %d, want 2", got)
			}
			if got := st.SteerCounter(c.count); got != 2 {
				t.Errorf("%s = %d, want 2 (counters %v)", c.count, got, st.Steer)
			}
			if got := st.SteerCounter(SteerNoSocket); got != 0 {
				t.Errorf("no_socket = %d with the socket check off", got)
			}
			ups, err := sp.d.SteerUpstreams()
			if err != nil {
				t.Fatal(err)
			}
			var marked uint64
			for _, u := range ups {
				marked += u.Packets
			}
			if wantMarked := map[bool]uint64{true: 2}[c.steered]; marked != wantMarked {
				t.Errorf("per-upstream packets = %d, want %d", marked, wantMarked)
			}
		})
	}
}

// TestSteerFragments: later fragments follow their first fragment; a
// later fragment whose first was never seen is not steered.
func TestSteerFragments(t *testing.T) {
	payload := bytes.Repeat([]byte("0123456789abcdef"), 190)
	for _, up := range []netip.AddrPort{upstream4, upstream6} {
		dst := client4
		if up.Addr().Is6() {
			dst = client6
		}
		t.Run(family(up.Addr()), func(t *testing.T) {
			sp := newSteerProg(t, false)
			sp.add(t, UDP, up)
			p := pkt{src: up, dst: dst, proto: UDP, payload: payload, id: 0xbeef}
			frags := p.fragments(1232)
			if len(frags) != 3 {
				t.Fatalf("%d fragments, want 3", len(frags))
			}
			stray := p
			stray.id = 0xf00d
			if _, mark := sp.run(t, stray.fragments(1232)[1], 0); mark != 0 {
				t.Errorf("later fragment without its first: mark %#x, want 0", mark)
			}
			for i, fr := range frags {
				out, mark := sp.run(t, append([]byte(nil), fr...), 0)
				if !bytes.Equal(out, fr) {
					t.Errorf("fragment %d changed", i)
				}
				if mark != testMark {
					t.Errorf("fragment %d: mark %#x, want %#x", i, mark, testMark)
				}
			}
			st := sp.counters(t)
			if st.SteerCounter(SteerSteered) != 3 || st.SteerCounter(SteerFragments) != 2 || st.SteerCounter(SteerNotMatched) != 1 {
				t.Errorf("counters %v: want steered 3, fragments 2, not_matched 1", st.Steer)
			}
		})
	}
}

// TestSteerSocketCheck: with the check on, a steered packet whose
// 4-tuple has a local socket is not counted as no_socket; one without is.
// Real sockets in a fresh network namespace (the test run's skb lives on
// that namespace's loopback).
func TestSteerSocketCheck(t *testing.T) {
	testenv.RequireRoot(t)
	testenv.RequireCommand(t, "ip")
	inNetns(t, func() {
		if !ipCmd(t, "link", "set", "lo", "up") ||
			!ipCmd(t, "addr", "add", "198.19.16.11/32", "dev", "lo") ||
			!ipCmd(t, "addr", "add", "198.18.99.1/32", "dev", "lo") ||
			!ipCmd(t, "addr", "add", "2001:db8:16::11/128", "dev", "lo", "nodad") ||
			!ipCmd(t, "addr", "add", "2001:db8:99::1/128", "dev", "lo", "nodad") {
			return
		}
		sp := newSteerProg(t, true)
		for _, c := range []struct {
			proto      Proto
			up, client netip.AddrPort
		}{
			{TCP, upstream4, client4}, {UDP, upstream4, client4},
			{TCP, upstream6, client6}, {UDP, upstream6, client6},
		} {
			name := fmt.Sprintf("%s/%s", c.proto, family(c.up.Addr()))
			if err := sp.d.AddSteerUpstream(c.proto, c.up); err != nil {
				t.Errorf("%s: add: %v", name, err)
				return
			}
			closeAll, err := socketPair(c.proto, c.up, c.client)
			if err != nil {
				t.Errorf("%s: sockets: %v", name, err)
				return
			}
			before := sp.counters(t).SteerCounter(SteerNoSocket)
			reply := pkt{src: c.up, dst: c.client, proto: c.proto, payload: []byte("reply")}
			if _, mark := sp.run(t, reply.frame(), 0); mark != testMark {
				t.Errorf("%s: mark %#x, want %#x", name, mark, testMark)
			}
			if got := sp.counters(t).SteerCounter(SteerNoSocket); got != before {
				t.Errorf("%s: no_socket rose with a socket present", name)
			}
			stray := reply
			stray.dst = netip.AddrPortFrom(c.client.Addr(), 40001)
			sp.run(t, stray.frame(), 0)
			if got := sp.counters(t).SteerCounter(SteerNoSocket); got != before+1 {
				t.Errorf("%s: no_socket %d after a reply to a port without socket, want %d", name, got, before+1)
			}
			closeAll()
		}
	})
}

// socketPair makes a socket at client connected to up (TCP: up listens).
func socketPair(proto Proto, up, client netip.AddrPort) (func(), error) {
	laddr := func(network string) net.Addr {
		if network == "tcp" {
			return net.TCPAddrFromAddrPort(client)
		}
		return net.UDPAddrFromAddrPort(client)
	}
	if proto == UDP {
		c, err := net.DialUDP("udp", laddr("udp").(*net.UDPAddr), net.UDPAddrFromAddrPort(up))
		if err != nil {
			return nil, err
		}
		return func() { c.Close() }, nil
	}
	ln, err := net.ListenTCP("tcp", net.TCPAddrFromAddrPort(up))
	if err != nil {
		return nil, err
	}
	d := net.Dialer{LocalAddr: laddr("tcp"), Control: func(_, _ string, c syscall.RawConn) error {
		var serr error
		err := c.Control(func(fd uintptr) { serr = unix.SetsockoptInt(int(fd), unix.SOL_SOCKET, unix.SO_REUSEADDR, 1) })
		return errors.Join(err, serr)
	}}
	c, err := d.Dial("tcp", up.String())
	if err != nil {
		ln.Close()
		return nil, err
	}
	return func() { c.Close(); ln.Close() }, nil
}

func TestSteerUpstreamMap(t *testing.T) {
	sp := newSteerProg(t, false)
	d := sp.d
	if err := d.AddSteerUpstream(TCP, upstream4); err != nil {
		t.Fatal(err)
	}
	if err := d.AddSteerUpstream(TCP, upstream4); !errors.Is(err, ErrUpstreamExists) {
		t.Errorf("second add: %v, want ErrUpstreamExists", err)
	}
	if err := d.AddSteerUpstream(UDP, upstream4); err != nil {
		t.Errorf("same address, other protocol: %v", err)
	}
	mapped := netip.AddrPortFrom(netip.AddrFrom16(upstream4.Addr().As16()), 80)
	if err := d.AddSteerUpstream(TCP, mapped); !errors.Is(err, ErrUpstreamExists) {
		t.Errorf("IPv4-mapped form of an added upstream: %v, want ErrUpstreamExists", err)
	}
	for _, bad := range []netip.AddrPort{{}, netip.AddrPortFrom(upstream4.Addr(), 0)} {
		if err := d.AddSteerUpstream(TCP, bad); err == nil {
			t.Errorf("add %s: no error", bad)
		}
	}
	if err := d.AddSteerUpstream(Proto(1), upstream6); err == nil {
		t.Errorf("add with protocol 1: no error")
	}
	if err := d.AddSteerUpstream(TCP, upstream6); err != nil {
		t.Fatal(err)
	}
	got, err := d.SteerUpstreams()
	if err != nil {
		t.Fatal(err)
	}
	want := []SteerUpstream{{Proto: TCP, Addr: upstream4}, {Proto: UDP, Addr: upstream4}, {Proto: TCP, Addr: upstream6}}
	if fmt.Sprint(got) != fmt.Sprint(want) {
		t.Errorf("list = %v, want %v", got, want)
	}
	if err := d.DelSteerUpstream(UDP, upstream4); err != nil {
		t.Errorf("del: %v", err)
	}
	if err := d.DelSteerUpstream(UDP, upstream4); !errors.Is(err, ErrRuleNotFound) {
		t.Errorf("second del: %v, want ErrRuleNotFound", err)
	}
	if got, _ := d.SteerUpstreams(); len(got) != 2 {
		t.Errorf("after del: %v", got)
	}
}

// FuzzSteer: whatever the frame, the output frame is the input and the
// mark is either unchanged or the steer mark, the latter only for IPv4/IPv6
// UDP/TCP from a configured upstream (or a later fragment).
func FuzzSteer(f *testing.F) {
	for _, c := range steerCases() {
		f.Add(c.in)
	}
	p := pkt{src: upstream6, dst: client6, proto: UDP, payload: make([]byte, 300), id: 2}
	for _, fr := range p.fragments(128) {
		f.Add(fr)
	}
	sp := newSteerProg(f, false)
	sp.add(f, TCP, upstream4, upstream6)
	sp.add(f, UDP, upstream4, upstream6)
	f.Fuzz(func(t *testing.T, in []byte) {
		if len(in) < ethLen || len(in) > 1600 {
			return
		}
		ctxIn, ctxOut := skbCtx{Mark: 5}, skbCtx{}
		opts := ebpf.RunOptions{Data: in, DataOut: make([]byte, len(in)+256), Context: &ctxIn, ContextOut: &ctxOut}
		ret, err := sp.objs.SteerIngress.Run(&opts)
		if errors.Is(err, unix.EINVAL) {
			return // the test-run harness refuses frames with a cut IP header
		}
		if err != nil {
			t.Fatalf("run: %v", err)
		}
		if ret != tcActUnspec {
			t.Fatalf("returned %d, want TC_ACT_UNSPEC", int32(ret))
		}
		if !bytes.Equal(opts.DataOut, in) {
			t.Fatalf("frame changed\nin:  %x\nout: %x", in, opts.DataOut)
		}
		switch ctxOut.Mark {
		case 5:
		case testMark:
			gp, ok := parseGo(in)
			if !ok {
				t.Fatalf("mark set on a frame that is not IPv4/IPv6 UDP/TCP: %x", in)
			}
			if gp.later {
				return
			}
			s0, s1 := gp.saddr(in)
			src, _ := netip.AddrFromSlice(in[s0:s1])
			if len(in) < gp.l4+2 {
				t.Fatalf("mark set without a source port: %x", in)
			}
			ap := netip.AddrPortFrom(src, binary.BigEndian.Uint16(in[gp.l4:]))
			if ap != upstream4 && ap != upstream6 {
				t.Fatalf("mark set on a packet from %s, not an upstream", ap)
			}
		default:
			t.Fatalf("mark %#x: want 5 (unchanged) or %#x", ctxOut.Mark, testMark)
		}
	})
}
