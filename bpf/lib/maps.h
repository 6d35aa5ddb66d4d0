/* SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause) */
/* Map keys, values and counter indices shared between the BPF programs and
 * Go. pkg/dataplane gets its Go types from these structs through bpf2go
 * (-type), so a change here is a change of the Go API: regenerate. Every
 * field keeps network byte order, as on the wire. */
#ifndef LBCTL_MAPS_H
#define LBCTL_MAPS_H

#include <linux/types.h>

/* Number of SNAT rules (LPM trie entries and per-rule counter slots). */
#ifndef MAX_RULES
#define MAX_RULES 16384
#endif

/* Fragmented datagrams whose first fragment was rewritten and whose later
 * fragments are still expected (LRU: the oldest are forgotten first). */
#ifndef MAX_FRAGS
#define MAX_FRAGS 8192
#endif

/* Families as stored in keys (not AF_*: these are wire-version numbers). */
#define SNAT_FAMILY_V4 4
#define SNAT_FAMILY_V6 6

/* Bits of struct snat_key before addr: family, proto and sport always
 * match exactly; prefixlen = SNAT_KEY_FIXED_BITS + source prefix length. */
#define SNAT_KEY_FIXED_BITS 32

/* Key of snat_rules (LPM trie). A rule matches a packet whose family and
 * L4 protocol are equal, whose source port equals sport (0: any port), and
 * whose source address is in addr/(prefixlen - SNAT_KEY_FIXED_BITS).
 * IPv4 addresses fill addr[0..3]; the rest is zero. */
struct snat_key {
	__u32 prefixlen;
	__u8 family;	/* SNAT_FAMILY_V4 or SNAT_FAMILY_V6 */
	__u8 proto;	/* IPPROTO_UDP or IPPROTO_TCP */
	__be16 sport;	/* source port to match; 0 = any */
	__u8 addr[16];	/* source prefix */
};

/* Value of snat_rules: what a matching packet's source becomes. */
struct snat_value {
	__u8 addr[16];	/* new source address, same family as the key */
	__be16 port;	/* new source port; 0 = keep the port */
	__u8 src_len;	/* the rule's source prefix length (any-port vs exact-port tie break) */
	__u8 pad;
	__u32 rule_id;	/* index into snat_rule_stats */
};

/* Key of snat_frags: one fragmented datagram, as IPv4/IPv6 identify it. */
struct snat_frag_key {
	__u8 family;
	__u8 proto;
	__u16 pad;
	__be32 id;	/* IPv4 identification (16 bits) or IPv6 fragment id */
	__u8 saddr[16];	/* original source address */
	__u8 daddr[16];
};

/* Value of snat_frags: the source the first fragment was given. */
struct snat_frag_value {
	__u8 addr[16];
	__u32 rule_id;
};

/* Key of snat_hosts4: an IPv4 host rule (/32), 8 bytes so that the hash
 * the kernel computes over the key on every lookup (jhash) is one final
 * mix instead of the three rounds a struct snat_key (24 bytes) takes. */
struct snat_host4_key {
	__be32 addr;	/* source address */
	__be16 sport;	/* source port to match; 0 = any */
	__u8 proto;	/* IPPROTO_UDP or IPPROTO_TCP */
	__u8 pad;	/* 0 */
};

/* snat_host4_slots: an open-addressed table over the IPv4 rules of
 * prefix length HOST4_MIN_BITS..32, expanded (controlled prefix expansion):
 * one slot per key (address, sport or 0 for any port, proto) that such a
 * rule covers, naming the rule that wins for that key (the longest prefix
 * of that sport|any and proto covering the address). Probed by the program
 * without a helper (array lookups are inlined). Slots: a power of 2, keys
 * at most a quarter of them. */
#ifndef HOST4_SLOTS_BITS
#define HOST4_SLOTS_BITS 16
#endif
#define HOST4_SLOTS (1 << HOST4_SLOTS_BITS)
/* Slots probed from a key's home slot: user space places every key within
 * them or stops keeping the table. */
#define HOST4_PROBES 8
#define HOST4_HASH_MUL 0x9e3779b97f4a7c15ULL
/* Shortest IPv4 prefix expanded into the table (a /24 takes 256 keys). */
#define HOST4_MIN_BITS 24
#define HOST4_SLOT_EMPTY 0		/* never used: the probe ends */
#define HOST4_SLOT_DELETED 0xffffffff	/* was used: the probe goes on */

