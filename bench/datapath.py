"""Datapath benchmark (issue 4): pod-to-pod throughput and request/response latency, lab ``cmbd``.

    .venv/bin/python bench/datapath.py [--rounds N] [--quick] [--only PATH,...] [--output FILE] (--help: all)

Every round measures every path below, one after the other (order reversed every other round),
with iperf3 1 stream, iperf3 4 streams and tcp_rr (a TCP request/response loop, 1-byte messages):

same_node       two pods on one node (the reference for pod plumbing)
plain_pods      pods made by the same CNI (role cni + tools/lab pod add) on two nodes that routing never
                touched: the routes between their pod CIDRs are plain kernel routes added by hand
                (``ip route add <peer pod cidr> via <peer node ip>``, no protocol tag, no device or
                nftables table of ours) and ip_forward=1: the physical reference for pod-to-pod paths
plain_hosts     iperf3 between the underlay addresses of two lab hosts left as tools/lab made them
                (one segment: the lab's bridge; no pod, no device, route or table of ours): host to
                host, two veths and no forwarding hop (a pod-to-pod packet crosses four veths and is
                forwarded by both nodes)
direct          pods on two nodes of one cluster, routing mode direct
direct_nomasq   the same with routing_masquerade off (no nftables NAT table, so no conntrack)
tunnel          pods on two nodes, routing mode tunnel (classic VXLAN: FDB + neighbour + onlink routes)
collect_md      pods on two nodes over a collect-metadata VXLAN device fed by a tc BPF program
                (bench/bpf/vxlan_md.c: a benchmark fixture, not the product's datapath)
hybrid_onlink   pods of two clusters, routing mode hybrid, peer on the same segment (routed directly)
hybrid_routed   pods of two clusters, routing mode hybrid, peer behind the lab router (tunnelled)
plain_routed    host to host like plain_hosts, on different segments (through the lab router, like
                hybrid_routed)

What is measured is what the collection ships: each node's routing is set up by
``routing_state.reconcile`` (the library of module ``routing``) run inside the lab host, the CNI
plugin clustermesh-cni is installed by role ``cni`` (one ansible-playbook run), and pods are made by
``tools/lab pod add``, which calls the plugin exactly as a container runtime does. Each path has its
own lab hosts, set up once before the first round. Ratios are per round (both values from the same
round); their median is reported. Every path is CPU-bound on this shared 2-CPU VM, so before each
sample a quiet gate waits (bounded) until other work leaves the CPUs nearly idle. Targets: direct >=
0.97 x plain_pods and tunnel >= 0.85 x direct (iperf3 throughput, 1 and 4 streams); direct/plain_hosts
is reported beside them. After the last round every pod node's conntrack table
(/proc/net/nf_conntrack) is read: extra.conntrack says how many pod-to-pod flows were tracked.

Prints the load average and a table, writes bench/results/datapath.json (``--quick``: one short
round, written to build/bench-datapath/datapath-quick.json unless ``--output`` is given).
The lab is removed at the end, also on failure, Ctrl-C or SIGTERM.
"""

from __future__ import annotations

import argparse
import ipaddress
import json
import os
import shlex
import signal
import struct
import subprocess
import sys
import time
import traceback
from dataclasses import dataclass, field

import benchlib
import yaml
from benchlib import labtools

PREFIX = "cmbd"
NAME = "datapath"
BUILD_DIR = os.path.join(benchlib.REPO_ROOT, "build", "bench-datapath")
BPF_DIR = os.path.join(benchlib.REPO_ROOT, "bench", "bpf")
IPERF_PORT = 5201
RR_PORT = 7777
RR_WARMUP = 1000  # transactions before tcp_rr starts recording
UNDERLAY_MTU = 1500  # lab hosts' eth0
VNI = 2  # the classic device's VNI (routing_plan.VXLAN_VNI), reused by the collect-md fixture
MD_DEVICE = "bvx_md"  # the fixture's external VXLAN device (not cm_: it is not product state)
MD_MAC = "0e:cc:00:00:00:01"  # one MAC on every collect-md device (the inner destination)
MD_PIN = "/sys/fs/bpf/tc/globals/md_routes"  # tc's pin of the fixture's map (each lab host has its own bpffs)
MESH_POD_CIDRS = ("10.1.0.0/16", "10.2.0.0/16")

# --------------------------------------------------------------------------------------------
# the lab: one group of hosts per routing setup
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Node:
    name: str
    cluster: str | None
    segment: str
    ip: str
    pod_cidr: str | None  # this node's /24 (None: a host without pods)


# Group modes besides the product's routing modes
COLLECT_MD = "collect_md"  # the BPF fixture
KERNEL = "kernel"  # plain kernel routes added by hand, nothing of ours but the CNI's pods
NONE = "none"  # hosts left as tools/lab made them


@dataclass(frozen=True)
class Group:
    """Nodes configured together. ``mode``: a routing mode of the product; ``collect_md`` (the fixture:
    its nodes run reconcile with no peers, for the same masquerade table as the others); ``kernel``
    (no reconcile: CNI pods and hand-made kernel routes, the physical reference for pod paths); ``none``
    (hosts left as tools/lab made them: the host-to-host reference)."""

    name: str
    mode: str
    nodes: tuple[str, ...]
    pods: dict  # node -> pod names
    masquerade: bool = True

    @property
    def routing_mode(self) -> str:
        return "tunnel" if self.mode == COLLECT_MD else self.mode


