"""Connectivity probes: ICMP encoding, the echo server's reply, NAT detection and the matrix."""

from __future__ import annotations

import socket
import struct
import threading

import pytest

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


# --- expectations ---------------------------------------------------------------------------------

HOSTS = {"c1-n1": "cluster1", "c1-n2": "cluster1", "c2-n1": "cluster2", "c2-n2": "cluster2"}


def test_expectations_are_checked_all_at_once_naming_index_and_field():
    entries, errors = probe.check_expectations(
        [
            {"from": "c1-n1", "to": "c2-n1", "expect": "deny"},
            {"from": "c3-n1", "to": "all", "expect": "block", "protocol": "udp"},
            {"from": "cluster1", "expect": "allow", "port": 80},
            "c1-n1 -> c2-n1",
        ],
        HOSTS,
    )
    assert entries == [{"from": "c1-n1", "to": "c2-n1", "expect": "deny", "protocol": "any"}]
    assert errors == [
        "connectivity_expect[1].from: 'c3-n1' is not a host or cluster of the inventory "
        "(hosts: c1-n1, c1-n2, c2-n1, c2-n2; clusters: cluster1, cluster2; or 'all')",
        "connectivity_expect[1].expect: 'block' is not allow or deny",
        "connectivity_expect[1].protocol: 'udp' is not icmp, tcp or any",
        "connectivity_expect[2]: unknown field 'port' (fields: from, to, expect, protocol)",
        "connectivity_expect[2].to: missing (a host, a cluster or 'all')",
        "connectivity_expect[3]: must be a mapping {from, to, expect, protocol}, got 'c1-n1 -> c2-n1'",
    ]
    assert probe.check_expectations(None, HOSTS) == ([], [])
    assert probe.check_expectations({"from": "all"}, HOSTS)[1] == [
        "connectivity_expect: must be a list of {from, to, expect, protocol}, got {'from': 'all'} (dict)"
    ]


def test_a_name_that_is_both_a_host_and_a_cluster_is_refused():
    _entries, errors = probe.check_expectations([{"from": "x", "to": "all", "expect": "deny"}], {"x": "x", "y": "x"})
    assert errors == ["connectivity_expect[0].from: 'x' is both a host and a cluster: rename one"]


def test_resolution_defaults_to_allow_and_later_entries_win():
    entries, errors = probe.check_expectations(
        [
            {"from": "all", "to": "cluster2", "expect": "deny"},  # everything into cluster2 denied ...
            {"from": "c1-n1", "to": "c2-n1", "expect": "allow", "protocol": "tcp"},  # ... but c1-n1's TCP to c2-n1
            {"from": "cluster2", "to": "cluster2", "expect": "allow"},  # ... and cluster2 inside itself
        ],
        HOSTS,
    )
    assert errors == []
    paths = probe.resolve_expectations(entries, HOSTS)
    assert set(paths) == set(HOSTS) and all(client not in row for client, row in paths.items())  # no self paths
    assert paths["c1-n1"]["c2-n1"] == {"icmp": "deny", "tcp": "allow"}
    assert paths["c1-n1"]["c2-n2"] == {"icmp": "deny", "tcp": "deny"}
    assert paths["c1-n2"]["c2-n1"] == {"icmp": "deny", "tcp": "deny"}
    assert paths["c2-n1"]["c2-n2"] == {"icmp": "allow", "tcp": "allow"}
    assert paths["c2-n1"]["c1-n1"] == {"icmp": "allow", "tcp": "allow"}  # not named: allowed
    assert paths["c1-n1"]["c1-n2"] == {"icmp": "allow", "tcp": "allow"}


def test_plan_lists_tcp_denials_and_merges_probe_labels():
    plan = probe.expectation_plan(
        [
            {"from": "c1-n1", "to": "cluster2", "expect": "deny", "protocol": "tcp"},
            {"from": "c1-n2", "to": "c2-n1", "expect": "deny", "protocol": "icmp"},
        ],
        HOSTS,
        {"c2-n1": {"role": "rebel-base", "tier": 1}},
    )
    assert plan["errors"] == []
    assert plan["denied_tcp"] == {"c1-n1": ["c2-n1", "c2-n2"], "c1-n2": [], "c2-n1": [], "c2-n2": []}
    assert plan["labels"]["c2-n1"] == {"app": "clustermesh-probe", "role": "rebel-base", "tier": "1"}
    assert plan["labels"]["c1-n1"] == {"app": "clustermesh-probe"}
    assert plan["expect"][1]["protocol"] == "icmp"
    # a pod reaches itself through its ClusterIP (hairpin): an entry naming it on both sides counts
    ingress = probe.expectation_plan([{"from": "all", "to": "c2-n1", "expect": "deny"}], HOSTS)
    assert ingress["denied_tcp"] == {"c1-n1": ["c2-n1"], "c1-n2": ["c2-n1"], "c2-n1": ["c2-n1"], "c2-n2": ["c2-n1"]}
    assert "c2-n1" not in ingress["paths"]["c2-n1"]


