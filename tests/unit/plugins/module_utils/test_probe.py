"""Connectivity probes: ICMP encoding, the echo server's reply, NAT detection and the matrix."""

from __future__ import annotations

import socket
import struct
import threading

from ansible_collections.clustermesh.core.plugins.module_utils import probe


def test_echo_request_checksum_verifies():
    packet = probe.icmp_echo_request(0x1234, 7)
    assert probe._checksum(packet) == 0
    assert struct.unpack("!BBHHH", packet[:8])[3:] == (0x1234, 7)


def _ip_packet(src, icmp):
    header = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(icmp), 0, 0, 64, 1, 0, socket.inet_aton(src), b"\0" * 4)
    return header + icmp


def test_parse_echo_reply_only_accepts_replies():
    reply = struct.pack("!BBHHH", probe.ICMP_ECHO_REPLY, 0, 0, 9, 3) + b"x" * 8
    assert probe.parse_echo_reply(_ip_packet("10.2.0.2", reply)) == ("10.2.0.2", 9, 3)
    request = probe.icmp_echo_request(9, 3)
    assert probe.parse_echo_reply(_ip_packet("10.2.0.2", request)) is None
    assert probe.parse_echo_reply(b"short") is None


def _echo_server():
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(8)
    threading.Thread(target=probe._serve, args=(listener, "srv"), daemon=True).start()
    return listener.getsockname()[1]


def test_tcp_probe_reads_what_the_server_saw():
    port = _echo_server()
    result = probe.tcp_probe("127.0.0.1", port)
    assert result["ok"] and result["reply"]["server"] == "srv"
    assert result["reply"]["client"] == "127.0.0.1"


def test_tcp_probe_names_a_refused_connection():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # bound, not listening: refused
        result = probe.tcp_probe("127.0.0.1", port, timeout=1)
    assert not result["ok"] and "refused" in result["detail"].lower()


def test_check_target_flags_nat(monkeypatch):
    port = _echo_server()
    monkeypatch.setattr(probe, "icmp_probe", lambda *a, **k: {"ok": True, "detail": "1/1 replies", "rtt_ms": 0.1})
    clean = probe.check_target({"name": "t", "ip": "127.0.0.1", "port": port}, "127.0.0.1")
    assert clean["ok"] and not clean["nat"]
    natted = probe.check_target({"name": "t", "ip": "127.0.0.1", "port": port}, "10.1.0.2")
    assert not natted["ok"] and natted["nat"] and natted["source_seen"] == "127.0.0.1"


def _res(name, ok=True, icmp=True, tcp=True, nat=False, seen=None):
    return {
        "name": name,
        "ip": "10.9.0.2",
        "ok": ok,
        "nat": nat,
        "source_seen": seen,
        "icmp": {"ok": icmp, "detail": "3/3 replies" if icmp else "0/3 replies"},
        "tcp": {"ok": tcp, "rtt_ms": 0.25, "detail": "served" if tcp else "timed out"},
    }


def test_matrix_counts_and_names_every_failure():
    rows = [
        {"client": "a", "ip": "10.1.0.2", "results": [_res("b"), _res("c", ok=False, icmp=False, tcp=False)]},
        {"client": "b", "ip": "10.1.1.2", "results": [_res("a", ok=False, nat=True, seen="198.18.1.12"), _res("c")]},
    ]
    report = probe.matrix(rows)
    assert report["total"] == 4 and report["passed"] == 2
    assert report["lines"][-1] == "2 of 4 paths ok"
    assert "FAIL" in report["lines"][1] and "NAT(198.18.1.12)" in report["lines"][2]
    # columns follow the rows, so each client's own (empty) cell is on the diagonal
    assert report["lines"][0].split()[-3:] == ["a", "b", "c"]
    assert report["lines"][1].split()[1] == "-" and report["lines"][2].split()[2] == "-"
    assert any("a -> c" in f and "0/3 replies" in f for f in report["failures"])
    assert any("server saw source 198.18.1.12 instead of 10.1.1.2" in f for f in report["failures"])


def test_service_probe_counts_backends_and_names_what_is_missing():
    port = _echo_server()
    service = {"name": "cluster1", "ip": "127.0.0.1", "port": port, "count": 5, "expect": ["127.0.0.1"]}
    result = probe.service_probe(service)
    assert result["ok"] and result["backends"] == {"127.0.0.1": 5} and result["failures"] == []
    assert "ok, 5 connections to 1 backends: 127.0.0.1:5" in probe.service_line(dict(result, client="c1-n1"))
    missing = probe.service_probe(dict(service, expect=["127.0.0.1", "10.2.0.2"]))
    assert not missing["ok"] and missing["missing"] == ["10.2.0.2"]
    assert "never answered: 10.2.0.2" in probe.service_line(missing)


def test_service_probe_flags_nat_but_not_hairpin():
    port = _echo_server()
    service = {"name": "cluster1", "ip": "127.0.0.1", "port": port, "count": 2}
    natted = probe.service_probe(service, source_ip="10.1.0.2")  # the server sees 127.0.0.1
    assert not natted["ok"] and natted["nat"] == ["127.0.0.1"]
    assert "NAT: servers saw 127.0.0.1" in probe.service_line(natted)
    # the backend is the client itself: the server must see the hairpin address, not the pod IP
    hairpin = probe.service_probe(service, source_ip="127.0.0.1")
    assert hairpin["nat"] == ["127.0.0.1"]


def test_service_probe_reports_refused_connections():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    result = probe.service_probe({"name": "c", "ip": "127.0.0.1", "port": port, "count": 3})
    assert not result["ok"] and len(result["failures"]) == 3
    assert "3 of 3 failed" in probe.service_line(result)
