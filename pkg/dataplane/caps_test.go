package dataplane

import (
	"runtime"
	"testing"

	"golang.org/x/sys/unix"

	"github.com/lbctl/lbctl/test/testenv"
)

// keepOnlyCaps reduces the calling (locked) thread's effective
// capabilities to caps.
func keepOnlyCaps(t *testing.T, caps ...int) bool {
	t.Helper()
	hdr := unix.CapUserHeader{Version: unix.LINUX_CAPABILITY_VERSION_3}
	var data [2]unix.CapUserData
	if err := unix.Capget(&hdr, &data[0]); err != nil {
		t.Errorf("capget: %v", err)
		return false
	}
	data[0].Effective, data[1].Effective = 0, 0
	for _, c := range caps {
		data[c/32].Effective |= 1 << (uint(c) % 32)
	}
	if err := unix.Capset(&hdr, &data[0]); err != nil {
		t.Errorf("capset: %v", err)
		return false
	}
	return true
}

// TestLoaderMinimalCapabilities: on a mounted bpffs, loading, attaching,
// adding rules, reading counters and detaching need only CAP_BPF and
// CAP_NET_ADMIN.
func TestLoaderMinimalCapabilities(t *testing.T) {
	testenv.RequireRoot(t)
	testenv.RequireCommand(t, "ip")
	root := mountBPFFS(t)
	done := make(chan struct{})
	go func() {
		defer close(done)
		runtime.LockOSThread()
		if err := unix.Unshare(unix.CLONE_NEWNET); err != nil {
			t.Errorf("unshare netns: %v", err)
			return
		}
		if !ipCmd(t, "link", "add", "v0", "type", "veth", "peer", "name", "v1") {
			return
		}
		if !keepOnlyCaps(t, unix.CAP_BPF, unix.CAP_NET_ADMIN) {
			return
		}
		dp, err := Open(Options{Root: root})
		if err != nil {
			t.Errorf("open with CAP_BPF+CAP_NET_ADMIN: %v", err)
			return
		}
		defer dp.Close()
		if _, err := dp.AttachSNAT("v0"); err != nil {
			t.Errorf("attach with CAP_BPF+CAP_NET_ADMIN: %v", err)
		}
		if err := dp.AddSNAT(SNATRule{Src: net4, Proto: UDP, To: vip4}); err != nil {
			t.Errorf("add with CAP_BPF+CAP_NET_ADMIN: %v", err)
		}
		if _, err := dp.AttachSteer("v0", SteerOptions{CheckSocket: true}); err != nil {
			t.Errorf("attach steer with CAP_BPF+CAP_NET_ADMIN: %v", err)
		}
		if err := dp.AddSteerUpstream(TCP, upstream4); err != nil {
			t.Errorf("add steered upstream with CAP_BPF+CAP_NET_ADMIN: %v", err)
		}
		if _, err := dp.Stats(); err != nil {
			t.Errorf("stats with CAP_BPF+CAP_NET_ADMIN: %v", err)
		}
		if _, err := dp.Detach("v0"); err != nil {
			t.Errorf("detach with CAP_BPF+CAP_NET_ADMIN: %v", err)
		}
	}()
	<-done
}

// TestSNATChecksumMode: the program writes L4 checksums itself only when
// the loader may read kernel structures (CAP_PERFMON or CAP_SYS_ADMIN);
// with CAP_BPF and CAP_NET_ADMIN alone it keeps bpf_l4_csum_replace
// (TestLoaderMinimalCapabilities loads that program).
func TestSNATChecksumMode(t *testing.T) {
	testenv.RequireRoot(t)
	// helper reports errors with t.Error: it also runs off the test goroutine.
	helper := func() uint8 {
		t.Helper()
		spec, err := loadSnat()
		if err != nil {
			t.Error(err)
			return 255
		}
		if _, err := snatChecksumMode(spec); err != nil {
			t.Error(err)
			return 255
		}
		var v uint8
		if err := spec.Variables[snatVarCsumHelper].Get(&v); err != nil {
			t.Error(err)
			return 255
		}
		return v
	}
	if got := helper(); got != 0 {
		t.Errorf("as root: %s = %d, want 0 (inline checksums)", snatVarCsumHelper, got)
	}
	done := make(chan struct{})
	go func() {
		defer close(done)
		runtime.LockOSThread() // the thread ends with the goroutine: its capabilities go with it
		if !keepOnlyCaps(t, unix.CAP_BPF, unix.CAP_NET_ADMIN) {
			return
		}
		if got := helper(); got != 1 {
			t.Errorf("with CAP_BPF+CAP_NET_ADMIN: %s = %d, want 1 (helper)", snatVarCsumHelper, got)
		}
	}()
	<-done
}
