#!/usr/bin/python
# -*- coding: utf-8 -*-
# Copyright: clustermesh.core contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)

from __future__ import annotations

DOCUMENTATION = r"""
module: mesh_status
short_description: Check a node's connections to its own and every connected cluster's kvstore
description:
  - Runs on a mesh node and checks, for the node's own cluster (C(<config_dir>/kvstore.yaml)) and for
    every connected cluster (each etcd-config file C(<config_dir>/clusters.d/<cluster>); names
    containing a C(.) are the certificate files that go with them), the following.
  - B(reachable) - whether etcd answers through one of the configured endpoints, with the latency of
    a small read. Every endpoint is probed; an unreachable one is reported even when another answers.
  - B(server identity) - the certificate the server presents in a TLS handshake made with the
    configured CA (verified, host name or IP checked against its SANs) and client certificate; and
    etcd's Status (version, member ID, leader, database size).
  - B(cluster-config) - C(cilium/cluster-config/<cluster>), its cluster ID, and whether that is the ID
    given in O(expected).
  - B(heartbeat) - the age of C(cilium/.heartbeat); it is written by the node agent, so until an agent
    runs it is reported as null with the note C(no heartbeat yet), which is not a failure.
  - B(read-only) - for a remote cluster, a put of the probe key
    C(cilium/state/clustermesh-readonly-probe/<node>) must be denied by etcd. If the put is accepted,
    the key is deleted again at once and the cluster is reported with RV(clusters[].read_only=false)
    and a warning - the credentials in C(clusters.d) can change that cluster's state, which is a
    security problem. The local cluster is written with the admin user on purpose and is not checked.
  - B(keys) - counts of C(nodes), C(services), C(ip) and C(identities) keys under C(cilium/state/),
    as far as the user may list them.
  - Never fails because a cluster is unreachable or wrong; see RV(ok) and RV(clusters[].problems).
    It fails only for invalid options.
  - Check mode runs the same checks, the read-only probe included, because that put is the only way
    to verify read-only access and it is denied on a correctly configured mesh (if it is not, the
    probe key is removed again); use O(verify_read_only=false) to skip it.
version_added: 0.1.0
author:
  - clustermesh.core developers (@clustermesh)
extends_documentation_fragment:
  - ansible.builtin.action_common_attributes
options:
  config_dir:
    description: The node's clustermesh directory, holding C(kvstore.yaml) and C(clusters.d/).
    type: path
    default: /etc/clustermesh
  cluster:
    description:
      - Name of the node's own cluster.
      - Default - taken from the client certificate in C(kvstore.yaml), whose CN is C(admin-<cluster>).
    type: str
  timeout:
    description:
      - Seconds each network step may take (TCP connect and TLS handshake of an endpoint probe, each
        etcd request). Endpoints and clusters are probed in parallel.
    type: float
    default: 5
  expected:
    description:
      - Cluster name to the cluster ID its C(cilium/cluster-config/<cluster>) must hold. Clusters not
        named here are not compared (RV(clusters[].cluster_id_ok) is null).
    type: dict
  verify_read_only:
    description: Whether to verify with a write probe that remote clusters refuse writes.
    type: bool
    default: true
  node_name:
    description:
      - Name of this node in RV(rows) and in the probe key C(cilium/state/clustermesh-readonly-probe/<node_name>).
      - Default - the host name. C(playbooks/status.yml) passes the inventory host name.
    type: str
requirements:
  - grpcio, etcd-sdk-python and PyYAML (the etcd client) on the node
attributes:
  platform:
    platforms: posix
  check_mode:
    description: Can run in check mode and return changed status prediction without modifying target.
    support: full
    details: The checks run in check mode too, the read-only write probe included (see above).
  diff_mode:
    description: Will return details on what has changed (or possibly needs changing in check_mode), when in diff mode.
    support: none
notes:
  - C(changed) is always false - the probe write is denied, and a probe that was accepted is deleted
    again (reported loudly). Only if that delete fails is C(changed) true; the warning names the key.
seealso:
  - module: clustermesh.core.mesh_join
  - module: clustermesh.core.etcd_auth
"""

