package dataplane

import (
	"errors"
	"sync"
	"testing"

	"github.com/cilium/ebpf"
	"github.com/cilium/ebpf/ringbuf"
)

// BenchmarkSNATTrace measures what lbctl trace costs per packet, on the
// rule-hit path of BenchmarkSNAT (one /28 rule): the normal program (what
// runs when no trace is on: the same instructions as without tracing, see
// TestSNATNormalObjectHasNoTracing), the tracing variant whose filter
// rejects the packet, and the tracing variant emitting an event for every
// packet into a ring buffer drained by a reader.
func BenchmarkSNATTrace(b *testing.B) {
	tp := newTestProg(b)
	hitPkt := pkt{src: backend4, dst: client4, proto: UDP, payload: make([]byte, 64)}
	hit := hitPkt.frame()
	tp.add(b, SNATRule{Src: net4, Proto: UDP, SPort: 53, To: backend4.Addr()})

	traced := func(b *testing.B, f TraceFilter) (*ebpf.Program, *ringbuf.Reader) {
		events, err := ebpf.NewMap(&ebpf.MapSpec{Type: ebpf.RingBuf, MaxEntries: 1 << 20})
		if err != nil {
			b.Fatal(err)
		}
		prog, err := tp.d.loadSnatTrace(f, events)
		if err != nil {
			events.Close()
			b.Fatal(err)
		}
		rd, err := ringbuf.NewReader(events)
		if err != nil {
			b.Fatal(err)
		}
		b.Cleanup(func() { rd.Close(); prog.Close(); events.Close() })
		return prog, rd
	}
	var normalNs float64
	b.Run("off", func(b *testing.B) {
		normalNs = nsPerPacket(b, tp.objs.SnatEgress, hit, b.N)
		b.ReportMetric(normalNs, "ns/packet")
	})
	report := func(b *testing.B, ns float64) {
		b.ReportMetric(ns, "ns/packet")
		if normalNs > 0 {
			b.ReportMetric(ns-normalNs, "ns-over-off")
		}
	}
	b.Run("on/filtered-out", func(b *testing.B) {
		prog, _ := traced(b, TraceFilter{Port: 9})
		report(b, nsPerPacket(b, prog, hit, b.N))
	})
	b.Run("on/event", func(b *testing.B) {
		prog, rd := traced(b, TraceFilter{})
		var wg sync.WaitGroup
		wg.Add(1)
		go func() { // drain, as lbctl trace does
			defer wg.Done()
			for {
				if _, err := rd.Read(); errors.Is(err, ringbuf.ErrClosed) {
					return
				}
			}
		}()
		ns := nsPerPacket(b, prog, hit, b.N)
		rd.Close()
		wg.Wait()
		report(b, ns)
	})
}
