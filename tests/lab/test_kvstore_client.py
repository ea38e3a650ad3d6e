# -*- coding: utf-8 -*-
# Copyright: clustermesh.core contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""kvstore_client against a real etcd 3.4 with mutual TLS on 127.0.0.1 (started per test or module)."""

from __future__ import annotations

import queue
import threading
import time

import pytest

from ansible_collections.clustermesh.core.plugins.module_utils.kvstore_client import (
    EVENT_DELETE,
    EVENT_PUT,
    UPDATE_EVENTS,
    UPDATE_INITIAL,
    UPDATE_RESYNC,
    KVStoreClient,
    KVStoreConfigError,
    KVStoreError,
    KVStoreLeaseNotFound,
    KVStorePermissionDenied,
    KVStoreTLSError,
    KVStoreUnavailable,
)
from ansible_collections.clustermesh.core.plugins.module_utils.kvstore_config import EtcdClientConfig
from ansible_collections.clustermesh.core.tests.etcd_fixture import (
    EtcdServer,
    SilentListener,
    TCPProxy,
    TestPKI,
    etcd_available,
    free_port,
)

pytestmark = [
    pytest.mark.etcd,
    pytest.mark.skipif(not etcd_available(), reason="etcd and etcdctl are not installed"),
]


def make_client(server: EtcdServer, user: str = "root", endpoints=None, **kwargs) -> KVStoreClient:
    pair = server.pki.client(user)
    kwargs.setdefault("timeout", 3.0)
    kwargs.setdefault("connect_timeout", 2.0)
    return KVStoreClient(
        endpoints or [server.endpoint],
        ca_file=server.pki.ca_cert,
        cert_file=pair.cert,
        key_file=pair.key,
        **kwargs,
    )


@pytest.fixture(scope="module")
def shared_etcd(tmp_path_factory):
    """One etcd for the tests that neither restart it nor enable auth."""
    base = tmp_path_factory.mktemp("etcd-shared")
    server = EtcdServer(base / "etcd", TestPKI(base / "pki"))
    server.start()
    yield server
    server.stop()


@pytest.fixture
def etcd(tmp_path):
    """A private etcd that the test may kill, restart or put under auth."""
    server = EtcdServer(tmp_path / "etcd", TestPKI(tmp_path / "pki"))
    server.start()
    yield server
    server.stop()


@pytest.fixture
def client(shared_etcd, request):
    c = make_client(shared_etcd)
    # each test writes under its own prefix
    c.test_prefix = f"t/{request.node.name}/"
    yield c
    c.close()


class Collector:
    """Runs a watcher in a thread and collects its updates."""

    def __init__(self, watcher):
        self.watcher = watcher
        self.updates: queue.Queue = queue.Queue()
        self.exit: queue.Queue = queue.Queue()
        self.thread = watcher.start_thread(self.updates.put, on_exit=self.exit.put)

    def next(self, timeout: float = 10.0):
        return self.updates.get(timeout=timeout)

    def events_until(self, predicate, timeout: float = 15.0):
        """Collect events (across updates) until ``predicate(events)`` holds."""
        events, kinds = [], []
        deadline = time.monotonic() + timeout
        while not predicate(events):
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise AssertionError(f"timed out; got {[(e.type, e.key) for e in events]} in {kinds}")
            update = self.updates.get(timeout=remaining)
            kinds.append(update.kind)
            events.extend(update.events)
        return events, kinds

    def stop(self):
        self.watcher.stop()
        self.thread.join(5)
        assert not self.thread.is_alive(), "watcher thread did not stop"


# --------------------------------------------------------------------------------------------
# basic operations over mTLS
# --------------------------------------------------------------------------------------------


