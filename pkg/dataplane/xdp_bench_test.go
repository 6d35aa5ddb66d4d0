package dataplane

import (
	"net/netip"
	"testing"

	"github.com/cilium/ebpf"
	"github.com/cilium/ebpf/asm"
)

// runXDPRepeat runs prog on frame repeat times in one BPF_PROG_TEST_RUN
// call in e's namespace (received on its loopback: Benchmark takes no
// context), and returns ns per run as the
// kernel measured it (BPF_PROG_TEST_RUN's duration stops its clock while
// the thread is rescheduled, so it holds up better than wall time on a
// loaded machine).
func (e *xdpEnv) runXDPRepeat(b *testing.B, prog *ebpf.Program, frame []byte, repeat int, want uint32) float64 {
	var ns float64
	e.inNS(b, func() error {
		ret, d, err := prog.Benchmark(frame, repeat, nil)
		ns = float64(d.Nanoseconds())
		if err == nil && ret != want {
			b.Errorf("verdict %s, want %s", xdpVerdicts[ret], xdpVerdicts[want])
		}
		return err
	})
	return ns
}

// BenchmarkXDPLB measures ns per packet of xdp_lb under BPF_PROG_TEST_RUN
// next to an empty XDP program (XDP_PASS) in the same run (metric x-empty).
//
// BPF_PROG_TEST_RUN runs every repeat on the same buffer, so after one real
// rewrite the packet would no longer be for the VIP. The hit paths
// therefore use a service whose one backend is its own VIP:port, a routed
// address with a known neighbour (198.19.16.11:53 behind lb1): each repeat
// does the service lookup, the table lookup, the rewrite with checksum
// updates (equal old and new values), the next hop and the redirect.
// Paths: UDP hit with the per-CPU next-hop cache, UDP hit with
// bpf_fib_lookup on every packet (fib_cache_jiffies = 0), TCP hit (connection
// table lookup), and misses (passed): to a service's port on another
// address (service hash lookup), and to a port no service has (stopped by
// the port array).
func BenchmarkXDPLB(b *testing.B) {
	e := newXDPEnv(b)
	self := backendN4(1)
	for _, proto := range []Proto{UDP, TCP} {
		table := make([]int, XDPTableSize)
		if _, err := e.d.SetXDPService(XDPService{VIP: self, Proto: proto}, []netip.AddrPort{self}, table); err != nil {
			b.Fatal(err)
		}
	}
	udp := pkt{src: client4, dst: self, proto: UDP, payload: make([]byte, 64)}.frame()
	tcp := pkt{src: client4, dst: self, proto: TCP, tcpFlags: tcpACK, payload: make([]byte, 64)}.frame()
	miss := pkt{src: client4, dst: backendN4(2), proto: UDP, payload: make([]byte, 64)}.frame()
	missPort := pkt{src: client4, dst: netip.AddrPortFrom(backendN4(2).Addr(), 443), proto: UDP, payload: make([]byte, 64)}.frame()

	// The same program without the next-hop cache, on the same maps.
	spec, err := loadXdp()
	if err != nil {
		b.Fatal(err)
	}
	if err := spec.Variables[xdpVarFibCacheJiffies].Set(uint64(0)); err != nil {
		b.Fatal(err)
	}
	var nocache xdpPrograms
	if err := spec.LoadAndAssign(&nocache, &ebpf.CollectionOptions{MapReplacements: map[string]*ebpf.Map{
		xdpMapXdpBackendStats: e.objs.XdpBackendStats, xdpMapXdpBackends: e.objs.XdpBackends,
		xdpMapXdpCounters: e.objs.XdpCounters, xdpMapXdpFibCache: e.objs.XdpFibCache,
		xdpMapXdpFlows: e.objs.XdpFlows, xdpMapXdpServiceStats: e.objs.XdpServiceStats,
		xdpMapXdpServices: e.objs.XdpServices, xdpMapXdpTables: e.objs.XdpTables, xdpMapXdpTxPorts: e.objs.XdpTxPorts,
		xdpMapXdpPorts: e.objs.XdpPorts,
	}}); err != nil {
		b.Fatal(err)
	}
	b.Cleanup(func() { nocache.Close() })
	empty, err := ebpf.NewProgram(&ebpf.ProgramSpec{
		Type:         ebpf.XDP,
		License:      "GPL",
		Instructions: asm.Instructions{asm.Mov.Imm(asm.R0, xdpPass), asm.Return()},
	})
	if err != nil {
		b.Fatal(err)
	}
	b.Cleanup(func() { empty.Close() })

	var emptyNs float64
	b.Run("empty", func(b *testing.B) {
		emptyNs = e.runXDPRepeat(b, empty, udp, b.N, xdpPass)
		b.ReportMetric(emptyNs, "ns/packet")
	})
	measure := func(prog *ebpf.Program, frame []byte, want uint32) func(b *testing.B) {
		return func(b *testing.B) {
			if emptyNs == 0 {
				emptyNs = e.runXDPRepeat(b, empty, udp, 1<<22, xdpPass)
			}
			ns := e.runXDPRepeat(b, prog, frame, b.N, want)
			b.ReportMetric(ns, "ns/packet")
			b.ReportMetric(ns/emptyNs, "x-empty")
		}
	}
	b.Run("udp-hit", measure(e.objs.XdpLb, udp, xdpRedirect))
	b.Run("udp-hit-no-fib-cache", measure(nocache.XdpLb, udp, xdpRedirect))
	b.Run("tcp-hit", measure(e.objs.XdpLb, tcp, xdpRedirect))
	b.Run("miss-address", measure(e.objs.XdpLb, miss, xdpPass))
	b.Run("miss-port", measure(e.objs.XdpLb, missPort, xdpPass))
}
