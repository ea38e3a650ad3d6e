# -*- coding: utf-8 -*-
# Copyright: clustermesh.core contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""Pod routing: the desired kernel state of one node, computed from the mesh (no kernel access here).

Modes, per peer node of every connected cluster:

* ``direct``: a route to the peer's pod CIDRs via the peer's underlay IP (it must be on-link,
  unless an external router carries pod CIDRs: then nothing is installed for it);
* ``tunnel``: VXLAN (UDP 8472) to the peer: a permanent FDB entry and neighbour for its overlay
  address, and a route to its pod CIDRs via that address ``onlink`` through our device;
* ``hybrid``: direct for peers on the node's own L2 segment, tunnel for the rest.

The applier (a later part of the routing work) turns this plan into netlink calls and removes
state tagged as ours that the plan no longer contains.
"""

from __future__ import annotations

import ipaddress
from dataclasses import asdict, dataclass, field

MODES = ("tunnel", "direct", "hybrid")
VXLAN_DEVICE = "cm_vxlan"
VXLAN_PORT = 8472
VXLAN_VNI = 2
VXLAN_OVERHEAD = 50  # outer IPv4 20 + UDP 8 + VXLAN 8 + inner Ethernet 14
ROUTE_PROTOCOL = 203  # routes to remote pod CIDRs, owned by the routing applier (docs/development.md)
POD_ROUTE_PROTOCOL = 204  # host /32 routes to local pods, owned by the CNI plugin

# Argument spec of the routing inputs shared by the modules routing and mesh_preflight
# (doc fragment clustermesh.core.routing_peers); routing_inputs() produces exactly this shape.
NODE_ARGUMENT_SPEC = dict(
    type="dict",
    required=True,
    options=dict(
        name=dict(type="str", required=True),
        ip=dict(type="str", required=True),
        pod_cidrs=dict(type="list", elements="str", required=True),
    ),
)
PEERS_ARGUMENT_SPEC = dict(
    type="list",
    elements="dict",
    default=[],
    options=dict(
        name=dict(type="str", required=True),
        cluster=dict(type="str", required=True),
        ip=dict(type="str", required=True),
        pod_cidrs=dict(type="list", elements="str", required=True),
    ),
)
MODE_ARGUMENT_SPEC = dict(type="str", default="tunnel")  # checked by plan_routing, which names the choices
# What every module that plans from the routing inputs takes (routing, ipsec, mesh_preflight); each adds its own.
ROUTING_INPUTS_ARGUMENT_SPEC = dict(
    node=NODE_ARGUMENT_SPEC,
    peers=PEERS_ARGUMENT_SPEC,
    mode=MODE_ARGUMENT_SPEC,
    external_router=dict(type="bool", default=False),
)


def routing_inputs(mesh, host):
    """What routing needs for inventory host ``host`` from the normalised mesh (``Mesh.to_dict()``):
    ``node`` {name, ip, pod_cidrs}, ``peers`` (every other node of its own cluster and of every cluster
    it connects to or that connects to it, since replies must route back) and ``mesh_pod_cidrs`` (the
    pod CIDRs of every cluster: traffic to them is never masqueraded)."""
    hosts = mesh["hosts"]
    if host not in hosts:
        raise KeyError("host %r is not a node of the mesh" % host)
    me = hosts[host]
    clusters = {c["name"]: c for c in mesh["clusters"]}
    own = clusters[me["cluster"]]
    reach = {own["name"], *own["connect_to"], *own["connected_from"]}
    peers = [
        {"name": n["name"], "cluster": c["name"], "ip": n["ip"], "pod_cidrs": list(n["pod_cidrs"])}
        for c in mesh["clusters"]
        if c["name"] in reach
        for n in c["nodes"]
        if n["name"] != me["name"]
    ]
    return {
        "node": {"name": me["name"], "ip": me["ip"], "pod_cidrs": list(me["pod_cidrs"])},
        "peers": peers,
        "mesh_pod_cidrs": [cidr for c in mesh["clusters"] for cidr in c["pod_cidrs"]],
    }


def pod_mtu(mode, underlay_mtu):
    """The MTU of pod interfaces: room for the VXLAN header whenever some traffic may be tunnelled."""
    return underlay_mtu - VXLAN_OVERHEAD if mode in ("tunnel", "hybrid") else underlay_mtu


class RoutingPlanError(ValueError):
    """Input the plan cannot be made from; ``problems`` lists every one, each naming the peer or field."""

    def __init__(self, problems):
        self.problems = list(problems)
        super().__init__("; ".join(self.problems))


@dataclass(frozen=True)
class Route:
    dst: str
    via: str
    dev: str | None = None
    onlink: bool = False
    peer: str = ""


@dataclass(frozen=True)
class FdbEntry:
    mac: str
    dst: str
    peer: str = ""


@dataclass(frozen=True)
class Neighbour:
    ip: str
    mac: str
    peer: str = ""


@dataclass
class RoutingPlan:
    mode: str
    node: str
    peer_modes: dict = field(default_factory=dict)  # peer -> direct | tunnel | external
    routes: list = field(default_factory=list)
    vxlan: dict | None = None
    fdb: list = field(default_factory=list)
    neighbours: list = field(default_factory=list)

    def to_dict(self):
        return asdict(self)


def overlay_ip(pod_cidr):
    """A node's address on the overlay: the first host address of its pod CIDR."""
    return str(next(ipaddress.ip_network(pod_cidr).hosts()))


