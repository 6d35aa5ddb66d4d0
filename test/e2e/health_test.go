package e2e

import (
	"fmt"
	"net"
	"net/netip"
	"regexp"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"golang.org/x/net/dns/dnsmessage"

	"github.com/lbctl/lbctl/test/topo"
)

// The health failover tests run a steady stream of requests through `lbctl
// run`, kill one of four upstreams, and check from the client's side and
// from lbctl's log that health takes it out within the bound its config
// gives, that nothing is lost after that, and that it comes back after rise
// checks with a slow-start ramp.

// check settings of the failover tests; the down bound derives from them.
const (
	hcInterval  = 500 * time.Millisecond
	hcTimeout   = 200 * time.Millisecond
	hcRise      = 2
	hcFall      = 2
	hcSlowStart = 4 * time.Second
	// downSlack covers what the bound does not: log polling (20ms), process
	// start-up of a kill, scheduling on a loaded 2-core machine.
	downSlack = 1500 * time.Millisecond
)

// downBound is the longest a dead upstream may stay up: the first failing
// check comes at most one jittered interval (+10%) after the kill, fall-1
// more intervals later the last one, which takes up to the timeout.
func downBound() time.Duration {
	return time.Duration(float64(hcFall)*float64(hcInterval)*1.1) + hcTimeout + downSlack
}

// outcome is one request of a stream.
type outcome struct {
	sent    time.Time
	backend int // 1..4 answered; 0 = lost
	err     error
}

// stream sends requests from several client workers until stop.
type stream struct {
	mu   sync.Mutex
	outs []outcome
	quit chan struct{}
	wg   sync.WaitGroup
}

// startStream runs workers goroutines, each calling one() in a loop with a
// 1ms pause, until the returned stream is stopped (also at cleanup).
func startStream(t *testing.T, workers int, newWorker func() (one func() (int, error), done func())) *stream {
	t.Helper()
	s := &stream{quit: make(chan struct{})}
	for range workers {
		one, done := newWorker()
		s.wg.Add(1)
		go func() {
			defer s.wg.Done()
			defer done()
			for {
				select {
				case <-s.quit:
					return
				default:
				}
				sent := time.Now()
				b, err := one()
				s.mu.Lock()
				s.outs = append(s.outs, outcome{sent: sent, backend: b, err: err})
				s.mu.Unlock()
				time.Sleep(time.Millisecond)
			}
		}()
	}
	t.Cleanup(s.stop)
	return s
}

func (s *stream) stop() {
	select {
	case <-s.quit:
	default:
		close(s.quit)
	}
	s.wg.Wait()
}

// window returns the outcomes of requests sent in [from, to).
func (s *stream) window(from, to time.Time) []outcome {
	s.mu.Lock()
	defer s.mu.Unlock()
	var w []outcome
	for _, o := range s.outs {
		if !o.sent.Before(from) && o.sent.Before(to) {
			w = append(w, o)
		}
	}
	return w
}

// tally counts answers per backend (index 0: lost) and the first error.
func tally(w []outcome) (n [5]int, firstErr error) {
	for _, o := range w {
		n[o.backend]++
		if o.err != nil && firstErr == nil {
			firstErr = o.err
		}
	}
	return n, firstErr
}

// share is backend b's part of the answered requests of w.
func share(w []outcome, b int) (float64, int) {
	n, _ := tally(w)
	answered := len(w) - n[0]
	if answered == 0 {
		return 0, 0
	}
	return float64(n[b]) / float64(answered), answered
}

// backendIndex is i when a is backend i's IPv4 address, else 0.
func backendIndex(a netip.Addr) int {
	for i := 1; i <= 4; i++ {
		if topo.Backend4(i) == a {
			return i
		}
	}
	return 0
}

