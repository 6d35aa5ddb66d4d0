package netconf

// Policy routing for transparent mode: replies of the upstreams are
// addressed to the client, not to the load balancer; the steer program
// marks them, and the rule `fwmark MARK lookup TABLE` with the route
// `local default dev lo table TABLE` delivers them locally, where the
// transparent socket bound to the client's address takes them.

import (
	"errors"
	"fmt"
	"net"
	"net/netip"
	"slices"
	"strconv"

	"github.com/vishvananda/netlink"
	"golang.org/x/sys/unix"
)

// ErrPolicyConflict: the mark or the table is already used by something
// that is not lbctl's rule and route.
var ErrPolicyConflict = errors.New("policy routing conflict")

// RouteProtocol tags the rules and routes lbctl adds (their `proto`), so
// that a later `lbctl detach` can tell them from identical ones an operator
// added by hand.
const RouteProtocol = 76

// Policy names the mark and table of transparent mode's policy routing.
type Policy struct {
	Mark  uint32
	Table int
	// IPv4, IPv6 select the families to install (both false: both).
	IPv4, IPv6 bool

	// prev is the policy InstallNext installs next to: its own rule is no
	// conflict.
	prev *Policy
}

func (p Policy) families() []int {
	if !p.IPv4 && !p.IPv6 {
		return []int{netlink.FAMILY_V4, netlink.FAMILY_V6}
	}
	var out []int
	if p.IPv4 {
		out = append(out, netlink.FAMILY_V4)
	}
	if p.IPv6 {
		out = append(out, netlink.FAMILY_V6)
	}
	return out
}

// PolicyRouting is what InstallPolicy added: exactly that is removed by
// Remove. A rule or route that was already there (identical) is used, not
// added, and stays after Remove.
type PolicyRouting struct {
	policy Policy
	rules  []netlink.Rule
	routes []netlink.Route
	// Present lists, as `ip` would print them, what was already there.
	Present []string
	// Added lists what InstallPolicy added.
	Added []string
}

func ipFam(fam int) string {
	if fam == netlink.FAMILY_V6 {
		return "ip -6"
	}
	return "ip"
}

func anyNet(fam int) *net.IPNet {
	if fam == netlink.FAMILY_V6 {
		return &net.IPNet{IP: net.IPv6zero, Mask: net.CIDRMask(0, 128)}
	}
	return &net.IPNet{IP: net.IPv4zero.To4(), Mask: net.CIDRMask(0, 32)}
}

func ruleMask(r netlink.Rule) uint32 {
	if r.Mask == nil {
		return 0xffffffff
	}
	return *r.Mask
}

func ruleString(fam int, r netlink.Rule) string {
	s := ipFam(fam) + " rule"
	if r.Priority >= 0 {
		s += fmt.Sprintf(" priority %d", r.Priority)
	}
	if r.Mark != 0 || r.Mask != nil {
		s += fmt.Sprintf(" fwmark %#x", r.Mark)
		if m := ruleMask(r); m != 0xffffffff {
			s += fmt.Sprintf("/%#x", m)
		}
	}
	if r.Src != nil {
		s += " from " + r.Src.String()
	}
	if r.Dst != nil {
		s += " to " + r.Dst.String()
	}
	return s + fmt.Sprintf(" lookup %d", r.Table)
}

func routeString(fam int, table int) string {
	return fmt.Sprintf("%s route local %s dev lo table %d", ipFam(fam), anyNet(fam), table)
}

// isOurRule: a plain `fwmark MARK lookup TABLE` rule (nothing else matched).
func isOurRule(r netlink.Rule, p Policy) bool {
	return r.Mark == p.Mark && ruleMask(r) == 0xffffffff && r.Table == p.Table &&
		r.Src == nil && r.Dst == nil && r.IifName == "" && r.OifName == "" && !r.Invert &&
		r.Goto <= 0 && r.Dport == nil && r.Sport == nil && r.IPProto <= 0 && r.UIDRange == nil
}

