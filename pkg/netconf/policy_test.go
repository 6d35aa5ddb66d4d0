package netconf

import (
	"errors"
	"fmt"
	"net/netip"
	"os/exec"
	"regexp"
	"runtime"
	"strings"
	"testing"

	"golang.org/x/sys/unix"

	"github.com/lbctl/lbctl/test/testenv"
)

// inNetns runs fn on an OS thread moved into a new network namespace. The
// thread stays locked and exits with fn, taking the namespace (and every
// rule, route, interface and sysctl made in it) with it. fn reports with
// t.Error, not t.Fatal.
func inNetns(t *testing.T, fn func()) {
	t.Helper()
	testenv.RequireRoot(t)
	testenv.RequireCommand(t, "ip")
	done := make(chan struct{})
	go func() {
		defer close(done)
		runtime.LockOSThread()
		if err := unix.Unshare(unix.CLONE_NEWNET); err != nil {
			t.Errorf("unshare netns: %v", err)
			return
		}
		fn()
	}()
	<-done
}

func ip(t *testing.T, args ...string) string {
	t.Helper()
	out, err := exec.Command("ip", args...).CombinedOutput()
	if err != nil {
		t.Errorf("ip %v: %v: %s", args, err, out)
	}
	return string(out)
}

// routingState is what `ip rule` and `ip route show table all` print for
// both families.
func routingState(t *testing.T) string {
	t.Helper()
	all := ip(t, "rule") + ip(t, "-6", "rule") + ip(t, "route", "show", "table", "all") + ip(t, "-6", "route", "show", "table", "all")
	return noLinkLocal(all)
}

// noLinkLocal drops the lines of link-local routes, which IPv6
// autoconfiguration adds on its own time (not ours to compare).
func noLinkLocal(s string) string {
	var b strings.Builder
	for _, l := range strings.SplitAfter(s, "\n") {
		if !strings.Contains(l, "fe80:") {
			b.WriteString(l)
		}
	}
	return b.String()
}

