# -*- coding: utf-8 -*-
# Copyright: clustermesh.core contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""Cilium's kvstore key layout: key builders, key parsers and the cluster-config codec.

The layout is Cilium's (pkg/kvstore, pkg/clustermesh), so a cluster managed by this collection
and a Cilium cluster can read each other's state::

    cilium/.heartbeat                                   RFC 3339 timestamp (under a lease)
    cilium/cluster-config/<cluster>                     {"id": .., "capabilities": {..}}
    cilium/synced/<cluster>/<prefix>                    RFC 3339 timestamp ("synced canary")
    cilium/state/nodes/v1/<cluster>/<node>              node JSON
    cilium/state/services/v1/<cluster>/<ns>/<name>      ClusterService JSON
    cilium/state/ip/v1/<address space>/<ip>             IP-to-identity JSON (space "default")
    cilium/state/identities/v1/id/<ID>                  identity label string
    cilium/cache/<kind>/v1/<cluster>/...                per-cluster cache of remote state (KVStoreMesh)

Builders validate what they are given and raise :class:`KeyLayoutError` (a ``ValueError``)
naming the bad part.  Parsers take a key read from a (possibly remote, possibly hostile)
kvstore and either return its typed parts or raise :class:`KeyLayoutError`; callers log and
skip such keys.  Nothing here imports Ansible or talks to etcd.
"""

from __future__ import annotations

import datetime
import ipaddress
import json
import re
from dataclasses import dataclass

ROOT = "cilium/"
HEARTBEAT_KEY = "cilium/.heartbeat"
CLUSTER_CONFIG_PREFIX = "cilium/cluster-config/"
SYNCED_PREFIX = "cilium/synced/"
STATE_PREFIX = "cilium/state/"
CACHE_PREFIX = "cilium/cache/"

NODES_PREFIX = "cilium/state/nodes/v1/"
SERVICES_PREFIX = "cilium/state/services/v1/"
IP_PREFIX = "cilium/state/ip/v1/"
IDENTITIES_PREFIX = "cilium/state/identities/v1/"
IDENTITY_ID_PREFIX = "cilium/state/identities/v1/id/"

DEFAULT_ADDRESS_SPACE = "default"

# The state prefixes whose content is announced by a synced canary, without trailing slash as
# Cilium writes them after ``cilium/synced/<cluster>/``.
SYNCED_STATE_PREFIXES = (
    "cilium/state/nodes/v1",
    "cilium/state/services/v1",
    "cilium/state/identities/v1",
    "cilium/state/ip/v1",
)

# Kinds of state that the per-cluster cache mirrors: kind -> state prefix.
CACHE_KINDS = {
    "nodes": NODES_PREFIX,
    "services": SERVICES_PREFIX,
    "identities": IDENTITIES_PREFIX,
    "ip": IP_PREFIX,
}

CLUSTER_NAME_MAX = 32
_CLUSTER_NAME_RE = re.compile(r"^([a-z0-9][-a-z0-9]*)?[a-z0-9]$")
# Kubernetes node names are DNS subdomains; non-Kubernetes hosts may use upper case and '_'.
_NODE_NAME_RE = re.compile(r"^[A-Za-z0-9]([-A-Za-z0-9_.]*[A-Za-z0-9])?$")
NODE_NAME_MAX = 253
# Kubernetes namespace and service names are DNS-1123 labels.
_DNS_LABEL_RE = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
DNS_LABEL_MAX = 63

# Security identities are 24 bits wide; 0 is "unset".
IDENTITY_MAX = (1 << 24) - 1
VALID_MAX_CONNECTED_CLUSTERS = (255, 511)
DEFAULT_MAX_CONNECTED_CLUSTERS = 255


class KeyLayoutError(ValueError):
    """A key or value does not follow Cilium's kvstore layout."""


# --------------------------------------------------------------------------------------------
# validation of key parts
# --------------------------------------------------------------------------------------------


