/* SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause) */
/* Per-packet trace events for `lbctl trace`. The event layout and the
 * decision codes are always defined (Go mirrors them through bpf2go); the
 * ring buffer, the filter and trace_emit() exist only when LBCTL_TRACE is
 * defined. pkg/dataplane compiles each program twice, without and with
 * LBCTL_TRACE, and swaps the tracing object in with link.Update only while
 * lbctl trace runs: the programs attached normally carry no tracing code,
 * not even a branch. */
#ifndef LBCTL_TRACE_H
#define LBCTL_TRACE_H

#include <linux/types.h>

/* The program that saw the packet. Stable: never renumber. */
enum trace_prog {
	TRACE_PROG_SNAT = 1,	/* tc egress source rewrite */
	TRACE_PROG_STEER = 2,	/* tc ingress steer to transparent sockets */
	TRACE_PROG_XDP = 3,	/* xdp_lb */
};

/* What the program decided, and why. Stable: never renumber, only append. */
enum trace_decision {
	TRACE_REWRITTEN = 1,	/* address/port rewritten (new_addr, new_port) */
	TRACE_NO_RULE = 2,	/* no rule or service matched: passed unchanged */
	TRACE_NOT_PARSED = 3,	/* not IP UDP/TCP, truncated, unfollowed header: passed */
	TRACE_ERROR = 4,	/* a helper failed: passed, maybe partly rewritten */
	TRACE_NO_SOCKET = 5,	/* no socket to deliver to: passed */
	TRACE_FIB_MISS = 6,	/* no route or neighbour for the rewritten packet: passed to the stack */
	TRACE_STEERED = 7,	/* delivered to a local socket */
	TRACE_DROPPED = 8,	/* dropped */
	TRACE_PASSED = 9,	/* passed to the stack unchanged (fragment, unsupported header) */
};

/* One event in the ring buffer. Addresses in network order; IPv4 fills the
 * first 4 bytes. */
struct trace_event {
	__u64 ts_ns;		/* bpf_ktime_get_ns() */
	__u32 ifindex;
	__u32 len;		/* packet length as the program saw it */
	__u8 prog;		/* enum trace_prog */
	__u8 decision;		/* enum trace_decision */
	__u8 family;		/* 4 or 6; 0 when not parsed */
	__u8 proto;
	__be16 sport;
	__be16 dport;
	__be16 new_port;	/* rewritten port; 0: unchanged */
	__u16 pad;
	__u8 saddr[16];
	__u8 daddr[16];
	__u8 new_addr[16];	/* rewritten address, when decision is TRACE_REWRITTEN */
};

#ifdef LBCTL_TRACE
#include <bpf/bpf_helpers.h>

/* Trace events to lbctl trace (owned by that process, never pinned). */
struct {
	__uint(type, BPF_MAP_TYPE_RINGBUF);
	__uint(max_entries, 1 << 20);
} trace_events SEC(".maps");

/* The filter lbctl trace loads the tracing object with: an address that
 * is either the source or the destination (trace_family 0: any), and a
 * port that is either port (0: any). */
volatile const __u8 trace_family = 0;
volatile const __u8 trace_addr[16] = {};
volatile const __be16 trace_port = 0;

/* Puts the enums into the BTF, so that bpf2go mirrors them. Never read. */
const struct trace_event *trace_event_btf __attribute__((unused));
const enum trace_decision *trace_decision_btf __attribute__((unused));
const enum trace_prog *trace_prog_btf __attribute__((unused));

static __always_inline int trace_addr_is(const __u8 *a)
{
#pragma unroll
	for (int i = 0; i < 16; i++)
		if (a[i] != trace_addr[i])
			return 0;
	return 1;
}

/* trace_emit sends ev to lbctl trace if it passes the filter. */
static __always_inline void trace_emit(struct trace_event *ev)
{
	if (trace_family &&
	    (ev->family != trace_family || (!trace_addr_is(ev->saddr) && !trace_addr_is(ev->daddr))))
		return;
	if (trace_port && ev->sport != trace_port && ev->dport != trace_port)
		return;
	ev->ts_ns = bpf_ktime_get_ns();
	bpf_ringbuf_output(&trace_events, ev, sizeof(*ev), 0);
}
#endif /* LBCTL_TRACE */

/* TRACE_TC reports what a TC program decided for the packet p (parsed by
 * parse.h, which must be included first): to/to_port are the rewritten
 * address and port, NULL/0 if none. Nothing at all without LBCTL_TRACE. */
#ifdef LBCTL_TRACE
static __always_inline void trace_tc(struct __sk_buff *skb, const struct pkt *p, __u8 prog, __u8 decision,
				     const __u8 *to, __be16 to_port)
{
	struct trace_event ev = {
		.ifindex = skb->ifindex,
		.len = skb->len,
		.prog = prog,
		.decision = decision,
	};

	if (decision != TRACE_NOT_PARSED) {
		ev.family = p->family;
		ev.proto = p->proto;
		ev.sport = p->sport;
		__builtin_memcpy(ev.saddr, p->saddr, sizeof(ev.saddr));
		__builtin_memcpy(ev.daddr, p->daddr, sizeof(ev.daddr));
		if (p->frag != FRAG_LATER)
			bpf_skb_load_bytes(skb, p->l4_off + 2, &ev.dport, sizeof(ev.dport));
	}
	if (to) {
		__builtin_memcpy(ev.new_addr, to, sizeof(ev.new_addr));
		ev.new_port = to_port;
	}
	trace_emit(&ev);
}
#define TRACE_TC(skb, p, prog, decision, to, to_port) trace_tc(skb, p, prog, decision, to, to_port)
#else
#define TRACE_TC(skb, p, prog, decision, to, to_port) do { } while (0)
#endif

#endif /* LBCTL_TRACE_H */
