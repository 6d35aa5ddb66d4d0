package proxy

import (
	"context"
	"errors"
	"fmt"
	"net"
	"net/netip"
	"slices"
	"sync"
	"sync/atomic"
	"syscall"

	"golang.org/x/sys/unix"
)

// ErrNotUpstream: a transparent socket towards an address that is not a
// configured upstream of the service. lbctl never sends from a client's
// address anywhere else.
var ErrNotUpstream = errors.New("not a configured upstream: refusing to send from the client's address")

// ErrNoReply is what OnDialFailed gets for a UDP session that ended
// without the replies it waited for.
var ErrNoReply = errors.New("no reply from the upstream")

// TransparentDialer makes the upstream sockets of mode transparent
// (nginx: proxy_bind $remote_addr transparent): IP_TRANSPARENT /
// IPV6_TRANSPARENT sockets bound to the client's address before connect
// (TCP) or send (UDP), so upstreams see the real client. The replies come
// back addressed to the client; the steer program marks them and the
// policy rule delivers them to these sockets (pkg/netconf, pkg/dataplane).
//
// The local port is the client's own port when that 4-tuple is free
// (bind to the client's address:port with SO_REUSEADDR, then connect: the
// kernel refuses a 4-tuple in use with EADDRNOTAVAIL); otherwise the
// kernel picks one at connect time (IP_BIND_ADDRESS_NO_PORT), unique for
// the 4-tuple. Two clients behind one address have distinct ports, so
// their upstream sockets never collide.
type TransparentDialer struct {
	// Interface binds upstream sockets to a device (SO_BINDTODEVICE); "" =
	// the routing table decides.
	Interface string
	// OnDialFailed, if set, is called after a TCP connect failed, and
	// with ErrNoReply when a UDP session ended without the replies it
	// waited for (the daemon's doctor-style watchdog: did the upstream's
	// replies reach the LB at all?). It must not block.
	OnDialFailed func(client, upstream netip.AddrPort, err error)

	upstreams atomic.Pointer[map[netip.AddrPort]bool]
	// kernelPort skips the client's port (BenchmarkTransparentDial's
	// comparison of the two ways).
	kernelPort bool

	// IdleUDP bounds the UDP sockets kept for reuse; 0 = 1024.
	IdleUDP int
	mu      sync.Mutex
	idle    map[netip.AddrPort]*idleUDP // by client address:port, or address:0 after a fallback
	order   []netip.AddrPort            // idle keys, oldest first
	live    map[*net.UDPConn]netip.AddrPort
	busy    map[netip.AddrPort]int // client address:port -> live sockets on it

	// SamePort counts sockets that got the client's own port, OtherPort
	// those that fell back to a kernel-chosen port.
	SamePort, OtherPort atomic.Uint64
}

// idleUDP is a kept UDP socket and the upstream it is connected to.
type idleUDP struct {
	c        *net.UDPConn
	upstream netip.AddrPort
}

// NewTransparentDialer returns a dialer that sends only to upstreams.
func NewTransparentDialer(upstreams []netip.AddrPort, iface string) *TransparentDialer {
	d := &TransparentDialer{Interface: iface}
	d.SetUpstreams(upstreams)
	return d
}

// SetUpstreams replaces the addresses the dialer may send to (reload).
func (d *TransparentDialer) SetUpstreams(ups []netip.AddrPort) {
	m := make(map[netip.AddrPort]bool, len(ups))
	for _, u := range ups {
		m[unmapAP(u)] = true
	}
	d.upstreams.Store(&m)
}

func unmapAP(a netip.AddrPort) netip.AddrPort {
	return netip.AddrPortFrom(a.Addr().Unmap().WithZone(""), a.Port())
}

// ErrNoTransparentCap: the process may not set IP_TRANSPARENT /
// IPV6_TRANSPARENT (the kernel wants CAP_NET_ADMIN or CAP_NET_RAW).
var ErrNoTransparentCap = errors.New("needs CAP_NET_ADMIN or CAP_NET_RAW: run lbctl as root, or grant one of them (systemd: AmbientCapabilities=CAP_NET_ADMIN; docker: --cap-add NET_ADMIN; file: setcap cap_net_admin+ep lbctl)")

