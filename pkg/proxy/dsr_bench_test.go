package proxy

import (
	"fmt"
	"net"
	"net/netip"
	"testing"

	"golang.org/x/sys/unix"

	"github.com/lbctl/lbctl/test/topo"
)

// BenchmarkDSRSend compares the two ways to send a client datagram from the
// client's address:port, per datagram (ns/op is per datagram), inside the
// LB namespace of the test topology towards a backend that reads and
// discards:
//
//   - raw-sendmmsg: what lbctl uses; IP+UDP headers built in Go, batches of
//     32 through one sendmmsg on an IPPROTO_RAW socket.
//   - transparent-socket: a UDP socket per datagram, IP_TRANSPARENT, bound
//     to the client's address:port, sendto, close (what nginx's
//     proxy_bind $remote_addr:$remote_port transparent does per session).
//
// It needs root; numbers in docs/dsr.md.
func BenchmarkDSRSend(b *testing.B) {
	tp := topo.Start(b, topo.Options{Backends: 1})
	payload := make([]byte, 40) // a DNS query for www.example.com is ~33 bytes
	for _, fam := range []struct {
		name    string
		v6      bool
		client  netip.Addr
		backend netip.Addr
	}{
		{"v4", false, topo.Client4, topo.Backend4(1)},
		{"v6", true, topo.Client6, topo.Backend6(1)},
	} {
		up := netip.AddrPortFrom(fam.backend, 5300)
		sink(b, tp.Backends[0], up)
		b.Run("raw-sendmmsg/"+fam.name, func(b *testing.B) {
			s := newSenderOn(b, tp.LB, fam.v6)
			const batch = 32
			ds := make([]DSRDatagram, batch)
			for i := range ds {
				ds[i] = DSRDatagram{Client: netip.AddrPortFrom(fam.client, uint16(20000+i)), Upstream: up, Payload: payload}
			}
			b.ReportAllocs()
			b.ResetTimer()
			for i := 0; i < b.N; i += batch {
				n := min(batch, b.N-i)
				if _, err := s.Send(ds[:n]); err != nil {
					b.Fatal(err)
				}
			}
		})
		b.Run("transparent-socket/"+fam.name, func(b *testing.B) {
			err := tp.LB.Do(func() error {
				b.ReportAllocs()
				b.ResetTimer()
				for i := 0; i < b.N; i++ {
					d := DSRDatagram{Client: netip.AddrPortFrom(fam.client, uint16(20000+i%32)), Upstream: up, Payload: payload}
					if err := sendTransparent(&d); err != nil {
						return err
					}
				}
				return nil
			})
			if err != nil {
				b.Fatal(err)
			}
		})
	}
}

// sink reads and discards whatever arrives at addr on h.
func sink(tb testing.TB, h *topo.Host, addr netip.AddrPort) {
	tb.Helper()
	var conn *net.UDPConn
	if err := h.Do(func() (err error) {
		conn, err = net.ListenUDP("udp", net.UDPAddrFromAddrPort(addr))
		return err
	}); err != nil {
		tb.Fatal(err)
	}
	done := make(chan struct{})
	tb.Cleanup(func() { conn.Close(); <-done })
	go func() {
		defer close(done)
		buf := make([]byte, 2048)
		for {
			if _, _, err := conn.ReadFromUDPAddrPort(buf); err != nil {
				return
			}
		}
	}()
}

// sendTransparent sends d through a UDP socket created for it in the
// calling thread's network namespace, IP_TRANSPARENT (IPV6_TRANSPARENT) and
// bound to d.Client, then closed: the per-datagram alternative to the raw
// sender, for BenchmarkDSRSend.
func sendTransparent(d *DSRDatagram) error {
	src, dst := d.Client.Addr().Unmap(), d.Upstream.Addr().Unmap()
	fam, lvl, opt := unix.AF_INET, unix.SOL_IP, unix.IP_TRANSPARENT
	var sa, da unix.Sockaddr
	if src.Is4() {
		sa = &unix.SockaddrInet4{Addr: src.As4(), Port: int(d.Client.Port())}
		da = &unix.SockaddrInet4{Addr: dst.As4(), Port: int(d.Upstream.Port())}
	} else {
		fam, lvl, opt = unix.AF_INET6, unix.SOL_IPV6, unix.IPV6_TRANSPARENT
		sa = &unix.SockaddrInet6{Addr: src.As16(), Port: int(d.Client.Port())}
		da = &unix.SockaddrInet6{Addr: dst.As16(), Port: int(d.Upstream.Port())}
	}
	fd, err := unix.Socket(fam, unix.SOCK_DGRAM|unix.SOCK_CLOEXEC, unix.IPPROTO_UDP)
	if err != nil {
		return fmt.Errorf("transparent socket: %w", err)
	}
	defer unix.Close(fd)
	if err := unix.SetsockoptInt(fd, lvl, opt, 1); err != nil {
		return fmt.Errorf("transparent socket: set IP_TRANSPARENT: %w", err)
	}
	if err := unix.SetsockoptInt(fd, unix.SOL_SOCKET, unix.SO_REUSEADDR, 1); err != nil {
		return fmt.Errorf("transparent socket: set SO_REUSEADDR: %w", err)
	}
	if err := unix.Bind(fd, sa); err != nil {
		return fmt.Errorf("transparent socket: bind %s: %w", d.Client, err)
	}
	if err := unix.Sendto(fd, d.Payload, 0, da); err != nil {
		return fmt.Errorf("transparent socket: send to %s: %w", d.Upstream, err)
	}
	return nil
}
