"""The CNI plugin clustermesh-cni on lab hosts: installed by role cni, called as a container runtime
calls it (``tools/lab pod``) and directly with CNI_* variables; real namespaces, veths and routes.

Lab prefix: cmn. No routing between nodes is needed here (pods on one node, and their node).
"""

from __future__ import annotations

import ipaddress
import json
import os
import re
import subprocess
import time

import pytest

from .labtools import LAB, PYTHON, inventory_path, lab, lab_session, playbook, run_in

pytestmark = pytest.mark.lab
if os.geteuid() != 0:
    pytest.skip("the lab needs root", allow_module_level=True)

PREFIX = "cmn"
HOST = "c1-n1"
NODE_IP = "198.18.1.11"
POD_CIDR = "10.1.0.0/24"
PLUGIN = "/var/lib/cni/bin/clustermesh-cni"
CONFLIST = "/etc/cni/net.d/10-clustermesh.conflist"

PLAYBOOK = """
- name: CNI
  hosts: {host}
  gather_facts: false
  tasks:
    - name: Role cni
      ansible.builtin.include_role:
        name: clustermesh.core.cni
      vars:
        cni_pod_cidr: "{{{{ pod_cidr | default('{cidr}') }}}}"
        cni_mtu: 1450
"""


def cni(command, config, container="c0", netns="", ifname="eth0", host=HOST):
    """Run the installed plugin in the host like a runtime: returns (exit status, stdout JSON or None)."""
    env = ["CNI_COMMAND=" + command, "CNI_CONTAINERID=" + container, "CNI_IFNAME=" + ifname,
           "CNI_NETNS=" + netns, "CNI_PATH=/var/lib/cni/bin"]  # fmt: skip
    proc = lab("exec", host, "--", "env", *env, PLUGIN, prefix=PREFIX, check=False, input=json.dumps(config))
    return proc.returncode, json.loads(proc.stdout) if proc.stdout.strip() else None


def pod(*args, check=True):
    return lab("pod", args[0], *args[1:], prefix=PREFIX, check=check)


def pod_state(name):
    return json.loads(run_in(PREFIX, HOST, "cat", "/run/clustermesh/pods/%s.json" % name).stdout)


def host_links(host=HOST):
    return {link["ifname"]: link for link in json.loads(run_in(PREFIX, host, "ip", "-j", "link", "show").stdout)}


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
    with lab_session(PREFIX):
        book = tmp_path_factory.mktemp("cni") / "cni.yml"
        book.write_text(PLAYBOOK.format(host=HOST, cidr=POD_CIDR))
        first = playbook(PREFIX, str(book))
        yield {"playbook": str(book), "first": first}


@pytest.fixture(scope="module")
def network(installed):
    return json.loads(run_in(PREFIX, HOST, "cat", CONFLIST).stdout)


def test_role_installs_the_plugin_and_conflist_idempotently(installed, network):
    assert installed["first"].changed_tasks(HOST), "the first run must change something"
    again = playbook(PREFIX, installed["playbook"])
    assert again.changed == [], again.changed
    check = playbook(PREFIX, installed["playbook"], "--check")
    assert check.changed == []
    assert network == {
        "cniVersion": "1.0.0",
        "name": "clustermesh",
        "plugins": [{"type": "clustermesh-cni", "podCIDR": POD_CIDR, "mtu": 1450, "dataDir": "/var/lib/cni/networks"}],
    }
    head = run_in(PREFIX, HOST, "sh", "-c", "head -c 200 %s | head -1; stat -c %%a %s" % (PLUGIN, PLUGIN)).stdout
    assert head.splitlines() == ["#!" + PYTHON, "755"]  # the inventory's ansible_python_interpreter


def test_a_bad_pod_cidr_stops_the_role_before_any_change(installed):
    run = playbook(PREFIX, installed["playbook"], "-e", "pod_cidr=10.1.0.5/24", check=False)
    assert run.returncode != 0
    assert "cni_pod_cidr must be the node's IPv4 pod CIDR" in run.output and "got 10.1.0.5/24" in run.output
    assert run.changed == []


def test_version_lists_the_supported_versions(installed):
    status, out = cni("VERSION", {"cniVersion": "1.0.0"})
    assert status == 0
    assert out == {"cniVersion": "1.0.0", "supportedVersions": ["0.3.0", "0.3.1", "0.4.0", "1.0.0"]}


