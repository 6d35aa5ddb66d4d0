package proxy

import (
	"bytes"
	"errors"
	"fmt"
	"math/rand/v2"
	"net"
	"net/netip"
	"strings"
	"testing"
	"time"

	"github.com/gopacket/gopacket"
	"github.com/gopacket/gopacket/layers"
	"golang.org/x/sys/unix"

	"github.com/lbctl/lbctl/test/topo"
)

// gopacketUDP serializes the same datagram with gopacket, which computes the
// lengths and checksums itself: an independent reference for the headers.
func gopacketUDP(t *testing.T, src, dst netip.AddrPort, payload []byte) []byte {
	t.Helper()
	udp := &layers.UDP{SrcPort: layers.UDPPort(src.Port()), DstPort: layers.UDPPort(dst.Port())}
	var ip gopacket.NetworkLayer
	var ipl gopacket.SerializableLayer
	if src.Addr().Is4() {
		l := &layers.IPv4{Version: 4, TTL: 64, Protocol: layers.IPProtocolUDP,
			SrcIP: src.Addr().AsSlice(), DstIP: dst.Addr().AsSlice()}
		ip, ipl = l, l
	} else {
		l := &layers.IPv6{Version: 6, HopLimit: 64, NextHeader: layers.IPProtocolUDP,
			SrcIP: src.Addr().AsSlice(), DstIP: dst.Addr().AsSlice()}
		ip, ipl = l, l
	}
	if err := udp.SetNetworkLayerForChecksum(ip); err != nil {
		t.Fatal(err)
	}
	buf := gopacket.NewSerializeBuffer()
	opts := gopacket.SerializeOptions{ComputeChecksums: true, FixLengths: true}
	if err := gopacket.SerializeLayers(buf, opts, ipl, udp, gopacket.Payload(payload)); err != nil {
		t.Fatal(err)
	}
	return buf.Bytes()
}

func TestDSRHeaders(t *testing.T) {
	rng := rand.New(rand.NewPCG(1, 2))
	random := func(n int) []byte {
		b := make([]byte, n)
		for i := range b {
			b[i] = byte(rng.UintN(256))
		}
		return b
	}
	c4, u4 := netip.MustParseAddrPort("198.18.99.1:40000"), netip.MustParseAddrPort("198.19.16.11:53")
	c6, u6 := netip.MustParseAddrPort("[2001:db8:99::1]:65535"), netip.MustParseAddrPort("[2001:db8:16::14]:5353")
	cases := []struct {
		name             string
		client, upstream netip.AddrPort
		payload          []byte
	}{
		{"v4 empty", c4, u4, nil},
		{"v4 one byte", c4, u4, []byte{0xab}},
		{"v4 dns query", c4, u4, random(33)},
		{"v4 odd 1471", c4, u4, random(1471)},
		{"v4 all ones", c4, u4, bytes.Repeat([]byte{0xff}, 64)},
		{"v6 empty", c6, u6, nil},
		{"v6 odd", c6, u6, random(45)},
		{"v6 1452", c6, u6, random(1452)},
		{"v6 all ones", c6, u6, bytes.Repeat([]byte{0xff}, 63)},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			v6 := tc.client.Addr().Is6()
			s := &DSRSender{v6: v6}
			hdr := make([]byte, s.hdrLen())
			d := DSRDatagram{Client: tc.client, Upstream: tc.upstream, Payload: tc.payload}
			if err := s.header(hdr, &d); err != nil {
				t.Fatal(err)
			}
			want := gopacketUDP(t, tc.client, tc.upstream, tc.payload)
			got := append(append([]byte{}, hdr...), tc.payload...)
			if !bytes.Equal(got[:len(hdr)], want[:len(hdr)]) {
				t.Errorf("headers differ from gopacket's\n got %x\nwant %x", got[:len(hdr)], want[:len(hdr)])
			}
			// And decode ours: the checksums must verify.
			first := layers.LayerTypeIPv4
			if v6 {
				first = layers.LayerTypeIPv6
			}
			p := gopacket.NewPacket(got, first, gopacket.Default)
			udp, _ := p.Layer(layers.LayerTypeUDP).(*layers.UDP)
			if udp == nil {
				t.Fatalf("no UDP layer in %v", p)
			}
			if udp.SrcPort != layers.UDPPort(tc.client.Port()) || udp.DstPort != layers.UDPPort(tc.upstream.Port()) ||
				!bytes.Equal(udp.Payload, tc.payload) {
				t.Errorf("decoded %v, want %s -> %s with the payload", udp, tc.client, tc.upstream)
			}
			if int(udp.Length) != 8+len(tc.payload) {
				t.Errorf("udp length %d, want %d", udp.Length, 8+len(tc.payload))
			}
			var nl gopacket.NetworkLayer
			if v6 {
				nl = p.Layer(layers.LayerTypeIPv6).(*layers.IPv6)
			} else {
				nl = p.Layer(layers.LayerTypeIPv4).(*layers.IPv4)
			}
			if err := udp.SetNetworkLayerForChecksum(nl); err != nil {
				t.Fatal(err)
			}
			if err, v := udp.VerifyChecksum(); err != nil || !v.Valid {
				t.Errorf("udp checksum %#04x does not verify (%+v, %v)", udp.Checksum, v, err)
			}
		})
	}
}

