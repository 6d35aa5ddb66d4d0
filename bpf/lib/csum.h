/* SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause) */
/* Incremental checksum updates for TC programs that rewrite addresses and
 * ports, through bpf_l3_csum_replace / bpf_l4_csum_replace so that the
 * kernel also handles skbs with checksum offload pending (CHECKSUM_PARTIAL:
 * only the pseudo-header seed in the L4 checksum field is adjusted). */
#ifndef LBCTL_CSUM_H
#define LBCTL_CSUM_H

#include <stddef.h>
#include <linux/bpf.h>
#include <linux/ip.h>
#include <linux/ipv6.h>
#include <linux/tcp.h>
#include <linux/udp.h>
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_core_read.h>

#include "parse.h"

/* Offset of the L4 checksum field of p, from the Ethernet header. */
static __always_inline __u32 l4_csum_off(const struct pkt *p)
{
	if (p->proto == IPPROTO_UDP)
		return p->l4_off + offsetof(struct udphdr, check);
	return p->l4_off + offsetof(struct tcphdr, check);
}

/* bpf_l4_csum_replace flags for p, without the size and pseudo-header bits.
 * IPv4 UDP: checksum 0 means "none" and must stay 0; a result of 0 is sent
 * as 0xffff (BPF_F_MARK_MANGLED_0). IPv6 UDP: always checksummed, so the
 * update is enforced even on 0 (BPF_F_MARK_ENFORCE), 0 still sent as 0xffff. */
static __always_inline __u64 l4_csum_flags(const struct pkt *p)
{
	if (p->proto != IPPROTO_UDP)
		return 0;
	if (p->family == SNAT_FAMILY_V4)
		return BPF_F_MARK_MANGLED_0;
	return BPF_F_MARK_MANGLED_0 | BPF_F_MARK_ENFORCE;
}

/* csum_fold folds a 32-bit ones'-complement sum to 16 bits. */
static __always_inline __u16 csum_fold32(__u64 s)
{
	s = (s & 0xffff) + (s >> 16);
	s = (s & 0xffff) + (s >> 16);
	s = (s & 0xffff) + (s >> 16);
	return (__u16)s;
}

/* csum_replace4 returns the checksum check updated for one 32-bit word
 * going from from to to (RFC 1624 eqn. 3). All three are raw header words
 * in network order: the ones'-complement sum is byte-order independent. */
static __always_inline __u16 csum_replace4(__u16 check, __u32 from, __u32 to)
{
	__u64 s = (__u16)~check;

	s += (__u16)~from + (__u16)~(from >> 16);
	s += (__u16)to + (__u16)(to >> 16);
	return ~csum_fold32(s);
}

/* csum_diff16 is the 32-bit ones'-complement sum of ~from and to (16 bytes
 * each), the diff bpf_l4_csum_replace applies when its size is 0. */
static __always_inline __u32 csum_diff16(const __u8 *from, const __u8 *to)
{
	__u64 s = 0;
	__u32 f, t;

#pragma unroll
	for (int i = 0; i < 16; i += 4) {
		__builtin_memcpy(&f, from + i, 4);
		__builtin_memcpy(&t, to + i, 4);
		s += (__u32)~f;
		s += t;
	}
	s = (s & 0xffffffff) + (s >> 32);
	s = (s & 0xffffffff) + (s >> 32);
	return (__u32)s;
}

/* The IP header (at a constant offset) is written directly: its checksum is
 * never offloaded, and the verifier unclones the skb before the first
 * direct write. The L4 checksum goes through bpf_l4_csum_replace, which
 * knows about CHECKSUM_PARTIAL. Direct writes come first: the helper
 * invalidates every packet pointer. */

/* set_saddr4 rewrites the IPv4 source address of p to to, updating the IP
 * header checksum and, when the packet carries the L4 header, the L4
 * checksum (pseudo-header). Returns 0 or a negative errno. */
static __always_inline int set_saddr4(struct __sk_buff *skb, const struct pkt *p, __be32 to)
{
	void *data = (void *)(long)skb->data;
	void *data_end = (void *)(long)skb->data_end;
	struct iphdr *ip = data + ETH_HLEN;
	__be32 from;

	if ((void *)(ip + 1) > data_end)
		return -1;
	__builtin_memcpy(&from, p->saddr, 4);
	ip->check = csum_replace4(ip->check, from, to);
	ip->saddr = to;
	if (p->frag == FRAG_LATER)
		return 0;
	return bpf_l4_csum_replace(skb, l4_csum_off(p), from, to,
				   l4_csum_flags(p) | BPF_F_PSEUDO_HDR | sizeof(to));
}

/* set_saddr6 rewrites the IPv6 source address of p to to (16 bytes); IPv6
 * has no header checksum, only the L4 pseudo-header changes. */
static __always_inline int set_saddr6(struct __sk_buff *skb, const struct pkt *p, const __u8 *to)
{
	void *data = (void *)(long)skb->data;
	void *data_end = (void *)(long)skb->data_end;
	struct ipv6hdr *ip6 = data + ETH_HLEN;

	if ((void *)(ip6 + 1) > data_end)
		return -1;
	__builtin_memcpy(&ip6->saddr, to, 16);
	if (p->frag == FRAG_LATER)
		return 0;
	return bpf_l4_csum_replace(skb, l4_csum_off(p), 0, csum_diff16(p->saddr, to),
				   l4_csum_flags(p) | BPF_F_PSEUDO_HDR);
}

