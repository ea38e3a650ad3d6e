#!/usr/bin/python
# -*- coding: utf-8 -*-
# Copyright: clustermesh.core contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)

from __future__ import annotations

DOCUMENTATION = r"""
module: mesh_join
short_description: Write a node's kvstore configuration for its own cluster and every cluster it connects to
description:
  - Writes C(<config_dir>/kvstore.yaml), Cilium's etcd-config YAML for the node's own cluster (its etcd
    members, the cluster CA and the C(admin-<cluster>) client certificate in C(<config_dir>/pki/)).
  - On kvstore members, writes the etcd certificates to C(<config_dir>/etcd/) (O(kvstore_member)).
  - Writes C(<config_dir>/clusters.d/<peer>) for each cluster this one connects to, in the same format
    (the peer's proxy endpoints), with C(<peer>.etcd-client-ca.crt), C(<peer>.etcd-client.crt) and
    C(<peer>.etcd-client.key) beside it, exactly as Cilium's clustermesh configuration directory.
  - Removes the files of clusters no longer listed. Files in C(clusters.d) that do not follow this
    naming are left alone.
  - Every certificate is checked before anything is written; it must match its key, be signed by the
    given CA, and carry the expected user (C(admin-<cluster>) locally, C(remote-<cluster>) for peers).
    On any problem nothing is written.
version_added: 0.1.0
author:
  - clustermesh.core developers (@clustermesh)
extends_documentation_fragment:
  - clustermesh.core.join_peers
  - ansible.builtin.action_common_attributes
options:
  cluster:
    description: Name of the node's own cluster.
    type: str
    required: true
  config_dir:
    description: The node's clustermesh configuration directory.
    type: path
    default: /etc/clustermesh
  local:
    description: Connection to the node's own cluster. Omit to leave C(kvstore.yaml) alone.
    type: dict
    suboptions:
      endpoints:
        description: The cluster's etcd member URLs.
        type: list
        elements: str
        required: true
      ca:
        description: PEM of the cluster CA.
        type: str
        required: true
      cert:
        description: PEM of the C(admin-<cluster>) client certificate.
        type: str
        required: true
      key:
        description: PEM of its private key.
        type: str
        required: true
  kvstore_member:
    description:
      - Only on the cluster's kvstore members, the etcd certificates, written to C(<config_dir>/etcd/),
        C(ca.crt), C(server.crt), C(server.key) (client and peer TLS) and C(root.crt), C(root.key)
        (for C(clustermesh.core.etcd_auth)). Omit to leave that directory alone.
    type: dict
    suboptions:
      ca:
        description: PEM of the cluster CA.
        type: str
        required: true
      cert:
        description: PEM of the member's server certificate.
        type: str
        required: true
      key:
        description: PEM of its private key.
        type: str
        required: true
      root_cert:
        description: PEM of the C(root) client certificate.
        type: str
        required: true
      root_key:
        description: PEM of its private key.
        type: str
        required: true
attributes:
  platform:
    platforms: posix
  check_mode:
    support: full
  diff_mode:
    support: full
    details: Shows which files change; the content of configuration files, never of keys.
"""

EXAMPLES = r"""
- name: Join cluster1's node to cluster2
  clustermesh.core.mesh_join:
    cluster: cluster1
    local:
      endpoints: [https://198.18.1.11:2379]
      ca: "{{ lookup('file', pki_dir ~ '/cluster1/ca.crt') }}"
      cert: "{{ lookup('file', pki_dir ~ '/cluster1/admin.crt') }}"
      key: "{{ lookup('file', pki_dir ~ '/cluster1/admin.key') }}"
    peers:
      - name: cluster2
        endpoints: [https://198.18.2.11:32379]
        ca: "{{ lookup('file', pki_dir ~ '/cluster2/ca.crt') }}"
        cert: "{{ lookup('file', pki_dir ~ '/cluster2/remote-cluster1.crt') }}"
        key: "{{ lookup('file', pki_dir ~ '/cluster2/remote-cluster1.key') }}"
"""

