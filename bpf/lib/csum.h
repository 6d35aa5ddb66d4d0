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

/* set_saddr4 rewrites the IPv4 source address of p to to, updating the IP
 * header checksum and, when the packet carries the L4 header, the L4
 * checksum (pseudo-header). Returns 0 or a negative errno. */
static __always_inline int set_saddr4(struct __sk_buff *skb, const struct pkt *p, __be32 to)
{
	__be32 from;
	int err;

	__builtin_memcpy(&from, p->saddr, 4);
	if (p->frag != FRAG_LATER) {
		err = bpf_l4_csum_replace(skb, l4_csum_off(p), from, to,
					  l4_csum_flags(p) | BPF_F_PSEUDO_HDR | sizeof(to));
		if (err)
			return err;
	}
	err = bpf_l3_csum_replace(skb, p->l3_off + offsetof(struct iphdr, check), from, to, sizeof(to));
	if (err)
		return err;
	return bpf_skb_store_bytes(skb, p->l3_off + offsetof(struct iphdr, saddr), &to, sizeof(to), 0);
}

/* set_saddr6 rewrites the IPv6 source address of p to to (16 bytes); IPv6
 * has no header checksum, only the L4 pseudo-header changes. */
static __always_inline int set_saddr6(struct __sk_buff *skb, const struct pkt *p, const __u8 *to)
{
	int err;

	if (p->frag != FRAG_LATER) {
		__s64 diff = bpf_csum_diff((__be32 *)p->saddr, 16, (__be32 *)to, 16, 0);

		if (diff < 0)
			return (int)diff;
		err = bpf_l4_csum_replace(skb, l4_csum_off(p), 0, diff,
					  l4_csum_flags(p) | BPF_F_PSEUDO_HDR);
		if (err)
			return err;
	}
	return bpf_skb_store_bytes(skb, p->l3_off + offsetof(struct ipv6hdr, saddr), to, 16, 0);
}

/* set_sport rewrites the UDP/TCP source port of p (not a later fragment)
 * to to, updating the L4 checksum (not part of the pseudo-header). */
static __always_inline int set_sport(struct __sk_buff *skb, const struct pkt *p, __be16 to)
{
	int err;

	err = bpf_l4_csum_replace(skb, l4_csum_off(p), p->sport, to, l4_csum_flags(p) | sizeof(to));
	if (err)
		return err;
	/* source is the first field of both udphdr and tcphdr */
	return bpf_skb_store_bytes(skb, p->l4_off, &to, sizeof(to), 0);
}

#endif /* LBCTL_CSUM_H */