def test_pods_on_one_node_reach_each_other_and_the_node(installed):
    out_a = pod("add", HOST, "web", "--labels", "app=web,tier=front").stdout.strip().splitlines()
    out_b = pod("add", HOST, "db").stdout.strip().splitlines()
    ip_a, ip_b = out_a[-1], out_b[-1]
    net = ipaddress.ip_network(POD_CIDR)
    for ip in (ip_a, ip_b):
        assert ipaddress.ip_address(ip) in net and ip not in ("10.1.0.0", "10.1.0.1", "10.1.0.255")
    assert ip_a != ip_b
    pod("exec", HOST, "web", "--", "sh", "-c", "ping -c1 -W2 %s && ping -c1 -W2 %s" % (ip_b, NODE_IP))
    pod("exec", HOST, "db", "--", "ping", "-c1", "-W2", ip_a)

    # the result the runtime got follows the spec (1.0.0: no "version" in ips)
    state = pod_state("web")
    result = state["result"]
    assert set(result) == {"cniVersion", "interfaces", "ips", "routes", "dns"}
    assert result["cniVersion"] == "1.0.0"
    host_if, pod_if = result["interfaces"]
    assert re.match(r"^cm_[0-9a-f]{11}$", host_if["name"]) and "sandbox" not in host_if
    assert pod_if == {"name": "eth0", "mac": pod_if["mac"], "sandbox": "/run/netns/cm-pod-web"}
    assert result["ips"] == [{"address": ip_a + "/32", "gateway": "169.254.1.1", "interface": 1}]
    assert result["routes"] == [{"dst": "0.0.0.0/0", "gw": "169.254.1.1"}]

    # the kernel state: host route with protocol 204, veth MTU, the pod's link-local gateway
    routes = run_in(PREFIX, HOST, "ip", "route", "show", "proto", "204").stdout
    assert "%s dev %s scope link" % (ip_a, host_if["name"]) in routes
    assert host_links()[host_if["name"]]["mtu"] == 1450
    inside = pod("exec", HOST, "web", "--", "sh", "-c", "ip route; ip neigh show 169.254.1.1").stdout
    assert "default via 169.254.1.1 dev eth0" in inside
    assert "169.254.1.1 dev eth0 lladdr %s PERMANENT" % host_if["mac"] in inside

    # the IPAM record carries the labels, for the node agent
    record = json.loads(run_in(PREFIX, HOST, "cat", "/var/lib/cni/networks/clustermesh/" + ip_a).stdout)
    assert record["labels"] == {"app": "web", "tier": "front"}
    assert record["containerID"] == state["containerID"] and record["hostInterface"] == host_if["name"]
    assert record["args"]["K8S_POD_NAME"] == "web"

    listing = pod("list", HOST).stdout
    assert re.search(r"c1-n1\s+web\s+%s\s+/run/netns/cm-pod-web\s+app=web,tier=front" % re.escape(ip_a), listing)
    assert re.search(r"c1-n1\s+db\s+%s" % re.escape(ip_b), listing)


def test_check_passes_then_fails_when_the_address_is_removed(installed, network):
    pod("add", HOST, "chk")
    assert "CHECK passed" in pod("check", HOST, "chk").stdout
    state = pod_state("chk")
    config = dict(network["plugins"][0], cniVersion="1.0.0", name="clustermesh", prevResult=state["result"])
    assert cni("CHECK", config, state["containerID"], state["netns"]) == (0, None)

    ip = state["result"]["ips"][0]["address"]
    pod("exec", HOST, "chk", "--", "ip", "addr", "del", ip, "dev", "eth0")
    status, out = cni("CHECK", config, state["containerID"], state["netns"])
    assert status == 1
    assert out["code"] == 103 and out["cniVersion"] == "1.0.0"
    assert "address %s is missing on eth0 in the pod" % ip in out["msg"]
    failed = pod("check", HOST, "chk", check=False)
    assert failed.returncode == 1 and "error 103" in failed.stderr
    pod("del", HOST, "chk")


def test_del_releases_the_address_and_is_idempotent(installed):
    ip = pod("add", HOST, "tmp").stdout.strip().splitlines()[-1]
    host_if = pod_state("tmp")["result"]["interfaces"][0]["name"]
    assert "pod tmp: deleted (%s released" % ip in pod("del", HOST, "tmp").stdout
    assert host_if not in host_links()
    files = run_in(PREFIX, HOST, "ls", "/var/lib/cni/networks/clustermesh").stdout.split()
    assert ip not in files
    again = pod("del", HOST, "tmp", check=False)
    assert again.returncode == 1 and "no pod tmp on c1-n1" in again.stderr
    assert "cm-pod-tmp" not in run_in(PREFIX, HOST, "ip", "netns", "list").stdout


def test_exhaustion_release_and_rollback_in_a_tiny_pod_cidr(installed, network):
    """A /30 has one pod address (.2): the second ADD gets error 100 and leaves nothing; DEL frees the
    address for the next ADD; DEL twice, and DEL after the netns is gone, succeed."""
    tiny = dict(network["plugins"][0], cniVersion="1.0.0", name="tiny", podCIDR="10.1.200.0/30",
                dataDir="/var/lib/cni/tiny")  # fmt: skip
    run_in(PREFIX, HOST, "sh", "-c", "ip netns add cm-t1 && ip netns add cm-t2")
    status, first = cni("ADD", tiny, "t1", "/run/netns/cm-t1")
    assert status == 0 and first["ips"][0]["address"] == "10.1.200.2/32"
    links_before = set(host_links())
    status, err = cni("ADD", tiny, "t2", "/run/netns/cm-t2")
    assert status == 1
    assert err["code"] == 100
    assert "no free address in pod CIDR 10.1.200.0/30" in err["msg"]
    assert set(host_links()) == links_before  # no veth made for the failed ADD
    assert cni("DEL", tiny, "t1", "/run/netns/cm-t1") == (0, None)
    assert cni("DEL", tiny, "t1", "/run/netns/cm-t1") == (0, None)
    run_in(PREFIX, HOST, "ip", "netns", "del", "cm-t1")
    assert cni("DEL", tiny, "t1", "/run/netns/cm-t1") == (0, None)
    status, second = cni("ADD", tiny, "t2", "/run/netns/cm-t2")
    assert status == 0 and second["ips"][0]["address"] == "10.1.200.2/32"
    assert cni("DEL", tiny, "t2", "/run/netns/cm-t2") == (0, None)
    run_in(PREFIX, HOST, "ip", "netns", "del", "cm-t2")


