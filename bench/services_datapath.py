"""Service datapath benchmark (issue 5): a ClusterIP served by the tc datapath (bpf/lb.c) against the
pod's own IP and against an nftables DNAT of the same service, lab ``cmbs``.

    .venv/bin/python bench/services_datapath.py [--rounds N] [--quick] [--output FILE] (--help: all)

Two lab nodes of one cluster, routing mode direct without masquerade (routing_state.reconcile), the
CNI plugin (role cni) and pods made by ``tools/lab pod add``. On node a1: client pods c0 and c1 and
server pod s0; on node a2: server pod s1. lb.o is built from bpf/ (bpf_loader.build), loaded inside a1
into its own pin root (bpf_loader.load) and attached to c1's host-side veth only; bpf_maps.DatapathMaps
writes one ClusterIP per server (cross_node: 172.30.0.10 -> s1, same_node: 172.30.0.11 -> s0). Each
round measures, for each server, every variant one after the other (order reversed every other round):

pod_ip_nobpf    c0 (no program of ours on its veth) -> the server pod's IP: the reference
pod_ip          c1 (lb.o's programs on its veth) -> the server pod's IP (no service involved)
cluster_ip      c1 -> the ClusterIP, DNAT and reverse NAT by bpf/lb.c
cluster_ip_nft  c0 -> the ClusterIP, DNAT by an nftables table ``ip cmbench`` in a1 (one nat prerouting
                rule per ClusterIP and port range), present only while this variant runs

with iperf3 (one stream: throughput) and conn_rate (bench/bpf/conn_rate.c: one TCP connection after
the other, each connect, 1-byte request, 1-byte response, close, like netperf's TCP_CRR: new
connections per second). Every conn_rate run uses a destination port of its own, so every connection
is new to both conntracks (lb.c's cm_ct map and the kernel's). Client and server of every sample are
pinned to one CPU; a sample whose two processes got less than --min-share of that CPU (other work
took it: this machine is shared) is taken again, bounded, and left out of the samples when it stays
below (ShareCheck). Targets (issue 5): cluster_ip >= 0.95 x pod_ip throughput (and x pod_ip_nobpf)
and cluster_ip >= 1.0 x cluster_ip_nft connections/s, cross node and same node.

Prints the load average and tables, writes bench/results/services_datapath.json (``--quick``: one short
round, written to build/bench-services/services_datapath-quick.json unless ``--output`` is given).
The lab is removed at the end, also on failure, Ctrl-C or SIGTERM.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import time
import traceback
from dataclasses import dataclass

import benchlib
import datapath
import yaml
from benchlib import labtools
from datapath import MeasurementError, Servers, log, parse_iperf3, parse_pod_add, run

PREFIX = "cmbs"
NAME = "services_datapath"
BUILD_DIR = os.path.join(benchlib.REPO_ROOT, "build", "bench-services")
BPF_SOURCE = os.path.join(benchlib.REPO_ROOT, "bpf")
CONN_RATE_SOURCE = os.path.join(benchlib.REPO_ROOT, "bench", "bpf", "conn_rate.c")
PIN_ROOT = "/sys/fs/bpf/clustermesh/bench"  # inside node a1 (each lab host has its own bpffs)
NFT_TABLE = "cmbench"
IPERF_PORT = 5201
CONN_PORT = 20000  # conn_rate servers listen on CONN_PORT .. CONN_PORT + ports - 1: one port per run
CONN_WARMUP = 100  # connections before conn_rate starts counting
CLUSTER = {"name": "cluster1", "id": 1, "pod_cidr": "10.1.0.0/16"}


@dataclass(frozen=True)
class Node:
    name: str
    ip: str
    pod_cidr: str


NODES = {n.name: n for n in (Node("a1", "198.18.1.11", "10.1.1.0/24"), Node("a2", "198.18.1.12", "10.1.2.0/24"))}
CLIENT_NODE = "a1"
PODS = {"a1": ("c0", "c1", "s0"), "a2": ("s1",)}
BPF_CLIENT = "c1"  # the only pod whose host-side veth carries lb.o's programs


@dataclass(frozen=True)
class Server:
    where: str
    node: str
    pod: str
    cluster_ip: str


SERVERS = (Server("cross_node", "a2", "s1", "172.30.0.10"), Server("same_node", "a1", "s0", "172.30.0.11"))
WHERE = tuple(s.where for s in SERVERS)


@dataclass(frozen=True)
class Variant:
    name: str
    client: str  # pod on CLIENT_NODE
    service: bool  # to the ClusterIP (else to the server pod's IP)
    nft: bool  # the nftables DNAT table is present while it runs
    what: str


VARIANTS = (
    Variant("pod_ip_nobpf", "c0", False, False, "c0 (no program of ours) -> server pod IP"),
    Variant("pod_ip", BPF_CLIENT, False, False, "c1 (lb.o on its veth) -> server pod IP"),
    Variant("cluster_ip", BPF_CLIENT, True, False, "c1 -> ClusterIP, DNAT by bpf/lb.c"),
    Variant("cluster_ip_nft", "c0", True, True, "c0 -> ClusterIP, DNAT by nftables (table ip %s)" % NFT_TABLE),
)
VARIANT_NAMES = tuple(v.name for v in VARIANTS)

# metric -> unit
METRICS = {
    "gbps_1": "Gbit/s",
    "conn_per_s": "connections/s",
    "conn_p50_us": "us",
    "conn_p99_us": "us",
    "gbit_per_cpu_s": "Gbit per CPU second",
    "conn_cpu_us": "CPU us per connection",
}
RATIO_METRICS = ("gbps_1", "conn_per_s", "conn_p50_us", "gbit_per_cpu_s", "conn_cpu_us")
# sample metric -> key of a combined conn_rate sample
CONN_METRICS = {"conn_per_s": "conn_per_s", "conn_p50_us": "p50_us", "conn_p99_us": "p99_us", "conn_cpu_us": "cpu_us"}
# comparison -> (numerator variant, denominator variant)
COMPARISONS = {
    "cluster_ip_over_pod_ip": ("cluster_ip", "pod_ip"),
    "cluster_ip_over_pod_ip_nobpf": ("cluster_ip", "pod_ip_nobpf"),
    "pod_ip_over_pod_ip_nobpf": ("pod_ip", "pod_ip_nobpf"),
    "cluster_ip_over_cluster_ip_nft": ("cluster_ip", "cluster_ip_nft"),
    "cluster_ip_nft_over_pod_ip_nobpf": ("cluster_ip_nft", "pod_ip_nobpf"),
}
# (where, comparison, metric, operator, limit)
TARGETS = tuple(
    (where, comparison, metric, ">=", limit)
    for where in WHERE
    for comparison, metric, limit in (
        ("cluster_ip_over_pod_ip", "gbps_1", 0.95),
        ("cluster_ip_over_pod_ip_nobpf", "gbps_1", 0.95),
        ("cluster_ip_over_cluster_ip_nft", "conn_per_s", 1.0),
    )
)


def path_name(where: str, variant: str) -> str:
    return "%s.%s" % (where, variant)


def sample_name(where: str, variant: str, metric: str) -> str:
    return "%s.%s.%s" % (where, variant, metric)


def ratio_name(where: str, comparison: str, metric: str) -> str:
    return "%s.%s.%s" % (where, comparison, metric)


def ratio_specs(wheres, variants) -> dict[str, tuple[str, str]]:
    """benchlib.section ratios of the comparisons whose both variants are measured."""
    return {
        ratio_name(where, name, metric): (sample_name(where, num, metric), sample_name(where, den, metric))
        for where in wheres
        for name, (num, den) in COMPARISONS.items()
        if num in variants and den in variants
        for metric in RATIO_METRICS
    }


def target_specs(ratios) -> dict[str, tuple[str, str, float]]:
    """The targets whose ratio is measured, named for people."""
    out = {}
    for where, comparison, metric, op, limit in TARGETS:
        name = ratio_name(where, comparison, metric)
        if name in ratios:
            num, den = COMPARISONS[comparison]
            label = "%s: %s %s %g x %s, %s" % (where, num, op, limit, den, metric)
            out[label] = ("ratios." + name, op, limit)
    return out


def ports_needed(rounds: int, repeats: int, wheres, variants) -> int:
    """conn_rate ports: one for the setup's checks and one per run."""
    return 1 + rounds * repeats * len(wheres) * len(variants)


