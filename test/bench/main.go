// Command bench is lbctl's benchmark (`make bench`): in one run, on one
// namespace topology (test/topo, 198.18.0.0/15 and 2001:db8::/32 only), it
// measures the routed floor, nginx as the seed's standard and transparent
// proxy, lbctl in each mode that has landed, and the BPF programs under
// BPF_PROG_TEST_RUN, and prints one table with the ratios the issues ask
// for. Every line runs for -duration; everything it starts is stopped and
// the namespaces are removed on every exit path, Ctrl-C included.
//
//	bench -lbctl bin/lbctl -backend bin/backend -dataplane-test bin/dataplane.test \
//	      -duration 10s -run 'routed|nginx' -out bin/bench-results
//
// Method: docs/bench.md.
package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"io"
	"os"
	"os/exec"
	"os/signal"
	"path/filepath"
	"regexp"
	"runtime"
	"strings"
	"syscall"
	"time"

	"go.uber.org/zap"
	"go.uber.org/zap/zapcore"

	"github.com/lbctl/lbctl/test/topo"
)

// scenarios in the order they run (and print).
func scenarios() []scenario {
	return []scenario{
		routedScenario,
		nginxScenario,
		nginxTransparentScenario,
		lbctlProxyScenario,
		lbctlTransparentScenario,
		lbctlDSRRouterScenario,
		lbctlDSROriginScenario,
		lbctlXDPNativeScenario,
		lbctlXDPGenericScenario,
		bpfScenario,
	}
}

func main() {
	// The context ends on the first SIGINT/SIGTERM; later ones are
	// swallowed (the handler stays installed) so the cleanup always runs.
	ctx, cancel := context.WithCancel(context.Background())
	sig := make(chan os.Signal, 4)
	signal.Notify(sig, os.Interrupt, syscall.SIGTERM)
	go func() {
		<-sig
		fmt.Fprintln(os.Stderr, "bench: interrupted, cleaning up")
		cancel()
	}()
	code := run(ctx, os.Args[1:], os.Stdout, os.Stderr)
	cancel()
	os.Exit(code)
}

type options struct {
	duration time.Duration
	run      string
	out      string
	lbctl    string
	backend  string
	dpTest   string
	list     bool
	lines    string
	loads    loadParams
}

func parseArgs(args []string, stderr io.Writer) (*options, error) {
	var o options
	fs := flag.NewFlagSet("bench", flag.ContinueOnError)
	fs.SetOutput(stderr)
	fs.DurationVar(&o.duration, "duration", 10*time.Second, "how long each load line runs (whole seconds)")
	fs.StringVar(&o.run, "run", ".", "run only the scenarios whose name matches this regular expression (see -list)")
	fs.StringVar(&o.lines, "loads", ".", "run only the load lines whose name matches this regular expression (\"DNS udp4\", \"DNS udp6\", \"HTTP keep-alive\", \"HTTP new conn\")")
	fs.StringVar(&o.out, "out", "bin/bench-results", "directory for the results file (bench-<time>.md) and the run's logs")
	fs.StringVar(&o.lbctl, "lbctl", "bin/lbctl", "the lbctl binary")
	fs.StringVar(&o.backend, "backend", "bin/backend", "the demo backend binary (go build ./test/backend)")
	fs.StringVar(&o.dpTest, "dataplane-test", "bin/dataplane.test", "pkg/dataplane's test binary (go test -c ./pkg/dataplane), for the BPF lines")
	fs.BoolVar(&o.list, "list", false, "list the scenarios and exit")
	fs.IntVar(&o.loads.dnsClients, "dns-clients", 16, "dnsperf -c: client source ports (split over the dnsperf processes)")
	fs.IntVar(&o.loads.dnsOutstanding, "dns-outstanding", 64, "dnsperf -q: queries in flight (split over the dnsperf processes)")
	fs.IntVar(&o.loads.dnsProcs, "dns-procs", 4, "dnsperf processes per line, one thread each (at least one per target)")
	fs.IntVar(&o.loads.wrkConns, "http-conns", 32, "wrk -c: connections (split over the targets)")
	fs.IntVar(&o.loads.wrkThreads, "http-threads", 2, "wrk -t: threads (split over the targets)")
	if err := fs.Parse(args); err != nil {
		return nil, err
	}
	if fs.NArg() > 0 {
		return nil, fmt.Errorf("unexpected argument %q", fs.Arg(0))
	}
	if o.duration < time.Second || o.duration > 5*time.Minute {
		return nil, fmt.Errorf("-duration %s: want 1s to 5m", o.duration)
	}
	if _, err := regexp.Compile(o.run); err != nil {
		return nil, fmt.Errorf("-run %q: %w", o.run, err)
	}
	if _, err := regexp.Compile(o.lines); err != nil {
		return nil, fmt.Errorf("-loads %q: %w", o.lines, err)
	}
	if o.loads.dnsClients < 1 || o.loads.dnsOutstanding < 1 || o.loads.dnsProcs < 1 || o.loads.wrkConns < 1 || o.loads.wrkThreads < 1 {
		return nil, errors.New("-dns-clients, -dns-outstanding, -dns-procs, -http-conns and -http-threads must be at least 1")
	}
	return &o, nil
}

func run(ctx context.Context, args []string, stdout, stderr io.Writer) int {
	o, err := parseArgs(args, stderr)
	if err != nil {
		if errors.Is(err, flag.ErrHelp) {
			return 0
		}
		fmt.Fprintf(stderr, "bench: %v\n", err)
		return 2
	}
	if o.list {
		for _, s := range scenarios() {
			fmt.Fprintln(stdout, s.name)
		}
		return 0
	}
	log := zap.New(zapcore.NewCore(zapcore.NewConsoleEncoder(zap.NewDevelopmentEncoderConfig()),
		zapcore.Lock(zapcore.AddSync(stderr)), zap.InfoLevel))
	if err := bench(ctx, log, o, stdout); err != nil {
		fmt.Fprintf(stderr, "bench: %v\n", err)
		return 1
	}
	return 0
}

