// Package metrics exports lbctl's counters to Prometheus: the BPF programs'
// counters (read from the pinned maps through pkg/dataplane at scrape time),
// the front end's counters and upstream health (read from a snapshot the
// daemon provides), and health-check latency histograms (observed as checks
// finish). The metric names are stable and listed in README.md and
// docs/operations.md; never rename one, only add.
package metrics

import (
	"context"
	"errors"
	"fmt"
	"net"
	"net/http"
	"strconv"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/collectors"
	"github.com/prometheus/client_golang/prometheus/promhttp"
	"go.uber.org/zap"

	"github.com/lbctl/lbctl/pkg/dataplane"
)

// Frontend is the front end's state as the daemon reports it at scrape time.
type Frontend struct {
	Services []Service
}

// Service is one service's counters since the daemon started.
type Service struct {
	Name     string
	Mode     string
	Protocol string
	// Connections is TCP connections accepted; Sessions UDP sessions created.
	Connections uint64
	Sessions    uint64
	// Active is the connections or sessions open now.
	Active int64
	// BytesIn is bytes from clients to upstreams, BytesOut back.
	BytesIn, BytesOut uint64
	// Rejected is connections/sessions refused (max_conns, no upstream
	// left, draining); Failed those no upstream could be reached for.
	Rejected, Failed uint64
	Upstreams        []Upstream
}

// Upstream is one upstream of a service.
type Upstream struct {
	Addr string
	Up   bool
	// Weight is the effective weight (slow start lowers it).
	Weight int
	// Failures counts failed connects, unanswered sessions and failed checks.
	Failures uint64
	// Selected counts how often the balancer picked this upstream.
	Selected uint64
}

// Sources are where the collectors read at scrape time; a nil field is
// skipped.
type Sources struct {
	// BPF returns the BPF counters (dataplane.(*Dataplane).Stats).
	BPF func() (dataplane.Stats, error)
	// Frontend returns the daemon's counters.
	Frontend func() Frontend
	// XDP returns the xdp_lb services with their backends' counters and
	// table shares (dataplane.(*Dataplane).XDPServices).
	XDP func() ([]dataplane.XDPServiceState, error)
}

// Metrics is lbctl's registry.
type Metrics struct {
	reg   *prometheus.Registry
	check *prometheus.HistogramVec
	log   *zap.Logger
}

// New registers lbctl's collectors over src on a fresh registry (plus the
// Go runtime and process collectors).
func New(src Sources, log *zap.Logger) *Metrics {
	if log == nil {
		log = zap.NewNop()
	}
	reg := prometheus.NewRegistry()
	m := &Metrics{
		reg: reg,
		log: log,
		check: prometheus.NewHistogramVec(prometheus.HistogramOpts{
			Name:    "lbctl_health_check_duration_seconds",
			Help:    "Duration of active health checks, by service, upstream and result (ok or fail).",
			Buckets: []float64{.0005, .001, .0025, .005, .01, .025, .05, .1, .25, .5, 1, 2.5, 5},
		}, []string{"service", "upstream", "result"}),
	}
	reg.MustRegister(m.check, &collector{src: src, log: log},
		collectors.NewGoCollector(), collectors.NewProcessCollector(collectors.ProcessCollectorOpts{}))
	return m
}

// Registry is the registry, for tests and extra collectors.
func (m *Metrics) Registry() *prometheus.Registry { return m.reg }

// ObserveCheck records one active health check of upstream of service.
func (m *Metrics) ObserveCheck(service, upstream string, d time.Duration, ok bool) {
	result := "ok"
	if !ok {
		result = "fail"
	}
	m.check.WithLabelValues(service, upstream, result).Observe(d.Seconds())
}

// Handler serves the metrics in the Prometheus text format.
func (m *Metrics) Handler() http.Handler {
	return promhttp.HandlerFor(m.reg, promhttp.HandlerOpts{ErrorLog: zap.NewStdLog(m.log)})
}

