package dataplane

// The snat object; Go types come from the C structs in bpf/lib/maps.h.
// `make generate` reruns this and CI diffs the result. -mcpu=v3 (32-bit
// subregisters and jumps, Linux 5.1+; bpf2go defaults to v1) saves the
// zero-extending shifts v1 code spends on every 32-bit value: about 1 ns
// per packet on the hit path (docs/dataplane.md, Performance).
//go:generate go tool bpf2go -cc clang-19 -target bpfel -type snat_key -type snat_value -type snat_frag_key -type snat_frag_value -type snat_host4_key -type snat_host4_slot -type snat_host4_rule -type snat_kind_counts -type rule_stats -type snat_rewritten_base -type snat_counter snat ../../bpf/snat.c -- -mcpu=v3 -I../../bpf/lib -I/usr/include/x86_64-linux-gnu

import (
	"encoding/binary"
	"errors"
	"fmt"
	"net/netip"
	"sort"
	"strconv"
	"strings"

	"github.com/cilium/ebpf"
	"github.com/cilium/ebpf/btf"
	"github.com/cilium/ebpf/features"
	"go.uber.org/zap"
	"golang.org/x/sys/unix"
)

// Sizes compiled into bpf/snat.c (MAX_RULES in bpf/lib/maps.h).
const MaxSNATRules = 16384

const (
	familyV4     = 4
	familyV6     = 6
	keyFixedBits = 32 // SNAT_KEY_FIXED_BITS
	// snatKeptHosts4 is SNAT_KEPT_HOSTS4: the rule counts are exact and
	// snat_hosts and snat_hosts4 hold every host rule.
	snatKeptHosts4 = 2
)

var snatProg = tcProg{name: "snat", egress: true}

// Proto is an L4 protocol an SNAT rule matches.
type Proto uint8

const (
	TCP Proto = 6
	UDP Proto = 17
)

func (p Proto) String() string {
	switch p {
	case TCP:
		return "tcp"
	case UDP:
		return "udp"
	}
	return strconv.Itoa(int(p))
}

// ParseProto parses "udp" or "tcp".
func ParseProto(s string) (Proto, error) {
	switch strings.ToLower(s) {
	case "udp":
		return UDP, nil
	case "tcp":
		return TCP, nil
	}
	return 0, fmt.Errorf("protocol %q: want udp or tcp", s)
}

func (p Proto) MarshalText() ([]byte, error) { return []byte(p.String()), nil }

func (p *Proto) UnmarshalText(b []byte) error {
	v, err := ParseProto(string(b))
	*p = v
	return err
}

// SNATRule rewrites the source of packets leaving an interface with the
// snat program: a packet from Src (longest prefix wins), of protocol
// Proto, from source port SPort (0: any port) gets source address To and,
// if ToPort is not 0, source port ToPort. Between an any-port rule and a
// port rule, the longer prefix wins, and the port rule on equal prefixes.
type SNATRule struct {
	Src    netip.Prefix `json:"src"`
	Proto  Proto        `json:"proto"`
	SPort  uint16       `json:"sport"` // 0: any
	To     netip.Addr   `json:"to"`
	ToPort uint16       `json:"to_port"` // 0: keep
}

func (r SNATRule) String() string {
	s := fmt.Sprintf("src %s proto %s", r.Src, r.Proto)
	if r.SPort != 0 {
		s += fmt.Sprintf(" sport %d", r.SPort)
	}
	if r.To.IsValid() {
		s += " to " + r.target()
	}
	return s
}

func (r SNATRule) target() string {
	if r.ToPort == 0 {
		return r.To.String()
	}
	return netip.AddrPortFrom(r.To, r.ToPort).String()
}