CLUSTERS = {"cluster1": {"id": 1, "pod_cidr": MESH_POD_CIDRS[0]}, "cluster2": {"id": 2, "pod_cidr": MESH_POD_CIDRS[1]}}
SEGMENTS = [{"name": "dc1", "cidr": "198.18.1.0/24"}, {"name": "dc2", "cidr": "198.18.2.0/24"}]
NODES = {
    n.name: n
    for n in (
        Node("d1", "cluster1", "dc1", "198.18.1.11", "10.1.1.0/24"),
        Node("d2", "cluster1", "dc1", "198.18.1.12", "10.1.2.0/24"),
        Node("n1", "cluster1", "dc1", "198.18.1.13", "10.1.3.0/24"),
        Node("n2", "cluster1", "dc1", "198.18.1.14", "10.1.4.0/24"),
        Node("t1", "cluster1", "dc1", "198.18.1.15", "10.1.5.0/24"),
        Node("t2", "cluster1", "dc1", "198.18.1.16", "10.1.6.0/24"),
        Node("m1", "cluster1", "dc1", "198.18.1.17", "10.1.7.0/24"),
        Node("m2", "cluster1", "dc1", "198.18.1.18", "10.1.8.0/24"),
        Node("h1", "cluster1", "dc1", "198.18.1.19", "10.1.9.0/24"),
        Node("h2", "cluster2", "dc1", "198.18.1.20", "10.2.1.0/24"),
        Node("h3", "cluster2", "dc2", "198.18.2.11", "10.2.2.0/24"),
        Node("k1", "cluster1", "dc1", "198.18.1.23", "10.1.10.0/24"),
        Node("k2", "cluster1", "dc1", "198.18.1.24", "10.1.11.0/24"),
        Node("p1", None, "dc1", "198.18.1.21", None),
        Node("p2", None, "dc1", "198.18.1.22", None),
        Node("p3", None, "dc2", "198.18.2.12", None),
    )
}
GROUPS = (
    Group("direct", "direct", ("d1", "d2"), {"d1": ("pa", "pb"), "d2": ("pa",)}),
    Group("direct_nomasq", "direct", ("n1", "n2"), {"n1": ("pa",), "n2": ("pa",)}, masquerade=False),
    Group("tunnel", "tunnel", ("t1", "t2"), {"t1": ("pa",), "t2": ("pa",)}),
    Group("collect_md", COLLECT_MD, ("m1", "m2"), {"m1": ("pa",), "m2": ("pa",)}),
    Group("hybrid", "hybrid", ("h1", "h2", "h3"), {"h1": ("pa",), "h2": ("pa",), "h3": ("pa",)}),
    Group("plain_pods", KERNEL, ("k1", "k2"), {"k1": ("pa",), "k2": ("pa",)}, masquerade=False),
    Group("plain_hosts", NONE, ("p1", "p2", "p3"), {}, masquerade=False),
)


def kernel_routes(group: Group, node: str) -> list[tuple[str, str]]:
    """(peer pod CIDR, peer node IP) for each other node of a ``kernel`` group: the plain routes added by
    hand, as an administrator would without us."""
    return [(NODES[p].pod_cidr, NODES[p].ip) for p in group.nodes if p != node]


def kernel_routing_script(group: Group, node: str) -> str:
    """The shell commands that give a ``kernel`` node its routes (no protocol tag) and ip_forward."""
    lines = ["sysctl -qw net.ipv4.ip_forward=1"]
    lines += ["ip route add %s via %s" % route for route in kernel_routes(group, node)]
    return "\n".join(lines)


def topology() -> dict:
    """The lab topology (tools/lab up --topology)."""
    return {
        "clusters": CLUSTERS,
        "segments": SEGMENTS,
        "hosts": [
            {"name": n.name, "segment": n.segment, "address": n.ip} | ({"cluster": n.cluster} if n.cluster else {})
            for n in NODES.values()
        ],
    }


def node_input(node: str) -> dict:
    n = NODES[node]
    return {"name": n.name, "ip": n.ip, "pod_cidrs": [n.pod_cidr]}


def peers_of(group: Group, node: str) -> list[dict]:
    """Routing peers of ``node``: the other nodes of its group (routing_plan's PEERS shape); none for the
    collect-md fixture, whose tunnel is the BPF program's, and for groups that reconcile never runs on."""
    if group.mode in (COLLECT_MD, KERNEL, NONE):
        return []
    return [
        {"name": p, "cluster": NODES[p].cluster, "ip": NODES[p].ip, "pod_cidrs": [NODES[p].pod_cidr]}
        for p in group.nodes
        if p != node
    ]


# --------------------------------------------------------------------------------------------
# paths and metrics
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Path:
    name: str
    client: tuple[str, str | None]  # (host, pod); pod None = the host's own network namespace
    server: tuple[str, str | None]
    what: str
    device: str | None  # the client host's route to the server must leave through it (None: no route)


PATHS = (
    Path("same_node", ("d1", "pa"), ("d1", "pb"), "two pods on one node (veth, host routing)", "*"),
    Path("plain_pods", ("k1", "pa"), ("k2", "pa"), "pods on two nodes, CNI pods + plain kernel routes", "eth0"),
    Path("plain_hosts", ("p1", None), ("p2", None), "underlay host to host on one segment, nothing of ours", "eth0"),
    Path("direct", ("d1", "pa"), ("d2", "pa"), "pods on two nodes, mode direct", "eth0"),
    Path("direct_nomasq", ("n1", "pa"), ("n2", "pa"), "pods on two nodes, mode direct, masquerade off", "eth0"),
    Path("tunnel", ("t1", "pa"), ("t2", "pa"), "pods on two nodes, mode tunnel (classic FDB VXLAN)", "cm_vxlan"),
    Path("collect_md", ("m1", "pa"), ("m2", "pa"), "pods on two nodes, collect-md VXLAN + tc BPF (fixture)", None),
    Path("hybrid_onlink", ("h1", "pa"), ("h2", "pa"), "pods of two clusters, hybrid, on-link peer (direct)", "eth0"),
    Path("hybrid_routed", ("h1", "pa"), ("h3", "pa"), "pods of two clusters, hybrid, routed peer", "cm_vxlan"),
    Path("plain_routed", ("p1", None), ("p3", None), "underlay host to host through the lab router", "eth0"),
)
PATH_NAMES = tuple(p.name for p in PATHS)

