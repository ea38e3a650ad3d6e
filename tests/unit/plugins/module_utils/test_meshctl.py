"""meshctl against a real agent API socket: tables, --json, exit codes."""

from __future__ import annotations

import io
import json
import os
import shutil
import subprocess
import sys
import tempfile

import pytest

from ansible_collections.clustermesh.core.plugins.module_utils import meshctl
from ansible_collections.clustermesh.core.plugins.module_utils.agent_api import (
    AgentServer,
    EndpointRegistry,
    default_api,
)


@pytest.fixture
def agent():
    directory = tempfile.mkdtemp(prefix="cmctl-", dir="/tmp")
    sock = os.path.join(directory, "meshd.sock")
    api = default_api(EndpointRegistry("10.1.0.0/24"), status=lambda: {"cluster": "cluster1", "node": "c1-n1"})
    try:
        with AgentServer(sock, api) as server:
            yield server
    finally:
        shutil.rmtree(directory, ignore_errors=True)


def ctl(*argv):
    out, err = io.StringIO(), io.StringIO()
    status = meshctl.main(list(argv), stdout=out, stderr=err)
    return status, out.getvalue(), err.getvalue()


def test_endpoints_table_and_json(agent):
    agent.api.registry.add({"containerID": "0123456789abcdef", "ifname": "eth0", "ip": "10.1.0.9", "labels": {}})
    agent.api.registry.add(
        {
            "containerID": "c2",
            "ifname": "eth0",
            "ip": "10.1.0.7",
            "hostInterface": "cm_0123456789a",
            "labels": {"app": "x-wing", "class": "fighter"},
        }
    )
    status, out, err = ctl("--socket", agent.socket_path, "endpoints")
    assert status == 0 and err == ""
    assert out.splitlines() == [
        "CONTAINER     IFNAME  IP        HOST-IF         IDENTITY  LABELS",
        "c2            eth0    10.1.0.7  cm_0123456789a            app=x-wing,class=fighter",
        "0123456789ab  eth0    10.1.0.9",
    ]
    status, out, _err = ctl("--socket", agent.socket_path, "endpoints", "--json")
    assert status == 0
    assert [e["ip"] for e in json.loads(out)] == ["10.1.0.7", "10.1.0.9"]


def test_status_and_empty_lists(agent):
    status, out, _err = ctl("--socket", agent.socket_path, "status")
    assert status == 0
    lines = out.splitlines()
    assert "cluster: cluster1" in lines and "endpoints: 0" in lines and "node: c1-n1" in lines
    for command in ("clusters", "services", "identities"):
        assert ctl("--socket", agent.socket_path, command) == (0, "no %s\n" % command, "")


def test_clusters_and_services_tables(agent, monkeypatch):
    now = 1_000_000.0
    agent.api.route(
        "GET",
        "/v1/clusters",
        lambda _r: {
            "clusters": [
                {"name": "cluster2", "id": 2, "connected": True, "synced": True, "last_sync": now - 3, "failures": 0},
                {"name": "cluster3", "id": 3, "connected": False, "last_sync": None, "last_error": "refused"},
            ]
        },
    )
    agent.api.route(
        "GET",
        "/v1/services",
        lambda _r: {
            "services": [
                {
                    "namespace": "default",
                    "name": "rebel-base",
                    "frontend": "10.96.0.10:80/TCP",
                    "shared": True,
                    "affinity": "local",
                    "backends": [
                        {"ip": "10.1.0.7", "port": 80, "cluster": "cluster1"},
                        {"ip": "10.2.0.7", "port": 80, "cluster": "cluster2", "healthy": False},
                    ],
                }
            ]
        },
    )
    monkeypatch.setattr(meshctl, "_clock", lambda: now)
    status, out, _err = ctl("--socket", agent.socket_path, "clusters")
    assert status == 0
    lines = out.splitlines()
    assert lines[0].split() == [
        "NAME",
        "ID",
        "CONNECTED",
        "SYNCED",
        "LAST-SYNC",
        "FAILURES",
        "NODES",
        "ENDPOINTS",
        "SERVICES",
        "ERROR",
    ]
    assert lines[1].split() == ["cluster2", "2", "yes", "yes", "3.0s", "ago", "0"]
    assert lines[2].split() == ["cluster3", "3", "no", "never", "refused"]
    assert lines[2].index("refused") == lines[0].index("ERROR")  # columns line up
    status, out, _err = ctl("--socket", agent.socket_path, "services")
    assert status == 0
    assert out.splitlines()[1].split() == [
        "default",
        "rebel-base",
        "10.96.0.10:80/TCP",
        "yes",
        "local",
        "10.1.0.7:80@cluster1",
        "10.2.0.7:80@cluster2(unhealthy)",
    ]


