# -*- coding: utf-8 -*-
# Copyright: clustermesh.core contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""agent_kvstore against a real etcd (mTLS on 127.0.0.1): identity allocation, lease publishing, canaries."""

from __future__ import annotations

import datetime
import threading
import time

import pytest

from ansible_collections.clustermesh.core.plugins.module_utils import agent_kvstore
from ansible_collections.clustermesh.core.plugins.module_utils import kvstore_layout as layout
from ansible_collections.clustermesh.core.plugins.module_utils.agent_kvstore import (
    IDENTITY_INDEX_PREFIX,
    IdentityAllocationError,
    IdentityAllocator,
    allocate_identity,
    deregister_node,
    identity_index_key,
    lookup_identity,
    publish_ipcache_entry,
    put_if_changed,
    register_node,
    withdraw_ipcache_entry,
    write_heartbeat,
    write_synced_canaries,
)
from ansible_collections.clustermesh.core.plugins.module_utils.kvstore_client import KVStoreClient
from ansible_collections.clustermesh.core.plugins.module_utils.mesh_state import (
    decode_identity,
    decode_ipcache_entry,
    decode_node,
    make_ipcache_entry,
    make_node_record,
)
from ansible_collections.clustermesh.core.tests.etcd_fixture import EtcdServer, TestPKI, etcd_available

pytestmark = [
    pytest.mark.etcd,
    pytest.mark.skipif(not etcd_available(), reason="etcd and etcdctl are not installed"),
]

C1_FIRST = 1 << 16  # cluster 1's identity range starts here


@pytest.fixture(scope="module")
def etcd(tmp_path_factory):
    base = tmp_path_factory.mktemp("cmw-etcd")
    server = EtcdServer(base / "etcd", TestPKI(base / "pki"), name="cmw-agent")
    server.start()
    yield server
    server.stop()


def make_client(server: EtcdServer) -> KVStoreClient:
    pair = server.pki.client("root")
    return KVStoreClient(
        [server.endpoint],
        ca_file=server.pki.ca_cert,
        cert_file=pair.cert,
        key_file=pair.key,
        timeout=3.0,
        connect_timeout=2.0,
    )


@pytest.fixture
def client(etcd):
    c = make_client(etcd)
    c.delete_prefix("cilium/")  # each test starts from an empty kvstore
    yield c
    c.close()


# --------------------------------------------------------------------------------------------
# identities
# --------------------------------------------------------------------------------------------


def test_allocate_reuses_and_takes_lowest_free(client):
    a = allocate_identity(client, "cluster1", 1, {"name": "x-wing"})
    assert (a.id, a.created) == (C1_FIRST, True)
    assert a.label_string == "k8s:io.cilium.k8s.policy.cluster=cluster1;k8s:name=x-wing;"
    # stored as Cilium stores it, readable by the remote-side decoder
    kv = client.get(f"cilium/state/identities/v1/id/{C1_FIRST}")
    assert kv.value == a.label_string.encode() and kv.lease == 0  # identities are not under a lease
    assert decode_identity(kv.key, kv.value, cluster="cluster1", cluster_id=1).id == C1_FIRST
    # the same labels (in another order / spelling) reuse it
    again = allocate_identity(client, "cluster1", 1, {"k8s:name": "x-wing"})
    assert (again.id, again.created) == (C1_FIRST, False)
    b = allocate_identity(client, "cluster1", 1, {"name": "rebel-base"})
    assert (b.id, b.created) == (C1_FIRST + 1, True)
    # a hole (identity deleted) is the lowest free ID; the stale index is repaired
    client.delete(layout.identity_key(C1_FIRST))
    c = allocate_identity(client, "cluster1", 1, {"name": "tie-fighter"})
    assert (c.id, c.created) == (C1_FIRST, True)
    d = allocate_identity(client, "cluster1", 1, {"name": "x-wing"})
    assert (d.id, d.created) == (C1_FIRST + 2, True)
    assert lookup_identity(client, C1_FIRST + 2) == d.label_string
    # another cluster's range is separate
    e = allocate_identity(client, "cluster2", 2, {"name": "x-wing"})
    assert e.id == 2 << 16
    # the index lives under our own prefix, not under cilium/state/
    assert client.get(identity_index_key(d.label_string)).value == str(C1_FIRST + 2).encode()
    assert identity_index_key(d.label_string).startswith(IDENTITY_INDEX_PREFIX)
    assert IDENTITY_INDEX_PREFIX.startswith("cilium/clustermesh-core/")