// Serve serves /metrics on ln until ctx ends, then closes it. The caller
// opens ln (net.Listen("tcp", cfg.Metrics.Listen)), so that an address in
// use is reported before anything starts, and in the caller's namespace.
func (m *Metrics) Serve(ctx context.Context, ln net.Listener) error {
	mux := http.NewServeMux()
	mux.Handle("/metrics", m.Handler())
	srv := &http.Server{Handler: mux, ReadHeaderTimeout: 5 * time.Second}
	errc := make(chan error, 1)
	go func() { errc <- srv.Serve(ln) }()
	select {
	case err := <-errc:
		return fmt.Errorf("metrics: serve on %s: %w", ln.Addr(), err)
	case <-ctx.Done():
	}
	sctx, cancel := context.WithTimeout(context.Background(), 2*time.Second)
	defer cancel()
	if err := srv.Shutdown(sctx); err != nil {
		_ = srv.Close()
	}
	if err := <-errc; err != nil && !errors.Is(err, http.ErrServerClosed) {
		return fmt.Errorf("metrics: serve on %s: %w", ln.Addr(), err)
	}
	return nil
}

// The metric descriptions (stable names).
var (
	descBPF = prometheus.NewDesc("lbctl_bpf_packets_total",
		"Packets counted by a BPF program, by program and counter (see docs/dataplane.md for each counter).",
		[]string{"program", "counter"}, nil)
	descBPFUp = prometheus.NewDesc("lbctl_bpf_scrape_ok",
		"1 if the pinned BPF counters could be read at this scrape, 0 if not (no state, no privileges).", nil, nil)
	descRulePkts = prometheus.NewDesc("lbctl_snat_rule_packets_total",
		"Packets rewritten by an snat rule.", []string{"src", "proto", "sport", "to"}, nil)
	descRuleBytes = prometheus.NewDesc("lbctl_snat_rule_bytes_total",
		"Bytes (skb length) rewritten by an snat rule.", []string{"src", "proto", "sport", "to"}, nil)
	descConns = prometheus.NewDesc("lbctl_connections_total",
		"TCP connections accepted by a service.", []string{"service", "mode"}, nil)
	descSessions = prometheus.NewDesc("lbctl_sessions_total",
		"UDP sessions created by a service.", []string{"service", "mode"}, nil)
	descActive = prometheus.NewDesc("lbctl_active",
		"Connections or sessions open now.", []string{"service", "mode"}, nil)
	descBytes = prometheus.NewDesc("lbctl_bytes_total",
		"Bytes proxied by a service: in = client to upstream, out = upstream to client.", []string{"service", "direction"}, nil)
	descRejected = prometheus.NewDesc("lbctl_rejected_total",
		"Connections or sessions a service refused: max_conns, no upstream left, draining.", []string{"service"}, nil)
	descFailed = prometheus.NewDesc("lbctl_failed_total",
		"Connections or sessions for which no upstream could be reached.", []string{"service"}, nil)
	descXDPPkts = prometheus.NewDesc("lbctl_xdp_backend_packets_total",
		"Packets the xdp_lb program sent to a backend of a service.", []string{"service", "proto", "backend"}, nil)
	descXDPBytes = prometheus.NewDesc("lbctl_xdp_backend_bytes_total",
		"Bytes the xdp_lb program sent to a backend of a service.", []string{"service", "proto", "backend"}, nil)
	descXDPShare = prometheus.NewDesc("lbctl_xdp_backend_share",
		"Share (0-1) of a service's Maglev table slots a backend holds: its share of new flows.", []string{"service", "proto", "backend"}, nil)
	descUp = prometheus.NewDesc("lbctl_upstream_up",
		"1 if the upstream is up (eligible), 0 if down.", []string{"service", "upstream"}, nil)
	descWeight = prometheus.NewDesc("lbctl_upstream_weight",
		"Effective weight of the upstream (lowered during slow start).", []string{"service", "upstream"}, nil)
	descFailures = prometheus.NewDesc("lbctl_upstream_failures_total",
		"Failures of the upstream: failed connects, unanswered sessions, failed checks.", []string{"service", "upstream"}, nil)
	descSelected = prometheus.NewDesc("lbctl_upstream_selected_total",
		"Times the balancer picked the upstream.", []string{"service", "upstream"}, nil)
)

// collector reads the sources at every scrape (no copies kept in between).
type collector struct {
	src Sources
	log *zap.Logger
}

func (c *collector) Describe(ch chan<- *prometheus.Desc) {
	for _, d := range []*prometheus.Desc{descBPF, descBPFUp, descRulePkts, descRuleBytes, descConns, descSessions,
		descActive, descBytes, descRejected, descFailed, descXDPPkts, descXDPBytes, descXDPShare, descUp, descWeight, descFailures, descSelected} {
		ch <- d
	}
}

