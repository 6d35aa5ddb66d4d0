package main

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"time"

	"github.com/lbctl/lbctl/test/testenv"
	"github.com/lbctl/lbctl/test/topo"
)

// options are the demo's inputs.
type options struct {
	lbctl, backend string // binaries (absolute paths)
	hold           bool
	out            io.Writer // the demo's narration
	dir            string    // scratch directory: configs, logs
}

// demo is one run: the topology and what runs on it.
type demo struct {
	options
	ctx   context.Context
	tp    *topo.Topology
	procs []*proc
}

// families of the demo, in the order shown.
var families = []struct {
	name         string
	vip          netip.Addr
	backend      func(int) netip.Addr
	qtype        string
	clientNet    string
	publicRouter string
	health       string // mode dsr needs an active check
}{
	{"IPv4", topo.VIP4, topo.Backend4, "A", "198.18.99.0/24", "198.18.100.254", "{type: dns, query: www.example.com, interval: 1s}"},
	{"IPv6", topo.VIP6, topo.Backend6, "AAAA", "2001:db8:99::/64", "2001:db8:100::254", "{type: dns, query: www.example.com, qtype: AAAA, interval: 1s}"},
}

// run builds the topology, runs the three sections and removes everything
// it started, whatever happens.
func run(ctx context.Context, o options) (err error) {
	d := &demo{options: o, ctx: ctx}
	d.tp, err = topo.New(topo.Options{OriginNAT: true})
	if err != nil {
		return err
	}
	defer func() {
		d.stopAll()
		if cerr := d.tp.Close(); cerr != nil {
			err = errors.Join(err, cerr)
			return
		}
		d.say("\nRemoved topology %s: namespaces, processes, bpffs mounts.", d.tp.ID)
	}()

	d.say("== lbctl demo on topology %s (namespaces lbt-%s-*)", d.tp.ID, d.tp.ID)
	d.say("   client %s / %s -> router -> LB, VIP %s / %s -> backends %s-14 / %s-14",
		topo.Client4, topo.Client6, topo.VIP4, topo.VIP6, topo.Backend4(1), topo.Backend6(1))
	d.say("   lbctl runs on each host with --bpffs pointing at that host's own bpffs (omitted below)")
	d.say("   every backend runs test/backend (dev1..dev4): HTTP on :80 (\"Hello from devN\"), DNS on :53 (www.example.com = its own address)")
	for i, b := range d.tp.Backends {
		_, err := d.start(b, "serving", d.backend, "--name", fmt.Sprintf("dev%d", i+1), "--readers", "1",
			"--http", ap(b.V4, 80), "--http", ap(b.V6, 80), "--dns", ap(b.V4, 53), "--dns", ap(b.V6, 53))
		if err != nil {
			return err
		}
	}
	for _, section := range []func() error{d.proxy, d.routerNAT, d.originNAT} {
		if err := section(); err != nil {
			return err
		}
	}
	if d.hold {
		d.say("\n== --hold: the topology stays up with origin NAT running; Ctrl-C removes it. Try:")
		d.say("   ip netns exec %s dig @%s www.example.com", d.tp.Client.NS, topo.VIP4)
		d.say("   ip netns exec %s %s --bpffs %s stats", d.tp.Backends[0].NS, d.lbctl, d.tp.Backends[0].BPFFS)
		d.say("   ip netns exec %s bash", d.tp.LB.NS)
		<-d.ctx.Done() // Ctrl-C is how a held demo ends: not an error
		return nil
	}
	return d.ctx.Err()
}

