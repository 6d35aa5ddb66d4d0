package dataplane

import (
	"errors"
	"fmt"
	"net"
	"net/netip"
	"strings"
	"sync"
	"testing"
	"time"

	"go.uber.org/zap"

	"github.com/lbctl/lbctl/test/testenv"
	"github.com/lbctl/lbctl/test/topo"
)

// echoBackends starts, on each backend, a UDP server on port that answers
// "BACKEND saw CLIENT" (CLIENT: the source address the datagram arrived
// with), until the test ends.
func echoBackends(t *testing.T, tp *topo.Topology, port uint16) {
	t.Helper()
	var wg sync.WaitGroup
	t.Cleanup(wg.Wait) // after the sockets are closed (cleanups run last first)
	for _, b := range tp.Backends {
		var conns []*net.UDPConn
		err := b.Do(func() error {
			for _, a := range []netip.Addr{b.V4, b.V6} {
				c, err := net.ListenUDP("udp", net.UDPAddrFromAddrPort(netip.AddrPortFrom(a, port)))
				if err != nil {
					return err
				}
				conns = append(conns, c)
			}
			return nil
		})
		if err != nil {
			t.Fatalf("backend %s: %v", b.Role, err)
		}
		for _, c := range conns {
			wg.Add(1)
			go func() {
				defer wg.Done()
				buf := make([]byte, 1500)
				for {
					n, from, err := c.ReadFromUDPAddrPort(buf)
					if err != nil {
						return
					}
					_ = n
					msg := fmt.Sprintf("%s saw %s", c.LocalAddr().(*net.UDPAddr).AddrPort().Addr(), from.Addr())
					c.WriteToUDPAddrPort([]byte(msg), from)
				}
			}()
			t.Cleanup(func() { c.Close() })
		}
	}
}

// query sends one datagram from a fresh socket on the client to dst and
// returns the answer and where it came from (retrying a lost one a few
// times: the first packets may wait for neighbour resolution).
func query(t *testing.T, h *topo.Host, dst netip.AddrPort) (string, netip.AddrPort) {
	t.Helper()
	var c *net.UDPConn
	if err := h.Do(func() error {
		var err error
		c, err = net.ListenUDP("udp", nil)
		return err
	}); err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	buf := make([]byte, 1500)
	for try := 0; try < 5; try++ {
		if _, err := c.WriteToUDPAddrPort([]byte("q"), dst); err != nil {
			t.Fatal(err)
		}
		c.SetReadDeadline(time.Now().Add(500 * time.Millisecond))
		n, from, err := c.ReadFromUDPAddrPort(buf)
		if err == nil {
			return string(buf[:n]), netip.AddrPortFrom(from.Addr().Unmap(), from.Port())
		}
		if !errors.Is(err, errTimeout(err)) {
			t.Fatal(err)
		}
	}
	t.Fatalf("no answer from %s after 5 tries", dst)
	return "", netip.AddrPort{}
}

func errTimeout(err error) error {
	var ne net.Error
	if errors.As(err, &ne) && ne.Timeout() {
		return err
	}
	return nil
}

