package health

import (
	"errors"
	"fmt"
	"net/netip"
	"sync"
	"sync/atomic"
	"time"

	"go.uber.org/zap"

	"github.com/lbctl/lbctl/pkg/config"
)

// WeightScale is the unit of Tracker.Weight: an upstream at full weight w
// has effective weight w*WeightScale, so slow start can ramp even a weight-1
// upstream in small steps while weights stay integers.
const WeightScale = 100

// rampSteps is how many weight changes a slow start publishes.
const rampSteps = 10

// State is an upstream's health as the Tracker sees it.
type State uint8

const (
	// StateUp: eligible. Active checks (if any) passed rise times in a row,
	// or it has not failed fall times yet; passive accounting has not
	// counted max_fails failures within fail_timeout.
	StateUp State = iota
	// StateDown: not chosen (unless every upstream is down and on_all_down
	// is try). Active checks failed fall times in a row, or the passive
	// accounting took it out for fail_timeout.
	StateDown
	// StateProbation: a passive fail_timeout has run out; the upstream is
	// chosen again, its next reported result decides (one failure sends it
	// back down for fail_timeout, one success brings it up with slow start).
	StateProbation
	// StateDisabled: `down: true` in the config; never checked, never chosen.
	StateDisabled
)

func (s State) String() string {
	switch s {
	case StateUp:
		return "up"
	case StateDown:
		return "down"
	case StateProbation:
		return "probation"
	case StateDisabled:
		return "disabled"
	}
	return fmt.Sprintf("state(%d)", uint8(s))
}

// MarshalText makes a State print as its name in JSON.
func (s State) MarshalText() ([]byte, error) { return []byte(s.String()), nil }

// Eligible reports whether an upstream in state s may be chosen while some
// upstream of its service is up.
func (s State) Eligible() bool { return s == StateUp || s == StateProbation }

// Change is one transition of one upstream, as Subscribe delivers it.
type Change struct {
	Service string
	Index   int // position in the service's upstream list
	Addr    netip.AddrPort
	From    State
	To      State // equal to From for a weight-only change (slow start step)
	// Weight is the effective weight after the change (WeightScale units;
	// 0 when not eligible).
	Weight int
	// Eligible is what Tracker.Eligible returns after the change; it
	// differs from To.Eligible() while every upstream is down.
	Eligible bool
	// AllDown is true while every (not disabled) upstream is down.
	AllDown bool
	Reason  string // what caused it: "3 active checks failed: ...", "slow start", ...
	At      time.Time
}

// Result is the outcome of one active check.
type Result struct {
	At      time.Time     // when the check started
	Latency time.Duration // how long it took
	Err     error         // nil = passed
}

// Status is one upstream's entry of a Snapshot (lbctl status, metrics).
type Status struct {
	Index    int            `json:"index"`
	Addr     netip.AddrPort `json:"address"`
	Backup   bool           `json:"backup,omitempty"`
	State    State          `json:"state"`
	Since    time.Time      `json:"since"`
	Eligible bool           `json:"eligible"`
	Weight   int            `json:"weight"` // WeightScale units
	// Last active check; zero At = never checked.
	LastCheck   time.Time     `json:"last_check,omitzero"`
	LastOK      bool          `json:"last_ok"`
	LastError   string        `json:"last_error,omitempty"`
	LastLatency time.Duration `json:"last_latency"`
	// Passive failures counted in the current fail_timeout window.
	Fails int `json:"fails"`
}

// Options configure a Tracker.
type Options struct {
	Log *zap.Logger
	// Clock defaults to the wall clock.
	Clock Clock
	// Previous, if set, is the tracker this one replaces (SIGHUP): an
	// upstream with the same address keeps its state, counters and since,
	// unless it changed to or from `down: true` or the check config changed.
	Previous *Tracker
}

// passive is the nginx max_fails/fail_timeout state of an upstream.
type passive uint8

const (
	passiveOK passive = iota
	passiveDown
	passiveProbation
)

// upstream is the tracked state of one upstream.
type upstream struct {
	cfg      config.Upstream
	activeUp bool // false after fall failed checks, until rise passed ones
	okRun    int  // consecutive passed checks
	failRun  int  // consecutive failed checks

	passive     passive
	fails       int       // passive failures in the window
	windowStart time.Time // first failure of the window
	timer       Timer     // passive down -> probation

	state     State
	since     time.Time
	rampStart time.Time // slow start began; zero = full weight
	rampTimer Timer

	last Result
}

