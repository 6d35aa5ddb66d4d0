package proxy

import (
	"bufio"
	"context"
	"errors"
	"fmt"
	"net"
	"net/netip"
	"strings"
	"testing"
	"time"

	"github.com/lbctl/lbctl/test/testenv"
	"github.com/lbctl/lbctl/test/topo"
)

func TestTransparentRefusals(t *testing.T) {
	up := netip.MustParseAddrPort("198.19.16.11:80")
	d := NewTransparentDialer([]netip.AddrPort{up}, "")
	client := netip.MustParseAddrPort("198.18.99.1:40000")
	ctx := context.Background()
	for _, to := range []netip.AddrPort{
		netip.MustParseAddrPort("198.19.16.12:80"), // another host
		netip.MustParseAddrPort("198.19.16.11:81"), // another port
		netip.MustParseAddrPort("198.18.98.10:80"),
	} {
		if _, err := d.DialTCP(ctx, client, to); !errors.Is(err, ErrNotUpstream) {
			t.Errorf("DialTCP to %s: %v, want ErrNotUpstream", to, err)
		}
		if _, err := d.DialUDP(client, to); !errors.Is(err, ErrNotUpstream) {
			t.Errorf("DialUDP to %s: %v, want ErrNotUpstream", to, err)
		}
	}
	if _, err := d.DialTCP(ctx, netip.MustParseAddrPort("[2001:db8:99::1]:40000"), up); err == nil || !strings.Contains(err.Error(), "different IP families") {
		t.Errorf("IPv6 client to IPv4 upstream: %v", err)
	}
	d.SetUpstreams(nil)
	if _, err := d.DialUDP(client, up); !errors.Is(err, ErrNotUpstream) {
		t.Errorf("after SetUpstreams(nil): %v, want ErrNotUpstream", err)
	}
}

// serveEcho makes backend answer every TCP connection and UDP datagram on
// port with the peer's address:port as it sees it.
func serveEcho(t *testing.T, h *topo.Host, addr netip.Addr, port uint16) {
	t.Helper()
	ap := netip.AddrPortFrom(addr, port)
	if err := h.Do(func() error {
		ln, err := net.ListenTCP("tcp", net.TCPAddrFromAddrPort(ap))
		if err != nil {
			return err
		}
		pc, err := net.ListenUDP("udp", net.UDPAddrFromAddrPort(ap))
		if err != nil {
			ln.Close()
			return err
		}
		t.Cleanup(func() { ln.Close(); pc.Close() })
		go func() {
			for {
				c, err := ln.Accept()
				if err != nil {
					return
				}
				fmt.Fprintf(c, "%s\n", c.RemoteAddr())
				c.Close()
			}
		}()
		go func() {
			b := make([]byte, 64)
			for {
				_, from, err := pc.ReadFromUDPAddrPort(b)
				if err != nil {
					return
				}
				pc.WriteToUDPAddrPort([]byte(from.String()), from)
			}
		}()
		return nil
	}); err != nil {
		t.Fatal(err)
	}
}

