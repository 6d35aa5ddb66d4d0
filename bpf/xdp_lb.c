//go:build ignore

/* SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause) */
#include <linux/bpf.h>
#include <linux/if_ether.h>
#include <linux/in.h>
#include <linux/ip.h>
#include <linux/ipv6.h>
#include <linux/tcp.h>
#include <linux/udp.h>
#include <bpf/bpf_endian.h>
#include <bpf/bpf_helpers.h>

#include "maps.h"
#include "parse.h"
#include "csum.h"
#include "trace.h"

char __license[] SEC("license") = "Dual BSD/GPL";

#ifndef AF_INET
#define AF_INET 2
#endif
#ifndef AF_INET6
#define AF_INET6 10
#endif

/* How long a next hop from bpf_fib_lookup is reused for a backend, per CPU,
 * in jiffies (0: look it up for every packet). 256 jiffies are 0.26 s to
 * 1 s depending on CONFIG_HZ. Jiffies, not bpf_ktime_get_ns: reading the
 * clock costs about as much as the lookup it would save. */
volatile const __u64 fib_cache_jiffies = 256;

/* Services: VIP, port and protocol -> service id (and table generation). */
struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, XDP_MAX_SERVICES);
	__type(key, struct xdp_service_key);
	__type(value, struct xdp_service);
} xdp_services SEC(".maps");

/* Ports some service listens on (host order index, 1 = in use): the first
 * check of every packet, an inlined array access, so traffic to other
 * ports skips the service hash lookup. */
struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, 65536);
	__type(key, __u32);
	__type(value, __u8);
} xdp_ports SEC(".maps");

/* One Maglev lookup table per service id: slot -> backend id (or
 * XDP_NO_BACKEND). User space fills a fresh inner array and swaps it in
 * with one update of the outer slot, so a packet sees the old table or the
 * new one, never a half-written one. */
struct xdp_table {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, XDP_TABLE_SIZE);
	__type(key, __u32);
	__type(value, __u32);
};

struct {
	__uint(type, BPF_MAP_TYPE_ARRAY_OF_MAPS);
	__uint(max_entries, XDP_MAX_SERVICES);
	__type(key, __u32);
	__array(values, struct xdp_table);
} xdp_tables SEC(".maps");

/* Backends of every service, by backend id: the new destination. */
struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, XDP_MAX_BACKENDS);
	__type(key, __u32);
	__type(value, struct xdp_backend);
} xdp_backends SEC(".maps");

/* TCP connection table: 5-tuple -> backend, so that an established flow
 * keeps its backend when the service's table changes. */
struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__uint(max_entries, XDP_MAX_FLOWS);
	__type(key, struct xdp_flow_key);
	__type(value, struct xdp_flow);
} xdp_flows SEC(".maps");

/* Next hop per backend, per CPU (see fib_cache_jiffies). */
struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, XDP_MAX_BACKENDS);
	__type(key, __u32);
	__type(value, struct xdp_fib_entry);
} xdp_fib_cache SEC(".maps");

/* Interfaces packets may be redirected to (ifindex -> ifindex); an egress
 * interface missing here is redirected to with bpf_redirect instead. */
struct {
	__uint(type, BPF_MAP_TYPE_DEVMAP_HASH);
	__uint(max_entries, 64);
	__type(key, __u32);
	__type(value, __u32);
} xdp_tx_ports SEC(".maps");

/* Packets and bytes forwarded per service id and per backend id. */
struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, XDP_MAX_SERVICES);
	__type(key, __u32);
	__type(value, struct rule_stats);
} xdp_service_stats SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, XDP_MAX_BACKENDS);
	__type(key, __u32);
	__type(value, struct rule_stats);
} xdp_backend_stats SEC(".maps");

/* Program counters, indexed by enum xdp_counter. */
struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, XDP_C_COUNTER_MAX);
	__type(key, __u32);
	__type(value, __u64);
} xdp_counters SEC(".maps");