// InstallPolicy adds the rule `fwmark MARK lookup TABLE` and the route
// `local default dev lo table TABLE` for each family of p, after checking
// that no other rule uses the mark or the table and that the table holds
// nothing else. On error nothing stays installed.
func InstallPolicy(p Policy) (*PolicyRouting, error) {
	if p.Mark == 0 {
		return nil, fmt.Errorf("install policy routing: mark 0 matches every unmarked packet: choose another transparent.mark")
	}
	if p.Table <= 0 || p.Table == unix.RT_TABLE_MAIN || p.Table == unix.RT_TABLE_LOCAL || p.Table == unix.RT_TABLE_DEFAULT {
		return nil, fmt.Errorf("install policy routing: table %d is reserved (253 default, 254 main, 255 local) or invalid: choose another transparent.table", p.Table)
	}
	pr := &PolicyRouting{policy: p}
	pr.policy.prev = nil
	lo, err := netlink.LinkByName("lo")
	if err != nil {
		return nil, fmt.Errorf("install policy routing: find lo: %w", err)
	}
	for _, fam := range p.families() {
		haveRule, err := checkRules(fam, p)
		if err != nil {
			pr.Remove()
			return nil, err
		}
		haveRoute, err := checkTable(fam, p, lo.Attrs().Index)
		if err != nil {
			pr.Remove()
			return nil, err
		}
		route := netlink.Route{
			Family:    fam,
			Dst:       anyNet(fam),
			LinkIndex: lo.Attrs().Index,
			Table:     p.Table,
			Type:      unix.RTN_LOCAL,
			Scope:     netlink.SCOPE_HOST,
			Protocol:  RouteProtocol,
		}
		if haveRoute {
			pr.Present = append(pr.Present, routeString(fam, p.Table))
		} else {
			if err := netlink.RouteAdd(&route); err != nil {
				pr.Remove()
				if errors.Is(err, unix.ENETDOWN) {
					err = fmt.Errorf("%w: lo is down (ip link set lo up)", err)
				}
				return nil, fmt.Errorf("install policy routing: add %s: %w", routeString(fam, p.Table), privHint(err))
			}
			pr.routes = append(pr.routes, route)
			pr.Added = append(pr.Added, routeString(fam, p.Table))
		}
		if haveRule != nil {
			pr.Present = append(pr.Present, ruleString(fam, *haveRule))
			continue
		}
		rule := netlink.NewRule()
		rule.Family = fam
		rule.Mark = p.Mark
		rule.Table = p.Table
		rule.Protocol = RouteProtocol
		if err := netlink.RuleAdd(rule); err != nil {
			pr.Remove()
			return nil, fmt.Errorf("install policy routing: add %s: %w", ruleString(fam, *rule), privHint(err))
		}
		// Learn the priority the kernel chose, so Remove deletes this rule only.
		added, err := checkRules(fam, p)
		if err != nil || added == nil {
			pr.rules = append(pr.rules, *rule)
			pr.Remove()
			return nil, fmt.Errorf("install policy routing: rule %s vanished after adding it: %v", ruleString(fam, *rule), err)
		}
		pr.rules = append(pr.rules, *added)
		pr.Added = append(pr.Added, ruleString(fam, *added))
	}
	return pr, nil
}

// checkRules returns lbctl's rule if present, or an error if another
// rule uses the mark or the table.
func checkRules(fam int, p Policy) (*netlink.Rule, error) {
	rules, err := netlink.RuleList(fam)
	if err != nil {
		return nil, fmt.Errorf("install policy routing: list %s rules: %w", ipFam(fam), err)
	}
	var ours *netlink.Rule
	for i, r := range rules {
		switch {
		case isOurRule(r, p):
			if ours == nil {
				ours = &rules[i]
			}
		case p.prev != nil && isOurRule(r, *p.prev):
			// The policy being replaced (InstallNext): it goes once p is in.
		case r.Table == p.Table:
			return nil, fmt.Errorf("install policy routing: %w: table %d is used by `%s`: set transparent.table to an unused table, or remove that rule", ErrPolicyConflict, p.Table, ruleString(fam, r))
		case (r.Mark != 0 || r.Mask != nil) && r.Mark&ruleMask(r) == p.Mark&ruleMask(r):
			return nil, fmt.Errorf("install policy routing: %w: mark %#x is matched by `%s`: set transparent.mark to a mark no rule matches, or remove that rule", ErrPolicyConflict, p.Mark, ruleString(fam, r))
		}
	}
	return ours, nil
}

// checkTable reports whether the table holds exactly lbctl's local default
// route, and fails if it holds anything else.
func checkTable(fam int, p Policy, loIndex int) (bool, error) {
	rs, err := netlink.RouteListFiltered(fam, &netlink.Route{Table: p.Table}, netlink.RT_FILTER_TABLE)
	if err != nil {
		return false, fmt.Errorf("install policy routing: list %s routes of table %d: %w", ipFam(fam), p.Table, err)
	}
	have := false
	for _, r := range rs {
		if r.Type == unix.RTN_LOCAL && r.LinkIndex == loIndex && (r.Dst == nil || isDefault(r.Dst)) {
			have = true
			continue
		}
		return false, fmt.Errorf("install policy routing: %w: table %d already has the route `%s`: set transparent.table to an unused table", ErrPolicyConflict, p.Table, r)
	}
	return have, nil
}

