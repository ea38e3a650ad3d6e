#!/usr/bin/python
# -*- coding: utf-8 -*-
# Copyright: clustermesh.core contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
from __future__ import annotations

DOCUMENTATION = r"""
---
module: mesh_validate
short_description: Validate a whole cluster mesh and return it normalised
version_added: "0.1.0"
description:
  - Checks the description of every cluster of the mesh at once, on the controller, before anything is
    deployed, and fails with the list of B(all) problems found. Each problem names the field path
    (or inventory variable), the value and why it is wrong.
  - "Checks: Cilium's cluster-name rule (at most 32 characters, lowercase letters, digits and C(-), starting
    and ending with a letter or digit; the name C(default) only with cluster ID 0, which a meshed cluster
    cannot have); cluster IDs from 1 to
    C(max_connected_clusters) (255 or 511, the same for every cluster); unique cluster names,
    cluster IDs, node names and node IPs across the mesh; pod CIDRs are networks that do not overlap
    between clusters; per-node pod CIDRs lie inside their cluster's pod CIDR and do not overlap; the
    cluster pod CIDR has room for a /24 (IPv4) or /112 (IPv6) per node; node IPs are valid and outside
    every pod CIDR; C(connect_to) names other clusters of the mesh; kvstore members and proxies are
    nodes of their cluster."
  - Returns the normalised mesh, with each node's pod CIDRs allocated, C(connect_to) resolved,
    C(connected_from) computed and each cluster's security identity range.
  - Never changes anything. Run it once, on the controller (C(run_once) and C(delegate_to) V(localhost)).
  - Give the mesh either as O(clusters), or as O(inventory) (the inventory variables described in
    docs/inventory.md) from which the clusters are derived.
author:
  - clustermesh.core developers (@clustermesh)
requirements:
  - netaddr on the host the module runs on (the controller)
options:
  clusters:
    description:
      - The clusters of the mesh. Each is a mapping with the keys
        C(name) (Cilium cluster name, required),
        C(id) (cluster ID, required),
        C(pod_cidrs) (list of one IPv4 CIDR and optionally one IPv6 CIDR, required),
        C(nodes) (non-empty list of C({name, ip, pod_cidrs?, host?}); C(pod_cidrs) pins the node's CIDR(s),
        otherwise a /24 (IPv4) and a /112 (IPv6) are allocated in node order from the first free blocks;
        C(host) is the inventory host name, default C(name)),
        C(connect_to) (list of cluster names whose kvstore this cluster reads; default all other clusters),
        C(max_connected_clusters) (255 or 511, default 255, the same in every cluster),
        C(routing_mode) (V(tunnel), V(direct) or V(hybrid), default V(tunnel), the same in every cluster),
        C(kvstore_members) and C(kvstore_proxies) (lists of node names of this cluster; default the first node).
      - Mutually exclusive with O(inventory).
    type: list
    elements: dict
  inventory:
    description:
      - Ansible inventory data to derive the clusters from, instead of O(clusters).
      - Every host of the group O(mesh_group) is a node; hosts are grouped into clusters by their
        C(clustermesh_cluster_name). Cluster variables (C(clustermesh_cluster_id), C(clustermesh_pod_cidrs),
        C(clustermesh_connect_to), C(clustermesh_max_connected_clusters), C(clustermesh_routing_mode),
        C(clustermesh_kvstore_members),
        C(clustermesh_kvstore_proxies)) must be the same on every host of a cluster (set them in the cluster
        group's group_vars); node variables are C(clustermesh_node_ip) and C(clustermesh_node_pod_cidrs).
      - Only those C(clustermesh_*) variables are read. Do not pass the whole C(hostvars) (templating all of
        it fails on any unrelated undefined variable and copies secrets into the module arguments); pass only
        the C(clustermesh_*) variables as shown in the examples.
      - Mutually exclusive with O(clusters).
    type: dict
    suboptions:
      hostvars:
        description:
          - Mapping of inventory host name to that host's variables (at least its C(clustermesh_*) ones).
        type: dict
        required: true
      groups:
        description:
          - The C(groups) magic variable (group name to list of host names), or at least its O(mesh_group) entry.
        type: dict
        required: true
  mesh_group:
    description:
      - With O(inventory), the inventory group holding every node of the mesh, usually the parent of one
        group per cluster. Node order inside a cluster (which decides per-node pod CIDR allocation) is the
        order of the hosts in this group.
    type: str
    default: clusters
notes:
  - Check mode is supported and behaves the same; the module never reports a change.
  - Problems are also returned as RV(problems) when the module fails.
  - Warnings (a one-way C(connect_to), an even number of etcd members) do not fail the module.
seealso:
  - name: Cilium cluster mesh
    description: The cluster name, cluster ID and identity rules this module follows.
    link: https://docs.cilium.io/en/stable/network/clustermesh/clustermesh/
extends_documentation_fragment:
  - ansible.builtin.action_common_attributes
attributes:
  check_mode:
    support: full
    details: Validation only; the result is the same as without check mode.
  diff_mode:
    support: none
  platform:
    platforms: posix
"""

