package netconf

import (
	"context"
	"errors"
	"fmt"
	"net"
	"net/netip"
	"os"
	"sort"
	"strconv"
	"strings"
	"syscall"
	"time"

	"github.com/vishvananda/netlink"
	"golang.org/x/net/icmp"
	"golang.org/x/net/ipv4"
	"golang.org/x/net/ipv6"
	"golang.org/x/sys/unix"
)

// Status is the verdict of one doctor check.
type Status string

const (
	Pass Status = "PASS"
	Warn Status = "WARN" // suspicious or not checkable; does not fail the run
	Fail Status = "FAIL"
)

// Check is one line of lbctl doctor: what was checked, the verdict, what
// was found and, unless it passed, the command that fixes it.
type Check struct {
	Name   string `json:"name"`
	Status Status `json:"status"`
	Detail string `json:"detail"`
	Fix    string `json:"fix,omitempty"`
}

// Failed reports whether any check failed.
func Failed(cs []Check) bool {
	for _, c := range cs {
		if c.Status == Fail {
			return true
		}
	}
	return false
}

// Service is what the doctor needs of one configured service (the caller
// translates the config: this package imports no other of lbctl's).
type Service struct {
	Name      string
	Mode      string // proxy | transparent | dsr | xdp
	Protocol  string // tcp | udp
	Listen    netip.AddrPort
	Upstreams []netip.AddrPort
	NAT       string // dsr/xdp: router | origin
	Interface string // upstream-facing interface; "" = from the route
	// Query, for a UDP service, sends one request its upstreams answer
	// (the caller builds it from the service's dns or udp health check) to up
	// through d and checks the answer: the return-path probe. nil: the
	// return path is not probed, and NoQuery says why and what to
	// configure to get it.
	Query   func(ctx context.Context, d Dialer, up netip.AddrPort) error
	NoQuery string
}

// Dialer opens a probe's socket (pkg/health's checks take one).
type Dialer interface {
	DialContext(ctx context.Context, network, address string) (net.Conn, error)
}

// Attached is one program lbctl attached (as pinned under <bpffs>/lbctl).
type Attached struct {
	Interface string
	Program   string
}

// SNATRule is one rule of the snat program, for the origin-NAT check.
type SNATRule struct {
	Src    netip.Prefix
	Proto  string
	SPort  uint16 // 0: any
	To     netip.Addr
	ToPort uint16 // 0: keep
}

// BPFState is the BPF side the doctor inspects; pkg/dataplane provides it
// through the caller (this package does not import cilium/ebpf).
type BPFState interface {
	// Features probes the kernel: nil means supported.
	Features() (tcx, xdp error)
	// Programs lists the programs this lbctl build can attach (snat, ...).
	Programs() []string
	// Attached lists what is attached; no pinned state is no attachment.
	Attached() ([]Attached, error)
	// SNATRules lists the snat rules; no pinned state is no rule.
	SNATRules() ([]SNATRule, error)
	// SteerPackets returns the replies steer marked from upstream (of
	// protocol tcp or udp), and whether steer knows the upstream at all.
	SteerPackets(proto string, upstream netip.AddrPort) (n uint64, steered bool, err error)
}

// DoctorOptions says what to check.
type DoctorOptions struct {
	// BPFFS is the bpffs root lbctl pins under (--bpffs).
	BPFFS string
	// Services of the config; none: only the host-wide checks run.
	Services []Service
	// Mark and Table of transparent mode's policy routing.
	Mark  uint32
	Table int
	// Upstream: the doctor runs on a backend (lbctl doctor --upstream).
	Upstream bool
	// LB is the load balancer's address on the backend network (--lb);
	// with Upstream, the default route must point at it.
	LB netip.Addr
	// Clients are the client networks (--client); default: the prefixes
	// on the interface that holds the listen address.
	Clients []netip.Prefix
	// BPF is the pinned state and the kernel's features; nil skips them.
	BPF BPFState
	// Timeout bounds each reachability probe; default 1s.
	Timeout time.Duration
}

// Doctor runs every check that applies and returns them in order. It does
// all its work on the calling goroutine (no goroutines): a caller that
// moved its thread into a network namespace checks that namespace.
func Doctor(ctx context.Context, o DoctorOptions) []Check {
	if o.Timeout == 0 {
		o.Timeout = time.Second
	}
	d := &doctor{o: o}
	d.privileges()
	if o.Upstream {
		d.upstreamChecks(ctx)
		return d.out
	}
	d.bpffs()
	d.kernel()
	d.attached()
	d.policyRouting()
	d.forwarding()
	d.subnets()
	d.rpFilterLB()
	d.reachable(ctx)
	d.returnPath(ctx)
	return d.out
}

type doctor struct {
	o   DoctorOptions
	out []Check
}

func (d *doctor) add(name string, st Status, fix, format string, args ...any) {
	c := Check{Name: name, Status: st, Detail: fmt.Sprintf(format, args...)}
	if st != Pass {
		c.Fix = fix
	}
	d.out = append(d.out, c)
}

func (d *doctor) has(modes ...string) bool {
	for _, s := range d.o.Services {
		for _, m := range modes {
			if s.Mode == m {
				return true
			}
		}
	}
	return false
}

// routerNAT: the LB routes the upstreams' replies (dsr or xdp, nat router).
func routerNAT(s Service) bool { return (s.Mode == "dsr" || s.Mode == "xdp") && s.NAT != "origin" }