/* Puts enum xdp_counter into the BTF for bpf2go. Never read. */
const enum xdp_counter *xdp_counter_btf __attribute__((unused));

static __always_inline int count(enum xdp_counter idx, int verdict)
{
	__u64 *c = bpf_map_lookup_elem(&xdp_counters, &idx);

	if (c)
		*c += 1;
	return verdict;
}

static __always_inline void count_bytes(void *map, __u32 id, __u32 len)
{
	struct rule_stats *s = bpf_map_lookup_elem(map, &id);

	if (s) {
		s->packets += 1;
		s->bytes += len;
	}
}

/* What the parser learnt about a frame headed for a VIP. */
struct lbpkt {
	struct xdp_flow_key flow;	/* family, proto, ports, addresses */
	__u8 tcp_syn;			/* SYN without ACK: a new connection */
	__u8 unsupported;		/* IPv4 options or IPv6 extension headers */
	__u8 fragment;			/* any fragment of a datagram */
};

#ifdef LBCTL_TRACE
/* trace_xdp reports what xdp_lb decided for p (lbctl trace); b is the
 * backend the destination was rewritten to, if any. */
static __always_inline void trace_xdp(struct xdp_md *ctx, const struct lbpkt *p, __u8 decision,
				      const struct xdp_backend *b, __u32 len)
{
	struct trace_event ev = {
		.ifindex = ctx->ingress_ifindex,
		.len = len,
		.prog = TRACE_PROG_XDP,
		.decision = decision,
		.family = p->flow.family,
		.proto = p->flow.proto,
		.sport = p->flow.sport,
		.dport = p->flow.dport,
	};

	__builtin_memcpy(ev.saddr, p->flow.saddr, sizeof(ev.saddr));
	__builtin_memcpy(ev.daddr, p->flow.daddr, sizeof(ev.daddr));
	if (b) {
		__builtin_memcpy(ev.new_addr, b->addr, sizeof(ev.new_addr));
		ev.new_port = b->port;
	}
	trace_emit(&ev);
}
#define TRACE_XDP(ctx, p, decision, b, len) trace_xdp(ctx, p, decision, b, len)
#else
#define TRACE_XDP(ctx, p, decision, b, len) do { } while (0)
#endif

static __always_inline __u32 rol32(__u32 x, int r) { return (x << r) | (x >> (32 - r)); }

/* murmur3's mixing of one 32-bit word into h. */
static __always_inline __u32 mix(__u32 h, __u32 k)
{
	k *= 0xcc9e2d51;
	k = rol32(k, 15);
	k *= 0x1b873593;
	h ^= k;
	h = rol32(h, 13);
	return h * 5 + 0xe6546b64;
}

/* flow_hash hashes the 5-tuple, so the flows of one client spread over the
 * backends and every packet of one flow lands on the same slot. */
static __always_inline __u32 flow_hash(const struct xdp_flow_key *f)
{
	__u32 h = 0x9747b28c, w;

#pragma unroll
	for (int i = 0; i < 16; i += 4) {
		__builtin_memcpy(&w, f->saddr + i, 4);
		h = mix(h, w);
	}
	h = mix(h, ((__u32)f->sport << 16) | f->dport);
	h = mix(h, f->proto);
	h ^= h >> 16;
	h *= 0x85ebca6b;
	h ^= h >> 13;
	h *= 0xc2b2ae35;
	h ^= h >> 16;
	return h;
}

/* parse reads the headers of a frame; returns 0 when it is IPv4/IPv6
 * UDP/TCP with its ports read (or flags set in p for a fragment or an
 * unsupported header), < 0 when it is anything else. Packet pointers move by
 * constants only (see parse.h). */