// setTransparent sets IP_TRANSPARENT (IPV6_TRANSPARENT with v6) on fd.
func setTransparent(fd int, v6 bool) error {
	opt := "IP_TRANSPARENT"
	var err error
	if v6 {
		opt = "IPV6_TRANSPARENT"
		err = unix.SetsockoptInt(fd, unix.SOL_IPV6, unix.IPV6_TRANSPARENT, 1)
	} else {
		err = unix.SetsockoptInt(fd, unix.SOL_IP, unix.IP_TRANSPARENT, 1)
	}
	if errors.Is(err, unix.EPERM) || errors.Is(err, unix.EACCES) {
		return fmt.Errorf("set %s: %w: %w", opt, err, ErrNoTransparentCap)
	}
	if err != nil {
		return fmt.Errorf("set %s: %w", opt, err)
	}
	return nil
}

// CheckTransparent reports whether this process may open transparent
// upstream sockets towards the families of upstreams, so that a service
// lacking the capability fails at start, naming it, instead of failing
// every connection later.
func CheckTransparent(upstreams []netip.AddrPort) error {
	done := map[bool]bool{}
	for _, u := range upstreams {
		v6 := !u.Addr().Unmap().Is4()
		if done[v6] {
			continue
		}
		done[v6] = true
		fam := unix.AF_INET
		if v6 {
			fam = unix.AF_INET6
		}
		fd, err := unix.Socket(fam, unix.SOCK_STREAM|unix.SOCK_CLOEXEC, 0)
		if err != nil {
			return fmt.Errorf("transparent upstream socket: %w", err)
		}
		err = setTransparent(fd, v6)
		unix.Close(fd)
		if err != nil {
			return fmt.Errorf("transparent upstream socket: %w", err)
		}
	}
	return nil
}

// ListenControl implements Dialer: nothing beyond the defaults.
func (d *TransparentDialer) ListenControl(string, string, syscall.RawConn) error { return nil }

func (d *TransparentDialer) check(client, upstream netip.AddrPort) (netip.AddrPort, netip.AddrPort, error) {
	client, upstream = unmapAP(client), unmapAP(upstream)
	if m := d.upstreams.Load(); m == nil || !(*m)[upstream] {
		return client, upstream, fmt.Errorf("transparent socket to %s: %w", upstream, ErrNotUpstream)
	}
	if client.Addr().Is4() != upstream.Addr().Is4() {
		return client, upstream, fmt.Errorf("transparent socket from %s to %s: the client and the upstream are of different IP families", client, upstream)
	}
	return client, upstream, nil
}

// control sets the socket options of a transparent upstream socket;
// noPort asks the kernel to choose the port at connect time.
func (d *TransparentDialer) control(v6, noPort bool) func(string, string, syscall.RawConn) error {
	return func(_, _ string, c syscall.RawConn) error {
		var serr error
		err := c.Control(func(fd uintptr) {
			s := int(fd)
			if serr = setTransparent(s, v6); serr != nil {
				return
			}
			if serr = unix.SetsockoptInt(s, unix.SOL_SOCKET, unix.SO_REUSEADDR, 1); serr != nil {
				serr = fmt.Errorf("set SO_REUSEADDR: %w", serr)
				return
			}
			if noPort {
				if serr = unix.SetsockoptInt(s, unix.SOL_IP, unix.IP_BIND_ADDRESS_NO_PORT, 1); serr != nil {
					serr = fmt.Errorf("set IP_BIND_ADDRESS_NO_PORT: %w", serr)
					return
				}
			}
			if d.Interface != "" {
				if serr = unix.BindToDevice(s, d.Interface); serr != nil {
					serr = fmt.Errorf("bind upstream socket to %s: %w (check the service's interface key)", d.Interface, serr)
				}
			}
		})
		if err == nil {
			err = serr
		}
		return err
	}
}

