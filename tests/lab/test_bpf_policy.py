"""Policy enforcement in the tc datapath (bpf/lb.c): pods made by the CNI plugin on one lab host, lb.o built
here, loaded and attached by bpf_loader inside the host; identities written by hand into cm_ipcache (the
datapath's input), endpoints and allow entries written with bpf_maps, drops read back with maps.drops().

Lab prefix: cmpd. One host, three pods: client, other, server (each answers its own name and the peer
address it sees on TCP 8080 and 8081 and UDP 5353; ping works everywhere).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time

import pytest

from .labtools import LAB, PYTHON, REPO_ROOT, lab, playbook, python_in, run_in
from .test_bpf_service import PLAYBOOK, TOPOLOGY

pytestmark = pytest.mark.lab
if os.geteuid() != 0:
    pytest.skip("the lab needs root", allow_module_level=True)

PREFIX = "cmpd"
HOST = "c1-n1"
OBJ_DIR = os.path.join(REPO_ROOT, "build", "bpf-cmpd")  # our own build: other tests build build/bpf
OBJ = os.path.join(OBJ_DIR, "lb.o")
PODS = ("client", "other", "server")
IDS = {"client": 1001, "other": 1002, "server": 1003}
HOST_ID, WORLD_ID = 1, 2
VIP_SERVER, VIP_OTHER, VIP_EMPTY = "172.30.9.10", "172.30.9.11", "172.30.9.12"
TCP, UDP, ICMP = 6, 17, 1

# the one-host lab and the CNI playbook of the service datapath's test (as test_datapath_sync uses them)

SERVER = """
import socket, sys, threading
name = sys.argv[1]
def serve(conn, peer):
    with conn:
        for _line in conn.makefile("rb"):
            conn.sendall(("%s %s\\n" % (name, peer[0])).encode())
def tcp(port):
    s = socket.socket()
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind(("0.0.0.0", port))
    s.listen(64)
    while True:
        conn, peer = s.accept()
        threading.Thread(target=serve, args=(conn, peer), daemon=True).start()
def udp():
    u = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    u.bind(("0.0.0.0", 5353))
    while True:
        data, peer = u.recvfrom(2048)
        u.sendto(("%s %s\\n" % (name, peer[0])).encode(), peer)
threading.Thread(target=udp, daemon=True).start()
threading.Thread(target=tcp, args=(8081,), daemon=True).start()
tcp(8080)
"""

# probes in parallel: [kind, address, port] -> tcp/udp: [who answered, whom it saw, peer address] or None;
# icmp: true/false. A dropped probe costs one timeout (0.8 s), an answered one a few ms.
PROBE = """
import json, socket, subprocess, sys, threading
probes = json.loads(sys.argv[1])
out = [None] * len(probes)
def run(i, kind, addr, port):
    try:
        if kind == "icmp":
            out[i] = subprocess.run(["ping", "-c1", "-W1", addr], capture_output=True).returncode == 0
        elif kind == "tcp":
            s = socket.create_connection((addr, port), timeout=0.8)
            s.sendall(b"hi\\n")
            name, seen = s.makefile().readline().split()
            out[i] = [name, seen, s.getpeername()[0]]
            s.close()
        else:
            u = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            u.settimeout(0.8)
            u.sendto(b"hi", (addr, port))
            data, peer = u.recvfrom(2048)
            name, seen = data.split()
            out[i] = [name.decode(), seen.decode(), peer[0]]
    except (OSError, ValueError):
        out[i] = False if kind == "icmp" else None
threads = [threading.Thread(target=run, args=(i, *p)) for i, p in enumerate(probes)]
for t in threads:
    t.start()
for t in threads:
    t.join()
