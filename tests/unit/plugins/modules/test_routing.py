"""The routing module: options reach the library as documented; errors and warnings reach the user."""

from __future__ import annotations

import json

import pytest
from ansible.module_utils.testing import patch_module_args

from ansible_collections.clustermesh.core.plugins.module_utils import routing_state
from ansible_collections.clustermesh.core.plugins.module_utils.routing_plan import RoutingPlanError
from ansible_collections.clustermesh.core.plugins.modules import routing

NODE = {"name": "c1-n1", "ip": "198.18.1.11", "pod_cidrs": ["10.1.0.0/24"]}
PEER = {"name": "c2-n2", "cluster": "cluster2", "ip": "198.18.2.11", "pod_cidrs": ["10.2.1.0/24"]}


def run(args, capsys, monkeypatch, outcome=None):
    calls = []

    def fake(node, peers, mode, **kw):
        calls.append(dict(node=node, peers=peers, mode=mode, **kw))
        if isinstance(outcome, Exception):
            raise outcome
        return {
            "changed": True,
            "changes": ["add route 10.2.1.0/24 via 10.2.1.1 dev cm_vxlan onlink proto 203"],
            "plan": {"mode": mode},
            "peer_modes": {"c2-n2": "tunnel"},
            "underlay": {"ifname": "eth0", "index": 2, "prefixlen": 24, "mtu": 1500},
            "pod_mtu": 1450,
            "masquerade": {"enabled": True, "changes": [], "table": ""},
            "before": "net.ipv4.ip_forward = 1\n",
            "after": "net.ipv4.ip_forward = 1\nroute 10.2.1.0/24 via 10.2.1.1 dev cm_vxlan onlink proto 203\n",
            "warnings": ["peer x: pod CIDR fd00::/64 skipped"],
        }

    monkeypatch.setattr(routing_state, "reconcile", fake)
    with patch_module_args(args), pytest.raises(SystemExit) as exc:
        routing.main()
    return exc.value.code, json.loads(capsys.readouterr().out), calls


def test_defaults_check_and_diff_reach_the_library(capsys, monkeypatch):
    args = {"node": NODE, "peers": [PEER], "mode": "hybrid", "_ansible_check_mode": True, "_ansible_diff": True}
    code, result, calls = run(args, capsys, monkeypatch)
    assert code == 0
    assert calls == [
        dict(
            node=NODE,
            peers=[PEER],
            mode="hybrid",
            external_router=False,
            masquerade=True,
            mesh_pod_cidrs=[],
            check=True,
            state="present",
            underlay_interface=None,
        )
    ]
    assert result["changed"] and result["changes"] == [
        "add route 10.2.1.0/24 via 10.2.1.1 dev cm_vxlan onlink proto 203"
    ]
    assert result["pod_mtu"] == 1450 and result["peer_modes"] == {"c2-n2": "tunnel"}
    assert result["diff"]["after"].endswith("onlink proto 203\n") and result["diff"]["before"]
    assert "fd00::/64 skipped" in json.dumps(result["warnings"])
    assert "before" not in result


def test_mode_defaults_to_tunnel_and_absent_needs_no_peers(capsys, monkeypatch):
    code, unused, calls = run({"node": NODE, "state": "absent"}, capsys, monkeypatch)
    assert code == 0 and calls[0]["mode"] == "tunnel" and calls[0]["peers"] == [] and calls[0]["state"] == "absent"


def test_plan_error_says_nothing_was_changed(capsys, monkeypatch):
    error = RoutingPlanError(["peer c2-n2 (198.18.2.11): not on this node's segment 198.18.1.0/24"])
    code, result, unused = run({"node": NODE, "peers": [PEER], "mode": "direct"}, capsys, monkeypatch, error)
    assert code == 1 and result["failed"]
    assert result["msg"] == (
        "routing: peer c2-n2 (198.18.2.11): not on this node's segment 198.18.1.0/24 (nothing was changed)"
    )


def test_node_state_error_is_reported(capsys, monkeypatch):
    error = routing_state.RoutingStateError("node ip 198.18.1.11: no interface of this node holds it")
    code, result, unused = run({"node": NODE}, capsys, monkeypatch, error)
    assert code == 1 and result["msg"].startswith("routing: node ip 198.18.1.11: no interface")


def test_bad_state_and_missing_node_fields_are_refused_by_the_argument_spec(capsys, monkeypatch):
    code, result, calls = run({"node": NODE, "state": "gone"}, capsys, monkeypatch)
    assert code == 1 and "state" in result["msg"] and calls == []
    code, result, calls = run({"node": {"name": "c1-n1", "ip": "198.18.1.11"}}, capsys, monkeypatch)
    assert code == 1 and "pod_cidrs" in result["msg"] and calls == []
