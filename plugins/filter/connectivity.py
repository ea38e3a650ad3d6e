# -*- coding: utf-8 -*-
# Copyright: clustermesh.core contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""Filters of playbooks/connectivity.yml (docs in the .yml files beside this one)."""

from __future__ import annotations

from ansible.errors import AnsibleFilterError

from ansible_collections.clustermesh.core.plugins.module_utils.probe import matrix


def connectivity_matrix(rows):
    try:
        return matrix(rows)
    except (KeyError, TypeError) as exc:
        raise AnsibleFilterError("connectivity_matrix: malformed rows: %s" % exc) from None


class FilterModule:
    def filters(self):
        return {"connectivity_matrix": connectivity_matrix}
