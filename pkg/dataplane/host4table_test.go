package dataplane

import (
	"encoding/binary"
	"fmt"
	"math/rand/v2"
	"net/netip"
	"testing"

	"github.com/cilium/ebpf"
	"github.com/cilium/ebpf/features"
	"go.uber.org/zap"

	"github.com/lbctl/lbctl/test/testenv"
)

// host4K is the snat_hosts4 key of a UDP host rule for a:port.
func host4K(a netip.Addr, port uint16) snatSnatHost4Key {
	return snatSnatHost4Key{Addr: binary.NativeEndian.Uint32(a.AsSlice()), Sport: htons(port), Proto: uint8(UDP)}
}

// hostRule4 is the table rule of the host key k (a /32).
func hostRule4(k snatSnatHost4Key) table4Rule {
	var a [4]byte
	binary.NativeEndian.PutUint32(a[:], k.Addr)
	return table4Rule{addr: binary.BigEndian.Uint32(a[:]), bits: 32, sport: k.Sport, proto: k.Proto}
}

// collidingKeys returns n keys (test addresses, UDP, any port) whose home
// slot is the same.
func collidingKeys(t *testing.T, n int) []snatSnatHost4Key {
	t.Helper()
	var out []snatSnatHost4Key
	var home uint32
	for port := 1; port < 65536; port++ {
		for i := 0; i < 256; i++ {
			k := host4K(netip.AddrFrom4([4]byte{198, 18, 7, byte(i)}), uint16(port))
			if len(out) == 0 {
				home = host4Home(k)
			}
			if host4Home(k) == home {
				out = append(out, k)
				if len(out) == n {
					return out
				}
			}
		}
	}
	t.Fatalf("found only %d keys with home slot %d", len(out), home)
	return nil
}

// entries lets host4Table.lookup read rule entries as the program does
// from snat_host4_rules (the mirror's rules; their targets do not matter).
func (t *host4Table) entries(id uint32) (snatSnatHost4Rule, bool) {
	r, ok := t.byID[id]
	return r.entry(snatSnatValue{SrcLen: uint8(r.bits), RuleId: id}), ok
}

// TestHost4TablePlacement: colliding keys take the slots after their home
// one by one, up to host4Probes; the next does not fit; deleting one
// leaves a deleted slot that the probe passes (the keys after it are
// still found) and the next insert reuses.
func TestHost4TablePlacement(t *testing.T) {
	keys := collidingKeys(t, host4Probes+1)
	tab := newHost4Table()
	home := host4Home(keys[0])
	for i, k := range keys[:host4Probes] {
		ss, ok := tab.add(hostRule4(k), uint32(i))
		if !ok || len(ss) != 1 || ss[0] != (home+uint32(i))&(host4Slots-1) {
			t.Fatalf("key %d placed at %v (%v), want slot %d", i, ss, ok, home+uint32(i))
		}
	}
	if _, ok := tab.add(hostRule4(keys[host4Probes]), host4Probes); ok {
		t.Fatalf("key %d placed beyond %d probes of its home", host4Probes, host4Probes)
	}
	for i, k := range keys[:host4Probes] {
		if id, ok := tab.lookup(k, tab.entries); !ok || id != uint32(i) {
			t.Fatalf("lookup of key %d = %d, %v", i, id, ok)
		}
	}
	// Delete the third: the ones after it stay found, it does not.
	if ss := tab.remove(hostRule4(keys[2])); len(ss) != 1 || tab.slots[ss[0]] != host4Deleted {
		t.Fatalf("remove: slots %v", ss)
	}
	if _, ok := tab.lookup(keys[2], tab.entries); ok {
		t.Fatal("deleted key still found")
	}
	for _, i := range []int{0, 1, 3, 7} {
		if _, ok := tab.lookup(keys[i], tab.entries); !ok {
			t.Fatalf("key %d lost after deleting key 2", i)
		}
	}
	// The ninth key now fits, into the deleted slot.
	ss, ok := tab.add(hostRule4(keys[host4Probes]), host4Probes)
	deleted := deletedSlots(tab)
	if !ok || len(ss) != 1 || ss[0] != (home+2)&(host4Slots-1) || deleted != 0 {
		t.Fatalf("ninth key at %v (%v), deleted slots %d: want the deleted slot %d", ss, ok, deleted, home+2)
	}
}

