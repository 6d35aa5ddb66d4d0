package dataplane

import (
	"testing"

	"github.com/lbctl/lbctl/test/testenv"
)

// BenchmarkSteer measures ns per packet of the steer program under
// BPF_PROG_TEST_RUN next to the empty TC program (x-empty), for a reply
// from a configured upstream (hit) and from elsewhere (miss), with the
// socket check off and on. The socket check's lookup misses here (the test
// run's namespace has no such socket), which walks the same hash chains a
// hit does.
func BenchmarkSteer(b *testing.B) {
	testenv.RequireRoot(b)
	hitPkt := pkt{src: upstream4, dst: client4, proto: TCP, payload: make([]byte, 64)}
	missPkt := hitPkt
	missPkt.src = other4
	hit, miss := hitPkt.frame(), missPkt.frame()
	empty := emptyTC(b)
	emptyNs := nsPerPacket(b, empty, hit, 1<<20)
	for _, check := range []bool{false, true} {
		sp := newSteerProg(b, check)
		sp.add(b, TCP, upstream4)
		name := map[bool]string{false: "check=off", true: "check=on"}[check]
		for _, c := range []struct {
			name  string
			frame []byte
		}{{"hit", hit}, {"miss", miss}} {
			b.Run(c.name+"/"+name, func(b *testing.B) {
				ns := nsPerPacket(b, sp.objs.SteerIngress, c.frame, b.N)
				b.ReportMetric(ns, "ns/packet")
				b.ReportMetric(ns/emptyNs, "x-empty")
			})
		}
	}
}
