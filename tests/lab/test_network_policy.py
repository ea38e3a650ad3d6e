"""Network policy across two clusters, end to end (issue 6's acceptance list).

The lab is the shared one of conftest.py (prefix cmsh: cluster1 = c1-n1, c1-n2; cluster2 = c2-n1, c2-n2,
converged with playbooks/site.yml: etcd, HAProxy, CNI, tunnel routing, the agent meshd on every node);
the pods of these tests live on c1-n1 and c2-n1, which share a segment. Pods are made by the CNI
plugin: x-wing and rebel-base in each cluster (the x-wing pods are test_global_services.py's when it ran
first: same names, hosts and labels); every rebel-base runs the probe echo server on ports 80 and 81
(it answers with its own name, so an answer proves the reply came back through the policy).
Policies are imported with the module network_policy (tests/lab/playbooks/policy.yml);
the agents compile them against the identities of both clusters and the tc programs enforce them.

The tests run in file order and share one lab; each leaves no policy behind, and the module removes
its rebel-base pods at the end.
"""

from __future__ import annotations

import json
import os
import subprocess
import textwrap
import time

import pytest

from ansible_collections.clustermesh.core.tests.policy_examples import (
    ALLOW_CROSS_CLUSTER,
    REBEL_BASE_INGRESS,
    REBEL_BASE_INGRESS_K8S,
    policy,
)

from .conftest import SHARED_PREFIX, reusing_lab
from .labtools import LAB, PYTHON, REPO_ROOT, lab, playbook, python_in, run_in

pytestmark = pytest.mark.lab
if os.geteuid() != 0:
    pytest.skip("the lab needs root", allow_module_level=True)

PREFIX = SHARED_PREFIX
IMPORT = os.path.join(REPO_ROOT, "tests", "lab", "playbooks", "policy.yml")
NODE = {"cluster1": "c1-n1", "cluster2": "c2-n1"}
PODS = {
    "xw-c1": ("c1-n1", "name=x-wing"),
    "rb-c1": ("c1-n1", "name=rebel-base"),
    "xw-c2": ("c2-n1", "name=x-wing"),
    "rb-c2": ("c2-n1", "name=rebel-base"),
}
PORTS = (80, 81)
MESHCTL = "/var/lib/clustermesh/agent/bin/meshctl"
CONNECT_TIMEOUT = 0.5  # a denied SYN is dropped: the connect times out


# --- helpers --------------------------------------------------------------------------------------
def pod_ips():
    answer = json.loads(lab("pod", "list", "--json", prefix=PREFIX).stdout)
    return {pod["name"]: pod["ip"] for pod in answer}


PROBE_CODE = """
import json, os
from ansible_collections.clustermesh.core.plugins.module_utils.probe import enter_netns, tcp_probe
checks = {checks!r}
children = {{}}
for index, (pod, ip, port) in enumerate(checks):
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # one child per check: it enters the pod's namespace
        os.close(read)
        enter_netns("/run/netns/cm-pod-" + pod)
        result = tcp_probe(ip, port, timeout={timeout!r})
        server = (result.get("reply") or {{}}).get("server") if result["ok"] else None
        os.write(write, json.dumps(server).encode())
        os._exit(0)
    os.close(write)
    children[index] = (pid, read)
answers = []
for index in range(len(checks)):
    pid, read = children[index]
    data = b""
    while True:
        chunk = os.read(read, 4096)
        if not chunk:
            break
        data += chunk
    os.waitpid(pid, 0)
    answers.append(json.loads(data or b"null"))
print(json.dumps(answers))
"""


def reach(paths):
    """{(client pod, server pod, port): True when the server answered (its echo came back)}."""
    ips = pod_ips()
    by_host = {}
    for client, server, port in paths:
        by_host.setdefault(PODS.get(client, (NODE_OF.get(client),))[0], []).append((client, server, port))
    observed = {}
    for host, checks in by_host.items():
        answers = python_in(
            PREFIX,
            host,
            PROBE_CODE.format(checks=[(c, ips[s], p) for c, s, p in checks], timeout=CONNECT_TIMEOUT),
        )
        for (client, server, port), answer in zip(checks, answers, strict=True):
            observed[(client, server, port)] = answer == f"{server}-{port}"
    return observed


NODE_OF: dict[str, str] = {}  # pods made by a test, beyond PODS


