package e2e

import (
	"bytes"
	"encoding/json"
	"fmt"
	"io"
	"net"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/lbctl/lbctl/test/testenv"
	"github.com/lbctl/lbctl/test/topo"
)

// transparentConfig: HTTP (:80) and a UDP "who am I" service (:9) on the
// VIP, IPv4 and IPv6, in mode transparent, to the first n backends.
func transparentConfig(n int, extra string) string {
	var b strings.Builder
	b.WriteString("drain_timeout: 5s\nservices:\n")
	for _, fam := range []string{"4", "6"} {
		vip, backend := topo.VIP4, topo.Backend4
		if fam == "6" {
			vip, backend = topo.VIP6, topo.Backend6
		}
		for _, s := range []struct {
			name, proto string
			port        int
		}{{"web", "tcp", 80}, {"who", "udp", 9}} {
			fmt.Fprintf(&b, "  - name: %s%s\n    protocol: %s\n    listen: \"%s\"\n    mode: transparent\n",
				s.name, fam, s.proto, netip.AddrPortFrom(vip, uint16(s.port)))
			if s.proto == "udp" {
				b.WriteString("    responses: 1\n    timeout: 2s\n")
			}
			b.WriteString(extra)
			b.WriteString("    upstreams:\n")
			for i := 1; i <= n; i++ {
				fmt.Fprintf(&b, "      - \"%s\"\n", netip.AddrPortFrom(backend(i), uint16(s.port)))
			}
		}
	}
	return b.String()
}

// serveWhoAmI answers every datagram on backend i's port 9 with
// "devI <source address:port>".
func serveWhoAmI(t *testing.T, h *harness) {
	t.Helper()
	for i, b := range h.Backends {
		for _, a := range []netip.Addr{topo.Backend4(i + 1), topo.Backend6(i + 1)} {
			name := fmt.Sprintf("dev%d", i+1)
			in(t, b, func() error {
				pc, err := net.ListenUDP("udp", net.UDPAddrFromAddrPort(netip.AddrPortFrom(a, 9)))
				if err != nil {
					return err
				}
				t.Cleanup(func() { pc.Close() })
				go func() {
					buf := make([]byte, 512)
					for {
						_, from, err := pc.ReadFromUDPAddrPort(buf)
						if err != nil {
							return
						}
						pc.WriteToUDPAddrPort([]byte(name+" "+from.String()), from)
					}
				}()
				return nil
			})
		}
	}
}

// getFrom sends one HTTP/1.0 GET from the client namespace, from local
// (port 0: any), and returns the local address used and the body.
func (h *harness) getFrom(local, addr netip.AddrPort) (netip.AddrPort, string, error) {
	var me netip.AddrPort
	var body string
	err := h.Client.Do(func() error {
		var err error
		me, body, err = get(local, addr)
		return err
	})
	return me, body, err
}

// get is getFrom on the calling thread's namespace.
func get(local, addr netip.AddrPort) (netip.AddrPort, string, error) {
	d := net.Dialer{Timeout: 5 * time.Second, LocalAddr: net.TCPAddrFromAddrPort(local)}
	if !local.IsValid() {
		d.LocalAddr = nil
	}
	c, err := d.Dial("tcp", addr.String())
	if err != nil {
		return netip.AddrPort{}, "", err
	}
	defer c.Close()
	me := unmap(c.LocalAddr().(*net.TCPAddr).AddrPort())
	c.SetDeadline(time.Now().Add(10 * time.Second))
	fmt.Fprintf(c, "GET / HTTP/1.0\r\nHost: www.example.com\r\n\r\n")
	b, err := io.ReadAll(c)
	if err != nil {
		return me, "", err
	}
	_, after, ok := bytes.Cut(b, []byte("\r\n\r\n"))
	if !ok {
		return me, "", fmt.Errorf("GET %s: not an HTTP answer: %q", addr, b)
	}
	return me, strings.TrimSpace(string(after)), nil
}

func unmap(a netip.AddrPort) netip.AddrPort {
	return netip.AddrPortFrom(a.Addr().Unmap(), a.Port())
}

