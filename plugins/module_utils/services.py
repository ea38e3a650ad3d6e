# -*- coding: utf-8 -*-
# Copyright: clustermesh.core contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""Global services: declarations, Cilium's ClusterService, annotations, selectors and the merge.

Two JSON documents live in a cluster's kvstore (docs/services.md):

* the **declaration** of a service (clusters without Kubernetes), ``cilium/clustermesh-core/services/v1/<ns>/<name>``,
  written by the ``global_service`` module and read by the cluster's own agent only
  (:class:`ServiceDeclaration`, :func:`encode_declaration`, :func:`decode_declaration`);
* the **ClusterService**, ``cilium/state/services/v1/<cluster>/<ns>/<name>``, in Cilium's exact format
  (pkg/clustermesh/store/store.go), which remote clusters read (:class:`ClusterService`,
  :func:`encode_cluster_service`, :func:`decode_cluster_service`).

Values read from a kvstore are validated strictly: :func:`decode_cluster_service` raises
:class:`ServiceError` (a ``ValueError``) whose message is the reason; the agent logs, counts and skips.

:func:`merge_service` computes, from the local declaration and the ClusterServices of all clusters,
the backends a node of this cluster load-balances each frontend to (shared and affinity semantics
as Cilium documents them).  Everything here is pure: no I/O, no Ansible.
"""

from __future__ import annotations

import ipaddress
import json
import math
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from .kvstore_layout import KeyLayoutError, validate_cluster_name, validate_dns_label
from .mesh_model import DEFAULT_MAX_CONNECTED_CLUSTERS, cluster_id_error

# --- annotations (pkg/annotation/k8s.go) -----------------------------------------------------------

ANNOTATION_GLOBAL = "service.cilium.io/global"
ANNOTATION_GLOBAL_ALIAS = "io.cilium/global-service"
ANNOTATION_SHARED = "service.cilium.io/shared"
ANNOTATION_SHARED_ALIAS = "io.cilium/shared-service"
ANNOTATION_AFFINITY = "service.cilium.io/affinity"
ANNOTATION_AFFINITY_ALIAS = "io.cilium/service-affinity"

AFFINITY_LOCAL = "local"
AFFINITY_REMOTE = "remote"
AFFINITY_NONE = "none"
AFFINITIES = (AFFINITY_LOCAL, AFFINITY_REMOTE, AFFINITY_NONE)

#: Protocols of a declared service (what the datapath load-balances).
PROTOCOLS = ("TCP", "UDP")
#: Protocols accepted in a remote ClusterService (Cilium's L4Type values that a service port can have).
REMOTE_PROTOCOLS = ("TCP", "UDP", "SCTP")

HEALTH_CHECK_TYPES = ("tcp", "http")
DEFAULT_HEALTH_CHECK = {
    "type": "tcp",
    "interval": 2.0,
    "timeout": 1.0,
    "healthy_threshold": 1,
    "unhealthy_threshold": 1,
}
DECLARATION_VERSION = 1

_LABEL_NAME_RE = re.compile(r"^[A-Za-z0-9]([-A-Za-z0-9_.]*[A-Za-z0-9])?$")
_DNS_SUBDOMAIN_RE = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$")
_LABEL_RULE = "is invalid: use at most 63 letters, digits, '-', '_' and '.', starting and ending with a letter or digit"
_HTTP_PATH_RE = re.compile(r"^/[\x21-\x7e]*$")


class ServiceError(ValueError):
    """A declaration or ClusterService is invalid; the message names the field, the value and why."""


def _fail(where: str, message: str) -> ServiceError:
    return ServiceError(f"{where}: {message}" if where else message)


def _load_object(value: bytes | str, what: str) -> dict[str, Any]:
    try:
        data = json.loads(value)
    except (ValueError, TypeError) as exc:
        raise ServiceError(f"{what} is not valid JSON: {exc}") from None
    if not isinstance(data, dict):
        raise ServiceError(f"{what} must be a JSON object, got {type(data).__name__}")
    return data


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


# --- annotations -------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ServiceOptions:
    """What the annotations of a service say: global, shared and affinity."""

    global_: bool = False
    shared: bool = False
    affinity: str = AFFINITY_NONE

    @property
    def exported(self) -> bool:
        """Whether this cluster publishes the service's backends for other clusters (global and shared)."""
        return self.global_ and self.shared


