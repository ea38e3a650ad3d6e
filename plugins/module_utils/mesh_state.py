# -*- coding: utf-8 -*-
# Copyright: clustermesh.core contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""The node agent's kvstore values in Cilium's exact formats: nodes, ipcache entries, identities.

Three values (keys in :mod:`kvstore_layout`):

* the **node** record, ``cilium/state/nodes/v1/<cluster>/<node>``: Cilium's ``nodeTypes.Node``
  marshalled by Go's ``encoding/json`` (:class:`NodeRecord`, :func:`encode_node`, :func:`decode_node`).
  ``IPv4AllocCIDR`` is a Go ``*net.IPNet``: ``{"IP": "10.1.0.0", "Mask": "////AA=="}`` (the mask
  base64 bytes), ``null`` when unset; unset ``net.IP`` fields are ``""``;
* the **ipcache entry**, ``cilium/state/ip/v1/default/<ip>``: Cilium's ``identity.IPIdentityPair``
  (:class:`IPCacheEntry`, :func:`encode_ipcache_entry`, :func:`decode_ipcache_entry`). ``Mask`` is
  ``null`` for a host address and base64 mask bytes for a prefix; ``HostIP`` is the tunnel endpoint;
* the **identity** label string, ``cilium/state/identities/v1/id/<ID>``: ``source:key=value;`` per
  label, sorted by key, each ending in ``;`` (Cilium's ``Labels.SortedList()``), e.g.
  ``k8s:io.cilium.k8s.policy.cluster=cluster1;k8s:name=x-wing;`` (:func:`identity_label_string`,
  :func:`build_label_string`, :func:`parse_label_string`, :func:`decode_identity`).

Decoders take values read from a (possibly remote, possibly hostile) kvstore and raise
:class:`StateError` (a ``ValueError``) whose message is the reason; the agent logs, counts and
skips.  Given the place a value was read from (the cluster of a remote kvstore and its ID) they
also reject what does not belong there: a node whose ``Cluster``/``ClusterID``/``Name`` differ
from its key and connection, an ipcache entry whose identity is outside that cluster's identity
range, an identity without that cluster's ``io.cilium.k8s.policy.cluster`` label.  Unknown JSON
fields are ignored (newer Cilium versions add some).  :func:`decode_remote_value` is the one
entry point for any key/value read from a remote cluster (ClusterServices included, decoded by
:mod:`services`).  Pure: no I/O, no Ansible.
"""

from __future__ import annotations

import base64
import ipaddress
import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from .kvstore_layout import (
    IDENTITY_ID_PREFIX,
    IP_PREFIX,
    NODES_PREFIX,
    SERVICES_PREFIX,
    KeyLayoutError,
    canonical_ip,
    parse_identity_key,
    parse_ip_key,
    parse_node_key,
    parse_service_key,
    validate_cluster_name,
    validate_node_name,
)
from .mesh_model import (
    DEFAULT_MAX_CONNECTED_CLUSTERS,
    _is_int,
    cluster_id_error,
    cluster_identity_range,
    identity_in_cluster_range,
)
from .services import ServiceError, decode_cluster_service, label_key_error, label_value_error
from .services import _load_object as load_json_object

CLUSTER_LABEL = "io.cilium.k8s.policy.cluster"
NAMESPACE_LABEL = "io.kubernetes.pod.namespace"  # the pod's namespace, as Cilium labels endpoints
NAMESPACE_LABELS_PREFIX = "io.cilium.k8s.namespace.labels."  # + a label of the pod's namespace
DEFAULT_LABEL_SOURCE = "k8s"
NODE_SOURCE_LOCAL = "local"

# addressing.AddressType values (pkg/node/addressing); others are kept as read.
ADDRESS_INTERNAL_IP = "InternalIP"
ADDRESS_EXTERNAL_IP = "ExternalIP"
ADDRESS_CILIUM_INTERNAL_IP = "CiliumInternalIP"
ADDRESS_TYPES = (ADDRESS_INTERNAL_IP, ADDRESS_EXTERNAL_IP, ADDRESS_CILIUM_INTERNAL_IP, "Hostname")

_UINT8_MAX = 255
_UINT32_MAX = (1 << 32) - 1


class StateError(ValueError):
    """A node record, ipcache entry or identity is invalid; the message names the field and why."""


def _fail(where: str, message: str) -> StateError:
    return StateError(f"{where}: {message}" if where else message)


def _load_object(value: bytes | str, what: str) -> dict[str, Any]:
    try:
        return load_json_object(value, what)
    except ServiceError as exc:
        raise StateError(str(exc)) from None


def _dumps(data: Any) -> bytes:
    return json.dumps(data, separators=(",", ":")).encode()


def _uint(value: Any, where: str, maximum: int) -> int:
    if not _is_int(value) or not 0 <= value <= maximum:
        raise _fail(where, f"must be an integer in 0..{maximum}, got {value!r}")
    return value


def _string(value: Any, where: str) -> str:
    if not isinstance(value, str):
        raise _fail(where, f"must be a string, got {type(value).__name__}")
    return value


# --- Go net.IP / net.IPMask / *net.IPNet -------------------------------------------------------------


def _ip(value: Any, where: str, *, allow_empty: bool = False) -> str:
    """A Go ``net.IP`` as JSON text -> canonical address text ('' when empty and allowed)."""
    if value is None or value == "":
        if allow_empty:
            return ""
        raise _fail(where, "is missing (an IP address is required)")
    if not isinstance(value, str):
        raise _fail(where, f"must be an IP address string, got {type(value).__name__}")
    try:
        return str(ipaddress.ip_address(value))
    except ValueError:
        raise _fail(where, f"{value!r} is not an IP address") from None


def encode_mask(prefixlen: int, version: int) -> str:
    """A Go ``net.IPMask`` as JSON (base64 of the mask bytes): /24 in IPv4 -> ``////AA==``."""
    width = 32 if version == 4 else 128
    bits = ((1 << width) - 1) ^ ((1 << (width - prefixlen)) - 1)
    return base64.b64encode(bits.to_bytes(width // 8, "big")).decode()


def decode_mask(value: Any, where: str, version: int) -> int:
    """base64 mask bytes -> prefix length, for an address of IP ``version``."""
    if not isinstance(value, str):
        raise _fail(where, f"must be a base64 IP mask string, got {type(value).__name__}")
    try:
        raw = base64.b64decode(value, validate=True)
    except ValueError:
        raise _fail(where, f"{value!r} is not base64") from None
    width = 4 if version == 4 else 16
    if len(raw) == 16 and version == 4 and raw[:12] == b"\xff" * 12:
        raw = raw[12:]  # Go may write a 16-byte mask for an IPv4 network
    if len(raw) != width:
        raise _fail(where, f"{value!r} is a {len(raw)}-byte mask; an IPv{version} mask has {width} bytes")
    number = int.from_bytes(raw, "big")
    ones = bin(number).count("1")
    if number != ((1 << (width * 8)) - 1) ^ ((1 << (width * 8 - ones)) - 1):
        raise _fail(where, f"{value!r} is not a contiguous network mask")
    return ones


def _net_to_json(cidr: str | None) -> dict[str, str] | None:
    if cidr is None:
        return None
    net = ipaddress.ip_network(cidr)
    return {"IP": str(net.network_address), "Mask": encode_mask(net.prefixlen, net.version)}


def _net_from_json(value: Any, where: str, version: int) -> str | None:
    """A Go ``*net.IPNet`` (``{"IP", "Mask"}``; a ``"10.0.0.0/24"`` string is accepted too) -> CIDR text."""
    if value is None:
        return None
    if isinstance(value, str):
        try:
            net = ipaddress.ip_network(value, strict=True)
        except ValueError as exc:
            raise _fail(where, f"{value!r} is not a network prefix: {exc}") from None
    elif isinstance(value, dict):
        address = _ip(value.get("IP"), f"{where}.IP")
        ip_version = ipaddress.ip_address(address).version
        prefixlen = decode_mask(value.get("Mask"), f"{where}.Mask", ip_version)
        try:
            net = ipaddress.ip_network(f"{address}/{prefixlen}", strict=True)
        except ValueError:
            raise _fail(where, f"{address}/{prefixlen} has host bits set") from None
    else:
        raise _fail(where, f"must be an object {{'IP', 'Mask'}} or null, got {type(value).__name__}")
    if net.version != version:
        raise _fail(where, f"{net} is not an IPv{version} prefix")
    return str(net)


def _cidr(value: Any, where: str, version: int) -> str | None:
    """Validate a CIDR given to a builder (text) -> canonical text or None."""
    if value is None:
        return None
    try:
        net = ipaddress.ip_network(value, strict=True)
    except (ValueError, TypeError) as exc:
        raise _fail(where, f"{value!r} is not a network prefix: {exc}") from None
    if net.version != version:
        raise _fail(where, f"{net} is not an IPv{version} prefix")
    return str(net)


# --- identity labels ---------------------------------------------------------------------------------


@dataclass(frozen=True, order=True, slots=True)
class Label:
    """One Cilium label: ``source:key=value``."""

    key: str
    value: str
    source: str = DEFAULT_LABEL_SOURCE

    def __str__(self) -> str:
        return f"{self.source}:{self.key}={self.value};"


def _label_part_error(source: str, key: str, value: str) -> str | None:
    if not source or not source.replace("-", "").isalnum() or not source.isascii() or source != source.lower():
        return f"label source {source!r} is invalid (lower-case letters, digits and '-', e.g. 'k8s')"
    if not key or any(ch in key for ch in ";=") or not key.isprintable() or " " in key:
        return f"label key {key!r} is invalid (non-empty, no ';', '=' or spaces)"
    if ";" in value or not value.isprintable():
        return f"label value {value!r} of {key!r} is invalid (no ';')"
    return None


def build_label_string(labels: Iterable[Label]) -> str:
    """Cilium's kvstore form of a label set: sorted by key, each ``source:key=value;``."""
    items = sorted(labels, key=lambda label: label.key)
    seen: set[str] = set()
    for label in items:
        reason = _label_part_error(label.source, label.key, label.value)
        if reason:
            raise StateError(reason)
        if label.key in seen:
            raise StateError(f"label key {label.key!r} appears twice (a label set has one value per key)")
        seen.add(label.key)
    return "".join(str(label) for label in items)


def parse_label_string(text: bytes | str, *, strict: bool = True) -> tuple[Label, ...]:
    """Parse ``k8s:a=1;k8s:b=2;`` -> labels sorted by key.

    Each label needs ``source:``, ``key=``, and a final ``;``; keys are unique.  With ``strict``
    the text must be in canonical (sorted) form, as Cilium writes it, so one label set has one
    string (the allocator compares strings).
    """
    if isinstance(text, bytes):
        try:
            text = text.decode("utf-8")
        except UnicodeDecodeError:
            raise StateError("label string is not UTF-8") from None
    if not isinstance(text, str) or not text:
        raise StateError(f"label string must be a non-empty string, got {text!r}")
    if not text.endswith(";"):
        raise StateError(f"label string {text[:80]!r} must end with ';'")
    labels = []
    for part in text[:-1].split(";"):
        source, sep, rest = part.partition(":")
        key, sep2, value = rest.partition("=")
        if not sep or not sep2:
            raise StateError(f"label {part[:80]!r} is not 'source:key=value'")
        reason = _label_part_error(source, key, value)
        if reason:
            raise StateError(reason)
        labels.append(Label(key, value, source))
    canonical = build_label_string(labels)  # also rejects duplicate keys
    if strict and canonical != text:
        raise StateError(f"label string {text[:80]!r} is not in canonical sorted form ({canonical[:80]!r})")
    return tuple(sorted(labels, key=lambda label: label.key))


def labels_as_dict(labels: Iterable[Label]) -> dict[str, str]:
    """``{key: value}`` of a label set (sources dropped)."""
    return {label.key: label.value for label in labels}


def _split_label_key(key: str) -> tuple[str, str]:
    """``k8s:name`` -> (k8s, name); ``name`` -> (k8s, name).  Both spellings are accepted."""
    source, sep, rest = key.partition(":")
    if sep and source and source.replace("-", "").isalnum() and source == source.lower():
        return source, rest
    return DEFAULT_LABEL_SOURCE, key


def identity_labels(cluster: str, labels: Mapping[str, str] | None) -> tuple[Label, ...]:
    """The labels of an endpoint's identity: ``labels`` (Kubernetes keys and values, optionally
    written ``k8s:key``) plus ``io.cilium.k8s.policy.cluster=<cluster>``."""
    validate_cluster_name(cluster, "cluster")
    if labels is None:
        labels = {}
    if not isinstance(labels, Mapping):
        raise StateError(f"labels must be a mapping of label keys to values, got {type(labels).__name__}")
    result: dict[str, Label] = {}
    for raw_key, value in labels.items():
        if not isinstance(raw_key, str):
            raise StateError(f"label key {raw_key!r} must be a string")
        source, key = _split_label_key(raw_key)
        reason = label_key_error(key)
        if reason:
            raise StateError(f"label key {raw_key!r} {reason}")
        reason = label_value_error(value)
        if reason:
            raise StateError(f"label value {value!r} of {raw_key!r} {reason}")
        if key in result:
            raise StateError(f"label key {key!r} is given twice ({raw_key!r})")
        if key == CLUSTER_LABEL and value != cluster:
            raise StateError(
                f"label {CLUSTER_LABEL}={value!r} contradicts the cluster {cluster!r}; leave it out (it is added)"
            )
        result[key] = Label(key, value, source)
    result[CLUSTER_LABEL] = Label(CLUSTER_LABEL, cluster, DEFAULT_LABEL_SOURCE)
    return tuple(sorted(result.values(), key=lambda label: label.key))


def identity_label_string(cluster: str, labels: Mapping[str, str] | None) -> str:
    """The canonical label string of an endpoint's identity in ``cluster`` (see :func:`identity_labels`)."""
    return build_label_string(identity_labels(cluster, labels))


@dataclass(frozen=True, slots=True)
class Identity:
    id: int
    labels: tuple[Label, ...]
    label_string: str

    @property
    def cluster(self) -> str | None:
        return labels_as_dict(self.labels).get(CLUSTER_LABEL)


def decode_identity(
    key: str,
    value: bytes | str,
    *,
    cluster: str | None = None,
    cluster_id: int | None = None,
    max_connected: int = DEFAULT_MAX_CONNECTED_CLUSTERS,
) -> Identity:
    """``cilium/state/identities/v1/id/<ID>`` and its label string -> :class:`Identity`.

    Given the ``cluster`` (and its ``cluster_id``) the value was read from, the identity must
    carry that cluster's label and lie in its identity range.
    """
    try:
        number = parse_identity_key(key)
    except KeyLayoutError as exc:
        raise StateError(str(exc)) from None
    labels = parse_label_string(value)
    text = build_label_string(labels)
    where = f"identity {number}"
    if cluster_id is not None and not identity_in_cluster_range(number, cluster_id, max_connected):
        first, last = cluster_identity_range(cluster_id, max_connected)
        raise _fail(where, f"is outside the identity range {first}..{last} of cluster ID {cluster_id}")
    if cluster is not None:
        found = labels_as_dict(labels).get(CLUSTER_LABEL)
        if found != cluster:
            raise _fail(where, f"label {CLUSTER_LABEL} is {found!r}, not {cluster!r} where it was read")
    return Identity(number, labels, text)


# --- node record -------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class NodeAddress:
    type: str
    ip: str


@dataclass(frozen=True, slots=True)
class NodeRecord:
    """Cilium's ``nodeTypes.Node`` (the fields this project uses; the rest are written as zero values)."""

    name: str
    cluster: str
    cluster_id: int
    addresses: tuple[NodeAddress, ...]
    ipv4_alloc_cidr: str | None = None
    ipv6_alloc_cidr: str | None = None
    ipv4_health_ip: str = ""
    ipv6_health_ip: str = ""
    encryption_key: int = 0
    labels: Mapping[str, str] = field(default_factory=dict)
    boot_id: str = ""
    source: str = NODE_SOURCE_LOCAL

    def address(self, type_: str = ADDRESS_INTERNAL_IP, version: int | None = None) -> str | None:
        """The first address of ``type_`` (and IP ``version``), or None."""
        for addr in self.addresses:
            if addr.type == type_ and (version is None or ipaddress.ip_address(addr.ip).version == version):
                return addr.ip
        return None


def make_node_record(
    name: str,
    cluster: str,
    cluster_id: int,
    addresses: Iterable[tuple[str, str]] | Iterable[NodeAddress],
    *,
    ipv4_alloc_cidr: str | None = None,
    ipv6_alloc_cidr: str | None = None,
    ipv4_health_ip: str = "",
    ipv6_health_ip: str = "",
    encryption_key: int = 0,
    labels: Mapping[str, str] | None = None,
    boot_id: str = "",
    max_connected: int = DEFAULT_MAX_CONNECTED_CLUSTERS,
) -> NodeRecord:
    """A validated :class:`NodeRecord`.

    ``addresses`` are ``(type, ip)`` pairs, e.g. ``("InternalIP", "198.18.1.11")``.
    """
    try:
        validate_node_name(name)
        validate_cluster_name(cluster, "cluster")
    except KeyLayoutError as exc:
        raise StateError(str(exc)) from None
    reason = cluster_id_error(cluster_id, max_connected)
    if reason:
        raise _fail("cluster_id", f"{cluster_id!r} {reason}")
    addrs = []
    for index, item in enumerate(addresses):
        type_, ip = (item.type, item.ip) if isinstance(item, NodeAddress) else item
        type_ = _string(type_, f"addresses[{index}].type")
        if type_ not in ADDRESS_TYPES:
            raise _fail(f"addresses[{index}].type", f"{type_!r} is not one of {', '.join(ADDRESS_TYPES)}")
        addrs.append(NodeAddress(type_, _ip(ip, f"addresses[{index}].ip")))
    if not any(addr.type == ADDRESS_INTERNAL_IP for addr in addrs):
        raise _fail("addresses", "need at least one InternalIP (the node's underlay address)")
    return NodeRecord(
        name=name,
        cluster=cluster,
        cluster_id=cluster_id,
        addresses=tuple(addrs),
        ipv4_alloc_cidr=_cidr(ipv4_alloc_cidr, "ipv4_alloc_cidr", 4),
        ipv6_alloc_cidr=_cidr(ipv6_alloc_cidr, "ipv6_alloc_cidr", 6),
        ipv4_health_ip=_ip(ipv4_health_ip, "ipv4_health_ip", allow_empty=True),
        ipv6_health_ip=_ip(ipv6_health_ip, "ipv6_health_ip", allow_empty=True),
        encryption_key=_uint(encryption_key, "encryption_key", _UINT8_MAX),
        labels=_string_map(labels, "labels"),
        boot_id=_string(boot_id, "boot_id"),
    )


def _string_map(value: Any, where: str) -> dict[str, str]:
    if value is None:
        return {}
    if not isinstance(value, Mapping) or not all(isinstance(k, str) and isinstance(v, str) for k, v in value.items()):
        raise _fail(where, "must be a mapping of strings to strings")
    return dict(value)


def node_to_dict(node: NodeRecord) -> dict[str, Any]:
    """The node as Go's ``encoding/json`` writes ``nodeTypes.Node`` (field order as declared)."""
    return {
        "Name": node.name,
        "Cluster": node.cluster,
        "IPAddresses": [{"Type": addr.type, "IP": addr.ip} for addr in node.addresses],
        "IPv4AllocCIDR": _net_to_json(node.ipv4_alloc_cidr),
        "IPv4SecondaryAllocCIDRs": None,
        "IPv6AllocCIDR": _net_to_json(node.ipv6_alloc_cidr),
        "IPv6SecondaryAllocCIDRs": None,
        "IPv4HealthIP": node.ipv4_health_ip,
        "IPv6HealthIP": node.ipv6_health_ip,
        "IPv4IngressIP": "",
        "IPv6IngressIP": "",
        "ClusterID": node.cluster_id,
        "Source": node.source,
        "EncryptionKey": node.encryption_key,
        "Labels": dict(node.labels),
        "Annotations": None,
        "NodeIdentity": 0,
        "WireguardPubKey": "",
        "BootID": node.boot_id,
    }


def encode_node(node: NodeRecord) -> bytes:
    return _dumps(node_to_dict(node))


def decode_node(
    value: bytes | str,
    *,
    key: str | None = None,
    cluster: str | None = None,
    cluster_id: int | None = None,
    max_connected: int = DEFAULT_MAX_CONNECTED_CLUSTERS,
) -> NodeRecord:
    """Decode and validate a node record.

    ``key`` (``cilium/state/nodes/v1/<cluster>/<node>``): ``Cluster`` and ``Name`` must match it.
    ``cluster`` / ``cluster_id``: where it was read (the remote cluster's name and ID from its
    cluster config); ``Cluster`` and ``ClusterID`` must match them.
    """
    data = _load_object(value, "node")
    name = data.get("Name")
    where = f"node {name!r}" if isinstance(name, str) else "node"
    try:
        validate_node_name(name)
        validate_cluster_name(data.get("Cluster"), "Cluster")
    except KeyLayoutError as exc:
        raise _fail(where, str(exc)) from None
    node_cluster = data["Cluster"]
    node_id = data.get("ClusterID", 0)
    if not _is_int(node_id):
        raise _fail(where, f"ClusterID must be an integer, got {node_id!r}")
    reason = cluster_id_error(node_id, max_connected)
    if reason:
        raise _fail(where, f"ClusterID {node_id!r} {reason}")
    if key is not None:
        try:
            parsed = parse_node_key(key)
        except KeyLayoutError as exc:
            raise StateError(str(exc)) from None
        if (parsed.cluster, parsed.name) != (node_cluster, name):
            raise _fail(where, f"Cluster/Name {node_cluster}/{name} do not match its key {key!r}")
    if cluster is not None and node_cluster != cluster:
        raise _fail(where, f"Cluster is {node_cluster!r} but it was read from cluster {cluster!r}")
    if cluster_id is not None and node_id != cluster_id:
        raise _fail(where, f"ClusterID is {node_id} but cluster {node_cluster!r} has ID {cluster_id}")
    raw_addresses = data.get("IPAddresses") or []
    if not isinstance(raw_addresses, list):
        raise _fail(where, f"IPAddresses must be a list, got {type(raw_addresses).__name__}")
    addresses = []
    for index, item in enumerate(raw_addresses):
        at = f"{where}: IPAddresses[{index}]"
        if not isinstance(item, dict):
            raise StateError(f"{at} must be an object {{'Type', 'IP'}}")
        # very old agents wrote "AddressType"
        type_ = _string(item.get("Type", item.get("AddressType")), f"{at}.Type")
        addresses.append(NodeAddress(type_, _ip(item.get("IP"), f"{at}.IP")))
    labels = data.get("Labels")
    return NodeRecord(
        name=name,
        cluster=node_cluster,
        cluster_id=node_id,
        addresses=tuple(addresses),
        ipv4_alloc_cidr=_net_from_json(data.get("IPv4AllocCIDR"), f"{where}: IPv4AllocCIDR", 4),
        ipv6_alloc_cidr=_net_from_json(data.get("IPv6AllocCIDR"), f"{where}: IPv6AllocCIDR", 6),
        ipv4_health_ip=_ip(data.get("IPv4HealthIP"), f"{where}: IPv4HealthIP", allow_empty=True),
        ipv6_health_ip=_ip(data.get("IPv6HealthIP"), f"{where}: IPv6HealthIP", allow_empty=True),
        encryption_key=_uint(data.get("EncryptionKey", 0), f"{where}: EncryptionKey", _UINT8_MAX),
        labels=_string_map(labels, f"{where}: Labels"),
        boot_id=_string(data.get("BootID", ""), f"{where}: BootID"),
        source=_string(data.get("Source", ""), f"{where}: Source"),
    )


# --- ipcache entry -----------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class IPCacheEntry:
    """Cilium's ``identity.IPIdentityPair``: an endpoint IP (or prefix) -> identity and tunnel endpoint."""

    ip: str  # canonical address, or prefix text for a prefix entry
    id: int
    host_ip: str = ""
    key: int = 0  # encryption key index
    metadata: str = ""
    k8s_namespace: str = ""
    k8s_pod_name: str = ""

    @property
    def prefix(self) -> str:
        """The entry as a prefix (``10.1.0.5/32`` for a host entry)."""
        return str(ipaddress.ip_network(self.ip))


def make_ipcache_entry(
    ip: str,
    identity: int,
    host_ip: str,
    *,
    key: int = 0,
    metadata: str = "",
    k8s_namespace: str = "",
    k8s_pod_name: str = "",
) -> IPCacheEntry:
    """A validated :class:`IPCacheEntry` (``ip`` an address or prefix; ``host_ip`` the node's tunnel endpoint)."""
    try:
        text = canonical_ip(ip)
    except KeyLayoutError as exc:
        raise _fail("ip", str(exc)) from None
    if "/" in text and ipaddress.ip_network(text).prefixlen == ipaddress.ip_network(text).max_prefixlen:
        text = str(ipaddress.ip_network(text).network_address)  # a /32 is the host entry
    if not _is_int(identity) or not 1 <= identity <= _UINT32_MAX:
        raise _fail("identity", f"must be a positive integer, got {identity!r}")
    return IPCacheEntry(
        ip=text,
        id=identity,
        host_ip=_ip(host_ip, "host_ip", allow_empty=True),
        key=_uint(key, "key", _UINT8_MAX),
        metadata=_string(metadata, "metadata"),
        k8s_namespace=_string(k8s_namespace, "k8s_namespace"),
        k8s_pod_name=_string(k8s_pod_name, "k8s_pod_name"),
    )


def ipcache_entry_to_dict(entry: IPCacheEntry) -> dict[str, Any]:
    """As Go writes ``IPIdentityPair`` (``K8sNamespace``/``K8sPodName`` omitted when empty)."""
    if "/" in entry.ip:
        net = ipaddress.ip_network(entry.ip)
        ip, mask = str(net.network_address), encode_mask(net.prefixlen, net.version)
    else:
        ip, mask = entry.ip, None
    data: dict[str, Any] = {
        "IP": ip,
        "Mask": mask,
        "HostIP": entry.host_ip,
        "ID": entry.id,
        "Key": entry.key,
        "Metadata": entry.metadata,
    }
    if entry.k8s_namespace:
        data["K8sNamespace"] = entry.k8s_namespace
    if entry.k8s_pod_name:
        data["K8sPodName"] = entry.k8s_pod_name
    return data


def encode_ipcache_entry(entry: IPCacheEntry) -> bytes:
    return _dumps(ipcache_entry_to_dict(entry))


def decode_ipcache_entry(
    value: bytes | str,
    *,
    key: str | None = None,
    cluster_id: int | None = None,
    max_connected: int = DEFAULT_MAX_CONNECTED_CLUSTERS,
) -> IPCacheEntry:
    """Decode and validate an ipcache entry.

    ``key`` (``cilium/state/ip/v1/<space>/<ip>``): the entry's IP (and mask) must be the key's.
    ``cluster_id``: the ID of the cluster it was read from; an identity outside that cluster's
    range is rejected (a cluster must not claim another cluster's identities).
    """
    data = _load_object(value, "ipcache entry")
    address = _ip(data.get("IP"), "ipcache entry: IP")
    where = f"ipcache entry {address}"
    mask = data.get("Mask")
    if mask is None:
        text = address
    else:
        version = ipaddress.ip_address(address).version
        prefixlen = decode_mask(mask, f"{where}: Mask", version)
        try:
            net = ipaddress.ip_network(f"{address}/{prefixlen}", strict=True)
        except ValueError:
            raise _fail(where, f"{address}/{prefixlen} has host bits set") from None
        text = str(net.network_address) if prefixlen == net.max_prefixlen else str(net)
        where = f"ipcache entry {text}"
    identity = data.get("ID")
    if not _is_int(identity) or not 1 <= identity <= _UINT32_MAX:
        raise _fail(where, f"ID must be a positive integer, got {identity!r}")
    if key is not None:
        try:
            key_ip = parse_ip_key(key).ip
        except KeyLayoutError as exc:
            raise StateError(str(exc)) from None
        if key_ip not in (text, f"{text}/{ipaddress.ip_network(text).max_prefixlen}"):
            raise _fail(where, f"does not match its key {key!r}")
    if cluster_id is not None and not identity_in_cluster_range(identity, cluster_id, max_connected):
        first, last = cluster_identity_range(cluster_id, max_connected)
        raise _fail(where, f"identity {identity} is outside the range {first}..{last} of cluster ID {cluster_id}")
    return IPCacheEntry(
        ip=text,
        id=identity,
        host_ip=_ip(data.get("HostIP"), f"{where}: HostIP", allow_empty=True),
        key=_uint(data.get("Key", 0), f"{where}: Key", _UINT8_MAX),
        metadata=_string(data.get("Metadata", ""), f"{where}: Metadata"),
        k8s_namespace=_string(data.get("K8sNamespace", ""), f"{where}: K8sNamespace"),
        k8s_pod_name=_string(data.get("K8sPodName", ""), f"{where}: K8sPodName"),
    )


# --- one entry point for values read from a remote cluster ------------------------------------------

KIND_NODE = "node"
KIND_IPCACHE = "ipcache"
KIND_IDENTITY = "identity"
KIND_SERVICE = "service"


@dataclass(frozen=True, slots=True)
class RemoteValue:
    kind: str  # KIND_NODE / KIND_IPCACHE / KIND_IDENTITY / KIND_SERVICE
    key: str
    value: Any  # NodeRecord / IPCacheEntry / Identity / services.ClusterService


def decode_remote_value(
    key: str,
    value: bytes | str,
    *,
    cluster: str,
    cluster_id: int,
    max_connected: int = DEFAULT_MAX_CONNECTED_CLUSTERS,
) -> RemoteValue:
    """Decode and validate a key/value read from cluster ``cluster`` (ID ``cluster_id``)'s kvstore.

    Nodes and services must be under that cluster's prefix and name it (and its ID); ipcache
    entries and identities must lie in its identity range; identities must carry its cluster
    label.  Raises :class:`StateError` with the reason (the caller logs, counts and skips).
    """
    try:
        if key.startswith(NODES_PREFIX):
            node_key = parse_node_key(key)
            if node_key.cluster != cluster:
                raise StateError(f"a node of cluster {node_key.cluster!r} in cluster {cluster!r}'s kvstore")
            node = decode_node(value, key=key, cluster=cluster, cluster_id=cluster_id, max_connected=max_connected)
            return RemoteValue(KIND_NODE, key, node)
        if key.startswith(IP_PREFIX):
            entry = decode_ipcache_entry(value, key=key, cluster_id=cluster_id, max_connected=max_connected)
            return RemoteValue(KIND_IPCACHE, key, entry)
        if key.startswith(IDENTITY_ID_PREFIX):
            identity = decode_identity(key, value, cluster=cluster, cluster_id=cluster_id, max_connected=max_connected)
            return RemoteValue(KIND_IDENTITY, key, identity)
        if key.startswith(SERVICES_PREFIX):
            svc_key = parse_service_key(key)
            if svc_key.cluster != cluster:
                raise StateError(f"a service of cluster {svc_key.cluster!r} in cluster {cluster!r}'s kvstore")
            svc = decode_cluster_service(
                value,
                cluster=cluster,
                cluster_id=cluster_id,
                namespace=svc_key.namespace,
                name=svc_key.name,
                max_connected=max_connected,
            )
            return RemoteValue(KIND_SERVICE, key, svc)
    except (KeyLayoutError, ServiceError, StateError) as exc:
        raise StateError(f"{key!r}: {exc}") from None
    raise StateError(f"{key!r} is not a node, ipcache, identity or service key")
