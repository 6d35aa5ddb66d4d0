// Package topo builds the seed's test topology out of network namespaces:
// a client, a router, the load balancer, a switch holding the backend LAN
// bridge, and the backends. It only uses 198.18.0.0/15 and 2001:db8::/32,
// creates every link directly inside the namespaces and never touches the
// root namespace's links, addresses, routes or sysctls.
//
//	client 198.18.99.1 ── eth0 router eth1 ── eth0 LB 198.18.98.10 (VIP)
//	                         eth2 (origin NAT)       eth1 198.19.16.1
//	                          │                       │
//	           198.18.100.0/24 public LAN    sw: br0 (backend LAN 198.19.16.0/24)
//	                          │                       │
//	                  backendN eth1 ────────── backendN eth0 198.19.16.1N
//
// Namespaces are named lbt-<id>-<role> with a random id per topology. A
// topology left behind by a test process that died (panic, -timeout,
// SIGKILL) is removed by the next New (see Sweep).
package topo

import (
	"crypto/rand"
	"encoding/hex"
	"errors"
	"fmt"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"strings"
	"testing"

	"golang.org/x/sys/unix"

	"github.com/lbctl/lbctl/test/testenv"
)

// Options choose the variant of the topology.
type Options struct {
	// Backends is the number of backends, 1 to 9; 0 means 4.
	Backends int
	// OriginNAT gives every backend a public side (eth1) through the router
	// and a route to the client network over it, so replies bypass the LB.
	OriginNAT bool
	// LBForward turns forwarding on in the LB namespace (router NAT).
	LBForward bool
}

// Topology is a built set of namespaces.
type Topology struct {
	ID                         string
	Client, Router, LB, Switch *Host
	Backends                   []*Host

	all    []*Host
	closed bool
}

// Host is one network namespace of the topology.
type Host struct {
	Role   string     // client, router, lb, sw, backend1..
	NS     string     // network namespace name
	V4, V6 netip.Addr // main address (the LB's is the VIP)
	BPFFS  string     // a bpffs for this host, mounted in the root mount namespace
}

// The addresses of the topology.
var (
	VIP4    = netip.MustParseAddr("198.18.98.10")
	VIP6    = netip.MustParseAddr("2001:db8:98::10")
	Client4 = netip.MustParseAddr("198.18.99.1")
	Client6 = netip.MustParseAddr("2001:db8:99::1")
	LBUp4   = netip.MustParseAddr("198.19.16.1")
	LBUp6   = netip.MustParseAddr("2001:db8:16::1")
)

// Backend4 is backend i's address on the backend LAN (i from 1).
func Backend4(i int) netip.Addr { return netip.AddrFrom4([4]byte{198, 19, 16, byte(10 + i)}) }

// Backend6 is backend i's IPv6 address on the backend LAN (i from 1).
func Backend6(i int) netip.Addr { return netip.MustParseAddr(fmt.Sprintf("2001:db8:16::%d", 10+i)) }

// Public4 is backend i's address on the public LAN (origin NAT).
func Public4(i int) netip.Addr { return netip.AddrFrom4([4]byte{198, 18, 100, byte(10 + i)}) }

// Public6 is backend i's IPv6 address on the public LAN (origin NAT).
func Public6(i int) netip.Addr { return netip.MustParseAddr(fmt.Sprintf("2001:db8:100::%d", 10+i)) }

// Start builds a topology for a test and removes it when the test ends. It
// needs root: it skips on a laptop and fails under CI otherwise.
func Start(tb testing.TB, opts Options) *Topology {
	tb.Helper()
	testenv.RequireRoot(tb)
	t, err := New(opts)
	if err != nil {
		tb.Fatalf("build topology: %v", err)
	}
	tb.Cleanup(func() {
		if err := t.Close(); err != nil {
			tb.Errorf("remove topology: %v", err)
		}
	})
	return t
}

// New builds the topology. On error, whatever was built is removed.
func New(opts Options) (*Topology, error) {
	if opts.Backends == 0 {
		opts.Backends = 4
	}
	if opts.Backends < 1 || opts.Backends > 9 {
		return nil, fmt.Errorf("build topology: %d backends, want 1 to 9", opts.Backends)
	}
	id := make([]byte, 3)
	if _, err := rand.Read(id); err != nil {
		return nil, fmt.Errorf("build topology: random id: %w", err)
	}
	if _, err := Sweep(); err != nil {
		return nil, fmt.Errorf("build topology: remove the topologies of exited tests: %w", err)
	}
	t := &Topology{ID: hex.EncodeToString(id)}
	if err := writeOwner(t.ID); err != nil {
		return nil, fmt.Errorf("build topology %s: record its owner in %s: %w", t.ID, ownerDir, err)
	}
	if err := t.build(opts); err != nil {
		_ = t.Close()
		return nil, fmt.Errorf("build topology %s: %w", t.ID, err)
	}
	return t, nil
}

