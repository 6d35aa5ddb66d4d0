package main

import (
	"context"
	"errors"
	"net/netip"
	"strings"
	"time"
)

// warmup is the load run before each line and not counted.
const warmup = time.Second

// step measures one line of the table; a nil step (a load left out by
// -loads) is skipped.
type step func(ctx context.Context) (result, error)

// wantLoad reports whether -loads selects load.
func (e *env) wantLoad(load string) bool { return e.lines == nil || e.lines.MatchString(load) }

// measureLines runs the steps in order. A step that fails is reported in
// the returned error and the next one still runs; a cancelled context
// stops the rest.
func measureLines(ctx context.Context, steps ...step) ([]result, error) {
	var out []result
	var errs []error
	for _, s := range steps {
		if s == nil {
			continue
		}
		if ctx.Err() != nil {
			return out, ctx.Err()
		}
		r, err := s(ctx)
		if err != nil {
			errs = append(errs, err)
			continue
		}
		out = append(out, r)
	}
	return out, errors.Join(errs...)
}

// slug turns a path and load into a file-name part: "lbctl-proxy-dns-udp4".
func slug(parts ...string) string {
	s := strings.ToLower(strings.Join(parts, "-"))
	return strings.Trim(strings.Map(func(r rune) rune {
		if r >= 'a' && r <= 'z' || r >= '0' && r <= '9' {
			return r
		}
		return '-'
	}, s), "-")
}

// dnsStep runs dnsperf against servers (split evenly) as line (path, load).
func (e *env) dnsStep(path, load string, servers ...netip.Addr) step {
	if !e.wantLoad(load) {
		return nil
	}
	return func(ctx context.Context) (result, error) {
		// Warm-up, not counted: neighbour entries, sessions, caches.
		_, _ = e.dnsperf(ctx, slug(path, load, "warmup"), warmup, servers...)
		r, err := e.dnsperf(ctx, slug(path, load), e.duration, servers...)
		if err != nil {
			return result{}, err
		}
		return dnsLine(path, load, r), nil
	}
}

// httpStep runs wrk against servers as line (path, load); close sends
// Connection: close, so every request is a new TCP connection.
func (e *env) httpStep(path, load string, close bool, servers ...netip.Addr) step {
	if !e.wantLoad(load) {
		return nil
	}
	return func(ctx context.Context) (result, error) {
		_, _ = e.wrk(ctx, slug(path, load, "warmup"), warmup, close, servers...)
		r, err := e.wrk(ctx, slug(path, load), e.duration, close, servers...)
		if err != nil {
			return result{}, err
		}
		return httpLine(path, load, r), nil
	}
}