// --- privileges -----------------------------------------------------------

// The capabilities lbctl uses: load and attach programs, configure the
// network, and open transparent/raw sockets.
var neededCaps = []struct {
	bit  int
	name string
}{
	{unix.CAP_NET_ADMIN, "CAP_NET_ADMIN"},
	{unix.CAP_NET_RAW, "CAP_NET_RAW"},
	{unix.CAP_BPF, "CAP_BPF"},
}

// EffectiveCaps reads this thread's effective capability set.
func EffectiveCaps() (uint64, error) {
	b, err := os.ReadFile("/proc/thread-self/status")
	if err != nil {
		if b, err = os.ReadFile("/proc/self/status"); err != nil {
			return 0, fmt.Errorf("read capabilities: %w", err)
		}
	}
	for _, l := range strings.Split(string(b), "\n") {
		if v, ok := strings.CutPrefix(l, "CapEff:"); ok {
			caps, err := strconv.ParseUint(strings.TrimSpace(v), 16, 64)
			if err != nil {
				return 0, fmt.Errorf("parse CapEff %q: %w", v, err)
			}
			return caps, nil
		}
	}
	return 0, errors.New("read capabilities: no CapEff line in /proc/self/status")
}

func (d *doctor) privileges() {
	caps, err := EffectiveCaps()
	if err != nil {
		d.add("privileges", Fail, "run lbctl as root", "%v", err)
		return
	}
	var missing, have []string
	for _, c := range neededCaps {
		if caps&(1<<uint(c.bit)) == 0 {
			missing = append(missing, c.name)
		} else {
			have = append(have, c.name)
		}
	}
	if len(missing) == 0 {
		d.add("privileges", Pass, "", "effective: %s", strings.Join(have, ", "))
		return
	}
	var adds []string
	for _, m := range missing {
		adds = append(adds, "--cap-add "+strings.TrimPrefix(m, "CAP_"))
	}
	d.add("privileges", Fail,
		fmt.Sprintf("run lbctl as root (in a container: podman run %s ...)", strings.Join(adds, " ")),
		"missing %s", strings.Join(missing, ", "))
}

// --- bpffs and kernel -----------------------------------------------------

func (d *doctor) bpffs() {
	root := d.o.BPFFS
	var st unix.Statfs_t
	err := unix.Statfs(root, &st)
	switch {
	case err != nil:
		d.add("bpffs", Fail, fmt.Sprintf("mkdir -p %s && mount -t bpf bpffs %s", root, root), "%s: %v", root, err)
	case st.Type != unix.BPF_FS_MAGIC:
		d.add("bpffs", Fail, fmt.Sprintf("mount -t bpf bpffs %s (or pass --bpffs DIR naming a mounted bpffs)", root), "%s is not a bpffs", root)
	default:
		d.add("bpffs", Pass, "", "%s is a bpffs", root)
	}
}

func (d *doctor) kernel() {
	if d.o.BPF == nil {
		return
	}
	tcx, xdp := d.o.BPF.Features()
	if tcx == nil {
		d.add("kernel tcx", Pass, "", "tcx links supported")
	} else {
		d.add("kernel tcx", Warn, "upgrade to Linux 6.6+ for tcx", "%v: lbctl falls back to clsact + cls_bpf", tcx)
	}
	switch {
	case xdp == nil:
		d.add("kernel xdp", Pass, "", "XDP links supported")
	case d.has("xdp"):
		d.add("kernel xdp", Fail, "upgrade to Linux 5.9+ or use mode dsr", "%v: mode xdp cannot run", xdp)
	default:
		d.add("kernel xdp", Warn, "upgrade to Linux 5.9+ before using mode xdp", "%v", xdp)
	}
}

// --- programs attached ----------------------------------------------------

type need struct {
	program, iface, why string
}

// needs lists the programs the services need and where.
func (d *doctor) needs() []need {
	var out []need
	seen := map[string]bool{}
	addNeed := func(n need) {
		if n.iface == "" || seen[n.program+"/"+n.iface] {
			return
		}
		seen[n.program+"/"+n.iface] = true
		out = append(out, n)
	}
	for _, s := range d.o.Services {
		client := d.clientIface(s)
		switch s.Mode {
		case "transparent":
			for _, u := range s.Upstreams {
				addNeed(need{"steer", d.upstreamIface(s, u.Addr()), "replies of transparent service " + s.Name + " arrive there"})
			}
		case "xdp":
			addNeed(need{"xdp_lb", client, "service " + s.Name + " balances there"})
		}
		if routerNAT(s) {
			addNeed(need{"snat", client, "replies of service " + s.Name + " (router NAT) leave there"})
		}
	}
	return out
}

func (d *doctor) attached() {
	ns := d.needs()
	if len(ns) == 0 || d.o.BPF == nil {
		return
	}
	known := map[string]bool{}
	for _, p := range d.o.BPF.Programs() {
		known[p] = true
	}
	att, err := d.o.BPF.Attached()
	if err != nil {
		d.add("attached", Fail, "run lbctl doctor as root", "read pinned state under %s/lbctl: %v", d.o.BPFFS, err)
		return
	}
	have := map[string]bool{}
	for _, a := range att {
		have[a.Program+"/"+a.Interface] = true
	}
	for _, n := range ns {
		name := "attached " + n.program + " " + n.iface
		switch {
		case !known[n.program]:
			d.add(name, Warn, "upgrade lbctl", "this lbctl build has no %s program (%s)", n.program, n.why)
		case have[n.program+"/"+n.iface]:
			d.add(name, Pass, "", "%s attached to %s (%s)", n.program, n.iface, n.why)
		default:
			d.add(name, Fail, d.attachFix(n), "%s not attached to %s (%s)", n.program, n.iface, n.why)
		}
	}
}

