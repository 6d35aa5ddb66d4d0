package health

import (
	"errors"
	"net/netip"
	"sort"
	"sync"
	"testing"
	"time"

	"go.uber.org/zap"
	"go.uber.org/zap/zapcore"
	"go.uber.org/zap/zaptest/observer"

	"github.com/lbctl/lbctl/pkg/config"
)

// fakeClock runs AfterFunc callbacks from Advance, in due order.
type fakeClock struct {
	mu     sync.Mutex
	now    time.Time
	timers []*fakeTimer
}

type fakeTimer struct {
	c    *fakeClock
	due  time.Time
	f    func()
	done bool
}

func newFakeClock() *fakeClock {
	return &fakeClock{now: time.Date(2026, 1, 1, 0, 0, 0, 0, time.UTC)}
}

func (c *fakeClock) Now() time.Time {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.now
}

func (c *fakeClock) AfterFunc(d time.Duration, f func()) Timer {
	c.mu.Lock()
	defer c.mu.Unlock()
	t := &fakeTimer{c: c, due: c.now.Add(d), f: f}
	c.timers = append(c.timers, t)
	return t
}

func (t *fakeTimer) Stop() bool {
	t.c.mu.Lock()
	defer t.c.mu.Unlock()
	was := !t.done
	t.done = true
	return was
}

// Advance moves the clock by d, firing every timer due on the way at its
// due time.
func (c *fakeClock) Advance(d time.Duration) {
	c.mu.Lock()
	end := c.now.Add(d)
	c.mu.Unlock()
	for {
		c.mu.Lock()
		sort.SliceStable(c.timers, func(a, b int) bool { return c.timers[a].due.Before(c.timers[b].due) })
		var next *fakeTimer
		for _, t := range c.timers {
			if !t.done && !t.due.After(end) {
				next = t
				break
			}
		}
		if next == nil {
			c.now = end
			c.mu.Unlock()
			return
		}
		next.done = true
		if next.due.After(c.now) {
			c.now = next.due
		}
		c.mu.Unlock()
		next.f()
	}
}

// service is a test service of n upstreams.
func service(n int, h *config.Health, p config.Passive) config.Service {
	s := config.Service{Name: "svc", Protocol: config.UDP, Health: h, Passive: p, OnAllDown: "try"}
	for i := range n {
		s.Upstreams = append(s.Upstreams, config.Upstream{
			Addr:   netip.AddrPortFrom(netip.AddrFrom4([4]byte{198, 19, 16, byte(11 + i)}), 53),
			Weight: 1,
		})
	}
	return s
}

func tcpCheck(rise, fall int) *config.Health {
	return &config.Health{Type: "tcp", Interval: time.Second, Timeout: 500 * time.Millisecond, Rise: rise, Fall: fall}
}

// recorder collects the changes a tracker publishes.
type recorder struct {
	mu sync.Mutex
	cs []Change
}

func (r *recorder) add(c Change) {
	r.mu.Lock()
	r.cs = append(r.cs, c)
	r.mu.Unlock()
}

func (r *recorder) take() []Change {
	r.mu.Lock()
	defer r.mu.Unlock()
	cs := r.cs
	r.cs = nil
	return cs
}

type harness struct {
	t     *testing.T
	tr    *Tracker
	clock *fakeClock
	rec   *recorder
	logs  *observer.ObservedLogs
}

func newHarness(t *testing.T, svc config.Service) *harness {
	t.Helper()
	core, logs := observer.New(zapcore.DebugLevel)
	clock := newFakeClock()
	tr, err := NewTracker(svc, Options{Log: zap.New(core), Clock: clock})
	if err != nil {
		t.Fatalf("NewTracker: %v", err)
	}
	t.Cleanup(tr.Close)
	rec := &recorder{}
	tr.Subscribe(rec.add)
	return &harness{t: t, tr: tr, clock: clock, rec: rec, logs: logs}
}

