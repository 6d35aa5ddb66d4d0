package config

import (
	"os"
	"strings"
	"testing"
)

// TestLoadForInspection: a mode behind the gate is refused by Load and
// accepted by LoadForInspection (lbctl doctor), other problems still count.
func TestLoadForInspection(t *testing.T) {
	dir := t.TempDir()
	write := func(name, src string) string {
		p := dir + "/" + name
		if err := os.WriteFile(p, []byte(src), 0o600); err != nil {
			t.Fatal(err)
		}
		return p
	}
	for _, m := range []Mode{ModeTransparent, ModeDSR, ModeXDP} {
		if implementedModes[m] {
			continue
		}
		gated := m
		p := write("gated.yaml", "services:\n  - name: dns\n    protocol: udp\n    listen: 198.18.98.10:53\n    mode: "+string(gated)+"\n    upstreams: [198.19.16.11:53]\n    health: {type: udp, send: x}\n")
		if _, err := Load(p); err == nil {
			t.Errorf("Load accepted mode %s, which is not implemented yet", gated)
		}
		cfg, err := LoadForInspection(p)
		if err != nil || cfg.Services[0].Mode != gated {
			t.Errorf("LoadForInspection(mode %s) = %v, %v; want the service", gated, cfg, err)
		}
	}
	bad := write("bad.yaml", "services:\n  - name: dns\n    protocol: udp\n    listen: 198.18.98.10:99999\n    upstreams: [198.19.16.11:53]\n")
	if _, err := LoadForInspection(bad); err == nil || !strings.Contains(err.Error(), "listen") {
		t.Errorf("LoadForInspection(bad port) = %v; want an error naming listen", err)
	}
}
