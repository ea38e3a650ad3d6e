"""The routing library (routing_state, masquerade) against real kernels: lab hosts route their pod
addresses to each other in tunnel, hybrid and direct mode; mode switches leave nothing stale; a rerun
and check mode change nothing; state=absent removes only what is ours; masquerade hides pod sources
from the outside and never from other pods.

Lab prefix: cmr, the default lab: c1-n1 198.18.1.11, c1-n2 .12, c2-n1 .13 on dc1; c2-n2 198.18.2.11 on
dc2, behind the lab router. No pods exist here: every node gets a device cm_t0 carrying its overlay
address (the first address of its pod /24), and traffic is sent from that address (``ping -I``).
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import yaml

from .labtools import BIN, LAB, PYTHON, REPO_ROOT, inventory_path, lab_session, python_in, run_in

pytestmark = pytest.mark.lab
if os.geteuid() != 0:
    pytest.skip("the lab needs root", allow_module_level=True)

PREFIX = "cmr"
HOSTS = ("c1-n1", "c1-n2", "c2-n1", "c2-n2")
OUTSIDE = "198.19.255.1"  # the lab router's "outside" address


def mesh_inputs():
    """routing_inputs() of every host, from the lab inventory through the mesh model, as site.yml does."""
    from ansible_collections.clustermesh.core.plugins.module_utils.mesh_model import validate_inventory
    from ansible_collections.clustermesh.core.plugins.module_utils.routing_plan import routing_inputs

    with open(inventory_path(PREFIX)) as f:
        inv = yaml.safe_load(f)["all"]["children"]
    hostvars = {h: dict(v) for h, v in inv["lab"]["hosts"].items()}
    clusters = inv["clusters"]["children"]
    for group in clusters.values():
        for h in group["hosts"]:
            hostvars[h].update(group["vars"])
    for h in clusters["cluster1"]["hosts"]:
        hostvars[h]["clustermesh_connect_to"] = ["cluster2"]
    mesh = validate_inventory(hostvars, {"clusters": list(hostvars)}).to_dict()
    return {h: routing_inputs(mesh, h) for h in HOSTS}


def pod_ip(inputs, host):
    from ansible_collections.clustermesh.core.plugins.module_utils.routing_plan import overlay_ip

    return overlay_ip(inputs[host]["node"]["pod_cidrs"][0])


@pytest.fixture(scope="module")
def mesh():
    with lab_session(PREFIX):
        inputs = mesh_inputs()
        assert {h: i["node"]["pod_cidrs"] for h, i in inputs.items()} == {
            "c1-n1": ["10.1.0.0/24"],
            "c1-n2": ["10.1.1.0/24"],
            "c2-n1": ["10.2.0.0/24"],
            "c2-n2": ["10.2.1.0/24"],
        }
        for host in HOSTS:
            run_in(
                PREFIX,
                host,
                "sh",
                "-ec",
                "ip link add cm_t0 type dummy 2>/dev/null || ip link add cm_t0 type ifb; "
                "ip link set cm_t0 up; ip addr add %s/32 dev cm_t0" % pod_ip(inputs, host),
            )
        yield inputs


RECONCILE = """
import json
from ansible_collections.clustermesh.core.plugins.module_utils import routing_state
from ansible_collections.clustermesh.core.plugins.module_utils.masquerade import MasqueradeError
from ansible_collections.clustermesh.core.plugins.module_utils.routing_plan import RoutingPlanError
results = []
for args in json.loads(ARGS):
    try:
        results.append(routing_state.reconcile(**args))
    except (RoutingPlanError, routing_state.RoutingStateError, MasqueradeError) as exc:
        results.append({"error": type(exc).__name__, "message": str(exc)})
