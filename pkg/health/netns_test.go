package health

import (
	"context"
	"net"
	"net/netip"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/lbctl/lbctl/pkg/config"
	"github.com/lbctl/lbctl/test/testenv"
	"github.com/lbctl/lbctl/test/topo"
)

// One topology (LB + one backend) serves every check test of the package:
// the checks run in the LB's namespace, the servers in backend1's.
var (
	topoOnce sync.Once
	topoT    *topo.Topology
	topoErr  error
)

func testTopo(t *testing.T) *topo.Topology {
	t.Helper()
	testenv.RequireRoot(t)
	testenv.RequireCommand(t, "ip")
	topoOnce.Do(func() { topoT, topoErr = topo.New(topo.Options{Backends: 1}) })
	if topoErr != nil {
		t.Fatalf("build topology: %v", topoErr)
	}
	return topoT
}

// closeTopo removes the shared topology; TestMain calls it.
func closeTopo() {
	if topoT != nil {
		_ = topoT.Close()
	}
}

// nsDialer opens sockets inside a host's namespace, as the daemon does when
// it runs there.
type nsDialer struct{ h *topo.Host }

func (d nsDialer) DialContext(ctx context.Context, network, addr string) (net.Conn, error) {
	var c net.Conn
	err := d.h.Do(func() error {
		var err error
		c, err = (&net.Dialer{}).DialContext(ctx, network, addr)
		return err
	})
	return c, err
}

// inNS opens a listener or packet conn in h's namespace, closed when the
// test ends.
func listenIn(t *testing.T, h *topo.Host, network, addr string) net.Listener {
	t.Helper()
	var ln net.Listener
	if err := h.Do(func() error {
		var err error
		ln, err = net.Listen(network, addr)
		return err
	}); err != nil {
		t.Fatalf("listen %s %s in %s: %v", network, addr, h.NS, err)
	}
	t.Cleanup(func() { ln.Close() })
	return ln
}

func listenPacketIn(t *testing.T, h *topo.Host, addr string) net.PacketConn {
	t.Helper()
	var pc net.PacketConn
	if err := h.Do(func() error {
		var err error
		pc, err = net.ListenPacket("udp", addr)
		return err
	}); err != nil {
		t.Fatalf("listen udp %s in %s: %v", addr, h.NS, err)
	}
	t.Cleanup(func() { pc.Close() })
	return pc
}

// serveUDP answers each datagram with reply(req) (nil: no answer) until
// the test ends.
func serveUDP(t *testing.T, pc net.PacketConn, reply func([]byte) []byte) {
	var wg sync.WaitGroup
	wg.Add(1)
	t.Cleanup(func() { pc.Close(); wg.Wait() })
	go func() {
		defer wg.Done()
		buf := make([]byte, 65536)
		for {
			n, from, err := pc.ReadFrom(buf)
			if err != nil {
				return
			}
			if r := reply(append(make([]byte, 0, n), buf[:n]...)); r != nil {
				_, _ = pc.WriteTo(r, from)
			}
		}
	}()
}

// checkCase is one check against a server in backend1.
type checkCase struct {
	name    string
	health  config.Health
	addr    string // target; the check port is its port
	wantErr string // "" = must pass; else a substring of the error
}

// run runs c's check from the LB namespace.
func (c checkCase) run(t *testing.T, tp *topo.Topology) {
	t.Helper()
	h := c.health
	if h.Timeout == 0 {
		h.Timeout = 300 * time.Millisecond
	}
	h.Interval, h.Rise, h.Fall = time.Second, 1, 1
	ctx, cancel := context.WithTimeout(context.Background(), h.Timeout)
	defer cancel()
	err := Probe(ctx, &h, nsDialer{tp.LB}, netip.MustParseAddrPort(c.addr))
	switch {
	case c.wantErr == "" && err != nil:
		t.Fatalf("%s check of %s failed: %v", h.Type, c.addr, err)
	case c.wantErr != "" && err == nil:
		t.Fatalf("%s check of %s passed, want an error containing %q", h.Type, c.addr, c.wantErr)
	case c.wantErr != "" && !strings.Contains(err.Error(), c.wantErr):
		t.Fatalf("%s check of %s: error %q, want it to contain %q", h.Type, c.addr, err, c.wantErr)
	}
}

func TestTCPCheck(t *testing.T) {
	tp := testTopo(t)
	seen := make(chan netip.Addr, 4)
	for _, a := range []string{"198.19.16.11:7001", "[2001:db8:16::11]:7001"} {
		ln := listenIn(t, tp.Backends[0], "tcp", a)
		var wg sync.WaitGroup
		wg.Add(1)
		t.Cleanup(func() { ln.Close(); wg.Wait() })
		go func() {
			defer wg.Done()
			for {
				c, err := ln.Accept()
				if err != nil {
					return
				}
				seen <- c.RemoteAddr().(*net.TCPAddr).AddrPort().Addr()
				c.Close()
			}
		}()
	}
	tcp := config.Health{Type: "tcp"}
	for _, c := range []checkCase{
		{name: "open", health: tcp, addr: "198.19.16.11:7001"},
		{name: "open ipv6", health: tcp, addr: "[2001:db8:16::11]:7001"},
		{name: "refused", health: tcp, addr: "198.19.16.11:7002", wantErr: "connection refused"},
		{name: "no such host", health: tcp, addr: "198.19.16.99:7001", wantErr: "timeout"},
	} {
		t.Run(c.name, func(t *testing.T) { c.run(t, tp) })
	}
	// The checks came from the LB's own addresses, not spoofed.
	for _, want := range []netip.Addr{topo.LBUp4, topo.LBUp6} {
		if got := <-seen; got != want {
			t.Fatalf("server saw a check from %s, want the LB's own address %s", got, want)
		}
	}
}

