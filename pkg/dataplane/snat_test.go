package dataplane

import (
	"bytes"
	"encoding/binary"
	"fmt"
	"net/netip"
	"slices"
	"sort"
	"testing"

	"github.com/cilium/ebpf"
	"go.uber.org/zap"

	"github.com/lbctl/lbctl/test/testenv"
)

// tcActUnspec is TC_ACT_UNSPEC (-1): "pass, let the next program decide".
const tcActUnspec = 0xffffffff

var (
	backend4 = netip.MustParseAddrPort("198.19.16.11:53")
	client4  = netip.MustParseAddrPort("198.18.99.1:40000")
	vip4     = netip.MustParseAddr("198.18.98.10")
	other4   = netip.MustParseAddrPort("198.19.17.11:53")
	backend6 = netip.MustParseAddrPort("[2001:db8:16::11]:53")
	client6  = netip.MustParseAddrPort("[2001:db8:99::1]:40000")
	vip6     = netip.MustParseAddr("2001:db8:98::10")
	other6   = netip.MustParseAddrPort("[2001:db8:17::11]:53")
	net4     = netip.MustParsePrefix("198.19.16.0/28")
	net6     = netip.MustParsePrefix("2001:db8:16::/120") // ::11-::14 (not in DESIGN's example ::/124)
)

// testProg is the snat program with fresh, unpinned maps.
type testProg struct {
	objs snatObjects
	d    *Dataplane
}

func newTestProg(tb testing.TB) *testProg { return newTestProgCsum(tb, csumInline) }

// How the program under test updates L4 checksums (snatChecksumMode).
type csumMode string

const (
	csumInline = csumMode("inline") // written by the program (root has CAP_PERFMON)
	csumHelper = csumMode("helper") // bpf_l4_csum_replace, as without CAP_PERFMON
	csumNoBTF  = csumMode("no-btf") // helper, relocated against the stub kernel types
)

func newTestProgCsum(tb testing.TB, mode csumMode) *testProg {
	tb.Helper()
	testenv.RequireRoot(tb)
	tp := &testProg{}
	spec, err := loadSnat()
	if err != nil {
		tb.Fatalf("load snat spec: %v", err)
	}
	var opts ebpf.CollectionOptions
	if mode != csumInline {
		if err := spec.Variables[snatVarCsumHelper].Set(uint8(1)); err != nil {
			tb.Fatalf("set %s: %v", snatVarCsumHelper, err)
		}
	}
	if mode == csumNoBTF {
		if opts.Programs.KernelTypes, err = stubSkbTypes(); err != nil {
			tb.Fatal(err)
		}
	}
	if err := spec.LoadAndAssign(&tp.objs, &opts); err != nil {
		tb.Fatalf("load snat: %v", err)
	}
	tb.Cleanup(func() { tp.objs.Close() })
	tp.d = &Dataplane{log: zap.NewNop(), snat: tp.objs.snatMaps}
	tb.Cleanup(tp.d.unmapSlots) // before the maps close (cleanups run last first)
	return tp
}

func (tp *testProg) add(tb testing.TB, rules ...SNATRule) {
	tb.Helper()
	for _, r := range rules {
		if err := tp.d.AddSNAT(r); err != nil {
			tb.Fatalf("add %s: %v", r, err)
		}
	}
}

// run runs the program once on in and returns the output packet.
func (tp *testProg) run(tb testing.TB, in []byte) []byte {
	tb.Helper()
	opts := ebpf.RunOptions{Data: in, DataOut: make([]byte, len(in)+256)}
	ret, err := tp.objs.SnatEgress.Run(&opts)
	if err != nil {
		tb.Fatalf("run snat: %v", err)
	}
	if ret != tcActUnspec {
		tb.Fatalf("snat returned %d, want TC_ACT_UNSPEC (pass)", int32(ret))
	}
	return opts.DataOut
}

func (tp *testProg) stats(tb testing.TB) Stats {
	tb.Helper()
	st, err := tp.d.Stats()
	if err != nil {
		tb.Fatalf("stats: %v", err)
	}
	return st
}

// rewrite returns p with its source replaced by to (and port, if not 0).
func rewrite(p pkt, to netip.Addr, port uint16) pkt {
	if port == 0 {
		port = p.src.Port()
	}
	p.src = netip.AddrPortFrom(to, port)
	return p
}

