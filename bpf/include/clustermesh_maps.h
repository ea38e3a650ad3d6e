/* SPDX-License-Identifier: GPL-2.0 */
/* clustermesh.core: the ONE definition of the datapath's pinned maps.
 *
 * Every key and value the node agent writes from Python is declared here, and
 * plugins/module_utils/bpf_maps.py is checked against this file by
 * tests/unit/plugins/module_utils/test_bpf_maps.py (struct names, field names,
 * order, sizes and offsets; map names, types, key/value structs, max_entries).
 * Keep to the subset that test parses: one field per line, fixed-size types
 * (__u8 __u16 __u32 __u64 __be16 __be32), optional [N] arrays, no bitfields.
 * Explicit padding fields make every struct free of implicit holes.
 *
 * Addresses and ports are in network byte order (__be32/__be16), everything
 * else in host byte order.
 */
#ifndef CLUSTERMESH_MAPS_H
#define CLUSTERMESH_MAPS_H

/* Pin root of a node (libbpf pin_root_path); maps are pinned by name below it. */
#define CM_PIN_ROOT "/sys/fs/bpf/clustermesh"

/* Hairpin: a pod that reaches a service and is chosen as its own backend sees
 * the connection come from this link-local address (network order in maps). */
#define CM_HAIRPIN_ADDR 0xa9fe2a01 /* 169.254.42.1, host order */

/* Sizes of the maps. */
#define CM_LB_SERVICE_MAX 65536
#define CM_LB_BACKEND_MAX 65536
#define CM_LB_REVNAT_MAX 65536
#define CM_CT_MAX 262144
#define CM_IPCACHE_MAX 65536
#define CM_ENDPOINT_MAX 4096
#define CM_POLICY_MAX 262144
#define CM_DROP_MAX 16384

/* Conntrack directions (cm_ct_key.direction). */
#define CM_CT_SERVICE 0 /* client -> ClusterIP:port, as the client sent it */
#define CM_CT_REPLY 1   /* client:port <- backend:port after DNAT: finds the reverse NAT */
#define CM_CT_POLICY 2  /* a connection passed by policy: the forward tuple (after DNAT) as the initiator sent it */

/* cm_ct_value.flags */
#define CM_CT_F_HAIRPIN 1

/* cm_lb_service.flags (slot 0) */
#define CM_SVC_F_GLOBAL 1
#define CM_SVC_F_SHARED 2
#define CM_SVC_F_AFFINITY_LOCAL 4

/* cm_lb_backend.flags */
#define CM_BE_F_ACTIVE 1

/* Reserved identities (cm_ipcache_value.identity, cm_policy_key.identity). Identity 0 in a
 * policy key is the wildcard (any peer); an address without ipcache entry is CM_ID_WORLD. */
#define CM_ID_HOST 1
#define CM_ID_WORLD 2
#define CM_ID_REMOTE_NODE 6

/* cm_endpoint.flags: the directions in which the endpoint is default-deny (policy enforced). */
#define CM_EP_F_INGRESS 1
#define CM_EP_F_EGRESS 2

/* cm_policy_key.direction, cm_drop_key.direction: seen from the endpoint (ingress = to the pod). */
#define CM_DIR_INGRESS 0
#define CM_DIR_EGRESS 1

/* cm_drop_key.reason */
#define CM_DROP_POLICY 1     /* policy denied */
#define CM_DROP_NO_BACKEND 2 /* service without backend */
#define CM_DROP_NAT 3        /* a rewrite (NAT, checksum, redirect) failed */

/* Service map: {ClusterIP, port, proto, slot}. Slot 0 is the service itself
 * (count = number of backend slots, rev_nat_index, flags); slots 1..count each
 * hold one backend_id. */
struct cm_lb_key {
	__be32 address;
	__be16 dport;
	__u16 slot;
	__u8 proto;
	__u8 pad[3];
};

struct cm_lb_service {
	__u32 backend_id;
	__u16 count;
	__u16 rev_nat_index;
	__u8 flags;
	__u8 pad[3];
};

/* Backend map: backend_id -> where the backend is. */
struct cm_lb_backend_key {
	__u32 backend_id;
};

struct cm_lb_backend {
	__be32 address;
	__be16 port;
	__u8 proto;
	__u8 flags;
	__u16 cluster_id;
	__u16 pad;
};

