# -*- coding: utf-8 -*-
# Copyright: clustermesh.core contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""Unit tests for plugins/module_utils/mesh_model.py."""

from __future__ import annotations

import copy
import time

import pytest

from ansible_collections.clustermesh.core.plugins.module_utils import mesh_model as mm
from ansible_collections.clustermesh.core.plugins.module_utils.mesh_model import (
    MeshValidationError,
    validate_inventory,
    validate_mesh,
)


def cluster(name: str, cid: int, *, nodes: int = 2, **extra) -> dict:
    """A valid cluster following the lab addressing: pods 10.<id>.0.0/16, nodes 198.18.<id>.1x."""
    c = {
        "name": name,
        "id": cid,
        "pod_cidrs": [f"10.{cid}.0.0/16"],
        "nodes": [{"name": f"{name}-n{i}", "ip": f"198.18.{cid % 256}.{10 + i}"} for i in range(1, nodes + 1)],
    }
    c.update(extra)
    return c


def mesh(n: int = 2, **extra) -> list[dict]:
    return [cluster(f"cluster{i}", i, **extra) for i in range(1, n + 1)]


def problems(clusters) -> list[mm.Problem]:
    with pytest.raises(MeshValidationError) as exc:
        validate_mesh(clusters)
    assert exc.value.problems, "MeshValidationError without problems"
    return exc.value.problems


def one_problem(clusters, path: str) -> mm.Problem:
    found = [p for p in problems(clusters) if p.path == path]
    assert len(found) == 1, f"expected one problem at {path}, got {[str(p) for p in problems(clusters)]}"
    return found[0]


# --- reusable validators --------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["c", "cluster1", "a-b", "0", "9-z", "a" * 32])
def test_valid_cluster_names(name):
    assert mm.cluster_name_error(name) is None
    assert mm.validate_cluster_name(name, 1) == name


@pytest.mark.parametrize(
    ("name", "fragment"),
    [
        ("Cluster2", "must match ^([a-z0-9][-a-z0-9]*)?[a-z0-9]$"),
        ("a" * 33, "it has 33 characters, at most 32"),
        ("cluster-", "must match"),
        ("-cluster", "must match"),
        ("clu_ster", "must match"),
        ("", "must not be empty"),
        (5, "must be a string"),
    ],
)
def test_invalid_cluster_names(name, fragment):
    assert fragment in mm.cluster_name_error(name)
    with pytest.raises(ValueError, match="is not a valid cluster name"):
        mm.validate_cluster_name(name)


def test_default_name_only_with_id_zero():
    assert mm.cluster_name_error("default") is None
    assert mm.cluster_name_error("default", 0) is None
    assert "only with cluster ID 0" in mm.cluster_name_error("default", 3)
    with pytest.raises(ValueError, match="'default' is reserved"):
        mm.validate_cluster_name("default", 3)


@pytest.mark.parametrize(
    ("cid", "maximum", "valid"),
    [
        (1, 255, True),
        (255, 255, True),
        (0, 255, False),
        (256, 255, False),
        (300, 511, True),
        (511, 511, True),
        (512, 511, False),
        (-1, 255, False),
        (True, 255, False),
        ("1", 255, False),
    ],
)
def test_cluster_id_valid(cid, maximum, valid):
    assert mm.cluster_id_valid(cid, maximum) is valid


def test_cluster_id_rejects_bad_maximum():
    with pytest.raises(ValueError, match="255 or 511"):
        mm.cluster_id_valid(1, 300)


def test_identity_ranges():
    assert mm.cluster_identity_range(1) == (65536, 131071)
    assert mm.cluster_identity_range(2, 255) == (2 << 16, (3 << 16) - 1)
    assert mm.cluster_identity_range(255, 255) == (255 << 16, (1 << 24) - 1)
    assert mm.cluster_id_shift(511) == 15
    assert mm.cluster_identity_range(1, 511) == (32768, 65535)
    assert mm.cluster_identity_range(300, 511) == (300 << 15, (301 << 15) - 1)
    assert mm.cluster_identity_range(511, 511)[1] == (1 << 24) - 1
    with pytest.raises(ValueError, match="0 is not a valid cluster ID"):
        mm.cluster_identity_range(0)
    with pytest.raises(ValueError):
        mm.cluster_identity_range(256, 255)


