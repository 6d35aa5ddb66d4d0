package main

import (
	"bytes"
	"context"
	"fmt"
	"io"
	"net"
	"net/netip"
	"strings"
	"sync"
	"testing"
	"time"

	"go.uber.org/goleak"
	"golang.org/x/net/dns/dnsmessage"

	"github.com/lbctl/lbctl/test/testenv"
)

// TestMain runs the package in a private network namespace (see
// docs/testing.md): the servers listen on testenv.Addr4/Addr6 on its lo.
func TestMain(m *testing.M) {
	testenv.RunInNetns()
	goleak.VerifyTestMain(m)
}

var (
	own4 = netip.MustParseAddr("198.19.16.11")
	own6 = netip.MustParseAddr("2001:db8:16::11")
)

// query builds a DNS query; opt adds an EDNS OPT record.
func query(t *testing.T, id uint16, name string, typ dnsmessage.Type, opt bool) []byte {
	t.Helper()
	b := dnsmessage.NewBuilder(nil, dnsmessage.Header{ID: id, RecursionDesired: true})
	must(t, b.StartQuestions())
	must(t, b.Question(dnsmessage.Question{Name: dnsmessage.MustNewName(name), Type: typ, Class: dnsmessage.ClassINET}))
	if opt {
		must(t, b.StartAdditionals())
		var h dnsmessage.ResourceHeader
		must(t, h.SetEDNS0(4096, dnsmessage.RCodeSuccess, false))
		must(t, b.OPTResource(h, dnsmessage.OPTResource{}))
	}
	msg, err := b.Finish()
	must(t, err)
	return msg
}

func must(t *testing.T, err error) {
	t.Helper()
	if err != nil {
		t.Fatal(err)
	}
}

// reply is what the tests check of an answer.
type reply struct {
	id      uint16
	rcode   dnsmessage.RCode
	aa      bool
	answers []string // "A 198.19.16.11", "AAAA 2001:db8:16::11"
	opt     bool
	qname   string
}

func parseReply(t *testing.T, msg []byte) reply {
	t.Helper()
	var m dnsmessage.Message
	if err := m.Unpack(msg); err != nil {
		t.Fatalf("unpack reply: %v", err)
	}
	if !m.Response {
		t.Fatal("reply lacks the QR bit")
	}
	r := reply{id: m.ID, rcode: m.RCode, aa: m.Authoritative}
	if len(m.Questions) == 1 {
		r.qname = m.Questions[0].Name.String()
	}
	for _, a := range m.Answers {
		switch b := a.Body.(type) {
		case *dnsmessage.AResource:
			r.answers = append(r.answers, "A "+netip.AddrFrom4(b.A).String())
		case *dnsmessage.AAAAResource:
			r.answers = append(r.answers, "AAAA "+netip.AddrFrom16(b.AAAA).String())
		default:
			r.answers = append(r.answers, a.Header.Type.String())
		}
	}
	for _, a := range m.Additionals {
		if a.Header.Type == dnsmessage.TypeOPT {
			r.opt = true
		}
	}
	return r
}

