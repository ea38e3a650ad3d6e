# -*- coding: utf-8 -*-
# Copyright: clustermesh.core contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""Preflight of one node before routing changes anything: read-only checks, one table, clear reasons.

Checks (each gives one or more :class:`Check` rows, in this order):

* ``features``: the kernel features the mode needs (``vxlan`` for tunnel/hybrid, ``nftables_nat``
  for masquerade, ``veth`` for the CNI plugin) and the pyroute2 package the routing applier uses;
* ``underlay``: the node's IP is on an interface that is up; its MTU leaves a pod MTU >= 1280;
* ``reachability``: every peer's underlay IP answers an ICMP echo (all peers at once);
* ``path_mtu``: a don't-fragment echo of the full underlay MTU reaches every peer;
* ``onlink``: which peers share the node's segment, and the routing plan's own errors
  (:func:`routing_plan.plan_routing` decides, nothing is re-implemented here);
* ``ports``: UDP 8472 (VXLAN) is free or held by our own ``cm_vxlan``; every kvstore endpoint
  accepts a TCP connection;
* ``duplicate``: no other machine answers an ARP probe (RFC 5227) for the node's IP; no peer is
  listed with the node's IP or with another peer's IP.

Nothing here changes the host: the only packets sent are ICMP echoes, one ARP probe, TCP
connects (closed at once), and the feature probes run in a throwaway network namespace
(:mod:`kernel_features`).  No Ansible imports: the agent can run the same checks.
"""

from __future__ import annotations

import errno
import ipaddress
import os
import random
import select
import socket
import struct
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from urllib.parse import urlsplit

from . import kernel_features
from .routing_plan import MODES, VXLAN_DEVICE, VXLAN_PORT, RoutingPlanError, plan_routing, pod_mtu

CHECKS = ("features", "underlay", "reachability", "path_mtu", "onlink", "ports", "duplicate")
MIN_POD_MTU = 1280  # the IPv6 minimum; below it pods cannot carry IPv6 and many stacks misbehave
DEFAULT_TIMEOUT = 1.0

# --- records and reports ----------------------------------------------------------------------


@dataclass(frozen=True)
class Check:
    """One row of the table: ``name`` is the check, ``target`` what it looked at (a feature, a peer,
    a port), ``detail`` what was found, ``fix`` what to do when it failed."""

    name: str
    target: str
    ok: bool
    detail: str
    fix: str = ""
    skipped: bool = False

    @property
    def result(self):
        if self.skipped:
            return "skip"
        return "ok" if self.ok else "FAIL"

    def to_dict(self):
        out = asdict(self)
        out["result"] = self.result
        return out


def passed(name, target, detail):
    return Check(name, target, True, detail)


def failed(name, target, detail, fix=""):
    return Check(name, target, False, detail, fix)


def skipped(name, target, detail):
    return Check(name, target, True, detail, skipped=True)


class PreflightError(ValueError):
    """Input the checks cannot run with; ``problems`` names every field and value."""

    def __init__(self, problems):
        self.problems = list(problems)
        super().__init__("; ".join(self.problems))


TABLE_HEADER = ("CHECK", "TARGET", "RESULT", "DETAIL")


def format_table(checks):
    """Aligned lines: header, then one line per check (``CHECK | TARGET | RESULT | DETAIL``)."""
    rows = [TABLE_HEADER] + [(c.name, c.target, c.result, c.detail) for c in checks]
    widths = [max(len(r[i]) for r in rows) for i in range(3)]
    return [" | ".join([r[i].ljust(widths[i]) for i in range(3)] + [r[3]]).rstrip() for r in rows]


def failures(checks):
    return [c for c in checks if not c.ok]


def failure_message(node_name, checks):
    """One line per failed check: node, check, target, reason and fix; empty string if none failed."""
    lines = []
    for c in failures(checks):
        line = "%s: %s %s: %s" % (node_name, c.name, c.target, c.detail)
        if c.fix:
            line += "; fix: " + c.fix
        lines.append(line)
    return "\n".join(lines)


# --- input -----------------------------------------------------------------------------------


def select_checks(checks):
    """Validate a selection (``None``, ``[]`` or ``["all"]`` = everything); returns CHECKS in order."""
    wanted = list(checks or ["all"])
    unknown = sorted(set(wanted) - set(CHECKS) - {"all"})
    if unknown:
        raise PreflightError(["checks: unknown %s; choose from: all, %s" % (", ".join(unknown), ", ".join(CHECKS))])
    return list(CHECKS) if "all" in wanted else [c for c in CHECKS if c in wanted]


def parse_endpoint(text):
    """``host:port``, ``[v6]:port`` or a URL ``scheme://host:port`` -> (host, port)."""
    raw = str(text).strip()
    parts = urlsplit(raw if "://" in raw else "tcp://" + raw)
    try:
        port = parts.port
    except ValueError:
        port = None
    if not parts.hostname or port is None or port == 0:
        raise ValueError("%r is not host:port (for example 198.18.1.11:2379)" % text)
    return parts.hostname, port


def validate_inputs(node, peers, mode, kvstore_endpoints=(), timeout=DEFAULT_TIMEOUT):
    """Every problem with the options, each naming the field and value; raises PreflightError."""
    problems = []
    if mode not in MODES:
        problems.append("mode: %r is not one of %s" % (mode, ", ".join(MODES)))
    try:
        if ipaddress.ip_address(node["ip"]).version != 4:
            problems.append("node.ip: %s is not IPv4; the underlay is IPv4" % node["ip"])
    except ValueError:
        problems.append("node.ip: %r is not an IP address" % node["ip"])
    for i, peer in enumerate(peers):
        try:
            ipaddress.IPv4Address(peer["ip"])
        except ValueError:
            problems.append("peers[%d] (%s).ip: %r is not an IPv4 address" % (i, peer.get("name"), peer["ip"]))
    for i, endpoint in enumerate(kvstore_endpoints):
        try:
            parse_endpoint(endpoint)
        except ValueError as exc:
            problems.append("kvstore_endpoints[%d]: %s" % (i, exc))
    if not timeout or timeout <= 0:
        problems.append("timeout: must be a positive number of seconds, got %r" % timeout)
    if problems:
        raise PreflightError(problems)