EXAMPLES = r"""
- name: Check this node's kvstore connections
  clustermesh.core.mesh_status:
  register: status

- name: Also compare the cluster IDs with the inventory
  clustermesh.core.mesh_status:
    timeout: 3
    expected:
      cluster1: 1
      cluster2: 2
  register: status

- name: Fail when something is wrong
  ansible.builtin.assert:
    that: status.ok
    fail_msg: "{{ status.clusters | rejectattr('ok') | map(attribute='problems') | flatten }}"
"""

RETURN = r"""
ok:
  description: True when every cluster is reachable, every remote cluster refused the probe write (unless
    O(verify_read_only=false)) and no cluster has a problem (RV(clusters[].problems) is empty everywhere;
    an unreachable endpoint of a cluster that answers through another one is a problem too).
  returned: always
  type: bool
  sample: true
node:
  description: O(node_name), by default the host name (the probe key ends with it).
  returned: always
  type: str
  sample: c1-n1
clusters:
  description: One entry per cluster, the node's own cluster first.
  returned: always
  type: list
  elements: dict
  contains:
    name:
      description: Cluster name (null when the own cluster's name cannot be told).
      type: str
      sample: cluster2
    local:
      description: True for the node's own cluster (C(kvstore.yaml)), false for a C(clusters.d) entry.
      type: bool
    config:
      description: The etcd-config file.
      type: str
      sample: /etc/clustermesh/clusters.d/cluster2
    user:
      description: The etcd user, that is the CN of the client certificate.
      type: str
      sample: remote-cluster1
    reachable:
      description: Whether etcd answered.
      type: bool
    error:
      description: Why the cluster is not reachable (null when it is).
      type: str
      sample: "no endpoint reachable: https://198.18.1.13:32379: connection refused (nothing listens on that port)"
    endpoint:
      description: The endpoint that answered.
      type: str
      sample: https://198.18.1.13:32379
    endpoints:
      description: Every configured endpoint with its C(url), C(reachable) and C(error) (TLS probe).
      type: list
      elements: dict
    latency_ms:
      description: Round trip of one small linearizable read, in milliseconds.
      type: float
      sample: 1.42
    server:
      description:
        - The certificate the answering endpoint presented - C(subject_cn), C(subject), C(sans)
          (C(DNS:name), C(IP:address)), C(issuer_cn), C(issuer), C(not_after), C(serial),
          C(fingerprint_sha256) - and C(verified) (CA and host name), C(tls_version), C(error).
      type: dict
      sample:
        subject_cn: c2-n1
        sans: [DNS:c2-n1, DNS:localhost, DNS:cluster2.mesh.local, IP:198.18.1.13, IP:127.0.0.1]
        issuer_cn: clustermesh-cluster2-ca
        fingerprint_sha256: "3F:0A:...:9C"
        verified: true
        tls_version: TLSv1.3
    etcd:
      description: etcd's Status of the answering member - C(version), C(member_id), C(leader) (hex),
        C(is_leader), C(raft_term), C(revision), C(db_size) (bytes), C(etcd_cluster_id) (hex).
      type: dict
      sample: {version: 3.4.23, member_id: 8e9e05c52164694d, leader: 8e9e05c52164694d, is_leader: true,
               raft_term: 2, revision: 17, db_size: 20480, etcd_cluster_id: cdf818194e3a8c32}
    cluster_id:
      description: The ID in C(cilium/cluster-config/<cluster>) (null when missing or unreadable).
      type: int
      sample: 2
    cluster_id_expected:
      description: The ID given in O(expected) for this cluster, if any.
      type: int
    cluster_id_ok:
      description: Whether RV(clusters[].cluster_id) is the expected one; null without an expectation.
      type: bool
    heartbeat_age:
      description: Seconds since C(cilium/.heartbeat) was written; null when there is none.
      type: float
      sample: 12.5
    heartbeat_note:
      description: C(no heartbeat yet), a stale or unreadable heartbeat; null when it is fresh.
      type: str
    read_only:
      description: True when a remote cluster refused the probe write, false when it accepted it (a
        security problem), null when not checked (the local cluster, O(verify_read_only=false)) or not
        verifiable.
      type: bool
    read_only_note:
      description: What the read-only check found.
      type: str
    probe_key_left:
      description: A probe key that was written and could not be deleted again (remove it by hand).
      type: str
    keys:
      description: Key counts under C(cilium/state/) - C(nodes), C(services), C(ip), C(identities),
        C(other) (other keys, e.g. identity allocator values), C(invalid) (malformed keys under a known
        prefix), C(foreign) (nodes or services of another cluster). A kind the user may not list is null.
      type: dict
      sample: {nodes: 2, services: 1, ip: 4, identities: 3, other: 0, invalid: 0, foreign: 0}
    problems:
      description: Everything that makes this cluster not ok.
      type: list
      elements: str
    ok:
      description: True when RV(clusters[].problems) is empty.
      type: bool
rows:
  description: The clusters as table rows (every cell a string), what C(playbooks/status.yml) prints.
  returned: always
  type: list
  elements: dict
  sample:
    - {node: c1-n1, cluster: cluster2, role: remote, reachable: yes 0.9ms, cluster_id: "2", heartbeat: none yet,
       read_only: "yes", keys: nodes=0 svc=0 ip=0 id=0, status: ok, error: ""}
table:
  description: RV(rows) formatted as aligned lines with a header.
  returned: always
  type: list
  elements: str
"""