def test_allocate_finds_identities_written_without_index(client):
    """An identity written by someone else (a Cilium agent, a lost index) is found and reused."""
    labels = "k8s:io.cilium.k8s.policy.cluster=cluster1;k8s:name=probe;"
    client.put(layout.identity_key(C1_FIRST + 7), labels)
    client.put(layout.identity_key(C1_FIRST), "k8s:io.cilium.k8s.policy.cluster=cluster1;k8s:name=other;")
    got = allocate_identity(client, "cluster1", 1, {"name": "probe"})
    assert (got.id, got.created) == (C1_FIRST + 7, False)
    assert client.get(identity_index_key(labels)).value == str(C1_FIRST + 7).encode()
    # a wrong index (pointing at another identity) is not trusted
    client.put(identity_index_key(labels), str(C1_FIRST))
    assert allocate_identity(client, "cluster1", 1, {"name": "probe"}).id == C1_FIRST + 7
    # next free skips both taken IDs
    assert allocate_identity(client, "cluster1", 1, {"name": "new"}).id == C1_FIRST + 1


def test_allocate_range_full(client, monkeypatch):
    """A range of three IDs (patched: a real one has 65536): the fourth label set is refused
    with a message naming the range, and nothing is written for it."""
    monkeypatch.setattr(agent_kvstore, "cluster_identity_range", lambda cid, maxc: (C1_FIRST, C1_FIRST + 2))
    got = [allocate_identity(client, "cluster1", 1, {"n": f"v{i}"}).id for i in range(3)]
    assert got == [C1_FIRST, C1_FIRST + 1, C1_FIRST + 2]
    assert allocate_identity(client, "cluster1", 1, {"n": "v1"}).id == C1_FIRST + 1  # reuse still works
    with pytest.raises(
        IdentityAllocationError, match=r"identity range 65536\.\.65538 of cluster 'cluster1' .* is full"
    ):
        allocate_identity(client, "cluster1", 1, {"n": "v3"})
    assert len(client.get_prefix(layout.IDENTITY_ID_PREFIX)) == 3
    assert len(client.get_prefix(IDENTITY_INDEX_PREFIX)) == 3


def test_allocator_scans_once_and_recovers_from_others(client):
    """Many allocations cost one scan; when another agent took the cached next ID, the lost
    transaction makes it rescan and take the next free one; after its identities are removed
    a full range is rescanned before giving up."""
    a = IdentityAllocator(client, "cluster1", 1)
    b = IdentityAllocator(client, "cluster1", 1)
    assert [a.allocate({"n": f"v{i}"}).id for i in range(20)] == [C1_FIRST + i for i in range(20)]
    assert a.scans == 1
    # b scanned nothing yet: it sees all 20 and takes 20; a's cache still says 20 is free
    assert b.allocate({"n": "from-b"}).id == C1_FIRST + 20
    got = a.allocate({"n": "from-a"})
    assert (got.id, got.created) == (C1_FIRST + 21, True)
    assert a.scans == 2
    # b's labels are found by a through the index, without a scan
    assert a.allocate({"n": "from-b"}).id == C1_FIRST + 20
    assert a.scans == 2


def test_allocator_rescans_a_full_range(client, monkeypatch):
    monkeypatch.setattr(agent_kvstore, "cluster_identity_range", lambda cid, maxc: (C1_FIRST, C1_FIRST + 1))
    a = IdentityAllocator(client, "cluster1", 1)
    a.allocate({"n": "1"})
    a.allocate({"n": "2"})
    client.delete(layout.identity_key(C1_FIRST))  # freed by someone (garbage collection)
    assert a.allocate({"n": "3"}).id == C1_FIRST


def test_allocate_rejects_bad_labels_before_writing(client):
    with pytest.raises(ValueError, match="contradicts the cluster"):
        allocate_identity(client, "cluster1", 1, {"io.cilium.k8s.policy.cluster": "cluster2"})
    assert len(client.get_prefix("cilium/")) == 0


