"""mesh_join: the node's kvstore.yaml and clusters.d, as Cilium lays them out."""

from __future__ import annotations

import json
import os

import pytest
import yaml
from ansible.module_utils.testing import patch_module_args

from ansible_collections.clustermesh.core.plugins.module_utils.pki import issue_ca, issue_leaf
from ansible_collections.clustermesh.core.plugins.modules import mesh_join


def _creds(ca, cn, endpoints):
    leaf = issue_leaf("client", cn, ca_cert_pem=ca.cert_pem, ca_key_pem=ca.key_pem)
    return {
        "endpoints": endpoints,
        "ca": ca.cert_pem.decode(),
        "cert": leaf.cert_pem.decode(),
        "key": leaf.key_pem.decode(),
    }


@pytest.fixture(scope="module")
def cas():
    return {name: issue_ca("clustermesh-%s-ca" % name) for name in ("cluster1", "cluster2", "cluster3")}


def args(tmp_path, cas, peers=("cluster2",), **extra):
    a = {
        "cluster": "cluster1",
        "config_dir": str(tmp_path),
        "local": _creds(cas["cluster1"], "admin-cluster1", ["https://198.18.1.11:2379"]),
        "peers": [
            dict(name=p, **_creds(cas[p], "remote-cluster1", ["https://198.18.%d.11:32379" % (i + 2)]))
            for i, p in enumerate(peers)
        ],
    }
    a.update(extra)
    return a


def run(a, capsys):
    with patch_module_args(a), pytest.raises(SystemExit) as exc:
        mesh_join.main()
    out = capsys.readouterr().out
    return exc.value.code, json.loads(out), out


def test_writes_cilium_layout_then_is_idempotent(tmp_path, cas, capsys):
    a = args(tmp_path, cas)
    code, result, unused = run(a, capsys)
    assert code == 0 and result["changed"]
    config = yaml.safe_load((tmp_path / "clusters.d" / "cluster2").read_text())
    assert config == {
        "endpoints": ["https://198.18.2.11:32379"],
        "trusted-ca-file": str(tmp_path / "clusters.d" / "cluster2.etcd-client-ca.crt"),
        "key-file": str(tmp_path / "clusters.d" / "cluster2.etcd-client.key"),
        "cert-file": str(tmp_path / "clusters.d" / "cluster2.etcd-client.crt"),
    }
    local = yaml.safe_load((tmp_path / "kvstore.yaml").read_text())
    assert local["endpoints"] == ["https://198.18.1.11:2379"]
    assert local["cert-file"] == str(tmp_path / "pki" / "admin.crt")
    assert oct(os.stat(tmp_path / "clusters.d" / "cluster2.etcd-client.key").st_mode & 0o777) == "0o600"
    assert oct(os.stat(tmp_path / "pki" / "admin.key").st_mode & 0o777) == "0o600"
    code, result, unused = run(a, capsys)
    assert code == 0 and not result["changed"] and result["written"] == []


def test_peer_removed_files_go(tmp_path, cas, capsys):
    run(args(tmp_path, cas, peers=("cluster2", "cluster3")), capsys)
    (tmp_path / "clusters.d" / "README.txt").write_text("not ours")
    code, result, unused = run(args(tmp_path, cas, peers=("cluster2",)), capsys)
    assert code == 0 and result["changed"]
    left = sorted(os.listdir(tmp_path / "clusters.d"))
    assert left == [
        "README.txt",
        "cluster2",
        "cluster2.etcd-client-ca.crt",
        "cluster2.etcd-client.crt",
        "cluster2.etcd-client.key",
    ]
    assert len(result["removed"]) == 4


def test_check_mode_writes_nothing(tmp_path, cas, capsys):
    code, result, unused = run(args(tmp_path, cas, _ansible_check_mode=True), capsys)
    assert code == 0 and result["changed"]
    assert os.listdir(tmp_path) == []


def test_diff_never_shows_keys(tmp_path, cas, capsys):
    a = args(tmp_path, cas, _ansible_diff=True)
    code, result, out = run(a, capsys)
    assert code == 0 and result["diff"]
    assert "PRIVATE KEY" not in out
    assert a["local"]["key"].splitlines()[1] not in out


@pytest.mark.parametrize(
    ("mutate", "message"),
    [
        (lambda a, cas: a["peers"][0].update(ca=cas["cluster3"].cert_pem.decode()), "peer cluster2: "),
        (lambda a, cas: a["peers"][0].update(key=a["local"]["key"]), "does not belong to the client certificate"),
        (
            lambda a, cas: a["peers"][0].update(**_creds(cas["cluster2"], "remote-cluster9", ["https://1.2.3.4:1"])),
            "CN is 'remote-cluster9', expected 'remote-cluster1'",
        ),
        (lambda a, cas: a["peers"][0].update(name="cluster1"), "own cluster"),
        (lambda a, cas: a["peers"][0].update(name="Cluster2"), "peers[0].name"),
        (lambda a, cas: a["peers"][0].update(endpoints=["ftp://x"]), "ftp://x"),
        (lambda a, cas: a["local"].update(cert="garbage"), "local cluster cluster1"),
    ],
)
def test_bad_input_writes_nothing(tmp_path, cas, capsys, mutate, message):
    a = args(tmp_path, cas)
    mutate(a, cas)
    code, result, out = run(a, capsys)
    assert code == 1 and result["failed"]
    assert message in result["msg"]
    assert os.listdir(tmp_path) == []
    assert "PRIVATE KEY" not in out


def _member(ca, root_cn="root"):
    server = issue_leaf(
        "server", "c1-n1", ca_cert_pem=ca.cert_pem, ca_key_pem=ca.key_pem, subject_alt_names=["IP:198.18.1.11"]
    )
    root = issue_leaf("client", root_cn, ca_cert_pem=ca.cert_pem, ca_key_pem=ca.key_pem)
    return {
        "ca": ca.cert_pem.decode(),
        "cert": server.cert_pem.decode(),
        "key": server.key_pem.decode(),
        "root_cert": root.cert_pem.decode(),
        "root_key": root.key_pem.decode(),
    }


def test_kvstore_member_certificates(tmp_path, cas, capsys):
    code, result, out = run(args(tmp_path, cas, kvstore_member=_member(cas["cluster1"])), capsys)
    assert code == 0 and result["changed"]
    etcd = tmp_path / "etcd"
    assert sorted(os.listdir(etcd)) == ["ca.crt", "root.crt", "root.key", "server.crt", "server.key"]
    assert oct(os.stat(etcd).st_mode & 0o777) == "0o700"
    assert oct(os.stat(etcd / "server.key").st_mode & 0o777) == "0o600"
    assert "PRIVATE KEY" not in out


def test_kvstore_member_with_wrong_root_cn_writes_nothing(tmp_path, cas, capsys):
    code, result, unused = run(args(tmp_path, cas, kvstore_member=_member(cas["cluster1"], root_cn="admin")), capsys)
    assert code == 1 and "CN must be 'root'" in result["msg"]
    assert os.listdir(tmp_path) == []
