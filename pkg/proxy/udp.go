package proxy

import (
	"context"
	"errors"
	"fmt"
	"net"
	"net/netip"
	"os"
	"sync"
	"sync/atomic"
	"syscall"
	"time"

	"go.uber.org/zap"
	"golang.org/x/sys/unix"
)

const (
	// DefaultUDPTimeout applies when Service.Timeout is 0.
	DefaultUDPTimeout = 30 * time.Second
	// batchSize is the number of datagrams one recvmmsg reads.
	batchSize = 16
	// maxDatagram is the largest UDP payload.
	maxDatagram = 65535
	// maxPending bounds the unanswered datagrams a session keeps to send
	// again to the next upstream.
	maxPending = 16
)

// UDP is the UDP front end of one service: a SO_REUSEPORT socket per core
// on the listen address, each read in batches (recvmmsg), and a session per
// client address:port with its own connected upstream socket. Replies go
// back to the client from the listen address.
//
// Like nginx, a session waits for Responses replies per client datagram
// (`proxy_responses`): with responses: 1 a DNS query's session ends with
// its answer. A session that got no reply at all within Timeout is an
// upstream failure: it is reported to the pool and the unanswered datagrams
// go to the next upstream while NextUpstreamTries allows. Otherwise a
// session ends after Timeout without traffic either way.
type UDP struct {
	log    *zap.Logger
	dialer Dialer
	state  atomic.Pointer[udpState]

	socks    []*udpSock
	readers  sync.WaitGroup
	sessions sync.WaitGroup
	// gate orders the start of a session (sessions.Add) before Stop's
	// sessions.Wait: a session is admitted under RLock while not draining;
	// Stop sets draining under Lock.
	gate     sync.RWMutex
	draining atomic.Bool
	stats    stats
}

type udpState struct {
	svc  Service
	pool *Pool
}

type udpSock struct {
	u    *UDP
	conn *net.UDPConn

	mu       sync.Mutex
	sessions map[netip.AddrPort]*session
}

// NewUDP returns the UDP front end of svc; Start opens it.
func NewUDP(svc Service, pool *Pool, d Dialer, log *zap.Logger) *UDP {
	u := &UDP{log: log.With(zap.String("service", svc.Name)), dialer: d}
	u.state.Store(&udpState{svc, pool})
	return u
}

// Start implements Frontend.
func (u *UDP) Start() error {
	svc := u.state.Load().svc
	conns, err := listenUDP(u.dialer, svc.Listen, listeners())
	if err != nil {
		return err
	}
	for _, c := range conns {
		u.socks = append(u.socks, &udpSock{u: u, conn: c, sessions: map[netip.AddrPort]*session{}})
	}
	for _, s := range u.socks {
		u.readers.Add(1)
		go s.read()
	}
	u.log.Info("listening", zap.String("protocol", "udp"), zap.Stringer("listen", svc.Listen), zap.Int("sockets", len(u.socks)))
	return nil
}

// Addr is the listening address (useful with port 0).
func (u *UDP) Addr() netip.AddrPort { return u.socks[0].conn.LocalAddr().(*net.UDPAddr).AddrPort() }

// Update implements Frontend.
func (u *UDP) Update(svc Service, pool *Pool) { u.state.Store(&udpState{svc, pool}) }

// Pool implements Frontend.
func (u *UDP) Pool() *Pool { return u.state.Load().pool }

// Stats implements Frontend.
func (u *UDP) Stats() Stats { return u.stats.snapshot() }

func (u *UDP) closeSocks() {
	for _, s := range u.socks {
		s.conn.Close()
	}
}

// Stop implements Frontend: no new sessions; open ones go on until they
// end or ctx is done; then the sockets close.
func (u *UDP) Stop(ctx context.Context) error {
	u.gate.Lock()
	u.draining.Store(true)
	u.gate.Unlock()
	done := make(chan struct{})
	go func() { u.sessions.Wait(); close(done) }()
	select {
	case <-done:
	case <-ctx.Done():
		n := 0
		for _, s := range u.socks {
			s.mu.Lock()
			for _, ss := range s.sessions {
				ss.abort()
				n++
			}
			s.mu.Unlock()
		}
		u.log.Warn("drain timeout: closed open sessions", zap.Int("sessions", n))
		<-done
	}
	u.closeSocks()
	u.readers.Wait()
	return nil
}

