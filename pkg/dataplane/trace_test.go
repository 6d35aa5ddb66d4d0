package dataplane

import (
	"encoding/binary"
	"errors"
	"net"
	"net/netip"
	"reflect"
	"strings"
	"testing"
	"time"

	"github.com/cilium/ebpf"
	"github.com/cilium/ebpf/asm"
	"github.com/cilium/ebpf/link"
	"github.com/cilium/ebpf/ringbuf"
	"golang.org/x/sys/unix"

	"github.com/lbctl/lbctl/test/testenv"
)

// TestSNATNormalObjectHasNoTracing: the object attached normally carries no
// tracing code (the "zero cost when off" of lbctl trace): no ring buffer,
// no filter, no ring buffer helper call; the tracing object has them.
func TestSNATNormalObjectHasNoTracing(t *testing.T) {
	calls := func(spec *ebpf.CollectionSpec) map[asm.BuiltinFunc]bool {
		out := map[asm.BuiltinFunc]bool{}
		for _, ins := range spec.Programs["snat_egress"].Instructions {
			if ins.IsBuiltinCall() {
				out[asm.BuiltinFunc(ins.Constant)] = true
			}
		}
		return out
	}
	normal, err := loadSnat()
	if err != nil {
		t.Fatal(err)
	}
	traced, err := loadSnatTrace()
	if err != nil {
		t.Fatal(err)
	}
	if _, ok := normal.Maps["trace_events"]; ok || calls(normal)[asm.FnRingbufOutput] || normal.Variables["trace_port"] != nil {
		t.Errorf("the normal snat object has tracing code")
	}
	if _, ok := traced.Maps["trace_events"]; !ok || !calls(traced)[asm.FnRingbufOutput] || traced.Variables["trace_port"] == nil {
		t.Errorf("the tracing snat object has no ring buffer output")
	}
	if n, tr := len(normal.Programs["snat_egress"].Instructions), len(traced.Programs["snat_egress"].Instructions); n >= tr {
		t.Errorf("normal program %d instructions, tracing %d: want fewer", n, tr)
	}
}

// readUntil reads events until want returns true for one, or the guard
// deadline passes (a hang guard, not a timing assertion).
func readUntil(t *testing.T, tr *Tracer, want func(TraceEvent) bool) (TraceEvent, bool) {
	t.Helper()
	tr.SetDeadline(time.Now().Add(10 * time.Second))
	for {
		ev, err := tr.Read()
		if err != nil {
			t.Errorf("read trace: %v", err)
			return TraceEvent{}, false
		}
		if want(ev) {
			return ev, true
		}
	}
}

