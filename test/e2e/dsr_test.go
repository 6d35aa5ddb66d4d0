package e2e

import (
	"fmt"
	"net"
	"net/netip"
	"os"
	"os/exec"
	"regexp"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"golang.org/x/net/dns/dnsmessage"

	"github.com/lbctl/lbctl/pkg/dataplane"
	"github.com/lbctl/lbctl/test/testenv"
	"github.com/lbctl/lbctl/test/topo"
)

// dsrConfig is DNS with direct server return on the VIP, IPv4 (dns4) and
// IPv6 (dns6), to the four backends, with nat router or origin.
func dsrConfig(nat string) string { return dsrConfigN(nat, 4) }

// dsrConfigN is dsrConfig with backends 1..n as upstreams.
func dsrConfigN(nat string, n int) string {
	var b strings.Builder
	b.WriteString("services:\n")
	for _, fam := range []struct {
		name    string
		vip     netip.Addr
		backend func(int) netip.Addr
		qtype   string
	}{{"dns4", topo.VIP4, topo.Backend4, "A"}, {"dns6", topo.VIP6, topo.Backend6, "AAAA"}} {
		fmt.Fprintf(&b, "  - name: %s\n    protocol: udp\n    listen: \"%s\"\n    mode: dsr\n    dsr: {nat: %s}\n",
			fam.name, netip.AddrPortFrom(fam.vip, 53), nat)
		fmt.Fprintf(&b, "    health: {type: dns, query: www.example.com, qtype: %s, interval: 2s, timeout: 1500ms, fall: 3}\n    upstreams:\n", fam.qtype)
		for i := 1; i <= n; i++ {
			fmt.Fprintf(&b, "      - \"%s\"\n", netip.AddrPortFrom(fam.backend(i), 53))
		}
	}
	return b.String()
}

// dsrFamily is one address family of the DSR tests.
type dsrFamily struct {
	name    string
	vip     netip.Addr
	client  netip.Addr
	typ     dnsmessage.Type
	backend func(int) netip.Addr
	public  func(int) netip.Addr
}

var dsrFamilies = []dsrFamily{
	{"ipv4", topo.VIP4, topo.Client4, dnsmessage.TypeA, topo.Backend4, topo.Public4},
	{"ipv6", topo.VIP6, topo.Client6, dnsmessage.TypeAAAA, topo.Backend6, topo.Public6},
}

// fromConn is an unconnected UDP socket seen as a net.Conn: Write sends to
// `to`, Read records where the datagram came from. A connected socket would
// let the kernel drop an answer from the wrong source; this one shows it.
type fromConn struct {
	*net.UDPConn
	to   netip.AddrPort
	from netip.AddrPort
}

func (c *fromConn) Write(b []byte) (int, error) { return c.WriteToUDPAddrPort(b, c.to) }

func (c *fromConn) Read(b []byte) (int, error) {
	n, from, err := c.ReadFromUDPAddrPort(b)
	c.from = netip.AddrPortFrom(from.Addr().Unmap(), from.Port())
	return n, err
}

// dnsClient is a client socket on one source port.
type dnsClient struct {
	c *fromConn
}

// newDNSClient opens a UDP socket on the client host at local (port 0:
// any) that asks `to`.
func (h *harness) newDNSClient(t *testing.T, local, to netip.AddrPort) *dnsClient {
	t.Helper()
	var uc *net.UDPConn
	in(t, h.Client, func() (err error) {
		uc, err = net.ListenUDP("udp", net.UDPAddrFromAddrPort(local))
		return err
	})
	t.Cleanup(func() { uc.Close() })
	return &dnsClient{c: &fromConn{UDPConn: uc, to: to}}
}

func (d *dnsClient) port() uint16 { return d.c.LocalAddr().(*net.UDPAddr).AddrPort().Port() }

// ask sends one query and returns the answer's address and the source of
// the answer datagram.
func (d *dnsClient) ask(typ dnsmessage.Type) (netip.Addr, netip.AddrPort, error) {
	var got netip.Addr
	d.c.SetDeadline(time.Now().Add(5 * time.Second))
	err := exchangeDNS(d.c, typ, &got)
	return got, d.c.from, err
}