// deletedSlots counts the slots of tab marked deleted.
func deletedSlots(tab *host4Table) int {
	n := 0
	for _, v := range tab.slots {
		if v == host4Deleted {
			n++
		}
	}
	return n
}

// TestHost4TableSpread: 16,384 consecutive host addresses (the benchmark's
// rules are 10,000 of them) fit within the probes.
func TestHost4TableSpread(t *testing.T) {
	tab := newHost4Table()
	for i := 0; i < MaxSNATRules; i++ {
		a := netip.AddrFrom4([4]byte{198, 19, byte(i >> 8), byte(i)})
		if _, ok := tab.add(hostRule4(host4K(a, 53)), uint32(i)); !ok {
			t.Fatalf("rule %d (%s) does not fit", i, a)
		}
	}
	maxDisp := 0
	for k, s := range tab.pos {
		if d := int((s - host4Home(k)) & (host4Slots - 1)); d > maxDisp {
			maxDisp = d
		}
	}
	t.Logf("%d consecutive addresses: longest probe %d", len(tab.pos), maxDisp+1)
}

// refMatch is the rule semantics, written plainly: the longest prefix
// among the rules for the packet's port and the any-port rules, the port
// rule on equal prefixes.
func refMatch(rules []SNATRule, src netip.AddrPort, proto Proto) (SNATRule, bool) {
	var best SNATRule
	found := false
	for _, r := range rules {
		if r.Proto != proto || !r.Src.Contains(src.Addr()) || r.Src.Addr().Is4() != src.Addr().Is4() {
			continue
		}
		if r.SPort != 0 && (src.Port() == 0 || r.SPort != src.Port()) {
			continue
		}
		if !found || r.Src.Bits() > best.Src.Bits() || r.Src.Bits() == best.Src.Bits() && r.SPort != 0 {
			best, found = r, true
		}
	}
	return best, found
}

// table4Of returns r's table rule (r an IPv4 rule /24../32).
func table4Of(t *testing.T, r SNATRule) table4Rule {
	t.Helper()
	tr, ok := table4RuleOf(r.key())
	if !ok {
		t.Fatalf("%s is not a table rule", r)
	}
	return tr
}

// tableMatch is what the program finds in the table for src (all rules
// /24 or longer): the port probe, the any-port probe, the longer (the port
// rule on a tie).
func tableMatch(tab *host4Table, src netip.AddrPort, proto Proto) (uint32, bool) {
	k := snatSnatHost4Key{Addr: binary.NativeEndian.Uint32(src.Addr().AsSlice()), Proto: uint8(proto)}
	any, anyOK := tab.lookup(k, tab.entries)
	if src.Port() == 0 {
		return any, anyOK
	}
	k.Sport = htons(src.Port())
	exact, exactOK := tab.lookup(k, tab.entries)
	if exactOK && (!anyOK || tab.byID[exact].bits >= tab.byID[any].bits) {
		return exact, true
	}
	return any, anyOK
}

// checkWinners compares the table's answer with refMatch for every
// address of 198.19.16.0/24 (and a neighbour), ports 53, 54 and 0, UDP.
func checkWinners(t *testing.T, what string, tab *host4Table, live map[uint32]SNATRule) {
	t.Helper()
	var rules []SNATRule
	for _, r := range live {
		rules = append(rules, r)
	}
	for i := 0; i < 257; i++ {
		a := netip.AddrFrom4([4]byte{198, 19, 16 + byte(i>>8), byte(i)})
		for _, port := range []uint16{53, 54, 0} {
			src := netip.AddrPortFrom(a, port)
			want, wantOK := refMatch(rules, src, UDP)
			id, ok := tableMatch(tab, src, UDP)
			if ok != wantOK || ok && live[id] != want {
				t.Fatalf("%s: %s: table has %s (%v), want %s (%v)", what, src, live[id], ok, want, wantOK)
			}
		}
	}
}

