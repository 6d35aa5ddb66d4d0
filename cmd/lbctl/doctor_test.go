package main

import (
	"errors"
	"flag"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"

	"github.com/lbctl/lbctl/test/testenv"
	"github.com/lbctl/lbctl/test/topo"
)

// doctorConfig: one service per kind of host set-up the doctor knows.
const doctorConfig = `services:
  - name: web
    protocol: tcp
    listen: 198.18.98.10:80
    mode: transparent
    upstreams: [198.19.16.11:80]
  - name: dns
    protocol: udp
    listen: 198.18.98.10:53
    mode: dsr
    dsr: {nat: router}
    upstreams: [198.19.16.13:53, 198.19.16.14:53]
    health: {type: dns, query: www.example.com}
  - name: origin
    protocol: udp
    listen: 198.18.98.10:5353
    mode: dsr
    dsr: {nat: origin}
    upstreams: [198.19.16.12:53]
    health: {type: dns, query: www.example.com}
`

// doctorIn runs lbctl doctor in h's network namespace (in-process, on a
// thread moved there) and returns exit status and stdout.
func doctorIn(t *testing.T, h *topo.Host, cfg string, extra ...string) (int, string) {
	t.Helper()
	var code int
	var out, stderr string
	// A generous probe timeout: a loaded CI machine must not fail a healthy check.
	args := append([]string{"--bpffs", h.BPFFS, "doctor", "-c", cfg, "--timeout", "3s"}, extra...)
	if err := h.Do(func() error {
		code, out, stderr = lbctl(t, args...)
		return nil
	}); err != nil {
		t.Fatal(err)
	}
	if code != 0 {
		t.Logf("doctor in %s: exit %d\n%s%s", h.Role, code, out, stderr)
	}
	return code, out
}

func mustRun(t *testing.T, h *topo.Host, args ...string) {
	t.Helper()
	if _, err := h.Run(args[0], args[1:]...); err != nil {
		t.Fatal(err)
	}
}

// failLine reports whether out has a FAIL line for check name.
func failLine(out, name string) bool {
	for _, l := range strings.Split(out, "\n") {
		if strings.HasPrefix(l, "FAIL") && strings.HasPrefix(strings.TrimSpace(strings.TrimPrefix(l, "FAIL")), name) {
			return true
		}
	}
	return false
}

