package dataplane

import (
	"errors"
	"fmt"

	"github.com/cilium/ebpf"
)

// The snat program counts a rewritten packet once, in its rule's slot of
// snat_rule_stats, not in snat_counters[SNAT_REWRITTEN] too (one per-CPU
// counter update fewer per packet). This lbctl never resets
// snat_rule_stats: a rule's own counts are its slot's minus the slot's
// value when the rule was added (snat_rule_base), and the slots of every
// rule id, live or deleted, sum to the packets rewritten. So the sum stays
// exact and never goes down whatever happens between a program reading a
// rule and counting it: a rule deleted meanwhile, a later fragment counted
// for the rule its first fragment had (snat_frags), an id reused. No grace
// period, no transfer between maps that a reader without the state's lock
// could see half done. snat_rewritten (struct snat_rewritten_base,
// bpf/lib/maps.h) says whether the sum is used and adds the packets whose
// per-rule counts an older lbctl reset.

// snatRewrittenKept is snat_rewritten.kept: rewritten is derived.
const snatRewrittenKept = 1

// ruleTotals returns the packets and bytes in snat_rule_stats of rule ids
// 0..n-1 (index = rule id), summed over CPUs. Reading a slot costs about
// 0.25 µs (a batched read, 2 CPUs): n is the ids ever given out, not
// MaxSNATRules, where it can be.
func (d *Dataplane) ruleTotals(n int) ([]snatRuleStats, error) {
	ncpu, err := ebpf.PossibleCPU()
	if err != nil {
		return nil, fmt.Errorf("read rule counters: %w", err)
	}
	n = min(max(n, 0), MaxSNATRules)
	out := make([]snatRuleStats, n)
	if n == 0 {
		return out, nil
	}
	keys := make([]uint32, n)
	per := make([]snatRuleStats, n*ncpu)
	var cursor ebpf.MapBatchCursor
	got, err := d.snat.SnatRuleStats.BatchLookup(&cursor, keys, per, nil)
	switch {
	case errors.Is(err, ebpf.ErrNotSupported): // before Linux 5.6: one id at a time
		for id := range out {
			var v []snatRuleStats
			if err := d.snat.SnatRuleStats.Lookup(uint32(id), &v); err != nil {
				return nil, fmt.Errorf("read counters of rule id %d: %w", id, privHint(err))
			}
			for _, c := range v {
				out[id].Packets += c.Packets
				out[id].Bytes += c.Bytes
			}
		}
		return out, nil
	case err != nil && !errors.Is(err, ebpf.ErrKeyNotExist):
		return nil, fmt.Errorf("read rule counters: %w", privHint(err))
	}
	for i := 0; i < got; i++ {
		if int(keys[i]) >= len(out) {
			continue
		}
		for _, c := range per[i*ncpu : (i+1)*ncpu] {
			out[keys[i]].Packets += c.Packets
			out[keys[i]].Bytes += c.Bytes
		}
	}
	return out, nil
}

// ruleTotal returns rule id's packets and bytes in snat_rule_stats,
// summed over CPUs.
func (d *Dataplane) ruleTotal(id uint32) (snatRuleStats, error) {
	var (
		per []snatRuleStats
		t   snatRuleStats
	)
	if err := d.snat.SnatRuleStats.Lookup(id, &per); err != nil {
		return t, fmt.Errorf("read counters of rule id %d: %w", id, privHint(err))
	}
	for _, c := range per {
		t.Packets += c.Packets
		t.Bytes += c.Bytes
	}
	return t, nil
}

// ruleBases returns snat_rule_base of rule ids 0..n-1 (index = rule id).
func (d *Dataplane) ruleBases(n int) ([]snatRuleStats, error) {
	n = min(max(n, 0), MaxSNATRules)
	out := make([]snatRuleStats, n)
	if n == 0 {
		return out, nil
	}
	keys := make([]uint32, n)
	vals := make([]snatRuleStats, n)
	var cursor ebpf.MapBatchCursor
	got, err := d.snat.SnatRuleBase.BatchLookup(&cursor, keys, vals, nil)
	switch {
	case errors.Is(err, ebpf.ErrNotSupported):
		for id := range out {
			if err := d.snat.SnatRuleBase.Lookup(uint32(id), &out[id]); err != nil {
				return nil, fmt.Errorf("read snat_rule_base: %w", privHint(err))
			}
		}
		return out, nil
	case err != nil && !errors.Is(err, ebpf.ErrKeyNotExist):
		return nil, fmt.Errorf("read snat_rule_base: %w", privHint(err))
	}
	for i := 0; i < got; i++ {
		if int(keys[i]) < len(out) {
			out[keys[i]] = vals[i]
		}
	}
	return out, nil
}

// setRuleBase records rule id's counts now as the starting point of the
// rule about to take the id (before any lookup can find it).
func (d *Dataplane) setRuleBase(id uint32) error {
	t, err := d.ruleTotal(id)
	if err != nil {
		return err
	}
	if err := d.snat.SnatRuleBase.Update(id, t, ebpf.UpdateAny); err != nil {
		return fmt.Errorf("store the rule's starting counts: %w", privHint(err))
	}
	return nil
}

