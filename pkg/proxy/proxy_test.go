package proxy

import (
	"bufio"
	"context"
	"fmt"
	"io"
	"net"
	"net/netip"
	"os"
	"runtime"
	"strings"
	"sync"
	"testing"
	"time"

	"go.uber.org/goleak"
	"go.uber.org/zap"
	"go.uber.org/zap/zaptest"

	"github.com/lbctl/lbctl/test/testenv"
)

// TestMain runs the package in a private network namespace (see
// docs/testing.md): its sockets use testenv.Addr4/Addr6 on that lo.
func TestMain(m *testing.M) {
	testenv.RunInNetns()
	goleak.VerifyTestMain(m)
}

// lo4 and lo6 are the test addresses on lo in the private namespace.
var lo4, lo6 = testenv.Addr4, testenv.Addr6

// tcpBackend answers each line with "NAME LINE" and echoes raw bytes after
// a line "raw"; it closes its write side when the client does.
func tcpBackend(t *testing.T, name string) netip.AddrPort {
	t.Helper()
	testenv.RequireNetns(t)
	ln, err := net.ListenTCP("tcp", net.TCPAddrFromAddrPort(netip.AddrPortFrom(lo4, 0)))
	if err != nil {
		t.Fatal(err)
	}
	var wg sync.WaitGroup
	t.Cleanup(func() { ln.Close(); wg.Wait() })
	wg.Go(func() {
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			wg.Go(func() {
				defer c.Close()
				r := bufio.NewReader(c)
				for {
					line, err := r.ReadString('\n')
					if err != nil {
						return
					}
					if line == "drip\n" { // 15 bytes, 100ms apart, then silence
						for range 15 {
							time.Sleep(100 * time.Millisecond)
							if _, err := c.Write([]byte{'.'}); err != nil {
								return
							}
						}
						io.Copy(io.Discard, c)
						return
					}
					if line == "raw\n" { // echo the rest, then half-close back
						io.Copy(c, r)
						c.(*net.TCPConn).CloseWrite()
						io.Copy(io.Discard, c)
						return
					}
					fmt.Fprintf(c, "%s %s", name, line)
				}
			})
		}
	})
	return ln.Addr().(*net.TCPAddr).AddrPort()
}

// closedPort returns an address where nothing listens (connections refused).
func closedPort(t *testing.T, network string) netip.AddrPort {
	t.Helper()
	testenv.RequireNetns(t)
	if network == "tcp" {
		ln, err := net.ListenTCP("tcp", net.TCPAddrFromAddrPort(netip.AddrPortFrom(lo4, 0)))
		if err != nil {
			t.Fatal(err)
		}
		a := ln.Addr().(*net.TCPAddr).AddrPort()
		ln.Close()
		return a
	}
	c, err := net.ListenUDP("udp", net.UDPAddrFromAddrPort(netip.AddrPortFrom(lo4, 0)))
	if err != nil {
		t.Fatal(err)
	}
	a := c.LocalAddr().(*net.UDPAddr).AddrPort()
	c.Close()
	return a
}

func pool(t *testing.T, alg string, addrs ...netip.AddrPort) *Pool {
	t.Helper()
	ups := make([]Upstream, len(addrs))
	for i, a := range addrs {
		ups[i] = Upstream{Addr: a, Weight: 1}
	}
	p, err := NewPool(ups, alg, false)
	if err != nil {
		t.Fatal(err)
	}
	return p
}

