package dataplane

// The steer object; Go types come from the C structs in bpf/lib/maps.h.
// `make generate` reruns this and CI diffs the result.
//go:generate go tool bpf2go -cc clang-19 -target bpfel -type steer_key -type steer_value -type steer_counter steer ../../bpf/steer.c -- -I../../bpf/lib -I/usr/include/x86_64-linux-gnu

import (
	"errors"
	"fmt"
	"net/netip"
	"sort"

	"github.com/cilium/ebpf"
)

// MaxSteerUpstreams is MAX_STEER_UPSTREAMS in bpf/lib/maps.h.
const MaxSteerUpstreams = 4096

// DefaultSteerMark is the mark steer sets when SteerOptions.Mark is 0
// (config.DefaultMark; this package imports no other of ours).
const DefaultSteerMark = 0x1062

var steerProg = tcProg{name: "steer", egress: false}

// ErrUpstreamExists: AddSteerUpstream of an upstream already in the map.
var ErrUpstreamExists = errors.New("upstream already steered")

// SteerOptions are the load-time settings of the steer program.
type SteerOptions struct {
	// Mark is the fwmark given to return traffic (the policy rule's
	// fwmark). 0 means DefaultSteerMark.
	Mark uint32
	// CheckSocket makes the program look up the local socket of every
	// steered packet and count those with none (SteerNoSocket).
	CheckSocket bool
}

// SteerUpstream is one upstream whose replies steer marks, with the
// number of packets marked so far.
type SteerUpstream struct {
	Proto   Proto          `json:"proto"`
	Addr    netip.AddrPort `json:"addr"`
	Packets uint64         `json:"packets"`
}

func steerKey(proto Proto, ap netip.AddrPort) (steerSteerKey, error) {
	a := ap.Addr()
	if !a.IsValid() || ap.Port() == 0 {
		return steerSteerKey{}, fmt.Errorf("upstream %s: want an address and a non-zero port", ap)
	}
	if proto != TCP && proto != UDP {
		return steerSteerKey{}, fmt.Errorf("upstream %s: protocol %s: want udp or tcp", ap, proto)
	}
	a = a.Unmap().WithZone("")
	k := steerSteerKey{Proto: uint8(proto), Port: htons(ap.Port()), Family: familyV6}
	if a.Is4() {
		k.Family = familyV4
		b := a.As4()
		copy(k.Addr[:], b[:])
	} else {
		k.Addr = a.As16()
	}
	return k, nil
}

func upstreamFromKey(k steerSteerKey) (Proto, netip.AddrPort) {
	var a netip.Addr
	if k.Family == familyV4 {
		a = netip.AddrFrom4([4]byte(k.Addr[:4]))
	} else {
		a = netip.AddrFrom16(k.Addr)
	}
	return Proto(k.Proto), netip.AddrPortFrom(a, ntohs(k.Port))
}

// steerSpec returns the steer collection spec with its maps pinned by name.
func (d *Dataplane) steerSpec() (*ebpf.CollectionSpec, error) {
	spec, err := loadSteer()
	if err != nil {
		return nil, fmt.Errorf("load steer spec: %w", err)
	}
	pinMaps(spec)
	return spec, nil
}

// AttachSteer attaches the steer program at ifname's TC ingress (tcx, or
// clsact + cls_bpf as configured in Options) and pins it. Attaching again
// replaces the program in place (e.g. with another mark).
func (d *Dataplane) AttachSteer(ifname string, opts SteerOptions) (Method, error) {
	if _, err := lookupInterface(ifname); err != nil {
		return "", fmt.Errorf("attach steer to %s: %w", ifname, err)
	}
	if opts.Mark == 0 {
		opts.Mark = DefaultSteerMark
	}
	spec, err := d.steerSpec()
	if err != nil {
		return "", err
	}
	check := uint8(0)
	if opts.CheckSocket {
		check = 1
	}
	if err := spec.Variables["steer_mark"].Set(opts.Mark); err != nil {
		return "", fmt.Errorf("attach steer to %s: set mark: %w", ifname, err)
	}
	if err := spec.Variables["steer_check_socket"].Set(check); err != nil {
		return "", fmt.Errorf("attach steer to %s: set socket check: %w", ifname, err)
	}
	var progs steerPrograms
	copts := d.collectionOptions()
	copts.MapReplacements = map[string]*ebpf.Map{
		steerMapSteerUpstreams: d.steer.SteerUpstreams,
		steerMapSteerCounters:  d.steer.SteerCounters,
		steerMapSteerFrags:     d.steer.SteerFrags,
	}
	if err := spec.LoadAndAssign(&progs, copts); err != nil {
		return "", loadErr("load steer program", d.dir, err)
	}
	defer progs.Close()
	return d.attachTC(ifname, steerProg, progs.SteerIngress)
}

// DetachSteer removes the steer program from ifname and nothing else
// (the snat program there stays). With the last program of the last
// interface the pinned maps go too, as with Detach.
func (d *Dataplane) DetachSteer(ifname string) ([]Attachment, error) {
	return d.detachProgs(ifname, []tcProg{steerProg}, false)
}

