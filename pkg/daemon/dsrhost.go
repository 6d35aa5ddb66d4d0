package daemon

import (
	"errors"
	"fmt"
	"net/netip"
	"slices"
	"sync"

	"go.uber.org/zap"

	"github.com/lbctl/lbctl/pkg/config"
	"github.com/lbctl/lbctl/pkg/dataplane"
	"github.com/lbctl/lbctl/pkg/netconf"
)

// netconfCls lets pkg/dataplane fall back to clsact + cls_bpf through
// pkg/netconf on kernels without tcx.
type netconfCls struct{}

func (netconfCls) AttachClsBPF(ifname string, progFD int, name string, egress bool) error {
	return netconf.AttachClsBPF(ifname, progFD, name, egress)
}

func (netconfCls) DetachClsBPF(ifname, name string, egress bool) error {
	return netconf.DetachClsBPF(ifname, name, egress)
}

// routerNAT is the host-wide set-up of router NAT, shared by the dsr
// services of one daemon and reference-counted, so that a reload (new
// service set up before the old one is released) or two services sharing
// an upstream never remove what another still needs:
//
//   - forwarding on (net.ipv4.ip_forward / net.ipv6.conf.all.forwarding),
//     the values found restored when the last service lets go;
//   - the snat program on the client-facing interfaces; detached at the
//     end only where lbctl run attached it and nothing else of lbctl is on
//     the interface;
//   - the snat rules upstream:port -> VIP:port (DSRRules); removed at the
//     end only if lbctl run added them (a rule found in place, e.g. added by
//     hand, stays).
//
// The dataplane is opened for each change and closed again: its flock
// must not keep lbctl stats or snat list waiting while the daemon runs.
type routerNAT struct {
	log   *zap.Logger
	bpffs string

	mu       sync.Mutex
	rules    map[ruleMatch]*ruleRef
	ifaces   map[string]*ifaceRef
	fwd      map[string]int // sysctl -> services using it
	restores map[string]func() error
}

type ruleMatch struct {
	src   string
	proto dataplane.Proto
	sport uint16
}

type ruleRef struct {
	rule  dataplane.SNATRule
	n     int
	owned bool // added by us: delete at the end
}

type ifaceRef struct {
	n     int
	owned bool // attached by us: detach at the end
}

func newRouterNAT(log *zap.Logger, bpffs string) *routerNAT {
	return &routerNAT{
		log: log, bpffs: bpffs,
		rules: map[ruleMatch]*ruleRef{}, ifaces: map[string]*ifaceRef{},
		fwd: map[string]int{}, restores: map[string]func() error{},
	}
}

func matchOf(r dataplane.SNATRule) ruleMatch {
	return ruleMatch{src: r.Src.String(), proto: r.Proto, sport: r.SPort}
}

func (n *routerNAT) open() (*dataplane.Dataplane, error) {
	dp, err := dataplane.Open(dataplane.Options{Root: n.bpffs, Log: n.log, ClsBPF: netconfCls{}})
	if err != nil {
		return nil, fmt.Errorf("router nat: %w", err)
	}
	return dp, nil
}

// natClaim is what one service holds of the host-wide set-up.
type natClaim struct {
	rules  []dataplane.SNATRule
	ifaces []string
	sysctl string
}