func (s *udpSock) read() {
	defer s.u.readers.Done()
	br, err := newBatchReader(s.conn, batchSize, maxDatagram)
	if err != nil {
		s.u.log.Error("read failed", zap.Error(err))
		return
	}
	for {
		n, err := br.Read()
		if err != nil {
			if errors.Is(err, net.ErrClosed) {
				return
			}
			s.u.log.Warn("read failed", zap.Error(err))
			continue
		}
		for j := range n {
			client, b, ok := br.Datagram(j)
			if !ok {
				continue
			}
			s.dispatch(client, b)
		}
	}
}

// dispatch hands a client datagram to its session, starting one if needed.
func (s *udpSock) dispatch(client netip.AddrPort, b []byte) {
	u := s.u
	s.mu.Lock()
	ss := s.sessions[client]
	s.mu.Unlock()
	if ss != nil && ss.send(b) {
		return
	}
	st := u.state.Load()
	u.gate.RLock()
	if u.draining.Load() || (st.svc.MaxConns > 0 && u.stats.active.Load() >= int64(st.svc.MaxConns)) {
		u.gate.RUnlock()
		u.stats.rejected.Add(1)
		return
	}
	u.sessions.Add(1)
	u.gate.RUnlock()
	ss = u.newSession(s, st, client)
	if ss == nil {
		u.sessions.Done()
		return
	}
	s.mu.Lock()
	s.sessions[client] = ss
	s.mu.Unlock()
	u.stats.active.Add(1)
	u.stats.accepted.Add(1)
	ss.send(b)
	if st.svc.Responses == 0 { // no reply expected: done once sent
		ss.end(true)
		return
	}
	go ss.run()
}

// session is one client address:port and its upstream socket.
type session struct {
	sock   *udpSock
	st     *udpState
	client netip.AddrPort
	tried  Tried
	tries  int

	mu        sync.Mutex
	i         int          // upstream index
	conn      *net.UDPConn // connected to the upstream
	requests  int          // client datagrams
	replies   int          // upstream datagrams
	pending   [][]byte     // sent while no reply came, for a retry
	waitSince time.Time    // first unanswered datagram since the last reply
	last      time.Time    // last traffic either way
	sendErr   error        // a send failed (ICMP unreachable): the reader retries
	ended     bool
}

// newSession picks an upstream and opens a socket to it, trying the next
// when opening fails.
func (u *UDP) newSession(s *udpSock, st *udpState, client netip.AddrPort) *session {
	ss := &session{sock: s, st: st, client: client, tries: st.pool.Tries(st.svc.NextUpstreamTries), i: -1}
	if !ss.next() {
		u.stats.failed.Add(1)
		u.log.Error("no upstream reachable, datagram dropped", zap.Stringer("client", client), zap.Int("tried", ss.tried.Len()))
		return nil
	}
	return ss
}

// next moves the session to the next upstream; false when none is left.
// Called with ss.mu held or before the session is shared.
func (ss *session) next() bool {
	pool, u := ss.st.pool, ss.sock.u
	for ss.tried.Len() < ss.tries {
		i := pool.Pick(ss.client, &ss.tried)
		if i < 0 {
			return false
		}
		ss.tried.Add(i)
		c, err := u.dialer.DialUDP(ss.client, pool.Addr(i))
		if err != nil {
			pool.ReportFailure(i)
			u.log.Warn("upstream socket failed", zap.Stringer("upstream", pool.Addr(i)), zap.Error(err))
			continue
		}
		if ss.conn != nil {
			u.dialer.ReleaseUDP(ss.conn, pool.Addr(ss.i), false)
			pool.Release(ss.i)
		}
		pool.Acquire(i)
		ss.i, ss.conn = i, c
		return true
	}
	return false
}