def _annotation(annotations: Mapping[str, str], key: str, alias: str) -> tuple[str, str] | None:
    """(key used, value) of an annotation given under its name or its older alias; both must agree."""
    found = [(k, annotations[k]) for k in (key, alias) if k in annotations]
    for k, value in found:
        if not isinstance(value, str):
            raise _fail(f"annotations[{k!r}]", f"must be a string, got {value!r}")
    if len(found) == 2 and found[0][1].strip().lower() != found[1][1].strip().lower():
        raise _fail(
            "annotations",
            f"{key}={found[0][1]!r} and its alias {alias}={found[1][1]!r} disagree; set only one of them",
        )
    return found[0] if found else None


def _bool_annotation(found: tuple[str, str] | None, default: bool) -> bool:
    if found is None:
        return default
    key, value = found
    text = value.strip().lower()
    if text not in ("true", "false"):
        raise _fail(f"annotations[{key!r}]", f'{value!r} is not a boolean; use "true" or "false"')
    return text == "true"


def parse_annotations(annotations: Mapping[str, str] | None) -> ServiceOptions:
    """Read global / shared / affinity from service annotations (names or their older aliases).

    ``shared`` defaults to the value of ``global``; ``affinity`` defaults to ``none``.  Values are
    compared case-insensitively as Cilium does; anything else raises :class:`ServiceError`.
    Annotations other than these three are ignored.
    """
    annotations = annotations or {}
    if not isinstance(annotations, Mapping):
        raise _fail("annotations", f"must be a mapping, got {type(annotations).__name__}")
    global_ = _bool_annotation(_annotation(annotations, ANNOTATION_GLOBAL, ANNOTATION_GLOBAL_ALIAS), False)
    shared = _bool_annotation(_annotation(annotations, ANNOTATION_SHARED, ANNOTATION_SHARED_ALIAS), global_)
    found = _annotation(annotations, ANNOTATION_AFFINITY, ANNOTATION_AFFINITY_ALIAS)
    affinity = AFFINITY_NONE
    if found is not None:
        affinity = found[1].strip().lower()
        if affinity not in AFFINITIES:
            raise _fail(
                f"annotations[{found[0]!r}]", f"{found[1]!r} is not an affinity; use one of {', '.join(AFFINITIES)}"
            )
    return ServiceOptions(global_=global_, shared=shared, affinity=affinity)


def options_annotations(options: ServiceOptions) -> dict[str, str]:
    """The canonical annotations (new names) that express ``options``."""
    return {
        ANNOTATION_GLOBAL: "true" if options.global_ else "false",
        ANNOTATION_SHARED: "true" if options.shared else "false",
        ANNOTATION_AFFINITY: options.affinity,
    }


# --- labels and selectors ----------------------------------------------------------------------------


def label_key_error(key: Any) -> str | None:
    """Why ``key`` is not a Kubernetes label key (``[prefix/]name``), or None."""
    if not isinstance(key, str) or not key:
        return "must be a non-empty string"
    prefix, sep, name = key.rpartition("/")
    if sep and (not prefix or len(prefix) > 253 or not _DNS_SUBDOMAIN_RE.match(prefix)):
        return "has an invalid prefix: use a DNS subdomain before '/'"
    if not name or len(name) > 63 or not _LABEL_NAME_RE.match(name):
        return (
            "is invalid: use at most 63 letters, digits, '-', '_' and '.', starting and ending with a letter or digit"
        )
    return None


def label_value_error(value: Any) -> str | None:
    """Why ``value`` is not a Kubernetes label value, or None."""
    if not isinstance(value, str):
        return f"must be a string, got {type(value).__name__}"
    if value and (len(value) > 63 or not _LABEL_NAME_RE.match(value)):
        return (
            "is invalid: use at most 63 letters, digits, '-', '_' and '.', starting and ending with a letter or digit"
        )
    return None


