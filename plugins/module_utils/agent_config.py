# -*- coding: utf-8 -*-
# Copyright: clustermesh.core contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""The node agent's configuration file (``/etc/clustermesh/agent.yaml``), validated as a whole.

A flat YAML mapping written by role ``agent``; every key is checked before the agent starts
(``meshd --config FILE --check`` runs :func:`load_agent_config` alone), and an error names the
key, the value and what is allowed.  Defaults fill what is not given, so a hand-written file
needs only the node's identity: cluster name and ID, node name, node IP and pod CIDR.
"""

from __future__ import annotations

import ipaddress
import os
from dataclasses import dataclass, fields
from typing import Any

from .kvstore_layout import KeyLayoutError, validate_cluster_name, validate_node_name
from .mesh_model import DEFAULT_MAX_CONNECTED_CLUSTERS, cluster_id_error

DEFAULT_CONFIG_PATH = "/etc/clustermesh/agent.yaml"
ROUTING_MODES = ("tunnel", "direct", "hybrid")
LOG_LEVELS = ("debug", "info", "warning", "error")


class AgentConfigError(ValueError):
    """The configuration file is unreadable or a value in it is wrong (the message says which)."""


@dataclass(frozen=True)
class AgentConfig:
    cluster_name: str
    cluster_id: int
    node_name: str
    node_ip: str
    pod_cidr: str
    routing_mode: str = "tunnel"
    kvstore_config: str = "/etc/clustermesh/kvstore.yaml"
    clusters_dir: str = "/etc/clustermesh/clusters.d"
    max_connected_clusters: int = DEFAULT_MAX_CONNECTED_CLUSTERS
    api_socket: str = "/run/clustermesh/meshd.sock"
    metrics_address: str = "127.0.0.1"
    metrics_port: int = 9966  # 0: no metrics endpoint
    bpf_object: str = "/var/lib/clustermesh/bpf/lb.o"
    bpf_pin_dir: str = ""  # "": /sys/fs/bpf/clustermesh/<node_name>
    ipam_dir: str = "/var/lib/cni/networks"
    ipam_network: str = "clustermesh"
    lease_ttl: int = 15
    heartbeat_interval: float = 10.0
    clusters_poll_interval: float = 1.0
    initial_sync_timeout: float = 10.0
    log_level: str = "info"

    @property
    def pin_dir(self) -> str:
        return self.bpf_pin_dir or os.path.join("/sys/fs/bpf/clustermesh", self.node_name)


REQUIRED = ("cluster_name", "cluster_id", "node_name", "node_ip", "pod_cidr")
_KNOWN = {f.name for f in fields(AgentConfig)}
_PATHS = ("kvstore_config", "clusters_dir", "api_socket", "bpf_object", "ipam_dir")


def _fail(key: str, value: Any, rule: str) -> AgentConfigError:
    return AgentConfigError(f"{key}: {value!r} {rule}")


def _int(data: dict, key: str, low: int, high: int) -> int:
    value = data[key]
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise _fail(key, value, f"must be an integer from {low} to {high}")
    return value


def _number(data: dict, key: str, low: float, high: float) -> float:
    value = data[key]
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not low <= value <= high:
        raise _fail(key, value, f"must be a number from {low} to {high}")
    return float(value)


def validate_agent_config(data: Any, source: str = "agent config") -> AgentConfig:
    """An :class:`AgentConfig` from a parsed mapping; :class:`AgentConfigError` names what is wrong."""
    if not isinstance(data, dict):
        raise AgentConfigError(f"{source}: must be a YAML mapping of settings, got {type(data).__name__}")
    unknown = sorted(set(map(str, data)) - _KNOWN)
    if unknown:
        raise AgentConfigError(f"{source}: unknown setting(s) {', '.join(unknown)}; known: {', '.join(sorted(_KNOWN))}")
    missing = [key for key in REQUIRED if data.get(key) in (None, "")]
    if missing:
        raise AgentConfigError(f"{source}: missing required setting(s) {', '.join(missing)}")
    values = {f.name: f.default for f in fields(AgentConfig) if f.name not in REQUIRED}
    values.update(data)
    try:
        validate_cluster_name(values["cluster_name"], "cluster_name")
        validate_node_name(values["node_name"])
    except KeyLayoutError as exc:
        raise AgentConfigError(f"{source}: {exc}") from None
    max_connected = values["max_connected_clusters"]
    if max_connected not in (255, 511):
        raise _fail("max_connected_clusters", max_connected, "must be 255 or 511 (Cilium's two identity layouts)")
    reason = cluster_id_error(values["cluster_id"], max_connected)
    if reason:
        raise _fail("cluster_id", values["cluster_id"], reason)
    try:
        node_ip = ipaddress.IPv4Address(str(values["node_ip"]))
    except ValueError:
        raise _fail("node_ip", values["node_ip"], "is not an IPv4 address") from None
    try:
        pod_cidr = ipaddress.IPv4Network(str(values["pod_cidr"]), strict=True)
    except ValueError as exc:
        raise _fail("pod_cidr", values["pod_cidr"], f"is not an IPv4 network ({exc})") from None
    if values["routing_mode"] not in ROUTING_MODES:
        raise _fail("routing_mode", values["routing_mode"], f"must be one of {', '.join(ROUTING_MODES)}")
    if values["log_level"] not in LOG_LEVELS:
        raise _fail("log_level", values["log_level"], f"must be one of {', '.join(LOG_LEVELS)}")
    for key in _PATHS + ("bpf_pin_dir",):
        value = values[key]
        if not isinstance(value, str) or (value and not value.startswith("/")):
            raise _fail(key, value, "must be an absolute path")
    for key in _PATHS:
        if not values[key]:
            raise _fail(key, values[key], "must be an absolute path")
    pin_dir = values["bpf_pin_dir"]
    if pin_dir and not pin_dir.startswith("/sys/fs/bpf/"):
        raise _fail("bpf_pin_dir", pin_dir, "must lie under /sys/fs/bpf/ (the BPF filesystem)")
    try:
        ipaddress.ip_address(str(values["metrics_address"]))
    except ValueError:
        raise _fail("metrics_address", values["metrics_address"], "is not an IP address") from None
    if not isinstance(values["ipam_network"], str) or not values["ipam_network"]:
        raise _fail("ipam_network", values["ipam_network"], "must be the CNI network name")
    return AgentConfig(
        cluster_name=values["cluster_name"],
        cluster_id=values["cluster_id"],
        node_name=values["node_name"],
        node_ip=str(node_ip),
        pod_cidr=str(pod_cidr),
        routing_mode=values["routing_mode"],
        kvstore_config=values["kvstore_config"],
        clusters_dir=values["clusters_dir"],
        max_connected_clusters=max_connected,
        api_socket=values["api_socket"],
        metrics_address=str(values["metrics_address"]),
        metrics_port=_int(values, "metrics_port", 0, 65535),
        bpf_object=values["bpf_object"],
        bpf_pin_dir=pin_dir,
        ipam_dir=values["ipam_dir"],
        ipam_network=values["ipam_network"],
        lease_ttl=_int(values, "lease_ttl", 5, 3600),
        heartbeat_interval=_number(values, "heartbeat_interval", 0.5, 600),
        clusters_poll_interval=_number(values, "clusters_poll_interval", 0.1, 60),
        initial_sync_timeout=_number(values, "initial_sync_timeout", 0, 600),
        log_level=values["log_level"],
    )


def load_agent_config(path: str = DEFAULT_CONFIG_PATH) -> AgentConfig:
    """Read and validate the file; :class:`AgentConfigError` names the file and the problem."""
    import yaml

    try:
        with open(path, encoding="utf-8") as handle:
            data = yaml.safe_load(handle)
    except OSError as exc:
        raise AgentConfigError(f"{path}: cannot read the agent configuration: {exc.strerror}") from None
    except yaml.YAMLError as exc:
        raise AgentConfigError(f"{path}: not valid YAML: {exc}") from None
    try:
        return validate_agent_config(data, path)
    except AgentConfigError as exc:
        message = str(exc)
        raise AgentConfigError(message if message.startswith(path) else f"{path}: {message}") from None