def test_identity_membership():
    assert mm.cluster_id_of_identity(65537) == 1
    assert mm.cluster_id_of_identity(65537, 511) == 2
    assert mm.identity_in_cluster_range(65536 + 100, 1)
    assert not mm.identity_in_cluster_range(2 << 16, 1)
    assert not mm.identity_in_cluster_range("65537", 1)
    with pytest.raises(ValueError):
        mm.cluster_id_of_identity(1 << 24)


def test_max_connected_clusters_error():
    assert mm.max_connected_clusters_error(255) is None
    assert mm.max_connected_clusters_error(511) is None
    assert "255 or 511" in mm.max_connected_clusters_error(256)
    assert mm.max_connected_clusters_error(True) is not None


# --- good meshes ----------------------------------------------------------------------------------


def test_two_cluster_mesh_normalised():
    m = validate_mesh(mesh(2))
    assert m.max_connected_clusters == 255
    assert m.warnings == ()
    c1, c2 = m.clusters
    assert (c1.name, c1.id, c2.name, c2.id) == ("cluster1", 1, "cluster2", 2)
    assert [n.ipv4_pod_cidr for n in c1.nodes] == ["10.1.0.0/24", "10.1.1.0/24"]
    assert [n.ipv4_pod_cidr for n in c2.nodes] == ["10.2.0.0/24", "10.2.1.0/24"]
    assert c1.connect_to == ("cluster2",) and c2.connect_to == ("cluster1",)
    assert c1.connected_from == ("cluster2",) and c2.connected_from == ("cluster1",)
    assert c1.kvstore_members == c1.kvstore_proxies == ("cluster1-n1",)
    assert c1.identity_range == (65536, 131071)
    assert c2.identity_range == (131072, 196607)
    assert m.node("cluster2-n2").ip == "198.18.2.12"
    assert m.cluster("cluster2").node("cluster2-n1").cluster_id == 2


def test_three_cluster_mesh_to_dict():
    raw = mesh(3)
    raw[0]["pod_cidrs"] = ["10.1.0.0/16", "fd00:1::/48"]
    raw[0]["nodes"][1]["pod_cidrs"] = ["10.1.0.0/24"]  # pinned: the other node skips it
    raw[0]["kvstore_members"] = ["cluster1-n1", "cluster1-n2", "cluster1-n3"]
    raw[0]["nodes"].append({"name": "cluster1-n3", "ip": "198.18.1.13"})
    raw[1]["connect_to"] = ["cluster1"]
    raw[2]["connect_to"] = "cluster1"  # a lone string is a one-element list
    raw[2]["kvstore_proxies"] = ["cluster3-n2"]
    before = copy.deepcopy(raw)
    d = validate_mesh({"clusters": raw}).to_dict()
    assert raw == before, "the input must not be modified"
    c1, c2, c3 = d["clusters"]
    assert c1["pod_cidrs"] == ["10.1.0.0/16", "fd00:1::/48"]
    assert c1["ipv6_pod_cidr"] == "fd00:1::/48" and c2["ipv6_pod_cidr"] is None
    assert [n["pod_cidrs"] for n in c1["nodes"]] == [
        ["10.1.1.0/24", "fd00:1::/112"],
        ["10.1.0.0/24", "fd00:1::1:0/112"],
        ["10.1.2.0/24", "fd00:1::2:0/112"],
    ]
    assert c1["connect_to"] == ["cluster2", "cluster3"]
    assert c1["connected_from"] == ["cluster2", "cluster3"]
    assert c2["connect_to"] == ["cluster1"] and c2["connected_from"] == ["cluster1"]
    assert c3["connect_to"] == ["cluster1"] and c3["connected_from"] == ["cluster1"]
    assert c1["kvstore_members"] == ["cluster1-n1", "cluster1-n2", "cluster1-n3"]
    assert c1["kvstore_proxies"] == ["cluster1-n1"]
    assert c3["kvstore_members"] == ["cluster3-n1"] and c3["kvstore_proxies"] == ["cluster3-n2"]
    assert c3["identity_range"] == [3 << 16, (4 << 16) - 1]
    assert d["max_connected_clusters"] == 255
    assert d["hosts"]["cluster3-n2"] == {
        "name": "cluster3-n2",
        "host": "cluster3-n2",
        "ip": "198.18.3.12",
        "cluster": "cluster3",
        "cluster_id": 3,
        "pod_cidrs": ["10.3.1.0/24"],
        "ipv4_pod_cidr": "10.3.1.0/24",
        "ipv6_pod_cidr": None,
    }
    assert d["warnings"] == []