def validate_labels(labels: Any, where: str) -> dict[str, str]:
    """A copy of ``labels`` (a str -> str mapping of Kubernetes label keys and values), or ServiceError."""
    if labels is None:
        return {}
    if not isinstance(labels, Mapping):
        raise _fail(where, f"must be a mapping of label keys to values, got {type(labels).__name__}")
    for key, value in labels.items():
        reason = label_key_error(key)
        if reason:
            raise _fail(where, f"label key {key!r} {reason}")
        reason = label_value_error(value)
        if reason:
            raise _fail(f"{where}[{key!r}]", f"label value {value!r} {reason}")
    return dict(labels)


def selector_matches(selector: Mapping[str, str], labels: Mapping[str, str]) -> bool:
    """Whether an endpoint with ``labels`` is selected: every selector pair is among its labels.

    An empty selector selects nothing (a Kubernetes Service without selector gets no endpoints).
    """
    if not selector:
        return False
    return all(labels.get(key) == value for key, value in selector.items())


# --- ports and addresses -----------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class L4Addr:
    """Cilium's loadbalancer.L4Addr: ``{"Protocol": "TCP", "Port": 80}``."""

    protocol: str
    port: int

    def to_json(self) -> dict[str, Any]:
        return {"Protocol": self.protocol, "Port": self.port}


def _port_error(port: Any) -> str | None:
    if not _is_int(port):
        return f"{port!r} is not a port number (an integer from 1 to 65535)"
    if not 1 <= port <= 65535:
        return f"{port} is outside 1..65535"
    return None


def _parse_ip(value: Any, where: str) -> str:
    if not isinstance(value, str) or not value or value.strip() != value or "/" in value:
        raise _fail(where, f"{value!r} is not an IP address")
    try:
        return str(ipaddress.ip_address(value))
    except ValueError:
        raise _fail(where, f"{value!r} is not an IP address") from None


# --- declarations --------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ServicePort:
    name: str  # "" only when the service has a single port
    port: int
    protocol: str = "TCP"
    target_port: int | None = None  # backend port; None: same as port

    @property
    def backend_port(self) -> int:
        return self.target_port or self.port


@dataclass(frozen=True, slots=True)
class HealthCheck:
    type: str = "tcp"
    port: int | None = None  # None: the target port of the first service port
    path: str = "/"  # http only
    interval: float = 2.0
    timeout: float = 1.0
    healthy_threshold: int = 1
    unhealthy_threshold: int = 1


@dataclass(frozen=True, slots=True)
class ServiceDeclaration:
    """A service declared in a cluster's kvstore (the Kubernetes Service of clusters without Kubernetes)."""

    namespace: str
    name: str
    cluster_ip: str
    ports: tuple[ServicePort, ...]
    selector: Mapping[str, str] = field(default_factory=dict)
    options: ServiceOptions = field(default_factory=ServiceOptions)
    health_check: HealthCheck = field(default_factory=HealthCheck)

    @property
    def health_check_port(self) -> int:
        return self.health_check.port or self.ports[0].backend_port


def _validate_health_check(data: Any, where: str) -> HealthCheck:
    if data is None:
        data = {}
    if not isinstance(data, Mapping):
        raise _fail(where, f"must be a mapping, got {type(data).__name__}")
    unknown = set(data) - {"type", "port", "path", "interval", "timeout", "healthy_threshold", "unhealthy_threshold"}
    if unknown:
        raise _fail(where, f"unknown field(s) {', '.join(sorted(map(str, unknown)))}")
    values = {k: v for k, v in data.items() if v is not None}
    kind = values.get("type", "tcp")
    if kind not in HEALTH_CHECK_TYPES:
        raise _fail(f"{where}.type", f"{kind!r} is not a health check type; use tcp or http")
    if "port" in values:
        reason = _port_error(values["port"])
        if reason:
            raise _fail(f"{where}.port", reason)
    path = values.get("path", "/")
    if "path" in values and kind != "http":
        raise _fail(f"{where}.path", "is only used by type http; remove it or set type: http")
    if not isinstance(path, str) or not _HTTP_PATH_RE.match(path):
        raise _fail(f"{where}.path", f"{path!r} is not an HTTP path (starts with '/', no spaces)")
    number = {}
    for name, default in (("interval", 2.0), ("timeout", None)):
        value = values.get(name, default)
        if value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
            raise _fail(f"{where}.{name}", f"{value!r} is not a number of seconds")
        if not 0.1 <= value <= 3600:
            raise _fail(f"{where}.{name}", f"{value} is outside 0.1..3600 seconds")
        number[name] = float(value)
    interval = number["interval"]
    timeout = number.get("timeout", min(1.0, interval))
    if timeout > interval:
        raise _fail(
            f"{where}.timeout", f"{timeout} is longer than the interval {interval}; make it at most the interval"
        )
    thresholds = {}
    for name in ("healthy_threshold", "unhealthy_threshold"):
        value = values.get(name, 1)
        if not _is_int(value) or not 1 <= value <= 100:
            raise _fail(f"{where}.{name}", f"{value!r} is not a count from 1 to 100")
        thresholds[name] = value
    return HealthCheck(
        type=kind,
        port=values.get("port"),
        path=path,
        interval=interval,
        timeout=timeout,
        **thresholds,
    )