// TestHost4TableWinners: overlapping /24, /28, /30, /32 rules, port and
// any-port, added and deleted in both orders: every key names the rule
// that wins it, and a delete hands its keys to the next longest rule.
func TestHost4TableWinners(t *testing.T) {
	a, b := netip.MustParseAddr("198.18.98.1"), netip.MustParseAddr("198.18.98.2")
	rules := []SNATRule{
		{Src: netip.MustParsePrefix("198.19.16.0/24"), Proto: UDP, To: a},
		{Src: netip.MustParsePrefix("198.19.16.0/28"), Proto: UDP, SPort: 53, To: b},
		{Src: netip.MustParsePrefix("198.19.16.0/28"), Proto: UDP, To: a},
		{Src: netip.MustParsePrefix("198.19.16.12/30"), Proto: UDP, To: b},
		{Src: netip.MustParsePrefix("198.19.16.8/30"), Proto: UDP, SPort: 53, To: a},
		{Src: netip.MustParsePrefix("198.19.16.13/32"), Proto: UDP, SPort: 53, To: a},
		{Src: netip.MustParsePrefix("198.19.16.7/32"), Proto: UDP, To: b},
		{Src: netip.MustParsePrefix("198.19.16.128/25"), Proto: UDP, SPort: 54, To: b},
		{Src: netip.MustParsePrefix("198.19.16.0/24"), Proto: TCP, To: a}, // other proto: never wins UDP
	}
	orders := map[string][]int{
		"short-first": {0, 1, 2, 3, 4, 5, 6, 7, 8},
		"long-first":  {8, 7, 6, 5, 4, 3, 2, 1, 0},
		"mixed":       {3, 0, 5, 1, 7, 2, 8, 6, 4},
	}
	for name, order := range orders {
		t.Run(name, func(t *testing.T) {
			for _, delOrder := range [][]int{order, reversed(order)} {
				tab := newHost4Table()
				live := map[uint32]SNATRule{}
				for _, i := range order {
					if _, ok := tab.add(table4Of(t, rules[i]), uint32(i)); !ok {
						t.Fatalf("add %s: does not fit", rules[i])
					}
					live[uint32(i)] = rules[i]
					checkWinners(t, "after adding "+rules[i].String(), tab, live)
				}
				for _, i := range delOrder {
					tab.remove(table4Of(t, rules[i]))
					delete(live, uint32(i))
					checkWinners(t, "after deleting "+rules[i].String(), tab, live)
				}
				if len(tab.pos) != 0 || deletedSlots(tab) == 0 {
					t.Fatalf("everything deleted: %d keys left, %d deleted slots", len(tab.pos), deletedSlots(tab))
				}
			}
		})
	}
	// The brief's two cases, counted: deleting a /28 that shadows part of
	// a /24 re-points its 16 keys; a /30 inside a /28 re-points 4.
	tab := newHost4Table()
	tab.add(table4Of(t, rules[0]), 0)
	tab.add(table4Of(t, rules[2]), 2)
	if ss, _ := tab.add(table4Of(t, rules[3]), 3); len(ss) != 4 {
		t.Errorf("a /30 inside a /28 changed %d slots, want 4", len(ss))
	}
	if ss := tab.remove(table4Of(t, rules[2])); len(ss) != 12 {
		t.Errorf("deleting the /28 (4 of its keys won by the /30) changed %d slots, want 12", len(ss))
	}
	if ss := tab.remove(table4Of(t, rules[3])); len(ss) != 4 || len(tab.pos) != 256 {
		t.Errorf("deleting the /30 changed %d slots (want 4), %d keys (want 256)", len(ss), len(tab.pos))
	}
}

func reversed(s []int) []int {
	out := make([]int, len(s))
	for i, v := range s {
		out[len(s)-1-i] = v
	}
	return out
}

// TestHost4TableRandom: random rule sets of /24../32, UDP, ports 53, 54 or
// any, random adds and deletes: the table's answer is refMatch's after
// every step.
func TestHost4TableRandom(t *testing.T) {
	rng := rand.New(rand.NewPCG(1, 2))
	for round := 0; round < 40; round++ {
		tab := newHost4Table()
		live := map[uint32]SNATRule{}
		byMatch := map[string]uint32{}
		for step := 0; step < 60; step++ {
			if len(live) > 0 && rng.IntN(3) == 0 {
				for id, r := range live {
					tab.remove(table4Of(t, r))
					delete(live, id)
					delete(byMatch, r.key4())
					break
				}
			} else {
				r := randomRule4(rng, host4MinBits)
				if _, ok := byMatch[r.key4()]; ok {
					continue
				}
				id := uint32(step)
				if _, ok := tab.add(table4Of(t, r), id); !ok {
					t.Fatalf("add %s: does not fit", r)
				}
				live[id] = r
				byMatch[r.key4()] = id
			}
			checkWinners(t, fmt.Sprintf("round %d step %d", round, step), tab, live)
		}
	}
}

