#!/usr/bin/python
# -*- coding: utf-8 -*-
# Copyright: clustermesh.core contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)

from __future__ import annotations

DOCUMENTATION = r"""
module: mesh_preflight
short_description: Check a node before pod routing changes anything
description:
  - Runs on a mesh node before M(clustermesh.core.routing) and checks, read-only, what pod routing in
    O(mode) needs. Returns one table (RV(table)) and fails with one line per failed check, each naming
    the node, the peer, feature or port, the reason and the fix. The checks are described in
    C(docs/preflight.md).
  - B(features) - the kernel features the mode needs, from O(features) (the output of
    M(clustermesh.core.node_facts)) or probed here when not given - C(vxlan) for V(tunnel) and V(hybrid),
    C(nftables_nat) when O(masquerade) is on, C(veth) for the CNI plugin - and the Python package pyroute2.
  - B(underlay) - O(node.ip) is an address of an interface that is up; the pod MTU (the interface's MTU,
    minus 50 in V(tunnel) and V(hybrid) mode) is at least 1280.
  - B(reachability) - every peer answers an ICMP echo; all peers are probed at once.
  - B(path_mtu) - a don't-fragment ICMP echo of the underlay MTU's size reaches every peer; when it does
    not, the largest size that passes is named (and the router that reported a smaller next hop).
  - B(onlink) - which peers share the node's segment and how the routing plan reaches each; the plan's
    errors (in V(direct) mode a peer off the segment without O(external_router)).
  - B(ports) - in V(tunnel) and V(hybrid) mode, UDP 8472 is free or held by our own C(cm_vxlan) device
    (a process holding it is named with its PID, another VXLAN device with its name); every endpoint of
    O(kvstore_endpoints) accepts a TCP connection.
  - B(duplicate) - no other machine answers an ARP probe (RFC 5227, sender 0.0.0.0) for O(node.ip) on the
    underlay interface; no peer is listed with the node's IP, no two peers with one IP.
  - Changes nothing on the node; the packets it sends are ICMP echoes, ARP probes and TCP connects
    (closed at once), and feature probes run in a throwaway network namespace. Needs root (raw and
    packet sockets).
version_added: 0.1.0
author:
  - clustermesh.core developers (@clustermesh)
extends_documentation_fragment:
  - clustermesh.core.routing_peers
  - ansible.builtin.action_common_attributes
options:
  masquerade:
    description: Whether masquerade will be enabled (then the nftables NAT feature is needed).
    type: bool
    default: true
  features:
    description:
      - What M(clustermesh.core.node_facts) found, to avoid probing again - its C(clustermesh_node) fact, or
        that fact's C(probes) (feature to C(available) and C(detail)), or its C(features) (feature to bool;
        a missing feature is then reported without node_facts' reason).
      - Features it does not report (and C(veth), which node_facts does not probe) are probed here.
      - When omitted, every needed feature is probed here.
    type: dict
  kvstore_endpoints:
    description:
      - TCP endpoints this node must reach, as C(host:port) (a URL such as C(https://host:port) is accepted
        too) - the members or proxies of its own cluster's kvstore and the proxies of the remote clusters.
    type: list
    elements: str
    default: []
  timeout:
    description:
      - Seconds to wait for ICMP echo replies (per round; the path MTU round follows the reachability round),
        ARP replies and each TCP connect. Peers and endpoints are probed in parallel.
    type: float
    default: 1.0
  checks:
    description: Which checks to run.
    type: list
    elements: str
    default: [all]
    choices: [all, features, underlay, reachability, path_mtu, onlink, ports, duplicate]
requirements:
  - root on the node (raw ICMP and packet sockets, network namespaces for the feature probes)
  - pyroute2 on the node (reads addresses and VXLAN devices)
attributes:
  platform:
    platforms: posix
  check_mode:
    description: Can run in check mode and return changed status prediction without modifying target.
    support: full
    details: Read-only; runs the same checks in check mode.
  diff_mode:
    support: none
    details: Changes nothing, so there is nothing to show.
"""