# metric -> unit
METRICS = {
    "gbps_1": "Gbit/s",
    "gbps_4": "Gbit/s",
    "rr_tps": "transactions/s",
    "rr_p50_us": "us",
    "rr_p99_us": "us",
}
RATIO_METRICS = ("gbps_1", "gbps_4", "rr_tps", "rr_p50_us")
# ratio name -> (numerator path, denominator path)
COMPARISONS = {
    "direct_over_plain_pods": ("direct", "plain_pods"),
    "direct_over_plain_hosts": ("direct", "plain_hosts"),
    "tunnel_over_direct": ("tunnel", "direct"),
    "collect_md_over_tunnel": ("collect_md", "tunnel"),
    "direct_over_same_node": ("direct", "same_node"),
    "direct_over_direct_nomasq": ("direct", "direct_nomasq"),
    "direct_nomasq_over_plain_pods": ("direct_nomasq", "plain_pods"),
    "direct_nomasq_over_plain_hosts": ("direct_nomasq", "plain_hosts"),
    "plain_pods_over_plain_hosts": ("plain_pods", "plain_hosts"),
    "hybrid_onlink_over_direct": ("hybrid_onlink", "direct"),
    "hybrid_routed_over_tunnel": ("hybrid_routed", "tunnel"),
    "hybrid_routed_over_plain_routed": ("hybrid_routed", "plain_routed"),
}
TARGETS = {
    "direct >= 0.97 x plain_pods, 1 stream": ("ratios.direct_over_plain_pods.gbps_1", ">=", 0.97),
    "direct >= 0.97 x plain_pods, 4 streams": ("ratios.direct_over_plain_pods.gbps_4", ">=", 0.97),
    "tunnel >= 0.85 x direct, 1 stream": ("ratios.tunnel_over_direct.gbps_1", ">=", 0.85),
    "tunnel >= 0.85 x direct, 4 streams": ("ratios.tunnel_over_direct.gbps_4", ">=", 0.85),
}


def sample_name(path: str, metric: str) -> str:
    return "%s.%s" % (path, metric)


def ratio_specs(paths) -> dict[str, tuple[str, str]]:
    """benchlib.section ratios of the comparisons whose both paths are measured."""
    return {
        "%s.%s" % (name, metric): (sample_name(num, metric), sample_name(den, metric))
        for name, (num, den) in COMPARISONS.items()
        if num in paths and den in paths
        for metric in RATIO_METRICS
    }


def target_specs(ratios) -> dict[str, tuple[str, str, float]]:
    """The targets whose ratio is measured."""
    return {name: spec for name, spec in TARGETS.items() if spec[0].partition(".")[2] in ratios}


def path_order(paths, round_index: int) -> list:
    """Paths in order on even rounds, reversed on odd ones: compared paths stay neighbours, and a drift
    of the machine's load does not always favour the same side."""
    return list(paths) if round_index % 2 == 0 else list(reversed(paths))


def groups_for(paths) -> list[Group]:
    """The groups whose hosts the paths use (each group is set up as a whole)."""
    hosts = {h for p in paths for h in (p.client[0], p.server[0])}
    return [g for g in GROUPS if hosts & set(g.nodes)]


# --------------------------------------------------------------------------------------------
# parsing (pure)
# --------------------------------------------------------------------------------------------


class MeasurementError(RuntimeError):
    pass


def parse_iperf3(text: str) -> dict:
    """The result of ``iperf3 -c ... -J``: receiver throughput (Gbit/s), sender throughput,
    retransmits, CPU use. Raises MeasurementError with iperf3's own message when it failed."""
    try:
        doc = json.loads(text)
    except ValueError:
        raise MeasurementError("iperf3 printed no JSON: %r" % text[-500:]) from None
    if not isinstance(doc, dict):
        raise MeasurementError("iperf3 printed %s, not a JSON object" % type(doc).__name__)
    if doc.get("error"):
        raise MeasurementError("iperf3: %s" % doc["error"])
    end = doc.get("end") or {}
    received, sent = end.get("sum_received"), end.get("sum_sent")
    if not received or not sent:
        raise MeasurementError("iperf3 JSON without end.sum_received/end.sum_sent")
    cpu = end.get("cpu_utilization_percent") or {}
    start = doc.get("start") or {}
    return {
        "gbps": received["bits_per_second"] / 1e9,
        "sent_gbps": sent["bits_per_second"] / 1e9,
        "seconds": received.get("seconds"),
        "retransmits": sent.get("retransmits"),
        "streams": (start.get("test_start") or {}).get("num_streams"),
        "cpu_client_pct": cpu.get("host_total"),
        "cpu_server_pct": cpu.get("remote_total"),
    }


def parse_tcp_rr(text: str) -> dict:
    """The output of ``tcp_rr client``: a header ``tcp_rr 1 <count> <elapsed_ns>``, then one latency
    in ns per line. Returns transactions/s and latency percentiles in microseconds."""
    words = text.split()
    if len(words) < 4 or words[0] != "tcp_rr" or words[1] != "1":
        raise MeasurementError("tcp_rr printed no result: %r" % text[:300])
    try:
        count, elapsed_ns = int(words[2]), int(words[3])
        latencies = [int(v) / 1000.0 for v in words[4:]]
    except ValueError as exc:
        raise MeasurementError("tcp_rr: %s" % exc) from None
    if count == 0 or elapsed_ns <= 0 or len(latencies) != count:
        raise MeasurementError(
            "tcp_rr: header says %d transactions in %d ns, %d latencies follow" % (count, elapsed_ns, len(latencies))
        )
    return {
        "transactions": count,
        "seconds": elapsed_ns / 1e9,
        "tps": count / (elapsed_ns / 1e9),
        "p50_us": benchlib.percentile(latencies, 50),
        "p90_us": benchlib.percentile(latencies, 90),
        "p99_us": benchlib.percentile(latencies, 99),
        "min_us": min(latencies),
        "max_us": max(latencies),
        "mean_us": sum(latencies) / count,
    }


def combine_rr(runs: list[dict]) -> dict:
    """One tcp_rr sample from several short runs of a path (interleaved with the other paths' runs):
    the median of their rates and percentiles, and the runs themselves."""
    return {
        "tps": benchlib.median(r["tps"] for r in runs),
        "p50_us": benchlib.median(r["p50_us"] for r in runs),
        "p99_us": benchlib.median(r["p99_us"] for r in runs),
        "runs": runs,
    }


