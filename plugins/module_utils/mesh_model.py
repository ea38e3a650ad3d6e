# -*- coding: utf-8 -*-
# Copyright: clustermesh.core contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""The mesh model: which clusters form the mesh, their nodes and addresses, and the rules they obey.

``validate_mesh(clusters)`` checks a whole mesh description at once and either returns a normalised
:class:`Mesh` or raises :class:`MeshValidationError` carrying *every* problem found, each naming the
field path, the offending value and why it is wrong.  ``validate_inventory(hostvars, groups)`` does the
same starting from Ansible inventory variables (see docs/inventory.md).

The small validators (``validate_cluster_name``, ``cluster_id_valid``, ``cluster_identity_range`` ...)
follow Cilium's rules (pkg/clustermesh/types/types.go, pkg/identity/numericidentity.go) and are meant
to be reused on data read from remote clusters.

No Ansible imports here: the node agent uses this file too.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from .routing_plan import MODES as ROUTING_MODES

try:
    from netaddr import AddrFormatError, IPAddress, IPNetwork
except ImportError as exc:  # modules report it with missing_required_lib
    AddrFormatError = IPAddress = IPNetwork = None
    IMPORT_ERROR = exc
else:
    IMPORT_ERROR = None

__all__ = [
    "CLUSTER_NAME_MAX_LENGTH",
    "CLUSTER_NAME_PATTERN",
    "DEFAULT_MAX_CONNECTED_CLUSTERS",
    "IDENTITY_BITS",
    "INVENTORY_NODE_VARS",
    "INVENTORY_VARS",
    "MAX_CONNECTED_CLUSTERS_CHOICES",
    "NODE_POD_CIDR_PREFIX",
    "Cluster",
    "Mesh",
    "MeshValidationError",
    "Node",
    "Problem",
    "cluster_id_error",
    "cluster_id_of_identity",
    "cluster_id_shift",
    "cluster_id_valid",
    "cluster_identity_range",
    "cluster_name_error",
    "clusters_from_inventory",
    "identity_in_cluster_range",
    "max_connected_clusters_error",
    "validate_cluster_name",
    "validate_inventory",
    "validate_mesh",
]

# --- Cilium's rules -------------------------------------------------------------------------------

CLUSTER_NAME_PATTERN = r"^([a-z0-9][-a-z0-9]*)?[a-z0-9]$"
CLUSTER_NAME_MAX_LENGTH = 32
_CLUSTER_NAME_RE = re.compile(CLUSTER_NAME_PATTERN)
#: Cilium's default cluster name: only allowed with cluster ID 0 (unset), so never in a mesh.
DEFAULT_CLUSTER_NAME = "default"
MAX_CONNECTED_CLUSTERS_CHOICES = (255, 511)
DEFAULT_MAX_CONNECTED_CLUSTERS = 255
#: Pod routing mode of the whole mesh (see routing_plan): both ends of every node pair must agree.
DEFAULT_ROUTING_MODE = "tunnel"
#: A (non node-local) security identity has 24 bits; the top 8 (255) or 9 (511) hold the cluster ID.
IDENTITY_BITS = 24

#: Size of the pod CIDR each node gets from its cluster's pod CIDR, per IP version
#: (Cilium's cluster-pool defaults: /24 for IPv4, /112 for IPv6).
NODE_POD_CIDR_PREFIX = {4: 24, 6: 112}

# Node names end up in kvstore keys (cilium/state/nodes/v1/<cluster>/<node>) and certificate names.
NODE_NAME_PATTERN = r"^[A-Za-z0-9]([-A-Za-z0-9_.]*[A-Za-z0-9])?$"
NODE_NAME_MAX_LENGTH = 253
_NODE_NAME_RE = re.compile(NODE_NAME_PATTERN)


def cluster_name_error(name: Any, cluster_id: int | None = None) -> str | None:
    """Why ``name`` is not a valid Cilium cluster name (``None`` when it is).

    With ``cluster_id`` given, also apply Cilium's rule that ``default`` is only allowed with ID 0.
    The text is a predicate for ``<value> <text>``, e.g. ``'X' is not a valid cluster name: ...``.
    """
    if not isinstance(name, str):
        return f"is not a valid cluster name: must be a string, not {_type_name(name)}"
    if name == "":
        return "is not a valid cluster name: must not be empty"
    if len(name) > CLUSTER_NAME_MAX_LENGTH:
        return (
            f"is not a valid cluster name: it has {len(name)} characters, at most {CLUSTER_NAME_MAX_LENGTH} are allowed"
        )
    if not _CLUSTER_NAME_RE.match(name):
        return (
            f"is not a valid cluster name: must match {CLUSTER_NAME_PATTERN} "
            f"(lowercase letters, digits and '-', starting and ending with a letter or digit, "
            f"at most {CLUSTER_NAME_MAX_LENGTH} characters)"
        )
    if name == DEFAULT_CLUSTER_NAME and cluster_id not in (None, 0):
        return (
            f"is reserved: Cilium allows the cluster name {DEFAULT_CLUSTER_NAME!r} only with cluster ID 0 "
            f"(unset), but this cluster has ID {cluster_id}; choose another name"
        )
    return None


def validate_cluster_name(name: Any, cluster_id: int | None = None) -> str:
    """Return ``name`` if it is a valid cluster name, else raise ``ValueError`` saying why."""
    reason = cluster_name_error(name, cluster_id)
    if reason:
        raise ValueError(f"{_show(name)} {reason}")
    return name


def max_connected_clusters_error(value: Any) -> str | None:
    """Why ``value`` is not a valid max-connected-clusters setting (``None`` when it is)."""
    if _is_int(value) and value in MAX_CONNECTED_CLUSTERS_CHOICES:
        return None
    return "is not a valid max_connected_clusters: must be 255 or 511 (Cilium's only two settings)"