// TestDoctor: a healthy set-up of the LB and two backends passes; each
// broken variant makes doctor exit 1 with its FAIL line, and the set-up
// passes again once repaired.
func TestDoctor(t *testing.T) {
	testenv.RequireCommand(t, "ip", "sysctl")
	tp := topo.Start(t, topo.Options{Backends: 4, OriginNAT: true, LBForward: true})
	cfg := filepath.Join(t.TempDir(), "lbctl.yaml")
	if err := os.WriteFile(cfg, []byte(doctorConfig), 0o600); err != nil {
		t.Fatal(err)
	}
	lb, b1, b2 := tp.LB, tp.Backends[0], tp.Backends[1]

	// The LB: policy routing of transparent mode, snat for router NAT.
	mustRun(t, lb, "ip", "rule", "add", "fwmark", "0x1062", "lookup", "4194")
	mustRun(t, lb, "ip", "route", "add", "local", "0.0.0.0/0", "dev", "lo", "table", "4194")
	mustRun(t, lb, "sysctl", "-qw", "net.ipv4.conf.all.rp_filter=0")
	if err := lb.Do(func() error {
		if code, out, stderr := lbctl(t, "--bpffs", lb.BPFFS, "attach", "eth0"); code != 0 {
			t.Errorf("attach on the LB: exit %d %s %s", code, out, stderr)
		}
		if code, out, stderr := lbctl(t, "--bpffs", lb.BPFFS, "attach", "eth1", "--steer", "--upstream", "tcp:198.19.16.11:80"); code != 0 {
			t.Errorf("attach --steer on the LB: exit %d %s %s", code, out, stderr)
		}
		return nil
	}); err != nil {
		t.Fatal(err)
	}
	// backend1 serves web (transparent): its replies to clients must go
	// through the LB, so it loses the topology's origin-NAT public route;
	// backend2 rewrites its own replies.
	mustRun(t, b1, "ip", "route", "del", "198.18.99.0/24")
	if err := b1.Do(func() error {
		l, err := net.Listen("tcp", "198.19.16.11:80")
		if err == nil {
			t.Cleanup(func() { l.Close() })
		}
		return err
	}); err != nil {
		t.Fatal(err)
	}
	mustRun(t, b2, "sysctl", "-qw", "net.ipv4.conf.all.rp_filter=0", "net.ipv4.conf.eth0.rp_filter=2")
	if err := b2.Do(func() error {
		for _, args := range [][]string{
			{"--bpffs", b2.BPFFS, "attach", "eth1"},
			{"--bpffs", b2.BPFFS, "snat", "add", "--src", "198.19.16.12/32", "--proto", "udp", "--sport", "53", "--to", "198.18.98.10:5353"},
		} {
			if code, out, stderr := lbctl(t, args...); code != 0 {
				t.Errorf("lbctl %v on backend2: exit %d %s %s", args, code, out, stderr)
			}
		}
		return nil
	}); err != nil {
		t.Fatal(err)
	}

	// On the LB, --client gives the clients' network: the return path of
	// the transparent service is probed from a client's address.
	lbArgs := []string{"--client", "198.18.99.0/24"}
	hosts := []struct {
		h    *topo.Host
		args []string
	}{
		{lb, lbArgs},
		{b1, []string{"--upstream", "--lb", "198.19.16.1", "--client", "198.18.99.0/24"}},
		{b2, []string{"--upstream", "--lb", "198.19.16.1"}},
	}
	healthy := func(when string) {
		t.Helper()
		for _, h := range hosts {
			code, out := doctorIn(t, h.h, cfg, h.args...)
			if code != 0 || strings.Contains(out, "FAIL") || !strings.Contains(out, "PASS") {
				t.Errorf("%s: doctor on %s: exit %d, want 0 and no FAIL:\n%s", when, h.h.Role, code, out)
			}
		}
		code, out := doctorIn(t, lb, cfg, lbArgs...)
		for _, want := range []string{"PASS  privileges", "attached snat eth0", "policy rule ipv4", "local route ipv4",
			"forwarding ipv4", "subnets web", "upstream 198.19.16.11:80/tcp", "upstream 198.19.16.13:53/udp",
			"PASS  return path web 198.19.16.11:80"} {
			if code != 0 || !strings.Contains(out, want) {
				t.Errorf("%s: doctor on the LB does not report %q:\n%s", when, want, out)
			}
		}
	}
	healthy("healthy set-up")

	for _, v := range []struct {
		name        string
		host        *topo.Host
		args        []string
		break_, fix [][]string
		want        string
		fails       int        // FAIL lines expected; 0 means 1
		on          *topo.Host // where break_ and fix run, if not host
	}{
		{
			name: "rp_filter strict on the interface origin-NAT datagrams arrive on",
			host: b2, args: hosts[2].args,
			break_: [][]string{{"sysctl", "-qw", "net.ipv4.conf.eth0.rp_filter=1"}},
			fix:    [][]string{{"sysctl", "-qw", "net.ipv4.conf.eth0.rp_filter=2"}},
			want:   "rp_filter eth0",
		},
		{
			name:   "missing local route of the policy routing",
			host:   lb,
			break_: [][]string{{"ip", "route", "del", "local", "0.0.0.0/0", "dev", "lo", "table", "4194"}},
			fix:    [][]string{{"ip", "route", "add", "local", "0.0.0.0/0", "dev", "lo", "table", "4194"}},
			want:   "local route ipv4",
			fails:  2, // and the return path it breaks
		},
		{
			name:   "missing policy rule",
			host:   lb,
			break_: [][]string{{"ip", "rule", "del", "fwmark", "0x1062", "lookup", "4194"}},
			fix:    [][]string{{"ip", "rule", "add", "fwmark", "0x1062", "lookup", "4194"}},
			want:   "policy rule ipv4",
			fails:  2, // and the return path it breaks
		},
		{
			name: "transparent replies not coming back: the backend's default route bypasses the LB",
			host: lb, args: lbArgs, on: b1,
			break_: [][]string{{"ip", "route", "replace", "default", "via", "198.19.16.254"}},
			fix:    [][]string{{"ip", "route", "replace", "default", "via", "198.19.16.1"}},
			want:   "return path web 198.19.16.11:80",
		},
		{
			name: "backend default route not via the LB",
			host: b1, args: hosts[1].args,
			break_: [][]string{{"ip", "route", "replace", "default", "via", "198.19.16.254"}},
			fix:    [][]string{{"ip", "route", "replace", "default", "via", "198.19.16.1"}},
			want:   "default route ipv4",
			fails:  2, // and the route to the clients (--client), which is the default one
		},
		{
			name:   "client network overlapping the upstreams'",
			host:   lb,
			break_: [][]string{{"ip", "addr", "add", "198.19.0.10/16", "dev", "eth0"}},
			fix:    [][]string{{"ip", "addr", "del", "198.19.0.10/16", "dev", "eth0"}},
			want:   "subnets web",
			fails:  2, // dns has the same upstream network
		},
		{
			name:   "forwarding off for router NAT",
			host:   lb,
			break_: [][]string{{"sysctl", "-qw", "net.ipv4.ip_forward=0"}},
			fix:    [][]string{{"sysctl", "-qw", "net.ipv4.ip_forward=1"}},
			want:   "forwarding ipv4",
		},
		{
			name: "snat not attached on the LB",
			host: lb,
			want: "attached snat eth0",
		},
		{
			name: "backend without its origin-NAT rule",
			host: b2, args: hosts[2].args,
			want: "snat rule origin 198.19.16.12:53",
		},
		{
			name: "upstream not listening",
			host: lb,
			want: "upstream 198.19.16.11:80/tcp",
		},
	} {
		t.Run(v.name, func(t *testing.T) {
			switch v.want {
			case "attached snat eth0":
				lbDo(t, lb, []string{"detach", "eth0"})
				defer lbDo(t, lb, []string{"attach", "eth0"})
			case "snat rule origin 198.19.16.12:53":
				lbDo(t, b2, []string{"snat", "del", "--src", "198.19.16.12/32", "--proto", "udp", "--sport", "53"})
				defer lbDo(t, b2, []string{"snat", "add", "--src", "198.19.16.12/32", "--proto", "udp", "--sport", "53", "--to", "198.18.98.10:5353"})
			case "upstream 198.19.16.11:80/tcp":
				// Nothing listens on port 81: use a config pointing there.
				alt := filepath.Join(t.TempDir(), "alt.yaml")
				if err := os.WriteFile(alt, []byte(strings.Replace(doctorConfig, "198.19.16.11:80", "198.19.16.11:81", 1)), 0o600); err != nil {
					t.Fatal(err)
				}
				code, out := doctorIn(t, lb, alt)
				if code != 1 || !failLine(out, "upstream 198.19.16.11:81/tcp") {
					t.Errorf("exit %d, want 1 and a FAIL line for upstream 198.19.16.11:81/tcp:\n%s", code, out)
				}
				return
			}
			on := v.host
			if v.on != nil {
				on = v.on
			}
			for _, c := range v.break_ {
				mustRun(t, on, c...)
			}
			if v.host == lb && v.args == nil {
				v.args = lbArgs
			}
			code, out := doctorIn(t, v.host, cfg, v.args...)
			for _, c := range v.fix {
				mustRun(t, on, c...)
			}
			if code != 1 || !failLine(out, v.want) {
				t.Errorf("exit %d, want 1 and a FAIL line for %q:\n%s", code, v.want, out)
			}
			if n := max(v.fails, 1); strings.Count(out, "\nFAIL") != n {
				t.Errorf("want exactly %d FAIL lines (%s):\n%s", n, v.want, out)
			}
			for _, l := range strings.Split(out, "\n") {
				if strings.HasPrefix(l, "FAIL") && !strings.Contains(l, "fix: ") {
					t.Errorf("FAIL line without a fix: %s", l)
				}
			}
		})
	}
	healthy("after the repairs")

	// Missing capability: a child process whose bounding set lacks
	// CAP_NET_RAW (capsh --drop) runs doctor in the LB's namespace.
	t.Run("missing CAP_NET_RAW", func(t *testing.T) {
		testenv.RequireCommand(t, "capsh")
		self, err := os.Executable()
		if err != nil {
			t.Fatal(err)
		}
		cmd := exec.Command("ip", "netns", "exec", lb.NS, "capsh", "--drop=cap_net_raw", "--",
			"-c", `exec "$0" "$@"`, self, "-test.run=^TestDoctorChild$", "--",
			"--bpffs", lb.BPFFS, "doctor", "-c", cfg)
		cmd.Env = append(os.Environ(), "LBCTL_DOCTOR_CHILD=1")
		out, err := cmd.Output()
		var ee *exec.ExitError
		if !errors.As(err, &ee) || ee.ExitCode() != 1 {
			t.Fatalf("child: %v, want exit 1:\n%s", err, out)
		}
		if !failLine(string(out), "privileges") || !strings.Contains(string(out), "missing CAP_NET_RAW") ||
			!strings.Contains(string(out), "--cap-add NET_RAW") {
			t.Errorf("want a FAIL privileges line naming CAP_NET_RAW and its fix:\n%s", out)
		}
		t.Logf("doctor without CAP_NET_RAW:\n%s", out)
		if strings.Count(string(out), "\nFAIL") != 0 || !strings.HasPrefix(string(out), "FAIL") {
			t.Errorf("want the privileges line as the only FAIL (the pings cannot be sent: WARN):\n%s", out)
		}
		if strings.Contains(string(out), "CAP_BPF,") || strings.Contains(string(out), "missing CAP_NET_ADMIN") {
			t.Errorf("only CAP_NET_RAW was dropped:\n%s", out)
		}
	})
}

