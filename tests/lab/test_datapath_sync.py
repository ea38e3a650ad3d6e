"""datapath_sync on real pinned maps inside a lab host: lb.o loaded by bpf_loader into a per-test pin
root, the maps written by DatapathSync, read back by describe_services; a second agent process adopts
them; the 5,000 x 8 scale sync is timed; one traffic check through the tc datapath.

Lab prefix: cmv. One host with the CNI and three pods (client, backend-a, backend-b); the servers,
clients, topology and CNI playbook are test_bpf_service's.
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
from .test_bpf_service import OBJ, PLAYBOOK, SERVER, TCP_CLIENT, TOPOLOGY

pytestmark = pytest.mark.lab
if os.geteuid() != 0:
    pytest.skip("the lab needs root", allow_module_level=True)

PREFIX = "cmv"
HOST = "c1-n1"
VIP = "172.30.1.20"
PIN_BASE = "/sys/fs/bpf/clustermesh"

IMPORTS = """
import json, time
from ansible_collections.clustermesh.core.plugins.module_utils import bpf_loader, bpf_maps
from ansible_collections.clustermesh.core.plugins.module_utils.datapath_sync import (
    BackendSpec, DatapathSync, FrontendSpec, IPCacheSpec, describe_ipcache, describe_services)
"""


def in_host(code):
    return python_in(PREFIX, HOST, IMPORTS + code, timeout=120)


@pytest.fixture(scope="module")
def lab_host(tmp_path_factory):
    if not (shutil.which("clang") and shutil.which("bpftool")):
        pytest.skip("clang and bpftool are needed to build bpf/lb.c (apt-get install clang bpftool)")
    sys.path.insert(0, os.path.join(REPO_ROOT, "build", "pytest-collections"))
    from ansible_collections.clustermesh.core.plugins.module_utils import bpf_loader

    bpf_loader.build(os.path.join(REPO_ROOT, "bpf"), os.path.dirname(OBJ))
    tmp = tmp_path_factory.mktemp("cmv")
    (tmp / "topology.yml").write_text(TOPOLOGY)
    (tmp / "cni.yml").write_text(PLAYBOOK)
    lab("down", prefix=PREFIX, check=False)
    try:
        lab("up", "--topology", str(tmp / "topology.yml"), prefix=PREFIX)
        yield tmp
    finally:
        lab("down", prefix=PREFIX, check=False)


@pytest.fixture
def pin_root(lab_host, request):
    """A fresh pin root with lb.o's maps, removed after the test."""
    root = f"{PIN_BASE}/cmv-{request.node.name.split('_')[1]}"
    in_host(f"bpf_loader.load({OBJ!r}, pin_root={root!r}).close()\nprint(1)")
    yield root
    run_in(PREFIX, HOST, "rm", "-rf", root, check=False)


FRONTENDS = """
web = FrontendSpec("172.30.0.10", 80, "TCP", (BackendSpec("10.1.0.5", 8080, 1), BackendSpec("10.2.0.6", 8080, 2)))
dns = FrontendSpec("172.30.0.11", 53, "UDP", (BackendSpec("10.1.0.7", 5353, 1), BackendSpec("10.2.0.8", 5353, 2)), 7)
ipcache = [IPCacheSpec("10.1.0.5/32", 1001, "0.0.0.0", 1), IPCacheSpec("10.2.0.0/24", 2, "198.18.1.13", 2)]
"""


