package e2e

import (
	"bytes"
	"fmt"
	"io"
	"net"
	"net/netip"
	"strings"
	"testing"
	"time"

	"golang.org/x/net/dns/dnsmessage"

	"github.com/lbctl/lbctl/test/topo"
)

// proxyConfig is the seed's standard setup in mode proxy: HTTP and DNS on
// the VIP, IPv4 and IPv6, to the four backends. extra is appended to every
// service.
func proxyConfig(extra string, upstreamPorts ...int) string {
	var b strings.Builder
	b.WriteString("drain_timeout: 30s\nservices:\n")
	for _, fam := range []string{"4", "6"} {
		vip, backend := topo.VIP4, topo.Backend4
		if fam == "6" {
			vip, backend = topo.VIP6, topo.Backend6
		}
		for _, s := range []struct {
			name, proto string
			port        int
		}{{"web", "tcp", 80}, {"dns", "udp", 53}} {
			fmt.Fprintf(&b, "  - name: %s%s\n    protocol: %s\n    listen: \"%s\"\n    mode: proxy\n",
				s.name, fam, s.proto, netip.AddrPortFrom(vip, uint16(s.port)))
			if s.proto == "udp" {
				b.WriteString("    responses: 1\n    timeout: 1s\n")
			}
			b.WriteString(extra)
			b.WriteString("    upstreams:\n")
			for i := 1; i <= 4; i++ {
				fmt.Fprintf(&b, "      - \"%s\"\n", netip.AddrPortFrom(backend(i), uint16(s.port)))
			}
		}
	}
	return b.String()
}

// TCP and UDP through the front end, IPv4 and IPv6: eight requests go to
// dev1..dev4 twice in order (round robin), and the backends see the LB's
// upstream-side address (mode proxy).
func TestProxyRotation(t *testing.T) {
	h := newHarness(t, topo.Options{})
	h.startBackends(t)
	l := h.run(t, proxyConfig(""))
	for _, fam := range []struct {
		vip, lbUp netip.Addr
		typ       dnsmessage.Type
		backend   func(int) netip.Addr
	}{{topo.VIP4, topo.LBUp4, dnsmessage.TypeA, topo.Backend4}, {topo.VIP6, topo.LBUp6, dnsmessage.TypeAAAA, topo.Backend6}} {
		for k := range 8 {
			want := k%4 + 1
			body, err := h.httpGet(netip.AddrPortFrom(fam.vip, 80))
			if err != nil {
				t.Fatalf("GET %s #%d: %v", fam.vip, k, err)
			}
			prefix := fmt.Sprintf("Hello from dev%d. You connected from %s", want, netip.AddrPortFrom(fam.lbUp, 0).Addr())
			if !strings.HasPrefix(strings.ReplaceAll(body, "[", ""), prefix) {
				t.Fatalf("GET %s #%d: %q, want it to start %q", fam.vip, k, body, prefix)
			}
			got, err := h.dnsQuery(netip.AddrPortFrom(fam.vip, 53), fam.typ)
			if err != nil {
				t.Fatalf("DNS %s #%d: %v", fam.vip, k, err)
			}
			if got != fam.backend(want) {
				t.Fatalf("DNS %s #%d answered %s, want dev%d's %s", fam.vip, k, got, want, fam.backend(want))
			}
		}
	}
	l.stop(t)
}

// An upstream that refuses connections (nothing listens on its port) is
// skipped: every client request is answered, by the live ones.
func TestProxySkipsRefusingUpstream(t *testing.T) {
	h := newHarness(t, topo.Options{})
	h.startBackends(t)
	cfg := fmt.Sprintf(`services:
  - name: web
    protocol: tcp
    listen: %s
    mode: proxy
    upstreams: [%s, %s, %s]
`, netip.AddrPortFrom(topo.VIP4, 80), netip.AddrPortFrom(topo.Backend4(1), 81),
		netip.AddrPortFrom(topo.Backend4(2), 80), netip.AddrPortFrom(topo.Backend4(3), 80))
	l := h.run(t, cfg)
	seen := map[string]int{}
	for k := range 9 {
		body, err := h.httpGet(netip.AddrPortFrom(topo.VIP4, 80))
		if err != nil {
			t.Fatalf("request %d: %v (the client noticed the refusing upstream)", k, err)
		}
		seen[strings.Fields(body)[2]]++
	}
	if seen["dev2."] == 0 || seen["dev3."] == 0 || len(seen) != 2 {
		t.Fatalf("answers by %v, want dev2 and dev3 only", seen)
	}
	if !strings.Contains(l.out.String(), "upstream connect failed") {
		t.Fatalf("no connect failure logged for the refusing upstream:\n%s", l.out.String())
	}
}