func TestDSRHeaderRefusals(t *testing.T) {
	c4, u4 := netip.MustParseAddrPort("198.18.99.1:40000"), netip.MustParseAddrPort("198.19.16.11:53")
	u6 := netip.MustParseAddrPort("[2001:db8:16::11]:53")
	s := &DSRSender{}
	hdr := make([]byte, 48)
	for _, d := range []DSRDatagram{
		{Client: c4, Upstream: u6, Payload: []byte("x")},
		{Client: c4, Upstream: u4, Payload: make([]byte, maxUDPPayload+1)},
	} {
		if err := s.header(hdr, &d); err == nil {
			t.Errorf("header(%s -> %s, %d bytes) = nil, want an error", d.Client, d.Upstream, len(d.Payload))
		}
	}
	s.v6 = true
	if err := s.header(hdr, &DSRDatagram{Client: c4, Upstream: u4}); err == nil {
		t.Error("an IPv6 sender built an IPv4 header")
	}
}

// received is one datagram as a backend's socket saw it.
type received struct {
	from    netip.AddrPort
	payload string
}

// listenOn opens a UDP socket on h at addr and returns what it receives.
func listenOn(t *testing.T, h *topo.Host, addr netip.AddrPort) <-chan received {
	t.Helper()
	var conn *net.UDPConn
	if err := h.Do(func() (err error) {
		conn, err = net.ListenUDP("udp", net.UDPAddrFromAddrPort(addr))
		return err
	}); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { conn.Close() })
	if err := conn.SetReadBuffer(8 << 20); err != nil {
		t.Fatal(err)
	}
	ch := make(chan received, 4096)
	done := make(chan struct{})
	t.Cleanup(func() { conn.Close(); <-done })
	go func() {
		defer close(done)
		buf := make([]byte, 65536)
		for {
			n, from, err := conn.ReadFromUDPAddrPort(buf)
			if err != nil {
				return
			}
			ch <- received{from: netip.AddrPortFrom(from.Addr().Unmap(), from.Port()), payload: string(buf[:n])}
		}
	}()
	return ch
}

// newSenderOn opens a DSR sender inside h's namespace.
func newSenderOn(t testing.TB, h *topo.Host, v6 bool) *DSRSender {
	t.Helper()
	var s *DSRSender
	if err := h.Do(func() (err error) {
		s, err = NewDSRSender(nil, v6, nil)
		return err
	}); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { s.Close() })
	return s
}