// acquire sets up router NAT for s and returns what s holds; on error
// nothing of s stays.
func (n *routerNAT) acquire(s config.Service) (*natClaim, error) {
	rules, err := DSRRules(s, netip.Prefix{})
	if err != nil {
		return nil, err
	}
	vip := s.Listen.Addr().Unmap()
	ifaces, err := netconf.ClientInterfaces(vip)
	if err != nil {
		return nil, fmt.Errorf("service %s: router nat: %w", s.Name, err)
	}
	n.mu.Lock()
	defer n.mu.Unlock()
	dp, err := n.open()
	if err != nil {
		return nil, err
	}
	defer dp.Close()
	c := &natClaim{sysctl: netconf.ForwardingSysctl(vip)}
	fail := func(err error) (*natClaim, error) {
		return nil, errors.Join(fmt.Errorf("service %s: router nat: %w", s.Name, err), n.releaseLocked(dp, c))
	}

	// Forwarding first: the upstreams' replies must be routed before
	// anything else matters.
	if n.fwd[c.sysctl] == 0 {
		restore, err := netconf.EnableForwarding(c.sysctl)
		if err != nil {
			c.sysctl = ""
			return fail(err)
		}
		n.restores[c.sysctl] = restore
	}
	n.fwd[c.sysctl]++

	have, err := dp.Attachments()
	if err != nil {
		return fail(err)
	}
	for _, ifname := range ifaces {
		ref := n.ifaces[ifname]
		if ref == nil {
			attached := slices.ContainsFunc(have, func(a dataplane.Attachment) bool {
				return a.Interface == ifname && a.Program == "snat"
			})
			if !attached {
				m, err := dp.AttachSNAT(ifname)
				if err != nil {
					return fail(err)
				}
				n.log.Info("attached snat", zap.String("interface", ifname), zap.String("method", string(m)))
			}
			ref = &ifaceRef{owned: !attached}
			n.ifaces[ifname] = ref
		}
		ref.n++
		c.ifaces = append(c.ifaces, ifname)
	}

	for _, r := range rules {
		ref := n.rules[matchOf(r)]
		switch {
		case ref == nil:
			added, err := EnsureSNAT(dp, r)
			if err != nil {
				return fail(err)
			}
			ref = &ruleRef{rule: r, owned: added}
			n.rules[matchOf(r)] = ref
			if added {
				n.log.Info("added snat rule", zap.Stringer("rule", r))
			} else {
				n.log.Info("snat rule already in place, kept at exit", zap.Stringer("rule", r))
			}
		case ref.rule != r:
			return fail(fmt.Errorf("snat rule %s conflicts with %s of another service: one upstream address and port cannot answer for two listen addresses", r, ref.rule))
		}
		ref.n++
		c.rules = append(c.rules, r)
	}
	return c, nil
}

// release undoes what c holds, where no other service holds it too.
func (n *routerNAT) release(c *natClaim) error {
	if c == nil {
		return nil
	}
	n.mu.Lock()
	defer n.mu.Unlock()
	dp, err := n.open()
	if err != nil {
		return err
	}
	defer dp.Close()
	return n.releaseLocked(dp, c)
}

func (n *routerNAT) releaseLocked(dp *dataplane.Dataplane, c *natClaim) error {
	var errs []error
	for _, r := range c.rules {
		ref := n.rules[matchOf(r)]
		if ref == nil {
			continue
		}
		if ref.n--; ref.n > 0 {
			continue
		}
		delete(n.rules, matchOf(r))
		if ref.owned {
			if err := dp.DelSNAT(r); err != nil && !errors.Is(err, dataplane.ErrRuleNotFound) {
				errs = append(errs, err)
			} else {
				n.log.Info("removed snat rule", zap.Stringer("rule", r))
			}
		}
	}
	c.rules = nil
	for _, ifname := range c.ifaces {
		ref := n.ifaces[ifname]
		if ref == nil {
			continue
		}
		if ref.n--; ref.n > 0 {
			continue
		}
		delete(n.ifaces, ifname)
		if ref.owned {
			errs = append(errs, n.detachSNAT(dp, ifname))
		}
	}
	c.ifaces = nil
	if c.sysctl != "" {
		if n.fwd[c.sysctl]--; n.fwd[c.sysctl] <= 0 {
			delete(n.fwd, c.sysctl)
			if restore := n.restores[c.sysctl]; restore != nil {
				errs = append(errs, restore())
				delete(n.restores, c.sysctl)
			}
		}
		c.sysctl = ""
	}
	return errors.Join(errs...)
}

// detachSNAT detaches snat from ifname if it is all lbctl has there
// (dataplane.Detach takes every program of the interface, and the maps with
// the last one) and no rule is left that lbctl run did not add. Otherwise
// snat stays: what is left was put there by someone else.
func (n *routerNAT) detachSNAT(dp *dataplane.Dataplane, ifname string) error {
	have, err := dp.Attachments()
	if err != nil {
		return err
	}
	left, err := dp.ListSNAT()
	if err != nil {
		return err
	}
	if len(left) > 0 {
		n.log.Info("snat stays attached: rules lbctl run did not add are in place", zap.String("interface", ifname), zap.Int("rules", len(left)))
		return nil
	}
	for _, a := range have {
		if a.Interface == ifname && a.Program != "snat" {
			n.log.Info("snat stays attached: another lbctl program is on the interface", zap.String("interface", ifname))
			return nil
		}
	}
	if _, err := dp.Detach(ifname); err != nil {
		return err
	}
	n.log.Info("detached snat", zap.String("interface", ifname))
	return nil
}
