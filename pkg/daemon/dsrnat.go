package daemon

import (
	"errors"
	"fmt"
	"net/netip"
	"slices"

	"github.com/lbctl/lbctl/pkg/config"
	"github.com/lbctl/lbctl/pkg/dataplane"
)

// DSRRules returns the snat rules that give the replies of service s the
// source s.Listen (VIP:port): for each upstream port, the upstream addresses
// in the fewest prefixes that cover exactly them (four upstreams
// 198.19.16.12-15 make one /30 rule; .11-.14 make .11/32, .12/31, .13... as
// few as alignment allows), protocol s.Protocol, source port = the
// upstream's port. A prefix never covers an address that is not an
// upstream, so no other host's traffic is rewritten.
//
// only, when valid, keeps the upstreams inside it (a backend's own address
// for origin NAT); it is an error if none is.
func DSRRules(s config.Service, only netip.Prefix) ([]dataplane.SNATRule, error) {
	if s.Mode != config.ModeDSR && s.Mode != config.ModeXDP {
		return nil, fmt.Errorf("service %s: mode %s has no direct server return, so no snat rule (want mode dsr or xdp)", s.Name, s.Mode)
	}
	proto, err := dataplane.ParseProto(string(s.Protocol))
	if err != nil {
		return nil, fmt.Errorf("service %s: %w", s.Name, err)
	}
	vip := s.Listen.Addr().Unmap()
	byPort := map[uint16][]netip.Addr{}
	for _, u := range s.Upstreams {
		a := u.Addr.Addr().Unmap()
		if only.IsValid() && !only.Contains(a) {
			continue
		}
		if a.Is4() != vip.Is4() {
			return nil, fmt.Errorf("service %s: upstream %s and listen address %s are of different families", s.Name, u.Addr, s.Listen)
		}
		byPort[u.Addr.Port()] = append(byPort[u.Addr.Port()], a)
	}
	if len(byPort) == 0 {
		return nil, fmt.Errorf("service %s has no upstream in %s: give the address of this backend, one of the service's upstreams", s.Name, only)
	}
	ports := make([]uint16, 0, len(byPort))
	for p := range byPort {
		ports = append(ports, p)
	}
	slices.Sort(ports)
	var rules []dataplane.SNATRule
	for _, p := range ports {
		for _, pfx := range coverExactly(byPort[p]) {
			rules = append(rules, dataplane.SNATRule{Src: pfx, Proto: proto, SPort: p, To: vip, ToPort: s.Listen.Port()})
		}
	}
	return rules, nil
}

// coverExactly returns the fewest prefixes whose union is exactly addrs
// (all of one family): runs of consecutive addresses split into aligned
// blocks, largest first.
func coverExactly(addrs []netip.Addr) []netip.Prefix {
	as := slices.Clone(addrs)
	slices.SortFunc(as, netip.Addr.Compare)
	as = slices.Compact(as)
	var out []netip.Prefix
	for i := 0; i < len(as); {
		j := i // as[i..j] is a run of consecutive addresses
		for j+1 < len(as) && as[j].Next() == as[j+1] {
			j++
		}
		lo, hi := as[i], as[j]
		for {
			bits := lo.BitLen()
			// Grow the block while it stays aligned on lo and inside the run.
			for bits > 0 {
				p := netip.PrefixFrom(lo, bits-1)
				if p.Masked().Addr() != lo || lastAddr(p).Compare(hi) > 0 {
					break
				}
				bits--
			}
			p := netip.PrefixFrom(lo, bits)
			out = append(out, p)
			last := lastAddr(p)
			if last == hi {
				break
			}
			lo = last.Next()
		}
		i = j + 1
	}
	return out
}

// lastAddr is the highest address of p.
func lastAddr(p netip.Prefix) netip.Addr {
	b := p.Masked().Addr().AsSlice()
	for i := p.Bits(); i < len(b)*8; i++ {
		b[i/8] |= 0x80 >> (i % 8)
	}
	a, _ := netip.AddrFromSlice(b)
	return a
}

// ServiceByName returns the service called name.
func ServiceByName(cfg *config.Config, name string) (config.Service, error) {
	var names []string
	for _, s := range cfg.Services {
		if s.Name == name {
			return s, nil
		}
		names = append(names, s.Name)
	}
	return config.Service{}, fmt.Errorf("%s has no service %q (it has: %v)", cfg.File, name, names)
}

// OriginNATRules returns the snat rules one backend needs for service
// name of cfg under origin NAT (`lbctl snat add --vip-from`): DSRRules
// limited to src when it is valid. A service with router NAT is refused:
// its replies are rewritten on the load balancer.
func OriginNATRules(cfg *config.Config, name string, src netip.Prefix) ([]dataplane.SNATRule, error) {
	s, err := ServiceByName(cfg, name)
	if err != nil {
		return nil, err
	}
	if s.Mode == config.ModeDSR || s.Mode == config.ModeXDP {
		if s.DSR.NAT != "origin" {
			return nil, fmt.Errorf("service %s uses nat: %s: the load balancer rewrites its replies; set dsr: {nat: origin} in %s to rewrite them on each backend", s.Name, s.DSR.NAT, cfg.File)
		}
	}
	return DSRRules(s, src)
}

// EnsureSNAT adds rule unless a rule with the same match and target is
// there already (added false). A rule with the same match and another
// target is an error naming both.
func EnsureSNAT(dp *dataplane.Dataplane, rule dataplane.SNATRule) (added bool, err error) {
	err = dp.AddSNAT(rule)
	if err == nil {
		return true, nil
	}
	if !errors.Is(err, dataplane.ErrRuleExists) {
		return false, err
	}
	rules, lerr := dp.ListSNAT()
	if lerr != nil {
		return false, errors.Join(err, lerr)
	}
	for _, r := range rules {
		if r.Src == rule.Src && r.Proto == rule.Proto && r.SPort == rule.SPort {
			if r.To == rule.To && r.ToPort == rule.ToPort {
				return false, nil
			}
			return false, fmt.Errorf("add snat rule %s: %w with another target (%s): remove it with lbctl snat del --src %s --proto %s%s", rule, dataplane.ErrRuleExists, r, r.Src, r.Proto, sportFlag(r.SPort))
		}
	}
	return false, err
}

func sportFlag(p uint16) string {
	if p == 0 {
		return ""
	}
	return fmt.Sprintf(" --sport %d", p)
}
