# -*- coding: utf-8 -*-
# Copyright: clustermesh.core contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""Filters of playbooks/connectivity.yml (docs in the .yml files beside this one)."""

from __future__ import annotations

from ansible.errors import AnsibleFilterError

from ansible_collections.clustermesh.core.plugins.module_utils.probe import matrix, service_line


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


class FilterModule:
    def filters(self):
        return {"connectivity_matrix": connectivity_matrix, "service_check_line": service_check_line}
