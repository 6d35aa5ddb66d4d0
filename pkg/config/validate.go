package config

import (
	"fmt"
	"math"
	"net/netip"
	"regexp"
	"strconv"
	"strings"
	"time"
)

var (
	knownModes    = map[Mode]bool{ModeProxy: true, ModeTransparent: true, ModeDSR: true, ModeXDP: true}
	knownBalance  = map[string]bool{RoundRobin: true, LeastConn: true, RandomTwo: true, Hash: true}
	knownChecks   = map[string]bool{"tcp": true, "udp": true, "dns": true, "http": true}
	knownQTypes   = map[string]bool{"A": true, "AAAA": true, "CNAME": true, "MX": true, "NS": true, "PTR": true, "SOA": true, "SRV": true, "TXT": true}
	serviceName   = regexp.MustCompile(`^[A-Za-z0-9][A-Za-z0-9_.-]{0,62}$`)
	interfaceName = regexp.MustCompile(`^[^/\s:]{1,15}$`)
	statusRange   = regexp.MustCompile(`^([0-9]{3})(?:-([0-9]{3}))?$`)

	// healthFields says which check types use a type-specific key.
	healthFields = []struct {
		key   string
		types []string
	}{
		{"send", []string{"udp"}},
		{"expect", []string{"udp", "dns", "http"}},
		{"query", []string{"dns"}},
		{"qtype", []string{"dns"}},
		{"path", []string{"http"}},
		{"status", []string{"http"}},
	}
)

// validate checks what the decoder could not see field by field, and fills
// in the defaults. modes is the implemented-modes gate.
func (d *decoder) validate(cfg *Config, modes map[Mode]bool) {
	switch cfg.Log.Level {
	case "":
		cfg.Log.Level = "info"
	case "debug", "info", "warn", "error":
	default:
		d.at("log.level", "unknown level %q (want debug, info, warn or error)", cfg.Log.Level)
	}
	switch cfg.Log.Format {
	case "":
		cfg.Log.Format = "console"
	case "console", "json":
	default:
		d.at("log.format", "unknown format %q (want console or json)", cfg.Log.Format)
	}
	if d.has("metrics.listen") {
		if _, msg := parseAddrPort(cfg.Metrics.Listen); msg != "" {
			d.at("metrics.listen", "%s", msg)
		}
	}
	cfg.DrainTimeout = d.nonNegative("drain_timeout", cfg.DrainTimeout, DefaultDrainTimeout)

	if !d.has("transparent.mark") {
		cfg.Transparent.Mark = DefaultMark
	} else if cfg.Transparent.Mark == 0 {
		d.at("transparent.mark", "must not be 0 (every unmarked packet has mark 0)")
	}
	switch t := cfg.Transparent.Table; {
	case !d.has("transparent.table"):
		cfg.Transparent.Table = DefaultTable
	case t >= 253 && t <= 255:
		d.at("transparent.table", "table %d is reserved (253 default, 254 main, 255 local)", t)
	case t < 1 || int64(t) > math.MaxUint32:
		d.at("transparent.table", "table %d out of range (1-4294967295)", t)
	}

	switch cfg.XDP.Mode {
	case "":
		cfg.XDP.Mode = XDPAuto
	case XDPAuto, XDPNative, XDPGeneric:
	default:
		d.at("xdp.mode", "unknown xdp mode %q (want auto, native or generic)", cfg.XDP.Mode)
	}

	if len(cfg.Services) == 0 && !d.bad["services"] && !d.seen("services[0]") {
		d.at("services", "at least one service is required")
	}
	for i := range cfg.Services {
		d.service1(&cfg.Services[i], d.svcs[i], modes)
	}
	d.crossServices(cfg)
}

