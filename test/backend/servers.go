package main

import (
	"context"
	"errors"
	"fmt"
	"net"
	"net/http"
	"net/netip"
	"sync"
	"syscall"
	"time"

	"go.uber.org/zap"
	"golang.org/x/sys/unix"
)

// servers owns every listener of the process and the goroutines serving
// them; close stops them all and waits.
type servers struct {
	log     *zap.Logger
	wg      sync.WaitGroup
	closers []func()
	failed  chan error // the first error of a server that stopped by itself
}

func newServers(log *zap.Logger) *servers {
	return &servers{log: log, failed: make(chan error, 1)}
}

// fail records err as the reason to stop, unless one is recorded already.
func (s *servers) fail(err error) {
	select {
	case s.failed <- err:
	default:
	}
}

// close stops every server and waits for their goroutines.
func (s *servers) close() {
	for i := len(s.closers) - 1; i >= 0; i-- {
		s.closers[i]()
	}
	s.wg.Wait()
}

// network returns "tcp4"/"tcp6" (or udp) for ap's family, so a wildcard
// IPv6 address does not also take the IPv4 port.
func network(proto string, ap netip.AddrPort) string {
	if ap.Addr().Unmap().Is4() {
		return proto + "4"
	}
	return proto + "6"
}

// helloHandler answers every request with the demo line.
func helloHandler(name string) http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		local := "unknown"
		if a, ok := r.Context().Value(http.LocalAddrContextKey).(net.Addr); ok {
			local = a.String()
		}
		body := fmt.Sprintf("Hello from %s. You connected from %s to %s\n", name, r.RemoteAddr, local)
		h := w.Header()
		h.Set("Content-Type", "text/plain; charset=utf-8")
		h.Set("Content-Length", fmt.Sprint(len(body)))
		_, _ = w.Write([]byte(body))
	})
}

func (s *servers) startHTTP(ap netip.AddrPort, name string) error {
	ln, err := net.Listen(network("tcp", ap), ap.String())
	if err != nil {
		return fmt.Errorf("listen http on %s: %w", ap, err)
	}
	srv := &http.Server{
		Handler:           helloHandler(name),
		ReadHeaderTimeout: 10 * time.Second,
		IdleTimeout:       60 * time.Second,
		ErrorLog:          zap.NewStdLog(s.log.Named("http")),
	}
	s.wg.Add(1)
	go func() {
		defer s.wg.Done()
		if err := srv.Serve(ln); err != nil && !errors.Is(err, http.ErrServerClosed) {
			s.fail(fmt.Errorf("serve http on %s: %w", ap, err))
		}
	}()
	s.closers = append(s.closers, func() {
		ctx, cancel := context.WithTimeout(context.Background(), 2*time.Second)
		defer cancel()
		if err := srv.Shutdown(ctx); err != nil {
			_ = srv.Close()
		}
	})
	return nil
}

// handler turns one request datagram into the reply written to out's
// backing array; ok=false sends nothing.
type handler func(req, out []byte) (reply []byte, ok bool)

// echo sends every datagram back unchanged.
func echo(req, out []byte) ([]byte, bool) { return append(out[:0], req...), true }

// listenReusePort opens a UDP socket on ap with SO_REUSEPORT set, so that
// several sockets on the same address share the load in the kernel.
func listenReusePort(ctx context.Context, ap netip.AddrPort) (*net.UDPConn, error) {
	lc := net.ListenConfig{Control: func(_, _ string, c syscall.RawConn) error {
		var serr error
		if err := c.Control(func(fd uintptr) {
			serr = unix.SetsockoptInt(int(fd), unix.SOL_SOCKET, unix.SO_REUSEPORT, 1)
		}); err != nil {
			return err
		}
		return serr
	}}
	pc, err := lc.ListenPacket(ctx, network("udp", ap), ap.String())
	if err != nil {
		return nil, err
	}
	return pc.(*net.UDPConn), nil
}

// startUDP opens readers SO_REUSEPORT sockets on ap, each served by one
// goroutine that answers every datagram with h.
func (s *servers) startUDP(ctx context.Context, ap netip.AddrPort, readers int, what string, h handler) error {
	for i := 0; i < readers; i++ {
		conn, err := listenReusePort(ctx, ap)
		if err != nil {
			return fmt.Errorf("listen %s on %s: %w", what, ap, err)
		}
		_ = conn.SetReadBuffer(4 << 20)
		_ = conn.SetWriteBuffer(4 << 20)
		s.closers = append(s.closers, func() { conn.Close() })
		s.wg.Add(1)
		go func() {
			defer s.wg.Done()
			serveUDP(s.log, conn, h)
		}()
	}
	return nil
}

// serveUDP answers datagrams until conn is closed, in batches (batch.go).
func serveUDP(log *zap.Logger, conn *net.UDPConn, h handler) {
	b, err := newUDPBatcher(conn)
	if err != nil {
		log.Error("udp serve", zap.Error(err))
		return
	}
	b.serve(log, h)
}