def test_concurrent_allocation(etcd, client):
    """8 agents (threads, each its own connection) allocate 4 label sets at once, twice each:
    each label set gets one ID, different label sets get different IDs, IDs are the lowest."""
    label_sets = [{"name": f"app-{i}"} for i in range(4)]
    results: list[tuple[int, int]] = []
    errors: list[BaseException] = []
    barrier = threading.Barrier(8)
    lock = threading.Lock()

    def agent(index: int) -> None:
        c = make_client(etcd)
        try:
            barrier.wait(5)
            order = label_sets[index % 4 :] + label_sets[: index % 4]
            for labels in order + order:
                got = allocate_identity(c, "cluster1", 1, labels)
                with lock:
                    results.append((label_sets.index(labels), got.id))
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)
        finally:
            c.close()

    threads = [threading.Thread(target=agent, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(20)
    assert not errors, errors
    assert len(results) == 8 * 2 * 4
    by_labels: dict[int, set[int]] = {}
    for which, number in results:
        by_labels.setdefault(which, set()).add(number)
    assert all(len(ids) == 1 for ids in by_labels.values()), by_labels
    ids = sorted(next(iter(s)) for s in by_labels.values())
    assert ids == [C1_FIRST + i for i in range(4)]
    stored = {kv.key: kv.value for kv in client.get_prefix(layout.IDENTITY_ID_PREFIX)}
    assert len(stored) == 4  # no identity was created twice


# --------------------------------------------------------------------------------------------
# publishing under a lease
# --------------------------------------------------------------------------------------------


def test_node_and_ipcache_vanish_with_the_lease(client):
    lease = client.lease_grant(30)
    node = make_node_record("c1-n1", "cluster1", 1, [("InternalIP", "198.18.1.11")], ipv4_alloc_cidr="10.1.0.0/24")
    assert register_node(client, node, lease) is True
    assert register_node(client, node, lease) is False  # unchanged: not rewritten
    kv = client.get("cilium/state/nodes/v1/cluster1/c1-n1")
    assert kv.lease == lease.id
    assert decode_node(kv.value, key=kv.key, cluster="cluster1", cluster_id=1) == node

    entry = make_ipcache_entry("10.1.0.5", C1_FIRST, "198.18.1.11", k8s_namespace="default", k8s_pod_name="x-wing")
    assert publish_ipcache_entry(client, entry, lease) is True
    revision = client.get("cilium/state/ip/v1/default/10.1.0.5").mod_revision
    assert publish_ipcache_entry(client, entry, lease) is False
    assert client.get("cilium/state/ip/v1/default/10.1.0.5").mod_revision == revision
    moved = make_ipcache_entry("10.1.0.5", C1_FIRST + 1, "198.18.1.11")
    assert publish_ipcache_entry(client, moved, lease) is True
    kv = client.get("cilium/state/ip/v1/default/10.1.0.5")
    assert decode_ipcache_entry(kv.value, key=kv.key, cluster_id=1) == moved
    assert kv.lease == lease.id
    publish_ipcache_entry(client, make_ipcache_entry("10.1.0.6", C1_FIRST, "198.18.1.11"), lease)

    # an identity allocated meanwhile is not under the lease and survives it
    allocate_identity(client, "cluster1", 1, {"name": "x-wing"})
    client.lease_revoke(lease)
    assert client.get("cilium/state/nodes/v1/cluster1/c1-n1") is None
    assert len(client.get_prefix("cilium/state/ip/v1/")) == 0
    assert len(client.get_prefix(layout.IDENTITY_ID_PREFIX)) == 1


def test_entries_expire_with_the_lease(client):
    """The agent dies (no keepalive): its node and ipcache entries vanish when the TTL runs out."""
    lease = client.lease_grant(2)
    node = make_node_record("c1-n2", "cluster1", 1, [("InternalIP", "198.18.1.12")])
    register_node(client, node, lease)
    publish_ipcache_entry(client, make_ipcache_entry("10.1.1.5", C1_FIRST, "198.18.1.12"), lease)
    write_heartbeat(client, lease)
    deadline = time.monotonic() + 8
    while client.get("cilium/state/nodes/v1/cluster1/c1-n2") is not None and time.monotonic() < deadline:
        time.sleep(0.2)
    assert client.get("cilium/state/nodes/v1/cluster1/c1-n2") is None
    assert client.get("cilium/state/ip/v1/default/10.1.1.5") is None
    assert client.get("cilium/.heartbeat") is None


def test_deregister_node_only_under_our_lease(client):
    ours, other = client.lease_grant(30), client.lease_grant(30)
    node = make_node_record("c1-n3", "cluster1", 1, [("InternalIP", "198.18.1.13")])
    register_node(client, node, other)  # e.g. a newer agent instance took over
    assert deregister_node(client, "cluster1", "c1-n3", ours) is False
    assert client.get("cilium/state/nodes/v1/cluster1/c1-n3") is not None
    assert deregister_node(client, "cluster1", "c1-n3", other) is True
    assert client.get("cilium/state/nodes/v1/cluster1/c1-n3") is None
    client.lease_revoke(ours)
    client.lease_revoke(other)


def test_same_value_under_a_new_lease_is_rewritten(client):
    """After a restart the agent has a new lease: unchanged values must move to it."""
    old, new = client.lease_grant(30), client.lease_grant(30)
    entry = make_ipcache_entry("10.1.0.9", C1_FIRST, "198.18.1.11")
    publish_ipcache_entry(client, entry, old)
    assert publish_ipcache_entry(client, entry, new) is True
    assert client.get("cilium/state/ip/v1/default/10.1.0.9").lease == new.id
    client.lease_revoke(old)
    assert client.get("cilium/state/ip/v1/default/10.1.0.9") is not None
    client.lease_revoke(new)


def test_withdraw_only_our_entry(client):
    ours, theirs = client.lease_grant(30), client.lease_grant(30)
    publish_ipcache_entry(client, make_ipcache_entry("10.1.0.7", C1_FIRST, "198.18.1.11"), ours)
    publish_ipcache_entry(client, make_ipcache_entry("10.1.0.8", C1_FIRST, "198.18.1.12"), theirs)
    assert withdraw_ipcache_entry(client, "10.1.0.8", ours) is False
    assert client.get("cilium/state/ip/v1/default/10.1.0.8") is not None
    assert withdraw_ipcache_entry(client, "10.1.0.7", ours) is True
    assert client.get("cilium/state/ip/v1/default/10.1.0.7") is None
    assert withdraw_ipcache_entry(client, "10.1.0.7", ours) is False  # already gone
    client.lease_revoke(ours)
    client.lease_revoke(theirs)


def test_put_if_changed_plain_key(client):
    assert put_if_changed(client, "cilium/clustermesh-core/test", b"1") is True
    assert put_if_changed(client, "cilium/clustermesh-core/test", b"1") is False
    assert put_if_changed(client, "cilium/clustermesh-core/test", b"2") is True


def test_heartbeat_and_synced_canaries(client):
    lease = client.lease_grant(30)
    when = datetime.datetime(2026, 11, 30, 12, 0, 0, tzinfo=datetime.UTC)
    write_heartbeat(client, lease, now=when)
    kv = client.get("cilium/.heartbeat")
    assert kv.value == b"2026-11-30T12:00:00Z" and kv.lease == lease.id
    write_heartbeat(client, lease)  # refreshed with the current time
    age = time.time() - layout.decode_timestamp(client.get("cilium/.heartbeat").value).timestamp()
    assert -2 < age < 5

    keys = write_synced_canaries(client, "cluster1", lease=lease, now=when)
    assert keys == [
        "cilium/synced/cluster1/cilium/state/nodes/v1",
        "cilium/synced/cluster1/cilium/state/services/v1",
        "cilium/synced/cluster1/cilium/state/identities/v1",
        "cilium/synced/cluster1/cilium/state/ip/v1",
    ]
    for key in keys:
        kv = client.get(key)
        assert kv.value == b"2026-11-30T12:00:00Z" and kv.lease == lease.id
        assert layout.parse_synced_key(key).cluster == "cluster1"
    # a bad prefix is refused before anything is written
    with pytest.raises(ValueError, match="under 'cilium/'"):
        write_synced_canaries(client, "cluster2", ["cilium/state/nodes/v1", "other/x"])
    assert len(client.get_prefix("cilium/synced/cluster2/")) == 0
    client.lease_revoke(lease)
    assert client.get("cilium/.heartbeat") is None
    assert len(client.get_prefix("cilium/synced/")) == 0
