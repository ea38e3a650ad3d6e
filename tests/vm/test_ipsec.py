"""IPsec across two clusters on a kernel with ESP (the VM of tools/vm-run): what a user of
playbooks/encryption.yml and playbooks/rotate_ipsec_key.yml relies on.

One lab of three hosts (prefix cmip: the default topology without c1-n2, so c1-n1 and c2-n1 on dc1,
c2-n2 alone on dc2 behind the router), routing mode hybrid, so one mesh has both kinds of peer: direct
(c1-n1 <-> c2-n1 across clusters: ESP between node IPs carries pod packets) and tunnel (c1-n1 <-> c2-n2
across clusters, c2-n1 <-> c2-n2 in a cluster: ESP carries the VXLAN packets). Three hosts, not four:
every module run costs seconds per host under the VM's emulated CPU, and these three have every kind
of path. Real etcd is not needed: encryption depends on
the inventory only (routing.yml, encryption.yml, no preflight: the host lab tests cover it).

- pod-to-pod traffic on every kind of path is ESP on the underlay, and a known payload never appears
  in clear; pods got the smaller MTU;
- a second run changes nothing; check mode reports a missing state and applies nothing;
- a rotation under a continuous TCP stream and ping: no connection broken, no more loss than
  without rotation, then only the new key's states on every node; the key file moved on;
- a node removed from the inventory: its states and policies are gone from every other node;
- key material appears in no output.

Every test here runs in CI's vm stage (`make test`, beside the host stages) and in `make vm-tests`.
"""

from __future__ import annotations

import ipaddress
import json
import os
import re
import signal
import subprocess
import time

import pytest
import yaml

from .vmtools import LAB, REPO_ROOT, capture, inventory_path, lab, playbook, results_path, run_in, vm_lab

PREFIX = "cmip"
ROUTING = os.path.join(REPO_ROOT, "playbooks", "routing.yml")
ENCRYPTION = os.path.join(REPO_ROOT, "playbooks", "encryption.yml")
ROTATE = os.path.join(REPO_ROOT, "playbooks", "rotate_ipsec_key.yml")


def _default_topology_without(name):
    """tools/lab's default topology (tools/labkit/default-topology.yml) without host ``name``."""
    with open(os.path.join(REPO_ROOT, "tools", "labkit", "default-topology.yml")) as f:
        topology = yaml.safe_load(f)
    topology["hosts"] = [h for h in topology["hosts"] if h["name"] != name]
    return topology


TOPOLOGY = _default_topology_without("c1-n2")
HOSTS = tuple(h["name"] for h in TOPOLOGY["hosts"])  # c1-n1, c2-n1, c2-n2
KEY_FILE = "/run/cmip-ipsec.key"  # tmpfs of the VM: the controller's key file
PATTERN = "434d2d5345435245542d5041594c4f41"  # "CM-SECRET-PAYLOA": ping fills its payload with it
REQID_SPI = re.compile(r"spi 0x([0-9a-f]{8}) reqid 25453 mode tunnel")


def extra_vars(**more):
    values = {
        "clustermesh_routing_mode": "hybrid",
        "clustermesh_encryption": "ipsec",
        "clustermesh_ipsec_key_file": KEY_FILE,
        "routing_preflight": False,
        "routing_masquerade": False,  # nft's first load outlasts its timeout under TCG; not what is tested here
        "clustermesh_node": {},  # no feature probing either (routing.yml's pre-task)
        "ipsec_rotation_window": 2,
    }
    values.update(more)
    return ("-e", json.dumps(values))


def key_hex(path=KEY_FILE):
    """The key bytes of the controller's key file as the nodes hold them (lowercase hex, no 0x)."""
    with open(path) as f:
        return f.read().split()[2].lower().removeprefix("0x")


def assert_no_key(output, *keys):
    for key in keys:
        assert key[:16] not in output and key[-16:] not in output, "key material in the output"


def xfrm(host):
    """Our states (spi list) and policies text on a host."""
    states = run_in(PREFIX, host, "ip", "xfrm", "state").stdout
    policies = run_in(PREFIX, host, "ip", "xfrm", "policy").stdout
    return REQID_SPI.findall(states.replace("\n\t", " ")), states, policies


def _safe_packets(cap):
    """The packets captured so far (an empty list while tcpdump has not written its header yet)."""
    try:
        return cap.packets()
    except (AssertionError, OSError):
        return []


def pod_exec(host, *command, check=True, timeout=120):
    return lab("pod", "exec", host, "pod-" + host, "--", *command, prefix=PREFIX, check=check, timeout=timeout)


def ping(src, dst_ip, count=3):
    return pod_exec(src, "ping", "-n", "-c", str(count), "-i", "0.2", "-W", "2", "-s", "200", "-p", PATTERN, dst_ip)


