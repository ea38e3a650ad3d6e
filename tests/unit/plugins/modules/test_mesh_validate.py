# -*- coding: utf-8 -*-
# Copyright: clustermesh.core contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""Tests for plugins/modules/mesh_validate.py: in process (ansible-core's patch_module_args) and end
to end through ``ansible`` / ``ansible-playbook`` on the implicit localhost."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from ansible.module_utils.testing import patch_module_args

from ansible_collections.clustermesh.core.plugins.modules import mesh_validate

REPO_ROOT = Path(__file__).resolve().parents[4]
BIN = Path(sys.executable).parent


def two_clusters() -> list[dict]:
    return [
        {
            "name": "cluster1",
            "id": 1,
            "pod_cidrs": ["10.1.0.0/16"],
            "nodes": [{"name": "c1-n1", "ip": "198.18.1.11"}, {"name": "c1-n2", "ip": "198.18.1.12"}],
        },
        {
            "name": "cluster2",
            "id": 2,
            "pod_cidrs": ["10.2.0.0/16"],
            "nodes": [{"name": "c2-n1", "ip": "198.18.2.11"}],
        },
    ]


def run_module(args: dict, capsys) -> tuple[int, dict]:
    with patch_module_args(args), pytest.raises(SystemExit) as exc:
        mesh_validate.main()
    return exc.value.code, json.loads(capsys.readouterr().out)


# --- in process -----------------------------------------------------------------------------------


@pytest.mark.parametrize("check_mode", [False, True])
def test_module_returns_normalised_mesh(capsys, check_mode):
    rc, result = run_module({"clusters": two_clusters(), "_ansible_check_mode": check_mode}, capsys)
    assert rc == 0, result
    assert result["changed"] is False
    mesh = result["mesh"]
    assert [c["name"] for c in mesh["clusters"]] == ["cluster1", "cluster2"]
    assert mesh["hosts"]["c1-n2"]["ipv4_pod_cidr"] == "10.1.1.0/24"
    assert mesh["clusters"][1]["connected_from"] == ["cluster1"]
    assert mesh["clusters"][1]["identity_range"] == [131072, 196607]
    assert "warnings" not in result or not result["warnings"]


def test_module_reports_all_problems(capsys):
    clusters = two_clusters()
    clusters[1]["name"] = "Cluster2"
    clusters[1]["id"] = 256
    clusters[1]["nodes"][0]["ip"] = "198.18.1.11"
    rc, result = run_module({"clusters": clusters}, capsys)
    assert rc == 1
    assert result["failed"] is True and result["changed"] is False
    paths = [p["path"] for p in result["problems"]]
    assert paths == ["clusters[1].id", "clusters[1].name", "clusters[1].nodes[0].ip"]
    assert result["msg"].startswith("3 problems in the mesh definition:\n")
    assert "clusters[1].name: 'Cluster2' is not a valid cluster name" in result["msg"]
    name_problem = result["problems"][1]
    assert name_problem["value"] == "Cluster2"
    assert name_problem["message"] == f"clusters[1].name: 'Cluster2' {name_problem['reason']}"


def test_module_warns(capsys):
    clusters = two_clusters()
    clusters[1]["connect_to"] = []
    rc, result = run_module({"clusters": clusters}, capsys)
    assert rc == 0
    assert len(result["warnings"]) == 1  # ansible-core 2.19 returns structured warnings
    assert "cluster 'cluster1' connects to 'cluster2' but 'cluster2' does not" in json.dumps(result["warnings"])
    assert len(result["mesh"]["warnings"]) == 1