// Validate checks r; for DelSNAT only the match (Src, Proto, SPort) counts.
func (r SNATRule) Validate() error {
	if err := r.validateMatch(); err != nil {
		return err
	}
	if !r.To.IsValid() {
		return fmt.Errorf("snat rule %s: no target address", r)
	}
	if r.To.Zone() != "" {
		return fmt.Errorf("snat rule %s: target %s has a zone", r, r.To)
	}
	if r.Src.Addr().Is4() != r.To.Is4() {
		return fmt.Errorf("snat rule %s: family mismatch: source %s is %s but target %s is %s",
			r, r.Src, family(r.Src.Addr()), r.To, family(r.To))
	}
	if r.To.IsUnspecified() || r.To.IsMulticast() {
		return fmt.Errorf("snat rule %s: target %s is not a unicast address", r, r.To)
	}
	return nil
}

func (r SNATRule) validateMatch() error {
	if !r.Src.IsValid() {
		return fmt.Errorf("snat rule: no valid source prefix")
	}
	if r.Src.Addr().Is4In6() {
		return fmt.Errorf("snat rule %s: source %s is an IPv4-mapped IPv6 prefix: write it as IPv4", r, r.Src)
	}
	if r.Src.Addr().Zone() != "" {
		return fmt.Errorf("snat rule %s: source %s has a zone", r, r.Src)
	}
	if m := r.Src.Masked(); m != r.Src {
		return fmt.Errorf("snat rule %s: source %s has host bits set: did you mean %s?", r, r.Src, m)
	}
	if r.Proto != UDP && r.Proto != TCP {
		return fmt.Errorf("snat rule %s: protocol %s: want udp or tcp", r, r.Proto)
	}
	return nil
}

func family(a netip.Addr) string {
	if a.Is4() {
		return "IPv4"
	}
	return "IPv6"
}

func (r SNATRule) key() snatSnatKey {
	k := snatSnatKey{
		Prefixlen: uint32(keyFixedBits + r.Src.Bits()),
		Proto:     uint8(r.Proto),
		Sport:     htons(r.SPort),
		Family:    familyV6,
	}
	if r.Src.Addr().Is4() {
		k.Family = familyV4
		a := r.Src.Addr().As4()
		copy(k.Addr[:], a[:])
	} else {
		k.Addr = r.Src.Addr().As16()
	}
	return k
}

// hostKey returns k's key in snat_hosts (prefixlen 0) if k is a host rule
// (/32, /128), which the program looks up there before the trie.
func hostKey(k snatSnatKey) (snatSnatKey, bool) {
	host := k.Family == familyV4 && k.Prefixlen == keyFixedBits+32 ||
		k.Family == familyV6 && k.Prefixlen == keyFixedBits+128
	k.Prefixlen = 0
	return k, host
}

// host4Key returns the snat_hosts4 key of hk (a hostKey) if it is an IPv4
// host rule.
func host4Key(hk snatSnatKey) (snatSnatHost4Key, bool) {
	if hk.Family != familyV4 {
		return snatSnatHost4Key{}, false
	}
	// Addr is the 4 address bytes in network order, as the program reads them.
	return snatSnatHost4Key{Addr: binary.NativeEndian.Uint32(hk.Addr[:4]), Sport: hk.Sport, Proto: hk.Proto}, true
}

func ruleFromKV(k snatSnatKey, v snatSnatValue) SNATRule {
	r := SNATRule{Proto: Proto(k.Proto), SPort: ntohs(k.Sport), ToPort: ntohs(v.Port)}
	bits := int(k.Prefixlen) - keyFixedBits
	if k.Family == familyV4 {
		r.Src = netip.PrefixFrom(netip.AddrFrom4([4]byte(k.Addr[:4])), bits)
		r.To = netip.AddrFrom4([4]byte(v.Addr[:4]))
	} else {
		r.Src = netip.PrefixFrom(netip.AddrFrom16(k.Addr), bits)
		r.To = netip.AddrFrom16(v.Addr)
	}
	return r
}

// htons turns a host port into the network-order value the kernel reads
// from a __be16 field laid out by the Go struct (little-endian host).
func htons(p uint16) uint16 {
	var b [2]byte
	binary.BigEndian.PutUint16(b[:], p)
	return binary.NativeEndian.Uint16(b[:])
}

