"""Network policy benchmarks (issue 6), lab ``cmbp``: the datapath's cost of 1,000 rules, the agent's CPU
time to recompute after 1,000 identity changes, and policy convergence across clusters.

    .venv/bin/python bench/policy.py [--rounds N] [--only datapath,recompute,convergence] [--quick]
                                     [--output FILE] (--help: all)

datapath     Two lab nodes of one cluster (a1, a2; routing mode direct without masquerade by
             routing_state.reconcile, the CNI plugin by role cni, pods by ``tools/lab pod add``):
             client pod c on a1, server pod s on a2. lb.o (bpf_loader.build) is loaded inside each
             node into its own pin root (bpf_loader.load) and attached to its pod's host-side veth;
             bpf_maps.DatapathMaps writes the ipcache entries of both pods (their identities) and,
             for each pod, 1,000 allow entries (write_policy), the peer's among them. Two cases,
             measured one after the other in every round (order reversed every other round) and
             interleaved run by run:
               no_policy    neither pod in cm_endpoint: the programs run, no policy work at all
               policy_1000  both pods in cm_endpoint, enforced both ways (write_endpoint(ifindex,
                            identity, ingress=True, egress=True)): c's egress and s's ingress
                            allow each other by identity among 1,000 entries each, the replies
                            pass through the policy conntrack (cm_ct)
             A case switch writes or deletes the two cm_endpoint entries (a JSON-lines controller
             per node keeps the maps open). Samples as bench/services_datapath.py takes them:
             iperf3 one stream (Gbit/s) and conn_rate (bench/bpf/conn_rate.c: new connections per
             second, each to a destination port of its own, so each is new to cm_ct), client and
             server pinned to one CPU, samples retried while other work takes the CPU (ShareCheck),
             a quiet gate (datapath.QuietGate) before each pair of runs.
             Before measuring: every case works, and the policy really is enforced (without the
             peer's allow entry the client's connection is dropped and cm_drops counts it, on
             either node); after: policy conntrack entries in both nodes' cm_ct.
             Target (issue 6): policy_1000 >= 0.95 x no_policy throughput.
recompute    The agent's compiler and map writer, without a lab: a MeshState (agent_state) with
             100 policies and 20 local endpoints, its PolicyRepository, and a DatapathSync on real
             maps (lb.o loaded into a private bpffs, in a private mount namespace). Per round:
             1,000 identities of cluster2 added (apply_cluster_change, as the remote-cluster watch
             delivers them; labels varied so that about half match a selector), then
             policy_specs() (resolve) and sync_policy (the map writes); then the same 1,000
             removed, resolve, sync; and 100 identities changed one at a time (each change with its
             own resolve and sync), with the 1,000 present and without them. CPU time of the
             process (time.process_time) of each step.
convergence  A new remote identity -> allowed, through a real mesh (as bench/agent.py, with its Agent:
             cluster1 = c1-n1, cluster2 = c2-n1, playbooks/site.yml with agent_state=absent, meshd
             from the working tree on c1-n1 only): a policy imported in cluster1 lets cluster2's endpoints
             with label ``role=conv`` into c1-n1's endpoint; cluster2's identity and ipcache entry
             are written into cluster2's etcd as its agent would; timed from the start of the etcd
             request to the first poll (every ~1 ms, in c1-n1) that sees the identity's allow
             entry in the pinned cm_policy and its ipcache entry in cm_ipcache; then the identity
             and entry deleted -> both gone. Side by side (interleaved): the same with an identity
             no selector matches (ref_add, ref_remove: until cm_ipcache has / lacks its entry).
             Target (issue 6: allowed within 1 s): add p99 < 1000 ms.

Prints the load average and tables and writes bench/results/policy.json (``--quick``: one short round,
to build/bench-policy/policy-quick.json). The lab is removed at the end, also on failure, Ctrl-C or
SIGTERM (``--keep-lab`` leaves it up).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass

import benchlib
import datapath
import services_datapath as sd
import yaml
from benchlib import labtools
from datapath import MeasurementError, Servers, log, parse_iperf3, parse_pod_add, run

PREFIX = "cmbp"
NAME = "policy"
BENCHMARKS = ("datapath", "recompute", "convergence")
BUILD_DIR = os.path.join(benchlib.REPO_ROOT, "build", "bench-policy")
BPF_SOURCE = os.path.join(benchlib.REPO_ROOT, "bpf")
CONN_RATE_SOURCE = os.path.join(benchlib.REPO_ROOT, "bench", "bpf", "conn_rate.c")
PIN_ROOT = "/sys/fs/bpf/clustermesh/bench"  # inside each node (each lab host has its own bpffs)
IPERF_PORT = 5201
CONN_PORT = 20000
CONN_WARMUP = 100
CLUSTER = {"name": "cluster1", "id": 1, "pod_cidr": "10.1.0.0/16"}
RULES = 1000  # allow entries per endpoint (the peer's among them)
THROUGHPUT_TARGET = 0.95
TCP, UDP = 6, 17


@dataclass(frozen=True)
class Node:
    name: str
    ip: str
    pod_cidr: str
    pod: str
    identity: int  # of its pod (cluster1's identity range starts at 65536)


NODES = {
    n.name: n
    for n in (
        Node("a1", "198.18.1.11", "10.1.1.0/24", "c", 65536 + 1001),
        Node("a2", "198.18.1.12", "10.1.2.0/24", "s", 65536 + 1002),
    )
}
CLIENT, SERVER = NODES["a1"], NODES["a2"]
CASES = ("no_policy", "policy_1000")
CASE_WHAT = {
    "no_policy": "c (a1) -> s (a2), lb.o on both veths, neither pod in cm_endpoint",
    "policy_1000": "c -> s, both pods enforced ingress and egress with %d allow entries each" % RULES,
}
METRICS = {
    "gbps_1": "Gbit/s",
    "gbit_per_cpu_s": "Gbit per CPU second",
    "conn_per_s": "connections/s",
    "conn_p50_us": "us",
    "conn_p99_us": "us",
    "conn_cpu_us": "CPU us per connection",
}
RATIO_METRICS = ("gbps_1", "gbit_per_cpu_s", "conn_per_s", "conn_p50_us", "conn_cpu_us")
CONN_METRICS = {"conn_per_s": "conn_per_s", "conn_p50_us": "p50_us", "conn_p99_us": "p99_us", "conn_cpu_us": "cpu_us"}
RATIO = "policy_1000_over_no_policy"


def sample_name(case: str, metric: str) -> str:
    return "%s.%s" % (case, metric)


def ratio_name(metric: str) -> str:
    return "%s.%s" % (RATIO, metric)


def policy_rules(own: int, peer: int, direction: str, count: int = RULES) -> list[tuple[int, int, int, str]]:
    """The ``count`` allow entries (identity, port, proto, direction) of one endpoint: the peer's
    (any TCP port, so that every conn_rate port is allowed: the datapath's second lookup, (P, 0, TCP),
    after the miss of (P, port, TCP)) and count - 1 others: identities of other clusters, ports and
    protocols varied, both directions."""
    out = [(peer, 0, TCP, direction)]
    n = 0
    while len(out) < count:
        identity = (3 << 16) + 10 + n // 4  # cluster 3's range: nobody in this lab
        port = 1000 + n % 4 * 1000 + n % 97
        proto = UDP if n % 3 == 0 else TCP
        out.append((identity, port, proto, "egress" if n % 2 else "ingress"))
        n += 1
    if len(set(out)) != count or own in {e[0] for e in out}:
        raise AssertionError("policy_rules: duplicates or the endpoint's own identity")
    return out


def topology() -> dict:
    return {
        "clusters": {CLUSTER["name"]: {"id": CLUSTER["id"], "pod_cidr": CLUSTER["pod_cidr"]}},
        "segments": [{"name": "dc1", "cidr": "198.18.1.0/24"}],
        "hosts": [
            {"name": n.name, "cluster": CLUSTER["name"], "segment": "dc1", "address": n.ip} for n in NODES.values()
        ],
    }


# --------------------------------------------------------------------------------------------
# running things in the lab
# --------------------------------------------------------------------------------------------


def host_argv(host: str, *command: str) -> list[str]:
    return benchlib.lab_exec_argv(PREFIX, host, *command)


def pod_argv(host: str, pod: str, *command: str) -> list[str]:
    return [labtools.LAB, "pod", "exec", "--prefix", PREFIX, host, pod, "--", *command]


class HostProcess:
    """A JSON-lines program kept running inside a lab host: one command per line on stdin, one JSON
    answer per line on stdout (started by Popen, stopped by closing its stdin, else by its PID)."""

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


# Loads lb.o in a node, attaches it to its pod's veth, writes the ipcache entries and the pod's allow
# entries (not its cm_endpoint entry: the case no_policy), prints the veth's ifindex and the programs.
LOAD_DATAPATH = """
import json, socket
from ansible_collections.clustermesh.core.plugins.module_utils import bpf_loader, bpf_maps
spec = json.loads(%r)
with bpf_loader.load(spec["object"], spec["pin_root"]) as dp:
    ids = dp.attach(spec["veth"])
