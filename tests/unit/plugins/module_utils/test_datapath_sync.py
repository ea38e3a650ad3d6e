# -*- coding: utf-8 -*-
# Copyright: clustermesh.core contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""datapath_sync against dict-backed fake maps that check, after every single write, that the
datapath could use the maps at that moment (hitless): each service's slots 1..count exist and name
backends that exist, and its rev-NAT entry exists."""

from __future__ import annotations

import os
import time

import pytest

from ansible_collections.clustermesh.core.plugins.module_utils import bpf_maps, bpf_syscall
from ansible_collections.clustermesh.core.plugins.module_utils import datapath_sync as ds
from ansible_collections.clustermesh.core.plugins.module_utils.datapath_sync import (
    BackendSpec,
    CapacityError,
    DatapathSync,
    FrontendSpec,
    IPCacheSpec,
)
from ansible_collections.clustermesh.core.plugins.module_utils.services import (
    Backend,
    MergedFrontend,
    MergedService,
    ServiceOptions,
    make_declaration,
)


def _freeze(d):
    return tuple(sorted(d.items()))


class FakeMap:
    """A dict-backed map with PinnedMap's interface (dict keys and values), a size limit and a log."""

    def __init__(self, spec, owner, max_entries=None):
        self.spec = spec  # a MapSpec, but no fd: datapath_sync treats it as a dict-level map
        self.max_entries = max_entries or spec.max_entries
        self.data = {}
        self.owner = owner

    def lookup(self, key):
        value = self.data.get(_freeze(key))
        return dict(value) if value is not None else None

    def update(self, key, value, flags=0):
        self.spec.key.encode(key), self.spec.value.encode(value)  # layouts accept them
        k = _freeze(key)
        if k not in self.data and len(self.data) >= self.max_entries:
            raise OSError(7, f"{self.spec.name} is full")
        self.data[k] = _freeze(value)
        self.owner.changed(("update", self.spec.name, k))

    def delete(self, key):
        k = _freeze(key)
        found = self.data.pop(k, None) is not None
        self.owner.changed(("delete", self.spec.name, k))
        return found

    def items(self):
        return [(dict(k), dict(v)) for k, v in self.data.items()]


class FakeMaps:
    """The four maps DatapathSync uses; ``ops`` logs every write; ``check`` verifies the datapath view."""

    def __init__(self, max_svc=None, max_be=None, max_ipcache=None, check=True):
        self.ops = []
        self.check = check
        self.service = FakeMap(bpf_maps.SERVICE_MAP, self, max_svc)
        self.backend = FakeMap(bpf_maps.BACKEND_MAP, self, max_be)
        self.revnat = FakeMap(bpf_maps.REVNAT_MAP, self)
        self.ipcache = FakeMap(bpf_maps.IPCACHE_MAP, self, max_ipcache)

    def changed(self, op):
        self.ops.append(op)
        if self.check:
            assert_usable(self)


def assert_usable(maps):
    """What lb.c needs at every moment: a head's slots 1..count and their backends, and its rev-NAT."""
    svc = {k: dict(v) for k, v in maps.service.data.items()}
    for key, head in svc.items():
        key = dict(key)
        if key["slot"] != 0:
            continue
        for slot in range(1, head["count"] + 1):
            entry = svc.get(_freeze(dict(key, slot=slot)))
            assert entry is not None, f"slot {slot} of {key} missing (count {head['count']})"
            assert _freeze({"backend_id": entry["backend_id"]}) in maps.backend.data, f"backend of {key} slot {slot}"
        assert _freeze({"rev_nat_index": head["rev_nat_index"]}) in maps.revnat.data, f"rev-NAT of {key}"


def fe(ip, port, backends, protocol="TCP", flags=0, cluster_id=1):
    return FrontendSpec(ip, port, protocol, tuple(BackendSpec(b, 8080, cluster_id) for b in backends), flags)


def service_entries(maps):
    return {tuple(dict(k).values()): dict(v) for k, v in maps.service.data.items()}


WEB = fe("172.30.0.10", 80, ["10.1.0.5", "10.1.0.6"])
DNS = fe("172.30.0.11", 53, ["10.1.0.7", "10.2.0.8"], protocol="UDP")


def test_encodings_match_bpf_maps_layouts():
    ip, port_be = b"\x0a\x01\x00\x05", (8080).to_bytes(2, "big")
    assert ds._svc_key((ip, 8080, 6), 3) == bpf_maps.LB_KEY.encode(address="10.1.0.5", dport=8080, slot=3, proto=6)
    assert ds._SVC_VALUE.pack(7, 2, 9, 5) == bpf_maps.LB_SERVICE.encode(backend_id=7, count=2, rev_nat_index=9, flags=5)
    assert ds._BE_KEY.pack(70000) == bpf_maps.LB_BACKEND_KEY.encode(backend_id=70000)
    assert ds._BE_VALUE.pack(ip, port_be, 17, 1, 300, 0) == bpf_maps.LB_BACKEND.encode(
        address="10.1.0.5", port=8080, proto=17, flags=1, cluster_id=300
    )
    assert ds._RN_KEY.pack(65535, 0) == bpf_maps.LB_REVNAT_KEY.encode(rev_nat_index=65535)
    assert ds._RN_VALUE.pack(ip, port_be, 0) == bpf_maps.LB_REVNAT.encode(address="10.1.0.5", port=8080)
    assert ds._IPC_KEY.pack(24, ip) == bpf_maps.IPCACHE_KEY.encode(prefixlen=24, address="10.1.0.5")
    assert ds._IPC_VALUE.pack(70000, ip, 2, 0) == bpf_maps.IPCACHE_VALUE.encode(
        identity=70000, tunnel_endpoint="10.1.0.5", cluster_id=2
    )


