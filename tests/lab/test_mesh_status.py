"""mesh_status against two real etcds with auth: cluster1 and cluster2, each with its own CA.

Node config directories are laid out as role ``mesh`` writes them: ``kvstore.yaml`` with the
cluster's admin user, ``clusters.d/<peer>`` with the peer's CA and the read-only
``remote-<own cluster>`` user's certificate signed by the peer's CA.
"""

from __future__ import annotations

import datetime
import json
import os
import shutil
import socket
import subprocess
import sys
import time

import pytest

from ansible_collections.clustermesh.core.plugins.module_utils import kvstore_layout as L
from ansible_collections.clustermesh.core.plugins.module_utils.etcd_auth import desired_auth, reconcile_auth
from ansible_collections.clustermesh.core.plugins.module_utils.kvstore_client import KVStoreClient
from ansible_collections.clustermesh.core.plugins.module_utils.mesh_status import (
    PROBE_PREFIX,
    check_cluster,
    mesh_status,
)
from ansible_collections.clustermesh.core.tests.etcd_fixture import (
    EtcdServer,
    SilentListener,
    TestPKI,
    etcd_available,
)

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
pytestmark = [pytest.mark.etcd, pytest.mark.skipif(not etcd_available(), reason="etcd is not installed")]

PEERS = {"cluster1": ["cluster2"], "cluster2": ["cluster1"]}
IDS = {"cluster1": 1, "cluster2": 2}


def client(server, user):
    pair = server.pki.client(user)
    return KVStoreClient(
        [server.endpoint], ca_file=server.pki.ca_cert, cert_file=pair.cert, key_file=pair.key, timeout=5
    )


@pytest.fixture(scope="module")
def mesh(tmp_path_factory):
    """Two etcds (cluster1 with some state and a heartbeat, cluster2 empty), auth as the kvstore role sets it."""
    base = tmp_path_factory.mktemp("mesh")
    servers = {}
    try:
        for name in ("cluster1", "cluster2"):
            pki = TestPKI(base / name / "pki", name=f"clustermesh-{name}-ca")
            server = EtcdServer(base / name / "etcd", pki, name=f"etcd-{name}")
            server.start()
            servers[name] = server
            with client(server, "root") as root:
                reconcile_auth(root, desired_auth(name, PEERS[name]))
            with client(server, f"admin-{name}") as admin:
                admin.put(L.cluster_config_key(name), L.encode_cluster_config(L.ClusterConfig(id=IDS[name])))
        with client(servers["cluster1"], "admin-cluster1") as admin:
            for key in (
                L.node_key("cluster1", "c1-n1"),
                L.node_key("cluster1", "c1-n2"),
                L.service_key("cluster1", "default", "rebel-base"),
                L.ip_key("10.1.0.5"),
                L.ip_key("10.1.0.6"),
                L.ip_key("10.1.1.0/24"),
                L.identity_key(65637),
                "cilium/state/identities/v1/value/k8s:name=x-wing;/198.18.1.11",
            ):
                admin.put(key, "{}")
            written = datetime.datetime.now(datetime.UTC) - datetime.timedelta(seconds=30)
            admin.put(L.HEARTBEAT_KEY, L.encode_timestamp(written))
        yield servers
    finally:
        for server in servers.values():
            server.stop()


def write_config(path, endpoints, server, user, *, peer=None):
    """An etcd-config file; for a peer the CA and client files go next to it as clusters.d does."""
    pair = server.pki.client(user)
    if peer:
        stem = str(path)
        ca, cert, key = stem + ".etcd-client-ca.crt", stem + ".etcd-client.crt", stem + ".etcd-client.key"
        shutil.copy(server.pki.ca_cert, ca)
        shutil.copy(pair.cert, cert)
        shutil.copy(pair.key, key)
        os.chmod(key, 0o600)
    else:
        ca, cert, key = server.pki.ca_cert, pair.cert, pair.key
    lines = ["endpoints:"] + [f"- {ep}" for ep in endpoints]
    lines += [f"trusted-ca-file: {ca}", f"cert-file: {cert}", f"key-file: {key}"]
    path.write_text("\n".join(lines) + "\n")


