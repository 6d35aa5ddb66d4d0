package main

import (
	"context"
	"encoding/json"
	"fmt"
	"io"
	"os"
	"text/tabwriter"
	"time"

	"golang.org/x/sys/unix"

	"github.com/lbctl/lbctl/pkg/daemon"
	"github.com/lbctl/lbctl/pkg/dataplane"
)

var statsCmd = command{
	name:    "stats",
	summary: "print per-program and per-rule counters (--watch: every second, with rates)",
	run:     runStats,
}

func runStats(ctx context.Context, e *env, args []string) error {
	fs := newFlags("stats", e.stderr)
	asJSON := fs.Bool("json", false, "print JSON")
	watch := fs.Bool("watch", false, "refresh every --interval with per-second rates, until interrupted")
	interval := fs.Duration("interval", time.Second, "with --watch: time between refreshes")
	count := fs.Int("count", 0, "with --watch: stop after this many refreshes (0: until interrupted)")
	pos, err := parseFlags(fs, args)
	if err != nil {
		return err
	}
	if len(pos) > 0 {
		return usagef("unexpected argument %q (usage: lbctl stats [--json] [--watch])", pos[0])
	}
	if *interval <= 0 {
		return usagef("--interval %s: want a positive duration", *interval)
	}
	if !*watch {
		st, err := readStats(ctx, e)
		if err != nil {
			return err
		}
		if *asJSON {
			return writeJSON(e.stdout, st)
		}
		return printStats(e.stdout, st, nil, 0)
	}
	clear := isTerminal(e.stdout) && !*asJSON
	var prev *snapshot
	var prevAt time.Time
	tick := time.NewTicker(*interval)
	defer tick.Stop()
	for n := 1; ; n++ {
		st, err := readStats(ctx, e)
		if err != nil {
			return err
		}
		now := time.Now()
		elapsed := now.Sub(prevAt)
		if *asJSON {
			if err := json.NewEncoder(e.stdout).Encode(watchJSON{Time: now.UTC(), Stats: st, Rates: rates(prev, st, elapsed)}); err != nil {
				return err
			}
		} else {
			if clear {
				fmt.Fprint(e.stdout, "\033[H\033[2J")
			}
			fmt.Fprintf(e.stdout, "%s (every %s; rates per second)\n", now.Format(time.TimeOnly), *interval)
			if err := printStats(e.stdout, st, prev, elapsed); err != nil {
				return err
			}
			fmt.Fprintln(e.stdout)
		}
		prev, prevAt = &st, now
		if *count > 0 && n >= *count {
			return nil
		}
		select {
		case <-ctx.Done():
			return nil
		case <-tick.C:
		}
	}
}

// snapshot is what stats prints: the BPF counters (top level, as before)
// and, when lbctl run runs for this --bpffs, its services' counters.
type snapshot struct {
	dataplane.Stats
	Services []daemon.ServiceStatus `json:"services,omitempty"`
}

// watchJSON is one refresh of stats --watch --json (one object per line).
type watchJSON struct {
	Time  time.Time          `json:"time"`
	Stats snapshot           `json:"stats"`
	Rates map[string]float64 `json:"rates_per_second,omitempty"` // "program/counter" -> rate
}

func readStats(ctx context.Context, e *env) (snapshot, error) {
	st := dataplane.Stats{SNAT: []dataplane.Counter{}, SNATRules: []dataplane.RuleStats{}}
	var snap snapshot
	if ds, err := daemon.QueryStatus(ctx, daemon.ControlSocket(e.bpffs)); err == nil {
		snap.Services = ds.Services
	}
	dp, err := openReader(e)
	switch {
	case errorsIsNoState(err):
		snap.Stats = st
		return snap, nil
	case err != nil:
		return snap, err
	}
	defer dp.Close()
	if st, err = dp.Stats(); err != nil {
		return snap, err
	}
	if st.SNATRules == nil {
		st.SNATRules = []dataplane.RuleStats{}
	}
	snap.Stats = st
	return snap, nil
}

// rates returns per-second rates of every program counter since prev.
func rates(prev *snapshot, cur snapshot, elapsed time.Duration) map[string]float64 {
	if prev == nil || elapsed <= 0 {
		return nil
	}
	old, now := counterMap(*prev), counterMap(cur)
	out := map[string]float64{}
	for k, v := range now {
		if o, ok := old[k]; ok && v >= o {
			out[k] = float64(v-o) / elapsed.Seconds()
		}
	}
	return out
}

// counterMap flattens the counters that have rates: "program/counter" and
// "service/NAME/accepted|bytes_in|bytes_out".
func counterMap(s snapshot) map[string]uint64 {
	out := map[string]uint64{}
	for _, p := range s.Programs() {
		for _, c := range p.Counters {
			out[p.Name+"/"+c.Name] = c.Value
		}
	}
	for _, sv := range s.Services {
		out["service/"+sv.Name+"/accepted"] = sv.Stats.Accepted
		out["service/"+sv.Name+"/bytes_in"] = sv.Stats.BytesIn
		out["service/"+sv.Name+"/bytes_out"] = sv.Stats.BytesOut
	}
	return out
}

