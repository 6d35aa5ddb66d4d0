package metrics

import (
	"bufio"
	"context"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/http/httptest"
	"net/netip"
	"os/exec"
	"runtime"
	"sort"
	"strings"
	"sync"
	"testing"
	"time"

	dto "github.com/prometheus/client_model/go"
	"github.com/prometheus/common/expfmt"
	"github.com/prometheus/common/model"
	"go.uber.org/goleak"
	"golang.org/x/sys/unix"

	"github.com/lbctl/lbctl/pkg/dataplane"
	"github.com/lbctl/lbctl/test/testenv"
)

func TestMain(m *testing.M) { goleak.VerifyTestMain(m) }

// parse reads a scrape into name{label=value,...} -> value.
func parse(t *testing.T, r io.Reader) map[string]float64 {
	t.Helper()
	parser := expfmt.NewTextParser(model.UTF8Validation)
	mfs, err := parser.TextToMetricFamilies(r)
	if err != nil {
		t.Errorf("parse scrape: %v", err)
		return nil
	}
	out := map[string]float64{}
	for name, mf := range mfs {
		for _, m := range mf.GetMetric() {
			var ls []string
			for _, l := range m.GetLabel() {
				ls = append(ls, l.GetName()+"="+l.GetValue())
			}
			sort.Strings(ls)
			key := name + "{" + strings.Join(ls, ",") + "}"
			switch mf.GetType() {
			case dto.MetricType_COUNTER:
				out[key] = m.GetCounter().GetValue()
			case dto.MetricType_GAUGE:
				out[key] = m.GetGauge().GetValue()
			case dto.MetricType_HISTOGRAM:
				out[key+"_count"] = float64(m.GetHistogram().GetSampleCount())
			}
		}
	}
	return out
}

func scrapeHandler(t *testing.T, m *Metrics) map[string]float64 {
	t.Helper()
	rec := httptest.NewRecorder()
	m.Handler().ServeHTTP(rec, httptest.NewRequest(http.MethodGet, "/metrics", nil))
	if rec.Code != http.StatusOK {
		t.Fatalf("scrape: status %d: %s", rec.Code, rec.Body)
	}
	return parse(t, rec.Body)
}

// TestFrontendMetrics: the front end's counters and health are read at
// every scrape; check durations land in the histogram.
func TestFrontendMetrics(t *testing.T) {
	var mu sync.Mutex
	f := Frontend{Services: []Service{{
		Name: "web", Mode: "proxy", Protocol: "tcp", Connections: 3, Active: 1, BytesIn: 100, BytesOut: 2000,
		Upstreams: []Upstream{{Addr: "198.19.16.11:80", Up: true, Weight: 1, Selected: 3}, {Addr: "198.19.16.12:80", Failures: 2}},
	}}}
	m := New(Sources{Frontend: func() Frontend { mu.Lock(); defer mu.Unlock(); return f }}, nil)
	m.ObserveCheck("web", "198.19.16.11:80", 3*time.Millisecond, true)
	m.ObserveCheck("web", "198.19.16.12:80", time.Second, false)

	got := scrapeHandler(t, m)
	for k, want := range map[string]float64{
		"lbctl_connections_total{mode=proxy,service=web}":                                             3,
		"lbctl_active{mode=proxy,service=web}":                                                        1,
		"lbctl_bytes_total{direction=in,service=web}":                                                 100,
		"lbctl_bytes_total{direction=out,service=web}":                                                2000,
		"lbctl_upstream_up{service=web,upstream=198.19.16.11:80}":                                     1,
		"lbctl_upstream_up{service=web,upstream=198.19.16.12:80}":                                     0,
		"lbctl_upstream_failures_total{service=web,upstream=198.19.16.12:80}":                         2,
		"lbctl_upstream_selected_total{service=web,upstream=198.19.16.11:80}":                         3,
		"lbctl_health_check_duration_seconds{result=ok,service=web,upstream=198.19.16.11:80}_count":   1,
		"lbctl_health_check_duration_seconds{result=fail,service=web,upstream=198.19.16.12:80}_count": 1,
	} {
		if got[k] != want {
			t.Errorf("%s = %v, want %v", k, got[k], want)
		}
	}
	mu.Lock()
	f.Services[0].Connections, f.Services[0].Upstreams[0].Up = 10, false
	mu.Unlock()
	got = scrapeHandler(t, m)
	if got["lbctl_connections_total{mode=proxy,service=web}"] != 10 || got["lbctl_upstream_up{service=web,upstream=198.19.16.11:80}"] != 0 {
		t.Errorf("second scrape did not read the new state: %v", got)
	}
}

