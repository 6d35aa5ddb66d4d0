package main

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"net/netip"
	"strings"
	"text/tabwriter"
	"time"

	"github.com/lbctl/lbctl/pkg/config"
	"github.com/lbctl/lbctl/pkg/dataplane"
	"github.com/lbctl/lbctl/pkg/health"
	"github.com/lbctl/lbctl/pkg/netconf"
)

var doctorCmd = command{
	name:    "doctor",
	summary: "check this host against the config: privileges, programs, routes, sysctls, upstreams (exit 1 on FAIL)",
	run:     runDoctor,
}

// errDoctorFailed makes lbctl exit 1 after the report, without more text.
var errDoctorFailed = errors.New("some checks failed (see the FAIL lines above)")

// prefixList is a repeatable --client flag.
type prefixList []netip.Prefix

func (p *prefixList) String() string {
	var s []string
	for _, v := range *p {
		s = append(s, v.String())
	}
	return strings.Join(s, ",")
}

func (p *prefixList) Set(v string) error {
	pr, err := netip.ParsePrefix(v)
	if err != nil {
		a, aerr := netip.ParseAddr(v)
		if aerr != nil {
			return fmt.Errorf("want a prefix like 198.18.99.0/24 or an address: %w", err)
		}
		pr = netip.PrefixFrom(a, a.BitLen())
	}
	*p = append(*p, pr.Masked())
	return nil
}

func runDoctor(ctx context.Context, e *env, args []string) error {
	fs := newFlags("doctor", e.stderr)
	cfgPath := fs.String("c", "", "config file to check the host against (without it: host-wide checks only)")
	upstream := fs.Bool("upstream", false, "run the checks for a backend (upstream) of the config instead of the LB")
	lb := fs.String("lb", "", "with --upstream: the LB's address on this backend's network (the default route must point at it)")
	var clients prefixList
	fs.Var(&clients, "client", "a client network (repeatable); default: the prefixes of the interface holding the listen address")
	asJSON := fs.Bool("json", false, "print JSON")
	timeout := fs.Duration("timeout", time.Second, "timeout of each reachability probe")
	fs.Usage = func() {
		fmt.Fprintln(e.stderr, "usage: lbctl doctor [-c FILE] [--upstream [--lb ADDR]] [--client PREFIX]... [--json]")
		fs.PrintDefaults()
	}
	pos, err := parseFlags(fs, args)
	if err != nil {
		return err
	}
	if len(pos) > 0 {
		return usagef("unexpected argument %q (usage: lbctl doctor [-c FILE])", pos[0])
	}
	opts := netconf.DoctorOptions{BPFFS: e.bpffs, Upstream: *upstream, Clients: clients, Timeout: *timeout,
		BPF: doctorBPF{e: e}, Mark: config.DefaultMark, Table: config.DefaultTable}
	if *lb != "" {
		if opts.LB, err = netip.ParseAddr(*lb); err != nil {
			return usagef("--lb %q: want an address like 198.19.16.1", *lb)
		}
	}
	if *cfgPath != "" {
		cfg, err := config.LoadForInspection(*cfgPath)
		if err != nil {
			return err
		}
		opts.Mark, opts.Table = cfg.Transparent.Mark, cfg.Transparent.Table
		for _, s := range cfg.Services {
			ds := netconf.Service{Name: s.Name, Mode: string(s.Mode), Protocol: string(s.Protocol),
				Listen: s.Listen, NAT: s.DSR.NAT, Interface: s.Interface}
			for _, u := range s.Upstreams {
				if !u.Down {
					ds.Upstreams = append(ds.Upstreams, u.Addr)
				}
			}
			if s.Protocol == config.UDP {
				ds.Query, ds.NoQuery = returnPathQuery(s)
			}
			opts.Services = append(opts.Services, ds)
		}
	} else if *upstream {
		return usagef("--upstream needs the config: lbctl doctor -c FILE --upstream")
	}
	checks := netconf.Doctor(ctx, opts)
	if *asJSON {
		enc := json.NewEncoder(e.stdout)
		enc.SetIndent("", "  ")
		if err := enc.Encode(checks); err != nil {
			return err
		}
	} else {
		tw := tabwriter.NewWriter(e.stdout, 0, 4, 2, ' ', 0)
		for _, c := range checks {
			line := fmt.Sprintf("%s\t%s\t%s", c.Status, c.Name, c.Detail)
			if c.Fix != "" {
				line += "\tfix: " + c.Fix
			}
			fmt.Fprintln(tw, line)
		}
		if err := tw.Flush(); err != nil {
			return err
		}
	}
	if netconf.Failed(checks) {
		return errDoctorFailed
	}
	return nil
}

// returnPathQuery gives doctor the request that probes the return path of
// UDP service s: its dns or udp health check (both wait for an answer),
// sent once to the upstream's own port. Without one it says what to
// configure instead.
func returnPathQuery(s config.Service) (func(context.Context, netconf.Dialer, netip.AddrPort) error, string) {
	h := s.Health
	if h == nil || (h.Type != "dns" && h.Type != "udp") {
		return nil, fmt.Sprintf("give %s a health check its upstreams answer (health: {type: dns, query: NAME} if they speak DNS, else {type: udp, send: PAYLOAD, expect: REPLY}): doctor then sends it from a client address", s.Name)
	}
	for _, u := range s.Upstreams {
		if h.Port != 0 && h.Port != u.Addr.Port() {
			return nil, fmt.Sprintf("drop health.port of %s if its upstreams answer the %s check on their own port: doctor then sends it there from a client address", s.Name, h.Type)
		}
	}
	return func(ctx context.Context, d netconf.Dialer, up netip.AddrPort) error {
		return health.Probe(ctx, h, d, up)
	}, ""
}

// doctorBPF gives the doctor the BPF side (pkg/netconf imports no cilium/ebpf).
type doctorBPF struct{ e *env }

func (b doctorBPF) Features() (error, error) {
	f := dataplane.ProbeFeatures()
	return f.TCX, f.XDP
}

func (doctorBPF) Programs() []string { return dataplane.Programs() }

// open returns nil, nil when there is no pinned state.
func (b doctorBPF) open() (*dataplane.Dataplane, error) {
	dp, err := openReader(b.e)
	if errorsIsNoState(err) {
		return nil, nil
	}
	return dp, err
}

func (b doctorBPF) Attached() ([]netconf.Attached, error) {
	dp, err := b.open()
	if dp == nil || err != nil {
		return nil, err
	}
	defer dp.Close()
	as, err := dp.Attachments()
	var out []netconf.Attached
	for _, a := range as {
		out = append(out, netconf.Attached{Interface: a.Interface, Program: a.Program})
	}
	return out, err
}

func (b doctorBPF) SNATRules() ([]netconf.SNATRule, error) {
	dp, err := b.open()
	if dp == nil || err != nil {
		return nil, err
	}
	defer dp.Close()
	rs, err := dp.ListSNAT()
	var out []netconf.SNATRule
	for _, r := range rs {
		out = append(out, netconf.SNATRule{Src: r.Src, Proto: r.Proto.String(), SPort: r.SPort, To: r.To, ToPort: r.ToPort})
	}
	return out, err
}

func (b doctorBPF) SteerPackets(proto string, upstream netip.AddrPort) (uint64, bool, error) {
	p, err := dataplane.ParseProto(proto)
	if err != nil {
		return 0, false, err
	}
	dp, err := b.open()
	if dp == nil || err != nil {
		return 0, false, err
	}
	defer dp.Close()
	return dp.SteerUpstreamPackets(p, upstream)
}
