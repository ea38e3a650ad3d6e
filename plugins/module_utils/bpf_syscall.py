# -*- coding: utf-8 -*-
# Copyright: clustermesh.core contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""A minimal wrapper of the raw bpf(2) system call through ctypes.

No bcc, no libbpf: every command fills one ``union bpf_attr`` (:class:`BpfAttr`), which is
always the full :data:`BPF_ATTR_SIZE` bytes and zeroed on creation, so the unused tail the
kernel checks is zero (``BPF_MAP_DELETE_ELEM`` and friends return EINVAL otherwise).

Layout of this file, to keep it easy to extend with more commands:

* constants: commands (:class:`Cmd`), map types, program types, attach types;
* one ``ctypes.Structure`` per attr variant (``MapCreateAttr``, ``ProgLoadAttr``, ...), all
  members of the :class:`BpfAttr` union; add the variant for a new command there;
* :func:`bpf` issues a command and turns a failure into :class:`BpfError`;
* small typed helpers on top (:func:`map_create`, :func:`prog_load`, :func:`link_create`,
  :func:`obj_get`, :func:`map_info`, :func:`map_lookup`, :func:`map_update`, :func:`map_delete`,
  :func:`map_keys`).

File descriptors returned are plain ints owned by the caller; :func:`close` or
:class:`BpfFd` (a context manager) closes them.