static __always_inline int parse(struct xdp_md *ctx, struct lbpkt *p)
{
	void *data = (void *)(long)ctx->data;
	void *data_end = (void *)(long)ctx->data_end;
	struct ethhdr *eth = data;
	void *l4;

	if ((void *)(eth + 1) > data_end)
		return PARSE_SHORT;
	if (eth->h_proto == bpf_htons(ETH_P_IP)) {
		struct iphdr *ip = (void *)(eth + 1);

		if ((void *)(ip + 1) > data_end)
			return PARSE_SHORT;
		if (ip->version != 4 || ip->ihl < 5)
			return PARSE_OTHER;
		if (ip->protocol != IPPROTO_UDP && ip->protocol != IPPROTO_TCP)
			return PARSE_OTHER;
		p->flow.family = SNAT_FAMILY_V4;
		p->flow.proto = ip->protocol;
		__builtin_memcpy(p->flow.saddr, &ip->saddr, 4);
		__builtin_memcpy(p->flow.daddr, &ip->daddr, 4);
		if (ip->frag_off & bpf_htons(IP_MF | IP_OFFSET))
			p->fragment = 1;
		if (ip->ihl != 5)
			p->unsupported = 1;
		if (p->fragment || p->unsupported)
			return 0;
		l4 = ip + 1;
	} else if (eth->h_proto == bpf_htons(ETH_P_IPV6)) {
		struct ipv6hdr *ip6 = (void *)(eth + 1);

		if ((void *)(ip6 + 1) > data_end)
			return PARSE_SHORT;
		if (ip6->version != 6)
			return PARSE_OTHER;
		p->flow.family = SNAT_FAMILY_V6;
		__builtin_memcpy(p->flow.saddr, &ip6->saddr, 16);
		__builtin_memcpy(p->flow.daddr, &ip6->daddr, 16);
		if (ip6->nexthdr == NEXTHDR_FRAGMENT) {
			struct frag6hdr *fh = (void *)(ip6 + 1);

			if ((void *)(fh + 1) > data_end)
				return PARSE_SHORT;
			if (fh->nexthdr != IPPROTO_UDP && fh->nexthdr != IPPROTO_TCP)
				return PARSE_OTHER;
			p->flow.proto = fh->nexthdr;
			p->fragment = 1;
			return 0;
		}
		if (ip6->nexthdr != IPPROTO_UDP && ip6->nexthdr != IPPROTO_TCP) {
			/* An extension header may hide UDP/TCP to a VIP: the
			 * caller checks the address alone and passes it. */
			p->unsupported = 1;
			return 0;
		}
		p->flow.proto = ip6->nexthdr;
		l4 = ip6 + 1;
	} else {
		return PARSE_OTHER;
	}

	if (p->flow.proto == IPPROTO_UDP) {
		struct udphdr *udp = l4;

		if ((void *)(udp + 1) > data_end)
			return PARSE_SHORT;
		p->flow.sport = udp->source;
		p->flow.dport = udp->dest;
		return 0;
	}
	struct tcphdr *tcp = l4;

	if ((void *)(tcp + 1) > data_end)
		return PARSE_SHORT;
	p->flow.sport = tcp->source;
	p->flow.dport = tcp->dest;
	p->tcp_syn = tcp->syn && !tcp->ack;
	return 0;
}

/* service_lookup finds the service for p's destination and port. With
 * port 0 (and protocol 0) it finds the VIP marker user space adds for every
 * VIP address: how packets whose port cannot be read (fragments, extension
 * headers) are recognised as a VIP's. */
static __always_inline struct xdp_service *service_lookup(const struct lbpkt *p, __be16 port)
{
	struct xdp_service_key k = {
		.family = p->flow.family,
		.proto = port ? p->flow.proto : 0,
		.port = port,
	};

	__builtin_memcpy(k.addr, p->flow.daddr, sizeof(k.addr));
	return bpf_map_lookup_elem(&xdp_services, &k);
}

