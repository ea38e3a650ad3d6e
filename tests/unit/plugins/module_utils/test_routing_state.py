"""routing_state: the difference between a routing plan and the state we own, and how it is applied.

Pure functions over a fake owned state and a fake netlink socket; the real kernel is in
tests/lab/test_routing.py.
"""

from __future__ import annotations

import pytest

from ansible_collections.clustermesh.core.plugins.module_utils import routing_state as rs
from ansible_collections.clustermesh.core.plugins.module_utils.routing_plan import overlay_mac, plan_routing

NODE = {"name": "c1-n1", "ip": "198.18.1.11", "pod_cidrs": ["10.1.0.0/24"]}
PEERS = [
    {"name": "c1-n2", "cluster": "cluster1", "ip": "198.18.1.12", "pod_cidrs": ["10.1.1.0/24"]},  # on-link
    {"name": "c2-n1", "cluster": "cluster2", "ip": "198.18.1.13", "pod_cidrs": ["10.2.0.0/24"]},  # on-link
    {"name": "c2-n2", "cluster": "cluster2", "ip": "198.18.2.11", "pod_cidrs": ["10.2.1.0/24"]},  # routed
]
UNDERLAY = {"ifname": "eth0", "index": 2, "prefixlen": 24, "mtu": 1500}
MAC_N2 = overlay_mac("198.18.1.12")
MAC_C2N2 = overlay_mac("198.18.2.11")


def plan(mode, peers=None, **kw):
    return plan_routing(NODE, PEERS if peers is None else peers, mode, UNDERLAY["prefixlen"], UNDERLAY["mtu"], **kw)


def applied(mode, **kw):
    """The owned state once a plan in ``mode`` has been applied (what read_owned would return)."""
    want, unused = rs.desired_state(plan(mode, **kw), UNDERLAY)
    want.vxlan = dict(want.vxlan, index=7) if want.vxlan else None
    return want


def texts(changes):
    return [c.text for c in changes]


def test_tunnel_from_nothing_creates_device_then_l2_then_routes():
    changes = texts(rs.diff(plan("tunnel"), rs.OwnedState(ip_forward=False), UNDERLAY))
    assert changes[0] == "set net.ipv4.ip_forward = 1 (was 0)"
    assert changes[1] == (
        "create link cm_vxlan vxlan id 2 local 198.18.1.11 dev eth0 dstport 8472 nolearning "
        "address 0e:cb:c6:12:01:0b mtu 1450"
    )
    assert changes[2:4] == ["add address 10.1.0.1/32 dev cm_vxlan", "set cm_vxlan up"]
    assert "append fdb %s dst 198.18.2.11 dev cm_vxlan self permanent" % MAC_C2N2 in changes
    assert "add neighbour 10.2.1.1 lladdr %s dev cm_vxlan nud permanent" % MAC_C2N2 in changes
    assert changes[-3:] == [
        "add route 10.1.1.0/24 via 10.1.1.1 dev cm_vxlan onlink proto 203",
        "add route 10.2.0.0/24 via 10.2.0.1 dev cm_vxlan onlink proto 203",
        "add route 10.2.1.0/24 via 10.2.1.1 dev cm_vxlan onlink proto 203",
    ]
    # everything the routes need exists before the first route
    first_route = min(i for i, t in enumerate(changes) if "route" in t)
    assert all("route" not in t for t in changes[:first_route])
    assert first_route == len(changes) - 3


@pytest.mark.parametrize("mode, kw", [("tunnel", {}), ("hybrid", {}), ("direct", {"external_router": True})])
def test_applied_state_needs_no_changes(mode, kw):
    assert rs.diff(plan(mode, **kw), applied(mode, **kw), UNDERLAY) == []


def test_ip_forward_is_only_set_when_off():
    owned = applied("tunnel")
    owned.ip_forward = True
    assert rs.diff(plan("tunnel"), owned, UNDERLAY) == []
    owned.ip_forward = False
    assert texts(rs.diff(plan("tunnel"), owned, UNDERLAY)) == ["set net.ipv4.ip_forward = 1 (was 0)"]


def test_tunnel_to_hybrid_replaces_routes_in_place_and_drops_l2_of_direct_peers_after():
    changes = texts(rs.diff(plan("hybrid"), applied("tunnel"), UNDERLAY))
    assert changes == [
        "replace route 10.1.1.0/24 via 198.18.1.12 dev eth0 proto 203 (was via 10.1.1.1 dev cm_vxlan onlink proto 203)",
        "replace route 10.2.0.0/24 via 198.18.1.13 dev eth0 proto 203 (was via 10.2.0.1 dev cm_vxlan onlink proto 203)",
        "delete fdb %s dst 198.18.1.12 dev cm_vxlan" % MAC_N2,
        "delete fdb %s dst 198.18.1.13 dev cm_vxlan" % overlay_mac("198.18.1.13"),
        "delete neighbour 10.1.1.1 lladdr %s dev cm_vxlan" % MAC_N2,
        "delete neighbour 10.2.0.1 lladdr %s dev cm_vxlan" % overlay_mac("198.18.1.13"),
    ]


