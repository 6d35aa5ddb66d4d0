package dataplane

import (
	"encoding/binary"
	"fmt"
	"os"
	"sort"
	"sync/atomic"
	"unsafe"

	"github.com/cilium/ebpf"
	"golang.org/x/sys/unix"
)

// The open-addressed table of IPv4 rules /24../32 (snat_host4_slots and
// snat_host4_rules, bpf/lib/maps.h), which the program probes with inlined
// array lookups instead of a hash map lookup or a trie walk. Prefix rules
// are expanded: one slot per key (address, sport or 0, proto) a rule
// covers, naming the rule that wins for that key. Constants mirror maps.h.
const (
	host4SlotsBits = 16
	host4Slots     = 1 << host4SlotsBits
	host4Probes    = 8
	host4HashMul   = 0x9e3779b97f4a7c15
	host4MinBits   = 24               // HOST4_MIN_BITS
	host4MaxKeys   = host4Slots / 4   // at most a quarter full
	host4Empty     = 0                // HOST4_SLOT_EMPTY
	host4Deleted   = 0xffffffff       // HOST4_SLOT_DELETED
	host4SlotBytes = 8                // an array map's element stride (value size rounded up to 8)
	host4KeyMask   = 0xffffffff << 32 // the sport, proto and pad bits of a table key
	// snatKeptTable4 is SNAT_KEPT_TABLE4: snat_host4_slots holds every
	// IPv4 rule /24../32, expanded, and kept's flags (snatKeptT4*) say
	// which IPv4 lookups can match (and everything SNAT_KEPT_HOSTS4 says).
	snatKeptTable4 = 3
	snatKeptLevel  = 0x0f // SNAT_KEPT_LEVEL
	// SNAT_KEPT_T4_*: IPv4 port and any-port rules /24../32 (the table),
	// and shorter (the trie), exist.
	snatKeptT4Port      = 0x10
	snatKeptT4Any       = 0x20
	snatKeptT4PortShort = 0x40
	snatKeptT4AnyShort  = 0x80
)

// host4Word is k as the program reads it: the 8-byte key as a
// little-endian u64 (address, port, protocol, pad 0). Addr and Sport
// already hold the bytes the program loads (network order in memory).
func host4Word(k snatSnatHost4Key) uint64 {
	return uint64(k.Addr) | uint64(k.Sport)<<32 | uint64(k.Proto)<<48
}

// host4Home is the slot the program probes first for k.
func host4Home(k snatSnatHost4Key) uint32 {
	return uint32((host4Word(k) * host4HashMul) >> (64 - host4SlotsBits))
}

// loaded returns the IPv4 address a (host order, a's first byte in the
// top bits) as the program loads it from the packet: a little-endian u32
// of the network-order bytes.
func loaded(a uint32) uint32 {
	var b [4]byte
	binary.BigEndian.PutUint32(b[:], a)
	return binary.NativeEndian.Uint32(b[:])
}

// prefixMask returns the mask of a /bits IPv4 prefix in host order.
func prefixMask(bits int) uint32 {
	if bits <= 0 {
		return 0
	}
	return ^uint32(0) << (32 - bits)
}

// table4Rule is the match of an IPv4 rule of the table.
type table4Rule struct {
	addr  uint32 // prefix, host order, masked
	bits  int    // host4MinBits..32
	sport uint16 // as in snatSnatKey.Sport (network order in memory); 0: any
	proto uint8
}

// table4RuleOf returns k's rule if it is an IPv4 rule the table holds.
func table4RuleOf(k snatSnatKey) (table4Rule, bool) {
	bits := int(k.Prefixlen) - keyFixedBits
	if k.Family != familyV4 || bits < host4MinBits {
		return table4Rule{}, false
	}
	return table4Rule{addr: binary.BigEndian.Uint32(k.Addr[:4]), bits: bits, sport: k.Sport, proto: k.Proto}, true
}

// key returns the table key of address a (host order) for r's port and proto.
func (r table4Rule) key(a uint32) snatSnatHost4Key {
	return snatSnatHost4Key{Addr: loaded(a), Sport: r.sport, Proto: r.proto}
}

