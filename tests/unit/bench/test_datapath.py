"""The pure part of bench/datapath.py: parsing iperf3/tcp_rr/tools output, the BPF map encoding, the
lab it builds (paths really take the route they claim), ratios, targets and the report."""

from __future__ import annotations

import ipaddress
import json
import os
import struct
import sys

import pytest

REPO_ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "..")
sys.path.insert(0, os.path.join(REPO_ROOT, "bench"))
sys.path.insert(0, os.path.join(REPO_ROOT, "tools"))

import benchlib  # noqa: E402
import datapath  # noqa: E402
from labkit.topology import parse_topology  # noqa: E402

from ansible_collections.clustermesh.core.plugins.module_utils import routing_plan  # noqa: E402
from ansible_collections.clustermesh.core.plugins.module_utils.cni_plugin import parse_config  # noqa: E402


def iperf3_json(received_bps=12.5e9, sent_bps=12.6e9, retransmits=42, streams=4):
    return json.dumps(
        {
            "start": {"test_start": {"num_streams": streams, "duration": 5}},
            "intervals": [],
            "end": {
                "sum_sent": {"seconds": 5.0, "bytes": 1, "bits_per_second": sent_bps, "retransmits": retransmits},
                "sum_received": {"seconds": 5.0, "bytes": 1, "bits_per_second": received_bps},
                "cpu_utilization_percent": {"host_total": 80.5, "remote_total": 60.25},
            },
        }
    )


# iperf3 ------------------------------------------------------------------------------------------


def test_iperf3_result_is_the_receiver_throughput_in_gbit():
    res = datapath.parse_iperf3(iperf3_json())
    assert res["gbps"] == pytest.approx(12.5)
    assert res["sent_gbps"] == pytest.approx(12.6)
    assert res["retransmits"] == 42
    assert res["streams"] == 4
    assert (res["cpu_client_pct"], res["cpu_server_pct"]) == (80.5, 60.25)


def test_iperf3_error_is_reported_with_iperf3s_message():
    text = json.dumps({"start": {}, "intervals": [], "end": {}, "error": "unable to connect to server: No route"})
    with pytest.raises(datapath.MeasurementError, match="unable to connect to server: No route"):
        datapath.parse_iperf3(text)


@pytest.mark.parametrize("text", ["", "iperf3: error - the server is busy", "[1, 2]", json.dumps({"end": {}})])
def test_iperf3_without_a_result_is_an_error(text):
    with pytest.raises(datapath.MeasurementError):
        datapath.parse_iperf3(text)


# tcp_rr ------------------------------------------------------------------------------------------


def test_tcp_rr_percentiles_and_rate():
    latencies_ns = [10_000 + 1_000 * i for i in range(100)]  # 10..109 us
    text = "tcp_rr 1 100 %d\n" % sum(latencies_ns) + "\n".join(map(str, latencies_ns)) + "\n"
    res = datapath.parse_tcp_rr(text)
    assert res["transactions"] == 100
    assert res["tps"] == pytest.approx(100 / (sum(latencies_ns) / 1e9))
    assert res["p50_us"] == pytest.approx(59.5)
    assert res["p99_us"] == pytest.approx(108.01)
    assert res["min_us"] == 10.0 and res["max_us"] == 109.0
    assert res["mean_us"] == pytest.approx(59.5)


@pytest.mark.parametrize(
    "text",
    [
        "",
        "tcp_rr: connect: Connection refused\n",
        "tcp_rr 2 1 1000\n1000\n",  # unknown format version
        "tcp_rr 1 3 3000\n1000\n1000\n",  # fewer latencies than announced
        "tcp_rr 1 0 0\n",
        "tcp_rr 1 1 x\n1000\n",
    ],
)
def test_tcp_rr_without_a_complete_result_is_an_error(text):
    with pytest.raises(datapath.MeasurementError):
        datapath.parse_tcp_rr(text)


# tools output ------------------------------------------------------------------------------------