// bench builds the topology, runs the scenarios and writes the table.
func bench(ctx context.Context, log *zap.Logger, o *options, stdout io.Writer) (err error) {
	if os.Geteuid() != 0 {
		return errors.New("needs root (network namespaces, BPF): run it as root, e.g. sudo make bench")
	}
	for _, tool := range []string{"ip", "dnsperf", "wrk", "nginx", "iptables", "sysctl", "ethtool"} {
		if _, err := exec.LookPath(tool); err != nil {
			return fmt.Errorf("%s not found on PATH: install it with scripts/install-deps.sh", tool)
		}
	}
	if _, err := os.Stat(nginxModule); err != nil {
		return fmt.Errorf("nginx stream module: %w (install libnginx-mod-stream: scripts/install-deps.sh)", err)
	}
	for _, p := range []*string{&o.lbctl, &o.backend, &o.dpTest, &o.out} {
		if *p, err = filepath.Abs(*p); err != nil {
			return err
		}
	}
	if _, err := os.Stat(o.backend); err != nil {
		return fmt.Errorf("%w: build it first (make bench does)", err)
	}
	if err := os.MkdirAll(o.out, 0o755); err != nil {
		return fmt.Errorf("results dir: %w", err)
	}
	started := time.Now()
	dir, err := os.MkdirTemp(o.out, "run-"+started.UTC().Format("20060102-150405")+"-")
	if err != nil {
		return fmt.Errorf("run dir: %w", err)
	}
	h := header{date: started, duration: o.duration, loadBefore: loadavg(), kernel: kernel(), cpus: runtime.NumCPU()}

	log.Info("building the topology")
	t, err := topo.New(topo.Options{OriginNAT: true, LBForward: true})
	if err != nil {
		return err
	}
	log.Info("topology up", zap.String("namespaces", "lbt-"+t.ID+"-*"))
	e := &env{log: log, topo: t, dir: dir, duration: o.duration, lbctl: o.lbctl, dpTest: o.dpTest, loads: o.loads, lines: regexp.MustCompile(o.lines)}
	defer func() {
		e.undo(0)
		if cerr := t.Close(); cerr != nil {
			err = errors.Join(err, fmt.Errorf("remove topology: %w", cerr))
		} else {
			log.Info("topology removed", zap.String("namespaces", "lbt-"+t.ID+"-*"))
		}
	}()
	if err := e.prepare(ctx, o.backend); err != nil {
		return err
	}

	re := regexp.MustCompile(o.run)
	rs, notes := runScenarios(ctx, e, scenarios(), re.MatchString)
	if ctx.Err() != nil {
		return errors.New("interrupted: no table written")
	}
	h.loadAfter = loadavg()
	h.notes = notes
	f, err := os.Create(filepath.Join(o.out, "bench-"+started.UTC().Format("20060102-150405")+".md"))
	if err != nil {
		return fmt.Errorf("results file: %w", err)
	}
	defer f.Close()
	writeTable(io.MultiWriter(stdout, f), h, rs)
	fmt.Fprintf(stdout, "\nresults: %s (logs and configs: %s)\n", f.Name(), dir)
	return nil
}

// prepare puts the shared topology in its base state: the backends'
// public-side routes off (origin NAT adds them back for its scenario),
// the veth settings XDP needs (for every line alike), the demo backends
// running, each reachable from the client through the LB.
func (e *env) prepare(ctx context.Context, backend string) error {
	// Native XDP cannot complete a partial (offloaded) checksum, which only
	// a veth hands on, so the client sends full checksums; and a veth takes
	// frames redirected by native XDP only with NAPI (GRO) on its peer.
	if _, err := e.run(ctx, e.topo.Client, "ethtool", "-K", "eth0", "tx", "off"); err != nil {
		return err
	}
	if _, err := e.run(ctx, e.topo.Switch, "ethtool", "-K", "p0", "gro", "on"); err != nil {
		return err
	}
	var procs []*proc
	for i, b := range e.topo.Backends {
		for _, c := range [][]string{
			{"ip", "-4", "route", "del", "198.18.99.0/24"},
			{"ip", "-6", "route", "del", "2001:db8:99::/64"},
		} {
			if _, err := e.run(ctx, b, c[0], c[1:]...); err != nil {
				return err
			}
		}
		p, err := e.start(b, b.Role, backend, "--name", fmt.Sprintf("dev%d", i+1), "--log-level", "warn",
			"--http", b.V4.String()+":80",
			"--dns", b.V4.String()+":53", "--dns", "["+b.V6.String()+"]:53")
		if err != nil {
			return err
		}
		procs = append(procs, p)
	}
	if err := e.waitDNS(ctx, procs, append(e.backendAddrs(false), e.backendAddrs(true)...)...); err != nil {
		return err
	}
	return e.waitHTTP(ctx, procs, e.backendAddrs(false)...)
}

func loadavg() string {
	b, err := os.ReadFile("/proc/loadavg")
	if err != nil {
		return "unknown"
	}
	f := strings.Fields(string(b))
	if len(f) < 3 {
		return "unknown"
	}
	return strings.Join(f[:3], " ")
}

func kernel() string {
	var u syscall.Utsname
	if err := syscall.Uname(&u); err != nil {
		return "unknown"
	}
	var b strings.Builder
	for _, c := range u.Release {
		if c == 0 {
			break
		}
		b.WriteByte(byte(c))
	}
	return b.String()
}