/* pick_backend returns the backend id for p: for TCP the flow's remembered
 * backend while it is still configured, else (and always for a SYN) the
 * service table's slot for the flow hash. XDP_NO_BACKEND when none. */
static __always_inline __u32 pick_backend(const struct lbpkt *p, __u32 service_id, struct xdp_backend **be)
{
	int is_tcp = p->flow.proto == IPPROTO_TCP;

	if (is_tcp && !p->tcp_syn) {
		struct xdp_flow *f = bpf_map_lookup_elem(&xdp_flows, &p->flow);

		if (f) {
			__u32 id = f->backend;
			struct xdp_backend *b = bpf_map_lookup_elem(&xdp_backends, &id);

			if (b && (b->flags & XDP_BACKEND_ACTIVE) && b->service == service_id) {
				*be = b;
				count(XDP_C_FLOW_HIT, 0);
				return id;
			}
		}
	}

	void *table = bpf_map_lookup_elem(&xdp_tables, &service_id);

	if (!table)
		return XDP_NO_BACKEND;
	__u32 slot = flow_hash(&p->flow) % XDP_TABLE_SIZE;
	__u32 *idp = bpf_map_lookup_elem(table, &slot);

	if (!idp || *idp == XDP_NO_BACKEND)
		return XDP_NO_BACKEND;
	__u32 id = *idp;
	struct xdp_backend *b = bpf_map_lookup_elem(&xdp_backends, &id);

	if (!b || !(b->flags & XDP_BACKEND_ACTIVE))
		return XDP_NO_BACKEND;
	if (is_tcp) {
		struct xdp_flow f = {.backend = id};

		/* An LRU update only fails without memory: the flow then
		 * follows the table, as UDP does. */
		if (!bpf_map_update_elem(&xdp_flows, &p->flow, &f, BPF_ANY))
			count(XDP_C_FLOW_NEW, 0);
	}
	*be = b;
	return id;
}

/* rewrite_dst sets the destination address (and port, where it differs)
 * of the frame to b's, with incremental checksum updates. The source is
 * left as it is: the backend sees the real client. */
static __always_inline int rewrite_dst(struct xdp_md *ctx, const struct lbpkt *p, const struct xdp_backend *b)
{
	void *data = (void *)(long)ctx->data;
	void *data_end = (void *)(long)ctx->data_end;
	__u16 *check;
	__u16 csum;

	/* The L4 header sits right after the fixed IP header (parse
	 * refused options and extension headers), so offsets are constant. */
	if (p->flow.family == SNAT_FAMILY_V4) {
		struct iphdr *ip = data + ETH_HLEN;
		struct udphdr *l4 = (void *)(ip + 1);
		__be32 from, to;

		if ((void *)(l4 + 1) > data_end)
			return -1;
		__builtin_memcpy(&from, p->flow.daddr, 4);
		__builtin_memcpy(&to, b->addr, 4);
		ip->check = csum_replace4(ip->check, from, to);
		ip->daddr = to;
		if (p->flow.proto == IPPROTO_UDP) {
			check = &l4->check;
			if (*check == 0)
				goto port; /* IPv4 UDP without checksum stays so */
		} else {
			struct tcphdr *tcp = (void *)l4;

			if ((void *)(tcp + 1) > data_end)
				return -1;
			check = &tcp->check;
		}
		*check = l4_csum_fix(p->flow.proto, csum_replace4(*check, from, to));
	} else {
		struct ipv6hdr *ip6 = data + ETH_HLEN;
		struct udphdr *l4 = (void *)(ip6 + 1);

		if ((void *)(l4 + 1) > data_end)
			return -1;
		if (p->flow.proto == IPPROTO_UDP) {
			check = &l4->check;
		} else {
			struct tcphdr *tcp = (void *)l4;

			if ((void *)(tcp + 1) > data_end)
				return -1;
			check = &tcp->check;
		}
		csum = csum_add_diff(*check, csum_diff16(p->flow.daddr, b->addr));
		*check = l4_csum_fix(p->flow.proto, csum);
		__builtin_memcpy(&ip6->daddr, b->addr, 16);
	}
port:
	if (b->port != p->flow.dport) {
		/* dest is at offset 2 of both udphdr and tcphdr. */
		struct udphdr *l4;

		if (p->flow.family == SNAT_FAMILY_V4)
			l4 = data + ETH_HLEN + sizeof(struct iphdr);
		else
			l4 = data + ETH_HLEN + sizeof(struct ipv6hdr);
		if ((void *)(l4 + 1) > data_end)
			return -1;
		l4->dest = b->port;
		if (p->flow.proto == IPPROTO_TCP) {
			struct tcphdr *tcp = (void *)l4;

			if ((void *)(tcp + 1) > data_end)
				return -1;
			tcp->check = csum_replace2(tcp->check, p->flow.dport, b->port);
		} else if (l4->check != 0 || p->flow.family == SNAT_FAMILY_V6) {
			l4->check = l4_csum_fix(IPPROTO_UDP, csum_replace2(l4->check, p->flow.dport, b->port));
		}
	}
	return 0;
}

