package main

import (
	"context"
	"errors"
	"fmt"
	"net/netip"
	"strconv"
	"text/tabwriter"
	"time"

	"github.com/lbctl/lbctl/pkg/daemon"
	"github.com/lbctl/lbctl/pkg/dataplane"
	"github.com/lbctl/lbctl/pkg/health"
)

var statusCmd = command{
	name:    "status",
	summary: "print attached programs (with kernel ids), rule counts and the daemon's services",
	run:     runStatus,
}

// statusReport is lbctl status --json.
type statusReport struct {
	BPFFS       string                      `json:"bpffs"`
	State       bool                        `json:"state"` // pinned state exists
	Attachments []dataplane.AttachmentInfo  `json:"attachments"`
	SNATRules   int                         `json:"snat_rules"`
	MaxRules    int                         `json:"snat_rules_max"`
	XDP         []dataplane.XDPServiceState `json:"xdp_services"`
	// Daemon is lbctl run's status; null when none runs for this --bpffs.
	Daemon        *daemon.Status `json:"daemon"`
	ControlSocket string         `json:"control_socket"`
}

func runStatus(ctx context.Context, e *env, args []string) error {
	fs := newFlags("status", e.stderr)
	asJSON := fs.Bool("json", false, "print JSON")
	pos, err := parseFlags(fs, args)
	if err != nil {
		return err
	}
	if len(pos) > 0 {
		return usagef("unexpected argument %q (usage: lbctl status [--json])", pos[0])
	}
	rep := statusReport{BPFFS: e.bpffs, Attachments: []dataplane.AttachmentInfo{}, MaxRules: dataplane.MaxSNATRules,
		ControlSocket: daemon.ControlSocket(e.bpffs)}
	if st, err := daemon.QueryStatus(ctx, rep.ControlSocket); err == nil {
		rep.Daemon = &st
	} else if !errors.Is(err, daemon.ErrNotRunning) {
		return err
	}
	dp, err := openReader(e)
	switch {
	case errorsIsNoState(err):
	case err != nil:
		return err
	default:
		defer dp.Close()
		rep.State = true
		if rep.Attachments, err = dp.AttachmentInfos(); err != nil {
			return err
		}
		rules, err := dp.ListSNAT()
		if err != nil {
			return err
		}
		rep.SNATRules = len(rules)
		if rep.XDP, err = dp.XDPServices(); err != nil {
			return err
		}
	}
	if rep.XDP == nil {
		rep.XDP = []dataplane.XDPServiceState{}
	}
	if *asJSON {
		return writeJSON(e.stdout, rep)
	}
	if err := printDaemon(e, rep); err != nil {
		return err
	}
	if !rep.State {
		fmt.Fprintf(e.stdout, "no lbctl state under %s/lbctl: nothing attached (lbctl attach IFACE)\n", e.bpffs)
		return nil
	}
	tw := tabwriter.NewWriter(e.stdout, 0, 4, 2, ' ', 0)
	fmt.Fprintln(tw, "INTERFACE\tPROGRAM\tHOOK\tMETHOD\tPROG ID\tLINK ID")
	for _, a := range rep.Attachments {
		link := "-"
		if a.LinkID != 0 {
			link = fmt.Sprint(a.LinkID)
		}
		fmt.Fprintf(tw, "%s\t%s\t%s\t%s\t%d\t%s\n", a.Interface, a.Program, a.Hook, a.Method, a.ProgramID, link)
	}
	if err := tw.Flush(); err != nil {
		return err
	}
	fmt.Fprintf(e.stdout, "\nsnat rules: %d of %d\n", rep.SNATRules, rep.MaxRules)
	if len(rep.XDP) > 0 {
		fmt.Fprintln(e.stdout)
		tw = tabwriter.NewWriter(e.stdout, 0, 4, 2, ' ', 0)
		fmt.Fprintln(tw, "XDP SERVICE\tPROTO\tGEN\tBACKEND\tSHARE\tPACKETS\tBYTES")
		for _, s := range rep.XDP {
			total := 0
			for _, b := range s.Backends {
				total += b.Slots
			}
			for _, b := range s.Backends {
				share := 0.0
				if total > 0 {
					share = 100 * float64(b.Slots) / float64(total)
				}
				fmt.Fprintf(tw, "%s\t%s\t%d\t%s\t%.1f%%\t%d\t%d\n", s.VIP, s.Proto, s.Generation, b.Addr, share, b.Packets, b.Bytes)
			}
		}
		if err := tw.Flush(); err != nil {
			return err
		}
	}
	fmt.Fprintf(e.stdout, "state: %s/lbctl\n", e.bpffs)
	return nil
}

