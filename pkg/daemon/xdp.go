package daemon

import (
	"context"
	"errors"
	"fmt"
	"net/netip"
	"sync"

	"go.uber.org/zap"

	"github.com/lbctl/lbctl/pkg/balance"
	"github.com/lbctl/lbctl/pkg/config"
	"github.com/lbctl/lbctl/pkg/dataplane"
	"github.com/lbctl/lbctl/pkg/health"
	"github.com/lbctl/lbctl/pkg/netconf"
)

// XDPStatus is what the XDP program does for one service (lbctl status).
type XDPStatus struct {
	Interface  string                      `json:"interface"`
	AttachMode dataplane.XDPMode           `json:"attach_mode"` // native or generic
	Generation uint32                      `json:"generation"`  // table swaps so far
	Packets    uint64                      `json:"packets"`
	Bytes      uint64                      `json:"bytes"`
	Backends   []dataplane.XDPBackendState `json:"backends"` // slots: share of the Maglev table
}

// newXDPRunner runs a service in mode xdp: the xdp_lb program on the
// client-facing interface forwards the service's packets in the kernel, to
// a backend picked by a Maglev table this runner rebuilds on every health
// or config change. No socket is opened for the service.
//
// The forwarding outlives the daemon: on exit (and on a crash) the program,
// its tables, forwarding and router NAT stay, so an upgrade loses no
// packet; a new daemon adopts the pinned state, and `lbctl detach IFACE`
// removes it. A service that a reload removes is removed from the program.
func newXDPRunner(d *Daemon, svc config.Service) (runner, error) {
	proto, err := dataplane.ParseProto(string(svc.Protocol))
	if err != nil {
		return nil, fmt.Errorf("service %s: %w", svc.Name, err)
	}
	r := &xdpRunner{d: d, svc: svc}
	r.key = dataplane.XDPService{VIP: svc.Listen, Proto: proto}
	r.health = upstreamHealth{d: d, onChange: r.fillTable}
	return r, nil
}

type xdpRunner struct {
	d      *Daemon
	key    dataplane.XDPService
	health upstreamHealth

	mu      sync.Mutex // serialises table builds and guards below
	svc     config.Service
	ifname  string
	mode    dataplane.XDPMode // attached in
	want    dataplane.XDPMode // asked for (xdp.mode; "" auto)
	gen     uint32
	claim   *natClaim
	started bool
}

func (r *xdpRunner) open() (*dataplane.Dataplane, error) {
	dp, err := dataplane.Open(dataplane.Options{Root: r.d.BPFFS(), Log: r.d.Log(), ClsBPF: netconfCls{}})
	if err != nil {
		return nil, fmt.Errorf("service %s: %w", r.svc.Name, err)
	}
	return dp, nil
}

func (r *xdpRunner) Start(ctx context.Context) error {
	log := r.d.Log().With(zap.String("service", r.svc.Name))
	vip := r.svc.Listen.Addr().Unmap()
	ifaces, err := netconf.ClientInterfaces(vip)
	if err != nil {
		return fmt.Errorf("service %s: %w", r.svc.Name, err)
	}
	// bpf_fib_lookup (and the stack, for the first packets before a
	// neighbour is known) forward only where forwarding is on. Not
	// restored at exit: forwarding outlives the daemon.
	if _, err := netconf.EnableForwarding(netconf.ForwardingSysctl(vip)); err != nil {
		return fmt.Errorf("service %s: %w", r.svc.Name, err)
	}
	var claim *natClaim
	if r.svc.DSR.NAT == "router" {
		if claim, err = r.d.routerNAT().acquire(r.svc); err != nil {
			return err
		}
	}
	dp, err := r.open()
	if err != nil {
		return err
	}
	want := r.d.xdpMode // d.mu is held (startLocked)
	mode, err := dp.AttachXDP(ifaces[0], want)
	dp.Close()
	if err != nil {
		return errors.Join(fmt.Errorf("service %s: %w%s", r.svc.Name, err, xdpModeHint(want)), r.d.routerNAT().release(claim))
	}
	log.Info("xdp_lb attached", zap.String("interface", ifaces[0]), zap.String("xdp_mode", string(mode)), zap.String("config_xdp_mode", xdpModeName(want)))
	r.mu.Lock()
	r.ifname, r.mode, r.want, r.claim, r.started = ifaces[0], mode, want, claim, true
	r.mu.Unlock()
	r.d.xdpMu.Lock()
	r.d.xdpOwner[r.key] = r // from now on the VIP's entry is this runner's
	r.d.xdpMu.Unlock()
	// The first table comes from the tracker's initial state (every
	// upstream up but those marked down), as the pinned one did: a restart
	// swaps in an equal table.
	if err := r.health.attach(r.svc, nil); err != nil {
		return err
	}
	r.health.start()
	return nil
}

