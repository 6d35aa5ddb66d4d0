package main

import (
	"context"
	"fmt"

	"github.com/lbctl/lbctl/pkg/dataplane"
	"github.com/lbctl/lbctl/pkg/netconf"
)

var attachCmd = command{
	name:    "attach",
	summary: "attach lbctl's programs to IFACE (tc egress snat; --xdp: the XDP load balancer); state stays pinned",
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
	steer := fs.Bool("steer", false, "also attach tc ingress steer (not implemented yet)")
	clsact := fs.Bool("clsact", false, "attach with clsact + cls_bpf even if the kernel has tcx (testing the fallback)")
	fs.Usage = func() {
		fmt.Fprintln(e.stderr, "usage: lbctl attach IFACE [--xdp] [--xdp-mode native|generic]")
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
	if *steer {
		return fmt.Errorf("attach --steer: not implemented yet (only tc egress snat is)")
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
	return nil
}

func runDetach(ctx context.Context, e *env, args []string) error {
	fs := newFlags("detach", e.stderr)
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
	if len(done) == 0 {
		fmt.Fprintf(e.stdout, "nothing attached to %s by lbctl\n", ifname)
	}
	return nil
}
