//go:build ignore

/* SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause) */
#include <linux/bpf.h>
#include <linux/pkt_cls.h>
#include <bpf/bpf_helpers.h>

#include "maps.h"
#include "parse.h"
#include "csum.h"
#include "trace.h"

char __license[] SEC("license") = "Dual BSD/GPL";

/* SNAT rules: longest source prefix per (family, proto, sport). */
struct {
	__uint(type, BPF_MAP_TYPE_LPM_TRIE);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__uint(max_entries, MAX_RULES);
	__type(key, struct snat_key);
	__type(value, struct snat_value);
} snat_rules SEC(".maps");

/* The host rules of snat_rules (/32, /128) again, in a hash keyed by the
 * same struct snat_key with prefixlen 0: one hash lookup finds the rule of a
 * backend's own address (the usual origin NAT and router NAT rule) without
 * walking a trie of thousands of entries. snat_rules stays complete: a
 * host rule missing here (state pinned by an older lbctl) is still found
 * there. */
struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__uint(max_entries, MAX_RULES);
	__type(key, struct snat_key);
	__type(value, struct snat_value);
} snat_hosts SEC(".maps");

/* The IPv4 host rules (/32) once more, with a key of 8 bytes instead of
 * 24: the hash the lookup computes over the key is most of its cost.
 * snat_hosts keeps the IPv4 host rules too, for programs of an older lbctl
 * still attached; this program reads it for IPv6 only. Used only when
 * snat_rule_counts says SNAT_KEPT_HOSTS4 or more (kept in step). */
struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__uint(max_entries, MAX_RULES);
	__type(key, struct snat_host4_key);
	__type(value, struct snat_value);
} snat_hosts4 SEC(".maps");

/* The IPv4 rules of prefix length HOST4_MIN_BITS (24) to 32, expanded
 * into an open-addressed table the program probes itself: one slot per key
 * (address, sport or 0, proto) such a rule covers, naming the winner for
 * that key (the longest such prefix of its sport|any and proto), so that a
 * /28 (the usual router NAT rule) is found like a host rule, without the
 * trie. Slot = multiplicative hash of the 8-byte key, then up to
 * HOST4_PROBES slots on; a slot holds a rule id, whose entry in
 * snat_host4_rules holds the rule's key, prefix mask and target (the
 * packet's key must equal the rule's under the mask). Used only when
 * snat_rule_counts says SNAT_KEPT_TABLE4; snat_hosts4 and the trie
 * otherwise.
 *
 * Programs read while user space writes. User space writes a rule's entry
 * before any slot names it; changes a slot with one 4-byte store (the map
 * is mmapped: a program sees the old or the new winner, both right for a
 * moment); marks a key that no rule of the table covers any more
 * HOST4_SLOT_DELETED (a probe goes on past it; slots become empty again
 * only in a rebuild, done while the counts say SNAT_KEPT_HOSTS4, a grace
 * period after saying so); and rewrites a deleted rule's entry only a
 * grace period after the delete. */
struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(map_flags, BPF_F_MMAPABLE);
	__uint(max_entries, HOST4_SLOTS);
	__type(key, __u32);
	__type(value, struct snat_host4_slot);
} snat_host4_slots SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, MAX_RULES);
	__type(key, __u32);
	__type(value, struct snat_host4_rule);
} snat_host4_rules SEC(".maps");

/* Rule counts by kind (one slot), kept by user space under the state's
 * lock, so that the program skips lookups that cannot match. Without kept
 * (state from an lbctl that kept no counts) snat_hosts is skipped and
 * snat_rules, which holds every rule, decides alone: always correct. */
struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, struct snat_kind_counts);
} snat_rule_counts SEC(".maps");

/* Packets and bytes rewritten by each rule, indexed by snat_value.rule_id. */
struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, MAX_RULES);
	__type(key, __u32);
	__type(value, struct rule_stats);
} snat_rule_stats SEC(".maps");

/* The packets and bytes (summed over CPUs) each rule id had in
 * snat_rule_stats when the rule now holding it was added: the rule's own
 * counts are the difference. snat_rule_stats is never reset, so that the
 * packets of every id ever used sum to the packets rewritten (see
 * snat_rewritten). Written by user space only; this program never reads it. */
struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, MAX_RULES);
	__type(key, __u32);
	__type(value, struct rule_stats);
} snat_rule_base SEC(".maps");

/* How user space derives the rewritten count (one slot): this program
 * counts rewritten packets per rule only. Written by user space only. */
struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, struct snat_rewritten_base);
} snat_rewritten SEC(".maps");

/* Program counters, indexed by enum snat_counter. */
struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, SNAT_COUNTER_MAX);
	__type(key, __u32);
	__type(value, __u64);
} snat_counters SEC(".maps");

