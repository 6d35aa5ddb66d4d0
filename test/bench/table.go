package main

import (
	"fmt"
	"io"
	"strconv"
	"strings"
	"time"
)

// The paths (what the load goes through) and loads of the table. Ratios
// refer to lines by these names.
const (
	pRouted      = "routed, no proxy"
	pNginx       = "nginx proxy"
	pNginxTransp = "nginx transparent"
	pProxy       = "lbctl proxy"
	pTransparent = "lbctl transparent"
	pDSRRouter   = "lbctl dsr router-NAT"
	pDSROrigin   = "lbctl dsr origin-NAT"
	pXDPNative   = "lbctl xdp native"
	pXDPGeneric  = "lbctl xdp generic"
	lDNS4        = "DNS udp4"
	lDNS6        = "DNS udp6"
	lHTTPKeep    = "HTTP keep-alive"
	lHTTPNew     = "HTTP new conn"
	unitNsPacket = "ns/packet"
	pEmptyTC     = "empty TC program"
	pEmptyXDP    = "empty XDP program"
)

// result is one line of the table.
type result struct {
	path  string  // what the load went through
	load  string  // what was measured
	value float64 // qps, req/s or ns/packet
	unit  string
	avg   time.Duration // 0 = not measured
	p99   time.Duration
	note  string
	// vsEmpty is a BPF line's ns/packet over the empty program's,
	// both measured by the same benchmark (its x-empty metric).
	vsEmpty float64
}

// ratio compares the line (load, num) to the line (load, den). A target
// of 0 is informational; atMost is for costs (ns/packet), where lower is better.
type ratio struct {
	load     string
	num, den string
	target   float64
	atMost   bool
	issue    int
}

// ratios are the comparisons the issues ask for.
func ratios() []ratio {
	var rs []ratio
	add := func(loads []string, num, den string, target float64, issue int) {
		for _, l := range loads {
			rs = append(rs, ratio{load: l, num: num, den: den, target: target, issue: issue})
		}
	}
	dns := []string{lDNS4, lDNS6}
	http := []string{lHTTPKeep, lHTTPNew}
	// Issue 3: lbctl proxy ≥ 1.0x nginx on every line.
	add(append(dns, http...), pProxy, pNginx, 1.0, 3)
	add(append(dns, http...), pProxy, pRouted, 0, 3)
	add(append(dns, http...), pNginx, pRouted, 0, 3)
	// Issue 4: transparent.
	add([]string{lHTTPKeep}, pTransparent, pNginxTransp, 1.2, 4)
	add([]string{lHTTPNew}, pTransparent, pNginxTransp, 10, 4)
	add([]string{lHTTPNew}, pTransparent, pProxy, 0.8, 4)
	add([]string{lDNS4}, pTransparent, pNginxTransp, 0, 4)
	add(append([]string{lDNS4}, http...), pNginxTransp, pNginx, 0, 4)
	// Issue 5: DSR ≥ 2x nginx and ≥ 0.7x the routed floor.
	for _, p := range []string{pDSRRouter, pDSROrigin} {
		add(dns, p, pNginx, 2, 5)
		add(dns, p, pRouted, 0.7, 5)
	}
	// Issue 7: XDP ≥ 5x nginx and ≥ 0.95x routed on DNS, ≥ 0.9x routed on TCP.
	for _, p := range []string{pXDPNative, pXDPGeneric} {
		add(dns, p, pNginx, 5, 7)
		add(dns, p, pRouted, 0.95, 7)
		add(http, p, pRouted, 0.9, 7)
	}
	return rs
}

// bpfRatio is the cost of a BPF program line against its empty baseline.
// Issue 2: snat hit path ≤ 2x the empty TC program; issue 7: xdp_lb ≤ 3x
// the empty XDP program.
func bpfRatio(r result) (den string, target float64, issue int) {
	switch {
	case strings.HasPrefix(r.path, "snat"):
		t := 0.0
		if strings.Contains(r.path, "hit") {
			t = 2
		}
		return pEmptyTC, t, 2
	case strings.HasPrefix(r.path, "steer"):
		return pEmptyTC, 0, 4
	case strings.HasPrefix(r.path, "xdp_lb"):
		return pEmptyXDP, 3, 7
	}
	return "", 0, 0
}

// ratioCell is "1.23x nginx proxy (target ≥1x: met)".
func ratioCell(v float64, den string, target float64, atMost bool) string {
	s := fmt.Sprintf("%.2fx %s", v, den)
	if target == 0 {
		return s
	}
	op, met := "≥", v >= target
	if atMost {
		op, met = "≤", v <= target
	}
	verdict := "met"
	if !met {
		verdict = "NOT met"
	}
	return fmt.Sprintf("%s (target %s%gx: %s)", s, op, target, verdict)
}