def test_first_sync_writes_services_backends_and_rev_nat():
    maps = FakeMaps()
    sync = DatapathSync(maps)
    result = sync.sync_services([WEB, DNS])
    assert result.written == {"cm_lb_svc": 6, "cm_lb_be": 4, "cm_lb_revnat": 2}
    assert result.deleted == {"cm_lb_svc": 0, "cm_lb_be": 0, "cm_lb_revnat": 0}
    assert ds.describe_services(maps) == {
        ("172.30.0.10", 80, "TCP"): [("10.1.0.5", 8080), ("10.1.0.6", 8080)],
        ("172.30.0.11", 53, "UDP"): [("10.1.0.7", 8080), ("10.2.0.8", 8080)],
    }
    assert sync.counts() == {"cm_lb_svc": 6, "cm_lb_be": 4, "cm_lb_revnat": 2, "cm_ipcache": 0}
    # backends are active, carry their cluster and protocol; heads carry count, flags, rev-NAT
    backends = {v["address"]: v for _k, v in maps.backend.items()}
    assert backends["10.2.0.8"] == {"address": "10.2.0.8", "port": 8080, "proto": 17, "flags": 1, "cluster_id": 1}
    ids = sync.rev_nat_indexes()
    head = maps.service.lookup({"address": "172.30.0.10", "dport": 80, "slot": 0, "proto": 6})
    assert head == {"backend_id": 0, "count": 2, "rev_nat_index": ids[("172.30.0.10", 80, "TCP")], "flags": 0}
    assert maps.revnat.lookup({"rev_nat_index": head["rev_nat_index"]}) == {"address": "172.30.0.10", "port": 80}
    # every write came in hitless order: backends and rev-NAT before any slot, slot 0 last per service
    kinds = [name for _op, name, _key in maps.ops]
    assert kinds.index("cm_lb_svc") > max(i for i, k in enumerate(kinds) if k != "cm_lb_svc")
    web_slots = [dict(k)["slot"] for _op, name, k in maps.ops if name == "cm_lb_svc" and dict(k)["dport"] == 80]
    assert web_slots[-1] == 0


def test_no_op_resync_writes_nothing_also_with_equal_new_objects():
    maps = FakeMaps()
    sync = DatapathSync(maps)
    sync.sync_services([WEB, DNS])
    before = len(maps.ops)
    for frontends in ([WEB, DNS], [DNS, WEB], [fe("172.30.0.10", 80, ["10.1.0.5", "10.1.0.6"]), DNS]):
        result = sync.sync_services(frontends)
        assert not result.changed and result.writes == 0
    assert len(maps.ops) == before


def test_backend_added_then_removed_keeps_ids_and_order_hitless():
    maps = FakeMaps()
    sync = DatapathSync(maps)
    sync.sync_services([WEB, DNS])
    ids = sync.backend_ids()
    grown = fe("172.30.0.10", 80, ["10.1.0.5", "10.1.0.6", "10.2.0.9"])
    maps.ops.clear()
    result = sync.sync_services([grown, DNS])
    # one new backend, its slot, the head (count 3); nothing else
    assert result.written == {"cm_lb_svc": 2, "cm_lb_be": 1, "cm_lb_revnat": 0}
    assert [(op, name, dict(k).get("slot")) for op, name, k in maps.ops] == [
        ("update", "cm_lb_be", None),
        ("update", "cm_lb_svc", 3),
        ("update", "cm_lb_svc", 0),
    ]
    after = sync.backend_ids()
    assert {k: after[k] for k in ids} == ids  # existing backends keep their IDs
    # shrink: the first backend goes; slots shift, the head shrinks, the surplus slot and backend go last
    shrunk = fe("172.30.0.10", 80, ["10.1.0.6", "10.2.0.9"])
    maps.ops.clear()
    result = sync.sync_services([shrunk, DNS])
    assert result.deleted == {"cm_lb_svc": 1, "cm_lb_be": 1, "cm_lb_revnat": 0}
    assert [(op, name, dict(k).get("slot")) for op, name, k in maps.ops] == [
        ("update", "cm_lb_svc", 1),
        ("update", "cm_lb_svc", 2),
        ("update", "cm_lb_svc", 0),
        ("delete", "cm_lb_svc", 3),
        ("delete", "cm_lb_be", None),
    ]
    assert ds.describe_services(maps)[("172.30.0.10", 80, "TCP")] == [("10.1.0.6", 8080), ("10.2.0.9", 8080)]
    assert ("10.1.0.5", 8080, "TCP") not in sync.backend_ids()
    assert sync.backend_ids()[("10.1.0.6", 8080, "TCP")] == ids[("10.1.0.6", 8080, "TCP")]


