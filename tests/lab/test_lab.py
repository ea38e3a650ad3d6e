"""tools/lab against the real kernel: namespaces, links, mounts (needs root).

Prefixes used here, all starting with "cmt" so that they never meet another lab:
cmt (the shared default lab), cmtd (down / coexistence), cmtb (bad topology), cmtp (20 hosts).
"""

import os
import re
import subprocess
import time

import pytest
import yaml

pytestmark = pytest.mark.lab

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
LAB = os.path.join(REPO_ROOT, "tools", "lab")
LAB_ROOT = "/run/clustermesh-lab"
PREFIX = "cmt"
UP_LIMIT_20_HOSTS = 5.0  # seconds; acceptance criterion (measured ~0.4 s, see docs/lab.md)

if os.geteuid() != 0:
    pytest.skip("the lab needs root", allow_module_level=True)


def lab(*args, prefix=PREFIX, check=True, **kwargs):
    cmd, rest = args[0], list(args[1:])
    proc = subprocess.run(
        [LAB, cmd, "--prefix", prefix, *rest], capture_output=True, text=True, timeout=120, **kwargs, check=False
    )
    if check:
        assert proc.returncode == 0, "tools/lab %s failed (%d):\n%s\n%s" % (
            " ".join(args),
            proc.returncode,
            proc.stdout,
            proc.stderr,
        )
    return proc


def run_in(host, *command, prefix=PREFIX, check=True, **kwargs):
    return lab("exec", host, "--", *command, prefix=prefix, check=check, **kwargs)


def netns_with(prefix):
    try:
        names = os.listdir("/run/netns")
    except FileNotFoundError:
        return []
    return sorted(n for n in names if n.startswith(prefix + "-"))


def mounts_under(path):
    with open("/proc/self/mountinfo") as f:
        points = [line.split()[4] for line in f]
    return [p for p in points if p == path or p.startswith(path + "/")]


def root_netns_snapshot():
    links = subprocess.run(["ip", "-o", "link", "show"], capture_output=True, text=True, check=True).stdout
    routes = subprocess.run(["ip", "route", "show", "table", "all"], capture_output=True, text=True, check=True).stdout
    names = sorted(line.split(":")[1].strip().split("@")[0] for line in links.splitlines())
    return names, sorted(routes.splitlines())


def assert_gone(prefix):
    assert netns_with(prefix) == []
    assert mounts_under(os.path.join(LAB_ROOT, prefix)) == []
    assert not os.path.exists(os.path.join(LAB_ROOT, prefix))


@pytest.fixture(scope="module")
def root_before():
    return root_netns_snapshot()


@pytest.fixture(scope="module")
def default_lab(root_before):
    lab("down", check=False)  # leftovers of an interrupted run
    proc = lab("up")
    yield proc
    lab("down")
    assert_gone(PREFIX)


def twenty_hosts(path):
    data = {
        "clusters": {"cluster1": {"id": 1}, "cluster2": {"id": 2}},
        "segments": [{"name": "s%d" % i, "cidr": "198.18.%d.0/24" % (10 + i)} for i in range(4)],
        "hosts": [
            {"name": "n%02d" % i, "cluster": "cluster%d" % (1 + i % 2), "segment": "s%d" % (i % 4)} for i in range(20)
        ],
    }
    path.write_text(yaml.safe_dump(data))
    return str(path)


# the default lab ---------------------------------------------------------------------------
def test_up_prints_the_inventory_path_last(default_lab):
    lines = default_lab.stdout.strip().splitlines()
    assert lines[-1] == os.path.join(LAB_ROOT, PREFIX, "inventory", "hosts.yml")
    assert os.path.isfile(lines[-1])
    assert re.search(r"4 hosts up .* in [0-9.]+ s", default_lab.stdout)
    assert lab("inventory").stdout.strip() == lines[-1]


def test_netns_are_named_with_the_prefix(default_lab):
    assert netns_with(PREFIX) == sorted("cmt-" + n for n in ("c1-n1", "c1-n2", "c2-n1", "c2-n2", "router", "fabric"))


