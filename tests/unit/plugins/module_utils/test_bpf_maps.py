# -*- coding: utf-8 -*-
# Copyright: clustermesh.core contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""bpf_maps against bpf/include/clustermesh_maps.h: the header is the one definition of the map layouts."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys

import pytest

from ansible_collections.clustermesh.core.plugins.module_utils import bpf_maps as m
from ansible_collections.clustermesh.core.plugins.module_utils import bpf_syscall as b

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))))
HEADER = os.path.join(REPO, "bpf", "include", "clustermesh_maps.h")
SIZES = {"__u8": 1, "__u16": 2, "__u32": 4, "__u64": 8, "__be16": 2, "__be32": 4}


def header_text():
    with open(HEADER, encoding="utf-8") as f:
        return re.sub(r"/\*.*?\*/", "", f.read(), flags=re.S)


def parse_structs(text):
    """{struct name: [(field, ctype, count, offset)], size} with C's natural alignment."""
    structs = {}
    for name, body in re.findall(r"^struct (\w+) \{(.*?)^\};", text, flags=re.S | re.M):
        fields, offset, align = [], 0, 1
        for line in filter(None, (line.strip() for line in body.splitlines())):
            match = re.fullmatch(r"(__u8|__u16|__u32|__u64|__be16|__be32) (\w+)(?:\[(\d+)\])?;", line)
            assert match, f"struct {name}: unsupported member line {line!r} (keep to the subset documented)"
            ctype, field, count = match.group(1), match.group(2), int(match.group(3) or 1)
            size = SIZES[ctype]
            offset += -offset % size
            align = max(align, size)
            fields.append((field, ctype, count, offset))
            offset += size * count
        structs[name] = (fields, offset + -offset % align)
    return structs


def parse_defines(text):
    return dict(re.findall(r"^#define (\w+) (\S+)", text, flags=re.M))


def parse_maps(text, defines):
    maps = {}
    for body, name in re.findall(r"^struct \{(.*?)\} (\w+) SEC\(\"\.maps\"\);", text, flags=re.S | re.M):
        attrs = dict(re.findall(r"__(?:uint|type)\((\w+), ([^)]+)\)", body))
        maps[name] = {k: defines.get(v, v) for k, v in attrs.items()}
    return maps


STRUCTS = parse_structs(header_text())
DEFINES = parse_defines(header_text())
MAPS = parse_maps(header_text(), DEFINES)


def test_the_header_parses_into_every_struct_the_library_knows():
    assert set(STRUCTS) == set(m.LAYOUTS)
    assert set(MAPS) == set(m.MAPS)


@pytest.mark.parametrize("name", sorted(m.LAYOUTS))
def test_struct_layout_matches_the_header(name):
    fields, size = STRUCTS[name]
    layout = m.LAYOUTS[name]
    assert [(f.name, f.ctype, f.count, f.offset) for f in layout.fields] == fields
    assert layout.size == size
    assert len(layout.encode()) == size


MAP_TYPES = {"BPF_MAP_TYPE_HASH": b.MapType.HASH, "BPF_MAP_TYPE_LRU_HASH": b.MapType.LRU_HASH,
             "BPF_MAP_TYPE_LPM_TRIE": b.MapType.LPM_TRIE}  # fmt: skip


@pytest.mark.parametrize("name", sorted(m.MAPS))
def test_map_definition_matches_the_header(name):
    spec, defined = m.MAPS[name], MAPS[name]
    assert MAP_TYPES[defined["type"]] == spec.map_type
    assert defined["key"] == "struct " + spec.key.c_name
    assert defined["value"] == "struct " + spec.value.c_name
    assert int(defined["max_entries"]) == spec.max_entries
    assert {"BPF_F_NO_PREALLOC": m.BPF_F_NO_PREALLOC}.get(defined.get("map_flags"), 0) == spec.flags
    assert defined["pinning"] == "LIBBPF_PIN_BY_NAME"
    assert len(name) < b.BPF_OBJ_NAME_LEN