def test_hybrid_to_direct_removes_the_tunnel_device_last():
    changes = rs.diff(plan("direct", external_router=True), applied("hybrid"), UNDERLAY)
    assert texts(changes) == [
        "delete route 10.2.1.0/24 via 10.2.1.1 dev cm_vxlan onlink proto 203",
        "delete link cm_vxlan (with its 1 FDB entries and 1 neighbours)",
    ]


def test_direct_to_tunnel_creates_the_device_before_replacing_routes():
    changes = rs.diff(plan("tunnel"), applied("direct", external_router=True), UNDERLAY)
    kinds = [(c.kind, c.action) for c in changes]
    assert kinds.index(("link", "create")) < kinds.index(("route", "replace"))
    routes = [c.text for c in changes if c.kind == "route"]
    assert routes == [
        "replace route 10.1.1.0/24 via 10.1.1.1 dev cm_vxlan onlink proto 203 (was via 198.18.1.12 dev eth0 proto 203)",
        "replace route 10.2.0.0/24 via 10.2.0.1 dev cm_vxlan onlink proto 203 (was via 198.18.1.13 dev eth0 proto 203)",
        "add route 10.2.1.0/24 via 10.2.1.1 dev cm_vxlan onlink proto 203",
    ]
    assert not [c for c in changes if c.action == "delete"]


def test_absent_removes_everything_ours_and_leaves_ip_forward():
    owned = applied("hybrid")
    changes = rs.diff(None, owned)
    assert texts(changes) == [
        "delete route 10.1.1.0/24 via 198.18.1.12 dev eth0 proto 203",
        "delete route 10.2.0.0/24 via 198.18.1.13 dev eth0 proto 203",
        "delete route 10.2.1.0/24 via 10.2.1.1 dev cm_vxlan onlink proto 203",
        "delete link cm_vxlan (with its 1 FDB entries and 1 neighbours)",
    ]
    assert rs.diff(None, rs.OwnedState(ip_forward=True)) == []


def test_device_with_other_identity_is_recreated_and_its_routes_added_again():
    owned = applied("tunnel")
    owned.vxlan = dict(owned.vxlan, vni=3, local="198.18.1.99")
    changes = rs.diff(plan("tunnel"), owned, UNDERLAY)
    assert changes[0].text.startswith("recreate link cm_vxlan vxlan id 2 local 198.18.1.11")
    assert "vni 3 -> 2" in changes[0].text and "local 198.18.1.99 -> 198.18.1.11" in changes[0].text
    actions = {(c.kind, c.action) for c in changes}
    # the old device took its FDB, neighbours and routes with it: all are added again, none deleted
    assert ("fdb", "append") in actions and ("neighbour", "replace") in actions
    assert not [c for c in changes if c.action == "delete"]
    assert len([c for c in changes if c.kind == "route"]) == 3
    assert "add address 10.1.0.1/32 dev cm_vxlan" in texts(changes)


@pytest.mark.parametrize(
    "field, value", [("port", 4789), ("link", "eth1"), ("learning", True), ("mac", "02:00:00:00:00:01")]
)
def test_any_identity_change_recreates(field, value):
    owned = applied("tunnel")
    owned.vxlan = dict(owned.vxlan, **{field: value})
    assert rs.diff(plan("tunnel"), owned, UNDERLAY)[0].action == "recreate"


def test_mtu_down_device_and_stray_address_are_fixed_in_place():
    owned = applied("tunnel")
    owned.vxlan = dict(owned.vxlan, mtu=1400, up=False, addresses=["10.1.0.1/32", "10.9.9.9/24"])
    assert texts(rs.diff(plan("tunnel"), owned, UNDERLAY)) == [
        "set cm_vxlan mtu 1450 (was 1400)",
        "delete address 10.9.9.9/24 dev cm_vxlan",
        "set cm_vxlan up",
    ]


