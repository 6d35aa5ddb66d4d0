package main

import (
	"encoding/json"
	"fmt"
	"net/netip"
	"strings"
	"testing"
	"time"

	"github.com/lbctl/lbctl/pkg/health"
	"github.com/lbctl/lbctl/test/testenv"
)

// TestStatusAndStats: status names the attached program with the ids
// bpftool knows it by; stats counts real traffic; stats --watch prints
// one table per refresh, with rates from the second on.
func TestStatusAndStats(t *testing.T) {
	testenv.RequireCommand(t, "ip", "bpftool")
	root := tempBPFFS(t)
	inNetns(t, func() {
		code, out, _ := lbctl(t, "--bpffs", root, "status")
		if code != 0 || !strings.Contains(out, "nothing attached") {
			t.Errorf("status without state: exit %d %q", code, out)
		}
		vethPair(t)
		for _, args := range [][]string{
			{"attach", "v0"},
			{"snat", "add", "--src", "198.19.16.11/32", "--proto", "udp", "--sport", "53", "--to", "198.18.98.10"},
		} {
			if code, out, stderr := lbctl(t, append([]string{"--bpffs", root}, args...)...); code != 0 {
				t.Fatalf("lbctl %v: exit %d %s %s", args, code, out, stderr)
			}
		}
		for i := 0; i < 4; i++ {
			sendUDP(t, "198.19.16.11:53", "198.19.16.99:40000")
		}

		code, out, stderr := lbctl(t, "--bpffs", root, "status", "--json")
		var rep statusReport
		if code != 0 || json.Unmarshal([]byte(out), &rep) != nil {
			t.Fatalf("status --json: exit %d %q %q", code, out, stderr)
		}
		if len(rep.Attachments) != 1 || rep.SNATRules != 1 {
			t.Fatalf("status: %+v; want one attachment and one rule", rep)
		}
		a := rep.Attachments[0]
		if a.Interface != "v0" || a.Program != "snat" || a.Hook != "tc egress" || a.Method != "tcx" || a.ProgramID == 0 || a.LinkID == 0 {
			t.Errorf("attachment %+v", a)
		}
		if p := cmdOut(t, "bpftool", "prog", "show", "id", fmt.Sprint(a.ProgramID)); !strings.Contains(p, "snat_egress") {
			t.Errorf("bpftool prog show id %d: %q; want the snat program", a.ProgramID, p)
		}
		if l := cmdOut(t, "bpftool", "link", "show", "id", fmt.Sprint(a.LinkID)); !strings.Contains(l, fmt.Sprintf("prog %d", a.ProgramID)) {
			t.Errorf("bpftool link show id %d: %q; want prog %d", a.LinkID, l, a.ProgramID)
		}
		code, out, _ = lbctl(t, "--bpffs", root, "status")
		if code != 0 || !regexpLine(out, `^v0\s+snat\s+tc egress\s+tcx\s+\d+\s+\d+$`) || !strings.Contains(out, "snat rules: 1 of") {
			t.Errorf("status: exit %d\n%s", code, out)
		}

		code, out, _ = lbctl(t, "--bpffs", root, "stats", "--json")
		var st struct {
			SNAT []struct {
				Name  string
				Value uint64
			}
		}
		if code != 0 || json.Unmarshal([]byte(out), &st) != nil || len(st.SNAT) < 2 || st.SNAT[1].Name != "rewritten" || st.SNAT[1].Value < 4 {
			t.Errorf("stats --json: exit %d %s; want rewritten >= 4", code, out)
		}
		code, out, _ = lbctl(t, "--bpffs", root, "stats", "--watch", "--count", "3", "--interval", "20ms")
		if code != 0 {
			t.Errorf("stats --watch: exit %d", code)
		}
		if n := strings.Count(out, "(every 20ms; rates per second)"); n != 3 {
			t.Errorf("stats --watch --count 3: %d refreshes, want 3:\n%s", n, out)
		}
		if n := strings.Count(out, "RATE/s"); n != 2 {
			t.Errorf("stats --watch: %d tables with rates, want 2 (not the first):\n%s", n, out)
		}
		if !regexpLine(out, `^snat\s+rewritten\s+\d+\s+\d+\.\d$`) {
			t.Errorf("stats --watch: no rewritten line with a rate:\n%s", out)
		}
	})
}

func TestHealthColumns(t *testing.T) {
	now := time.Date(2026, 12, 5, 9, 0, 0, 0, time.UTC)
	a := netip.MustParseAddrPort("198.19.16.11:53")
	b := netip.MustParseAddrPort("198.19.16.12:53")
	hs := map[netip.AddrPort]health.Status{
		a: {Addr: a, State: health.StateUp, Since: now.Add(-95 * time.Second), LastCheck: now.Add(-time.Second),
			LastOK: true, LastLatency: 1234 * time.Microsecond},
		b: {Addr: b, State: health.StateDown, Since: now.Add(-3 * time.Second), LastCheck: now,
			LastError: "read udp: i/o timeout"},
	}
	tests := []struct {
		addr                         netip.AddrPort
		up                           bool
		weight                       int
		state, since, check, weight2 string
	}{
		{a, true, 2 * health.WeightScale, "up", "1m35s", "ok 1.23ms", "2"},
		{a, true, 40, "up", "1m35s", "ok 1.23ms", "0.40"}, // slow start
		{b, false, 0, "down", "3s", "fail: read udp: i/o timeout", "0"},
		{netip.MustParseAddrPort("198.19.16.13:53"), true, 3, "up", "-", "-", "3"}, // no tracker: configured weight
	}
	for _, tc := range tests {
		st, since, check, w := healthColumns(hs, tc.addr, tc.up, tc.weight, now)
		if st != tc.state || since != tc.since || check != tc.check || w != tc.weight2 {
			t.Errorf("healthColumns(%v, weight %d) = %q %q %q %q, want %q %q %q %q", tc.addr, tc.weight,
				st, since, check, w, tc.state, tc.since, tc.check, tc.weight2)
		}
	}
}
