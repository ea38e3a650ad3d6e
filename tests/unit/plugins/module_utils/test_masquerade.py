"""masquerade: the desired nftables table, its comparison with the live one, and when nft is called."""

from __future__ import annotations

import copy
import ipaddress
import json
import subprocess

import pytest

from ansible_collections.clustermesh.core.plugins.module_utils import masquerade as masq

# `nft -j list table ip clustermesh` (nftables 1.0.6, kernel 6.18) after loading script(desired()) below
LIVE = json.loads(
    """
{"nftables": [
 {"metainfo": {"version": "1.0.6", "release_name": "Lester Gooch #5", "json_schema_version": 1}},
 {"table": {"family": "ip", "name": "clustermesh", "handle": 8}},
 {"set": {"family": "ip", "name": "node_pod_cidrs", "table": "clustermesh", "type": "ipv4_addr", "handle": 5,
   "flags": ["interval"], "elem": [{"prefix": {"addr": "10.1.0.0", "len": 24}}]}},
 {"set": {"family": "ip", "name": "mesh_pod_cidrs", "table": "clustermesh", "type": "ipv4_addr", "handle": 6,
   "flags": ["interval"],
   "elem": [{"prefix": {"addr": "10.1.0.0", "len": 16}}, {"prefix": {"addr": "10.2.0.0", "len": 16}}]}},
 {"chain": {"family": "ip", "table": "clustermesh", "name": "mesh_source", "handle": 1}},
 {"chain": {"family": "ip", "table": "clustermesh", "name": "raw_prerouting", "handle": 2, "type": "filter",
   "hook": "prerouting", "prio": -300, "policy": "accept"}},
 {"chain": {"family": "ip", "table": "clustermesh", "name": "raw_output", "handle": 3, "type": "filter",
   "hook": "output", "prio": -300, "policy": "accept"}},
 {"chain": {"family": "ip", "table": "clustermesh", "name": "postrouting", "handle": 4, "type": "nat",
   "hook": "postrouting", "prio": 100, "policy": "accept"}},
 {"rule": {"family": "ip", "table": "clustermesh", "chain": "mesh_source", "handle": 7,
   "comment": "clustermesh: pod-to-pod traffic is never NATed, so not tracked",
   "expr": [{"match": {"op": "==", "left": {"payload": {"protocol": "ip", "field": "daddr"}},
                       "right": {"prefix": {"addr": "10.1.0.0", "len": 16}}}}, {"notrack": null}]}},
 {"rule": {"family": "ip", "table": "clustermesh", "chain": "mesh_source", "handle": 8,
   "comment": "clustermesh: pod-to-pod traffic is never NATed, so not tracked",
   "expr": [{"match": {"op": "==", "left": {"payload": {"protocol": "ip", "field": "daddr"}},
                       "right": {"prefix": {"addr": "10.2.0.0", "len": 16}}}}, {"notrack": null}]}},
 {"rule": {"family": "ip", "table": "clustermesh", "chain": "raw_prerouting", "handle": 9,
   "expr": [{"match": {"op": "==", "left": {"payload": {"protocol": "ip", "field": "saddr"}},
                       "right": {"prefix": {"addr": "10.1.0.0", "len": 16}}}}, {"goto": {"target": "mesh_source"}}]}},
 {"rule": {"family": "ip", "table": "clustermesh", "chain": "raw_prerouting", "handle": 10,
   "expr": [{"match": {"op": "==", "left": {"payload": {"protocol": "ip", "field": "saddr"}},
                       "right": {"prefix": {"addr": "10.2.0.0", "len": 16}}}}, {"goto": {"target": "mesh_source"}}]}},
 {"rule": {"family": "ip", "table": "clustermesh", "chain": "raw_prerouting", "handle": 21,
   "comment": "clustermesh: VXLAN between nodes carries pod-to-pod traffic, not tracked",
   "expr": [{"match": {"op": "==", "left": {"payload": {"protocol": "ip", "field": "daddr"}}, "right": "198.18.1.11"}},
            {"match": {"op": "==", "left": {"payload": {"protocol": "udp", "field": "dport"}}, "right": 8472}},
            {"notrack": null}]}},
 {"rule": {"family": "ip", "table": "clustermesh", "chain": "raw_output", "handle": 11,
   "expr": [{"match": {"op": "==", "left": {"payload": {"protocol": "ip", "field": "saddr"}},
                       "right": {"prefix": {"addr": "10.1.0.0", "len": 16}}}}, {"goto": {"target": "mesh_source"}}]}},
 {"rule": {"family": "ip", "table": "clustermesh", "chain": "raw_output", "handle": 12,
   "expr": [{"match": {"op": "==", "left": {"payload": {"protocol": "ip", "field": "saddr"}},
                       "right": {"prefix": {"addr": "10.2.0.0", "len": 16}}}}, {"goto": {"target": "mesh_source"}}]}},
 {"rule": {"family": "ip", "table": "clustermesh", "chain": "raw_output", "handle": 22,
   "comment": "clustermesh: VXLAN between nodes carries pod-to-pod traffic, not tracked",
   "expr": [{"match": {"op": "==", "left": {"payload": {"protocol": "ip", "field": "saddr"}}, "right": "198.18.1.11"}},
            {"match": {"op": "==", "left": {"payload": {"protocol": "udp", "field": "dport"}}, "right": 8472}},
            {"notrack": null}]}},
 {"rule": {"family": "ip", "table": "clustermesh", "chain": "postrouting", "handle": 13,
   "comment": "clustermesh: SNAT pod traffic leaving the mesh to the node IP",
   "expr": [{"match": {"op": "==", "left": {"payload": {"protocol": "ip", "field": "saddr"}},
                       "right": "@node_pod_cidrs"}},
            {"match": {"op": "!=", "left": {"payload": {"protocol": "ip", "field": "daddr"}},
                       "right": "@mesh_pod_cidrs"}},
            {"snat": {"addr": "198.18.1.11"}}]}}
]}
"""
)


