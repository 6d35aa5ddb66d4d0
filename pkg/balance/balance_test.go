package balance

import (
	"fmt"
	"math"
	"net/netip"
	"strings"
	"sync"
	"testing"
)

func ups(weights ...int) []Upstream {
	u := make([]Upstream, len(weights))
	for i, w := range weights {
		u[i] = Upstream{Addr: netip.AddrPortFrom(netip.AddrFrom4([4]byte{198, 19, 16, byte(11 + i)}), 80), Weight: w}
	}
	return u
}

func mustNew(t testing.TB, alg string) Balancer {
	t.Helper()
	b, err := New(alg)
	if err != nil {
		t.Fatal(err)
	}
	return b
}

var algorithms = []string{RoundRobin, LeastConn, RandomTwo, Hash}

// nginx's own comment in ngx_http_upstream_round_robin.c: weights 5, 1, 1
// give "a a b a c a a".
func TestSmoothWeightedIsNginxSequence(t *testing.T) {
	u := ups(5, 1, 1)
	b := &SmoothWeighted{}
	var got strings.Builder
	for range 14 {
		got.WriteByte("abc"[b.Pick(u, 0, nil)])
	}
	if want := "aabacaa" + "aabacaa"; got.String() != want {
		t.Fatalf("sequence %s, want nginx's %s", got.String(), want)
	}
}

func TestRoundRobinExactShares(t *testing.T) {
	u := ups(1, 2, 3, 4)
	b := mustNew(t, RoundRobin)
	counts := make([]int, len(u))
	for range 10 * 10 {
		counts[b.Pick(u, 0, nil)]++
	}
	for i, c := range counts {
		if want := 10 * u[i].Weight; c != want {
			t.Errorf("upstream %d (weight %d): %d picks, want %d", i, u[i].Weight, c, want)
		}
	}
}

// checkShares asserts each upstream got its weight's share of picks within
// tolerance (a fraction of the expected count).
func checkShares(t *testing.T, name string, u []Upstream, counts []int, tolerance float64) {
	t.Helper()
	total, wsum := 0, 0
	for i := range u {
		total += counts[i]
		wsum += u[i].Weight
	}
	for i, c := range counts {
		want := float64(total) * float64(u[i].Weight) / float64(wsum)
		if math.Abs(float64(c)-want) > tolerance*want {
			t.Errorf("%s: upstream %d (weight %d): %d of %d, want %.0f ± %.0f%%", name, i, u[i].Weight, c, total, want, 100*tolerance)
		}
	}
}

func TestRandomTwoFollowsWeights(t *testing.T) {
	u := ups(1, 2, 3, 4)
	b := NewRandomTwo(42)
	counts := make([]int, len(u))
	// Every pick is released at once, so loads stay equal and the choice is
	// the first draw: proportional to weight.
	for range 100000 {
		counts[b.Pick(u, 0, nil)]++
	}
	checkShares(t, "random_two", u, counts, 0.05)
}

func TestRandomTwoPrefersLessLoaded(t *testing.T) {
	u := ups(1, 1)
	u[0].Active = 10
	b := NewRandomTwo(7)
	for range 100 {
		if got := b.Pick(u, 0, nil); got != 1 {
			t.Fatalf("picked %d with 10 connections over the idle 1", got)
		}
	}
}

// Connections that stay open: least_conn keeps Active/Weight level, so the
// open connections end up split by weight.
func TestLeastConnBalancesOpenConnectionsByWeight(t *testing.T) {
	for _, alg := range []string{LeastConn, RandomTwo} {
		u := ups(1, 2, 3, 4)
		b := mustNew(t, alg)
		for range 10000 {
			u[b.Pick(u, 0, nil)].Active++
		}
		counts := make([]int, len(u))
		for i := range u {
			counts[i] = int(u[i].Active)
		}
		tol := 0.001
		if alg == RandomTwo {
			tol = 0.05
		}
		checkShares(t, alg, u, counts, tol)
	}
}

