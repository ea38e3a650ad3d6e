# -*- coding: utf-8 -*-
# Copyright: clustermesh.core contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""agent_status against a real agent API (agent_api.AgentServer on a temporary unix socket) with a fake status:
what it returns, waiting for the sync, and the failures a user sees (no agent, a sync that never ends)."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import threading

import pytest
from ansible.module_utils.testing import patch_module_args

from ansible_collections.clustermesh.core.plugins.module_utils.agent_api import (
    AgentServer,
    EndpointRegistry,
    default_api,
)
from ansible_collections.clustermesh.core.plugins.modules import agent_status

EP = {"containerID": "abc123", "ifname": "eth0", "ip": "10.1.0.7", "labels": {"app": "rebel-base"}}
CLUSTERS = [
    {"name": "cluster2", "id": 2, "connected": True, "synced": True},
    {"name": "cluster3", "id": 3, "connected": False, "synced": False, "last_error": "connection refused"},
]
SERVICES = [{"namespace": "default", "name": "rebel-base", "frontend": "172.30.1.10:80/TCP", "backends": []}]


class FakeAgent:
    """An AgentServer whose status the test changes while it runs."""

    def __init__(self, socket_path):
        self.state = {
            "synced": False,
            "cluster": "cluster1",
            "node": "c1-n1",
            "services": 1,
            "clusters": {
                "cluster2": {"connected": True, "synced": True},
                "cluster3": {"connected": False, "synced": False, "last_error": "connection refused"},
            },
        }
        api = default_api(EndpointRegistry("10.1.0.0/24"), status=lambda: dict(self.state))
        api.route("GET", "/v1/clusters", lambda _r: {"clusters": CLUSTERS})
        api.route("GET", "/v1/services", lambda _r: {"services": SERVICES})
        api.registry.add(EP)
        self.api = api
        self.server = AgentServer(socket_path, api)


@pytest.fixture
def sock_dir():
    # unix socket paths are limited to 107 bytes: pytest's tmp_path can be longer
    path = tempfile.mkdtemp(prefix="cmst-", dir="/tmp")
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def agent(sock_dir):
    fake = FakeAgent(os.path.join(sock_dir, "meshd.sock"))
    fake.server.start()
    yield fake
    fake.server.close()


def params(socket_path, **changes):
    return {"socket": socket_path, "wait_synced": False, "timeout": 5.0, **changes}


def run_main(args, capsys, check_mode=False):
    if check_mode:
        args = dict(args, _ansible_check_mode=True)
    with patch_module_args(args), pytest.raises(SystemExit) as exc:
        agent_status.main()
    return exc.value.code, json.loads(capsys.readouterr().out)


def test_returns_status_and_lists_and_never_changes(agent, capsys):
    code, result = run_main({"socket": agent.server.socket_path}, capsys)
    assert code == 0, result
    assert result["changed"] is False
    assert result["agent"]["cluster"] == "cluster1" and result["agent"]["node"] == "c1-n1"
    assert result["agent"]["endpoints"] == 1  # counted by the agent's endpoint registry
    assert result["synced"] is False
    assert result["clusters"] == CLUSTERS
    assert result["services"] == SERVICES
    assert [e["ip"] for e in result["endpoints"]] == ["10.1.0.7"]
    assert result["waited"] == 0.0


def test_check_mode_reads_the_same(agent, capsys):
    code, result = run_main({"socket": agent.server.socket_path}, capsys, check_mode=True)
    assert code == 0 and result["changed"] is False
    assert result["clusters"] == CLUSTERS and len(result["endpoints"]) == 1


def test_waits_until_the_agent_is_synced(agent):
    def sync_later():
        agent.state["clusters"]["cluster3"] = {"connected": True, "synced": True}
        agent.state["synced"] = True

    timer = threading.Timer(0.5, sync_later)
    timer.start()
    try:
        result = agent_status.run(params(agent.server.socket_path, wait_synced=True, timeout=10))
    finally:
        timer.cancel()
    assert result["synced"] is True and result["agent"]["synced"] is True
    assert 0.4 <= result["waited"] < 10


def test_a_sync_that_never_ends_names_the_clusters_not_synced(agent, capsys):
    code, result = run_main({"socket": agent.server.socket_path, "wait_synced": True, "timeout": 0.6}, capsys)
    assert code == 1 and result["failed"] is True
    msg = result["msg"]
    assert "not synced after 0.6s" in msg
    assert "cluster cluster3 (not connected): connection refused" in msg
    assert "cluster2" not in msg  # synced: not a cause
    assert result["agent"]["synced"] is False and result["waited"] >= 0.6  # what the agent said, for debugging


def test_not_synced_names_the_local_part_when_every_remote_cluster_is_synced():
    status = {"synced": False, "clusters": {"cluster2": {"connected": True, "synced": True}}}
    assert not_synced_text(status) == "the local kvstore or the BPF maps (every remote cluster is synced)"
    status["kvstore"] = {"connected": True, "listed": True, "last_error": None}
    assert not_synced_text(status) == "the local kvstore or the BPF maps (every remote cluster is synced)"
    status["kvstore"] = {"connected": False, "listed": False, "last_error": "etcd: connection refused"}
    assert not_synced_text(status) == "the local kvstore (not connected): etcd: connection refused"
    status["kvstore"] = {"connected": True, "listed": False}
    status["clusters"]["cluster3"] = {"connected": True, "synced": False}
    status["health"] = {"synced": False}
    assert not_synced_text(status) == (
        "the local kvstore (connected, not listed yet); cluster cluster3 (connected, not synced); health (not synced)"
    )


def not_synced_text(status):
    return "; ".join(agent_status.not_synced(status))


def test_no_agent_fails_at_once_naming_the_socket(sock_dir, capsys):
    missing = os.path.join(sock_dir, "meshd.sock")
    code, result = run_main({"socket": missing}, capsys)
    assert code == 1
    assert missing in result["msg"] and "no such socket" in result["msg"]
    assert "is the agent meshd running" in result["msg"]
    assert result["changed"] is False and "agent" not in result


def test_waiting_retries_a_socket_that_appears(sock_dir):
    """An agent that is just starting has no socket yet: waiting covers that."""
    fake = FakeAgent(os.path.join(sock_dir, "meshd.sock"))
    fake.state["synced"] = True
    timer = threading.Timer(0.4, fake.server.start)
    timer.start()
    try:
        result = agent_status.run(params(fake.server.socket_path, wait_synced=True, timeout=10))
    finally:
        timer.join()
        fake.server.close()
    assert result["synced"] is True and result["waited"] >= 0.3


def test_waiting_for_an_agent_that_never_comes(sock_dir):
    missing = os.path.join(sock_dir, "meshd.sock")
    with pytest.raises(agent_status.AgentStatusError) as exc:
        agent_status.run(params(missing, wait_synced=True, timeout=0.5))
    assert "did not answer within 0.5s" in exc.value.msg and missing in exc.value.msg
    assert "meshd.log" in exc.value.msg


def test_an_agent_error_is_reported(agent):
    def broken(_request):
        raise RuntimeError("maps not open")

    agent.api.route("GET", "/v1/status", broken)
    with pytest.raises(agent_status.AgentStatusError) as exc:
        agent_status.run(params(agent.server.socket_path))
    assert "refused GET /v1/status" in exc.value.msg and "maps not open" in exc.value.msg


def test_timeout_must_be_positive(agent, capsys):
    code, result = run_main({"socket": agent.server.socket_path, "timeout": 0}, capsys)
    assert code == 1 and "timeout: must be a positive number" in result["msg"]