// fillTable rebuilds the service's Maglev table from the tracker's view
// (eligible upstreams, effective weights) and swaps it in.
func (r *xdpRunner) fillTable(tr *health.Tracker) {
	r.mu.Lock()
	defer r.mu.Unlock()
	if !r.started || tr.Len() != len(r.svc.Upstreams) {
		return
	}
	for i, u := range r.svc.Upstreams {
		if tr.Addr(i) != u.Addr {
			return // a retired tracker's late change: the current one rules
		}
	}
	ups := make([]balance.Upstream, tr.Len())
	backends := make([]netip.AddrPort, tr.Len())
	for i := range ups {
		cfg := r.svc.Upstreams[i]
		ups[i] = balance.Upstream{Addr: tr.Addr(i), Weight: tr.Weight(i), Backup: cfg.Backup, Down: !tr.Eligible(i)}
		backends[i] = tr.Addr(i)
	}
	table := balance.MaglevTable(ups, dataplane.XDPTableSize)
	log := r.d.Log().With(zap.String("service", r.svc.Name))
	r.d.xdpMu.Lock()
	defer r.d.xdpMu.Unlock()
	if r.d.xdpOwner[r.key] != r {
		return // replaced by a reload: the entry is the new runner's
	}
	dp, err := r.open()
	if err != nil {
		log.Error("rebuild xdp table", zap.Error(err))
		return
	}
	defer dp.Close()
	gen, err := dp.SetXDPService(r.key, backends, table)
	if err != nil {
		log.Error("rebuild xdp table", zap.Error(err))
		return
	}
	r.gen = gen
	log.Debug("xdp table swapped in", zap.Uint32("generation", gen))
}

// xdpAttachMode is the dataplane mode of the config's xdp.mode.
func xdpAttachMode(x config.XDP) dataplane.XDPMode {
	if x.Mode == config.XDPAuto {
		return dataplane.XDPAuto
	}
	return dataplane.XDPMode(x.Mode)
}

func xdpModeName(m dataplane.XDPMode) string {
	if m == dataplane.XDPAuto {
		return config.XDPAuto
	}
	return string(m)
}

func xdpModeHint(m dataplane.XDPMode) string {
	if m == dataplane.XDPNative {
		return " (xdp.mode native: the driver may lack native XDP; set xdp.mode: auto or generic)"
	}
	return ""
}

// reattach moves xdp_lb to the xdp.mode of a reloaded config, if it
// changed (d.mu held). Several xdp services on one interface each call it:
// the first moves the hook, the others replace the program in place.
func (r *xdpRunner) reattach() error {
	want := r.d.xdpMode
	r.mu.Lock()
	defer r.mu.Unlock()
	if want == r.want || !r.started {
		return nil
	}
	dp, err := r.open()
	if err != nil {
		return err
	}
	mode, err := dp.AttachXDP(r.ifname, want)
	dp.Close()
	if err != nil {
		return fmt.Errorf("service %s: xdp.mode %s: %w%s", r.svc.Name, xdpModeName(want), err, xdpModeHint(want))
	}
	if mode != r.mode {
		r.d.Log().Info("xdp_lb moved to another XDP mode", zap.String("service", r.svc.Name), zap.String("interface", r.ifname),
			zap.String("from", string(r.mode)), zap.String("xdp_mode", string(mode)), zap.String("config_xdp_mode", xdpModeName(want)))
	}
	r.mode, r.want = mode, want
	return nil
}

