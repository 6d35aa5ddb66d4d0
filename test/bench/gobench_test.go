package main

import (
	"math"
	"os"
	"strings"
	"testing"
)

// testdata/gobench.txt is a real capture of pkg/dataplane's test binary
// running BenchmarkSNAT and BenchmarkSteer with -test.count 2.
func TestParseGoBenchCapture(t *testing.T) {
	f, err := os.Open("testdata/gobench.txt")
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	samples, err := parseGoBench(f)
	if err != nil {
		t.Fatal(err)
	}
	if len(samples) != 18 {
		t.Fatalf("%d samples, want 18", len(samples))
	}
	if s := samples[2]; s.name != "BenchmarkSNAT/hit/rules=1" || s.metrics["ns/packet"] != 34.83 || s.metrics["x-empty"] != 0.7805 {
		t.Errorf("third sample %+v", s)
	}
	rs := bpfResults(samples)
	byPath := map[string]result{}
	for _, r := range rs {
		byPath[r.path] = r
	}
	if len(rs) != 9 || len(byPath) != 9 {
		t.Fatalf("%d lines (%d paths), want 9: %+v", len(rs), len(byPath), rs)
	}
	near := func(a, b float64) bool { return math.Abs(a-b) < 1e-9 }
	empty := byPath[pEmptyTC]
	if !near(empty.value, (15.49+44.62)/2) || empty.vsEmpty != 0 || empty.load != "BenchmarkSNAT" {
		t.Errorf("empty line %+v", empty)
	}
	hit := byPath["snat hit/rules=1"]
	if !near(hit.value, (34.83+46.96)/2) || !near(hit.vsEmpty, (0.7805+1.052)/2) || hit.unit != unitNsPacket || hit.note != "median of 2" {
		t.Errorf("snat hit line %+v", hit)
	}
	if st := byPath["steer hit/check=on"]; st.load != "BenchmarkSteer" || !near(st.value, (101.6+117.7)/2) {
		t.Errorf("steer line %+v", st)
	}
}

func TestParseGoBenchBadLine(t *testing.T) {
	if _, err := parseGoBench(strings.NewReader("BenchmarkX-2  10  1.5 ns/op 7\n")); err == nil {
		t.Error("odd metric fields accepted")
	}
	if _, err := parseGoBench(strings.NewReader("BenchmarkX-2  10  1.5x ns/op\n")); err == nil {
		t.Error("bad value accepted")
	}
}

func TestBPFResultsXDPNames(t *testing.T) {
	rs := bpfResults([]benchSample{
		{name: "BenchmarkXDPLB/empty", metrics: map[string]float64{"ns/packet": 10}},
		{name: "BenchmarkXDPLB/hit/udp4", metrics: map[string]float64{"ns/packet": 25, "x-empty": 2.5}},
		{name: "BenchmarkPick", metrics: map[string]float64{"ns/op": 3}},
	})
	if len(rs) != 2 || rs[0].path != pEmptyXDP || rs[1].path != "xdp_lb hit/udp4" {
		t.Fatalf("lines %+v", rs)
	}
	cells := ratioCells(rs)
	if got := strings.Join(cells[1], ";"); got != "2.50x empty XDP program (target ≤3x: met)" {
		t.Errorf("xdp ratio %q", got)
	}
}

func TestMedian(t *testing.T) {
	for _, c := range []struct {
		in   []float64
		want float64
	}{{nil, 0}, {[]float64{3}, 3}, {[]float64{5, 1, 3}, 3}, {[]float64{4, 1, 3, 2}, 2.5}} {
		if got := median(c.in); got != c.want {
			t.Errorf("median(%v) = %v, want %v", c.in, got, c.want)
		}
	}
}
