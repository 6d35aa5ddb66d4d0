package dataplane

import (
	"bytes"
	"encoding/binary"
	"errors"
	"fmt"
	"net/netip"
	"slices"
	"testing"

	"github.com/cilium/ebpf"
	"golang.org/x/sys/unix"
)

// fuzzRules are the rules FuzzSNAT runs under; their targets are the only
// sources the program may write.
var fuzzRules = []SNATRule{
	// backend4's own host rule: IPv4 port 53 packets from it take the
	// probed host table (snat_host4_slots), the rest the trie.
	{Src: netip.PrefixFrom(backend4.Addr(), 32), Proto: UDP, SPort: 53, To: vip4, ToPort: 5300},
	// Prefixes /24../32 are expanded into that table too: the /28s
	// (DESIGN's router NAT rule) and a /30 inside them, which wins its 4
	// addresses over the /28 port rule (longer prefix).
	{Src: net4, Proto: UDP, SPort: 53, To: vip4, ToPort: 5353},
	{Src: netip.MustParsePrefix("198.19.16.12/30"), Proto: UDP, To: netip.MustParseAddr("198.18.98.11")},
	{Src: net4, Proto: TCP, To: vip4},
	// A prefix shorter than /24: only in the trie, walked when the table
	// has no rule for the packet.
	{Src: netip.MustParsePrefix("198.19.0.0/16"), Proto: UDP, SPort: 53, To: netip.MustParseAddr("198.18.98.12"), ToPort: 5354},
	{Src: net6, Proto: UDP, To: vip6, ToPort: 5353},
	{Src: net6, Proto: TCP, SPort: 53, To: vip6},
}

// FuzzSNAT feeds the program random frames and mutations of the table's
// packets. Invariant: the output is the input, or the input with only the
// source address (and port) rewritten to a rule's target (for a datagram
// that is not fragmented: the target of the rule refMatch picks), with
// the IPv4 header and L4 checksums still valid where they were valid
// before (IPv4 UDP checksum 0 stays 0).
func FuzzSNAT(f *testing.F) {
	for _, c := range append(matrixCases(), specialCases()...) {
		f.Add(c.in)
	}
	for _, p := range []pkt{
		{src: backend4, dst: client4, proto: UDP, payload: make([]byte, 300), id: 1},
		{src: backend6, dst: client6, proto: UDP, payload: make([]byte, 300), id: 2},
		{src: netip.MustParseAddrPort("198.19.16.13:53"), dst: client4, proto: UDP, payload: make([]byte, 300), id: 3},
		{src: netip.MustParseAddrPort("198.19.200.1:53"), dst: client4, proto: UDP, payload: make([]byte, 300), id: 4},
	} {
		for _, fr := range p.fragments(128) {
			f.Add(fr)
		}
	}
	tp := newTestProg(f)
	tp.add(f, fuzzRules...)
	f.Fuzz(func(t *testing.T, in []byte) {
		if len(in) < ethLen || len(in) > 1600 {
			return // BPF_PROG_TEST_RUN takes 14 bytes to about a page
		}
		opts := ebpf.RunOptions{Data: in, DataOut: make([]byte, len(in)+256)}
		ret, err := tp.objs.SnatEgress.Run(&opts)
		if errors.Is(err, unix.EINVAL) {
			return // the test-run harness refuses frames with a cut IP header
		}
		if err != nil {
			t.Fatalf("run: %v", err)
		}
		if ret != tcActUnspec {
			t.Fatalf("returned %d, want TC_ACT_UNSPEC", int32(ret))
		}
		if err := checkInvariant(in, opts.DataOut); err != nil {
			t.Fatalf("%v\nin:  %x\nout: %x", err, in, opts.DataOut)
		}
	})
}

// goParse is an independent reading of a frame: where the fields the
// program may change are, and whether its checksums can be checked.
type goParse struct {
	v6         bool
	proto      uint8
	l3, l4     int  // offsets
	later      bool // a non-first fragment: no L4 header
	fragmented bool // any fragment: the L4 checksum spans several frames
	ipEnd      int  // end of the IP datagram per its length field, -1 if beyond the frame
}

func parseGo(b []byte) (goParse, bool) {
	if len(b) < ethLen {
		return goParse{}, false
	}
	p := goParse{l3: ethLen, ipEnd: -1}
	switch binary.BigEndian.Uint16(b[12:]) {
	case etherTypeV4:
		if len(b) < ethLen+20 || b[ethLen]>>4 != 4 || b[ethLen]&0xf < 5 {
			return p, false
		}
		hl := int(b[ethLen]&0xf) * 4
		if len(b) < ethLen+hl {
			return p, false
		}
		p.proto = b[ethLen+9]
		p.l4 = ethLen + hl
		fo := binary.BigEndian.Uint16(b[ethLen+6:])
		p.later = fo&0x1fff != 0
		p.fragmented = fo&0x3fff != 0
		if end := ethLen + int(binary.BigEndian.Uint16(b[ethLen+2:])); end <= len(b) && end >= p.l4 {
			p.ipEnd = end
		}
	case etherTypeV6:
		if len(b) < ethLen+40 || b[ethLen]>>4 != 6 {
			return p, false
		}
		p.v6 = true
		p.proto = b[ethLen+6]
		p.l4 = ethLen + 40
		if p.proto == nextFragment {
			if len(b) < p.l4+8 {
				return p, false
			}
			fo := binary.BigEndian.Uint16(b[p.l4+2:])
			p.proto = b[p.l4]
			p.later = fo&0xfff8 != 0
			p.fragmented = fo&0xfff9 != 0
			p.l4 += 8
		}
		if end := ethLen + 40 + int(binary.BigEndian.Uint16(b[ethLen+4:])); end <= len(b) && end >= p.l4 {
			p.ipEnd = end
		}
	default:
		return p, false
	}
	if p.proto != uint8(UDP) && p.proto != uint8(TCP) {
		return p, false
	}
	return p, true
}

