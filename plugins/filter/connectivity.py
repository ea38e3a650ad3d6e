# -*- coding: utf-8 -*-
# Copyright: clustermesh.core contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""Filters of playbooks/connectivity.yml (docs in the .yml files beside this one)."""

from __future__ import annotations

from ansible.errors import AnsibleFilterError

from ansible_collections.clustermesh.core.plugins.module_utils.probe import (
    expectation_plan,
    matrix,
    probe_targets,
    service_line,
)


def connectivity_matrix(rows):
    try:
        return matrix(rows)
    except (KeyError, TypeError) as exc:
        raise AnsibleFilterError("connectivity_matrix: malformed rows: %s" % exc) from None


def service_check_line(result):
    try:
        return service_line(result)
    except (KeyError, TypeError) as exc:
        raise AnsibleFilterError("service_check_line: malformed result: %s" % exc) from None


def connectivity_plan(expect, hosts, pod_labels=None):
    if not isinstance(hosts, dict):
        raise AnsibleFilterError("connectivity_plan: hosts must be a mapping {host: cluster name}")
    return expectation_plan(expect, dict(hosts), dict(pod_labels or {}))


def connectivity_targets(names, ips, paths=None):
    try:
        return probe_targets(list(names), list(ips), paths)
    except (TypeError, ValueError) as exc:
        raise AnsibleFilterError("connectivity_targets: %s" % exc) from None


class FilterModule:
    def filters(self):
        return {
            "connectivity_matrix": connectivity_matrix,
            "service_check_line": service_check_line,
            "connectivity_plan": connectivity_plan,
            "connectivity_targets": connectivity_targets,
        }