/* Source given to the first fragment of each fragmented datagram, so that
 * the later fragments (which carry no ports) get the very same source. */
struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__uint(max_entries, MAX_FRAGS);
	__type(key, struct snat_frag_key);
	__type(value, struct snat_frag_value);
} snat_frags SEC(".maps");

/* 1: the L4 checksum always through bpf_l4_csum_replace, as on a kernel
 * without bpf_cast_to_kern_ctx (set by the tests of that path). */
volatile const __u8 snat_csum_helper = 0;

/* Puts enum snat_counter into the BTF (array keys must be plain __u32), so
 * that bpf2go mirrors it in Go. Never read. */
const enum snat_counter *snat_counter_btf __attribute__((unused));

static __always_inline void count(enum snat_counter idx)
{
	__u64 *c = bpf_map_lookup_elem(&snat_counters, &idx);

	if (c)
		*c += 1;
}

static __always_inline void count_rule(__u32 rule_id, __u32 len)
{
	struct rule_stats *s = bpf_map_lookup_elem(&snat_rule_stats, &rule_id);

	if (s) {
		s->packets += 1;
		s->bytes += len;
	}
}

static __always_inline struct snat_value *rule_lookup(const struct pkt *p, __be16 sport)
{
	struct snat_key key = {
		.prefixlen = SNAT_KEY_FIXED_BITS + 128,
		.family = p->family,
		.proto = p->proto,
		.sport = sport,
	};

	__builtin_memcpy(key.addr, p->saddr, sizeof(key.addr));
	return bpf_map_lookup_elem(&snat_rules, &key);
}

/* host4_table_lookup finds the winning IPv4 rule (HOST4_MIN_BITS..32) for
 * k (struct snat_host4_key as a little-endian u64) in snat_host4_slots. */
static __always_inline struct snat_value *host4_table_lookup(__u64 k)
{
	__u32 h = (k * HOST4_HASH_MUL) >> (64 - HOST4_SLOTS_BITS);

#pragma unroll
	for (int i = 0; i < HOST4_PROBES; i++) {
		__u32 idx = (h + i) & (HOST4_SLOTS - 1);
		struct snat_host4_slot *s = bpf_map_lookup_elem(&snat_host4_slots, &idx);

		if (!s)
			return NULL;
		__u32 v = s->rule;

		if (v == HOST4_SLOT_EMPTY)
			return NULL;
		if (v == HOST4_SLOT_DELETED)
			continue;
		__u32 id = v - 1;
		struct snat_host4_rule *e = bpf_map_lookup_elem(&snat_host4_rules, &id);
		__u64 ek, m;

		if (!e)
			continue;
		__builtin_memcpy(&ek, &e->key, sizeof(ek));
		m = e->mask;
		if ((k & m) == ek)
			return &e->value;
	}
	return NULL;
}

/* table4_match returns p's rule from the probed table, or NULL when no
 * rule of the table covers p. port_rules, any_rules: whether IPv4 port
 * and any-port rules /24../32 exist (kept's flags). A hit beats every rule
 * not in the table (all shorter). */
static __always_inline struct snat_value *table4_match(const struct pkt *p, __u32 port_rules, __u32 any_rules)
{
	struct snat_value *exact = NULL, *any = NULL;
	__u32 a;

	__builtin_memcpy(&a, p->saddr, sizeof(a));
	__u64 k = (__u64)a | (__u64)p->proto << 48;

	if (p->sport && port_rules) {
		exact = host4_table_lookup(k | (__u64)p->sport << 32);
		/* A host rule for the port cannot be beaten. */
		if (exact && exact->src_len == 32)
			return exact;
	}
	if (any_rules)
		any = host4_table_lookup(k);
	if (exact && (!any || exact->src_len >= any->src_len))
		return exact;
	return any;
}

static __always_inline struct snat_value *host_lookup(const struct pkt *p, __be16 sport)
{
	if (p->family == SNAT_FAMILY_V4) {
		struct snat_host4_key k4 = {
			.sport = sport,
			.proto = p->proto,
		};

		__builtin_memcpy(&k4.addr, p->saddr, sizeof(k4.addr));
		return bpf_map_lookup_elem(&snat_hosts4, &k4);
	}

	struct snat_key key = {
		.family = p->family,
		.proto = p->proto,
		.sport = sport,
	};

	__builtin_memcpy(key.addr, p->saddr, sizeof(key.addr));
	return bpf_map_lookup_elem(&snat_hosts, &key);
}

/* rule_match returns the rule for p: the longest source prefix among the
 * rules for p's source port and the any-port rules; on equal prefixes the
 * rule naming the port wins. IPv4 with the probed table kept: the table
 * first (every rule /24../32, expanded), the trie only when it has no rule
 * for p and shorter prefixes exist (kept's SNAT_KEPT_T4_* flags). Else host rules first (snat_hosts4
 * for IPv4, snat_hosts for IPv6): a host rule for the port cannot be
 * beaten, and an any-port host rule only by that one. The trie is walked
 * only for the kinds of prefix rule that exist. */