// send forwards a client datagram; false when the session has ended.
func (ss *session) send(b []byte) bool {
	now := time.Now()
	ss.mu.Lock()
	defer ss.mu.Unlock()
	if ss.ended {
		return false
	}
	if ss.outstanding() == 0 {
		ss.waitSince = now
	}
	ss.requests++
	ss.last = now
	if ss.replies == 0 && ss.st.svc.Responses != 0 && len(ss.pending) < maxPending {
		ss.pending = append(ss.pending, append([]byte(nil), b...))
	}
	ss.sock.u.stats.bytesIn.Add(uint64(len(b)))
	if _, err := ss.conn.Write(b); err != nil && ss.sendErr == nil {
		ss.sendErr = err
		ss.conn.SetReadDeadline(now) // wake the reader
	}
	return true
}

// outstanding is the number of replies still awaited (ss.mu held).
func (ss *session) outstanding() int {
	r := ss.st.svc.Responses
	if r < 0 {
		r = 1 // unlimited: at least one reply per datagram awaited
	}
	return max(0, r*ss.requests-ss.replies)
}

func (ss *session) timeout() time.Duration {
	if t := ss.st.svc.Timeout; t > 0 {
		return t
	}
	return DefaultUDPTimeout
}

var replyBufs = sync.Pool{New: func() any { b := make([]byte, maxDatagram); return &b }}

// readReply waits for a datagram on c (deadline included) and reads it
// into a pooled buffer taken only once one is there: a waiting session
// holds no 64 KiB buffer, so idle sessions cost a goroutine, not memory.
func readReply(c *net.UDPConn) (*[]byte, int, error) {
	rc, err := c.SyscallConn()
	if err != nil {
		return nil, 0, err
	}
	var bp *[]byte
	var n int
	var rerr error
	err = rc.Read(func(fd uintptr) bool {
		bp = replyBufs.Get().(*[]byte)
		n, _, rerr = unix.Recvfrom(int(fd), *bp, unix.MSG_DONTWAIT)
		if rerr == unix.EAGAIN || rerr == unix.EINTR {
			replyBufs.Put(bp)
			bp = nil
			return false // not ready: wait in the poller
		}
		return true
	})
	if err == nil {
		err = rerr
	}
	if err != nil {
		if bp != nil { // read, but failed (port unreachable)
			replyBufs.Put(bp)
		}
		return nil, 0, err
	}
	return bp, n, nil
}

// run reads the upstream's replies and relays them to the client.
func (ss *session) run() {
	timeout := ss.timeout()
	for {
		ss.mu.Lock()
		conn := ss.conn
		deadline := ss.last.Add(timeout)
		if ss.replies == 0 {
			deadline = ss.waitSince.Add(timeout)
		}
		sendErr := ss.sendErr
		ss.mu.Unlock()
		var err error
		if sendErr != nil {
			err = sendErr
		} else {
			conn.SetReadDeadline(deadline)
			var bp *[]byte
			var n int
			if bp, n, err = readReply(conn); err == nil {
				more := ss.reply((*bp)[:n])
				replyBufs.Put(bp)
				if !more {
					return
				}
				continue
			}
		}
		now := time.Now()
		ss.mu.Lock()
		ss.sendErr = nil
		failed := ss.replies == 0 && !now.Before(ss.waitSince.Add(timeout))
		idle := !now.Before(ss.last.Add(timeout))
		ss.mu.Unlock()
		switch {
		case errors.Is(err, os.ErrDeadlineExceeded) && !failed && !idle:
			continue // traffic moved the deadline
		case errors.Is(err, os.ErrDeadlineExceeded) && !failed:
			ss.end(ss.outstandingLocked() == 0)
			return
		case errors.Is(err, net.ErrClosed):
			ss.end(false)
			return
		}
		// No reply within timeout, or the upstream refused (ICMP port
		// unreachable on the connected socket): an upstream failure.
		if !ss.retry(err) {
			return
		}
	}
}

// reply relays one upstream datagram; false when the session ended.
func (ss *session) reply(b []byte) bool {
	u := ss.sock.u
	ss.mu.Lock()
	ss.replies++
	first := ss.replies == 1
	ss.pending = nil
	ss.last = time.Now()
	done := ss.st.svc.Responses > 0 && ss.outstanding() == 0
	if done {
		ss.waitSince = time.Time{}
	}
	i := ss.i
	ss.mu.Unlock()
	if first {
		ss.st.pool.ReportSuccess(i)
	}
	u.stats.bytesOut.Add(uint64(len(b)))
	if _, err := ss.sock.conn.WriteToUDPAddrPort(b, ss.client); err != nil {
		u.log.Debug("reply to client failed", zap.Stringer("client", ss.client), zap.Error(err))
	}
	if done {
		// end re-checks under the lock: a datagram sent meanwhile keeps it.
		if ss.endIfAnswered() {
			return false
		}
	}
	return true
}