// clearRuleBase sets a deleted rule id's starting point back to zero: an
// older lbctl that gives the id to a rule resets snat_rule_stats instead,
// and its rule's counts are then the slot's alone.
func (d *Dataplane) clearRuleBase(id uint32) error {
	if err := d.snat.SnatRuleBase.Update(id, snatRuleStats{}, ebpf.UpdateAny); err != nil {
		return fmt.Errorf("clear the rule's starting counts: %w", privHint(err))
	}
	return nil
}

// ruleCounts returns a rule's own counts from its id's total and base.
// A total below the base means an older lbctl reset the slot since this
// one stored the base: the slot alone is the rule's then.
func ruleCounts(total, base snatRuleStats) snatRuleStats {
	if total.Packets < base.Packets || total.Bytes < base.Bytes {
		return total
	}
	return snatRuleStats{Packets: total.Packets - base.Packets, Bytes: total.Bytes - base.Bytes}
}

// keepRewritten makes snat_rewritten say "derived" (kept), once per
// state, before a program of this lbctl can run on it: an older lbctl
// reset a rule id's counts when it reused the id, so the slots then sum to
// less than snat_counters[SNAT_REWRITTEN], which older programs kept; the
// difference becomes the offset. The slots are read first: packets counted
// between the two reads can only make the offset larger, never make the
// derived count fall below the counter it replaces. ids becomes one past
// the highest slot that counted anything or that a rule holds. Called with
// the state's lock held; the value is kept in d for raiseRuleIDs.
func (d *Dataplane) keepRewritten() error {
	var rb snatSnatRewrittenBase
	if err := d.snat.SnatRewritten.Lookup(uint32(0), &rb); err != nil {
		return fmt.Errorf("read snat_rewritten: %w", privHint(err))
	}
	if rb.Kept == snatRewrittenKept {
		d.rewritten = &rb
		return nil
	}
	totals, err := d.ruleTotals(MaxSNATRules)
	if err != nil {
		return err
	}
	es, err := d.snatEntries()
	if err != nil {
		return err
	}
	rb = snatSnatRewrittenBase{Kept: snatRewrittenKept, Ids: liveIDs(es)}
	var sum uint64
	for id, t := range totals {
		sum += t.Packets
		if t != (snatRuleStats{}) {
			rb.Ids = max(rb.Ids, uint32(id)+1)
		}
	}
	counted, err := d.snatCounter(SNATRewritten)
	if err != nil {
		return err
	}
	if counted > sum {
		rb.Offset = counted - sum
	}
	if err := d.snat.SnatRewritten.Update(uint32(0), rb, ebpf.UpdateAny); err != nil {
		return fmt.Errorf("store snat_rewritten: %w", privHint(err))
	}
	d.rewritten = &rb
	return nil
}

// liveIDs returns one past the highest rule id es hold.
func liveIDs(es []snatEntry) uint32 {
	var n uint32
	for _, e := range es {
		n = max(n, e.id+1)
	}
	return n
}

// raiseRuleIDs raises snat_rewritten.ids past id before id is given out
// (readers sum the slots below ids). After keepRewritten.
func (d *Dataplane) raiseRuleIDs(id uint32) error {
	if d.rewritten == nil {
		return fmt.Errorf("snat_rewritten not read")
	}
	if id < d.rewritten.Ids {
		return nil
	}
	rb := *d.rewritten
	rb.Ids = id + 1
	if err := d.snat.SnatRewritten.Update(uint32(0), rb, ebpf.UpdateAny); err != nil {
		return fmt.Errorf("store snat_rewritten: %w", privHint(err))
	}
	d.rewritten = &rb
	return nil
}

// summedIDs returns how many rule ids' slots Stats reads: those ever given
// out (rb.ids), and at least those rules hold (es: an older lbctl may
// give out ids without raising ids).
func summedIDs(rb snatSnatRewrittenBase, es []snatEntry) int {
	return int(max(rb.Ids, liveIDs(es)))
}

// snatCounter returns snat_counters[c], summed over CPUs.
func (d *Dataplane) snatCounter(c SNATCounter) (uint64, error) {
	var per []uint64
	if err := d.snat.SnatCounters.Lookup(uint32(c), &per); err != nil {
		return 0, fmt.Errorf("read snat counter %s: %w", c, privHint(err))
	}
	var sum uint64
	for _, v := range per {
		sum += v
	}
	return sum, nil
}

// rewritten returns the packets rewritten: with snat_rewritten kept, the
// offset plus the packets of every rule id ever given out (totals), and never less than
// snat_counters[SNAT_REWRITTEN] (counted), which only programs of an older
// lbctl raise (they count per rule too: taking the larger of two counts
// that never fall keeps the result from falling, and with kept the
// derived one is never the smaller while only this lbctl changes rules);
// without kept (no lbctl of this kind changed the state yet, so only
// older programs ran) the counter alone.
func rewritten(rb snatSnatRewrittenBase, totals []snatRuleStats, counted uint64) uint64 {
	if rb.Kept != snatRewrittenKept {
		return counted
	}
	sum := rb.Offset
	for _, t := range totals {
		sum += t.Packets
	}
	return max(sum, counted)
}
