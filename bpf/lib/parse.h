/* SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause) */
/* Packet parsing shared by the TC programs: Ethernet, then IPv4 (options
 * allowed) or IPv6 (fixed header, optionally one fragment header), then the
 * first bytes of UDP or TCP. Anything else is reported as not parsed; the
 * caller passes such packets unchanged. */
#ifndef LBCTL_PARSE_H
#define LBCTL_PARSE_H

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

#ifndef NEXTHDR_FRAGMENT
#define NEXTHDR_FRAGMENT 44
#endif

#define IP_MF 0x2000
#define IP_OFFSET 0x1fff
#define IP6_MF 0x0001
#define IP6_OFFSET 0xfff8

/* Results of the parsers besides 0 (parsed). */
#define PARSE_OTHER -1	/* not IPv4/IPv6 UDP/TCP, or a header we do not follow */
#define PARSE_SHORT -2	/* a header ends past the linear data */

/* Where a packet stands in its datagram. */
enum frag_kind {
	FRAG_NONE = 0,	/* a whole datagram */
	FRAG_FIRST = 1,	/* offset 0, more fragments follow: carries the L4 header */
	FRAG_LATER = 2,	/* offset > 0: no L4 header */
};

/* IPv6 fragment header (RFC 8200 section 4.5). */
struct frag6hdr {
	__u8 nexthdr;
	__u8 reserved;
	__be16 frag_off;
	__be32 id;
};

/* What parse_l3l4 learnt about a packet. Offsets are from the start of the
 * Ethernet header; addresses are copied out because helper calls that write
 * the packet invalidate every pointer into it. */
struct pkt {
	__u8 family;		/* SNAT_FAMILY_V4 or SNAT_FAMILY_V6 */
	__u8 proto;		/* IPPROTO_UDP or IPPROTO_TCP */
	__u8 frag;		/* enum frag_kind */
	__u8 pad;
	__u16 l3_off;		/* IPv4/IPv6 header */
	__u16 l4_off;		/* UDP/TCP header; meaningless for FRAG_LATER */
	__be32 frag_id;		/* identification, when frag != FRAG_NONE */
	__be16 sport;		/* 0 for FRAG_LATER */
	__be16 dport;		/* 0 for FRAG_LATER */
	__be16 l4_check;	/* L4 checksum field as found; 0 for FRAG_LATER */
	__u16 pad2;
	/* 4-byte aligned: copied in and out (keys) by 32-bit words, not 16. */
	__u8 saddr[16] __attribute__((aligned(4)));	/* IPv4: first 4 bytes */
	__u8 daddr[16] __attribute__((aligned(4)));
};

/* Packet pointers only move by constants here: a variable offset (IPv4
 * options) would need CAP_PERFMON to pass the verifier, so such headers are
 * read with bpf_skb_load_bytes instead. */

/* parse_l4 reads the source port and checksum of the UDP/TCP header at
 * l4. Returns 0, or PARSE_SHORT when the header is truncated. */
static __always_inline int parse_l4(struct pkt *p, void *l4, void *data_end)
{
	if (p->proto == IPPROTO_UDP) {
		struct udphdr *udp = l4;

		if ((void *)(udp + 1) > data_end)
			return PARSE_SHORT;
		p->sport = udp->source;
		p->dport = udp->dest;
		p->l4_check = udp->check;
		return 0;
	}
	/* TCP: the fixed 20 bytes must be there (check is at 16). */
	struct tcphdr *tcp = l4;

	if ((void *)(tcp + 1) > data_end)
		return PARSE_SHORT;
	p->sport = tcp->source;
	p->dport = tcp->dest;
	p->l4_check = tcp->check;
	return 0;
}

/* parse_l4_load is parse_l4 for an L4 header at the variable offset
 * p->l4_off (after IPv4 options). */
static __always_inline int parse_l4_load(struct __sk_buff *skb, struct pkt *p)
{
	if (p->proto == IPPROTO_UDP) {
		struct udphdr udp;

		if (bpf_skb_load_bytes(skb, p->l4_off, &udp, sizeof(udp)))
			return PARSE_OTHER; /* truncated: pulling would not help */
		p->sport = udp.source;
		p->dport = udp.dest;
		p->l4_check = udp.check;
		return 0;
	}
	struct tcphdr tcp;

	if (bpf_skb_load_bytes(skb, p->l4_off, &tcp, sizeof(tcp)))
		return PARSE_OTHER;
	p->sport = tcp.source;
	p->dport = tcp.dest;
	p->l4_check = tcp.check;
	return 0;
}