// key4 names r's match.
func (r SNATRule) key4() string { return fmt.Sprintf("%s/%s/%d", r.Src, r.Proto, r.SPort) }

// randomRule4 returns a UDP rule in 198.19.16.0/24 (or around it, for
// lengths under 24) of length minBits..32, port 53, 54 or any.
func randomRule4(rng *rand.Rand, minBits int) SNATRule {
	bits := minBits + rng.IntN(33-minBits)
	a := netip.AddrFrom4([4]byte{198, 19, 16, byte(rng.IntN(256))})
	if bits < 24 {
		a = netip.AddrFrom4([4]byte{198, 19, byte(16 + rng.IntN(2)), 0})
	}
	p := netip.PrefixFrom(a, bits).Masked()
	port := []uint16{0, 53, 54}[rng.IntN(3)]
	to := netip.AddrFrom4([4]byte{198, 18, 98, byte(1 + rng.IntN(250))})
	return SNATRule{Src: p, Proto: UDP, SPort: port, To: to, ToPort: uint16(rng.IntN(2) * 5300)}
}

// TestHost4TableFull: at most a quarter of the slots hold keys: 64 /24
// any-port rules (16,384 keys) fit, the 65th does not, and changes nothing.
func TestHost4TableFull(t *testing.T) {
	tab := newHost4Table()
	for i := 0; i < host4MaxKeys/256; i++ {
		r := table4Rule{addr: 198<<24 | 19<<16 | uint32(i)<<8, bits: 24, proto: uint8(UDP)}
		if _, ok := tab.add(r, uint32(i)); !ok {
			t.Fatalf("/24 number %d does not fit", i)
		}
	}
	before := append([]uint32(nil), tab.slots...)
	if _, ok := tab.add(table4Rule{addr: 198<<24 | 18<<16, bits: 24, proto: uint8(UDP)}, 999); ok {
		t.Fatal("a 65th /24 fit in a quarter of the slots")
	}
	if len(tab.pos) != host4MaxKeys || fmt.Sprint(before) != fmt.Sprint(tab.slots) {
		t.Fatal("a failed add changed the table")
	}
	// A /28 inside one of them takes no new key: it fits.
	if _, ok := tab.add(table4Rule{addr: 198<<24 | 19<<16 | 5<<8, bits: 28, proto: uint8(UDP)}, 1000); !ok {
		t.Fatal("a /28 inside a /24 needs no new key but did not fit")
	}
}

// TestSNATHost4TableProgram: the program finds IPv4 host rules in the
// probed table (counts say SNAT_KEPT_TABLE4), also after deletions; with
// more colliding rules than the probes hold the table is not kept and the
// program takes them from snat_hosts4, every rule still applied. In each
// checksum mode (the lookup is the same code in all three).
func TestSNATHost4TableProgram(t *testing.T) {
	for _, mode := range []csumMode{csumInline, csumHelper, csumNoBTF} {
		t.Run(string(mode), func(t *testing.T) { testHost4TableProgram(t, newTestProgCsum(t, mode)) })
	}
}

