package main

// Batched UDP serving: recvmmsg a batch of queries, answer each, sendmmsg
// the answers back to their sources, all as raw non-blocking system calls
// with the runtime's poller waiting on EAGAIN (as pkg/proxy/mmsg.go does
// for lbctl). One read per datagram through net.UDPConn cost this demo
// backend ~13 µs of CPU per DNS query under the benchmark's load, most of
// it Go scheduler hand-offs around each blocking-style system call; the
// backend is on the path of every DNS line of `make bench`, so its cost
// set the routed floor and weighed on every proxy line. docs/bench.md has
// the numbers.

import (
	"errors"
	"fmt"
	"net"
	"syscall"
	"unsafe"

	"go.uber.org/zap"
	"golang.org/x/sys/unix"
)

const (
	udpBatch = 16    // datagrams per recvmmsg / sendmmsg
	udpMax   = 65536 // the largest datagram read
	udpOut   = 4096  // each answer's buffer; a handler may grow it
)

// udpBatcher serves one UDP socket. It is meant for one goroutine.
type udpBatcher struct {
	rc    syscall.RawConn
	rhdrs []unix.Mmsghdr // receive: one per datagram, iovec -> in[i]
	riovs []unix.Iovec
	names []unix.RawSockaddrInet6 // sources, reused as the answers' destinations
	in    [][]byte
	shdrs []unix.Mmsghdr // send: the answers of the current batch
	siovs []unix.Iovec
	out   [][]byte

	// The current call's arguments and results; the closures RawConn
	// calls are made once (a closure per call would allocate per call).
	n, sendOff, sendN int
	err               error
	recvFn, sendFn    func(fd uintptr) bool
}

func newUDPBatcher(conn *net.UDPConn) (*udpBatcher, error) {
	rc, err := conn.SyscallConn()
	if err != nil {
		return nil, fmt.Errorf("udp batcher: %w", err)
	}
	b := &udpBatcher{
		rc:    rc,
		rhdrs: make([]unix.Mmsghdr, udpBatch),
		riovs: make([]unix.Iovec, udpBatch),
		names: make([]unix.RawSockaddrInet6, udpBatch),
		in:    make([][]byte, udpBatch),
		shdrs: make([]unix.Mmsghdr, udpBatch),
		siovs: make([]unix.Iovec, udpBatch),
		out:   make([][]byte, udpBatch),
	}
	for i := range b.rhdrs {
		b.in[i] = make([]byte, udpMax)
		b.out[i] = make([]byte, 0, udpOut)
		b.riovs[i].Base = &b.in[i][0]
		b.riovs[i].SetLen(udpMax)
		h := &b.rhdrs[i].Hdr
		h.Name = (*byte)(unsafe.Pointer(&b.names[i]))
		h.Iov = &b.riovs[i]
		h.SetIovlen(1)
		b.shdrs[i].Hdr.Iov = &b.siovs[i]
		b.shdrs[i].Hdr.SetIovlen(1)
	}
	b.recvFn, b.sendFn = b.recv, b.send
	return b, nil
}

// serve answers datagrams with h until the socket is closed.
func (b *udpBatcher) serve(log *zap.Logger, h handler) {
	for {
		b.n, b.err = 0, nil
		if err := b.rc.Read(b.recvFn); err != nil {
			return // closed
		}
		if b.err != nil {
			log.Warn("udp read", zap.Error(b.err))
			continue
		}
		k := 0
		for i := range b.n {
			r := &b.rhdrs[i]
			reply, ok := h(b.in[i][:r.Len], b.out[i][:0])
			if !ok {
				continue
			}
			if cap(reply) > cap(b.out[i]) && cap(reply) <= udpMax {
				b.out[i] = reply[:0] // keep the grown buffer for the next batch
			}
			s := &b.shdrs[k]
			s.Hdr.Name = r.Hdr.Name
			s.Hdr.Namelen = r.Hdr.Namelen
			if len(reply) > 0 {
				b.siovs[k].Base = &reply[0]
			} else {
				b.siovs[k].Base = nil
			}
			b.siovs[k].SetLen(len(reply))
			k++
		}
		b.sendAll(log, k)
	}
}

// sendAll sends the first k answers; one that fails on its own (e.g. no
// route back) is logged and skipped, the rest still go.
func (b *udpBatcher) sendAll(log *zap.Logger, k int) {
	b.sendOff = 0
	for b.sendOff < k {
		b.sendN, b.err = k, nil
		if err := b.rc.Write(b.sendFn); err != nil {
			return // closed
		}
		if b.err != nil {
			log.Debug("udp write", zap.Error(b.err))
			b.sendOff++ // skip the message that failed
		}
	}
}

// recv is one non-blocking recvmmsg; false (EAGAIN) makes RawConn.Read
// wait in the poller and call it again.
func (b *udpBatcher) recv(fd uintptr) bool {
	for i := range b.rhdrs {
		b.rhdrs[i].Hdr.Namelen = unix.SizeofSockaddrInet6
		b.rhdrs[i].Hdr.Flags = 0
		b.rhdrs[i].Len = 0
	}
	for {
		r1, _, e := unix.RawSyscall6(unix.SYS_RECVMMSG, fd, uintptr(unsafe.Pointer(&b.rhdrs[0])),
			uintptr(len(b.rhdrs)), unix.MSG_DONTWAIT, 0, 0)
		switch {
		case e == 0:
			b.n = int(r1)
			return true
		case e == unix.EINTR:
			continue
		case e == unix.EAGAIN:
			return false
		default:
			b.err = e
			return true
		}
	}
}

// send sends answers sendOff..sendN-1, advancing sendOff; it returns true
// when all are sent or one failed (b.err), false to wait for buffer space.
func (b *udpBatcher) send(fd uintptr) bool {
	for b.sendOff < b.sendN {
		r1, _, e := unix.RawSyscall6(unix.SYS_SENDMMSG, fd, uintptr(unsafe.Pointer(&b.shdrs[b.sendOff])),
			uintptr(b.sendN-b.sendOff), unix.MSG_DONTWAIT, 0, 0)
		switch {
		case e == 0 && r1 > 0:
			b.sendOff += int(r1)
		case e == 0:
			b.err = errors.New("sendmmsg sent nothing")
			return true
		case e == unix.EINTR:
		case e == unix.EAGAIN:
			return false
		default:
			b.err = e
			return true
		}
	}
	return true
}