func (p goParse) saddr(b []byte) (int, int) {
	if p.v6 {
		return p.l3 + 8, p.l3 + 24
	}
	return p.l3 + 12, p.l3 + 16
}

func (p goParse) daddr(b []byte) netip.Addr {
	var a netip.Addr
	if p.v6 {
		a, _ = netip.AddrFromSlice(b[p.l3+24 : p.l3+40])
	} else {
		a, _ = netip.AddrFromSlice(b[p.l3+16 : p.l3+20])
	}
	return a
}

func (p goParse) csumOff() int { return p.l4 + csumOff(Proto(p.proto)) }

func checkInvariant(in, out []byte) error {
	if len(out) != len(in) {
		return fmt.Errorf("length changed: %d -> %d", len(in), len(out))
	}
	if bytes.Equal(in, out) {
		return nil
	}
	p, ok := parseGo(in)
	if !ok {
		return errors.New("a frame that is not IPv4/IPv6 UDP/TCP was changed")
	}
	allowed := map[int]bool{}
	s0, s1 := p.saddr(in)
	for i := s0; i < s1; i++ {
		allowed[i] = true
	}
	if !p.v6 {
		allowed[p.l3+10], allowed[p.l3+11] = true, true
	}
	hasL4 := !p.later && len(in) >= p.csumOff()+2
	if hasL4 {
		for _, i := range []int{p.l4, p.l4 + 1, p.csumOff(), p.csumOff() + 1} {
			allowed[i] = true
		}
	}
	for i := range in {
		if in[i] != out[i] && !allowed[i] {
			return fmt.Errorf("byte %d changed outside source and checksums", i)
		}
	}
	src, _ := netip.AddrFromSlice(out[s0:s1])
	oldSrc, _ := netip.AddrFromSlice(in[s0:s1])
	// The rules that could have done it (several share a target).
	var rules []SNATRule
	for _, r := range fuzzRules {
		if r.To == src && r.Src.Contains(oldSrc) && uint8(r.Proto) == p.proto {
			rules = append(rules, r)
		}
	}
	if len(rules) == 0 && src != oldSrc {
		return fmt.Errorf("source %s -> %s: no rule does that", oldSrc, src)
	}
	if hasL4 {
		oldPort, newPort := binary.BigEndian.Uint16(in[p.l4:]), binary.BigEndian.Uint16(out[p.l4:])
		if oldPort != newPort && !slices.ContainsFunc(rules, func(r SNATRule) bool { return r.ToPort == newPort }) {
			return fmt.Errorf("source port %d -> %d: no rule does that", oldPort, newPort)
		}
		// Rewritten, whole datagram: by the rule that wins it.
		if !p.fragmented && src != oldSrc {
			w, ok := refMatch(fuzzRules, netip.AddrPortFrom(oldSrc, oldPort), Proto(p.proto))
			wantPort := w.ToPort
			if wantPort == 0 {
				wantPort = oldPort
			}
			if !ok || w.To != src || wantPort != newPort {
				return fmt.Errorf("%s:%d -> %s:%d: the winning rule is %s (%v)", oldSrc, oldPort, src, newPort, w, ok)
			}
		}
	}
	if !p.v6 && ipv4HeaderOK(in[p.l3:p.l4]) && !ipv4HeaderOK(out[p.l3:p.l4]) {
		return errors.New("IPv4 header checksum was valid, is not")
	}
	if hasL4 && !p.fragmented && p.ipEnd >= 0 && p.ipEnd >= p.csumOff()+2 {
		if !p.v6 && p.proto == uint8(UDP) && binary.BigEndian.Uint16(in[p.csumOff():]) == 0 {
			if binary.BigEndian.Uint16(out[p.csumOff():]) != 0 {
				return errors.New("IPv4 UDP checksum 0 (none) was changed")
			}
			return nil
		}
		dst := p.daddr(in)
		if l4ChecksumOK(oldSrc, dst, p.proto, in[p.l4:p.ipEnd]) && !l4ChecksumOK(src, dst, p.proto, out[p.l4:p.ipEnd]) {
			return errors.New("L4 checksum was valid, is not")
		}
	}
	return nil
}