// diffPacket describes how got differs from want, field by field.
func diffPacket(got, want []byte) string {
	if bytes.Equal(got, want) {
		return ""
	}
	if len(got) != len(want) {
		return fmt.Sprintf("length %d, want %d", len(got), len(want))
	}
	names := func(i int) string {
		et := binary.BigEndian.Uint16(want[12:])
		switch {
		case i < ethLen:
			return "ethernet"
		case et == etherTypeV4 && i >= 26 && i < 30:
			return "ipv4 saddr"
		case et == etherTypeV4 && i >= 24 && i < 26:
			return "ipv4 checksum"
		case et == etherTypeV6 && i >= 22 && i < 38:
			return "ipv6 saddr"
		}
		return "other"
	}
	var s string
	for i := range got {
		if got[i] != want[i] {
			s += fmt.Sprintf(" byte %d (%s): %#02x want %#02x;", i, names(i), got[i], want[i])
		}
	}
	return s
}

// checkChecksums verifies out's checksums by full computation.
func checkChecksums(t *testing.T, out []byte) {
	t.Helper()
	switch binary.BigEndian.Uint16(out[12:]) {
	case etherTypeV4:
		hl := int(out[ethLen]&0xf) * 4
		if !ipv4HeaderOK(out[ethLen : ethLen+hl]) {
			t.Errorf("IPv4 header checksum invalid")
		}
		src, _ := netip.AddrFromSlice(out[26:30])
		dst, _ := netip.AddrFromSlice(out[30:34])
		seg := out[ethLen+hl:]
		proto := out[ethLen+9]
		if proto == uint8(UDP) && binary.BigEndian.Uint16(seg[6:]) == 0 {
			return // no checksum
		}
		if !l4ChecksumOK(src, dst, proto, seg) {
			t.Errorf("L4 checksum invalid")
		}
	case etherTypeV6:
		src, _ := netip.AddrFromSlice(out[22:38])
		dst, _ := netip.AddrFromSlice(out[38:54])
		if !l4ChecksumOK(src, dst, out[ethLen+6], out[ethLen+40:]) {
			t.Errorf("L4 checksum invalid")
		}
	}
}

type snatCase struct {
	name  string
	rules []SNATRule
	in    []byte
	want  []byte      // nil: unchanged
	count SNATCounter // counter that must rise by one
}

func matrixCases() []snatCase {
	var cs []snatCase
	type fam struct {
		name                   string
		backend, client, other netip.AddrPort
		vip                    netip.Addr
		net                    netip.Prefix
	}
	fams := []fam{
		{"v4", backend4, client4, other4, vip4, net4},
		{"v6", backend6, client6, other6, vip6, net6},
	}
	for _, f := range fams {
		for _, proto := range []Proto{UDP, TCP} {
			for _, toPort := range []uint16{0, 5353} {
				rule := SNATRule{Src: f.net, Proto: proto, SPort: 53, To: f.vip, ToPort: toPort}
				base := pkt{src: f.backend, dst: f.client, proto: proto, payload: []byte("answer to the query"), id: 0x1234}
				name := fmt.Sprintf("%s/%s/port-%d", f.name, proto, toPort)
				cs = append(cs, snatCase{
					name: name + "/hit", rules: []SNATRule{rule}, in: base.frame(),
					want: rewrite(base, f.vip, toPort).frame(), count: SNATRewritten,
				})
				miss := base
				miss.src = f.other
				cs = append(cs, snatCase{
					name: name + "/miss-source", rules: []SNATRule{rule}, in: miss.frame(), count: SNATNoMatch,
				})
				miss = base
				miss.src = netip.AddrPortFrom(f.backend.Addr(), 54)
				cs = append(cs, snatCase{
					name: name + "/miss-port", rules: []SNATRule{rule}, in: miss.frame(), count: SNATNoMatch,
				})
				other := rule
				other.Proto = UDP + TCP - proto
				cs = append(cs, snatCase{
					name: name + "/miss-proto", rules: []SNATRule{other}, in: base.frame(), count: SNATNoMatch,
				})
			}
		}
	}
	return cs
}

