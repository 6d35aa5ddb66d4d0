// Package container checks the lbctl image for real: a static lbctl in a
// scratch image, run by podman with only CAP_BPF, CAP_NET_ADMIN and
// CAP_NET_RAW (every other capability dropped), in the network namespace
// of a test "host" and with that host's bpffs mounted at /sys/fs/bpf.
//
// The image is built FROM scratch around a binary built here, not with the
// repository's Dockerfile: its build stage pulls docker.io/library/golang,
// and the test machines reach no container registry.
package container

import (
	"crypto/rand"
	"encoding/hex"
	"encoding/json"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"strings"
	"syscall"
	"testing"

	"golang.org/x/sys/unix"

	"github.com/lbctl/lbctl/test/testenv"
)

// run runs cmd and returns its combined output; it fails the test on error.
func run(t *testing.T, name string, args ...string) string {
	t.Helper()
	out, err := exec.Command(name, args...).CombinedOutput()
	if err != nil {
		t.Fatalf("%s %s: %v\n%s", name, strings.Join(args, " "), err, out)
	}
	return string(out)
}

// seccompWithBPF writes podman's default seccomp profile with bpf(2)
// allowed: the default allows it only with CAP_SYS_ADMIN.
func seccompWithBPF(t *testing.T, dir string) string {
	t.Helper()
	b, err := os.ReadFile("/usr/share/containers/seccomp.json")
	if err != nil {
		t.Fatalf("podman's default seccomp profile: %v", err)
	}
	var prof map[string]any
	if err := json.Unmarshal(b, &prof); err != nil {
		t.Fatal(err)
	}
	calls, _ := prof["syscalls"].([]any)
	prof["syscalls"] = append([]any{map[string]any{"names": []string{"bpf"}, "action": "SCMP_ACT_ALLOW"}}, calls...)
	b, err = json.Marshal(prof)
	if err != nil {
		t.Fatal(err)
	}
	path := filepath.Join(dir, "seccomp-bpf.json")
	if err := os.WriteFile(path, b, 0o600); err != nil {
		t.Fatal(err)
	}
	return path
}