// TestBPFMetricsDuringTraffic attaches snat in a network namespace, sends
// datagrams through it while /metrics is served there, and checks that
// the scraped counters move with the traffic.
func TestBPFMetricsDuringTraffic(t *testing.T) {
	testenv.RequireRoot(t)
	testenv.RequireCommand(t, "ip")
	root := t.TempDir()
	if err := unix.Mount("bpffs", root, "bpf", 0, "mode=0700"); err != nil {
		t.Fatalf("mount bpffs: %v", err)
	}
	t.Cleanup(func() { _ = unix.Unmount(root, unix.MNT_DETACH) })

	done := make(chan struct{})
	go func() {
		defer close(done)
		runtime.LockOSThread() // never unlocked: the namespace dies with the thread
		if err := unix.Unshare(unix.CLONE_NEWNET); err != nil {
			t.Errorf("unshare netns: %v", err)
			return
		}
		for _, c := range [][]string{
			{"link", "add", "v0", "type", "veth", "peer", "name", "v1"},
			{"addr", "add", "198.19.16.11/24", "dev", "v0"},
			{"link", "set", "v0", "up"}, {"link", "set", "v1", "up"}, {"link", "set", "lo", "up"},
			{"neigh", "add", "198.19.16.99", "lladdr", "02:00:00:00:00:99", "dev", "v0"},
		} {
			if out, err := exec.Command("ip", c...).CombinedOutput(); err != nil {
				t.Errorf("ip %v: %v: %s", c, err, out)
				return
			}
		}
		dp, err := dataplane.Open(dataplane.Options{Root: root})
		if err != nil {
			t.Errorf("open dataplane: %v", err)
			return
		}
		defer dp.Close()
		if _, err := dp.AttachSNAT("v0"); err != nil {
			t.Errorf("attach: %v", err)
			return
		}
		rule := dataplane.SNATRule{Src: netip.MustParsePrefix("198.19.16.11/32"), Proto: dataplane.UDP, SPort: 53,
			To: netip.MustParseAddr("198.18.98.10")}
		if err := dp.AddSNAT(rule); err != nil {
			t.Errorf("add rule: %v", err)
			return
		}
		// A reader of its own, as the daemon or lbctl metrics has.
		rd, err := dataplane.Open(dataplane.Options{Root: root, NoCreate: true, ReadOnly: true})
		if err != nil {
			t.Errorf("open reader: %v", err)
			return
		}
		defer rd.Close()
		m := New(Sources{BPF: rd.Stats}, nil)
		ln, err := net.Listen("tcp", "198.19.16.11:0") // in the test namespace
		if err != nil {
			t.Errorf("listen: %v", err)
			return
		}
		ctx, cancel := context.WithCancel(context.Background())
		served := make(chan error, 1)
		go func() { served <- m.Serve(ctx, ln) }()
		defer func() {
			cancel()
			if err := <-served; err != nil {
				t.Errorf("serve: %v", err)
			}
		}()

		send := func(n int) {
			c, err := net.DialUDP("udp", net.UDPAddrFromAddrPort(netip.MustParseAddrPort("198.19.16.11:53")),
				net.UDPAddrFromAddrPort(netip.MustParseAddrPort("198.19.16.99:40000")))
			if err != nil {
				t.Errorf("dial: %v", err)
				return
			}
			defer c.Close()
			for i := 0; i < n; i++ {
				if _, err := c.Write([]byte("answer")); err != nil {
					t.Errorf("send: %v", err)
				}
			}
		}
		const rewritten = "lbctl_bpf_packets_total{counter=rewritten,program=snat}"
		const rulePkts = "lbctl_snat_rule_packets_total{proto=udp,sport=53,src=198.19.16.11/32,to=198.18.98.10}"
		send(3)
		a := scrapeTCP(t, ln.Addr().String())
		send(5)
		b := scrapeTCP(t, ln.Addr().String())
		if a["lbctl_bpf_scrape_ok{}"] != 1 || a[rewritten] < 3 || b[rewritten]-a[rewritten] != 5 {
			t.Errorf("%s: %v then %v; want >= 3, then 5 more", rewritten, a[rewritten], b[rewritten])
		}
		if b[rulePkts]-a[rulePkts] != 5 {
			t.Errorf("%s: %v then %v; want 5 more", rulePkts, a[rulePkts], b[rulePkts])
		}
		if b["lbctl_bpf_packets_total{counter=seen,program=snat}"] < b[rewritten] {
			t.Errorf("seen < rewritten: %v", b)
		}
	}()
	<-done
}

// scrapeTCP fetches /metrics over a TCP connection made on the calling
// thread (so in its network namespace; net/http would dial elsewhere).
func scrapeTCP(t *testing.T, addr string) map[string]float64 {
	t.Helper()
	c, err := net.Dial("tcp", addr)
	if err != nil {
		t.Errorf("dial metrics: %v", err)
		return nil
	}
	defer c.Close()
	fmt.Fprintf(c, "GET /metrics HTTP/1.0\r\nHost: lbctl\r\n\r\n")
	resp, err := http.ReadResponse(bufio.NewReader(c), nil)
	if err != nil {
		t.Errorf("read metrics: %v", err)
		return nil
	}
	defer resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		t.Errorf("scrape: %s", resp.Status)
		return nil
	}
	return parse(t, resp.Body)
}