func specialCases() []snatCase {
	rule4 := SNATRule{Src: net4, Proto: UDP, SPort: 53, To: vip4, ToPort: 5353}
	rule6 := SNATRule{Src: net6, Proto: UDP, SPort: 53, To: vip6}
	udp4 := pkt{src: backend4, dst: client4, proto: UDP, payload: []byte("dns answer"), id: 7}
	udp6 := pkt{src: backend6, dst: client6, proto: UDP, payload: []byte("dns answer")}
	tcp6 := pkt{src: backend6, dst: client6, proto: TCP, payload: []byte("x")}

	csum0 := udp4
	csum0.udpCsum0 = true
	opts := udp4
	opts.v4Options = []byte{0x94, 0x04, 0, 0} // router alert
	icmp := udp4
	icmp.proto, icmp.rawProto = 0, protoICMP

	// IPv6 with a hop-by-hop options header before UDP: not followed.
	hbh := udp6.frame()
	hbh[ethLen+6] = nextHopByHop
	binary.BigEndian.PutUint16(hbh[ethLen+4:], binary.BigEndian.Uint16(hbh[ethLen+4:])+8)
	hbh = append(hbh[:ethLen+40], append([]byte{uint8(UDP), 0, 1, 4, 0, 0, 0, 0}, hbh[ethLen+40:]...)...)

	// Pre-computed whole frames, cut short.
	full4, full6 := udp4.frame(), tcp6.frame()
	optFull := opts.frame()
	frag6 := pkt{src: backend6, dst: client6, proto: UDP, payload: make([]byte, 100), id: 9}.fragments(64)
	// An 802.1Q-tagged frame: the program does not look inside VLAN tags.
	vlan := append(append(append([]byte(nil), full4[:12]...), 0x81, 0x00, 0x00, 0x05), full4[12:]...)

	return []snatCase{
		{name: "v4/udp/checksum-0-stays-0", rules: []SNATRule{rule4}, in: csum0.frame(),
			want: rewrite(csum0, vip4, 5353).frame(), count: SNATRewritten},
		{name: "v4/udp/ip-options", rules: []SNATRule{rule4}, in: opts.frame(),
			want: rewrite(opts, vip4, 5353).frame(), count: SNATRewritten},
		{name: "v6/udp/any-port-rule", rules: []SNATRule{{Src: net6, Proto: UDP, To: vip6}}, in: udp6.frame(),
			want: rewrite(udp6, vip6, 0).frame(), count: SNATRewritten},
		{name: "v6/udp/exact-host-prefix", rules: []SNATRule{{Src: netip.PrefixFrom(backend6.Addr(), 128), Proto: UDP, SPort: 53, To: vip6}}, in: udp6.frame(),
			want: rewrite(udp6, vip6, 0).frame(), count: SNATRewritten},
		{name: "v4/zero-prefix", rules: []SNATRule{{Src: netip.MustParsePrefix("0.0.0.0/0"), Proto: UDP, To: vip4}}, in: udp4.frame(),
			want: rewrite(udp4, vip4, 0).frame(), count: SNATRewritten},
		{name: "v4-rule-does-not-match-v6", rules: []SNATRule{{Src: netip.MustParsePrefix("0.0.0.0/0"), Proto: UDP, To: vip4}}, in: udp6.frame(), count: SNATNoMatch},
		{name: "non-ip/arp", rules: []SNATRule{rule4}, in: arpFrame(), count: SNATNotParsed},
		{name: "v4/icmp", rules: []SNATRule{rule4}, in: icmp.frame(), count: SNATNotParsed},
		{name: "v6/hop-by-hop-not-followed", rules: []SNATRule{rule6}, in: hbh, count: SNATNotParsed},
		// BPF_PROG_TEST_RUN refuses (EINVAL) frames whose fixed IPv4/IPv6
		// header is cut short, so truncation is tested past it.
		{name: "truncated/v4-options", rules: []SNATRule{rule4}, in: optFull[:ethLen+22], count: SNATNotParsed},
		{name: "truncated/v4-udp-header", rules: []SNATRule{rule4}, in: full4[:ethLen+20+6], count: SNATNotParsed},
		{name: "truncated/v6-fragment-header", rules: []SNATRule{rule6}, in: frag6[0][:ethLen+40+4], count: SNATNotParsed},
		{name: "non-ip/vlan-tagged", rules: []SNATRule{rule4}, in: vlan, count: SNATNotParsed},
		{name: "truncated/v6-tcp-header", rules: []SNATRule{{Src: net6, Proto: TCP, To: vip6}}, in: full6[:ethLen+40+16], count: SNATNotParsed},
	}
}

