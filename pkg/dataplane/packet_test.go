package dataplane

// Packets for the program tests, built byte by byte, and an independent
// checksum computation (full ones'-complement sums, no incremental math).

import (
	"encoding/binary"
	"errors"
	"net/netip"
)

const (
	ethLen       = 14
	etherTypeV4  = 0x0800
	etherTypeV6  = 0x86dd
	etherTypeARP = 0x0806
	protoICMP    = 1
	nextFragment = 44
	nextHopByHop = 0
)

// pkt describes a test packet.
type pkt struct {
	src, dst  netip.AddrPort
	proto     Proto // UDP or TCP (or protoICMP via rawProto)
	rawProto  uint8 // overrides proto in the IP header when non-zero
	payload   []byte
	udpCsum0  bool   // send IPv4 UDP with checksum 0 ("none")
	v4Options []byte // IPv4 options (padded to 4 bytes by the caller)
	id        uint32 // IPv4 identification / IPv6 fragment id
	tcpFlags  uint8  // TCP flags; 0 means PSH|ACK
}

func (p pkt) v6() bool { return p.src.Addr().Is6() }

func (p pkt) ipProto() uint8 {
	if p.rawProto != 0 {
		return p.rawProto
	}
	return uint8(p.proto)
}

// l4 returns the UDP/TCP segment with a correct checksum.
func (p pkt) l4() []byte {
	var seg []byte
	switch p.proto {
	case UDP:
		seg = make([]byte, 8+len(p.payload))
		binary.BigEndian.PutUint16(seg[0:], p.src.Port())
		binary.BigEndian.PutUint16(seg[2:], p.dst.Port())
		binary.BigEndian.PutUint16(seg[4:], uint16(len(seg)))
		copy(seg[8:], p.payload)
	case TCP:
		seg = make([]byte, 20+len(p.payload))
		binary.BigEndian.PutUint16(seg[0:], p.src.Port())
		binary.BigEndian.PutUint16(seg[2:], p.dst.Port())
		binary.BigEndian.PutUint32(seg[4:], 0x01020304) // seq
		binary.BigEndian.PutUint32(seg[8:], 0x0a0b0c0d) // ack
		seg[12] = 5 << 4
		seg[13] = 0x18 // PSH|ACK
		if p.tcpFlags != 0 {
			seg[13] = p.tcpFlags
		}
		binary.BigEndian.PutUint16(seg[14:], 65535)
		copy(seg[20:], p.payload)
	default:
		seg = append([]byte{8, 0, 0, 0, 0, 1, 0, 1}, p.payload...) // ICMP echo
		return seg
	}
	if p.proto == UDP && p.udpCsum0 && !p.v6() {
		return seg
	}
	c := l4Checksum(p.src.Addr(), p.dst.Addr(), uint8(p.proto), seg, csumOff(p.proto))
	binary.BigEndian.PutUint16(seg[csumOff(p.proto):], c)
	return seg
}

func csumOff(proto Proto) int {
	if proto == UDP {
		return 6
	}
	return 16
}

// frame returns the whole packet as one Ethernet frame.
func (p pkt) frame() []byte {
	return p.frameOf(p.l4(), 0, false, false)
}

// fragments returns the datagram split into frames whose IP payloads
// (after the fragment header for IPv6) are at most chunk bytes
// (a multiple of 8).
func (p pkt) fragments(chunk int) [][]byte {
	seg := p.l4()
	var out [][]byte
	for off := 0; off < len(seg); off += chunk {
		end := min(off+chunk, len(seg))
		out = append(out, p.frameOf(seg[off:end], off, end < len(seg), true))
	}
	return out
}