static __always_inline int parse_ipv4(struct __sk_buff *skb, struct pkt *p, void *data, void *data_end)
{
	struct iphdr *ip = data + ETH_HLEN;

	if ((void *)(ip + 1) > data_end)
		return PARSE_SHORT;
	if (ip->version != 4 || ip->ihl < 5)
		return PARSE_OTHER;
	__u32 hlen = ip->ihl * 4;

	if (ETH_HLEN + hlen > skb->len)
		return PARSE_OTHER; /* options cut short */
	if (ip->protocol != IPPROTO_UDP && ip->protocol != IPPROTO_TCP)
		return PARSE_OTHER;

	p->family = SNAT_FAMILY_V4;
	p->proto = ip->protocol;
	p->l3_off = ETH_HLEN;
	p->l4_off = ETH_HLEN + hlen;
	__builtin_memcpy(p->saddr, &ip->saddr, 4);
	__builtin_memcpy(p->daddr, &ip->daddr, 4);

	__u16 frag_off = bpf_ntohs(ip->frag_off);

	if (frag_off & IP_OFFSET) {
		p->frag = FRAG_LATER;
		p->frag_id = ip->id;
		return 0;
	}
	if (frag_off & IP_MF) {
		p->frag = FRAG_FIRST;
		p->frag_id = ip->id;
	}
	if (hlen == sizeof(*ip))
		return parse_l4(p, ip + 1, data_end);
	return parse_l4_load(skb, p);
}

static __always_inline int parse_ipv6(struct pkt *p, void *data, void *data_end)
{
	struct ipv6hdr *ip6 = data + ETH_HLEN;

	if ((void *)(ip6 + 1) > data_end)
		return PARSE_SHORT;
	if (ip6->version != 6)
		return PARSE_OTHER;

	p->family = SNAT_FAMILY_V6;
	p->l3_off = ETH_HLEN;
	p->l4_off = ETH_HLEN + sizeof(*ip6);
	__builtin_memcpy(p->saddr, &ip6->saddr, 16);
	__builtin_memcpy(p->daddr, &ip6->daddr, 16);

	__u8 nexthdr = ip6->nexthdr;
	void *l4 = ip6 + 1;

	if (nexthdr == NEXTHDR_FRAGMENT) {
		struct frag6hdr *fh = l4;

		if ((void *)(fh + 1) > data_end)
			return PARSE_SHORT;
		nexthdr = fh->nexthdr;
		l4 = fh + 1;
		p->l4_off += sizeof(*fh);

		__u16 frag_off = bpf_ntohs(fh->frag_off);

		if (frag_off & IP6_OFFSET) {
			p->frag = FRAG_LATER;
			p->frag_id = fh->id;
		} else if (frag_off & IP6_MF) {
			p->frag = FRAG_FIRST;
			p->frag_id = fh->id;
		}
		/* offset 0 and no M flag: an atomic fragment, a whole datagram. */
	}
	if (nexthdr != IPPROTO_UDP && nexthdr != IPPROTO_TCP)
		return PARSE_OTHER;
	p->proto = nexthdr;
	if (p->frag == FRAG_LATER)
		return 0;
	return parse_l4(p, l4, data_end);
}

static __always_inline int parse_linear(struct __sk_buff *skb, struct pkt *p)
{
	void *data = (void *)(long)skb->data;
	void *data_end = (void *)(long)skb->data_end;
	struct ethhdr *eth = data;

	if ((void *)(eth + 1) > data_end)
		return PARSE_SHORT;
	if (eth->h_proto == bpf_htons(ETH_P_IP))
		return parse_ipv4(skb, p, data, data_end);
	if (eth->h_proto == bpf_htons(ETH_P_IPV6))
		return parse_ipv6(p, data, data_end);
	return PARSE_OTHER;
}

/* parse_l3l4 fills p from the packet in skb. When the headers are not all
 * in the linear data it pulls them in and parses again (data_end - data
 * is pointer arithmetic the verifier refuses without CAP_PERFMON). Returns 0
 * for an IPv4/IPv6 UDP/TCP packet (or a later fragment of one), < 0 for
 * anything else. */
static __always_inline int parse_l3l4(struct __sk_buff *skb, struct pkt *p)
{
	/* Ethernet + IPv6 + fragment header + TCP = 14 + 40 + 8 + 20. */
	const __u32 want = ETH_HLEN + sizeof(struct ipv6hdr) + sizeof(struct frag6hdr) + sizeof(struct tcphdr);
	int ret = parse_linear(skb, p);

	if (ret != PARSE_SHORT)
		return ret;
	/* Maybe non-linear, maybe truncated: pulling a truncated skb is a no-op. */
	bpf_skb_pull_data(skb, skb->len < want ? skb->len : want);
	__builtin_memset(p, 0, sizeof(*p));
	return parse_linear(skb, p);
}

#endif /* LBCTL_PARSE_H */
