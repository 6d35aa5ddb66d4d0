package dataplane

import (
	"errors"
	"net"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"testing"

	"github.com/cilium/ebpf"
	"github.com/cilium/ebpf/link"
	"go.uber.org/zap/zaptest"
	"golang.org/x/sys/unix"

	"github.com/lbctl/lbctl/test/testenv"
)

// mountBPFFS mounts a fresh bpffs on a temporary directory for t.
func mountBPFFS(t *testing.T) string {
	t.Helper()
	dir := t.TempDir()
	if err := unix.Mount("bpffs", dir, "bpf", 0, "mode=0700"); err != nil {
		t.Fatalf("mount bpffs at %s: %v", dir, err)
	}
	t.Cleanup(func() {
		if err := unix.Unmount(dir, unix.MNT_DETACH); err != nil {
			t.Errorf("unmount %s: %v", dir, err)
		}
	})
	return dir
}

// inNetns runs fn on an OS thread moved into a new network namespace. The
// thread is never unlocked, so it exits with fn and takes the namespace
// (and its interfaces) with it. fn reports through t.Error, not t.Fatal.
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

// ipCmd runs ip(8) on the calling (locked) thread's network namespace.
func ipCmd(t *testing.T, args ...string) bool {
	t.Helper()
	out, err := exec.Command("ip", args...).CombinedOutput()
	if err != nil {
		t.Errorf("ip %v: %v: %s", args, err, out)
		return false
	}
	return true
}

func tcxPrograms(t *testing.T, ifname string) int {
	t.Helper()
	ifi, err := net.InterfaceByName(ifname)
	if err != nil {
		t.Errorf("interface %s: %v", ifname, err)
		return -1
	}
	res, err := link.QueryPrograms(link.QueryOptions{Target: ifi.Index, Attach: ebpf.AttachTCXEgress})
	if err != nil {
		t.Errorf("query tcx egress of %s: %v", ifname, err)
		return -1
	}
	return len(res.Programs)
}

func exists(path string) bool {
	_, err := os.Stat(path)
	return err == nil
}