def test_tenants_connect_only_to_shared_services():
    raw = [cluster("shared", 1), cluster("tenant-a", 2), cluster("tenant-b", 3)]
    raw[1]["connect_to"] = ["shared"]
    raw[2]["connect_to"] = ["shared"]
    m = validate_mesh(raw)
    assert m.cluster("shared").connect_to == ("tenant-a", "tenant-b")
    assert m.cluster("shared").connected_from == ("tenant-a", "tenant-b")
    assert m.cluster("tenant-a").connected_from == ("shared",)
    assert m.warnings == ()


def test_mode_511_accepts_300():
    raw = [cluster("a", 300, max_connected_clusters=511), cluster("b", 511, max_connected_clusters=511)]
    raw[0]["pod_cidrs"] = ["10.100.0.0/16"]
    raw[1]["pod_cidrs"] = ["10.101.0.0/16"]
    m = validate_mesh(raw)
    assert m.max_connected_clusters == 511
    assert m.cluster("a").identity_range == (300 << 15, (301 << 15) - 1)


def test_strings_from_extra_vars_are_accepted_as_integers():
    raw = mesh(2)
    raw[0]["id"] = "1"
    raw[0]["max_connected_clusters"] = "255"
    raw[1]["max_connected_clusters"] = 255
    assert validate_mesh(raw).clusters[0].id == 1


def test_single_cluster_mesh():
    m = validate_mesh([cluster("solo", 7, nodes=1)])
    assert m.clusters[0].connect_to == () and m.clusters[0].connected_from == ()


def test_ipv6_node_ips_and_canonical_cidrs():
    raw = mesh(2)
    raw[0]["pod_cidrs"] = ["FD00:1:0::/48", "10.1.0.0/16"]
    raw[0]["nodes"][0]["ip"] = "fd00:ffff::11"
    c = validate_mesh(raw).clusters[0]
    assert c.pod_cidrs == ["10.1.0.0/16", "fd00:1::/48"]
    assert c.nodes[0].ip == "fd00:ffff::11"


def test_warnings_one_way_connection_and_even_etcd_members():
    raw = mesh(2)
    raw[1]["connect_to"] = []
    raw[0]["kvstore_members"] = ["cluster1-n1", "cluster1-n2"]
    m = validate_mesh(raw)
    assert m.cluster("cluster1").connected_from == ()
    assert any("'cluster1' connects to 'cluster2' but 'cluster2' does not connect" in w for w in m.warnings)
    assert any("use an odd number" in w for w in m.warnings)


def test_allocation_skips_large_pinned_ipv6_block_quickly():
    raw = [cluster("c1", 1, nodes=3)]
    raw[0]["pod_cidrs"] = ["10.1.0.0/16", "fd00:1::/48"]
    raw[0]["nodes"][0]["pod_cidrs"] = ["fd00:1::/64"]  # covers 2**48 /112 blocks
    start = time.monotonic()
    c = validate_mesh(raw).clusters[0]
    assert time.monotonic() - start < 1
    assert [n.ipv6_pod_cidr for n in c.nodes] == ["fd00:1::/64", "fd00:1:0:1::/112", "fd00:1:0:1::1:0/112"]


def test_exact_fit():
    raw = [cluster("c1", 1, nodes=4)]
    raw[0]["pod_cidrs"] = ["10.1.0.0/22"]
    assert [n.ipv4_pod_cidr for n in validate_mesh(raw).clusters[0].nodes] == [
        "10.1.0.0/24",
        "10.1.1.0/24",
        "10.1.2.0/24",
        "10.1.3.0/24",
    ]


# --- bad input: each names field and value --------------------------------------------------------


def test_uppercase_name():
    raw = mesh(2)
    raw[1]["name"] = "Cluster2"
    p = one_problem(raw, "clusters[1].name")
    assert p.value == "Cluster2"
    assert str(p).startswith(
        "clusters[1].name: 'Cluster2' is not a valid cluster name: must match ^([a-z0-9][-a-z0-9]*)?[a-z0-9]$"
    )


def test_33_character_name():
    raw = mesh(2)
    raw[0]["name"] = "c" * 33
    assert str(one_problem(raw, "clusters[0].name")) == (
        f"clusters[0].name: '{'c' * 33}' is not a valid cluster name: it has 33 characters, at most 32 are allowed"
    )


def test_trailing_dash_name():
    raw = mesh(2)
    raw[0]["name"] = "cluster-"
    assert "'cluster-' is not a valid cluster name" in str(one_problem(raw, "clusters[0].name"))


