# -*- coding: utf-8 -*-
# Copyright: clustermesh.core contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""The agent's desired datapath state into the pinned BPF maps: only what changed, hitless.

The node agent computes what the maps should hold (:class:`FrontendSpec` per ClusterIP:port/proto
with its backends, :class:`IPCacheSpec` per prefix) and hands the whole desired set to
:class:`DatapathSync` from its one reconcile thread. ``DatapathSync`` keeps an in-memory copy of
every entry it wrote (encoded bytes, exactly as in the maps) and writes the difference:

* a frontend whose spec did not change costs no syscall (the spec object, or an equal one, is
  remembered per frontend);
* :meth:`DatapathSync.adopt` fills the copy from the maps, e.g. after an agent restart or
  ``kill -9``: backend IDs (per backend ip, port, proto) and rev-NAT indexes (per frontend) that are
  in the maps are reused, so a conntrack entry (which stores ``backend_id`` and ``rev_nat_index``)
  still names the same backend. Entries no sync wants any more are deleted by the next sync.

Hitless order of one sync (bpf/lb.c ``pick_backend`` reads slot 0's ``count``, then slot
``hash % count + 1``, then the backend): (1) new or changed backends and reverse-NAT entries,
(2) service slots 1..n, (3) slot 0 (the head with ``count``) of every changed service, so a grown
service is complete before its count says so, (4) slots beyond a shrunk service's new count,
(5) removed services (slot 0 first), (6) backends no slot names any more, (7) reverse-NAT entries
no frontend uses. At every moment each slot the datapath can pick exists and names a backend that
exists. Each step is one ``BPF_MAP_UPDATE_BATCH`` / ``BPF_MAP_DELETE_BATCH`` per map on the real
maps (per-entry syscalls where the kernel lacks batch operations, and on test fakes).

IDs: ``backend_id`` 1..2**32-1 per (ip, port, proto) while in use; ``rev_nat_index`` 1..65535 per
frontend; new IDs are taken from a cursor that moves on (a freed ID comes back only after the
cursor wrapped, so a stale conntrack entry rarely meets a reused ID). Capacity (``max_entries`` of
cm_lb_svc, cm_lb_be, cm_lb_revnat, cm_ipcache, and the 65535 rev-NAT indexes) is checked before
anything is written; a sync that does not fit raises :class:`CapacityError` and writes nothing.
When the final state fits but old and new entries together would not (large churn near the
limits), the sync is split: removals first, then the changed frontends in chunks, each step
hitless on its own.

A write that fails half way (ENOMEM, a foreign writer...) raises; the next sync re-reads the maps
(:meth:`DatapathSync.adopt`) before diffing, so the copy never lies.

