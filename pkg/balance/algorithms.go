package balance

import (
	"math/rand/v2"
	"sync"
)

// SmoothWeighted is nginx's smooth weighted round robin
// (ngx_http_upstream_get_peer): every pick adds each eligible upstream's
// weight to its current value, takes the largest and subtracts the total
// from it. Weights 5,1,1 give a a b a c a a: the heavy upstream is spread
// out, not picked five times in a row.
type SmoothWeighted struct {
	mu      sync.Mutex
	current []int
}

// Pick implements Balancer.
func (s *SmoothWeighted) Pick(ups []Upstream, _ uint64, skip Skip) int {
	backup, ok := tier(ups, skip)
	if !ok {
		return -1
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	if len(s.current) != len(ups) {
		s.current = make([]int, len(ups))
	}
	best, total := -1, 0
	for i := range ups {
		if !eligible(ups, i, skip, backup) {
			continue
		}
		w := ups[i].Weight
		s.current[i] += w
		total += w
		if best < 0 || s.current[i] > s.current[best] {
			best = i
		}
	}
	s.current[best] -= total
	return best
}

// LeastConnections picks the upstream with the fewest active connections
// relative to its weight (Active/Weight, compared without division as nginx
// does). Ties go round robin, so equal upstreams share new connections.
type LeastConnections struct {
	mu   sync.Mutex
	next int
}

// Pick implements Balancer.
func (l *LeastConnections) Pick(ups []Upstream, _ uint64, skip Skip) int {
	backup, ok := tier(ups, skip)
	if !ok {
		return -1
	}
	l.mu.Lock()
	start := l.next
	l.next++
	l.mu.Unlock()
	n := len(ups)
	best := -1
	for k := range n {
		i := (start + k) % n
		if !eligible(ups, i, skip, backup) {
			continue
		}
		if best < 0 || fewer(&ups[i], &ups[best]) {
			best = i
		}
	}
	return best
}

// fewer reports whether a has fewer connections per weight than b.
func fewer(a, b *Upstream) bool {
	return a.Active*int64(b.Weight) < b.Active*int64(a.Weight)
}

// TwoChoices draws two distinct eligible upstreams at random, each with a
// probability proportional to its weight, and picks the one with fewer
// connections per weight (nginx's `random two least_conn`; "the power of
// two choices").
type TwoChoices struct {
	mu  sync.Mutex
	rng *rand.Rand
}

// NewRandomTwo returns a TwoChoices; a seed of 0 seeds from the runtime.
func NewRandomTwo(seed uint64) *TwoChoices {
	if seed == 0 {
		seed = rand.Uint64()
	}
	return &TwoChoices{rng: rand.New(rand.NewPCG(seed, seed^0x9e3779b97f4a7c15))}
}

// Pick implements Balancer.
func (r *TwoChoices) Pick(ups []Upstream, _ uint64, skip Skip) int {
	backup, ok := tier(ups, skip)
	if !ok {
		return -1
	}
	total := 0
	for i := range ups {
		if eligible(ups, i, skip, backup) {
			total += ups[i].Weight
		}
	}
	r.mu.Lock()
	a := r.draw(ups, skip, backup, total, -1)
	b := -1
	if total > ups[a].Weight {
		b = r.draw(ups, skip, backup, total-ups[a].Weight, a)
	}
	r.mu.Unlock()
	if b >= 0 && fewer(&ups[b], &ups[a]) {
		return b
	}
	return a
}

// draw picks an eligible upstream other than not, weighted; total is the
// sum of the weights it draws from.
func (r *TwoChoices) draw(ups []Upstream, skip Skip, backup bool, total, not int) int {
	x := r.rng.IntN(total)
	last := -1
	for i := range ups {
		if i == not || !eligible(ups, i, skip, backup) {
			continue
		}
		if x < ups[i].Weight {
			return i
		}
		x -= ups[i].Weight
		last = i
	}
	return last // not reached while total is the eligible weights' sum
}
