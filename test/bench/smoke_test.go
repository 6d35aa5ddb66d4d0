package main

import (
	"bytes"
	"context"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"runtime"
	"testing"

	"github.com/lbctl/lbctl/test/testenv"
)

// TestSmokeRouted runs the harness end to end for real on its cheapest
// scenario (the routed floor, 1 s per line): topology, demo backends,
// dnsperf and wrk from the client, the table and the results file.
// It checks that every line was measured, not how fast (no timed
// assertion); `make bench` is the real run.
func TestSmokeRouted(t *testing.T) {
	if testing.Short() {
		t.Skip("runs the benchmark harness for a few seconds; skipped with -short")
	}
	testenv.RequireRoot(t)
	testenv.RequireCommand(t, "ip", "dnsperf", "wrk", "nginx", "iptables", "ethtool")
	goBin, err := exec.LookPath("go")
	if err != nil {
		goBin = filepath.Join(runtime.GOROOT(), "bin", "go")
	}
	dir := t.TempDir()
	backend := filepath.Join(dir, "backend")
	if out, err := exec.Command(goBin, "build", "-o", backend, "github.com/lbctl/lbctl/test/backend").CombinedOutput(); err != nil {
		t.Fatalf("build the demo backend: %v\n%s", err, out)
	}
	var stdout, stderr bytes.Buffer
	code := run(context.Background(), []string{"-run", "^routed$", "-duration", "1s",
		"-backend", backend, "-lbctl", filepath.Join(dir, "no-lbctl"), "-out", filepath.Join(dir, "out")}, &stdout, &stderr)
	if code != 0 {
		t.Fatalf("exit %d\nstdout:\n%s\nstderr:\n%s", code, stdout.String(), stderr.String())
	}
	for _, line := range []string{
		`\| DNS udp4 \| routed, no proxy \| [1-9][0-9]* qps \| [0-9.]+ (µs|ms) \| [0-9.]+ (µs|ms) \|`,
		`\| DNS udp6 \| routed, no proxy \| [1-9][0-9]* qps \|`,
		`\| HTTP keep-alive \| routed, no proxy \| [1-9][0-9]* req/s \|`,
		`\| HTTP new conn \| routed, no proxy \| [1-9][0-9]* req/s \|`,
	} {
		if !regexp.MustCompile(line).MatchString(stdout.String()) {
			t.Errorf("no line matching %s in:\n%s\nstderr:\n%s", line, stdout.String(), stderr.String())
		}
	}
	files, err := filepath.Glob(filepath.Join(dir, "out", "bench-*.md"))
	if err != nil || len(files) != 1 {
		t.Fatalf("results files %v, %v: want one", files, err)
	}
	if b, err := os.ReadFile(files[0]); err != nil || !bytes.Contains(stdout.Bytes(), b) {
		t.Errorf("results file %s is not the printed table (%v)", files[0], err)
	}
}