func (ss *session) outstandingLocked() int {
	ss.mu.Lock()
	defer ss.mu.Unlock()
	return ss.outstanding()
}

// retry reports the failure and moves to the next upstream with the
// unanswered datagrams; false (session ended) when none is left.
func (ss *session) retry(cause error) bool {
	u, pool := ss.sock.u, ss.st.pool
	ss.mu.Lock()
	failedUp := ss.i
	ss.mu.Unlock()
	pool.ReportFailure(failedUp)
	u.log.Warn("upstream failed", zap.Stringer("upstream", pool.Addr(failedUp)),
		zap.Stringer("client", ss.client), zap.NamedError("cause", describeUDPErr(cause)))
	ss.mu.Lock()
	if ss.ended || !ss.next() {
		ss.mu.Unlock()
		u.stats.failed.Add(1)
		ss.end(false)
		return false
	}
	now := time.Now()
	ss.waitSince, ss.last = now, now
	for _, b := range ss.pending {
		if _, err := ss.conn.Write(b); err != nil && ss.sendErr == nil {
			ss.sendErr = err
		}
	}
	ss.mu.Unlock()
	return true
}

func describeUDPErr(err error) error {
	switch {
	case errors.Is(err, os.ErrDeadlineExceeded):
		return errors.New("no reply within timeout")
	case errors.Is(err, syscall.ECONNREFUSED):
		return errors.New("port unreachable (connection refused)")
	}
	return err
}

// endIfAnswered ends the session when no reply is outstanding.
func (ss *session) endIfAnswered() bool {
	ss.mu.Lock()
	if ss.ended || ss.outstanding() != 0 {
		ss.mu.Unlock()
		return false
	}
	ss.mu.Unlock()
	ss.end(true)
	return true
}

// end closes the session once: it stops taking datagrams, leaves the
// socket's table and gives its upstream socket back (reusable when clean
// and nothing is outstanding).
func (ss *session) end(clean bool) {
	ss.mu.Lock()
	if ss.ended {
		ss.mu.Unlock()
		return
	}
	ss.ended = true
	// A session of unlimited responses may always get one more reply: its
	// socket is never reused.
	clean = clean && ss.st.svc.Responses > 0 && ss.outstanding() == 0 && ss.sendErr == nil
	conn, i := ss.conn, ss.i
	ss.mu.Unlock()

	s := ss.sock
	s.mu.Lock()
	if s.sessions[ss.client] == ss {
		delete(s.sessions, ss.client)
	}
	s.mu.Unlock()
	if clean {
		conn.SetReadDeadline(time.Time{})
	}
	s.u.dialer.ReleaseUDP(conn, ss.st.pool.Addr(i), clean)
	ss.st.pool.Release(i)
	s.u.stats.active.Add(-1)
	s.u.sessions.Done()
}

// abort closes the session's upstream socket; its reader ends it.
func (ss *session) abort() {
	ss.mu.Lock()
	defer ss.mu.Unlock()
	if !ss.ended {
		ss.conn.Close()
	}
}

// listenUDP opens the UDP listening sockets of a service: n on addr with
// SO_REUSEPORT (the kernel spreads clients over them), made through d.
// Port 0 (tests): the others join the port the kernel chose.
func listenUDP(d Dialer, addr netip.AddrPort, n int) ([]*net.UDPConn, error) {
	lc := listenConfig(d, true)
	var conns []*net.UDPConn
	for range n {
		pc, err := lc.ListenPacket(context.Background(), network("udp", addr), addr.String())
		if err != nil {
			for _, c := range conns {
				c.Close()
			}
			return nil, fmt.Errorf("listen udp %s: %w (is another process listening there, or is the address not on this host?)", addr, err)
		}
		c := pc.(*net.UDPConn)
		conns = append(conns, c)
		if addr.Port() == 0 {
			addr = c.LocalAddr().(*net.UDPAddr).AddrPort()
		}
	}
	return conns, nil
}