// frameOf wraps an IP payload in IP and Ethernet headers. For fragments
// (frag true) off is the fragment offset in bytes and more the MF flag.
func (p pkt) frameOf(payload []byte, off int, more, frag bool) []byte {
	eth := make([]byte, ethLen)
	copy(eth[0:6], []byte{0x02, 0, 0, 0, 0, 2})
	copy(eth[6:12], []byte{0x02, 0, 0, 0, 0, 1})
	if !p.v6() {
		binary.BigEndian.PutUint16(eth[12:], etherTypeV4)
		hlen := 20 + len(p.v4Options)
		ip := make([]byte, hlen)
		ip[0] = 0x40 | byte(hlen/4)
		binary.BigEndian.PutUint16(ip[2:], uint16(hlen+len(payload)))
		binary.BigEndian.PutUint16(ip[4:], uint16(p.id))
		fo := uint16(off / 8)
		if more {
			fo |= 0x2000
		}
		binary.BigEndian.PutUint16(ip[6:], fo)
		ip[8] = 64
		ip[9] = p.ipProto()
		s, d := p.src.Addr().As4(), p.dst.Addr().As4()
		copy(ip[12:], s[:])
		copy(ip[16:], d[:])
		copy(ip[20:], p.v4Options)
		binary.BigEndian.PutUint16(ip[10:], checksum(0, ip))
		return append(append(eth, ip...), payload...)
	}
	binary.BigEndian.PutUint16(eth[12:], etherTypeV6)
	ip := make([]byte, 40)
	ip[0] = 0x60
	ip[7] = 64
	s, d := p.src.Addr().As16(), p.dst.Addr().As16()
	copy(ip[8:], s[:])
	copy(ip[24:], d[:])
	if !frag {
		binary.BigEndian.PutUint16(ip[4:], uint16(len(payload)))
		ip[6] = p.ipProto()
		return append(append(eth, ip...), payload...)
	}
	binary.BigEndian.PutUint16(ip[4:], uint16(8+len(payload)))
	ip[6] = nextFragment
	fh := make([]byte, 8)
	fh[0] = p.ipProto()
	fo := uint16(off) // offset in 8-byte units, shifted left by 3 = bytes
	if more {
		fo |= 1
	}
	binary.BigEndian.PutUint16(fh[2:], fo)
	binary.BigEndian.PutUint32(fh[4:], p.id)
	return append(append(append(eth, ip...), fh...), payload...)
}

// sum adds b to the ones'-complement running sum s (32-bit accumulator).
func sum(s uint32, b []byte) uint32 {
	for len(b) >= 2 {
		s += uint32(binary.BigEndian.Uint16(b))
		b = b[2:]
	}
	if len(b) == 1 {
		s += uint32(b[0]) << 8
	}
	return s
}

func fold(s uint32) uint16 {
	for s > 0xffff {
		s = s>>16 + s&0xffff
	}
	return uint16(s)
}

// checksum is the Internet checksum of b, with seed s.
func checksum(s uint32, b []byte) uint16 { return ^fold(sum(s, b)) }

func pseudoSum(src, dst netip.Addr, proto uint8, n int) uint32 {
	s := sum(0, src.AsSlice())
	s = sum(s, dst.AsSlice())
	return s + uint32(proto) + uint32(n)
}

// l4Checksum computes the UDP/TCP checksum of seg (its checksum field at
// off treated as zero); UDP's 0 is sent as 0xffff.
func l4Checksum(src, dst netip.Addr, proto uint8, seg []byte, off int) uint16 {
	c := append([]byte(nil), seg...)
	c[off], c[off+1] = 0, 0
	v := checksum(pseudoSum(src, dst, proto, len(seg)), c)
	if proto == uint8(UDP) && v == 0 {
		v = 0xffff
	}
	return v
}

// l4ChecksumOK reports whether seg (a whole UDP/TCP segment) carries a
// valid checksum for src, dst.
func l4ChecksumOK(src, dst netip.Addr, proto uint8, seg []byte) bool {
	return fold(sum(pseudoSum(src, dst, proto, len(seg)), seg)) == 0xffff
}

// ipv4HeaderOK reports whether the IPv4 header hdr has a valid checksum.
func ipv4HeaderOK(hdr []byte) bool { return fold(sum(0, hdr)) == 0xffff }

// arpFrame is an ARP request from 198.18.0.1 for 198.18.0.2.
func arpFrame() []byte {
	f := make([]byte, 42)
	copy(f[0:6], []byte{0xff, 0xff, 0xff, 0xff, 0xff, 0xff})
	copy(f[6:12], []byte{0x02, 0, 0, 0, 0, 1})
	binary.BigEndian.PutUint16(f[12:], etherTypeARP)
	copy(f[14:], []byte{0, 1, 8, 0, 6, 4, 0, 1, 2, 0, 0, 0, 0, 1, 198, 18, 0, 1, 0, 0, 0, 0, 0, 0, 198, 18, 0, 2})
	return f
}

func errorsIs(err, target error) bool { return errors.Is(err, target) }