This file imports nothing from Ansible: it is shared by the modules and the node agent.
"""

from __future__ import annotations

import ctypes
import errno
import os
import platform
import struct
import sys

# Size of the attr buffer handed to the kernel.  union bpf_attr has grown past this in new
# kernels, but every command used here fits; the kernel zero-extends a shorter attr.
BPF_ATTR_SIZE = 128
BPF_OBJ_NAME_LEN = 16

# bpf(2) syscall number per architecture (platform.machine()).
SYS_BPF = {
    "x86_64": 321,
    "amd64": 321,
    "i386": 357,
    "i686": 357,
    "aarch64": 280,
    "arm64": 280,
    "riscv64": 280,
    "loongarch64": 280,
    "armv7l": 386,
    "armv6l": 386,
    "ppc64le": 361,
    "ppc64": 361,
    "s390x": 351,
}


class Cmd:
    """enum bpf_cmd (include/uapi/linux/bpf.h)."""

    MAP_CREATE = 0
    MAP_LOOKUP_ELEM = 1
    MAP_UPDATE_ELEM = 2
    MAP_DELETE_ELEM = 3
    MAP_GET_NEXT_KEY = 4
    PROG_LOAD = 5
    OBJ_PIN = 6
    OBJ_GET = 7
    OBJ_GET_INFO_BY_FD = 15
    LINK_CREATE = 28

    @classmethod
    def name(cls, cmd):
        for key, value in vars(cls).items():
            if key.isupper() and value == cmd:
                return "BPF_" + key
        return f"bpf command {cmd}"


class MapType:
    """enum bpf_map_type (the ones the project uses)."""

    HASH = 1
    ARRAY = 2
    PROG_ARRAY = 3
    PERCPU_HASH = 5
    PERCPU_ARRAY = 6
    LRU_HASH = 9
    LPM_TRIE = 11


class ProgType:
    """enum bpf_prog_type (the ones the project uses)."""

    SOCKET_FILTER = 1
    SCHED_CLS = 3
    SCHED_ACT = 4
    XDP = 6


class AttachType:
    """enum bpf_attach_type (the ones the project uses)."""

    TCX_INGRESS = 46
    TCX_EGRESS = 47


# tc action verdicts a SCHED_CLS program in direct-action mode returns.
TC_ACT_OK = 0
TC_ACT_SHOT = 2


class MapCreateAttr(ctypes.Structure):
    """BPF_MAP_CREATE."""

    _fields_ = [
        ("map_type", ctypes.c_uint32),
        ("key_size", ctypes.c_uint32),
        ("value_size", ctypes.c_uint32),
        ("max_entries", ctypes.c_uint32),
        ("map_flags", ctypes.c_uint32),
        ("inner_map_fd", ctypes.c_uint32),
        ("numa_node", ctypes.c_uint32),
        ("map_name", ctypes.c_char * BPF_OBJ_NAME_LEN),
        ("map_ifindex", ctypes.c_uint32),
        ("btf_fd", ctypes.c_uint32),
        ("btf_key_type_id", ctypes.c_uint32),
        ("btf_value_type_id", ctypes.c_uint32),
        ("btf_vmlinux_value_type_id", ctypes.c_uint32),
        ("map_extra", ctypes.c_uint64),
    ]


class ProgLoadAttr(ctypes.Structure):
    """BPF_PROG_LOAD (up to expected_attach_type; later fields stay zero)."""

    _fields_ = [
        ("prog_type", ctypes.c_uint32),
        ("insn_cnt", ctypes.c_uint32),
        ("insns", ctypes.c_uint64),
        ("license", ctypes.c_uint64),
        ("log_level", ctypes.c_uint32),
        ("log_size", ctypes.c_uint32),
        ("log_buf", ctypes.c_uint64),
        ("kern_version", ctypes.c_uint32),
        ("prog_flags", ctypes.c_uint32),
        ("prog_name", ctypes.c_char * BPF_OBJ_NAME_LEN),
        ("prog_ifindex", ctypes.c_uint32),
        ("expected_attach_type", ctypes.c_uint32),
    ]


class LinkCreateAttr(ctypes.Structure):
    """BPF_LINK_CREATE, with the tcx member of its trailing union."""

    _fields_ = [
        ("prog_fd", ctypes.c_uint32),
        ("target_ifindex", ctypes.c_uint32),
        ("attach_type", ctypes.c_uint32),
        ("flags", ctypes.c_uint32),
        ("relative_fd", ctypes.c_uint32),
        ("_pad", ctypes.c_uint32),
        ("expected_revision", ctypes.c_uint64),
    ]


class MapElemAttr(ctypes.Structure):
    """BPF_MAP_LOOKUP_ELEM / UPDATE_ELEM / DELETE_ELEM / GET_NEXT_KEY (value doubles as next_key)."""

    _fields_ = [
        ("map_fd", ctypes.c_uint32),
        ("_pad", ctypes.c_uint32),
        ("key", ctypes.c_uint64),
        ("value", ctypes.c_uint64),
        ("flags", ctypes.c_uint64),
    ]


class ObjAttr(ctypes.Structure):
    """BPF_OBJ_PIN / BPF_OBJ_GET."""

    _fields_ = [
        ("pathname", ctypes.c_uint64),
        ("bpf_fd", ctypes.c_uint32),
        ("file_flags", ctypes.c_uint32),
    ]


class InfoByFdAttr(ctypes.Structure):
    """BPF_OBJ_GET_INFO_BY_FD."""

    _fields_ = [
        ("bpf_fd", ctypes.c_uint32),
        ("info_len", ctypes.c_uint32),
        ("info", ctypes.c_uint64),
    ]


class ProgInfo(ctypes.Structure):
    """Head of struct bpf_prog_info: the kernel fills only as much as info_len asks for."""

    _fields_ = [
        ("type", ctypes.c_uint32),
        ("id", ctypes.c_uint32),
        ("tag", ctypes.c_ubyte * 8),
        ("jited_prog_len", ctypes.c_uint32),
        ("xlated_prog_len", ctypes.c_uint32),
    ]


class MapInfo(ctypes.Structure):
    """Head of struct bpf_map_info."""

    _fields_ = [
        ("type", ctypes.c_uint32),
        ("id", ctypes.c_uint32),
        ("key_size", ctypes.c_uint32),
        ("value_size", ctypes.c_uint32),
        ("max_entries", ctypes.c_uint32),
        ("map_flags", ctypes.c_uint32),
        ("name", ctypes.c_char * BPF_OBJ_NAME_LEN),
    ]


class BpfAttr(ctypes.Union):
    """union bpf_attr, always BPF_ATTR_SIZE bytes; ctypes zero-fills it on creation."""

    _fields_ = [
        ("map_create", MapCreateAttr),
        ("prog_load", ProgLoadAttr),
        ("link_create", LinkCreateAttr),
        ("map_elem", MapElemAttr),
        ("obj", ObjAttr),
        ("info_by_fd", InfoByFdAttr),
        ("raw", ctypes.c_ubyte * BPF_ATTR_SIZE),
    ]


class BpfError(OSError):
    """A failed bpf(2) command; ``errno`` is set, ``log`` holds the verifier log if any."""

    def __init__(self, err, cmd, what="", log=""):
        self.cmd = cmd
        self.log = log
        text = f"{Cmd.name(cmd)}{' (' + what + ')' if what else ''}: {os.strerror(err)}"
        if log:
            text += f"; verifier log: {log.strip()[-500:]}"
        super().__init__(err, text)

    def __str__(self):
        return str(self.strerror)


_LIBC = None


def _syscall():
    global _LIBC
    if _LIBC is None:
        _LIBC = ctypes.CDLL(None, use_errno=True)
        _LIBC.syscall.restype = ctypes.c_long
    return _LIBC.syscall


def syscall_number(machine=None):
    """The bpf(2) number for ``machine`` (default: this host), or None if unknown."""
    return SYS_BPF.get(machine or platform.machine())


def bpf(cmd, attr, what=""):
    """Issue ``bpf(cmd, &attr, sizeof(attr))``; returns the non-negative result.

    Raises BpfError with errno (ENOSYS on an architecture this file does not know).
    """
    nr = syscall_number()
    if nr is None:
        raise BpfError(errno.ENOSYS, cmd, f"unknown architecture {platform.machine()}")
    ret = _syscall()(ctypes.c_long(nr), ctypes.c_int(cmd), ctypes.byref(attr), ctypes.c_uint(ctypes.sizeof(attr)))
    if ret < 0:
        raise BpfError(ctypes.get_errno(), cmd, what)
    return ret


def close(fd):
    """Close a BPF object fd (a map, program or link is freed when its last fd goes)."""
    os.close(fd)


class BpfFd(int):
    """An fd that closes itself at the end of a ``with`` block."""

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        close(int(self))
        return False


def _name(name):
    data = name.encode() if isinstance(name, str) else bytes(name)
    if len(data) >= BPF_OBJ_NAME_LEN:
        raise ValueError(f"BPF object name {name!r} is longer than {BPF_OBJ_NAME_LEN - 1} bytes")
    return data


def map_create(map_type, key_size, value_size, max_entries, flags=0, name=""):
    """Create a map; returns its fd (a :class:`BpfFd`)."""
    attr = BpfAttr()
    a = attr.map_create
    a.map_type = map_type
    a.key_size = key_size
    a.value_size = value_size
    a.max_entries = max_entries
    a.map_flags = flags
    a.map_name = _name(name)
    return BpfFd(bpf(Cmd.MAP_CREATE, attr, f"map type {map_type}"))


# --- instructions ------------------------------------------------------------------------
# struct bpf_insn { u8 code; u8 dst_reg:4, src_reg:4; s16 off; s32 imm; }

BPF_ALU64 = 0x07
BPF_JMP = 0x05
BPF_MOV = 0xB0
BPF_EXIT = 0x90
BPF_K = 0x00
BPF_INSN_SIZE = 8


def insn(code, dst=0, src=0, off=0, imm=0):
    """Encode one instruction (register nibbles follow the host bitfield order)."""
    low, high = (dst, src) if sys.byteorder == "little" else (src, dst)
    regs = (high & 0xF) << 4 | (low & 0xF)
    return struct.pack("=BBhi", code, regs, off, imm)


def mov64_imm(dst, imm):
    return insn(BPF_ALU64 | BPF_MOV | BPF_K, dst=dst, imm=imm)


def exit_insn():
    return insn(BPF_JMP | BPF_EXIT)


def return_imm(value):
    """``r0 = value; exit`` — the smallest valid program."""
    return mov64_imm(0, value) + exit_insn()


def prog_load(prog_type, insns, license="GPL", name="", expected_attach_type=0, log_size=0):
    """Load a program from raw instructions; returns its fd (a :class:`BpfFd`).

    With ``log_size`` > 0 a failed load is retried once with the verifier log on, and the log
    is put into the BpfError.
    """
    insns = bytes(insns)
    if not insns or len(insns) % BPF_INSN_SIZE:
        raise ValueError(f"instructions must be a non-empty multiple of {BPF_INSN_SIZE} bytes, got {len(insns)}")
    insn_buf = ctypes.create_string_buffer(insns, len(insns))
    license_buf = ctypes.create_string_buffer(license.encode())

    def attempt(log_buf=None):
        attr = BpfAttr()
        a = attr.prog_load
        a.prog_type = prog_type
        a.insn_cnt = len(insns) // BPF_INSN_SIZE
        a.insns = ctypes.addressof(insn_buf)
        a.license = ctypes.addressof(license_buf)
        a.prog_name = _name(name)
        a.expected_attach_type = expected_attach_type
        if log_buf is not None:
            a.log_level = 1
            a.log_size = len(log_buf)
            a.log_buf = ctypes.addressof(log_buf)
        return BpfFd(bpf(Cmd.PROG_LOAD, attr, f"program type {prog_type}"))

    try:
        return attempt()
    except BpfError as exc:
        if log_size <= 0:
            raise
        first = exc
    log_buf = ctypes.create_string_buffer(log_size)
    try:
        return attempt(log_buf)
    except BpfError as exc:
        log = log_buf.value.decode(errors="replace")
        raise BpfError(exc.errno, Cmd.PROG_LOAD, f"program type {prog_type}", log) from first


def link_create(prog_fd, target_ifindex, attach_type, flags=0):
    """Attach ``prog_fd`` through a BPF link (e.g. tcx); returns the link fd (a :class:`BpfFd`).

    The attachment lives as long as the link fd (or a pin of it).
    """
    attr = BpfAttr()
    a = attr.link_create
    a.prog_fd = prog_fd
    a.target_ifindex = target_ifindex
    a.attach_type = attach_type
    a.flags = flags
    return BpfFd(bpf(Cmd.LINK_CREATE, attr, f"attach type {attach_type} on ifindex {target_ifindex}"))


def prog_info(prog_fd):
    """The head of bpf_prog_info for a loaded program (type, id, tag, jited and xlated sizes)."""
    info = ProgInfo()
    attr = BpfAttr()
    attr.info_by_fd.bpf_fd = prog_fd
    attr.info_by_fd.info_len = ctypes.sizeof(info)
    attr.info_by_fd.info = ctypes.addressof(info)
    bpf(Cmd.OBJ_GET_INFO_BY_FD, attr, "program info")
    return info


def obj_get(path, read_only=False):
    """Open a pinned BPF object (map, program, link) by its bpffs path; returns a :class:`BpfFd`."""
    path_buf = ctypes.create_string_buffer(os.fsencode(path))
    attr = BpfAttr()
    attr.obj.pathname = ctypes.addressof(path_buf)
    attr.obj.file_flags = 1 if read_only else 0  # BPF_F_RDONLY
    return BpfFd(bpf(Cmd.OBJ_GET, attr, str(path)))


def map_info(map_fd):
    """The head of bpf_map_info of a map fd (type, id, key/value size, max_entries, flags, name)."""
    info = MapInfo()
    attr = BpfAttr()
    attr.info_by_fd.bpf_fd = map_fd
    attr.info_by_fd.info_len = ctypes.sizeof(info)
    attr.info_by_fd.info = ctypes.addressof(info)
    bpf(Cmd.OBJ_GET_INFO_BY_FD, attr, "map info")
    return info


# BPF_MAP_UPDATE_ELEM flags
BPF_ANY = 0
BPF_NOEXIST = 1
BPF_EXIST = 2


def _elem_attr(map_fd, key_buf, value_buf=None, flags=0):
    attr = BpfAttr()
    a = attr.map_elem
    a.map_fd = map_fd
    a.key = ctypes.addressof(key_buf) if key_buf is not None else 0
    a.value = ctypes.addressof(value_buf) if value_buf is not None else 0
    a.flags = flags
    return attr


def map_lookup(map_fd, key, value_size):
    """The value stored under ``key`` (bytes of ``value_size``), or None when there is none.

    ``value_size`` is the map's value size (times the possible CPUs, rounded up to 8, for per-CPU maps).
    """
    key_buf = ctypes.create_string_buffer(bytes(key), len(key))
    value_buf = ctypes.create_string_buffer(value_size)
    try:
        bpf(Cmd.MAP_LOOKUP_ELEM, _elem_attr(map_fd, key_buf, value_buf), "lookup")
    except BpfError as exc:
        if exc.errno == errno.ENOENT:
            return None
        raise
    return value_buf.raw


def map_update(map_fd, key, value, flags=BPF_ANY):
    """Store ``value`` under ``key`` (``flags``: BPF_ANY, BPF_NOEXIST or BPF_EXIST)."""
    key_buf = ctypes.create_string_buffer(bytes(key), len(key))
    value_buf = ctypes.create_string_buffer(bytes(value), len(value))
    bpf(Cmd.MAP_UPDATE_ELEM, _elem_attr(map_fd, key_buf, value_buf, flags), "update")


def map_delete(map_fd, key):
    """Delete ``key``; True when it was there, False when it was not."""
    key_buf = ctypes.create_string_buffer(bytes(key), len(key))
    try:
        bpf(Cmd.MAP_DELETE_ELEM, _elem_attr(map_fd, key_buf), "delete")
    except BpfError as exc:
        if exc.errno == errno.ENOENT:
            return False
        raise
    return True


def map_keys(map_fd, key_size):
    """Every key of a map (bytes), by BPF_MAP_GET_NEXT_KEY from the start.

    Keys deleted or added while iterating may be missed or seen twice, as with any walk of a live map.
    """
    next_buf = ctypes.create_string_buffer(key_size)
    key_buf = None  # NULL key: the first key
    while True:
        try:
            bpf(Cmd.MAP_GET_NEXT_KEY, _elem_attr(map_fd, key_buf, next_buf), "get next key")
        except BpfError as exc:
            if exc.errno == errno.ENOENT:
                return
            raise
        key = next_buf.raw
        yield key
        key_buf = ctypes.create_string_buffer(key, key_size)
