# -*- coding: utf-8 -*-
# Copyright: clustermesh.core contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""mesh_status: the pure parts (discovery, key classification, heartbeat age, rows and table)."""

from __future__ import annotations

import datetime
import hashlib
import socket

import pytest

from ansible_collections.clustermesh.core.plugins.module_utils import mesh_status as M

NOW = datetime.datetime(2026, 1, 2, 3, 4, 5, tzinfo=datetime.UTC)


# --------------------------------------------------------------------------------------------
# discovery
# --------------------------------------------------------------------------------------------


def test_discover_lists_own_config_then_peer_configs_only(tmp_path):
    (tmp_path / "kvstore.yaml").write_text("endpoints: [https://127.0.0.1:2379]\n")
    peers = tmp_path / "clusters.d"
    peers.mkdir()
    for name in (
        "cluster3",
        "cluster2",
        "cluster2.etcd-client-ca.crt",
        "cluster2.etcd-client.crt",
        "cluster2.etcd-client.key",
        ".etcd-config.tmp",
    ):
        (peers / name).write_text("x")
    (peers / "subdir").mkdir()
    found = M.discover(str(tmp_path))
    assert [(e["name"], e["local"]) for e in found] == [(None, True), ("cluster2", False), ("cluster3", False)]
    assert found[0]["path"] == str(tmp_path / "kvstore.yaml")
    assert found[1]["path"] == str(peers / "cluster2")


def test_discover_without_clusters_dir(tmp_path):
    assert [e["local"] for e in M.discover(str(tmp_path))] == [True]


@pytest.mark.parametrize(
    "user, local, cluster",
    [
        ("admin-cluster1", True, "cluster1"),
        ("remote-cluster2", False, "cluster2"),
        ("admin-cluster1", False, None),
        ("remote-cluster2", True, None),
        ("root", True, None),
        (None, True, None),
    ],
)
def test_cluster_from_user(user, local, cluster):
    assert M.cluster_from_user(user, local) == cluster


# --------------------------------------------------------------------------------------------
# keys
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "key, kind",
    [
        ("cilium/state/nodes/v1/cluster1/c1-n1", "nodes"),
        ("cilium/state/services/v1/cluster1/default/rebel-base", "services"),
        ("cilium/state/ip/v1/default/10.1.0.5", "ip"),
        ("cilium/state/ip/v1/default/10.1.0.0/24", "ip"),
        ("cilium/state/identities/v1/id/65637", "identities"),
        ("cilium/state/identities/v1/value/k8s:name=x-wing;/198.18.1.11", "other"),
        ("cilium/state/clustermesh-readonly-probe/c2-n1", "other"),
        ("cilium/state/nodes/v1/cluster1", "invalid"),
        ("cilium/state/nodes/v1/Cluster1/n1", "invalid"),
        ("cilium/state/ip/v1/default/not-an-ip", "invalid"),
        ("cilium/state/ip/v1/default/010.1.0.5", "invalid"),
        ("cilium/state/identities/v1/id/0", "invalid"),
        ("cilium/state/services/v1/cluster1/default", "invalid"),
        ("cilium/state/nodes/v1/cluster9/n1", "foreign"),
        ("cilium/state/services/v1/cluster9/default/svc", "foreign"),
    ],
)
def test_classify_key(key, kind):
    assert M.classify_key(key, "cluster1") == kind


def test_classify_key_without_owner_never_says_foreign():
    assert M.classify_key("cilium/state/nodes/v1/cluster9/n1") == "nodes"


def test_count_keys_has_every_kind():
    counts = M.count_keys(
        [
            "cilium/state/nodes/v1/cluster1/n1",
            "cilium/state/nodes/v1/cluster1/n2",
            "cilium/state/ip/v1/default/10.1.0.5",
            "cilium/state/nodes/v1/cluster2/n1",
        ],
        "cluster1",
    )
    assert counts == {"nodes": 2, "services": 0, "ip": 1, "identities": 0, "other": 0, "invalid": 0, "foreign": 1}
    assert M.count_keys([]) == dict.fromkeys(M.KEY_KINDS, 0)


def test_probe_key_is_under_state_and_sanitised():
    assert M.probe_key("c2-n1") == "cilium/state/clustermesh-readonly-probe/c2-n1"
    assert M.probe_key("a b/c") == "cilium/state/clustermesh-readonly-probe/a_b_c"
    assert M.probe_key().endswith(M.probe_key(socket.gethostname()).rsplit("/", 1)[1])
    # not a key of any kind that agents read
    assert M.classify_key(M.probe_key("n1")) == "other"


# --------------------------------------------------------------------------------------------
# heartbeat
# --------------------------------------------------------------------------------------------