static __always_inline struct snat_value *rule_match(const struct pkt *p)
{
	struct snat_value *exact = NULL, *any = NULL;
	__u32 zero = 0, port_prefixes = 1, any_prefixes = 1;
	struct snat_kind_counts *n = bpf_map_lookup_elem(&snat_rule_counts, &zero);
	/* Copied out: n is not kept live (spilled) across the lookups. */
	__u32 kept = n ? n->kept : 0;

	if (p->family == SNAT_FAMILY_V4 && (kept & SNAT_KEPT_LEVEL) == SNAT_KEPT_TABLE4) {
		struct snat_value *r = table4_match(p, kept & SNAT_KEPT_T4_PORT, kept & SNAT_KEPT_T4_ANY);

		if (r)
			return r;
		port_prefixes = kept & SNAT_KEPT_T4_PORT_SHORT;
		any_prefixes = kept & SNAT_KEPT_T4_ANY_SHORT;
		goto trie;
	}
	/* IPv4 host rules are in snat_hosts4 only if this lbctl keeps the
	 * counts; else the trie (always complete) decides. */
	if (n && (kept >= SNAT_KEPT_HOSTS4 || (kept && p->family == SNAT_FAMILY_V6))) {
		__u32 any_hosts = n->any_hosts;

		port_prefixes = n->port_prefixes;
		any_prefixes = n->any_prefixes;
		if (p->sport && n->port_hosts) {
			exact = host_lookup(p, p->sport);
			if (exact)
				return exact;
		}
		if (any_hosts) {
			any = host_lookup(p, 0);
			if (any)
				return any;
		}
		/* Every host rule of p's family is in the host tables: the trie
		 * can only add prefix rules (port_prefixes, any_prefixes). */
	}
trie:
	if (p->sport && port_prefixes) {
		exact = rule_lookup(p, p->sport);
		/* A host prefix (/32, /128) cannot be beaten: skip the 2nd lookup. */
		if (exact && exact->src_len == (p->family == SNAT_FAMILY_V4 ? 32 : 128))
			return exact;
	}
	if (any_prefixes)
		any = rule_lookup(p, 0);
	if (exact && (!any || exact->src_len >= any->src_len))
		return exact;
	return any;
}

static __always_inline void frag_key(const struct pkt *p, struct snat_frag_key *k)
{
	k->family = p->family;
	k->proto = p->proto;
	k->id = p->frag_id;
	__builtin_memcpy(k->saddr, p->saddr, sizeof(k->saddr));
	__builtin_memcpy(k->daddr, p->daddr, sizeof(k->daddr));
}

/* What snat decided, for lbctl trace (nothing without LBCTL_TRACE). */
#define TRACE_SNAT(skb, p, decision, to, to_port) TRACE_TC(skb, p, TRACE_PROG_SNAT, decision, to, to_port)

static __always_inline int set_saddr(struct __sk_buff *skb, const struct pkt *p, const __u8 *to)
{
	if (p->family == SNAT_FAMILY_V4) {
		__be32 to4;

		__builtin_memcpy(&to4, to, sizeof(to4));
		return set_saddr4(skb, p, to4);
	}
	return set_saddr6(skb, p, to);
}

/* frag_remember records the source the first fragment p got (to, by rule
 * rule_id) for the later fragments of its datagram. */
static __always_inline void frag_remember(const struct pkt *p, const __u8 *to, __u32 rule_id)
{
	struct snat_frag_key fk = {};
	struct snat_frag_value fv = {};

	frag_key(p, &fk);
	__builtin_memcpy(fv.addr, to, sizeof(fv.addr));
	fv.rule_id = rule_id;
	bpf_map_update_elem(&snat_frags, &fk, &fv, BPF_ANY);
}

/* snat_later_fragment handles a fragment without the L4 header: it gets
 * the source the first fragment got, else an any-port rule's. A function
 * of its own (rare packets: the call costs nothing that matters): inlined,
 * clang merged its IPv4 and IPv6 address writes into one packet pointer
 * plus a register offset, which the verifier refuses without CAP_PERFMON. */