/* set_sport rewrites the UDP/TCP source port of p (not a later fragment)
 * to to, updating the L4 checksum (not part of the pseudo-header). */
static __always_inline int set_sport(struct __sk_buff *skb, const struct pkt *p, __be16 to)
{
	/* source is the first field of udphdr and tcphdr; l4_off varies, so a
	 * helper rather than a direct write (see parse.h). */
	int err = bpf_skb_store_bytes(skb, p->l4_off, &to, sizeof(to), 0);

	if (err)
		return err;
	return bpf_l4_csum_replace(skb, l4_csum_off(p), p->sport, to, l4_csum_flags(p) | sizeof(to));
}

/* The helpers below work on raw checksum fields, with no skb: XDP programs
 * (which see whole frames, never CHECKSUM_PARTIAL) write the results
 * directly, TC programs may use them for header fields the kernel never
 * offloads (the IPv4 header checksum). */

/* csum_replace2 returns check updated for one 16-bit word going from from
 * to to (network order). */
static __always_inline __u16 csum_replace2(__u16 check, __u16 from, __u16 to)
{
	__u64 s = (__u16)~check;

	s += (__u16)~from + to;
	return ~csum_fold32(s);
}

/* csum_add_diff returns check updated by diff, a 32-bit ones'-complement
 * sum of ~old and new words (csum_diff16). */
static __always_inline __u16 csum_add_diff(__u16 check, __u32 diff)
{
	__u64 s = (__u16)~check;

	s += diff;
	return ~csum_fold32(s);
}

/* l4_csum_fix maps an updated UDP checksum that came out 0 to 0xffff (0
 * means "no checksum" in UDP). TCP checksums are left alone. */
static __always_inline __u16 l4_csum_fix(__u8 proto, __u16 check)
{
	if (proto == IPPROTO_UDP && check == 0)
		return 0xffff;
	return check;
}

/* ---- The L4 checksum without bpf_l4_csum_replace ----
 *
 * bpf_l4_csum_replace costs a helper call, skb_ensure_writable and the
 * kernel's own ip_summed switch per call (two calls when the port changes
 * too). What it decides by is skb->ip_summed, which __sk_buff does not
 * expose; bpf_cast_to_kern_ctx (a kfunc, Linux 6.3+, inlined by the
 * verifier to a register move) gives the struct sk_buff, and the field is
 * read with a CO-RE bitfield read. The program then does what
 * inet_proto_csum_replace4/2 would, with direct writes:
 *   CHECKSUM_PARTIAL: the field holds the pseudo-header seed (not
 *     complemented), which only an address change moves;
 *   CHECKSUM_NONE, CHECKSUM_UNNECESSARY: the full checksum, RFC 1624;
 *   CHECKSUM_COMPLETE: skb->csum would need updating too: the helper.
 * The kfunc is weak: on a kernel without it (or without BTF) the loader
 * sets its address to 0, bpf_ksym_exists() is false, the verifier prunes
 * the call, and every packet takes the helper as before. */

#define LBCTL_CHECKSUM_NONE 0
#define LBCTL_CHECKSUM_UNNECESSARY 1
#define LBCTL_CHECKSUM_COMPLETE 2
#define LBCTL_CHECKSUM_PARTIAL 3
#define LBCTL_CHECKSUM_UNKNOWN -1

extern void *bpf_cast_to_kern_ctx(void *obj) __ksym __weak;

#ifndef bpf_ksym_exists
#define bpf_ksym_exists(sym) (!!(sym))
#endif

/* The fields of struct sk_buff read here; CO-RE finds their offsets in
 * the running kernel (the ___lbctl flavour matches struct sk_buff).
 * ip_summed is a bitfield in the byte the kernel marks with the zero-size
 * __pkt_type_offset; the byte is loaded through that marker, at a
 * relocated constant offset, because pointer arithmetic on the kernel's
 * sk_buff (what BPF_CORE_READ_BITFIELD emits) needs CAP_PERFMON, which
 * lbctl does not require. */
struct sk_buff___lbctl {
	__u8 __pkt_type_offset[0];
	__u8 ip_summed:2;
} __attribute__((preserve_access_index));

/* skb_ip_summed returns skb->ip_summed, or LBCTL_CHECKSUM_UNKNOWN when the
 * kernel lacks bpf_cast_to_kern_ctx or lays sk_buff out otherwise (every
 * test below is on constants the loader relocates: the verifier keeps one
 * branch). */
