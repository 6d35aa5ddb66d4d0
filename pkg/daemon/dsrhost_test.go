package daemon

import (
	"net/netip"
	"slices"
	"strings"
	"testing"

	"go.uber.org/zap/zaptest"

	"github.com/lbctl/lbctl/pkg/config"
	"github.com/lbctl/lbctl/pkg/dataplane"
	"github.com/lbctl/lbctl/pkg/netconf"
	"github.com/lbctl/lbctl/test/topo"
)

const routerConfig = `
services:
  - name: dns
    protocol: udp
    listen: 198.18.98.10:53
    mode: dsr
    upstreams: [198.19.16.11:53, 198.19.16.12:53, 198.19.16.13:53, 198.19.16.14:53]
    health: {type: dns, query: www.example.com}
  - name: dns6
    protocol: udp
    listen: "[2001:db8:98::10]:53"
    mode: dsr
    upstreams: ["[2001:db8:16::12]:53", "[2001:db8:16::13]:53"]
    health: {type: dns, query: www.example.com}
  - name: other
    protocol: udp
    listen: 198.18.98.10:54
    mode: dsr
    upstreams: [198.19.16.11:53]
    health: {type: dns, query: www.example.com}
`

// hostState is what router NAT changes on the LB.
type hostState struct {
	fwd4, fwd6 string
	attached   []string
	rules      []string
}

func readHost(t *testing.T, h *topo.Host) hostState {
	t.Helper()
	var st hostState
	err := h.Do(func() error {
		var err error
		if st.fwd4, err = netconf.Sysctl("net.ipv4.ip_forward"); err != nil {
			return err
		}
		if st.fwd6, err = netconf.Sysctl("net.ipv6.conf.all.forwarding"); err != nil {
			return err
		}
		dp, err := dataplane.Open(dataplane.Options{Root: h.BPFFS, NoCreate: true})
		if err != nil {
			if strings.Contains(err.Error(), "no pinned lbctl state") {
				return nil
			}
			return err
		}
		defer dp.Close()
		as, err := dp.Attachments()
		if err != nil {
			return err
		}
		for _, a := range as {
			st.attached = append(st.attached, a.Interface+"/"+a.Program)
		}
		rs, err := dp.ListSNAT()
		for _, r := range rs {
			st.rules = append(st.rules, r.String())
		}
		return err
	})
	if err != nil {
		t.Fatal(err)
	}
	return st
}

// TestRouterNAT: forwarding, the snat attachment and the rules come with
// the first service that needs them and go with the last, exactly; a rule
// that was there before stays; a conflicting rule is refused whole.
func TestRouterNAT(t *testing.T) {
	tp := topo.Start(t, topo.Options{})
	cfg, err := config.Parse("lbctl.yaml", []byte(routerConfig))
	if err != nil {
		t.Fatal(err)
	}
	dns, dns6, other := cfg.Services[0], cfg.Services[1], cfg.Services[2]
	before := readHost(t, tp.LB)
	if before.fwd4 != "0" || before.fwd6 != "0" || before.attached != nil {
		t.Fatalf("LB before: %+v; want forwarding off, nothing attached", before)
	}
	// A rule added by hand before lbctl run: kept at the end.
	manual := dataplane.SNATRule{Src: netip.MustParsePrefix("2001:db8:16::13/128"), Proto: dataplane.UDP, SPort: 53,
		To: netip.MustParseAddr("2001:db8:98::10"), ToPort: 53}
	must(t, tp.LB.Do(func() error {
		dp, err := dataplane.Open(dataplane.Options{Root: tp.LB.BPFFS})
		if err != nil {
			return err
		}
		defer dp.Close()
		return dp.AddSNAT(manual)
	}))

	n := newRouterNAT(zaptest.NewLogger(t), tp.LB.BPFFS)
	var c1, c2, c3 *natClaim
	must(t, tp.LB.Do(func() (err error) { c1, err = n.acquire(dns); return err }))
	st := readHost(t, tp.LB)
	wantRules := []string{
		"src 198.19.16.11/32 proto udp sport 53 to 198.18.98.10:53",
		"src 198.19.16.12/31 proto udp sport 53 to 198.18.98.10:53",
		"src 198.19.16.14/32 proto udp sport 53 to 198.18.98.10:53",
		"src 2001:db8:16::13/128 proto udp sport 53 to [2001:db8:98::10]:53",
	}
	if st.fwd4 != "1" || st.fwd6 != "0" || !slices.Equal(st.attached, []string{"eth0/snat"}) || !slices.Equal(st.rules, wantRules) {
		t.Errorf("after dns: %+v\nwant ipv4 forwarding, eth0/snat, rules %q", st, wantRules)
	}
	// A reload holds the same service twice for a moment.
	must(t, tp.LB.Do(func() (err error) { c2, err = n.acquire(dns); return err }))
	must(t, tp.LB.Do(func() (err error) { c3, err = n.acquire(dns6); return err }))
	st = readHost(t, tp.LB)
	if st.fwd6 != "1" || len(st.rules) != 5 {
		t.Errorf("after dns6: %+v; want ipv6 forwarding and 5 rules", st)
	}
	// Another service whose upstream 198.19.16.11:53 must answer as a
	// second VIP:port: refused, and it leaves nothing behind.
	err = tp.LB.Do(func() error { _, err := n.acquire(other); return err })
	if err == nil || !strings.Contains(err.Error(), "conflicts with src 198.19.16.11/32 proto udp sport 53 to 198.18.98.10:53 of another service") {
		t.Errorf("conflicting service: %v", err)
	}
	if st2 := readHost(t, tp.LB); !slices.Equal(st2.rules, st.rules) {
		t.Errorf("after the refused service: rules %q, want %q", st2.rules, st.rules)
	}

	must(t, tp.LB.Do(func() error { return n.release(c1) }))
	if st2 := readHost(t, tp.LB); !slices.Equal(st2.rules, st.rules) || st2.fwd4 != "1" {
		t.Errorf("after releasing one of two holds: %+v, want unchanged", st2)
	}
	must(t, tp.LB.Do(func() error { return n.release(c2) }))
	must(t, tp.LB.Do(func() error { return n.release(c3) }))
	after := readHost(t, tp.LB)
	want := hostState{fwd4: "0", fwd6: "0", attached: []string{"eth0/snat"}, rules: []string{manual.String()}}
	if after.fwd4 != want.fwd4 || after.fwd6 != want.fwd6 || !slices.Equal(after.rules, want.rules) || !slices.Equal(after.attached, want.attached) {
		t.Errorf("after the last release: %+v, want %+v (the hand-made rule stays, and snat for it)", after, want)
	}

	// Without the hand-made rule, the end leaves nothing at all.
	must(t, tp.LB.Do(func() error {
		dp, err := dataplane.Open(dataplane.Options{Root: tp.LB.BPFFS})
		if err != nil {
			return err
		}
		defer dp.Close()
		if err := dp.DelSNAT(manual); err != nil {
			return err
		}
		_, err = dp.Detach("eth0")
		return err
	}))
	must(t, tp.LB.Do(func() (err error) { c1, err = n.acquire(dns); return err }))
	must(t, tp.LB.Do(func() error { return n.release(c1) }))
	if st := readHost(t, tp.LB); st.fwd4 != "0" || st.attached != nil || st.rules != nil {
		t.Errorf("after acquire and release on a clean LB: %+v, want nothing", st)
	}
}

func must(t *testing.T, err error) {
	t.Helper()
	if err != nil {
		t.Fatal(err)
	}
}
