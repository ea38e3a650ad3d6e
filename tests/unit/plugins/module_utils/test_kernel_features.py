# -*- coding: utf-8 -*-
# Copyright: clustermesh.core contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
from __future__ import annotations

import errno
import ipaddress
import json
import os
import shutil
import subprocess
import time

import pytest

from ansible_collections.clustermesh.core.plugins.module_utils import kernel_features as kf
from ansible_collections.clustermesh.core.plugins.module_utils.bpf_syscall import BpfError, Cmd

needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="needs root (namespaces, bpf(2))")
needs_unshare = pytest.mark.skipif(shutil.which("unshare") is None, reason="needs util-linux unshare")


# --- pure parts ---------------------------------------------------------------------------


def test_feature_and_failed():
    assert kf.feature(1, "ok") == {"available": True, "detail": "ok"}
    assert kf.feature(False, "x", value=0) == {"available": False, "detail": "x", "value": 0}
    result = kf.failed(OSError(errno.EPERM, "Operation not permitted"), "vxlan")
    assert result == {"available": False, "detail": "vxlan: probe failed: Operation not permitted (EPERM)"}


class FakeNetlinkError(Exception):
    """Shaped like pyroute2's NetlinkError(code, message)."""

    def __init__(self, code, msg=None):
        super().__init__(code, msg or os.strerror(code))
        self.code = code


def test_describe_error():
    assert kf.describe_error(FakeNetlinkError(95)) == "Operation not supported (EOPNOTSUPP)"
    assert kf.describe_error(FakeNetlinkError(17, "File exists")) == "File exists (EEXIST)"
    assert kf.describe_error(OSError(errno.ENOENT, "No such file")) == "No such file (ENOENT)"
    assert kf.describe_error(BpfError(errno.EPERM, Cmd.MAP_CREATE)) == (
        "BPF_MAP_CREATE: Operation not permitted (EPERM)"
    )
    assert kf.describe_error(ValueError("bad")) == "bad"
    assert kf.describe_error(RuntimeError()) == "RuntimeError"


def test_summarize():
    probes = {
        "vxlan": kf.feature(True, "a"),
        "esp": kf.feature(False, "b"),
        "bpf": kf.feature(True, "c"),
        "geneve": kf.feature(False, "d"),
    }
    flat, missing = kf.summarize(probes)
    assert flat == {"bpf": True, "esp": False, "geneve": False, "vxlan": True}
    assert list(flat) == ["bpf", "esp", "geneve", "vxlan"]
    assert missing == ["esp", "geneve"]
    assert kf.summarize({}) == ({}, [])


def test_select_groups():
    assert kf.select_groups(None) == (list(kf.PROBE_GROUPS), True)
    assert kf.select_groups([]) == (list(kf.PROBE_GROUPS), True)
    assert kf.select_groups(["all", "vxlan"]) == (list(kf.PROBE_GROUPS), True)
    assert kf.select_groups(["esp", "vxlan"]) == (["vxlan", "esp"], False)  # canonical order
    assert kf.select_groups(["underlay"]) == ([], True)
    with pytest.raises(ValueError, match="unknown probe.*bogus.*choose from: all, vxlan"):
        kf.select_groups(["vxlan", "bogus"])


def test_groups_are_consistent():
    assert set(kf.SCRATCH_GROUPS) == set(kf.SCRATCH_PROBES)
    assert set(kf.SCRATCH_GROUPS) <= set(kf.PROBE_GROUPS)
    host_only = set(kf.PROBE_GROUPS) - set(kf.SCRATCH_GROUPS)
    assert host_only <= set(kf.HOST_PROBES)
    names = [n for group in kf.PROBE_GROUPS.values() for n in group]
    assert len(names) == len(set(names)), "a feature belongs to one group only"
    assert kf.UNDERLAY not in names


def test_combine_esp():
    gcm = ("esp_gcm_aes", "aead gcm")
    cbc = ("esp_cbc", "cbc+hmac")
    ok = kf.combine_esp(
        {gcm[0]: (False, gcm[1], "Error: Requested AEAD algorithm not found."), cbc[0]: (True, cbc[1], "")}
    )
    assert ok == {"available": True, "detail": "ESP state added with: cbc+hmac"}
    no_esp = kf.combine_esp(
        {
            gcm[0]: (False, gcm[1], "Error: Requested AEAD algorithm not found."),
            cbc[0]: (False, cbc[1], "Error: Requested type not found."),
        }
    )
    assert no_esp["available"] is False
    assert no_esp["detail"].startswith("the kernel has no ESP support (esp4 missing): ")
    assert "aead gcm: Error: Requested AEAD algorithm not found." in no_esp["detail"]
    no_alg = kf.combine_esp({cbc[0]: (False, cbc[1], "Error: Requested AUTH algorithm not found.")})
    assert no_alg["detail"].startswith("no ESP state could be added with the tested algorithms")