print(json.dumps(results))
"""


def reconcile_seq(inputs, host, *calls):
    """reconcile() on host once per dict of keyword arguments in calls, in one Python process."""
    batch = []
    for kw in calls:
        args = dict(node=inputs[host]["node"], peers=inputs[host]["peers"], mode="tunnel")
        args["mesh_pod_cidrs"] = inputs[host]["mesh_pod_cidrs"]
        args.update(kw)
        batch.append(args)
    return python_in(PREFIX, host, RECONCILE.replace("ARGS", repr(json.dumps(batch))))


def reconcile(inputs, host, mode="tunnel", **kw):
    return reconcile_seq(inputs, host, dict(kw, mode=mode))[0]


def reconcile_all(inputs, mode, hosts=HOSTS, **kw):
    with ThreadPoolExecutor(len(hosts)) as pool:
        results = dict(zip(hosts, pool.map(lambda h: reconcile(inputs, h, mode, **kw), hosts), strict=True))
    for host, result in results.items():
        assert "error" not in result, "%s: %s" % (host, result)
    return results


def snapshot(host):
    """Our state on a host, as ip/bridge/nft show it, plus the protocol-204 routes and cm_t0."""
    sections = {
        "links": "ip -d link show type vxlan",
        "cm_links": "ip -br link show | awk '$1 ~ /^cm_/ {print $1}'",
        "routes": "ip route show proto 203",
        "pod_routes": "ip route show proto 204",
        "neigh": "ip neigh show dev cm_vxlan 2>/dev/null",
        "fdb": "bridge fdb show dev cm_vxlan 2>/dev/null",
        "nft": "nft list table ip clustermesh 2>/dev/null",
        "tables": "nft list tables",
        "forward": "cat /proc/sys/net/ipv4/ip_forward",
    }
    script = "; ".join("echo '@@%s'; %s" % (name, cmd) for name, cmd in sections.items()) + "; true"
    out = run_in(PREFIX, host, "sh", "-c", script).stdout
    result = {}
    for chunk in out.split("@@")[1:]:
        name, unused, body = chunk.partition("\n")
        result[name] = [line.strip() for line in body.strip().splitlines() if line.strip()]
    return result


def route_set(snap):
    return {re.sub(r"\s+", " ", line) for line in snap["routes"]}


def ping_all(inputs, host, targets=None):
    """{target host: reached} for pings from host's pod address to the others' pod addresses."""
    targets = targets or [h for h in HOSTS if h != host]
    script = "; ".join(
        "ping -q -c1 -W1 -I %s %s >/dev/null 2>&1 && echo %s ok || echo %s fail"
        % (pod_ip(inputs, host), pod_ip(inputs, t), t, t)
        for t in targets
    )
    out = run_in(PREFIX, host, "sh", "-c", script).stdout.split()
    return dict(zip(out[::2], [v == "ok" for v in out[1::2]], strict=True))


def ping_matrix(inputs):
    with ThreadPoolExecutor(len(HOSTS)) as pool:
        return dict(zip(HOSTS, pool.map(lambda h: ping_all(inputs, h), HOSTS), strict=True))


def captured(host, action):
    """Run action() while tcpdump watches host's underlay (eth0) for ICMP and VXLAN; returns
    (plain, tunnelled): plain ICMP as (src, dst) and UDP 8472 packets as (outer src, outer dst)."""
    proc = subprocess.Popen(
        [LAB, "exec", "--prefix", PREFIX, host, "--", "tcpdump", "-q", "-n", "-l", "--immediate-mode", "-i", "eth0"]
        + ["icmp or udp port 8472"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        line = proc.stderr.readline()
        while line and "listening on" not in line:
            line = proc.stderr.readline()
        assert "listening on" in line, "tcpdump did not start"
        action()
        time.sleep(0.3)
        proc.send_signal(signal.SIGINT)
        out, unused = proc.communicate(timeout=10)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    plain, tunnelled = set(), set()
    for line in out.splitlines():
        m = re.search(r"IP (\S+?)\.\d+ > (\S+?)\.8472: UDP", line)
        if m:
            tunnelled.add((m.group(1), m.group(2)))
            continue
        m = re.search(r"IP (\S+) > (\S+): ICMP", line)
        if m:
            plain.add((m.group(1), m.group(2)))
    return plain, tunnelled


def tcp_source_seen(server_host, server_ip, client_host, client_ip, port=7001, timeout=3):
    """The source address a TCP server on server_host (``router`` too) sees for a connection from
    client_ip on client_host; None when the connection fails."""
    server = subprocess.Popen(
        [LAB, "exec", "--prefix", PREFIX, server_host, "--", PYTHON, "-c", SERVER, server_ip, str(port)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert server.stdout.readline().strip() == "ready", server.stderr.read()
        client = python_in(PREFIX, client_host, CLIENT % (client_ip, timeout, server_ip, port))
        return client["peer"]
    finally:
        if server.poll() is None:
            server.kill()
        server.wait()


def conntrack_tcp(host, port):
    """(src, dst, reply src, reply dst) of host's conntrack entries for TCP port ``port``
    (/proc/net/nf_conntrack of the host's network namespace; closed flows stay listed for minutes)."""
    out = run_in(PREFIX, host, "cat", "/proc/net/nf_conntrack").stdout
    flows = set()
    for line in out.splitlines():
        if " tcp " in line and "dport=%d " % port in line:
            addresses = re.findall(r"(?:src|dst)=(\S+)", line)
            flows.add(tuple(addresses[:4]))
    return flows


SERVER = """
import socket, sys
s = socket.socket()
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind((sys.argv[1], int(sys.argv[2])))
s.listen(1)
s.settimeout(10)
print("ready", flush=True)
conn, addr = s.accept()
conn.sendall(addr[0].encode())
conn.close()
"""

CLIENT = """
import json, socket
c = socket.socket()
c.bind((%r, 0))
c.settimeout(%d)
try:
    c.connect((%r, %d))
    print(json.dumps({"peer": c.recv(100).decode()}))
except OSError as exc:
    print(json.dumps({"peer": None, "error": str(exc)}))
"""


# --- the tests, in the order they run (each sets up the mode it needs) -----------------------------


def test_tunnel_mode_reaches_every_pod_address_over_udp_8472_only(mesh):
    results = reconcile_all(mesh, "tunnel")
    for host, result in results.items():
        assert result["changed"], host
        assert set(result["peer_modes"].values()) == {"tunnel"}
        assert result["underlay"]["ifname"] == "eth0" and result["pod_mtu"] == 1450
    snap = snapshot("c1-n1")
    link = " ".join(snap["links"])
    for word in ("cm_vxlan:", "mtu 1450", "link/ether 0e:cb:c6:12:01:0b", "vxlan id 2 local 198.18.1.11 dev eth0"):
        assert word in link, link
    assert "dstport 8472" in link and "nolearning" in link
    assert route_set(snap) == {
        "10.1.1.0/24 via 10.1.1.1 dev cm_vxlan onlink",
        "10.2.0.0/24 via 10.2.0.1 dev cm_vxlan onlink",
        "10.2.1.0/24 via 10.2.1.1 dev cm_vxlan onlink",
    }
    assert sorted(snap["neigh"]) == [
        "10.1.1.1 lladdr 0e:cb:c6:12:01:0c PERMANENT",
        "10.2.0.1 lladdr 0e:cb:c6:12:01:0d PERMANENT",
        "10.2.1.1 lladdr 0e:cb:c6:12:02:0b PERMANENT",
    ]
    assert sorted(snap["fdb"]) == [
        "0e:cb:c6:12:01:0c dst 198.18.1.12 self permanent",
        "0e:cb:c6:12:01:0d dst 198.18.1.13 self permanent",
        "0e:cb:c6:12:02:0b dst 198.18.2.11 self permanent",
    ]
    assert snap["forward"] == ["1"]

    matrix = {}
    plain, tunnelled = captured("c1-n1", lambda: matrix.update(ping_matrix(mesh)))
    assert all(all(row.values()) for row in matrix.values()), matrix
    assert plain == set(), "pod addresses showed on the underlay: %s" % plain
    assert {dst for src, dst in tunnelled if src == "198.18.1.11"} == {"198.18.1.12", "198.18.1.13", "198.18.2.11"}

    again = reconcile_all(mesh, "tunnel")
    assert {h: r["changes"] for h, r in again.items()} == {h: [] for h in HOSTS}
    assert not any(r["changed"] for r in again.values())


def test_check_mode_reports_and_changes_nothing(mesh):
    reconcile_all(mesh, "tunnel")
    before = snapshot("c1-n1")
    calls = [
        {"mode": "hybrid"},
        {"state": "absent"},
        {"masquerade": False},
        {"mode": "direct", "external_router": True},
    ]
    results = reconcile_seq(mesh, "c1-n1", *[dict(kw, check=True) for kw in calls])
    for kw, result in zip(calls, results, strict=True):
        assert result["changed"] and result["changes"], kw
        assert result["before"] != result["after"]
    assert snapshot("c1-n1") == before
    hybrid = results[0]
    assert hybrid["changes"][0] == (
        "replace route 10.1.1.0/24 via 198.18.1.12 dev eth0 proto 203 (was via 10.1.1.1 dev cm_vxlan onlink proto 203)"
    )
    assert "route 10.1.1.0/24 via 198.18.1.12 dev eth0 proto 203" in hybrid["after"].splitlines()


def test_hybrid_goes_direct_on_link_and_tunnels_to_the_routed_peer(mesh):
    results = reconcile_all(mesh, "hybrid")
    assert results["c1-n1"]["peer_modes"] == {"c1-n2": "direct", "c2-n1": "direct", "c2-n2": "tunnel"}
    assert set(results["c2-n2"]["peer_modes"].values()) == {"tunnel"}  # alone on dc2: nobody is on-link
    snap = snapshot("c1-n1")
    # nothing stale from tunnel mode: L2 entries only for the tunnelled peer
    assert route_set(snap) == {
        "10.1.1.0/24 via 198.18.1.12 dev eth0",
        "10.2.0.0/24 via 198.18.1.13 dev eth0",
        "10.2.1.0/24 via 10.2.1.1 dev cm_vxlan onlink",
    }
    assert snap["neigh"] == ["10.2.1.1 lladdr 0e:cb:c6:12:02:0b PERMANENT"]
    assert snap["fdb"] == ["0e:cb:c6:12:02:0b dst 198.18.2.11 self permanent"]

    matrix = {}
    plain, tunnelled = captured("c1-n1", lambda: matrix.update(ping_matrix(mesh)))
    assert all(all(row.values()) for row in matrix.values()), matrix
    # on-link peers see pod addresses on the wire, the routed one only UDP 8472
    assert {("10.1.0.1", "10.1.1.1"), ("10.1.0.1", "10.2.0.1")} <= plain
    assert not {p for p in plain if "10.2.1.1" in p}, plain
    assert {dst for src, dst in tunnelled if src == "198.18.1.11"} == {"198.18.2.11"}

    assert not any(r["changed"] for r in reconcile_all(mesh, "hybrid").values())


def test_bad_input_and_missing_underlay_fail_before_anything_changes(mesh):
    reconcile(mesh, "c1-n1", "hybrid")
    before = snapshot("c1-n1")
    elsewhere = dict(mesh["c1-n1"]["node"], ip="198.18.1.99")
    direct, unknown, missing = reconcile_seq(
        mesh, "c1-n1", {"mode": "direct"}, {"mode": "ipip"}, {"mode": "tunnel", "node": elsewhere}
    )
    assert direct["error"] == "RoutingPlanError"
    assert "peer c2-n2 (198.18.2.11): not on this node's segment 198.18.1.0/24" in direct["message"]
    assert "routing_external_router" in direct["message"]
    assert unknown["error"] == "RoutingPlanError"
    assert "mode: 'ipip' is not one of tunnel, direct, hybrid" in unknown["message"]
    assert missing["error"] == "RoutingStateError"
    assert "node ip 198.18.1.99: no interface of this node holds it" in missing["message"]
    assert "nothing was changed" in missing["message"]
    assert snapshot("c1-n1") == before


def test_direct_and_back_to_tunnel_leaves_nothing_stale(mesh):
    on_link = ("c1-n1", "c1-n2", "c2-n1")
    results = reconcile_all(mesh, "direct", hosts=on_link, external_router=True)
    assert results["c1-n1"]["peer_modes"] == {"c1-n2": "direct", "c2-n1": "direct", "c2-n2": "external"}
    assert results["c1-n1"]["pod_mtu"] == 1500
    assert results["c1-n1"]["changes"][-1] == "delete link cm_vxlan (with its 1 FDB entries and 1 neighbours)"
    snap = snapshot("c1-n1")
    assert snap["links"] == [] and snap["cm_links"] == ["cm_t0"]  # no VXLAN device left at all
    assert route_set(snap) == {"10.1.1.0/24 via 198.18.1.12 dev eth0", "10.2.0.0/24 via 198.18.1.13 dev eth0"}
    reached = {}
    plain, tunnelled = captured("c1-n1", lambda: reached.update(ping_all(mesh, "c1-n1", ["c1-n2", "c2-n1"])))
    assert reached == {"c1-n2": True, "c2-n1": True}
    assert {("10.1.0.1", "10.1.1.1"), ("10.1.0.1", "10.2.0.1")} <= plain and tunnelled == set()

    back = reconcile(mesh, "c1-n1", "tunnel")
    routes = [c for c in back["changes"] if " route " in " " + c]
    # routes whose destination stays are replaced in place, never deleted and added again
    assert routes == [
        "replace route 10.1.1.0/24 via 10.1.1.1 dev cm_vxlan onlink proto 203 (was via 198.18.1.12 dev eth0 proto 203)",
        "replace route 10.2.0.0/24 via 10.2.0.1 dev cm_vxlan onlink proto 203 (was via 198.18.1.13 dev eth0 proto 203)",
        "add route 10.2.1.0/24 via 10.2.1.1 dev cm_vxlan onlink proto 203",
    ]
    reconcile_all(mesh, "tunnel")
    snap = snapshot("c1-n1")
    assert route_set(snap) == {
        "10.1.1.0/24 via 10.1.1.1 dev cm_vxlan onlink",
        "10.2.0.0/24 via 10.2.0.1 dev cm_vxlan onlink",
        "10.2.1.0/24 via 10.2.1.1 dev cm_vxlan onlink",
    }
    assert len(snap["neigh"]) == 3 and len(snap["fdb"]) == 3
    assert all(ping_all(mesh, "c1-n1").values())


def test_masquerade_outside_the_mesh_only(mesh):
    reconcile_all(mesh, "hybrid")
    snap = snapshot("c1-n1")
    nft = " ".join(snap["nft"])
    assert "ip saddr @node_pod_cidrs ip daddr != @mesh_pod_cidrs snat to 198.18.1.11" in nft
    assert "10.1.0.0/16" in nft and "10.2.0.0/16" in nft
    assert "chain raw_prerouting" in nft and "chain raw_output" in nft and "notrack" in nft
    # the outside sees the node IP; pods of other nodes (direct and tunnelled) see the pod IP
    assert tcp_source_seen("router", OUTSIDE, "c1-n1", "10.1.0.1") == "198.18.1.11"
    assert tcp_source_seen("c1-n2", "10.1.1.1", "c1-n1", "10.1.0.1") == "10.1.0.1"
    assert tcp_source_seen("c2-n2", "10.2.1.1", "c1-n1", "10.1.0.1") == "10.1.0.1"
    # conntrack tracked (and translated) the masqueraded connection, and no pod-to-pod one on either
    # side: sent by the node (raw output) or received from the underlay or the tunnel (raw prerouting)
    tracked = {host: conntrack_tcp(host, 7001) for host in ("c1-n1", "c1-n2", "c2-n2")}
    assert ("10.1.0.1", OUTSIDE, OUTSIDE, "198.18.1.11") in tracked["c1-n1"]
    for host, flows in tracked.items():
        assert not [f for f in flows if f[0].startswith("10.") and f[1].startswith("10.")], (host, flows)

    off = reconcile(mesh, "c1-n1", "hybrid", masquerade=False)
    assert off["changes"] == ["delete nft table ip clustermesh"]
    assert snapshot("c1-n1")["nft"] == []
    # without masquerade the router answers a pod address it has no route to: no connection
    assert tcp_source_seen("router", OUTSIDE, "c1-n1", "10.1.0.1", timeout=1) is None
    on = reconcile(mesh, "c1-n1", "hybrid")
    assert on["changes"] == [
        "create nft table ip clustermesh: SNAT 10.1.0.0/24 to 198.18.1.11 unless destined to 10.1.0.0/16, 10.2.0.0/16"
    ]


def test_absent_removes_what_is_ours_and_nothing_else(mesh):
    reconcile(mesh, "c1-n1", "hybrid")
    run_in(
        PREFIX,
        "c1-n1",
        "sh",
        "-ec",
        "ip route add 10.1.0.77/32 dev cm_t0 proto 204; ip route add 10.9.9.0/24 via 198.18.1.12 proto static; "
        "nft add table ip other; nft add chain ip other c",
    )
    result = reconcile(mesh, "c1-n1", state="absent")
    assert result["changed"] and result["plan"] is None
    assert result["changes"][-2:] == [
        "delete link cm_vxlan (with its 1 FDB entries and 1 neighbours)",
        "delete nft table ip clustermesh",
    ]
    snap = snapshot("c1-n1")
    assert snap["routes"] == [] and snap["links"] == [] and snap["nft"] == [] and snap["cm_links"] == ["cm_t0"]
    assert snap["pod_routes"] == ["10.1.0.77 dev cm_t0 scope link"]  # the CNI plugin's protocol 204
    assert "table ip other" in snap["tables"]
    assert "10.9.9.0/24 via 198.18.1.12 dev eth0 proto static" in run_in(PREFIX, "c1-n1", "ip", "route").stdout
    assert snap["forward"] == ["1"]  # never reset
    again = reconcile(mesh, "c1-n1", state="absent")
    assert again["changed"] is False and again["changes"] == []


def test_module_check_diff_apply_rerun_through_ansible(mesh):
    """The module as the role will call it, on c1-n1 (tunnel mode from nothing)."""
    reconcile(mesh, "c1-n1", state="absent")
    args = json.dumps(
        {
            "node": mesh["c1-n1"]["node"],
            "peers": mesh["c1-n1"]["peers"],
            "mesh_pod_cidrs": mesh["c1-n1"]["mesh_pod_cidrs"],
            "mode": "tunnel",
        }
    )
    env = dict(
        os.environ,
        ANSIBLE_CONFIG=os.path.join(REPO_ROOT, "ansible.cfg"),
        ANSIBLE_COLLECTIONS_PATH=os.path.join(REPO_ROOT, "build", "pytest-collections"),
        ANSIBLE_NOCOLOR="1",
        ANSIBLE_CALLBACK_RESULT_FORMAT="json",
    )

    def module(*extra):
        """(result, diff text printed before it) of an ad-hoc run of the module."""
        proc = subprocess.run(
            [os.path.join(BIN, "ansible"), "c1-n1", "-i", inventory_path(PREFIX), "-m", "clustermesh.core.routing"]
            + ["-a", args, *extra],
            capture_output=True,
            text=True,
            env=env,
            cwd=REPO_ROOT,
            timeout=120,
            check=False,
        )
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
        diff, status, result = re.split(r"^c1-n1 \| (CHANGED|SUCCESS) => ", proc.stdout, flags=re.M)
        return json.loads(result), diff

    before = snapshot("c1-n1")
    check, diff = module("--check", "--diff")
    assert check["changed"] and "add route 10.2.1.0/24 via 10.2.1.1 dev cm_vxlan onlink proto 203" in check["changes"]
    assert "\n+route 10.2.1.0/24 via 10.2.1.1 dev cm_vxlan onlink proto 203\n" in diff
    assert "\n+link cm_vxlan vxlan id 2 local 198.18.1.11 dev eth0 dstport 8472" in diff
    assert snapshot("c1-n1") == before
    applied, unused = module()
    assert applied["changed"] and applied["peer_modes"] == {"c1-n2": "tunnel", "c2-n1": "tunnel", "c2-n2": "tunnel"}
    assert applied["underlay"]["ifname"] == "eth0" and applied["pod_mtu"] == 1450
    assert len(route_set(snapshot("c1-n1"))) == 3
    rerun, diff = module("--diff")
    assert rerun["changed"] is False and rerun["changes"] == [] and diff.strip() == ""
