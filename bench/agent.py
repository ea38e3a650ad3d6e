"""Node agent (meshd) benchmarks (issue 5), on a lab of prefix ``cmba``; about 2 to 3 minutes.

    python bench/agent.py [--rounds N] [--changes N] [--services N] [--scale-changes N]
                          [--only convergence|scale] [--profile DIR] [--output PATH]
                          [--keep-lab] [--reuse-lab]

The lab: the default topology (cluster1 = c1-n1, c1-n2; cluster2 = c2-n1, c2-n2) and
``playbooks/site.yml`` with ``agent_state=absent`` (etcd and HAProxy per cluster, PKI, clusters.d,
routing, CNI; no role agent). meshd runs on c1-n1 only, started from the working tree with a pidfile
(``/etc/clustermesh/agent.yaml`` written here; maps pinned in ``/sys/fs/bpf/clustermesh/cmba-c1-n1``).
Cluster2 has no agent: this script writes its state straight into its etcd (admin,
``/etc/clustermesh/kvstore.yaml`` of c2-n1), its synced canaries included, so the path measured is
cluster2's etcd -> cluster2's HAProxy -> c1-n1's remote-cluster watch -> merge -> the pinned BPF maps.

convergence  per round, ``--changes`` (200) changes of each kind, one at a time, each timed from the
             start of the etcd request (in c2-n1) to the first poll that sees it in c1-n1's maps (a
             poller in c1-n1 reads the pinned maps every ~1 ms; both clocks are CLOCK_REALTIME,
             shared by all namespaces):
             ipcache: an entry ``cilium/state/ip/v1/default/<ip>`` (identity 131072 + n, cluster2's
             range) put, then deleted -> cm_ipcache has it with that identity / lacks it;
             backend: cluster1 declares ``bench/conv`` (global, shared); cluster2's ClusterService of
             it gains one backend, then loses it again -> cm_lb_svc/cm_lb_be load-balance the
             frontend to exactly the published set.
scale        ``--services`` (5,000) global services x 4 backends in each cluster: cluster2's
             ClusterServices (backends in 10.2.0.0/16) in its etcd; cluster1's declarations and its
             4 backends per service as backend slices of a made-up node ``bench-node``. Per round:
             meshd started on c1-n1 with a fresh pin directory (nothing in the maps): time from
             the process start to the maps holding every frontend with its 8 backends, and the
             agent's peak RSS (VmHWM); then meshd restarted with those maps pinned: time from
             the process start to its first reconcile (adopt + a sync that writes nothing); then
             ``--scale-changes`` (40) backend changes of one service, timed as above, with every
             service loaded.

``--profile DIR`` runs meshd with every thread under cProfile (stats in DIR, one file per start);
``--reuse-lab`` uses lab cmba as a previous ``--keep-lab`` run left it (development).
Prints the load average and a table, and writes bench/results/agent.json. The lab is removed at
the end (also on failure, Ctrl-C or SIGTERM) unless ``--keep-lab``.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import subprocess
import sys
import time
import traceback

import benchlib
from benchlib import labtools

PREFIX = "cmba"
NAME = "agent"
SITE = os.path.join(benchlib.REPO_ROOT, "playbooks", "site.yml")
# the mesh without the role agent (where site.yml has it): this script runs meshd itself, from the working tree
SITE_ARGS = ("-e", "agent_state=absent")
LB_OBJECT = os.path.join(benchlib.REPO_ROOT, "build", "bpf", "lb.o")
AGENT_HOST = "c1-n1"  # the measured agent (cluster1)
WRITER1_HOST = "c1-n1"  # cluster1's admin (declarations, slices)
WRITER2_HOST = "c2-n1"  # cluster2's admin (its etcd member)
PIN_DIR = "/sys/fs/bpf/clustermesh/%s-%s" % (PREFIX, AGENT_HOST)
PIDFILE = "/run/clustermesh/meshd.pid"
STARTFILE = "/run/clustermesh/meshd.start"
LOGFILE = "/var/log/clustermesh/meshd.log"
RUNNER = "/tmp/cmba-meshd.py"  # inside the host (its private /tmp)
API_SOCKET = "/run/clustermesh/meshd.sock"
NAMESPACE = "bench"
CONV_SERVICE = "conv"
CONV_IP = {"cluster1": "172.30.1.200", "cluster2": "172.30.2.200"}
SCALE_IP_BASE = {"cluster1": (172, 20), "cluster2": (172, 21)}
BACKEND_PORT = 8080
FRONTEND_PORT = 80
MADE_UP_NODE = "bench-node"
IDENTITY_BASE = 2 << 16  # cluster2's identity range starts at 131072 (255 connected clusters)
TXN_OPS = 100  # puts per etcd transaction (etcd's --max-txn-ops defaults to 128)
CHANGE_TIMEOUT = 10.0  # seconds one change may take before it counts as lost
SCALE_TIMEOUT = 90.0
AT_SCALE_SERVICE = 42  # the service whose backends change with every service loaded
CONV_TARGET_MS = 250.0
SCALE_TARGET_S = 10.0
RSS_TARGET_MB = 150.0

# --------------------------------------------------------------------------------------------
# programs run inside lab hosts (JSON lines on stdin -> one JSON line on stdout per command)
# --------------------------------------------------------------------------------------------

# Writer: the host's admin client (/etc/clustermesh/kvstore.yaml), connected once.
#   {"op": "put", "key", "value"} / {"op": "delete", "key"}: one request; answers the wall clock
#       just before it (t) and after it (done);
#   {"op": "bulk", "items": [[key, value], ...]}: transactions of TXN_OPS puts;
#   {"op": "delete_prefix", "prefix"}.
WRITER = r"""
import json, sys, time
from pyetcd import etcdrpc
from ansible_collections.clustermesh.core.plugins.module_utils.kvstore_client import KVStoreClient
from ansible_collections.clustermesh.core.plugins.module_utils.kvstore_config import load_etcd_config

