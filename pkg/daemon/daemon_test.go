package daemon

import (
	"bufio"
	"context"
	"fmt"
	"net"
	"net/http"
	"net/netip"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"go.uber.org/goleak"
	"go.uber.org/zap"
	"go.uber.org/zap/zaptest"

	"github.com/lbctl/lbctl/test/testenv"
)

// TestMain runs the package in a private network namespace (see
// docs/testing.md): its sockets use testenv.Addr4 on that lo.
func TestMain(m *testing.M) {
	testenv.RunInNetns()
	goleak.VerifyTestMain(m)
}

// listenLo listens on TCP on a free port of the test address.
func listenLo(t *testing.T) *net.TCPListener {
	t.Helper()
	testenv.RequireNetns(t)
	ln, err := net.ListenTCP("tcp", net.TCPAddrFromAddrPort(netip.AddrPortFrom(testenv.Addr4, 0)))
	if err != nil {
		t.Fatal(err)
	}
	return ln
}

// nameServer answers each line with its name, over TCP, until cleanup.
func nameServer(t *testing.T, name string) netip.AddrPort {
	t.Helper()
	ln := listenLo(t)
	var wg sync.WaitGroup
	t.Cleanup(func() { ln.Close(); wg.Wait() })
	wg.Go(func() {
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			wg.Go(func() {
				defer c.Close()
				s := bufio.NewScanner(c)
				for s.Scan() {
					fmt.Fprintln(c, name)
				}
			})
		}
	})
	return ln.Addr().(*net.TCPAddr).AddrPort()
}

func freePort(t *testing.T) netip.AddrPort {
	t.Helper()
	ln := listenLo(t)
	defer ln.Close()
	return ln.Addr().(*net.TCPAddr).AddrPort()
}

func writeConfig(t *testing.T, path, text string) {
	t.Helper()
	if err := os.WriteFile(path, []byte(text), 0o644); err != nil {
		t.Fatal(err)
	}
}

func tcpService(name string, listen netip.AddrPort, ups ...netip.AddrPort) string {
	var b strings.Builder
	fmt.Fprintf(&b, "  - name: %s\n    protocol: tcp\n    listen: %s\n    mode: proxy\n    upstreams:\n", name, listen)
	for _, u := range ups {
		fmt.Fprintf(&b, "      - %s\n", u)
	}
	return b.String()
}

func ask(addr netip.AddrPort) (string, error) {
	c, err := net.DialTimeout("tcp", addr.String(), 5*time.Second)
	if err != nil {
		return "", err
	}
	defer c.Close()
	c.SetDeadline(time.Now().Add(5 * time.Second))
	fmt.Fprintln(c, "hi")
	line, err := bufio.NewReader(c).ReadString('\n')
	return strings.TrimSpace(line), err
}

func mustAsk(t *testing.T, addr netip.AddrPort) string {
	t.Helper()
	got, err := ask(addr)
	if err != nil {
		t.Fatalf("ask %s: %v", addr, err)
	}
	return got
}

func TestReload(t *testing.T) {
	a, b := nameServer(t, "a"), nameServer(t, "b")
	web, extra := freePort(t), freePort(t)
	path := filepath.Join(t.TempDir(), "lbctl.yaml")
	writeConfig(t, path, "drain_timeout: 2s\nservices:\n"+tcpService("web", web, a))

	d, err := New(Options{ConfigPath: path, Log: zaptest.NewLogger(t, zaptest.Level(zap.WarnLevel))})
	if err != nil {
		t.Fatal(err)
	}
	if err := d.Start(context.Background()); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { d.Shutdown() })
	if got := mustAsk(t, web); got != "a" {
		t.Fatalf("before reload: %q", got)
	}

	// A broken file: the reload fails with the file's problems and the
	// running config keeps serving.
	writeConfig(t, path, "services:\n  - name: web\n    protocol: sctp\n")
	err = d.Reload(context.Background())
	if err == nil || !strings.Contains(err.Error(), "services[0].protocol") {
		t.Fatalf("reload of a broken config: %v", err)
	}
	if got := mustAsk(t, web); got != "a" {
		t.Fatalf("after a failed reload: %q", got)
	}

	// Changed upstreams apply to new connections; a new service starts.
	writeConfig(t, path, "drain_timeout: 2s\nservices:\n"+tcpService("web", web, b)+tcpService("extra", extra, a))
	if err := d.Reload(context.Background()); err != nil {
		t.Fatal(err)
	}
	if got := mustAsk(t, web); got != "b" {
		t.Fatalf("after the upstream change: %q, want b", got)
	}
	if got := mustAsk(t, extra); got != "a" {
		t.Fatalf("new service: %q, want a", got)
	}
	st := d.Status()
	if len(st.Services) != 2 || st.Reloads != 1 || st.Services[0].Name != "web" ||
		st.Services[0].Upstreams[0].Addr != b || st.Services[0].Stats.Accepted == 0 {
		t.Fatalf("status %+v", st)
	}

	// A removed service stops listening.
	writeConfig(t, path, "drain_timeout: 2s\nservices:\n"+tcpService("extra", extra, a))
	if err := d.Reload(context.Background()); err != nil {
		t.Fatal(err)
	}
	waitFor(t, "removed service closed", func() bool { _, err := ask(web); return err != nil })
	if got := mustAsk(t, extra); got != "a" {
		t.Fatalf("kept service: %q", got)
	}
}

