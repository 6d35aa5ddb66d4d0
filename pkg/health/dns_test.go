package health

import (
	"context"
	"errors"
	"net"
	"net/netip"
	"strings"
	"testing"

	"golang.org/x/net/dns/dnsmessage"

	"github.com/lbctl/lbctl/pkg/config"
)

// reply describes a DNS reply a test server sends.
type reply struct {
	id       uint16
	rcode    dnsmessage.RCode
	a, aaaa  string // answers, "" = none
	question *dnsmessage.Question
}

func (r reply) build(t testing.TB, q dnsmessage.Question) []byte {
	t.Helper()
	if r.question != nil {
		q = *r.question
	}
	b := dnsmessage.NewBuilder(nil, dnsmessage.Header{ID: r.id, Response: true, RCode: r.rcode})
	must := func(err error) {
		if err != nil {
			t.Fatalf("build reply: %v", err)
		}
	}
	must(b.StartQuestions())
	must(b.Question(q))
	must(b.StartAnswers())
	hdr := dnsmessage.ResourceHeader{Name: q.Name, Class: dnsmessage.ClassINET, TTL: 5}
	if r.a != "" {
		must(b.AResource(hdr, dnsmessage.AResource{A: netip.MustParseAddr(r.a).As4()}))
	}
	if r.aaaa != "" {
		must(b.AAAAResource(hdr, dnsmessage.AAAAResource{AAAA: netip.MustParseAddr(r.aaaa).As16()}))
	}
	msg, err := b.Finish()
	must(err)
	return msg
}

// dnsServer answers each query with what answer returns for it (nil: no
// reply). A query that does not parse gets none.
func dnsServer(t *testing.T, answer func(id uint16, q dnsmessage.Question) []byte) func([]byte) []byte {
	return func(req []byte) []byte {
		var p dnsmessage.Parser
		h, err := p.Start(req)
		if err != nil {
			return nil
		}
		q, err := p.Question()
		if err != nil {
			return nil
		}
		return answer(h.ID, q)
	}
}

func TestDNSCheck(t *testing.T) {
	tp := testTopo(t)
	b := tp.Backends[0]
	serve := func(port string, answer func(id uint16, q dnsmessage.Question) []byte) {
		serveUDP(t, listenPacketIn(t, b, "198.19.16.11:"+port), dnsServer(t, answer))
	}
	// A demo server: www.example.com A/AAAA, NXDOMAIN otherwise.
	serve("7301", func(id uint16, q dnsmessage.Question) []byte {
		switch {
		case !strings.EqualFold(q.Name.String(), "www.example.com."):
			return reply{id: id, rcode: dnsmessage.RCodeNameError}.build(t, q)
		case q.Type == dnsmessage.TypeA:
			return reply{id: id, a: "198.19.16.11"}.build(t, q)
		case q.Type == dnsmessage.TypeAAAA:
			return reply{id: id, aaaa: "2001:db8:16::11"}.build(t, q)
		}
		return reply{id: id}.build(t, q) // NODATA
	})
	serve("7302", func(id uint16, q dnsmessage.Question) []byte {
		return reply{id: id, rcode: dnsmessage.RCodeServerFailure}.build(t, q)
	})
	serve("7303", func(id uint16, q dnsmessage.Question) []byte { // answers another ID only
		return reply{id: id + 1, a: "198.19.16.11"}.build(t, q)
	})
	other := dnsmessage.Question{Name: dnsmessage.MustNewName("evil.example."), Type: dnsmessage.TypeA, Class: dnsmessage.ClassINET}
	serve("7304", func(id uint16, q dnsmessage.Question) []byte { // right ID, other question
		return reply{id: id, a: "198.19.16.11", question: &other}.build(t, q)
	})
	serve("7305", func(uint16, dnsmessage.Question) []byte { return nil }) // silent

	dns := func(query, qtype, expect string) config.Health {
		return config.Health{Type: "dns", Query: query, QType: qtype, Expect: expect}
	}
	for _, c := range []checkCase{
		{name: "noerror", health: dns("www.example.com", "A", ""), addr: "198.19.16.11:7301"},
		{name: "answer matches", health: dns("www.example.com", "A", "198.19.16.11"), addr: "198.19.16.11:7301"},
		{name: "answer matches regexp", health: dns("WWW.example.com.", "A", `/^198\.19\./`), addr: "198.19.16.11:7301"},
		{name: "aaaa matches", health: dns("www.example.com", "AAAA", "2001:DB8:16:0::11"), addr: "198.19.16.11:7301"},
		{name: "wrong answer", health: dns("www.example.com", "A", "198.19.16.12"), addr: "198.19.16.11:7301", wantErr: `A answers "198.19.16.11", none matches "198.19.16.12"`},
		{name: "no answer of the type", health: dns("www.example.com", "MX", "mail.example.com"), addr: "198.19.16.11:7301", wantErr: "no MX answer"},
		{name: "nxdomain", health: dns("nowhere.example.com", "A", ""), addr: "198.19.16.11:7301", wantErr: "rcode NXDOMAIN, want NOERROR"},
		{name: "servfail", health: dns("www.example.com", "A", ""), addr: "198.19.16.11:7302", wantErr: "rcode SERVFAIL"},
		{name: "reply to another id", health: dns("www.example.com", "A", ""), addr: "198.19.16.11:7303", wantErr: "no reply within timeout"},
		{name: "reply to another question", health: dns("www.example.com", "A", ""), addr: "198.19.16.11:7304", wantErr: "another question"},
		{name: "no reply", health: dns("www.example.com", "A", ""), addr: "198.19.16.11:7305", wantErr: "no reply within timeout"},
		{name: "closed port", health: dns("www.example.com", "A", ""), addr: "198.19.16.11:7306", wantErr: "connection refused"},
	} {
		t.Run(c.name, func(t *testing.T) { c.run(t, tp) })
	}
}