batch = int(sys.argv[1])
client = KVStoreClient.from_config(load_etcd_config("/etc/clustermesh/kvstore.yaml"), timeout=30)
client.get("cilium/.heartbeat")  # connected (TLS handshake done) before anything is timed
kv = client.stub("KV")
print(json.dumps({"ready": True, "user": client.user, "endpoints": client.endpoints}), flush=True)
for line in sys.stdin:
    cmd = json.loads(line)
    op = cmd["op"]
    if op == "quit":
        break
    t = time.time()
    if op == "put":
        client.put(cmd["key"], cmd["value"])
        out = {}
    elif op == "delete":
        out = {"deleted": client.delete(cmd["key"])}
    elif op == "delete_prefix":
        out = {"deleted": client.delete_prefix(cmd["prefix"])}
    elif op == "bulk":
        items = cmd["items"]
        for base in range(0, len(items), batch):
            ops = [etcdrpc.RequestOp(request_put=etcdrpc.PutRequest(key=k.encode(), value=v.encode()))
                   for k, v in items[base:base + batch]]
            kv.Txn(etcdrpc.TxnRequest(success=ops), timeout=60)
        out = {"written": len(items)}
    else:
        raise SystemExit("unknown op %r" % op)
    out.update(t=t, done=time.time())
    print(json.dumps(out), flush=True)
client.close()
"""

# Poller, inside the agent's host (its private bpffs): reads the pinned maps directly.
#   {"op": "ipcache", "ip", "identity" (None: absent)}: answers {"ready"} at once, then, when a
#       poll (every ~1 ms) sees it, {"seen": wall clock at the end of that poll, "polls"};
#   {"op": "service", "vip", "port", "backends": [[ip, port], ...]}: same, for what the frontend
#       load-balances to (slot 0's count, slots 1..count, their backends);
#   {"op": "scale", "vips", "port", "count", "sample"}: waits for the maps to exist, then polls
#       the heads of ``sample`` frontends until each counts ``count`` backends, then checks every
#       frontend with describe_services; {"seen", "verified", "frontends", ...};
#   {"op": "status"}: the agent's status over its API socket (None while it does not answer).
POLLER = r"""
import json, sys, time
from ansible_collections.clustermesh.core.plugins.module_utils.bpf_maps import DatapathMaps
from ansible_collections.clustermesh.core.plugins.module_utils.datapath_sync import describe_services
from ansible_collections.clustermesh.core.plugins.module_utils.agent_api import AgentClient

pin_dir, socket_path = sys.argv[1], sys.argv[2]
maps = None
api = AgentClient(socket_path, timeout=5)


def send(data):
    print(json.dumps(data), flush=True)


def open_maps(deadline):
    global maps
    while maps is None:
        try:
            maps = DatapathMaps(pin_dir)
        except Exception as exc:  # not pinned (yet), or half of it
            if time.time() > deadline:
                raise SystemExit("maps in %s did not appear: %s" % (pin_dir, exc))
            time.sleep(0.002)


def close_maps():
    global maps
    if maps is not None:
        maps.close()
        maps = None


def ipcache_identity(ip):
    value = maps.ipcache.lookup({"prefixlen": 32, "address": ip})
    return None if value is None else value["identity"]


def frontend(vip, port, proto=6):
    key = {"address": vip, "dport": port, "proto": proto}
    head = maps.service.lookup(dict(key, slot=0))
    if head is None:
        return None
    out = []
    for slot in range(1, head["count"] + 1):
        entry = maps.service.lookup(dict(key, slot=slot))
        backend = None if entry is None else maps.backend.lookup({"backend_id": entry["backend_id"]})
        out.append(["", 0] if backend is None else [backend["address"], backend["port"]])
    return sorted(out)


def wait_for(check, want, timeout, interval=0.001):
    send({"ready": True})
    deadline = time.time() + timeout
    polls = 0
    while True:
        got = check()
        now = time.time()
        polls += 1
        if got == want:
            return {"seen": now, "polls": polls}
        if now > deadline:
            return {"timeout": True, "polls": polls, "last": got}
        time.sleep(interval)


def head_count(vip, port):
    head = maps.service.lookup({"address": vip, "dport": port, "slot": 0, "proto": 6})
    return None if head is None else head["count"]


def scale(cmd):
    deadline = time.time() + cmd["timeout"]
    send({"ready": True})
    close_maps()
    open_maps(deadline)
    opened = time.time()
    sample, port, count = cmd["sample"], cmd["port"], cmd["count"]
    polls = describes = 0
    while True:
        polls += 1
        if all(head_count(vip, port) == count for vip in sample):
            seen = time.time()
            describes += 1
            found = describe_services(maps)
            complete = [
                key for key, backends in found.items()
                if key[1] == port and len(backends) == count and ["", 0] not in [list(b) for b in backends]
            ]
            vips = {key[0] for key in complete}
            if all(vip in vips for vip in cmd["vips"]):
                return {"seen": seen, "maps_opened": opened, "polls": polls, "describes": describes,
                        "frontends": len(found), "complete": len(complete), "verified": time.time()}
            time.sleep(0.05)
        elif time.time() > deadline:
            found = describe_services(maps)
            return {"timeout": True, "frontends": len(found),
                    "complete": sum(1 for b in found.values() if len(b) == count)}
        else:
            time.sleep(0.005)


send({"ready": True})
for line in sys.stdin:
    cmd = json.loads(line)
    op = cmd["op"]
    if op == "quit":
        break
    if op == "ipcache":
        open_maps(time.time() + 10)
        send(wait_for(lambda: ipcache_identity(cmd["ip"]), cmd["identity"], cmd["timeout"]))
    elif op == "service":
        open_maps(time.time() + 10)
        want = None if cmd["backends"] is None else sorted(list(b) for b in cmd["backends"])
        send(wait_for(lambda: frontend(cmd["vip"], cmd["port"]), want, cmd["timeout"]))
    elif op == "scale":
        send(scale(cmd))
    elif op == "close":
        close_maps()
        send({"closed": True})
    elif op == "status":
        try:
            send({"status": api.status()})
        except Exception as exc:
            send({"status": None, "error": str(exc)})
    else:
        raise SystemExit("unknown op %r" % op)
