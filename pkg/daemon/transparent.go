package daemon

import (
	"context"
	"errors"
	"fmt"
	"net/netip"
	"os"
	"sync"
	"time"

	"go.uber.org/zap"

	"github.com/lbctl/lbctl/pkg/config"
	"github.com/lbctl/lbctl/pkg/dataplane"
	"github.com/lbctl/lbctl/pkg/netconf"
	"github.com/lbctl/lbctl/pkg/proxy"
)

// transparentHost is the host-wide set-up of mode transparent, shared by
// the transparent services of one daemon and reference-counted (a reload
// sets up the new service before the old one lets go):
//
//   - the policy rule `fwmark MARK lookup TABLE` and the route `local
//     default dev lo table TABLE`, per family of the upstreams; removed at
//     the end only if lbctl run added them;
//   - the steer program at tc ingress of the upstream-facing interfaces
//     (the service's interface:, else the route to each upstream);
//     detached at the end only where lbctl run attached it;
//   - the upstreams in steer's map, removed at the end only if added here;
//   - rp_filter of those interfaces where the steered replies need it
//     (netconf.PrepareRPFilter), restored at the end.
type transparentHost struct {
	mu     sync.Mutex
	log    *zap.Logger
	bpffs  string
	mark   uint32
	table  int
	policy map[int]*policyRef // family (4, 6) -> installed policy
	ifaces map[string]*steerIfaceRef
	ups    map[steerUp]*steerUpRef
	reader *dataplane.Dataplane // read-only handle for the watchdog
	warned map[steerUp]time.Time
	seen   map[steerUp]uint64
	gw     map[netip.Addr]netip.Addr // upstream -> the LB's address towards it (for the fix)
	stale  []*netconf.PolicyRouting  // a failed retarget's new policy, removed with the last policy
}

type policyRef struct {
	n  int
	pr *netconf.PolicyRouting
}

type steerIfaceRef struct {
	n     int
	owned bool
	rp    *netconf.RPFilterChange
}

type steerUp struct {
	proto dataplane.Proto
	addr  netip.AddrPort
}

type steerUpRef struct {
	n     int
	owned bool
}

// tpClaim is what one service holds of the host-wide set-up.
type tpClaim struct {
	fams   []int
	ifaces []string
	ups    []steerUp
}

// transparent returns the daemon's transparent host set-up, made on first
// use. Called from newRunner, with d.mu held.
func (d *Daemon) transparent() *transparentHost {
	d.tpOnce.Do(func() {
		cfg := d.cfg
		d.tp = &transparentHost{
			log: d.log, bpffs: d.opts.BPFFS, mark: cfg.Transparent.Mark, table: cfg.Transparent.Table,
			policy: map[int]*policyRef{}, ifaces: map[string]*steerIfaceRef{}, ups: map[steerUp]*steerUpRef{},
			warned: map[steerUp]time.Time{}, seen: map[steerUp]uint64{}, gw: map[netip.Addr]netip.Addr{},
		}
	})
	return d.tp
}

func (h *transparentHost) open() (*dataplane.Dataplane, error) {
	dp, err := dataplane.Open(dataplane.Options{Root: h.bpffs, Log: h.log, ClsBPF: netconfCls{}})
	if err != nil {
		return nil, fmt.Errorf("transparent: %w", err)
	}
	return dp, nil
}

func famOf(a netip.Addr) int {
	if a.Unmap().Is4() {
		return 4
	}
	return 6
}

func protoOf(p config.Protocol) dataplane.Proto {
	if p == config.UDP {
		return dataplane.UDP
	}
	return dataplane.TCP
}

// upstreamIfaces maps each upstream of s to the interface its replies
// arrive on.
func upstreamIfaces(s config.Service) (map[string][]netip.Addr, error) {
	out := map[string][]netip.Addr{}
	for _, u := range s.Upstreams {
		ifname := s.Interface
		if ifname == "" {
			var err error
			if ifname, err = netconf.UpstreamInterface(u.Addr.Addr().Unmap()); err != nil {
				return nil, fmt.Errorf("service %s: %w", s.Name, err)
			}
		}
		out[ifname] = append(out[ifname], u.Addr.Addr().Unmap())
	}
	return out, nil
}

