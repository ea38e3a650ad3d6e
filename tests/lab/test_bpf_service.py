"""The tc service datapath (bpf/lb.c) on one lab host: pods made by the CNI plugin, lb.o built here,
loaded and attached by bpf_loader inside the host, the service written by bpf_maps.

Lab prefix: cms. One host, three pods: client, backend-a, backend-b (each answers its own name and
the peer address it sees, over TCP 8080 and UDP 5353).
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

pytestmark = pytest.mark.lab
if os.geteuid() != 0:
    pytest.skip("the lab needs root", allow_module_level=True)

PREFIX = "cms"
HOST = "c1-n1"
POD_CIDR = "10.1.0.0/24"
VIP, VIP_HAIRPIN = "172.30.1.10", "172.30.1.11"
OBJ = os.path.join(REPO_ROOT, "build", "bpf", "lb.o")
PIN_ROOT = "/sys/fs/bpf/clustermesh"

TOPOLOGY = """
clusters:
  cluster1: {id: 1, pod_cidr: 10.1.0.0/16}
segments:
  - {name: dc1, cidr: 198.18.1.0/24}
hosts:
  - {name: c1-n1, cluster: cluster1, segment: dc1}
"""

PLAYBOOK = (
    """
- name: CNI
  hosts: c1-n1
  gather_facts: false
  tasks:
    - name: Role cni
      ansible.builtin.include_role:
        name: clustermesh.core.cni
      vars:
        cni_pod_cidr: "%s"
        cni_mtu: 1500
"""
    % POD_CIDR
)

SERVER = """
import socket, sys, threading
name = sys.argv[1]
def serve(conn, peer):
    with conn:
        for _line in conn.makefile("rb"):
            conn.sendall(("%s %s\\n" % (name, peer[0])).encode())
def udp():
    u = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    u.bind(("0.0.0.0", 5353))
    while True:
        data, peer = u.recvfrom(2048)
        u.sendto(("%s %s\\n" % (name, peer[0])).encode(), peer)
threading.Thread(target=udp, daemon=True).start()
s = socket.socket()
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("0.0.0.0", 8080))
s.listen(256)
while True:
    conn, peer = s.accept()
    threading.Thread(target=serve, args=(conn, peer), daemon=True).start()
"""

# 50 TCP connections: the peer the client sees, its source port, who answered and whom they saw
TCP_CLIENT = """
import json, socket, sys
vip, count = sys.argv[1], int(sys.argv[2])
out = []
for _ in range(count):
    s = socket.create_connection((vip, 80), timeout=3)
    s.sendall(b"hi\\n")
    name, seen = s.makefile().readline().split()
    out.append({"peer": list(s.getpeername()), "sport": s.getsockname()[1], "name": name, "seen": seen})
    s.close()
print(json.dumps(out))
"""

UDP_CLIENT = (
    """
import json, socket
out = []
for _ in range(20):
    u = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    u.settimeout(3)
    u.sendto(b"hi", ("%s", 53))
    data, peer = u.recvfrom(2048)
    out.append({"peer": list(peer), "name": data.split()[0].decode()})
    u.close()
print(json.dumps(out))
"""
    % VIP
)

# one connection: answer, then (after a line on stdin) ten more answers on the same connection
STICKY_CLIENT = (
    """
import socket, sys
s = socket.create_connection(("%s", 80), timeout=3)
f = s.makefile()
s.sendall(b"hi\\n")
print(f.readline().split()[0], flush=True)
sys.stdin.readline()
names = []
for _ in range(10):
    s.sendall(b"hi\\n")
    names.append(f.readline().split()[0])