func TestStartFailsOnBusyAddress(t *testing.T) {
	a := nameServer(t, "a")
	ln := listenLo(t)
	defer ln.Close()
	busy := ln.Addr().(*net.TCPAddr).AddrPort()
	free := freePort(t)
	path := filepath.Join(t.TempDir(), "lbctl.yaml")
	writeConfig(t, path, "services:\n"+tcpService("ok", free, a)+tcpService("busy", busy, a))
	d, err := New(Options{ConfigPath: path})
	if err != nil {
		t.Fatal(err)
	}
	err = d.Start(context.Background())
	if err == nil || !strings.Contains(err.Error(), "start service busy: listen tcp "+busy.String()) {
		t.Fatalf("start on a busy address: %v", err)
	}
	if _, err := ask(free); err == nil {
		t.Fatal("the service started before the failure is still listening")
	}
}

// Run drains on cancel and returns nil (exit status 0).
func TestRunDrainsOnCancel(t *testing.T) {
	a := nameServer(t, "a")
	web := freePort(t)
	path := filepath.Join(t.TempDir(), "lbctl.yaml")
	writeConfig(t, path, "drain_timeout: 10s\nservices:\n"+tcpService("web", web, a))
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- Run(ctx, Options{ConfigPath: path}) }()
	var c net.Conn
	waitFor(t, "listening", func() bool {
		var err error
		c, err = net.Dial("tcp", web.String())
		return err == nil
	})
	defer c.Close()
	c.SetDeadline(time.Now().Add(20 * time.Second))
	r := bufio.NewReader(c)
	fmt.Fprintln(c, "1")
	if _, err := r.ReadString('\n'); err != nil {
		t.Fatal(err)
	}
	cancel()
	waitFor(t, "stopped accepting", func() bool { _, err := ask(web); return err != nil })
	fmt.Fprintln(c, "2") // the open connection still works while draining
	if got, err := r.ReadString('\n'); err != nil || got != "a\n" {
		t.Fatalf("open connection while draining: %q, %v", got, err)
	}
	select {
	case err := <-done:
		t.Fatalf("Run returned (%v) with a connection open", err)
	default:
	}
	c.Close()
	if err := <-done; err != nil {
		t.Fatalf("Run after drain: %v", err)
	}
}

func TestNewRejectsBadConfig(t *testing.T) {
	path := filepath.Join(t.TempDir(), "lbctl.yaml")
	writeConfig(t, path, "services: []\n")
	if _, err := New(Options{ConfigPath: path}); err == nil || !strings.Contains(err.Error(), "load config") {
		t.Fatalf("New with no service: %v", err)
	}
}

func waitFor(t *testing.T, what string, cond func() bool) {
	t.Helper()
	for start := time.Now(); !cond(); {
		if time.Since(start) > 20*time.Second {
			t.Fatalf("gave up waiting: %s", what)
		}
		time.Sleep(10 * time.Millisecond)
	}
}

// Without a logger from the command line, the config's log block decides
// level and format.
func TestLoggerFromConfig(t *testing.T) {
	a := nameServer(t, "a")
	path := filepath.Join(t.TempDir(), "lbctl.yaml")
	writeConfig(t, path, "log: {level: warn, format: json}\nservices:\n"+tcpService("web", freePort(t), a))
	var out testenv.SyncBuffer
	d, err := New(Options{ConfigPath: path, LogTo: &out})
	if err != nil {
		t.Fatal(err)
	}
	d.Log().Info("quiet")
	d.Log().Warn("loud")
	if got := out.String(); strings.Contains(got, "quiet") || !strings.HasPrefix(got, `{"level":"warn"`) || !strings.Contains(got, `"msg":"loud"`) {
		t.Fatalf("log output %q: want only the warning, as JSON", got)
	}
}

// TestPprofOnControlSocket: Options.Pprof serves /debug/pprof/ on the
// control socket; without it the path is not there.
func TestPprofOnControlSocket(t *testing.T) {
	for _, on := range []bool{false, true} {
		t.Run(fmt.Sprint("pprof=", on), func(t *testing.T) {
			a := nameServer(t, "a")
			dir := t.TempDir()
			path, sock := filepath.Join(dir, "lbctl.yaml"), filepath.Join(dir, "control.sock")
			writeConfig(t, path, "services:\n"+tcpService("web", freePort(t), a))
			ctx, cancel := context.WithCancel(context.Background())
			done := make(chan error, 1)
			go func() { done <- Run(ctx, Options{ConfigPath: path, ControlSocket: sock, Pprof: on}) }()
			defer func() {
				cancel()
				if err := <-done; err != nil {
					t.Errorf("Run: %v", err)
				}
			}()
			tr := &http.Transport{DialContext: func(ctx context.Context, _, _ string) (net.Conn, error) {
				var d net.Dialer
				return d.DialContext(ctx, "unix", sock)
			}}
			defer tr.CloseIdleConnections()
			cl := &http.Client{Transport: tr, Timeout: 5 * time.Second}
			var code int
			waitFor(t, "control socket", func() bool {
				resp, err := cl.Get("http://lbctl/debug/pprof/cmdline")
				if err != nil {
					return false
				}
				resp.Body.Close()
				code = resp.StatusCode
				return true
			})
			want := http.StatusNotFound
			if on {
				want = http.StatusOK
			}
			if code != want {
				t.Fatalf("GET /debug/pprof/cmdline with Pprof %v: status %d, want %d", on, code, want)
			}
		})
	}
}