func testHost4TableProgram(t *testing.T, tp *testProg) {
	var rules []SNATRule
	for i := 0; i < 300; i++ {
		a := netip.AddrFrom4([4]byte{198, 19, 1, byte(i)})
		if i >= 256 {
			a = netip.AddrFrom4([4]byte{198, 19, 2, byte(i)})
		}
		rules = append(rules, SNATRule{Src: netip.PrefixFrom(a, 32), Proto: UDP, SPort: 53, To: vip4, ToPort: uint16(1000 + i)})
	}
	tp.add(t, rules...)
	check := func(what string, want snatSnatKindCounts, live []SNATRule, gone []SNATRule) {
		t.Helper()
		var n snatSnatKindCounts
		if err := tp.objs.SnatRuleCounts.Lookup(uint32(0), &n); err != nil || n.Kept&snatKeptLevel != want.Kept {
			t.Fatalf("%s: kept %d (%v), want %d", what, n.Kept, err, want.Kept)
		}
		for _, r := range live {
			p := pkt{src: netip.AddrPortFrom(r.Src.Addr(), r.SPort), dst: client4, proto: r.Proto, payload: []byte("q")}
			if d := diffPacket(tp.run(t, p.frame()), rewrite(p, r.To, r.ToPort).frame()); d != "" {
				t.Fatalf("%s: rule %s not applied:%s", what, r, d)
			}
		}
		for _, r := range gone {
			p := pkt{src: netip.AddrPortFrom(r.Src.Addr(), r.SPort), dst: client4, proto: r.Proto, payload: []byte("q")}
			if d := diffPacket(tp.run(t, p.frame()), p.frame()); d != "" {
				t.Fatalf("%s: deleted rule %s applied:%s", what, r, d)
			}
		}
	}
	check("300 rules", snatSnatKindCounts{Kept: snatKeptTable4}, rules, nil)
	for _, r := range rules[:150] {
		if err := tp.d.DelSNAT(r); err != nil {
			t.Fatal(err)
		}
	}
	check("150 deleted", snatSnatKindCounts{Kept: snatKeptTable4}, rules[150:], rules[:150])
	// Re-adding reuses rule ids freed above: a grace period first.
	tp.d.ruleIDs.next = 0
	tp.add(t, rules[:10]...)
	if len(tp.d.host4.freed) != 0 {
		t.Fatalf("freed ids not cleared after their grace period: %d", len(tp.d.host4.freed))
	}
	check("10 re-added", snatSnatKindCounts{Kept: snatKeptTable4}, rules[:10], rules[10:150])

	// Full around one home slot: not kept, snat_hosts4 decides.
	var crowd []SNATRule
	for i, k := range collidingKeys(t, host4Probes+1) {
		var a [4]byte
		binary.NativeEndian.PutUint32(a[:], k.Addr)
		crowd = append(crowd, SNATRule{Src: netip.PrefixFrom(netip.AddrFrom4(a), 32), Proto: UDP, SPort: ntohs(k.Sport), To: vip4, ToPort: uint16(2000 + i)})
	}
	tp.add(t, crowd...)
	check("table full around one slot", snatSnatKindCounts{Kept: snatKeptHosts4}, append(crowd, rules[150:]...), rules[10:150])
	// The next process (a fresh sync) tries again, and fails again.
	tp.d.ruleIDs = nil
	tp.add(t, SNATRule{Src: netip.MustParsePrefix("198.19.3.1/32"), Proto: TCP, To: vip4})
	check("after a resync", snatSnatKindCounts{Kept: snatKeptHosts4}, crowd, nil)
	// Without the crowd the table is kept again at the next sync.
	for _, r := range crowd {
		if err := tp.d.DelSNAT(r); err != nil {
			t.Fatal(err)
		}
	}
	tp.d.ruleIDs = nil
	tp.add(t, SNATRule{Src: netip.MustParsePrefix("198.19.3.2/32"), Proto: TCP, To: vip4})
	check("crowd deleted, resynced", snatSnatKindCounts{Kept: snatKeptTable4}, rules[150:], crowd)

	// More keys than a quarter of the slots: 65 any-port TCP /24s. The
	// 65th does not fit (kept 2), every rule still applies; deleting one
	// and resyncing keeps the table again.
	var wide []SNATRule
	for i := 0; i < host4MaxKeys/256+1; i++ {
		wide = append(wide, SNATRule{Src: netip.PrefixFrom(netip.AddrFrom4([4]byte{198, 18, byte(i), 0}), 24), Proto: TCP, To: vip4, ToPort: uint16(3000 + i)})
	}
	tp.d.ruleIDs = nil
	tp.add(t, wide...)
	probe := func(r SNATRule) SNATRule { r.Src = netip.PrefixFrom(r.Src.Addr().Next().Next(), 32); return r }
	var wideProbes []SNATRule
	for _, r := range wide {
		wideProbes = append(wideProbes, probe(r))
	}
	check("65 /24s", snatSnatKindCounts{Kept: snatKeptHosts4}, append(wideProbes, rules[150:]...), nil)
	if err := tp.d.DelSNAT(wide[0]); err != nil {
		t.Fatal(err)
	}
	// 64 /24s plus the 160 host rules exceed the quarter too: delete one more.
	if err := tp.d.DelSNAT(wide[1]); err != nil {
		t.Fatal(err)
	}
	tp.d.ruleIDs = nil
	tp.add(t, SNATRule{Src: netip.MustParsePrefix("198.19.3.3/32"), Proto: TCP, To: vip4})
	check("63 /24s, resynced", snatSnatKindCounts{Kept: snatKeptTable4}, append(wideProbes[2:], rules[150:]...), wideProbes[:2])
}

