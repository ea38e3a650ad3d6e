#!/usr/bin/python
# -*- coding: utf-8 -*-
# Copyright: clustermesh.core contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)

from __future__ import annotations

DOCUMENTATION = r"""
module: ipsec
short_description: Encrypt traffic to every peer node with IPsec (ESP tunnel mode XFRM states and policies)
description:
  - Reads the keys from O(key_file) on the node (Cilium's key line format), plans this node's XFRM
    states and policies towards every peer of O(peers), compares them with those the collection owns
    in the kernel, applies only the difference and removes what it owns that is no longer wanted
    (states and policies of peers that left the mesh, of keys no longer in the file).
  - ESP in tunnel mode between node IPs. Direct peers (and peers behind an external router), pod
    traffic to their pod CIDRs; tunnelled peers, the VXLAN packets (UDP 8472) to their node IP; with
    O(node_encryption), all traffic between node IPs. Which peers are direct or tunnelled is decided
    as the M(clustermesh.core.routing) module decides it.
  - One SA per peer, direction and key in the file. The SPI is C(key id << 28 | low 24 bits of the
    sending node's IP), so the SPI carries the key ID and each sender has its own SA at a receiver
    (node IPs must differ in their low 24 bits). Keys with C(+) are derived per node pair from the
    shared key, both node IPs and both boot IDs (O(boot_ids)).
  - A block policy of lower precedence covers every pod CIDR of O(block_cidrs) (and the VXLAN port
    in tunnel mode), so pod traffic never leaves in plaintext while states or policies are being replaced.
  - Owned and never anything else - states with reqid C(0x636d), policies with the collection's two
    priorities (see docs/ipsec.md). Before anything changes, the key file (root-owned, mode 0600), the
    plan (peers, SPI collisions) and the kernel (an ESP SA with each key's algorithms is tried in a
    throwaway network namespace) are checked; a kernel without ESP or without the algorithm fails
    naming the missing feature and nothing is applied.
  - A key whose bytes changed under the same key ID is refused - rotate to a new key ID instead
    (playbooks/rotate_ipsec_key.yml).
  - Key material is never returned, logged or shown in diffs.
version_added: 0.2.0
author:
  - clustermesh.core developers (@clustermesh)
extends_documentation_fragment:
  - clustermesh.core.routing_peers
  - ansible.builtin.action_common_attributes
options:
  keys:
    description:
      - The key lines, the key that encrypts first (see O(key_file) for their format). They are written to
        O(key_file) (root, mode 0600, directory 0700) once every check has passed, before the kernel changes.
      - Omitted, the keys are read from O(key_file).
      - Never logged or returned.
    type: list
    elements: str
  key_file:
    description:
      - The file on the node with one key line per key, C(<id>[+] rfc4106(gcm(aes)) <hex key+salt> <icv bits>)
        or C(<id>[+] hmac(sha256) <hex key> cbc(aes) <hex key>); at most two keys (during a rotation).
      - Must be a regular file owned by root with mode 0600 or stricter.
    type: path
    default: /etc/clustermesh/ipsec/keys
  encrypt_key_id:
    description:
      - The key that encrypts outgoing traffic; every key in O(key_file) decrypts.
      - Default, the first key in the file.
    type: int
  block_cidrs:
    description:
      - Pod CIDRs that must never be reached in plaintext (the pod CIDRs of every cluster this node
        reaches, C(mesh_pod_cidrs) of the filter M(clustermesh.core.mesh_routing)).
      - This node's own pod CIDRs are excepted (local pod traffic stays on the node).
    type: list
    elements: str
    default: []
  node_encryption:
    description: Also encrypt all traffic between node IPs (not only pod traffic).
    type: bool
    default: false
  external_router:
    description: As for M(clustermesh.core.routing) - off-link peers in direct mode are reached through a router.
    type: bool
    default: false
  boot_ids:
    description:
      - Node name -> the node's boot ID (C(/proc/sys/kernel/random/boot_id)), mixed into per-pair keys
        (key lines with C(+)) so a rebooted node never reuses a key with a restarted ESP sequence.
      - Missing nodes use an empty boot ID.
    type: dict
    default: {}
  state:
    description:
      - V(present) makes the kernel state match the plan.
      - V(absent) removes every XFRM state and policy the collection owns and O(key_file); O(peers) and
        O(keys) are then not used.
    type: str
    choices: [present, absent]
    default: present
requirements:
  - pyroute2 on the node (requirements/node.txt)
  - a kernel with XFRM (xfrm_user), ESP (esp4) and the key's algorithms
attributes:
  platform:
    platforms: posix
  check_mode:
    support: full
    details: Reports the changes that would be made; applies nothing.
  diff_mode:
    support: full
    details: One line per state or policy added, replaced or removed; never key material.
seealso:
  - module: clustermesh.core.routing
  - plugin: clustermesh.core.mesh_routing
    plugin_type: filter
"""