/* Value of snat_host4_slots. Written by user space with single 4-byte
 * stores (the map is mmapped), so a program reads the old or the new
 * value, never a mix. A probe compares the packet's key with the named
 * rule's key under the rule's mask, so a slot of another key covered by
 * the same rule would match too: it never lies on the probe's path. Keys
 * one rule covers differ only in the last address byte (prefixes of
 * HOST4_MIN_BITS or more, one port and proto), and the hash spreads those
 * 256 keys at least 176 slots apart, far more than HOST4_PROBES
 * (TestHost4HomesApart checks it). */
struct snat_host4_slot {
	__u32 rule;	/* rule_id + 1, or HOST4_SLOT_EMPTY, HOST4_SLOT_DELETED */
};

/* Value of snat_host4_rules, indexed by rule_id: a rule of the table, its
 * key (masked address, sport, proto) and target. A packet's key k (struct
 * snat_host4_key as a little-endian u64) is the rule's when
 * (k & mask) == key. */
struct snat_host4_rule {
	struct snat_host4_key key __attribute__((aligned(8)));
	__u64 mask;	/* the address bits of the prefix, all of sport and proto */
	struct snat_value value;
};

/* Values of snat_kind_counts.kept. An lbctl that keeps the counts and
 * snat_hosts (both families) writes SNAT_KEPT_HOSTS; the next one also
 * keeps snat_hosts4 and writes SNAT_KEPT_HOSTS4; this one also keeps the
 * probed table (snat_host4_slots) and writes SNAT_KEPT_TABLE4, or
 * SNAT_KEPT_HOSTS4 while it rewrites the table or when a key did not fit
 * there. A program that reads SNAT_KEPT_HOSTS looks IPv4 host rules up in
 * the trie (snat_hosts4 may be stale); this program reads snat_hosts4 from
 * SNAT_KEPT_HOSTS4 up and, for IPv4, the table only at SNAT_KEPT_TABLE4
 * (with the flags below; a program of the previous lbctl, which wants
 * exactly SNAT_KEPT_HOSTS4, then takes IPv4 host rules from the trie:
 * slower, still right). Programs of every
 * kind treat any non-zero value as "counts exact, snat_hosts complete",
 * which every lbctl keeps true. */
#define SNAT_KEPT_HOSTS 1
#define SNAT_KEPT_HOSTS4 2
#define SNAT_KEPT_TABLE4 3
/* With SNAT_KEPT_TABLE4 (the low 4 bits, SNAT_KEPT_LEVEL), kept says too
 * which IPv4 lookups can match: the program reads that in the one lookup
 * it makes anyway (a map of its own would cost about 1 ns more per IPv4
 * packet). All in kept's low byte, which a program never reads half
 * written. Programs of older lbctl versions see a kept that is neither 0
 * nor SNAT_KEPT_HOSTS4: counts exact, snat_hosts complete, IPv4 from the
 * trie, as with 3 alone. The counts above keep their meaning (every
 * family, host vs prefix). */
#define SNAT_KEPT_LEVEL 0x0f
#define SNAT_KEPT_T4_PORT 0x10		/* IPv4 port rules /24../32 exist: probe (address, port) */
#define SNAT_KEPT_T4_ANY 0x20		/* IPv4 any-port rules /24../32 exist: probe (address, 0) */
#define SNAT_KEPT_T4_PORT_SHORT 0x40	/* IPv4 port rules /0../23 exist: the trie */
#define SNAT_KEPT_T4_ANY_SHORT 0x80	/* IPv4 any-port rules /0../23 exist: the trie */

/* Value of snat_rule_counts (one slot): how many rules of each kind exist,
 * so that snat skips lookups that cannot match. Kept by user space; kept is
 * 0 in state pinned by an lbctl that kept no counts, and then the program
 * looks everywhere in snat_rules, which holds every rule. */
