package e2e

import (
	"bufio"
	"encoding/json"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/netip"
	"os"
	"os/exec"
	"regexp"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/lbctl/lbctl/pkg/daemon"
	"github.com/lbctl/lbctl/test/topo"
)

// opsConfig: one TCP service with a fast active check, metrics on the LB.
const opsConfig = `metrics: {listen: "198.18.98.10:9100"}
services:
  - name: web4
    protocol: tcp
    listen: "198.18.98.10:80"
    mode: proxy
    health: {type: tcp, interval: 200ms, timeout: 150ms, rise: 1, fall: 1}
    upstreams: ["198.19.16.11:80", "198.19.16.12:80", "198.19.16.13:80", "198.19.16.14:80"]
`

// scrape fetches /metrics from addr in host's namespace and returns the
// samples by their text-format name{labels}.
func scrape(t *testing.T, host *topo.Host, addr string) map[string]float64 {
	t.Helper()
	out := map[string]float64{}
	in(t, host, func() error {
		c, err := net.Dial("tcp", addr) // on this thread: in host's namespace
		if err != nil {
			return err
		}
		defer c.Close()
		fmt.Fprintf(c, "GET /metrics HTTP/1.0\r\nHost: lbctl\r\n\r\n")
		resp, err := http.ReadResponse(bufio.NewReader(c), nil)
		if err != nil {
			return err
		}
		defer resp.Body.Close()
		body, err := io.ReadAll(resp.Body)
		if err != nil {
			return err
		}
		for _, l := range strings.Split(string(body), "\n") {
			if l == "" || strings.HasPrefix(l, "#") {
				continue
			}
			i := strings.LastIndexByte(l, ' ')
			if v, err := strconv.ParseFloat(l[i+1:], 64); err == nil {
				out[l[:i]] = v
			}
		}
		return nil
	})
	return out
}

// TestOpsStatusAndMetrics: lbctl run serves metrics.listen and its control
// socket; a scrape during traffic shows the front end's counters moving
// and check latencies observed; lbctl status shows the services with
// their upstreams' health and share; the control socket is root's only.
func TestOpsStatusAndMetrics(t *testing.T) {
	h := newHarness(t, topo.Options{})
	h.startBackends(t)
	h.run(t, opsConfig)
	const conns = `lbctl_connections_total{mode="proxy",service="web4"}`
	const bytesOut = `lbctl_bytes_total{direction="out",service="web4"}`
	vip := netip.AddrPortFrom(topo.VIP4, 80)

	get := func(n int) {
		for range n {
			if body, err := h.httpGet(vip); err != nil || !strings.Contains(body, "Hello from dev") {
				t.Fatalf("GET %s: %q %v", vip, body, err)
			}
		}
	}
	get(4)
	a := scrape(t, h.LB, "198.18.98.10:9100")
	get(8)
	b := scrape(t, h.LB, "198.18.98.10:9100")
	if a[conns] < 4 || b[conns]-a[conns] != 8 {
		t.Errorf("%s: %v, then %v: want >= 4, then 8 more", conns, a[conns], b[conns])
	}
	if b[bytesOut] <= a[bytesOut] {
		t.Errorf("%s did not move: %v then %v", bytesOut, a[bytesOut], b[bytesOut])
	}
	for i := 1; i <= 4; i++ {
		k := fmt.Sprintf(`lbctl_upstream_up{service="web4",upstream="198.19.16.1%d:80"}`, i)
		if b[k] != 1 {
			t.Errorf("%s = %v, want 1", k, b[k])
		}
	}
	// Active checks run every 200ms: wait (bounded) for one to be observed.
	hist := `lbctl_health_check_duration_seconds_count{result="ok",service="web4",upstream="198.19.16.11:80"}`
	for deadline := time.Now().Add(20 * time.Second); scrape(t, h.LB, "198.18.98.10:9100")[hist] == 0; {
		if time.Now().After(deadline) {
			t.Fatalf("no check latency observed: %s missing", hist)
		}
		time.Sleep(100 * time.Millisecond)
	}

	out, err := h.LB.Command(binary(t, "lbctl"), "--bpffs", h.LB.BPFFS, "status", "--json").Output()
	if err != nil {
		var stderr []byte
		if ee, ok := err.(*exec.ExitError); ok {
			stderr = ee.Stderr
		}
		t.Fatalf("lbctl status --json: %v %s", err, stderr)
	}
	var rep struct {
		Daemon *daemon.Status `json:"daemon"`
	}
	if err := json.Unmarshal(out, &rep); err != nil || rep.Daemon == nil || len(rep.Daemon.Services) != 1 {
		t.Fatalf("status --json: %v %s", err, out)
	}
	s := rep.Daemon.Services[0]
	var total uint64
	for _, u := range s.Upstreams {
		total += u.Total
	}
	if s.Name != "web4" || s.Mode != "proxy" || len(s.Upstreams) != 4 || total != 12 || len(s.Health) != 4 {
		t.Errorf("status of web4: %+v (total picks %d, want 12)", s, total)
	}
	out, err = h.LB.Command(binary(t, "lbctl"), "--bpffs", h.LB.BPFFS, "status").Output()
	if err != nil || !strings.Contains(string(out), "daemon: running since") ||
		!matchLine(string(out), `^web4\s+proxy\s+tcp\s+198\.18\.98\.10:80\s+round_robin\s+198\.19\.16\.11:80\s+up\s+[0-9hms]+\s+ok \S+\s+1\s+25\.0%\s+\d+\s+3\s+0$`) {
		t.Errorf("lbctl status: %v\n%s", err, out)
	}

	// lbctl stats: the BPF counters and, from the daemon, the services'.
	out, err = h.LB.Command(binary(t, "lbctl"), "--bpffs", h.LB.BPFFS, "stats", "--json").Output()
	var stats struct {
		Services []daemon.ServiceStatus `json:"services"`
	}
	if err != nil || json.Unmarshal(out, &stats) != nil || len(stats.Services) != 1 || stats.Services[0].Stats.Accepted != 12 {
		t.Errorf("lbctl stats --json: %v\n%s\nwant web4 with 12 accepted", err, out)
	}
	out, err = h.LB.Command(binary(t, "lbctl"), "--bpffs", h.LB.BPFFS, "stats").Output()
	if err != nil || !matchLine(string(out), `^web4\s+proxy\s+12\s+0\s+0\s+0\s+\d+\s+\d+$`) {
		t.Errorf("lbctl stats: %v\n%s", err, out)
	}

	sock := daemon.ControlSocket(h.LB.BPFFS)
	if fi, err := os.Stat(sock); err != nil || fi.Mode().Perm() != 0o600 {
		t.Errorf("control socket %s: %v %v, want mode 0600", sock, fi.Mode(), err)
	}
}

func matchLine(s, re string) bool {
	for _, l := range strings.Split(s, "\n") {
		if regexp.MustCompile(re).MatchString(l) {
			return true
		}
	}
	return false
}
