// Package daemon is `lbctl run`: it turns a config into running services
// (front ends, data plane, health) and keeps them running: SIGHUP reloads
// the config, cancelling the context (SIGTERM) drains and stops.
//
// Each service runs in a runner chosen by its mode in newRunner, one file
// per mode (proxy.go, transparent.go, dsr.go, xdp.go). Host-wide set-up a
// mode needs is done by that mode's file through Daemon.AtExit, and undone
// exactly at exit.
package daemon

import (
	"context"
	"errors"
	"fmt"
	"io"
	"os"
	"os/signal"
	"slices"
	"sync"
	"sync/atomic"
	"syscall"
	"time"

	"go.uber.org/zap"
	"go.uber.org/zap/zapcore"

	"github.com/lbctl/lbctl/pkg/config"
	"github.com/lbctl/lbctl/pkg/dataplane"
	"github.com/lbctl/lbctl/pkg/health"
	"github.com/lbctl/lbctl/pkg/proxy"
)

// Options configure a Daemon.
type Options struct {
	ConfigPath string      // the YAML file (lbctl run -c)
	BPFFS      string      // bpffs root for pinned state (modes that use BPF)
	Log        *zap.Logger // the logger; nil: built from the config's log block, to LogTo
	LogTo      io.Writer   // where a logger built from the config writes; nil: no logs
	// ControlSocket is where lbctl status finds the daemon; default
	// ControlSocket(BPFFS) (control.go).
	ControlSocket string
	// Pprof serves Go's profiles (net/http/pprof) under /debug/pprof/ on
	// the control socket (root only); off by default (lbctl run --pprof).
	Pprof bool
}

// runner runs one service in one mode.
type runner interface {
	// Start opens the service's listeners and starts serving.
	Start(ctx context.Context) error
	// Update applies a reloaded config of the same service (same name,
	// protocol, listen and mode) to new connections.
	Update(config.Service) error
	// Stop stops accepting and drains until ctx is done.
	Stop(ctx context.Context) error
	// Status is the service's live state.
	Status() ServiceStatus
}

// newRunner is THE switch from a service's mode to the runner that runs it.
func newRunner(d *Daemon, svc config.Service) (runner, error) {
	switch svc.Mode {
	case config.ModeProxy:
		return newProxyRunner(d, svc)
	case config.ModeTransparent:
		return newTransparentRunner(d, svc)
	case config.ModeDSR:
		return newDSRRunner(d, svc)
	case config.ModeXDP:
		return newXDPRunner(d, svc)
	}
	return nil, fmt.Errorf("service %s: mode %s cannot run yet (use mode proxy)", svc.Name, svc.Mode)
}

// Daemon runs the services of a config.
type Daemon struct {
	opts Options
	log  *zap.Logger

	mu       sync.Mutex
	cfg      *config.Config
	services map[string]*service
	started  time.Time
	reloads  int
	draining sync.WaitGroup // services removed or replaced by a reload

	exitMu sync.Mutex
	atExit []func() error

	tpOnce sync.Once
	tp     *transparentHost // mode transparent's host set-up (transparent.go)

	natOnce sync.Once
	nat     *routerNAT // router NAT set-up shared by the dsr services (dsr.go)

	checkOnce sync.Once
	checks    *health.Checker // the health-check pool of every service (health.go)

	ops ops // control socket and metrics (control.go)

	exiting atomic.Bool // Shutdown began: mode xdp leaves its forwarding in place (xdp.go)

	// xdpMode is the xdp.mode of the config being applied (d.mu): set
	// before a reload starts or updates services, so they use the new one.
	xdpMode dataplane.XDPMode

	// xdpOwner is the runner whose table each VIP's entry in xdp_lb holds
	// (xdp.go): a runner being replaced writes and removes the entry only
	// while it still owns it.
	xdpMu    sync.Mutex
	xdpOwner map[dataplane.XDPService]*xdpRunner
}

type service struct {
	cfg config.Service
	run runner
}

// New loads the config; nothing runs before Start.
func New(opts Options) (*Daemon, error) {
	cfg, err := config.Load(opts.ConfigPath)
	if err != nil {
		return nil, fmt.Errorf("load config: %w", err)
	}
	if opts.Log == nil {
		opts.Log = zap.NewNop()
		if opts.LogTo != nil {
			opts.Log = NewLogger(cfg.Log, opts.LogTo)
		}
	}
	return &Daemon{opts: opts, log: opts.Log, cfg: cfg, services: map[string]*service{},
		xdpMode: xdpAttachMode(cfg.XDP), xdpOwner: map[dataplane.XDPService]*xdpRunner{}}, nil
}

