# -*- coding: utf-8 -*-
# Copyright: clustermesh.core contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""Detect, by trying, which kernel features the mesh can use on this host.

Nothing here guesses from kernel versions: every probe makes the kernel do the thing (create a
VXLAN link, load and attach a BPF program, add an ESP state, ...) and reports what happened.

Probes that create kernel state run in a *scratch* network namespace: a forked child calls
``unshare(CLONE_NEWNET)``, runs them, sends the results back through a pipe as JSON and exits,
which destroys the namespace with everything made in it.  The host's own network namespace is
only read (addresses, routes, sysctls), never changed.

Every feature is reported as ``{"available": bool, "detail": str}`` (some add a ``value`` or a
``size``); a probe that fails for any reason reports the feature unavailable with the error text.

This file imports nothing from Ansible: it is shared by the modules and the node agent.
pyroute2 is imported lazily, only by the probes that need it.
"""

from __future__ import annotations

import ctypes
import errno
import ipaddress
import json
import os
import select
import shutil
import signal
import socket
import struct
import subprocess
import time

from . import bpf_syscall

CLONE_NEWNET = 0x40000000

# Probe groups (what the ``probes`` option selects) and the features each one reports.
PROBE_GROUPS = {
    "vxlan": ("vxlan",),
    "geneve": ("geneve",),
    "wireguard": ("wireguard",),
    "bpf": ("bpf",),
    "bpf_jit": ("bpf_jit",),
    "btf": ("btf",),
    "tc_bpf": ("tc_clsact", "tc_bpf"),
    "tcx": ("tcx",),
    "xfrm": ("xfrm",),
    "esp": ("esp", "esp_gcm_aes", "esp_cbc_aes_hmac_sha256"),
    "nftables": ("nft_binary", "nftables", "nftables_nat"),
    "ip_forward": ("ip_forward",),
}
# Not a feature, but selectable: the host's own addresses and default routes.
UNDERLAY = "underlay"
ALL_PROBES = tuple(PROBE_GROUPS) + (UNDERLAY,)
# Groups that run in the scratch network namespace.
SCRATCH_GROUPS = ("vxlan", "geneve", "wireguard", "tc_bpf", "tcx", "xfrm", "esp", "nftables")

PROC_BPF_JIT = "/proc/sys/net/core/bpf_jit_enable"
PROC_IP_FORWARD = "/proc/sys/net/ipv4/ip_forward"
SYS_BTF_VMLINUX = "/sys/kernel/btf/vmlinux"
BTF_MAGIC = 0xEB9F

DEFAULT_TIMEOUT = 30.0
COMMAND_TIMEOUT = 10.0
# Directories searched for ip/nft besides $PATH (modules often run with a short PATH).
SBIN_DIRS = ("/usr/local/sbin", "/usr/sbin", "/sbin", "/usr/local/bin", "/usr/bin", "/bin")

# ESP states tried in the scratch namespace.  Keys are all zeros: they protect nothing, and
# they are never logged; reports carry only the algorithm names and the kernel's error.
ESP_SRC = "198.18.255.1"
ESP_DST = "198.18.255.2"
ESP_VARIANTS = (
    ("esp_gcm_aes", 0x100, "aead rfc4106(gcm(aes)) 128", ["aead", "rfc4106(gcm(aes))", "0x" + "00" * 20, "128"]),
    (
        "esp_cbc_aes_hmac_sha256",
        0x101,
        "enc cbc(aes) + auth-trunc hmac(sha256) 128",
        ["enc", "cbc(aes)", "0x" + "00" * 16, "auth-trunc", "hmac(sha256)", "0x" + "00" * 32, "128"],
    ),
)

NFT_TABLE = "cm_probe"
PROBE_DEV = "cm_probe"


class ProbeError(Exception):
    """A probe could not run (as opposed to: it ran and the feature is missing)."""


# --- results ------------------------------------------------------------------------------


def feature(available, detail, **extra):
    """One feature's result."""
    result = {"available": bool(available), "detail": str(detail)}
    result.update(extra)
    return result