def topology() -> dict:
    return {
        "clusters": {CLUSTER["name"]: {"id": CLUSTER["id"], "pod_cidr": CLUSTER["pod_cidr"]}},
        "segments": [{"name": "dc1", "cidr": "198.18.1.0/24"}],
        "hosts": [
            {"name": n.name, "cluster": CLUSTER["name"], "segment": "dc1", "address": n.ip} for n in NODES.values()
        ],
    }


def nft_ruleset(services: list[tuple[str, str]], ports: int) -> str:
    """The nftables DNAT of the services (ClusterIP, server pod IP): iperf3's port and conn_rate's port
    range, each to the same port of the pod, one rule each (plain compares, no set lookup), in the nat
    prerouting hook of the client's node (like a kube-proxy-style DNAT; replies are reverse-NATed by
    the kernel's conntrack)."""
    rules = []
    for cluster_ip, pod_ip in services:
        rules.append("ip daddr %s tcp dport %d counter dnat to %s" % (cluster_ip, IPERF_PORT, pod_ip))
        rules.append(
            "ip daddr %s tcp dport %d-%d counter dnat to %s" % (cluster_ip, CONN_PORT, CONN_PORT + ports - 1, pod_ip)
        )
    lines = ["table ip %s {" % NFT_TABLE, "  chain prerouting {"]
    lines.append("    type nat hook prerouting priority dstnat; policy accept;")
    lines += ["    " + r for r in rules] + ["  }", "}"]
    return "\n".join(lines) + "\n"


def nft_counters(text: str) -> list[int]:
    """Packet counters of ``nft list table`` output, rule by rule."""
    out = []
    words = text.split()
    for i, word in enumerate(words[:-1]):
        if word == "counter" and words[i + 1] == "packets":
            out.append(int(words[i + 2]))
    return out


# --------------------------------------------------------------------------------------------
# parsing (pure)
# --------------------------------------------------------------------------------------------


def parse_conn_rate(text: str) -> dict:
    """The output of ``conn_rate client``: a header ``conn_rate 1 <count> <elapsed_ns> <client_cpu_ns>
    <server_cpu_ns>`` (-1: unknown), then one connection time in ns per line. Returns connections/s,
    the connection time's percentiles (us) and the CPU time of client and server per connection (us;
    None when one of them is unknown)."""
    lines = text.splitlines()
    header = lines[0].split() if lines else []
    if len(header) != 6 or header[:2] != ["conn_rate", "1"]:
        raise MeasurementError("conn_rate printed no result: %r" % text[:300])
    try:
        count, elapsed_ns, client_ns, server_ns = (int(v) for v in header[2:])
        times = [int(v) / 1000.0 for v in lines[1:] if v.strip()]
    except ValueError as exc:
        raise MeasurementError("conn_rate: %s" % exc) from None
    if count == 0 or elapsed_ns <= 0 or len(times) != count:
        raise MeasurementError(
            "conn_rate: header says %d connections in %d ns, %d times follow" % (count, elapsed_ns, len(times))
        )
    known = client_ns >= 0 and server_ns >= 0
    return {
        "connections": count,
        "seconds": elapsed_ns / 1e9,
        "conn_per_s": count / (elapsed_ns / 1e9),
        "client_cpu_s": client_ns / 1e9 if client_ns >= 0 else None,
        "server_cpu_s": server_ns / 1e9 if server_ns >= 0 else None,
        "cpu_us": (client_ns + server_ns) / 1e3 / count if known else None,
        "share": (client_ns + server_ns) / elapsed_ns if known else None,
        "p50_us": benchlib.percentile(times, 50),
        "p90_us": benchlib.percentile(times, 90),
        "p99_us": benchlib.percentile(times, 99),
        "max_us": max(times),
    }