// askRetry asks up to 3 times (UDP may lose a datagram on a loaded machine).
func (d *dnsClient) askRetry(typ dnsmessage.Type) (netip.Addr, netip.AddrPort, error) {
	var err error
	for range 3 {
		var got netip.Addr
		var from netip.AddrPort
		if got, from, err = d.ask(typ); err == nil {
			return got, from, nil
		}
	}
	return netip.Addr{}, netip.AddrPort{}, err
}

// backendOf returns i (1..4) when a is backend i's address in fam, else 0.
func backendOf(fam dsrFamily, a netip.Addr) int {
	for i := 1; i <= 4; i++ {
		if fam.backend(i) == a {
			return i
		}
	}
	return 0
}

// checkRotation asks 8 times from one socket: every answer comes from
// VIP:53 and names backends in turn, each of the four twice.
func (h *harness) checkRotation(t *testing.T, fam dsrFamily) { h.checkRotationN(t, fam, 4) }

// checkRotationN is checkRotation over backends 1..n.
func (h *harness) checkRotationN(t *testing.T, fam dsrFamily, n int) {
	t.Helper()
	vip := netip.AddrPortFrom(fam.vip, 53)
	c := h.newDNSClient(t, netip.AddrPortFrom(fam.client, 0), vip)
	var seq []int
	for k := range 8 {
		got, from, err := c.ask(fam.typ)
		if err != nil {
			t.Fatalf("%s query #%d: %v", fam.name, k, err)
		}
		if from != vip {
			t.Fatalf("%s query #%d: answer from %s, want %s", fam.name, k, from, vip)
		}
		i := backendOf(fam, got)
		if i == 0 || i > n {
			t.Fatalf("%s query #%d: answer %s is not the address of backend 1..%d", fam.name, k, got, n)
		}
		seq = append(seq, i)
	}
	for k := 1; k < len(seq); k++ {
		if seq[k] != seq[k-1]%n+1 {
			t.Fatalf("%s answers came from backends %v: not each in turn", fam.name, seq)
		}
	}
}

// checkTwoPorts: one client address with two source ports gets both
// answers, each from VIP:53.
func (h *harness) checkTwoPorts(t *testing.T, fam dsrFamily) {
	t.Helper()
	vip := netip.AddrPortFrom(fam.vip, 53)
	a := h.newDNSClient(t, netip.AddrPortFrom(fam.client, 0), vip)
	b := h.newDNSClient(t, netip.AddrPortFrom(fam.client, 0), vip)
	if a.port() == b.port() {
		t.Fatalf("two sockets on one port %d", a.port())
	}
	for _, c := range []*dnsClient{a, b} {
		got, from, err := c.askRetry(fam.typ)
		if err != nil || from != vip || backendOf(fam, got) == 0 {
			t.Fatalf("%s from port %d: answer %s from %s, %v; want a backend's address from %s", fam.name, c.port(), got, from, err, vip)
		}
	}
}

// checkDig runs dig from the client four times: it accepts only an answer
// from the server it asked, and the four name all four backends.
func (h *harness) checkDig(t *testing.T, fam dsrFamily) {
	t.Helper()
	testenv.RequireCommand(t, "dig")
	typ := "A"
	if fam.typ == dnsmessage.TypeAAAA {
		typ = "AAAA"
	}
	seen := map[int]bool{}
	for k := range 4 {
		out, err := h.Client.Run("dig", "+short", "+tries=3", "+time=5", "@"+fam.vip.String(), "www.example.com", typ)
		if err != nil {
			t.Fatalf("dig #%d: %v", k, err)
		}
		a, err := netip.ParseAddr(strings.TrimSpace(out))
		if err != nil || backendOf(fam, a) == 0 {
			t.Fatalf("dig #%d @%s: %q, want one backend's address", k, fam.vip, out)
		}
		seen[backendOf(fam, a)] = true
	}
	if len(seen) != 4 {
		t.Errorf("dig: answers from backends %v, want all four", seen)
	}
}

