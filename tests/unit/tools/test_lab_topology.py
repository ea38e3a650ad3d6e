"""Validation of lab topology files (tools/labkit/topology.py); no root needed."""

import copy
import os
import sys

import pytest

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
sys.path.insert(0, os.path.join(REPO_ROOT, "tools"))

from labkit import cli, inventory  # noqa: E402
from labkit.state import Lab, LabError, check_prefix  # noqa: E402
from labkit.topology import (  # noqa: E402
    IFNAMSIZ,
    TopologyError,
    host_fabric_port,
    load_topology,
    parse_topology,
    parse_topology_text,
)

BASE = {
    "clusters": {
        "cluster1": {"id": 1, "pod_cidr": "10.1.0.0/16"},
        "cluster2": {"id": 2, "pod_cidr": "10.2.0.0/16"},
    },
    "segments": [
        {"name": "dc1", "cidr": "198.18.1.0/24"},
        {"name": "dc2", "cidr": "198.18.2.0/24"},
    ],
    "hosts": [
        {"name": "c1-n1", "cluster": "cluster1", "segment": "dc1"},
        {"name": "c2-n1", "cluster": "cluster2", "segment": "dc2"},
    ],
}


def topo(**changes):
    data = copy.deepcopy(BASE)
    data.update(copy.deepcopy(changes))
    return data


def host(name, segment="dc1", **extra):
    return dict({"name": name, "segment": segment}, **extra)


def problems_of(data):
    with pytest.raises(TopologyError) as info:
        parse_topology(data)
    return info.value.problems


def test_default_topology_parses():
    t = load_topology()
    assert [h.name for h in t.hosts] == ["c1-n1", "c1-n2", "c2-n1", "c2-n2"]
    assert [(c.name, c.id, c.pod_cidr) for c in t.clusters] == [
        ("cluster1", 1, "10.1.0.0/16"),
        ("cluster2", 2, "10.2.0.0/16"),
    ]
    by_name = {h.name: h for h in t.hosts}
    # on-link within and across clusters, routed to c2-n2
    assert by_name["c1-n1"].segment == by_name["c1-n2"].segment == by_name["c2-n1"].segment == "dc1"
    assert by_name["c2-n2"].segment == "dc2"
    assert [h.address for h in t.hosts] == ["198.18.1.11", "198.18.1.12", "198.18.1.13", "198.18.2.11"]
    assert t.segment("dc1").gateway == "198.18.1.1"
    assert t.segment("dc2").gateway == "198.18.2.1"
    assert all(h.gateway == t.segment(h.segment).gateway for h in t.hosts)


def test_normalised_topology_round_trips():
    t = load_topology()
    data = t.to_dict()
    assert data["outside"] == {"network": "198.19.255.0/24", "address": "198.19.255.1", "device": "outside0"}
    again = type(t).from_dict(data)
    assert again.to_dict() == data


def test_auto_assignment_counts_from_11_per_segment():
    t = parse_topology(topo(hosts=[host("a"), host("b"), host("c", "dc2"), host("d")]))
    assert [h.address for h in t.hosts] == ["198.18.1.11", "198.18.1.12", "198.18.2.11", "198.18.1.13"]
    assert all(h.address_auto for h in t.hosts)


def test_auto_assignment_skips_explicit_addresses_even_later_ones():
    t = parse_topology(
        topo(hosts=[host("a"), host("b", address="198.18.1.11"), host("c"), host("d", address="198.18.1.12")])
    )
    assert {h.name: h.address for h in t.hosts} == {
        "a": "198.18.1.13",
        "b": "198.18.1.11",
        "c": "198.18.1.14",
        "d": "198.18.1.12",
    }
    assert [h.address_auto for h in t.hosts] == [True, False, True, False]


def test_auto_assignment_in_a_small_segment_starts_after_the_router():
    data = topo(segments=[{"name": "tiny", "cidr": "198.18.5.0/29"}], hosts=[host("a", "tiny"), host("b", "tiny")])
    t = parse_topology(data)
    assert [h.address for h in t.hosts] == ["198.18.5.2", "198.18.5.3"]
    assert t.hosts[0].prefixlen == 29


def test_auto_assignment_runs_out_of_addresses():
    data = topo(segments=[{"name": "p2p", "cidr": "198.18.5.0/30"}], hosts=[host("a", "p2p"), host("b", "p2p")])
    (problem,) = problems_of(data)
    assert "no free address left on segment p2p" in problem


def test_yaml_text_is_parsed():
    t = parse_topology_text(
        """
segments: [{name: s1, cidr: 198.18.9.0/24}]
hosts: [{name: h1, segment: s1}]
"""
    )
    assert t.hosts[0].address == "198.18.9.11"
    assert t.hosts[0].cluster is None
    assert t.clusters == []


