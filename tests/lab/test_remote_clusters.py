# -*- coding: utf-8 -*-
# Copyright: clustermesh.core contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""remote_clusters against a real etcd (mTLS on 127.0.0.1) playing the remote cluster "cluster2":
values reach the view through callbacks, bad ones are rejected and counted, clusters.d files
connect and disconnect at runtime, and the view equals the store after a restart, a partition
and a compaction."""

from __future__ import annotations

import shutil
import threading
import time

import pytest

from ansible_collections.clustermesh.core.plugins.module_utils import kvstore_layout as layout
from ansible_collections.clustermesh.core.plugins.module_utils.control_plane import remote_read_keys, remote_user
from ansible_collections.clustermesh.core.plugins.module_utils.kvstore_client import KVStoreClient
from ansible_collections.clustermesh.core.plugins.module_utils.mesh_state import (
    KIND_IPCACHE,
    KIND_NODE,
    StateError,
    decode_remote_value,
    encode_ipcache_entry,
    encode_node,
    make_ipcache_entry,
    make_node_record,
)
from ansible_collections.clustermesh.core.plugins.module_utils.remote_clusters import ClusterSet, RemoteCluster
from ansible_collections.clustermesh.core.tests.etcd_fixture import (
    EtcdServer,
    SilentListener,
    TCPProxy,
    TestPKI,
    etcd_available,
)

pytestmark = [
    pytest.mark.etcd,
    pytest.mark.skipif(not etcd_available(), reason="etcd and etcdctl are not installed"),
]

C2_FIRST = 2 << 16


@pytest.fixture(scope="module")
def etcd(tmp_path_factory):
    base = tmp_path_factory.mktemp("cmv-etcd")
    server = EtcdServer(base / "etcd", TestPKI(base / "pki"), name="cmv-remote")
    server.start()
    yield server
    server.stop()


@pytest.fixture
def client(etcd):
    pair = etcd.pki.client("root")
    c = KVStoreClient([etcd.endpoint], ca_file=etcd.pki.ca_cert, cert_file=pair.cert, key_file=pair.key, timeout=3.0)
    c.delete_prefix("cilium/")
    c.put(layout.cluster_config_key("cluster2"), layout.encode_cluster_config(layout.ClusterConfig(id=2)))
    yield c
    c.close()


def write_config(path, etcd, endpoint=None):
    pair = etcd.pki.client("root")
    path.write_text(
        f"endpoints:\n- {endpoint or etcd.endpoint}\ntrusted-ca-file: {etcd.pki.ca_cert}\n"
        f"cert-file: {pair.cert}\nkey-file: {pair.key}\n"
    )


def node(name, ip):
    return encode_node(make_node_record(name, "cluster2", 2, [("InternalIP", ip)]))


def entry(ip, identity=C2_FIRST + 5, host="198.18.2.11"):
    return encode_ipcache_entry(make_ipcache_entry(ip, identity, host))


class Mirror:
    """What a consumer builds from the callbacks alone."""

    def __init__(self):
        self.lock = threading.Lock()
        self.state: dict[tuple[str, str, str], object] = {}
        self.calls = 0

    def __call__(self, cluster, kind, key, old, new):
        with self.lock:
            self.calls += 1
            assert self.state.get((cluster, kind, key)) == old
            if new is None:
                self.state.pop((cluster, kind, key))
            else:
                self.state[(cluster, kind, key)] = new

    def of(self, cluster):
        with self.lock:
            return {(kind, key): value for (c, kind, key), value in self.state.items() if c == cluster}


def truth(client, cluster="cluster2", cluster_id=2):
    """The valid state in the store, decoded like the view does."""
    result = {}
    for kv in client.get_prefix(layout.STATE_PREFIX):
        try:
            decoded = decode_remote_value(kv.key, kv.value, cluster=cluster, cluster_id=cluster_id)
        except StateError:
            continue
        result[(decoded.kind, kv.key)] = decoded.value
    return result


def flat(snapshot):
    return {(kind, key): value for kind, values in snapshot.items() for key, value in values.items()}


def wait_for(predicate, timeout=15.0, what="condition"):
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


def test_clusters_d_file_connects_values_flow_bad_values_rejected_removal_disconnects(etcd, client, tmp_path):
    d = tmp_path / "clusters.d"
    d.mkdir()
    mirror = Mirror()
    node_key = layout.node_key("cluster2", "n1")
    ip1, ip2, bad_ip, foreign_ip = (layout.ip_key(f"10.2.0.{i}") for i in (1, 2, 3, 4))
    client.put(node_key, node("n1", "198.18.2.11"))
    client.put(ip1, entry("10.2.0.1"))
    cs = ClusterSet(str(d), mirror, local_cluster="cluster1", local_cluster_id=1, poll_interval=0.2)
    cs.start()
    try:
        assert cs.status() == {}
        write_config(d / "cluster1", etcd)  # our own cluster's name: ignored
        write_config(d / "cluster2", etcd)  # added at runtime
        wait_for(lambda: mirror.of("cluster2").keys() == {(KIND_NODE, node_key), (KIND_IPCACHE, ip1)}, what="list")
        assert list(cs.status()) == ["cluster2"]
        status = cs.status()["cluster2"]
        assert status["connected"] and status["cluster_id"] == 2
        assert not status["synced"]  # cluster config announces canaries; none written yet
        for prefix in layout.SYNCED_STATE_PREFIXES:
            client.put(layout.synced_key("cluster2", prefix), layout.encode_timestamp())
        wait_for(lambda: cs.status()["cluster2"]["synced"], what="synced")

        # a malformed value and an identity of cluster 3: rejected, counted, the watch goes on
        client.put(bad_ip, b"{malformed")
        client.put(foreign_ip, entry("10.2.0.4", identity=(3 << 16) + 1))
        client.put(ip2, entry("10.2.0.2"))
        wait_for(lambda: (KIND_IPCACHE, ip2) in mirror.of("cluster2"), what="value after bad ones")
        status = cs.status()["cluster2"]
        assert status["rejected"] == 2 and status["rejected_now"] == 2
        reasons = {r["key"]: r["reason"] for r in status["last_rejections"]}
        assert "outside the range" in reasons[foreign_ip] and bad_ip in reasons
        assert (KIND_IPCACHE, bad_ip) not in mirror.of("cluster2")

        # a value that changes and a delete
        client.put(ip1, entry("10.2.0.1", host="198.18.2.12"))
        client.delete(node_key)
        wait_for(lambda: (KIND_NODE, node_key) not in mirror.of("cluster2"), what="delete")
        wait_for(lambda: mirror.of("cluster2").get((KIND_IPCACHE, ip1)).host_ip == "198.18.2.12", what="update")
        assert mirror.of("cluster2") == flat(cs.view()["cluster2"]) == truth(client)

        # the file removed: disconnected, its entries withdrawn through the callbacks
        remote = cs.clusters["cluster2"]
        (d / "cluster2").unlink()
        wait_for(lambda: "cluster2" not in cs.status(), what="disconnect")
        wait_for(lambda: not remote.alive, what="thread end")
        assert mirror.of("cluster2") == {}
    finally:
        cs.stop()


def test_view_equals_the_store_after_restart_partition_and_compaction(etcd, client, tmp_path):
    proxy = TCPProxy(etcd.client_port).start()
    path = tmp_path / "cluster2"
    write_config(path, etcd, endpoint=proxy.endpoint)
    mirror = Mirror()
    keys = [layout.ip_key(f"10.2.1.{i}") for i in range(10)]
    for i, key in enumerate(keys[:5]):
        client.put(key, entry(f"10.2.1.{i}"))
    for prefix in layout.SYNCED_STATE_PREFIXES:
        client.put(layout.synced_key("cluster2", prefix), layout.encode_timestamp())
    remote = RemoteCluster("cluster2", str(path), mirror, local_cluster_id=1, backoff_initial=0.1, backoff_max=0.5)
    remote.start()
    try:
        wait_for(lambda: len(mirror.of("cluster2")) == 5, what="initial list")

        # etcd killed and restarted (data kept): the connection comes back by itself
        etcd.restart()
        client.put(keys[5], entry("10.2.1.5"))
        client.delete(keys[0])
        wait_for(lambda: mirror.of("cluster2") == truth(client), what="view after restart")
        wait_for(lambda: remote.status()["connected"], what="connected after restart")
        assert remote.status()["last_error"]

        # partition: changes and a compaction while cut off; a re-list reconciles
        proxy.block()
        time.sleep(0.3)  # the proxy's accept loop lets go of the listening socket within 0.1 s
        wait_for(lambda: not remote.status()["connected"], what="disconnected")
        for i in (6, 7):
            client.put(keys[i], entry(f"10.2.1.{i}"))
        client.delete(keys[1])
        client.put(keys[2], entry("10.2.1.2", host="198.18.2.99"))
        client.put(keys[3], b"garbage")  # turns bad: removed from the view
        client.compact(client.status()["revision"])
        assert mirror.of("cluster2") != truth(client)
        proxy.unblock()
        wait_for(lambda: mirror.of("cluster2") == truth(client), what="view after partition")
        wait_for(lambda: remote.status()["connected"], what="connected after partition")
        assert flat(remote.view.snapshot()) == truth(client)
        assert sorted(key for _kind, key in truth(client)) == [keys[i] for i in (2, 4, 5, 6, 7)]
    finally:
        remote.stop(flush=False)
        proxy.stop()
    assert not remote.alive


def test_a_remote_kvstore_that_lost_its_data_keeps_entries_until_its_canaries_return(etcd, client, tmp_path):
    """Cilium's synced canaries: after the remote etcd comes back empty, entries not (yet) written
    again stay until the remote cluster writes its canaries; then the stale ones go."""
    path = tmp_path / "cluster2"
    write_config(path, etcd)
    mirror = Mirror()
    keep, lost = layout.ip_key("10.2.3.1"), layout.ip_key("10.2.3.2")
    client.put(keep, entry("10.2.3.1"))
    client.put(lost, entry("10.2.3.2"))
    for prefix in layout.SYNCED_STATE_PREFIXES:
        client.put(layout.synced_key("cluster2", prefix), layout.encode_timestamp())
    remote = RemoteCluster("cluster2", str(path), mirror, backoff_initial=0.1, backoff_max=0.5)
    remote.start()
    try:
        wait_for(lambda: remote.synced and len(mirror.of("cluster2")) == 2, what="initial sync")
        etcd.stop()
        shutil.rmtree(etcd.data_dir)
        etcd.start()  # a new, empty etcd cluster on the same address
        wait_for(lambda: "does not exist" in (remote.status()["last_error"] or ""), what="cluster config missing")
        assert not remote.status()["connected"]
        # the remote cluster fills its kvstore again, one entry at a time
        client.put(layout.cluster_config_key("cluster2"), layout.encode_cluster_config(layout.ClusterConfig(id=2)))
        client.put(keep, entry("10.2.3.1", host="198.18.2.50"))
        wait_for(lambda: mirror.of("cluster2")[(KIND_IPCACHE, keep)].host_ip == "198.18.2.50", what="refill")
        assert (KIND_IPCACHE, lost) in mirror.of("cluster2")  # not removed while not synced
        assert not remote.synced and remote.pending_stale == {lost}
        for prefix in layout.SYNCED_STATE_PREFIXES:
            client.put(layout.synced_key("cluster2", prefix), layout.encode_timestamp())
        wait_for(lambda: (KIND_IPCACHE, lost) not in mirror.of("cluster2"), what="stale removal")
        assert remote.synced and mirror.of("cluster2") == truth(client)
    finally:
        remote.stop()


def test_stop_is_prompt_while_the_remote_endpoint_hangs(tmp_path, etcd):
    silent = SilentListener()
    path = tmp_path / "cluster2"
    write_config(path, etcd, endpoint=silent.endpoint)
    remote = RemoteCluster("cluster2", str(path), Mirror()).start()
    try:
        time.sleep(0.5)  # in the TLS handshake that never completes
        assert not remote.status()["connected"]
        started = time.monotonic()
        remote.stop()
        assert time.monotonic() - started < 2.0
        assert not remote.alive
    finally:
        remote.stop()
        silent.close()


def test_works_with_exactly_the_remote_users_read_permissions(tmp_path):
    """The remote user may read only what control_plane.remote_read_keys grants (cluster-config is
    one key, not a prefix); with the synced canaries not granted, the denial is reported."""
    server = EtcdServer(tmp_path / "etcd", TestPKI(tmp_path / "pki"), name="cmv-rbac")
    server.start()
    try:
        grants = [("read", key, is_prefix) for key, is_prefix in remote_read_keys("cluster2")]
        no_synced = [g for g in grants if not g[1].startswith("cilium/synced/")]
        server.enable_auth({remote_user("cluster1"): grants, "remote-nosynced": no_synced})
        ip = layout.ip_key("10.2.4.1")
        server.etcdctl("put", layout.cluster_config_key("cluster2"), '{"id":2,"capabilities":{"syncedCanaries":true}}')
        server.etcdctl("put", ip, entry("10.2.4.1").decode())
        for prefix in layout.SYNCED_STATE_PREFIXES:
            server.etcdctl("put", layout.synced_key("cluster2", prefix), layout.encode_timestamp().decode())

        def config_for(user):
            pair = server.pki.client(user)
            path = tmp_path / user / "cluster2"
            path.parent.mkdir()
            path.write_text(
                f"endpoints: [{server.endpoint}]\ntrusted-ca-file: {server.pki.ca_cert}\n"
                f"cert-file: {pair.cert}\nkey-file: {pair.key}\n"
            )
            return str(path)

        mirror = Mirror()
        remote = RemoteCluster("cluster2", config_for(remote_user("cluster1")), mirror).start()
        denied = RemoteCluster("cluster2", config_for("remote-nosynced"), None, backoff_initial=0.1).start()
        try:
            wait_for(lambda: remote.synced and (KIND_IPCACHE, ip) in mirror.of("cluster2"), what="sync as remote user")
            assert remote.status()["last_error"] is None
            wait_for(lambda: "denied" in (denied.status()["last_error"] or ""), what="denial reported")
            assert "cilium/synced/cluster2/" in denied.status()["last_error"]
            # it keeps retrying (connected flips during each attempt) but never syncs
            assert not denied.status()["synced"]
        finally:
            remote.stop()
            denied.stop()
    finally:
        server.stop()
