package topo

import (
	"os/exec"
	"strings"
	"testing"
)

// TestTopologyReachability pings across the topology for both families and
// checks that Close leaves no namespace behind.
func TestTopologyReachability(t *testing.T) {
	for _, origin := range []bool{false, true} {
		tp := Start(t, Options{OriginNAT: origin, LBForward: true})
		pings := []struct {
			from *Host
			to   string
		}{
			{tp.Client, VIP4.String()}, {tp.Client, VIP6.String()},
			{tp.Client, Backend4(1).String()}, {tp.Client, Backend6(4).String()},
		}
		for i := range tp.Backends {
			pings = append(pings, struct {
				from *Host
				to   string
			}{tp.LB, Backend4(i + 1).String()}, struct {
				from *Host
				to   string
			}{tp.LB, Backend6(i + 1).String()})
		}
		if origin {
			pings = append(pings, struct {
				from *Host
				to   string
			}{tp.Backends[0], Client4.String()})
		}
		for _, p := range pings {
			if out, err := p.from.Run("ping", "-c3", "-i0.2", "-w3", p.to); err != nil {
				t.Errorf("origin=%v: %s -> %s: %v\n%s", origin, p.from.Role, p.to, err, out)
			}
		}
		if err := tp.Close(); err != nil {
			t.Fatal(err)
		}
		out, err := exec.Command("ip", "netns", "list").Output()
		if err != nil {
			t.Fatal(err)
		}
		if strings.Contains(string(out), "lbt-"+tp.ID) {
			t.Fatalf("namespaces of %s left after Close:\n%s", tp.ID, out)
		}
	}
}