// portTaken: the client's own port cannot be used for this 4-tuple.
func portTaken(err error) bool {
	return errors.Is(err, unix.EADDRINUSE) || errors.Is(err, unix.EADDRNOTAVAIL)
}

// DialTCP implements Dialer: connects to upstream from the client's address.
func (d *TransparentDialer) DialTCP(ctx context.Context, client, upstream netip.AddrPort) (*net.TCPConn, error) {
	client, upstream, err := d.check(client, upstream)
	if err != nil {
		return nil, err
	}
	v6 := client.Addr().Is6()
	nd := net.Dialer{LocalAddr: net.TCPAddrFromAddrPort(client), Control: d.control(v6, false)}
	var c net.Conn
	if d.kernelPort {
		err = unix.EADDRNOTAVAIL
	} else {
		c, err = nd.DialContext(ctx, "tcp", upstream.String())
	}
	if err != nil && portTaken(err) && ctx.Err() == nil {
		nd = net.Dialer{LocalAddr: net.TCPAddrFromAddrPort(netip.AddrPortFrom(client.Addr(), 0)), Control: d.control(v6, true)}
		if c, err = nd.DialContext(ctx, "tcp", upstream.String()); err == nil {
			d.OtherPort.Add(1)
		}
	} else if err == nil {
		d.SamePort.Add(1)
	}
	if err != nil {
		if d.OnDialFailed != nil {
			d.OnDialFailed(client, upstream, err)
		}
		return nil, err
	}
	return c.(*net.TCPConn), nil
}

// DialUDP implements Dialer: a socket bound to the client's address (and
// port when free) and connected to upstream. A socket kept from the
// client's last clean session is taken first and, if that session went to
// another upstream, connected anew (one connect instead of socket, options,
// bind and connect).
func (d *TransparentDialer) DialUDP(client, upstream netip.AddrPort) (*net.UDPConn, error) {
	client, upstream, err := d.check(client, upstream)
	if err != nil {
		return nil, err
	}
	own, any := client, netip.AddrPortFrom(client.Addr(), 0)
	d.mu.Lock()
	if d.live == nil {
		d.live = map[*net.UDPConn]netip.AddrPort{}
		d.busy = map[netip.AddrPort]int{}
	}
	busy := d.busy[client] > 0
	// The client's own port, kept from its last session; else, while that
	// port is taken by a live session, a kept socket on another port.
	for _, k := range []netip.AddrPort{own, any} {
		if k == any && !busy {
			break
		}
		e := d.idle[k]
		if e == nil {
			continue
		}
		delete(d.idle, k)
		d.live[e.c] = k
		if k == own {
			d.busy[client]++
		}
		d.mu.Unlock()
		if e.upstream == upstream {
			return e.c, nil
		}
		if err := reconnect(e.c, upstream); err == nil {
			return e.c, nil
		}
		d.forget(e.c)
		e.c.Close()
		d.mu.Lock()
		busy = d.busy[client] > 0
		break
	}
	d.mu.Unlock()
	v6 := client.Addr().Is6()
	var c *net.UDPConn
	err = unix.EADDRINUSE
	if !busy {
		c, err = d.dialUDP(client, upstream, v6)
	}
	k := own
	if err != nil && portTaken(err) {
		k = any
		if c, err = d.dialUDP(any, upstream, v6); err == nil {
			d.OtherPort.Add(1)
		}
	} else if err == nil {
		d.SamePort.Add(1)
	}
	if err != nil {
		return nil, err
	}
	d.mu.Lock()
	d.live[c] = k
	if k == own {
		d.busy[client]++
	}
	d.mu.Unlock()
	return c, nil
}

// reconnect points the connected UDP socket c at to.
func reconnect(c *net.UDPConn, to netip.AddrPort) error {
	rc, err := c.SyscallConn()
	if err != nil {
		return err
	}
	var sa unix.Sockaddr
	if to.Addr().Is4() {
		sa = &unix.SockaddrInet4{Port: int(to.Port()), Addr: to.Addr().As4()}
	} else {
		sa = &unix.SockaddrInet6{Port: int(to.Port()), Addr: to.Addr().As16()}
	}
	var cerr error
	if err := rc.Control(func(fd uintptr) { cerr = unix.Connect(int(fd), sa) }); err != nil {
		return err
	}
	return cerr
}