def test_esp_state_argv_uses_zero_keys_only():
    for _name, spi, _label, args in kf.ESP_VARIANTS:
        argv = kf.esp_state_argv("ip", spi, args)
        assert argv[:4] == ["ip", "xfrm", "state", "add"]
        assert argv[argv.index("proto") + 1] == "esp"
        keys = [a for a in argv if a.startswith("0x") and a != f"0x{spi:x}"]
        assert keys and all(set(k[2:]) == {"0"} for k in keys)
    gcm = dict((v[0], v[3]) for v in kf.ESP_VARIANTS)["esp_gcm_aes"]
    assert gcm == ["aead", "rfc4106(gcm(aes))", "0x" + "0" * 40, "128"]


def test_parse_netlink_reply():
    done = kf.NLMSG_HEADER.pack(20, kf.NLMSG_DONE, 2, 7, 0) + b"\0\0\0\0"
    assert kf.parse_netlink_reply(done, 7) is None
    error = kf.NLMSG_HEADER.pack(36, kf.NLMSG_ERROR, 0, 7, 0) + (-errno.EPERM).to_bytes(4, "little", signed=True)
    assert kf.parse_netlink_reply(error + bytes(16), 7) == errno.EPERM
    ack = kf.NLMSG_HEADER.pack(36, kf.NLMSG_ERROR, 0, 7, 0) + bytes(20)
    assert kf.parse_netlink_reply(ack, 7) is None
    other = kf.NLMSG_HEADER.pack(20, kf.NLMSG_DONE, 2, 1, 0) + bytes(4)
    assert kf.parse_netlink_reply(other + done, 7) is None
    with pytest.raises(kf.ProbeError, match="no netlink reply"):
        kf.parse_netlink_reply(other, 7)
    with pytest.raises(kf.ProbeError, match="malformed"):
        kf.parse_netlink_reply(kf.NLMSG_HEADER.pack(4, 3, 0, 7, 0), 7)


# --- sysctl/file probes on fake files -----------------------------------------------------


def _sysctl_jit():
    with open("/proc/sys/net/core/bpf_jit_enable") as f:
        return int(f.read())


@pytest.mark.skipif(os.geteuid() != 0, reason="loading a BPF program needs root")
def test_probe_bpf_jit_matches_the_kernel():
    result = kf.probe_bpf_jit()
    assert result["available"] is (_sysctl_jit() in (1, 2))
    assert result["value"] == _sysctl_jit()


@pytest.mark.skipif(os.geteuid() != 0, reason="loading a BPF program needs root")
def test_probe_bpf_jit_without_the_sysctl(tmp_path):
    # In a network namespace other than the initial one the sysctl is not visible; the probe
    # must still tell from a loaded program whether the JIT compiles.
    result = kf.probe_bpf_jit(str(tmp_path / "none"))
    assert result["available"] is (_sysctl_jit() in (1, 2))
    assert result["value"] is None
    assert "JIT-compiled" in result["detail"]


def test_probe_btf(tmp_path):
    good = tmp_path / "vmlinux"
    good.write_bytes(b"\x9f\xeb\x01\x00" + bytes(100))
    assert kf.probe_btf(str(good)) == {"available": True, "detail": f"{good} readable, 104 bytes", "size": 104}
    bad = tmp_path / "bad"
    bad.write_bytes(b"ELF\0")
    assert kf.probe_btf(str(bad))["available"] is False
    missing = kf.probe_btf(str(tmp_path / "none"))
    assert missing["available"] is False and "ENOENT" in missing["detail"]


@pytest.mark.parametrize(("content", "available"), [("1\n", True), ("0\n", False)])
def test_probe_ip_forward(tmp_path, content, available):
    path = tmp_path / "ip_forward"
    path.write_text(content)
    result = kf.probe_ip_forward(str(path))
    assert result["available"] is available
    assert result["value"] == int(content)


def test_probe_ip_forward_unreadable(tmp_path):
    result = kf.probe_ip_forward(str(tmp_path / "none"))
    assert result["available"] is False and result["value"] is None


def test_find_binary_searches_sbin_even_with_short_path(monkeypatch):
    if not os.path.exists("/usr/sbin/ip") and not os.path.exists("/sbin/ip"):
        pytest.skip("no ip binary in sbin")
    monkeypatch.setenv("PATH", "/nonexistent")
    assert kf.find_binary("ip") in ("/usr/sbin/ip", "/sbin/ip")
    assert kf.find_binary("surely-not-a-binary-cm") is None


