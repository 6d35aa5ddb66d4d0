package main

import (
	"net/netip"
	"testing"
	"time"

	"github.com/lbctl/lbctl/pkg/config"
)

// Every config the benchmark renders passes lbctl's own validation (every
// mode is implemented: none may be refused).
func TestRenderLbctlValid(t *testing.T) {
	for _, o := range []lbctlOptions{proxyOptions, transparentOptions, dsrRouterOptions, dsrOriginOptions, xdpOptions} {
		o.backends = 4
		text, err := renderLbctl(o)
		if err != nil {
			t.Fatal(err)
		}
		c, err := config.Parse("bench.yaml", []byte(text))
		if err != nil {
			t.Fatalf("mode %s nat %s: %v\n%s", o.mode, o.nat, err, text)
		}
		want := map[bool]int{true: 1, false: 0}
		if n := len(c.Services); n != want[o.dns4]+want[o.dns6]+want[o.web4] {
			t.Errorf("mode %s: %d services", o.mode, n)
		}
	}
}

func TestRenderLbctlProxy(t *testing.T) {
	text, err := renderLbctl(lbctlOptions{mode: "proxy", backends: 2, dns6: true, web4: true})
	if err != nil {
		t.Fatal(err)
	}
	c, err := config.Parse("bench.yaml", []byte(text))
	if err != nil {
		t.Fatal(err)
	}
	if c.DrainTimeout != 2*time.Second {
		t.Errorf("drain_timeout %v, want 2s", c.DrainTimeout)
	}
	dns, web := c.Services[0], c.Services[1]
	if dns.Listen != netip.MustParseAddrPort("[2001:db8:98::10]:53") || dns.Responses != 1 {
		t.Errorf("dns service: listen %v, responses %v\n%s", dns.Listen, dns.Responses, text)
	}
	if len(web.Upstreams) != 2 || web.Upstreams[1].Addr != netip.MustParseAddrPort("198.19.16.12:80") {
		t.Errorf("web upstreams %+v", web.Upstreams)
	}
	if _, err := renderLbctl(lbctlOptions{mode: "proxy", backends: 2}); err == nil {
		t.Error("a config with no service rendered")
	}
}