def test_a_backend_shared_by_two_services_stays_until_the_last_one_drops_it():
    maps = FakeMaps()
    sync = DatapathSync(maps)
    a, b = fe("172.30.0.10", 80, ["10.1.0.5"]), fe("172.30.0.12", 80, ["10.1.0.5", "10.1.0.6"])
    sync.sync_services([a, b])
    assert sync.counts()["cm_lb_be"] == 2
    result = sync.sync_services([fe("172.30.0.10", 80, []), b])
    assert result.deleted["cm_lb_be"] == 0
    assert ds.describe_services(maps)[("172.30.0.10", 80, "TCP")] == []  # a service without backends drops
    result = sync.sync_services([fe("172.30.0.10", 80, []), fe("172.30.0.12", 80, ["10.1.0.6"])])
    assert result.deleted["cm_lb_be"] == 1 and sync.counts()["cm_lb_be"] == 1


def test_service_removed_deletes_head_first_then_backends_then_rev_nat():
    maps = FakeMaps()
    sync = DatapathSync(maps)
    sync.sync_services([WEB, DNS])
    maps.ops.clear()
    result = sync.sync_services([WEB])
    assert result.deleted == {"cm_lb_svc": 3, "cm_lb_be": 2, "cm_lb_revnat": 1}
    assert result.written == {"cm_lb_svc": 0, "cm_lb_be": 0, "cm_lb_revnat": 0}
    assert [(name, dict(k).get("slot")) for _op, name, k in maps.ops] == [
        ("cm_lb_svc", 0),
        ("cm_lb_svc", 1),
        ("cm_lb_svc", 2),
        ("cm_lb_be", None),
        ("cm_lb_be", None),
        ("cm_lb_revnat", None),
    ]
    assert list(ds.describe_services(maps)) == [("172.30.0.10", 80, "TCP")]
    assert sync.counts() == {"cm_lb_svc": 3, "cm_lb_be": 2, "cm_lb_revnat": 1, "cm_ipcache": 0}
    sync.sync_services([])
    assert maps.service.data == maps.backend.data == maps.revnat.data == {}


def test_adopt_after_restart_keeps_ids_and_a_no_op_sync_writes_nothing():
    maps = FakeMaps()
    first = DatapathSync(maps)
    first.sync_services([WEB, DNS])
    backend_ids, rev_nat = first.backend_ids(), first.rev_nat_indexes()
    maps.ops.clear()
    # "kill -9" and a new agent: same maps, fresh process state
    second = DatapathSync(maps)
    second.adopt()
    assert second.backend_ids() == backend_ids and second.rev_nat_indexes() == rev_nat
    assert second.counts() == first.counts()
    result = second.sync_services([WEB, DNS])
    assert not result.changed and maps.ops == []
    # a change after the restart keeps the old IDs and takes new ones that collide with none
    result = second.sync_services([fe("172.30.0.10", 80, ["10.1.0.5", "10.1.0.6", "10.1.0.9"]), DNS,
                                   fe("172.30.0.20", 80, ["10.1.0.5"])])  # fmt: skip
    ids = second.backend_ids()
    assert {k: ids[k] for k in backend_ids} == backend_ids
    assert len(set(ids.values())) == len(ids) == 5
    indexes = second.rev_nat_indexes()
    assert {k: indexes[k] for k in rev_nat} == rev_nat and len(set(indexes.values())) == 3


def test_first_sync_without_adopt_reads_the_maps_first():
    maps = FakeMaps()
    DatapathSync(maps).sync_services([WEB, DNS])
    maps.ops.clear()
    sync = DatapathSync(maps)  # no adopt(): the first sync adopts
    assert not sync.sync_services([WEB, DNS]).changed
    assert maps.ops == []


def test_adopt_cleans_up_what_the_next_sync_does_not_want():
    maps = FakeMaps()
    DatapathSync(maps).sync_services([WEB, DNS])
    # leftovers of an interrupted writer: a stray slot beyond count, an unused backend, an orphan rev-NAT,
    # and a duplicate backend ID for 10.1.0.5:8080 that no slot names
    maps.check = False
    maps.service.update({"address": "172.30.0.10", "dport": 80, "slot": 5, "proto": 6},
                        {"backend_id": 1, "count": 0, "rev_nat_index": 1, "flags": 0})  # fmt: skip
    maps.backend.update({"backend_id": 900}, {"address": "10.9.9.9", "port": 1, "proto": 6, "flags": 1})
    maps.backend.update({"backend_id": 901}, {"address": "10.1.0.5", "port": 8080, "proto": 6, "flags": 1,
                                              "cluster_id": 1})  # fmt: skip
    maps.revnat.update({"rev_nat_index": 77}, {"address": "172.30.9.9", "port": 1})
    maps.check = True
    sync = DatapathSync(maps)
    sync.adopt()
    maps.ops.clear()
    result = sync.sync_services([WEB, DNS])
    assert result.written == {"cm_lb_svc": 0, "cm_lb_be": 0, "cm_lb_revnat": 0}
    assert result.deleted == {"cm_lb_svc": 1, "cm_lb_be": 2, "cm_lb_revnat": 1}
    assert sync.counts() == {"cm_lb_svc": 6, "cm_lb_be": 4, "cm_lb_revnat": 2, "cm_ipcache": 0}
    assert not sync.sync_services([WEB, DNS]).changed


