#!/usr/bin/python
# -*- coding: utf-8 -*-
# Copyright: clustermesh.core contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)

from __future__ import annotations

DOCUMENTATION = r"""
module: routing
short_description: Route pod CIDRs to peer nodes (tunnel, direct, hybrid); masquerade traffic leaving the mesh
description:
  - Computes this node's routing plan from O(node), O(peers) and O(mode), compares it with the kernel state
    the collection owns, applies only the difference and removes what it owns that is no longer wanted.
  - Owned state, and nothing else, is changed. The VXLAN device C(cm_vxlan) (classic VXLAN, VNI 2, UDP port
    8472, no learning, a fixed MAC per node, MTU of the underlay minus 50, the node's overlay address
    (first address of its pod CIDR) as C(/32)) with a permanent FDB entry and a permanent neighbour per
    tunnelled peer; routes with protocol 203 in the main table; the nftables table C(ip clustermesh).
  - Tunnelled peer, route C(<peer pod CIDR> via <peer overlay IP> dev cm_vxlan onlink proto 203).
    Direct peer, route C(<peer pod CIDR> via <peer underlay IP> proto 203) on the underlay interface.
    External peer (O(mode=direct) with O(external_router)), nothing.
  - Sets C(net.ipv4.ip_forward) to 1 when it is 0 (never resets it).
  - Routes with protocol 204 (host routes of local pods, owned by the CNI plugin) and every other route,
    device or table are never touched. A route to a peer's pod CIDR that already exists with another
    protocol, or a foreign VXLAN device on port 8472 in the way, is an error.
  - Every problem (bad input, off-link peer in direct mode, no interface holding the node IP, something
    in the way) is reported before anything is changed.
  - Switching modes removes every device, route, FDB entry and neighbour of the previous mode; a route
    whose destination stays is replaced in place, never deleted and re-added.
  - The underlay is IPv4. Routes to IPv6 pod CIDRs and IPv6 masquerade are skipped with a warning.
version_added: 0.1.0
author:
  - clustermesh.core developers (@clustermesh)
extends_documentation_fragment:
  - clustermesh.core.routing_peers
  - ansible.builtin.action_common_attributes
options:
  masquerade:
    description:
      - Keep the nftables table C(ip clustermesh), which SNATs to the node IP the traffic from this node's
        pod CIDR to destinations outside every O(mesh_pod_cidrs). Pod-to-pod traffic is never translated.
      - V(false) removes the table.
    type: bool
    default: true
  mesh_pod_cidrs:
    description:
      - Pod CIDRs of the whole mesh, traffic to which is never masqueraded (the C(mesh_pod_cidrs) of the
        filter M(clustermesh.core.mesh_routing)).
      - The pod CIDRs of O(node) and O(peers) are always added. Default, just those.
    type: list
    elements: str
    default: []
  underlay_interface:
    description:
      - The interface for the VXLAN device and direct routes. Default, the interface that holds the node IP.
      - Whether a peer is on-link is always decided by the prefix of the node IP's address.
    type: str
  state:
    description:
      - V(present) makes the kernel state match the plan.
      - V(absent) removes everything the collection owns for routing (C(cm_vxlan) with its FDB entries and
        neighbours, every protocol 203 route, the table C(ip clustermesh)); O(node), O(peers) and O(mode)
        are then not checked and C(ip_forward) is left as it is.
    type: str
    choices: [present, absent]
    default: present
requirements:
  - pyroute2 on the node (requirements/node.txt)
  - the C(nft) binary (Debian package nftables) when O(masquerade) is set
attributes:
  platform:
    platforms: posix
  check_mode:
    support: full
    details: Reports the changes that would be made; applies nothing.
  diff_mode:
    support: full
    details:
      - Our kernel state before and after, as text, one device, address, FDB entry, neighbour or route
        per line, then the nft table.
seealso:
  - plugin: clustermesh.core.mesh_routing
    plugin_type: filter
"""