// TestSNATProgram runs every case with each way of updating the L4
// checksum: written by the program (BPF_PROG_TEST_RUN's skbs are
// CHECKSUM_NONE; TestSNATChecksumPartial covers CHECKSUM_PARTIAL), and
// through bpf_l4_csum_replace as without CAP_PERFMON or kernel BTF. IPv4
// options and IPv6 fragment headers take the helper in every mode.
func TestSNATProgram(t *testing.T) {
	for _, mode := range []csumMode{csumInline, csumHelper, csumNoBTF} {
		t.Run(string(mode), func(t *testing.T) { testSNATProgram(t, mode) })
	}
}

func testSNATProgram(t *testing.T, mode csumMode) {
	cases := append(matrixCases(), specialCases()...)
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			tp := newTestProgCsum(t, mode)
			tp.add(t, c.rules...)
			in := append([]byte(nil), c.in...)
			out := tp.run(t, in)
			want := c.want
			if want == nil {
				want = c.in
			}
			if d := diffPacket(out, want); d != "" {
				t.Fatalf("output differs:%s", d)
			}
			if c.want != nil {
				checkChecksums(t, out)
			}
			st := tp.stats(t)
			if got := st.SNATCounter(SNATSeen); got != 1 {
				t.Errorf("seen = %d, want 1", got)
			}
			if got := st.SNATCounter(c.count); got != 1 {
				t.Errorf("%s = %d, want 1 (counters %v)", c.count, got, st.SNAT)
			}
			var rewritten uint64
			for _, r := range st.SNATRules {
				rewritten += r.Packets
				if r.Packets == 1 && r.Bytes != uint64(len(c.in)) {
					t.Errorf("rule %s: bytes = %d, want %d", r.SNATRule, r.Bytes, len(c.in))
				}
			}
			if wantRule := uint64(0); c.want != nil && rewritten != 1 || c.want == nil && rewritten != wantRule {
				t.Errorf("rule packets = %d, want %d", rewritten, map[bool]uint64{true: 1}[c.want != nil])
			}
		})
	}
}

// TestSNATRulePrecedence: longest prefix first; on equal prefixes the rule
// naming the port wins over the any-port rule.
func TestSNATRulePrecedence(t *testing.T) {
	a, b, c := netip.MustParseAddr("198.18.98.1"), netip.MustParseAddr("198.18.98.2"), netip.MustParseAddr("198.18.98.3")
	rules := []SNATRule{
		{Src: netip.MustParsePrefix("198.19.16.0/24"), Proto: UDP, To: a},
		{Src: netip.MustParsePrefix("198.19.16.0/28"), Proto: UDP, To: b},
		{Src: netip.MustParsePrefix("198.19.16.0/28"), Proto: UDP, SPort: 53, To: c},
		{Src: netip.MustParsePrefix("198.19.16.12/30"), Proto: UDP, To: a},
		{Src: netip.MustParsePrefix("198.19.16.7/32"), Proto: UDP, To: a},
		{Src: netip.MustParsePrefix("198.19.16.7/32"), Proto: UDP, SPort: 53, To: b},
	}
	for _, tc := range []struct {
		src  string
		want netip.Addr
	}{
		{"198.19.16.200:53", a}, // only the /24
		{"198.19.16.5:54", b},   // /28 any port
		{"198.19.16.5:53", c},   // /28 with port beats /28 any port
		{"198.19.16.13:53", a},  // /30 any port beats /28 with port
		{"198.19.16.7:53", b},   // /32 with port beats /32 any port
		{"198.19.16.7:54", a},   // /32 any port
	} {
		t.Run(tc.src, func(t *testing.T) {
			tp := newTestProg(t)
			tp.add(t, rules...)
			p := pkt{src: netip.MustParseAddrPort(tc.src), dst: client4, proto: UDP, payload: []byte("q")}
			out := tp.run(t, p.frame())
			if d := diffPacket(out, rewrite(p, tc.want, 0).frame()); d != "" {
				t.Fatalf("want source %s:%s", tc.want, d)
			}
		})
	}
}

// TestSNATFragments: every fragment of a matching datagram gets the new
// source; the first by the rule (ports rewritten too), the later ones from
// the fragment map; the reassembled datagram's checksum is valid.
func TestSNATFragments(t *testing.T) {
	for _, mode := range []csumMode{csumInline, csumHelper} {
		t.Run(string(mode), func(t *testing.T) { testSNATFragments(t, mode) })
	}
}

