"""The agent's local API on a real unix socket: routes, validation, errors, socket mode, the client, and the
CNI plugin telling the agent of pods (ADD/DEL with agentSocket) without ever failing a pod because of it."""

from __future__ import annotations

import io
import json
import os
import shutil
import socket
import stat
import tempfile
import threading
import time
import types

import pytest

from ansible_collections.clustermesh.core.plugins.module_utils import agent_api, cni_plugin, ipam
from ansible_collections.clustermesh.core.plugins.module_utils.agent_api import (
    AgentApi,
    AgentClient,
    AgentRequestError,
    AgentServer,
    AgentUnreachable,
    ApiError,
    EndpointRegistry,
    default_api,
    validate_endpoint,
)

POD_CIDR = "10.1.0.0/24"
EP = {
    "containerID": "abc123",
    "ifname": "eth0",
    "ip": "10.1.0.7",
    "labels": {"app": "rebel-base", "io.kubernetes.pod.namespace": "default"},
    "netns": "/run/netns/cm-pod-a",
    "hostInterface": "cm_0123456789a",
    "mac": "02:00:00:00:00:07",
    "args": {"K8S_POD_NAME": "rebel-base-0"},
}


@pytest.fixture
def short_dir():
    # unix socket paths are limited to 107 bytes: pytest's tmp_path can be longer
    path = tempfile.mkdtemp(prefix="cmapi-", dir="/tmp")
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def agent(short_dir):
    sock = os.path.join(short_dir, "run", "meshd.sock")
    api = default_api(EndpointRegistry(POD_CIDR))
    with AgentServer(sock, api) as server:
        yield server, AgentClient(sock, timeout=2)