// service1 checks one service on its own and fills its defaults.
func (d *decoder) service1(s *Service, m svcMeta, modes map[Mode]bool) {
	p := m.path
	f := func(key string) string { return p + "." + key }

	switch {
	case !d.seen(f("name")):
		d.at(f("name"), "required")
	case d.has(f("name")) && !serviceName.MatchString(s.Name):
		d.at(f("name"), "%q: use letters, digits, '-', '_' and '.' (at most 63, starting with a letter or digit)", s.Name)
	}

	switch {
	case !d.has(f("protocol")):
		s.Protocol = TCP
	case s.Protocol != TCP && s.Protocol != UDP:
		d.at(f("protocol"), "unknown protocol %q (want tcp or udp)", s.Protocol)
		s.Protocol = ""
	}

	if !d.seen(f("listen")) {
		d.at(f("listen"), "required")
	}

	switch {
	case !d.has(f("mode")):
		s.Mode = ModeProxy
	case !knownModes[s.Mode]:
		d.at(f("mode"), "unknown mode %q (want proxy, transparent, dsr or xdp)", s.Mode)
		s.Mode = ""
	case !modes[s.Mode]:
		d.at(f("mode"), "mode %q is not implemented yet", s.Mode)
	}

	switch {
	case !d.has(f("balance")) && s.Mode == ModeXDP:
		s.Balance = Hash
	case !d.has(f("balance")):
		s.Balance = RoundRobin
	case !knownBalance[s.Balance]:
		d.at(f("balance"), "unknown balance %q (want round_robin, least_conn, random_two or hash)", s.Balance)
	}

	d.upstreams(s, m)

	sessionless := s.Mode == ModeDSR || s.Mode == ModeXDP
	s.ConnectTimeout = d.positive(f("connect_timeout"), s.ConnectTimeout, DefaultConnectTimeout)
	switch {
	case sessionless && !d.has(f("timeout")):
		s.Timeout = 0
	case sessionless:
		// mode rules below refuse anything but 0
	case s.Protocol == UDP:
		s.Timeout = d.positive(f("timeout"), s.Timeout, DefaultUDPTimeout)
	default:
		s.Timeout = d.positive(f("timeout"), s.Timeout, DefaultTCPTimeout)
	}
	if d.has(f("responses")) {
		switch {
		case s.Protocol == TCP:
			d.at(f("responses"), "applies only to protocol udp")
		case s.Responses < 0:
			d.at(f("responses"), "must not be negative")
		}
	} else if s.Mode == ModeDSR {
		s.Responses = 0
	}
	if s.NextUpstreamTries < 0 {
		d.at(f("next_upstream_tries"), "must not be negative")
	}
	if s.MaxConns < 0 {
		d.at(f("max_conns"), "must not be negative")
	}
	if d.has(f("interface")) && !interfaceName.MatchString(s.Interface) {
		d.at(f("interface"), "%q is not an interface name", s.Interface)
	}
	switch s.OnAllDown {
	case "":
		s.OnAllDown = "try"
	case "try", "reject":
	default:
		d.at(f("on_all_down"), "unknown value %q (want try or reject)", s.OnAllDown)
	}

	if s.Health != nil {
		d.health(f("health"), s.Health)
	}

	if !d.has(f("passive.max_fails")) {
		s.Passive.MaxFails = DefaultMaxFails
		if sessionless {
			s.Passive.MaxFails = 0
		}
	} else if s.Passive.MaxFails < 0 {
		d.at(f("passive.max_fails"), "must not be negative")
	}
	s.Passive.FailTimeout = d.nonNegative(f("passive.fail_timeout"), s.Passive.FailTimeout, DefaultFailTimeout)
	s.Passive.SlowStart = d.nonNegative(f("passive.slow_start"), s.Passive.SlowStart, 0)

	d.modeRules(p, s)
}

// upstreams checks the upstream list of s.
func (d *decoder) upstreams(s *Service, m svcMeta) {
	up := m.path + ".upstreams"
	if len(s.Upstreams) == 0 {
		if !d.bad[up] && !d.seen(up+"[0]") {
			d.at(up, "at least one upstream is required")
		}
		return
	}
	first := map[netip.AddrPort]string{}
	allDown, primary := true, false
	for i, u := range s.Upstreams {
		p := m.ups[i]
		if prev, dup := first[u.Addr]; dup {
			d.at(p, "duplicate upstream %s (first at line %d)", u.Addr, d.lineOf(prev))
		} else {
			first[u.Addr] = p
		}
		if u.Weight < 1 || u.Weight > MaxWeight {
			d.at(p+".weight", "weight %d out of range (1-%d)", u.Weight, MaxWeight)
		}
		if !u.Down {
			allDown = false
			if !u.Backup {
				primary = true
			}
		}
	}
	switch {
	case allDown:
		d.at(up, "every upstream is marked down")
	case !primary:
		d.at(up, "every upstream that is not down is a backup; backups only stand in for failed primaries, so at least one must be neither")
	}
}