// TestSNATTable4Differential: random IPv4 rule sets (/16../32, port or
// any, UDP and TCP) and packets: the program's output with the probed
// table kept equals its output with snat_hosts4 + trie (kept 2) and with
// the trie alone (no counts), and the rule refMatch picks; after random
// deletes and re-adds too. In each checksum mode.
func TestSNATTable4Differential(t *testing.T) {
	for _, mode := range []csumMode{csumInline, csumHelper, csumNoBTF} {
		t.Run(string(mode), func(t *testing.T) { testTable4Differential(t, mode) })
	}
}

func testTable4Differential(t *testing.T, mode csumMode) {
	rng := rand.New(rand.NewPCG(7, uint64(len(mode))))
	for round := 0; round < 12; round++ {
		tp := newTestProgCsum(t, mode)
		var live []SNATRule
		seen := map[string]bool{}
		for len(live) < 4+rng.IntN(30) {
			r := randomRule4(rng, 16)
			if rng.IntN(4) == 0 {
				r.Proto = TCP
			}
			if seen[r.key4()] {
				continue
			}
			seen[r.key4()] = true
			tp.add(t, r)
			live = append(live, r)
		}
		compareKept(t, tp, rng, fmt.Sprintf("round %d", round), live)
		// Delete a random half, re-add some of them (ids reused).
		rng.Shuffle(len(live), func(i, j int) { live[i], live[j] = live[j], live[i] })
		half := len(live) / 2
		for _, r := range live[:half] {
			if err := tp.d.DelSNAT(r); err != nil {
				t.Fatal(err)
			}
		}
		compareKept(t, tp, rng, fmt.Sprintf("round %d, half deleted", round), live[half:])
		tp.d.ruleIDs.next = 0
		tp.add(t, live[:half/2]...)
		now := append(append([]SNATRule(nil), live[:half/2]...), live[half:]...)
		compareKept(t, tp, rng, fmt.Sprintf("round %d, re-added", round), now)
	}
}

// compareKept runs random packets (addresses in and around the rules,
// ports 53, 54, other) with the state as kept (table), as kept 2 and with
// no counts, and checks the outputs against each other and refMatch.
func compareKept(t *testing.T, tp *testProg, rng *rand.Rand, what string, live []SNATRule) {
	t.Helper()
	var counts snatSnatKindCounts
	if err := tp.objs.SnatRuleCounts.Lookup(uint32(0), &counts); err != nil {
		t.Fatal(err)
	}
	if counts.Kept&snatKeptLevel != snatKeptTable4 {
		t.Fatalf("%s: kept %d, want the table (%d)", what, counts.Kept, snatKeptTable4)
	}
	setKept := func(kept uint32) {
		c := counts
		if kept != snatKeptTable4 {
			c.Kept = kept
		}
		if kept == 0 {
			c = snatSnatKindCounts{}
		}
		if err := tp.objs.SnatRuleCounts.Update(uint32(0), c, ebpf.UpdateAny); err != nil {
			t.Fatal(err)
		}
	}
	var pkts []pkt
	for i := 0; i < 150; i++ {
		a := netip.AddrFrom4([4]byte{198, 19, byte(16 + rng.IntN(2)), byte(rng.IntN(256))})
		if i < len(live) { // one inside each rule for sure
			a = live[i].Src.Addr()
			for n := rng.IntN(min(1<<(32-live[i].Src.Bits()), 256)); n > 0; n-- {
				a = a.Next()
			}
		}
		port := []uint16{53, 54, 1234}[rng.IntN(3)]
		proto := []Proto{UDP, UDP, TCP}[rng.IntN(3)]
		pkts = append(pkts, pkt{src: netip.AddrPortFrom(a, port), dst: client4, proto: proto, payload: []byte("q")})
	}
	outs := map[uint32][][]byte{}
	for _, kept := range []uint32{snatKeptTable4, snatKeptHosts4, 0} {
		setKept(kept)
		for _, p := range pkts {
			outs[kept] = append(outs[kept], tp.run(t, p.frame()))
		}
	}
	setKept(snatKeptTable4)
	for i, p := range pkts {
		want := p
		if r, ok := refMatch(live, p.src, p.proto); ok {
			want = rewrite(p, r.To, r.ToPort)
		}
		for _, kept := range []uint32{snatKeptTable4, snatKeptHosts4, 0} {
			if d := diffPacket(outs[kept][i], want.frame()); d != "" {
				t.Fatalf("%s: %s %s with kept %d:%s\nrules %v", what, p.proto, p.src, kept, d, live)
			}
		}
	}
}

