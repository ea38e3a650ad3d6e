"""Helpers for tests that run inside the VM of tools/vm-run (docs/vm-lab.md).

The lab helpers of tests/lab/labtools.py work unchanged inside the VM; this module adds what the
VM tests need on top:

- ``RESULTS``: the directory shared writable with the host (files left there survive the VM).
- ``vm_lab(prefix, topology)``: a context manager around ``tools/lab up/down``.
- ``run_playbook(prefix, text)``: writes a playbook into RESULTS and runs it with labtools.playbook.
- ``capture(prefix, host, iface, bpf_filter, seconds)``: tcpdump in a lab host into a pcap in RESULTS.
- ``read_pcap(path)``: the IPv4 packets of a pcap (Ethernet link type), parsed without scapy.
"""

from __future__ import annotations

import json
import os
import signal
import struct
import subprocess
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass

import yaml

from ..lab.labtools import LAB, REPO_ROOT, inventory_path, lab, lab_session, playbook, run_in

__all__ = [
    "RESULTS",
    "Capture",
    "Packet",
    "capture",
    "in_vm",
    "inventory_path",
    "lab",
    "playbook",
    "read_pcap",
    "run_in",
    "run_playbook",
    "vm_lab",
]

RESULTS = os.environ.get("CLUSTERMESH_VM_RESULTS") or os.path.join(REPO_ROOT, "build", "vm", "results")
# tools/lab up is slow under TCG (~20x the host); generous, but bounded
LAB_TIMEOUT = 600


def in_vm():
    """True when running inside tools/vm-run's VM."""
    return os.environ.get("CLUSTERMESH_IN_VM") == "1"


def results_path(name):
    os.makedirs(RESULTS, exist_ok=True)
    return os.path.join(RESULTS, name)


@dataclass
class Lab:
    prefix: str
    inventory: str
    addresses: dict  # host name -> underlay IPv4 address

    def exec(self, host, *command, check=True, timeout=120):
        return run_in(self.prefix, host, *command, check=check, timeout=timeout)


@contextmanager
def vm_lab(prefix, topology=None):
    """``tools/lab up --prefix PREFIX`` (topology: a dict, written to RESULTS; None = the default lab),
    yields a Lab; ``tools/lab down`` afterwards, also when the body fails."""
    args = []
    if topology is not None:
        path = results_path("topology-%s.yml" % prefix)
        with open(path, "w") as f:
            yaml.safe_dump(topology, f)
        args += ["--topology", path]
    with lab_session(prefix, *args, timeout=LAB_TIMEOUT):
        with open("/run/clustermesh-lab/%s/topology.json" % prefix) as f:
            hosts = json.load(f)["hosts"]
        yield Lab(prefix, inventory_path(prefix), {h["name"]: h["address"] for h in hosts})


def run_playbook(prefix, text, name="playbook.yml", *extra, check=True, timeout=900):
    """Write the playbook ``text`` (YAML) into RESULTS and run it against the lab with labtools.playbook."""
    path = results_path(name)
    with open(path, "w") as f:
        f.write(text)
    return playbook(prefix, path, *extra, check=check, timeout=timeout)


class Capture:
    """A running tcpdump in a lab host; ``path`` is the pcap, complete once stop() returned."""

    def __init__(self, prefix, host, iface, bpf_filter, seconds, name):
        self.path = results_path(name)
        if os.path.exists(self.path):
            os.remove(self.path)
        # tools/lab exec and nsenter exec: self.proc.pid is timeout(1), which passes SIGINT on to tcpdump.
        # -Z root: the default drop to user tcpdump could not write into RESULTS.
        cmd = [LAB, "exec", "--prefix", prefix, host, "--", "timeout", "--signal=INT", str(seconds)]
        cmd += ["tcpdump", "-n", "-U", "-Z", "root", "-i", iface]
        cmd += ["-w", self.path, *([bpf_filter] if bpf_filter else [])]
        self.proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        self.stderr = []
        started = threading.Event()

        def read_stderr():
            for line in self.proc.stderr:
                self.stderr.append(line)
                if "listening on" in line:
                    started.set()
            started.set()

        threading.Thread(target=read_stderr, daemon=True).start()
        if not started.wait(timeout=60) or self.proc.poll() is not None:
            self.stop()
            raise AssertionError("tcpdump in %s did not start: %s" % (host, "".join(self.stderr)))

    def stop(self):
        """Stop tcpdump (SIGINT: it writes what it has) after a short grace for packets in flight; return the path."""
        if self.proc.poll() is None:
            time.sleep(0.5)
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.path

    def packets(self):
        return read_pcap(self.path)


@contextmanager
def capture(prefix, host, iface, bpf_filter="", seconds=30, name=None):
    """tcpdump on ``iface`` of lab ``host`` while the body runs (``seconds`` at most: then tcpdump stops), into
    RESULTS/<name or host-iface.pcap>; yields the Capture (``.path``, ``.packets()``).

    ``host`` may be ``fabric`` (iface ``br-<segment>``): that is the wire. In a host, a capture on
    eth0 also shows the packets that arrived as ESP *after* decryption (tunnel mode re-injects them
    on the same device), so "no plaintext on the underlay" must be checked on the fabric or with
    ``bpf_filter`` "outbound"::

        with capture("cmvm", "fabric", "br-dc1", "host 198.18.1.12") as cap:
            lab.exec("a", "ping", "-c3", "198.18.1.12")
        assert {p.proto for p in cap.packets()} == {50}
    """
    cap = Capture(prefix, host, iface, bpf_filter, seconds, name or "%s-%s.pcap" % (host, iface))
    try:
        yield cap
    finally:
        cap.stop()


@dataclass
class Packet:
    src: str
    dst: str
    proto: int  # IP protocol number: 1 ICMP, 6 TCP, 17 UDP, 50 ESP
    payload: bytes  # the bytes after the IPv4 header
    frame: bytes  # the whole captured frame


def _ip(b):
    return ".".join(str(x) for x in b)


def read_pcap(path):
    """The IPv4 packets (list of Packet) of a classic pcap file with Ethernet frames (tcpdump -w)."""
    with open(path, "rb") as f:
        data = f.read()
    if len(data) < 24:
        raise AssertionError("%s: not a pcap file (%d bytes)" % (path, len(data)))
    magic = data[:4]
    if magic in (b"\xd4\xc3\xb2\xa1", b"\x4d\x3c\xb2\xa1"):
        endian = "<"
    elif magic in (b"\xa1\xb2\xc3\xd4", b"\xa1\xb2\x3c\x4d"):
        endian = ">"
    else:
        raise AssertionError("%s: not a pcap file (magic %s)" % (path, magic.hex()))
    linktype = struct.unpack(endian + "I", data[20:24])[0]
    if linktype != 1:
        raise AssertionError("%s: link type %d, only Ethernet (1) is parsed" % (path, linktype))
    packets, off = [], 24
    while off + 16 <= len(data):
        incl = struct.unpack(endian + "IIII", data[off : off + 16])[2]
        frame = data[off + 16 : off + 16 + incl]
        off += 16 + incl
        if len(frame) < 34 or frame[12:14] != b"\x08\x00":
            continue
        ip = frame[14:]
        ihl = (ip[0] & 0x0F) * 4
        total = struct.unpack("!H", ip[2:4])[0]
        packets.append(Packet(_ip(ip[12:16]), _ip(ip[16:20]), ip[9], ip[ihl:total], frame))
    return packets