def failed(exc, what=""):
    """A feature that could not be probed: unavailable, with the error text."""
    prefix = f"{what}: " if what else ""
    return feature(False, f"{prefix}probe failed: {describe_error(exc)}")


def errno_name(code):
    if code == errno.EOPNOTSUPP:
        return "EOPNOTSUPP"  # Python names 95 ENOTSUP, the kernel's own name is EOPNOTSUPP
    return errno.errorcode.get(code, f"errno {code}")


def describe_error(exc):
    """Readable text for an exception from the OS, bpf(2) or pyroute2 (NetlinkError)."""
    if isinstance(exc, bpf_syscall.BpfError):
        return f"{exc} ({errno_name(exc.errno)})"
    if isinstance(exc, OSError) and exc.errno:
        return f"{exc.strerror or os.strerror(exc.errno)} ({errno_name(exc.errno)})"
    code = getattr(exc, "code", None)
    if isinstance(code, int) and code > 0:  # pyroute2 NetlinkError(code, message)
        message = exc.args[1] if len(exc.args) > 1 else os.strerror(code)
        return f"{message} ({errno_name(code)})"
    return str(exc) or type(exc).__name__


def summarize(probes):
    """Flat ``{name: bool}`` and the sorted list of unavailable feature names."""
    flat = {name: bool(result.get("available")) for name, result in sorted(probes.items())}
    missing = sorted(name for name, ok in flat.items() if not ok)
    return flat, missing


def select_groups(probes=None):
    """Validate a probe selection; returns (feature groups in canonical order, underlay wanted).

    ``None``, an empty list or ``["all"]`` select everything.
    """
    wanted = list(probes or ["all"])
    unknown = sorted(set(wanted) - set(ALL_PROBES) - {"all"})
    if unknown:
        raise ValueError(f"unknown probe(s) {', '.join(unknown)}; choose from: all, {', '.join(ALL_PROBES)}")
    if "all" in wanted:
        return list(PROBE_GROUPS), True
    return [g for g in PROBE_GROUPS if g in wanted], UNDERLAY in wanted


# --- helpers ------------------------------------------------------------------------------


def find_binary(name):
    """Absolute path of ``name`` in $PATH or the usual sbin directories, or None."""
    path = os.environ.get("PATH", "")
    return shutil.which(name, path=os.pathsep.join([path, *SBIN_DIRS]) if path else os.pathsep.join(SBIN_DIRS))


def run_command(argv, timeout=COMMAND_TIMEOUT):
    """Run a command; returns (ok, message) with the command's error output on failure."""
    try:
        proc = subprocess.run(
            argv,
            stdin=subprocess.DEVNULL,
            capture_output=True,
            timeout=timeout,
            check=False,
        )
    except subprocess.TimeoutExpired:
        return False, f"timed out after {timeout:g}s"
    except OSError as exc:
        return False, describe_error(exc)
    if proc.returncode == 0:
        return True, ""
    text = (proc.stderr or proc.stdout).decode(errors="replace").strip()
    return False, " ".join(text.split()) or f"exit status {proc.returncode}"


def read_text(path):
    with open(path, encoding="ascii") as handle:
        return handle.read().strip()


def unshare(flags):
    """unshare(2) through libc (Python 3.11 has no os.unshare)."""
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.unshare(ctypes.c_int(flags)) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))


# --- host probes (read only, or self-cleaning fds) ----------------------------------------


def kernel_info():
    uname = os.uname()
    return {"release": uname.release, "version": uname.version, "machine": uname.machine}