func ntohs(p uint16) uint16 {
	var b [2]byte
	binary.NativeEndian.PutUint16(b[:], p)
	return binary.BigEndian.Uint16(b[:])
}

// snatSpec returns the snat collection spec with its maps pinned by name,
// and the kernel types to load it with (snatChecksumMode).
func (d *Dataplane) snatSpec() (*ebpf.CollectionSpec, *btf.Spec, error) {
	spec, err := loadSnat()
	if err != nil {
		return nil, nil, fmt.Errorf("load snat spec: %w", err)
	}
	pinMaps(spec)
	mmapableSlots(spec)
	kt, err := snatChecksumMode(spec)
	if err != nil {
		return nil, nil, err
	}
	return spec, kt, nil
}

// mmapableSlots creates snat_host4_slots without BPF_F_MMAPABLE where
// the kernel lacks it (before Linux 5.5): user space then cannot store
// slots atomically (host4table.go), keeps no table, and the program reads
// snat_hosts4 and the trie (kept 2), as before the table.
func mmapableSlots(spec *ebpf.CollectionSpec) {
	if features.HaveMapFlag(features.BPF_F_MMAPABLE) != nil {
		spec.Maps[snatMapSnatHost4Slots].Flags &^= uint32(features.BPF_F_MMAPABLE)
	}
}

// snatVarCsumHelper is the snat program's switch to the L4 checksum helper.
const snatVarCsumHelper = "snat_csum_helper"

// snatChecksumMode chooses how spec (snat, or its tracing variant) updates
// L4 checksums. The program writes them itself when it can read
// skb->ip_summed (bpf/lib/csum.h): through the kernel's struct sk_buff,
// which the verifier lets only CAP_PERFMON or CAP_SYS_ADMIN read; lbctl
// needs only CAP_BPF and CAP_NET_ADMIN, so without either it sets
// snat_csum_helper and the program uses bpf_l4_csum_replace, as before.
// The read is a CO-RE relocation against the kernel's BTF: on a kernel
// without BTF (which has no bpf_cast_to_kern_ctx either) the helper is
// chosen too and the returned stub types (non-nil only then) satisfy the
// relocations of the code the verifier then skips.
func snatChecksumMode(spec *ebpf.CollectionSpec) (*btf.Spec, error) {
	v, ok := spec.Variables[snatVarCsumHelper]
	if !ok {
		return nil, fmt.Errorf("snat object has no %s", snatVarCsumHelper)
	}
	var kt *btf.Spec
	helper := !perfmonCapable()
	if _, err := btf.LoadKernelSpec(); err != nil {
		helper = true
		if kt, err = stubSkbTypes(); err != nil {
			return nil, err
		}
	}
	if err := v.Set(boolU8(helper)); err != nil {
		return nil, fmt.Errorf("set %s: %w", snatVarCsumHelper, err)
	}
	return kt, nil
}

func boolU8(b bool) uint8 {
	if b {
		return 1
	}
	return 0
}

// perfmonCapable says whether this thread may read kernel structures from
// BPF (the kernel's perfmon_capable(): CAP_PERFMON or CAP_SYS_ADMIN).
func perfmonCapable() bool {
	hdr := unix.CapUserHeader{Version: unix.LINUX_CAPABILITY_VERSION_3}
	var data [2]unix.CapUserData
	if err := unix.Capget(&hdr, &data[0]); err != nil {
		return false
	}
	has := func(c int) bool { return data[c/32].Effective&(1<<(uint(c)%32)) != 0 }
	return has(unix.CAP_PERFMON) || has(unix.CAP_SYS_ADMIN)
}