func (d *doctor) attachFix(n need) string {
	flag := ""
	switch n.program {
	case "steer":
		flag = " --steer"
	case "xdp_lb":
		flag = " --xdp"
	}
	return fmt.Sprintf("lbctl --bpffs %s attach %s%s (lbctl run attaches it too)", d.o.BPFFS, n.iface, flag)
}

// --- transparent: policy routing ------------------------------------------

func (d *doctor) policyRouting() {
	fams := map[int]bool{}
	for _, s := range d.o.Services {
		if s.Mode != "transparent" {
			continue
		}
		for _, u := range s.Upstreams {
			fams[familyOf(u.Addr())] = true
		}
	}
	for _, fam := range []int{netlink.FAMILY_V4, netlink.FAMILY_V6} {
		if !fams[fam] {
			continue
		}
		ipcmd, fname, any := "ip", "ipv4", "0.0.0.0/0"
		if fam == netlink.FAMILY_V6 {
			ipcmd, fname, any = "ip -6", "ipv6", "::/0"
		}
		rules, err := netlink.RuleList(fam)
		ruleFix := fmt.Sprintf("%s rule add fwmark %#x lookup %d (lbctl run adds it)", ipcmd, d.o.Mark, d.o.Table)
		found := false
		for _, r := range rules {
			if r.Mark == d.o.Mark && r.Table == d.o.Table {
				found = true
			}
		}
		switch {
		case err != nil:
			d.add("policy rule "+fname, Fail, ruleFix, "list rules: %v", err)
		case found:
			d.add("policy rule "+fname, Pass, "", "fwmark %#x lookup %d", d.o.Mark, d.o.Table)
		default:
			d.add("policy rule "+fname, Fail, ruleFix, "no rule fwmark %#x lookup %d: replies to transparent connections are routed away instead of to the local socket", d.o.Mark, d.o.Table)
		}
		routes, err := netlink.RouteListFiltered(fam, &netlink.Route{Table: d.o.Table}, netlink.RT_FILTER_TABLE)
		routeFix := fmt.Sprintf("%s route add local %s dev lo table %d (lbctl run adds it)", ipcmd, any, d.o.Table)
		found = false
		for _, r := range routes {
			if r.Type == unix.RTN_LOCAL && (r.Dst == nil || isDefault(r.Dst)) {
				found = true
			}
		}
		switch {
		case err != nil:
			d.add("local route "+fname, Fail, routeFix, "list table %d: %v", d.o.Table, err)
		case found:
			d.add("local route "+fname, Pass, "", "local %s dev lo table %d", any, d.o.Table)
		default:
			d.add("local route "+fname, Fail, routeFix, "table %d has no local default route: marked replies find no local socket", d.o.Table)
		}
	}
}

func isDefault(n *net.IPNet) bool {
	ones, _ := n.Mask.Size()
	return ones == 0
}

// --- forwarding ------------------------------------------------------------

func (d *doctor) forwarding() {
	fams := map[int]bool{}
	var names []string
	for _, s := range d.o.Services {
		if routerNAT(s) {
			fams[familyOf(s.Listen.Addr())] = true
			names = append(names, s.Name)
		}
	}
	for _, f := range []struct {
		fam          int
		name, sysctl string
	}{
		{netlink.FAMILY_V4, "forwarding ipv4", "net.ipv4.ip_forward"},
		{netlink.FAMILY_V6, "forwarding ipv6", "net.ipv6.conf.all.forwarding"},
	} {
		if !fams[f.fam] {
			continue
		}
		v, err := Sysctl(f.sysctl)
		fix := fmt.Sprintf("sysctl -w %s=1", f.sysctl)
		switch {
		case err != nil:
			d.add(f.name, Fail, fix, "%v", err)
		case v == "1":
			d.add(f.name, Pass, "", "%s = 1 (router NAT: %s)", f.sysctl, strings.Join(names, ", "))
		default:
			d.add(f.name, Fail, fix, "%s = %s: the LB does not route the upstreams' replies of %s (router NAT)", f.sysctl, v, strings.Join(names, ", "))
		}
	}
}

// Sysctl reads a sysctl of the calling thread's network namespace, named
// with dots (net.ipv4.ip_forward).
func Sysctl(name string) (string, error) {
	b, err := os.ReadFile("/proc/sys/" + strings.ReplaceAll(name, ".", "/"))
	if err != nil {
		return "", fmt.Errorf("read sysctl %s: %w", name, err)
	}
	return strings.TrimSpace(string(b)), nil
}

// --- subnets ---------------------------------------------------------------