def overlay_mac(underlay_ip):
    """A fixed, locally administered MAC per node, derived from its underlay IPv4 address."""
    return "0e:cb:" + ":".join("%02x" % b for b in ipaddress.IPv4Address(underlay_ip).packed)


def plan_routing(node, peers, mode, underlay_prefixlen, underlay_mtu=1500, external_router=False):
    """The plan for ``node`` ({name, ip, pod_cidrs}) towards ``peers`` (each {name, cluster, ip,
    pod_cidrs}). ``underlay_prefixlen`` is the prefix of the node's underlay segment, which decides
    whether a peer is on-link. Raises RoutingPlanError listing every problem."""
    problems = []
    if mode not in MODES:
        problems.append("mode: %r is not one of %s" % (mode, ", ".join(MODES)))
    try:
        segment = ipaddress.ip_interface("%s/%s" % (node["ip"], underlay_prefixlen)).network
    except ValueError as exc:
        raise RoutingPlanError(
            ["node %s: underlay %s/%s: %s" % (node.get("name"), node.get("ip"), underlay_prefixlen, exc)]
        ) from None
    node_pod = [ipaddress.ip_network(c) for c in node["pod_cidrs"]]
    seen = set()
    for peer in peers:
        if peer["ip"] == node["ip"]:
            problems.append("peer %s: has this node's own IP %s" % (peer["name"], node["ip"]))
        if peer["name"] in seen:
            problems.append("peer %s: listed twice" % peer["name"])
        seen.add(peer["name"])
        for cidr in peer["pod_cidrs"]:
            net = ipaddress.ip_network(cidr)
            if any(net.overlaps(own) for own in node_pod):
                problems.append(
                    "peer %s: pod CIDR %s overlaps this node's %s" % (peer["name"], cidr, node["pod_cidrs"])
                )
    if problems:
        raise RoutingPlanError(problems)

    plan = RoutingPlan(mode=mode, node=node["name"])
    for peer in sorted(peers, key=lambda p: p["name"]):
        on_link = ipaddress.ip_address(peer["ip"]) in segment
        if mode == "tunnel" or (mode == "hybrid" and not on_link):
            how = "tunnel"
        elif on_link:
            how = "direct"
        elif external_router:
            how = "external"
        else:
            problems.append(
                "peer %s (%s): not on this node's segment %s, so direct routing cannot reach it; use mode "
                "hybrid or tunnel, or set routing_external_router: true if a router carries pod CIDRs"
                % (peer["name"], peer["ip"], segment)
            )
            continue
        plan.peer_modes[peer["name"]] = how
        v4_cidrs = [c for c in peer["pod_cidrs"] if ipaddress.ip_network(c).version == 4]
        if how == "direct":
            plan.routes += [Route(dst=c, via=peer["ip"], peer=peer["name"]) for c in peer["pod_cidrs"]]
        elif how == "tunnel":
            gateway = overlay_ip(v4_cidrs[0])
            mac = overlay_mac(peer["ip"])
            plan.fdb.append(FdbEntry(mac=mac, dst=peer["ip"], peer=peer["name"]))
            plan.neighbours.append(Neighbour(ip=gateway, mac=mac, peer=peer["name"]))
            plan.routes += [
                Route(dst=c, via=gateway, dev=VXLAN_DEVICE, onlink=True, peer=peer["name"]) for c in v4_cidrs
            ]
    if problems:
        raise RoutingPlanError(problems)
    if any(how == "tunnel" for how in plan.peer_modes.values()):
        plan.vxlan = {
            "name": VXLAN_DEVICE,
            "vni": VXLAN_VNI,
            "port": VXLAN_PORT,
            "local": node["ip"],
            "mtu": underlay_mtu - VXLAN_OVERHEAD,
            "mac": overlay_mac(node["ip"]),
            "address": overlay_ip([c for c in node["pod_cidrs"] if ipaddress.ip_network(c).version == 4][0]),
        }
    return plan
