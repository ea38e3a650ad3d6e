# -*- coding: utf-8 -*-
# Copyright: clustermesh.core contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""The node agent's Prometheus metrics, defined once (prometheus_client), and their HTTP endpoint.

=================================================================  =========  =======================
metric                                                             type       labels
=================================================================  =========  =======================
``clustermesh_remote_clusters``                                    gauge      (none): connected remote clusters
``clustermesh_remote_cluster_connected``                           gauge      cluster: 1 connected, 0 not
``clustermesh_remote_cluster_last_sync_timestamp_seconds``         gauge      cluster: end of the last full sync
``clustermesh_remote_cluster_failures_total``                      counter    cluster, reason
``clustermesh_events_processed_total``                             counter    cluster, kind
``clustermesh_map_entries``                                        gauge      map: entries in a pinned BPF map
``clustermesh_reconcile_duration_seconds``                         histogram  (none): one reconcile of the maps
=================================================================  =========  =======================

``reason`` is one of :data:`FAILURE_REASONS` (``connect``, ``watch``, ``invalid_value``,
``identity_out_of_range``, ``map_write``, ``other``); ``kind`` names what an event was about (``node``,
``ipcache``, ``identity``, ``service``, ``endpoint``...). Each :class:`AgentMetrics` has its own registry,
so the agent and tests never share state. :meth:`AgentMetrics.serve` serves ``/metrics`` on
``127.0.0.1:9966`` by default (or a node IP: the address must be an IP literal). No Ansible imports.
"""

from __future__ import annotations

import contextlib
import ipaddress
import re
import time

try:
    from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest, start_http_server
except ImportError as exc:  # reported with requirements.missing_requirements
    CollectorRegistry = None
    IMPORT_ERROR = exc
else:
    IMPORT_ERROR = None

DEFAULT_ADDRESS = "127.0.0.1"
DEFAULT_PORT = 9966
NAMESPACE = "clustermesh"
FAILURE_REASONS = ("connect", "watch", "invalid_value", "identity_out_of_range", "map_write", "other")
RECONCILE_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
_LABEL_VALUE_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.\-/]{0,127}$")


class MetricsError(ValueError):
    """A bad metrics setting or label value; the message names it and the fix."""


def _label(field, value):
    if not isinstance(value, str) or not _LABEL_VALUE_RE.match(value):
        raise MetricsError(
            "%s: %r must be 1-128 letters, digits, '_', '.', '-', '/', starting with a letter or digit" % (field, value)
        )
    return value


def check_listen(address, port):
    """(address, port) checked: ``address`` an IP literal (127.0.0.1 or the node's IP), ``port`` 0-65535
    (0: any free port). MetricsError naming the field otherwise."""
    try:
        ip = ipaddress.ip_address(address)
    except (TypeError, ValueError):
        raise MetricsError(
            "metrics address: %r is not an IP address; use 127.0.0.1 or the node's IP" % (address,)
        ) from None
    if isinstance(port, bool) or not isinstance(port, int) or not 0 <= port <= 65535:
        raise MetricsError("metrics port: %r must be an integer from 0 to 65535 (default %d)" % (port, DEFAULT_PORT))
    return str(ip), port


class MetricsServer:
    """A running ``/metrics`` endpoint: ``address``, ``port`` (the bound one), ``close()``."""

    def __init__(self, httpd, thread):
        self._httpd = httpd
        self._thread = thread
        self.address, self.port = httpd.server_address[:2]

    def close(self):
        self._httpd.shutdown()
        self._httpd.server_close()
        self._thread.join(timeout=5)


class AgentMetrics:
    """The agent's metrics in their own registry."""

    def __init__(self):
        if IMPORT_ERROR is not None:
            from . import agent_metrics
            from .requirements import missing_requirements

            raise MetricsError(missing_requirements(agent_metrics))
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.remote_clusters = Gauge(
            "remote_clusters", "Remote clusters the agent is connected to.", namespace=NAMESPACE, registry=r
        )
        self.remote_cluster_connected = Gauge(
            "remote_cluster_connected",
            "Whether the agent is connected to the remote cluster's kvstore (1) or not (0).",
            ["cluster"],
            namespace=NAMESPACE,
            registry=r,
        )
        self.remote_cluster_last_sync = Gauge(
            "remote_cluster_last_sync_timestamp_seconds",
            "Unix time the last full sync of the remote cluster's state ended.",
            ["cluster"],
            namespace=NAMESPACE,
            registry=r,
        )
        self.remote_cluster_failures = Counter(
            "remote_cluster_failures",
            "Failures talking to a cluster's kvstore or reading its values, by reason.",
            ["cluster", "reason"],
            namespace=NAMESPACE,
            registry=r,
        )
        self.events_processed = Counter(
            "events_processed",
            "kvstore and endpoint events the agent processed, by cluster and kind.",
            ["cluster", "kind"],
            namespace=NAMESPACE,
            registry=r,
        )
        self.map_entries = Gauge(
            "map_entries", "Entries in the agent's pinned BPF maps.", ["map"], namespace=NAMESPACE, registry=r
        )
        self.reconcile_duration = Histogram(
            "reconcile_duration_seconds",
            "Time one reconcile of the BPF maps with the mesh state took.",
            namespace=NAMESPACE,
            buckets=RECONCILE_BUCKETS,
            registry=r,
        )
        self._connected = {}  # cluster -> connected
        self._failure_reasons = {}  # cluster -> reasons with a series

    # remote clusters ---------------------------------------------------------------------------------
    def cluster_connected(self, cluster, connected=True):
        """Record whether ``cluster`` is connected; keeps ``remote_clusters`` equal to the connected count."""
        self._connected[_label("cluster", cluster)] = bool(connected)
        self.remote_cluster_connected.labels(cluster=cluster).set(1 if connected else 0)
        self.remote_clusters.set(sum(self._connected.values()))

    def cluster_removed(self, cluster):
        """Forget a cluster whose clusters.d file is gone: its labelled series disappear."""
        self._connected.pop(cluster, None)
        self.remote_clusters.set(sum(self._connected.values()))
        for metric in (self.remote_cluster_connected, self.remote_cluster_last_sync):
            with contextlib.suppress(KeyError):
                metric.remove(cluster)
        for reason in sorted(self._failure_reasons.pop(cluster, ())):
            with contextlib.suppress(KeyError):
                self.remote_cluster_failures.remove(cluster, reason)

    def cluster_synced(self, cluster, timestamp=None):
        self.remote_cluster_last_sync.labels(cluster=_label("cluster", cluster)).set(
            time.time() if timestamp is None else timestamp
        )

    def failure(self, cluster, reason, count=1):
        if reason not in FAILURE_REASONS:
            raise MetricsError("failure reason: %r is not one of %s" % (reason, ", ".join(FAILURE_REASONS)))
        self.remote_cluster_failures.labels(cluster=_label("cluster", cluster), reason=reason).inc(count)
        self._failure_reasons.setdefault(cluster, set()).add(reason)

    # events, maps, reconcile -------------------------------------------------------------------------
    def event_processed(self, cluster, kind, count=1):
        self.events_processed.labels(cluster=_label("cluster", cluster), kind=_label("kind", kind)).inc(count)

    def set_map_entries(self, map_name, count):
        self.map_entries.labels(map=_label("map", map_name)).set(count)

    def observe_reconcile(self, seconds):
        self.reconcile_duration.observe(seconds)

    @contextlib.contextmanager
    def reconcile_timer(self):
        """``with metrics.reconcile_timer(): ...`` observes the block's duration (also when it raises)."""
        started = time.perf_counter()
        try:
            yield
        finally:
            self.observe_reconcile(time.perf_counter() - started)

    # exposition --------------------------------------------------------------------------------------
    def render(self):
        """The Prometheus text format (bytes) of every metric."""
        return generate_latest(self.registry)

    def serve(self, address=DEFAULT_ADDRESS, port=DEFAULT_PORT):
        """Serve ``/metrics`` on ``address:port`` from a daemon thread; returns a MetricsServer.
        MetricsError for a bad address/port; OSError naming the address when it cannot bind."""
        address, port = check_listen(address, port)
        try:
            httpd, thread = start_http_server(port, addr=address, registry=self.registry)
        except OSError as exc:
            raise OSError(exc.errno, "cannot serve metrics on %s:%d: %s" % (address, port, exc.strerror)) from exc
        return MetricsServer(httpd, thread)
