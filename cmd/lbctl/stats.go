package main

import (
	"context"
	"encoding/json"
	"fmt"
	"text/tabwriter"

	"github.com/lbctl/lbctl/pkg/dataplane"
)

var statsCmd = command{
	name:    "stats",
	summary: "print per-program and per-rule counters",
	run:     runStats,
}

func runStats(ctx context.Context, e *env, args []string) error {
	fs := newFlags("stats", e.stderr)
	asJSON := fs.Bool("json", false, "print JSON")
	pos, err := parseFlags(fs, args)
	if err != nil {
		return err
	}
	if len(pos) > 0 {
		return usagef("unexpected argument %q (usage: lbctl stats [--json])", pos[0])
	}
	var st dataplane.Stats
	dp, err := openDataplane(e, false, true)
	switch {
	case errorsIsNoState(err):
		st.SNAT, st.SNATRules = []dataplane.Counter{}, []dataplane.RuleStats{}
	case err != nil:
		return err
	default:
		defer dp.Close()
		if st, err = dp.Stats(); err != nil {
			return err
		}
	}
	if *asJSON {
		if st.SNATRules == nil {
			st.SNATRules = []dataplane.RuleStats{}
		}
		enc := json.NewEncoder(e.stdout)
		enc.SetIndent("", "  ")
		return enc.Encode(st)
	}
	tw := tabwriter.NewWriter(e.stdout, 0, 4, 2, ' ', 0)
	fmt.Fprintln(tw, "PROGRAM\tCOUNTER\tPACKETS")
	for _, c := range st.SNAT {
		fmt.Fprintf(tw, "snat\t%s\t%d\n", c.Name, c.Value)
	}
	if err := tw.Flush(); err != nil {
		return err
	}
	fmt.Fprintln(e.stdout)
	tw = tabwriter.NewWriter(e.stdout, 0, 4, 2, ' ', 0)
	fmt.Fprintln(tw, "SNAT RULE\tPROTO\tSPORT\tTO\tPACKETS\tBYTES")
	for _, r := range st.SNATRules {
		to := r.To.String()
		if r.ToPort != 0 {
			to = fmt.Sprintf("%s port %d", r.To, r.ToPort)
		}
		fmt.Fprintf(tw, "%s\t%s\t%s\t%s\t%d\t%d\n", r.Src, r.Proto, portOrAny(r.SPort, "any"), to, r.Packets, r.Bytes)
	}
	return tw.Flush()
}