// InstallNext installs p next to pr (a new transparent.mark or table on
// reload), for pr's families: pr's own rule is not a conflict, and a route
// both use is shared. pr stays untouched; once the marks are switched,
// pr.Retire(next) removes what pr added and next does not use. On error
// nothing of p stays.
func (pr *PolicyRouting) InstallNext(p Policy) (*PolicyRouting, error) {
	prev := pr.policy
	p.IPv4, p.IPv6 = prev.IPv4, prev.IPv6
	p.prev = &prev
	return InstallPolicy(p)
}

// Retire removes what pr added that next (from pr.InstallNext) does not
// use; what both use (the local route of a table they share) passes to
// next, to be removed by next.Remove.
func (pr *PolicyRouting) Retire(next *PolicyRouting) error {
	if pr == nil {
		return nil
	}
	shared := func(s string) {
		next.Added = append(next.Added, s)
		next.Present = slices.DeleteFunc(next.Present, func(p string) bool { return p == s })
	}
	pr.rules = slices.DeleteFunc(pr.rules, func(r netlink.Rule) bool {
		if !isOurRule(r, next.policy) {
			return false
		}
		next.rules = append(next.rules, r)
		shared(ruleString(r.Family, r))
		return true
	})
	pr.routes = slices.DeleteFunc(pr.routes, func(r netlink.Route) bool {
		if r.Table != next.policy.Table {
			return false
		}
		next.routes = append(next.routes, r)
		shared(routeString(r.Family, r.Table))
		return true
	})
	return pr.Remove()
}

// Remove deletes exactly the rules and routes InstallPolicy added. It is
// safe to call twice.
func (pr *PolicyRouting) Remove() error {
	if pr == nil {
		return nil
	}
	var errs []error
	for i := len(pr.rules) - 1; i >= 0; i-- {
		r := pr.rules[i]
		if err := netlink.RuleDel(&r); err != nil && !errors.Is(err, unix.ENOENT) {
			errs = append(errs, fmt.Errorf("remove %s: %w", ruleString(r.Family, r), err))
		}
	}
	pr.rules = nil
	for i := len(pr.routes) - 1; i >= 0; i-- {
		r := pr.routes[i]
		if err := netlink.RouteDel(&r); err != nil && !errors.Is(err, unix.ESRCH) {
			errs = append(errs, fmt.Errorf("remove %s: %w", routeString(r.Family, r.Table), err))
		}
	}
	pr.routes = nil
	return errors.Join(errs...)
}

// RemoveTaggedPolicy removes the rules `fwmark MARK lookup TABLE` and the
// local default routes of TABLE that carry lbctl's RouteProtocol (added by
// `lbctl attach --steer`, which outlives its process), for both families,
// and returns what it removed. Identical rules an operator added stay.
func RemoveTaggedPolicy(p Policy) ([]string, error) {
	var done []string
	var errs []error
	lo, err := netlink.LinkByName("lo")
	if err != nil {
		return nil, fmt.Errorf("remove policy routing: find lo: %w", err)
	}
	for _, fam := range p.families() {
		rules, err := netlink.RuleList(fam)
		if err != nil {
			errs = append(errs, fmt.Errorf("remove policy routing: list rules: %w", err))
			continue
		}
		for _, r := range rules {
			if isOurRule(r, p) && r.Protocol == RouteProtocol {
				if err := netlink.RuleDel(&r); err != nil {
					errs = append(errs, fmt.Errorf("remove %s: %w", ruleString(fam, r), privHint(err)))
					continue
				}
				done = append(done, ruleString(fam, r))
			}
		}
		rs, err := netlink.RouteListFiltered(fam, &netlink.Route{Table: p.Table}, netlink.RT_FILTER_TABLE)
		if err != nil {
			errs = append(errs, fmt.Errorf("remove policy routing: list routes: %w", err))
			continue
		}
		for _, r := range rs {
			if r.Type == unix.RTN_LOCAL && r.LinkIndex == lo.Attrs().Index && int(r.Protocol) == RouteProtocol {
				if err := netlink.RouteDel(&r); err != nil {
					errs = append(errs, fmt.Errorf("remove %s: %w", routeString(fam, p.Table), privHint(err)))
					continue
				}
				done = append(done, routeString(fam, p.Table))
			}
		}
	}
	return done, errors.Join(errs...)
}

