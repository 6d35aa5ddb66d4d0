package dataplane

import (
	"fmt"
	"os"
	"slices"
	"strconv"
	"testing"
	"time"

	"github.com/cilium/ebpf"
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
	hit, miss := benchFrames()
	empty := emptyTC(t)

	type path struct {
		name  string
		prog  *ebpf.Program
		frame []byte
		ns    []float64
	}
	var paths []*path
	for _, n := range []int{1, 10000} {
		tp := newTestProg(t)
		tp.add(t, benchRules(n)...)
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