def num(value: float | None, fmt: str) -> str:
    return "-" if value is None else fmt % value


def format_shares(runs) -> str:
    """Each run's attempts' shares: ``0.97 0.55/0.96`` (the second run was taken twice; ``!`` marks a
    run kept although not clean)."""
    return " ".join(
        "/".join(num(v, "%.2f") for v in run["shares"]) + ("" if run.get("clean", True) else "!") for run in runs
    )


class ShareCheck:
    """Takes a sample again while other work took the CPU from it. Client and server of every sample are
    pinned to one CPU, so the CPU time they ran over the sample's wall time (its ``share``: about 0.98
    on an idle machine; for iperf3 plus the CPU's ksoftirqd, which takes over softirq work that
    piles up) says how much of the CPU they got; a rate measured with less is the share of the
    machine the benchmark got, not the path's. Bounded: at most ``retries`` more attempts per
    sample and ``budget_s`` seconds of retried attempts per benchmark run; the last attempt is kept,
    marked ``clean`` or not (runs that are not clean are left out of the samples), and every sample
    records its attempts' shares."""

    def __init__(self, min_share: float, retries: int, budget_s: float):
        self.min_share, self.retries, self.budget_s = min_share, retries, budget_s
        self.spent_s = 0.0
        self.retried = 0
        self.kept_below = 0  # samples kept although their share stayed below min_share
        self.samples = 0

    def take(self, measure) -> dict:
        shares = []
        while True:
            started = time.monotonic()
            res = measure()
            shares.append(None if res.get("share") is None else round(res["share"], 3))
            good = res.get("share") is None or res["share"] >= self.min_share
            if good or len(shares) > self.retries or self.spent_s >= self.budget_s:
                self.samples += 1
                self.kept_below += not good
                return res | {"shares": shares, "clean": good}
            self.spent_s += time.monotonic() - started
            self.retried += 1

    def summary(self) -> dict:
        return {
            "min_share": self.min_share,
            "retries_per_sample": self.retries,
            "budget_s": self.budget_s,
            "samples": self.samples,
            "attempts_retried": self.retried,
            "retried_s": round(self.spent_s, 1),
            "samples_kept_below_min_share": self.kept_below,
        }


def ksoftirqd_pid(cpu: int) -> int | None:
    """PID of the kernel thread ksoftirqd/<cpu> (read only: its CPU time is softirq work deferred from
    the processes of a sample; /proc is shared by the lab hosts)."""
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open("/proc/%s/comm" % entry) as f:
                    if f.read().strip() == "ksoftirqd/%d" % cpu:
                        return int(entry)
            except OSError:
                continue
    return None


def cpu_runtime_s(pid: int | None) -> float | None:
    """The CPU time a process has run, in seconds (first field of /proc/<pid>/schedstat)."""
    if pid is None:
        return None
    try:
        with open("/proc/%d/schedstat" % pid) as f:
            return int(f.read().split()[0]) / 1e9
    except (OSError, ValueError, IndexError):
        return None


def iperf3_share(iperf: dict) -> float | None:
    """The CPU share iperf3's client and server got (their CPU use, end.cpu_utilization_percent; both on
    one CPU)."""
    if iperf.get("cpu_client_pct") is None or iperf.get("cpu_server_pct") is None:
        return None
    return (iperf["cpu_client_pct"] + iperf["cpu_server_pct"]) / 100.0


def gbit_per_cpu_s(iperf: dict) -> float | None:
    """Throughput per CPU second of iperf3's client and server processes together (their CPU use, from
    getrusage, includes the softirq work done in their context: nearly all of a veth path's)."""
    cpu = (iperf.get("cpu_client_pct") or 0) + (iperf.get("cpu_server_pct") or 0)
    return iperf["gbps"] / (cpu / 100.0) if cpu > 0 else None


def clean_runs(runs: list[dict]) -> list[dict]:
    """The runs that got the CPU (ShareCheck marked them clean; runs without the mark count as clean)."""
    return [r for r in runs if r.get("clean", True)]


def combine_iperf3(runs: list[dict]) -> dict:
    """One throughput sample from several short iperf3 runs (interleaved with the other variants'
    runs): the median of the clean runs' throughputs and Gbit per CPU second (None when no run was
    clean), and all the runs."""
    good = clean_runs(runs)
    return {
        "gbps": benchlib.median(r["gbps"] for r in good),
        "gbit_per_cpu_s": benchlib.median(r["gbit_per_cpu_s"] for r in good),
        "clean_runs": len(good),
        "runs": runs,
    }


def combine_runs(runs: list[dict]) -> dict:
    """One conn_rate sample from several short runs (interleaved with the other variants' runs): the
    median of the clean runs' rates, percentiles and CPU times (None when no run was clean), and all
    the runs."""
    good = clean_runs(runs)
    return {
        "conn_per_s": benchlib.median(r["conn_per_s"] for r in good),
        "p50_us": benchlib.median(r["p50_us"] for r in good),
        "p99_us": benchlib.median(r["p99_us"] for r in good),
        "cpu_us": benchlib.median(r["cpu_us"] for r in good),
        "clean_runs": len(good),
        "runs": runs,
    }