def probe_bpf():
    """bpf(2) usable: create (and close) a one-entry array map."""
    try:
        with bpf_syscall.map_create(bpf_syscall.MapType.ARRAY, 4, 8, 1, name="cm_probe"):
            pass
    except (OSError, ValueError) as exc:
        return feature(False, f"bpf(BPF_MAP_CREATE) of an array map failed: {describe_error(exc)}")
    return feature(True, "bpf(BPF_MAP_CREATE) of a 1-entry array map succeeded")


def probe_bpf_jit(path=PROC_BPF_JIT):
    """The JIT is on when a freshly loaded program comes back JIT-compiled.

    The sysctl net.core.bpf_jit_enable is only visible in the initial network namespace, so the
    load is the test that works on every node; the sysctl value is added when it can be read.
    """
    try:
        raw = read_text(path)
        value = int(raw)
    except (OSError, ValueError):
        value = None
    try:
        with bpf_syscall.prog_load(bpf_syscall.ProgType.SCHED_CLS, bpf_syscall.return_imm(0), name="cm_probe") as fd:
            jited = bpf_syscall.prog_info(fd).jited_prog_len
    except (OSError, ValueError) as exc:
        if value is not None:
            return feature(value in (1, 2), f"net.core.bpf_jit_enable = {value}", value=value)
        return feature(False, f"could not load a probe program to check the JIT: {describe_error(exc)}", value=None)
    if jited:
        return feature(True, f"a probe program was JIT-compiled ({jited} bytes of machine code)", value=value)
    return feature(False, "a probe program was not JIT-compiled: programs are interpreted", value=value)


def probe_btf(path=SYS_BTF_VMLINUX):
    """Kernel BTF readable and starting with the BTF magic (CO-RE programs need it)."""
    try:
        with open(path, "rb") as handle:
            head = handle.read(4)
        size = os.stat(path).st_size
    except OSError as exc:
        return feature(False, f"{path} not readable: {describe_error(exc)}", size=0)
    if len(head) < 2 or struct.unpack("<H", head[:2])[0] != BTF_MAGIC:
        return feature(False, f"{path} does not start with the BTF magic 0x{BTF_MAGIC:x}", size=size)
    return feature(True, f"{path} readable, {size} bytes", size=size)


def probe_ip_forward(path=PROC_IP_FORWARD):
    """net.ipv4.ip_forward of the host's own namespace (a setting: available = enabled)."""
    try:
        value = int(read_text(path))
    except (OSError, ValueError) as exc:
        return feature(False, f"cannot read {path}: {describe_error(exc)}", value=None)
    if value == 1:
        return feature(True, "net.ipv4.ip_forward = 1", value=value)
    return feature(False, f"net.ipv4.ip_forward = {value}: forwarding is off (routing turns it on)", value=value)


def probe_nft_binary():
    path = find_binary("nft")
    if path:
        return feature(True, f"nft found at {path}", path=path)
    return feature(False, "nft binary not found (Debian package nftables)", path=None)


HOST_PROBES = {
    "bpf": lambda: {"bpf": probe_bpf()},
    "bpf_jit": lambda: {"bpf_jit": probe_bpf_jit()},
    "btf": lambda: {"btf": probe_btf()},
    "ip_forward": lambda: {"ip_forward": probe_ip_forward()},
    "nftables": lambda: {"nft_binary": probe_nft_binary()},
}


# --- scratch-namespace probes -------------------------------------------------------------


class Scratch:
    """What the probes share inside the scratch namespace (one netlink socket, lazily)."""

    def __init__(self):
        self._ipr = None

    @property
    def ipr(self):
        if self._ipr is None:
            try:
                from pyroute2 import IPRoute
            except ImportError as exc:
                raise ProbeError(f"pyroute2 is not importable ({exc}); install requirements/node.txt") from exc
            self._ipr = IPRoute()
        return self._ipr

    @staticmethod
    def loopback_index():
        try:
            return socket.if_nametoindex("lo")
        except OSError as exc:
            raise ProbeError(f"no lo device in the scratch namespace: {describe_error(exc)}") from exc

    def close(self):
        if self._ipr is not None:
            self._ipr.close()
            self._ipr = None