func testSNATFragments(t *testing.T, mode csumMode) {
	payload := bytes.Repeat([]byte("0123456789abcdef"), 190) // 3040 bytes
	for _, f := range []struct {
		name     string
		src, dst netip.AddrPort
		net      netip.Prefix
		vip      netip.Addr
	}{
		{"v4", backend4, client4, net4, vip4},
		{"v6", backend6, client6, net6, vip6},
	} {
		t.Run(f.name, func(t *testing.T) {
			tp := newTestProgCsum(t, mode)
			tp.add(t, SNATRule{Src: f.net, Proto: UDP, SPort: 53, To: f.vip, ToPort: 5353})
			p := pkt{src: f.src, dst: f.dst, proto: UDP, payload: payload, id: 0xbeef}
			in := p.fragments(1232)
			want := rewrite(p, f.vip, 5353).fragments(1232)
			if len(in) != 3 {
				t.Fatalf("%d fragments, want 3", len(in))
			}
			var seg []byte
			for i := range in {
				out := tp.run(t, in[i])
				if d := diffPacket(out, want[i]); d != "" {
					t.Fatalf("fragment %d differs:%s", i, d)
				}
				if f.name == "v4" {
					if !ipv4HeaderOK(out[ethLen : ethLen+20]) {
						t.Errorf("fragment %d: IPv4 header checksum invalid", i)
					}
					seg = append(seg, out[ethLen+20:]...)
				} else {
					seg = append(seg, out[ethLen+48:]...)
				}
			}
			if !l4ChecksumOK(f.vip, f.dst.Addr(), uint8(UDP), seg) {
				t.Errorf("reassembled datagram: UDP checksum invalid")
			}
			st := tp.stats(t)
			if st.SNATCounter(SNATRewritten) != 3 || st.SNATCounter(SNATFragments) != 2 {
				t.Errorf("rewritten %d, fragments %d; want 3, 2", st.SNATCounter(SNATRewritten), st.SNATCounter(SNATFragments))
			}
			if st.SNATRules[0].Packets != 3 {
				t.Errorf("rule packets %d, want 3", st.SNATRules[0].Packets)
			}

			// A later fragment whose first fragment was never seen: a rule
			// for port 53 cannot match it (no ports) ...
			stray := p
			stray.id = 0xf00d
			later := stray.fragments(1232)[1]
			if out := tp.run(t, append([]byte(nil), later...)); !bytes.Equal(out, later) {
				t.Errorf("stray later fragment changed by a port rule")
			}
			// ... an any-port rule for its address and protocol does.
			vip2 := f.vip.Next()
			tp.add(t, SNATRule{Src: f.net, Proto: UDP, To: vip2})
			out := tp.run(t, append([]byte(nil), later...))
			if d := diffPacket(out, rewrite(stray, vip2, 5353).fragments(1232)[1]); d != "" {
				t.Errorf("stray later fragment with an any-port rule:%s", d)
			}
		})
	}
}

func TestSNATRuleValidation(t *testing.T) {
	for _, tc := range []struct {
		rule SNATRule
		want string
	}{
		{SNATRule{Src: net4, Proto: UDP, To: vip6}, "family mismatch: source 198.19.16.0/28 is IPv4 but target 2001:db8:98::10 is IPv6"},
		{SNATRule{Src: net6, Proto: UDP, To: vip4}, "family mismatch"},
		{SNATRule{Src: netip.MustParsePrefix("198.19.16.5/28"), Proto: UDP, To: vip4}, "did you mean 198.19.16.0/28"},
		{SNATRule{Src: net4, Proto: 1, To: vip4}, "want udp or tcp"},
		{SNATRule{Src: net4, Proto: UDP}, "no target"},
		{SNATRule{Proto: UDP, To: vip4}, "no valid source prefix"},
		{SNATRule{Src: net4, Proto: UDP, To: netip.MustParseAddr("0.0.0.0")}, "not a unicast address"},
	} {
		err := tc.rule.Validate()
		if err == nil || !bytes.Contains([]byte(err.Error()), []byte(tc.want)) {
			t.Errorf("Validate(%s) = %v, want error containing %q", tc.rule, err, tc.want)
		}
	}
}