def cluster_id_error(cluster_id: Any, max_connected: int = DEFAULT_MAX_CONNECTED_CLUSTERS) -> str | None:
    """Why ``cluster_id`` is not a valid ID for a meshed cluster (``None`` when it is)."""
    if max_connected_clusters_error(max_connected):
        raise ValueError(f"max_connected {max_connected!r} must be 255 or 511")
    if not _is_int(cluster_id):
        return f"is not a valid cluster ID: must be an integer from 1 to {max_connected}, not {_type_name(cluster_id)}"
    if cluster_id == 0:
        return (
            f"is not a valid cluster ID for a mesh: 0 means 'unset' in Cilium; "
            f"a meshed cluster needs an ID from 1 to {max_connected}"
        )
    if not 1 <= cluster_id <= max_connected:
        hint = (
            " (set max_connected_clusters to 511 for IDs up to 511)"
            if max_connected == 255 and cluster_id <= 511
            else ""
        )
        return (
            f"is not a valid cluster ID: must be from 1 to {max_connected} "
            f"with max_connected_clusters {max_connected}{hint}"
        )
    return None


def cluster_id_valid(cluster_id: Any, max_connected: int = DEFAULT_MAX_CONNECTED_CLUSTERS) -> bool:
    """True when ``cluster_id`` is a valid ID for a meshed cluster (1..max_connected)."""
    return cluster_id_error(cluster_id, max_connected) is None


def cluster_id_shift(max_connected: int = DEFAULT_MAX_CONNECTED_CLUSTERS) -> int:
    """Bit position of the cluster ID inside a security identity: 16 for 255 clusters, 15 for 511."""
    if max_connected_clusters_error(max_connected):
        raise ValueError(f"max_connected {max_connected!r} must be 255 or 511")
    return IDENTITY_BITS - max_connected.bit_length()


def cluster_identity_range(cluster_id: int, max_connected: int = DEFAULT_MAX_CONNECTED_CLUSTERS) -> tuple[int, int]:
    """The security identities cluster ``cluster_id`` allocates, as an inclusive ``(first, last)`` pair.

    ``[id << 16, ((id + 1) << 16) - 1]`` with 255 clusters, shift 15 with 511.
    """
    reason = cluster_id_error(cluster_id, max_connected)
    if reason:
        raise ValueError(f"{_show(cluster_id)} {reason}")
    shift = cluster_id_shift(max_connected)
    return cluster_id << shift, ((cluster_id + 1) << shift) - 1


def cluster_id_of_identity(identity: int, max_connected: int = DEFAULT_MAX_CONNECTED_CLUSTERS) -> int:
    """The cluster ID encoded in a (24-bit, non node-local) security identity."""
    if not _is_int(identity) or not 0 <= identity < (1 << IDENTITY_BITS):
        raise ValueError(f"{_show(identity)} is not a 24-bit security identity")
    return identity >> cluster_id_shift(max_connected)


def identity_in_cluster_range(
    identity: Any, cluster_id: int, max_connected: int = DEFAULT_MAX_CONNECTED_CLUSTERS
) -> bool:
    """True when ``identity`` lies in the identity range of cluster ``cluster_id``.

    Remote ipcache entries whose identity is outside their cluster's range must be rejected.
    """
    if not _is_int(identity):
        return False
    first, last = cluster_identity_range(cluster_id, max_connected)
    return first <= identity <= last


# --- problems -------------------------------------------------------------------------------------


class _Missing:
    def __repr__(self) -> str:
        return "<missing>"


MISSING: Any = _Missing()


@dataclass(frozen=True)
class Problem:
    """One thing wrong with the mesh: where (``path``), what (``value``) and why (``reason``)."""

    path: str
    value: Any
    reason: str

    @property
    def message(self) -> str:
        if self.value is MISSING:
            return f"{self.path} is missing: {self.reason}"
        return f"{self.path}: {_show(self.value)} {self.reason}"

    def __str__(self) -> str:
        return self.message

    def to_dict(self) -> dict[str, Any]:
        return {
            "path": self.path,
            "value": None if self.value is MISSING else _plain(self.value),
            "reason": self.reason,
            "message": self.message,
        }


class MeshValidationError(ValueError):
    """The mesh description is invalid; ``problems`` lists everything wrong with it."""

    def __init__(self, problems: Iterable[Problem]):
        self.problems: list[Problem] = list(problems)
        super().__init__(self._text())

    def _text(self) -> str:
        n = len(self.problems)
        lines = [f"{n} problem{'s' if n != 1 else ''} in the mesh definition:"]
        lines += [f"- {p}" for p in self.problems]
        return "\n".join(lines)

    def messages(self) -> list[str]:
        return [p.message for p in self.problems]


# --- the normalised mesh --------------------------------------------------------------------------


@dataclass(frozen=True)
class Node:
    name: str
    host: str
    ip: str
    cluster: str
    cluster_id: int
    ipv4_pod_cidr: str | None
    ipv6_pod_cidr: str | None

    @property
    def pod_cidrs(self) -> list[str]:
        return [c for c in (self.ipv4_pod_cidr, self.ipv6_pod_cidr) if c]

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "host": self.host,
            "ip": self.ip,
            "cluster": self.cluster,
            "cluster_id": self.cluster_id,
            "pod_cidrs": self.pod_cidrs,
            "ipv4_pod_cidr": self.ipv4_pod_cidr,
            "ipv6_pod_cidr": self.ipv6_pod_cidr,
        }