# --- features ----------------------------------------------------------------------------------

FEATURE_FIXES = {
    "vxlan": "load the vxlan kernel module (modprobe vxlan), or use mode direct",
    "nftables_nat": "install nftables and make the kernel's nf_tables NAT available (modprobe nft_chain_nat "
    "nft_masq), or set routing_masquerade: false",
    "veth": "load the veth kernel module (modprobe veth)",
    "pyroute2": "install requirements/node.txt into the node's Python (pip install pyroute2)",
}
VETH_FEATURE = "veth"


def required_features(mode, masquerade=True):
    """[(feature, why)] the node needs for ``mode`` (kernel_features names, plus ``veth``)."""
    needed = []
    if mode in ("tunnel", "hybrid"):
        needed.append(("vxlan", "mode %s tunnels pod traffic in VXLAN (device %s)" % (mode, VXLAN_DEVICE)))
    if masquerade:
        needed.append(("nftables_nat", "masquerade SNATs pod traffic leaving the mesh with nftables"))
    needed.append((VETH_FEATURE, "the CNI plugin connects each pod with a veth pair"))
    return needed


def normalize_features(features):
    """node_facts' output to ``{name: {"available", "detail"}}``.

    Accepts the whole ``clustermesh_node`` fact, its ``probes`` (name -> {available, detail}) or its
    ``features`` (name -> bool; then the reason of a missing feature is not known).
    """
    if not features:
        return {}
    if isinstance(features.get("probes"), dict):
        features = features["probes"]
    elif isinstance(features.get("features"), dict):
        features = features["features"]
    out = {}
    for name, value in features.items():
        if isinstance(value, dict):
            out[name] = {"available": bool(value.get("available")), "detail": str(value.get("detail", ""))}
        else:
            detail = "reported available by node_facts" if value else "reported unavailable by node_facts"
            out[name] = {"available": bool(value), "detail": detail}
    return out


def probe_groups_for(names):
    """The kernel_features probe groups that report ``names`` (unknown names are left out)."""
    return [group for group, provided in kernel_features.PROBE_GROUPS.items() if set(provided) & set(names)]


def _veth_in_scratch():
    """Runs inside the scratch namespace: create a veth pair (pyroute2, else the ip binary)."""
    try:
        from pyroute2 import IPRoute
    except ImportError:
        ip = kernel_features.find_binary("ip")
        if not ip:
            return kernel_features.feature(False, "not probed: neither pyroute2 nor the ip binary is installed")
        ok, err = kernel_features.run_command([ip, "link", "add", "cm_probe_v0", "type", "veth", "peer", "cm_probe_v1"])
        if ok:
            return kernel_features.feature(True, "created a veth pair in a scratch network namespace with ip")
        return kernel_features.feature(False, "creating a veth pair with ip failed: %s" % err)
    with IPRoute() as ipr:
        try:
            ipr.link("add", ifname="cm_probe_v0", kind="veth", peer="cm_probe_v1")
        except Exception as exc:  # NetlinkError
            return kernel_features.feature(
                False, "creating a veth pair failed: %s" % kernel_features.describe_error(exc)
            )
    return kernel_features.feature(True, "created a veth pair in a scratch network namespace")


def probe_veth(timeout=kernel_features.DEFAULT_TIMEOUT):
    try:
        return kernel_features.call_in_scratch_netns(_veth_in_scratch, timeout=timeout)
    except kernel_features.ProbeError as exc:
        return kernel_features.feature(False, str(exc))


def probe_features(names, timeout=kernel_features.DEFAULT_TIMEOUT):
    """Run the probes that report ``names`` (kernel_features groups, and ``veth``); {name: result}."""
    results = {}
    groups = probe_groups_for(names)
    if groups:
        facts = kernel_features.detect(groups, timeout=timeout)
        results.update(facts["probes"])
    if VETH_FEATURE in names:
        results[VETH_FEATURE] = probe_veth(timeout)
    return results


def pyroute2_status():
    try:
        import pyroute2  # noqa: F401
    except ImportError as exc:
        return {"available": False, "detail": "pyroute2 is not importable (%s); the routing module needs it" % exc}
    return {"available": True, "detail": "pyroute2 importable"}


def check_features(mode, masquerade, features, python=None):
    """Rows for the features ``mode`` and ``masquerade`` need, from ``features`` (normalised);
    ``python`` is the pyroute2 status (skipped when None)."""
    rows = []
    for name, why in required_features(mode, masquerade):
        result = features.get(name)
        if result is None:
            rows.append(failed("features", name, "not probed (%s)" % why, "run node_facts with its default probes"))
        elif result["available"]:
            rows.append(passed("features", name, result["detail"]))
        else:
            rows.append(
                failed("features", name, "missing, but %s: %s" % (why, result["detail"]), FEATURE_FIXES.get(name, ""))
            )
    if python is not None:
        if python["available"]:
            rows.append(passed("features", "pyroute2", python["detail"]))
        else:
            rows.append(failed("features", "pyroute2", python["detail"], FEATURE_FIXES["pyroute2"]))
    return rows


# --- underlay --------------------------------------------------------------------------------


