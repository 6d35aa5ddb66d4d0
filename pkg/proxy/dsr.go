package proxy

// The DSR sender: mode dsr forwards each client datagram to an upstream with
// the client's address and port as source and keeps nothing for a reply
// (nginx: proxy_bind $remote_addr:$remote_port transparent; proxy_responses 0).
//
// It writes IP+UDP headers itself on a raw socket (IPPROTO_RAW, which implies
// IP_HDRINCL / IPV6_HDRINCL) and hands a whole read batch to one sendmmsg:
// no socket is created, bound or closed per datagram and none is kept per
// client. BenchmarkDSRSend compares it with the alternative, a transparent
// UDP socket bound to the client's address:port per datagram; docs/dsr.md
// has the numbers.
//
// A datagram that does not fit the route's MTU with its headers is refused
// by the kernel on a raw socket (EMSGSIZE): it is dropped and counted in
// DSRStats.Oversize, the rest of its batch is still sent. A DNS query
// rarely comes near 1,472 bytes; docs/dsr.md says why lbctl does not
// fragment.

import (
	"encoding/binary"
	"errors"
	"fmt"
	"net"
	"net/netip"
	"os"
	"sync/atomic"
	"unsafe"

	"go.uber.org/zap"
	"golang.org/x/sys/unix"
)

// DSRDatagram is one client datagram to forward with direct server return.
type DSRDatagram struct {
	Client   netip.AddrPort // the source the upstream sees (and answers)
	Upstream netip.AddrPort // where it goes
	Payload  []byte         // the UDP payload; not retained after Send
}

// DSRStats counts what DSR senders did; one DSRStats may be shared by the
// senders of a service (one per reading goroutine).
type DSRStats struct {
	Sent     atomic.Uint64 // datagrams handed to the kernel
	Oversize atomic.Uint64 // dropped: over the MTU of the route to the upstream
	Errors   atomic.Uint64 // dropped: no route, no buffer space, wrong family, ...
}

const (
	ipv4HeaderLen = 20
	ipv6HeaderLen = 40
	udpHeaderLen  = 8
	dsrTTL        = 64
	// maxUDPPayload is the most a UDP datagram can carry over IPv4; IPv6
	// without jumbograms allows 65527, we refuse beyond the smaller one.
	maxUDPPayload = 65535 - ipv4HeaderLen - udpHeaderLen
	// dsrSendBuf is the socket send buffer asked for: a few full batches of
	// DNS-sized datagrams in flight before sendmmsg waits.
	dsrSendBuf = 4 << 20
)

// DSRSender sends batches of datagrams with spoofed sources through one raw
// socket of one address family. It is meant for one goroutine (it reuses
// its header buffers); give each reading goroutine its own.
type DSRSender struct {
	log   *zap.Logger
	stats *DSRStats
	v6    bool
	conn  *net.IPConn
	mmsg  *mmsgSender
	hdrs  []byte                      // one header slot per message
	msgs  []unix.Mmsghdr              // per message: upstream sockaddr, two iovecs
	iovs  []unix.Iovec                // per message: header, payload
	orig  []int                       // per message: its index in Send's argument
	addrs map[netip.Addr]*rawSockaddr // upstream address -> sockaddr, reused across batches
}

// rawSockaddr is the destination of a raw send (the port stays 0).
type rawSockaddr struct {
	sa  unix.RawSockaddrInet6 // or a RawSockaddrInet4 in its first bytes
	len uint32
}