def test_put_get_prefix_delete_round_trip(client):
    p = client.test_prefix
    assert client.user == "root"
    rev1 = client.put(p + "a", "1")
    rev2 = client.put(p + "b", b"\x00\xff")
    assert rev2 > rev1
    kv = client.get(p + "a")
    assert (kv.key, kv.value, kv.text(), kv.mod_revision, kv.version, kv.lease) == (p + "a", b"1", "1", rev1, 1, 0)
    assert client.get(p + "missing") is None
    listing = client.get_prefix(p)
    assert [kv.key for kv in listing] == [p + "a", p + "b"]
    assert listing.revision >= rev2
    assert listing.as_dict()[p + "b"].value == b"\x00\xff"
    assert len(client.get_prefix(p, keys_only=True)) == 2
    # paging returns the same keys at one revision
    for i in range(5):
        client.put(f"{p}page/{i}", str(i))
    paged = client.get_prefix(p + "page/", page_size=2)
    assert [kv.value for kv in paged] == [b"0", b"1", b"2", b"3", b"4"]
    assert client.delete(p + "a") == 1
    assert client.delete(p + "a") == 0
    assert client.delete_prefix(p) == 6
    assert len(client.get_prefix(p)) == 0
    status = client.status()
    assert status["version"].startswith("3.4")
    assert status["revision"] >= rev2


def test_large_prefix(client, shared_etcd):
    """6 MiB under one prefix: beyond gRPC's default 4 MiB receive limit, within the client's 64 MiB."""
    p = client.test_prefix
    blob = b"x" * (1024 * 1024)
    for i in range(6):
        client.put(f"{p}{i}", blob)
    try:
        assert sum(len(kv.value) for kv in client.get_prefix(p)) == 6 * len(blob)
        with make_client(shared_etcd, max_receive_bytes=4 * 1024 * 1024) as small:
            with pytest.raises(KVStoreError, match="too large"):
                small.get_prefix(p)
            assert len(small.get_prefix(p, page_size=2)) == 6
    finally:
        client.delete_prefix(p)


def test_transactions(client):
    p = client.test_prefix
    assert client.put_if_absent(p + "x", "first") is True
    assert client.put_if_absent(p + "x", "second") is False
    kv = client.get(p + "x")
    assert kv.value == b"first"
    assert client.put_if_mod_revision(p + "x", "third", kv.mod_revision + 100) is False
    assert client.put_if_mod_revision(p + "x", "third", kv.mod_revision) is True
    kv = client.get(p + "x")
    assert kv.value == b"third"
    assert client.delete_if_mod_revision(p + "x", kv.mod_revision - 1) is False
    assert client.delete_if_mod_revision(p + "x", kv.mod_revision) is True
    assert client.get(p + "x") is None
    assert client.put_if_mod_revision(p + "y", "new", 0) is True  # 0: "does not exist"


def test_leases(client):
    p = client.test_prefix
    lease = client.lease_grant(5)
    assert lease.ttl == 5
    client.put(p + "leased", "v", lease=lease)
    assert client.get(p + "leased").lease == lease.id
    assert 0 < client.lease_keepalive(lease) <= 5
    assert 0 < client.lease_ttl(lease) <= 5
    lost = threading.Event()
    keeper = client.keep_lease_alive(lease, interval=0.2, on_lost=lambda exc: lost.set())
    client.lease_revoke(lease)
    assert client.get(p + "leased") is None
    assert lost.wait(5), "the keeper did not notice the revoked lease"
    keeper.stop(2)
    assert keeper.lost
    with pytest.raises(KVStoreLeaseNotFound):
        client.lease_keepalive(lease)
    with pytest.raises(KVStoreLeaseNotFound):
        client.put(p + "leased", "v", lease=lease)


