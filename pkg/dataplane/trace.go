package dataplane

// The tracing variant of snat: bpf/snat.c compiled with LBCTL_TRACE, which
// adds a ring buffer of trace events (bpf/lib/trace.h). It is loaded and
// swapped into snat's links only while lbctl trace runs.
//go:generate go tool bpf2go -cc clang-19 -target bpfel -type trace_event -type trace_decision -type trace_prog snatTrace ../../bpf/snat.c -- -mcpu=v3 -DLBCTL_TRACE -I../../bpf/lib -I/usr/include/x86_64-linux-gnu

// The tracing variant of steer, likewise.
//go:generate go tool bpf2go -cc clang-19 -target bpfel steerTrace ../../bpf/steer.c -- -DLBCTL_TRACE -I../../bpf/lib -I/usr/include/x86_64-linux-gnu

// The tracing variant of xdp_lb, likewise.
//go:generate go tool bpf2go -cc clang-19 -target bpfel xdpTrace ../../bpf/xdp_lb.c -- -DLBCTL_TRACE -I../../bpf/lib -I/usr/include/x86_64-linux-gnu

import (
	"encoding/binary"
	"errors"
	"fmt"
	"net"
	"net/netip"
	"os"
	"path/filepath"
	"reflect"
	"strings"
	"time"
	"unsafe"

	"github.com/cilium/ebpf"
	"github.com/cilium/ebpf/link"
	"github.com/cilium/ebpf/ringbuf"
)

// TraceFilter selects the packets lbctl trace reports: Addr as source or
// destination (invalid: any), Port as source or destination port (0: any).
type TraceFilter struct {
	Addr netip.Addr
	Port uint16
}

// TraceEvent is one packet one program saw, and what it decided.
type TraceEvent struct {
	Time      time.Duration  `json:"time_ns"` // kernel monotonic clock
	Program   string         `json:"program"` // snat, steer, xdp_lb
	Interface string         `json:"interface"`
	Decision  string         `json:"decision"` // rewritten, no_rule, not_parsed, error, no_socket, fib_miss, steered, dropped
	Proto     Proto          `json:"proto,omitempty"`
	Src       netip.AddrPort `json:"src"` // zero when not parsed
	Dst       netip.AddrPort `json:"dst"`
	New       netip.AddrPort `json:"new,omitempty"` // rewritten address:port (snat: source)
	Len       uint32         `json:"len"`
}

// The decision names, indexed by enum trace_decision (stable).
var traceDecisions = [...]string{
	snatTraceTraceDecisionTRACE_REWRITTEN:  "rewritten",
	snatTraceTraceDecisionTRACE_NO_RULE:    "no_rule",
	snatTraceTraceDecisionTRACE_NOT_PARSED: "not_parsed",
	snatTraceTraceDecisionTRACE_ERROR:      "error",
	snatTraceTraceDecisionTRACE_NO_SOCKET:  "no_socket",
	snatTraceTraceDecisionTRACE_FIB_MISS:   "fib_miss",
	snatTraceTraceDecisionTRACE_STEERED:    "steered",
	snatTraceTraceDecisionTRACE_DROPPED:    "dropped",
	snatTraceTraceDecisionTRACE_PASSED:     "passed",
}

var tracePrograms = [...]string{
	snatTraceTraceProgTRACE_PROG_SNAT:  "snat",
	snatTraceTraceProgTRACE_PROG_STEER: "steer",
	snatTraceTraceProgTRACE_PROG_XDP:   "xdp_lb",
}

// ErrTraceClosed is what Tracer.Read returns once the Tracer is closed
// (the same error as ringbuf.ErrClosed, so callers need not import
// cilium/ebpf).
var ErrTraceClosed = ringbuf.ErrClosed

// ErrNothingToTrace: no program lbctl can trace is attached.
var ErrNothingToTrace = errors.New("no traceable program attached (lbctl attach IFACE first)")