def parse_pod_add(text: str) -> str:
    """The pod's IP: the last line ``tools/lab pod add`` prints."""
    lines = text.strip().splitlines()
    try:
        return str(ipaddress.IPv4Address(lines[-1].strip()))
    except (IndexError, ValueError):
        raise MeasurementError("tools/lab pod add printed no IPv4 address last: %r" % text[-300:]) from None


def route_device(text: str) -> str | None:
    """The ``dev`` of ``ip route get`` output (None when there is none, e.g. unreachable)."""
    words = text.split()
    return words[words.index("dev") + 1] if "dev" in words[:-1] else None


def parse_proc_stat(text: str) -> tuple[int, int]:
    """(busy, total) jiffies of all CPUs from /proc/stat's ``cpu`` line (idle and iowait are not busy)."""
    for line in text.splitlines():
        fields = line.split()
        if fields and fields[0] == "cpu":
            values = [int(v) for v in fields[1:9]]  # user nice system idle iowait irq softirq steal
            idle = values[3] + values[4]
            return sum(values) - idle, sum(values)
    raise ValueError("no cpu line in /proc/stat")


def cpu_busy(before: tuple[int, int], after: tuple[int, int]) -> float | None:
    """The fraction of all CPUs' time spent busy between two parse_proc_stat readings."""
    busy, total = after[0] - before[0], after[1] - before[1]
    return busy / total if total > 0 else None


def md_key_hex(cidr: str) -> list[str]:
    """bpftool hex bytes of an md_routes key (struct md_key: prefixlen in host order, address in network order)."""
    net = ipaddress.IPv4Network(cidr)
    return ["%02x" % b for b in struct.pack("<I", net.prefixlen) + net.network_address.packed]


def md_value_hex(remote_ip: str, vni: int, ifindex: int, mac: str) -> list[str]:
    """bpftool hex bytes of an md_routes value (struct md_dest: remote IPv4 in host byte order, VNI,
    ifindex, MAC, 2 bytes of padding)."""
    raw = struct.pack("<III", int(ipaddress.IPv4Address(remote_ip)), vni, ifindex)
    raw += bytes(int(b, 16) for b in mac.split(":")) + b"\0\0"
    return ["%02x" % b for b in raw]


# --------------------------------------------------------------------------------------------
# report (pure)
# --------------------------------------------------------------------------------------------


def _spread(section: dict, name: str) -> str:
    s = section.get("spread", {}).get(name) or {}
    if s.get("median") is None:
        return "-"
    fmt = "%.2f" if s["median"] < 100 else "%.0f"
    if s["n"] == 1:
        return fmt % s["median"]
    return (fmt + " [" + fmt + "-" + fmt + "]") % (s["median"], s["min"], s["max"])


def report(section: dict, paths) -> str:
    """Readable tables: per path the median [min-max] of each metric; ratios; targets."""
    rows = [[p] + [_spread(section, sample_name(p, m)) for m in METRICS] for p in paths]
    out = [
        benchlib.format_table(
            ["path", "Gbit/s 1 stream", "Gbit/s 4 streams", "RR trans/s", "RR p50 us", "RR p99 us"], rows
        )
    ]
    ratios = section.get("ratios") or {}
    names = [n for n in COMPARISONS if any(r.startswith(n + ".") for r in ratios)]
    if names:
        rrows = [[n] + [(ratios.get("%s.%s" % (n, m)) or {}).get("median") for m in RATIO_METRICS] for n in names]
        out.append(
            benchlib.format_table(
                ["ratio (median of per-round ratios)", "gbps_1", "gbps_4", "rr_tps", "rr_p50_us"], rrows
            )
        )
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


def log(msg: str) -> None:
    print("[%s] %s" % (time.strftime("%H:%M:%S"), msg), flush=True)


def host_argv(host: str, *command: str) -> list[str]:
    return benchlib.lab_exec_argv(PREFIX, host, *command)


def pod_argv(host: str, pod: str, *command: str) -> list[str]:
    return [labtools.LAB, "pod", "exec", "--prefix", PREFIX, host, pod, "--", *command]


def run(argv: list[str], what: str, timeout: float = 60, input: str | None = None) -> str:
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, input=input, check=False)
    if proc.returncode != 0:
        raise RuntimeError(
            "%s failed (exit %d): %s\n%s%s"
            % (what, proc.returncode, shlex.join(argv), proc.stdout[-3000:], proc.stderr)
        )
    return proc.stdout


def sh(host: str, script: str, what: str, timeout: float = 60, input: str | None = None) -> str:
    return run(host_argv(host, "sh", "-euc", script), "%s on %s" % (what, host), timeout=timeout, input=input)


RECONCILE = """
import json
from ansible_collections.clustermesh.core.plugins.module_utils.routing_state import reconcile
r = reconcile(**json.loads(%r))
print(json.dumps({k: r[k] for k in ("changed", "changes", "peer_modes", "pod_mtu", "underlay", "warnings")}
                 | {"masquerade": r["masquerade"]["enabled"]}))
"""


def reconcile_routing(group: Group, node: str) -> dict:
    """routing_state.reconcile (what module routing runs) inside the node, with the group's mode and peers."""
    kwargs = {
        "node": node_input(node),
        "peers": peers_of(group, node),
        "mode": group.routing_mode,
        "masquerade": group.masquerade,
        "mesh_pod_cidrs": list(MESH_POD_CIDRS),
    }
    result = benchlib.python_in(PREFIX, node, RECONCILE % json.dumps(kwargs))
    if not isinstance(result, dict) or "peer_modes" not in result:
        raise RuntimeError("reconcile on %s returned %r" % (node, result))
    return result