def test_wrong_and_stale_l2_entries():
    owned = applied("hybrid")
    owned.fdb = [(MAC_C2N2, "198.18.9.9"), ("0e:cb:00:00:00:01", "198.18.1.77")]
    owned.neighbours = [("10.2.1.1", "0e:cb:00:00:00:02"), ("10.7.0.1", "0e:cb:00:00:00:01")]
    changes = texts(rs.diff(plan("hybrid"), owned, UNDERLAY))
    assert changes == [
        # the wrong destination of a wanted MAC goes first, then the right one
        "delete fdb %s dst 198.18.9.9 dev cm_vxlan" % MAC_C2N2,
        "append fdb %s dst 198.18.2.11 dev cm_vxlan self permanent" % MAC_C2N2,
        "replace neighbour 10.2.1.1 lladdr %s dev cm_vxlan nud permanent" % MAC_C2N2,
        # entries of peers no longer there go last
        "delete fdb 0e:cb:00:00:00:01 dst 198.18.1.77 dev cm_vxlan",
        "delete neighbour 10.7.0.1 lladdr 0e:cb:00:00:00:01 dev cm_vxlan",
    ]


def test_stale_routes_of_ours_are_deleted_including_other_metric_and_ipv6():
    owned = applied("hybrid")
    owned.routes += [
        rs.OwnedRoute(dst="10.9.0.0/24", via="198.18.1.50", dev="eth0"),
        rs.OwnedRoute(dst="10.1.1.0/24", via="198.18.1.12", dev="eth0", priority=100),
        rs.OwnedRoute(dst="fd00:9::/64", via=None, dev="eth0", family=6),
    ]
    assert texts(rs.diff(plan("hybrid"), owned, UNDERLAY)) == [
        "delete route 10.1.1.0/24 via 198.18.1.12 dev eth0 proto 203 metric 100",
        "delete route 10.9.0.0/24 via 198.18.1.50 dev eth0 proto 203",
        "delete route fd00:9::/64 dev eth0 proto 203",
    ]


def test_foreign_route_in_the_way_is_an_error_naming_it():
    owned = rs.OwnedState(ip_forward=True, foreign_routes={"10.2.1.0/24": 4, "198.18.1.0/24": 2})
    with pytest.raises(rs.RoutingStateError, match=r"route 10.2.1.0/24: .*protocol 4 \(static\), not ours \(203\)"):
        rs.diff(plan("tunnel"), owned, UNDERLAY)


def test_foreign_vxlan_device_on_our_port():
    owned = rs.OwnedState(
        ip_forward=True, foreign_vxlan=[{"name": "vx-md", "port": 8472, "vni": None, "external": True}]
    )
    with pytest.raises(rs.RoutingStateError, match="device vx-md: .*collect-metadata.*cm_vxlan"):
        rs.diff(plan("tunnel"), owned, UNDERLAY)
    # not in the way of direct routing, nor on another VNI
    rs.diff(plan("direct", external_router=True), owned, UNDERLAY)
    owned.foreign_vxlan = [{"name": "vx9", "port": 8472, "vni": 9, "external": False}]
    rs.diff(plan("tunnel"), owned, UNDERLAY)


def test_ipv6_pod_cidrs_are_skipped_with_a_warning():
    peers = [dict(PEERS[0], pod_cidrs=["10.1.1.0/24", "fd00:1:1::/64"])]
    want, warnings = rs.desired_state(plan("direct", peers=peers), UNDERLAY)
    assert [r.dst for r in want.routes] == ["10.1.1.0/24"]
    assert warnings == [
        "peer c1-n2: pod CIDR fd00:1:1::/64 skipped (the underlay is IPv4; IPv6 pod routes are not supported)"
    ]


def test_state_text_is_one_object_per_line():
    text = rs.state_text(applied("hybrid"))
    assert text.splitlines() == [
        "net.ipv4.ip_forward = 1",
        "link cm_vxlan vxlan id 2 local 198.18.1.11 dev eth0 dstport 8472 nolearning address 0e:cb:c6:12:01:0b "
        "mtu 1450 up",
        "address 10.1.0.1/32 dev cm_vxlan",
        "fdb %s dst 198.18.2.11 dev cm_vxlan" % MAC_C2N2,
        "neighbour 10.2.1.1 lladdr %s dev cm_vxlan permanent" % MAC_C2N2,
        "route 10.1.1.0/24 via 198.18.1.12 dev eth0 proto 203",
        "route 10.2.0.0/24 via 198.18.1.13 dev eth0 proto 203",
        "route 10.2.1.0/24 via 10.2.1.1 dev cm_vxlan onlink proto 203",
    ]


# --- apply() against a fake netlink socket ----------------------------------------------------------