def test_default_with_an_id():
    raw = mesh(2)
    raw[1]["name"] = "default"
    msg = str(one_problem(raw, "clusters[1].name"))
    assert msg.startswith("clusters[1].name: 'default' is reserved")
    assert "only with cluster ID 0" in msg and "ID 2" in msg


@pytest.mark.parametrize(
    ("cid", "fragment"),
    [
        (0, "0 means 'unset'"),
        (256, "must be from 1 to 255 with max_connected_clusters 255 (set max_connected_clusters to 511"),
        (-3, "must be from 1 to 255"),
        ("two", "must be an integer"),
        (True, "must be an integer"),
    ],
)
def test_bad_ids(cid, fragment):
    raw = mesh(2)
    raw[1]["id"] = cid
    p = one_problem(raw, "clusters[1].id")
    assert p.value == cid
    assert fragment in p.reason
    assert str(p).startswith(f"clusters[1].id: {cid!r} ")


def test_id_512_refused_in_511_mode():
    raw = [cluster("a", 512, max_connected_clusters=511), cluster("b", 2, max_connected_clusters=511)]
    assert "must be from 1 to 511" in one_problem(raw, "clusters[0].id").reason


def test_duplicate_ids_and_names():
    raw = mesh(3)
    raw[2]["id"] = 1
    raw[2]["pod_cidrs"] = ["10.3.0.0/16"]
    raw[1]["name"] = "cluster1"
    ps = {p.path: str(p) for p in problems(raw)}
    assert ps["clusters[2].id"] == (
        "clusters[2].id: 1 is already the cluster ID of clusters[0]: cluster IDs must be unique in the mesh"
    )
    assert ps["clusters[1].name"].startswith("clusters[1].name: 'cluster1' is already the cluster name of clusters[0]")


def test_max_connected_clusters_must_agree_and_be_valid():
    raw = mesh(3)
    raw[0]["max_connected_clusters"] = 511
    raw[1]["max_connected_clusters"] = 255
    raw[2]["max_connected_clusters"] = 300
    ps = {p.path: p for p in problems(raw)}
    assert ps["clusters[1].max_connected_clusters"].value == 255
    assert "differs from 511 in clusters[0].max_connected_clusters" in ps["clusters[1].max_connected_clusters"].reason
    assert "must be 255 or 511" in ps["clusters[2].max_connected_clusters"].reason


def test_max_connected_clusters_default_differs():
    raw = mesh(2)
    raw[1]["max_connected_clusters"] = 511
    p = one_problem(raw, "clusters[0].max_connected_clusters")
    assert str(p).startswith("clusters[0].max_connected_clusters is missing: it defaults to 255")


def test_overlapping_pod_cidrs():
    raw = mesh(2)
    raw[1]["pod_cidrs"] = ["10.1.128.0/17"]
    assert str(one_problem(raw, "clusters[1].pod_cidrs[0]")) == (
        "clusters[1].pod_cidrs[0]: '10.1.128.0/17' overlaps clusters[0].pod_cidrs[0] '10.1.0.0/16' "
        "(cluster 'cluster1'): pod CIDRs of different clusters must not overlap"
    )


def test_overlapping_ipv6_pod_cidrs():
    raw = mesh(2)
    raw[0]["pod_cidrs"] = ["10.1.0.0/16", "fd00::/32"]
    raw[1]["pod_cidrs"] = ["10.2.0.0/16", "fd00:0:1::/48"]
    assert "overlaps clusters[0].pod_cidrs[1] 'fd00::/32'" in str(one_problem(raw, "clusters[1].pod_cidrs[1]"))


@pytest.mark.parametrize(
    ("cidrs", "path", "fragment"),
    [
        (["10.1.0.5/16"], "clusters[0].pod_cidrs[0]", "has host bits set: did you mean '10.1.0.0/16'?"),
        (["10.1.0.0"], "clusters[0].pod_cidrs[0]", "the prefix length is missing"),
        (["10.1.0.0/33"], "clusters[0].pod_cidrs[0]", "is not a valid CIDR"),
        (["nonsense/8"], "clusters[0].pod_cidrs[0]", "is not a valid CIDR"),
        (["10.1.0.0/25"], "clusters[0].pod_cidrs[0]", "is too small: nodes get a /24 each"),
        (["10.1.0.0/16", "fd00::/120"], "clusters[0].pod_cidrs[1]", "is too small: nodes get a /112 each"),
        (["10.1.0.0/16", "10.9.0.0/16"], "clusters[0].pod_cidrs[1]", "is a second IPv4 pod CIDR"),
        (["fd00::/48"], "clusters[0].pod_cidrs", "has no IPv4 CIDR"),
        ([], "clusters[0].pod_cidrs", "must be a list"),
        ([16], "clusters[0].pod_cidrs[0]", "must be a string"),
    ],
)
def test_bad_cluster_pod_cidrs(cidrs, path, fragment):
    raw = mesh(2)
    raw[0]["pod_cidrs"] = cidrs
    assert fragment in one_problem(raw, path).reason