// proxy: lbctl run in mode proxy, the blog's curl and dig loops.
func (d *demo) proxy() error {
	d.say("\n== 1. Proxy (lbctl run, mode: proxy): the LB terminates every connection and query; the backends see the LB's address")
	cfg := "services:\n"
	for _, f := range families {
		cfg += service("web"+suffix(f.vip), "tcp", f.vip, 80, "proxy", "", f.backend)
		cfg += service("dns"+suffix(f.vip), "udp", f.vip, 53, "proxy", "    responses: 1\n    timeout: 1s\n", f.backend)
	}
	lb, err := d.runLB("proxy.yaml", cfg)
	if err != nil {
		return err
	}
	for _, f := range families {
		url := "http://" + f.vip.String() + "/"
		if f.vip.Is6() {
			url = "http://[" + f.vip.String() + "]/"
		}
		d.say("client$ for i in 1 2 3 4; do curl -s %s; done", url)
		seen := map[string]bool{}
		for range 4 {
			out, err := d.cmd(d.tp.Client, "curl", "-sg", "--max-time", "5", url)
			if err != nil {
				return err
			}
			line := strings.TrimSpace(out)
			d.say("%s", line)
			if f := strings.Fields(line); len(f) > 2 {
				seen[f[2]] = true
			}
		}
		if len(seen) != 4 {
			return fmt.Errorf("proxy %s: curl answers came from %d backends, want all 4 in turn", f.name, len(seen))
		}
	}
	for _, f := range families {
		d.say("client$ for i in 1 2 3 4; do dig @%s www.example.com %s +short; done", f.vip, f.qtype)
		seen := map[string]bool{}
		for range 4 {
			out, err := d.cmd(d.tp.Client, "dig", "@"+f.vip.String(), "www.example.com", f.qtype, "+short", "+time=2", "+tries=2")
			if err != nil {
				return err
			}
			d.say("%s", strings.TrimSpace(out))
			seen[strings.TrimSpace(out)] = true
		}
		if err := wantBackends(seen, f.backend); err != nil {
			return fmt.Errorf("proxy %s dig: %w", f.name, err)
		}
	}
	return d.stop(lb)
}

// routerNAT: mode dsr with nat router. The backends' replies to the
// client must be routed through the LB, so their public-side routes go.
func (d *demo) routerNAT() error {
	d.say("\n== 2. DSR, router NAT (lbctl run, mode: dsr, dsr: {nat: router})")
	d.say("   The LB forwards each query from the client's address:port (no reply expected); the backend answers the client")
	d.say("   directly, routed through the LB, whose snat program (TC egress, client side) rewrites the source to VIP:53.")
	d.say("   The backends route replies via the LB (their default route); the public-side route goes for this section:")
	for i, b := range d.tp.Backends {
		for _, f := range families {
			if err := d.show(b, i == 0, "ip", "route", "del", f.clientNet); err != nil {
				return err
			}
		}
	}
	d.say("   (the same on backend2..4)")
	cfg := "services:\n"
	for _, f := range families {
		cfg += service("dns"+suffix(f.vip), "udp", f.vip, 53, "dsr", "    dsr: {nat: router}\n    health: "+f.health+"\n", f.backend)
	}
	lb, err := d.runLB("dsr-router.yaml", cfg)
	if err != nil {
		return err
	}
	if err := d.digLoops("router NAT"); err != nil {
		return err
	}
	if err := d.show(d.tp.LB, true, d.lbctl, "--bpffs", d.tp.LB.BPFFS, "snat", "list"); err != nil {
		return err
	}
	return d.stop(lb)
}

// originNAT: mode dsr with nat origin; each backend rewrites its own
// replies on its public side, which they leave by.
func (d *demo) originNAT() error {
	d.say("\n== 3. DSR, origin NAT (lbctl run, mode: dsr, dsr: {nat: origin})")
	d.say("   Each backend rewrites its own answers on its public side (eth1) and sends them through the router: they bypass the LB.")
	cfg := "services:\n"
	for _, f := range families {
		cfg += service("dns"+suffix(f.vip), "udp", f.vip, 53, "dsr", "    dsr: {nat: origin}\n    health: "+f.health+"\n", f.backend)
	}
	path := filepath.Join(d.dir, "dsr-origin.yaml")
	if err := os.WriteFile(path, []byte(cfg), 0o644); err != nil {
		return err
	}
	for i, b := range d.tp.Backends {
		first := i == 0
		for _, f := range families {
			if err := d.show(b, first, "ip", "route", "add", f.clientNet, "via", f.publicRouter, "dev", "eth1"); err != nil {
				return err
			}
		}
		if err := d.show(b, first, d.lbctl, "--bpffs", b.BPFFS, "attach", "eth1"); err != nil {
			return err
		}
		for _, f := range families {
			if err := d.show(b, first, d.lbctl, "--bpffs", b.BPFFS, "snat", "add", "--vip-from", path,
				"--service", "dns"+suffix(f.vip), "--src", f.backend(i+1).String()); err != nil {
				return err
			}
		}
	}
	d.say("   (the same on backend2..4, each with its own --src)")
	lb, err := d.runLB("dsr-origin.yaml", cfg)
	if err != nil {
		return err
	}
	tx0, err := d.txPackets(d.tp.LB, "eth0")
	if err != nil {
		return err
	}
	if err := d.digLoops("origin NAT"); err != nil {
		return err
	}
	tx1, err := d.txPackets(d.tp.LB, "eth0")
	if err != nil {
		return err
	}
	d.say("   LB eth0 (towards the client) sent %d packets during these 8 queries: the answers did not cross the LB.", tx1-tx0)
	if tx1-tx0 >= 8 {
		return fmt.Errorf("origin NAT: the LB's client-facing eth0 sent %d packets during 8 queries: answers crossed the LB", tx1-tx0)
	}
	if err := d.show(d.tp.Backends[0], true, d.lbctl, "--bpffs", d.tp.Backends[0].BPFFS, "stats"); err != nil {
		return err
	}
	if d.hold {
		return nil
	}
	return d.stop(lb)
}

