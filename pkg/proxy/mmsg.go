package proxy

// Batched datagram I/O for the UDP hot paths, without allocations:
// recvmmsg and sendmmsg on mmsghdr arrays built once per socket, source
// addresses decoded from the raw sockaddr into a netip.AddrPort.
//
// golang.org/x/net's ReadBatch/WriteBatch do the same calls but allocate per
// call (their mmsghdr scratch, a *net.UDPAddr per datagram) and go through
// syscall.Syscall, which hands the goroutine's P to the scheduler for the
// duration of the call: a sendmmsg on a raw socket delivers the whole batch
// through veth, bridge and the upstream's socket before it returns, long
// enough for sysmon to take the P away and wake another thread to run it.
// Both calls here are made on non-blocking sockets with MSG_DONTWAIT, so
// they never sleep in the kernel: they are made as raw system calls and
// the poller waits (RawConn.Read/Write) when the kernel says EAGAIN.

import (
	"encoding/binary"
	"errors"
	"fmt"
	"net"
	"net/netip"
	"syscall"
	"unsafe"

	"golang.org/x/sys/unix"
)

// batchReader reads one UDP socket in batches with recvmmsg. It is meant
// for one goroutine.
type batchReader struct {
	rc    syscall.RawConn
	hdrs  []unix.Mmsghdr
	iovs  []unix.Iovec
	names []unix.RawSockaddrInet6 // large enough for an IPv4 sockaddr too
	bufs  [][]byte
	// The call's results, and the function RawConn.Read calls, made once:
	// a closure built per Read would be allocated per Read.
	n      int
	err    error
	recvFn func(fd uintptr) bool
}

// newBatchReader reads c in batches of n datagrams of at most size bytes.
func newBatchReader(c *net.UDPConn, n, size int) (*batchReader, error) {
	rc, err := c.SyscallConn()
	if err != nil {
		return nil, fmt.Errorf("batch reader: %w", err)
	}
	r := &batchReader{
		rc:    rc,
		hdrs:  make([]unix.Mmsghdr, n),
		iovs:  make([]unix.Iovec, n),
		names: make([]unix.RawSockaddrInet6, n),
		bufs:  make([][]byte, n),
	}
	for i := range r.hdrs {
		r.bufs[i] = make([]byte, size)
		r.iovs[i].Base = &r.bufs[i][0]
		r.iovs[i].SetLen(size)
		h := &r.hdrs[i].Hdr
		h.Name = (*byte)(unsafe.Pointer(&r.names[i]))
		h.Iov = &r.iovs[i]
		h.SetIovlen(1)
	}
	r.recvFn = r.recv
	return r, nil
}

// Read waits for datagrams (in the runtime's poller) and reads as many as
// are queued, up to the batch size. It returns how many; Datagram gives
// each until the next Read. The error wraps net.ErrClosed once the socket
// is closed.
func (r *batchReader) Read() (int, error) {
	r.n, r.err = 0, nil
	if err := r.rc.Read(r.recvFn); err != nil {
		return 0, err
	}
	if r.err != nil {
		return 0, fmt.Errorf("recvmmsg: %w", r.err)
	}
	return r.n, nil
}

// recv is one non-blocking recvmmsg; false (EAGAIN) makes RawConn.Read
// wait until the socket is readable and call it again.
func (r *batchReader) recv(fd uintptr) bool {
	for i := range r.hdrs {
		r.hdrs[i].Hdr.Namelen = unix.SizeofSockaddrInet6
		r.hdrs[i].Hdr.Flags = 0
		r.hdrs[i].Len = 0
	}
	for {
		r1, _, e := unix.RawSyscall6(unix.SYS_RECVMMSG, fd, uintptr(unsafe.Pointer(&r.hdrs[0])),
			uintptr(len(r.hdrs)), unix.MSG_DONTWAIT, 0, 0)
		switch e {
		case 0:
			r.n = int(r1)
			return true
		case unix.EINTR:
			continue
		case unix.EAGAIN:
			return false // nothing queued: wait in the poller
		default:
			r.err = e
			return true
		}
	}
}

// Datagram returns datagram i of the last Read: its source and payload
// (valid until the next Read). ok is false for a source that is not an
// IPv4 or IPv6 socket address.
func (r *batchReader) Datagram(i int) (src netip.AddrPort, payload []byte, ok bool) {
	h := &r.hdrs[i]
	src, ok = sockaddrAddrPort(&r.names[i], h.Hdr.Namelen)
	return src, r.bufs[i][:h.Len], ok
}

// sockaddrAddrPort decodes a sockaddr_in or sockaddr_in6 of length l (an
// IPv4-mapped IPv6 address stays as it is).
func sockaddrAddrPort(sa *unix.RawSockaddrInet6, l uint32) (netip.AddrPort, bool) {
	port := func(p *uint16) uint16 { return binary.BigEndian.Uint16((*[2]byte)(unsafe.Pointer(p))[:]) }
	switch sa.Family {
	case unix.AF_INET:
		if l < unix.SizeofSockaddrInet4 {
			return netip.AddrPort{}, false
		}
		s4 := (*unix.RawSockaddrInet4)(unsafe.Pointer(sa))
		return netip.AddrPortFrom(netip.AddrFrom4(s4.Addr), port(&s4.Port)), true
	case unix.AF_INET6:
		if l < unix.SizeofSockaddrInet6 {
			return netip.AddrPort{}, false
		}
		return netip.AddrPortFrom(netip.AddrFrom16(sa.Addr), port(&sa.Port)), true
	}
	return netip.AddrPort{}, false
}

// mmsgSender sends batches of prepared messages with sendmmsg on one
// socket. It is meant for one goroutine.
type mmsgSender struct {
	rc syscall.RawConn
	// The call's argument and results, and the function RawConn.Write
	// calls, made once (see batchReader).
	hdrs   []unix.Mmsghdr
	n      int
	err    error
	sendFn func(fd uintptr) bool
}

func newMmsgSender(rc syscall.RawConn) *mmsgSender {
	s := &mmsgSender{rc: rc}
	s.sendFn = s.send
	return s
}

// Send sends hdrs with one sendmmsg, waiting in the poller while the
// socket's buffer is full. Like the system call it returns how many were
// sent; when that is fewer than len(hdrs), err is the error of the first
// message not sent if it failed on its own, nil if the kernel just stopped
// early (send the rest again).
func (s *mmsgSender) Send(hdrs []unix.Mmsghdr) (int, error) {
	if len(hdrs) == 0 {
		return 0, nil
	}
	s.hdrs, s.n, s.err = hdrs, 0, nil
	err := s.rc.Write(s.sendFn)
	s.hdrs = nil
	if err != nil {
		return 0, err
	}
	if s.err != nil {
		return 0, s.err
	}
	if s.n == 0 {
		return 0, errors.New("sendmmsg sent nothing")
	}
	return s.n, nil
}

func (s *mmsgSender) send(fd uintptr) bool {
	for {
		r1, _, e := unix.RawSyscall6(unix.SYS_SENDMMSG, fd, uintptr(unsafe.Pointer(&s.hdrs[0])),
			uintptr(len(s.hdrs)), unix.MSG_DONTWAIT, 0, 0)
		switch e {
		case 0:
			s.n = int(r1)
			return true
		case unix.EINTR:
			continue
		case unix.EAGAIN:
			return false // the send buffer is full: wait in the poller
		default:
			s.err = e
			return true
		}
	}
}