func TestSNATAddDelList(t *testing.T) {
	tp := newTestProg(t)
	r := SNATRule{Src: net4, Proto: UDP, SPort: 53, To: vip4, ToPort: 53}
	tp.add(t, r)
	if err := tp.d.AddSNAT(r); err == nil || !errorsIs(err, ErrRuleExists) {
		t.Fatalf("second add: %v, want ErrRuleExists", err)
	}
	r6 := SNATRule{Src: net6, Proto: TCP, To: vip6}
	tp.add(t, r6)
	got, err := tp.d.ListSNAT()
	if err != nil {
		t.Fatal(err)
	}
	if len(got) != 2 || got[0] != r || got[1] != r6 {
		t.Fatalf("list = %v, want [%v %v]", got, r, r6)
	}
	if err := tp.d.DelSNAT(SNATRule{Src: net4, Proto: UDP, SPort: 53}); err != nil {
		t.Fatalf("del: %v", err)
	}
	if err := tp.d.DelSNAT(SNATRule{Src: net4, Proto: UDP, SPort: 53}); !errorsIs(err, ErrRuleNotFound) {
		t.Fatalf("second del: %v, want ErrRuleNotFound", err)
	}
	if got, _ := tp.d.ListSNAT(); len(got) != 1 || got[0] != r6 {
		t.Fatalf("list after del = %v", got)
	}
}

// TestSNATRuleCountersReset: a rule that reuses a deleted rule's id starts
// from zero.
func TestSNATRuleCountersReset(t *testing.T) {
	tp := newTestProg(t)
	r := SNATRule{Src: net4, Proto: UDP, To: vip4}
	tp.add(t, r)
	tp.run(t, pkt{src: backend4, dst: client4, proto: UDP}.frame())
	if st := tp.stats(t); st.SNATRules[0].Packets != 1 {
		t.Fatalf("rule packets %d, want 1", st.SNATRules[0].Packets)
	}
	if err := tp.d.DelSNAT(r); err != nil {
		t.Fatal(err)
	}
	tp.d.ruleIDs.next = 0 // make the allocator hand out the freed id again
	tp.add(t, SNATRule{Src: net6, Proto: TCP, To: vip6})
	if st := tp.stats(t); len(st.SNATRules) != 1 || st.SNATRules[0].Packets != 0 || st.SNATRules[0].Bytes != 0 {
		t.Fatalf("new rule's counters %+v, want zero", st.SNATRules)
	}
}

// hostEntries returns the keys in snat_hosts, as rules.
func hostEntries(t *testing.T, tp *testProg) []string {
	t.Helper()
	var (
		k   snatSnatKey
		v   snatSnatValue
		out []string
	)
	it := tp.objs.SnatHosts.Iterate()
	for it.Next(&k, &v) {
		if k.Prefixlen != 0 {
			t.Errorf("snat_hosts key with prefixlen %d, want 0", k.Prefixlen)
		}
		k.Prefixlen = keyFixedBits + 32
		if k.Family == familyV6 {
			k.Prefixlen = keyFixedBits + 128
		}
		out = append(out, ruleFromKV(k, v).String())
	}
	if err := it.Err(); err != nil {
		t.Fatal(err)
	}
	sort.Strings(out)
	return out
}

// host4Entries returns the keys in snat_hosts4, as rules.
func host4Entries(t *testing.T, tp *testProg) []string {
	t.Helper()
	var (
		k   snatSnatHost4Key
		v   snatSnatValue
		out []string
	)
	it := tp.objs.SnatHosts4.Iterate()
	for it.Next(&k, &v) {
		var a [4]byte
		binary.NativeEndian.PutUint32(a[:], k.Addr)
		sk := snatSnatKey{Prefixlen: keyFixedBits + 32, Family: familyV4, Proto: k.Proto, Sport: k.Sport}
		copy(sk.Addr[:], a[:])
		out = append(out, ruleFromKV(sk, v).String())
	}
	if err := it.Err(); err != nil {
		t.Fatal(err)
	}
	sort.Strings(out)
	return out
}