LINK_ATTRS = {
    "vxlan": {"vxlan_id": 1, "vxlan_port": 8472},
    "geneve": {"geneve_id": 1, "geneve_remote": ESP_DST},
    "wireguard": {},
}
# The same links for `ip link add ... type KIND ...`, used when pyroute2 is not installed.
LINK_IP_ARGS = {
    "vxlan": ["id", "1", "dstport", "8472"],
    "geneve": ["id", "1", "remote", ESP_DST],
    "wireguard": [],
}


def probe_link(scratch, kind):
    """Create a ``kind`` link in the scratch namespace (pyroute2, else the ip binary)."""
    name = f"{PROBE_DEV}_{kind[:4]}"
    try:
        ipr = scratch.ipr
    except ProbeError as exc:
        return probe_link_with_ip(kind, name, str(exc))
    try:
        ipr.link("add", ifname=name, kind=kind, **LINK_ATTRS[kind])
    except Exception as exc:  # NetlinkError and anything pyroute2 raises
        text = describe_error(exc)
        if getattr(exc, "code", None) == errno.EOPNOTSUPP:
            return feature(False, f"the kernel has no {kind} link type: creating one failed with {text}")
        return feature(False, f"creating a {kind} link failed: {text}")
    return feature(True, f"created a {kind} link in a scratch network namespace")


def probe_link_with_ip(kind, name, why):
    ip = find_binary("ip")
    if not ip:
        return feature(False, f"not probed: {why}, and no ip binary (Debian package iproute2) either")
    ok, err = run_command([ip, "link", "add", "name", name, "type", kind, *LINK_IP_ARGS[kind]])
    if ok:
        return feature(True, f"created a {kind} link in a scratch network namespace with ip ({why})")
    if "unknown device type" in err.lower():
        return feature(False, f"the kernel has no {kind} link type: ip link add failed with {err}")
    return feature(False, f"creating a {kind} link with ip failed: {err} ({why})")


def probe_tc_bpf(scratch):
    """clsact qdisc on lo, then a `r0 = 0; exit` SCHED_CLS program as a direct-action cls_bpf filter."""
    try:
        index = scratch.loopback_index()
        scratch.ipr.tc("add", "clsact", index)
    except Exception as exc:  # NetlinkError, ProbeError
        return {
            "tc_clsact": feature(False, f"adding a clsact qdisc on lo failed: {describe_error(exc)}"),
            "tc_bpf": feature(False, "not tried: no clsact qdisc"),
        }
    result = {"tc_clsact": feature(True, "added a clsact qdisc on lo in a scratch network namespace")}
    try:
        prog = bpf_syscall.prog_load(
            bpf_syscall.ProgType.SCHED_CLS, bpf_syscall.return_imm(bpf_syscall.TC_ACT_OK), name="cm_probe"
        )
    except (OSError, ValueError) as exc:
        result["tc_bpf"] = feature(False, f"loading a SCHED_CLS program failed: {describe_error(exc)}")
        return result
    with prog:
        try:
            scratch.ipr.tc(
                "add-filter",
                "bpf",
                index,
                ":1",
                fd=int(prog),
                name="cm_probe",
                parent="ffff:fff2",
                classid=1,
                direct_action=True,
            )
        except Exception as exc:
            result["tc_bpf"] = feature(False, f"attaching a cls_bpf direct-action filter failed: {describe_error(exc)}")
            return result
    result["tc_bpf"] = feature(True, "loaded a SCHED_CLS program, attached it as a direct-action cls_bpf filter")
    return result