// A UDP upstream that never answers: after timeout the session counts as
// an upstream failure and the query is answered by the next upstream.
func TestProxyUDPSilentUpstream(t *testing.T) {
	h := newHarness(t, topo.Options{})
	h.startBackends(t)
	silent := netip.AddrPortFrom(topo.Backend4(1), 5353)
	var hole *net.UDPConn
	in(t, h.Backends[0], func() error {
		var err error
		hole, err = net.ListenUDP("udp", net.UDPAddrFromAddrPort(silent))
		return err
	})
	received := make(chan int, 1)
	go func() { // swallow every datagram, answer none
		n := 0
		buf := make([]byte, 1500)
		for {
			if _, _, err := hole.ReadFrom(buf); err != nil {
				received <- n
				return
			}
			n++
		}
	}()
	cfg := fmt.Sprintf(`services:
  - name: dns
    protocol: udp
    listen: %s
    mode: proxy
    responses: 1
    timeout: 1s
    upstreams: [%s, %s]
`, netip.AddrPortFrom(topo.VIP4, 53), silent, netip.AddrPortFrom(topo.Backend4(2), 53))
	l := h.run(t, cfg)
	got, err := h.dnsQuery(netip.AddrPortFrom(topo.VIP4, 53), dnsmessage.TypeA)
	if err != nil {
		t.Fatal(err)
	}
	if got != topo.Backend4(2) {
		t.Fatalf("answer %s, want the next upstream's %s", got, topo.Backend4(2))
	}
	l.waitOutput(t, "upstream failed", 1)
	if out := l.out.String(); !strings.Contains(out, silent.String()) || !strings.Contains(out, "no reply within timeout") {
		t.Fatalf("failure log does not name %s and the cause:\n%s", silent, out)
	}
	hole.Close()
	if n := <-received; n != 1 {
		t.Fatalf("silent upstream got %d datagrams, want the query once", n)
	}
}

// SIGHUP with a broken config: logged, and the old config keeps serving;
// a good one then applies (the upstream set changes).
func TestProxyReload(t *testing.T) {
	h := newHarness(t, topo.Options{})
	h.startBackends(t)
	one := func(backend int) string {
		return fmt.Sprintf(`services:
  - name: web
    protocol: tcp
    listen: %s
    mode: proxy
    upstreams: [%s]
`, netip.AddrPortFrom(topo.VIP4, 80), netip.AddrPortFrom(topo.Backend4(backend), 80))
	}
	l := h.run(t, one(1))
	check := func(want string) {
		t.Helper()
		body, err := h.httpGet(netip.AddrPortFrom(topo.VIP4, 80))
		if err != nil || !strings.HasPrefix(body, "Hello from "+want+".") {
			t.Fatalf("GET: %q, %v; want %s's answer", body, err, want)
		}
	}
	check("dev1")
	if l.reload(t, "services:\n  - name: web\n    protocol: tcp\n    listen: 198.18.98.10:99999\n") {
		t.Fatal("a broken config reloaded")
	}
	if out := l.out.String(); !strings.Contains(out, "port 99999 out of range") {
		t.Fatalf("the reload failure does not say what is wrong:\n%s", out)
	}
	check("dev1")
	if !l.reload(t, one(2)) {
		t.Fatalf("a good config did not reload:\n%s", l.out.String())
	}
	check("dev2")
	l.stop(t)
}

// SIGTERM while a TCP transfer is in the middle: lbctl stops accepting,
// the open connection finishes every byte, then lbctl exits 0.
func TestProxySIGTERMDrainsTransfer(t *testing.T) {
	h := newHarness(t, topo.Options{Backends: 1})
	echo := netip.AddrPortFrom(topo.Backend4(1), 9000)
	var ln net.Listener
	in(t, h.Backends[0], func() error {
		var err error
		ln, err = net.Listen("tcp", echo.String())
		return err
	})
	t.Cleanup(func() { ln.Close() })
	go func() {
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			go func() { defer c.Close(); io.Copy(c, c) }()
		}
	}()
	vip := netip.AddrPortFrom(topo.VIP4, 9000)
	l := h.run(t, fmt.Sprintf(`drain_timeout: 60s
services:
  - name: stream
    protocol: tcp
    listen: %s
    mode: proxy
    upstreams: [%s]
`, vip, echo))

	var c net.Conn
	in(t, h.Client, func() error {
		var err error
		c, err = net.DialTimeout("tcp", vip.String(), 5*time.Second)
		return err
	})
	defer c.Close()
	c.SetDeadline(time.Now().Add(60 * time.Second))
	chunk := bytes.Repeat([]byte("lbctl-drain-"), 1<<14) // 192 KiB
	roundTrip := func(i int) {
		t.Helper()
		if _, err := c.Write(chunk); err != nil {
			t.Fatalf("chunk %d: write: %v", i, err)
		}
		got := make([]byte, len(chunk))
		if _, err := io.ReadFull(c, got); err != nil {
			t.Fatalf("chunk %d: read: %v", i, err)
		}
		if !bytes.Equal(got, chunk) {
			t.Fatalf("chunk %d: corrupted", i)
		}
	}
	roundTrip(0)
	l.signal(sigterm)
	l.waitOutput(t, "draining", 1)
	if _, err := h.httpGet(vip); err == nil {
		t.Fatal("a new connection was accepted while draining")
	}
	for i := 1; i <= 10; i++ {
		roundTrip(i)
	}
	select {
	case <-l.done:
		t.Fatalf("lbctl exited (%v) with a connection mid-transfer", l.err)
	default:
	}
	c.Close()
	l.stop(t) // exit status 0 after the drain
}
