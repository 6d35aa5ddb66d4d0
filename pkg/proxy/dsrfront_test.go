package proxy

import (
	"context"
	"fmt"
	"net"
	"net/netip"
	"testing"
	"time"

	"go.uber.org/zap/zaptest"

	"github.com/lbctl/lbctl/test/topo"
)

// startDSR starts a DSR front end on the LB of tp at listen.
func startDSR(t *testing.T, tp *topo.Topology, listen netip.AddrPort, ups []netip.AddrPort, algorithm string) *DSR {
	t.Helper()
	var pu []Upstream
	for _, u := range ups {
		pu = append(pu, Upstream{Addr: u, Weight: 1})
	}
	pool, err := NewPool(pu, algorithm, true)
	if err != nil {
		t.Fatal(err)
	}
	d := NewDSR(Service{Name: "dns", Listen: listen}, pool, zaptest.NewLogger(t))
	if err := tp.LB.Do(d.Start); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		if err := d.Stop(context.Background()); err != nil {
			t.Error(err)
		}
	})
	return d
}

// clientConn opens a UDP socket on the client of tp.
func clientConn(t *testing.T, tp *topo.Topology, local netip.AddrPort) *net.UDPConn {
	t.Helper()
	var c *net.UDPConn
	if err := tp.Client.Do(func() (err error) {
		c, err = net.ListenUDP("udp", net.UDPAddrFromAddrPort(local))
		return err
	}); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Close() })
	return c
}

// TestDSRFrontend: datagrams sent by the client to the VIP reach the
// upstreams from the client's address:port — round robin in turn, hash
// keeping each client address:port on one upstream — for IPv4 and IPv6.
func TestDSRFrontend(t *testing.T) {
	tp := topo.Start(t, topo.Options{LBForward: true})
	for _, fam := range []struct {
		name        string
		vip, client netip.Addr
		backend     func(int) netip.Addr
	}{
		{"ipv4", topo.VIP4, topo.Client4, topo.Backend4},
		{"ipv6", topo.VIP6, topo.Client6, topo.Backend6},
	} {
		t.Run(fam.name, func(t *testing.T) {
			var ups []netip.AddrPort
			var recv []<-chan received
			for i := range tp.Backends {
				u := netip.AddrPortFrom(fam.backend(i+1), 5300)
				ups = append(ups, u)
				recv = append(recv, listenOn(t, tp.Backends[i], u))
			}
			vip := netip.AddrPortFrom(fam.vip, 5300)
			d := startDSR(t, tp, vip, ups, "round_robin")
			src := netip.AddrPortFrom(fam.client, 40000)
			c := clientConn(t, tp, src)

			// Round robin: datagram k goes to upstream k mod 4 (one
			// datagram at a time, so the order is the sending order).
			start := -1
			for k := 0; k < 8; k++ {
				msg := fmt.Sprintf("rr %d", k)
				if _, err := c.WriteToUDPAddrPort([]byte(msg), vip); err != nil {
					t.Fatal(err)
				}
				got := -1
				var r received
				select {
				case r = <-recv[0]:
					got = 0
				case r = <-recv[1]:
					got = 1
				case r = <-recv[2]:
					got = 2
				case r = <-recv[3]:
					got = 3
				case <-time.After(10 * time.Second):
					t.Fatalf("datagram %d reached no upstream", k)
				}
				if r != (received{src, msg}) {
					t.Errorf("upstream %d got %v, want %q from %s", got, r, msg, src)
				}
				if start < 0 {
					start = got
				}
				if got != (start+k)%4 {
					t.Errorf("datagram %d went to upstream %d, want %d: not in turn", k, got, (start+k)%4)
				}
			}
			// The counters move after sendmmsg returns, which may be after
			// the upstream already has the datagram: wait for them.
			for deadline := time.Now().Add(10 * time.Second); time.Now().Before(deadline); time.Sleep(10 * time.Millisecond) {
				if d.Stats().Accepted == 8 && d.DSRStats().Sent.Load() == 8 {
					break
				}
			}
			st := d.Stats()
			if st.Accepted != 8 || st.Failed != 0 || st.BytesIn == 0 || d.DSRStats().Sent.Load() != 8 {
				t.Errorf("stats %+v, sent %d; want 8 accepted", st, d.DSRStats().Sent.Load())
			}
			for i, u := range d.Pool().Snapshot() {
				if u.Total != 2 || u.Active != 0 {
					t.Errorf("upstream %d: total %d active %d, want 2 and 0", i, u.Total, u.Active)
				}
			}
		})
	}
}

// TestDSRFrontendHash: with balance hash every datagram of one client
// address:port goes to one upstream, and the ports of one client address
// spread over several upstreams (the key includes the port).
func TestDSRFrontendHash(t *testing.T) {
	tp := topo.Start(t, topo.Options{LBForward: true})
	var ups []netip.AddrPort
	var recv []<-chan received
	for i := range tp.Backends {
		u := netip.AddrPortFrom(topo.Backend4(i+1), 5300)
		ups = append(ups, u)
		recv = append(recv, listenOn(t, tp.Backends[i], u))
	}
	vip := netip.AddrPortFrom(topo.VIP4, 5300)
	startDSR(t, tp, vip, ups, "hash")
	const ports, each = 16, 3
	for p := 0; p < ports; p++ {
		src := netip.AddrPortFrom(topo.Client4, uint16(41000+p))
		c := clientConn(t, tp, src)
		for k := 0; k < each; k++ {
			if _, err := c.WriteToUDPAddrPort([]byte(fmt.Sprintf("%d/%d", p, k)), vip); err != nil {
				t.Fatal(err)
			}
		}
	}
	where := map[netip.AddrPort]map[int]int{} // client -> upstream -> datagrams
	for n := 0; n < ports*each; n++ {
		var r received
		got := -1
		select {
		case r = <-recv[0]:
			got = 0
		case r = <-recv[1]:
			got = 1
		case r = <-recv[2]:
			got = 2
		case r = <-recv[3]:
			got = 3
		case <-time.After(10 * time.Second):
			t.Fatalf("%d of %d datagrams arrived", n, ports*each)
		}
		if where[r.from] == nil {
			where[r.from] = map[int]int{}
		}
		where[r.from][got]++
	}
	used := map[int]bool{}
	for c, m := range where {
		if len(m) != 1 {
			t.Errorf("client %s was spread over upstreams %v", c, m)
		}
		for u := range m {
			used[u] = true
		}
	}
	if len(where) != ports || len(used) < 2 {
		t.Errorf("%d clients over %d upstreams; want %d clients over several", len(where), len(used), ports)
	}
}