func TestLeastConnTiesRotate(t *testing.T) {
	u := ups(1, 1, 1)
	b := mustNew(t, LeastConn)
	seen := map[int]bool{}
	for range 3 {
		seen[b.Pick(u, 0, nil)] = true
	}
	if len(seen) != 3 {
		t.Fatalf("three picks among equal idle upstreams reached %d of them, want 3", len(seen))
	}
}

func TestHashFollowsWeights(t *testing.T) {
	u := ups(1, 2, 3, 4)
	b := mustNew(t, Hash)
	counts := make([]int, len(u))
	for i := range 100000 {
		counts[b.Pick(u, clientKey(i, false), nil)]++
	}
	checkShares(t, "hash", u, counts, 0.05)
}

func TestHashIsSticky(t *testing.T) {
	u := ups(1, 1, 1, 1)
	b := mustNew(t, Hash)
	for i := range 1000 {
		k := clientKey(i, false)
		first := b.Pick(u, k, nil)
		for range 3 {
			if got := b.Pick(u, k, nil); got != first {
				t.Fatalf("client %d: picked %d then %d", i, first, got)
			}
		}
	}
}

func TestKeyWithPort(t *testing.T) {
	a := netip.MustParseAddrPort("198.18.99.1:40000")
	b := netip.MustParseAddrPort("198.18.99.1:40001")
	if Key(a, false) != Key(b, false) {
		t.Error("address-only keys differ between two ports of one client")
	}
	if Key(a, true) == Key(b, true) {
		t.Error("address:port keys are equal for two ports")
	}
	m := netip.MustParseAddrPort("[::ffff:198.18.99.1]:40000")
	if Key(a, true) != Key(m, true) {
		t.Error("an IPv4-mapped IPv6 client keys differently from its IPv4 form")
	}
}

func TestSkipsDown(t *testing.T) {
	for _, alg := range algorithms {
		u := ups(1, 1, 1, 1)
		u[1].Down = true
		u[3].Weight = 0
		b := mustNew(t, alg)
		for i := range 1000 {
			if got := b.Pick(u, clientKey(i, true), nil); got != 0 && got != 2 {
				t.Fatalf("%s: picked %d, which is down or weight 0", alg, got)
			}
		}
	}
}

func TestBackupsOnlyWhenEveryPrimaryIsDown(t *testing.T) {
	for _, alg := range algorithms {
		u := ups(1, 1, 1, 1)
		u[2].Backup = true
		u[3].Backup = true
		b := mustNew(t, alg)
		for i := range 200 {
			if got := b.Pick(u, clientKey(i, false), nil); got >= 2 {
				t.Fatalf("%s: picked backup %d while primaries are up", alg, got)
			}
		}
		u[0].Down = true
		for i := range 200 {
			if got := b.Pick(u, clientKey(i, false), nil); got != 1 {
				t.Fatalf("%s: picked %d while primary 1 is the only one up", alg, got)
			}
		}
		u[1].Down = true
		seen := map[int]bool{}
		for i := range 200 {
			got := b.Pick(u, clientKey(i, false), nil)
			if got != 2 && got != 3 {
				t.Fatalf("%s: picked %d with every primary down, want a backup", alg, got)
			}
			seen[got] = true
		}
		if len(seen) != 2 {
			t.Errorf("%s: backups used %v, want both", alg, seen)
		}
		u[2].Down, u[3].Down = true, true
		if got := b.Pick(u, 0, nil); got != -1 {
			t.Fatalf("%s: picked %d with everything down, want -1", alg, got)
		}
	}
}

