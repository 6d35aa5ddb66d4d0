package dataplane

// The xdp_lb object; Go types come from the C structs in bpf/lib/maps.h.
//go:generate go tool bpf2go -cc clang-19 -target bpfel -type xdp_service_key -type xdp_service -type xdp_backend -type xdp_flow_key -type xdp_flow -type xdp_fib_entry -type xdp_counter xdp ../../bpf/xdp_lb.c -- -I../../bpf/lib -I/usr/include/x86_64-linux-gnu

import (
	"errors"
	"fmt"
	"net"
	"net/netip"
	"os"
	"path/filepath"
	"sort"

	"github.com/cilium/ebpf"
	"github.com/cilium/ebpf/link"
	"go.uber.org/zap"
)

// Sizes compiled into bpf/xdp_lb.c (bpf/lib/maps.h).
const (
	// XDPTableSize is the number of slots of every service's Maglev table
	// (a prime: pkg/balance's DefaultMaglevSize).
	XDPTableSize   = 65537
	MaxXDPServices = 256
	MaxXDPBackends = 4096

	xdpNoBackend     = 0xffffffff // XDP_NO_BACKEND
	xdpBackendActive = 1          // XDP_BACKEND_ACTIVE
	xdpMarkerID      = 0xffffffff // service id of a VIP marker (port 0)
)

// XDPMode is how the XDP program is attached.
type XDPMode string

const (
	// XDPAuto: native where the driver supports it, generic otherwise.
	XDPAuto    XDPMode = ""
	XDPNative  XDPMode = "native"
	XDPGeneric XDPMode = "generic"
)

// ParseXDPMode parses "native", "generic" or "" (auto).
func ParseXDPMode(s string) (XDPMode, error) {
	switch XDPMode(s) {
	case XDPAuto, XDPNative, XDPGeneric:
		return XDPMode(s), nil
	}
	return "", fmt.Errorf("xdp mode %q: want native or generic", s)
}

func (m XDPMode) pinName() string { return "xdp_" + string(m) }

func (m XDPMode) flags() link.XDPAttachFlags {
	if m == XDPGeneric {
		return link.XDPGenericMode
	}
	return link.XDPDriverMode
}

// XDPService names one load-balanced service of the XDP program.
type XDPService struct {
	VIP   netip.AddrPort `json:"vip"`
	Proto Proto          `json:"proto"`
}

func (s XDPService) String() string { return fmt.Sprintf("%s/%s", s.VIP, s.Proto) }

func (s XDPService) validate() error {
	a := s.VIP.Addr()
	switch {
	case !a.IsValid() || a.IsUnspecified() || a.IsMulticast():
		return fmt.Errorf("xdp service %s: the VIP must be a unicast address", s)
	case a.Zone() != "":
		return fmt.Errorf("xdp service %s: the VIP has a zone", s)
	case s.VIP.Port() == 0:
		return fmt.Errorf("xdp service %s: the VIP needs a port", s)
	case s.Proto != UDP && s.Proto != TCP:
		return fmt.Errorf("xdp service %s: protocol must be udp or tcp", s)
	}
	return nil
}

func addr16(a netip.Addr) (fam uint8, b [16]byte) {
	if a.Is4() || a.Is4In6() {
		a4 := a.Unmap().As4()
		copy(b[:], a4[:])
		return familyV4, b
	}
	return familyV6, a.As16()
}

func addrFrom16(fam uint8, b [16]byte) netip.Addr {
	if fam == familyV4 {
		return netip.AddrFrom4([4]byte(b[:4]))
	}
	return netip.AddrFrom16(b)
}

func (s XDPService) key() xdpXdpServiceKey {
	fam, a := addr16(s.VIP.Addr())
	return xdpXdpServiceKey{Family: fam, Proto: uint8(s.Proto), Port: htons(s.VIP.Port()), Addr: a}
}

func markerKey(k xdpXdpServiceKey) xdpXdpServiceKey {
	return xdpXdpServiceKey{Family: k.Family, Addr: k.Addr}
}

// XDPBackendState is one backend of a service as the program sees it.
type XDPBackendState struct {
	Addr    netip.AddrPort `json:"addr"`
	ID      uint32         `json:"id"`
	Slots   int            `json:"slots"` // Maglev table slots: its share of new flows
	Packets uint64         `json:"packets"`
	Bytes   uint64         `json:"bytes"`
}

