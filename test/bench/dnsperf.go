package main

import (
	"bufio"
	"context"
	"fmt"
	"io"
	"math"
	"net/netip"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"time"

	"github.com/lbctl/lbctl/test/topo"
)

// hist is a latency histogram with dnsperf's resolution: 1 µs buckets up
// to 100 ms, then 1 ms buckets up to 10 s, then one overflow bucket.
// Quantiles read from it are exact to the microsecond below 100 ms.
type hist struct {
	fine   []uint64 // [i µs, i+1 µs)
	coarse []uint64 // [100 ms + i ms, 100 ms + (i+1) ms)
	over   uint64   // ≥ 10 s
	n      uint64
	sum    time.Duration
}

const (
	histFine   = 100_000 // µs
	histCoarse = 9_900   // ms after the first 100
)

func newHist() *hist {
	return &hist{fine: make([]uint64, histFine), coarse: make([]uint64, histCoarse)}
}

func (h *hist) add(d time.Duration) {
	if d < 0 {
		d = 0
	}
	h.n++
	h.sum += d
	us := d / time.Microsecond
	switch {
	case us < histFine:
		h.fine[us]++
	case (us-histFine)/1000 < histCoarse:
		h.coarse[(us-histFine)/1000]++
	default:
		h.over++
	}
}

func (h *hist) merge(o *hist) {
	for i, c := range o.fine {
		h.fine[i] += c
	}
	for i, c := range o.coarse {
		h.coarse[i] += c
	}
	h.over += o.over
	h.n += o.n
	h.sum += o.sum
}

// mean is the average latency (0 with no sample).
func (h *hist) mean() time.Duration {
	if h.n == 0 {
		return 0
	}
	return h.sum / time.Duration(h.n)
}

// quantile returns the smallest bucket value v such that at least q of
// the samples are ≤ v's bucket (nearest-rank): 0.99 is the p99.
func (h *hist) quantile(q float64) time.Duration {
	if h.n == 0 {
		return 0
	}
	rank := uint64(math.Ceil(q * float64(h.n)))
	if rank < 1 {
		rank = 1
	}
	var seen uint64
	for i, c := range h.fine {
		if seen += c; seen >= rank {
			return time.Duration(i) * time.Microsecond
		}
	}
	for i, c := range h.coarse {
		if seen += c; seen >= rank {
			return histFine*time.Microsecond + time.Duration(i)*time.Millisecond
		}
	}
	return 10 * time.Second
}

// dnsperfResult is one dnsperf run (or several merged).
type dnsperfResult struct {
	sent, completed, lost uint64
	qps                   float64
	avg                   time.Duration // dnsperf's own "Average Latency"
	lat                   *hist         // from the per-query lines of -v
}

// parseDNSPerf reads dnsperf -v output: one "> RCODE NAME TYPE SECONDS"
// line per answered query (a "> T ..." line per query that timed out),
// then the "Statistics:" summary. The per-query latencies go into a
// histogram; the summary gives qps, sent, completed and lost. It fails
// when the summary is missing or the per-query lines do not add up to
// the completed count (the output was cut or the format changed).
func parseDNSPerf(r io.Reader) (dnsperfResult, error) {
	res := dnsperfResult{lat: newHist()}
	var haveQPS, haveCompleted bool
	sc := bufio.NewScanner(r)
	sc.Buffer(make([]byte, 64*1024), 1024*1024)
	for sc.Scan() {
		line := sc.Text()
		if rest, ok := strings.CutPrefix(line, "> "); ok {
			f := strings.Fields(rest)
			if len(f) == 0 || f[0] == "T" {
				continue // timed out: counted as lost by the summary
			}
			sec, err := strconv.ParseFloat(f[len(f)-1], 64)
			if err != nil {
				return res, fmt.Errorf("parse dnsperf query line %q: %w", line, err)
			}
			res.lat.add(time.Duration(sec * float64(time.Second)))
			continue
		}
		key, val, ok := strings.Cut(strings.TrimSpace(line), ":")
		if !ok {
			continue
		}
		first := func() string {
			if f := strings.Fields(val); len(f) > 0 {
				return f[0]
			}
			return ""
		}
		var err error
		switch key {
		case "Queries sent":
			res.sent, err = strconv.ParseUint(first(), 10, 64)
		case "Queries completed":
			res.completed, err = strconv.ParseUint(first(), 10, 64)
			haveCompleted = err == nil
		case "Queries lost":
			res.lost, err = strconv.ParseUint(first(), 10, 64)
		case "Queries per second":
			res.qps, err = strconv.ParseFloat(first(), 64)
			haveQPS = err == nil
		case "Average Latency (s)":
			var s float64
			s, err = strconv.ParseFloat(first(), 64)
			res.avg = time.Duration(s * float64(time.Second))
		}
		if err != nil {
			return res, fmt.Errorf("parse dnsperf %q: %w", line, err)
		}
	}
	if err := sc.Err(); err != nil {
		return res, fmt.Errorf("read dnsperf output: %w", err)
	}
	if !haveQPS || !haveCompleted {
		return res, fmt.Errorf("parse dnsperf output: no statistics summary (did dnsperf fail? see its output)")
	}
	if res.lat.n != res.completed {
		return res, fmt.Errorf("parse dnsperf output: %d per-query lines for %d completed queries (run dnsperf with -v)", res.lat.n, res.completed)
	}
	return res, nil
}