// forget drops c from the live sockets; it returns c's idle key.
func (d *TransparentDialer) forget(c *net.UDPConn) (netip.AddrPort, bool) {
	d.mu.Lock()
	defer d.mu.Unlock()
	k, ok := d.live[c]
	if !ok {
		return k, false
	}
	delete(d.live, c)
	if k.Port() != 0 {
		if d.busy[k]--; d.busy[k] <= 0 {
			delete(d.busy, k)
		}
	}
	return k, true
}

// dialUDP binds without SO_REUSEADDR's sharing for UDP: two sockets with
// one local address:port would split the replies between them, so a port
// in use means "fall back", never "share".
func (d *TransparentDialer) dialUDP(local, upstream netip.AddrPort, v6 bool) (*net.UDPConn, error) {
	ctl := func(_, _ string, c syscall.RawConn) error {
		var serr error
		err := c.Control(func(fd uintptr) {
			s := int(fd)
			if serr = setTransparent(s, v6); serr != nil {
				return
			}
			if d.Interface != "" {
				if serr = unix.BindToDevice(s, d.Interface); serr != nil {
					serr = fmt.Errorf("bind upstream socket to %s: %w (check the service's interface key)", d.Interface, serr)
				}
			}
		})
		if err == nil {
			err = serr
		}
		return err
	}
	nd := net.Dialer{LocalAddr: net.UDPAddrFromAddrPort(local), Control: ctl}
	c, err := nd.Dial("udp", upstream.String())
	if err != nil {
		return nil, err
	}
	return c.(*net.UDPConn), nil
}

// ReleaseUDP implements Dialer. A socket belongs to one client
// address:port (or, after a fallback, to the client's address); when its
// session ended cleanly (no reply outstanding) it is kept for that client's
// next session (a DNS client reusing its source port saves a socket, bind
// and connect per query), up to IdleUDP sockets, the oldest closed first.
func (d *TransparentDialer) ReleaseUDP(c *net.UDPConn, upstream netip.AddrPort, clean bool) {
	la, ok := c.LocalAddr().(*net.UDPAddr)
	if !ok {
		d.forget(c)
		c.Close()
		return
	}
	client := unmapAP(la.AddrPort())
	k, ok := d.forget(c)
	if !ok {
		k = client
	}
	if !clean {
		if d.OnDialFailed != nil {
			d.OnDialFailed(client, unmapAP(upstream), ErrNoReply)
		}
		c.Close()
		return
	}
	max := d.IdleUDP
	if max <= 0 {
		max = 1024
	}
	d.mu.Lock()
	if d.idle == nil {
		d.idle = map[netip.AddrPort]*idleUDP{}
	}
	if old := d.idle[k]; old != nil {
		old.c.Close()
	}
	d.idle[k] = &idleUDP{c: c, upstream: unmapAP(upstream)}
	d.order = append(d.order, k)
	for len(d.idle) > max && len(d.order) > 0 {
		o := d.order[0]
		d.order = d.order[1:]
		if e := d.idle[o]; e != nil && o != k {
			e.c.Close()
			delete(d.idle, o)
		}
	}
	if len(d.order) > 4*max {
		// Drop the keys of sockets taken again since, keep the order.
		seen := make(map[netip.AddrPort]bool, len(d.idle))
		live := make([]netip.AddrPort, 0, len(d.idle))
		for i := len(d.order) - 1; i >= 0; i-- {
			if o := d.order[i]; d.idle[o] != nil && !seen[o] {
				seen[o] = true
				live = append(live, o)
			}
		}
		slices.Reverse(live)
		d.order = live
	}
	d.mu.Unlock()
}

// Close closes the kept UDP sockets.
func (d *TransparentDialer) Close() error {
	d.mu.Lock()
	defer d.mu.Unlock()
	for k, e := range d.idle {
		e.c.Close()
		delete(d.idle, k)
	}
	d.order = nil
	return nil
}
