package main

import (
	"context"
	"errors"
	"fmt"
	"net/netip"
	"strings"

	"github.com/lbctl/lbctl/pkg/config"
	"github.com/lbctl/lbctl/pkg/dataplane"
	"github.com/lbctl/lbctl/pkg/netconf"
)

var attachCmd = command{
	name:    "attach",
	summary: "attach lbctl's programs to IFACE (tc egress snat; --xdp: the XDP load balancer; --steer: tc ingress steer + policy routing); state stays pinned",
	run:     runAttach,
}

var detachCmd = command{
	name:    "detach",
	summary: "remove what attach added to IFACE",
	run:     runDetach,
}

// clsNetconf is the clsact + cls_bpf fallback for kernels without tcx.
type clsNetconf struct{}

func (clsNetconf) AttachClsBPF(ifname string, progFD int, name string, egress bool) error {
	return netconf.AttachClsBPF(ifname, progFD, name, egress)
}

func (clsNetconf) DetachClsBPF(ifname, name string, egress bool) error {
	return netconf.DetachClsBPF(ifname, name, egress)
}

func openDataplane(e *env, force, noCreate bool) (*dataplane.Dataplane, error) {
	return dataplane.Open(dataplane.Options{
		Root:        e.bpffs,
		Log:         e.log,
		ClsBPF:      clsNetconf{},
		ForceClsBPF: force,
		NoCreate:    noCreate,
	})
}

func runAttach(ctx context.Context, e *env, args []string) error {
	fs := newFlags("attach", e.stderr)
	xdp := fs.Bool("xdp", false, "also attach the XDP load balancer (xdp_lb) to IFACE")
	xdpMode := fs.String("xdp-mode", "", "XDP mode: native or generic (default: native where the driver supports it, else generic)")
	steer := fs.Bool("steer", false, "also attach tc ingress steer (transparent mode's return path) and add its policy rule and local route")
	mark := fs.Uint("mark", uint(config.DefaultMark), "with --steer: fwmark of the upstreams' replies (config transparent.mark)")
	table := fs.Int("table", config.DefaultTable, "with --steer: routing table of the local route (config transparent.table)")
	noSockCheck := fs.Bool("no-socket-check", false, "with --steer: do not count replies that find no local socket")
	var upstreams upstreamList
	fs.Var(&upstreams, "upstream", "with --steer: PROTO:ADDR:PORT of an upstream whose replies to steer (repeatable), e.g. tcp:198.19.16.11:80")
	clsact := fs.Bool("clsact", false, "attach with clsact + cls_bpf even if the kernel has tcx (testing the fallback)")
	fs.Usage = func() {
		fmt.Fprintln(e.stderr, "usage: lbctl attach IFACE [--xdp] [--xdp-mode native|generic] [--steer [--upstream tcp:ADDR:PORT]... [--mark M] [--table T]]")
		fs.PrintDefaults()
	}
	pos, err := parseFlags(fs, args)
	if err != nil {
		return err
	}
	if len(pos) != 1 {
		return usagef("want exactly one interface, got %d arguments (usage: lbctl attach IFACE)", len(pos))
	}
	mode, err := dataplane.ParseXDPMode(*xdpMode)
	if err != nil {
		return usagef("--xdp-mode %q: want native or generic", *xdpMode)
	}
	if !*steer && len(upstreams) > 0 {
		return usagef("--upstream needs --steer")
	}
	if *mark == 0 || *mark > 0xffffffff {
		return usagef("--mark %d: want 1 to 0xffffffff", *mark)
	}
	ifname := pos[0]
	dp, err := openDataplane(e, *clsact, false)
	if err != nil {
		return err
	}
	defer dp.Close()
	method, err := dp.AttachSNAT(ifname)
	if err != nil {
		return err
	}
	fmt.Fprintf(e.stdout, "attached snat to %s egress with %s (state in %s)\n", ifname, method, dp.Dir())
	if *xdp || *xdpMode != "" {
		got, err := dp.AttachXDP(ifname, mode)
		if err != nil {
			return err
		}
		fmt.Fprintf(e.stdout, "attached xdp_lb to %s in %s mode\n", ifname, got)
	}
	if !*steer {
		return nil
	}
	method, err = dp.AttachSteer(ifname, dataplane.SteerOptions{Mark: uint32(*mark), CheckSocket: !*noSockCheck})
	if err != nil {
		return err
	}
	fmt.Fprintf(e.stdout, "attached steer to %s ingress with %s (mark %#x)\n", ifname, method, *mark)
	for _, u := range upstreams {
		if err := dp.AddSteerUpstream(u.proto, u.addr); err != nil && !errors.Is(err, dataplane.ErrUpstreamExists) {
			return err
		}
		fmt.Fprintf(e.stdout, "steering replies from %s %s\n", u.proto, u.addr)
	}
	pr, err := netconf.InstallPolicy(netconf.Policy{Mark: uint32(*mark), Table: *table})
	if err != nil {
		return err
	}
	for _, a := range pr.Added {
		fmt.Fprintf(e.stdout, "added %s\n", a)
	}
	for _, a := range pr.Present {
		fmt.Fprintf(e.stdout, "present %s\n", a)
	}
	return nil
}

