package proxy

import (
	"context"
	"net"
	"net/netip"
	"testing"

	"github.com/lbctl/lbctl/test/topo"
)

// BenchmarkTransparentDial: one TCP connect + close to an upstream per
// iteration, from the LB namespace of the seed's topology: proxy mode's
// socket (the LB's address), a transparent socket on the client's own port,
// and a transparent socket on a kernel-chosen port (the fallback). Replies
// come back by a source-based policy rule (no steer here: this measures
// the sockets). Each iteration uses a new client port, so the client-port
// path never falls back.
func BenchmarkTransparentDial(b *testing.B) {
	tp := topo.Start(b, topo.Options{Backends: 1})
	lb, b1 := tp.LB, tp.Backends[0]
	for _, args := range [][]string{
		{"rule", "add", "from", "198.19.16.0/24", "iif", "eth1", "lookup", "100"},
		{"route", "add", "local", "default", "dev", "lo", "table", "100"},
	} {
		if _, err := lb.Run("ip", args...); err != nil {
			b.Fatal(err)
		}
	}
	up := netip.AddrPortFrom(topo.Backend4(1), 8081)
	if err := b1.Do(func() error {
		ln, err := net.ListenTCP("tcp", net.TCPAddrFromAddrPort(up))
		if err != nil {
			return err
		}
		b.Cleanup(func() { ln.Close() })
		go func() {
			for {
				c, err := ln.Accept()
				if err != nil {
					return
				}
				c.Close()
			}
		}()
		return nil
	}); err != nil {
		b.Fatal(err)
	}
	port := uint16(1024)
	for _, c := range []struct {
		name string
		d    Dialer
	}{
		{"proxy", &ProxyDialer{}},
		{"transparent/client-port", NewTransparentDialer([]netip.AddrPort{up}, "")},
		{"transparent/kernel-port", func() Dialer {
			d := NewTransparentDialer([]netip.AddrPort{up}, "")
			d.kernelPort = true
			return d
		}()},
	} {
		b.Run(c.name, func(b *testing.B) {
			err := lb.Do(func() error {
				ctx := context.Background()
				for b.Loop() {
					port++
					if port == 0 {
						port = 1024
					}
					conn, err := c.d.DialTCP(ctx, netip.AddrPortFrom(topo.Client4, port), up)
					if err != nil {
						return err
					}
					conn.Close()
				}
				return nil
			})
			if err != nil {
				b.Fatal(err)
			}
		})
	}
}