def desired(mesh=("10.1.0.0/16", "10.2.0.0/16"), **kw):
    model, warnings = masq.desired_table("198.18.1.11", ["10.1.0.0/24"], mesh, **kw)
    assert warnings == []
    return model


def test_live_table_equal_to_desired_means_no_change():
    assert masq.normalize(LIVE) == desired()
    assert masq.changes(desired(), masq.normalize(LIVE)) == []
    assert masq.render(masq.normalize(LIVE)) == masq.render(desired())


@pytest.mark.parametrize(
    "edit",
    [
        lambda d: d["nftables"][3]["set"]["elem"].pop(),  # a mesh CIDR missing
        lambda d: d["nftables"][16]["rule"]["expr"][2]["snat"].update(addr="198.18.1.99"),  # wrong SNAT address
        lambda d: d["nftables"][16]["rule"]["expr"][1]["match"].update(op="=="),  # pod-to-pod would be NATed
        lambda d: d["nftables"][7]["chain"].update(prio=0),
        lambda d: d["nftables"].append(copy.deepcopy(d["nftables"][16])),  # a rule added by hand
        lambda d: d["nftables"].append({"map": {"name": "extra", "table": "clustermesh"}}),
        lambda d: d["nftables"][5]["chain"].update(prio=-200),  # notrack after conntrack: no effect
        lambda d: d["nftables"].pop(13),  # the node's own pod traffic (output) would be tracked
        lambda d: d["nftables"].pop(12),  # VXLAN received from peers would be tracked
        lambda d: d["nftables"][15]["rule"]["expr"][1]["match"].update(right=4789),  # not the mesh's VXLAN port
        lambda d: d["nftables"].pop(9),  # traffic to cluster2's pods would be tracked
        lambda d: d["nftables"][8]["rule"]["expr"].pop(),  # no notrack statement left
    ],
)
def test_any_difference_replaces_the_table(edit):
    live = copy.deepcopy(LIVE)
    edit(live)
    model = masq.normalize(live)
    assert model != desired()
    assert masq.changes(desired(), model) == [
        "replace nft table ip clustermesh: SNAT 10.1.0.0/24 to 198.18.1.11 unless destined to 10.1.0.0/16, 10.2.0.0/16"
    ]