def kernel_routing(group: Group, node: str) -> dict:
    """A ``kernel`` node: ip_forward and plain routes to the peers' pod CIDRs, by hand; checks that
    nothing else is there (no nftables ruleset, no route of ours). Returns what reconcile_routing
    returns that the setup uses, plus the node's routes and ruleset as seen."""
    sh(node, kernel_routing_script(group, node), "plain kernel routes")
    routes = run(host_argv(node, "ip", "route", "show"), "ip route on %s" % node)
    ruleset = run(host_argv(node, "nft", "list", "ruleset"), "nft list ruleset on %s" % node)
    if ruleset.strip() or "proto 203" in routes:
        raise RuntimeError("plain node %s is not plain: ruleset %r, routes %r" % (node, ruleset, routes))
    return {
        "changed": True,
        "changes": kernel_routing_script(group, node).splitlines(),
        "peer_modes": {p: KERNEL for p in group.nodes if p != node},
        "pod_mtu": UNDERLAY_MTU,
        "routes": routes.strip().splitlines(),
        "nft_ruleset": ruleset,
    }


def parse_conntrack(text: str, cidrs) -> dict:
    """Counts of /proc/net/nf_conntrack entries: all of them, and those whose original direction goes
    from one of ``cidrs`` to one of ``cidrs`` (pod-to-pod flows that conntrack tracked)."""
    nets = [ipaddress.ip_network(c) for c in cidrs]

    def inside(address):
        return any(ipaddress.ip_address(address) in n for n in nets)

    total = pod_to_pod = 0
    for line in text.splitlines():
        words = line.split()
        src = next((w[4:] for w in words if w.startswith("src=")), None)  # the original direction's
        dst = next((w[4:] for w in words if w.startswith("dst=")), None)
        if src is None or dst is None:
            continue
        total += 1
        pod_to_pod += inside(src) and inside(dst)
    return {"entries": total, "pod_to_pod": pod_to_pod}


CNI_PLAYBOOK = """
- name: CNI plugin on the benchmark's nodes (role cni, as tests/lab/test_cni.py installs it)
  hosts: "{{ bench_cni_nodes }}"
  gather_facts: false
  tasks:
    - name: Role cni
      ansible.builtin.include_role:
        name: clustermesh.core.cni
      vars:
        cni_pod_cidr: "{{ bench_cni[inventory_hostname].pod_cidr }}"
        cni_mtu: "{{ bench_cni[inventory_hostname].mtu }}"
"""


def cni_vars(mtus: dict) -> dict:
    """Extra vars of CNI_PLAYBOOK: node -> pod MTU (from reconcile) gives each node's pod CIDR and MTU."""
    return {
        "bench_cni_nodes": ",".join(sorted(mtus)),
        "bench_cni": {node: {"pod_cidr": NODES[node].pod_cidr, "mtu": mtu} for node, mtu in sorted(mtus.items())},
    }


def install_cni(mtus: dict) -> float:
    """Role cni on every node of ``mtus`` (node -> pod MTU); returns the playbook's wall time."""
    book = os.path.join(BUILD_DIR, "cni.yml")
    extra = os.path.join(BUILD_DIR, "cni-vars.json")
    with open(book, "w") as f:
        f.write(CNI_PLAYBOOK)
    with open(extra, "w") as f:
        json.dump(cni_vars(mtus), f)
    started = time.monotonic()
    benchlib.require_ok(benchlib.run_playbook(PREFIX, book, "-e", "@" + extra, timeout=600), "role cni")
    return time.monotonic() - started


def add_pod(node: str, pod: str) -> str:
    out = run([labtools.LAB, "pod", "add", "--prefix", PREFIX, node, pod], "tools/lab pod add %s %s" % (node, pod))
    return parse_pod_add(out)


def setup_collect_md(group: Group, pod_ips: dict, obj: str) -> dict:
    """The fixture on each node of the group: an external VXLAN device, the BPF program on the ingress
    of every local pod's host-side veth (found by the pod's host route), and an md_routes entry per
    remote pod CIDR."""
    info = {}
    for node in group.nodes:
        sh(
            node,
            "ip link add %s type vxlan external dstport 8472\nip link set %s address %s mtu %d up"
            % (MD_DEVICE, MD_DEVICE, MD_MAC, UNDERLAY_MTU - 50),
            "collect-md device",
        )
        ifindex = json.loads(run(host_argv(node, "ip", "-j", "link", "show", MD_DEVICE), "ip link"))[0]["ifindex"]
        veths = []
        for pod in group.pods[node]:
            routes = json.loads(run(host_argv(node, "ip", "-j", "route", "show", pod_ips[(node, pod)]), "ip route"))
            veth = routes[0]["dev"]
            veths.append(veth)
            sh(
                node,
                "tc qdisc add dev %s clsact\ntc filter add dev %s ingress bpf direct-action obj %s sec tc/to_tunnel"
                % (veth, veth, shlex.quote(obj)),
                "tc attach",
            )
        for peer in group.nodes:
            if peer != node:
                key = md_key_hex(NODES[peer].pod_cidr)
                value = md_value_hex(NODES[peer].ip, VNI, ifindex, MD_MAC)
                run(
                    host_argv(node, "bpftool", "map", "update", "pinned", MD_PIN, "key", "hex", *key, "value", "hex")
                    + value,
                    "bpftool map update on %s" % node,
                )
        info[node] = {"device": MD_DEVICE, "ifindex": ifindex, "veths": veths}
    return info