func TestPolicyInstallRemove(t *testing.T) {
	inNetns(t, func() {
		ip(t, "link", "set", "lo", "up")
		ip(t, "link", "add", "d0", "type", "veth", "peer", "name", "p0")
		ip(t, "link", "set", "d0", "up")
		ip(t, "addr", "add", "198.19.16.1/24", "dev", "d0")
		ip(t, "addr", "add", "2001:db8:16::1/64", "dev", "d0", "nodad")
		before := routingState(t)
		p := Policy{Mark: 0x1062, Table: 4194}
		pr, err := InstallPolicy(p)
		if err != nil {
			t.Errorf("install: %v", err)
			return
		}
		if len(pr.Added) != 4 || len(pr.Present) != 0 {
			t.Errorf("added %q, present %q: want 2 rules and 2 routes added", pr.Added, pr.Present)
		}
		for _, c := range []struct{ args, want string }{
			{"rule", "fwmark 0x1062 lookup 4194"},
			{"-6 rule", "fwmark 0x1062 lookup 4194"},
			{"route show table 4194", "local default dev lo"},
			{"-6 route show table 4194", "local default dev lo"},
		} {
			if out := ip(t, strings.Fields(c.args)...); !strings.Contains(out, c.want) {
				t.Errorf("ip %s: no %q in\n%s", c.args, c.want, out)
			}
		}
		// A second installer finds everything present and adds nothing.
		pr2, err := InstallPolicy(p)
		if err != nil || len(pr2.Added) != 0 || len(pr2.Present) != 4 {
			t.Errorf("second install: %v, added %q, present %q", err, pr2.Added, pr2.Present)
		}
		withPolicy := routingState(t)
		if err := pr2.Remove(); err != nil {
			t.Errorf("remove second: %v", err)
		}
		if got := routingState(t); got != withPolicy {
			t.Errorf("removing the second installer's (nothing) changed the state:\n%s\nwant\n%s", got, withPolicy)
		}
		if err := pr.Remove(); err != nil {
			t.Errorf("remove: %v", err)
		}
		if err := pr.Remove(); err != nil {
			t.Errorf("second remove: %v", err)
		}
		if got := routingState(t); got != before {
			t.Errorf("state after remove differs from before:\n%s\nwant\n%s", got, before)
		}

		// Only IPv4.
		pr, err = InstallPolicy(Policy{Mark: 0x20, Table: 300, IPv4: true})
		if err != nil || len(pr.Added) != 2 {
			t.Errorf("install v4 only: %v, added %q", err, pr.Added)
		}
		if out := ip(t, "-6", "rule"); strings.Contains(out, "lookup 300") {
			t.Errorf("v4-only install added an IPv6 rule:\n%s", out)
		}
		pr.Remove()
		if got := routingState(t); got != before {
			t.Errorf("state after v4-only remove differs from before")
		}

		// What a one-shot process installed is found again by its tag ...
		if _, err := InstallPolicy(p); err != nil {
			t.Errorf("install: %v", err)
		}
		if done, err := RemoveTaggedPolicy(p); err != nil || len(done) != 4 {
			t.Errorf("remove tagged: %q, %v; want 4 removed", done, err)
		}
		if got := routingState(t); got != before {
			t.Errorf("state after remove tagged differs from before:\n%s\nwant\n%s", got, before)
		}
		// ... and the same rule and route added by hand are not lbctl's.
		ip(t, "rule", "add", "fwmark", "0x1062", "lookup", "4194")
		ip(t, "route", "add", "local", "default", "dev", "lo", "table", "4194")
		byHand := routingState(t)
		if pr, err := InstallPolicy(Policy{Mark: 0x1062, Table: 4194, IPv4: true}); err != nil || len(pr.Added) != 0 {
			t.Errorf("install over the hand-made rule: %v, %+v", err, pr)
		}
		if done, err := RemoveTaggedPolicy(p); err != nil || len(done) != 0 {
			t.Errorf("remove tagged took hand-made ones: %q, %v", done, err)
		}
		if got := routingState(t); got != byHand {
			t.Errorf("hand-made rule or route changed")
		}
	})
}

func TestPolicyConflicts(t *testing.T) {
	inNetns(t, func() {
		ip(t, "link", "set", "lo", "up")
		p := Policy{Mark: 0x1062, Table: 4194}
		for _, c := range []struct {
			name          string
			setup, undo   []string
			wantInMessage string
		}{
			{"mark used by another table", []string{"rule", "add", "fwmark", "0x1062", "lookup", "100"}, []string{"rule", "del", "fwmark", "0x1062", "lookup", "100"}, "mark 0x1062"},
			{"mark matched by a masked rule", []string{"rule", "add", "fwmark", "0x2/0x2", "lookup", "100"}, []string{"rule", "del", "fwmark", "0x2/0x2", "lookup", "100"}, "mark 0x1062"},
			{"table used by another rule", []string{"-6", "rule", "add", "from", "2001:db8:99::/64", "lookup", "4194"}, []string{"-6", "rule", "del", "from", "2001:db8:99::/64", "lookup", "4194"}, "table 4194 is used"},
			{"table holds another route", []string{"route", "add", "unreachable", "198.18.0.0/15", "table", "4194"}, []string{"route", "del", "unreachable", "198.18.0.0/15", "table", "4194"}, "already has the route"},
		} {
			ip(t, c.setup...)
			before := routingState(t)
			pr, err := InstallPolicy(p)
			if !errors.Is(err, ErrPolicyConflict) || !strings.Contains(err.Error(), c.wantInMessage) {
				t.Errorf("%s: install: %v, want ErrPolicyConflict naming %q", c.name, err, c.wantInMessage)
				pr.Remove()
			}
			if got := routingState(t); got != before {
				t.Errorf("%s: a refused install left changes:\n%s\nwant\n%s", c.name, got, before)
			}
			ip(t, c.undo...)
		}
		// A rule on a mark bit 0x1062 does not have is no conflict.
		ip(t, "rule", "add", "fwmark", "0x1/0x1", "lookup", "100")
		pr, err := InstallPolicy(p)
		if err != nil {
			t.Errorf("install beside fwmark 0x1/0x1: %v", err)
		}
		pr.Remove()
		for _, bad := range []Policy{{Mark: 0, Table: 4194}, {Mark: 1, Table: 254}, {Mark: 1, Table: 0}} {
			if _, err := InstallPolicy(bad); err == nil {
				t.Errorf("install %+v: no error", bad)
			}
		}
	})
}