var errCheck = errors.New("connect: connection refused")

func (h *harness) check(i int, ok bool) {
	r := Result{At: h.clock.Now(), Latency: time.Millisecond}
	if !ok {
		r.Err = errCheck
	}
	h.tr.observe(i, r)
}

func (h *harness) wantState(i int, want State) {
	h.t.Helper()
	if got := h.tr.State(i); got != want {
		h.t.Fatalf("upstream %d: state %s, want %s", i, got, want)
	}
}

// wantChanges checks the published transitions (weight-only changes are
// left out), as "index:from->to".
func (h *harness) wantChanges(want ...string) {
	h.t.Helper()
	var got []string
	for _, c := range h.rec.take() {
		if c.From != c.To {
			got = append(got, itoa(c.Index)+":"+c.From.String()+"->"+c.To.String())
		}
	}
	if len(got) != len(want) {
		h.t.Fatalf("changes %q, want %q", got, want)
	}
	for i := range got {
		if got[i] != want[i] {
			h.t.Fatalf("changes %q, want %q", got, want)
		}
	}
}

func itoa(i int) string { return string(rune('0' + i)) }

func TestActiveRiseFall(t *testing.T) {
	h := newHarness(t, service(2, tcpCheck(2, 3), config.Passive{}))
	h.wantState(0, StateUp)

	h.check(0, false)
	h.check(0, false)
	h.wantState(0, StateUp) // 2 of fall 3
	h.check(0, true)        // a pass resets the run
	h.check(0, false)
	h.check(0, false)
	h.wantState(0, StateUp)
	h.wantChanges()
	h.check(0, false)
	h.wantState(0, StateDown)
	h.wantChanges("0:up->down")
	if h.tr.Eligible(0) || h.tr.Weight(0) != 0 {
		t.Fatalf("down upstream eligible=%v weight=%d, want false 0", h.tr.Eligible(0), h.tr.Weight(0))
	}
	h.wantState(1, StateUp)

	h.check(0, true)
	h.wantState(0, StateDown) // 1 of rise 2
	h.check(0, false)
	h.check(0, true)
	h.wantState(0, StateDown) // the failure reset the run
	h.check(0, true)
	h.wantState(0, StateUp)
	h.wantChanges("0:down->up")
	if w := h.tr.Weight(0); w != WeightScale {
		t.Fatalf("weight after rise without slow start = %d, want %d", w, WeightScale)
	}

	snap := h.tr.Snapshot()
	if !snap[0].LastOK || snap[0].LastLatency != time.Millisecond || snap[0].LastCheck.IsZero() {
		t.Fatalf("snapshot last check = %+v, want ok with 1ms latency", snap[0])
	}
	h.check(0, false)
	if s := h.tr.Snapshot()[0]; s.LastOK || s.LastError != errCheck.Error() {
		t.Fatalf("snapshot after a failed check = %+v, want last error %q", s, errCheck)
	}
}

func TestOneLogLinePerTransition(t *testing.T) {
	h := newHarness(t, service(2, tcpCheck(1, 1), config.Passive{}))
	h.check(0, false) // up -> down
	h.check(0, false) // no transition
	h.check(0, true)  // down -> up
	h.check(0, true)  // no transition
	got := h.logs.FilterMessageSnippet("upstream ").All()
	if len(got) != 2 {
		t.Fatalf("%d transition log lines, want 2: %v", len(got), got)
	}
	if got[0].Level != zapcore.WarnLevel || got[0].Message != "upstream down" {
		t.Fatalf("first line %q at %s, want \"upstream down\" at warn", got[0].Message, got[0].Level)
	}
	f := got[0].ContextMap()
	if f["upstream"] != "198.19.16.11:53" || f["service"] != "svc" || f["reason"] == "" {
		t.Fatalf("down line fields %v, want upstream, service and reason", f)
	}
	if got[1].Message != "upstream up" {
		t.Fatalf("second line %q, want \"upstream up\"", got[1].Message)
	}
}

