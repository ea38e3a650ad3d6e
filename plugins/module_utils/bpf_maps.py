# -*- coding: utf-8 -*-
# Copyright: clustermesh.core contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""Keys and values of the datapath's pinned BPF maps (services, ipcache, policy), and operations on them.

The layouts mirror ``bpf/include/clustermesh_maps.h`` field by field (that header is the one
definition; ``tests/unit/plugins/module_utils/test_bpf_maps.py`` parses it and checks every struct
and map here against it). Addresses and ports are network byte order in the maps; Python sees
dotted-quad strings and ints. ``pad`` fields are always written as zero and left out when decoding.

Map operations go through :mod:`.bpf_syscall` (raw bpf(2)); maps are opened by their pins under a
node's pin root (``/sys/fs/bpf/clustermesh`` by default; :func:`open_maps`).

Service map convention (as Cilium's lb4 maps): slot 0 of ``{ClusterIP, port, proto}`` is the service
(``count`` backend slots, ``rev_nat_index``, ``flags``); slots 1..count each name a ``backend_id``.
:func:`write_service` writes the backend slots before slot 0 and removes surplus slots after it, so
the datapath never reads a slot that is not there.

Policy (lb.c): an endpoint is the ifindex of a pod's host-side veth. ``cm_endpoint`` says in which
directions it is default-deny (:func:`DatapathMaps.write_endpoint`); ``cm_policy`` holds its allow
entries {peer identity (0 any), port (0 any), proto (0 any), direction}; an endpoint absent from
``cm_endpoint`` allows everything. Write the allow entries before enforcing an endpoint. Drops are
counted per {endpoint, peer identity, port, proto, direction, reason} in ``cm_drops``
(:meth:`DatapathMaps.drops`).

No Ansible imports: shared by the modules and the node agent.
"""

from __future__ import annotations

import ipaddress
import os
import socket
import struct
import sys

from . import bpf_syscall
from .bpf_syscall import BpfError, MapType

PIN_ROOT = "/sys/fs/bpf/clustermesh"
HAIRPIN_ADDRESS = "169.254.42.1"

PROTO_TCP = 6
PROTO_UDP = 17
PROTO_SCTP = 132
PROTOCOLS = {"tcp": PROTO_TCP, "udp": PROTO_UDP}

CT_SERVICE = 0
CT_REPLY = 1
CT_POLICY = 2
CT_F_HAIRPIN = 1

# reserved identities; identity 0 in a policy entry is any peer
ID_HOST = 1
ID_WORLD = 2
ID_REMOTE_NODE = 6

EP_F_INGRESS = 1
EP_F_EGRESS = 2

DIR_INGRESS = 0
DIR_EGRESS = 1
DIRECTIONS = {"ingress": DIR_INGRESS, "egress": DIR_EGRESS}

DROP_POLICY = 1
DROP_NO_BACKEND = 2
DROP_NAT = 3
DROP_REASONS = {DROP_POLICY: "policy", DROP_NO_BACKEND: "no-backend", DROP_NAT: "nat"}

SVC_F_GLOBAL = 1
SVC_F_SHARED = 2
SVC_F_AFFINITY_LOCAL = 4

BE_F_ACTIVE = 1

BPF_F_NO_PREALLOC = 1

# C type -> (size, struct code in host order); __be* are stored big-endian.
C_TYPES = {
    "__u8": (1, "B"),
    "__u16": (2, "H"),
    "__u32": (4, "I"),
    "__u64": (8, "Q"),
    "__be16": (2, "H"),
    "__be32": (4, "I"),
}


class LayoutError(ValueError):
    """A value that does not fit its field; the message names the struct, field and value."""


class Field:
    """One member of a C struct: name, C type, array length (1 for scalars), offset."""

    __slots__ = ("name", "ctype", "count", "offset", "size")

    def __init__(self, name, ctype, count=1):
        if ctype not in C_TYPES:
            raise ValueError(f"unsupported C type {ctype}")
        self.name, self.ctype, self.count = name, ctype, count
        self.size = C_TYPES[ctype][0] * count
        self.offset = 0

    @property
    def is_address(self):
        return self.ctype == "__be32" and self.count == 1


class Layout:
    """A C struct with natural alignment: offsets, size, encode/decode of dicts."""

    def __init__(self, c_name, fields):
        self.c_name = c_name
        self.fields = [Field(*f) for f in fields]
        offset, align = 0, 1
        fmt = ["<" if sys.byteorder == "little" else ">"]
        for f in self.fields:
            elem = C_TYPES[f.ctype][0]
            align = max(align, elem)
            if offset % elem:
                gap = elem - offset % elem
                fmt.append(f"{gap}x")
                offset += gap
            f.offset = offset
            offset += f.size
            fmt.append(f"{f.size}s" if f.name == "pad" or f.count > 1 else C_TYPES[f.ctype][1])
        if offset % align:
            fmt.append(f"{align - offset % align}x")
            offset += align - offset % align
        self.size = offset
        self._struct = struct.Struct("".join(fmt))
        if self._struct.size != self.size:
            raise AssertionError(f"struct {c_name}: packing is {self._struct.size} bytes, C layout {self.size}")
        self.names = [f.name for f in self.fields if f.name != "pad"]

    def encode(self, values=None, **kwargs):
        """Bytes of the struct from a dict (and/or keyword arguments); missing fields are zero."""
        values = dict(values or {}, **kwargs)
        unknown = set(values) - set(self.names)
        if unknown:
            raise LayoutError(f"struct {self.c_name} has no field {', '.join(sorted(unknown))}; fields: {self.names}")
        args = []
        for f in self.fields:
            if f.name == "pad":
                args.append(bytes(f.size))
                continue
            args.append(self._to_c(f, values.get(f.name, 0)))
        return self._struct.pack(*args)

    def decode(self, data):
        """A dict of the struct's fields (pad left out) from its bytes."""
        if len(data) != self.size:
            raise LayoutError(f"struct {self.c_name} is {self.size} bytes, got {len(data)}")
        out = {}
        for f, raw in zip(self.fields, self._struct.unpack(bytes(data)), strict=True):
            if f.name != "pad":
                out[f.name] = self._from_c(f, raw)
        return out

    def _to_c(self, f, value):
        where = f"struct {self.c_name} field {f.name}"
        if f.count > 1:
            data = bytes(value) if value else bytes(f.size)
            if len(data) != f.size:
                raise LayoutError(f"{where} takes {f.size} bytes, got {len(data)}")
            return data
        if f.is_address:
            try:
                packed = ipaddress.IPv4Address(value).packed
            except ValueError:
                raise LayoutError(f"{where} must be an IPv4 address, got {value!r}") from None
            return int.from_bytes(packed, sys.byteorder)
        if not isinstance(value, int) or isinstance(value, bool):
            raise LayoutError(f"{where} must be an integer, got {value!r}")
        limit = 1 << (8 * f.size)
        if not 0 <= value < limit:
            raise LayoutError(f"{where} must be between 0 and {limit - 1}, got {value}")
        if f.ctype == "__be16":
            return socket.htons(value)
        if f.ctype == "__be32":
            return socket.htonl(value)
        return value

    def _from_c(self, f, raw):
        if f.count > 1:
            return raw
        if f.is_address:
            return str(ipaddress.IPv4Address(raw.to_bytes(4, sys.byteorder)))
        if f.ctype == "__be16":
            return socket.ntohs(raw)
        return raw


LB_KEY = Layout(
    "cm_lb_key", [("address", "__be32"), ("dport", "__be16"), ("slot", "__u16"), ("proto", "__u8"), ("pad", "__u8", 3)]
)
LB_SERVICE = Layout(
    "cm_lb_service",
    [("backend_id", "__u32"), ("count", "__u16"), ("rev_nat_index", "__u16"), ("flags", "__u8"), ("pad", "__u8", 3)],
)
LB_BACKEND_KEY = Layout("cm_lb_backend_key", [("backend_id", "__u32")])
LB_BACKEND = Layout(
    "cm_lb_backend",
    [("address", "__be32"), ("port", "__be16"), ("proto", "__u8"), ("flags", "__u8"), ("cluster_id", "__u16"),
     ("pad", "__u16")],
)  # fmt: skip
LB_REVNAT_KEY = Layout("cm_lb_revnat_key", [("rev_nat_index", "__u16"), ("pad", "__u16")])
LB_REVNAT = Layout("cm_lb_revnat", [("address", "__be32"), ("port", "__be16"), ("pad", "__u16")])
CT_KEY = Layout(
    "cm_ct_key",
    [("saddr", "__be32"), ("daddr", "__be32"), ("sport", "__be16"), ("dport", "__be16"), ("proto", "__u8"),
     ("direction", "__u8"), ("pad", "__u16")],
)  # fmt: skip
CT_VALUE = Layout(
    "cm_ct_value",
    [("backend_id", "__u32"), ("rev_nat_index", "__u16"), ("flags", "__u8"), ("pad", "__u8"), ("created_ns", "__u64")],
)
IPCACHE_KEY = Layout("cm_ipcache_key", [("prefixlen", "__u32"), ("address", "__be32")])
IPCACHE_VALUE = Layout(
    "cm_ipcache_value",
    [("identity", "__u32"), ("tunnel_endpoint", "__be32"), ("cluster_id", "__u16"), ("flags", "__u8"), ("pad", "__u8")],
)
ENDPOINT_KEY = Layout("cm_endpoint_key", [("ifindex", "__u32")])
ENDPOINT_VALUE = Layout("cm_endpoint", [("identity", "__u32"), ("flags", "__u8"), ("pad", "__u8", 3)])
POLICY_KEY = Layout(
    "cm_policy_key",
    [("ifindex", "__u32"), ("identity", "__u32"), ("dport", "__be16"), ("proto", "__u8"), ("direction", "__u8")],
)
POLICY_VALUE = Layout("cm_policy", [("flags", "__u32"), ("pad", "__u32")])
DROP_KEY = Layout(
    "cm_drop_key",
    [("ifindex", "__u32"), ("identity", "__u32"), ("dport", "__be16"), ("proto", "__u8"), ("direction", "__u8"),
     ("reason", "__u8"), ("pad", "__u8", 3)],
)  # fmt: skip
DROP_VALUE = Layout("cm_drop", [("packets", "__u64"), ("bytes", "__u64"), ("last_ns", "__u64")])

LAYOUTS = {
    layout.c_name: layout
    for layout in (LB_KEY, LB_SERVICE, LB_BACKEND_KEY, LB_BACKEND, LB_REVNAT_KEY, LB_REVNAT, CT_KEY, CT_VALUE,
                   IPCACHE_KEY, IPCACHE_VALUE, ENDPOINT_KEY, ENDPOINT_VALUE, POLICY_KEY, POLICY_VALUE, DROP_KEY,
                   DROP_VALUE)
}  # fmt: skip


class MapSpec:
    """A pinned map of the datapath: name (its pin under the pin root), type, layouts, size."""

    def __init__(self, name, map_type, key, value, max_entries, flags=0):
        self.name, self.map_type, self.key, self.value = name, map_type, key, value
        self.max_entries, self.flags = max_entries, flags


SERVICE_MAP = MapSpec("cm_lb_svc", MapType.HASH, LB_KEY, LB_SERVICE, 65536)
BACKEND_MAP = MapSpec("cm_lb_be", MapType.HASH, LB_BACKEND_KEY, LB_BACKEND, 65536)
REVNAT_MAP = MapSpec("cm_lb_revnat", MapType.HASH, LB_REVNAT_KEY, LB_REVNAT, 65536)
CT_MAP = MapSpec("cm_ct", MapType.LRU_HASH, CT_KEY, CT_VALUE, 262144)
IPCACHE_MAP = MapSpec("cm_ipcache", MapType.LPM_TRIE, IPCACHE_KEY, IPCACHE_VALUE, 65536, BPF_F_NO_PREALLOC)
ENDPOINT_MAP = MapSpec("cm_endpoint", MapType.HASH, ENDPOINT_KEY, ENDPOINT_VALUE, 4096)
POLICY_MAP = MapSpec("cm_policy", MapType.HASH, POLICY_KEY, POLICY_VALUE, 262144)
DROP_MAP = MapSpec("cm_drops", MapType.LRU_HASH, DROP_KEY, DROP_VALUE, 16384)
MAPS = {
    spec.name: spec
    for spec in (SERVICE_MAP, BACKEND_MAP, REVNAT_MAP, CT_MAP, IPCACHE_MAP, ENDPOINT_MAP, POLICY_MAP, DROP_MAP)
}


def policy_protocol(proto):
    """0 (any), 6, 17 or 132 from 'any'/'tcp'/'udp'/'sctp' (any case) or the number; ValueError otherwise."""
    numbers = {"any": 0, "tcp": PROTO_TCP, "udp": PROTO_UDP, "sctp": PROTO_SCTP}
    if isinstance(proto, int) and not isinstance(proto, bool) and proto in numbers.values():
        return proto
    number = numbers.get(str(proto).lower())
    if number is None:
        raise ValueError(f"policy protocol must be any (0), tcp (6), udp (17) or sctp (132), got {proto!r}")
    return number


def direction_number(direction):
    """DIR_INGRESS / DIR_EGRESS from 'ingress'/'egress' or the number; ValueError otherwise."""
    if isinstance(direction, int) and not isinstance(direction, bool) and direction in DIRECTIONS.values():
        return direction
    number = DIRECTIONS.get(str(direction).lower())
    if number is None:
        raise ValueError(f"direction must be ingress or egress, got {direction!r}")
    return number


def protocol_number(proto):
    """6 or 17 from 'tcp'/'TCP'/'udp'/6/17; ValueError naming the value otherwise."""
    if isinstance(proto, int) and proto in PROTOCOLS.values():
        return proto
    number = PROTOCOLS.get(str(proto).lower())
    if number is None:
        raise ValueError(f"protocol must be tcp or udp, got {proto!r}")
    return number


# --- backend choice, as lb.c computes it ---------------------------------------------------------

_M32 = 0xFFFFFFFF


def fmix32(h):
    """murmur3's 32-bit finaliser (lb.c fmix32)."""
    h ^= h >> 16
    h = (h * 0x85EBCA6B) & _M32
    h ^= h >> 13
    h = (h * 0xC2B2AE35) & _M32
    h ^= h >> 16
    return h


def _mem_u32(address):
    return int.from_bytes(ipaddress.IPv4Address(address).packed, sys.byteorder)


def _mem_u16(port):
    return int.from_bytes(port.to_bytes(2, "big"), sys.byteorder)


def flow_hash(saddr, daddr, sport, dport, proto):
    """lb.c flow_hash() of a flow (addresses as strings, ports as ints): fields as they sit in memory."""
    h = fmix32((_mem_u16(sport) << 16 | _mem_u16(dport)) ^ protocol_number(proto))
    h = fmix32(_mem_u32(daddr) ^ h)
    return fmix32(_mem_u32(saddr) ^ h)


def backend_slot(saddr, daddr, sport, dport, proto, count):
    """The service slot (1..count) lb.c picks for a new flow to ClusterIP ``daddr``:``dport``."""
    if count < 1:
        raise ValueError(f"a service needs at least one backend slot, got count {count}")
    return flow_hash(saddr, daddr, sport, dport, proto) % count + 1


# --- pinned maps -----------------------------------------------------------------------------------


class MapMismatchError(RuntimeError):
    """A pin whose type or sizes differ from this library's layout (a stale pin from another version)."""


class PinnedMap:
    """An open pinned map with dict-level operations; close() (or ``with``) releases the fd."""

    def __init__(self, spec, pin_root=PIN_ROOT):
        self.spec = spec
        self.path = os.path.join(pin_root, spec.name)
        self.fd = bpf_syscall.obj_get(self.path)
        try:
            info = bpf_syscall.map_info(self.fd)
            found = (info.type, info.key_size, info.value_size)
            want = (spec.map_type, spec.key.size, spec.value.size)
            if found != want:
                raise MapMismatchError(
                    f"pinned map {self.path} has type/key/value size {found}, this library expects {want}: "
                    "a stale pin from another version; remove it and reload the datapath"
                )
        except BaseException:
            bpf_syscall.close(self.fd)
            raise

    def close(self):
        if self.fd is not None:
            bpf_syscall.close(self.fd)
            self.fd = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
        return False

    def lookup(self, key):
        raw = bpf_syscall.map_lookup(self.fd, self.spec.key.encode(key), self.spec.value.size)
        return None if raw is None else self.spec.value.decode(raw)

    def update(self, key, value, flags=bpf_syscall.BPF_ANY):
        bpf_syscall.map_update(self.fd, self.spec.key.encode(key), self.spec.value.encode(value), flags)

    def delete(self, key):
        return bpf_syscall.map_delete(self.fd, self.spec.key.encode(key))

    def keys(self):
        return [self.spec.key.decode(k) for k in bpf_syscall.map_keys(self.fd, self.spec.key.size)]

    def items(self):
        out = []
        for raw_key in bpf_syscall.map_keys(self.fd, self.spec.key.size):
            raw = bpf_syscall.map_lookup(self.fd, raw_key, self.spec.value.size)
            if raw is not None:
                out.append((self.spec.key.decode(raw_key), self.spec.value.decode(raw)))
        return out


def _drop_rows(items):
    names = {v: k for k, v in DIRECTIONS.items()}
    rows = []
    for key, value in items:
        rows.append(
            {"ifindex": key["ifindex"], "identity": key["identity"], "port": key["dport"], "proto": key["proto"],
             "direction": names.get(key["direction"], str(key["direction"])),
             "reason": DROP_REASONS.get(key["reason"], str(key["reason"])), "packets": value["packets"],
             "bytes": value["bytes"], "last_ns": value["last_ns"]}
        )  # fmt: skip
    return sorted(rows, key=lambda r: (r["ifindex"], r["direction"], r["reason"], r["identity"], r["port"], r["proto"]))


class DropMap(PinnedMap):
    """``cm_drops``: a PinnedMap that is also callable: ``maps.drops()`` lists the counters as dicts."""

    def __call__(self):
        """[{ifindex, identity, port, proto, direction ("ingress"|"egress"), reason ("policy"|"no-backend"|
        "nat"), packets, bytes, last_ns}], sorted by endpoint, direction, reason, peer, port, proto."""
        return _drop_rows(self.items())


class DatapathMaps:
    """The maps of a node, opened by pin: ``maps.service``, ``.backend``, ``.revnat``, ``.ct``,
    ``.ipcache``, ``.endpoint``, ``.policy``, ``.drops`` (also callable: :meth:`DropMap.__call__`).
    The maps must have been created (pinned) by loading lb.o (bpf_loader.load); a missing or stale
    pin (e.g. made by an older lb.o without the policy maps) is a MapMismatchError."""

    def __init__(self, pin_root=PIN_ROOT):
        self.pin_root = pin_root
        opened = []
        try:
            for attr, spec in (("service", SERVICE_MAP), ("backend", BACKEND_MAP), ("revnat", REVNAT_MAP),
                               ("ct", CT_MAP), ("ipcache", IPCACHE_MAP), ("endpoint", ENDPOINT_MAP),
                               ("policy", POLICY_MAP), ("drops", DROP_MAP)):  # fmt: skip
                path = os.path.join(pin_root, spec.name)
                cls = DropMap if spec is DROP_MAP else PinnedMap
                try:
                    opened.append(cls(spec, pin_root))
                except BpfError as exc:
                    if opened and not os.path.exists(path):
                        raise MapMismatchError(
                            f"pinned map {path} is missing while {opened[0].path} exists: the maps were pinned by "
                            "an older lb.o; reload the current datapath (bpf_loader.load) to create it"
                        ) from exc
                    raise MapMismatchError(
                        f"cannot open pinned map {path}: {exc}; load the datapath first (bpf_loader.load)"
                    ) from exc
                setattr(self, attr, opened[-1])
        except BaseException:
            for m in opened:
                m.close()
            raise
        self._all = opened

    def close(self):
        for m in self._all:
            m.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
        return False

    # services ---------------------------------------------------------------------------------

    def write_backend(self, backend_id, address, port, proto, cluster_id=0, flags=BE_F_ACTIVE):
        if not 1 <= backend_id <= _M32:
            raise ValueError(f"backend_id must be 1..{_M32}, got {backend_id}")
        self.backend.update(
            {"backend_id": backend_id},
            {"address": address, "port": port, "proto": protocol_number(proto), "cluster_id": cluster_id,
             "flags": flags},
        )  # fmt: skip

    def delete_backend(self, backend_id):
        return self.backend.delete({"backend_id": backend_id})

    def write_revnat(self, rev_nat_index, address, port):
        if not 1 <= rev_nat_index <= 0xFFFF:
            raise ValueError(f"rev_nat_index must be 1..65535, got {rev_nat_index}")
        self.revnat.update({"rev_nat_index": rev_nat_index}, {"address": address, "port": port})

    def write_service(self, address, port, proto, backend_ids, rev_nat_index, flags=0):
        """Point ClusterIP ``address``:``port``/``proto`` at ``backend_ids`` (written first with
        :meth:`write_backend`); writes its reverse-NAT entry too. Idempotent; returns True if a map
        entry changed. An empty ``backend_ids`` leaves a service without backends (the datapath drops)."""
        proto = protocol_number(proto)
        base = {"address": address, "dport": port, "proto": proto}
        changed = False
        before = self.revnat.lookup({"rev_nat_index": rev_nat_index})
        if before != {"address": str(ipaddress.IPv4Address(address)), "port": port}:
            self.write_revnat(rev_nat_index, address, port)
            changed = True
        for slot, backend_id in enumerate(backend_ids, start=1):
            value = {"backend_id": backend_id, "count": 0, "rev_nat_index": rev_nat_index, "flags": 0}
            if self.service.lookup(dict(base, slot=slot)) != value:
                self.service.update(dict(base, slot=slot), value)
                changed = True
        head = {"backend_id": 0, "count": len(backend_ids), "rev_nat_index": rev_nat_index, "flags": flags}
        old = self.service.lookup(dict(base, slot=0))
        if old != head:
            self.service.update(dict(base, slot=0), head)
            changed = True
        for slot in range(len(backend_ids) + 1, (old or {}).get("count", 0) + 1):
            changed |= self.service.delete(dict(base, slot=slot))
        return changed

    def delete_service(self, address, port, proto):
        """Remove a service's slots (slot 0 first, so the datapath stops using it at once)."""
        base = {"address": address, "dport": port, "proto": protocol_number(proto)}
        head = self.service.lookup(dict(base, slot=0))
        if head is None:
            return False
        self.service.delete(dict(base, slot=0))
        for slot in range(1, head["count"] + 1):
            self.service.delete(dict(base, slot=slot))
        return True

    # ipcache ----------------------------------------------------------------------------------

    def write_ipcache(self, prefix, identity, tunnel_endpoint="0.0.0.0", cluster_id=0, flags=0):
        net = ipaddress.IPv4Network(prefix)
        self.ipcache.update(
            {"prefixlen": net.prefixlen, "address": str(net.network_address)},
            {"identity": identity, "tunnel_endpoint": tunnel_endpoint, "cluster_id": cluster_id, "flags": flags},
        )

    def delete_ipcache(self, prefix):
        net = ipaddress.IPv4Network(prefix)
        return self.ipcache.delete({"prefixlen": net.prefixlen, "address": str(net.network_address)})

    def lookup_ipcache(self, address):
        """Longest-prefix match of one address, or None."""
        return self.ipcache.lookup({"prefixlen": 32, "address": address})

    # policy -----------------------------------------------------------------------------------

    def write_endpoint(self, ifindex, identity, ingress=False, egress=False):
        """Put endpoint ``ifindex`` (its host-side veth) under policy: default-deny in the directions
        given (write its allow entries first); with neither, it is only conntracked."""
        self._check_ifindex(ifindex)
        flags = (EP_F_INGRESS if ingress else 0) | (EP_F_EGRESS if egress else 0)
        self.endpoint.update({"ifindex": ifindex}, {"identity": identity, "flags": flags})

    def delete_endpoint(self, ifindex):
        """The endpoint allows everything again (its policy entries stay until deleted); True if it was there."""
        return self.endpoint.delete({"ifindex": ifindex})

    def write_policy(self, ifindex, identity, port, proto, direction):
        """Allow peer ``identity`` (0 any) on ``port`` (0 any) / ``proto`` (0 or 'any', tcp, udp, sctp)
        in ``direction`` ('ingress'/'egress' or DIR_*) for endpoint ``ifindex``."""
        self.policy.update(self._policy_key(ifindex, identity, port, proto, direction), {"flags": 0})

    def delete_policy(self, ifindex, identity, port, proto, direction):
        return self.policy.delete(self._policy_key(ifindex, identity, port, proto, direction))

    def _policy_key(self, ifindex, identity, port, proto, direction):
        self._check_ifindex(ifindex)
        proto = policy_protocol(proto)
        if proto == 0 and port:
            raise ValueError(f"a port ({port}) needs a protocol: use tcp, udp or sctp, or port 0 for any protocol")
        return {"ifindex": ifindex, "identity": identity, "dport": port, "proto": proto,
                "direction": direction_number(direction)}  # fmt: skip

    @staticmethod
    def _check_ifindex(ifindex):
        if not isinstance(ifindex, int) or isinstance(ifindex, bool) or not 1 <= ifindex <= _M32:
            raise ValueError(f"ifindex must be the interface index of the pod's host-side veth (1..{_M32}), "
                             f"got {ifindex!r}")  # fmt: skip

    def clear_drops(self):
        """Remove every drop counter; returns how many there were."""
        keys = self.drops.keys()
        for key in keys:
            self.drops.delete(key)
        return len(keys)