BAD = [
    # (id, topology changes, expected text in a problem)
    ("duplicate host", {"hosts": [host("a"), host("a", "dc2")]}, "duplicate host name 'a'"),
    (
        "overlapping segments",
        {"segments": [{"name": "dc1", "cidr": "198.18.0.0/16"}, {"name": "dc2", "cidr": "198.18.2.0/24"}]},
        "cidr 198.18.2.0/24 overlaps segment dc1 (198.18.0.0/16)",
    ),
    (
        "duplicate segment",
        {"segments": [{"name": "dc1", "cidr": "198.18.1.0/24"}, {"name": "dc1", "cidr": "198.18.2.0/24"}]},
        "duplicate segment name 'dc1'",
    ),
    ("unknown segment", {"hosts": [host("a", "dc9")]}, "unknown segment 'dc9'"),
    ("segment missing", {"hosts": [{"name": "a"}]}, "segment missing"),
    ("cidr without length", {"segments": [{"name": "dc1", "cidr": "198.18.1.0"}]}, "not a CIDR"),
    ("cidr garbage", {"segments": [{"name": "dc1", "cidr": "198.18.1.0/33"}]}, "not a valid IPv4 CIDR"),
    (
        "cidr host bits",
        {"segments": [{"name": "dc1", "cidr": "198.18.1.5/24"}]},
        "has host bits set (the network is 198.18.1.0/24)",
    ),
    ("cidr ipv6", {"segments": [{"name": "dc1", "cidr": "fd00::/64"}]}, "not an IPv4 CIDR"),
    ("cidr not a string", {"segments": [{"name": "dc1", "cidr": 5}]}, "must be a string"),
    ("cidr missing", {"segments": [{"name": "dc1"}]}, "cidr missing"),
    (
        "segment outside the underlay",
        {"segments": [{"name": "dc1", "cidr": "10.0.0.0/24"}]},
        "outside the lab underlay 198.18.0.0/15",
    ),
    (
        "segment larger than the underlay",
        {"segments": [{"name": "dc1", "cidr": "198.16.0.0/14"}]},
        "outside the lab underlay",
    ),
    (
        "segment on the outside network",
        {"segments": [{"name": "dc1", "cidr": "198.19.255.0/25"}]},
        "reserved for the router's outside test network",
    ),
    ("segment too small", {"segments": [{"name": "dc1", "cidr": "198.18.1.0/31"}]}, "too small"),
    ("bad address", {"hosts": [host("a", address="198.18.1.300")]}, "bad address '198.18.1.300'"),
    ("address with length", {"hosts": [host("a", address="198.18.1.5/24")]}, "give a plain address"),
    ("address not a string", {"hosts": [host("a", address=5)]}, "bad address 5"),
    (
        "address outside segment",
        {"hosts": [host("a", address="198.18.2.5")]},
        "address 198.18.2.5 is outside its segment dc1 (198.18.1.0/24)",
    ),
    (
        "duplicate address",
        {"hosts": [host("a", address="198.18.1.5"), host("b", address="198.18.1.5")]},
        "address 198.18.1.5 is already used by host a",
    ),
    ("router address", {"hosts": [host("a", address="198.18.1.1")]}, "router's address on segment dc1"),
    ("network address", {"hosts": [host("a", address="198.18.1.0")]}, "network or broadcast address"),
    ("broadcast address", {"hosts": [host("a", address="198.18.1.255")]}, "network or broadcast address"),
    ("uppercase host name", {"hosts": [host("C1-N1")]}, "'C1-N1' is not a valid hostname"),
    ("underscore host name", {"hosts": [host("c1_n1")]}, "'c1_n1' is not a valid hostname"),
    ("host name ending in -", {"hosts": [host("c1-")]}, "not a valid hostname"),
    ("host name with a dot", {"hosts": [host("c1.lab")]}, "not a valid hostname"),
    ("host name not a string", {"hosts": [host(12)]}, "name missing or not a string"),
    ("host name too long", {"hosts": [host("a" * 64)]}, "host name too long (64 > 63"),
    ("reserved host name", {"hosts": [host("router")]}, "host name 'router' is reserved"),
    (
        "unknown cluster",
        {"hosts": [host("a", cluster="cluster9")]},
        "unknown cluster 'cluster9' (clusters: cluster1, cluster2)",
    ),
    (
        "cluster without clusters section",
        {"clusters": None, "hosts": [host("a", cluster="c1")]},
        "unknown cluster 'c1' (clusters: none declared)",
    ),
    (
        "segment name too long",
        {"segments": [{"name": "a" * 13, "cidr": "198.18.1.0/24"}], "hosts": [host("a", "a" * 13)]},
        "segment name too long (13 > 12",
    ),
    (
        "bad segment name",
        {"segments": [{"name": "DC1", "cidr": "198.18.1.0/24"}], "hosts": [host("a", "DC1")]},
        "invalid segment name 'DC1'",
    ),
    ("cluster name too long", {"clusters": {"c" * 33: {"id": 1}}}, "cluster name too long"),
    ("cluster name with -", {"clusters": {"cluster-1": {"id": 1}}}, "invalid cluster name 'cluster-1'"),
    ("cluster name reserved", {"clusters": {"lab": {"id": 1}}}, "'lab' is reserved"),
    ("cluster id duplicate", {"clusters": {"a": {"id": 1}, "b": {"id": 1}}}, "id 1 is already used by cluster a"),
    ("cluster id out of range", {"clusters": {"a": {"id": 256}}}, "id must be an integer 1..255, got 256"),
    ("cluster id bool", {"clusters": {"a": {"id": True}}}, "id must be an integer 1..255, got True"),
    ("pod cidr bad", {"clusters": {"a": {"pod_cidr": "10.1.0.0"}}}, "bad pod_cidr"),
    (
        "pod cidr overlap",
        {"clusters": {"a": {"pod_cidr": "10.1.0.0/16"}, "b": {"pod_cidr": "10.1.128.0/17"}}},
        "overlaps pod_cidr 10.1.0.0/16 of cluster a",
    ),
    ("pod cidr in the underlay", {"clusters": {"a": {"pod_cidr": "198.18.0.0/16"}}}, "overlaps the lab underlay"),
    ("clusters not a mapping", {"clusters": [{"name": "a"}]}, "clusters: must be a mapping"),
    ("unknown host key", {"hosts": [host("a", adress="198.18.1.5")]}, "unknown key adress"),
    ("unknown segment key", {"segments": [{"name": "dc1", "cidr": "198.18.1.0/24", "vlan": 5}]}, "unknown key vlan"),
    ("unknown cluster key", {"clusters": {"a": {"id": 1, "podcidr": "10.1.0.0/16"}}}, "unknown key podcidr"),
    ("unknown top-level key", {"host": []}, "top level: unknown key host"),
    ("no segments", {"segments": None}, "segments: missing"),
    ("empty segments", {"segments": []}, "segments: must be a non-empty list"),
    ("no hosts", {"hosts": None}, "hosts: missing"),
    ("empty hosts", {"hosts": []}, "hosts: must be a non-empty list"),
    ("host not a mapping", {"hosts": ["a"]}, "hosts[0]: must be a mapping"),
]