func TestPassiveMaxFailsWithinFailTimeout(t *testing.T) {
	h := newHarness(t, service(2, nil, config.Passive{MaxFails: 3, FailTimeout: 10 * time.Second}))

	// Two failures, then the window runs out: the count starts over.
	h.tr.ReportFailure(0)
	h.clock.Advance(4 * time.Second)
	h.tr.ReportFailure(0)
	h.clock.Advance(7 * time.Second) // 11s after the first failure
	h.tr.ReportFailure(0)
	h.tr.ReportFailure(0)
	h.wantState(0, StateUp)
	if f := h.tr.Snapshot()[0].Fails; f != 2 {
		t.Fatalf("fails in window = %d, want 2", f)
	}
	// Successes do not reset the window (nginx): the third failure within
	// fail_timeout takes it down.
	h.tr.ReportSuccess(0)
	h.clock.Advance(time.Second)
	h.tr.ReportFailure(0)
	h.wantState(0, StateDown)
	h.wantChanges("0:up->down")

	// Down for fail_timeout, then on probation.
	h.clock.Advance(10*time.Second - time.Millisecond)
	h.wantState(0, StateDown)
	h.clock.Advance(time.Millisecond)
	h.wantState(0, StateProbation)
	h.wantChanges("0:down->probation")
	if !h.tr.Eligible(0) {
		t.Fatal("an upstream on probation is not eligible")
	}

	// One failure on probation: down again at once, for fail_timeout.
	h.tr.ReportFailure(0)
	h.wantState(0, StateDown)
	h.clock.Advance(10 * time.Second)
	h.wantState(0, StateProbation)
	// One success on probation: up.
	h.tr.ReportSuccess(0)
	h.wantState(0, StateUp)
	h.wantChanges("0:probation->down", "0:down->probation", "0:probation->up")
	h.wantState(1, StateUp)
}

func TestPassiveOffWithMaxFailsZero(t *testing.T) {
	h := newHarness(t, service(1, tcpCheck(1, 1), config.Passive{MaxFails: 0, FailTimeout: 10 * time.Second}))
	for range 10 {
		h.tr.ReportFailure(0)
	}
	h.wantState(0, StateUp)
	h.wantChanges()
}

func TestPassiveAndActiveCombine(t *testing.T) {
	h := newHarness(t, service(2, tcpCheck(1, 1), config.Passive{MaxFails: 1, FailTimeout: 10 * time.Second}))
	h.tr.ReportFailure(0)
	h.wantState(0, StateDown)
	h.check(0, true) // active pass does not cut the passive down period short
	h.wantState(0, StateDown)
	h.check(0, false) // active down meanwhile
	h.clock.Advance(10 * time.Second)
	h.wantState(0, StateDown) // passive over, active still down
	h.check(0, true)
	h.wantState(0, StateProbation)
	h.tr.ReportSuccess(0)
	h.wantState(0, StateUp)
}