def _in(address, right, model):
    if isinstance(right, str) and right.startswith("@"):
        nets = model["sets"][right[1:]]["elements"]
    elif isinstance(right, dict):
        nets = ["%s/%s" % (right["prefix"]["addr"], right["prefix"]["len"])]
    else:
        nets = [right]
    return any(ipaddress.ip_address(address) in ipaddress.ip_network(n) for n in nets)


def untracked(model, hook, src, dst, udp_dport=None):
    """Whether a packet src -> dst gets ``notrack`` from the model's raw chain at ``hook``, before conntrack
    (a small interpreter of the rule shapes the model uses: prefix/set/address and UDP port matches, goto,
    notrack)."""
    chain = next((c for c, spec in model["chains"].items() if spec["hook"] == hook and spec["prio"] < -200), None)
    while chain is not None:
        for key in model["rules"].get(chain, []):
            expr, matched = json.loads(key)["expr"], True
            for e in expr:
                if "match" in e:
                    m = e["match"]
                    if m["left"]["payload"]["protocol"] == "udp":
                        matched = (udp_dport == m["right"]) == (m["op"] == "==")
                    else:
                        address = src if m["left"]["payload"]["field"] == "saddr" else dst
                        matched = _in(address, m["right"], model) == (m["op"] == "==")
                    if not matched:
                        break
                elif "notrack" in e:
                    return True
                elif "goto" in e:
                    chain = e["goto"]["target"]
                    break
            if matched and "goto" in expr[-1]:
                break
        else:
            return False
    return False


@pytest.mark.parametrize(
    "mesh",
    [
        ("10.1.0.0/16", "10.2.0.0/16"),
        ["10.1.0.0/16", "10.2.0.0/16"] + ["10.%d.0.0/16" % (10 + 2 * i) for i in range(10)],
    ],
)
def test_pod_to_pod_is_untracked_both_ways_and_everything_else_is_tracked(mesh):
    model = desired(mesh)
    for hook in ("prerouting", "output"):  # forwarded or received / sent by the node itself
        # pod-to-pod, same cluster and across clusters, in both directions: never NATed, never tracked
        for src, dst in (("10.1.0.2", "10.1.5.2"), ("10.1.5.2", "10.1.0.2"), ("10.1.0.2", "10.2.1.2")):
            assert untracked(model, hook, src, dst), (hook, src, dst)
            assert untracked(model, hook, dst, src), (hook, dst, src)
        # masqueraded traffic, its replies (to the node IP), the node to a pod and the outside to a pod: tracked
        for src, dst in (
            ("10.1.0.2", "198.19.255.1"),
            ("198.19.255.1", "198.18.1.11"),
            ("198.18.1.11", "10.2.1.2"),
            ("10.2.1.2", "198.18.1.11"),
            ("198.19.255.1", "10.1.0.2"),
            ("10.1.0.2", "11.1.0.2"),
        ):
            assert not untracked(model, hook, src, dst), (hook, src, dst)
    # VXLAN between nodes (it carries pod-to-pod traffic): received at / sent from the node IP
    assert untracked(model, "prerouting", "198.18.1.12", "198.18.1.11", udp_dport=8472)
    assert untracked(model, "output", "198.18.1.11", "198.18.2.11", udp_dport=8472)
    assert not untracked(model, "prerouting", "198.18.1.12", "198.18.1.11", udp_dport=53)
    assert not untracked(model, "prerouting", "198.18.1.12", "198.18.1.99", udp_dport=8472)  # not to this node
    assert not untracked(model, "output", "198.18.1.99", "198.18.1.12", udp_dport=8472)
    assert not untracked(desired(mesh, tunnel_port=None), "prerouting", "198.18.1.12", "198.18.1.11", udp_dport=8472)
    # the SNAT rule still matches what leaves the mesh only
    assert masq._rule_text(model["rules"]["postrouting"][0]).startswith(
        "ip saddr @node_pod_cidrs ip daddr != @mesh_pod_cidrs snat to 198.18.1.11"
    )


