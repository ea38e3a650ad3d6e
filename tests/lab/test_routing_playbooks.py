"""The routing layer through its playbooks, on lab hosts: what a user runs (routing.yml, connectivity.yml).

- bad input (direct mode with an off-link peer, an unknown mode, a node pod CIDR outside its cluster's,
  peers with the node's own IP)
  fails with a message naming the problem, and nothing is applied on any node;
- hybrid: on-link peers are routed directly, the routed peer through the tunnel (that every probe pod
  then reaches every other, by ICMP and TCP with the client's pod IP, is molecule scenario routing_hybrid's
  verify: connectivity.yml in hybrid mode on this same default topology);
- switching modes leaves no device, route or neighbour of the previous mode;
- check mode reports a missing route and applies nothing; the next run restores it and changes nothing else.

Lab prefix: cmq (the default lab: c1-n1, c1-n2, c2-n1 on dc1; c2-n2 alone on dc2 behind the router).
The per-mode connectivity and encapsulation checks are the molecule scenarios routing_*; the library's
own kernel-state tests are tests/lab/test_routing.py.
"""

from __future__ import annotations

import os

import pytest

from .labtools import REPO_ROOT, lab_session, playbook, run_in

pytestmark = pytest.mark.lab
if os.geteuid() != 0:
    pytest.skip("the lab needs root", allow_module_level=True)

PREFIX = "cmq"
ROUTING = os.path.join(REPO_ROOT, "playbooks", "routing.yml")
HOSTS = ("c1-n1", "c1-n2", "c2-n1", "c2-n2")
# no control plane in this lab: nothing for preflight to check on the kvstore ports
NO_KVSTORE = ("-e", '{"routing_preflight_kvstore_endpoints": []}')


def mode(name):
    return ("-e", "clustermesh_routing_mode=%s" % name, *NO_KVSTORE)


def owned_state(host):
    """Everything of ours on a host: devices, protocol-203 routes, neighbours and FDB of cm_vxlan, nft table."""
    script = (
        "ip -br link show | awk '$1 ~ /^cm_vxlan/ {print \"link\", $1}'; "
        "ip route show proto 203 | sed 's/^/route /'; "
        "ip neigh show dev cm_vxlan 2>/dev/null | sed 's/^/neigh /'; "
        "bridge fdb show dev cm_vxlan 2>/dev/null | grep dst | sed 's/^/fdb /'; "
        "nft list table ip clustermesh >/dev/null 2>&1 && echo nft clustermesh; true"
    )
    return run_in(PREFIX, host, "sh", "-c", script).stdout.split("\n")


def lines(state, kind):
    return [line for line in state if line.startswith(kind + " ")]


@pytest.fixture(scope="module")
def lab_up():
    with lab_session(PREFIX):
        yield


@pytest.mark.parametrize(
    "extra, message",
    [
        (mode("direct"), "c2-n2"),
        (mode("bgp"), "is not a routing mode: use one of tunnel, direct, hybrid"),
        (
            ("-e", '{"clustermesh_node_pod_cidrs": ["10.9.0.0/24"]}', *NO_KVSTORE),
            "clustermesh_node_pod_cidrs",
        ),
        # every node claims c1-n1's IP: each peer would have the node's own IP
        (("-e", "clustermesh_node_ip=198.18.1.11", *NO_KVSTORE), "is already the IP of"),
    ],
    ids=["direct-with-off-link-peer", "unknown-mode", "node-pod-cidr-outside-cluster", "peer-with-own-ip"],
)
def test_bad_input_fails_clearly_and_applies_nothing(lab_up, extra, message):
    run = playbook(PREFIX, ROUTING, *extra, check=False)
    assert run.returncode != 0
    assert message in run.output
    assert run.changed == []
    for host in HOSTS:
        assert [line for line in owned_state(host) if line] == [], host
        assert run_in(PREFIX, host, "sh", "-c", "ls /etc/cni/net.d 2>/dev/null; true").stdout.strip() == ""


def test_hybrid_routes_on_link_peers_directly_and_the_routed_peer_through_the_tunnel(lab_up):
    playbook(PREFIX, ROUTING, *mode("hybrid"))
    state = owned_state("c1-n1")
    routes = lines(state, "route")
    assert any("10.2.1.0/24" in r and "cm_vxlan" in r for r in routes), routes  # c2-n2
    assert any(r.startswith("route 10.2.0.0/24 via 198.18.1.13") for r in routes), routes  # c2-n1


def test_mode_switch_leaves_nothing_of_the_previous_mode(lab_up):
    # the lab is in hybrid mode (previous test)
    playbook(PREFIX, ROUTING, *mode("tunnel"))
    state = owned_state("c1-n1")
    routes = lines(state, "route")
    assert len(routes) == 3 and all("dev cm_vxlan" in r for r in routes), routes
    assert len(lines(state, "fdb")) == 3 and len(lines(state, "neigh")) == 3
    playbook(PREFIX, ROUTING, *mode("hybrid"))
    state = owned_state("c1-n1")
    routes = lines(state, "route")
    assert sorted(r.split()[1] for r in routes) == ["10.1.1.0/24", "10.2.0.0/24", "10.2.1.0/24"]
    assert [r for r in routes if "cm_vxlan" in r] == [r for r in routes if "10.2.1.0/24" in r]
    # only the routed peer keeps an FDB entry and a neighbour
    assert len(lines(state, "fdb")) == 1 and "198.18.2.11" in lines(state, "fdb")[0]
    assert len(lines(state, "neigh")) == 1
    # on c1-n2's segment-mate list nothing is tunnelled except c2-n2 either
    assert len(lines(owned_state("c1-n2"), "fdb")) == 1


def test_check_mode_applies_nothing_and_the_next_run_repairs(lab_up):
    # the lab is in hybrid mode (previous test)
    run_in(PREFIX, "c1-n1", "ip", "route", "del", "10.2.0.0/24", "proto", "203")
    check = playbook(PREFIX, ROUTING, "--check", *mode("hybrid"))
    assert check.changed_hosts() == ["c1-n1"], check.changed
    assert "10.2.0.0/24" not in run_in(PREFIX, "c1-n1", "ip", "route", "show", "proto", "203").stdout
    repair = playbook(PREFIX, ROUTING, *mode("hybrid"))
    assert repair.changed_hosts() == ["c1-n1"], repair.changed
    # the repair touched nothing else: the other nodes were already converged
    assert "10.2.0.0/24 via 198.18.1.13" in run_in(PREFIX, "c1-n1", "ip", "route", "show", "proto", "203").stdout
