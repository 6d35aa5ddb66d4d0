package main

import (
	"bufio"
	"context"
	"fmt"
	"io"
	"math"
	"net/netip"
	"strconv"
	"strings"
	"sync"
	"time"
)

// wrkResult is one wrk run (or several merged).
type wrkResult struct {
	requests uint64
	rps      float64
	avg, p99 time.Duration
	errors   uint64 // socket errors (connect, read, write, timeout) + non-2xx/3xx
}

// parseWrk reads wrk --latency output: "Requests/sec:", the "Latency"
// thread-stats line (average), the 99% line of the latency distribution,
// "N requests in", and the error lines.
func parseWrk(r io.Reader) (wrkResult, error) {
	var res wrkResult
	var haveRPS, haveReqs bool
	sc := bufio.NewScanner(r)
	for sc.Scan() {
		f := strings.Fields(sc.Text())
		if len(f) == 0 {
			continue
		}
		var err error
		switch {
		case f[0] == "Requests/sec:" && len(f) == 2:
			res.rps, err = strconv.ParseFloat(f[1], 64)
			haveRPS = err == nil
		case f[0] == "Latency" && len(f) == 5: // Latency AVG STDEV MAX +/-STDEV
			res.avg, err = parseWrkDuration(f[1])
		case f[0] == "99%" && len(f) == 2:
			res.p99, err = parseWrkDuration(f[1])
		case len(f) >= 3 && f[1] == "requests" && f[2] == "in":
			res.requests, err = strconv.ParseUint(f[0], 10, 64)
			haveReqs = err == nil
		case f[0] == "Socket" && len(f) > 2 && f[1] == "errors:":
			// Socket errors: connect 0, read 12, write 0, timeout 0
			for i := 2; i+1 < len(f); i += 2 {
				n, perr := strconv.ParseUint(strings.TrimSuffix(f[i+1], ","), 10, 64)
				if perr != nil {
					err = perr
					break
				}
				res.errors += n
			}
		case f[0] == "Non-2xx" && len(f) >= 5:
			var n uint64
			n, err = strconv.ParseUint(f[len(f)-1], 10, 64)
			res.errors += n
		}
		if err != nil {
			return res, fmt.Errorf("parse wrk line %q: %w", sc.Text(), err)
		}
	}
	if err := sc.Err(); err != nil {
		return res, fmt.Errorf("read wrk output: %w", err)
	}
	if !haveRPS || !haveReqs {
		return res, fmt.Errorf("parse wrk output: no Requests/sec or request count (did wrk fail? see its output)")
	}
	return res, nil
}

// parseWrkDuration parses wrk's latency values: 523.48us, 1.02ms, 2.00s, 1.5m.
func parseWrkDuration(s string) (time.Duration, error) {
	units := []struct {
		suffix string
		d      time.Duration
	}{{"us", time.Microsecond}, {"ms", time.Millisecond}, {"s", time.Second}, {"m", time.Minute}, {"h", time.Hour}}
	for _, u := range units {
		if v, ok := strings.CutSuffix(s, u.suffix); ok {
			f, err := strconv.ParseFloat(v, 64)
			if err != nil {
				return 0, fmt.Errorf("wrk duration %q: %w", s, err)
			}
			return time.Duration(f * float64(u.d)), nil
		}
	}
	return 0, fmt.Errorf("wrk duration %q: unknown unit", s)
}

// mergeWrk adds up parallel runs: requests and req/s add; the average is
// weighted by requests; the p99 is the highest of the runs' p99s (an upper
// bound: wrk prints percentiles, not its histogram).
func mergeWrk(rs []wrkResult) wrkResult {
	var m wrkResult
	var avgWeighted float64
	for _, r := range rs {
		m.requests += r.requests
		m.rps += r.rps
		m.errors += r.errors
		m.p99 = max(m.p99, r.p99)
		avgWeighted += float64(r.avg) * float64(r.requests)
	}
	if m.requests > 0 {
		m.avg = time.Duration(avgWeighted / float64(m.requests))
	}
	return m
}

// wrkArgs is the wrk command line for one run against url.
func wrkArgs(url string, d time.Duration, threads, conns int, close bool) []string {
	args := []string{"-t", strconv.Itoa(threads), "-c", strconv.Itoa(conns),
		"-d", strconv.Itoa(int(math.Ceil(d.Seconds()))) + "s", "--latency", "--timeout", "2s"}
	if close {
		args = append(args, "-H", "Connection: close")
	}
	return append(args, url)
}

// httpURL is http://ADDR:80/ with IPv6 in brackets.
func httpURL(a netip.Addr) string {
	return "http://" + netip.AddrPortFrom(a, 80).String() + "/"
}

// wrk runs wrk from the client against each server at once, the
// connections split evenly, and merges the results.
func (e *env) wrk(ctx context.Context, label string, d time.Duration, close bool, servers ...netip.Addr) (wrkResult, error) {
	n := len(servers)
	conns := max(1, e.loads.wrkConns/n)
	threads := min(max(1, e.loads.wrkThreads/n), conns)
	rs := make([]wrkResult, n)
	errs := make([]error, n)
	var wg sync.WaitGroup
	for i, s := range servers {
		wg.Add(1)
		go func() {
			defer wg.Done()
			name := fmt.Sprintf("wrk-%s-%d", label, i)
			out, err := e.run(ctx, e.topo.Client, "wrk", wrkArgs(httpURL(s), d, threads, conns, close)...)
			if err != nil {
				errs[i] = err
				return
			}
			if f, ferr := e.logFile(name); ferr == nil {
				_, _ = f.WriteString(out)
				f.Close()
			}
			rs[i], errs[i] = parseWrk(strings.NewReader(out))
		}()
	}
	wg.Wait()
	for _, err := range errs {
		if err != nil {
			return wrkResult{}, err
		}
	}
	return mergeWrk(rs), nil
}

// httpLine turns a wrk result into a table line.
func httpLine(path, load string, r wrkResult) result {
	note := ""
	if r.errors > 0 {
		note = fmt.Sprintf("wrk errors: %d", r.errors)
	}
	return result{path: path, load: load, value: r.rps, unit: "req/s", avg: r.avg, p99: r.p99, note: note}
}