def test_module_from_inventory(capsys):
    hostvars = {
        "a": {"clustermesh_cluster_name": "east", "clustermesh_cluster_id": 5, "clustermesh_node_ip": "198.18.5.1"},
        "b": {"clustermesh_cluster_name": "west", "clustermesh_cluster_id": 6, "clustermesh_node_ip": "198.18.6.1"},
    }
    hostvars["a"]["clustermesh_pod_cidrs"] = ["10.5.0.0/16"]
    hostvars["b"]["clustermesh_pod_cidrs"] = ["10.6.0.0/16"]
    groups = {"all": ["a", "b"], "mesh": ["a", "b"]}
    rc, result = run_module({"inventory": {"hostvars": hostvars, "groups": groups}, "mesh_group": "mesh"}, capsys)
    assert rc == 0, result
    assert result["mesh"]["hosts"]["b"]["pod_cidrs"] == ["10.6.0.0/24"]
    hostvars["b"]["clustermesh_cluster_id"] = 5
    rc, result = run_module({"inventory": {"hostvars": hostvars, "groups": groups}, "mesh_group": "mesh"}, capsys)
    assert rc == 1
    assert [p["message"] for p in result["problems"]] == [
        "hostvars['b'].clustermesh_cluster_id: 5 is already the cluster ID of cluster 'east' (hosts a): "
        "cluster IDs must be unique in the mesh"
    ]


def test_module_needs_exactly_one_input(capsys):
    rc, result = run_module({}, capsys)
    assert rc == 1 and "one of the following is required: clusters, inventory" in result["msg"]
    rc, result = run_module({"clusters": two_clusters(), "inventory": {"hostvars": {}, "groups": {}}}, capsys)
    assert rc == 1 and "mutually exclusive" in result["msg"]


# --- end to end -----------------------------------------------------------------------------------


@pytest.fixture
def ansible_env(tmp_path):
    if not (BIN / "ansible").exists():
        pytest.skip("ansible is not installed next to the test interpreter")
    collections = tmp_path / "collections"
    (collections / "ansible_collections" / "clustermesh").mkdir(parents=True)
    (collections / "ansible_collections" / "clustermesh" / "core").symlink_to(REPO_ROOT)
    env = {k: v for k, v in os.environ.items() if not k.startswith("ANSIBLE_")}
    env.update(
        ANSIBLE_COLLECTIONS_PATH=str(collections),
        ANSIBLE_HOME=str(tmp_path / "ansible-home"),
        ANSIBLE_LOCAL_TEMP=str(tmp_path / "ansible-tmp"),
        ANSIBLE_NOCOLOR="1",
        ANSIBLE_FORCE_COLOR="0",
        PATH=f"{BIN}:{env.get('PATH', '')}",
    )
    yield env
    shutil.rmtree(tmp_path / "ansible-home", ignore_errors=True)