type upstream struct {
	proto dataplane.Proto
	addr  netip.AddrPort
}

// upstreamList is the repeatable --upstream PROTO:ADDR:PORT flag.
type upstreamList []upstream

func (l *upstreamList) String() string { return fmt.Sprint(*l) }

func (l *upstreamList) Set(s string) error {
	ps, as, ok := strings.Cut(s, ":")
	if !ok {
		return fmt.Errorf("%q: want PROTO:ADDR:PORT, e.g. tcp:198.19.16.11:80 or udp:[2001:db8:16::11]:53", s)
	}
	proto, err := dataplane.ParseProto(ps)
	if err != nil {
		return err
	}
	ap, err := netip.ParseAddrPort(as)
	if err != nil || ap.Port() == 0 {
		return fmt.Errorf("%q: want PROTO:ADDR:PORT with a non-zero port, e.g. tcp:198.19.16.11:80", s)
	}
	*l = append(*l, upstream{proto, ap})
	return nil
}

func runDetach(ctx context.Context, e *env, args []string) error {
	fs := newFlags("detach", e.stderr)
	mark := fs.Uint("mark", uint(config.DefaultMark), "fwmark attach --steer used")
	table := fs.Int("table", config.DefaultTable, "table attach --steer used")
	fs.Usage = func() {
		fmt.Fprintln(e.stderr, "usage: lbctl detach IFACE")
		fs.PrintDefaults()
	}
	pos, err := parseFlags(fs, args)
	if err != nil {
		return err
	}
	if len(pos) != 1 {
		return usagef("want exactly one interface, got %d arguments (usage: lbctl detach IFACE)", len(pos))
	}
	ifname := pos[0]
	dp, err := openDataplane(e, false, true)
	if err != nil {
		if errorsIsNoState(err) {
			fmt.Fprintf(e.stdout, "nothing attached to %s by lbctl\n", ifname)
			return nil
		}
		return err
	}
	defer dp.Close()
	done, err := dp.Detach(ifname)
	for _, a := range done {
		fmt.Fprintf(e.stdout, "detached %s from %s (%s)\n", a.Program, a.Interface, a.Method)
	}
	if err != nil {
		return err
	}
	steerLeft := false
	if atts, err := dp.Attachments(); err == nil {
		for _, a := range atts {
			steerLeft = steerLeft || a.Program == "steer"
		}
	}
	for _, a := range done {
		if a.Program != "steer" || steerLeft {
			continue
		}
		// The last steer is gone: so goes the policy routing attach added.
		removed, err := netconf.RemoveTaggedPolicy(netconf.Policy{Mark: uint32(*mark), Table: *table})
		for _, r := range removed {
			fmt.Fprintf(e.stdout, "removed %s\n", r)
		}
		if err != nil {
			return err
		}
		break
	}
	if len(done) == 0 {
		fmt.Fprintf(e.stdout, "nothing attached to %s by lbctl\n", ifname)
	}
	return nil
}