func ruleKey(r dataplane.RuleStats) string { return r.SNATRule.String() }

// printStats prints the tables; with prev, a RATE column (per second).
func printStats(w io.Writer, st snapshot, prev *snapshot, elapsed time.Duration) error {
	rs := rates(prev, st, elapsed)
	if len(st.Services) > 0 {
		tw := tabwriter.NewWriter(w, 0, 4, 2, ' ', 0)
		if prev != nil {
			fmt.Fprintln(tw, "SERVICE\tMODE\tACCEPTED\tACTIVE\tREJECTED\tFAILED\tBYTES IN\tBYTES OUT\tACCEPTED/s\tIN B/s\tOUT B/s")
		} else {
			fmt.Fprintln(tw, "SERVICE\tMODE\tACCEPTED\tACTIVE\tREJECTED\tFAILED\tBYTES IN\tBYTES OUT")
		}
		for _, sv := range st.Services {
			x := sv.Stats
			line := fmt.Sprintf("%s\t%s\t%d\t%d\t%d\t%d\t%d\t%d", sv.Name, sv.Mode, x.Accepted, x.Active, x.Rejected, x.Failed, x.BytesIn, x.BytesOut)
			if prev != nil {
				k := "service/" + sv.Name + "/"
				line += fmt.Sprintf("\t%.1f\t%.0f\t%.0f", rs[k+"accepted"], rs[k+"bytes_in"], rs[k+"bytes_out"])
			}
			fmt.Fprintln(tw, line)
		}
		if err := tw.Flush(); err != nil {
			return err
		}
		fmt.Fprintln(w)
	}
	tw := tabwriter.NewWriter(w, 0, 4, 2, ' ', 0)
	if prev != nil {
		fmt.Fprintln(tw, "PROGRAM\tCOUNTER\tPACKETS\tRATE/s")
	} else {
		fmt.Fprintln(tw, "PROGRAM\tCOUNTER\tPACKETS")
	}
	for _, p := range st.Programs() {
		for _, c := range p.Counters {
			if prev != nil {
				fmt.Fprintf(tw, "%s\t%s\t%d\t%.1f\n", p.Name, c.Name, c.Value, rs[p.Name+"/"+c.Name])
			} else {
				fmt.Fprintf(tw, "%s\t%s\t%d\n", p.Name, c.Name, c.Value)
			}
		}
	}
	for _, c := range st.Steer {
		fmt.Fprintf(tw, "steer\t%s\t%d\n", c.Name, c.Value)
	}
	if err := tw.Flush(); err != nil {
		return err
	}
	fmt.Fprintln(w)
	oldRules := map[string]dataplane.RuleStats{}
	if prev != nil {
		for _, r := range prev.SNATRules {
			oldRules[ruleKey(r)] = r
		}
	}
	tw = tabwriter.NewWriter(w, 0, 4, 2, ' ', 0)
	if prev != nil {
		fmt.Fprintln(tw, "SNAT RULE\tPROTO\tSPORT\tTO\tPACKETS\tBYTES\tPKT/s\tBYTE/s")
	} else {
		fmt.Fprintln(tw, "SNAT RULE\tPROTO\tSPORT\tTO\tPACKETS\tBYTES")
	}
	for _, r := range st.SNATRules {
		to := r.To.String()
		if r.ToPort != 0 {
			to = fmt.Sprintf("%s port %d", r.To, r.ToPort)
		}
		line := fmt.Sprintf("%s\t%s\t%s\t%s\t%d\t%d", r.Src, r.Proto, portOrAny(r.SPort, "any"), to, r.Packets, r.Bytes)
		if prev != nil {
			var pr, br float64
			if o, ok := oldRules[ruleKey(r)]; ok && elapsed > 0 && r.Packets >= o.Packets && r.Bytes >= o.Bytes {
				pr = float64(r.Packets-o.Packets) / elapsed.Seconds()
				br = float64(r.Bytes-o.Bytes) / elapsed.Seconds()
			}
			line += fmt.Sprintf("\t%.1f\t%.0f", pr, br)
		}
		fmt.Fprintln(tw, line)
	}
	return tw.Flush()
}

func writeJSON(w io.Writer, v any) error {
	enc := json.NewEncoder(w)
	enc.SetIndent("", "  ")
	return enc.Encode(v)
}

func isTerminal(w io.Writer) bool {
	f, ok := w.(*os.File)
	if !ok {
		return false
	}
	_, err := unix.IoctlGetTermios(int(f.Fd()), unix.TCGETS)
	return err == nil
}
