package proxy

import (
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"net/netip"
	"os"
	"sync"
	"sync/atomic"
	"time"

	"go.uber.org/zap"
)

// DefaultConnectTimeout applies when Service.ConnectTimeout is 0.
const DefaultConnectTimeout = 5 * time.Second

// spliceChunk bounds one spliced copy so the idle deadline is renewed
// while data flows.
const spliceChunk = 1 << 20

// TCP is the TCP front end of one service.
type TCP struct {
	log    *zap.Logger
	dialer Dialer
	state  atomic.Pointer[tcpState]

	ln      net.Listener
	wg      sync.WaitGroup
	mu      sync.Mutex
	conns   map[*tcpConn]struct{}
	closing bool
	stats   stats
}

type tcpState struct {
	svc  Service
	pool *Pool
}

type stats struct {
	active                     atomic.Int64
	accepted, rejected, failed atomic.Uint64
	bytesIn, bytesOut          atomic.Uint64
}

func (s *stats) snapshot() Stats {
	return Stats{
		Active: s.active.Load(), Accepted: s.accepted.Load(), Rejected: s.rejected.Load(),
		Failed: s.failed.Load(), BytesIn: s.bytesIn.Load(), BytesOut: s.bytesOut.Load(),
	}
}

// NewTCP returns the TCP front end of svc; Start opens it.
func NewTCP(svc Service, pool *Pool, d Dialer, log *zap.Logger) *TCP {
	t := &TCP{log: log.With(zap.String("service", svc.Name)), dialer: d, conns: map[*tcpConn]struct{}{}}
	t.state.Store(&tcpState{svc, pool})
	return t
}

// Start implements Frontend.
func (t *TCP) Start() error {
	svc := t.state.Load().svc
	ln, err := listenConfig(t.dialer, false).Listen(context.Background(), network("tcp", svc.Listen), svc.Listen.String())
	if err != nil {
		return fmt.Errorf("listen tcp %s: %w (is another process listening there, or is the address not on this host?)", svc.Listen, err)
	}
	t.ln = ln
	t.wg.Add(1)
	go t.accept()
	t.log.Info("listening", zap.String("protocol", "tcp"), zap.Stringer("listen", svc.Listen))
	return nil
}

// Addr is the listening address (useful with port 0).
func (t *TCP) Addr() netip.AddrPort { return t.ln.Addr().(*net.TCPAddr).AddrPort() }

// Update implements Frontend.
func (t *TCP) Update(svc Service, pool *Pool) { t.state.Store(&tcpState{svc, pool}) }

// Pool implements Frontend.
func (t *TCP) Pool() *Pool { return t.state.Load().pool }

// Stats implements Frontend.
func (t *TCP) Stats() Stats { return t.stats.snapshot() }

func (t *TCP) accept() {
	defer t.wg.Done()
	var delay time.Duration
	for {
		c, err := t.ln.Accept()
		if err != nil {
			if errors.Is(err, net.ErrClosed) {
				return
			}
			// EMFILE and friends: back off as net/http does.
			delay = min(max(2*delay, 5*time.Millisecond), time.Second)
			t.log.Warn("accept failed", zap.Error(err), zap.Duration("retry_in", delay))
			time.Sleep(delay)
			continue
		}
		delay = 0
		st := t.state.Load()
		if st.svc.MaxConns > 0 && t.stats.active.Load() >= int64(st.svc.MaxConns) {
			t.stats.rejected.Add(1)
			t.log.Debug("max_conns reached, connection closed", zap.Stringer("client", c.RemoteAddr()))
			c.Close()
			continue
		}
		tc := &tcpConn{client: c.(*net.TCPConn)}
		t.mu.Lock()
		if t.closing {
			t.mu.Unlock()
			c.Close()
			return
		}
		t.conns[tc] = struct{}{}
		t.wg.Add(1)
		t.mu.Unlock()
		t.stats.active.Add(1)
		t.stats.accepted.Add(1)
		go t.serve(tc, st)
	}
}

// tcpConn is one proxied connection; close may be called from Stop.
type tcpConn struct {
	client   *net.TCPConn
	mu       sync.Mutex
	upstream *net.TCPConn
	closed   bool
}

func (c *tcpConn) setUpstream(u *net.TCPConn) bool {
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.closed {
		return false
	}
	c.upstream = u
	return true
}

func (c *tcpConn) close() {
	c.mu.Lock()
	defer c.mu.Unlock()
	c.closed = true
	c.client.Close()
	if c.upstream != nil {
		c.upstream.Close()
	}
}

