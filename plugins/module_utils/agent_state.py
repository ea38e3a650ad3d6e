# -*- coding: utf-8 -*-
# Copyright: clustermesh.core contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""What the node agent knows about the mesh, in memory, and what it derives from it (no I/O).

Fed by events (local kvstore, remote clusters, the node's endpoints, health checks), it keeps:

* the service **declarations** of the local cluster (``cilium/clustermesh-core/services/v1/``);
* the local cluster's **backend slices**: per service and node, the backends that node found
  healthy (each agent publishes its own slice; together they are the cluster's backends);
* the **ClusterServices** of remote clusters, the **ipcache** entries, **identities** and
  **nodes** of every cluster (the local one included).

Every change marks what it affects dirty: a service key ``(namespace, name)`` or the ipcache.
:meth:`MeshState.take_dirty` hands them to the reconcile loop, which asks for the desired
frontends of the dirty services only (merged results are cached per service) and writes the
difference into the BPF maps.  Thread-safe: callbacks come from several watcher threads.
"""

from __future__ import annotations

import socket
import threading
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from .datapath_sync import EndpointPolicySpec, FrontendSpec, IPCacheSpec, frontends_from_merged
from .health_check import Target
from .mesh_state import KIND_IDENTITY, KIND_IPCACHE, KIND_NODE, KIND_SERVICE, labels_as_dict
from .policy import RESERVED_HOST, RESERVED_REMOTE_NODE, Policy, PolicyRepository
from .services import (
    ClusterService,
    Endpoint,
    ServiceDeclaration,
    build_cluster_service,
    exported_cluster_service,
    merge_service,
    selected_backends,
)

ServiceKey = tuple[str, str]
_RESERVED_NAMES = {1: "reserved:host", 2: "reserved:world", 6: "reserved:remote-node"}
_PROTO_NAMES = {0: "ANY", 6: "TCP", 17: "UDP", 132: "SCTP"}


def _packed(ip: str) -> bytes:
    """The address's bytes (what ``ipaddress.ip_address(ip).packed`` gives, without its cost)."""
    try:
        return socket.inet_pton(socket.AF_INET, ip)
    except OSError:
        return socket.inet_pton(socket.AF_INET6, ip)


@dataclass(frozen=True)
class Dirty:
    services: frozenset[ServiceKey]
    ipcache: bool
    policy: bool = False


class MeshState:
    """See the module docstring.  ``cluster``/``cluster_id``/``node``: this node's."""

    def __init__(self, cluster: str, cluster_id: int, node: str):
        self.cluster = cluster
        self.cluster_id = cluster_id
        self.node = node
        self.declarations: dict[ServiceKey, ServiceDeclaration] = {}
        self.slices: dict[ServiceKey, dict[str, tuple[str, ...]]] = {}
        self.remote_services: dict[ServiceKey, dict[str, ClusterService]] = {}
        self.ipcache: dict[str, dict[str, Any]] = {}  # cluster -> key -> IPCacheEntry
        self.identities: dict[str, dict[str, Any]] = {}  # cluster -> key -> Identity
        self.nodes: dict[str, dict[str, Any]] = {}  # cluster -> key -> NodeRecord
        self.cluster_ids: dict[str, int] = {cluster: cluster_id}
        self.endpoints: dict[tuple[str, str], dict[str, Any]] = {}  # this node's, from the agent API
        self.health: dict[Target, bool] = {}
        self.policies: dict[str, Policy] = {}  # ref ("namespace/Kind/name") -> policy
        self.policy = PolicyRepository()
        self._merged: dict[ServiceKey, Any] = {}
        self._exports_stale: set[ServiceKey] = set()  # declaration or slices changed: see take_export_changes
        self.conflicts: dict[ServiceKey, str] = {}  # services left out of the maps, and why
        self._frontends: dict[ServiceKey, list[FrontendSpec]] = {}
        self._dirty_services: set[ServiceKey] = set()
        self._dirty_ipcache = False
        self._dirty_policy = False
        self.version = 0  # bumped by every change: what the export leader compares
        self._lock = threading.RLock()
        self.changed = threading.Condition(self._lock)

    # -- dirt -------------------------------------------------------------------------------
    def _mark(self, service: ServiceKey | None = None, ipcache: bool = False, policy: bool = False) -> None:
        if service is not None:
            self._dirty_services.add(service)
        self._dirty_ipcache |= ipcache
        self._dirty_policy |= policy
        self.version += 1
        self.changed.notify_all()

    def mark_all(self) -> None:
        with self._lock:
            self._dirty_services.update(self.declarations)
            self._dirty_services.update(self._frontends)
            self._mark(ipcache=True, policy=True)

    def take_dirty(self) -> Dirty:
        with self._lock:
            dirty = Dirty(frozenset(self._dirty_services), self._dirty_ipcache, self._dirty_policy)
            self._dirty_services.clear()
            self._dirty_ipcache = False
            self._dirty_policy = False
            return dirty

    def _is_dirty(self) -> bool:
        return bool(self._dirty_services or self._dirty_ipcache or self._dirty_policy)

    def wait_dirty(self, timeout: float) -> bool:
        with self._lock:
            if not self._is_dirty():
                self.changed.wait(timeout)
            return self._is_dirty()

    # -- events -----------------------------------------------------------------------------
    def set_cluster_id(self, cluster: str, cluster_id: int | None) -> None:
        with self._lock:
            if cluster_id is None:
                self.cluster_ids.pop(cluster, None)
            else:
                self.cluster_ids[cluster] = cluster_id

    def apply_cluster_change(self, cluster: str, kind: str, key: str, old: Any, new: Any) -> None:
        """A change of a cluster's ``cilium/state/`` (the ``on_change`` of ClusterView)."""
        with self._lock:
            if kind == KIND_SERVICE:
                if cluster == self.cluster:
                    return  # the local cluster's services come from its slices, not its exports
                for value in (old, new):
                    if value is not None:
                        self._mark((value.namespace, value.name))
                if old is not None:
                    per = self.remote_services.get((old.namespace, old.name), {})
                    per.pop(cluster, None)
                    if not per:
                        self.remote_services.pop((old.namespace, old.name), None)
                if new is not None:
                    self.remote_services.setdefault((new.namespace, new.name), {})[cluster] = new
                    self.cluster_ids.setdefault(cluster, new.cluster_id)
                return
            table = {KIND_IPCACHE: self.ipcache, KIND_IDENTITY: self.identities, KIND_NODE: self.nodes}.get(kind)
            if table is None:
                return
            per = table.setdefault(cluster, {})
            if new is None:
                per.pop(key, None)
            else:
                per[key] = new
            if kind == KIND_IDENTITY:
                self._identity_changed(old, new)
            elif kind in (KIND_IPCACHE, KIND_NODE):  # node addresses are ipcache entries too (host, remote-node)
                self._mark(ipcache=True)

    def _identity_changed(self, old: Any, new: Any) -> None:
        revision = self.policy.revision
        if old is not None and (new is None or new.id != old.id):
            self.policy.remove_identity(old.id)
        if new is not None:
            self.policy.set_identity(new.id, labels_as_dict(new.labels))
        if self.policy.revision != revision:
            self._mark(policy=True)

    def forget_cluster(self, cluster: str) -> None:
        """Drop what is left of a cluster (its view was flushed with callbacks already)."""
        with self._lock:
            for identity in list(self.identities.get(cluster, {}).values()):
                self._identity_changed(identity, None)
            for table in (self.ipcache, self.identities, self.nodes):
                table.pop(cluster, None)
            for service, per in list(self.remote_services.items()):
                if per.pop(cluster, None) is not None:
                    self._mark(service)
                if not per:
                    del self.remote_services[service]
            self._mark(ipcache=True)

    def put_declaration(self, decl: ServiceDeclaration) -> None:
        with self._lock:
            key = (decl.namespace, decl.name)
            self.declarations[key] = decl
            self._exports_stale.add(key)
            self._mark(key)

    def delete_declaration(self, namespace: str, name: str) -> None:
        with self._lock:
            if self.declarations.pop((namespace, name), None) is not None:
                self._exports_stale.add((namespace, name))
                self._mark((namespace, name))

    def put_slice(self, namespace: str, name: str, node: str, ips: Iterable[str] | None) -> None:
        """A node's healthy backends of a service (None: the slice is gone)."""
        with self._lock:
            key = (namespace, name)
            per = self.slices.setdefault(key, {})
            old = per.get(node)
            if ips is None:
                per.pop(node, None)
            else:
                per[node] = tuple(ips)
            if not per:
                self.slices.pop(key, None)
            if per.get(node) != old:
                self._exports_stale.add(key)
                self._mark(key)

    def put_endpoint(self, endpoint: dict[str, Any]) -> None:
        """One of this node's endpoints, with ``identity``, ``identity_labels`` ({key: value}) and
        ``ifindex`` (its host-side veth: the key of its policy in the datapath)."""
        with self._lock:
            self.endpoints[(endpoint["containerID"], endpoint["ifname"])] = endpoint
            self._mark(ipcache=True, policy=True)

    def delete_endpoint(self, endpoint: dict[str, Any]) -> None:
        with self._lock:
            if self.endpoints.pop((endpoint["containerID"], endpoint["ifname"]), None) is not None:
                self._mark(ipcache=True, policy=True)

    def put_policy(self, ref: str, policy: Policy | None) -> None:
        """An imported policy (None: removed)."""
        with self._lock:
            if policy is None:
                if self.policies.pop(ref, None) is None:
                    return
            elif self.policies.get(ref) == policy:
                return
            else:
                self.policies[ref] = policy
            self._policies_changed()

    def replace_policies(self, policies: Mapping[str, Policy]) -> None:
        """Every imported policy (a full listing)."""
        with self._lock:
            if dict(policies) != self.policies:
                self.policies = dict(policies)
                self._policies_changed()

    def _policies_changed(self) -> None:
        cidrs = self.policy.cidr_identities()
        self.policy.set_policies(self.policies.values())
        self._mark(ipcache=self.policy.cidr_identities() != cidrs, policy=True)

    def set_health(self, target: Target, healthy: bool) -> None:
        with self._lock:
            self.health[target] = healthy
            self.version += 1

    # -- what this node checks and publishes ------------------------------------------------
    def _local_endpoints(self) -> list[Endpoint]:
        return [Endpoint(ep["ip"], ep.get("labels") or {}) for ep in self.endpoints.values()]

    def health_targets(self) -> dict[ServiceKey, dict[str, Target]]:
        """Per declared service: this node's endpoints it selects -> the health-check target."""
        with self._lock:
            endpoints = self._local_endpoints()
            out: dict[ServiceKey, dict[str, Target]] = {}
            for key, decl in self.declarations.items():
                check = decl.health_check
                out[key] = {
                    ip: Target(
                        ip,
                        decl.health_check_port,
                        check.type,
                        check.path,
                        check.interval,
                        check.timeout,
                        check.healthy_threshold,
                        check.unhealthy_threshold,
                    )
                    for ip in selected_backends(decl, endpoints)
                }
            return out

    def node_slices(self) -> dict[ServiceKey, tuple[str, ...]]:
        """Per declared service that selects at least one of this node's endpoints: those whose health
        check passes (sorted; maybe none). A service that selects none of them has no slice of this
        node: an absent slice means no backends, as an empty one does, and a node without backends
        of a service publishes nothing for it (no key per node and service)."""
        with self._lock:
            return {
                key: tuple(ip for ip, target in targets.items() if self.health.get(target))
                for key, targets in self.health_targets().items()
                if targets
            }

    def cluster_backends(self, key: ServiceKey) -> list[str]:
        per = self.slices.get(key, {})
        return sorted({ip for ips in per.values() for ip in ips}, key=_packed)

    def exports(self, keys: Iterable[ServiceKey] | None = None) -> dict[ServiceKey, ClusterService | None]:
        """What the cluster's service-export leader publishes for ``keys`` (default: every declared
        service): its ClusterService, or None (not exported or not declared: the key must not exist)."""
        with self._lock:
            keys = list(self.declarations) if keys is None else keys
            out: dict[ServiceKey, ClusterService | None] = {}
            for key in keys:
                decl = self.declarations.get(key)
                out[key] = (
                    None
                    if decl is None
                    else exported_cluster_service(decl, self.cluster, self.cluster_id, self.cluster_backends(key))
                )
            return out

    def take_export_changes(self) -> set[ServiceKey]:
        """The services whose declaration or local backends changed since the last call (remote changes
        never change what this cluster exports)."""
        with self._lock:
            changed, self._exports_stale = self._exports_stale, set()
            return changed

    # -- what goes into the maps ------------------------------------------------------------
    def frontends(self, dirty: Iterable[ServiceKey]) -> list[FrontendSpec]:
        """Every desired frontend, recomputing the merge of the ``dirty`` services only."""
        with self._lock:
            for key in dirty:
                decl = self.declarations.get(key)
                if decl is None:
                    self._frontends.pop(key, None)
                    self._merged.pop(key, None)
                    continue
                local = build_cluster_service(decl, self.cluster, self.cluster_id, self.cluster_backends(key))
                remote = list(self.remote_services.get(key, {}).values())
                merged = merge_service(decl, self.cluster, [local, *remote])
                self._merged[key] = merged
                self._frontends[key] = frontends_from_merged({key: merged}, {key: decl}, self.cluster_ids)
            wanted, seen, conflicts = [], {}, {}
            for key in sorted(self._frontends):
                for spec in self._frontends[key]:
                    address = (spec.ip, spec.port, spec.protocol)
                    if address in seen:  # two declarations of one ClusterIP:port: the first (by name) wins
                        conflicts[key] = f"{spec.ip}:{spec.port}/{spec.protocol} is already {seen[address]}'s"
                        continue
                    seen[address] = "/".join(key)
                    wanted.append(spec)
            self.conflicts = conflicts
            return wanted

    def merged(self) -> dict[ServiceKey, Any]:
        with self._lock:
            return dict(self._merged)

    def ipcache_specs(self, node_ip: str) -> list[IPCacheSpec]:
        """IP -> identity and tunnel endpoint for every endpoint of every cluster; this node's own
        endpoints come from the API at once (before their entries travel through the kvstore)."""
        with self._lock:
            wanted: dict[str, IPCacheSpec] = {}
            for cluster in sorted(self.ipcache, key=lambda c: (c != self.cluster, c)):
                cluster_id = self.cluster_ids.get(cluster, 0)
                for entry in self.ipcache[cluster].values():
                    prefix = entry.prefix
                    if prefix not in wanted and entry.id:
                        wanted[prefix] = IPCacheSpec(prefix, entry.id, entry.host_ip or "0.0.0.0", cluster_id)
            for endpoint in self.endpoints.values():
                identity = endpoint.get("identity")
                if identity:
                    prefix = f"{endpoint['ip']}/32"
                    wanted[prefix] = IPCacheSpec(prefix, identity, node_ip, self.cluster_id)
            # node addresses: policy tells this node (host) from other nodes (remote-node)
            for per in self.nodes.values():
                for node in per.values():
                    for address in node.addresses:
                        prefix = f"{address.ip}/32"
                        if ":" not in prefix and prefix not in wanted:
                            wanted[prefix] = IPCacheSpec(prefix, RESERVED_REMOTE_NODE, address.ip, node.cluster_id)
            wanted[f"{node_ip}/32"] = IPCacheSpec(f"{node_ip}/32", RESERVED_HOST, node_ip, self.cluster_id)
            # CIDRs of the policies: less specific than any endpoint, so they only name non-endpoint peers
            for prefix, identity in self.policy.cidr_identities().items():
                if prefix not in wanted:
                    wanted[prefix] = IPCacheSpec(prefix, identity, "0.0.0.0", 0)
            return list(wanted.values())

    def policy_specs(self) -> dict[int, EndpointPolicySpec]:
        """The policy of each of this node's endpoints, keyed by ifindex. An endpoint that no policy
        selects is there too, enforcing nothing: the datapath then tracks its connections, so the
        replies of connections it opened before a policy selects it keep flowing. Endpoints whose
        identity is not known yet are left out (no policy work at all)."""
        with self._lock:
            out: dict[int, EndpointPolicySpec] = {}
            for endpoint in self.endpoints.values():
                ifindex, labels = endpoint.get("ifindex"), endpoint.get("identity_labels")
                if not ifindex or labels is None:
                    continue
                resolved = self.policy.resolve(labels)
                entries = resolved.entries if resolved.ingress_enforced or resolved.egress_enforced else frozenset()
                out[ifindex] = EndpointPolicySpec(
                    endpoint["identity"], resolved.ingress_enforced, resolved.egress_enforced, entries
                )
            return out

    def endpoint_policy_report(self, endpoint: Mapping[str, Any]) -> dict[str, Any]:
        """What ``meshctl policy ENDPOINT`` shows: what is enforced, the policies selecting the
        endpoint and its allow entries, peers named by their identities' labels."""
        with self._lock:
            labels = endpoint.get("identity_labels")
            if labels is None:
                return {"enforced": {"ingress": False, "egress": False}, "policies": [], "entries_by_peer": []}
            resolved = self.policy.resolve(labels)
            return {
                "enforced": {"ingress": resolved.ingress_enforced, "egress": resolved.egress_enforced},
                "policies": list(resolved.policies),
                "entries_by_peer": self._entries_by_peer(resolved.entries),
            }

    def _entries_by_peer(self, entries) -> list[dict[str, Any]]:
        names = {identity.id: identity for per in self.identities.values() for identity in per.values()}
        cidrs = {number: prefix for prefix, number in self.policy.cidr_identities().items()}
        rows = []
        for entry in sorted(entries, key=lambda e: (e.direction, e.identity, e.port, e.protocol)):
            known = names.get(entry.identity)
            if entry.identity == 0:
                peer = "any"
            elif known is not None:
                peer = ",".join(f"{k}={v}" for k, v in sorted(labels_as_dict(known.labels).items()))
            elif entry.identity in cidrs:
                peer = f"cidr:{cidrs[entry.identity]}"
            else:
                peer = _RESERVED_NAMES.get(entry.identity, f"identity {entry.identity}")
            rows.append(
                {
                    "direction": entry.direction,
                    "identity": entry.identity,
                    "peer": peer,
                    "port": entry.port,
                    "protocol": _PROTO_NAMES.get(entry.protocol, str(entry.protocol)),
                }
            )
        return rows

    # -- reporting --------------------------------------------------------------------------
    def identities_report(self) -> list[dict[str, Any]]:
        with self._lock:
            rows = [
                {"id": identity.id, "cluster": cluster, "labels": [str(label).rstrip(";") for label in identity.labels]}
                for cluster, per in self.identities.items()
                for identity in per.values()
            ]
            return sorted(rows, key=lambda row: row["id"])

    def services_report(self) -> list[dict[str, Any]]:
        """One row per frontend of every declared service (what ``meshctl services`` prints)."""
        with self._lock:
            rows = []
            for key, merged in sorted(self._merged.items()):
                decl = self.declarations.get(key)
                for f in merged.frontends:
                    rows.append(
                        {
                            "namespace": key[0],
                            "name": key[1],
                            "frontend": f"{f.ip}:{f.port}/{f.protocol}",
                            "global": bool(decl and decl.options.global_),
                            "shared": bool(decl and decl.options.shared),
                            "affinity": decl.options.affinity if decl else None,
                            "using": merged.using,
                            "backends": [{"ip": b.ip, "port": b.port, "cluster": b.cluster} for b in f.backends],
                        }
                    )
            return rows

    def counts(self) -> Mapping[str, int]:
        with self._lock:
            return {
                "declarations": len(self.declarations),
                "remote_services": sum(len(per) for per in self.remote_services.values()),
                "ipcache": sum(len(per) for per in self.ipcache.values()),
                "identities": sum(len(per) for per in self.identities.values()),
                "nodes": sum(len(per) for per in self.nodes.values()),
                "endpoints": len(self.endpoints),
                "policies": len(self.policies),
            }