// modeRules checks what a service's mode requires. It runs whether or not
// the mode passed the implemented-modes gate, so the rules are written and
// tested before the mode lands.
func (d *decoder) modeRules(p string, s *Service) {
	f := func(key string) string { return p + "." + key }
	m := s.Mode

	// Spoofing modes send from the client's address: a client of one family
	// cannot be the source of a packet to an upstream of the other.
	if (m == ModeTransparent || m == ModeDSR || m == ModeXDP) && s.Listen.IsValid() {
		want := family(s.Listen.Addr())
		for i, u := range s.Upstreams {
			if got := family(u.Addr.Addr()); got != want {
				d.at(d.svcUp(p, i), "%s upstream %s behind an %s listen address: mode %s sends from the client's address, so upstreams must be %s too",
					got, u.Addr, want, m, want)
			}
		}
	}

	switch m {
	case ModeTransparent:
		if s.Protocol == UDP && d.has(f("responses")) && s.Responses == 0 {
			d.at(f("responses"), "mode transparent relays replies through the load balancer; responses: 0 would drop them (direct replies are mode dsr)")
		}
	case ModeDSR, ModeXDP:
		if s.Listen.IsValid() && s.Listen.Addr().IsUnspecified() {
			d.at(f("listen"), "mode %s needs a specific address (replies are rewritten to come from it), not %s", m, s.Listen.Addr())
		}
		if s.Health == nil {
			d.at(f("health"), "mode %s requires an active health check: the load balancer never sees the upstreams' replies, so passive checks cannot tell a dead upstream from a live one", m)
		}
		for _, k := range []string{"passive.max_fails", "passive.fail_timeout"} {
			if d.has(f(k)) {
				d.at(f(k), "mode %s sees no replies, so passive checks cannot work; use an active health check", m)
			}
		}
		switch s.DSR.NAT {
		case "":
			s.DSR.NAT = "router"
		case "router", "origin":
		default:
			d.at(f("dsr.nat"), "unknown nat %q (want router or origin)", s.DSR.NAT)
		}
	default:
		if d.has(f("dsr")) {
			d.at(f("dsr"), "applies only to modes dsr and xdp")
		}
	}

	switch m {
	case ModeDSR:
		if s.Protocol == TCP {
			d.at(f("protocol"), "mode dsr requires protocol udp (TCP with direct server return is mode xdp)")
		}
		if d.has(f("responses")) && s.Responses != 0 {
			d.at(f("responses"), "mode dsr expects no reply through the load balancer; responses must be 0 or absent")
		}
		if d.has(f("timeout")) && s.Timeout != 0 {
			d.at(f("timeout"), "mode dsr keeps no session to time out; timeout must be 0 or absent")
		}
	case ModeXDP:
		for _, k := range []string{"responses", "timeout", "connect_timeout", "next_upstream_tries", "max_conns"} {
			if d.has(f(k)) {
				d.at(f(k), "does not apply to mode xdp: the kernel forwards each packet, no session or socket is kept")
			}
		}
		if d.has(f("balance")) && s.Balance != Hash {
			d.at(f("balance"), "mode xdp always balances with a Maglev consistent hash; balance must be hash or absent")
		}
		if d.has(f("interface")) {
			d.at(f("interface"), "does not apply to mode xdp: the next hop comes from the routing table (bpf_fib_lookup)")
		}
		if n := len(s.Upstreams); n > maxXDPUpstreams {
			d.at(f("upstreams"), "mode xdp takes at most %d upstreams (100 Maglev slots each in a 65537-slot table), got %d", maxXDPUpstreams, n)
		}
	}
}

// maxXDPUpstreams keeps 100 slots per upstream in the XDP program's
// 65537-slot Maglev table (pkg/dataplane.XDPTableSize).
const maxXDPUpstreams = 655

