#!/usr/bin/python
# -*- coding: utf-8 -*-
# Copyright: clustermesh.core contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)

from __future__ import annotations

DOCUMENTATION = r"""
module: etcd_auth
short_description: Reconcile a cluster kvstore's etcd users and roles and enable auth
description:
  - Users have no password; etcd (C(--client-cert-auth)) maps the client certificate's CN to the user.
  - Creates C(root) (role C(root)), C(admin-<cluster>) (read-write on C(cilium/)), and for every cluster
    in O(remote_clusters) the user C(remote-<peer>) with the role C(remote), which may only read
    C(cilium/.heartbeat), C(cilium/state/), C(cilium/cluster-config/<cluster>) and
    C(cilium/synced/<cluster>/). Permissions of these roles are made exactly that.
  - Removes users named C(remote-*) or C(admin-*) that are no longer wanted (a peer that left); other
    users are left alone. Enables auth when it is off.
  - Connect as C(root) (a certificate with CN C(root)); before auth is enabled any certificate works,
    after it only root may administer.
version_added: 0.1.0
author:
  - clustermesh.core developers (@clustermesh)
extends_documentation_fragment:
  - ansible.builtin.action_common_attributes
  - clustermesh.core.kvstore
options:
  cluster:
    description: Name of the cluster that owns this etcd.
    type: str
    required: true
  remote_clusters:
    description: The clusters that connect to this one (each gets C(remote-<name>)).
    type: list
    elements: str
    default: []
attributes:
  platform:
    platforms: posix
  check_mode:
    support: full
  diff_mode:
    support: none
"""

EXAMPLES = r"""
- name: Users and roles of cluster1's etcd
  clustermesh.core.etcd_auth:
    cluster: cluster1
    remote_clusters: [cluster2, cluster3]
    endpoints: [https://127.0.0.1:2379]
    ca_file: /etc/clustermesh/etcd/ca.crt
    cert_file: /etc/clustermesh/etcd/root.crt
    key_file: /etc/clustermesh/etcd/root.key
"""

RETURN = r"""
changes:
  description: What was changed (or would be, in check mode).
  returned: always
  type: list
  elements: str
  sample: [add user remote-cluster3, grant role remote to user remote-cluster3]
"""

from ansible.module_utils.basic import AnsibleModule

from ansible_collections.clustermesh.core.plugins.module_utils import kvstore_client, kvstore_config
from ansible_collections.clustermesh.core.plugins.module_utils.etcd_auth import desired_auth, reconcile_auth
from ansible_collections.clustermesh.core.plugins.module_utils.kvstore_client import KVStoreError
from ansible_collections.clustermesh.core.plugins.module_utils.kvstore_connection import (
    CONNECTION_ARGUMENT_SPEC,
    CONNECTION_MUTUALLY_EXCLUSIVE,
    CONNECTION_REQUIRED_ONE_OF,
    client_from_params,
)
from ansible_collections.clustermesh.core.plugins.module_utils.mesh_model import cluster_name_error
from ansible_collections.clustermesh.core.plugins.module_utils.requirements import missing_requirements


def main():
    module = AnsibleModule(
        argument_spec=dict(
            cluster=dict(type="str", required=True),
            remote_clusters=dict(type="list", elements="str", default=[]),
            **CONNECTION_ARGUMENT_SPEC,
        ),
        mutually_exclusive=CONNECTION_MUTUALLY_EXCLUSIVE,
        required_one_of=CONNECTION_REQUIRED_ONE_OF,
        supports_check_mode=True,
    )
    missing = missing_requirements(kvstore_client, kvstore_config)
    if missing:
        module.fail_json(msg=missing)
    p = module.params
    for field, name in [("cluster", p["cluster"])] + [("remote_clusters", n) for n in p["remote_clusters"]]:
        error = cluster_name_error(name)
        if error:
            module.fail_json(msg="%s: %s" % (field, error))
    try:
        plan = desired_auth(p["cluster"], p["remote_clusters"])
        with client_from_params(p) as client:
            changes = reconcile_auth(client, plan, check_mode=module.check_mode)
    except (KVStoreError, ValueError) as exc:
        module.fail_json(msg=str(exc))
    module.exit_json(changed=bool(changes), changes=changes)


if __name__ == "__main__":
    main()
