//go:build ignore

/* SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause) */
#include <linux/bpf.h>
#include <linux/pkt_cls.h>
#include <bpf/bpf_helpers.h>

#include "maps.h"
#include "parse.h"
#include "trace.h"

char __license[] SEC("license") = "Dual BSD/GPL";

/* The fwmark given to return traffic of transparent connections; the policy
 * rule `fwmark MARK lookup TABLE` (pkg/netconf) routes it to local delivery.
 * Set at load time from the config's transparent.mark. */
volatile const __u32 steer_mark = 0x1062;

/* Non-zero: look up the local socket of every steered packet and count
 * those without one (STEER_NO_SOCKET) for doctor and trace. Costs one
 * socket-table lookup per steered packet; the verdict does not depend on it. */
volatile const __u8 steer_check_socket = 1;

/* Configured upstreams of transparent services: the address:port and
 * protocol their replies come from. The front end fills it from the config;
 * the value counts the packets marked, per CPU (no shared cache line per
 * packet). */
struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_HASH);
	__uint(max_entries, MAX_STEER_UPSTREAMS);
	__type(key, struct steer_key);
	__type(value, struct steer_value);
} steer_upstreams SEC(".maps");

/* Program counters, indexed by enum steer_counter. */
struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, STEER_COUNTER_MAX);
	__type(key, __u32);
	__type(value, __u64);
} steer_counters SEC(".maps");

/* Fragmented datagrams from an upstream whose first fragment was steered:
 * later fragments carry no ports, so they follow their first fragment.
 * The value is unused (presence is the answer). */
struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__uint(max_entries, MAX_FRAGS);
	__type(key, struct snat_frag_key);
	__type(value, __u32);
} steer_frags SEC(".maps");

/* Puts enum steer_counter into the BTF for bpf2go. Never read. */
const enum steer_counter *steer_counter_btf __attribute__((unused));

static __always_inline void count(enum steer_counter idx)
{
	__u64 *c = bpf_map_lookup_elem(&steer_counters, &idx);

	if (c)
		*c += 1;
}

static __always_inline void frag_key(const struct pkt *p, struct snat_frag_key *k)
{
	k->family = p->family;
	k->proto = p->proto;
	k->id = p->frag_id;
	__builtin_memcpy(k->saddr, p->saddr, sizeof(k->saddr));
	__builtin_memcpy(k->daddr, p->daddr, sizeof(k->daddr));
}

/* has_socket reports whether a local socket owns p's 4-tuple (the packet's
 * destination is the socket's local side). TCP finds established, request
 * and time-wait sockets too (skc lookup), UDP bound or connected ones. */
static __always_inline int has_socket(struct __sk_buff *skb, const struct pkt *p)
{
	struct bpf_sock_tuple t = {};
	struct bpf_sock *sk;

	if (p->family == SNAT_FAMILY_V4) {
		__builtin_memcpy(&t.ipv4.saddr, p->saddr, 4);
		__builtin_memcpy(&t.ipv4.daddr, p->daddr, 4);
		t.ipv4.sport = p->sport;
		t.ipv4.dport = p->dport;
		if (p->proto == IPPROTO_TCP)
			sk = bpf_skc_lookup_tcp(skb, &t, sizeof(t.ipv4), BPF_F_CURRENT_NETNS, 0);
		else
			sk = bpf_sk_lookup_udp(skb, &t, sizeof(t.ipv4), BPF_F_CURRENT_NETNS, 0);
	} else {
		__builtin_memcpy(t.ipv6.saddr, p->saddr, 16);
		__builtin_memcpy(t.ipv6.daddr, p->daddr, 16);
		t.ipv6.sport = p->sport;
		t.ipv6.dport = p->dport;
		if (p->proto == IPPROTO_TCP)
			sk = bpf_skc_lookup_tcp(skb, &t, sizeof(t.ipv6), BPF_F_CURRENT_NETNS, 0);
		else
			sk = bpf_sk_lookup_udp(skb, &t, sizeof(t.ipv6), BPF_F_CURRENT_NETNS, 0);
	}
	if (!sk)
		return 0;
	bpf_sk_release(sk);
	return 1;
}

/* Attached at TC ingress (tcx, or clsact + cls_bpf direct action) of the
 * load balancer's upstream-facing interfaces. Decides whether a packet is
 * return traffic of a transparent connection: its source is a configured
 * upstream address:port (steer_upstreams). Such packets are addressed to
 * the client, not to the LB, so they get steer_mark, which the policy rule
 * routes to local delivery where the transparent socket takes them. Every
 * packet is passed (TC_ACT_UNSPEC); only skb->mark ever changes. */
SEC("tc")
int steer_ingress(struct __sk_buff *skb)
{
	struct pkt p = {};
	struct snat_frag_key fk = {};

	count(STEER_SEEN);
	if (parse_l3l4(skb, &p) < 0) {
		count(STEER_NOT_PARSED);
		TRACE_TC(skb, &p, TRACE_PROG_STEER, TRACE_NOT_PARSED, NULL, 0);
		return TC_ACT_UNSPEC;
	}

	if (p.frag == FRAG_LATER) {
		frag_key(&p, &fk);
		if (!bpf_map_lookup_elem(&steer_frags, &fk)) {
			count(STEER_NOT_MATCHED);
			TRACE_TC(skb, &p, TRACE_PROG_STEER, TRACE_NO_RULE, NULL, 0);
			return TC_ACT_UNSPEC;
		}
		skb->mark = steer_mark;
		count(STEER_STEERED);
		count(STEER_FRAGMENTS);
		TRACE_TC(skb, &p, TRACE_PROG_STEER, TRACE_STEERED, NULL, 0);
		return TC_ACT_UNSPEC;
	}

	struct steer_key key = {
		.family = p.family,
		.proto = p.proto,
		.port = p.sport,
	};

	__builtin_memcpy(key.addr, p.saddr, sizeof(key.addr));
	struct steer_value *up = bpf_map_lookup_elem(&steer_upstreams, &key);

	if (!up) {
		count(STEER_NOT_MATCHED);
		TRACE_TC(skb, &p, TRACE_PROG_STEER, TRACE_NO_RULE, NULL, 0);
		return TC_ACT_UNSPEC;
	}
	up->packets += 1;
	if (p.frag == FRAG_FIRST) {
		__u32 one = 1;

		frag_key(&p, &fk);
		bpf_map_update_elem(&steer_frags, &fk, &one, BPF_ANY);
	}
	skb->mark = steer_mark;
	count(STEER_STEERED);
	if (steer_check_socket && !has_socket(skb, &p)) {
		count(STEER_NO_SOCKET);
		TRACE_TC(skb, &p, TRACE_PROG_STEER, TRACE_NO_SOCKET, NULL, 0);
		return TC_ACT_UNSPEC;
	}
	TRACE_TC(skb, &p, TRACE_PROG_STEER, TRACE_STEERED, NULL, 0);
	return TC_ACT_UNSPEC;
}