@dataclass(frozen=True)
class Cluster:
    name: str
    id: int
    max_connected_clusters: int
    ipv4_pod_cidr: str
    ipv6_pod_cidr: str | None
    nodes: tuple[Node, ...]
    connect_to: tuple[str, ...]
    connected_from: tuple[str, ...]
    kvstore_members: tuple[str, ...]
    kvstore_proxies: tuple[str, ...]

    @property
    def pod_cidrs(self) -> list[str]:
        return [c for c in (self.ipv4_pod_cidr, self.ipv6_pod_cidr) if c]

    @property
    def identity_range(self) -> tuple[int, int]:
        return cluster_identity_range(self.id, self.max_connected_clusters)

    def node(self, name: str) -> Node:
        for n in self.nodes:
            if n.name == name:
                return n
        raise KeyError(name)

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "id": self.id,
            "max_connected_clusters": self.max_connected_clusters,
            "pod_cidrs": self.pod_cidrs,
            "ipv4_pod_cidr": self.ipv4_pod_cidr,
            "ipv6_pod_cidr": self.ipv6_pod_cidr,
            "nodes": [n.to_dict() for n in self.nodes],
            "connect_to": list(self.connect_to),
            "connected_from": list(self.connected_from),
            "kvstore_members": list(self.kvstore_members),
            "kvstore_proxies": list(self.kvstore_proxies),
            "identity_range": list(self.identity_range),
        }


@dataclass(frozen=True)
class Mesh:
    clusters: tuple[Cluster, ...]
    max_connected_clusters: int
    warnings: tuple[str, ...] = field(default=())
    routing_mode: str = "tunnel"

    def cluster(self, name: str) -> Cluster:
        for c in self.clusters:
            if c.name == name:
                return c
        raise KeyError(name)

    def node(self, name: str) -> Node:
        for c in self.clusters:
            for n in c.nodes:
                if n.name == name:
                    return n
        raise KeyError(name)

    def to_dict(self) -> dict[str, Any]:
        return {
            "max_connected_clusters": self.max_connected_clusters,
            "routing_mode": self.routing_mode,
            "clusters": [c.to_dict() for c in self.clusters],
            "hosts": {n.host: n.to_dict() for c in self.clusters for n in c.nodes},
            "warnings": list(self.warnings),
        }


# --- helpers --------------------------------------------------------------------------------------


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _type_name(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, str):
        return "a string"
    if _is_int(value):
        return "an integer"
    if isinstance(value, float):
        return "a float"
    if isinstance(value, Mapping):
        return "a mapping"
    if isinstance(value, (list, tuple)):
        return "a list"
    return type(value).__name__


def _plain(value: Any) -> Any:
    """Plain Python data (str/int/list/dict) for display and return values."""
    if isinstance(value, bool) or value is None:
        return value
    if isinstance(value, str):
        return str(value)
    if isinstance(value, int):
        return int(value)
    if isinstance(value, float):
        return float(value)
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return str(value)


def _show(value: Any) -> str:
    return repr(_plain(value))


def _as_int(value: Any) -> int | None:
    """An integer, also from a decimal string (extra vars arrive as strings); ``None`` if not one."""
    if _is_int(value):
        return int(value)
    if isinstance(value, str) and re.fullmatch(r"[0-9]+", value.strip()):
        return int(value.strip())
    return None


def _as_list(value: Any) -> list | None:
    """A list; a lone string becomes a one-element list; ``None`` if not list-like."""
    if isinstance(value, str):
        return [value]
    if isinstance(value, (list, tuple)):
        return list(value)
    return None


def _parse_cidr(value: Any) -> tuple[IPNetwork | None, str | None]:
    if not isinstance(value, str):
        return None, f"is not a CIDR: must be a string like '10.1.0.0/16', not {_type_name(value)}"
    if "/" not in value:
        return None, "is not a CIDR: the prefix length is missing (write it like '10.1.0.0/16')"
    try:
        net = IPNetwork(value)
    except (AddrFormatError, ValueError, TypeError):
        return None, "is not a valid CIDR (expected an IPv4 or IPv6 network like '10.1.0.0/16' or 'fd00:1::/48')"
    if net.ip != net.network:
        return None, f"has host bits set: did you mean '{net.cidr}'?"
    return net, None


def _parse_ip(value: Any) -> tuple[IPAddress | None, str | None]:
    if not isinstance(value, str):
        return None, f"is not an IP address: must be a string like '198.18.1.11', not {_type_name(value)}"
    try:
        ip = IPAddress(value)
    except (AddrFormatError, ValueError, TypeError):
        return None, "is not a valid IPv4 or IPv6 address"
    if ip.is_loopback() or ip.is_multicast() or int(ip) == 0:
        return None, "is not a usable node address (loopback, multicast or unspecified)"
    return ip, None


def _family(version: int) -> str:
    return "IPv4" if version == 4 else "IPv6"


# --- path naming ----------------------------------------------------------------------------------


class _Paths:
    """Names the place a value came from: ``clusters[1].nodes[0].ip`` for the ``clusters`` input."""

    def cluster(self, ci: int, key: str) -> str:
        return f"clusters[{ci}].{key}" if key else f"clusters[{ci}]"

    def node(self, ci: int, ni: int, key: str) -> str:
        return f"clusters[{ci}].nodes[{ni}].{key}" if key else f"clusters[{ci}].nodes[{ni}]"


#: Inventory variable behind each field: cluster-level ones are group vars of the cluster's group.
INVENTORY_VARS = {
    "name": "clustermesh_cluster_name",
    "id": "clustermesh_cluster_id",
    "pod_cidrs": "clustermesh_pod_cidrs",
    "connect_to": "clustermesh_connect_to",
    "max_connected_clusters": "clustermesh_max_connected_clusters",
    "kvstore_members": "clustermesh_kvstore_members",
    "kvstore_proxies": "clustermesh_kvstore_proxies",
    "routing_mode": "clustermesh_routing_mode",
}
INVENTORY_NODE_VARS = {
    "ip": "clustermesh_node_ip",
    "pod_cidrs": "clustermesh_node_pod_cidrs",
}


