package proxy

import (
	"context"
	"fmt"
	"net"
	"net/netip"
	"sync"
	"syscall"

	"golang.org/x/sys/unix"
)

// Dialer is THE place where a mode decides how sockets are made: the
// listening sockets of the front ends and the upstream sockets. Proxy mode
// (ProxyDialer) dials from the LB's own address; transparent mode binds
// upstream sockets to the client's address with IP_TRANSPARENT; DSR sends
// the client's datagrams from the client's address:port.
type Dialer interface {
	// ListenControl runs on every listening socket before bind (after
	// SO_REUSEPORT is set); nil error to accept the defaults.
	ListenControl(network, address string, c syscall.RawConn) error
	// DialTCP connects to upstream on behalf of client.
	DialTCP(ctx context.Context, client, upstream netip.AddrPort) (*net.TCPConn, error)
	// DialUDP returns a UDP socket connected to upstream for client's session.
	DialUDP(client, upstream netip.AddrPort) (*net.UDPConn, error)
	// ReleaseUDP takes back a session's socket. clean says no reply is
	// outstanding on it (the session got all the replies it waited for), so
	// it may be reused for another session to the same upstream.
	ReleaseUDP(c *net.UDPConn, upstream netip.AddrPort, clean bool)
}

// ProxyDialer makes the sockets of proxy mode: upstreams see the LB's
// address. It keeps connected UDP sockets whose session ended cleanly and
// hands them to the next session to the same upstream, which saves a
// socket, bind and connect per DNS query (sessions of `responses: 1`).
type ProxyDialer struct {
	// Interface binds upstream sockets to a device (SO_BINDTODEVICE); "" =
	// the routing table decides.
	Interface string
	// IdleUDP bounds the sockets kept per upstream; 0 = 64.
	IdleUDP int

	mu   sync.Mutex
	idle map[netip.AddrPort][]*net.UDPConn
}

// ListenControl implements Dialer: nothing beyond the defaults.
func (d *ProxyDialer) ListenControl(string, string, syscall.RawConn) error { return nil }

func (d *ProxyDialer) control(_, _ string, c syscall.RawConn) error {
	if d.Interface == "" {
		return nil
	}
	var serr error
	err := c.Control(func(fd uintptr) {
		serr = unix.BindToDevice(int(fd), d.Interface)
	})
	if err == nil {
		err = serr
	}
	if err != nil {
		return fmt.Errorf("bind upstream socket to %s: %w (check the service's interface key)", d.Interface, err)
	}
	return nil
}

// DialTCP implements Dialer. The socket is not bound before connect: the
// kernel picks the local port at connect time, unique for the 4-tuple
// (net.Dialer.DialTCP with a netip.AddrPort always binds, even to the
// wildcard: one bind syscall more per connection, and a port that must be
// free for every destination). TCP keep-alive stays off (four setsockopt
// calls fewer per connection; the idle timeout ends dead connections). The
// context carries the connect timeout.
func (d *ProxyDialer) DialTCP(ctx context.Context, _, upstream netip.AddrPort) (*net.TCPConn, error) {
	nd := net.Dialer{KeepAlive: -1}
	if d.Interface != "" {
		nd.Control = d.control
	}
	c, err := nd.DialContext(ctx, "tcp", upstream.String())
	if err != nil {
		return nil, err
	}
	return c.(*net.TCPConn), nil
}

// DialUDP implements Dialer: an idle socket to upstream if one is kept,
// else a new connected one.
func (d *ProxyDialer) DialUDP(_, upstream netip.AddrPort) (*net.UDPConn, error) {
	d.mu.Lock()
	if l := d.idle[upstream]; len(l) > 0 {
		c := l[len(l)-1]
		d.idle[upstream] = l[:len(l)-1]
		d.mu.Unlock()
		return c, nil
	}
	d.mu.Unlock()
	var nd net.Dialer
	if d.Interface != "" {
		nd.Control = d.control
	}
	return nd.DialUDP(context.Background(), "udp", netip.AddrPort{}, upstream)
}

// ReleaseUDP implements Dialer.
func (d *ProxyDialer) ReleaseUDP(c *net.UDPConn, upstream netip.AddrPort, clean bool) {
	max := d.IdleUDP
	if max == 0 {
		max = 64
	}
	if clean {
		d.mu.Lock()
		if d.idle == nil {
			d.idle = map[netip.AddrPort][]*net.UDPConn{}
		}
		if l := d.idle[upstream]; len(l) < max {
			d.idle[upstream] = append(l, c)
			d.mu.Unlock()
			return
		}
		d.mu.Unlock()
	}
	c.Close()
}

// Close closes the kept idle sockets.
func (d *ProxyDialer) Close() error {
	d.mu.Lock()
	defer d.mu.Unlock()
	for a, l := range d.idle {
		for _, c := range l {
			c.Close()
		}
		delete(d.idle, a)
	}
	return nil
}