def test_a_failed_add_leaves_no_interface_and_no_address(installed, network):
    config = dict(network["plugins"][0], cniVersion="0.4.0", name="clustermesh")
    run_in(PREFIX, HOST, "ip", "netns", "add", "cm-t3")
    links_before = set(host_links())
    status, err = cni("ADD", config, "t3", "/run/netns/cm-t3", ifname="lo")  # lo exists in every netns
    assert status == 1 and err["code"] == 101 and err["cniVersion"] == "0.4.0"
    assert "interface lo already exists" in err["msg"]
    assert set(host_links()) == links_before
    files = run_in(PREFIX, HOST, "grep", "-l", '"t3"', "-r", "/var/lib/cni/networks/clustermesh", check=False)
    assert files.stdout == ""
    status, err = cni("ADD", config, "t3", "/run/netns/cm-missing")
    assert status == 1 and err["code"] == 3 and "does not exist" in err["msg"]
    # 0.4.0 results carry the IP version
    status, out = cni("ADD", config, "t3", "/run/netns/cm-t3")
    assert status == 0 and out["ips"][0]["version"] == "4"
    assert cni("DEL", config, "t3", "/run/netns/cm-t3") == (0, None)
    run_in(PREFIX, HOST, "ip", "netns", "del", "cm-t3")


@pytest.mark.parametrize(
    "change, field",
    [({"podCIDR": None}, "podCIDR: missing"), ({"mtu": "big"}, 'mtu: "big" must be an integer from 68 to 65535')],
)
def test_a_bad_config_is_error_7_naming_the_field(installed, network, change, field):
    config = dict(network["plugins"][0], cniVersion="1.0.0", name="clustermesh", **change)
    config = {k: v for k, v in config.items() if v is not None}
    run_in(PREFIX, HOST, "ip", "netns", "add", "cm-t4")
    try:
        links_before = set(host_links())
        status, err = cni("ADD", config, "t4", "/run/netns/cm-t4")
        assert status == 1 and err["code"] == 7 and field in err["msg"]
        assert set(host_links()) == links_before
    finally:
        run_in(PREFIX, HOST, "ip", "netns", "del", "cm-t4")


def _processes_in_netns(inode):
    found = []
    for pid in os.listdir("/proc"):
        if pid.isdigit():
            try:
                if os.readlink("/proc/%s/ns/net" % pid) == "net:[%d]" % inode:
                    found.append(int(pid))
            except OSError:
                continue
    return found


def _mounts_of_netns(inode):
    needle = "net:[%d]" % inode
    found = set()
    for pid in os.listdir("/proc"):
        if pid.isdigit():
            try:
                with open("/proc/%s/mountinfo" % pid, encoding="utf-8") as handle:
                    if needle in handle.read():
                        found.add(int(pid))
            except OSError:
                continue
    return found


def test_role_absent_removes_plugin_and_conflist_and_pods_vanish_with_the_lab(installed):
    # a pod with a process in it, started through tools/lab pod exec
    pod("add", HOST, "gone")
    inode = int(run_in(PREFIX, HOST, "stat", "-L", "-c", "%i", "/run/netns/cm-pod-gone").stdout)
    sleeper = subprocess.Popen([LAB, "pod", "exec", "--prefix", PREFIX, HOST, "gone", "--", "sleep", "600"])
    deadline = time.monotonic() + 10
    while not _processes_in_netns(inode) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert _processes_in_netns(inode), "the pod's process did not start"

    absent = playbook(PREFIX, installed["playbook"], "-e", "cni_state=absent")
    assert absent.changed_tasks(HOST)
    left = run_in(PREFIX, HOST, "sh", "-c", "ls %s %s 2>&1; true" % (PLUGIN, CONFLIST)).stdout
    assert left.count("No such file") == 2

    lab("down", prefix=PREFIX)
    assert sleeper.wait(timeout=10) != 0
    assert _processes_in_netns(inode) == []
    assert _mounts_of_netns(inode) == set(), "a mount still holds the pod's netns"
    assert not [n for n in os.listdir("/run/netns") if n.startswith(PREFIX + "-")]
    assert not os.path.exists(inventory_path(PREFIX))
