package main

import (
	"net"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"runtime"
	"strings"
	"testing"

	"golang.org/x/sys/unix"

	"github.com/lbctl/lbctl/test/testenv"
)

// inNetns runs fn on an OS thread moved into a new network namespace; the
// thread stays locked and exits with fn, taking the namespace with it.
func inNetns(t *testing.T, fn func()) {
	t.Helper()
	done := make(chan struct{})
	go func() {
		defer close(done)
		runtime.LockOSThread()
		if err := unix.Unshare(unix.CLONE_NEWNET); err != nil {
			t.Errorf("unshare netns: %v", err)
			return
		}
		fn()
	}()
	<-done
}

// cmdOut runs a command in the calling thread's network namespace.
func cmdOut(t *testing.T, name string, args ...string) string {
	t.Helper()
	out, err := exec.Command(name, args...).CombinedOutput()
	if err != nil {
		t.Errorf("%s %v: %v: %s", name, args, err, out)
	}
	return string(out)
}

// vethPair makes v0 (198.19.16.11/24, a static neighbour 198.19.16.99)
// and its peer v1, both up.
func vethPair(t *testing.T) {
	t.Helper()
	cmdOut(t, "ip", "link", "add", "v0", "type", "veth", "peer", "name", "v1")
	cmdOut(t, "ip", "addr", "add", "198.19.16.11/24", "dev", "v0")
	cmdOut(t, "ip", "link", "set", "v0", "up")
	cmdOut(t, "ip", "link", "set", "v1", "up")
	cmdOut(t, "ip", "neigh", "add", "198.19.16.99", "lladdr", "02:00:00:00:00:99", "dev", "v0")
}

func sendUDP(t *testing.T, from, to string) {
	t.Helper()
	c, err := net.DialUDP("udp", net.UDPAddrFromAddrPort(netip.MustParseAddrPort(from)), net.UDPAddrFromAddrPort(netip.MustParseAddrPort(to)))
	if err != nil {
		t.Errorf("dial: %v", err)
		return
	}
	defer c.Close()
	if _, err := c.Write([]byte("answer")); err != nil {
		t.Errorf("send: %v", err)
	}
}

// TestAttachClsactFallback forces the clsact + cls_bpf path (this kernel
// has tcx): the filter is installed, rewrites real traffic, and detach
// removes it and the pinned state.
func TestAttachClsactFallback(t *testing.T) {
	testenv.RequireCommand(t, "ip", "tc")
	root := tempBPFFS(t)
	inNetns(t, func() {
		vethPair(t)
		code, out, stderr := lbctl(t, "--bpffs", root, "attach", "v0", "--clsact")
		if code != 0 || !strings.Contains(out, "with clsact+cls_bpf") {
			t.Errorf("attach --clsact: exit %d, %q %q", code, out, stderr)
			return
		}
		if f := cmdOut(t, "tc", "filter", "show", "dev", "v0", "egress"); !strings.Contains(f, "lbctl_snat") || !strings.Contains(f, "direct-action") {
			t.Errorf("no lbctl_snat direct-action filter on v0 egress: %q", f)
		}
		if _, err := os.Stat(filepath.Join(root, "lbctl/links/v0/snat_cls")); err != nil {
			t.Errorf("cls program not pinned: %v", err)
		}
		// Idempotent: attaching again replaces the filter, not adds one.
		if code, _, stderr := lbctl(t, "--bpffs", root, "attach", "v0", "--clsact"); code != 0 {
			t.Errorf("second attach: exit %d %q", code, stderr)
		}
		if f := cmdOut(t, "tc", "filter", "show", "dev", "v0", "egress"); strings.Count(f, "lbctl_snat") != 1 {
			t.Errorf("after re-attach, want one lbctl_snat filter: %q", f)
		}
		if code, _, stderr := lbctl(t, "--bpffs", root, "snat", "add", "--src", "198.19.16.0/28", "--proto", "udp", "--sport", "53", "--to", "198.18.98.10"); code != 0 {
			t.Errorf("snat add: %d %q", code, stderr)
		}
		sendUDP(t, "198.19.16.11:53", "198.19.16.99:40000")
		code, out, _ = lbctl(t, "--bpffs", root, "stats")
		if code != 0 || !regexpLine(out, `snat\s+rewritten\s+1`) {
			t.Errorf("stats after one datagram: %q", out)
		}
		code, out, stderr = lbctl(t, "--bpffs", root, "detach", "v0")
		if code != 0 || !strings.Contains(out, "detached snat from v0 (clsact+cls_bpf)") {
			t.Errorf("detach: exit %d, %q %q", code, out, stderr)
		}
		if f := cmdOut(t, "tc", "filter", "show", "dev", "v0", "egress"); strings.Contains(f, "lbctl_snat") {
			t.Errorf("filter still there after detach: %q", f)
		}
		if _, err := os.Stat(filepath.Join(root, "lbctl")); err == nil {
			t.Errorf("pinned state left after the last detach")
		}
	})
}