class _InventoryPaths(_Paths):
    """Names inventory variables: ``hostvars['c1-n2'].clustermesh_node_ip``."""

    def __init__(self, mesh_group: str, cluster_names: list[str], cluster_hosts: list[list[str]]):
        self.mesh_group = mesh_group
        self.cluster_names = cluster_names
        self.cluster_hosts = cluster_hosts

    def cluster(self, ci: int, key: str) -> str:
        hosts = self.cluster_hosts[ci]
        if key and key != "nodes":
            return f"hostvars[{hosts[0]!r}].{INVENTORY_VARS.get(key, key)}"
        shown = ", ".join(hosts[:3]) + (", ..." if len(hosts) > 3 else "")
        return f"cluster {self.cluster_names[ci]!r} (hosts {shown})"

    def node(self, ci: int, ni: int, key: str) -> str:
        host = self.cluster_hosts[ci][ni]
        if key == "name":
            return f"hostvars[{host!r}].inventory_hostname"
        return f"hostvars[{host!r}].{INVENTORY_NODE_VARS.get(key, key)}" if key else f"hostvars[{host!r}]"


# --- validation -----------------------------------------------------------------------------------

_CLUSTER_KEYS = (
    "name",
    "id",
    "pod_cidrs",
    "nodes",
    "connect_to",
    "max_connected_clusters",
    "kvstore_members",
    "kvstore_proxies",
    "routing_mode",
)
_NODE_KEYS = ("name", "ip", "pod_cidrs", "host")


@dataclass
class _N:  # a node while validating
    index: int
    name: str | None = None
    host: str | None = None
    ip: IPAddress | None = None
    explicit: dict[int, tuple[IPNetwork, int]] = field(default_factory=dict)  # version -> (net, list index)
    allocated: dict[int, IPNetwork] = field(default_factory=dict)


@dataclass
class _C:  # a cluster while validating
    index: int
    raw_name: Any = None
    name: str | None = None
    id: int | None = None
    max_connected: int | None = None
    max_connected_given: bool = False
    cidrs: dict[int, tuple[IPNetwork, int]] = field(default_factory=dict)  # version -> (net, list index)
    cidrs_ok: bool = False
    nodes: list[_N] = field(default_factory=list)
    raw_connect_to: list | None = None
    connect_to: list[str] | None = None
    kvstore_members: list[str] | None = None
    kvstore_proxies: list[str] | None = None
    routing_mode: str | None = None
    routing_mode_given: bool = False


