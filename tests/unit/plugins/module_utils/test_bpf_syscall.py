# -*- coding: utf-8 -*-
# Copyright: clustermesh.core contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
from __future__ import annotations

import ctypes
import errno
import os
import socket
import sys

import pytest

from ansible_collections.clustermesh.core.plugins.module_utils import bpf_syscall as b
from ansible_collections.clustermesh.core.plugins.module_utils.kernel_features import call_in_scratch_netns

needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="needs root (bpf(2), namespaces)")


# --- attr layout: offsets of union bpf_attr members (include/uapi/linux/bpf.h, checked
# against this kernel's BTF with clang _Static_assert) ------------------------------------


def test_attr_is_128_bytes():
    assert b.BPF_ATTR_SIZE == 128
    assert ctypes.sizeof(b.BpfAttr) == 128
    for variant in (b.MapCreateAttr, b.ProgLoadAttr, b.LinkCreateAttr):
        assert ctypes.sizeof(variant) <= 128


@pytest.mark.parametrize(
    ("struct", "field", "offset"),
    [
        (b.MapCreateAttr, "map_type", 0),
        (b.MapCreateAttr, "max_entries", 12),
        (b.MapCreateAttr, "map_flags", 16),
        (b.MapCreateAttr, "map_name", 28),
        (b.MapCreateAttr, "map_ifindex", 44),
        (b.MapCreateAttr, "btf_vmlinux_value_type_id", 60),
        (b.MapCreateAttr, "map_extra", 64),
        (b.ProgLoadAttr, "insns", 8),
        (b.ProgLoadAttr, "license", 16),
        (b.ProgLoadAttr, "log_level", 24),
        (b.ProgLoadAttr, "log_buf", 32),
        (b.ProgLoadAttr, "kern_version", 40),
        (b.ProgLoadAttr, "prog_name", 48),
        (b.ProgLoadAttr, "prog_ifindex", 64),
        (b.ProgLoadAttr, "expected_attach_type", 68),
        (b.LinkCreateAttr, "target_ifindex", 4),
        (b.LinkCreateAttr, "attach_type", 8),
        (b.LinkCreateAttr, "flags", 12),
        (b.LinkCreateAttr, "relative_fd", 16),
        (b.LinkCreateAttr, "expected_revision", 24),
    ],
)
def test_attr_offsets(struct, field, offset):
    assert getattr(struct, field).offset == offset


def test_attr_starts_zeroed_and_fields_land_where_expected():
    attr = b.BpfAttr()
    assert bytes(attr.raw) == bytes(128)
    attr.prog_load.prog_type = b.ProgType.SCHED_CLS
    attr.prog_load.prog_name = b"ab"
    attr.prog_load.expected_attach_type = 0x2E
    raw = bytes(attr.raw)
    assert raw[0:4] == (3).to_bytes(4, sys.byteorder)
    assert raw[48:51] == b"ab\0"
    assert raw[68:72] == (0x2E).to_bytes(4, sys.byteorder)
    assert raw[72:] == bytes(56)


def test_constants_match_the_kernel_uapi():
    assert (b.Cmd.MAP_CREATE, b.Cmd.PROG_LOAD, b.Cmd.OBJ_GET, b.Cmd.LINK_CREATE) == (0, 5, 7, 28)
    assert (b.AttachType.TCX_INGRESS, b.AttachType.TCX_EGRESS) == (46, 47)
    assert (b.MapType.ARRAY, b.MapType.LRU_HASH, b.MapType.LPM_TRIE) == (2, 9, 11)
    assert b.ProgType.SCHED_CLS == 3


def test_cmd_name():
    assert b.Cmd.name(0) == "BPF_MAP_CREATE"
    assert b.Cmd.name(28) == "BPF_LINK_CREATE"
    assert b.Cmd.name(999) == "bpf command 999"


# --- instructions -------------------------------------------------------------------------


@pytest.mark.skipif(sys.byteorder != "little", reason="encoding below is little-endian")
def test_trivial_program_encoding():
    assert b.return_imm(0) == bytes.fromhex("b7000000000000009500000000000000")
    assert b.mov64_imm(3, -1) == bytes.fromhex("b7030000ffffffff")
    assert b.insn(0x07, dst=1, src=2, off=-1, imm=5) == bytes.fromhex("0721ffff05000000")