// digLoops runs the dig loop against the VIP for both families and checks
// the answers rotate over the four backends, each received from the VIP.
func (d *demo) digLoops(what string) error {
	for _, f := range families {
		d.say("client$ for i in 1 2 3 4; do dig @%s www.example.com %s +noall +answer +stats; done   # answer and SERVER lines", f.vip, f.qtype)
		seen := map[string]bool{}
		for range 4 {
			out, err := d.cmd(d.tp.Client, "dig", "@"+f.vip.String(), "www.example.com", f.qtype, "+noall", "+answer", "+stats", "+time=2", "+tries=2")
			if err != nil {
				return err
			}
			answer, server := "", ""
			for _, l := range strings.Split(out, "\n") {
				if strings.HasPrefix(l, ";; SERVER:") {
					server = strings.TrimSpace(l)
				} else if fs := strings.Fields(l); len(fs) == 5 && fs[3] == f.qtype {
					answer = fs[4]
				}
			}
			d.say("%-16s  %s", answer, server)
			if want := fmt.Sprintf(";; SERVER: %s#53(%s)", f.vip, f.vip); !strings.HasPrefix(server, want) {
				return fmt.Errorf("%s %s: dig's answer came from %q, want %s", what, f.name, server, want)
			}
			seen[answer] = true
		}
		if err := wantBackends(seen, f.backend); err != nil {
			return fmt.Errorf("%s %s: %w", what, f.name, err)
		}
	}
	return nil
}

// wantBackends checks that the answers are the four backends' addresses.
func wantBackends(seen map[string]bool, backend func(int) netip.Addr) error {
	for i := 1; i <= 4; i++ {
		if !seen[backend(i).String()] {
			return fmt.Errorf("answers %v: backend %s never answered, want all four in turn", keys(seen), backend(i))
		}
	}
	return nil
}

func keys(m map[string]bool) []string {
	var s []string
	for k := range m {
		s = append(s, k)
	}
	return s
}

// service renders one service of a config.
func service(name, proto string, vip netip.Addr, port uint16, mode, extra string, backend func(int) netip.Addr) string {
	ups := make([]string, 4)
	for i := range ups {
		ups[i] = strconv.Quote(ap(backend(i+1), port))
	}
	return fmt.Sprintf("  - name: %s\n    protocol: %s\n    listen: %q\n    mode: %s\n%s    upstreams: [%s]\n",
		name, proto, ap(vip, port), mode, extra, strings.Join(ups, ", "))
}

func suffix(vip netip.Addr) string {
	if vip.Is6() {
		return "6"
	}
	return ""
}

func ap(a netip.Addr, port uint16) string { return netip.AddrPortFrom(a, port).String() }

// say prints a line of narration.
func (d *demo) say(format string, args ...any) { fmt.Fprintf(d.out, format+"\n", args...) }

// cmd runs a short command on h and returns its stdout.
func (d *demo) cmd(h *topo.Host, name string, args ...string) (string, error) {
	c := exec.CommandContext(d.ctx, "ip", append([]string{"netns", "exec", h.NS, name}, args...)...)
	c.SysProcAttr = &syscall.SysProcAttr{Setpgid: true}
	var stdout, stderr bytes.Buffer
	c.Stdout, c.Stderr = &stdout, &stderr
	if err := c.Run(); err != nil {
		if d.ctx.Err() != nil {
			return "", d.ctx.Err()
		}
		return "", fmt.Errorf("%s: %s %s: %w\n%s%s", h.Role, name, strings.Join(args, " "), err, stdout.String(), stderr.String())
	}
	return stdout.String(), nil
}

