package health

import (
	"context"
	"net"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"go.uber.org/goleak"

	"github.com/lbctl/lbctl/pkg/config"
)

// blockingDialer holds every dial until its context ends, counting how many
// run at once.
type blockingDialer struct {
	mu            sync.Mutex
	running, peak int
	total         atomic.Int64
}

func (d *blockingDialer) DialContext(ctx context.Context, _, _ string) (net.Conn, error) {
	d.mu.Lock()
	d.running++
	d.peak = max(d.peak, d.running)
	d.mu.Unlock()
	<-ctx.Done()
	d.mu.Lock()
	d.running--
	d.mu.Unlock()
	d.total.Add(1)
	return nil, ctx.Err()
}

// TestCheckerPoolIsBounded runs 200 upstreams' checks, each lasting its
// whole timeout, through 3 workers: never more than 3 checks (and
// goroutines for them) at once, and nothing left behind after Close.
func TestCheckerPoolIsBounded(t *testing.T) {
	defer goleak.VerifyNone(t, goleak.IgnoreCurrent())
	const workers = 3
	d := &blockingDialer{}
	c := NewChecker(CheckerOptions{Workers: workers, Dialer: d})
	h := &config.Health{Type: "tcp", Interval: 40 * time.Millisecond, Timeout: 5 * time.Millisecond, Rise: 1, Fall: 1}
	var trs []*Tracker
	for range 4 {
		tr, err := NewTracker(service(50, h, config.Passive{}), Options{})
		if err != nil {
			t.Fatal(err)
		}
		trs = append(trs, tr)
		c.Add(tr)
	}
	for d.total.Load() < 60 {
		time.Sleep(5 * time.Millisecond)
	}
	c.Remove(trs[0])
	c.Close()
	for _, tr := range trs {
		tr.Close()
	}
	d.mu.Lock()
	defer d.mu.Unlock()
	if d.peak > workers || d.peak < 1 {
		t.Fatalf("%d checks ran at once, want 1 to %d (the pool size)", d.peak, workers)
	}
	if d.running != 0 {
		t.Fatalf("%d checks still running after Close", d.running)
	}
	// The failures were recorded: each checked upstream has a last error.
	checked := 0
	for _, tr := range trs {
		for _, s := range tr.Snapshot() {
			if !s.LastCheck.IsZero() {
				checked++
				if s.LastOK || s.LastError == "" {
					t.Fatalf("upstream %s: a timed-out check recorded as %+v", s.Addr, s)
				}
			}
		}
	}
	if checked == 0 {
		t.Fatal("no check result was recorded")
	}
}

// TestCheckerRemoveStopsChecks: after Remove no result reaches the tracker.
func TestCheckerRemoveStopsChecks(t *testing.T) {
	defer goleak.VerifyNone(t, goleak.IgnoreCurrent())
	d := &blockingDialer{}
	c := NewChecker(CheckerOptions{Workers: 2, Dialer: d})
	defer c.Close()
	h := &config.Health{Type: "tcp", Interval: 10 * time.Millisecond, Timeout: 2 * time.Millisecond, Rise: 1, Fall: 1}
	tr, err := NewTracker(service(4, h, config.Passive{}), Options{})
	if err != nil {
		t.Fatal(err)
	}
	defer tr.Close()
	c.Add(tr)
	for d.total.Load() < 8 {
		time.Sleep(2 * time.Millisecond)
	}
	c.Remove(tr)
	c.mu.Lock()
	n := len(c.pending)
	c.mu.Unlock()
	if n != 0 {
		t.Fatalf("%d checks still scheduled after Remove", n)
	}
	before := d.total.Load()
	time.Sleep(50 * time.Millisecond) // five intervals: a leftover schedule would show
	if after := d.total.Load(); after > before+2 {
		t.Fatalf("%d checks ran after Remove (at most the 2 in flight may finish)", after-before)
	}
}

// TestCheckerJitter: 200 upstreams added at once get first checks spread
// over the interval, and every later check lands within ±10% of it.
func TestCheckerJitter(t *testing.T) {
	c := NewChecker(CheckerOptions{Workers: 1, Dialer: &blockingDialer{}})
	defer c.Close()
	h := &config.Health{Type: "tcp", Interval: time.Hour, Timeout: time.Second, Rise: 1, Fall: 1}
	tr, err := NewTracker(service(200, h, config.Passive{}), Options{})
	if err != nil {
		t.Fatal(err)
	}
	defer tr.Close()
	before := time.Now()
	c.Add(tr)
	c.mu.Lock()
	var buckets [10]int
	for _, j := range c.byT[tr] {
		off := j.due.Sub(before)
		if off < 0 || off > h.Interval+time.Second {
			c.mu.Unlock()
			t.Fatalf("first check %v after Add, want within the interval %v", off, h.Interval)
		}
		buckets[min(9, int(off*10/h.Interval))]++
	}
	c.mu.Unlock()
	c.Remove(tr)
	for i, n := range buckets {
		// 20 expected per tenth; all in a few tenths would be lockstep.
		if n == 0 || n > 60 {
			t.Fatalf("first checks per tenth of the interval %v: not spread (tenth %d)", buckets, i)
		}
	}
	for range 10000 {
		if j := randJitter(time.Second); j < -100*time.Millisecond || j > 100*time.Millisecond {
			t.Fatalf("jitter %v outside ±10%% of 1s", j)
		}
	}
}