@pytest.fixture(scope="module")
def mesh():
    with open(KEY_FILE, "w") as f:
        os.fchmod(f.fileno(), 0o600)
        # as a user may write it (0x, uppercase): the nodes' canonical lines must still be the same key
        f.write("3+ rfc4106(gcm(aes)) 0x%s 128\n" % os.urandom(20).hex().upper())
    with vm_lab(PREFIX, TOPOLOGY) as lab_:
        outputs = [playbook(PREFIX, ROUTING, *extra_vars()).output, playbook(PREFIX, ENCRYPTION, *extra_vars()).output]
        pods = {}
        for host in HOSTS:
            pods[host] = lab("pod", "add", host, "pod-" + host, prefix=PREFIX).stdout.strip().splitlines()[-1]
        yield {"lab": lab_, "pods": pods, "outputs": outputs}


@pytest.mark.parametrize(
    "src, dst, kind",
    [("c1-n1", "c2-n1", "direct"), ("c1-n1", "c2-n2", "tunnel"), ("c2-n1", "c2-n2", "tunnel")],
    ids=["cross-cluster-direct", "cross-cluster-tunnel", "same-cluster-tunnel"],
)
def test_pod_traffic_is_esp_on_the_underlay(mesh, src, dst, kind):
    addresses = mesh["lab"].addresses
    # on the wire: the fabric's port to the receiver (the receiver's own eth0 also shows what it decrypted)
    wire = "h-" + dst
    both = {(addresses[src], addresses[dst]), (addresses[dst], addresses[src])}
    packets, seen = [], []  # the last capture; every capture's packets (all must be ESP)
    for attempt in range(3):  # under TCG tcpdump may attach or flush late: wait for both directions, else again
        name = "%s-%s-%d.pcap" % (src, dst, attempt)
        with capture(PREFIX, "fabric", wire, "host %s" % addresses[src], seconds=60, name=name) as cap:
            time.sleep(1)
            ping(src, mesh["pods"][dst])
            deadline = time.monotonic() + 15
            while time.monotonic() < deadline and {(p.src, p.dst) for p in _safe_packets(cap)} != both:
                time.sleep(1)
        packets = cap.packets()
        seen += packets
        if {(p.src, p.dst) for p in packets} == both:
            break
    protos = {p.proto for p in seen}
    assert protos == {50}, "between %s and %s the underlay carried protocols %s, not only ESP" % (src, dst, protos)
    # requests and replies (the last ones may still be in flight under TCG when tcpdump stops)
    assert {(p.src, p.dst) for p in packets} == both
    pattern = bytes.fromhex(PATTERN)
    assert not any(pattern in p.frame for p in seen), "the pod payload crossed the underlay in clear"
    assert_no_key("".join(mesh["outputs"]), key_hex())


def test_pods_have_room_for_esp(mesh):
    # (the pod shares the node's mount namespace, so its /sys is the node's: ask netlink)
    link = pod_exec("c1-n1", "ip", "-o", "link", "show", "eth0").stdout
    assert (
        int(re.search(r" mtu (\d+) ", link).group(1)) == 1450 - 77
    )  # hybrid (VXLAN 50) minus the largest ESP overhead


def test_every_node_has_two_states_per_peer(mesh):
    for host in HOSTS:
        spis, _states, policies = xfrm(host)
        assert len(spis) == 2 * (len(HOSTS) - 1), host
        assert {int(s, 16) >> 28 for s in spis} == {3}
        assert "action block" in policies


def test_second_run_changes_nothing(mesh):
    run = playbook(PREFIX, ENCRYPTION, *extra_vars())
    assert run.changed_hosts() == []
    assert_no_key(run.output, key_hex())


def test_check_mode_reports_a_missing_state_and_applies_nothing(mesh):
    # c2-n1 -> c2-n2: a path the rotation test's traffic does not take before the rotation repairs it
    addresses = mesh["lab"].addresses
    src, dst = addresses["c2-n1"], addresses["c2-n2"]
    spi = 3 << 28 | int(ipaddress.ip_address(src)) & 0xFFFFFF  # key 3, the sender's address
    run_in(PREFIX, "c2-n2", "ip", "xfrm", "state", "delete", "src", src, "dst", dst, "proto", "esp", "spi", hex(spi))
    run = playbook(PREFIX, ENCRYPTION, "--check", *extra_vars())
    assert run.changed_hosts() == ["c2-n2"]
    spis, _s, _p = xfrm("c2-n2")
    assert "%08x" % spi not in spis and len(spis) == 2 * (len(HOSTS) - 1) - 1
    # the next real run (the rotation below) puts it back: it checks every node has all its states


STREAM_SERVER = """
import socket
s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1); s.bind(("0.0.0.0", 7777)); s.listen()
while True:
    c, _ = s.accept()
    while True:
        data = c.recv(4096)
        if not data:
            break
        c.sendall(data)
"""

# stopped by SIGINT from the test (a stop file would not do: a lab host has its own /tmp)
STREAM_CLIENT = """
import json, signal, socket, sys, time
stop = []
signal.signal(signal.SIGINT, lambda *args: stop.append(1))
deadline = time.monotonic() + 60
while True:  # the server's Python may still be starting (it reads its files over 9p)
    try:
        c = socket.create_connection((sys.argv[1], 7777), timeout=5)
        break
    except ConnectionRefusedError:
        if time.monotonic() > deadline:
            raise
        time.sleep(0.5)
print("connected", flush=True)
sent = ok = 0
error = None
while not stop:
    msg = b"x" * 64
    try:
        c.sendall(msg)
        got = b""
        while len(got) < len(msg):
            chunk = c.recv(len(msg) - len(got))
            if not chunk:
                raise ConnectionError("closed by the peer")
            got += chunk
        ok += 1
    except OSError as exc:
        error = repr(exc)
        break
    sent += 1
    time.sleep(0.05)
print(json.dumps({"sent": sent, "ok": ok, "error": error}))
"""