def raw_request(path, data):
    """Send raw bytes on the socket, return (status, decoded JSON body)."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(2)
        s.connect(path)
        s.sendall(data)
        chunks = b""
        while True:
            chunk = s.recv(65536)
            if not chunk:
                break
            chunks += chunk
            head, _sep, body = chunks.partition(b"\r\n\r\n")
            length = [int(x.split(b":")[1]) for x in head.split(b"\r\n") if x.lower().startswith(b"content-length")]
            if length and len(body) >= length[0]:
                break
    head, _sep, body = chunks.partition(b"\r\n\r\n")
    return int(head.split()[1]), json.loads(body)


def test_endpoint_added_listed_and_deleted(agent):
    server, client = agent
    stored = client.add_endpoint(EP)
    assert stored == EP
    other = dict(EP, containerID="def456", ip="10.1.0.9", labels={})
    client.add_endpoint(other)
    assert [e["ip"] for e in client.endpoints()] == ["10.1.0.7", "10.1.0.9"]
    assert client.status()["endpoints"] == 2
    assert client.delete_endpoint("abc123", "eth0") is True
    assert client.delete_endpoint("abc123", "eth0") is False  # idempotent: unknown is not an error
    assert [e["containerID"] for e in client.endpoints()] == ["def456"]
    assert server.api.registry.get("def456", "eth0")["ip"] == "10.1.0.9"


def test_stub_lists_and_status(agent):
    _server, client = agent
    assert client.clusters() == [] and client.services() == [] and client.identities() == []
    assert client.status()["uptime"] >= 0


def test_socket_is_0600_and_removed_on_close(short_dir):
    sock = os.path.join(short_dir, "meshd.sock")
    server = AgentServer(sock).start()
    try:
        mode = os.stat(sock).st_mode
        assert stat.S_ISSOCK(mode) and stat.S_IMODE(mode) == 0o600
    finally:
        server.close()
    assert not os.path.exists(sock)


def test_a_stale_socket_is_replaced_and_a_live_one_refused(short_dir):
    sock = os.path.join(short_dir, "meshd.sock")
    stale = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    stale.bind(sock)
    stale.close()  # the file stays, nobody listens: an agent that died
    with AgentServer(sock):
        assert AgentClient(sock).status()["endpoints"] == 0
        with pytest.raises(OSError, match="another agent is listening"):
            AgentServer(sock).start()
    with open(sock, "w"):
        pass
    with pytest.raises(OSError, match="is not a socket"):
        AgentServer(sock).start()


@pytest.mark.parametrize(
    "change, message",
    [
        ({"containerID": ""}, "endpoint.containerID: must be a non-empty string"),
        ({"containerID": None}, "endpoint.containerID: must be a non-empty string"),
        ({"ifname": "a/b"}, "endpoint.ifname"),
        ({"ip": "10.1.1.7"}, "endpoint.ip: 10.1.1.7 is outside this node's pod CIDR 10.1.0.0/24"),
        ({"ip": "10.1.0.1"}, "endpoint.ip: 10.1.0.1 is not a pod address"),
        ({"ip": "10.1.0.255"}, "endpoint.ip: 10.1.0.255 is not a pod address"),
        ({"ip": "pod"}, 'endpoint.ip: "pod" is not an IPv4 address'),
        ({"labels": {"a b": "x"}}, "endpoint.labels: label key 'a b'"),
        ({"labels": {"app": "no spaces"}}, "endpoint.labels['app']: label value 'no spaces'"),
        ({"labels": ["app"]}, "endpoint.labels: must be a mapping"),
        ({"netns": "relative"}, 'endpoint.netns: "relative" must be an absolute path'),
        ({"mac": "xx"}, 'endpoint.mac: "xx" is not a MAC address'),
        ({"args": {"K": 1}}, "endpoint.args: must be an object of strings"),
        ({"colour": "red"}, "endpoint: unknown field(s) colour"),
        ({"ip": None}, "endpoint.ip: null is not an IPv4 address"),
    ],
)
def test_bad_endpoint_is_400_naming_the_field(agent, change, message):
    _server, client = agent
    with pytest.raises(AgentRequestError) as exc:
        client.add_endpoint(dict(EP, **change))
    assert exc.value.status == 400
    assert message in exc.value.message
    assert client.endpoints() == []


def test_missing_field_is_named():
    payload = {k: v for k, v in EP.items() if k != "ifname"}
    with pytest.raises(ApiError, match=r"endpoint.ifname: missing \(required: containerID, ifname, ip\)"):
        validate_endpoint(payload)
    assert validate_endpoint(dict(EP, ip="192.0.2.1"))["ip"] == "192.0.2.1"  # no pod CIDR: any IPv4


def test_protocol_errors(agent):
    server, _client = agent
    path = server.socket_path
    body = b"{not json"
    status, answer = raw_request(
        path, b"POST /v1/endpoints HTTP/1.1\r\nContent-Length: %d\r\nConnection: close\r\n\r\n%s" % (len(body), body)
    )
    assert status == 400 and answer["error"].startswith("body: not valid JSON")
    status, answer = raw_request(path, b"POST /v1/endpoints HTTP/1.1\r\nConnection: close\r\n\r\n")
    assert status == 411 and "Content-Length" in answer["error"]
    status, answer = raw_request(
        path, b"POST /v1/endpoints HTTP/1.1\r\nContent-Length: 9999999\r\nConnection: close\r\n\r\n"
    )
    assert status == 413
    status, answer = raw_request(path, b"GET /v1/nothing HTTP/1.1\r\nConnection: close\r\n\r\n")
    assert status == 404 and "/v1/endpoints" in answer["error"]
    status, answer = raw_request(path, b"DELETE /v1/endpoints HTTP/1.1\r\nConnection: close\r\n\r\n")
    assert status == 405 and "allowed: " in answer["error"]


def test_a_failing_handler_is_500_and_the_server_keeps_serving(agent):
    server, client = agent

    def broken(_request):
        raise KeyError("cluster1")

    server.api.route("GET", "/v1/clusters", broken)
    with pytest.raises(AgentRequestError) as exc:
        client.clusters()
    assert exc.value.status == 500 and "KeyError" in exc.value.message
    assert client.status()["endpoints"] == 0


def test_routes_can_be_replaced_and_take_path_parameters():
    api = AgentApi()
    api.route("GET", "/v1/clusters/{name}", lambda r: {"name": r.params["name"]})
    api.route("GET", "/v1/clusters/{name}", lambda r: (201, {"again": r.params["name"]}))
    assert api.dispatch("GET", "/v1/clusters/cluster%2D2?x=1") == (201, {"again": "cluster-2"})
    assert api.routes() == [("GET", "/v1/clusters/{name}")]


def test_unreachable_agent_names_the_socket(short_dir):
    sock = os.path.join(short_dir, "none.sock")
    with pytest.raises(AgentUnreachable, match="none.sock: no such socket"):
        AgentClient(sock).status()
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(sock)
    listener.listen(1)  # accepts, never answers
    try:
        with pytest.raises(AgentUnreachable, match="no answer within 0.2s"):
            AgentClient(sock, timeout=0.2).status()
    finally:
        listener.close()
    with pytest.raises(AgentUnreachable, match="connection refused"):
        AgentClient(sock).status()


def test_registry_reloads_ipam_allocations(short_dir):
    pool = ipam.PodIpam(short_dir, "clustermesh", POD_CIDR)
    ip, _new = pool.allocate("c1", "eth0", {"labels": {"app": "x-wing"}, "args": {}, "netns": "/run/netns/a"})
    pool.allocate("c2", "eth0", {"labels": {"bad key": "v"}})
    changes = []
    registry = EndpointRegistry(POD_CIDR, on_change=lambda event, ep: changes.append((event, ep["containerID"])))
    skipped = registry.load_allocations(ipam.read_allocations(short_dir, "clustermesh"))
    assert [e["containerID"] for e in registry.list()] == ["c1"]
    assert registry.get("c1", "eth0")["ip"] == ip
    assert len(skipped) == 1 and skipped[0][0]["containerID"] == "c2" and "label key 'bad key'" in skipped[0][1]
    assert changes == [("add", "c1")]
    # one address belongs to one pod: a new attachment with the same IP replaces the old one
    registry.add({"containerID": "c9", "ifname": "eth0", "ip": ip})
    assert [e["containerID"] for e in registry.list()] == ["c9"]
    assert changes[1:] == [("del", "c1"), ("add", "c9")]


# the CNI plugin with agentSocket ----------------------------------------------------------------------
class FakePodNetwork(types.SimpleNamespace):
    """pod_network without the kernel: setup/teardown record what they were asked."""

    GATEWAY = "169.254.1.1"

    class PodNetworkError(Exception):
        pass

    def __init__(self):
        super().__init__(calls=[])

    def Attachment(self, container_id, ifname, netns, ip, mtu):  # noqa: N802 (pod_network's class name)
        return types.SimpleNamespace(container_id=container_id, ifname=ifname, netns=netns, ip=ip, mtu=mtu)

    def setup(self, att):
        self.calls.append(("setup", att.container_id))
        return {"host_ifname": "cm_0123456789a", "host_mac": "02:00:00:00:00:01", "pod_mac": "02:00:00:00:00:02"}

    def teardown(self, container_id, ifname, netns=None):
        self.calls.append(("teardown", container_id))


def cni_call(command, config, container="pod1"):
    env = {
        "CNI_COMMAND": command,
        "CNI_CONTAINERID": container,
        "CNI_IFNAME": "eth0",
        "CNI_NETNS": "/run/netns/cm-pod-1",
        "CNI_ARGS": "K8S_POD_NAMESPACE=default;K8S_POD_NAME=x-wing",
    }
    status, out = cni_plugin.run(env, json.dumps(config).encode())
    return status, json.loads(out) if out else None


@pytest.fixture
def cni_config(short_dir, monkeypatch):
    fake = FakePodNetwork()
    monkeypatch.setattr(cni_plugin, "_pod_network", lambda: fake)
    return {
        "cniVersion": "1.0.0",
        "name": "clustermesh",
        "type": "clustermesh-cni",
        "podCIDR": POD_CIDR,
        "mtu": 1450,
        "dataDir": os.path.join(short_dir, "ipam"),
        "agentSocket": os.path.join(short_dir, "run", "meshd.sock"),
        "args": {"cni": {"labels": [{"key": "app", "value": "x-wing"}]}},
    }


def test_cni_add_and_del_reach_the_agent(cni_config):
    api = default_api(EndpointRegistry(POD_CIDR))
    with AgentServer(cni_config["agentSocket"], api):
        client = AgentClient(cni_config["agentSocket"])
        status, result = cni_call("ADD", cni_config)
        assert status == 0, result
        ip = result["ips"][0]["address"].split("/")[0]
        [endpoint] = client.endpoints()
        assert endpoint == {
            "containerID": "pod1",
            "ifname": "eth0",
            "ip": ip,
            "labels": {"app": "x-wing"},
            "netns": "/run/netns/cm-pod-1",
            "hostInterface": "cm_0123456789a",
            "mac": "02:00:00:00:00:02",
            "args": {"K8S_POD_NAMESPACE": "default", "K8S_POD_NAME": "x-wing"},
        }
        status, out = cni_call("DEL", cni_config)
        assert status == 0, out
        assert client.endpoints() == []


def test_cni_add_and_del_succeed_when_the_agent_is_down(cni_config, capsys):
    status, result = cni_call("ADD", cni_config)
    assert status == 0, result
    assert result["ips"][0]["address"] == "10.1.0.2/32"
    err = capsys.readouterr().err
    assert "warning: could not tell the agent of add pod1/eth0" in err and "meshd.sock" in err
    # the agent that starts later finds the pod in the IPAM state
    registry = EndpointRegistry(POD_CIDR)
    registry.load_allocations(ipam.read_allocations(cni_config["dataDir"], "clustermesh"))
    assert [(e["containerID"], e["ip"], e["labels"]) for e in registry.list()] == [
        ("pod1", "10.1.0.2", {"app": "x-wing"})
    ]
    status, out = cni_call("DEL", cni_config)
    assert status == 0 and out is None
    assert "could not tell the agent of del pod1/eth0" in capsys.readouterr().err


def test_cni_add_succeeds_when_the_agent_refuses_the_endpoint(cni_config):
    cni_config["args"] = {"cni": {"labels": [{"key": "app", "value": "has spaces"}]}}  # CNI allows, k8s does not
    with AgentServer(cni_config["agentSocket"], default_api(EndpointRegistry(POD_CIDR))):
        stderr = io.StringIO()
        config = cni_plugin.parse_config(cni_config, "ADD")
        assert cni_plugin.notify_agent(config, "add", {"containerID": "p", "ifname": "eth0", "ip": "10.1.0.5"}, stderr)
        assert not cni_plugin.notify_agent(
            config, "add", {"containerID": "p", "ifname": "eth0", "ip": "10.9.0.5"}, stderr
        )
        assert "agent answered 400: endpoint.ip: 10.9.0.5 is outside" in stderr.getvalue()
        status, result = cni_call("ADD", cni_config, container="pod2")
        assert status == 0, result


def test_no_agent_socket_means_no_notice(cni_config):
    del cni_config["agentSocket"]
    config = cni_plugin.parse_config(cni_config, "ADD")
    stderr = io.StringIO()
    assert cni_plugin.notify_agent(config, "add", dict(EP), stderr) is False
    assert stderr.getvalue() == ""


def test_a_silent_client_is_dropped_after_the_server_timeout(short_dir, monkeypatch):
    monkeypatch.setattr(agent_api, "SERVER_TIMEOUT", 0.2)
    sock = os.path.join(short_dir, "meshd.sock")
    with AgentServer(sock):
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as silent:
            silent.settimeout(5)
            silent.connect(sock)
            started = time.monotonic()
            assert silent.recv(100) == b""  # closed by the server, not by our 5 s timeout
            assert time.monotonic() - started < 3
        assert AgentClient(sock).status()["endpoints"] == 0  # still serving


@pytest.mark.parametrize(
    "answer, message",
    [
        (b"SSH-2.0-OpenSSH\r\n", "not an HTTP answer"),
        (b"HTTP/1.1 200 OK\r\nContent-Length: 50\r\n\r\n{}", r"the answer was cut off \(2 of 50 bytes\)"),
    ],
)
def test_a_stranger_on_the_socket_is_unreachable_not_a_crash(short_dir, answer, message):
    sock = os.path.join(short_dir, "other.sock")
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(sock)
    listener.listen(1)

    def answer_once():
        conn, _peer = listener.accept()
        with conn:
            conn.recv(65536)
            conn.sendall(answer)

    thread = threading.Thread(target=answer_once, daemon=True)
    thread.start()
    try:
        with pytest.raises(AgentUnreachable, match=message):
            AgentClient(sock).status()
    finally:
        thread.join(timeout=5)
        listener.close()
