// Package proxy is lbctl's front end: TCP and UDP listeners that hand each
// client connection or UDP session to an upstream picked by the service's
// Pool and relay the bytes both ways.
//
// Three seams keep the modes apart: the Pool holds upstream state (health
// plugs in there), the Dialer makes every socket (transparent and DSR plug in
// there), and a front end is started, updated on reload and drained on stop
// the same way for every mode.
package proxy

import (
	"context"
	"fmt"
	"net"
	"net/netip"
	"runtime"
	"syscall"
	"time"

	"golang.org/x/sys/unix"
)

// Service is what a front end needs to know of a configured service.
type Service struct {
	Name              string
	Listen            netip.AddrPort
	ConnectTimeout    time.Duration // TCP connect; 0 = 5s
	Timeout           time.Duration // idle timeout (nginx proxy_timeout); 0 = none
	Responses         int           // UDP replies that end a session; -1 = unlimited, 0 = none expected
	NextUpstreamTries int           // 0 = every upstream once
	MaxConns          int           // concurrent connections/sessions; 0 = unlimited
}

// Stats are the counters of one front end.
type Stats struct {
	Active   int64  `json:"active"`   // open connections / sessions
	Accepted uint64 `json:"accepted"` // connections / sessions started
	Rejected uint64 `json:"rejected"` // refused: max_conns, no upstream left, draining
	Failed   uint64 `json:"failed"`   // no upstream could be reached
	BytesIn  uint64 `json:"bytes_in"` // client -> upstream
	BytesOut uint64 `json:"bytes_out"`
}

// Frontend is a running TCP or UDP front end.
type Frontend interface {
	// Start opens the listeners and starts serving.
	Start() error
	// Update applies a reloaded service and pool to new connections and
	// sessions; open ones keep what they started with.
	Update(Service, *Pool)
	// Stop stops accepting, waits for open connections and sessions to end
	// until ctx is done, then closes what is left.
	Stop(ctx context.Context) error
	// Pool returns the current pool.
	Pool() *Pool
	// Stats returns the counters.
	Stats() Stats
}

// listenConfig sets SO_REUSEPORT when reusePort (the UDP listeners, one
// per core) and then the mode's own options.
func listenConfig(d Dialer, reusePort bool) *net.ListenConfig {
	// KeepAlive -1: accepted connections skip the keep-alive setsockopt
	// calls; the idle timeout ends dead connections.
	return &net.ListenConfig{KeepAlive: -1, Control: func(network, address string, c syscall.RawConn) error {
		if reusePort {
			var serr error
			if err := c.Control(func(fd uintptr) {
				serr = unix.SetsockoptInt(int(fd), unix.SOL_SOCKET, unix.SO_REUSEPORT, 1)
			}); err != nil {
				return err
			}
			if serr != nil {
				return fmt.Errorf("set SO_REUSEPORT: %w", serr)
			}
		}
		return d.ListenControl(network, address, c)
	}}
}

// listeners is the number of SO_REUSEPORT UDP sockets per service: one
// per core.
func listeners() int { return max(1, runtime.GOMAXPROCS(0)) }

// dsrListeners is the number of SO_REUSEPORT sockets of a dsr service: one
// per two cores. A dsr reader's work per datagram is small, but its
// sendmmsg carries each batch through the kernel's whole delivery path to
// the upstreams on the reader's thread; fewer readers get bigger batches
// and fewer wake-ups per datagram. Measured on 2 CPUs (docs/dsr.md): one
// socket beat one per core.
func dsrListeners() int { return max(1, runtime.GOMAXPROCS(0)/2) }

func network(proto string, a netip.AddrPort) string {
	if a.Addr().Is4() {
		return proto + "4"
	}
	return proto + "6"
}
