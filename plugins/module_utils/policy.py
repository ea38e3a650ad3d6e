# -*- coding: utf-8 -*-
# Copyright: clustermesh.core contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""Network policy: the model (CiliumNetworkPolicy, Kubernetes NetworkPolicy) and the compiler.

**Model.** :func:`parse_policy` validates one policy document strictly and returns a :class:`Policy`
whose ``document`` is the canonical dict stored in the kvstore (``metadata.namespace`` filled in,
``status`` dropped); :func:`load_policies` reads YAML (one or many documents, a list, or a ``List``
with ``items``); :func:`encode_policy` / :func:`decode_policy` are the kvstore codec.  Every error
is a :class:`PolicyError` whose message starts with the path in the document, e.g.
``spec.egress[0].toPorts[0].ports[0].protocol: 'TCPP' is not TCP, UDP or ANY; ...``.

Semantics follow Cilium (pkg/policy, pkg/k8s/apis/cilium.io/utils):

* Selector keys may be written ``key``, ``k8s:key`` or ``any:key``; ``reserved:host``,
  ``reserved:world`` and ``reserved:remote-node`` select those reserved identities.  The cluster label
  ``io.cilium.k8s.policy.cluster`` (either spelling) restricts a selector to one cluster; a selector
  without it matches endpoints of every cluster.
* ``endpointSelector`` always applies in the policy's namespace; ``fromEndpoints``/``toEndpoints``
  selectors get the policy's namespace unless they name ``io.kubernetes.pod.namespace`` themselves
  (reserved-label selectors get none).
* A rule allows (peers) x (ports).  No peer field: any peer (identity 0).  A peer field that is
  present but empty selects no peer.  No ``toPorts``: all ports and protocols.  ``{}`` allows nothing.
* An endpoint selected by a rule that has the ``ingress`` (``egress``) key is enforced in that
  direction (default deny), even when the list is empty.
* Entities: ``all`` = identity 0, ``world`` = WORLD and every CIDR identity, ``host``,
  ``remote-node``, ``cluster`` = every endpoint identity of every cluster, host and remote-node.
* CIDRs (IPv4): each ``cidr`` and ``except`` prefix of the loaded policies gets a local CIDR
  identity (:meth:`PolicyRepository.cidr_identities`); a CIDR peer selects the CIDR identities whose
  prefix lies inside its cidr and inside none of its excepts (the datapath's longest-prefix match
  gives an address the identity of the most specific loaded prefix); ``0.0.0.0/0`` also selects WORLD.
* Kubernetes NetworkPolicy: ``podSelector`` alone = pods of the policy's namespace;
  ``namespaceSelector`` alone = pods of the namespaces whose labels match (namespace label ``K`` is
  the identity label ``io.cilium.k8s.namespace.labels.K``); both = AND; a rule with no or empty
  ``from``/``to`` = all peers; no ``ports`` = all ports.

**Compiler.** :class:`PolicyRepository` keeps a selector cache (each distinct peer selector -> the
identities it selects), updated per identity change by testing only that identity against the
selectors that can match it, and caches :meth:`PolicyRepository.resolve` per endpoint label set,
invalidated only when a selector the result depends on changes its selection or the policies change.

