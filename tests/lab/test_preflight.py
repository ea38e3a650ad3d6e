"""mesh_preflight on lab hosts: every check passes in the default lab (tunnel and hybrid, through the
real module), and each kind of broken underlay is caught and named: a peer nobody has, direct mode
with an off-link peer, a duplicate node IP on the wire, a process on UDP 8472, a foreign VXLAN
device, a lower MTU on a peer, a closed kvstore port.

Lab prefix: cmf (default topology: c1-n1 198.18.1.11, c1-n2 .12, c2-n1 .13 on dc1; c2-n2 198.18.2.11
on dc2 behind the router).
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import textwrap

import pytest

from .labtools import LAB, PYTHON, lab_session, playbook, python_in, run_in

pytestmark = pytest.mark.lab
if os.geteuid() != 0:
    pytest.skip("the lab needs root", allow_module_level=True)

PREFIX = "cmf"
CLUSTERS = [
    {
        "name": "cluster1",
        "id": 1,
        "pod_cidrs": ["10.1.0.0/16"],
        "nodes": [{"name": "c1-n1", "ip": "198.18.1.11"}, {"name": "c1-n2", "ip": "198.18.1.12"}],
    },
    {
        "name": "cluster2",
        "id": 2,
        "pod_cidrs": ["10.2.0.0/16"],
        "nodes": [{"name": "c2-n1", "ip": "198.18.1.13"}, {"name": "c2-n2", "ip": "198.18.2.11"}],
    },
]
# Features as node_facts reports them, so the library tests do not probe the kernel again.
FEATURES = {name: {"available": True, "detail": "lab"} for name in ("vxlan", "nftables_nat", "veth")}
KVSTORE_PORT = 32379
NODES = {"c1-n1": "198.18.1.11", "c1-n2": "198.18.1.12", "c2-n1": "198.18.1.13", "c2-n2": "198.18.2.11"}

RUN = """
import json
from ansible_collections.clustermesh.core.plugins.module_utils import mesh_model, preflight, routing_plan
inputs = routing_plan.routing_inputs(mesh_model.validate_mesh(%(clusters)r).to_dict(), %(host)r)
rows = preflight.run_preflight(inputs["node"], inputs["peers"] + %(extra_peers)r, **%(options)r)
print(json.dumps({"rows": [r.to_dict() for r in rows], "message": preflight.failure_message(%(host)r, rows)}))
"""


@pytest.fixture(scope="module")
def default_lab():
    with lab_session(PREFIX):
        yield


def preflight(host, extra_peers=(), **options):
    """run_preflight inside ``host``: (rows by (check, target), failure message)."""
    options = {"features": FEATURES, "timeout": 0.5, **options}
    code = RUN % {"clusters": CLUSTERS, "host": host, "extra_peers": list(extra_peers), "options": options}
    out = python_in(PREFIX, host, code)
    return {(r["name"], r["target"]): r for r in out["rows"]}, out["message"]


@contextlib.contextmanager
def process_in(host, code):
    """A Python process inside ``host`` that prints its PID when ready; stopped by that PID."""
    script = "import os, time\n" + textwrap.dedent(code) + "\nprint(os.getpid(), flush=True)\ntime.sleep(120)\n"
    proc = subprocess.Popen(
        [LAB, "exec", "--prefix", PREFIX, host, "--", PYTHON, "-c", script],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    pid = None
    try:
        line = proc.stdout.readline()
        assert line.strip().isdigit(), "helper process did not start: %s" % proc.stderr.read()
        pid = int(line)
        yield pid
    finally:
        if pid is not None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGTERM)
        try:
            proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


LISTEN_TCP = (
    """
import socket
s = socket.socket()
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("0.0.0.0", %d))
s.listen()
"""
    % KVSTORE_PORT
)

PLAYBOOK = """
- name: Validate the mesh
  hosts: localhost
  gather_facts: false
  tasks:
    - name: Validate
      clustermesh.core.mesh_validate:
        inventory:
          hostvars: "{{ hostvars | clustermesh.core.mesh_vars(groups['clusters'] | default([])) }}"
          groups: "{{ groups }}"
      register: __validated

