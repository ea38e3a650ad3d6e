# -*- coding: utf-8 -*-
# Copyright: clustermesh.core contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""``meshd``, the node agent: mesh state from every kvstore into the node's pinned BPF maps.

One process per node, configured by ``/etc/clustermesh/agent.yaml`` (:mod:`agent_config`).
Threads, each with one job:

* **local kvstore** (``_local_loop``): connects with the node's ``kvstore.yaml``, takes a lease,
  registers the node, lists and watches ``cilium/state/`` (validated through a
  :class:`remote_clusters.ClusterView` of the local cluster, like any remote one) and
  ``cilium/clustermesh-core/`` (service declarations, backend slices, the export leader, the
  network policies this cluster imported).
  A lost connection or lease is retried; on a new lease everything the node publishes is
  written again.
* **remote clusters**: :class:`remote_clusters.ClusterSet` over ``clusters.d/``; files added or
  removed at runtime connect or disconnect a cluster.  A cluster that is unreachable keeps its
  last known state (Cilium's rule: its backends stay in the maps until it is removed or it says
  otherwise; see docs/agent.md).
* **endpoints** (``_endpoint_loop``): pods reported by the CNI plugin over the API socket (and,
  at start, the IPAM records of pods added while the agent was down): attach the tc programs to
  the pod's host veth, allocate its identity, publish its ipcache entry under the node's lease.
* **health**: :class:`health_check.HealthChecker` probes this node's backends of every declared
  service; results become this node's backend slice.
* **housekeeping** (``_housekeeping_loop``): publishes the node's backend slices, takes the
  cluster's export leadership when it is free (the leader publishes the ClusterServices and the
  heartbeat), writes the synced canaries after the initial sync, refreshes metrics.
* **reconcile** (``_reconcile_loop``): waits for dirty state (:class:`agent_state.MeshState`),
  merges the dirty services, resolves the policy of the node's endpoints against every identity
  of every cluster (:mod:`policy`) and writes the difference into the maps (:mod:`datapath_sync`).
  It starts only after the initial sync (local listing done, each remote cluster synced or
  ``initial_sync_timeout`` passed): until then the maps keep what a previous agent wrote, so a
  restart (or ``kill -9``) changes nothing for traffic; the first sync then writes only the
  difference.