def _clean(changes):
    # hosts referring to clusters that a case removes would add unrelated problems
    data = topo(**changes)
    if data.get("clusters") is None:
        data.pop("clusters", None)
    if "clusters" in changes and "hosts" not in changes:
        data["hosts"] = [host("a")]
    for key in ("segments", "hosts"):
        if data.get(key) is None:
            data.pop(key, None)
    return data


@pytest.mark.parametrize("changes,expected", [b[1:] for b in BAD], ids=[b[0] for b in BAD])
def test_bad_topology_is_refused_naming_the_problem(changes, expected):
    problems = problems_of(_clean(changes))
    assert any(expected in p for p in problems), problems


def test_problems_name_where_they_are():
    problems = problems_of(topo(hosts=[host("a"), host("b", "dc9")]))
    assert problems == ["hosts[1] (b): unknown segment 'dc9' (segments: dc1, dc2)"]


def test_all_problems_are_reported_at_once():
    data = topo(
        segments=[{"name": "dc1", "cidr": "10.0.0.0/24"}, {"name": "dc2", "cidr": "198.18.2.0/24"}],
        hosts=[host("a", "dc2"), host("a", "dc2"), host("B", "dc2"), host("c", "dc2", address="198.18.3.1")],
    )
    with pytest.raises(TopologyError) as info:
        parse_topology(data)
    problems = info.value.problems
    assert len(problems) == 4, problems
    text = str(info.value)
    assert "4 problems" in text
    for expected in (
        "outside the lab underlay",
        "duplicate host name 'a'",
        "'B' is not a valid hostname",
        "outside its segment dc2",
    ):
        assert expected in text


def test_hosts_on_an_invalid_segment_are_not_reported_twice():
    data = topo(segments=[{"name": "dc1", "cidr": "10.0.0.0/24"}], hosts=[host("a"), host("b")])
    assert len(problems_of(data)) == 1


def test_not_a_mapping():
    assert "must be a mapping" in problems_of(["a"])[0]


def test_duplicate_yaml_keys_are_refused():
    with pytest.raises(TopologyError) as info:
        parse_topology_text("clusters:\n  c1: {id: 1}\n  c1: {id: 2}\nsegments: []\nhosts: []\n")
    assert "duplicate key 'c1'" in str(info.value)