// Tracker holds the health of one service's upstreams: the active checks'
// rise/fall counters, nginx's passive max_fails/fail_timeout accounting,
// slow start and the all-down rule. It is safe for concurrent use.
type Tracker struct {
	svc   string
	log   *zap.Logger
	clock Clock

	health    *config.Health // nil = no active check
	probe     probe          // nil when health is nil
	maxFails  int
	failTime  time.Duration
	slowStart time.Duration
	reject    bool // on_all_down: reject

	mu      sync.Mutex
	ups     []*upstream
	allDown bool
	closed  bool
	queue   []Change
	subs    map[int]func(Change)
	nextSub int

	deliverMu sync.Mutex // serialises delivery so changes arrive in order

	view atomic.Pointer[view] // lock-free read path
}

// NewTracker builds the tracker of svc. Every upstream starts up (as in
// HAProxy: traffic flows at once, a dead upstream is found by its first
// fall checks) except those marked `down: true`, and those that keep their
// state from opts.Previous.
func NewTracker(svc config.Service, opts Options) (*Tracker, error) {
	if opts.Log == nil {
		opts.Log = zap.NewNop()
	}
	if opts.Clock == nil {
		opts.Clock = realClock{}
	}
	t := &Tracker{
		svc:       svc.Name,
		log:       opts.Log.With(zap.String("service", svc.Name)),
		clock:     opts.Clock,
		health:    svc.Health,
		maxFails:  svc.Passive.MaxFails,
		failTime:  svc.Passive.FailTimeout,
		slowStart: svc.Passive.SlowStart,
		reject:    svc.OnAllDown == "reject",
		subs:      map[int]func(Change){},
	}
	if svc.Health != nil {
		p, err := newProbe(svc.Health)
		if err != nil {
			return nil, fmt.Errorf("health check of service %s: %w", svc.Name, err)
		}
		t.probe = p
	}
	if len(svc.Upstreams) == 0 {
		return nil, errors.New("track health: service " + svc.Name + " has no upstreams: list at least one under upstreams")
	}
	now := t.clock.Now()
	var prev map[netip.AddrPort]*upstream
	if p := opts.Previous; p != nil && sameCheck(p.health, svc.Health) && p.maxFails == t.maxFails && p.failTime == t.failTime {
		p.mu.Lock()
		prev = make(map[netip.AddrPort]*upstream, len(p.ups))
		for _, u := range p.ups {
			prev[u.cfg.Addr] = u
		}
		p.mu.Unlock()
	}
	for _, c := range svc.Upstreams {
		u := &upstream{cfg: c, activeUp: true, since: now}
		if old, ok := prev[c.Addr]; ok && old.cfg.Down == c.Down {
			opts.Previous.mu.Lock()
			u.activeUp, u.okRun, u.failRun = old.activeUp, old.okRun, old.failRun
			u.passive, u.fails, u.windowStart = old.passive, old.fails, old.windowStart
			u.since, u.rampStart, u.last = old.since, old.rampStart, old.last
			opts.Previous.mu.Unlock()
		}
		u.state = t.stateOf(u)
		t.ups = append(t.ups, u)
	}
	t.allDown = t.computeAllDown()
	t.mu.Lock()
	t.publish()
	for _, u := range t.ups {
		if u.passive == passiveDown {
			// The old tracker's timer dies with it: ours ends the rest of
			// the down period (windowStart is when it went down).
			t.armProbation(u, max(u.windowStart.Add(t.failTime).Sub(now), 0))
		}
		if !u.rampStart.IsZero() {
			t.armRamp(u)
		}
	}
	t.mu.Unlock()
	return t, nil
}

// sameCheck reports whether two active check configs probe the same way.
func sameCheck(a, b *config.Health) bool {
	if a == nil || b == nil {
		return a == b
	}
	return *a == *b
}

// Service is the name of the tracked service.
func (t *Tracker) Service() string { return t.svc }

// Len is the number of upstreams.
func (t *Tracker) Len() int { return len(t.ups) }

// Addr is upstream i's address.
func (t *Tracker) Addr(i int) netip.AddrPort { return t.ups[i].cfg.Addr }

// Up reports whether upstream i is healthy (state up or probation). It
// ignores the all-down rule; balancers use Eligible (or ForBalancer).
func (t *Tracker) Up(i int) bool { return t.view.Load().ups[i].state.Eligible() }