EXAMPLES = r"""
- name: Preflight before routing
  clustermesh.core.mesh_preflight:
    node: "{{ __routing.node }}"
    peers: "{{ __routing.peers }}"
    mode: hybrid
    masquerade: true
    features: "{{ clustermesh_node }}"
    kvstore_endpoints: [198.18.1.11:2379, 198.18.1.11:32379]
  vars:
    __routing: "{{ hostvars['localhost'].clustermesh_mesh | clustermesh.core.mesh_routing(inventory_hostname) }}"
  register: __preflight

- name: Show the preflight table
  ansible.builtin.debug:
    msg: "{{ __preflight.table }}"

- name: Only reachability and path MTU, with a longer wait
  clustermesh.core.mesh_preflight:
    node: {name: c1-n1, ip: 198.18.1.11, pod_cidrs: [10.1.0.0/24]}
    peers:
      - {name: c2-n2, cluster: cluster2, ip: 198.18.2.11, pod_cidrs: [10.2.1.0/24]}
    checks: [reachability, path_mtu]
    timeout: 3
"""

RETURN = r"""
table:
  description: The checks as aligned lines C(CHECK | TARGET | RESULT | DETAIL); RESULT is C(ok), C(FAIL) or C(skip).
  returned: always
  type: list
  elements: str
  sample:
    - "CHECK        | TARGET              | RESULT | DETAIL"
    - "reachability | c2-n2 (198.18.2.11) | ok     | ICMP echo answered in 0.34 ms"
    - "onlink       | c2-n2 (198.18.2.11) | ok     | routed (off 198.18.1.0/24): VXLAN tunnel"
checks:
  description: One dict per row of RV(table).
  returned: always
  type: list
  elements: dict
  contains:
    name:
      description: The check (O(checks) names).
      type: str
    target:
      description: What it looked at - a feature, the node IP, a peer as C(name (ip)), C(udp/8472), C(tcp host:port).
      type: str
    ok:
      description: False when the check failed (a skipped check is ok).
      type: bool
    result:
      description: C(ok), C(FAIL) or C(skip).
      type: str
    skipped:
      description: The check could not run for this target (for example path MTU to a peer that does not answer).
      type: bool
    detail:
      description: What was found.
      type: str
    fix:
      description: What to do about a failure (empty when ok).
      type: str
  sample:
    - {name: ports, target: udp/8472, ok: false, result: FAIL, skipped: false,
       detail: "held by process 4711 (socat); VXLAN needs this port",
       fix: "stop process 4711 or move it to another port, or use mode direct"}
failed_checks:
  description: How many checks failed.
  returned: always
  type: int
  sample: 0
"""

from ansible.module_utils.basic import AnsibleModule

from ansible_collections.clustermesh.core.plugins.module_utils.preflight import (
    CHECKS,
    DEFAULT_TIMEOUT,
    PreflightError,
    failure_message,
    failures,
    format_table,
    run_preflight,
)
from ansible_collections.clustermesh.core.plugins.module_utils.routing_plan import (
    ROUTING_INPUTS_ARGUMENT_SPEC,
)


def main():
    module = AnsibleModule(
        argument_spec=dict(
            ROUTING_INPUTS_ARGUMENT_SPEC,
            masquerade=dict(type="bool", default=True),
            features=dict(type="dict"),
            kvstore_endpoints=dict(type="list", elements="str", default=[]),
            timeout=dict(type="float", default=DEFAULT_TIMEOUT),
            checks=dict(type="list", elements="str", default=["all"], choices=["all", *CHECKS]),
        ),
        supports_check_mode=True,
    )
    p = module.params
    try:
        checks = run_preflight(
            p["node"],
            p["peers"],
            mode=p["mode"],
            external_router=p["external_router"],
            masquerade=p["masquerade"],
            features=p["features"],
            kvstore_endpoints=p["kvstore_endpoints"],
            timeout=p["timeout"],
            checks=p["checks"],
        )
    except PreflightError as exc:
        module.fail_json(msg="mesh_preflight: " + "; ".join(exc.problems))
    result = dict(
        changed=False,
        table=format_table(checks),
        checks=[c.to_dict() for c in checks],
        failed_checks=len(failures(checks)),
    )
    if result["failed_checks"]:
        module.fail_json(msg=failure_message(p["node"]["name"], checks), **result)
    module.exit_json(**result)


if __name__ == "__main__":
    main()
