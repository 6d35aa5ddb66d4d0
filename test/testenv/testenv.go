// Package testenv decides whether a test that needs privileges may run.
//
// On a developer's laptop a test that needs root (BPF, network namespaces)
// skips with a message saying why. In CI (CI=true) it fails instead: a skip
// there would hide that the test never ran.
package testenv

import (
	"os"
	"os/exec"
	"testing"

	"golang.org/x/sys/unix"
)

// InCI reports whether the tests run under CI (CI=true or CI=1).
func InCI() bool {
	v := os.Getenv("CI")
	return v == "true" || v == "1"
}

// RequireRoot skips t (or fails it under CI) unless the process runs as
// root with the capabilities the privileged tests need.
func RequireRoot(t testing.TB) {
	t.Helper()
	if os.Geteuid() == 0 && hasCaps(unix.CAP_BPF, unix.CAP_NET_ADMIN, unix.CAP_SYS_ADMIN) {
		return
	}
	const msg = "needs root (CAP_BPF, CAP_NET_ADMIN, CAP_SYS_ADMIN): run as root, e.g. sudo make test"
	if InCI() {
		t.Fatal(msg + " — failing instead of skipping because CI=true")
	}
	t.Skip(msg)
}

// RequireCommand skips t (or fails it under CI) unless the named programs
// are on PATH. scripts/install-deps.sh installs all of them.
func RequireCommand(t testing.TB, names ...string) {
	t.Helper()
	for _, n := range names {
		if _, err := exec.LookPath(n); err != nil {
			msg := n + " not found on PATH: install it with scripts/install-deps.sh"
			if InCI() {
				t.Fatal(msg + " — failing instead of skipping because CI=true")
			}
			t.Skip(msg)
		}
	}
}

// hasCaps reports whether every capability in caps is in the effective set.
func hasCaps(caps ...int) bool {
	hdr := unix.CapUserHeader{Version: unix.LINUX_CAPABILITY_VERSION_3}
	var data [2]unix.CapUserData
	if err := unix.Capget(&hdr, &data[0]); err != nil {
		return false
	}
	for _, c := range caps {
		if data[c/32].Effective&(1<<(uint(c)%32)) == 0 {
			return false
		}
	}
	return true
}