func sysctlW(t *testing.T, name, v string) {
	t.Helper()
	if err := SetSysctl(name, v); err != nil {
		t.Errorf("set %s: %v", name, err)
	}
}

func TestPrepareRPFilter(t *testing.T) {
	inNetns(t, func() {
		ip(t, "link", "set", "lo", "up")
		for _, d := range []string{"d0", "d1"} {
			ip(t, "link", "add", d, "type", "veth", "peer", "name", "p"+d)
			ip(t, "link", "set", d, "up")
		}
		ip(t, "addr", "add", "198.19.16.1/24", "dev", "d0")
		ip(t, "addr", "add", "198.19.17.1/24", "dev", "d1")
		up := []netip.Addr{netip.MustParseAddr("198.19.16.11")}
		asym := []netip.Addr{netip.MustParseAddr("198.19.16.11"), netip.MustParseAddr("198.19.17.11")}
		sysctlW(t, "net.ipv4.conf.all.rp_filter", "0")
		for _, c := range []struct {
			name          string
			rp, validMark string
			ups           []netip.Addr
			want          int // -1: unchanged
		}{
			{"strict, symmetric", "1", "0", up, -1},
			{"loose", "2", "0", asym, -1},
			{"off", "0", "1", up, -1},
			{"strict, asymmetric", "1", "0", asym, 2},
			{"strict, src_valid_mark", "1", "1", up, 0},
			{"loose, src_valid_mark", "2", "1", up, 0},
		} {
			sysctlW(t, "net.ipv4.conf.d0.rp_filter", c.rp)
			sysctlW(t, "net.ipv4.conf.d0.src_valid_mark", c.validMark)
			ch, err := PrepareRPFilter("d0", c.ups)
			if err != nil {
				t.Errorf("%s: %v", c.name, err)
				continue
			}
			got, _ := Sysctl("net.ipv4.conf.d0.rp_filter")
			if c.want < 0 {
				if ch != nil || got != c.rp {
					t.Errorf("%s: changed to %s (%+v), want unchanged", c.name, got, ch)
				}
				continue
			}
			if ch == nil || got != string(rune('0'+c.want)) {
				t.Errorf("%s: rp_filter %s (%+v), want %d", c.name, got, ch, c.want)
				continue
			}
			if err := ch.Restore(); err != nil {
				t.Errorf("%s: restore: %v", c.name, err)
			}
			if got, _ := Sysctl("net.ipv4.conf.d0.rp_filter"); got != c.rp {
				t.Errorf("%s: restored to %s, want %s", c.name, got, c.rp)
			}
		}
		// Someone changed it meanwhile: Restore leaves it alone.
		sysctlW(t, "net.ipv4.conf.d0.rp_filter", "1")
		sysctlW(t, "net.ipv4.conf.d0.src_valid_mark", "1")
		ch, err := PrepareRPFilter("d0", up)
		if err != nil || ch == nil {
			t.Errorf("prepare: %v, %+v", err, ch)
			return
		}
		sysctlW(t, "net.ipv4.conf.d0.rp_filter", "2")
		ch.Restore()
		if got, _ := Sysctl("net.ipv4.conf.d0.rp_filter"); got != "2" {
			t.Errorf("restore overwrote a value set meanwhile: %s", got)
		}
		// conf.all stricter than needed: refused with the fix, nothing changed.
		sysctlW(t, "net.ipv4.conf.all.rp_filter", "1")
		if _, err := PrepareRPFilter("d0", up); err == nil || !strings.Contains(err.Error(), "net.ipv4.conf.all.rp_filter=0") {
			t.Errorf("conf.all strict with src_valid_mark: %v, want the fix", err)
		}
		if ifname, err := UpstreamInterface(netip.MustParseAddr("198.19.17.11")); err != nil || ifname != "d1" {
			t.Errorf("upstream interface: %q, %v; want d1", ifname, err)
		}
	})
}

