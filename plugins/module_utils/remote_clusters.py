# -*- coding: utf-8 -*-
# Copyright: clustermesh.core contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""The agent's view of remote clusters: one connection per file in ``clusters.d/``.

* :class:`ClusterView` (pure, no I/O): the validated state read from one remote cluster, one
  dict per kind (nodes, ipcache entries, identities, services).  Every value goes through
  :func:`mesh_state.decode_remote_value`; a bad one is logged, counted, remembered with its
  reason and skipped (a key whose value turns bad is removed from the view).  Full listings are
  reconciled against the view (keys gone are removed).  Each accepted change calls
  ``on_change(cluster, kind, key, old, new)`` (``old``/``new`` decoded values or None).
* :class:`RemoteCluster`: a thread that reads the cluster's etcd config file, connects, reads
  ``cilium/cluster-config/<name>`` (the cluster ID must be valid, match what is expected and
  not be the local cluster's), then lists and watches ``cilium/state/`` and
  ``cilium/synced/<name>/`` (list, then watch from revision + 1, through
  :meth:`kvstore_client.KVStoreClient.watch_prefix`).  A broken connection is retried with
  backoff; a fresh listing is reconciled against the view.
* :class:`ClusterSet`: polls the ``clusters.d`` directory and starts, restarts or stops
  :class:`RemoteCluster` objects as files appear, change or disappear, without touching the others.

No Ansible imports: the node agent uses this file as it is.
"""

from __future__ import annotations

import collections
import logging
import os
import random
import threading
import time
from collections.abc import Callable, Iterable
from typing import Any

from .kvstore_layout import (
    IDENTITY_ID_PREFIX,
    IP_PREFIX,
    NODES_PREFIX,
    SERVICES_PREFIX,
    STATE_PREFIX,
    SYNCED_STATE_PREFIXES,
    ClusterConfig,
    KeyLayoutError,
    cluster_config_key,
    decode_cluster_config,
    parse_synced_key,
    synced_prefix,
    validate_cluster_name,
)
from .mesh_model import DEFAULT_MAX_CONNECTED_CLUSTERS
from .mesh_state import KIND_IDENTITY, KIND_IPCACHE, KIND_NODE, KIND_SERVICE, StateError, decode_remote_value

log = logging.getLogger(__name__)

KINDS = (KIND_NODE, KIND_IPCACHE, KIND_IDENTITY, KIND_SERVICE)
# Keys under cilium/state/ that carry a value this module decodes; anything else there (Cilium's
# identity allocator keys ``identities/v1/value/...``, future kinds) is ignored, not rejected.
_DECODED_PREFIXES = (NODES_PREFIX, IP_PREFIX, IDENTITY_ID_PREFIX, SERVICES_PREFIX)
LAST_REJECTIONS = 20

OnChange = Callable[[str, str, str, Any, Any], None]


class RemoteClusterError(Exception):
    """A remote cluster cannot be used as configured (bad cluster config, unexpected ID, ...)."""


# --------------------------------------------------------------------------------------------
# the view (pure)
# --------------------------------------------------------------------------------------------


class ClusterView:
    """Validated state of one remote cluster; thread-safe; calls ``on_change`` for each accepted change.

    ``cluster_id`` must be set (:meth:`set_cluster_id`) before values are applied: it is what
    ipcache entries, identities, nodes and services are checked against.
    """

    def __init__(
        self,
        cluster: str,
        on_change: OnChange | None = None,
        *,
        cluster_id: int | None = None,
        max_connected: int = DEFAULT_MAX_CONNECTED_CLUSTERS,
    ):
        self.cluster = validate_cluster_name(cluster)
        self.on_change = on_change
        self.cluster_id = cluster_id
        self.max_connected = max_connected
        self.entries: dict[str, dict[str, Any]] = {kind: {} for kind in KINDS}
        self._kind_of: dict[str, str] = {}
        self.rejected: dict[str, str] = {}  # key -> reason, for keys currently rejected
        self.last_rejections: collections.deque = collections.deque(maxlen=LAST_REJECTIONS)
        self.events = 0  # puts and deletes received (listings count one per key)
        self.changes = 0  # accepted changes (callbacks made)
        self.rejections = 0  # values rejected, in total
        self.ignored = 0  # keys under cilium/state/ that are not decoded
        self.callback_errors = 0
        self.last_event: float | None = None  # time.time() of the last event
        self.lock = threading.RLock()

    def set_cluster_id(self, cluster_id: int) -> None:
        with self.lock:
            self.cluster_id = cluster_id

    # -- counts ---------------------------------------------------------------------------
    def counts(self) -> dict[str, int]:
        with self.lock:
            return {kind: len(values) for kind, values in self.entries.items()}

    def snapshot(self) -> dict[str, dict[str, Any]]:
        """A copy of the view: ``{kind: {key: decoded value}}``."""
        with self.lock:
            return {kind: dict(values) for kind, values in self.entries.items()}

    # -- changes --------------------------------------------------------------------------
    def _emit(self, kind: str, key: str, old: Any, new: Any) -> None:
        self.changes += 1
        if self.on_change is None:
            return
        try:
            self.on_change(self.cluster, kind, key, old, new)
        except Exception:  # noqa: BLE001 - a consumer bug must not stop the watch
            self.callback_errors += 1
            log.exception("cluster %s: on_change failed for %s", self.cluster, key)

    def _remove(self, key: str) -> bool:
        kind = self._kind_of.pop(key, None)
        if kind is None:
            return False
        old = self.entries[kind].pop(key)
        self._emit(kind, key, old, None)
        return True

    def _reject(self, key: str, reason: str) -> None:
        self.rejections += 1
        self.rejected[key] = reason
        self.last_rejections.append((time.time(), key, reason))
        log.warning("cluster %s: rejected %s", self.cluster, reason)
        self._remove(key)

    def put(self, key: str, value: bytes | str) -> bool:
        """Apply a put read from the cluster; True when the view changed."""
        with self.lock:
            self.events += 1
            self.last_event = time.time()
            if not key.startswith(_DECODED_PREFIXES):
                self.ignored += 1
                return False
            if self.cluster_id is None:
                raise RemoteClusterError(f"cluster {self.cluster}: values applied before its cluster ID is known")
            try:
                decoded = decode_remote_value(
                    key, value, cluster=self.cluster, cluster_id=self.cluster_id, max_connected=self.max_connected
                )
            except StateError as exc:
                self._reject(key, str(exc))
                return False
            self.rejected.pop(key, None)
            kind = decoded.kind
            old_kind = self._kind_of.get(key)
            old = self.entries[old_kind].get(key) if old_kind else None
            if old_kind == kind and old == decoded.value:
                return False
            if old_kind is not None and old_kind != kind:  # cannot happen with distinct prefixes
                self._remove(key)
                old = None
            self._kind_of[key] = kind
            self.entries[kind][key] = decoded.value
            self._emit(kind, key, old, decoded.value)
            return True

    def delete(self, key: str) -> bool:
        """Apply a delete; True when the view changed."""
        with self.lock:
            self.events += 1
            self.last_event = time.time()
            self.rejected.pop(key, None)
            return self._remove(key)

    def reconcile(self, items: Iterable[tuple[str, bytes | str]], *, remove_missing: bool = True) -> set[str]:
        """Make the view equal a full listing of ``cilium/state/``.

        Returns the keys in the view that the listing lacks ("stale"); they are removed unless
        ``remove_missing`` is False (the caller then removes them with :meth:`remove_stale` once
        the cluster says it is synced, as Cilium does with synced canaries).
        """
        with self.lock:
            seen = set()
            for key, value in items:
                seen.add(key)
                self.put(key, value)
            stale = {key for key in self._kind_of if key not in seen}
            if remove_missing:
                for key in sorted(stale):
                    self._remove(key)
            for key in [key for key in self.rejected if key not in seen]:
                del self.rejected[key]
            return stale

    def remove_stale(self, keys: Iterable[str]) -> int:
        """Remove ``keys`` (stale keys a listing lacked); returns how many were still in the view."""
        with self.lock:
            return sum(1 for key in sorted(keys) if self._remove(key))

    def clear(self) -> int:
        """Remove everything (the cluster was disconnected for good), with callbacks."""
        with self.lock:
            before = self.changes
            for key in list(self._kind_of):
                self._remove(key)
            self.rejected.clear()
            return self.changes - before


# --------------------------------------------------------------------------------------------
# one remote cluster
# --------------------------------------------------------------------------------------------


def _default_client_factory(config):
    from .kvstore_client import KVStoreClient

    return KVStoreClient.from_config(
        config, timeout=5.0, connect_timeout=3.0, keepalive_time=5.0, keepalive_timeout=5.0
    )


def check_cluster_config(
    name: str,
    config: ClusterConfig,
    *,
    expected_id: int | None = None,
    local_cluster_id: int | None = None,
    max_connected: int = DEFAULT_MAX_CONNECTED_CLUSTERS,
) -> None:
    """Raise :class:`RemoteClusterError` when cluster ``name``'s config cannot be used here."""
    if config.max_connected_clusters != max_connected:
        raise RemoteClusterError(
            f"cluster {name}: maxConnectedClusters is {config.max_connected_clusters}, this cluster uses "
            f"{max_connected}; every cluster of a mesh must use the same value"
        )
    if expected_id is not None and config.id != expected_id:
        raise RemoteClusterError(f"cluster {name}: its cluster config says ID {config.id}, expected {expected_id}")
    if local_cluster_id is not None and config.id == local_cluster_id:
        raise RemoteClusterError(
            f"cluster {name}: ID {config.id} is the local cluster's own ID; cluster IDs must be unique in a mesh"
        )


class RemoteCluster:
    """A connection to one remote cluster, from its ``clusters.d`` file; see the module docstring.

    ``start()`` runs it in a daemon thread; ``stop(flush=True)`` ends it and (with ``flush``)
    removes everything it contributed, with callbacks.  ``status()`` is safe from any thread.
    ``client_factory(EtcdClientConfig)`` makes the kvstore client (tests pass plaintext options).
    """

    def __init__(
        self,
        name: str,
        config_path: str,
        on_change: OnChange | None = None,
        *,
        expected_cluster_id: int | None = None,
        local_cluster_id: int | None = None,
        max_connected: int = DEFAULT_MAX_CONNECTED_CLUSTERS,
        client_factory: Callable[[Any], Any] | None = None,
        backoff_initial: float = 0.5,
        backoff_max: float = 10.0,
        probe_interval: float = 1.0,
        id_claim: Callable[[str, int | None], str | None] | None = None,
    ):
        self.name = validate_cluster_name(name)
        self.config_path = config_path
        self.expected_cluster_id = expected_cluster_id
        self.local_cluster_id = local_cluster_id
        self.max_connected = max_connected
        self.client_factory = client_factory or _default_client_factory
        self.backoff_initial = backoff_initial
        self.backoff_max = backoff_max
        self.probe_interval = probe_interval
        self.view = ClusterView(name, on_change, max_connected=max_connected)
        self.cluster_config: ClusterConfig | None = None
        self.connected = False
        self.listed = False  # the current connection's initial listing is applied
        self.canaries: set[str] = set()
        self.last_error: str | None = None
        self.last_error_time: float | None = None
        self.connects = 0
        self.reconnects = 0
        self.last_sync: float | None = None
        self._stop = threading.Event()
        self._wake = threading.Event()
        self._fatal: BaseException | None = None
        self._thread: threading.Thread | None = None
        self._watchers: list[Any] = []
        self._degraded = False
        self._client: Any = None
        # keys a fresh listing lacked, kept until the cluster's synced canaries are all present
        self.pending_stale: set[str] = set()
        self.id_claim = id_claim

    # -- control --------------------------------------------------------------------------
    def start(self) -> RemoteCluster:
        if self._thread is not None:
            raise RemoteClusterError(f"cluster {self.name}: already started")
        self._thread = threading.Thread(target=self._run, name=f"remote-cluster-{self.name}", daemon=True)
        self._thread.start()
        return self

    def stop(self, *, flush: bool = True, timeout: float = 10.0) -> None:
        """Stop the connection (idempotent); with ``flush`` remove the cluster's entries, with callbacks."""
        self._stop.set()
        self._wake.set()
        for watcher in list(self._watchers):
            watcher.stop()
        client = self._client
        if client is not None:
            client.close()  # ends a call in flight (e.g. to an endpoint that does not answer)
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout)
        if self.id_claim is not None:
            self.id_claim(self.name, None)
        if flush:
            self.view.clear()
            self.pending_stale = set()

    @property
    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    @property
    def synced(self) -> bool:
        """The initial listing is applied and, if the cluster writes synced canaries, all are present."""
        with self.view.lock:
            if not self.listed or self.cluster_config is None:
                return False
            if not self.cluster_config.synced_canaries:
                return True
            return self._canaries_complete()

    def status(self) -> dict[str, Any]:
        with self.view.lock:
            view = self.view
            return {
                "name": self.name,
                "config_path": self.config_path,
                "connected": self.connected,
                "cluster_id": self.cluster_config.id if self.cluster_config else None,
                "synced": self.synced,
                "canaries": sorted(self.canaries),
                "counts": view.counts(),
                "events": view.events,
                "changes": view.changes,
                "rejected": view.rejections,
                "rejected_now": len(view.rejected),
                "last_rejections": [{"time": t, "key": k, "reason": r} for t, k, r in view.last_rejections],
                "ignored": view.ignored,
                "last_event": view.last_event,
                "last_sync": self.last_sync,
                "connects": self.connects,
                "reconnects": self.reconnects,
                "last_error": self.last_error,
                "last_error_time": self.last_error_time,
            }

    # -- the thread -----------------------------------------------------------------------
    def _error(self, message: str) -> None:
        with self.view.lock:
            self.connected = False
            self.last_error = message
            self.last_error_time = time.time()

    def _run(self) -> None:
        backoff = self.backoff_initial
        while not self._stop.is_set():
            started = time.monotonic()
            try:
                self._connect_once()
            except Exception as exc:  # noqa: BLE001 - reported in status, retried
                if self._stop.is_set():
                    break
                self._error(str(exc))
                log.warning("cluster %s: %s (retrying in %.1fs)", self.name, exc, backoff)
            if self._stop.is_set():
                break
            if time.monotonic() - started > 2 * self.backoff_max:
                backoff = self.backoff_initial  # it worked for a while: start over
            if self._stop.wait(backoff * random.uniform(0.8, 1.2)):
                break
            backoff = min(backoff * 2, self.backoff_max)
            self.reconnects += 1
        with self.view.lock:
            self.connected = False

    def _read_cluster_config(self, client) -> ClusterConfig:
        key = cluster_config_key(self.name)
        kv = client.get(key)
        if kv is None:
            raise RemoteClusterError(
                f"cluster {self.name}: {key} does not exist in its kvstore (is the file named after the cluster?)"
            )
        try:
            config = decode_cluster_config(kv.value)
        except KeyLayoutError as exc:
            raise RemoteClusterError(f"cluster {self.name}: {key}: {exc}") from None
        check_cluster_config(
            self.name,
            config,
            expected_id=self.expected_cluster_id,
            local_cluster_id=self.local_cluster_id,
            max_connected=self.max_connected,
        )
        if self.id_claim is not None:
            conflict = self.id_claim(self.name, config.id)
            if conflict:
                raise RemoteClusterError(
                    f"cluster {self.name}: ID {config.id} is already used by cluster {conflict}; "
                    "cluster IDs must be unique in a mesh"
                )
        return config

    def _connect_once(self) -> None:
        from .kvstore_config import load_etcd_config

        etcd_config = load_etcd_config(self.config_path, resolve_relative=True)
        client = self.client_factory(etcd_config)
        self._client = client
        try:
            config = self._read_cluster_config(client)
            with self.view.lock:
                self.cluster_config = config
                self.view.set_cluster_id(config.id)
                self.listed = False
                self.canaries = set()
                self._fatal = None
                self._degraded = False
                self.connects += 1
            self._wake.clear()
            state = client.watch_prefix(STATE_PREFIX, on_error=self._on_watch_error, backoff_max=self.backoff_max)
            synced = client.watch_prefix(
                synced_prefix(self.name), on_error=self._on_watch_error, backoff_max=self.backoff_max
            )
            self._watchers = [state, synced]
            if self._stop.is_set():
                return
            generation = self.connects  # updates of an older connection still in flight are dropped
            state.start_thread(lambda update: self._on_state_update(update, generation), on_exit=self._on_watch_exit)
            synced.start_thread(lambda update: self._on_synced_update(update, generation), on_exit=self._on_watch_exit)
            self._supervise(client, config)
        finally:
            for watcher in self._watchers:
                watcher.stop()
            self._watchers = []
            client.close()
            with self.view.lock:
                self.connected = False

    def _supervise(self, client, config: ClusterConfig) -> None:
        """Wait for stop or a fatal watch end; after a watch error probe until the store answers."""
        while not self._stop.is_set():
            self._wake.wait(self.probe_interval)
            self._wake.clear()
            if self._stop.is_set():
                return
            if self._fatal is not None:
                raise RemoteClusterError(f"cluster {self.name}: watch ended: {self._fatal}")
            if not self._degraded or not self.listed:
                continue
            try:
                current = self._read_cluster_config(client)
            except Exception as exc:  # noqa: BLE001 - the store is still away
                self._error(str(exc))
                if isinstance(exc, RemoteClusterError):
                    raise
                continue
            if current != config:
                raise RemoteClusterError(f"cluster {self.name}: its cluster config changed; reconnecting")
            with self.view.lock:
                self.connected = True
                self._degraded = False

    def _on_watch_error(self, exc) -> None:
        self._degraded = True  # until the supervisor's probe reads the cluster config again
        self._error(str(exc))

    def _on_watch_exit(self, error: BaseException | None) -> None:
        if error is not None and not self._stop.is_set():
            self._fatal = error
        self._wake.set()

    def _canaries_complete(self) -> bool:
        return all(prefix in self.canaries for prefix in SYNCED_STATE_PREFIXES)

    def _current(self, generation: int | None) -> bool:
        return not self._stop.is_set() and (generation is None or generation == self.connects)

    def _on_state_update(self, update, generation: int | None = None) -> None:
        from .kvstore_client import EVENT_PUT, UPDATE_EVENTS, UPDATE_INITIAL

        if update.kind == UPDATE_EVENTS:
            with self.view.lock:
                if not self._current(generation):
                    return
                for event in update.events:
                    if event.type == EVENT_PUT:
                        self.view.put(event.key, event.value)
                    else:
                        self.view.delete(event.key)
                    self.pending_stale.discard(event.key)
                if self.listed and not self._degraded:
                    self.connected = True
            return
        # initial or resync: the full listing is the truth; what it lacks is removed at once, or,
        # if the cluster writes synced canaries and they are not all there (its kvstore was
        # emptied and is being filled again), once they are.  The canaries are read after the
        # listing, so ones seen before it (maybe of the store's previous life) do not count.
        config = self.cluster_config
        canaries = None
        if config is not None and config.synced_canaries:
            canaries = self._read_canaries()
        with self.view.lock:
            if not self._current(generation):
                return
            if canaries is not None:
                self.canaries = canaries
            wait = bool(config and config.synced_canaries) and not self._canaries_complete()
            stale = self.view.reconcile(((kv.key, kv.value) for kv in update.snapshot), remove_missing=not wait)
            self.pending_stale = stale if wait else set()
            self.listed = True
            self.last_sync = time.time()
            if update.kind == UPDATE_INITIAL:
                self.connected = True
                self._degraded = False
            else:
                # a re-list (compaction, or a store that was reset): check the cluster config again
                self._degraded = True
                self._wake.set()

    def _read_canaries(self) -> set[str]:
        try:
            listing = self._client.get_prefix(synced_prefix(self.name))
        except Exception as exc:  # noqa: BLE001 - counted as "not synced yet"
            log.info("cluster %s: cannot read synced canaries: %s", self.name, exc)
            return set()
        return {p for p in (self._canary_prefix(kv.key) for kv in listing) if p}

    def _canary_prefix(self, key: str) -> str | None:
        try:
            parsed = parse_synced_key(key)
        except KeyLayoutError:
            return None
        return parsed.prefix if parsed.cluster == self.name else None

    def _on_synced_update(self, update, generation: int | None = None) -> None:
        from .kvstore_client import EVENT_PUT, UPDATE_EVENTS

        with self.view.lock:
            if not self._current(generation):
                return
            if update.kind == UPDATE_EVENTS:
                for event in update.events:
                    prefix = self._canary_prefix(event.key)
                    if prefix is None:
                        continue
                    if event.type == EVENT_PUT:
                        self.canaries.add(prefix)
                    else:
                        self.canaries.discard(prefix)
            else:  # a full listing
                self.canaries = {p for p in (self._canary_prefix(kv.key) for kv in update.snapshot) if p}
            if self.pending_stale and self._canaries_complete():
                self.view.remove_stale(self.pending_stale)
                self.pending_stale = set()


