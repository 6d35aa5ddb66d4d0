package snat

import (
	"errors"
	"fmt"
	"net"
	"net/netip"
	"os"
	"testing"
	"time"

	"github.com/gopacket/gopacket"
	"github.com/gopacket/gopacket/layers"
	"golang.org/x/sys/unix"

	"github.com/lbctl/lbctl/test/topo"
)

// udpPacket builds an IP+UDP packet from src to dst whose UDP checksum is
// computed over a pseudo-header with csumSrc as the source: with csumSrc ==
// src a correct packet, with csumSrc the backend's address and src the VIP
// exactly what a rewrite that changed the IP source but not the L4
// checksum would send. The IPv4 header checksum is left for the kernel
// (IP_HDRINCL fills it in).
func udpPacket(t *testing.T, csumSrc, src, dst netip.Addr, sport, dport uint16, payload []byte) []byte {
	t.Helper()
	udp := &layers.UDP{SrcPort: layers.UDPPort(sport), DstPort: layers.UDPPort(dport)}
	var ip gopacket.SerializableLayer
	if src.Is4() {
		ip4 := &layers.IPv4{Version: 4, IHL: 5, TTL: 64, Protocol: layers.IPProtocolUDP, SrcIP: csumSrc.AsSlice(), DstIP: dst.AsSlice()}
		if err := udp.SetNetworkLayerForChecksum(ip4); err != nil {
			t.Fatal(err)
		}
		ip = ip4
	} else {
		ip6 := &layers.IPv6{Version: 6, HopLimit: 64, NextHeader: layers.IPProtocolUDP, SrcIP: csumSrc.AsSlice(), DstIP: dst.AsSlice()}
		if err := udp.SetNetworkLayerForChecksum(ip6); err != nil {
			t.Fatal(err)
		}
		ip = ip6
	}
	buf := gopacket.NewSerializeBuffer()
	if err := gopacket.SerializeLayers(buf, gopacket.SerializeOptions{FixLengths: true, ComputeChecksums: true},
		ip, udp, gopacket.Payload(payload)); err != nil {
		t.Fatal(err)
	}
	pkt := buf.Bytes()
	if src.Is4() {
		copy(pkt[12:16], src.AsSlice())
	} else {
		copy(pkt[8:24], src.AsSlice())
	}
	return pkt
}

// sendRaw sends complete IP packets to dst from a raw socket on h.
func sendRaw(h *topo.Host, dst netip.Addr, pkts ...[]byte) error {
	return h.Do(func() error {
		fam, sa := unix.AF_INET6, unix.Sockaddr(&unix.SockaddrInet6{Addr: dst.As16()})
		if dst.Is4() {
			fam, sa = unix.AF_INET, &unix.SockaddrInet4{Addr: dst.As4()}
		}
		fd, err := unix.Socket(fam, unix.SOCK_RAW|unix.SOCK_CLOEXEC, unix.IPPROTO_RAW)
		if err != nil {
			return fmt.Errorf("raw socket: %w", err)
		}
		defer unix.Close(fd)
		for _, p := range pkts {
			if err := unix.Sendto(fd, p, 0, sa); err != nil {
				return fmt.Errorf("send raw packet to %s: %w", dst, err)
			}
		}
		return nil
	})
}

// testStaleChecksum is the control for the checksum assertion of the other
// cases: it proves that, on this topology, a reply whose source was
// rewritten to the VIP without updating the UDP checksum does not reach the
// client's socket and raises UdpInCsumErrors (Udp6InCsumErrors). Backend 1
// sends, from a raw socket out of its public side, first such a stale
// datagram and then the same datagram with a right checksum; the client must
// receive only the second, and count the first.
func testStaleChecksum(t *testing.T, tp *topo.Topology, f family) {
	c := listenUDP(t, tp.Client, f.vip)
	port := uint16(c.LocalAddr().(*net.UDPAddr).Port)
	client := tp.Client.V4
	if f.vip.Is6() {
		client = tp.Client.V6
	}
	stale := udpPacket(t, f.backend(1), f.vip, client, 53, port, []byte("stale checksum"))
	good := udpPacket(t, f.vip, f.vip, client, 53, port, []byte("right checksum"))

	before := snmp(t, tp.Client)
	buf := make([]byte, 1500)
	var got string
	var from netip.AddrPort
	for try := 0; try < 3 && got == ""; try++ {
		if err := sendRaw(tp.Backends[0], client, stale, good); err != nil {
			t.Fatal(err)
		}
		_ = c.SetReadDeadline(time.Now().Add(2 * time.Second))
		n, a, err := c.ReadFromUDPAddrPort(buf)
		if errors.Is(err, os.ErrDeadlineExceeded) {
			continue
		}
		if err != nil {
			t.Fatal(err)
		}
		got, from = string(buf[:n]), netip.AddrPortFrom(a.Addr().Unmap(), a.Port())
	}
	if got != "right checksum" {
		t.Fatalf("client received %q, want only the datagram with the right checksum", got)
	}
	if want := netip.AddrPortFrom(f.vip, 53); from != want {
		t.Errorf("control datagram came from %s, want %s", from, want)
	}
	// The stale datagram went first on the same path, so it has been
	// counted by the time the right one is read.
	after := snmp(t, tp.Client)
	if d := after[f.csumErrors] - before[f.csumErrors]; d < 1 {
		t.Errorf("client %s rose by %d after a stale-checksum datagram: the checksum assertion of the other cases could not fail", f.csumErrors, d)
	}
}