def validate_cluster_name(name: str, what: str = "cluster name") -> str:
    if not isinstance(name, str) or not name:
        raise KeyLayoutError(f"{what} must be a non-empty string, got {name!r}")
    if len(name) > CLUSTER_NAME_MAX:
        raise KeyLayoutError(f"{what} {name!r} is longer than {CLUSTER_NAME_MAX} characters")
    if not _CLUSTER_NAME_RE.match(name):
        raise KeyLayoutError(
            f"{what} {name!r} is invalid: use lower-case letters, digits and '-', "
            "starting and ending with a letter or digit"
        )
    return name


def validate_node_name(name: str) -> str:
    if not isinstance(name, str) or not name:
        raise KeyLayoutError(f"node name must be a non-empty string, got {name!r}")
    if len(name) > NODE_NAME_MAX or not _NODE_NAME_RE.match(name):
        raise KeyLayoutError(
            f"node name {name!r} is invalid: use letters, digits, '-', '_' and '.' "
            f"(at most {NODE_NAME_MAX} characters, starting and ending with a letter or digit)"
        )
    return name


def validate_dns_label(name: str, what: str) -> str:
    if not isinstance(name, str) or not name:
        raise KeyLayoutError(f"{what} must be a non-empty string, got {name!r}")
    if len(name) > DNS_LABEL_MAX or not _DNS_LABEL_RE.match(name):
        raise KeyLayoutError(
            f"{what} {name!r} is not a DNS label (lower-case letters, digits and '-', "
            f"at most {DNS_LABEL_MAX} characters)"
        )
    return name


def canonical_ip(value: str) -> str:
    """The canonical text of an IP address or prefix (``10.0.0.5``, ``fd00::1``, ``10.0.0.0/24``)."""
    if not isinstance(value, str) or not value or value.strip() != value:
        raise KeyLayoutError(f"IP address must be a non-empty string without spaces, got {value!r}")
    try:
        if "/" in value:
            return str(ipaddress.ip_network(value, strict=True))
        return str(ipaddress.ip_address(value))
    except ValueError as exc:
        raise KeyLayoutError(f"{value!r} is not an IP address or prefix: {exc}") from None


def validate_identity(identity: int) -> int:
    if isinstance(identity, bool) or not isinstance(identity, int):
        raise KeyLayoutError(f"identity must be an integer, got {identity!r}")
    if not 1 <= identity <= IDENTITY_MAX:
        raise KeyLayoutError(f"identity {identity} is outside 1..{IDENTITY_MAX}")
    return identity


def _strip_prefix(key: str, prefix: str, what: str) -> str:
    if not isinstance(key, str):
        raise KeyLayoutError(f"{what} key must be a string, got {type(key).__name__}")
    if not key.startswith(prefix):
        raise KeyLayoutError(f"{key!r} is not a {what} key (expected prefix {prefix!r})")
    return key[len(prefix) :]


def _split_exact(rest: str, count: int, key: str, what: str, shape: str) -> list[str]:
    parts = rest.split("/")
    if len(parts) != count or any(not part for part in parts):
        raise KeyLayoutError(f"{key!r} is not a {what} key (expected {shape})")
    return parts


# --------------------------------------------------------------------------------------------
# heartbeat, cluster config, synced canaries
# --------------------------------------------------------------------------------------------


def heartbeat_key() -> str:
    return HEARTBEAT_KEY


def cluster_config_key(cluster: str) -> str:
    return CLUSTER_CONFIG_PREFIX + validate_cluster_name(cluster)


def parse_cluster_config_key(key: str) -> str:
    """``cilium/cluster-config/<cluster>`` -> cluster name."""
    rest = _strip_prefix(key, CLUSTER_CONFIG_PREFIX, "cluster-config")
    (cluster,) = _split_exact(rest, 1, key, "cluster-config", "cilium/cluster-config/<cluster>")
    return validate_cluster_name(cluster)


def synced_prefix(cluster: str) -> str:
    return f"{SYNCED_PREFIX}{validate_cluster_name(cluster)}/"


def synced_key(cluster: str, prefix: str) -> str:
    """The synced canary of ``prefix`` (a state prefix such as ``cilium/state/nodes/v1``)."""
    prefix = _validate_synced_target(prefix)
    return synced_prefix(cluster) + prefix


