"""etcd_auth against a real etcd: read-only remote users by certificate CN, idempotent, reconciled."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from ansible_collections.clustermesh.core.plugins.module_utils.etcd_auth import desired_auth, reconcile_auth
from ansible_collections.clustermesh.core.plugins.module_utils.kvstore_client import (
    KVStoreClient,
    KVStorePermissionDenied,
)
from ansible_collections.clustermesh.core.tests.etcd_fixture import EtcdServer, TestPKI, etcd_available

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
pytestmark = [pytest.mark.etcd, pytest.mark.skipif(not etcd_available(), reason="etcd is not installed")]


@pytest.fixture
def etcd(tmp_path):
    server = EtcdServer(tmp_path / "etcd", TestPKI(tmp_path / "pki"))
    server.start()
    yield server
    server.stop()


def client(server, user):
    pair = server.pki.client(user)
    return KVStoreClient(
        [server.endpoint], ca_file=server.pki.ca_cert, cert_file=pair.cert, key_file=pair.key, timeout=3
    )


def test_reconcile_read_only_remote_users(etcd):
    with client(etcd, "root") as root:
        changes = reconcile_auth(root, desired_auth("cluster1", ["cluster2", "cluster3"]))
        assert "enable auth" in changes and "add user remote-cluster2" in changes
        assert root.auth_enabled()
        # second run: nothing to do
        assert reconcile_auth(root, desired_auth("cluster1", ["cluster2", "cluster3"])) == []

    with client(etcd, "admin-cluster1") as admin:
        admin.put("cilium/state/nodes/v1/cluster1/n1", "{}")
        admin.put("cilium/cluster-config/cluster1", '{"id": 1}')
        admin.put("cilium/cluster-config/cluster9", '{"id": 9}')
        admin.put("cilium/.heartbeat", "now")
        admin.put("cilium/policies/x", "secret policy")

    with client(etcd, "remote-cluster2") as remote:
        assert remote.get("cilium/state/nodes/v1/cluster1/n1").value == b"{}"
        assert len(remote.get_prefix("cilium/state/").kvs) == 1
        assert remote.get("cilium/cluster-config/cluster1") is not None
        assert remote.get("cilium/.heartbeat") is not None
        for key in ("cilium/cluster-config/cluster9", "cilium/policies/x"):
            with pytest.raises(KVStorePermissionDenied):
                remote.get(key)
        with pytest.raises(KVStorePermissionDenied):
            remote.put("cilium/state/nodes/v1/cluster1/n1", "tampered")
        with pytest.raises(KVStorePermissionDenied):
            remote.delete("cilium/state/nodes/v1/cluster1/n1")

    # an unknown CN is no user at all
    with client(etcd, "remote-cluster7") as stranger, pytest.raises(KVStorePermissionDenied):
        stranger.get("cilium/state/nodes/v1/cluster1/n1")

    # cluster3 leaves the mesh: its user goes, the others stay
    with client(etcd, "root") as root:
        changes = reconcile_auth(root, desired_auth("cluster1", ["cluster2"]))
        assert changes == ["remove user remote-cluster3"]
        assert "remote-cluster3" not in root.user_list()
        assert "remote-cluster2" in root.user_list()


def test_extra_permission_is_revoked_and_check_mode_changes_nothing(etcd):
    with client(etcd, "root") as root:
        reconcile_auth(root, desired_auth("cluster1", ["cluster2"]))
        root.role_grant_permission("remote", "cilium/", permission="readwrite", prefix=True)
        planned = reconcile_auth(root, desired_auth("cluster1", ["cluster2"]), check_mode=True)
        assert planned == ["revoke readwrite cilium/ from remote"]
        assert any(p.key == "cilium/" for p in root.role_get("remote"))  # check mode left it
        assert reconcile_auth(root, desired_auth("cluster1", ["cluster2"])) == planned
        assert not any(p.key == "cilium/" for p in root.role_get("remote"))


def test_module_end_to_end(etcd, tmp_path):
    pair = etcd.pki.client("root")
    args = {
        "cluster": "cluster1",
        "remote_clusters": ["cluster2"],
        "endpoints": [etcd.endpoint],
        "ca_file": str(etcd.pki.ca_cert),
        "cert_file": str(pair.cert),
        "key_file": str(pair.key),
    }
    env = dict(
        os.environ,
        ANSIBLE_COLLECTIONS_PATH=os.path.join(REPO, "build", "pytest-collections"),
        ANSIBLE_CALLBACK_RESULT_FORMAT="json",
    )
    bin_dir = os.path.dirname(sys.executable)

    def run(*extra):
        proc = subprocess.run(
            [
                os.path.join(bin_dir, "ansible"),
                "localhost",
                "-m",
                "clustermesh.core.etcd_auth",
                "-a",
                json.dumps(args),
                *extra,
            ],
            capture_output=True,
            text=True,
            env=env,
            check=False,
        )
        return proc.returncode, proc.stdout + proc.stderr

    code, out = run("--check")
    assert code == 0 and "CHANGED" in out
    with client(etcd, "root") as root:
        assert not root.auth_enabled()
    code, out = run()
    assert code == 0 and "CHANGED" in out, out
    code, out = run()
    assert code == 0 and "SUCCESS" in out and '"changed": false' in out, out
    args["remote_clusters"] = ["Cluster2"]
    code, out = run()
    assert code != 0 and "remote_clusters: " in out and "Cluster2" in out
