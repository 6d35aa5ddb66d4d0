package main

import (
	"bufio"
	"context"
	"fmt"
	"net"
	"net/netip"
	"strings"
	"time"

	"golang.org/x/net/dns/dnsmessage"

	"github.com/lbctl/lbctl/test/topo"
)

// probeDNS sends one www.example.com query (A for IPv4, AAAA for IPv6)
// from h to server:53 and wants an answer with one address in it.
func probeDNS(h *topo.Host, server netip.Addr) error {
	qtype := dnsmessage.TypeA
	if server.Is6() {
		qtype = dnsmessage.TypeAAAA
	}
	msg := dnsmessage.Message{
		Header:    dnsmessage.Header{ID: 0x1062, RecursionDesired: true},
		Questions: []dnsmessage.Question{{Name: dnsmessage.MustNewName("www.example.com."), Type: qtype, Class: dnsmessage.ClassINET}},
	}
	q, err := msg.Pack()
	if err != nil {
		return fmt.Errorf("pack query: %w", err)
	}
	return h.Do(func() error {
		c, err := net.DialUDP("udp", nil, net.UDPAddrFromAddrPort(netip.AddrPortFrom(server, 53)))
		if err != nil {
			return fmt.Errorf("dns probe %s: %w", server, err)
		}
		defer c.Close()
		_ = c.SetDeadline(time.Now().Add(500 * time.Millisecond))
		if _, err := c.Write(q); err != nil {
			return fmt.Errorf("dns probe %s: %w", server, err)
		}
		buf := make([]byte, 1500)
		n, err := c.Read(buf)
		if err != nil {
			return fmt.Errorf("dns probe %s: %w", server, err)
		}
		var a dnsmessage.Message
		if err := a.Unpack(buf[:n]); err != nil {
			return fmt.Errorf("dns probe %s: bad answer: %w", server, err)
		}
		if a.ID != msg.ID || len(a.Answers) == 0 {
			return fmt.Errorf("dns probe %s: id %#x, %d answers, rcode %v", server, a.ID, len(a.Answers), a.RCode)
		}
		return nil
	})
}

// probeHTTP sends GET / to server:80 from h and wants a 200 with the demo
// backend's "Hello from" line; with from valid, the line must say the
// backend saw that source address ("You connected from FROM:port").
func probeHTTP(h *topo.Host, server, from netip.Addr) error {
	want := "You connected from " + from.String() + ":"
	if from.Is6() {
		want = "You connected from [" + from.String() + "]:"
	}
	return h.Do(func() error {
		c, err := net.DialTimeout("tcp", netip.AddrPortFrom(server, 80).String(), time.Second)
		if err != nil {
			return fmt.Errorf("http probe %s: %w", server, err)
		}
		defer c.Close()
		_ = c.SetDeadline(time.Now().Add(time.Second))
		if _, err := fmt.Fprintf(c, "GET / HTTP/1.0\r\nHost: bench\r\n\r\n"); err != nil {
			return fmt.Errorf("http probe %s: %w", server, err)
		}
		r := bufio.NewReader(c)
		status, err := r.ReadString('\n')
		if err != nil {
			return fmt.Errorf("http probe %s: %w", server, err)
		}
		if !strings.Contains(status, " 200 ") {
			return fmt.Errorf("http probe %s: status %q", server, strings.TrimSpace(status))
		}
		for {
			line, err := r.ReadString('\n')
			if strings.HasPrefix(line, "Hello from ") {
				if from.IsValid() && !strings.Contains(line, want) {
					return fmt.Errorf("http probe %s: the backend saw another source than %s: %q", server, from, strings.TrimSpace(line))
				}
				return nil
			}
			if err != nil {
				return fmt.Errorf("http probe %s: no \"Hello from\" line: %w", server, err)
			}
		}
	})
}

// waitDNS waits until the client gets answers from each server.
func (e *env) waitDNS(ctx context.Context, procs []*proc, servers ...netip.Addr) error {
	for _, s := range servers {
		if err := waitFor(ctx, "DNS at "+s.String(), func() error { return probeDNS(e.topo.Client, s) }, procs...); err != nil {
			return err
		}
	}
	return nil
}

// waitHTTP waits until the client gets the demo page from each server.
func (e *env) waitHTTP(ctx context.Context, procs []*proc, servers ...netip.Addr) error {
	return e.waitHTTPFrom(ctx, procs, netip.Addr{}, servers...)
}

// waitHTTPFrom is waitHTTP where the backend must also report from as
// the connection's source (transparent modes: the client's address).
func (e *env) waitHTTPFrom(ctx context.Context, procs []*proc, from netip.Addr, servers ...netip.Addr) error {
	for _, s := range servers {
		if err := waitFor(ctx, "HTTP at "+s.String(), func() error { return probeHTTP(e.topo.Client, s, from) }, procs...); err != nil {
			return err
		}
	}
	return nil
}

// backendAddrs is every backend's IPv4 or IPv6 address.
func (e *env) backendAddrs(v6 bool) []netip.Addr {
	var out []netip.Addr
	for _, b := range e.topo.Backends {
		if v6 {
			out = append(out, b.V6)
		} else {
			out = append(out, b.V4)
		}
	}
	return out
}