def _validate_ports(ports: Any, where: str = "ports") -> tuple[ServicePort, ...]:
    if not isinstance(ports, list | tuple) or not ports:
        raise _fail(where, "must be a non-empty list of {name, port, protocol}")
    result = []
    names: set[str] = set()
    seen: set[tuple[int, str]] = set()
    for index, item in enumerate(ports):
        at = f"{where}[{index}]"
        if isinstance(item, ServicePort):
            item = {"name": item.name, "port": item.port, "protocol": item.protocol, "target_port": item.target_port}
        if not isinstance(item, Mapping):
            raise _fail(at, f"must be a mapping with name, port and protocol, got {item!r}")
        unknown = set(item) - {"name", "port", "protocol", "target_port"}
        if unknown:
            raise _fail(at, f"unknown field(s) {', '.join(sorted(map(str, unknown)))}")
        name = item.get("name") or ""
        if name:
            try:
                validate_dns_label(name, "port name")
            except KeyLayoutError as exc:
                raise _fail(f"{at}.name", str(exc)) from None
        elif len(ports) > 1:
            raise _fail(f"{at}.name", "is required when a service has more than one port")
        if name in names:
            raise _fail(f"{at}.name", f"{name!r} is used by another port; port names must be unique")
        names.add(name)
        reason = _port_error(item.get("port"))
        if reason:
            raise _fail(f"{at}.port", reason)
        protocol = item.get("protocol") or "TCP"
        if protocol not in PROTOCOLS:
            raise _fail(f"{at}.protocol", f"{protocol!r} is not supported; use TCP or UDP")
        if (item["port"], protocol) in seen:
            raise _fail(f"{at}.port", f"{item['port']}/{protocol} is declared twice")
        seen.add((item["port"], protocol))
        target = item.get("target_port")
        if target is not None:
            reason = _port_error(target)
            if reason:
                raise _fail(f"{at}.target_port", reason)
        result.append(ServicePort(name=name, port=item["port"], protocol=protocol, target_port=target or item["port"]))
    return tuple(result)


def _validate_cluster_ip(value: Any, where: str = "cluster_ip") -> str:
    ip = _parse_ip(value, where)
    addr = ipaddress.ip_address(ip)
    if addr.is_unspecified or addr.is_multicast or addr.is_loopback or addr.is_link_local:
        raise _fail(where, f"{value!r} cannot be a ClusterIP (unspecified, loopback, link-local or multicast)")
    return ip


def make_declaration(
    namespace: Any,
    name: Any,
    cluster_ip: Any,
    ports: Any,
    selector: Any = None,
    annotations: Mapping[str, str] | None = None,
    health_check: Any = None,
    *,
    where: str = "",
) -> ServiceDeclaration:
    """Validate every field and build a declaration; the first problem raises ServiceError naming it."""

    def at(name_: str) -> str:
        return f"{where}.{name_}" if where else name_

    try:
        validate_dns_label(namespace, "namespace")
        validate_dns_label(name, "service name")
    except KeyLayoutError as exc:
        raise _fail(where, str(exc)) from None
    ip = _validate_cluster_ip(cluster_ip, at("cluster_ip"))
    port_list = _validate_ports(ports, at("ports"))
    selector = validate_labels(selector, at("selector"))
    options = parse_annotations(annotations)
    health = _validate_health_check(health_check, at("health_check"))
    return ServiceDeclaration(
        namespace=namespace,
        name=name,
        cluster_ip=ip,
        ports=port_list,
        selector=selector,
        options=options,
        health_check=health,
    )