// TestTransparentDialer: in the seed's topology, with replies from the
// backend LAN delivered locally on the LB by a source-based policy rule
// (standing in for steer + fwmark, which pkg/daemon's tests use), the
// upstream sees the client's address and port; a second socket for the
// same 4-tuple falls back to another port; UDP too; IPv4 and IPv6.
func TestTransparentDialer(t *testing.T) {
	tp := topo.Start(t, topo.Options{Backends: 1})
	lb, b1 := tp.LB, tp.Backends[0]
	for _, args := range [][]string{
		{"rule", "add", "from", "198.19.16.0/24", "iif", "eth1", "lookup", "100"},
		{"route", "add", "local", "default", "dev", "lo", "table", "100"},
		{"-6", "rule", "add", "from", "2001:db8:16::/64", "iif", "eth1", "lookup", "100"},
		{"-6", "route", "add", "local", "default", "dev", "lo", "table", "100"},
	} {
		if _, err := lb.Run("ip", args...); err != nil {
			t.Fatal(err)
		}
	}
	for _, fam := range []struct {
		up, client netip.Addr
	}{{topo.Backend4(1), topo.Client4}, {topo.Backend6(1), topo.Client6}} {
		up, up2 := netip.AddrPortFrom(fam.up, 8080), netip.AddrPortFrom(fam.up, 8082)
		serveEcho(t, b1, fam.up, 8080)
		serveEcho(t, b1, fam.up, 8082)
		d := NewTransparentDialer([]netip.AddrPort{up, up2}, "")
		client := netip.AddrPortFrom(fam.client, 40000)
		other := netip.AddrPortFrom(fam.client, 40001)
		err := lb.Do(func() error {
			ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
			defer cancel()
			read := func(c net.Conn) string {
				c.SetReadDeadline(time.Now().Add(10 * time.Second))
				s, _ := bufio.NewReader(c).ReadString('\n')
				return strings.TrimSpace(s)
			}
			c1, err := d.DialTCP(ctx, client, up)
			if err != nil {
				return fmt.Errorf("dial tcp: %w", err)
			}
			defer c1.Close()
			if got := read(c1); got != client.String() {
				t.Errorf("tcp: upstream saw %q, want %s", got, client)
			}
			// The same client address:port again while c1 holds the
			// 4-tuple (TIME_WAIT or not): another port.
			c2, err := d.DialTCP(ctx, client, up)
			if err != nil {
				return fmt.Errorf("second dial tcp: %w", err)
			}
			defer c2.Close()
			got2 := read(c2)
			gap, perr := netip.ParseAddrPort(got2)
			if perr != nil || gap.Addr() != client.Addr() || gap.Port() == client.Port() {
				t.Errorf("tcp, 4-tuple taken: upstream saw %q, want %s with another port", got2, client.Addr())
			}
			// Another client behind the same address: its own port.
			c3, err := d.DialTCP(ctx, other, up)
			if err != nil {
				return fmt.Errorf("dial tcp from %s: %w", other, err)
			}
			defer c3.Close()
			if got := read(c3); got != other.String() {
				t.Errorf("tcp: upstream saw %q, want %s", got, other)
			}
			if d.SamePort.Load() != 2 || d.OtherPort.Load() != 1 {
				t.Errorf("same port %d, other port %d; want 2, 1", d.SamePort.Load(), d.OtherPort.Load())
			}

			u, err := d.DialUDP(client, up)
			if err != nil {
				return fmt.Errorf("dial udp: %w", err)
			}
			defer d.ReleaseUDP(u, up, true)
			u2, err := d.DialUDP(client, up)
			if err != nil {
				return fmt.Errorf("second dial udp: %w", err)
			}
			for i, c := range []*net.UDPConn{u, u2} {
				if _, err := c.Write([]byte("q")); err != nil {
					return err
				}
				b := make([]byte, 64)
				c.SetReadDeadline(time.Now().Add(10 * time.Second))
				n, err := c.Read(b)
				if err != nil {
					return fmt.Errorf("udp %d: read: %w", i, err)
				}
				got, _ := netip.ParseAddrPort(string(b[:n]))
				if got.Addr() != client.Addr() || (i == 0) != (got.Port() == client.Port()) {
					t.Errorf("udp socket %d: upstream saw %s (client %s)", i, got, client)
				}
			}
			// A clean session's socket is the client's next one to that upstream.
			d.ReleaseUDP(u, up, true)
			again, err := d.DialUDP(client, up)
			if err != nil {
				return fmt.Errorf("dial udp after release: %w", err)
			}
			if again != u {
				t.Errorf("udp: a new socket after a clean release, want the kept one")
			}
			u = again
			if _, err := u.Write([]byte("q")); err != nil {
				return err
			}
			b := make([]byte, 64)
			u.SetReadDeadline(time.Now().Add(10 * time.Second))
			if n, err := u.Read(b); err != nil || string(b[:n]) != client.String() {
				t.Errorf("udp on the kept socket: %q, %v", b[:n], err)
			}
			// While u holds the client's port, a kept socket on another
			// port serves the client's next session (no failed bind first).
			d.ReleaseUDP(u2, up, true)
			other, err := d.DialUDP(client, up)
			if err != nil {
				return fmt.Errorf("dial udp while the port is busy: %w", err)
			}
			if other != u2 {
				t.Errorf("udp: port busy: got a new socket, want the kept one on another port")
			}
			d.ReleaseUDP(other, up, false)

			// The client's next session goes to another upstream: the
			// kept socket is connected anew, still on the client's port.
			d.ReleaseUDP(u, up, true)
			to2, err := d.DialUDP(client, up2)
			if err != nil {
				return fmt.Errorf("dial udp to the second upstream: %w", err)
			}
			defer d.ReleaseUDP(to2, up2, false)
			if to2 != u {
				t.Errorf("udp to another upstream: a new socket, want the kept one reconnected")
			}
			if _, err := to2.Write([]byte("q")); err != nil {
				return err
			}
			to2.SetReadDeadline(time.Now().Add(10 * time.Second))
			if n, err := to2.Read(b); err != nil || string(b[:n]) != client.String() {
				t.Errorf("udp on the reconnected socket: %q, %v (want the second upstream to see %s)", b[:n], err, client)
			}
			return nil
		})
		if err != nil {
			t.Error(err)
		}
	}
}

// TestTransparentIdleUDPBound: at most IdleUDP sockets are kept, the
// oldest closed first; a dirty release closes; Close closes the rest.
func TestTransparentIdleUDPBound(t *testing.T) {
	testenv.RequireNetns(t)
	up := netip.AddrPortFrom(lo4, 9) // connected, never sent to
	d := NewTransparentDialer([]netip.AddrPort{up}, "")
	d.IdleUDP = 2
	var conns []*net.UDPConn
	for range 4 {
		c, err := net.DialUDP("udp", nil, net.UDPAddrFromAddrPort(up))
		if err != nil {
			t.Fatal(err)
		}
		conns = append(conns, c)
	}
	closed := func(c *net.UDPConn) bool { return c.SetDeadline(time.Time{}) != nil }
	d.ReleaseUDP(conns[0], up, true)
	d.ReleaseUDP(conns[1], up, true)
	d.ReleaseUDP(conns[2], up, true)
	if !closed(conns[0]) || closed(conns[1]) || closed(conns[2]) || len(d.idle) != 2 {
		t.Errorf("after 3 clean releases with IdleUDP 2: closed %v %v %v, kept %d", closed(conns[0]), closed(conns[1]), closed(conns[2]), len(d.idle))
	}
	d.ReleaseUDP(conns[3], up, false)
	if !closed(conns[3]) {
		t.Errorf("a dirty release kept the socket")
	}
	d.Close()
	if !closed(conns[1]) || !closed(conns[2]) || len(d.idle) != 0 {
		t.Errorf("Close left sockets open")
	}
}
