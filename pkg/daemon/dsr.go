package daemon

import (
	"context"
	"errors"
	"sync"

	"github.com/lbctl/lbctl/pkg/config"
	"github.com/lbctl/lbctl/pkg/proxy"
)

// newDSRRunner runs a service in mode dsr: proxy.DSR forwards each client
// datagram from the client's address:port, and with nat: router this file
// also makes the LB the router that rewrites the replies (routerNAT). With
// nat: origin the LB only sends; each backend rewrites its own replies
// (lbctl snat add --vip-from, docs/dsr.md).
func newDSRRunner(d *Daemon, svc config.Service) (runner, error) {
	pool, err := NewPool(svc)
	if err != nil {
		return nil, err
	}
	fe := proxy.NewDSR(ProxyService(svc), pool, d.Log())
	fe.Interface = svc.Interface
	r := &dsrRunner{frontendRunner: frontendRunner{d: d, svc: svc, fe: fe, health: upstreamHealth{d: d}}}
	if err := r.health.attach(svc, pool); err != nil {
		return nil, err
	}
	return r, nil
}

type dsrRunner struct {
	frontendRunner

	mu    sync.Mutex
	claim *natClaim // router NAT set-up held by this service; nil with origin NAT
}

// claimNAT sets up router NAT for svc (nothing with origin NAT).
func (r *dsrRunner) claimNAT(svc config.Service) (*natClaim, error) {
	if svc.DSR.NAT != "router" {
		return nil, nil
	}
	return r.d.routerNAT().acquire(svc)
}

func (r *dsrRunner) Start(ctx context.Context) error {
	c, err := r.claimNAT(r.svc)
	if err != nil {
		return err
	}
	if err := r.fe.Start(); err != nil {
		r.health.stop()
		return errors.Join(err, r.d.routerNAT().release(c))
	}
	r.health.start()
	r.mu.Lock()
	r.claim = c
	r.mu.Unlock()
	return nil
}

// Update applies new upstreams (and their rules) to the next datagram: the
// new rules are in place before the old ones go, so no reply loses its
// rewrite in between.
func (r *dsrRunner) Update(svc config.Service) error {
	c, err := r.claimNAT(svc)
	if err != nil {
		return err
	}
	if err := r.frontendRunner.Update(svc); err != nil {
		return errors.Join(err, r.d.routerNAT().release(c))
	}
	r.mu.Lock()
	old := r.claim
	r.claim = c
	r.mu.Unlock()
	return r.d.routerNAT().release(old)
}

func (r *dsrRunner) Stop(ctx context.Context) error {
	err := r.fe.Stop(ctx)
	r.health.stop()
	r.mu.Lock()
	c := r.claim
	r.claim = nil
	r.mu.Unlock()
	return errors.Join(err, r.d.routerNAT().release(c))
}

// routerNAT is the router NAT set-up shared by the daemon's dsr services.
func (d *Daemon) routerNAT() *routerNAT {
	d.natOnce.Do(func() { d.nat = newRouterNAT(d.log, d.opts.BPFFS) })
	return d.nat
}
