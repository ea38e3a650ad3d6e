# -*- coding: utf-8 -*-
# Copyright: clustermesh.core contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)

from __future__ import annotations


class ModuleDocFragment:
    # The routing inputs of one node; the filter clustermesh.core.mesh_routing gives them from the mesh.
    DOCUMENTATION = r"""
options:
  node:
    description: This node.
    type: dict
    required: true
    suboptions:
      name:
        description: The node's name in the mesh.
        type: str
        required: true
      ip:
        description: The node's underlay IPv4 address; the interface that holds it is the underlay.
        type: str
        required: true
      pod_cidrs:
        description: The node's own pod CIDRs (one /24 per family).
        type: list
        elements: str
        required: true
  peers:
    description:
      - Every other node this one routes pod traffic to, in its own cluster and in every connected cluster.
    type: list
    elements: dict
    default: []
    suboptions:
      name:
        description: The peer node's name.
        type: str
        required: true
      cluster:
        description: The peer's cluster.
        type: str
        required: true
      ip:
        description: The peer's underlay IPv4 address.
        type: str
        required: true
      pod_cidrs:
        description: The peer's pod CIDRs.
        type: list
        elements: str
        required: true
  mode:
    description:
      - V(tunnel) encapsulates pod traffic to every peer in VXLAN (UDP 8472).
      - V(direct) routes pod CIDRs via the peers' underlay IPs; every peer must be on-link unless
        O(external_router) is set.
      - V(hybrid) routes directly to on-link peers and tunnels to the others.
      - Any other value is refused with the list of modes.
    type: str
    default: tunnel
  external_router:
    description:
      - In V(direct) mode, an off-link peer is reached through a router that already carries pod CIDRs
        (BGP or static routes) - nothing is installed for it (M(clustermesh.core.mesh_preflight) checks that it
        answers).
      - Without it an off-link peer in V(direct) mode is an error.
    type: bool
    default: false
"""
