// Package e2e runs `lbctl run` on the namespace topology of test/topo and
// checks it from the client's side with real sockets.
//
// This file is the shared harness every mode's end-to-end test uses:
//
//	h := newHarness(t, topo.Options{})   // root, namespaces, binaries
//	h.startBackends(t)                    // test/backend on every backend host
//	lb := h.run(t, cfg)                   // lbctl run -c cfg in the LB namespace
//	h.http(t, topo.VIP4, 80)              // "Hello from dev1. ..." from the client
//	h.dns(t, netip.AddrPortFrom(topo.VIP4, 53), dnsmessage.TypeA)
//	lb.reload(t, cfg2); lb.stop(t)        // SIGHUP, SIGTERM (exit status checked)
//
// Everything started is stopped in t.Cleanup, on every exit path.
package e2e

import (
	"bytes"
	"errors"
	"fmt"
	"io"
	"net"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"golang.org/x/net/dns/dnsmessage"

	"github.com/lbctl/lbctl/test/testenv"
	"github.com/lbctl/lbctl/test/topo"
)

func TestMain(m *testing.M) {
	code := m.Run()
	testenv.RemoveBinaries()
	os.Exit(code)
}

// binary returns the path of lbctl or backend (testenv.Binary).
func binary(t *testing.T, name string) string { return testenv.Binary(t, name) }

// harness is one topology with the binaries to run on it.
type harness struct {
	*topo.Topology
	dir string // scratch directory for configs
}

// newHarness builds the topology (root needed: skips on a laptop, fails
// under CI) and the binaries.
func newHarness(t *testing.T, opts topo.Options) *harness {
	t.Helper()
	testenv.RequireRoot(t)
	binary(t, "lbctl")
	return &harness{Topology: topo.Start(t, opts), dir: t.TempDir()}
}

// process is a command started in a namespace, with its output kept.
type process struct {
	cmd  *exec.Cmd
	out  *testenv.SyncBuffer
	done chan struct{}
	err  error // after done
}

// start runs name in host's namespace until the test ends (SIGTERM, then
// SIGKILL after 10s).
func start(t *testing.T, host *topo.Host, name string, args ...string) *process {
	t.Helper()
	p := &process{cmd: host.Command(name, args...), out: &testenv.SyncBuffer{}, done: make(chan struct{})}
	p.cmd.Stdout, p.cmd.Stderr = p.out, p.out
	if err := p.cmd.Start(); err != nil {
		t.Fatalf("start %s in %s: %v", name, host.NS, err)
	}
	go func() { p.err = p.cmd.Wait(); close(p.done) }()
	t.Cleanup(func() {
		p.signal(syscall.SIGTERM)
		select {
		case <-p.done:
		case <-time.After(10 * time.Second):
			p.cmd.Process.Kill()
			<-p.done
		}
		if t.Failed() {
			t.Logf("output of %s in %s:\n%s", filepath.Base(name), host.Role, p.out.String())
		}
	})
	return p
}

func (p *process) signal(s os.Signal) {
	select {
	case <-p.done:
	default:
		p.cmd.Process.Signal(s)
	}
}

// waitOutput waits until the output contains s n times (or the process
// exits: a failure).
func (p *process) waitOutput(t *testing.T, s string, n int) {
	t.Helper()
	deadline := time.Now().Add(30 * time.Second)
	for strings.Count(p.out.String(), s) < n {
		select {
		case <-p.done:
			t.Fatalf("process exited (%v) before printing %q:\n%s", p.err, s, p.out.String())
		default:
		}
		if time.Now().After(deadline) {
			t.Fatalf("no %q (x%d) in the output after 30s:\n%s", s, n, p.out.String())
		}
		time.Sleep(20 * time.Millisecond)
	}
}

// startBackends runs test/backend on every backend host: HTTP on :80,
// DNS on :53 and a UDP echo on :7, IPv4 and IPv6, named dev1..devN.
func (h *harness) startBackends(t *testing.T) {
	t.Helper()
	for i := range h.Backends {
		h.startBackend(t, i+1)
	}
}

// startBackend runs test/backend on backend host i (from 1), as
// startBackends does, and returns once it serves; kill it with
// p.signal(syscall.SIGKILL) and start it again to test failover.
func (h *harness) startBackend(t *testing.T, i int) *process {
	t.Helper()
	v4, v6 := topo.Backend4(i), topo.Backend6(i)
	p := start(t, h.Backends[i-1], binary(t, "backend"), "--name", fmt.Sprintf("dev%d", i), "--readers", "1",
		"--http", netip.AddrPortFrom(v4, 80).String(), "--http", netip.AddrPortFrom(v6, 80).String(),
		"--dns", netip.AddrPortFrom(v4, 53).String(), "--dns", netip.AddrPortFrom(v6, 53).String(),
		"--udp-echo", netip.AddrPortFrom(v4, 7).String(), "--udp-echo", netip.AddrPortFrom(v6, 7).String())
	p.waitOutput(t, "serving", 1)
	return p
}

// lb is a running `lbctl run`.
type lb struct {
	*process
	config  string
	reloads int // reload attempts so far
}

