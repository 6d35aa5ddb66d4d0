package daemon

import (
	"net/netip"
	"reflect"
	"strings"
	"testing"

	"github.com/lbctl/lbctl/pkg/config"
	"github.com/lbctl/lbctl/pkg/dataplane"
)

func prefixes(ss ...string) []netip.Prefix {
	var out []netip.Prefix
	for _, s := range ss {
		out = append(out, netip.MustParsePrefix(s))
	}
	return out
}

func addrs(ss ...string) []netip.Addr {
	var out []netip.Addr
	for _, s := range ss {
		out = append(out, netip.MustParseAddr(s))
	}
	return out
}

func TestCoverExactly(t *testing.T) {
	for _, tc := range []struct {
		in   []netip.Addr
		want []netip.Prefix
	}{
		{addrs("198.19.16.11"), prefixes("198.19.16.11/32")},
		{addrs("198.19.16.12", "198.19.16.13", "198.19.16.14", "198.19.16.15"), prefixes("198.19.16.12/30")},
		{addrs("198.19.16.14", "198.19.16.12", "198.19.16.11", "198.19.16.13"), prefixes("198.19.16.11/32", "198.19.16.12/31", "198.19.16.14/32")},
		{addrs("198.19.16.11", "198.19.16.11", "198.19.16.20"), prefixes("198.19.16.11/32", "198.19.16.20/32")},
		{addrs("198.19.16.0", "198.19.16.1", "198.19.16.2", "198.19.16.3", "198.19.16.4", "198.19.16.5", "198.19.16.6", "198.19.16.7", "198.19.16.8"),
			prefixes("198.19.16.0/29", "198.19.16.8/32")},
		{addrs("198.19.16.255", "198.19.17.0"), prefixes("198.19.16.255/32", "198.19.17.0/32")},
		{addrs("2001:db8:16::11", "2001:db8:16::12", "2001:db8:16::13", "2001:db8:16::14"),
			prefixes("2001:db8:16::11/128", "2001:db8:16::12/127", "2001:db8:16::14/128")},
		{addrs("2001:db8:16::10", "2001:db8:16::11"), prefixes("2001:db8:16::10/127")},
	} {
		got := coverExactly(tc.in)
		if !reflect.DeepEqual(got, tc.want) {
			t.Errorf("coverExactly(%v) = %v, want %v", tc.in, got, tc.want)
		}
		// Independently: the union is exactly the input.
		in := map[netip.Addr]bool{}
		for _, a := range tc.in {
			in[a] = true
		}
		n := 0
		for _, p := range got {
			for a := p.Addr(); p.Contains(a); a = a.Next() {
				if !in[a] {
					t.Errorf("coverExactly(%v): %s covers %s, not an input", tc.in, p, a)
				}
				n++
			}
		}
		if n != len(in) {
			t.Errorf("coverExactly(%v) covers %d addresses, want %d", tc.in, n, len(in))
		}
	}
}

const natConfig = `
services:
  - name: dns
    protocol: udp
    listen: 198.18.98.10:53
    mode: dsr
    dsr: {nat: origin}
    upstreams: [198.19.16.11:53, 198.19.16.12:53, 198.19.16.13:53, 198.19.16.14:53, 198.19.16.15:5353]
    health: {type: dns, query: www.example.com}
  - name: dns6
    protocol: udp
    listen: "[2001:db8:98::10]:53"
    mode: dsr
    upstreams: ["[2001:db8:16::12]:53", "[2001:db8:16::13]:53"]
    health: {type: dns, query: www.example.com}
  - name: web
    listen: 198.18.98.10:80
    upstreams: [198.19.16.11:80]
`

func rule(src, proto string, sport uint16, to string) dataplane.SNATRule {
	p, _ := dataplane.ParseProto(proto)
	ap := netip.MustParseAddrPort(to)
	return dataplane.SNATRule{Src: netip.MustParsePrefix(src), Proto: p, SPort: sport, To: ap.Addr(), ToPort: ap.Port()}
}

func TestDSRRules(t *testing.T) {
	cfg, err := config.Parse("lbctl.yaml", []byte(natConfig))
	if err != nil {
		t.Fatal(err)
	}
	vip := "198.18.98.10:53"
	for _, tc := range []struct {
		service, only string
		want          []dataplane.SNATRule
		err           string
	}{
		{"dns", "", []dataplane.SNATRule{
			rule("198.19.16.11/32", "udp", 53, vip), rule("198.19.16.12/31", "udp", 53, vip), rule("198.19.16.14/32", "udp", 53, vip),
			rule("198.19.16.15/32", "udp", 5353, vip),
		}, ""},
		{"dns", "198.19.16.13/32", []dataplane.SNATRule{rule("198.19.16.13/32", "udp", 53, vip)}, ""},
		{"dns", "198.19.16.15/32", []dataplane.SNATRule{rule("198.19.16.15/32", "udp", 5353, vip)}, ""},
		{"dns", "198.19.16.99/32", nil, `service dns has no upstream in 198.19.16.99/32: give the address of this backend, one of the service's upstreams`},
		{"dns6", "", []dataplane.SNATRule{rule("2001:db8:16::12/127", "udp", 53, "[2001:db8:98::10]:53")}, `service dns6 uses nat: router: the load balancer rewrites its replies; set dsr: {nat: origin} in lbctl.yaml to rewrite them on each backend`},
		{"web", "", nil, `service web: mode proxy has no direct server return, so no snat rule (want mode dsr or xdp)`},
		{"nope", "", nil, `lbctl.yaml has no service "nope" (it has: [dns dns6 web])`},
	} {
		var only netip.Prefix
		if tc.only != "" {
			only = netip.MustParsePrefix(tc.only)
		}
		got, err := OriginNATRules(cfg, tc.service, only)
		switch {
		case tc.err != "":
			if err == nil || err.Error() != tc.err {
				t.Errorf("OriginNATRules(%s, %s) error = %v, want %s", tc.service, tc.only, err, tc.err)
			}
			// Router NAT derives the same rules on the LB.
			if s, serr := ServiceByName(cfg, tc.service); serr == nil && tc.want != nil {
				if got, err := DSRRules(s, only); err != nil || !reflect.DeepEqual(got, tc.want) {
					t.Errorf("DSRRules(%s) = %v, %v; want %v", tc.service, got, err, tc.want)
				}
			}
		case err != nil:
			t.Errorf("OriginNATRules(%s, %s): %v", tc.service, tc.only, err)
		case !reflect.DeepEqual(got, tc.want):
			t.Errorf("OriginNATRules(%s, %s) =\n%v\nwant\n%v", tc.service, tc.only, got, tc.want)
		}
		for _, r := range got {
			if err := r.Validate(); err != nil || !strings.Contains(r.String(), "to ") {
				t.Errorf("rule %s: %v", r, err)
			}
		}
	}
}
