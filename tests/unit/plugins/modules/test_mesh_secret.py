"""mesh_secret against a STAND-IN (mock) Kubernetes API server (tests/k8s_standin.py): no Kubernetes
runs here. What is real: the kubernetes Python client, the HTTP exchange, the Secret's content."""

from __future__ import annotations

import base64
import json

import pytest
import yaml
from ansible.module_utils.testing import patch_module_args

from ansible_collections.clustermesh.core.plugins.module_utils.pki import issue_ca, issue_leaf
from ansible_collections.clustermesh.core.plugins.modules import mesh_secret
from ansible_collections.clustermesh.core.tests.k8s_standin import KubernetesStandIn


@pytest.fixture
def api():
    server = KubernetesStandIn().start()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def peer_creds():
    ca = issue_ca("clustermesh-cluster2-ca")
    leaf = issue_leaf("client", "remote-cluster1", ca_cert_pem=ca.cert_pem, ca_key_pem=ca.key_pem)
    return {
        "name": "cluster2",
        "endpoints": ["https://198.18.2.11:32379"],
        "ca": ca.cert_pem.decode(),
        "cert": leaf.cert_pem.decode(),
        "key": leaf.key_pem.decode(),
    }


def run(args, capsys):
    with patch_module_args(args), pytest.raises(SystemExit) as exc:
        mesh_secret.main()
    out = capsys.readouterr().out
    return exc.value.code, json.loads(out), out


def test_secret_created_in_cilium_format_then_unchanged(api, peer_creds, tmp_path, capsys):
    args = {"cluster": "cluster1", "kubeconfig": api.kubeconfig(tmp_path / "kubeconfig"), "peers": [peer_creds]}
    code, result, out = run(args, capsys)
    assert code == 0 and result["changed"]
    assert "PRIVATE KEY" not in out
    secret = api.secrets[("kube-system", "cilium-clustermesh")]
    data = {k: base64.b64decode(v).decode() for k, v in secret["data"].items()}
    assert sorted(data) == [
        "cluster2",
        "cluster2.etcd-client-ca.crt",
        "cluster2.etcd-client.crt",
        "cluster2.etcd-client.key",
    ]
    assert yaml.safe_load(data["cluster2"]) == {
        "endpoints": ["https://198.18.2.11:32379"],
        "trusted-ca-file": "/var/lib/cilium/clustermesh/cluster2.etcd-client-ca.crt",
        "key-file": "/var/lib/cilium/clustermesh/cluster2.etcd-client.key",
        "cert-file": "/var/lib/cilium/clustermesh/cluster2.etcd-client.crt",
    }
    assert data["cluster2.etcd-client.key"].strip() == peer_creds["key"].strip()
    code, result, _out = run(args, capsys)
    assert code == 0 and not result["changed"]
    assert [m for m, _p in api.requests].count("PUT") == 0


def test_peer_removed_replaces_secret_and_absent_deletes(api, peer_creds, tmp_path, capsys):
    kubeconfig = api.kubeconfig(tmp_path / "kubeconfig")
    run({"cluster": "cluster1", "kubeconfig": kubeconfig, "peers": [peer_creds]}, capsys)
    code, result, _out = run({"cluster": "cluster1", "kubeconfig": kubeconfig, "peers": []}, capsys)
    assert code == 0 and result["changed"] and result["keys"] == []
    assert api.secrets[("kube-system", "cilium-clustermesh")]["data"] == {}
    code, result, _out = run({"cluster": "cluster1", "kubeconfig": kubeconfig, "state": "absent"}, capsys)
    assert code == 0 and result["changed"] and ("kube-system", "cilium-clustermesh") not in api.secrets


def test_check_mode_sends_no_write(api, peer_creds, tmp_path, capsys):
    args = {
        "cluster": "cluster1",
        "kubeconfig": api.kubeconfig(tmp_path / "k"),
        "peers": [peer_creds],
        "_ansible_check_mode": True,
    }
    code, result, _out = run(args, capsys)
    assert code == 0 and result["changed"]
    assert {m for m, _p in api.requests} == {"GET"}


def test_wrong_certificate_is_refused_before_any_request(api, peer_creds, tmp_path, capsys):
    other_ca = issue_ca("another-ca")
    foreign = issue_leaf("client", "remote-cluster1", ca_cert_pem=other_ca.cert_pem, ca_key_pem=other_ca.key_pem)
    bad = dict(peer_creds, cert=foreign.cert_pem.decode(), key=foreign.key_pem.decode())
    code, result, _out = run(
        {"cluster": "cluster1", "kubeconfig": api.kubeconfig(tmp_path / "k"), "peers": [bad]}, capsys
    )
    assert code == 1 and "peer cluster2" in result["msg"]
    assert api.requests == []


def test_unreachable_api_is_a_clear_error(tmp_path, peer_creds, capsys):
    server = KubernetesStandIn()
    kubeconfig = server.kubeconfig(tmp_path / "k")  # never started: nothing listens
    server.server.server_close()
    code, result, _out = run({"cluster": "cluster1", "kubeconfig": kubeconfig, "peers": [peer_creds]}, capsys)
    assert code == 1 and "unreachable" in result["msg"]