// mergeDNSPerf adds up parallel runs: query counts and qps add, latencies
// merge into one histogram.
func mergeDNSPerf(rs []dnsperfResult) dnsperfResult {
	m := dnsperfResult{lat: newHist()}
	var avgWeighted float64
	for _, r := range rs {
		m.sent += r.sent
		m.completed += r.completed
		m.lost += r.lost
		m.qps += r.qps
		m.lat.merge(r.lat)
		avgWeighted += float64(r.avg) * float64(r.completed)
	}
	if m.completed > 0 {
		m.avg = time.Duration(avgWeighted / float64(m.completed))
	}
	return m
}

// dnsperfArgs is the dnsperf command line for one run against server.
func dnsperfArgs(server netip.Addr, queryFile string, d time.Duration, clients, outstanding int) []string {
	fam := "inet"
	if server.Is6() {
		fam = "inet6"
	}
	secs := int(math.Ceil(d.Seconds()))
	return []string{
		"-f", fam, "-m", "udp", "-s", server.String(), "-p", "53",
		"-d", queryFile, "-l", strconv.Itoa(secs),
		"-c", strconv.Itoa(clients), "-q", strconv.Itoa(outstanding),
		"-T", "1", "-t", "2", "-v",
	}
}

// queryFile writes the dnsperf input for servers of server's family:
// www.example.com A for IPv4, AAAA for IPv6 (the demo backends answer both).
func (e *env) queryFile(server netip.Addr) (string, error) {
	name, q := "queries-a.txt", "www.example.com A\n"
	if server.Is6() {
		name, q = "queries-aaaa.txt", "www.example.com AAAA\n"
	}
	p := filepath.Join(e.dir, name)
	if err := os.WriteFile(p, []byte(q), 0o644); err != nil {
		return "", fmt.Errorf("write dnsperf queries: %w", err)
	}
	return p, nil
}

// dnsperf runs dnsperf from the client against servers for the run's
// duration and merges the results. One server is the VIP; several are the
// backends (routed floor). Every line runs the same client: dnsProcs
// single-threaded dnsperf processes at once (or one per server, if there
// are more servers), taking the servers in turn, with the load split
// evenly between them. One dnsperf thread tops out at about 45-50k qps
// here, so a line run with fewer processes than another would measure
// dnsperf, not the path.
func (e *env) dnsperf(ctx context.Context, label string, d time.Duration, servers ...netip.Addr) (dnsperfResult, error) {
	qf, err := e.queryFile(servers[0])
	if err != nil {
		return dnsperfResult{}, err
	}
	targets := spread(servers, e.loads.dnsProcs)
	n := len(targets)
	clients := max(1, e.loads.dnsClients/n)
	outstanding := max(1, e.loads.dnsOutstanding/n)
	rs := make([]dnsperfResult, n)
	errs := make([]error, n)
	var wg sync.WaitGroup
	for i, s := range targets {
		wg.Add(1)
		go func() {
			defer wg.Done()
			rs[i], errs[i] = e.runDNSPerf(ctx, fmt.Sprintf("%s-%d", label, i), e.topo.Client, dnsperfArgs(s, qf, d, clients, outstanding))
		}()
	}
	wg.Wait()
	for _, err := range errs {
		if err != nil {
			return dnsperfResult{}, err
		}
	}
	return mergeDNSPerf(rs), nil
}

// runDNSPerf runs dnsperf in h's namespace and parses its output. dnsperf
// writes its -v per-query lines into a file, which is parsed only after it
// has exited: parsing while it runs (one line per answered query, tens of
// thousands a second) took several percent of the machine's CPUs away from
// the path being measured, during the measurement.
func (e *env) runDNSPerf(ctx context.Context, label string, h *topo.Host, args []string) (dnsperfResult, error) {
	cmd := e.command(ctx, h, "dnsperf", args...)
	errLog, err := e.logFile("dnsperf-" + label + ".stderr")
	if err != nil {
		return dnsperfResult{}, err
	}
	defer errLog.Close()
	outPath := filepath.Join(e.dir, "dnsperf-"+label+".out")
	out, err := os.Create(outPath)
	if err != nil {
		return dnsperfResult{}, fmt.Errorf("dnsperf %s: %w", label, err)
	}
	// Hundreds of thousands of per-query lines: needed only until parsed.
	defer os.Remove(outPath)
	defer out.Close()
	cmd.Stderr = errLog
	cmd.Stdout = out
	if err := cmd.Run(); err != nil {
		if ctx.Err() != nil {
			return dnsperfResult{}, ctx.Err()
		}
		return dnsperfResult{}, fmt.Errorf("dnsperf %s: %w (stderr in %s)", label, err, errLog.Name())
	}
	if _, err := out.Seek(0, io.SeekStart); err != nil {
		return dnsperfResult{}, fmt.Errorf("dnsperf %s: %w", label, err)
	}
	res, err := parseDNSPerf(bufio.NewReaderSize(out, 1<<20))
	if err != nil {
		return res, fmt.Errorf("dnsperf %s: %w", label, err)
	}
	return res, nil
}

// dnsLine turns a dnsperf result into a table line.
func dnsLine(path, load string, r dnsperfResult) result {
	note := ""
	if r.sent > 0 && r.lost > 0 {
		note = fmt.Sprintf("%.2f%% lost", 100*float64(r.lost)/float64(r.sent))
	}
	return result{path: path, load: load, value: r.qps, unit: "qps", avg: r.avg, p99: r.lat.quantile(0.99), note: note}
}

// spread returns the target of each of max(procs, len(servers)) client
// processes: the servers in turn.
func spread(servers []netip.Addr, procs int) []netip.Addr {
	out := make([]netip.Addr, max(procs, len(servers)))
	for i := range out {
		out[i] = servers[i%len(servers)]
	}
	return out
}