with bpf_maps.DatapathMaps(spec["pin_root"]) as maps:
    for ip, identity in spec["ipcache"]:
        maps.write_ipcache(ip + "/32", identity)
    maps.delete_endpoint(socket.if_nametoindex(spec["veth"]))
    ifindex = socket.if_nametoindex(spec["veth"])
    for identity, port, proto, direction in spec["rules"]:
        maps.write_policy(ifindex, identity, port, proto, direction)
    rules = sum(1 for key in maps.policy.keys() if key["ifindex"] == ifindex)
print(json.dumps({"programs": ids, "ifindex": ifindex, "rules": rules}))
"""

# Controller of one node's policy maps (JSON lines):
#   {"op": "enforce", "on": bool}: the pod's cm_endpoint entry written (ingress and egress enforced) or deleted;
#   {"op": "allow", "on": bool, "rule": [identity, port, proto, direction]}: one allow entry written or deleted;
#   {"op": "stats"}: cm_endpoint entries, the pod's cm_policy entries, cm_ct entries by direction, cm_drops.
CONTROLLER = """
import json, sys
from ansible_collections.clustermesh.core.plugins.module_utils import bpf_maps
pin_root, ifindex, identity = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
maps = bpf_maps.DatapathMaps(pin_root)
print(json.dumps({"ready": True}), flush=True)
for line in sys.stdin:
    cmd = json.loads(line)
    op = cmd["op"]
    if op == "quit":
        break
    if op == "enforce":
        if cmd["on"]:
            maps.write_endpoint(ifindex, identity, ingress=True, egress=True)
        else:
            maps.delete_endpoint(ifindex)
        out = {"endpoint": maps.endpoint.lookup({"ifindex": ifindex})}
    elif op == "allow":
        if cmd["on"]:
            maps.write_policy(ifindex, *cmd["rule"])
        else:
            maps.delete_policy(ifindex, *cmd["rule"])
        out = {"ok": True}
    elif op == "stats":
        ct = {}
        for key in maps.ct.keys():
            ct[str(key["direction"])] = ct.get(str(key["direction"]), 0) + 1
        out = {"endpoints": len(maps.endpoint.keys()),
               "rules": sum(1 for key in maps.policy.keys() if key["ifindex"] == ifindex),
               "ct_by_direction": ct, "drops": maps.drops()}
    else:
        raise SystemExit("unknown op %r" % op)
    print(json.dumps(out), flush=True)
