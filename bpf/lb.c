// SPDX-License-Identifier: GPL-2.0
/* clustermesh.core service datapath: tc programs on a pod's host-side veth.
 *
 *   tc/from_pod  ingress of the host-side veth (packets the pod sends):
 *                ClusterIP:port -> backend DNAT for TCP and UDP, with conntrack so a
 *                connection keeps its backend; hairpin (the client chosen as its own
 *                backend) is SNATed to CM_HAIRPIN_ADDR and sent straight back to the pod,
 *                and the pod's replies to CM_HAIRPIN_ADDR are reverse-NATed the same way.
 *   tc/to_pod    egress of the host-side veth (packets to the pod): reverse NAT of a
 *                backend's replies to the ClusterIP:port the client connected to.
 *
 * Map layouts: include/clustermesh_maps.h (the only definition).
 */
#include "vmlinux.h"
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_endian.h>

#define __BPF_MAP_DEFS__
#include "clustermesh_maps.h"

/* vmlinux.h carries no #defines */
#define TC_ACT_OK 0
#define TC_ACT_SHOT 2
#define ETH_HLEN 14
#define ETH_ALEN 6
#define ETH_P_IP 0x0800
#define IP_MF 0x2000
#define IP_OFFSET 0x1fff

/* Fixed header offsets (IPv4 without options). Plain numbers on purpose: offsetof() on the
 * CO-RE (preserve_access_index) structs of vmlinux.h becomes a relocation, not a constant. */
#define IP_CSUM_OFF (ETH_HLEN + 10)
#define IP_SADDR_OFF (ETH_HLEN + 12)
#define IP_DADDR_OFF (ETH_HLEN + 16)
#define L4_OFF (ETH_HLEN + 20)
#define L4_SPORT_OFF (L4_OFF + 0)
#define L4_DPORT_OFF (L4_OFF + 2)
#define TCP_CSUM_OFF (L4_OFF + 16)
#define UDP_CSUM_OFF (L4_OFF + 6)

struct flow {
	__be32 saddr;
	__be32 daddr;
	__be16 sport;
	__be16 dport;
	__u8 proto;
};

/* murmur3 finaliser: a plain multiply sent every flow to one backend. */
static __always_inline __u32 fmix32(__u32 h)
{
	h ^= h >> 16;
	h *= 0x85ebca6b;
	h ^= h >> 13;
	h *= 0xc2b2ae35;
	h ^= h >> 16;
	return h;
}

/* Mirrored by bpf_maps.flow_hash(): the fields as they sit in memory (network order). */
static __always_inline __u32 flow_hash(const struct flow *f)
{
	__u32 h = fmix32((((__u32)f->sport << 16) | f->dport) ^ f->proto);
	h = fmix32(f->daddr ^ h);
	return fmix32(f->saddr ^ h);
}

/* Parse an unfragmented IPv4 TCP/UDP packet without IP options. Returns 0 on success. */
static __always_inline int parse(struct __sk_buff *skb, struct flow *f)
{
	void *data = (void *)(long)skb->data;
	void *data_end = (void *)(long)skb->data_end;
	struct ethhdr *eth = data;
	struct iphdr *ip;
	__be16 *ports;

	if ((void *)(eth + 1) > data_end || eth->h_proto != bpf_htons(ETH_P_IP))
		return -1;
	ip = (void *)(eth + 1);
	if ((void *)(ip + 1) > data_end || ip->ihl != 5)
		return -1;
	if (ip->protocol != IPPROTO_TCP && ip->protocol != IPPROTO_UDP)
		return -1;
	if (ip->frag_off & bpf_htons(IP_MF | IP_OFFSET))
		return -1;
	ports = (void *)(ip + 1);
	if ((void *)(ports + 2) > data_end)
		return -1;
	f->saddr = ip->saddr;
	f->daddr = ip->daddr;
	f->sport = ports[0];
	f->dport = ports[1];
	f->proto = ip->protocol;
	return 0;
}

static __always_inline int l4_csum_off(__u8 proto)
{
	return proto == IPPROTO_TCP ? TCP_CSUM_OFF : UDP_CSUM_OFF;
}