"""

from __future__ import annotations

import argparse
import logging
import os
import queue
import signal
import socket
import sys
import threading
import time
from typing import Any

from . import kvstore_layout as layout
from .agent_api import API_PREFIX, AgentServer, EndpointRegistry, default_api
from .agent_config import AgentConfig, AgentConfigError, load_agent_config
from .agent_state import MeshState
from .health_check import HealthChecker
from .kvstore_client import EVENT_PUT, KVStoreClient, KVStoreError
from .mesh_state import (
    NAMESPACE_LABEL,
    NAMESPACE_LABELS_PREFIX,
    StateError,
    labels_as_dict,
    make_ipcache_entry,
    make_node_record,
    parse_label_string,
)
from .policy import PolicyError, decode_policy
from .remote_clusters import ClusterSet, ClusterView
from .services import (
    ServiceError,
    decode_backend_slice,
    decode_declaration,
    encode_backend_slice,
    encode_cluster_service,
)

log = logging.getLogger("meshd")

EXIT_CONFIG = 2
EXIT_FAILED = 1
RETRY = 1.0  # seconds between retries of the local kvstore and of pending endpoints
TICK = 0.2  # housekeeping period, seconds


class Meshd:
    """The agent; :meth:`start` then :meth:`stop` (or :func:`main`)."""

    def __init__(self, config: AgentConfig, *, client_factory=None, remote_client_factory=None, metrics=True):
        self.config = config
        self.state = MeshState(config.cluster_name, config.cluster_id, config.node_name)
        self.registry = EndpointRegistry(pod_cidr=config.pod_cidr, on_change=self._endpoint_event)
        self.client_factory = client_factory or (lambda: KVStoreClient.from_config_file(config.kvstore_config))
        self.remote_client_factory = remote_client_factory
        self.want_metrics = metrics and config.metrics_port > 0
        self.metrics = None
        self.metrics_server = None
        self.health = HealthChecker(on_change=self._health_changed)
        self.client: KVStoreClient | None = None
        self.lease = None
        self.local_view = ClusterView(
            config.cluster_name,
            self._local_change,
            cluster_id=config.cluster_id,
            max_connected=config.max_connected_clusters,
        )
        self.clusters: ClusterSet | None = None
        self.datapath = None
        self.maps = None
        self.sync = None
        self.server: AgentServer | None = None
        self.started = time.time()
        self.local_listed = threading.Event()  # cilium/state/ and our prefix listed once
        self.synced = threading.Event()  # initial sync done: the maps follow the mesh from here on
        self.connected = False
        self.leader_holder: str | None = None
        self.last_error: str | None = None
        self.reconciles = 0
        self.last_reconcile: dict[str, Any] = {}
        self._listed_prefixes: set[str] = set()
        self._stop = threading.Event()
        self._wake_housekeeping = threading.Event()
        self._endpoints: queue.Queue = queue.Queue()
        self._pending: dict[tuple[str, str], dict[str, Any]] = {}  # endpoints waiting for the kvstore
        self._published_slices: dict[tuple[str, str], bytes] = {}
        self._exported: dict[tuple[str, str], bytes | None] = {}
        self._export_version = -1
        self._housekeeping_version = -1
        self._unprobed = False  # a backend waits for its first health check
        self._last_heartbeat = 0.0
        self._canaries_written = False
        self._rejections_seen: dict[str, int] = {}
        self.policy_rejections: dict[str, str] = {}  # kvstore key -> why the policy there was skipped
        self._watchers: list[Any] = []
        self._threads: list[threading.Thread] = []

    # ------------------------------------------------------------------------------------
    # lifecycle
    # ------------------------------------------------------------------------------------
    def start(self) -> Meshd:
        from . import bpf_loader
        from .bpf_maps import DatapathMaps
        from .datapath_sync import DatapathSync
        from .ipam import read_allocations

        config = self.config
        self.datapath = bpf_loader.load(config.bpf_object, config.pin_dir)
        self.maps = DatapathMaps(config.pin_dir)
        self.sync = DatapathSync(self.maps)
        self.sync.adopt()
        log.info(
            "datapath loaded from %s, maps pinned in %s (%s)", config.bpf_object, config.pin_dir, self.sync.counts()
        )
        if self.want_metrics:
            from .agent_metrics import AgentMetrics

            self.metrics = AgentMetrics()
            self.metrics_server = self.metrics.serve(config.metrics_address, config.metrics_port)
        skipped = self.registry.load_allocations(read_allocations(config.ipam_dir, config.ipam_network))
        for record, reason in skipped:
            log.warning("pod %s from the IPAM records skipped: %s", record.get("ip"), reason)
        self.server = AgentServer(config.api_socket, self._api(), log=log.debug).start()
        self.health.start()
        self.clusters = ClusterSet(
            config.clusters_dir,
            self._remote_change,
            local_cluster=config.cluster_name,
            local_cluster_id=config.cluster_id,
            max_connected=config.max_connected_clusters,
            poll_interval=config.clusters_poll_interval,
            **({"client_factory": self.remote_client_factory} if self.remote_client_factory else {}),
        ).start()
        for target in (self._local_loop, self._endpoint_loop, self._housekeeping_loop, self._reconcile_loop):
            thread = threading.Thread(target=self._guard(target), name="meshd" + target.__name__, daemon=True)
            thread.start()
            self._threads.append(thread)
        log.info("meshd started: cluster %s (ID %d), node %s", config.cluster_name, config.cluster_id, config.node_name)
        return self

    def _guard(self, loop):
        def run():
            while not self._stop.is_set():
                try:
                    loop()
                    return
                except Exception:  # noqa: BLE001 - a bug in one loop must not stop the agent
                    log.exception("%s failed; restarting it", loop.__name__)
                    self._stop.wait(RETRY)

        return run

    def stop(self) -> None:
        """Clean stop: the node's records go with its lease; maps and tc programs stay (traffic flows)."""
        self._stop.set()
        self._wake_housekeeping.set()
        self._endpoints.put(None)
        with self.state.changed:
            self.state.changed.notify_all()
        for watcher in self._watchers:
            watcher.stop()
        if self.clusters is not None:
            self.clusters.stop(flush=False)
        self.health.stop()
        for thread in self._threads:
            thread.join(5)
        if self.server is not None:
            self.server.close()
        client = self.client
        if client is not None:
            if self.lease is not None:
                try:
                    client.lease_revoke(self.lease)  # our node, ipcache entries and slices go at once
                except KVStoreError as exc:
                    log.warning("revoking the lease failed (its entries expire with it): %s", exc)
            client.close()
        if self.metrics_server is not None:
            self.metrics_server.close()
        if self.maps is not None:
            self.maps.close()
        if self.datapath is not None:
            self.datapath.close()
        log.info("meshd stopped")

    # ------------------------------------------------------------------------------------
    # local kvstore
    # ------------------------------------------------------------------------------------
    def _local_loop(self) -> None:
        while not self._stop.is_set():
            try:
                self._connect_local()
                self._stop.wait()  # the watchers and the lease keeper run in their own threads
            except Exception as exc:  # noqa: BLE001 - retried; the maps keep serving meanwhile
                self.last_error = f"local kvstore: {exc}"
                log.warning("local kvstore: %s; retrying in %.0f s", exc, RETRY)
                self._disconnect_local()
                self._stop.wait(RETRY)

    def _connect_local(self) -> None:
        config = self.config
        client = self.client_factory()
        self.client = client
        found = client.get(layout.cluster_config_key(config.cluster_name))
        if found is not None:
            cluster_config = layout.decode_cluster_config(found.value)
            if cluster_config.id != config.cluster_id:
                raise RuntimeError(
                    f"the kvstore says cluster {config.cluster_name} has ID {cluster_config.id}, "
                    f"agent.yaml says {config.cluster_id}: fix cluster_id in {config.kvstore_config}'s cluster"
                )
        self.lease = client.lease_grant(config.lease_ttl)
        lost = threading.Event()
        keeper = client.keep_lease_alive(self.lease, on_lost=lambda _exc: lost.set())
        self._register_node()
        self.connected = True
        self.last_error = None
        self._published_slices.clear()
        self._exported.clear()
        self._export_version = -1
        for endpoint in self.registry.list():  # publish again under the new lease
            self._endpoints.put(("add", endpoint))
        for prefix in (layout.STATE_PREFIX, layout.OWN_PREFIX):
            watcher = client.watch_prefix(prefix)
            watcher.start_thread(lambda update, prefix=prefix: self._local_update(prefix, update))
            self._watchers.append(watcher)
        log.info("local kvstore connected (%s), lease %x", ", ".join(client.endpoints), self.lease.id)
        while not self._stop.wait(RETRY):
            if lost.is_set():
                keeper.stop()
                raise RuntimeError("the node's lease was lost (the kvstore was away longer than its TTL)")

    def _disconnect_local(self) -> None:
        self.connected = False
        for watcher in self._watchers:
            watcher.stop()
        self._watchers = []
        client, self.client = self.client, None
        if client is not None:
            client.close()

    def _register_node(self) -> None:
        from .agent_kvstore import register_node

        config = self.config
        node = make_node_record(
            config.node_name,
            config.cluster_name,
            config.cluster_id,
            [("InternalIP", config.node_ip)],
            ipv4_alloc_cidr=config.pod_cidr,
            max_connected=config.max_connected_clusters,
        )
        register_node(self.client, node, self.lease)

    def _local_update(self, prefix: str, update) -> None:
        from .kvstore_client import UPDATE_EVENTS

        if update.kind == UPDATE_EVENTS:
            changes = [(e.key, e.value if e.type == EVENT_PUT else None) for e in update.events]
        else:
            changes = [(kv.key, kv.value) for kv in update.snapshot]
        if prefix == layout.STATE_PREFIX:
            # this cluster's own ClusterServices: the agents derive them from the slices, never read them
            own_services = layout.services_prefix(self.config.cluster_name)
            changes = [(key, value) for key, value in changes if not key.startswith(own_services)]
            if update.kind == UPDATE_EVENTS:
                for key, value in changes:
                    if value is None:
                        self.local_view.delete(key)
                    else:
                        self.local_view.put(key, value)
            else:
                self.local_view.reconcile(changes)
        else:
            self._own_update(changes, full=update.kind != UPDATE_EVENTS)
        self._count("local", "kvstore", len(changes))
        if update.kind != UPDATE_EVENTS:
            self._listed_prefixes.add(prefix)
            if self._listed_prefixes >= {layout.STATE_PREFIX, layout.OWN_PREFIX}:
                self.local_listed.set()
        self._wake_housekeeping.set()

    def _own_update(self, changes, full: bool) -> None:
        """Declarations, backend slices, the leader key and policies (``cilium/clustermesh-core/``)."""
        if full:  # a (re)listing: what is not in it is gone
            self._policy_update([(k, v) for k, v in changes if k.startswith(layout.POLICIES_PREFIX)], full=True)
            present = {key for key, _value in changes}
            for ns, name in list(self.state.declarations):
                if layout.service_declaration_key(ns, name) not in present:
                    self.state.delete_declaration(ns, name)
            for (ns, name), per in list(self.state.slices.items()):
                for node in list(per):
                    if layout.backend_slice_key(ns, name, node) not in present:
                        self.state.put_slice(ns, name, node, None)
            if layout.SERVICE_EXPORT_LEADER_KEY not in present:
                self.leader_holder = None
        for key, value in changes:
            try:
                if key.startswith(layout.SERVICE_DECLARATIONS_PREFIX):
                    parsed = layout.parse_service_declaration_key(key)
                    if value is None:
                        self.state.delete_declaration(parsed.namespace, parsed.name)
                    else:
                        decl = decode_declaration(value, namespace=parsed.namespace, name=parsed.name)
                        self.state.put_declaration(decl)
                elif key.startswith(layout.BACKEND_SLICES_PREFIX):
                    parsed = layout.parse_backend_slice_key(key)
                    ips = None if value is None else decode_backend_slice(value, parsed.node)
                    self.state.put_slice(parsed.namespace, parsed.name, parsed.node, ips)
                elif key == layout.SERVICE_EXPORT_LEADER_KEY:
                    self.leader_holder = None if value is None else value.decode("utf-8", "replace")
                elif key.startswith(layout.POLICIES_PREFIX) and not full:
                    self._policy_update([(key, value)], full=False)
            except (layout.KeyLayoutError, ServiceError, StateError) as exc:
                log.warning("local kvstore: skipped %s: %s", key, exc)
                self._failure(self.config.cluster_name, "invalid_value")

    def _policy_update(self, changes, full: bool) -> None:
        """Imported policies: a bad one is skipped (logged, counted, shown in status); the others apply."""
        found = {}
        for key, value in changes:
            self.policy_rejections.pop(key, None)
            try:
                parsed = layout.parse_policy_key(key)
                ref = f"{parsed.namespace}/{parsed.kind}/{parsed.name}"
                policy = None if value is None else decode_policy(value, where=key)
                if policy is not None and policy.ref != ref:
                    raise PolicyError(f"{key}: the document is {policy.ref}, the key says {ref}")
            except (layout.KeyLayoutError, PolicyError) as exc:
                log.warning("local kvstore: policy skipped: %s", exc)
                self.policy_rejections[key] = str(exc)
                self._failure(self.config.cluster_name, "invalid_value")
                continue
            if full:
                if policy is not None:
                    found[ref] = policy
            else:
                self.state.put_policy(ref, policy)
        if full:
            present = {key for key, _value in changes}
            self.policy_rejections = {k: v for k, v in self.policy_rejections.items() if k in present}
            self.state.replace_policies(found)

    def _local_change(self, cluster, kind, key, old, new) -> None:
        self.state.apply_cluster_change(cluster, kind, key, old, new)

    def _remote_change(self, cluster, kind, key, old, new) -> None:
        self.state.apply_cluster_change(cluster, kind, key, old, new)
        self._count(cluster, kind)

    # ------------------------------------------------------------------------------------
    # endpoints
    # ------------------------------------------------------------------------------------
    def _endpoint_event(self, event: str, endpoint: dict[str, Any]) -> None:
        self._endpoints.put((event, endpoint))

    def _endpoint_loop(self) -> None:
        from .agent_kvstore import IdentityAllocator

        allocator = None
        allocator_client = None
        while not self._stop.is_set():
            try:
                item = self._endpoints.get(timeout=RETRY)
            except queue.Empty:
                item = None
            if self._stop.is_set():
                return
            if item is not None:
                event, endpoint = item
                key = (endpoint["containerID"], endpoint["ifname"])
                if event == "del":
                    self._pending.pop(key, None)
                    self._withdraw(endpoint)
                    continue
                self._attach(endpoint)
                self._pending[key] = endpoint
            if not self._pending or self.client is None or self.lease is None:
                continue
            if allocator is None or allocator_client is not self.client:
                allocator_client = self.client
                allocator = IdentityAllocator(
                    allocator_client,
                    self.config.cluster_name,
                    self.config.cluster_id,
                    max_connected=self.config.max_connected_clusters,
                )
            for key, endpoint in list(self._pending.items()):
                if self.registry.get(*key) is not endpoint and self.registry.get(*key) != endpoint:
                    self._pending.pop(key, None)  # replaced or removed meanwhile
                    continue
                try:
                    self._publish_endpoint(allocator, endpoint)
                    self._pending.pop(key, None)
                except (KVStoreError, StateError) as exc:
                    log.warning("endpoint %s: %s; retrying", endpoint["ip"], exc)
                    self._failure(self.config.cluster_name, "other")
                    break
                except Exception as exc:  # noqa: BLE001 - e.g. the identity range is full: keep the rest going
                    log.error("endpoint %s: %s", endpoint["ip"], exc)
                    self._pending.pop(key, None)

    def _attach(self, endpoint: dict[str, Any]) -> None:
        interface = endpoint.get("hostInterface")
        if not interface:
            return
        try:
            self.datapath.attach(interface)
            endpoint["ifindex"] = socket.if_nametoindex(interface)  # the key of its policy in the datapath
        except Exception as exc:  # noqa: BLE001 - a veth gone meanwhile; the pod has no service datapath
            log.warning("endpoint %s: cannot attach the datapath to %s: %s", endpoint["ip"], interface, exc)
            self._failure(self.config.cluster_name, "map_write")

    def _publish_endpoint(self, allocator, endpoint: dict[str, Any]) -> None:
        from .agent_kvstore import publish_ipcache_entry

        allocation = allocator.allocate(endpoint_identity_labels(endpoint))
        entry = make_ipcache_entry(endpoint["ip"], allocation.id, self.config.node_ip)
        publish_ipcache_entry(self.client, entry, self.lease)
        stored = dict(
            endpoint,
            identity=allocation.id,
            identity_labels=labels_as_dict(parse_label_string(allocation.label_string)),
        )
        self.state.put_endpoint(stored)
        self._count("local", "endpoint")
        log.info("endpoint %s: identity %d", endpoint["ip"], allocation.id)
        self._wake_housekeeping.set()

    def _withdraw(self, endpoint: dict[str, Any]) -> None:
        from .agent_kvstore import withdraw_ipcache_entry

        self.state.delete_endpoint(endpoint)
        self._count("local", "endpoint")
        self._wake_housekeeping.set()
        client, lease = self.client, self.lease
        if client is None or lease is None:
            return  # our entry goes with the lease anyway
        try:
            withdraw_ipcache_entry(client, endpoint["ip"], lease)
        except KVStoreError as exc:
            log.warning("endpoint %s: withdrawing its ipcache entry failed: %s", endpoint["ip"], exc)

    # ------------------------------------------------------------------------------------
    # health, slices, export, heartbeat, canaries
    # ------------------------------------------------------------------------------------
    def _health_changed(self, target, healthy: bool) -> None:
        self.state.set_health(target, healthy)
        log.info("backend %s:%d is %s", target.ip, target.port, "healthy" if healthy else "unhealthy")
        self._wake_housekeeping.set()

    def _housekeeping_loop(self) -> None:
        while not self._stop.is_set():
            self._wake_housekeeping.wait(TICK)
            self._wake_housekeeping.clear()
            if self._stop.is_set():
                return
            # first: the maps wait for this, publishing below may take long (thousands of services)
            if not self.synced.is_set() and self._initial_sync_done():
                self.synced.set()
                self.state.mark_all()
                log.info("initial sync done in %.2f s", time.time() - self.started)
            client, lease = self.client, self.lease
            version = self.state.version
            changed = version != self._housekeeping_version or self._unprobed
            if changed:
                targets = self.state.health_targets()
                self.health.set_targets({t for per in targets.values() for t in per.values()})
            if client is not None and lease is not None and self.local_listed.is_set():
                try:
                    # endpoints reloaded at start are published first: a slice without them would take
                    # their backends away from every node of the cluster for a moment
                    if changed and not self._pending:
                        self._publish_slices(client, lease, targets)
                        self._housekeeping_version = version
                    self._lead(client, lease)
                    # after the local sync only: a cluster waiting for the others' canaries before writing
                    # its own would make every agent of a new mesh wait for initial_sync_timeout
                    if not self._canaries_written and self.connected and not self._pending:
                        self._write_canaries(client)
                except KVStoreError as exc:
                    log.warning("local kvstore: %s", exc)
                    self._failure(self.config.cluster_name, "other")
            self._refresh_metrics()

    def _publish_slices(self, client, lease, targets) -> None:
        from .agent_kvstore import delete_if_ours, put_if_changed

        slices = self.state.node_slices()
        self._unprobed = False
        for key, ips in slices.items():
            if any(self.health.healthy(t) is None for t in targets.get(key, {}).values()):
                self._unprobed = True
                continue  # not probed yet: keep what is published (a restart must not empty it)
            value = encode_backend_slice(self.config.node_name, ips)
            if self._published_slices.get(key) != value:
                put_if_changed(client, layout.backend_slice_key(key[0], key[1], self.config.node_name), value, lease)
                self._published_slices[key] = value
        for key in [k for k in self._published_slices if k not in slices]:
            delete_if_ours(client, layout.backend_slice_key(key[0], key[1], self.config.node_name), lease)
            del self._published_slices[key]
        # slices of services no longer declared, left by a previous run of this agent
        for (ns, name), per in list(self.state.slices.items()):
            if self.config.node_name in per and (ns, name) not in slices and (ns, name) not in self._published_slices:
                client.delete(layout.backend_slice_key(ns, name, self.config.node_name))

    def _lead(self, client, lease) -> None:
        from .agent_kvstore import put_if_changed, write_heartbeat

        node = self.config.node_name
        if self.leader_holder is None and client.put_if_absent(layout.SERVICE_EXPORT_LEADER_KEY, node, lease=lease):
            self.leader_holder = node
            log.info("this node now publishes the cluster's services and heartbeat")
        if self.leader_holder != node:
            return
        now = time.monotonic()
        if now - self._last_heartbeat >= self.config.heartbeat_interval:
            write_heartbeat(client)
            self._last_heartbeat = now
        if self._export_version == -1:  # a new leader or a new connection: every service once
            self.state.take_export_changes()
            keys = set(self.state.declarations) | set(self._exported)
        else:
            keys = self.state.take_export_changes()
        if not keys:
            return
        try:
            for (ns, name), svc in self.state.exports(keys).items():
                value = None if svc is None else encode_cluster_service(svc)
                key_known = (ns, name) in self._exported
                if key_known and self._exported[(ns, name)] == value:
                    continue
                key = layout.service_key(self.config.cluster_name, ns, name)
                if value is None:
                    if key_known or client.get(key) is not None:
                        client.delete(key)
                else:
                    put_if_changed(client, key, value)
                if value is None and (ns, name) not in self.state.declarations:
                    self._exported.pop((ns, name), None)
                else:
                    self._exported[(ns, name)] = value
        except KVStoreError:
            self._export_version = -1  # what was taken is not all written: everything again next time
            raise
        self._export_version = 0

    def _write_canaries(self, client) -> None:
        stamp = layout.encode_timestamp()
        for prefix in layout.SYNCED_STATE_PREFIXES:
            client.put_if_absent(layout.synced_key(self.config.cluster_name, prefix), stamp)
        self._canaries_written = True

    def _initial_sync_done(self) -> bool:
        if not self.local_listed.is_set() or not self.connected:
            return False
        if self._pending:
            return False
        if time.time() - self.started >= self.config.initial_sync_timeout:
            return True
        return all(cluster["synced"] for cluster in self.clusters.status().values())

    # ------------------------------------------------------------------------------------
    # reconcile: mesh state -> BPF maps
    # ------------------------------------------------------------------------------------
    def _reconcile_loop(self) -> None:
        trimmed = False
        while not self._stop.is_set():
            if not self.synced.is_set():
                self._stop.wait(TICK / 2)
                continue
            if not self.state.wait_dirty(1.0):
                continue
            dirty = self.state.take_dirty()
            started = time.perf_counter()
            try:
                result = {}
                if dirty.services:
                    before = dict(self.state.conflicts)
                    result["services"] = self.sync.sync_services(self.state.frontends(dirty.services))
                    for (ns, name), why in self.state.conflicts.items():
                        if before.get((ns, name)) != why:
                            log.error("service %s/%s left out of the maps: %s", ns, name, why)
                # policy before ipcache: a new peer's identity is allowed before the ipcache names it
                if dirty.policy:
                    result["policy"] = self.sync.sync_policy(self.state.policy_specs())
                if dirty.ipcache:
                    result["ipcache"] = self.sync.sync_ipcache(self.state.ipcache_specs(self.config.node_ip))
            except Exception as exc:  # noqa: BLE001 - retried with everything marked dirty
                log.error("writing the BPF maps failed: %s", exc)
                self._failure(self.config.cluster_name, "map_write")
                self.state.mark_all()
                self._stop.wait(RETRY)
                continue
            elapsed = time.perf_counter() - started
            self.reconciles += 1
            self.last_reconcile = {
                "time": time.time(),
                "seconds": round(elapsed, 6),
                "services": len(dirty.services),
                "ipcache": dirty.ipcache,
                "policy": dirty.policy,
                "result": {name: str(value) for name, value in result.items()},
            }
            if self.metrics is not None:
                self.metrics.observe_reconcile(elapsed)
            if not trimmed:
                trimmed = True
                _release_free_memory()  # the initial listings and the first plan are garbage now

    # ------------------------------------------------------------------------------------
    # metrics and status
    # ------------------------------------------------------------------------------------
    def _count(self, cluster: str, kind: str, count: int = 1) -> None:
        if self.metrics is not None and count:
            self.metrics.event_processed(cluster, kind, count)

    def _failure(self, cluster: str, reason: str) -> None:
        if self.metrics is not None:
            self.metrics.failure(cluster, reason)

    def _refresh_metrics(self) -> None:
        statuses = self.clusters.status()
        for name, status in statuses.items():
            if status.get("cluster_id"):
                self.state.set_cluster_id(name, status["cluster_id"])
        views = {self.config.cluster_name: self.local_view.rejections}
        views.update({name: status["rejected"] for name, status in statuses.items()})
        if self.metrics is None:
            return
        for name, rejected in views.items():
            delta = rejected - self._rejections_seen.get(name, 0)
            if delta > 0:
                self.metrics.failure(name, "invalid_value", delta)
            self._rejections_seen[name] = rejected
        for name in [n for n in self.metrics._connected if n not in statuses]:
            self.metrics.cluster_removed(name)
        for name, status in statuses.items():
            self.metrics.cluster_connected(name, status["connected"])
            if status.get("last_sync"):
                self.metrics.cluster_synced(name, status["last_sync"])
        for name, count in self.sync.counts().items():
            self.metrics.set_map_entries(name, count)

    def clusters_report(self) -> list[dict[str, Any]]:
        rows = []
        for name, status in self.clusters.status().items():
            counts = status.get("counts", {})
            rows.append(
                {
                    "name": name,
                    "id": status.get("cluster_id"),
                    "connected": status.get("connected"),
                    "synced": status.get("synced"),
                    "last_sync": status.get("last_sync"),
                    "failures": status.get("rejected", 0),
                    "nodes": counts.get("node", 0),
                    "endpoints": counts.get("ipcache", 0),
                    "services": counts.get("service", 0),
                    "last_error": status.get("last_error"),
                    "last_rejections": status.get("last_rejections", []),
                }
            )
        return rows

    def status(self) -> dict[str, Any]:
        clusters = {row["name"]: row for row in self.clusters_report()} if self.clusters else {}
        return {
            "cluster": self.config.cluster_name,
            "cluster_id": self.config.cluster_id,
            "node": self.config.node_name,
            "synced": self.synced.is_set(),
            "kvstore": {
                "connected": self.connected,
                "listed": self.local_listed.is_set(),
                "rejected": self.local_view.rejections,
                "last_error": self.last_error,
            },
            "leader": self.leader_holder,
            "clusters": clusters,
            "services": len(self.state.declarations),
            "policies": sorted(self.state.policies),
            "policy_rejections": dict(self.policy_rejections),
            "service_conflicts": {"/".join(key): why for key, why in self.state.conflicts.items()},
            "state": dict(self.state.counts()),
            "maps": self.sync.counts() if self.sync else {},
            "pending_endpoints": len(self._pending),
            "reconciles": self.reconciles,
            "last_reconcile": self.last_reconcile,
            "health": self.health.status(),
        }

    def _api(self):
        api = default_api(self.registry, status=self.status)
        api.route("GET", API_PREFIX + "/clusters", lambda _r: {"clusters": self.clusters_report()})
        api.route("GET", API_PREFIX + "/services", lambda _r: {"services": self.state.services_report()})
        api.route("GET", API_PREFIX + "/identities", lambda _r: {"identities": self.state.identities_report()})

        def endpoints(_request):
            published = {(e["containerID"], e["ifname"]): e for e in self.state.endpoints.values()}
            rows = []
            for endpoint in self.registry.list():
                known = published.get((endpoint["containerID"], endpoint["ifname"]), {})
                rows.append(dict(endpoint, identity=known.get("identity")))
            return {"endpoints": rows}

        api.route("GET", API_PREFIX + "/endpoints", endpoints)
        api.route(
            "GET", API_PREFIX + "/policy/{endpoint}", lambda r: {"policy": self.policy_report(r.params["endpoint"])}
        )
        api.route("GET", API_PREFIX + "/drops", lambda _r: {"drops": self.drops_report()})
        return api

    def _find_endpoint(self, name: str) -> dict[str, Any]:
        """An endpoint of this node by pod IP, host interface, container ID (or a prefix of it)."""
        from .agent_api import ApiError

        endpoints = list(self.state.endpoints.values())
        exact = [e for e in endpoints if name in (e.get("ip"), e.get("hostInterface"), e.get("containerID"))]
        found = exact or [e for e in endpoints if str(e.get("containerID", "")).startswith(name)]
        if len(found) != 1:
            known = ", ".join(sorted(e["ip"] for e in endpoints)) or "none"
            why = "matches several endpoints" if found else "is not an endpoint of this node"
            raise ApiError(404, f"{name!r} {why} (give a pod IP, host interface or container ID; endpoints: {known})")
        return found[0]

    def policy_report(self, name: str) -> dict[str, Any]:
        endpoint = self._find_endpoint(name)
        report = self.state.endpoint_policy_report(endpoint)
        report.update({key: endpoint.get(key) for key in ("ip", "containerID", "hostInterface", "ifindex", "identity")})
        report["labels"] = endpoint.get("identity_labels")
        return report

    def drops_report(self) -> list[dict[str, Any]]:
        """The datapath's drop counters, with endpoints and peers named."""
        by_ifindex = {e.get("ifindex"): e for e in self.state.endpoints.values()}
        names = {row["id"]: row for row in self.state.identities_report()}
        rows = []
        for drop in self.maps.drops():
            endpoint = by_ifindex.get(drop["ifindex"], {})
            peer = names.get(drop["identity"])
            rows.append(
                dict(
                    drop,
                    endpoint=endpoint.get("ip"),
                    pod=(endpoint.get("args") or {}).get("K8S_POD_NAME"),
                    peer=",".join(peer["labels"]) if peer else _RESERVED.get(drop["identity"], str(drop["identity"])),
                )
            )
        return sorted(rows, key=lambda row: (-row["packets"], str(row["endpoint"])))