RETURN = r"""
written:
  description: Files created or changed.
  returned: always
  type: list
  elements: str
  sample: [/etc/clustermesh/clusters.d/cluster2]
removed:
  description: Files of clusters no longer connected that were removed.
  returned: always
  type: list
  elements: str
  sample: [/etc/clustermesh/clusters.d/cluster3, /etc/clustermesh/clusters.d/cluster3.etcd-client.key]
peers:
  description: The connected clusters.
  returned: always
  type: list
  elements: str
  sample: [cluster2]
"""

import os

from ansible.module_utils.basic import AnsibleModule

from ansible_collections.clustermesh.core.plugins.module_utils import kvstore_config, mesh_model, pki
from ansible_collections.clustermesh.core.plugins.module_utils.control_plane import (
    CLUSTERS_DIR,
    CREDENTIALS_ARGUMENT_SPEC,
    ETCD_DIR,
    LOCAL_PKI_DIR,
    PEERS_ARGUMENT_SPEC,
    JoinError,
    join_file_plan,
    stale_join_files,
)
from ansible_collections.clustermesh.core.plugins.module_utils.files import (
    ensure_dir,
    ensure_file,
    file_differs,
    read_bytes,
)
from ansible_collections.clustermesh.core.plugins.module_utils.requirements import missing_requirements


def _diff_text(path, data):
    if path.endswith(".key"):
        return "(private key: %s)\n" % ("present" if data is not None else "absent")
    return (data or b"").decode("utf-8", "replace")


def main():
    module = AnsibleModule(
        argument_spec=dict(
            cluster=dict(type="str", required=True),
            config_dir=dict(type="path", default="/etc/clustermesh"),
            local=dict(type="dict", options=CREDENTIALS_ARGUMENT_SPEC),
            kvstore_member=dict(
                type="dict",
                options=dict(
                    ca=dict(type="str", required=True),
                    cert=dict(type="str", required=True),
                    key=dict(type="str", required=True, no_log=True),
                    root_cert=dict(type="str", required=True),
                    root_key=dict(type="str", required=True, no_log=True),
                ),
            ),
            peers=PEERS_ARGUMENT_SPEC,
        ),
        supports_check_mode=True,
    )
    missing = missing_requirements(kvstore_config, mesh_model, pki)
    if missing:
        module.fail_json(msg=missing)
    p = module.params
    config_dir = p["config_dir"]
    try:
        plan = join_file_plan(p["cluster"], p["local"], p["peers"], config_dir, member=p["kvstore_member"])
    except JoinError as exc:
        module.fail_json(msg=str(exc))
    changed_paths = [path for path, (data, mode) in sorted(plan.items()) if file_differs(path, data, mode)]
    stale = stale_join_files(config_dir, {peer["name"] for peer in p["peers"]})
    diffs = []
    for path in changed_paths:
        diffs.append(
            {
                "before_header": path,
                "after_header": path,
                "before": _diff_text(path, read_bytes(path)),
                "after": _diff_text(path, plan[path][0]),
            }
        )
    for path in stale:
        diffs.append(
            {
                "before_header": path,
                "after_header": "(removed)",
                "before": _diff_text(path, read_bytes(path)),
                "after": "",
            }
        )
    if not module.check_mode:
        ensure_dir(config_dir, 0o755)
        ensure_dir(os.path.join(config_dir, CLUSTERS_DIR), 0o700)
        if p["local"]:
            ensure_dir(os.path.join(config_dir, LOCAL_PKI_DIR), 0o700)
        if p["kvstore_member"]:
            ensure_dir(os.path.join(config_dir, ETCD_DIR), 0o700)
        # Credentials before the configuration that points at them, so a reader never sees a
        # configuration whose files are missing.
        for path in sorted(changed_paths, key=lambda x: (not x.endswith((".crt", ".key")), x)):
            data, mode = plan[path]
            ensure_file(path, data, mode)
        for path in sorted(stale, key=lambda x: x.endswith((".crt", ".key"))):
            os.unlink(path)
    result = dict(
        changed=bool(changed_paths or stale),
        written=changed_paths,
        removed=stale,
        peers=[peer["name"] for peer in p["peers"]],
    )
    if module._diff:
        result["diff"] = diffs
    module.exit_json(**result)


if __name__ == "__main__":
    main()
