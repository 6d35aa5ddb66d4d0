package main

import (
	"fmt"
	"net"
	"net/netip"
	"sort"
	"strings"
	"testing"
	"time"

	"go.uber.org/zap"

	"github.com/lbctl/lbctl/test/testenv"
)

// TestUDPBatcherBurst sends bursts from several sockets before reading
// anything, so recvmmsg gets full batches from mixed sources: every
// datagram must come back to its own sender, whatever its size (empty, a
// DNS-sized one, one larger than the answer buffer udpOut).
func TestUDPBatcherBurst(t *testing.T) {
	testenv.RequireNetns(t)
	for _, a := range []netip.Addr{testenv.Addr4, testenv.Addr6} {
		t.Run(a.String(), func(t *testing.T) {
			srv, err := net.ListenUDP("udp", net.UDPAddrFromAddrPort(netip.AddrPortFrom(a, 0)))
			must(t, err)
			must(t, srv.SetReadBuffer(4<<20))
			done := make(chan struct{})
			go func() { defer close(done); serveUDP(zap.NewNop(), srv, echo) }()
			defer func() { srv.Close(); <-done }()

			const clients, perClient = 3, 3 * udpBatch
			sizes := []int{0, 40, 512, udpOut + 1000, 9000}
			var conns []*net.UDPConn
			want := make([][]string, clients)
			for c := range clients {
				cc, err := net.DialUDP("udp", nil, srv.LocalAddr().(*net.UDPAddr))
				must(t, err)
				defer cc.Close()
				must(t, cc.SetReadBuffer(4<<20))
				conns = append(conns, cc)
				for i := range perClient {
					msg := ""
					if size := sizes[i%len(sizes)]; size > 0 {
						msg = fmt.Sprintf("c%d-%d:", c, i)
						msg += strings.Repeat("x", max(0, size-len(msg)))
					}
					want[c] = append(want[c], msg)
					if _, err := cc.Write([]byte(msg)); err != nil {
						t.Fatal(err)
					}
				}
			}
			buf := make([]byte, udpMax)
			for c, cc := range conns {
				var got []string
				_ = cc.SetReadDeadline(time.Now().Add(3 * time.Second))
				for range perClient {
					n, err := cc.Read(buf)
					if err != nil {
						t.Fatalf("client %d: %d of %d answers, then %v", c, len(got), perClient, err)
					}
					got = append(got, string(buf[:n]))
				}
				sort.Strings(got)
				sort.Strings(want[c])
				if fmt.Sprint(got) != fmt.Sprint(want[c]) {
					t.Errorf("client %d got other datagrams than it sent", c)
				}
			}
		})
	}
}
