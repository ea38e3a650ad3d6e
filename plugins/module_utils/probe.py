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

PROBE_PORT = 8080
RUN_DIR = "/run/clustermesh/probe"
CLONE_NEWNET = 0x40000000
ICMP_ECHO_REQUEST = 8
ICMP_ECHO_REPLY = 0


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


def icmp_probe(dst, count=3, timeout=1.0, interval=0.02):
    """Ping ``dst`` ``count`` times; ok when at least one reply came back. RTT is the median, in ms."""
    ident = random.randint(1, 0xFFFF)
    rtts = []
    try:
        sock = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_ICMP)
    except OSError as exc:
        return {"ok": False, "sent": 0, "received": 0, "rtt_ms": None, "detail": "raw socket: %s" % exc.strerror}
    with sock:
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
        "detail": "%d/%d replies" % (len(rtts), count),
    }


def tcp_probe(dst, port=PROBE_PORT, timeout=2.0):
    """Connect to an echo server and read its reply: ok, connect time in ms, what the server saw."""
    started = time.perf_counter()
    try:
        with socket.create_connection((dst, port), timeout=timeout) as sock:
            connected = (time.perf_counter() - started) * 1000.0
            data = b""
            while not data.endswith(b"\n"):
                chunk = sock.recv(4096)
                if not chunk:
                    break
                data += chunk
    except TimeoutError:
        return {"ok": False, "rtt_ms": None, "reply": None, "detail": "timed out after %.1f s" % timeout}
    except OSError as exc:
        return {"ok": False, "rtt_ms": None, "reply": None, "detail": exc.strerror or errno.errorcode.get(exc.errno)}
    try:
        reply = json.loads(data.decode())
    except ValueError:
        return {"ok": False, "rtt_ms": round(connected, 3), "reply": None, "detail": "not an echo reply: %r" % data}
    return {"ok": True, "rtt_ms": round(connected, 3), "reply": reply, "detail": "served by %s" % reply.get("server")}


def check_target(target, source_ip, icmp_count=3, timeout=1.0):
    """One target {name, ip, port?}: ICMP and TCP; ``nat`` is true when the server saw another source."""
    result = {"name": target["name"], "ip": target["ip"]}
    result["icmp"] = icmp_probe(target["ip"], count=icmp_count, timeout=timeout)
    result["tcp"] = tcp_probe(target["ip"], target.get("port") or PROBE_PORT, timeout=max(timeout, 1.0) * 2)
    seen = (result["tcp"].get("reply") or {}).get("client")
    result["source_seen"] = seen
    result["nat"] = bool(seen and source_ip and seen != source_ip)
    result["ok"] = result["icmp"]["ok"] and result["tcp"]["ok"] and not result["nat"]
    return result


def check_targets(targets, source_ip=None, netns=None, icmp_count=3, timeout=1.0):
    """Check every target in parallel, from inside ``netns`` when given; results in target order."""
    if netns:
        enter_netns(netns)
    results = [None] * len(targets)

    def work(i, target):
        results[i] = check_target(target, source_ip, icmp_count, timeout)

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


# --- the report -----------------------------------------------------------------------------------


def matrix(rows):
    """One table from per-client results: rows are {client, ip, results: [check_target results]}.

    Each cell is ``ok <rtt> ms`` or the reason it failed (icmp, tcp, or nat: the source seen)."""
    clients = [r["client"] for r in rows]
    named = {res["name"] for r in rows for res in r["results"]}
    # columns in the rows' order, so the empty diagonal lines up; targets that are no client last
    targets = [c for c in clients if c in named] + sorted(named.difference(clients))
    cells = {}
    failures = []
    for r in rows:
        for res in r["results"]:
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
    total = sum(len(r["results"]) for r in rows)
    lines.append("%d of %d paths ok" % (total - len(failures), total))
    return {"lines": lines, "failures": failures, "total": total, "passed": total - len(failures)}


def service_line(result):
    """One line for a :func:`service_probe` result (with ``client``): what the ClusterIP check saw."""
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
