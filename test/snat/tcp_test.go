package snat

import (
	"bytes"
	"fmt"
	"io"
	"net"
	"net/netip"
	"os"
	"path/filepath"
	"testing"
	"time"

	"github.com/lbctl/lbctl/test/topo"
)

// replySize is the size of the TCP reply: many segments, several windows.
const replySize = 200_000

// steerVIP makes the LB send the client's TCP segments for VIP:80 to
// backend 1 by rewriting their destination, statelessly, before routing (a
// stand-in for the DSR/XDP data plane that is not there yet): an nftables
// `ip daddr set` in the prerouting hook, without conntrack, so that the LB
// keeps no state and never needs to see a reply. The client's socket is
// connected to VIP:80, so its handshake only completes if the backend's
// SYN-ACK leaves with VIP:80 as its source: the snat rewrite.
func steerVIP(t *testing.T, lb *topo.Host, f family) {
	t.Helper()
	table := "lbtest_" + f.name
	l3 := "ip"
	if f.vip.Is6() {
		l3 = "ip6"
	}
	rules := fmt.Sprintf(`table inet %s {
	chain pre {
		type filter hook prerouting priority raw; policy accept;
		iifname "eth0" %s daddr %s tcp dport 80 notrack %s daddr set %s
	}
}
`, table, l3, f.vip, l3, f.backend(1))
	file := filepath.Join(t.TempDir(), table+".nft")
	if err := os.WriteFile(file, []byte(rules), 0o644); err != nil {
		t.Fatal(err)
	}
	run(t, lb, "nft", "-f", file)
	t.Cleanup(func() {
		if _, err := lb.Run("nft", "delete", "table", "inet", table); err != nil {
			t.Errorf("lb: %v", err)
		}
	})
}

// testTCP sends replySize bytes from backend 1 port 80 to a client
// connected to VIP:80 and checks them. repliesCrossLB false (origin NAT)
// also checks that the LB's client-facing interface did not send them.
func testTCP(t *testing.T, tp *topo.Topology, f family, repliesCrossLB bool, natHosts []*topo.Host) {
	steerVIP(t, tp.LB, f)
	backend := tp.Backends[0]
	var ln net.Listener
	if err := backend.Do(func() error {
		var err error
		ln, err = net.Listen("tcp", ap(f.backend(1), 80))
		return err
	}); err != nil {
		t.Fatalf("backend1: listen: %v", err)
	}
	payload := make([]byte, replySize)
	for i := range payload {
		payload[i] = byte(i % 251)
	}
	type served struct {
		remote netip.AddrPort
		err    error
	}
	done := make(chan served, 1)
	go func() {
		conn, err := ln.Accept()
		if err != nil {
			done <- served{err: err}
			return
		}
		defer conn.Close()
		_ = conn.SetDeadline(time.Now().Add(60 * time.Second))
		_, err = conn.Write(payload)
		done <- served{remote: conn.RemoteAddr().(*net.TCPAddr).AddrPort(), err: err}
	}()
	t.Cleanup(func() {
		ln.Close()
		<-done
	})

	rewritten0 := sum(t, natHosts, "rewritten")
	lbTx0 := linkStat(t, tp.LB, "eth0", "tx_bytes")
	var conn net.Conn
	vip := ap(f.vip, 80)
	if err := tp.Client.Do(func() error {
		d := net.Dialer{Timeout: 10 * time.Second}
		var err error
		conn, err = d.Dial("tcp", vip)
		return err
	}); err != nil {
		t.Fatalf("client: connect to %s: %v (SYN-ACK not rewritten to the VIP?)", vip, err)
	}
	defer conn.Close()
	_ = conn.SetDeadline(time.Now().Add(60 * time.Second))
	got, err := io.ReadAll(conn)
	if err != nil {
		t.Fatalf("client: read from %s after %d bytes: %v", vip, len(got), err)
	}
	if !bytes.Equal(got, payload) {
		t.Fatalf("client: got %d bytes from %s, want the %d bytes the backend sent", len(got), vip, len(payload))
	}
	s := <-done
	done <- s // for the cleanup
	if s.err != nil {
		t.Fatalf("backend1: %v", s.err)
	}
	local := conn.LocalAddr().(*net.TCPAddr).AddrPort()
	if s.remote.Addr().Unmap() != local.Addr().Unmap() || s.remote.Port() != local.Port() {
		t.Errorf("backend saw the connection come from %s, want the client's %s", s.remote, local)
	}
	if d := sum(t, natHosts, "rewritten") - rewritten0; d < 2 {
		t.Errorf("snat rewrote %d packets, want at least the SYN-ACK and the data", d)
	}
	if d := linkStat(t, tp.LB, "eth0", "tx_bytes") - lbTx0; !repliesCrossLB && d >= replySize/10 {
		t.Errorf("LB eth0 sent %d bytes towards the client during a %d-byte origin-NAT reply: the reply crossed the LB", d, replySize)
	} else if repliesCrossLB && d < replySize {
		t.Errorf("LB eth0 sent %d bytes, want at least the %d-byte reply it routes", d, replySize)
	}
}