def test_run_command():
    assert kf.run_command(["true"]) == (True, "")
    ok, err = kf.run_command(["sh", "-c", "echo '  Error:   boom\n here' >&2; exit 3"])
    assert not ok and err == "Error: boom here"
    assert kf.run_command(["sh", "-c", "exit 4"]) == (False, "exit status 4")
    ok, err = kf.run_command(["/nonexistent/binary"])
    assert not ok and "ENOENT" in err
    assert kf.run_command(["sleep", "5"], timeout=0.2) == (False, "timed out after 0.2s")


# --- underlay summary ---------------------------------------------------------------------

LINKS = [
    {"index": 1, "ifname": "lo", "mtu": 65536, "flags": kf.IFF_LOOPBACK | kf.IFF_UP},
    {"index": 2, "ifname": "eth0", "mtu": 1500, "flags": kf.IFF_UP},
    {"index": 3, "ifname": "eth1", "mtu": 9000, "flags": 0},
    {"index": 4, "ifname": "cm_vxlan", "mtu": 1450, "flags": kf.IFF_UP},
]
ADDRESSES = [
    {"family": 4, "address": "127.0.0.1", "prefixlen": 8, "index": 1},
    {"family": 6, "address": "::1", "prefixlen": 128, "index": 1},
    {"family": 4, "address": "198.18.1.10", "prefixlen": 24, "index": 2},
    {"family": 4, "address": "198.18.0.10", "prefixlen": 24, "index": 2},
    {"family": 6, "address": "fe80::1", "prefixlen": 64, "index": 2},
    {"family": 6, "address": "2001:db8::10", "prefixlen": 64, "index": 3},
    {"family": 4, "address": "169.254.3.3", "prefixlen": 16, "index": 3},
    {"family": 4, "address": "10.1.0.1", "prefixlen": 32, "index": 4},
    {"family": 4, "address": "198.18.9.9", "prefixlen": 24, "index": 99},  # unknown link
]


def test_summarize_underlay_without_default_route():
    result = kf.summarize_underlay(LINKS, ADDRESSES, [])
    assert [a["cidr"] for a in result["ipv4"]] == ["198.18.0.10/24", "198.18.1.10/24"]
    assert result["ipv4"][0] == {
        "address": "198.18.0.10",
        "prefixlen": 24,
        "cidr": "198.18.0.10/24",
        "interface": "eth0",
        "mtu": 1500,
        "up": True,
        "default_route": False,
    }
    assert result["ipv6"] == [
        {
            "address": "2001:db8::10",
            "prefixlen": 64,
            "cidr": "2001:db8::10/64",
            "interface": "eth1",
            "mtu": 9000,
            "up": False,
            "default_route": False,
        }
    ]
    assert result["default_route"] == {"ipv4": None, "ipv6": None}
    assert result["has_default_route"] is False


def test_summarize_underlay_default_routes():
    routes = [
        {"family": 4, "dst_len": 0, "table": 100, "type": 1, "oifs": [3], "gateway": "198.18.5.1"},  # not main
        {"family": 4, "dst_len": 0, "table": 254, "type": 7, "oifs": [], "gateway": None},  # unreachable
        {"family": 4, "dst_len": 24, "table": 254, "type": 1, "oifs": [2], "gateway": None},  # not default
        {"family": 4, "dst_len": 0, "table": 254, "type": 1, "oifs": [2], "gateway": "198.18.1.1"},
        {"family": 6, "dst_len": 0, "table": 254, "type": 1, "oifs": [None, 2, 3], "gateway": "2001:db8::1"},
    ]
    result = kf.summarize_underlay(LINKS, ADDRESSES, routes)
    assert result["default_route"] == {
        "ipv4": {"gateway": "198.18.1.1", "interfaces": ["eth0"]},
        "ipv6": {"gateway": "2001:db8::1", "interfaces": ["eth0", "eth1"]},
    }
    assert result["has_default_route"] is True
    assert all(a["default_route"] for a in result["ipv4"] + result["ipv6"])


def test_summarize_underlay_keeps_project_devices_when_asked():
    result = kf.summarize_underlay(LINKS, ADDRESSES, [], skip_prefix="")
    assert "10.1.0.1/32" in [a["cidr"] for a in result["ipv4"]]


# --- the scratch-namespace machinery ------------------------------------------------------