// TestSNATHostTable: host rules (/32, /128) are kept in snat_hosts too, and
// go with their rule; prefix rules are not. State pinned by an lbctl
// without snat_hosts has its host rules copied there on the first change,
// so an any-port host rule there never hides a port host rule of the trie.
func TestSNATHostTable(t *testing.T) {
	tp := newTestProg(t)
	host4 := SNATRule{Src: netip.PrefixFrom(backend4.Addr(), 32), Proto: UDP, SPort: 53, To: vip4, ToPort: 5353}
	host6 := SNATRule{Src: netip.PrefixFrom(backend6.Addr(), 128), Proto: UDP, To: vip6}
	prefix := SNATRule{Src: net4, Proto: UDP, SPort: 53, To: vip4}
	tp.add(t, host4, host6, prefix)
	if got, want := hostEntries(t, tp), []string{host4.String(), host6.String()}; !slices.Equal(got, want) {
		t.Fatalf("snat_hosts holds %q, want %q", got, want)
	}
	if got, want := host4Entries(t, tp), []string{host4.String()}; !slices.Equal(got, want) {
		t.Fatalf("snat_hosts4 holds %q, want %q", got, want)
	}
	p := pkt{src: backend4, dst: client4, proto: UDP, payload: []byte("q")}
	if d := diffPacket(tp.run(t, p.frame()), rewrite(p, vip4, 5353).frame()); d != "" {
		t.Fatalf("host rule not applied:%s", d)
	}
	if err := tp.d.DelSNAT(host4); err != nil {
		t.Fatal(err)
	}
	if got, want := hostEntries(t, tp), []string{host6.String()}; !slices.Equal(got, want) {
		t.Fatalf("after deleting %s snat_hosts holds %q, want %q", host4, got, want)
	}
	if got := host4Entries(t, tp); len(got) != 0 {
		t.Fatalf("after deleting %s snat_hosts4 holds %q, want nothing", host4, got)
	}
	if d := diffPacket(tp.run(t, p.frame()), rewrite(p, vip4, 0).frame()); d != "" {
		t.Fatalf("after deleting the host rule, want the /28 rule:%s", d)
	}
	var n snatSnatKindCounts
	if err := tp.objs.SnatRuleCounts.Lookup(uint32(0), &n); err != nil || n != (snatSnatKindCounts{AnyHosts: 1, PortPrefixes: 1, Kept: snatKeptTable4 | snatKeptT4Port}) {
		t.Fatalf("snat_rule_counts = %+v (%v), want 1 any-port host rule and 1 prefix rule", n, err)
	}
	// Counts kept by an lbctl without snat_hosts4 (SNAT_KEPT_HOSTS): a
	// stale IPv4 entry there is not used, the trie decides.
	stale := snatSnatHost4Key{Addr: binary.NativeEndian.Uint32(backend4.Addr().AsSlice()), Sport: htons(53), Proto: uint8(UDP)}
	staleVal := snatSnatValue{SrcLen: 32}
	copy(staleVal.Addr[:], netip.MustParseAddr("198.18.98.99").AsSlice())
	if err := tp.objs.SnatHosts4.Update(&stale, &staleVal, ebpf.UpdateAny); err != nil {
		t.Fatal(err)
	}
	if err := tp.objs.SnatRuleCounts.Update(uint32(0), snatSnatKindCounts{AnyHosts: 1, PortPrefixes: 1, Kept: 1}, ebpf.UpdateAny); err != nil {
		t.Fatal(err)
	}
	if d := diffPacket(tp.run(t, p.frame()), rewrite(p, vip4, 0).frame()); d != "" {
		t.Fatalf("stale snat_hosts4 entry used with counts of an older lbctl:%s", d)
	}
	// Counts not kept (state from an older lbctl) skip snat_hosts; the
	// trie still has the host rule.
	if err := tp.objs.SnatRuleCounts.Update(uint32(0), snatSnatKindCounts{}, ebpf.UpdateAny); err != nil {
		t.Fatal(err)
	}
	p6 := pkt{src: backend6, dst: client6, proto: UDP, payload: []byte("q")}
	if d := diffPacket(tp.run(t, p6.frame()), rewrite(p6, vip6, 0).frame()); d != "" {
		t.Fatalf("host rule not found in the trie with snat_hosts skipped:%s", d)
	}

	// Port host rules only: the any-port and trie lookups are skipped.
	only := newTestProg(t)
	only.add(t, host4)
	other := pkt{src: netip.AddrPortFrom(backend4.Addr(), 54), dst: client4, proto: UDP, payload: []byte("q")}
	if d := diffPacket(only.run(t, other.frame()), other.frame()); d != "" {
		t.Fatalf("port 54 matched the port-53 host rule:%s", d)
	}
	if d := diffPacket(only.run(t, p.frame()), rewrite(p, vip4, 5353).frame()); d != "" {
		t.Fatalf("port host rule alone not applied:%s", d)
	}

	// Older state: a port host rule in the trie only.
	old := newTestProg(t)
	a, b := netip.MustParseAddr("198.18.98.1"), netip.MustParseAddr("198.18.98.2")
	portRule := SNATRule{Src: netip.PrefixFrom(backend4.Addr(), 32), Proto: UDP, SPort: 53, To: a}
	key := portRule.key()
	val := snatSnatValue{SrcLen: 32, RuleId: 7}
	copy(val.Addr[:], a.AsSlice())
	if err := old.objs.SnatRules.Update(&key, &val, ebpf.UpdateNoExist); err != nil {
		t.Fatal(err)
	}
	// and a stale entry in snat_hosts4 (an older lbctl deleted its rule).
	gone := snatSnatHost4Key{Addr: binary.NativeEndian.Uint32(netip.MustParseAddr("198.19.16.12").AsSlice()), Sport: htons(53), Proto: uint8(UDP)}
	if err := old.objs.SnatHosts4.Update(&gone, &staleVal, ebpf.UpdateAny); err != nil {
		t.Fatal(err)
	}
	old.add(t, SNATRule{Src: netip.PrefixFrom(backend4.Addr(), 32), Proto: UDP, To: b})
	want := []string{portRule.String(), SNATRule{Src: netip.PrefixFrom(backend4.Addr(), 32), Proto: UDP, To: b}.String()}
	sort.Strings(want)
	if got := host4Entries(t, old); !slices.Equal(got, want) {
		t.Fatalf("snat_hosts4 after the first change holds %q, want %q", got, want)
	}
	if d := diffPacket(old.run(t, p.frame()), rewrite(p, a, 0).frame()); d != "" {
		t.Fatalf("port host rule of older state hidden by a new any-port host rule:%s", d)
	}
}