// retarget applies a reloaded transparent.mark / transparent.table to
// what is set up: the new rule and route go in next to the old ones, the
// steer programs lbctl run attached switch to the new mark in place, and
// then exactly the old rule and route lbctl run added go. Marked replies
// always find a rule. On error nothing changes (the reload is refused).
func (h *transparentHost) retarget(mark uint32, table int) error {
	h.mu.Lock()
	defer h.mu.Unlock()
	if mark == h.mark && table == h.table {
		return nil
	}
	what := fmt.Sprintf("transparent.mark %#x -> %#x, transparent.table %d -> %d", h.mark, mark, h.table, table)
	if len(h.policy) == 0 && len(h.ifaces) == 0 {
		h.mark, h.table = mark, table // nothing set up yet
		return nil
	}
	if mark != h.mark {
		for ifname, ref := range h.ifaces {
			if !ref.owned {
				return fmt.Errorf("%s: the steer program on %s was attached before lbctl run started (lbctl attach --steer) and keeps its mark: put transparent.mark back to %#x, or stop lbctl run, lbctl detach %s and start it again", what, ifname, h.mark, ifname)
			}
		}
	}
	dp, err := h.open()
	if err != nil {
		return err
	}
	defer dp.Close()

	next := map[int]*netconf.PolicyRouting{}
	undo := func(err error) error {
		for _, np := range next {
			err = errors.Join(err, np.Remove())
		}
		return fmt.Errorf("%s: %w; nothing changed: fix it, or put the old values back", what, err)
	}
	for fam, ref := range h.policy {
		np, err := ref.pr.InstallNext(netconf.Policy{Mark: mark, Table: table})
		if err != nil {
			return undo(err)
		}
		next[fam] = np
	}
	if mark != h.mark {
		var switched []string
		for ifname := range h.ifaces {
			if _, err := dp.AttachSteer(ifname, dataplane.SteerOptions{Mark: mark, CheckSocket: true}); err != nil {
				for _, done := range switched {
					if _, rerr := dp.AttachSteer(done, dataplane.SteerOptions{Mark: h.mark, CheckSocket: true}); rerr != nil {
						err = errors.Join(err, fmt.Errorf("steer on %s keeps mark %#x, its rule stays until the last transparent service stops: %w", done, mark, rerr))
						for _, np := range next {
							h.stale = append(h.stale, np)
						}
						next = nil // steer marks with either mark now: both rules stay
					}
				}
				return undo(err)
			}
			switched = append(switched, ifname)
		}
	}
	var errs []error
	for fam, ref := range h.policy {
		np := next[fam]
		if err := ref.pr.Retire(np); err != nil {
			errs = append(errs, err)
		}
		ref.pr = np
		for _, a := range np.Added {
			h.log.Info("policy routing now", zap.String("what", a))
		}
	}
	h.log.Info("transparent policy routing changed", zap.String("mark", fmt.Sprintf("%#x", mark)), zap.Int("table", table), zap.Int("steer_interfaces", len(h.ifaces)))
	h.mark, h.table = mark, table
	return errors.Join(errs...)
}

