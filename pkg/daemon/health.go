package daemon

import (
	"sync"

	"github.com/lbctl/lbctl/pkg/config"
	"github.com/lbctl/lbctl/pkg/health"
	"github.com/lbctl/lbctl/pkg/proxy"
)

// checker is the daemon's one health-check pool, shared by every service
// and closed at exit.
func (d *Daemon) checker() *health.Checker {
	d.checkOnce.Do(func() {
		d.checks = health.NewChecker(health.CheckerOptions{Log: d.log.Named("health"), Observe: d.observeCheck})
		d.AtExit(func() error { d.checks.Close(); return nil })
	})
	return d.checks
}

// upstreamHealth is the health part of a runner: the tracker of its
// current upstream list. A reload makes a new tracker that keeps the state
// of the upstreams that did not change; connections started on the old
// pool report to the old tracker, which ignores them once closed.
//
// Runners that feed BPF tables (xdp) set onChange: it is called with the
// tracker after every attach (start, reload) and after every change of that
// tracker's upstreams (a transition, a slow-start step), and rebuilds the
// table from tr.Eligible(i) and tr.Weight(i):
//
//	r.health = upstreamHealth{d: d, onChange: r.fillTable}
//	r.health.attach(svc, nil) // no Go pool; again on every Update
//	r.health.start()          // in Start; r.health.stop() in Stop
type upstreamHealth struct {
	d        *Daemon
	onChange func(*health.Tracker)

	mu      sync.Mutex
	tr      *health.Tracker
	started bool
}

// attach builds the tracker of svc, keeping the state of unchanged
// upstreams of the previous one, and makes it pool's health source (pool
// may be nil for runners without a Go pool). Once started, the new
// tracker's checks run at once and the previous one's stop.
func (h *upstreamHealth) attach(svc config.Service, pool *proxy.Pool) error {
	tr, err := h.attachLocked(svc, pool)
	if err == nil && h.onChange != nil {
		h.onChange(tr) // outside h.mu: it may read h.Tracker()
	}
	return err
}

func (h *upstreamHealth) attachLocked(svc config.Service, pool *proxy.Pool) (*health.Tracker, error) {
	h.mu.Lock()
	defer h.mu.Unlock()
	tr, err := health.NewTracker(svc, health.Options{Log: h.d.log.Named("health"), Previous: h.tr})
	if err != nil {
		return nil, err
	}
	if pool != nil {
		pool.SetHealth(tr.ForBalancer())
	}
	if fn := h.onChange; fn != nil {
		tr.Subscribe(func(health.Change) { fn(tr) })
	}
	if h.started {
		h.d.checker().Add(tr)
	}
	h.retireLocked()
	h.tr = tr
	return tr, nil
}

// start runs the checks of the current tracker.
func (h *upstreamHealth) start() {
	h.mu.Lock()
	defer h.mu.Unlock()
	if !h.started && h.tr != nil {
		h.d.checker().Add(h.tr)
	}
	h.started = true
}

// stop ends the checks; the tracker reports nothing afterwards.
func (h *upstreamHealth) stop() {
	h.mu.Lock()
	defer h.mu.Unlock()
	h.retireLocked()
	h.tr = nil
	h.started = false
}

func (h *upstreamHealth) retireLocked() {
	if h.tr == nil {
		return
	}
	if h.started {
		h.d.checker().Remove(h.tr)
	}
	h.tr.Close()
}

// Tracker is the current tracker (nil before attach or after stop).
func (h *upstreamHealth) Tracker() *health.Tracker {
	h.mu.Lock()
	defer h.mu.Unlock()
	return h.tr
}

// snapshot is the health of every upstream, for Status.
func (h *upstreamHealth) snapshot() []health.Status {
	if tr := h.Tracker(); tr != nil {
		return tr.Snapshot()
	}
	return nil
}
