#!/usr/bin/python
# -*- coding: utf-8 -*-
# Copyright: clustermesh.core contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)

from __future__ import annotations

DOCUMENTATION = r"""
module: ipsec_info
short_description: What a node has of IPsec before the mesh plans a change - its boot ID and its key file's keys
description:
  - Returns the node's boot ID (keys with C(+) are derived per node pair with both nodes' boot IDs) and the
    keys of its key file (O(key_file)), in their canonical form (key ID, algorithm, lowercase hex without
    C(0x)), so that they compare with the inventory's key line normalised by the
    P(clustermesh.core.ipsec_key_line#filter) filter.
  - The returned RV(keys) are key material; run the task with C(no_log) (role C(clustermesh.core.encryption)
    does) and never show them.
  - A missing key file is no keys. A key file that M(clustermesh.core.ipsec) would refuse (not owned by
    root, readable by others, malformed) is no keys and a warning naming the problem; M(clustermesh.core.ipsec)
    rewrites it.
  - Reads only; changes nothing.
version_added: 0.2.0
author:
  - clustermesh.core developers (@clustermesh)
extends_documentation_fragment:
  - ansible.builtin.action_common_attributes
options:
  key_file:
    description:
      - The node's key file, as M(clustermesh.core.ipsec) writes it.
    type: path
    default: /etc/clustermesh/ipsec/keys
attributes:
  platform:
    platforms: posix
  check_mode:
    support: full
    details: Reads only; the same in check mode.
  diff_mode:
    support: none
seealso:
  - module: clustermesh.core.ipsec
  - plugin: clustermesh.core.ipsec_key_line
    plugin_type: filter
"""

EXAMPLES = r"""
- name: Read the node's boot ID and current keys
  clustermesh.core.ipsec_info:
  register: node_ipsec
  no_log: true

- name: Show which key IDs the node has (no key material)
  ansible.builtin.debug:
    msg: "{{ node_ipsec.key_ids }}"
"""

RETURN = r"""
boot_id:
  description: The node's boot ID (C(/proc/sys/kernel/random/boot_id)).
  returned: always
  type: str
  sample: 0f8d5b4e-61a1-4f5c-9b7e-2d1c9d0a8e11
keys:
  description: The key lines of the key file in canonical form, the encrypting key first; key material.
  returned: always
  type: list
  elements: str
key_ids:
  description: The key IDs of RV(keys), in the same order.
  returned: always
  type: list
  elements: int
  sample: [3]
"""

from ansible.module_utils.basic import AnsibleModule

from ansible_collections.clustermesh.core.plugins.module_utils import ipsec_state


def main():
    module = AnsibleModule(
        argument_spec=dict(key_file=dict(type="path", default=ipsec_state.DEFAULT_KEY_FILE)),
        supports_check_mode=True,
    )
    try:
        info = ipsec_state.node_keys(module.params["key_file"])
    except OSError as exc:
        module.fail_json(msg="ipsec_info: cannot read the boot ID: %s" % exc)
    for warning in info.pop("warnings"):
        module.warn(warning)
    module.exit_json(changed=False, **info)


if __name__ == "__main__":
    main()
