package dataplane

import (
	"net"
	"path/filepath"
	"testing"

	"github.com/cilium/ebpf"
	"github.com/cilium/ebpf/link"
	"go.uber.org/zap/zaptest"

	"github.com/lbctl/lbctl/test/testenv"
)

func tcxIngressPrograms(t *testing.T, ifname string) int {
	t.Helper()
	ifi, err := net.InterfaceByName(ifname)
	if err != nil {
		t.Errorf("interface %s: %v", ifname, err)
		return -1
	}
	res, err := link.QueryPrograms(link.QueryOptions{Target: ifi.Index, Attach: ebpf.AttachTCXIngress})
	if err != nil {
		t.Errorf("query tcx ingress of %s: %v", ifname, err)
		return -1
	}
	return len(res.Programs)
}

// TestSteerAttachDetach: steer attaches at tcx ingress next to snat at
// egress, pins its maps and link; DetachSteer removes steer only; the
// upstream map survives a reopen; Detach of the last program removes the
// maps of both programs.
func TestSteerAttachDetach(t *testing.T) {
	testenv.RequireRoot(t)
	testenv.RequireCommand(t, "ip")
	root := mountBPFFS(t)
	state := filepath.Join(root, "lbctl")
	log := zaptest.NewLogger(t)

	inNetns(t, func() {
		if !ipCmd(t, "link", "add", "d0", "type", "veth", "peer", "name", "d1") ||
			!ipCmd(t, "link", "set", "d0", "up") || !ipCmd(t, "link", "set", "d1", "up") {
			return
		}
		dp, err := Open(Options{Root: root, Log: log})
		if err != nil {
			t.Errorf("open: %v", err)
			return
		}
		if _, err := dp.AttachSNAT("d0"); err != nil {
			t.Errorf("attach snat: %v", err)
		}
		if m, err := dp.AttachSteer("d0", SteerOptions{Mark: 0x20, CheckSocket: true}); err != nil || m != MethodTCX {
			t.Errorf("attach steer: %s, %v", m, err)
			dp.Close()
			return
		}
		// Again, another mark: replaced in place.
		if _, err := dp.AttachSteer("d0", SteerOptions{}); err != nil {
			t.Errorf("re-attach steer: %v", err)
		}
		if n := tcxIngressPrograms(t, "d0"); n != 1 {
			t.Errorf("d0 has %d tcx ingress programs, want 1", n)
		}
		if err := dp.AddSteerUpstream(TCP, upstream4); err != nil {
			t.Errorf("add upstream: %v", err)
		}
		dp.Close()
		for _, p := range []string{"steer_upstreams", "steer_counters", "steer_frags", "links/d0/steer", "links/d0/snat"} {
			if !exists(filepath.Join(state, p)) {
				t.Errorf("%s not pinned", p)
			}
		}
		dp, err = Open(Options{Root: root, Log: log})
		if err != nil {
			t.Errorf("reopen: %v", err)
			return
		}
		defer dp.Close()
		if ups, err := dp.SteerUpstreams(); err != nil || len(ups) != 1 || ups[0].Addr != upstream4 {
			t.Errorf("reopen: upstreams %v, %v", ups, err)
		}
		atts, _ := dp.Attachments()
		if len(atts) != 2 {
			t.Errorf("attachments %v, want snat and steer on d0", atts)
		}
		done, err := dp.DetachSteer("d0")
		if err != nil || len(done) != 1 || done[0].Program != "steer" {
			t.Errorf("detach steer: %v, %v", done, err)
		}
		if n := tcxIngressPrograms(t, "d0"); n != 0 {
			t.Errorf("d0 has %d tcx ingress programs after DetachSteer", n)
		}
		if n := tcxPrograms(t, "d0"); n != 1 {
			t.Errorf("d0 lost its snat program to DetachSteer (%d egress programs)", n)
		}
		if !exists(filepath.Join(state, "steer_upstreams")) {
			t.Errorf("maps removed while snat is still attached")
		}

		if _, err := dp.Detach("d0"); err != nil {
			t.Errorf("detach d0: %v", err)
		}
		if exists(state) {
			t.Errorf("%s still exists after the last detach", state)
		}
	})
}