// whoAmI sends one datagram from the client to addr and returns the
// reply's source and text.
func (h *harness) whoAmI(addr netip.AddrPort) (netip.AddrPort, netip.AddrPort, string, error) {
	var me, from netip.AddrPort
	var text string
	err := h.Client.Do(func() error {
		c, err := net.DialUDP("udp", nil, net.UDPAddrFromAddrPort(addr))
		if err != nil {
			return err
		}
		defer c.Close()
		me = c.LocalAddr().(*net.UDPAddr).AddrPort()
		if _, err := c.Write([]byte("who am i")); err != nil {
			return err
		}
		c.SetReadDeadline(time.Now().Add(5 * time.Second))
		buf := make([]byte, 512)
		n, src, err := c.ReadFromUDPAddrPort(buf)
		if err != nil {
			return err
		}
		from, text = src, string(buf[:n])
		return nil
	})
	return unmap(me), unmap(from), text, err
}

// lbState is what lbctl run may change in the LB namespace: rules, routes
// of every table, tc filters and tcx programs on its interfaces, rp_filter,
// and the pinned state.
func lbState(t *testing.T, h *harness) string {
	t.Helper()
	var b strings.Builder
	for _, args := range [][]string{
		{"ip", "rule"}, {"ip", "-6", "rule"},
		{"ip", "route", "show", "table", "all"}, {"ip", "-6", "route", "show", "table", "all"},
		{"tc", "filter", "show", "dev", "eth1", "ingress"}, {"tc", "filter", "show", "dev", "eth0", "egress"},
		{"bpftool", "net", "show"},
		{"sysctl", "net.ipv4.conf.all.rp_filter", "net.ipv4.conf.eth1.rp_filter", "net.ipv4.conf.eth0.rp_filter"},
	} {
		out, err := h.LB.Run(args[0], args[1:]...)
		if err != nil {
			t.Fatal(err)
		}
		fmt.Fprintf(&b, "$ %s\n", strings.Join(args, " "))
		for _, l := range strings.SplitAfter(out, "\n") {
			// Link-local addresses (and their local routes) appear when
			// the kernel's IPv6 autoconfiguration gets to them, on its own time.
			if !strings.Contains(l, "fe80:") {
				b.WriteString(l)
			}
		}
	}
	ents, _ := os.ReadDir(filepath.Join(h.LB.BPFFS, "lbctl"))
	for _, e := range ents {
		fmt.Fprintf(&b, "pinned %s\n", e.Name())
	}
	return b.String()
}

// assertNoFirewall: the LB namespace has no iptables, ip6tables or
// nftables rule at all.
func assertNoFirewall(t *testing.T, h *harness) {
	t.Helper()
	for _, cmd := range []string{"iptables-save", "ip6tables-save"} {
		out, err := h.LB.Run(cmd)
		if err != nil {
			t.Fatal(err)
		}
		for _, l := range strings.Split(out, "\n") {
			if strings.HasPrefix(l, "-A ") || strings.HasPrefix(l, "-N ") {
				t.Errorf("%s in the LB namespace has a rule: %s", cmd, l)
			}
		}
	}
	if _, err := exec.LookPath("nft"); err != nil && testenv.InCI() {
		t.Fatal("nft not found on PATH: install it with scripts/install-deps.sh — failing instead of skipping the nftables check because CI=true")
	} else if err == nil {
		out, err := h.LB.Run("nft", "list", "ruleset")
		if err != nil {
			t.Fatal(err)
		}
		if strings.TrimSpace(out) != "" {
			t.Errorf("nftables ruleset in the LB namespace is not empty:\n%s", out)
		}
	}
}

var helloRE = regexp.MustCompile(`^Hello from (dev\d)\. You connected from (\S+) to (\S+)$`)