from ansible.module_utils.basic import AnsibleModule, missing_required_lib

from ansible_collections.clustermesh.core.plugins.module_utils.kvstore_layout import (
    KeyLayoutError,
    validate_cluster_name,
)
from ansible_collections.clustermesh.core.plugins.module_utils.mesh_status import (
    format_table,
    mesh_status,
    missing_requirements,
    row,
)


def cluster_name_error(name):
    try:
        validate_cluster_name(name)
    except KeyLayoutError as exc:
        return str(exc)
    return None


def main():
    module = AnsibleModule(
        argument_spec=dict(
            config_dir=dict(type="path", default="/etc/clustermesh"),
            cluster=dict(type="str"),
            timeout=dict(type="float", default=5.0),
            expected=dict(type="dict"),
            verify_read_only=dict(type="bool", default=True),
            node_name=dict(type="str"),
        ),
        supports_check_mode=True,
    )
    p = module.params
    missing = missing_requirements()
    if missing:
        module.fail_json(
            msg=missing_required_lib("grpcio, etcd-sdk-python and PyYAML (the etcd client)"), exception=missing
        )
    if p["timeout"] <= 0:
        module.fail_json(msg="timeout: must be a positive number of seconds, got %s" % p["timeout"])
    if p["cluster"] is not None and cluster_name_error(p["cluster"]):
        module.fail_json(msg="cluster: %s" % cluster_name_error(p["cluster"]))
    expected = {}
    for name, value in (p["expected"] or {}).items():
        error = cluster_name_error(name)
        if error:
            module.fail_json(msg="expected: %s" % error)
        try:
            expected[name] = int(value)
        except (TypeError, ValueError):
            module.fail_json(msg="expected: cluster %s: the cluster ID must be an integer, got %r" % (name, value))

    status = mesh_status(
        p["config_dir"],
        cluster=p["cluster"],
        timeout=p["timeout"],
        expected=expected,
        verify_read_only=p["verify_read_only"],
        node=p["node_name"] or None,
    )
    changed = False
    for cluster in status["clusters"]:
        if cluster["read_only"] is False:
            module.warn(cluster["read_only_note"])
        if cluster["probe_key_left"]:
            changed = True
    rows = [row(status["node"], cluster) for cluster in status["clusters"]]
    module.exit_json(
        changed=changed,
        ok=status["ok"],
        node=status["node"],
        clusters=status["clusters"],
        rows=rows,
        table=format_table(rows),
    )


if __name__ == "__main__":
    main()
