# -*- coding: utf-8 -*-
# Copyright: clustermesh.core contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""remote_clusters: the validated view of a remote cluster, reconcile, RemoteCluster with a fake client,
and the clusters.d scan."""

from __future__ import annotations

import json
import threading
import time
from types import SimpleNamespace

import pytest

from ansible_collections.clustermesh.core.plugins.module_utils import kvstore_layout as layout
from ansible_collections.clustermesh.core.plugins.module_utils.kvstore_client import (
    EVENT_DELETE,
    EVENT_PUT,
    UPDATE_EVENTS,
    UPDATE_INITIAL,
    UPDATE_RESYNC,
    WatchEvent,
    WatchUpdate,
)
from ansible_collections.clustermesh.core.plugins.module_utils.mesh_state import (
    KIND_IDENTITY,
    KIND_IPCACHE,
    KIND_NODE,
    KIND_SERVICE,
    encode_ipcache_entry,
    encode_node,
    identity_label_string,
    make_ipcache_entry,
    make_node_record,
)
from ansible_collections.clustermesh.core.plugins.module_utils.remote_clusters import (
    ClusterSet,
    ClusterView,
    RemoteCluster,
    RemoteClusterError,
    check_cluster_config,
    cluster_file_name,
)

C2 = 2
C2_FIRST = 2 << 16


def node_value(name="n1", cluster="cluster2", cluster_id=C2, ip="198.18.2.11"):
    return encode_node(make_node_record(name, cluster, cluster_id, [("InternalIP", ip)], ipv4_alloc_cidr="10.2.0.0/24"))


def ip_value(ip="10.2.0.5", identity=C2_FIRST + 5, host="198.18.2.11"):
    return encode_ipcache_entry(make_ipcache_entry(ip, identity, host))


def service_value(cluster="cluster2", cluster_id=C2):
    return json.dumps(
        {
            "cluster": cluster,
            "namespace": "default",
            "name": "rebel-base",
            "frontends": {"172.30.2.10": {"http": {"Protocol": "TCP", "Port": 80}}},
            "backends": {"10.2.0.21": {"http": {"Protocol": "TCP", "Port": 80}}},
            "labels": {},
            "selector": {"name": "rebel-base"},
            "includeExternal": True,
            "shared": True,
            "clusterID": cluster_id,
        }
    ).encode()


NODE_KEY = layout.node_key("cluster2", "n1")
IP_KEY = layout.ip_key("10.2.0.5")
ID_KEY = layout.identity_key(C2_FIRST + 5)
SVC_KEY = layout.service_key("cluster2", "default", "rebel-base")


class Recorder:
    def __init__(self):
        self.calls = []

    def __call__(self, cluster, kind, key, old, new):
        self.calls.append((cluster, kind, key, old, new))

    def take(self):
        calls, self.calls = self.calls, []
        return calls


@pytest.fixture
def view():
    rec = Recorder()
    v = ClusterView("cluster2", rec, cluster_id=C2)
    v.rec = rec
    return v


# --------------------------------------------------------------------------------------------
# ClusterView
# --------------------------------------------------------------------------------------------


def test_values_are_dispatched_by_key_to_their_kind(view):
    assert view.put(NODE_KEY, node_value())
    assert view.put(IP_KEY, ip_value())
    assert view.put(ID_KEY, identity_label_string("cluster2", {"name": "x-wing"}))
    assert view.put(SVC_KEY, service_value())
    assert view.counts() == {KIND_NODE: 1, KIND_IPCACHE: 1, KIND_IDENTITY: 1, KIND_SERVICE: 1}
    calls = view.rec.take()
    assert [(c[1], c[2], c[3]) for c in calls] == [
        (KIND_NODE, NODE_KEY, None),
        (KIND_IPCACHE, IP_KEY, None),
        (KIND_IDENTITY, ID_KEY, None),
        (KIND_SERVICE, SVC_KEY, None),
    ]
    assert calls[1][4].host_ip == "198.18.2.11" and calls[1][4].id == C2_FIRST + 5
    assert calls[3][4].backends.keys() == {"10.2.0.21"}
    assert (view.events, view.changes, view.rejections) == (4, 4, 0)


def test_update_calls_back_with_old_and_new_and_identical_put_is_silent(view):
    view.put(IP_KEY, ip_value())
    first = view.rec.take()[0][4]
    assert not view.put(IP_KEY, ip_value())  # same value again (e.g. re-put by the remote agent)
    assert view.rec.take() == []
    assert view.put(IP_KEY, ip_value(host="198.18.2.12"))
    ((_cluster, kind, key, old, new),) = view.rec.take()
    assert (kind, key, old, new.host_ip) == (KIND_IPCACHE, IP_KEY, first, "198.18.2.12")
    assert view.events == 3


def test_bad_values_are_rejected_counted_and_skipped(view):
    assert not view.put(NODE_KEY, b"{not json")
    assert not view.put(IP_KEY, ip_value(identity=(3 << 16) + 1))  # cluster 3's identity
    assert not view.put(layout.node_key("cluster3", "n9"), node_value("n9", "cluster3", 3))
    assert view.rec.take() == []
    assert view.counts()[KIND_NODE] == 0 and view.counts()[KIND_IPCACHE] == 0
    assert view.rejections == 3
    assert set(view.rejected) == {NODE_KEY, IP_KEY, layout.node_key("cluster3", "n9")}
    assert "outside the range" in view.rejected[IP_KEY]
    rejected_keys = [key for _when, key, _reason in view.last_rejections]
    assert rejected_keys == [NODE_KEY, IP_KEY, layout.node_key("cluster3", "n9")]
    # a good value afterwards is taken and clears the rejection
    assert view.put(IP_KEY, ip_value())
    assert IP_KEY not in view.rejected


def test_a_value_that_turns_bad_is_removed_and_delete_removes(view):
    view.put(IP_KEY, ip_value())
    good = view.rec.take()[0][4]
    assert not view.put(IP_KEY, ip_value(identity=1))
    assert view.rec.take() == [("cluster2", KIND_IPCACHE, IP_KEY, good, None)]
    assert view.counts()[KIND_IPCACHE] == 0
    view.put(NODE_KEY, node_value())
    node = view.rec.take()[0][4]
    assert view.delete(NODE_KEY)
    assert view.rec.take() == [("cluster2", KIND_NODE, NODE_KEY, node, None)]
    assert not view.delete(NODE_KEY)  # unknown key: nothing to say
    assert view.rec.take() == []


def test_keys_that_are_not_decoded_are_ignored_not_rejected(view):
    assert not view.put("cilium/state/identities/v1/value/k8s:name=x;/198.18.2.11", b"123")
    assert (view.ignored, view.rejections) == (1, 0)


def test_reconcile_with_a_full_listing_removes_what_is_gone(view):
    view.put(NODE_KEY, node_value())
    view.put(IP_KEY, ip_value())
    view.put(layout.ip_key("10.2.0.6"), ip_value("10.2.0.6"))
    view.put(layout.ip_key("10.2.0.7"), b"bad")
    view.rec.take()
    stale = view.reconcile(
        [(NODE_KEY, node_value()), (IP_KEY, ip_value(host="198.18.2.99")), (SVC_KEY, service_value())]
    )
    assert stale == {layout.ip_key("10.2.0.6")}
    calls = {(c[1], c[2]): (c[3], c[4]) for c in view.rec.take()}
    assert len(calls) == 3
    assert calls[(KIND_IPCACHE, layout.ip_key("10.2.0.6"))][1] is None
    assert calls[(KIND_IPCACHE, IP_KEY)][1].host_ip == "198.18.2.99"
    assert calls[(KIND_SERVICE, SVC_KEY)][0] is None
    assert view.rejected == {}  # the bad key is gone too
    assert set(view.snapshot()[KIND_IPCACHE]) == {IP_KEY}


def test_reconcile_can_keep_stale_keys_for_later(view):
    view.put(IP_KEY, ip_value())
    view.put(NODE_KEY, node_value())
    view.rec.take()
    assert view.reconcile([(NODE_KEY, node_value())], remove_missing=False) == {IP_KEY}
    assert view.rec.take() == [] and view.counts()[KIND_IPCACHE] == 1
    assert view.remove_stale({IP_KEY, "cilium/state/ip/v1/default/10.9.9.9"}) == 1
    assert [(c[2], c[4]) for c in view.rec.take()] == [(IP_KEY, None)]


def test_clear_removes_everything_with_callbacks(view):
    view.put(NODE_KEY, node_value())
    view.put(IP_KEY, ip_value())
    view.rec.take()
    assert view.clear() == 2
    assert sorted(c[2] for c in view.rec.take() if c[4] is None) == sorted([NODE_KEY, IP_KEY])
    assert view.counts() == dict.fromkeys(view.counts(), 0)


def test_a_failing_callback_is_counted_and_does_not_stop_the_view():
    def boom(*args):
        raise RuntimeError("consumer bug")

    v = ClusterView("cluster2", boom, cluster_id=C2)
    assert v.put(IP_KEY, ip_value())
    assert v.callback_errors == 1 and v.counts()[KIND_IPCACHE] == 1


def test_values_before_the_cluster_id_is_known_are_refused():
    v = ClusterView("cluster2")
    with pytest.raises(RemoteClusterError, match="cluster ID"):
        v.put(IP_KEY, ip_value())


def test_check_cluster_config():
    config = layout.ClusterConfig(id=2)
    check_cluster_config("cluster2", config, expected_id=2, local_cluster_id=1)
    with pytest.raises(RemoteClusterError, match="expected 3"):
        check_cluster_config("cluster2", config, expected_id=3)
    with pytest.raises(RemoteClusterError, match="local cluster's own ID"):
        check_cluster_config("cluster2", config, local_cluster_id=2)
    with pytest.raises(RemoteClusterError, match="maxConnectedClusters is 255"):
        check_cluster_config("cluster2", config, max_connected=511)


def test_cluster_file_names():
    assert cluster_file_name("cluster2") == "cluster2"
    for entry in ("cluster2.etcd-client.crt", ".hidden", "Cluster2", "a" * 33, "x_y"):
        assert cluster_file_name(entry) is None


# --------------------------------------------------------------------------------------------
# RemoteCluster with a fake client
# --------------------------------------------------------------------------------------------


class FakeWatcher:
    def __init__(self, prefix):
        self.prefix = prefix
        self.callback = self.on_exit = None
        self.stopped = threading.Event()

    def start_thread(self, callback, on_exit=None):
        self.callback, self.on_exit = callback, on_exit

    def stop(self):
        self.stopped.set()


class FakeClient:
    def __init__(self, store):
        self.store = store
        self.watchers = {}
        self.closed = False

    def get(self, key):
        value = self.store.get(key)
        return None if value is None else SimpleNamespace(key=key, value=value)

    def get_prefix(self, prefix):
        return kvs(*((k, v) for k, v in sorted(self.store.items()) if k.startswith(prefix)))

    def watch_prefix(self, prefix, **kwargs):
        self.watchers[prefix] = FakeWatcher(prefix)
        return self.watchers[prefix]

    def close(self):
        self.closed = True


def kvs(*pairs):
    return tuple(SimpleNamespace(key=k, value=v) for k, v in pairs)


def wait_for(predicate, timeout=5.0):
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.01)


@pytest.fixture
def cluster_file(tmp_path):
    path = tmp_path / "cluster2"
    path.write_text("endpoints:\n- http://127.0.0.1:1\n")
    return str(path)


def make_remote(cluster_file, store, clients, **kwargs):
    def factory(config):
        client = FakeClient(store)
        clients.append(client)
        return client

    rec = Recorder()
    remote = RemoteCluster(
        "cluster2", cluster_file, rec, client_factory=factory, backoff_initial=0.05, backoff_max=0.1, **kwargs
    )
    remote.rec = rec
    return remote


def test_remote_cluster_lists_watches_tracks_canaries_and_reconnects(cluster_file):
    store = {layout.cluster_config_key("cluster2"): layout.encode_cluster_config(layout.ClusterConfig(id=2))}
    clients = []
    remote = make_remote(cluster_file, store, clients, local_cluster_id=1).start()
    try:
        wait_for(lambda: clients and len(clients[0].watchers) == 2)
        state = clients[0].watchers[layout.STATE_PREFIX]
        synced = clients[0].watchers[layout.synced_prefix("cluster2")]
        state.callback(WatchUpdate(UPDATE_INITIAL, 10, (), kvs((NODE_KEY, node_value()), (IP_KEY, ip_value()))))
        assert remote.status()["connected"] and remote.status()["cluster_id"] == 2
        assert not remote.synced  # the cluster announces canaries; none seen yet
        canaries = [layout.synced_key("cluster2", p) for p in layout.SYNCED_STATE_PREFIXES]
        synced.callback(WatchUpdate(UPDATE_INITIAL, 10, (), kvs(*((k, b"t") for k in canaries[:3]))))
        assert not remote.synced
        synced.callback(WatchUpdate(UPDATE_EVENTS, 11, (WatchEvent(EVENT_PUT, canaries[3], b"t", 11),)))
        assert remote.synced
        state.callback(WatchUpdate(UPDATE_EVENTS, 11, (WatchEvent(EVENT_DELETE, NODE_KEY, b"", 11),)))
        assert remote.view.counts()[KIND_NODE] == 0
        # a watch error: disconnected until the supervisor's probe reads the cluster config again
        remote._on_watch_error(Exception("connection lost"))
        assert not remote.status()["connected"]
        wait_for(lambda: remote.status()["connected"])
        assert remote.status()["last_error"] == "connection lost"
        # the watch gives up for good: a new connection lists again and reconciles
        state.on_exit(RuntimeError("gone"))
        wait_for(lambda: len(clients) == 2 and len(clients[1].watchers) == 2)
        assert clients[0].closed and state.stopped.is_set()
        remote.rec.take()
        new_state = clients[1].watchers[layout.STATE_PREFIX]
        new_state.callback(WatchUpdate(UPDATE_RESYNC, 20, (), kvs((SVC_KEY, service_value()))))
        # the new listing lacks the ipcache entry, but the cluster's canaries are not seen yet on
        # this connection (its kvstore may be filling up again): removal waits for them
        assert [(c[1], c[2]) for c in remote.rec.take()] == [(KIND_SERVICE, SVC_KEY)]
        assert remote.pending_stale == {IP_KEY} and not remote.synced
        new_synced = clients[1].watchers[layout.synced_prefix("cluster2")]
        new_synced.callback(WatchUpdate(UPDATE_INITIAL, 20, (), kvs(*((k, b"t") for k in canaries))))
        assert [(c[1], c[2], c[4]) for c in remote.rec.take()] == [(KIND_IPCACHE, IP_KEY, None)]
        assert remote.synced and remote.pending_stale == set()
        # an update of the first connection still in flight is dropped
        state.callback(WatchUpdate(UPDATE_EVENTS, 12, (WatchEvent(EVENT_PUT, NODE_KEY, node_value(), 12),)))
        assert remote.rec.take() == [] and remote.view.counts()[KIND_NODE] == 0
        assert remote.status()["connects"] == 2
    finally:
        remote.stop(flush=True)
    assert not remote.alive
    assert remote.view.counts()[KIND_SERVICE] == 0  # flushed


def test_remote_cluster_refuses_a_wrong_cluster_id_and_keeps_retrying(cluster_file):
    store = {layout.cluster_config_key("cluster2"): layout.encode_cluster_config(layout.ClusterConfig(id=1))}
    clients = []
    remote = make_remote(cluster_file, store, clients, local_cluster_id=1).start()
    try:
        wait_for(lambda: len(clients) >= 2)
        status = remote.status()
        assert not status["connected"] and "local cluster's own ID" in status["last_error"]
        assert all(not c.watchers for c in clients) and all(c.closed for c in clients[:-1])
        store[layout.cluster_config_key("cluster2")] = layout.encode_cluster_config(layout.ClusterConfig(id=2))
        wait_for(lambda: any(c.watchers for c in clients))
    finally:
        remote.stop()


def test_remote_cluster_refuses_an_id_another_remote_cluster_uses(cluster_file, tmp_path):
    cs = ClusterSet(str(tmp_path))
    assert cs.claim_id("cluster3", 2) is None
    store = {layout.cluster_config_key("cluster2"): layout.encode_cluster_config(layout.ClusterConfig(id=2))}
    clients = []
    remote = make_remote(cluster_file, store, clients, id_claim=cs.claim_id).start()
    try:
        wait_for(lambda: remote.status()["last_error"])
        assert "ID 2 is already used by cluster cluster3" in remote.status()["last_error"]
        cs.claim_id("cluster3", None)  # cluster3 disconnected: the ID is free
        wait_for(lambda: any(c.watchers for c in clients))
        assert cs.claim_id("cluster4", 2) == "cluster2"
    finally:
        remote.stop()
    assert cs.claim_id("cluster4", 2) is None  # released by stop()


def test_remote_cluster_without_cluster_config_says_so(cluster_file):
    clients = []
    remote = make_remote(cluster_file, {}, clients).start()
    try:
        wait_for(lambda: remote.status()["last_error"])
        assert "cilium/cluster-config/cluster2 does not exist" in remote.status()["last_error"]
    finally:
        remote.stop()


# --------------------------------------------------------------------------------------------
# ClusterSet
# --------------------------------------------------------------------------------------------


class FakeRemote:
    def __init__(self, name, path, on_change, **kwargs):
        self.name, self.path, self.kwargs = name, path, kwargs
        self.view = ClusterView(name, on_change, cluster_id=C2)
        self.started = self.stopped = False
        self.flushed = None

    def start(self):
        self.started = True
        return self

    def stop(self, *, flush=True, timeout=10.0):
        self.stopped, self.flushed = True, flush

    def status(self):
        return {"name": self.name}


def test_cluster_set_follows_the_directory(tmp_path):
    d = tmp_path / "clusters.d"
    cs = ClusterSet(str(d), local_cluster="cluster1", local_cluster_id=1, cluster_factory=FakeRemote)
    assert cs.scan() == {"added": [], "changed": [], "removed": []}  # no directory yet
    d.mkdir()
    (d / "cluster1").write_text("endpoints: [https://a:1]\n")  # our own cluster: ignored
    (d / "cluster2").write_text("endpoints: [https://b:1]\n")
    (d / "cluster2.etcd-client.crt").write_text("x")
    (d / "cluster3").write_text("endpoints: [https://c:1]\n")
    assert cs.scan() == {"added": ["cluster2", "cluster3"], "changed": [], "removed": []}
    c2, c3 = cs.clusters["cluster2"], cs.clusters["cluster3"]
    assert c2.started and c2.kwargs["local_cluster_id"] == 1
    assert cs.scan() == {"added": [], "changed": [], "removed": []}
    (d / "cluster2").write_text("endpoints: [https://b2:1]\n")
    assert cs.scan() == {"added": [], "changed": ["cluster2"], "removed": []}
    assert c2.stopped and c2.flushed is False  # the new connection reconciles the same view
    assert cs.clusters["cluster2"].view is c2.view and cs.clusters["cluster2"] is not c2
    (d / "cluster3").unlink()
    assert cs.scan() == {"added": [], "changed": [], "removed": ["cluster3"]}
    assert c3.stopped and c3.flushed is True
    assert list(cs.status()) == ["cluster2"]
    cs.stop()
    assert cs.clusters == {}


def test_cluster_set_reconnects_when_a_tls_file_changes(tmp_path):
    d = tmp_path / "clusters.d"
    d.mkdir()
    (d / "cluster2.etcd-client-ca.crt").write_text("a")
    (d / "cluster2").write_text("endpoints: [https://b:1]\ntrusted-ca-file: cluster2.etcd-client-ca.crt\n")
    cs = ClusterSet(str(d), cluster_factory=FakeRemote)
    assert cs.scan()["added"] == ["cluster2"]
    (d / "cluster2.etcd-client-ca.crt").write_text("bb")
    assert cs.scan()["changed"] == ["cluster2"]