def find_underlay(node_ip, underlay):
    """The entry of node_facts-style ``underlay`` (kernel_features.read_underlay()) holding ``node_ip``."""
    for entry in underlay.get("ipv4", []) + underlay.get("ipv6", []):
        if entry["address"] == str(node_ip):
            return entry
    return None


def check_underlay(node, mode, underlay):
    """Rows: the node IP is on an interface that is up, and its MTU fits the mode's pod MTU."""
    entry = find_underlay(node["ip"], underlay)
    if entry is None:
        seen = ", ".join("%s on %s" % (a["cidr"], a["interface"]) for a in underlay.get("ipv4", [])) or "none"
        return [
            failed(
                "underlay",
                node["ip"],
                "the node IP is not an address of this host (IPv4 addresses here: %s)" % seen,
                "set clustermesh_node_ip of %s to one of this host's addresses, or add %s to its underlay interface"
                % (node["name"], node["ip"]),
            )
        ]
    where = "%s on %s, MTU %s" % (entry["cidr"], entry["interface"], entry["mtu"])
    rows = []
    if not entry.get("up", True):
        rows.append(
            failed("underlay", node["ip"], where + ", interface is down", "ip link set %s up" % entry["interface"])
        )
    else:
        rows.append(passed("underlay", node["ip"], where + ", up"))
    mtu = entry["mtu"]
    if mtu:
        pods = pod_mtu(mode, mtu)
        label = "pod MTU %d (%s mode: underlay %d%s)" % (
            pods,
            mode,
            mtu,
            " - 50 for VXLAN" if pods != mtu else "",
        )
        if pods < MIN_POD_MTU:
            rows.append(
                failed(
                    "underlay",
                    "pod MTU",
                    label + " is below the minimum %d" % MIN_POD_MTU,
                    "raise the MTU of %s to at least %d" % (entry["interface"], MIN_POD_MTU + (mtu - pods)),
                )
            )
        else:
            rows.append(passed("underlay", "pod MTU", label))
    return rows


# --- ICMP echo (reachability and path MTU) ---------------------------------------------------

ICMP_ECHO_REPLY = 0
ICMP_DEST_UNREACH = 3
ICMP_ECHO_REQUEST = 8
ICMP_TIME_EXCEEDED = 11
ICMP_FRAG_NEEDED = 4
IP_MTU_DISCOVER = 10
IP_PMTUDISC_PROBE = 3  # set DF, ignore the cached path MTU (each run measures afresh)
SMALL_ECHO = 84  # bytes on the wire (IP header included), as ping's default
IP_ICMP_HEADERS = 28
# Smaller sizes tried at once with the full one, to name the largest that passes.
MTU_LADDER = (9000, 8192, 4096, 1500, 1492, 1480, 1450, 1420, 1400, 1350, 1300, 1280, 1000, 576)
UNREACH_CODES = {
    0: "network unreachable",
    1: "host unreachable",
    2: "protocol unreachable",
    3: "port unreachable",
    4: "fragmentation needed",
    9: "network administratively prohibited",
    10: "host administratively prohibited",
    13: "communication administratively prohibited",
}