// TestHost4HomesApart: the keys one table rule covers (one port and
// proto, addresses differing in the last byte only) have home slots at
// least 2 x host4Probes apart, so a probe never meets the slot of another
// key the same rule covers (which the masked compare would take for its
// own). The program relies on it (bpf/lib/maps.h, struct snat_host4_slot).
func TestHost4HomesApart(t *testing.T) {
	minDist := host4Slots
	for _, base := range []netip.Addr{netip.MustParseAddr("198.19.16.0"), netip.MustParseAddr("10.1.2.0"), netip.MustParseAddr("255.255.255.0")} {
		for _, port := range []uint16{0, 53, 65535} {
			for _, proto := range []Proto{UDP, TCP} {
				var homes []uint32
				b := base.As4()
				for i := 0; i < 256; i++ {
					k := host4K(netip.AddrFrom4([4]byte{b[0], b[1], b[2], byte(i)}), port)
					k.Proto = uint8(proto)
					homes = append(homes, host4Home(k))
				}
				for i := range homes {
					for j := i + 1; j < len(homes); j++ {
						d := int((homes[i] - homes[j]) & (host4Slots - 1))
						minDist = min(minDist, d, host4Slots-d)
					}
				}
			}
		}
	}
	if minDist < 2*host4Probes {
		t.Fatalf("keys of one /24 have homes %d slots apart: a probe (%d slots) may meet another key of its rule", minDist, host4Probes)
	}
	t.Logf("homes of one /24's keys at least %d slots apart", minDist)
}

// TestSNATTable4NotMmapable: on a kernel without BPF_F_MMAPABLE
// (mmapableSlots drops the flag) no table is kept: kept 2, and the
// program still applies host and prefix rules (snat_hosts4, the trie).
func TestSNATTable4NotMmapable(t *testing.T) {
	testenv.RequireRoot(t)
	spec, err := loadSnat()
	if err != nil {
		t.Fatal(err)
	}
	spec.Maps[snatMapSnatHost4Slots].Flags &^= uint32(features.BPF_F_MMAPABLE)
	tp := &testProg{}
	if err := spec.LoadAndAssign(&tp.objs, nil); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { tp.objs.Close() })
	tp.d = &Dataplane{log: zap.NewNop(), snat: tp.objs.snatMaps}
	t.Cleanup(tp.d.unmapSlots)
	host := SNATRule{Src: netip.PrefixFrom(backend4.Addr(), 32), Proto: UDP, SPort: 53, To: vip4, ToPort: 5300}
	prefix := SNATRule{Src: net4, Proto: UDP, To: vip4.Next()}
	tp.add(t, host, prefix)
	var n snatSnatKindCounts
	if err := tp.objs.SnatRuleCounts.Lookup(uint32(0), &n); err != nil || n.Kept != snatKeptHosts4 {
		t.Fatalf("kept %d (%v), want %d", n.Kept, err, snatKeptHosts4)
	}
	for _, c := range []struct {
		src netip.AddrPort
		r   SNATRule
	}{{backend4, host}, {netip.AddrPortFrom(backend4.Addr(), 54), prefix}} {
		p := pkt{src: c.src, dst: client4, proto: UDP, payload: []byte("q")}
		if d := diffPacket(tp.run(t, p.frame()), rewrite(p, c.r.To, c.r.ToPort).frame()); d != "" {
			t.Fatalf("%s: want rule %s:%s", c.src, c.r, d)
		}
	}
}