// printDaemon prints the services of the running daemon, if any.
func printDaemon(e *env, rep statusReport) error {
	if rep.Daemon == nil {
		fmt.Fprintf(e.stdout, "daemon: not running (no lbctl run answers on %s)\n\n", rep.ControlSocket)
		return nil
	}
	st := rep.Daemon
	fmt.Fprintf(e.stdout, "daemon: running since %s, config %s, %d reloads\n\n", st.Started.Format(time.RFC3339), st.Config, st.Reloads)
	now := time.Now()
	tw := tabwriter.NewWriter(e.stdout, 0, 4, 2, ' ', 0)
	fmt.Fprintln(tw, "SERVICE\tMODE\tPROTO\tLISTEN\tBALANCE\tUPSTREAM\tHEALTH\tSINCE\tLAST CHECK\tWEIGHT\tSHARE\tACTIVE\tTOTAL\tFAILURES")
	for _, s := range st.Services {
		var total uint64
		for _, u := range s.Upstreams {
			total += u.Total
		}
		hs := map[netip.AddrPort]health.Status{}
		for _, h := range s.Health {
			hs[h.Addr] = h
		}
		for i, u := range s.Upstreams {
			name, mode, proto, listen, bal := s.Name, s.Mode, s.Protocol, s.Listen, s.Balance
			if i > 0 {
				name, mode, proto, listen, bal = "", "", "", "", ""
			}
			h, since, check, weight := healthColumns(hs, u.Addr, u.Up, u.Weight, now)
			if u.Backup {
				h += " (backup)"
			}
			share := "-"
			if total > 0 {
				share = fmt.Sprintf("%.1f%%", 100*float64(u.Total)/float64(total))
			}
			fmt.Fprintf(tw, "%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%d\t%d\t%d\n", name, mode, proto, listen, bal,
				u.Addr, h, since, check, weight, share, u.Active, u.Total, u.Failures)
		}
	}
	if err := tw.Flush(); err != nil {
		return err
	}
	fmt.Fprintln(e.stdout)
	return nil
}

// healthColumns gives an upstream's HEALTH, SINCE, LAST CHECK and WEIGHT
// cells. With a health tracker the weight is in health.WeightScale units
// (slow start ramps it), printed in the config's units ("0.40" while
// ramping); without one it is the configured weight.
func healthColumns(hs map[netip.AddrPort]health.Status, addr netip.AddrPort, up bool, weight int, now time.Time) (state, since, check, w string) {
	h, ok := hs[addr]
	if !ok {
		return map[bool]string{true: "up", false: "down"}[up], "-", "-", strconv.Itoa(weight)
	}
	state, since, check = h.State.String(), "-", "never"
	if !h.Since.IsZero() && !now.IsZero() {
		since = now.Sub(h.Since).Truncate(time.Second).String()
	}
	if !h.LastCheck.IsZero() {
		check = "ok " + h.LastLatency.Round(10*time.Microsecond).String()
		if !h.LastOK {
			check = "fail: " + h.LastError
		}
	}
	w = strconv.FormatFloat(float64(weight)/health.WeightScale, 'f', -1, 64)
	if weight%health.WeightScale != 0 {
		w = strconv.FormatFloat(float64(weight)/health.WeightScale, 'f', 2, 64)
	}
	return state, since, check, w
}