def test_adopt_repairs_a_half_written_service():
    maps = FakeMaps()
    DatapathSync(maps).sync_services([WEB])
    maps.check = False
    maps.service.delete({"address": "172.30.0.10", "dport": 80, "slot": 2, "proto": 6})  # a missing slot
    maps.check = True
    sync = DatapathSync(maps)
    sync.adopt()
    result = sync.sync_services([WEB])
    assert result.written["cm_lb_svc"] == 1
    assert ds.describe_services(maps)[("172.30.0.10", 80, "TCP")] == [("10.1.0.5", 8080), ("10.1.0.6", 8080)]


def test_capacity_error_writes_nothing():
    maps = FakeMaps(max_svc=8, max_be=3)
    sync = DatapathSync(maps)
    sync.sync_services([WEB])  # 3 slots, 2 backends
    before = (dict(maps.service.data), dict(maps.backend.data), dict(maps.revnat.data))
    maps.ops.clear()
    with pytest.raises(CapacityError, match=r"cm_lb_svc would hold 9 entries, more than its 8"):
        sync.sync_services([WEB, fe("172.30.0.11", 80, ["10.1.0.5", "10.1.0.6", "10.1.0.7", "10.1.0.8", "10.1.0.9"])])
    with pytest.raises(CapacityError, match=r"cm_lb_be would hold 4 entries, more than its 3"):
        sync.sync_services([WEB, fe("172.30.0.11", 80, ["10.1.0.7", "10.1.0.8"])])
    assert maps.ops == []
    assert (maps.service.data, maps.backend.data, maps.revnat.data) == before
    assert not sync.sync_services([WEB]).changed  # the in-memory copy is intact too


def test_rev_nat_indexes_running_out_is_a_clear_error_naming_the_limit():
    maps = FakeMaps()
    sync = DatapathSync(maps, max_rev_nat_index=3)
    three = [fe(f"172.30.0.{i}", 80, ["10.1.0.5"]) for i in range(1, 4)]
    sync.sync_services(three)
    maps.ops.clear()
    with pytest.raises(CapacityError, match=r"4 frontends need as many rev-NAT indexes, but there are only 3"):
        sync.sync_services([*three, fe("172.30.0.4", 80, ["10.1.0.5"])])
    assert maps.ops == []
    # replacing a frontend while all indexes are in use: the removal runs first and frees its index
    result = sync.sync_services([*three[:2], fe("172.30.0.4", 80, ["10.1.0.5"])])
    assert result.deleted["cm_lb_revnat"] == 1 and result.written["cm_lb_revnat"] == 1
    assert sorted(ds.describe_services(maps)) == [(f"172.30.0.{i}", 80, "TCP") for i in (1, 2, 4)]


def test_rev_nat_indexes_are_not_reused_at_once():
    maps = FakeMaps()
    sync = DatapathSync(maps)
    sync.sync_services([WEB, DNS])
    old = sync.rev_nat_indexes()
    sync.sync_services([WEB])
    sync.sync_services([WEB, fe("172.30.0.12", 80, ["10.1.0.5"])])
    assert sync.rev_nat_indexes()[("172.30.0.12", 80, "TCP")] not in old.values()


def test_churn_that_fits_only_in_steps_is_split_and_stays_hitless():
    # 2 services x 3 backends in a cm_lb_be of 9; both move to 3 new backends each: old + new = 12 > 9
    maps = FakeMaps(max_be=9)
    sync = DatapathSync(maps)
    a = fe("172.30.0.10", 80, ["10.1.0.1", "10.1.0.2", "10.1.0.3"])
    b = fe("172.30.0.11", 80, ["10.1.0.4", "10.1.0.5", "10.1.0.6"])
    sync.sync_services([a, b])
    a2 = fe("172.30.0.10", 80, ["10.2.0.1", "10.2.0.2", "10.2.0.3"])
    b2 = fe("172.30.0.11", 80, ["10.2.0.4", "10.2.0.5", "10.2.0.6"])
    sync.sync_services([a2, b2])  # every write checked by assert_usable; the fake refuses a 10th backend
    assert ds.describe_services(maps) == {
        ("172.30.0.10", 80, "TCP"): [(f"10.2.0.{i}", 8080) for i in (1, 2, 3)],
        ("172.30.0.11", 80, "TCP"): [(f"10.2.0.{i}", 8080) for i in (4, 5, 6)],
    }
    # a single service that cannot move hitlessly: an error that names the peak, nothing written
    maps = FakeMaps(max_be=3)
    sync = DatapathSync(maps)
    sync.sync_services([a])
    maps.ops.clear()
    with pytest.raises(CapacityError, match=r"cm_lb_be would need 6 entries while old and new entries coexist"):
        sync.sync_services([a2])
    assert maps.ops == []