// TestDSRSendNamespaces sends batches from the LB namespace of the test
// topology: each backend receives every datagram from the client's
// address:port (which is not an address of the LB), payload intact; a
// datagram over the MTU is dropped and counted without losing its batch.
func TestDSRSendNamespaces(t *testing.T) {
	tp := topo.Start(t, topo.Options{Backends: 2})
	for _, fam := range []struct {
		name    string
		v6      bool
		client  netip.Addr
		backend func(int) netip.Addr
	}{
		{"ipv4", false, topo.Client4, topo.Backend4},
		{"ipv6", true, topo.Client6, topo.Backend6},
	} {
		t.Run(fam.name, func(t *testing.T) {
			ups := []netip.AddrPort{netip.AddrPortFrom(fam.backend(1), 5300), netip.AddrPortFrom(fam.backend(2), 5300)}
			recv := []<-chan received{listenOn(t, tp.Backends[0], ups[0]), listenOn(t, tp.Backends[1], ups[1])}
			s := newSenderOn(t, tp.LB, fam.v6)
			// First one datagram each, so that the burst below does not
			// outrun neighbour discovery (the kernel queues only a few
			// packets for an unresolved neighbour).
			for i, up := range ups {
				c := netip.AddrPortFrom(fam.client, 10000)
				if n, err := s.Send([]DSRDatagram{{Client: c, Upstream: up, Payload: []byte("hello")}}); n != 1 || err != nil {
					t.Fatalf("Send(hello) = %d, %v", n, err)
				}
				select {
				case r := <-recv[i]:
					if r != (received{c, "hello"}) {
						t.Fatalf("%s got %v, want hello from %s", up, r, c)
					}
				case <-time.After(10 * time.Second):
					t.Fatalf("%s: nothing arrived", up)
				}
			}

			const batches, per = 20, 32
			want := map[netip.AddrPort]map[received]bool{ups[0]: {}, ups[1]: {}}
			for b := 0; b < batches; b++ {
				ds := make([]DSRDatagram, per)
				for i := range ds {
					c := netip.AddrPortFrom(fam.client, uint16(20000+b*per+i))
					p := fmt.Sprintf("query %d/%d", b, i)
					ds[i] = DSRDatagram{Client: c, Upstream: ups[i%2], Payload: []byte(p)}
					want[ups[i%2]][received{from: c, payload: p}] = true
				}
				if n, err := s.Send(ds); n != per || err != nil {
					t.Fatalf("Send(batch %d) = %d, %v; want %d, nil", b, n, err, per)
				}
			}
			// One datagram over the 1500-byte MTU, amid small ones: dropped
			// and counted, the others go.
			big := bytes.Repeat([]byte("0123456789abcdef"), 250)
			bigFrom := netip.AddrPortFrom(fam.client, 33333)
			ds := []DSRDatagram{
				{Client: netip.AddrPortFrom(fam.client, 1), Upstream: ups[0], Payload: []byte("before")},
				{Client: bigFrom, Upstream: ups[1], Payload: big},
				{Client: netip.AddrPortFrom(fam.client, 2), Upstream: ups[0], Payload: []byte("after")},
			}
			want[ups[0]][received{netip.AddrPortFrom(fam.client, 1), "before"}] = true
			want[ups[0]][received{netip.AddrPortFrom(fam.client, 2), "after"}] = true
			if n, err := s.Send(ds); n != 2 || !errors.Is(err, unix.EMSGSIZE) {
				t.Fatalf("Send(with a 4000-byte datagram) = %d, %v; want 2, EMSGSIZE", n, err)
			}
			for i, up := range ups {
				for len(want[up]) > 0 {
					select {
					case r := <-recv[i]:
						if !want[up][r] {
							t.Fatalf("%s got an unexpected datagram from %s (%d bytes)", up, r.from, len(r.payload))
						}
						delete(want[up], r)
					case <-time.After(10 * time.Second):
						t.Fatalf("%s: %d datagrams never arrived", up, len(want[up]))
					}
				}
			}
			st := s.Stats()
			if got := st.Sent.Load(); got != batches*per+4 {
				t.Errorf("Sent = %d, want %d", got, batches*per+4)
			}
			if got := st.Oversize.Load(); got != 1 {
				t.Errorf("Oversize = %d, want 1", got)
			}
			if got := st.Errors.Load(); got != 0 {
				t.Errorf("Errors = %d, want 0", got)
			}

			// A datagram of the other family is refused and counted, the
			// rest of its batch still goes.
			other := netip.MustParseAddrPort("198.18.99.1:9")
			if !fam.v6 {
				other = netip.MustParseAddrPort("[2001:db8:99::1]:9")
			}
			ds = []DSRDatagram{
				{Client: other, Upstream: ups[0], Payload: []byte("wrong family")},
				{Client: netip.AddrPortFrom(fam.client, 3), Upstream: ups[0], Payload: []byte("fine")},
			}
			if n, err := s.Send(ds); n != 1 || err == nil {
				t.Errorf("Send(wrong family, fine) = %d, %v; want 1 and an error", n, err)
			}
			select {
			case r := <-recv[0]:
				if r != (received{netip.AddrPortFrom(fam.client, 3), "fine"}) {
					t.Errorf("got %v, want the datagram after the refused one", r)
				}
			case <-time.After(10 * time.Second):
				t.Fatal("the datagram after a refused one never arrived")
			}
			if got := st.Errors.Load(); got != 1 {
				t.Errorf("Errors = %d, want 1", got)
			}

			// Bound to the upstream-facing eth1 it still arrives; a device
			// that does not exist is named in the error.
			if err := s.BindToDevice("nosuchdev0"); err == nil || !strings.Contains(err.Error(), "nosuchdev0") {
				t.Errorf("BindToDevice(nosuchdev0) = %v, want an error naming it", err)
			}
			if err := s.BindToDevice("eth1"); err != nil {
				t.Fatal(err)
			}
			c := netip.AddrPortFrom(fam.client, 4)
			if n, err := s.Send([]DSRDatagram{{Client: c, Upstream: ups[1], Payload: []byte("via eth1")}}); n != 1 || err != nil {
				t.Fatalf("Send(bound to eth1) = %d, %v", n, err)
			}
			select {
			case r := <-recv[1]:
				if r != (received{c, "via eth1"}) {
					t.Errorf("got %v, want the datagram sent through eth1", r)
				}
			case <-time.After(10 * time.Second):
				t.Fatal("nothing arrived through eth1")
			}
		})
	}
}