def test_pod_add_ip_is_the_last_line():
    out = "pod pa: netns /run/netns/cm-pod-pa, container 0123abcd, eth0 10.1.1.2\n10.1.1.2\n"
    assert datapath.parse_pod_add(out) == "10.1.1.2"
    with pytest.raises(datapath.MeasurementError):
        datapath.parse_pod_add("pod pa: netns ..., eth0 None\n\n")


@pytest.mark.parametrize(
    ("text", "device"),
    [
        ("10.1.2.2 via 198.18.1.12 dev eth0 src 198.18.1.11 uid 0 \n    cache", "eth0"),
        ("10.1.6.2 via 10.1.6.1 dev cm_vxlan src 10.1.5.1 uid 0 \n    cache", "cm_vxlan"),
        ("RTNETLINK answers: Network is unreachable", None),
    ],
)
def test_route_device(text, device):
    assert datapath.route_device(text) == device


def test_rr_sample_is_the_median_of_its_runs():
    runs = [
        {"tps": 40000.0, "p50_us": 20.4, "p99_us": 30.0, "busy_before": 0.0},
        {"tps": 30000.0, "p50_us": 26.9, "p99_us": 70.0, "busy_before": 0.1},  # a burst of other work
        {"tps": 41000.0, "p50_us": 20.3, "p99_us": 31.0, "busy_before": 0.0},
    ]
    res = datapath.combine_rr(runs)
    assert (res["tps"], res["p50_us"], res["p99_us"]) == (40000.0, 20.4, 31.0)
    assert res["runs"] == runs


# quiet gate ------------------------------------------------------------------------------------


PROC_STAT = """cpu  100 5 50 800 20 3 7 15 0 0
cpu0 50 2 25 400 10 1 3 8 0 0
intr 12345
"""


def test_proc_stat_busy_excludes_idle_and_iowait():
    assert datapath.parse_proc_stat(PROC_STAT) == (180, 1000)
    with pytest.raises(ValueError):
        datapath.parse_proc_stat("intr 1\n")


def test_cpu_busy_is_the_busy_share_between_two_readings():
    assert datapath.cpu_busy((180, 1000), (230, 1200)) == pytest.approx(0.25)
    assert datapath.cpu_busy((180, 1000), (180, 1000)) is None


def gate_with(readings, **kwargs):
    gate = datapath.QuietGate(**({"max_busy": 0.2, "wait_s": 5, "budget_s": 10, "interval": 0} | kwargs))
    values = iter(readings)
    gate.busy_now = lambda: next(values)
    return gate


def test_gate_waits_until_the_machine_is_quiet():
    gate = gate_with([0.9, 0.5, 0.1, 0.9])
    assert gate.wait()["busy_before"] == 0.1
    assert gate.summary()["samples_over_limit"] == 0


def test_gate_gives_up_after_its_wait_and_counts_the_sample():
    gate = gate_with([0.9, 0.8], wait_s=0)
    assert gate.wait()["busy_before"] == 0.9
    assert gate.wait()["busy_before"] == 0.8
    assert gate.summary()["samples_over_limit"] == 2


def test_gate_stops_waiting_once_the_run_budget_is_spent():
    gate = gate_with([0.9, 0.9], budget_s=0)
    assert gate.wait()["busy_before"] == 0.9 and gate.over_limit == 1


# BPF map encoding (struct md_key / struct md_dest of bench/bpf/vxlan_md.c) ------------------------


def test_md_key_is_prefixlen_little_endian_then_network_order_address():
    assert datapath.md_key_hex("10.1.8.0/24") == ["18", "00", "00", "00", "0a", "01", "08", "00"]


def test_md_value_holds_the_remote_ip_in_host_order_vni_ifindex_and_mac():
    raw = bytes(int(b, 16) for b in datapath.md_value_hex("198.18.1.18", 2, 7, "0e:cc:00:00:00:01"))
    assert len(raw) == 20  # sizeof(struct md_dest)
    remote, vni, ifindex = struct.unpack("<III", raw[:12])
    assert ipaddress.IPv4Address(remote) == ipaddress.IPv4Address("198.18.1.18")
    assert (vni, ifindex) == (2, 7)
    assert raw[12:18] == bytes.fromhex("0ecc00000001") and raw[18:] == b"\0\0"