def test_sync_writes_what_was_asked_and_a_restarted_agent_keeps_the_ids(pin_root):
    first = in_host(
        FRONTENDS
        + f"""
sync = DatapathSync(bpf_maps.DatapathMaps({pin_root!r}))
sync.adopt()
services = sync.sync_services([web, dns])
cache = sync.sync_ipcache(ipcache)
print(json.dumps({{"written": [services.written, cache.written], "ids": sorted(sync.backend_ids().items()),
                  "rev_nat": sorted(sync.rev_nat_indexes().items()),
                  "services": sorted(describe_services(sync.maps).items()), "ipcache": describe_ipcache(sync.maps)}}))
"""
    )
    assert first["written"] == [{"cm_lb_svc": 6, "cm_lb_be": 4, "cm_lb_revnat": 2}, {"cm_ipcache": 2}]
    assert first["services"] == [
        [["172.30.0.10", 80, "TCP"], [["10.1.0.5", 8080], ["10.2.0.6", 8080]]],
        [["172.30.0.11", 53, "UDP"], [["10.1.0.7", 5353], ["10.2.0.8", 5353]]],
    ]
    assert first["ipcache"] == {"10.1.0.5/32": [1001, "0.0.0.0"], "10.2.0.0/24": [2, "198.18.1.13"]}
    # a new agent process on the same pins: the same IDs, and nothing to write
    second = in_host(
        FRONTENDS
        + f"""
maps = bpf_maps.DatapathMaps({pin_root!r})
sync = DatapathSync(maps)
sync.adopt()
ids, rev_nat = sorted(sync.backend_ids().items()), sorted(sync.rev_nat_indexes().items())
again = [sync.sync_services([web, dns]).writes, sync.sync_ipcache(ipcache).writes]
grown = FrontendSpec(web.ip, web.port, web.protocol, web.backends + (BackendSpec("10.2.0.9", 8080, 2),))
changed = sync.sync_services([grown, dns])
head = maps.service.lookup({{"address": "172.30.0.11", "dport": 53, "slot": 0, "proto": 17}})
backend = maps.backend.lookup({{"backend_id": sync.backend_ids()[("10.2.0.9", 8080, "TCP")]}})
print(json.dumps({{"ids": ids, "rev_nat": rev_nat, "again": again, "changed": [changed.written, changed.deleted],
                  "ids_after": sorted(sync.backend_ids().items()), "head": head, "backend": backend,
                  "web": describe_services(maps)[("172.30.0.10", 80, "TCP")]}}))
"""
    )
    assert second["ids"] == first["ids"] and second["rev_nat"] == first["rev_nat"]
    assert second["again"] == [0, 0]
    assert second["changed"] == [
        {"cm_lb_svc": 2, "cm_lb_be": 1, "cm_lb_revnat": 0},
        {"cm_lb_svc": 0, "cm_lb_be": 0, "cm_lb_revnat": 0},
    ]
    assert [pair for pair in second["ids_after"] if pair in first["ids"]] == first["ids"]
    assert second["web"] == [["10.1.0.5", 8080], ["10.2.0.6", 8080], ["10.2.0.9", 8080]]
    assert second["head"]["count"] == 2 and second["head"]["flags"] == 7
    assert second["backend"] == {"address": "10.2.0.9", "port": 8080, "proto": 6, "flags": 1, "cluster_id": 2}