// stubSkbTypes are kernel types with just the struct sk_buff fields the
// snat program relocates against (bpf/lib/csum.h), for kernels without BTF.
func stubSkbTypes() (*btf.Spec, error) {
	u8 := &btf.Int{Name: "unsigned char", Size: 1}
	u32 := &btf.Int{Name: "unsigned int", Size: 4}
	skb := &btf.Struct{Name: "sk_buff", Size: 1, Members: []btf.Member{
		{Name: "__pkt_type_offset", Type: &btf.Array{Index: u32, Type: u8, Nelems: 0}},
		{Name: "ip_summed", Type: u8, BitfieldSize: 2},
	}}
	b, err := btf.NewBuilder([]btf.Type{skb}, nil)
	if err != nil {
		return nil, fmt.Errorf("stub kernel types: %w", err)
	}
	spec, err := b.Spec()
	if err != nil {
		return nil, fmt.Errorf("stub kernel types: %w", err)
	}
	return spec, nil
}

// AttachSNAT attaches the snat program at ifname's TC egress (tcx, or
// clsact + cls_bpf as configured in Options) and pins it. Attaching again
// replaces the program in place.
func (d *Dataplane) AttachSNAT(ifname string) (Method, error) {
	if _, err := lookupInterface(ifname); err != nil {
		return "", fmt.Errorf("attach snat to %s: %w", ifname, err)
	}
	spec, kernelTypes, err := d.snatSpec()
	if err != nil {
		return "", err
	}
	// This program counts rewritten packets per rule only.
	if err := d.keepRewritten(); err != nil {
		return "", fmt.Errorf("attach snat to %s: %w", ifname, err)
	}
	var progs snatPrograms
	opts := d.collectionOptions()
	opts.Programs.KernelTypes = kernelTypes
	opts.MapReplacements = map[string]*ebpf.Map{
		snatMapSnatRules:      d.snat.SnatRules,
		snatMapSnatHosts:      d.snat.SnatHosts,
		snatMapSnatHosts4:     d.snat.SnatHosts4,
		snatMapSnatHost4Slots: d.snat.SnatHost4Slots,
		snatMapSnatHost4Rules: d.snat.SnatHost4Rules,
		snatMapSnatRuleCounts: d.snat.SnatRuleCounts,
		snatMapSnatRuleStats:  d.snat.SnatRuleStats,
		snatMapSnatCounters:   d.snat.SnatCounters,
		snatMapSnatFrags:      d.snat.SnatFrags,
	}
	if err := spec.LoadAndAssign(&progs, opts); err != nil {
		return "", loadErr("load snat program", d.dir, err)
	}
	defer progs.Close()
	return d.attachTC(ifname, snatProg, progs.SnatEgress)
}

// AddSNAT adds rule; a rule with the same match (Src, Proto, SPort) must
// not exist (ErrRuleExists).
func (d *Dataplane) AddSNAT(rule SNATRule) error {
	if err := rule.Validate(); err != nil {
		return err
	}
	ids, err := d.ids()
	if err != nil {
		return err
	}
	key := rule.key()
	if old, ok, err := d.exactRule(key); err != nil {
		return fmt.Errorf("add snat rule %s: %w", rule, err)
	} else if ok {
		return fmt.Errorf("add snat rule %s: %w (to %s): delete it first with lbctl snat del", rule, ErrRuleExists, ruleFromKV(key, old).target())
	}
	id, ok := ids.alloc()
	if !ok {
		return fmt.Errorf("add snat rule %s: all %d rule slots in use", rule, MaxSNATRules)
	}
	// A fresh rule starts with zero counters, whoever had the id before:
	// its counts are taken from here on (the slot itself is never reset,
	// rewritten.go).
	if err := d.raiseRuleIDs(id); err != nil {
		ids.free(id)
		return fmt.Errorf("add snat rule %s: %w", rule, err)
	}
	if err := d.setRuleBase(id); err != nil {
		ids.free(id)
		return fmt.Errorf("add snat rule %s: %w", rule, err)
	}
	val := snatSnatValue{Port: htons(rule.ToPort), SrcLen: uint8(rule.Src.Bits()), RuleId: id}
	if rule.To.Is4() {
		a := rule.To.As4()
		copy(val.Addr[:], a[:])
	} else {
		val.Addr = rule.To.As16()
	}
	if err := d.snat.SnatRules.Update(&key, &val, ebpf.UpdateNoExist); err != nil {
		ids.free(id)
		if errors.Is(err, ebpf.ErrKeyExist) {
			return fmt.Errorf("add snat rule %s: %w", rule, ErrRuleExists)
		}
		return fmt.Errorf("add snat rule %s: %w", rule, privHint(err))
	}
	hk, host := hostKey(key)
	var perr error
	if host {
		perr = d.putHost(hk, val)
	}
	if perr == nil {
		perr = d.putTable4(key, val)
	}
	if err := perr; err != nil {
		_ = d.delTable4(key, id)
		if host {
			_ = d.delHost(hk, id)
		}
		_ = d.snat.SnatRules.Delete(&key)
		ids.free(id)
		return fmt.Errorf("add snat rule %s: %w", rule, err)
	}
	c, t4 := d.ruleCounts, d.table4Counts
	*c.of(key) += 1
	if n := t4.of(key); n != nil {
		*n += 1
	}
	if err := d.setRuleCounts(c, t4); err != nil {
		return fmt.Errorf("add snat rule %s: %w", rule, err)
	}
	return nil
}