close_maps()
"""

# meshd, as `meshd --config /etc/clustermesh/agent.yaml` runs it, from the working tree; with
# argv[1] = a path, every thread runs under cProfile and the merged statistics go there at exit.
RUNNER_CODE = r"""
import sys
sys.path.insert(0, %(collections)r)
profile_path = sys.argv[1] if len(sys.argv) > 1 else ""
sys.argv[1:] = []
if profile_path:
    import cProfile, pstats, threading
    profiles = []
    original_run = threading.Thread.run

    def run(self):
        profile = cProfile.Profile()
        profiles.append(profile)
        profile.enable()
        try:
            original_run(self)
        finally:
            profile.disable()

    threading.Thread.run = run
    main_profile = cProfile.Profile()
    profiles.append(main_profile)
    main_profile.enable()
from ansible_collections.clustermesh.core.plugins.module_utils.meshd import main
code = main()
if profile_path:
    for profile in profiles:
        profile.disable()
    stats = pstats.Stats(profiles[0])
    for profile in profiles[1:]:
        try:
            stats.add(profile)
        except TypeError:  # a profile that never ran
            pass
    stats.dump_stats(profile_path)
sys.exit(code)
"""


def log(msg: str) -> None:
    print("[%s] %s" % (time.strftime("%H:%M:%S"), msg), flush=True)


def lib():
    """The collection's library, imported from the working tree (encoders only: no I/O here)."""
    if benchlib.COLLECTIONS_ROOT not in sys.path:
        sys.path.insert(0, benchlib.COLLECTIONS_ROOT)
    from ansible_collections.clustermesh.core.plugins.module_utils import (
        kvstore_layout,
        mesh_state,
        services,
    )

    return kvstore_layout, mesh_state, services


# --------------------------------------------------------------------------------------------
# processes in lab hosts
# --------------------------------------------------------------------------------------------


