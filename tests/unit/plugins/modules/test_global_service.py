# -*- coding: utf-8 -*-
# Copyright: clustermesh.core contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""global_service: argument handling and validation before any connection (no etcd here; the
endpoint given is a closed port, so a test that got as far as connecting would fail with a kvstore
error instead of the validation message it expects). The etcd round trip: tests/lab/test_global_service.py."""

from __future__ import annotations

import json

import pytest
from ansible.module_utils.testing import patch_module_args

from ansible_collections.clustermesh.core.plugins.modules import global_service
from ansible_collections.clustermesh.core.tests.etcd_fixture import free_port

BASE = {
    "name": "rebel-base",
    "cluster_ip": "172.30.1.10",
    "ports": [{"name": "http", "port": 80}],
    "selector": {"name": "rebel-base"},
}


def run(args, capsys):
    args = {"endpoints": [f"https://127.0.0.1:{free_port()}"], "timeout": 1.0, **args}
    with patch_module_args(args), pytest.raises(SystemExit) as exc:
        global_service.main()
    return exc.value.code, json.loads(capsys.readouterr().out)


def params(**changes):
    """Module parameters as AnsibleModule fills them (defaults included)."""
    p = {
        "namespace": "default",
        "global": True,
        "shared": None,
        "affinity": "none",
        "health_check": {
            "type": "tcp",
            "port": None,
            "path": None,
            "interval": 2.0,
            "timeout": None,
            "healthy_threshold": 1,
            "unhealthy_threshold": 1,
        },
        **BASE,
    }
    p["ports"] = [{"name": "http", "port": 80, "protocol": "TCP", "target_port": None}]
    p.update(changes)
    return p


def test_defaults_make_a_global_shared_service():
    doc = global_service.declaration_from_params(params())
    assert doc["annotations"] == {
        "service.cilium.io/global": "true",
        "service.cilium.io/shared": "true",
        "service.cilium.io/affinity": "none",
    }
    assert doc["ports"] == [{"name": "http", "port": 80, "protocol": "TCP", "targetPort": 80}]
    assert doc["healthCheck"] == {
        "type": "tcp",
        "port": None,
        "interval": 2.0,
        "timeout": 1.0,
        "healthyThreshold": 1,
        "unhealthyThreshold": 1,
    }
    assert doc["namespace"] == "default" and doc["clusterIP"] == "172.30.1.10"


def test_shared_false_and_affinity_become_annotations():
    doc = global_service.declaration_from_params(params(shared=False, affinity="local"))
    assert doc["annotations"]["service.cilium.io/shared"] == "false"
    assert doc["annotations"]["service.cilium.io/affinity"] == "local"


def test_not_global_is_stored_canonically():
    doc = global_service.declaration_from_params(params(**{"global": False, "shared": True, "affinity": "local"}))
    assert doc["annotations"] == {
        "service.cilium.io/global": "false",
        "service.cilium.io/shared": "false",
        "service.cilium.io/affinity": "none",
    }


@pytest.mark.parametrize(
    "changes, message",
    [
        ({"cluster_ip": "172.30.1"}, "cluster_ip: '172.30.1' is not an IP address"),
        ({"ports": [{"name": "http", "port": 0}]}, "ports[0].port: 0 is outside 1..65535"),
        ({"ports": [{"name": "http", "port": 80, "target_port": 99999}]}, "ports[0].target_port: 99999 is outside"),
        ({"ports": [{"port": 80}, {"port": 81}]}, "ports[0].name: is required when a service has more than one port"),
        ({"selector": {"name": "a b"}}, "selector['name']: label value 'a b' is invalid"),
        ({"namespace": "Default"}, "namespace 'Default' is not a DNS label"),
        ({"name": "rebel_base"}, "service name 'rebel_base' is not a DNS label"),
        ({"health_check": {"path": "/healthz"}}, "health_check.path: is only used by type http"),
        ({"health_check": {"interval": 1, "timeout": 5}}, "health_check.timeout: 5.0 is longer than the interval"),
        ({"health_check": {"unhealthy_threshold": 0}}, "health_check.unhealthy_threshold: 0 is not a count"),
    ],
)
def test_bad_input_fails_naming_the_field_before_connecting(changes, message, capsys):
    code, result = run({**BASE, **changes}, capsys)
    assert code == 1 and result["failed"]
    assert message in result["msg"]
    assert "kvstore" not in result["msg"]


@pytest.mark.parametrize(
    "args, message",
    [
        ({"name": "rebel-base"}, "state is present but all of the following are missing: cluster_ip, ports"),
        ({**BASE, "ports": [{"name": "http", "port": 80, "protocol": "SCTP"}]}, "protocol"),
        ({**BASE, "affinity": "nearest"}, "affinity"),
    ],
)
def test_ansible_level_errors(args, message, capsys):
    code, result = run(args, capsys)
    assert code == 1 and message in result["msg"]


def test_unreachable_kvstore_is_reported_with_the_key(capsys):
    code, result = run(BASE, capsys)
    assert code == 1 and result["msg"].startswith("kvstore: ")
    assert result["key"] == "cilium/clustermesh-core/services/v1/default/rebel-base"


def test_a_missing_kvstore_config_file_is_a_clean_failure(capsys, tmp_path):
    missing = str(tmp_path / "kvstore.yaml")
    with patch_module_args({"kvstore_config": missing, **BASE}), pytest.raises(SystemExit) as exc:
        global_service.main()
    result = json.loads(capsys.readouterr().out)
    assert exc.value.code == 1 and result["msg"].startswith("kvstore: ") and missing in result["msg"], result