def declaration_to_dict(decl: ServiceDeclaration) -> dict[str, Any]:
    """The stored JSON document of a declaration (docs/services.md)."""
    hc = decl.health_check
    health = {
        "type": hc.type,
        "port": hc.port,
        "interval": hc.interval,
        "timeout": hc.timeout,
        "healthyThreshold": hc.healthy_threshold,
        "unhealthyThreshold": hc.unhealthy_threshold,
    }
    if hc.type == "http":
        health["path"] = hc.path
    return {
        "version": DECLARATION_VERSION,
        "namespace": decl.namespace,
        "name": decl.name,
        "clusterIP": decl.cluster_ip,
        "ports": [
            {"name": p.name, "port": p.port, "protocol": p.protocol, "targetPort": p.backend_port} for p in decl.ports
        ],
        "selector": dict(sorted(decl.selector.items())),
        "annotations": options_annotations(decl.options),
        "healthCheck": health,
    }


def encode_declaration(decl: ServiceDeclaration) -> bytes:
    """Compact JSON with sorted keys: the same declaration always gives the same bytes."""
    return json.dumps(declaration_to_dict(decl), separators=(",", ":"), sort_keys=True).encode()


def decode_declaration(
    value: bytes | str, *, namespace: str | None = None, name: str | None = None
) -> ServiceDeclaration:
    """Parse and validate a stored declaration (and that it is the one of the key it was read from)."""
    data = _load_object(value, "service declaration")
    if data.get("version") != DECLARATION_VERSION:
        raise _fail("version", f"{data.get('version')!r} is not a known declaration version ({DECLARATION_VERSION})")
    ports = data.get("ports")
    if isinstance(ports, list):
        ports = [
            {
                "name": p.get("name"),
                "port": p.get("port"),
                "protocol": p.get("protocol"),
                "target_port": p.get("targetPort"),
            }
            if isinstance(p, dict)
            else p
            for p in ports
        ]
    health = data.get("healthCheck")
    if isinstance(health, dict):
        renames = {"healthyThreshold": "healthy_threshold", "unhealthyThreshold": "unhealthy_threshold"}
        health = {renames.get(k, k): v for k, v in health.items()}
    decl = make_declaration(
        data.get("namespace"),
        data.get("name"),
        data.get("clusterIP"),
        ports,
        data.get("selector"),
        data.get("annotations"),
        health,
    )
    for what, expected, found in (("namespace", namespace, decl.namespace), ("name", name, decl.name)):
        if expected is not None and expected != found:
            raise _fail(what, f"{found!r} does not match the key's {what} {expected!r}")
    return decl


# --- ClusterService (pkg/clustermesh/store/store.go) ----------------------------------------------


PortConfiguration = Mapping[str, L4Addr]  # port name -> L4Addr


@dataclass(frozen=True, slots=True)
class ClusterService:
    cluster: str
    namespace: str
    name: str
    frontends: Mapping[str, PortConfiguration]  # IP -> ports
    backends: Mapping[str, PortConfiguration]  # IP -> ports
    labels: Mapping[str, str] = field(default_factory=dict)
    selector: Mapping[str, str] = field(default_factory=dict)
    include_external: bool = False
    shared: bool = False
    cluster_id: int = 0


def _ports_json(ports: PortConfiguration) -> dict[str, Any]:
    return {name: ports[name].to_json() for name in sorted(ports)}


def _ip_sort_key(ip: str):
    addr = ipaddress.ip_address(ip)
    return (addr.version, int(addr))


def cluster_service_to_dict(svc: ClusterService) -> dict[str, Any]:
    """Cilium's field names and order (Go struct order; map keys sorted as encoding/json does)."""
    return {
        "cluster": svc.cluster,
        "namespace": svc.namespace,
        "name": svc.name,
        "frontends": {ip: _ports_json(svc.frontends[ip]) for ip in sorted(svc.frontends)},
        "backends": {ip: _ports_json(svc.backends[ip]) for ip in sorted(svc.backends)},
        "labels": dict(sorted(svc.labels.items())),
        "selector": dict(sorted(svc.selector.items())),
        "includeExternal": svc.include_external,
        "shared": svc.shared,
        "clusterID": svc.cluster_id,
    }