// entry returns r's snat_host4_rules entry: its key, mask and target.
func (r table4Rule) entry(v snatSnatValue) snatSnatHost4Rule {
	return snatSnatHost4Rule{Key: r.key(r.addr), Mask: uint64(loaded(prefixMask(r.bits))) | host4KeyMask, Value: v}
}

// host4Table mirrors snat_host4_slots in user space: where each key
// lives, which rule wins it, and which slots are free. The Dataplane's
// flock makes this process the only writer.
type host4Table struct {
	slots []uint32 // slot -> rule id + 1, host4Empty or host4Deleted
	pos   map[snatSnatHost4Key]uint32
	rules map[table4Rule]uint32 // rule -> id
	byID  map[uint32]table4Rule
	// kept: every key of every IPv4 rule /24../32 is placed within
	// host4Probes of its home slot, at most host4MaxKeys keys (else the
	// program is told to use snat_hosts4 and the trie).
	kept bool
	// freed holds rule ids whose entry a program may still be reading
	// (deleted since the last grace period): not rewritten before one.
	freed map[uint32]bool
}

func newHost4Table() *host4Table {
	return &host4Table{
		slots: make([]uint32, host4Slots), pos: map[snatSnatHost4Key]uint32{},
		rules: map[table4Rule]uint32{}, byID: map[uint32]table4Rule{},
		freed: map[uint32]bool{}, kept: true,
	}
}

// place returns the slot k goes to: the first empty or deleted slot
// within host4Probes of its home not in taken, or false when there is none.
func (t *host4Table) place(k snatSnatHost4Key, taken map[uint32]bool) (uint32, bool) {
	h := host4Home(k)
	for i := uint32(0); i < host4Probes; i++ {
		s := (h + i) & (host4Slots - 1)
		if v := t.slots[s]; (v == host4Empty || v == host4Deleted) && !taken[s] {
			return s, true
		}
	}
	return 0, false
}

// winner returns the rule (and its id) that wins address a (host order)
// among the rules of r's port and proto no longer than maxBits.
func (t *host4Table) winner(a uint32, r table4Rule, maxBits int) (table4Rule, uint32, bool) {
	for b := maxBits; b >= host4MinBits; b-- {
		w := table4Rule{addr: a & prefixMask(b), bits: b, sport: r.sport, proto: r.proto}
		if id, ok := t.rules[w]; ok {
			return w, id, true
		}
	}
	return table4Rule{}, 0, false
}

// add enters rule r (id) and returns the slots it changed: the keys it
// covers and no longer rule wins now name it. False, and nothing changed,
// when its new keys do not fit (more than host4MaxKeys keys, or no free
// slot within host4Probes of a key's home).
func (t *host4Table) add(r table4Rule, id uint32) ([]uint32, bool) {
	n := uint32(1) << (32 - r.bits)
	var (
		repoint []uint32
		fresh   []snatSnatHost4Key
	)
	for i := uint32(0); i < n; i++ {
		k := r.key(r.addr + i)
		if s, ok := t.pos[k]; ok {
			if t.byID[t.slots[s]-1].bits < r.bits {
				repoint = append(repoint, s)
			}
			continue
		}
		fresh = append(fresh, k)
	}
	if len(t.pos)+len(fresh) > host4MaxKeys {
		return nil, false
	}
	var taken map[uint32]bool // slots given to this rule's earlier keys
	if len(fresh) > 1 {
		taken = make(map[uint32]bool, len(fresh))
	}
	places := make([]uint32, len(fresh))
	for j, k := range fresh {
		s, ok := t.place(k, taken)
		if !ok {
			return nil, false
		}
		if taken != nil {
			taken[s] = true
		}
		places[j] = s
	}
	t.rules[r] = id
	t.byID[id] = r
	for _, s := range repoint {
		t.slots[s] = id + 1
	}
	for j, k := range fresh {
		s := places[j]
		t.slots[s] = id + 1
		t.pos[k] = s
	}
	return append(repoint, places...), true
}