/* next_hop fills e with the next hop towards backend id b, from the per-CPU
 * cache or bpf_fib_lookup. Returns 0, or the bpf_fib_lookup result. */
static __always_inline int next_hop(struct xdp_md *ctx, __u32 id, const struct xdp_backend *b,
				    const struct lbpkt *p, struct xdp_fib_entry *out)
{
	struct xdp_fib_entry *e = bpf_map_lookup_elem(&xdp_fib_cache, &id);
	__u64 now = 0;

	if (fib_cache_jiffies) {
		now = bpf_jiffies64();
		if (e && e->expires > now && e->in_ifindex == ctx->ingress_ifindex) {
			*out = *e;
			return 0;
		}
	}

	struct bpf_fib_lookup fib = {.ifindex = ctx->ingress_ifindex};

	if (p->flow.family == SNAT_FAMILY_V4) {
		fib.family = AF_INET;
		__builtin_memcpy(&fib.ipv4_src, p->flow.saddr, 4);
		__builtin_memcpy(&fib.ipv4_dst, b->addr, 4);
	} else {
		fib.family = AF_INET6;
		__builtin_memcpy(fib.ipv6_src, p->flow.saddr, 16);
		__builtin_memcpy(fib.ipv6_dst, b->addr, 16);
	}
	fib.l4_protocol = p->flow.proto;
	fib.sport = p->flow.sport;
	fib.dport = b->port;
	/* An input lookup, as for a packet forwarded from the ingress
	 * interface: forwarding must be on there (else FWD_DISABLED, a miss). */
	int rc = bpf_fib_lookup(ctx, &fib, sizeof(fib), 0);

	if (rc != BPF_FIB_LKUP_RET_SUCCESS)
		return rc ? rc : -1;
	out->in_ifindex = ctx->ingress_ifindex;
	out->out_ifindex = fib.ifindex;
	__builtin_memcpy(out->smac, fib.smac, 6);
	__builtin_memcpy(out->dmac, fib.dmac, 6);
	out->expires = now + fib_cache_jiffies;
	if (e && fib_cache_jiffies)
		*e = *out;
	return 0;
}

/* Attached at XDP (native or generic) of the LB's client-facing interface.
 * Decides, for each frame, whether it goes to a VIP service: if so its
 * destination becomes a backend picked by the service's Maglev table (TCP:
 * the flow's backend), and it leaves by XDP_TX or XDP_REDIRECT towards the
 * next hop bpf_fib_lookup finds (XDP_PASS, rewritten, when there is none).
 * Everything else passes untouched; fragments and packets with IPv4
 * options or IPv6 extension headers to a VIP pass untouched too. A VIP
 * packet with no eligible backend is dropped. */