def encode_cluster_service(svc: ClusterService) -> bytes:
    return json.dumps(cluster_service_to_dict(svc), separators=(",", ":")).encode()


def _decode_port_configuration(value: Any, where: str) -> dict[str, L4Addr]:
    if value is None:  # a Go nil map
        return {}
    if not isinstance(value, dict):
        raise _fail(where, f"must be an object of port name -> {{Protocol, Port}}, got {type(value).__name__}")
    result = {}
    for port_name, addr in value.items():
        at = f"{where}[{port_name!r}]"
        if len(port_name) > 253:
            raise _fail(at, "port name is longer than 253 characters")
        if not isinstance(addr, dict):
            raise _fail(at, f"must be an object {{Protocol, Port}}, got {addr!r}")
        protocol = addr.get("Protocol")
        if protocol not in REMOTE_PROTOCOLS:
            raise _fail(
                f"{at}.Protocol", f"{protocol!r} is not a protocol; expected one of {', '.join(REMOTE_PROTOCOLS)}"
            )
        reason = _port_error(addr.get("Port"))
        if reason:
            raise _fail(f"{at}.Port", reason)
        result[port_name] = _l4addr(protocol, addr["Port"])
    return result


_L4ADDRS: dict[tuple[str, int], L4Addr] = {}


def _l4addr(protocol: str, port: int) -> L4Addr:
    """One shared (immutable) L4Addr per protocol and port: thousands of backends name the same few."""
    found = _L4ADDRS.get((protocol, port))
    if found is None:
        found = _L4ADDRS.setdefault((protocol, port), L4Addr(protocol, port))
    return found


def _decode_addresses(value: Any, where: str) -> dict[str, dict[str, L4Addr]]:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise _fail(where, f"must be an object of IP -> ports, got {type(value).__name__}")
    result: dict[str, dict[str, L4Addr]] = {}
    shared: dict[tuple, dict[str, L4Addr]] = {}  # backends of a service mostly have the same ports: one dict
    for ip_text, ports in value.items():
        ip = _parse_ip(ip_text, where)
        if ip in result:
            raise _fail(where, f"{ip_text!r} repeats the address {ip!r}")
        decoded = _decode_port_configuration(ports, f"{where}[{ip_text!r}]")
        result[ip] = shared.setdefault(tuple(sorted(decoded.items())), decoded)
    return result


def _decode_string_map(value: Any, where: str) -> dict[str, str]:
    if value is None:
        return {}
    if not isinstance(value, dict) or not all(isinstance(v, str) for v in value.values()):
        raise _fail(where, "must be an object of strings")
    return dict(value)


def decode_cluster_service(
    value: bytes | str,
    *,
    cluster: str | None = None,
    cluster_id: int | None = None,
    namespace: str | None = None,
    name: str | None = None,
    max_connected: int = DEFAULT_MAX_CONNECTED_CLUSTERS,
) -> ClusterService:
    """Decode and validate a ClusterService read from a kvstore.

    ``cluster`` / ``cluster_id``: the cluster it was read from (its name and ID must match);
    ``namespace`` / ``name``: those of its key.  Unknown fields are ignored (newer Cilium adds some,
    such as ``hostnames``); Go's ``null`` for an empty map is accepted.  Raises :class:`ServiceError`
    with the reason.
    """
    data = _load_object(value, "ClusterService")
    for key in ("cluster", "namespace", "name"):
        if not isinstance(data.get(key), str) or not data.get(key):
            raise _fail(key, f"must be a non-empty string, got {data.get(key)!r}")
    try:
        validate_cluster_name(data["cluster"])
        validate_dns_label(data["namespace"], "namespace")
        validate_dns_label(data["name"], "service name")
    except KeyLayoutError as exc:
        raise ServiceError(str(exc)) from None
    expected = (("cluster", cluster), ("namespace", namespace), ("name", name))
    for key, want in expected:
        if want is not None and data[key] != want:
            where = "the cluster it was read from" if key == "cluster" else "its key"
            raise _fail(key, f"{data[key]!r} does not match {where} ({want!r})")
    found_id = data.get("clusterID", 0)
    reason = cluster_id_error(found_id, max_connected)
    if reason:
        raise _fail("clusterID", f"{found_id!r} {reason}")
    if cluster_id is not None and found_id != cluster_id:
        raise _fail("clusterID", f"{found_id} does not match the ID {cluster_id} of cluster {data['cluster']!r}")
    flags = {}
    for key in ("includeExternal", "shared"):
        flag = data.get(key, False)
        if not isinstance(flag, bool):
            raise _fail(key, f"must be true or false, got {flag!r}")
        flags[key] = flag
    return ClusterService(
        cluster=data["cluster"],
        namespace=data["namespace"],
        name=data["name"],
        frontends=_decode_addresses(data.get("frontends"), "frontends"),
        backends=_decode_addresses(data.get("backends"), "backends"),
        labels=_decode_string_map(data.get("labels"), "labels"),
        selector=_decode_string_map(data.get("selector"), "selector"),
        include_external=flags["includeExternal"],
        shared=flags["shared"],
        cluster_id=found_id,
    )


