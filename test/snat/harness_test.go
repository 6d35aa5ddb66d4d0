package snat

import (
	"bufio"
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"net/netip"
	"os"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"go.uber.org/goleak"
	"golang.org/x/net/dns/dnsmessage"

	"github.com/lbctl/lbctl/test/testenv"
	"github.com/lbctl/lbctl/test/topo"
)

func TestMain(m *testing.M) {
	code := m.Run()
	testenv.RemoveBinaries()
	if code == 0 {
		if err := goleak.Find(); err != nil {
			fmt.Fprintf(os.Stderr, "goleak: %v\n", err)
			code = 1
		}
	}
	os.Exit(code)
}

// bin returns the path of the lbctl or backend binary (testenv.Binary).
func bin(t *testing.T, name string) string { return testenv.Binary(t, name) }

// lbctl runs the real lbctl CLI on host h with h's bpffs and returns its
// stdout; a non-zero exit fails the test with stderr.
func lbctl(t *testing.T, h *topo.Host, args ...string) string {
	t.Helper()
	cmd := h.Command(bin(t, "lbctl"), append([]string{"--bpffs", h.BPFFS}, args...)...)
	var stdout, stderr bytes.Buffer
	cmd.Stdout, cmd.Stderr = &stdout, &stderr
	if err := cmd.Run(); err != nil {
		t.Fatalf("%s: lbctl %s: %v\n%s%s", h.Role, strings.Join(args, " "), err, stdout.String(), stderr.String())
	}
	return stdout.String()
}

// snatCounters returns lbctl's snat program counters on h by name.
func snatCounters(t *testing.T, h *topo.Host) map[string]uint64 {
	t.Helper()
	var st struct {
		SNAT []struct {
			Name  string `json:"name"`
			Value uint64 `json:"value"`
		} `json:"snat"`
	}
	out := lbctl(t, h, "stats", "--json")
	if err := json.Unmarshal([]byte(out), &st); err != nil {
		t.Fatalf("%s: lbctl stats --json: %v\n%s", h.Role, err, out)
	}
	m := make(map[string]uint64, len(st.SNAT))
	for _, c := range st.SNAT {
		m[c.Name] = c.Value
	}
	return m
}

// run runs a command on h; a failure fails the test.
func run(t *testing.T, h *topo.Host, name string, args ...string) string {
	t.Helper()
	out, err := h.Run(name, args...)
	if err != nil {
		t.Fatalf("%s: %v", h.Role, err)
	}
	return out
}

// txOffload turns tx checksum offload of dev on h on or off, and back on
// when the test ends.
func txOffload(t *testing.T, h *topo.Host, dev string, on bool) {
	t.Helper()
	state := map[bool]string{true: "on", false: "off"}
	run(t, h, "ethtool", "-K", dev, "tx", state[on])
	if !on {
		t.Cleanup(func() {
			if _, err := h.Run("ethtool", "-K", dev, "tx", "on"); err != nil {
				t.Errorf("%s: %v", h.Role, err)
			}
		})
	}
}

// snmp reads the IP/UDP MIB counters of h's namespace (/proc/net/snmp and
// /proc/net/snmp6) as "IpForwDatagrams", "UdpInCsumErrors",
// "Udp6InCsumErrors", "Ip6OutForwDatagrams", ...
func snmp(t *testing.T, h *topo.Host) map[string]uint64 {
	t.Helper()
	m := map[string]uint64{}
	lines := strings.Split(run(t, h, "cat", "/proc/net/snmp"), "\n")
	for i := 0; i+1 < len(lines); i += 2 {
		names, values := strings.Fields(lines[i]), strings.Fields(lines[i+1])
		if len(names) != len(values) || len(names) == 0 || names[0] != values[0] {
			t.Fatalf("%s: /proc/net/snmp: unexpected lines %q, %q", h.Role, lines[i], lines[i+1])
		}
		proto := strings.TrimSuffix(names[0], ":")
		for j := 1; j < len(names); j++ {
			v, err := strconv.ParseInt(values[j], 10, 64)
			if err != nil {
				t.Fatalf("%s: /proc/net/snmp %s%s: %v", h.Role, proto, names[j], err)
			}
			m[proto+names[j]] = uint64(v)
		}
	}
	for _, l := range strings.Split(run(t, h, "cat", "/proc/net/snmp6"), "\n") {
		f := strings.Fields(l)
		if len(f) != 2 {
			continue
		}
		v, err := strconv.ParseUint(f[1], 10, 64)
		if err != nil {
			t.Fatalf("%s: /proc/net/snmp6 %s: %v", h.Role, f[0], err)
		}
		m[f[0]] = v
	}
	return m
}

// linkStat reads one counter of /sys/class/net/DEV/statistics on h.
func linkStat(t *testing.T, h *topo.Host, dev, name string) uint64 {
	t.Helper()
	out := run(t, h, "cat", "/sys/class/net/"+dev+"/statistics/"+name)
	v, err := strconv.ParseUint(strings.TrimSpace(out), 10, 64)
	if err != nil {
		t.Fatalf("%s: %s %s: %v", h.Role, dev, name, err)
	}
	return v
}