class _Validator:
    def __init__(self, paths: _Paths):
        self.paths = paths
        self.problems: list[Problem] = []
        self.warnings: list[str] = []

    def add(self, path: str, value: Any, reason: str) -> None:
        self.problems.append(Problem(path, value, reason))

    # per-cluster ---------------------------------------------------------------------------------

    def cluster(self, ci: int, raw: Any) -> _C | None:
        P = self.paths
        if not isinstance(raw, Mapping):
            self.add(P.cluster(ci, ""), raw, f"is not a cluster: must be a mapping, not {_type_name(raw)}")
            return None
        c = _C(index=ci)
        for key in raw:
            if key not in _CLUSTER_KEYS:
                self.add(
                    P.cluster(ci, str(key)),
                    raw[key],
                    f"is not a known field; cluster fields are {', '.join(_CLUSTER_KEYS)}",
                )

        # max_connected_clusters first: the ID range depends on it
        mcc = raw.get("max_connected_clusters")
        if mcc is None:
            c.max_connected = DEFAULT_MAX_CONNECTED_CLUSTERS
        else:
            value = _as_int(mcc)
            if value is None or max_connected_clusters_error(value):
                self.add(P.cluster(ci, "max_connected_clusters"), mcc, max_connected_clusters_error(mcc) or "")
            else:
                c.max_connected, c.max_connected_given = value, True

        mode = raw.get("routing_mode")
        if mode is None:
            c.routing_mode = DEFAULT_ROUTING_MODE
        elif mode not in ROUTING_MODES:
            self.add(
                P.cluster(ci, "routing_mode"),
                mode,
                f"is not a routing mode: use one of {', '.join(ROUTING_MODES)}",
            )
        else:
            c.routing_mode, c.routing_mode_given = mode, True

        raw_id = raw.get("id")
        if raw_id is None:
            self.add(
                P.cluster(ci, "id"),
                MISSING,
                f"every cluster needs a unique ID from 1 to {c.max_connected or DEFAULT_MAX_CONNECTED_CLUSTERS}",
            )
        else:
            value = _as_int(raw_id)
            reason = cluster_id_error(raw_id if value is None else value, c.max_connected or 511)
            if reason:
                self.add(P.cluster(ci, "id"), raw_id, reason)
            else:
                c.id = value

        c.raw_name = raw.get("name")
        if c.raw_name is None:
            self.add(P.cluster(ci, "name"), MISSING, "every cluster needs a unique name")
        else:
            reason = cluster_name_error(c.raw_name, c.id if c.id is not None else _as_int(raw_id))
            if reason:
                self.add(P.cluster(ci, "name"), c.raw_name, reason)
            else:
                c.name = c.raw_name

        self.cluster_cidrs(c, raw.get("pod_cidrs"))

        nodes = raw.get("nodes")
        if nodes is None:
            self.add(P.cluster(ci, "nodes"), MISSING, "every cluster needs at least one node")
        elif not isinstance(nodes, (list, tuple)) or not nodes:
            self.add(P.cluster(ci, "nodes"), nodes, "must be a non-empty list of nodes ({name, ip, pod_cidrs?})")
        else:
            for ni, rn in enumerate(nodes):
                n = self.node(c, ni, rn)
                if n is not None:
                    c.nodes.append(n)

        connect_to = raw.get("connect_to")
        if connect_to is not None:
            names = _as_list(connect_to)
            if names is None:
                self.add(P.cluster(ci, "connect_to"), connect_to, "must be a list of cluster names")
            else:
                c.raw_connect_to = names

        for key in ("kvstore_members", "kvstore_proxies"):
            self.node_refs(c, key, raw.get(key))
        return c

    def cluster_cidrs(self, c: _C, value: Any) -> None:
        P, ci = self.paths, c.index
        path = P.cluster(ci, "pod_cidrs")
        if value is None:
            self.add(path, MISSING, "every cluster needs an IPv4 pod CIDR (and optionally one IPv6 pod CIDR)")
            return
        items = _as_list(value)
        if not items:
            self.add(path, value, "must be a list of one IPv4 and optionally one IPv6 CIDR")
            return
        ok = True
        for k, item in enumerate(items):
            net, reason = _parse_cidr(item)
            if reason:
                self.add(f"{path}[{k}]", item, reason)
                ok = False
                continue
            node_prefix = NODE_POD_CIDR_PREFIX[net.version]
            if net.version in c.cidrs:
                first = c.cidrs[net.version][1]
                self.add(
                    f"{path}[{k}]",
                    item,
                    f"is a second {_family(net.version)} pod CIDR (the first is {path}[{first}]): "
                    f"a cluster has one IPv4 and at most one IPv6 pod CIDR",
                )
                ok = False
            elif net.prefixlen > node_prefix:
                self.add(
                    f"{path}[{k}]",
                    item,
                    f"is too small: nodes get a /{node_prefix} each from it, "
                    f"so its prefix must be /{node_prefix} or shorter",
                )
                ok = False
                c.cidrs[net.version] = (net, k)
            else:
                c.cidrs[net.version] = (net, k)
        if ok and 4 not in c.cidrs:
            self.add(path, value, "has no IPv4 CIDR: every cluster needs an IPv4 pod CIDR")
            ok = False
        c.cidrs_ok = ok

    def node(self, c: _C, ni: int, raw: Any) -> _N | None:
        P, ci = self.paths, c.index
        if not isinstance(raw, Mapping):
            self.add(
                P.node(ci, ni, ""),
                raw,
                f"is not a node: must be a mapping {{name, ip, pod_cidrs?}}, not {_type_name(raw)}",
            )
            return None
        n = _N(index=ni)
        for key in raw:
            if key not in _NODE_KEYS:
                self.add(
                    P.node(ci, ni, str(key)), raw[key], f"is not a known field; node fields are {', '.join(_NODE_KEYS)}"
                )
        name = raw.get("name")
        if name is None:
            self.add(P.node(ci, ni, "name"), MISSING, "every node needs a unique name")
        elif not isinstance(name, str) or len(name) > NODE_NAME_MAX_LENGTH or not _NODE_NAME_RE.match(name):
            self.add(
                P.node(ci, ni, "name"),
                name,
                f"is not a valid node name: must match {NODE_NAME_PATTERN} (letters, digits, '-', '_', '.'; "
                f"at most {NODE_NAME_MAX_LENGTH} characters)",
            )
        else:
            n.name = name
        host = raw.get("host")
        if host is not None and not isinstance(host, str):
            self.add(P.node(ci, ni, "host"), host, "must be a string (the node's inventory host name)")
        n.host = host if isinstance(host, str) else n.name

        ip = raw.get("ip")
        if ip is None:
            self.add(P.node(ci, ni, "ip"), MISSING, "every node needs its underlay IP address")
        else:
            n.ip, reason = _parse_ip(ip)
            if reason:
                self.add(P.node(ci, ni, "ip"), ip, reason)

        cidrs = raw.get("pod_cidrs")
        if cidrs is not None:
            path = P.node(ci, ni, "pod_cidrs")
            items = _as_list(cidrs)
            if items is None:
                self.add(path, cidrs, "must be a list of at most one IPv4 and one IPv6 CIDR")
            for k, item in enumerate(items or []):
                net, reason = _parse_cidr(item)
                if reason:
                    self.add(f"{path}[{k}]", item, reason)
                elif net.version in n.explicit:
                    self.add(
                        f"{path}[{k}]",
                        item,
                        f"is a second {_family(net.version)} pod CIDR for this node: at most one per IP version",
                    )
                else:
                    n.explicit[net.version] = (net, k)
        return n

    def node_refs(self, c: _C, key: str, value: Any) -> None:
        P, ci = self.paths, c.index
        path = P.cluster(ci, key)
        role = "kvstore (etcd) members" if key == "kvstore_members" else "kvstore proxies"
        if value is None:
            if c.nodes and c.nodes[0].name:
                setattr(c, key, [c.nodes[0].name])
            return
        names = _as_list(value)
        if not names:
            self.add(path, value, f"must be a non-empty list of node names of this cluster (its {role})")
            return
        known = {n.name for n in c.nodes if n.name}
        all_named = all(n.name for n in c.nodes)
        seen: set = set()
        ok = True
        for k, name in enumerate(names):
            if not isinstance(name, str):
                self.add(f"{path}[{k}]", name, f"is not a node name: must be a string, not {_type_name(name)}")
                ok = False
            elif name in seen:
                self.add(f"{path}[{k}]", name, "is listed twice")
                ok = False
            elif name not in known:
                if all_named:  # otherwise the node-name problem already explains it
                    choices = ", ".join(sorted(known))
                    self.add(f"{path}[{k}]", name, f"is not a node of this cluster (its nodes: {choices})")
                ok = False
            if isinstance(name, str):
                seen.add(name)
        if ok:
            setattr(c, key, names)
            if key == "kvstore_members" and len(names) % 2 == 0:
                self.warnings.append(
                    f"{path}: {len(names)} etcd members tolerate no more failures than {len(names) - 1}; "
                    f"use an odd number (1 or 3)"
                )

    # whole mesh ----------------------------------------------------------------------------------

    def mesh(self, raw: Any) -> Mesh | None:
        if isinstance(raw, Mapping) and "clusters" in raw:
            raw = raw["clusters"]
        if not isinstance(raw, (list, tuple)) or not raw:
            self.add("clusters", raw, "must be a non-empty list of clusters")
            return None
        clusters = [c for ci, rc in enumerate(raw) if (c := self.cluster(ci, rc)) is not None]
        P = self.paths

        # the same max_connected_clusters everywhere
        mcc = DEFAULT_MAX_CONNECTED_CLUSTERS
        ref = next((c for c in clusters if c.max_connected_given), None)
        if ref is not None:
            mcc = ref.max_connected
            ref_path = P.cluster(ref.index, "max_connected_clusters")
            for c in clusters:
                if c.max_connected is None or c.max_connected == mcc:
                    continue
                same = "every cluster of a mesh must use the same value (set it once for all, e.g. in group_vars/all)"
                if c.max_connected_given:
                    reason = f"differs from {mcc} in {ref_path}: {same}"
                    self.add(P.cluster(c.index, "max_connected_clusters"), c.max_connected, reason)
                else:
                    reason = f"it defaults to {c.max_connected}, but {ref_path} is {mcc}: {same}"
                    self.add(P.cluster(c.index, "max_connected_clusters"), MISSING, reason)

        # the same routing mode everywhere: both ends of a node pair must agree on tunnel or direct
        ref = next((c for c in clusters if c.routing_mode_given), None)
        routing_mode = ref.routing_mode if ref is not None else DEFAULT_ROUTING_MODE
        if ref is not None:
            ref_path = P.cluster(ref.index, "routing_mode")
            for c in clusters:
                if c.routing_mode is None or c.routing_mode == routing_mode:
                    continue
                same = "every cluster of a mesh must use the same routing mode (set it once, in group_vars/all)"
                if c.routing_mode_given:
                    self.add(
                        P.cluster(c.index, "routing_mode"),
                        c.routing_mode,
                        f"differs from {ref.routing_mode!r} in {ref_path}: {same}",
                    )
                else:
                    self.add(
                        P.cluster(c.index, "routing_mode"),
                        MISSING,
                        f"it defaults to {c.routing_mode!r}, but {ref_path} is {routing_mode!r}: {same}",
                    )

        # unique names and IDs
        self.unique(clusters, lambda c: c.raw_name if isinstance(c.raw_name, str) else None, "name", "cluster name")
        self.unique(clusters, lambda c: c.id, "id", "cluster ID")

        # unique node names / IPs across the mesh
        seen_names: dict[str, tuple[int, int]] = {}
        seen_ips: dict[IPAddress, tuple[int, int]] = {}
        seen_hosts: dict[str, tuple[int, int]] = {}
        for c in clusters:
            for n in c.nodes:
                if n.host is not None and n.host != n.name:
                    if n.host in seen_hosts:
                        oci, oni = seen_hosts[n.host]
                        self.add(
                            P.node(c.index, n.index, "host"),
                            n.host,
                            f"is already the host of {P.node(oci, oni, '')}: one inventory host is one node",
                        )
                    seen_hosts.setdefault(n.host, (c.index, n.index))
                if n.name is not None:
                    if n.name in seen_names:
                        oci, oni = seen_names[n.name]
                        self.add(
                            P.node(c.index, n.index, "name"),
                            n.name,
                            f"is already the name of {P.node(oci, oni, '')}: node names must be unique in the mesh",
                        )
                    else:
                        seen_names[n.name] = (c.index, n.index)
                if n.ip is not None:
                    if n.ip in seen_ips:
                        oci, oni = seen_ips[n.ip]
                        self.add(
                            P.node(c.index, n.index, "ip"),
                            str(n.ip),
                            f"is already the IP of {P.node(oci, oni, '')}: node IPs must be unique in the mesh",
                        )
                    else:
                        seen_ips[n.ip] = (c.index, n.index)

        # pod CIDRs must not overlap across clusters; node IPs must lie outside every pod CIDR
        all_cidrs = [(c, net, k) for c in clusters for (net, k) in c.cidrs.values()]
        for a in range(len(all_cidrs)):
            for b in range(a):
                ca, na, ka = all_cidrs[a]
                cb, nb, kb = all_cidrs[b]
                if ca is not cb and na.version == nb.version and _overlap(na, nb):
                    self.add(
                        f"{P.cluster(ca.index, 'pod_cidrs')}[{ka}]",
                        str(na),
                        f"overlaps {P.cluster(cb.index, 'pod_cidrs')}[{kb}] {str(nb)!r}"
                        f"{_of_cluster(cb)}: pod CIDRs of different clusters must not overlap",
                    )
        for c in clusters:
            for n in c.nodes:
                if n.ip is None:
                    continue
                for oc, net, k in all_cidrs:
                    if n.ip.version == net.version and n.ip in net:
                        self.add(
                            P.node(c.index, n.index, "ip"),
                            str(n.ip),
                            f"is inside the pod CIDR {str(net)!r} of {P.cluster(oc.index, 'pod_cidrs')}[{k}]"
                            f"{_of_cluster(oc)}: node IPs must lie outside every pod CIDR",
                        )

        for c in clusters:
            self.node_cidrs(c)
        self.connections(clusters)

        if self.problems:
            return None
        return self.build(clusters, mcc, routing_mode)

    def unique(self, clusters: list[_C], get, key: str, what: str) -> None:
        seen: dict[Any, _C] = {}
        for c in clusters:
            value = get(c)
            if value is None:
                continue
            if value in seen:
                self.add(
                    self.paths.cluster(c.index, key),
                    value,
                    f"is already the {what} of {self.paths.cluster(seen[value].index, '')}: "
                    f"{what}s must be unique in the mesh",
                )
            else:
                seen[value] = c

    def node_cidrs(self, c: _C) -> None:
        """Check per-node CIDRs given by hand and allocate the others in node order."""
        P, ci = self.paths, c.index
        for version in (4, 6):
            cluster_net = c.cidrs.get(version)
            given: list[tuple[_N, IPNetwork]] = []
            for n in c.nodes:
                if version not in n.explicit:
                    continue
                net, k = n.explicit[version]
                path = f"{P.node(ci, n.index, 'pod_cidrs')}[{k}]"
                if cluster_net is None:
                    if c.cidrs_ok:
                        self.add(
                            path, str(net), f"is {_family(version)} but the cluster has no {_family(version)} pod CIDR"
                        )
                    continue
                cnet, ck = cluster_net
                if not _inside(net, cnet):
                    self.add(
                        path,
                        str(net),
                        f"is not inside the cluster's {_family(version)} pod CIDR {str(cnet)!r} "
                        f"({P.cluster(ci, 'pod_cidrs')}[{ck}])",
                    )
                    continue
                clash = next((o for o, onet in given if _overlap(net, onet)), None)
                if clash is not None:
                    onet, ok_ = clash.explicit[version]
                    self.add(
                        path,
                        str(net),
                        f"overlaps {str(onet)!r} of {P.node(ci, clash.index, 'pod_cidrs')}[{ok_}]: "
                        "node pod CIDRs must not overlap",
                    )
                    continue
                given.append((n, net))
                n.allocated[version] = net
            if cluster_net is None or not c.cidrs_ok:
                continue
            cnet, ck = cluster_net
            needing = [n for n in c.nodes if version not in n.explicit]
            if not needing:
                continue
            prefix = NODE_POD_CIDR_PREFIX[version]
            nets, free = _allocate(cnet, prefix, len(needing), [g for unused, g in given])
            if len(nets) < len(needing):
                by_hand = f" besides the {len(given)} given per node" if given else ""
                self.add(
                    f"{P.cluster(ci, 'pod_cidrs')}[{ck}]",
                    str(cnet),
                    f"is too small: {len(needing)} nodes need a /{prefix} each from it, but only {free} "
                    f"/{prefix}{'s' if free != 1 else ''} fit{by_hand}; use a shorter prefix",
                )
                continue
            for n, net in zip(needing, nets, strict=True):
                n.allocated[version] = net

    def connections(self, clusters: list[_C]) -> None:
        P = self.paths
        names = {c.raw_name for c in clusters if isinstance(c.raw_name, str)}
        for c in clusters:
            if c.raw_connect_to is None:
                c.connect_to = [o.name for o in clusters if o is not c and o.name]
                continue
            ok, seen = True, set()
            for k, peer in enumerate(c.raw_connect_to):
                path = f"{P.cluster(c.index, 'connect_to')}[{k}]"
                if not isinstance(peer, str):
                    self.add(path, peer, f"is not a cluster name: must be a string, not {_type_name(peer)}")
                    ok = False
                elif peer == c.raw_name:
                    self.add(path, peer, "is this cluster itself: a cluster does not connect to itself")
                    ok = False
                elif peer in seen:
                    self.add(path, peer, "is listed twice")
                    ok = False
                elif peer not in names:
                    known = ", ".join(sorted(n for n in names if n != c.raw_name)) or "none"
                    self.add(path, peer, f"is not a cluster of this mesh (the others are: {known})")
                    ok = False
                if isinstance(peer, str):
                    seen.add(peer)
            if ok:
                c.connect_to = list(c.raw_connect_to)

    def build(self, clusters: list[_C], mcc: int, routing_mode: str = "tunnel") -> Mesh:
        P = self.paths
        connected_from = {c.name: [o.name for o in clusters if c.name in o.connect_to] for c in clusters}
        out = []
        for c in clusters:
            for peer in c.connect_to:
                if c.name not in next(o for o in clusters if o.name == peer).connect_to:
                    self.warnings.append(
                        f"{P.cluster(c.index, 'connect_to')}: cluster {c.name!r} connects to {peer!r} but {peer!r} "
                        f"does not connect to {c.name!r}: {peer!r} will not learn the nodes and pod CIDRs of "
                        f"{c.name!r}, so traffic between them only works one way round unless routed otherwise"
                    )
            nodes = tuple(
                Node(
                    name=n.name,
                    host=n.host,
                    ip=str(n.ip),
                    cluster=c.name,
                    cluster_id=c.id,
                    ipv4_pod_cidr=str(n.allocated[4].cidr) if 4 in n.allocated else None,
                    ipv6_pod_cidr=str(n.allocated[6].cidr) if 6 in n.allocated else None,
                )
                for n in c.nodes
            )
            out.append(
                Cluster(
                    name=c.name,
                    id=c.id,
                    max_connected_clusters=mcc,
                    ipv4_pod_cidr=str(c.cidrs[4][0].cidr),
                    ipv6_pod_cidr=str(c.cidrs[6][0].cidr) if 6 in c.cidrs else None,
                    nodes=nodes,
                    connect_to=tuple(c.connect_to),
                    connected_from=tuple(connected_from[c.name]),
                    kvstore_members=tuple(c.kvstore_members),
                    kvstore_proxies=tuple(c.kvstore_proxies),
                )
            )
        return Mesh(
            clusters=tuple(out), max_connected_clusters=mcc, warnings=tuple(self.warnings), routing_mode=routing_mode
        )