func startTCP(t *testing.T, svc Service, p *Pool) *TCP {
	t.Helper()
	testenv.RequireNetns(t)
	if !svc.Listen.IsValid() {
		svc.Listen = netip.AddrPortFrom(lo4, 0)
	}
	if svc.Name == "" {
		svc.Name = "test"
	}
	f := NewTCP(svc, p, &ProxyDialer{}, zaptest.NewLogger(t, zaptest.Level(zap.WarnLevel)))
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

func ask(t *testing.T, addr netip.AddrPort, line string) string {
	t.Helper()
	c, err := net.Dial("tcp", addr.String())
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	c.SetDeadline(time.Now().Add(10 * time.Second))
	fmt.Fprintf(c, "%s\n", line)
	got, err := bufio.NewReader(c).ReadString('\n')
	if err != nil {
		t.Fatalf("read reply to %q: %v", line, err)
	}
	return strings.TrimSpace(got)
}

func TestTCPRoundRobin(t *testing.T) {
	var addrs []netip.AddrPort
	for i := range 4 {
		addrs = append(addrs, tcpBackend(t, fmt.Sprintf("dev%d", i+1)))
	}
	f := startTCP(t, Service{}, pool(t, "round_robin", addrs...))
	var got []string
	for range 8 {
		got = append(got, strings.Fields(ask(t, f.Addr(), "hi"))[0])
	}
	want := "dev1 dev2 dev3 dev4 dev1 dev2 dev3 dev4"
	if strings.Join(got, " ") != want {
		t.Fatalf("answers %v, want %s", got, want)
	}
	waitFor(t, "connections closed", func() bool { return f.Stats().Active == 0 })
	if s := f.Stats(); s.Accepted != 8 || s.Failed != 0 {
		t.Fatalf("stats %+v, want 8 accepted, none failed", s)
	}
}

func TestTCPSkipsRefusingUpstream(t *testing.T) {
	dead := closedPort(t, "tcp")
	p := pool(t, "round_robin", dead, tcpBackend(t, "dev2"), tcpBackend(t, "dev3"))
	f := startTCP(t, Service{}, p)
	for i := range 6 {
		if got := ask(t, f.Addr(), "hi"); !strings.HasSuffix(got, " hi") {
			t.Fatalf("connection %d: reply %q", i, got)
		}
	}
	snap := p.Snapshot()
	if snap[0].Failures == 0 || snap[0].Successes != 0 {
		t.Fatalf("refusing upstream: %+v, want failures and no success", snap[0])
	}
	if snap[1].Successes+snap[2].Successes != 6 {
		t.Fatalf("snapshot %+v: want 6 successes on the live upstreams", snap)
	}
}

func TestTCPNoUpstreamLeftClosesClient(t *testing.T) {
	p := pool(t, "round_robin", closedPort(t, "tcp"), closedPort(t, "tcp"))
	f := startTCP(t, Service{NextUpstreamTries: 2}, p)
	c, err := net.Dial("tcp", f.Addr().String())
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	c.SetDeadline(time.Now().Add(10 * time.Second))
	if n, err := c.Read(make([]byte, 1)); err != io.EOF {
		t.Fatalf("read = %d, %v; want EOF", n, err)
	}
	waitFor(t, "failed counted", func() bool { return f.Stats().Failed == 1 })
	if s := p.Snapshot(); s[0].Failures != 1 || s[1].Failures != 1 {
		t.Fatalf("snapshot %+v: want one failure each", s)
	}
}

func TestTCPHalfClose(t *testing.T) {
	f := startTCP(t, Service{}, pool(t, "round_robin", tcpBackend(t, "dev1")))
	c, err := net.DialTCP("tcp", nil, net.TCPAddrFromAddrPort(f.Addr()))
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	c.SetDeadline(time.Now().Add(10 * time.Second))
	payload := strings.Repeat("0123456789", 300000) // 3 MB: several splice chunks
	go func() {
		io.WriteString(c, "raw\n"+payload)
		c.CloseWrite() // the backend sees EOF only through a propagated half-close
	}()
	got, err := io.ReadAll(c)
	if err != nil {
		t.Fatal(err)
	}
	if string(got) != payload {
		t.Fatalf("echo: %d bytes, want %d", len(got), len(payload))
	}
}

// The upstream half-closes first, the client last: the client's last bytes
// and its FIN still reach the upstream intact, without a reset (the last
// direction's FIN comes from close, not from a shutdown).
func TestTCPHalfCloseUpstreamFirst(t *testing.T) {
	testenv.RequireNetns(t)
	ln, err := net.ListenTCP("tcp", net.TCPAddrFromAddrPort(netip.AddrPortFrom(lo4, 0)))
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	got := make(chan string, 1)
	go func() {
		c, err := ln.AcceptTCP()
		if err != nil {
			got <- err.Error()
			return
		}
		defer c.Close()
		c.SetDeadline(time.Now().Add(10 * time.Second))
		io.WriteString(c, "bye\n")
		c.CloseWrite()
		b, err := io.ReadAll(c) // the client's last words, then EOF (not a reset)
		if err != nil {
			got <- err.Error()
			return
		}
		got <- string(b)
	}()
	f := startTCP(t, Service{}, pool(t, "round_robin", ln.Addr().(*net.TCPAddr).AddrPort()))
	c, err := net.DialTCP("tcp", nil, net.TCPAddrFromAddrPort(f.Addr()))
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	c.SetDeadline(time.Now().Add(10 * time.Second))
	b, err := io.ReadAll(c)
	if err != nil || string(b) != "bye\n" {
		t.Fatalf("client read %q, %v; want \"bye\\n\" then EOF", b, err)
	}
	last := strings.Repeat("x", 100000)
	if _, err := io.WriteString(c, last); err != nil {
		t.Fatal(err)
	}
	c.CloseWrite()
	if r := <-got; r != last {
		t.Fatalf("upstream got %.40q (%d bytes), want the client's %d bytes then EOF", r, len(r), len(last))
	}
}

func TestTCPIdleTimeout(t *testing.T) {
	f := startTCP(t, Service{Timeout: 200 * time.Millisecond}, pool(t, "round_robin", tcpBackend(t, "dev1")))
	c, err := net.Dial("tcp", f.Addr().String())
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	c.SetDeadline(time.Now().Add(30 * time.Second))
	fmt.Fprintf(c, "hi\n")
	r := bufio.NewReader(c)
	if _, err := r.ReadString('\n'); err != nil {
		t.Fatal(err)
	}
	// Then silence: the proxy closes the connection (EOF), not our deadline.
	if _, err := r.ReadByte(); err != io.EOF {
		t.Fatalf("idle connection: read error %v, want EOF from the proxy", err)
	}
}

// Bytes trickling one way for longer than the idle timeout keep the
// connection open, although the other way is silent and no splice chunk
// fills; once both ways are silent the proxy closes it.
func TestTCPIdleTimeoutSpansSlowTransfer(t *testing.T) {
	f := startTCP(t, Service{Timeout: 300 * time.Millisecond}, pool(t, "round_robin", tcpBackend(t, "dev1")))
	c, err := net.Dial("tcp", f.Addr().String())
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	c.SetDeadline(time.Now().Add(30 * time.Second))
	fmt.Fprintf(c, "drip\n")
	got, err := io.ReadAll(c)
	if string(got) != strings.Repeat(".", 15) {
		t.Fatalf("slow transfer: got %q (%v), want all 15 bytes before the close", got, err)
	}
	if err != nil {
		t.Fatalf("slow transfer ended with %v, want EOF from the idle timeout", err)
	}
}

func TestTCPMaxConns(t *testing.T) {
	f := startTCP(t, Service{MaxConns: 1}, pool(t, "round_robin", tcpBackend(t, "dev1")))
	first, err := net.Dial("tcp", f.Addr().String())
	if err != nil {
		t.Fatal(err)
	}
	defer first.Close()
	first.SetDeadline(time.Now().Add(10 * time.Second))
	fmt.Fprintf(first, "hi\n")
	r := bufio.NewReader(first)
	if _, err := r.ReadString('\n'); err != nil {
		t.Fatal(err)
	}
	second, err := net.Dial("tcp", f.Addr().String())
	if err != nil {
		t.Fatal(err)
	}
	defer second.Close()
	second.SetDeadline(time.Now().Add(10 * time.Second))
	if _, err := second.Read(make([]byte, 1)); err != io.EOF {
		t.Fatalf("second connection over max_conns 1: %v, want EOF", err)
	}
	if s := f.Stats(); s.Rejected != 1 {
		t.Fatalf("stats %+v, want 1 rejected", s)
	}
	fmt.Fprintf(first, "again\n") // the first one still works
	if got, err := r.ReadString('\n'); err != nil || got != "dev1 again\n" {
		t.Fatalf("first connection after the rejection: %q, %v", got, err)
	}
}

// Stop waits for an open connection mid-transfer, then returns once the
// client is done; nothing is cut.
func TestTCPDrainWaitsForOpenConnection(t *testing.T) {
	f := startTCP(t, Service{}, pool(t, "round_robin", tcpBackend(t, "dev1")))
	c, err := net.Dial("tcp", f.Addr().String())
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	c.SetDeadline(time.Now().Add(20 * time.Second))
	r := bufio.NewReader(c)
	fmt.Fprintf(c, "one\n")
	if _, err := r.ReadString('\n'); err != nil {
		t.Fatal(err)
	}
	stopped := make(chan error, 1)
	go func() {
		ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
		defer cancel()
		stopped <- f.Stop(ctx)
	}()
	waitFor(t, "listener closed", func() bool {
		c, err := net.Dial("tcp", f.Addr().String())
		if err == nil {
			c.Close()
		}
		return err != nil
	})
	for i := range 3 {
		fmt.Fprintf(c, "during drain %d\n", i)
		if got, err := r.ReadString('\n'); err != nil || got != fmt.Sprintf("dev1 during drain %d\n", i) {
			t.Fatalf("during drain: %q, %v", got, err)
		}
	}
	select {
	case err := <-stopped:
		t.Fatalf("Stop returned (%v) while a connection was open", err)
	default:
	}
	c.Close()
	if err := <-stopped; err != nil {
		t.Fatal(err)
	}
}

func TestTCPDrainTimeoutClosesConnections(t *testing.T) {
	f := startTCP(t, Service{}, pool(t, "round_robin", tcpBackend(t, "dev1")))
	c, err := net.Dial("tcp", f.Addr().String())
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	c.SetDeadline(time.Now().Add(20 * time.Second))
	fmt.Fprintf(c, "one\n")
	r := bufio.NewReader(c)
	if _, err := r.ReadString('\n'); err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 100*time.Millisecond)
	defer cancel()
	f.Stop(ctx)
	if _, err := r.ReadByte(); err == nil {
		t.Fatal("connection still open after the drain timeout")
	}
}