# --- from a declaration and endpoints to a ClusterService ----------------------------------------------


@dataclass(frozen=True, slots=True)
class Endpoint:
    """A local endpoint (pod): its IP and labels."""

    ip: str
    labels: Mapping[str, str] = field(default_factory=dict)


def selected_backends(decl: ServiceDeclaration, endpoints: Iterable[Endpoint]) -> list[str]:
    """IPs (canonical, sorted) of the endpoints whose labels match the declaration's selector."""
    ips = {str(ipaddress.ip_address(ep.ip)) for ep in endpoints if selector_matches(decl.selector, ep.labels)}
    return sorted(ips, key=_ip_sort_key)


def build_cluster_service(
    decl: ServiceDeclaration, cluster: str, cluster_id: int, backend_ips: Iterable[str]
) -> ClusterService:
    """This cluster's ClusterService for ``decl`` with the given (healthy) backend IPs.

    Frontend: the ClusterIP with every port; backends: each IP with every port's target port.
    Publish it only when ``decl.options.exported`` (see :func:`exported_cluster_service`).
    """
    frontend_ports = {p.name: L4Addr(p.protocol, p.port) for p in decl.ports}
    backend_ports = {p.name: L4Addr(p.protocol, p.backend_port) for p in decl.ports}
    return ClusterService(
        cluster=cluster,
        namespace=decl.namespace,
        name=decl.name,
        frontends={decl.cluster_ip: frontend_ports},
        backends={str(ipaddress.ip_address(ip)): backend_ports for ip in backend_ips},  # one dict, read only
        labels={},
        selector=dict(decl.selector),
        include_external=decl.options.global_,
        shared=decl.options.shared,
        cluster_id=cluster_id,
    )


def exported_cluster_service(
    decl: ServiceDeclaration, cluster: str, cluster_id: int, healthy_backend_ips: Iterable[str]
) -> ClusterService | None:
    """What to publish under ``cilium/state/services/v1/<cluster>/<ns>/<name>``: None (delete the key)
    unless the service is global and shared."""
    if not decl.options.exported:
        return None
    return build_cluster_service(decl, cluster, cluster_id, healthy_backend_ips)


# --- the merge ---------------------------------------------------------------------------------------


@dataclass(frozen=True, order=True, slots=True)
class Backend:
    ip: str
    port: int
    cluster: str


@dataclass(frozen=True, slots=True)
class MergedFrontend:
    ip: str
    port: int
    protocol: str
    port_name: str
    backends: tuple[Backend, ...]  # what the datapath load-balances to, sorted


@dataclass(frozen=True, slots=True)
class MergedService:
    namespace: str
    name: str
    frontends: tuple[MergedFrontend, ...]
    clusters: tuple[str, ...]  # clusters whose backends are in use, sorted
    using: str  # "local", "remote", "all" or "none": which backends are in use


Health = Mapping[tuple[str, str], bool]


