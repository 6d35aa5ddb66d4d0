package main

import (
	"os"
	"path/filepath"
	"strings"
	"testing"
)

const vipFromConfig = `services:
  - name: dns
    protocol: udp
    listen: 198.18.98.10:53
    mode: dsr
    dsr: {nat: origin}
    upstreams: [198.19.16.11:53, 198.19.16.12:53, 198.19.16.13:53, 198.19.16.14:53]
    health: {type: dns, query: www.example.com}
  - name: dns6
    protocol: udp
    listen: "[2001:db8:98::10]:53"
    mode: dsr
    dsr: {nat: origin}
    upstreams: ["[2001:db8:16::11]:53", "[2001:db8:16::12]:53"]
    health: {type: dns, query: www.example.com, qtype: AAAA}
  - name: routed
    protocol: udp
    listen: 198.18.98.10:5353
    mode: dsr
    upstreams: [198.19.16.11:5353]
    health: {type: dns, query: www.example.com}
`

func writeConfig(t *testing.T, src string) string {
	t.Helper()
	p := filepath.Join(t.TempDir(), "lbctl.yaml")
	if err := os.WriteFile(p, []byte(src), 0o644); err != nil {
		t.Fatal(err)
	}
	return p
}

// TestSNATVipFromUsage: --vip-from refusals, before any state is touched.
func TestSNATVipFromUsage(t *testing.T) {
	cfg := writeConfig(t, vipFromConfig)
	root := "/nonexistent/lbctl-test"
	for _, tc := range []struct {
		args []string
		code int
		want string
	}{
		{[]string{"snat", "add", "--vip-from", cfg}, 2, "--vip-from needs --service NAME"},
		{[]string{"snat", "add", "--service", "dns", "--src", "198.19.16.0/28", "--proto", "udp", "--to", "198.18.98.10"}, 2, "--service needs --vip-from FILE"},
		{[]string{"snat", "add", "--vip-from", cfg, "--service", "dns", "--proto", "udp"}, 2, "--vip-from derives --proto, --sport and --to from the service: leave them out"},
		{[]string{"snat", "add", "--vip-from", cfg, "--service", "dns", "--to", "198.18.98.10:53"}, 2, "leave them out"},
		{[]string{"snat", "add", "--vip-from", cfg, "--service", "dns", "--src", "banana"}, 2, `--src "banana": not an address`},
		{[]string{"snat", "add", "--vip-from", cfg, "--service", "dns", "--src", "198.19.16.99"}, 2, "service dns has no upstream in 198.19.16.99/32: give the address of this backend, one of the service's upstreams"},
		{[]string{"snat", "add", "--vip-from", cfg, "--service", "nope"}, 2, `has no service "nope" (it has: [dns dns6 routed])`},
		{[]string{"snat", "add", "--vip-from", cfg, "--service", "routed"}, 2, "service routed uses nat: router: the load balancer rewrites its replies; set dsr: {nat: origin}"},
		{[]string{"snat", "del", "--vip-from", cfg, "--service", "dns", "--sport", "53"}, 2, "leave them out"},
		{[]string{"snat", "add", "--vip-from", "/nonexistent/lbctl.yaml", "--service", "dns"}, 1, "read config"},
	} {
		code, _, stderr := lbctl(t, append([]string{"--bpffs", root}, tc.args...)...)
		if code != tc.code || !strings.Contains(stderr, tc.want) {
			t.Errorf("lbctl %s: exit %d, stderr %q; want exit %d and %q", strings.Join(tc.args, " "), code, stderr, tc.code, tc.want)
		}
	}
}

// TestSNATVipFrom: the rules derived from the config land in the map,
// adding twice is harmless, a conflicting rule is named, del removes them.
func TestSNATVipFrom(t *testing.T) {
	root := tempBPFFS(t)
	cfg := writeConfig(t, vipFromConfig)
	add := []string{"--bpffs", root, "snat", "add", "--vip-from", cfg, "--service", "dns", "--src", "198.19.16.12"}
	code, out, stderr := lbctl(t, add...)
	if want := "added snat rule src 198.19.16.12/32 proto udp sport 53 to 198.18.98.10:53\n"; code != 0 || out != want {
		t.Fatalf("add: exit %d, stdout %q, stderr %q; want %q", code, out, stderr, want)
	}
	code, out, stderr = lbctl(t, add...)
	if want := "snat rule src 198.19.16.12/32 proto udp sport 53 to 198.18.98.10:53 already present\n"; code != 0 || out != want {
		t.Fatalf("second add: exit %d, stdout %q, stderr %q; want %q", code, out, stderr, want)
	}
	// Without --src: every upstream, in as few prefixes as cover exactly them.
	code, out, stderr = lbctl(t, "--bpffs", root, "snat", "add", "--vip-from", cfg, "--service", "dns6")
	if want := "added snat rule src 2001:db8:16::11/128 proto udp sport 53 to [2001:db8:98::10]:53\n" +
		"added snat rule src 2001:db8:16::12/128 proto udp sport 53 to [2001:db8:98::10]:53\n"; code != 0 || out != want {
		t.Fatalf("add dns6: exit %d, stdout %q, stderr %q; want %q", code, out, stderr, want)
	}
	code, out, _ = lbctl(t, "--bpffs", root, "snat", "list")
	for _, want := range []string{"198.19.16.12/32", "2001:db8:16::11/128", "2001:db8:16::12/128"} {
		if code != 0 || !strings.Contains(out, want) {
			t.Errorf("list: exit %d, %q; want %q in it", code, out, want)
		}
	}
	// A hand-made rule for the same match with another target is named.
	if code, _, stderr := lbctl(t, "--bpffs", root, "snat", "add", "--src", "198.19.16.13/32", "--proto", "udp", "--sport", "53", "--to", "198.18.98.11:53"); code != 0 {
		t.Fatalf("manual add: %d %s", code, stderr)
	}
	code, _, stderr = lbctl(t, "--bpffs", root, "snat", "add", "--vip-from", cfg, "--service", "dns", "--src", "198.19.16.13")
	if code != 1 || !strings.Contains(stderr, "rule already exists with another target (src 198.19.16.13/32 proto udp sport 53 to 198.18.98.11:53): remove it with lbctl snat del --src 198.19.16.13/32 --proto udp --sport 53") {
		t.Errorf("conflicting add: exit %d, stderr %q", code, stderr)
	}
	for _, svc := range []string{"dns", "dns6"} {
		args := []string{"--bpffs", root, "snat", "del", "--vip-from", cfg, "--service", svc}
		if svc == "dns" {
			args = append(args, "--src", "198.19.16.12")
		}
		if code, _, stderr := lbctl(t, args...); code != 0 {
			t.Fatalf("del %s: exit %d, %q", svc, code, stderr)
		}
	}
	code, out, _ = lbctl(t, "--bpffs", root, "snat", "list", "--json")
	if code != 0 || strings.Contains(out, "198.19.16.12") || strings.Contains(out, "2001:db8:16::") || !strings.Contains(out, "198.19.16.13/32") {
		t.Errorf("list after del: exit %d, %q; want only the manual rule", code, out)
	}
}