def test_policy_and_drops(agent):
    seen = []

    def policy(request):
        seen.append(request.params["name"])
        return {
            "policy": {
                "ip": "10.1.0.7",
                "identity": 65537,
                "hostInterface": "cm_0123456789a",
                "labels": {"name": "x-wing"},
                "enforced": {"ingress": False, "egress": True},
                "policies": ["default/CiliumNetworkPolicy/allow-cross-cluster"],
                "entries_by_peer": [
                    {"direction": "egress", "identity": 131073, "peer": "name=rebel-base", "port": 0, "protocol": "ANY"}
                ],
            }
        }

    agent.api.route("GET", "/v1/policy/{name}", policy)
    agent.api.route(
        "GET",
        "/v1/drops",
        lambda _r: {
            "drops": [
                {
                    "endpoint": "10.1.0.7",
                    "pod": "xw-c1",
                    "ifindex": 9,
                    "direction": "egress",
                    "peer": "name=rebel-base",
                    "identity": 65538,
                    "port": 80,
                    "proto": 6,
                    "reason": "policy",
                    "packets": 3,
                    "bytes": 180,
                }
            ]
        },
    )
    status, out, err = ctl("--socket", agent.socket_path, "policy", "10.1.0.7")
    assert (status, err, seen) == (0, "", ["10.1.0.7"])
    lines = out.splitlines()
    assert lines[:5] == [
        "endpoint: 10.1.0.7 (identity 65537, cm_0123456789a)",
        "labels: name=x-wing",
        "ingress: not enforced (allow all)",
        "egress: enforced (default deny)",
        "policies: default/CiliumNetworkPolicy/allow-cross-cluster",
    ]
    assert lines[6].split() == ["egress", "name=rebel-base", "131073", "any", "ANY"]
    status, out, _err = ctl("--socket", agent.socket_path, "drops")
    assert status == 0
    assert out.splitlines()[1].split() == [
        "10.1.0.7",
        "xw-c1",
        "egress",
        "name=rebel-base",
        "80",
        "TCP",
        "policy",
        "3",
        "180",
    ]
    assert ctl("--socket", agent.socket_path, "policy")[0] == 2  # needs an endpoint
    assert ctl("--socket", agent.socket_path, "drops", "10.1.0.7")[0] == 2


def test_unreachable_agent_is_exit_1_naming_the_socket():
    status, out, err = ctl("--socket", "/tmp/cm-no-such-dir/meshd.sock", "status")
    assert status == 1 and out == ""
    assert err == (
        "meshctl: the agent is not reachable on /tmp/cm-no-such-dir/meshd.sock: no such socket (is meshd running?)\n"
    )


def test_agent_error_is_exit_3(agent):
    def broken(_request):
        raise RuntimeError("kvstore gone")

    agent.api.route("GET", "/v1/identities", broken)
    status, _out, err = ctl("--socket", agent.socket_path, "identities")
    assert status == 3 and "agent answered 500" in err and "kvstore gone" in err


def test_usage_errors_are_exit_2(capsys):
    assert meshctl.main(["frobnicate"]) == 2
    assert "invalid choice: 'frobnicate'" in capsys.readouterr().err


def test_meshctl_runs_from_the_node_bundle(agent, tmp_path, monkeypatch):
    # the entry point the node bundle will get (ENTRY_POINTS["meshctl"]): the zipapp's relative imports work
    from ansible_collections.clustermesh.core.plugins.action import node_bundle

    monkeypatch.setitem(node_bundle.ENTRY_POINTS, "meshctl", ("meshctl", "main"))
    bundle = tmp_path / "meshctl"
    bundle.write_bytes(node_bundle.build_bundle("meshctl", sys.executable))
    bundle.chmod(0o755)
    agent.api.registry.add({"containerID": "c1", "ifname": "eth0", "ip": "10.1.0.5", "labels": {"app": "web"}})
    proc = subprocess.run(
        [str(bundle), "--socket", agent.socket_path, "endpoints"], capture_output=True, text=True, check=False
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines()[1].split() == ["c1", "eth0", "10.1.0.5", "app=web"]
    proc = subprocess.run(
        [str(bundle), "--socket", "/tmp/cm-no-such-dir/none.sock", "status"],
        capture_output=True,
        text=True,
        check=False,
    )
    assert proc.returncode == 1 and "none.sock: no such socket" in proc.stderr
