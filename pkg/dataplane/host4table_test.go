package dataplane

import (
	"encoding/binary"
	"net/netip"
	"testing"
)

// host4K is the snat_hosts4 key of a UDP host rule for a:port.
func host4K(a netip.Addr, port uint16) snatSnatHost4Key {
	return snatSnatHost4Key{Addr: binary.NativeEndian.Uint32(a.AsSlice()), Sport: htons(port), Proto: uint8(UDP)}
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

// keysOf lets host4Table.lookup check keys the way the program does
// (through the rule id's entry).
func keysOf(m map[uint32]snatSnatHost4Key) func(uint32) snatSnatHost4Key {
	return func(id uint32) snatSnatHost4Key { return m[id] }
}

// TestHost4TablePlacement: colliding keys take the slots after their home
// one by one, up to host4Probes; the next does not fit; deleting one
// leaves a deleted slot that the probe passes (the keys after it are
// still found) and the next insert reuses.
func TestHost4TablePlacement(t *testing.T) {
	keys := collidingKeys(t, host4Probes+1)
	tab := newHost4Table()
	ids := map[uint32]snatSnatHost4Key{}
	home := host4Home(keys[0])
	for i, k := range keys[:host4Probes] {
		s, ok := tab.insert(k, uint32(i))
		if !ok || s != (home+uint32(i))&(host4Slots-1) {
			t.Fatalf("key %d placed at %d (%v), want slot %d", i, s, ok, home+uint32(i))
		}
		ids[uint32(i)] = k
	}
	if _, ok := tab.insert(keys[host4Probes], host4Probes); ok {
		t.Fatalf("key %d placed beyond %d probes of its home", host4Probes, host4Probes)
	}
	for i, k := range keys[:host4Probes] {
		if id, ok := tab.lookup(k, keysOf(ids)); !ok || id != uint32(i) {
			t.Fatalf("lookup of key %d = %d, %v", i, id, ok)
		}
	}
	// Delete the third: the ones after it stay found, it does not.
	if s, ok := tab.remove(keys[2]); !ok || tab.slots[s] != host4Deleted {
		t.Fatalf("remove: slot %d %v", s, ok)
	}
	if _, ok := tab.lookup(keys[2], keysOf(ids)); ok {
		t.Fatal("deleted key still found")
	}
	for _, i := range []int{0, 1, 3, 7} {
		if _, ok := tab.lookup(keys[i], keysOf(ids)); !ok {
			t.Fatalf("key %d lost after deleting key 2", i)
		}
	}
	// The ninth key now fits, into the deleted slot.
	s, ok := tab.insert(keys[host4Probes], host4Probes)
	if !ok || s != (home+2)&(host4Slots-1) || tab.deleted != 0 {
		t.Fatalf("ninth key at %d (%v), deleted %d: want the deleted slot %d", s, ok, tab.deleted, home+2)
	}
}

// TestHost4TableSpread: 10,000 consecutive host addresses (the benchmark's
// rules) and the whole 198.18.0.0/15 with port 53 fit within the probes.
func TestHost4TableSpread(t *testing.T) {
	tab := newHost4Table()
	for i := 0; i < MaxSNATRules; i++ {
		a := netip.AddrFrom4([4]byte{198, 19, byte(i >> 8), byte(i)})
		if _, ok := tab.insert(host4K(a, 53), uint32(i)); !ok {
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
		if err := tp.objs.SnatRuleCounts.Lookup(uint32(0), &n); err != nil || n.Kept != want.Kept {
			t.Fatalf("%s: kept %d (%v), want %d", what, n.Kept, err, want.Kept)
		}
		for _, r := range live {
			p := pkt{src: netip.AddrPortFrom(r.Src.Addr(), r.SPort), dst: client4, proto: UDP, payload: []byte("q")}
			if d := diffPacket(tp.run(t, p.frame()), rewrite(p, r.To, r.ToPort).frame()); d != "" {
				t.Fatalf("%s: rule %s not applied:%s", what, r, d)
			}
		}
		for _, r := range gone {
			p := pkt{src: netip.AddrPortFrom(r.Src.Addr(), r.SPort), dst: client4, proto: UDP, payload: []byte("q")}
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
}
