# -*- coding: utf-8 -*-
# Copyright: clustermesh.core contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""ipsec_state: the key file (owner-only, written only when every check passed), the order of work
(nothing changes when the plan, the kernel check or a rekey is wrong), idempotence, check mode,
removal, and no key material in anything returned. The kernel is an in-memory stand-in of
XfrmSocket here; the real kernel: tests/vm/test_ipsec.py (ESP) and the capability test below."""

from __future__ import annotations

import os
import stat

import pytest

from ansible_collections.clustermesh.core.plugins.module_utils import ipsec, ipsec_state, kernel_features
from ansible_collections.clustermesh.core.plugins.module_utils.xfrm import Selector, XfrmPolicy, XfrmState

KEY3 = "3+ rfc4106(gcm(aes)) " + "a1" * 20 + " 128"
KEY3_OTHER_BYTES = "3+ rfc4106(gcm(aes)) " + "b2" * 20 + " 128"
KEY4 = "4+ rfc4106(gcm(aes)) " + "c3" * 20 + " 128"
NODE = {"name": "c1-n1", "ip": "198.18.1.11", "pod_cidrs": ["10.1.0.0/24"]}
PEERS = [
    {"name": "c1-n2", "cluster": "cluster1", "ip": "198.18.1.12", "pod_cidrs": ["10.1.1.0/24"]},
    {"name": "c2-n1", "cluster": "cluster2", "ip": "198.18.1.21", "pod_cidrs": ["10.2.0.0/24"]},
]
BLOCK = ["10.1.0.0/16", "10.2.0.0/16"]
FOREIGN_STATE = XfrmState(src="192.0.2.1", dst="192.0.2.2", spi=0x999, reqid=7, aead=None)
FOREIGN_POLICY = XfrmPolicy(Selector(dst="192.0.2.0/24"), "out", priority=5)


class FakeKernel:
    """XfrmSocket's interface over two lists; counts the calls that change something."""

    def __init__(self):
        self.states, self.policies, self.calls = [FOREIGN_STATE], [FOREIGN_POLICY], []

    def __call__(self):
        return self

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False

    def dump_states(self):
        return list(self.states)

    def dump_policies(self):
        return list(self.policies)

    def add_state(self, s):
        self.calls.append("add_state")
        self.states.append(s)

    def delete_state(self, s):
        self.calls.append("delete_state")
        self.states = [x for x in self.states if x.id != s.id]

    def add_policy(self, p):
        self.calls.append("add_policy")
        self.policies.append(p)

    def update_policy(self, p):
        self.calls.append("update_policy")
        self.policies = [x for x in self.policies if x.id != p.id] + [p]

    def delete_policy(self, p):
        self.calls.append("delete_policy")
        self.policies = [x for x in self.policies if x.id != p.id]


class FakeSocket:
    def __init__(self, kernel):
        self.kernel = kernel

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False

    def states(self):
        return self.kernel.dump_states()

    def policies(self):
        return self.kernel.dump_policies()

    def __getattr__(self, name):
        return getattr(self.kernel, name)


@pytest.fixture
def kernel(monkeypatch):
    k = FakeKernel()
    monkeypatch.setattr(ipsec_state, "XfrmSocket", lambda: FakeSocket(k))
    monkeypatch.setattr(ipsec_state, "check_capability", lambda keys: None)
    monkeypatch.setattr(
        ipsec_state, "peer_modes", lambda node, peers, mode, ext=False: {"c1-n2": "direct", "c2-n1": "tunnel"}
    )
    return k


@pytest.fixture
def key_file(tmp_path):
    return str(tmp_path / "ipsec" / "keys")


def run(key_file, keys=(KEY3,), **kw):
    kw.setdefault("block_cidrs", BLOCK)
    return ipsec_state.reconcile(
        NODE, PEERS, "hybrid", key_file=key_file, keys=list(keys) if keys is not None else None, **kw
    )


def no_key_material(result):
    text = repr(result)
    for line in (KEY3, KEY3_OTHER_BYTES, KEY4):
        assert line.split()[2][:16] not in text


def test_first_run_writes_the_key_file_owner_only_and_installs_the_plan(kernel, key_file):
    result = run(key_file)
    assert result["changed"] and result["key_ids"] == [3] and result["encrypt_key_id"] == 3
    assert stat.S_IMODE(os.stat(key_file).st_mode) == 0o600
    assert stat.S_IMODE(os.stat(os.path.dirname(key_file)).st_mode) == 0o700
    ours = [s for s in kernel.states if s.reqid == ipsec.REQID]
    assert len(ours) == result["states"] == 4  # in + out for each of the two peers
    assert result["changes"][0].startswith("~ key file")
    assert FOREIGN_STATE in kernel.states and FOREIGN_POLICY in kernel.policies
    no_key_material(result)


def test_second_run_changes_nothing(kernel, key_file):
    run(key_file)
    kernel.calls.clear()
    result = run(key_file)
    assert not result["changed"] and result["changes"] == [] and kernel.calls == []


def test_check_mode_applies_nothing_and_writes_no_key_file(kernel, key_file):
    result = run(key_file, check=True)
    assert result["changed"] and len(result["changes"]) > 4
    assert kernel.calls == [] and not os.path.exists(key_file)


def test_keys_are_read_from_the_file_when_not_given(kernel, key_file):
    run(key_file)
    result = run(key_file, keys=None)
    assert not result["changed"] and result["key_ids"] == [3]