// startBackend runs test/backend on h with args and waits until it says it
// serves; it is stopped (SIGTERM, then SIGKILL) when the test ends.
func startBackend(t *testing.T, h *topo.Host, args ...string) {
	t.Helper()
	cmd := h.Command(bin(t, "backend"), args...)
	stderr, err := cmd.StderrPipe()
	if err != nil {
		t.Fatal(err)
	}
	if err := cmd.Start(); err != nil {
		t.Fatalf("%s: start backend: %v", h.Role, err)
	}
	ready := make(chan struct{})
	var log bytes.Buffer
	copied := make(chan struct{})
	go func() {
		defer close(copied)
		sc := bufio.NewScanner(stderr)
		seen := false
		for sc.Scan() {
			log.WriteString(sc.Text() + "\n")
			if !seen && strings.Contains(sc.Text(), "serving") {
				seen = true
				close(ready)
			}
		}
		_, _ = io.Copy(io.Discard, stderr)
	}()
	exited := make(chan error, 1)
	go func() {
		<-copied
		exited <- cmd.Wait()
	}()
	t.Cleanup(func() {
		_ = cmd.Process.Signal(syscall.SIGTERM)
		select {
		case <-exited:
		case <-time.After(5 * time.Second):
			_ = cmd.Process.Kill()
			<-exited
		}
	})
	select {
	case <-ready:
	case err := <-exited:
		exited <- err
		t.Fatalf("%s: backend %s exited before serving: %v\n%s", h.Role, strings.Join(args, " "), err, log.String())
	case <-time.After(30 * time.Second):
		t.Fatalf("%s: backend %s did not start serving", h.Role, strings.Join(args, " "))
	}
}

// listenUDP opens an unconnected UDP socket of the family of a on h, bound
// to the wildcard address and an ephemeral port.
func listenUDP(t *testing.T, h *topo.Host, a netip.Addr) *net.UDPConn {
	t.Helper()
	var c *net.UDPConn
	err := h.Do(func() error {
		var err error
		if a.Is4() {
			c, err = net.ListenUDP("udp4", &net.UDPAddr{IP: net.IPv4zero})
		} else {
			c, err = net.ListenUDP("udp6", &net.UDPAddr{IP: net.IPv6unspecified})
		}
		return err
	})
	if err != nil {
		t.Fatalf("%s: listen udp: %v", h.Role, err)
	}
	t.Cleanup(func() { c.Close() })
	return c
}

// exchange sends msg from the unconnected socket c to dst until a datagram
// that accept takes arrives (at most 5 sends, 2 s each); other datagrams are
// skipped. It returns the reply, its source and how many times msg was sent.
func exchange(c *net.UDPConn, dst netip.AddrPort, msg []byte, accept func([]byte) bool) ([]byte, netip.AddrPort, int, error) {
	buf := make([]byte, 65536)
	for sent := 1; sent <= 5; sent++ {
		if _, err := c.WriteToUDPAddrPort(msg, dst); err != nil {
			return nil, netip.AddrPort{}, sent, fmt.Errorf("send to %s: %w", dst, err)
		}
		if err := c.SetReadDeadline(time.Now().Add(2 * time.Second)); err != nil {
			return nil, netip.AddrPort{}, sent, err
		}
		for {
			n, from, err := c.ReadFromUDPAddrPort(buf)
			if errors.Is(err, os.ErrDeadlineExceeded) {
				break
			}
			if err != nil {
				return nil, netip.AddrPort{}, sent, err
			}
			if accept(buf[:n]) {
				return append([]byte(nil), buf[:n]...), netip.AddrPortFrom(from.Addr().Unmap(), from.Port()), sent, nil
			}
		}
	}
	return nil, netip.AddrPort{}, 5, fmt.Errorf("no reply from %s to 5 sends", dst)
}

// dnsQuery builds a query for www.example.com, A for IPv4 and AAAA for IPv6.
func dnsQuery(t *testing.T, id uint16, ipv6 bool) []byte {
	t.Helper()
	typ := dnsmessage.TypeA
	if ipv6 {
		typ = dnsmessage.TypeAAAA
	}
	b := dnsmessage.NewBuilder(nil, dnsmessage.Header{ID: id, RecursionDesired: true})
	if err := b.StartQuestions(); err != nil {
		t.Fatal(err)
	}
	if err := b.Question(dnsmessage.Question{Name: dnsmessage.MustNewName("www.example.com."), Type: typ, Class: dnsmessage.ClassINET}); err != nil {
		t.Fatal(err)
	}
	msg, err := b.Finish()
	if err != nil {
		t.Fatal(err)
	}
	return msg
}

// dnsAnswer returns the address in a reply to query id, or false if msg is
// not such a reply.
func dnsAnswer(msg []byte, id uint16) (netip.Addr, bool) {
	var m dnsmessage.Message
	if err := m.Unpack(msg); err != nil || !m.Header.Response || m.Header.ID != id || len(m.Answers) != 1 {
		return netip.Addr{}, false
	}
	switch r := m.Answers[0].Body.(type) {
	case *dnsmessage.AResource:
		return netip.AddrFrom4(r.A), true
	case *dnsmessage.AAAAResource:
		return netip.AddrFrom16(r.AAAA), true
	}
	return netip.Addr{}, false
}

// requireTools skips or fails (CI) unless the test's programs are present.
func requireTools(t *testing.T, extra ...string) {
	t.Helper()
	testenv.RequireRoot(t)
	testenv.RequireCommand(t, append([]string{"ip", "ethtool", "go"}, extra...)...)
}