static __always_inline int skb_ip_summed(struct __sk_buff *skb)
{
	if (!bpf_ksym_exists(bpf_cast_to_kern_ctx))
		return LBCTL_CHECKSUM_UNKNOWN;
	struct sk_buff___lbctl *kskb = bpf_cast_to_kern_ctx(skb);

	if (__builtin_preserve_field_info(kskb->ip_summed, BPF_FIELD_BYTE_OFFSET) !=
		    __builtin_preserve_field_info(kskb->__pkt_type_offset, BPF_FIELD_BYTE_OFFSET) ||
	    __builtin_preserve_field_info(kskb->ip_summed, BPF_FIELD_BYTE_SIZE) != 1)
		return LBCTL_CHECKSUM_UNKNOWN;
	__u64 v = *(__u8 *)&kskb->__pkt_type_offset;

	v <<= __builtin_preserve_field_info(kskb->ip_summed, BPF_FIELD_LSHIFT_U64);
	v >>= __builtin_preserve_field_info(kskb->ip_summed, BPF_FIELD_RSHIFT_U64);
	return v;
}

/* csum_seed_add returns the CHECKSUM_PARTIAL seed seed moved by diff (a
 * 32-bit ones'-complement sum of ~old and new words): the seed is a plain
 * folded sum, not complemented (inet_proto_csum_replace4's
 * ~csum_fold(csum_partial(diff, ..., csum_unfold(*sum)))). */
static __always_inline __u16 csum_seed_add(__u16 seed, __u32 diff)
{
	return csum_fold32((__u64)seed + diff);
}

/* l4_csum_update writes the L4 checksum field *check of p after its source
 * address changed by addr_diff and its source port by port_diff (32-bit
 * ones'-complement sums of ~old and new; 0 when unchanged), as
 * bpf_l4_csum_replace with l4_csum_flags(p) would for an skb whose
 * ip_summed is summed (not CHECKSUM_COMPLETE). */
static __always_inline void l4_csum_update(const struct pkt *p, __u16 *check, int summed,
					   __u32 addr_diff, __u32 port_diff)
{
	__u16 c = *check;

	/* IPv4 UDP without a checksum (0) keeps none (BPF_F_MARK_MANGLED_0). */
	if (c == 0 && p->proto == IPPROTO_UDP && p->family == SNAT_FAMILY_V4)
		return;
	if (summed == LBCTL_CHECKSUM_PARTIAL) {
		/* The port is not in the pseudo-header: the device sums it. */
		c = csum_seed_add(c, addr_diff);
	} else {
		__u64 d = (__u64)addr_diff + port_diff;

		c = csum_add_diff(c, (__u32)((d & 0xffffffff) + (d >> 32)));
	}
	/* A UDP result of 0 is sent as 0xffff (0 would mean "none"). */
	*check = l4_csum_fix(p->proto, c);
}

/* l4_check_ptr returns the checksum field of the UDP or TCP header at l4
 * (proto), or NULL when the header does not end within the linear data. */
static __always_inline __u16 *l4_check_ptr(void *l4, void *data_end, __u8 proto)
{
	if (proto == IPPROTO_TCP) {
		struct tcphdr *tcp = l4;

		if ((void *)(tcp + 1) > data_end)
			return NULL;
		return &tcp->check;
	}
	struct udphdr *udp = l4;

	if ((void *)(udp + 1) > data_end)
		return NULL;
	return &udp->check;
}

/* rewrite_inline rewrites the source of p (not a later fragment, L4 header
 * right after a fixed IPv4 or IPv6 header) to to (4 or 16 bytes) and, when
 * to_port is non-zero and differs, its source port, with direct writes and
 * the checksum math above. summed is skb_ip_summed(skb), not
 * CHECKSUM_COMPLETE or unknown. Returns 0, or -1 when the headers are not
 * in the linear data (nothing written then). */
static __always_inline int rewrite_inline(struct __sk_buff *skb, const struct pkt *p, const __u8 *to,
					  __be16 to_port, int summed)
{
	void *data = (void *)(long)skb->data;
	void *data_end = (void *)(long)skb->data_end;
	__u32 addr_diff, port_diff = 0;
	__be16 *sport;
	__u16 *check;

	if (p->family == SNAT_FAMILY_V4) {
		struct iphdr *ip = data + ETH_HLEN;
		__be32 from, to4;

		check = l4_check_ptr(ip + 1, data_end, p->proto);
		if (!check)
			return -1;
		sport = (void *)(ip + 1);
		__builtin_memcpy(&from, p->saddr, 4);
		__builtin_memcpy(&to4, to, 4);
		ip->check = csum_replace4(ip->check, from, to4);
		ip->saddr = to4;
		__u64 d = (__u64)(__u32)~from + to4;

		addr_diff = (__u32)((d & 0xffffffff) + (d >> 32));
	} else {
		struct ipv6hdr *ip6 = data + ETH_HLEN;

		check = l4_check_ptr(ip6 + 1, data_end, p->proto);
		if (!check)
			return -1;
		sport = (void *)(ip6 + 1);
		__builtin_memcpy(&ip6->saddr, to, 16);
		addr_diff = csum_diff16(p->saddr, to);
	}
	if (to_port && to_port != p->sport) {
		/* source is the first field of udphdr and tcphdr. */
		*sport = to_port;
		port_diff = (__u32)(__u16)~p->sport + to_port;
	}
	l4_csum_update(p, check, summed, addr_diff, port_diff);
	return 0;
}

#endif /* LBCTL_CSUM_H */