def test_inventory(default_lab):
    inv = yaml.safe_load(lab("inventory", "--show").stdout)["all"]["children"]
    c1n1 = inv["lab"]["hosts"]["c1-n1"]
    assert c1n1["ansible_connection"] == "clustermesh.core.netns"
    assert c1n1["ansible_netns_name"] == "cmt-c1-n1"
    assert c1n1["ansible_netns_mount"] == "/run/clustermesh-lab/cmt/hosts/cmt-c1-n1/mnt"
    assert c1n1["ansible_netns_uts"] == "/run/clustermesh-lab/cmt/hosts/cmt-c1-n1/uts"
    assert c1n1["clustermesh_node_ip"] == "198.18.1.11"
    assert c1n1["lab_segment"] == "dc1"
    assert os.path.exists(c1n1["ansible_python_interpreter"])
    assert inv["clusters"]["children"]["cluster2"]["vars"]["clustermesh_pod_cidrs"] == ["10.2.0.0/16"]


def test_hosts_ping_each_other_on_link_and_routed(default_lab):
    # c1-n1 -> c2-n2: another segment, through the router
    run_in("c1-n1", "ping", "-n", "-c1", "-W2", "198.18.2.11")
    assert "via 198.18.1.1" in run_in("c1-n1", "ip", "route", "get", "198.18.2.11").stdout
    # c1-n1 -> c2-n1: another cluster on the same segment, on-link; by name through /etc/hosts
    run_in("c1-n1", "ping", "-c1", "-W2", "c2-n1")
    assert "via" not in run_in("c1-n1", "ip", "route", "get", "198.18.1.13").stdout
    run_in("c2-n2", "ping", "-n", "-c1", "-W2", "198.18.1.12")


def test_routes_of_a_host(default_lab):
    routes = run_in("c1-n1", "ip", "-4", "route", "show").stdout
    assert "198.18.0.0/15 via 198.18.1.1 dev eth0" in routes
    assert "default" not in routes
    addrs = run_in("c2-n2", "ip", "-4", "-o", "addr", "show", "dev", "eth0").stdout
    assert "198.18.2.11/24" in addrs


def test_router_has_the_outside_network(default_lab):
    assert "198.19.255.1/24" in run_in("router", "ip", "-4", "-o", "addr", "show").stdout
    assert run_in("router", "cat", "/proc/sys/net/ipv4/ip_forward").stdout.strip() == "1"
    run_in("c2-n2", "ping", "-n", "-c1", "-W2", "198.19.255.1")


def test_status(default_lab):
    proc = lab("status")
    lines = proc.stdout.strip().splitlines()
    assert lines[0].split() == ["HOST", "NETNS", "SEGMENT", "ADDRESS", "HOSTNAME", "REACHABLE"]
    rows = [line.split() for line in lines[1:]]
    assert [r[0] for r in rows] == ["c1-n1", "c1-n2", "c2-n1", "c2-n2"]
    assert all(r[0] == r[4] and r[5] == "yes" for r in rows), proc.stdout


def test_each_host_has_its_own_hostname(default_lab):
    root_name = os.uname().nodename
    for name in ("c1-n1", "c1-n2", "c2-n1", "c2-n2"):
        assert run_in(name, "uname", "-n").stdout.strip() == name
        assert run_in(name, "cat", "/etc/hostname").stdout.strip() == name
    assert os.uname().nodename == root_name


def test_files_are_private_to_a_host(default_lab):
    assert not os.path.exists("/etc/clustermesh/x")
    run_in("c1-n1", "sh", "-c", "mkdir -p /etc/clustermesh && echo c1-n1 > /etc/clustermesh/x")
    run_in("c1-n1", "sh", "-c", "mkdir -p /var/lib/cmt-test && touch /var/lib/cmt-test/y /tmp/cmt-z /run/cmt-w")
    assert run_in("c1-n1", "cat", "/etc/clustermesh/x").stdout == "c1-n1\n"
    assert run_in("c1-n2", "test", "-e", "/etc/clustermesh/x", check=False).returncode == 1
    for path in ("/var/lib/cmt-test/y", "/tmp/cmt-z", "/run/cmt-w"):
        assert run_in("c1-n2", "test", "-e", path, check=False).returncode == 1
        assert not os.path.exists(path)
    assert not os.path.exists("/etc/clustermesh/x")
    assert not os.path.exists("/var/lib/cmt-test")


