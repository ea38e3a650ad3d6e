# -*- coding: utf-8 -*-
# Copyright: clustermesh.core contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""global_service against a real etcd (mTLS on 127.0.0.1) with the mesh's RBAC: the module writes as
the node's admin user, a remote cluster's user must not be able to read the declaration."""

from __future__ import annotations

import json

import pytest
from ansible.module_utils.testing import patch_module_args

from ansible_collections.clustermesh.core.plugins.module_utils.etcd_auth import desired_auth
from ansible_collections.clustermesh.core.plugins.module_utils.kvstore_client import (
    KVStoreClient,
    KVStorePermissionDenied,
)
from ansible_collections.clustermesh.core.plugins.module_utils.services import decode_declaration
from ansible_collections.clustermesh.core.plugins.modules import global_service
from ansible_collections.clustermesh.core.tests.etcd_fixture import EtcdServer, TestPKI, etcd_available

pytestmark = [
    pytest.mark.etcd,
    pytest.mark.skipif(not etcd_available(), reason="etcd and etcdctl are not installed"),
]

KEY = "cilium/clustermesh-core/services/v1/default/rebel-base"
SERVICE = {
    "name": "rebel-base",
    "cluster_ip": "172.30.1.10",
    "ports": [{"name": "http", "port": 80}],
    "selector": {"name": "rebel-base"},
}


@pytest.fixture(scope="module")
def etcd(tmp_path_factory):
    base = tmp_path_factory.mktemp("cmg-global-service")
    server = EtcdServer(base / "etcd", TestPKI(base / "pki"), name="cmg-svc")
    server.start()
    try:
        plan = desired_auth("cluster1", ["cluster2"])
        grants = {role: [(g.permission, g.key, g.prefix) for g in plan.roles[role]] for role in plan.roles}
        server.enable_auth({"admin-cluster1": grants["admin-cluster1"], "remote-cluster2": grants["remote"]})
        yield server
    finally:
        server.stop()


def client(server, user):
    pair = server.pki.client(user)
    return KVStoreClient(
        [server.endpoint], ca_file=server.pki.ca_cert, cert_file=pair.cert, key_file=pair.key, timeout=3.0
    )


def run(server, args, capsys, *, check=False, diff=False):
    pair = server.pki.client("admin-cluster1")
    args = {
        "endpoints": [server.endpoint],
        "ca_file": server.pki.ca_cert,
        "cert_file": pair.cert,
        "key_file": pair.key,
        "_ansible_check_mode": check,
        "_ansible_diff": diff,
        **args,
    }
    with patch_module_args(args), pytest.raises(SystemExit) as exc:
        global_service.main()
    result = json.loads(capsys.readouterr().out)
    assert exc.value.code == 0, result
    return result


def test_declare_redeclare_change_remove(etcd, capsys):
    with client(etcd, "admin-cluster1") as admin, client(etcd, "remote-cluster2") as remote:
        admin.delete(KEY)

        # check mode: reports the change, writes nothing
        result = run(etcd, SERVICE, capsys, check=True)
        assert result["changed"] and admin.get(KEY) is None

        # declare
        result = run(etcd, SERVICE, capsys)
        assert result["changed"] and result["key"] == KEY
        stored = admin.get(KEY)
        assert json.loads(stored.value) == result["declaration"]
        decl = decode_declaration(stored.value, namespace="default", name="rebel-base")
        assert decl.cluster_ip == "172.30.1.10" and decl.options.global_ and decl.options.shared
        assert decl.options.affinity == "none" and dict(decl.selector) == {"name": "rebel-base"}

        # the same again: no change, no write
        result = run(etcd, SERVICE, capsys)
        assert not result["changed"]
        assert admin.get(KEY).mod_revision == stored.mod_revision

        # a remote cluster's user cannot read it (only cilium/state/ and a few keys)
        with pytest.raises(KVStorePermissionDenied):
            remote.get(KEY)

        # change: affinity local, not shared, HTTP health check; the diff shows both documents
        changed = {**SERVICE, "affinity": "local", "shared": False, "health_check": {"type": "http", "path": "/ok"}}
        result = run(etcd, changed, capsys, diff=True)
        assert result["changed"]
        assert '"service.cilium.io/affinity": "none"' in result["diff"]["before"]
        assert '"service.cilium.io/affinity": "local"' in result["diff"]["after"]
        decl = decode_declaration(admin.get(KEY).value)
        assert decl.options.affinity == "local" and not decl.options.shared
        assert decl.health_check.type == "http" and decl.health_check.path == "/ok"
        assert not run(etcd, changed, capsys)["changed"]

        # a value someone wrote by hand that is not even JSON is replaced
        admin.put(KEY, "garbage")
        assert run(etcd, changed, capsys)["changed"]
        assert json.loads(admin.get(KEY).value)["version"] == 1

        # remove (check mode first), then remove again: no change
        absent = {"name": "rebel-base", "state": "absent"}
        assert run(etcd, absent, capsys, check=True)["changed"] and admin.get(KEY) is not None
        result = run(etcd, absent, capsys)
        assert result["changed"] and result["declaration"] is None and admin.get(KEY) is None
        assert not run(etcd, absent, capsys)["changed"]