def expect(matrix, timeout=10.0):
    """Until every path of ``matrix`` ({(client, server, port): allowed}) is as expected."""
    deadline = time.monotonic() + timeout
    while True:
        observed = reach(list(matrix))
        wrong = {path: observed[path] for path in matrix if observed[path] != matrix[path]}
        if not wrong:
            return
        if time.monotonic() > deadline:
            lines = [
                "%s -> %s:%d expected %s, observed %s"
                % (c, s, p, "allow" if matrix[(c, s, p)] else "deny", "allow" if allowed else "deny")
                for (c, s, p), allowed in sorted(wrong.items())
            ]
            raise AssertionError("after %.0f s:\n%s" % (timeout, "\n".join(lines)))
        time.sleep(0.3)


def every_path(allowed=True):
    return {(c, s, 80): allowed for c in PODS for s in PODS if s.startswith("rb-") and c != s}


def import_policies(cluster, documents, check=True):
    return playbook(
        PREFIX,
        IMPORT,
        "-e",
        json.dumps({"policy_host": NODE[cluster], "policy_definition": documents}),
        check=check,
    )


def meshctl(host, *args):
    return json.loads(run_in(PREFIX, host, MESHCTL, *args, "--json").stdout)


MAPS_CODE = """
import json
from ansible_collections.clustermesh.core.plugins.module_utils.agent_config import load_agent_config
from ansible_collections.clustermesh.core.plugins.module_utils.bpf_maps import DatapathMaps
from ansible_collections.clustermesh.core.plugins.module_utils.datapath_sync import describe_ipcache
config = load_agent_config("/etc/clustermesh/agent.yaml")
with DatapathMaps(config.pin_dir) as maps:
    print(json.dumps({"enforced": sum(1 for _k, v in maps.endpoint.items() if v["flags"]),
                      "policy": len(list(maps.policy.keys())),
                      "ipcache": {k: v[0] for k, v in describe_ipcache(maps).items()}}))
"""


def maps_of(host):
    return python_in(PREFIX, host, MAPS_CODE)


@pytest.fixture(scope="module")
def mesh(shared_mesh):
    if reusing_lab():
        yield
        return
    existing = pod_ips()
    made = [pod for pod in PODS if pod not in existing]
    code = "from ansible_collections.clustermesh.core.plugins.module_utils import probe\n"
    try:
        for pod in made:
            host, labels = PODS[pod]
            lab("pod", "add", host, pod, "--labels", labels, prefix=PREFIX)
        for pod, (host, _labels) in PODS.items():
            if pod.startswith("rb-"):
                for port in PORTS:
                    python_in(
                        PREFIX,
                        host,
                        code + f"probe.start_server('{pod}-{port}', '/run/netns/cm-pod-{pod}', port={port})",
                    )
        yield
    finally:
        for pod in made:
            if pod.startswith("rb-"):  # rebel-base pods would join test_global_services.py's service
                host = PODS[pod][0]
                stop = "".join(f"probe.stop_server('{pod}-{port}')\n" for port in PORTS)
                python_in(PREFIX, host, code + stop, check=False)
                lab("pod", "del", host, pod, prefix=PREFIX, check=False)


@pytest.fixture
def clean(mesh):
    """No policy in either cluster after the test (one run: each node empties its own cluster)."""
    yield
    playbook(PREFIX, IMPORT, "-e", json.dumps({"policy_host": ",".join(NODE.values()), "policy_definition": []}))


# --- the scenarios ----------------------------------------------------------------------------------
def test_without_policies_every_pod_reaches_every_rebel_base(mesh):
    matrix = every_path()
    matrix.update({("xw-c1", "rb-c2", 81): True, ("xw-c2", "rb-c1", 81): True})
    expect(matrix, timeout=20)


def test_the_seed_example_allows_x_wing_of_cluster1_only_the_rebel_base_of_cluster2(clean):
    import_policies("cluster1", [ALLOW_CROSS_CLUSTER])
    matrix = every_path()
    matrix[("xw-c1", "rb-c1", 80)] = False  # same cluster, same node: not allowed by the policy
    expect(matrix)

    # what the agent says about it
    ips = pod_ips()
    report = meshctl("c1-n1", "policy", ips["xw-c1"])
    assert report["enforced"] == {"ingress": False, "egress": True}, report
    assert report["policies"] == ["default/CiliumNetworkPolicy/allow-cross-cluster"], report
    peers = {row["peer"] for row in report["entries_by_peer"]}
    assert any("name=rebel-base" in p and "io.cilium.k8s.policy.cluster=cluster2" in p for p in peers), report
    assert not any("cluster1" in p for p in peers), report
    drops = meshctl("c1-n1", "drops")
    assert any(
        d["endpoint"] == ips["xw-c1"]
        and d["direction"] == "egress"
        and d["reason"] == "policy"
        and d["port"] == 80
        and "name=rebel-base" in d["peer"]
        and d["packets"] >= 1
        for d in drops
    ), drops

    # a policy imported in cluster1 changes nothing in cluster2
    assert meshctl("c2-n1", "status")["policies"] == []
    assert maps_of("c2-n1")["enforced"] == 0 and maps_of("c2-n1")["policy"] == 0