// NewDSRSender opens a raw socket for IPv6 (v6) or IPv4 datagrams. It needs
// CAP_NET_RAW. stats may be nil.
func NewDSRSender(log *zap.Logger, v6 bool, stats *DSRStats) (*DSRSender, error) {
	if log == nil {
		log = zap.NewNop()
	}
	if stats == nil {
		stats = new(DSRStats)
	}
	fam := unix.AF_INET
	if v6 {
		fam = unix.AF_INET6
	}
	fd, err := unix.Socket(fam, unix.SOCK_RAW|unix.SOCK_NONBLOCK|unix.SOCK_CLOEXEC, unix.IPPROTO_RAW)
	if err != nil {
		return nil, fmt.Errorf("open dsr raw socket: %w (needs CAP_NET_RAW: run lbctl as root)", err)
	}
	// Bigger than the default so a burst waits less; SO_SNDBUFFORCE passes
	// net.core.wmem_max with CAP_NET_ADMIN, plain SO_SNDBUF is capped by it.
	if unix.SetsockoptInt(fd, unix.SOL_SOCKET, unix.SO_SNDBUFFORCE, dsrSendBuf) != nil {
		_ = unix.SetsockoptInt(fd, unix.SOL_SOCKET, unix.SO_SNDBUF, dsrSendBuf)
	}
	f := os.NewFile(uintptr(fd), "dsr-raw")
	c, err := net.FilePacketConn(f)
	f.Close()
	if err != nil {
		return nil, fmt.Errorf("open dsr raw socket: %w", err)
	}
	ic, ok := c.(*net.IPConn)
	if !ok {
		c.Close()
		return nil, fmt.Errorf("open dsr raw socket: got %T, want an IP socket", c)
	}
	rc, err := ic.SyscallConn()
	if err != nil {
		ic.Close()
		return nil, fmt.Errorf("open dsr raw socket: %w", err)
	}
	return &DSRSender{
		log:   log,
		stats: stats,
		v6:    v6,
		conn:  ic,
		mmsg:  newMmsgSender(rc),
		addrs: map[netip.Addr]*rawSockaddr{},
	}, nil
}

// BindToDevice makes the sender's datagrams leave by ifname only
// (SO_BINDTODEVICE; the service's `interface` key), whatever the routing
// table says. Needs CAP_NET_RAW.
func (s *DSRSender) BindToDevice(ifname string) error {
	rc, err := s.conn.SyscallConn()
	if err != nil {
		return fmt.Errorf("bind dsr raw socket to %s: %w", ifname, err)
	}
	var serr error
	if err := rc.Control(func(fd uintptr) { serr = unix.BindToDevice(int(fd), ifname) }); err != nil {
		return fmt.Errorf("bind dsr raw socket to %s: %w", ifname, err)
	}
	if serr != nil {
		return fmt.Errorf("bind dsr raw socket to %s: %w (check the service's interface key)", ifname, serr)
	}
	return nil
}

// Close closes the raw socket.
func (s *DSRSender) Close() error { return s.conn.Close() }

// Stats returns the counters the sender adds to.
func (s *DSRSender) Stats() *DSRStats { return s.stats }

func (s *DSRSender) hdrLen() int {
	if s.v6 {
		return ipv6HeaderLen + udpHeaderLen
	}
	return ipv4HeaderLen + udpHeaderLen
}

// grow makes room for n messages.
func (s *DSRSender) grow(n int) {
	if n <= len(s.msgs) {
		return
	}
	s.hdrs = make([]byte, n*s.hdrLen())
	s.msgs = make([]unix.Mmsghdr, n)
	s.iovs = make([]unix.Iovec, 2*n)
	s.orig = make([]int, n)
	for i := range s.msgs {
		s.msgs[i].Hdr.Iov = &s.iovs[2*i]
		s.msgs[i].Hdr.SetIovlen(2)
	}
}

