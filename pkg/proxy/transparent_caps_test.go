package proxy

import (
	"context"
	"errors"
	"net/netip"
	"os"
	"os/exec"
	"strings"
	"testing"

	"github.com/lbctl/lbctl/test/testenv"
)

// TestTransparentCapability: IP_TRANSPARENT needs CAP_NET_ADMIN or
// CAP_NET_RAW. A child process (this test binary, in a fresh network
// namespace, its bounding set cut by capsh --drop) without both gets
// ErrNoTransparentCap from CheckTransparent, DialTCP and DialUDP, for IPv4
// and IPv6, with the capability and the fix in the text; with CAP_NET_RAW
// alone it may. The parent (root) may too.
func TestTransparentCapability(t *testing.T) {
	testenv.RequireRoot(t)
	testenv.RequireCommand(t, "capsh", "unshare")
	if err := CheckTransparent(capsUpstreams); err != nil {
		t.Fatalf("as root: %v", err)
	}
	self, err := os.Executable()
	if err != nil {
		t.Fatal(err)
	}
	for _, c := range []struct{ drop, want string }{
		{"cap_net_admin,cap_net_raw", "denied"},
		{"cap_net_admin", "allowed"},
		{"cap_net_raw", "allowed"},
	} {
		t.Run("drop "+c.drop, func(t *testing.T) {
			cmd := exec.Command("unshare", "--net", "capsh", "--drop="+c.drop, "--",
				"-c", `exec "$0" "$@"`, self, "-test.run=^TestTransparentCapabilityChild$", "-test.v")
			cmd.Env = append(os.Environ(), "LBCTL_TP_CAPS_CHILD="+c.want)
			out, err := cmd.CombinedOutput()
			if err != nil || !strings.Contains(string(out), "child checked: "+c.want) {
				t.Errorf("child without %s: %v\n%s", c.drop, err, out)
			}
		})
	}
}

var capsUpstreams = []netip.AddrPort{netip.MustParseAddrPort("198.19.16.11:80"), netip.MustParseAddrPort("[2001:db8:16::11]:80")}

// TestTransparentCapabilityChild runs only as TestTransparentCapability's
// child, in its own empty network namespace (nothing it dials can leave it).
func TestTransparentCapabilityChild(t *testing.T) {
	want := os.Getenv("LBCTL_TP_CAPS_CHILD")
	if want == "" {
		return // only as TestTransparentCapability's child
	}
	err := CheckTransparent(capsUpstreams)
	if want == "allowed" {
		if err != nil {
			t.Fatalf("CheckTransparent: %v", err)
		}
		t.Log("child checked: allowed")
		return
	}
	if !errors.Is(err, ErrNoTransparentCap) || !strings.Contains(err.Error(), "set IP_TRANSPARENT") {
		t.Fatalf("CheckTransparent: %v, want IP_TRANSPARENT refused with ErrNoTransparentCap", err)
	}
	for _, s := range []string{"CAP_NET_ADMIN or CAP_NET_RAW", "run lbctl as root", "AmbientCapabilities=CAP_NET_ADMIN", "--cap-add NET_ADMIN"} {
		if !strings.Contains(err.Error(), s) {
			t.Errorf("CheckTransparent error lacks %q: %v", s, err)
		}
	}
	if err := CheckTransparent(capsUpstreams[1:]); !errors.Is(err, ErrNoTransparentCap) || !strings.Contains(err.Error(), "set IPV6_TRANSPARENT") {
		t.Errorf("CheckTransparent IPv6: %v, want IPV6_TRANSPARENT refused", err)
	}
	d := NewTransparentDialer(capsUpstreams, "")
	for i, client := range []netip.AddrPort{netip.MustParseAddrPort("198.18.99.1:40000"), netip.MustParseAddrPort("[2001:db8:99::1]:40000")} {
		if _, err := d.DialTCP(context.Background(), client, capsUpstreams[i]); !errors.Is(err, ErrNoTransparentCap) {
			t.Errorf("DialTCP from %s: %v, want ErrNoTransparentCap", client, err)
		}
		if _, err := d.DialUDP(client, capsUpstreams[i]); !errors.Is(err, ErrNoTransparentCap) {
			t.Errorf("DialUDP from %s: %v, want ErrNoTransparentCap", client, err)
		}
	}
	if !t.Failed() {
		t.Log("child checked: denied")
	}
}