print(" ".join(names), flush=True)
"""
    % VIP
)


def pod_exec(name, *cmd, timeout=60):
    return lab("pod", "exec", HOST, name, "--", *cmd, prefix=PREFIX, timeout=timeout)


def maps_in_host(code):
    """Run code with ``maps`` (DatapathMaps) open inside the host; returns its last JSON line."""
    return python_in(
        PREFIX,
        HOST,
        "import json\nfrom ansible_collections.clustermesh.core.plugins.module_utils import bpf_maps, bpf_loader\n"
        "maps = bpf_maps.DatapathMaps()\n" + code,
    )


@pytest.fixture(scope="module")
def datapath(tmp_path_factory):
    if not (shutil.which("clang") and shutil.which("bpftool")):
        pytest.skip("clang and bpftool are needed to build bpf/lb.c (apt-get install clang bpftool)")
    sys.path.insert(0, os.path.join(REPO_ROOT, "build", "pytest-collections"))
    from ansible_collections.clustermesh.core.plugins.module_utils import bpf_loader

    bpf_loader.build(os.path.join(REPO_ROOT, "bpf"), os.path.dirname(OBJ))
    tmp = tmp_path_factory.mktemp("cms")
    (tmp / "topology.yml").write_text(TOPOLOGY)
    (tmp / "cni.yml").write_text(PLAYBOOK)
    servers = []
    lab("down", prefix=PREFIX, check=False)
    try:
        lab("up", "--topology", str(tmp / "topology.yml"), prefix=PREFIX)
        playbook(PREFIX, str(tmp / "cni.yml"))
        pods = {}
        for name in ("client", "backend-a", "backend-b"):
            ip = lab("pod", "add", HOST, name, prefix=PREFIX).stdout.strip().splitlines()[-1]
            state = json.loads(run_in(PREFIX, HOST, "cat", "/run/clustermesh/pods/%s.json" % name).stdout)
            pods[name] = {"ip": ip, "veth": state["result"]["interfaces"][0]["name"]}
        for name in ("backend-a", "backend-b"):
            servers.append(
                subprocess.Popen(  # noqa: S603
                    [LAB, "pod", "exec", "--prefix", PREFIX, HOST, name, "--", PYTHON, "-c", SERVER, name],
                    stdout=subprocess.DEVNULL,
                    stderr=subprocess.DEVNULL,
                )
            )
        # the servers listen once the client reaches both directly
        probe = "import socket,sys\nfor ip in sys.argv[1:]: socket.create_connection((ip, 8080), timeout=1).close()"
        for _attempt in range(50):
            ok = lab("pod", "exec", HOST, "client", "--", PYTHON, "-c", probe, pods["backend-a"]["ip"],
                     pods["backend-b"]["ip"], prefix=PREFIX, check=False)  # fmt: skip
            if ok.returncode == 0:
                break
            time.sleep(0.1)
        else:
            raise AssertionError("the backend servers did not start: %s" % ok.stderr)
        ids = python_in(
            PREFIX,
            HOST,
            f"""
            import json
            from ansible_collections.clustermesh.core.plugins.module_utils import bpf_loader, bpf_maps
            with bpf_loader.load({OBJ!r}) as dp:
                ids = {{veth: dp.attach(veth) for veth in {[p["veth"] for p in pods.values()]!r}}}
            a, b = {pods["backend-a"]["ip"]!r}, {pods["backend-b"]["ip"]!r}
            with bpf_maps.DatapathMaps() as maps:
                maps.write_backend(1, a, 8080, "tcp", cluster_id=1)
                maps.write_backend(2, b, 8080, "tcp", cluster_id=1)
                maps.write_backend(3, a, 5353, "udp", cluster_id=1)
                maps.write_backend(4, b, 5353, "udp", cluster_id=1)
                maps.write_service({VIP!r}, 80, "tcp", [1, 2], rev_nat_index=1)
                maps.write_service({VIP!r}, 53, "udp", [3, 4], rev_nat_index=2)
                maps.write_service({VIP_HAIRPIN!r}, 80, "tcp", [1], rev_nat_index=3)
            print(json.dumps(ids))
            """,
        )
        yield {"pods": pods, "prog_ids": ids}
    finally:
        for proc in servers:
            proc.terminate()
        for proc in servers:
            try:
                proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                proc.kill()
        lab("down", prefix=PREFIX, check=False)


def tcp_connections(pod, vip, count):
    return json.loads(pod_exec(pod, PYTHON, "-c", TCP_CLIENT, vip, str(count)).stdout.strip().splitlines()[-1])


def test_maps_are_pinned_and_programs_attached_on_every_pod_veth(datapath):
    pins = run_in(PREFIX, HOST, "ls", PIN_ROOT).stdout.split()
    assert sorted(pins) == [
        "cm_ct", "cm_drops", "cm_endpoint", "cm_ipcache", "cm_lb_be", "cm_lb_revnat", "cm_lb_svc", "cm_policy"
    ]  # fmt: skip
    for veth, ids in datapath["prog_ids"].items():
        assert ids["ingress"] and ids["egress"] and ids["ingress"] != ids["egress"], (veth, ids)
        filters = run_in(PREFIX, HOST, "tc", "filter", "show", "dev", veth, "ingress").stdout
        assert "from_pod" in filters and "direct-action" in filters, filters


def test_tcp_connections_reach_both_backends_and_replies_come_from_the_cluster_ip(datapath):
    pods = datapath["pods"]
    conns = tcp_connections("client", VIP, 50)
    names = [c["name"] for c in conns]
    assert set(names) == {"backend-a", "backend-b"}, names
    assert min(names.count("backend-a"), names.count("backend-b")) >= 10, names
    # reverse NAT: the client's socket is connected to the ClusterIP; no SNAT: backends see the client
    assert {tuple(c["peer"]) for c in conns} == {(VIP, 80)}
    assert {c["seen"] for c in conns} == {pods["client"]["ip"]}
    # the choice is lb.c's flow hash, as bpf_maps.backend_slot computes it (slot 1 = backend-a)
    predicted = maps_in_host(
        "print(json.dumps([bpf_maps.backend_slot(%r, %r, port, 80, 'tcp', 2) for port in %r]))"
        % (pods["client"]["ip"], VIP, [c["sport"] for c in conns])
    )
    assert [("backend-a", "backend-b")[slot - 1] for slot in predicted] == names
    # conntrack holds both directions of each connection, with the backend and reverse-NAT index
    ct = maps_in_host(
        "print(json.dumps([[k, v] for k, v in maps.ct.items() if k['saddr'] == %r]))" % pods["client"]["ip"]
    )
    forward = {(k["sport"], v["backend_id"]) for k, v in ct if k["direction"] == 0 and k["daddr"] == VIP}
    replies = {(k["sport"], v["backend_id"]) for k, v in ct if k["direction"] == 1 and v["rev_nat_index"] == 1}
    expected = {(c["sport"], 1 if c["name"] == "backend-a" else 2) for c in conns}
    assert expected <= forward and expected <= replies


def test_a_connection_keeps_its_backend_when_the_service_changes(datapath):
    client = subprocess.Popen(  # noqa: S603
        [LAB, "pod", "exec", "--prefix", PREFIX, HOST, "client", "--", PYTHON, "-c", STICKY_CLIENT],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        first = client.stdout.readline().strip()
        assert first in ("backend-a", "backend-b")
        other, other_id = ("backend-b", 2) if first == "backend-a" else ("backend-a", 1)
        # the service now has only the other backend: new connections go there, ours stays
        maps_in_host("maps.write_service(%r, 80, 'tcp', [%d], rev_nat_index=1)\nprint(1)" % (VIP, other_id))
        client.stdin.write("go\n")
        client.stdin.flush()
        assert client.stdout.readline().split() == [first] * 10
        assert client.wait(timeout=10) == 0
        assert {c["name"] for c in tcp_connections("client", VIP, 5)} == {other}
    finally:
        if client.poll() is None:
            client.kill()
            client.wait()
        maps_in_host("maps.write_service(%r, 80, 'tcp', [1, 2], rev_nat_index=1)\nprint(1)" % VIP)


def test_udp_reaches_both_backends_and_replies_come_from_the_cluster_ip(datapath):
    out = json.loads(pod_exec("client", PYTHON, "-c", UDP_CLIENT).stdout.strip().splitlines()[-1])
    assert {tuple(r["peer"]) for r in out} == {(VIP, 53)}
    assert {r["name"] for r in out} == {"backend-a", "backend-b"}


def test_hairpin_a_backend_reaches_the_service_and_is_chosen_itself(datapath):
    # the service with backend-a only: every connection from backend-a comes back to itself
    conns = tcp_connections("backend-a", VIP_HAIRPIN, 5)
    assert {(c["name"], c["seen"], tuple(c["peer"])) for c in conns} == {
        ("backend-a", "169.254.42.1", (VIP_HAIRPIN, 80))
    }
    # through the two-backend service, both itself and the other backend answer
    names = {c["name"] for c in tcp_connections("backend-a", VIP, 20)}
    assert names == {"backend-a", "backend-b"}


# one source port, three connections: VIP, VIP_HAIRPIN, VIP again (closed with RST: no TIME_WAIT)
SAME_PORT_CLIENT = """
import json, socket, struct, sys
port = int(sys.argv[1])
out = []
for vip in sys.argv[2:]:
    s = socket.socket()
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    s.settimeout(3)
    s.bind(("0.0.0.0", port))
    try:
        s.connect((vip, 80))
        s.sendall(b"hi\\n")
        out.append([vip, s.makefile().readline().split()[0], s.getpeername()[0]])
    except OSError as exc:
        out.append([vip, "error", str(exc)])
    s.close()