class FakeIPR:
    def __init__(self, links=None, fail=None):
        self.links = dict(links or {"eth0": 2})
        self.calls = []
        self.fail = fail

    def _record(self, *call, **kw):
        self.calls.append((call, kw))
        if self.fail and self.fail == call:
            raise OSError(17, "File exists")

    def link_lookup(self, ifname):
        return [self.links[ifname]] if ifname in self.links else []

    def link(self, op, **kw):
        self._record("link", op, **kw)
        if op == "add":
            self.links[kw["ifname"]] = 7
        elif op == "del":
            self.links = {k: v for k, v in self.links.items() if v != kw["index"]}

    def addr(self, op, **kw):
        self._record("addr", op, **kw)

    def fdb(self, op, **kw):
        self._record("fdb", op, **kw)

    def neigh(self, op, **kw):
        self._record("neigh", op, **kw)

    def route(self, op, **kw):
        self._record("route", op, **kw)


def test_apply_turns_changes_into_netlink_calls(tmp_path):
    forward = tmp_path / "ip_forward"
    forward.write_text("0\n")
    ipr = FakeIPR()
    rs.apply(ipr, rs.diff(plan("hybrid"), rs.OwnedState(ip_forward=False), UNDERLAY), ip_forward_path=str(forward))
    assert forward.read_text() == "1\n"
    calls = {(c[0], c[1]): kw for c, kw in ipr.calls}
    vx = [kw for c, kw in ipr.calls if c == ("link", "add")][0]
    assert vx == dict(
        ifname="cm_vxlan",
        kind="vxlan",
        vxlan_id=2,
        vxlan_port=8472,
        vxlan_local="198.18.1.11",
        vxlan_link=2,
        vxlan_learning=0,
        address="0e:cb:c6:12:01:0b",
        mtu=1450,
    )
    assert calls[("addr", "add")] == dict(index=7, address="10.1.0.1", prefixlen=32)
    assert calls[("fdb", "append")] == dict(ifindex=7, lladdr=MAC_C2N2, dst="198.18.2.11")
    assert calls[("neigh", "replace")] == dict(dst="10.2.1.1", lladdr=MAC_C2N2, ifindex=7, state=0x80)
    routes = [kw for c, kw in ipr.calls if c == ("route", "replace")]
    assert {(r["dst"], r["dst_len"], r["gateway"], r["oif"], r["flags"]) for r in routes} == {
        ("10.1.1.0", 24, "198.18.1.12", 2, 0),
        ("10.2.0.0", 24, "198.18.1.13", 2, 0),
        ("10.2.1.0", 24, "10.2.1.1", 7, 4),  # onlink through cm_vxlan
    }
    assert {r["proto"] for r in routes} == {203} and {r["table"] for r in routes} == {254}


def test_apply_deletes_only_our_protocol_and_names_the_failing_change():
    ipr = FakeIPR(links={"eth0": 2, "cm_vxlan": 7})
    rs.apply(ipr, rs.diff(None, applied("hybrid")))
    deletes = [kw for c, kw in ipr.calls if c == ("route", "del")]
    assert len(deletes) == 3 and {d["proto"] for d in deletes} == {203}
    assert ipr.calls[-1] == (("link", "del"), {"index": 7})

    failing = FakeIPR(fail=("route", "replace"))
    with pytest.raises(rs.RoutingStateError) as exc:
        rs.apply(failing, rs.diff(plan("direct", peers=PEERS[:1]), rs.OwnedState(ip_forward=True), UNDERLAY))
    assert str(exc.value) == (
        "add route 10.1.1.0/24 via 198.18.1.12 dev eth0 proto 203: File exists (errno 17) "
        "(the 0 changes before it were applied)"
    )


class AddrIPR(FakeIPR):
    def __init__(self, addresses):
        super().__init__()
        self.addresses = addresses

    def get_addr(self, family):
        names = {v: k for k, v in self.links.items()}
        return [dict(IFA_LOCAL=ip, IFA_LABEL=names[idx], prefixlen=plen, index=idx) for ip, plen, idx in self.addresses]

    def link(self, op, index=None, **kw):
        names = {v: k for k, v in self.links.items()}
        return [{"IFLA_IFNAME": names[index], "IFLA_MTU": 9000}]


def test_underlay_is_the_interface_holding_the_node_ip():
    ipr = AddrIPR([("127.0.0.1", 8, 1), ("198.18.1.11", 32, 1), ("198.18.1.11", 24, 2)])
    ipr.links["lo"] = 1
    assert rs.underlay_link(ipr, "198.18.1.11") == {"ifname": "eth0", "index": 2, "prefixlen": 24, "mtu": 9000}
    with pytest.raises(rs.RoutingStateError, match="node ip 198.18.9.9: no interface of this node holds it"):
        rs.underlay_link(ipr, "198.18.9.9")
    with pytest.raises(rs.RoutingStateError, match="underlay_interface: this node has no interface named 'eth9'"):
        rs.underlay_link(ipr, "198.18.1.11", ifname="eth9")