// snatStats reads the snat counters pinned under a host's bpffs.
func snatStats(t *testing.T, h *topo.Host) dataplane.Stats {
	t.Helper()
	dp, err := dataplane.Open(dataplane.Options{Root: h.BPFFS, NoCreate: true})
	if err != nil {
		t.Fatalf("open the dataplane of %s: %v", h.Role, err)
	}
	defer dp.Close()
	st, err := dp.Stats()
	if err != nil {
		t.Fatal(err)
	}
	return st
}

// rewritten sums the packets rewritten by the rules whose target is vip.
func rewritten(st dataplane.Stats, vip netip.Addr) uint64 {
	var n uint64
	for _, r := range st.SNATRules {
		if r.To == vip {
			n += r.Packets
		}
	}
	return n
}

// sysctl reads a sysctl in host's namespace.
func sysctl(t *testing.T, h *topo.Host, name string) string {
	t.Helper()
	out, err := h.Run("sysctl", "-n", name)
	if err != nil {
		t.Fatal(err)
	}
	return strings.TrimSpace(out)
}

// openFDs counts the open files of process pid.
func openFDs(t *testing.T, pid int) int {
	t.Helper()
	es, err := os.ReadDir(fmt.Sprintf("/proc/%d/fd", pid))
	if err != nil {
		t.Fatal(err)
	}
	return len(es)
}

// manyQueries sends n queries to vip from `ports` client sockets at once
// (each waiting for its answer before the next) and returns how many were
// answered from vip.
func (h *harness) manyQueries(t *testing.T, fam dsrFamily, n, ports int) int {
	t.Helper()
	vip := netip.AddrPortFrom(fam.vip, 53)
	var wg sync.WaitGroup
	var mu sync.Mutex
	answered := 0
	for p := range ports {
		c := h.newDNSClient(t, netip.AddrPortFrom(fam.client, 0), vip)
		wg.Add(1)
		go func() {
			defer wg.Done()
			ok := 0
			for k := p; k < n; k += ports {
				if _, from, err := c.askRetry(fam.typ); err == nil && from == vip {
					ok++
				}
			}
			mu.Lock()
			answered += ok
			mu.Unlock()
		}()
	}
	wg.Wait()
	return answered
}

