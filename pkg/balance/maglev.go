package balance

import (
	"hash/fnv"
	"slices"
	"sync"
	"sync/atomic"
)

// DefaultMaglevSize is the lookup table size for up to 655 upstreams: a
// prime, as Maglev requires, and at least 100 slots per upstream.
const DefaultMaglevSize = 65537

// MaglevSize returns the table size for n upstreams: DefaultMaglevSize, or
// the smallest prime >= 100*n when that is larger.
func MaglevSize(n int) int {
	if 100*n <= DefaultMaglevSize {
		return DefaultMaglevSize
	}
	m := 100 * n
	for !prime(m) {
		m++
	}
	return m
}

func prime(n int) bool {
	if n < 2 {
		return false
	}
	for d := 2; d*d <= n; d++ {
		if n%d == 0 {
			return false
		}
	}
	return true
}

// MaglevTable builds a Maglev lookup table (Eisenbud et al., NSDI 2016) of
// size slots over the eligible upstreams of ups: primaries that are not Down
// and have a Weight above zero, or the backups when no primary is. Each slot
// holds an index into ups; every slot is -1 when nothing is eligible. size
// must be a prime (MaglevSize gives one); 0 means MaglevSize(len(ups)).
//
// An upstream's permutation depends only on its address, so a table rebuilt
// after one of N upstreams is removed keeps about (N-1)/N of its slots. A
// weight w gives an upstream w turns per round of the fill, so its share of
// the slots is proportional to w.
func MaglevTable(ups []Upstream, size int) []int {
	if size <= 0 {
		size = MaglevSize(len(ups))
	}
	table := make([]int, size)
	for i := range table {
		table[i] = -1
	}
	backup, ok := tier(ups, nil)
	if !ok {
		return table
	}
	type perm struct{ index, offset, skip, next, weight int }
	var ps []perm
	for i := range ups {
		if !eligible(ups, i, nil, backup) {
			continue
		}
		name := ups[i].Addr.String()
		ps = append(ps, perm{
			index:  i,
			offset: int(hashString(name, 0xa5) % uint64(size)),
			skip:   int(hashString(name, 0x5a)%uint64(size-1)) + 1,
			weight: ups[i].Weight,
		})
	}
	filled := 0
	for {
		for k := range ps {
			p := &ps[k]
			for range p.weight {
				c := (p.offset + p.next*p.skip) % size
				for table[c] >= 0 {
					p.next++
					c = (p.offset + p.next*p.skip) % size
				}
				table[c] = p.index
				p.next++
				if filled++; filled == size {
					return table
				}
			}
		}
	}
}

func hashString(s string, seed byte) uint64 {
	h := fnv.New64a()
	h.Write([]byte{seed})
	h.Write([]byte(s))
	return mix(h.Sum64())
}

// MaglevHash picks by looking the key up in a Maglev table over the
// eligible upstreams; the table is rebuilt when the set of eligible
// upstreams or their weights change. An upstream in skip (already tried)
// is passed over by probing the following slots.
type MaglevHash struct {
	mu  sync.Mutex
	cur atomic.Pointer[maglevState]
}

type maglevState struct {
	sig   []int // index, weight pairs of the eligible upstreams
	table []int
}

// Pick implements Balancer.
func (m *MaglevHash) Pick(ups []Upstream, key uint64, skip Skip) int {
	st := m.state(ups)
	n := len(st.table)
	start := int(key % uint64(n))
	for k := range n {
		i := st.table[(start+k)%n]
		if i < 0 {
			break
		}
		if i < len(ups) && (skip == nil || !skip(i)) {
			return i
		}
		if k >= 4*len(ups) && k > 64 {
			break // the table's upstreams are all skipped; fall back below
		}
	}
	// Everything in the table was tried: take any eligible upstream left
	// (a backup, once every primary has been tried).
	backup, ok := tier(ups, skip)
	if !ok {
		return -1
	}
	for i := range ups {
		if eligible(ups, i, skip, backup) {
			return i
		}
	}
	return -1
}

func (m *MaglevHash) state(ups []Upstream) *maglevState {
	if st := m.cur.Load(); st != nil && st.matches(ups) {
		return st
	}
	sig := signature(ups)
	m.mu.Lock()
	defer m.mu.Unlock()
	if st := m.cur.Load(); st != nil && slices.Equal(st.sig, sig) {
		return st
	}
	st := &maglevState{sig: sig, table: MaglevTable(ups, MaglevSize(len(ups)))}
	m.cur.Store(st)
	return st
}

// matches reports whether st was built for the current state of ups,
// without allocating (Pick runs once per connection).
func (st *maglevState) matches(ups []Upstream) bool {
	backup, ok := tier(ups, nil)
	if !ok {
		return len(st.sig) == 0
	}
	k := 0
	for i := range ups {
		if !eligible(ups, i, nil, backup) {
			continue
		}
		if k+1 >= len(st.sig) || st.sig[k] != i || st.sig[k+1] != ups[i].Weight {
			return false
		}
		k += 2
	}
	return k == len(st.sig)
}

// signature lists what a Maglev table depends on: the eligible upstreams
// of the tier in use and their weights.
func signature(ups []Upstream) []int {
	backup, ok := tier(ups, nil)
	if !ok {
		return []int{}
	}
	sig := make([]int, 0, 2*len(ups))
	for i := range ups {
		if eligible(ups, i, nil, backup) {
			sig = append(sig, i, ups[i].Weight)
		}
	}
	return sig
}