def test_heartbeat_age():
    assert M.heartbeat_age(b"2026-01-02T03:03:05Z", NOW) == (60.0, None)
    assert M.heartbeat_age("2026-01-02T04:03:05.5+01:00", NOW) == (59.5, None)


def test_heartbeat_absent():
    assert M.heartbeat_age(None, NOW) == (None, "no heartbeat yet")


def test_heartbeat_stale_future_and_garbage():
    age, note = M.heartbeat_age(b"2026-01-02T02:04:05Z", NOW)
    assert age == 3600.0 and "stale" in note
    age, note = M.heartbeat_age(b"2026-01-02T03:05:05Z", NOW)
    assert age == -60.0 and "future" in note
    age, note = M.heartbeat_age(b"yesterday", NOW)
    assert age is None and "unreadable" in note
    # a little skew is not worth a note
    assert M.heartbeat_age(b"2026-01-02T03:04:07Z", NOW) == (-2.0, None)


# --------------------------------------------------------------------------------------------
# server certificate description
# --------------------------------------------------------------------------------------------


def test_describe_peer_certificate_from_getpeercert():
    info = {
        "subject": ((("organizationName", "clustermesh"),), (("commonName", "c2-n1"),)),
        "issuer": ((("commonName", "clustermesh-cluster2-ca"),),),
        "subjectAltName": (("DNS", "c2-n1"), ("IP Address", "198.18.1.13"), ("IP Address", "FD00:0:0:0:0:0:0:1\n")),
        "notAfter": "Jan  1 00:00:00 2027 GMT",
        "serialNumber": "0A",
    }
    desc = M.describe_peer_certificate(info, b"\x01\x02")
    assert desc["subject_cn"] == "c2-n1"
    assert desc["subject"] == "organizationName=clustermesh,commonName=c2-n1"
    assert desc["issuer_cn"] == "clustermesh-cluster2-ca"
    assert desc["sans"] == ["DNS:c2-n1", "IP:198.18.1.13", "IP:FD00:0:0:0:0:0:0:1"]
    assert desc["fingerprint_sha256"].count(":") == 31
    assert desc["fingerprint_sha256"].replace(":", "") == hashlib.sha256(b"\x01\x02").hexdigest().upper()


def test_describe_peer_certificate_from_der_only(tmp_path):
    from cryptography import x509
    from cryptography.hazmat.primitives import serialization

    from ansible_collections.clustermesh.core.tests.etcd_fixture import TestPKI

    pki = TestPKI(tmp_path, name="test-ca")
    pair = pki.issue("etcd-1", server=True, ips=("127.0.0.1",), dns_names=("etcd-1",))
    cert = x509.load_pem_x509_certificate(open(pair.cert, "rb").read())
    der = cert.public_bytes(serialization.Encoding.DER)
    desc = M.describe_peer_certificate(None, der)
    assert desc["subject_cn"] == "etcd-1"
    assert desc["issuer_cn"] == "test-ca"
    assert desc["sans"] == ["DNS:etcd-1", "IP:127.0.0.1"]
    assert desc["fingerprint_sha256"].replace(":", "") == M._fingerprint(der)


# --------------------------------------------------------------------------------------------
# rows and table
# --------------------------------------------------------------------------------------------


def result(**overrides):
    base = M.empty_result("cluster2", "/etc/clustermesh/clusters.d/cluster2", False)
    base.update(
        reachable=True,
        endpoint="https://198.18.1.13:32379",
        endpoints=[{"url": "https://198.18.1.13:32379", "reachable": True, "error": None}],
        latency_ms=1.234,
        cluster_id=2,
        heartbeat_note="no heartbeat yet",
        read_only=True,
        keys={"nodes": 2, "services": 1, "ip": 4, "identities": 3, "other": 0, "invalid": 0, "foreign": 0},
        ok=True,
    )
    base.update(overrides)
    return base


def test_row_of_a_healthy_remote_cluster():
    assert M.row("c1-n1", result()) == {
        "node": "c1-n1",
        "cluster": "cluster2",
        "role": "remote",
        "reachable": "yes 1.2ms",
        "cluster_id": "2",
        "heartbeat": "none yet",
        "read_only": "yes",
        "keys": "nodes=2 svc=1 ip=4 id=3",
        "status": "ok",
        "error": "",
    }


def test_row_of_a_local_cluster_with_heartbeat():
    r = M.row("c1-n1", result(name="cluster1", local=True, read_only=None, heartbeat_age=12.4, heartbeat_note=None))
    assert (r["role"], r["read_only"], r["heartbeat"]) == ("local", "-", "12s")


def test_row_of_an_unreachable_cluster():
    error = "no endpoint reachable: https://198.18.1.13:32379: connection refused (nothing listens on that port)"
    bad = M.empty_result("cluster2", "/x", False)
    bad.update(error=error, problems=[error])
    r = M.row("c1-n1", bad)
    assert r["reachable"] == "NO"
    assert r["cluster_id"] == r["heartbeat"] == r["read_only"] == r["keys"] == "-"
    assert r["status"] == "FAIL" and r["error"] == error


