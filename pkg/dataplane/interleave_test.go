package dataplane

import (
	"fmt"
	"net/netip"
	"os"
	"slices"
	"strconv"
	"testing"
	"time"

	"github.com/cilium/ebpf"
	"github.com/cilium/ebpf/asm"
)

// TestSNATInterleaved is the quiet-machine method of docs/dataplane.md
// (Performance), not a test: with LBCTL_SNAT_ROUNDS=N set it runs the empty
// TC program and each snat path in turn, N rounds of LBCTL_SNAT_REPEAT
// (default 100,000) repeats each, and prints per path the minimum and median
// ns/packet over the rounds and the minimum's ratio to the empty program's
// minimum. Run it pinned to one CPU (taskset) and under the benchmark lock.
// Alternating the programs round by round exposes them to the same
// interference; the minimum is the least disturbed round. Skipped without
// the variable (it takes minutes and asserts nothing).
func TestSNATInterleaved(t *testing.T) {
	rounds, _ := strconv.Atoi(os.Getenv("LBCTL_SNAT_ROUNDS"))
	if rounds <= 0 {
		t.Skip("LBCTL_SNAT_ROUNDS not set")
	}
	repeat := 100000
	if r, _ := strconv.Atoi(os.Getenv("LBCTL_SNAT_REPEAT")); r > 0 {
		repeat = r
	}
	hitPkt := pkt{src: backend4, dst: client4, proto: UDP, payload: make([]byte, 64)}
	missPkt := hitPkt
	missPkt.src = netip.MustParseAddrPort("198.18.200.1:53")
	hit, miss := hitPkt.frame(), missPkt.frame()

	empty, err := ebpf.NewProgram(&ebpf.ProgramSpec{
		Type:         ebpf.SchedCLS,
		License:      "GPL",
		Instructions: asm.Instructions{asm.Mov.Imm(asm.R0, -1), asm.Return()},
	})
	if err != nil {
		t.Fatalf("load empty program: %v", err)
	}
	defer empty.Close()

	type path struct {
		name  string
		prog  *ebpf.Program
		frame []byte
		ns    []float64
	}
	var paths []*path
	for _, n := range []int{1, 10000} {
		tp := newTestProg(t)
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
		tp.add(t, rules...)
		paths = append(paths,
			&path{name: fmt.Sprintf("hit/rules=%d", n), prog: tp.objs.SnatEgress, frame: hit},
			&path{name: fmt.Sprintf("miss/rules=%d", n), prog: tp.objs.SnatEgress, frame: miss})
	}
	var emptyNs []float64
	run := func(p *ebpf.Program, frame []byte) float64 {
		start := time.Now()
		if _, err := p.Run(&ebpf.RunOptions{Data: frame, Repeat: uint32(repeat)}); err != nil {
			t.Fatalf("run: %v", err)
		}
		return float64(time.Since(start).Nanoseconds()) / float64(repeat)
	}
	if only := os.Getenv("LBCTL_SNAT_ONLY"); only != "" { // one path, for perf record
		paths = slices.DeleteFunc(paths, func(p *path) bool { return p.name != only })
	}
	for r := 0; r < rounds; r++ {
		for _, p := range paths {
			emptyNs = append(emptyNs, run(empty, hit))
			p.ns = append(p.ns, run(p.prog, p.frame))
		}
	}
	stat := func(v []float64) (float64, float64) {
		s := slices.Clone(v)
		slices.Sort(s)
		return s[0], s[len(s)/2]
	}
	emin, emed := stat(emptyNs)
	fmt.Printf("empty        min %6.2f  median %6.2f ns/packet\n", emin, emed)
	for _, p := range paths {
		mn, md := stat(p.ns)
		fmt.Printf("%-12s min %6.2f  median %6.2f ns/packet  min %.2fx empty\n", p.name, mn, md, mn/emin)
	}
}