class QuietGate:
    """Waits, before each sample, until the machine is nearly idle: every path is CPU-bound on this
    shared 2-CPU VM, so a sample taken while other work runs measures our share of the CPU, not the
    path. Between samples nothing of ours runs (the servers wait), so the CPU use seen over
    ``interval`` seconds is other work. Waits at most ``wait_s`` per sample and ``budget_s`` per run
    (then measures regardless); every sample records what the gate saw."""

    def __init__(self, max_busy: float, wait_s: float, budget_s: float, interval: float = 0.5):
        self.max_busy, self.wait_s, self.budget_s, self.interval = max_busy, wait_s, budget_s, interval
        self.waited_s = 0.0
        self.over_limit = 0  # samples taken although the machine was busier than max_busy

    @staticmethod
    def _stat() -> tuple[int, int]:
        with open("/proc/stat") as f:
            return parse_proc_stat(f.read())

    def busy_now(self) -> float | None:
        before = self._stat()
        time.sleep(self.interval)
        return cpu_busy(before, self._stat())

    def wait(self) -> dict:
        started = time.monotonic()
        busy = self.busy_now()
        while busy is not None and busy > self.max_busy:
            waited = time.monotonic() - started
            if waited >= self.wait_s or self.waited_s + waited >= self.budget_s:
                self.over_limit += 1
                break
            busy = self.busy_now()
        waited = time.monotonic() - started
        self.waited_s += waited
        return {"busy_before": None if busy is None else round(busy, 3), "waited_s": round(waited, 1)}

    def summary(self) -> dict:
        return {
            "max_busy": self.max_busy,
            "wait_per_sample_s": self.wait_s,
            "budget_s": self.budget_s,
            "waited_s": round(self.waited_s, 1),
            "samples_over_limit": self.over_limit,
        }


@dataclass
class Server:
    name: str
    proc: subprocess.Popen
    reader: benchlib.LineReader = field(repr=False)


class Servers:
    """iperf3 and tcp_rr servers started by this process (each is the process Popen started: tools/lab
    exec and nsenter exec into it); stopped by PID."""

    def __init__(self):
        self.servers: list[Server] = []

    def start(self, name: str, argv: list[str], ready: str, timeout: float = 15) -> Server:
        proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        server = Server(name, proc, benchlib.LineReader(proc.stdout))
        self.servers.append(server)
        deadline = time.monotonic() + timeout
        while True:
            line = server.reader.next_line(max(0.01, deadline - time.monotonic()))
            if line is None:
                raise RuntimeError("%s ended before it was ready: %s" % (name, "".join(server.reader.lines)))
            if ready in line:
                return server

    def stop(self) -> None:
        for server in self.servers:
            if server.proc.poll() is None:
                server.proc.terminate()
        for server in self.servers:
            try:
                server.proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                server.proc.kill()
                server.proc.wait()
        self.servers = []


