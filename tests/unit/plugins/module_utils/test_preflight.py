# -*- coding: utf-8 -*-
# Copyright: clustermesh.core contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""The pure parts of the preflight: what each mode needs, parsing, packet encoding, the table."""

from __future__ import annotations

import ipaddress
import os
import socket
import struct

import pytest

from ansible_collections.clustermesh.core.plugins.module_utils import preflight as P

NODE = {"name": "c1-n1", "ip": "198.18.1.11", "pod_cidrs": ["10.1.0.0/24"]}
PEERS = [
    {"name": "c1-n2", "cluster": "cluster1", "ip": "198.18.1.12", "pod_cidrs": ["10.1.1.0/24"]},
    {"name": "c2-n1", "cluster": "cluster2", "ip": "198.18.1.13", "pod_cidrs": ["10.2.0.0/24"]},
    {"name": "c2-n2", "cluster": "cluster2", "ip": "198.18.2.11", "pod_cidrs": ["10.2.1.0/24"]},
]
UNDERLAY = {
    "ipv4": [
        {
            "address": "198.18.1.11",
            "prefixlen": 24,
            "cidr": "198.18.1.11/24",
            "interface": "eth0",
            "mtu": 1500,
            "up": True,
        }
    ],
    "ipv6": [],
}


def by_target(rows):
    return {r.target: r for r in rows}


# --- features ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "mode, masquerade, needed",
    [
        ("tunnel", True, ["vxlan", "nftables_nat", "veth"]),
        ("hybrid", False, ["vxlan", "veth"]),
        ("direct", True, ["nftables_nat", "veth"]),
        ("direct", False, ["veth"]),
    ],
)
def test_required_features_per_mode(mode, masquerade, needed):
    assert [name for name, _why in P.required_features(mode, masquerade)] == needed


def test_normalize_features_accepts_the_fact_its_probes_or_the_flat_summary():
    probes = {"vxlan": {"available": False, "detail": "the kernel has no vxlan link type"}}
    assert P.normalize_features({"probes": probes, "features": {"vxlan": False}}) == probes
    assert P.normalize_features(probes) == probes
    flat = P.normalize_features({"vxlan": True, "nftables_nat": False})
    assert flat["vxlan"]["available"] is True
    assert flat["nftables_nat"] == {"available": False, "detail": "reported unavailable by node_facts"}
    assert P.normalize_features(None) == {}


def test_missing_feature_names_the_feature_and_node_facts_reason():
    features = {
        "vxlan": {
            "available": False,
            "detail": "the kernel has no vxlan link type: creating one failed with EOPNOTSUPP",
        },
        "nftables_nat": {"available": True, "detail": "nat chain added"},
        "veth": {"available": True, "detail": "veth pair created"},
    }
    rows = by_target(P.check_features("hybrid", True, features, {"available": True, "detail": "ok"}))
    assert rows["vxlan"].ok is False
    assert "the kernel has no vxlan link type" in rows["vxlan"].detail
    assert "hybrid" in rows["vxlan"].detail
    assert "modprobe vxlan" in rows["vxlan"].fix
    assert rows["nftables_nat"].ok and rows["veth"].ok and rows["pyroute2"].ok


def test_missing_pyroute2_and_unprobed_feature_fail():
    rows = by_target(
        P.check_features("direct", False, {}, {"available": False, "detail": "pyroute2 is not importable"})
    )
    assert not rows["veth"].ok and "not probed" in rows["veth"].detail
    assert not rows["pyroute2"].ok and "requirements/node.txt" in rows["pyroute2"].fix


def test_probe_groups_for_feature_names():
    assert P.probe_groups_for(["vxlan", "nftables_nat", "veth"]) == ["vxlan", "nftables"]
    assert P.probe_groups_for(["veth"]) == []


# --- underlay ----------------------------------------------------------------------------------


def test_underlay_names_interface_and_mtu():
    rows = P.check_underlay(NODE, "tunnel", UNDERLAY)
    assert [r.ok for r in rows] == [True, True]
    assert "eth0" in rows[0].detail and "MTU 1500" in rows[0].detail
    assert "pod MTU 1450" in rows[1].detail
    assert "pod MTU 1500" in P.check_underlay(NODE, "direct", UNDERLAY)[1].detail