// TestLoaderPinAdoptDetach: attach pins maps and one link per interface;
// a new Open adopts the pinned maps; re-attach replaces the program in the
// same link; the attached program rewrites real traffic; detach removes
// exactly one interface's link, and the maps with the last one.
func TestLoaderPinAdoptDetach(t *testing.T) {
	testenv.RequireRoot(t)
	testenv.RequireCommand(t, "ip")
	root := mountBPFFS(t)
	state := filepath.Join(root, "lbctl")
	log := zaptest.NewLogger(t)

	inNetns(t, func() {
		if !ipCmd(t, "link", "add", "d0", "type", "veth", "peer", "name", "d1") ||
			!ipCmd(t, "addr", "add", "198.19.16.11/24", "dev", "d0") ||
			!ipCmd(t, "link", "set", "d0", "up") ||
			!ipCmd(t, "link", "set", "d1", "up") ||
			!ipCmd(t, "neigh", "add", "198.19.16.99", "lladdr", "02:00:00:00:00:99", "dev", "d0") {
			return
		}
		dp, err := Open(Options{Root: root, Log: log})
		if err != nil {
			t.Errorf("open: %v", err)
			return
		}
		for _, ifname := range []string{"d0", "d1"} {
			m, err := dp.AttachSNAT(ifname)
			if err != nil || m != MethodTCX {
				t.Errorf("attach %s: %s, %v", ifname, m, err)
				return
			}
		}
		if _, err := dp.AttachSNAT("nosuch0"); !errors.Is(err, ErrUnknownInterface) {
			t.Errorf("attach nosuch0: %v, want ErrUnknownInterface", err)
		}
		rule := SNATRule{Src: netip.MustParsePrefix("198.19.16.0/28"), Proto: UDP, SPort: 53, To: netip.MustParseAddr("198.18.98.10")}
		if err := dp.AddSNAT(rule); err != nil {
			t.Errorf("add: %v", err)
		}
		rulesInfo, _ := dp.snat.SnatRules.Info()
		rulesID, _ := rulesInfo.ID()
		dp.Close()

		for _, p := range []string{"snat_rules", "snat_rule_stats", "snat_counters", "snat_frags", "links/d0/snat", "links/d1/snat"} {
			if !exists(filepath.Join(state, p)) {
				t.Errorf("%s not pinned", p)
			}
		}
		l, err := link.LoadPinnedLink(filepath.Join(state, "links/d0/snat"), nil)
		if err != nil {
			t.Errorf("load pinned link: %v", err)
			return
		}
		info, _ := l.Info()
		l.Close()

		// A second process: adopts the maps, replaces the program in place.
		dp, err = Open(Options{Root: root, Log: log})
		if err != nil {
			t.Errorf("reopen: %v", err)
			return
		}
		defer dp.Close()
		ri, _ := dp.snat.SnatRules.Info()
		if id, _ := ri.ID(); id != rulesID {
			t.Errorf("reopen: rules map id %d, want the pinned %d (adopted)", id, rulesID)
		}
		if got, err := dp.ListSNAT(); err != nil || len(got) != 1 || got[0] != rule {
			t.Errorf("reopen: rules %v, %v; want [%s]", got, err, rule)
		}
		if _, err := dp.AttachSNAT("d0"); err != nil {
			t.Errorf("re-attach d0: %v", err)
		}
		l, err = link.LoadPinnedLink(filepath.Join(state, "links/d0/snat"), nil)
		if err == nil {
			info2, _ := l.Info()
			l.Close()
			if info2.ID != info.ID || info2.Program == info.Program {
				t.Errorf("re-attach: link %d prog %d, before link %d prog %d: want same link, new program", info2.ID, info2.Program, info.ID, info.Program)
			}
		}
		if n := tcxPrograms(t, "d0"); n != 1 {
			t.Errorf("d0 has %d tcx egress programs after re-attach, want 1", n)
		}

		// Real traffic through the attached program.
		c, err := net.DialUDP("udp", net.UDPAddrFromAddrPort(netip.MustParseAddrPort("198.19.16.11:53")), net.UDPAddrFromAddrPort(netip.MustParseAddrPort("198.19.16.99:40000")))
		if err != nil {
			t.Errorf("dial: %v", err)
			return
		}
		_, err = c.Write([]byte("answer"))
		c.Close()
		if err != nil {
			t.Errorf("send: %v", err)
		}
		st, err := dp.Stats()
		if err != nil {
			t.Errorf("stats: %v", err)
			return
		}
		if st.SNATCounter(SNATRewritten) != 1 || st.SNATRules[0].Packets != 1 {
			t.Errorf("after one datagram: rewritten %d, rule packets %d; want 1, 1", st.SNATCounter(SNATRewritten), st.SNATRules[0].Packets)
		}

		done, err := dp.Detach("d1")
		if err != nil || len(done) != 1 || done[0].Interface != "d1" {
			t.Errorf("detach d1: %v, %v", done, err)
		}
		if exists(filepath.Join(state, "links/d1")) || !exists(filepath.Join(state, "links/d0/snat")) || !exists(filepath.Join(state, "snat_rules")) {
			t.Errorf("detach d1 removed the wrong things")
		}
		if n := tcxPrograms(t, "d1"); n != 0 {
			t.Errorf("d1 has %d tcx programs after detach", n)
		}
		if done, err := dp.Detach("d1"); err != nil || len(done) != 0 {
			t.Errorf("second detach d1: %v, %v; want nothing, no error", done, err)
		}
		if _, err := dp.Detach("d0"); err != nil {
			t.Errorf("detach d0: %v", err)
		}
		if exists(state) {
			t.Errorf("%s still exists after the last detach", state)
		}
		if n := tcxPrograms(t, "d0"); n != 0 {
			t.Errorf("d0 has %d tcx programs after detach", n)
		}
	})
}

func TestOpenNoCreate(t *testing.T) {
	testenv.RequireRoot(t)
	root := mountBPFFS(t)
	if _, err := Open(Options{Root: root, NoCreate: true}); !errors.Is(err, ErrNoState) {
		t.Fatalf("open empty root with NoCreate: %v, want ErrNoState", err)
	}
	if exists(filepath.Join(root, "lbctl")) {
		t.Fatalf("NoCreate created state")
	}
}

func TestOpenMountsBPFFS(t *testing.T) {
	testenv.RequireRoot(t)
	dir := t.TempDir()
	dp, err := Open(Options{Root: dir, Log: zaptest.NewLogger(t)})
	if err != nil {
		t.Fatalf("open on a plain directory: %v", err)
	}
	t.Cleanup(func() { _ = unix.Unmount(dir, unix.MNT_DETACH) })
	dp.Close()
	var st unix.Statfs_t
	if err := unix.Statfs(dir, &st); err != nil || st.Type != unix.BPF_FS_MAGIC {
		t.Fatalf("%s is not a bpffs after Open (%v)", dir, err)
	}
}