def test_from_config_and_failover(shared_etcd):
    """A dead endpoint first in the list: every call still succeeds through the second one."""
    pair = shared_etcd.pki.client("root")
    dead = f"https://127.0.0.1:{free_port()}"
    config = EtcdClientConfig(
        endpoints=(dead, shared_etcd.endpoint),
        trusted_ca_file=shared_etcd.pki.ca_cert,
        cert_file=pair.cert,
        key_file=pair.key,
    )
    with KVStoreClient.from_config(config, timeout=3.0, connect_timeout=1.0) as c:
        c._preferred = 0  # start on the dead endpoint
        c.put("t/failover/k", "v")  # a write whose connection failed is safe to send elsewhere
        assert c.get("t/failover/k").value == b"v"
        assert c.endpoints[c._preferred] == shared_etcd.endpoint
        c.delete("t/failover/k")


# --------------------------------------------------------------------------------------------
# refusals and bounded timeouts
# --------------------------------------------------------------------------------------------


def test_client_certificate_from_another_ca_is_refused(shared_etcd, tmp_path):
    other = TestPKI(tmp_path / "other", name="other-ca")
    pair = other.client("root")
    with (
        KVStoreClient(
            [shared_etcd.endpoint], ca_file=shared_etcd.pki.ca_cert, cert_file=pair.cert, key_file=pair.key, timeout=3
        ) as c,
        pytest.raises(KVStoreTLSError) as info,
    ):
        c.get("anything")
    message = str(info.value)
    assert shared_etcd.endpoint in message
    assert "TLS" in message


def test_wrong_trusted_ca_is_refused(shared_etcd, tmp_path):
    other = TestPKI(tmp_path / "other", name="other-ca")
    pair = shared_etcd.pki.client("root")
    with (
        KVStoreClient(
            [shared_etcd.endpoint], ca_file=other.ca_cert, cert_file=pair.cert, key_file=pair.key, timeout=3
        ) as c,
        pytest.raises(KVStoreTLSError, match="CERTIFICATE_VERIFY_FAILED"),
    ):
        c.get("anything")


def test_plaintext_to_tls_port_is_refused(shared_etcd):
    plain = shared_etcd.endpoint.replace("https://", "http://")
    with pytest.raises(KVStoreConfigError, match="plaintext"):
        KVStoreClient([plain])
    with KVStoreClient([plain], allow_plaintext=True, timeout=1.5) as c:
        start = time.monotonic()
        with pytest.raises(KVStoreUnavailable) as info:
            c.get("anything")
        assert time.monotonic() - start < 2.0
    assert plain in str(info.value)


def test_nothing_listening_fails_within_timeout(shared_etcd):
    url = f"https://127.0.0.1:{free_port()}"
    with make_client(shared_etcd, endpoints=[url], timeout=2.0, connect_timeout=1.0) as c:
        start = time.monotonic()
        with pytest.raises(KVStoreUnavailable) as info:
            c.get("anything")
        assert time.monotonic() - start < 2.5
    assert url in str(info.value)
    assert "Connection refused" in str(info.value)


def test_silent_peer_fails_within_timeout(shared_etcd):
    """A peer that accepts TCP and never completes TLS: bounded by the connect timeout/deadline."""
    silent = SilentListener()
    try:
        with make_client(shared_etcd, endpoints=[silent.endpoint], timeout=1.5, connect_timeout=1.0) as c:
            start = time.monotonic()
            with pytest.raises(KVStoreUnavailable):
                c.get("anything")
            assert time.monotonic() - start < 2.5
            # a watcher to it gives up within its budget instead of hanging
            watcher = c.watch_prefix("x/", backoff_initial=0.1, give_up_after=1.0)
            start = time.monotonic()
            with pytest.raises(KVStoreUnavailable, match="giving up"):
                list(watcher)
            assert time.monotonic() - start < 6
    finally:
        silent.close()


def test_bad_settings_are_reported(shared_etcd, tmp_path):
    with pytest.raises(KVStoreConfigError, match="cannot read trusted CA file"):
        KVStoreClient([shared_etcd.endpoint], ca_file=str(tmp_path / "nope.crt"))
    with pytest.raises(KVStoreConfigError, match="together"):
        KVStoreClient([shared_etcd.endpoint], cert_file="/x")
    with pytest.raises(KVStoreConfigError, match="scheme"):
        KVStoreClient(["127.0.0.1:2379"])