// DelSNAT deletes the rule matching rule.Src, rule.Proto and rule.SPort
// (rule.To and rule.ToPort are ignored).
func (d *Dataplane) DelSNAT(rule SNATRule) (err error) {
	rule.To, rule.ToPort = netip.Addr{}, 0
	if err := rule.validateMatch(); err != nil {
		return err
	}
	ids, err := d.ids()
	if err != nil {
		return err
	}
	key := rule.key()
	val, ok, err := d.exactRule(key)
	if err != nil {
		return fmt.Errorf("delete snat rule %s: %w", rule, err)
	}
	if !ok {
		return fmt.Errorf("delete snat rule %s: %w (see lbctl snat list)", rule, ErrRuleNotFound)
	}
	if hk, ok := hostKey(key); ok {
		if err := d.delHost(hk, val.RuleId); err != nil {
			return fmt.Errorf("delete snat rule %s: %w", rule, err)
		}
	}
	if err := d.delTable4(key, val.RuleId); err != nil {
		return fmt.Errorf("delete snat rule %s: %w", rule, err)
	}
	c, t4 := d.ruleCounts, d.table4Counts
	*c.of(key) -= 1
	if n := t4.of(key); n != nil {
		*n -= 1
	}
	// The counts go down once the rule is gone; a count left too high (a
	// failed delete) only costs a lookup, never a missed rule.
	defer func() {
		if err == nil {
			err = d.setRuleCounts(c, t4)
		}
	}()
	if err := d.snat.SnatRules.Delete(&key); err != nil {
		return fmt.Errorf("delete snat rule %s: %w", rule, privHint(err))
	}
	ids.free(val.RuleId)
	return d.clearRuleBase(val.RuleId)
}

// exactRule returns the rule stored under exactly key. A lookup in an LPM
// trie returns the longest prefix containing the key's, so a shorter
// prefix's rule may come back: compare the prefix length.
func (d *Dataplane) exactRule(key snatSnatKey) (snatSnatValue, bool, error) {
	var val snatSnatValue
	err := d.snat.SnatRules.Lookup(&key, &val)
	if errors.Is(err, ebpf.ErrKeyNotExist) {
		return val, false, nil
	}
	if err != nil {
		return val, false, privHint(err)
	}
	return val, int(val.SrcLen)+keyFixedBits == int(key.Prefixlen), nil
}

type snatEntry struct {
	rule SNATRule
	id   uint32
}

func (d *Dataplane) snatEntries() ([]snatEntry, error) {
	var (
		out []snatEntry
		k   snatSnatKey
		v   snatSnatValue
	)
	it := d.snat.SnatRules.Iterate()
	for it.Next(&k, &v) {
		out = append(out, snatEntry{rule: ruleFromKV(k, v), id: v.RuleId})
	}
	if err := it.Err(); err != nil {
		return nil, fmt.Errorf("list snat rules: %w", privHint(err))
	}
	sort.Slice(out, func(i, j int) bool { return ruleLess(out[i].rule, out[j].rule) })
	return out, nil
}