// swapped is one attachment running the tracing variant, and how to put
// the original back.
type swapped struct {
	att     Attachment
	link    link.Link     // tcx: the pinned link (Update back to orig)
	orig    *ebpf.Program // the program attached before the swap
	clsName string        // clsact: the cls_bpf filter
	egress  bool
}

// Tracer is a running trace: the tracing variants are attached until Close.
type Tracer struct {
	d       *Dataplane
	events  *ebpf.Map
	rd      *ringbuf.Reader
	rec     ringbuf.Record // reused by Read: no allocation per event
	progs   []*ebpf.Program
	swapped []swapped
	ifnames map[uint32]string
}

// StartTrace loads the tracing variant of every traced program (snat, steer, xdp_lb) with
// filter f and swaps it into each of the program's attachments in place
// (Link.Update: no packet misses the hook). Read returns the events; Close
// swaps the original programs back. If lbctl dies without Close, the
// tracing variant stays attached (counting and rewriting as before, plus
// the filter test): lbctl attach IFACE puts the normal program back.
func (d *Dataplane) StartTrace(f TraceFilter) (*Tracer, error) {
	atts, err := d.Attachments()
	if err != nil {
		return nil, err
	}
	events, err := ebpf.NewMap(&ebpf.MapSpec{Name: "trace_events", Type: ebpf.RingBuf, MaxEntries: 1 << 20})
	if err != nil {
		return nil, fmt.Errorf("create trace ring buffer: %w", privHint(err))
	}
	t := &Tracer{d: d, events: events, ifnames: map[uint32]string{}}
	for _, a := range atts {
		tc, ok := traceables[a.Program]
		if !ok {
			continue
		}
		if err := t.swap(a, tc, f); err != nil {
			t.Close()
			return nil, err
		}
	}
	if len(t.swapped) == 0 {
		t.Close()
		return nil, ErrNothingToTrace
	}
	if t.rd, err = ringbuf.NewReader(events); err != nil {
		t.Close()
		return nil, fmt.Errorf("read trace ring buffer: %w", err)
	}
	return t, nil
}

// Attachments lists what is being traced.
func (t *Tracer) Attachments() []Attachment {
	var out []Attachment
	for _, s := range t.swapped {
		out = append(out, s.att)
	}
	return out
}

// traceable is a program with a tracing variant.
type traceable struct {
	prog tcProg
	// load loads the tracing variant, with the runtime settings of orig
	// (the program attached now) and the filter.
	load func(d *Dataplane, orig *ebpf.Program, f TraceFilter, events *ebpf.Map) (*ebpf.Program, error)
}

var traceables = map[string]traceable{
	snatProg.name: {snatProg, func(d *Dataplane, _ *ebpf.Program, f TraceFilter, events *ebpf.Map) (*ebpf.Program, error) {
		return d.loadSnatTrace(f, events)
	}},
	steerProg.name: {steerProg, (*Dataplane).loadSteerTrace},
	"xdp_lb":       {tcProg{name: "xdp_lb"}, (*Dataplane).loadXdpTrace},
}

func (d *Dataplane) loadXdpTrace(orig *ebpf.Program, f TraceFilter, events *ebpf.Map) (*ebpf.Program, error) {
	st, err := d.xdp()
	if err != nil {
		return nil, err
	}
	spec, err := loadXdpTrace()
	if err != nil {
		return nil, fmt.Errorf("load xdp_lb trace spec: %w", err)
	}
	normal, err := loadXdp()
	if err != nil {
		return nil, fmt.Errorf("load xdp_lb spec: %w", err)
	}
	if err := copyConsts(orig, normal, spec); err != nil {
		return nil, fmt.Errorf("trace xdp_lb: %w", err)
	}
	if err := setTraceFilter(spec, f); err != nil {
		return nil, err
	}
	var progs xdpTracePrograms
	opts := &ebpf.CollectionOptions{MapReplacements: mapsByName(&st.maps, events)}
	if err := spec.LoadAndAssign(&progs, opts); err != nil {
		return nil, loadErr("load xdp_lb trace program", d.dir, err)
	}
	return progs.XdpLb, nil
}

