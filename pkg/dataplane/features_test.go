package dataplane

import (
	"testing"

	"github.com/lbctl/lbctl/test/testenv"
)

// TestProbeFeatures: this kernel (6.18, see DESIGN.md) has tcx and XDP
// links; the probe attaches nothing, so no link is left behind.
func TestProbeFeatures(t *testing.T) {
	testenv.RequireRoot(t)
	f := ProbeFeatures()
	if f.TCX != nil || f.XDP != nil {
		t.Errorf("ProbeFeatures() = %+v; want tcx and XDP supported on Linux 6.18", f)
	}
	if got := Programs(); len(got) == 0 || got[0] != "snat" {
		t.Errorf("Programs() = %v; want snat first", got)
	}
}