// Send sends every datagram of ds, in as few sendmmsg calls as the kernel
// allows (one, normally). It returns how many were sent; the rest are
// counted in Stats() (Oversize or Errors) and the first error is returned.
func (s *DSRSender) Send(ds []DSRDatagram) (int, error) {
	s.grow(len(ds))
	hl := s.hdrLen()
	// Build the messages; skip (and count) the malformed ones.
	n := 0
	var firstErr error
	fail := func(err error) {
		s.stats.Errors.Add(1)
		if firstErr == nil {
			firstErr = err
		}
	}
	for i := range ds {
		d := &ds[i]
		hdr := s.hdrs[n*hl : (n+1)*hl : (n+1)*hl]
		if err := s.header(hdr, d); err != nil {
			fail(err)
			continue
		}
		m := &s.msgs[n]
		s.iovs[2*n].Base = &hdr[0]
		s.iovs[2*n].SetLen(hl)
		if len(d.Payload) > 0 {
			s.iovs[2*n+1].Base = &d.Payload[0]
		}
		s.iovs[2*n+1].SetLen(len(d.Payload))
		sa := s.sockaddr(d.Upstream.Addr().Unmap())
		m.Hdr.Name = (*byte)(unsafe.Pointer(&sa.sa))
		m.Hdr.Namelen = sa.len
		s.orig[n] = i
		n++
	}
	sent := 0
	for i := 0; i < n; {
		k, err := s.mmsg.Send(s.msgs[i:n])
		sent += k
		i += k
		if i >= n {
			break
		}
		if err == nil {
			continue // the next call reports the message that stopped this one
		}
		// Message i failed on its own.
		d := &ds[s.orig[i]]
		if errors.Is(err, unix.EMSGSIZE) {
			s.stats.Oversize.Add(1)
			if firstErr == nil {
				firstErr = fmt.Errorf("dsr send from %s to %s: %d bytes do not fit the MTU, dropped: %w", d.Client, d.Upstream, len(d.Payload), err)
			}
		} else {
			fail(fmt.Errorf("dsr send from %s to %s: %w", d.Client, d.Upstream, err))
		}
		i++
	}
	for i := 0; i < n; i++ { // drop references to the callers' buffers
		s.iovs[2*i+1].Base = nil
	}
	s.stats.Sent.Add(uint64(sent))
	return sent, firstErr
}

// sockaddr returns the destination address of a raw send to a, cached: the
// upstreams are few, datagrams are many.
func (s *DSRSender) sockaddr(a netip.Addr) *rawSockaddr {
	if sa, ok := s.addrs[a]; ok {
		return sa
	}
	sa := new(rawSockaddr)
	if a.Is4() {
		s4 := (*unix.RawSockaddrInet4)(unsafe.Pointer(&sa.sa))
		s4.Family = unix.AF_INET
		s4.Addr = a.As4()
		sa.len = unix.SizeofSockaddrInet4
	} else {
		sa.sa.Family = unix.AF_INET6
		sa.sa.Addr = a.As16()
		sa.len = unix.SizeofSockaddrInet6
	}
	if len(s.addrs) > 4096 { // upstreams changed a lot over reloads; start over
		clear(s.addrs)
	}
	s.addrs[a] = sa
	return sa
}

var errFamily = errors.New("address family does not match the sender's")

// header writes the IP and UDP headers of d into hdr (len s.hdrLen()).
func (s *DSRSender) header(hdr []byte, d *DSRDatagram) error {
	src, dst := d.Client.Addr().Unmap(), d.Upstream.Addr().Unmap()
	if len(d.Payload) > maxUDPPayload {
		return fmt.Errorf("dsr send from %s to %s: %d bytes is more than a UDP datagram holds", d.Client, d.Upstream, len(d.Payload))
	}
	if src.Is4() != !s.v6 || dst.Is4() != !s.v6 {
		return fmt.Errorf("dsr send from %s to %s: %w", d.Client, d.Upstream, errFamily)
	}
	if s.v6 {
		buildIPv6UDP(hdr, src, dst, d.Client.Port(), d.Upstream.Port(), d.Payload)
	} else {
		buildIPv4UDP(hdr, src, dst, d.Client.Port(), d.Upstream.Port(), d.Payload)
	}
	return nil
}