func (d *doctor) subnets() {
	for _, s := range d.o.Services {
		if s.Mode == "proxy" || (s.Mode != "transparent" && !routerNAT(s)) {
			continue // the proxy is a full proxy; origin NAT replies bypass the LB anyway
		}
		clients, cif := d.clientPrefixes(s)
		var bad []string
		for _, u := range s.Upstreams {
			up, uif, connected := connectedPrefix(u.Addr())
			if !connected {
				up = netip.PrefixFrom(u.Addr(), u.Addr().BitLen())
			}
			for _, c := range clients {
				switch {
				case c.Overlaps(up):
					bad = append(bad, fmt.Sprintf("client network %s overlaps upstream %s (%s)", c, u.Addr(), up))
				case connected && len(d.o.Clients) > 0 && uif != "" && uif == cif:
					bad = append(bad, fmt.Sprintf("client network %s and upstream %s are both directly connected on %s", c, u.Addr(), uif))
				}
			}
		}
		name := "subnets " + s.Name
		if len(bad) > 0 {
			sort.Strings(bad)
			d.add(name, Fail, "renumber so that clients and upstreams are on separate, routed networks (the upstreams' replies must reach the clients through the LB)", "%s", strings.Join(dedupe(bad), "; "))
			continue
		}
		d.add(name, Pass, "", "clients %s and upstreams are on separate networks", joinPrefixes(clients))
	}
}

// clientPrefixes returns the client networks of s: --client, and the
// prefixes on the interface holding the listen address (clients may sit
// on the VIP's network).
func (d *doctor) clientPrefixes(s Service) ([]netip.Prefix, string) {
	cif := d.clientIface(s)
	out := append([]netip.Prefix(nil), d.o.Clients...)
	if cif == "" {
		return out, ""
	}
	l, err := netlink.LinkByName(cif)
	if err != nil {
		return nil, cif
	}
	addrs, _ := netlink.AddrList(l, netlink.FAMILY_ALL)
	for _, a := range addrs {
		if p, ok := prefixOf(a.IPNet); ok && p.Addr().IsGlobalUnicast() {
			out = append(out, p.Masked())
		}
	}
	return out, cif
}

func joinPrefixes(ps []netip.Prefix) string {
	var s []string
	for _, p := range ps {
		s = append(s, p.String())
	}
	if len(s) == 0 {
		return "(none found)"
	}
	return strings.Join(s, ", ")
}

func dedupe(s []string) []string {
	var out []string
	for i, v := range s {
		if i == 0 || v != s[i-1] {
			out = append(out, v)
		}
	}
	return out
}

// --- rp_filter -------------------------------------------------------------

// rpFilter returns the effective IPv4 rp_filter of ifname: the maximum of
// conf.all and conf.IFACE (0 off, 1 strict, 2 loose).
func rpFilter(ifname string) (int, error) {
	all, err := Sysctl("net.ipv4.conf.all.rp_filter")
	if err != nil {
		return 0, err
	}
	one, err := Sysctl("net.ipv4.conf." + ifname + ".rp_filter")
	if err != nil {
		return 0, err
	}
	a, _ := strconv.Atoi(all)
	b, _ := strconv.Atoi(one)
	return max(a, b), nil
}

func rpFix(ifname string) string {
	return fmt.Sprintf("sysctl -w net.ipv4.conf.%s.rp_filter=2 net.ipv4.conf.all.rp_filter=2 (loose; or 0)", ifname)
}

// rpCheck checks that ifname, receiving packets from sources, passes them:
// strict rp_filter drops a packet whose source is routed out of another
// interface.
func (d *doctor) rpCheck(ifname string, sources []netip.Addr, what string, steered bool) {
	name := "rp_filter " + ifname
	v, err := rpFilter(ifname)
	if err != nil {
		d.add(name, Warn, "", "%v", err)
		return
	}
	vmAll, _ := Sysctl("net.ipv4.conf.all.src_valid_mark")
	vmOne, _ := Sysctl("net.ipv4.conf." + ifname + ".src_valid_mark")
	if steered && v != 0 && (vmAll == "1" || vmOne == "1") {
		d.add(name, Fail, fmt.Sprintf("sysctl -w net.ipv4.conf.%s.rp_filter=0 net.ipv4.conf.all.rp_filter=0 (lbctl run sets conf.%s itself)", ifname, ifname),
			"%s with src_valid_mark on: the reverse-path lookup carries steer's mark, finds the local route and drops every steered reply", rpName(v))
		return
	}
	if v != 1 {
		d.add(name, Pass, "", "%s (%s)", rpName(v), what)
		return
	}
	for _, src := range sources {
		if !src.Is4() {
			continue
		}
		var out string
		var err error
		if src.IsUnspecified() { // clients anywhere: the default route is their path
			out, _, err = defaultRoute(netlink.FAMILY_V4)
		} else {
			out, _, err = routeTo(src)
		}
		if err != nil || out != ifname {
			via := out
			if err != nil {
				via = "no route"
			}
			d.add(name, Fail, rpFix(ifname), "strict, but %s arrives on %s from %s, which is routed out of %s: the kernel drops it", what, ifname, src, via)
			return
		}
	}
	d.add(name, Pass, "", "strict, and the reverse path of %s is %s itself", what, ifname)
}

func rpName(v int) string {
	switch v {
	case 0:
		return "off"
	case 1:
		return "strict"
	case 2:
		return "loose"
	}
	return strconv.Itoa(v)
}