// NewLogger returns the logger a config's log block asks for (level debug,
// info, warn or error; format console or json; validated by pkg/config).
func NewLogger(l config.Log, w io.Writer) *zap.Logger {
	var lvl zapcore.Level
	if err := lvl.UnmarshalText([]byte(l.Level)); err != nil {
		lvl = zapcore.InfoLevel
	}
	enc := zap.NewProductionEncoderConfig()
	enc.EncodeTime = zapcore.ISO8601TimeEncoder
	var e zapcore.Encoder
	if l.Format == "json" {
		e = zapcore.NewJSONEncoder(enc)
	} else {
		enc.EncodeLevel = zapcore.CapitalLevelEncoder
		e = zapcore.NewConsoleEncoder(enc)
	}
	return zap.New(zapcore.NewCore(e, zapcore.Lock(zapcore.AddSync(w)), lvl))
}

// Log is the daemon's logger (for runners).
func (d *Daemon) Log() *zap.Logger { return d.log }

// BPFFS is the bpffs root (for runners).
func (d *Daemon) BPFFS() string { return d.opts.BPFFS }

// Config is the config currently running.
func (d *Daemon) Config() *config.Config {
	d.mu.Lock()
	defer d.mu.Unlock()
	return d.cfg
}

// AtExit registers fn to undo host-wide set-up when the daemon exits; the
// functions run in reverse order, after every service has stopped.
func (d *Daemon) AtExit(fn func() error) {
	d.exitMu.Lock()
	defer d.exitMu.Unlock()
	d.atExit = append(d.atExit, fn)
}

// Run loads the config, starts every service and serves until ctx is
// cancelled (SIGTERM), then drains for up to drain_timeout. SIGHUP reloads.
func Run(ctx context.Context, opts Options) error {
	d, err := New(opts)
	if err != nil {
		return err
	}
	stopOps, err := d.startOps(ctx)
	if err != nil {
		return err
	}
	defer stopOps()
	if err := d.Start(ctx); err != nil {
		return err
	}
	hup := make(chan os.Signal, 1)
	signal.Notify(hup, syscall.SIGHUP)
	defer signal.Stop(hup)
	for {
		select {
		case <-hup:
			if err := d.Reload(ctx); err != nil {
				d.log.Error("reload failed, the running config keeps serving", zap.Error(err))
			}
		case <-ctx.Done():
			return d.Shutdown()
		}
	}
}

// Start starts every service of the loaded config. If one fails, those
// already started are stopped and the error returned.
func (d *Daemon) Start(ctx context.Context) error {
	d.mu.Lock()
	defer d.mu.Unlock()
	d.started = time.Now()
	for _, svc := range d.cfg.Services {
		if err := d.startLocked(ctx, svc); err != nil {
			d.mu.Unlock()
			d.Shutdown()
			d.mu.Lock()
			return err
		}
	}
	d.log.Info("running", zap.String("config", d.cfg.File), zap.Int("services", len(d.cfg.Services)))
	return nil
}

func (d *Daemon) startLocked(ctx context.Context, svc config.Service) error {
	r, err := newRunner(d, svc)
	if err != nil {
		return err
	}
	if err := r.Start(ctx); err != nil {
		return fmt.Errorf("start service %s: %w", svc.Name, err)
	}
	d.services[svc.Name] = &service{cfg: svc, run: r}
	return nil
}