def _validate_synced_target(prefix: str) -> str:
    if not isinstance(prefix, str) or not prefix:
        raise KeyLayoutError(f"synced prefix must be a non-empty string, got {prefix!r}")
    prefix = prefix.rstrip("/")
    if not prefix.startswith("cilium/") or "//" in prefix or prefix == "cilium":
        raise KeyLayoutError(f"synced prefix {prefix!r} must be a kvstore prefix under 'cilium/'")
    return prefix


@dataclass(frozen=True)
class SyncedKey:
    cluster: str
    prefix: str


def parse_synced_key(key: str) -> SyncedKey:
    """``cilium/synced/<cluster>/<prefix>`` -> (cluster, prefix)."""
    rest = _strip_prefix(key, SYNCED_PREFIX, "synced canary")
    cluster, sep, prefix = rest.partition("/")
    if not sep or not prefix:
        raise KeyLayoutError(f"{key!r} is not a synced canary key (expected cilium/synced/<cluster>/<prefix>)")
    return SyncedKey(validate_cluster_name(cluster), _validate_synced_target(prefix))


# --------------------------------------------------------------------------------------------
# state: nodes, services, ipcache, identities
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class NodeKey:
    cluster: str
    name: str


def nodes_prefix(cluster: str | None = None) -> str:
    return NODES_PREFIX if cluster is None else f"{NODES_PREFIX}{validate_cluster_name(cluster)}/"


def node_key(cluster: str, name: str) -> str:
    return f"{nodes_prefix(cluster)}{validate_node_name(name)}"


def parse_node_key(key: str) -> NodeKey:
    """``cilium/state/nodes/v1/<cluster>/<node>`` -> NodeKey."""
    rest = _strip_prefix(key, NODES_PREFIX, "node")
    cluster, name = _split_exact(rest, 2, key, "node", "cilium/state/nodes/v1/<cluster>/<node>")
    return NodeKey(validate_cluster_name(cluster), validate_node_name(name))


@dataclass(frozen=True)
class ServiceKey:
    cluster: str
    namespace: str
    name: str


def services_prefix(cluster: str | None = None, namespace: str | None = None) -> str:
    if cluster is None:
        if namespace is not None:
            raise KeyLayoutError("a services prefix with a namespace needs a cluster")
        return SERVICES_PREFIX
    prefix = f"{SERVICES_PREFIX}{validate_cluster_name(cluster)}/"
    if namespace is not None:
        prefix += validate_dns_label(namespace, "namespace") + "/"
    return prefix


def service_key(cluster: str, namespace: str, name: str) -> str:
    return f"{services_prefix(cluster, namespace)}{validate_dns_label(name, 'service name')}"


def parse_service_key(key: str) -> ServiceKey:
    """``cilium/state/services/v1/<cluster>/<namespace>/<name>`` -> ServiceKey."""
    rest = _strip_prefix(key, SERVICES_PREFIX, "service")
    cluster, namespace, name = _split_exact(
        rest, 3, key, "service", "cilium/state/services/v1/<cluster>/<namespace>/<name>"
    )
    return ServiceKey(
        validate_cluster_name(cluster),
        validate_dns_label(namespace, "namespace"),
        validate_dns_label(name, "service name"),
    )


@dataclass(frozen=True)
class IPKey:
    address_space: str
    ip: str  # canonical address or prefix text


def ip_prefix(address_space: str = DEFAULT_ADDRESS_SPACE) -> str:
    return f"{IP_PREFIX}{validate_dns_label(address_space, 'address space')}/"


def ip_key(ip: str, address_space: str = DEFAULT_ADDRESS_SPACE) -> str:
    return ip_prefix(address_space) + canonical_ip(ip)