Everything here is pure: no I/O, no Ansible.
"""

from __future__ import annotations

import copy
import ipaddress
import json
import math
import re
import typing
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from .kvstore_layout import KeyLayoutError, validate_dns_label
from .mesh_state import CLUSTER_LABEL, NAMESPACE_LABEL, NAMESPACE_LABELS_PREFIX, _split_label_key
from .services import _DNS_SUBDOMAIN_RE, label_key_error, label_value_error

try:
    import yaml
except ImportError as exc:  # modules report it with missing_required_lib
    yaml = None
    IMPORT_ERROR: ImportError | None = exc
else:
    IMPORT_ERROR = None

__all__ = [
    "CLUSTER_LABEL",
    "KINDS",
    "LOCAL_IDENTITY_BASE",
    "RESERVED_HOST",
    "RESERVED_REMOTE_NODE",
    "RESERVED_WORLD",
    "EndpointPolicy",
    "Policy",
    "PolicyEntry",
    "PolicyError",
    "PolicyRepository",
    "decode_policy",
    "encode_policy",
    "load_policies",
    "parse_policy",
]

KIND_CNP = "CiliumNetworkPolicy"
KIND_NP = "NetworkPolicy"
KINDS = (KIND_CNP, KIND_NP)
API_VERSIONS = {KIND_CNP: "cilium.io/v2", KIND_NP: "networking.k8s.io/v1"}

RESERVED_HOST = 1
RESERVED_WORLD = 2
RESERVED_REMOTE_NODE = 6
#: Identities below this are reserved by Cilium (1..255); endpoint identities are above.
RESERVED_IDENTITY_MAX = 255
#: Local (node-scoped) CIDR identities start here, as Cilium's local identity scope.
LOCAL_IDENTITY_BASE = 1 << 24
ANY_IDENTITY = 0

INGRESS = "ingress"
EGRESS = "egress"
DIRECTIONS = (INGRESS, EGRESS)

PROTO_ANY = 0
PROTO_TCP = 6
PROTO_UDP = 17
PROTO_SCTP = 132
PROTOCOL_NUMBERS = {"TCP": PROTO_TCP, "UDP": PROTO_UDP, "SCTP": PROTO_SCTP}
PROTOCOL_NAMES = {PROTO_ANY: "ANY", PROTO_TCP: "TCP", PROTO_UDP: "UDP", PROTO_SCTP: "SCTP"}
#: Endpoint label sets whose resolve() result is cached (beyond it the cache starts over).
RESOLVE_CACHE_MAX = 4096
#: The most ports one ``port``..``endPort`` range may span (each port is one policy-map entry).
MAX_PORT_RANGE = 1024

RESERVED_NAMES = {"host": RESERVED_HOST, "world": RESERVED_WORLD, "remote-node": RESERVED_REMOTE_NODE}
ENTITIES = ("all", "world", "host", "remote-node", "cluster")
_UNSUPPORTED_ENTITIES = ("init", "health", "unmanaged", "kube-apiserver", "ingress", "world-ipv4", "world-ipv6")
_SELECTOR_SOURCES = ("k8s", "any", "reserved")
_OPERATORS = ("In", "NotIn", "Exists", "DoesNotExist")
_NUMERIC_RE = re.compile(r"^[0-9]+$")
NAME_MAX = 253
NOT_SUPPORTED = "is not supported by clustermesh.core"


class PolicyError(ValueError):
    """A policy document is invalid; the message starts with the path in the document."""


def _fail(path: str, message: str) -> PolicyError:
    return PolicyError(f"{path}: {message}" if path else message)


def _join(path: str, key: str) -> str:
    return f"{path}.{key}" if path else key


# ------------------------------------------------------------------------------------------------
# selectors (hashable: they are the keys of the selector cache)
# ------------------------------------------------------------------------------------------------


class _Ident:
    """One identity as selectors see it: labels (sources stripped; reserved/CIDR identities carry
    ``reserved:<name>`` and ``cidr:<prefix>`` keys, which no Kubernetes label key can spell)."""

    __slots__ = ("id", "labels", "network")

    def __init__(self, id_: int, labels: Mapping[str, str], network: ipaddress.IPv4Network | None = None):
        self.id = id_
        self.labels = labels
        self.network = network


_WORLD_KEY = "reserved:world"


@dataclass(frozen=True, slots=True)
class LabelSelector:
    """matchLabels (``labels``: sorted (key, value) pairs) AND matchExpressions (``expressions``:
    sorted (key, operator, values)); keys are stripped of ``k8s:``/``any:``, reserved keys keep
    ``reserved:``."""

    labels: tuple[tuple[str, str], ...] = ()
    expressions: tuple[tuple[str, str, tuple[str, ...]], ...] = ()

    def matches(self, ident: _Ident) -> bool:
        labels = ident.labels
        for key, value in self.labels:
            if labels.get(key) != value:
                return False
        for key, operator, values in self.expressions:
            present = key in labels
            if operator == "In":
                if not present or labels[key] not in values:
                    return False
            elif operator == "NotIn":
                if present and labels[key] in values:
                    return False
            elif operator == "Exists":
                if not present:
                    return False
            elif present:  # DoesNotExist
                return False
        return True

    def hint(self) -> tuple[str, str] | None:
        """One (key, value) every selected identity carries (the most selective one), or None."""
        if not self.labels:
            return None
        for pair in self.labels:
            if pair[0] not in (NAMESPACE_LABEL, CLUSTER_LABEL):
                return pair
        return self.labels[0]

    def names_key(self, key: str) -> bool:
        return any(pair[0] == key for pair in self.labels) or any(expr[0] == key for expr in self.expressions)

    def is_reserved(self) -> bool:
        return any(pair[0].startswith("reserved:") for pair in self.labels)

    def with_label(self, key: str, value: str) -> LabelSelector:
        labels = dict(self.labels)
        labels[key] = value
        return LabelSelector(tuple(sorted(labels.items())), self.expressions)

    def with_expression(self, key: str, operator: str, values: tuple[str, ...] = ()) -> LabelSelector:
        return LabelSelector(self.labels, tuple(sorted({*self.expressions, (key, operator, values)})))

    def describe(self) -> str:
        parts = [f"{k}={v}" for k, v in self.labels]
        parts += [f"{k} {op} ({','.join(vs)})" if vs else f"{k} {op}" for k, op, vs in self.expressions]
        return "{" + ", ".join(parts) + "}"


@dataclass(frozen=True, slots=True)
class CIDRSelector:
    """A CIDR peer: the CIDR identities whose prefix lies inside ``cidr`` and inside no ``excepts``;
    ``0.0.0.0/0`` also selects WORLD."""

    cidr: ipaddress.IPv4Network
    excepts: tuple[ipaddress.IPv4Network, ...] = ()

    def matches(self, ident: _Ident) -> bool:
        network = ident.network
        if network is None:
            return ident.id == RESERVED_WORLD and self.cidr.prefixlen == 0
        if not network.subnet_of(self.cidr):
            return False
        return not any(network.subnet_of(excluded) for excluded in self.excepts)

    def hint(self) -> tuple[str, str] | None:
        return (_WORLD_KEY, "")  # CIDR identities and WORLD carry reserved:world

    def prefixes(self) -> list[str]:
        return [str(self.cidr), *(str(e) for e in self.excepts)]


@dataclass(frozen=True, slots=True)
class ClusterEntitySelector:
    """The ``cluster`` entity: every endpoint identity of every cluster, host and remote-node."""

    def matches(self, ident: _Ident) -> bool:
        return _WORLD_KEY not in ident.labels

    def hint(self) -> tuple[str, str] | None:
        return None


Selector = typing.Union[LabelSelector, CIDRSelector, ClusterEntitySelector]  # noqa: UP007 (sanity pylint)


@dataclass(frozen=True, slots=True)
class _Item:
    """One allow rule: ``peers`` (None = any peer, identity 0) x ``ports`` ((port, protocol) pairs)."""

    peers: tuple[Selector, ...] | None
    ports: tuple[tuple[int, int], ...]


@dataclass(frozen=True, slots=True)
class _Rule:
    """One compiled rule spec: the endpoints it applies to and, per direction, None (not enforced)
    or the allow items."""

    subject: LabelSelector
    ingress: tuple[_Item, ...] | None
    egress: tuple[_Item, ...] | None


# ------------------------------------------------------------------------------------------------
# the model
# ------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Policy:
    """One validated policy.  ``document`` is the canonical dict stored in the kvstore."""

    kind: str
    namespace: str
    name: str
    document: dict[str, Any] = field(repr=False)
    rules: tuple[_Rule, ...] = field(default=(), repr=False, compare=False)

    def __hash__(self) -> int:
        return hash((self.kind, self.namespace, self.name))

    @property
    def ref(self) -> str:
        return f"{self.namespace}/{self.kind}/{self.name}"

    @property
    def key(self) -> tuple[str, str, str]:
        return (self.namespace, self.kind, self.name)

    def selectors(self) -> set[Selector]:
        """The distinct peer selectors of this policy."""
        result: set[Selector] = set()
        for rule in self.rules:
            for items in (rule.ingress, rule.egress):
                for item in items or ():
                    result.update(item.peers or ())
        return result

    def cidrs(self) -> set[str]:
        """Every cidr and except prefix of this policy (canonical text)."""
        return {prefix for s in self.selectors() if isinstance(s, CIDRSelector) for prefix in s.prefixes()}


def _mapping(value: Any, path: str, what: str = "a mapping") -> Mapping[str, Any]:
    if not isinstance(value, Mapping):
        got = "null" if value is None else type(value).__name__
        raise _fail(path, f"must be {what}, got {got}")
    for key in value:
        if not isinstance(key, str):
            raise _fail(path, f"key {key!r} must be a string")
    return value


def _list(value: Any, path: str, what: str = "a list") -> list[Any]:
    if not isinstance(value, list):
        got = "null" if value is None else type(value).__name__
        raise _fail(path, f"must be {what}, got {got}")
    return value


def _string(value: Any, path: str) -> str:
    if not isinstance(value, str):
        got = "null" if value is None else type(value).__name__
        raise _fail(path, f"must be a string, got {got}")
    return value


def _check_fields(
    obj: Mapping[str, Any], path: str, known: Iterable[str], unsupported: Iterable[str] = (), hint: str = ""
) -> None:
    unsupported = tuple(unsupported)
    known = tuple(known)
    for key in obj:
        if key in unsupported:
            raise _fail(_join(path, key), f"{key} {NOT_SUPPORTED}{hint}; remove it")
        if key not in known:
            raise _fail(_join(path, key), f"unknown field {key!r} (known fields here: {', '.join(sorted(known))})")


def _json_check(value: Any, path: str) -> None:
    """Everything stored must survive JSON: strings, numbers, booleans, null, lists, string-keyed maps."""
    if value is None or isinstance(value, str | bool | int):
        return
    if isinstance(value, float):
        if math.isnan(value) or math.isinf(value):
            raise _fail(path, f"{value!r} is not a finite number")
        return
    if isinstance(value, list):
        for index, item in enumerate(value):
            _json_check(item, f"{path}[{index}]")
        return
    if isinstance(value, Mapping):
        for key, item in value.items():
            if not isinstance(key, str):
                raise _fail(path, f"key {key!r} must be a string (quote it)")
            _json_check(item, _join(path, key))
        return
    raise _fail(path, f"{value!r} ({type(value).__name__}) is not a string, number, boolean, list or mapping")


# --- selectors ------------------------------------------------------------------------------------


def _selector_key(raw: Any, path: str, *, allow_reserved: bool) -> str:
    if not isinstance(raw, str) or not raw:
        raise _fail(path, f"label key {raw!r} must be a non-empty string")
    source, key = _split_label_key(raw)
    if source not in _SELECTOR_SOURCES:
        raise _fail(path, f"label source {source!r} of {raw!r} {NOT_SUPPORTED} (use k8s:, any: or reserved:)")
    if source == "reserved":
        if not allow_reserved:
            raise _fail(path, f"reserved label {raw!r} can only be used in matchLabels of fromEndpoints/toEndpoints")
        if key not in RESERVED_NAMES:
            raise _fail(
                path,
                f"reserved label {raw!r} {NOT_SUPPORTED} (use reserved:host, reserved:world or reserved:remote-node)",
            )
        return f"reserved:{key}"
    reason = label_key_error(key)
    if reason:
        raise _fail(path, f"label key {raw!r} {reason}")
    return key


def _label_value(value: Any, path: str) -> str:
    if not isinstance(value, str):
        if isinstance(value, bool | int | float):
            raise _fail(path, f"label value {value!r} must be a string (quote it: '{value}')")
        raise _fail(path, f"label value must be a string, got {'null' if value is None else type(value).__name__}")
    reason = label_value_error(value)
    if reason:
        raise _fail(path, f"label value {value!r} {reason}")
    return value


def _parse_selector(value: Any, path: str, *, allow_reserved: bool, key_prefix: str = "") -> LabelSelector:
    """A Kubernetes LabelSelector.  ``key_prefix`` is put in front of every key (namespaceSelector)."""
    obj = _mapping(value, path, "a label selector (matchLabels and/or matchExpressions)")
    _check_fields(obj, path, ("matchLabels", "matchExpressions"))
    labels: dict[str, str] = {}
    if "matchLabels" in obj:
        lpath = _join(path, "matchLabels")
        for raw, raw_value in _mapping(obj["matchLabels"], lpath).items():
            kpath = f"{lpath}[{raw!r}]"
            key = _selector_key(raw, kpath, allow_reserved=allow_reserved)
            if key.startswith("reserved:"):
                if raw_value not in ("", None):
                    raise _fail(kpath, f"a reserved label has the empty value, got {raw_value!r}")
                raw_value = ""
            else:
                raw_value = _label_value(raw_value, kpath)
                key = key_prefix + key
            if key in labels and labels[key] != raw_value:
                raise _fail(kpath, f"label key {key!r} is given twice with different values")
            labels[key] = raw_value
    expressions: set[tuple[str, str, tuple[str, ...]]] = set()
    if "matchExpressions" in obj:
        epath = _join(path, "matchExpressions")
        for index, item in enumerate(_list(obj["matchExpressions"], epath)):
            ipath = f"{epath}[{index}]"
            expression = _mapping(item, ipath, "a mapping with key, operator and values")
            _check_fields(expression, ipath, ("key", "operator", "values"))
            if "key" not in expression:
                raise _fail(_join(ipath, "key"), "is required")
            key = _selector_key(expression["key"], _join(ipath, "key"), allow_reserved=False)
            operator = expression.get("operator")
            if operator not in _OPERATORS:
                raise _fail(_join(ipath, "operator"), f"{operator!r} is not In, NotIn, Exists or DoesNotExist")
            values = expression.get("values")
            vpath = _join(ipath, "values")
            if operator in ("In", "NotIn"):
                if not isinstance(values, list) or not values:
                    raise _fail(vpath, f"operator {operator} needs a non-empty list of values")
                checked = tuple(sorted({_label_value(v, f"{vpath}[{i}]") for i, v in enumerate(values)}))
            else:
                if values not in (None, []):
                    raise _fail(vpath, f"operator {operator} takes no values; remove them")
                checked = ()
            expressions.add((key_prefix + key, operator, checked))
    return LabelSelector(tuple(sorted(labels.items())), tuple(sorted(expressions)))


# --- CIDRs and ports ------------------------------------------------------------------------------


def _parse_cidr(value: Any, path: str) -> ipaddress.IPv4Network:
    text = _string(value, path)
    try:
        network = ipaddress.ip_network(text, strict=False)
    except ValueError:
        raise _fail(path, f"{text!r} is not an IPv4 prefix (e.g. 10.0.0.0/8)") from None
    if network.version != 4:
        raise _fail(path, f"{text!r} is an IPv6 prefix; only IPv4 is supported by clustermesh.core")
    if "/" in text:
        address = ipaddress.ip_interface(text).ip
        if address != network.network_address:
            raise _fail(path, f"{text!r} has host bits set; did you mean '{network}'?")
    return network


def _parse_cidr_set(value: Any, path: str, cidr_key: str = "cidr") -> CIDRSelector:
    obj = _mapping(value, path, f"a mapping with {cidr_key} and except")
    _check_fields(obj, path, (cidr_key, "except"), ("cidrGroupRef", "cidrGroupSelector"))
    if cidr_key not in obj:
        raise _fail(_join(path, cidr_key), "is required")
    cidr = _parse_cidr(obj[cidr_key], _join(path, cidr_key))
    excepts = []
    if "except" in obj:
        epath = _join(path, "except")
        for index, item in enumerate(_list(obj["except"], epath)):
            excluded = _parse_cidr(item, f"{epath}[{index}]")
            if not excluded.subnet_of(cidr):
                raise _fail(f"{epath}[{index}]", f"'{excluded}' is not inside {cidr_key} '{cidr}'")
            excepts.append(excluded)
    return CIDRSelector(cidr, tuple(sorted(set(excepts))))


def _port_number(value: Any, path: str, *, minimum: int) -> int:
    if isinstance(value, bool) or value is None:
        raise _fail(path, f"{value!r} is not a port number")
    if isinstance(value, str):
        if not _NUMERIC_RE.match(value):
            raise _fail(path, f"named port {value!r} {NOT_SUPPORTED}; give the port number ({minimum}..65535)")
        value = int(value)
    if not isinstance(value, int):
        raise _fail(path, f"{value!r} is not a port number")
    if not minimum <= value <= 65535:
        raise _fail(path, f"port {value} is outside {minimum}..65535")
    return value


def _end_port(obj: Mapping[str, Any], path: str, port: int) -> int:
    if "endPort" not in obj or obj["endPort"] is None:
        return port
    epath = _join(path, "endPort")
    end = obj["endPort"]
    if isinstance(end, bool) or not isinstance(end, int):
        raise _fail(epath, f"{end!r} must be an integer port number")
    if port == 0:
        raise _fail(epath, "needs a port other than 0 (port 0 already means all ports)")
    if not port <= end <= 65535:
        raise _fail(epath, f"{end} must be between port {port} and 65535")
    if end - port + 1 > MAX_PORT_RANGE:
        raise _fail(
            epath,
            f"the range {port}-{end} spans {end - port + 1} ports; at most {MAX_PORT_RANGE} ports per range "
            "(each port is one policy-map entry): split it or allow all ports",
        )
    return end


def _expand_ports(port: int, end: int, protocols: Iterable[int]) -> list[tuple[int, int]]:
    return [(number, proto) for number in range(port, end + 1) for proto in protocols]


def _parse_cnp_port(value: Any, path: str) -> list[tuple[int, int]]:
    obj = _mapping(value, path, "a mapping with port, protocol and endPort")
    _check_fields(obj, path, ("port", "protocol", "endPort"))
    port = 0 if obj.get("port") is None else _port_number(obj["port"], _join(path, "port"), minimum=0)
    protocol = obj.get("protocol", "ANY")
    if protocol == "ANY":
        protocols: tuple[int, ...] = (PROTO_TCP, PROTO_UDP, PROTO_SCTP)
    elif protocol in PROTOCOL_NUMBERS:
        protocols = (PROTOCOL_NUMBERS[protocol],)
    else:
        raise _fail(_join(path, "protocol"), f"{protocol!r} is not TCP, UDP or ANY; use one of TCP, UDP, SCTP, ANY")
    end = _end_port(obj, path, port)
    return _expand_ports(port, end, protocols)


def _parse_to_ports(value: Any, path: str) -> list[tuple[int, int]]:
    result: list[tuple[int, int]] = []
    for index, item in enumerate(_list(value, path, "a list of port rules")):
        ipath = f"{path}[{index}]"
        obj = _mapping(item, ipath, "a mapping with ports")
        _check_fields(
            obj,
            ipath,
            ("ports",),
            ("rules", "listener", "serverNames", "originatingTLS", "terminatingTLS"),
            " (L4 rules only: ports with port, protocol and endPort)",
        )
        ports = obj.get("ports")
        if ports is None or ports == []:  # a port rule without ports: every port (as port "0", protocol ANY)
            result.extend(_expand_ports(0, 0, (PROTO_TCP, PROTO_UDP, PROTO_SCTP)))
            continue
        ppath = _join(ipath, "ports")
        for pindex, port in enumerate(_list(ports, ppath)):
            result.extend(_parse_cnp_port(port, f"{ppath}[{pindex}]"))
    return result


def _dedupe(items: Iterable[Any]) -> tuple[Any, ...]:
    return tuple(dict.fromkeys(items))


# --- CiliumNetworkPolicy ----------------------------------------------------------------------------

_CNP_SPEC_FIELDS = ("endpointSelector", "ingress", "egress", "description", "labels")
_CNP_SPEC_UNSUPPORTED = ("ingressDeny", "egressDeny", "nodeSelector", "enableDefaultDeny")
_CNP_RULE_UNSUPPORTED = {
    INGRESS: ("fromRequires", "fromNodes", "fromGroups", "icmps", "authentication"),
    EGRESS: ("toFQDNs", "toServices", "toRequires", "toNodes", "toGroups", "icmps", "authentication"),
}
_CNP_PEER = {INGRESS: "from", EGRESS: "to"}


def _peer_endpoint_selector(value: Any, path: str, namespace: str) -> LabelSelector:
    selector = _parse_selector(value, path, allow_reserved=True)
    if selector.is_reserved():
        return selector
    if not selector.names_key(NAMESPACE_LABEL):
        selector = selector.with_label(NAMESPACE_LABEL, namespace)
    return selector


def _entity(value: Any, path: str) -> Selector | None:
    """The selector of an entity; None for ``all`` (any peer)."""
    name = _string(value, path)
    if name == "all":
        return None
    if name in RESERVED_NAMES:
        return LabelSelector(((f"reserved:{name}", ""),))
    if name == "cluster":
        return ClusterEntitySelector()
    if name in _UNSUPPORTED_ENTITIES:
        raise _fail(path, f"entity {name!r} {NOT_SUPPORTED} (use {', '.join(ENTITIES)})")
    raise _fail(path, f"{name!r} is not an entity (use {', '.join(ENTITIES)})")


def _parse_cnp_rule(value: Any, path: str, direction: str, namespace: str) -> _Item | None:
    peer = _CNP_PEER[direction]
    fields = (f"{peer}Endpoints", f"{peer}CIDR", f"{peer}CIDRSet", f"{peer}Entities", "toPorts")
    obj = _mapping(value, path, "a rule mapping")
    _check_fields(obj, path, fields, _CNP_RULE_UNSUPPORTED[direction])
    peer_fields = [name for name in fields[:4] if name in obj]
    peers: list[Selector] = []
    any_peer = not peer_fields
    name = f"{peer}Endpoints"
    if name in obj:
        lpath = _join(path, name)
        for index, item in enumerate(_list(obj[name], lpath, "a list of label selectors")):
            peers.append(_peer_endpoint_selector(item, f"{lpath}[{index}]", namespace))
    name = f"{peer}CIDR"
    if name in obj:
        lpath = _join(path, name)
        for index, item in enumerate(_list(obj[name], lpath, "a list of IPv4 prefixes")):
            peers.append(CIDRSelector(_parse_cidr(item, f"{lpath}[{index}]")))
    name = f"{peer}CIDRSet"
    if name in obj:
        lpath = _join(path, name)
        for index, item in enumerate(_list(obj[name], lpath, "a list of {cidr, except} mappings")):
            peers.append(_parse_cidr_set(item, f"{lpath}[{index}]"))
    name = f"{peer}Entities"
    if name in obj:
        lpath = _join(path, name)
        for index, item in enumerate(_list(obj[name], lpath, "a list of entity names")):
            selector = _entity(item, f"{lpath}[{index}]")
            if selector is None:
                any_peer = True
            else:
                peers.append(selector)
    has_ports = "toPorts" in obj
    ports = _parse_to_ports(obj["toPorts"], _join(path, "toPorts")) if has_ports else []
    if not peer_fields and not ports:
        return None  # {} (or only an empty toPorts) allows nothing
    port_pairs = _dedupe(ports) if ports else ((0, PROTO_ANY),)
    if any_peer:
        return _Item(None, port_pairs)
    if not peers:
        return None  # present but empty peer lists select no peer
    return _Item(_dedupe(peers), port_pairs)


def _parse_cnp_spec(value: Any, path: str, namespace: str) -> _Rule:
    obj = _mapping(value, path, "a rule spec mapping")
    _check_fields(obj, path, _CNP_SPEC_FIELDS, _CNP_SPEC_UNSUPPORTED)
    if "endpointSelector" not in obj:
        raise _fail(_join(path, "endpointSelector"), "is required ({} selects every endpoint of the namespace)")
    spath = _join(path, "endpointSelector")
    subject = _parse_selector(obj["endpointSelector"], spath, allow_reserved=False)
    own = dict(subject.labels).get(NAMESPACE_LABEL)
    if own is not None and own != namespace:
        raise _fail(
            spath,
            f"selects namespace {own!r} but an endpointSelector always applies in the policy's namespace "
            f"{namespace!r}; set metadata.namespace instead",
        )
    subject = subject.with_label(NAMESPACE_LABEL, namespace)
    if "description" in obj:
        _string(obj["description"], _join(path, "description"))
    directions: dict[str, tuple[_Item, ...] | None] = {}
    for direction in DIRECTIONS:
        if direction not in obj:
            directions[direction] = None
            continue
        dpath = _join(path, direction)
        if obj[direction] is None:
            raise _fail(
                dpath,
                f"is null: give a list of rules ([] denies all {direction} of the selected endpoints) "
                "or leave the field out",
            )
        items = []
        for index, rule in enumerate(_list(obj[direction], dpath, "a list of rules")):
            item = _parse_cnp_rule(rule, f"{dpath}[{index}]", direction, namespace)
            if item is not None:
                items.append(item)
        directions[direction] = tuple(items)
    return _Rule(subject, directions[INGRESS], directions[EGRESS])


# --- Kubernetes NetworkPolicy -----------------------------------------------------------------------


def _parse_np_peer(value: Any, path: str, namespace: str) -> Selector:
    obj = _mapping(value, path, "a peer mapping (podSelector, namespaceSelector or ipBlock)")
    _check_fields(obj, path, ("podSelector", "namespaceSelector", "ipBlock"))
    if not obj:
        raise _fail(path, "a peer needs podSelector, namespaceSelector or ipBlock")
    if "ipBlock" in obj:
        if len(obj) > 1:
            raise _fail(path, "ipBlock cannot be combined with podSelector or namespaceSelector in one peer")
        return _parse_cidr_set(obj["ipBlock"], _join(path, "ipBlock"))
    if "podSelector" in obj:
        selector = _parse_selector(obj["podSelector"], _join(path, "podSelector"), allow_reserved=False)
    else:
        selector = LabelSelector()
    if "namespaceSelector" in obj:
        namespaces = _parse_selector(
            obj["namespaceSelector"],
            _join(path, "namespaceSelector"),
            allow_reserved=False,
            key_prefix=NAMESPACE_LABELS_PREFIX,
        )
        labels = dict(selector.labels)
        for key, label_value in namespaces.labels:
            if key in labels and labels[key] != label_value:
                raise _fail(path, f"podSelector and namespaceSelector contradict each other on {key!r}")
            labels[key] = label_value
        selector = LabelSelector(
            tuple(sorted(labels.items())), tuple(sorted({*selector.expressions, *namespaces.expressions}))
        )
        return selector.with_expression(NAMESPACE_LABEL, "Exists")
    return selector.with_label(NAMESPACE_LABEL, namespace)


def _parse_np_port(value: Any, path: str) -> list[tuple[int, int]]:
    obj = _mapping(value, path, "a mapping with port, protocol and endPort")
    _check_fields(obj, path, ("port", "protocol", "endPort"))
    protocol = obj.get("protocol", "TCP")
    if protocol not in PROTOCOL_NUMBERS:
        raise _fail(_join(path, "protocol"), f"{protocol!r} is not TCP, UDP or SCTP")
    if obj.get("port") is None:
        if obj.get("endPort") is not None:
            raise _fail(_join(path, "endPort"), "needs port")
        return [(0, PROTOCOL_NUMBERS[protocol])]
    port = _port_number(obj["port"], _join(path, "port"), minimum=1)
    end = _end_port(obj, path, port)
    return _expand_ports(port, end, (PROTOCOL_NUMBERS[protocol],))


def _parse_np_rule(value: Any, path: str, direction: str, namespace: str) -> _Item:
    peer = "from" if direction == INGRESS else "to"
    obj = _mapping(value, path, "a rule mapping")
    _check_fields(obj, path, (peer, "ports"))
    peers: list[Selector] = []
    if obj.get(peer):
        ppath = _join(path, peer)
        for index, item in enumerate(_list(obj[peer], ppath, "a list of peers")):
            peers.append(_parse_np_peer(item, f"{ppath}[{index}]", namespace))
    ports: list[tuple[int, int]] = []
    if obj.get("ports"):
        ppath = _join(path, "ports")
        for index, item in enumerate(_list(obj["ports"], ppath, "a list of ports")):
            ports.extend(_parse_np_port(item, f"{ppath}[{index}]"))
    return _Item(_dedupe(peers) if peers else None, _dedupe(ports) if ports else ((0, PROTO_ANY),))


def _parse_np_spec(value: Any, path: str, namespace: str) -> _Rule:
    obj = _mapping(value, path, "a mapping")
    _check_fields(obj, path, ("podSelector", "policyTypes", "ingress", "egress"))
    if "podSelector" not in obj:
        raise _fail(_join(path, "podSelector"), "is required ({} selects every pod of the namespace)")
    subject = _parse_selector(obj["podSelector"], _join(path, "podSelector"), allow_reserved=False)
    subject = subject.with_label(NAMESPACE_LABEL, namespace)
    tpath = _join(path, "policyTypes")
    if "policyTypes" in obj:
        types = _list(obj["policyTypes"], tpath, "a list of Ingress and/or Egress")
        for index, item in enumerate(types):
            if item not in ("Ingress", "Egress"):
                raise _fail(f"{tpath}[{index}]", f"{item!r} is not Ingress or Egress")
        if not types:
            raise _fail(tpath, "must name Ingress and/or Egress")
        enforced = {direction for direction in DIRECTIONS if direction.capitalize() in types}
    else:
        enforced = {INGRESS} | ({EGRESS} if "egress" in obj else set())
    directions: dict[str, tuple[_Item, ...] | None] = {}
    for direction in DIRECTIONS:
        dpath = _join(path, direction)
        rules = obj.get(direction)
        if direction not in enforced:
            if rules:
                raise _fail(
                    dpath,
                    f"has rules but policyTypes does not include {direction.capitalize()} (Kubernetes would "
                    f"ignore them): add {direction.capitalize()} to policyTypes or remove the rules",
                )
            directions[direction] = None
            continue
        items = []
        for index, rule in enumerate(_list(rules or [], dpath, "a list of rules")):
            items.append(_parse_np_rule(rule, f"{dpath}[{index}]", direction, namespace))
        directions[direction] = tuple(items)
    return _Rule(subject, directions[INGRESS], directions[EGRESS])


# --- documents --------------------------------------------------------------------------------------


def _parse_metadata(value: Any) -> tuple[str, str, dict[str, Any]]:
    obj = _mapping(value, "metadata", "a mapping with name (and namespace)")
    _check_fields(obj, "metadata", ("name", "namespace", "labels", "annotations"))
    if "name" not in obj:
        raise _fail("metadata.name", "is required")
    name = obj["name"]
    if not isinstance(name, str) or not name or len(name) > NAME_MAX or not _DNS_SUBDOMAIN_RE.match(name):
        raise _fail(
            "metadata.name",
            f"{name!r} is not a DNS subdomain (lower-case letters, digits, '-' and '.', at most {NAME_MAX} "
            "characters, starting and ending with a letter or digit)",
        )
    namespace = obj.get("namespace", "default")
    try:
        validate_dns_label(namespace, "namespace")
    except KeyLayoutError as exc:
        raise _fail("metadata.namespace", str(exc)) from None
    for key in ("labels", "annotations"):
        if key in obj:
            for item_key, item in _mapping(obj[key], f"metadata.{key}").items():
                _string(item, f"metadata.{key}[{item_key!r}]")
    canonical = {k: copy.deepcopy(obj[k]) for k in ("labels", "annotations") if k in obj}
    canonical.update(name=name, namespace=namespace)
    return name, namespace, canonical


def parse_policy(document: Any, where: str = "") -> Policy:
    """Validate one policy document (a mapping) and compile it; :class:`PolicyError` names the path."""
    try:
        return _parse_policy(document)
    except PolicyError as exc:
        if where:
            raise PolicyError(f"{where}: {exc}") from None
        raise


def _parse_policy(document: Any) -> Policy:
    obj = _mapping(document, "", "a policy mapping (apiVersion, kind, metadata, spec)")
    _json_check(obj, "")
    kind = obj.get("kind")
    if kind not in KINDS:
        if kind == "CiliumClusterwideNetworkPolicy":
            raise _fail("kind", f"{kind} {NOT_SUPPORTED} (use a namespaced CiliumNetworkPolicy)")
        raise _fail("kind", f"{kind!r} is not {' or '.join(KINDS)}")
    api_version = obj.get("apiVersion")
    if api_version != API_VERSIONS[kind]:
        raise _fail("apiVersion", f"{api_version!r} is not {API_VERSIONS[kind]!r} (the apiVersion of a {kind})")
    if kind == KIND_CNP:
        _check_fields(obj, "", ("apiVersion", "kind", "metadata", "spec", "specs", "status"))
    else:
        _check_fields(obj, "", ("apiVersion", "kind", "metadata", "spec", "status"))
    if "metadata" not in obj:
        raise _fail("metadata", "is required (with at least name)")
    name, namespace, metadata = _parse_metadata(obj["metadata"])
    canonical: dict[str, Any] = {"apiVersion": api_version, "kind": kind, "metadata": metadata}
    rules: list[_Rule] = []
    if kind == KIND_CNP:
        if "spec" not in obj and "specs" not in obj:
            raise _fail("spec", "is required (or specs, a list of rule specs)")
        if "spec" in obj:
            rules.append(_parse_cnp_spec(obj["spec"], "spec", namespace))
        if "specs" in obj:
            specs = _list(obj["specs"], "specs", "a list of rule specs")
            if not specs:
                raise _fail("specs", "must hold at least one rule spec")
            for index, spec in enumerate(specs):
                rules.append(_parse_cnp_spec(spec, f"specs[{index}]", namespace))
    else:
        if "spec" not in obj:
            raise _fail("spec", "is required")
        rules.append(_parse_np_spec(obj["spec"], "spec", namespace))
    for key in ("spec", "specs"):
        if key in obj:
            canonical[key] = copy.deepcopy(obj[key])
    return Policy(kind, namespace, name, canonical, tuple(rules))


def encode_policy(policy: Policy) -> bytes:
    """The kvstore value: canonical JSON (sorted keys, compact)."""
    return json.dumps(policy.document, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode("utf-8")


def decode_policy(value: bytes | str, where: str = "") -> Policy:
    """Parse a kvstore value written by :func:`encode_policy`; :class:`PolicyError` on anything else."""
    prefix = f"{where}: " if where else ""
    if isinstance(value, bytes):
        try:
            value = value.decode("utf-8")
        except UnicodeDecodeError:
            raise PolicyError(f"{prefix}policy value is not UTF-8") from None
    if not isinstance(value, str):
        raise PolicyError(f"{prefix}policy value must be bytes or str, got {type(value).__name__}")
    try:
        document = json.loads(value)
    except ValueError as exc:
        raise PolicyError(f"{prefix}policy value is not JSON: {exc}") from None
    return parse_policy(document, where)


if yaml is not None:

    class _StrictLoader(yaml.SafeLoader):
        """SafeLoader that refuses duplicate keys (PyYAML silently keeps the last one)."""

    def _construct_mapping(loader: Any, node: Any, deep: bool = False) -> Any:
        seen: set[Any] = set()
        for key_node, _value_node in node.value:
            key = loader.construct_object(key_node, deep=True)
            try:
                duplicate = key in seen
            except TypeError:
                continue
            if duplicate:
                raise yaml.constructor.ConstructorError(None, None, f"duplicate key {key!r}", key_node.start_mark)
            seen.add(key)
        return loader.construct_mapping(node, deep)

    _StrictLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_mapping)


def _yaml_documents(text: str, source: str) -> list[Any]:
    if yaml is None:
        raise PolicyError(f"{source}: reading policies needs the Python package PyYAML ({IMPORT_ERROR})")
    try:
        return list(yaml.load_all(text, Loader=_StrictLoader))  # noqa: S506 - a SafeLoader subclass
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None) or getattr(exc, "context_mark", None)
        problem = getattr(exc, "problem", None) or str(exc)
        context = getattr(exc, "context", None)
        where = f" line {mark.line + 1} column {mark.column + 1}" if mark is not None else ""
        detail = f"{context}, {problem}" if context and problem != str(exc) else problem
        raise PolicyError(f"{source}:{where}: malformed YAML: {detail}") from None


def load_policies(text: str, source: str = "<inline>") -> list[Policy]:
    """The policies of a YAML text: one or many documents, each a policy, a list of policies, or a
    ``List``/``<Kind>List`` with ``items``.  Empty documents are skipped.  Errors name the source
    and the document (1-based) and the path inside it; duplicates (namespace, kind, name) are refused."""
    if not isinstance(text, str):
        raise PolicyError(f"{source}: policy text must be a string, got {type(text).__name__}")
    found: list[tuple[str, Any]] = []
    for number, document in enumerate(_yaml_documents(text, source), start=1):
        where = f"{source} document {number}"
        if document is None:
            continue
        if isinstance(document, list):
            found.extend((f"{where} [{index}]", item) for index, item in enumerate(document))
            continue
        if (
            isinstance(document, Mapping)
            and isinstance(document.get("kind"), str)
            and document["kind"].endswith("List")
        ):
            kind = document["kind"][: -len("List")]
            if kind and kind not in KINDS:
                raise PolicyError(f"{where}: kind: {document['kind']!r} is not List or a list of {' or '.join(KINDS)}")
            items = document.get("items")
            if not isinstance(items, list):
                raise PolicyError(f"{where}: items: must be a list of policies")
            for index, item in enumerate(items):
                if kind and isinstance(item, Mapping):
                    item = {"kind": kind, "apiVersion": API_VERSIONS[kind], **item}
                found.append((f"{where} items[{index}]", item))
            continue
        found.append((where, document))
    policies: list[Policy] = []
    seen: dict[tuple[str, str, str], str] = {}
    for where, document in found:
        policy = parse_policy(document, where)
        if policy.key in seen:
            raise PolicyError(f"{where}: {policy.ref} is defined twice (also in {seen[policy.key]})")
        seen[policy.key] = where
        policies.append(policy)
    return policies


# ------------------------------------------------------------------------------------------------
# the compiler
# ------------------------------------------------------------------------------------------------


@dataclass(frozen=True, order=True, slots=True)
class PolicyEntry:
    """One allow entry of an endpoint: peer ``identity`` (0 any) to/from ``port`` (0 any) over
    ``protocol`` (0 any, 6, 17, 132) in ``direction``."""

    direction: str
    identity: int
    port: int
    protocol: int

    def to_dict(self) -> dict[str, Any]:
        return {
            "direction": self.direction,
            "identity": self.identity,
            "port": self.port,
            "protocol": PROTOCOL_NAMES.get(self.protocol, str(self.protocol)),
        }


@dataclass(frozen=True, slots=True)
class EndpointPolicy:
    """The effective policy of one endpoint."""

    ingress_enforced: bool = False
    egress_enforced: bool = False
    entries: frozenset[PolicyEntry] = frozenset()
    policies: tuple[str, ...] = ()

    def allows(self, direction: str, identity: int, port: int, protocol: int) -> bool:
        """What the datapath decides for a forward packet (same lookup order as bpf/lb.c)."""
        enforced = self.ingress_enforced if direction == INGRESS else self.egress_enforced
        if not enforced:
            return True
        return any(
            PolicyEntry(direction, peer, key_port, key_proto) in self.entries
            for peer in (identity, ANY_IDENTITY)
            for key_port, key_proto in ((port, protocol), (0, protocol), (0, 0))
        )

    def report(self) -> dict[str, Any]:
        """JSON-able view for ``meshctl policy``."""
        entries = sorted(self.entries)
        return {
            "ingress_enforced": self.ingress_enforced,
            "egress_enforced": self.egress_enforced,
            "policies": list(self.policies),
            "ingress": [_entry_row(e) for e in entries if e.direction == INGRESS],
            "egress": [_entry_row(e) for e in entries if e.direction == EGRESS],
        }


def _entry_row(entry: PolicyEntry) -> dict[str, Any]:
    row = entry.to_dict()
    del row["direction"]
    return row


def _normalise_labels(labels: Mapping[str, str]) -> dict[str, str]:
    if not isinstance(labels, Mapping):
        raise PolicyError(f"labels must be a mapping of label keys to values, got {type(labels).__name__}")
    result = {}
    for key, value in labels.items():
        if not isinstance(key, str) or not isinstance(value, str):
            raise PolicyError(f"label {key!r}={value!r}: keys and values must be strings")
        if key.startswith("k8s:"):
            key = key[4:]
        result[key] = value
    return result


_RESERVED_IDENTS = {
    RESERVED_HOST: {"reserved:host": ""},
    RESERVED_WORLD: {_WORLD_KEY: ""},
    RESERVED_REMOTE_NODE: {"reserved:remote-node": ""},
}


class PolicyRepository:
    """The loaded policies compiled against every known identity, incrementally.

    Identities: endpoint identities (:meth:`set_identity`, :meth:`remove_identity`), the reserved
    HOST/WORLD/REMOTE_NODE, and one local CIDR identity per cidr/except prefix of the loaded policies.
    """

    def __init__(self) -> None:
        self.revision = 0
        self._policies: dict[tuple[str, str, str], Policy] = {}
        self._rules: list[tuple[str, _Rule]] = []
        self._idents: dict[int, _Ident] = {i: _Ident(i, labels) for i, labels in _RESERVED_IDENTS.items()}
        self._cidr_ids: dict[str, int] = {}
        self._next_cidr_id = LOCAL_IDENTITY_BASE
        # selector cache
        self._selections: dict[Selector, set[int]] = {}
        self._index: dict[tuple[str, str], set[Selector]] = {}
        self._unindexed: set[Selector] = set()
        # resolve cache
        self._resolved: dict[frozenset[tuple[str, str]], EndpointPolicy] = {}
        self._dependents: dict[Selector, set[frozenset[tuple[str, str]]]] = {}
        # entries of one allow item (shared by every endpoint its rule selects)
        self._item_entries: dict[tuple[str, _Item], frozenset[PolicyEntry]] = {}
        self._items_by_selector: dict[Selector, set[tuple[str, _Item]]] = {}
        self._dirty: set[Selector] = set()  # selectors whose selection changed since the last flush

    # --- policies ---------------------------------------------------------------------------

    @property
    def policies(self) -> list[Policy]:
        return [self._policies[key] for key in sorted(self._policies)]

    def set_policies(self, policies: Iterable[Policy]) -> bool:
        """Replace the loaded policies; False when nothing changed."""
        new: dict[tuple[str, str, str], Policy] = {}
        for policy in policies:
            if not isinstance(policy, Policy):
                raise PolicyError(f"set_policies takes Policy objects, got {type(policy).__name__}")
            if policy.key in new:
                raise PolicyError(f"{policy.ref} is given twice")
            new[policy.key] = policy
        if new.keys() == self._policies.keys() and all(
            encode_policy(new[key]) == encode_policy(self._policies[key]) for key in new
        ):
            return False
        self._policies = new
        self._rules = [(policy.ref, rule) for key in sorted(new) for policy in (new[key],) for rule in policy.rules]
        wanted: set[Selector] = set()
        prefixes: set[str] = set()
        for policy in new.values():
            wanted |= policy.selectors()
            prefixes |= policy.cidrs()
        for selector in [s for s in self._selections if s not in wanted]:
            self._drop_selector(selector)
        self._set_cidrs(prefixes)
        for selector in wanted:
            if selector not in self._selections:
                self._add_selector(selector)
        self._resolved.clear()
        self._dependents.clear()
        self._item_entries.clear()
        self._dirty.clear()
        self._items_by_selector = {}
        for _selector, rule in self._rules:
            for direction, items in ((INGRESS, rule.ingress), (EGRESS, rule.egress)):
                for item in items or ():
                    for selector in item.peers or ():
                        self._items_by_selector.setdefault(selector, set()).add((direction, item))
        self.revision += 1
        return True

    def cidr_identities(self) -> dict[str, int]:
        """Every cidr/except prefix of the loaded policies -> its local CIDR identity."""
        return dict(self._cidr_ids)

    def _set_cidrs(self, prefixes: set[str]) -> None:
        for prefix in [p for p in self._cidr_ids if p not in prefixes]:
            self._update(self._cidr_ids.pop(prefix), None)
        for prefix in sorted(prefixes - self._cidr_ids.keys(), key=ipaddress.ip_network):
            identity = self._next_cidr_id
            self._next_cidr_id += 1
            self._cidr_ids[prefix] = identity
            labels = {_WORLD_KEY: "", f"cidr:{prefix}": ""}
            self._update(identity, _Ident(identity, labels, ipaddress.ip_network(prefix)))

    # --- identities ---------------------------------------------------------------------------

    @staticmethod
    def _check_identity(identity: int) -> None:
        if isinstance(identity, bool) or not isinstance(identity, int):
            raise PolicyError(f"identity must be an integer, got {identity!r}")
        if not RESERVED_IDENTITY_MAX < identity < LOCAL_IDENTITY_BASE:
            raise PolicyError(
                f"identity {identity} is not an endpoint identity "
                f"({RESERVED_IDENTITY_MAX + 1}..{LOCAL_IDENTITY_BASE - 1})"
            )

    def set_identity(self, identity: int, labels: Mapping[str, str]) -> None:
        """Add or change an endpoint identity (labels with sources stripped)."""
        self._check_identity(identity)
        normalised = _normalise_labels(labels)
        old = self._idents.get(identity)
        if old is not None and old.labels == normalised:
            return
        self._update(identity, _Ident(identity, normalised))

    def remove_identity(self, identity: int) -> None:
        self._check_identity(identity)
        if identity in self._idents:
            self._update(identity, None)

    def _candidates(self, ident: _Ident | None) -> set[Selector]:
        if ident is None:
            return set()
        result = set(self._unindexed)
        index = self._index
        for pair in ident.labels.items():
            selectors = index.get(pair)
            if selectors:
                result |= selectors
        return result

    def _update(self, identity: int, ident: _Ident | None) -> None:
        old = self._idents.get(identity)
        if ident is None:
            self._idents.pop(identity, None)
        else:
            self._idents[identity] = ident
        changed = []
        for selector in self._candidates(old) | self._candidates(ident):
            selection = self._selections[selector]
            was = identity in selection
            now = ident is not None and selector.matches(ident)
            if was != now:
                if now:
                    selection.add(identity)
                else:
                    selection.discard(identity)
                changed.append(selector)
        if changed:
            self.revision += 1
            self._dirty.update(changed)

    def _flush(self) -> None:
        """Drop the cached results that depend on selectors whose selection changed (done lazily, once
        per resolve, so that a burst of identity changes costs one invalidation per selector)."""
        for selector in self._dirty:
            for key in self._dependents.pop(selector, ()):
                self._resolved.pop(key, None)
            for item_key in self._items_by_selector.get(selector, ()):
                self._item_entries.pop(item_key, None)
        self._dirty.clear()

    def _add_selector(self, selector: Selector) -> None:
        self._selections[selector] = {i for i, ident in self._idents.items() if selector.matches(ident)}
        hint = selector.hint()
        if hint is None:
            self._unindexed.add(selector)
        else:
            self._index.setdefault(hint, set()).add(selector)

    def _drop_selector(self, selector: Selector) -> None:
        del self._selections[selector]
        hint = selector.hint()
        if hint is None:
            self._unindexed.discard(selector)
        else:
            bucket = self._index.get(hint)
            if bucket is not None:
                bucket.discard(selector)
                if not bucket:
                    del self._index[hint]

    def selection(self, selector: Selector) -> frozenset[int]:
        """The identities a cached selector selects (for tests and ``meshctl``)."""
        return frozenset(self._selections.get(selector, ()))

    # --- resolve ------------------------------------------------------------------------------

    def _entries_of(self, direction: str, item: _Item) -> frozenset[PolicyEntry]:
        key = (direction, item)
        cached = self._item_entries.get(key)
        if cached is not None:
            return cached
        if item.peers is None:
            peers: set[int] = {ANY_IDENTITY}
        else:
            peers = set()
            for selector in item.peers:
                peers |= self._selections[selector]
        result = frozenset(PolicyEntry(direction, peer, port, proto) for peer in peers for port, proto in item.ports)
        self._item_entries[key] = result
        return result

    def resolve(self, labels: Mapping[str, str]) -> EndpointPolicy:
        """The effective policy of an endpoint with these identity labels (cached per label set)."""
        normalised = _normalise_labels(labels)
        key = frozenset(normalised.items())
        if self._dirty:
            self._flush()
        cached = self._resolved.get(key)
        if cached is not None:
            return cached
        subject = _Ident(0, normalised)
        enforced = {INGRESS: False, EGRESS: False}
        entries: set[PolicyEntry] = set()
        refs: set[str] = set()
        used: set[Selector] = set()
        for ref, rule in self._rules:
            if not rule.subject.matches(subject):
                continue
            refs.add(ref)
            for direction, items in ((INGRESS, rule.ingress), (EGRESS, rule.egress)):
                if items is None:
                    continue
                enforced[direction] = True
                for item in items:
                    used.update(item.peers or ())
                    entries |= self._entries_of(direction, item)
        result = EndpointPolicy(enforced[INGRESS], enforced[EGRESS], frozenset(entries), tuple(sorted(refs)))
        if len(self._resolved) >= RESOLVE_CACHE_MAX:  # label sets of endpoints long gone: start over
            self._resolved.clear()
            self._dependents.clear()
        self._resolved[key] = result
        for selector in used:
            self._dependents.setdefault(selector, set()).add(key)
        return result