def probe_tcx(scratch):
    """Attach a SCHED_CLS program to lo through a tcx BPF link (BPF_LINK_CREATE, BPF_TCX_INGRESS)."""
    try:
        index = scratch.loopback_index()
        with (
            bpf_syscall.prog_load(
                bpf_syscall.ProgType.SCHED_CLS,
                bpf_syscall.return_imm(bpf_syscall.TC_ACT_OK),
                name="cm_probe",
                expected_attach_type=bpf_syscall.AttachType.TCX_INGRESS,
            ) as prog,
            bpf_syscall.link_create(int(prog), index, bpf_syscall.AttachType.TCX_INGRESS),
        ):
            pass
    except ProbeError as exc:
        return failed(exc)
    except (OSError, ValueError) as exc:
        return feature(False, f"tcx attach through BPF_LINK_CREATE failed: {describe_error(exc)}")
    return feature(True, "attached a SCHED_CLS program to lo through a tcx link (BPF_LINK_CREATE)")


NETLINK_XFRM = 6
XFRM_MSG_GETSA = 0x12
NLM_F_REQUEST = 0x1
NLM_F_DUMP = 0x300
NLMSG_ERROR = 2
NLMSG_DONE = 3
NLMSG_HEADER = struct.Struct("=IHHII")


def parse_netlink_reply(data, seq):
    """Result of a dump request from the first reply datagram: None if fine, else an errno."""
    offset = 0
    while offset + NLMSG_HEADER.size <= len(data):
        length, msg_type, _flags, msg_seq, _pid = NLMSG_HEADER.unpack_from(data, offset)
        if length < NLMSG_HEADER.size:
            raise ProbeError(f"malformed netlink message (length {length})")
        if msg_seq == seq:
            if msg_type == NLMSG_ERROR:
                (code,) = struct.unpack_from("=i", data, offset + NLMSG_HEADER.size)
                return -code or None
            return None
        offset += (length + 3) & ~3
    raise ProbeError("no netlink reply to the request")


def probe_xfrm(scratch=None, timeout=5.0):
    """An XFRM netlink socket answers an SA dump (xfrm_user present)."""
    seq = 1
    try:
        sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, NETLINK_XFRM)
    except OSError as exc:
        return feature(False, f"cannot open a NETLINK_XFRM socket (no xfrm_user): {describe_error(exc)}")
    try:
        sock.settimeout(timeout)
        sock.bind((0, 0))
        sock.send(NLMSG_HEADER.pack(NLMSG_HEADER.size, XFRM_MSG_GETSA, NLM_F_REQUEST | NLM_F_DUMP, seq, 0))
        err = parse_netlink_reply(sock.recv(65536), seq)
    except (OSError, ProbeError) as exc:
        return feature(False, f"XFRM netlink SA dump failed: {describe_error(exc)}")
    finally:
        sock.close()
    if err:
        return feature(False, f"XFRM netlink SA dump refused: {os.strerror(err)} ({errno_name(err)})")
    return feature(True, "NETLINK_XFRM socket answered an SA dump")


def esp_state_argv(ip, spi, algorithm_args):
    return [
        ip,
        "xfrm",
        "state",
        "add",
        "src",
        ESP_SRC,
        "dst",
        ESP_DST,
        "proto",
        "esp",
        "spi",
        f"0x{spi:x}",
        "mode",
        "tunnel",
        *algorithm_args,
    ]


def combine_esp(variants):
    """The ``esp`` feature from the per-algorithm results ``{name: (ok, label, error)}``."""
    working = [label for ok, label, _err in variants.values() if ok]
    if working:
        return feature(True, f"ESP state added with: {'; '.join(working)}")
    errors = [f"{label}: {err}" for ok, label, err in variants.values() if not ok]
    if any("type not found" in err.lower() for _ok, _label, err in variants.values()):
        return feature(False, "the kernel has no ESP support (esp4 missing): " + "; ".join(errors))
    return feature(False, "no ESP state could be added with the tested algorithms: " + "; ".join(errors))