def test_hosts_have_their_own_etc_hosts_resolv_and_sysfs(default_lab):
    hosts = run_in("c2-n1", "cat", "/etc/hosts").stdout
    assert re.search(r"^198\.18\.2\.11\s+c2-n2$", hosts, re.M)
    assert run_in("c2-n1", "cat", "/etc/resolv.conf").stdout == ""
    assert run_in("c2-n1", "ls", "/sys/class/net").stdout.split() == ["eth0", "lo"]
    mounts = run_in("c2-n1", "cat", "/proc/self/mountinfo").stdout
    assert re.search(r" /sys/fs/bpf .* - bpf ", mounts)
    assert re.search(r" /etc .* - overlay ", mounts)


def test_exec_passes_stdin_stdout_and_exit_code(default_lab):
    proc = run_in("c1-n2", "sh", "-c", "cat; exit 7", input="hello\n", check=False)
    assert proc.returncode == 7
    assert proc.stdout == "hello\n"
    assert run_in("no-such-host", "true", check=False).returncode != 0


def test_nothing_is_created_in_the_root_netns(default_lab, root_before):
    assert root_netns_snapshot() == root_before


def test_up_twice_is_harmless(default_lab):
    run_in("c1-n1", "sh", "-c", "echo kept > /etc/cmt-kept")
    proc = lab("up")
    assert "0 built, 4 kept" in proc.stdout
    assert run_in("c1-n1", "cat", "/etc/cmt-kept").stdout == "kept\n"
    assert lab("status").returncode == 0


# other labs ------------------------------------------------------------------------------
def test_down_removes_everything_and_labs_coexist(default_lab):
    lab("down", prefix="cmtd", check=False)
    lab("up", prefix="cmtd")
    # the same addresses live in both labs, isolated from each other
    run_in("c1-n1", "ping", "-n", "-c1", "-W2", "198.18.2.11", prefix="cmtd")
    sleeper = subprocess.Popen([LAB, "exec", "--prefix", "cmtd", "c1-n1", "--", "sleep", "300"])
    try:
        deadline = time.monotonic() + 5
        target = os.stat("/run/netns/cmtd-c1-n1")
        while time.monotonic() < deadline:  # wait until the sleep runs inside the host
            try:
                ns = os.stat("/proc/%d/ns/net" % sleeper.pid)
                if (ns.st_dev, ns.st_ino) == (target.st_dev, target.st_ino):
                    break
            except OSError:
                pass
            time.sleep(0.02)
        else:
            pytest.fail("sleep did not start inside cmtd-c1-n1")
        proc = lab("down", prefix="cmtd")
        assert "1 processes" in proc.stdout
        assert sleeper.wait(timeout=5) == -15  # SIGTERM
        assert not os.path.exists("/proc/%d" % sleeper.pid)
    finally:
        if sleeper.poll() is None:
            sleeper.kill()
            sleeper.wait()
    assert_gone("cmtd")
    # the other lab is untouched
    assert lab("status").returncode == 0
    assert len(netns_with(PREFIX)) == 6