// svcUp is the field path of upstream i of the service at p.
func (d *decoder) svcUp(p string, i int) string {
	for _, m := range d.svcs {
		if m.path == p && i < len(m.ups) {
			return m.ups[i]
		}
	}
	return p + ".upstreams"
}

func family(a netip.Addr) string {
	if a.Unmap().Is4() {
		return "IPv4"
	}
	return "IPv6"
}

// health checks an active health check and fills its defaults.
func (d *decoder) health(p string, h *Health) {
	f := func(key string) string { return p + "." + key }
	switch {
	case !d.seen(f("type")):
		d.at(f("type"), "required (tcp, udp, dns or http)")
	case !d.has(f("type")):
		// malformed, reported
	case !knownChecks[h.Type]:
		d.at(f("type"), "unknown check type %q (want tcp, udp, dns or http)", h.Type)
	default:
		for _, hf := range healthFields {
			if d.has(f(hf.key)) && !contains(hf.types, h.Type) {
				d.at(f(hf.key), "applies only to type %s", strings.Join(hf.types, ", "))
			}
		}
	}
	h.Interval = d.positive(f("interval"), h.Interval, DefaultHealthInterval)
	defTimeout := DefaultHealthTimeout
	if h.Interval > 0 && h.Interval <= defTimeout {
		defTimeout = h.Interval / 2
	}
	h.Timeout = d.positive(f("timeout"), h.Timeout, defTimeout)
	if h.Interval > 0 && h.Timeout > 0 && h.Timeout >= h.Interval {
		d.at(f("timeout"), "%s must be shorter than interval %s", h.Timeout, h.Interval)
	}
	for _, c := range []struct {
		key string
		v   *int
		def int
	}{{"rise", &h.Rise, DefaultRise}, {"fall", &h.Fall, DefaultFall}} {
		switch {
		case !d.has(f(c.key)):
			*c.v = c.def
		case *c.v < 1:
			d.at(f(c.key), "must be at least 1")
		}
	}
	if h.Type == "dns" {
		if !d.seen(f("query")) {
			d.at(f("query"), "required for type dns")
		} else if msg := checkDNSName(h.Query); msg != "" {
			d.at(f("query"), "%s", msg)
		}
		if h.QType == "" {
			h.QType = DefaultQType
		}
		h.QType = strings.ToUpper(h.QType)
		if !knownQTypes[h.QType] {
			d.at(f("qtype"), "unknown query type %q (want A, AAAA, CNAME, MX, NS, PTR, SOA, SRV or TXT)", h.QType)
		}
	}
	if h.Type == "http" {
		if h.Path == "" {
			h.Path = DefaultHTTPPath
		} else if !strings.HasPrefix(h.Path, "/") {
			d.at(f("path"), "%q must start with /", h.Path)
		}
		if h.Status == "" {
			h.Status = DefaultHTTPStatus
		} else if !validStatus(h.Status) {
			d.at(f("status"), "bad status range %q (want a code or a range such as 200-399, within 100-599)", h.Status)
		}
	}
	if re, ok := regexpOf(h.Expect); ok {
		if _, err := regexp.Compile(re); err != nil {
			d.at(f("expect"), "bad regexp %s: %v", h.Expect, err)
		}
	}
}

// regexpOf returns the pattern of an expect value written /like this/.
func regexpOf(expect string) (string, bool) {
	if len(expect) >= 2 && strings.HasPrefix(expect, "/") && strings.HasSuffix(expect, "/") {
		return expect[1 : len(expect)-1], true
	}
	return "", false
}

func validStatus(s string) bool {
	m := statusRange.FindStringSubmatch(s)
	if m == nil {
		return false
	}
	lo, _ := strconv.Atoi(m[1])
	hi := lo
	if m[2] != "" {
		hi, _ = strconv.Atoi(m[2])
	}
	return lo >= 100 && hi <= 599 && lo <= hi
}

func checkDNSName(name string) string {
	n := strings.TrimSuffix(name, ".")
	if n == "" || len(n) > 253 {
		return fmt.Sprintf("%q is not a DNS name", name)
	}
	for _, label := range strings.Split(n, ".") {
		if label == "" || len(label) > 63 {
			return fmt.Sprintf("%q is not a DNS name", name)
		}
	}
	return ""
}