def test_underlay_node_ip_elsewhere_or_down_or_mtu_too_small():
    rows = P.check_underlay({**NODE, "ip": "198.18.1.99"}, "tunnel", UNDERLAY)
    assert len(rows) == 1 and not rows[0].ok
    assert "198.18.1.11/24 on eth0" in rows[0].detail and "clustermesh_node_ip" in rows[0].fix

    down = {"ipv4": [{**UNDERLAY["ipv4"][0], "up": False, "mtu": 1300}], "ipv6": []}
    rows = P.check_underlay(NODE, "tunnel", down)
    assert not rows[0].ok and "down" in rows[0].detail and rows[0].fix == "ip link set eth0 up"
    assert not rows[1].ok and "pod MTU 1250" in rows[1].detail and "at least 1330" in rows[1].fix
    assert P.check_underlay(NODE, "direct", down)[1].ok  # 1300 without VXLAN overhead is fine


# --- input -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "text, expected",
    [
        ("198.18.1.11:2379", ("198.18.1.11", 2379)),
        ("https://198.18.1.11:32379", ("198.18.1.11", 32379)),
        ("[fd00::1]:2379", ("fd00::1", 2379)),
        ("etcd.example:2379", ("etcd.example", 2379)),
    ],
)
def test_parse_endpoint(text, expected):
    assert P.parse_endpoint(text) == expected


@pytest.mark.parametrize("text", ["198.18.1.11", "198.18.1.11:", "198.18.1.11:99999", ":2379", "198.18.1.11:0"])
def test_parse_endpoint_rejects(text):
    with pytest.raises(ValueError, match="host:port"):
        P.parse_endpoint(text)


def test_validate_inputs_lists_every_problem():
    bad_peer = {**PEERS[0], "ip": "not-an-ip"}
    with pytest.raises(P.PreflightError) as err:
        P.validate_inputs(NODE, [bad_peer], "vxlan", ["198.18.1.11"], timeout=0)
    text = str(err.value)
    assert "mode: 'vxlan' is not one of tunnel, direct, hybrid" in text
    assert "peers[0] (c1-n2).ip: 'not-an-ip'" in text
    assert "kvstore_endpoints[0]" in text
    assert "timeout" in text
    with pytest.raises(P.PreflightError, match="checks: unknown pmtu"):
        P.select_checks(["pmtu"])
    assert P.select_checks(None) == list(P.CHECKS)
    assert P.select_checks(["duplicate", "features"]) == ["features", "duplicate"]


# --- ICMP ------------------------------------------------------------------------------------


def test_inet_checksum_of_a_valid_packet_is_zero():
    packet = P.echo_request(0x1234, 7, 84)
    assert len(packet) == 84 - 20
    assert P.inet_checksum(packet) == 0
    kind, code, _csum, ident, seq = struct.unpack("!BBHHH", packet[:8])
    assert (kind, code, ident, seq) == (8, 0, 0x1234, 7)
    assert len(P.echo_request(1, 1, 1500)) == 1480


def ipv4(src, dst, payload):
    header = struct.pack(
        "!BBHHHBBH4s4s", 0x45, 0, 20 + len(payload), 0, 0, 64, 1, 0, socket.inet_aton(src), socket.inet_aton(dst)
    )
    return header + payload


def test_parse_icmp_echo_reply():
    request = P.echo_request(42, 9, 1500)
    reply = bytes([0, 0]) + request[2:]
    message = P.parse_icmp(ipv4("198.18.1.12", "198.18.1.11", reply))
    assert message == P.IcmpMessage("reply", "198.18.1.12", 42, 9, size=1500)


def test_parse_icmp_fragmentation_needed_names_router_and_mtu():
    original = ipv4("198.18.1.11", "198.18.2.11", P.echo_request(42, 10, 1500))[:28]
    error = struct.pack("!BBHHH", 3, 4, 0, 0, 1400) + original
    message = P.parse_icmp(ipv4("198.18.1.1", "198.18.1.11", error))
    assert (message.kind, message.src, message.dst, message.ident, message.seq, message.mtu) == (
        "unreachable",
        "198.18.1.1",
        "198.18.2.11",
        42,
        10,
        1400,
    )
    assert P.describe_icmp_error(message) == "router 198.18.1.1 needs fragmentation: its next hop has MTU 1400"