def parse_ip_key(key: str, *, strict: bool = True) -> IPKey:
    """``cilium/state/ip/v1/<space>/<ip or prefix>`` -> IPKey.

    An IPv4 prefix contains one '/' itself (``.../default/10.0.0.0/24``).  With ``strict`` the
    address text must already be canonical (as Cilium writes it), so each entry has one key.
    """
    rest = _strip_prefix(key, IP_PREFIX, "ipcache")
    space, sep, address = rest.partition("/")
    if not sep or not address:
        raise KeyLayoutError(f"{key!r} is not an ipcache key (expected cilium/state/ip/v1/<space>/<ip>)")
    validate_dns_label(space, "address space")
    canonical = canonical_ip(address)
    if strict and canonical != address:
        raise KeyLayoutError(f"{key!r}: IP {address!r} is not in canonical form ({canonical!r})")
    return IPKey(space, canonical)


def identity_key(identity: int) -> str:
    return f"{IDENTITY_ID_PREFIX}{validate_identity(identity)}"


def parse_identity_key(key: str) -> int:
    """``cilium/state/identities/v1/id/<ID>`` -> ID."""
    rest = _strip_prefix(key, IDENTITY_ID_PREFIX, "identity")
    if not rest.isascii() or not rest.isdigit() or (len(rest) > 1 and rest.startswith("0")):
        raise KeyLayoutError(f"{key!r} is not an identity key (expected a decimal ID after {IDENTITY_ID_PREFIX!r})")
    return validate_identity(int(rest))


# --------------------------------------------------------------------------------------------
# per-cluster cache (KVStoreMesh)
# --------------------------------------------------------------------------------------------
#
# Cilium's KVStoreMesh mirrors a remote cluster's state under cilium/cache/, one subtree per
# remote cluster:
#   cilium/state/nodes/v1/<c>/<node>             -> cilium/cache/nodes/v1/<c>/<node>
#   cilium/state/services/v1/<c>/<ns>/<name>     -> cilium/cache/services/v1/<c>/<ns>/<name>
#   cilium/state/identities/v1/id/<ID>           -> cilium/cache/identities/v1/<c>/id/<ID>
#   cilium/state/ip/v1/<space>/<ip>              -> cilium/cache/ip/v1/<c>/<ip>


def cache_prefix(kind: str, cluster: str | None = None) -> str:
    if kind not in CACHE_KINDS:
        raise KeyLayoutError(f"cache kind {kind!r} is unknown; use one of {', '.join(sorted(CACHE_KINDS))}")
    prefix = f"{CACHE_PREFIX}{kind}/v1/"
    return prefix if cluster is None else f"{prefix}{validate_cluster_name(cluster)}/"


def state_to_cache_key(state_key: str, cluster: str) -> str:
    """Where the cache of ``cluster`` keeps the state key ``state_key`` read from that cluster."""
    validate_cluster_name(cluster)
    if state_key.startswith(NODES_PREFIX):
        node = parse_node_key(state_key)
        _require_same_cluster(state_key, node.cluster, cluster)
        return cache_prefix("nodes", cluster) + node.name
    if state_key.startswith(SERVICES_PREFIX):
        svc = parse_service_key(state_key)
        _require_same_cluster(state_key, svc.cluster, cluster)
        return f"{cache_prefix('services', cluster)}{svc.namespace}/{svc.name}"
    if state_key.startswith(IDENTITY_ID_PREFIX):
        return f"{cache_prefix('identities', cluster)}id/{parse_identity_key(state_key)}"
    if state_key.startswith(IP_PREFIX):
        return cache_prefix("ip", cluster) + parse_ip_key(state_key).ip
    raise KeyLayoutError(f"{state_key!r} is not a state key that the cache mirrors")


def _require_same_cluster(key: str, found: str, expected: str) -> None:
    if found != expected:
        raise KeyLayoutError(f"{key!r} belongs to cluster {found!r}, not {expected!r}")


@dataclass(frozen=True)
class CacheKey:
    kind: str
    cluster: str
    state_key: str  # the equivalent key under cilium/state/