// remove takes rule r out and returns the slots it changed: the keys r
// won now name the next longest rule covering them, or are deleted (a
// probe goes on past a deleted slot, so the keys placed after it stay
// found) when none does.
func (t *host4Table) remove(r table4Rule) []uint32 {
	id, ok := t.rules[r]
	if !ok {
		return nil
	}
	delete(t.rules, r)
	delete(t.byID, id)
	var changed []uint32
	n := uint32(1) << (32 - r.bits)
	for i := uint32(0); i < n; i++ {
		a := r.addr + i
		k := r.key(a)
		s, ok := t.pos[k]
		if !ok || t.slots[s] != id+1 {
			continue
		}
		if _, wid, ok := t.winner(a, r, r.bits-1); ok {
			t.slots[s] = wid + 1
		} else {
			t.slots[s] = host4Deleted
			delete(t.pos, k)
		}
		changed = append(changed, s)
	}
	return changed
}

// build enters rules (every IPv4 rule /24../32, by match, with their ids)
// into the empty table t, shortest first (so each key is written once per
// rule that wins it over the previous one); false when they do not fit.
func (t *host4Table) build(rules map[table4Rule]uint32) bool {
	order := make([]table4Rule, 0, len(rules))
	for r := range rules {
		order = append(order, r)
	}
	sort.Slice(order, func(i, j int) bool {
		a, b := order[i], order[j]
		if a.bits != b.bits {
			return a.bits < b.bits
		}
		if a.addr != b.addr {
			return a.addr < b.addr
		}
		if a.proto != b.proto {
			return a.proto < b.proto
		}
		return a.sport < b.sport
	})
	for _, r := range order {
		if _, ok := t.add(r, rules[r]); !ok {
			return false
		}
	}
	return true
}

// lookup finds k as the program does (for tests): the winning rule's id,
// or false. entry returns a rule id's snat_host4_rules entry.
func (t *host4Table) lookup(k snatSnatHost4Key, entry func(id uint32) (snatSnatHost4Rule, bool)) (uint32, bool) {
	h := host4Home(k)
	w := host4Word(k)
	for i := uint32(0); i < host4Probes; i++ {
		v := t.slots[(h+i)&(host4Slots-1)]
		if v == host4Empty {
			return 0, false
		}
		if v == host4Deleted {
			continue
		}
		e, ok := entry(v - 1)
		if ok && w&e.Mask == host4Word(e.Key) {
			return v - 1, true
		}
	}
	return 0, false
}

// graceSync waits until every BPF program that was running has finished
// (an RCU grace period: membarrier's MEMBARRIER_CMD_GLOBAL is
// synchronize_rcu(), and TC programs run inside RCU read sections).
func graceSync() error {
	const membarrierCmdGlobal = 1
	if _, _, e := unix.Syscall(unix.SYS_MEMBARRIER, membarrierCmdGlobal, 0, 0); e != 0 {
		return fmt.Errorf("membarrier: %w", e)
	}
	return nil
}

// slotMem returns snat_host4_slots mapped into this process (the map is
// BPF_F_MMAPABLE): slot i is the 4 bytes at i*host4SlotBytes, written
// with one atomic store, so a program reads the old or the new value.
func (d *Dataplane) slotMem() ([]byte, error) {
	if d.host4Mem != nil {
		return d.host4Mem, nil
	}
	size := host4Slots * host4SlotBytes
	if pg := os.Getpagesize(); size%pg != 0 {
		size += pg - size%pg
	}
	mem, err := unix.Mmap(d.snat.SnatHost4Slots.FD(), 0, size, unix.PROT_READ|unix.PROT_WRITE, unix.MAP_SHARED)
	if err != nil {
		return nil, fmt.Errorf("map snat_host4_slots into memory: %w", privHint(err))
	}
	d.host4Mem = mem
	return mem, nil
}

// unmapSlots releases slotMem's mapping.
func (d *Dataplane) unmapSlots() {
	if d.host4Mem != nil {
		_ = unix.Munmap(d.host4Mem)
		d.host4Mem = nil
	}
}

// writeSlots stores the mirror's value of each slot in ss.
func (d *Dataplane) writeSlots(ss []uint32) error {
	mem, err := d.slotMem()
	if err != nil {
		return err
	}
	for _, s := range ss {
		p := (*uint32)(unsafe.Pointer(&mem[s*host4SlotBytes]))
		atomic.StoreUint32(p, d.host4.slots[s])
	}
	return nil
}