_RESERVED = {0: "-", 1: "reserved:host", 2: "reserved:world", 6: "reserved:remote-node"}


def endpoint_identity_labels(endpoint: dict[str, Any]) -> dict[str, str]:
    """The pod's labels plus its namespace as Cilium labels it (the namespace comes from CNI_ARGS
    ``K8S_POD_NAMESPACE``, default ``default``): ``io.kubernetes.pod.namespace`` and the namespace's
    ``kubernetes.io/metadata.name`` label, which NetworkPolicy namespaceSelectors match."""
    namespace = (endpoint.get("args") or {}).get("K8S_POD_NAMESPACE") or "default"
    labels = {k: v for k, v in (endpoint.get("labels") or {}).items() if k.split(":", 1)[-1] != NAMESPACE_LABEL}
    labels[NAMESPACE_LABEL] = namespace
    labels[NAMESPACE_LABELS_PREFIX + "kubernetes.io/metadata.name"] = namespace
    return labels


def _release_free_memory() -> None:
    """Give the heap's free pages back to the kernel (glibc keeps them after a burst of allocations:
    at 5,000 services the initial sync leaves tens of MB of free heap in the process)."""
    import ctypes
    import ctypes.util
    import gc

    gc.collect()
    try:
        ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass  # not glibc


# ----------------------------------------------------------------------------------------
# the command
# ----------------------------------------------------------------------------------------
def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="meshd", description="The clustermesh node agent.")
    p.add_argument("--config", default="/etc/clustermesh/agent.yaml", metavar="FILE", help="default %(default)s")
    p.add_argument("--check", action="store_true", help="validate the configuration file and exit")
    return p


def main(argv=None) -> int:
    args = parser().parse_args(argv)
    try:
        config = load_agent_config(args.config)
    except AgentConfigError as exc:
        sys.stderr.write(f"meshd: {exc}\n")
        return EXIT_CONFIG
    if args.check:
        sys.stdout.write(f"meshd: {args.config} is valid\n")
        return 0
    logging.basicConfig(
        level=getattr(logging, config.log_level.upper()),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    stop = threading.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda _signum, _frame: stop.set())
    agent = Meshd(config)
    try:
        agent.start()
    except Exception as exc:  # noqa: BLE001 - reported, and the supervisor retries
        log.error("cannot start: %s", exc)
        agent.stop()
        return EXIT_FAILED
    stop.wait()
    agent.stop()
    return 0


if __name__ == "__main__":  # pragma: no cover
    os._exit(main())
