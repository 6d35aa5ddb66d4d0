package proxy

import (
	"context"
	"fmt"
	"net"
	"net/netip"
	"runtime"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"go.uber.org/zap"
	"go.uber.org/zap/zaptest"

	"github.com/lbctl/lbctl/test/testenv"
)

// udpBackend answers every datagram with "NAME DATAGRAM", replies times
// (0: never answers, a black hole). It counts what it received.
func udpBackend(t *testing.T, name string, replies int, addr netip.Addr) (netip.AddrPort, *atomic.Int64) {
	t.Helper()
	testenv.RequireNetns(t)
	c, err := net.ListenUDP("udp", net.UDPAddrFromAddrPort(netip.AddrPortFrom(addr, 0)))
	if err != nil {
		t.Fatal(err)
	}
	var got atomic.Int64
	done := make(chan struct{})
	t.Cleanup(func() { c.Close(); <-done })
	go func() {
		defer close(done)
		buf := make([]byte, 2048)
		for {
			n, from, err := c.ReadFromUDPAddrPort(buf)
			if err != nil {
				return
			}
			got.Add(1)
			for range replies {
				c.WriteToUDPAddrPort([]byte(name+" "+string(buf[:n])), from)
			}
		}
	}()
	return c.LocalAddr().(*net.UDPAddr).AddrPort(), &got
}

func startUDP(t *testing.T, svc Service, p *Pool) *UDP {
	t.Helper()
	testenv.RequireNetns(t)
	if !svc.Listen.IsValid() {
		svc.Listen = netip.AddrPortFrom(lo4, 0)
	}
	if svc.Name == "" {
		svc.Name = "test"
	}
	if svc.Responses == 0 {
		svc.Responses = 1
	}
	f := NewUDP(svc, p, &ProxyDialer{}, zaptest.NewLogger(t, zaptest.Level(zap.ErrorLevel)))
	if err := f.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		defer cancel()
		f.Stop(ctx)
	})
	return f
}

func client(t *testing.T, to netip.AddrPort) *net.UDPConn {
	t.Helper()
	c, err := net.DialUDP("udp", nil, net.UDPAddrFromAddrPort(to))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Close() })
	c.SetDeadline(time.Now().Add(20 * time.Second))
	return c
}

func query(t *testing.T, c *net.UDPConn, q string) string {
	t.Helper()
	if _, err := c.Write([]byte(q)); err != nil {
		t.Fatal(err)
	}
	buf := make([]byte, 2048)
	n, err := c.Read(buf)
	if err != nil {
		t.Fatalf("reply to %q: %v", q, err)
	}
	return string(buf[:n])
}

func TestUDPRoundRobinIPv4AndIPv6(t *testing.T) {
	for _, lo := range []netip.Addr{lo4, lo6} {
		t.Run(lo.String(), func(t *testing.T) {
			var addrs []netip.AddrPort
			for i := range 4 {
				a, _ := udpBackend(t, fmt.Sprintf("dev%d", i+1), 1, lo)
				addrs = append(addrs, a)
			}
			f := startUDP(t, Service{Listen: netip.AddrPortFrom(lo, 0), Timeout: 5 * time.Second}, pool(t, "round_robin", addrs...))
			var got []string
			for i := range 8 {
				// A new client port per query: a new session each.
				got = append(got, strings.Fields(query(t, client(t, f.Addr()), fmt.Sprintf("q%d", i)))[0])
			}
			if want := "dev1 dev2 dev3 dev4 dev1 dev2 dev3 dev4"; strings.Join(got, " ") != want {
				t.Fatalf("answers %v, want %s", got, want)
			}
			waitFor(t, "sessions ended with their reply", func() bool { return f.Stats().Active == 0 })
		})
	}
}

// heldBackend answers only once it holds n datagrams, then each of them.
func heldBackend(t *testing.T, name string, n int) netip.AddrPort {
	t.Helper()
	testenv.RequireNetns(t)
	c, err := net.ListenUDP("udp", net.UDPAddrFromAddrPort(netip.AddrPortFrom(lo4, 0)))
	if err != nil {
		t.Fatal(err)
	}
	done := make(chan struct{})
	t.Cleanup(func() { c.Close(); <-done })
	go func() {
		defer close(done)
		var held []string
		var from netip.AddrPort
		buf := make([]byte, 2048)
		for {
			k, a, err := c.ReadFromUDPAddrPort(buf)
			if err != nil {
				return
			}
			held, from = append(held, string(buf[:k])), a
			if len(held) == n {
				for _, q := range held {
					c.WriteToUDPAddrPort([]byte(name+" "+q), from)
				}
				held = nil
			}
		}
	}()
	return c.LocalAddr().(*net.UDPAddr).AddrPort()
}