def test_constants_match_the_header():
    assert DEFINES["CM_PIN_ROOT"] == '"%s"' % m.PIN_ROOT
    assert int(DEFINES["CM_HAIRPIN_ADDR"], 16) == int.from_bytes(bytes(map(int, m.HAIRPIN_ADDRESS.split("."))), "big")
    assert int(DEFINES["CM_CT_SERVICE"]) == m.CT_SERVICE and int(DEFINES["CM_CT_REPLY"]) == m.CT_REPLY
    assert int(DEFINES["CM_CT_F_HAIRPIN"]) == m.CT_F_HAIRPIN
    assert int(DEFINES["CM_BE_F_ACTIVE"]) == m.BE_F_ACTIVE
    assert [int(DEFINES[k]) for k in ("CM_SVC_F_GLOBAL", "CM_SVC_F_SHARED", "CM_SVC_F_AFFINITY_LOCAL")] == [
        m.SVC_F_GLOBAL, m.SVC_F_SHARED, m.SVC_F_AFFINITY_LOCAL]  # fmt: skip


def test_policy_constants_match_the_header():
    assert int(DEFINES["CM_CT_POLICY"]) == m.CT_POLICY
    assert [int(DEFINES[k]) for k in ("CM_ID_HOST", "CM_ID_WORLD", "CM_ID_REMOTE_NODE")] == [1, 2, 6]
    assert (m.ID_HOST, m.ID_WORLD, m.ID_REMOTE_NODE) == (1, 2, 6)
    assert (int(DEFINES["CM_EP_F_INGRESS"]), int(DEFINES["CM_EP_F_EGRESS"])) == (m.EP_F_INGRESS, m.EP_F_EGRESS)
    assert (int(DEFINES["CM_DIR_INGRESS"]), int(DEFINES["CM_DIR_EGRESS"])) == (m.DIR_INGRESS, m.DIR_EGRESS)
    reasons = {int(DEFINES[k]): k for k in ("CM_DROP_POLICY", "CM_DROP_NO_BACKEND", "CM_DROP_NAT")}
    assert {reasons[n]: name for n, name in m.DROP_REASONS.items()} == {
        "CM_DROP_POLICY": "policy", "CM_DROP_NO_BACKEND": "no-backend", "CM_DROP_NAT": "nat"}  # fmt: skip
    # the map sizes the interface names
    assert (DEFINES["CM_ENDPOINT_MAX"], DEFINES["CM_POLICY_MAX"], DEFINES["CM_DROP_MAX"]) == ("4096", "262144", "16384")