# --------------------------------------------------------------------------------------------
# report (pure)
# --------------------------------------------------------------------------------------------


def _spread(section: dict, name: str, rounds: int) -> str:
    """median [min-max] of a metric's samples, with ``(n of rounds)`` when some rounds had no clean sample."""
    s = section.get("spread", {}).get(name) or {}
    if s.get("median") is None:
        return "-"
    fmt = "%.2f" if s["median"] < 100 else "%.0f"
    text = fmt % s["median"]
    if s["n"] > 1:
        text += (" [" + fmt + "-" + fmt + "]") % (s["min"], s["max"])
    return text if s["n"] >= rounds else "%s (%d of %d)" % (text, s["n"], rounds)


def report(section: dict, wheres, variants, rounds: int) -> str:
    """Readable tables: per path the median [min-max] of each metric; ratios; targets."""
    rows = [
        [path_name(w, v)] + [_spread(section, sample_name(w, v, m), rounds) for m in METRICS]
        for w in wheres
        for v in variants
    ]
    headers = ["path", "Gbit/s 1 stream", "connections/s", "conn p50 us", "conn p99 us", "Gbit/CPU-s", "CPU us/conn"]
    out = [benchlib.format_table(headers, rows)]
    ratios = section.get("ratios") or {}
    rrows = []
    for where in wheres:
        for comparison in COMPARISONS:
            values = [(ratios.get(ratio_name(where, comparison, m)) or {}).get("median") for m in RATIO_METRICS]
            if any(ratio_name(where, comparison, m) in ratios for m in RATIO_METRICS):
                rrows.append([path_name(where, comparison)] + values)
    if rrows:
        out.append(benchlib.format_table(["ratio (median of per-round ratios)", *RATIO_METRICS], rrows))
    targets = section.get("targets") or {}
    if targets:
        trows = [
            [n, t["value"], "%s %s" % (t["op"], t["limit"]), {True: "met", False: "NOT MET", None: "-"}[t["met"]]]
            for n, t in targets.items()
        ]
        out.append(benchlib.format_table(["target", "value", "limit", "result"], trows))
    return "\n\n".join(out)


# --------------------------------------------------------------------------------------------
# running things in the lab
# --------------------------------------------------------------------------------------------


def host_argv(host: str, *command: str) -> list[str]:
    return benchlib.lab_exec_argv(PREFIX, host, *command)


def pod_argv(host: str, pod: str, *command: str) -> list[str]:
    return [labtools.LAB, "pod", "exec", "--prefix", PREFIX, host, pod, "--", *command]


def reconcile_routing(node: str) -> dict:
    """routing_state.reconcile inside the node: mode direct, the other node as peer, masquerade off
    (masquerade's raw chains untrack pod-to-pod packets, which would keep the replies of an nftables
    DNAT from being reverse-NATed; and without any table of ours, cluster_ip_nft's conntrack is the
    nftables variant's own cost)."""
    kwargs = {
        "node": {"name": node, "ip": NODES[node].ip, "pod_cidrs": [NODES[node].pod_cidr]},
        "peers": [
            {"name": p.name, "cluster": CLUSTER["name"], "ip": p.ip, "pod_cidrs": [p.pod_cidr]}
            for p in NODES.values()
            if p.name != node
        ],
        "mode": "direct",
        "masquerade": False,
        "mesh_pod_cidrs": [CLUSTER["pod_cidr"]],
    }
    result = benchlib.python_in(PREFIX, node, datapath.RECONCILE % json.dumps(kwargs))
    if not isinstance(result, dict) or "peer_modes" not in result:
        raise RuntimeError("reconcile on %s returned %r" % (node, result))
    return result


def install_cni(mtus: dict) -> float:
    """Role cni on both nodes (the playbook of bench/datapath.py); returns its wall time."""
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


LOAD_DATAPATH = """
import json
from ansible_collections.clustermesh.core.plugins.module_utils import bpf_loader, bpf_maps
spec = json.loads(%r)
with bpf_loader.load(spec["object"], spec["pin_root"]) as dp:
    ids = dp.attach(spec["veth"])
backend_id = rev_nat_index = 0
with bpf_maps.DatapathMaps(spec["pin_root"]) as maps:
    for cluster_ip, pod_ip, ports in spec["services"]:
        for port in ports:
            backend_id += 1
            rev_nat_index += 1
            maps.write_backend(backend_id, pod_ip, port, "tcp", cluster_id=spec["cluster_id"])
            maps.write_service(cluster_ip, port, "tcp", [backend_id], rev_nat_index=rev_nat_index)
plain = {veth: bpf_loader.attached(veth) for veth in spec["plain_veths"]}
print(json.dumps({"programs": ids, "services": rev_nat_index, "plain_veths": plain}))
"""

CT_ENTRIES = """
import json
from ansible_collections.clustermesh.core.plugins.module_utils import bpf_maps
spec = json.loads(%r)
counts = dict.fromkeys(spec["addresses"], 0)
total = 0
with bpf_maps.DatapathMaps(spec["pin_root"]) as maps:
    for key in maps.ct.keys():
        total += 1
        if key["direction"] == 0 and key["daddr"] in counts:
            counts[key["daddr"]] += 1
print(json.dumps({"entries": total, "service_entries_by_cluster_ip": counts}))
"""