// TestDoctorChild is the child process of TestDoctor's capability case:
// it runs lbctl with the arguments after "--" and exits with its status.
func TestDoctorChild(t *testing.T) {
	if os.Getenv("LBCTL_DOCTOR_CHILD") != "1" {
		return // only as TestDoctor's child
	}
	code := run(t.Context(), flag.Args(), os.Stdout, os.Stderr)
	os.Exit(code)
}

func lbDo(t *testing.T, h *topo.Host, args []string) {
	t.Helper()
	if err := h.Do(func() error {
		if code, out, stderr := lbctl(t, append([]string{"--bpffs", h.BPFFS}, args...)...); code != 0 {
			t.Errorf("lbctl %v in %s: exit %d %s %s", args, h.Role, code, out, stderr)
		}
		return nil
	}); err != nil {
		t.Fatal(err)
	}
}

// udpDoctorConfig: transparent UDP services, IPv4 and IPv6, whose
// upstreams speak DNS (a dns health check), one with a udp check, and one
// without a check.
const udpDoctorConfig = `services:
  - name: resolver
    protocol: udp
    listen: 198.18.98.10:53
    mode: transparent
    upstreams: [198.19.16.11:53]
    health: {type: dns, query: www.example.com}
  - name: resolver6
    protocol: udp
    listen: "[2001:db8:98::10]:53"
    mode: transparent
    upstreams: ["[2001:db8:16::11]:53"]
    health: {type: dns, query: www.example.com}
  - name: syslog
    protocol: udp
    listen: 198.18.98.10:514
    mode: transparent
    upstreams: [198.19.16.11:514]
  - name: game
    protocol: udp
    listen: 198.18.98.10:7777
    mode: transparent
    upstreams: [198.19.16.11:7777]
    health: {type: udp, send: "lbctl doctor probe"}
`