// TestSNATPrefixKinds: snat walks the trie only for the kinds of prefix rule
// that exist (snat_rule_counts), so each kind must be counted exactly: a
// port prefix rule alone, then an any-port prefix rule next to it, then the
// port rule gone. Each step checks the counts and the packets the skipped
// lookups would have found or missed.
func TestSNATPrefixKinds(t *testing.T) {
	tp := newTestProg(t)
	counts := func(want snatSnatKindCounts) {
		t.Helper()
		var n snatSnatKindCounts
		if err := tp.objs.SnatRuleCounts.Lookup(uint32(0), &n); err != nil || n != want {
			t.Fatalf("snat_rule_counts = %+v (%v), want %+v", n, err, want)
		}
	}
	on53 := pkt{src: backend4, dst: client4, proto: UDP, payload: []byte("q")}
	on54 := on53
	on54.src = netip.AddrPortFrom(backend4.Addr(), 54)
	expect := func(p pkt, want pkt, what string) {
		t.Helper()
		if d := diffPacket(tp.run(t, p.frame()), want.frame()); d != "" {
			t.Fatalf("%s:%s", what, d)
		}
	}
	a, b := netip.MustParseAddr("198.18.98.1"), netip.MustParseAddr("198.18.98.2")
	port28 := SNATRule{Src: net4, Proto: UDP, SPort: 53, To: a}
	any24 := SNATRule{Src: netip.MustParsePrefix("198.19.16.0/24"), Proto: UDP, To: b}

	tp.add(t, port28)
	counts(snatSnatKindCounts{PortPrefixes: 1, Kept: snatKeptTable4 | snatKeptT4Port})
	expect(on53, rewrite(on53, a, 0), "port 53 with the /28 port rule alone")
	expect(on54, on54, "port 54 with the /28 port-53 rule alone")

	tp.add(t, any24)
	counts(snatSnatKindCounts{PortPrefixes: 1, AnyPrefixes: 1, Kept: snatKeptTable4 | snatKeptT4Port | snatKeptT4Any})
	expect(on54, rewrite(on54, b, 0), "port 54 with an any-port /24 next to the /28")
	expect(on53, rewrite(on53, a, 0), "port 53: the longer /28 port rule beats the /24")

	if err := tp.d.DelSNAT(port28); err != nil {
		t.Fatal(err)
	}
	counts(snatSnatKindCounts{AnyPrefixes: 1, Kept: snatKeptTable4 | snatKeptT4Any})
	expect(on53, rewrite(on53, b, 0), "port 53 after deleting the /28: the any-port /24")
}