// TestProbeBadCheck: Probe refuses a check it cannot build without
// opening a socket (the dialer would fail the test).
func TestProbeBadCheck(t *testing.T) {
	err := Probe(t.Context(), &config.Health{Type: "dns", Query: "www.example.com", QType: "BOGUS"}, failDialer{t}, netip.MustParseAddrPort("198.19.16.11:53"))
	if err == nil || !strings.Contains(err.Error(), `unknown query type "BOGUS"`) {
		t.Fatalf("Probe: %v, want the unknown query type", err)
	}
}

type failDialer struct{ t *testing.T }

func (d failDialer) DialContext(context.Context, string, string) (net.Conn, error) {
	d.t.Fatal("Probe dialled for a check it cannot build")
	return nil, errors.New("unreachable")
}

// TestParseReply covers what a real server rarely sends.
func TestParseReply(t *testing.T) {
	q := dnsmessage.Question{Name: dnsmessage.MustNewName("www.example.com."), Type: dnsmessage.TypeA, Class: dnsmessage.ClassINET}
	ok := reply{id: 9, a: "198.19.16.11"}.build(t, q)
	query, err := buildQuery(9, q)
	if err != nil {
		t.Fatal(err)
	}
	for _, c := range []struct {
		name string
		msg  []byte
		want string
	}{
		{"empty", nil, "malformed dns reply"},
		{"truncated", ok[:len(ok)-3], "malformed dns answer"},
		{"a query", query, "QR bit clear"},
		{"another id", reply{id: 10}.build(t, q), "id 10, want 9"},
		{"refused", reply{id: 9, rcode: dnsmessage.RCodeRefused}.build(t, q), "rcode REFUSED"},
	} {
		m, _ := newMatcher("198.19.16.11")
		err := parseReply(c.msg, 9, q, m)
		if err == nil || !strings.Contains(err.Error(), c.want) {
			t.Errorf("%s: error %v, want one containing %q", c.name, err, c.want)
		}
	}
	if err := parseReply(ok, 9, q, nil); err != nil {
		t.Fatalf("a good reply: %v", err)
	}
}
