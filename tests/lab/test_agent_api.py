"""The CNI plugin tells the node agent's API of pods, on a lab host: the real plugin bundle run by
``tools/lab pod`` with ``agentSocket`` set, an API server on the host's /run/clustermesh/meshd.sock,
and meshctl reading it. A pod never fails because the agent is down; an agent that starts later finds
the pod in the IPAM state.

Lab prefix: cmu. One host, no routing.
"""

from __future__ import annotations

import json
import os
import subprocess
import textwrap

import pytest

from ansible_collections.clustermesh.core.plugins.action.node_bundle import build_bundle

from .labtools import LAB, PYTHON, REPO_ROOT, lab, lab_session, python_in, run_in

pytestmark = pytest.mark.lab
if os.geteuid() != 0:
    pytest.skip("the lab needs root", allow_module_level=True)

PREFIX = "cmu"
HOST = "c1-n1"
POD_CIDR = "10.1.0.0/24"
SOCKET = "/run/clustermesh/meshd.sock"
CNI_BIN = os.path.join(REPO_ROOT, "build", "lab-%s" % PREFIX, "bin")  # shared with lab hosts (/tmp is not)
CONFLIST = {
    "cniVersion": "1.0.0",
    "name": "clustermesh",
    "plugins": [
        {
            "type": "clustermesh-cni",
            "podCIDR": POD_CIDR,
            "mtu": 1450,
            "dataDir": "/var/lib/cni/networks",
            "agentSocket": SOCKET,
        }
    ],
}
SERVER = """
import sys
sys.path.insert(0, {collections!r})
from ansible_collections.clustermesh.core.plugins.module_utils import agent_api, ipam
registry = agent_api.EndpointRegistry({cidr!r})
skipped = registry.load_allocations(ipam.read_allocations("/var/lib/cni/networks", "clustermesh"))
with agent_api.AgentServer({socket!r}, agent_api.default_api(registry)):
    print("ready", len(registry), len(skipped), flush=True)
    sys.stdin.read()  # until the test closes stdin
"""


@pytest.fixture(scope="module")
def host():
    with lab_session(PREFIX):
        os.makedirs(CNI_BIN, exist_ok=True)
        plugin = os.path.join(CNI_BIN, "clustermesh-cni")
        with open(plugin, "wb") as handle:
            handle.write(build_bundle("cni", PYTHON))
        os.chmod(plugin, 0o755)
        run_in(
            PREFIX,
            HOST,
            "sh",
            "-c",
            'mkdir -p /etc/cni/net.d && printf "%s" "$1" > /etc/cni/net.d/10-clustermesh.conflist',
            "sh",
            json.dumps(CONFLIST),
        )
        yield HOST


class Agent:
    """The API server running inside the lab host (stopped by closing its stdin, or by its PID)."""

    def __init__(self):
        code = SERVER.format(
            collections=os.path.join(REPO_ROOT, "build", "pytest-collections"), cidr=POD_CIDR, socket=SOCKET
        )
        self.proc = subprocess.Popen(
            [LAB, "exec", "--prefix", PREFIX, HOST, "--", PYTHON, "-c", textwrap.dedent(code)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        line = self.proc.stdout.readline().split()
        if not line or line[0] != "ready":
            self.stop()
            raise AssertionError("the agent API did not start: %s" % self.proc.stderr.read())
        self.loaded = int(line[1])

    def stop(self):
        if self.proc.poll() is None:
            self.proc.stdin.close()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()  # our own child, by its PID
                self.proc.wait(timeout=10)


def endpoints():
    return python_in(
        PREFIX,
        HOST,
        """
        import json
        from ansible_collections.clustermesh.core.plugins.module_utils.agent_api import AgentClient
        print(json.dumps(AgentClient(%r).endpoints()))
        """
        % SOCKET,
    )


def pod(*args, check=True):
    return lab("pod", args[0], *args[1:], "--cni-path", CNI_BIN, prefix=PREFIX, check=check)


def test_pods_reach_the_agent_and_survive_its_absence(host):
    agent = Agent()
    try:
        assert agent.loaded == 0
        ip = pod("add", host, "web", "--labels", "app=web,tier=front").stdout.strip().splitlines()[-1]
        [endpoint] = endpoints()
        assert endpoint["ip"] == ip
        assert endpoint["labels"] == {"app": "web", "tier": "front"}
        assert endpoint["netns"] == "/run/netns/cm-pod-web" and endpoint["ifname"] == "eth0"
        assert endpoint["hostInterface"].startswith("cm_")
        assert endpoint["args"]["K8S_POD_NAME"] == "web"
        table = run_in(PREFIX, host, PYTHON, "-c", _MESHCTL, "--socket", SOCKET, "endpoints").stdout.splitlines()
        assert table[0].split()[:3] == ["CONTAINER", "IFNAME", "IP"] and ip in table[1]
        assert "app=web,tier=front" in table[1]
        pod("del", host, "web")
        assert endpoints() == []
    finally:
        agent.stop()

    # the agent is down: pods still come and go
    added = pod("add", host, "db", "--labels", "app=db")
    db_ip = added.stdout.strip().splitlines()[-1]
    out = run_in(PREFIX, host, PYTHON, "-c", _MESHCTL, "--socket", SOCKET, "status", check=False)
    assert out.returncode == 1 and "the agent is not reachable on %s" % SOCKET in out.stderr

    # an agent that starts now finds the pod in the IPAM state
    agent = Agent()
    try:
        assert agent.loaded == 1
        assert [(e["ip"], e["labels"]) for e in endpoints()] == [(db_ip, {"app": "db"})]
        pod("del", host, "db")
        assert endpoints() == []
    finally:
        agent.stop()


_MESHCTL = (
    "import sys; sys.path.insert(0, %r)\n"
    "from ansible_collections.clustermesh.core.plugins.module_utils.meshctl import main\n"
    "sys.exit(main(sys.argv[1:]))\n" % os.path.join(REPO_ROOT, "build", "pytest-collections")
)
