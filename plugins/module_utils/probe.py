# -*- coding: utf-8 -*-
# Copyright: clustermesh.core contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""Connectivity probes between pods: an echo server inside a pod, ICMP and TCP checks from a pod.

The echo server answers every TCP connection with one JSON line naming the server and the client
address it saw, so a check proves both that the path works and that nothing NATed the client
(``source_seen`` equals the client pod's IP). Checks run inside the client pod's network namespace
(``setns`` on the calling process before any worker thread starts: threads inherit it), so they take
the pod's own routes exactly as its traffic does.

No Ansible imports: the modules and, later, the agent's health checks use this file.
"""

from __future__ import annotations

import ctypes
import errno
import json
import os
import random
import select
import signal
import socket
import struct
import threading
import time

from .bpf_maps import HAIRPIN_ADDRESS
from .cni_runtime import PodRuntimeError, labels_from_dict

PROBE_PORT = 8080
RUN_DIR = "/run/clustermesh/probe"
CLONE_NEWNET = 0x40000000
ICMP_ECHO_REQUEST = 8
ICMP_ECHO_REPLY = 0
# How long a path expected to be denied is given to answer anyway. Paths in a mesh answer in well under
# 10 ms (the matrix shows the TCP connect times), so 1 s is a wide margin; the ICMP requests of a denied
# path go out together and any one reply counts as an answer, so one lost packet cannot pass for a denial;
# 1 s is also the kernel's first SYN retransmission, so a TCP check sees one SYN (every target of a
# client is checked in parallel: a client's denied paths cost about 2 s in all, however many there are).
DENY_TIMEOUT = 1.0
PROTOCOLS = ("icmp", "tcp")
EXPECT_VALUES = ("allow", "deny")
EXPECT_PROTOCOLS = ("icmp", "tcp", "any")
EXPECT_FIELDS = ("from", "to", "expect", "protocol")
ALL = "all"
PROBE_LABELS = {"app": "clustermesh-probe"}


class ProbeError(Exception):
    pass


# --- namespaces -----------------------------------------------------------------------------------


def enter_netns(path):
    """Move the calling thread (and threads it starts afterwards) into the network namespace at path."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError as exc:
        raise ProbeError("network namespace %s: %s" % (path, exc.strerror)) from None
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.setns(fd, CLONE_NEWNET) != 0:
            err = ctypes.get_errno()
            raise ProbeError("setns(%s): %s" % (path, os.strerror(err)))
    finally:
        os.close(fd)


# --- the echo server ------------------------------------------------------------------------------


def pidfile(name, run_dir=RUN_DIR):
    if not name or "/" in name or name.startswith("."):
        raise ProbeError("probe server name %r is not a plain file name" % (name,))
    return os.path.join(run_dir, name + ".pid")


def _start_time(pid):
    try:
        with open("/proc/%d/stat" % pid) as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None
    return None if fields[0] in ("Z", "X") else int(fields[19])


def server_pid(name, run_dir=RUN_DIR):
    """The pid of our running server, trusted only while its start time matches the pidfile's."""
    try:
        with open(pidfile(name, run_dir)) as f:
            pid, started = (int(x) for x in f.read().split()[:2])
    except (OSError, ValueError):
        return None
    return pid if _start_time(pid) == started else None


def _serve(listener, name):
    while True:
        try:
            conn, peer = listener.accept()
        except InterruptedError:
            continue
        try:
            local = conn.getsockname()
            reply = {"server": name, "ip": local[0], "port": local[1], "client": peer[0], "client_port": peer[1]}
            conn.sendall((json.dumps(reply, sort_keys=True) + "\n").encode())
        except OSError:
            pass
        finally:
            conn.close()


def start_server(name, netns, port=PROBE_PORT, run_dir=RUN_DIR):
    """Start (once) a detached echo server listening on ``port`` inside ``netns``.

    Returns (pid, started_now). The server is a double fork of the caller; it writes
    ``<run_dir>/<name>.pid`` with its start time, so only this very process is ever stopped."""
    pid = server_pid(name, run_dir)
    if pid:
        return pid, False
    os.makedirs(run_dir, mode=0o755, exist_ok=True)
    path = pidfile(name, run_dir)
    ready_r, ready_w = os.pipe()
    child = os.fork()
    if child == 0:  # pragma: no cover - runs in the forked process
        code = 1
        try:
            os.close(ready_r)
            os.setsid()
            if os.fork() > 0:
                os._exit(0)
            enter_netns(netns)
            listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            listener.bind(("0.0.0.0", port))
            listener.listen(128)
            me = os.getpid()
            tmp = path + ".tmp"
            with open(tmp, "w") as f:
                f.write("%d %d\n" % (me, _start_time(me)))
            os.replace(tmp, path)
            devnull = os.open(os.devnull, os.O_RDWR)
            for fd in (0, 1, 2):
                os.dup2(devnull, fd)
            keep = {listener.fileno(), ready_w}
            for fd in range(3, 1024):
                if fd not in keep:
                    try:
                        os.close(fd)
                    except OSError:
                        pass
            os.write(ready_w, b"ok")
            os.close(ready_w)
            signal.signal(signal.SIGTERM, signal.SIG_DFL)
            _serve(listener, name)
        except BaseException as exc:  # report to the parent, never return into its code
            try:
                os.write(ready_w, ("error: %s" % exc).encode()[:500])
            except OSError:
                pass
        os._exit(code)
    os.close(ready_w)
    os.waitpid(child, 0)
    answer = b""
    while True:
        chunk = os.read(ready_r, 512)
        if not chunk:
            break
        answer += chunk
    os.close(ready_r)
    if answer != b"ok":
        raise ProbeError("probe server %s in %s: %s" % (name, netns, answer.decode(errors="replace") or "died"))
    return server_pid(name, run_dir), True


def stop_server(name, run_dir=RUN_DIR, timeout=5.0):
    """Stop our server; True when one was running."""
    pid = server_pid(name, run_dir)
    path = pidfile(name, run_dir)
    if not pid:
        if os.path.exists(path):
            os.unlink(path)
        return False
    os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout
    while _start_time(pid) is not None and time.monotonic() < deadline:
        time.sleep(0.02)
    if _start_time(pid) is not None:
        os.kill(pid, signal.SIGKILL)
    os.unlink(path)
    return True


# --- checks ---------------------------------------------------------------------------------------


def _checksum(data):
    if len(data) % 2:
        data += b"\0"
    total = sum(struct.unpack("!%dH" % (len(data) // 2), data))
    total = (total >> 16) + (total & 0xFFFF)
    total += total >> 16
    return ~total & 0xFFFF


def icmp_echo_request(ident, seq, payload=b"clustermesh-probe"):
    header = struct.pack("!BBHHH", ICMP_ECHO_REQUEST, 0, 0, ident, seq)
    return struct.pack("!BBHHH", ICMP_ECHO_REQUEST, 0, _checksum(header + payload), ident, seq) + payload


def parse_echo_reply(packet):
    """(source ip, ident, seq) of an ICMP echo reply inside an IPv4 packet, or None."""
    if len(packet) < 28:
        return None
    ihl = (packet[0] & 0x0F) * 4
    icmp = packet[ihl : ihl + 8]
    if len(icmp) < 8:
        return None
    kind, _code, _sum, ident, seq = struct.unpack("!BBHHH", icmp)
    if kind != ICMP_ECHO_REPLY:
        return None
    return socket.inet_ntoa(packet[12:16]), ident, seq


def icmp_probe(dst, count=3, timeout=1.0, interval=0.02, burst=False):
    """Ping ``dst`` ``count`` times; ok when at least one reply came back. RTT is the median, in ms.

    Each request waits up to ``timeout`` for its reply before the next goes out; with ``burst`` every
    request goes out first (``interval`` apart) and replies are awaited until ``timeout`` after the last
    one (a path expected to be denied: no reply, quickly)."""
    ident = random.randint(1, 0xFFFF)
    rtts = []
    try:
        sock = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_ICMP)
    except OSError as exc:
        return {"ok": False, "sent": 0, "received": 0, "rtt_ms": None, "detail": "raw socket: %s" % exc.strerror}
    with sock:
        if burst:
            sent_at = {}
            for seq in range(1, count + 1):
                sent_at[seq] = time.perf_counter()
                try:
                    sock.sendto(icmp_echo_request(ident, seq), (dst, 0))
                except OSError as exc:
                    return {"ok": False, "sent": seq, "received": 0, "rtt_ms": None, "detail": exc.strerror}
                if seq < count:
                    time.sleep(interval)
            deadline = time.perf_counter() + timeout
            while sent_at:
                left = deadline - time.perf_counter()
                if left <= 0 or not select.select([sock], [], [], left)[0]:
                    break
                reply = parse_echo_reply(sock.recv(2048))
                if reply and reply[0] == dst and reply[1] == ident and reply[2] in sent_at:
                    rtts.append((time.perf_counter() - sent_at.pop(reply[2])) * 1000.0)
        else:
            for seq in range(1, count + 1):
                sent = time.perf_counter()
                try:
                    sock.sendto(icmp_echo_request(ident, seq), (dst, 0))
                except OSError as exc:
                    return {"ok": False, "sent": seq, "received": len(rtts), "rtt_ms": None, "detail": exc.strerror}
                deadline = sent + timeout
                while True:
                    left = deadline - time.perf_counter()
                    if left <= 0 or not select.select([sock], [], [], left)[0]:
                        break
                    reply = parse_echo_reply(sock.recv(2048))
                    if reply == (dst, ident, seq):
                        rtts.append((time.perf_counter() - sent) * 1000.0)
                        break
                if seq < count:
                    time.sleep(interval)
    rtts.sort()
    return {
        "ok": bool(rtts),
        "sent": count,
        "received": len(rtts),
        "rtt_ms": round(rtts[len(rtts) // 2], 3) if rtts else None,
        "detail": "%d/%d replies" % (len(rtts), count) + (" within %.1f s" % timeout if burst and not rtts else ""),
    }


def tcp_probe(dst, port=PROBE_PORT, timeout=2.0):
    """Connect to an echo server and read its reply: ok, connect time in ms, what the server saw.

    ``connected`` tells whether the handshake completed at all (the path let the connection through),
    ``ok`` that the echo server answered too."""
    started = time.perf_counter()
    try:
        sock = socket.create_connection((dst, port), timeout=timeout)
    except TimeoutError:
        return {
            "ok": False,
            "connected": False,
            "rtt_ms": None,
            "reply": None,
            "detail": "timed out after %.1f s" % timeout,
        }
    except OSError as exc:
        detail = exc.strerror or errno.errorcode.get(exc.errno)
        return {"ok": False, "connected": False, "rtt_ms": None, "reply": None, "detail": detail}
    connected = round((time.perf_counter() - started) * 1000.0, 3)
    data = b""
    with sock:
        try:
            while not data.endswith(b"\n"):
                chunk = sock.recv(4096)
                if not chunk:
                    break
                data += chunk
        except TimeoutError:
            detail = "connected, no reply within %.1f s" % timeout
            return {"ok": False, "connected": True, "rtt_ms": connected, "reply": None, "detail": detail}
        except OSError as exc:
            detail = "connected, then %s" % (exc.strerror or errno.errorcode.get(exc.errno))
            return {"ok": False, "connected": True, "rtt_ms": connected, "reply": None, "detail": detail}
    try:
        reply = json.loads(data.decode())
    except ValueError:
        return {
            "ok": False,
            "connected": True,
            "rtt_ms": connected,
            "reply": None,
            "detail": "not an echo reply: %r" % data,
        }
    detail = "served by %s" % reply.get("server")
    return {"ok": True, "connected": True, "rtt_ms": connected, "reply": reply, "detail": detail}


def check_target(target, source_ip, icmp_count=3, timeout=1.0, deny_timeout=DENY_TIMEOUT):
    """One target {name, ip, port?, expect?}: ICMP and TCP; ``nat`` is true when the server saw another source.

    ``expect`` ({icmp, tcp}: allow or deny, default allow) says what the path should do: a protocol
    expected to be denied is given only ``deny_timeout`` seconds to answer (see DENY_TIMEOUT). ``ok`` is
    true when every protocol did what was expected (see :func:`path_verdict`)."""
    expect = expectation_of(target)
    result = {"name": target["name"], "ip": target["ip"], "expect": expect}
    if expect["icmp"] == "deny":
        result["icmp"] = icmp_probe(target["ip"], count=icmp_count, timeout=deny_timeout, burst=True)
    else:
        result["icmp"] = icmp_probe(target["ip"], count=icmp_count, timeout=timeout)
    tcp_timeout = deny_timeout if expect["tcp"] == "deny" else max(timeout, 1.0) * 2
    result["tcp"] = tcp_probe(target["ip"], target.get("port") or PROBE_PORT, timeout=tcp_timeout)
    seen = (result["tcp"].get("reply") or {}).get("client")
    result["source_seen"] = seen
    result["nat"] = bool(seen and source_ip and seen != source_ip)
    verdict = path_verdict(result, source_ip)
    result["observed"] = verdict["observed"]
    result["ok"] = verdict["ok"]
    return result


def check_targets(targets, source_ip=None, netns=None, icmp_count=3, timeout=1.0, deny_timeout=DENY_TIMEOUT):
    """Check every target in parallel, from inside ``netns`` when given; results in target order."""
    if netns:
        enter_netns(netns)
    results = [None] * len(targets)

    def work(i, target):
        results[i] = check_target(target, source_ip, icmp_count, timeout, deny_timeout)

    threads = [threading.Thread(target=work, args=(i, t)) for i, t in enumerate(targets)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return results


def service_probe(service, source_ip=None, timeout=2.0):
    """Many TCP connections to a ClusterIP: {name, ip, port, count, backends: {backend ip: answers},
    failures, nat, missing, ok}. ``service`` is {name, ip, port, count, expect?}; ``expect`` lists the
    backend IPs that must each answer at least once. Each echo reply names the backend's own address,
    so the spread shows the load balancing; a client address other than ``source_ip`` is NAT."""
    backends, failures, nat = {}, [], []
    for _attempt in range(service["count"]):
        result = tcp_probe(service["ip"], service["port"], timeout=timeout)
        if not result["ok"]:
            failures.append(result["detail"])
            continue
        reply = result["reply"]
        backend = reply.get("ip") or "?"
        backends[backend] = backends.get(backend, 0) + 1
        # a pod that the service sends to itself (hairpin) is seen from the datapath's hairpin address
        expected_client = HAIRPIN_ADDRESS if backend == source_ip else source_ip
        if source_ip and reply.get("client") != expected_client:
            nat.append(reply.get("client"))
    missing = sorted(set(service.get("expect") or ()) - set(backends))
    return {
        "name": service["name"],
        "ip": service["ip"],
        "port": service["port"],
        "count": service["count"],
        "backends": backends,
        "failures": failures,
        "nat": sorted(set(nat)),
        "missing": missing,
        "ok": not failures and not nat and not missing,
    }


def check_services(services, source_ip=None, netns=None, timeout=2.0):
    """:func:`service_probe` for each service, one after the other, from inside ``netns`` when given."""
    if netns:
        enter_netns(netns)
    return [service_probe(service, source_ip, timeout) for service in services]


# --- expectations: which paths should be allowed, which denied --------------------------------------


def expectation_of(target):
    """The {icmp, tcp} expectation of a target or result; anything not named is allowed."""
    given = target.get("expect") or {}
    return {proto: given.get(proto) or "allow" for proto in PROTOCOLS}


def _describe(value):
    return "%r" % (value,) if isinstance(value, str) else "%s (%s)" % (value, type(value).__name__)


def check_expectations(expect, hosts):
    """Validate ``connectivity_expect`` against ``hosts`` ({host: cluster name}).

    Returns (entries, errors): the entries with ``protocol`` filled in (default ``any``), and one message
    per problem, each naming the entry index and the field, e.g.
    ``connectivity_expect[2].to: 'c3-n1' is not a host or cluster of the inventory (...)``."""
    if expect is None:
        return [], []
    if not isinstance(expect, (list, tuple)):
        return [], ["connectivity_expect: must be a list of {from, to, expect, protocol}, got %s" % _describe(expect)]
    clusters = sorted(set(hosts.values()) - {None, ""})
    names = set(hosts) | set(clusters) | {ALL}
    known = "hosts: %s; clusters: %s; or 'all'" % (", ".join(sorted(hosts)) or "none", ", ".join(clusters) or "none")
    entries, errors = [], []
    for i, entry in enumerate(expect):
        where = "connectivity_expect[%d]" % i
        if not isinstance(entry, dict):
            errors.append("%s: must be a mapping {from, to, expect, protocol}, got %s" % (where, _describe(entry)))
            continue
        problems = []
        for key in sorted(set(entry) - set(EXPECT_FIELDS), key=str):
            problems.append("%s: unknown field %s (fields: %s)" % (where, _describe(key), ", ".join(EXPECT_FIELDS)))
        for field in ("from", "to"):
            value = entry.get(field)
            if value is None:
                problems.append("%s.%s: missing (a host, a cluster or 'all')" % (where, field))
            elif not isinstance(value, str) or value not in names:
                problems.append(
                    "%s.%s: %s is not a host or cluster of the inventory (%s)" % (where, field, _describe(value), known)
                )
            elif value in hosts and value in clusters:
                problems.append("%s.%s: %r is both a host and a cluster: rename one" % (where, field, value))
        value = entry.get("expect")
        if value is None:
            problems.append("%s.expect: missing (allow or deny)" % where)
        elif value not in EXPECT_VALUES:
            problems.append("%s.expect: %s is not allow or deny" % (where, _describe(value)))
        value = entry.get("protocol", "any")
        if value not in EXPECT_PROTOCOLS:
            problems.append("%s.protocol: %s is not icmp, tcp or any" % (where, _describe(value)))
        if problems:
            errors.extend(problems)
            continue
        entries.append(
            {
                "from": entry["from"],
                "to": entry["to"],
                "expect": entry["expect"],
                "protocol": entry.get("protocol", "any"),
            }
        )
    return entries, errors


def _matches(name, host, hosts):
    return name in (ALL, host) or (name not in hosts and hosts.get(host) == name)


def expectation(entries, client, target, hosts):
    """{icmp, tcp} of one path: the last entry naming it wins, per protocol; default allow."""
    cell = {proto: "allow" for proto in PROTOCOLS}
    for entry in entries:
        if _matches(entry["from"], client, hosts) and _matches(entry["to"], target, hosts):
            for proto in PROTOCOLS if entry["protocol"] == "any" else (entry["protocol"],):
                cell[proto] = entry["expect"]
    return cell


def resolve_expectations(entries, hosts):
    """{client: {target: {icmp, tcp}}} for every pair of distinct hosts; later entries win, default allow."""
    return {c: {t: expectation(entries, c, t, hosts) for t in hosts if t != c} for c in hosts}


def probe_labels(extra, where="connectivity_pod_labels"):
    """The probe pod's labels: app=clustermesh-probe with ``extra`` merged over it; (labels, errors)."""
    if extra is None:
        extra = {}
    if not isinstance(extra, dict):
        return dict(PROBE_LABELS), ["%s: must be a mapping of label keys to values, got %s" % (where, _describe(extra))]
    errors = []
    for key, value in PROBE_LABELS.items():
        if key in extra and str(extra[key]) != value:
            errors.append(
                "%s: %s=%s would drop the label %s=%s that the probe service selects: choose another key"
                % (where, key, extra[key], key, value)
            )
    try:
        pairs = labels_from_dict(dict(PROBE_LABELS, **{str(k): v for k, v in extra.items()}))
    except PodRuntimeError as exc:
        errors.append("%s: %s" % (where, str(exc).split(": ", 1)[-1]))
        return dict(PROBE_LABELS), errors
    return {pair["key"]: pair["value"] for pair in pairs}, errors


def expectation_plan(expect, hosts, pod_labels=None):
    """Everything connectivity.yml needs before it makes a pod, from ``connectivity_expect``, the hosts
    ({host: cluster}) and each host's ``connectivity_pod_labels`` ({host: labels}):

    ``errors`` (every problem at once), ``expect`` (the entries, normalised), ``paths`` (see
    :func:`resolve_expectations`), ``denied_tcp`` ({client: [targets its TCP is expected denied to, itself
    included when an entry names it on both sides]}: the ClusterIP checks of those clients are skipped)
    and ``labels`` ({host: probe pod labels})."""
    entries, errors = check_expectations(expect, hosts)
    labels = {}
    for host in hosts:
        labels[host], problems = probe_labels((pod_labels or {}).get(host), "%s: connectivity_pod_labels" % host)
        errors.extend(problems)
    if errors:
        return {"errors": errors, "expect": entries, "paths": {}, "denied_tcp": {}, "labels": labels}
    paths = resolve_expectations(entries, hosts)
    # a client's own pod is one of its ClusterIP's backends (hairpin): 'to: all' or its cluster counts too
    denied_tcp = {
        c: sorted(t for t in hosts if (row[t] if t != c else expectation(entries, c, c, hosts))["tcp"] == "deny")
        for c, row in paths.items()
    }
    return {"errors": [], "expect": entries, "paths": paths, "denied_tcp": denied_tcp, "labels": labels}


def probe_targets(names, ips, paths=None):
    """pod_probe's ``targets`` for one client: [{name, ip, expect: {icmp, tcp}}] (``paths``: its row)."""
    paths = paths or {}
    return [
        {"name": n, "ip": ip, "expect": expectation_of({"expect": paths.get(n)})}
        for n, ip in zip(names, ips, strict=True)
    ]


def path_verdict(result, client_ip=None):
    """What a checked path did against what it was expected to do.

    Observed per protocol: ``allow`` when the path answered (an ICMP echo reply; a completed TCP
    handshake), else ``deny``. A protocol expected ``deny`` passes when it got no answer; one expected
    ``allow`` passes when it answered - for TCP only with the echo server's reply and the client's own
    address seen by the server (no NAT). Returns {expect, observed, differences: [{protocol, expected,
    observed, detail}], ok}."""
    expect = expectation_of(result)
    icmp, tcp = result["icmp"], result["tcp"]
    connected = tcp.get("connected")
    if connected is None:  # results of an older pod_probe
        connected = bool(tcp["ok"] or tcp.get("rtt_ms") is not None)
    observed = {"icmp": "allow" if icmp["ok"] else "deny", "tcp": "allow" if connected else "deny"}
    differences = []
    if observed["icmp"] != expect["icmp"]:
        differences.append({"protocol": "icmp", "detail": icmp["detail"]})
    if expect["tcp"] == "deny":
        if connected:
            differences.append({"protocol": "tcp", "detail": "connected in %.2f ms" % (tcp.get("rtt_ms") or 0.0)})
    elif not tcp["ok"]:
        differences.append({"protocol": "tcp", "detail": tcp["detail"]})
    elif result.get("nat"):
        detail = "NAT: the server saw source %s instead of %s" % (result.get("source_seen"), client_ip or "the pod IP")
        differences.append({"protocol": "tcp", "detail": detail})
    for diff in differences:
        diff["expected"] = expect[diff["protocol"]]
        diff["observed"] = observed[diff["protocol"]]
    return {"expect": expect, "observed": observed, "differences": differences, "ok": not differences}


def difference_line(client, target, difference):
    """``c1-n1 -> c2-n1 tcp: expected deny, observed allow (connected in 0.31 ms)``."""
    return "%s -> %s %s: expected %s, observed %s (%s)" % (
        client,
        target,
        difference["protocol"],
        difference["expected"],
        difference["observed"],
        difference["detail"],
    )


# --- the report -----------------------------------------------------------------------------------


def _cell(res, verdict):
    """A matrix cell when some path is expected to be denied (see :func:`matrix`)."""
    if verdict["ok"]:
        answered = [p for p in PROTOCOLS if verdict["observed"][p] == "allow"]
        if len(answered) == len(PROTOCOLS):
            return "ok %.2fms" % (res["tcp"]["rtt_ms"] or 0.0)
        return "%s only" % answered[0] if answered else "denied"
    if res.get("nat") and verdict["expect"]["tcp"] == "allow" and res["tcp"]["ok"]:
        return "NAT(%s)" % res["source_seen"]
    parts = []
    for word, expected in (("ALLOWED", "deny"), ("FAIL", "allow")):
        protos = [d["protocol"] for d in verdict["differences"] if d["expected"] == expected]
        if protos:
            parts.append(word if len(protos) == len(PROTOCOLS) else "%s %s" % (word, protos[0]))
    return " ".join(parts)


MATRIX_LEGEND = (
    "cells: ok = answered, denied = no answer, '<protocol> only' = only that protocol answered (all as expected);"
    " ALLOWED [protocol] = answered though expected denied; FAIL [protocol] = no answer though expected allowed"
)


def matrix(rows):
    """One table from per-client results: rows are {client, ip, results: [check_target results]}.

    When every path is expected to be allowed (no ``expect`` denies anything), each cell is
    ``ok <rtt> ms`` or the reason it failed (icmp, tcp, or nat: the source seen) and each failure is one
    line naming both protocols' details, as before expectations existed. When some path is expected to
    be denied, cells show what was observed (see MATRIX_LEGEND) and each difference is one line
    ``c1-n1 -> c2-n1 tcp: expected deny, observed allow (...)``.

    Returns {lines, failures (strings), differences, paths (expected vs observed per path), total,
    passed, expected_denied}."""
    clients = [r["client"] for r in rows]
    named = {res["name"] for r in rows for res in r["results"]}
    # columns in the rows' order, so the empty diagonal lines up; targets that are no client last
    targets = [c for c in clients if c in named] + sorted(named.difference(clients))
    denials = any("deny" in expectation_of(res).values() for r in rows for res in r["results"])
    cells, failures, differences, paths = {}, [], [], []
    expected_denied = 0
    for r in rows:
        for res in r["results"]:
            verdict = path_verdict(res, r["ip"])
            expected_denied += "deny" in verdict["expect"].values()
            paths.append(
                {
                    "client": r["client"],
                    "target": res["name"],
                    "ip": res["ip"],
                    "expect": verdict["expect"],
                    "observed": verdict["observed"],
                    "ok": verdict["ok"],
                }
            )
            for diff in verdict["differences"]:
                differences.append(dict(diff, client=r["client"], target=res["name"]))
            if denials:
                cells[(r["client"], res["name"])] = _cell(res, verdict)
                failures.extend(difference_line(r["client"], res["name"], d) for d in verdict["differences"])
                continue
            if res["ok"]:
                cell = "ok %.2fms" % (res["tcp"]["rtt_ms"] or 0.0)
            elif res.get("nat"):
                cell = "NAT(%s)" % res["source_seen"]
            elif not res["icmp"]["ok"] and not res["tcp"]["ok"]:
                cell = "FAIL"
            elif not res["icmp"]["ok"]:
                cell = "FAIL icmp"
            else:
                cell = "FAIL tcp"
            if not res["ok"]:
                failures.append(
                    "%s -> %s (%s): icmp %s; tcp %s%s"
                    % (
                        r["client"],
                        res["name"],
                        res["ip"],
                        res["icmp"]["detail"],
                        res["tcp"]["detail"],
                        "; server saw source %s instead of %s" % (res["source_seen"], r["ip"])
                        if res.get("nat")
                        else "",
                    )
                )
            cells[(r["client"], res["name"])] = cell
    width = max([len("from \\ to")] + [len(c) for c in clients])
    colw = {t: max(len(t), *(len(cells.get((c, t), "-")) for c in clients)) for t in targets}
    lines = [("%-*s  %s" % (width, "from \\ to", "  ".join("%-*s" % (colw[t], t) for t in targets))).rstrip()]
    for c in clients:
        cells_of_c = "  ".join("%-*s" % (colw[t], cells.get((c, t), "-")) for t in targets)
        lines.append(("%-*s  %s" % (width, c, cells_of_c)).rstrip())
    total = len(paths)
    passed = sum(1 for p in paths if p["ok"]) if denials else total - len(failures)
    if denials:
        lines.append(
            "%d of %d paths as expected (%d expected denied in whole or in part)" % (passed, total, expected_denied)
        )
        lines.append(MATRIX_LEGEND)
    else:
        lines.append("%d of %d paths ok" % (passed, total))
    return {
        "lines": lines,
        "failures": failures,
        "differences": differences,
        "paths": paths,
        "total": total,
        "passed": passed,
        "expected_denied": expected_denied,
    }


def service_line(result):
    """One line for a :func:`service_probe` result (with ``client``): what the ClusterIP check saw.

    A result with ``skipped`` (a reason) is a check that did not run."""
    if result.get("skipped"):
        return "%s -> %s:%s (%s): skipped, %s" % (
            result.get("client", "?"),
            result.get("ip", "?"),
            result.get("port", "?"),
            result.get("name", "?"),
            result["skipped"],
        )
    spread = " ".join("%s:%d" % (ip, n) for ip, n in sorted(result["backends"].items()))
    head = "%s -> %s:%s (%s)" % (result.get("client", "?"), result["ip"], result["port"], result["name"])
    if result["ok"]:
        return "%s: ok, %d connections to %d backends: %s" % (head, result["count"], len(result["backends"]), spread)
    problems = []
    if result["failures"]:
        problems.append("%d of %d failed (%s)" % (len(result["failures"]), result["count"], result["failures"][0]))
    if result["missing"]:
        problems.append("never answered: %s" % ", ".join(result["missing"]))
    if result["nat"]:
        problems.append("NAT: servers saw %s" % ", ".join(result["nat"]))
    return "%s: FAIL %s; answered: %s" % (head, "; ".join(problems), spread or "none")