// TestXDPForwarding sends real UDP through xdp_lb on the topology's LB
// (router NAT: replies come back through the LB's snat), in native and in
// generic mode, for both families: every backend answers, each sees the
// client's own address, the answers come from the VIP, and the program
// counts the packets it redirected. A second Open adopts the pinned
// service (same generation) and a re-attach keeps forwarding.
func TestXDPForwarding(t *testing.T) {
	testenv.RequireCommand(t, "ethtool")
	for _, mode := range []XDPMode{XDPNative, XDPGeneric} {
		t.Run(string(mode), func(t *testing.T) {
			tp := topo.Start(t, topo.Options{LBForward: true})
			// veth: the sender's checksum offload would leave a partial
			// checksum XDP cannot see (a NIC receives full checksums);
			// native redirect into a veth needs NAPI on its peer (GRO).
			if _, err := tp.Client.Run("ethtool", "-K", "eth0", "tx", "off"); err != nil {
				t.Fatal(err)
			}
			if _, err := tp.Switch.Run("ethtool", "-K", "p0", "gro", "on"); err != nil {
				t.Fatal(err)
			}
			const port = 5353
			echoBackends(t, tp, port)
			table := make([]int, XDPTableSize)
			for i := range table {
				table[i] = i % len(tp.Backends)
			}
			vips := []netip.AddrPort{netip.AddrPortFrom(topo.VIP4, port), netip.AddrPortFrom(topo.VIP6, port)}
			err := tp.LB.Do(func() error {
				d, err := Open(Options{Root: tp.LB.BPFFS, Log: zap.NewNop()})
				if err != nil {
					return err
				}
				defer d.Close()
				if _, err := d.AttachSNAT("eth0"); err != nil {
					return err
				}
				if got, err := d.AttachXDP("eth0", mode); err != nil || got != mode {
					return fmt.Errorf("attach xdp %s: got %q, %v", mode, got, err)
				}
				for _, vip := range vips {
					var bs []netip.AddrPort
					src := netip.MustParsePrefix("198.19.16.0/24")
					if vip.Addr().Is6() {
						src = netip.MustParsePrefix("2001:db8:16::/64")
					}
					for _, b := range tp.Backends {
						a := b.V4
						if vip.Addr().Is6() {
							a = b.V6
						}
						bs = append(bs, netip.AddrPortFrom(a, port))
					}
					if _, err := d.SetXDPService(XDPService{VIP: vip, Proto: UDP}, bs, table); err != nil {
						return err
					}
					if err := d.AddSNAT(SNATRule{Src: src, Proto: UDP, SPort: port, To: vip.Addr()}); err != nil {
						return err
					}
				}
				return nil
			})
			if err != nil {
				t.Fatal(err)
			}
			check := func(stage string) {
				for _, vip := range vips {
					client := tp.Client.V4
					if vip.Addr().Is6() {
						client = tp.Client.V6
					}
					// At least 4 queries per backend: the first packet to a
					// backend finds no neighbour (fib_miss, passed to the
					// stack, which resolves it); the repeats must be
					// redirected (checked below), whichever backends the
					// hash picks first.
					seen := map[string]bool{}
					for i := 0; i < 40 && (len(seen) < len(tp.Backends) || i < 4*len(tp.Backends)); i++ {
						msg, from := query(t, tp.Client, vip)
						if from != vip {
							t.Fatalf("%s: answer from %s, want the VIP %s", stage, from, vip)
						}
						backend, saw, ok := strings.Cut(msg, " saw ")
						if !ok || saw != client.String() {
							t.Fatalf("%s: backend answered %q: want it to see the client %s", stage, msg, client)
						}
						seen[backend] = true
					}
					if len(seen) != len(tp.Backends) {
						t.Errorf("%s: %s answered by %d backends (%v), want all %d", stage, vip, len(seen), seen, len(tp.Backends))
					}
				}
			}
			check("first attach")

			err = tp.LB.Do(func() error {
				d, err := Open(Options{Root: tp.LB.BPFFS, Log: zap.NewNop()})
				if err != nil {
					return err
				}
				defer d.Close()
				st, err := d.XDPServices()
				if err != nil {
					return err
				}
				if len(st) != 2 || st[0].Generation != 1 || len(st[0].Backends) != 4 || st[0].Packets == 0 {
					return fmt.Errorf("adopted services: %+v; want 2 at generation 1 with 4 backends and packets", st)
				}
				stats, err := d.Stats()
				if err != nil {
					return err
				}
				var redirected, fibMiss uint64
				for i, c := range stats.XDP {
					switch XDPCounter(i) {
					case XDPRedirected:
						redirected = c.Value
					case XDPFibMiss:
						fibMiss = c.Value
					}
				}
				if redirected == 0 {
					return fmt.Errorf("xdp counters %+v: nothing redirected", stats.XDP)
				}
				t.Logf("%s: redirected %d, fib_miss %d (first packets, before the neighbours were known)", mode, redirected, fibMiss)
				// A restarted daemon attaches again: replaced in place.
				_, err = d.AttachXDP("eth0", mode)
				return err
			})
			if err != nil {
				t.Fatal(err)
			}
			check("after adoption and re-attach")
		})
	}
}