def test_parse_icmp_ignores_other_messages():
    assert P.parse_icmp(b"\x60" + b"\0" * 40) is None  # IPv6
    assert P.parse_icmp(ipv4("1.2.3.4", "1.2.3.5", P.echo_request(1, 1, 84))) is None  # a request, not ours
    udp_inside = ipv4("198.18.1.11", "198.18.2.11", b"\0" * 8)
    assert P.parse_icmp(ipv4("198.18.1.1", "198.18.1.11", struct.pack("!BBHI", 3, 1, 0, 0) + udp_inside)) is None


def test_mtu_sizes():
    assert P.mtu_sizes(1500)[0] == 1500 and 1400 in P.mtu_sizes(1500) and max(P.mtu_sizes(1500)[1:]) < 1500
    assert P.mtu_sizes(9000)[:3] == [9000, 8192, 4096]


def test_reachability_and_path_mtu_rows():
    echoes = {
        "c1-n2": (P.Echo(rtt=0.3), {1500: P.Echo(), 1400: P.Echo(rtt=0.2), 1280: P.Echo(rtt=0.2)}),
        "c2-n1": (P.Echo(rtt=0.2), {1500: P.Echo(rtt=0.2)}),
        "c2-n2": (P.Echo(), None),
    }
    reach = by_target(P.check_reachability(NODE, PEERS, echoes, 1.0))
    assert reach["c1-n2 (198.18.1.12)"].ok and reach["c2-n1 (198.18.1.13)"].ok
    lost = reach["c2-n2 (198.18.2.11)"]
    assert not lost.ok and lost.detail == "no ICMP echo reply within 1s" and "c2-n2" in lost.fix

    mtu = by_target(P.check_path_mtu(NODE, PEERS, echoes, 1500, 1.0))
    bad = mtu["c1-n2 (198.18.1.12)"]
    assert not bad.ok
    assert "1500-byte" in bad.detail and "largest that passed was 1400 bytes" in bad.detail
    assert "lower this node's underlay MTU to 1400" in bad.fix
    assert mtu["c2-n1 (198.18.1.13)"].ok
    assert mtu["c2-n2 (198.18.2.11)"].skipped and mtu["c2-n2 (198.18.2.11)"].ok


def test_path_mtu_names_the_router():
    frag = P.Echo(
        error="router 198.18.1.1 needs fragmentation: its next hop has MTU 1400", mtu=1400, router="198.18.1.1"
    )
    echoes = {"c2-n2": (P.Echo(rtt=0.2), {1500: frag, 1400: P.Echo(rtt=0.2)})}
    (row,) = P.check_path_mtu(NODE, [PEERS[2]], echoes, 1500, 1.0)
    assert not row.ok and "router 198.18.1.1 has a next hop with MTU 1400" in row.detail


# --- on-link -----------------------------------------------------------------------------------


def test_onlink_rows_per_mode():
    rows = by_target(P.check_onlink(NODE, PEERS, "hybrid", 24))
    assert rows["c1-n2 (198.18.1.12)"].detail == "on-link (198.18.1.0/24): direct route"
    assert rows["c2-n2 (198.18.2.11)"].detail == "routed (off 198.18.1.0/24): VXLAN tunnel"
    assert all(r.ok for r in rows.values())
    tunnel = by_target(P.check_onlink(NODE, PEERS, "tunnel", 24))
    assert tunnel["c1-n2 (198.18.1.12)"].detail == "on-link (198.18.1.0/24): VXLAN tunnel"
    external = by_target(P.check_onlink(NODE, PEERS, "direct", 24, external_router=True))
    assert external["c2-n2 (198.18.2.11)"].ok and "external router" in external["c2-n2 (198.18.2.11)"].detail


def test_onlink_direct_off_link_peer_fails_with_the_planners_message():
    rows = by_target(P.check_onlink(NODE, PEERS, "direct", 24))
    assert rows["c1-n2 (198.18.1.12)"].ok and rows["c2-n1 (198.18.1.13)"].ok
    bad = rows["c2-n2 (198.18.2.11)"]
    assert not bad.ok
    assert bad.detail.startswith("not on this node's segment 198.18.1.0/24, so direct routing cannot reach it")
    assert "routing_external_router: true" in bad.detail


def test_onlink_reports_whole_list_problems_and_leaves_own_ip_to_duplicate():
    twice = PEERS + [dict(PEERS[0])]
    rows = P.check_onlink(NODE, twice, "tunnel", 24)
    assert [(r.target, r.detail) for r in rows if not r.ok] == [("c1-n2 (198.18.1.12)", "listed twice")]
    own = P.check_onlink(NODE, [{**PEERS[0], "ip": NODE["ip"]}], "tunnel", 24)
    assert [r.result for r in own] == ["skip"]


