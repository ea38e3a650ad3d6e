# -*- coding: utf-8 -*-
# Copyright: clustermesh.core contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""The agent's in-memory mesh state: what goes into the maps and what the node publishes."""

from __future__ import annotations

from ansible_collections.clustermesh.core.plugins.module_utils.agent_state import MeshState
from ansible_collections.clustermesh.core.plugins.module_utils.mesh_state import (
    KIND_IDENTITY,
    KIND_IPCACHE,
    KIND_NODE,
    KIND_SERVICE,
    Identity,
    identity_label_string,
    identity_labels,
    make_ipcache_entry,
    make_node_record,
)
from ansible_collections.clustermesh.core.plugins.module_utils.policy import (
    RESERVED_HOST,
    RESERVED_REMOTE_NODE,
    parse_policy,
)
from ansible_collections.clustermesh.core.plugins.module_utils.services import (
    build_cluster_service,
    make_declaration,
)
from ansible_collections.clustermesh.core.tests.policy_examples import ALLOW_CROSS_CLUSTER

ANNOTATIONS = {"service.cilium.io/global": "true"}


def declaration(cluster_ip="172.30.1.10", name="rebel-base", **annotations):
    return make_declaration(
        "default",
        name,
        cluster_ip,
        [{"name": "http", "port": 80}],
        {"name": "rebel-base"},
        dict(ANNOTATIONS, **annotations),
        {"type": "tcp", "interval": 1},
    )


def remote_service(cluster="cluster2", cluster_id=2, ips=("10.2.0.2", "10.2.1.2"), shared="true"):
    decl = declaration("172.30.2.10", **{"service.cilium.io/shared": shared})
    return build_cluster_service(decl, cluster, cluster_id, ips)


def backends(state, dirty=None):
    specs = state.frontends(dirty if dirty is not None else state.take_dirty().services)
    return {(s.ip, s.port, s.protocol): sorted((b.ip, b.cluster_id) for b in s.backends) for s in specs}


def mesh(**annotations):
    state = MeshState("cluster1", 1, "c1-n1")
    state.put_declaration(declaration(**annotations))
    state.put_slice("default", "rebel-base", "c1-n1", ["10.1.0.2"])
    state.put_slice("default", "rebel-base", "c1-n2", ["10.1.1.2"])
    svc = remote_service()
    state.apply_cluster_change("cluster2", KIND_SERVICE, "k", None, svc)
    return state, svc


FRONTEND = ("172.30.1.10", 80, "TCP")
LOCAL = [("10.1.0.2", 1), ("10.1.1.2", 1)]
REMOTE = [("10.2.0.2", 2), ("10.2.1.2", 2)]


def test_global_service_uses_every_clusters_backends():
    state, _svc = mesh()
    assert backends(state) == {FRONTEND: LOCAL + REMOTE}


def test_affinity_local_fails_over_when_the_local_slices_empty():
    state, _svc = mesh(**{"service.cilium.io/affinity": "local"})
    assert backends(state) == {FRONTEND: LOCAL}
    state.put_slice("default", "rebel-base", "c1-n1", [])
    state.put_slice("default", "rebel-base", "c1-n2", None)  # that agent's lease expired
    assert backends(state) == {FRONTEND: REMOTE}
    state.put_slice("default", "rebel-base", "c1-n1", ["10.1.0.2"])
    assert backends(state) == {FRONTEND: [("10.1.0.2", 1)]}


def test_a_remote_service_not_shared_is_not_used_and_a_removed_one_goes():
    state, svc = mesh()
    state.take_dirty()
    unshared = remote_service(shared="false")
    state.apply_cluster_change("cluster2", KIND_SERVICE, "k", svc, unshared)
    assert backends(state) == {FRONTEND: LOCAL}
    state.apply_cluster_change("cluster2", KIND_SERVICE, "k", unshared, svc)
    assert backends(state) == {FRONTEND: LOCAL + REMOTE}
    state.apply_cluster_change("cluster2", KIND_SERVICE, "k", svc, None)
    assert backends(state) == {FRONTEND: LOCAL}


def test_only_dirty_services_are_merged_again_and_removed_declarations_leave():
    state, _svc = mesh()
    assert backends(state) == {FRONTEND: LOCAL + REMOTE}
    assert state.take_dirty().services == frozenset()
    state.put_slice("default", "rebel-base", "c1-n1", ["10.1.0.2"])  # unchanged: nothing dirty
    assert not state.take_dirty().services
    state.delete_declaration("default", "rebel-base")
    assert backends(state) == {}


def test_two_declarations_of_one_cluster_ip_keep_the_first_and_say_why():
    state, _svc = mesh()
    state.put_declaration(declaration(name="rebel-copy"))
    assert backends(state) == {FRONTEND: LOCAL + REMOTE}
    assert state.conflicts == {("default", "rebel-copy"): "172.30.1.10:80/TCP is already default/rebel-base's"}