def probe_esp(scratch=None):
    ip = find_binary("ip")
    names = ["esp"] + [name for name, *unused in ESP_VARIANTS]
    if not ip:
        return {name: feature(False, "ip binary not found (Debian package iproute2)") for name in names}
    variants = {}
    result = {}
    for name, spi, label, args in ESP_VARIANTS:
        ok, err = run_command(esp_state_argv(ip, spi, args))
        variants[name] = (ok, label, err)
        if ok:
            result[name] = feature(True, f"ip xfrm state add proto esp {label} succeeded")
        else:
            result[name] = feature(False, f"ip xfrm state add proto esp {label} failed: {err}")
    result["esp"] = combine_esp(variants)
    return result


def probe_nftables(scratch=None):
    nft = find_binary("nft")
    if not nft:
        reason = feature(False, "not tried: nft binary not found (Debian package nftables)")
        return {"nftables": reason, "nftables_nat": reason}
    ok, err = run_command([nft, "add", "table", "inet", NFT_TABLE])
    if not ok:
        return {
            "nftables": feature(False, f"nft add table inet {NFT_TABLE} failed: {err}"),
            "nftables_nat": feature(False, "not tried: nftables unusable"),
        }
    result = {"nftables": feature(True, f"nft add table inet {NFT_TABLE} succeeded")}
    ok, err = run_command(
        [
            nft,
            f"add chain inet {NFT_TABLE} post {{ type nat hook postrouting priority 100 ; }} ;"
            f" add rule inet {NFT_TABLE} post ip saddr 10.0.0.0/8 masquerade",
        ]
    )
    if ok:
        result["nftables_nat"] = feature(True, "nat postrouting chain with a masquerade rule added")
    else:
        result["nftables_nat"] = feature(False, f"adding a nat chain with masquerade failed: {err}")
    return result


SCRATCH_PROBES = {
    "vxlan": lambda s: {"vxlan": probe_link(s, "vxlan")},
    "geneve": lambda s: {"geneve": probe_link(s, "geneve")},
    "wireguard": lambda s: {"wireguard": probe_link(s, "wireguard")},
    "tc_bpf": probe_tc_bpf,
    "tcx": lambda s: {"tcx": probe_tcx(s)},
    "xfrm": lambda s: {"xfrm": probe_xfrm(s)},
    "esp": probe_esp,
    "nftables": probe_nftables,
}


def _run_scratch_groups(groups):
    """Inside the scratch namespace: run the groups; a failing group reports its features failed."""
    scratch = Scratch()
    results = {}
    try:
        for group in groups:
            try:
                results.update(SCRATCH_PROBES[group](scratch))
            except Exception as exc:
                for name in PROBE_GROUPS[group]:
                    results.setdefault(name, failed(exc))
    finally:
        try:
            scratch.close()
        except Exception:
            pass
    return results


def _write_all(fd, data):
    view = memoryview(data)
    while view:
        written = os.write(fd, view)
        view = view[written:]


def _read_until_eof(fd, deadline):
    """All bytes until EOF, or None if the deadline passes first."""
    chunks = []
    while True:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            return None
        ready = select.select([fd], [], [], remaining)[0]
        if not ready:
            continue
        chunk = os.read(fd, 65536)
        if not chunk:
            return b"".join(chunks)
        chunks.append(chunk)


def _child_reply(func):
    try:
        unshare(CLONE_NEWNET)
    except OSError as exc:
        hint = " (needs root: CAP_SYS_ADMIN; use become)" if exc.errno == errno.EPERM else ""
        return {
            "error": f"cannot create a scratch network namespace: unshare(CLONE_NEWNET): {describe_error(exc)}{hint}"
        }
    try:
        return {"value": func()}
    except BaseException as exc:
        return {"error": f"probe process failed: {type(exc).__name__}: {describe_error(exc)}"}