# --------------------------------------------------------------------------------------------
# watcher
# --------------------------------------------------------------------------------------------


def test_watch_initial_list_then_events_and_prompt_stop(client):
    p = client.test_prefix
    client.put(p + "a", "1")
    client.put(p + "b", "2")
    client.put("t/outside", "x")
    col = Collector(client.watch_prefix(p))
    initial = col.next()
    assert initial.kind == UPDATE_INITIAL
    assert [(e.type, e.key, e.value) for e in initial.events] == [
        (EVENT_PUT, p + "a", b"1"),
        (EVENT_PUT, p + "b", b"2"),
    ]
    assert [kv.key for kv in initial.snapshot] == [p + "a", p + "b"]
    client.put(p + "c", "3")
    client.delete(p + "a")
    client.put("t/outside", "y")
    client.put(p + "b", "22")
    events, kinds = col.events_until(lambda ev: len(ev) >= 3)
    assert set(kinds) == {UPDATE_EVENTS}
    assert [(e.type, e.key, e.value) for e in events] == [
        (EVENT_PUT, p + "c", b"3"),
        (EVENT_DELETE, p + "a", b""),
        (EVENT_PUT, p + "b", b"22"),
    ]
    assert [e.revision for e in events] == sorted(e.revision for e in events)
    start = time.monotonic()
    col.stop()
    assert time.monotonic() - start < 1.0
    assert col.exit.get(timeout=1) is None


def test_client_close_stops_watchers(shared_etcd):
    c = make_client(shared_etcd)
    col = Collector(c.watch_prefix("t/close/"))
    assert col.next().kind == UPDATE_INITIAL
    start = time.monotonic()
    c.close()
    col.thread.join(2)
    assert not col.thread.is_alive()
    assert time.monotonic() - start < 2
    with pytest.raises(KVStoreError, match="closed"):
        c.get("x")


def test_watch_survives_etcd_restart(etcd):
    """etcd is SIGKILLed and started again on the same data dir while a watcher runs:
    the watcher resumes from its last revision and sees every later write, in order."""
    c = make_client(etcd)
    errors: list[KVStoreError] = []
    try:
        c.put("cm/k0", "before")
        col = Collector(c.watch_prefix("cm/", backoff_initial=0.1, backoff_max=0.5, on_error=errors.append))
        assert [e.key for e in col.next().events] == ["cm/k0"]
        c.put("cm/k1", "before-kill")
        events, unused = col.events_until(lambda ev: len(ev) >= 1)
        assert events[0].key == "cm/k1"
        etcd.restart(hard=True)
        expected = []
        for i in range(20):
            key = f"cm/after/{i:02d}"
            c.put(key, str(i))
            expected.append(key)
        c.delete("cm/k0")
        events, kinds = col.events_until(lambda ev: len(ev) >= 21, timeout=20)
        assert [e.key for e in events] == [*expected, "cm/k0"]
        assert [e.type for e in events] == [EVENT_PUT] * 20 + [EVENT_DELETE]
        assert set(kinds) == {UPDATE_EVENTS}  # resumed from the revision: no re-list needed
        assert col.watcher.relists == 0
        assert errors, "the interruption was not reported to on_error"
        assert all(isinstance(e, KVStoreUnavailable) for e in errors)
        col.stop()
    finally:
        c.close()


def test_call_during_etcd_restart_waits_for_it(etcd):
    """A get issued while etcd is down succeeds once etcd is back, within the call's timeout."""
    c = make_client(etcd, timeout=5.0, connect_timeout=4.0)
    try:
        c.put("k", "v")
        etcd.kill()
        with pytest.raises(KVStoreUnavailable, match="Connection refused"):
            make_client(etcd, timeout=0.5, connect_timeout=0.5).get("k")
        starter = threading.Timer(0.5, etcd.start)
        starter.start()
        start = time.monotonic()
        assert c.get("k").value == b"v"
        assert time.monotonic() - start < 5.0
        starter.join()
    finally:
        c.close()


