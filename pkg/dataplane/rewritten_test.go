package dataplane

import (
	"bytes"
	"testing"

	"github.com/cilium/ebpf"
)

// rewrittenCheck follows the snat counters of tp through a test: after
// each step rewritten, seen and fragments must be exactly what the test
// sent, and rewritten must never have gone down.
type rewrittenCheck struct {
	tp             *testProg
	rewritten      uint64 // packets the program rewrote so far
	noMatch, frags uint64
	last           uint64 // rewritten as Stats last reported it
}

func (c *rewrittenCheck) check(t *testing.T, step string) Stats {
	t.Helper()
	st := c.tp.stats(t)
	got := st.SNATCounter(SNATRewritten)
	if got < c.last {
		t.Fatalf("%s: rewritten went down: %d after %d", step, got, c.last)
	}
	c.last = got
	if got != c.rewritten {
		t.Errorf("%s: rewritten %d, want %d", step, got, c.rewritten)
	}
	if n := st.SNATCounter(SNATFragments); n != c.frags {
		t.Errorf("%s: fragments %d, want %d", step, n, c.frags)
	}
	if n := st.SNATCounter(SNATSeen); n != c.rewritten+c.noMatch {
		t.Errorf("%s: seen %d, want %d", step, n, c.rewritten+c.noMatch)
	}
	return st
}

// runN runs tp's program n times on frame.
func runN(t *testing.T, tp *testProg, frame []byte, n int) {
	t.Helper()
	for i := 0; i < n; i++ {
		tp.run(t, append([]byte(nil), frame...))
	}
}

// TestSNATRewrittenDerived: the program no longer counts
// snat_counters[SNAT_REWRITTEN], and the rewritten count lbctl derives
// from the rules' counters stays exact and never goes down across a rule
// delete, a later fragment counted for the deleted rule, and the reuse of
// its id by a new rule (which starts from zero).
func TestSNATRewrittenDerived(t *testing.T) {
	tp := newTestProg(t)
	c := &rewrittenCheck{tp: tp}
	a := SNATRule{Src: net4, Proto: UDP, To: vip4}
	tp.add(t, a)
	hit4 := pkt{src: backend4, dst: client4, proto: UDP, payload: []byte("q")}
	runN(t, tp, hit4.frame(), 3)
	c.rewritten += 3
	if st := c.check(t, "3 packets"); len(st.SNATRules) != 1 || st.SNATRules[0].Packets != 3 {
		t.Fatalf("3 packets: rules %+v, want one with 3 packets", st.SNATRules)
	}

	// A fragmented datagram: its first fragment through rule a ...
	dgram := pkt{src: backend4, dst: client4, proto: UDP, payload: bytes.Repeat([]byte("0123456789abcdef"), 190), id: 0x1234}
	frags := dgram.fragments(1232)
	if len(frags) != 3 {
		t.Fatalf("%d fragments, want 3", len(frags))
	}
	tp.run(t, frags[0])
	c.rewritten++
	c.check(t, "first fragment")

	// ... a deleted: the count stays (the rule is no longer listed) ...
	if err := tp.d.DelSNAT(a); err != nil {
		t.Fatal(err)
	}
	c.check(t, "rule deleted")

	// ... and the later fragments still get a's address, counted for
	// a's id, which no rule holds now.
	for i, f := range frags[1:] {
		out := tp.run(t, f)
		if d := diffPacket(out, rewrite(dgram, vip4, 0).fragments(1232)[i+1]); d != "" {
			t.Fatalf("later fragment %d after the delete:%s", i+1, d)
		}
	}
	c.rewritten += 2
	c.frags += 2
	c.check(t, "later fragments of a deleted rule")

	// A new rule takes a's id: it starts from zero, the total stays.
	tp.d.ruleIDs.next = 0
	b := SNATRule{Src: net6, Proto: UDP, To: vip6}
	tp.add(t, b)
	var v snatSnatValue
	if k := b.key(); tp.objs.SnatRules.Lookup(&k, &v) != nil || v.RuleId != 0 {
		t.Fatalf("new rule's id %d, want a's (0): the test must reuse it", v.RuleId)
	}
	var rb snatSnatRewrittenBase
	if err := tp.objs.SnatRewritten.Lookup(uint32(0), &rb); err != nil || rb.Ids != 1 {
		t.Fatalf("snat_rewritten %+v (%v), want ids 1 (only id 0 given out)", rb, err)
	}
	if st := c.check(t, "id reused"); len(st.SNATRules) != 1 || st.SNATRules[0].Packets != 0 || st.SNATRules[0].Bytes != 0 {
		t.Fatalf("id reused: rules %+v, want the new one at zero", st.SNATRules)
	}
	hit6 := pkt{src: backend6, dst: client6, proto: UDP, payload: []byte("q")}
	runN(t, tp, hit6.frame(), 2)
	c.rewritten += 2
	_, miss := benchFrames()
	tp.run(t, miss)
	c.noMatch++
	st := c.check(t, "new rule's packets")
	if len(st.SNATRules) != 1 || st.SNATRules[0].Packets != 2 || st.SNATRules[0].Bytes != 2*uint64(len(hit6.frame())) {
		t.Fatalf("new rule: %+v, want 2 packets of %d bytes", st.SNATRules, len(hit6.frame()))
	}

	// Deleted again with no rule left: everything it counted stays.
	if err := tp.d.DelSNAT(b); err != nil {
		t.Fatal(err)
	}
	c.check(t, "no rule left")

	// Ids given out later are summed from the first: ids rises before.
	tp.add(t, a, b, SNATRule{Src: net4, Proto: TCP, To: vip4})
	if err := tp.objs.SnatRewritten.Lookup(uint32(0), &rb); err != nil || rb.Ids < 3 {
		t.Fatalf("snat_rewritten %+v (%v), want ids 3 or more after 3 rules", rb, err)
	}
	runN(t, tp, hit4.frame(), 4)
	c.rewritten += 4
	c.check(t, "3 rules")
	if n, err := tp.d.snatCounter(SNATRewritten); err != nil || n != 0 {
		t.Fatalf("snat_counters[SNAT_REWRITTEN] = %d (%v): this program must not count it", n, err)
	}
}