// XDPServiceState is a service, its table generation and its backends.
type XDPServiceState struct {
	XDPService
	ID         uint32            `json:"id"`
	Generation uint32            `json:"generation"`
	Packets    uint64            `json:"packets"`
	Bytes      uint64            `json:"bytes"`
	Backends   []XDPBackendState `json:"backends"`
}

// xdpState is the xdp_lb maps, loaded (or adopted) on first use.
type xdpState struct {
	spec *ebpf.CollectionSpec
	maps xdpMaps
}

func (d *Dataplane) xdpSpec() (*ebpf.CollectionSpec, error) {
	spec, err := loadXdp()
	if err != nil {
		return nil, fmt.Errorf("load xdp spec: %w", err)
	}
	pinMaps(spec)
	return spec, nil
}

// xdp returns the xdp_lb maps, adopting the pinned ones.
func (d *Dataplane) xdp() (*xdpState, error) {
	if d.xdpst != nil {
		return d.xdpst, nil
	}
	spec, err := d.xdpSpec()
	if err != nil {
		return nil, err
	}
	st := &xdpState{spec: spec}
	if err := spec.LoadAndAssign(&st.maps, d.collectionOptions()); err != nil {
		return nil, loadErr("load xdp maps", d.dir, err)
	}
	d.xdpst = st
	return st, nil
}

func (d *Dataplane) xdpPinned() bool {
	_, err := os.Stat(filepath.Join(d.dir, xdpMapXdpServices))
	return err == nil
}

func (d *Dataplane) closeXDP() {
	if d.xdpst != nil {
		d.xdpst.maps.Close()
		d.xdpst = nil
	}
}

// unpinXDP removes the xdp_lb maps' pins (with the last attachment).
func (d *Dataplane) unpinXDP() error {
	d.closeXDP()
	for _, n := range []string{xdpMapXdpBackendStats, xdpMapXdpBackends, xdpMapXdpCounters, xdpMapXdpFibCache,
		xdpMapXdpFlows, xdpMapXdpServiceStats, xdpMapXdpServices, xdpMapXdpTables, xdpMapXdpTxPorts, xdpMapXdpPorts} {
		if err := os.Remove(filepath.Join(d.dir, n)); err != nil && !errors.Is(err, os.ErrNotExist) {
			return fmt.Errorf("unpin %s: %w", n, err)
		}
	}
	return nil
}

// AttachXDP loads the xdp_lb program and attaches it to ifname's XDP hook
// in mode (XDPAuto: the mode already attached there by lbctl, else native,
// falling back to generic where the driver has no XDP support), pinned
// under links/IFACE/xdp_MODE. Attaching again in the same mode replaces
// the program in place; in the other mode, it moves the hook (detach, then
// attach: packets in between take the stack's path). Returns the mode used.
func (d *Dataplane) AttachXDP(ifname string, mode XDPMode) (XDPMode, error) {
	ifindex, err := lookupInterface(ifname)
	if err != nil {
		return "", fmt.Errorf("attach xdp to %s: %w", ifname, err)
	}
	st, err := d.xdp()
	if err != nil {
		return "", err
	}
	var progs xdpPrograms
	opts := d.collectionOptions()
	opts.MapReplacements = map[string]*ebpf.Map{
		xdpMapXdpBackendStats: st.maps.XdpBackendStats,
		xdpMapXdpBackends:     st.maps.XdpBackends,
		xdpMapXdpCounters:     st.maps.XdpCounters,
		xdpMapXdpFibCache:     st.maps.XdpFibCache,
		xdpMapXdpFlows:        st.maps.XdpFlows,
		xdpMapXdpServiceStats: st.maps.XdpServiceStats,
		xdpMapXdpServices:     st.maps.XdpServices,
		xdpMapXdpTables:       st.maps.XdpTables,
		xdpMapXdpTxPorts:      st.maps.XdpTxPorts,
		xdpMapXdpPorts:        st.maps.XdpPorts,
	}
	if err := st.spec.LoadAndAssign(&progs, opts); err != nil {
		return "", loadErr("load xdp program", d.dir, err)
	}
	defer progs.Close()
	d.fillTxPorts(st)

	dir := d.linkDir(ifname)
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return "", fmt.Errorf("create %s: %w", dir, err)
	}
	try := []XDPMode{mode}
	if mode == XDPAuto {
		try = []XDPMode{XDPNative, XDPGeneric}
		if _, err := os.Stat(filepath.Join(dir, XDPGeneric.pinName())); err == nil {
			// Adopt the mode attached before (a restarted daemon, or
			// lbctl attach --xdp-mode generic): never move the hook.
			try = []XDPMode{XDPGeneric, XDPNative}
		}
	}
	var errs []error
	for _, m := range try {
		err := d.attachXDPMode(ifname, ifindex, m, progs.XdpLb)
		if err == nil {
			if mode == XDPAuto && m == XDPGeneric && len(errs) > 0 {
				d.log.Warn("native XDP not supported by the driver: attached in generic mode (slower, runs after the skb is built)",
					zap.String("interface", ifname), zap.Error(errors.Join(errs...)))
			}
			return m, nil
		}
		errs = append(errs, fmt.Errorf("%s: %w", m, err))
	}
	return "", fmt.Errorf("attach xdp to %s: %w", ifname, privHint(errors.Join(errs...)))
}

