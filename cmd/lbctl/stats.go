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
		st, err := readStats(e)
		if err != nil {
			return err
		}
		if *asJSON {
			return writeJSON(e.stdout, st)
		}
		return printStats(e.stdout, st, nil, 0)
	}
	clear := isTerminal(e.stdout) && !*asJSON
	var prev *dataplane.Stats
	var prevAt time.Time
	tick := time.NewTicker(*interval)
	defer tick.Stop()
	for n := 1; ; n++ {
		st, err := readStats(e)
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

// watchJSON is one refresh of stats --watch --json (one object per line).
type watchJSON struct {
	Time  time.Time          `json:"time"`
	Stats dataplane.Stats    `json:"stats"`
	Rates map[string]float64 `json:"rates_per_second,omitempty"` // "program/counter" -> rate
}

func readStats(e *env) (dataplane.Stats, error) {
	st := dataplane.Stats{SNAT: []dataplane.Counter{}, SNATRules: []dataplane.RuleStats{}}
	dp, err := openReader(e)
	switch {
	case errorsIsNoState(err):
		return st, nil
	case err != nil:
		return st, err
	}
	defer dp.Close()
	if st, err = dp.Stats(); err != nil {
		return st, err
	}
	if st.SNATRules == nil {
		st.SNATRules = []dataplane.RuleStats{}
	}
	return st, nil
}

// rates returns per-second rates of every program counter since prev.
func rates(prev *dataplane.Stats, cur dataplane.Stats, elapsed time.Duration) map[string]float64 {
	if prev == nil || elapsed <= 0 {
		return nil
	}
	old := map[string]uint64{}
	for _, p := range prev.Programs() {
		for _, c := range p.Counters {
			old[p.Name+"/"+c.Name] = c.Value
		}
	}
	out := map[string]float64{}
	for _, p := range cur.Programs() {
		for _, c := range p.Counters {
			k := p.Name + "/" + c.Name
			if o, ok := old[k]; ok && c.Value >= o {
				out[k] = float64(c.Value-o) / elapsed.Seconds()
			}
		}
	}
	return out
}

func ruleKey(r dataplane.RuleStats) string { return r.SNATRule.String() }

// printStats prints the tables; with prev, a RATE column (per second).
func printStats(w io.Writer, st dataplane.Stats, prev *dataplane.Stats, elapsed time.Duration) error {
	rs := rates(prev, st, elapsed)
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