def test_scale_5000_global_services_with_4_backends_in_each_of_two_clusters(pin_root):
    out = in_host(
        f"""
frontends = [
    FrontendSpec(f"172.{{16 + i // 65536}}.{{i // 256 % 256}}.{{i % 256}}", 80, "TCP",
                 tuple(BackendSpec(f"10.{{c}}.{{i // 64}}.{{(i % 64) * 4 + n}}", 8080, c)
                       for c in (1, 2) for n in range(4)), 3)
    for i in range(5000)
]
maps = bpf_maps.DatapathMaps({pin_root!r})
sync = DatapathSync(maps)
t = time.perf_counter(); sync.adopt(); result = sync.sync_services(frontends); initial = time.perf_counter() - t
t = time.perf_counter(); noop = sync.sync_services(frontends); noop_s = time.perf_counter() - t
changed = list(frontends)
changed[42] = FrontendSpec(changed[42].ip, 80, "TCP", changed[42].backends[:-1], 3)
t = time.perf_counter(); one = sync.sync_services(changed); one_s = time.perf_counter() - t
restarted = DatapathSync(bpf_maps.DatapathMaps({pin_root!r}))
t = time.perf_counter(); restarted.adopt(); adopt_s = time.perf_counter() - t
t = time.perf_counter(); after = restarted.sync_services(changed); after_s = time.perf_counter() - t
described = describe_services(maps)
want = {{(f.ip, 80, "TCP"): sorted((b.ip, b.port) for b in f.backends) for f in changed}}
print(json.dumps({{"initial": initial, "written": result.written, "noop": noop_s, "noop_writes": noop.writes,
                  "one": one_s, "one_writes": one.writes, "adopt": adopt_s, "after": after_s,
                  "after_writes": after.writes, "same_ids": restarted.backend_ids() == sync.backend_ids(),
                  "equal": described == want, "counts": restarted.counts()}}))
"""
    )
    times = (out["initial"], out["noop"] * 1e3, out["one"] * 1e3, out["adopt"], out["after"])
    print(
        "\nscale 5000 x 8: initial %.2f s, no-op resync %.1f ms, one change %.1f ms, adopt %.2f s, "
        "first sync after adopt %.2f s" % times
    )
    assert out["written"] == {"cm_lb_svc": 45000, "cm_lb_be": 40000, "cm_lb_revnat": 5000}
    assert out["equal"] and out["same_ids"]
    assert out["counts"] == {
        "cm_lb_svc": 44999, "cm_lb_be": 39999, "cm_lb_revnat": 5000, "cm_ipcache": 0, "cm_endpoint": 0, "cm_policy": 0
    }  # fmt: skip
    assert out["noop_writes"] == 0 and out["after_writes"] == 0 and out["one_writes"] == 3  # head, last slot, backend
    assert out["initial"] < 10, out
    assert out["noop"] < 1 and out["one"] < 1, out


def test_traffic_follows_what_the_sync_writes(lab_host, pin_root):
    playbook(PREFIX, str(lab_host / "cni.yml"))
    pods = {}
    for name in ("client", "backend-a", "backend-b"):
        pods[name] = lab("pod", "add", HOST, name, prefix=PREFIX).stdout.strip().splitlines()[-1]
    veths = [json.loads(run_in(PREFIX, HOST, "cat", f"/run/clustermesh/pods/{n}.json").stdout)["result"]["interfaces"]
             [0]["name"] for n in pods]  # fmt: skip
    servers = [
        subprocess.Popen(  # noqa: S603
            [LAB, "pod", "exec", "--prefix", PREFIX, HOST, name, "--", PYTHON, "-c", SERVER, name],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        for name in ("backend-a", "backend-b")
    ]
    try:
        in_host(
            f"""
with bpf_loader.load({OBJ!r}, pin_root={pin_root!r}) as dp:
    for veth in {veths!r}:
        dp.attach(veth)
print(1)
"""
        )

        def sync_and_connect(backends, count):
            in_host(
                f"""
sync = DatapathSync(bpf_maps.DatapathMaps({pin_root!r}))
sync.sync_services([FrontendSpec({VIP!r}, 80, "TCP", tuple(BackendSpec(ip, 8080, 1) for ip in {backends!r}))])
print(1)
"""
            )
            deadline = time.monotonic() + 10
            while True:  # the servers may still be starting
                proc = lab("pod", "exec", HOST, "client", "--", PYTHON, "-c", TCP_CLIENT, VIP, str(count),
                           prefix=PREFIX, check=False)  # fmt: skip
                if proc.returncode == 0 or time.monotonic() > deadline:
                    break
                time.sleep(0.2)
            assert proc.returncode == 0, proc.stderr
            return json.loads(proc.stdout.strip().splitlines()[-1])

        conns = sync_and_connect([pods["backend-a"], pods["backend-b"]], 30)
        assert {c["name"] for c in conns} == {"backend-a", "backend-b"}
        assert {tuple(c["peer"]) for c in conns} == {(VIP, 80)}
        # backend-a leaves the service (a restarted agent process: adopt, then the diff)
        conns = sync_and_connect([pods["backend-b"]], 10)
        assert {c["name"] for c in conns} == {"backend-b"}
    finally:
        for proc in servers:
            proc.terminate()
        for proc in servers:
            try:
                proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                proc.kill()