def test_prog_load_rejects_bad_instruction_bytes():
    with pytest.raises(ValueError, match="multiple of 8"):
        b.prog_load(b.ProgType.SCHED_CLS, b"\x95\0\0")
    with pytest.raises(ValueError, match="multiple of 8"):
        b.prog_load(b.ProgType.SCHED_CLS, b"")


def test_names_longer_than_15_bytes_are_refused():
    with pytest.raises(ValueError, match="longer than 15"):
        b.map_create(b.MapType.ARRAY, 4, 4, 1, name="x" * 16)


# --- syscall plumbing ---------------------------------------------------------------------


def test_syscall_number():
    assert b.syscall_number("x86_64") == 321
    assert b.syscall_number("aarch64") == 280
    assert b.syscall_number("vax") is None


def test_unknown_architecture_raises_enosys(monkeypatch):
    monkeypatch.setattr(b.platform, "machine", lambda: "vax")
    with pytest.raises(b.BpfError) as info:
        b.map_create(b.MapType.ARRAY, 4, 4, 1)
    assert info.value.errno == errno.ENOSYS
    assert "vax" in str(info.value)


def test_bpf_error_text():
    err = b.BpfError(errno.EPERM, b.Cmd.MAP_CREATE, "map type 2")
    assert isinstance(err, OSError)
    assert err.errno == errno.EPERM
    assert str(err) == "BPF_MAP_CREATE (map type 2): Operation not permitted"
    with_log = b.BpfError(errno.EACCES, b.Cmd.PROG_LOAD, "", "R0 !read_ok\n")
    assert str(with_log) == "BPF_PROG_LOAD: Permission denied; verifier log: R0 !read_ok"


# --- against the kernel -------------------------------------------------------------------


def fd_is_open(fd):
    try:
        os.fstat(fd)
    except OSError:
        return False
    return True


@needs_root
def test_map_create_and_close():
    with b.map_create(b.MapType.ARRAY, 4, 8, 1, name="cm_test") as fd:
        assert isinstance(fd, int) and fd >= 0
        assert os.readlink(f"/proc/self/fd/{fd}") == "anon_inode:bpf-map"
    assert not fd_is_open(fd)


@needs_root
def test_map_create_error_carries_errno():
    with pytest.raises(b.BpfError) as info:
        b.map_create(b.MapType.ARRAY, 3, 8, 1)  # array keys must be 4 bytes
    assert info.value.errno == errno.EINVAL
    assert "BPF_MAP_CREATE" in str(info.value)


@needs_root
def test_prog_load_trivial_sched_cls():
    with b.prog_load(b.ProgType.SCHED_CLS, b.return_imm(b.TC_ACT_OK), name="cm_test") as fd:
        assert os.readlink(f"/proc/self/fd/{fd}") == "anon_inode:bpf-prog"
    assert not fd_is_open(fd)


@needs_root
def test_prog_load_failure_returns_the_verifier_log():
    with pytest.raises(b.BpfError) as info:
        b.prog_load(b.ProgType.SCHED_CLS, b.exit_insn(), log_size=65536)  # r0 never set
    assert info.value.errno == errno.EACCES
    assert "R0 !read_ok" in info.value.log
    assert "verifier log" in str(info.value)


def _tcx_attach_on_lo():
    # runs in a forked child inside a throwaway network namespace
    lo = socket.if_nametoindex("lo")
    with (
        b.prog_load(
            b.ProgType.SCHED_CLS,
            b.return_imm(b.TC_ACT_OK),
            expected_attach_type=b.AttachType.TCX_INGRESS,
        ) as prog,
        b.link_create(prog, lo, b.AttachType.TCX_INGRESS) as link,
    ):
        return os.readlink(f"/proc/self/fd/{link}")


@needs_root
def test_link_create_tcx_in_scratch_netns():
    assert call_in_scratch_netns(_tcx_attach_on_lo, timeout=20) == "anon_inode:bpf_link"