// setPerCPU stores v as CPU 0's value of key in the per-CPU map m (the
// other CPUs' zero).
func setPerCPU[T any](t *testing.T, m *ebpf.Map, key uint32, v T) {
	t.Helper()
	n, err := ebpf.PossibleCPU()
	if err != nil {
		t.Fatal(err)
	}
	vals := make([]T, n)
	vals[0] = v
	if err := m.Update(key, vals, ebpf.UpdateAny); err != nil {
		t.Fatal(err)
	}
}

// TestSNATRewrittenOlderState: state an older lbctl kept (its programs
// counted snat_counters[SNAT_REWRITTEN]; it reset a rule id's counters
// when it reused the id, so they sum to less) goes on with the same count
// when this lbctl first changes it, and the count stays exact with the
// older program still attached next to this one, both counting.
func TestSNATRewrittenOlderState(t *testing.T) {
	tp := newTestProg(t)
	older := olderProgram(t, tp)
	// As an older lbctl left it: 100 rewritten, 30 of them still in a
	// deleted rule's slot (id 7), the other 70 reset away.
	setPerCPU(t, tp.objs.SnatCounters, uint32(SNATRewritten), uint64(100))
	setPerCPU(t, tp.objs.SnatRuleStats, 7, snatRuleStats{Packets: 30, Bytes: 3000})
	c := &rewrittenCheck{tp: tp, rewritten: 100}
	c.check(t, "older state")

	tp.add(t, SNATRule{Src: net4, Proto: UDP, To: vip4}) // this lbctl takes over
	var rb snatSnatRewrittenBase
	// ids: past the highest slot that counted (7), so that it is summed.
	if err := tp.objs.SnatRewritten.Lookup(uint32(0), &rb); err != nil || rb.Kept != snatRewrittenKept || rb.Offset != 70 || rb.Ids != 8 {
		t.Fatalf("snat_rewritten %+v (%v), want kept, offset 70, ids 8", rb, err)
	}
	c.check(t, "taken over")

	hit := pkt{src: backend4, dst: client4, proto: UDP, payload: []byte("q")}.frame()
	runN(t, older, hit, 2)
	c.rewritten += 2
	c.check(t, "older program")
	runN(t, tp, hit, 3)
	c.rewritten += 3
	st := c.check(t, "both programs")
	if len(st.SNATRules) != 1 || st.SNATRules[0].Packets != 5 {
		t.Fatalf("rule: %+v, want 5 packets (both programs)", st.SNATRules)
	}
	if n, err := tp.d.snatCounter(SNATRewritten); err != nil || n != 102 {
		t.Fatalf("snat_counters[SNAT_REWRITTEN] = %d (%v), want 102 (the older program's 2 only)", n, err)
	}
	// A second take-over changes nothing.
	if err := tp.d.keepRewritten(); err != nil {
		t.Fatal(err)
	}
	c.check(t, "kept again")
}