func TestDNSAnswer(t *testing.T) {
	d := &dnsAnswerer{a: own4, aaaa: own6}
	for _, tc := range []struct {
		name  string
		query []byte
		want  reply
	}{
		{"A", query(t, 1, "www.example.com.", dnsmessage.TypeA, false),
			reply{id: 1, aa: true, answers: []string{"A 198.19.16.11"}, qname: "www.example.com."}},
		{"AAAA", query(t, 2, "www.example.com.", dnsmessage.TypeAAAA, false),
			reply{id: 2, aa: true, answers: []string{"AAAA 2001:db8:16::11"}, qname: "www.example.com."}},
		{"case kept, matched case-insensitively", query(t, 3, "WWW.Example.COM.", dnsmessage.TypeA, false),
			reply{id: 3, aa: true, answers: []string{"A 198.19.16.11"}, qname: "WWW.Example.COM."}},
		{"EDNS query gets an OPT back", query(t, 4, "www.example.com.", dnsmessage.TypeA, true),
			reply{id: 4, aa: true, answers: []string{"A 198.19.16.11"}, opt: true, qname: "www.example.com."}},
		{"other name is NXDOMAIN", query(t, 5, "example.com.", dnsmessage.TypeA, false),
			reply{id: 5, aa: true, rcode: dnsmessage.RCodeNameError, qname: "example.com."}},
		{"subdomain is NXDOMAIN", query(t, 6, "a.www.example.com.", dnsmessage.TypeAAAA, true),
			reply{id: 6, aa: true, rcode: dnsmessage.RCodeNameError, opt: true, qname: "a.www.example.com."}},
		{"other type is NODATA", query(t, 7, "www.example.com.", dnsmessage.TypeMX, false),
			reply{id: 7, aa: true, qname: "www.example.com."}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			msg, ok := d.answer(tc.query, make([]byte, 0, 512))
			if !ok {
				t.Fatal("no reply")
			}
			got := parseReply(t, msg)
			if fmt.Sprint(got) != fmt.Sprint(tc.want) {
				t.Errorf("reply\n got %+v\nwant %+v", got, tc.want)
			}
		})
	}
}

func TestDNSAnswerWithoutAddresses(t *testing.T) {
	d := &dnsAnswerer{a: own4} // no --aaaa
	msg, ok := d.answer(query(t, 9, "www.example.com.", dnsmessage.TypeAAAA, false), nil)
	if !ok {
		t.Fatal("no reply")
	}
	if got := parseReply(t, msg); got.rcode != dnsmessage.RCodeSuccess || len(got.answers) != 0 {
		t.Errorf("AAAA without --aaaa: got %+v, want NOERROR and no answer", got)
	}
}

func TestDNSAnswerMalformed(t *testing.T) {
	d := &dnsAnswerer{a: own4, aaaa: own6}
	resp, _ := d.answer(query(t, 1, "www.example.com.", dnsmessage.TypeA, false), nil)
	for _, tc := range []struct {
		name  string
		query []byte
		reply bool
		rcode dnsmessage.RCode
	}{
		{"empty", nil, false, 0},
		{"short header", []byte{1, 2, 3}, false, 0},
		{"a response", resp, false, 0},
		{"header but no question", []byte{0, 7, 1, 0, 0, 1, 0, 0, 0, 0, 0, 0}, true, dnsmessage.RCodeFormatError},
		{"opcode UPDATE", []byte{0, 8, 5 << 3, 0, 0, 0, 0, 0, 0, 0, 0, 0}, true, dnsmessage.RCodeNotImplemented},
	} {
		t.Run(tc.name, func(t *testing.T) {
			msg, ok := d.answer(tc.query, nil)
			if ok != tc.reply {
				t.Fatalf("reply sent = %v, want %v", ok, tc.reply)
			}
			if !ok {
				return
			}
			var h dnsmessage.Parser
			hdr, err := h.Start(msg)
			must(t, err)
			if !hdr.Response || hdr.RCode != tc.rcode || hdr.ID != uint16(tc.query[0])<<8|uint16(tc.query[1]) {
				t.Errorf("header %+v, want a response with id %d rcode %v", hdr, uint16(tc.query[1]), tc.rcode)
			}
		})
	}
}

