"""The agent's Prometheus metrics: names, labels and values as a scraper sees them over HTTP."""

from __future__ import annotations

import urllib.request

import pytest
from prometheus_client.parser import text_string_to_metric_families

from ansible_collections.clustermesh.core.plugins.module_utils import agent_metrics
from ansible_collections.clustermesh.core.plugins.module_utils.agent_metrics import (
    DEFAULT_PORT,
    AgentMetrics,
    MetricsError,
    check_listen,
)


def samples(text):
    """{(sample name, frozenset(labels)): value} of a text exposition."""
    found = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            found[(sample.name, frozenset(sample.labels.items()))] = sample.value
    return found


def value(found, name, **labels):
    return found[(name, frozenset(labels.items()))]


def fill(metrics):
    metrics.cluster_connected("cluster2")
    metrics.cluster_connected("cluster3")
    metrics.cluster_connected("cluster3", False)
    metrics.cluster_synced("cluster2", timestamp=1_700_000_000.5)
    metrics.failure("cluster3", "connect")
    metrics.failure("cluster3", "connect")
    metrics.failure("cluster2", "invalid_value")
    metrics.event_processed("cluster2", "ipcache", 5)
    metrics.event_processed("cluster1", "endpoint")
    metrics.set_map_entries("cm_services", 12)
    metrics.observe_reconcile(0.003)
    with metrics.reconcile_timer():
        pass


def test_scrape_over_http_shows_every_metric():
    metrics = AgentMetrics()
    fill(metrics)
    server = metrics.serve("127.0.0.1", 0)
    try:
        assert server.address == "127.0.0.1" and server.port > 0
        with urllib.request.urlopen("http://127.0.0.1:%d/metrics" % server.port, timeout=5) as response:
            assert response.status == 200
            assert response.headers["Content-Type"].startswith("text/plain")
            text = response.read().decode()
    finally:
        server.close()
    found = samples(text)
    assert value(found, "clustermesh_remote_clusters") == 1
    assert value(found, "clustermesh_remote_cluster_connected", cluster="cluster2") == 1
    assert value(found, "clustermesh_remote_cluster_connected", cluster="cluster3") == 0
    assert value(found, "clustermesh_remote_cluster_last_sync_timestamp_seconds", cluster="cluster2") == 1_700_000_000.5
    assert value(found, "clustermesh_remote_cluster_failures_total", cluster="cluster3", reason="connect") == 2
    assert value(found, "clustermesh_remote_cluster_failures_total", cluster="cluster2", reason="invalid_value") == 1
    assert value(found, "clustermesh_events_processed_total", cluster="cluster2", kind="ipcache") == 5
    assert value(found, "clustermesh_events_processed_total", cluster="cluster1", kind="endpoint") == 1
    assert value(found, "clustermesh_map_entries", map="cm_services") == 12
    assert value(found, "clustermesh_reconcile_duration_seconds_count") == 2
    assert value(found, "clustermesh_reconcile_duration_seconds_bucket", le="0.005") == 2
    assert "# TYPE clustermesh_reconcile_duration_seconds histogram" in text


def test_registries_are_separate_and_a_removed_cluster_disappears():
    first, second = AgentMetrics(), AgentMetrics()
    fill(first)
    assert ("clustermesh_remote_clusters", frozenset()) in samples(second.render().decode())
    assert value(samples(second.render().decode()), "clustermesh_remote_clusters") == 0
    first.cluster_removed("cluster3")
    first.cluster_removed("cluster2")
    found = samples(first.render().decode())
    assert value(found, "clustermesh_remote_clusters") == 0
    assert not [k for k in found if dict(k[1]).get("cluster") in ("cluster2", "cluster3") and "remote" in k[0]]
    assert value(found, "clustermesh_events_processed_total", cluster="cluster2", kind="ipcache") == 5  # history


@pytest.mark.parametrize(
    "address, port, message",
    [
        ("0.0.0.0.1", 9966, "metrics address: '0.0.0.0.1' is not an IP address"),
        ("localhost", 9966, "metrics address: 'localhost' is not an IP address"),
        ("127.0.0.1", 70000, "metrics port: 70000 must be an integer from 0 to 65535 (default %d)" % DEFAULT_PORT),
        ("127.0.0.1", "9966", "metrics port: '9966'"),
    ],
)
def test_bad_listen_settings_are_named(address, port, message):
    with pytest.raises(MetricsError) as exc:
        check_listen(address, port)
    assert message in str(exc.value)


def test_bad_labels_and_reasons_are_refused():
    metrics = AgentMetrics()
    with pytest.raises(MetricsError, match="failure reason: 'boom' is not one of connect"):
        metrics.failure("cluster2", "boom")
    with pytest.raises(MetricsError, match="cluster: ''"):
        metrics.cluster_connected("")


def test_a_busy_port_is_an_error_naming_it():
    metrics = AgentMetrics()
    server = metrics.serve("127.0.0.1", 0)
    try:
        with pytest.raises(OSError, match="cannot serve metrics on 127.0.0.1:%d" % server.port):
            AgentMetrics().serve("127.0.0.1", server.port)
    finally:
        server.close()


def test_missing_prometheus_client_names_the_package(monkeypatch):
    monkeypatch.setattr(agent_metrics, "IMPORT_ERROR", ImportError("No module named 'prometheus_client'"))
    with pytest.raises(MetricsError, match="No module named 'prometheus_client'.*requirements/node.txt"):
        AgentMetrics()