def parse_cache_key(key: str) -> CacheKey:
    """``cilium/cache/<kind>/v1/<cluster>/...`` -> (kind, cluster, equivalent state key)."""
    rest = _strip_prefix(key, CACHE_PREFIX, "cache")
    kind, sep, rest = rest.partition("/v1/")
    if not sep or kind not in CACHE_KINDS:
        raise KeyLayoutError(f"{key!r} is not a cache key (expected cilium/cache/<kind>/v1/<cluster>/...)")
    cluster, sep, tail = rest.partition("/")
    if not sep or not tail:
        raise KeyLayoutError(f"{key!r} is not a cache key (expected cilium/cache/{kind}/v1/<cluster>/...)")
    validate_cluster_name(cluster)
    if kind == "nodes":
        state_key = node_key(cluster, _single(tail, key))
    elif kind == "services":
        namespace, name = _split_exact(tail, 2, key, "service cache", ".../<cluster>/<namespace>/<name>")
        state_key = service_key(cluster, namespace, name)
    elif kind == "identities":
        if not tail.startswith("id/"):
            raise KeyLayoutError(f"{key!r} is not an identity cache key (expected .../<cluster>/id/<ID>)")
        state_key = identity_key(parse_identity_key(IDENTITY_ID_PREFIX + tail[3:]))
    else:  # ip
        state_key = ip_key(parse_ip_key(ip_prefix() + tail).ip)
    return CacheKey(kind, cluster, state_key)


def _single(tail: str, key: str) -> str:
    if "/" in tail:
        raise KeyLayoutError(f"{key!r} has an unexpected '/' in {tail!r}")
    return tail


# --------------------------------------------------------------------------------------------
# values: timestamps (heartbeat, synced canaries) and cluster config
# --------------------------------------------------------------------------------------------