// writeHost4Entry writes rule r's entry (key, mask, target), waiting a
// grace period first if its id was freed since the last one: a program
// that read a slot naming the old rule may still read the entry.
func (d *Dataplane) writeHost4Entry(r table4Rule, v snatSnatValue) error {
	t := d.host4
	if t.freed[v.RuleId] {
		if err := graceSync(); err != nil {
			return err
		}
		clear(t.freed)
	}
	e := r.entry(v)
	if err := d.snat.SnatHost4Rules.Update(v.RuleId, &e, ebpf.UpdateAny); err != nil {
		return fmt.Errorf("rule table snat_host4_rules: %w", privHint(err))
	}
	return nil
}

// putTable4 enters rule k (an IPv4 rule /24../32, else nothing to do)
// into the probed table: its entry first, then the slots it now wins.
// When its keys do not fit, the table stops being kept: the counts tell
// the program so at once (snat_hosts4 and the trie hold every rule).
func (d *Dataplane) putTable4(k snatSnatKey, v snatSnatValue) error {
	r, ok := table4RuleOf(k)
	t := d.host4
	if !ok || t == nil || !t.kept {
		return nil
	}
	if err := d.writeHost4Entry(r, v); err != nil {
		return err
	}
	changed, ok := t.add(r, v.RuleId)
	if !ok {
		t.kept = false
		return d.setRuleCounts(d.ruleCounts, d.table4Counts)
	}
	return d.writeSlots(changed)
}

// delTable4 takes rule k out of the probed table: the keys it won go to
// the next longest rule, or are deleted; its rule id waits a grace period
// before its entry is rewritten.
func (d *Dataplane) delTable4(k snatSnatKey, id uint32) error {
	r, ok := table4RuleOf(k)
	t := d.host4
	if !ok || t == nil {
		return nil
	}
	t.freed[id] = true
	if !t.kept {
		return nil
	}
	return d.writeSlots(t.remove(r))
}

// rebuildHost4Table writes the probed table afresh from rules (every IPv4
// rule /24../32, by match, with its value). The program must not be
// reading it: the counts say SNAT_KEPT_HOSTS4 or less while this runs, and
// a grace period has passed since they said so.
func (d *Dataplane) rebuildHost4Table(rules map[table4Rule]snatSnatValue) error {
	t := newHost4Table()
	d.host4 = t
	ids := make(map[table4Rule]uint32, len(rules))
	for r, v := range rules {
		ids[r] = v.RuleId
	}
	if !t.build(ids) {
		t.kept = false
		return nil
	}
	if _, err := d.slotMem(); err != nil {
		t.kept = false
		return err
	}
	entries := make([]snatSnatHost4Rule, 0, len(rules))
	keys := make([]uint32, 0, len(rules))
	for r, v := range rules {
		entries = append(entries, r.entry(v))
		keys = append(keys, v.RuleId)
	}
	if len(keys) > 0 {
		if _, err := d.snat.SnatHost4Rules.BatchUpdate(keys, entries, nil); err != nil {
			return fmt.Errorf("rule table snat_host4_rules: %w", privHint(err))
		}
	}
	all := make([]uint32, host4Slots)
	for i := range all {
		all[i] = uint32(i)
	}
	return d.writeSlots(all)
}

// table4Counts counts the IPv4 rules by kind, for kept's flags.
type table4Counts struct {
	PortRules, AnyRules uint32 // /24../32: in the table
	PortShort, AnyShort uint32 // shorter: only in the trie
}

// flags returns kept's SNAT_KEPT_T4_* flags for c.
func (c table4Counts) flags() uint32 {
	var f uint32
	for _, b := range []struct {
		n    uint32
		flag uint32
	}{{c.PortRules, snatKeptT4Port}, {c.AnyRules, snatKeptT4Any}, {c.PortShort, snatKeptT4PortShort}, {c.AnyShort, snatKeptT4AnyShort}} {
		if b.n > 0 {
			f |= b.flag
		}
	}
	return f
}

// of returns the count of the kind of rule k is, or nil for an IPv6 rule.
func (c *table4Counts) of(k snatSnatKey) *uint32 {
	if k.Family != familyV4 {
		return nil
	}
	_, long := table4RuleOf(k)
	switch {
	case long && k.Sport != 0:
		return &c.PortRules
	case long:
		return &c.AnyRules
	case k.Sport != 0:
		return &c.PortShort
	default:
		return &c.AnyShort
	}
}