# --- ports -------------------------------------------------------------------------------------

PROC_NET_UDP = """\
   sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode ref pointer drops
11104: 00000000:2118 00000000:0000 07 00000000:00000000 00:00000000 00000000     0        0 11758 2 00000000dc8dd544 0
11200: 0B0112C6:0035 00000000:0000 07 00000000:00000000 00:00000000 00000000   100        0 4242 2 0000000000000000 0
"""
UDP6_TAIL = " 07 00000000:00000000 00:00000000 00000000 0 0 %d 2 0000000000000000 0"
PROC_NET_UDP6 = "\n".join(
    [
        "  sl local_address remote_address st tx_queue rx_queue tr tm->when retrnsmt uid timeout inode ref",
        " 1104: " + "0" * 32 + ":2118 " + "0" * 32 + ":0000" + UDP6_TAIL % 0,
        " 1105: 0000000000000000FFFF00000B0112C6:1F90 " + "0" * 32 + ":0000" + UDP6_TAIL % 77,
    ]
)


@pytest.mark.skipif(struct.pack("=I", 1)[0] != 1, reason="the /proc sample is from a little-endian host")
def test_parse_proc_net_udp():
    assert P.parse_proc_net_udp(PROC_NET_UDP) == [
        {"address": "0.0.0.0", "port": 8472, "uid": 0, "inode": 11758},
        {"address": "198.18.1.11", "port": 53, "uid": 100, "inode": 4242},
    ]
    v6 = P.parse_proc_net_udp(PROC_NET_UDP6, ipv6=True)
    assert v6[0] == {"address": "::", "port": 8472, "uid": 0, "inode": 0}
    assert ipaddress.IPv6Address(v6[1]["address"]).ipv4_mapped == ipaddress.IPv4Address("198.18.1.11")
    assert v6[1]["port"] == 8080


def test_vxlan_port_free_ours_or_held():
    kernel = [{"address": "0.0.0.0", "port": 8472, "uid": 0, "inode": 0}]
    ours = [{"name": "cm_vxlan", "port": 8472, "up": True}]
    assert [r.detail for r in P.check_vxlan_port([], {}, [])] == ["free"]
    # a kernel socket (inode 0 on some kernels, an inode no process holds on others) of our own device
    assert P.check_vxlan_port(kernel, {}, ours)[0].detail == "held by our own cm_vxlan device"
    kernel_with_inode = [{"address": "0.0.0.0", "port": 8472, "uid": 0, "inode": 11758}]
    assert P.check_vxlan_port(kernel_with_inode, {}, ours)[0].ok

    held = [{"address": "0.0.0.0", "port": 8472, "uid": 0, "inode": 4711}]
    (row,) = P.check_vxlan_port(held, {4711: [(1234, "socat")]}, [])
    assert not row.ok and "process 1234 (socat)" in row.detail and "stop process 1234" in row.fix

    (row,) = P.check_vxlan_port(kernel, {}, [{"name": "flannel.1", "port": 8472, "up": False}])
    assert not row.ok and "flannel.1" in row.detail and "ip link del flannel.1" in row.fix
    (row,) = P.check_vxlan_port(kernel, {}, [])
    assert not row.ok and "kernel socket" in row.detail
    other_port = [{"name": "vx0", "port": 4789, "up": True}]
    assert P.check_vxlan_port([], {}, other_port)[0].ok


def test_socket_owners_finds_our_own_socket():
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        inode = os.fstat(sock.fileno()).st_ino
        owners = P.socket_owners([inode, 0])
    finally:
        sock.close()
    assert (os.getpid(), open("/proc/self/comm").read().strip()) in owners[inode]


def test_kvstore_rows_and_closed_port():
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen()
    open_port = listener.getsockname()[1]
    closed = socket.socket()
    closed.bind(("127.0.0.1", 0))
    closed_port = closed.getsockname()[1]
    closed.close()
    try:
        results = {ep: P.tcp_connect(ep, 1.0) for ep in ("127.0.0.1:%d" % open_port, "127.0.0.1:%d" % closed_port)}
    finally:
        listener.close()
    rows = P.check_kvstore(results)
    assert rows[0].ok and rows[0].target == "tcp 127.0.0.1:%d" % open_port
    assert not rows[1].ok and "connection refused" in rows[1].detail
    assert "127.0.0.1:%d" % closed_port in rows[1].fix