// FuzzDSRHeaders: for any addresses, ports and payload the headers decode
// (gopacket) to exactly what was asked, with lengths and a UDP checksum
// that verify — the same bytes gopacket itself would write.
func FuzzDSRHeaders(f *testing.F) {
	f.Add(false, []byte{198, 18, 99, 1}, []byte{198, 19, 16, 11}, uint16(40000), uint16(53), []byte("query"))
	f.Add(true, netip.MustParseAddr("2001:db8:99::1").AsSlice(), netip.MustParseAddr("2001:db8:16::11").AsSlice(), uint16(1), uint16(65535), []byte{})
	f.Add(false, []byte{0, 0, 0, 0}, []byte{255, 255, 255, 255}, uint16(0), uint16(0), bytes.Repeat([]byte{0xff}, 17))
	f.Fuzz(func(t *testing.T, v6 bool, src, dst []byte, sport, dport uint16, payload []byte) {
		n := 4
		if v6 {
			n = 16
		}
		if len(src) < n || len(dst) < n || len(payload) > 9000 {
			return
		}
		s, _ := netip.AddrFromSlice(src[:n])
		d, _ := netip.AddrFromSlice(dst[:n])
		if v6 && (s.Is4In6() || d.Is4In6()) {
			return // an IPv4-mapped address is sent as IPv4, not by an IPv6 sender
		}
		client, upstream := netip.AddrPortFrom(s, sport), netip.AddrPortFrom(d, dport)
		sender := &DSRSender{v6: v6}
		hdr := make([]byte, sender.hdrLen())
		if err := sender.header(hdr, &DSRDatagram{Client: client, Upstream: upstream, Payload: payload}); err != nil {
			t.Fatal(err)
		}
		want := gopacketUDP(t, client, upstream, payload)
		if got := want[:len(hdr)]; !bytes.Equal(hdr, got) {
			// gopacket writes a computed 0 as 0, the wire form is 0xffff.
			ours, theirs := hdr[len(hdr)-2:], got[len(got)-2:]
			if !(bytes.Equal(ours, []byte{0xff, 0xff}) && bytes.Equal(theirs, []byte{0, 0}) &&
				bytes.Equal(hdr[:len(hdr)-2], got[:len(got)-2])) {
				t.Fatalf("headers differ from gopacket's\n got %x\nwant %x", hdr, got)
			}
		}
	})
}