// Reload reads the config file again. An invalid file changes nothing.
// Services new in the file start; removed ones drain (for up to the new
// drain_timeout) while the rest go on; a service whose protocol, listen
// address or mode changed is replaced (the old one drains); any other
// change (upstreams, weights, timeouts, balance) applies to new connections.
// A new transparent.mark or table is applied first (transparent.go); if it
// cannot be, nothing changes.
func (d *Daemon) Reload(ctx context.Context) error {
	cfg, err := config.Load(d.opts.ConfigPath)
	if err != nil {
		return fmt.Errorf("reload %s: %w", d.opts.ConfigPath, err)
	}
	d.mu.Lock()
	defer d.mu.Unlock()
	// Host-wide settings first: the services below set up with them.
	if err := d.transparent().retarget(cfg.Transparent.Mark, cfg.Transparent.Table); err != nil {
		return fmt.Errorf("reload %s: %w", d.opts.ConfigPath, err)
	}
	d.xdpMode = xdpAttachMode(cfg.XDP) // xdp services re-attach in Update if it changed
	keep := map[string]bool{}
	var errs []error
	for _, svc := range cfg.Services {
		keep[svc.Name] = true
		old, ok := d.services[svc.Name]
		switch {
		case ok && sameSocket(old.cfg, svc):
			if err := old.run.Update(svc); err != nil {
				errs = append(errs, fmt.Errorf("update service %s: %w", svc.Name, err))
				continue
			}
			old.cfg = svc
			d.log.Info("service updated", zap.String("service", svc.Name))
		case ok:
			d.drainLocked(old, cfg.DrainTimeout)
			fallthrough
		default:
			if err := d.startLocked(ctx, svc); err != nil {
				errs = append(errs, err)
				continue
			}
			d.log.Info("service started", zap.String("service", svc.Name))
		}
	}
	for name, s := range d.services {
		if !keep[name] {
			d.drainLocked(s, cfg.DrainTimeout)
		}
	}
	d.cfg = cfg
	d.reloads++
	if len(errs) > 0 {
		return errors.Join(errs...)
	}
	d.log.Info("reloaded", zap.String("config", cfg.File), zap.Int("services", len(cfg.Services)))
	return nil
}

func sameSocket(a, b config.Service) bool {
	return a.Protocol == b.Protocol && a.Listen == b.Listen && a.Mode == b.Mode
}

// drainLocked takes s out of the service table and stops it in the
// background, draining for up to timeout.
func (d *Daemon) drainLocked(s *service, timeout time.Duration) {
	delete(d.services, s.cfg.Name)
	if x, ok := s.run.(*xdpRunner); ok && !d.exiting.Load() {
		// Nothing to drain: out of the program now, before the reload
		// returns (and before a service that replaces it can be undone).
		x.leave()
	}
	d.draining.Add(1)
	go func() {
		defer d.draining.Done()
		ctx, cancel := context.WithTimeout(context.Background(), timeout)
		defer cancel()
		if err := s.run.Stop(ctx); err != nil {
			d.log.Warn("stop service", zap.String("service", s.cfg.Name), zap.Error(err))
		}
		d.log.Info("service stopped", zap.String("service", s.cfg.Name))
	}()
}

// Shutdown stops accepting on every service, drains open connections for
// up to drain_timeout, then undoes the host-wide set-up.
func (d *Daemon) Shutdown() error {
	d.exiting.Store(true)
	d.mu.Lock()
	timeout := d.cfg.DrainTimeout
	d.log.Info("draining", zap.Duration("drain_timeout", timeout))
	for _, s := range d.services {
		d.drainLocked(s, timeout)
	}
	d.mu.Unlock()
	d.draining.Wait()

	d.exitMu.Lock()
	fns := slices.Clone(d.atExit)
	d.atExit = nil
	d.exitMu.Unlock()
	var errs []error
	for _, fn := range slices.Backward(fns) {
		if err := fn(); err != nil {
			errs = append(errs, err)
		}
	}
	d.log.Info("stopped")
	return errors.Join(errs...)
}

// Status is a snapshot of the daemon's live state (lbctl status, metrics).
type Status struct {
	Config   string          `json:"config"`
	Started  time.Time       `json:"started"`
	Reloads  int             `json:"reloads"`
	Services []ServiceStatus `json:"services"`
}

// ServiceStatus is one running service.
type ServiceStatus struct {
	Name      string                 `json:"name"`
	Protocol  string                 `json:"protocol"`
	Listen    string                 `json:"listen"`
	Mode      string                 `json:"mode"`
	Balance   string                 `json:"balance"`
	Stats     proxy.Stats            `json:"stats"`
	Upstreams []proxy.UpstreamStatus `json:"upstreams"`
	Health    []health.Status        `json:"health,omitempty"` // per upstream: state, since, last check
	XDP       *XDPStatus             `json:"xdp,omitempty"`    // mode xdp: table generation, shares (xdp.go)
}

// Status returns a snapshot of the running services, in config order.
func (d *Daemon) Status() Status {
	d.mu.Lock()
	defer d.mu.Unlock()
	st := Status{Config: d.cfg.File, Started: d.started, Reloads: d.reloads}
	for _, svc := range d.cfg.Services {
		if s, ok := d.services[svc.Name]; ok {
			st.Services = append(st.Services, s.run.Status())
		}
	}
	return st
}