func (d *doctor) rpFilterLB() {
	type iface struct {
		sources []netip.Addr
		what    []string
		steered bool // transparent replies arrive here
	}
	ifs := map[string]*iface{}
	var order []string
	addSrc := func(name string, src netip.Addr, what string) {
		if name == "" {
			return
		}
		i := ifs[name]
		if i == nil {
			i = &iface{}
			ifs[name] = i
			order = append(order, name)
		}
		i.sources = append(i.sources, src)
		if len(i.what) == 0 || i.what[len(i.what)-1] != what {
			i.what = append(i.what, what)
		}
	}
	for _, s := range d.o.Services {
		if s.Mode == "proxy" {
			continue
		}
		clients, cif := d.clientPrefixes(s)
		if len(d.o.Clients) == 0 {
			clients = nil // the client interface's own prefixes say nothing of remote clients
			if s.Listen.Addr().Is4() {
				clients = []netip.Prefix{netip.MustParsePrefix("0.0.0.0/0")}
			}
		}
		for _, c := range clients {
			addSrc(cif, c.Addr(), "client traffic")
		}
		for _, u := range s.Upstreams {
			ifname := d.upstreamIface(s, u.Addr())
			addSrc(ifname, u.Addr(), "upstream traffic")
			if i := ifs[ifname]; i != nil && s.Mode == "transparent" {
				i.steered = true
			}
		}
	}
	for _, name := range order {
		d.rpCheck(name, ifs[name].sources, strings.Join(ifs[name].what, " and "), ifs[name].steered)
	}
}

// --- reachability ------------------------------------------------------------

func (d *doctor) reachable(ctx context.Context) {
	seen := map[string]bool{}
	for _, s := range d.o.Services {
		for _, u := range s.Upstreams {
			key := s.Protocol + "/" + u.String()
			if seen[key] {
				continue
			}
			seen[key] = true
			name := "upstream " + u.String() + "/" + s.Protocol
			fix := fmt.Sprintf("ip route get %s; ping %s; check that the upstream listens on %s %d", u.Addr(), u.Addr(), s.Protocol, u.Port())
			if s.Protocol == "tcp" {
				start := time.Now()
				dl := net.Dialer{Timeout: d.o.Timeout}
				c, err := dl.DialContext(ctx, "tcp", u.String())
				if err != nil {
					d.add(name, Fail, fix, "connect: %v", err)
					continue
				}
				c.Close()
				d.add(name, Pass, "", "connected in %s", time.Since(start).Round(time.Microsecond))
				continue
			}
			rtt, err := Ping(u.Addr(), d.o.Timeout)
			if errors.Is(err, ErrNoICMP) {
				d.add(name, Warn, "run lbctl doctor with CAP_NET_RAW", "not probed: %v", err)
				continue
			}
			if err != nil {
				d.add(name, Fail, fix, "ping: %v", err)
				continue
			}
			d.add(name, Pass, "", "answers ping in %s (a UDP port cannot be probed without a protocol-specific request)", rtt.Round(time.Microsecond))
		}
	}
}

// ErrNoICMP: neither a raw nor an unprivileged ICMP socket could be opened.
var ErrNoICMP = errors.New("cannot open an ICMP socket (needs CAP_NET_RAW or net.ipv4.ping_group_range)")

// Ping sends one ICMP echo request to addr and waits up to timeout for the
// reply. It uses a raw socket (CAP_NET_RAW) or, failing that, an
// unprivileged ICMP socket (net.ipv4.ping_group_range).
func Ping(addr netip.Addr, timeout time.Duration) (time.Duration, error) {
	netw, raw, dgram := "ip4:icmp", "0.0.0.0", "udp4"
	var typ icmp.Type = ipv4.ICMPTypeEcho
	proto := 1
	if addr.Is6() {
		netw, raw, dgram = "ip6:ipv6-icmp", "::", "udp6"
		typ, proto = ipv6.ICMPTypeEchoRequest, 58
	}
	c, err := icmp.ListenPacket(netw, raw)
	var dst net.Addr = &net.IPAddr{IP: addr.AsSlice()}
	if err != nil {
		if c, err = icmp.ListenPacket(dgram, raw); err != nil {
			return 0, fmt.Errorf("%w: %w", ErrNoICMP, err)
		}
		dst = &net.UDPAddr{IP: addr.AsSlice()}
	}
	defer c.Close()
	id := os.Getpid() & 0xffff
	msg := icmp.Message{Type: typ, Body: &icmp.Echo{ID: id, Seq: 1, Data: []byte("lbctl doctor")}}
	b, err := msg.Marshal(nil)
	if err != nil {
		return 0, err
	}
	start := time.Now()
	if err := c.SetDeadline(start.Add(timeout)); err != nil {
		return 0, err
	}
	if _, err := c.WriteTo(b, dst); err != nil {
		return 0, fmt.Errorf("send echo to %s: %w", addr, err)
	}
	buf := make([]byte, 1500)
	for {
		n, peer, err := c.ReadFrom(buf)
		if err != nil {
			return 0, fmt.Errorf("no echo reply from %s within %s", addr, timeout)
		}
		if peerAddr(peer) != addr.Unmap() {
			continue
		}
		m, err := icmp.ParseMessage(proto, buf[:n])
		if err != nil {
			continue
		}
		switch m.Type {
		case ipv4.ICMPTypeEchoReply, ipv6.ICMPTypeEchoReply:
			return time.Since(start), nil
		case ipv4.ICMPTypeDestinationUnreachable, ipv6.ICMPTypeDestinationUnreachable:
			return 0, fmt.Errorf("%s is unreachable", addr)
		}
	}
}