// No fd survives many proxied connections and a Stop.
func TestTCPNoFDLeak(t *testing.T) {
	back := tcpBackend(t, "dev1")
	before := openFDs(t)
	f := NewTCP(Service{Name: "fd", Listen: netip.AddrPortFrom(lo4, 0)}, pool(t, "round_robin", back, closedPort(t, "tcp")), &ProxyDialer{}, zap.NewNop())
	if err := f.Start(); err != nil {
		t.Fatal(err)
	}
	for range 50 {
		ask(t, f.Addr(), "x")
	}
	if err := f.Stop(context.Background()); err != nil {
		t.Fatal(err)
	}
	// splice keeps pipes in a sync.Pool, closed by a finalizer once a GC
	// drops them: collect until they are gone.
	waitFor(t, "fds back to the start", func() bool { runtime.GC(); return openFDs(t) <= before })
}

func openFDs(t *testing.T) int {
	t.Helper()
	es, err := os.ReadDir("/proc/self/fd")
	if err != nil {
		t.Fatal(err)
	}
	return len(es)
}

// waitFor polls cond until it holds (the test's own deadline bounds it).
func waitFor(t *testing.T, what string, cond func() bool) {
	t.Helper()
	for start := time.Now(); !cond(); {
		if time.Since(start) > 20*time.Second {
			t.Fatalf("gave up waiting: %s", what)
		}
		time.Sleep(10 * time.Millisecond)
	}
}