maps.close()
"""


def reconcile_routing(node: Node) -> dict:
    """routing_state.reconcile inside the node: mode direct, the other node as peer, masquerade off
    (nothing of netfilter in either case: what is compared is our programs' work)."""
    kwargs = {
        "node": {"name": node.name, "ip": node.ip, "pod_cidrs": [node.pod_cidr]},
        "peers": [
            {"name": p.name, "cluster": CLUSTER["name"], "ip": p.ip, "pod_cidrs": [p.pod_cidr]}
            for p in NODES.values()
            if p.name != node.name
        ],
        "mode": "direct",
        "masquerade": False,
        "mesh_pod_cidrs": [CLUSTER["pod_cidr"]],
    }
    result = benchlib.python_in(PREFIX, node.name, datapath.RECONCILE % json.dumps(kwargs))
    if not isinstance(result, dict) or "peer_modes" not in result:
        raise RuntimeError("reconcile on %s returned %r" % (node.name, result))
    return result


def install_cni(mtus: dict) -> float:
    book = os.path.join(BUILD_DIR, "cni.yml")
    extra = os.path.join(BUILD_DIR, "cni-vars.json")
    with open(book, "w") as f:
        f.write(datapath.CNI_PLAYBOOK)
    with open(extra, "w") as f:
        json.dump(
            {
                "bench_cni_nodes": ",".join(sorted(mtus)),
                "bench_cni": {n: {"pod_cidr": NODES[n].pod_cidr, "mtu": mtu} for n, mtu in sorted(mtus.items())},
            },
            f,
        )
    started = time.monotonic()
    benchlib.require_ok(benchlib.run_playbook(PREFIX, book, "-e", "@" + extra, timeout=600), "role cni")
    return time.monotonic() - started


# --------------------------------------------------------------------------------------------
# 1. datapath: throughput and new connections with 1,000 rules vs no policy
# --------------------------------------------------------------------------------------------


class DatapathBench:
    def __init__(self, args):
        self.args = args
        self.servers = Servers()
        self.check_share = sd.ShareCheck(args.min_share, args.retries, args.retry_budget)
        self.gate = datapath.QuietGate(args.max_busy, args.gate_wait, args.gate_budget)
        self.ksoftirqd = sd.ksoftirqd_pid(args.iperf_cpu) if args.iperf_cpu >= 0 else None
        self.conn_rate = os.path.join(BUILD_DIR, "conn_rate")
        self.lb_object = os.path.join(BUILD_DIR, "lb.o")
        self.pod_ips: dict[str, str] = {}
        self.veths: dict[str, str] = {}
        self.ifindex: dict[str, int] = {}
        self.rules: dict[str, list] = {}
        self.ports = 2 + args.rounds * args.conn_repeats * len(CASES) + 4  # checks + runs
        self.next_port = 0
        self.enforced: bool | None = None
        self.shell: benchlib.Shell | None = None
        self.controllers: dict[str, HostProcess] = {}
        self.server_pid: int | None = None
        self.setup_info: dict = {}

    def close(self) -> None:
        if self.shell is not None:
            self.shell.close()
        for ctl in self.controllers.values():
            try:
                ctl.close()
            except Exception:  # noqa: BLE001
                traceback.print_exc()
        self.servers.stop()

    # setup --------------------------------------------------------------------------------

    def setup(self) -> None:
        from ansible_collections.clustermesh.core.plugins.module_utils import bpf_loader

        bpf_loader.build(BPF_SOURCE, BUILD_DIR)
        run(["clang", "-O2", "-Wall", "-o", self.conn_rate, CONN_RATE_SOURCE], "clang conn_rate.c")
        topo = os.path.join(BUILD_DIR, "topology.yml")
        with open(topo, "w") as f:
            yaml.safe_dump(topology(), f, sort_keys=False)
        benchlib.lab_down(PREFIX, check=False)
        log("tools/lab up --prefix %s (%d hosts)" % (PREFIX, len(NODES)))
        benchlib.lab_up(PREFIX, topology=topo)
        routing = {n.name: reconcile_routing(n) for n in NODES.values()}
        self.setup_info["routing"] = routing
        log("role cni on %s" % " ".join(NODES))
        self.setup_info["cni_playbook_s"] = round(install_cni({n: r["pod_mtu"] for n, r in routing.items()}), 1)
        for node in NODES.values():
            out = run([labtools.LAB, "pod", "add", "--prefix", PREFIX, node.name, node.pod], "pod add %s" % node.pod)
            self.pod_ips[node.pod] = parse_pod_add(out)
            state = json.loads(run(host_argv(node.name, "cat", "/run/clustermesh/pods/%s.json" % node.pod), "pod"))
            self.veths[node.pod] = state["result"]["interfaces"][0]["name"]
        ipcache = [(self.pod_ips[n.pod], n.identity) for n in NODES.values()]
        loaded = {}
        for node in NODES.values():
            peer = SERVER if node is CLIENT else CLIENT
            self.rules[node.name] = policy_rules(
                node.identity, peer.identity, "egress" if node is CLIENT else "ingress"
            )
            spec = {
                "object": self.lb_object,
                "pin_root": PIN_ROOT,
                "veth": self.veths[node.pod],
                "ipcache": ipcache,
                "rules": self.rules[node.name],
            }
            loaded[node.name] = res = benchlib.python_in(PREFIX, node.name, LOAD_DATAPATH % json.dumps(spec))
            if not isinstance(res, dict) or not all(res.get("programs", {}).values()) or res["rules"] != RULES:
                raise RuntimeError("loading lb.o on %s returned %r" % (node.name, res))
            self.ifindex[node.name] = res["ifindex"]
            self.controllers[node.name] = HostProcess(
                "controller " + node.name, node.name, CONTROLLER, PIN_ROOT, str(res["ifindex"]), str(node.identity)
            )
        self.setup_info["pods"] = {
            n.pod: {"node": n.name, "ip": self.pod_ips[n.pod], "veth": self.veths[n.pod], "identity": n.identity}
            for n in NODES.values()
        }
        self.setup_info["datapath"] = loaded
        self.setup_info["allowed_entry"] = {
            n.name: dict(zip(("identity", "port", "proto", "direction"), self.rules[n.name][0], strict=True))
            for n in NODES.values()
        }
        log("pods %s; lb.o on both veths, %d allow entries each" % (self.pod_ips, RULES))
        self.shell = benchlib.Shell("a1/c", pod_argv(CLIENT.name, CLIENT.pod, "sh"))
        cpu = str(self.args.cpu)
        iperf = ("iperf3", "-s", "-p", str(IPERF_PORT), "--forceflush")
        self.servers.start("iperf3 server", pod_argv(SERVER.name, SERVER.pod, *iperf), "Server listening")
        conn = ("taskset", "-c", cpu, self.conn_rate, "server", str(CONN_PORT), str(self.ports))
        started = self.servers.start("conn_rate server", pod_argv(SERVER.name, SERVER.pod, *conn), "ready")
        with open("/proc/%d/comm" % started.proc.pid) as f:
            comm = f.read().strip()
        if comm != "conn_rate":
            raise RuntimeError("conn_rate server runs as %r, not conn_rate" % comm)
        self.server_pid = started.proc.pid
        self.check()

    def enforce(self, on: bool) -> None:
        if self.enforced == on:
            return
        for ctl in self.controllers.values():
            got = ctl.call(op="enforce", on=on)
            if (got["endpoint"] is not None) != on:
                raise RuntimeError("%s: cm_endpoint entry %r after enforce=%s" % (ctl.name, got, on))
        self.enforced = on

    def port(self) -> int:
        if self.next_port >= self.ports:
            raise RuntimeError("out of conn_rate ports (%d)" % self.ports)
        self.next_port += 1
        return CONN_PORT + self.next_port - 1

    def check(self) -> None:
        """Both cases work; with policy, a connection without the peer's allow entry is dropped (either
        side) and counted in cm_drops; the policy conntrack holds entries."""
        checks: dict = {}
        for case in CASES:
            self.enforce(case == "policy_1000")
            res = self.conn_run(self.port(), seconds=0.1, warmup=10)
            argv = ["iperf3", "-c", self.pod_ips[SERVER.pod], "-p", str(IPERF_PORT), "-n", "10M", "-J"]
            iperf = parse_iperf3(self.shell.run(argv, "iperf3 check", check=False))
            checks[case] = {"connections": res["connections"], "gbps": iperf["gbps"]}
        # enforced: remove the peer's entry on one side at a time -> the connection is dropped there
        self.enforce(True)
        denied = {}
        for node in NODES.values():
            ctl = self.controllers[node.name]
            rule = self.rules[node.name][0]
            ctl.call(op="allow", on=False, rule=list(rule))
            try:
                argv = ["taskset", "-c", str(self.args.cpu), self.conn_rate, "client", self.pod_ips[SERVER.pod]]
                argv += [str(self.port()), "0.1", "1", str(self.server_pid)]
                out = self.shell.run(argv, "conn_rate (denied)", timeout=30, check=False)
                failed = "conn_rate 1" not in out
            finally:
                ctl.call(op="allow", on=True, rule=list(rule))
            stats = ctl.call(op="stats")
            drops = [
                d
                for d in stats["drops"]
                if d["reason"] == "policy" and d["identity"] == rule[0] and d["direction"] == rule[3]
            ]
            if not drops:
                raise RuntimeError(
                    "%s: no policy drop counted without the allow entry %r: %r" % (node.name, rule, stats)
                )
            if not failed:
                raise RuntimeError("%s: connections still passed without the allow entry %r" % (node.name, rule))
            denied[node.name] = {"rule_removed": rule, "drops": drops}
        checks["denied_without_allow_entry"] = denied
        res = self.conn_run(self.port(), seconds=0.1, warmup=10)  # allowed again
        checks["allowed_again"] = res["connections"]
        checks["stats"] = {name: ctl.call(op="stats") for name, ctl in self.controllers.items()}
        for name, stats in checks["stats"].items():
            if stats["rules"] != RULES or not stats["ct_by_direction"].get("2"):
                raise RuntimeError(
                    "%s: %d rules, policy conntrack %r" % (name, stats["rules"], stats["ct_by_direction"])
                )
            stats.pop("drops")
        self.setup_info["checks"] = checks
        log("checks: %s" % json.dumps(checks))

    # measuring ----------------------------------------------------------------------------

    def conn_run(self, port: int, seconds: float, warmup: int = CONN_WARMUP) -> dict:
        argv = ["taskset", "-c", str(self.args.cpu), self.conn_rate, "client", self.pod_ips[SERVER.pod]]
        argv += [str(port), str(seconds), str(warmup), str(self.server_pid)]
        return sd.parse_conn_rate(self.shell.run(argv, "conn_rate client", timeout=seconds + 60))

    def conn_sample(self, case: str) -> dict:
        self.enforce(case == "policy_1000")
        port = self.port()
        return self.check_share.take(lambda: self.conn_run(port, self.args.conn_time) | {"port": port})

    def iperf3(self, case: str) -> dict:
        a = self.args
        self.enforce(case == "policy_1000")
        argv = ["iperf3", "-c", self.pod_ips[SERVER.pod], "-p", str(IPERF_PORT)]
        argv += ["-t", str(a.time), "-O", str(a.omit), "-P", "1", "-J"]
        if a.iperf_cpu >= 0:
            argv += ["-A", "%d,%d" % (a.iperf_cpu, a.iperf_cpu)]

        def once() -> dict:
            for attempt in (1, 2):
                soft0, wall0 = sd.cpu_runtime_s(self.ksoftirqd), time.monotonic()
                out = self.shell.run(argv, "iperf3 (%s)" % case, timeout=a.time + a.omit + 30, check=False)
                soft1, wall1 = sd.cpu_runtime_s(self.ksoftirqd), time.monotonic()
                try:
                    res = parse_iperf3(out)
                except MeasurementError as exc:
                    if attempt == 2:
                        raise MeasurementError("iperf3 (%s): %s" % (case, exc)) from None
                    log("  %s: %s; retrying once" % (case, exc))
                    time.sleep(1)
                    continue
                share = softirq = None
                if a.iperf_cpu >= 0 and None not in (soft0, soft1):
                    softirq = (soft1 - soft0) / (wall1 - wall0)
                    share = sd.iperf3_share(res)
                    share = None if share is None else share + softirq
                return res | {"gbit_per_cpu_s": sd.gbit_per_cpu_s(res), "share": share, "ksoftirqd_share": softirq}
            raise AssertionError("not reached")

        return self.check_share.take(once)

    def measure(self, rounds: int) -> dict:
        samples = {sample_name(c, m): [] for c in CASES for m in METRICS}
        details: dict = {"iperf3": {c: [] for c in CASES}, "conn_rate": {c: [] for c in CASES}}
        loads, gates = [], []
        for r in range(rounds):
            loads.append(benchlib.load_average())
            order = datapath.path_order(CASES, r)
            log("datapath round %d/%d (load %s)" % (r + 1, rounds, loads[-1]))
            iperf_runs = {c: [] for c in CASES}
            for _repeat in range(self.args.iperf_repeats):
                gates.append(self.gate.wait())  # a quiet machine before each pair of runs (bounded)
                for case in order:
                    iperf_runs[case].append(self.iperf3(case))
            for case in order:
                res = sd.combine_iperf3(iperf_runs[case])
                samples[sample_name(case, "gbps_1")].append(res["gbps"])
                samples[sample_name(case, "gbit_per_cpu_s")].append(res["gbit_per_cpu_s"])
                details["iperf3"][case].append(res)
                log(
                    "  %-12s %6s Gbit/s  %5s Gbit/CPU-s  (runs %s; shares %s)"
                    % (case, sd.num(res["gbps"], "%.2f"), sd.num(res["gbit_per_cpu_s"], "%.2f"),
                       " ".join("%.2f" % run["gbps"] for run in res["runs"]), sd.format_shares(res["runs"]))
                )  # fmt: skip
            runs = {c: [] for c in CASES}
            for _repeat in range(self.args.conn_repeats):
                gates.append(self.gate.wait())
                for case in order:
                    runs[case].append(self.conn_sample(case))
            for case in order:
                res = sd.combine_runs(runs[case])
                for metric, key in CONN_METRICS.items():
                    samples[sample_name(case, metric)].append(res[key])
                details["conn_rate"][case].append(res)
                log(
                    "  %-12s %7s conn/s  p50 %6s us  p99 %6s us  %5s CPU us/conn  (runs %s; shares %s)"
                    % (case, sd.num(res["conn_per_s"], "%.0f"), sd.num(res["p50_us"], "%.1f"),
                       sd.num(res["p99_us"], "%.1f"), sd.num(res["cpu_us"], "%.1f"),
                       " ".join("%.0f" % run["conn_per_s"] for run in res["runs"]), sd.format_shares(res["runs"]))
                )  # fmt: skip
        self.enforce(True)
        after = {name: ctl.call(op="stats") for name, ctl in self.controllers.items()}
        for stats in after.values():
            stats["policy_drops"] = sum(d["packets"] for d in stats.pop("drops") if d["reason"] == "policy")
        ratios = {ratio_name(m): (sample_name("policy_1000", m), sample_name("no_policy", m)) for m in RATIO_METRICS}
        a = self.args
        return benchlib.section(
            samples,
            ratios=ratios,
            targets={
                "throughput: policy_1000 >= %g x no_policy (gbps_1)" % THROUGHPUT_TARGET: (
                    "ratios." + ratio_name("gbps_1"),
                    ">=",
                    THROUGHPUT_TARGET,
                )
            },
            units={sample_name(c, m): u for c in CASES for m, u in METRICS.items()},
            notes=[
                "cases: " + "; ".join("%s = %s" % kv for kv in CASE_WHAT.items()),
                "allow entries: the peer's (identity, any port, TCP) - c egress to s, s ingress from c - and %d "
                "others per pod (identities of cluster 3, ports and protocols varied, both directions); ipcache: "
                "both pods /32 with their identities, on both nodes" % (RULES - 1),
                "gbps_1: iperf3 receiver throughput, 1 stream, %d s, client and server %s, %d runs per case and "
                "round interleaved with the other case's, median of the clean runs"
                % (a.time, "pinned to CPU %d" % a.iperf_cpu if a.iperf_cpu >= 0 else "unpinned", a.iperf_repeats),
                "conn_*: conn_rate (bench/bpf/conn_rate.c), %g s per run after %d warm-up connections, client "
                "and server pinned to CPU %d, %d runs per case and round interleaved, median of the clean runs; "
                "every run has a port of its own (every connection is new to cm_ct)"
                % (a.conn_time, CONN_WARMUP, a.cpu, a.conn_repeats),
                "quiet gate (datapath.QuietGate) before each pair of runs (one per case): waits until other work "
                "uses at most %g of all CPUs over 0.5 s, at most %g s per pair and %g s per benchmark run"
                % (a.max_busy, a.gate_wait, a.gate_budget),
                "share check as in services_datapath.py: a run whose client and server got less than %g of "
                "their CPU is taken again (at most %d times, %g s per benchmark run) and left out when it "
                "stays below" % (a.min_share, a.retries, a.retry_budget),
                "ratios: policy_1000 / no_policy per round, median over rounds; for conn_p50_us and conn_cpu_us "
                "a ratio above 1 means the policy costs more",
                "routing: routing_state.reconcile, mode direct, masquerade off; CNI: role cni; lb.o loaded by "
                "bpf_loader into %s inside each node" % PIN_ROOT,
            ],
            extra={
                "setup": self.setup_info,
                "parameters": {
                    "rules_per_endpoint": RULES,
                    "iperf3_time_s": a.time,
                    "iperf3_repeats": a.iperf_repeats,
                    "iperf3_cpu": a.iperf_cpu,
                    "conn_time_s": a.conn_time,
                    "conn_repeats": a.conn_repeats,
                    "conn_cpu": a.cpu,
                },
                "versions": datapath.versions(),
                "load_average_per_round": loads,
                "quiet_gate_per_pair": gates,
                "quiet_gate": self.gate.summary(),
                "after": after,
                "share_check": self.check_share.summary(),
                "details": details,
            },
        )


def run_datapath(args) -> dict:
    bench = DatapathBench(args)
    try:
        bench.setup()
        return bench.measure(args.rounds)
    finally:
        bench.close()
        if args.keep_lab:
            log("lab %s left up (--keep-lab); remove it with: tools/lab down --prefix %s" % (PREFIX, PREFIX))
        else:
            log("tools/lab down --prefix %s" % PREFIX)
            benchlib.lab_down(PREFIX, check=False)


# --------------------------------------------------------------------------------------------
# 2. recompute: the agent's CPU time after 1,000 identity changes
# --------------------------------------------------------------------------------------------

# Runs in a private mount namespace with a bpffs of its own mounted on argv[1] (nothing pinned in the
# machine's): lb.o loaded there (maps only, attached nowhere), then the agent's MeshState and
# DatapathSync. Prints one JSON document.
RECOMPUTE = r"""
import gc, json, sys, time
sys.path.insert(0, %(collections)r)
from ansible_collections.clustermesh.core.plugins.module_utils import bpf_loader, bpf_maps, mesh_state, policy
from ansible_collections.clustermesh.core.plugins.module_utils.agent_state import MeshState
from ansible_collections.clustermesh.core.plugins.module_utils.datapath_sync import DatapathSync
from ansible_collections.clustermesh.core.plugins.module_utils.kvstore_layout import identity_key

pin_root = sys.argv[1]
p = json.loads(sys.argv[2])
NS = "default"
NS_LABELS = {"io.kubernetes.pod.namespace": NS, "io.cilium.k8s.namespace.labels.kubernetes.io/metadata.name": NS}


def identity(cluster, number, labels):
    labels = mesh_state.identity_labels(cluster, dict(labels, **NS_LABELS))
    return mesh_state.Identity(number, labels, mesh_state.build_label_string(labels))


def policy_doc(i):
    # endpoints app=ep-<i %% E>; ingress from cluster2's role=r-<i %% 50> on TCP 80 and 443; egress to any
    # cluster's tier=t-<i %% 10> on UDP 53
    return {
        "apiVersion": "cilium.io/v2", "kind": "CiliumNetworkPolicy",
        "metadata": {"name": "p-%%03d" %% i, "namespace": NS},
        "spec": {
            "endpointSelector": {"matchLabels": {"app": "ep-%%d" %% (i %% p["endpoints"])}},
            "ingress": [{"fromEndpoints": [{"matchLabels": {"role": "r-%%d" %% (i %% 50),
                                                              "io.cilium.k8s.policy.cluster": "cluster2"}}],
                         "toPorts": [{"ports": [{"port": "80", "protocol": "TCP"},
                                                {"port": "443", "protocol": "TCP"}]}]}],
            "egress": [{"toEndpoints": [{"matchLabels": {"tier": "t-%%d" %% (i %% 10)}}],
                        "toPorts": [{"ports": [{"port": "53", "protocol": "UDP"}]}]}],
        },
    }


def remote_labels(n):
    # role r-0..r-99 (r-0..r-49 selected by an ingress rule), tier t-0..t-19 (t-0..t-9 by an egress rule)
    return {"app": "remote-%%d" %% n, "role": "r-%%d" %% (n %% 100), "tier": "t-%%d" %% (n %% 20)}


def cpu_and_wall(fn):
    gc.collect()
    c0, w0 = time.process_time(), time.perf_counter()
    out = fn()
    return out, time.process_time() - c0, time.perf_counter() - w0


with bpf_loader.load(p["object"], pin_root):
    pass
maps = bpf_maps.DatapathMaps(pin_root)
sync = DatapathSync(maps)
state = MeshState("cluster1", 1, "bench-node")
policies = [policy.parse_policy(policy_doc(i)) for i in range(p["policies"])]
state.replace_policies({pol.ref: pol for pol in policies})
for k in range(p["endpoints"]):
    local = identity("cluster1", (1 << 16) + 300 + k, {"app": "ep-%%d" %% k})
    state.apply_cluster_change("cluster1", "identity", identity_key(local.id), None, local)
    state.put_endpoint({"containerID": "c%%d" %% k, "ifname": "eth0", "ip": "10.1.0.%%d" %% (10 + k),
                        "identity": local.id, "identity_labels": mesh_state.labels_as_dict(local.labels),
                        "ifindex": 100 + k})
base = sync.sync_policy(state.policy_specs())
state.take_dirty()
out = {"baseline": {"written": base.written, "policy_entries": sync.counts()["cm_policy"],
                    "endpoints": sync.counts()["cm_endpoint"]}, "rounds": []}
ids = p["identities"]
for r in range(p["rounds"]):
    first = (2 << 16) + 1000 + (r %% 8) * ids  # cluster2's range, fresh numbers for a few rounds
    new = [identity("cluster2", first + n, remote_labels(n + r * 7)) for n in range(ids)]
    row = {}
    # one at a time: each change followed by its own resolve and sync (changes arriving one by one)
    single = [identity("cluster2", first + ids + n, remote_labels(n)) for n in range(p["one_by_one"])]
    def one_by_one(items, add, steps):
        # steps: CPU seconds per step (apply, resolve, sync), summed over the changes
        for i in items:
            c0 = time.process_time()
            state.apply_cluster_change("cluster2", "identity", identity_key(i.id), None if add else i,
                                       i if add else None)
            c1 = time.process_time()
            specs = state.policy_specs()
            c2 = time.process_time()
            sync.sync_policy(specs)
            c3 = time.process_time()
            for step, seconds in zip(("apply", "resolve", "sync"), (c1 - c0, c2 - c1, c3 - c2)):
                steps[step] = steps.get(step, 0.0) + seconds
    def one_at_a_time(suffix):
        for kind, add in (("add", True), ("remove", False)):
            steps = {}
            name = "one_" + kind + suffix
            _none, row[name + "_cpu_s"], row[name + "_wall_s"] = cpu_and_wall(lambda: one_by_one(single, add, steps))
            row[name + "_steps_cpu_s"] = steps
    for phase, changes in (("add", [(None, i) for i in new]), ("remove", [(i, None) for i in new])):
        def apply():
            for old, cur in changes:
                i = cur or old
                state.apply_cluster_change("cluster2", "identity", identity_key(i.id), old, cur)
        _none, row[phase + "_apply_cpu_s"], row[phase + "_apply_wall_s"] = cpu_and_wall(apply)
        specs, row[phase + "_resolve_cpu_s"], row[phase + "_resolve_wall_s"] = cpu_and_wall(state.policy_specs)
        res, row[phase + "_sync_cpu_s"], row[phase + "_sync_wall_s"] = cpu_and_wall(lambda: sync.sync_policy(specs))
        row[phase + "_map_writes"] = res.writes
        row[phase + "_policy_entries"] = sync.counts()["cm_policy"]
        row[phase + "_dirty"] = state.take_dirty().policy
        if phase == "add":  # with the 1,000 identities (and their entries) present
            one_at_a_time("_at_scale")
    one_at_a_time("")  # with none of them
    row["policy_entries_after"] = sync.counts()["cm_policy"]
    out["rounds"].append(row)
# a check of what the maps hold: one matching remote identity's entries, as the datapath reads them
probe = identity("cluster2", (2 << 16) + 999, remote_labels(0))  # role r-0, tier t-0: matched
state.apply_cluster_change("cluster2", "identity", identity_key(probe.id), None, probe)
sync.sync_policy(state.policy_specs())
found = sorted((k["ifindex"], k["dport"], k["proto"], k["direction"]) for k in maps.policy.keys()
               if k["identity"] == probe.id)
out["probe"] = {"identity": probe.id, "entries": found}
out["entries_total"] = len(maps.policy.keys())
maps.close()
print(json.dumps(out))
"""

RECOMPUTE_METRICS = (
    "add_apply_cpu_ms",
    "add_resolve_cpu_ms",
    "add_sync_cpu_ms",
    "add_total_cpu_ms",
    "remove_apply_cpu_ms",
    "remove_resolve_cpu_ms",
    "remove_sync_cpu_ms",
    "remove_total_cpu_ms",
    "add_total_wall_ms",
    "remove_total_wall_ms",
    "one_add_cpu_ms_per_change",
    "one_remove_cpu_ms_per_change",
    "one_add_at_scale_cpu_ms_per_change",
    "one_remove_at_scale_cpu_ms_per_change",
)
STEPS = ("apply", "resolve", "sync")


def recompute_samples(rounds: list[dict], one_by_one: int) -> dict[str, list]:
    """Per-round samples (ms) of the recompute benchmark from the child's rows (seconds) (pure)."""
    samples: dict[str, list] = {m: [] for m in RECOMPUTE_METRICS}
    for row in rounds:
        for phase in ("add", "remove"):
            for step in STEPS:
                samples["%s_%s_cpu_ms" % (phase, step)].append(row["%s_%s_cpu_s" % (phase, step)] * 1000.0)
            samples[phase + "_total_cpu_ms"].append(sum(row["%s_%s_cpu_s" % (phase, s)] for s in STEPS) * 1000.0)
            samples[phase + "_total_wall_ms"].append(sum(row["%s_%s_wall_s" % (phase, s)] for s in STEPS) * 1000.0)
            for suffix in ("", "_at_scale"):
                value = row["one_%s%s_cpu_s" % (phase, suffix)] * 1000.0 / one_by_one if one_by_one else None
                samples["one_%s%s_cpu_ms_per_change" % (phase, suffix)].append(value)
    return samples


def run_recompute(args) -> dict:
    """The child in a private mount namespace with its own bpffs (unshare + mount -t bpf)."""
    from ansible_collections.clustermesh.core.plugins.module_utils import bpf_loader

    os.makedirs(BUILD_DIR, exist_ok=True)
    bpf_loader.build(BPF_SOURCE, BUILD_DIR)
    params = {
        "object": os.path.join(BUILD_DIR, "lb.o"),
        "policies": args.policies,
        "endpoints": args.endpoints,
        "identities": args.identities,
        "one_by_one": args.one_by_one,
        "rounds": args.rounds,
    }
    script = os.path.join(BUILD_DIR, "recompute.py")
    with open(script, "w") as f:
        f.write(RECOMPUTE % {"collections": benchlib.COLLECTIONS_ROOT})
    loads = [benchlib.load_average()]
    with tempfile.TemporaryDirectory(prefix="cmbp-bpffs-") as pins:
        shell = 'set -e; mount -t bpf bpf "$1"; exec "$2" "$3" "$1" "$4"'
        argv = ["unshare", "--mount", "--propagation", "private", "sh", "-c", shell, "sh"]
        argv += [pins, labtools.PYTHON, script, json.dumps(params)]
        log("recompute: %d policies, %d endpoints, %d identity changes x %d rounds (private bpffs)"
            % (args.policies, args.endpoints, args.identities, args.rounds))  # fmt: skip
        proc = subprocess.run(argv, capture_output=True, text=True, timeout=1800, check=False)
    loads.append(benchlib.load_average())
    if proc.returncode != 0:
        raise RuntimeError("recompute child failed (exit %d): %s" % (proc.returncode, proc.stderr[-4000:]))
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    for i, row in enumerate(out["rounds"]):
        log(
            "  round %d: add %d: apply %.3f + resolve %.3f + sync %.3f CPU s (%d map writes); remove: %.3f + "
            "%.3f + %.3f; one by one: %.2f / %.2f CPU ms per change (%.2f / %.2f with the %d present)"
            % (i + 1, args.identities, row["add_apply_cpu_s"], row["add_resolve_cpu_s"], row["add_sync_cpu_s"],
               row["add_map_writes"], row["remove_apply_cpu_s"], row["remove_resolve_cpu_s"], row["remove_sync_cpu_s"],
               row["one_add_cpu_s"] * 1000 / max(1, args.one_by_one),
               row["one_remove_cpu_s"] * 1000 / max(1, args.one_by_one),
               row["one_add_at_scale_cpu_s"] * 1000 / max(1, args.one_by_one),
               row["one_remove_at_scale_cpu_s"] * 1000 / max(1, args.one_by_one), args.identities)
        )  # fmt: skip
    samples = recompute_samples(out["rounds"], args.one_by_one)
    units = {m: "ms" for m in samples}
    return benchlib.section(
        samples,
        units=units,
        notes=[
            "agent_state.MeshState with %d CiliumNetworkPolicies (endpointSelector app=ep-<i mod %d>; ingress "
            "from cluster2's role=r-<i mod 50> on TCP 80, 443; egress to tier=t-<i mod 10> on UDP 53) and %d "
            "local endpoints (one per app); DatapathSync on lb.o's maps in a private bpffs"
            % (args.policies, args.endpoints, args.endpoints),
            "per round: %d identities of cluster2 added by apply_cluster_change (role r-0..r-99, tier t-0..t-19: "
            "about half match an ingress selector, half an egress one), then policy_specs() (resolve) and "
            "sync_policy(specs) (cm_endpoint/cm_policy writes); then the same removed, resolve, sync" % args.identities,
            "*_cpu_ms: time.process_time() of the step (the process's CPU time, all threads; the child runs "
            "nothing else), gc.collect() before each step; *_total_*: apply + resolve + sync",
            "one_*_cpu_ms_per_change: %d further identities added then removed one at a time, each change followed "
            "by its own policy_specs() + sync_policy (changes arriving one by one): CPU ms per change; "
            "one_*_at_scale_*: the same while the %d identities of the add step are present (their 3,000-odd "
            "entries in the maps: sync_policy compares the whole desired set each time)"
            % (args.one_by_one, args.identities),
        ],
        extra={
            "parameters": params,
            "baseline": out["baseline"],
            "probe": out["probe"],
            "entries_total_at_end": out["entries_total"],
            "rounds": out["rounds"],
            "load_average": loads,
        },
    )


# --------------------------------------------------------------------------------------------
# 3. convergence
# --------------------------------------------------------------------------------------------


CONV_TOPOLOGY = {
    "clusters": {"cluster1": {"id": 1, "pod_cidr": "10.1.0.0/16"}, "cluster2": {"id": 2, "pod_cidr": "10.2.0.0/16"}},
    "segments": [{"name": "dc1", "cidr": "198.18.1.0/24"}],
    "hosts": [
        {"name": "c1-n1", "cluster": "cluster1", "segment": "dc1"},
        {"name": "c2-n1", "cluster": "cluster2", "segment": "dc1"},
    ],
}
AGENT_HOST, WRITER1_HOST, WRITER2_HOST = "c1-n1", "c1-n1", "c2-n1"
CONV_POD, CONV_POD_LABELS = "rb", "name=rebel-base"
CONV_PORT = 80
CONV_IDENTITY_BASE = (2 << 16) + 20000  # cluster2's range (131072..196607), clear of its own allocations
CONV_TARGET_MS = 1000.0  # issue 6: a new remote endpoint matching a selector is allowed within 1 s
CONV_POLICY = {
    "apiVersion": "cilium.io/v2",
    "kind": "CiliumNetworkPolicy",
    "metadata": {"name": "bench-conv", "namespace": "default"},
    "spec": {
        "endpointSelector": {"matchLabels": {"name": "rebel-base"}},
        "ingress": [
            {
                "fromEndpoints": [{"matchLabels": {"role": "conv", "io.cilium.k8s.policy.cluster": "cluster2"}}],
                "toPorts": [{"ports": [{"port": str(CONV_PORT), "protocol": "TCP"}]}],
            }
        ],
    },
}

# Writer: the host's admin client (/etc/clustermesh/kvstore.yaml). {"op": "txn", "puts": [[k, v]...],
# "deletes": [k...]}: one etcd transaction; answers the wall clock just before it (t) and after (done).
CONV_WRITER = r"""
import json, sys, time
from pyetcd import etcdrpc
from ansible_collections.clustermesh.core.plugins.module_utils.kvstore_client import KVStoreClient
from ansible_collections.clustermesh.core.plugins.module_utils.kvstore_config import load_etcd_config

client = KVStoreClient.from_config(load_etcd_config("/etc/clustermesh/kvstore.yaml"), timeout=30)
client.get("cilium/.heartbeat")  # connected before anything is timed
kv = client.stub("KV")
print(json.dumps({"ready": True, "user": client.user}), flush=True)
for line in sys.stdin:
    cmd = json.loads(line)
    if cmd["op"] == "quit":
        break
    ops = [etcdrpc.RequestOp(request_put=etcdrpc.PutRequest(key=k.encode(), value=v.encode()))
           for k, v in cmd.get("puts", [])]
    ops += [etcdrpc.RequestOp(request_delete_range=etcdrpc.DeleteRangeRequest(key=k.encode()))
            for k in cmd.get("deletes", [])]
    t = time.time()
    kv.Txn(etcdrpc.TxnRequest(success=ops), timeout=30)
    print(json.dumps({"t": t, "done": time.time()}), flush=True)
client.close()
"""

# Poller in the agent's host: {"op": "wait", "identity", "ip", "present": bool, "policy": bool, "timeout"}
# answers {"ready"} at once, then {"seen": wall clock at the end of the poll that saw cm_ipcache's entry
# ip -> identity and (policy) cm_policy's allow entry (the endpoint's ifindex, identity, CONV_PORT, TCP,
# ingress) present (or gone), "polls"}; {"op": "endpoint", "wait_s"}: the endpoint's cm_endpoint entry once it is
# enforced (or after wait_s).
CONV_POLLER = r"""
import json, socket, sys, time
from ansible_collections.clustermesh.core.plugins.module_utils.bpf_maps import DatapathMaps
pin_dir, veth, port = sys.argv[1], sys.argv[2], int(sys.argv[3])
ifindex = socket.if_nametoindex(veth)
maps = None
def send(data):
    print(json.dumps(data), flush=True)
def open_maps(deadline):
    global maps
    while maps is None:
        try:
            maps = DatapathMaps(pin_dir)
        except Exception as exc:
            if time.time() > deadline:
                raise SystemExit("maps in %s did not appear: %s" % (pin_dir, exc))
            time.sleep(0.01)
def state(identity, ip, policy):
    entry = maps.ipcache.lookup({"prefixlen": 32, "address": ip})
    cached = entry is not None and entry["identity"] == identity
    if not policy:
        return cached, cached
    allow = maps.policy.lookup({"ifindex": ifindex, "identity": identity, "dport": port, "proto": 6,
                                "direction": 0}) is not None
    return allow, cached
send({"ready": True, "ifindex": ifindex})
for line in sys.stdin:
    cmd = json.loads(line)
    if cmd["op"] == "quit":
        break
    open_maps(time.time() + 30)
    if cmd["op"] == "endpoint":
        deadline = time.time() + cmd["wait_s"]
        while True:
            ep = maps.endpoint.lookup({"ifindex": ifindex})
            if ep is not None and ep["flags"] or time.time() > deadline:
                send({"endpoint": ep, "rules": sum(1 for k in maps.policy.keys() if k["ifindex"] == ifindex)})
                break
            time.sleep(0.01)
        continue
    want = (cmd["present"], cmd["present"])
    send({"ready": True})
    deadline = time.time() + cmd["timeout"]
    polls = 0
    while True:
        got = state(cmd["identity"], cmd["ip"], cmd["policy"])
        now = time.time()
        polls += 1
        if got == want:
            send({"seen": now, "polls": polls})
            break
        if now > deadline:
            send({"timeout": True, "polls": polls, "last": got})
            break
        time.sleep(0.001)
"""


def conv_identity(n: int, selected: bool = True) -> tuple[int, str, str]:
    """The n-th identity of cluster2 the benchmark adds: (number, label string, pod IP). ``selected``:
    role=conv (the policy allows it), else role=other (no selector matches it: the reference)."""
    from ansible_collections.clustermesh.core.plugins.module_utils import mesh_state

    role = "conv" if selected else "other"
    labels = {"role": role, "app": "%s-%d" % (role, n), "io.kubernetes.pod.namespace": "default"}
    labels["io.cilium.k8s.namespace.labels.kubernetes.io/metadata.name"] = "default"
    text = mesh_state.identity_label_string("cluster2", labels)
    n = 2 * n + (0 if selected else 1)
    return CONV_IDENTITY_BASE + n, text, "10.2.%d.%d" % (100 + n // 250 % 100, 1 + n % 250)


class ConvergenceBench:
    def __init__(self, args):
        import agent as ag  # bench/agent.py: meshd from the working tree, pidfile, log; our prefix

        ag.PREFIX = PREFIX
        ag.PIN_DIR = "/sys/fs/bpf/clustermesh/%s-%s" % (PREFIX, AGENT_HOST)
        ag.LB_OBJECT = os.path.join(BUILD_DIR, "lb.o")
        ag.RUNNER = "/tmp/%s-meshd.py" % PREFIX
        self.ag = ag
        self.args = args
        self.agent = ag.Agent(AGENT_HOST, "cluster1", 1)
        self.procs: dict[str, HostProcess] = {}
        self.setup_info: dict = {}

    def close(self) -> None:
        for proc in self.procs.values():
            try:
                proc.close()
            except Exception:  # noqa: BLE001
                traceback.print_exc()
        try:
            self.agent.stop()
        except Exception:  # noqa: BLE001 - the lab goes anyway
            traceback.print_exc()

    def setup(self) -> None:
        from ansible_collections.clustermesh.core.plugins.module_utils import (
            bpf_loader,
            kvstore_layout,
            mesh_state,
            policy,
        )

        bpf_loader.build(BPF_SOURCE, BUILD_DIR)
        meshd = os.path.join(benchlib.REPO_ROOT, "plugins", "module_utils", "meshd.py")
        with open(meshd) as f:
            if "sync_policy" not in f.read():
                raise RuntimeError("meshd.py has no policy support (sync_policy) yet: nothing to measure")
        topo = os.path.join(BUILD_DIR, "conv-topology.yml")
        with open(topo, "w") as f:
            yaml.safe_dump(CONV_TOPOLOGY, f, sort_keys=False)
        benchlib.lab_down(PREFIX, check=False)
        self.setup_info["lab_up_s"] = benchlib.lab_up(PREFIX, topology=topo)
        log("site.yml (agent_state=absent) on lab %s" % PREFIX)
        site = os.path.join(benchlib.REPO_ROOT, "playbooks", "site.yml")
        run_ = benchlib.require_ok(benchlib.run_playbook(PREFIX, site, "-e", "agent_state=absent"), "site.yml")
        self.setup_info["site_s"] = round(run_.wall_s, 1)
        labtools.lab("pod", "add", AGENT_HOST, CONV_POD, "--labels", CONV_POD_LABELS, prefix=PREFIX)
        state = json.loads(
            labtools.run_in(PREFIX, AGENT_HOST, "cat", "/run/clustermesh/pods/%s.json" % CONV_POD).stdout
        )
        veth = state["result"]["interfaces"][0]["name"]
        addr = labtools.run_in(PREFIX, WRITER2_HOST, "ip", "-4", "-o", "addr", "show", "dev", "eth0").stdout
        self.host2_ip = addr.split()[3].split("/")[0]
        self.agent.configure()
        self.procs["writer1"] = HostProcess("cluster1 writer", WRITER1_HOST, CONV_WRITER)
        self.procs["writer2"] = HostProcess("cluster2 writer", WRITER2_HOST, CONV_WRITER)
        stamp = kvstore_layout.encode_timestamp().decode()
        canaries = [[kvstore_layout.synced_key("cluster2", p), stamp] for p in kvstore_layout.SYNCED_STATE_PREFIXES]
        self.procs["writer2"].call(op="txn", puts=canaries)
        doc = policy.parse_policy(CONV_POLICY)
        key = kvstore_layout.policy_key(doc.namespace, doc.kind, doc.name)
        self.procs["writer1"].call(op="txn", puts=[[key, policy.encode_policy(doc).decode()]])
        self.agent.start()
        poller = self.procs["poller"] = HostProcess(
            "poller", AGENT_HOST, CONV_POLLER, self.ag.PIN_DIR, veth, str(CONV_PORT), timeout=60
        )
        ep = poller.call(op="endpoint", timeout=120, wait_s=90)
        if not ep.get("endpoint") or not ep["endpoint"]["flags"]:
            tail = "\n".join(self.agent.log_lines()[-30:])
            raise RuntimeError("meshd never enforced %s's policy (cm_endpoint %r); log:\n%s" % (CONV_POD, ep, tail))
        self.setup_info.update(
            {"pod": {"veth": veth, "ifindex": poller.hello["ifindex"], "endpoint": ep}, "policy_key": key}
        )
        self.mesh_state = mesh_state
        self.layout = kvstore_layout
        log("meshd enforces %s (cm_endpoint %s)" % (CONV_POD, ep))

    def change(self, n: int, add: bool, selected: bool = True) -> dict:
        """One identity with its ipcache entry added (removed) in cluster2; the latency until c1-n1's maps
        hold (lack) the ipcache entry and, for a ``selected`` identity, its allow entry."""
        identity, text, ip = conv_identity(n, selected)
        id_key, ip_key = self.layout.identity_key(identity), self.layout.ip_key(ip)
        poller, writer = self.procs["poller"], self.procs["writer2"]
        poller.send(op="wait", identity=identity, ip=ip, present=add, policy=selected, timeout=10.0)
        if not poller.read(15).get("ready"):
            raise RuntimeError("poller not ready")
        if add:
            entry = self.mesh_state.make_ipcache_entry(ip, identity, self.host2_ip)
            value = self.mesh_state.encode_ipcache_entry(entry).decode()
            wrote = writer.call(op="txn", puts=[[id_key, text], [ip_key, value]])
        else:
            wrote = writer.call(op="txn", deletes=[ip_key, id_key])
        seen = poller.read(30)
        if seen.get("timeout"):
            return {"latency_ms": None, "last": seen.get("last")}
        return {
            "latency_ms": round((seen["seen"] - wrote["t"]) * 1000.0, 3),
            "write_ms": (wrote["done"] - wrote["t"]) * 1e3,
        }

    KINDS = ("add", "remove", "ref_add", "ref_remove")

    def measure(self, rounds: int, changes: int) -> dict:
        samples = {"%s_%s_ms" % (k, p): [] for k in self.KINDS for p in ("p50", "p99")}
        samples["lost"] = []
        pooled: dict = {k: [] for k in self.KINDS}
        loads = []
        n = 0
        for r in range(rounds):
            loads.append(benchlib.load_average())
            log(
                "convergence round %d/%d: %d selected and %d reference identities added and removed (load %s)"
                % (r + 1, rounds, changes // 2, changes // 2, loads[-1])
            )
            per: dict = {k: [] for k in self.KINDS}
            for j in range(changes // 2):
                # interleaved, the order of the two kinds alternating
                for selected in (True, False) if j % 2 == 0 else (False, True):
                    prefix = "" if selected else "ref_"
                    per[prefix + "add"].append(self.change(n, True, selected)["latency_ms"])
                    per[prefix + "remove"].append(self.change(n, False, selected)["latency_ms"])
                n += 1
            lost = 0
            for kind in self.KINDS:
                values = [v for v in per[kind] if v is not None]
                lost += len(per[kind]) - len(values)
                samples[kind + "_p50_ms"].append(benchlib.percentile(values, 50))
                samples[kind + "_p99_ms"].append(benchlib.percentile(values, 99))
                pooled[kind] += per[kind]
            samples["lost"].append(lost)
            log(
                "  "
                + "; ".join(
                    "%s p50 %s p99 %s ms"
                    % (k, sd.num(samples[k + "_p50_ms"][-1], "%.1f"), sd.num(samples[k + "_p99_ms"][-1], "%.1f"))
                    for k in self.KINDS
                )
                + "; lost %d" % lost
            )
        ratios = {
            "%s_over_ref.%s" % (k, p): ("%s_%s_ms" % (k, p), "ref_%s_%s_ms" % (k, p))
            for k in ("add", "remove")
            for p in ("p50", "p99")
        }
        return benchlib.section(
            samples,
            ratios=ratios,
            targets={"add_p99_ms (remote identity added -> allowed)": ("medians.add_p99_ms", "<", CONV_TARGET_MS)},
            units={k: ("ms" if k.endswith("_ms") else "changes") for k in samples},
            notes=[
                "meshd (working tree) on c1-n1 of a 2-node mesh (cluster1 = c1-n1, cluster2 = c2-n1; site.yml with "
                "agent_state=absent); pod %s (%s) on c1-n1; policy %s imported into cluster1's etcd: ingress from "
                "cluster2's role=conv on TCP %d"
                % (CONV_POD, CONV_POD_LABELS, CONV_POLICY["metadata"]["name"], CONV_PORT),
                "add: one etcd transaction in cluster2 (admin on c2-n1) putting a new identity (role=conv, "
                "app=conv-<n>) and its ipcache entry, as cluster2's agent would; latency = start of the request -> "
                "the first poll (every ~1 ms, in c1-n1) that sees cm_policy's allow entry for that identity and "
                "cm_ipcache's entry; remove: both keys deleted in one transaction -> both gone",
                "ref_add / ref_remove: the same with an identity no selector matches (role=other), timed until "
                "cm_ipcache has (lacks) its entry: the mesh's convergence without policy work; ratios *_over_ref "
                "per round (the two kinds interleaved, order alternating)",
                "per round %d identities of each kind added and removed; samples: per-round p50/p99; extra.pooled "
                "over all rounds" % (changes // 2),
            ],
            extra={
                "setup": self.setup_info,
                "pooled": {k: self.ag.pooled_stats(v) for k, v in pooled.items()},
                "latencies_ms": pooled,
                "load_average": loads,
            },
        )


def run_convergence(args) -> dict:
    bench = ConvergenceBench(args)
    try:
        bench.setup()
        return bench.measure(args.rounds, args.changes)
    except Exception:
        try:
            log("meshd log (tail):\n%s" % "\n".join(bench.agent.log_lines()[-30:]))
        except Exception:  # noqa: BLE001
            pass
        raise
    finally:
        bench.close()
        if args.keep_lab:
            log("lab %s left up (--keep-lab); remove it with: tools/lab down --prefix %s" % (PREFIX, PREFIX))
        else:
            log("tools/lab down --prefix %s" % PREFIX)
            benchlib.lab_down(PREFIX, check=False)


# --------------------------------------------------------------------------------------------
# the run
# --------------------------------------------------------------------------------------------


def _spread(section: dict, name: str, rounds: int, fmt: str | None = None) -> str:
    s = section.get("spread", {}).get(name) or {}
    if s.get("median") is None:
        return "-"
    fmt = fmt or ("%.2f" if s["median"] < 100 else "%.0f")
    text = fmt % s["median"]
    if s["n"] > 1:
        text += (" [" + fmt + "-" + fmt + "]") % (s["min"], s["max"])
    return text if s["n"] >= rounds else "%s (%d of %d)" % (text, s["n"], rounds)


def report(benchmarks: dict, rounds: int) -> str:
    out = []
    for name, section in benchmarks.items():
        if "error" in section:
            out.append("%s: FAILED: %s" % (name, section["error"]))
            continue
        if name == "datapath":
            rows = [[c] + [_spread(section, sample_name(c, m), rounds) for m in METRICS] for c in CASES]
            out.append(benchlib.format_table(["case", *METRICS], rows))
            rrows = [[RATIO] + [(section["ratios"].get(ratio_name(m)) or {}).get("median") for m in RATIO_METRICS]]
            out.append(benchlib.format_table(["ratio (median of per-round ratios)", *RATIO_METRICS], rrows))
        else:
            rows = [[m, _spread(section, m, rounds, "%.3f")] for m in section["samples"]]
            out.append(benchlib.format_table(["%s metric" % name, "median [min-max]"], rows))
            if section.get("ratios"):
                rrows = [[r, doc["median"], doc["of_medians"]] for r, doc in section["ratios"].items()]
                out.append(benchlib.format_table(["ratio", "median of per-round", "of medians"], rrows))
        targets = section.get("targets") or {}
        if targets:
            trows = [
                [n, t["value"], "%s %s" % (t["op"], t["limit"]), {True: "met", False: "NOT MET", None: "-"}[t["met"]]]
                for n, t in targets.items()
            ]
            out.append(benchlib.format_table(["target", "value", "limit", "result"], trows))
    return "\n\n".join(out)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n", maxsplit=1)[0])
    parser.add_argument("--rounds", type=int, help="rounds (default %d; --quick: 1)" % benchlib.MIN_ROUNDS)
    parser.add_argument("--only", default=",".join(BENCHMARKS), help="comma-separated: %s" % ",".join(BENCHMARKS))
    parser.add_argument("--quick", action="store_true", help="smoke run: 1 round of short samples")
    # datapath
    parser.add_argument("--time", type=int, default=1, help="iperf3 seconds per run (default 1)")
    parser.add_argument("--omit", type=int, default=0, help="iperf3 seconds omitted at the start (default 0)")
    parser.add_argument("--iperf-repeats", type=int, help="iperf3 runs per case and round (default 6; --quick: 1)")
    parser.add_argument("--iperf-cpu", type=int, default=0, help="CPU of iperf3 client and server (-1: unpinned)")
    parser.add_argument("--conn-time", type=float, help="conn_rate seconds per run (default 0.5; --quick: 0.3)")
    parser.add_argument("--conn-repeats", type=int, help="conn_rate runs per case and round (default 4; --quick: 1)")
    parser.add_argument("--cpu", type=int, default=0, help="CPU of conn_rate client and server (default 0)")
    parser.add_argument("--min-share", type=float, default=0.9, help="retry samples below this CPU share (0.9)")
    parser.add_argument("--retries", type=int, default=3, help="attempts after the first per sample (default 3)")
    parser.add_argument("--retry-budget", type=float, default=90, help="seconds of retried samples per run (90)")
    parser.add_argument(
        "--max-busy",
        type=float,
        default=0.3,
        help="before each pair of runs, wait until other work uses at most this share of all CPUs (default 0.3)",
    )
    parser.add_argument("--gate-wait", type=float, default=60, help="seconds the quiet gate waits per pair (60)")
    parser.add_argument("--gate-budget", type=float, default=300, help="seconds it waits per run, at most (300)")
    # recompute
    parser.add_argument("--policies", type=int, default=100, help="recompute: policies (default 100)")
    parser.add_argument("--endpoints", type=int, default=20, help="recompute: local endpoints (default 20)")
    parser.add_argument("--identities", type=int, default=1000, help="recompute: identity changes (default 1000)")
    parser.add_argument(
        "--one-by-one", type=int, default=100, help="recompute: identities changed one at a time (default 100)"
    )
    # convergence
    parser.add_argument("--changes", type=int, help="convergence: identity adds + removes per round (default 100)")
    parser.add_argument("--output", help="result file (default: bench/results/%s.json)" % NAME)
    parser.add_argument("--keep-lab", action="store_true", help="leave the lab up at the end (debugging)")
    parser.add_argument("--prefix", default=PREFIX, help="lab prefix (default %s)" % PREFIX)
    args = parser.parse_args(argv)
    quick = args.quick
    args.rounds = args.rounds if args.rounds is not None else (1 if quick else benchlib.MIN_ROUNDS)
    args.iperf_repeats = args.iperf_repeats or (1 if quick else 6)
    args.conn_time = args.conn_time or (0.3 if quick else 0.5)
    args.conn_repeats = args.conn_repeats or (1 if quick else 4)
    args.changes = args.changes or (10 if quick else 100)
    if args.rounds < 1 or args.changes < 2:
        parser.error("--rounds >= 1, --changes >= 2")
    args.only = tuple(b.strip() for b in args.only.split(",") if b.strip())
    unknown = sorted(set(args.only) - set(BENCHMARKS))
    if unknown or not args.only:
        parser.error("--only: unknown or empty %s; choose from %s" % (", ".join(unknown), ", ".join(BENCHMARKS)))
    args.output = args.output or (os.path.join(BUILD_DIR, NAME + "-quick.json") if quick else None)
    return args


def main(argv=None) -> int:
    global PREFIX
    args = parse_args(argv)
    PREFIX = args.prefix
    if os.geteuid() != 0:
        print("the lab and bpffs need root", file=sys.stderr)
        return 2
    if args.rounds < benchlib.MIN_ROUNDS:
        log("warning: %d round(s); the project's rule is at least %d" % (args.rounds, benchlib.MIN_ROUNDS))

    def terminate(signum, _frame):
        raise KeyboardInterrupt("signal %d" % signum)

    signal.signal(signal.SIGTERM, terminate)
    benchlib.ensure_collection_link()
    if benchlib.COLLECTIONS_ROOT not in sys.path:
        sys.path.insert(0, benchlib.COLLECTIONS_ROOT)
    os.makedirs(BUILD_DIR, exist_ok=True)
    started = time.monotonic()
    load_start = benchlib.load_average()
    log("host %s; load average at start %s" % (benchlib.host_facts(), load_start))
    runners = {"datapath": run_datapath, "recompute": run_recompute, "convergence": run_convergence}
    benchmarks: dict = {}
    failed = False
    for name in BENCHMARKS:
        if name not in args.only:
            continue
        try:
            benchmarks[name] = runners[name](args)
        except KeyboardInterrupt:
            failed = True
            benchmarks[name] = {"error": "interrupted", "samples": {}, "ratios": {}, "targets": {}}
            break
        except Exception as exc:  # noqa: BLE001 - recorded in the result; the others still run
            failed = True
            traceback.print_exc()
            benchmarks[name] = {
                "error": "%s: %s" % (type(exc).__name__, exc),
                "samples": {},
                "ratios": {},
                "targets": {},
            }
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    benchlib.finish(
        NAME,
        benchmarks=benchmarks,
        rounds=args.rounds,
        started=started,
        load_start=load_start,
        report=report(benchmarks, args.rounds),
        output=args.output,
        argv=argv,
    )
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
