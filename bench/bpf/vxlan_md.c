// SPDX-License-Identifier: GPL-2.0
// Benchmark fixture of bench/datapath.py, NOT the product's datapath: the "collect-metadata VXLAN
// fed by tc BPF" alternative to the classic FDB VXLAN device that the routing module ships
// (docs/decisions/004-classic-vxlan.md). Attached with tc (clsact, direct-action) to the ingress of
// the host-side veth of each pod: a packet from the pod whose IPv4 destination is in a remote pod
// CIDR (LPM map md_routes, filled with bpftool) gets a tunnel key (remote underlay IP, VNI) and the
// overlay MAC of the remote VXLAN device as destination, and is redirected to the egress of this
// node's `external` VXLAN device; every other packet continues (TC_ACT_OK). The receiving node's
// external device decapsulates, and the kernel routes the inner packet to the pod by its /32 route.
//
// Build: clang -O2 -g -target bpf -I/usr/include/$(uname -m)-linux-gnu -c vxlan_md.c -o vxlan_md.o
#include <linux/bpf.h>
#include <linux/if_ether.h>
#include <linux/ip.h>
#include <linux/pkt_cls.h>
#include <bpf/bpf_endian.h>
#include <bpf/bpf_helpers.h>

struct md_key {
	__u32 prefixlen;
	__u32 addr; // network byte order
};

struct md_dest {
	__u32 remote_ipv4; // host byte order, as bpf_skb_set_tunnel_key wants it
	__u32 vni;
	__u32 ifindex; // this node's external VXLAN device
	__u8 mac[ETH_ALEN]; // the remote VXLAN device's MAC (inner destination)
	__u8 pad[2];
};

struct {
	__uint(type, BPF_MAP_TYPE_LPM_TRIE);
	__type(key, struct md_key);
	__type(value, struct md_dest);
	__uint(max_entries, 256);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} md_routes SEC(".maps");

SEC("tc/to_tunnel")
int to_tunnel(struct __sk_buff *skb)
{
	void *data = (void *)(long)skb->data;
	void *data_end = (void *)(long)skb->data_end;
	struct ethhdr *eth = data;
	struct iphdr *ip = data + sizeof(*eth);

	if ((void *)(ip + 1) > data_end || eth->h_proto != bpf_htons(ETH_P_IP))
		return TC_ACT_OK;
	struct md_key key = {.prefixlen = 32, .addr = ip->daddr};
	struct md_dest *dest = bpf_map_lookup_elem(&md_routes, &key);
	if (!dest)
		return TC_ACT_OK;
	struct bpf_tunnel_key tkey = {
		.remote_ipv4 = dest->remote_ipv4,
		.tunnel_id = dest->vni,
		.tunnel_ttl = 64,
	};
	// no BPF_F_ZERO_CSUM_TX: an outer UDP checksum, like the product's classic device (udpcsum)
	if (bpf_skb_set_tunnel_key(skb, &tkey, sizeof(tkey), 0) < 0)
		return TC_ACT_SHOT;
	if (bpf_skb_store_bytes(skb, offsetof(struct ethhdr, h_dest), dest->mac, ETH_ALEN, 0) < 0)
		return TC_ACT_SHOT;
	return bpf_redirect(dest->ifindex, 0);
}

char LICENSE[] SEC("license") = "GPL";
