package daemon

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"hash/fnv"
	"net"
	"net/http"
	"net/http/pprof"
	"net/netip"
	"os"
	"path/filepath"
	"time"

	"go.uber.org/zap"

	"github.com/lbctl/lbctl/pkg/dataplane"
	"github.com/lbctl/lbctl/pkg/health"
	"github.com/lbctl/lbctl/pkg/metrics"
)

// ControlDir holds the daemons' control sockets (root only).
const ControlDir = "/run/lbctl"

// ControlSocket is where the daemon pinning under bpffs serves its status:
// /run/lbctl/control.sock for the default bpffs, a socket named after the
// root otherwise (one daemon per bpffs root: per "host" in the tests).
func ControlSocket(bpffs string) string {
	if bpffs == "" || filepath.Clean(bpffs) == dataplane.DefaultRoot {
		return filepath.Join(ControlDir, "control.sock")
	}
	h := fnv.New32a()
	_, _ = h.Write([]byte(filepath.Clean(bpffs)))
	return filepath.Join(ControlDir, fmt.Sprintf("control-%08x.sock", h.Sum32()))
}

// ops is the daemon's operator interfaces: the control socket and metrics.
type ops struct {
	metrics *metrics.Metrics // nil until startOps
}

// startOps serves the control socket (status for lbctl status/stats) and,
// if metrics.listen is set, Prometheus metrics. stop ends both.
func (d *Daemon) startOps(ctx context.Context) (stop func(), err error) {
	path := d.opts.ControlSocket
	if path == "" {
		path = ControlSocket(d.opts.BPFFS)
	}
	d.ops.metrics = metrics.New(metrics.Sources{
		BPF:      d.bpfStats,
		XDP:      d.xdpServices,
		Frontend: func() metrics.Frontend { return frontendMetrics(d.Status()) },
	}, d.log.Named("metrics"))

	ctx, cancel := context.WithCancel(ctx)
	var servers []chan error
	serve := func(name string, fn func(context.Context) error) {
		c := make(chan error, 1)
		servers = append(servers, c)
		go func() {
			err := fn(ctx)
			if err != nil {
				d.log.Error(name, zap.Error(err))
			}
			c <- err
		}()
	}
	stop = func() {
		cancel()
		for _, c := range servers {
			<-c
		}
	}
	ln, err := listenControl(path)
	if err != nil {
		cancel()
		return nil, err
	}
	serve("control socket", func(ctx context.Context) error { return d.serveControl(ctx, ln, path) })
	if listen := d.Config().Metrics.Listen; listen != "" {
		mln, err := net.Listen("tcp", listen)
		if err != nil {
			stop()
			return nil, fmt.Errorf("metrics: listen on %s: %w (set metrics.listen to a free address)", listen, err)
		}
		d.log.Info("serving metrics", zap.String("listen", mln.Addr().String()))
		serve("metrics", func(ctx context.Context) error { return d.ops.metrics.Serve(ctx, mln) })
	}
	return stop, nil
}

// observeCheck feeds the check latency histograms (health.CheckerOptions.Observe).
func (d *Daemon) observeCheck(service string, upstream netip.AddrPort, r health.Result) {
	if m := d.ops.metrics; m != nil {
		m.ObserveCheck(service, upstream.String(), r.Latency, r.Err == nil)
	}
}

// listenControl opens the control socket, readable by root only. A socket
// left by a daemon that died is replaced; one a live daemon answers on is
// not.
func listenControl(path string) (net.Listener, error) {
	if err := os.MkdirAll(filepath.Dir(path), 0o700); err != nil {
		return nil, fmt.Errorf("control socket: create %s: %w", filepath.Dir(path), err)
	}
	if c, err := net.DialTimeout("unix", path, time.Second); err == nil {
		c.Close()
		return nil, fmt.Errorf("control socket %s: another lbctl run answers there (one daemon per --bpffs root)", path)
	}
	_ = os.Remove(path)
	ln, err := net.Listen("unix", path)
	if err != nil {
		return nil, fmt.Errorf("control socket: %w", err)
	}
	if err := os.Chmod(path, 0o600); err != nil {
		ln.Close()
		return nil, fmt.Errorf("control socket: %w", err)
	}
	return ln, nil
}