// TestTransparent is the seed's Method 1 outcome with `mode: transparent`
// and nothing else on the LB: four requests from the client go to
// dev1..dev4, each answering "You connected from <client address>:<port>",
// IPv4 and IPv6; the same for UDP; two clients at once; 1,000 short
// connections in a row; no iptables/nftables rule anywhere on the LB; and
// stopping lbctl run puts the LB namespace back as it was.
func TestTransparent(t *testing.T) {
	h := newHarness(t, topo.Options{})
	h.startBackends(t)
	serveWhoAmI(t, h)
	// A second client behind the same router.
	if _, err := h.Client.Run("ip", "addr", "add", "198.18.99.2/24", "dev", "eth0"); err != nil {
		t.Fatal(err)
	}
	if _, err := h.Client.Run("ip", "addr", "add", "2001:db8:99::2/64", "dev", "eth0", "nodad"); err != nil {
		t.Fatal(err)
	}
	before := lbState(t, h)
	l := h.run(t, transparentConfig(4, ""))
	assertNoFirewall(t, h)
	if during := lbState(t, h); during == before || !strings.Contains(during, "fwmark 0x1062 lookup 4194") {
		t.Errorf("policy routing not visible while running:\n%s", during)
	}

	for _, fam := range []struct {
		vip, client, client2 netip.Addr
	}{{topo.VIP4, topo.Client4, netip.MustParseAddr("198.18.99.2")}, {topo.VIP6, topo.Client6, netip.MustParseAddr("2001:db8:99::2")}} {
		web := netip.AddrPortFrom(fam.vip, 80)
		seen := map[string]bool{}
		for k := range 4 {
			me, body, err := h.getFrom(netip.AddrPortFrom(fam.client, 0), web)
			if err != nil {
				t.Fatalf("GET %s #%d: %v", web, k, err)
			}
			m := helloRE.FindStringSubmatch(body)
			if m == nil || m[2] != me.String() {
				t.Errorf("GET %s #%d from %s: %q; want \"You connected from %s\"", web, k, me, body, me)
				continue
			}
			seen[m[1]] = true
		}
		if len(seen) != 4 {
			t.Errorf("%s: answered by %v, want dev1..dev4", web, seen)
		}

		who := netip.AddrPortFrom(fam.vip, 9)
		seen = map[string]bool{}
		for k := range 4 {
			me, from, text, err := h.whoAmI(who)
			if err != nil {
				t.Fatalf("UDP %s #%d: %v\n%s", who, k, err, l.out.String())
			}
			dev, saw, _ := strings.Cut(text, " ")
			if saw != me.String() || from != who {
				t.Errorf("UDP %s #%d from %s: reply %q from %s; want the client's address:port, from the listen address", who, k, me, text, from)
			}
			seen[dev] = true
		}
		if len(seen) != 4 {
			t.Errorf("%s: answered by %v, want dev1..dev4", who, seen)
		}

		// Two clients at once, one address each.
		var wg sync.WaitGroup
		for _, c := range []netip.Addr{fam.client, fam.client2} {
			wg.Add(1)
			go func() {
				defer wg.Done()
				for range 20 {
					me, body, err := h.getFrom(netip.AddrPortFrom(c, 0), web)
					if err != nil {
						t.Errorf("GET from %s: %v", c, err)
						return
					}
					if m := helloRE.FindStringSubmatch(body); m == nil || m[2] != me.String() {
						t.Errorf("GET from %s: %q", me, body)
						return
					}
				}
			}()
		}
		wg.Wait()
	}

	// 1,000 short connections in a row, every one answered from the client's address.
	web := netip.AddrPortFrom(topo.VIP4, 80)
	in(t, h.Client, func() error {
		for k := range 1000 {
			me, body, err := get(netip.AddrPortFrom(topo.Client4, 0), web)
			if err != nil {
				return fmt.Errorf("connection %d: %w", k, err)
			}
			if m := helloRE.FindStringSubmatch(body); m == nil || m[2] != me.String() {
				return fmt.Errorf("connection %d from %s: %q", k, me, body)
			}
		}
		return nil
	})
	stats, err := h.LB.Run(binary(t, "lbctl"), "--bpffs", h.LB.BPFFS, "stats")
	if err != nil || !regexp.MustCompile(`steer\s+steered\s+[1-9]`).MatchString(stats) {
		t.Errorf("steer counters: %v\n%s", err, stats)
	}
	assertNoFirewall(t, h)

	// SIGHUP down to two upstreams: the others leave steer's map, the
	// rest keeps working from the client's address.
	if !l.reload(t, transparentConfig(2, "")) {
		t.Fatalf("reload failed:\n%s", l.out.String())
	}
	seen := map[string]bool{}
	for range 4 {
		me, body, err := h.getFrom(netip.AddrPortFrom(topo.Client6, 0), netip.AddrPortFrom(topo.VIP6, 80))
		if err != nil {
			t.Fatalf("GET after reload: %v", err)
		}
		m := helloRE.FindStringSubmatch(body)
		if m == nil || m[2] != me.String() {
			t.Fatalf("GET after reload from %s: %q", me, body)
		}
		seen[m[1]] = true
	}
	if len(seen) != 2 || !seen["dev1"] || !seen["dev2"] {
		t.Errorf("after reload answered by %v, want dev1 and dev2", seen)
	}
	js, err := h.LB.Run(binary(t, "lbctl"), "--bpffs", h.LB.BPFFS, "stats", "--json")
	if err != nil {
		t.Fatal(err)
	}
	var st struct {
		SteerUpstreams []struct{ Addr string } `json:"steer_upstreams"`
	}
	if err := json.Unmarshal([]byte(js), &st); err != nil || len(st.SteerUpstreams) != 8 {
		t.Errorf("steered upstreams after reload: %v, %+v; want 8 (2 upstreams x tcp/udp x IPv4/IPv6)", err, st.SteerUpstreams)
	}

	l.stop(t)
	if after := lbState(t, h); after != before {
		t.Errorf("LB namespace after lbctl run stopped:\n%s\nwant (before):\n%s", after, before)
	}
}