// dnsWorker opens a UDP socket on the client connected to vip and returns a
// function asking www.example.com A once (1s timeout), with the backend
// whose address came back.
func (h *harness) dnsWorker(t *testing.T, vip netip.AddrPort) func() (func() (int, error), func()) {
	return func() (func() (int, error), func()) {
		var c net.Conn
		in(t, h.Client, func() (err error) {
			c, err = net.Dial("udp", vip.String())
			return err
		})
		buf := make([]byte, 1500)
		var id uint16
		one := func() (int, error) {
			id++
			b := dnsmessage.NewBuilder(nil, dnsmessage.Header{ID: id, RecursionDesired: true})
			_ = b.StartQuestions()
			_ = b.Question(dnsmessage.Question{Name: dnsmessage.MustNewName("www.example.com."), Type: dnsmessage.TypeA, Class: dnsmessage.ClassINET})
			msg, err := b.Finish()
			if err != nil {
				return 0, err
			}
			_ = c.SetDeadline(time.Now().Add(time.Second))
			if _, err := c.Write(msg); err != nil {
				return 0, err
			}
			for {
				n, err := c.Read(buf)
				if err != nil {
					return 0, err
				}
				var p dnsmessage.Parser
				hdr, err := p.Start(buf[:n])
				if err != nil || hdr.ID != id {
					continue // a late answer to an earlier query
				}
				_ = p.SkipAllQuestions()
				if _, err := p.AnswerHeader(); err != nil {
					return 0, fmt.Errorf("answer: %w", err)
				}
				r, err := p.AResource()
				if err != nil {
					return 0, fmt.Errorf("answer: %w", err)
				}
				return backendIndex(netip.AddrFrom4(r.A)), nil
			}
		}
		return one, func() { c.Close() }
	}
}

var helloFrom = regexp.MustCompile(`^Hello from dev(\d)\.`)

// httpWorker returns a function making one HTTP request from the client to
// vip on a new connection, with the backend that answered. The backend must
// have seen the connection come from client (mode transparent).
func (h *harness) httpWorker(vip netip.AddrPort, client netip.Addr) func() (func() (int, error), func()) {
	return func() (func() (int, error), func()) {
		one := func() (int, error) {
			body, err := h.httpGet(vip)
			if err != nil {
				return 0, err
			}
			m := helloFrom.FindStringSubmatch(body)
			if m == nil {
				return 0, fmt.Errorf("unexpected body %q", body)
			}
			if !strings.Contains(body, "connected from "+client.String()+":") {
				return 0, fmt.Errorf("upstream saw another address than the client's %s: %q", client, body)
			}
			b, _ := strconv.Atoi(m[1])
			return b, nil
		}
		return one, func() {}
	}
}

// awaitTransition waits for lbctl's log line of upstream addr going to
// state `to` (the (n)th such line) and returns when the test saw it and the
// line.
func (l *lb) awaitTransition(t *testing.T, addr netip.AddrPort, to string, n int) (time.Time, string) {
	t.Helper()
	deadline := time.Now().Add(60 * time.Second) // liveness only
	for {
		if lines := transitionLines(l.out.String(), addr, to); len(lines) >= n {
			return time.Now(), lines[n-1]
		}
		select {
		case <-l.done:
			t.Fatalf("lbctl exited (%v) before %s went %s", l.err, addr, to)
		default:
		}
		if time.Now().After(deadline) {
			t.Fatalf("%s never went %s:\n%s", addr, to, l.out.String())
		}
		time.Sleep(20 * time.Millisecond)
	}
}

// transitionLines are the log lines of upstream addr going to state to.
func transitionLines(out string, addr netip.AddrPort, to string) []string {
	var got []string
	for _, line := range strings.Split(out, "\n") {
		if strings.Contains(line, "\tupstream "+to+"\t") && strings.Contains(line, `"upstream": "`+addr.String()+`"`) {
			got = append(got, line)
		}
	}
	return got
}

// failover is one failover scenario.
type failover struct {
	cfg string
	// check is the check type, as the log's reason names it: the return must
	// come from rise passed checks. "" when passive accounting may decide
	// the return instead (a success on probation).
	check    string
	vip      netip.AddrPort
	upstream func(i int) netip.AddrPort
	worker   func(h *harness, t *testing.T) func() (func() (int, error), func())
	workers  int
}

