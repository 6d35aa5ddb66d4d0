package health

import (
	"testing"

	"golang.org/x/net/dns/dnsmessage"
)

// FuzzDNSReply feeds random bytes to the reply parser of the dns check: it
// must return (an error or nil), never panic, and never pass a reply that
// is not a NOERROR response to our ID and question.
func FuzzDNSReply(f *testing.F) {
	q := dnsmessage.Question{Name: dnsmessage.MustNewName("www.example.com."), Type: dnsmessage.TypeA, Class: dnsmessage.ClassINET}
	for _, r := range []reply{
		{id: 7, rcode: dnsmessage.RCodeSuccess, a: "198.19.16.11"},
		{id: 7, rcode: dnsmessage.RCodeNameError},
		{id: 8, rcode: dnsmessage.RCodeSuccess, a: "198.19.16.12"},
	} {
		f.Add(r.build(f, q))
	}
	f.Add([]byte{0, 7, 0x80, 0})
	m, _ := newMatcher("198.19.16.11")
	re, _ := newMatcher("/^198\\./")
	f.Fuzz(func(t *testing.T, b []byte) {
		for _, mm := range []*matcher{nil, m, re} {
			if parseReply(b, 7, q, mm) != nil {
				continue
			}
			var p dnsmessage.Parser
			h, err := p.Start(b)
			if err != nil || !h.Response || h.ID != 7 || h.RCode != dnsmessage.RCodeSuccess {
				t.Fatalf("passed a reply that is not a NOERROR response to id 7: %x", b)
			}
		}
	})
}
