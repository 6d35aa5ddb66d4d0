package testenv

import (
	"errors"
	"fmt"
	"net/netip"
	"os"
	"os/exec"
	"os/signal"
	"strings"
	"syscall"
	"testing"

	"golang.org/x/sys/unix"
)

// Addresses RunInNetns puts on lo inside the private namespace. Tests that
// open sockets outside a test/topo host use these instead of 127.0.0.1,
// ::1 or localhost. They lie in 198.18.0.0/15 and 2001:db8::/32 and
// collide with no test/topo address (198.18.98/24, 198.18.99/24,
// 198.19.16/24, 2001:db8:{16,98,99}::/64).
var (
	Addr4 = netip.MustParseAddr("198.18.0.1")
	Addr6 = netip.MustParseAddr("2001:db8::1")
)

// netnsEnv marks a test process re-executed by RunInNetns: "new" until it
// has set up lo, then "ready" (seen by fuzz workers and other children,
// which inherit the namespace and must not set it up again).
const netnsEnv = "LBCTL_TEST_NETNS"

// noNetns says why RunInNetns left the process in the namespace it started
// in; empty once the process runs in its private namespace.
var noNetns = "testenv.RunInNetns was not called from this package's TestMain"

// RunInNetns moves the test binary into a private network namespace, so
// that no test of the package opens a socket in the root namespace. Call it
// first thing in TestMain:
//
//	func TestMain(m *testing.M) {
//		testenv.RunInNetns()
//		goleak.VerifyTestMain(m)
//	}
//
// Not yet inside one, it re-executes the binary with the same arguments
// (so -run, -bench, -fuzz, -count pass through) in a new network namespace
// and exits with its exit code; it never returns. Inside (the re-executed
// binary), it brings lo up, adds Addr4/32 and Addr6/128 to it and returns.
// Without root it returns in the current namespace and RequireNetns skips
// (fails under CI=true) every test that opens a socket.
func RunInNetns() {
	switch os.Getenv(netnsEnv) {
	case "ready":
		noNetns = ""
		return
	case "new":
		if err := setupNetns(); err != nil {
			fmt.Fprintf(os.Stderr, "testenv: set up the private network namespace: %v\n", err)
			os.Exit(1)
		}
		os.Setenv(netnsEnv, "ready")
		noNetns = ""
		return
	}
	if os.Geteuid() != 0 || !hasCaps(unix.CAP_NET_ADMIN, unix.CAP_SYS_ADMIN) {
		noNetns = "opens sockets, so runs only in a private network namespace, which needs root (CAP_NET_ADMIN, CAP_SYS_ADMIN): run as root, e.g. sudo make test"
		return
	}
	os.Exit(reexec())
}

// RequireNetns skips t (or fails it under CI) unless RunInNetns moved the
// process into its private network namespace. Every test that opens a
// socket outside a test/topo host calls it.
func RequireNetns(t testing.TB) {
	t.Helper()
	if noNetns == "" {
		return
	}
	if InCI() {
		t.Fatal(noNetns + " — failing instead of skipping because CI=true")
	}
	t.Skip(noNetns)
}

// reexec runs this binary again in a new network namespace and returns
// its exit code. Signals (go test's timeout SIGQUIT, ^C) go to the child;
// the child dies with this process.
func reexec() int {
	self, err := os.Executable()
	if err != nil {
		fmt.Fprintf(os.Stderr, "testenv: find the test binary to re-run it in a private network namespace: %v\n", err)
		return 1
	}
	cmd := exec.Command(self, os.Args[1:]...)
	cmd.Args[0] = os.Args[0]
	cmd.Env = append(os.Environ(), netnsEnv+"=new")
	cmd.Stdin, cmd.Stdout, cmd.Stderr = os.Stdin, os.Stdout, os.Stderr
	cmd.SysProcAttr = &syscall.SysProcAttr{Cloneflags: syscall.CLONE_NEWNET, Pdeathsig: syscall.SIGKILL}
	sigs := make(chan os.Signal, 4)
	signal.Notify(sigs, syscall.SIGINT, syscall.SIGTERM, syscall.SIGQUIT, syscall.SIGHUP)
	if err := cmd.Start(); err != nil {
		fmt.Fprintf(os.Stderr, "testenv: re-run the test binary in a private network namespace: %v\n", err)
		return 1
	}
	go func() {
		for s := range sigs {
			_ = cmd.Process.Signal(s)
		}
	}()
	err = cmd.Wait()
	signal.Stop(sigs)
	var exit *exec.ExitError
	switch {
	case err == nil:
		return 0
	case errors.As(err, &exit):
		if ws, ok := exit.Sys().(syscall.WaitStatus); ok && ws.Signaled() {
			fmt.Fprintf(os.Stderr, "testenv: test binary in the private network namespace killed by %v\n", ws.Signal())
			return 128 + int(ws.Signal())
		}
		return exit.ExitCode()
	default:
		fmt.Fprintf(os.Stderr, "testenv: wait for the test binary in the private network namespace: %v\n", err)
		return 1
	}
}

// setupNetns brings lo up in the (new, empty) namespace and gives it the
// test addresses. It refuses to run in the root namespace.
func setupNetns() error {
	self, err1 := os.Readlink("/proc/self/ns/net")
	init, err2 := os.Readlink("/proc/1/ns/net")
	if err1 == nil && err2 == nil && self == init {
		return fmt.Errorf("%s=new but this is the root network namespace (%s); unset %s", netnsEnv, self, netnsEnv)
	}
	for _, args := range [][]string{
		{"link", "set", "lo", "up"},
		{"addr", "add", Addr4.String() + "/32", "dev", "lo"},
		{"-6", "addr", "add", Addr6.String() + "/128", "dev", "lo", "nodad"},
	} {
		if out, err := exec.Command("ip", args...).CombinedOutput(); err != nil {
			return fmt.Errorf("ip %s: %w: %s (install iproute2 with scripts/install-deps.sh)", strings.Join(args, " "), err, strings.TrimSpace(string(out)))
		}
	}
	return nil
}