// ruleLess orders rules by family, address, prefix length, proto, port.
func ruleLess(a, b SNATRule) bool {
	if c := a.Src.Addr().Compare(b.Src.Addr()); c != 0 {
		return c < 0
	}
	if a.Src.Bits() != b.Src.Bits() {
		return a.Src.Bits() < b.Src.Bits()
	}
	if a.Proto != b.Proto {
		return a.Proto < b.Proto
	}
	return a.SPort < b.SPort
}

// ListSNAT returns every rule, ordered by source prefix, proto and port.
func (d *Dataplane) ListSNAT() ([]SNATRule, error) {
	es, err := d.snatEntries()
	if err != nil {
		return nil, err
	}
	out := make([]SNATRule, len(es))
	for i, e := range es {
		out[i] = e.rule
	}
	return out, nil
}

func (d *Dataplane) ids() (*idAlloc, error) {
	if d.ruleIDs != nil {
		return d.ruleIDs, nil
	}
	es, err := d.snatEntries()
	if err != nil {
		return nil, err
	}
	a := newIDAlloc(MaxSNATRules)
	for _, e := range es {
		a.take(e.id)
	}
	if err := d.keepRewritten(); err != nil {
		return nil, err
	}
	if err := d.syncHosts(); err != nil {
		return nil, err
	}
	d.ruleIDs = a
	return a, nil
}

// putHost enters the host rule hk (a hostKey) into snat_hosts and, for
// IPv4, snat_hosts4.
func (d *Dataplane) putHost(hk snatSnatKey, v snatSnatValue) error {
	if err := d.snat.SnatHosts.Update(&hk, &v, ebpf.UpdateAny); err != nil {
		return fmt.Errorf("host rule table snat_hosts: %w", privHint(err))
	}
	if k4, ok := host4Key(hk); ok {
		if err := d.snat.SnatHosts4.Update(&k4, &v, ebpf.UpdateAny); err != nil {
			return fmt.Errorf("host rule table snat_hosts4: %w", privHint(err))
		}
	}
	return nil
}

// delHost removes the host rule hk (a hostKey, rule id) from snat_hosts
// and snat_hosts4; an absent entry is no error.
func (d *Dataplane) delHost(hk snatSnatKey, id uint32) error {
	if err := d.snat.SnatHosts.Delete(&hk); err != nil && !errors.Is(err, ebpf.ErrKeyNotExist) {
		return fmt.Errorf("host rule table snat_hosts: %w", privHint(err))
	}
	if k4, ok := host4Key(hk); ok {
		if err := d.snat.SnatHosts4.Delete(&k4); err != nil && !errors.Is(err, ebpf.ErrKeyNotExist) {
			return fmt.Errorf("host rule table snat_hosts4: %w", privHint(err))
		}
	}
	return nil
}

