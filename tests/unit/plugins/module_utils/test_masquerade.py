"""masquerade: the desired nftables table, its comparison with the live one, and when nft is called."""

from __future__ import annotations

import copy
import json
import subprocess

import pytest

from ansible_collections.clustermesh.core.plugins.module_utils import masquerade as masq

# `nft -j list table ip clustermesh` (nftables 1.0.6) after loading script(desired_table(...)) below
LIVE = {
    "nftables": [
        {"metainfo": {"version": "1.0.6", "release_name": "Lester Gooch #5", "json_schema_version": 1}},
        {"table": {"family": "ip", "name": "clustermesh", "handle": 3}},
        {
            "set": {
                "family": "ip",
                "name": "node_pod_cidrs",
                "table": "clustermesh",
                "type": "ipv4_addr",
                "handle": 2,
                "flags": ["interval"],
                "elem": [{"prefix": {"addr": "10.1.0.0", "len": 24}}],
            }
        },
        {
            "set": {
                "family": "ip",
                "name": "mesh_pod_cidrs",
                "table": "clustermesh",
                "type": "ipv4_addr",
                "handle": 3,
                "flags": ["interval"],
                "elem": [{"prefix": {"addr": "10.1.0.0", "len": 16}}, {"prefix": {"addr": "10.2.0.0", "len": 16}}],
            }
        },
        {
            "chain": {
                "family": "ip",
                "table": "clustermesh",
                "name": "postrouting",
                "handle": 1,
                "type": "nat",
                "hook": "postrouting",
                "prio": 100,
                "policy": "accept",
            }
        },
        {
            "rule": {
                "family": "ip",
                "table": "clustermesh",
                "chain": "postrouting",
                "handle": 4,
                "comment": masq.RULE_COMMENT,
                "expr": [
                    {
                        "match": {
                            "op": "==",
                            "left": {"payload": {"protocol": "ip", "field": "saddr"}},
                            "right": "@node_pod_cidrs",
                        }
                    },
                    {
                        "match": {
                            "op": "!=",
                            "left": {"payload": {"protocol": "ip", "field": "daddr"}},
                            "right": "@mesh_pod_cidrs",
                        }
                    },
                    {"snat": {"addr": "198.18.1.11"}},
                ],
            }
        },
    ]
}


def desired(mesh=("10.1.0.0/16", "10.2.0.0/16")):
    model, warnings = masq.desired_table("198.18.1.11", ["10.1.0.0/24"], mesh)
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
        lambda d: d["nftables"][5]["rule"]["expr"][2]["snat"].update(addr="198.18.1.99"),  # wrong SNAT address
        lambda d: d["nftables"][5]["rule"]["expr"][1]["match"].update(op="=="),  # pod-to-pod would be NATed
        lambda d: d["nftables"][4]["chain"].update(prio=0),
        lambda d: d["nftables"].append(copy.deepcopy(d["nftables"][5])),  # a rule added by hand
        lambda d: d["nftables"].append({"map": {"name": "extra", "table": "clustermesh"}}),
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