def test_watch_relists_after_compaction(shared_etcd):
    """The watcher is cut off (TCP proxy blocked), keys change and the history is compacted;
    when it reconnects, its revision is gone: it re-lists and reports exactly the difference."""
    proxy = TCPProxy(shared_etcd.client_port).start()
    direct = make_client(shared_etcd)
    via_proxy = make_client(shared_etcd, endpoints=[proxy.endpoint])
    try:
        p = "t/compaction/"
        for name in ("keep", "change", "vanish"):
            direct.put(p + name, "v1")
        col = Collector(via_proxy.watch_prefix(p, backoff_initial=0.1, backoff_max=0.3))
        assert len(col.next().events) == 3
        proxy.block()
        time.sleep(0.3)
        direct.put(p + "change", "v2")
        direct.delete(p + "vanish")
        direct.put(p + "new", "v1")
        direct.put(p + "tmp", "x")
        direct.delete(p + "tmp")  # created and deleted while away: never reported
        direct.compact(direct.status()["revision"], physical=True)
        proxy.unblock()
        update = col.next(timeout=15)
        assert update.kind == UPDATE_RESYNC
        assert sorted((e.type, e.key) for e in update.events) == [
            (EVENT_DELETE, p + "vanish"),
            (EVENT_PUT, p + "change"),
            (EVENT_PUT, p + "new"),
        ]
        assert all(e.synthetic for e in update.events)
        assert sorted(kv.key for kv in update.snapshot) == [p + "change", p + "keep", p + "new"]
        assert col.watcher.relists == 1
        # and it keeps watching afterwards
        direct.put(p + "after", "1")
        events, unused = col.events_until(lambda ev: len(ev) >= 1)
        assert (events[0].type, events[0].key) == (EVENT_PUT, p + "after")
        col.stop()
    finally:
        via_proxy.close()
        direct.close()
        proxy.stop()


def test_watch_detects_half_open_connection(shared_etcd):
    """The watch connection silently stops forwarding (no FIN, no RST): gRPC keepalive notices
    within keepalive_time + keepalive_timeout and the watcher resumes on a new connection.
    (etcd refuses client pings more often than every 5 s, so the keepalive cannot be shorter.)"""
    proxy = TCPProxy(shared_etcd.client_port).start()
    direct = make_client(shared_etcd)
    via_proxy = make_client(shared_etcd, endpoints=[proxy.endpoint], keepalive_time=5.5, keepalive_timeout=1.5)
    errors: list[KVStoreError] = []
    try:
        p = "t/half-open/"
        col = Collector(via_proxy.watch_prefix(p, backoff_initial=0.1, on_error=errors.append))
        assert col.next().kind == UPDATE_INITIAL
        proxy.freeze()
        start = time.monotonic()
        direct.put(p + "a", "1")
        events, unused = col.events_until(lambda ev: len(ev) >= 1, timeout=15)
        assert events[0].key == p + "a"
        assert 1.0 < time.monotonic() - start < 12
        assert errors and isinstance(errors[0], KVStoreUnavailable)
        col.stop()
    finally:
        via_proxy.close()
        direct.close()
        proxy.stop()


def test_watch_from_compacted_start_revision_resyncs(client):
    p = client.test_prefix
    first = client.put(p + "a", "1")
    client.put(p + "a", "2")
    client.compact(client.status()["revision"])
    col = Collector(client.watch_prefix(p, start_revision=first))
    update = col.next()
    assert update.kind == UPDATE_RESYNC
    assert [(e.type, e.key, e.value) for e in update.events] == [(EVENT_PUT, p + "a", b"2")]
    col.stop()


# --------------------------------------------------------------------------------------------
# auth: read-only user by certificate CN
# --------------------------------------------------------------------------------------------