// With responses: 1 a session waits for one reply per client datagram
// (nginx counts requests too): three datagrams sent before any answer keep
// one session on one upstream, which ends with the third reply; the next
// datagram starts a new session on the next upstream.
func TestUDPSessionAccounting(t *testing.T) {
	p := pool(t, "round_robin", heldBackend(t, "dev1", 3), heldBackend(t, "dev2", 1))
	f := startUDP(t, Service{Timeout: 5 * time.Second}, p)
	c := client(t, f.Addr())
	for i := range 3 {
		c.Write([]byte(fmt.Sprintf("q%d", i)))
	}
	buf := make([]byte, 100)
	for i := range 3 {
		n, err := c.Read(buf)
		if err != nil {
			t.Fatal(err)
		}
		if got := string(buf[:n]); !strings.HasPrefix(got, "dev1 q") {
			t.Fatalf("reply %d: %q, want dev1's", i, got)
		}
	}
	waitFor(t, "session ended", func() bool { return f.Stats().Active == 0 })
	if s := f.Stats(); s.Accepted != 1 {
		t.Fatalf("stats %+v: want one session for the three datagrams", s)
	}
	if got := query(t, c, "again"); got != "dev2 again" {
		t.Fatalf("after the session ended: %q, want a new session on dev2", got)
	}
	if s := f.Stats(); s.Accepted != 2 {
		t.Fatalf("stats %+v: want a second session", s)
	}
}

// Three replies per datagram with responses: 3; the session ends after the
// third, and with responses: -1 it stays until idle.
func TestUDPResponsesCount(t *testing.T) {
	a, _ := udpBackend(t, "dev1", 3, lo4)
	f := startUDP(t, Service{Responses: 3, Timeout: 5 * time.Second}, pool(t, "round_robin", a))
	c := client(t, f.Addr())
	c.Write([]byte("q"))
	buf := make([]byte, 100)
	for range 3 {
		if _, err := c.Read(buf); err != nil {
			t.Fatal(err)
		}
	}
	waitFor(t, "session ended after 3 replies", func() bool { return f.Stats().Active == 0 })

	g := startUDP(t, Service{Responses: -1, Timeout: 300 * time.Millisecond}, pool(t, "round_robin", a))
	c2 := client(t, g.Addr())
	c2.Write([]byte("q"))
	for range 3 {
		if _, err := c2.Read(buf); err != nil {
			t.Fatal(err)
		}
	}
	if g.Stats().Active != 1 {
		t.Fatalf("responses -1: session ended before its idle timeout: %+v", g.Stats())
	}
	waitFor(t, "idle session ended", func() bool { return g.Stats().Active == 0 })
	if s := g.Pool().Snapshot(); s[0].Failures != 0 {
		t.Fatalf("an answered idle session counted as a failure: %+v", s)
	}
}

// An upstream that never answers: after timeout the session is a failure,
// reported to the pool, and the query goes to the next upstream, which
// answers the client.
func TestUDPSilentUpstreamFailsOver(t *testing.T) {
	silent, nSilent := udpBackend(t, "silent", 0, lo4)
	live, _ := udpBackend(t, "dev2", 1, lo4)
	p := pool(t, "round_robin", silent, live)
	f := startUDP(t, Service{Timeout: 200 * time.Millisecond}, p)
	got := query(t, client(t, f.Addr()), "www.example.com")
	if got != "dev2 www.example.com" {
		t.Fatalf("reply %q, want dev2's", got)
	}
	if nSilent.Load() != 1 {
		t.Fatalf("silent upstream got %d datagrams, want the query first", nSilent.Load())
	}
	if s := p.Snapshot(); s[0].Failures != 1 || s[1].Successes != 1 {
		t.Fatalf("snapshot %+v: want silent failed once, dev2 one success", s)
	}
}

// A closed port answers with ICMP port unreachable: a failure seen on the
// connected socket, retried on the next at once.
func TestUDPRefusingUpstreamFailsOver(t *testing.T) {
	live, _ := udpBackend(t, "dev2", 1, lo4)
	p := pool(t, "round_robin", closedPort(t, "udp"), live)
	f := startUDP(t, Service{Timeout: time.Minute}, p)
	if got := query(t, client(t, f.Addr()), "q"); got != "dev2 q" {
		t.Fatalf("reply %q", got)
	}
	if s := p.Snapshot(); s[0].Failures != 1 {
		t.Fatalf("snapshot %+v: want the refusing upstream failed once", s)
	}
}

// next_upstream_tries: 1 means no second upstream: the query is lost.
func TestUDPNextUpstreamTriesBound(t *testing.T) {
	silent, _ := udpBackend(t, "silent", 0, lo4)
	live, nLive := udpBackend(t, "dev2", 1, lo4)
	p := pool(t, "round_robin", silent, live)
	f := startUDP(t, Service{Timeout: 200 * time.Millisecond, NextUpstreamTries: 1}, p)
	c := client(t, f.Addr())
	c.Write([]byte("q"))
	waitFor(t, "session given up", func() bool { return f.Stats().Failed == 1 })
	if nLive.Load() != 0 {
		t.Fatalf("second upstream got %d datagrams with next_upstream_tries 1", nLive.Load())
	}
	waitFor(t, "session ended", func() bool { return f.Stats().Active == 0 })
}