print(json.dumps(out))
"""


def test_a_client_port_reused_towards_another_service_with_the_same_backend(datapath):
    """The reply conntrack entry is keyed by client and backend: the last service used from that client
    port must own it, or replies are reverse-NATed to the other service's ClusterIP (a lost connection)."""
    pods = datapath["pods"]
    slots = maps_in_host(
        "print(json.dumps([bpf_maps.backend_slot(%r, %r, p, 80, 'tcp', 2) for p in range(40000, 40100)]))"
        % (pods["client"]["ip"], VIP)
    )
    port = 40000 + slots.index(1)  # VIP sends this port to backend-a, as VIP_HAIRPIN does
    out = pod_exec("client", PYTHON, "-c", SAME_PORT_CLIENT, str(port), VIP, VIP_HAIRPIN, VIP).stdout
    assert json.loads(out.strip().splitlines()[-1]) == [
        [VIP, "backend-a", VIP],
        [VIP_HAIRPIN, "backend-a", VIP_HAIRPIN],
        [VIP, "backend-a", VIP],
    ]


def test_reattach_replaces_the_programs_and_keeps_the_maps_detach_removes_them(datapath):
    veth = datapath["pods"]["client"]["veth"]
    before = datapath["prog_ids"][veth]
    after = python_in(
        PREFIX,
        HOST,
        f"""
        import json
        from ansible_collections.clustermesh.core.plugins.module_utils import bpf_loader
        print(json.dumps([bpf_loader.attach({veth!r}, {OBJ!r}), bpf_loader.attached({veth!r})]))
        """,
    )
    assert after[0] == after[1] and after[0]["ingress"] != before["ingress"]
    filters = run_in(PREFIX, HOST, "tc", "filter", "show", "dev", veth, "ingress").stdout
    assert filters.count(" handle ") == 1 and "from_pod" in filters, filters  # replaced, not added
    assert {c["name"] for c in tcp_connections("client", VIP, 10)} == {"backend-a", "backend-b"}
    detached = python_in(
        PREFIX,
        HOST,
        f"""
        import json
        from ansible_collections.clustermesh.core.plugins.module_utils import bpf_loader
        print(json.dumps([bpf_loader.detach({veth!r}), bpf_loader.attached({veth!r}), bpf_loader.detach({veth!r})]))
        """,
    )
    assert detached == [True, {"ingress": None, "egress": None}, False]
    failed = lab("pod", "exec", HOST, "client", "--", PYTHON, "-c", TCP_CLIENT, VIP, "1", prefix=PREFIX, check=False)
    assert failed.returncode != 0  # no DNAT any more: the ClusterIP is not routable
    python_in(
        PREFIX,
        HOST,
        f"""
        from ansible_collections.clustermesh.core.plugins.module_utils import bpf_loader
        bpf_loader.attach({veth!r}, {OBJ!r})
        """,
    )
