package dataplane

import (
	"fmt"
	"math/rand/v2"
	"net/netip"
	"strings"
	"testing"

	"github.com/cilium/ebpf"
)

// olderSnat is the snat object of a0fc3a1, the last lbctl before the
// probed table: it knows kept 1 and 2 only (snat_hosts4 at exactly 2, the
// trie for IPv4 otherwise) and reads snat_rule_counts with its meaning
// then.
const olderSnat = "testdata/snat_a0fc3a1_bpfel.o"

// TestSNATOlderProgram: the state this lbctl keeps (kept 3, the expanded
// table, snat_table4_counts) stays right for a program of an older lbctl
// still attached to the same maps: for random IPv4 rule sets (/16../32)
// and IPv6 rules, it gives refMatch's answer, as this program does, also
// after deletes.
func TestSNATOlderProgram(t *testing.T) {
	tp := newTestProg(t)
	older := olderProgram(t, tp)

	rng := rand.New(rand.NewPCG(11, 12))
	live := []SNATRule{
		{Src: net6, Proto: UDP, SPort: 53, To: vip6},
		{Src: netip.PrefixFrom(backend6.Addr(), 128), Proto: UDP, To: vip6.Next()},
	}
	seen := map[string]bool{}
	for len(live) < 40 {
		r := randomRule4(rng, 16)
		if rng.IntN(4) == 0 {
			r.Proto = TCP
		}
		if !seen[r.key4()] {
			seen[r.key4()] = true
			live = append(live, r)
		}
	}
	tp.add(t, live...)
	check := func(what string, live []SNATRule) {
		t.Helper()
		var n snatSnatKindCounts
		if err := tp.objs.SnatRuleCounts.Lookup(uint32(0), &n); err != nil || n.Kept&snatKeptLevel != snatKeptTable4 {
			t.Fatalf("%s: kept %d (%v), want %d", what, n.Kept, err, snatKeptTable4)
		}
		pkts := []pkt{
			{src: backend6, dst: client6, proto: UDP, payload: []byte("q")},
			{src: netip.AddrPortFrom(backend6.Addr(), 54), dst: client6, proto: UDP, payload: []byte("q")},
		}
		for i := 0; i < 200; i++ {
			a := netip.AddrFrom4([4]byte{198, 19, byte(16 + rng.IntN(2)), byte(rng.IntN(256))})
			pkts = append(pkts, pkt{src: netip.AddrPortFrom(a, []uint16{53, 54, 999}[rng.IntN(3)]), dst: client4, proto: []Proto{UDP, TCP}[rng.IntN(2)], payload: []byte("q")})
		}
		for _, p := range pkts {
			want := p
			if r, ok := refMatch(live, p.src, p.proto); ok {
				want = rewrite(p, r.To, r.ToPort)
			}
			for name, prog := range map[string]*testProg{"this": tp, "older": older} {
				if d := diffPacket(prog.run(t, p.frame()), want.frame()); d != "" {
					t.Fatalf("%s: %s program, %s %s:%s", what, name, p.proto, p.src, d)
				}
			}
		}
	}
	check("40 rules", live)
	rng.Shuffle(len(live), func(i, j int) { live[i], live[j] = live[j], live[i] })
	for _, r := range live[:20] {
		if err := tp.d.DelSNAT(r); err != nil {
			t.Fatal(err)
		}
	}
	check(fmt.Sprintf("%d deleted", 20), live[20:])
}

// olderProgram loads olderSnat on tp's maps, as a program of an older
// lbctl still attached to the state this one keeps.
func olderProgram(t *testing.T, tp *testProg) *testProg {
	t.Helper()
	spec, err := ebpf.LoadCollectionSpec(olderSnat)
	if err != nil {
		t.Fatal(err)
	}
	shared := mapsByName(&tp.objs.snatMaps, nil)
	repl := map[string]*ebpf.Map{}
	for name := range spec.Maps {
		if strings.HasPrefix(name, ".") {
			continue
		}
		m, ok := shared[name]
		if !ok {
			t.Fatalf("older object's map %s is gone", name)
		}
		repl[name] = m
	}
	coll, err := ebpf.NewCollectionWithOptions(spec, ebpf.CollectionOptions{MapReplacements: repl})
	if err != nil {
		t.Fatalf("load the older program: %v", err)
	}
	t.Cleanup(coll.Close)
	return &testProg{objs: snatObjects{snatPrograms: snatPrograms{SnatEgress: coll.Programs["snat_egress"]}}}
}
