package proxy

import (
	"fmt"
	"net/netip"
	"sync"
	"sync/atomic"

	"github.com/lbctl/lbctl/pkg/balance"
)

// Upstream is one configured server of a service.
type Upstream struct {
	Addr   netip.AddrPort
	Weight int  // configured weight, >= 1
	Backup bool // used only when every primary is down or tried
	Down   bool // config `down: true`: never picked
}

// Health is where a Pool learns which upstreams are up and what weight they
// carry now, and where it reports the passive signals the proxy sees. The
// default (static) keeps the config's `down:` flags and weights and only
// counts reports; pkg/health's tracker replaces it (SetHealth) with active
// checks, max_fails/fail_timeout and slow start. Index i is the upstream's
// position in the service's upstream list.
type Health interface {
	Up(i int) bool
	Weight(i int) int // effective weight; 0 takes it out of rotation
	ReportFailure(i int)
	ReportSuccess(i int)
}

// Pool is the upstream state of one service: the upstreams, their health
// source, the balancer and the per-upstream counters. The front ends pick
// through it and report to it. A reload makes a new Pool; connections that
// started on the old one finish there.
type Pool struct {
	ups      []Upstream
	bal      balance.Balancer
	health   atomic.Pointer[healthBox]
	hashPort bool
	counts   []counters
}

type healthBox struct{ Health }

type counters struct {
	active    atomic.Int64
	total     atomic.Uint64 // connections/sessions handed to it
	failures  atomic.Uint64
	successes atomic.Uint64
}

// NewPool makes the pool of a service. algorithm is a balance name;
// hashPort keys the hash algorithm on the client's address:port instead of
// its address (DSR). The health source starts static (see Health).
func NewPool(ups []Upstream, algorithm string, hashPort bool) (*Pool, error) {
	if len(ups) == 0 {
		return nil, fmt.Errorf("new pool: no upstreams")
	}
	bal, err := balance.New(algorithm)
	if err != nil {
		return nil, fmt.Errorf("new pool: %w", err)
	}
	p := &Pool{ups: append([]Upstream(nil), ups...), bal: bal, hashPort: hashPort, counts: make([]counters, len(ups))}
	p.health.Store(&healthBox{staticHealth(p.ups)})
	return p, nil
}

// SetHealth replaces the health source (pkg/health's tracker).
func (p *Pool) SetHealth(h Health) { p.health.Store(&healthBox{h}) }

// Upstreams returns the configured upstreams (do not modify).
func (p *Pool) Upstreams() []Upstream { return p.ups }

// Addr returns upstream i's address.
func (p *Pool) Addr(i int) netip.AddrPort { return p.ups[i].Addr }

// Tried records the upstreams one connection has already tried.
type Tried struct {
	low  uint64
	high map[int]bool
	n    int
}

// Add marks upstream i tried.
func (t *Tried) Add(i int) {
	t.n++
	if i < 64 {
		t.low |= 1 << i
		return
	}
	if t.high == nil {
		t.high = map[int]bool{}
	}
	t.high[i] = true
}

// Has reports whether upstream i was tried.
func (t *Tried) Has(i int) bool {
	if i < 64 {
		return t.low&(1<<i) != 0
	}
	return t.high[i]
}

// Len is the number of tries so far.
func (t *Tried) Len() int { return t.n }

// Pick chooses an upstream for client, leaving out those in tried; -1 when
// none is left.
func (p *Pool) Pick(client netip.AddrPort, tried *Tried) int {
	h := p.health.Load().Health
	// The view goes to the balancer through an interface, so a local array
	// would escape to the heap: one allocation per datagram (DSR) or
	// connection. A pooled slice costs none.
	vp := views.Get().(*[]balance.Upstream)
	view := (*vp)[:0]
	for i := range p.ups {
		u := &p.ups[i]
		view = append(view, balance.Upstream{
			Addr: u.Addr, Backup: u.Backup, Weight: h.Weight(i), Down: !h.Up(i),
			Active: p.counts[i].active.Load(),
		})
	}
	var key uint64
	if _, ok := p.bal.(*balance.MaglevHash); ok {
		key = balance.Key(client, p.hashPort)
	}
	var skip balance.Skip
	if tried != nil && tried.n > 0 {
		skip = tried.Has
	}
	i := p.bal.Pick(view, key, skip)
	*vp = view[:0] // keeps a capacity grown past 16 upstreams
	views.Put(vp)
	return i
}

// views holds the scratch slices Pick hands to the balancer (which keeps
// no reference to them).
var views = sync.Pool{New: func() any { v := make([]balance.Upstream, 0, 16); return &v }}

// Tries is the number of upstreams one connection may try: n (the
// service's next_upstream_tries) or, when n is 0, every upstream once.
func (p *Pool) Tries(n int) int {
	if n <= 0 || n > len(p.ups) {
		return len(p.ups)
	}
	return n
}

// Acquire counts a new connection/session on upstream i; Release ends it.
func (p *Pool) Acquire(i int) {
	p.counts[i].active.Add(1)
	p.counts[i].total.Add(1)
}

// Release ends a connection/session counted by Acquire.
func (p *Pool) Release(i int) { p.counts[i].active.Add(-1) }

// ReportFailure records a failed connect or an unanswered UDP session.
func (p *Pool) ReportFailure(i int) {
	p.counts[i].failures.Add(1)
	p.health.Load().ReportFailure(i)
}

// ReportSuccess records a connect or a UDP reply.
func (p *Pool) ReportSuccess(i int) {
	p.counts[i].successes.Add(1)
	p.health.Load().ReportSuccess(i)
}

// UpstreamStatus is one upstream in a Status snapshot.
type UpstreamStatus struct {
	Addr      netip.AddrPort `json:"address"`
	Weight    int            `json:"weight"` // effective
	Backup    bool           `json:"backup,omitempty"`
	Up        bool           `json:"up"`
	Active    int64          `json:"active"`
	Total     uint64         `json:"total"`
	Failures  uint64         `json:"failures"`
	Successes uint64         `json:"successes"`
}

// Snapshot returns the state of every upstream.
func (p *Pool) Snapshot() []UpstreamStatus {
	h := p.health.Load().Health
	out := make([]UpstreamStatus, len(p.ups))
	for i, u := range p.ups {
		c := &p.counts[i]
		out[i] = UpstreamStatus{
			Addr: u.Addr, Weight: h.Weight(i), Backup: u.Backup, Up: h.Up(i),
			Active: c.active.Load(), Total: c.total.Load(), Failures: c.failures.Load(), Successes: c.successes.Load(),
		}
	}
	return out
}

// staticHealth is the health source before pkg/health: the config's flags.
type staticHealth []Upstream

func (s staticHealth) Up(i int) bool     { return !s[i].Down }
func (s staticHealth) Weight(i int) int  { return s[i].Weight }
func (s staticHealth) ReportFailure(int) {}
func (s staticHealth) ReportSuccess(int) {}