class Bench:
    def __init__(self, args):
        self.args = args
        self.servers = Servers()
        self.check_share = ShareCheck(args.min_share, args.retries, args.retry_budget)
        self.ksoftirqd = ksoftirqd_pid(args.iperf_cpu) if args.iperf_cpu >= 0 else None
        self.conn_rate = os.path.join(BUILD_DIR, "conn_rate")
        self.lb_object = os.path.join(BUILD_DIR, "lb.o")
        self.wheres = [s.where for s in SERVERS if s.where in args.where]
        self.servers_used = [s for s in SERVERS if s.where in args.where]
        self.variants = list(VARIANTS)
        self.pod_ips: dict[str, str] = {}
        self.veths: dict[str, str] = {}
        self.ports = ports_needed(args.rounds, args.conn_repeats, self.wheres, self.variants)
        self.next_port = 1  # CONN_PORT + 0 is the setup's check
        self.nft_on = False
        self.shells: dict[str, benchlib.Shell] = {}
        self.server_pids: dict[str, int] = {}  # where -> conn_rate server's PID (its CPU time is read)
        self.setup_info: dict = {}

    # setup --------------------------------------------------------------------------------

    def build(self) -> None:
        """lb.o (bpf_loader.build, as make -C bpf) and conn_rate, into build/bench-services/."""
        from ansible_collections.clustermesh.core.plugins.module_utils import bpf_loader

        os.makedirs(BUILD_DIR, exist_ok=True)
        bpf_loader.build(BPF_SOURCE, BUILD_DIR)
        run(["clang", "-O2", "-Wall", "-o", self.conn_rate, CONN_RATE_SOURCE], "clang conn_rate.c")

    def setup(self) -> None:
        topo = os.path.join(BUILD_DIR, "topology.yml")
        with open(topo, "w") as f:
            yaml.safe_dump(topology(), f, sort_keys=False)
        benchlib.lab_down(PREFIX, check=False)
        log("tools/lab up --prefix %s (%d hosts)" % (PREFIX, len(NODES)))
        benchlib.lab_up(PREFIX, topology=topo)
        routing = {node: reconcile_routing(node) for node in NODES}
        self.setup_info["routing"] = routing
        log("role cni on %s" % " ".join(NODES))
        self.setup_info["cni_playbook_s"] = round(install_cni({n: r["pod_mtu"] for n, r in routing.items()}), 1)
        for node, pods in PODS.items():
            for pod in pods:
                out = run([labtools.LAB, "pod", "add", "--prefix", PREFIX, node, pod], "tools/lab pod add %s" % pod)
                self.pod_ips[pod] = parse_pod_add(out)
                state = json.loads(run(host_argv(node, "cat", "/run/clustermesh/pods/%s.json" % pod), "pod state"))
                self.veths[pod] = state["result"]["interfaces"][0]["name"]
        self.setup_info["pods"] = {p: {"ip": ip, "veth": self.veths[p]} for p, ip in self.pod_ips.items()}
        # one shell in the client node and in each client pod: a command costs a fork, not a tools/lab start
        self.shells[CLIENT_NODE] = benchlib.Shell(CLIENT_NODE, host_argv(CLIENT_NODE, "sh"))
        for variant in VARIANTS:
            if variant.client not in self.shells:
                argv = pod_argv(CLIENT_NODE, variant.client, "sh")
                self.shells[variant.client] = benchlib.Shell("%s/%s" % (CLIENT_NODE, variant.client), argv)
        services = [(s.cluster_ip, self.pod_ips[s.pod]) for s in SERVERS]
        ports = [IPERF_PORT] + list(range(CONN_PORT, CONN_PORT + self.ports))
        spec = {
            "object": self.lb_object,
            "pin_root": PIN_ROOT,
            "veth": self.veths[BPF_CLIENT],
            "cluster_id": CLUSTER["id"],
            "services": [(vip, ip, ports) for vip, ip in services],
            "plain_veths": [self.veths[p] for p in PODS[CLIENT_NODE] if p != BPF_CLIENT],
        }
        loaded = benchlib.python_in(PREFIX, CLIENT_NODE, LOAD_DATAPATH % json.dumps(spec))
        if not isinstance(loaded, dict) or not all(loaded.get("programs", {}).values()):
            raise RuntimeError("loading lb.o on %s returned %r" % (CLIENT_NODE, loaded))
        stray = {veth: ids for veth, ids in loaded["plain_veths"].items() if any(ids.values())}
        if stray:
            raise RuntimeError("programs on veths that must have none: %r" % stray)
        self.setup_info["datapath"] = loaded | {"pin_root": PIN_ROOT, "object": self.lb_object}
        self.ruleset = nft_ruleset(services, self.ports)
        self.setup_info["nft_ruleset"] = self.ruleset
        log(
            "pods %s; lb.o on %s (%s), %d services"
            % (
                " ".join("%s=%s" % kv for kv in self.pod_ips.items()),
                self.veths[BPF_CLIENT],
                loaded["programs"],
                loaded["services"],
            )
        )
        cpu = str(self.args.cpu)
        for server in self.servers_used:
            label = "%s/%s" % (server.node, server.pod)
            iperf = ("iperf3", "-s", "-p", str(IPERF_PORT), "--forceflush")
            self.servers.start("iperf3 server " + label, pod_argv(server.node, server.pod, *iperf), "Server listening")
            conn = ("taskset", "-c", cpu, self.conn_rate, "server", str(CONN_PORT), str(self.ports))
            started = self.servers.start("conn_rate server " + label, pod_argv(server.node, server.pod, *conn), "ready")
            # tools/lab pod exec, nsenter and taskset exec into conn_rate: its PID is the one Popen started
            with open("/proc/%d/comm" % started.proc.pid) as f:
                comm = f.read().strip()
            if comm != "conn_rate":
                raise RuntimeError("conn_rate server %s runs as %r, not conn_rate" % (label, comm))
            self.server_pids[server.where] = started.proc.pid
        self.check()

    def check(self) -> None:
        """Every path works before anything is measured: a short conn_rate run and a 10 MB iperf3 per
        path; the ClusterIP paths really went through lb.c (cm_ct entries toward each ClusterIP) and
        through the nftables rules (their counters)."""
        checks = {}
        for server in self.servers_used:
            for variant in self.variants:
                self.nft_toggle(variant.nft)
                res = self.conn_run(server, variant, CONN_PORT, seconds=0.1, warmup=10)
                argv = ["iperf3", "-c", self.destination(server, variant), "-p", str(IPERF_PORT), "-n", "10M", "-J"]
                iperf = parse_iperf3(self.shells[variant.client].run(argv, "iperf3 check", check=False))
                check = checks[path_name(server.where, variant.name)] = {
                    "connections": res["connections"],
                    "gbps": iperf["gbps"],
                }
                if variant.nft:
                    listing = self.shells[CLIENT_NODE].run(["nft", "list", "table", "ip", NFT_TABLE], "nft list table")
                    counters = check["nft_counters"] = nft_counters(listing)
                    if not any(counters):
                        raise RuntimeError("nftables DNAT rules counted no packet: %s" % counters)
        self.nft_toggle(False)
        ct = self.ct_entries()
        missing = [vip for vip, n in ct["service_entries_by_cluster_ip"].items() if not n]
        if missing:
            raise RuntimeError("no cm_ct entry toward ClusterIP(s) %s: lb.c did not DNAT" % ", ".join(missing))
        checks["cm_ct"] = ct
        self.setup_info["checks"] = checks
        log("checks: %s" % json.dumps(checks))

    def ct_entries(self) -> dict:
        spec = {"pin_root": PIN_ROOT, "addresses": [s.cluster_ip for s in self.servers_used]}
        return benchlib.python_in(PREFIX, CLIENT_NODE, CT_ENTRIES % json.dumps(spec), timeout=300)

    def nft_toggle(self, on: bool) -> None:
        """The nftables DNAT table in the client's node: there while cluster_ip_nft runs, gone otherwise
        (its nat hooks would put every other variant's packets through conntrack)."""
        shell = self.shells[CLIENT_NODE]
        if on and not self.nft_on:
            shell.run(["nft", "-f", "-"], "nft: add table", input=self.ruleset)
        elif not on and self.nft_on:
            shell.run(["nft", "delete", "table", "ip", NFT_TABLE], "nft: delete table")
        self.nft_on = on

    # measuring ----------------------------------------------------------------------------

    def destination(self, server: Server, variant: Variant) -> str:
        return server.cluster_ip if variant.service else self.pod_ips[server.pod]

    def conn_run(self, server: Server, variant: Variant, port: int, seconds: float, warmup: int = CONN_WARMUP) -> dict:
        argv = ["taskset", "-c", str(self.args.cpu), self.conn_rate, "client"]
        argv += [self.destination(server, variant), str(port), str(seconds), str(warmup)]
        argv.append(str(self.server_pids[server.where]))
        what = "conn_rate client (%s)" % path_name(server.where, variant.name)
        return parse_conn_rate(self.shells[variant.client].run(argv, what, timeout=seconds + 60))

    def iperf3(self, server: Server, variant: Variant) -> dict:
        a = self.args
        argv = ["iperf3", "-c", self.destination(server, variant), "-p", str(IPERF_PORT)]
        argv += ["-t", str(a.time), "-O", str(a.omit), "-P", "1", "-J"]
        if a.iperf_cpu >= 0:
            argv += ["-A", "%d,%d" % (a.iperf_cpu, a.iperf_cpu)]  # client and server on one CPU
        what = "iperf3 (%s)" % path_name(server.where, variant.name)

        def once() -> dict:
            for attempt in (1, 2):
                soft0, wall0 = cpu_runtime_s(self.ksoftirqd), time.monotonic()
                out = self.shells[variant.client].run(argv, what, timeout=a.time + a.omit + 30, check=False)
                soft1, wall1 = cpu_runtime_s(self.ksoftirqd), time.monotonic()
                try:
                    res = parse_iperf3(out)
                except MeasurementError as exc:
                    if attempt == 2:
                        raise MeasurementError("%s: %s" % (what, exc)) from None
                    log("  %s: %s; retrying once" % (path_name(server.where, variant.name), exc))
                    time.sleep(1)
                    continue
                share = softirq = None
                if a.iperf_cpu >= 0 and None not in (soft0, soft1):
                    softirq = (soft1 - soft0) / (wall1 - wall0)
                    share = iperf3_share(res)
                    share = None if share is None else share + softirq
                return res | {"gbit_per_cpu_s": gbit_per_cpu_s(res), "share": share, "ksoftirqd_share": softirq}
            raise AssertionError("not reached")

        return self.check_share.take(once)

    def conn_sample(self, server: Server, variant: Variant) -> dict:
        port = CONN_PORT + self.next_port
        if self.next_port >= self.ports:
            raise RuntimeError("out of conn_rate ports (%d): every run needs a port of its own" % self.ports)
        self.next_port += 1
        return self.check_share.take(lambda: self.conn_run(server, variant, port, self.args.conn_time) | {"port": port})

    def order(self, round_index: int) -> list[tuple[Server, Variant]]:
        paths = [(s, v) for s in self.servers_used for v in self.variants]
        return datapath.path_order(paths, round_index)

    def measure(self, rounds: int) -> dict:
        samples = {sample_name(w, v.name, m): [] for w in self.wheres for v in self.variants for m in METRICS}
        details: dict = {"iperf3": {}, "conn_rate": {}}
        loads = []
        for r in range(rounds):
            loads.append(benchlib.load_average())
            order = self.order(r)
            log("round %d/%d (load %s)" % (r + 1, rounds, loads[-1]))
            iperf_runs = {(s.where, v.name): [] for s, v in order}
            for _repeat in range(self.args.iperf_repeats):  # interleaved, as the conn_rate runs
                for server, variant in order:
                    self.nft_toggle(variant.nft)
                    iperf_runs[(server.where, variant.name)].append(self.iperf3(server, variant))
            for server, variant in order:
                res = combine_iperf3(iperf_runs[(server.where, variant.name)])
                samples[sample_name(server.where, variant.name, "gbps_1")].append(res["gbps"])
                samples[sample_name(server.where, variant.name, "gbit_per_cpu_s")].append(res["gbit_per_cpu_s"])
                details["iperf3"].setdefault(path_name(server.where, variant.name), []).append(res)
                log(
                    "  %-26s %6s Gbit/s  %5s Gbit/CPU-s  (runs %s; shares %s)"
                    % (path_name(server.where, variant.name), num(res["gbps"], "%.2f"),
                       num(res["gbit_per_cpu_s"], "%.2f"), " ".join("%.2f" % run["gbps"] for run in res["runs"]),
                       format_shares(res["runs"]))
                )  # fmt: skip
            runs = {(s.where, v.name): [] for s, v in order}
            for _repeat in range(self.args.conn_repeats):  # interleaved: a burst of other work hits one run
                for server, variant in order:
                    self.nft_toggle(variant.nft)
                    runs[(server.where, variant.name)].append(self.conn_sample(server, variant))
            self.nft_toggle(False)
            for server, variant in order:
                res = combine_runs(runs[(server.where, variant.name)])
                for metric, key in CONN_METRICS.items():
                    samples[sample_name(server.where, variant.name, metric)].append(res[key])
                details["conn_rate"].setdefault(path_name(server.where, variant.name), []).append(res)
                log(
                    "  %-26s %7s conn/s  p50 %6s us  p99 %6s us  %5s CPU us/conn  (runs %s; shares %s)"
                    % (path_name(server.where, variant.name), num(res["conn_per_s"], "%.0f"),
                       num(res["p50_us"], "%.1f"), num(res["p99_us"], "%.1f"), num(res["cpu_us"], "%.1f"),
                       " ".join("%.0f" % run["conn_per_s"] for run in res["runs"]), format_shares(res["runs"]))
                )  # fmt: skip
        ct = self.ct_entries()
        conntrack = self.shells[CLIENT_NODE].run(["cat", "/proc/sys/net/netfilter/nf_conntrack_count"], "conntrack")
        ratios = ratio_specs(self.wheres, [v.name for v in self.variants])
        return benchlib.section(
            samples,
            ratios=ratios,
            targets=target_specs(ratios),
            units={sample_name(w, v.name, m): METRICS[m] for w in self.wheres for v in self.variants for m in METRICS},
            notes=self.notes(),
            extra={
                "paths": {
                    path_name(s.where, v.name): {
                        "client": "%s/%s" % (CLIENT_NODE, v.client),
                        "server": "%s/%s" % (s.node, s.pod),
                        "destination": self.destination(s, v),
                        "what": v.what,
                    }
                    for s in self.servers_used
                    for v in self.variants
                },
                "topology": topology(),
                "setup": self.setup_info,
                "parameters": {
                    "iperf3_time_s": self.args.time,
                    "iperf3_omit_s": self.args.omit,
                    "iperf3_repeats": self.args.iperf_repeats,
                    "iperf3_cpu": self.args.iperf_cpu,
                    "conn_time_s": self.args.conn_time,
                    "conn_repeats": self.args.conn_repeats,
                    "conn_warmup_connections": CONN_WARMUP,
                    "conn_cpu": self.args.cpu,
                    "conn_ports": self.ports,
                },
                "versions": datapath.versions(),
                "load_average_per_round": loads,
                "cm_ct_after": ct,
                "nf_conntrack_count_after": int(conntrack.strip()),
                "share_check": self.check_share.summary(),
                "details": details,
            },
        )

    def notes(self) -> list[str]:
        a = self.args
        return [
            "gbps_1: iperf3 receiver throughput (end.sum_received), 1 stream, %d s after %d s omitted, client and "
            "server %s; each round runs it %d times per path, interleaved, and takes the median; gbit_per_cpu_s: "
            "gbps_1 / the CPU share of the two iperf3 processes (end.cpu_utilization_percent host_total + "
            "remote_total)"
            % (
                a.time,
                a.omit,
                "pinned to CPU %d (iperf3 -A)" % a.iperf_cpu if a.iperf_cpu >= 0 else "unpinned",
                a.iperf_repeats,
            ),  # fmt: skip
            "conn_*: conn_rate (bench/bpf/conn_rate.c): connections one after another, each connect, 1-byte "
            "request, 1-byte response, server closes, client closes with a RST (no TIME_WAIT), for %g s after %d "
            "warm-up connections; client and server pinned to CPU %d (the CPU cost of a connection, not "
            "cross-CPU wake-ups); each round runs it %d times per path, interleaved, and takes the median; every "
            "run has a destination port of its own, so every connection is new to lb.c's cm_ct and to the "
            "kernel's conntrack" % (a.conn_time, CONN_WARMUP, a.cpu, a.conn_repeats),
            "paths: <where>.<variant>; where = cross_node (server pod on the other node) or same_node; variants: "
            + "; ".join("%s = %s" % (v.name, v.what) for v in VARIANTS),
            "lb.o is loaded by bpf_loader.load into %s inside %s and attached to %s's host-side veth only; "
            "services written by bpf_maps.DatapathMaps (one backend each); the nftables table ip %s exists only "
            "while cluster_ip_nft runs" % (PIN_ROOT, CLIENT_NODE, BPF_CLIENT, NFT_TABLE),
            "routing: routing_state.reconcile, mode direct, masquerade off (its raw notrack chains would skip the "
            "reverse NAT of the nftables DNAT's replies); CNI: role cni; pods: tools/lab pod add",
            "share: the CPU time client and server ran during a sample over its wall time (both are pinned to one "
            "CPU: about 0.98 on an idle machine); a sample below %g (other work took the CPU) is taken again, at "
            "most %d times and for at most %g s per benchmark run; the last attempt is kept, and left out of the "
            "samples when it is still below (a path's round sample is the median of its clean runs, None "
            "without any; details keep every run with its attempts' shares; extra.share_check sums up)"
            % (a.min_share, a.retries, a.retry_budget),
            "ratios are numerator/denominator per round, median over rounds; for conn_p50_us a ratio above 1 "
            "means the numerator is slower",
        ]


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n", maxsplit=1)[0])
    parser.add_argument("--rounds", type=int, help="rounds (default %d; --quick: 1)" % benchlib.MIN_ROUNDS)
    parser.add_argument("--quick", action="store_true", help="smoke run: 1 round of short samples")
    parser.add_argument("--time", type=int, help="iperf3 seconds per run (default 1)")
    parser.add_argument("--omit", type=int, default=0, help="iperf3 seconds omitted at the start (default 0)")
    parser.add_argument(
        "--iperf-repeats",
        type=int,
        help="iperf3 runs per path and round, interleaved; median (default 4; --quick: 1)",
    )
    parser.add_argument(
        "--iperf-cpu", type=int, default=0, help="CPU of iperf3 client and server (iperf3 -A; default 0; -1: unpinned)"
    )
    parser.add_argument("--conn-time", type=float, help="conn_rate seconds per run (default 0.5; --quick: 0.3)")
    parser.add_argument(
        "--conn-repeats",
        type=int,
        help="conn_rate runs per path and round, interleaved; median (default 3; --quick: 2)",
    )
    parser.add_argument("--cpu", type=int, default=0, help="CPU of conn_rate client and server (default 0)")
    parser.add_argument(
        "--min-share",
        type=float,
        default=0.9,
        help="take a sample again when its client and server got less than this share of their CPU (default 0.9; "
        "0: never)",
    )
    parser.add_argument("--retries", type=int, default=3, help="attempts after the first per sample (default 3)")
    parser.add_argument(
        "--retry-budget", type=float, default=60, help="seconds of retried samples per run, at most (default 60)"
    )
    parser.add_argument("--where", default=",".join(WHERE), help="comma-separated: %s (default both)" % ",".join(WHERE))
    parser.add_argument("--output", help="result file (default: bench/results/%s.json)" % NAME)
    parser.add_argument("--keep-lab", action="store_true", help="leave the lab up at the end (debugging)")
    parser.add_argument("--prefix", default=PREFIX, help="lab prefix (default %s)" % PREFIX)
    args = parser.parse_args(argv)
    quick = args.quick
    args.rounds = args.rounds if args.rounds is not None else (1 if quick else benchlib.MIN_ROUNDS)
    args.time = args.time or 1
    args.iperf_repeats = args.iperf_repeats or (1 if quick else 4)
    args.conn_time = args.conn_time or (0.3 if quick else 0.5)
    args.conn_repeats = args.conn_repeats or (2 if quick else 3)
    if args.rounds < 1:
        parser.error("--rounds must be at least 1")
    args.where = tuple(w.strip() for w in args.where.split(",") if w.strip())
    unknown = sorted(set(args.where) - set(WHERE))
    if unknown or not args.where:
        parser.error("--where: unknown or empty %s; choose from %s" % (", ".join(unknown), ", ".join(WHERE)))
    if ports_needed(args.rounds, args.conn_repeats, args.where, VARIANTS) > 4096:
        parser.error("too many conn_rate runs for one port each (at most 4095): fewer --rounds or --conn-repeats")
    args.output = args.output or (os.path.join(BUILD_DIR, NAME + "-quick.json") if quick else None)
    return args