# the lab -----------------------------------------------------------------------------------------


def test_topology_is_a_valid_lab_topology():
    topo = parse_topology(datapath.topology())
    assert {h.name for h in topo.hosts} == set(datapath.NODES)


def test_node_pod_cidrs_lie_in_their_clusters_and_do_not_overlap():
    nodes = [n for n in datapath.NODES.values() if n.pod_cidr]
    nets = [ipaddress.ip_network(n.pod_cidr) for n in nodes]
    assert len(nets) == len(set(nets))
    for n in nodes:
        cluster = ipaddress.ip_network(datapath.CLUSTERS[n.cluster]["pod_cidr"])
        assert ipaddress.ip_network(n.pod_cidr).subnet_of(cluster)


def test_every_path_uses_hosts_and_pods_of_one_group():
    pods = {(node, pod) for g in datapath.GROUPS for node, names in g.pods.items() for pod in names}
    for path in datapath.PATHS:
        for host, pod in (path.client, path.server):
            assert host in datapath.NODES
            assert pod is None or (host, pod) in pods, path.name
        groups = [g for g in datapath.GROUPS if path.client[0] in g.nodes]
        assert len(groups) == 1 and path.server[0] in groups[0].nodes, path.name


def group_of(path):
    return next(g for g in datapath.GROUPS if path.client[0] in g.nodes)


@pytest.mark.parametrize(
    "path",
    [p for p in datapath.PATHS if p.client[1] and p.client[0] != p.server[0] and group_of(p).mode != datapath.KERNEL],
)
def test_the_planner_routes_each_pod_path_as_the_path_claims(path):
    """direct/hybrid_onlink go out on the underlay, tunnel/hybrid_routed through cm_vxlan, and the
    collect-md fixture gets no route of ours at all (its nodes run reconcile without peers)."""
    group = group_of(path)
    peers = datapath.peers_of(group, path.client[0])
    plan = routing_plan.plan_routing(datapath.node_input(path.client[0]), peers, group.routing_mode, 24)
    server_cidr = datapath.NODES[path.server[0]].pod_cidr
    routes = [r for r in plan.routes if r.dst == server_cidr]
    if path.device is None:
        assert group.mode == "collect_md" and plan.routes == [] and plan.vxlan is None
    elif path.device == "eth0":
        assert plan.peer_modes[path.server[0]] == "direct"
        assert [r.via for r in routes] == [datapath.NODES[path.server[0]].ip] and routes[0].dev is None
    else:
        assert path.device == routing_plan.VXLAN_DEVICE
        assert plan.peer_modes[path.server[0]] == "tunnel"
        assert [r.dev for r in routes] == [routing_plan.VXLAN_DEVICE]


def test_hybrid_has_an_on_link_and_a_routed_cross_cluster_peer():
    h1, h2, h3 = (datapath.NODES[n] for n in ("h1", "h2", "h3"))
    assert h1.cluster != h2.cluster and h1.cluster != h3.cluster
    assert h1.segment == h2.segment != h3.segment


def test_only_the_nomasq_group_turns_masquerade_off():
    routed = [g for g in datapath.GROUPS if g.mode not in (datapath.NONE, datapath.KERNEL)]
    assert {g.name for g in routed if not g.masquerade} == {"direct_nomasq"}