func (d *Dataplane) attachXDPMode(ifname string, ifindex int, mode XDPMode, prog *ebpf.Program) error {
	pin := filepath.Join(d.linkDir(ifname), mode.pinName())
	if l, err := link.LoadPinnedLink(pin, nil); err == nil {
		defer l.Close()
		info, ierr := l.Info()
		if ierr == nil && info.XDP() != nil && int(info.XDP().Ifindex) == ifindex {
			if err := l.Update(prog); err != nil {
				return fmt.Errorf("update pinned link %s: %w", pin, err)
			}
			return nil
		}
		if err := l.Unpin(); err != nil { // interface gone: stale link
			return fmt.Errorf("unpin stale link %s: %w", pin, err)
		}
	}
	// Another mode attached before: one XDP program per interface.
	if _, err := d.detachXDP(ifname); err != nil {
		return err
	}
	l, err := link.AttachXDP(link.XDPOptions{Program: prog, Interface: ifindex, Flags: mode.flags()})
	if err != nil {
		return err
	}
	defer l.Close()
	if err := l.Pin(pin); err != nil {
		_ = l.Detach()
		return fmt.Errorf("pin link %s: %w", pin, err)
	}
	return nil
}

// fillTxPorts puts every interface of the namespace but loopback into the
// redirect devmap (the program falls back to bpf_redirect for others).
func (d *Dataplane) fillTxPorts(st *xdpState) {
	ifs, err := net.Interfaces()
	if err != nil {
		return
	}
	for _, i := range ifs {
		if i.Flags&net.FlagLoopback != 0 {
			continue
		}
		if err := st.maps.XdpTxPorts.Update(uint32(i.Index), uint32(i.Index), ebpf.UpdateAny); err != nil {
			d.log.Debug("xdp redirect map", zap.String("interface", i.Name), zap.Error(err))
		}
	}
}

// detachXDP removes the XDP link lbctl pinned on ifname, if any.
func (d *Dataplane) detachXDP(ifname string) ([]Attachment, error) {
	var done []Attachment
	for _, m := range []XDPMode{XDPNative, XDPGeneric} {
		pin := filepath.Join(d.linkDir(ifname), m.pinName())
		l, err := link.LoadPinnedLink(pin, nil)
		if errors.Is(err, os.ErrNotExist) {
			continue
		}
		if err != nil {
			return done, fmt.Errorf("load pinned link %s: %w", pin, privHint(err))
		}
		if derr := l.Detach(); derr != nil {
			d.log.Debug("detach link", zap.String("pin", pin), zap.Error(derr))
		}
		uerr := l.Unpin()
		l.Close()
		if uerr != nil {
			return done, fmt.Errorf("unpin %s: %w", pin, uerr)
		}
		done = append(done, Attachment{Interface: ifname, Program: "xdp_lb", Method: Method("xdp-" + string(m))})
	}
	return done, nil
}