def test_exports_follow_global_and_shared():
    state, _svc = mesh()
    exported = state.exports()[("default", "rebel-base")]
    assert sorted(exported.backends) == ["10.1.0.2", "10.1.1.2"] and exported.shared
    state.put_declaration(declaration(**{"service.cilium.io/shared": "false"}))
    assert state.exports() == {("default", "rebel-base"): None}


def test_export_changes_follow_slices_and_declarations_but_not_remote_services():
    state, svc = mesh()
    assert state.take_export_changes() == {("default", "rebel-base")}
    state.apply_cluster_change("cluster2", KIND_SERVICE, "k", svc, remote_service(ips=("10.2.9.9",)))
    assert state.take_export_changes() == set()  # a remote change does not change what we export
    state.put_slice("default", "rebel-base", "c1-n2", ["10.1.1.2", "10.1.1.10", "10.1.1.9"])
    assert state.take_export_changes() == {("default", "rebel-base")}
    exported = state.exports({("default", "rebel-base")})[("default", "rebel-base")]
    assert list(exported.backends) == ["10.1.0.2", "10.1.1.2", "10.1.1.9", "10.1.1.10"]
    state.put_slice("default", "rebel-base", "c1-n1", None)
    state.put_slice("default", "rebel-base", "c1-n2", None)
    assert dict(state.exports()[("default", "rebel-base")].backends) == {}
    state.put_declaration(declaration(name="other", cluster_ip="172.30.1.11"))
    state.delete_declaration("default", "rebel-base")
    assert state.take_export_changes() == {("default", "rebel-base"), ("default", "other")}
    assert state.exports({("default", "rebel-base")}) == {("default", "rebel-base"): None}
    assert list(state.exports()) == [("default", "other")]


def test_cluster_backends_are_in_address_order():
    state, _svc = mesh()
    state.put_slice("default", "rebel-base", "c1-n1", ["10.1.0.100", "10.1.0.9", "fd00::2", "10.1.0.10"])
    state.put_slice("default", "rebel-base", "c1-n2", ["fd00::10", "10.1.0.9"])
    assert state.cluster_backends(("default", "rebel-base")) == [
        "10.1.0.9",
        "10.1.0.10",
        "10.1.0.100",
        "fd00::2",
        "fd00::10",
    ]


def test_a_node_publishes_no_slice_for_a_service_that_selects_none_of_its_endpoints():
    state, _svc = mesh()
    state.put_declaration(declaration(name="other", cluster_ip="172.30.1.11"))
    assert state.node_slices() == {}  # no endpoint on this node yet: nothing to publish
    state.put_endpoint({"containerID": "b", "ifname": "eth0", "ip": "10.1.0.3", "labels": {"name": "x-wing"}})
    assert state.node_slices() == {}
    state.put_endpoint({"containerID": "a", "ifname": "eth0", "ip": "10.1.0.2", "labels": {"name": "rebel-base"}})
    assert state.node_slices() == {("default", "rebel-base"): (), ("default", "other"): ()}  # selected, unprobed


def test_health_targets_and_node_slice_come_from_this_nodes_endpoints():
    state, _svc = mesh()
    state.put_endpoint({"containerID": "a", "ifname": "eth0", "ip": "10.1.0.2", "labels": {"name": "rebel-base"}})
    state.put_endpoint({"containerID": "b", "ifname": "eth0", "ip": "10.1.0.3", "labels": {"name": "x-wing"}})
    targets = state.health_targets()[("default", "rebel-base")]
    assert list(targets) == ["10.1.0.2"] and targets["10.1.0.2"].port == 80 and targets["10.1.0.2"].interval == 1
    assert state.node_slices() == {("default", "rebel-base"): ()}  # not healthy (yet)
    state.set_health(targets["10.1.0.2"], True)
    assert state.node_slices() == {("default", "rebel-base"): ("10.1.0.2",)}


def test_ipcache_has_every_cluster_and_this_nodes_endpoints_at_once():
    state = MeshState("cluster1", 1, "c1-n1")
    state.set_cluster_id("cluster2", 2)
    remote = make_ipcache_entry("10.2.0.2", 131072, "198.18.1.13")
    state.apply_cluster_change("cluster2", KIND_IPCACHE, "cilium/state/ip/v1/default/10.2.0.2", None, remote)
    state.put_endpoint({"containerID": "a", "ifname": "eth0", "ip": "10.1.0.2", "identity": 65536})
    assert state.take_dirty().ipcache
    specs = {s.prefix: (s.identity, s.tunnel_endpoint, s.cluster_id) for s in state.ipcache_specs("198.18.1.11")}
    assert specs == {
        "10.2.0.2/32": (131072, "198.18.1.13", 2),
        "10.1.0.2/32": (65536, "198.18.1.11", 1),
        "198.18.1.11/32": (RESERVED_HOST, "198.18.1.11", 1),  # this node: the host identity
    }
    state.apply_cluster_change("cluster2", KIND_IPCACHE, "cilium/state/ip/v1/default/10.2.0.2", remote, None)
    assert sorted(s.prefix for s in state.ipcache_specs("198.18.1.11")) == ["10.1.0.2/32", "198.18.1.11/32"]