# --- duplicate IPs -----------------------------------------------------------------------------


def test_arp_probe_frame_is_rfc5227():
    frame = P.arp_probe_frame("02:00:c6:12:01:0b", "198.18.1.11")
    assert len(frame) == 60
    assert frame[:6] == b"\xff" * 6 and frame[6:12] == bytes.fromhex("0200c612010b")
    assert frame[12:14] == b"\x08\x06"
    message = P.parse_arp_frame(frame)
    assert message == {
        "op": 1,
        "sha": "02:00:c6:12:01:0b",
        "spa": "0.0.0.0",
        "tha": "00:00:00:00:00:00",
        "tpa": "198.18.1.11",
    }


def arp_reply(sha, spa, tha, tpa):
    arp = P.ARP_FORMAT.pack(
        1, 0x0800, 6, 4, 2, P.mac_bytes(sha), socket.inet_aton(spa), P.mac_bytes(tha), socket.inet_aton(tpa)
    )
    return P.mac_bytes(tha) + P.mac_bytes(sha) + b"\x08\x06" + arp


def test_arp_conflict_from_another_mac():
    own = "02:00:c6:12:01:0b"
    reply = P.parse_arp_frame(arp_reply("02:00:c6:12:01:0c", "198.18.1.11", own, "0.0.0.0"))
    assert reply["op"] == 2 and reply["spa"] == "198.18.1.11"
    unrelated = P.parse_arp_frame(arp_reply("02:00:c6:12:01:0d", "198.18.1.13", own, "198.18.1.11"))
    echo_of_own = P.parse_arp_frame(P.arp_probe_frame(own, "198.18.1.11"))
    assert P.arp_conflicts([reply, unrelated, echo_of_own], own, "198.18.1.11") == ["02:00:c6:12:01:0c"]
    assert P.arp_conflicts([unrelated, echo_of_own], own.upper(), "198.18.1.11") == []
    assert P.parse_arp_frame(b"\0" * 12 + b"\x08\x00" + b"\0" * 40) is None

    (row,) = P.check_duplicate_wire(NODE, "eth0", own, [reply])
    assert not row.ok and "MAC 02:00:c6:12:01:0c" in row.detail and row.target == "198.18.1.11 on eth0"
    assert P.check_duplicate_wire(NODE, "eth0", own, [unrelated])[0].ok
    assert P.check_duplicate_wire(NODE, "tun0", None, [])[0].skipped


def test_duplicate_peers():
    rows = P.check_duplicate_peers(NODE, [{**PEERS[0], "ip": NODE["ip"]}, PEERS[1], {**PEERS[2], "ip": PEERS[1]["ip"]}])
    assert len(rows) == 2
    assert "peer c1-n2 is listed with this node's own IP 198.18.1.11" in rows[0].detail
    assert rows[1].target == "198.18.1.13" and "c2-n1, c2-n2" in rows[1].detail
    assert P.check_duplicate_peers(NODE, PEERS) == []


# --- table and message -------------------------------------------------------------------------


def test_table_and_failure_message():
    rows = [
        P.passed("underlay", "198.18.1.11", "198.18.1.11/24 on eth0, MTU 1500, up"),
        P.failed("reachability", "c2-n2 (198.18.2.99)", "no ICMP echo reply within 1s", "check c2-n2"),
        P.skipped("path_mtu", "c2-n2 (198.18.2.99)", "not probed"),
    ]
    assert P.format_table(rows) == [
        "CHECK        | TARGET              | RESULT | DETAIL",
        "underlay     | 198.18.1.11         | ok     | 198.18.1.11/24 on eth0, MTU 1500, up",
        "reachability | c2-n2 (198.18.2.99) | FAIL   | no ICMP echo reply within 1s",
        "path_mtu     | c2-n2 (198.18.2.99) | skip   | not probed",
    ]
    assert P.failure_message("c1-n1", rows) == (
        "c1-n1: reachability c2-n2 (198.18.2.99): no ICMP echo reply within 1s; fix: check c2-n2"
    )
    assert P.failure_message("c1-n1", rows[:1]) == ""
    assert rows[1].to_dict() == {
        "name": "reachability",
        "target": "c2-n2 (198.18.2.99)",
        "ok": False,
        "detail": "no ICMP echo reply within 1s",
        "fix": "check c2-n2",
        "skipped": False,
        "result": "FAIL",
    }
