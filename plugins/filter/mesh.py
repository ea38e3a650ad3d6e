# -*- coding: utf-8 -*-
# Copyright: clustermesh.core contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""Filters that let playbooks ask the library about the mesh (docs in the .yml files beside this one)."""

from __future__ import annotations

from ansible.errors import AnsibleFilterError

from ansible_collections.clustermesh.core.plugins.module_utils.control_plane import certificate_plan, node_files
from ansible_collections.clustermesh.core.plugins.module_utils.routing_plan import routing_inputs

PREFIX = "clustermesh_"
# clustermesh_* variables that hold secrets: never templated here, never in a module's arguments
SECRET_VARS = frozenset(("clustermesh_ipsec_key",))


def mesh_vars(hostvars, hosts):
    """Only the clustermesh_* variables of ``hosts``: reading them one by one keeps every other
    variable (and any secret in it) untemplated and out of the module arguments."""
    result = {}
    for host in hosts:
        host_vars = hostvars[host]
        result[host] = {key: host_vars[key] for key in host_vars if key.startswith(PREFIX) and key not in SECRET_VARS}
    return result


def mesh_certificates(mesh, pki_dir):
    try:
        return certificate_plan(mesh, pki_dir)
    except KeyError as exc:
        raise AnsibleFilterError("mesh_certificates: %s" % exc) from None


def mesh_node_files(mesh, node, pki_dir):
    try:
        return node_files(mesh, node, pki_dir)
    except KeyError as exc:
        raise AnsibleFilterError("mesh_node_files: %s" % exc) from None


def mesh_routing(mesh, host):
    try:
        return routing_inputs(mesh, host)
    except KeyError as exc:
        raise AnsibleFilterError("mesh_routing: %s" % exc) from None


class FilterModule:
    def filters(self):
        return {
            "mesh_vars": mesh_vars,
            "mesh_certificates": mesh_certificates,
            "mesh_node_files": mesh_node_files,
            "mesh_routing": mesh_routing,
        }
