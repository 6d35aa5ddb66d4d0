package daemon

import (
	"errors"
	"fmt"
	"strings"
	"testing"

	"go.uber.org/zap/zaptest"

	"github.com/lbctl/lbctl/pkg/config"
	"github.com/lbctl/lbctl/pkg/dataplane"
	"github.com/lbctl/lbctl/test/topo"
)

const transparentTestConfig = `
services:
  - name: web
    protocol: tcp
    listen: 198.18.98.10:80
    mode: transparent
    upstreams: [198.19.16.11:80, 198.19.16.12:80]
  - name: web2
    protocol: tcp
    listen: 198.18.98.10:81
    mode: transparent
    upstreams: [198.19.16.12:80]
  - name: web6
    protocol: tcp
    listen: "[2001:db8:98::10]:80"
    mode: transparent
    upstreams: ["[2001:db8:16::11]:80"]
`

// tpState is what the transparent host set-up changes on the LB.
func tpState(t *testing.T, h *topo.Host) string {
	t.Helper()
	var b strings.Builder
	for _, args := range [][]string{{"ip", "rule"}, {"ip", "-6", "rule"}, {"ip", "route", "show", "table", "all"}, {"ip", "-6", "route", "show", "table", "all"}} {
		out, err := h.Run(args[0], args[1:]...)
		if err != nil {
			t.Fatal(err)
		}
		for _, l := range strings.SplitAfter(out, "\n") {
			// Link-local routes appear when IPv6 autoconfiguration gets
			// to them, on its own time: not ours to compare.
			if !strings.Contains(l, "fe80:") {
				b.WriteString(l)
			}
		}
	}
	err := h.Do(func() error {
		dp, err := dataplane.Open(dataplane.Options{Root: h.BPFFS, NoCreate: true, ReadOnly: true})
		if errors.Is(err, dataplane.ErrNoState) {
			return nil
		}
		if err != nil {
			return err
		}
		defer dp.Close()
		as, _ := dp.Attachments()
		ups, _ := dp.SteerUpstreams()
		for _, a := range as {
			fmt.Fprintf(&b, "attached %s/%s\n", a.Interface, a.Program)
		}
		fmt.Fprintf(&b, "steered %d\n", len(ups))
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
	return b.String()
}

// TestTransparentHostRefcount: services sharing an upstream, an interface
// and the policy rule hold them together; each release keeps what another
// service still holds, and the last one leaves the LB as it was.
func TestTransparentHostRefcount(t *testing.T) {
	tp := topo.Start(t, topo.Options{Backends: 2})
	lb := tp.LB
	cfg, err := config.Parse("t.yaml", []byte(transparentTestConfig))
	if err != nil {
		t.Fatal(err)
	}
	before := tpState(t, lb)
	h := &transparentHost{}
	claims := make([]*tpClaim, len(cfg.Services))
	in := func(fn func() error) {
		t.Helper()
		if err := lb.Do(fn); err != nil {
			t.Fatal(err)
		}
	}
	in(func() error {
		d := &Daemon{log: zaptest.NewLogger(t), cfg: cfg, opts: Options{BPFFS: lb.BPFFS}}
		h = d.transparent()
		for i, s := range cfg.Services {
			c, err := h.acquire(s)
			if err != nil {
				return err
			}
			claims[i] = c
		}
		return nil
	})
	all := tpState(t, lb)
	for _, want := range []string{"fwmark 0x1062 lookup 4194", "local default dev lo table 4194", "eth1/steer", "steered 3"} {
		if !strings.Contains(all, want) {
			t.Errorf("with every service: no %q in\n%s", want, all)
		}
	}
	// web goes: 198.19.16.11:80 leaves, .12 stays (web2), IPv4 rule stays.
	in(func() error { return h.release(claims[0]) })
	st := tpState(t, lb)
	if !strings.Contains(st, "steered 2") || !strings.Contains(st, "eth1/steer") || !strings.Contains(st, "fwmark 0x1062 lookup 4194") {
		t.Errorf("after releasing web:\n%s", st)
	}
	// web6 goes: the IPv6 rule and route go, IPv4's stay.
	in(func() error { return h.release(claims[2]) })
	st = tpState(t, lb)
	v6rule, _ := lb.Run("ip", "-6", "rule")
	v4rule, _ := lb.Run("ip", "rule")
	if strings.Contains(v6rule, "4194") || !strings.Contains(v4rule, "4194") {
		t.Errorf("after releasing web6: ip -6 rule %q, ip rule %q", v6rule, v4rule)
	}
	in(func() error { return h.release(claims[1]) })
	if after := tpState(t, lb); after != before {
		t.Errorf("after releasing everything:\n%s\nwant\n%s", after, before)
	}
	// Releasing twice is harmless.
	in(func() error { return h.release(claims[1]) })
}

// TestTransparentRetargetForeignSteer: with the steer program attached
// before lbctl run started (lbctl attach --steer, which lbctl run does not
// own), a reload may change transparent.table (the rule moves, steer's
// mark stays) but not transparent.mark: refused, naming the fix, and the
// LB unchanged. The last release leaves the policy as before and the
// foreign steer attached.
func TestTransparentRetargetForeignSteer(t *testing.T) {
	tp := topo.Start(t, topo.Options{Backends: 1})
	lb := tp.LB
	cfg, err := config.Parse("t.yaml", []byte(transparentTestConfig))
	if err != nil {
		t.Fatal(err)
	}
	in := func(fn func() error) {
		t.Helper()
		if err := lb.Do(fn); err != nil {
			t.Fatal(err)
		}
	}
	in(func() error {
		dp, err := dataplane.Open(dataplane.Options{Root: lb.BPFFS})
		if err != nil {
			return err
		}
		defer dp.Close()
		_, err = dp.AttachSteer("eth1", dataplane.SteerOptions{Mark: config.DefaultMark})
		return err
	})
	before := tpState(t, lb)
	var h *transparentHost
	var c *tpClaim
	in(func() error {
		d := &Daemon{log: zaptest.NewLogger(t), cfg: cfg, opts: Options{BPFFS: lb.BPFFS}}
		h = d.transparent()
		c, err = h.acquire(cfg.Services[0])
		return err
	})
	held := tpState(t, lb)
	in(func() error {
		err := h.retarget(0x2000, config.DefaultTable)
		if err == nil || !strings.Contains(err.Error(), "lbctl attach --steer") || !strings.Contains(err.Error(), "transparent.mark back to 0x1062") {
			return fmt.Errorf("retarget to a new mark over a foreign steer: %v, want a refusal naming the fix", err)
		}
		return nil
	})
	if st := tpState(t, lb); st != held {
		t.Errorf("a refused retarget changed the LB:\n%s\nwant\n%s", st, held)
	}
	in(func() error { return h.retarget(config.DefaultMark, 5000) })
	if st := tpState(t, lb); !strings.Contains(st, "fwmark 0x1062 lookup 5000") || strings.Contains(st, "lookup 4194") || !strings.Contains(st, "eth1/steer") {
		t.Errorf("after the retarget to table 5000:\n%s", st)
	}
	in(func() error { return h.release(c) })
	if after := tpState(t, lb); after != before {
		t.Errorf("after the release:\n%s\nwant\n%s", after, before)
	}
}
