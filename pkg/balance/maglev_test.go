package balance

import (
	"math"
	"testing"
)

func TestMaglevSize(t *testing.T) {
	for _, n := range []int{1, 4, 655, 656, 1000, 5000} {
		m := MaglevSize(n)
		if !prime(m) || m < 100*n || m < DefaultMaglevSize {
			t.Errorf("MaglevSize(%d) = %d: want a prime >= max(100*n, %d)", n, m, DefaultMaglevSize)
		}
	}
	if MaglevSize(4) != 65537 {
		t.Errorf("MaglevSize(4) = %d, want 65537", MaglevSize(4))
	}
	if m := MaglevSize(1000); m != 100003 {
		t.Errorf("MaglevSize(1000) = %d, want 100003 (the first prime >= 100000)", m)
	}
}

// Every slot filled; equal weights get equal shares of the table within
// 1% (Maglev fills in turns, so shares differ by at most one slot per
// round's end) and of 200000 client keys within 5% (sampling noise alone is ~1.3% per upstream at n=33).
func TestMaglevEvenness(t *testing.T) {
	for _, n := range []int{3, 4, 10, 33} {
		u := ups(make([]int, n)...)
		for i := range u {
			u[i].Weight = 1
		}
		table := MaglevTable(u, 0)
		slots := make([]int, n)
		for _, i := range table {
			if i < 0 || i >= n {
				t.Fatalf("n=%d: slot holds %d", n, i)
			}
			slots[i]++
		}
		want := float64(len(table)) / float64(n)
		for i, c := range slots {
			if math.Abs(float64(c)-want) > 0.01*want {
				t.Errorf("n=%d: upstream %d has %d slots, want %.0f ± 1%%", n, i, c, want)
			}
		}
		b := &MaglevHash{}
		keys := make([]int, n)
		const clients = 200000
		for c := range clients {
			keys[b.Pick(u, clientKey(c, true), nil)]++
		}
		checkShares(t, "maglev keys", u, keys, 0.05)
	}
}

// Removing one of N upstreams moves the removed one's keys (1/N) and
// barely any other: the bound asserted is 1/N + 2% of all keys. Marking one
// down through the picker remaps the same way, and marking it up again
// restores the old mapping exactly.
func TestMaglevDisruption(t *testing.T) {
	for _, n := range []int{5, 10, 20} {
		u := ups(make([]int, n)...)
		for i := range u {
			u[i].Weight = 1
		}
		before := MaglevTable(u, 0)
		removed := n / 2
		rest := append(append([]Upstream{}, u[:removed]...), u[removed+1:]...)
		after := MaglevTable(rest, len(before))
		moved, movedOther := 0, 0
		for s := range before {
			old := before[s]
			// Index shift: rest[j] is u[j] for j < removed, u[j+1] beyond.
			nw := after[s]
			if nw >= removed {
				nw++
			}
			if nw != old {
				moved++
				if old != removed {
					movedOther++
				}
			}
		}
		frac := float64(moved) / float64(len(before))
		bound := 1/float64(n) + 0.02
		t.Logf("n=%d: %.2f%% of slots moved (1/N = %.2f%%), %.2f%% not of the removed upstream",
			n, 100*frac, 100/float64(n), 100*float64(movedOther)/float64(len(before)))
		if frac > bound {
			t.Errorf("n=%d: removing one upstream moved %.2f%% of slots, bound %.2f%%", n, 100*frac, 100*bound)
		}
		if frac < 1/float64(n)*0.99 {
			t.Errorf("n=%d: only %.2f%% of slots moved, but the removed upstream held ~%.2f%%", n, 100*frac, 100/float64(n))
		}

		// Through the picker: Down instead of removal.
		b := &MaglevHash{}
		const clients = 50000
		first := make([]int, clients)
		for c := range clients {
			first[c] = b.Pick(u, clientKey(c, false), nil)
		}
		u[removed].Down = true
		changed := 0
		for c := range clients {
			got := b.Pick(u, clientKey(c, false), nil)
			if got == removed {
				t.Fatalf("n=%d: picked the down upstream", n)
			}
			if got != first[c] {
				changed++
			}
		}
		if f := float64(changed) / clients; f > bound {
			t.Errorf("n=%d: marking one down remapped %.2f%% of clients, bound %.2f%%", n, 100*f, 100*bound)
		}
		u[removed].Down = false
		for c := range clients {
			if got := b.Pick(u, clientKey(c, false), nil); got != first[c] {
				t.Fatalf("n=%d: client %d maps to %d after recovery, was %d", n, c, got, first[c])
			}
		}
	}
}

func TestMaglevTableNothingEligible(t *testing.T) {
	u := ups(1, 1)
	u[0].Down, u[1].Down = true, true
	for s, i := range MaglevTable(u, 7) {
		if i != -1 {
			t.Fatalf("slot %d = %d with every upstream down, want -1", s, i)
		}
	}
}

func TestMaglevTableWeights(t *testing.T) {
	u := ups(1, 3)
	table := MaglevTable(u, 0)
	counts := make([]int, 2)
	for _, i := range table {
		counts[i]++
	}
	checkShares(t, "maglev weights", u, counts, 0.01)
}

func BenchmarkPick(b *testing.B) {
	for _, alg := range algorithms {
		b.Run(alg, func(b *testing.B) {
			bal := mustNew(b, alg)
			u := ups(1, 1, 1, 1)
			for i := 0; b.Loop(); i++ {
				bal.Pick(u, uint64(i)*0x9e3779b97f4a7c15, nil)
			}
		})
	}
}
