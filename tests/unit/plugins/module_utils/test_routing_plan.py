"""The routing planner: which peers are direct, tunnelled or external, and what each needs."""

from __future__ import annotations

import pytest

from ansible_collections.clustermesh.core.plugins.module_utils.routing_plan import (
    RoutingPlanError,
    overlay_mac,
    plan_routing,
)

NODE = {"name": "c1-n1", "ip": "198.18.1.11", "pod_cidrs": ["10.1.0.0/24"]}
PEERS = [
    {"name": "c1-n2", "cluster": "cluster1", "ip": "198.18.1.12", "pod_cidrs": ["10.1.1.0/24"]},  # on-link
    {"name": "c2-n1", "cluster": "cluster2", "ip": "198.18.1.13", "pod_cidrs": ["10.2.0.0/24"]},  # on-link
    {"name": "c2-n2", "cluster": "cluster2", "ip": "198.18.2.11", "pod_cidrs": ["10.2.1.0/24"]},  # routed
]


def test_tunnel_mode_tunnels_every_peer():
    plan = plan_routing(NODE, PEERS, "tunnel", 24)
    assert set(plan.peer_modes.values()) == {"tunnel"}
    assert plan.vxlan["port"] == 8472 and plan.vxlan["mtu"] == 1450
    assert plan.vxlan["address"] == "10.1.0.1"
    routes = {r.dst: r for r in plan.routes}
    assert routes["10.2.1.0/24"].via == "10.2.1.1" and routes["10.2.1.0/24"].onlink
    assert routes["10.2.1.0/24"].dev == "cm_vxlan"
    assert {f.dst for f in plan.fdb} == {"198.18.1.12", "198.18.1.13", "198.18.2.11"}
    # the neighbour entry and the FDB entry agree on the peer's MAC: no ARP over the overlay
    for n in plan.neighbours:
        assert any(f.mac == n.mac and f.peer == n.peer for f in plan.fdb)


def test_hybrid_is_direct_on_link_and_tunnel_elsewhere():
    plan = plan_routing(NODE, PEERS, "hybrid", 24)
    assert plan.peer_modes == {"c1-n2": "direct", "c2-n1": "direct", "c2-n2": "tunnel"}
    direct = [r for r in plan.routes if r.dev is None]
    assert {(r.dst, r.via) for r in direct} == {("10.1.1.0/24", "198.18.1.12"), ("10.2.0.0/24", "198.18.1.13")}
    assert [f.dst for f in plan.fdb] == ["198.18.2.11"]


def test_direct_without_tunnel_device():
    peers = PEERS[:2]
    plan = plan_routing(NODE, peers, "direct", 24)
    assert plan.vxlan is None and plan.fdb == []
    assert {r.via for r in plan.routes} == {"198.18.1.12", "198.18.1.13"}


def test_direct_with_off_link_peer_is_an_error_unless_external_router():
    with pytest.raises(RoutingPlanError, match="c2-n2 .*not on this node's segment 198.18.1.0/24"):
        plan_routing(NODE, PEERS, "direct", 24)
    plan = plan_routing(NODE, PEERS, "direct", 24, external_router=True)
    assert plan.peer_modes["c2-n2"] == "external"
    assert not [r for r in plan.routes if r.peer == "c2-n2"]


def test_bad_input_lists_every_problem():
    peers = [dict(PEERS[0], ip=NODE["ip"]), dict(PEERS[1], pod_cidrs=["10.1.0.0/25"])]
    with pytest.raises(RoutingPlanError) as exc:
        plan_routing(NODE, peers, "bogus", 24)
    text = str(exc.value)
    assert "mode: 'bogus'" in text
    assert "c1-n2: has this node's own IP" in text
    assert "c2-n1: pod CIDR 10.1.0.0/25 overlaps" in text


def test_overlay_mac_is_stable_and_local():
    assert overlay_mac("198.18.1.11") == "0e:cb:c6:12:01:0b"
    assert int(overlay_mac("198.18.1.11")[:2], 16) & 0x02  # locally administered


def _three_clusters():
    from ansible_collections.clustermesh.core.plugins.module_utils.mesh_model import validate_mesh

    return validate_mesh(
        [
            {
                "name": "cluster1",
                "id": 1,
                "pod_cidrs": ["10.1.0.0/16"],
                "nodes": [{"name": "c1-n1", "ip": "198.18.1.11"}, {"name": "c1-n2", "ip": "198.18.1.12"}],
                "connect_to": ["cluster2"],
            },
            {
                "name": "cluster2",
                "id": 2,
                "pod_cidrs": ["10.2.0.0/16"],
                "nodes": [{"name": "c2-n1", "ip": "198.18.2.11"}],
                "connect_to": ["cluster1"],
            },
            {
                "name": "tenant",
                "id": 3,
                "pod_cidrs": ["10.3.0.0/16"],
                "nodes": [{"name": "t-n1", "ip": "198.18.3.11"}],
                "connect_to": ["cluster1"],
            },
        ]
    ).to_dict()


def test_routing_inputs_cover_own_cluster_and_both_directions_of_connections():
    from ansible_collections.clustermesh.core.plugins.module_utils.routing_plan import routing_inputs

    mesh = _three_clusters()
    c1 = routing_inputs(mesh, "c1-n1")
    assert c1["node"]["ip"] == "198.18.1.11" and len(c1["node"]["pod_cidrs"]) == 1
    # cluster1 connects to cluster2 and tenant connects to cluster1: both are peers (replies route back)
    assert {p["name"] for p in c1["peers"]} == {"c1-n2", "c2-n1", "t-n1"}
    assert c1["mesh_pod_cidrs"] == ["10.1.0.0/16", "10.2.0.0/16", "10.3.0.0/16"]
    # cluster2 and tenant are not connected: neither routes to the other
    assert {p["name"] for p in routing_inputs(mesh, "c2-n1")["peers"]} == {"c1-n1", "c1-n2"}
    assert {p["name"] for p in routing_inputs(mesh, "t-n1")["peers"]} == {"c1-n1", "c1-n2"}
    # the inputs plan without problems
    plan_routing(c1["node"], c1["peers"], "tunnel", 24)
    with pytest.raises(KeyError, match="not a node"):
        routing_inputs(mesh, "nope")


def test_pod_mtu_leaves_room_for_vxlan_when_anything_may_be_tunnelled():
    from ansible_collections.clustermesh.core.plugins.module_utils.routing_plan import pod_mtu

    assert pod_mtu("direct", 1500) == 1500
    assert pod_mtu("tunnel", 1500) == 1450
    assert pod_mtu("hybrid", 9000) == 8950
