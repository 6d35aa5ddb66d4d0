package daemon

import (
	"context"
	"fmt"

	"github.com/lbctl/lbctl/pkg/config"
	"github.com/lbctl/lbctl/pkg/proxy"
)

// newProxyRunner runs a service in mode proxy: the Go front end with
// upstream sockets from the LB's own address.
func newProxyRunner(d *Daemon, svc config.Service) (runner, error) {
	return newFrontendRunner(d, svc, &proxy.ProxyDialer{Interface: svc.Interface})
}

// frontendRunner runs a service through a pkg/proxy front end. Modes that
// differ only in how upstream sockets are made (transparent, dsr) reuse it
// with their own proxy.Dialer.
type frontendRunner struct {
	d      *Daemon
	svc    config.Service
	dialer proxy.Dialer
	fe     proxy.Frontend
	health upstreamHealth // health.go
}

func newFrontendRunner(d *Daemon, svc config.Service, dialer proxy.Dialer) (*frontendRunner, error) {
	pool, err := NewPool(svc)
	if err != nil {
		return nil, err
	}
	r := &frontendRunner{d: d, svc: svc, dialer: dialer, health: upstreamHealth{d: d}}
	if err := r.health.attach(svc, pool); err != nil {
		return nil, err
	}
	log := d.Log()
	switch svc.Protocol {
	case config.TCP:
		r.fe = proxy.NewTCP(ProxyService(svc), pool, dialer, log)
	case config.UDP:
		r.fe = proxy.NewUDP(ProxyService(svc), pool, dialer, log)
	default:
		return nil, fmt.Errorf("service %s: unknown protocol %q", svc.Name, svc.Protocol)
	}
	return r, nil
}

// ProxyService is the front end's view of a configured service.
func ProxyService(svc config.Service) proxy.Service {
	return proxy.Service{
		Name:              svc.Name,
		Listen:            svc.Listen,
		ConnectTimeout:    svc.ConnectTimeout,
		Timeout:           svc.Timeout,
		Responses:         svc.Responses,
		NextUpstreamTries: svc.NextUpstreamTries,
		MaxConns:          svc.MaxConns,
	}
}

// NewPool builds the upstream pool of a configured service. Its health
// source is the config's `down:` flags until pkg/health's tracker is set
// (Pool.SetHealth).
func NewPool(svc config.Service) (*proxy.Pool, error) {
	ups := make([]proxy.Upstream, len(svc.Upstreams))
	for i, u := range svc.Upstreams {
		ups[i] = proxy.Upstream{Addr: u.Addr, Weight: u.Weight, Backup: u.Backup, Down: u.Down}
	}
	// DSR keys the hash on the client's address:port (one flow); other
	// modes keep a client on one upstream.
	hashPort := svc.Mode == config.ModeDSR
	p, err := proxy.NewPool(ups, svc.Balance, hashPort)
	if err != nil {
		return nil, fmt.Errorf("service %s: %w", svc.Name, err)
	}
	return p, nil
}

func (r *frontendRunner) Start(context.Context) error {
	if err := r.fe.Start(); err != nil {
		r.health.stop()
		return err
	}
	r.health.start()
	return nil
}

func (r *frontendRunner) Update(svc config.Service) error {
	pool, err := NewPool(svc)
	if err != nil {
		return err
	}
	if err := r.health.attach(svc, pool); err != nil {
		return err
	}
	r.fe.Update(ProxyService(svc), pool)
	r.svc = svc
	return nil
}

func (r *frontendRunner) Stop(ctx context.Context) error {
	err := r.fe.Stop(ctx)
	r.health.stop()
	if c, ok := r.dialer.(interface{ Close() error }); ok {
		c.Close()
	}
	return err
}

func (r *frontendRunner) Status() ServiceStatus {
	return ServiceStatus{
		Name: r.svc.Name, Protocol: string(r.svc.Protocol), Listen: r.svc.Listen.String(),
		Mode: string(r.svc.Mode), Balance: r.svc.Balance,
		Stats: r.fe.Stats(), Upstreams: r.fe.Pool().Snapshot(), Health: r.health.snapshot(),
	}
}
