package proxy

import (
	"net"
	"net/netip"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"github.com/lbctl/lbctl/test/testenv"
)

// silentTCP returns an address that never answers a SYN: a listener with a
// backlog of 0 whose accept queue is already full (one connection, never
// accepted), so the kernel drops further SYNs.
func silentTCP(t *testing.T) netip.AddrPort {
	t.Helper()
	testenv.RequireNetns(t)
	fd, err := unix.Socket(unix.AF_INET, unix.SOCK_STREAM|unix.SOCK_CLOEXEC, 0)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { unix.Close(fd) })
	if err := unix.Bind(fd, &unix.SockaddrInet4{Addr: lo4.As4()}); err != nil {
		t.Fatal(err)
	}
	if err := unix.Listen(fd, 0); err != nil {
		t.Fatal(err)
	}
	sa, err := unix.Getsockname(fd)
	if err != nil {
		t.Fatal(err)
	}
	addr := netip.AddrPortFrom(lo4, uint16(sa.(*unix.SockaddrInet4).Port))
	filler, err := net.Dial("tcp", addr.String())
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { filler.Close() })
	return addr
}

// An upstream that never answers the connect is given up after
// connect_timeout, counted as failed, and the client is served by the next.
func TestTCPConnectTimeout(t *testing.T) {
	silent := silentTCP(t)
	p := pool(t, "round_robin", silent, tcpBackend(t, "dev2"))
	const timeout = 300 * time.Millisecond
	f := startTCP(t, Service{ConnectTimeout: timeout}, p)
	start := time.Now()
	if got := ask(t, f.Addr(), "hi"); got != "dev2 hi" {
		t.Fatalf("reply %q, want dev2's", got)
	}
	// The silent upstream was tried first and not given up before
	// connect_timeout; the upper bound is loose on purpose (a loaded
	// machine), far below the kernel's own SYN retries (over a minute).
	if d := time.Since(start); d < timeout || d > timeout+3*time.Second {
		t.Fatalf("answered after %v, want connect_timeout %v spent on the silent upstream first", d, timeout)
	}
	if snap := p.Snapshot(); snap[0].Failures != 1 || snap[0].Successes != 0 || snap[1].Successes != 1 {
		t.Fatalf("snapshot %+v: want one failure on the silent upstream, one success on dev2", snap)
	}
}