def test_invalid_or_repeated_frontends_raise_before_writing():
    maps = FakeMaps()
    sync = DatapathSync(maps)
    cases = [
        ([WEB, fe("172.30.0.10", 80, ["10.1.0.9"])], r"172\.30\.0\.10:80/TCP is given twice"),
        ([WEB, fe("fd00::1", 80, [])], r"'fd00::1' is not an IPv4 address"),
        ([WEB, fe("172.30.0.12", 80, ["10.1.0.300"])], r"backend 1: '10\.1\.0\.300' is not an IPv4 address"),
        ([WEB, fe("172.30.0.12", 0, [])], r"port 0 is not a port number"),
        ([WEB, fe("172.30.0.12", 80, [], protocol="SCTP")], r"protocol 'SCTP' is not TCP or UDP"),
        ([WEB, fe("172.30.0.12", 80, ["10.1.0.9"], cluster_id=70000)], r"cluster_id must be an integer 0\.\.65535"),
        ([WEB, fe("172.30.0.12", 80, [], flags=256)], r"flags 256 are not 0\.\.255"),
        ([WEB, fe("172.30.0.12", 80, ["10.1.0.5"], cluster_id=2)], r"10\.1\.0\.5:8080/TCP is given with cluster IDs"),
    ]
    for frontends, message in cases:
        with pytest.raises(ValueError, match=message):
            sync.sync_services(frontends)
    assert maps.ops == []


def test_ipcache_add_change_remove():
    maps = FakeMaps()
    sync = DatapathSync(maps)
    entries = [
        IPCacheSpec("10.1.0.5/32", 1001, "0.0.0.0", 1),
        IPCacheSpec("10.2.0.8/32", 2001, "198.18.1.13", 2),
        IPCacheSpec("10.3.0.0/16", 3, "198.18.2.11", 3),
    ]
    result = sync.sync_ipcache(entries)
    assert result.written == {"cm_ipcache": 3} and result.deleted == {"cm_ipcache": 0}
    assert ds.describe_ipcache(maps) == {
        "10.1.0.5/32": (1001, "0.0.0.0"),
        "10.2.0.8/32": (2001, "198.18.1.13"),
        "10.3.0.0/16": (3, "198.18.2.11"),
    }
    assert maps.ipcache.lookup({"prefixlen": 32, "address": "10.2.0.8"})["cluster_id"] == 2
    assert not sync.sync_ipcache(list(entries)).changed
    changed = [
        IPCacheSpec("10.1.0.5/32", 1002, "0.0.0.0", 1),
        entries[1],
        IPCacheSpec("10.1.0.6/32", 1001, "0.0.0.0", 1),
    ]
    result = sync.sync_ipcache(changed)
    assert result.written == {"cm_ipcache": 2} and result.deleted == {"cm_ipcache": 1}
    assert ds.describe_ipcache(maps) == {
        "10.1.0.5/32": (1002, "0.0.0.0"),
        "10.2.0.8/32": (2001, "198.18.1.13"),
        "10.1.0.6/32": (1001, "0.0.0.0"),
    }
    assert sync.counts()["cm_ipcache"] == 3
    # after a restart the entries are adopted: nothing to write
    maps.ops.clear()
    assert not DatapathSync(maps).sync_ipcache(changed).changed and maps.ops == []


def test_ipcache_errors_before_writing():
    maps = FakeMaps(max_ipcache=2)
    sync = DatapathSync(maps)
    for entries, message in [
        ([IPCacheSpec("10.1.0.5", 1)], r"not an IPv4 prefix such as '10\.1\.0\.5/32'"),
        ([IPCacheSpec("10.1.0.5/24", 1)], r"host bits are set"),
        ([IPCacheSpec("10.1.0.5/32", 1), IPCacheSpec("10.1.0.5/32", 2)], r"'10\.1\.0\.5/32' is given twice"),
        ([IPCacheSpec("10.1.0.5/32", -1)], r"identity must be an integer 0\.\.4294967295"),
    ]:
        with pytest.raises(ValueError, match=message):
            sync.sync_ipcache(entries)
    with pytest.raises(CapacityError, match=r"cm_ipcache would hold 3 entries, more than its 2"):
        sync.sync_ipcache([IPCacheSpec(f"10.1.0.{i}/32", i) for i in range(1, 4)])
    assert maps.ops == []
    # full map, all entries replaced: old ones go first to make room
    sync.sync_ipcache([IPCacheSpec("10.1.0.1/32", 1), IPCacheSpec("10.1.0.2/32", 2)])
    sync.sync_ipcache([IPCacheSpec("10.1.0.3/32", 3), IPCacheSpec("10.1.0.4/32", 4)])
    assert sorted(ds.describe_ipcache(maps)) == ["10.1.0.3/32", "10.1.0.4/32"]