def merge_service(
    decl: ServiceDeclaration,
    local_cluster: str,
    cluster_services: Iterable[ClusterService],
    health: Health | None = None,
) -> MergedService:
    """The backends a node of ``local_cluster`` load-balances each frontend of ``decl`` to.

    * ``cluster_services``: the ClusterServices of all clusters for this namespace/name, the local one
      included (build it with :func:`build_cluster_service`, even when not shared); others are ignored.
    * ``health``: ``(cluster, ip) -> healthy``; a backend not listed is healthy (remote clusters publish
      only healthy backends).  Only healthy backends are ever used.
    * A remote cluster's backends count only when this cluster declares the service global and the
      remote ClusterService is shared.  Not global: local backends only.
    * Affinity ``local``: local backends; remote ones only while no local backend is healthy.
      ``remote``: the mirror image.  ``none``: all of them.
    * A backend port serves a frontend port of the same name and protocol.
    """
    health = health or {}
    local: set[tuple[str, str, str, L4Addr]] = set()  # (cluster, ip, port name, L4Addr)
    remote: set[tuple[str, str, str, L4Addr]] = set()
    seen_clusters: set[str] = set()
    for svc in cluster_services:
        if (svc.namespace, svc.name) != (decl.namespace, decl.name):
            continue
        if svc.cluster in seen_clusters:
            raise ValueError(f"two ClusterServices of cluster {svc.cluster!r} for {decl.namespace}/{decl.name}")
        seen_clusters.add(svc.cluster)
        is_local = svc.cluster == local_cluster
        if not is_local and not (decl.options.global_ and svc.shared):
            continue
        target = local if is_local else remote
        for ip, ports in svc.backends.items():
            if not health.get((svc.cluster, ip), True):
                continue
            for port_name, addr in ports.items():
                target.add((svc.cluster, ip, port_name, addr))
    affinity = decl.options.affinity if decl.options.global_ else AFFINITY_LOCAL
    if affinity == AFFINITY_LOCAL:
        chosen, using = (local, "local") if local else (remote, "remote")
    elif affinity == AFFINITY_REMOTE:
        chosen, using = (remote, "remote") if remote else (local, "local")
    else:
        chosen, using = local | remote, "all"
    if not chosen:
        using = "none"
    frontends = []
    for port in decl.ports:
        backends = sorted(
            Backend(ip, addr.port, cluster)
            for cluster, ip, port_name, addr in chosen
            if port_name == port.name and addr.protocol == port.protocol
        )
        frontends.append(MergedFrontend(decl.cluster_ip, port.port, port.protocol, port.name, tuple(backends)))
    clusters = tuple(sorted({b.cluster for f in frontends for b in f.backends}))
    return MergedService(decl.namespace, decl.name, tuple(frontends), clusters, using)


def merge_all(
    declarations: Iterable[ServiceDeclaration],
    local_cluster: str,
    cluster_services: Iterable[ClusterService],
    health: Health | None = None,
) -> dict[tuple[str, str], MergedService]:
    """:func:`merge_service` for every declaration, keyed by (namespace, name).

    The ClusterServices are grouped by namespace/name once (linear in their number); those of
    services this cluster does not declare are ignored (a cluster consumes only what it declares).
    """
    by_service: dict[tuple[str, str], list[ClusterService]] = {}
    for svc in cluster_services:
        by_service.setdefault((svc.namespace, svc.name), []).append(svc)
    result = {}
    for decl in declarations:
        key = (decl.namespace, decl.name)
        if key in result:
            raise ValueError(f"two declarations of {decl.namespace}/{decl.name}")
        result[key] = merge_service(decl, local_cluster, by_service.get(key, ()), health)
    return result


# --- backend slices: one node's healthy backends of a service, inside its own cluster -------------------


def encode_backend_slice(node: str, ips: Iterable[str]) -> bytes:
    """The value of ``kvstore_layout.backend_slice_key(ns, name, node)``: the node's healthy backend IPs."""
    canonical = sorted({str(ipaddress.ip_address(ip)) for ip in ips}, key=_ip_sort_key)
    return json.dumps({"node": node, "backends": canonical}, separators=(",", ":")).encode()


def decode_backend_slice(value: bytes | str, node: str) -> tuple[str, ...]:
    """The backend IPs of a slice written by :func:`encode_backend_slice` for ``node``."""
    data = _load_object(value, "backend slice")
    if data.get("node") != node:
        raise _fail("node", f"{data.get('node')!r} does not match the key's node {node!r}")
    ips = data.get("backends")
    if not isinstance(ips, list):
        raise _fail("backends", f"must be a list of IP addresses, got {type(ips).__name__}")
    return tuple(_parse_ip(ip, f"backends[{index}]") for index, ip in enumerate(ips))
