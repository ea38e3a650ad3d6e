# -*- coding: utf-8 -*-
# Copyright: clustermesh.core contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""network_policy against a real etcd (mTLS on 127.0.0.1) with the mesh's RBAC: the module writes as
the node's admin user; invalid input writes nothing; a remote cluster's user cannot read the policies.
(Lab name prefix cmpm; no namespaces needed.)"""

from __future__ import annotations

import json
import textwrap

import pytest
import yaml
from ansible.module_utils.testing import patch_module_args

from ansible_collections.clustermesh.core.plugins.module_utils.etcd_auth import desired_auth
from ansible_collections.clustermesh.core.plugins.module_utils.kvstore_client import (
    KVStoreClient,
    KVStorePermissionDenied,
)
from ansible_collections.clustermesh.core.plugins.module_utils.kvstore_layout import POLICIES_PREFIX
from ansible_collections.clustermesh.core.plugins.module_utils.policy import decode_policy
from ansible_collections.clustermesh.core.plugins.modules import network_policy
from ansible_collections.clustermesh.core.tests.etcd_fixture import EtcdServer, TestPKI, etcd_available

pytestmark = [
    pytest.mark.etcd,
    pytest.mark.skipif(not etcd_available(), reason="etcd and etcdctl are not installed"),
]

SEED = textwrap.dedent(
    """\
    apiVersion: cilium.io/v2
    kind: CiliumNetworkPolicy
    metadata: {name: allow-cross-cluster}
    spec:
      endpointSelector:
        matchLabels: {name: x-wing, io.cilium.k8s.policy.cluster: cluster1}
      egress:
      - toEndpoints:
        - matchLabels: {name: rebel-base, io.cilium.k8s.policy.cluster: cluster2}
    """
)
SEED_KEY = POLICIES_PREFIX + "default/CiliumNetworkPolicy/allow-cross-cluster"
SEED_REF = "default/CiliumNetworkPolicy/allow-cross-cluster"
SEED_CANONICAL = (
    b'{"apiVersion":"cilium.io/v2","kind":"CiliumNetworkPolicy",'
    b'"metadata":{"name":"allow-cross-cluster","namespace":"default"},'
    b'"spec":{"egress":[{"toEndpoints":[{"matchLabels":'
    b'{"io.cilium.k8s.policy.cluster":"cluster2","name":"rebel-base"}}]}],'
    b'"endpointSelector":{"matchLabels":{"io.cilium.k8s.policy.cluster":"cluster1","name":"x-wing"}}}}'
)
NP = {
    "apiVersion": "networking.k8s.io/v1",
    "kind": "NetworkPolicy",
    "metadata": {"name": "rebel-base-80", "namespace": "empire"},
    "spec": {
        "podSelector": {"matchLabels": {"name": "rebel-base"}},
        "policyTypes": ["Ingress"],
        "ingress": [{"from": [{"podSelector": {"matchLabels": {"name": "x-wing"}}}], "ports": [{"port": 80}]}],
    },
}
NP_KEY = POLICIES_PREFIX + "empire/NetworkPolicy/rebel-base-80"


@pytest.fixture(scope="module")
def etcd(tmp_path_factory):
    base = tmp_path_factory.mktemp("cmpm-network-policy")
    server = EtcdServer(base / "etcd", TestPKI(base / "pki"), name="cmpm-policy")
    server.start()
    try:
        plan = desired_auth("cluster1", ["cluster2"])
        grants = {role: [(g.permission, g.key, g.prefix) for g in plan.roles[role]] for role in plan.roles}
        server.enable_auth({"admin-cluster1": grants["admin-cluster1"], "remote-cluster2": grants["remote"]})
        yield server
    finally:
        server.stop()


@pytest.fixture
def admin(etcd):
    with client(etcd, "admin-cluster1") as c:
        c.delete_prefix(POLICIES_PREFIX)
        yield c


def client(server, user):
    pair = server.pki.client(user)
    return KVStoreClient(
        [server.endpoint], ca_file=server.pki.ca_cert, cert_file=pair.cert, key_file=pair.key, timeout=3.0
    )


def run(server, args, capsys, *, check=False, diff=False, fail=False):
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
        network_policy.main()
    result = json.loads(capsys.readouterr().out)
    assert (exc.value.code != 0) == fail, result
    assert result.get("failed", False) == fail, result
    return result


def stored(admin):
    return {kv.key: kv for kv in admin.get_prefix(POLICIES_PREFIX)}


def test_import_the_seed_policy_idempotent_check_and_diff(etcd, admin, tmp_path, capsys):
    path = tmp_path / "seed.yaml"
    path.write_text(SEED)

    # check mode reports the change and writes nothing
    result = run(etcd, {"src": [str(path)]}, capsys, check=True)
    assert result["changed"] and result["written"] == [SEED_REF] and stored(admin) == {}

    result = run(etcd, {"src": [str(path)]}, capsys, diff=True)
    assert result["changed"] and result["policies"] == [SEED_REF] and result["removed"] == []
    kv = admin.get(SEED_KEY)
    assert kv.value == SEED_CANONICAL
    assert decode_policy(kv.value).ref == SEED_REF
    (diff,) = result["diff"]
    assert diff["before"] == "" and diff["after_header"] == SEED_KEY
    assert json.loads(diff["after"]) == json.loads(SEED_CANONICAL)

    # the same again (from a file, then inline as a dict): no change, no write
    result = run(etcd, {"src": [str(path)]}, capsys)
    assert not result["changed"] and result["written"] == []
    assert not run(etcd, {"definition": yaml.safe_load(SEED)}, capsys)["changed"]
    assert admin.get(SEED_KEY).mod_revision == kv.mod_revision

    # a remote cluster's read-only user cannot read the policies (only cilium/state/ and a few keys)
    with client(etcd, "remote-cluster2") as remote:
        with pytest.raises(KVStorePermissionDenied):
            remote.get(SEED_KEY)
        with pytest.raises(KVStorePermissionDenied):
            remote.get_prefix(POLICIES_PREFIX)


@pytest.mark.parametrize(
    "bad, message",
    [
        ("spec: [unclosed\n", "malformed YAML"),
        (
            SEED.replace("  egress:", "  egres:"),
            "spec.egres: unknown field 'egres'",
        ),
        (
            SEED + "    toPorts:\n    - ports:\n      - {port: '80', protocol: TCPP}\n",
            "spec.egress[0].toPorts[0].ports[0].protocol: 'TCPP' is not TCP, UDP or ANY",
        ),
    ],
    ids=["malformed-yaml", "unknown-field", "bad-protocol"],
)
def test_an_invalid_document_writes_nothing(etcd, admin, tmp_path, capsys, bad, message):
    good = tmp_path / "good.yaml"
    good.write_text(SEED)
    broken = tmp_path / "broken.yaml"
    broken.write_text(bad)
    # the valid document comes first, and another valid one inline: still nothing is written
    result = run(etcd, {"src": [str(good), str(broken)], "definition": [NP]}, capsys, fail=True)
    assert str(broken) in result["msg"] and message in result["msg"], result["msg"]
    assert stored(admin) == {}
    # the same with the bad document inline: the message names the item
    result = run(etcd, {"definition": [NP, bad]}, capsys, fail=True)
    assert "definition[1]" in result["msg"] and message in result["msg"], result["msg"]
    assert stored(admin) == {}


def test_exclusive_removes_the_others_and_absent_removes(etcd, admin, capsys):
    both = run(etcd, {"definition": [SEED, NP]}, capsys)
    assert both["written"] == [SEED_REF, "empire/NetworkPolicy/rebel-base-80"]
    assert set(stored(admin)) == {SEED_KEY, NP_KEY}

    # exclusive: the cluster keeps exactly the given set; check mode first
    result = run(etcd, {"definition": [NP], "exclusive": True}, capsys, check=True)
    assert result["changed"] and result["removed"] == [SEED_REF] and set(stored(admin)) == {SEED_KEY, NP_KEY}
    result = run(etcd, {"definition": [NP], "exclusive": True}, capsys, diff=True)
    assert result["changed"] and result["removed"] == [SEED_REF] and result["written"] == []
    assert set(stored(admin)) == {NP_KEY}
    assert result["diff"][0]["after"] == "" and '"allow-cross-cluster"' in result["diff"][0]["before"]
    assert not run(etcd, {"definition": [NP], "exclusive": True}, capsys)["changed"]

    # a changed document is rewritten in place
    changed = json.loads(json.dumps(NP))
    changed["spec"]["ingress"][0]["ports"] = [{"port": 8080}]
    result = run(etcd, {"definition": changed}, capsys, diff=True)
    assert result["written"] == ["empire/NetworkPolicy/rebel-base-80"]
    assert '"port": 80\n' in result["diff"][0]["before"] and '"port": 8080' in result["diff"][0]["after"]
    assert decode_policy(admin.get(NP_KEY).value).document["spec"]["ingress"][0]["ports"] == [{"port": 8080}]

    # absent by document, and by name (kind omitted: any kind)
    run(etcd, {"definition": SEED}, capsys)
    result = run(etcd, {"definition": SEED, "state": "absent"}, capsys)
    assert result["removed"] == [SEED_REF] and set(stored(admin)) == {NP_KEY}
    assert not run(etcd, {"definition": SEED, "state": "absent"}, capsys)["changed"]
    result = run(etcd, {"name": "rebel-base-80", "namespace": "empire", "state": "absent"}, capsys, check=True)
    assert result["removed"] == ["empire/NetworkPolicy/rebel-base-80"] and set(stored(admin)) == {NP_KEY}
    result = run(etcd, {"name": "rebel-base-80", "namespace": "empire", "state": "absent"}, capsys)
    assert result["removed"] == ["empire/NetworkPolicy/rebel-base-80"] and stored(admin) == {}

    # exclusive with an empty set removes every policy, also a key that is not a policy key
    run(etcd, {"definition": [SEED, NP]}, capsys)
    admin.put(POLICIES_PREFIX + "junk", "x")
    result = run(etcd, {"definition": [], "exclusive": True}, capsys)
    junk = POLICIES_PREFIX + "junk"
    assert sorted(result["removed"]) == sorted([SEED_REF, "empire/NetworkPolicy/rebel-base-80", junk])
    assert stored(admin) == {}


def test_a_value_changed_by_hand_is_replaced(etcd, admin, capsys):
    admin.put(SEED_KEY, "garbage")
    result = run(etcd, {"definition": SEED}, capsys)
    assert result["changed"] and admin.get(SEED_KEY).value == SEED_CANONICAL
