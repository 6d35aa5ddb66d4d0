package proxy

import (
	"errors"
	"fmt"
	"net"
	"net/netip"
	"testing"
	"unsafe"

	"golang.org/x/sys/unix"

	"github.com/lbctl/lbctl/test/testenv"
)

func TestSockaddrAddrPort(t *testing.T) {
	v4 := func(a [4]byte, port uint16) (unix.RawSockaddrInet6, uint32) {
		var sa unix.RawSockaddrInet6
		s4 := (*unix.RawSockaddrInet4)(unsafe.Pointer(&sa))
		s4.Family = unix.AF_INET
		s4.Addr = a
		p := (*[2]byte)(unsafe.Pointer(&s4.Port))
		p[0], p[1] = byte(port>>8), byte(port)
		return sa, unix.SizeofSockaddrInet4
	}
	v6 := func(a netip.Addr, port uint16) (unix.RawSockaddrInet6, uint32) {
		sa := unix.RawSockaddrInet6{Family: unix.AF_INET6, Addr: a.As16()}
		p := (*[2]byte)(unsafe.Pointer(&sa.Port))
		p[0], p[1] = byte(port>>8), byte(port)
		return sa, unix.SizeofSockaddrInet6
	}
	for _, tc := range []struct {
		name string
		sa   func() (unix.RawSockaddrInet6, uint32)
		want string // "" = not ok
	}{
		{"ipv4", func() (unix.RawSockaddrInet6, uint32) { return v4([4]byte{198, 18, 0, 1}, 53) }, "198.18.0.1:53"},
		{"ipv4 high port", func() (unix.RawSockaddrInet6, uint32) { return v4([4]byte{198, 18, 0, 1}, 65534) }, "198.18.0.1:65534"},
		{"ipv6", func() (unix.RawSockaddrInet6, uint32) { return v6(netip.MustParseAddr("2001:db8::1"), 4242) }, "[2001:db8::1]:4242"},
		{"ipv4-mapped kept", func() (unix.RawSockaddrInet6, uint32) {
			return v6(netip.MustParseAddr("::ffff:198.18.0.1"), 1)
		}, "[::ffff:198.18.0.1]:1"},
		{"short ipv4", func() (unix.RawSockaddrInet6, uint32) { sa, _ := v4([4]byte{1, 2, 3, 4}, 1); return sa, 4 }, ""},
		{"short ipv6", func() (unix.RawSockaddrInet6, uint32) {
			sa, _ := v6(netip.MustParseAddr("2001:db8::1"), 1)
			return sa, unix.SizeofSockaddrInet4
		}, ""},
		{"unix family", func() (unix.RawSockaddrInet6, uint32) { return unix.RawSockaddrInet6{Family: unix.AF_UNIX}, 110 }, ""},
	} {
		t.Run(tc.name, func(t *testing.T) {
			sa, l := tc.sa()
			got, ok := sockaddrAddrPort(&sa, l)
			if tc.want == "" {
				if ok {
					t.Fatalf("got %s, ok; want not ok", got)
				}
				return
			}
			if !ok || got.String() != tc.want {
				t.Fatalf("got %s, %v; want %s", got, ok, tc.want)
			}
		})
	}
}

// TestBatchReader: datagrams queued on a socket come out of one Read with
// their sources and payloads (an empty one included), a second Read
// without allocations, and Read ends with net.ErrClosed once the socket is
// closed.
func TestBatchReader(t *testing.T) {
	testenv.RequireNetns(t)
	for _, addr := range []netip.Addr{testenv.Addr4, testenv.Addr6} {
		t.Run(addr.String(), func(t *testing.T) {
			c, err := net.ListenUDP("udp", net.UDPAddrFromAddrPort(netip.AddrPortFrom(addr, 0)))
			if err != nil {
				t.Fatal(err)
			}
			defer c.Close()
			to := c.LocalAddr().(*net.UDPAddr).AddrPort()
			var senders []*net.UDPConn
			for range 2 {
				s, err := net.ListenUDP("udp", net.UDPAddrFromAddrPort(netip.AddrPortFrom(addr, 0)))
				if err != nil {
					t.Fatal(err)
				}
				defer s.Close()
				senders = append(senders, s)
			}
			br, err := newBatchReader(c, 4, 2048)
			if err != nil {
				t.Fatal(err)
			}
			var want []string
			for i, p := range []string{"one", "", "three"} {
				s := senders[i%2]
				if _, err := s.WriteToUDPAddrPort([]byte(p), to); err != nil {
					t.Fatal(err)
				}
				want = append(want, fmt.Sprintf("%s %q", s.LocalAddr().(*net.UDPAddr).AddrPort(), p))
			}
			var got []string
			for len(got) < len(want) {
				n, err := br.Read()
				if err != nil {
					t.Fatal(err)
				}
				for i := range n {
					src, b, ok := br.Datagram(i)
					if !ok {
						t.Fatalf("datagram %d: no source", i)
					}
					got = append(got, fmt.Sprintf("%s %q", src, b))
				}
			}
			if fmt.Sprint(got) != fmt.Sprint(want) {
				t.Fatalf("read %v, want %v", got, want)
			}

			allocs := testing.AllocsPerRun(20, func() {
				if _, err := senders[0].WriteToUDPAddrPort([]byte("x"), to); err != nil {
					t.Fatal(err)
				}
				if n, err := br.Read(); err != nil || n != 1 {
					t.Fatalf("read: %d, %v", n, err)
				}
				br.Datagram(0)
			})
			// WriteToUDPAddrPort allocates nothing either; any allocation is the reader's.
			if allocs != 0 {
				t.Errorf("%v allocations per send and batch read, want 0", allocs)
			}

			done := make(chan error, 1)
			go func() { _, err := br.Read(); done <- err }()
			c.Close()
			if err := <-done; !errors.Is(err, net.ErrClosed) {
				t.Fatalf("Read after close: %v, want net.ErrClosed", err)
			}
		})
	}
}
