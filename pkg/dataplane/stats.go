package dataplane

import (
	"fmt"
)

// SNATCounter names a slot of the snat program's counter array. The values
// mirror enum snat_counter in bpf/lib/maps.h and never change.
type SNATCounter uint32

const (
	SNATSeen        = SNATCounter(snatSnatCounterSNAT_SEEN)
	SNATRewritten   = SNATCounter(snatSnatCounterSNAT_REWRITTEN)
	SNATNoMatch     = SNATCounter(snatSnatCounterSNAT_NO_MATCH)
	SNATNotParsed   = SNATCounter(snatSnatCounterSNAT_NOT_PARSED)
	SNATErrors      = SNATCounter(snatSnatCounterSNAT_ERRORS)
	SNATFragments   = SNATCounter(snatSnatCounterSNAT_FRAGMENTS)
	numSNATCounters = int(snatSnatCounterSNAT_COUNTER_MAX)
)

var snatCounterNames = [...]string{
	SNATSeen:      "seen",
	SNATRewritten: "rewritten",
	SNATNoMatch:   "no_match",
	SNATNotParsed: "not_parsed",
	SNATErrors:    "errors",
	SNATFragments: "fragments",
}

func (c SNATCounter) String() string {
	if int(c) < len(snatCounterNames) {
		return snatCounterNames[c]
	}
	return fmt.Sprintf("counter%d", uint32(c))
}

// Counter is one program counter, summed over CPUs.
type Counter struct {
	Name  string `json:"name"`
	Value uint64 `json:"value"`
}

// RuleStats is one rule and what it rewrote, summed over CPUs.
type RuleStats struct {
	SNATRule
	Packets uint64 `json:"packets"`
	Bytes   uint64 `json:"bytes"`
}

// Stats are the counters of every program.
type Stats struct {
	// SNAT holds the snat program's counters in enum order (seen first).
	SNAT      []Counter   `json:"snat"`
	SNATRules []RuleStats `json:"snat_rules"`
	// XDP holds the xdp_lb program's counters in enum order (seen first);
	// empty when XDP was never attached.
	XDP []Counter `json:"xdp,omitempty"`
	// Steer holds the steer program's counters in enum order (seen first).
	Steer []Counter `json:"steer"`
	// SteerUpstreams are the steered upstreams with their packet counts.
	SteerUpstreams []SteerUpstream `json:"steer_upstreams"`
}

// SteerCounter returns the named steer counter.
func (s Stats) SteerCounter(c SteerCounter) uint64 {
	if int(c) < len(s.Steer) {
		return s.Steer[c].Value
	}
	return 0
}

// Counter returns the named snat counter.
func (s Stats) SNATCounter(c SNATCounter) uint64 {
	if int(c) < len(s.SNAT) {
		return s.SNAT[c].Value
	}
	return 0
}

// Stats reads every counter.
func (d *Dataplane) Stats() (Stats, error) {
	var st Stats
	for i := 0; i < numSNATCounters; i++ {
		v, err := d.snatCounter(SNATCounter(i))
		if err != nil {
			return Stats{}, err
		}
		st.SNAT = append(st.SNAT, Counter{Name: SNATCounter(i).String(), Value: v})
	}
	// The rules, then their bases, then the slots: a rule deleted and its
	// id given to a new one between these reads shows its own base with
	// the newer slot (never less than its count so far), except between
	// the first two reads (as before, when a reused slot was zeroed).
	es, err := d.snatEntries()
	if err != nil {
		return Stats{}, err
	}
	var rb snatSnatRewrittenBase
	if err := d.snat.SnatRewritten.Lookup(uint32(0), &rb); err != nil {
		return Stats{}, fmt.Errorf("read snat_rewritten: %w", privHint(err))
	}
	n := summedIDs(rb, es)
	bases, err := d.ruleBases(n)
	if err != nil {
		return Stats{}, err
	}
	totals, err := d.ruleTotals(n)
	if err != nil {
		return Stats{}, err
	}
	// rewritten is counted per rule only (rewritten.go).
	st.SNAT[SNATRewritten].Value = rewritten(rb, totals, st.SNAT[SNATRewritten].Value)
	// seen is not counted in BPF: every packet is exactly one of these.
	// Programs of an older lbctl counted it too, but kept this same sum,
	// so the sum is right whichever programs ran.
	st.SNAT[SNATSeen].Value = 0
	for _, c := range []SNATCounter{SNATRewritten, SNATNoMatch, SNATNotParsed, SNATErrors} {
		st.SNAT[SNATSeen].Value += st.SNAT[c].Value
	}
	for _, e := range es {
		rs := RuleStats{SNATRule: e.rule}
		if int(e.id) < n {
			c := ruleCounts(totals[e.id], bases[e.id])
			rs.Packets, rs.Bytes = c.Packets, c.Bytes
		}
		st.SNATRules = append(st.SNATRules, rs)
	}
	if st.XDP, err = d.xdpCounters(); err != nil {
		return Stats{}, err
	}
	if d.steer.SteerCounters == nil { // a snat-only handle (tests)
		return st, nil
	}
	if st.Steer, err = d.SteerCounters(); err != nil {
		return Stats{}, err
	}
	if st.SteerUpstreams, err = d.SteerUpstreams(); err != nil {
		return Stats{}, err
	}
	return st, nil
}

// ProgramCounters are one program's counters, for generic consumers
// (lbctl stats --watch, metrics).
type ProgramCounters struct {
	Name     string    `json:"name"`
	Counters []Counter `json:"counters"`
}

// Programs lists every program's counters; a program that lands adds its
// line here.
func (s Stats) Programs() []ProgramCounters {
	out := []ProgramCounters{
		{Name: "snat", Counters: s.SNAT},
	}
	if len(s.XDP) > 0 {
		out = append(out, ProgramCounters{Name: "xdp_lb", Counters: s.XDP})
	}
	return out
}
