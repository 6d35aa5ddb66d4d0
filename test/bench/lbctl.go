package main

import (
	"context"
	"fmt"
	"net/netip"
	"os"
	"path/filepath"
	"strings"

	"gopkg.in/yaml.v3"

	"github.com/lbctl/lbctl/test/topo"
)

// lbService is one service of the lbctl.yaml the benchmark renders.
type lbService struct {
	Name      string            `yaml:"name"`
	Protocol  string            `yaml:"protocol"`
	Listen    string            `yaml:"listen"`
	Mode      string            `yaml:"mode"`
	Balance   string            `yaml:"balance,omitempty"`
	Responses *int              `yaml:"responses,omitempty"`
	Timeout   string            `yaml:"timeout,omitempty"`
	DSR       map[string]string `yaml:"dsr,omitempty"`
	Health    map[string]string `yaml:"health,omitempty"`
	Upstreams []string          `yaml:"upstreams"`
}

type lbConfig struct {
	Log          map[string]string `yaml:"log"`
	DrainTimeout string            `yaml:"drain_timeout"`
	Services     []lbService       `yaml:"services"`
}

// lbctlOptions choose what renderLbctl puts in the config.
type lbctlOptions struct {
	mode     string // proxy, transparent, dsr, xdp
	nat      string // dsr/xdp: router or origin
	backends int
	dns4     bool // udp VIP4:53
	dns6     bool // udp [VIP6]:53
	web4     bool // tcp VIP4:80
}

// renderLbctl returns the lbctl.yaml for one benchmark scenario: the same
// services and upstreams as the nginx configuration of the same lines.
// UDP services in proxy and transparent mode end a session after one
// reply with a 1 s idle timeout, like the seed's `proxy_responses 1;
// proxy_timeout 1s;`. dsr and xdp services carry the active health check
// they require (the LB sees no replies).
func renderLbctl(o lbctlOptions) (string, error) {
	one := 1
	upstreams := func(v6 bool, port uint16) []string {
		var s []string
		for _, ap := range seedUpstreams(o.backends, v6, port) {
			s = append(s, ap.String())
		}
		return s
	}
	svc := func(name, proto string, listen netip.AddrPort, v6 bool) lbService {
		s := lbService{Name: name, Protocol: proto, Listen: listen.String(), Mode: o.mode, Upstreams: upstreams(v6, listen.Port())}
		switch o.mode {
		case "proxy", "transparent":
			if proto == "udp" {
				s.Responses, s.Timeout = &one, "1s"
			}
		case "dsr", "xdp":
			s.DSR = map[string]string{"nat": o.nat}
			switch {
			case proto == "tcp":
				s.Health = map[string]string{"type": "tcp", "interval": "1s"}
			case v6:
				s.Health = map[string]string{"type": "dns", "query": "www.example.com", "qtype": "AAAA", "interval": "1s"}
			default:
				s.Health = map[string]string{"type": "dns", "query": "www.example.com", "interval": "1s"}
			}
		}
		return s
	}
	// A short drain: the scenario's cleanup stops lbctl once its loads
	// have ended (and kills it 5 s after SIGTERM).
	c := lbConfig{Log: map[string]string{"level": "warn", "format": "console"}, DrainTimeout: "2s"}
	if o.dns4 {
		c.Services = append(c.Services, svc("dns4", "udp", netip.AddrPortFrom(topo.VIP4, 53), false))
	}
	if o.dns6 {
		c.Services = append(c.Services, svc("dns6", "udp", netip.AddrPortFrom(topo.VIP6, 53), true))
	}
	if o.web4 {
		c.Services = append(c.Services, svc("web4", "tcp", netip.AddrPortFrom(topo.VIP4, 80), false))
	}
	if len(c.Services) == 0 {
		return "", fmt.Errorf("render lbctl.yaml: no service chosen")
	}
	out, err := yaml.Marshal(c)
	if err != nil {
		return "", fmt.Errorf("render lbctl.yaml: %w", err)
	}
	return "# lbctl for lbctl's benchmark (test/bench), mode " + o.mode + "\n" + string(out), nil
}

// lbctlSupports says why this lbctl cannot run o's config ("" = it can):
// `lbctl config check` refuses a mode that has not landed yet.
func (e *env) lbctlSupports(ctx context.Context, o lbctlOptions) string {
	if _, err := os.Stat(e.lbctl); err != nil {
		return fmt.Sprintf("no lbctl binary (%v): make build", err)
	}
	o.backends = len(e.topo.Backends)
	text, err := renderLbctl(o)
	if err != nil {
		return err.Error()
	}
	f := filepath.Join(e.dir, "check-"+slug(o.mode, o.nat)+".yaml")
	if err := os.WriteFile(f, []byte(text), 0o644); err != nil {
		return err.Error()
	}
	out, err := e.command(ctx, e.topo.LB, e.lbctl, "config", "check", "-c", f).CombinedOutput()
	if err != nil {
		msg := firstLine(string(out))
		if _, after, ok := strings.Cut(msg, ".yaml:"); ok {
			msg = after // drop the temp file's path
		}
		return fmt.Sprintf("lbctl config check refuses mode %s: %s", o.mode, msg)
	}
	return ""
}

func firstLine(s string) string {
	s = strings.TrimSpace(s)
	if i := strings.IndexByte(s, '\n'); i >= 0 {
		return s[:i]
	}
	return s
}

// startLbctl writes o's config and runs `lbctl run` on the LB (its pinned
// state in the LB's bpffs) until the scenario's cleanup, which sends
// SIGTERM: lbctl removes what it set up.
func (e *env) startLbctl(name string, o lbctlOptions) (*proc, error) {
	o.backends = len(e.topo.Backends)
	text, err := renderLbctl(o)
	if err != nil {
		return nil, err
	}
	f := filepath.Join(e.dir, name+".yaml")
	if err := os.WriteFile(f, []byte(text), 0o644); err != nil {
		return nil, fmt.Errorf("start lbctl: %w", err)
	}
	return e.start(e.topo.LB, name, e.lbctl, "--bpffs", e.topo.LB.BPFFS, "run", "-c", f)
}