No Ansible imports: used by the node agent (meshd).
"""

from __future__ import annotations

import ctypes
import errno
import socket
import struct
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from . import bpf_maps, bpf_syscall
from .bpf_maps import BE_F_ACTIVE, SVC_F_AFFINITY_LOCAL, SVC_F_GLOBAL, SVC_F_SHARED

SERVICE_MAP = bpf_maps.SERVICE_MAP.name  # cm_lb_svc
BACKEND_MAP = bpf_maps.BACKEND_MAP.name  # cm_lb_be
REVNAT_MAP = bpf_maps.REVNAT_MAP.name  # cm_lb_revnat
IPCACHE_MAP = bpf_maps.IPCACHE_MAP.name  # cm_ipcache
ENDPOINT_MAP = bpf_maps.ENDPOINT_MAP.name  # cm_endpoint
POLICY_MAP = bpf_maps.POLICY_MAP.name  # cm_policy
MAP_NAMES = (SERVICE_MAP, BACKEND_MAP, REVNAT_MAP, IPCACHE_MAP, ENDPOINT_MAP, POLICY_MAP)

MAX_BACKEND_ID = 0xFFFFFFFF
MAX_REV_NAT_INDEX = 0xFFFF
MAX_SLOTS = 0xFFFF  # count and slot are __u16

_PROTO_NAMES = {bpf_maps.PROTO_TCP: "TCP", bpf_maps.PROTO_UDP: "UDP"}
_PROTO_NUMBERS = {"TCP": bpf_maps.PROTO_TCP, "UDP": bpf_maps.PROTO_UDP}

# --- encodings (the layouts of bpf_maps / clustermesh_maps.h; the unit test checks they agree) ----
# Addresses and ports are network order (kept as raw bytes here), everything else host order.
_SVC_KEY_TAIL = struct.Struct("=HB3x")  # cm_lb_key after address + dport: slot, proto, pad[3]
_SVC_VALUE = struct.Struct("=IHHB3x")  # cm_lb_service: backend_id, count, rev_nat_index, flags, pad[3]
_BE_KEY = struct.Struct("=I")  # cm_lb_backend_key
_BE_VALUE = struct.Struct("=4s2sBBHH")  # cm_lb_backend: address, port, proto, flags, cluster_id, pad
_RN_KEY = struct.Struct("=HH")  # cm_lb_revnat_key: rev_nat_index, pad
_RN_VALUE = struct.Struct("=4s2sH")  # cm_lb_revnat: address, port, pad
_IPC_KEY = struct.Struct("=I4s")  # cm_ipcache_key: prefixlen, address
_IPC_VALUE = struct.Struct("=I4sHBx")  # cm_ipcache_value: identity, tunnel_endpoint, cluster_id, flags, pad
_EP_KEY = struct.Struct("=I")  # cm_endpoint_key: ifindex
_EP_VALUE = struct.Struct("=IB3x")  # cm_endpoint: identity, flags, pad[3]
_POL_KEY = struct.Struct("=II2sBB")  # cm_policy_key: ifindex, identity, dport (network order), proto, direction
_POL_VALUE = struct.Struct("=II")  # cm_policy: flags, pad
_DIRECTIONS = {"ingress": bpf_maps.DIR_INGRESS, "egress": bpf_maps.DIR_EGRESS}


class CapacityError(RuntimeError):
    """A sync does not fit a map (or the rev-NAT index space); nothing was written."""


# --- desired state -------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class BackendSpec:
    ip: str
    port: int
    cluster_id: int


@dataclass(frozen=True, slots=True)
class FrontendSpec:
    """A ClusterIP:port/protocol and the backends (in slot order) it load-balances to."""

    ip: str
    port: int
    protocol: str  # "TCP" or "UDP"
    backends: tuple[BackendSpec, ...]
    flags: int = 0  # bpf_maps.SVC_F_*


@dataclass(frozen=True, slots=True)
class IPCacheSpec:
    prefix: str  # "10.1.0.5/32"
    identity: int
    tunnel_endpoint: str = "0.0.0.0"
    cluster_id: int = 0


@dataclass(frozen=True, slots=True)
class EndpointPolicySpec:
    """The policy of one endpoint (its host-side veth's ifindex is the key): which directions are
    enforced and the allowed (direction, peer identity, port, protocol) entries (0 = any)."""

    identity: int
    ingress: bool
    egress: bool
    entries: frozenset  # of objects with .direction ("ingress"/"egress"), .identity, .port, .protocol


def service_flags(options: Any) -> int:
    """The cm_lb_service flags of a declaration's ServiceOptions (global, shared, affinity local)."""
    flags = 0
    if options.global_:
        flags |= SVC_F_GLOBAL
    if options.shared:
        flags |= SVC_F_SHARED
    if options.affinity == "local":
        flags |= SVC_F_AFFINITY_LOCAL
    return flags


def _is_ipv4(text: str) -> bool:
    try:
        socket.inet_pton(socket.AF_INET, text)
    except (OSError, TypeError):
        return False
    return True


def frontends_from_merged(
    merged: Mapping[tuple[str, str], Any],
    declarations: Mapping[tuple[str, str], Any],
    cluster_ids: Mapping[str, int],
) -> list[FrontendSpec]:
    """The frontends of merged services (:func:`services.merge_all`), sorted by service.

    Flags come from each declaration's options; a backend's ``cluster_id`` from ``cluster_ids``
    (cluster name -> ID; a cluster missing there raises ValueError naming it). The datapath is IPv4
    only: an IPv6 frontend is left out, and so is an IPv6 backend (a remote cluster may publish one).
    """
    out = []
    for key in sorted(merged):
        service = merged[key]
        decl = declarations.get(key)
        if decl is None:
            raise ValueError(f"service {key[0]}/{key[1]} is merged but has no declaration")
        flags = service_flags(decl.options)
        for frontend in service.frontends:
            if not _is_ipv4(frontend.ip):
                continue
            backends = []
            for b in frontend.backends:
                if not _is_ipv4(b.ip):
                    continue
                cluster_id = cluster_ids.get(b.cluster)
                if cluster_id is None:
                    raise ValueError(
                        f"service {key[0]}/{key[1]}: backend {b.ip}:{b.port} is in cluster {b.cluster!r}, "
                        f"which has no cluster ID (known: {', '.join(sorted(cluster_ids)) or 'none'})"
                    )
                backends.append(BackendSpec(b.ip, b.port, cluster_id))
            out.append(FrontendSpec(frontend.ip, frontend.port, frontend.protocol, tuple(backends), flags))
    return out


@dataclass
class SyncResult:
    """What one sync did: entries written and deleted per map name, and how long it took."""

    written: dict[str, int] = field(default_factory=dict)
    deleted: dict[str, int] = field(default_factory=dict)
    seconds: float = 0.0

    @property
    def changed(self) -> bool:
        return any(self.written.values()) or any(self.deleted.values())

    @property
    def writes(self) -> int:
        """Entries written plus entries deleted, over all maps."""
        return sum(self.written.values()) + sum(self.deleted.values())

    def add(self, other: SyncResult) -> None:
        for name, n in other.written.items():
            self.written[name] = self.written.get(name, 0) + n
        for name, n in other.deleted.items():
            self.deleted[name] = self.deleted.get(name, 0) + n


# --- map access: raw bytes on real pinned maps, dicts on fakes -------------------------------------

_BPF_MAP_LOOKUP_BATCH = 24
_BPF_MAP_UPDATE_BATCH = 26
_BPF_MAP_DELETE_BATCH = 27
_ENOTSUPP = 524  # the kernel-internal "not supported" some map types return for batch operations
_NO_BATCH = (errno.EINVAL, errno.EOPNOTSUPP, _ENOTSUPP)


class _BatchAttr(ctypes.Structure):
    """The ``batch`` member of union bpf_attr (BPF_MAP_*_BATCH)."""

    _fields_ = [
        ("in_batch", ctypes.c_uint64),
        ("out_batch", ctypes.c_uint64),
        ("keys", ctypes.c_uint64),
        ("values", ctypes.c_uint64),
        ("count", ctypes.c_uint32),
        ("map_fd", ctypes.c_uint32),
        ("elem_flags", ctypes.c_uint64),
        ("flags", ctypes.c_uint64),
    ]


def _batch(cmd, fd, keys=None, values=None, count=0, in_batch=None, out_batch=None):
    """One batch command; returns (errno or 0, elements processed)."""
    attr = bpf_syscall.BpfAttr()
    b = _BatchAttr.from_buffer(attr)
    b.map_fd = fd
    b.count = count
    b.keys = ctypes.addressof(keys) if keys is not None else 0
    b.values = ctypes.addressof(values) if values is not None else 0
    b.in_batch = ctypes.addressof(in_batch) if in_batch is not None else 0
    b.out_batch = ctypes.addressof(out_batch) if out_batch is not None else 0
    try:
        bpf_syscall.bpf(cmd, attr, "batch")
    except bpf_syscall.BpfError as exc:
        return exc.errno, b.count
    return 0, b.count


class _RawMap:
    """A real pinned map (bpf_maps.PinnedMap): bytes in and out, batched where the kernel can."""

    def __init__(self, pinned):
        self.fd = pinned.fd
        self.name = pinned.spec.name
        self.key_size = pinned.spec.key.size
        self.value_size = pinned.spec.value.size
        self.max_entries = pinned.spec.max_entries
        self.batch = {"lookup": True, "update": True, "delete": True}

    def read_all(self) -> list[tuple[bytes, bytes]]:
        if self.batch["lookup"]:
            try:
                return self._read_batched()
            except _NoBatch:
                self.batch["lookup"] = False
        out = []
        for key in bpf_syscall.map_keys(self.fd, self.key_size):
            value = bpf_syscall.map_lookup(self.fd, key, self.value_size)
            if value is not None:
                out.append((key, value))
        return out

    def _read_batched(self) -> list[tuple[bytes, bytes]]:
        chunk = 4096
        keys = ctypes.create_string_buffer(self.key_size * chunk)
        values = ctypes.create_string_buffer(self.value_size * chunk)
        token_size = max(self.key_size, 8)
        cursor_in, cursor_out = ctypes.create_string_buffer(token_size), ctypes.create_string_buffer(token_size)
        out: list[tuple[bytes, bytes]] = []
        first = True
        while True:
            err, n = _batch(
                _BPF_MAP_LOOKUP_BATCH, self.fd, keys, values, chunk, None if first else cursor_in, cursor_out
            )
            if err and err != errno.ENOENT:
                if first and err in _NO_BATCH:
                    raise _NoBatch()
                raise bpf_syscall.BpfError(err, _BPF_MAP_LOOKUP_BATCH, f"reading {self.name}")
            kraw, vraw = keys.raw, values.raw
            ks, vs = self.key_size, self.value_size
            out.extend((kraw[i * ks : (i + 1) * ks], vraw[i * vs : (i + 1) * vs]) for i in range(n))
            if err == errno.ENOENT:
                return out
            ctypes.memmove(cursor_in, cursor_out, token_size)
            first = False

    def update_many(self, pairs: list[tuple[bytes, bytes]]) -> None:
        if not pairs:
            return
        if self.batch["update"]:
            keys = ctypes.create_string_buffer(b"".join(k for k, _value in pairs), self.key_size * len(pairs))
            values = ctypes.create_string_buffer(b"".join(v for _key, v in pairs), self.value_size * len(pairs))
            err, n = _batch(_BPF_MAP_UPDATE_BATCH, self.fd, keys, values, len(pairs))
            if not err:
                return
            if not (n == 0 and err in _NO_BATCH):
                raise bpf_syscall.BpfError(err, _BPF_MAP_UPDATE_BATCH, f"writing {self.name}, entry {n + 1}")
            self.batch["update"] = False
        for key, value in pairs:
            bpf_syscall.map_update(self.fd, key, value)

    def delete_many(self, keys: list[bytes]) -> None:
        while keys and self.batch["delete"]:
            buf = ctypes.create_string_buffer(b"".join(keys), self.key_size * len(keys))
            err, n = _batch(_BPF_MAP_DELETE_BATCH, self.fd, buf, None, len(keys))
            if not err:
                return
            if err == errno.ENOENT:  # already gone: skip it, go on with the rest
                keys = keys[n + 1 :]
                continue
            if not (n == 0 and err in _NO_BATCH):
                raise bpf_syscall.BpfError(err, _BPF_MAP_DELETE_BATCH, f"deleting from {self.name}")
            self.batch["delete"] = False
        for key in keys:
            bpf_syscall.map_delete(self.fd, key)


class _NoBatch(Exception):
    pass


class _DictMap:
    """A PinnedMap-like object with dict keys and values (lookup/update/delete/items), e.g. a test fake."""

    def __init__(self, obj, spec):
        self.obj = obj
        self.name = spec.name
        self.key, self.value = spec.key, spec.value
        self.max_entries = getattr(obj, "max_entries", None) or spec.max_entries

    def read_all(self) -> list[tuple[bytes, bytes]]:
        return [(self.key.encode(k), self.value.encode(v)) for k, v in self.obj.items()]

    def update_many(self, pairs):
        for key, value in pairs:
            self.obj.update(self.key.decode(key), self.value.decode(value))

    def delete_many(self, keys):
        for key in keys:
            self.obj.delete(self.key.decode(key))


def _access(obj, spec):
    if isinstance(getattr(obj, "fd", None), int) and getattr(getattr(obj, "spec", None), "name", None) == spec.name:
        return _RawMap(obj)
    return _DictMap(obj, spec)


# --- parsing helpers --------------------------------------------------------------------------------


class _Parser:
    """Validated, cached conversions of the specs' text fields to the maps' bytes."""

    def __init__(self):
        self._ips: dict[str, bytes] = {}

    def ip4(self, text: Any, what: str) -> bytes:
        packed = self._ips.get(text)
        if packed is None:
            try:
                packed = socket.inet_pton(socket.AF_INET, text)
            except (OSError, TypeError):
                raise ValueError(f"{what}: {text!r} is not an IPv4 address (the datapath is IPv4 only)") from None
            if len(self._ips) > 262144:
                self._ips.clear()
            self._ips[text] = packed
        return packed


def _port_bytes(port: Any, what: str) -> bytes:
    if not isinstance(port, int) or isinstance(port, bool) or not 1 <= port <= 65535:
        raise ValueError(f"{what}: port {port!r} is not a port number (1..65535)")
    return port.to_bytes(2, "big")


def _uint(value: Any, limit: int, what: str) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value <= limit:
        raise ValueError(f"{what} must be an integer 0..{limit}, got {value!r}")
    return value


def _ip_text(packed: bytes) -> str:
    return socket.inet_ntop(socket.AF_INET, packed)


# --- the in-memory copy ---------------------------------------------------------------------------

FrontendKey = tuple[bytes, int, int]  # (packed address, port, proto number)


class _Frontend:
    """One frontend as written: the spec it came from (None: adopted, not compared yet), its rev-NAT
    index, and its service-map entries (slot -> value bytes). Never mutated: replaced on change."""

    __slots__ = ("spec", "rev_nat", "slots")

    def __init__(self, spec, rev_nat, slots):
        self.spec, self.rev_nat, self.slots = spec, rev_nat, slots


def _svc_key(fk: FrontendKey, slot: int) -> bytes:
    return fk[0] + fk[1].to_bytes(2, "big") + _SVC_KEY_TAIL.pack(slot, fk[2])


def _slot_backend(value: bytes) -> int:
    return _BE_KEY.unpack_from(value)[0]


class _State:
    """What the maps hold, as far as this process knows (bytes as written)."""

    def __init__(self):
        self.fe: dict[FrontendKey, _Frontend] = {}
        self.svc_count = 0  # entries of cm_lb_svc (all slots of all frontends, junk included)
        self.svc_junk: set[bytes] = set()  # service-map keys this library never writes (delete them)
        self.be: dict[int, bytes] = {}  # backend_id -> value
        self.be_ids: dict[bytes, int] = {}  # value[:7] (address, port, proto) -> backend_id
        self.refs: dict[int, int] = {}  # backend_id -> service slots naming it
        self.rn: dict[int, bytes] = {}  # rev_nat_index -> value
        self.rn_held: dict[int, FrontendKey] = {}  # rev_nat_index -> the frontend that owns it
        self.garbage_be: set[int] = set()  # backends in the map that no slot names (after adopt)
        self.garbage_rn: set[int] = set()  # rev-NAT entries that no frontend owns (after adopt)
        self.next_be = 1
        self.next_rn = 1
        self.ipc: dict[bytes, bytes] = {}
        self.ep: dict[bytes, bytes] = {}
        self.pol: dict[bytes, bytes] = {}

    def copy(self) -> _State:
        new = _State.__new__(_State)
        for name, value in vars(self).items():
            setattr(new, name, value.copy() if isinstance(value, dict | set) else value)
        return new


class _Plan:
    """The writes of one hitless step, in order, and the state they leave."""

    def __init__(self):
        self.fe: dict[FrontendKey, _Frontend | None] = {}
        self.refs: dict[int, int] = {}  # backend_id -> new count (touched ones)
        self.be_writes: dict[int, bytes] = {}
        self.be_new_ids: dict[bytes, int] = {}
        self.be_deletes: list[int] = []
        self.rn_writes: dict[int, bytes] = {}
        self.rn_held: dict[int, FrontendKey | None] = {}
        self.rn_deletes: list[int] = []
        self.slot_writes: list[tuple[bytes, bytes]] = []
        self.head_writes: list[tuple[bytes, bytes]] = []
        self.surplus_deletes: list[bytes] = []
        self.removed_deletes: list[bytes] = []
        self.junk_deletes: list[bytes] = []
        self.svc_added = 0
        self.svc_removed = 0
        self.next_be = 1
        self.next_rn = 1

    def peaks(self, st: _State) -> dict[str, tuple[int, int]]:
        """(peak, final) entries per map while and after this step runs."""
        be_added = sum(1 for i in self.be_writes if i not in st.be)
        rn_added = sum(1 for i in self.rn_writes if i not in st.rn)
        svc_peak = st.svc_count + self.svc_added
        be_peak = len(st.be) + be_added
        rn_peak = len(st.rn) + rn_added
        return {
            SERVICE_MAP: (svc_peak, svc_peak - self.svc_removed),
            BACKEND_MAP: (be_peak, be_peak - len(self.be_deletes)),
            REVNAT_MAP: (rn_peak, rn_peak - len(self.rn_deletes)),
        }


class DatapathSync:
    """Writes desired services and ipcache entries into the datapath maps, only what changed.

    ``maps``: a :class:`bpf_maps.DatapathMaps` (or any object with ``.service``, ``.backend``,
    ``.revnat`` and ``.ipcache`` maps offering PinnedMap's lookup/update/delete/items). Not thread
    safe: call it from one thread (``counts()`` may be read from others).
    """

    def __init__(self, maps, *, max_rev_nat_index: int = MAX_REV_NAT_INDEX):
        self.maps = maps
        self._svc = _access(maps.service, bpf_maps.SERVICE_MAP)
        self._be = _access(maps.backend, bpf_maps.BACKEND_MAP)
        self._rn = _access(maps.revnat, bpf_maps.REVNAT_MAP)
        self._ipc = _access(maps.ipcache, bpf_maps.IPCACHE_MAP)
        # policy maps: absent on test fakes of the service maps only
        self._ep = _access(maps.endpoint, bpf_maps.ENDPOINT_MAP) if hasattr(maps, "endpoint") else None
        self._pol = _access(maps.policy, bpf_maps.POLICY_MAP) if hasattr(maps, "policy") else None
        self.max_rev_nat_index = max_rev_nat_index
        self._parse = _Parser()
        self._fk_cache: dict[tuple, FrontendKey] = {}
        self._st = _State()
        self._stale = True  # the copy must be (re)read from the maps before the next diff
        self._policy_by_endpoint: dict[int, tuple[EndpointPolicySpec, frozenset]] | None = None

    # -- reading the maps -------------------------------------------------------------------

    def adopt(self) -> None:
        """Read what the maps hold now (a previous agent's state) into the in-memory copy.

        Backend IDs and rev-NAT indexes found are reused by later syncs; entries that a later sync
        does not want are deleted by it. Called by the first sync if not called before.
        """
        st = _State()
        by_frontend: dict[FrontendKey, dict[int, bytes]] = {}
        for key, value in self._svc.read_all():
            fk = (key[:4], int.from_bytes(key[4:6], "big"), key[8])
            slot = _SVC_KEY_TAIL.unpack_from(key, 6)[0]
            if key != _svc_key(fk, slot) or fk[2] not in _PROTO_NAMES:
                st.svc_junk.add(key)  # pad bytes set, or a protocol the datapath never matches
                continue
            by_frontend.setdefault(fk, {})[slot] = value
        st.svc_count = len(st.svc_junk)
        for key, value in self._rn.read_all():
            st.rn[_RN_KEY.unpack(key)[0]] = value
        for fk, slots in by_frontend.items():
            rev_nat = None
            head = slots.get(0)
            if head is not None:
                index = _SVC_VALUE.unpack(head)[2]
                if 1 <= index <= self.max_rev_nat_index and index not in st.rn_held:
                    rev_nat = index
                    st.rn_held[index] = fk
            st.fe[fk] = _Frontend(None, rev_nat, slots)
            st.svc_count += len(slots)
            for slot, value in slots.items():
                if slot:
                    backend_id = _slot_backend(value)
                    st.refs[backend_id] = st.refs.get(backend_id, 0) + 1
        for key, value in self._be.read_all():
            backend_id = _BE_KEY.unpack(key)[0]
            if backend_id == 0:
                continue
            st.be[backend_id] = value
            ident = value[:7]
            other = st.be_ids.get(ident)
            # two IDs for one backend (an interrupted writer): keep the one more slots name
            if other is None or (st.refs.get(backend_id, 0), -backend_id) > (st.refs.get(other, 0), -other):
                st.be_ids[ident] = backend_id
        st.garbage_be = {i for i in st.be if not st.refs.get(i)}
        st.garbage_rn = {i for i in st.rn if i not in st.rn_held}
        st.next_be = _wrap(max(st.be, default=0) + 1, MAX_BACKEND_ID)
        st.next_rn = _wrap(max([*st.rn, *st.rn_held], default=0) + 1, self.max_rev_nat_index)
        for key, value in self._ipc.read_all():
            st.ipc[key] = value
        if self._ep is not None:
            st.ep = dict(self._ep.read_all())
            st.pol = dict(self._pol.read_all())
        self._policy_by_endpoint = None  # the next policy sync compares with the whole maps
        self._st = st
        self._stale = False

    def counts(self) -> dict[str, int]:
        """Entries per map (as written by this process): cm_lb_svc, cm_lb_be, cm_lb_revnat, cm_ipcache."""
        st = self._st
        counts = {SERVICE_MAP: st.svc_count, BACKEND_MAP: len(st.be), REVNAT_MAP: len(st.rn), IPCACHE_MAP: len(st.ipc)}
        if self._ep is not None:
            counts.update({ENDPOINT_MAP: len(st.ep), POLICY_MAP: len(st.pol)})
        return counts

    def backend_ids(self) -> dict[tuple[str, int, str], int]:
        """(backend ip, port, "TCP"/"UDP") -> backend_id of every backend in the map."""
        return {(_ip_text(v[:4]), int.from_bytes(v[4:6], "big"), _PROTO_NAMES.get(v[6], str(v[6]))): i
                for v, i in ((self._st.be[i], i) for i in self._st.be_ids.values())}  # fmt: skip

    def rev_nat_indexes(self) -> dict[tuple[str, int, str], int]:
        """(frontend ip, port, "TCP"/"UDP") -> rev_nat_index of every frontend that has one."""
        return {
            (_ip_text(fk[0]), fk[1], _PROTO_NAMES[fk[2]]): fe.rev_nat
            for fk, fe in self._st.fe.items()
            if fe.rev_nat is not None
        }

    # -- services ---------------------------------------------------------------------------

    def _frontend_key(self, spec: FrontendSpec) -> FrontendKey:
        try:
            text = (spec.ip, spec.port, spec.protocol)
            fk = self._fk_cache.get(text)
        except (AttributeError, TypeError):
            raise ValueError(f"{spec!r} is not a FrontendSpec") from None
        if fk is None:
            what = f"frontend {spec.ip!r}"
            ip = self._parse.ip4(spec.ip, what)
            _port_bytes(spec.port, what)
            proto = _PROTO_NUMBERS.get(str(spec.protocol).upper())
            if proto is None:
                raise ValueError(f"{what} port {spec.port}: protocol {spec.protocol!r} is not TCP or UDP")
            fk = (ip, spec.port, proto)
            if len(self._fk_cache) > 262144:
                self._fk_cache.clear()
            self._fk_cache[text] = fk
        return fk

    def sync_services(self, frontends: Iterable[FrontendSpec]) -> SyncResult:
        """Make cm_lb_svc, cm_lb_be and cm_lb_revnat hold exactly ``frontends`` (the whole desired set).

        Raises ValueError for an invalid or repeated frontend and CapacityError when the result does
        not fit the maps; both before anything is written.
        """
        started = time.perf_counter()
        if self._stale:
            self.adopt()
        st = self._st
        desired: dict[FrontendKey, FrontendSpec] = {}
        changes: list[tuple[FrontendKey, FrontendSpec | None]] = []
        for spec in frontends:
            fk = self._frontend_key(spec)
            if fk in desired:
                raise ValueError(
                    f"frontend {spec.ip}:{spec.port}/{spec.protocol} is given twice; two services cannot share a "
                    "ClusterIP, port and protocol"
                )
            desired[fk] = spec
            old = st.fe.get(fk)
            if old is None or (old.spec is not spec and old.spec != spec):
                changes.append((fk, spec))
        changes.extend((fk, None) for fk in st.fe if fk not in desired)
        if len(desired) > self.max_rev_nat_index:
            raise CapacityError(
                f"{len(desired)} frontends need as many rev-NAT indexes, but there are only "
                f"{self.max_rev_nat_index} (1..{self.max_rev_nat_index}); nothing was written"
            )
        result = SyncResult(written=dict.fromkeys(MAP_NAMES[:3], 0), deleted=dict.fromkeys(MAP_NAMES[:3], 0))
        if not changes and not (st.garbage_be or st.garbage_rn or st.svc_junk):
            result.seconds = time.perf_counter() - started
            return result
        for plan in self._steps(changes):
            self._run(plan, result)
        result.seconds = time.perf_counter() - started
        return result

    def _steps(self, changes):
        """The plans to run, all checked against the capacities before anything is written."""
        try:
            plan = self._plan(self._st, changes)
        except _IndexesExhausted:
            plan = None
        if plan is not None:
            over = self._over(plan.peaks(self._st))
            if not over:
                yield plan
                return
            for name, _peak, final, limit in over:
                if final > limit:
                    raise CapacityError(
                        f"{name} would hold {final} entries, more than its {limit} (max_entries); nothing was written"
                    )
        # Old and new entries together do not fit: removals first, then the changed frontends in
        # chunks (those that shrink first), planned on a copy of the state so that every step is
        # checked before the first one runs. Backends the end state uses are kept between steps.
        st = self._st.copy()
        keep = {value[:7] for value in (self._backend_value(b, fk[2], spec, 0) for fk, spec in changes if spec
                                        for b in spec.backends)}  # fmt: skip
        removals = [c for c in changes if c[1] is None]
        pending = [c for c in changes if c[1] is not None]
        pending.sort(key=lambda c: len(c[1].backends) + 1 - len(st.fe[c[0]].slots) if c[0] in st.fe else 1 << 20)
        steps = []
        if removals:
            self._check_step(st, removals, keep, final=True)
            steps.append(removals)
        size = max(1, len(pending))
        while pending:
            chunk = pending[:size]
            if not self._check_step(st, chunk, keep, final=len(chunk) == 1):
                size = max(1, len(chunk) // 2)
                continue
            steps.append(chunk)
            pending = pending[len(chunk) :]
        for chunk in steps:
            yield self._plan(self._st, chunk, keep)

    def _check_step(self, st, chunk, keep, final) -> bool:
        """Plan ``chunk`` on the copy ``st``; False if it does not fit (CapacityError if it must)."""
        try:
            plan = self._plan(st, chunk, keep)
        except _IndexesExhausted:
            if not final:
                return False
            raise CapacityError(
                f"no free rev-NAT index: all {self.max_rev_nat_index} (1..{self.max_rev_nat_index}) are in use; "
                "nothing was written"
            ) from None
        over = self._over(plan.peaks(st))
        if over and final:
            name, peak, _final, limit = over[0]
            raise CapacityError(
                f"{name} would need {peak} entries while old and new entries coexist, more than its {limit} "
                "(max_entries); apply the change in smaller steps; nothing was written"
            )
        if not over:
            self._commit(st, plan)
        return not over

    def _over(self, peaks):
        """(map name, peak, final, max_entries) of every map the peaks do not fit."""
        limits = {
            SERVICE_MAP: self._svc.max_entries,
            BACKEND_MAP: self._be.max_entries,
            REVNAT_MAP: self._rn.max_entries,
        }
        return [(name, peak, final, limits[name]) for name, (peak, final) in peaks.items() if peak > limits[name]]

    def _plan(self, st: _State, changes, keep=None) -> _Plan:
        plan = _Plan()
        plan.next_be, plan.next_rn = st.next_be, st.next_rn
        refs = plan.refs
        be_values: dict[int, bytes] = {}  # backend_id -> value wanted by this plan
        for fk, spec in changes:
            old = st.fe.get(fk)
            old_slots = old.slots if old is not None else {}
            for slot, value in old_slots.items():
                if slot:
                    backend_id = _slot_backend(value)
                    refs[backend_id] = refs.get(backend_id, st.refs.get(backend_id, 0)) - 1
            if spec is None:
                plan.fe[fk] = None
                if old_slots:
                    plan.removed_deletes.extend(_svc_key(fk, slot) for slot in sorted(old_slots))
                    plan.svc_removed += len(old_slots)
                if old is not None and old.rev_nat is not None:
                    plan.rn_held[old.rev_nat] = None
                continue
            proto = fk[2]
            flags = spec.flags
            if not isinstance(flags, int) or isinstance(flags, bool) or not 0 <= flags <= 0xFF:
                raise ValueError(f"frontend {spec.ip}:{spec.port}/{spec.protocol}: flags {flags!r} are not 0..255")
            if len(spec.backends) > MAX_SLOTS:
                raise ValueError(
                    f"frontend {spec.ip}:{spec.port}/{spec.protocol} has {len(spec.backends)} backends; "
                    f"at most {MAX_SLOTS}"
                )
            rev_nat = old.rev_nat if old is not None and old.rev_nat is not None else self._new_rev_nat(st, plan)
            port_be = fk[1].to_bytes(2, "big")
            rn_value = _RN_VALUE.pack(fk[0], port_be, 0)
            if st.rn.get(rev_nat) != rn_value:
                plan.rn_writes[rev_nat] = rn_value
            slots = {}
            for slot, b in enumerate(spec.backends, start=1):
                value = self._backend_value(b, proto, spec, slot)
                ident = value[:7]
                backend_id = st.be_ids.get(ident) or plan.be_new_ids.get(ident)
                if backend_id is None:
                    backend_id = self._new_backend_id(st, plan)
                    plan.be_new_ids[ident] = backend_id
                seen = be_values.get(backend_id)
                if seen is None:
                    be_values[backend_id] = value
                    if st.be.get(backend_id) != value:
                        plan.be_writes[backend_id] = value
                elif seen != value:
                    raise ValueError(
                        f"backend {b.ip}:{b.port}/{spec.protocol} is given with cluster IDs "
                        f"{_BE_VALUE.unpack(seen)[4]} and {b.cluster_id}; a backend belongs to one cluster"
                    )
                refs[backend_id] = refs.get(backend_id, st.refs.get(backend_id, 0)) + 1
                slots[slot] = _SVC_VALUE.pack(backend_id, 0, rev_nat, 0)
            slots[0] = _SVC_VALUE.pack(0, len(spec.backends), rev_nat, flags)
            for slot in range(1, len(spec.backends) + 1):
                if old_slots.get(slot) != slots[slot]:
                    plan.slot_writes.append((_svc_key(fk, slot), slots[slot]))
                    if slot not in old_slots:
                        plan.svc_added += 1
            if old_slots.get(0) != slots[0]:
                plan.head_writes.append((_svc_key(fk, 0), slots[0]))
                if 0 not in old_slots:
                    plan.svc_added += 1
            surplus = sorted(slot for slot in old_slots if slot not in slots)
            plan.surplus_deletes.extend(_svc_key(fk, slot) for slot in surplus)
            plan.svc_removed += len(surplus)
            plan.fe[fk] = _Frontend(spec, rev_nat, slots)
            plan.rn_held[rev_nat] = fk
        # backends no slot names any more (and garbage found by adopt), rev-NAT entries no frontend owns
        plan.be_deletes = sorted(
            i
            for i in {*(i for i, n in refs.items() if n <= 0), *st.garbage_be}
            if i in st.be and refs.get(i, st.refs.get(i, 0)) <= 0 and (keep is None or st.be[i][:7] not in keep)
        )
        held_after = {i for i, fk in plan.rn_held.items() if fk is not None}
        plan.rn_deletes = sorted(
            i
            for i in {*(i for i, fk in plan.rn_held.items() if fk is None), *st.garbage_rn}
            if i in st.rn and i not in held_after
        )
        plan.junk_deletes = sorted(st.svc_junk)
        plan.svc_removed += len(plan.junk_deletes)
        return plan

    def _backend_value(self, b: BackendSpec, proto: int, spec: FrontendSpec, slot: int) -> bytes:
        try:
            port, cluster_id = b.port, b.cluster_id
            if 0 < port < 65536 and port.__class__ is int and cluster_id.__class__ is int:
                ip = self._parse.ip4(b.ip, "")
                return _BE_VALUE.pack(ip, port.to_bytes(2, "big"), proto, BE_F_ACTIVE, cluster_id, 0)
        except (ValueError, struct.error, AttributeError, TypeError):
            pass
        what = f"frontend {spec.ip}:{spec.port}/{spec.protocol} backend {slot}"
        if not isinstance(b, BackendSpec):
            raise ValueError(f"{what}: {b!r} is not a BackendSpec")
        self._parse.ip4(b.ip, what)
        _port_bytes(b.port, what)
        _uint(b.cluster_id, 0xFFFF, f"{what}: cluster_id")
        raise ValueError(f"{what}: {b!r} is invalid")

    def _new_backend_id(self, st: _State, plan: _Plan) -> int:
        candidate = plan.next_be
        taken = plan.be_writes
        for _attempt in range(len(st.be) + len(st.refs) + len(taken) + 1):
            if candidate not in st.be and candidate not in taken and candidate not in st.refs:
                plan.next_be = _wrap(candidate + 1, MAX_BACKEND_ID)
                return candidate
            candidate = _wrap(candidate + 1, MAX_BACKEND_ID)
        raise CapacityError(f"no free backend ID (1..{MAX_BACKEND_ID}); nothing was written")

    def _new_rev_nat(self, st: _State, plan: _Plan) -> int:
        limit = self.max_rev_nat_index
        candidate = plan.next_rn
        for _attempt in range(limit):
            if (
                candidate not in st.rn
                and candidate not in st.rn_held
                and candidate not in plan.rn_held
                and candidate not in plan.rn_writes
            ):
                plan.next_rn = _wrap(candidate + 1, limit)
                return candidate
            candidate = _wrap(candidate + 1, limit)
        raise _IndexesExhausted()

    def _run(self, plan: _Plan, result: SyncResult) -> None:
        st = self._st
        try:
            self._be.update_many([(_BE_KEY.pack(i), v) for i, v in plan.be_writes.items()])
            self._rn.update_many([(_RN_KEY.pack(i, 0), v) for i, v in plan.rn_writes.items()])
            self._svc.update_many(plan.slot_writes)
            self._svc.update_many(plan.head_writes)
            self._svc.delete_many(plan.surplus_deletes)
            self._svc.delete_many(plan.removed_deletes)
            self._svc.delete_many(plan.junk_deletes)
            self._be.delete_many([_BE_KEY.pack(i) for i in plan.be_deletes])
            self._rn.delete_many([_RN_KEY.pack(i, 0) for i in plan.rn_deletes])
        except BaseException:
            self._stale = True  # part of the plan may be in the maps: read them again before the next diff
            raise
        self._commit(st, plan)
        result.written[BACKEND_MAP] += len(plan.be_writes)
        result.written[REVNAT_MAP] += len(plan.rn_writes)
        result.written[SERVICE_MAP] += len(plan.slot_writes) + len(plan.head_writes)
        result.deleted[SERVICE_MAP] += len(plan.surplus_deletes) + len(plan.removed_deletes) + len(plan.junk_deletes)
        result.deleted[BACKEND_MAP] += len(plan.be_deletes)
        result.deleted[REVNAT_MAP] += len(plan.rn_deletes)

    @staticmethod
    def _commit(st: _State, plan: _Plan) -> None:
        for fk, fe in plan.fe.items():
            old = st.fe.pop(fk, None)
            if old is not None:
                st.svc_count -= len(old.slots)
            if fe is not None:
                st.fe[fk] = fe
                st.svc_count += len(fe.slots)
        st.svc_count -= len(plan.junk_deletes)
        st.svc_junk.difference_update(plan.junk_deletes)
        for i, value in plan.be_writes.items():
            st.be[i] = value
            st.be_ids[value[:7]] = i
        for i, n in plan.refs.items():
            if n > 0:
                st.refs[i] = n
            else:
                st.refs.pop(i, None)
        for i in plan.be_deletes:
            value = st.be.pop(i)
            if st.be_ids.get(value[:7]) == i:
                del st.be_ids[value[:7]]
        st.garbage_be.difference_update(plan.be_deletes)
        st.garbage_be.difference_update(i for i, n in plan.refs.items() if n > 0)
        for i, value in plan.rn_writes.items():
            st.rn[i] = value
        for i, fk in plan.rn_held.items():
            if fk is None:
                st.rn_held.pop(i, None)
            else:
                st.rn_held[i] = fk
        for i in plan.rn_deletes:
            st.rn.pop(i, None)
            st.rn_held.pop(i, None)
        st.garbage_rn.difference_update(plan.rn_deletes)
        st.garbage_rn.difference_update(i for i, fk in plan.rn_held.items() if fk is not None)
        st.next_be, st.next_rn = plan.next_be, plan.next_rn

    # -- ipcache ----------------------------------------------------------------------------

    def _ipcache_entry(self, spec: IPCacheSpec) -> tuple[bytes, bytes]:
        prefix = spec.prefix
        what = f"ipcache entry {prefix!r}"
        address, sep, length = prefix.partition("/") if isinstance(prefix, str) else ("", "", "")
        if not sep or not length.isdigit() or int(length) > 32:
            raise ValueError(f"{what}: not an IPv4 prefix such as '10.1.0.5/32'")
        length = int(length)
        packed = self._parse.ip4(address, what)
        if length < 32 and int.from_bytes(packed, "big") & ((1 << (32 - length)) - 1):
            raise ValueError(f"{what}: host bits are set; use the network address")
        key = _IPC_KEY.pack(length, packed)
        value = _IPC_VALUE.pack(
            _uint(spec.identity, 0xFFFFFFFF, f"{what}: identity"),
            self._parse.ip4(spec.tunnel_endpoint, f"{what}: tunnel endpoint"),
            _uint(spec.cluster_id, 0xFFFF, f"{what}: cluster_id"),
            0,
        )
        return key, value

    def sync_ipcache(self, entries: Iterable[IPCacheSpec]) -> SyncResult:
        """Make cm_ipcache hold exactly ``entries``; ValueError (invalid or repeated prefix) and
        CapacityError before anything is written."""
        started = time.perf_counter()
        if self._stale:
            self.adopt()
        desired: dict[bytes, bytes] = {}
        for spec in entries:
            key, value = self._ipcache_entry(spec)
            if key in desired:
                raise ValueError(f"ipcache prefix {spec.prefix!r} is given twice")
            desired[key] = value
        result = SyncResult(seconds=0.0)
        self._check_room(self._ipc, self._st.ipc, desired)
        self._converge(self._ipc, self._st.ipc, desired, result)
        result.seconds = time.perf_counter() - started
        return result

    # -- policy -----------------------------------------------------------------------------

    def sync_policy(self, endpoints: Mapping[int, EndpointPolicySpec]) -> SyncResult:
        """Make cm_endpoint and cm_policy hold exactly the policy of ``endpoints`` (ifindex -> spec;
        an endpoint left out allows everything). Order: new allow entries, then the endpoints'
        enforcement flags, then what is no longer wanted, so an allowed flow is never dropped while
        an endpoint becomes enforced. ValueError and CapacityError before anything is written.

        Only endpoints whose spec changed since the last call (another object that is not equal) are
        encoded and compared: one identity change costs the entries of the endpoints it touches, not
        every entry of the node. After :meth:`adopt` the first call compares with the whole maps."""
        started = time.perf_counter()
        if self._ep is None:
            raise ValueError("these maps have no policy maps (cm_endpoint, cm_policy): load the current lb.o")
        if self._stale:
            self.adopt()
        st = self._st
        known = self._policy_by_endpoint
        if known is None:
            changed, removed = dict(endpoints), []
        else:
            changed = {
                i: spec
                for i, spec in endpoints.items()
                if i not in known or (known[i][0] is not spec and known[i][0] != spec)
            }
            removed = [i for i in known if i not in endpoints]
        encoded = {i: self._endpoint_policy_entries(i, spec) for i, spec in changed.items()}
        allow = _POL_VALUE.pack(0, 0)
        result = SyncResult()
        if known is None:  # against the whole maps: what no endpoint wants goes
            want_pol = {key: allow for _ek, _ev, keys in encoded.values() for key in keys}
            want_ep = {ek: ev for ek, ev, _keys in encoded.values()}
            self._check_room(self._pol, st.pol, want_pol)
            self._check_room(self._ep, st.ep, want_ep)
            self._converge(self._pol, st.pol, want_pol, result, deletes=False)
            self._converge(self._ep, st.ep, want_ep, result)
            self._converge(self._pol, st.pol, want_pol, result)
            known = {}
        else:
            empty: frozenset = frozenset()
            pol_add, pol_gone = [], []
            for i, (_ek, _ev, keys) in encoded.items():
                before = known[i][1] if i in known else empty
                pol_add.extend((key, allow) for key in keys - before if key not in st.pol)
                pol_gone.extend(key for key in before - keys if key in st.pol)
            for i in removed:
                pol_gone.extend(key for key in known[i][1] if key in st.pol)
            ep_writes = [(ek, ev) for ek, ev, _keys in encoded.values() if st.ep.get(ek) != ev]
            ep_gone = [key for key in (_EP_KEY.pack(i) for i in removed) if key in st.ep]
            for access, final in (
                (self._pol, len(st.pol) + len(pol_add) - len(pol_gone)),
                (self._ep, len(st.ep) + sum(1 for k, _v in ep_writes if k not in st.ep) - len(ep_gone)),
            ):
                if final > access.max_entries:
                    raise CapacityError(
                        f"{access.name} would hold {final} entries, more than its {access.max_entries} "
                        "(max_entries); nothing was written"
                    )
            self._apply(self._pol, st.pol, pol_add, [], result)
            self._apply(self._ep, st.ep, ep_writes, ep_gone, result)
            self._apply(self._pol, st.pol, [], pol_gone, result)
            for i in removed:
                del known[i]
        for i, spec in changed.items():
            known[i] = (spec, encoded[i][2])
        self._policy_by_endpoint = known
        result.seconds = time.perf_counter() - started
        return result

    def _endpoint_policy_entries(self, ifindex: Any, spec: EndpointPolicySpec) -> tuple[bytes, bytes, frozenset]:
        """(cm_endpoint key, value, the endpoint's cm_policy keys); ValueError for a bad spec."""
        what = f"endpoint policy of ifindex {ifindex!r}"
        ifindex = _uint(ifindex, 0xFFFFFFFF, what)
        flags = (bpf_maps.EP_F_INGRESS if spec.ingress else 0) | (bpf_maps.EP_F_EGRESS if spec.egress else 0)
        keys = []
        for entry in spec.entries:
            direction = _DIRECTIONS.get(entry.direction)
            if direction is None:
                raise ValueError(f"{what}: direction {entry.direction!r} is not ingress or egress")
            keys.append(
                _POL_KEY.pack(
                    ifindex,
                    _uint(entry.identity, 0xFFFFFFFF, f"{what}: identity"),
                    _uint(entry.port, 0xFFFF, f"{what}: port").to_bytes(2, "big"),
                    _uint(entry.protocol, 0xFF, f"{what}: protocol"),
                    direction,
                )
            )
        value = _EP_VALUE.pack(_uint(spec.identity, 0xFFFFFFFF, what), flags)
        return _EP_KEY.pack(ifindex), value, frozenset(keys)

    # -- plain tables: desired bytes -> map ---------------------------------------------------

    @staticmethod
    def _check_room(access, copy: dict[bytes, bytes], desired: dict[bytes, bytes]) -> None:
        if len(desired) > access.max_entries:
            raise CapacityError(
                f"{access.name} would hold {len(desired)} entries, more than its {access.max_entries} "
                "(max_entries); nothing was written"
            )

    def _converge(self, access, copy, desired, result: SyncResult, deletes: bool = True) -> None:
        """Write the entries of ``desired`` that differ from ``copy`` and (``deletes``) delete the
        ones it does not want; ``copy`` follows."""
        writes = [(k, v) for k, v in desired.items() if copy.get(k) != v]
        gone = [k for k in copy if k not in desired] if deletes else []
        self._apply(access, copy, writes, gone, result)

    def _apply(self, access, copy, writes, gone, result: SyncResult) -> None:
        """Write ``writes`` and delete ``gone`` (deletes first when old and new would not fit together);
        ``copy`` and ``result`` follow. A failure leaves the copy stale (re-read before the next diff)."""
        added = sum(1 for k, _value in writes if k not in copy)
        try:
            if len(copy) + added > access.max_entries:
                access.delete_many(gone)
                access.update_many(writes)
            else:
                access.update_many(writes)
                access.delete_many(gone)
        except BaseException:
            self._stale = True
            raise
        for k, v in writes:
            copy[k] = v
        for k in gone:
            del copy[k]
        result.written[access.name] = result.written.get(access.name, 0) + len(writes)
        result.deleted[access.name] = result.deleted.get(access.name, 0) + len(gone)


class _IndexesExhausted(Exception):
    pass


def _wrap(value: int, limit: int) -> int:
    return value if 1 <= value <= limit else 1


# --- reading back ------------------------------------------------------------------------------------


def describe_services(maps) -> dict[tuple[str, int, str], list[tuple[str, int]]]:
    """What the datapath would do, read back from the maps: (ClusterIP, port, "TCP"/"UDP") -> the
    sorted (backend ip, port) of slots 1..count. A slot that is missing or names a missing backend
    shows as ("", 0) (it would drop the flows that pick it). For tests and "maps equal ground
    truth" checks."""
    svc = _access(maps.service, bpf_maps.SERVICE_MAP).read_all()
    backends = {_BE_KEY.unpack(k)[0]: v for k, v in _access(maps.backend, bpf_maps.BACKEND_MAP).read_all()}
    slots = dict(svc)
    out = {}
    for key, value in svc:
        slot = _SVC_KEY_TAIL.unpack_from(key, 6)[0]
        if slot != 0:
            continue
        proto = key[8]
        count = _SVC_VALUE.unpack(value)[1]
        found = []
        for n in range(1, count + 1):
            entry = slots.get(key[:6] + _SVC_KEY_TAIL.pack(n, proto))
            be = backends.get(_slot_backend(entry)) if entry is not None else None
            found.append((_ip_text(be[:4]), int.from_bytes(be[4:6], "big")) if be is not None else ("", 0))
        out[(_ip_text(key[:4]), int.from_bytes(key[4:6], "big"), _PROTO_NAMES.get(proto, str(proto)))] = sorted(found)
    return out


def describe_ipcache(maps) -> dict[str, tuple[int, str]]:
    """prefix ("10.1.0.5/32") -> (identity, tunnel endpoint), read back from cm_ipcache."""
    out = {}
    for key, value in _access(maps.ipcache, bpf_maps.IPCACHE_MAP).read_all():
        length, address = _IPC_KEY.unpack(key)
        identity, tunnel, _cluster, _flags = _IPC_VALUE.unpack(value)
        out[f"{_ip_text(address)}/{length}"] = (identity, _ip_text(tunnel))
    return out