func TestSlowStart(t *testing.T) {
	svc := service(2, tcpCheck(1, 1), config.Passive{SlowStart: 10 * time.Second})
	svc.Upstreams[0].Weight = 3
	h := newHarness(t, svc)
	if w := h.tr.Weight(0); w != 3*WeightScale {
		t.Fatalf("weight at start = %d, want %d (no ramp for upstreams up from the start)", w, 3*WeightScale)
	}
	h.check(0, false)
	h.check(0, true)
	h.wantState(0, StateUp)
	h.rec.take()

	var ws []int
	for range 12 {
		ws = append(ws, h.tr.Weight(0))
		h.clock.Advance(time.Second)
	}
	want := []int{1, 30, 60, 90, 120, 150, 180, 210, 240, 270, 300, 300}
	for i := range want {
		if ws[i] != want[i] {
			t.Fatalf("weights each second after recovery = %v, want %v", ws, want)
		}
	}
	// The ramp is published, so table builders (xdp) can follow it.
	var steps []int
	for _, c := range h.rec.take() {
		if c.Index == 0 && c.From == c.To {
			steps = append(steps, c.Weight)
		}
	}
	if len(steps) != rampSteps || steps[len(steps)-1] != 3*WeightScale {
		t.Fatalf("published ramp weights %v, want %d steps ending at %d", steps, rampSteps, 3*WeightScale)
	}
	for i := 1; i < len(steps); i++ {
		if steps[i] <= steps[i-1] {
			t.Fatalf("published ramp weights %v do not grow", steps)
		}
	}
	// A failure during the ramp stops it.
	h.check(0, false)
	h.check(0, true)
	h.clock.Advance(2 * time.Second)
	h.check(0, false)
	h.clock.Advance(20 * time.Second)
	if w := h.tr.Weight(0); w != 0 {
		t.Fatalf("weight of a down upstream = %d, want 0", w)
	}
}

func TestAllDownTry(t *testing.T) {
	svc := service(3, tcpCheck(1, 1), config.Passive{SlowStart: 10 * time.Second})
	svc.Upstreams[2].Down = true
	h := newHarness(t, svc)
	h.check(0, false)
	if h.tr.AllDown() {
		t.Fatal("all down with upstream 1 still up")
	}
	h.check(1, false)
	if !h.tr.AllDown() {
		t.Fatal("not all down with both checked upstreams down")
	}
	for i := range 2 {
		if !h.tr.Eligible(i) || h.tr.Weight(i) != WeightScale {
			t.Fatalf("all down, on_all_down try: upstream %d eligible=%v weight=%d, want true %d", i, h.tr.Eligible(i), h.tr.Weight(i), WeightScale)
		}
		if h.tr.Up(i) {
			t.Fatalf("Up(%d) = true while down", i)
		}
	}
	if h.tr.Eligible(2) {
		t.Fatal("an upstream marked down: true is eligible when all are down")
	}
	// The balancer's view: Up means "may be chosen".
	var b interface {
		Up(int) bool
		Weight(int) int
		ReportFailure(int)
		ReportSuccess(int)
	} = h.tr.ForBalancer()
	if !b.Up(0) || !b.Up(1) || b.Up(2) || b.Weight(0) != WeightScale {
		t.Fatalf("ForBalancer all down: up %v %v %v weight %d, want true true false %d", b.Up(0), b.Up(1), b.Up(2), b.Weight(0), WeightScale)
	}
	// Still all down: logged once.
	h.check(0, false)
	h.check(1, false)
	if n := h.logs.FilterMessageSnippet("every upstream is down").FilterLevelExact(zapcore.ErrorLevel).Len(); n != 1 {
		t.Fatalf("all-down logged %d times at error, want once", n)
	}
	var all []Change
	for _, c := range h.rec.take() {
		if c.AllDown {
			all = append(all, c)
		}
	}
	if len(all) == 0 || !all[len(all)-1].Eligible {
		t.Fatalf("all-down changes %+v: want them published with Eligible true", all)
	}
	// One comes back: the others are no longer eligible.
	h.check(1, true)
	if h.tr.AllDown() || h.tr.Eligible(0) || !h.tr.Eligible(1) {
		t.Fatalf("after recovery: allDown=%v eligible0=%v eligible1=%v, want false false true", h.tr.AllDown(), h.tr.Eligible(0), h.tr.Eligible(1))
	}
	// A second episode is logged again, once.
	h.check(1, false)
	if n := h.logs.FilterMessageSnippet("every upstream is down").Len(); n != 2 {
		t.Fatalf("all-down logged %d times over two episodes, want 2", n)
	}
}

