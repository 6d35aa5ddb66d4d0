package main

import (
	"net/netip"
	"os"
	"slices"
	"strings"
	"testing"
	"time"
)

// testdata/dnsperf-v.txt is a real capture: dnsperf 2.10 -v, 12 queries
// (-n 1) against the demo backend.
func TestParseDNSPerfCapture(t *testing.T) {
	f, err := os.Open("testdata/dnsperf-v.txt")
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	r, err := parseDNSPerf(f)
	if err != nil {
		t.Fatal(err)
	}
	if r.sent != 12 || r.completed != 12 || r.lost != 0 {
		t.Errorf("sent/completed/lost = %d/%d/%d, want 12/12/0", r.sent, r.completed, r.lost)
	}
	if r.qps != 248.787163 {
		t.Errorf("qps = %v, want 248.787163", r.qps)
	}
	if r.avg != 17084*time.Microsecond {
		t.Errorf("avg = %v, want 17.084ms (the summary's)", r.avg)
	}
	// Sorted latencies (µs): 14935 14940 15092 15101 15288 15395 15448
	// 16380 16435 18319 19223 28463. Nearest rank: p50 = 6th, p99 = 12th.
	if got := r.lat.quantile(0.5); got != 15395*time.Microsecond {
		t.Errorf("p50 = %v, want 15.395ms", got)
	}
	if got := r.lat.quantile(0.99); got != 28463*time.Microsecond {
		t.Errorf("p99 = %v, want 28.463ms", got)
	}
	// The histogram's own mean agrees with dnsperf's average (µs rounding).
	if d := r.lat.mean() - r.avg; d < -time.Microsecond || d > time.Microsecond {
		t.Errorf("histogram mean %v, dnsperf average %v", r.lat.mean(), r.avg)
	}
}

const dnsperfSummary = `
Statistics:

  Queries sent:         %SENT%
  Queries completed:    %DONE% (66.67%)
  Queries lost:         %LOST% (33.33%)

  Run time (s):         1.000000
  Queries per second:   2.000000

  Average Latency (s):  0.000150 (min 0.000100, max 0.000200)
`

func summary(sent, done, lost string) string {
	return strings.NewReplacer("%SENT%", sent, "%DONE%", done, "%LOST%", lost).Replace(dnsperfSummary)
}

func TestParseDNSPerfTimeouts(t *testing.T) {
	out := "> NOERROR www.example.com A 0.000100\n> T www.example.com A\n> NOERROR www.example.com A 0.000200\n" + summary("3", "2", "1")
	r, err := parseDNSPerf(strings.NewReader(out))
	if err != nil {
		t.Fatal(err)
	}
	if r.lat.n != 2 || r.lost != 1 || r.qps != 2 {
		t.Errorf("samples %d, lost %d, qps %v: want 2, 1, 2", r.lat.n, r.lost, r.qps)
	}
	if got := r.lat.quantile(0.99); got != 200*time.Microsecond {
		t.Errorf("p99 = %v, want 200µs", got)
	}
}

func TestParseDNSPerfErrors(t *testing.T) {
	for name, out := range map[string]string{
		"no summary":           "> NOERROR www.example.com A 0.000100\n",
		"lines short of count": "> NOERROR www.example.com A 0.000100\n" + summary("3", "2", "1"),
		"bad latency":          "> NOERROR www.example.com A 0.0x1\n" + summary("1", "1", "0"),
		"bad count":            summary("three", "2", "1"),
		"empty":                "",
	} {
		if _, err := parseDNSPerf(strings.NewReader(out)); err == nil {
			t.Errorf("%s: no error", name)
		}
	}
}

func TestHistQuantiles(t *testing.T) {
	h := newHist()
	for i := 1; i <= 1000; i++ {
		h.add(time.Duration(i) * time.Microsecond)
	}
	for _, c := range []struct {
		q    float64
		want time.Duration
	}{{0.5, 500 * time.Microsecond}, {0.99, 990 * time.Microsecond}, {1, 1000 * time.Microsecond}, {0.0001, time.Microsecond}} {
		if got := h.quantile(c.q); got != c.want {
			t.Errorf("q%v = %v, want %v", c.q, got, c.want)
		}
	}
	// Beyond the fine range: 1 ms buckets, then the overflow bucket.
	h2 := newHist()
	h2.add(150*time.Millisecond + 300*time.Microsecond)
	if got := h2.quantile(0.99); got != 150*time.Millisecond {
		t.Errorf("coarse p99 = %v, want 150ms", got)
	}
	h2.add(30 * time.Second)
	h2.add(40 * time.Second)
	if got := h2.quantile(0.99); got != 10*time.Second {
		t.Errorf("overflow p99 = %v, want 10s", got)
	}
	if got := newHist().quantile(0.99); got != 0 {
		t.Errorf("empty p99 = %v, want 0", got)
	}
}

func TestMergeDNSPerf(t *testing.T) {
	a := dnsperfResult{sent: 10, completed: 10, qps: 100, avg: 100 * time.Microsecond, lat: newHist()}
	b := dnsperfResult{sent: 35, completed: 30, lost: 5, qps: 300, avg: 200 * time.Microsecond, lat: newHist()}
	for range 10 {
		a.lat.add(100 * time.Microsecond)
	}
	for range 30 {
		b.lat.add(200 * time.Microsecond)
	}
	m := mergeDNSPerf([]dnsperfResult{a, b})
	if m.qps != 400 || m.sent != 45 || m.completed != 40 || m.lost != 5 || m.lat.n != 40 {
		t.Errorf("merged %+v", m)
	}
	if m.avg != 175*time.Microsecond {
		t.Errorf("avg = %v, want 175µs (weighted by completed)", m.avg)
	}
	if got := m.lat.quantile(0.25); got != 100*time.Microsecond {
		t.Errorf("p25 = %v, want 100µs", got)
	}
	if l := dnsLine(pRouted, lDNS4, m); l.note != "11.11% lost" || l.p99 != 200*time.Microsecond {
		t.Errorf("line %+v", l)
	}
}

func TestDNSPerfArgs(t *testing.T) {
	got := strings.Join(dnsperfArgs(mustAddr("2001:db8:98::10"), "/q", 1500*time.Millisecond, 4, 16), " ")
	want := "-f inet6 -m udp -s 2001:db8:98::10 -p 53 -d /q -l 2 -c 4 -q 16 -T 1 -t 2 -v"
	if got != want {
		t.Errorf("args\n got %s\nwant %s", got, want)
	}
}

func TestSpread(t *testing.T) {
	vip := mustAddr("198.18.98.10")
	b := []netip.Addr{mustAddr("198.18.2.11"), mustAddr("198.18.2.12"), mustAddr("198.18.2.13"), mustAddr("198.18.2.14")}
	for _, tc := range []struct {
		servers []netip.Addr
		procs   int
		want    []netip.Addr
	}{
		{[]netip.Addr{vip}, 4, []netip.Addr{vip, vip, vip, vip}},
		{[]netip.Addr{vip}, 1, []netip.Addr{vip}},
		{b, 4, b},
		{b, 1, b},
		{b[:2], 4, []netip.Addr{b[0], b[1], b[0], b[1]}},
	} {
		got := spread(tc.servers, tc.procs)
		if !slices.Equal(got, tc.want) {
			t.Errorf("spread(%v, %d) = %v, want %v", tc.servers, tc.procs, got, tc.want)
		}
	}
}
