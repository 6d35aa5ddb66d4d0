package main

import (
	"flag"
	"net/netip"
	"os"
	"testing"

	"github.com/lbctl/lbctl/test/topo"
)

var update = flag.Bool("update", false, "rewrite the golden files in testdata")

// The rendered nginx.conf files are compared with golden files: the
// seed's standard proxy (stream, proxy_responses 1, proxy_timeout 1s,
// one worker per core) and its transparent proxy (proxy_bind
// $remote_addr transparent, workers as root).
func TestRenderNginx(t *testing.T) {
	for _, c := range []struct {
		golden string
		cfg    nginxConfig
	}{
		{"testdata/nginx-proxy.conf", nginxConfig{
			Dir: "/tmp/bench/nginx-proxy", Workers: 2, Module: nginxModule,
			Servers: []nginxServer{
				{Name: "dns4", Listen: netip.AddrPortFrom(topo.VIP4, 53), UDP: true, Upstreams: seedUpstreams(4, false, 53)},
				{Name: "dns6", Listen: netip.AddrPortFrom(topo.VIP6, 53), UDP: true, Upstreams: seedUpstreams(4, true, 53)},
				{Name: "web4", Listen: netip.AddrPortFrom(topo.VIP4, 80), Upstreams: seedUpstreams(4, false, 80)},
			},
		}},
		{"testdata/nginx-transparent.conf", nginxConfig{
			Dir: "/tmp/bench/nginx-transparent", Workers: 2, Module: nginxModule, Transparent: true,
			Servers: []nginxServer{
				{Name: "dns4", Listen: netip.AddrPortFrom(topo.VIP4, 53), UDP: true, Upstreams: seedUpstreams(4, false, 53)},
				{Name: "web4", Listen: netip.AddrPortFrom(topo.VIP4, 80), Upstreams: seedUpstreams(4, false, 80)},
			},
		}},
	} {
		got, err := renderNginx(c.cfg)
		if err != nil {
			t.Fatal(err)
		}
		if *update {
			if err := os.WriteFile(c.golden, []byte(got), 0o644); err != nil {
				t.Fatal(err)
			}
		}
		want, err := os.ReadFile(c.golden)
		if err != nil {
			t.Fatal(err)
		}
		if got != string(want) {
			t.Errorf("%s differs (go test -update rewrites it):\n%s", c.golden, got)
		}
	}
}

func TestSeedUpstreams(t *testing.T) {
	got := seedUpstreams(2, true, 53)
	if len(got) != 2 || got[0].String() != "[2001:db8:16::11]:53" || got[1].String() != "[2001:db8:16::12]:53" {
		t.Errorf("got %v", got)
	}
}

func TestUndoRule(t *testing.T) {
	for i, want := range []string{
		"iptables -t mangle -D PREROUTING -p tcp -s 198.19.16.0/28 --sport 80 -j MARK --set-xmark 0x1/0xffffffff",
		"iptables -t mangle -D PREROUTING -p udp -s 198.19.16.0/28 --sport 53 -j MARK --set-xmark 0x1/0xffffffff",
		"ip rule del fwmark 1 lookup 100",
		"ip route del local 0.0.0.0/0 dev lo table 100",
	} {
		if got := join(undoRule(nginxTransparentRules[i])); got != want {
			t.Errorf("undo %d: %s, want %s", i, got, want)
		}
	}
	// The set-up commands themselves are not modified.
	if nginxTransparentRules[0][3] != "-A" {
		t.Error("undoRule changed its input")
	}
}