class HostProcess:
    """A JSON-lines program kept running inside a lab host (WRITER, POLLER)."""

    def __init__(self, name: str, host: str, code: str, *args: str, timeout: float = 60):
        self.name = name
        self.proc = subprocess.Popen(
            benchlib.python_argv(PREFIX, host, code, *args),
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        self.out = benchlib.LineReader(self.proc.stdout)
        self.err = benchlib.LineReader(self.proc.stderr)
        self.hello = self.read(timeout)

    def read(self, timeout: float) -> dict:
        try:
            line = self.out.next_line(timeout)
        except TimeoutError:
            raise RuntimeError("%s: no answer within %gs; stderr: %s" % (self.name, timeout, self.stderr())) from None
        if line is None:
            self.proc.wait(timeout=5)
            raise RuntimeError("%s ended (exit %s): %s" % (self.name, self.proc.returncode, self.stderr()))
        return json.loads(line)

    def send(self, **cmd) -> None:
        self.proc.stdin.write(json.dumps(cmd) + "\n")
        self.proc.stdin.flush()

    def call(self, timeout: float = 60, **cmd) -> dict:
        self.send(**cmd)
        return self.read(timeout)

    def stderr(self) -> str:
        lines = []
        try:
            while len(lines) < 200:
                line = self.err.next_line(0.2)
                if line is None:
                    break
                lines.append(line)
        except TimeoutError:
            pass
        return "".join(lines)[-3000:]

    def close(self) -> None:
        if self.proc.poll() is None:
            try:
                self.send(op="quit")
                self.proc.stdin.close()
                self.proc.wait(timeout=10)
            except (OSError, subprocess.TimeoutExpired):
                self.proc.kill()  # the process this object started (tools/lab exec execs into it)
                self.proc.wait()


def run_in(host: str, *command: str, check: bool = True, timeout: float = 60):
    return labtools.run_in(PREFIX, host, *command, check=check, timeout=timeout)


class Agent:
    """meshd on one lab host: agent.yaml, start (pidfile), stop (SIGTERM by pidfile), log."""

    def __init__(self, host: str, cluster: str, cluster_id: int, profile_dir: str | None = None):
        self.host, self.cluster, self.cluster_id = host, cluster, cluster_id
        self.profile_dir = profile_dir
        self.pid: int | None = None
        self.profile = ""
        self.starts = 0

    def configure(self) -> dict:
        code = r"""
import glob, json, subprocess, yaml
conflist = json.load(open(sorted(glob.glob("/etc/cni/net.d/*.conflist"))[0]))
addr = subprocess.run(["ip", "-4", "-o", "addr", "show", "dev", "eth0"], capture_output=True, text=True, check=True)
config = dict(cluster_name=%(cluster)r, cluster_id=%(cluster_id)d, node_name=%(host)r,
              node_ip=addr.stdout.split()[3].split("/")[0], pod_cidr=conflist["plugins"][0]["podCIDR"],
              bpf_object=%(obj)r, bpf_pin_dir=%(pin)r, log_level="info")
yaml.safe_dump(config, open("/etc/clustermesh/agent.yaml", "w"))
open(%(runner)r, "w").write(%(runner_code)r)
print(json.dumps(config))
""" % {
            "cluster": self.cluster,
            "cluster_id": self.cluster_id,
            "host": self.host,
            "obj": LB_OBJECT,
            "pin": PIN_DIR,
            "runner": RUNNER,
            "runner_code": RUNNER_CODE % {"collections": benchlib.COLLECTIONS_ROOT},
        }
        return benchlib.python_in(PREFIX, self.host, code)

    def start(self) -> float:
        """Starts meshd in the background; returns the wall clock at its exec (written by its shell)."""
        self.starts += 1
        profile = ""
        if self.profile_dir:
            profile = "/tmp/cmba-meshd-%d.prof" % self.starts
        script = (
            "mkdir -p /var/log/clustermesh /run/clustermesh; "
            "date +%%s.%%N > %(start)s; "
            "%(python)s %(runner)s %(profile)s >> %(log)s 2>&1 < /dev/null & "
            "echo $! > %(pid)s; cat %(pid)s %(start)s"
        ) % {
            "start": STARTFILE,
            "python": labtools.PYTHON,
            "runner": RUNNER,
            "profile": profile,
            "log": LOGFILE,
            "pid": PIDFILE,
        }
        out = run_in(self.host, "sh", "-c", script).stdout.split()
        self.pid, started = int(out[0]), float(out[1])
        self.profile = profile
        return started

    def alive(self) -> bool:
        """Whether the meshd this object started still runs (its pid, running RUNNER: never a recycled pid)."""
        if self.pid is None:
            return False
        try:
            with open("/proc/%d/cmdline" % self.pid, "rb") as f:
                if RUNNER.encode() not in f.read().split(b"\0"):
                    return False
            with open("/proc/%d/stat" % self.pid) as f:
                return f.read().split(") ")[-1].split()[0] != "Z"
        except OSError:
            return False

    def stop(self, timeout: float = 15) -> None:
        """SIGTERM to the pid of the pidfile (the process this script started); SIGKILL after ``timeout``."""
        if not self.alive():
            self.pid = None
            return
        os.kill(self.pid, signal.SIGTERM)
        deadline = time.monotonic() + timeout
        while self.alive() and time.monotonic() < deadline:
            time.sleep(0.05)
        if self.alive():
            log("meshd (pid %d) did not stop in %gs: SIGKILL" % (self.pid, timeout))
            os.kill(self.pid, signal.SIGKILL)
            while self.alive():
                time.sleep(0.05)
        self.pid = None
        run_in(self.host, "rm", "-f", PIDFILE, check=False)
        if self.profile_dir and self.profile:
            os.makedirs(self.profile_dir, exist_ok=True)
            fetch_binary(self.host, self.profile, os.path.join(self.profile_dir, os.path.basename(self.profile)))

    def log_lines(self) -> list[str]:
        return run_in(self.host, "cat", LOGFILE, check=False).stdout.splitlines()


def fetch_binary(host: str, path: str, dest: str) -> None:
    proc = subprocess.run(
        benchlib.lab_exec_argv(PREFIX, host, "cat", path), capture_output=True, timeout=60, check=False
    )
    if proc.returncode == 0:
        with open(dest, "wb") as f:
            f.write(proc.stdout)


# --------------------------------------------------------------------------------------------
# the mesh's data
# --------------------------------------------------------------------------------------------


def canaries(cluster: str) -> list[tuple[str, str]]:
    """The synced canaries a cluster's agents write after their initial sync (cluster2 has none)."""
    layout, _state, _svc = lib()
    stamp = layout.encode_timestamp().decode()
    return [(layout.synced_key(cluster, prefix), stamp) for prefix in layout.SYNCED_STATE_PREFIXES]


def declaration(name: str, cluster_ip: str):
    _layout, _state, svc = lib()
    return svc.make_declaration(
        NAMESPACE,
        name,
        cluster_ip,
        [{"name": "http", "port": FRONTEND_PORT, "protocol": "TCP", "target_port": BACKEND_PORT}],
        {"bench": name},
        {svc.ANNOTATION_GLOBAL: "true", svc.ANNOTATION_SHARED: "true"},
    )


def declaration_item(name: str, cluster_ip: str) -> tuple[str, str]:
    layout, _state, svc = lib()
    return layout.service_declaration_key(NAMESPACE, name), svc.encode_declaration(
        declaration(name, cluster_ip)
    ).decode()


def cluster_service_item(cluster: str, cluster_id: int, name: str, cluster_ip: str, ips) -> tuple[str, str]:
    layout, _state, svc = lib()
    decl = declaration(name, cluster_ip)
    value = svc.encode_cluster_service(svc.build_cluster_service(decl, cluster, cluster_id, ips)).decode()
    return layout.service_key(cluster, NAMESPACE, name), value


def scale_name(i: int) -> str:
    return "svc-%05d" % i


def scale_vip(cluster: str, i: int) -> str:
    a, b = SCALE_IP_BASE[cluster]
    return "%d.%d.%d.%d" % (a, b, i // 256, i % 256)


def scale_backends(cluster_id: int, i: int) -> list[str]:
    out = []
    for n in range(4):
        idx = i * 4 + n
        out.append("10.%d.%d.%d" % (cluster_id, 16 + idx // 250, 1 + idx % 250))
    return out


def scale_items(services: int) -> tuple[list, list]:
    """(cluster1's items: declarations and slices; cluster2's items: ClusterServices)."""
    layout, _state, svc = lib()
    one, two = [], []
    for i in range(services):
        name = scale_name(i)
        one.append(declaration_item(name, scale_vip("cluster1", i)))
        one.append(
            (
                layout.backend_slice_key(NAMESPACE, name, MADE_UP_NODE),
                svc.encode_backend_slice(MADE_UP_NODE, scale_backends(1, i)).decode(),
            )
        )
        two.append(cluster_service_item("cluster2", 2, name, scale_vip("cluster2", i), scale_backends(2, i)))
    return one, two


# --------------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------------


def wait_status(poller: HostProcess, predicate, timeout: float, what: str) -> dict:
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        last = poller.call(op="status", timeout=15)["status"]
        if last is not None and predicate(last):
            return last
        time.sleep(0.05)
    raise RuntimeError(
        "timed out after %gs waiting for %s (last status: %s)" % (timeout, what, json.dumps(last)[:2000])
    )


def ms(seconds: float) -> float:
    return round(seconds * 1000.0, 3)


def sync_result_writes(text: str) -> int | None:
    """Entries written + deleted in a SyncResult's text (status.last_reconcile.result values)."""
    m = re.search(r"written=\{(.*?)\}, deleted=\{(.*?)\}", text or "")
    if not m:
        return None
    return sum(int(n) for n in re.findall(r":\s*(\d+)", m.group(1) + "," + m.group(2)))


# --------------------------------------------------------------------------------------------
# convergence
# --------------------------------------------------------------------------------------------


def timed_change(poller: HostProcess, writer: HostProcess, poll: dict, write: dict) -> dict:
    """One change: the poller starts polling, then the writer writes; latency = seen - write start."""
    poller.send(timeout=CHANGE_TIMEOUT, **poll)
    ready = poller.read(15)
    if not ready.get("ready"):
        raise RuntimeError("poller: %r" % ready)
    wrote = writer.call(timeout=30, **write)
    seen = poller.read(CHANGE_TIMEOUT + 15)
    out = {"write_ms": ms(wrote["done"] - wrote["t"])}
    if seen.get("timeout"):
        out.update(latency_ms=None, last=seen.get("last"))
    else:
        out.update(latency_ms=ms(seen["seen"] - wrote["t"]), polls=seen["polls"])
    return out


def pooled_stats(values: list) -> dict:
    data = [v for v in values if v is not None]
    return {
        "n": len(data),
        "lost": len(values) - len(data),
        "p50_ms": benchlib.percentile(data, 50),
        "p90_ms": benchlib.percentile(data, 90),
        "p99_ms": benchlib.percentile(data, 99),
        "max_ms": max(data) if data else None,
    }


def bench_convergence(ctx: dict, rounds: int, changes: int) -> dict:
    """``changes`` ipcache changes and ``changes`` backend changes per round, interleaved."""
    layout, state, _svc = lib()
    w1, w2, poller = ctx["writer1"], ctx["writer2"], ctx["poller"]
    decl_key, decl_value = declaration_item(CONV_SERVICE, CONV_IP["cluster1"])
    w1.call(op="put", key=decl_key, value=decl_value)
    base = ["10.2.250.%d" % n for n in (1, 2, 3, 4)]
    svc_key, svc_value = cluster_service_item("cluster2", 2, CONV_SERVICE, CONV_IP["cluster2"], base)
    want = sorted([ip, BACKEND_PORT] for ip in base)
    first = timed_change(
        poller,
        w2,
        {"op": "service", "vip": CONV_IP["cluster1"], "port": FRONTEND_PORT, "backends": want},
        {"op": "put", "key": svc_key, "value": svc_value},
    )
    if first["latency_ms"] is None:
        raise RuntimeError("c1-n1's maps never load-balanced %s/%s to cluster2's backends" % (NAMESPACE, CONV_SERVICE))
    host_ip = "198.18.1.13"  # c2-n1, as its agent would publish it
    samples = {k: [] for k in ("ipcache_p50_ms", "ipcache_p99_ms", "backend_p50_ms", "backend_p99_ms")}
    pooled = {"ipcache_add": [], "ipcache_remove": [], "backend_add": [], "backend_remove": []}
    write_ms, loads, polls = [], [], []
    for r in range(rounds):
        loads.append(benchlib.load_average())
        log(
            "convergence round %d/%d: %d ipcache + %d backend changes (load %s)"
            % (r + 1, rounds, changes, changes, loads[-1])
        )
        per = {"ipcache": [], "backend": []}
        started = time.monotonic()
        for j in range(changes):
            add = j % 2 == 0
            n = r * changes + j // 2
            ip = "10.2.%d.%d" % (200 + n // 250 % 40, 1 + n % 250)
            identity = IDENTITY_BASE + 1000 + n % 60000
            if add:
                entry = state.make_ipcache_entry(ip, identity, host_ip)
                write = {"op": "put", "key": layout.ip_key(ip), "value": state.encode_ipcache_entry(entry).decode()}
            else:
                write = {"op": "delete", "key": layout.ip_key(ip)}
            got = timed_change(poller, w2, {"op": "ipcache", "ip": ip, "identity": identity if add else None}, write)
            per["ipcache"].append(got["latency_ms"])
            pooled["ipcache_add" if add else "ipcache_remove"].append(got["latency_ms"])
            write_ms.append(got["write_ms"])
            polls.append(got.get("polls"))
            extra_ip = "10.2.251.%d" % (1 + n % 250)
            backends = base + [extra_ip] if add else base
            _key, value = cluster_service_item("cluster2", 2, CONV_SERVICE, CONV_IP["cluster2"], backends)
            got = timed_change(
                poller,
                w2,
                {
                    "op": "service",
                    "vip": CONV_IP["cluster1"],
                    "port": FRONTEND_PORT,
                    "backends": sorted([ip, BACKEND_PORT] for ip in backends),
                },
                {"op": "put", "key": svc_key, "value": value},
            )
            per["backend"].append(got["latency_ms"])
            pooled["backend_add" if add else "backend_remove"].append(got["latency_ms"])
            write_ms.append(got["write_ms"])
        for kind in ("ipcache", "backend"):
            values = [v for v in per[kind] if v is not None]
            samples[kind + "_p50_ms"].append(benchlib.percentile(values, 50))
            samples[kind + "_p99_ms"].append(benchlib.percentile(values, 99))
        log(
            "  %.1f s: ipcache p50 %.1f p99 %.1f ms, backend p50 %.1f p99 %.1f ms"
            % (
                time.monotonic() - started,
                samples["ipcache_p50_ms"][-1] or -1,
                samples["ipcache_p99_ms"][-1] or -1,
                samples["backend_p50_ms"][-1] or -1,
                samples["backend_p99_ms"][-1] or -1,
            )
        )
    w1.call(op="delete", key=decl_key)
    w2.call(op="delete", key=svc_key)
    both = {
        "ipcache": pooled["ipcache_add"] + pooled["ipcache_remove"],
        "backend": pooled["backend_add"] + pooled["backend_remove"],
    }
    return benchlib.section(
        samples,
        targets={
            "ipcache_p99_ms": ("medians.ipcache_p99_ms", "<", CONV_TARGET_MS),
            "backend_p99_ms": ("medians.backend_p99_ms", "<", CONV_TARGET_MS),
        },
        units={name: "ms" for name in samples},
        notes=[
            "latency = first poll of c1-n1's pinned maps that shows the change - start of the etcd request in "
            "c2-n1 (both CLOCK_REALTIME); the poller reads the maps every ~1 ms",
            "per round: %d changes of each kind (half puts, half deletes / removals), the two kinds interleaved; "
            "samples are the per-round p50/p99, extra.pooled the percentiles over all rounds" % changes,
        ],
        extra={
            "pooled": {name: pooled_stats(values) for name, values in {**both, **pooled}.items()},
            "etcd_write_ms": pooled_stats(write_ms),
            "polls_per_ipcache_change": benchlib.summary(polls),
            "load_average": loads,
            "changes_per_round_per_kind": changes,
            "agent_vmhwm_mb": vm_kb(ctx["agent"].pid).get("VmHWM", 0) / 1024.0,  # the agent of a near-empty mesh
        },
    )


# --------------------------------------------------------------------------------------------
# scale
# --------------------------------------------------------------------------------------------


def log_times(lines: list[str]) -> dict[str, float]:
    """Wall clock of meshd's milestones in its log (asctime is local time, millisecond resolution)."""
    marks = {
        "datapath loaded": "loaded",
        "meshd started": "started",
        "local kvstore connected": "local_connected",
        "initial sync done": "initial_sync",
    }
    out: dict[str, float] = {}
    for line in lines:
        m = re.match(r"(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d),(\d{3}) ", line)
        if not m:
            continue
        for text, name in marks.items():
            if text in line:
                out[name] = time.mktime(time.strptime(m.group(1), "%Y-%m-%d %H:%M:%S")) + int(m.group(2)) / 1000.0
    return out


def vm_kb(pid: int | None) -> dict:
    out = {}
    if pid is None:
        return out
    try:
        with open("/proc/%d/status" % pid) as f:
            for line in f:
                if line.startswith(("VmHWM:", "VmRSS:")):
                    out[line.split(":")[0]] = int(line.split()[1])
    except OSError:
        pass
    return out


def settle(poller: HostProcess, quiet: float = 1.0, timeout: float = 30.0) -> float:
    """Waits until the agent's reconcile count stays the same for ``quiet`` seconds; returns the wait."""
    started = time.monotonic()
    last, since = None, time.monotonic()
    while time.monotonic() - started < timeout:
        status = poller.call(op="status", timeout=15)["status"] or {}
        count = status.get("reconciles")
        if count != last:
            last, since = count, time.monotonic()
        elif time.monotonic() - since >= quiet:
            break
        time.sleep(0.25)
    return time.monotonic() - started - quiet


def fresh_start(ctx: dict, agent: Agent, vips: list[str], sample: list[str]) -> dict:
    poller, w1 = ctx["poller"], ctx["writer1"]
    agent.stop()
    poller.call(op="close")
    run_in(AGENT_HOST, "rm", "-rf", PIN_DIR)
    run_in(AGENT_HOST, "sh", "-c", ": > %s" % LOGFILE)
    layout, _state, _svc = lib()
    w1.call(op="delete_prefix", prefix=layout.services_prefix("cluster1"), timeout=120)  # the last run's exports
    poller.send(op="scale", vips=vips, port=FRONTEND_PORT, count=8, sample=sample, timeout=SCALE_TIMEOUT)
    if not poller.read(15).get("ready"):
        raise RuntimeError("poller not ready")
    t_start = agent.start()
    found = poller.read(SCALE_TIMEOUT + 60)
    rss_at_complete = vm_kb(agent.pid)
    if found.get("timeout"):
        raise RuntimeError("the maps did not hold %d x 8 within %gs: %r" % (len(vips), SCALE_TIMEOUT, found))
    status = wait_status(poller, lambda s: s.get("synced") and s.get("reconciles", 0) >= 1, 60, "the first reconcile")
    settle_s = settle(poller)
    rss = vm_kb(agent.pid)
    marks = log_times(agent.log_lines())
    status = poller.call(op="status", timeout=15)["status"] or status
    return {
        "start_to_maps_s": found["seen"] - t_start,
        "start_to_maps_opened_s": found["maps_opened"] - t_start,
        "start_to_loaded_s": marks.get("loaded", t_start) - t_start if "loaded" in marks else None,
        "start_to_local_connected_s": marks["local_connected"] - t_start if "local_connected" in marks else None,
        "start_to_initial_sync_s": marks["initial_sync"] - t_start if "initial_sync" in marks else None,
        "initial_sync_to_maps_s": found["seen"] - marks["initial_sync"] if "initial_sync" in marks else None,
        "settle_after_maps_s": settle_s,
        "vmhwm_mb_at_maps": rss_at_complete.get("VmHWM", 0) / 1024.0,
        "vmhwm_mb": rss.get("VmHWM", 0) / 1024.0,
        "vmrss_mb": rss.get("VmRSS", 0) / 1024.0,
        "frontends_in_maps": found["frontends"],
        "complete_frontends": found["complete"],
        "polls": found["polls"],
        "reconciles": status.get("reconciles"),
        "last_reconcile": status.get("last_reconcile"),
        "maps": status.get("maps"),
        "state": status.get("state"),
    }


def restart(ctx: dict, agent: Agent, vips: list[str], sample: list[str]) -> dict:
    poller = ctx["poller"]
    agent.stop()
    run_in(AGENT_HOST, "sh", "-c", ": > %s" % LOGFILE)
    t_start = agent.start()
    deadline = time.monotonic() + 60
    first = None
    while time.monotonic() < deadline:
        status = poller.call(op="status", timeout=15)["status"]
        if status and status.get("synced") and status.get("reconciles", 0) >= 1:
            first = status
            break
        time.sleep(0.1)  # the status call takes the state's lock: polled gently
    if first is None:
        raise RuntimeError("the restarted agent did not reconcile within 60 s")
    marks = log_times(agent.log_lines())
    reconcile = first["last_reconcile"]
    writes = sum(filter(None, (sync_result_writes(v) for v in reconcile.get("result", {}).values())))
    poller.send(op="scale", vips=vips, port=FRONTEND_PORT, count=8, sample=sample, timeout=5)
    if not poller.read(15).get("ready"):
        raise RuntimeError("poller not ready")
    check = poller.read(30)
    settle(poller)
    rss = vm_kb(agent.pid)
    return {
        "restart_s": reconcile["time"] - t_start,
        "restart_first_reconcile_counted": first["reconciles"],
        "restart_start_to_initial_sync_s": marks["initial_sync"] - t_start if "initial_sync" in marks else None,
        "restart_reconcile_s": reconcile.get("seconds"),
        "restart_writes": writes,
        "restart_result": reconcile.get("result"),
        "restart_maps_complete": not check.get("timeout") and check.get("complete") == len(vips),
        "restart_vmhwm_mb": rss.get("VmHWM", 0) / 1024.0,
    }


def backend_changes_at_scale(ctx: dict, round_index: int, changes: int) -> list:
    """One backend of cluster2's service AT_SCALE_SERVICE added and removed, ``changes`` times in all."""
    poller, w2 = ctx["poller"], ctx["writer2"]
    i = AT_SCALE_SERVICE
    local = [[ip, BACKEND_PORT] for ip in scale_backends(1, i)]
    base = scale_backends(2, i)
    out = []
    for j in range(changes):
        add = j % 2 == 0
        extra_ip = "10.2.252.%d" % (1 + (round_index * changes + j // 2) % 250)
        backends = base + [extra_ip] if add else base
        key, value = cluster_service_item("cluster2", 2, scale_name(i), scale_vip("cluster2", i), backends)
        want = sorted(local + [[ip, BACKEND_PORT] for ip in backends])
        got = timed_change(
            poller,
            w2,
            {"op": "service", "vip": scale_vip("cluster1", i), "port": FRONTEND_PORT, "backends": want},
            {"op": "put", "key": key, "value": value},
        )
        out.append(got["latency_ms"])
    return out


def bench_scale(ctx: dict, rounds: int, services: int, at_scale_changes: int) -> dict:
    w1, w2, agent = ctx["writer1"], ctx["writer2"], ctx["agent"]
    agent.stop()
    items1, items2 = scale_items(services)
    t = time.monotonic()
    w1.call(op="bulk", items=items1, timeout=600)
    w2.call(op="bulk", items=items2, timeout=600)
    setup_s = time.monotonic() - t
    log(
        "scale: %d services written in %.1f s (%d keys in cluster1, %d in cluster2)"
        % (services, setup_s, len(items1), len(items2))
    )
    vips = [scale_vip("cluster1", i) for i in range(services)]
    sample = vips[:: max(1, services // 100)] + [vips[-1]]
    names = (
        "start_to_maps_s",
        "vmhwm_mb",
        "restart_s",
        "start_to_initial_sync_s",
        "initial_sync_to_maps_s",
        "backend_at_scale_p50_ms",
        "backend_at_scale_max_ms",
    )
    pooled_at_scale: list = []
    samples = {k: [] for k in names}
    runs, loads = [], []
    for r in range(rounds):
        loads.append(benchlib.load_average())
        log("scale round %d/%d (load %s)" % (r + 1, rounds, loads[-1]))
        fresh = fresh_start(ctx, agent, vips, sample)
        again = restart(ctx, agent, vips, sample)
        changes = backend_changes_at_scale(ctx, r, at_scale_changes)
        pooled_at_scale.extend(changes)
        values = [v for v in changes if v is not None]
        run = {
            **fresh,
            **again,
            "backend_at_scale_p50_ms": benchlib.percentile(values, 50),
            "backend_at_scale_max_ms": max(values) if values else None,
            "backend_at_scale_lost": len(changes) - len(values),
        }
        runs.append(run)
        for name in samples:
            samples[name].append(run[name])
        log(
            "  fresh: maps complete %.2f s after start (initial sync %.2f s, then %.2f s), VmHWM %.0f MB; "
            "restart: %.2f s, %d writes; a backend at scale: p50 %.1f ms, max %.1f ms"
            % (
                run["start_to_maps_s"],
                run["start_to_initial_sync_s"] or -1,
                run["initial_sync_to_maps_s"] or -1,
                run["vmhwm_mb"],
                run["restart_s"],
                run["restart_writes"],
                run["backend_at_scale_p50_ms"] or -1,
                run["backend_at_scale_max_ms"] or -1,
            )
        )
    return benchlib.section(
        samples,
        targets={
            "initial_sync_s": ("medians.start_to_maps_s", "<", SCALE_TARGET_S),
            "rss_mb": ("medians.vmhwm_mb", "<", RSS_TARGET_MB),
        },
        units={
            "start_to_maps_s": "s",
            "vmhwm_mb": "MiB",
            "restart_s": "s",
            "start_to_initial_sync_s": "s",
            "initial_sync_to_maps_s": "s",
            "backend_at_scale_p50_ms": "ms",
            "backend_at_scale_max_ms": "ms",
        },
        notes=[
            "%d global services (global, shared, affinity none), 4 backends in each of two clusters: cluster2's "
            "ClusterServices in its etcd, cluster1's declarations and backend slices (node %s) in its etcd; "
            "meshd on c1-n1 only" % (services, MADE_UP_NODE),
            "start_to_maps_s: from the exec of meshd (a fresh pin directory) to the poll that saw every frontend "
            "with 8 backends (heads of %d sampled frontends polled every 5 ms, then all checked with "
            "describe_services)" % len(sample),
            "vmhwm_mb: the agent's VmHWM once it was quiet (its own slices and the cluster's exports published)",
            "restart_s: from the exec of a second meshd (maps pinned and complete) to the end of its first "
            "reconcile (status.last_reconcile.time); restart_writes in extra.runs",
            "backend_at_scale: then, with the %d services in the maps, %d changes per round of one backend of "
            "cluster2's %s/%s (added, removed), timed as in the convergence benchmark"
            % (services, at_scale_changes, NAMESPACE, scale_name(AT_SCALE_SERVICE)),
        ],
        extra={
            "setup_s": setup_s,
            "runs": runs,
            "load_average": loads,
            "sample_frontends": len(sample),
            "backend_at_scale_pooled": pooled_stats(pooled_at_scale),
            "backend_at_scale_ms": pooled_at_scale,
        },
    )


# --------------------------------------------------------------------------------------------
# the run
# --------------------------------------------------------------------------------------------


def table(benchmarks: dict) -> str:
    rows = []
    for name, doc in benchmarks.items():
        if "error" in doc:
            rows.append((name, "ERROR", doc["error"][:60], None, None, None))
            continue
        targets = {t["metric"].split(".", 1)[1]: t for t in doc.get("targets", {}).values()}
        for metric, spread in doc["spread"].items():
            target = targets.get(metric)
            rows.append(
                (
                    name,
                    metric,
                    spread["median"],
                    spread["min"],
                    spread["max"],
                    None if target is None else "%s %g: %s" % (target["op"], target["limit"], target["met"]),
                )
            )
    return benchlib.format_table(["benchmark", "metric", "median", "min", "max", "target"], rows)


def _terminate(_signum, _frame):
    raise KeyboardInterrupt


def reexec_in_venv() -> None:
    """``python bench/agent.py`` with another Python: run again with the repository's venv (ansible-playbook is
    found beside the running interpreter, as benchlib and the lab tests expect)."""
    venv_python = labtools.PYTHON
    if os.path.exists(venv_python) and os.path.realpath(os.path.dirname(sys.executable)) != os.path.realpath(
        os.path.dirname(venv_python)
    ):
        os.execv(venv_python, [venv_python, os.path.abspath(__file__), *sys.argv[1:]])


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n", maxsplit=1)[0])
    parser.add_argument("--rounds", type=int, default=benchlib.MIN_ROUNDS)
    parser.add_argument("--changes", type=int, default=200, help="changes of each kind per convergence round")
    parser.add_argument("--services", type=int, default=5000, help="global services of the scale benchmark")
    parser.add_argument(
        "--scale-changes", type=int, default=40, help="backend changes per scale round with every service loaded"
    )
    parser.add_argument("--only", choices=["convergence", "scale"])
    parser.add_argument("--profile", metavar="DIR", help="run meshd under cProfile (every thread); stats into DIR")
    parser.add_argument("--output", help="result file (default: bench/results/%s.json)" % NAME)
    parser.add_argument("--reuse-lab", action="store_true", help="use lab %s as it is (development)" % PREFIX)
    parser.add_argument(
        "--keep-lab", action="store_true", help="leave lab %s up (tools/lab down --prefix %s)" % (PREFIX, PREFIX)
    )
    args = parser.parse_args(argv)
    if args.rounds < 1 or args.changes < 2 or args.services < 1:
        parser.error("--rounds >= 1, --changes >= 2, --services >= 1")
    if os.geteuid() != 0:
        print("the lab needs root", file=sys.stderr)
        return 2
    if args.rounds < benchlib.MIN_ROUNDS:
        log("warning: %d rounds; the project's rule is at least %d" % (args.rounds, benchlib.MIN_ROUNDS))
    signal.signal(signal.SIGTERM, _terminate)
    benchlib.ensure_collection_link()
    started = time.monotonic()
    load_start = benchlib.load_average()
    log("host %s; load average at start %s" % (benchlib.host_facts(), load_start))
    selected = [args.only] if args.only else ["convergence", "scale"]
    benchmarks, failed, setup = {}, False, {}
    ctx: dict = {}
    agent = Agent(AGENT_HOST, "cluster1", 1, os.path.abspath(args.profile) if args.profile else None)
    try:
        subprocess.run(["make", "-s", "bpf"], cwd=benchlib.REPO_ROOT, check=True, capture_output=True, timeout=300)
        if not args.reuse_lab:
            benchlib.lab_down(PREFIX, check=False)
            setup["lab_up_s"] = benchlib.lab_up(PREFIX)
            log("site.yml on lab %s" % PREFIX)
            setup["site_s"] = benchlib.require_ok(benchlib.run_playbook(PREFIX, SITE, *SITE_ARGS), "site.yml").wall_s
            log("site.yml: %.1f s" % setup["site_s"])
        agent.configure()
        ctx["agent"] = agent
        ctx["writer1"] = HostProcess("cluster1 writer", WRITER1_HOST, WRITER, str(TXN_OPS))
        ctx["writer2"] = HostProcess("cluster2 writer", WRITER2_HOST, WRITER, str(TXN_OPS))
        ctx["poller"] = HostProcess("poller", AGENT_HOST, POLLER, PIN_DIR, API_SOCKET)
        ctx["writer2"].call(op="bulk", items=canaries("cluster2"))  # as cluster2's agents would, once synced
        for name in selected:
            try:
                if name == "convergence":
                    if agent.pid is None:
                        agent.start()
                    wait_status(ctx["poller"], lambda s: s.get("synced"), 60, "meshd's initial sync")
                    benchmarks[name] = bench_convergence(ctx, args.rounds, args.changes)
                else:
                    benchmarks[name] = bench_scale(ctx, args.rounds, args.services, args.scale_changes)
            except Exception as exc:  # noqa: BLE001 - recorded, the other benchmark still runs
                failed = True
                traceback.print_exc()
                tail = "\n".join(agent.log_lines()[-30:])
                log("meshd log (tail):\n%s" % tail)
                benchmarks[name] = {"error": "%s: %s" % (type(exc).__name__, exc), "samples": {}, "ratios": {}}
    except KeyboardInterrupt:
        failed = True
        log("interrupted")
    except Exception:  # noqa: BLE001
        failed = True
        traceback.print_exc()
    finally:
        for proc in ("poller", "writer1", "writer2"):
            if proc in ctx:
                try:
                    ctx[proc].close()
                except Exception:  # noqa: BLE001
                    traceback.print_exc()
        try:
            agent.stop()
            run_in(AGENT_HOST, "rm", "-rf", PIN_DIR, check=False)
        except Exception:  # noqa: BLE001 - the lab is going anyway
            traceback.print_exc()
        if args.keep_lab:
            log("lab %s left up (tools/lab down --prefix %s)" % (PREFIX, PREFIX))
        else:
            log("tools/lab down --prefix %s" % PREFIX)
            try:
                benchlib.lab_down(PREFIX)
            except Exception:  # noqa: BLE001
                traceback.print_exc()
                failed = True
    load_end = benchlib.load_average()
    doc = benchlib.result_document(
        NAME,
        rounds=args.rounds,
        benchmarks=benchmarks,
        timestamp=benchlib.utc_timestamp(),
        commit=benchlib.git_commit(),
        host=benchlib.host_facts(),
        load_average={"start": load_start, "end": load_end},
        argv=sys.argv[1:] if argv is None else argv,
        duration_s=round(time.monotonic() - started, 1),
    )
    doc["setup"] = setup
    path = benchlib.write_result(doc, path=args.output)
    print()
    print(table(benchmarks))
    print()
    print("load average: start %s, end %s (%s CPUs)" % (load_start, load_end, doc["host"]["nproc"]))
    print("results: %s" % path)
    return 1 if failed else 0


if __name__ == "__main__":
    reexec_in_venv()
    sys.exit(main())