func TestParseArgs(t *testing.T) {
	for _, tc := range []struct {
		args    string
		wantErr string
		wantA   string
		wantAAA string
	}{
		{args: "--http 127.0.0.1:80", wantErr: "--name is required"},
		{args: "--name d", wantErr: "nothing to serve"},
		{args: "--name d --dns 127.0.0.1", wantErr: `want ADDR:PORT ([ADDR]:PORT for IPv6), got "127.0.0.1"`},
		{args: "--name d --dns 127.0.0.1:53 extra", wantErr: `unexpected argument "extra"`},
		{args: "--name d --dns 127.0.0.1:53 --a ::1", wantErr: "--a wants an IPv4 address"},
		{args: "--name d --dns 127.0.0.1:53 --aaaa 10.0.0.1", wantErr: "--aaaa wants an IPv6 address"},
		{args: "--name d --dns 127.0.0.1:53 --readers 0", wantErr: "--readers must be at least 1"},
		{args: "--name d --dns 0.0.0.0:53 --dns 198.19.16.11:53 --dns [2001:db8:16::11]:53", wantA: "198.19.16.11", wantAAA: "2001:db8:16::11"},
		{args: "--name d --dns 198.19.16.11:53 --a 198.19.16.99", wantA: "198.19.16.99", wantAAA: ""},
	} {
		t.Run(tc.args, func(t *testing.T) {
			c, err := parseArgs(strings.Fields(tc.args), io.Discard)
			if tc.wantErr != "" {
				if err == nil || !strings.Contains(err.Error(), tc.wantErr) {
					t.Fatalf("error %v, want one containing %q", err, tc.wantErr)
				}
				return
			}
			must(t, err)
			if c.a.String() != tc.wantA || c.aaaa.String() != tc.wantAAA {
				t.Errorf("a=%q aaaa=%q, want %q %q", c.a.String(), c.aaaa.String(), tc.wantA, tc.wantAAA)
			}
		})
	}
}

// freePort returns a port that is free for TCP and UDP on both test
// addresses just now.
func freePort(t *testing.T) uint16 {
	t.Helper()
	testenv.RequireNetns(t)
	lo4, lo6 := testenv.Addr4.String(), "["+testenv.Addr6.String()+"]"
	for i := 0; i < 50; i++ {
		l, err := net.Listen("tcp6", lo6+":0")
		must(t, err)
		port := l.Addr().(*net.TCPAddr).Port
		closers := []io.Closer{l}
		ok := true
		for _, try := range []struct{ network, addr string }{
			{"tcp4", lo4}, {"udp4", lo4}, {"udp6", lo6},
		} {
			var c io.Closer
			if try.network[:3] == "tcp" {
				c, err = net.Listen(try.network, fmt.Sprintf("%s:%d", try.addr, port))
			} else {
				c, err = net.ListenPacket(try.network, fmt.Sprintf("%s:%d", try.addr, port))
			}
			if err != nil {
				ok = false
				break
			}
			closers = append(closers, c)
		}
		for _, c := range closers {
			c.Close()
		}
		if ok {
			return uint16(port)
		}
	}
	t.Fatal("no port free on both test addresses")
	return 0
}

// startBackend runs the program's run with args until the test ends and
// checks it then exits with status 0.
func startBackend(t *testing.T, args ...string) {
	t.Helper()
	ctx, cancel := context.WithCancel(context.Background())
	var logs testenv.SyncBuffer
	done := make(chan int)
	go func() { done <- run(ctx, args, &logs) }()
	t.Cleanup(func() {
		cancel()
		select {
		case code := <-done:
			if code != 0 {
				t.Errorf("backend exit status %d, want 0; log:\n%s", code, logs.String())
			}
		case <-time.After(5 * time.Second):
			t.Error("backend did not stop within 5s")
		}
	})
}

// retry calls fn until it succeeds or 3 s pass (the server starts in the
// background).
func retry(t *testing.T, fn func() error) {
	t.Helper()
	deadline := time.Now().Add(3 * time.Second)
	for {
		err := fn()
		if err == nil {
			return
		}
		if time.Now().After(deadline) {
			t.Fatal(err)
		}
		time.Sleep(20 * time.Millisecond)
	}
}

