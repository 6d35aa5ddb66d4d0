package proxy

import (
	"context"
	"errors"
	"fmt"
	"net"
	"net/netip"
	"sync"
	"sync/atomic"

	"go.uber.org/zap"
)

// DSR is the front end of mode dsr: UDP listening sockets like the other
// modes' (SO_REUSEPORT, read in batches; one per two cores here, see
// dsrListeners), but no session: each
// datagram of a read batch gets an upstream from the Pool and the whole
// batch leaves through the socket's DSRSender in one sendmmsg, from the
// client's address:port. The upstream answers the client directly; nothing
// here waits for it, so there is nothing to time out and nothing to drain.
//
// The Pool is made with hashPort (NewPool): balance hash keeps one client
// address:port on one upstream, so a multi-datagram exchange stays
// together; round robin spreads datagrams one by one.
type DSR struct {
	// Interface, when set before Start, is where datagrams to the
	// upstreams leave (the service's `interface` key); "" = the route.
	Interface string

	log   *zap.Logger
	state atomic.Pointer[udpState]

	conns   []*net.UDPConn
	senders []*DSRSender
	readers sync.WaitGroup
	stats   stats
	dsr     DSRStats
}

// NewDSR returns the DSR front end of svc; Start opens it.
func NewDSR(svc Service, pool *Pool, log *zap.Logger) *DSR {
	d := &DSR{log: log.With(zap.String("service", svc.Name))}
	d.state.Store(&udpState{svc, pool})
	return d
}

// Start implements Frontend: it opens the listening sockets and one raw
// sending socket per listening socket.
func (d *DSR) Start() error {
	svc := d.state.Load().svc
	conns, err := listenUDP(&ProxyDialer{}, svc.Listen, dsrListeners())
	if err != nil {
		return err
	}
	d.conns = conns
	for range conns {
		s, err := NewDSRSender(d.log, svc.Listen.Addr().Unmap().Is6(), &d.dsr)
		if err != nil {
			d.close()
			return fmt.Errorf("service %s: %w", svc.Name, err)
		}
		d.senders = append(d.senders, s)
		if d.Interface != "" {
			if err := s.BindToDevice(d.Interface); err != nil {
				d.close()
				return fmt.Errorf("service %s: %w", svc.Name, err)
			}
		}
	}
	for i, c := range d.conns {
		d.readers.Add(1)
		go d.read(c, d.senders[i])
	}
	d.log.Info("listening", zap.String("protocol", "udp"), zap.String("mode", "dsr"),
		zap.Stringer("listen", svc.Listen), zap.Int("sockets", len(d.conns)))
	return nil
}

func (d *DSR) close() {
	for _, c := range d.conns {
		c.Close()
	}
	for _, s := range d.senders {
		s.Close()
	}
}

// Addr is the listening address (useful with port 0).
func (d *DSR) Addr() netip.AddrPort { return d.conns[0].LocalAddr().(*net.UDPAddr).AddrPort() }

// Update implements Frontend; the next read batch uses svc and pool.
func (d *DSR) Update(svc Service, pool *Pool) { d.state.Store(&udpState{svc, pool}) }

// Pool implements Frontend.
func (d *DSR) Pool() *Pool { return d.state.Load().pool }

// Stats implements Frontend: Accepted counts datagrams sent to an
// upstream, Failed those dropped (no upstream up, over the MTU, send
// errors), BytesIn their payload bytes. Active and BytesOut stay 0: replies
// do not pass here.
func (d *DSR) Stats() Stats { return d.stats.snapshot() }

// DSRStats returns the sender's counters (sent, over the MTU, errors).
func (d *DSR) DSRStats() *DSRStats { return &d.dsr }

// Stop implements Frontend: a DSR front end holds no session, so it only
// closes its sockets; ctx is not waited on.
func (d *DSR) Stop(context.Context) error {
	for _, c := range d.conns {
		c.Close()
	}
	d.readers.Wait()
	for _, s := range d.senders {
		s.Close()
	}
	return nil
}

// read forwards the datagrams arriving on c until c is closed.
func (d *DSR) read(c *net.UDPConn, s *DSRSender) {
	defer d.readers.Done()
	br, err := newBatchReader(c, batchSize, maxDatagram)
	if err != nil {
		d.log.Error("read failed", zap.Error(err))
		return
	}
	ds := make([]DSRDatagram, batchSize)
	for {
		n, err := br.Read()
		if err != nil {
			if errors.Is(err, net.ErrClosed) {
				return
			}
			d.log.Warn("read failed", zap.Error(err))
			continue
		}
		st := d.state.Load()
		k, bytes := 0, 0
		for j := range n {
			client, payload, ok := br.Datagram(j)
			if !ok {
				continue
			}
			client = netip.AddrPortFrom(client.Addr().Unmap(), client.Port())
			i := st.pool.Pick(client, nil)
			if i < 0 {
				d.stats.failed.Add(1)
				continue
			}
			st.pool.Acquire(i) // counts the datagram on its upstream
			st.pool.Release(i)
			ds[k] = DSRDatagram{Client: client, Upstream: st.pool.Addr(i), Payload: payload}
			k++
			bytes += len(payload)
		}
		sent, err := s.Send(ds[:k])
		d.stats.accepted.Add(uint64(sent))
		d.stats.bytesIn.Add(uint64(bytes))
		if sent < k {
			d.stats.failed.Add(uint64(k - sent))
			d.log.Debug("datagrams dropped", zap.Int("dropped", k-sent), zap.Error(err))
		}
		clear(ds[:k]) // no reference to the read buffers beyond the batch
	}
}
