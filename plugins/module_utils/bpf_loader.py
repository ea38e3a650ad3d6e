# -*- coding: utf-8 -*-
# Copyright: clustermesh.core contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""Build, load and attach the service datapath (``bpf/lb.c``) with libbpf through ctypes.

* :func:`build` runs bpftool (vmlinux.h from the running kernel's BTF) and clang, like ``make -C bpf``.
* :func:`load` opens the object with ``pin_root_path`` = the node's pin root, so the maps are created
  and pinned by name on first load and reused afterwards (state survives reloads and the agent);
  pins whose layout no longer matches :mod:`.bpf_maps` are removed first (``remove_stale``).
* :meth:`Datapath.attach` puts ``from_pod`` on the ingress and ``to_pod`` on the egress of a pod's
  host-side veth (clsact + cls_bpf direct-action, fixed handle and priority); an existing clsact is
  fine, an existing filter of ours is replaced in place (``BPF_TC_F_REPLACE``), so reattaching
  hot-swaps the programs and keeps the maps. :func:`detach` removes our two filters.

Everything acts on the calling process's network and mount namespaces: run it inside the node
(``nsenter`` of the node's net+mount namespaces, e.g. ``tools/lab exec``), never through
``ip netns exec`` (it remounts /sys and the pins would land in a throwaway bpffs).

No Ansible imports: shared by the modules and the node agent.
"""

from __future__ import annotations

import ctypes
import errno
import os
import shutil
import socket
import subprocess

from . import bpf_syscall
from .bpf_maps import MAPS, PIN_ROOT

LIBBPF = "libbpf.so.1"
PROGRAMS = {"ingress": "from_pod", "egress": "to_pod"}
TC_HANDLE = 0xC1A5  # our cls_bpf filters: this handle at TC_PRIORITY on both hooks
TC_PRIORITY = 0xC1
BPF_TC_INGRESS = 1
BPF_TC_EGRESS = 2
BPF_TC_F_REPLACE = 1
_ATTACH_POINTS = {"ingress": BPF_TC_INGRESS, "egress": BPF_TC_EGRESS}


class LoaderError(RuntimeError):
    """Building, loading or attaching failed; the message says what and how to fix it."""


# --- build --------------------------------------------------------------------------------------


def build(source_dir, out_dir, clang="clang", bpftool="bpftool", vmlinux_btf="/sys/kernel/btf/vmlinux"):
    """Compile ``<source_dir>/lb.c`` into ``<out_dir>/lb.o`` (vmlinux.h made in out_dir); returns the path.

    The same commands as ``make -C bpf``. Raises LoaderError naming a missing tool or the compiler error.
    """
    for tool, package in ((clang, "clang"), (bpftool, "bpftool")):
        if not shutil.which(tool):
            raise LoaderError(f"{tool} not found: install the Debian package {package} to build the datapath")
    if not os.path.exists(vmlinux_btf):
        raise LoaderError(f"{vmlinux_btf} is missing: the kernel needs CONFIG_DEBUG_INFO_BTF for the datapath")
    os.makedirs(out_dir, exist_ok=True)
    vmlinux_h = os.path.join(out_dir, "vmlinux.h")
    obj = os.path.join(out_dir, "lb.o")
    if not os.path.exists(vmlinux_h):
        dump = subprocess.run(
            [bpftool, "btf", "dump", "file", vmlinux_btf, "format", "c"], capture_output=True, check=False
        )
        if dump.returncode != 0:
            raise LoaderError(f"bpftool btf dump failed: {dump.stderr.decode(errors='replace').strip()}")
        with open(vmlinux_h + ".tmp", "wb") as f:
            f.write(dump.stdout)
        os.replace(vmlinux_h + ".tmp", vmlinux_h)
    cmd = [clang, "-O2", "-g", "-Wall", "-target", "bpf", "-I", out_dir, "-I", os.path.join(source_dir, "include"),
           "-c", os.path.join(source_dir, "lb.c"), "-o", obj]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise LoaderError(f"clang failed to build {source_dir}/lb.c:\n{proc.stderr.strip()}")
    return obj


# --- libbpf through ctypes ----------------------------------------------------------------------


class _OpenOpts(ctypes.Structure):
    """struct bpf_object_open_opts (libbpf 1.x)."""

    _fields_ = [
        ("sz", ctypes.c_size_t),
        ("object_name", ctypes.c_char_p),
        ("relaxed_maps", ctypes.c_bool),
        ("pin_root_path", ctypes.c_char_p),
        ("_attach_prog_fd", ctypes.c_uint32),
        ("kconfig", ctypes.c_char_p),
        ("btf_custom_path", ctypes.c_char_p),
        ("kernel_log_buf", ctypes.c_char_p),
        ("kernel_log_size", ctypes.c_size_t),
        ("kernel_log_level", ctypes.c_uint32),
    ]


class _TcHook(ctypes.Structure):
    """struct bpf_tc_hook."""

    _fields_ = [
        ("sz", ctypes.c_size_t),
        ("ifindex", ctypes.c_int),
        ("attach_point", ctypes.c_int),
        ("parent", ctypes.c_uint32),
    ]


class _TcOpts(ctypes.Structure):
    """struct bpf_tc_opts."""

    _fields_ = [
        ("sz", ctypes.c_size_t),
        ("prog_fd", ctypes.c_int),
        ("flags", ctypes.c_uint32),
        ("prog_id", ctypes.c_uint32),
        ("handle", ctypes.c_uint32),
        ("priority", ctypes.c_uint32),
    ]


_LIB = None


def libbpf():
    """The libbpf.so.1 handle with the signatures used here; LoaderError if it is not installed."""
    global _LIB
    if _LIB is None:
        try:
            lib = ctypes.CDLL(LIBBPF, use_errno=True)
        except OSError as exc:
            raise LoaderError(f"cannot load {LIBBPF} ({exc}): install the Debian package libbpf1") from exc
        vp, cp = ctypes.c_void_p, ctypes.c_char_p
        for name, restype, argtypes in (
            ("bpf_object__open_file", vp, [cp, ctypes.POINTER(_OpenOpts)]),
            ("bpf_object__load", ctypes.c_int, [vp]),
            ("bpf_object__close", None, [vp]),
            ("bpf_object__find_program_by_name", vp, [vp, cp]),
            ("bpf_program__fd", ctypes.c_int, [vp]),
            ("bpf_program__set_type", ctypes.c_int, [vp, ctypes.c_int]),
            ("bpf_tc_hook_create", ctypes.c_int, [ctypes.POINTER(_TcHook)]),
            ("bpf_tc_attach", ctypes.c_int, [ctypes.POINTER(_TcHook), ctypes.POINTER(_TcOpts)]),
            ("bpf_tc_detach", ctypes.c_int, [ctypes.POINTER(_TcHook), ctypes.POINTER(_TcOpts)]),
            ("bpf_tc_query", ctypes.c_int, [ctypes.POINTER(_TcHook), ctypes.POINTER(_TcOpts)]),
        ):
            func = getattr(lib, name)
            func.restype, func.argtypes = restype, argtypes
        _LIB = lib
    return _LIB


def _ifindex(interface):
    if isinstance(interface, int):
        return interface
    try:
        return socket.if_nametoindex(interface)
    except OSError:
        raise LoaderError(f"no interface {interface} in this network namespace") from None


def _hook(ifindex, point):
    return _TcHook(sz=ctypes.sizeof(_TcHook), ifindex=ifindex, attach_point=_ATTACH_POINTS[point])


def _opts(**kwargs):
    return _TcOpts(sz=ctypes.sizeof(_TcOpts), handle=TC_HANDLE, priority=TC_PRIORITY, **kwargs)


def _fail(what, ret):
    err = -ret if ret < 0 else ctypes.get_errno()
    return LoaderError(f"{what}: {os.strerror(err)} (errno {err})")


# --- stale pins ---------------------------------------------------------------------------------


def stale_pins(pin_root=PIN_ROOT):
    """Names of pinned maps under ``pin_root`` whose type, sizes or max_entries differ from bpf_maps."""
    stale = []
    for name, spec in MAPS.items():
        path = os.path.join(pin_root, name)
        if not os.path.exists(path):
            continue
        try:
            with bpf_syscall.obj_get(path) as fd:
                info = bpf_syscall.map_info(fd)
        except bpf_syscall.BpfError:
            stale.append(name)
            continue
        found = (info.type, info.key_size, info.value_size, info.max_entries, info.map_flags)
        if found != (spec.map_type, spec.key.size, spec.value.size, spec.max_entries, spec.flags):
            stale.append(name)
    return stale


# --- load / attach ------------------------------------------------------------------------------


class Datapath:
    """A loaded lb.o (programs in the kernel, maps pinned); attach it to veths, then close()."""

    def __init__(self, obj, object_path, pin_root):
        self._obj = obj
        self.object_path = object_path
        self.pin_root = pin_root
        self.program_fds = {}
        lib = libbpf()
        for name in PROGRAMS.values():
            prog = lib.bpf_object__find_program_by_name(obj, name.encode())
            if not prog:
                self.close()
                raise LoaderError(f"{object_path} has no program {name}: rebuild it from bpf/lb.c")
            self.program_fds[name] = lib.bpf_program__fd(prog)

    def attach(self, interface):
        """from_pod on ingress, to_pod on egress of ``interface`` (name or ifindex); replaces ours.

        Returns {"ingress": program id, "egress": program id}.
        """
        lib = libbpf()
        ifindex = _ifindex(interface)
        ids = {}
        for point, name in PROGRAMS.items():
            hook = _hook(ifindex, point)
            ret = lib.bpf_tc_hook_create(ctypes.byref(hook))
            if ret < 0 and ret != -errno.EEXIST:
                raise _fail(f"creating the clsact qdisc on {interface}", ret)
            opts = _opts(prog_fd=self.program_fds[name], flags=BPF_TC_F_REPLACE)
            ret = lib.bpf_tc_attach(ctypes.byref(hook), ctypes.byref(opts))
            if ret < 0:
                raise _fail(f"attaching {name} to the {point} of {interface}", ret)
            ids[point] = opts.prog_id
        return ids

    def close(self):
        """Release the object (attached programs and pinned maps stay)."""
        if self._obj:
            libbpf().bpf_object__close(self._obj)
            self._obj = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
        return False


def load(object_path, pin_root=PIN_ROOT, remove_stale=True):
    """Load lb.o: maps pinned by name under ``pin_root`` (reused if present), programs verified.

    Pins whose layout differs from bpf_maps are removed first when ``remove_stale`` (else LoaderError).
    """
    if not os.path.isfile(object_path):
        raise LoaderError(f"{object_path} does not exist: build it first (make bpf, or bpf_loader.build)")
    os.makedirs(pin_root, exist_ok=True)
    stale = stale_pins(pin_root)
    if stale and not remove_stale:
        raise LoaderError(f"pinned maps {', '.join(stale)} under {pin_root} have another layout; remove them")
    for name in stale:
        os.unlink(os.path.join(pin_root, name))
    lib = libbpf()
    opts = _OpenOpts(sz=ctypes.sizeof(_OpenOpts), pin_root_path=os.fsencode(pin_root))
    obj = lib.bpf_object__open_file(os.fsencode(object_path), ctypes.byref(opts))
    if not obj:
        raise _fail(f"opening {object_path}", 0)
    # libbpf 1.1 knows the section "tc" but not "tc/<name>" (one program per section, as tc needs)
    for name in PROGRAMS.values():
        prog = lib.bpf_object__find_program_by_name(obj, name.encode())
        if not prog:
            lib.bpf_object__close(obj)
            raise LoaderError(f"{object_path} has no program {name}: rebuild it from bpf/lb.c")
        lib.bpf_program__set_type(prog, bpf_syscall.ProgType.SCHED_CLS)
    ret = lib.bpf_object__load(obj)
    if ret < 0:
        lib.bpf_object__close(obj)
        raise _fail(f"loading {object_path} (the verifier log is on stderr)", ret)
    return Datapath(obj, object_path, pin_root)


def attach(interface, object_path, pin_root=PIN_ROOT):
    """Load lb.o and attach it to one interface (see :meth:`Datapath.attach`)."""
    with load(object_path, pin_root) as datapath:
        return datapath.attach(interface)


def attached(interface):
    """{"ingress": program id or None, "egress": ...}: our filters on ``interface``."""
    lib = libbpf()
    ifindex = _ifindex(interface)
    out = {}
    for point in PROGRAMS:
        opts = _opts()
        ret = lib.bpf_tc_query(ctypes.byref(_hook(ifindex, point)), ctypes.byref(opts))
        if ret in (-errno.ENOENT, -errno.EINVAL):
            out[point] = None
        elif ret < 0:
            raise _fail(f"querying the {point} of {interface}", ret)
        else:
            out[point] = opts.prog_id
    return out


def detach(interface):
    """Remove our two filters from ``interface``; True if one was there. The clsact qdisc stays."""
    lib = libbpf()
    ifindex = _ifindex(interface)
    removed = False
    for point in PROGRAMS:
        ret = lib.bpf_tc_detach(ctypes.byref(_hook(ifindex, point)), ctypes.byref(_opts()))
        if ret == 0:
            removed = True
        elif ret not in (-errno.ENOENT, -errno.EINVAL):
            raise _fail(f"detaching from the {point} of {interface}", ret)
    return removed