def test_plan_refuses_labels_that_drop_the_probe_selector_or_are_invalid():
    plan = probe.expectation_plan([], HOSTS, {"c1-n1": {"app": "web"}, "c1-n2": {"bad key!": "x"}, "c2-n1": ["a"]})
    assert plan["errors"] == [
        "c1-n1: connectivity_pod_labels: app=web would drop the label app=clustermesh-probe that the probe "
        "service selects: choose another key",
        "c1-n2: connectivity_pod_labels: 'bad key!' is not a valid label key",
        "c2-n1: connectivity_pod_labels: must be a mapping of label keys to values, got ['a'] (list)",
    ]
    assert plan["paths"] == {}


def test_probe_targets_carry_the_clients_row():
    targets = probe.probe_targets(
        ["c1-n2", "c2-n1"], ["10.1.1.2", "10.2.0.2"], {"c2-n1": {"icmp": "deny", "tcp": "deny"}}
    )
    assert targets == [
        {"name": "c1-n2", "ip": "10.1.1.2", "expect": {"icmp": "allow", "tcp": "allow"}},
        {"name": "c2-n1", "ip": "10.2.0.2", "expect": {"icmp": "deny", "tcp": "deny"}},
    ]


def _full_listener():
    """A listener whose accept queue is full: the kernel drops further SYNs, so a connect times out."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(0)
    port = listener.getsockname()[1]
    fillers = []
    for _index in range(2):
        s = socket.socket()
        s.settimeout(0.3)
        try:
            s.connect(("127.0.0.1", port))
        except OSError:
            pass
        fillers.append(s)
    return listener, port, fillers


def test_a_denied_tcp_path_is_one_that_does_not_connect_within_the_deny_timeout(monkeypatch):
    monkeypatch.setattr(probe, "icmp_probe", lambda *a, **k: {"ok": False, "detail": "0/3 replies within 0.3 s"})
    listener, port, fillers = _full_listener()
    try:
        target = {"name": "t", "ip": "127.0.0.1", "port": port, "expect": {"icmp": "deny", "tcp": "deny"}}
        result = probe.check_target(target, "127.0.0.1", deny_timeout=0.3)
    finally:
        for s in [listener, *fillers]:
            s.close()
    assert result["tcp"]["connected"] is False and "timed out after 0.3 s" in result["tcp"]["detail"]
    assert result["observed"] == {"icmp": "deny", "tcp": "deny"} and result["ok"]
    # the same path answering is a difference
    port = _echo_server()
    monkeypatch.setattr(probe, "icmp_probe", lambda *a, **k: {"ok": True, "detail": "3/3 replies", "rtt_ms": 0.1})
    allowed = probe.check_target(dict(target, port=port), "127.0.0.1", deny_timeout=0.3)
    assert allowed["observed"] == {"icmp": "allow", "tcp": "allow"} and not allowed["ok"]


def _checked(name, expect=None, icmp=True, tcp=True, connected=None, nat=False, seen=None):
    res = _res(name, icmp=icmp, tcp=tcp, nat=nat, seen=seen)
    res["tcp"]["connected"] = tcp if connected is None else connected
    if expect:
        res["expect"] = expect
    res["ok"] = probe.path_verdict(res, "10.1.0.2")["ok"]
    return res


DENY = {"icmp": "deny", "tcp": "deny"}


def test_path_verdict_compares_each_protocol_with_its_expectation():
    assert probe.path_verdict(_checked("b", DENY, icmp=False, tcp=False))["ok"]
    verdict = probe.path_verdict(_checked("b", DENY, icmp=False, tcp=True))
    assert verdict["observed"] == {"icmp": "deny", "tcp": "allow"}
    assert verdict["differences"] == [
        {"protocol": "tcp", "expected": "deny", "observed": "allow", "detail": "connected in 0.25 ms"}
    ]
    # expected allowed: connected but no echo reply is still a failure; so is NAT
    broken = probe.path_verdict(_checked("b", icmp=True, tcp=False, connected=True))
    assert [(d["protocol"], d["observed"]) for d in broken["differences"]] == [("tcp", "allow")]
    natted = probe.path_verdict(_checked("b", nat=True, seen="198.18.1.11"), "10.1.0.2")
    assert natted["differences"][0]["detail"] == "NAT: the server saw source 198.18.1.11 instead of 10.1.0.2"
    # a refused connection did not get through: observed deny
    assert probe.path_verdict(_checked("b", DENY, icmp=False, tcp=False, connected=False))["ok"]


def test_matrix_with_denials_shows_expected_vs_observed_and_lists_every_difference():
    rows = [
        {
            "client": "c1-n1",
            "ip": "10.1.0.2",
            "results": [
                _checked("c1-n2"),
                _checked("c2-n1", DENY, icmp=True, tcp=True),  # a policy that is missing
                _checked("c2-n2", {"icmp": "deny", "tcp": "allow"}, icmp=False, tcp=True),
            ],
        },
        {
            "client": "c1-n2",
            "ip": "10.1.1.2",
            "results": [
                _checked("c1-n1"),
                _checked("c2-n1", DENY, icmp=False, tcp=False),
                _checked("c2-n2", tcp=False),
            ],
        },
    ]
    report = probe.matrix(rows)
    assert report["failures"] == [
        "c1-n1 -> c2-n1 icmp: expected deny, observed allow (3/3 replies)",
        "c1-n1 -> c2-n1 tcp: expected deny, observed allow (connected in 0.25 ms)",
        "c1-n2 -> c2-n2 tcp: expected allow, observed deny (timed out)",
    ]
    assert report["total"] == 6 and report["passed"] == 4 and report["expected_denied"] == 3
    assert report["lines"][1].split() == ["c1-n1", "-", "ok", "0.25ms", "ALLOWED", "tcp", "only"]
    assert report["lines"][2].split() == ["c1-n2", "ok", "0.25ms", "-", "denied", "FAIL", "tcp"]
    assert report["lines"][3] == "4 of 6 paths as expected (3 expected denied in whole or in part)"
    assert report["lines"][4] == probe.MATRIX_LEGEND
    path = next(p for p in report["paths"] if p["client"] == "c1-n1" and p["target"] == "c2-n1")
    assert path == {
        "client": "c1-n1",
        "target": "c2-n1",
        "ip": "10.9.0.2",
        "expect": DENY,
        "observed": {"icmp": "allow", "tcp": "allow"},
        "ok": False,
    }
    assert len(report["differences"]) == 3 and report["differences"][2]["client"] == "c1-n2"


def test_matrix_without_denials_is_unchanged_by_expectations():
    def rows(expect):
        return [
            {"client": "a", "ip": "10.1.0.2", "results": [_checked("b", expect), _checked("c", expect, icmp=False)]},
            {"client": "b", "ip": "10.1.1.2", "results": [_checked("a", expect, nat=True, seen="198.18.1.12")]},
        ]

    plain = probe.matrix(rows(None))
    allowed = probe.matrix(rows({"icmp": "allow", "tcp": "allow"}))
    assert plain["lines"] == allowed["lines"] and plain["failures"] == allowed["failures"]
    assert plain["lines"][-1] == "1 of 3 paths ok"
    assert plain["failures"][0] == "a -> c (10.9.0.2): icmp 0/3 replies; tcp served"
    assert plain["expected_denied"] == 0 and len(plain["paths"]) == 3


def test_service_line_of_a_skipped_check():
    row = {
        "client": "c1-n1",
        "name": "cluster1",
        "ip": "172.30.1.254",
        "port": 8080,
        "skipped": "connectivity_expect denies TCP to c2-n1",
    }
    assert probe.service_line(row) == (
        "c1-n1 -> 172.30.1.254:8080 (cluster1): skipped, connectivity_expect denies TCP to c2-n1"
    )


def test_icmp_burst_sends_every_request_then_waits_once():
    try:
        socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_ICMP).close()
    except PermissionError:
        pytest.skip("raw ICMP sockets need root")
    result = probe.icmp_probe("127.0.0.1", count=3, timeout=0.5, burst=True)
    assert result["ok"] and result["received"] == 3 and result["detail"] == "3/3 replies"
