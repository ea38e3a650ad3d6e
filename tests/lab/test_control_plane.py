"""The control plane on lab hosts, end to end: site.yml builds etcd + HAProxy per cluster and joins
the clusters; remote access goes through the proxy and is read-only; onboarding a third cluster
touches only join files and etcd users on the others; a bad inventory changes nothing.

The lab is the shared one of conftest.py (prefix cmsh, the default lab converged with site.yml once);
this module runs after the other users of that lab (it changes the mesh: a third cluster comes and
goes). Real etcd, real HAProxy, real TLS, in real network namespaces.
"""

from __future__ import annotations

import os
import subprocess
import time

import pytest
import yaml

from .conftest import SHARED_PREFIX
from .labtools import REPO_ROOT, inventory_path, lab, playbook, python_in, run_in

pytestmark = pytest.mark.lab
if os.geteuid() != 0:
    pytest.skip("the lab needs root", allow_module_level=True)

PREFIX = SHARED_PREFIX
SITE = os.path.join(REPO_ROOT, "playbooks", "site.yml")
TWO_CLUSTERS = os.path.join(REPO_ROOT, "tools", "labkit", "default-topology.yml")

# What a node of cluster2 does with the files cluster1 gave it: read cluster1 through its proxy.
REMOTE_CLIENT = """
import json
from ansible_collections.clustermesh.core.plugins.module_utils.kvstore_client import KVStoreClient
from ansible_collections.clustermesh.core.plugins.module_utils.kvstore_config import load_etcd_config
client = KVStoreClient.from_config(load_etcd_config("/etc/clustermesh/clusters.d/cluster1"), timeout=5)
"""


@pytest.fixture(scope="module")
def converged(shared_mesh):
    """The first site.yml run of the shared lab (test_global_services.py and test_network_policy.py may
    have used the mesh since: pods, a global service, policies imported and removed again)."""
    return shared_mesh


def test_site_converges_then_changes_nothing(converged):
    assert converged.changed, "the first run must change something"
    again = playbook(PREFIX, SITE)
    assert again.changed == [], "second run changed: %s" % again.changed
    check = playbook(PREFIX, SITE, "--check")
    assert check.changed == []


def test_remote_read_is_allowed_and_write_denied_through_the_proxy(converged):
    # cluster1's own admin writes some state (from c1-n2, which is neither member nor proxy)
    python_in(
        PREFIX,
        "c1-n2",
        """
        from ansible_collections.clustermesh.core.plugins.module_utils.kvstore_client import KVStoreClient
        from ansible_collections.clustermesh.core.plugins.module_utils.kvstore_config import load_etcd_config
        c = KVStoreClient.from_config(load_etcd_config("/etc/clustermesh/kvstore.yaml"), timeout=5)
        c.put("cilium/state/nodes/v1/cluster1/c1-n2", '{"Name": "c1-n2"}')
        c.put("cilium/policies/private", "not for remote clusters")
        """,
    )
    result = python_in(
        PREFIX,
        "c2-n2",
        REMOTE_CLIENT
        + """
from ansible_collections.clustermesh.core.plugins.module_utils.kvstore_client import KVStorePermissionDenied
out = {"user": client.user, "endpoints": client.endpoints}
out["state"] = sorted(kv.key for kv in client.get_prefix("cilium/state/").kvs)
out["config"] = client.get("cilium/cluster-config/cluster1").value.decode()
watcher = client.watch_prefix("cilium/state/")
first = next(iter(watcher))
out["watch_initial"] = [e.key for e in first.events] if first.events else sorted(first.snapshot)
watcher.stop()
for name, call in [
    ("put", lambda: client.put("cilium/state/nodes/v1/cluster1/evil", "x")),
    ("delete", lambda: client.delete("cilium/state/nodes/v1/cluster1/c1-n2")),
    ("outside", lambda: client.get("cilium/policies/private")),
    ("other cluster config", lambda: client.get("cilium/cluster-config/cluster2")),
]:
    try:
        call()
        out[name] = "allowed"
    except KVStorePermissionDenied:
        out[name] = "denied"
print(json.dumps(out))
""",
    )
    assert result["user"] == "remote-cluster2"
    assert result["endpoints"] == ["https://198.18.1.11:32379"]  # cluster1's proxy, not etcd itself
    assert "cilium/state/nodes/v1/cluster1/c1-n2" in result["state"]
    assert '"id":1' in result["config"].replace(" ", "")
    assert "cilium/state/nodes/v1/cluster1/c1-n2" in result["watch_initial"]
    assert result["put"] == result["delete"] == result["outside"] == result["other cluster config"] == "denied"


