package dataplane

import (
	"bytes"
	"encoding/binary"
	"errors"
	"fmt"
	"net/netip"
	"testing"
)

// FuzzXDP feeds xdp_lb random frames and mutations of its table's packets,
// with the services of TestXDPProgram installed. Invariant: the output is
// the input (XDP_PASS or XDP_DROP), or the input with only the Ethernet
// addresses (XDP_TX/XDP_REDIRECT), the destination address and port (to a
// backend of the service the packet was addressed to) and the checksums
// changed, with the IPv4 header and L4 checksums still valid where they
// were valid before (IPv4 UDP checksum 0 stays 0). The source is never
// touched.
func FuzzXDP(f *testing.F) {
	svcs, cs := xdpCases()
	for _, c := range cs {
		f.Add(c.in)
	}
	e := newXDPEnv(f)
	for svc, bs := range svcs {
		pick := 0
		if len(bs) == 0 {
			pick = -1
		}
		e.set(f, svc, bs, pick)
	}
	f.Fuzz(func(t *testing.T, in []byte) {
		if len(in) < ethLen || len(in) > 1600 {
			return
		}
		ret, out := e.run(t, in)
		if err := checkXDPInvariant(svcs, in, out[:len(in)], ret); err != nil {
			t.Fatalf("%v\nin:  %x\nout: %x", err, in, out)
		}
	})
}

func checkXDPInvariant(svcs map[XDPService][]netip.AddrPort, in, out []byte, verdict uint32) error {
	switch verdict {
	case xdpPass, xdpDrop, xdpTX, xdpRedirect:
	default:
		return fmt.Errorf("verdict %d", verdict)
	}
	if bytes.Equal(in, out) {
		if verdict == xdpTX || verdict == xdpRedirect {
			return errors.New("sent on unchanged")
		}
		return nil
	}
	if verdict == xdpDrop {
		return errors.New("dropped a changed packet")
	}
	p, ok := parseGo(in)
	if !ok || p.later || p.fragmented {
		return errors.New("a frame that is not a whole IPv4/IPv6 UDP/TCP datagram was changed")
	}
	allowed := map[int]bool{}
	if verdict != xdpPass {
		for i := 0; i < 12; i++ {
			allowed[i] = true
		}
	}
	d0, d1 := p.l3+16, p.l3+20
	if p.v6 {
		d0, d1 = p.l3+24, p.l3+40
	} else {
		allowed[p.l3+10], allowed[p.l3+11] = true, true
	}
	for i := d0; i < d1; i++ {
		allowed[i] = true
	}
	for _, i := range []int{p.l4 + 2, p.l4 + 3, p.csumOff(), p.csumOff() + 1} {
		allowed[i] = true
	}
	for i := range in {
		if in[i] != out[i] && !allowed[i] {
			return fmt.Errorf("byte %d changed outside Ethernet addresses, destination and checksums", i)
		}
	}
	oldDst := netip.AddrPortFrom(p.daddr(in), binary.BigEndian.Uint16(in[p.l4+2:]))
	newDst := netip.AddrPortFrom(p.daddr(out), binary.BigEndian.Uint16(out[p.l4+2:]))
	bs, ok := svcs[XDPService{VIP: oldDst, Proto: Proto(p.proto)}]
	if !ok {
		return fmt.Errorf("%s rewritten to %s: not a service", oldDst, newDst)
	}
	found := false
	for _, b := range bs {
		found = found || b == newDst
	}
	if !found {
		return fmt.Errorf("%s rewritten to %s: not one of its backends %v", oldDst, newDst, bs)
	}
	if !p.v6 && ipv4HeaderOK(in[p.l3:p.l4]) && !ipv4HeaderOK(out[p.l3:p.l4]) {
		return errors.New("IPv4 header checksum was valid, is not")
	}
	if p.ipEnd >= 0 && p.ipEnd >= p.csumOff()+2 {
		if !p.v6 && p.proto == uint8(UDP) && binary.BigEndian.Uint16(in[p.csumOff():]) == 0 {
			if binary.BigEndian.Uint16(out[p.csumOff():]) != 0 {
				return errors.New("IPv4 UDP checksum 0 (none) was changed")
			}
			return nil
		}
		src := netip.Addr{}
		if p.v6 {
			src, _ = netip.AddrFromSlice(in[p.l3+8 : p.l3+24])
		} else {
			src, _ = netip.AddrFromSlice(in[p.l3+12 : p.l3+16])
		}
		if l4ChecksumOK(src, oldDst.Addr(), p.proto, in[p.l4:p.ipEnd]) && !l4ChecksumOK(src, newDst.Addr(), p.proto, out[p.l4:p.ipEnd]) {
			return errors.New("L4 checksum was valid, is not")
		}
	}
	return nil
}