func privHint(err error) error {
	if errors.Is(err, unix.EPERM) || errors.Is(err, unix.EACCES) {
		return fmt.Errorf("%w (needs CAP_NET_ADMIN: run lbctl as root)", err)
	}
	return err
}

// UpstreamInterface returns the interface the kernel routes addr by: the
// one the upstream's replies arrive on when its default route is the LB.
func UpstreamInterface(addr netip.Addr) (string, error) {
	ifname, _, err := routeTo(addr)
	if err != nil {
		return "", fmt.Errorf("find the interface towards upstream %s: %w: set interface: in the service", addr, err)
	}
	return ifname, nil
}

// RPFilterChange is an rp_filter setting lbctl changed; Restore puts the
// old value back if nobody changed it since.
type RPFilterChange struct {
	Interface string
	Old, New  int
}

func sysctlInt(name string) (int, error) {
	s, err := Sysctl(name)
	if err != nil {
		return 0, err
	}
	return strconv.Atoi(s)
}

// PrepareRPFilter makes ifname's IPv4 reverse-path filter let steered
// replies through, changing conf.IFACE.rp_filter only:
//   - with src_valid_mark on (conf.all or conf.IFACE, as wg-quick sets it),
//     the reverse-path lookup carries the steer mark, finds the local
//     default route and drops every reply: rp_filter must be 0;
//   - strict (1) while one of the upstreams is routed out of another
//     interface (asymmetric paths): loose (2).
//
// Otherwise (strict with symmetric paths, loose, off) nothing changes and
// the result is nil. When conf.all.rp_filter forces a stricter value than
// needed (the effective value is the maximum of all and IFACE), the error
// names the fix; lbctl never changes conf.all.
func PrepareRPFilter(ifname string, upstreams []netip.Addr) (*RPFilterChange, error) {
	key := "net.ipv4.conf." + ifname + ".rp_filter"
	all, err := sysctlInt("net.ipv4.conf.all.rp_filter")
	if err != nil {
		return nil, err
	}
	one, err := sysctlInt(key)
	if err != nil {
		return nil, err
	}
	vmAll, _ := sysctlInt("net.ipv4.conf.all.src_valid_mark")
	vmOne, _ := sysctlInt("net.ipv4.conf." + ifname + ".src_valid_mark")
	want := max(all, one)
	if (vmAll != 0 || vmOne != 0) && want != 0 {
		want = 0
	} else if want == 1 {
		for _, u := range upstreams {
			if !u.Is4() {
				continue
			}
			if out, _, err := routeTo(u); err != nil || out != ifname {
				want = 2
				break
			}
		}
	}
	if want == max(all, one) {
		return nil, nil
	}
	if all > want {
		return nil, fmt.Errorf("rp_filter on %s: net.ipv4.conf.all.rp_filter = %d drops the upstreams' steered replies and lbctl does not change conf.all: sysctl -w net.ipv4.conf.all.rp_filter=%d", ifname, all, want)
	}
	if err := SetSysctl(key, strconv.Itoa(want)); err != nil {
		return nil, privHint(err)
	}
	return &RPFilterChange{Interface: ifname, Old: one, New: want}, nil
}

// Restore puts the old rp_filter back, unless someone changed it since.
func (c *RPFilterChange) Restore() error {
	if c == nil {
		return nil
	}
	key := "net.ipv4.conf." + c.Interface + ".rp_filter"
	cur, err := sysctlInt(key)
	if err != nil {
		if _, lerr := net.InterfaceByName(c.Interface); lerr != nil {
			return nil // the interface is gone, and its setting with it
		}
		return err
	}
	if cur != c.New {
		return nil
	}
	if err := SetSysctl(key, strconv.Itoa(c.Old)); err != nil {
		return fmt.Errorf("restore rp_filter on %s: %w", c.Interface, err)
	}
	return nil
}

// SourceTowards returns the address the kernel sends from towards addr
// (the LB's address an upstream's default route must point at).
func SourceTowards(addr netip.Addr) (netip.Addr, error) {
	rs, err := netlink.RouteGet(addr.AsSlice())
	if err != nil || len(rs) == 0 {
		return netip.Addr{}, fmt.Errorf("route to %s: %v", addr, err)
	}
	a, ok := netip.AddrFromSlice(rs[0].Src)
	if !ok {
		return netip.Addr{}, fmt.Errorf("route to %s has no source address", addr)
	}
	return a.Unmap(), nil
}
