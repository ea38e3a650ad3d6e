// SPDX-License-Identifier: GPL-2.0
/* clustermesh.core datapath: tc programs on a pod's host-side veth.
 *
 *   tc/from_pod  ingress of the host-side veth (packets the pod sends):
 *                ClusterIP:port -> backend DNAT for TCP and UDP, with conntrack so a
 *                connection keeps its backend; hairpin (the client chosen as its own
 *                backend) is SNATed to CM_HAIRPIN_ADDR and sent straight back to the pod,
 *                and the pod's replies to CM_HAIRPIN_ADDR are reverse-NATed the same way.
 *                Then the endpoint's EGRESS policy on the tuple after DNAT.
 *   tc/to_pod    egress of the host-side veth (packets to the pod): the endpoint's INGRESS
 *                policy on the tuple as it arrives, then reverse NAT of a backend's replies
 *                to the ClusterIP:port the client connected to.
 *
 * Policy (endpoints in cm_endpoint, keyed by skb->ifindex; others cost that one lookup):
 *   a packet whose reverse tuple has a CM_CT_POLICY entry in cm_ct is a reply and passes;
 *   otherwise, in an enforced direction, the peer's identity (cm_ipcache LPM of the peer
 *   address, CM_ID_WORLD if none) must find one of (P,dport,proto) (P,0,proto) (P,0,0)
 *   (0,dport,proto) (0,0,proto) (0,0,0) in cm_policy, or the packet is dropped; CM_ID_HOST
 *   is always allowed into a pod. A forward packet passed at an endpoint's hook writes its
 *   CM_CT_POLICY entry (if missing) so the replies are recognised. Protocols other than
 *   TCP/UDP/SCTP, and fragments, are judged with ports 0 (L3). Hairpin traffic (a pod
 *   reaching itself through a ClusterIP) is never policed.
 *   Drops (policy, service without backend, failed rewrite) are counted in cm_drops.
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
#define ICMP_ECHOREPLY 0
#define ICMP_ECHO 8

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
	__be16 sport; /* 0 unless TCP/UDP/SCTP and not a fragment */
	__be16 dport;
	__be16 ct_sport; /* the ports in conntrack keys: sport/dport, or the ICMP echo id (request: */
	__be16 ct_dport; /* ct_sport, reply: ct_dport) so only echo replies match an echo request */
	__u8 proto;
	__u8 nat; /* TCP or UDP, no IP options, not a fragment: services and NAT apply */
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

/* Parse an IPv4 packet. Returns 0 on success (any IPv4 protocol; ports only for TCP, UDP and
 * SCTP when not a fragment), -1 for what is not IPv4 (passed without policy). */