// TestSNATRuleCountsBase: a rule's counts are its slot's minus the base
// stored when it was added, or the slot alone when an older lbctl reset
// the slot since (below the base).
func TestSNATRuleCountsBase(t *testing.T) {
	for _, tc := range []struct {
		total, base, want snatRuleStats
	}{
		{snatRuleStats{Packets: 10, Bytes: 1000}, snatRuleStats{}, snatRuleStats{Packets: 10, Bytes: 1000}},
		{snatRuleStats{Packets: 10, Bytes: 1000}, snatRuleStats{Packets: 4, Bytes: 400}, snatRuleStats{Packets: 6, Bytes: 600}},
		{snatRuleStats{Packets: 3, Bytes: 300}, snatRuleStats{Packets: 4, Bytes: 400}, snatRuleStats{Packets: 3, Bytes: 300}},
	} {
		if got := ruleCounts(tc.total, tc.base); got != tc.want {
			t.Errorf("ruleCounts(%+v, %+v) = %+v, want %+v", tc.total, tc.base, got, tc.want)
		}
	}
}

// TestSNATRewrittenNotKept: with snat_rewritten not kept (only older
// programs ran), rewritten is snat_counters' alone; kept, the derived sum,
// never less than the counter.
func TestSNATRewrittenNotKept(t *testing.T) {
	totals := []snatRuleStats{{Packets: 5}, {Packets: 7}}
	for _, tc := range []struct {
		rb      snatSnatRewrittenBase
		counted uint64
		want    uint64
	}{
		{snatSnatRewrittenBase{}, 9, 9},
		{snatSnatRewrittenBase{Kept: snatRewrittenKept, Offset: 3}, 9, 15},
		{snatSnatRewrittenBase{Kept: snatRewrittenKept}, 20, 20},
	} {
		if got := rewritten(tc.rb, totals, tc.counted); got != tc.want {
			t.Errorf("rewritten(%+v, 12 per rule, counted %d) = %d, want %d", tc.rb, tc.counted, got, tc.want)
		}
	}
}

// TestSNATSummedIDs: Stats sums the slots of the ids ever given out, and
// at least of the ids rules hold (an older lbctl gives them out without
// raising snat_rewritten.ids).
func TestSNATSummedIDs(t *testing.T) {
	es := []snatEntry{{id: 2}, {id: 9}}
	if n := summedIDs(snatSnatRewrittenBase{Ids: 4}, es); n != 10 {
		t.Errorf("ids 4, rules at 2 and 9: %d slots, want 10", n)
	}
	if n := summedIDs(snatSnatRewrittenBase{Ids: 40}, es); n != 40 {
		t.Errorf("ids 40: %d slots, want 40", n)
	}
	if n := summedIDs(snatSnatRewrittenBase{}, nil); n != 0 {
		t.Errorf("nothing given out: %d slots, want 0", n)
	}
}