func (c *collector) Collect(ch chan<- prometheus.Metric) {
	if c.src.BPF != nil {
		c.collectBPF(ch)
	}
	if c.src.XDP != nil {
		c.collectXDP(ch)
	}
	if c.src.Frontend != nil {
		collectFrontend(ch, c.src.Frontend())
	}
}

func (c *collector) collectXDP(ch chan<- prometheus.Metric) {
	svcs, err := c.src.XDP()
	if err != nil {
		c.log.Debug("metrics: read xdp services", zap.Error(err))
		return
	}
	for _, s := range svcs {
		total := 0
		for _, b := range s.Backends {
			total += b.Slots
		}
		for _, b := range s.Backends {
			labels := []string{s.VIP.String(), s.Proto.String(), b.Addr.String()}
			ch <- prometheus.MustNewConstMetric(descXDPPkts, prometheus.CounterValue, float64(b.Packets), labels...)
			ch <- prometheus.MustNewConstMetric(descXDPBytes, prometheus.CounterValue, float64(b.Bytes), labels...)
			share := 0.0
			if total > 0 {
				share = float64(b.Slots) / float64(total)
			}
			ch <- prometheus.MustNewConstMetric(descXDPShare, prometheus.GaugeValue, share, labels...)
		}
	}
}

func (c *collector) collectBPF(ch chan<- prometheus.Metric) {
	st, err := c.src.BPF()
	if err != nil {
		c.log.Debug("metrics: read BPF counters", zap.Error(err))
		ch <- prometheus.MustNewConstMetric(descBPFUp, prometheus.GaugeValue, 0)
		return
	}
	ch <- prometheus.MustNewConstMetric(descBPFUp, prometheus.GaugeValue, 1)
	for _, p := range st.Programs() {
		for _, ctr := range p.Counters {
			ch <- prometheus.MustNewConstMetric(descBPF, prometheus.CounterValue, float64(ctr.Value), p.Name, ctr.Name)
		}
	}
	for _, r := range st.SNATRules {
		sport := "any"
		if r.SPort != 0 {
			sport = strconv.Itoa(int(r.SPort))
		}
		to := r.To.String()
		if r.ToPort != 0 {
			to = net.JoinHostPort(to, strconv.Itoa(int(r.ToPort)))
		}
		labels := []string{r.Src.String(), r.Proto.String(), sport, to}
		ch <- prometheus.MustNewConstMetric(descRulePkts, prometheus.CounterValue, float64(r.Packets), labels...)
		ch <- prometheus.MustNewConstMetric(descRuleBytes, prometheus.CounterValue, float64(r.Bytes), labels...)
	}
}

func collectFrontend(ch chan<- prometheus.Metric, f Frontend) {
	for _, s := range f.Services {
		ch <- prometheus.MustNewConstMetric(descConns, prometheus.CounterValue, float64(s.Connections), s.Name, s.Mode)
		ch <- prometheus.MustNewConstMetric(descSessions, prometheus.CounterValue, float64(s.Sessions), s.Name, s.Mode)
		ch <- prometheus.MustNewConstMetric(descActive, prometheus.GaugeValue, float64(s.Active), s.Name, s.Mode)
		ch <- prometheus.MustNewConstMetric(descBytes, prometheus.CounterValue, float64(s.BytesIn), s.Name, "in")
		ch <- prometheus.MustNewConstMetric(descBytes, prometheus.CounterValue, float64(s.BytesOut), s.Name, "out")
		ch <- prometheus.MustNewConstMetric(descRejected, prometheus.CounterValue, float64(s.Rejected), s.Name)
		ch <- prometheus.MustNewConstMetric(descFailed, prometheus.CounterValue, float64(s.Failed), s.Name)
		for _, u := range s.Upstreams {
			up := 0.0
			if u.Up {
				up = 1
			}
			ch <- prometheus.MustNewConstMetric(descUp, prometheus.GaugeValue, up, s.Name, u.Addr)
			ch <- prometheus.MustNewConstMetric(descWeight, prometheus.GaugeValue, float64(u.Weight), s.Name, u.Addr)
			ch <- prometheus.MustNewConstMetric(descFailures, prometheus.CounterValue, float64(u.Failures), s.Name, u.Addr)
			ch <- prometheus.MustNewConstMetric(descSelected, prometheus.CounterValue, float64(u.Selected), s.Name, u.Addr)
		}
	}
}