def test_a_failed_write_makes_the_next_sync_read_the_maps_again():
    maps = FakeMaps()
    sync = DatapathSync(maps)
    sync.sync_services([WEB])
    real_update = maps.service.update
    calls = []

    def failing(key, value, flags=0):
        calls.append(key)
        if len(calls) == 2:
            raise OSError(12, "no memory")
        real_update(key, value, flags)

    maps.service.update = failing
    with pytest.raises(OSError):
        sync.sync_services([WEB, DNS])
    maps.service.update = real_update
    sync.sync_services([WEB, DNS])
    assert ds.describe_services(maps) == {
        ("172.30.0.10", 80, "TCP"): [("10.1.0.5", 8080), ("10.1.0.6", 8080)],
        ("172.30.0.11", 53, "UDP"): [("10.1.0.7", 8080), ("10.2.0.8", 8080)],
    }
    assert not sync.sync_services([WEB, DNS]).changed


def test_frontends_from_merged_sets_flags_and_cluster_ids():
    decl = make_declaration(
        "default",
        "rebel-base",
        "172.30.0.10",
        [{"name": "http", "port": 80, "target_port": 8080}, {"name": "dns", "port": 53, "protocol": "UDP"}],
        {"app": "rebel-base"},
        {"service.cilium.io/global": "true", "service.cilium.io/affinity": "local"},
    )
    assert decl.options == ServiceOptions(global_=True, shared=True, affinity="local")
    merged = MergedService(
        "default",
        "rebel-base",
        (
            MergedFrontend("172.30.0.10", 80, "TCP", "http",
                           (Backend("10.1.0.5", 8080, "cluster1"), Backend("10.2.0.5", 8080, "cluster2"),
                            Backend("fd00::5", 8080, "cluster2"))),
            MergedFrontend("172.30.0.10", 53, "UDP", "dns", ()),
        ),
        ("cluster1", "cluster2"),
        "all",
    )  # fmt: skip
    key = ("default", "rebel-base")
    specs = ds.frontends_from_merged({key: merged}, {key: decl}, {"cluster1": 1, "cluster2": 2})
    flags = bpf_maps.SVC_F_GLOBAL | bpf_maps.SVC_F_SHARED | bpf_maps.SVC_F_AFFINITY_LOCAL
    assert specs == [
        FrontendSpec("172.30.0.10", 80, "TCP", (BackendSpec("10.1.0.5", 8080, 1), BackendSpec("10.2.0.5", 8080, 2)),
                     flags),
        FrontendSpec("172.30.0.10", 53, "UDP", (), flags),
    ]  # fmt: skip
    local = make_declaration("default", "db", "172.30.0.11", [{"port": 5432}], {"app": "db"}, {})
    assert ds.service_flags(local.options) == 0
    with pytest.raises(ValueError, match=r"backend 10\.2\.0\.5:8080 is in cluster 'cluster2', which has no cluster ID"):
        ds.frontends_from_merged({key: merged}, {key: decl}, {"cluster1": 1})


def test_scale_sync_of_5000_services_with_8_backends_each_is_fast():
    maps = FakeMaps(check=False)
    sync = DatapathSync(maps)
    frontends = [
        FrontendSpec(f"172.{16 + i // 65536}.{i // 256 % 256}.{i % 256}", 80, "TCP",
                     tuple(BackendSpec(f"10.{c}.{i // 64}.{(i % 64) * 4 + n}", 8080, c) for c in (1, 2)
                           for n in range(4)))
        for i in range(5000)
    ]  # fmt: skip
    started = time.perf_counter()
    result = sync.sync_services(frontends)
    first = time.perf_counter() - started
    assert result.written == {"cm_lb_svc": 45000, "cm_lb_be": 40000, "cm_lb_revnat": 5000}
    started = time.perf_counter()
    assert not sync.sync_services(frontends).changed
    again = time.perf_counter() - started
    # one endpoint change reaches one service's slots only
    changed = list(frontends)
    changed[7] = FrontendSpec(changed[7].ip, 80, "TCP", changed[7].backends[1:])
    started = time.perf_counter()
    result = sync.sync_services(changed)
    one = time.perf_counter() - started
    assert result.written["cm_lb_svc"] == 8 and result.deleted == {"cm_lb_svc": 1, "cm_lb_be": 1, "cm_lb_revnat": 0}
    # generous bounds (the fake maps cost more than the real ones); the lab test measures the real maps
    assert first < 30 and again < 1 and one < 1, (first, again, one)


class AnonMap:
    """An unpinned kernel map with a pinned map's spec (what datapath_sync reads from a PinnedMap)."""

    def __init__(self, spec):
        self.spec = spec
        self.fd = bpf_syscall.map_create(spec.map_type, spec.key.size, spec.value.size, spec.max_entries, spec.flags)