def test_scratch_failures_become_unavailable_features(monkeypatch):
    def refuse(flags):
        raise OSError(errno.EPERM, "Operation not permitted")

    monkeypatch.setattr(kf, "unshare", refuse)  # the forked child inherits the patch
    results = kf.run_in_scratch_netns(["vxlan", "esp", "nftables"], timeout=10)
    assert sorted(results) == ["esp", "esp_cbc_aes_hmac_sha256", "esp_gcm_aes", "nftables", "nftables_nat", "vxlan"]
    for result in results.values():
        assert result["available"] is False
        assert "cannot create a scratch network namespace" in result["detail"]
        assert "EPERM" in result["detail"]


def test_call_in_scratch_netns_errors(monkeypatch):
    monkeypatch.setattr(kf, "unshare", lambda flags: None)  # run these without a new namespace
    assert kf.call_in_scratch_netns(lambda: {"a": [1, 2]}) == {"a": [1, 2]}

    def boom():
        raise RuntimeError("boom")

    with pytest.raises(kf.ProbeError, match="probe process failed: RuntimeError: boom"):
        kf.call_in_scratch_netns(boom)
    with pytest.raises(kf.ProbeError, match="ended without a result"):
        kf.call_in_scratch_netns(lambda: os._exit(3))
    with pytest.raises(kf.ProbeError, match="not serialisable"):
        kf.call_in_scratch_netns(lambda: {1, 2})
    started = time.monotonic()
    with pytest.raises(kf.ProbeError, match="timed out after 0.5s"):
        kf.call_in_scratch_netns(lambda: time.sleep(30), timeout=0.5)
    assert time.monotonic() - started < 10


def test_a_failing_group_does_not_hide_the_others(monkeypatch):
    monkeypatch.setattr(kf, "unshare", lambda flags: None)

    def broken(scratch):
        raise KeyError("oops")

    monkeypatch.setitem(kf.SCRATCH_PROBES, "vxlan", broken)
    monkeypatch.setitem(kf.SCRATCH_PROBES, "geneve", lambda s: {"geneve": kf.feature(True, "fake")})
    results = kf.run_in_scratch_netns(["vxlan", "geneve"])
    assert results["vxlan"] == {"available": False, "detail": "probe failed: 'oops'"}
    assert results["geneve"] == {"available": True, "detail": "fake"}


# --- real probes, checked against independent commands ------------------------------------


def unshare_ok(*commands):
    """Do the shell commands all succeed in a fresh network namespace of their own?"""
    script = " && ".join(commands)
    return subprocess.run(["unshare", "-n", "sh", "-c", script], capture_output=True, check=False).returncode == 0


def host_state():
    """What the probes must not change in the host's own namespace."""

    def out(*argv):
        return subprocess.run(argv, capture_output=True, text=True, check=False).stdout

    return {
        "links": out("ip", "-o", "link"),
        "addresses": out("ip", "-o", "addr"),
        "qdiscs": out("tc", "qdisc", "show"),
        "xfrm": out("ip", "xfrm", "state", "list") + out("ip", "xfrm", "policy", "list"),
        "nft": out("nft", "list", "tables") if shutil.which("nft") else "",
    }


@pytest.fixture(scope="module")
def detected():
    if os.geteuid() != 0:
        pytest.skip("needs root")
    before = host_state()
    facts = kf.detect()
    after = host_state()
    return facts, before, after


@needs_root
def test_detect_leaves_the_host_namespace_unchanged(detected):
    _facts, before, after = detected
    assert before == after


@needs_root
def test_detect_reports_every_feature(detected):
    facts, _before, _after = detected
    names = sorted(n for group in kf.PROBE_GROUPS.values() for n in group)
    assert sorted(facts["probes"]) == names
    assert sorted(facts["features"]) == names
    assert facts["missing"] == sorted(n for n in names if not facts["probes"][n]["available"])
    for result in facts["probes"].values():
        assert isinstance(result["available"], bool) and result["detail"]
    assert facts["kernel"]["release"] == os.uname().release
    assert facts["probed"] == [*kf.PROBE_GROUPS, "underlay"]
    assert json.loads(json.dumps(facts)) == facts