def test_rotation_steps(kernel, key_file):
    run(key_file)
    step1 = run(key_file, keys=[KEY3, KEY4])  # both decrypt, 3 encrypts: only states are added
    assert step1["encrypt_key_id"] == 3 and set(step1["summary"]) >= {"add_state"}
    assert step1["summary"]["add_state"] == 4 and step1["summary"]["update_policy"] == 0
    step2 = run(key_file, keys=[KEY4, KEY3])  # 4 encrypts: only out policies switch
    assert step2["encrypt_key_id"] == 4 and step2["summary"]["add_state"] == 0
    assert step2["summary"]["update_policy"] > 0 and step2["summary"]["delete_state"] == 0
    step3 = run(key_file, keys=[KEY4])  # the old key's states go
    assert step3["summary"]["delete_state"] == 4
    assert {ipsec.spi_key_id(s.spi) for s in kernel.states if s.reqid == ipsec.REQID} == {4}


def test_changed_key_bytes_under_the_same_id_is_refused_and_changes_nothing(kernel, key_file):
    run(key_file)
    before = open(key_file).read()
    kernel.calls.clear()
    with pytest.raises(ipsec_state.IpsecStateError, match="key 3 changed its bytes without a new key ID") as info:
        run(key_file, keys=[KEY3_OTHER_BYTES], boot_ids={})
    assert kernel.calls == [] and open(key_file).read() == before
    assert "b2b2b2b2" not in str(info.value)


def test_bad_key_line_names_the_field_not_the_key(kernel, key_file):
    with pytest.raises(ipsec.IpsecKeyError) as info:
        run(key_file, keys=["3+ rfc4106(gcm(aes)) " + "a1" * 19 + " 128"])
    assert "a1a1a1a1" not in str(info.value)
    assert kernel.calls == [] and not os.path.exists(key_file)


def test_absent_removes_ours_and_the_key_file_only(kernel, key_file):
    run(key_file)
    result = ipsec_state.reconcile(NODE, [], "hybrid", key_file=key_file, state="absent")
    assert result["changed"] and not os.path.exists(key_file)
    assert kernel.states == [FOREIGN_STATE] and kernel.policies == [FOREIGN_POLICY]
    again = ipsec_state.reconcile(NODE, [], "hybrid", key_file=key_file, state="absent")
    assert not again["changed"]


@pytest.mark.parametrize("mode", [0o644, 0o640, 0o604])
def test_key_file_readable_by_others_is_refused(tmp_path, mode):
    path = tmp_path / "keys"
    path.write_text(KEY3 + "\n")
    os.chmod(path, mode)
    with pytest.raises(ipsec_state.IpsecStateError, match="must be readable by its owner only"):
        ipsec_state.read_key_file(str(path))


def test_missing_key_file_names_the_role(tmp_path):
    with pytest.raises(ipsec_state.IpsecStateError, match="does not exist.*clustermesh_ipsec_key"):
        ipsec_state.read_key_file(str(tmp_path / "none"))


def test_key_file_round_trip(tmp_path):
    path = tmp_path / "keys"
    path.write_bytes(ipsec_state.key_file_text([ipsec.parse_key_line(KEY4), ipsec.parse_key_line(KEY3)]))
    os.chmod(path, 0o600)
    assert [k.key_id for k in ipsec_state.read_key_file(str(path))] == [4, 3]


def _kernel_has_esp():
    try:
        return kernel_features.call_in_scratch_netns(
            lambda: (
                not ipsec_state._probe_algorithms(
                    [("ESP", ipsec.state_algorithms(ipsec.parse_key_line(KEY3), "198.18.255.1", "198.18.255.2"))]
                )
            )
        )
    except kernel_features.ProbeError:
        return None


@pytest.mark.skipif(os.geteuid() != 0, reason="a scratch network namespace needs root")
def test_capability_check_on_this_kernel_names_the_missing_feature():
    """This machine's kernel has XFRM but no ESP (shared/reference/machine.md): the check fails naming
    esp4, in a scratch namespace, so nothing is left in ours."""
    if _kernel_has_esp():
        pytest.skip("this kernel has ESP: the VM tests cover it")
    with pytest.raises(
        ipsec_state.IpsecStateError, match=r"no ESP support \(module esp4 missing\).*nothing was changed"
    ):
        ipsec_state.check_capability([ipsec.parse_key_line(KEY3)])


def test_node_keys_are_canonical_so_they_compare_with_the_inventory_line(tmp_path):
    path = tmp_path / "keys"
    path.write_text("# written by hand\n3+ rfc4106(gcm(aes)) 0x" + "A1" * 20 + " 128\n")
    os.chmod(path, 0o600)
    boot = tmp_path / "boot_id"
    boot.write_text("0f8d5b4e-61a1-4f5c-9b7e-2d1c9d0a8e11\n")
    info = ipsec_state.node_keys(str(path), boot_id_file=str(boot))
    assert info == {"boot_id": "0f8d5b4e-61a1-4f5c-9b7e-2d1c9d0a8e11", "keys": [KEY3], "key_ids": [3], "warnings": []}


def test_node_keys_of_a_node_without_a_key_file_or_with_a_refused_one(tmp_path):
    assert ipsec_state.node_keys(str(tmp_path / "none"))["keys"] == []
    path = tmp_path / "keys"
    path.write_text(KEY3 + "\n")
    os.chmod(path, 0o644)
    info = ipsec_state.node_keys(str(path))
    assert info["keys"] == [] and info["key_ids"] == []
    assert len(info["warnings"]) == 1 and "mode 0644" in info["warnings"][0] and "a1a1" not in info["warnings"][0]