func (r *xdpRunner) Update(svc config.Service) error {
	if err := r.reattach(); err != nil {
		return err
	}
	var claim *natClaim
	var err error
	if svc.DSR.NAT == "router" {
		if claim, err = r.d.routerNAT().acquire(svc); err != nil {
			return err
		}
	}
	r.mu.Lock()
	old := r.claim
	r.svc, r.claim = svc, claim
	r.mu.Unlock()
	if err := r.health.attach(svc, nil); err != nil {
		return err
	}
	return r.d.routerNAT().release(old)
}

// Stop ends the health checks. On daemon exit the forwarding stays (see
// newXDPRunner); a service removed by a reload leaves the program, and its
// router NAT claim is released.
func (r *xdpRunner) Stop(ctx context.Context) error {
	r.health.stop()
	if r.d.exiting.Load() {
		r.mu.Lock()
		r.started = false
		r.mu.Unlock()
		r.d.Log().Info("xdp forwarding stays after exit; lbctl detach IFACE removes it",
			zap.String("service", r.svc.Name), zap.String("interface", r.ifname))
		return nil
	}
	err := r.leave()
	r.mu.Lock()
	c := r.claim
	r.claim = nil
	r.mu.Unlock()
	return errors.Join(err, r.d.routerNAT().release(c))
}

// leave takes the service out of xdp_lb, if its entry is still this
// runner's (a service that replaced it on the same VIP keeps its own),
// and stops table builds. Called at once when a reload removes or
// replaces the service (drainLocked), and again by Stop (a no-op then).
func (r *xdpRunner) leave() error {
	r.mu.Lock()
	defer r.mu.Unlock()
	r.started = false
	r.d.xdpMu.Lock()
	defer r.d.xdpMu.Unlock()
	if r.d.xdpOwner[r.key] != r {
		return nil
	}
	delete(r.d.xdpOwner, r.key)
	dp, err := r.open()
	if err != nil {
		r.d.Log().Error("remove xdp service", zap.String("service", r.svc.Name), zap.Error(err))
		return err
	}
	err = dp.DelXDPService(r.key)
	dp.Close() // before release opens it again: the flock is per open file
	if errors.Is(err, dataplane.ErrNoService) {
		err = nil
	}
	if err != nil {
		r.d.Log().Error("remove xdp service", zap.String("service", r.svc.Name), zap.Error(err))
	} else {
		r.d.Log().Info("xdp service removed from xdp_lb", zap.String("service", r.svc.Name), zap.Stringer("vip", r.key.VIP))
	}
	return err
}

func (r *xdpRunner) Status() ServiceStatus {
	r.mu.Lock()
	svc, ifname, mode, gen := r.svc, r.ifname, r.mode, r.gen
	r.mu.Unlock()
	st := ServiceStatus{
		Name: svc.Name, Protocol: string(svc.Protocol), Listen: svc.Listen.String(),
		Mode: string(svc.Mode), Balance: balance.Hash, Health: r.health.snapshot(),
	}
	x := &XDPStatus{Interface: ifname, AttachMode: mode, Generation: gen}
	if dp, err := r.open(); err == nil {
		if ss, err := dp.XDPServices(); err == nil {
			for _, s := range ss {
				if s.XDPService == r.key {
					x.Generation, x.Packets, x.Bytes, x.Backends = s.Generation, s.Packets, s.Bytes, s.Backends
				}
			}
		}
		dp.Close()
	}
	st.XDP = x
	return st
}
