package health

import (
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"math/rand/v2"
	"net/netip"
	"strings"

	"golang.org/x/net/dns/dnsmessage"
)

// qtypes maps the config's qtype names to DNS types.
var qtypes = map[string]dnsmessage.Type{
	"A": dnsmessage.TypeA, "AAAA": dnsmessage.TypeAAAA, "CNAME": dnsmessage.TypeCNAME,
	"MX": dnsmessage.TypeMX, "NS": dnsmessage.TypeNS, "PTR": dnsmessage.TypePTR,
	"SOA": dnsmessage.TypeSOA, "SRV": dnsmessage.TypeSRV, "TXT": dnsmessage.TypeTXT,
}

// typeName spells t as the config does (A, MX), not as dnsmessage does.
func typeName(t dnsmessage.Type) string {
	for n, v := range qtypes {
		if v == t {
			return n
		}
	}
	return strings.TrimPrefix(t.String(), "Type")
}

// dnsProbe asks name/qtype over UDP and passes on a reply with rcode
// NOERROR and, when m is set, an answer of that type whose value matches.
func dnsProbe(name, qtype string, m *matcher) (probe, error) {
	t, ok := qtypes[strings.ToUpper(qtype)]
	if !ok {
		return nil, fmt.Errorf("unknown query type %q (want A, AAAA, CNAME, MX, NS, PTR, SOA, SRV or TXT)", qtype)
	}
	if !strings.HasSuffix(name, ".") {
		name += "."
	}
	n, err := dnsmessage.NewName(name)
	if err != nil {
		return nil, fmt.Errorf("query %q: %w (use a DNS name such as www.example.com)", name, err)
	}
	q := dnsmessage.Question{Name: n, Type: t, Class: dnsmessage.ClassINET}
	return func(ctx context.Context, d Dialer, addr netip.AddrPort) error {
		id := uint16(rand.Uint32())
		req, err := buildQuery(id, q)
		if err != nil {
			return err
		}
		reply, err := exchange(ctx, d, addr, req, func(b []byte) bool {
			// Skip stray datagrams: only a reply to our ID counts.
			return len(b) >= 2 && binary.BigEndian.Uint16(b) == id
		})
		if err != nil {
			return err
		}
		return parseReply(reply, id, q, m)
	}, nil
}

// buildQuery builds a recursive query for q.
func buildQuery(id uint16, q dnsmessage.Question) ([]byte, error) {
	b := dnsmessage.NewBuilder(make([]byte, 0, 64), dnsmessage.Header{ID: id, RecursionDesired: true})
	if err := b.StartQuestions(); err != nil {
		return nil, fmt.Errorf("build dns query: %w", err)
	}
	if err := b.Question(q); err != nil {
		return nil, fmt.Errorf("build dns query: %w", err)
	}
	msg, err := b.Finish()
	if err != nil {
		return nil, fmt.Errorf("build dns query: %w", err)
	}
	return msg, nil
}