EXAMPLES = r"""
- name: Validate a mesh given explicitly
  clustermesh.core.mesh_validate:
    clusters:
      - name: cluster1
        id: 1
        pod_cidrs: [10.1.0.0/16]
        nodes:
          - {name: c1-n1, ip: 198.18.1.11}
          - {name: c1-n2, ip: 198.18.1.12}
      - name: cluster2
        id: 2
        pod_cidrs: [10.2.0.0/16, "fd00:2::/48"]
        nodes:
          - {name: c2-n1, ip: 198.18.2.11, pod_cidrs: [10.2.7.0/24]}
        connect_to: [cluster1]
  run_once: true
  delegate_to: localhost
  register: mesh_result

- name: Validate the mesh described by the inventory (group 'clusters' with one child group per cluster)
  clustermesh.core.mesh_validate:
    inventory:
      groups: "{{ groups }}"
      # only the clustermesh_* variables of the mesh hosts, never the whole hostvars
      hostvars: >-
        {{ dict(groups['clusters'] | zip(groups['clusters'] | map('extract', hostvars) | map('dict2items')
           | map('selectattr', 'key', 'match', '^clustermesh_') | map('items2dict'))) }}
  run_once: true
  delegate_to: localhost
  register: mesh_result

- name: Use this host's allocated pod CIDR later
  ansible.builtin.debug:
    msg: "{{ mesh_result.mesh.hosts[inventory_hostname].ipv4_pod_cidr }}"
"""