// TestTransparentNoRouteBack: an upstream whose default route does not
// point at the LB never gets its SYN-ACK to the proxy; lbctl run says so
// in a doctor-style log line naming the upstream and the fix.
func TestTransparentNoRouteBack(t *testing.T) {
	h := newHarness(t, topo.Options{Backends: 1})
	h.startBackends(t)
	if _, err := h.Backends[0].Run("ip", "route", "replace", "default", "via", "198.19.16.99"); err != nil {
		t.Fatal(err)
	}
	l := h.run(t, transparentConfig(1, "    connect_timeout: 1s\n"))
	if _, body, err := h.getFrom(netip.AddrPort{}, netip.AddrPortFrom(topo.VIP4, 80)); err == nil && body != "" {
		t.Errorf("GET answered although the upstream's replies cannot come back: %q", body)
	}
	l.waitOutput(t, "upstream 198.19.16.11:80 got the connection from", 1)
	// UDP: the session times out (2s) without a reply.
	if _, _, text, err := h.whoAmI(netip.AddrPortFrom(topo.VIP4, 9)); err == nil {
		t.Errorf("UDP answered although the upstream's replies cannot come back: %q", text)
	}
	l.waitOutput(t, "upstream 198.19.16.11:9 was sent datagrams from", 1)
	out := l.out.String()
	for _, want := range []string{"default route most likely does not point at the LB", "ip route replace default via 198.19.16.1"} {
		if !strings.Contains(out, want) {
			t.Errorf("log lacks %q:\n%s", want, out)
		}
	}
	l.stop(t)
}