// State is upstream i's state.
func (t *Tracker) State(i int) State { return t.view.Load().ups[i].state }

// Eligible reports whether a balancer may choose upstream i now: it is up
// (or on probation), or every upstream of the service is down and
// on_all_down is try (nginx's behaviour: try them all anyway). An upstream
// marked `down: true` is never eligible. Backups are the balancer's
// business: Eligible says nothing about primary versus backup. It takes no
// lock: the front end may call it at every pick.
func (t *Tracker) Eligible(i int) bool { return t.view.Load().ups[i].eligible }

func (t *Tracker) eligible(u *upstream) bool {
	switch {
	case u.state == StateDisabled:
		return false
	case u.state.Eligible():
		return true
	default:
		return t.allDown && !t.reject
	}
}

// AllDown reports whether every upstream not marked `down: true` is down.
func (t *Tracker) AllDown() bool { return t.view.Load().allDown }

// Weight is upstream i's effective weight in WeightScale units: 0 when not
// eligible, the configured weight × WeightScale when up, and during slow
// start a share of it that grows linearly from 1 over passive.slow_start.
// It takes no lock.
func (t *Tracker) Weight(i int) int {
	v := &t.view.Load().ups[i]
	if v.rampStart.IsZero() {
		return v.weight
	}
	return ramp(v.weight, t.clock.Now().Sub(v.rampStart), t.slowStart)
}

func (t *Tracker) weight(u *upstream, now time.Time) int {
	if !t.eligible(u) {
		return 0
	}
	full := u.cfg.Weight * WeightScale
	if u.rampStart.IsZero() || t.slowStart <= 0 || t.allDown {
		return full
	}
	return ramp(full, now.Sub(u.rampStart), t.slowStart)
}

// ramp is full weight scaled by elapsed/slowStart, at least 1.
func ramp(full int, elapsed, slowStart time.Duration) int {
	if elapsed >= slowStart {
		return full
	}
	return max(1, int(int64(full)*int64(max(elapsed, 0))/int64(slowStart)))
}

// view is what the lock-free readers see; rebuilt under mu on every change.
type view struct {
	allDown bool
	ups     []viewEntry
}

type viewEntry struct {
	state     State
	eligible  bool
	weight    int       // full effective weight, 0 when not eligible
	rampStart time.Time // zero = no ramp
	probation bool      // passive probation: a success ends it
}

// publish rebuilds the readers' view. t.mu is held.
func (t *Tracker) publish() {
	v := &view{allDown: t.allDown, ups: make([]viewEntry, len(t.ups))}
	for i, u := range t.ups {
		e := viewEntry{state: u.state, eligible: t.eligible(u), probation: u.passive == passiveProbation}
		if e.eligible {
			e.weight = u.cfg.Weight * WeightScale
			if !u.rampStart.IsZero() && t.slowStart > 0 && !t.allDown {
				e.rampStart = u.rampStart
			}
		}
		v.ups[i] = e
	}
	t.view.Store(v)
}

// ForBalancer returns t as the front end's health source: Up means
// "may be chosen" (Eligible, all-down rule included), Weight is the
// effective weight, and reports go to the passive accounting. It satisfies
// pkg/proxy's Health interface.
func (t *Tracker) ForBalancer() Balancing { return Balancing{t} }

// Balancing is a Tracker seen by a balancer; see ForBalancer.
type Balancing struct{ t *Tracker }

func (b Balancing) Up(i int) bool       { return b.t.Eligible(i) }
func (b Balancing) Weight(i int) int    { return b.t.Weight(i) }
func (b Balancing) ReportFailure(i int) { b.t.ReportFailure(i) }
func (b Balancing) ReportSuccess(i int) { b.t.ReportSuccess(i) }

// Subscribe calls fn with every change from now on, in order, and returns a
// function that cancels the subscription. fn runs on the goroutine that
// caused the change; it must return quickly and must not call
// ReportFailure or ReportSuccess (it may read: Up, Eligible, Weight,
// Snapshot).
func (t *Tracker) Subscribe(fn func(Change)) (cancel func()) {
	t.mu.Lock()
	id := t.nextSub
	t.nextSub++
	t.subs[id] = fn
	t.mu.Unlock()
	return func() {
		t.mu.Lock()
		delete(t.subs, id)
		t.mu.Unlock()
	}
}