func TestUDPDrain(t *testing.T) {
	a, _ := udpBackend(t, "dev1", 1, lo4)
	f := NewUDP(Service{Name: "d", Listen: netip.AddrPortFrom(lo4, 0), Responses: -1, Timeout: time.Minute},
		pool(t, "round_robin", a), &ProxyDialer{}, zap.NewNop())
	if err := f.Start(); err != nil {
		t.Fatal(err)
	}
	c := client(t, f.Addr())
	query(t, c, "one")
	stopped := make(chan struct{})
	go func() {
		ctx, cancel := context.WithTimeout(context.Background(), 300*time.Millisecond)
		defer cancel()
		f.Stop(ctx)
		close(stopped)
	}()
	waitFor(t, "draining", f.draining.Load)
	if got := query(t, c, "two"); got != "dev1 two" {
		t.Fatalf("open session while draining: %q", got)
	}
	fresh := client(t, f.Addr())
	fresh.Write([]byte("new"))
	<-stopped
	if s := f.Stats(); s.Rejected == 0 || s.Active != 0 {
		t.Fatalf("after drain: %+v, want the new client rejected and no session left", s)
	}
}

func TestUDPNoFDLeak(t *testing.T) {
	a, _ := udpBackend(t, "dev1", 1, lo4)
	silent, _ := udpBackend(t, "silent", 0, lo4)
	before := openFDs(t)
	d := &ProxyDialer{}
	f := NewUDP(Service{Name: "fd", Listen: netip.AddrPortFrom(lo4, 0), Responses: 1, Timeout: 100 * time.Millisecond},
		pool(t, "round_robin", a, silent), d, zap.NewNop())
	if err := f.Start(); err != nil {
		t.Fatal(err)
	}
	for i := range 20 {
		c, err := net.DialUDP("udp", nil, net.UDPAddrFromAddrPort(f.Addr()))
		if err != nil {
			t.Fatal(err)
		}
		c.SetDeadline(time.Now().Add(10 * time.Second))
		c.Write([]byte(fmt.Sprint(i)))
		if _, err := c.Read(make([]byte, 64)); err != nil {
			t.Fatal(err)
		}
		c.Close()
	}
	if err := f.Stop(context.Background()); err != nil {
		t.Fatal(err)
	}
	d.Close()
	// splice keeps pipes in a sync.Pool, closed by a finalizer once a GC
	// drops them: collect until they are gone.
	waitFor(t, "fds back to the start", func() bool { runtime.GC(); return openFDs(t) <= before })
}

// Clean sessions hand their socket back: a run of sequential queries to
// one upstream opens one upstream socket, not one per query.
func TestUDPReusesUpstreamSockets(t *testing.T) {
	a, _ := udpBackend(t, "dev1", 1, lo4)
	d := &ProxyDialer{}
	t.Cleanup(func() { d.Close() })
	f := NewUDP(Service{Name: "r", Listen: netip.AddrPortFrom(lo4, 0), Responses: 1, Timeout: 5 * time.Second},
		pool(t, "round_robin", a), d, zap.NewNop())
	if err := f.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { f.Stop(context.Background()) })
	c := client(t, f.Addr())
	query(t, c, "warm")
	waitFor(t, "session ended", func() bool { return f.Stats().Active == 0 })
	before := openFDs(t)
	for i := range 20 {
		query(t, c, fmt.Sprint(i))
		waitFor(t, "session ended", func() bool { return f.Stats().Active == 0 })
	}
	if after := openFDs(t); after > before {
		t.Fatalf("%d fds after 20 sequential sessions, %d before: sockets not reused", after, before)
	}
	if s := f.Stats(); s.Accepted != 21 {
		t.Fatalf("stats %+v, want 21 sessions", s)
	}
}

// max_conns bounds sessions: a new client's datagram is dropped while the
// one session is open; the open session goes on.
func TestUDPMaxConns(t *testing.T) {
	a, n := udpBackend(t, "dev1", 1, lo4)
	f := startUDP(t, Service{Responses: -1, Timeout: time.Minute, MaxConns: 1}, pool(t, "round_robin", a))
	first := client(t, f.Addr())
	if got := query(t, first, "one"); got != "dev1 one" {
		t.Fatalf("first client: %q", got)
	}
	second := client(t, f.Addr())
	second.Write([]byte("over the limit"))
	waitFor(t, "second client rejected", func() bool { return f.Stats().Rejected == 1 })
	if got := query(t, first, "two"); got != "dev1 two" {
		t.Fatalf("first client after the rejection: %q", got)
	}
	if n.Load() != 2 {
		t.Fatalf("upstream got %d datagrams, want the first client's 2 only", n.Load())
	}
}
