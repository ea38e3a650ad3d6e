"""IPsec on this machine's kernel, which has XFRM but no ESP (shared/reference/machine.md): what a user
whose nodes lack ESP sees. encryption.yml fails on every node naming the missing kernel feature, and
nothing is left behind: no XFRM state or policy, no key file. The encryption itself is tested on a
kernel with ESP in tests/vm/test_ipsec.py.

Lab prefix: cmix (the default lab, routing not needed: the module checks the kernel before anything).
"""

from __future__ import annotations

import json
import os

import pytest

from .labtools import REPO_ROOT, lab_session, playbook, run_in

pytestmark = pytest.mark.lab
if os.geteuid() != 0:
    pytest.skip("the lab needs root", allow_module_level=True)

PREFIX = "cmix"
ENCRYPTION = os.path.join(REPO_ROOT, "playbooks", "encryption.yml")
HOSTS = ("c1-n1", "c1-n2", "c2-n1", "c2-n2")


@pytest.fixture(scope="module")
def lab_up():
    with lab_session(PREFIX):
        yield


def test_kernel_without_esp_fails_naming_it_and_leaves_nothing(lab_up, tmp_path):
    key = "3+ rfc4106(gcm(aes)) %s 128" % os.urandom(20).hex()
    key_file = tmp_path / "ipsec.key"
    key_file.write_text(key + "\n")
    key_file.chmod(0o600)
    extra = {"clustermesh_encryption": "ipsec", "clustermesh_ipsec_key_file": str(key_file)}
    run = playbook(PREFIX, ENCRYPTION, "-e", json.dumps(extra), check=False)
    assert run.returncode != 0
    assert "no ESP support (module esp4 missing)" in run.output
    assert "nothing was changed" in run.output
    assert key.split()[2][:12] not in run.output
    for host in HOSTS:
        state = run_in(PREFIX, host, "sh", "-c", "ip xfrm state; ip xfrm policy; ls /etc/clustermesh/ipsec 2>&1; true")
        assert state.stdout.strip().endswith("No such file or directory"), (host, state.stdout)
        assert "src" not in state.stdout


def test_key_file_readable_by_others_is_refused_before_any_node_changes(lab_up, tmp_path):
    key_file = tmp_path / "ipsec.key"
    key_file.write_text("3+ rfc4106(gcm(aes)) %s 128\n" % os.urandom(20).hex())
    key_file.chmod(0o644)
    extra = {"clustermesh_encryption": "ipsec", "clustermesh_ipsec_key_file": str(key_file)}
    run = playbook(PREFIX, ENCRYPTION, "-e", json.dumps(extra), check=False)
    assert run.returncode != 0
    assert "has mode 0644" in run.output and "chmod 0600" in run.output
    assert "clustermesh.core.ipsec" not in run.output  # the module never ran


def test_encryption_off_removes_nothing_foreign_and_changes_nothing(lab_up):
    # a state and policy of someone else's on a node stay; with encryption off the play changes nothing
    run_in(
        PREFIX,
        "c1-n1",
        "ip",
        "xfrm",
        "policy",
        "add",
        "dir",
        "out",
        "src",
        "192.0.2.0/24",
        "dst",
        "192.0.2.0/24",
        "action",
        "block",
        "priority",
        "7",
    )
    try:
        run = playbook(PREFIX, ENCRYPTION)
        assert run.changed_hosts() == []
        assert "192.0.2.0/24" in run_in(PREFIX, "c1-n1", "ip", "xfrm", "policy").stdout
    finally:
        run_in(PREFIX, "c1-n1", "ip", "xfrm", "policy", "flush", check=False)