// parseReply checks a DNS reply to query id/q: a response with our ID and
// question, rcode NOERROR and, when m is set, an answer of q's type whose
// value matches m (a literal matches a whole value, names compared without
// case or trailing dot; a /regexp/ matches within it). It never panics on
// malformed input.
func parseReply(msg []byte, id uint16, q dnsmessage.Question, m *matcher) error {
	var p dnsmessage.Parser
	h, err := p.Start(msg)
	if err != nil {
		return fmt.Errorf("malformed dns reply: %w", err)
	}
	switch {
	case !h.Response:
		return errors.New("dns reply is a query (QR bit clear)")
	case h.ID != id:
		return fmt.Errorf("dns reply id %d, want %d", h.ID, id)
	}
	qs, err := p.AllQuestions()
	if err != nil {
		return fmt.Errorf("malformed dns reply question: %w", err)
	}
	if len(qs) != 1 || qs[0].Type != q.Type || qs[0].Class != q.Class || !strings.EqualFold(qs[0].Name.String(), q.Name.String()) {
		return fmt.Errorf("dns reply is for another question than %s %s", q.Name, typeName(q.Type))
	}
	if h.RCode != dnsmessage.RCodeSuccess {
		return fmt.Errorf("rcode %s, want NOERROR", rcodeName(h.RCode))
	}
	if m == nil {
		return nil
	}
	var got []string
	for {
		rh, err := p.AnswerHeader()
		if errors.Is(err, dnsmessage.ErrSectionDone) {
			break
		}
		if err != nil {
			return fmt.Errorf("malformed dns answer: %w", err)
		}
		if rh.Type != q.Type || rh.Class != q.Class {
			if err := p.SkipAnswer(); err != nil {
				return fmt.Errorf("malformed dns answer: %w", err)
			}
			continue
		}
		v, err := answerValue(&p, rh.Type)
		if err != nil {
			return fmt.Errorf("malformed dns answer: %w", err)
		}
		if matchValue(m, v) {
			return nil
		}
		got = append(got, v)
	}
	if len(got) == 0 {
		return fmt.Errorf("no %s answer, want one matching %s", typeName(q.Type), m)
	}
	return fmt.Errorf("%s answers %s, none matches %s", typeName(q.Type), quoteShort([]byte(strings.Join(got, " "))), m)
}

// answerValue reads the current answer's data as text: an address, a
// name, or TXT strings joined by spaces.
func answerValue(p *dnsmessage.Parser, t dnsmessage.Type) (string, error) {
	switch t {
	case dnsmessage.TypeA:
		r, err := p.AResource()
		return netip.AddrFrom4(r.A).String(), err
	case dnsmessage.TypeAAAA:
		r, err := p.AAAAResource()
		return netip.AddrFrom16(r.AAAA).String(), err
	case dnsmessage.TypeCNAME:
		r, err := p.CNAMEResource()
		return r.CNAME.String(), err
	case dnsmessage.TypeNS:
		r, err := p.NSResource()
		return r.NS.String(), err
	case dnsmessage.TypePTR:
		r, err := p.PTRResource()
		return r.PTR.String(), err
	case dnsmessage.TypeMX:
		r, err := p.MXResource()
		return r.MX.String(), err
	case dnsmessage.TypeSRV:
		r, err := p.SRVResource()
		return r.Target.String(), err
	case dnsmessage.TypeSOA:
		r, err := p.SOAResource()
		return r.NS.String(), err
	case dnsmessage.TypeTXT:
		r, err := p.TXTResource()
		return strings.Join(r.TXT, " "), err
	}
	return "", p.SkipAnswer()
}

// matchValue matches one answer value: a regexp within it, a literal
// against all of it (names without case or trailing dot).
func matchValue(m *matcher, v string) bool {
	if m.re != nil {
		return m.re.MatchString(v)
	}
	want := string(m.lit)
	if strings.EqualFold(strings.TrimSuffix(v, "."), strings.TrimSuffix(want, ".")) {
		return true
	}
	// Addresses written differently (::ffff:1.2.3.4, 2001:DB8::1).
	a, err1 := netip.ParseAddr(v)
	b, err2 := netip.ParseAddr(want)
	return err1 == nil && err2 == nil && a.Unmap() == b.Unmap()
}

// rcodeName spells an rcode as dig does.
func rcodeName(rc dnsmessage.RCode) string {
	switch rc {
	case dnsmessage.RCodeFormatError:
		return "FORMERR"
	case dnsmessage.RCodeServerFailure:
		return "SERVFAIL"
	case dnsmessage.RCodeNameError:
		return "NXDOMAIN"
	case dnsmessage.RCodeNotImplemented:
		return "NOTIMP"
	case dnsmessage.RCodeRefused:
		return "REFUSED"
	}
	return fmt.Sprintf("RCODE%d", uint16(rc))
}
