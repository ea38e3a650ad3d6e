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

from .datapath_sync import FrontendSpec, IPCacheSpec, frontends_from_merged
from .health_check import Target
from .mesh_state import KIND_IDENTITY, KIND_IPCACHE, KIND_NODE, KIND_SERVICE
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
    all_services: bool = False


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
        self._merged: dict[ServiceKey, Any] = {}
        self._exports_stale: set[ServiceKey] = set()  # declaration or slices changed: see take_export_changes
        self.conflicts: dict[ServiceKey, str] = {}  # services left out of the maps, and why
        self._frontends: dict[ServiceKey, list[FrontendSpec]] = {}
        self._dirty_services: set[ServiceKey] = set()
        self._dirty_ipcache = False
        self.version = 0  # bumped by every change: what the export leader compares
        self._lock = threading.RLock()
        self.changed = threading.Condition(self._lock)

    # -- dirt -------------------------------------------------------------------------------
    def _mark(self, service: ServiceKey | None = None, ipcache: bool = False) -> None:
        if service is not None:
            self._dirty_services.add(service)
        self._dirty_ipcache |= ipcache
        self.version += 1
        self.changed.notify_all()

    def mark_all(self) -> None:
        with self._lock:
            self._dirty_services.update(self.declarations)
            self._dirty_services.update(self._frontends)
            self._mark(ipcache=True)

    def take_dirty(self) -> Dirty:
        with self._lock:
            dirty = Dirty(frozenset(self._dirty_services), self._dirty_ipcache)
            self._dirty_services.clear()
            self._dirty_ipcache = False
            return dirty

    def wait_dirty(self, timeout: float) -> bool:
        with self._lock:
            if not self._dirty_services and not self._dirty_ipcache:
                self.changed.wait(timeout)
            return bool(self._dirty_services or self._dirty_ipcache)

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
            if kind == KIND_IPCACHE:
                self._mark(ipcache=True)

    def forget_cluster(self, cluster: str) -> None:
        """Drop what is left of a cluster (its view was flushed with callbacks already)."""
        with self._lock:
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
        with self._lock:
            self.endpoints[(endpoint["containerID"], endpoint["ifname"])] = endpoint
            self._mark(ipcache=True)

    def delete_endpoint(self, endpoint: dict[str, Any]) -> None:
        with self._lock:
            if self.endpoints.pop((endpoint["containerID"], endpoint["ifname"]), None) is not None:
                self._mark(ipcache=True)

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
            return list(wanted.values())

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
            }