// TestAttachTCXAndErrors: the default path is tcx; an unknown interface
// is a runtime error listing the interfaces there are.
func TestAttachTCXAndErrors(t *testing.T) {
	testenv.RequireCommand(t, "ip")
	root := tempBPFFS(t)
	inNetns(t, func() {
		vethPair(t)
		code, out, stderr := lbctl(t, "--bpffs", root, "attach", "v0")
		if code != 0 || !strings.Contains(out, "with tcx") {
			t.Errorf("attach: exit %d, %q %q", code, out, stderr)
		}
		code, _, stderr = lbctl(t, "--bpffs", root, "attach", "eth7")
		if code != 1 || !strings.Contains(stderr, `unknown interface "eth7"`) || !strings.Contains(stderr, "available: lo, v0, v1") {
			t.Errorf("attach eth7: exit %d, %q", code, stderr)
		}
		// veth has native XDP; generic is forced with --xdp-mode and
		// replaces the native attachment (one XDP program per interface).
		code, out, stderr = lbctl(t, "--bpffs", root, "attach", "v0", "--xdp")
		if code != 0 || !strings.Contains(out, "attached xdp_lb to v0 in native mode") {
			t.Errorf("attach --xdp: exit %d, %q %q", code, out, stderr)
		}
		if l := cmdOut(t, "ip", "link", "show", "v0"); !strings.Contains(l, "xdp ") {
			t.Errorf("no native XDP program on v0: %q", l)
		}
		code, out, stderr = lbctl(t, "--bpffs", root, "attach", "v0", "--xdp-mode", "generic")
		if code != 0 || !strings.Contains(out, "attached xdp_lb to v0 in generic mode") {
			t.Errorf("attach --xdp-mode generic: exit %d, %q %q", code, out, stderr)
		}
		if l := cmdOut(t, "ip", "link", "show", "v0"); !strings.Contains(l, "xdpgeneric") {
			t.Errorf("no generic XDP program on v0: %q", l)
		}
		if code, out, _ := lbctl(t, "--bpffs", root, "detach", "v1"); code != 0 || !strings.Contains(out, "nothing attached to v1") {
			t.Errorf("detach v1: exit %d, %q", code, out)
		}
		code, out, _ = lbctl(t, "--bpffs", root, "detach", "v0")
		if code != 0 || !strings.Contains(out, "detached snat from v0 (tcx)") || !strings.Contains(out, "detached xdp_lb from v0 (xdp-generic)") {
			t.Errorf("detach v0: exit %d, %q", code, out)
		}
		if l := cmdOut(t, "ip", "link", "show", "v0"); strings.Contains(l, "xdp") {
			t.Errorf("XDP program left on v0 after detach: %q", l)
		}
	})
}

// TestMissingCapability: without CAP_BPF / CAP_NET_ADMIN / CAP_SYS_ADMIN
// the error names the capabilities. Capabilities are per thread: they are
// dropped on a locked thread that exits afterwards.
func TestMissingCapability(t *testing.T) {
	root := tempBPFFS(t)
	done := make(chan struct{})
	go func() {
		defer close(done)
		runtime.LockOSThread()
		hdr := unix.CapUserHeader{Version: unix.LINUX_CAPABILITY_VERSION_3}
		var data [2]unix.CapUserData
		if err := unix.Capget(&hdr, &data[0]); err != nil {
			t.Errorf("capget: %v", err)
			return
		}
		for _, c := range []int{unix.CAP_BPF, unix.CAP_NET_ADMIN, unix.CAP_SYS_ADMIN, unix.CAP_PERFMON} {
			data[c/32].Effective &^= 1 << (uint(c) % 32)
		}
		if err := unix.Capset(&hdr, &data[0]); err != nil {
			t.Errorf("capset: %v", err)
			return
		}
		code, _, stderr := lbctl(t, "--bpffs", root, "snat", "add", "--src", "198.19.16.0/28", "--proto", "udp", "--to", "198.18.98.10")
		if code != 1 || !strings.Contains(stderr, "CAP_BPF") || !strings.Contains(stderr, "CAP_NET_ADMIN") {
			t.Errorf("snat add without capabilities: exit %d, %q; want exit 1 naming CAP_BPF and CAP_NET_ADMIN", code, stderr)
		}
	}()
	<-done
}

func regexpLine(s, re string) bool {
	for _, l := range strings.Split(s, "\n") {
		if matched(re, l) {
			return true
		}
	}
	return false
}

func matched(re, s string) bool { return regexp.MustCompile(re).MatchString(s) }

// TestWarnsWhenStateWouldVanish: in a private mount namespace (as under
// `ip netns exec`) lbctl mounts the bpffs it needs but warns that the
// pinned state will vanish with the command.
func TestWarnsWhenStateWouldVanish(t *testing.T) {
	testenv.RequireRoot(t)
	dir := t.TempDir()
	done := make(chan struct{})
	go func() {
		defer close(done)
		runtime.LockOSThread() // never unlocked: the namespace dies with the thread
		if err := unix.Unshare(unix.CLONE_NEWNS); err != nil {
			t.Errorf("unshare mount namespace: %v", err)
			return
		}
		if err := unix.Mount("", "/", "", unix.MS_REC|unix.MS_SLAVE, ""); err != nil {
			t.Errorf("make / a slave: %v", err)
			return
		}
		code, _, stderr := lbctl(t, "--bpffs", dir, "snat", "add", "--src", "198.19.16.0/28", "--proto", "udp", "--to", "198.18.98.10")
		if code != 0 || !strings.Contains(stderr, "will vanish when this command exits") || !strings.Contains(stderr, "--bpffs DIR") {
			t.Errorf("exit %d, stderr %q: want success and a warning that the state will vanish", code, stderr)
		}
	}()
	<-done
	var st unix.Statfs_t
	if err := unix.Statfs(dir, &st); err != nil || st.Type == unix.BPF_FS_MAGIC {
		t.Errorf("the bpffs mounted in the private namespace leaked into the test's (%v)", err)
	}
}