// buildIPv4UDP writes a 20-byte IPv4 header and a UDP header with its
// checksum. The kernel fills in the IP id (when 0) and the IP header
// checksum of an IP_HDRINCL packet; the total length is written here anyway.
func buildIPv4UDP(hdr []byte, src, dst netip.Addr, sport, dport uint16, payload []byte) {
	ulen := udpHeaderLen + len(payload)
	hdr[0] = 0x45 // version 4, IHL 5
	hdr[1] = 0
	binary.BigEndian.PutUint16(hdr[2:], uint16(ipv4HeaderLen+ulen))
	binary.BigEndian.PutUint32(hdr[4:], 0) // id (kernel), flags, fragment offset
	hdr[8] = dsrTTL
	hdr[9] = unix.IPPROTO_UDP
	s4, d4 := src.As4(), dst.As4()
	copy(hdr[12:16], s4[:])
	copy(hdr[16:20], d4[:])
	binary.BigEndian.PutUint16(hdr[10:], 0)
	binary.BigEndian.PutUint16(hdr[10:], ^fold(sum(hdr[:ipv4HeaderLen], 0)))

	u := hdr[ipv4HeaderLen:]
	putUDP(u, sport, dport, ulen)
	acc := sum(hdr[12:20], uint64(unix.IPPROTO_UDP)+uint64(ulen)) // pseudo header
	binary.BigEndian.PutUint16(u[6:], udpChecksum(acc, u, payload))
}

// buildIPv6UDP writes a 40-byte IPv6 header and a UDP header with its
// checksum (mandatory over IPv6).
func buildIPv6UDP(hdr []byte, src, dst netip.Addr, sport, dport uint16, payload []byte) {
	ulen := udpHeaderLen + len(payload)
	binary.BigEndian.PutUint32(hdr[0:], 6<<28) // version 6, class 0, flow label 0
	binary.BigEndian.PutUint16(hdr[4:], uint16(ulen))
	hdr[6] = unix.IPPROTO_UDP
	hdr[7] = dsrTTL
	s16, d16 := src.As16(), dst.As16()
	copy(hdr[8:24], s16[:])
	copy(hdr[24:40], d16[:])

	u := hdr[ipv6HeaderLen:]
	putUDP(u, sport, dport, ulen)
	acc := sum(hdr[8:40], uint64(unix.IPPROTO_UDP)+uint64(ulen)) // pseudo header
	binary.BigEndian.PutUint16(u[6:], udpChecksum(acc, u, payload))
}

func putUDP(u []byte, sport, dport uint16, ulen int) {
	binary.BigEndian.PutUint16(u[0:], sport)
	binary.BigEndian.PutUint16(u[2:], dport)
	binary.BigEndian.PutUint16(u[4:], uint16(ulen))
	binary.BigEndian.PutUint16(u[6:], 0)
}

// udpChecksum finishes a UDP checksum from the pseudo-header sum acc; a
// computed 0 is sent as 0xffff (0 means "no checksum" over IPv4, and is
// invalid over IPv6).
func udpChecksum(acc uint64, udp, payload []byte) uint16 {
	c := ^fold(sum(payload, sum(udp[:udpHeaderLen], acc)))
	if c == 0 {
		c = 0xffff
	}
	return c
}

// sum adds b to the ones'-complement accumulator acc, as big-endian 16-bit
// words (a last odd byte padded with zero). 32-bit words summed into 64
// bits fold to the same 16-bit result.
func sum(b []byte, acc uint64) uint64 {
	for len(b) >= 8 {
		acc += uint64(binary.BigEndian.Uint32(b)) + uint64(binary.BigEndian.Uint32(b[4:]))
		b = b[8:]
	}
	if len(b) >= 4 {
		acc += uint64(binary.BigEndian.Uint32(b))
		b = b[4:]
	}
	if len(b) >= 2 {
		acc += uint64(binary.BigEndian.Uint16(b))
		b = b[2:]
	}
	if len(b) == 1 {
		acc += uint64(b[0]) << 8
	}
	return acc
}

func fold(acc uint64) uint16 {
	for acc>>16 != 0 {
		acc = acc&0xffff + acc>>16
	}
	return uint16(acc)
}