// Snapshot returns every upstream's status.
func (t *Tracker) Snapshot() []Status {
	t.mu.Lock()
	defer t.mu.Unlock()
	now := t.clock.Now()
	out := make([]Status, len(t.ups))
	for i, u := range t.ups {
		s := Status{
			Index: i, Addr: u.cfg.Addr, Backup: u.cfg.Backup, State: u.state, Since: u.since,
			Eligible: t.eligible(u), Weight: t.weight(u, now),
			LastCheck: u.last.At, LastOK: !u.last.At.IsZero() && u.last.Err == nil,
			LastLatency: u.last.Latency, Fails: u.fails,
		}
		if u.last.Err != nil {
			s.LastError = u.last.Err.Error()
		}
		out[i] = s
	}
	return out
}

// ReportFailure records a passive failure of upstream i: a connect that
// failed or a UDP session that got no reply. max_fails failures within
// fail_timeout take it down for fail_timeout; on probation one failure does.
// With max_fails 0 it does nothing.
func (t *Tracker) ReportFailure(i int) {
	if t.maxFails <= 0 {
		return
	}
	t.mu.Lock()
	u := t.ups[i]
	if t.closed || u.state == StateDisabled || u.passive == passiveDown {
		t.mu.Unlock()
		return
	}
	now := t.clock.Now()
	reason := ""
	switch {
	case u.passive == passiveProbation:
		reason = "failed on probation"
	default:
		if u.fails == 0 || now.Sub(u.windowStart) > t.failTime {
			u.fails, u.windowStart = 0, now
		}
		u.fails++
		if u.fails >= t.maxFails {
			reason = fmt.Sprintf("%d passive failures within fail_timeout %s", u.fails, t.failTime)
		}
	}
	if reason != "" {
		u.passive, u.fails, u.windowStart = passiveDown, 0, now
		t.armProbation(u, t.failTime)
		t.update(u, now, reason)
	}
	t.mu.Unlock()
	t.deliver()
}

// ReportSuccess records a passive success of upstream i (a connect, a
// reply). It ends probation: the upstream is up again, with slow start.
func (t *Tracker) ReportSuccess(i int) {
	if t.maxFails <= 0 || !t.view.Load().ups[i].probation {
		return // the common case, without a lock
	}
	t.mu.Lock()
	u := t.ups[i]
	if t.closed || u.passive != passiveProbation {
		t.mu.Unlock()
		return
	}
	u.passive, u.fails = passiveOK, 0
	t.update(u, t.clock.Now(), "succeeded on probation")
	t.mu.Unlock()
	t.deliver()
}

// observe records the result of an active check of upstream i.
func (t *Tracker) observe(i int, r Result) {
	t.mu.Lock()
	u := t.ups[i]
	if t.closed || u.state == StateDisabled {
		t.mu.Unlock()
		return
	}
	u.last = r
	reason := ""
	if r.Err == nil {
		u.okRun, u.failRun = u.okRun+1, 0
		if !u.activeUp && u.okRun >= t.health.Rise {
			u.activeUp = true
			reason = fmt.Sprintf("%d %s checks passed", u.okRun, t.health.Type)
		}
	} else {
		u.okRun, u.failRun = 0, u.failRun+1
		if u.activeUp && u.failRun >= t.health.Fall {
			u.activeUp = false
			reason = fmt.Sprintf("%d %s checks failed, last: %v", u.failRun, t.health.Type, r.Err)
		}
	}
	if reason != "" {
		t.update(u, t.clock.Now(), reason)
	}
	t.mu.Unlock()
	t.deliver()
}

// armProbation schedules the end of a passive down period. t.mu is held
// (or t is not shared yet).
func (t *Tracker) armProbation(u *upstream, d time.Duration) {
	if u.timer != nil {
		u.timer.Stop()
	}
	u.timer = t.clock.AfterFunc(d, func() {
		t.mu.Lock()
		if t.closed || u.passive != passiveDown {
			t.mu.Unlock()
			return
		}
		u.passive = passiveProbation
		t.update(u, t.clock.Now(), fmt.Sprintf("fail_timeout %s over", t.failTime))
		t.mu.Unlock()
		t.deliver()
	})
}