def adhoc(env: dict, cwd: Path, args: dict, *flags: str) -> tuple[int, dict, str]:
    proc = subprocess.run(
        [str(BIN / "ansible"), "localhost", *flags, "-m", "clustermesh.core.mesh_validate", "-a", json.dumps(args)],
        env=env,
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    out = proc.stdout
    start = out.index("localhost | ")
    return proc.returncode, json.loads(out[start:].split(" => ", 1)[1]), proc.stderr


def test_adhoc_success_in_check_mode(ansible_env, tmp_path):
    clusters = two_clusters()
    clusters[0]["connect_to"] = ["cluster2"]
    rc, result, unused = adhoc(ansible_env, tmp_path, {"clusters": clusters}, "--check")
    assert rc == 0, result
    assert result["changed"] is False
    assert result["mesh"]["clusters"][0]["nodes"][1]["ipv4_pod_cidr"] == "10.1.1.0/24"
    assert result["mesh"]["clusters"][1]["connect_to"] == ["cluster1"]


def test_adhoc_failure_lists_every_problem(ansible_env, tmp_path):
    clusters = two_clusters()
    clusters[0]["name"] = "c" * 33
    clusters[1]["pod_cidrs"] = ["10.1.128.0/17"]
    clusters[1]["connect_to"] = ["cluster9"]
    rc, result, unused = adhoc(ansible_env, tmp_path, {"clusters": clusters})
    assert rc == 2
    messages = [p["message"] for p in result["problems"]]
    assert len(messages) == 3, messages
    assert messages[0].startswith(f"clusters[0].name: '{'c' * 33}' is not a valid cluster name")
    assert messages[1].startswith("clusters[1].pod_cidrs[0]: '10.1.128.0/17' overlaps clusters[0].pod_cidrs[0]")
    assert messages[2].startswith("clusters[1].connect_to[0]: 'cluster9' is not a cluster of this mesh")


INVENTORY = """\
all:
  vars:
    ansible_connection: local
    ansible_python_interpreter: {python}
  children:
    clusters:
      children:
        cluster1:
          hosts:
            c1-n1: {{clustermesh_node_ip: 198.18.1.11}}
            c1-n2: {{clustermesh_node_ip: 198.18.1.12, some_password: hunter2}}
          vars:
            clustermesh_cluster_name: cluster1
            clustermesh_cluster_id: 1
            clustermesh_pod_cidrs: [10.1.0.0/16]
            unrelated: "{{{{ this_is_undefined }}}}"
        cluster2:
          hosts:
            c2-n1: {{clustermesh_node_ip: 198.18.2.11, clustermesh_node_pod_cidrs: [10.2.7.0/24]}}
          vars:
            clustermesh_cluster_name: cluster2
            clustermesh_cluster_id: "{{{{ 1 + 1 }}}}"
            clustermesh_pod_cidrs: [10.2.0.0/16]
            clustermesh_connect_to: [cluster1]
"""

PLAYBOOK = """\
- hosts: clusters
  gather_facts: false
  tasks:
    - name: Validate the mesh described by the inventory
      clustermesh.core.mesh_validate:
        inventory:
          groups: "{{ groups }}"
          hostvars: >-
            {{ dict(groups['clusters'] | zip(groups['clusters'] | map('extract', hostvars) | map('dict2items')
               | map('selectattr', 'key', 'match', '^clustermesh_') | map('items2dict'))) }}
      run_once: true
      delegate_to: localhost
      register: mesh_result
      ignore_errors: true

    - name: Save the result
      ansible.builtin.copy:
        content: "{{ mesh_result | to_json }}"
        dest: "{{ playbook_dir }}/result.json"
        mode: "0644"
      run_once: true
      delegate_to: localhost
"""


def run_playbook(env: dict, tmp_path: Path, inventory: str) -> tuple[subprocess.CompletedProcess, dict]:
    (tmp_path / "inventory.yml").write_text(inventory)
    (tmp_path / "site.yml").write_text(PLAYBOOK)
    proc = subprocess.run(
        [str(BIN / "ansible-playbook"), "-i", "inventory.yml", "site.yml"],
        env=env,
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=180,
        check=False,
    )
    assert (tmp_path / "result.json").exists(), proc.stdout + proc.stderr
    return proc, json.loads((tmp_path / "result.json").read_text())


def test_playbook_from_inventory(ansible_env, tmp_path):
    proc, result = run_playbook(ansible_env, tmp_path, INVENTORY.format(python=sys.executable))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert not result.get("failed"), result
    mesh = result["mesh"]
    assert {h: v["pod_cidrs"] for h, v in mesh["hosts"].items()} == {
        "c1-n1": ["10.1.0.0/24"],
        "c1-n2": ["10.1.1.0/24"],
        "c2-n1": ["10.2.7.0/24"],
    }
    assert mesh["clusters"][1]["id"] == 2
    assert mesh["clusters"][0]["connect_to"] == ["cluster2"]
    assert mesh["clusters"][0]["connected_from"] == ["cluster2"]
    # only the clustermesh_* variables reach the module: the undefined 'unrelated' did not break it
    assert "hunter2" not in json.dumps(result)


def test_playbook_from_inventory_reports_inventory_variables(ansible_env, tmp_path):
    inventory = INVENTORY.format(python=sys.executable)
    inventory = inventory.replace("clustermesh_cluster_name: cluster2", "clustermesh_cluster_name: Cluster2")
    inventory = inventory.replace("198.18.2.11", "10.1.3.4")
    unused, result = run_playbook(ansible_env, tmp_path, inventory)
    assert result["failed"] is True
    assert [p["message"] for p in result["problems"]] == [
        "hostvars['c2-n1'].clustermesh_cluster_name: 'Cluster2' is not a valid cluster name: must match "
        "^([a-z0-9][-a-z0-9]*)?[a-z0-9]$ (lowercase letters, digits and '-', starting and ending with a letter "
        "or digit, at most 32 characters)",
        "hostvars['c2-n1'].clustermesh_node_ip: '10.1.3.4' is inside the pod CIDR '10.1.0.0/16' of "
        "hostvars['c1-n1'].clustermesh_pod_cidrs[0] (cluster 'cluster1'): node IPs must lie outside every pod CIDR",
    ]