def test_invalid_yaml_is_refused():
    with pytest.raises(TopologyError) as info:
        parse_topology_text("hosts: [a\n")
    assert "not valid YAML" in str(info.value)


def test_missing_file_is_refused(tmp_path):
    with pytest.raises(TopologyError) as info:
        load_topology(str(tmp_path / "nope.yml"))
    assert "cannot read the file" in str(info.value)
    assert "nope.yml" in str(info.value)


def test_device_names_fit_ifnamsiz():
    assert host_fabric_port("c1-n1") == "h-c1-n1"
    long_a = "a-very-long-host-name-1"
    long_b = "a-very-long-host-name-2"
    assert len(host_fabric_port(long_a)) == IFNAMSIZ
    assert host_fabric_port(long_a) != host_fabric_port(long_b)
    t = parse_topology(
        topo(
            segments=[{"name": "abcdefghijkl", "cidr": "198.18.1.0/24"}],
            hosts=[host(long_a, "abcdefghijkl"), host(long_b, "abcdefghijkl")],
        )
    )
    seg = t.segments[0]
    for name in (seg.bridge, seg.fabric_router_port, seg.router_device, *(h.fabric_port for h in t.hosts)):
        assert len(name) <= IFNAMSIZ, name


@pytest.mark.parametrize("prefix", ["cml", "cmt", "a", "abc123"])
def test_good_prefixes(prefix):
    assert check_prefix(prefix) == prefix


@pytest.mark.parametrize("prefix", ["", "CML", "cm-l", "toolong", "c_l", None])
def test_bad_prefixes(prefix):
    with pytest.raises(LabError, match="invalid lab prefix"):
        check_prefix(prefix)


def test_lab_names_carry_the_prefix():
    lab = Lab("cmt")
    assert lab.netns("c1-n1") == "cmt-c1-n1"
    assert lab.router_ns == "cmt-router"
    assert lab.fabric_ns == "cmt-fabric"
    assert lab.state_dir == "/run/clustermesh-lab/cmt"
    assert lab.handles("cmt-c1-n1") == (
        "/run/clustermesh-lab/cmt/hosts/cmt-c1-n1/mnt",
        "/run/clustermesh-lab/cmt/hosts/cmt-c1-n1/uts",
    )
    assert lab.inventory_path == "/run/clustermesh-lab/cmt/inventory/hosts.yml"
    assert lab.owns_netns("cmt-x") and not lab.owns_netns("cmtd-x") and not lab.owns_netns("cml-x")


def test_inventory_groups_and_vars():
    lab = Lab("cmt")
    inv = inventory.build(lab, load_topology())["all"]["children"]
    hosts = inv["lab"]["hosts"]
    assert list(hosts) == ["c1-n1", "c1-n2", "c2-n1", "c2-n2"]
    assert hosts["c2-n2"] == {
        "ansible_connection": "clustermesh.core.netns",
        "ansible_netns_name": "cmt-c2-n2",
        "ansible_netns_mount": "/run/clustermesh-lab/cmt/hosts/cmt-c2-n2/mnt",
        "ansible_netns_uts": "/run/clustermesh-lab/cmt/hosts/cmt-c2-n2/uts",
        "ansible_python_interpreter": os.path.join(REPO_ROOT, ".venv", "bin", "python"),
        "clustermesh_node_ip": "198.18.2.11",
        "lab_segment": "dc2",
    }
    # lab hosts share the machine's /opt: the CNI plugin goes below the per-host /var/lib
    assert inv["lab"]["vars"] == {"lab_prefix": "cmt", "cni_bin_dir": "/var/lib/cni/bin", "agent_venv_create": False}
    clusters = inv["clusters"]["children"]
    assert list(clusters["cluster1"]["hosts"]) == ["c1-n1", "c1-n2"]
    assert clusters["cluster2"]["vars"] == {
        "clustermesh_cluster_name": "cluster2",
        "clustermesh_cluster_id": 2,
        "clustermesh_pod_cidrs": ["10.2.0.0/16"],
    }


def test_up_with_a_bad_file_fails_before_doing_anything(tmp_path, capsys):
    bad = tmp_path / "bad.yml"
    bad.write_text("segments: [{name: s1, cidr: 10.0.0.0/24}]\nhosts: [{name: h1, segment: s1}]\n")
    assert cli.main(["up", "--prefix", "cmt", "--topology", str(bad)]) == 2
    err = capsys.readouterr().err
    assert "outside the lab underlay" in err
    assert str(bad) in err


def test_bad_prefix_is_refused(capsys):
    assert cli.main(["inventory", "--prefix", "Bad-1"]) == 1
    assert "invalid lab prefix" in capsys.readouterr().err