struct snat_kind_counts {
	__u32 port_hosts;	/* host rules (/32, /128) naming a source port */
	__u32 any_hosts;	/* host rules for any port */
	__u32 port_prefixes;	/* the other rules naming a source port (only in snat_rules) */
	__u32 any_prefixes;	/* the other rules for any port (only in snat_rules) */
	__u32 kept;		/* SNAT_KEPT_*: the counts above are exact */
};

/* Value of snat_rule_stats, one slot per rule id, per CPU. */
struct rule_stats {
	__u64 packets;
	__u64 bytes;	/* skb->len: the L2 frame as the program saw it */
};

/* Value of snat_rewritten (one slot, user space only). The snat program
 * of this lbctl counts a rewritten packet in snat_rule_stats only (its
 * rule's slot), not in snat_counters[SNAT_REWRITTEN]; user space never
 * resets snat_rule_stats (snat_rule_base holds each rule's starting point
 * instead), so with kept set
 *   rewritten = offset + sum over rule ids 0..ids-1 and every CPU of
 *               snat_rule_stats.packets,
 * exact whichever rule a packet was counted for (a deleted one, a later
 * fragment's remembered one) and whichever programs ran (older ones count
 * per rule too). kept is set, and offset taken, by the first lbctl of
 * this kind to change the state: offset = snat_counters[SNAT_REWRITTEN]
 * minus that sum then, the packets whose per-rule counts an older lbctl
 * reset. kept 0: only older programs have run; snat_counters is exact. */
struct snat_rewritten_base {
	__u64 offset;
	__u32 kept;	/* 1: rewritten is derived as above */
	__u32 ids;	/* no rule id from ids up was ever given out (raised before one is): its slots are 0 */
};

/* Indices of snat_counters (per CPU). Stable: never renumber, only append
 * (appending changes the map's size: pinned state of older versions would
 * no longer load).
 * seen = rewritten + no_match + not_parsed + errors. */
enum snat_counter {
	SNAT_SEEN = 0,		/* packets the program ran on: not counted in BPF (older programs did), user space sums the next four */
	SNAT_REWRITTEN = 1,	/* source rewritten (fragments included): counted by older programs only, derived now (struct snat_rewritten) */
	SNAT_NO_MATCH = 2,	/* IPv4/IPv6 UDP/TCP, no rule matched: passed unchanged */
	SNAT_NOT_PARSED = 3,	/* not IP, not UDP/TCP, truncated, unfollowed header: passed unchanged */
	SNAT_ERRORS = 4,	/* a helper failed while rewriting: passed, maybe partly rewritten */
	SNAT_FRAGMENTS = 5,	/* later fragments rewritten (included in rewritten) */
	SNAT_COUNTER_MAX,
};

/* ---- xdp_lb: the XDP load balancer (bpf/xdp_lb.c) ---- */

/* Services (VIP:port + protocol), backends over all services, Maglev
 * table size (a prime; every table has exactly this many slots), and
 * TCP flows remembered by the connection table (LRU). */
#ifndef XDP_MAX_SERVICES
#define XDP_MAX_SERVICES 256
#endif
#ifndef XDP_MAX_BACKENDS
#define XDP_MAX_BACKENDS 4096
#endif
#ifndef XDP_TABLE_SIZE
#define XDP_TABLE_SIZE 65537
#endif
#ifndef XDP_MAX_FLOWS
#define XDP_MAX_FLOWS 131072
#endif

/* A table slot holding no backend (no backend eligible): packets dropped. */
#define XDP_NO_BACKEND 0xffffffff

/* Key of xdp_services: a VIP, port and protocol. IPv4 fills addr[0..3]. */
struct xdp_service_key {
	__u8 family;	/* SNAT_FAMILY_V4 or SNAT_FAMILY_V6 */
	__u8 proto;	/* IPPROTO_UDP or IPPROTO_TCP */
	__be16 port;	/* VIP port */
	__u8 addr[16];	/* VIP */
};

/* Value of xdp_services. */
struct xdp_service {
	__u32 id;	/* index into xdp_tables and xdp_service_stats */
	__u32 gen;	/* generation of the table in xdp_tables[id]; user space only */
};

/* Flags of struct xdp_backend. */
#define XDP_BACKEND_ACTIVE 1	/* configured (up or down); flows to it are kept */