SEC("xdp")
int xdp_lb(struct xdp_md *ctx)
{
	struct lbpkt p = {};
	__u32 len = bpf_xdp_get_buff_len(ctx);

	/* No XDP_C_SEEN increment: user space sums the verdict counters
	 * (one map lookup less per packet). */
	if (parse(ctx, &p) < 0) {
		TRACE_XDP(ctx, &p, TRACE_NOT_PARSED, NULL, len);
		return count(XDP_C_PASSED, XDP_PASS);
	}

	struct xdp_service *svc;

	if (p.fragment || p.unsupported) {
		/* No port to match (or not read): is it a VIP at all? Port 0
		 * entries mark the VIP addresses (user space adds them). */
		if (!service_lookup(&p, 0)) {
			TRACE_XDP(ctx, &p, TRACE_NO_RULE, NULL, len);
			return count(XDP_C_PASSED, XDP_PASS);
		}
		TRACE_XDP(ctx, &p, TRACE_PASSED, NULL, len);
		if (p.fragment)
			return count(XDP_C_FRAGMENTS, XDP_PASS);
		return count(XDP_C_UNSUPPORTED, XDP_PASS);
	}
	__u32 port = bpf_ntohs(p.flow.dport);
	__u8 *used = bpf_map_lookup_elem(&xdp_ports, &port);

	if (!used || !*used)
		return count(XDP_C_PASSED, XDP_PASS);
	svc = service_lookup(&p, p.flow.dport);
	if (!svc) {
		TRACE_XDP(ctx, &p, TRACE_NO_RULE, NULL, len);
		return count(XDP_C_PASSED, XDP_PASS);
	}
	__u32 service_id = svc->id;

	struct xdp_backend *b = NULL;
	__u32 id = pick_backend(&p, service_id, &b);

	if (id == XDP_NO_BACKEND || !b) {
		TRACE_XDP(ctx, &p, TRACE_DROPPED, NULL, len);
		return count(XDP_C_DROPPED, XDP_DROP);
	}

	struct xdp_backend be = *b;

	if (rewrite_dst(ctx, &p, &be)) {
		TRACE_XDP(ctx, &p, TRACE_ERROR, &be, len);
		return count(XDP_C_ERRORS, XDP_PASS);
	}
	count_bytes(&xdp_service_stats, service_id, len);
	count_bytes(&xdp_backend_stats, id, len);

	struct xdp_fib_entry nh = {};

	if (next_hop(ctx, id, &be, &p, &nh)) {
		TRACE_XDP(ctx, &p, TRACE_FIB_MISS, &be, len);
		return count(XDP_C_FIB_MISS, XDP_PASS);
	}

	void *data = (void *)(long)ctx->data;
	void *data_end = (void *)(long)ctx->data_end;
	struct ethhdr *eth = data;

	if ((void *)(eth + 1) > data_end) {
		TRACE_XDP(ctx, &p, TRACE_ERROR, &be, len);
		return count(XDP_C_ERRORS, XDP_PASS);
	}
	__builtin_memcpy(eth->h_dest, nh.dmac, 6);
	__builtin_memcpy(eth->h_source, nh.smac, 6);
	if (nh.out_ifindex == ctx->ingress_ifindex) {
		TRACE_XDP(ctx, &p, TRACE_REWRITTEN, &be, len);
		return count(XDP_C_TX, XDP_TX);
	}

	long rc = bpf_redirect_map(&xdp_tx_ports, nh.out_ifindex, 0);

	if (rc != XDP_REDIRECT)
		rc = bpf_redirect(nh.out_ifindex, 0);
	if (rc != XDP_REDIRECT) {
		TRACE_XDP(ctx, &p, TRACE_ERROR, &be, len);
		return count(XDP_C_ERRORS, XDP_PASS);
	}
	TRACE_XDP(ctx, &p, TRACE_REWRITTEN, &be, len);
	return count(XDP_C_REDIRECTED, XDP_REDIRECT);
}
