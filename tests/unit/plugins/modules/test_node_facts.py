# -*- coding: utf-8 -*-
# Copyright: clustermesh.core contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import yaml
from ansible.module_utils.testing import patch_module_args

from ansible_collections.clustermesh.core.plugins.module_utils import kernel_features as kf
from ansible_collections.clustermesh.core.plugins.modules import node_facts

needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="needs root (namespaces, bpf(2))")


def run_module(capsys, args):
    """Run node_facts.main() with ``args``; returns (exit code, result dict)."""
    with patch_module_args(args), pytest.raises(SystemExit) as info:
        node_facts.main()
    return info.value.code, json.loads(capsys.readouterr().out)


def fake_detect(available):
    """A detect() stand-in: every selected feature is available iff its name is in ``available``."""

    def detect(probes=None, timeout=None):
        groups, _underlay = kf.select_groups(probes)
        results = {
            name: kf.feature(name in available, f"fake {name}") for group in groups for name in kf.PROBE_GROUPS[group]
        }
        flat, missing = kf.summarize(results)
        return {"kernel": {}, "probed": groups, "features": flat, "missing": missing, "probes": results}

    return detect


def test_documentation_matches_the_argument_spec():
    doc = yaml.safe_load(node_facts.DOCUMENTATION)
    assert doc["module"] == "node_facts"
    options = doc["options"]
    assert set(options) == {"probes", "required", "timeout"}
    assert options["probes"]["choices"] == ["all", *kf.ALL_PROBES]
    assert options["probes"]["default"] == ["all"]
    assert options["timeout"]["default"] == kf.DEFAULT_TIMEOUT
    yaml.safe_load(node_facts.EXAMPLES)
    returned = yaml.safe_load(node_facts.RETURN)["ansible_facts"]["contains"][node_facts.FACT_NAME]["contains"]
    assert set(returned) == {"kernel", "probed", "features", "missing", "probes", "underlay"}


def test_facts_are_returned_unchanged(capsys, monkeypatch):
    monkeypatch.setattr(node_facts, "detect", fake_detect({"vxlan"}))
    code, result = run_module(capsys, {"probes": ["vxlan", "geneve"]})
    assert code == 0
    assert result["changed"] is False
    facts = result["ansible_facts"]["clustermesh_node"]
    assert facts["features"] == {"geneve": False, "vxlan": True}
    assert facts["missing"] == ["geneve"]


def test_required_feature_missing_fails_with_the_reason(capsys, monkeypatch):
    monkeypatch.setattr(node_facts, "detect", fake_detect({"xfrm"}))
    code, result = run_module(capsys, {"probes": ["xfrm", "esp"], "required": ["xfrm", "esp", "esp_gcm_aes"]})
    assert code == 1
    assert result["failed"] is True
    assert result["msg"] == "required kernel feature(s) missing: esp: fake esp; esp_gcm_aes: fake esp_gcm_aes"
    assert result["ansible_facts"]["clustermesh_node"]["features"]["xfrm"] is True


def test_required_feature_present_passes(capsys, monkeypatch):
    monkeypatch.setattr(node_facts, "detect", fake_detect({"vxlan"}))
    code, result = run_module(capsys, {"probes": ["vxlan"], "required": ["vxlan"]})
    assert code == 0 and not result.get("failed")


def test_required_feature_not_probed(capsys, monkeypatch):
    monkeypatch.setattr(node_facts, "detect", fake_detect(set()))
    code, result = run_module(capsys, {"probes": ["vxlan"], "required": ["esp"]})
    assert code == 1
    assert result["msg"] == (
        "required feature(s) esp are not reported by the selected probes vxlan: add their probes to 'probes'"
    )


def test_required_unknown_feature(capsys, monkeypatch):
    monkeypatch.setattr(node_facts, "detect", fake_detect(set()))
    code, result = run_module(capsys, {"required": ["ipsec"]})
    assert code == 1
    assert result["msg"].startswith("required names unknown feature(s) ipsec; features are: bpf, bpf_jit")


def test_unknown_probe_is_refused(capsys):
    code, result = run_module(capsys, {"probes": ["bogus"]})
    assert code == 1
    assert "bogus" in result["msg"]


def test_timeout_must_be_positive(capsys):
    code, result = run_module(capsys, {"timeout": 0})
    assert code == 1
    assert "timeout must be a positive number" in result["msg"]


@needs_root
def test_real_run_in_check_mode(capsys):
    before = subprocess.run(["ip", "-o", "link"], capture_output=True, text=True, check=True).stdout
    code, result = run_module(capsys, {"_ansible_check_mode": True})
    after = subprocess.run(["ip", "-o", "link"], capture_output=True, text=True, check=True).stdout
    assert before == after
    assert code == 0 and result["changed"] is False
    facts = result["ansible_facts"]["clustermesh_node"]
    assert set(facts["features"]) == {n for group in kf.PROBE_GROUPS.values() for n in group}
    assert facts["kernel"]["release"] == os.uname().release
    assert "ipv4" in facts["underlay"]


@needs_root
def test_module_file_runs_as_a_script(tmp_path):
    """The module as Ansible ships it: a script reading its arguments from a JSON file."""
    args = tmp_path / "args.json"
    args.write_text(json.dumps({"ANSIBLE_MODULE_ARGS": {"probes": ["vxlan", "bpf"]}}))
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in sys.path if p))
    proc = subprocess.run(
        [sys.executable, node_facts.__file__, str(args)], capture_output=True, text=True, env=env, check=False
    )
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout)
    assert sorted(result["ansible_facts"]["clustermesh_node"]["features"]) == ["bpf", "vxlan"]