func (t *Topology) host(role string) (*Host, error) {
	h := &Host{Role: role, NS: "lbt-" + t.ID + "-" + role}
	if err := ip("netns", "add", h.NS); err != nil {
		return nil, err
	}
	t.all = append(t.all, h)
	if err := ip("-n", h.NS, "link", "set", "lo", "up"); err != nil {
		return nil, err
	}
	dir, err := os.MkdirTemp("", "lbt-"+t.ID+"-"+role+"-bpffs-")
	if err != nil {
		return nil, err
	}
	if err := unix.Mount("bpf", dir, "bpf", 0, "mode=0700"); err != nil {
		_ = os.Remove(dir)
		return nil, fmt.Errorf("mount bpffs at %s: %w", dir, err)
	}
	h.BPFFS = dir
	return h, nil
}

func (t *Topology) build(opts Options) error {
	var err error
	mk := func(role string) *Host {
		if err != nil {
			return nil
		}
		var h *Host
		h, err = t.host(role)
		return h
	}
	t.Client, t.Router, t.LB, t.Switch = mk("client"), mk("router"), mk("lb"), mk("sw")
	for i := 1; i <= opts.Backends; i++ {
		t.Backends = append(t.Backends, mk(fmt.Sprintf("backend%d", i)))
	}
	if err != nil {
		return err
	}
	t.Client.V4, t.Client.V6 = Client4, Client6
	t.Router.V4, t.Router.V6 = netip.MustParseAddr("198.18.99.254"), netip.MustParseAddr("2001:db8:99::254")
	t.LB.V4, t.LB.V6 = VIP4, VIP6

	var cmds [][]string
	veth := func(a *Host, an string, b *Host, bn string) {
		// Created inside a, its peer inside b: nothing appears in the root namespace.
		cmds = append(cmds,
			[]string{"-n", a.NS, "link", "add", an, "type", "veth", "peer", "name", bn, "netns", b.NS},
			[]string{"-n", a.NS, "link", "set", an, "up"},
			[]string{"-n", b.NS, "link", "set", bn, "up"})
	}
	addr := func(h *Host, dev string, addrs ...string) {
		for _, a := range addrs {
			args := []string{"-n", h.NS, "addr", "add", a, "dev", dev}
			if strings.Contains(a, ":") {
				args = append(args, "nodad")
			}
			cmds = append(cmds, args)
		}
	}
	route := func(h *Host, args ...string) {
		fam := "-4"
		if strings.Contains(strings.Join(args, " "), ":") {
			fam = "-6"
		}
		cmds = append(cmds, append([]string{"-n", h.NS, fam, "route", "add"}, args...))
	}

	veth(t.Client, "eth0", t.Router, "eth0")
	veth(t.LB, "eth0", t.Router, "eth1")
	addr(t.Client, "eth0", "198.18.99.1/24", "2001:db8:99::1/64")
	addr(t.Router, "eth0", "198.18.99.254/24", "2001:db8:99::254/64")
	addr(t.Router, "eth1", "198.18.98.254/24", "2001:db8:98::254/64")
	addr(t.LB, "eth0", "198.18.98.10/24", "2001:db8:98::10/64")
	cmds = append(cmds,
		[]string{"-n", t.Switch.NS, "link", "add", "br0", "type", "bridge"},
		[]string{"-n", t.Switch.NS, "link", "set", "br0", "up"})
	veth(t.LB, "eth1", t.Switch, "p0")
	cmds = append(cmds, []string{"-n", t.Switch.NS, "link", "set", "p0", "master", "br0"})
	addr(t.LB, "eth1", "198.19.16.1/24", "2001:db8:16::1/64")
	if opts.OriginNAT {
		cmds = append(cmds,
			[]string{"-n", t.Router.NS, "link", "add", "eth2", "type", "bridge"},
			[]string{"-n", t.Router.NS, "link", "set", "eth2", "up"})
		addr(t.Router, "eth2", "198.18.100.254/24", "2001:db8:100::254/64")
	}
	for i, b := range t.Backends {
		n := i + 1
		b.V4, b.V6 = Backend4(n), Backend6(n)
		p := fmt.Sprintf("p%d", n)
		veth(b, "eth0", t.Switch, p)
		cmds = append(cmds, []string{"-n", t.Switch.NS, "link", "set", p, "master", "br0"})
		addr(b, "eth0", b.V4.String()+"/24", b.V6.String()+"/64")
		route(b, "default", "via", "198.19.16.1")
		route(b, "default", "via", "2001:db8:16::1")
		if opts.OriginNAT {
			q := fmt.Sprintf("pub%d", n)
			veth(b, "eth1", t.Router, q)
			cmds = append(cmds, []string{"-n", t.Router.NS, "link", "set", q, "master", "eth2"})
			addr(b, "eth1", Public4(n).String()+"/24", Public6(n).String()+"/64")
			route(b, "198.18.99.0/24", "via", "198.18.100.254", "dev", "eth1")
			route(b, "2001:db8:99::/64", "via", "2001:db8:100::254", "dev", "eth1")
		}
	}
	route(t.Client, "default", "via", "198.18.99.254")
	route(t.Client, "default", "via", "2001:db8:99::254")
	route(t.LB, "default", "via", "198.18.98.254")
	route(t.LB, "default", "via", "2001:db8:98::254")
	route(t.Router, "198.19.16.0/24", "via", "198.18.98.10")
	route(t.Router, "2001:db8:16::/64", "via", "2001:db8:98::10")
	// Forwarding first: turning it on later would reset IPv6 neighbour state.
	fw := []*Host{t.Router}
	if opts.LBForward {
		fw = append(fw, t.LB)
	}
	for _, h := range fw {
		if _, err := h.Run("sysctl", "-qw", "net.ipv4.ip_forward=1", "net.ipv6.conf.all.forwarding=1"); err != nil {
			return err
		}
	}
	for _, c := range cmds {
		if err := ip(c...); err != nil {
			return err
		}
	}
	return nil
}