def test_raw_chains_compare_prefixes_up_to_a_limit_then_look_the_set_up():
    model = desired()
    assert model["chains"]["raw_prerouting"] == {
        "type": "filter",
        "hook": "prerouting",
        "prio": -300,
        "policy": "accept",
    }
    assert model["chains"]["raw_output"] == {"type": "filter", "hook": "output", "prio": -300, "policy": "accept"}
    tunnel = 'udp dport 8472 notrack comment "%s"' % masq.TUNNEL_NOTRACK_COMMENT
    assert [masq._rule_text(k) for k in model["rules"]["raw_prerouting"]] == [
        "ip saddr 10.1.0.0/16 goto mesh_source",
        "ip saddr 10.2.0.0/16 goto mesh_source",
        "ip daddr 198.18.1.11 " + tunnel,
    ]
    assert [masq._rule_text(k) for k in model["rules"]["raw_output"]] == [
        "ip saddr 10.1.0.0/16 goto mesh_source",
        "ip saddr 10.2.0.0/16 goto mesh_source",
        "ip saddr 198.18.1.11 " + tunnel,
    ]
    assert [masq._rule_text(k) for k in model["rules"]["mesh_source"]] == [
        'ip daddr 10.1.0.0/16 notrack comment "%s"' % masq.NOTRACK_COMMENT,
        'ip daddr 10.2.0.0/16 notrack comment "%s"' % masq.NOTRACK_COMMENT,
    ]
    # a /32 is a plain address in nft -j output, so in the model too
    model = desired(("10.1.0.0/16", "10.9.0.1/32"))
    assert masq._rule_text(model["rules"]["mesh_source"][1]).startswith("ip daddr 10.9.0.1 notrack")
    many = ["10.%d.0.0/16" % (2 * i) for i in range(1, masq.MAX_PREFIX_RULES + 2)]  # none adjacent
    model = desired(many)
    assert [masq._rule_text(k) for k in model["rules"]["raw_prerouting"]][:-1] == [
        "ip saddr @mesh_pod_cidrs goto mesh_source"
    ]
    assert masq._rule_text(model["rules"]["mesh_source"][0]).startswith("ip daddr @mesh_pod_cidrs notrack")


def test_without_notrack_the_table_is_the_snat_rule_alone_and_an_old_table_is_upgraded():
    old = desired(notrack=False)
    assert set(old["chains"]) == {"postrouting"} and old["rules"]["postrouting"] == desired()["rules"]["postrouting"]
    # a table written before the raw chains existed is replaced by the current one
    live = copy.deepcopy(LIVE)
    live["nftables"] = [i for i in live["nftables"] if "postrouting" in json.dumps(i) or "chain" not in json.dumps(i)]
    assert masq.normalize(live) == old
    assert masq.changes(desired(), masq.normalize(live))[0].startswith("replace nft table ip clustermesh: SNAT")
    assert "mesh_source" not in masq.script(old) and "notrack" not in masq.script(old)


def test_pod_to_pod_is_always_excluded_and_cidrs_are_merged():
    model, unused = masq.desired_table("198.18.1.11", ["10.1.0.0/24"], [])
    assert model["sets"]["mesh_pod_cidrs"]["elements"] == ["10.1.0.0/24"]  # own pods even without a mesh list
    model, unused = masq.desired_table("198.18.1.11", ["10.1.0.0/24"], ["10.1.0.0/16", "10.1.1.0/24", "10.2.0.0/16"])
    assert model["sets"]["mesh_pod_cidrs"]["elements"] == ["10.1.0.0/16", "10.2.0.0/16"]


def test_ipv6_is_skipped_or_refused_clearly():
    model, warnings = masq.desired_table("198.18.1.11", ["10.1.0.0/24", "fd00:1::/64"], ["fd00::/48"])
    assert model["sets"]["node_pod_cidrs"]["elements"] == ["10.1.0.0/24"]
    assert warnings == [
        "masquerade: node pod CIDR fd00:1::/64 skipped (IPv4 only: no ip6 masquerade table is managed)",
        "masquerade: mesh pod CIDR fd00::/48 skipped (IPv4 only: no ip6 masquerade table is managed)",
    ]
    model, warnings = masq.desired_table("198.18.1.11", ["fd00:1::/64"])
    assert model is None and "no IPv4 pod CIDR" in warnings[-1]
    with pytest.raises(masq.MasqueradeError, match="node ip: fd00::1 is IPv6"):
        masq.desired_table("fd00::1", ["10.1.0.0/24"])
    with pytest.raises(masq.MasqueradeError, match="mesh pod CIDR: '10.1.0.0/33' is not a CIDR"):
        masq.desired_table("198.18.1.11", ["10.1.0.0/24"], ["10.1.0.0/33"])