- name: Preflight every node
  hosts: clusters
  gather_facts: false
  vars:
    __routing: "{{ hostvars['localhost'].__validated.mesh | clustermesh.core.mesh_routing(inventory_hostname) }}"
  tasks:
    - name: Preflight, tunnel mode (the module probes the kernel features itself)
      clustermesh.core.mesh_preflight:
        node: "{{ __routing.node }}"
        peers: "{{ __routing.peers }}"
        mode: tunnel
        kvstore_endpoints: ["198.18.2.11:%(port)d"]
      register: __tunnel

    - name: Preflight, hybrid mode, in check mode
      clustermesh.core.mesh_preflight:
        node: "{{ __routing.node }}"
        peers: "{{ __routing.peers }}"
        mode: hybrid
        features: {vxlan: true, nftables_nat: true, veth: true}
        kvstore_endpoints: ["198.18.2.11:%(port)d"]
      check_mode: true
      register: __hybrid

    - name: Keep the results for the test
      ansible.builtin.copy:
        content: "{{ {'tunnel': __tunnel, 'hybrid': __hybrid} | to_json }}"
        dest: "%(out)s/{{ inventory_hostname }}.json"
        mode: "0644"
      delegate_to: localhost
"""
ALL_CHECKS = ["features", "underlay", "reachability", "path_mtu", "onlink", "ports", "duplicate"]


def test_every_check_passes_in_tunnel_and_hybrid_mode_through_the_module(default_lab, tmp_path):
    path = tmp_path / "preflight.yml"
    path.write_text(PLAYBOOK % {"port": KVSTORE_PORT, "out": tmp_path})
    with process_in("c2-n2", LISTEN_TCP):
        run = playbook(PREFIX, str(path), check=False)
    assert run.returncode == 0, run.output[-6000:]
    assert {task for task, _host in run.changed} <= {"Keep the results for the test"}  # on the controller
    results = {host: json.loads((tmp_path / ("%s.json" % host)).read_text()) for host in NODES}
    for host, ip in NODES.items():
        for mode in ("tunnel", "hybrid"):
            result = results[host][mode]
            assert result["changed"] is False and result["failed_checks"] == 0, (host, mode, result["table"])
            rows = {(r["name"], r["target"]): r for r in result["checks"]}
            assert sorted({name for name, _target in rows}) == sorted(ALL_CHECKS)
            peers = ["%s (%s)" % (peer, peer_ip) for peer, peer_ip in NODES.items() if peer != host]
            for peer in peers:
                assert rows[("reachability", peer)]["result"] == "ok", (host, peer)
                assert rows[("path_mtu", peer)]["detail"] == "a 1500-byte don't-fragment echo was answered"
            assert rows[("underlay", ip)]["detail"] == "%s/24 on eth0, MTU 1500, up" % ip
            assert rows[("ports", "udp/8472")]["detail"] == "free"
            assert rows[("ports", "tcp 198.18.2.11:%d" % KVSTORE_PORT)]["ok"]
            assert rows[("duplicate", "%s on eth0" % ip)]["ok"]
            assert result["table"][0].split() == ["CHECK", "|", "TARGET", "|", "RESULT", "|", "DETAIL"]
            assert len(result["table"]) == len(result["checks"]) + 1
    tunnel = {r["target"]: r for r in results["c1-n1"]["tunnel"]["checks"]}
    hybrid = {(r["name"], r["target"]): r for r in results["c1-n1"]["hybrid"]["checks"]}
    # the module probed the kernel itself in tunnel mode
    assert tunnel["vxlan"]["detail"] == "created a vxlan link in a scratch network namespace"
    assert tunnel["veth"]["detail"] == "created a veth pair in a scratch network namespace"
    assert hybrid[("onlink", "c2-n1 (198.18.1.13)")]["detail"] == "on-link (198.18.1.0/24): direct route"
    assert hybrid[("onlink", "c2-n2 (198.18.2.11)")]["detail"] == "routed (off 198.18.1.0/24): VXLAN tunnel"


def test_the_module_fails_naming_node_peer_and_missing_feature(default_lab, tmp_path):
    path = tmp_path / "fail.yml"
    path.write_text(
        textwrap.dedent(
            """
            - hosts: c1-n1
              gather_facts: false
              tasks:
                - clustermesh.core.mesh_preflight:
                    node: {name: c1-n1, ip: 198.18.1.11, pod_cidrs: [10.1.0.0/24]}
                    peers: [{name: c2-n2, cluster: cluster2, ip: 198.18.2.11, pod_cidrs: [10.2.1.0/24]}]
                    mode: direct
                    masquerade: false
                    features: {vxlan: {available: false, detail: "no vxlan here"}, veth: {available: false,
                               detail: "the kernel has no veth link type"}}
                    checks: [features, onlink]
            """
        )
    )
    run = playbook(PREFIX, str(path), check=False)
    assert run.returncode != 0
    assert "c1-n1: features veth: missing, but the CNI plugin connects each pod with a veth pair: " in run.output
    assert "the kernel has no veth link type; fix: load the veth kernel module" in run.output
    assert "c1-n1: onlink c2-n2 (198.18.2.11): not on this node's segment 198.18.1.0/24" in run.output
    assert "no vxlan here" not in run.output  # direct mode does not need VXLAN


def test_a_peer_nobody_has_fails_reachability(default_lab):
    ghost = {"name": "ghost", "cluster": "cluster2", "ip": "198.18.2.99", "pod_cidrs": ["10.2.9.0/24"]}
    rows, message = preflight("c1-n1", [ghost], mode="hybrid", checks=["reachability", "path_mtu"])
    bad = rows[("reachability", "ghost (198.18.2.99)")]
    assert bad["result"] == "FAIL" and bad["detail"] == "no ICMP echo reply within 0.5s"
    assert rows[("path_mtu", "ghost (198.18.2.99)")]["result"] == "skip"
    for peer in ("c1-n2 (198.18.1.12)", "c2-n1 (198.18.1.13)", "c2-n2 (198.18.2.11)"):
        assert rows[("reachability", peer)]["ok"] and rows[("path_mtu", peer)]["ok"], peer
    assert message.splitlines() == [
        "c1-n1: reachability ghost (198.18.2.99): no ICMP echo reply within 0.5s; fix: check that ghost is up and "
        "that the underlay between 198.18.1.11 and 198.18.2.99 carries ICMP (routes, firewalls); if the address "
        "is wrong, fix clustermesh_node_ip of ghost"
    ]


def test_direct_mode_fails_naming_the_off_link_peer(default_lab):
    rows, message = preflight("c1-n1", mode="direct", checks=["onlink", "reachability"])
    assert rows[("onlink", "c2-n2 (198.18.2.11)")]["result"] == "FAIL"
    assert rows[("onlink", "c1-n2 (198.18.1.12)")]["detail"] == "on-link (198.18.1.0/24): direct route"
    assert rows[("reachability", "c2-n2 (198.18.2.11)")]["ok"]  # reachable, just not on-link
    assert message.startswith("c1-n1: onlink c2-n2 (198.18.2.11): not on this node's segment 198.18.1.0/24")
    assert "routing_external_router: true" in message
    rows, message = preflight("c1-n1", mode="direct", external_router=True, checks=["onlink"])
    assert message == "" and "external router" in rows[("onlink", "c2-n2 (198.18.2.11)")]["detail"]


def test_duplicate_node_ip_on_the_wire_names_the_other_mac(default_lab):
    run_in(PREFIX, "c1-n2", "ip", "addr", "add", "198.18.1.11/24", "dev", "eth0")
    try:
        rows, message = preflight("c1-n1", checks=["duplicate"])
    finally:
        run_in(PREFIX, "c1-n2", "ip", "addr", "del", "198.18.1.11/24", "dev", "eth0")
    row = rows[("duplicate", "198.18.1.11 on eth0")]
    assert row["result"] == "FAIL"
    assert "MAC 02:00:c6:12:01:0c" in row["detail"]  # c1-n2's eth0 (02:00 + 198.18.1.12)
    assert "(ours is 02:00:c6:12:01:0b)" in row["detail"]
    assert message.startswith("c1-n1: duplicate 198.18.1.11 on eth0: another machine answers ARP for 198.18.1.11")
    rows, message = preflight("c1-n1", checks=["duplicate"])
    assert message == "" and rows[("duplicate", "198.18.1.11 on eth0")]["ok"]


def test_a_process_on_udp_8472_fails_the_port_check_naming_its_pid(default_lab):
    bind = "import socket\ns = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)\ns.bind(('0.0.0.0', 8472))\n"
    with process_in("c1-n1", bind) as pid:
        rows, message = preflight("c1-n1", mode="tunnel", checks=["ports"])
    row = rows[("ports", "udp/8472")]
    assert row["result"] == "FAIL" and "held by process %d (python" % pid in row["detail"]
    assert "stop process %d" % pid in message
    # direct mode does not need the port
    rows, message = preflight("c1-n1", mode="direct", checks=["ports"])
    assert ("ports", "udp/8472") not in rows


def test_vxlan_port_held_by_our_device_is_fine_by_another_device_fails(default_lab):
    add = ["ip", "link", "add", "NAME", "type", "vxlan", "id", "2", "dstport", "8472", "local", "198.18.1.11"]
    run_in(PREFIX, "c1-n1", *[("cm_vxlan" if a == "NAME" else a) for a in add])
    try:
        run_in(PREFIX, "c1-n1", "ip", "link", "set", "cm_vxlan", "up")
        rows, message = preflight("c1-n1", mode="hybrid", checks=["ports"])
        assert message == ""
        assert rows[("ports", "udp/8472")]["detail"] == "held by our own cm_vxlan device"
    finally:
        run_in(PREFIX, "c1-n1", "ip", "link", "del", "cm_vxlan")
    run_in(PREFIX, "c1-n1", *[("vx-other" if a == "NAME" else a) for a in add])
    try:
        rows, message = preflight("c1-n1", mode="tunnel", checks=["ports"])
    finally:
        run_in(PREFIX, "c1-n1", "ip", "link", "del", "vx-other")
    assert "VXLAN device vx-other (not ours, down) uses this port" in message
    assert "ip link del vx-other" in message


def test_a_lower_mtu_on_a_peer_fails_path_mtu_naming_the_sizes(default_lab):
    run_in(PREFIX, "c1-n2", "ip", "link", "set", "eth0", "mtu", "1400")
    try:
        rows, message = preflight("c1-n1", mode="tunnel", checks=["path_mtu"])
    finally:
        run_in(PREFIX, "c1-n2", "ip", "link", "set", "eth0", "mtu", "1500")
    row = rows[("path_mtu", "c1-n2 (198.18.1.12)")]
    assert row["result"] == "FAIL"
    assert "a 1500-byte don't-fragment echo got no reply" in row["detail"]
    assert "the largest that passed was 1400 bytes" in row["detail"]
    assert "lower this node's underlay MTU to 1400" in row["fix"]
    assert rows[("path_mtu", "c2-n1 (198.18.1.13)")]["ok"] and rows[("path_mtu", "c2-n2 (198.18.2.11)")]["ok"]
    assert len(message.splitlines()) == 1


def test_a_closed_kvstore_port_fails_naming_host_and_port(default_lab):
    endpoints = ["198.18.2.11:%d" % KVSTORE_PORT, "198.18.2.11:2379"]
    with process_in("c2-n2", LISTEN_TCP):
        rows, message = preflight("c1-n1", mode="direct", checks=["ports"], kvstore_endpoints=endpoints)
    assert rows[("ports", "tcp 198.18.2.11:%d" % KVSTORE_PORT)]["ok"]
    closed = rows[("ports", "tcp 198.18.2.11:2379")]
    assert (
        closed["result"] == "FAIL"
        and "connection refused: nothing listens on 198.18.2.11 port 2379" in closed["detail"]
    )
    assert message.startswith("c1-n1: ports tcp 198.18.2.11:2379: connection refused")
