"""The filters of playbooks/connectivity.yml: what the playbook passes them and what it reads back."""

from __future__ import annotations

import pytest
from ansible.errors import AnsibleFilterError

from ansible_collections.clustermesh.core.plugins.filter.connectivity import FilterModule

FILTERS = FilterModule().filters()
HOSTS = {"c1-n1": "cluster1", "c2-n1": "cluster2"}


def test_plan_resolves_expectations_and_labels_per_host():
    expect = [{"from": "cluster1", "to": "all", "expect": "deny", "protocol": "tcp"}]
    plan = FILTERS["connectivity_plan"](expect, HOSTS, {"c1-n1": {"role": "x-wing"}, "c2-n1": {}})
    assert plan["errors"] == []
    assert plan["paths"]["c1-n1"] == {"c2-n1": {"icmp": "allow", "tcp": "deny"}}
    assert plan["denied_tcp"] == {"c1-n1": ["c1-n1", "c2-n1"], "c2-n1": []}  # "all" includes its own pod
    assert plan["labels"] == {
        "c1-n1": {"app": "clustermesh-probe", "role": "x-wing"},
        "c2-n1": {"app": "clustermesh-probe"},
    }


def test_plan_reports_bad_entries_instead_of_raising():
    plan = FILTERS["connectivity_plan"]([{"from": "c1-n1", "to": "c9-n9", "expect": "deny"}], HOSTS)
    assert plan["errors"][0].startswith("connectivity_expect[0].to: 'c9-n9' is not a host or cluster")
    with pytest.raises(AnsibleFilterError, match="hosts must be a mapping"):
        FILTERS["connectivity_plan"]([], ["c1-n1"])


def test_targets_pair_names_ips_and_expectations():
    targets = FILTERS["connectivity_targets"](["c2-n1"], ["10.2.0.2"], {"c2-n1": {"icmp": "deny", "tcp": "deny"}})
    assert targets == [{"name": "c2-n1", "ip": "10.2.0.2", "expect": {"icmp": "deny", "tcp": "deny"}}]
    with pytest.raises(AnsibleFilterError, match="connectivity_targets"):
        FILTERS["connectivity_targets"](["c2-n1", "c2-n2"], ["10.2.0.2"])


def test_matrix_and_service_line_name_the_problem_of_malformed_input():
    with pytest.raises(AnsibleFilterError, match="connectivity_matrix: malformed rows"):
        FILTERS["connectivity_matrix"]([{"client": "a"}])
    skipped = {"client": "c1-n1", "name": "cluster1", "ip": "172.30.1.254", "port": 8080, "skipped": "why"}
    assert FILTERS["service_check_line"](skipped).endswith("skipped, why")
