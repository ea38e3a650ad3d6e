"""The CNI plugin's protocol side: environment and configuration checks, error JSON, versions, results."""

from __future__ import annotations

import json

import pytest

from ansible_collections.clustermesh.core.plugins.module_utils import cni_plugin
from ansible_collections.clustermesh.core.plugins.module_utils.cni_plugin import (
    CniError,
    attachment_from_result,
    format_result,
    parse_cni_args,
    parse_config,
    read_environment,
    run,
)

GOOD = {
    "cniVersion": "1.0.0",
    "name": "clustermesh",
    "type": "clustermesh-cni",
    "podCIDR": "10.1.0.0/24",
    "mtu": 1450,
}
ENV = {"CNI_COMMAND": "ADD", "CNI_CONTAINERID": "abc123", "CNI_NETNS": "/run/netns/pod", "CNI_IFNAME": "eth0"}


def call(env, config):
    status, out = run(env, json.dumps(config).encode() if not isinstance(config, bytes) else config)
    return status, json.loads(out) if out else None


def test_version_lists_the_supported_versions_and_echoes_the_callers():
    status, out = call({"CNI_COMMAND": "VERSION"}, {"cniVersion": "0.4.0"})
    assert status == 0
    assert out == {"cniVersion": "0.4.0", "supportedVersions": ["0.3.0", "0.3.1", "0.4.0", "1.0.0"]}
    status, out = call({"CNI_COMMAND": "VERSION"}, b"")
    assert status == 0 and out["cniVersion"] == "1.0.0"


def test_unsupported_version_is_error_1_in_the_callers_version():
    status, out = call(ENV, dict(GOOD, cniVersion="0.2.0"))
    assert status == 1
    assert out["code"] == 1 and out["cniVersion"] == "0.2.0"
    assert "supports 0.3.0, 0.3.1, 0.4.0, 1.0.0" in out["msg"]
    assert set(out) == {"cniVersion", "code", "msg", "details"}


def test_check_needs_0_4_0():
    with pytest.raises(CniError) as exc:
        parse_config(dict(GOOD, cniVersion="0.3.1"), "CHECK")
    assert exc.value.code == 1 and "CHECK" in exc.value.msg
    assert parse_config(dict(GOOD, cniVersion="0.3.1"), "ADD").cni_version == "0.3.1"


@pytest.mark.parametrize(
    "change, field",
    [
        ({"podCIDR": None}, "podCIDR: missing"),
        ({"podCIDR": "10.1.0.5/24"}, 'podCIDR: "10.1.0.5/24" is not an IPv4 network'),
        ({"podCIDR": "fd00::/64"}, 'podCIDR: "fd00::/64"'),
        ({"podCIDR": "10.1.0.0/31"}, "podCIDR: 10.1.0.0/31 must be a /16 to /30"),
        ({"mtu": None}, "mtu: missing"),
        ({"mtu": "1450"}, 'mtu: "1450" must be an integer from 68 to 65535'),
        ({"mtu": 70000}, "mtu: 70000 must be an integer"),
        ({"mtu": True}, "mtu: true must be an integer"),
        ({"name": "bad/name"}, 'name: "bad/name" is not a valid network name'),
        ({"dataDir": "relative"}, 'dataDir: "relative" must be an absolute path'),
        ({"agentSocket": 5}, "agentSocket: 5 must be an absolute path"),
        ({"args": {"cni": {"labels": [{"key": "app"}, {"value": "x"}]}}}, "args.cni.labels[1]: must be an object"),
        ({"args": {"cni": {"labels": [{"key": "a b", "value": "x"}]}}}, "args.cni.labels[0]: label key 'a b'"),
        ({"runtimeConfig": {"labels": {"app": 5}}}, "runtimeConfig.labels.app: label app has a non-string value"),
    ],
)
def test_bad_config_is_error_7_naming_the_field(change, field):
    config = {k: v for k, v in dict(GOOD, **change).items() if v is not None}
    status, out = call(ENV, config)
    assert status == 1
    assert out["code"] == 7, out
    assert field in out["msg"]


def test_every_config_problem_is_reported_at_once():
    status, out = call(ENV, {"cniVersion": "1.0.0", "name": "n", "type": "clustermesh-cni", "mtu": 10})
    assert out["code"] == 7
    assert "podCIDR: missing" in out["msg"] and "mtu: 10 must be" in out["msg"]


def test_a_key_in_the_wrong_case_is_pointed_out():
    config = {k: v for k, v in GOOD.items() if k != "podCIDR"}
    config["podCidr"] = "10.1.0.0/24"
    _status, out = call(ENV, config)
    assert "found 'podCidr': keys are case-sensitive" in out["msg"]


def test_delegated_ipam_is_an_unsupported_field():
    _status, out = call(ENV, dict(GOOD, ipam={"type": "host-local"}))
    assert out["code"] == 2
    assert 'ipam={"type": "host-local"}' in out["msg"]


def test_missing_cni_version_is_a_config_error():
    config = {k: v for k, v in GOOD.items() if k != "cniVersion"}
    _status, out = call(ENV, config)
    assert out["code"] == 7 and "cniVersion" in out["msg"]


def test_labels_come_from_args_and_runtime_config():
    config = parse_config(
        dict(
            GOOD,
            args={"cni": {"labels": [{"key": "app", "value": "web"}, {"key": "io.cilium/x", "value": "1"}]}},
            runtimeConfig={"labels": {"app": "api"}},
        ),
        "ADD",
    )
    assert config.labels == {"app": "api", "io.cilium/x": "1"}