// acquire sets up what s needs; on error nothing of s stays.
func (h *transparentHost) acquire(s config.Service) (*tpClaim, error) {
	ifs, err := upstreamIfaces(s)
	if err != nil {
		return nil, err
	}
	h.mu.Lock()
	defer h.mu.Unlock()
	c := &tpClaim{}
	dp, err := h.open()
	if err != nil {
		return nil, err
	}
	defer dp.Close()
	fail := func(err error) (*tpClaim, error) {
		return nil, errors.Join(fmt.Errorf("service %s: transparent: %w", s.Name, err), h.releaseLocked(dp, c))
	}

	fams := map[int]bool{}
	for _, u := range s.Upstreams {
		fams[famOf(u.Addr.Addr())] = true
	}
	for _, fam := range []int{4, 6} {
		if !fams[fam] {
			continue
		}
		ref := h.policy[fam]
		if ref == nil {
			pr, err := netconf.InstallPolicy(netconf.Policy{Mark: h.mark, Table: h.table, IPv4: fam == 4, IPv6: fam == 6})
			if err != nil {
				return fail(err)
			}
			for _, a := range pr.Added {
				h.log.Info("added policy routing", zap.String("what", a))
			}
			for _, a := range pr.Present {
				h.log.Info("policy routing already in place, kept at exit", zap.String("what", a))
			}
			ref = &policyRef{pr: pr}
			h.policy[fam] = ref
		}
		ref.n++
		c.fams = append(c.fams, fam)
	}

	have, err := dp.Attachments()
	if err != nil {
		return fail(err)
	}
	for ifname, addrs := range ifs {
		ref := h.ifaces[ifname]
		if ref == nil {
			attached := false
			for _, a := range have {
				attached = attached || (a.Interface == ifname && a.Program == "steer")
			}
			if !attached {
				m, err := dp.AttachSteer(ifname, dataplane.SteerOptions{Mark: h.mark, CheckSocket: true})
				if err != nil {
					return fail(err)
				}
				h.log.Info("attached steer", zap.String("interface", ifname), zap.String("method", string(m)), zap.String("mark", fmt.Sprintf("%#x", h.mark)))
			}
			ref = &steerIfaceRef{owned: !attached}
			h.ifaces[ifname] = ref
			rp, err := netconf.PrepareRPFilter(ifname, addrs)
			if err != nil {
				ref.n++
				c.ifaces = append(c.ifaces, ifname)
				return fail(err)
			}
			if rp != nil {
				h.log.Info("rp_filter changed for the steered replies, restored at exit", zap.String("interface", ifname), zap.Int("from", rp.Old), zap.Int("to", rp.New))
			}
			ref.rp = rp
		}
		ref.n++
		c.ifaces = append(c.ifaces, ifname)
	}

	for _, u := range s.Upstreams {
		// Looked up now, in the daemon's namespace (the watchdog may run
		// on any thread).
		if a, err := netconf.SourceTowards(u.Addr.Addr().Unmap()); err == nil {
			h.gw[u.Addr.Addr().Unmap()] = a
		}
		k := steerUp{proto: protoOf(s.Protocol), addr: u.Addr}
		ref := h.ups[k]
		if ref == nil {
			err := dp.AddSteerUpstream(k.proto, k.addr)
			if err != nil && !errors.Is(err, dataplane.ErrUpstreamExists) {
				return fail(err)
			}
			ref = &steerUpRef{owned: err == nil}
			h.ups[k] = ref
		}
		ref.n++
		c.ups = append(c.ups, k)
	}
	if h.reader == nil {
		if h.reader, err = dataplane.Open(dataplane.Options{Root: h.bpffs, Log: h.log, ReadOnly: true, NoCreate: true}); err != nil {
			h.reader = nil
			h.log.Warn("transparent: no read-only handle on the steer counters: the no-reply watchdog is off", zap.Error(err))
		}
	}
	return c, nil
}

func (h *transparentHost) release(c *tpClaim) error {
	if c == nil {
		return nil
	}
	h.mu.Lock()
	defer h.mu.Unlock()
	dp, err := h.open()
	if err != nil {
		return err
	}
	defer dp.Close()
	return h.releaseLocked(dp, c)
}

func (h *transparentHost) releaseLocked(dp *dataplane.Dataplane, c *tpClaim) error {
	var errs []error
	for _, k := range c.ups {
		ref := h.ups[k]
		if ref == nil {
			continue
		}
		if ref.n--; ref.n > 0 {
			continue
		}
		delete(h.ups, k)
		if ref.owned {
			if err := dp.DelSteerUpstream(k.proto, k.addr); err != nil && !errors.Is(err, dataplane.ErrRuleNotFound) {
				errs = append(errs, err)
			}
		}
	}
	c.ups = nil
	for _, ifname := range c.ifaces {
		ref := h.ifaces[ifname]
		if ref == nil {
			continue
		}
		if ref.n--; ref.n > 0 {
			continue
		}
		delete(h.ifaces, ifname)
		errs = append(errs, ref.rp.Restore())
		if ref.owned {
			if _, err := dp.DetachSteer(ifname); err != nil {
				errs = append(errs, err)
			} else {
				h.log.Info("detached steer", zap.String("interface", ifname))
			}
		}
	}
	c.ifaces = nil
	for _, fam := range c.fams {
		ref := h.policy[fam]
		if ref == nil {
			continue
		}
		if ref.n--; ref.n > 0 {
			continue
		}
		delete(h.policy, fam)
		if err := ref.pr.Remove(); err != nil {
			errs = append(errs, err)
		} else {
			for _, a := range ref.pr.Added {
				h.log.Info("removed policy routing", zap.String("what", a))
			}
		}
	}
	c.fams = nil
	if len(h.policy) == 0 {
		for _, pr := range h.stale {
			errs = append(errs, pr.Remove())
		}
		h.stale = nil
	}
	if len(h.ups) == 0 && len(h.ifaces) == 0 && h.reader != nil {
		h.reader.Close()
		h.reader = nil
	}
	return errors.Join(errs...)
}