def test_row_flags_writable_partial_wrong_id_and_odd_keys():
    r = M.row(
        "c1-n1",
        result(
            read_only=False,
            cluster_id=7,
            cluster_id_expected=2,
            cluster_id_ok=False,
            heartbeat_age=900.0,
            heartbeat_note="heartbeat stale (900s old)",
            endpoints=[
                {"url": "https://a:32379", "reachable": True, "error": None},
                {"url": "https://b:32379", "reachable": False, "error": "refused"},
            ],
            keys={"nodes": 1, "services": None, "ip": 0, "identities": 0, "other": 2, "invalid": 0, "foreign": 1},
            problems=["SECURITY: ...", "cluster ID is 7, expected 2"],
            ok=False,
        ),
    )
    assert r["read_only"] == "NO (WRITABLE)"
    assert r["cluster_id"] == "7 (want 2)"
    assert r["reachable"] == "yes 1/2 1.2ms"
    assert r["heartbeat"] == "900s (stale)"
    assert r["keys"] == "nodes=1 svc=? ip=0 id=0 other=2 foreign=1"
    assert r["status"] == "FAIL" and r["error"] == "SECURITY: ...; cluster ID is 7, expected 2"


def test_row_remote_not_verified():
    r = M.row("c1-n1", result(read_only=None))
    assert r["read_only"] == "unverified"


def test_format_table_aligns_columns():
    rows = [M.row("c1-n1", result()), M.row("c2-node-long", result(name="cluster1", local=True, read_only=None))]
    lines = M.format_table(rows)
    assert len(lines) == 3
    assert lines[0].split() == list(M.TABLE_COLUMNS.values())
    # every column starts at the same offset on every line
    starts = [lines[0].index(title) for title in M.TABLE_COLUMNS.values()]
    for line in lines[1:]:
        assert line[starts[1] - 2 : starts[1]] == "  "
        assert line[starts[1] :].startswith(("cluster2", "cluster1"))
    assert all(line == line.rstrip() for line in lines)


def test_failed_node_row():
    r = M.failed_node_row("c2-n2", "host unreachable")
    assert set(r) == set(M.TABLE_COLUMNS)
    assert (r["node"], r["status"], r["error"]) == ("c2-n2", "FAIL", "host unreachable")
    assert M.format_table([r])[1].startswith("c2-n2")


# --------------------------------------------------------------------------------------------
# check_cluster without a server
# --------------------------------------------------------------------------------------------


def test_check_cluster_missing_config(tmp_path):
    r = M.check_cluster(None, str(tmp_path / "kvstore.yaml"), local=True)
    assert r["reachable"] is False and not r["ok"]
    assert "does not exist" in r["error"] and "has not joined" in r["error"]


def test_check_cluster_bad_config(tmp_path):
    path = tmp_path / "cluster2"
    path.write_text("endpoints: [ftp://x]\n")
    r = M.check_cluster("cluster2", str(path), local=False)
    assert r["reachable"] is False and "https://" in r["error"]


def test_check_cluster_unreachable_endpoint_is_quick(tmp_path):
    # a port nobody listens on: refused at once
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    path = tmp_path / "cluster2"
    path.write_text(f"endpoints: [https://127.0.0.1:{port}]\n")
    r = M.check_cluster("cluster2", str(path), local=False, timeout=2)
    assert r["reachable"] is False
    assert (
        r["error"]
        == f"no endpoint reachable: https://127.0.0.1:{port}: connection refused (nothing listens on that port)"
    )
    assert r["endpoints"] == [
        {"url": f"https://127.0.0.1:{port}", "reachable": False, "error": r["error"].split(": ", 2)[2]}
    ]


def test_mesh_status_ignores_own_cluster_in_clusters_d(tmp_path, monkeypatch):
    (tmp_path / "clusters.d").mkdir()
    for name in ("cluster1", "cluster2"):
        (tmp_path / "clusters.d" / name).write_text("endpoints: [https://127.0.0.1:1]\n")
    seen = []

    def fake(name, path, *, local, **kwargs):
        seen.append((name, local, kwargs["expected"]))
        out = M.empty_result(name or "cluster1", path, local)
        out["ok"] = True
        return out

    monkeypatch.setattr(M, "check_cluster", fake)
    status = M.mesh_status(str(tmp_path), expected={"cluster1": 1}, node="n1")
    assert [c["name"] for c in status["clusters"]] == ["cluster1", "cluster2"]
    assert status["ok"] and status["node"] == "n1"
    assert (None, True, {"cluster1": 1}) in seen