func (f failover) run(t *testing.T) {
	h := newHarness(t, topo.Options{})
	backends := make([]*process, 5)
	for i := 1; i <= 4; i++ {
		backends[i] = h.startBackend(t, i)
	}
	l := h.run(t, f.cfg)
	s := startStream(t, f.workers, f.worker(h, t))

	// Every upstream answers before the kill.
	start := time.Now()
	for {
		time.Sleep(500 * time.Millisecond)
		n, _ := tally(s.window(start, time.Now()))
		if n[1] > 0 && n[2] > 0 && n[3] > 0 && n[4] > 0 {
			break
		}
		if time.Since(start) > 30*time.Second {
			t.Fatalf("not every upstream answered within 30s: %v", n)
		}
	}
	victim := f.upstream(2)
	if lines := transitionLines(l.out.String(), victim, "down"); len(lines) > 0 {
		t.Fatalf("%s marked down while it was serving: %s", victim, lines[0])
	}

	// Kill it: marked down within the bound of the config.
	backends[2].signal(syscall.SIGKILL)
	<-backends[2].done
	killed := time.Now()
	marked, line := l.awaitTransition(t, victim, "down", 1)
	took := marked.Sub(killed)
	t.Logf("%s marked down %v after the kill (bound %v = fall %d x interval %v x 1.1 + timeout %v + slack %v): %s",
		victim, took.Round(time.Millisecond), downBound(), hcFall, hcInterval, hcTimeout, downSlack, line)
	if took > downBound() {
		t.Errorf("%s marked down %v after the kill, more than the bound %v", victim, took, downBound())
	}

	// Dead for a while: after the mark nothing is lost and nothing goes to it.
	time.Sleep(2 * time.Second)
	restarted := time.Now()
	backends[2] = h.startBackend(t, 2)
	upAt, upLine := l.awaitTransition(t, victim, "up", 1)
	t.Logf("%s up %v after the restart: %s", victim, upAt.Sub(restarted).Round(time.Millisecond), upLine)
	if f.check != "" && !strings.Contains(l.out.String(), fmt.Sprintf(`%d %s checks passed`, hcRise, f.check)) {
		t.Errorf("no transition of %s after %d passed %s checks (rise) in the log:\n%s", victim, hcRise, f.check, upLine)
	}

	// Slow start: its share ramps from almost nothing to a quarter.
	time.Sleep(hcSlowStart + 3*time.Second)
	s.stop()

	dead := s.window(marked, restarted)
	if n, _ := tally(dead); n[2] != 0 {
		t.Errorf("%d requests answered by the dead upstream after its mark", n[2])
	}
	after := s.window(marked, time.Now())
	n, firstErr := tally(after)
	t.Logf("after the mark: %d requests, %d lost, per backend %v", len(after), n[0], n[1:])
	if n[0] != 0 {
		t.Errorf("%d of %d requests sent after the mark were lost, first: %v", n[0], len(after), firstErr)
	}
	before, _ := tally(s.window(killed, marked))
	t.Logf("between kill and mark: %d lost of %d", before[0], before[0]+before[1]+before[2]+before[3]+before[4])

	early, nEarly := share(s.window(upAt, upAt.Add(time.Second)), 2)
	full, nFull := share(s.window(upAt.Add(hcSlowStart+500*time.Millisecond), upAt.Add(hcSlowStart+2500*time.Millisecond)), 2)
	t.Logf("share of %s: %.3f of %d in the first second of slow start, %.3f of %d after it", victim, early, nEarly, full, nFull)
	if nEarly < 20 || nFull < 40 {
		t.Fatalf("too few answers to judge slow start: %d and %d", nEarly, nFull)
	}
	if full < 0.15 {
		t.Errorf("share of %s after slow start %.3f, want about 0.25", victim, full)
	}
	if early >= full/2 {
		t.Errorf("share of %s in the first second of slow start %.3f, want well under its full share %.3f", victim, early, full)
	}
}

// TestHealthFailover: DNS over UDP through mode dsr (router NAT), four
// upstreams, a dns check.
func TestHealthFailover(t *testing.T) {
	upstream := func(i int) netip.AddrPort { return netip.AddrPortFrom(topo.Backend4(i), 53) }
	cfg := fmt.Sprintf(`services:
  - name: dns
    protocol: udp
    listen: %s
    mode: dsr
    dsr: {nat: router}
    upstreams: [%s, %s, %s, %s]
    health: {type: dns, query: www.example.com, interval: %v, timeout: %v, rise: %d, fall: %d}
    passive: {slow_start: %v}
`, netip.AddrPortFrom(topo.VIP4, 53), upstream(1), upstream(2), upstream(3), upstream(4),
		hcInterval, hcTimeout, hcRise, hcFall, hcSlowStart)
	failover{
		cfg: cfg, check: "dns", vip: netip.AddrPortFrom(topo.VIP4, 53), upstream: upstream, workers: 4,
		worker: func(h *harness, t *testing.T) func() (func() (int, error), func()) {
			return h.dnsWorker(t, netip.AddrPortFrom(topo.VIP4, 53))
		},
	}.run(t)
}