func TestServeLoopback(t *testing.T) {
	port, echoPort := freePort(t), freePort(t)
	lo4, lo6 := testenv.Addr4, testenv.Addr6
	v4, v6 := netip.AddrPortFrom(lo4, port), netip.AddrPortFrom(lo6, port)
	startBackend(t, "--name", "dev1", "--readers", "3",
		"--http", v4.String(), "--http", v6.String(),
		"--dns", v4.String(), "--dns", v6.String(),
		"--a", "198.19.16.11", "--aaaa", "2001:db8:16::11",
		"--udp-echo", netip.AddrPortFrom(lo4, echoPort).String(),
		"--udp-echo", netip.AddrPortFrom(lo6, echoPort).String())

	for _, ap := range []netip.AddrPort{v4, v6} {
		t.Run("http "+ap.String(), func(t *testing.T) {
			retry(t, func() error { return checkHello(ap) })
		})
	}
	for _, ap := range []netip.AddrPort{v4, v6} {
		t.Run("dns "+ap.String(), func(t *testing.T) {
			retry(t, func() error { _, err := exchange(ap, query(t, 1, demoName, dnsmessage.TypeA, false)); return err })
			// Many clients at once, each on its own socket, all answered.
			var wg sync.WaitGroup
			errs := make(chan error, 32)
			for c := 0; c < 32; c++ {
				wg.Add(1)
				go func() {
					defer wg.Done()
					for i := 0; i < 20; i++ {
						typ, want := dnsmessage.TypeA, "A 198.19.16.11"
						if i%2 == 1 {
							typ, want = dnsmessage.TypeAAAA, "AAAA 2001:db8:16::11"
						}
						id := uint16(c*100 + i)
						msg, err := exchange(ap, query(t, id, demoName, typ, false))
						if err != nil {
							errs <- err
							return
						}
						got := parseReply(t, msg)
						if got.id != id || len(got.answers) != 1 || got.answers[0] != want {
							errs <- fmt.Errorf("query %d: got %+v, want id %d and %s", id, got, id, want)
							return
						}
					}
				}()
			}
			wg.Wait()
			close(errs)
			for err := range errs {
				t.Error(err)
			}
		})
	}
	for _, a := range []netip.Addr{lo4, lo6} {
		ap := netip.AddrPortFrom(a, echoPort)
		t.Run("echo "+ap.String(), func(t *testing.T) {
			msg := []byte("not a dns message")
			var got []byte
			retry(t, func() error { var err error; got, err = exchange(ap, msg); return err })
			if !bytes.Equal(got, msg) {
				t.Errorf("echo: got %q, want %q", got, msg)
			}
		})
	}
}

// checkHello sends one HTTP request over a fresh connection to ap and
// compares the body with the line the connection's addresses predict.
func checkHello(ap netip.AddrPort) error {
	c, err := net.DialTimeout("tcp", ap.String(), time.Second)
	if err != nil {
		return err
	}
	defer c.Close()
	_ = c.SetDeadline(time.Now().Add(2 * time.Second))
	if _, err := io.WriteString(c, "GET / HTTP/1.1\r\nHost: demo\r\nConnection: close\r\n\r\n"); err != nil {
		return err
	}
	resp, err := io.ReadAll(c)
	if err != nil {
		return err
	}
	want := fmt.Sprintf("Hello from dev1. You connected from %s to %s\n", c.LocalAddr(), c.RemoteAddr())
	if !strings.HasPrefix(string(resp), "HTTP/1.1 200 OK\r\n") || !strings.HasSuffix(string(resp), "\r\n\r\n"+want) {
		return fmt.Errorf("response\n%q\nwant 200 with body %q", resp, want)
	}
	return nil
}

// exchange sends msg to ap from a fresh socket and returns the reply.
func exchange(ap netip.AddrPort, msg []byte) ([]byte, error) {
	c, err := net.Dial("udp", ap.String())
	if err != nil {
		return nil, err
	}
	defer c.Close()
	_ = c.SetDeadline(time.Now().Add(time.Second))
	if _, err := c.Write(msg); err != nil {
		return nil, err
	}
	buf := make([]byte, 2048)
	n, err := c.Read(buf)
	if err != nil {
		return nil, fmt.Errorf("read reply from %s: %w", ap, err)
	}
	return buf[:n], nil
}

func TestListenFailure(t *testing.T) {
	testenv.RequireNetns(t)
	l, err := net.Listen("tcp4", testenv.Addr4.String()+":0")
	must(t, err)
	defer l.Close()
	var logs testenv.SyncBuffer
	code := run(context.Background(), []string{"--name", "d", "--http", l.Addr().String()}, &logs)
	if code != 1 || !strings.Contains(logs.String(), "listen http on "+l.Addr().String()) {
		t.Errorf("exit %d, log %q; want 1 and the listen error", code, logs.String())
	}
}
