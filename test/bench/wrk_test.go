package main

import (
	"os"
	"strings"
	"testing"
	"time"
)

// testdata/wrk.txt is a real capture of wrk 4 --latency.
func TestParseWrkCapture(t *testing.T) {
	f, err := os.Open("testdata/wrk.txt")
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	r, err := parseWrk(f)
	if err != nil {
		t.Fatal(err)
	}
	want := wrkResult{requests: 99304, rps: 47263.74, avg: 523480 * time.Nanosecond, p99: 4320 * time.Microsecond}
	if r != want {
		t.Errorf("got %+v, want %+v", r, want)
	}
}

func TestParseWrkErrors(t *testing.T) {
	capture, err := os.ReadFile("testdata/wrk.txt")
	if err != nil {
		t.Fatal(err)
	}
	out := string(capture) + "  Socket errors: connect 1, read 12, write 0, timeout 3\n  Non-2xx or 3xx responses: 7\n"
	r, err := parseWrk(strings.NewReader(out))
	if err != nil {
		t.Fatal(err)
	}
	if r.errors != 23 {
		t.Errorf("errors = %d, want 23", r.errors)
	}
	if l := httpLine(pNginx, lHTTPNew, r); l.note != "wrk errors: 23" || l.unit != "req/s" {
		t.Errorf("line %+v", l)
	}
	for name, bad := range map[string]string{
		"no rps":      "  10 requests in 1.00s, 1MB read\n",
		"bad latency": string(capture) + "     99%    4.32xs\n",
		"empty":       "",
	} {
		if _, err := parseWrk(strings.NewReader(bad)); err == nil {
			t.Errorf("%s: no error", name)
		}
	}
}

func TestParseWrkDuration(t *testing.T) {
	for in, want := range map[string]time.Duration{
		"523.48us": 523480 * time.Nanosecond, "1.02ms": 1020 * time.Microsecond,
		"2.00s": 2 * time.Second, "1.50m": 90 * time.Second,
	} {
		got, err := parseWrkDuration(in)
		if err != nil || got != want {
			t.Errorf("%s: %v, %v; want %v", in, got, err, want)
		}
	}
	if _, err := parseWrkDuration("12parsecs"); err == nil {
		t.Error("unknown unit accepted")
	}
}

func TestMergeWrk(t *testing.T) {
	m := mergeWrk([]wrkResult{
		{requests: 100, rps: 10, avg: time.Millisecond, p99: 3 * time.Millisecond},
		{requests: 300, rps: 30, avg: 3 * time.Millisecond, p99: 5 * time.Millisecond, errors: 2},
	})
	want := wrkResult{requests: 400, rps: 40, avg: 2500 * time.Microsecond, p99: 5 * time.Millisecond, errors: 2}
	if m != want {
		t.Errorf("got %+v, want %+v", m, want)
	}
}

func TestWrkArgs(t *testing.T) {
	got := strings.Join(wrkArgs(httpURL(mustAddr("198.18.98.10")), 10*time.Second, 2, 32, true), " ")
	want := "-t 2 -c 32 -d 10s --latency --timeout 2s -H Connection: close http://198.18.98.10:80/"
	if got != want {
		t.Errorf("args\n got %s\nwant %s", got, want)
	}
	if u := httpURL(mustAddr("2001:db8:98::10")); u != "http://[2001:db8:98::10]:80/" {
		t.Errorf("IPv6 url %s", u)
	}
}
