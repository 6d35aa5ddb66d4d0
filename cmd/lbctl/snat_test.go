package main

import (
	"bytes"
	"context"
	"strings"
	"testing"

	"golang.org/x/sys/unix"

	"github.com/lbctl/lbctl/test/testenv"
)

// lbctl runs the CLI in-process and returns exit status, stdout, stderr.
func lbctl(t *testing.T, args ...string) (int, string, string) {
	t.Helper()
	var out, errb bytes.Buffer
	code := run(context.Background(), args, &out, &errb)
	return code, out.String(), errb.String()
}

// tempBPFFS mounts a bpffs for one test.
func tempBPFFS(t *testing.T) string {
	t.Helper()
	testenv.RequireRoot(t)
	dir := t.TempDir()
	if err := unix.Mount("bpffs", dir, "bpf", 0, "mode=0700"); err != nil {
		t.Fatalf("mount bpffs: %v", err)
	}
	t.Cleanup(func() { _ = unix.Unmount(dir, unix.MNT_DETACH) })
	return dir
}

// TestSNATUsageErrors: malformed input exits 2 and quotes the bad token,
// before any state is touched (the bpffs root does not even exist).
func TestSNATUsageErrors(t *testing.T) {
	root := "/nonexistent/lbctl-test"
	for _, tc := range []struct {
		args []string
		want string
	}{
		{[]string{"snat", "add", "--src", "198.19.16.0/33", "--proto", "udp", "--to", "198.18.98.10"}, `--src "198.19.16.0/33": not a prefix`},
		{[]string{"snat", "add", "--src", "banana", "--proto", "udp", "--to", "198.18.98.10"}, `"banana"`},
		{[]string{"snat", "add", "--src", "198.19.16.0/28", "--proto", "icmp", "--to", "198.18.98.10"}, `--proto "icmp": want udp or tcp`},
		{[]string{"snat", "add", "--src", "198.19.16.0/28", "--proto", "udp", "--sport", "70000", "--to", "198.18.98.10"}, `--sport "70000"`},
		{[]string{"snat", "add", "--src", "198.19.16.0/28", "--proto", "udp", "--to", "198.18.98.300"}, `--to "198.18.98.300": not an address`},
		{[]string{"snat", "add", "--src", "198.19.16.0/28", "--proto", "udp", "--to", "198.18.98.10:x"}, `port "x"`},
		{[]string{"snat", "add", "--src", "2001:db8:16::/120", "--proto", "udp", "--to", "[2001:db8:98::10]:0"}, `port "0"`},
		{[]string{"snat", "add", "--src", "2001:db8:16::/120", "--proto", "udp", "--to", "198.18.98.10:53"}, "family mismatch: source 2001:db8:16::/120 is IPv6 but target 198.18.98.10 is IPv4"},
		{[]string{"snat", "add", "--src", "198.19.16.5/28", "--proto", "udp", "--to", "198.18.98.10"}, "did you mean 198.19.16.0/28"},
		{[]string{"snat", "add", "--proto", "udp", "--to", "198.18.98.10"}, "--src PREFIX is required"},
		{[]string{"snat", "add", "--src", "198.19.16.0/28", "--proto", "udp"}, "--to ADDR[:PORT] is required"},
		{[]string{"snat", "del", "--src", "198.19.16.0/28"}, "--proto udp|tcp is required"},
		{[]string{"snat", "frobnicate"}, `unknown subcommand "frobnicate"`},
		{[]string{"snat", "add", "--bogus"}, "flag provided but not defined: -bogus"},
		{[]string{"attach"}, "want exactly one interface"},
		{[]string{"attach", "eth0", "--xdp-mode", "turbo"}, `--xdp-mode "turbo"`},
		{[]string{"stats", "extra"}, `unexpected argument "extra"`},
	} {
		code, _, stderr := lbctl(t, append([]string{"--bpffs", root}, tc.args...)...)
		if code != 2 || !strings.Contains(stderr, tc.want) {
			t.Errorf("lbctl %s: exit %d, stderr %q; want exit 2 and %q", strings.Join(tc.args, " "), code, stderr, tc.want)
		}
	}
}

func TestParseTarget(t *testing.T) {
	for _, tc := range []struct {
		in   string
		addr string
		port uint16
	}{
		{"198.18.98.10", "198.18.98.10", 0},
		{"198.18.98.10:53", "198.18.98.10", 53},
		{"2001:db8:98::10", "2001:db8:98::10", 0},
		{"[2001:db8:98::10]", "2001:db8:98::10", 0},
		{"[2001:db8:98::10]:53", "2001:db8:98::10", 53},
	} {
		a, p, err := parseTarget(tc.in)
		if err != nil || a.String() != tc.addr || p != tc.port {
			t.Errorf("parseTarget(%q) = %s, %d, %v; want %s, %d", tc.in, a, p, err, tc.addr, tc.port)
		}
	}
}

// TestSNATCommands: add, list (table and JSON), duplicate, del, stats.
func TestSNATCommands(t *testing.T) {
	root := tempBPFFS(t)
	add := []string{"--bpffs", root, "snat", "add", "--src", "198.19.16.0/28", "--proto", "udp", "--sport", "53", "--to", "198.18.98.10:53"}
	if code, out, stderr := lbctl(t, add...); code != 0 || !strings.Contains(out, "added snat rule") {
		t.Fatalf("add: exit %d, %q %q", code, out, stderr)
	}
	code, _, stderr := lbctl(t, add...)
	if code != 1 || !strings.Contains(stderr, "rule already exists") || !strings.Contains(stderr, "lbctl snat del") {
		t.Fatalf("duplicate add: exit %d, stderr %q; want exit 1, 'rule already exists' and the fix", code, stderr)
	}
	if code, _, stderr := lbctl(t, "--bpffs", root, "snat", "add", "--src", "2001:db8:16::/120", "--proto", "tcp", "--to", "[2001:db8:98::10]:8080"); code != 0 {
		t.Fatalf("add v6: exit %d, %q", code, stderr)
	}
	code, out, _ := lbctl(t, "--bpffs", root, "snat", "list")
	if code != 0 || !strings.Contains(out, "198.19.16.0/28") || !strings.Contains(out, "2001:db8:16::/120") || !strings.Contains(out, "8080") {
		t.Fatalf("list: exit %d, %q", code, out)
	}
	code, out, _ = lbctl(t, "--bpffs", root, "snat", "list", "--json")
	if code != 0 || !strings.Contains(out, `"src": "198.19.16.0/28"`) || !strings.Contains(out, `"proto": "udp"`) || !strings.Contains(out, `"to_port": 8080`) {
		t.Fatalf("list --json: exit %d, %q", code, out)
	}
	code, out, _ = lbctl(t, "--bpffs", root, "stats", "--json")
	if code != 0 || !strings.Contains(out, `"name": "rewritten"`) || !strings.Contains(out, `"packets": 0`) {
		t.Fatalf("stats --json: exit %d, %q", code, out)
	}
	if code, _, stderr := lbctl(t, "--bpffs", root, "snat", "del", "--src", "198.19.16.0/28", "--proto", "udp", "--sport", "53"); code != 0 {
		t.Fatalf("del: exit %d, %q", code, stderr)
	}
	code, _, stderr = lbctl(t, "--bpffs", root, "snat", "del", "--src", "198.19.16.0/28", "--proto", "udp", "--sport", "53")
	if code != 1 || !strings.Contains(stderr, "no such rule") {
		t.Fatalf("second del: exit %d, %q", code, stderr)
	}
}