print(json.dumps(out))
"""


def maps_in_host(code):
    """Run ``code`` inside the host with ``maps`` (DatapathMaps) open; returns its last JSON line."""
    return python_in(
        PREFIX,
        HOST,
        "import json\nfrom ansible_collections.clustermesh.core.plugins.module_utils import bpf_maps\n"
        "maps = bpf_maps.DatapathMaps()\n" + code,
    )


@pytest.fixture(scope="module")
def lab_pods():
    if not (shutil.which("clang") and shutil.which("bpftool")):
        pytest.skip("clang and bpftool are needed to build bpf/lb.c (apt-get install clang bpftool)")
    sys.path.insert(0, os.path.join(REPO_ROOT, "build", "pytest-collections"))
    from ansible_collections.clustermesh.core.plugins.module_utils import bpf_loader

    bpf_loader.build(os.path.join(REPO_ROOT, "bpf"), OBJ_DIR)
    state = os.path.join(OBJ_DIR, "lab")
    os.makedirs(state, exist_ok=True)
    with open(os.path.join(state, "topology.yml"), "w", encoding="utf-8") as f:
        f.write(TOPOLOGY)
    with open(os.path.join(state, "cni.yml"), "w", encoding="utf-8") as f:
        f.write(PLAYBOOK)
    servers = []
    lab("down", prefix=PREFIX, check=False)
    try:
        lab("up", "--topology", os.path.join(state, "topology.yml"), prefix=PREFIX)
        playbook(PREFIX, os.path.join(state, "cni.yml"))
        pods = {}
        for name in PODS:
            ip = lab("pod", "add", HOST, name, prefix=PREFIX).stdout.strip().splitlines()[-1]
            cni = json.loads(run_in(PREFIX, HOST, "cat", "/run/clustermesh/pods/%s.json" % name).stdout)
            pods[name] = {"ip": ip, "veth": cni["result"]["interfaces"][0]["name"]}
            servers.append(
                subprocess.Popen(  # noqa: S603
                    [LAB, "pod", "exec", "--prefix", PREFIX, HOST, name, "--", PYTHON, "-c", SERVER, name],
                    stdout=subprocess.DEVNULL,
                    stderr=subprocess.DEVNULL,
                )
            )
        veths = [p["veth"] for p in pods.values()]
        loaded = python_in(
            PREFIX,
            HOST,
            f"""
            import json, socket, subprocess
            from ansible_collections.clustermesh.core.plugins.module_utils import bpf_loader, bpf_maps
            with bpf_loader.load({OBJ!r}) as dp:
                for veth in {veths!r}:
                    dp.attach(veth)
            # the address the node uses towards its pods: identity HOST
            route = subprocess.run(["ip", "-j", "route", "get", {pods["server"]["ip"]!r}], capture_output=True,
                                   text=True, check=True)
            host_ip = json.loads(route.stdout)[0]["prefsrc"]
            with bpf_maps.DatapathMaps() as maps:
                maps.write_ipcache(host_ip + "/32", {HOST_ID})
                for name, pod in {pods!r}.items():
                    maps.write_ipcache(pod["ip"] + "/32", {IDS!r}[name])
                maps.write_backend(1, {pods["server"]["ip"]!r}, 8080, "tcp")
                maps.write_backend(2, {pods["other"]["ip"]!r}, 8080, "tcp")
                maps.write_service({VIP_SERVER!r}, 80, "tcp", [1], rev_nat_index=1)
                maps.write_service({VIP_OTHER!r}, 80, "tcp", [2], rev_nat_index=2)
                maps.write_service({VIP_EMPTY!r}, 80, "tcp", [], rev_nat_index=3)
            print(json.dumps({{"host_ip": host_ip, "ifindex": {{v: socket.if_nametoindex(v) for v in {veths!r}}}}}))
            """,
        )
        for pod in pods.values():
            pod["ifindex"] = loaded["ifindex"][pod["veth"]]
        # the servers listen once the client reaches both others
        checks = [
            (kind, pods[n]["ip"], port) for n in PODS for kind, port in (("tcp", 8080), ("tcp", 8081), ("udp", 5353))
        ]
        for _attempt in range(50):
            if all(probe("client", *checks)):
                break
            time.sleep(0.1)
        else:
            raise AssertionError("the pod servers did not start")
        yield {"pods": pods, "host_ip": loaded["host_ip"]}
    finally:
        for proc in servers:
            proc.terminate()
        for proc in servers:
            try:
                proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                proc.kill()
        lab("down", prefix=PREFIX, check=False)


def probe(where, *probes):
    """Results of ``probes`` run in pod ``where`` (or in the node itself: ``where`` = "host")."""
    cmd = [PYTHON, "-c", PROBE, json.dumps(probes)]
    if where == "host":
        out = run_in(PREFIX, HOST, *cmd).stdout
    else:
        out = lab("pod", "exec", HOST, where, "--", *cmd, prefix=PREFIX).stdout
    return json.loads(out.strip().splitlines()[-1])


@pytest.fixture
def dp(lab_pods):
    """The lab with no endpoint, policy entry, drop counter or policy conntrack entry (before and after)."""
    reset = (
        "for k in maps.endpoint.keys(): maps.endpoint.delete(k)\n"
        "for k in maps.policy.keys(): maps.policy.delete(k)\n"
        "for k in maps.ct.keys():\n    if k['direction'] == bpf_maps.CT_POLICY: maps.ct.delete(k)\n"
        "maps.clear_drops()\nprint(1)"
    )
    maps_in_host(reset)
    yield lab_pods
    maps_in_host(reset)


def ip(lab_pods, name):
    return lab_pods["pods"][name]["ip"]


def ifx(lab_pods, name):
    return lab_pods["pods"][name]["ifindex"]


def drops(lab_pods):
    """{(endpoint name, peer identity, port, proto, direction, reason): packets}"""
    names = {p["ifindex"]: n for n, p in lab_pods["pods"].items()}
    found = {}
    for r in maps_in_host("print(json.dumps(maps.drops()))"):
        key = (names.get(r["ifindex"], r["ifindex"]), r["identity"], r["port"], r["proto"], r["direction"])
        found[(*key, r["reason"])] = r["packets"]
    return found


def policy_ct(lab_pods):
    """{(saddr, daddr, dport, proto)} of the CM_CT_POLICY conntrack entries."""
    keys = maps_in_host("print(json.dumps([k for k in maps.ct.keys() if k['direction'] == bpf_maps.CT_POLICY]))")
    return {(k["saddr"], k["daddr"], k["dport"], k["proto"]) for k in keys}


def answered(results):
    return [bool(r) for r in results]


def test_lb_o_carries_the_policy_maps_and_unselected_endpoints_allow_everything(dp):
    pins = run_in(PREFIX, HOST, "ls", "/sys/fs/bpf/clustermesh").stdout.split()
    assert {"cm_endpoint", "cm_policy", "cm_drops"} <= set(pins), pins
    server = ip(dp, "server")
    checks = [("tcp", server, 8080), ("tcp", server, 8081), ("udp", server, 5353), ("icmp", server, 0)]
    assert answered(probe("client", *checks)) == [True] * 4
    assert answered(probe("other", *checks)) == [True] * 4
    assert policy_ct(dp) == set()  # no endpoint in cm_endpoint: no policy work at all
    # an endpoint with neither direction enforced is only conntracked
    maps_in_host("maps.write_endpoint(%d, %d)\nprint(1)" % (ifx(dp, "server"), IDS["server"]))
    assert answered(probe("client", *checks)) == [True] * 4
    client = ip(dp, "client")
    assert {(client, server, 8080, TCP), (client, server, 8081, TCP), (client, server, 5353, UDP)} <= policy_ct(dp)
    assert drops(dp) == {}


def test_ingress_enforced_endpoint_allows_only_its_entries(dp):
    server, s_if = ip(dp, "server"), ifx(dp, "server")
    maps_in_host(
        f"maps.write_policy({s_if}, {IDS['client']}, 8080, 'tcp', 'ingress')\n"
        f"maps.write_endpoint({s_if}, {IDS['server']}, ingress=True)\nprint(1)"
    )
    # allowed identity and port; the same identity on another port, UDP and ping; another identity
    got = probe("client", ("tcp", server, 8080), ("tcp", server, 8081), ("udp", server, 5353), ("icmp", server, 0))
    assert got[0] == ["server", ip(dp, "client"), server]
    assert answered(got) == [True, False, False, False]
    assert answered(probe("other", ("tcp", server, 8080), ("icmp", server, 0))) == [False, False]
    # the node itself (identity HOST) always reaches its pods
    assert probe("host", ("tcp", server, 8080), ("tcp", server, 8081))[1][:2] == ["server", dp["host_ip"]]
    found = drops(dp)
    assert found[("server", IDS["client"], 8081, TCP, "ingress", "policy")] >= 1
    assert found[("server", IDS["client"], 5353, UDP, "ingress", "policy")] >= 1
    assert found[("server", IDS["client"], 0, ICMP, "ingress", "policy")] >= 1
    assert found[("server", IDS["other"], 8080, TCP, "ingress", "policy")] >= 1
    assert not [k for k in found if k[1] == HOST_ID], found

    # an L3 entry (port 0, proto 0) allows every port and ping of that identity; a wildcard identity entry
    maps_in_host(
        f"maps.write_policy({s_if}, {IDS['other']}, 0, 0, 'ingress')\n"
        f"maps.write_policy({s_if}, 0, 5353, 'udp', 'ingress')\nprint(1)"
    )
    checks = [("tcp", server, 8080), ("tcp", server, 8081), ("udp", server, 5353), ("icmp", server, 0)]
    assert answered(probe("other", *checks)) == [True, True, True, True]
    assert answered(probe("client", *checks)) == [True, False, True, False]

    # without its endpoint entry the pod allows everything again
    maps_in_host(f"print(maps.delete_endpoint({s_if}))")
    assert answered(probe("client", *checks)) == [True, True, True, True]


def test_egress_enforced_client_gets_its_replies_through_conntrack(dp):
    c_if, server, other = ifx(dp, "client"), ip(dp, "server"), ip(dp, "other")
    # egress only to server TCP 8080; ingress enforced with no entry at all
    maps_in_host(
        f"maps.write_policy({c_if}, {IDS['server']}, 8080, 'tcp', 'egress')\n"
        f"maps.write_endpoint({c_if}, {IDS['client']}, ingress=True, egress=True)\nprint(1)"
    )
    got = probe("client", ("tcp", server, 8080), ("tcp", other, 8080), ("udp", server, 5353), ("icmp", server, 0))
    assert got[0] == ["server", ip(dp, "client"), server]  # the replies came back
    assert answered(got) == [True, False, False, False]
    assert answered(probe("other", ("tcp", ip(dp, "client"), 8080))) == [False]  # nothing gets in
    assert (ip(dp, "client"), server, 8080, TCP) in policy_ct(dp)
    found = drops(dp)
    assert found[("client", IDS["other"], 8080, TCP, "egress", "policy")] >= 1
    assert found[("client", IDS["server"], 5353, UDP, "egress", "policy")] >= 1
    assert found[("client", IDS["other"], 8080, TCP, "ingress", "policy")] >= 1  # other -> client

    # an address without ipcache entry is WORLD
    maps_in_host(f"maps.delete_ipcache('{other}/32')\nprint(1)")
    try:
        assert answered(probe("client", ("tcp", other, 8081))) == [False]
        assert drops(dp)[("client", WORLD_ID, 8081, TCP, "egress", "policy")] >= 1
        maps_in_host(f"maps.write_policy({c_if}, {WORLD_ID}, 8081, 'tcp', 'egress')\nprint(1)")
        assert probe("client", ("tcp", other, 8081))[0][0] == "other"
    finally:
        maps_in_host(f"maps.write_ipcache('{other}/32', {IDS['other']})\nprint(1)")


def test_service_traffic_is_judged_on_the_backends_identity(dp):
    c_if, s_if, client = ifx(dp, "client"), ifx(dp, "server"), ip(dp, "client")
    # client: egress to server:8080 only (not to port 80 of anything); server: ingress from client:8080 only
    maps_in_host(
        f"maps.write_policy({c_if}, {IDS['server']}, 8080, 'tcp', 'egress')\n"
        f"maps.write_endpoint({c_if}, {IDS['client']}, egress=True)\n"
        f"maps.write_policy({s_if}, {IDS['client']}, 8080, 'tcp', 'ingress')\n"
        f"maps.write_endpoint({s_if}, {IDS['server']}, ingress=True, egress=True)\nprint(1)"
    )
    got = probe("client", ("tcp", VIP_SERVER, 80), ("tcp", VIP_OTHER, 80), ("tcp", VIP_EMPTY, 80))
    assert got[0] == ["server", client, VIP_SERVER]  # DNAT, policy on both ends, reverse NAT
    assert got[1:] == [None, None]
    found = drops(dp)
    assert found[("client", IDS["other"], 8080, TCP, "egress", "policy")] >= 1  # the backend, after DNAT
    assert found[("client", 0, 80, TCP, "egress", "no-backend")] >= 1
    assert not [k for k in found if k[1] == IDS["server"] or k[2] == 80 and k[5] == "policy"], found
    # hairpin: the server reaching itself through its ClusterIP is never policed (nothing allows it here)
    assert probe("server", ("tcp", VIP_SERVER, 80))[0] == ["server", "169.254.42.1", VIP_SERVER]