def test_plain_pods_get_hand_made_kernel_routes_to_each_other_and_nothing_of_ours():
    plain = next(g for g in datapath.GROUPS if g.name == "plain_pods")
    path = next(p for p in datapath.PATHS if p.name == "plain_pods")
    assert plain.mode == datapath.KERNEL and not plain.masquerade and datapath.peers_of(plain, "k1") == []
    assert (path.client, path.server, path.device) == (("k1", "pa"), ("k2", "pa"), "eth0")
    k1, k2 = (datapath.NODES[n] for n in plain.nodes)
    assert k1.segment == k2.segment  # on-link, as direct's nodes
    assert datapath.kernel_routes(plain, "k1") == [("10.1.11.0/24", "198.18.1.24")]
    script = datapath.kernel_routing_script(plain, "k2")
    # plain routes: no protocol tag, no device, no table of ours
    assert script.splitlines() == ["sysctl -qw net.ipv4.ip_forward=1", "ip route add 10.1.10.0/24 via 198.18.1.23"]
    direct = next(g for g in datapath.GROUPS if g.name == "direct")
    assert [len(plain.pods[n]) for n in plain.nodes] == [1, 1] and direct.mode == "direct"


def test_conntrack_counts_pod_to_pod_flows_by_their_original_direction():
    text = (
        "ipv4     2 tcp      6 117 TIME_WAIT src=10.1.1.2 dst=10.1.2.2 sport=39426 dport=5201 src=10.1.2.2 "
        "dst=10.1.1.2 sport=5201 dport=39426 [ASSURED] mark=0 zone=0 use=2\n"
        "ipv4     2 tcp      6 10 CLOSE src=10.1.1.2 dst=198.19.255.1 sport=1 dport=80 src=198.19.255.1 "
        "dst=198.18.1.11 sport=80 dport=1 mark=0 zone=0 use=2\n"
        "ipv4     2 icmp     1 29 src=198.18.1.11 dst=10.2.1.2 type=8 code=0 id=7 src=10.2.1.2 dst=198.18.1.11 "
        "type=0 code=0 id=7 mark=0 zone=0 use=2\n"
    )
    assert datapath.parse_conntrack(text, datapath.MESH_POD_CIDRS) == {"entries": 3, "pod_to_pod": 1}
    assert datapath.parse_conntrack("", datapath.MESH_POD_CIDRS) == {"entries": 0, "pod_to_pod": 0}


def test_plain_hosts_are_left_alone_and_have_no_pods():
    plain = next(g for g in datapath.GROUPS if g.name == "plain_hosts")
    assert plain.mode == "none" and plain.pods == {}
    for path in (p for p in datapath.PATHS if p.name in ("plain_hosts", "plain_routed")):
        assert path.client[1] is None and path.server[1] is None
        assert {path.client[0], path.server[0]} <= set(plain.nodes)
    p1, p2, p3 = (datapath.NODES[n] for n in plain.nodes)
    assert p1.segment == p2.segment != p3.segment


def test_cni_vars_give_every_node_its_pod_cidr_and_mtu_as_the_plugin_accepts_them():
    mtus = {"t1": 1450, "d1": 1500}
    extra = datapath.cni_vars(mtus)
    assert extra["bench_cni_nodes"] == "d1,t1"
    assert extra["bench_cni"] == {
        "d1": {"pod_cidr": "10.1.1.0/24", "mtu": 1500},
        "t1": {"pod_cidr": "10.1.5.0/24", "mtu": 1450},
    }
    for node, conf in extra["bench_cni"].items():
        plugin = {"cniVersion": "1.0.0", "name": "clustermesh", "type": "clustermesh-cni", "podCIDR": conf["pod_cidr"]}
        parse_config(dict(plugin, mtu=conf["mtu"]), "ADD")  # raises CniError on a bad configuration
        assert conf["mtu"] == mtus[node]


def test_groups_for_selects_only_the_groups_of_the_paths():
    paths = [p for p in datapath.PATHS if p.name in ("plain_hosts", "hybrid_routed", "plain_pods")]
    assert [g.name for g in datapath.groups_for(paths)] == ["hybrid", "plain_pods", "plain_hosts"]


# ratios, targets, order, report ------------------------------------------------------------------