/* Reverse-NAT map: rev_nat_index -> the ClusterIP:port replies must come from. */
struct cm_lb_revnat_key {
	__u16 rev_nat_index;
	__u16 pad;
};

struct cm_lb_revnat {
	__be32 address;
	__be16 port;
	__u16 pad;
};

/* Conntrack: the tuple as seen at the from_pod hook, with the direction.
 * CM_CT_SERVICE: saddr/sport = client, daddr/dport = ClusterIP:port.
 * CM_CT_REPLY:   saddr/sport = client, daddr/dport = backend (after DNAT). */
struct cm_ct_key {
	__be32 saddr;
	__be32 daddr;
	__be16 sport;
	__be16 dport;
	__u8 proto;
	__u8 direction;
	__u16 pad;
};

struct cm_ct_value {
	__u32 backend_id;
	__u16 rev_nat_index;
	__u8 flags;
	__u8 pad;
	__u64 created_ns;
};

/* ipcache: longest-prefix match of an IPv4 address (bpf_lpm_trie_key layout). */
struct cm_ipcache_key {
	__u32 prefixlen;
	__be32 address;
};

struct cm_ipcache_value {
	__u32 identity;
	__be32 tunnel_endpoint;
	__u16 cluster_id;
	__u8 flags;
	__u8 pad;
};

/* Endpoints of this node with a policy, keyed by the ifindex of the pod's host-side veth
 * (skb->ifindex in both tc hooks). An endpoint absent here has no policy work at all. */
struct cm_endpoint_key {
	__u32 ifindex;
};

struct cm_endpoint {
	__u32 identity;
	__u8 flags;
	__u8 pad[3];
};

/* Policy: presence of {ifindex, peer identity, dport, proto, direction} allows. identity 0 = any
 * peer, dport 0 = any port, proto 0 = any protocol (then dport is 0 too). */
struct cm_policy_key {
	__u32 ifindex;
	__u32 identity;
	__be16 dport;
	__u8 proto;
	__u8 direction;
};

struct cm_policy {
	__u32 flags;
	__u32 pad;
};

/* Drop counters: per endpoint, peer identity (0 when not a policy drop), port, proto, direction, reason. */
struct cm_drop_key {
	__u32 ifindex;
	__u32 identity;
	__be16 dport;
	__u8 proto;
	__u8 direction;
	__u8 reason;
	__u8 pad[3];
};

struct cm_drop {
	__u64 packets;
	__u64 bytes;
	__u64 last_ns;
};

#ifdef __BPF_MAP_DEFS__
/* The map definitions (BTF-style, pinned by name under the pin root). Only BPF
 * programs define __BPF_MAP_DEFS__ before including this header. */
struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__type(key, struct cm_lb_key);
	__type(value, struct cm_lb_service);
	__uint(max_entries, CM_LB_SERVICE_MAX);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} cm_lb_svc SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__type(key, struct cm_lb_backend_key);
	__type(value, struct cm_lb_backend);
	__uint(max_entries, CM_LB_BACKEND_MAX);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} cm_lb_be SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__type(key, struct cm_lb_revnat_key);
	__type(value, struct cm_lb_revnat);
	__uint(max_entries, CM_LB_REVNAT_MAX);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} cm_lb_revnat SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__type(key, struct cm_ct_key);
	__type(value, struct cm_ct_value);
	__uint(max_entries, CM_CT_MAX);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} cm_ct SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_LPM_TRIE);
	__type(key, struct cm_ipcache_key);
	__type(value, struct cm_ipcache_value);
	__uint(max_entries, CM_IPCACHE_MAX);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} cm_ipcache SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__type(key, struct cm_endpoint_key);
	__type(value, struct cm_endpoint);
	__uint(max_entries, CM_ENDPOINT_MAX);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} cm_endpoint SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__type(key, struct cm_policy_key);
	__type(value, struct cm_policy);
	__uint(max_entries, CM_POLICY_MAX);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} cm_policy SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__type(key, struct cm_drop_key);
	__type(value, struct cm_drop);
	__uint(max_entries, CM_DROP_MAX);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} cm_drops SEC(".maps");
#endif /* __BPF_MAP_DEFS__ */

#endif /* CLUSTERMESH_MAPS_H */