// TestDSRRouterNAT: the seed's sections 3-7 with the LB as the backends'
// router. lbctl run turns forwarding on, attaches snat to the client-facing
// eth0 and installs the upstream -> VIP rules; answers come from each
// backend in turn and every one from VIP:53, rewritten on the LB (the snat
// rule counters count every answer); after 10,000 queries the LB holds no
// more files than before; at exit forwarding, snat and the rules are gone.
func TestDSRRouterNAT(t *testing.T) {
	h := newHarness(t, topo.Options{})
	h.startBackends(t)
	if f4, f6 := sysctl(t, h.LB, "net.ipv4.ip_forward"), sysctl(t, h.LB, "net.ipv6.conf.all.forwarding"); f4 != "0" || f6 != "0" {
		t.Fatalf("LB forwarding %s/%s before lbctl run, want 0/0", f4, f6)
	}
	l := h.run(t, dsrConfig("router"))
	if f4, f6 := sysctl(t, h.LB, "net.ipv4.ip_forward"), sysctl(t, h.LB, "net.ipv6.conf.all.forwarding"); f4 != "1" || f6 != "1" {
		t.Fatalf("LB forwarding %s/%s under lbctl run, want 1/1", f4, f6)
	}
	out, err := h.LB.Run(binary(t, "lbctl"), "--bpffs", h.LB.BPFFS, "snat", "list")
	if err != nil {
		t.Fatal(err)
	}
	for _, want := range []string{"198.19.16.11/32", "198.19.16.12/31", "198.19.16.14/32", "2001:db8:16::11/128", "2001:db8:16::12/127", "2001:db8:16::14/128"} {
		if !strings.Contains(out, want) {
			t.Errorf("snat list under lbctl run lacks %s:\n%s", want, out)
		}
	}

	for _, fam := range dsrFamilies {
		t.Run(fam.name, func(t *testing.T) {
			before := rewritten(snatStats(t, h.LB), fam.vip)
			h.checkRotation(t, fam)
			if got := rewritten(snatStats(t, h.LB), fam.vip) - before; got != 8 {
				t.Errorf("the LB rewrote %d answers to %s, want the 8 answered", got, fam.vip)
			}
			h.checkTwoPorts(t, fam)
			h.checkDig(t, fam)
		})
	}

	t.Run("no per-client socket", func(t *testing.T) {
		pid := l.cmd.Process.Pid
		before := openFDs(t, pid)
		const n = 10000
		got := h.manyQueries(t, dsrFamilies[0], n, 50)
		if got < n*99/100 {
			t.Errorf("%d of %d queries answered from the VIP", got, n)
		}
		after := openFDs(t, pid)
		t.Logf("%d of %d queries answered; lbctl run had %d files before, %d after", got, n, before, after)
		if after > before {
			t.Errorf("lbctl run holds %d files after %d queries from 50 ports, %d before", after, n, before)
		}
	})

	// SIGHUP down to two upstreams: their rules stay, the others go, and
	// the answers alternate between dev1 and dev2.
	t.Run("reload", func(t *testing.T) {
		if !l.reload(t, dsrConfigN("router", 2)) {
			t.Fatalf("reload failed:\n%s", l.out.String())
		}
		out, err := h.LB.Run(binary(t, "lbctl"), "--bpffs", h.LB.BPFFS, "snat", "list")
		if err != nil {
			t.Fatal(err)
		}
		var srcs []string
		for _, line := range strings.Split(strings.TrimSpace(out), "\n")[1:] {
			srcs = append(srcs, strings.Fields(line)[0])
		}
		want := []string{"198.19.16.11/32", "198.19.16.12/32", "2001:db8:16::11/128", "2001:db8:16::12/128"}
		if strings.Join(srcs, " ") != strings.Join(want, " ") {
			t.Errorf("snat rules after the reload: %v, want %v", srcs, want)
		}
		for _, fam := range dsrFamilies {
			h.checkRotationN(t, fam, 2)
		}
	})

	l.stop(t)
	if f4, f6 := sysctl(t, h.LB, "net.ipv4.ip_forward"), sysctl(t, h.LB, "net.ipv6.conf.all.forwarding"); f4 != "0" || f6 != "0" {
		t.Errorf("LB forwarding %s/%s after lbctl run, want 0/0 restored", f4, f6)
	}
	if _, err := os.Stat(h.LB.BPFFS + "/lbctl/snat_rules"); !os.IsNotExist(err) {
		out, _ := h.LB.Run(binary(t, "lbctl"), "--bpffs", h.LB.BPFFS, "snat", "list")
		t.Errorf("lbctl state left after exit (%v):\n%s", err, out)
	}
}