static __always_inline int set_addr(struct __sk_buff *skb, __u8 proto, int off, __be32 old, __be32 new)
{
	__u64 l4flags = BPF_F_PSEUDO_HDR | sizeof(new);

	if (old == new)
		return 0;
	if (proto == IPPROTO_UDP)
		l4flags |= BPF_F_MARK_MANGLED_0;
	if (bpf_l4_csum_replace(skb, l4_csum_off(proto), old, new, l4flags))
		return -1;
	if (bpf_l3_csum_replace(skb, IP_CSUM_OFF, old, new, sizeof(new)))
		return -1;
	return bpf_skb_store_bytes(skb, off, &new, sizeof(new), 0);
}

static __always_inline int set_port(struct __sk_buff *skb, __u8 proto, int off, __be16 old, __be16 new)
{
	__u64 l4flags = sizeof(new);

	if (old == new)
		return 0;
	if (proto == IPPROTO_UDP)
		l4flags |= BPF_F_MARK_MANGLED_0;
	if (bpf_l4_csum_replace(skb, l4_csum_off(proto), old, new, l4flags))
		return -1;
	return bpf_skb_store_bytes(skb, off, &new, sizeof(new), 0);
}

/* Send the packet back into the pod it came from: swap the MACs, redirect to our egress. */
static __always_inline int bounce(struct __sk_buff *skb)
{
	__u8 macs[2 * ETH_ALEN];
	__u8 swapped[2 * ETH_ALEN];

	if (bpf_skb_load_bytes(skb, 0, macs, sizeof(macs)))
		return TC_ACT_SHOT;
	__builtin_memcpy(swapped, macs + ETH_ALEN, ETH_ALEN);
	__builtin_memcpy(swapped + ETH_ALEN, macs, ETH_ALEN);
	if (bpf_skb_store_bytes(skb, 0, swapped, sizeof(swapped), 0))
		return TC_ACT_SHOT;
	return bpf_redirect(skb->ifindex, 0);
}

static __always_inline struct cm_lb_backend *pick_backend(const struct flow *f, const struct cm_lb_service *svc,
							  __u32 *backend_id)
{
	struct cm_lb_key key = {.address = f->daddr, .dport = f->dport, .proto = f->proto};
	struct cm_lb_service *slot;

	if (svc->count == 0)
		return NULL;
	key.slot = (__u16)(flow_hash(f) % svc->count) + 1;
	slot = bpf_map_lookup_elem(&cm_lb_svc, &key);
	if (!slot)
		return NULL;
	*backend_id = slot->backend_id;
	return bpf_map_lookup_elem(&cm_lb_be, backend_id);
}

/* A pod's reply to CM_HAIRPIN_ADDR: it is talking to itself through a ClusterIP. */
static __always_inline int hairpin_reply(struct __sk_buff *skb, const struct flow *f)
{
	struct cm_ct_key key = {
		.saddr = f->saddr, .daddr = f->saddr, .sport = f->dport, .dport = f->sport,
		.proto = f->proto, .direction = CM_CT_REPLY,
	};
	struct cm_lb_revnat_key rkey = {};
	struct cm_lb_revnat *rn;
	struct cm_ct_value *ct;

	ct = bpf_map_lookup_elem(&cm_ct, &key);
	if (!ct || !(ct->flags & CM_CT_F_HAIRPIN))
		return TC_ACT_OK;
	rkey.rev_nat_index = ct->rev_nat_index;
	rn = bpf_map_lookup_elem(&cm_lb_revnat, &rkey);
	if (!rn)
		return TC_ACT_SHOT;
	if (set_addr(skb, f->proto, IP_DADDR_OFF, f->daddr, f->saddr) ||
	    set_addr(skb, f->proto, IP_SADDR_OFF, f->saddr, rn->address) ||
	    set_port(skb, f->proto, L4_SPORT_OFF, f->sport, rn->port))
		return TC_ACT_SHOT;
	return bounce(skb);
}

