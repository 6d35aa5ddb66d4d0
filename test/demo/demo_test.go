package main

import (
	"bytes"
	"context"
	"net/netip"
	"os/exec"
	"regexp"
	"strconv"
	"strings"
	"testing"

	"go.uber.org/goleak"

	"github.com/lbctl/lbctl/test/testenv"
	"github.com/lbctl/lbctl/test/topo"
)

func TestMain(m *testing.M) { goleak.VerifyTestMain(m) }

// TestDemo runs the whole demo, as `make demo` does, and checks its output
// independently of the checks the demo makes itself: the proxy section's
// curl loops rotate over dev1..dev4 seen from the LB's address, both DSR
// sections get every backend's answer from the VIP for both families, the
// origin NAT answers bypassed the LB, and nothing is left behind.
func TestDemo(t *testing.T) {
	testenv.RequireRoot(t)
	testenv.RequireCommand(t, "ip", "dig", "curl", "go")
	o := options{lbctl: "", dir: t.TempDir()}
	if err := buildMissing(&o); err != nil {
		t.Fatal(err)
	}
	var out bytes.Buffer
	o.out = &out
	if err := run(context.Background(), o); err != nil {
		t.Fatalf("demo: %v\n%s", err, out.String())
	}
	text := out.String()
	t.Log("\n" + text)

	id := regexp.MustCompile(`on topology ([0-9a-f]{6})`).FindStringSubmatch(text)
	if id == nil || !strings.Contains(text, "Removed topology "+id[1]) {
		t.Fatalf("no topology id or no removal in the output")
	}
	if ns, err := exec.Command("ip", "netns", "list").Output(); err != nil || strings.Contains(string(ns), "lbt-"+id[1]) {
		t.Errorf("namespaces of %s left after the demo (%v):\n%s", id[1], err, ns)
	}

	sections := regexp.MustCompile(`(?m)^== \d\. `).Split(text, -1)
	if len(sections) != 4 {
		t.Fatalf("want 3 sections, got %d", len(sections)-1)
	}
	proxy, router, origin := sections[1], sections[2], sections[3]
	for i := 1; i <= 4; i++ {
		for _, from := range []string{"198.19.16.1:", "[2001:db8:16::1]:"} {
			hello := regexp.MustCompile(`(?m)^Hello from dev` + strconv.Itoa(i) + `\. You connected from ` + regexp.QuoteMeta(from))
			if !hello.MatchString(proxy) {
				t.Errorf("proxy: no answer of dev%d seen from the LB's %s", i, from)
			}
		}
	}
	answer := regexp.MustCompile(`(?m)^(\S+)\s+;; SERVER: (\S+)#53\(`)
	for name, sec := range map[string]string{"router NAT": router, "origin NAT": origin} {
		got := map[netip.Addr]bool{}
		for _, m := range answer.FindAllStringSubmatch(sec, -1) {
			a, s := netip.MustParseAddr(m[1]), netip.MustParseAddr(m[2])
			if vip := map[bool]netip.Addr{true: topo.VIP4, false: topo.VIP6}[a.Is4()]; s != vip {
				t.Errorf("%s: answer %s came from %s, want the VIP %s", name, a, s, vip)
			}
			got[a] = true
		}
		for i := 1; i <= 4; i++ {
			if !got[topo.Backend4(i)] || !got[topo.Backend6(i)] {
				t.Errorf("%s: no answer from backend %d (IPv4 %v, IPv6 %v)", name, i, got[topo.Backend4(i)], got[topo.Backend6(i)])
			}
		}
	}
	bypass := regexp.MustCompile(`LB eth0 \(towards the client\) sent (\d+) packets during these 8 queries`).FindStringSubmatch(origin)
	if bypass == nil {
		t.Fatal("origin NAT: no LB packet count in the output")
	}
	if n, _ := strconv.Atoi(bypass[1]); n >= 8 {
		t.Errorf("origin NAT: the LB sent %d packets towards the client during 8 queries", n)
	}
}

func TestDemoUsage(t *testing.T) {
	var stderr bytes.Buffer
	if code := runMain(context.Background(), []string{"extra"}, &bytes.Buffer{}, &stderr); code != 2 || !strings.Contains(stderr.String(), `unexpected argument "extra"`) {
		t.Errorf("demo extra: exit %d, stderr %q; want 2 and the bad argument named", code, stderr.String())
	}
	if code := runMain(context.Background(), []string{"--bogus"}, &bytes.Buffer{}, &bytes.Buffer{}); code != 2 {
		t.Errorf("demo --bogus: exit %d, want 2", code)
	}
}
