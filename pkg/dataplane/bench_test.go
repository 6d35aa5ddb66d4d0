package dataplane

import (
	"fmt"
	"net/netip"
	"testing"
	"time"

	"github.com/cilium/ebpf"
	"github.com/cilium/ebpf/asm"

	"github.com/lbctl/lbctl/test/testenv"
)

// emptyTC is the baseline: a TC program that only returns TC_ACT_UNSPEC.
func emptyTC(b testing.TB) *ebpf.Program {
	prog, err := ebpf.NewProgram(&ebpf.ProgramSpec{
		Type:         ebpf.SchedCLS,
		License:      "GPL",
		Instructions: asm.Instructions{asm.Mov.Imm(asm.R0, -1), asm.Return()},
	})
	if err != nil {
		b.Fatalf("load empty program: %v", err)
	}
	b.Cleanup(func() { prog.Close() })
	return prog
}

// benchFrames returns the benchmarks' packets: a UDP reply from
// backend4:53 that the rules of benchRules match (hit), and one from an
// address no rule covers (miss).
func benchFrames() (hit, miss []byte) {
	hitPkt := pkt{src: backend4, dst: client4, proto: UDP, payload: make([]byte, 64)}
	missPkt := hitPkt
	missPkt.src = netip.MustParseAddrPort("198.18.200.1:53")
	return hitPkt.frame(), missPkt.frame()
}

// benchRules returns n rules whose targets equal their matches. With one
// rule: DESIGN's /28, which takes both lookups (port rule, then any-port
// rule). With more: /32 UDP port-53 host rules on distinct sources in
// 198.19.0.0/16, backend4's among them, found by the first lookup alone.
func benchRules(n int) []SNATRule {
	rules := []SNATRule{{Src: net4, Proto: UDP, SPort: 53, To: backend4.Addr()}}
	if n > 1 {
		rules[0].Src = netip.PrefixFrom(backend4.Addr(), 32)
	}
	for i := 0; len(rules) < n; i++ {
		a := netip.AddrFrom4([4]byte{198, 19, byte(i >> 8), byte(i)})
		if a != backend4.Addr() {
			rules = append(rules, SNATRule{Src: netip.PrefixFrom(a, 32), Proto: UDP, SPort: 53, To: a})
		}
	}
	return rules
}

// nsPerPacket runs prog on frame repeat times in one BPF_PROG_TEST_RUN
// call and returns the wall time per run (syscall cost amortized).
func nsPerPacket(b *testing.B, prog *ebpf.Program, frame []byte, repeat int) float64 {
	start := time.Now()
	if _, err := prog.Run(&ebpf.RunOptions{Data: frame, Repeat: uint32(repeat)}); err != nil {
		b.Fatalf("run: %v", err)
	}
	return float64(time.Since(start).Nanoseconds()) / float64(repeat)
}

// BenchmarkSNAT measures ns per packet of the snat program under
// BPF_PROG_TEST_RUN, for the rule-hit and rule-miss paths with 1 and
// 10,000 rules, next to an empty TC program measured in the same run
// (metric x-empty = ns/packet divided by the empty program's).
//
// BPF_PROG_TEST_RUN reuses one skb for every repeat: after a real rewrite
// the packet would no longer match. The hit path therefore uses rules whose
// target equals the packet's source (198.19.16.11 -> 198.19.16.11): every
// repeat does the whole lookup, both checksum updates and the writes, just
// with equal old and new values. The 10,000 rules are /32 UDP port-53 rules
// on distinct sources in 198.19.0.0/16.
func BenchmarkSNAT(b *testing.B) {
	testenv.RequireRoot(b)
	hit, miss := benchFrames()

	empty := emptyTC(b)
	var emptyNs float64 // the empty program's ns/packet, from its final run
	b.Run("empty", func(b *testing.B) {
		emptyNs = nsPerPacket(b, empty, hit, b.N)
		b.ReportMetric(emptyNs, "ns/packet")
	})
	measure := func(b *testing.B, prog *ebpf.Program, frame []byte) {
		if emptyNs == 0 { // -bench filtered "empty" out
			emptyNs = nsPerPacket(b, empty, hit, 1<<22)
		}
		ns := nsPerPacket(b, prog, frame, b.N)
		b.ReportMetric(ns, "ns/packet")
		b.ReportMetric(ns/emptyNs, "x-empty")
	}

	for _, n := range []int{1, 10000} {
		tp := newTestProg(b)
		tp.add(b, benchRules(n)...)
		// The hit packet hits, the miss packet misses.
		tp.run(b, hit)
		tp.run(b, miss)
		if st := tp.stats(b); st.SNATCounter(SNATRewritten) != 1 || st.SNATCounter(SNATNoMatch) != 1 {
			b.Fatalf("rewritten %d, no_match %d: want 1, 1", st.SNATCounter(SNATRewritten), st.SNATCounter(SNATNoMatch))
		}
		b.Run(fmt.Sprintf("hit/rules=%d", n), func(b *testing.B) { measure(b, tp.objs.SnatEgress, hit) })
		b.Run(fmt.Sprintf("miss/rules=%d", n), func(b *testing.B) { measure(b, tp.objs.SnatEgress, miss) })
	}
}