func (d *Dataplane) loadSteerTrace(orig *ebpf.Program, f TraceFilter, events *ebpf.Map) (*ebpf.Program, error) {
	spec, err := loadSteerTrace()
	if err != nil {
		return nil, fmt.Errorf("load steer trace spec: %w", err)
	}
	normal, err := loadSteer()
	if err != nil {
		return nil, fmt.Errorf("load steer spec: %w", err)
	}
	if err := copyConsts(orig, normal, spec); err != nil {
		return nil, fmt.Errorf("trace steer: %w", err)
	}
	if err := setTraceFilter(spec, f); err != nil {
		return nil, err
	}
	var progs steerTracePrograms
	opts := &ebpf.CollectionOptions{MapReplacements: mapsByName(&d.steer, events)}
	if err := spec.LoadAndAssign(&progs, opts); err != nil {
		return nil, loadErr("load steer trace program", d.dir, err)
	}
	return progs.SteerIngress, nil
}

// mapsByName returns the maps of a bpf2go maps struct by their names, and
// events as trace_events: the tracing variant shares every map of the
// program it replaces (also maps added to the program later).
func mapsByName(maps any, events *ebpf.Map) map[string]*ebpf.Map {
	out := map[string]*ebpf.Map{"trace_events": events}
	v := reflect.ValueOf(maps).Elem()
	for i := 0; i < v.NumField(); i++ {
		if m, ok := v.Field(i).Interface().(*ebpf.Map); ok && m != nil {
			out[v.Type().Field(i).Tag.Get("ebpf")] = m
		}
	}
	return out
}

// copyConsts gives the tracing spec the runtime settings (volatile const
// globals in .rodata) orig was loaded with: read from orig's .rodata map
// at the offsets the normal spec lays them out at.
func copyConsts(orig *ebpf.Program, normal, traced *ebpf.CollectionSpec) error {
	info, err := orig.Info()
	if err != nil {
		return fmt.Errorf("program info: %w", err)
	}
	ids, _ := info.MapIDs()
	var rodata []byte
	for _, id := range ids {
		m, err := ebpf.NewMapFromID(id)
		if err != nil {
			return fmt.Errorf("open map %d: %w", id, privHint(err))
		}
		mi, err := m.Info()
		if err == nil && strings.HasSuffix(mi.Name, ".rodata") {
			rodata = make([]byte, mi.ValueSize)
			err = m.Lookup(uint32(0), &rodata)
		}
		m.Close()
		if err != nil {
			return fmt.Errorf("read the settings of the attached program: %w", err)
		}
		if rodata != nil {
			break
		}
	}
	if rodata == nil {
		return errors.New("the attached program has no .rodata: cannot copy its settings")
	}
	for name, v := range normal.Variables {
		tv, ok := traced.Variables[name]
		if !ok || v.SectionName != ".rodata" || strings.HasSuffix(name, "_btf") {
			continue
		}
		end := int(v.Offset) + len(v.Value)
		if end > len(rodata) {
			return fmt.Errorf("setting %s beyond the attached program's .rodata", name)
		}
		if err := tv.Set(rodata[v.Offset:end]); err != nil {
			return fmt.Errorf("copy setting %s: %w", name, err)
		}
	}
	return nil
}

func (d *Dataplane) loadSnatTrace(f TraceFilter, events *ebpf.Map) (*ebpf.Program, error) {
	spec, err := loadSnatTrace()
	if err != nil {
		return nil, fmt.Errorf("load snat trace spec: %w", err)
	}
	if err := setTraceFilter(spec, f); err != nil {
		return nil, err
	}
	kernelTypes, err := snatChecksumMode(spec)
	if err != nil {
		return nil, err
	}
	// Like snat, the tracing variant counts rewritten packets per rule only.
	if err := d.keepRewritten(); err != nil {
		return nil, err
	}
	var progs snatTracePrograms
	opts := &ebpf.CollectionOptions{MapReplacements: mapsByName(&d.snat, events)}
	opts.Programs.KernelTypes = kernelTypes
	if err := spec.LoadAndAssign(&progs, opts); err != nil {
		return nil, loadErr("load snat trace program", d.dir, err)
	}
	return progs.SnatEgress, nil
}