# --- policy ------------------------------------------------------------------------------------------
def identity(cluster, number, **labels):
    labels.setdefault("io.kubernetes.pod.namespace", "default")
    text = identity_label_string(cluster, labels)
    return Identity(number, identity_labels(cluster, labels), text)


def add_identity(state, cluster, ident):
    state.apply_cluster_change(cluster, KIND_IDENTITY, f"cilium/state/identities/v1/id/{ident.id}", None, ident)


def policy_state():
    state = MeshState("cluster1", 1, "c1-n1")
    xwing = identity("cluster1", 65536, name="x-wing")
    add_identity(state, "cluster1", xwing)
    add_identity(state, "cluster1", identity("cluster1", 65537, name="rebel-base"))
    labels = {label.key: label.value for label in xwing.labels}
    state.put_endpoint(
        {
            "containerID": "a",
            "ifname": "eth0",
            "ip": "10.1.0.2",
            "identity": 65536,
            "identity_labels": labels,
            "ifindex": 9,
        }
    )
    state.put_endpoint(
        {"containerID": "b", "ifname": "eth0", "ip": "10.1.0.3", "identity": 65537, "ifindex": 10,
         "identity_labels": {"name": "rebel-base", "io.cilium.k8s.policy.cluster": "cluster1",
                             "io.kubernetes.pod.namespace": "default"}}
    )  # fmt: skip
    state.take_dirty()
    return state


def test_endpoints_are_written_unenforced_until_a_policy_selects_them():
    state = policy_state()
    specs = state.policy_specs()
    assert set(specs) == {9, 10}
    assert all(not s.ingress and not s.egress and not s.entries for s in specs.values())


def test_a_policy_and_a_remote_identity_make_the_endpoint_policy():
    state = policy_state()
    state.put_policy("default/CiliumNetworkPolicy/allow-cross-cluster", parse_policy(ALLOW_CROSS_CLUSTER))
    dirty = state.take_dirty()
    assert dirty.policy and not dirty.ipcache  # no CIDR in the policy: the ipcache is as it was
    xwing = state.policy_specs()[9]
    assert xwing.egress and not xwing.ingress and xwing.entries == frozenset()  # nothing in cluster2 yet
    assert state.policy_specs()[10].entries == frozenset() and not state.policy_specs()[10].egress

    add_identity(state, "cluster2", identity("cluster2", 131072, name="rebel-base"))
    assert state.take_dirty().policy  # a remote identity the policy selects
    assert {(e.direction, e.identity, e.port, e.protocol) for e in state.policy_specs()[9].entries} == {
        ("egress", 131072, 0, 0)
    }
    add_identity(state, "cluster2", identity("cluster2", 131073, name="tie-fighter"))
    assert not state.take_dirty().policy  # selected by nothing: no recompute

    report = state.endpoint_policy_report(state.endpoints[("a", "eth0")])
    assert report["enforced"] == {"ingress": False, "egress": True}
    assert report["policies"] == ["default/CiliumNetworkPolicy/allow-cross-cluster"]
    (row,) = report["entries_by_peer"]
    assert row["identity"] == 131072 and "name=rebel-base" in row["peer"] and row["protocol"] == "ANY"

    state.forget_cluster("cluster2")  # its identities go with it
    assert state.take_dirty().policy and state.policy_specs()[9].entries == frozenset()
    state.put_policy("default/CiliumNetworkPolicy/allow-cross-cluster", None)
    assert state.take_dirty().policy and not state.policy_specs()[9].egress


def test_policy_cidrs_and_node_addresses_are_ipcache_entries():
    state = policy_state()
    cidr_policy = {
        "apiVersion": "cilium.io/v2",
        "kind": "CiliumNetworkPolicy",
        "metadata": {"name": "to-outside"},
        "spec": {"endpointSelector": {"matchLabels": {"name": "x-wing"}}, "egress": [{"toCIDR": ["198.19.255.0/24"]}]},
    }
    state.replace_policies({"default/CiliumNetworkPolicy/to-outside": parse_policy(cidr_policy)})
    assert state.take_dirty().ipcache  # a new CIDR identity
    node = make_node_record("c2-n1", "cluster2", 2, [("InternalIP", "198.18.1.13")], ipv4_alloc_cidr="10.2.0.0/24")
    state.apply_cluster_change("cluster2", KIND_NODE, "cilium/state/nodes/v1/cluster2/c2-n1", None, node)
    specs = {s.prefix: s.identity for s in state.ipcache_specs("198.18.1.11")}
    assert specs["198.18.1.13/32"] == RESERVED_REMOTE_NODE and specs["198.18.1.11/32"] == RESERVED_HOST
    cidr_identity = specs["198.19.255.0/24"]
    assert cidr_identity >= 1 << 24
    assert {(e.identity, e.port) for e in state.policy_specs()[9].entries} == {(cidr_identity, 0)}