def main(argv=None) -> int:
    global PREFIX
    args = parse_args(argv)
    PREFIX = args.prefix
    if os.geteuid() != 0:
        print("the lab needs root", file=sys.stderr)
        return 2
    if args.rounds < benchlib.MIN_ROUNDS:
        log("warning: %d round(s); the project's rule is at least %d" % (args.rounds, benchlib.MIN_ROUNDS))

    def terminate(signum, _frame):
        raise KeyboardInterrupt("signal %d" % signum)

    signal.signal(signal.SIGTERM, terminate)
    benchlib.ensure_collection_link()
    if benchlib.COLLECTIONS_ROOT not in sys.path:
        sys.path.insert(0, benchlib.COLLECTIONS_ROOT)
    started = time.monotonic()
    load_start = benchlib.load_average()
    log("host %s; load average at start %s" % (benchlib.host_facts(), load_start))
    bench = Bench(args)
    failed = False
    try:
        bench.build()
        bench.setup()
        section = bench.measure(args.rounds)
    except Exception as exc:  # noqa: BLE001 - recorded in the result; the lab still goes down
        failed = True
        traceback.print_exc()
        section = {"error": "%s: %s" % (type(exc).__name__, exc), "samples": {}, "ratios": {}, "targets": {}}
    finally:
        # a second Ctrl-C must not interrupt the cleanup (children inherit the ignored signals)
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        for shell in bench.shells.values():
            shell.close()
        bench.servers.stop()
        if args.keep_lab:
            log("lab %s left up (--keep-lab); remove it with: tools/lab down --prefix %s" % (PREFIX, PREFIX))
        else:
            log("tools/lab down --prefix %s" % PREFIX)
            try:
                benchlib.lab_down(PREFIX)
            except Exception:  # noqa: BLE001
                traceback.print_exc()
                failed = True
    if "error" in section:
        text = "FAILED: %s" % section["error"]
    else:
        text = report(section, bench.wheres, VARIANT_NAMES, args.rounds)
    benchlib.finish(
        NAME,
        benchmarks={"services_datapath": section},
        rounds=args.rounds,
        started=started,
        load_start=load_start,
        report=text,
        output=args.output,
        argv=argv,
    )
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
