package testenv

import (
	"errors"
	"net"
	"net/netip"
	"os"
	"os/exec"
	"strconv"
	"strings"
	"testing"
)

func TestMain(m *testing.M) {
	RunInNetns()
	os.Exit(m.Run())
}

// The re-executed binary runs in a namespace other than its parent's (the
// binary go test started, which stays where it began), and the test
// addresses on lo carry traffic.
func TestRunInNetnsPrivate(t *testing.T) {
	RequireNetns(t)
	self, err := os.Readlink("/proc/self/ns/net")
	if err != nil {
		t.Fatal(err)
	}
	parent, err := os.Readlink("/proc/" + strconv.Itoa(os.Getppid()) + "/ns/net")
	if err != nil {
		t.Fatal(err)
	}
	if self == parent {
		t.Fatalf("test runs in its parent's network namespace %s", self)
	}
	for _, a := range []netip.Addr{Addr4, Addr6} {
		srv, err := net.ListenUDP("udp", net.UDPAddrFromAddrPort(netip.AddrPortFrom(a, 0)))
		if err != nil {
			t.Fatalf("listen on %s: %v", a, err)
		}
		defer srv.Close()
		c, err := net.DialUDP("udp", nil, srv.LocalAddr().(*net.UDPAddr))
		if err != nil {
			t.Fatal(err)
		}
		defer c.Close()
		if _, err := c.Write([]byte("ping")); err != nil {
			t.Fatal(err)
		}
		buf := make([]byte, 16)
		n, from, err := srv.ReadFromUDPAddrPort(buf)
		if err != nil || string(buf[:n]) != "ping" || from.Addr() != a {
			t.Fatalf("on %s: read %q from %s (%v), want \"ping\" from %s", a, buf[:n], from, err, a)
		}
	}
}

// TestHelper only fails or passes when TestRunInNetnsExitStatus runs it.
func TestHelper(t *testing.T) {
	switch os.Getenv("TESTENV_HELPER") {
	case "fail":
		t.Fatal("failing on purpose")
	case "pass":
	default:
		t.Skip("run by TestRunInNetnsExitStatus")
	}
}

// A re-executed binary passes its arguments and exit status through.
func TestRunInNetnsExitStatus(t *testing.T) {
	RequireNetns(t)
	self, err := os.Executable()
	if err != nil {
		t.Fatal(err)
	}
	for _, tc := range []struct {
		mode string
		code int
		out  string
	}{{"pass", 0, "--- PASS: TestHelper"}, {"fail", 1, "--- FAIL: TestHelper"}} {
		var env []string
		for _, e := range os.Environ() {
			if !strings.HasPrefix(e, netnsEnv+"=") { // re-execute once more (nested, inside this namespace)
				env = append(env, e)
			}
		}
		cmd := exec.Command(self, "-test.run=^TestHelper$", "-test.v", "-test.count=2")
		cmd.Env = append(env, "TESTENV_HELPER="+tc.mode)
		out, err := cmd.CombinedOutput()
		code := 0
		var exit *exec.ExitError
		if errors.As(err, &exit) {
			code = exit.ExitCode()
		} else if err != nil {
			t.Fatal(err)
		}
		if code != tc.code || strings.Count(string(out), tc.out) != 2 {
			t.Errorf("%s: exit %d, want %d, and twice %q (-count passed through); output:\n%s", tc.mode, code, tc.code, tc.out, out)
		}
	}
}