func peerAddr(a net.Addr) netip.Addr {
	var ip net.IP
	switch v := a.(type) {
	case *net.IPAddr:
		ip = v.IP
	case *net.UDPAddr:
		ip = v.IP
	}
	out, _ := netip.AddrFromSlice(ip)
	return out.Unmap()
}

// --- transparent: the return path -------------------------------------------

// returnPath probes each upstream of the transparent services the way the
// proxy talks to it: from a client's address (IP_TRANSPARENT). TCP: a
// connect, whose SYN-ACK goes to that client address. UDP: one request
// the upstream answers (Service.Query: the service's dns or udp health
// check), whose answer goes to that client address. Either reaches this
// socket only if the upstream routes it through the LB and steer marks it
// for local delivery, which the steer counter of that upstream shows.
func (d *doctor) returnPath(ctx context.Context) {
	if d.o.BPF == nil {
		return
	}
	for _, s := range d.o.Services {
		if s.Mode != "transparent" {
			continue
		}
		for _, u := range s.Upstreams {
			name := fmt.Sprintf("return path %s %s", s.Name, u)
			if s.Protocol != "tcp" && s.Query == nil {
				d.add(name, Warn, s.NoQuery, "not probed: a UDP upstream answers only a protocol-specific request, and doctor has none for this service")
				continue
			}
			var client netip.Addr
			for _, c := range d.o.Clients {
				if c.Addr().Is4() == u.Addr().Is4() {
					client = c.Masked().Addr().Next()
					break
				}
			}
			if !client.IsValid() {
				d.add(name, Warn, "pass --client PREFIX (the clients' network) to probe it", "not probed: no client network of the upstream's family given")
				continue
			}
			before, steered, err := d.o.BPF.SteerPackets(s.Protocol, u)
			if err != nil {
				d.add(name, Fail, "run lbctl doctor as root", "read steer counters: %v", err)
				continue
			}
			if !steered {
				d.add(name, Fail, fmt.Sprintf("lbctl run -c CONFIG (or lbctl --bpffs %s attach IFACE --steer --upstream %s:%s)", d.o.BPFFS, s.Protocol, u),
					"steer does not mark replies from %s: is lbctl run running this service?", u)
				continue
			}
			what, did := "connect", "connected"
			dl := transparentDialer{from: client}
			pctx, cancel := context.WithTimeout(ctx, d.o.Timeout)
			if s.Protocol == "tcp" {
				err = transparentConnect(pctx, dl, u)
			} else {
				what, did = "query", "answered a query"
				err = s.Query(pctx, dl, u)
			}
			cancel()
			after, _, cerr := d.o.BPF.SteerPackets(s.Protocol, u)
			fix := fmt.Sprintf("on %s: lbctl doctor -c CONFIG --upstream --lb LB_ADDRESS (its route to %s must go through the LB); ip route get %s", u.Addr(), client, client)
			switch {
			case cerr != nil:
				d.add(name, Fail, "run lbctl doctor as root", "read steer counters: %v", cerr)
			case err != nil:
				d.add(name, Fail, fix, "%s from %s: %v: the upstream's reply did not come back to the LB's transparent socket (steer saw %d)", what, client, err, after-before)
			case after == before:
				d.add(name, Warn, "", "%s from %s, but steer counted no reply: the reply came back another way", did, client)
			default:
				d.add(name, Pass, "", "%s from client address %s: %d replies steered back to the socket", did, client, after-before)
			}
		}
	}
}

// transparentDialer opens sockets bound to the foreign address from
// (IP_TRANSPARENT / IPV6_TRANSPARENT), as the transparent proxy does; the
// kernel picks the port.
type transparentDialer struct{ from netip.Addr }

func (t transparentDialer) DialContext(ctx context.Context, network, address string) (net.Conn, error) {
	var local net.Addr = &net.TCPAddr{IP: t.from.AsSlice()}
	if strings.HasPrefix(network, "udp") {
		local = &net.UDPAddr{IP: t.from.AsSlice()}
	}
	dl := net.Dialer{
		LocalAddr: local,
		Control: func(network, address string, c syscall.RawConn) error {
			var serr error
			err := c.Control(func(fd uintptr) {
				if t.from.Is4() {
					serr = unix.SetsockoptInt(int(fd), unix.SOL_IP, unix.IP_TRANSPARENT, 1)
				} else {
					serr = unix.SetsockoptInt(int(fd), unix.SOL_IPV6, unix.IPV6_TRANSPARENT, 1)
				}
			})
			if err != nil {
				return err
			}
			return serr
		},
	}
	return dl.DialContext(ctx, network, address)
}

// transparentConnect connects to up through dl and closes the connection.
func transparentConnect(ctx context.Context, dl transparentDialer, up netip.AddrPort) error {
	c, err := dl.DialContext(ctx, "tcp", up.String())
	if err != nil {
		return err
	}
	return c.Close()
}

// --- on a backend (--upstream) ------------------------------------------------

