package health

import (
	"container/heap"
	"context"
	"math/rand/v2"
	"net"
	"net/netip"
	"sync"
	"time"

	"go.uber.org/zap"
)

// DefaultWorkers is the size of the check pool when CheckerOptions.Workers
// is 0: enough for hundreds of upstreams checked every few seconds, since a
// check holds a worker for at most its timeout.
const DefaultWorkers = 16

// jitter is the share of the interval by which each check moves at random,
// so upstreams added together are not probed in lockstep.
const jitter = 0.1

// CheckerOptions configure a Checker.
type CheckerOptions struct {
	Log *zap.Logger
	// Workers bounds the goroutines running checks; 0 = DefaultWorkers.
	Workers int
	// Dialer opens the check sockets; nil = a plain net.Dialer (the load
	// balancer's own address).
	Dialer Dialer
	// Observe, if set, is called with every finished check (metrics:
	// check latency histograms). It must not block.
	Observe func(service string, upstream netip.AddrPort, r Result)
}

// Checker runs the active checks of every tracker added to it: one
// scheduler goroutine and a fixed pool of workers, however many upstreams
// there are. Close stops them all.
type Checker struct {
	log    *zap.Logger
	dialer Dialer
	// observe is CheckerOptions.Observe.
	observe func(string, netip.AddrPort, Result)

	mu      sync.Mutex
	pending jobHeap
	byT     map[*Tracker][]*job
	closed  bool

	wake   chan struct{} // the earliest due time may have changed
	jobs   chan *job
	stop   chan struct{}
	ctx    context.Context // cancelled by Close: ends running checks
	cancel context.CancelFunc
	wg     sync.WaitGroup
}

// job is the recurring check of one upstream.
type job struct {
	t       *Tracker
	i       int
	addr    netip.AddrPort // upstream address with the check port
	due     time.Time
	idx     int  // heap index; -1 when not queued
	removed bool // guarded by Checker.mu
}

// NewChecker starts the scheduler and the worker pool.
func NewChecker(opts CheckerOptions) *Checker {
	if opts.Log == nil {
		opts.Log = zap.NewNop()
	}
	if opts.Workers <= 0 {
		opts.Workers = DefaultWorkers
	}
	if opts.Dialer == nil {
		opts.Dialer = &net.Dialer{}
	}
	c := &Checker{
		log:    opts.Log,
		dialer: opts.Dialer,
		byT:    map[*Tracker][]*job{},
		wake:   make(chan struct{}, 1),
		jobs:   make(chan *job),
		stop:   make(chan struct{}),
	}
	c.observe = opts.Observe
	c.ctx, c.cancel = context.WithCancel(context.Background())
	c.wg.Add(1 + opts.Workers)
	go c.schedule()
	for range opts.Workers {
		go c.work()
	}
	return c
}

// Add starts checking t's upstreams (those not marked `down: true`), each
// first at a random point within its interval. A tracker without an active
// check is ignored.
func (c *Checker) Add(t *Tracker) {
	if t.probe == nil {
		return
	}
	now := time.Now()
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.closed || c.byT[t] != nil {
		return
	}
	js := []*job{}
	for i, u := range t.ups {
		if u.cfg.Down {
			continue
		}
		addr := u.cfg.Addr
		if t.health.Port != 0 {
			addr = netip.AddrPortFrom(addr.Addr(), t.health.Port)
		}
		j := &job{t: t, i: i, addr: addr, due: now.Add(randDuration(t.health.Interval))}
		heap.Push(&c.pending, j)
		js = append(js, j)
	}
	c.byT[t] = js
	c.poke()
}

// Remove stops checking t. A check of t already running finishes, but its
// result is dropped.
func (c *Checker) Remove(t *Tracker) {
	c.mu.Lock()
	defer c.mu.Unlock()
	for _, j := range c.byT[t] {
		j.removed = true
		if j.idx >= 0 {
			heap.Remove(&c.pending, j.idx)
		}
	}
	delete(c.byT, t)
}

// Close stops the scheduler and waits for running checks to end.
func (c *Checker) Close() {
	c.mu.Lock()
	if c.closed {
		c.mu.Unlock()
		return
	}
	c.closed = true
	c.mu.Unlock()
	close(c.stop)
	c.cancel()
	c.wg.Wait()
}

func (c *Checker) poke() {
	select {
	case c.wake <- struct{}{}:
	default:
	}
}

// schedule hands due jobs to the workers in due order.
func (c *Checker) schedule() {
	defer c.wg.Done()
	timer := time.NewTimer(time.Hour)
	defer timer.Stop()
	for {
		c.mu.Lock()
		var next *job
		wait := time.Hour
		if len(c.pending) > 0 {
			if d := time.Until(c.pending[0].due); d > 0 {
				wait = d
			} else {
				next = heap.Pop(&c.pending).(*job)
			}
		}
		c.mu.Unlock()
		if next != nil {
			select {
			case c.jobs <- next: // blocks while every worker is busy
				continue
			case <-c.stop:
				return
			}
		}
		timer.Reset(wait)
		select {
		case <-timer.C:
		case <-c.wake:
			if !timer.Stop() {
				select {
				case <-timer.C:
				default:
				}
			}
		case <-c.stop:
			return
		}
	}
}

// work runs checks until Close.
func (c *Checker) work() {
	defer c.wg.Done()
	for {
		select {
		case j := <-c.jobs:
			c.run(j)
		case <-c.stop:
			return
		}
	}
}

// run performs one check, records it and queues the next one.
func (c *Checker) run(j *job) {
	c.mu.Lock()
	removed := j.removed || c.closed
	c.mu.Unlock()
	if removed {
		return
	}
	h := j.t.health
	ctx, cancel := context.WithTimeout(c.ctx, h.Timeout)
	start := time.Now()
	err := j.t.probe(ctx, c.dialer, j.addr)
	lat := time.Since(start)
	cancel()

	c.mu.Lock()
	removed = j.removed || c.closed
	if !removed {
		next := j.due.Add(h.Interval + randJitter(h.Interval))
		if now := time.Now(); next.Before(now) {
			next = now
		}
		j.due = next
		heap.Push(&c.pending, j)
		c.poke()
	}
	c.mu.Unlock()
	if !removed {
		r := Result{At: start, Latency: lat, Err: err}
		j.t.observe(j.i, r)
		if c.observe != nil {
			c.observe(j.t.Service(), j.t.Addr(j.i), r)
		}
	}
}

// randDuration is a random duration in [0, d).
func randDuration(d time.Duration) time.Duration {
	if d <= 0 {
		return 0
	}
	return time.Duration(rand.Int64N(int64(d)))
}

// randJitter is a random duration in [-jitter·d, +jitter·d].
func randJitter(d time.Duration) time.Duration {
	span := time.Duration(float64(d) * jitter)
	if span <= 0 {
		return 0
	}
	return time.Duration(rand.Int64N(int64(2*span)+1)) - span
}

// jobHeap orders jobs by due time.
type jobHeap []*job

func (h jobHeap) Len() int           { return len(h) }
func (h jobHeap) Less(a, b int) bool { return h[a].due.Before(h[b].due) }
func (h jobHeap) Swap(a, b int) {
	h[a], h[b] = h[b], h[a]
	h[a].idx, h[b].idx = a, b
}
func (h *jobHeap) Push(x any) {
	j := x.(*job)
	j.idx = len(*h)
	*h = append(*h, j)
}
func (h *jobHeap) Pop() any {
	old := *h
	j := old[len(old)-1]
	old[len(old)-1] = nil
	j.idx = -1
	*h = old[:len(old)-1]
	return j
}