// TestTransparentReloadMarkTable: a SIGHUP that changes transparent.mark
// and transparent.table puts the new rule and route in, switches steer to
// the new mark, and removes exactly the old rule and route: with only the
// new rule left, replies still reach the proxy (so steer marks with the
// new mark), IPv4 and IPv6, TCP and UDP. A new table another rule uses is
// refused with a log line naming the key, and nothing changes. Stopping
// lbctl run leaves the LB as it was.
func TestTransparentReloadMarkTable(t *testing.T) {
	h := newHarness(t, topo.Options{Backends: 2})
	h.startBackends(t)
	serveWhoAmI(t, h)
	before := lbState(t, h)
	l := h.run(t, transparentConfig(2, ""))
	check := func(when string) {
		t.Helper()
		for _, fam := range []struct{ vip, client netip.Addr }{{topo.VIP4, topo.Client4}, {topo.VIP6, topo.Client6}} {
			me, body, err := h.getFrom(netip.AddrPortFrom(fam.client, 0), netip.AddrPortFrom(fam.vip, 80))
			if m := helloRE.FindStringSubmatch(body); err != nil || m == nil || m[2] != me.String() {
				t.Fatalf("%s: GET from %s: %q, %v\n%s", when, me, body, err, l.out.String())
			}
			who := netip.AddrPortFrom(fam.vip, 9)
			me, from, text, err := h.whoAmI(who)
			if _, saw, _ := strings.Cut(text, " "); err != nil || saw != me.String() || from != who {
				t.Fatalf("%s: UDP from %s: %q from %s, %v", when, me, text, from, err)
			}
		}
	}
	rules := func() string {
		v4, err4 := h.LB.Run("ip", "rule")
		v6, err6 := h.LB.Run("ip", "-6", "rule")
		if err4 != nil || err6 != nil {
			t.Fatal(err4, err6)
		}
		return v4 + v6
	}
	check("before the reload")

	for _, c := range []struct{ mark, table, oldRule string }{
		{"0x2000", "4194", "fwmark 0x1062 lookup 4194"}, // mark only
		{"0x2000", "5000", "fwmark 0x2000 lookup 4194"}, // table only
		{"0x3000", "6000", "fwmark 0x2000 lookup 5000"}, // both
	} {
		cfg := fmt.Sprintf("transparent: {mark: %s, table: %s}\n", c.mark, c.table) + transparentConfig(2, "")
		if !l.reload(t, cfg) {
			t.Fatalf("reload to mark %s table %s failed:\n%s", c.mark, c.table, l.out.String())
		}
		r := rules()
		if want := "fwmark " + c.mark + " lookup " + c.table; strings.Count(r, want) != 2 || strings.Contains(r, c.oldRule) {
			t.Errorf("after the reload to %s: want %q for IPv4 and IPv6 and no %q:\n%s", want, want, c.oldRule, r)
		}
		for _, fam := range []string{"-4", "-6"} {
			out, err := h.LB.Run("ip", fam, "route", "show", "table", "all")
			if err != nil || !strings.Contains(out, "local default dev lo table "+c.table) {
				t.Errorf("ip %s route: no local default route in table %s: %v\n%s", fam, c.table, err, out)
			}
			if n := strings.Count(out, "local default dev lo table"); n != 1 {
				t.Errorf("ip %s route: %d local default routes, want 1 (the old table's gone):\n%s", fam, n, out)
			}
		}
		check("after the reload to mark " + c.mark + " table " + c.table)
	}

	// A table some other rule uses: refused, named, nothing changes.
	if _, err := h.LB.Run("ip", "rule", "add", "fwmark", "0x7", "lookup", "7000"); err != nil {
		t.Fatal(err)
	}
	was := lbState(t, h)
	if l.reload(t, "transparent: {mark: 0x3000, table: 7000}\n"+transparentConfig(2, "")) {
		t.Fatalf("reload to a used table succeeded:\n%s", l.out.String())
	}
	if out := l.out.String(); !strings.Contains(out, "table 7000 is used by") || !strings.Contains(out, "set transparent.table to an unused table") {
		t.Errorf("refused reload: log does not name the table and the fix:\n%s", out)
	}
	if now := lbState(t, h); now != was {
		t.Errorf("a refused reload changed the LB:\n%s\nwant\n%s", now, was)
	}
	check("after the refused reload")
	if _, err := h.LB.Run("ip", "rule", "del", "fwmark", "0x7", "lookup", "7000"); err != nil {
		t.Fatal(err)
	}

	l.stop(t)
	if after := lbState(t, h); after != before {
		t.Errorf("LB namespace after lbctl run stopped:\n%s\nwant (before):\n%s", after, before)
	}
}

// TestTransparentNoCapability: `lbctl run` with a transparent service but
// neither CAP_NET_ADMIN nor CAP_NET_RAW (capsh --drop, as root otherwise)
// refuses to start with an error naming IP_TRANSPARENT, the capabilities
// and the fix, and changes nothing on the LB (no rule, route or program
// half set up).
func TestTransparentNoCapability(t *testing.T) {
	testenv.RequireCommand(t, "capsh")
	h := newHarness(t, topo.Options{Backends: 1})
	before := lbState(t, h)
	path := filepath.Join(h.dir, "lbctl.yaml")
	if err := os.WriteFile(path, []byte(transparentConfig(1, "")), 0o644); err != nil {
		t.Fatal(err)
	}
	cmd := h.LB.Command("capsh", "--drop=cap_net_admin,cap_net_raw", "--", "-c", `exec "$0" "$@"`,
		binary(t, "lbctl"), "--bpffs", h.LB.BPFFS, "run", "-c", path)
	done := make(chan struct{})
	var out []byte
	var err error
	go func() { out, err = cmd.CombinedOutput(); close(done) }()
	select {
	case <-done:
	case <-time.After(30 * time.Second):
		cmd.Process.Kill()
		<-done
		t.Fatalf("lbctl run without the capabilities still running after 30s:\n%s", out)
	}
	if err == nil {
		t.Fatalf("lbctl run without CAP_NET_ADMIN and CAP_NET_RAW exited 0:\n%s", out)
	}
	t.Logf("lbctl run without CAP_NET_ADMIN and CAP_NET_RAW:\n%s", out)
	for _, want := range []string{"set IP_TRANSPARENT", "needs CAP_NET_ADMIN or CAP_NET_RAW", "run lbctl as root", "--cap-add NET_ADMIN"} {
		if !strings.Contains(string(out), want) {
			t.Errorf("output lacks %q:\n%s", want, out)
		}
	}
	if after := lbState(t, h); after != before {
		t.Errorf("LB namespace after the refused start:\n%s\nwant (before):\n%s", after, before)
	}
}