def node_dir(tmp_path, mesh, cluster):
    """The config dir of a node of ``cluster``: its own etcd as admin, the peer as remote-<cluster>."""
    config_dir = tmp_path / f"node-of-{cluster}"
    (config_dir / "clusters.d").mkdir(parents=True)
    server = mesh[cluster]
    write_config(config_dir / "kvstore.yaml", [server.endpoint], server, f"admin-{cluster}")
    for peer in PEERS[cluster]:
        peer_server = mesh[peer]
        write_config(
            config_dir / "clusters.d" / peer, [peer_server.endpoint], peer_server, f"remote-{cluster}", peer=True
        )
    return config_dir


def probe_keys(server):
    with client(server, "root") as root:
        return [kv.key for kv in root.get_prefix(PROBE_PREFIX, keys_only=True)]


def by_name(status):
    return {c["name"]: c for c in status["clusters"]}


# --------------------------------------------------------------------------------------------


def test_node_of_cluster2_sees_both_clusters(mesh, tmp_path):
    config_dir = node_dir(tmp_path, mesh, "cluster2")
    status = mesh_status(str(config_dir), timeout=5, expected=IDS, node="c2-n1")
    assert status["ok"], json.dumps(status, indent=1)
    assert [c["name"] for c in status["clusters"]] == ["cluster2", "cluster1"]
    local, remote = by_name(status)["cluster2"], by_name(status)["cluster1"]

    # own cluster: name from the admin certificate, no read-only check, no heartbeat yet
    assert local["local"] and local["user"] == "admin-cluster2"
    assert local["reachable"] and local["error"] is None
    assert local["cluster_id"] == 2 and local["cluster_id_ok"] is True
    assert local["read_only"] is None
    assert local["heartbeat_age"] is None and local["heartbeat_note"] == "no heartbeat yet"
    assert local["keys"] == dict.fromkeys(local["keys"], 0)

    # the remote view of cluster1, through the read-only user
    assert not remote["local"] and remote["user"] == "remote-cluster2"
    assert remote["reachable"] and remote["endpoint"] == mesh["cluster1"].endpoint
    assert 0 < remote["latency_ms"] < 5000
    assert remote["cluster_id"] == 1 and remote["cluster_id_ok"] is True
    assert remote["read_only"] is True, remote["read_only_note"]
    assert 25 <= remote["heartbeat_age"] < 120 and remote["heartbeat_note"] is None
    assert remote["keys"] == {
        "nodes": 2,
        "services": 1,
        "ip": 3,
        "identities": 1,
        "other": 1,
        "invalid": 0,
        "foreign": 0,
    }
    # server identity: the certificate etcd presents, and etcd's status
    server = remote["server"]
    assert server["verified"] is True and server["error"] is None
    assert server["subject_cn"] == "etcd-cluster1-server"
    assert server["issuer_cn"] == "clustermesh-cluster1-ca"
    assert "IP:127.0.0.1" in server["sans"] and "DNS:localhost" in server["sans"]
    assert len(server["fingerprint_sha256"]) == 95
    assert server["tls_version"].startswith("TLS")
    etcd = remote["etcd"]
    assert etcd["version"].startswith("3.") and etcd["is_leader"] and etcd["member_id"] == etcd["leader"]
    assert etcd["db_size"] > 0
    assert probe_keys(mesh["cluster1"]) == []


def test_node_of_cluster1_remote_view_of_empty_cluster2(mesh, tmp_path):
    status = mesh_status(str(node_dir(tmp_path, mesh, "cluster1")), timeout=5, expected=IDS, node="c1-n1")
    assert status["ok"], json.dumps(status, indent=1)
    local, remote = by_name(status)["cluster1"], by_name(status)["cluster2"]
    assert local["keys"]["nodes"] == 2 and 25 <= local["heartbeat_age"] < 120
    assert remote["read_only"] is True and remote["heartbeat_note"] == "no heartbeat yet"
    assert remote["server"]["subject_cn"] == "etcd-cluster2-server"


