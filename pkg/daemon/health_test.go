package daemon

import (
	"net/netip"
	"testing"
	"time"

	"go.uber.org/zap"

	"github.com/lbctl/lbctl/pkg/config"
	"github.com/lbctl/lbctl/pkg/health"
)

// TestUpstreamHealthOnChange: a table-feeding runner (xdp) hears of every
// tracker it gets and every change of the current one, and a reload keeps
// the state of the upstreams that stay.
func TestUpstreamHealthOnChange(t *testing.T) {
	d := &Daemon{log: zap.NewNop()}
	svc := config.Service{Name: "dns", Protocol: config.UDP, OnAllDown: "try",
		Passive: config.Passive{MaxFails: 1, FailTimeout: time.Hour},
		Upstreams: []config.Upstream{
			{Addr: netip.MustParseAddrPort("198.19.16.11:53"), Weight: 1},
			{Addr: netip.MustParseAddrPort("198.19.16.12:53"), Weight: 1},
		}}
	var seen []*health.Tracker
	var eligible []bool
	var h upstreamHealth
	h = upstreamHealth{d: d, onChange: func(tr *health.Tracker) {
		if h.Tracker() != tr { // may read the runner's health: no deadlock
			return
		}
		seen = append(seen, tr)
		eligible = append(eligible, tr.Eligible(1))
	}}
	if err := h.attach(svc, nil); err != nil {
		t.Fatal(err)
	}
	h.start()
	defer func() {
		h.stop()
		d.checker().Close()
	}()
	first := h.Tracker()
	first.ReportFailure(1) // passive: down for an hour
	if len(seen) != 2 || eligible[0] != true || eligible[1] != false {
		t.Fatalf("onChange saw eligibility %v of upstream 1, want [true false]", eligible)
	}

	svc.Upstreams = append(svc.Upstreams, config.Upstream{Addr: netip.MustParseAddrPort("198.19.16.13:53"), Weight: 1})
	if err := h.attach(svc, nil); err != nil {
		t.Fatal(err)
	}
	second := h.Tracker()
	if second == first || len(seen) != 3 || seen[2] != second {
		t.Fatalf("onChange not called with the reloaded tracker")
	}
	if second.Eligible(1) || !second.Eligible(2) {
		t.Fatalf("after reload: upstream 1 eligible=%v (want false, kept down), new upstream 2 eligible=%v (want true)", second.Eligible(1), second.Eligible(2))
	}
	first.ReportFailure(0) // the retired tracker reports nothing
	if len(seen) != 3 {
		t.Fatalf("a retired tracker's change reached onChange")
	}
}