class AnonMaps:
    def __init__(self):
        self.service = AnonMap(bpf_maps.SERVICE_MAP)
        self.backend = AnonMap(bpf_maps.BACKEND_MAP)
        self.revnat = AnonMap(bpf_maps.REVNAT_MAP)
        self.ipcache = AnonMap(bpf_maps.IPCACHE_MAP)

    def close(self):
        for m in (self.service, self.backend, self.revnat, self.ipcache):
            bpf_syscall.close(m.fd)


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root (bpf(2))")
@pytest.mark.parametrize("batch", [True, False], ids=["batch", "per-entry"])
def test_real_kernel_maps_with_and_without_batch_operations(batch):
    def new_sync():
        sync = DatapathSync(maps)
        for m in (sync._svc, sync._be, sync._rn, sync._ipc):
            assert m.batch == {"lookup": True, "update": True, "delete": True}  # real maps: raw bytes
            if not batch:
                m.batch = dict.fromkeys(m.batch, False)  # as on a kernel without batch operations
        return sync

    maps = AnonMaps()
    try:
        sync = new_sync()
        frontends = [fe(f"172.30.{i // 256}.{i % 256}", 80, [f"10.1.{i // 64}.{i % 64 * 4 + n}" for n in range(3)])
                     for i in range(3000)]  # fmt: skip
        entries = [IPCacheSpec(f"10.1.{i // 256}.{i % 256}/32", i + 1, "198.18.1.11", 1) for i in range(600)]
        sync.sync_services(frontends)
        sync.sync_ipcache([*entries, IPCacheSpec("10.2.0.0/16", 2, "198.18.1.13", 2)])
        want = {(f.ip, 80, "TCP"): sorted((b.ip, b.port) for b in f.backends) for f in frontends}
        assert ds.describe_services(maps) == want
        assert len(ds.describe_ipcache(maps)) == 601
        assert bpf_maps.PinnedMap.lookup(maps.ipcache, {"prefixlen": 32, "address": "10.2.3.4"})["identity"] == 2
        restarted = new_sync()
        restarted.adopt()  # reads 3000 x 4 + 9000 + 3000 + 601 entries
        assert restarted.backend_ids() == sync.backend_ids()
        assert (
            restarted.counts()
            == sync.counts()
            == {
                "cm_lb_svc": 12000,
                "cm_lb_be": 9000,
                "cm_lb_revnat": 3000,
                "cm_ipcache": 601,
            }
        )
        assert not restarted.sync_services(frontends).changed
        result = restarted.sync_services(frontends[:1000])
        assert result.deleted == {"cm_lb_svc": 8000, "cm_lb_be": 6000, "cm_lb_revnat": 2000}
        assert ds.describe_services(maps) == {k: want[k] for k in list(want)[:1000]}
        restarted.sync_ipcache(entries[:10])
        assert len(ds.describe_ipcache(maps)) == 10
    finally:
        maps.close()


# --- policy ----------------------------------------------------------------------------------------
class PolicyFakeMaps(FakeMaps):
    """FakeMaps plus cm_endpoint and cm_policy."""

    def __init__(self, max_policy=None, **kwargs):
        super().__init__(**kwargs)
        self.endpoint = FakeMap(bpf_maps.ENDPOINT_MAP, self)
        self.policy = FakeMap(bpf_maps.POLICY_MAP, self, max_policy)


class Entry:
    """What policy.PolicyEntry offers the writer."""

    def __init__(self, direction, identity, port=0, protocol=0):
        self.direction, self.identity, self.port, self.protocol = direction, identity, port, protocol


def policy_spec(identity, ingress, egress, *entries):
    return ds.EndpointPolicySpec(identity, ingress, egress, frozenset(entries))


def test_policy_encodings_match_bpf_maps_layouts():
    port_be = (80).to_bytes(2, "big")
    assert ds._EP_KEY.pack(7) == bpf_maps.ENDPOINT_KEY.encode(ifindex=7)
    assert ds._EP_VALUE.pack(65537, 3) == bpf_maps.ENDPOINT_VALUE.encode(identity=65537, flags=3)
    assert ds._POL_KEY.pack(7, 131073, port_be, 6, 1) == bpf_maps.POLICY_KEY.encode(
        ifindex=7, identity=131073, dport=80, proto=6, direction=1
    )
    assert ds._POL_VALUE.pack(0, 0) == bpf_maps.POLICY_VALUE.encode()