func setTraceFilter(spec *ebpf.CollectionSpec, f TraceFilter) error {
	var fam uint8
	var addr [16]byte
	if f.Addr.IsValid() {
		a := f.Addr.Unmap()
		if a.Is4() {
			fam = familyV4
			a4 := a.As4()
			copy(addr[:], a4[:])
		} else {
			fam, addr = familyV6, a.As16()
		}
	}
	for name, v := range map[string]any{"trace_family": fam, "trace_addr": addr, "trace_port": htons(f.Port)} {
		vs, ok := spec.Variables[name]
		if !ok {
			return fmt.Errorf("trace filter: the tracing object has no %s", name)
		}
		if err := vs.Set(v); err != nil {
			return fmt.Errorf("trace filter: set %s: %w", name, err)
		}
	}
	return nil
}

// swap attaches the tracing variant of tc in place of a's program.
func (t *Tracer) swap(a Attachment, tc traceable, f TraceFilter) error {
	p := tc.prog
	pin := filepath.Join(t.d.linkDir(a.Interface), p.name)
	method := a.Method
	if mode, ok := strings.CutPrefix(string(a.Method), "xdp-"); ok {
		pin = filepath.Join(t.d.linkDir(a.Interface), XDPMode(mode).pinName())
		method = MethodTCX // a bpf link too: updated in place
	}
	switch method {
	case MethodTCX:
		l, err := link.LoadPinnedLink(pin, nil)
		if err != nil {
			return fmt.Errorf("trace %s on %s: load pinned link: %w", p.name, a.Interface, privHint(err))
		}
		info, err := l.Info()
		if err != nil {
			l.Close()
			return fmt.Errorf("trace %s on %s: link info: %w", p.name, a.Interface, err)
		}
		orig, err := ebpf.NewProgramFromID(info.Program)
		if err != nil {
			l.Close()
			return fmt.Errorf("trace %s on %s: open attached program: %w", p.name, a.Interface, privHint(err))
		}
		prog, err := tc.load(t.d, orig, f, t.events)
		if err != nil {
			orig.Close()
			l.Close()
			return err
		}
		t.progs = append(t.progs, prog)
		if err := l.Update(prog); err != nil {
			orig.Close()
			l.Close()
			return fmt.Errorf("trace %s on %s: swap in the tracing program: %w", p.name, a.Interface, privHint(err))
		}
		t.swapped = append(t.swapped, swapped{att: a, link: l, orig: orig})
	case MethodClsBPF:
		if t.d.cls == nil {
			return fmt.Errorf("trace %s on %s: attached with cls_bpf but no cls_bpf attacher configured", p.name, a.Interface)
		}
		orig, err := ebpf.LoadPinnedProgram(pin+"_cls", nil)
		if err != nil {
			return fmt.Errorf("trace %s on %s: load pinned program: %w", p.name, a.Interface, privHint(err))
		}
		prog, err := tc.load(t.d, orig, f, t.events)
		if err != nil {
			orig.Close()
			return err
		}
		t.progs = append(t.progs, prog)
		if err := t.d.cls.AttachClsBPF(a.Interface, prog.FD(), p.clsName(), p.egress); err != nil {
			orig.Close()
			return fmt.Errorf("trace %s on %s: swap in the tracing program: %w", p.name, a.Interface, privHint(err))
		}
		t.swapped = append(t.swapped, swapped{att: a, orig: orig, clsName: p.clsName(), egress: p.egress})
	}
	return nil
}