// TestTraceSNAT: while a trace runs, a rewritten datagram and one no rule
// matches each produce an event saying so; a port filter keeps the other
// out; closing the trace puts the original program back in the link.
func TestTraceSNAT(t *testing.T) {
	testenv.RequireRoot(t)
	root := mountBPFFS(t)
	inNetns(t, func() {
		for _, c := range [][]string{
			{"link", "add", "v0", "type", "veth", "peer", "name", "v1"},
			{"addr", "add", "198.19.16.11/24", "dev", "v0"},
			{"link", "set", "v0", "up"}, {"link", "set", "v1", "up"},
			{"neigh", "add", "198.19.16.99", "lladdr", "02:00:00:00:00:99", "dev", "v0"},
		} {
			if !ipCmd(t, c...) {
				return
			}
		}
		d, err := Open(Options{Root: root})
		if err != nil {
			t.Errorf("open: %v", err)
			return
		}
		defer d.Close()
		if _, err := d.AttachSNAT("v0"); err != nil {
			t.Errorf("attach: %v", err)
			return
		}
		if err := d.AddSNAT(SNATRule{Src: netip.MustParsePrefix("198.19.16.11/32"), Proto: UDP, SPort: 53,
			To: netip.MustParseAddr("198.18.98.10"), ToPort: 5353}); err != nil {
			t.Errorf("add: %v", err)
			return
		}
		origID := linkProgram(t, root+"/lbctl/links/v0/snat")
		send := func(sport int) {
			c, err := net.DialUDP("udp", &net.UDPAddr{IP: net.IPv4(198, 19, 16, 11), Port: sport}, &net.UDPAddr{IP: net.IPv4(198, 19, 16, 99), Port: 40000})
			if err != nil {
				t.Errorf("dial: %v", err)
				return
			}
			defer c.Close()
			if _, err := c.Write([]byte("answer")); err != nil {
				t.Errorf("send: %v", err)
			}
		}

		tr, err := d.StartTrace(TraceFilter{})
		if err != nil {
			t.Errorf("start trace: %v", err)
			return
		}
		if got := tr.Attachments(); len(got) != 1 || got[0].Interface != "v0" {
			t.Errorf("tracing %v, want snat on v0", got)
		}
		if linkProgram(t, root+"/lbctl/links/v0/snat") == origID {
			t.Errorf("the link still runs the original program while tracing")
		}
		send(53)
		send(54)
		from := func(port uint16) func(TraceEvent) bool {
			return func(ev TraceEvent) bool {
				return ev.Src == netip.AddrPortFrom(netip.MustParseAddr("198.19.16.11"), port)
			}
		}
		if ev, ok := readUntil(t, tr, from(53)); ok {
			if ev.Program != "snat" || ev.Interface != "v0" || ev.Decision != "rewritten" || ev.Proto != UDP ||
				ev.Dst.String() != "198.19.16.99:40000" || ev.New.String() != "198.18.98.10:5353" || ev.Len == 0 {
				t.Errorf("rewritten datagram: %+v", ev)
			}
		}
		if ev, ok := readUntil(t, tr, from(54)); ok {
			if ev.Decision != "no_rule" || ev.New.IsValid() {
				t.Errorf("datagram without a rule: %+v", ev)
			}
		}
		if err := tr.Close(); err != nil {
			t.Errorf("close trace: %v", err)
		}
		if _, err := tr.Read(); !errors.Is(err, ringbuf.ErrClosed) {
			t.Errorf("read after close: %v, want ErrClosed", err)
		}
		if got := linkProgram(t, root+"/lbctl/links/v0/snat"); got != origID {
			t.Errorf("after the trace the link runs program %d, want the original %d", got, origID)
		}

		// A filter on port 54: the rewritten datagram (port 53 to 40000) is left out.
		tr, err = d.StartTrace(TraceFilter{Addr: netip.MustParseAddr("198.19.16.99"), Port: 54})
		if err != nil {
			t.Errorf("start trace: %v", err)
			return
		}
		defer tr.Close()
		send(53)
		send(54)
		ev, ok := readUntil(t, tr, func(TraceEvent) bool { return true })
		if ok && ev.Src.Port() != 54 {
			t.Errorf("filtered trace returned %+v, want only port 54", ev)
		}
	})
}

func linkProgram(t *testing.T, pin string) ebpf.ProgramID {
	t.Helper()
	l, err := link.LoadPinnedLink(pin, nil)
	if err != nil {
		t.Errorf("load link %s: %v", pin, err)
		return 0
	}
	defer l.Close()
	info, err := l.Info()
	if err != nil {
		t.Errorf("link info: %v", err)
		return 0
	}
	return info.Program
}

// TestTraceSteer: frames injected on the peer of the interface steer is
// attached to (ingress) produce steer events: a reply from a steered
// upstream, and one from an address steer does not know. steer runs with
// its socket check off, and the event says "steered", not "no_socket":
// the tracing variant was given the attached program's settings.
func TestTraceSteer(t *testing.T) {
	testenv.RequireRoot(t)
	root := mountBPFFS(t)
	inNetns(t, func() {
		for _, c := range [][]string{
			{"link", "add", "v0", "type", "veth", "peer", "name", "v1"},
			{"addr", "add", "198.19.16.1/24", "dev", "v0"},
			{"link", "set", "v0", "up"}, {"link", "set", "v1", "up"},
		} {
			if !ipCmd(t, c...) {
				return
			}
		}
		d, err := Open(Options{Root: root})
		if err != nil {
			t.Errorf("open: %v", err)
			return
		}
		defer d.Close()
		if _, err := d.AttachSteer("v0", SteerOptions{Mark: 0x1062, CheckSocket: false}); err != nil {
			t.Errorf("attach steer: %v", err)
			return
		}
		if err := d.AddSteerUpstream(UDP, backend4); err != nil {
			t.Errorf("add upstream: %v", err)
			return
		}
		v1, err := net.InterfaceByName("v1")
		if err != nil {
			t.Errorf("v1: %v", err)
			return
		}
		fd, err := unix.Socket(unix.AF_PACKET, unix.SOCK_RAW, 0)
		if err != nil {
			t.Errorf("packet socket: %v", err)
			return
		}
		defer unix.Close(fd)
		inject := func(src netip.AddrPort) {
			frame := pkt{src: src, dst: client4, proto: UDP, payload: []byte("reply")}.frame()
			if err := unix.Sendto(fd, frame, 0, &unix.SockaddrLinklayer{Ifindex: v1.Index, Halen: 6}); err != nil {
				t.Errorf("inject: %v", err)
			}
		}
		tr, err := d.StartTrace(TraceFilter{Addr: client4.Addr()})
		if err != nil {
			t.Errorf("start trace: %v", err)
			return
		}
		defer tr.Close()
		other := netip.MustParseAddrPort("198.19.16.12:53")
		inject(backend4)
		inject(other)
		if ev, ok := readUntil(t, tr, func(ev TraceEvent) bool { return ev.Src == backend4 }); ok {
			if ev.Program != "steer" || ev.Interface != "v0" || ev.Decision != "steered" || ev.Dst != client4 {
				t.Errorf("reply from a steered upstream: %+v", ev)
			}
		}
		if ev, ok := readUntil(t, tr, func(ev TraceEvent) bool { return ev.Src == other }); ok && ev.Decision != "no_rule" {
			t.Errorf("packet from an unknown upstream: %+v", ev)
		}
	})
}