@pytest.fixture
def etcd_auth(etcd):
    etcd.enable_auth({"remote-c2": [("read", "cilium/state/", True), ("read", "cilium/.heartbeat", False)]})
    return etcd


def test_read_only_user(etcd_auth):
    root = make_client(etcd_auth, "root")
    ro = make_client(etcd_auth, "remote-c2", timeout=2.0)
    try:
        root.put("cilium/state/nodes/v1/c2/n1", "{}")
        root.put("cilium/cluster-config/c2", '{"id": 2}')
        assert ro.user == "remote-c2"
        assert ro.get("cilium/state/nodes/v1/c2/n1").value == b"{}"
        assert len(ro.get_prefix("cilium/state/")) == 1

        with pytest.raises(KVStorePermissionDenied) as info:
            ro.put("cilium/state/nodes/v1/c2/n2", "{}")
        assert info.value.key == "cilium/state/nodes/v1/c2/n2"
        assert info.value.user == "remote-c2"
        assert "remote-c2" in str(info.value)

        with pytest.raises(KVStorePermissionDenied):
            ro.get("cilium/cluster-config/c2")

        # a watch outside its permission: raised within a bounded time, not a silent hang
        for kwargs in ({}, {"start_revision": 1}):  # with the initial list, and watch-only (cancel flag)
            watcher = ro.watch_prefix("cilium/", **kwargs)
            start = time.monotonic()
            with pytest.raises(KVStorePermissionDenied) as info:
                next(iter(watcher))
            assert time.monotonic() - start < 3
            assert info.value.key == "cilium/"
            assert "remote-c2" in str(info.value)

        # a watch inside its permission works
        col = Collector(ro.watch_prefix("cilium/state/"))
        assert [e.key for e in col.next().events] == ["cilium/state/nodes/v1/c2/n1"]
        root.put("cilium/state/nodes/v1/c2/n2", "{}")
        events, unused = col.events_until(lambda ev: len(ev) >= 1)
        assert events[0].key == "cilium/state/nodes/v1/c2/n2"
        col.stop()

        # an unknown CN is denied too
        nobody = make_client(etcd_auth, "nobody", timeout=2.0)
        with pytest.raises(KVStorePermissionDenied):
            nobody.get("cilium/state/nodes/v1/c2/n1")
        nobody.close()
    finally:
        ro.close()
        root.close()


def test_auth_wrappers(etcd):
    """user/role administration through the client; users without password (CN auth)."""
    root = make_client(etcd, "root")
    try:
        root.user_add("root")
        root.user_grant_role("root", "root")
        root.role_add("reader")
        root.role_grant_permission("reader", "cilium/state/", permission="read", prefix=True)
        root.role_grant_permission("reader", "cilium/.heartbeat", permission="read")
        root.user_add("remote-c3")
        root.user_grant_role("remote-c3", "reader")
        assert set(root.user_list()) == {"root", "remote-c3"}
        assert root.user_get("remote-c3") == ["reader"]
        perms = root.role_get("reader")
        assert {(p.permission, p.key, p.is_prefix) for p in perms} == {
            ("read", "cilium/state/", True),
            ("read", "cilium/.heartbeat", False),
        }
        assert "reader" in root.role_list()
        root.auth_enable()
        # the user has no password: etcdctl agrees, and it can read by CN only
        assert "Roles: reader" in etcd.etcdctl("user", "get", "remote-c3").stdout
        ro = make_client(etcd, "remote-c3")
        assert ro.get_prefix("cilium/state/").revision > 0
        with pytest.raises(KVStorePermissionDenied):
            ro.put("cilium/state/x", "1")
        ro.close()
        root.role_revoke_permission("reader", "cilium/.heartbeat")
        assert len(root.role_get("reader")) == 1
        with pytest.raises(KVStoreError) as info:
            root.user_add("remote-c3")
        assert "already exists" in str(info.value)
        root.auth_disable()
    finally:
        root.close()