// Read waits for the next event (one Read at a time: it reuses its
// buffer); it fails with os.ErrDeadlineExceeded after a deadline
// (SetDeadline) and with ErrTraceClosed after Close.
func (t *Tracer) Read() (TraceEvent, error) {
	if err := t.rd.ReadInto(&t.rec); err != nil {
		return TraceEvent{}, err
	}
	rec := &t.rec
	var raw snatTraceTraceEvent
	if len(rec.RawSample) < int(unsafe.Sizeof(raw)) {
		return TraceEvent{}, fmt.Errorf("trace event of %d bytes, want %d", len(rec.RawSample), unsafe.Sizeof(raw))
	}
	if _, err := binary.Decode(rec.RawSample, binary.NativeEndian, &raw); err != nil {
		return TraceEvent{}, fmt.Errorf("decode trace event: %w", err)
	}
	return t.event(raw), nil
}

// SetDeadline bounds the next Reads (zero: none).
func (t *Tracer) SetDeadline(at time.Time) { t.rd.SetDeadline(at) }

func (t *Tracer) event(r snatTraceTraceEvent) TraceEvent {
	ev := TraceEvent{Time: time.Duration(r.TsNs), Len: r.Len, Interface: t.ifname(r.Ifindex)}
	if int(r.Prog) < len(tracePrograms) && tracePrograms[r.Prog] != "" {
		ev.Program = tracePrograms[r.Prog]
	} else {
		ev.Program = fmt.Sprintf("program%d", r.Prog)
	}
	if int(r.Decision) < len(traceDecisions) && traceDecisions[r.Decision] != "" {
		ev.Decision = traceDecisions[r.Decision]
	} else {
		ev.Decision = fmt.Sprintf("decision%d", r.Decision)
	}
	if r.Family != familyV4 && r.Family != familyV6 {
		return ev
	}
	ev.Proto = Proto(r.Proto)
	src, dst := addrFrom16(r.Family, r.Saddr), addrFrom16(r.Family, r.Daddr)
	ev.Src = netip.AddrPortFrom(src, ntohs(r.Sport))
	ev.Dst = netip.AddrPortFrom(dst, ntohs(r.Dport))
	if r.Decision == uint8(snatTraceTraceDecisionTRACE_REWRITTEN) || r.NewPort != 0 {
		port := ntohs(r.NewPort)
		if port == 0 {
			port = ev.Src.Port()
			if r.Prog == uint8(snatTraceTraceProgTRACE_PROG_XDP) {
				port = ev.Dst.Port()
			}
		}
		ev.New = netip.AddrPortFrom(addrFrom16(r.Family, r.NewAddr), port)
	}
	return ev
}

func (t *Tracer) ifname(idx uint32) string {
	if n, ok := t.ifnames[idx]; ok {
		return n
	}
	n := fmt.Sprintf("if%d", idx)
	if ifi, err := net.InterfaceByIndex(int(idx)); err == nil {
		n = ifi.Name
	}
	t.ifnames[idx] = n
	return n
}

// Close swaps the original programs back and stops reading. It may be
// called from another goroutine than Read (Read then returns
// ErrTraceClosed).
func (t *Tracer) Close() error {
	var errs []error
	for _, s := range t.swapped {
		if s.link != nil {
			if err := s.link.Update(s.orig); err != nil {
				errs = append(errs, fmt.Errorf("restore %s on %s: %w (run lbctl attach %s)", s.att.Program, s.att.Interface, err, s.att.Interface))
			}
			s.link.Close()
		} else if err := t.d.cls.AttachClsBPF(s.att.Interface, s.orig.FD(), s.clsName, s.egress); err != nil {
			errs = append(errs, fmt.Errorf("restore %s on %s: %w (run lbctl attach %s)", s.att.Program, s.att.Interface, err, s.att.Interface))
		}
		s.orig.Close()
	}
	t.swapped = nil
	if t.rd != nil {
		if err := t.rd.Close(); err != nil && !errors.Is(err, os.ErrClosed) {
			errs = append(errs, err)
		}
	}
	for _, p := range t.progs {
		p.Close()
	}
	t.progs = nil
	if t.events != nil {
		t.events.Close()
		t.events = nil
	}
	return errors.Join(errs...)
}