def call_in_scratch_netns(func, timeout=DEFAULT_TIMEOUT):
    """Call ``func()`` in a forked child inside a new, empty network namespace.

    Returns what ``func`` returned (it must be JSON-serialisable).  The child exits right after,
    which destroys the namespace and everything made in it; this process never changes
    namespace.  Raises ProbeError when the namespace cannot be made (not root), ``func`` raises,
    the child dies without answering, or ``timeout`` seconds pass (the child is then killed).
    """
    read_fd, write_fd = os.pipe()
    try:
        pid = os.fork()
    except OSError as exc:
        os.close(read_fd)
        os.close(write_fd)
        raise ProbeError(f"cannot fork the probe process: {describe_error(exc)}") from exc
    if pid == 0:  # the child: always ends in os._exit, never returns into the caller
        status = 1
        try:
            os.close(read_fd)
            reply = _child_reply(func)
            try:
                data = json.dumps(reply).encode()
            except (TypeError, ValueError) as exc:
                data = json.dumps({"error": f"probe result not serialisable: {exc}"}).encode()
            _write_all(write_fd, data)
            status = 0
        finally:
            os._exit(status)

    os.close(write_fd)
    try:
        data = _read_until_eof(read_fd, time.monotonic() + timeout)
    finally:
        os.close(read_fd)
    if data is None:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    unused, status = os.waitpid(pid, 0)
    if data is None:
        raise ProbeError(f"probe process timed out after {timeout:g}s")
    try:
        reply = json.loads(data.decode())
    except ValueError:
        raise ProbeError(f"probe process ended without a result (wait status {status})") from None
    if "error" in reply:
        raise ProbeError(reply["error"])
    return reply.get("value")


def run_in_scratch_netns(groups, timeout=DEFAULT_TIMEOUT):
    """Run scratch probe groups in one throwaway network namespace.

    Returns ``{feature: result}`` for every feature of ``groups`` (except ``nft_binary``, a host
    check); when the child cannot do its work each feature is unavailable with the reason.
    """
    groups = [g for g in groups if g in SCRATCH_PROBES]
    if not groups:
        return {}
    names = [name for g in groups for name in PROBE_GROUPS[g] if name != "nft_binary"]
    try:
        results = call_in_scratch_netns(lambda: _run_scratch_groups(groups), timeout=timeout)
    except ProbeError as exc:
        return {name: feature(False, str(exc)) for name in names}
    for name in names:
        results.setdefault(name, feature(False, "probe produced no result"))
    return results


# --- underlay -----------------------------------------------------------------------------

RT_TABLE_MAIN = 254
RTN_UNICAST = 1
IFF_UP = 0x1
IFF_LOOPBACK = 0x8


def summarize_underlay(links, addresses, routes, skip_prefix="cm_"):
    """The host's usable underlay addresses and default routes, from plain dicts.

    links: ``{"index", "ifname", "mtu", "flags"}``; addresses: ``{"family" (4|6), "address",
    "prefixlen", "index"}``; routes: ``{"family", "dst_len", "table", "type", "oifs",
    "gateway"}``.  Loopback and link-local addresses are left out, and so are the project's
    own devices (name starting with ``skip_prefix``).
    """
    by_index = {link["index"]: link for link in links}
    defaults = {}
    for route in routes:
        if route.get("dst_len") != 0 or route.get("table", RT_TABLE_MAIN) != RT_TABLE_MAIN:
            continue
        if route.get("type", RTN_UNICAST) != RTN_UNICAST:
            continue
        key = f"ipv{route['family']}"
        if key in defaults:
            continue
        oifs = [i for i in route.get("oifs") or [] if i is not None]
        defaults[key] = {
            "gateway": route.get("gateway"),
            "interfaces": [by_index[i]["ifname"] for i in oifs if i in by_index],
        }
    result = {"ipv4": [], "ipv6": []}
    for addr in addresses:
        link = by_index.get(addr["index"])
        if link is None or link.get("flags", 0) & IFF_LOOPBACK:
            continue
        if skip_prefix and link["ifname"].startswith(skip_prefix):
            continue
        try:
            ip = ipaddress.ip_address(addr["address"])
        except ValueError:
            continue
        if ip.is_loopback or ip.is_link_local or ip.is_multicast or ip.is_unspecified:
            continue
        key = f"ipv{ip.version}"
        default = defaults.get(key)
        result[key].append(
            {
                "address": str(ip),
                "prefixlen": addr["prefixlen"],
                "cidr": f"{ip}/{addr['prefixlen']}",
                "interface": link["ifname"],
                "mtu": link.get("mtu"),
                "up": bool(link.get("flags", 0) & IFF_UP),
                "default_route": bool(default and link["ifname"] in default["interfaces"]),
            }
        )
    for key in ("ipv4", "ipv6"):
        result[key].sort(key=lambda a: (a["interface"], ipaddress.ip_address(a["address"])))
    result["default_route"] = {key: defaults.get(key) for key in ("ipv4", "ipv6")}
    result["has_default_route"] = any(result["default_route"].values())
    return result