def test_foreign_ca_and_plaintext_are_refused(converged):
    result = python_in(
        PREFIX,
        "c2-n2",
        """
        import json
        from ansible_collections.clustermesh.core.plugins.module_utils.kvstore_client import (
            KVStoreClient, KVStoreTLSError, KVStoreUnavailable)
        out = {}
        # cluster2's own admin certificate is signed by cluster2's CA, which cluster1's etcd does not trust
        c = KVStoreClient(["https://198.18.1.11:32379"],
                          ca_file="/etc/clustermesh/clusters.d/cluster1.etcd-client-ca.crt",
                          cert_file="/etc/clustermesh/pki/admin.crt",
                          key_file="/etc/clustermesh/pki/admin.key", timeout=4)
        try:
            c.get("cilium/.heartbeat"); out["foreign"] = "allowed"
        except KVStoreTLSError:
            out["foreign"] = "tls-refused"
        except KVStoreUnavailable as e:
            out["foreign"] = "unavailable: %s" % e
        p = KVStoreClient(["http://198.18.1.11:32379"], allow_plaintext=True, timeout=4)
        try:
            p.get("cilium/.heartbeat"); out["plaintext"] = "allowed"
        except KVStoreUnavailable:
            out["plaintext"] = "refused"
        print(json.dumps(out))
        """,
    )
    assert result["foreign"] == "tls-refused"
    assert result["plaintext"] == "refused"