// TestTraceSharesEveryMap: the tracing variants load with every map of
// the program they replace (none created anew, which would change what
// the program does while tracing).
func TestTraceSharesEveryMap(t *testing.T) {
	for _, c := range []struct {
		name   string
		traced func() (*ebpf.CollectionSpec, error)
		maps   any
	}{
		{"snat", loadSnatTrace, &snatMaps{}},
		{"steer", loadSteerTrace, &steerMaps{}},
		{"xdp_lb", loadXdpTrace, &xdpMaps{}},
	} {
		spec, err := c.traced()
		if err != nil {
			t.Fatal(err)
		}
		// A fake map per field: only the names matter here.
		v := reflect.ValueOf(c.maps).Elem()
		for i := 0; i < v.NumField(); i++ {
			v.Field(i).Set(reflect.ValueOf(&ebpf.Map{}))
		}
		got := mapsByName(c.maps, &ebpf.Map{})
		for name := range spec.Maps {
			if strings.HasPrefix(name, ".") {
				continue
			}
			if _, ok := got[name]; !ok {
				t.Errorf("%s: the tracing variant's map %s is not shared", c.name, name)
			}
		}
	}
}

// TestTraceXDP: the xdp_lb tracing variant, run on a frame to a VIP and on
// one to an address that is no VIP, reports the backend the destination
// was rewritten to and "no_rule".
func TestTraceXDP(t *testing.T) {
	e := newXDPEnv(t)
	svc := XDPService{VIP: netip.AddrPortFrom(vip4, 53), Proto: UDP}
	e.set(t, svc, []netip.AddrPort{backendN4(1), backendN4(2)}, 0)
	events, err := ebpf.NewMap(&ebpf.MapSpec{Type: ebpf.RingBuf, MaxEntries: 1 << 20})
	if err != nil {
		t.Fatal(err)
	}
	defer events.Close()
	prog, err := e.d.loadXdpTrace(e.objs.XdpLb, TraceFilter{Addr: client4.Addr()}, events)
	if err != nil {
		t.Fatalf("load xdp_lb trace: %v", err)
	}
	defer prog.Close()
	rd, err := ringbuf.NewReader(events)
	if err != nil {
		t.Fatal(err)
	}
	defer rd.Close()
	other := netip.MustParseAddrPort("198.18.98.11:53")
	for _, dst := range []netip.AddrPort{svc.VIP, other} {
		in := pkt{src: client4, dst: dst, proto: UDP, payload: []byte("query")}.frame()
		e.inNS(t, func() error {
			_, err := prog.Run(&ebpf.RunOptions{Data: in, DataOut: make([]byte, len(in)+256),
				Context: xdpMd{DataEnd: uint32(len(in)), IngressIfindex: e.ifindex}})
			return err
		})
	}
	tr := &Tracer{ifnames: map[uint32]string{}}
	want := []struct {
		dst      netip.AddrPort
		decision string
		new      netip.AddrPort
	}{{svc.VIP, "rewritten", backendN4(1)}, {other, "no_rule", netip.AddrPort{}}}
	for _, w := range want {
		rd.SetDeadline(time.Now().Add(10 * time.Second)) // hang guard
		rec, err := rd.Read()
		if err != nil {
			t.Fatalf("read event: %v", err)
		}
		var raw snatTraceTraceEvent
		if _, err := binary.Decode(rec.RawSample, binary.NativeEndian, &raw); err != nil {
			t.Fatal(err)
		}
		ev := tr.event(raw)
		if ev.Program != "xdp_lb" || ev.Src != client4 || ev.Dst != w.dst || ev.Decision != w.decision || ev.New != w.new {
			t.Errorf("event %+v, want to %s: %s %s", ev, w.dst, w.decision, w.new)
		}
	}
}
