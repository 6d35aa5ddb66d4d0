package main

import (
	"os"
	"runtime"
	"strings"
	"testing"
	"time"

	"golang.org/x/sys/unix"
)

// TestTraceCommand: lbctl trace prints a line for a rewritten datagram
// and one for a datagram no rule matches, then exits after --count.
func TestTraceCommand(t *testing.T) {
	root := tempBPFFS(t)
	inNetns(t, func() {
		vethPair(t)
		for _, args := range [][]string{
			{"attach", "v0"},
			{"snat", "add", "--src", "198.19.16.11/32", "--proto", "udp", "--sport", "53", "--to", "198.18.98.10"},
		} {
			if code, out, stderr := lbctl(t, append([]string{"--bpffs", root}, args...)...); code != 0 {
				t.Fatalf("lbctl %v: exit %d %s %s", args, code, out, stderr)
			}
		}
		code, _, stderr := lbctl(t, "--bpffs", root, "trace", "--port", "0x")
		if code != 2 || !strings.Contains(stderr, "--port") {
			t.Errorf("trace --port 0x: exit %d %q, want a usage error", code, stderr)
		}
		ns, err := os.Open("/proc/thread-self/ns/net")
		if err != nil {
			t.Fatal(err)
		}
		defer ns.Close()
		// lbctl trace runs on a second thread of this namespace until it
		// has two events for 198.19.16.99; this thread sends meanwhile.
		type result struct {
			code        int
			out, stderr string
		}
		done := make(chan result, 1)
		go func() {
			runtime.LockOSThread() // never unlocked: the thread dies with the goroutine
			if err := unix.Setns(int(ns.Fd()), unix.CLONE_NEWNET); err != nil {
				done <- result{code: -1, stderr: err.Error()}
				return
			}
			code, out, stderr := lbctl(t, "--bpffs", root, "trace", "--addr", "198.19.16.99", "--port", "40000", "--count", "2")
			done <- result{code, out, stderr}
		}()
		var r result
	wait:
		for {
			select {
			case r = <-done:
				break wait
			case <-time.After(5 * time.Millisecond):
				// Until the trace runs these go unseen: send the pair again.
				sendUDP(t, "198.19.16.11:53", "198.19.16.99:40000")
				sendUDP(t, "198.19.16.11:54", "198.19.16.99:40000")
			}
		}
		if r.code != 0 {
			t.Fatalf("trace: exit %d %q %q", r.code, r.out, r.stderr)
		}
		lines := strings.Split(strings.TrimSpace(r.out), "\n")
		if len(lines) != 2 {
			t.Fatalf("trace --count 2 printed %d lines:\n%s", len(lines), r.out)
		}
		rewritten := `snat\s+v0\s+udp 198\.19\.16\.11:53 -> 198\.19\.16\.99:40000: rewritten source to 198\.18\.98\.10:53 \(len \d+\)$`
		noRule := `snat\s+v0\s+udp 198\.19\.16\.11:54 -> 198\.19\.16\.99:40000: no rule matches: passed unchanged \(len \d+\)$`
		if !(matched(rewritten, lines[0]) && matched(noRule, lines[1])) && !(matched(noRule, lines[0]) && matched(rewritten, lines[1])) {
			t.Errorf("trace lines:\n%s\nwant one for the rewritten datagram and one for the datagram no rule matches", r.out)
		}
		if !strings.Contains(r.stderr, "tracing snat on v0") {
			t.Errorf("stderr %q: want which attachments are traced", r.stderr)
		}
	})
}