// TestPolicyInstallNext: a new mark, a new table, or both, installed next
// to the running policy (its own rule is no conflict), then the old one
// retired: what is left is exactly the new policy, and removing it leaves
// the namespace as it was. A conflicting new policy changes nothing.
func TestPolicyInstallNext(t *testing.T) {
	inNetns(t, func() {
		ip(t, "link", "set", "lo", "up")
		before := routingState(t)
		old := Policy{Mark: 0x1062, Table: 4194}
		for _, next := range []Policy{
			{Mark: 0x2000, Table: 4194}, // mark only: the route is shared
			{Mark: 0x1062, Table: 5000}, // table only: the old rule has the same mark
			{Mark: 0x2000, Table: 5000},
		} {
			pr, err := InstallPolicy(old)
			if err != nil {
				t.Errorf("install %+v: %v", old, err)
				return
			}
			np, err := pr.InstallNext(next)
			if err != nil {
				t.Errorf("install next %+v: %v", next, err)
				return
			}
			both := ip(t, "rule") + ip(t, "-6", "rule")
			for _, want := range []string{"fwmark 0x1062 lookup 4194", fmt.Sprintf("fwmark %#x lookup %d", next.Mark, next.Table)} {
				if strings.Count(both, want) != 2 {
					t.Errorf("next %+v: want %q for both families while both are in:\n%s", next, want, both)
				}
			}
			if err := pr.Retire(np); err != nil {
				t.Errorf("retire for %+v: %v", next, err)
			}
			// Only the new policy is left (the same as installing it
			// alone, but for the priority the kernel chose for the rule).
			anyPrio := regexp.MustCompile(`(?m)^\d+:(\s+from all fwmark)`)
			after := anyPrio.ReplaceAllString(routingState(t), "P:$1")
			np.Remove()
			alone, err := InstallPolicy(next)
			if err != nil {
				t.Errorf("install %+v alone: %v", next, err)
				return
			}
			if want := anyPrio.ReplaceAllString(routingState(t), "P:$1"); after != want {
				t.Errorf("after retiring %+v for %+v:\n%s\nwant (the new one alone):\n%s", old, next, after, want)
			}
			alone.Remove()
			if got := routingState(t); got != before {
				t.Errorf("after removing %+v:\n%s\nwant\n%s", next, got, before)
			}
		}

		// A new table used by another rule: refused, the old policy stays.
		pr, err := InstallPolicy(old)
		if err != nil {
			t.Errorf("install: %v", err)
			return
		}
		ip(t, "rule", "add", "fwmark", "0x7", "lookup", "6000")
		with := routingState(t)
		if _, err := pr.InstallNext(Policy{Mark: 0x1062, Table: 6000}); !errors.Is(err, ErrPolicyConflict) {
			t.Errorf("install next on a used table: %v, want ErrPolicyConflict", err)
		}
		if got := routingState(t); got != with {
			t.Errorf("a refused InstallNext changed the state:\n%s\nwant\n%s", got, with)
		}
		ip(t, "rule", "del", "fwmark", "0x7", "lookup", "6000")
		pr.Remove()
		if got := routingState(t); got != before {
			t.Errorf("after remove:\n%s\nwant\n%s", got, before)
		}
	})
}