func (d *doctor) upstreamChecks(ctx context.Context) {
	found := false
	checkedRP := map[string]bool{}
	for _, s := range d.o.Services {
		for _, u := range s.Upstreams {
			ifname, _, ok := localAddr(u.Addr())
			if !ok {
				continue
			}
			found = true
			switch {
			case s.Mode == "transparent" || routerNAT(s):
				d.defaultViaLB(s, u)
			case s.Mode == "dsr" || s.Mode == "xdp": // origin NAT
				d.originNAT(s, u)
				if !checkedRP[ifname] {
					checkedRP[ifname] = true
					d.rpOrigin(ifname, s)
				}
			}
		}
	}
	if !found {
		var all []string
		for _, s := range d.o.Services {
			for _, u := range s.Upstreams {
				all = append(all, u.Addr().String())
			}
		}
		d.add("upstream address", Fail, "run lbctl doctor --upstream on a backend named in the config, or add this host's address to a service's upstreams",
			"none of the upstreams (%s) is an address of this host", strings.Join(dedupe(sortedCopy(all)), ", "))
	}
}

func sortedCopy(s []string) []string {
	out := append([]string(nil), s...)
	sort.Strings(out)
	return out
}

// defaultViaLB: transparent and router-NAT replies must go back through the LB.
func (d *doctor) defaultViaLB(s Service, u netip.AddrPort) {
	fam := familyOf(u.Addr())
	name := "default route " + famName(fam)
	_, gw, err := defaultRoute(fam)
	why := fmt.Sprintf("replies of %s service %s go to the clients through the LB", s.Mode, s.Name)
	switch {
	case err != nil:
		fix := "ip route add default via LB_ADDRESS"
		if d.o.LB.IsValid() {
			fix = fmt.Sprintf("ip route add default via %s", d.o.LB)
		}
		d.add(name, Fail, fix, "no default route: %v (%s)", err, why)
	case !d.o.LB.IsValid():
		d.add(name, Warn, "pass --lb ADDRESS (the LB's address on this network) to check it", "default route via %s; %s, but --lb was not given", gw, why)
	case gw == d.o.LB:
		d.add(name, Pass, "", "via the LB %s (%s)", gw, why)
	default:
		gws := "no gateway"
		if gw.IsValid() {
			gws = gw.String()
		}
		d.add(name, Fail, fmt.Sprintf("ip route replace default via %s", d.o.LB), "via %s, not the LB %s: %s", gws, d.o.LB, why)
	}
	for _, c := range d.o.Clients {
		_, cgw, err := routeTo(c.Addr())
		if err == nil && cgw != d.o.LB && d.o.LB.IsValid() {
			d.add("route to "+c.String(), Fail, fmt.Sprintf("ip route del %s (or ip route replace %s via %s)", c, c, d.o.LB),
				"clients %s are reached via %v, not the LB %s: %s", c, cgw, d.o.LB, why)
		}
	}
}

// originNAT: the backend rewrites its own replies (snat attached, a rule
// from its address and port to the VIP).
func (d *doctor) originNAT(s Service, u netip.AddrPort) {
	name := fmt.Sprintf("snat rule %s %s", s.Name, u)
	fix := fmt.Sprintf("lbctl --bpffs %s snat add --src %s --proto %s --sport %d --to %s", d.o.BPFFS,
		netip.PrefixFrom(u.Addr(), u.Addr().BitLen()), s.Protocol, u.Port(), s.Listen)
	if d.o.BPF == nil {
		return
	}
	rules, err := d.o.BPF.SNATRules()
	if err != nil {
		d.add(name, Fail, fix, "read snat rules: %v", err)
		return
	}
	var best *SNATRule
	for i, r := range rules {
		if r.Proto != s.Protocol || !r.Src.Contains(u.Addr()) || (r.SPort != 0 && r.SPort != u.Port()) {
			continue
		}
		if best == nil || r.Src.Bits() > best.Src.Bits() || (r.Src.Bits() == best.Src.Bits() && r.SPort != 0) {
			best = &rules[i]
		}
	}
	port := u.Port()
	if best != nil && best.ToPort != 0 {
		port = best.ToPort
	}
	switch {
	case best == nil:
		d.add(name, Fail, fix, "no snat rule rewrites replies from %s/%s: clients get them from %s and drop them", u, s.Protocol, u.Addr())
	case best.To != s.Listen.Addr() || port != s.Listen.Port():
		d.add(name, Fail, fix, "replies from %s/%s are rewritten to %s, not the service address %s", u, s.Protocol, netip.AddrPortFrom(best.To, port), s.Listen)
	default:
		d.add(name, Pass, "", "replies from %s/%s leave as %s", u, s.Protocol, s.Listen)
	}
	att, err := d.o.BPF.Attached()
	aname := "attached snat"
	if err != nil {
		d.add(aname, Fail, "run lbctl doctor as root", "read pinned state: %v", err)
		return
	}
	var on []string
	for _, a := range att {
		if a.Program == "snat" {
			on = append(on, a.Interface)
		}
	}
	if len(on) == 0 {
		d.add(aname, Fail, fmt.Sprintf("lbctl --bpffs %s attach IFACE (the interface replies to clients leave by)", d.o.BPFFS), "snat is attached nowhere: origin-NAT rules do nothing")
		return
	}
	d.add(aname, Pass, "", "snat attached to %s", strings.Join(on, ", "))
}