func TestAllDownReject(t *testing.T) {
	svc := service(2, tcpCheck(1, 1), config.Passive{})
	svc.OnAllDown = "reject"
	h := newHarness(t, svc)
	h.check(0, false)
	h.check(1, false)
	for i := range 2 {
		if h.tr.Eligible(i) {
			t.Fatalf("on_all_down reject: upstream %d eligible while all are down", i)
		}
	}
	if l := h.logs.FilterMessageSnippet("on_all_down: reject").All(); len(l) != 1 || l[0].Level != zapcore.ErrorLevel {
		t.Fatalf("reject all-down log lines %v, want one at error", l)
	}
}

func TestDisabledNeverCheckedNorChosen(t *testing.T) {
	svc := service(2, tcpCheck(1, 1), config.Passive{MaxFails: 1, FailTimeout: time.Second})
	svc.Upstreams[1].Down = true
	h := newHarness(t, svc)
	h.wantState(1, StateDisabled)
	h.check(1, true)
	h.tr.ReportFailure(1)
	h.tr.ReportSuccess(1)
	h.wantState(1, StateDisabled)
	if h.tr.Eligible(1) || h.tr.Weight(1) != 0 || !h.tr.Snapshot()[1].LastCheck.IsZero() {
		t.Fatalf("disabled upstream: eligible=%v weight=%d snapshot=%+v", h.tr.Eligible(1), h.tr.Weight(1), h.tr.Snapshot()[1])
	}
	c := NewChecker(CheckerOptions{Workers: 1})
	defer c.Close()
	c.Add(h.tr)
	c.mu.Lock()
	jobs := c.byT[h.tr]
	c.mu.Unlock()
	if len(jobs) != 1 || jobs[0].i != 0 {
		t.Fatalf("checker scheduled %d jobs, want one for upstream 0 only", len(jobs))
	}
	c.Remove(h.tr)
}

func TestSubscribeCancel(t *testing.T) {
	h := newHarness(t, service(1, tcpCheck(1, 1), config.Passive{}))
	var n int
	cancel := h.tr.Subscribe(func(Change) { n++ })
	h.check(0, false)
	cancel()
	h.check(0, true)
	if n != 1 {
		t.Fatalf("cancelled subscriber got %d changes, want 1", n)
	}
	if got := len(h.rec.take()); got != 2 {
		t.Fatalf("other subscriber got %d changes, want 2", got)
	}
}

func TestSubscriberMayRead(t *testing.T) {
	h := newHarness(t, service(2, tcpCheck(1, 1), config.Passive{}))
	var states []State
	h.tr.Subscribe(func(c Change) { states = append(states, h.tr.State(c.Index)); _ = h.tr.Snapshot() })
	h.check(0, false)
	if len(states) != 1 || states[0] != StateDown {
		t.Fatalf("subscriber read %v, want [down]", states)
	}
}