def test_wrong_expected_cluster_id_is_reported(mesh, tmp_path):
    status = mesh_status(str(node_dir(tmp_path, mesh, "cluster2")), expected={"cluster1": 7}, node="c2-n1")
    remote = by_name(status)["cluster1"]
    assert not status["ok"] and not remote["ok"]
    assert remote["cluster_id"] == 1 and remote["cluster_id_ok"] is False and remote["cluster_id_expected"] == 7
    assert "cluster ID is 1, expected 7" in remote["problems"]
    assert by_name(status)["cluster2"]["cluster_id_ok"] is None  # no expectation given


def test_writable_remote_credentials_are_reported_and_the_probe_removed(mesh, tmp_path):
    config_dir = node_dir(tmp_path, mesh, "cluster2")
    # a mistake: the peer config carries cluster1's admin certificate
    server = mesh["cluster1"]
    write_config(config_dir / "clusters.d" / "cluster1", [server.endpoint], server, "admin-cluster1", peer=True)
    status = mesh_status(str(config_dir), expected=IDS, node="c2-n1")
    remote = by_name(status)["cluster1"]
    assert remote["reachable"] and remote["user"] == "admin-cluster1"
    assert remote["read_only"] is False
    assert remote["read_only_note"].startswith("SECURITY: cluster cluster1 accepted a write")
    assert "deleted again" in remote["read_only_note"]
    assert remote["probe_key_left"] is None
    assert not remote["ok"] and not status["ok"]
    assert probe_keys(server) == []


def test_user_that_may_not_list_all_state_gets_partial_counts(mesh, tmp_path):
    server = mesh["cluster1"]
    with client(server, "root") as root:
        if "nodes-reader" not in root.role_list():
            root.role_add("nodes-reader")
            root.role_grant_permission("nodes-reader", L.NODES_PREFIX, permission="read", prefix=True)
            root.role_grant_permission("nodes-reader", L.cluster_config_key("cluster1"), permission="read")
            root.user_add("remote-cluster7")
            root.user_grant_role("remote-cluster7", "nodes-reader")
    path = tmp_path / "cluster1"
    write_config(path, [server.endpoint], server, "remote-cluster7", peer=True)
    result = check_cluster("cluster1", str(path), local=False, timeout=5, node="c7-n1")
    assert result["reachable"] and result["cluster_id"] == 1
    assert result["keys"]["nodes"] == 2
    assert result["keys"]["services"] is None and result["keys"]["ip"] is None
    assert result["read_only"] is True
    # may not read the heartbeat: said so, without failing the cluster
    assert "cannot read cilium/.heartbeat" in result["heartbeat_note"]
    assert result["ok"], result["problems"]


def test_unreachable_endpoints_fail_fast_with_a_clear_error(mesh, tmp_path):
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        closed_port = sock.getsockname()[1]
    silent = SilentListener()
    try:
        server = mesh["cluster1"]
        path = tmp_path / "cluster1"
        write_config(path, [f"https://127.0.0.1:{closed_port}", silent.endpoint], server, "remote-cluster2", peer=True)
        started = time.monotonic()
        result = check_cluster("cluster1", str(path), local=False, timeout=1.5)
        elapsed = time.monotonic() - started
    finally:
        silent.close()
    assert elapsed < 3.0, elapsed
    assert result["reachable"] is False and not result["ok"]
    assert result["error"].startswith("no endpoint reachable: ")
    assert f"https://127.0.0.1:{closed_port}: connection refused" in result["error"]
    assert f"{silent.endpoint}: no answer within 1.5s" in result["error"]
    assert [e["reachable"] for e in result["endpoints"]] == [False, False]


