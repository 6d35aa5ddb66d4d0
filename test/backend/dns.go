package main

import (
	"net/netip"
	"strings"

	"golang.org/x/net/dns/dnsmessage"
)

// demoName is the one name the demo DNS server knows.
const demoName = "www.example.com."

// ednsSize is the UDP payload size advertised in replies to EDNS queries.
const ednsSize = 1232

// dnsAnswerer answers www.example.com A/AAAA with the backend's own
// addresses. An invalid a or aaaa gives an empty NOERROR answer (NODATA).
type dnsAnswerer struct {
	a, aaaa netip.Addr
}

// answer builds the reply to query in out's backing array. Malformed
// queries and responses get no reply; queries whose header parses but whose
// question does not get FORMERR; opcodes other than QUERY get NOTIMP.
func (d *dnsAnswerer) answer(query, out []byte) ([]byte, bool) {
	var p dnsmessage.Parser
	qh, err := p.Start(query)
	if err != nil || qh.Response {
		return nil, false
	}
	rh := dnsmessage.Header{
		ID:               qh.ID,
		Response:         true,
		OpCode:           qh.OpCode,
		Authoritative:    true,
		RecursionDesired: qh.RecursionDesired,
	}
	if qh.OpCode != 0 {
		rh.RCode = dnsmessage.RCodeNotImplemented
		return headerOnly(rh, out)
	}
	q, err := p.Question()
	if err != nil {
		rh.RCode = dnsmessage.RCodeFormatError
		return headerOnly(rh, out)
	}
	edns := hasOPT(&p)

	known := strings.EqualFold(q.Name.String(), demoName)
	if !known {
		rh.RCode = dnsmessage.RCodeNameError
	}
	b := dnsmessage.NewBuilder(out[:0], rh)
	b.EnableCompression()
	if err := b.StartQuestions(); err != nil {
		return nil, false
	}
	if err := b.Question(q); err != nil {
		return nil, false
	}
	if err := b.StartAnswers(); err != nil {
		return nil, false
	}
	if known && q.Class == dnsmessage.ClassINET {
		hdr := dnsmessage.ResourceHeader{Name: q.Name, Class: dnsmessage.ClassINET, TTL: 5}
		switch {
		case q.Type == dnsmessage.TypeA && d.a.IsValid():
			if err := b.AResource(hdr, dnsmessage.AResource{A: d.a.As4()}); err != nil {
				return nil, false
			}
		case q.Type == dnsmessage.TypeAAAA && d.aaaa.IsValid():
			if err := b.AAAAResource(hdr, dnsmessage.AAAAResource{AAAA: d.aaaa.As16()}); err != nil {
				return nil, false
			}
		}
	}
	if edns {
		if err := b.StartAdditionals(); err != nil {
			return nil, false
		}
		var opt dnsmessage.ResourceHeader
		if err := opt.SetEDNS0(ednsSize, dnsmessage.RCodeSuccess, false); err != nil {
			return nil, false
		}
		if err := b.OPTResource(opt, dnsmessage.OPTResource{}); err != nil {
			return nil, false
		}
	}
	reply, err := b.Finish()
	if err != nil {
		return nil, false
	}
	return reply, true
}

// hasOPT reports whether the rest of the message, after the first
// question, carries an EDNS OPT record.
func hasOPT(p *dnsmessage.Parser) bool {
	if p.SkipAllQuestions() != nil || p.SkipAllAnswers() != nil || p.SkipAllAuthorities() != nil {
		return false
	}
	for {
		h, err := p.AdditionalHeader()
		if err != nil {
			return false
		}
		if h.Type == dnsmessage.TypeOPT {
			return true
		}
		if p.SkipAdditional() != nil {
			return false
		}
	}
}

func headerOnly(h dnsmessage.Header, out []byte) ([]byte, bool) {
	b := dnsmessage.NewBuilder(out[:0], h)
	reply, err := b.Finish()
	if err != nil {
		return nil, false
	}
	return reply, true
}