func (t *TCP) serve(c *tcpConn, st *tcpState) {
	defer func() {
		c.close()
		t.mu.Lock()
		delete(t.conns, c)
		t.mu.Unlock()
		t.stats.active.Add(-1)
		t.wg.Done()
	}()
	client := c.client.RemoteAddr().(*net.TCPAddr).AddrPort()
	up, i := t.connect(c, st, client)
	if up == nil {
		return
	}
	pool := st.pool
	defer pool.Release(i)
	if !c.setUpstream(up) {
		up.Close()
		return
	}
	var idle [2]atomic.Bool
	var ended atomic.Int32
	done := make(chan struct{})
	go func() {
		n := relay(up, c.client, st.svc.Timeout, &idle[0], &idle[1], &ended)
		t.stats.bytesIn.Add(uint64(n))
		close(done)
	}()
	n := relay(c.client, up, st.svc.Timeout, &idle[1], &idle[0], &ended)
	t.stats.bytesOut.Add(uint64(n))
	<-done
}

// connect dials upstreams until one answers or the tries run out.
func (t *TCP) connect(c *tcpConn, st *tcpState, client netip.AddrPort) (*net.TCPConn, int) {
	timeout := st.svc.ConnectTimeout
	if timeout <= 0 {
		timeout = DefaultConnectTimeout
	}
	pool := st.pool
	var tried Tried
	tries := pool.Tries(st.svc.NextUpstreamTries)
	for tried.Len() < tries {
		i := pool.Pick(client, &tried)
		if i < 0 {
			break
		}
		tried.Add(i)
		pool.Acquire(i)
		ctx, cancel := context.WithTimeout(context.Background(), timeout)
		up, err := t.dialer.DialTCP(ctx, client, pool.Addr(i))
		cancel()
		if err == nil {
			pool.ReportSuccess(i)
			return up, i
		}
		pool.Release(i)
		pool.ReportFailure(i)
		t.log.Warn("upstream connect failed", zap.Stringer("upstream", pool.Addr(i)),
			zap.Stringer("client", client), zap.Error(err))
	}
	t.stats.failed.Add(1)
	t.log.Error("no upstream reachable, connection closed", zap.Stringer("client", client), zap.Int("tried", tried.Len()))
	return nil, -1
}

// relay copies src to dst until EOF, then half-closes dst (CloseWrite), so
// the other direction may go on. io.Copy between two *net.TCPConn splices
// in the kernel; the copy goes in chunks (a LimitedReader over a TCPConn
// still splices) so the idle deadline can be renewed.
//
// Idle timeout: a splice in progress reports the bytes it moved only when
// it returns, so each direction's read deadline is renewed every timeout
// and a direction that returns with nothing moved marks itself idle (me);
// the connection is idle, and both sides are closed, when the other
// direction is idle too (a window with nothing moved, or finished). Dead
// connections end between timeout and 2×timeout. On an error both sides
// are closed.
//
// ended counts the directions that reached EOF. Only the first half-closes
// its destination: when the second one ends, serve closes both sockets at
// once, and close sends that FIN itself (nothing is left unread on either
// socket, so the kernel ends the connection gracefully, not with a reset):
// one shutdown syscall fewer per connection.
func relay(dst, src *net.TCPConn, timeout time.Duration, me, other *atomic.Bool, ended *atomic.Int32) int64 {
	var total int64
	lr := &io.LimitedReader{R: src}
	for {
		if timeout > 0 {
			src.SetReadDeadline(time.Now().Add(timeout))
		}
		lr.N = spliceChunk
		n, err := dst.ReadFrom(lr)
		total += n
		me.Store(n == 0)
		switch {
		case err == nil && lr.N > 0: // EOF before the chunk's end
			me.Store(true)
			if ended.Add(1) == 1 {
				dst.CloseWrite() // the other direction goes on
			}
			return total
		case err == nil:
			continue
		case errors.Is(err, os.ErrDeadlineExceeded):
			if n > 0 || !other.Load() {
				continue // bytes moved, here or (maybe) the other way
			}
		}
		// Reset, idle timeout or closed by Stop: close both, which also
		// ends the other direction.
		dst.Close()
		src.Close()
		return total
	}
}

// Stop implements Frontend.
func (t *TCP) Stop(ctx context.Context) error {
	t.mu.Lock()
	t.closing = true
	t.mu.Unlock()
	var err error
	if t.ln != nil {
		err = t.ln.Close()
	}
	done := make(chan struct{})
	go func() { t.wg.Wait(); close(done) }()
	select {
	case <-done:
		return err
	case <-ctx.Done():
	}
	t.mu.Lock()
	n := len(t.conns)
	for c := range t.conns {
		c.close()
	}
	t.mu.Unlock()
	t.log.Warn("drain timeout: closed open connections", zap.Int("connections", n))
	<-done
	return err
}