def test_not_enough_room_for_nodes():
    raw = [cluster("c1", 1, nodes=3)]
    raw[0]["pod_cidrs"] = ["10.1.0.0/23"]
    assert str(one_problem(raw, "clusters[0].pod_cidrs[0]")) == (
        "clusters[0].pod_cidrs[0]: '10.1.0.0/23' is too small: 3 nodes need a /24 each from it, "
        "but only 2 /24s fit; use a shorter prefix"
    )


def test_not_enough_room_counts_pinned_blocks():
    raw = [cluster("c1", 1, nodes=3)]
    raw[0]["pod_cidrs"] = ["10.1.0.0/22"]
    raw[0]["nodes"][0]["pod_cidrs"] = ["10.1.0.0/23"]  # 2 of the 4 /24s
    raw[0]["nodes"].append({"name": "c1-n4", "ip": "198.18.1.14"})
    reason = one_problem(raw, "clusters[0].pod_cidrs[0]").reason
    assert "3 nodes need a /24 each from it, but only 2 /24s fit besides the 1 given per node" in reason


def test_not_enough_room_passes_when_it_fits():
    raw = [cluster("c1", 1, nodes=3)]
    raw[0]["pod_cidrs"] = ["10.1.0.0/22"]
    raw[0]["nodes"][0]["pod_cidrs"] = ["10.1.0.0/23"]
    assert [n.ipv4_pod_cidr for n in validate_mesh(raw).clusters[0].nodes] == [
        "10.1.0.0/23",
        "10.1.2.0/24",
        "10.1.3.0/24",
    ]


def test_node_pod_cidr_outside_and_overlapping():
    raw = mesh(2)
    raw[0]["nodes"][0]["pod_cidrs"] = ["10.1.4.0/24"]
    raw[0]["nodes"][1]["pod_cidrs"] = ["10.1.4.128/25"]
    raw[1]["nodes"][0]["pod_cidrs"] = ["10.1.9.0/24"]
    raw[1]["nodes"][1]["pod_cidrs"] = ["fd00::/112"]
    ps = {p.path: str(p) for p in problems(raw)}
    assert ps["clusters[0].nodes[1].pod_cidrs[0]"] == (
        "clusters[0].nodes[1].pod_cidrs[0]: '10.1.4.128/25' overlaps '10.1.4.0/24' of "
        "clusters[0].nodes[0].pod_cidrs[0]: node pod CIDRs must not overlap"
    )
    assert ps["clusters[1].nodes[0].pod_cidrs[0]"] == (
        "clusters[1].nodes[0].pod_cidrs[0]: '10.1.9.0/24' is not inside the cluster's IPv4 pod CIDR "
        "'10.2.0.0/16' (clusters[1].pod_cidrs[0])"
    )
    assert "the cluster has no IPv6 pod CIDR" in ps["clusters[1].nodes[1].pod_cidrs[0]"]


def test_duplicate_node_ips():
    raw = mesh(2)
    raw[1]["nodes"][1]["ip"] = "198.18.1.11"
    assert str(one_problem(raw, "clusters[1].nodes[1].ip")) == (
        "clusters[1].nodes[1].ip: '198.18.1.11' is already the IP of clusters[0].nodes[0]: "
        "node IPs must be unique in the mesh"
    )


def test_duplicate_node_names():
    raw = mesh(2)
    raw[1]["nodes"][0]["name"] = "cluster1-n2"
    assert "'cluster1-n2' is already the name of clusters[0].nodes[1]" in str(
        one_problem(raw, "clusters[1].nodes[0].name")
    )


def test_node_ip_inside_a_pod_cidr():
    raw = mesh(2)
    raw[0]["nodes"][1]["ip"] = "10.2.3.4"  # inside the *other* cluster's pod CIDR
    assert str(one_problem(raw, "clusters[0].nodes[1].ip")) == (
        "clusters[0].nodes[1].ip: '10.2.3.4' is inside the pod CIDR '10.2.0.0/16' of clusters[1].pod_cidrs[0] "
        "(cluster 'cluster2'): node IPs must lie outside every pod CIDR"
    )