// TestHealthFailoverTCP: HTTP over TCP with connections refused, through
// mode transparent (upstream connections from the client's address; the
// checks still come from the LB's own), a tcp check and passive max_fails.
func TestHealthFailoverTCP(t *testing.T) {
	upstream := func(i int) netip.AddrPort { return netip.AddrPortFrom(topo.Backend4(i), 80) }
	cfg := fmt.Sprintf(`services:
  - name: web
    protocol: tcp
    listen: %s
    mode: transparent
    upstreams: [%s, %s, %s, %s]
    health: {type: tcp, interval: %v, timeout: %v, rise: %d, fall: %d}
    passive: {max_fails: 1, fail_timeout: 1s, slow_start: %v}
`, netip.AddrPortFrom(topo.VIP4, 80), upstream(1), upstream(2), upstream(3), upstream(4),
		hcInterval, hcTimeout, hcRise, hcFall, hcSlowStart)
	failover{
		cfg: cfg, check: "", vip: netip.AddrPortFrom(topo.VIP4, 80), upstream: upstream, workers: 4,
		worker: func(h *harness, t *testing.T) func() (func() (int, error), func()) {
			return h.httpWorker(netip.AddrPortFrom(topo.VIP4, 80), topo.Client4)
		},
	}.run(t)
}

// TestHealthReloadKeepsState: a SIGHUP that changes a service's upstream
// list but not its check keeps the state of the upstreams that stay: a
// dead upstream stays down (its state is not reset to up, which would send
// it queries until the checks caught it again).
func TestHealthReloadKeepsState(t *testing.T) {
	h := newHarness(t, topo.Options{})
	backends := make([]*process, 5)
	for i := 1; i <= 4; i++ {
		backends[i] = h.startBackend(t, i)
	}
	upstream := func(i int) netip.AddrPort { return netip.AddrPortFrom(topo.Backend4(i), 53) }
	cfg := func(weight1 int) string {
		return fmt.Sprintf(`services:
  - name: dns
    protocol: udp
    listen: %s
    mode: dsr
    upstreams: [{address: %s, weight: %d}, %s, %s, %s]
    health: {type: dns, query: www.example.com, interval: %v, timeout: %v, rise: %d, fall: %d}
`, netip.AddrPortFrom(topo.VIP4, 53), upstream(1), weight1, upstream(2), upstream(3), upstream(4),
			hcInterval, hcTimeout, hcRise, hcFall)
	}
	l := h.run(t, cfg(1))
	backends[2].signal(syscall.SIGKILL)
	<-backends[2].done
	l.awaitTransition(t, upstream(2), "down", 1)

	s := startStream(t, 4, h.dnsWorker(t, netip.AddrPortFrom(topo.VIP4, 53)))
	time.Sleep(time.Second)
	hup := time.Now() // queries from here on may meet the new pool
	if !l.reload(t, cfg(2)) {
		t.Fatalf("reload failed:\n%s", l.out.String())
	}
	time.Sleep(3 * time.Second) // six check intervals
	s.stop()

	w := s.window(hup, time.Now())
	n, firstErr := tally(w)
	t.Logf("after the reload: %d queries, %d lost, per backend %v", len(w), n[0], n[1:])
	if len(w) < 100 {
		t.Fatalf("only %d queries after the reload", len(w))
	}
	if n[0] != 0 {
		t.Errorf("%d queries lost after the reload (the dead upstream was chosen again?), first: %v", n[0], firstErr)
	}
	if n[1] <= n[3] {
		t.Errorf("upstream 1 (weight 2 after the reload) answered %d, upstream 3 (weight 1) %d: the reload did not apply", n[1], n[3])
	}
	out := l.out.String()
	if d, u := len(transitionLines(out, upstream(2), "down")), len(transitionLines(out, upstream(2), "up")); d != 1 || u != 0 {
		t.Errorf("the dead upstream went down %d times and up %d times, want once and never: the reload reset its state", d, u)
	}
}