# --------------------------------------------------------------------------------------------
# the clusters.d directory
# --------------------------------------------------------------------------------------------


def cluster_file_name(entry: str) -> str | None:
    """The cluster a ``clusters.d`` entry configures, or None (certificates, hidden or other files)."""
    if entry.startswith(".") or "." in entry:
        return None
    try:
        return validate_cluster_name(entry)
    except KeyLayoutError:
        return None


def _fingerprint(path: str) -> tuple | None:
    """What must change for a cluster to be reconnected: the file and the TLS files it names."""
    try:
        with open(path, "rb") as handle:
            content = handle.read()
    except OSError:
        return None
    parts: list[Any] = [content]
    try:
        from .kvstore_config import load_etcd_config

        config = load_etcd_config(path, resolve_relative=True)
        files = (config.trusted_ca_file, config.cert_file, config.key_file)
    except Exception:  # noqa: BLE001 - the connection reports the error
        files = ()
    for name in files:
        if name is None:
            continue
        try:
            st = os.stat(name)
            parts.append((name, st.st_mtime_ns, st.st_size, st.st_ino))
        except OSError:
            parts.append((name, None))
    return tuple(parts)


class ClusterSet:
    """Every remote cluster of ``clusters.d``; :meth:`scan` (or the polling thread of :meth:`start`)
    connects clusters whose file appeared, reconnects those whose file (or TLS files) changed and
    disconnects (and flushes) those whose file disappeared.  A file named after ``local_cluster``
    is ignored, as Cilium does."""

    def __init__(
        self,
        directory: str,
        on_change: OnChange | None = None,
        *,
        local_cluster: str | None = None,
        local_cluster_id: int | None = None,
        max_connected: int = DEFAULT_MAX_CONNECTED_CLUSTERS,
        poll_interval: float = 2.0,
        cluster_factory: Callable[..., RemoteCluster] | None = None,
        **cluster_options: Any,
    ):
        self.directory = directory
        self.on_change = on_change
        self.local_cluster = local_cluster
        self.local_cluster_id = local_cluster_id
        self.max_connected = max_connected
        self.poll_interval = poll_interval
        self.cluster_factory = cluster_factory or RemoteCluster
        self.cluster_options = cluster_options
        self.clusters: dict[str, RemoteCluster] = {}
        self._claims: dict[str, int] = {}
        self._claims_lock = threading.Lock()
        self._fingerprints: dict[str, tuple | None] = {}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.scan_error: str | None = None

    def _wanted(self) -> dict[str, str]:
        try:
            entries = os.listdir(self.directory)
        except FileNotFoundError:
            self.scan_error = None
            return {}
        except OSError as exc:
            self.scan_error = f"cannot list {self.directory}: {exc.strerror}"
            raise
        self.scan_error = None
        wanted = {}
        for entry in entries:
            name = cluster_file_name(entry)
            path = os.path.join(self.directory, entry)
            if name is None or name == self.local_cluster or not os.path.isfile(path):
                continue
            wanted[name] = path
        return wanted

    def scan(self) -> dict[str, list[str]]:
        """One pass over the directory; returns ``{"added": [...], "changed": [...], "removed": [...]}``."""
        result: dict[str, list[str]] = {"added": [], "changed": [], "removed": []}
        with self._lock:
            if self._stop.is_set():
                return result
            try:
                wanted = self._wanted()
            except OSError:
                return result  # keep what runs; scan_error says why
            for name in sorted(set(self.clusters) - set(wanted)):
                self.clusters.pop(name).stop(flush=True)
                self._fingerprints.pop(name, None)
                result["removed"].append(name)
                log.info("cluster %s: file removed, disconnected", name)
            for name, path in sorted(wanted.items()):
                fingerprint = _fingerprint(path)
                if name in self.clusters:
                    if fingerprint == self._fingerprints.get(name):
                        continue
                    # keep the entries (no flush): the new connection reconciles them
                    old = self.clusters.pop(name)
                    old.stop(flush=False)
                    cluster = self._make(name, path)
                    cluster.view = old.view
                    result["changed"].append(name)
                    log.info("cluster %s: file changed, reconnecting", name)
                else:
                    cluster = self._make(name, path)
                    result["added"].append(name)
                    log.info("cluster %s: file added, connecting", name)
                self._fingerprints[name] = fingerprint
                self.clusters[name] = cluster
                cluster.start()
        return result

    def claim_id(self, name: str, cluster_id: int | None) -> str | None:
        """Record that cluster ``name`` uses ``cluster_id`` (None: releases it); returns the
        name of another cluster that already uses that ID (nothing recorded then)."""
        with self._claims_lock:
            if cluster_id is None:
                self._claims.pop(name, None)
                return None
            for other, used in self._claims.items():
                if other != name and used == cluster_id:
                    return other
            self._claims[name] = cluster_id
            return None

    def _make(self, name: str, path: str) -> RemoteCluster:
        return self.cluster_factory(
            name,
            path,
            self.on_change,
            local_cluster_id=self.local_cluster_id,
            max_connected=self.max_connected,
            id_claim=self.claim_id,
            **self.cluster_options,
        )

    def start(self) -> ClusterSet:
        """Scan now, then every ``poll_interval`` seconds in a daemon thread."""
        self.scan()
        self._thread = threading.Thread(target=self._poll, name="clusters.d-watch", daemon=True)
        self._thread.start()
        return self

    def _poll(self) -> None:
        while not self._stop.wait(self.poll_interval):
            try:
                self.scan()
            except Exception:  # noqa: BLE001 - keep polling
                log.exception("scanning %s failed", self.directory)

    def stop(self, *, flush: bool = False, timeout: float = 10.0) -> None:
        """Stop polling and every connection (``flush``: remove their entries, with callbacks)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)
        with self._lock:
            clusters, self.clusters = list(self.clusters.values()), {}
            self._fingerprints.clear()
        for cluster in clusters:
            cluster.stop(flush=flush, timeout=timeout)

    def status(self) -> dict[str, dict[str, Any]]:
        with self._lock:
            clusters = dict(self.clusters)
        return {name: cluster.status() for name, cluster in sorted(clusters.items())}

    def view(self) -> dict[str, dict[str, dict[str, Any]]]:
        """``{cluster: {kind: {key: value}}}`` of every connected cluster."""
        with self._lock:
            clusters = dict(self.clusters)
        return {name: cluster.view.snapshot() for name, cluster in sorted(clusters.items())}