def check_rebel_base_ingress_matrix():
    matrix = {
        ("xw-c1", "rb-c2", 80): True,  # the one allowed peer and port; its replies come back
        ("xw-c1", "rb-c2", 81): False,  # other port
        ("xw-c2", "rb-c2", 80): False,  # x-wing, but of cluster2
        ("rb-c1", "rb-c2", 80): False,  # cluster1, but not x-wing
        ("xw-c2", "rb-c1", 80): True,  # cluster1's rebel-base: the policy lives in cluster2 only
        ("xw-c1", "rb-c1", 81): True,
    }
    expect(matrix)


def test_an_ingress_policy_on_rebel_base_in_cluster2_admits_only_x_wing_of_cluster1_on_tcp_80(clean):
    import_policies("cluster2", [REBEL_BASE_INGRESS])
    check_rebel_base_ingress_matrix()
    drops = meshctl("c2-n1", "drops")
    ips = pod_ips()
    assert any(d["endpoint"] == ips["rb-c2"] and d["direction"] == "ingress" and d["port"] == 81 for d in drops), drops


def test_the_equivalent_kubernetes_network_policy_gives_the_same_matrix(clean):
    import_policies("cluster2", [REBEL_BASE_INGRESS_K8S])
    check_rebel_base_ingress_matrix()
    ips = pod_ips()
    report = meshctl("c2-n1", "policy", ips["rb-c2"])
    assert report["policies"] == ["default/NetworkPolicy/rebel-base-from-cluster1"], report


WATCH_CODE = """
import json, sys, time
sys.path.insert(0, {collections!r})
from ansible_collections.clustermesh.core.plugins.module_utils.agent_config import load_agent_config
from ansible_collections.clustermesh.core.plugins.module_utils.bpf_maps import DatapathMaps
from ansible_collections.clustermesh.core.plugins.module_utils.datapath_sync import describe_ipcache
with DatapathMaps(load_agent_config("/etc/clustermesh/agent.yaml").pin_dir) as maps:
    before = set(describe_ipcache(maps))
    print("ready", flush=True)
    deadline = time.time() + 20
    while time.time() < deadline:
        new = {{p: v[0] for p, v in describe_ipcache(maps).items() if p not in before and p.startswith("10.1.")}}
        allowed = {{k["identity"] for k in maps.policy.keys() if k["dport"] == 80 and k["direction"] == 0}}
        if new and set(new.values()) <= allowed:
            print(json.dumps({{"at": time.time(), "new": new}}), flush=True)
            break
        time.sleep(0.002)
"""


def test_a_new_remote_endpoint_is_allowed_within_a_second_and_its_entry_goes_with_it(clean):
    import_policies("cluster2", [REBEL_BASE_INGRESS])
    check_rebel_base_ingress_matrix()
    # c2-n1 watches its own maps for the new pod's ipcache entry and the allow entry of its identity
    code = WATCH_CODE.format(collections=os.path.join(REPO_ROOT, "build", "pytest-collections"))
    watcher = subprocess.Popen(
        [LAB, "exec", "--prefix", PREFIX, "c2-n1", "--", PYTHON, "-c", code], stdout=subprocess.PIPE, text=True
    )
    try:
        assert watcher.stdout.readline().strip() == "ready"
        # new labels: a new identity in cluster1, which cluster2's agent must learn and allow
        NODE_OF["xw-red"] = "c1-n1"
        lab("pod", "add", "c1-n1", "xw-red", "--labels", "name=x-wing,squadron=red", prefix=PREFIX)
        added = time.time()  # the CNI ADD is done: the agent of c1-n1 knows the pod
        line = watcher.stdout.readline()
        assert line, "c2-n1's maps never allowed the new pod's identity"
        seen = json.loads(line)
        ip = pod_ips()["xw-red"]
        assert list(seen["new"]) == [ip + "/32"] and seen["new"][ip + "/32"] >= 65536, seen
        assert seen["at"] - added < 1.0, f"allowed {seen['at'] - added:.3f} s after the pod was added"
        assert reach([("xw-red", "rb-c2", 80)]) == {("xw-red", "rb-c2", 80): True}
    finally:
        watcher.kill()
        watcher.wait()
        lab("pod", "del", "c1-n1", "xw-red", prefix=PREFIX, check=False)
    # gone: cluster2 forgets its address, which then has the world identity (denied by the policy)
    gone = time.monotonic()
    while ip + "/32" in maps_of("c2-n1")["ipcache"]:
        assert time.monotonic() - gone < 3, "cluster2's ipcache still names the removed pod"