@needs_root
@needs_unshare
@pytest.mark.parametrize(
    ("name", "command"),
    [
        ("vxlan", "ip link add name t type vxlan id 1 dstport 4789"),
        ("geneve", "ip link add name t type geneve id 1 remote 198.18.255.2"),
        ("wireguard", "ip link add name t type wireguard"),
        ("tc_clsact", "tc qdisc add dev lo clsact"),
        ("nftables", "nft add table inet t"),
        (
            "esp_gcm_aes",
            "ip xfrm state add src 198.18.255.1 dst 198.18.255.2 proto esp "
            "spi 0x100 mode tunnel aead 'rfc4106(gcm(aes))' 0x" + "0" * 40 + " 128",
        ),
        (
            "esp_cbc_aes_hmac_sha256",
            "ip xfrm state add src 198.18.255.1 dst 198.18.255.2 proto esp spi 0x101 "
            "mode tunnel enc 'cbc(aes)' 0x" + "0" * 32 + " auth-trunc 'hmac(sha256)' 0x" + "0" * 64 + " 128",
        ),
        ("xfrm", "ip xfrm state list"),
    ],
)
def test_probe_agrees_with_an_independent_check(detected, name, command):
    facts, _before, _after = detected
    assert facts["features"][name] is unshare_ok(command), facts["probes"][name]["detail"]


@needs_root
@needs_unshare
def test_esp_agrees_with_any_esp_state(detected):
    facts, _before, _after = detected
    expected = any(
        unshare_ok(" ".join(kf.esp_state_argv("ip", spi, [f"'{a}'" for a in args])))
        for _n, spi, _l, args in kf.ESP_VARIANTS
    )
    assert facts["features"]["esp"] is expected
    if not expected:
        assert facts["probes"]["esp"]["detail"]


@needs_root
def test_esp_missing_here_says_why(detected):
    facts, _before, _after = detected
    if facts["features"]["esp"]:
        pytest.skip("this kernel has ESP")
    assert "esp" in facts["missing"]
    assert "not found" in facts["probes"]["esp"]["detail"]
    assert "0x00" not in json.dumps(facts), "no key material in the facts"


@needs_root
def test_host_side_probes_agree_with_the_files(detected):
    facts, _before, _after = detected
    with open("/proc/sys/net/ipv4/ip_forward") as handle:
        assert facts["features"]["ip_forward"] is (handle.read().strip() == "1")
    assert facts["features"]["btf"] is os.access("/sys/kernel/btf/vmlinux", os.R_OK)
    if facts["features"]["btf"]:
        assert facts["probes"]["btf"]["size"] == os.path.getsize("/sys/kernel/btf/vmlinux")
    assert facts["features"]["nft_binary"] is (kf.find_binary("nft") is not None)


@needs_root
def test_tc_bpf_and_tcx_work_where_bpf_works(detected):
    facts, _before, _after = detected
    if not facts["features"]["bpf"]:
        pytest.skip("no bpf(2) here")
    # measured on this machine kind: tc clsact + cls_bpf direct-action and tcx links work
    assert facts["features"]["tc_bpf"], facts["probes"]["tc_bpf"]["detail"]
    assert facts["features"]["tcx"], facts["probes"]["tcx"]["detail"]


@needs_root
def test_underlay_matches_ip_addr(detected):
    facts, _before, _after = detected
    listing = json.loads(subprocess.run(["ip", "-j", "addr"], capture_output=True, text=True, check=True).stdout)
    expected = set()
    for link in listing:
        if "LOOPBACK" in link.get("flags", []) or link["ifname"].startswith("cm_"):
            continue
        for info in link.get("addr_info", []):
            ip = ipaddress.ip_address(info["local"])
            if not (ip.is_link_local or ip.is_loopback):
                expected.add((link["ifname"], f"{ip}/{info['prefixlen']}", link["mtu"]))
    underlay = facts["underlay"]
    got = {(a["interface"], a["cidr"], a["mtu"]) for a in underlay["ipv4"] + underlay["ipv6"]}
    assert got == expected
    has_default = bool(
        subprocess.run(["ip", "route", "show", "default"], capture_output=True, text=True, check=False).stdout.strip()
    )
    assert underlay["default_route"]["ipv4"] is not None if has_default else underlay["default_route"]["ipv4"] is None


@needs_root
def test_link_probe_falls_back_to_ip_without_pyroute2(monkeypatch, detected):
    facts, _before, _after = detected

    def no_pyroute2(self):
        raise kf.ProbeError("pyroute2 is not importable")

    monkeypatch.setattr(kf.Scratch, "ipr", property(no_pyroute2))
    results = kf.run_in_scratch_netns(["vxlan", "geneve", "wireguard"])
    for name in ("vxlan", "geneve", "wireguard"):
        assert results[name]["available"] is facts["features"][name], results[name]["detail"]
        assert "pyroute2 is not importable" in results[name]["detail"] or not results[name]["available"]


@needs_root
def test_selected_probes_only():
    facts = kf.detect(["vxlan", "ip_forward"])
    assert sorted(facts["features"]) == ["ip_forward", "vxlan"]
    assert facts["probed"] == ["vxlan", "ip_forward"]
    assert "underlay" not in facts
