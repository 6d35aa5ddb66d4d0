package dataplane

import (
	"errors"
	"fmt"

	"github.com/cilium/ebpf"
	"golang.org/x/sys/unix"
)

// The open-addressed table of IPv4 host rules (snat_host4_slots and
// snat_host4_rules, bpf/lib/maps.h), which the program probes with inlined
// array lookups instead of a hash map lookup. Constants mirror maps.h.
const (
	host4SlotsBits = 16
	host4Slots     = 1 << host4SlotsBits
	host4Probes    = 8
	host4HashMul   = 0x9e3779b97f4a7c15
	host4Empty     = 0
	host4Deleted   = 0xffffffff
	// snatKeptTable4 is SNAT_KEPT_TABLE4: snat_host4_slots holds every
	// IPv4 host rule too (and everything SNAT_KEPT_HOSTS4 says).
	snatKeptTable4 = 3
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

// host4Table mirrors snat_host4_slots in user space: where each key lives
// and which slots are free. The Dataplane's flock makes this process the
// only writer.
type host4Table struct {
	slots   []uint32 // slot -> rule id + 1, host4Empty or host4Deleted
	pos     map[snatSnatHost4Key]uint32
	deleted int
	// kept: every IPv4 host rule is placed within host4Probes of its
	// home slot (else the program is told to use snat_hosts4).
	kept bool
	// freed holds rule ids whose entry a program may still be reading
	// (deleted since the last grace period): not rewritten before one.
	freed map[uint32]bool
}

func newHost4Table() *host4Table {
	return &host4Table{slots: make([]uint32, host4Slots), pos: map[snatSnatHost4Key]uint32{}, freed: map[uint32]bool{}, kept: true}
}

// place returns the slot k goes to: the first empty or deleted slot
// within host4Probes of its home, or false when there is none.
func (t *host4Table) place(k snatSnatHost4Key) (uint32, bool) {
	h := host4Home(k)
	for i := uint32(0); i < host4Probes; i++ {
		s := (h + i) & (host4Slots - 1)
		if v := t.slots[s]; v == host4Empty || v == host4Deleted {
			return s, true
		}
	}
	return 0, false
}

// insert records k (rule id) at its slot; false if the table is full
// around k's home.
func (t *host4Table) insert(k snatSnatHost4Key, id uint32) (uint32, bool) {
	s, ok := t.place(k)
	if !ok {
		return 0, false
	}
	if t.slots[s] == host4Deleted {
		t.deleted--
	}
	t.slots[s] = id + 1
	t.pos[k] = s
	return s, true
}

// remove marks k's slot deleted (a probe goes on past it, so the keys
// placed after it stay found) and returns it.
func (t *host4Table) remove(k snatSnatHost4Key) (uint32, bool) {
	s, ok := t.pos[k]
	if !ok {
		return 0, false
	}
	delete(t.pos, k)
	t.slots[s] = host4Deleted
	t.deleted++
	return s, true
}

// lookup finds k as the program does (for tests): the rule id, or false.
func (t *host4Table) lookup(k snatSnatHost4Key, ruleKey func(id uint32) snatSnatHost4Key) (uint32, bool) {
	h := host4Home(k)
	for i := uint32(0); i < host4Probes; i++ {
		v := t.slots[(h+i)&(host4Slots-1)]
		if v == host4Empty {
			return 0, false
		}
		if v != host4Deleted && ruleKey(v-1) == k {
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

// writeHost4Entry writes rule id's entry (key and target), waiting a grace
// period first if id was freed since the last one: a program that read a
// slot naming the old rule may still read the entry.
func (d *Dataplane) writeHost4Entry(k snatSnatHost4Key, v snatSnatValue) error {
	t := d.host4
	if t.freed[v.RuleId] {
		if err := graceSync(); err != nil {
			return err
		}
		clear(t.freed)
	}
	e := snatSnatHost4Rule{Key: k, Value: v}
	if err := d.snat.SnatHost4Rules.Update(v.RuleId, &e, ebpf.UpdateAny); err != nil {
		return fmt.Errorf("host rule table snat_host4_rules: %w", privHint(err))
	}
	return nil
}

func (d *Dataplane) writeSlot(s uint32) error {
	if err := d.snat.SnatHost4Slots.Update(s, snatSnatHost4Slot{Rule: d.host4.slots[s]}, ebpf.UpdateAny); err != nil {
		return fmt.Errorf("host rule table snat_host4_slots: %w", privHint(err))
	}
	return nil
}

// putHost4Table enters the IPv4 host rule k into the probed table. When
// it does not fit, the table stops being kept (the counts tell the
// program so; snat_hosts4 still holds the rule).
func (d *Dataplane) putHost4Table(k snatSnatHost4Key, v snatSnatValue) error {
	t := d.host4
	if t == nil || !t.kept {
		return nil
	}
	if err := d.writeHost4Entry(k, v); err != nil {
		return err
	}
	s, ok := t.insert(k, v.RuleId)
	if !ok {
		t.kept = false
		return nil
	}
	return d.writeSlot(s)
}

// delHost4Table removes k from the probed table; its rule id waits a grace
// period before its entry is rewritten.
func (d *Dataplane) delHost4Table(k snatSnatHost4Key, id uint32) error {
	t := d.host4
	if t == nil {
		return nil
	}
	s, ok := t.remove(k)
	if !ok {
		return nil
	}
	t.freed[id] = true
	if !t.kept {
		return nil
	}
	return d.writeSlot(s)
}

// rebuildHost4Table writes the probed table afresh from rules (every IPv4
// host rule, by snat_hosts4 key). The program must not be reading it: the
// counts say SNAT_KEPT_HOSTS4 or less while this runs, and a grace period
// has passed since they said so.
func (d *Dataplane) rebuildHost4Table(rules map[snatSnatHost4Key]snatSnatValue) error {
	t := newHost4Table()
	d.host4 = t
	entries := make([]snatSnatHost4Rule, 0, len(rules))
	ids := make([]uint32, 0, len(rules))
	for k, v := range rules {
		if _, ok := t.insert(k, v.RuleId); !ok {
			t.kept = false
			return nil
		}
		entries = append(entries, snatSnatHost4Rule{Key: k, Value: v})
		ids = append(ids, v.RuleId)
	}
	if len(ids) > 0 {
		if _, err := d.snat.SnatHost4Rules.BatchUpdate(ids, entries, nil); err != nil {
			return fmt.Errorf("host rule table snat_host4_rules: %w", privHint(err))
		}
	}
	keys := make([]uint32, host4Slots)
	vals := make([]snatSnatHost4Slot, host4Slots)
	for i := range keys {
		keys[i] = uint32(i)
		vals[i].Rule = t.slots[i]
	}
	if _, err := d.snat.SnatHost4Slots.BatchUpdate(keys, vals, nil); err != nil {
		if !errors.Is(err, ebpf.ErrNotSupported) {
			return fmt.Errorf("host rule table snat_host4_slots: %w", privHint(err))
		}
		for i := range keys {
			if err := d.writeSlot(uint32(i)); err != nil {
				return err
			}
		}
	}
	return nil
}