// run writes cfg and starts `lbctl run -c` in the LB namespace; it returns
// once the daemon logs that it runs.
func (h *harness) run(t *testing.T, cfg string) *lb {
	t.Helper()
	path := filepath.Join(h.dir, "lbctl.yaml")
	if err := os.WriteFile(path, []byte(cfg), 0o644); err != nil {
		t.Fatal(err)
	}
	p := start(t, h.LB, binary(t, "lbctl"), "--bpffs", h.LB.BPFFS, "--log-level", "debug", "run", "-c", path)
	p.waitOutput(t, "\trunning\t", 1)
	return &lb{process: p, config: path}
}

// reload writes cfg and sends SIGHUP; it returns once the daemon logged
// the outcome, and reports whether the reload succeeded.
func (l *lb) reload(t *testing.T, cfg string) bool {
	t.Helper()
	if err := os.WriteFile(l.config, []byte(cfg), 0o644); err != nil {
		t.Fatal(err)
	}
	okBefore := strings.Count(l.out.String(), "\treloaded\t")
	failBefore := strings.Count(l.out.String(), "reload failed")
	l.signal(syscall.SIGHUP)
	deadline := time.Now().Add(30 * time.Second)
	for {
		out := l.out.String()
		switch {
		case strings.Count(out, "\treloaded\t") > okBefore:
			return true
		case strings.Count(out, "reload failed") > failBefore:
			return false
		case time.Now().After(deadline):
			t.Fatalf("no reload outcome logged after SIGHUP:\n%s", out)
		}
		time.Sleep(20 * time.Millisecond)
	}
}

// stop sends SIGTERM and waits for the exit; it fails the test unless the
// exit status is 0.
func (l *lb) stop(t *testing.T) {
	t.Helper()
	l.signal(syscall.SIGTERM)
	select {
	case <-l.done:
	case <-time.After(60 * time.Second):
		t.Fatalf("lbctl still running 60s after SIGTERM:\n%s", l.out.String())
	}
	if l.err != nil {
		t.Fatalf("lbctl exit after SIGTERM: %v\n%s", l.err, l.out.String())
	}
}

// in runs fn in host's network namespace (sockets it opens stay there).
func in(t *testing.T, host *topo.Host, fn func() error) {
	t.Helper()
	if err := host.Do(fn); err != nil {
		t.Fatal(err)
	}
}

// httpGet sends one HTTP/1.0 GET from the client to addr and returns the
// body (the backend's "Hello from devN. You connected from A to B").
func (h *harness) httpGet(addr netip.AddrPort) (string, error) {
	var body string
	err := h.Client.Do(func() error {
		c, err := net.DialTimeout("tcp", addr.String(), 5*time.Second)
		if err != nil {
			return err
		}
		defer c.Close()
		c.SetDeadline(time.Now().Add(10 * time.Second))
		fmt.Fprintf(c, "GET / HTTP/1.0\r\nHost: www.example.com\r\n\r\n")
		b, err := io.ReadAll(c)
		if err != nil {
			return err
		}
		_, after, ok := bytes.Cut(b, []byte("\r\n\r\n"))
		if !ok || !bytes.HasPrefix(b, []byte("HTTP/1.")) {
			return fmt.Errorf("GET %s: not an HTTP answer: %q", addr, b)
		}
		body = strings.TrimSpace(string(after))
		return nil
	})
	return body, err
}

// dnsQuery asks addr for www.example.com (type A or AAAA) from the client
// and returns the answer's address.
func (h *harness) dnsQuery(addr netip.AddrPort, typ dnsmessage.Type) (netip.Addr, error) {
	var got netip.Addr
	err := h.Client.Do(func() error {
		c, err := net.Dial("udp", addr.String())
		if err != nil {
			return err
		}
		defer c.Close()
		c.SetDeadline(time.Now().Add(10 * time.Second))
		return exchangeDNS(c, typ, &got)
	})
	return got, err
}

func exchangeDNS(c net.Conn, typ dnsmessage.Type, got *netip.Addr) error {
	id := uint16(time.Now().UnixNano())
	q := dnsmessage.NewBuilder(nil, dnsmessage.Header{ID: id, RecursionDesired: true})
	q.StartQuestions()
	q.Question(dnsmessage.Question{Name: dnsmessage.MustNewName("www.example.com."), Type: typ, Class: dnsmessage.ClassINET})
	msg, err := q.Finish()
	if err != nil {
		return err
	}
	if _, err := c.Write(msg); err != nil {
		return err
	}
	buf := make([]byte, 1500)
	n, err := c.Read(buf)
	if err != nil {
		return fmt.Errorf("dns reply: %w", err)
	}
	var p dnsmessage.Parser
	hdr, err := p.Start(buf[:n])
	if err != nil {
		return err
	}
	if hdr.ID != id {
		return fmt.Errorf("dns reply id %d, want %d", hdr.ID, id)
	}
	p.SkipAllQuestions()
	for {
		ah, err := p.AnswerHeader()
		if errors.Is(err, dnsmessage.ErrSectionDone) {
			return errors.New("dns reply without an address")
		}
		if err != nil {
			return err
		}
		switch ah.Type {
		case dnsmessage.TypeA:
			r, err := p.AResource()
			if err != nil {
				return err
			}
			*got = netip.AddrFrom4(r.A)
			return nil
		case dnsmessage.TypeAAAA:
			r, err := p.AAAAResource()
			if err != nil {
				return err
			}
			*got = netip.AddrFrom16(r.AAAA)
			return nil
		default:
			p.SkipAnswer()
		}
	}
}

// sigterm is what a service manager sends to stop lbctl.
const sigterm = syscall.SIGTERM