SEC("tc/from_pod")
int from_pod(struct __sk_buff *skb)
{
	struct cm_ct_key ckey = {}, rkey = {};
	struct cm_ct_value cval = {}, *ct, *rct;
	struct cm_lb_service *svc;
	struct cm_lb_backend *be = NULL;
	struct cm_lb_key skey = {};
	struct flow f = {};
	__u32 backend_id = 0;
	__be32 be_addr;
	__be16 be_port;
	int hairpin;

	if (parse(skb, &f))
		return TC_ACT_OK;
	if (f.daddr == bpf_htonl(CM_HAIRPIN_ADDR))
		return hairpin_reply(skb, &f);

	skey.address = f.daddr;
	skey.dport = f.dport;
	skey.proto = f.proto;
	svc = bpf_map_lookup_elem(&cm_lb_svc, &skey);
	if (!svc)
		return TC_ACT_OK;

	ckey.saddr = f.saddr;
	ckey.daddr = f.daddr;
	ckey.sport = f.sport;
	ckey.dport = f.dport;
	ckey.proto = f.proto;
	ckey.direction = CM_CT_SERVICE;
	ct = bpf_map_lookup_elem(&cm_ct, &ckey);
	if (ct) {
		backend_id = ct->backend_id;
		be = bpf_map_lookup_elem(&cm_lb_be, &backend_id);
	}
	if (!be) {
		/* new connection, or its backend is gone: choose (again) */
		be = pick_backend(&f, svc, &backend_id);
		if (!be)
			return TC_ACT_SHOT;
		ct = NULL;
	}
	be_addr = be->address;
	be_port = be->port;
	hairpin = be_addr == f.saddr;

	rkey.saddr = f.saddr;
	rkey.daddr = be_addr;
	rkey.sport = f.sport;
	rkey.dport = be_port;
	rkey.proto = f.proto;
	rkey.direction = CM_CT_REPLY;
	/* The reply entry is keyed by client and backend only: a client port reused towards another
	 * service with the same backend leaves an entry that reverse-NATs to the wrong ClusterIP.
	 * Both entries must name this service and this backend, or they are written again. */
	rct = bpf_map_lookup_elem(&cm_ct, &rkey);
	if (!ct || ct->rev_nat_index != svc->rev_nat_index || !rct ||
	    rct->rev_nat_index != svc->rev_nat_index || rct->backend_id != backend_id) {
		cval.backend_id = backend_id;
		cval.rev_nat_index = svc->rev_nat_index;
		cval.flags = hairpin ? CM_CT_F_HAIRPIN : 0;
		cval.created_ns = bpf_ktime_get_ns();
		bpf_map_update_elem(&cm_ct, &ckey, &cval, BPF_ANY);
		bpf_map_update_elem(&cm_ct, &rkey, &cval, BPF_ANY);
	}

	if (set_addr(skb, f.proto, IP_DADDR_OFF, f.daddr, be_addr) ||
	    set_port(skb, f.proto, L4_DPORT_OFF, f.dport, be_port))
		return TC_ACT_SHOT;
	if (!hairpin)
		return TC_ACT_OK;
	if (set_addr(skb, f.proto, IP_SADDR_OFF, f.saddr, bpf_htonl(CM_HAIRPIN_ADDR)))
		return TC_ACT_SHOT;
	return bounce(skb);
}

SEC("tc/to_pod")
int to_pod(struct __sk_buff *skb)
{
	struct cm_lb_revnat_key nkey = {};
	struct cm_ct_key key = {};
	struct cm_lb_revnat *rn;
	struct cm_ct_value *ct;
	struct flow f = {};

	if (parse(skb, &f))
		return TC_ACT_OK;
	key.saddr = f.daddr;
	key.daddr = f.saddr;
	key.sport = f.dport;
	key.dport = f.sport;
	key.proto = f.proto;
	key.direction = CM_CT_REPLY;
	ct = bpf_map_lookup_elem(&cm_ct, &key);
	if (!ct)
		return TC_ACT_OK;
	nkey.rev_nat_index = ct->rev_nat_index;
	rn = bpf_map_lookup_elem(&cm_lb_revnat, &nkey);
	if (!rn)
		return TC_ACT_OK;
	if (set_addr(skb, f.proto, IP_SADDR_OFF, f.saddr, rn->address) ||
	    set_port(skb, f.proto, L4_SPORT_OFF, f.sport, rn->port))
		return TC_ACT_SHOT;
	return TC_ACT_OK;
}

char _license[] SEC("license") = "GPL";