class Bench:
    def __init__(self, args):
        self.args = args
        self.servers = Servers()
        self.gate = QuietGate(args.max_busy, args.gate_wait, args.gate_budget)
        self.rr_binary = os.path.join(BUILD_DIR, "tcp_rr")
        self.bpf_object = os.path.join(BUILD_DIR, "vxlan_md.o")
        self.paths = [p for p in PATHS if p.name in args.paths]
        self.pod_ips: dict[tuple[str, str], str] = {}
        self.setup_info: dict = {}

    # endpoints ----------------------------------------------------------------------------

    def argv(self, endpoint, *command: str) -> list[str]:
        host, pod = endpoint
        return host_argv(host, *command) if pod is None else pod_argv(host, pod, *command)

    def ip(self, endpoint) -> str:
        host, pod = endpoint
        return NODES[host].ip if pod is None else self.pod_ips[(host, pod)]

    # setup --------------------------------------------------------------------------------

    def build(self) -> None:
        """tcp_rr and the BPF fixture, into build/bench-datapath/."""
        os.makedirs(BUILD_DIR, exist_ok=True)
        run(["clang", "-O2", "-Wall", "-o", self.rr_binary, os.path.join(BPF_DIR, "tcp_rr.c")], "clang tcp_rr.c")
        arch_include = "/usr/include/%s-linux-gnu" % os.uname().machine
        run(
            ["clang", "-O2", "-g", "-target", "bpf", "-I", arch_include, "-c"]
            + [os.path.join(BPF_DIR, "vxlan_md.c"), "-o", self.bpf_object],
            "clang vxlan_md.c",
        )

    def setup(self) -> None:
        topo = os.path.join(BUILD_DIR, "topology.yml")
        with open(topo, "w") as f:
            yaml.safe_dump(topology(), f, sort_keys=False)
        benchlib.lab_down(PREFIX, check=False)
        log("tools/lab up --prefix %s (%d hosts)" % (PREFIX, len(NODES)))
        benchlib.lab_up(PREFIX, topology=topo)
        groups = [g for g in groups_for(self.paths) if g.mode != NONE]
        mtus = {}
        for group in groups:
            info = {"mode": group.mode, "masquerade": group.masquerade, "routing": {}, "pods": {}}
            for node in group.nodes:
                if group.mode == KERNEL:
                    info["routing"][node] = kernel_routing(group, node)
                else:
                    info["routing"][node] = reconcile_routing(group, node)
                mtus[node] = info["routing"][node]["pod_mtu"]
            self.setup_info[group.name] = info
        if mtus:
            log("role cni on %s" % " ".join(sorted(mtus)))
            self.setup_info["cni_playbook_s"] = round(install_cni(mtus), 1)
        for group in groups:
            info = self.setup_info[group.name]
            for node in group.nodes:
                for pod in group.pods[node]:
                    self.pod_ips[(node, pod)] = add_pod(node, pod)
                    info["pods"]["%s/%s" % (node, pod)] = self.pod_ips[(node, pod)]
            if group.mode == "collect_md":
                info["collect_md"] = setup_collect_md(group, self.pod_ips, self.bpf_object)
            if group.mode == "tunnel":
                out = run(host_argv(group.nodes[0], "ip", "-d", "link", "show", "cm_vxlan"), "ip -d link")
                info["vxlan_device"] = " ".join(out.split())
            log(
                "setup %-13s %s; pods %s"
                % (
                    group.name,
                    " ".join("%s:%s" % (n, r["peer_modes"] or "-") for n, r in info["routing"].items()),
                    " ".join("%s=%s" % kv for kv in info["pods"].items()),
                )
            )
        for path in self.paths:
            self.check(path)
        started = set()
        for path in self.paths:
            if path.server in started:
                continue
            started.add(path.server)
            label = "%s/%s" % path.server
            iperf = ("iperf3", "-s", "-p", str(IPERF_PORT), "--forceflush")
            self.servers.start("iperf3 server " + label, self.argv(path.server, *iperf), "Server listening")
            rr = ("taskset", "-c", str(self.args.rr_cpu), self.rr_binary, "server", str(RR_PORT))
            self.servers.start("tcp_rr server " + label, self.argv(path.server, *rr), "ready")

    def check(self, path: Path) -> None:
        """The path works, and leaves the client host by the device it is meant to, before anything is
        measured (collect_md has no route at all: only the BPF program can carry it)."""
        dst = self.ip(path.server)
        proc = subprocess.run(
            self.argv(path.client, "ping", "-c", "2", "-i", "0.2", "-W", "2", dst),
            capture_output=True,
            text=True,
            timeout=30,
            check=False,
        )
        if proc.returncode != 0:
            raise RuntimeError(
                "path %s: %s/%s cannot reach %s (%s/%s):\n%s%s"
                % (path.name, *path.client, dst, *path.server, proc.stdout, proc.stderr)
            )
        argv = host_argv(path.client[0], "ip", "route", "get", dst)
        route = subprocess.run(argv, capture_output=True, text=True, timeout=30, check=False)
        text = (route.stdout or route.stderr).strip()
        device = route_device(text) if route.returncode == 0 else None
        if path.device != "*" and device != path.device:
            raise RuntimeError(
                "path %s: %s's route to %s leaves by %s, expected %s: %s"
                % (path.name, path.client[0], dst, device, path.device or "no route", text)
            )
        self.setup_info.setdefault("routes", {})[path.name] = text

    # measuring ----------------------------------------------------------------------------

    def iperf3(self, path: Path, streams: int) -> dict:
        a = self.args
        argv = self.argv(
            path.client,
            *("iperf3", "-c", self.ip(path.server), "-p", str(IPERF_PORT), "-t", str(a.time), "-O", str(a.omit)),
            *("-P", str(streams), "-J"),
        )
        for attempt in (1, 2):
            gate = self.gate.wait()
            proc = subprocess.run(argv, capture_output=True, text=True, timeout=a.time + a.omit + 30, check=False)
            try:
                return parse_iperf3(proc.stdout) | gate
            except MeasurementError as exc:
                if attempt == 2:
                    raise MeasurementError(
                        "path %s, %d streams: %s %s" % (path.name, streams, exc, proc.stderr)
                    ) from None
                log("  %s: %s; retrying once" % (path.name, exc))
                time.sleep(1)
        raise AssertionError("not reached")

    def tcp_rr(self, path: Path) -> dict:
        cpu, seconds = str(self.args.rr_cpu), str(self.args.rr_time)
        argv = self.argv(
            path.client, "taskset", "-c", cpu, self.rr_binary, "client", self.ip(path.server), str(RR_PORT), seconds
        )
        gate = self.gate.wait()
        out = run(argv + [str(RR_WARMUP)], "tcp_rr client (path %s)" % path.name, timeout=self.args.rr_time + 30)
        return parse_tcp_rr(out) | gate

    def measure(self, rounds: int) -> dict:
        names = [p.name for p in self.paths]
        samples = {sample_name(p, m): [] for p in names for m in METRICS}
        details: dict = {"iperf3": {}, "tcp_rr": {}}
        loads = []
        for r in range(rounds):
            loads.append(benchlib.load_average())
            order = path_order(self.paths, r)
            log("round %d/%d, order %s (load %s)" % (r + 1, rounds, " ".join(p.name for p in order), loads[-1]))
            for streams, metric in ((1, "gbps_1"), (4, "gbps_4")):
                for path in order:
                    res = self.iperf3(path, streams)
                    samples[sample_name(path.name, metric)].append(res["gbps"])
                    details["iperf3"].setdefault(sample_name(path.name, metric), []).append(res)
                    log(
                        "  %-14s %d stream(s) %6.2f Gbit/s  retr %-5s (busy before %s, waited %s s)"
                        % (path.name, streams, res["gbps"], res["retransmits"], res["busy_before"], res["waited_s"])
                    )
            runs = {path.name: [] for path in order}
            for _repeat in range(self.args.rr_repeats):  # interleaved: a burst of other work hits one run
                for path in order:
                    runs[path.name].append(self.tcp_rr(path))
            for path in order:
                res = combine_rr(runs[path.name])
                for metric, key in (("rr_tps", "tps"), ("rr_p50_us", "p50_us"), ("rr_p99_us", "p99_us")):
                    samples[sample_name(path.name, metric)].append(res[key])
                details["tcp_rr"].setdefault(path.name, []).append(res)
                log(
                    "  %-14s RR %6.0f/s  p50 %6.1f us  p99 %6.1f us  (p50 of the runs %s; busy before %s)"
                    % (
                        path.name,
                        res["tps"],
                        res["p50_us"],
                        res["p99_us"],
                        " ".join("%.1f" % r["p50_us"] for r in res["runs"]),
                        max(r["busy_before"] or 0 for r in res["runs"]),
                    )
                )
        conntrack = self.conntrack_counts()
        ratios = ratio_specs(names)
        return benchlib.section(
            samples,
            ratios=ratios,
            targets=target_specs(ratios),
            units={sample_name(p, m): METRICS[m] for p in names for m in METRICS},
            notes=self.notes(),
            extra={
                "paths": {
                    p.name: {"client": "%s/%s" % p.client, "server": "%s/%s" % p.server, "what": p.what}
                    for p in self.paths
                },
                "topology": topology(),
                "setup": self.setup_info,
                "parameters": {
                    "iperf3_time_s": self.args.time,
                    "iperf3_omit_s": self.args.omit,
                    "rr_time_s": self.args.rr_time,
                    "rr_repeats": self.args.rr_repeats,
                    "rr_warmup_transactions": RR_WARMUP,
                    "rr_cpu": self.args.rr_cpu,
                },
                "versions": versions(),
                "load_average_per_round": loads,
                "conntrack": conntrack,
                "quiet_gate": self.gate.summary(),
                "details": details,
            },
        )

    def conntrack_counts(self) -> dict:
        """group -> node -> {entries, pod_to_pod} of the node's /proc/net/nf_conntrack after the last
        round (TCP flows stay listed for minutes after they close: tracked pod-to-pod flows show here)."""
        counts = {}
        for group in groups_for(self.paths):
            for node in group.pods:
                text = run(host_argv(node, "cat", "/proc/net/nf_conntrack"), "nf_conntrack on %s" % node)
                counts.setdefault(group.name, {})[node] = parse_conntrack(text, MESH_POD_CIDRS)
        return counts

    def notes(self) -> list[str]:
        a = self.args
        return [
            "gbps_*: iperf3 receiver throughput (end.sum_received), %d s after %d s omitted, 1 or 4 parallel "
            "streams, client and server unpinned" % (a.time, a.omit),
            "rr_*: tcp_rr (bench/bpf/tcp_rr.c): one TCP connection, 1-byte request and response back to back "
            "for %g s after %d warm-up transactions, client and server pinned to CPU %d (on this 2-vCPU VM a "
            "cross-CPU wake-up adds ~40 us at random, which hides the datapath); p50/p99 of every transaction; "
            "each round runs it %d times per path, the paths interleaved, and takes the median of the runs"
            % (a.rr_time, RR_WARMUP, a.rr_cpu, a.rr_repeats),
            "before every sample the quiet gate waits (up to %g s per sample, %g s per run) until other work uses "
            "at most %g of all CPUs (each sample records busy_before and waited_s; extra.quiet_gate sums up)"
            % (a.gate_wait, a.gate_budget, a.max_busy),
            "ratios are numerator/denominator per round, median over rounds; for rr_p50_us a ratio above 1 "
            "means the numerator is slower",
            "routing: routing_state.reconcile in each lab host (masquerade on unless the path says otherwise, "
            "mesh pod CIDRs %s); CNI: role cni; pods: tools/lab pod add" % ", ".join(MESH_POD_CIDRS),
            "collect_md is a benchmark fixture (bench/bpf/vxlan_md.c) on nodes with the same CNI pods and the "
            "same masquerade table as tunnel (reconcile with no peers); both VXLAN paths carry an outer UDP "
            "checksum (cm_vxlan has udpcsum, see setup.tunnel.vxlan_device; the fixture sets no BPF_F_ZERO_CSUM_TX)",
            "plain_pods: the same CNI pods on nodes that reconcile never ran on, with hand-made kernel routes "
            "(ip route add <peer pod cidr> via <peer node ip>) and ip_forward=1: the reference for direct; "
            "plain_hosts: host to host on the underlay (2 veths, no forwarding hop), beside it",
            "extra.conntrack: per pod node, /proc/net/nf_conntrack entries after the last round, and how many "
            "of them are pod-to-pod flows (source and destination in the mesh pod CIDRs)",
        ]