// ratioCells computes, for every line, the ratios where it is the numerator.
func ratioCells(rs []result) map[int][]string {
	find := func(path, load string) (result, bool) {
		for _, r := range rs {
			if r.path == path && r.load == load && r.value > 0 {
				return r, true
			}
		}
		return result{}, false
	}
	cells := map[int][]string{}
	for i, r := range rs {
		if r.value <= 0 {
			continue
		}
		if r.unit == unitNsPacket {
			if den, target, _ := bpfRatio(r); den != "" && r.vsEmpty > 0 {
				cells[i] = append(cells[i], ratioCell(r.vsEmpty, den, target, true))
			}
			continue
		}
		for _, q := range ratios() {
			if q.num != r.path || q.load != r.load {
				continue
			}
			if d, ok := find(q.den, q.load); ok {
				cells[i] = append(cells[i], ratioCell(r.value/d.value, q.den, q.target, q.atMost))
			}
		}
	}
	return cells
}

// header is what the table says about the run it came from.
type header struct {
	date     time.Time
	duration time.Duration
	loadBefore,
	loadAfter string // /proc/loadavg
	kernel string
	cpus   int
	notes  []string
}

// writeTable prints the run's header, the traffic table and the BPF table
// as Markdown (readable in a terminal, pasteable into the README).
func writeTable(w io.Writer, h header, rs []result) {
	fmt.Fprintf(w, "lbctl benchmark, %s, kernel %s, %d CPUs, %s per line\n",
		h.date.UTC().Format("2006-01-02 15:04 MST"), h.kernel, h.cpus, h.duration)
	fmt.Fprintf(w, "load average before: %s, after: %s", h.loadBefore, h.loadAfter)
	if loaded(h.loadBefore, h.cpus) {
		fmt.Fprintf(w, " — MEASURED UNDER LOAD (other work shared the CPUs): compare lines of this run with each other only")
	}
	fmt.Fprintln(w)
	cells := ratioCells(rs)
	var traffic bool
	for i, r := range rs {
		if r.unit == unitNsPacket {
			continue
		}
		if !traffic {
			fmt.Fprintln(w)
			fmt.Fprintln(w, "| load | path | rate | avg | p99 | ratios | note |")
			fmt.Fprintln(w, "| --- | --- | ---: | ---: | ---: | --- | --- |")
			traffic = true
		}
		fmt.Fprintf(w, "| %s | %s | %s %s | %s | %s | %s | %s |\n", r.load, r.path, fmtRate(r.value), r.unit,
			fmtLatency(r.avg), fmtLatency(r.p99), strings.Join(cells[i], "; "), r.note)
	}
	var bpf bool
	for i, r := range rs {
		if r.unit != unitNsPacket {
			continue
		}
		if !bpf {
			fmt.Fprintln(w)
			fmt.Fprintln(w, "| benchmark (BPF_PROG_TEST_RUN) | program, path | ns/packet | ratio | note |")
			fmt.Fprintln(w, "| --- | --- | ---: | --- | --- |")
			bpf = true
		}
		fmt.Fprintf(w, "| %s | %s | %.1f | %s | %s |\n", r.load, r.path, r.value, strings.Join(cells[i], "; "), r.note)
	}
	if len(h.notes) > 0 {
		fmt.Fprintln(w)
		for _, n := range h.notes {
			fmt.Fprintf(w, "- %s\n", n)
		}
	}
}

// loaded reports whether the 1-minute load average exceeds half the CPUs
// (before the benchmark's own load: other work was running).
func loaded(loadavg string, cpus int) bool {
	f := strings.Fields(loadavg)
	if len(f) == 0 || cpus <= 0 {
		return false
	}
	v, err := strconv.ParseFloat(f[0], 64)
	return err == nil && v > float64(cpus)/2
}

func fmtRate(v float64) string {
	switch {
	case v >= 100:
		return strconv.FormatFloat(v, 'f', 0, 64)
	default:
		return strconv.FormatFloat(v, 'f', 1, 64)
	}
}

func fmtLatency(d time.Duration) string {
	switch {
	case d == 0:
		return "–"
	case d < time.Millisecond:
		return fmt.Sprintf("%d µs", d.Microseconds())
	default:
		return fmt.Sprintf("%.2f ms", float64(d)/float64(time.Millisecond))
	}
}