// next_upstream_tries: each retry skips what was tried, every upstream is
// reached once, primaries before backups, then nothing.
func TestRetriesVisitEveryUpstreamOnce(t *testing.T) {
	for _, alg := range algorithms {
		u := ups(3, 1, 1, 2)
		u[3].Backup = true
		b := mustNew(t, alg)
		for c := range 50 {
			tried := map[int]bool{}
			skip := func(i int) bool { return tried[i] }
			for k := range len(u) {
				got := b.Pick(u, clientKey(c, false), skip)
				if got < 0 || tried[got] {
					t.Fatalf("%s: try %d picked %d (tried %v)", alg, k, got, tried)
				}
				if got == 3 && k < 3 {
					t.Fatalf("%s: backup picked on try %d before every primary", alg, k)
				}
				tried[got] = true
			}
			if got := b.Pick(u, clientKey(c, false), skip); got != -1 {
				t.Fatalf("%s: picked %d after everything was tried", alg, got)
			}
		}
	}
}

func TestNewUnknown(t *testing.T) {
	_, err := New("rr")
	if err == nil || err.Error() != `balance "rr": unknown algorithm (want round_robin, least_conn, random_two or hash)` {
		t.Fatalf("New(rr) = %v", err)
	}
}

func TestConcurrentPicks(t *testing.T) {
	for _, alg := range algorithms {
		b := mustNew(t, alg)
		u := ups(1, 2, 3)
		var wg sync.WaitGroup
		for g := range 4 {
			wg.Go(func() {
				for i := range 2000 {
					if got := b.Pick(u, clientKey(g*10000+i, true), nil); got < 0 || got > 2 {
						t.Errorf("%s: picked %d", alg, got)
						return
					}
				}
			})
		}
		wg.Wait()
	}
}

func clientKey(i int, withPort bool) uint64 {
	a := netip.AddrFrom4([4]byte{198, 18, byte(i >> 8), byte(i)})
	return Key(netip.AddrPortFrom(a, uint16(1024+i%50000)), withPort)
}

func FuzzPick(f *testing.F) {
	f.Add([]byte{1, 2, 3, 0x81, 0x40}, uint64(7), uint16(0))
	f.Add([]byte{0, 0, 0}, uint64(0), uint16(0xffff))
	f.Add([]byte{0xc5, 0x85, 0x05, 0x45}, uint64(1<<63), uint16(3))
	f.Fuzz(func(t *testing.T, spec []byte, key uint64, skipMask uint16) {
		if len(spec) > 16 {
			spec = spec[:16]
		}
		// Each byte: low 5 bits weight, 0x40 down, 0x80 backup.
		u := make([]Upstream, len(spec))
		for i, s := range spec {
			u[i] = Upstream{
				Addr:   netip.AddrPortFrom(netip.AddrFrom4([4]byte{198, 19, 16, byte(i)}), 80),
				Weight: int(s & 0x1f), Down: s&0x40 != 0, Backup: s&0x80 != 0, Active: int64(s & 7),
			}
		}
		skip := func(i int) bool { return skipMask&(1<<i) != 0 }
		ok := func(i int) bool { return !u[i].Down && u[i].Weight > 0 && !skip(i) }
		anyPrimary, anyAtAll := false, false
		for i := range u {
			if ok(i) {
				anyAtAll = true
				anyPrimary = anyPrimary || !u[i].Backup
			}
		}
		for _, alg := range algorithms {
			b := mustNew(t, alg)
			for range 3 {
				got := b.Pick(u, key, skip)
				switch {
				case !anyAtAll && got != -1:
					t.Fatalf("%s: picked %d with nothing eligible", alg, got)
				case anyAtAll && (got < 0 || got >= len(u) || !ok(got)):
					t.Fatalf("%s: picked %d, not eligible (%+v)", alg, got, u)
				case anyAtAll && anyPrimary && u[got].Backup:
					t.Fatalf("%s: picked backup %d while a primary is eligible", alg, got)
				}
			}
		}
	})
}

func ExampleSmoothWeighted() {
	u := ups(5, 1, 1)
	b := &SmoothWeighted{}
	for range 7 {
		fmt.Print(u[b.Pick(u, 0, nil)].Addr.Addr(), " ")
	}
	fmt.Println()
	// Output: 198.19.16.11 198.19.16.11 198.19.16.12 198.19.16.11 198.19.16.13 198.19.16.11 198.19.16.11
}