def versions() -> dict:
    def first_line(argv):
        try:
            proc = subprocess.run(argv, capture_output=True, text=True, timeout=10, check=False)
        except OSError:
            return None
        text = (proc.stdout or proc.stderr).strip()
        return text.splitlines()[0] if text else None

    return {"iperf3": first_line(["iperf3", "--version"]), "clang": first_line(["clang", "--version"])}


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n", maxsplit=1)[0])
    parser.add_argument("--rounds", type=int, help="rounds (default %d; --quick: 1)" % benchlib.MIN_ROUNDS)
    parser.add_argument("--quick", action="store_true", help="smoke run: 1 round of 1 s samples")
    parser.add_argument("--time", type=int, help="iperf3 seconds per sample (default 5; --quick: 1)")
    parser.add_argument("--omit", type=int, help="iperf3 seconds omitted at the start (default 1; --quick: 0)")
    parser.add_argument("--rr-time", type=float, help="tcp_rr seconds per run (default 0.5; --quick: 0.25)")
    parser.add_argument(
        "--rr-repeats", type=int, help="tcp_rr runs per path and round, interleaved; median (default 4; --quick: 2)"
    )
    parser.add_argument("--rr-cpu", type=int, default=0, help="CPU of tcp_rr client and server (default 0)")
    parser.add_argument(
        "--max-busy",
        type=float,
        default=0.2,
        help="wait before each sample until other work uses at most this fraction of all CPUs (default 0.2; 1: "
        "never wait)",
    )
    parser.add_argument("--gate-wait", type=float, default=20, help="longest wait per sample, s (default 20)")
    parser.add_argument("--gate-budget", type=float, default=180, help="longest wait per run, s (default 180)")
    parser.add_argument("--only", help="comma-separated paths (default all): %s" % ",".join(PATH_NAMES))
    parser.add_argument("--output", help="result file (default: bench/results/%s.json)" % NAME)
    parser.add_argument("--keep-lab", action="store_true", help="leave the lab up at the end (debugging)")
    parser.add_argument("--prefix", default=PREFIX, help="lab prefix (default %s)" % PREFIX)
    args = parser.parse_args(argv)
    quick = args.quick
    args.rounds = args.rounds if args.rounds is not None else (1 if quick else benchlib.MIN_ROUNDS)
    args.time = args.time or (1 if quick else 5)
    args.omit = args.omit if args.omit is not None else (0 if quick else 1)
    args.rr_time = args.rr_time or (0.25 if quick else 0.5)
    args.rr_repeats = args.rr_repeats or (2 if quick else 4)
    if args.rounds < 1:
        parser.error("--rounds must be at least 1")
    args.paths = PATH_NAMES
    if args.only:
        args.paths = tuple(p.strip() for p in args.only.split(",") if p.strip())
        unknown = sorted(set(args.paths) - set(PATH_NAMES))
        if unknown:
            parser.error("--only: unknown path(s) %s; paths: %s" % (", ".join(unknown), ", ".join(PATH_NAMES)))
    args.output = args.output or (os.path.join(BUILD_DIR, "datapath-quick.json") if quick else None)
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
    names = [p.name for p in bench.paths]
    benchlib.finish(
        NAME,
        benchmarks={"datapath": section},
        rounds=args.rounds,
        started=started,
        load_start=load_start,
        report=("FAILED: %s" % section["error"]) if "error" in section else report(section, names),
        output=args.output,
        argv=argv,
    )
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