func TestPreviousKeepsUnchangedUpstreams(t *testing.T) {
	svc := service(3, tcpCheck(2, 1), config.Passive{MaxFails: 1, FailTimeout: 10 * time.Second})
	h := newHarness(t, svc)
	h.check(0, false)     // active down
	h.tr.ReportFailure(1) // passive down
	h.clock.Advance(4 * time.Second)

	// Reload: upstream 2 removed, a new one added, 0 and 1 kept (in a new order).
	next := svc
	next.Upstreams = []config.Upstream{svc.Upstreams[1], {Addr: netip.MustParseAddrPort("198.19.16.20:53"), Weight: 1}, svc.Upstreams[0]}
	tr2, err := NewTracker(next, Options{Clock: h.clock, Previous: h.tr})
	if err != nil {
		t.Fatal(err)
	}
	h.tr.Close()
	defer tr2.Close()
	want := []State{StateDown, StateUp, StateDown}
	for i, w := range want {
		if got := tr2.State(i); got != w {
			t.Fatalf("after reload upstream %d (%s) is %s, want %s", i, tr2.Addr(i), got, w)
		}
	}
	// The passive down period continues where it was: 6s left.
	h.clock.Advance(6*time.Second - time.Millisecond)
	if got := tr2.State(0); got != StateDown {
		t.Fatalf("passive down ended early after reload: %s", got)
	}
	h.clock.Advance(time.Millisecond)
	if got := tr2.State(0); got != StateProbation {
		t.Fatalf("passive down did not end after fail_timeout across a reload: %s", got)
	}
	// The active counters carry over too: down until rise (2) passes.
	tr2.observe(2, Result{At: h.clock.Now()})
	if got := tr2.State(2); got != StateDown {
		t.Fatalf("after one pass of rise 2: %s", got)
	}
	tr2.observe(2, Result{At: h.clock.Now()})
	if got := tr2.State(2); got != StateUp {
		t.Fatalf("after two passes of rise 2: %s", got)
	}

	// A changed check config starts over.
	next.Health = tcpCheck(3, 3)
	tr3, err := NewTracker(next, Options{Clock: h.clock, Previous: tr2})
	if err != nil {
		t.Fatal(err)
	}
	defer tr3.Close()
	if got := tr3.State(0); got != StateUp {
		t.Fatalf("after a reload with another check config upstream 0 is %s, want up", got)
	}
}

func TestNewTrackerErrors(t *testing.T) {
	bad := service(1, &config.Health{Type: "udp", Interval: time.Second, Timeout: time.Millisecond, Rise: 1, Fall: 1, Expect: "/(/"}, config.Passive{})
	if _, err := NewTracker(bad, Options{}); err == nil {
		t.Fatal("NewTracker accepted a bad regexp")
	}
	empty := service(0, nil, config.Passive{})
	if _, err := NewTracker(empty, Options{}); err == nil {
		t.Fatal("NewTracker accepted a service without upstreams")
	}
}

// BenchmarkBalancerRead is what the front end pays per pick and upstream:
// one Eligible and one Weight, lock-free, during a slow-start ramp (the
// costlier path: it reads the clock).
func BenchmarkBalancerRead(b *testing.B) {
	svc := service(4, tcpCheck(1, 1), config.Passive{SlowStart: time.Hour})
	tr, err := NewTracker(svc, Options{})
	if err != nil {
		b.Fatal(err)
	}
	defer tr.Close()
	tr.observe(0, Result{Err: errCheck})
	tr.observe(0, Result{}) // upstream 0 ramps for an hour
	bal := tr.ForBalancer()
	b.RunParallel(func(pb *testing.PB) {
		i, sum := 0, 0
		for pb.Next() {
			if bal.Up(i & 3) {
				sum += bal.Weight(i & 3)
			}
			i++
		}
		_ = sum
	})
}

// BenchmarkReportSuccess is the passive report on every reply when nothing
// changes (the common case).
func BenchmarkReportSuccess(b *testing.B) {
	tr, err := NewTracker(service(4, nil, config.Passive{MaxFails: 1, FailTimeout: time.Second}), Options{})
	if err != nil {
		b.Fatal(err)
	}
	defer tr.Close()
	b.RunParallel(func(pb *testing.PB) {
		i := 0
		for pb.Next() {
			tr.ReportSuccess(i & 3)
			i++
		}
	})
}

// TestProbationWhileActiveDown: the passive half ends its probation on a
// success even while the active half keeps the upstream down (tried anyway
// because all are down).
func TestProbationWhileActiveDown(t *testing.T) {
	h := newHarness(t, service(1, tcpCheck(1, 1), config.Passive{MaxFails: 1, FailTimeout: time.Second}))
	h.tr.ReportFailure(0) // passive down
	h.check(0, false)     // active down too
	h.clock.Advance(time.Second)
	h.tr.ReportSuccess(0) // ends probation, state stays down (active)
	h.check(0, true)
	h.wantState(0, StateUp)
}