def test_undecodable_stdin_is_error_6():
    status, out = call(ENV, b"{not json")
    assert status == 1 and out["code"] == 6
    _status, out = call(ENV, b"[1, 2]")
    assert out["code"] == 6


@pytest.mark.parametrize(
    "env, names",
    [
        ({}, ["CNI_COMMAND is not set"]),
        ({"CNI_COMMAND": "GC"}, ["CNI_COMMAND: 'GC' is not one of ADD, DEL, CHECK, VERSION"]),
        ({"CNI_COMMAND": "ADD"}, ["CNI_CONTAINERID is not set", "CNI_IFNAME is not set", "CNI_NETNS is not set"]),
        (dict(ENV, CNI_CONTAINERID="-bad"), ["CNI_CONTAINERID '-bad'"]),
        (dict(ENV, CNI_IFNAME="a/b"), ["CNI_IFNAME 'a/b'"]),
        (dict(ENV, CNI_IFNAME="x" * 16), ["CNI_IFNAME"]),
        (dict(ENV, CNI_NETNS="pod"), ["CNI_NETNS 'pod' is not an absolute path"]),
        (dict(ENV, CNI_ARGS="A=1;oops"), ["CNI_ARGS: 'oops' is not KEY=VALUE"]),
    ],
)
def test_bad_environment_is_error_4_naming_the_variables(env, names):
    status, out = call(env, GOOD)
    assert status == 1 and out["code"] == 4
    for name in names:
        assert name in out["msg"]


def test_del_does_not_need_a_netns():
    params = read_environment({"CNI_COMMAND": "DEL", "CNI_CONTAINERID": "abc", "CNI_IFNAME": "eth0"})
    assert params["netns"] is None


def test_cni_args():
    assert parse_cni_args("IgnoreUnknown=1;K8S_POD_NAME=web-0;") == {"IgnoreUnknown": "1", "K8S_POD_NAME": "web-0"}
    assert parse_cni_args("") == {}


def test_result_shape_per_version():
    interfaces = [{"name": "cm_0123456789a", "mac": "aa"}, {"name": "eth0", "mac": "bb", "sandbox": "/run/netns/p"}]
    ips = [{"address": "10.1.0.2/32", "gateway": "169.254.1.1", "interface": 1}]
    routes = [{"dst": "0.0.0.0/0", "gw": "169.254.1.1"}]
    v1 = format_result("1.0.0", interfaces, ips, routes, {})
    assert v1 == {"cniVersion": "1.0.0", "interfaces": interfaces, "ips": ips, "routes": routes, "dns": {}}
    v04 = format_result("0.4.0", interfaces, ips, routes, {"nameservers": ["10.1.0.10"]})
    assert v04["ips"] == [dict(ips[0], version="4")] and v04["dns"] == {"nameservers": ["10.1.0.10"]}
    # chained after another plugin: ours are appended, our interface index shifted
    prev = {"cniVersion": "1.0.0", "interfaces": [{"name": "x"}], "ips": [], "routes": []}
    chained = format_result("1.0.0", interfaces, ips, routes, {}, prev_result=prev)
    assert [i["name"] for i in chained["interfaces"]] == ["x", "cm_0123456789a", "eth0"]
    assert chained["ips"][0]["interface"] == 2


def test_check_reads_the_attachment_from_prev_result():
    prev = format_result(
        "1.0.0",
        [{"name": "cm_0123456789a", "mac": "aa"}, {"name": "eth0", "mac": "bb", "sandbox": "/run/netns/p"}],
        [{"address": "10.1.0.2/32", "gateway": "169.254.1.1", "interface": 1}],
        [],
        {},
    )
    assert attachment_from_result(prev, "eth0", "/run/netns/p") == ("10.1.0.2", "bb", "aa")
    with pytest.raises(CniError) as exc:
        attachment_from_result(prev, "eth0", "/run/netns/other")
    assert exc.value.code == 7 and "prevResult" in exc.value.msg


def test_check_without_prev_result_is_error_7():
    status, out = call(dict(ENV, CNI_COMMAND="CHECK"), GOOD)
    assert status == 1 and out["code"] == 7 and "prevResult: missing" in out["msg"]


def test_error_codes_are_the_documented_ones():
    assert (cni_plugin.ERR_POOL_EXHAUSTED, cni_plugin.ERR_INTERFACE_EXISTS, cni_plugin.ERR_CHECK_FAILED) == (
        100,
        101,
        103,
    )
    assert CniError(100, "m", "d").to_dict("0.4.0") == {"cniVersion": "0.4.0", "code": 100, "msg": "m", "details": "d"}


def test_a_missing_pyroute2_is_error_104_naming_it(monkeypatch):
    from ansible_collections.clustermesh.core.plugins.module_utils import pod_network

    monkeypatch.setattr(pod_network, "IMPORT_ERROR", ImportError("No module named 'pyroute2'"))
    status, out = call({"CNI_COMMAND": "DEL", "CNI_CONTAINERID": "abc", "CNI_IFNAME": "eth0"}, GOOD)
    assert status == 1 and out["code"] == 104
    assert "pyroute2 (for pod_network" in out["msg"] and "install requirements/node.txt" in out["msg"]