EXAMPLES = r"""
- name: Route pods across the mesh (tunnel to off-link peers, direct on-link)
  clustermesh.core.routing:
    node: "{{ __routing.node }}"
    peers: "{{ __routing.peers }}"
    mesh_pod_cidrs: "{{ __routing.mesh_pod_cidrs }}"
    mode: hybrid
  vars:
    __routing: "{{ clustermesh_mesh | clustermesh.core.mesh_routing(inventory_hostname) }}"

- name: Direct routing where a BGP router carries the pod CIDRs of off-link peers
  clustermesh.core.routing:
    node: {name: c1-n1, ip: 198.18.1.11, pod_cidrs: [10.1.0.0/24]}
    peers:
      - {name: c1-n2, cluster: cluster1, ip: 198.18.1.12, pod_cidrs: [10.1.1.0/24]}
      - {name: c2-n2, cluster: cluster2, ip: 198.18.2.11, pod_cidrs: [10.2.1.0/24]}
    mode: direct
    external_router: true
    masquerade: false

- name: Remove everything the collection owns for routing
  clustermesh.core.routing:
    node: {name: c1-n1, ip: 198.18.1.11, pod_cidrs: [10.1.0.0/24]}
    state: absent
"""

RETURN = r"""
changes:
  description: What was changed (in check mode, what would be), in the order applied, in C(ip) words.
  returned: always
  type: list
  elements: str
  sample:
    - add route 10.2.1.0/24 via 10.2.1.1 dev cm_vxlan onlink proto 203
    - replace route 10.1.1.0/24 via 198.18.1.12 dev eth0 proto 203 (was via 10.1.1.1 dev cm_vxlan onlink proto 203)
plan:
  description:
    - The routing plan (C(mode), C(node), C(peer_modes), C(routes), C(vxlan), C(fdb), C(neighbours)).
    - Null for O(state=absent).
  returned: always
  type: dict
peer_modes:
  description: How each peer is reached, V(direct), V(tunnel) or V(external).
  returned: always
  type: dict
  sample: {c1-n2: direct, c2-n1: direct, c2-n2: tunnel}
underlay:
  description: The underlay interface; null for O(state=absent).
  returned: always
  type: dict
  sample: {ifname: eth0, index: 2, prefixlen: 24, mtu: 1500}
pod_mtu:
  description: The MTU pod interfaces must use in this mode (underlay MTU, minus 50 when anything may be tunnelled).
  returned: always
  type: int
  sample: 1450
masquerade:
  description: Whether the masquerade table is kept, its changes and its content (nft text).
  returned: always
  type: dict
  sample: {enabled: true, changes: [], table: "table ip clustermesh {...}"}
"""

from ansible.module_utils.basic import AnsibleModule

from ansible_collections.clustermesh.core.plugins.module_utils import routing_state
from ansible_collections.clustermesh.core.plugins.module_utils.masquerade import MasqueradeError
from ansible_collections.clustermesh.core.plugins.module_utils.requirements import missing_requirements
from ansible_collections.clustermesh.core.plugins.module_utils.routing_plan import (
    ROUTING_INPUTS_ARGUMENT_SPEC,
    RoutingPlanError,
)

ARGUMENT_SPEC = dict(
    ROUTING_INPUTS_ARGUMENT_SPEC,
    masquerade=dict(type="bool", default=True),
    mesh_pod_cidrs=dict(type="list", elements="str", default=[]),
    underlay_interface=dict(type="str"),
    state=dict(type="str", choices=["present", "absent"], default="present"),
)


def main():
    module = AnsibleModule(argument_spec=ARGUMENT_SPEC, supports_check_mode=True)
    missing = missing_requirements(routing_state)
    if missing:
        module.fail_json(msg=missing)
    p = module.params
    try:
        result = routing_state.reconcile(
            p["node"],
            p["peers"],
            p["mode"],
            external_router=p["external_router"],
            masquerade=p["masquerade"],
            mesh_pod_cidrs=p["mesh_pod_cidrs"],
            check=module.check_mode,
            state=p["state"],
            underlay_interface=p["underlay_interface"],
        )
    except RoutingPlanError as exc:
        module.fail_json(msg="routing: %s (nothing was changed)" % exc)
    except (routing_state.RoutingStateError, MasqueradeError) as exc:
        module.fail_json(msg="routing: %s" % exc)
    for warning in result.pop("warnings"):
        module.warn(warning)
    before, after = result.pop("before"), result.pop("after")
    if module._diff:
        result["diff"] = {
            "before_header": "%s: routing state (before)" % p["node"]["name"],
            "after_header": "%s: routing state (after)" % p["node"]["name"],
            "before": before,
            "after": after,
        }
    module.exit_json(**result)


if __name__ == "__main__":
    main()