// xdpAttachments lists the XDP links pinned for ifname.
func (d *Dataplane) xdpAttachments(ifname string) []Attachment {
	var out []Attachment
	for _, m := range []XDPMode{XDPNative, XDPGeneric} {
		if _, err := os.Stat(filepath.Join(d.linkDir(ifname), m.pinName())); err == nil {
			out = append(out, Attachment{Interface: ifname, Program: "xdp_lb", Method: Method("xdp-" + string(m))})
		}
	}
	return out
}

// SetXDPService creates or updates svc: its backends, and its Maglev table
// (XDPTableSize slots, each an index into backends or -1 for none, as
// pkg/balance's MaglevTable builds it over the eligible backends). The
// table is written into a fresh map and swapped in with one update, so no
// packet reads a half-written table. A backend keeps its id (and its TCP
// flows) while its address stays in backends, whether its slots are
// taken away (down) or not; flows to a backend that leaves backends are
// moved on their next packet. Returns the new table generation.
func (d *Dataplane) SetXDPService(svc XDPService, backends []netip.AddrPort, table []int) (uint32, error) {
	if err := svc.validate(); err != nil {
		return 0, err
	}
	if len(table) != XDPTableSize {
		return 0, fmt.Errorf("set xdp service %s: table has %d slots, want %d (pkg/balance.MaglevTable with size %d)",
			svc, len(table), XDPTableSize, XDPTableSize)
	}
	for _, b := range backends {
		if b.Addr().Is4() != svc.VIP.Addr().Is4() || !b.Addr().IsValid() || b.Port() == 0 {
			return 0, fmt.Errorf("set xdp service %s: backend %s: want an address of the VIP's family and a port", svc, b)
		}
	}
	for i, v := range table {
		if v < -1 || v >= len(backends) {
			return 0, fmt.Errorf("set xdp service %s: table slot %d names backend %d of %d", svc, i, v, len(backends))
		}
	}
	st, err := d.xdp()
	if err != nil {
		return 0, err
	}
	m := &st.maps
	key := svc.key()
	var cur xdpXdpService
	exists := true
	if err := m.XdpServices.Lookup(key, &cur); errors.Is(err, ebpf.ErrKeyNotExist) {
		exists = false
	} else if err != nil {
		return 0, fmt.Errorf("set xdp service %s: %w", svc, privHint(err))
	}
	all, err := d.xdpBackends(st)
	if err != nil {
		return 0, fmt.Errorf("set xdp service %s: %w", svc, err)
	}
	if !exists {
		id, ok, err := d.freeServiceID(st)
		if err != nil {
			return 0, fmt.Errorf("set xdp service %s: %w", svc, err)
		}
		if !ok {
			return 0, fmt.Errorf("set xdp service %s: all %d service slots in use; remove a service first", svc, MaxXDPServices)
		}
		cur.Id = id
	}
	// Backend ids: keep the id of an address the service already has.
	old := map[netip.AddrPort]uint32{}
	used := make([]bool, MaxXDPBackends)
	for id, b := range all {
		if b.Flags&xdpBackendActive != 0 {
			used[id] = true
			if b.Service == cur.Id && exists {
				old[backendAddr(b)] = uint32(id)
			}
		}
	}
	ids := make([]uint32, len(backends))
	keep := map[uint32]bool{}
	next := 0
	for i, b := range backends {
		if id, ok := old[b]; ok {
			ids[i] = id
			keep[id] = true
			continue
		}
		for next < MaxXDPBackends && used[next] {
			next++
		}
		if next == MaxXDPBackends {
			return 0, fmt.Errorf("set xdp service %s: all %d backend slots in use", svc, MaxXDPBackends)
		}
		used[next] = true
		ids[i] = uint32(next)
		if err := d.newBackend(st, uint32(next), cur.Id, b); err != nil {
			return 0, fmt.Errorf("set xdp service %s: backend %s: %w", svc, b, err)
		}
	}

	// The new table, filled while unseen, then swapped in.
	inner, err := ebpf.NewMap(st.spec.Maps[xdpMapXdpTables].InnerMap)
	if err != nil {
		return 0, fmt.Errorf("set xdp service %s: create table: %w", svc, privHint(err))
	}
	defer inner.Close()
	keys := make([]uint32, XDPTableSize)
	vals := make([]uint32, XDPTableSize)
	for i, v := range table {
		keys[i] = uint32(i)
		vals[i] = xdpNoBackend
		if v >= 0 {
			vals[i] = ids[v]
		}
	}
	if _, err := inner.BatchUpdate(keys, vals, nil); err != nil {
		return 0, fmt.Errorf("set xdp service %s: fill table: %w", svc, err)
	}
	if err := m.XdpTables.Update(cur.Id, inner, ebpf.UpdateAny); err != nil {
		return 0, fmt.Errorf("set xdp service %s: publish table: %w", svc, err)
	}
	if !exists {
		// Fresh counters for a fresh service.
		if err := zeroPerCPU(m.XdpServiceStats, cur.Id, xdpRuleStats{}); err != nil {
			return 0, fmt.Errorf("set xdp service %s: %w", svc, err)
		}
	}
	cur.Gen++
	if err := m.XdpServices.Update(key, cur, ebpf.UpdateAny); err != nil {
		return 0, fmt.Errorf("set xdp service %s: %w", svc, err)
	}
	if err := m.XdpServices.Update(markerKey(key), xdpXdpService{Id: xdpMarkerID}, ebpf.UpdateAny); err != nil {
		return 0, fmt.Errorf("set xdp service %s: mark VIP: %w", svc, err)
	}
	if err := m.XdpPorts.Update(uint32(svc.VIP.Port()), uint8(1), ebpf.UpdateAny); err != nil {
		return 0, fmt.Errorf("set xdp service %s: mark port: %w", svc, err)
	}
	// Backends that left: inactive, so their flows move on the next packet.
	for addr, id := range old {
		if !keep[id] {
			if err := m.XdpBackends.Update(id, xdpXdpBackend{}, ebpf.UpdateAny); err != nil {
				return 0, fmt.Errorf("set xdp service %s: remove backend %s: %w", svc, addr, err)
			}
		}
	}
	return cur.Gen, nil
}