def inet_checksum(data):
    if len(data) % 2:
        data += b"\0"
    total = sum(struct.unpack("!%dH" % (len(data) // 2), data))
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return ~total & 0xFFFF


def echo_request(ident, seq, size):
    """An ICMP echo request whose IPv4 packet is ``size`` bytes (``size`` - 28 bytes of payload)."""
    payload = bytes(i & 0xFF for i in range(max(0, size - IP_ICMP_HEADERS)))
    header = struct.pack("!BBHHH", ICMP_ECHO_REQUEST, 0, 0, ident, seq)
    csum = inet_checksum(header + payload)
    return struct.pack("!BBHHH", ICMP_ECHO_REQUEST, 0, csum, ident, seq) + payload


@dataclass(frozen=True)
class IcmpMessage:
    kind: str  # reply | unreachable | time_exceeded
    src: str  # who sent it (the peer for a reply, a router for an error)
    ident: int
    seq: int
    size: int = 0  # IPv4 packet length of a reply
    dst: str = ""  # destination of the original echo, for errors
    code: int = 0
    mtu: int = 0  # next-hop MTU of "fragmentation needed"


def parse_icmp(packet):
    """An IPv4 packet from a raw ICMP socket -> IcmpMessage about one of our echoes, or None."""
    if len(packet) < 20 or packet[0] >> 4 != 4:
        return None
    ihl = (packet[0] & 0x0F) * 4
    src = socket.inet_ntoa(packet[12:16])
    icmp = packet[ihl:]
    if len(icmp) < 8:
        return None
    kind, code = icmp[0], icmp[1]
    if kind == ICMP_ECHO_REPLY:
        ident, seq = struct.unpack("!HH", icmp[4:8])
        return IcmpMessage("reply", src, ident, seq, size=len(packet))
    if kind in (ICMP_DEST_UNREACH, ICMP_TIME_EXCEEDED):
        inner = icmp[8:]
        if len(inner) < 20 or inner[0] >> 4 != 4:
            return None
        inner_ihl = (inner[0] & 0x0F) * 4
        original = inner[inner_ihl : inner_ihl + 8]
        if len(original) < 8 or original[0] != ICMP_ECHO_REQUEST:
            return None
        ident, seq = struct.unpack("!HH", original[4:8])
        mtu = struct.unpack("!H", icmp[6:8])[0] if kind == ICMP_DEST_UNREACH and code == ICMP_FRAG_NEEDED else 0
        return IcmpMessage(
            "unreachable" if kind == ICMP_DEST_UNREACH else "time_exceeded",
            src,
            ident,
            seq,
            dst=socket.inet_ntoa(inner[16:20]),
            code=code,
            mtu=mtu,
        )
    return None


@dataclass
class Echo:
    """What became of one echo request: ``rtt`` (ms) when answered, else ``error`` (or neither: no answer)."""

    rtt: float | None = None
    error: str = ""
    mtu: int = 0  # next-hop MTU a router reported
    router: str = ""

    @property
    def answered(self):
        return self.rtt is not None

    @property
    def done(self):
        return self.rtt is not None or bool(self.error)


def describe_icmp_error(message):
    if message.kind == "time_exceeded":
        return "TTL exceeded at %s (a routing loop?)" % message.src
    if message.mtu:
        return "router %s needs fragmentation: its next hop has MTU %d" % (message.src, message.mtu)
    return "%s reports %s" % (message.src, UNREACH_CODES.get(message.code, "unreachable (code %d)" % message.code))


SOCKET_BUFFER = 4 << 20  # room for every echo and reply of a round with many peers
SO_SNDBUFFORCE = 32
SO_RCVBUFFORCE = 33


class IcmpProber:
    """Echo requests to many addresses at once over one raw socket, with DF set (IP_PMTUDISC_PROBE)."""

    def __init__(self):
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_ICMP)
        self.sock.setsockopt(socket.IPPROTO_IP, IP_MTU_DISCOVER, IP_PMTUDISC_PROBE)
        for force, plain in ((SO_SNDBUFFORCE, socket.SO_SNDBUF), (SO_RCVBUFFORCE, socket.SO_RCVBUF)):
            try:
                self.sock.setsockopt(socket.SOL_SOCKET, force, SOCKET_BUFFER)
            except OSError:  # without CAP_NET_ADMIN: as much as net.core.[rw]mem_max allows
                self.sock.setsockopt(socket.SOL_SOCKET, plain, SOCKET_BUFFER)
        self.sock.setblocking(False)
        self.ident = random.randrange(1, 0xFFFF)
        self.seq = random.randrange(0, 0xFFFF)
        self.pending = {}  # seq -> (key, sent at)

    def close(self):
        self.sock.close()

    def send(self, key, ip, size, requests, results, deadline):
        self.seq = (self.seq + 1) & 0xFFFF
        self.pending[self.seq] = (key, time.monotonic())
        packet = echo_request(self.ident, self.seq, size)
        while True:
            try:
                self.sock.sendto(packet, (ip, 0))
                return
            except BlockingIOError:  # the send buffer is full: take in replies, wait until it drains
                self.receive(requests, results)
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return  # counts as lost
                select.select([self.sock], [self.sock], [], remaining)
            except OSError as exc:
                if exc.errno == errno.EMSGSIZE:
                    results[key].error = "a %d-byte packet does not fit the route towards %s (EMSGSIZE)" % (size, ip)
                else:
                    results[key].error = "cannot send to %s: %s" % (ip, kernel_features.describe_error(exc))
                return

    def receive(self, requests, results):
        """Take in every ICMP message waiting on the socket."""
        while True:
            try:
                packet = self.sock.recv(65535)
            except (BlockingIOError, InterruptedError):
                return
            message = parse_icmp(packet)
            if message is None or message.ident != self.ident or message.seq not in self.pending:
                continue
            key, sent = self.pending[message.seq]
            echo = results.get(key)
            if echo is None:
                continue
            if message.kind == "reply":
                if message.src == requests[key][0] and echo.rtt is None:
                    echo.rtt = (time.monotonic() - sent) * 1000.0
                    echo.error = ""
            elif not echo.answered:
                echo.error = describe_icmp_error(message)
                echo.mtu, echo.router = message.mtu, message.src

    def send_all(self, requests, results, deadline):
        for count, (key, (ip, size)) in enumerate(requests.items(), 1):
            if not results[key].done:
                self.send(key, ip, size, requests, results, deadline)
            if count % 32 == 0:
                self.receive(requests, results)

    def run(self, requests, timeout, done=None):
        """``requests``: {key: (ip, size)}. Sends all, resends the unanswered once halfway, and waits
        until ``done(results)`` is true or ``timeout`` passes. Returns {key: Echo}."""
        results = {key: Echo() for key in requests}
        self.pending = {}  # a late answer to an earlier round is ignored
        done = done or (lambda res: all(e.done for e in res.values()))
        start = time.monotonic()
        deadline = start + timeout
        resend_at = start + timeout / 2
        self.send_all(requests, results, deadline)
        resent = False
        while not done(results):
            now = time.monotonic()
            if now >= deadline:
                break
            if not resent and now >= resend_at:
                resent = True
                self.send_all(requests, results, deadline)
            wake = deadline if resent else min(deadline, resend_at)
            if select.select([self.sock], [], [], max(0.0, wake - now))[0]:
                self.receive(requests, results)
        return results


def mtu_sizes(mtu):
    return [mtu] + [size for size in MTU_LADDER if size < mtu]


def icmp_probe(peers, mtu, timeout, with_path_mtu=True):
    """Reachability, then path MTU, of every peer: ``{name: (small Echo, {size: Echo} or None)}``.

    Round 1 sends a small echo to every peer (and resolves the neighbours); round 2 sends the
    peers that answered a DF echo of every size of :func:`mtu_sizes` at once, and ends when every
    such peer answered the full size or ``timeout`` passed.
    """
    prober = IcmpProber()
    try:
        small = prober.run({p["name"]: (p["ip"], SMALL_ECHO) for p in peers}, timeout)
        sizes = {}
        if with_path_mtu and mtu:
            answering = [p for p in peers if small[p["name"]].answered]
            requests = {(p["name"], size): (p["ip"], size) for p in answering for size in mtu_sizes(mtu)}

            def full_done(res):
                return all(res[(p["name"], mtu)].done for p in answering)

            by_key = prober.run(requests, timeout, done=full_done) if requests else {}
            for (name, size), echo in by_key.items():
                sizes.setdefault(name, {})[size] = echo
    finally:
        prober.close()
    return {p["name"]: (small[p["name"]], sizes.get(p["name"])) for p in peers}


def peer_label(peer):
    return "%s (%s)" % (peer["name"], peer["ip"])


def check_reachability(node, peers, echoes, timeout):
    rows = []
    for peer in sorted(peers, key=lambda p: p["name"]):
        echo = echoes[peer["name"]][0]
        if echo.answered:
            rows.append(passed("reachability", peer_label(peer), "ICMP echo answered in %.2f ms" % echo.rtt))
            continue
        reason = echo.error or "no ICMP echo reply within %gs" % timeout
        rows.append(
            failed(
                "reachability",
                peer_label(peer),
                reason,
                "check that %s is up and that the underlay between %s and %s carries ICMP (routes, firewalls); "
                "if the address is wrong, fix clustermesh_node_ip of %s"
                % (peer["name"], node["ip"], peer["ip"], peer["name"]),
            )
        )
    return rows


def check_path_mtu(node, peers, echoes, mtu, timeout):
    rows = []
    for peer in sorted(peers, key=lambda p: p["name"]):
        small, sizes = echoes[peer["name"]]
        target = peer_label(peer)
        if not small.answered or sizes is None:
            rows.append(skipped("path_mtu", target, "not probed: the peer does not answer (see reachability)"))
            continue
        full = sizes[mtu]
        if full.answered:
            rows.append(passed("path_mtu", target, "a %d-byte don't-fragment echo was answered" % mtu))
            continue
        largest = max((size for size, echo in sizes.items() if echo.answered), default=None)
        routers = sorted({(e.router, e.mtu) for e in sizes.values() if e.mtu})
        if routers:
            router, hop_mtu = routers[0]
            detail = "a %d-byte don't-fragment echo cannot pass: router %s has a next hop with MTU %d" % (
                mtu,
                router,
                hop_mtu,
            )
        elif full.error:
            detail = "a %d-byte don't-fragment echo failed: %s" % (mtu, full.error)
        else:
            detail = "a %d-byte don't-fragment echo got no reply within %gs" % (mtu, timeout)
        if largest:
            detail += "; the largest that passed was %d bytes" % largest
        detail += ": the path to %s carries less than this node's underlay MTU %d" % (peer["name"], mtu)
        rows.append(
            failed(
                "path_mtu",
                target,
                detail,
                "give every underlay interface and link between %s and %s the same MTU (%s's underlay interface, "
                "routers), or lower this node's underlay MTU to %s"
                % (node["name"], peer["name"], peer["name"], largest or "what the path carries"),
            )
        )
    return rows


# --- on-link and the routing plan --------------------------------------------------------------


def _problem_target(problem):
    """The peer a plan problem is about (``peer NAME ...``), else the field before the colon."""
    if problem.startswith("peer "):
        return problem.split()[1].rstrip(":")
    return problem.split(":", 1)[0]


PEER_MODE_TEXT = {"direct": "direct route", "tunnel": "VXLAN tunnel", "external": "via the external router"}


def _without_peer_prefix(problem, peer):
    for prefix in ("peer %s (%s): " % (peer["name"], peer["ip"]), "peer %s: " % peer["name"]):
        if problem.startswith(prefix):
            return problem[len(prefix) :]
    return problem


def check_onlink(node, peers, mode, prefixlen, mtu=1500, external_router=False):
    """Rows per peer: on the node's segment or routed, and how the routing plan reaches it, or the
    plan's error for it; then the plan's errors about the peer list as a whole (a name listed twice).

    Peers listed with the node's own IP are left to the ``duplicate`` check.
    """
    segment = ipaddress.ip_interface("%s/%s" % (node["ip"], prefixlen)).network
    options = dict(underlay_mtu=mtu or 1500, external_router=external_router)
    rows, reported = [], set()
    for peer in sorted(peers, key=lambda p: p["name"]):
        on_link = ipaddress.ip_address(peer["ip"]) in segment
        where = ("on-link (%s)" if on_link else "routed (off %s)") % segment
        if peer["ip"] == node["ip"]:
            rows.append(skipped("onlink", peer_label(peer), "has this node's own IP (see duplicate)"))
            continue
        try:
            plan = plan_routing(node, [peer], mode, prefixlen, **options)
        except RoutingPlanError as exc:
            reported.update(exc.problems)
            rows += [failed("onlink", peer_label(peer), _without_peer_prefix(p, peer)) for p in exc.problems]
        else:
            rows.append(
                passed("onlink", peer_label(peer), "%s: %s" % (where, PEER_MODE_TEXT[plan.peer_modes[peer["name"]]]))
            )
    try:
        plan_routing(node, [p for p in peers if p["ip"] != node["ip"]], mode, prefixlen, **options)
    except RoutingPlanError as exc:
        named = {p["name"]: p for p in peers}
        for problem in exc.problems:
            if problem in reported:
                continue
            peer = named.get(_problem_target(problem))
            if peer:
                rows.append(failed("onlink", peer_label(peer), _without_peer_prefix(problem, peer)))
            else:
                rows.append(failed("onlink", _problem_target(problem), problem))
    return rows


# --- ports -----------------------------------------------------------------------------------


def parse_proc_net_udp(text, ipv6=False):
    """Sockets of /proc/net/udp (or udp6 with ``ipv6``): [{"address", "port", "uid", "inode"}]."""
    sockets = []
    for line in text.splitlines()[1:]:
        fields = line.split()
        if len(fields) < 10 or ":" not in fields[1]:
            continue
        addr_hex, port_hex = fields[1].rsplit(":", 1)
        raw = bytes.fromhex(addr_hex)
        # the kernel prints each 32-bit word in host byte order
        words = [raw[i : i + 4] for i in range(0, len(raw), 4)]
        packed = b"".join(struct.pack("=I", int.from_bytes(w, "big")) for w in words)
        address = str(ipaddress.IPv6Address(packed) if ipv6 else ipaddress.IPv4Address(packed))
        sockets.append({"address": address, "port": int(port_hex, 16), "uid": int(fields[7]), "inode": int(fields[9])})
    return sockets


def read_udp_sockets(proc="/proc"):
    """The UDP sockets of this network namespace (IPv4 and IPv6)."""
    sockets = []
    for name, v6 in (("udp", False), ("udp6", True)):
        try:
            with open(os.path.join(proc, "net", name), encoding="ascii") as handle:
                sockets += parse_proc_net_udp(handle.read(), ipv6=v6)
        except FileNotFoundError:
            continue
    return sockets


def socket_owners(inodes, proc="/proc"):
    """{inode: [(pid, command)]} of the processes holding the sockets ``inodes`` open."""
    wanted = {"socket:[%d]" % i: i for i in inodes if i}
    owners = {}
    if not wanted:
        return owners
    for pid in os.listdir(proc):
        if not pid.isdigit():
            continue
        fd_dir = os.path.join(proc, pid, "fd")
        try:
            fds = os.listdir(fd_dir)
        except OSError:
            continue
        for fd in fds:
            try:
                target = os.readlink(os.path.join(fd_dir, fd))
            except OSError:
                continue
            if target in wanted:
                try:
                    with open(os.path.join(proc, pid, "comm"), encoding="utf-8", errors="replace") as handle:
                        comm = handle.read().strip()
                except OSError:
                    comm = "?"
                entry = (int(pid), comm)
                if entry not in owners.setdefault(wanted[target], []):
                    owners[wanted[target]].append(entry)
    return owners


def read_vxlan_devices():
    """VXLAN devices of this namespace: [{"name", "port", "up"}] (pyroute2)."""
    from pyroute2 import IPRoute

    devices = []
    with IPRoute() as ipr:
        for link in ipr.get_links():
            info = link.get("IFLA_LINKINFO")
            if not info or info.get("IFLA_INFO_KIND") != "vxlan":
                continue
            data = info.get("IFLA_INFO_DATA") or {}
            devices.append(
                {"name": link.get("IFLA_IFNAME"), "port": data.get("IFLA_VXLAN_PORT"), "up": bool(link["flags"] & 1)}
            )
    return devices


def check_vxlan_port(sockets, owners, vxlan_devices, port=VXLAN_PORT):
    """UDP ``port`` must be free, or held only by the kernel for our own ``cm_vxlan`` device.

    A socket that a process holds (found through /proc/PID/fd) is named with its PID; a socket no
    process holds is a kernel socket of a tunnel device; any VXLAN device on the port other than
    ours, up or down, would take the port from ours.
    """
    target = "udp/%d" % port
    fix_device = "delete it (ip link del %s) or move it to another port, or use mode direct"
    rows = []
    bound = [s for s in sockets if s["port"] == port]
    held = sorted({entry for s in bound for entry in owners.get(s["inode"], [])})
    for pid, comm in held:
        rows.append(
            failed(
                "ports",
                target,
                "held by process %d (%s); VXLAN needs this port" % (pid, comm),
                "stop process %d or move it to another port, or use mode direct" % pid,
            )
        )
    foreign = [d for d in vxlan_devices if d["port"] == port and d["name"] != VXLAN_DEVICE]
    for dev in foreign:
        rows.append(
            failed(
                "ports",
                target,
                "VXLAN device %s (not ours, %s) uses this port" % (dev["name"], "up" if dev["up"] else "down"),
                fix_device % dev["name"],
            )
        )
    kernel = [s for s in bound if not owners.get(s["inode"])]
    ours = [d for d in vxlan_devices if d["port"] == port and d["name"] == VXLAN_DEVICE]
    if kernel and not ours and not foreign:
        rows.append(
            failed(
                "ports",
                target,
                "held by a kernel socket that no process and no VXLAN device here owns (a tunnel device "
                "of another namespace?)",
                "find the tunnel device using UDP %d (ip -d link on every namespace) and remove it" % port,
            )
        )
    if not rows:
        if ours and kernel:
            rows.append(passed("ports", target, "held by our own %s device" % VXLAN_DEVICE))
        else:
            rows.append(passed("ports", target, "free"))
    return rows


def tcp_connect(endpoint, timeout):
    """(ok, detail) of a TCP connect to ``host:port``."""
    host, port = parse_endpoint(endpoint)
    start = time.monotonic()
    try:
        socket.create_connection((host, port), timeout=timeout).close()
    except TimeoutError:
        return False, "no answer to a TCP connect within %gs" % timeout
    except ConnectionRefusedError:
        return False, "connection refused: nothing listens on %s port %d" % (host, port)
    except socket.gaierror as exc:
        return False, "cannot resolve %s: %s" % (host, exc.strerror or exc)
    except OSError as exc:
        return False, "TCP connect failed: %s" % kernel_features.describe_error(exc)
    return True, "TCP connect in %.2f ms" % ((time.monotonic() - start) * 1000.0)


def check_kvstore(results):
    """Rows from {endpoint: (ok, detail)}."""
    rows = []
    for endpoint, (ok, detail) in results.items():
        target = "tcp %s" % endpoint
        if ok:
            rows.append(passed("ports", target, detail))
        else:
            host, port = parse_endpoint(endpoint)
            rows.append(
                failed(
                    "ports",
                    target,
                    detail,
                    "start the kvstore (etcd or its proxy) that should listen on %s:%d, or open TCP port %d on "
                    "the way to it" % (host, port, port),
                )
            )
    return rows


# --- duplicate node IPs ------------------------------------------------------------------------

ETH_P_ARP = 0x0806
ETH_P_IP = 0x0800
ARPHRD_ETHER = 1
ARPOP_REQUEST = 1
ARPOP_REPLY = 2
PACKET_OUTGOING = 4
BROADCAST = b"\xff" * 6
ARP_FORMAT = struct.Struct("!HHBBH6s4s6s4s")


def mac_text(mac):
    return ":".join("%02x" % b for b in mac)


def mac_bytes(text):
    return bytes(int(part, 16) for part in text.split(":"))


def arp_probe_frame(src_mac, target_ip):
    """An RFC 5227 ARP probe as an Ethernet frame: who has ``target_ip``, asked from 0.0.0.0."""
    src = mac_bytes(src_mac) if isinstance(src_mac, str) else src_mac
    arp = ARP_FORMAT.pack(
        ARPHRD_ETHER, ETH_P_IP, 6, 4, ARPOP_REQUEST, src, b"\0" * 4, b"\0" * 6, socket.inet_aton(target_ip)
    )
    frame = BROADCAST + src + struct.pack("!H", ETH_P_ARP) + arp
    return frame.ljust(60, b"\0")  # minimum Ethernet frame without FCS


def parse_arp_frame(frame):
    """An Ethernet frame -> {"op", "sha", "spa", "tha", "tpa"} (MACs as text), or None if not IPv4 ARP."""
    if len(frame) < 14 + ARP_FORMAT.size or struct.unpack("!H", frame[12:14])[0] != ETH_P_ARP:
        return None
    htype, ptype, hlen, plen, op, sha, spa, tha, tpa = ARP_FORMAT.unpack_from(frame, 14)
    if htype != ARPHRD_ETHER or ptype != ETH_P_IP or hlen != 6 or plen != 4:
        return None
    return {
        "op": op,
        "sha": mac_text(sha),
        "spa": socket.inet_ntoa(spa),
        "tha": mac_text(tha),
        "tpa": socket.inet_ntoa(tpa),
    }


def arp_conflicts(messages, own_mac, ip):
    """MACs other than ``own_mac`` that claim ``ip`` (as ARP sender address) in ``messages``."""
    own = own_mac.lower()
    return sorted({m["sha"] for m in messages if m and m["spa"] == ip and m["sha"].lower() != own})


def arp_probe(interface, ip, timeout):
    """Send an ARP probe for ``ip`` on ``interface`` (twice, half ``timeout`` apart) and collect every
    ARP frame for ``timeout`` seconds. Returns (own MAC, [parsed ARP messages]) or raises OSError;
    returns (None, []) when the interface is not Ethernet."""
    sock = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(ETH_P_ARP))
    try:
        sock.bind((interface, ETH_P_ARP))
        _ifname, _proto, _pkttype, hatype, own = sock.getsockname()
        if hatype != ARPHRD_ETHER or len(own) != 6:
            return None, []
        frame = arp_probe_frame(own, ip)
        sock.setblocking(False)
        messages = []
        start = time.monotonic()
        deadline, resend_at = start + timeout, start + timeout / 2
        sock.send(frame)
        resent = False
        while True:
            now = time.monotonic()
            if now >= deadline:
                break
            if not resent and now >= resend_at:
                sock.send(frame)
                resent = True
            wake = deadline if resent else resend_at
            if not select.select([sock], [], [], max(0.0, wake - now))[0]:
                continue
            while True:
                try:
                    data, address = sock.recvfrom(65535)
                except (BlockingIOError, InterruptedError):
                    break
                if address[2] == PACKET_OUTGOING:
                    continue
                message = parse_arp_frame(data)
                if message is not None:
                    messages.append(message)
            if arp_conflicts(messages, mac_text(own), ip):
                break  # found one: no need to wait longer
        return mac_text(own), messages
    finally:
        sock.close()


def check_duplicate_peers(node, peers):
    """A peer listed with the node's IP, or two peers with one IP."""
    rows = []
    for peer in sorted(peers, key=lambda p: p["name"]):
        if peer["ip"] == node["ip"]:
            rows.append(
                failed(
                    "duplicate",
                    peer_label(peer),
                    "peer %s is listed with this node's own IP %s" % (peer["name"], node["ip"]),
                    "give %s and %s different clustermesh_node_ip values" % (node["name"], peer["name"]),
                )
            )
    by_ip = {}
    for peer in peers:
        by_ip.setdefault(peer["ip"], []).append(peer["name"])
    for ip, names in sorted(by_ip.items()):
        if len(names) > 1 and ip != node["ip"]:
            rows.append(
                failed(
                    "duplicate",
                    ip,
                    "peers %s are listed with the same IP" % ", ".join(sorted(names)),
                    "give each node its own clustermesh_node_ip",
                )
            )
    return rows


def check_duplicate_wire(node, interface, own_mac, messages, error=None):
    target = "%s on %s" % (node["ip"], interface)
    if error:
        return [failed("duplicate", target, "ARP probe failed: %s" % error, "run the preflight as root (become)")]
    if own_mac is None:
        return [skipped("duplicate", target, "not an Ethernet interface: no ARP probe")]
    others = arp_conflicts(messages, own_mac, node["ip"])
    if others:
        return [
            failed(
                "duplicate",
                target,
                "another machine answers ARP for %s: MAC %s (ours is %s)" % (node["ip"], ", ".join(others), own_mac),
                "find the machine with MAC %s and give it or %s another address" % (others[0], node["name"]),
            )
        ]
    return [passed("duplicate", target, "no other MAC answered an ARP probe for %s" % node["ip"])]


# --- everything ------------------------------------------------------------------------------


def read_underlay():
    """kernel_features.read_underlay(), or an error text."""
    try:
        return kernel_features.read_underlay(), None
    except kernel_features.ProbeError as exc:
        return None, str(exc)
    except Exception as exc:
        return None, "cannot read the addresses of this host: %s" % kernel_features.describe_error(exc)


def run_preflight(
    node,
    peers,
    mode="tunnel",
    external_router=False,
    masquerade=True,
    features=None,
    kvstore_endpoints=(),
    timeout=DEFAULT_TIMEOUT,
    checks=None,
    probe_timeout=kernel_features.DEFAULT_TIMEOUT,
):
    """Run the selected checks on this host; returns [Check] in table order.

    ``features`` is node_facts' output (see :func:`normalize_features`); features it does not report
    are probed here.  Raises PreflightError for bad input (nothing is sent then).
    """
    selected = select_checks(checks)
    validate_inputs(node, peers, mode, kvstore_endpoints, timeout)
    rows = {name: [] for name in CHECKS}

    # Feature probes fork: they run first, before any thread or netlink socket exists.
    if "features" in selected:
        known = normalize_features(features)
        needed = [name for name, _why in required_features(mode, masquerade)]
        unknown = [name for name in needed if name not in known]
        if unknown:
            known.update(probe_features(unknown, timeout=probe_timeout))
        rows["features"] = check_features(mode, masquerade, known, pyroute2_status())

    underlay, underlay_error = read_underlay()
    entry = find_underlay(node["ip"], underlay) if underlay else None
    mtu = entry["mtu"] if entry else None
    if "underlay" in selected:
        if underlay is None:
            rows["underlay"] = [failed("underlay", node["ip"], underlay_error, FEATURE_FIXES["pyroute2"])]
        else:
            rows["underlay"] = check_underlay(node, mode, underlay)
    no_underlay = "not checked: the node IP %s is not on an interface of this host (see underlay)" % node["ip"]

    probe_peers = [p for p in peers if p["ip"] != node["ip"]]
    tunnel = mode in ("tunnel", "hybrid")
    jobs = {}
    with ThreadPoolExecutor(max_workers=4 + len(kvstore_endpoints)) as pool:
        if ("reachability" in selected or "path_mtu" in selected) and probe_peers:
            jobs["icmp"] = pool.submit(icmp_probe, probe_peers, mtu, timeout, "path_mtu" in selected)
        if "duplicate" in selected and entry:
            jobs["arp"] = pool.submit(arp_probe, entry["interface"], node["ip"], timeout)
        if "ports" in selected:
            jobs.update({("tcp", ep): pool.submit(tcp_connect, ep, timeout) for ep in kvstore_endpoints})
            if tunnel:
                try:
                    sockets = read_udp_sockets()
                    owners = socket_owners([s["inode"] for s in sockets if s["port"] == VXLAN_PORT])
                    devices = read_vxlan_devices()
                    rows["ports"] += check_vxlan_port(sockets, owners, devices)
                except Exception as exc:
                    rows["ports"].append(
                        failed(
                            "ports",
                            "udp/%d" % VXLAN_PORT,
                            "cannot inspect: %s" % kernel_features.describe_error(exc),
                            FEATURE_FIXES["pyroute2"],
                        )
                    )
        results = jobs

        if "icmp" in results:
            try:
                echoes = results["icmp"].result()
            except OSError as exc:
                reason = "cannot send ICMP: %s" % kernel_features.describe_error(exc)
                for name in ("reachability", "path_mtu"):
                    if name in selected:
                        rows[name] = [failed(name, "peers", reason, "run the preflight as root (become)")]
            else:
                if "reachability" in selected:
                    rows["reachability"] = check_reachability(node, probe_peers, echoes, timeout)
                if "path_mtu" in selected:
                    if mtu:
                        rows["path_mtu"] = check_path_mtu(node, probe_peers, echoes, mtu, timeout)
                    else:
                        rows["path_mtu"] = [skipped("path_mtu", "peers", no_underlay)]
        elif probe_peers == [] and ("reachability" in selected or "path_mtu" in selected):
            for name in ("reachability", "path_mtu"):
                if name in selected:
                    rows[name] = [skipped(name, "peers", "no peers")]

        if "duplicate" in selected:
            rows["duplicate"] = check_duplicate_peers(node, peers)
            if entry:
                try:
                    own_mac, messages = results["arp"].result()
                    rows["duplicate"] += check_duplicate_wire(node, entry["interface"], own_mac, messages)
                except OSError as exc:
                    rows["duplicate"] += check_duplicate_wire(
                        node, entry["interface"], None, [], kernel_features.describe_error(exc)
                    )
            else:
                rows["duplicate"].append(skipped("duplicate", node["ip"], no_underlay))

        if "ports" in selected:
            tcp = {ep: results[("tcp", ep)].result() for ep in kvstore_endpoints}
            rows["ports"] += check_kvstore(tcp)

    if "onlink" in selected:
        if entry:
            rows["onlink"] = check_onlink(node, peers, mode, entry["prefixlen"], mtu, external_router)
        else:
            rows["onlink"] = [skipped("onlink", "peers", no_underlay)]
    return [row for name in CHECKS for row in rows[name]]