def test_remote_watch_resumes_after_etcd_restart(converged):
    watcher = subprocess.Popen(
        [
            os.path.join(REPO_ROOT, "tools", "lab"),
            "exec",
            "--prefix",
            PREFIX,
            "c2-n2",
            "--",
            os.path.join(REPO_ROOT, ".venv", "bin", "python"),
            "-c",
            "import sys; sys.path.insert(0, %r)\n" % os.path.join(REPO_ROOT, "build", "pytest-collections")
            + REMOTE_CLIENT
            + """
import sys, time
w = client.watch_prefix("cilium/state/restart-test/")
deadline = time.monotonic() + 60
for update in w:
    for e in update.events:
        print(e.type, e.key, flush=True)
        if e.key.endswith("/after-9"):
            sys.exit(0)
    if time.monotonic() > deadline:
        sys.exit(1)
""",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        time.sleep(2)  # the watcher lists and starts watching
        writer = """
        from ansible_collections.clustermesh.core.plugins.module_utils.kvstore_client import KVStoreClient
        from ansible_collections.clustermesh.core.plugins.module_utils.kvstore_config import load_etcd_config
        import time
        c = KVStoreClient.from_config(load_etcd_config("/etc/clustermesh/kvstore.yaml"), timeout=10)
        for i in range(10):
            c.put("cilium/state/restart-test/%s-%d" % (PHASE, i), "v")
        """
        python_in(PREFIX, "c1-n2", writer.replace("PHASE", '"before"'))
        # kill -9 etcd on cluster1's member: the supervisor restarts it from the same data dir
        pid = run_in(PREFIX, "c1-n1", "cat", "/run/clustermesh/etcd.pid").stdout.strip()
        run_in(PREFIX, "c1-n1", "kill", "-9", pid)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            new = run_in(PREFIX, "c1-n1", "cat", "/run/clustermesh/etcd.pid", check=False).stdout.strip()
            if new and new != pid:
                break
            time.sleep(0.2)
        python_in(PREFIX, "c1-n2", writer.replace("PHASE", '"after"'), timeout=60)
        out, err = watcher.communicate(timeout=60)
    finally:
        if watcher.poll() is None:
            watcher.kill()
    assert watcher.returncode == 0, err[-3000:]
    seen = [line.split()[1].rsplit("/", 1)[1] for line in out.splitlines() if line.startswith("put ")]
    after = [k for k in seen if k.startswith("after-")]
    assert after == ["after-%d" % i for i in range(10)], seen


def _topology_with_cluster3(path):
    with open(TWO_CLUSTERS) as f:
        topo = yaml.safe_load(f)
    topo["clusters"]["cluster3"] = {"id": 3, "pod_cidr": "10.3.0.0/16"}
    # on an existing segment: a new segment would make tools/lab rebuild the whole lab
    topo["hosts"].append({"name": "c3-n1", "cluster": "cluster3", "segment": "dc2", "address": "198.18.2.31"})
    with open(path, "w") as f:
        yaml.safe_dump(topo, f)
    return path


def _etcd_users(host):
    return python_in(
        PREFIX,
        host,
        """
        import json
        from ansible_collections.clustermesh.core.plugins.module_utils.kvstore_client import KVStoreClient
        c = KVStoreClient(["https://127.0.0.1:2379"], ca_file="/etc/clustermesh/etcd/ca.crt",
                          cert_file="/etc/clustermesh/etcd/root.crt", key_file="/etc/clustermesh/etcd/root.key")
        print(json.dumps(sorted(c.user_list())))
        """,
    )


def test_onboarding_and_removing_a_third_cluster(converged, tmp_path):
    three = _topology_with_cluster3(tmp_path / "three.yml")
    lab("up", "--topology", str(three), prefix=PREFIX)

    planned = playbook(PREFIX, SITE, "--check")
    assert run_in(PREFIX, "c3-n1", "test", "-e", "/etc/clustermesh", check=False).returncode != 0
    assert "remote-cluster3" not in _etcd_users("c1-n1")
    assert any(host == "c3-n1" for _task, host in planned.changed)

    joined = playbook(PREFIX, SITE)
    allowed = {
        "clustermesh.core.mesh : Write kvstore.yaml, clusters.d and the member's etcd certificates",
        "clustermesh.core.kvstore : Reconcile etcd users and roles, enable auth",
        # routes (and FDB entries in tunnel mode) to the new cluster's node
        "clustermesh.core.routing : Bring routes, the VXLAN device and masquerading to the plan",
    }
    for host in ("c1-n1", "c1-n2", "c2-n1", "c2-n2"):
        assert set(joined.changed_tasks(host)) <= allowed, (host, joined.changed_tasks(host))
    for host in ("c1-n2", "c2-n2"):
        assert run_in(PREFIX, host, "test", "-f", "/etc/clustermesh/clusters.d/cluster3").returncode == 0
    assert sorted(run_in(PREFIX, "c3-n1", "ls", "/etc/clustermesh/clusters.d").stdout.split()) == [
        "cluster1",
        "cluster1.etcd-client-ca.crt",
        "cluster1.etcd-client.crt",
        "cluster1.etcd-client.key",
        "cluster2",
        "cluster2.etcd-client-ca.crt",
        "cluster2.etcd-client.crt",
        "cluster2.etcd-client.key",
    ]
    assert "remote-cluster3" in _etcd_users("c1-n1") and "remote-cluster3" in _etcd_users("c2-n1")
    assert "10.3.0.0/24" in run_in(PREFIX, "c1-n1", "ip", "route", "show", "proto", "203").stdout
    # cluster3 reads cluster1 through cluster1's proxy with what it was given
    result = python_in(
        PREFIX,
        "c3-n1",
        REMOTE_CLIENT
        + "\nconfig = client.get('cilium/cluster-config/cluster1').value.decode()"
        + "\nprint(json.dumps({'user': client.user, 'config': config}))",
    )
    assert result["user"] == "remote-cluster3"

    # and removed again
    lab("up", "--topology", TWO_CLUSTERS, prefix=PREFIX)
    playbook(PREFIX, SITE)
    for host in ("c1-n1", "c1-n2", "c2-n1", "c2-n2"):
        left = run_in(PREFIX, host, "ls", "/etc/clustermesh/clusters.d").stdout.split()
        assert not [f for f in left if f.startswith("cluster3")], (host, left)
    assert "remote-cluster3" not in _etcd_users("c1-n1")
    assert "remote-cluster3" not in _etcd_users("c2-n1")
    # the routes to its node went with it
    assert "10.3." not in run_in(PREFIX, "c1-n1", "ip", "route", "show", "proto", "203").stdout


def test_bad_inventory_changes_nothing(converged, tmp_path):
    with open(inventory_path(PREFIX)) as f:
        inventory = yaml.safe_load(f)
    clusters = (
        inventory["all"]["children"]["clusters"]["children"]
        if "all" in inventory
        else inventory["clusters"]["children"]
    )
    clusters["cluster2"]["vars"]["clustermesh_cluster_id"] = 1  # duplicate of cluster1
    clusters["cluster2"]["vars"]["clustermesh_cluster_name"] = "Cluster2"
    bad = tmp_path / "hosts.yml"
    bad.write_text(yaml.safe_dump(inventory))
    # the PKI lives beside the inventory: point it at the lab's so that nothing else differs
    run = playbook(
        PREFIX,
        SITE,
        "-e",
        "pki_dir=/run/clustermesh-lab/%s/inventory/clustermesh-pki" % PREFIX,
        inventory=str(bad),
        check=False,
    )
    assert run.returncode != 0
    assert "Cluster2" in run.output and "clustermesh_cluster_id" in run.output
    assert run.changed == []
    assert "PLAY [Learn what every mesh node can do]" not in run.output
