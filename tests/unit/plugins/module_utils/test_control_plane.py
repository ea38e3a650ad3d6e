"""The control plane's derived names, certificates and node files."""

from __future__ import annotations

import pytest

from ansible_collections.clustermesh.core.plugins.module_utils import control_plane as cp
from ansible_collections.clustermesh.core.plugins.module_utils.mesh_model import validate_mesh


@pytest.fixture
def mesh():
    return validate_mesh(
        [
            {
                "name": "cluster1",
                "id": 1,
                "pod_cidrs": ["10.1.0.0/16"],
                "nodes": [{"name": "c1-n1", "ip": "198.18.1.11"}, {"name": "c1-n2", "ip": "198.18.1.12"}],
                "kvstore_members": ["c1-n1"],
                "kvstore_proxies": ["c1-n1", "c1-n2"],
                "connect_to": ["cluster2"],
            },
            {
                "name": "cluster2",
                "id": 2,
                "pod_cidrs": ["10.2.0.0/16"],
                "nodes": [{"name": "c2-n1", "ip": "198.18.2.11"}],
            },
            {
                "name": "tenant",
                "id": 3,
                "pod_cidrs": ["10.3.0.0/16"],
                "nodes": [{"name": "t-n1", "ip": "198.18.3.11"}],
                "connect_to": ["cluster1"],
            },
        ]
    ).to_dict()


def test_endpoints(mesh):
    c1 = mesh["clusters"][0]
    assert cp.member_endpoints(c1) == ["https://198.18.1.11:2379"]
    assert cp.mesh_endpoints(c1) == ["https://198.18.1.11:32379", "https://198.18.1.12:32379"]


def test_certificate_plan(mesh):
    plan = {c["id"]: c for c in cp.certificate_plan(mesh, "/pki")}
    # CAs come first so every leaf finds its CA
    assert [c["kind"] for c in cp.certificate_plan(mesh, "/pki")][:3] == ["ca", "ca", "ca"]
    server = plan["cluster1/server-c1-n1"]
    assert server["common_name"] == "c1-n1"
    # remote clients connect through either proxy: both proxy IPs must be in the etcd certificate
    assert {"IP:198.18.1.11", "IP:198.18.1.12", "IP:127.0.0.1", "DNS:cluster1.mesh.local"} <= set(
        server["subject_alt_names"]
    )
    assert server["ca_path"] == "/pki/cluster1/ca.crt"
    assert plan["cluster1/admin"]["common_name"] == "admin-cluster1"
    # cluster1 is read by cluster2 and by the tenant; the tenant is read by nobody
    assert plan["cluster1/remote-tenant"]["common_name"] == "remote-tenant"
    assert "cluster1/remote-cluster2" in plan
    # only cluster2 (connect_to defaults to every other cluster) reads the tenant
    assert [k for k in plan if k.startswith("tenant/remote-")] == ["tenant/remote-cluster2"]
    assert "cluster2/remote-tenant" not in plan


def test_node_files(mesh):
    files = cp.node_files(mesh, "c1-n1", "/pki")
    assert files["member"] and files["proxy"]
    assert files["proxy_backends"] == [{"name": "c1-n1", "address": "198.18.1.11", "port": 2379, "check_port": 2381}]
    assert files["local"]["endpoints"] == ["https://198.18.1.11:2379"]
    assert files["local"]["cert-file"] == "/etc/clustermesh/pki/admin.crt"
    peers = {p["name"]: p for p in files["peers"]}
    assert set(peers) == {"cluster2"}  # cluster1 connects to cluster2 only
    assert peers["cluster2"]["cert_src"] == "/pki/cluster2/remote-cluster1.crt"
    assert peers["cluster2"]["endpoints"] == ["https://198.18.2.11:32379"]
    assert files["member_credentials"]["cert_src"] == "/pki/cluster1/server-c1-n1.crt"
    assert files["member_credentials"]["root_key_src"] == "/pki/cluster1/root.key"
    assert cp.node_files(mesh, "c1-n2", "/pki")["member_credentials"] is None  # not a member
    tenant = cp.node_files(mesh, "t-n1", "/pki")
    assert [p["name"] for p in tenant["peers"]] == ["cluster1"]
    assert tenant["peers"][0]["cert_src"] == "/pki/cluster1/remote-tenant.crt"
    with pytest.raises(KeyError, match="not part of the mesh"):
        cp.node_files(mesh, "ghost", "/pki")


def test_remote_read_keys_are_the_cilium_set():
    assert cp.remote_read_keys("cluster1") == [
        ("cilium/.heartbeat", False),
        ("cilium/state/", True),
        ("cilium/cluster-config/cluster1", False),
        ("cilium/synced/cluster1/", True),
    ]