/* Value of xdp_backends, indexed by backend id. */
struct xdp_backend {
	__u8 addr[16];	/* new destination; IPv4 fills addr[0..3] */
	__be16 port;	/* new destination port */
	__u8 family;
	__u8 flags;	/* XDP_BACKEND_* */
	__u32 service;	/* id of the service it belongs to (user space bookkeeping) */
};

/* Key of xdp_flows (TCP connection table). */
struct xdp_flow_key {
	__u8 family;
	__u8 proto;
	__be16 sport;
	__be16 dport;
	__u16 pad;
	__u8 saddr[16];
	__u8 daddr[16];
};

/* Value of xdp_flows. */
struct xdp_flow {
	__u32 backend;	/* backend id */
	__u32 pad;
};

/* Value of xdp_fib_cache (per CPU), indexed by backend id: the next hop
 * bpf_fib_lookup gave for the backend, valid until expires (jiffies). */
struct xdp_fib_entry {
	__u64 expires;
	__u32 in_ifindex;	/* the lookup was made for packets arriving here */
	__u32 out_ifindex;
	__u8 smac[6];
	__u8 dmac[6];
};

/* Indices of xdp_counters (per CPU). Stable: never renumber, only append.
 * seen = passed + tx + redirected + dropped + fib_miss + fragments + unsupported + errors. */
enum xdp_counter {
	XDP_C_SEEN = 0,		/* packets the program ran on: never counted in BPF, user space sums the rest */
	XDP_C_PASSED = 1,	/* not for a VIP (or not parsed): passed untouched */
	XDP_C_TX = 2,		/* rewritten, sent back out of the same interface */
	XDP_C_REDIRECTED = 3,	/* rewritten, redirected to another interface */
	XDP_C_DROPPED = 4,	/* for a VIP with no eligible backend */
	XDP_C_FIB_MISS = 5,	/* rewritten, no next hop known: passed to the stack to route */
	XDP_C_FRAGMENTS = 6,	/* a fragment of a VIP datagram: passed untouched */
	XDP_C_UNSUPPORTED = 7,	/* for a VIP but IPv4 options / IPv6 extension headers: passed untouched */
	XDP_C_FLOW_HIT = 8,	/* TCP packet sent to the backend its flow already had */
	XDP_C_FLOW_NEW = 9,	/* TCP flow entered into xdp_flows */
	XDP_C_ERRORS = 10,	/* redirect refused or a rewrite failed: passed */
	XDP_C_COUNTER_MAX,
};

/* Upstreams whose return traffic the steer program marks for local
 * delivery (entries of steer_upstreams). */
#ifndef MAX_STEER_UPSTREAMS
#define MAX_STEER_UPSTREAMS 4096
#endif

/* Key of steer_upstreams: one upstream address:port of one protocol, as
 * the source of the packets it sends back. IPv4 addresses fill addr[0..3]. */
struct steer_key {
	__u8 family;	/* SNAT_FAMILY_V4 or SNAT_FAMILY_V6 */
	__u8 proto;	/* IPPROTO_UDP or IPPROTO_TCP */
	__be16 port;	/* the upstream's port */
	__u8 addr[16];	/* the upstream's address */
};

/* Value of steer_upstreams: packets from that upstream that were marked
 * (one value per CPU, summed by user space). A doctor reads it to tell "the
 * upstream never answered through the LB" from "it answered". */
struct steer_value {
	__u64 packets;
};

/* Indices of steer_counters (per CPU). Stable: never renumber, only append.
 * seen = steered + not_matched + not_parsed; no_socket counts steered
 * packets for which the socket check found no socket (only when enabled). */
enum steer_counter {
	STEER_SEEN = 0,		/* packets the program ran on */
	STEER_STEERED = 1,	/* from a configured upstream: marked for local delivery */
	STEER_NOT_MATCHED = 2,	/* IPv4/IPv6 UDP/TCP from no configured upstream: untouched */
	STEER_NOT_PARSED = 3,	/* not IP, not UDP/TCP, truncated, unfollowed header: untouched */
	STEER_NO_SOCKET = 4,	/* steered, but no local socket has that 4-tuple (socket check on) */
	STEER_FRAGMENTS = 5,	/* later fragments steered through their first fragment (in steered) */
	STEER_COUNTER_MAX,
};

#endif /* LBCTL_MAPS_H */