def test_one_endpoint_down_is_reported_while_the_other_answers(mesh, tmp_path):
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        closed_port = sock.getsockname()[1]
    server = mesh["cluster1"]
    path = tmp_path / "cluster1"
    write_config(path, [f"https://127.0.0.1:{closed_port}", server.endpoint], server, "remote-cluster2", peer=True)
    result = check_cluster("cluster1", str(path), local=False, timeout=2)
    assert result["reachable"] and result["endpoint"] == server.endpoint
    assert result["read_only"] is True
    assert result["problems"] == [f"unreachable endpoint(s): https://127.0.0.1:{closed_port}"]


def test_wrong_ca_shows_what_the_server_presented(mesh, tmp_path):
    # cluster2's CA does not sign cluster1's etcd certificate
    server, other = mesh["cluster1"], mesh["cluster2"]
    path = tmp_path / "cluster1"
    write_config(path, [server.endpoint], server, "remote-cluster2", peer=True)
    shutil.copy(other.pki.ca_cert, str(path) + ".etcd-client-ca.crt")
    result = check_cluster("cluster1", str(path), local=False, timeout=2)
    assert result["reachable"] is False
    assert "server certificate rejected" in result["error"]
    assert result["server"]["verified"] is False
    assert result["server"]["subject_cn"] == "etcd-cluster1-server"
    assert result["server"]["issuer_cn"] == "clustermesh-cluster1-ca"


# --------------------------------------------------------------------------------------------
# the module, end to end
# --------------------------------------------------------------------------------------------


def run_module(args, *extra):
    env = dict(
        os.environ,
        ANSIBLE_COLLECTIONS_PATH=os.path.join(REPO, "build", "pytest-collections"),
        ANSIBLE_CALLBACK_RESULT_FORMAT="json",
        ANSIBLE_LOCALHOST_WARNING="false",
        ANSIBLE_INVENTORY_UNPARSED_WARNING="false",
    )
    ansible = os.path.join(os.path.dirname(sys.executable), "ansible")
    proc = subprocess.run(
        [ansible, "localhost", "-m", "clustermesh.core.mesh_status", "-a", json.dumps(args), *extra],
        capture_output=True,
        text=True,
        env=env,
        check=False,
        timeout=120,
    )
    out = proc.stdout
    assert "=>" in out, out + proc.stderr
    return proc.returncode, json.loads(out.split("=>", 1)[1]), out + proc.stderr


def test_module_end_to_end(mesh, tmp_path):
    config_dir = node_dir(tmp_path, mesh, "cluster2")
    args = {"config_dir": str(config_dir), "timeout": 5, "expected": IDS}
    code, result, out = run_module(args)
    assert code == 0, out
    assert result["changed"] is False and result["ok"] is True, out
    assert [c["name"] for c in result["clusters"]] == ["cluster2", "cluster1"]
    remote = result["clusters"][1]
    assert remote["read_only"] is True and remote["cluster_id"] == 1
    assert remote["server"]["subject_cn"] == "etcd-cluster1-server"
    assert result["rows"][1]["read_only"] == "yes" and result["rows"][1]["status"] == "ok"
    assert result["table"][0].startswith("NODE") and len(result["table"]) == 3

    # check mode: the same answer, nothing changed
    code, checked, out = run_module(args, "--check")
    assert code == 0 and checked["changed"] is False and checked["ok"] is True, out

    # a writable remote: not ok, a warning, still changed=false (the probe was removed)
    server = mesh["cluster1"]
    write_config(config_dir / "clusters.d" / "cluster1", [server.endpoint], server, "admin-cluster1", peer=True)
    code, result, out = run_module(args)
    assert code == 0, out
    assert result["ok"] is False and result["changed"] is False
    assert "[WARNING]: SECURITY: cluster cluster1 accepted a write" in out, out
    assert probe_keys(server) == []

    # bad options fail with a message naming them
    code, result, out = run_module({"config_dir": str(config_dir), "expected": {"Cluster1": 1}})
    assert code != 0 and "expected: cluster name 'Cluster1' is invalid" in result["msg"]
    code, result, out = run_module({"config_dir": str(config_dir), "timeout": 0})
    assert code != 0 and "timeout" in result["msg"]