func contains(list []string, s string) bool {
	for _, x := range list {
		if x == s {
			return true
		}
	}
	return false
}

// positive returns def when path is absent, else v, reporting v <= 0.
func (d *decoder) positive(path string, v, def time.Duration) time.Duration {
	switch {
	case !d.has(path):
		return def
	case v < 0:
		d.at(path, "must not be negative")
	case v == 0:
		d.at(path, "must be positive")
	}
	return v
}

// nonNegative returns def when path is absent, else v, reporting v < 0.
func (d *decoder) nonNegative(path string, v, def time.Duration) time.Duration {
	switch {
	case !d.has(path):
		return def
	case v < 0:
		d.at(path, "must not be negative")
	}
	return v
}

// crossServices checks what services must not share.
func (d *decoder) crossServices(cfg *Config) {
	names := map[string]string{}
	type listenKey struct {
		ap    netip.AddrPort
		proto Protocol
	}
	listens := map[listenKey]string{}
	var order []listenKey
	for i, s := range cfg.Services {
		p := d.svcs[i].path
		if s.Name != "" {
			if prev, dup := names[s.Name]; dup {
				d.at(p+".name", "duplicate service name %q (first at line %d)", s.Name, d.lineOf(prev+".name"))
			} else {
				names[s.Name] = p
			}
		}
		if !s.Listen.IsValid() || s.Protocol == "" {
			continue
		}
		k := listenKey{s.Listen, s.Protocol}
		if prev, dup := listens[k]; dup {
			d.at(p+".listen", "%s/%s is already the listen address of %s (line %d)", s.Listen, s.Protocol, prev, d.lineOf(prev+".listen"))
			continue
		}
		for _, o := range order {
			prev := listens[o]
			if o.proto == s.Protocol && o.ap.Port() == s.Listen.Port() &&
				family(o.ap.Addr()) == family(s.Listen.Addr()) &&
				(o.ap.Addr().IsUnspecified() || s.Listen.Addr().IsUnspecified()) {
				d.at(p+".listen", "%s/%s overlaps %s/%s of %s (line %d)", s.Listen, s.Protocol, o.ap, o.proto, prev, d.lineOf(prev+".listen"))
			}
		}
		listens[k] = p
		order = append(order, k)
	}
	d.steeredVsRouterNAT(cfg)
}

// steeredVsRouterNAT refuses an upstream address:port/protocol shared by a
// transparent service and a dsr or xdp service with router NAT: steer marks
// every packet from it for local delivery to the transparent proxy, so the
// DSR replies meant to be rewritten and forwarded by router NAT would never
// leave the load balancer.
func (d *decoder) steeredVsRouterNAT(cfg *Config) {
	type upKey struct {
		ap    netip.AddrPort
		proto Protocol
	}
	type use struct {
		path string // the upstream's field path
		svc  Service
	}
	steered := map[upKey][]use{}
	var routed []struct {
		k upKey
		use
	}
	for i, s := range cfg.Services {
		for j, u := range s.Upstreams {
			k := upKey{netip.AddrPortFrom(u.Addr.Addr().Unmap(), u.Addr.Port()), s.Protocol}
			p := d.svcUp(d.svcs[i].path, j)
			switch {
			case s.Mode == ModeTransparent:
				steered[k] = append(steered[k], use{p, s})
			case (s.Mode == ModeDSR || s.Mode == ModeXDP) && s.DSR.NAT == "router":
				routed = append(routed, struct {
					k upKey
					use
				}{k, use{p, s}})
			}
		}
	}
	for _, r := range routed {
		for _, t := range steered[r.k] {
			at, other := r.use, t
			if d.lineOf(t.path) > d.lineOf(r.path) {
				at, other = t, r.use
			}
			d.at(at.path, "upstream %s/%s is also an upstream of %s service %s (%s, line %d): the transparent service's steer program would deliver every reply from it to the proxy, so the replies meant for %s's router NAT would never reach the client; give the two services different upstream ports (or addresses), or use dsr.nat: origin",
				r.k.ap, r.k.proto, other.svc.Mode, other.svc.Name, other.path, d.lineOf(other.path), r.svc.Name)
		}
	}
}