def test_a_malformed_policy_is_refused_and_nothing_is_imported(clean):
    import_policies("cluster2", [REBEL_BASE_INGRESS])
    bad = policy(ALLOW_CROSS_CLUSTER)
    bad["spec"]["egress"][0]["toPorts"] = [{"ports": [{"port": "80", "protocol": "TCPP"}]}]
    run = import_policies("cluster2", [ALLOW_CROSS_CLUSTER, bad], check=False)
    assert run.returncode != 0, run.output
    assert "spec.egress[0].toPorts[0].ports[0].protocol" in run.output and "TCPP" in run.output, run.output
    assert meshctl("c2-n1", "status")["policies"] == ["default/CiliumNetworkPolicy/rebel-base-from-cluster1"]
    check_rebel_base_ingress_matrix()


BAD_VALUE_CODE = """
from ansible_collections.clustermesh.core.plugins.module_utils import kvstore_layout as layout
client.put(layout.policy_key("default", "CiliumNetworkPolicy", "written-by-hand"), b'{"kind": "CiliumNetworkPolicy"')
print("{}")
"""


def test_bad_data_in_the_kvstore_is_skipped_and_reported(clean):
    import_policies("cluster2", [REBEL_BASE_INGRESS])
    python_in(PREFIX, "c2-n1", kvstore_code(BAD_VALUE_CODE))
    deadline = time.monotonic() + 5
    while True:
        status = meshctl("c2-n1", "status")
        if status["policy_rejections"]:
            break
        assert time.monotonic() < deadline, status
        time.sleep(0.2)
    (why,) = status["policy_rejections"].values()
    assert "written-by-hand" in why or "JSON" in why or "json" in why, why
    assert status["policies"] == ["default/CiliumNetworkPolicy/rebel-base-from-cluster1"]
    check_rebel_base_ingress_matrix()


def kvstore_code(body):
    return (
        "from ansible_collections.clustermesh.core.plugins.module_utils.kvstore_client import KVStoreClient\n"
        "client = KVStoreClient.from_config_file('/etc/clustermesh/kvstore.yaml')\n" + textwrap.dedent(body)
    )


CONNECTIVITY = os.path.join(REPO_ROOT, "playbooks", "connectivity.yml")
DEATHSTAR_FROM_CLUSTER2_ONLY = {
    "apiVersion": "cilium.io/v2",
    "kind": "CiliumNetworkPolicy",
    "metadata": {"name": "deathstar-from-cluster2"},
    "spec": {
        "endpointSelector": {"matchLabels": {"class": "deathstar"}},
        "ingress": [{"fromEndpoints": [{"matchLabels": {"io.cilium.k8s.policy.cluster": "cluster2"}}]}],
    },
}


def test_connectivity_playbook_checks_the_expected_matrix(clean, tmp_path):
    """connectivity.yml with connectivity_expect: the policy's matrix passes, a wrong one fails naming the path."""
    import_policies("cluster2", [DEATHSTAR_FROM_CLUSTER2_ONLY])
    common = {
        "connectivity_pod_labels": {"class": "deathstar"},
        "connectivity_services": False,
        "connectivity_report": str(tmp_path / "report.json"),
    }
    # the policy admits only cluster2 into cluster2's probe pods (c2-n1 and c2-n2)
    right = dict(common, connectivity_expect=[{"from": "cluster1", "to": "cluster2", "expect": "deny"}])
    run = playbook(PREFIX, CONNECTIVITY, "-e", json.dumps(right), check=False)
    assert run.returncode == 0, run.output
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["matrix"]["differences"] == [], report["matrix"]
    # the same mesh against the default (all allowed): the denied path is reported, the play fails
    wrong = dict(common, connectivity_cleanup=True)
    run = playbook(PREFIX, CONNECTIVITY, "-e", json.dumps(wrong), check=False)
    assert run.returncode != 0
    assert "c1-n1 -> c2-n1 (" in run.output, run.output  # the failure line of the denied path
    assert "c2-n1 -> c1-n1 (" not in run.output, run.output  # the other direction is allowed
