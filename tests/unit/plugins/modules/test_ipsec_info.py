# -*- coding: utf-8 -*-
# Copyright: clustermesh.core contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
from __future__ import annotations

import json
import os

import pytest
import yaml
from ansible.module_utils.testing import patch_module_args

from ansible_collections.clustermesh.core.plugins.modules import ipsec_info

KEY = "4 rfc4106(gcm(aes)) " + "c3" * 20 + " 128"


def run_module(capsys, args):
    with patch_module_args(args), pytest.raises(SystemExit) as info:
        ipsec_info.main()
    return info.value.code, json.loads(capsys.readouterr().out)


def test_documentation_matches_the_argument_spec():
    doc = yaml.safe_load(ipsec_info.DOCUMENTATION)
    assert doc["module"] == "ipsec_info" and set(doc["options"]) == {"key_file"}
    assert set(yaml.safe_load(ipsec_info.RETURN)) == {"boot_id", "keys", "key_ids"}
    yaml.safe_load(ipsec_info.EXAMPLES)


def test_reports_the_boot_id_and_the_keys_and_changes_nothing(capsys, tmp_path):
    path = tmp_path / "keys"
    path.write_text(KEY + "\n")
    os.chmod(path, 0o600)
    code, result = run_module(capsys, {"key_file": str(path), "_ansible_check_mode": True})
    assert code == 0 and result["changed"] is False
    assert result["keys"] == [KEY] and result["key_ids"] == [4]
    with open("/proc/sys/kernel/random/boot_id") as f:
        assert result["boot_id"] == f.read().strip()


def test_a_refused_key_file_is_a_warning_not_a_failure(capsys, tmp_path):
    path = tmp_path / "keys"
    path.write_text(KEY + "\n")
    os.chmod(path, 0o644)
    code, result = run_module(capsys, {"key_file": str(path)})
    assert code == 0 and result["keys"] == []
    assert "mode 0644" in json.dumps(result["warnings"])
    assert "c3c3" not in json.dumps(result["warnings"])