// TestDSROriginNAT: each backend rewrites its own answers (lbctl attach +
// lbctl snat add --vip-from, the operator's two commands) and sends them
// out of its public side: answers come from each backend in turn, every
// one from VIP:53, each counted by its backend's snat rule, and a capture
// on the LB sees none of them.
func TestDSROriginNAT(t *testing.T) {
	h := newHarness(t, topo.Options{OriginNAT: true})
	testenv.RequireCommand(t, "tcpdump")
	h.startBackends(t)
	cfg := dsrConfig("origin")
	path := h.dir + "/backends.yaml"
	if err := os.WriteFile(path, []byte(cfg), 0o644); err != nil {
		t.Fatal(err)
	}
	lbctl := binary(t, "lbctl")
	for i, b := range h.Backends {
		// The interface replies to clients leave by: eth1, the public side.
		mustRun(t, b, lbctl, "--bpffs", b.BPFFS, "attach", "eth1")
		for _, svc := range []struct {
			name string
			src  netip.Addr
		}{{"dns4", topo.Backend4(i + 1)}, {"dns6", topo.Backend6(i + 1)}} {
			out := mustRun(t, b, lbctl, "--bpffs", b.BPFFS, "snat", "add", "--vip-from", path, "--service", svc.name, "--src", svc.src.String())
			if !strings.HasPrefix(out, "added snat rule src "+netip.PrefixFrom(svc.src, svc.src.BitLen()).String()) {
				t.Fatalf("snat add --vip-from on %s: %q", b.Role, out)
			}
		}
		t.Cleanup(func() { b.Run(lbctl, "--bpffs", b.BPFFS, "detach", "eth1") })
	}
	l := h.run(t, cfg)
	if f := sysctl(t, h.LB, "net.ipv4.ip_forward"); f != "0" {
		t.Errorf("origin NAT: lbctl run turned forwarding on (%s); the LB only sends", f)
	}

	for _, fam := range dsrFamilies {
		t.Run(fam.name, func(t *testing.T) {
			answers := startCapture(t, h.LB, fmt.Sprintf("udp and src port 53 and dst host %s", fam.client))
			// The control: the same capture does see the queries pass.
			queries := startCapture(t, h.LB, fmt.Sprintf("udp and dst port 53 and src host %s", fam.client))
			before := make([]uint64, len(h.Backends))
			for i, b := range h.Backends {
				before[i] = rewritten(snatStats(t, b), fam.vip)
			}
			h.checkRotation(t, fam)
			h.checkTwoPorts(t, fam)
			h.checkDig(t, fam)
			for i, b := range h.Backends {
				// 8 rotation answers, one or two of the two ports', one of dig's.
				if got := rewritten(snatStats(t, b), fam.vip) - before[i]; got < 3 {
					t.Errorf("%s rewrote %d answers to %s, want at least 3", b.Role, got, fam.vip)
				}
			}
			if n := answers.stop(t); n != 0 {
				t.Errorf("a capture on the LB saw %d answers to the client; origin NAT answers bypass it", n)
			}
			// 8 + 2 + 4 queries, each seen coming in on eth0 and leaving on eth1.
			if n := queries.stop(t); n < 2*(8+2+4) {
				t.Errorf("a capture on the LB saw %d queries from the client, want at least %d: the capture does not work", n, 2*(8+2+4))
			}
		})
	}
	l.stop(t)
}

func mustRun(t *testing.T, h *topo.Host, name string, args ...string) string {
	t.Helper()
	out, err := h.Run(name, args...)
	if err != nil {
		t.Fatal(err)
	}
	return out
}

// capture is tcpdump on every interface of a host.
type capture struct {
	cmd *exec.Cmd
	out *testenv.SyncBuffer
}

// startCapture starts tcpdump with filter in host's namespace and waits
// until it listens.
func startCapture(t *testing.T, h *topo.Host, filter string) *capture {
	t.Helper()
	c := &capture{cmd: h.Command("tcpdump", "--immediate-mode", "-ni", "any", "-w", os.DevNull, filter), out: &testenv.SyncBuffer{}}
	c.cmd.Stdout, c.cmd.Stderr = c.out, c.out
	if err := c.cmd.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.cmd.Process.Kill(); c.cmd.Wait() })
	deadline := time.Now().Add(30 * time.Second)
	for !strings.Contains(c.out.String(), "listening on") {
		if time.Now().After(deadline) {
			t.Fatalf("tcpdump did not start: %s", c.out.String())
		}
		time.Sleep(20 * time.Millisecond)
	}
	return c
}

// The kernel's count of packets that matched the filter: "captured" may
// miss those still in the ring buffer when tcpdump is stopped.
var capturedRE = regexp.MustCompile(`(\d+) packets? received by filter`)

// stop ends the capture and returns the number of packets it saw.
func (c *capture) stop(t *testing.T) int {
	t.Helper()
	c.cmd.Process.Signal(os.Interrupt)
	c.cmd.Wait()
	m := capturedRE.FindStringSubmatch(c.out.String())
	if m == nil {
		t.Fatalf("tcpdump said no packet count: %s", c.out.String())
	}
	n, _ := strconv.Atoi(m[1])
	return n
}
