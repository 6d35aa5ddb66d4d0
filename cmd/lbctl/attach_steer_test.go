package main

import (
	"strings"
	"testing"

	"github.com/lbctl/lbctl/test/testenv"
)

// TestAttachSteer: attach --steer adds steer at tc ingress, the upstreams
// and the policy rule and local route for both families; stats show the
// steer counters; detach removes all of it: `ip rule` and `ip route show
// table all` are byte-identical to before.
func TestAttachSteer(t *testing.T) {
	testenv.RequireCommand(t, "ip", "tc")
	root := tempBPFFS(t)
	inNetns(t, func() {
		vethPair(t)
		cmdOut(t, "ip", "link", "set", "lo", "up")
		state := func() string {
			all := cmdOut(t, "ip", "rule") + cmdOut(t, "ip", "-6", "rule") +
				cmdOut(t, "ip", "route", "show", "table", "all") + cmdOut(t, "ip", "-6", "route", "show", "table", "all")
			// Link-local routes come with IPv6 autoconfiguration, on its own time.
			var b strings.Builder
			for _, l := range strings.SplitAfter(all, "\n") {
				if !strings.Contains(l, "fe80:") {
					b.WriteString(l)
				}
			}
			return b.String()
		}
		before := state()
		code, out, stderr := lbctl(t, "--bpffs", root, "attach", "v0", "--steer", "--upstream", "tcp:198.19.16.11:80", "--upstream", "udp:[2001:db8:16::11]:53")
		if code != 0 {
			t.Errorf("attach --steer: exit %d, %q %q", code, out, stderr)
			return
		}
		for _, want := range []string{"attached steer to v0 ingress with tcx (mark 0x1062)", "steering replies from tcp 198.19.16.11:80",
			"added ip rule priority", "fwmark 0x1062 lookup 4194", "added ip -6 route local ::/0 dev lo table 4194"} {
			if !strings.Contains(out, want) {
				t.Errorf("attach --steer output lacks %q:\n%s", want, out)
			}
		}
		if r := cmdOut(t, "ip", "rule"); !strings.Contains(r, "fwmark 0x1062 lookup 4194") {
			t.Errorf("no rule:\n%s", r)
		}
		if r := cmdOut(t, "ip", "route", "show", "table", "4194"); !strings.Contains(r, "local default dev lo") {
			t.Errorf("no local route:\n%s", r)
		}
		// Again: nothing added twice.
		if code, out, _ := lbctl(t, "--bpffs", root, "attach", "v0", "--steer"); code != 0 || strings.Contains(out, "added") || !strings.Contains(out, "present ip rule") {
			t.Errorf("second attach --steer: exit %d, %q", code, out)
		}
		if code, out, _ := lbctl(t, "--bpffs", root, "stats"); code != 0 || !regexpLine(out, `steer\s+seen\s+\d+`) {
			t.Errorf("stats: %q", out)
		}
		code, out, stderr = lbctl(t, "--bpffs", root, "detach", "v0")
		if code != 0 || !strings.Contains(out, "detached steer from v0 (tcx)") || !strings.Contains(out, "removed ip rule") {
			t.Errorf("detach: exit %d, %q %q", code, out, stderr)
		}
		if got := state(); got != before {
			t.Errorf("routing state after detach:\n%s\nwant (before attach):\n%s", got, before)
		}
		if f := cmdOut(t, "tc", "filter", "show", "dev", "v0", "ingress"); f != "" {
			t.Errorf("ingress filters left: %q", f)
		}
		for _, bad := range [][]string{
			{"attach", "v0", "--upstream", "tcp:198.19.16.11:80"},
			{"attach", "v0", "--steer", "--upstream", "198.19.16.11:80"},
			{"attach", "v0", "--steer", "--upstream", "sctp:198.19.16.11:80"},
			{"attach", "v0", "--steer", "--mark", "0"},
		} {
			if code, _, stderr := lbctl(t, append([]string{"--bpffs", root}, bad...)...); code != 2 {
				t.Errorf("lbctl %v: exit %d, want 2 (%q)", bad, code, stderr)
			}
		}
	})
}
