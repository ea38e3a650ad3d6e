#!/usr/bin/python
# -*- coding: utf-8 -*-
# Copyright: clustermesh.core contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)

from __future__ import annotations

DOCUMENTATION = r"""
module: kvstore_key
short_description: Set or remove one key in a cluster's kvstore (etcd)
description:
  - Writes O(value) under O(key) when the stored value differs; removes the key with O(state=absent).
  - With O(cluster_config), writes Cilium's C(cilium/cluster-config/<name>) JSON for a cluster instead of
    a raw value.
version_added: 0.1.0
author:
  - clustermesh.core developers (@clustermesh)
extends_documentation_fragment:
  - ansible.builtin.action_common_attributes
  - clustermesh.core.kvstore
options:
  key:
    description: The key. Required unless O(cluster_config) is given.
    type: str
  value:
    description: The value (a string; dictionaries and lists are stored as compact JSON).
    type: raw
  cluster_config:
    description: Write C(cilium/cluster-config/<name>) for this cluster, in Cilium's JSON.
    type: dict
    suboptions:
      name:
        description: Cluster name.
        type: str
        required: true
      id:
        description: Cluster ID.
        type: int
        required: true
      max_connected_clusters:
        description: 255 or 511, as for every cluster of the mesh.
        type: int
        default: 255
  state:
    description: Whether the key should exist.
    type: str
    choices: [present, absent]
    default: present
attributes:
  platform:
    platforms: posix
  check_mode:
    support: full
  diff_mode:
    support: full
"""

EXAMPLES = r"""
- name: Publish cluster1's cluster-config
  clustermesh.core.kvstore_key:
    kvstore_config: /etc/clustermesh/kvstore.yaml
    cluster_config: {name: cluster1, id: 1}
"""

RETURN = r"""
key:
  description: The key written or removed.
  returned: always
  type: str
  sample: cilium/cluster-config/cluster1
"""

import json

from ansible.module_utils.basic import AnsibleModule

from ansible_collections.clustermesh.core.plugins.module_utils import kvstore_client, kvstore_config
from ansible_collections.clustermesh.core.plugins.module_utils.kvstore_client import KVStoreError
from ansible_collections.clustermesh.core.plugins.module_utils.kvstore_config import KVStoreConfigError
from ansible_collections.clustermesh.core.plugins.module_utils.kvstore_connection import (
    CONNECTION_ARGUMENT_SPEC,
    CONNECTION_MUTUALLY_EXCLUSIVE,
    CONNECTION_REQUIRED_ONE_OF,
    client_from_params,
)
from ansible_collections.clustermesh.core.plugins.module_utils.kvstore_layout import (
    ClusterConfig,
    cluster_config_key,
    encode_cluster_config,
)
from ansible_collections.clustermesh.core.plugins.module_utils.requirements import missing_requirements


def main():
    module = AnsibleModule(
        argument_spec=dict(
            key=dict(type="str", no_log=False),
            value=dict(type="raw"),
            cluster_config=dict(
                type="dict",
                options=dict(
                    name=dict(type="str", required=True),
                    id=dict(type="int", required=True),
                    max_connected_clusters=dict(type="int", default=255),
                ),
            ),
            state=dict(type="str", default="present", choices=["present", "absent"]),
            **CONNECTION_ARGUMENT_SPEC,
        ),
        mutually_exclusive=CONNECTION_MUTUALLY_EXCLUSIVE + [("key", "cluster_config"), ("value", "cluster_config")],
        required_one_of=CONNECTION_REQUIRED_ONE_OF + [("key", "cluster_config")],
        supports_check_mode=True,
    )
    missing = missing_requirements(kvstore_client, kvstore_config)
    if missing:
        module.fail_json(msg=missing)
    p = module.params
    try:
        if p["cluster_config"]:
            cc = p["cluster_config"]
            key = cluster_config_key(cc["name"])
            value = encode_cluster_config(
                ClusterConfig(id=cc["id"], max_connected_clusters=cc["max_connected_clusters"])
            ).decode()
        else:
            key = p["key"]
            value = p["value"]
            if isinstance(value, (dict, list)):
                value = json.dumps(value, separators=(",", ":"), sort_keys=True)
            value = "" if value is None else str(value)
    except ValueError as exc:
        module.fail_json(msg=str(exc))
    try:
        with client_from_params(p) as client:
            current = client.get(key)
            before = current.value.decode("utf-8", "replace") if current else None
            after = value if p["state"] == "present" else None
            changed = before != after
            if changed and not module.check_mode:
                if after is None:
                    client.delete(key)
                else:
                    client.put(key, after)
    except (KVStoreError, KVStoreConfigError) as exc:  # an unreachable etcd, or a missing/invalid kvstore.yaml
        module.fail_json(msg=str(exc), key=key)
    result = dict(changed=changed, key=key)
    if module._diff:
        result["diff"] = dict(
            before=(before or "") + "\n", after=(after or "") + "\n", before_header=key, after_header=key
        )
    module.exit_json(**result)


if __name__ == "__main__":
    main()