// syncHosts makes snat_hosts and snat_hosts4 hold exactly the host rules
// of snat_rules and snat_rule_counts their numbers. State pinned by an
// older lbctl lacks them there or holds stale ones (its programs never
// looked there, or an older lbctl changed rules since); this program looks
// there first, so an any-port host rule there must not hide a port host
// rule only in the trie.
func (d *Dataplane) syncHosts() error {
	var (
		k  snatSnatKey
		k4 snatSnatHost4Key
		v  snatSnatValue
		c  snatSnatKindCounts
		t4 table4Counts
	)
	inTrie := map[snatSnatKey]bool{}
	in4 := map[snatSnatHost4Key]bool{}
	rules4 := map[table4Rule]snatSnatValue{}
	d.host4 = nil // not kept while rebuilt
	it := d.snat.SnatRules.Iterate()
	for it.Next(&k, &v) {
		if hk, ok := hostKey(k); ok {
			if err := d.putHost(hk, v); err != nil {
				return fmt.Errorf("copy host rules: %w", err)
			}
			inTrie[hk] = true
			if k4, ok := host4Key(hk); ok {
				in4[k4] = true
			}
		}
		if r, ok := table4RuleOf(k); ok {
			rules4[r] = v
		}
		*c.of(k) += 1
		if n := t4.of(k); n != nil {
			*n += 1
		}
	}
	if err := it.Err(); err != nil {
		return fmt.Errorf("copy host rules: %w", privHint(err))
	}
	if err := deleteStale(d.snat.SnatHosts, &k, &v, inTrie); err != nil {
		return err
	}
	if err := deleteStale(d.snat.SnatHosts4, &k4, &v, in4); err != nil {
		return err
	}
	// The counts say SNAT_KEPT_HOSTS4 (snat_hosts4 complete) before the
	// probed table is rewritten, and a grace period passes in between: no
	// program reads the table while it changes.
	if err := d.setRuleCounts(c, t4); err != nil {
		return err
	}
	if err := graceSync(); err != nil {
		d.log.Info("IPv4 rule table not kept: cannot wait for running programs", zap.Error(err))
		return nil
	}
	if err := d.rebuildHost4Table(rules4); err != nil {
		d.log.Info("IPv4 rule table not kept", zap.Error(err))
		d.host4 = nil
	}
	return d.setRuleCounts(c, t4)
}

// deleteStale deletes from the host rule table m every key not in keep.
func deleteStale[K comparable](m *ebpf.Map, k *K, v *snatSnatValue, keep map[K]bool) error {
	var stale []K
	it := m.Iterate()
	for it.Next(k, v) {
		if !keep[*k] {
			stale = append(stale, *k)
		}
	}
	if err := it.Err(); err != nil {
		return fmt.Errorf("list host rule table: %w", privHint(err))
	}
	for _, sk := range stale {
		if err := m.Delete(&sk); err != nil && !errors.Is(err, ebpf.ErrKeyNotExist) {
			return fmt.Errorf("remove stale host rule: %w", privHint(err))
		}
	}
	return nil
}

// of returns the count of the kind of rule k (in snat_rules) is.
func (c *snatSnatKindCounts) of(k snatSnatKey) *uint32 {
	switch _, host := hostKey(k); {
	case !host && k.Sport != 0:
		return &c.PortPrefixes
	case !host:
		return &c.AnyPrefixes
	case k.Sport != 0:
		return &c.PortHosts
	default:
		return &c.AnyHosts
	}
}

// setRuleCounts stores the numbers of rules of each kind, which the program
// reads to skip lookups that cannot match: the IPv4 kinds of the probed
// table first, then the counts that say whether it is kept.
func (d *Dataplane) setRuleCounts(c snatSnatKindCounts, t4 table4Counts) error {
	d.table4Counts = t4
	c.Kept = snatKeptHosts4
	if d.host4 != nil && d.host4.kept {
		c.Kept = snatKeptTable4 | t4.flags()
	}
	if err := d.snat.SnatRuleCounts.Update(uint32(0), c, ebpf.UpdateAny); err != nil {
		return fmt.Errorf("store the rule counts: %w", privHint(err))
	}
	d.ruleCounts = c
	return nil
}

// idAlloc hands out rule ids (slots of snat_rule_stats). The Dataplane's
// flock makes it the only writer while it is open.
type idAlloc struct {
	used []bool
	next uint32
}

func newIDAlloc(n int) *idAlloc { return &idAlloc{used: make([]bool, n)} }

func (a *idAlloc) take(id uint32) {
	if int(id) < len(a.used) {
		a.used[id] = true
	}
}

func (a *idAlloc) free(id uint32) {
	if int(id) < len(a.used) {
		a.used[id] = false
	}
}

func (a *idAlloc) alloc() (uint32, bool) {
	n := uint32(len(a.used))
	for i := uint32(0); i < n; i++ {
		id := (a.next + i) % n
		if !a.used[id] {
			a.used[id] = true
			a.next = id + 1
			return id, true
		}
	}
	return 0, false
}