func backendAddr(b xdpXdpBackend) netip.AddrPort {
	return netip.AddrPortFrom(addrFrom16(b.Family, b.Addr), ntohs(b.Port))
}

func (d *Dataplane) newBackend(st *xdpState, id, service uint32, a netip.AddrPort) error {
	if err := zeroPerCPU(st.maps.XdpBackendStats, id, xdpRuleStats{}); err != nil {
		return err
	}
	if err := zeroPerCPU(st.maps.XdpFibCache, id, xdpXdpFibEntry{}); err != nil {
		return err
	}
	fam, b := addr16(a.Addr())
	v := xdpXdpBackend{Addr: b, Port: htons(a.Port()), Family: fam, Flags: xdpBackendActive, Service: service}
	return st.maps.XdpBackends.Update(id, v, ebpf.UpdateAny)
}

func zeroPerCPU[T any](m *ebpf.Map, key uint32, zero T) error {
	n, err := ebpf.PossibleCPU()
	if err != nil {
		return err
	}
	vals := make([]T, n)
	for i := range vals {
		vals[i] = zero
	}
	if err := m.Update(key, vals, ebpf.UpdateAny); err != nil {
		return fmt.Errorf("reset counters: %w", privHint(err))
	}
	return nil
}

// xdpBackends reads the whole backend array.
func (d *Dataplane) xdpBackends(st *xdpState) ([]xdpXdpBackend, error) {
	out := make([]xdpXdpBackend, MaxXDPBackends)
	var k uint32
	var v xdpXdpBackend
	it := st.maps.XdpBackends.Iterate()
	for it.Next(&k, &v) {
		if int(k) < len(out) {
			out[k] = v
		}
	}
	if err := it.Err(); err != nil {
		return nil, fmt.Errorf("read backends: %w", privHint(err))
	}
	return out, nil
}

type xdpSvcEntry struct {
	key xdpXdpServiceKey
	val xdpXdpService
}

func (d *Dataplane) xdpServiceEntries(st *xdpState) ([]xdpSvcEntry, error) {
	var out []xdpSvcEntry
	var e xdpSvcEntry
	it := st.maps.XdpServices.Iterate()
	for it.Next(&e.key, &e.val) {
		if e.val.Id != xdpMarkerID {
			out = append(out, e)
		}
	}
	if err := it.Err(); err != nil {
		return nil, fmt.Errorf("read xdp services: %w", privHint(err))
	}
	return out, nil
}