EXAMPLES = r"""
- name: Encrypt pod traffic to every peer
  clustermesh.core.ipsec:
    node: "{{ __routing.node }}"
    peers: "{{ __routing.peers }}"
    mode: "{{ clustermesh_mesh.routing_mode }}"
    block_cidrs: "{{ __routing.mesh_pod_cidrs }}"
  vars:
    __routing: "{{ clustermesh_mesh | clustermesh.core.mesh_routing(inventory_hostname) }}"

- name: During a rotation, encrypt with the new key (both keys are in the file and decrypt)
  clustermesh.core.ipsec:
    node: "{{ __routing.node }}"
    peers: "{{ __routing.peers }}"
    mode: tunnel
    encrypt_key_id: 4

- name: Remove every XFRM state and policy the collection owns
  clustermesh.core.ipsec:
    node: {name: c1-n1, ip: 198.18.1.11, pod_cidrs: [10.1.0.0/24]}
    state: absent
"""

RETURN = r"""
changes:
  description: What was changed (in check mode, what would be), in the order applied; no key material.
  returned: always
  type: list
  elements: str
  sample:
    - "+ state 198.18.1.11 -> 198.18.1.12 spi 0x3001010c rfc4106(gcm(aes))"
    - "~ policy out 0.0.0.0/0 -> 10.1.1.0/24 tmpl 198.18.1.11 -> 198.18.1.12 spi 0x4001010b"
key_ids:
  description: The key IDs in the key file (each one decrypts).
  returned: always
  type: list
  elements: int
  sample: [3, 4]
encrypt_key_id:
  description: The key ID that encrypts; null for O(state=absent).
  returned: always
  type: int
  sample: 4
states:
  description: How many XFRM states the plan has (two per peer and key).
  returned: always
  type: int
  sample: 12
policies:
  description: How many XFRM policies the plan has.
  returned: always
  type: int
  sample: 9
peer_modes:
  description: How each peer is reached (V(direct), V(tunnel), V(external)), as routing decides it.
  returned: always
  type: dict
  sample: {c1-n2: direct, c2-n1: tunnel}
summary:
  description: Counts of the changes by kind.
  returned: always
  type: dict
"""

from ansible.module_utils.basic import AnsibleModule

from ansible_collections.clustermesh.core.plugins.module_utils import ipsec_state
from ansible_collections.clustermesh.core.plugins.module_utils.ipsec import IpsecKeyError, IpsecPlanError
from ansible_collections.clustermesh.core.plugins.module_utils.requirements import missing_requirements
from ansible_collections.clustermesh.core.plugins.module_utils.routing_plan import (
    ROUTING_INPUTS_ARGUMENT_SPEC,
    RoutingPlanError,
)

ARGUMENT_SPEC = dict(
    ROUTING_INPUTS_ARGUMENT_SPEC,
    key_file=dict(type="path", default=ipsec_state.DEFAULT_KEY_FILE),
    keys=dict(type="list", elements="str", no_log=True),
    encrypt_key_id=dict(type="int"),
    block_cidrs=dict(type="list", elements="str", default=[]),
    node_encryption=dict(type="bool", default=False),
    boot_ids=dict(type="dict", default={}),
    state=dict(type="str", choices=["present", "absent"], default="present"),
)


def main():
    module = AnsibleModule(argument_spec=ARGUMENT_SPEC, supports_check_mode=True)
    missing = missing_requirements(ipsec_state)
    if missing:
        module.fail_json(msg=missing)
    p = module.params
    try:
        result = ipsec_state.reconcile(
            p["node"],
            p["peers"],
            p["mode"],
            key_file=p["key_file"],
            keys=p["keys"],
            encrypt_key_id=p["encrypt_key_id"],
            block_cidrs=p["block_cidrs"],
            node_encryption=p["node_encryption"],
            external_router=p["external_router"],
            boot_ids=p["boot_ids"],
            state=p["state"],
            check=module.check_mode,
        )
    except (IpsecKeyError, IpsecPlanError, RoutingPlanError) as exc:
        module.fail_json(msg="ipsec: %s (nothing was changed)" % exc)
    except ipsec_state.IpsecStateError as exc:
        module.fail_json(msg="ipsec: %s" % exc)
    if module._diff:
        result["diff"] = {"prepared": "\n".join(result["changes"]) + ("\n" if result["changes"] else "")}
    module.exit_json(**result)


if __name__ == "__main__":
    main()
