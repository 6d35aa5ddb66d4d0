package main

import (
	"bufio"
	"fmt"
	"io"
	"regexp"
	"sort"
	"strconv"
	"strings"
)

// benchSample is one line of `go test -bench` output: the benchmark's
// name (without the -GOMAXPROCS suffix) and its metrics by unit.
type benchSample struct {
	name    string
	metrics map[string]float64
}

var benchLine = regexp.MustCompile(`^(Benchmark\S+?)(?:-\d+)?\s+(\d+)\s+(.+)$`)

// parseGoBench reads `go test -bench` output and returns every result
// line, in order. Other lines (goos, PASS, logs) are skipped.
func parseGoBench(r io.Reader) ([]benchSample, error) {
	var out []benchSample
	sc := bufio.NewScanner(r)
	for sc.Scan() {
		m := benchLine.FindStringSubmatch(strings.TrimSpace(sc.Text()))
		if m == nil {
			continue
		}
		f := strings.Fields(m[3])
		if len(f)%2 != 0 {
			return nil, fmt.Errorf("parse benchmark line %q: metrics are not value-unit pairs", sc.Text())
		}
		s := benchSample{name: m[1], metrics: map[string]float64{}}
		for i := 0; i < len(f); i += 2 {
			v, err := strconv.ParseFloat(f[i], 64)
			if err != nil {
				return nil, fmt.Errorf("parse benchmark line %q: %w", sc.Text(), err)
			}
			s.metrics[f[i+1]] = v
		}
		out = append(out, s)
	}
	if err := sc.Err(); err != nil {
		return nil, fmt.Errorf("read benchmark output: %w", err)
	}
	return out, nil
}

// median of vs (vs is reordered).
func median(vs []float64) float64 {
	if len(vs) == 0 {
		return 0
	}
	sort.Float64s(vs)
	if len(vs)%2 == 1 {
		return vs[len(vs)/2]
	}
	return (vs[len(vs)/2-1] + vs[len(vs)/2]) / 2
}

// bpfResults turns the ns/packet benchmarks of pkg/dataplane into table
// lines: the median over -count runs of ns/packet and of x-empty (the
// benchmark's own ratio to the empty program measured in the same run).
// Names map to programs: BenchmarkSNAT/hit/rules=1 is "snat hit/rules=1",
// BenchmarkSNAT/empty the empty TC program, BenchmarkXDP.../empty the
// empty XDP program.
func bpfResults(samples []benchSample) []result {
	type acc struct{ ns, x []float64 }
	byName := map[string]*acc{}
	var order []string
	for _, s := range samples {
		ns, ok := s.metrics[unitNsPacket]
		if !ok {
			continue
		}
		a := byName[s.name]
		if a == nil {
			a = &acc{}
			byName[s.name] = a
			order = append(order, s.name)
		}
		a.ns = append(a.ns, ns)
		if x, ok := s.metrics["x-empty"]; ok {
			a.x = append(a.x, x)
		}
	}
	var out []result
	for _, name := range order {
		a := byName[name]
		top, sub, _ := strings.Cut(strings.TrimPrefix(name, "Benchmark"), "/")
		prog := strings.ToLower(top)
		if strings.HasPrefix(prog, "xdp") {
			prog = "xdp_lb"
		}
		r := result{load: "Benchmark" + top, value: median(a.ns), unit: unitNsPacket}
		switch {
		case sub == "empty" && prog == "xdp_lb":
			r.path = pEmptyXDP
		case sub == "empty":
			r.path = pEmptyTC
		default:
			r.path = strings.TrimSpace(prog + " " + sub)
		}
		if len(a.x) > 0 {
			r.vsEmpty = median(a.x)
		}
		r.note = fmt.Sprintf("median of %d", len(a.ns))
		out = append(out, r)
	}
	return out
}