@pytest.mark.parametrize(
    ("ip", "fragment"),
    [
        ("198.18.1.300", "is not a valid IPv4 or IPv6 address"),
        ("198.18.1", "is not a valid IPv4 or IPv6 address"),
        ("127.0.0.1", "loopback"),
        ("0.0.0.0", "unspecified"),
        (3323068683, "must be a string"),
    ],
)
def test_bad_node_ips(ip, fragment):
    raw = mesh(2)
    raw[0]["nodes"][0]["ip"] = ip
    p = one_problem(raw, "clusters[0].nodes[0].ip")
    assert p.value == ip and fragment in p.reason


def test_connect_to_unknown_cluster():
    raw = mesh(2)
    raw[0]["connect_to"] = ["cluster2", "cluster9"]
    assert str(one_problem(raw, "clusters[0].connect_to[1]")) == (
        "clusters[0].connect_to[1]: 'cluster9' is not a cluster of this mesh (the others are: cluster2)"
    )


def test_connect_to_itself_and_twice():
    raw = mesh(3)
    raw[0]["connect_to"] = ["cluster1", "cluster2", "cluster2"]
    ps = {p.path: p.reason for p in problems(raw)}
    assert "is this cluster itself" in ps["clusters[0].connect_to[0]"]
    assert "is listed twice" in ps["clusters[0].connect_to[2]"]


def test_connect_to_an_invalidly_named_cluster_is_not_also_unknown():
    raw = mesh(2)
    raw[1]["name"] = "Cluster2"
    raw[0]["connect_to"] = ["Cluster2"]
    assert [p.path for p in problems(raw)] == ["clusters[1].name"]


def test_kvstore_members_and_proxies_must_be_nodes_of_the_cluster():
    raw = mesh(2)
    raw[0]["kvstore_members"] = ["cluster2-n1"]
    raw[0]["kvstore_proxies"] = []
    raw[1]["kvstore_proxies"] = ["cluster2-n1", "cluster2-n1"]
    ps = {p.path: str(p) for p in problems(raw)}
    assert ps["clusters[0].kvstore_members[0]"] == (
        "clusters[0].kvstore_members[0]: 'cluster2-n1' is not a node of this cluster "
        "(its nodes: cluster1-n1, cluster1-n2)"
    )
    assert "must be a non-empty list of node names" in ps["clusters[0].kvstore_proxies"]
    assert "is listed twice" in ps["clusters[1].kvstore_proxies[1]"]


def test_missing_fields_and_unknown_fields():
    raw = [{"nodes": [{"ip": "198.18.1.1", "adress": "x"}], "conect_to": []}]
    ps = {p.path: str(p) for p in problems(raw)}
    assert ps["clusters[0].name"].startswith("clusters[0].name is missing:")
    assert ps["clusters[0].id"].startswith("clusters[0].id is missing:")
    assert ps["clusters[0].pod_cidrs"].startswith("clusters[0].pod_cidrs is missing:")
    assert ps["clusters[0].nodes[0].name"].startswith("clusters[0].nodes[0].name is missing:")
    assert ps["clusters[0].conect_to"].startswith("clusters[0].conect_to: [] is not a known field")
    assert ps["clusters[0].nodes[0].adress"].startswith("clusters[0].nodes[0].adress: 'x' is not a known field")


@pytest.mark.parametrize(
    ("raw", "path"),
    [
        ([], "clusters"),
        ({"clusters": "c1"}, "clusters"),
        (["c1"], "clusters[0]"),
        ([{"name": "c1", "id": 1, "pod_cidrs": ["10.1.0.0/16"], "nodes": []}], "clusters[0].nodes"),
        ([{"name": "c1", "id": 1, "pod_cidrs": ["10.1.0.0/16"], "nodes": ["n1"]}], "clusters[0].nodes[0]"),
    ],
)
def test_structural_problems(raw, path):
    assert path in [p.path for p in problems(raw)]


def test_bad_node_names():
    raw = mesh(2)
    raw[0]["nodes"][0]["name"] = "bad/name"
    raw[0]["nodes"][1]["name"] = "-x"
    ps = {p.path: p for p in problems(raw)}
    assert ps["clusters[0].nodes[0].name"].value == "bad/name"
    assert "is not a valid node name" in ps["clusters[0].nodes[1].name"].reason
    # kvstore defaults are not reported on top of the bad name
    assert all("kvstore" not in path for path in ps)


