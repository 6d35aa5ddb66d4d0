package main

import (
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"testing"
)

// TestConfigCheck: lbctl config check prints ok and exits 0 for a valid
// file, lists every problem and exits 1 for a bad one, exits 2 on misuse.
func TestConfigCheck(t *testing.T) {
	dir := t.TempDir()
	write := func(name, src string) string {
		p := filepath.Join(dir, name)
		if err := os.WriteFile(p, []byte(src), 0o644); err != nil {
			t.Fatal(err)
		}
		return p
	}
	good := write("good.yaml", `services:
  - name: web
    listen: 198.18.98.10:80
    upstreams: [198.19.16.11:80, 198.19.16.12:80]
  - name: dns
    protocol: udp
    listen: 198.18.98.10:53
    responses: 1
    upstreams: [198.19.16.11:53]
`)
	bad := write("bad.yaml", `services:
  - name: web
    listen: 198.18.98.10:80
    upstreams: [198.19.16.11:70000]
  - name: web
    listen: 198.18.98.10:81
    mode: dsr
    upstreams: [198.19.16.11:80]
`)

	code, out, errOut := lbctl(t, "config", "check", "-c", good)
	if code != 0 || out != good+": ok (2 services)\n" || errOut != "" {
		t.Errorf("check good: exit %d, stdout %q, stderr %q", code, out, errOut)
	}

	code, out, errOut = lbctl(t, "config", "check", "-c", bad)
	// Every problem, ordered by line (mode dsr is implemented, so no gate
	// problem); a summary ends it.
	want := strings.Join([]string{
		bad + ":4: services[0].upstreams[0]: port 70000 out of range",
		bad + ":5: services[1].health: mode dsr requires an active health check: the load balancer never sees the upstreams' replies, so passive checks cannot tell a dead upstream from a live one",
		bad + ":5: services[1].protocol: mode dsr requires protocol udp (TCP with direct server return is mode xdp)",
		bad + `:5: services[1].name: duplicate service name "web" (first at line 2)`,
		"lbctl config: " + bad + ": 4 problems",
	}, "\n") + "\n"
	if code != 1 || out != "" || errOut != want {
		t.Errorf("check bad: exit %d, stdout %q, stderr\n%s\nwant\n%s", code, out, errOut, want)
	}

	code, _, errOut = lbctl(t, "config", "check", "-c", filepath.Join(dir, "missing.yaml"))
	if code != 1 || !strings.Contains(errOut, "read config: open ") {
		t.Errorf("check missing file: exit %d, stderr %q", code, errOut)
	}

	for _, args := range [][]string{
		{"config"},
		{"config", "check"},
		{"config", "check", good},
		{"config", "check", "-c"},
		{"config", "lint", "-c", good},
		{"config", "check", "-c", good, "--bogus"},
	} {
		if code, out, errOut := lbctl(t, args...); code != 2 || out != "" || errOut == "" {
			t.Errorf("%v: exit %d, stdout %q, stderr %q; want a usage error (2)", args, code, out, errOut)
		}
	}
}

// TestConfigCheckExamples: every example file passes lbctl config check
// (every mode is implemented, so none may be refused).
func TestConfigCheckExamples(t *testing.T) {
	for _, c := range []struct {
		file     string
		services int
	}{
		{"../../examples/proxy.yaml", 4},
		{"../../examples/lbctl.yaml", 2},
		{"../../examples/dsr.yaml", 2},
	} {
		code, out, errOut := lbctl(t, "config", "check", "-c", c.file)
		if want := fmt.Sprintf("%s: ok (%d services)\n", c.file, c.services); code != 0 || out != want {
			t.Errorf("%s: exit %d, stdout %q (want %q), stderr %q", c.file, code, out, want, errOut)
		}
	}
}