// Close deletes the namespaces and unmounts the bpffs of every host. It is
// safe to call more than once.
func (t *Topology) Close() error {
	if t.closed {
		return nil
	}
	t.closed = true
	var errs []error
	for i := len(t.all) - 1; i >= 0; i-- {
		h := t.all[i]
		if err := ip("netns", "del", h.NS); err != nil {
			errs = append(errs, err)
		}
		if h.BPFFS != "" {
			if err := unix.Unmount(h.BPFFS, unix.MNT_DETACH); err != nil {
				errs = append(errs, fmt.Errorf("unmount %s: %w", h.BPFFS, err))
			}
			if err := os.Remove(h.BPFFS); err != nil {
				errs = append(errs, err)
			}
		}
	}
	if err := os.Remove(filepath.Join(ownerDir, t.ID)); err != nil && !errors.Is(err, os.ErrNotExist) {
		errs = append(errs, err)
	}
	return errors.Join(errs...)
}

// Hosts returns every host of the topology.
func (t *Topology) Hosts() []*Host { return append([]*Host(nil), t.all...) }

// Command returns a command that runs name inside the host's namespace.
func (h *Host) Command(name string, args ...string) *exec.Cmd {
	return exec.Command("ip", append([]string{"netns", "exec", h.NS, name}, args...)...)
}

// Run runs name inside the host's namespace and returns its combined output;
// the error includes the output.
func (h *Host) Run(name string, args ...string) (string, error) {
	out, err := h.Command(name, args...).CombinedOutput()
	if err != nil {
		return string(out), fmt.Errorf("%s %s in %s: %w: %s", name, strings.Join(args, " "), h.NS, err, out)
	}
	return string(out), nil
}

// Do runs fn on an OS thread switched into the host's namespace. Sockets
// fn creates stay in that namespace. The thread is never returned to the
// scheduler: it ends with fn, so no other goroutine runs in a foreign netns.
func (h *Host) Do(fn func() error) error {
	errc := make(chan error, 1)
	go func() {
		runtime.LockOSThread() // not unlocked: the thread exits with this goroutine
		f, err := os.Open(filepath.Join("/var/run/netns", h.NS))
		if err != nil {
			errc <- fmt.Errorf("open netns %s: %w", h.NS, err)
			return
		}
		err = unix.Setns(int(f.Fd()), unix.CLONE_NEWNET)
		f.Close()
		if err != nil {
			errc <- fmt.Errorf("enter netns %s: %w", h.NS, err)
			return
		}
		errc <- fn()
	}()
	return <-errc
}

func ip(args ...string) error {
	out, err := exec.Command("ip", args...).CombinedOutput()
	if err != nil {
		return fmt.Errorf("ip %s: %w: %s", strings.Join(args, " "), err, strings.TrimSpace(string(out)))
	}
	return nil
}