def test_several_problems_reported_together():
    raw = mesh(3)
    raw[0]["name"] = "Cluster1"
    raw[1]["id"] = 0
    raw[2]["pod_cidrs"] = ["10.1.0.0/16"]
    raw[2]["nodes"][0]["ip"] = "198.18.1.11"
    raw[1]["nodes"][0]["ip"] = "10.1.0.9"
    raw[1]["connect_to"] = ["nowhere"]
    with pytest.raises(MeshValidationError) as exc:
        validate_mesh(raw)
    paths = [p.path for p in exc.value.problems]
    assert sorted(paths) == sorted(
        [
            "clusters[0].name",
            "clusters[1].id",
            "clusters[2].pod_cidrs[0]",
            "clusters[2].nodes[0].ip",
            "clusters[1].nodes[0].ip",  # inside cluster1's pod CIDR
            "clusters[1].nodes[0].ip",  # inside cluster3's (overlapping) pod CIDR too
            "clusters[1].connect_to[0]",
        ]
    )
    text = str(exc.value)
    assert text.startswith("7 problems in the mesh definition:\n- ")
    assert exc.value.messages() == [str(p) for p in exc.value.problems]
    assert "'Cluster1'" in text and "'nowhere'" in text and "'10.1.0.9'" in text


def test_problem_to_dict():
    raw = mesh(2)
    raw[1]["id"] = 0
    raw[1]["name"] = None
    ps = {p.path: p.to_dict() for p in problems(raw)}
    assert ps["clusters[1].id"] == {
        "path": "clusters[1].id",
        "value": 0,
        "reason": ps["clusters[1].id"]["reason"],
        "message": "clusters[1].id: 0 " + ps["clusters[1].id"]["reason"],
    }
    assert ps["clusters[1].name"]["value"] is None
    assert ps["clusters[1].name"]["message"].startswith("clusters[1].name is missing: ")


# --- from the inventory ---------------------------------------------------------------------------


def inventory():
    hostvars = {
        "c1-a": {"clustermesh_cluster_name": "cluster1", "clustermesh_node_ip": "198.18.1.11"},
        "c1-b": {"clustermesh_cluster_name": "cluster1", "clustermesh_node_ip": "198.18.1.12"},
        "c2-a": {
            "clustermesh_cluster_name": "cluster2",
            "clustermesh_node_ip": "198.18.2.11",
            "clustermesh_node_pod_cidrs": ["10.2.9.0/24"],
        },
        "other": {"unrelated": True},
    }
    for host in ("c1-a", "c1-b"):
        hostvars[host].update(
            clustermesh_cluster_id=1,
            clustermesh_pod_cidrs=["10.1.0.0/16"],
            clustermesh_kvstore_members=["c1-b"],
        )
    hostvars["c2-a"].update(clustermesh_cluster_id=2, clustermesh_pod_cidrs=["10.2.0.0/16"], clustermesh_connect_to=[])
    groups = {
        "all": ["c1-a", "c1-b", "c2-a", "other"],
        "clusters": ["c1-a", "c1-b", "c2-a"],
        "c1": ["c1-a", "c1-b"],
        "c2": ["c2-a"],
    }
    return hostvars, groups


def test_clusters_from_inventory():
    hostvars, groups = inventory()
    assert mm.clusters_from_inventory(hostvars, groups) == [
        {
            "name": "cluster1",
            "id": 1,
            "pod_cidrs": ["10.1.0.0/16"],
            "kvstore_members": ["c1-b"],
            "nodes": [
                {"name": "c1-a", "host": "c1-a", "ip": "198.18.1.11"},
                {"name": "c1-b", "host": "c1-b", "ip": "198.18.1.12"},
            ],
        },
        {
            "name": "cluster2",
            "id": 2,
            "pod_cidrs": ["10.2.0.0/16"],
            "connect_to": [],
            "nodes": [{"name": "c2-a", "host": "c2-a", "ip": "198.18.2.11", "pod_cidrs": ["10.2.9.0/24"]}],
        },
    ]


def test_validate_inventory():
    hostvars, groups = inventory()
    m = validate_inventory(hostvars, groups)
    assert m.to_dict()["hosts"]["c2-a"]["ipv4_pod_cidr"] == "10.2.9.0/24"
    assert m.cluster("cluster1").kvstore_members == ("c1-b",)
    assert m.cluster("cluster1").kvstore_proxies == ("c1-a",)
    assert m.cluster("cluster2").connected_from == ("cluster1",)
    assert len(m.warnings) == 1  # cluster1 -> cluster2 is one way


