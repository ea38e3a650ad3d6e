"""Global services across two clusters, end to end: the seed's rebel-base / x-wing scenario.

The lab is the shared one of conftest.py (prefix cmsh: cluster1 = c1-n1, c1-n2; cluster2 = c2-n1, c2-n2,
converged with playbooks/site.yml, which installs and starts the node agent meshd on every node).
Backends are lab pods labelled name=rebel-base, one per node, each running the probe echo server on port
80 (it answers with its own name); x-wing pods send requests to their cluster's ClusterIP. The services
are declared with the module global_service (tests/lab/playbooks/rebel_base.yml). Everything is real:
etcd and HAProxy per cluster, the CNI plugin, VXLAN routing, tc programs and pinned maps written by
meshd.

The tests run in file order and share one lab; each leaves the mesh as it found it. The module leaves
its pods and the declared service behind for the next users of the shared lab (test_network_policy.py
reuses the x-wing pods; none of them probes a service).
"""

from __future__ import annotations

import json
import os
import subprocess
import textwrap
import time

import pytest

from .conftest import SHARED_PREFIX, reusing_lab
from .labtools import LAB, PYTHON, REPO_ROOT, lab, playbook, python_in, run_in

pytestmark = pytest.mark.lab
if os.geteuid() != 0:
    pytest.skip("the lab needs root", allow_module_level=True)

PREFIX = SHARED_PREFIX
DECLARE = os.path.join(REPO_ROOT, "tests", "lab", "playbooks", "rebel_base.yml")
COLLECTIONS = os.path.join(REPO_ROOT, "build", "pytest-collections")
BACKENDS = {"c1-n1": "rb-c1a", "c1-n2": "rb-c1b", "c2-n1": "rb-c2a", "c2-n2": "rb-c2b"}
CLUSTER_BACKENDS = {"cluster1": {"rb-c1a", "rb-c1b"}, "cluster2": {"rb-c2a", "rb-c2b"}}
XWING = {"cluster1": ("c1-n1", "xw-c1"), "cluster2": ("c2-n1", "xw-c2")}
CLUSTER_IP = {"cluster1": "172.30.1.10", "cluster2": "172.30.2.10"}
HEALTH_INTERVAL = 1.0  # what rebel_base.yml declares


# --- helpers --------------------------------------------------------------------------------------
def declare(**overrides):
    """(Re)declare default/rebel-base in both clusters; overrides: rebel_affinity / rebel_shared dicts."""
    extra = ["-e", json.dumps(overrides)] if overrides else []
    playbook(PREFIX, DECLARE, *extra)


def requests_code(pod, ip, count, seconds=None):
    """Python run in a lab host: ``count`` connections (or as many as fit in ``seconds``) from ``pod``
    to ip:80; prints {"counts": {server: n}, "failures": [...], "total": n}."""
    return textwrap.dedent(
        f"""
        import json, time
        from ansible_collections.clustermesh.core.plugins.module_utils.probe import enter_netns, tcp_probe
        enter_netns("/run/netns/cm-pod-{pod}")
        counts, failures, total = {{}}, [], 0
        deadline = time.monotonic() + ({seconds!r} or 1e9)
        while total < {count} and time.monotonic() < deadline:
            total += 1
            result = tcp_probe("{ip}", 80, timeout=2)
            if result["ok"]:
                name = result["reply"]["server"]
                counts[name] = counts.get(name, 0) + 1
            else:
                failures.append("%.3f %s" % (time.monotonic(), result["detail"]))
        print(json.dumps({{"counts": counts, "failures": failures, "total": total}}))
        """
    )


def send(cluster, count=200):
    host, pod = XWING[cluster]
    return python_in(PREFIX, host, requests_code(pod, CLUSTER_IP[cluster], count))