func TestNewPoolErrors(t *testing.T) {
	if _, err := NewPool(nil, "round_robin", false); err == nil || err.Error() != "new pool: no upstreams" {
		t.Fatalf("no upstreams: %v", err)
	}
	_, err := NewPool([]Upstream{{Addr: netip.MustParseAddrPort("198.19.16.11:80"), Weight: 1}}, "rr", false)
	if err == nil || !strings.Contains(err.Error(), `unknown algorithm`) {
		t.Fatalf("bad algorithm: %v", err)
	}
}

// TestPoolPickAllocatesNothing: Pick runs once per datagram (DSR) and per
// connection or session, so it must not allocate, whatever the algorithm.
func TestPoolPickAllocatesNothing(t *testing.T) {
	ups := make([]Upstream, 4)
	for i := range ups {
		ups[i] = Upstream{Addr: netip.AddrPortFrom(netip.AddrFrom4([4]byte{198, 19, 16, byte(11 + i)}), 53), Weight: i + 1}
	}
	client := netip.MustParseAddrPort("198.18.99.1:40000")
	for _, alg := range []string{"round_robin", "least_conn", "random_two", "hash"} {
		p, err := NewPool(ups, alg, true)
		if err != nil {
			t.Fatal(err)
		}
		if n := testing.AllocsPerRun(1000, func() {
			if p.Pick(client, nil) < 0 {
				t.Fatalf("%s: no upstream picked", alg)
			}
		}); n != 0 {
			t.Errorf("%s: Pick allocates %v times per call, want 0", alg, n)
		}
	}
}