func (d *Dataplane) freeServiceID(st *xdpState) (uint32, bool, error) {
	es, err := d.xdpServiceEntries(st)
	if err != nil {
		return 0, false, err
	}
	used := make([]bool, MaxXDPServices)
	for _, e := range es {
		if e.val.Id < MaxXDPServices {
			used[e.val.Id] = true
		}
	}
	for i, u := range used {
		if !u {
			return uint32(i), true, nil
		}
	}
	return 0, false, nil
}

// DelXDPService removes svc: new packets to it pass to the stack.
func (d *Dataplane) DelXDPService(svc XDPService) error {
	st, err := d.xdp()
	if err != nil {
		return err
	}
	key := svc.key()
	var cur xdpXdpService
	if err := st.maps.XdpServices.Lookup(key, &cur); errors.Is(err, ebpf.ErrKeyNotExist) {
		return fmt.Errorf("delete xdp service %s: %w", svc, ErrNoService)
	} else if err != nil {
		return fmt.Errorf("delete xdp service %s: %w", svc, privHint(err))
	}
	if err := st.maps.XdpServices.Delete(key); err != nil {
		return fmt.Errorf("delete xdp service %s: %w", svc, err)
	}
	es, err := d.xdpServiceEntries(st)
	if err != nil {
		return err
	}
	sameVIP, samePort := false, false
	for _, e := range es {
		sameVIP = sameVIP || (e.key.Family == key.Family && e.key.Addr == key.Addr)
		samePort = samePort || e.key.Port == key.Port
	}
	if !samePort {
		_ = st.maps.XdpPorts.Update(uint32(svc.VIP.Port()), uint8(0), ebpf.UpdateAny)
	}
	if !sameVIP {
		_ = st.maps.XdpServices.Delete(markerKey(key))
	}
	if err := st.maps.XdpTables.Delete(cur.Id); err != nil && !errors.Is(err, ebpf.ErrKeyNotExist) {
		return fmt.Errorf("delete xdp service %s: table: %w", svc, err)
	}
	all, err := d.xdpBackends(st)
	if err != nil {
		return err
	}
	for id, b := range all {
		if b.Flags&xdpBackendActive != 0 && b.Service == cur.Id {
			if err := st.maps.XdpBackends.Update(uint32(id), xdpXdpBackend{}, ebpf.UpdateAny); err != nil {
				return fmt.Errorf("delete xdp service %s: backend %d: %w", svc, id, err)
			}
		}
	}
	return nil
}

// ErrNoService: DelXDPService of a service that does not exist.
var ErrNoService = errors.New("no such xdp service")

// XDPServices lists the services, their table generation, each backend's
// share of the table and the counters. Empty when XDP was never used.
func (d *Dataplane) XDPServices() ([]XDPServiceState, error) {
	if d.xdpst == nil && !d.xdpPinned() {
		return nil, nil
	}
	st, err := d.xdp()
	if err != nil {
		return nil, err
	}
	es, err := d.xdpServiceEntries(st)
	if err != nil {
		return nil, err
	}
	all, err := d.xdpBackends(st)
	if err != nil {
		return nil, err
	}
	var out []XDPServiceState
	for _, e := range es {
		s := XDPServiceState{
			XDPService: XDPService{VIP: netip.AddrPortFrom(addrFrom16(e.key.Family, e.key.Addr), ntohs(e.key.Port)), Proto: Proto(e.key.Proto)},
			ID:         e.val.Id,
			Generation: e.val.Gen,
		}
		s.Packets, s.Bytes, err = sumStats(st.maps.XdpServiceStats, e.val.Id)
		if err != nil {
			return nil, err
		}
		slots := map[uint32]int{}
		var inner *ebpf.Map
		if err := st.maps.XdpTables.Lookup(e.val.Id, &inner); err == nil {
			vals := make([]uint32, XDPTableSize)
			keys := make([]uint32, XDPTableSize)
			var cursor ebpf.MapBatchCursor
			n, berr := inner.BatchLookup(&cursor, keys, vals, nil)
			if berr != nil && !errors.Is(berr, ebpf.ErrKeyNotExist) {
				inner.Close()
				return nil, fmt.Errorf("read table of %s: %w", s.XDPService, berr)
			}
			for _, v := range vals[:n] {
				slots[v]++
			}
			inner.Close()
		}
		for id, b := range all {
			if b.Flags&xdpBackendActive == 0 || b.Service != e.val.Id {
				continue
			}
			bs := XDPBackendState{Addr: backendAddr(b), ID: uint32(id), Slots: slots[uint32(id)]}
			bs.Packets, bs.Bytes, err = sumStats(st.maps.XdpBackendStats, uint32(id))
			if err != nil {
				return nil, err
			}
			s.Backends = append(s.Backends, bs)
		}
		out = append(out, s)
	}
	sort.Slice(out, func(i, j int) bool { return out[i].ID < out[j].ID })
	return out, nil
}