// rpOrigin: with origin NAT, datagrams from clients arrive from the LB on
// ifname while replies to the clients leave by another path, which strict
// reverse-path filtering refuses.
func (d *doctor) rpOrigin(ifname string, s Service) {
	name := "rp_filter " + ifname
	v, err := rpFilter(ifname)
	if err != nil {
		d.add(name, Warn, "", "%v", err)
		return
	}
	if v != 1 {
		d.add(name, Pass, "", "%s (origin NAT: client datagrams arrive on %s from the LB)", rpName(v), ifname)
		return
	}
	for _, c := range d.o.Clients {
		if out, _, err := routeTo(c.Addr()); err == nil && out == ifname {
			d.add(name, Pass, "", "strict, and clients %s are routed out of %s", c, ifname)
			return
		}
	}
	d.add(name, Fail, rpFix(ifname), "strict: datagrams of origin-NAT service %s arrive on %s with the client's source, but replies to clients leave by another path, so the kernel drops them", s.Name, ifname)
}

// --- netlink helpers ---------------------------------------------------------

func familyOf(a netip.Addr) int {
	if a.Unmap().Is4() {
		return netlink.FAMILY_V4
	}
	return netlink.FAMILY_V6
}

func famName(fam int) string {
	if fam == netlink.FAMILY_V4 {
		return "ipv4"
	}
	return "ipv6"
}

func prefixOf(n *net.IPNet) (netip.Prefix, bool) {
	if n == nil {
		return netip.Prefix{}, false
	}
	a, ok := netip.AddrFromSlice(n.IP)
	if !ok {
		return netip.Prefix{}, false
	}
	ones, _ := n.Mask.Size()
	a = a.Unmap()
	if a.Is4() && ones > 32 {
		ones -= 96
	}
	return netip.PrefixFrom(a, ones), true
}

func linkName(index int) string {
	l, err := netlink.LinkByIndex(index)
	if err != nil {
		return ""
	}
	return l.Attrs().Name
}

// localAddr finds the interface holding addr.
func localAddr(addr netip.Addr) (string, netip.Prefix, bool) {
	addrs, err := netlink.AddrList(nil, familyOf(addr))
	if err != nil {
		return "", netip.Prefix{}, false
	}
	for _, a := range addrs {
		p, ok := prefixOf(a.IPNet)
		if ok && p.Addr() == addr.Unmap() {
			return linkName(a.LinkIndex), p, true
		}
	}
	return "", netip.Prefix{}, false
}

// connectedPrefix finds the local prefix (and its interface) that contains addr.
func connectedPrefix(addr netip.Addr) (netip.Prefix, string, bool) {
	addrs, err := netlink.AddrList(nil, familyOf(addr))
	if err != nil {
		return netip.Prefix{}, "", false
	}
	var best netip.Prefix
	bestIf := ""
	for _, a := range addrs {
		p, ok := prefixOf(a.IPNet)
		if !ok || !p.Masked().Contains(addr.Unmap()) || p.Bits() == p.Addr().BitLen() {
			continue
		}
		if !best.IsValid() || p.Bits() > best.Bits() {
			best, bestIf = p.Masked(), linkName(a.LinkIndex)
		}
	}
	return best, bestIf, best.IsValid()
}

// routeTo returns the interface and gateway the kernel routes addr by.
func routeTo(addr netip.Addr) (string, netip.Addr, error) {
	rs, err := netlink.RouteGet(addr.AsSlice())
	if err != nil {
		return "", netip.Addr{}, fmt.Errorf("route to %s: %w", addr, err)
	}
	if len(rs) == 0 {
		return "", netip.Addr{}, fmt.Errorf("no route to %s", addr)
	}
	gw, _ := netip.AddrFromSlice(rs[0].Gw)
	return linkName(rs[0].LinkIndex), gw.Unmap(), nil
}

// defaultRoute returns the main table's default route of family fam.
func defaultRoute(fam int) (string, netip.Addr, error) {
	rs, err := netlink.RouteListFiltered(fam, &netlink.Route{Table: unix.RT_TABLE_MAIN}, netlink.RT_FILTER_TABLE)
	if err != nil {
		return "", netip.Addr{}, err
	}
	for _, r := range rs {
		if r.Dst == nil || isDefault(r.Dst) {
			gw, _ := netip.AddrFromSlice(r.Gw)
			if len(r.MultiPath) > 0 {
				gw, _ = netip.AddrFromSlice(r.MultiPath[0].Gw)
			}
			return linkName(r.LinkIndex), gw.Unmap(), nil
		}
	}
	return "", netip.Addr{}, errors.New("none in the main table")
}

// clientIface is the interface clients reach s on: the one holding the
// listen address, else the route to the first --client, else the default route.
func (d *doctor) clientIface(s Service) string {
	if ifname, _, ok := localAddr(s.Listen.Addr()); ok && ifname != "lo" {
		return ifname
	}
	if len(d.o.Clients) > 0 {
		if ifname, _, err := routeTo(d.o.Clients[0].Addr()); err == nil {
			return ifname
		}
	}
	ifname, _, _ := defaultRoute(familyOf(s.Listen.Addr()))
	return ifname
}

// upstreamIface is the interface s reaches upstream addr by.
func (d *doctor) upstreamIface(s Service, addr netip.Addr) string {
	if s.Interface != "" {
		return s.Interface
	}
	ifname, _, err := routeTo(addr)
	if err != nil {
		return ""
	}
	return ifname
}