def _of_cluster(c: _C) -> str:
    return f" (cluster {c.raw_name!r})" if isinstance(c.raw_name, str) else ""


def _overlap(a: IPNetwork, b: IPNetwork) -> bool:
    return a.first <= b.last and b.first <= a.last


def _inside(inner: IPNetwork, outer: IPNetwork) -> bool:
    return outer.first <= inner.first and inner.last <= outer.last


def _allocate(net: IPNetwork, prefix: int, count: int, taken: list[IPNetwork]) -> tuple[list[IPNetwork], int]:
    """The first ``count`` aligned /``prefix`` blocks of ``net`` that overlap nothing in ``taken``.

    Returns the blocks found (fewer than ``count`` when ``net`` is too small) and how many free
    blocks ``net`` has in all.  Works on integers so a huge IPv6 range costs nothing.
    """
    width = 32 if net.version == 4 else 128
    size = 1 << (width - prefix)
    spans = sorted((t.first // size, t.last // size) for t in taken)  # block index ranges in use
    merged: list[list[int]] = []
    for lo, hi in spans:
        if merged and lo <= merged[-1][1] + 1:
            merged[-1][1] = max(merged[-1][1], hi)
        else:
            merged.append([lo, hi])
    total = 1 << (prefix - net.prefixlen)
    free = total - sum(hi - lo + 1 for lo, hi in merged)
    blocks: list[IPNetwork] = []
    block, last_block = net.first // size, net.last // size
    for lo, hi in [*merged, [last_block + 1, last_block + 1]]:
        while block < lo and len(blocks) < count:
            blocks.append(IPNetwork(f"{IPAddress(block * size, net.version)}/{prefix}"))
            block += 1
        if len(blocks) >= count:
            break
        block = max(block, hi + 1)
    return blocks, free


def validate_mesh(clusters: Any) -> Mesh:
    """Validate a whole mesh and return it normalised, or raise :class:`MeshValidationError`.

    ``clusters`` is a list of ``{name, id, pod_cidrs, nodes: [{name, ip, pod_cidrs?, host?}],
    connect_to?, max_connected_clusters?, kvstore_members?, kvstore_proxies?}`` (or a mapping
    with that list under ``clusters``).
    """
    return _run(clusters, _Paths(), [])


def _run(clusters: Any, paths: _Paths, problems: list[Problem]) -> Mesh:
    v = _Validator(paths)
    v.problems.extend(problems)
    mesh = v.mesh(clusters)
    if v.problems or mesh is None:
        raise MeshValidationError(v.problems)
    return mesh


# --- from Ansible inventory -----------------------------------------------------------------------


def _clusters_from_inventory(
    hostvars: Mapping, groups: Mapping, mesh_group: str
) -> tuple[list[dict], list[Problem], _InventoryPaths]:
    problems: list[Problem] = []
    buckets: dict[str, list[str]] = {}
    if not isinstance(groups, Mapping) or mesh_group not in groups:
        problems.append(
            Problem(
                f"groups[{mesh_group!r}]",
                MISSING,
                f"put every node of the mesh into the inventory group {mesh_group!r} "
                f"(usually as its child groups, one per cluster)",
            )
        )
        return [], problems, _InventoryPaths(mesh_group, [], [])
    hosts = groups[mesh_group]
    if not isinstance(hosts, (list, tuple)) or not hosts:
        problems.append(Problem(f"groups[{mesh_group!r}]", hosts, "must list the mesh's hosts; it is empty"))
    name_var = INVENTORY_VARS["name"]
    for host in hosts or []:
        hv = hostvars.get(host) if isinstance(hostvars, Mapping) else None
        if hv is None:
            problems.append(Problem(f"hostvars[{host!r}]", MISSING, "no variables were passed for this host"))
            continue
        if not isinstance(hv, Mapping):
            problems.append(Problem(f"hostvars[{host!r}]", hv, "must be a mapping of variable names to values"))
            continue
        cname = hv.get(name_var)
        if cname is None:
            problems.append(
                Problem(
                    f"hostvars[{host!r}].{name_var}",
                    MISSING,
                    f"every host of group {mesh_group!r} belongs to a cluster: set {name_var} in the "
                    f"group_vars of its cluster's group",
                )
            )
            continue
        if not isinstance(cname, str):
            problems.append(Problem(f"hostvars[{host!r}].{name_var}", cname, cluster_name_error(cname) or ""))
            continue
        buckets.setdefault(cname, []).append(host)

    clusters: list[dict] = []
    cluster_hosts: list[list[str]] = []
    for cname, chosts in buckets.items():
        first = hostvars[chosts[0]]
        cluster: dict[str, Any] = {"name": cname}
        for key, var in INVENTORY_VARS.items():
            if key == "name":
                continue
            value = first.get(var)
            if value is not None:
                cluster[key] = value
            for other in chosts[1:]:
                ovalue = hostvars[other].get(var)
                if ovalue != value:
                    problems.append(
                        Problem(
                            f"hostvars[{other!r}].{var}",
                            MISSING if ovalue is None else ovalue,
                            f"differs from {_show(value) if value is not None else 'unset'} on {chosts[0]!r} "
                            f"(both in cluster {cname!r}): set cluster variables in the group_vars of the "
                            f"cluster's group, not per host",
                        )
                    )
        nodes = []
        for host in chosts:
            hv = hostvars[host]
            node: dict[str, Any] = {"name": host, "host": host}
            for key, var in INVENTORY_NODE_VARS.items():
                value = hv.get(var)
                if value is not None:
                    node[key] = value
            nodes.append(node)
        cluster["nodes"] = nodes
        clusters.append(cluster)
        cluster_hosts.append(chosts)
    return clusters, problems, _InventoryPaths(mesh_group, list(buckets), cluster_hosts)


def clusters_from_inventory(hostvars: Mapping, groups: Mapping, mesh_group: str = "clusters") -> list[dict]:
    """Build the ``clusters`` input of :func:`validate_mesh` from Ansible ``hostvars`` and ``groups``.

    Every host of ``groups[mesh_group]`` is a node; hosts are grouped into clusters by their
    ``clustermesh_cluster_name``; cluster variables are read from the cluster's first host and must
    be the same on all its hosts.  Only the ``clustermesh_*`` variables of INVENTORY_VARS and
    INVENTORY_NODE_VARS are read (``hostvars`` may be lazy).  Raises :class:`MeshValidationError`
    when the inventory cannot be turned into clusters.
    """
    clusters, problems, unused = _clusters_from_inventory(hostvars, groups, mesh_group)
    if problems:
        raise MeshValidationError(problems)
    return clusters


def validate_inventory(hostvars: Mapping, groups: Mapping, mesh_group: str = "clusters") -> Mesh:
    """:func:`clusters_from_inventory` + :func:`validate_mesh`, problems named by inventory variable."""
    clusters, problems, paths = _clusters_from_inventory(hostvars, groups, mesh_group)
    if not clusters:
        raise MeshValidationError(problems or [Problem(f"groups[{mesh_group!r}]", MISSING, "no cluster found")])
    return _run(clusters, paths, problems)