def test_policy_entries_are_written_before_the_endpoint_is_enforced_and_removed_after():
    maps = PolicyFakeMaps()
    sync = DatapathSync(maps)
    spec = policy_spec(65537, False, True, Entry("egress", 131073, 80, 6), Entry("egress", 131074))
    result = sync.sync_policy({7: spec})
    assert result.written == {"cm_policy": 2, "cm_endpoint": 1}
    names = [op[1] for op in maps.ops]
    assert names == ["cm_policy", "cm_policy", "cm_endpoint"], maps.ops  # allow entries first
    (value,) = list(maps.endpoint.data.values())
    assert dict(value)["flags"] == bpf_maps.EP_F_EGRESS and dict(value)["identity"] == 65537
    keys = {(dict(k)["identity"], dict(k)["dport"], dict(k)["proto"], dict(k)["direction"]) for k in maps.policy.data}
    assert keys == {(131073, 80, 6, bpf_maps.DIR_EGRESS), (131074, 0, 0, bpf_maps.DIR_EGRESS)}

    maps.ops.clear()
    assert not sync.sync_policy({7: spec}).changed  # nothing changed: no write
    assert maps.ops == []

    assert sync.sync_policy({}).deleted == {"cm_policy": 2, "cm_endpoint": 1}
    assert [op[:2] for op in maps.ops] == [("delete", "cm_endpoint"), ("delete", "cm_policy"), ("delete", "cm_policy")]
    assert not maps.endpoint.data and not maps.policy.data


def test_policy_change_writes_only_the_difference():
    maps = PolicyFakeMaps()
    sync = DatapathSync(maps)
    sync.sync_policy({7: policy_spec(65537, True, False, Entry("ingress", 131073, 80, 6))})
    maps.ops.clear()
    result = sync.sync_policy({7: policy_spec(65537, True, False, Entry("ingress", 131073, 81, 6))})
    assert result.written == {"cm_policy": 1, "cm_endpoint": 0} and result.deleted == {"cm_policy": 1, "cm_endpoint": 0}
    assert [op[0] for op in maps.ops] == ["update", "delete"]  # the new port is allowed before the old goes


def test_policy_adopts_what_a_previous_agent_wrote():
    maps = PolicyFakeMaps()
    spec = {7: policy_spec(65537, True, True, Entry("ingress", 0, 53, 17))}
    DatapathSync(maps).sync_policy(spec)
    maps.ops.clear()
    again = DatapathSync(maps)
    again.adopt()
    assert not again.sync_policy(spec).changed and maps.ops == []
    assert again.counts()["cm_policy"] == 1 and again.counts()["cm_endpoint"] == 1


def test_policy_errors_and_capacity_before_writing():
    maps = PolicyFakeMaps(max_policy=2)
    sync = DatapathSync(maps)
    too_many = policy_spec(1, True, False, *(Entry("ingress", 100 + i) for i in range(3)))
    with pytest.raises(CapacityError, match="cm_policy would hold 3 entries"):
        sync.sync_policy({7: too_many})
    with pytest.raises(ValueError, match="direction 'sideways'"):
        sync.sync_policy({7: policy_spec(1, True, False, Entry("sideways", 5))})
    with pytest.raises(ValueError, match="port"):
        sync.sync_policy({7: policy_spec(1, True, False, Entry("ingress", 5, 70000, 6))})
    assert maps.ops == []


def test_policy_needs_the_policy_maps():
    with pytest.raises(ValueError, match="no policy maps"):
        DatapathSync(FakeMaps()).sync_policy({})


def test_policy_sync_touches_only_the_endpoints_that_changed():
    maps = PolicyFakeMaps()
    sync = DatapathSync(maps)
    a = policy_spec(65537, True, False, Entry("ingress", 131073, 80, 6))
    b = policy_spec(65538, False, True, Entry("egress", 131074), Entry("egress", 131075))
    sync.sync_policy({7: a, 8: b})
    maps.ops.clear()
    b2 = policy_spec(65538, False, True, Entry("egress", 131074), Entry("egress", 131076))
    result = sync.sync_policy({7: policy_spec(65537, True, False, Entry("ingress", 131073, 80, 6)), 8: b2})
    assert result.written["cm_policy"] == 1 and result.deleted["cm_policy"] == 1
    assert {dict(op[2])["ifindex"] for op in maps.ops} == {8}  # endpoint 7's equal spec: nothing read or written
    assert [op[0] for op in maps.ops] == ["update", "delete"]

    maps.ops.clear()
    result = sync.sync_policy({8: b2})  # endpoint 7 went away
    assert result.deleted == {"cm_policy": 1, "cm_endpoint": 1}
    assert [op[:2] for op in maps.ops] == [("delete", "cm_endpoint"), ("delete", "cm_policy")]
    assert {dict(k)["ifindex"] for k in maps.policy.data} == {8}

    # a new agent on the same maps: the first sync compares with everything there (stale entries go)
    again = DatapathSync(maps)
    assert again.sync_policy({}).deleted == {"cm_policy": 2, "cm_endpoint": 1}
    assert not maps.policy.data and not maps.endpoint.data


def test_policy_sync_capacity_when_only_some_endpoints_change():
    maps = PolicyFakeMaps(max_policy=3)
    sync = DatapathSync(maps)
    sync.sync_policy({7: policy_spec(1, True, False, Entry("ingress", 100), Entry("ingress", 101))})
    maps.ops.clear()
    grown = policy_spec(2, True, False, Entry("ingress", 200), Entry("ingress", 201))
    with pytest.raises(CapacityError, match="cm_policy would hold 4 entries"):
        sync.sync_policy({7: policy_spec(1, True, False, Entry("ingress", 100), Entry("ingress", 101)), 8: grown})
    assert maps.ops == []