// armRamp publishes slow-start weight steps of u. t.mu is held.
func (t *Tracker) armRamp(u *upstream) {
	if u.rampTimer != nil {
		u.rampTimer.Stop()
	}
	step := t.slowStart / rampSteps
	if step <= 0 {
		u.rampStart = time.Time{}
		return
	}
	u.rampTimer = t.clock.AfterFunc(step, func() {
		t.mu.Lock()
		if t.closed || u.rampStart.IsZero() {
			t.mu.Unlock()
			return
		}
		now := t.clock.Now()
		if now.Sub(u.rampStart) >= t.slowStart {
			u.rampStart = time.Time{}
		} else {
			t.armRamp(u)
		}
		t.enqueue(u, u.state, now, "slow start")
		t.mu.Unlock()
		t.deliver()
	})
}

// stateOf derives u's state from its active and passive parts.
func (t *Tracker) stateOf(u *upstream) State {
	switch {
	case u.cfg.Down:
		return StateDisabled
	case !u.activeUp || u.passive == passiveDown:
		return StateDown
	case u.passive == passiveProbation:
		return StateProbation
	}
	return StateUp
}

func (t *Tracker) computeAllDown() bool {
	for _, u := range t.ups {
		if u.state.Eligible() {
			return false
		}
	}
	return true
}

// update recomputes u's state after one of its parts changed, logs and
// queues the transition, and handles slow start and the all-down rule.
// t.mu is held.
func (t *Tracker) update(u *upstream, now time.Time, reason string) {
	from, to := u.state, t.stateOf(u)
	if from == to {
		t.publish() // a part changed (passive probation) without the state
		return
	}
	u.state, u.since = to, now
	if to == StateUp && from == StateDown || to == StateUp && from == StateProbation {
		if t.slowStart > 0 {
			u.rampStart = now
			t.armRamp(u)
		}
	} else if !to.Eligible() {
		u.rampStart = time.Time{}
		if u.rampTimer != nil {
			u.rampTimer.Stop()
		}
	}
	f := []zap.Field{
		zap.Stringer("upstream", u.cfg.Addr), zap.Stringer("from", from), zap.Stringer("to", to),
		zap.String("reason", reason),
	}
	if to == StateDown {
		t.log.Warn("upstream down", f...)
	} else {
		t.log.Info("upstream "+to.String(), f...)
	}
	wasAll := t.allDown
	t.allDown = t.computeAllDown()
	switch {
	case t.allDown && !wasAll && t.reject:
		t.log.Error("every upstream is down: rejecting new connections and datagrams (on_all_down: reject) until one comes back")
	case t.allDown && !wasAll:
		t.log.Error("every upstream is down: trying them anyway, as nginx does (set on_all_down: reject to refuse instead)")
	case wasAll && !t.allDown:
		t.log.Info("an upstream is back: no longer all down", zap.Stringer("upstream", u.cfg.Addr))
	}
	t.enqueue(u, from, now, reason)
	if wasAll != t.allDown {
		// Every other upstream's eligibility flipped with the all-down rule.
		for _, o := range t.ups {
			if o != u && o.state != StateDisabled {
				t.enqueue(o, o.state, now, "all down")
			}
		}
	}
}

// enqueue queues the change of u from state from. t.mu is held.
func (t *Tracker) enqueue(u *upstream, from State, now time.Time, reason string) {
	idx := 0
	for i, o := range t.ups {
		if o == u {
			idx = i
		}
	}
	t.publish()
	t.queue = append(t.queue, Change{
		Service: t.svc, Index: idx, Addr: u.cfg.Addr, From: from, To: u.state,
		Weight: t.weight(u, now), Eligible: t.eligible(u), AllDown: t.allDown,
		Reason: reason, At: now,
	})
}

// deliver hands queued changes to the subscribers, in order.
func (t *Tracker) deliver() {
	t.deliverMu.Lock()
	defer t.deliverMu.Unlock()
	for {
		t.mu.Lock()
		q := t.queue
		t.queue = nil
		subs := make([]func(Change), 0, len(t.subs))
		for id := 0; id < t.nextSub; id++ {
			if fn, ok := t.subs[id]; ok {
				subs = append(subs, fn)
			}
		}
		t.mu.Unlock()
		if len(q) == 0 {
			return
		}
		for _, c := range q {
			for _, fn := range subs {
				fn(c)
			}
		}
	}
}

// Close stops the tracker's timers; it reports nothing afterwards.
func (t *Tracker) Close() {
	t.mu.Lock()
	defer t.mu.Unlock()
	t.closed = true
	for _, u := range t.ups {
		if u.timer != nil {
			u.timer.Stop()
		}
		if u.rampTimer != nil {
			u.rampTimer.Stop()
		}
	}
}