func sumStats(m *ebpf.Map, id uint32) (pkts, bytes uint64, err error) {
	var per []xdpRuleStats
	if err := m.Lookup(id, &per); err != nil {
		return 0, 0, fmt.Errorf("read counters %d: %w", id, privHint(err))
	}
	for _, v := range per {
		pkts += v.Packets
		bytes += v.Bytes
	}
	return pkts, bytes, nil
}

// XDPCounter names a slot of the xdp_lb program's counter array; values
// mirror enum xdp_counter in bpf/lib/maps.h and never change.
type XDPCounter uint32

const (
	XDPSeen        = XDPCounter(xdpXdpCounterXDP_C_SEEN)
	XDPPassed      = XDPCounter(xdpXdpCounterXDP_C_PASSED)
	XDPTx          = XDPCounter(xdpXdpCounterXDP_C_TX)
	XDPRedirected  = XDPCounter(xdpXdpCounterXDP_C_REDIRECTED)
	XDPDropped     = XDPCounter(xdpXdpCounterXDP_C_DROPPED)
	XDPFibMiss     = XDPCounter(xdpXdpCounterXDP_C_FIB_MISS)
	XDPFragments   = XDPCounter(xdpXdpCounterXDP_C_FRAGMENTS)
	XDPUnsupported = XDPCounter(xdpXdpCounterXDP_C_UNSUPPORTED)
	XDPFlowHit     = XDPCounter(xdpXdpCounterXDP_C_FLOW_HIT)
	XDPFlowNew     = XDPCounter(xdpXdpCounterXDP_C_FLOW_NEW)
	XDPErrors      = XDPCounter(xdpXdpCounterXDP_C_ERRORS)
	numXDPCounters = int(xdpXdpCounterXDP_C_COUNTER_MAX)
)

var xdpCounterNames = [...]string{
	XDPSeen: "seen", XDPPassed: "passed", XDPTx: "tx", XDPRedirected: "redirect", XDPDropped: "drop",
	XDPFibMiss: "fib_miss", XDPFragments: "fragments", XDPUnsupported: "unsupported",
	XDPFlowHit: "flow_hit", XDPFlowNew: "flow_new", XDPErrors: "errors",
}

func (c XDPCounter) String() string {
	if int(c) < len(xdpCounterNames) {
		return xdpCounterNames[c]
	}
	return fmt.Sprintf("counter%d", uint32(c))
}

// xdpCounters reads the program counters, summed over CPUs (nil when XDP
// was never used).
func (d *Dataplane) xdpCounters() ([]Counter, error) {
	if d.xdpst == nil && !d.xdpPinned() {
		return nil, nil
	}
	st, err := d.xdp()
	if err != nil {
		return nil, err
	}
	var out []Counter
	for i := 0; i < numXDPCounters; i++ {
		var per []uint64
		if err := st.maps.XdpCounters.Lookup(uint32(i), &per); err != nil {
			return nil, fmt.Errorf("read xdp counter %s: %w", XDPCounter(i), privHint(err))
		}
		var sum uint64
		for _, v := range per {
			sum += v
		}
		out = append(out, Counter{Name: XDPCounter(i).String(), Value: sum})
	}
	// seen is not counted in BPF: it is every verdict's packet.
	for _, c := range []XDPCounter{XDPPassed, XDPTx, XDPRedirected, XDPDropped, XDPFibMiss, XDPFragments, XDPUnsupported, XDPErrors} {
		out[XDPSeen].Value += out[c].Value
	}
	return out, nil
}