def test_up_reconciles_a_changed_topology(tmp_path):
    lab("down", prefix="cmtd", check=False)
    try:
        lab("up", prefix="cmtd")
        run_in("c1-n1", "sh", "-c", "echo kept > /etc/cmt-kept", prefix="cmtd")
        changed = tmp_path / "changed.yml"
        changed.write_text(
            """
clusters:
  cluster1: {id: 1, pod_cidr: 10.1.0.0/16}
  cluster2: {id: 2, pod_cidr: 10.2.0.0/16}
segments:
  - {name: dc1, cidr: 198.18.1.0/24}
  - {name: dc2, cidr: 198.18.2.0/24}
hosts:
  - {name: c1-n1, cluster: cluster1, segment: dc1}
  - {name: c1-n2, cluster: cluster1, segment: dc1, address: 198.18.1.50}
  - {name: c2-n2, cluster: cluster2, segment: dc2}
  - {name: c2-n3, cluster: cluster2, segment: dc2}
"""
        )
        proc = lab("up", "--topology", str(changed), prefix="cmtd")
        assert "2 built, 2 kept, 1 removed (cmtd-c2-n1)" in proc.stdout
        assert "cmtd-c2-n1" not in netns_with("cmtd")
        assert not os.path.exists(os.path.join(LAB_ROOT, "cmtd", "hosts", "cmtd-c2-n1"))
        assert run_in("c1-n1", "cat", "/etc/cmt-kept", prefix="cmtd").stdout == "kept\n"
        hosts = run_in("c1-n1", "cat", "/etc/hosts", prefix="cmtd").stdout
        assert re.search(r"^198\.18\.1\.50\s+c1-n2$", hosts, re.M)
        assert re.search(r"^198\.18\.2\.12\s+c2-n3$", hosts, re.M)
        assert "c2-n1" not in hosts
        assert lab("status", prefix="cmtd").returncode == 0
        # a host whose namespace vanished is rebuilt, with the same MAC address
        subprocess.run(["ip", "netns", "delete", "cmtd-c1-n2"], check=True)
        assert "1 built, 3 kept" in lab("up", "--topology", str(changed), prefix="cmtd").stdout
        assert lab("status", prefix="cmtd").returncode == 0
    finally:
        lab("down", prefix="cmtd")
    assert_gone("cmtd")


def test_down_cleans_up_an_interrupted_up(tmp_path):
    topology = twenty_hosts(tmp_path / "twenty.yml")
    lab("down", prefix="cmtd", check=False)
    proc = subprocess.Popen([LAB, "up", "--prefix", "cmtd", "--topology", topology], stdout=subprocess.DEVNULL)
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline and len(netns_with("cmtd")) < 10:
        time.sleep(0.005)
    proc.kill()  # halfway (or just after, on a fast machine)
    proc.wait()
    assert netns_with("cmtd")
    lab("down", prefix="cmtd")
    assert_gone("cmtd")


def test_down_of_a_lab_that_is_not_there():
    proc = lab("down", prefix="cmtd")
    assert "nothing to remove" in proc.stdout


def test_bad_topology_creates_nothing(tmp_path):
    bad = tmp_path / "bad.yml"
    bad.write_text(
        """
segments:
  - {name: dc1, cidr: 198.18.1.0/24}
  - {name: dc2, cidr: 198.18.1.128/25}
hosts:
  - {name: h1, segment: dc1}
  - {name: h1, segment: dc3}
"""
    )
    proc = lab("up", "--topology", str(bad), prefix="cmtb", check=False)
    assert proc.returncode == 2
    assert "overlaps segment dc1" in proc.stderr
    assert "duplicate host name 'h1'" in proc.stderr
    assert "unknown segment 'dc3'" in proc.stderr
    assert netns_with("cmtb") == []
    assert not os.path.exists(os.path.join(LAB_ROOT, "cmtb"))


def test_twenty_hosts_come_up_in_under_5_seconds(tmp_path):
    topology = twenty_hosts(tmp_path / "twenty.yml")
    lab("down", prefix="cmtp", check=False)
    try:
        started = time.monotonic()
        proc = lab("up", "--topology", topology, prefix="cmtp")
        elapsed = time.monotonic() - started
        print("tools/lab up, 20 hosts: %.2f s wall, %s" % (elapsed, proc.stdout.splitlines()[0]))
        assert elapsed < UP_LIMIT_20_HOSTS
        assert len(netns_with("cmtp")) == 22
        assert lab("status", prefix="cmtp").returncode == 0
    finally:
        lab("down", prefix="cmtp")
    assert_gone("cmtp")
