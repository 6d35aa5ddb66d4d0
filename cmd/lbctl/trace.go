package main

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"net/netip"
	"os"
	"time"

	"golang.org/x/sys/unix"

	"github.com/lbctl/lbctl/pkg/dataplane"
)

var traceCmd = command{
	name:    "trace",
	summary: "print per-packet decisions of the attached BPF programs until interrupted (tracing variants swapped in meanwhile)",
	run:     runTrace,
}

// why explains a decision in the line lbctl trace prints.
var why = map[string]string{
	"rewritten":  "rewritten",
	"no_rule":    "no rule matches: passed unchanged",
	"not_parsed": "not IPv4/IPv6 UDP/TCP (or truncated): passed unchanged",
	"error":      "a helper failed while rewriting: passed",
	"no_socket":  "no socket to deliver to: passed",
	"fib_miss":   "no route or neighbour: passed to the stack",
	"steered":    "delivered to the local socket",
	"dropped":    "dropped",
	"passed":     "passed to the stack unchanged (fragment or unsupported header)",
}

func runTrace(ctx context.Context, e *env, args []string) error {
	fs := newFlags("trace", e.stderr)
	addr := fs.String("addr", "", "only packets from or to this address")
	port := fs.Uint("port", 0, "only packets from or to this port")
	count := fs.Int("count", 0, "stop after this many events (0: until interrupted)")
	asJSON := fs.Bool("json", false, "print one JSON object per event")
	fs.Usage = func() {
		fmt.Fprintln(e.stderr, "usage: lbctl trace [--addr ADDR] [--port PORT] [--count N] [--json]")
		fs.PrintDefaults()
	}
	pos, err := parseFlags(fs, args)
	if err != nil {
		return err
	}
	if len(pos) > 0 {
		return usagef("unexpected argument %q (usage: lbctl trace [--addr ADDR] [--port PORT])", pos[0])
	}
	var f dataplane.TraceFilter
	if *addr != "" {
		if f.Addr, err = netip.ParseAddr(*addr); err != nil {
			return usagef("--addr %q: want an address like 198.18.99.1", *addr)
		}
	}
	if *port > 65535 {
		return usagef("--port %d: want 1 to 65535", *port)
	}
	f.Port = uint16(*port)
	// Without the state lock: other lbctl commands (snat add while
	// tracing) and a running daemon must not wait for the trace to end.
	dp, err := dataplane.Open(dataplane.Options{Root: e.bpffs, Log: e.log, ClsBPF: clsNetconf{}, NoCreate: true, ReadOnly: true})
	if errorsIsNoState(err) {
		return fmt.Errorf("trace: %w", dataplane.ErrNothingToTrace)
	}
	if err != nil {
		return err
	}
	tr, err := dp.StartTrace(f)
	if err != nil {
		dp.Close()
		return fmt.Errorf("trace: %w", err)
	}
	defer dp.Close()
	defer func() {
		if err := tr.Close(); err != nil {
			e.log.Error("trace: restore the original programs: " + err.Error())
		}
	}()
	for _, a := range tr.Attachments() {
		e.log.Info(fmt.Sprintf("tracing %s on %s (%s); the normal program comes back on exit", a.Program, a.Interface, a.Method))
	}
	boot := monotonicToWall()
	enc := json.NewEncoder(e.stdout)
	for n := 0; *count == 0 || n < *count; {
		if ctx.Err() != nil {
			return nil
		}
		tr.SetDeadline(time.Now().Add(200 * time.Millisecond))
		ev, err := tr.Read()
		switch {
		case errors.Is(err, os.ErrDeadlineExceeded):
			continue
		case errors.Is(err, dataplane.ErrTraceClosed):
			return nil
		case err != nil:
			return fmt.Errorf("trace: %w", err)
		}
		n++
		if *asJSON {
			if err := enc.Encode(ev); err != nil {
				return err
			}
			continue
		}
		fmt.Fprintln(e.stdout, traceLine(boot.Add(ev.Time), ev))
	}
	return nil
}

// traceLine: TIME PROGRAM IFACE PROTO SRC -> DST: DECISION [NEW] (len N)
func traceLine(at time.Time, ev dataplane.TraceEvent) string {
	s := fmt.Sprintf("%s %-6s %-6s", at.Format("15:04:05.000000"), ev.Program, ev.Interface)
	if ev.Src.IsValid() {
		s += fmt.Sprintf(" %s %s -> %s", ev.Proto, ev.Src, ev.Dst)
	}
	w := why[ev.Decision]
	if w == "" {
		w = ev.Decision
	}
	s += ": " + w
	if ev.New.IsValid() {
		switch ev.Program {
		case "snat":
			s += " source to " + ev.New.String()
		default:
			s += " destination to " + ev.New.String()
		}
	}
	return s + fmt.Sprintf(" (len %d)", ev.Len)
}

// monotonicToWall returns the wall time at which CLOCK_MONOTONIC was 0, to
// date events stamped with bpf_ktime_get_ns.
func monotonicToWall() time.Time {
	var ts unix.Timespec
	if err := unix.ClockGettime(unix.CLOCK_MONOTONIC, &ts); err != nil {
		return time.Time{}
	}
	return time.Now().Add(-time.Duration(ts.Nano()))
}
