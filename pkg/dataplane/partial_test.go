package dataplane

import (
	"crypto/rand"
	"encoding/hex"
	"net"
	"net/netip"
	"os"
	"os/exec"
	"runtime"
	"strings"
	"testing"
	"time"

	"go.uber.org/zap/zaptest"
	"golang.org/x/sys/unix"

	"github.com/lbctl/lbctl/test/testenv"
)

// netnsCmd runs a command; every failure fails t.
func netnsCmd(t *testing.T, args ...string) {
	t.Helper()
	if out, err := exec.Command(args[0], args[1:]...).CombinedOutput(); err != nil {
		t.Fatalf("%s: %v: %s", strings.Join(args, " "), err, out)
	}
}

// inNamedNetns runs fn on a locked OS thread that joined the named network
// namespace; the thread exits with fn.
func inNamedNetns(t *testing.T, name string, fn func()) {
	t.Helper()
	done := make(chan struct{})
	go func() {
		defer close(done)
		runtime.LockOSThread()
		f, err := os.Open("/run/netns/" + name)
		if err != nil {
			t.Errorf("open netns %s: %v", name, err)
			return
		}
		defer f.Close()
		if err := unix.Setns(int(f.Fd()), unix.CLONE_NEWNET); err != nil {
			t.Errorf("setns %s: %v", name, err)
			return
		}
		fn()
	}()
	<-done
}

// TestSNATChecksumPartial checks the CHECKSUM_PARTIAL case that
// BPF_PROG_TEST_RUN cannot express. A socket on host "a" sends UDP out of
// a veth with tx checksum offload on, so the skb reaches snat (tcx egress)
// with CHECKSUM_PARTIAL and only a pseudo-header seed in the checksum
// field. Router "r" forwards it out of a veth with tx offload off, where
// the kernel finishes the checksum in software from that seed; host "c"
// receives it on a plain socket, which verifies the checksum and drops the
// datagram if snat left the seed wrong.
//
//	a: v0 198.19.16.11 --- r: v1 198.19.16.1 | v2 198.18.99.254 (tx off) --- c: v3 198.18.99.1
func TestSNATChecksumPartial(t *testing.T) {
	testenv.RequireRoot(t)
	testenv.RequireCommand(t, "ip", "ethtool")
	var rnd [3]byte
	_, _ = rand.Read(rnd[:])
	sfx := hex.EncodeToString(rnd[:])
	a, r, c := "lbsa"+sfx, "lbsr"+sfx, "lbsc"+sfx
	for _, ns := range []string{a, r, c} {
		netnsCmd(t, "ip", "netns", "add", ns)
		t.Cleanup(func() { _ = exec.Command("ip", "netns", "del", ns).Run() })
	}
	for _, cmd := range [][]string{
		{"ip", "link", "add", "v0", "netns", a, "type", "veth", "peer", "name", "v1", "netns", r},
		{"ip", "link", "add", "v2", "netns", r, "type", "veth", "peer", "name", "v3", "netns", c},
		{"ip", "-n", a, "addr", "add", "198.19.16.11/24", "dev", "v0"},
		{"ip", "-n", a, "addr", "add", "2001:db8:16::11/64", "dev", "v0", "nodad"},
		{"ip", "-n", r, "addr", "add", "198.19.16.1/24", "dev", "v1"},
		{"ip", "-n", r, "addr", "add", "2001:db8:16::1/64", "dev", "v1", "nodad"},
		{"ip", "-n", r, "addr", "add", "198.18.99.254/24", "dev", "v2"},
		{"ip", "-n", r, "addr", "add", "2001:db8:99::fe/64", "dev", "v2", "nodad"},
		{"ip", "-n", c, "addr", "add", "198.18.99.1/24", "dev", "v3"},
		{"ip", "-n", c, "addr", "add", "2001:db8:99::1/64", "dev", "v3", "nodad"},
		{"ip", "-n", a, "link", "set", "v0", "up"},
		{"ip", "-n", r, "link", "set", "v1", "up"},
		{"ip", "-n", r, "link", "set", "v2", "up"},
		{"ip", "-n", c, "link", "set", "v3", "up"},
		{"ip", "-n", a, "route", "add", "default", "via", "198.19.16.1"},
		{"ip", "-n", a, "-6", "route", "add", "default", "via", "2001:db8:16::1"},
		{"ip", "netns", "exec", r, "sysctl", "-qw", "net.ipv4.ip_forward=1", "net.ipv6.conf.all.forwarding=1", "net.ipv4.conf.all.rp_filter=0", "net.ipv4.conf.v1.rp_filter=0"},
		{"ip", "netns", "exec", r, "ethtool", "-K", "v2", "tx", "off"},
		{"ip", "netns", "exec", a, "ethtool", "-K", "v0", "tx", "on"},
	} {
		netnsCmd(t, cmd...)
	}

	root := mountBPFFS(t)
	inNamedNetns(t, a, func() {
		dp, err := Open(Options{Root: root, Log: zaptest.NewLogger(t)})
		if err != nil {
			t.Errorf("open: %v", err)
			return
		}
		defer dp.Close()
		if _, err := dp.AttachSNAT("v0"); err != nil {
			t.Errorf("attach: %v", err)
		}
		for _, rule := range []SNATRule{
			{Src: net4, Proto: UDP, SPort: 53, To: vip4, ToPort: 5353},
			{Src: net6, Proto: UDP, SPort: 53, To: vip6, ToPort: 5353},
		} {
			if err := dp.AddSNAT(rule); err != nil {
				t.Errorf("add: %v", err)
			}
		}
	})
	if t.Failed() {
		return
	}

	for _, tc := range []struct{ from, to, want string }{
		{"198.19.16.11:53", "198.18.99.1:40000", "198.18.98.10:5353"},
		{"[2001:db8:16::11]:53", "[2001:db8:99::1]:40000", "[2001:db8:98::10]:5353"},
	} {
		var conn *net.UDPConn
		inNamedNetns(t, c, func() {
			var err error
			conn, err = net.ListenUDP("udp", net.UDPAddrFromAddrPort(netip.MustParseAddrPort(tc.to)))
			if err != nil {
				t.Errorf("listen %s: %v", tc.to, err)
			}
		})
		if conn == nil {
			return
		}
		defer conn.Close()
		inNamedNetns(t, a, func() {
			s, err := net.DialUDP("udp", net.UDPAddrFromAddrPort(netip.MustParseAddrPort(tc.from)), net.UDPAddrFromAddrPort(netip.MustParseAddrPort(tc.to)))
			if err != nil {
				t.Errorf("dial: %v", err)
				return
			}
			defer s.Close()
			// Several, in case the first waits for neighbour discovery.
			for i := 0; i < 3; i++ {
				_, _ = s.Write([]byte("an answer of some length, checksummed late"))
				time.Sleep(50 * time.Millisecond)
			}
		})
		_ = conn.SetReadDeadline(time.Now().Add(2 * time.Second))
		buf := make([]byte, 1500)
		n, from, err := conn.ReadFromUDPAddrPort(buf)
		if err != nil {
			t.Errorf("%s -> %s: nothing received (%v): checksum of a CHECKSUM_PARTIAL skb left wrong?", tc.from, tc.to, err)
			continue
		}
		if got := netip.AddrPortFrom(from.Addr().Unmap(), from.Port()).String(); got != tc.want || n == 0 {
			t.Errorf("%s -> %s: received from %s, want %s", tc.from, tc.to, got, tc.want)
		}
	}
}