def read_underlay():
    """Read links, addresses and routes of the current (host) namespace with pyroute2."""
    try:
        from pyroute2 import IPRoute
    except ImportError as exc:
        raise ProbeError(f"pyroute2 is not importable ({exc}); install requirements/node.txt") from exc
    families = {socket.AF_INET: 4, socket.AF_INET6: 6}
    with IPRoute() as ipr:
        links = [
            {"index": m["index"], "ifname": m.get("IFLA_IFNAME"), "mtu": m.get("IFLA_MTU"), "flags": m["flags"]}
            for m in ipr.get_links()
        ]
        addresses = [
            {
                "family": families[m["family"]],
                "address": m.get("IFA_LOCAL") or m.get("IFA_ADDRESS"),
                "prefixlen": m["prefixlen"],
                "index": m["index"],
            }
            for m in ipr.get_addr()
            if m["family"] in families
        ]
        routes = []
        for family, version in families.items():
            for m in ipr.get_routes(family=family):
                if m["dst_len"] != 0:
                    continue
                oifs = [m.get("RTA_OIF")]
                gateway = m.get("RTA_GATEWAY")
                for hop in m.get("RTA_MULTIPATH") or []:
                    oifs.append(hop.get("oif"))
                    gateway = gateway or hop.get("RTA_GATEWAY")
                routes.append(
                    {
                        "family": version,
                        "dst_len": 0,
                        "table": m.get("RTA_TABLE") or m["table"],
                        "type": m["type"],
                        "oifs": oifs,
                        "gateway": gateway,
                    }
                )
    return summarize_underlay(links, addresses, routes)


# --- everything ---------------------------------------------------------------------------


def detect(probes=None, timeout=DEFAULT_TIMEOUT):
    """Run the selected probes; returns the facts dict (see the node_facts module's RETURN).

    Raises ValueError only for an unknown probe name; probe failures are reported as results.
    """
    groups, want_underlay = select_groups(probes)
    results = {}
    # The fork comes first, while this process holds no netlink sockets or helper threads.
    results.update(run_in_scratch_netns([g for g in groups if g in SCRATCH_GROUPS], timeout=timeout))
    for group in groups:
        probe = HOST_PROBES.get(group)
        if probe is None:
            continue
        try:
            results.update(probe())
        except Exception as exc:
            for name in PROBE_GROUPS[group]:
                results.setdefault(name, failed(exc))
    flat, missing = summarize(results)
    facts = {
        "kernel": kernel_info(),
        "probed": groups + ([UNDERLAY] if want_underlay else []),
        "features": flat,
        "missing": missing,
        "probes": dict(sorted(results.items())),
    }
    if want_underlay:
        try:
            facts["underlay"] = read_underlay()
        except Exception as exc:
            facts["underlay"] = {"error": f"reading addresses and routes failed: {describe_error(exc)}"}
    return facts
