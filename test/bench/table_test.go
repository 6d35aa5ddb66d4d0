package main

import (
	"bytes"
	"net/netip"
	"strings"
	"testing"
	"time"
)

func mustAddr(s string) netip.Addr { return netip.MustParseAddr(s) }

func join(s []string) string { return strings.Join(s, " ") }

func TestRatioCells(t *testing.T) {
	rs := []result{
		{path: pRouted, load: lDNS4, value: 1000, unit: "qps"},
		{path: pNginx, load: lDNS4, value: 400, unit: "qps"},
		{path: pProxy, load: lDNS4, value: 600, unit: "qps"},
		{path: pDSRRouter, load: lDNS4, value: 650, unit: "qps"},
		{path: pProxy, load: lHTTPNew, value: 100, unit: "req/s"},
		{path: pTransparent, load: lHTTPNew, value: 70, unit: "req/s"},
		{path: pEmptyTC, load: "BenchmarkSNAT", value: 20, unit: unitNsPacket},
		{path: "snat hit/rules=1", load: "BenchmarkSNAT", value: 50, unit: unitNsPacket, vsEmpty: 2.5},
		{path: "snat miss/rules=1", load: "BenchmarkSNAT", value: 30, unit: unitNsPacket, vsEmpty: 1.5},
	}
	cells := ratioCells(rs)
	want := map[int]string{
		1: "0.40x routed, no proxy",
		2: "1.50x nginx proxy (target ≥1x: met); 0.60x routed, no proxy",
		3: "1.62x nginx proxy (target ≥2x: NOT met); 0.65x routed, no proxy (target ≥0.7x: NOT met)",
		5: "0.70x lbctl proxy (target ≥0.8x: NOT met)",
		7: "2.50x empty TC program (target ≤2x: NOT met)",
		8: "1.50x empty TC program",
	}
	for i := range rs {
		if got := strings.Join(cells[i], "; "); got != want[i] {
			t.Errorf("line %d (%s %s): %q, want %q", i, rs[i].path, rs[i].load, got, want[i])
		}
	}
}

func TestWriteTable(t *testing.T) {
	h := header{
		date: time.Date(2026, 12, 5, 9, 0, 0, 0, time.UTC), duration: 10 * time.Second,
		loadBefore: "3.50 2.00 1.00", loadAfter: "5.00 3.00 1.50", kernel: "6.18", cpus: 2,
		notes: []string{"lbctl-xdp: not run: mode xdp not implemented yet"},
	}
	var b bytes.Buffer
	writeTable(&b, h, []result{
		{path: pRouted, load: lDNS4, value: 41234.5, unit: "qps", avg: 850 * time.Microsecond, p99: 3200 * time.Microsecond},
		{path: pNginx, load: lDNS4, value: 10000, unit: "qps", avg: 2 * time.Millisecond, p99: 9 * time.Millisecond, note: "0.10% lost"},
		{path: pEmptyTC, load: "BenchmarkSNAT", value: 26.3, unit: unitNsPacket, note: "median of 3"},
	})
	out := b.String()
	for _, want := range []string{
		"lbctl benchmark, 2026-12-05 09:00 UTC, kernel 6.18, 2 CPUs, 10s per line",
		"load average before: 3.50 2.00 1.00, after: 5.00 3.00 1.50 — MEASURED UNDER LOAD",
		"| DNS udp4 | routed, no proxy | 41234 qps | 850 µs | 3.20 ms |  |  |",
		"| DNS udp4 | nginx proxy | 10000 qps | 2.00 ms | 9.00 ms | 0.24x routed, no proxy | 0.10% lost |",
		"| BenchmarkSNAT | empty TC program | 26.3 |  | median of 3 |",
		"- lbctl-xdp: not run: mode xdp not implemented yet",
	} {
		if !strings.Contains(out, want) {
			t.Errorf("table lacks %q:\n%s", want, out)
		}
	}
	h.loadBefore = "0.20 0.10 0.05"
	b.Reset()
	writeTable(&b, h, nil)
	if strings.Contains(b.String(), "UNDER LOAD") {
		t.Errorf("quiet machine labelled as loaded:\n%s", b.String())
	}
}

func TestParseArgs(t *testing.T) {
	o, err := parseArgs([]string{"-duration", "3s", "-run", "nginx"}, &bytes.Buffer{})
	if err != nil || o.duration != 3*time.Second || o.run != "nginx" || o.loads.dnsOutstanding != 64 {
		t.Fatalf("%+v, %v", o, err)
	}
	for _, bad := range [][]string{
		{"-duration", "500ms"}, {"-duration", "1h"}, {"-run", "("}, {"extra"}, {"-http-conns", "0"},
	} {
		if _, err := parseArgs(bad, &bytes.Buffer{}); err == nil {
			t.Errorf("%v accepted", bad)
		}
	}
}

func TestSlug(t *testing.T) {
	if got := slug(pDSRRouter, lDNS6); got != "lbctl-dsr-router-nat-dns-udp6" {
		t.Errorf("slug %q", got)
	}
}