func TestUDPCheck(t *testing.T) {
	tp := testTopo(t)
	b := tp.Backends[0]
	serveUDP(t, listenPacketIn(t, b, "198.19.16.11:7101"), func(req []byte) []byte { return req })        // echo
	serveUDP(t, listenPacketIn(t, b, "198.19.16.11:7102"), func([]byte) []byte { return nil })            // silent
	serveUDP(t, listenPacketIn(t, b, "198.19.16.11:7103"), func([]byte) []byte { return []byte("pong") }) // fixed
	for _, c := range []checkCase{
		{name: "echo, any reply", health: config.Health{Type: "udp"}, addr: "198.19.16.11:7101"},
		{name: "echo, expect bytes", health: config.Health{Type: "udp", Send: "ping", Expect: "ping"}, addr: "198.19.16.11:7101"},
		{name: "expect regexp", health: config.Health{Type: "udp", Send: "ping", Expect: "/^p[aeiou]ng$/"}, addr: "198.19.16.11:7103"},
		{name: "wrong reply", health: config.Health{Type: "udp", Send: "ping", Expect: "ping"}, addr: "198.19.16.11:7103", wantErr: `reply "pong" does not match "ping"`},
		{name: "wrong reply regexp", health: config.Health{Type: "udp", Send: "x", Expect: "/^ok/"}, addr: "198.19.16.11:7103", wantErr: "does not match /^ok/"},
		{name: "closed port", health: config.Health{Type: "udp", Send: "ping"}, addr: "198.19.16.11:7104", wantErr: "connection refused"},
		{name: "no reply", health: config.Health{Type: "udp", Send: "ping"}, addr: "198.19.16.11:7102", wantErr: "no reply within timeout"},
	} {
		t.Run(c.name, func(t *testing.T) { c.run(t, tp) })
	}
}

// TestCheckerFollowsAServer runs the whole machine (Checker, Tracker,
// Subscribe) against a TCP server that goes away and comes back.
func TestCheckerFollowsAServer(t *testing.T) {
	tp := testTopo(t)
	const addr = "198.19.16.11:7201"
	ln := listenIn(t, tp.Backends[0], "tcp", addr)
	svc := config.Service{Name: "web", Protocol: config.TCP, OnAllDown: "try",
		Upstreams: []config.Upstream{{Addr: netip.MustParseAddrPort(addr), Weight: 1}, {Addr: netip.MustParseAddrPort("198.19.16.11:7202"), Weight: 1, Down: true}},
		Health:    &config.Health{Type: "tcp", Interval: 100 * time.Millisecond, Timeout: 50 * time.Millisecond, Rise: 2, Fall: 2},
	}
	tr, err := NewTracker(svc, Options{})
	if err != nil {
		t.Fatal(err)
	}
	defer tr.Close()
	changes := make(chan Change, 64)
	tr.Subscribe(func(c Change) {
		if c.From != c.To {
			changes <- c
		}
	})
	c := NewChecker(CheckerOptions{Workers: 2, Dialer: nsDialer{tp.LB}})
	defer c.Close()
	c.Add(tr)

	await := func(want State) Change {
		t.Helper()
		select {
		case ch := <-changes:
			if ch.Index != 0 || ch.To != want {
				t.Fatalf("change %+v, want upstream 0 -> %s", ch, want)
			}
			return ch
		case <-time.After(20 * time.Second): // liveness only: a hang must fail, not block
			t.Fatalf("upstream 0 never went %s; snapshot %+v", want, tr.Snapshot())
		}
		return Change{}
	}
	// Up from the start, and passing: a listening socket completes the
	// handshake without Accept.
	for tr.Snapshot()[0].LastCheck.IsZero() {
		time.Sleep(10 * time.Millisecond)
	}
	if s := tr.Snapshot()[0]; !s.LastOK || s.State != StateUp || s.LastLatency <= 0 {
		t.Fatalf("first check of a listening server: %+v", s)
	}
	ln.Close()
	ch := await(StateDown)
	if !strings.Contains(ch.Reason, "connection refused") {
		t.Fatalf("down reason %q, want the check's error", ch.Reason)
	}
	listenIn(t, tp.Backends[0], "tcp", addr)
	await(StateUp)
	if s := tr.Snapshot()[1]; s.State != StateDisabled || !s.LastCheck.IsZero() {
		t.Fatalf("upstream marked down: true was checked: %+v", s)
	}
}