static __noinline int snat_later_fragment(struct __sk_buff *skb, const struct pkt *p, __u32 len)
{
	struct snat_frag_key fk = {};
	struct snat_frag_value fv = {};

	frag_key(p, &fk);
	struct snat_frag_value *seen = bpf_map_lookup_elem(&snat_frags, &fk);

	if (seen) {
		fv = *seen;
	} else {
		struct snat_value *r = rule_lookup(p, 0);

		if (!r) {
			count(SNAT_NO_MATCH);
			TRACE_SNAT(skb, p, TRACE_NO_RULE, NULL, 0);
			return TC_ACT_UNSPEC;
		}
		__builtin_memcpy(fv.addr, r->addr, sizeof(fv.addr));
		fv.rule_id = r->rule_id;
	}
	if (set_saddr(skb, p, fv.addr)) {
		count(SNAT_ERRORS);
		TRACE_SNAT(skb, p, TRACE_ERROR, fv.addr, 0);
		return TC_ACT_UNSPEC;
	}
	/* SNAT_REWRITTEN is not counted: count_rule is (snat_rewritten). */
	count(SNAT_FRAGMENTS);
	TRACE_SNAT(skb, p, TRACE_REWRITTEN, fv.addr, 0);
	count_rule(fv.rule_id, len);
	return TC_ACT_UNSPEC;
}

/* csum_inline returns skb->ip_summed if p's rewrite can skip
 * bpf_l4_csum_replace (csum.h), -1 if not: the L4 header must be at a
 * constant offset (no IPv4 options, no IPv6 fragment header) and ip_summed
 * one the program follows (not CHECKSUM_COMPLETE, not unknown). */
static __always_inline int csum_inline(struct __sk_buff *skb, const struct pkt *p)
{
	if (snat_csum_helper)
		return -1;
	if (p->l4_off != ETH_HLEN + (p->family == SNAT_FAMILY_V4 ? sizeof(struct iphdr) : sizeof(struct ipv6hdr)))
		return -1;
	int summed = skb_ip_summed(skb);

	if (summed == LBCTL_CHECKSUM_NONE || summed == LBCTL_CHECKSUM_UNNECESSARY ||
	    summed == LBCTL_CHECKSUM_PARTIAL)
		return summed;
	return -1;
}

/* Attached at TC egress (tcx, or clsact + cls_bpf direct action) of the
 * interfaces replies leave by. Decides whether a reply's source address and
 * port are rewritten by an SNAT rule (DSR router/origin NAT); every packet
 * is passed, rewritten or untouched, never dropped. */
SEC("tc")
int snat_egress(struct __sk_buff *skb)
{
	struct pkt p = {};
	__u32 len = skb->len;

	/* SNAT_SEEN is not counted here: every packet ends in exactly one of
	 * rewritten, no_match, not_parsed, errors, and lbctl sums those (one
	 * per-CPU counter update fewer per packet). Nor is SNAT_REWRITTEN
	 * (below). */
	if (parse_l3l4(skb, &p) < 0) {
		count(SNAT_NOT_PARSED);
		TRACE_SNAT(skb, &p, TRACE_NOT_PARSED, NULL, 0);
		return TC_ACT_UNSPEC;
	}
	if (p.frag == FRAG_LATER)
		return snat_later_fragment(skb, &p, len);

	struct snat_value *r = rule_match(&p);

	if (!r) {
		count(SNAT_NO_MATCH);
		TRACE_SNAT(skb, &p, TRACE_NO_RULE, NULL, 0);
		return TC_ACT_UNSPEC;
	}
	/* r points into the map (stays valid through the helpers below,
	 * which invalidate packet pointers only). addr starts struct
	 * snat_value, 4-byte aligned: said here, the copies of the address
	 * below take 32-bit loads instead of byte loads and shifts. */
	const __u8 *to = __builtin_assume_aligned(r->addr, 4);
	__be16 to_port = r->port;
	__u32 rule_id = r->rule_id;

	if (p.frag == FRAG_FIRST)
		frag_remember(&p, to, rule_id);
	int summed = csum_inline(skb, &p);

	/* rewrite_inline fails only before writing anything: the helpers then. */
	if (summed >= 0 && !rewrite_inline(skb, &p, to, to_port, summed))
		goto rewritten;
	/* Port first: set_sport reads p.sport, set_saddr p.saddr, both unchanged. */
	if (to_port && to_port != p.sport && set_sport(skb, &p, to_port)) {
		count(SNAT_ERRORS);
		TRACE_SNAT(skb, &p, TRACE_ERROR, to, to_port);
		return TC_ACT_UNSPEC;
	}
	if (set_saddr(skb, &p, to)) {
		count(SNAT_ERRORS);
		TRACE_SNAT(skb, &p, TRACE_ERROR, to, to_port);
		return TC_ACT_UNSPEC;
	}
rewritten:
	/* SNAT_REWRITTEN is not counted: every rewritten packet is counted
	 * by its rule, and user space sums the rules (snat_rewritten): one
	 * per-CPU counter update fewer per packet. */
	TRACE_SNAT(skb, &p, TRACE_REWRITTEN, to, to_port);
	count_rule(rule_id, len);
	return TC_ACT_UNSPEC;
}