// serveControl answers GET /status with the daemon's Status as JSON until
// ctx ends, then removes the socket.
func (d *Daemon) serveControl(ctx context.Context, ln net.Listener, path string) error {
	mux := http.NewServeMux()
	mux.HandleFunc("GET /status", func(w http.ResponseWriter, r *http.Request) {
		w.Header().Set("Content-Type", "application/json")
		_ = json.NewEncoder(w).Encode(d.Status())
	})
	if d.opts.Pprof {
		// The profiles of net/http/pprof, on the root-only socket: e.g.
		// curl --unix-socket SOCK 'http://lbctl/debug/pprof/profile?seconds=10'
		mux.HandleFunc("GET /debug/pprof/", pprof.Index)
		mux.HandleFunc("GET /debug/pprof/cmdline", pprof.Cmdline)
		mux.HandleFunc("GET /debug/pprof/profile", pprof.Profile)
		mux.HandleFunc("GET /debug/pprof/symbol", pprof.Symbol)
		mux.HandleFunc("GET /debug/pprof/trace", pprof.Trace)
	}
	srv := &http.Server{Handler: mux, ReadHeaderTimeout: 5 * time.Second}
	errc := make(chan error, 1)
	go func() { errc <- srv.Serve(ln) }()
	select {
	case err := <-errc:
		return fmt.Errorf("control socket %s: %w", path, err)
	case <-ctx.Done():
	}
	sctx, cancel := context.WithTimeout(context.Background(), 2*time.Second)
	defer cancel()
	if err := srv.Shutdown(sctx); err != nil {
		_ = srv.Close()
	}
	<-errc
	_ = os.Remove(path)
	return nil
}

// ErrNotRunning: no daemon answers on the control socket.
var ErrNotRunning = errors.New("no lbctl run answers")

// QueryStatus asks the daemon behind the control socket at path for its
// status.
func QueryStatus(ctx context.Context, path string) (Status, error) {
	if _, err := os.Stat(path); err != nil {
		return Status{}, fmt.Errorf("%w on %s: %v", ErrNotRunning, path, err)
	}
	tr := &http.Transport{DialContext: func(ctx context.Context, _, _ string) (net.Conn, error) {
		var dl net.Dialer
		return dl.DialContext(ctx, "unix", path)
	}}
	defer tr.CloseIdleConnections()
	cl := &http.Client{Transport: tr, Timeout: 5 * time.Second}
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, "http://lbctl/status", nil)
	if err != nil {
		return Status{}, err
	}
	resp, err := cl.Do(req)
	if err != nil {
		return Status{}, fmt.Errorf("%w on %s: %v", ErrNotRunning, path, err)
	}
	defer resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		return Status{}, fmt.Errorf("query %s: %s", path, resp.Status)
	}
	var st Status
	if err := json.NewDecoder(resp.Body).Decode(&st); err != nil {
		return Status{}, fmt.Errorf("query %s: decode: %w", path, err)
	}
	return st, nil
}

// bpfStats reads the pinned counters without the state lock (a runner may
// hold it).
func (d *Daemon) bpfStats() (dataplane.Stats, error) {
	dp, err := dataplane.Open(dataplane.Options{Root: d.opts.BPFFS, NoCreate: true, ReadOnly: true})
	if err != nil {
		return dataplane.Stats{}, err
	}
	defer dp.Close()
	return dp.Stats()
}

func (d *Daemon) xdpServices() ([]dataplane.XDPServiceState, error) {
	dp, err := dataplane.Open(dataplane.Options{Root: d.opts.BPFFS, NoCreate: true, ReadOnly: true})
	if err != nil {
		return nil, err
	}
	defer dp.Close()
	return dp.XDPServices()
}

// frontendMetrics maps the status onto the metrics' view.
func frontendMetrics(st Status) metrics.Frontend {
	var f metrics.Frontend
	for _, s := range st.Services {
		ms := metrics.Service{Name: s.Name, Mode: s.Mode, Protocol: s.Protocol, Active: s.Stats.Active,
			BytesIn: s.Stats.BytesIn, BytesOut: s.Stats.BytesOut, Rejected: s.Stats.Rejected, Failed: s.Stats.Failed}
		if s.Protocol == "tcp" {
			ms.Connections = s.Stats.Accepted
		} else {
			ms.Sessions = s.Stats.Accepted
		}
		for _, u := range s.Upstreams {
			ms.Upstreams = append(ms.Upstreams, metrics.Upstream{Addr: u.Addr.String(), Up: u.Up, Weight: u.Weight,
				Failures: u.Failures, Selected: u.Total})
		}
		f.Services = append(f.Services, ms)
	}
	return f
}