@pytest.mark.skipif(not (shutil.which("clang") and shutil.which("bpftool")), reason="needs clang and bpftool")
def test_clang_agrees_with_the_parsed_layouts(tmp_path):
    """The compiler's own layout (BTF of an object built from the header) equals the library's."""
    src = tmp_path / "layouts.c"
    src.write_text(
        "typedef unsigned char __u8;\ntypedef unsigned short __u16, __be16;\n"
        "typedef unsigned int __u32, __be32;\ntypedef unsigned long long __u64;\n"
        '#include "clustermesh_maps.h"\n' + "".join(f"struct {name} v_{name};\n" for name in m.LAYOUTS)
    )
    obj = tmp_path / "layouts.o"
    subprocess.run(["clang", "-O2", "-g", "-target", "bpf", "-I", os.path.dirname(HEADER), "-c", str(src),
                    "-o", str(obj)], check=True)  # fmt: skip
    btf = json.loads(subprocess.run(["bpftool", "-j", "btf", "dump", "file", str(obj)], check=True,
                                    capture_output=True, text=True).stdout)  # fmt: skip
    found = {t["name"]: t for t in btf["types"] if t["kind"] == "STRUCT"}
    for name, layout in m.LAYOUTS.items():
        assert found[name]["size"] == layout.size, name
        members = [(x["name"], x["bits_offset"] // 8) for x in found[name]["members"]]
        assert members == [(f.name, f.offset) for f in layout.fields], name


# --- encoding ---------------------------------------------------------------------------------


def test_addresses_and_ports_are_network_order_and_the_rest_host_order():
    raw = m.LB_KEY.encode(address="172.30.1.10", dport=80, slot=2, proto=6)
    assert raw[:4] == bytes([172, 30, 1, 10])
    assert raw[4:6] == b"\x00\x50"
    assert raw[6:8] == (2).to_bytes(2, sys.byteorder)
    assert raw[8:] == b"\x06\x00\x00\x00"
    assert m.LB_KEY.decode(raw) == {"address": "172.30.1.10", "dport": 80, "slot": 2, "proto": 6}


@pytest.mark.parametrize("layout", list(m.LAYOUTS.values()), ids=lambda x: x.c_name)
def test_every_struct_round_trips(layout):
    values = {}
    for f in layout.fields:
        if f.name == "pad":
            continue
        values[f.name] = "10.1.2.3" if f.is_address else (1 << (8 * SIZES[f.ctype] - 1)) + 5
    assert layout.decode(layout.encode(values)) == values


def test_bad_values_are_named():
    with pytest.raises(m.LayoutError, match=r"struct cm_lb_key field dport must be between 0 and 65535, got 70000"):
        m.LB_KEY.encode(address="10.0.0.1", dport=70000)
    with pytest.raises(m.LayoutError, match=r"struct cm_lb_backend field address must be an IPv4 address, got 'x'"):
        m.LB_BACKEND.encode(address="x")
    with pytest.raises(m.LayoutError, match=r"struct cm_lb_key has no field port"):
        m.LB_KEY.encode(port=80)
    with pytest.raises(m.LayoutError, match=r"struct cm_ct_key is 16 bytes, got 3"):
        m.CT_KEY.decode(b"abc")
    with pytest.raises(ValueError, match=r"protocol must be tcp or udp, got 'sctp'"):
        m.protocol_number("sctp")


# --- backend choice -----------------------------------------------------------------------------


def test_fmix32_is_murmur3s_finaliser():
    assert m.fmix32(0) == 0
    # independent reference: murmur3_32 of the empty string with seed 1 is fmix32(1)
    assert m.fmix32(1) == 0x514E28B7


def test_flows_spread_over_the_slots_and_a_flow_always_gets_the_same_slot():
    slots = [m.backend_slot("10.1.0.2", "172.30.1.10", port, 80, "tcp", 2) for port in range(40000, 40200)]
    assert set(slots) == {1, 2}
    assert 60 <= slots.count(1) <= 140  # a real mixer, not one backend for every flow
    assert slots == [m.backend_slot("10.1.0.2", "172.30.1.10", port, 80, 6, 2) for port in range(40000, 40200)]
    with pytest.raises(ValueError, match="at least one backend slot"):
        m.backend_slot("10.1.0.2", "172.30.1.10", 1, 80, 6, 0)


# --- map operations on a real (unpinned) map ---------------------------------------------------


class _FakePinned(m.PinnedMap):
    def __init__(self, spec):  # pylint: disable=super-init-not-called
        self.spec = spec
        self.path = "(test)"
        self.fd = b.map_create(spec.map_type, spec.key.size, spec.value.size, 64, spec.flags, name="cm_test")


class _FakeMaps(m.DatapathMaps):
    def __init__(self):  # pylint: disable=super-init-not-called
        self.service = _FakePinned(m.SERVICE_MAP)
        self.backend = _FakePinned(m.BACKEND_MAP)
        self.revnat = _FakePinned(m.REVNAT_MAP)
        self.ct = _FakePinned(m.CT_MAP)
        self.ipcache = _FakePinned(m.IPCACHE_MAP)
        self.endpoint = _FakePinned(m.ENDPOINT_MAP)
        self.policy = _FakePinned(m.POLICY_MAP)
        self.drops = _FakeDrops(m.DROP_MAP)
        self._all = [self.service, self.backend, self.revnat, self.ct, self.ipcache, self.endpoint, self.policy,
                     self.drops]  # fmt: skip


class _FakeDrops(m.DropMap, _FakePinned):
    pass


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root (bpf(2))")
def test_write_service_slots_revnat_and_shrinking():
    with _FakeMaps() as maps:
        maps.write_backend(1, "10.1.0.3", 8080, "tcp", cluster_id=1)
        maps.write_backend(2, "10.1.0.4", 8080, "tcp", cluster_id=1)
        assert maps.write_service("172.30.1.10", 80, "tcp", [1, 2], rev_nat_index=7, flags=m.SVC_F_GLOBAL)
        assert not maps.write_service("172.30.1.10", 80, "tcp", [1, 2], rev_nat_index=7, flags=m.SVC_F_GLOBAL)
        entries = {k["slot"]: v for k, v in maps.service.items()}
        assert entries == {
            0: {"backend_id": 0, "count": 2, "rev_nat_index": 7, "flags": m.SVC_F_GLOBAL},
            1: {"backend_id": 1, "count": 0, "rev_nat_index": 7, "flags": 0},
            2: {"backend_id": 2, "count": 0, "rev_nat_index": 7, "flags": 0},
        }
        assert maps.revnat.lookup({"rev_nat_index": 7}) == {"address": "172.30.1.10", "port": 80}
        assert maps.backend.lookup({"backend_id": 2}) == {
            "address": "10.1.0.4", "port": 8080, "proto": 6, "flags": m.BE_F_ACTIVE, "cluster_id": 1}  # fmt: skip
        # shrinking removes the surplus slot
        assert maps.write_service("172.30.1.10", 80, "tcp", [2], rev_nat_index=7, flags=m.SVC_F_GLOBAL)
        assert {k["slot"]: v["backend_id"] for k, v in maps.service.items()} == {0: 0, 1: 2}
        assert maps.delete_service("172.30.1.10", 80, "tcp")
        assert maps.service.keys() == [] and not maps.delete_service("172.30.1.10", 80, "tcp")


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root (bpf(2))")
def test_ipcache_is_longest_prefix_match():
    with _FakeMaps() as maps:
        maps.write_ipcache("10.2.0.0/16", identity=2000, tunnel_endpoint="198.18.1.13", cluster_id=2)
        maps.write_ipcache("10.2.0.7/32", identity=2001, tunnel_endpoint="198.18.1.13", cluster_id=2)
        assert maps.lookup_ipcache("10.2.0.7")["identity"] == 2001
        assert maps.lookup_ipcache("10.2.5.1") == {
            "identity": 2000, "tunnel_endpoint": "198.18.1.13", "cluster_id": 2, "flags": 0}  # fmt: skip
        assert maps.lookup_ipcache("10.3.0.1") is None
        assert maps.delete_ipcache("10.2.0.7/32")
        assert maps.lookup_ipcache("10.2.0.7")["identity"] == 2000


def test_policy_and_drop_keys_are_laid_out_as_the_datapath_reads_them():
    raw = m.POLICY_KEY.encode(ifindex=7, identity=65537, dport=80, proto=6, direction=m.DIR_EGRESS)
    assert raw == (7).to_bytes(4, sys.byteorder) + (65537).to_bytes(4, sys.byteorder) + b"\x00\x50\x06\x01"
    raw = m.DROP_KEY.encode(ifindex=7, identity=2, dport=443, proto=17, direction=m.DIR_INGRESS, reason=m.DROP_POLICY)
    assert len(raw) == 16 and raw[8:13] == b"\x01\xbb\x11\x00\x01" and raw[13:] == bytes(3)


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root (bpf(2))")
def test_endpoint_and_policy_helpers():
    with _FakeMaps() as maps:
        maps.write_endpoint(7, 65537, ingress=True)
        assert maps.endpoint.lookup({"ifindex": 7}) == {"identity": 65537, "flags": m.EP_F_INGRESS}
        maps.write_endpoint(7, 65537, ingress=True, egress=True)
        assert maps.endpoint.lookup({"ifindex": 7})["flags"] == m.EP_F_INGRESS | m.EP_F_EGRESS
        maps.write_policy(7, 65538, 80, "tcp", "ingress")
        maps.write_policy(7, 0, 0, 0, m.DIR_EGRESS)
        maps.write_policy(7, 2, 53, "UDP", "egress")
        keys = maps.policy.keys()  # noqa: SIM118 (PinnedMap.keys(), not a dict)
        assert sorted((k["identity"], k["dport"], k["proto"], k["direction"]) for k in keys) == [
            (0, 0, 0, m.DIR_EGRESS), (2, 53, 17, m.DIR_EGRESS), (65538, 80, 6, m.DIR_INGRESS)]  # fmt: skip
        assert maps.delete_policy(7, 65538, 80, 6, "ingress") and not maps.delete_policy(7, 65538, 80, 6, "ingress")
        assert maps.delete_endpoint(7) and not maps.delete_endpoint(7)
        with pytest.raises(ValueError, match=r"direction must be ingress or egress, got 'sideways'"):
            maps.write_policy(7, 1, 80, "tcp", "sideways")
        with pytest.raises(ValueError, match=r"policy protocol must be any \(0\), tcp \(6\), udp \(17\) or sctp"):
            maps.write_policy(7, 1, 80, "icmp", "ingress")
        with pytest.raises(ValueError, match=r"a port \(80\) needs a protocol"):
            maps.write_policy(7, 1, 80, "any", "ingress")
        with pytest.raises(ValueError, match=r"ifindex must be the interface index .* got 0"):
            maps.write_endpoint(0, 1)


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root (bpf(2))")
def test_drops_lists_the_counters_with_names():
    with _FakeMaps() as maps:
        assert maps.drops() == []
        key = {"ifindex": 9, "identity": 2, "dport": 81, "proto": 6, "direction": m.DIR_INGRESS,
               "reason": m.DROP_POLICY}  # fmt: skip
        maps.drops.update(key, {"packets": 3, "bytes": 180, "last_ns": 12345})
        maps.drops.update(dict(key, identity=0, dport=80, direction=m.DIR_EGRESS, reason=m.DROP_NO_BACKEND),
                          {"packets": 1, "bytes": 60, "last_ns": 1})  # fmt: skip
        assert maps.drops() == [
            {"ifindex": 9, "identity": 0, "port": 80, "proto": 6, "direction": "egress", "reason": "no-backend",
             "packets": 1, "bytes": 60, "last_ns": 1},
            {"ifindex": 9, "identity": 2, "port": 81, "proto": 6, "direction": "ingress", "reason": "policy",
             "packets": 3, "bytes": 180, "last_ns": 12345},
        ]  # fmt: skip
        assert maps.clear_drops() == 2 and maps.drops() == []


@pytest.mark.skipif(os.geteuid() != 0 or not shutil.which("bpftool"), reason="needs root and bpftool")
def test_maps_pinned_by_an_older_object_without_the_policy_maps_are_named(tmp_path):
    """The service maps of an older lb.o are pinned, the policy maps are not: a clear MapMismatchError.
    Runs in a private mount namespace with its own bpffs: nothing is pinned in the machine's."""
    types = {b.MapType.HASH: "hash", b.MapType.LRU_HASH: "lru_hash", b.MapType.LPM_TRIE: "lpm_trie"}
    create = "".join(
        f"bpftool map create $D/{s.name} type {types[s.map_type]} key {s.key.size} value {s.value.size} "
        f"entries 8 name {s.name} flags {s.flags}\n"
        for s in (m.SERVICE_MAP, m.BACKEND_MAP, m.REVNAT_MAP, m.CT_MAP, m.IPCACHE_MAP)
    )
    pins = tmp_path / "pins"
    pins.mkdir()
    probe = tmp_path / "probe.py"
    probe.write_text(
        f"import sys\nsys.path[:0] = {sys.path!r}\n"
        "from ansible_collections.clustermesh.core.plugins.module_utils import bpf_maps as m\n"
        "try:\n    m.DatapathMaps(sys.argv[1])\nexcept m.MapMismatchError as exc:\n    print(exc)\n"
    )
    script = f"set -e\nD={pins}\nmount -t bpf bpf $D\n{create}{sys.executable} {probe} $D\n"
    out = subprocess.run(["unshare", "--mount", "--propagation", "private", "sh", "-c", script],
                         capture_output=True, text=True, check=False)  # fmt: skip
    assert f"pinned map {pins}/cm_endpoint is missing while {pins}/cm_lb_svc exists" in out.stdout, out
    assert "pinned by an older lb.o; reload the current datapath" in out.stdout, out