// show runs a command on h, printing it (if print) and its output.
func (d *demo) show(h *topo.Host, print bool, name string, args ...string) error {
	shown := append([]string{name}, args...)
	if name == d.lbctl && len(args) > 1 && args[0] == "--bpffs" {
		shown = append([]string{"lbctl"}, args[2:]...) // every host's own bpffs: said once
	}
	out, err := d.cmd(h, name, args...)
	if print {
		d.say("%s$ %s", h.Role, strings.ReplaceAll(strings.Join(shown, " "), d.dir+"/", ""))
		if s := strings.TrimRight(out, "\n"); s != "" {
			d.say("%s", s)
		}
	}
	return err
}

// txPackets reads the transmitted-packets counter of dev on h.
func (d *demo) txPackets(h *topo.Host, dev string) (uint64, error) {
	out, err := d.cmd(h, "cat", "/sys/class/net/"+dev+"/statistics/tx_packets")
	if err != nil {
		return 0, err
	}
	return strconv.ParseUint(strings.TrimSpace(out), 10, 64)
}

// runLB writes cfg to the scratch dir under name and starts `lbctl run` on
// the LB with it, returning once it runs.
func (d *demo) runLB(name, cfg string) (*proc, error) {
	path := filepath.Join(d.dir, name)
	if err := os.WriteFile(path, []byte(cfg), 0o644); err != nil {
		return nil, err
	}
	d.say("lb$ cat %s", name)
	d.say("%s", strings.TrimRight(cfg, "\n"))
	d.say("lb$ lbctl run -c %s &", name)
	return d.start(d.tp.LB, "\trunning\t", d.lbctl, "--bpffs", d.tp.LB.BPFFS, "run", "-c", path)
}

// proc is a long-running process of the demo (a backend, lbctl run).
type proc struct {
	name string
	cmd  *exec.Cmd
	out  *testenv.SyncBuffer
	done chan struct{}
	err  error // after done
}

// start runs name on h in its own process group (Ctrl-C reaches only the
// demo, which then stops everything in order) and waits until its output
// contains ready.
func (d *demo) start(h *topo.Host, ready, name string, args ...string) (*proc, error) {
	p := &proc{name: h.Role + " " + filepath.Base(name), cmd: h.Command(name, args...), out: &testenv.SyncBuffer{}, done: make(chan struct{})}
	p.cmd.Stdout, p.cmd.Stderr = p.out, p.out
	p.cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true}
	if err := p.cmd.Start(); err != nil {
		return nil, fmt.Errorf("start %s: %w", p.name, err)
	}
	go func() { p.err = p.cmd.Wait(); close(p.done) }()
	d.procs = append(d.procs, p)
	deadline := time.NewTimer(30 * time.Second)
	defer deadline.Stop()
	tick := time.NewTicker(20 * time.Millisecond)
	defer tick.Stop()
	for !strings.Contains(p.out.String(), ready) {
		select {
		case <-p.done:
			return nil, fmt.Errorf("%s exited (%v) before it was ready:\n%s", p.name, p.err, p.out.String())
		case <-d.ctx.Done():
			return nil, d.ctx.Err()
		case <-deadline.C:
			return nil, fmt.Errorf("%s not ready after 30s:\n%s", p.name, p.out.String())
		case <-tick.C:
		}
	}
	return p, nil
}

// stop ends p with SIGTERM (SIGKILL after 10 s) and reports a failed exit.
func (d *demo) stop(p *proc) error {
	select {
	case <-p.done:
	default:
		_ = p.cmd.Process.Signal(syscall.SIGTERM)
		select {
		case <-p.done:
		case <-time.After(10 * time.Second):
			_ = p.cmd.Process.Kill()
			<-p.done
			return fmt.Errorf("%s did not stop on SIGTERM within 10s:\n%s", p.name, p.out.String())
		}
	}
	if p.err != nil && d.ctx.Err() == nil {
		return fmt.Errorf("%s: %v:\n%s", p.name, p.err, p.out.String())
	}
	return nil
}

// stopAll stops every process still running, the last started first.
func (d *demo) stopAll() {
	for i := len(d.procs) - 1; i >= 0; i-- {
		_ = d.stop(d.procs[i])
	}
}