// noReply is the watchdog: a connect to upstream failed. If steer marked
// no packet from that upstream since the last check (or ever), its
// replies do not come back through the LB: say so, with the fix, at most
// once a minute per upstream.
func (h *transparentHost) noReply(svc string, proto dataplane.Proto, client, upstream netip.AddrPort, cerr error) {
	h.mu.Lock()
	defer h.mu.Unlock()
	if h.reader == nil {
		return
	}
	k := steerUp{proto: proto, addr: upstream}
	n, ok, err := h.reader.SteerUpstreamPackets(proto, upstream)
	if err != nil || !ok {
		return
	}
	prev, checked := h.seen[k]
	h.seen[k] = n
	if n != 0 && (!checked || n != prev) {
		return // replies from it did reach the LB
	}
	udp := errors.Is(cerr, proxy.ErrNoReply)
	if !udp && !errors.Is(cerr, os.ErrDeadlineExceeded) && !errors.Is(cerr, context.DeadlineExceeded) {
		return // refused or unreachable: an answer, not silence
	}
	if t, ok := h.warned[k]; ok && time.Since(t) < time.Minute {
		return
	}
	h.warned[k] = time.Now()
	gw := "THE_LB_ADDRESS"
	if a, ok := h.gw[upstream.Addr()]; ok {
		gw = a.String()
	}
	ipcmd := "ip"
	if upstream.Addr().Is6() {
		ipcmd = "ip -6"
	}
	what, cause := "got the connection", "its default route most likely does not point at the LB"
	if udp {
		what, cause = "was sent datagrams", "either nothing answers on that port, or its default route does not point at the LB"
	}
	h.log.Error(fmt.Sprintf("doctor: transparent service %s: upstream %s %s from %s but no reply from it came back through the LB (steer saw %d packets from it): %s. On %s run: %s route replace default via %s",
		svc, upstream, what, client, n, cause, upstream.Addr(), ipcmd, gw),
		zap.String("service", svc), zap.Stringer("upstream", upstream), zap.Uint64("steered", n), zap.Error(cerr))
}

// newTransparentRunner runs a service in mode transparent: the Go front
// end with upstream sockets from the client's address, and the host-wide
// return path (policy routing, steer) set up at Start and undone at Stop.
func newTransparentRunner(d *Daemon, svc config.Service) (runner, error) {
	host := d.transparent()
	dialer := proxy.NewTransparentDialer(upstreamAddrs(svc), svc.Interface)
	proto := protoOf(svc.Protocol)
	name := svc.Name
	dialer.OnDialFailed = func(client, upstream netip.AddrPort, err error) {
		host.noReply(name, proto, client, upstream, err)
	}
	fr, err := newFrontendRunner(d, svc, dialer)
	if err != nil {
		return nil, err
	}
	return &transparentRunner{frontendRunner: fr, host: host, dialer: dialer}, nil
}

func upstreamAddrs(svc config.Service) []netip.AddrPort {
	out := make([]netip.AddrPort, len(svc.Upstreams))
	for i, u := range svc.Upstreams {
		out[i] = u.Addr
	}
	return out
}

type transparentRunner struct {
	*frontendRunner
	host   *transparentHost
	dialer *proxy.TransparentDialer

	mu    sync.Mutex
	claim *tpClaim
}

func (r *transparentRunner) Start(ctx context.Context) error {
	// Before anything is set up: without the capability nothing would work.
	if err := proxy.CheckTransparent(upstreamAddrs(r.svc)); err != nil {
		return err
	}
	c, err := r.host.acquire(r.svc)
	if err != nil {
		return err
	}
	if err := r.frontendRunner.Start(ctx); err != nil {
		return errors.Join(err, r.host.release(c))
	}
	r.mu.Lock()
	r.claim = c
	r.mu.Unlock()
	return nil
}

func (r *transparentRunner) Update(svc config.Service) error {
	if err := proxy.CheckTransparent(upstreamAddrs(svc)); err != nil {
		return err
	}
	c, err := r.host.acquire(svc)
	if err != nil {
		return err
	}
	r.dialer.SetUpstreams(append(upstreamAddrs(r.svc), upstreamAddrs(svc)...))
	if err := r.frontendRunner.Update(svc); err != nil {
		r.dialer.SetUpstreams(upstreamAddrs(r.svc))
		return errors.Join(err, r.host.release(c))
	}
	r.dialer.SetUpstreams(upstreamAddrs(svc))
	r.mu.Lock()
	old := r.claim
	r.claim = c
	r.mu.Unlock()
	return r.host.release(old)
}

func (r *transparentRunner) Stop(ctx context.Context) error {
	err := r.frontendRunner.Stop(ctx)
	r.mu.Lock()
	c := r.claim
	r.claim = nil
	r.mu.Unlock()
	return errors.Join(err, r.host.release(c))
}