def test_inventory_problems_name_inventory_variables():
    hostvars, groups = inventory()
    hostvars["c1-b"]["clustermesh_cluster_id"] = 3  # set per host by mistake
    hostvars["c2-a"]["clustermesh_cluster_name"] = "Cluster2"
    hostvars["c2-a"]["clustermesh_node_ip"] = "10.1.0.7"
    del hostvars["c1-a"]["clustermesh_pod_cidrs"]
    del hostvars["c1-b"]["clustermesh_pod_cidrs"]
    groups["clusters"].append("stray")
    hostvars["stray"] = {"clustermesh_node_ip": "198.18.9.9"}
    with pytest.raises(MeshValidationError) as exc:
        validate_inventory(hostvars, groups)
    ps = {p.path: str(p) for p in exc.value.problems}
    assert ps["hostvars['c1-b'].clustermesh_cluster_id"].startswith(
        "hostvars['c1-b'].clustermesh_cluster_id: 3 differs from 1 on 'c1-a' (both in cluster 'cluster1'): "
        "set cluster variables in the group_vars"
    )
    assert ps["hostvars['c2-a'].clustermesh_cluster_name"].startswith(
        "hostvars['c2-a'].clustermesh_cluster_name: 'Cluster2' is not a valid cluster name"
    )
    assert ps["hostvars['c1-a'].clustermesh_pod_cidrs"].startswith("hostvars['c1-a'].clustermesh_pod_cidrs is missing")
    assert ps["hostvars['stray'].clustermesh_cluster_name"].startswith(
        "hostvars['stray'].clustermesh_cluster_name is missing: every host of group 'clusters' belongs to a cluster"
    )
    # node IP inside a pod CIDR is only checked once that CIDR is known (missing here): no report
    assert "hostvars['c2-a'].clustermesh_node_ip" not in ps


def test_inventory_node_ip_problem_path():
    hostvars, groups = inventory()
    hostvars["c2-a"]["clustermesh_node_ip"] = "10.1.0.7"
    with pytest.raises(MeshValidationError) as exc:
        validate_inventory(hostvars, groups)
    assert [str(p) for p in exc.value.problems] == [
        "hostvars['c2-a'].clustermesh_node_ip: '10.1.0.7' is inside the pod CIDR '10.1.0.0/16' of "
        "hostvars['c1-a'].clustermesh_pod_cidrs[0] (cluster 'cluster1'): node IPs must lie outside every pod CIDR"
    ]


def test_inventory_without_mesh_group():
    hostvars, groups = inventory()
    with pytest.raises(MeshValidationError) as exc:
        validate_inventory(hostvars, groups, mesh_group="meshes")
    assert str(exc.value.problems[0]).startswith("groups['meshes'] is missing: put every node of the mesh")
    with pytest.raises(MeshValidationError):
        mm.clusters_from_inventory(hostvars, groups, mesh_group="meshes")


def test_inventory_reads_only_clustermesh_variables():
    class Strict(dict):
        """Like a lazy HostVars: reading anything but clustermesh_* variables would fail."""

        def get(self, key, default=None):
            assert key.startswith("clustermesh_"), key
            return super().get(key, default)

        def __getitem__(self, key):
            raise AssertionError(f"hostvars[...][{key!r}] read")

        def keys(self):
            raise AssertionError("iterated")

        __iter__ = keys

    hostvars, groups = inventory()
    strict = {h: Strict(v) for h, v in hostvars.items()}
    assert validate_inventory(strict, groups).cluster("cluster2").id == 2


def test_routing_mode_defaults_to_tunnel_and_is_mesh_wide():
    assert validate_mesh(mesh(2)).to_dict()["routing_mode"] == "tunnel"
    assert validate_mesh(mesh(2, routing_mode="hybrid")).to_dict()["routing_mode"] == "hybrid"


def test_routing_mode_must_be_known_and_agree():
    raw = mesh(3)
    raw[0]["routing_mode"] = "direct"
    raw[1]["routing_mode"] = "tunnel"
    raw[2]["routing_mode"] = "bgp"
    ps = {p.path: p for p in problems(raw)}
    assert "differs from 'direct' in clusters[0].routing_mode" in ps["clusters[1].routing_mode"].reason
    assert "is not a routing mode: use one of tunnel, direct, hybrid" in ps["clusters[2].routing_mode"].reason


def test_routing_mode_default_differs_from_a_given_one():
    raw = mesh(2)
    raw[1]["routing_mode"] = "direct"
    p = one_problem(raw, "clusters[0].routing_mode")
    assert "it defaults to 'tunnel', but clusters[1].routing_mode is 'direct'" in p.reason
