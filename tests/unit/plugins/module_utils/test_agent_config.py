# -*- coding: utf-8 -*-
# Copyright: clustermesh.core contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""The agent's configuration file: defaults, and a clear error for each wrong value."""

from __future__ import annotations

import pytest

from ansible_collections.clustermesh.core.plugins.module_utils.agent_config import (
    AgentConfigError,
    load_agent_config,
    validate_agent_config,
)

MINIMAL = {
    "cluster_name": "cluster1",
    "cluster_id": 1,
    "node_name": "c1-n1",
    "node_ip": "198.18.1.11",
    "pod_cidr": "10.1.0.0/24",
}


def test_minimal_file_gets_defaults(tmp_path):
    path = tmp_path / "agent.yaml"
    path.write_text("".join(f"{k}: {v}\n" for k, v in MINIMAL.items()))
    config = load_agent_config(str(path))
    assert config.cluster_id == 1 and config.node_ip == "198.18.1.11"
    assert config.routing_mode == "tunnel"
    assert config.kvstore_config == "/etc/clustermesh/kvstore.yaml"
    assert config.pin_dir == "/sys/fs/bpf/clustermesh/c1-n1"
    assert config.api_socket == "/run/clustermesh/meshd.sock"


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"cluster_id": 0}, "cluster_id: 0"),
        ({"cluster_id": 300}, "cluster_id: 300"),
        ({"cluster_name": "Cluster_1"}, "cluster_name"),
        ({"node_ip": "198.18.1.300"}, "node_ip: '198.18.1.300' is not an IPv4 address"),
        ({"pod_cidr": "10.1.0.1/24"}, "pod_cidr: '10.1.0.1/24' is not an IPv4 network"),
        ({"routing_mode": "vxlan"}, "routing_mode: 'vxlan' must be one of tunnel, direct, hybrid"),
        ({"bpf_pin_dir": "/tmp/maps"}, "bpf_pin_dir: '/tmp/maps' must lie under /sys/fs/bpf/"),
        ({"api_socket": "meshd.sock"}, "api_socket: 'meshd.sock' must be an absolute path"),
        ({"metrics_port": 70000}, "metrics_port: 70000 must be an integer from 0 to 65535"),
        ({"lease_ttl": True}, "lease_ttl: True must be an integer"),
        ({"max_connected_clusters": 100}, "max_connected_clusters: 100 must be 255 or 511"),
        ({"log_level": "loud"}, "log_level: 'loud' must be one of"),
        ({"colour": "blue"}, "unknown setting(s) colour"),
    ],
)
def test_each_wrong_value_is_named(change, message):
    with pytest.raises(AgentConfigError) as err:
        validate_agent_config(dict(MINIMAL, **change))
    assert message in str(err.value)


def test_missing_required_settings_are_listed():
    with pytest.raises(AgentConfigError, match="missing required setting\\(s\\) node_ip, pod_cidr"):
        validate_agent_config({k: v for k, v in MINIMAL.items() if k not in ("node_ip", "pod_cidr")})


def test_file_errors_name_the_file(tmp_path):
    with pytest.raises(AgentConfigError, match="cannot read the agent configuration"):
        load_agent_config(str(tmp_path / "missing.yaml"))
    bad = tmp_path / "bad.yaml"
    bad.write_text("cluster_name: [unclosed\n")
    with pytest.raises(AgentConfigError, match=f"{bad}: not valid YAML"):
        load_agent_config(str(bad))
    listed = tmp_path / "list.yaml"
    listed.write_text("- a\n")
    with pytest.raises(AgentConfigError, match=f"{listed}: must be a YAML mapping"):
        load_agent_config(str(listed))