def test_elements_of_every_json_shape():
    elem = ["10.9.0.1", {"prefix": {"addr": "10.1.0.0", "len": 16}}, {"range": ["10.3.0.0", "10.3.1.255"]}]
    assert masq._elements(elem) == ["10.1.0.0/16", "10.3.0.0/23", "10.9.0.1/32"]


def test_script_replaces_the_table_in_one_transaction():
    text = masq.script(desired())
    # declaring first makes the delete safe when the table does not exist yet; nft -f is one transaction
    assert text.startswith("table ip clustermesh\ndelete table ip clustermesh\ntable ip clustermesh {\n")
    assert (
        "ip saddr @node_pod_cidrs ip daddr != @mesh_pod_cidrs snat to 198.18.1.11 "
        'comment "%s"' % masq.RULE_COMMENT in text
    )
    assert "elements = { 10.1.0.0/16, 10.2.0.0/16 }" in text
    # the chain that the raw chains jump to is declared before them; raw chains run before conntrack (-200)
    assert text.index("chain mesh_source {") < text.index("chain raw_prerouting {") < text.index("chain raw_output {")
    assert "type filter hook prerouting priority -300; policy accept;" in text
    assert "type filter hook output priority -300; policy accept;" in text
    assert masq.script(None) == "table ip clustermesh\ndelete table ip clustermesh\n"


class FakeNft:
    """Stands in for masquerade._nft: answers list commands from ``live`` and records -f scripts."""

    def __init__(self, live):
        self.live = live
        self.scripts = []

    def __call__(self, args, stdin=None, nft=None):
        if args == ["-j", "list", "tables", "ip"]:
            tables = [{"table": {"family": "ip", "name": "clustermesh"}}] if self.live else []
            out = {"nftables": [{"metainfo": {}}, {"table": {"family": "ip", "name": "nat"}}, *tables]}
        elif args[:3] == ["-j", "list", "table"]:
            out = self.live
        else:
            assert args == ["-f", "-"]
            self.scripts.append(stdin)
            out = {}
        return subprocess.CompletedProcess(args, 0, json.dumps(out), "")


def run(monkeypatch, live, **kw):
    fake = FakeNft(live)
    monkeypatch.setattr(masq, "_nft", fake)
    monkeypatch.setattr(masq, "find_nft", lambda: "/usr/sbin/nft")
    result = masq.reconcile_masquerade("198.18.1.11", ["10.1.0.0/24"], ["10.1.0.0/16", "10.2.0.0/16"], **kw)
    return result, fake.scripts


def test_reconcile_creates_keeps_and_removes(monkeypatch):
    result, scripts = run(monkeypatch, None)
    assert result["changed"] and result["before"] == "" and "snat to 198.18.1.11" in result["after"]
    assert scripts == [masq.script(desired())]

    result, scripts = run(monkeypatch, LIVE)
    assert not result["changed"] and scripts == [] and result["before"] == result["after"]

    result, scripts = run(monkeypatch, LIVE, check=True, enabled=False)
    assert result["changes"] == ["delete nft table ip clustermesh"] and scripts == []  # check mode applies nothing

    result, scripts = run(monkeypatch, LIVE, enabled=False)
    assert scripts == [masq.script(None)] and result["after"] == ""

    result, scripts = run(monkeypatch, None, enabled=False)
    assert not result["changed"] and scripts == []


def test_missing_nft_is_an_error_only_when_a_table_is_wanted(monkeypatch):
    monkeypatch.setattr(masq, "find_nft", lambda: None)
    result = masq.reconcile_masquerade("198.18.1.11", ["10.1.0.0/24"], enabled=False)
    assert result["changed"] is False
    with pytest.raises(masq.MasqueradeError, match="nft binary is not installed .*nftables"):
        masq.reconcile_masquerade("198.18.1.11", ["10.1.0.0/24"])