// AddSteerUpstream makes steer mark the packets coming from ap with
// protocol proto (the replies of a transparent service's upstream).
func (d *Dataplane) AddSteerUpstream(proto Proto, ap netip.AddrPort) error {
	k, err := steerKey(proto, ap)
	if err != nil {
		return fmt.Errorf("add steered upstream: %w", err)
	}
	ncpu, err := ebpf.PossibleCPU()
	if err != nil {
		return fmt.Errorf("add steered upstream %s %s: %w", proto, ap, err)
	}
	if err := d.steer.SteerUpstreams.Update(&k, make([]steerSteerValue, ncpu), ebpf.UpdateNoExist); err != nil {
		if errors.Is(err, ebpf.ErrKeyExist) {
			return fmt.Errorf("add steered upstream %s %s: %w", proto, ap, ErrUpstreamExists)
		}
		return fmt.Errorf("add steered upstream %s %s: %w", proto, ap, privHint(err))
	}
	return nil
}

// DelSteerUpstream stops steering ap's replies (ErrRuleNotFound if it
// was not steered).
func (d *Dataplane) DelSteerUpstream(proto Proto, ap netip.AddrPort) error {
	k, err := steerKey(proto, ap)
	if err != nil {
		return fmt.Errorf("delete steered upstream: %w", err)
	}
	if err := d.steer.SteerUpstreams.Delete(&k); err != nil {
		if errors.Is(err, ebpf.ErrKeyNotExist) {
			return fmt.Errorf("delete steered upstream %s %s: %w", proto, ap, ErrRuleNotFound)
		}
		return fmt.Errorf("delete steered upstream %s %s: %w", proto, ap, privHint(err))
	}
	return nil
}

// SteerUpstreams lists the steered upstreams, ordered by address, port
// and protocol, with the packets marked for each.
func (d *Dataplane) SteerUpstreams() ([]SteerUpstream, error) {
	var (
		out []SteerUpstream
		k   steerSteerKey
		v   []steerSteerValue
	)
	it := d.steer.SteerUpstreams.Iterate()
	for it.Next(&k, &v) {
		proto, ap := upstreamFromKey(k)
		out = append(out, SteerUpstream{Proto: proto, Addr: ap, Packets: sumPackets(v)})
	}
	if err := it.Err(); err != nil {
		return nil, fmt.Errorf("list steered upstreams: %w", privHint(err))
	}
	sort.Slice(out, func(i, j int) bool {
		if c := out[i].Addr.Compare(out[j].Addr); c != 0 {
			return c < 0
		}
		return out[i].Proto < out[j].Proto
	})
	return out, nil
}

// SteerCounter names a slot of the steer program's counter array. The
// values mirror enum steer_counter in bpf/lib/maps.h and never change.
type SteerCounter uint32

const (
	SteerSeen        = SteerCounter(steerSteerCounterSTEER_SEEN)
	SteerSteered     = SteerCounter(steerSteerCounterSTEER_STEERED)
	SteerNotMatched  = SteerCounter(steerSteerCounterSTEER_NOT_MATCHED)
	SteerNotParsed   = SteerCounter(steerSteerCounterSTEER_NOT_PARSED)
	SteerNoSocket    = SteerCounter(steerSteerCounterSTEER_NO_SOCKET)
	SteerFragments   = SteerCounter(steerSteerCounterSTEER_FRAGMENTS)
	numSteerCounters = int(steerSteerCounterSTEER_COUNTER_MAX)
)

var steerCounterNames = [...]string{
	SteerSeen:       "seen",
	SteerSteered:    "steered",
	SteerNotMatched: "not_matched",
	SteerNotParsed:  "not_parsed",
	SteerNoSocket:   "no_socket",
	SteerFragments:  "fragments",
}

func (c SteerCounter) String() string {
	if int(c) < len(steerCounterNames) {
		return steerCounterNames[c]
	}
	return fmt.Sprintf("counter%d", uint32(c))
}

// SteerCounters reads the steer program's counters (summed over CPUs), in
// enum order.
func (d *Dataplane) SteerCounters() ([]Counter, error) {
	var out []Counter
	for i := 0; i < numSteerCounters; i++ {
		var per []uint64
		if err := d.steer.SteerCounters.Lookup(uint32(i), &per); err != nil {
			return nil, fmt.Errorf("read steer counter %s: %w", SteerCounter(i), privHint(err))
		}
		var sum uint64
		for _, v := range per {
			sum += v
		}
		out = append(out, Counter{Name: SteerCounter(i).String(), Value: sum})
	}
	return out, nil
}

// SteerUpstreamPackets returns the packets steer marked from upstream ap
// of protocol proto, and whether ap is steered at all.
func (d *Dataplane) SteerUpstreamPackets(proto Proto, ap netip.AddrPort) (uint64, bool, error) {
	k, err := steerKey(proto, ap)
	if err != nil {
		return 0, false, err
	}
	var v []steerSteerValue
	if err := d.steer.SteerUpstreams.Lookup(&k, &v); err != nil {
		if errors.Is(err, ebpf.ErrKeyNotExist) {
			return 0, false, nil
		}
		return 0, false, fmt.Errorf("read steered upstream %s %s: %w", proto, ap, privHint(err))
	}
	return sumPackets(v), true, nil
}

// sumPackets adds up the per-CPU values of a steer_upstreams entry.
func sumPackets(v []steerSteerValue) uint64 {
	var n uint64
	for _, c := range v {
		n += c.Packets
	}
	return n
}