def encode_timestamp(when: datetime.datetime | None = None) -> bytes:
    """RFC 3339 in UTC with second precision, as Go's ``time.RFC3339`` writes it."""
    when = when or datetime.datetime.now(datetime.UTC)
    if when.tzinfo is None:
        raise KeyLayoutError("timestamp must be timezone-aware")
    return when.astimezone(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ").encode()


def decode_timestamp(value: bytes | str) -> datetime.datetime:
    """Parse an RFC 3339 timestamp (``Z`` or an offset, optional fraction) to an aware datetime."""
    text = value.decode("utf-8", "replace") if isinstance(value, bytes) else value
    text = text.strip()
    match = re.fullmatch(r"(\d{4}-\d{2}-\d{2}[Tt ]\d{2}:\d{2}:\d{2})(\.\d+)?([Zz]|[+-]\d{2}:\d{2})", text)
    if not match:
        raise KeyLayoutError(f"{text[:64]!r} is not an RFC 3339 timestamp")
    base, fraction, zone = match.groups()
    micro = (fraction or ".0")[1:7].ljust(6, "0")
    zone = "+00:00" if zone in ("Z", "z") else zone
    try:
        return datetime.datetime.fromisoformat(f"{base.replace('t', 'T').replace(' ', 'T')}.{micro}{zone}")
    except ValueError as exc:
        raise KeyLayoutError(f"{text[:64]!r} is not an RFC 3339 timestamp: {exc}") from None


@dataclass(frozen=True)
class ClusterConfig:
    """``cilium/cluster-config/<cluster>``: Cilium's CiliumClusterConfig."""

    id: int
    synced_canaries: bool = True
    cached: bool = False
    max_connected_clusters: int = DEFAULT_MAX_CONNECTED_CLUSTERS

    def __post_init__(self):
        if self.max_connected_clusters not in VALID_MAX_CONNECTED_CLUSTERS:
            raise KeyLayoutError(
                f"maxConnectedClusters {self.max_connected_clusters!r} is invalid; "
                f"use one of {', '.join(map(str, VALID_MAX_CONNECTED_CLUSTERS))}"
            )
        if isinstance(self.id, bool) or not isinstance(self.id, int):
            raise KeyLayoutError(f"cluster id must be an integer, got {self.id!r}")
        if not 1 <= self.id <= self.max_connected_clusters:
            raise KeyLayoutError(
                f"cluster id {self.id} is outside 1..{self.max_connected_clusters} "
                f"(maxConnectedClusters {self.max_connected_clusters})"
            )
        for name in ("synced_canaries", "cached"):
            if not isinstance(getattr(self, name), bool):
                raise KeyLayoutError(f"cluster config {name} must be a boolean, got {getattr(self, name)!r}")


def encode_cluster_config(config: ClusterConfig) -> bytes:
    data = {
        "id": config.id,
        "capabilities": {
            "syncedCanaries": config.synced_canaries,
            "cached": config.cached,
            "maxConnectedClusters": config.max_connected_clusters,
        },
    }
    return json.dumps(data, separators=(",", ":")).encode()


def decode_cluster_config(value: bytes | str) -> ClusterConfig:
    """Decode and validate a cluster config; unknown fields are ignored (newer Cilium adds some).

    Missing capabilities take Cilium's zero values (no synced canaries, not cached) and a missing
    or zero ``maxConnectedClusters`` means the default 255.
    """
    try:
        data = json.loads(value)
    except (ValueError, TypeError) as exc:
        raise KeyLayoutError(f"cluster config is not valid JSON: {exc}") from None
    if not isinstance(data, dict):
        raise KeyLayoutError(f"cluster config must be a JSON object, got {type(data).__name__}")
    if "id" not in data:
        raise KeyLayoutError("cluster config has no 'id'")
    caps = data.get("capabilities")
    caps = {} if caps is None else caps
    if not isinstance(caps, dict):
        raise KeyLayoutError(f"cluster config 'capabilities' must be an object, got {type(caps).__name__}")
    max_clusters = caps.get("maxConnectedClusters") or DEFAULT_MAX_CONNECTED_CLUSTERS
    return ClusterConfig(
        id=data["id"],
        synced_canaries=caps.get("syncedCanaries", False),
        cached=caps.get("cached", False),
        max_connected_clusters=max_clusters,
    )


# --------------------------------------------------------------------------------------------
# clustermesh.core's own keys: service declarations (clusters without Kubernetes)
# --------------------------------------------------------------------------------------------
#
#   cilium/clustermesh-core/services/v1/<namespace>/<name>    service declaration JSON (services.py)
#
# Under ``cilium/`` because a node's admin user may write only there (etcd_auth.desired_auth), but
# outside everything a remote cluster may read (control_plane.remote_read_keys): a declaration is
# this cluster's own configuration; what remote clusters see is the ClusterService under
# ``cilium/state/services/v1/``.  Cilium itself uses nothing under ``cilium/clustermesh-core/``.

OWN_PREFIX = "cilium/clustermesh-core/"
SERVICE_DECLARATIONS_PREFIX = "cilium/clustermesh-core/services/v1/"


@dataclass(frozen=True)
class ServiceDeclarationKey:
    namespace: str
    name: str


def service_declarations_prefix(namespace: str | None = None) -> str:
    if namespace is None:
        return SERVICE_DECLARATIONS_PREFIX
    return f"{SERVICE_DECLARATIONS_PREFIX}{validate_dns_label(namespace, 'namespace')}/"


def service_declaration_key(namespace: str, name: str) -> str:
    return f"{service_declarations_prefix(namespace)}{validate_dns_label(name, 'service name')}"


def parse_service_declaration_key(key: str) -> ServiceDeclarationKey:
    """``cilium/clustermesh-core/services/v1/<namespace>/<name>`` -> ServiceDeclarationKey."""
    rest = _strip_prefix(key, SERVICE_DECLARATIONS_PREFIX, "service declaration")
    namespace, name = _split_exact(
        rest, 2, key, "service declaration", "cilium/clustermesh-core/services/v1/<namespace>/<name>"
    )
    return ServiceDeclarationKey(validate_dns_label(namespace, "namespace"), validate_dns_label(name, "service name"))


# --------------------------------------------------------------------------------------------
# clustermesh.core's own keys: network policies imported into this cluster
# --------------------------------------------------------------------------------------------
#
#   cilium/clustermesh-core/policies/v1/<namespace>/<Kind>/<name>   policy JSON (policy.encode_policy)
#
# <Kind> is CiliumNetworkPolicy or NetworkPolicy, spelled as in the document.  Like the service
# declarations, outside everything a remote cluster may read: policies are not propagated, each
# cluster imports the ones it wants (module network_policy) and its node agents enforce them.

POLICIES_PREFIX = OWN_PREFIX + "policies/v1/"
POLICY_KINDS = ("CiliumNetworkPolicy", "NetworkPolicy")
POLICY_NAME_MAX = 253
# Kubernetes object names are DNS subdomains: DNS labels joined by '.'.
_DNS_SUBDOMAIN_RE = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$")


@dataclass(frozen=True)
class PolicyKey:
    namespace: str
    kind: str
    name: str

    @property
    def ref(self) -> str:
        """``<namespace>/<Kind>/<name>``, as ``policy.Policy.ref``."""
        return f"{self.namespace}/{self.kind}/{self.name}"


def validate_policy_kind(kind: str) -> str:
    if kind not in POLICY_KINDS:
        raise KeyLayoutError(f"policy kind {kind!r} is not {' or '.join(POLICY_KINDS)}")
    return kind


def validate_policy_name(name: str) -> str:
    if not isinstance(name, str) or not name:
        raise KeyLayoutError(f"policy name must be a non-empty string, got {name!r}")
    if len(name) > POLICY_NAME_MAX or not _DNS_SUBDOMAIN_RE.match(name):
        raise KeyLayoutError(
            f"policy name {name!r} is not a DNS subdomain (lower-case letters, digits, '-' and '.', "
            f"at most {POLICY_NAME_MAX} characters, starting and ending with a letter or digit)"
        )
    return name


def policies_prefix(namespace: str | None = None) -> str:
    if namespace is None:
        return POLICIES_PREFIX
    return f"{POLICIES_PREFIX}{validate_dns_label(namespace, 'namespace')}/"


def policy_key(namespace: str, kind: str, name: str) -> str:
    return f"{policies_prefix(namespace)}{validate_policy_kind(kind)}/{validate_policy_name(name)}"


def parse_policy_key(key: str) -> PolicyKey:
    """``cilium/clustermesh-core/policies/v1/<namespace>/<Kind>/<name>`` -> PolicyKey."""
    rest = _strip_prefix(key, POLICIES_PREFIX, "policy")
    namespace, kind, name = _split_exact(
        rest, 3, key, "policy", "cilium/clustermesh-core/policies/v1/<namespace>/<Kind>/<name>"
    )
    return PolicyKey(validate_dns_label(namespace, "namespace"), validate_policy_kind(kind), validate_policy_name(name))


# --------------------------------------------------------------------------------------------
# clustermesh.core's own keys: the node agents' coordination inside one cluster
# --------------------------------------------------------------------------------------------
#
#   cilium/clustermesh-core/backends/v1/<namespace>/<name>/<node>   healthy backends of a service on
#                                                                   one node (services.encode_backend_slice),
#                                                                   under that node agent's lease
#   cilium/clustermesh-core/leader/v1/service-export               the node whose agent publishes the
#                                                                   cluster's ClusterServices and heartbeat
#
# Like the declarations, invisible to remote clusters: they see only the merged ClusterService.

BACKEND_SLICES_PREFIX = OWN_PREFIX + "backends/v1/"
SERVICE_EXPORT_LEADER_KEY = OWN_PREFIX + "leader/v1/service-export"


@dataclass(frozen=True)
class BackendSliceKey:
    namespace: str
    name: str
    node: str


def backend_slice_key(namespace: str, name: str, node: str) -> str:
    return (
        f"{BACKEND_SLICES_PREFIX}{validate_dns_label(namespace, 'namespace')}/"
        f"{validate_dns_label(name, 'service name')}/{validate_node_name(node)}"
    )


def parse_backend_slice_key(key: str) -> BackendSliceKey:
    """``cilium/clustermesh-core/backends/v1/<namespace>/<name>/<node>`` -> BackendSliceKey."""
    rest = _strip_prefix(key, BACKEND_SLICES_PREFIX, "backend slice")
    namespace, name, node = _split_exact(
        rest, 3, key, "backend slice", "cilium/clustermesh-core/backends/v1/<namespace>/<name>/<node>"
    )
    return BackendSliceKey(
        validate_dns_label(namespace, "namespace"), validate_dns_label(name, "service name"), validate_node_name(node)
    )