// TestImageWithThreeCapabilities: the image attaches snat, adds a rule,
// rewrites real traffic, reports counters and status and passes doctor's
// privilege check with only the three capabilities; the pinned state is
// root's only; without bpf(2) in the seccomp profile it cannot work.
func TestImageWithThreeCapabilities(t *testing.T) {
	testenv.RequireRoot(t)
	testenv.RequireCommand(t, "podman", "runc", "ip", "go")
	id := make([]byte, 3)
	if _, err := rand.Read(id); err != nil {
		t.Fatal(err)
	}
	tag := "localhost/lbctl-test:" + hex.EncodeToString(id)
	ns := "lbt-" + hex.EncodeToString(id) + "-ctr"
	dir := t.TempDir()

	// The image: a static lbctl FROM scratch, as the Dockerfile's last stage.
	build := exec.Command("go", "build", "-o", filepath.Join(dir, "lbctl"), "../../cmd/lbctl")
	build.Env = append(os.Environ(), "CGO_ENABLED=0") // static: the image has no libc
	if out, err := build.CombinedOutput(); err != nil {
		t.Fatalf("go build: %v\n%s", err, out)
	}
	if err := os.WriteFile(filepath.Join(dir, "Containerfile"), []byte("FROM scratch\nCOPY lbctl /lbctl\nENTRYPOINT [\"/lbctl\"]\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	run(t, "podman", "build", "-q", "-t", tag, dir)
	t.Cleanup(func() { _ = exec.Command("podman", "rmi", "-f", tag).Run() })

	// The test host: a network namespace with a veth pair, and a bpffs.
	run(t, "ip", "netns", "add", ns)
	t.Cleanup(func() { _ = exec.Command("ip", "netns", "del", ns).Run() })
	for _, c := range [][]string{
		{"link", "add", "v0", "type", "veth", "peer", "name", "v1"},
		{"addr", "add", "198.19.16.11/24", "dev", "v0"},
		{"link", "set", "v0", "up"}, {"link", "set", "v1", "up"},
		{"neigh", "add", "198.19.16.99", "lladdr", "02:00:00:00:00:99", "dev", "v0"},
	} {
		run(t, "ip", append([]string{"-n", ns}, c...)...)
	}
	bpffs := filepath.Join(dir, "bpffs")
	if err := os.Mkdir(bpffs, 0o700); err != nil {
		t.Fatal(err)
	}
	if err := unix.Mount("bpffs", bpffs, "bpf", 0, "mode=0700"); err != nil {
		t.Fatalf("mount bpffs: %v", err)
	}
	t.Cleanup(func() { _ = unix.Unmount(bpffs, unix.MNT_DETACH) })

	podman := func(seccomp []string, args ...string) (string, error) {
		cmd := append([]string{"run", "--rm", "--runtime", "runc",
			"--network", "ns:/run/netns/" + ns,
			"--cap-drop", "all", "--cap-add", "BPF", "--cap-add", "NET_ADMIN", "--cap-add", "NET_RAW",
			"--ulimit", "nofile=1024:1024", "--ulimit", "nproc=1024:1024",
			"-v", bpffs + ":/sys/fs/bpf"}, seccomp...)
		cmd = append(cmd, tag)
		out, err := exec.Command("podman", append(cmd, args...)...).CombinedOutput()
		return string(out), err
	}
	sec := []string{"--security-opt", "seccomp=" + seccompWithBPF(t, dir)}
	for _, args := range [][]string{
		{"attach", "v0"},
		{"snat", "add", "--src", "198.19.16.11/32", "--proto", "udp", "--sport", "53", "--to", "198.18.98.10:53"},
	} {
		if out, err := podman(sec, args...); err != nil {
			t.Fatalf("lbctl %v in the container: %v\n%s", args, err, out)
		}
	}
	sendInNetns(t, ns, 3)
	out, err := podman(sec, "stats", "--json")
	var st struct {
		SNAT []struct {
			Name  string
			Value uint64
		}
	}
	if err != nil || json.Unmarshal([]byte(out), &st) != nil || len(st.SNAT) < 2 || st.SNAT[1].Name != "rewritten" || st.SNAT[1].Value != 3 {
		t.Errorf("stats --json in the container: %v\n%s\nwant rewritten 3", err, out)
	}
	if out, err := podman(sec, "status"); err != nil || !strings.Contains(out, "v0         snat     tc egress  tcx") {
		t.Errorf("status in the container: %v\n%s", err, out)
	}
	if out, _ := podman(sec, "doctor"); !strings.Contains(out, "PASS  privileges") || !strings.Contains(out, "PASS  bpffs") {
		t.Errorf("doctor in the container: want privileges and bpffs to pass:\n%s", out)
	}

	// Pinned state: root's only.
	err = filepath.Walk(filepath.Join(bpffs, "lbctl"), func(p string, fi os.FileInfo, err error) error {
		if err != nil {
			return err
		}
		want := os.FileMode(0o600)
		if fi.IsDir() {
			want = 0o700
		}
		if fi.Mode().Perm() != want {
			t.Errorf("%s: mode %v, want %v", p, fi.Mode().Perm(), want)
		}
		st, _ := fi.Sys().(*syscall.Stat_t)
		if st == nil || st.Uid != 0 {
			t.Errorf("%s: not owned by root", p)
		}
		return nil
	})
	if err != nil {
		t.Errorf("walk the pinned state: %v", err)
	}

	// podman's default seccomp profile refuses bpf(2) without
	// CAP_SYS_ADMIN: the profile above is what makes the image work.
	if out, err := podman(nil, "stats"); err == nil || !strings.Contains(out, "operation not permitted") {
		t.Errorf("stats with the default seccomp profile: %v\n%s\nwant a permission error", err, out)
	}
}

// sendInNetns sends n UDP datagrams 198.19.16.11:53 -> 198.19.16.99:40000
// from a thread inside namespace ns.
func sendInNetns(t *testing.T, ns string, n int) {
	t.Helper()
	errc := make(chan error, 1)
	go func() {
		runtime.LockOSThread() // never unlocked: the thread ends with the goroutine
		f, err := os.Open("/run/netns/" + ns)
		if err != nil {
			errc <- err
			return
		}
		err = unix.Setns(int(f.Fd()), unix.CLONE_NEWNET)
		f.Close()
		if err != nil {
			errc <- err
			return
		}
		c, err := net.DialUDP("udp", &net.UDPAddr{IP: net.IPv4(198, 19, 16, 11), Port: 53}, &net.UDPAddr{IP: net.IPv4(198, 19, 16, 99), Port: 40000})
		if err != nil {
			errc <- err
			return
		}
		defer c.Close()
		for range n {
			if _, err := c.Write([]byte("answer")); err != nil {
				errc <- err
				return
			}
		}
		errc <- nil
	}()
	if err := <-errc; err != nil {
		t.Fatalf("send in %s: %v", ns, err)
	}
}