def test_ratios_only_for_measured_pairs_and_targets_only_for_measured_ratios():
    ratios = datapath.ratio_specs(["plain_pods", "plain_hosts", "direct", "same_node"])
    assert ratios["direct_over_plain_pods.gbps_1"] == ("direct.gbps_1", "plain_pods.gbps_1")
    assert ratios["direct_over_plain_hosts.gbps_4"] == ("direct.gbps_4", "plain_hosts.gbps_4")
    assert "direct_over_same_node.rr_p50_us" in ratios
    assert not any(name.startswith("tunnel_over_direct") for name in ratios)
    targets = datapath.target_specs(ratios)
    # direct's target is against the pod-to-pod reference, not host to host
    assert set(targets) == {"direct >= 0.97 x plain_pods, 1 stream", "direct >= 0.97 x plain_pods, 4 streams"}
    assert datapath.target_specs(datapath.ratio_specs(["plain_hosts", "direct"])) == {}


def test_every_target_refers_to_a_ratio_of_the_full_run():
    ratios = datapath.ratio_specs(datapath.PATH_NAMES)
    assert datapath.target_specs(ratios) == datapath.TARGETS
    assert all(metric.partition(".")[2] in ratios and op == ">=" for metric, op, _l in datapath.TARGETS.values())


def test_path_order_alternates():
    assert datapath.path_order("abc", 0) == ["a", "b", "c"]
    assert datapath.path_order("abc", 1) == ["c", "b", "a"]
    assert datapath.path_order("abc", 2) == ["a", "b", "c"]


def test_report_shows_medians_spread_ratios_and_unmet_targets():
    names = ["plain_pods", "direct", "tunnel"]
    samples = {datapath.sample_name(p, m): [] for p in names for m in datapath.METRICS}
    for gbps in (10.0, 12.0, 11.0):
        for p, factor in (("plain_pods", 1.0), ("direct", 0.9), ("tunnel", 0.8)):
            samples[datapath.sample_name(p, "gbps_1")].append(gbps * factor)
            samples[datapath.sample_name(p, "gbps_4")].append(2 * gbps * factor)
            samples[datapath.sample_name(p, "rr_tps")].append(40000 * factor)
            samples[datapath.sample_name(p, "rr_p50_us")].append(20 / factor)
            samples[datapath.sample_name(p, "rr_p99_us")].append(60 / factor)
    ratios = datapath.ratio_specs(names)
    section = benchlib.section(samples, ratios=ratios, targets=datapath.target_specs(ratios))
    assert section["ratios"]["direct_over_plain_pods.gbps_1"]["median"] == pytest.approx(0.9)
    assert section["targets"]["direct >= 0.97 x plain_pods, 1 stream"]["met"] is False
    assert section["targets"]["tunnel >= 0.85 x direct, 4 streams"]["met"] is True
    text = datapath.report(section, names)
    assert "11.00 [10.00-12.00]" in text  # plain_pods, 1 stream: median [min-max]
    assert "NOT MET" in text and "met" in text
    line = next(row for row in text.splitlines() if row.startswith("direct_over_plain_pods"))
    assert line.split()[1:] == ["0.900", "0.900", "0.900", "1.111"]


def test_report_of_a_path_without_samples_shows_dashes():
    section = benchlib.section({"plain_hosts.gbps_1": [None]})
    assert datapath.report(section, ["plain_hosts"]).splitlines()[2].split()[1:] == ["-"] * 5


def test_quick_defaults_and_unknown_paths(capsys):
    args = datapath.parse_args(["--quick"])
    assert (args.rounds, args.time, args.omit, args.rr_time, args.rr_repeats) == (1, 1, 0, 0.25, 2)
    assert args.output.endswith("datapath-quick.json")
    args = datapath.parse_args([])
    assert (args.rounds, args.time, args.omit, args.output) == (benchlib.MIN_ROUNDS, 5, 1, None)
    assert args.paths == datapath.PATH_NAMES
    with pytest.raises(SystemExit):
        datapath.parse_args(["--only", "plain_pods,warp"])
    assert "unknown path(s) warp" in capsys.readouterr().err