def start_loop(cluster, seconds):
    """The same requests in the background for ``seconds`` (as many as fit); finish with :func:`finish`."""
    host, pod = XWING[cluster]
    code = "import sys; sys.path.insert(0, %r)\n" % COLLECTIONS + requests_code(
        pod, CLUSTER_IP[cluster], 10**9, seconds
    )
    return subprocess.Popen(
        [LAB, "exec", "--prefix", PREFIX, host, "--", PYTHON, "-c", code],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def finish(proc, timeout=120):
    out, err = proc.communicate(timeout=timeout)
    assert proc.returncode == 0, err
    return json.loads(out.strip().splitlines()[-1])


def servers(answer):
    return set(answer["counts"])


def wait_for(predicate, timeout, what, interval=0.2):
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        last = predicate()
        if last:
            return last
        time.sleep(interval)
    raise AssertionError("timed out after %.0f s waiting for %s (last: %r)" % (timeout, what, last))


MAPS_CODE = """
import json
from ansible_collections.clustermesh.core.plugins.module_utils.agent_config import load_agent_config
from ansible_collections.clustermesh.core.plugins.module_utils.bpf_maps import DatapathMaps
from ansible_collections.clustermesh.core.plugins.module_utils.datapath_sync import describe_services
config = load_agent_config("/etc/clustermesh/agent.yaml")
with DatapathMaps(config.pin_dir) as maps:
    found = describe_services(maps)
print(json.dumps({"%s:%d/%s" % key: sorted("%s:%d" % b for b in value) for key, value in found.items()}))
"""


def service_map(host):
    """What the node's pinned maps load-balance each frontend to: {"ip:port/PROTO": ["ip:port", ...]}."""
    return python_in(PREFIX, host, MAPS_CODE)


def pod_ips():
    answer = json.loads(lab("pod", "list", "--json", prefix=PREFIX).stdout)
    return {pod["name"]: pod["ip"] for pod in answer}


def expected_map(cluster, backend_pods):
    ips = pod_ips()
    return {"%s:80/TCP" % CLUSTER_IP[cluster]: sorted("%s:80" % ips[pod] for pod in backend_pods)}


def frontend_of(host, cluster):
    return service_map(host).get("%s:80/TCP" % CLUSTER_IP[cluster])


def wait_for_frontend(host, cluster, backend_pods, timeout, what):
    """Until ``host``'s maps send its cluster's ClusterIP to exactly ``backend_pods``."""
    want = expected_map(cluster, backend_pods)["%s:80/TCP" % CLUSTER_IP[cluster]]
    wait_for(lambda: frontend_of(host, cluster) == want, timeout, what)


def meshctl(host, command):
    proc = run_in(PREFIX, host, "/var/lib/clustermesh/agent/bin/meshctl", command, "--json")
    return json.loads(proc.stdout)


def agent_status(host):
    proc = run_in(PREFIX, host, "/var/lib/clustermesh/agent/bin/meshctl", "status", "--json", check=False)
    if proc.returncode != 0:
        return None
    return json.loads(proc.stdout)


def server_python(host, code):
    return python_in(
        PREFIX,
        host,
        "from ansible_collections.clustermesh.core.plugins.module_utils import probe\n" + textwrap.dedent(code),
    )


def start_backend(host):
    pod = BACKENDS[host]
    server_python(host, f"probe.start_server({pod!r}, '/run/netns/cm-pod-{pod}', port=80)")


def stop_backend(host):
    server_python(host, f"probe.stop_server({BACKENDS[host]!r})")


# --- the mesh ----------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def mesh(shared_mesh):
    if reusing_lab():
        return  # a developer's shortcut: the lab of a previous run, kept (nothing is set up or removed)
    for host, pod in BACKENDS.items():
        lab("pod", "add", host, pod, "--labels", "name=rebel-base", prefix=PREFIX)
        start_backend(host)
    for host, pod in XWING.values():
        lab("pod", "add", host, pod, "--labels", "name=x-wing", prefix=PREFIX)
    declare()
    for cluster, (host, _pod) in XWING.items():
        want = expected_map(cluster, set(BACKENDS.values()))
        wait_for(lambda host=host, want=want: service_map(host) == want, 30, f"{host}'s maps to list 4 backends")


# --- the scenarios ----------------------------------------------------------------------------------
def test_requests_to_the_local_cluster_ip_reach_all_four_backends(mesh):
    for cluster in ("cluster1", "cluster2"):
        answer = send(cluster, 200)
        assert answer["failures"] == [], answer
        assert servers(answer) == set(BACKENDS.values()), answer
        for server, count in answer["counts"].items():
            assert count >= 20, f"{cluster}: {server} got {count} of 200 (< 10 %): {answer['counts']}"


def test_agent_reports_the_mesh(mesh):
    status = agent_status("c1-n1")
    assert status["synced"] is True
    assert status["clusters"]["cluster2"]["connected"] is True
    services = meshctl("c1-n1", "services")
    (row,) = [r for r in services if r["name"] == "rebel-base"]
    assert {b["cluster"] for b in row["backends"]} == {"cluster1", "cluster2"}
    endpoints = meshctl("c1-n1", "endpoints")
    assert all(e["identity"] for e in endpoints), endpoints
    identities = meshctl("c1-n1", "identities")
    assert {i["cluster"] for i in identities} == {"cluster1", "cluster2"}
    # what the agents wrote into cluster1's kvstore, in Cilium's layout
    written = python_in(PREFIX, "c1-n1", kvstore_code(KVSTORE_SUMMARY))
    assert written["nodes"] == {"c1-n1": True, "c1-n2": True}, written  # each under its agent's lease
    assert written["heartbeat_age_s"] < 30, written
    assert written["synced"] and all(key.startswith("cilium/synced/cluster1/") for key in written["synced"]), written
    ips = pod_ips()
    assert written["ipcache"][ips["rb-c1a"]]["ID"] >= 65536 and written["ipcache"][ips["rb-c1a"]]["ID"] < 131072
    assert set(written["services"]) == {"cilium/state/services/v1/cluster1/default/rebel-base"}


KVSTORE_SUMMARY = """
import datetime, json
from ansible_collections.clustermesh.core.plugins.module_utils import kvstore_layout as layout
nodes = {kv.key.rsplit("/", 1)[1]: kv.lease != 0 for kv in client.get_prefix(layout.nodes_prefix("cluster1"))}
beat = layout.decode_timestamp(client.get(layout.HEARTBEAT_KEY).value)
age = (datetime.datetime.now(datetime.timezone.utc) - beat).total_seconds()
synced = [kv.key for kv in client.get_prefix("cilium/synced/cluster1/")]
ipcache = {kv.key.rsplit("/", 1)[1]: json.loads(kv.value) for kv in client.get_prefix(layout.ip_prefix())}
services = [kv.key for kv in client.get_prefix(layout.services_prefix("cluster1"))]
print(json.dumps({"nodes": nodes, "heartbeat_age_s": age, "synced": synced, "ipcache": ipcache, "services": services}))
"""


def test_affinity_local_fails_over_to_the_remote_cluster_and_back(mesh):
    declare(rebel_affinity={"cluster1": "local"})
    try:
        wait_for_frontend("c1-n1", "cluster1", CLUSTER_BACKENDS["cluster1"], 15, "cluster1 to use only its own")
        answer = send("cluster1", 100)
        assert answer["failures"] == [] and servers(answer) == CLUSTER_BACKENDS["cluster1"], answer

        stopped = time.monotonic()
        for host in ("c1-n1", "c1-n2"):
            stop_backend(host)
        wait_for(
            lambda: servers(send("cluster1", 10)) == CLUSTER_BACKENDS["cluster2"],
            HEALTH_INTERVAL + 1 + 2,  # + 2: the requests themselves and the lab's slow process start
            "cluster1's requests to reach cluster2",
            interval=0.05,
        )
        took = time.monotonic() - stopped
        assert took <= HEALTH_INTERVAL + 1 + 1.0, f"failover took {took:.2f} s"
        answer = send("cluster1", 50)
        assert answer["failures"] == [] and servers(answer) == CLUSTER_BACKENDS["cluster2"], answer

        for host in ("c1-n1", "c1-n2"):
            start_backend(host)
        wait_for(
            lambda: servers(send("cluster1", 20)) == CLUSTER_BACKENDS["cluster1"],
            HEALTH_INTERVAL + 5,
            "cluster1's requests to come back to cluster1",
        )
    finally:
        for host in ("c1-n1", "c1-n2"):
            start_backend(host)
        declare()


def test_shared_false_keeps_a_clusters_backends_to_itself(mesh):
    declare(rebel_shared={"cluster2": False})
    try:
        wait_for_frontend("c1-n1", "cluster1", CLUSTER_BACKENDS["cluster1"], 15, "cluster1 to drop cluster2's backends")
        answer = send("cluster1", 100)
        assert answer["failures"] == [] and servers(answer) == CLUSTER_BACKENDS["cluster1"], answer
        answer = send("cluster2", 200)
        assert answer["failures"] == [] and servers(answer) == set(BACKENDS.values()), answer
    finally:
        declare()


HAND_WRITTEN = {
    # as a Cilium agent of cluster2 writes it (pkg/clustermesh/store): backends = the two cluster2 pods
    "cluster": "cluster2",
    "namespace": "default",
    "name": "hand-made",
    "frontends": {"172.30.2.20": {"http": {"Protocol": "TCP", "Port": 80}}},
    "labels": {},
    "selector": {"name": "rebel-base"},
    "includeExternal": True,
    "shared": True,
    "clusterID": 2,
}


BROKEN = {"cluster": "cluster2", "namespace": "default", "name": "broken", "clusterID": 7}


def kvstore_code(code):
    return (
        "from ansible_collections.clustermesh.core.plugins.module_utils.kvstore_client import KVStoreClient\n"
        "client = KVStoreClient.from_config_file('/etc/clustermesh/kvstore.yaml')\n" + textwrap.dedent(code)
    )


def test_a_hand_written_cluster_service_is_honoured_and_a_malformed_one_skipped(mesh):
    ips = pod_ips()
    value = dict(
        HAND_WRITTEN, backends={ips[p]: {"http": {"Protocol": "TCP", "Port": 80}} for p in ("rb-c2a", "rb-c2b")}
    )
    key = "cilium/state/services/v1/cluster2/default/hand-made"
    bad_key = "cilium/state/services/v1/cluster2/default/broken"
    python_in(
        PREFIX,
        "c2-n1",
        kvstore_code(
            f"""
            client.put({key!r}, {json.dumps(value)!r})
            client.put({bad_key!r}, {json.dumps(BROKEN)!r})
            """
        ),
    )
    playbook(
        PREFIX,
        DECLARE,
        "-e",
        json.dumps({"rebel_name": "hand-made", "rebel_hosts": "c1-n1", "rebel_cluster_ip": "172.30.1.20"}),
    )
    try:
        wait_for(
            lambda: (
                service_map("c1-n1").get("172.30.1.20:80/TCP")
                == sorted("%s:80" % ips[p] for p in ("rb-c2a", "rb-c2b") + ("rb-c1a", "rb-c1b"))
            ),
            15,
            "cluster1's maps to use the hand-written ClusterService",
        )
        host, pod = XWING["cluster1"]
        answer = python_in(PREFIX, host, requests_code(pod, "172.30.1.20", 60))
        assert answer["failures"] == [] and CLUSTER_BACKENDS["cluster2"] <= servers(answer), answer
        clusters = {row["name"]: row for row in meshctl("c1-n1", "clusters")}
        rejected = [r for r in clusters["cluster2"]["last_rejections"] if r["key"] == bad_key]
        assert rejected, clusters["cluster2"]
        metrics = run_in(PREFIX, "c1-n1", PYTHON, "-c", METRICS).stdout
        assert 'clustermesh_remote_cluster_failures_total{cluster="cluster2",reason="invalid_value"}' in metrics
        assert agent_status("c1-n1")["synced"] is True  # still running
    finally:
        python_in(PREFIX, "c2-n1", kvstore_code(f"client.delete({key!r}); client.delete({bad_key!r})"))
        playbook(
            PREFIX,
            DECLARE,
            "-e",
            json.dumps({"rebel_name": "hand-made", "rebel_hosts": "c1-n1", "rebel_state": "absent"}),
        )


METRICS = "import urllib.request; print(urllib.request.urlopen('http://127.0.0.1:9966/metrics').read().decode())"


PROXY_CODE = """
import json, os
from ansible_collections.clustermesh.core.plugins.module_utils import daemon
path = "/run/clustermesh/haproxy.spec.json"
if not os.path.exists(path):
    print(json.dumps(False))
else:
    with open(path) as f:
        spec = daemon.DaemonSpec("haproxy", json.load(f)["argv"])
    {action}
    print(json.dumps(True))
"""


def proxies(action):
    """Stop or start every kvstore proxy of cluster2 (by its supervisor's pidfile)."""
    code = "daemon.stop_supervised(spec)" if action == "stop" else "daemon.start_supervised(spec)"
    return [host for host in ("c2-n1", "c2-n2") if python_in(PREFIX, host, PROXY_CODE.replace("{action}", code))]


def test_remote_proxy_down_local_traffic_unharmed_and_maps_recover(mesh):
    """Rule (docs/agent.md): a remote cluster whose kvstore cannot be reached keeps its last known
    backends in the maps (its pods are still reachable through pod routing; only its kvstore is away)."""
    before = service_map("c1-n1")
    assert proxies("stop"), "cluster2 has no kvstore proxy to stop"
    try:
        wait_for(
            lambda: not agent_status("c1-n1")["clusters"]["cluster2"]["connected"], 20, "c1-n1 to see cluster2 away"
        )
        answer = finish(start_loop("cluster1", 5))
        assert answer["failures"] == [], answer["failures"][:5]
        assert CLUSTER_BACKENDS["cluster1"] <= servers(answer)
        assert service_map("c1-n1") == before  # remote backends kept while the proxy is away
    finally:
        proxies("start")
    wait_for(lambda: agent_status("c1-n1")["clusters"]["cluster2"]["synced"], 30, "c1-n1 to reconnect to cluster2")
    assert service_map("c1-n1") == expected_map("cluster1", set(BACKENDS.values()))


def test_kill_9_of_the_agent_breaks_no_connection_and_maps_come_back(mesh):
    loop = start_loop("cluster1", 8)
    time.sleep(1.0)
    run_in(PREFIX, "c1-n1", "sh", "-c", "kill -9 $(cat /run/clustermesh/meshd.pid)")
    answer = finish(loop)
    assert answer["failures"] == [], answer["failures"][:5]
    assert servers(answer) == set(BACKENDS.values())
    wait_for(lambda: (agent_status("c1-n1") or {}).get("synced"), 30, "the restarted agent to sync")
    assert service_map("c1-n1") == expected_map("cluster1", set(BACKENDS.values()))


def test_clusters_d_file_added_and_removed_at_runtime(mesh):
    path = "/etc/clustermesh/clusters.d/cluster2"
    parked = "/etc/clustermesh/cluster2.parked"
    run_in(PREFIX, "c1-n1", "mv", path, parked)
    try:
        wait_for(lambda: "cluster2" not in agent_status("c1-n1")["clusters"], 10, "cluster2 to be disconnected")
        wait_for(
            lambda: service_map("c1-n1") == expected_map("cluster1", CLUSTER_BACKENDS["cluster1"]),
            10,
            "cluster2's backends to leave c1-n1's maps",
        )
    finally:
        run_in(PREFIX, "c1-n1", "mv", parked, path)
    wait_for(
        lambda: (agent_status("c1-n1")["clusters"].get("cluster2") or {}).get("synced"), 20, "cluster2 to reconnect"
    )
    wait_for(
        lambda: service_map("c1-n1") == expected_map("cluster1", set(BACKENDS.values())),
        10,
        "cluster2's backends to come back",
    )