static __always_inline int parse(struct __sk_buff *skb, struct flow *f)
{
	void *data = (void *)(long)skb->data;
	void *data_end = (void *)(long)skb->data_end;
	struct ethhdr *eth = data;
	struct iphdr *ip;
	__be16 *ports;
	__be16 buf[2], icmp[3];
	__u32 ihl;

	if ((void *)(eth + 1) > data_end)
		return -1;
	if (eth->h_proto != bpf_htons(ETH_P_IP))
		return -1;
	ip = (void *)(eth + 1);
	if ((void *)(ip + 1) > data_end) {
		/* IPv4 header outside the linear area: pull it in (rare) */
		if (bpf_skb_pull_data(skb, ETH_HLEN + sizeof(*ip)))
			return -1;
		data = (void *)(long)skb->data;
		data_end = (void *)(long)skb->data_end;
		ip = data + ETH_HLEN;
		if ((void *)(ip + 1) > data_end)
			return -1;
	}
	ihl = ip->ihl;
	if (ihl < 5)
		return -1;
	f->saddr = ip->saddr;
	f->daddr = ip->daddr;
	f->proto = ip->protocol;
	if (ip->frag_off & bpf_htons(IP_MF | IP_OFFSET))
		return 0;
	if (f->proto == IPPROTO_ICMP) {
		/* type, code, checksum, id: echo request (8) and reply (0) carry the id */
		if (!bpf_skb_load_bytes(skb, ETH_HLEN + ihl * 4, icmp, sizeof(icmp))) {
			if (icmp[0] == bpf_htons(ICMP_ECHO << 8)) /* type 8, code 0 */
				f->ct_sport = icmp[2];
			else if (icmp[0] == bpf_htons(ICMP_ECHOREPLY << 8))
				f->ct_dport = icmp[2];
		}
		return 0;
	}
	if (f->proto != IPPROTO_TCP && f->proto != IPPROTO_UDP && f->proto != IPPROTO_SCTP)
		return 0;
	ports = (void *)ip + ihl * 4;
	if ((void *)(ports + 2) <= data_end) {
		f->sport = ports[0];
		f->dport = ports[1];
	} else if (!bpf_skb_load_bytes(skb, ETH_HLEN + ihl * 4, buf, sizeof(buf))) {
		f->sport = buf[0];
		f->dport = buf[1];
	} else {
		return 0;
	}
	f->ct_sport = f->sport;
	f->ct_dport = f->dport;
	f->nat = ihl == 5 && f->proto != IPPROTO_SCTP;
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

/* Count a drop in cm_drops and return TC_ACT_SHOT. identity: the peer's (0 unless a policy drop). */
static __always_inline int drop(struct __sk_buff *skb, __u32 identity, __be16 dport, __u8 proto, __u8 direction,
				__u8 reason)
{
	struct cm_drop_key key = {
		.ifindex = skb->ifindex, .identity = identity, .dport = dport, .proto = proto,
		.direction = direction, .reason = reason,
	};
	struct cm_drop first = {}, *d;
	__u64 now = bpf_ktime_get_ns();

	d = bpf_map_lookup_elem(&cm_drops, &key);
	if (!d) {
		first.packets = 1;
		first.bytes = skb->len;
		first.last_ns = now;
		if (!bpf_map_update_elem(&cm_drops, &key, &first, BPF_NOEXIST))
			return TC_ACT_SHOT;
		d = bpf_map_lookup_elem(&cm_drops, &key); /* another CPU created it meanwhile */
		if (!d)
			return TC_ACT_SHOT;
	}
	__sync_fetch_and_add(&d->packets, 1);
	__sync_fetch_and_add(&d->bytes, skb->len);
	d->last_ns = now;
	return TC_ACT_SHOT;
}

/* Send the packet back into the pod it came from: swap the MACs, redirect to our egress.
 * Returns the redirect verdict, or -1 when the rewrite failed. */
static __always_inline int bounce(struct __sk_buff *skb)
{
	__u8 macs[2 * ETH_ALEN];
	__u8 swapped[2 * ETH_ALEN];

	if (bpf_skb_load_bytes(skb, 0, macs, sizeof(macs)))
		return -1;
	__builtin_memcpy(swapped, macs + ETH_ALEN, ETH_ALEN);
	__builtin_memcpy(swapped + ETH_ALEN, macs, ETH_ALEN);
	if (bpf_skb_store_bytes(skb, 0, swapped, sizeof(swapped), 0))
		return -1;
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

/* A pod's reply to CM_HAIRPIN_ADDR: it is talking to itself through a ClusterIP.
 * Returns -1 when the packet is not such a reply. */
static __always_inline int hairpin_reply(struct __sk_buff *skb, const struct flow *f)
{
	struct cm_ct_key key = {
		.saddr = f->saddr, .daddr = f->saddr, .sport = f->dport, .dport = f->sport,
		.proto = f->proto, .direction = CM_CT_REPLY,
	};
	struct cm_lb_revnat_key rkey = {};
	struct cm_lb_revnat *rn;
	struct cm_ct_value *ct;
	int ret;

	ct = bpf_map_lookup_elem(&cm_ct, &key);
	if (!ct || !(ct->flags & CM_CT_F_HAIRPIN))
		return -1;
	rkey.rev_nat_index = ct->rev_nat_index;
	rn = bpf_map_lookup_elem(&cm_lb_revnat, &rkey);
	if (!rn ||
	    set_addr(skb, f->proto, IP_DADDR_OFF, f->daddr, f->saddr) ||
	    set_addr(skb, f->proto, IP_SADDR_OFF, f->saddr, rn->address) ||
	    set_port(skb, f->proto, L4_SPORT_OFF, f->sport, rn->port))
		return drop(skb, 0, f->dport, f->proto, CM_DIR_EGRESS, CM_DROP_NAT);
	ret = bounce(skb);
	if (ret < 0)
		return drop(skb, 0, f->dport, f->proto, CM_DIR_EGRESS, CM_DROP_NAT);
	return ret;
}

/* To the pod, a packet from_pod bounced: the pod's own connection through a ClusterIP (source
 * CM_HAIRPIN_ADDR) or that connection's reply (source the ClusterIP). Never policed. */
static __always_inline int hairpin_to_pod(const struct flow *f)
{
	struct cm_ct_key key = {.saddr = f->daddr, .proto = f->proto};
	struct cm_ct_value *ct;

	if (!f->nat)
		return 0;
	if (f->saddr == bpf_htonl(CM_HAIRPIN_ADDR)) {
		key.daddr = f->daddr;
		key.sport = f->sport;
		key.dport = f->dport;
		key.direction = CM_CT_REPLY;
	} else {
		key.daddr = f->saddr;
		key.sport = f->dport;
		key.dport = f->sport;
		key.direction = CM_CT_SERVICE;
	}
	ct = bpf_map_lookup_elem(&cm_ct, &key);
	return ct && (ct->flags & CM_CT_F_HAIRPIN);
}

/* --- policy ----------------------------------------------------------------------------------- */

static __always_inline __u32 identity_of(__be32 address)
{
	struct cm_ipcache_key key = {.prefixlen = 32, .address = address};
	struct cm_ipcache_value *v;

	v = bpf_map_lookup_elem(&cm_ipcache, &key);
	return v ? v->identity : CM_ID_WORLD;
}

static __always_inline int policy_hit(struct cm_policy_key *key, __u32 identity, __be16 dport, __u8 proto)
{
	key->identity = identity;
	key->dport = dport;
	key->proto = proto;
	return bpf_map_lookup_elem(&cm_policy, key) != NULL;
}

/* (P,dport,proto) (P,0,proto) (P,0,0) (0,dport,proto) (0,0,proto) (0,0,0): the first hit allows. */
static __always_inline int policy_allows(__u32 ifindex, __u32 peer, const struct flow *f, __u8 direction)
{
	struct cm_policy_key key = {.ifindex = ifindex, .direction = direction};

	if (f->dport && policy_hit(&key, peer, f->dport, f->proto))
		return 1;
	if (policy_hit(&key, peer, 0, f->proto) || policy_hit(&key, peer, 0, 0))
		return 1;
	if (f->dport && policy_hit(&key, 0, f->dport, f->proto))
		return 1;
	return policy_hit(&key, 0, 0, f->proto) || policy_hit(&key, 0, 0, 0);
}

/* The policy of the endpoint at this hook (skb->ifindex) for tuple f: after DNAT at from_pod
 * (direction egress), as it arrives at to_pod (ingress). Returns 0 to pass, or CM_DROP_POLICY
 * with *peer = the peer's identity. Not an endpoint in cm_endpoint: one lookup, pass. */
static __always_inline int enforce(struct __sk_buff *skb, const struct flow *f, __u8 direction, __u32 *peer)
{
	struct cm_endpoint_key ekey = {.ifindex = skb->ifindex};
	struct cm_ct_key key = {
		.saddr = f->daddr, .daddr = f->saddr, .sport = f->ct_dport, .dport = f->ct_sport,
		.proto = f->proto, .direction = CM_CT_POLICY,
	};
	struct cm_ct_value val = {};
	struct cm_endpoint *ep;
	__u8 enforced;

	ep = bpf_map_lookup_elem(&cm_endpoint, &ekey);
	if (!ep)
		return 0;
	enforced = ep->flags & (direction == CM_DIR_INGRESS ? CM_EP_F_INGRESS : CM_EP_F_EGRESS);
	/* the reply of a connection passed before */
	if (bpf_map_lookup_elem(&cm_ct, &key))
		return 0;
	if (enforced) {
		*peer = identity_of(direction == CM_DIR_INGRESS ? f->saddr : f->daddr);
		if (!(direction == CM_DIR_INGRESS && *peer == CM_ID_HOST) &&
		    !policy_allows(skb->ifindex, *peer, f, direction))
			return CM_DROP_POLICY;
	}
	/* a forward packet that passed: remember the connection (once) so its replies pass */
	key.saddr = f->saddr;
	key.daddr = f->daddr;
	key.sport = f->ct_sport;
	key.dport = f->ct_dport;
	if (!bpf_map_lookup_elem(&cm_ct, &key)) {
		val.created_ns = bpf_ktime_get_ns();
		bpf_map_update_elem(&cm_ct, &key, &val, BPF_NOEXIST);
	}
	return 0;
}

/* --- programs --------------------------------------------------------------------------------- */

SEC("tc/from_pod")
int from_pod(struct __sk_buff *skb)
{
	struct cm_ct_key ckey = {}, rkey = {};
	struct cm_ct_value cval = {}, *ct, *rct;
	struct cm_lb_service *svc = NULL;
	struct cm_lb_backend *be = NULL;
	struct cm_lb_key skey = {};
	struct flow f = {}, post;
	__u32 backend_id = 0, peer = 0;
	__be32 be_addr;
	__be16 be_port;
	int hairpin, ret;

	if (parse(skb, &f))
		return TC_ACT_OK;
	if (f.nat) {
		if (f.daddr == bpf_htonl(CM_HAIRPIN_ADDR)) {
			ret = hairpin_reply(skb, &f);
			if (ret >= 0)
				return ret;
		}
		skey.address = f.daddr;
		skey.dport = f.dport;
		skey.proto = f.proto;
		svc = bpf_map_lookup_elem(&cm_lb_svc, &skey);
	}
	if (!svc) {
		if (enforce(skb, &f, CM_DIR_EGRESS, &peer))
			return drop(skb, peer, f.dport, f.proto, CM_DIR_EGRESS, CM_DROP_POLICY);
		return TC_ACT_OK;
	}

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
			return drop(skb, 0, f.dport, f.proto, CM_DIR_EGRESS, CM_DROP_NO_BACKEND);
		ct = NULL;
	}
	be_addr = be->address;
	be_port = be->port;
	hairpin = be_addr == f.saddr;

	/* egress policy on the tuple after DNAT (the backend's identity); hairpin is the pod itself */
	if (!hairpin) {
		post = f;
		post.daddr = be_addr;
		post.dport = be_port;
		post.ct_dport = be_port;
		if (enforce(skb, &post, CM_DIR_EGRESS, &peer))
			return drop(skb, peer, be_port, f.proto, CM_DIR_EGRESS, CM_DROP_POLICY);
	}

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
		return drop(skb, 0, f.dport, f.proto, CM_DIR_EGRESS, CM_DROP_NAT);
	if (!hairpin)
		return TC_ACT_OK;
	if (set_addr(skb, f.proto, IP_SADDR_OFF, f.saddr, bpf_htonl(CM_HAIRPIN_ADDR)))
		return drop(skb, 0, f.dport, f.proto, CM_DIR_EGRESS, CM_DROP_NAT);
	ret = bounce(skb);
	if (ret < 0)
		return drop(skb, 0, f.dport, f.proto, CM_DIR_EGRESS, CM_DROP_NAT);
	return ret;
}

SEC("tc/to_pod")
int to_pod(struct __sk_buff *skb)
{
	struct cm_lb_revnat_key nkey = {};
	struct cm_ct_key key = {};
	struct cm_lb_revnat *rn;
	struct cm_ct_value *ct;
	struct flow f = {};
	__u32 peer = 0;

	if (parse(skb, &f))
		return TC_ACT_OK;
	/* ingress policy on the tuple as it arrives, before the reverse NAT */
	if (enforce(skb, &f, CM_DIR_INGRESS, &peer) && !hairpin_to_pod(&f))
		return drop(skb, peer, f.dport, f.proto, CM_DIR_INGRESS, CM_DROP_POLICY);
	if (!f.nat)
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
		return drop(skb, 0, f.dport, f.proto, CM_DIR_INGRESS, CM_DROP_NAT);
	return TC_ACT_OK;
}

char _license[] SEC("license") = "GPL";