RETURN = r"""
mesh:
  description: The validated, normalised mesh.
  returned: success
  type: dict
  contains:
    max_connected_clusters:
      description: The mesh's max-connected-clusters setting (255 or 511).
      type: int
      sample: 255
    routing_mode:
      description: How pod traffic crosses nodes in the whole mesh (V(tunnel), V(direct) or V(hybrid)).
      type: str
      sample: tunnel
    clusters:
      description: The clusters in input order.
      type: list
      elements: dict
      contains:
        name:
          description: Cluster name.
          type: str
          sample: cluster1
        id:
          description: Cluster ID.
          type: int
          sample: 1
        max_connected_clusters:
          description: Same as the mesh's.
          type: int
          sample: 255
        pod_cidrs:
          description: The cluster's pod CIDRs in canonical form, IPv4 first.
          type: list
          elements: str
          sample: [10.1.0.0/16]
        ipv4_pod_cidr:
          description: The IPv4 pod CIDR.
          type: str
          sample: 10.1.0.0/16
        ipv6_pod_cidr:
          description: The IPv6 pod CIDR, or null.
          type: str
          sample: fd00:1::/48
        nodes:
          description: The cluster's nodes in input order; entries as in RV(mesh.hosts).
          type: list
          elements: dict
        connect_to:
          description: Clusters whose kvstore this cluster reads (default all other clusters).
          type: list
          elements: str
          sample: [cluster2]
        connected_from:
          description:
            - Clusters that read this cluster's kvstore (their C(connect_to) names this cluster); each needs a
              read-only C(remote-<cluster>) user in this cluster's etcd.
          type: list
          elements: str
          sample: [cluster2]
        kvstore_members:
          description: Node names running this cluster's etcd (default the first node).
          type: list
          elements: str
          sample: [c1-n1]
        kvstore_proxies:
          description: Node names running this cluster's kvstore proxy (default the first node).
          type: list
          elements: str
          sample: [c1-n1]
        identity_range:
          description:
            - First and last security identity the cluster allocates ((id << 16) .. ((id + 1) << 16) - 1 with
              255 clusters; shift 15 with 511).
          type: list
          elements: int
          sample: [65536, 131071]
    hosts:
      description: Every node of the mesh keyed by inventory host name.
      type: dict
      contains:
        name:
          description: Node name.
          type: str
          sample: c1-n1
        host:
          description: Inventory host name.
          type: str
          sample: c1-n1
        ip:
          description: Underlay IP.
          type: str
          sample: 198.18.1.11
        cluster:
          description: Name of the node's cluster.
          type: str
          sample: cluster1
        cluster_id:
          description: ID of the node's cluster.
          type: int
          sample: 1
        pod_cidrs:
          description: The node's pod CIDRs, IPv4 first.
          type: list
          elements: str
          sample: [10.1.0.0/24]
        ipv4_pod_cidr:
          description: The node's IPv4 pod CIDR.
          type: str
          sample: 10.1.0.0/24
        ipv6_pod_cidr:
          description: The node's IPv6 pod CIDR, or null.
          type: str
          sample: fd00:1::/112
    warnings:
      description: Things that are allowed but probably unintended (also emitted as Ansible warnings).
      type: list
      elements: str
problems:
  description: Every problem found, when the mesh is invalid.
  returned: failure
  type: list
  elements: dict
  contains:
    path:
      description: Where the value is, e.g. C(clusters[1].name) or C(hostvars['c2-n1'].clustermesh_node_ip).
      type: str
    value:
      description: The offending value (null when missing).
      type: raw
    reason:
      description: Why it is wrong.
      type: str
    message:
      description: The whole sentence.
      type: str
      sample: "clusters[1].name: 'Cluster2' is not a valid cluster name: must match ..."
"""

import traceback

from ansible.module_utils.basic import AnsibleModule, missing_required_lib

try:
    from ansible_collections.clustermesh.core.plugins.module_utils.mesh_model import (
        MeshValidationError,
        validate_inventory,
        validate_mesh,
    )
except ImportError:  # netaddr missing
    IMPORT_ERROR = traceback.format_exc()
else:
    IMPORT_ERROR = None


def main() -> None:
    module = AnsibleModule(
        argument_spec=dict(
            clusters=dict(type="list", elements="dict"),
            inventory=dict(
                type="dict",
                options=dict(
                    hostvars=dict(type="dict", required=True),
                    groups=dict(type="dict", required=True),
                ),
            ),
            mesh_group=dict(type="str", default="clusters"),
        ),
        mutually_exclusive=[("clusters", "inventory")],
        required_one_of=[("clusters", "inventory")],
        supports_check_mode=True,
    )
    if IMPORT_ERROR:
        module.fail_json(msg=missing_required_lib("netaddr"), exception=IMPORT_ERROR)
    params = module.params
    try:
        if params["clusters"] is not None:
            mesh = validate_mesh(params["clusters"])
        else:
            inv = params["inventory"]
            mesh = validate_inventory(inv["hostvars"], inv["groups"], params["mesh_group"])
    except MeshValidationError as e:
        module.fail_json(msg=str(e), problems=[p.to_dict() for p in e.problems], changed=False)
    for warning in mesh.warnings:
        module.warn(warning)
    module.exit_json(changed=False, mesh=mesh.to_dict())


if __name__ == "__main__":
    main()