// serveDNSIn answers every datagram to addr, in h's namespace, with the
// datagram itself as a response (QR bit set): a NOERROR reply to the same
// ID and question, which is all a dns check without expect asks.
func serveDNSIn(t *testing.T, h *topo.Host, addr string) {
	t.Helper()
	var pc net.PacketConn
	if err := h.Do(func() (err error) {
		pc, err = net.ListenPacket("udp", addr)
		return err
	}); err != nil {
		t.Fatal(err)
	}
	done := make(chan struct{})
	t.Cleanup(func() { pc.Close(); <-done })
	go func() {
		defer close(done)
		buf := make([]byte, 512)
		for {
			n, from, err := pc.ReadFrom(buf)
			if err != nil {
				return
			}
			if n >= 12 {
				buf[2] |= 0x80 // QR: a response
				_, _ = pc.WriteTo(buf[:n], from)
			}
		}
	}()
}

// TestDoctorUDPReturnPath: the return path of transparent UDP services is
// probed with their dns or udp check's request sent from a client address, IPv4
// and IPv6; it fails when the backend's replies bypass the LB or steer
// does not know the upstream, and a service without such a check is
// skipped with what to configure.
func TestDoctorUDPReturnPath(t *testing.T) {
	testenv.RequireCommand(t, "ip", "sysctl")
	tp := topo.Start(t, topo.Options{Backends: 1})
	dir := t.TempDir()
	cfg := filepath.Join(dir, "lbctl.yaml")
	if err := os.WriteFile(cfg, []byte(udpDoctorConfig), 0o600); err != nil {
		t.Fatal(err)
	}
	lb, b1 := tp.LB, tp.Backends[0]
	mustRun(t, lb, "sysctl", "-qw", "net.ipv4.conf.all.rp_filter=0")
	lbDo(t, lb, []string{"attach", "eth1", "--steer",
		"--upstream", "udp:198.19.16.11:53", "--upstream", "udp:[2001:db8:16::11]:53", "--upstream", "udp:198.19.16.11:514",
		"--upstream", "udp:198.19.16.11:7777"})
	serveDNSIn(t, b1, "198.19.16.11:53")
	serveDNSIn(t, b1, "[2001:db8:16::11]:53")
	serveDNSIn(t, b1, "198.19.16.11:7777") // any reply passes a udp check without expect
	args := []string{"--client", "198.18.99.0/24", "--client", "2001:db8:99::/64"}

	line := func(out, prefix string) string {
		for _, l := range strings.Split(out, "\n") {
			if strings.HasPrefix(l, prefix) {
				return l
			}
		}
		return ""
	}
	healthy := func(when string) {
		t.Helper()
		code, out := doctorIn(t, lb, cfg, args...)
		if code != 0 || strings.Contains(out, "FAIL") {
			t.Errorf("%s: exit %d, want 0 and no FAIL:\n%s", when, code, out)
		}
		for _, want := range []string{
			"PASS  return path resolver 198.19.16.11:53",
			"PASS  return path resolver6 [2001:db8:16::11]:53",
			"PASS  return path game 198.19.16.11:7777",
		} {
			if l := line(out, want); !strings.Contains(l, "answered a query from client address") {
				t.Errorf("%s: want %q answered from a client address:\n%s", when, want, out)
			}
		}
		l := line(out, "WARN  return path syslog 198.19.16.11:514")
		if !strings.Contains(l, "not probed") || !strings.Contains(l, "fix: give syslog a health check its upstreams answer (health: {type: dns, query: NAME} if they speak DNS, else {type: udp, send: PAYLOAD, expect: REPLY})") {
			t.Errorf("%s: want the syslog return path skipped with what to configure:\n%s", when, out)
		}
	}
	healthy("healthy set-up")

	for _, v := range []struct {
		name        string
		cfg         string // "" = udpDoctorConfig
		break_, fix []string
		want        []string // the FAIL lines, each saying detail
		detail      string
	}{
		{
			name:   "IPv4 replies bypass the LB",
			break_: []string{"ip", "route", "replace", "default", "via", "198.19.16.254"},
			fix:    []string{"ip", "route", "replace", "default", "via", "198.19.16.1"},
			want:   []string{"return path resolver 198.19.16.11:53", "return path game 198.19.16.11:7777"},
			detail: "query from 198.18.99.1: no reply within timeout: the upstream's reply did not come back",
		},
		{
			name:   "IPv6 replies bypass the LB",
			break_: []string{"ip", "-6", "route", "replace", "default", "via", "2001:db8:16::254"},
			fix:    []string{"ip", "-6", "route", "replace", "default", "via", "2001:db8:16::1"},
			want:   []string{"return path resolver6 [2001:db8:16::11]:53"},
			detail: "query from 2001:db8:99::1: no reply within timeout: the upstream's reply did not come back",
		},
		{
			name:   "steer does not know the upstream",
			cfg:    strings.Replace(udpDoctorConfig, "198.19.16.11:53", "198.19.16.11:5353", 1),
			want:   []string{"return path resolver 198.19.16.11:5353"},
			detail: "steer does not mark replies from 198.19.16.11:5353",
		},
	} {
		t.Run(v.name, func(t *testing.T) {
			c := cfg
			if v.cfg != "" {
				c = filepath.Join(t.TempDir(), "alt.yaml")
				if err := os.WriteFile(c, []byte(v.cfg), 0o600); err != nil {
					t.Fatal(err)
				}
			}
			if v.break_ != nil {
				mustRun(t, b1, v.break_...)
			}
			code, out := doctorIn(t, lb, c, args...)
			if v.fix != nil {
				mustRun(t, b1, v.fix...)
			}
			if code != 1 {
				t.Errorf("exit %d, want 1:\n%s", code, out)
			}
			for _, w := range v.want {
				l := line(out, "FAIL  "+w)
				if !strings.Contains(l, v.detail) || !strings.Contains(l, "fix: ") {
					t.Errorf("want a FAIL line for %q saying %q, with a fix:\n%s", w, v.detail, out)
				}
			}
			if n := strings.Count("\n"+out, "\nFAIL"); n != len(v.want) {
				t.Errorf("want exactly %d FAIL lines (%v), got %d:\n%s", len(v.want), v.want, n, out)
			}
		})
	}
	healthy("after the repairs")
}