def _ping_loss(output):
    m = re.search(r"(\d+) packets transmitted, (\d+) received", output)
    assert m, output
    return int(m.group(1)), int(m.group(1)) - int(m.group(2))


def _timed_ping(src, dst_ip, seconds):
    proc = subprocess.run(
        [
            LAB,
            "pod",
            "exec",
            "--prefix",
            PREFIX,
            src,
            "pod-" + src,
            "--",
            "ping",
            "-n",
            "-i",
            "0.1",
            "-w",
            str(seconds),
            dst_ip,
        ],
        capture_output=True,
        text=True,
        timeout=seconds + 60,
        check=False,
    )
    return _ping_loss(proc.stdout)


def test_rotation_under_traffic_loses_nothing(mesh):
    pods = mesh["pods"]
    old_key = key_hex()
    baseline_sent, baseline_lost = _timed_ping("c1-n1", pods["c2-n2"], 10)
    server = subprocess.Popen(
        [LAB, "pod", "exec", "--prefix", PREFIX, "c2-n1", "pod-c2-n1", "--", "python3", "-c", STREAM_SERVER],
        start_new_session=True,
    )
    time.sleep(3)
    client = subprocess.Popen(
        [
            LAB,
            "pod",
            "exec",
            "--prefix",
            PREFIX,
            "c1-n1",
            "pod-c1-n1",
            "--",
            "python3",
            "-c",
            STREAM_CLIENT,
            pods["c2-n1"],
        ],
        stdout=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    pinger = subprocess.Popen(
        [LAB, "pod", "exec", "--prefix", PREFIX, "c1-n1", "pod-c1-n1", "--", "ping", "-n", "-i", "0.1", pods["c2-n2"]],
        stdout=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        assert client.stdout.readline().strip() == "connected"  # the stream runs before the rotation starts
        time.sleep(3)
        rotation = playbook(PREFIX, ROTATE, *extra_vars(), check=False)
        time.sleep(2)
    finally:
        os.killpg(client.pid, signal.SIGINT)
        stream = json.loads(client.communicate(timeout=60)[0].strip().splitlines()[-1])
        # ping runs in the pod under tools/lab and nsenter, all in the session started for it: SIGINT
        # to the whole group makes ping print its summary
        os.killpg(pinger.pid, signal.SIGINT)
        ping_out = pinger.communicate(timeout=30)[0]
        os.killpg(server.pid, signal.SIGKILL)
        server.wait()
    assert rotation.returncode == 0, rotation.output[-4000:]
    new_key = key_hex()
    assert new_key != old_key
    assert_no_key(rotation.output, old_key, new_key)
    assert stream["error"] is None and stream["ok"] == stream["sent"] > 20, stream
    sent, lost = _ping_loss(ping_out)
    # no more loss than without rotation (same path, same rate, measured just before)
    assert lost / sent <= baseline_lost / baseline_sent + 0.01, (sent, lost, baseline_sent, baseline_lost)
    for host in HOSTS:
        spis, _states, _policies = xfrm(host)
        assert {int(s, 16) >> 28 for s in spis} == {4}, host
        assert len(spis) == 2 * (len(HOSTS) - 1)
    assert os.stat(KEY_FILE).st_mode & 0o077 == 0 and os.stat(KEY_FILE + ".previous").st_mode & 0o077 == 0
    with open(KEY_FILE) as f:
        assert f.read().startswith("4+ ")


def test_node_removed_from_the_inventory_leaves_no_trace(mesh):
    with open(inventory_path(PREFIX)) as f:
        inventory = yaml.safe_load(f)
    del inventory["all"]["children"]["lab"]["hosts"]["c2-n2"]
    del inventory["all"]["children"]["clusters"]["children"]["cluster2"]["hosts"]["c2-n2"]
    path = results_path("inventory-without-c2-n2.yml")
    with open(path, "w") as f:
        yaml.safe_dump(inventory, f)
    run = playbook(PREFIX, ENCRYPTION, *extra_vars(), inventory=path)
    assert sorted(run.changed_hosts()) == ["c1-n1", "c2-n1"]
    removed_ip = mesh["lab"].addresses["c2-n2"]
    for host in ("c1-n1", "c2-n1"):
        spis, states, policies = xfrm(host)
        assert removed_ip not in states and removed_ip not in policies, host
        assert len(spis) == 2
    # c2-n2's pods are now behind the block policy of cluster2's CIDR: never reached in plaintext
    blocked = pod_exec("c1-n1", "ping", "-n", "-c", "2", "-W", "1", mesh["pods"]["c2-n2"], check=False)
    assert blocked.returncode != 0
