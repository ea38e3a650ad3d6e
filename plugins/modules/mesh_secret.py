#!/usr/bin/python
# -*- coding: utf-8 -*-
# Copyright: clustermesh.core contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)

from __future__ import annotations

DOCUMENTATION = r"""
module: mesh_secret
short_description: Write a Kubernetes cluster's join as Cilium's Secret cilium-clustermesh
description:
  - For a cluster that runs Kubernetes and Cilium, applies the same join that M(clustermesh.core.mesh_join)
    writes to C(clusters.d/) as the Secret C(cilium-clustermesh) - one key per remote cluster holding its
    etcd client config (files under C(/var/lib/cilium/clustermesh), where Cilium mounts the Secret) and the
    keys C(<peer>.etcd-client-ca.crt), C(<peer>.etcd-client.crt), C(<peer>.etcd-client.key).
  - Certificates are checked as by M(clustermesh.core.mesh_join) before anything is sent.
  - Uses the C(kubernetes) Python client on the host the task runs on (usually the controller).
version_added: 0.1.0
author:
  - clustermesh.core developers (@clustermesh)
extends_documentation_fragment:
  - clustermesh.core.join_peers
  - ansible.builtin.action_common_attributes
options:
  cluster:
    description: Name of the cluster the Secret belongs to.
    type: str
    required: true
  kubeconfig:
    description: Path of the kubeconfig of that cluster's Kubernetes API.
    type: path
    required: true
  context:
    description: Context in O(kubeconfig); default its current context.
    type: str
  namespace:
    description: Namespace of the Cilium agents.
    type: str
    default: kube-system
  state:
    description: Whether the Secret should exist.
    type: str
    choices: [present, absent]
    default: present
attributes:
  platform:
    platforms: posix
  check_mode:
    support: full
  diff_mode:
    support: none
"""

EXAMPLES = r"""
- name: Cluster1's join as the Secret cilium-clustermesh
  clustermesh.core.mesh_secret:
    cluster: cluster1
    kubeconfig: ~/.kube/cluster1.yaml
    peers:
      - name: cluster2
        endpoints: [https://198.18.2.11:32379]
        ca: "{{ lookup('file', pki_dir ~ '/cluster2/ca.crt') }}"
        cert: "{{ lookup('file', pki_dir ~ '/cluster2/remote-cluster1.crt') }}"
        key: "{{ lookup('file', pki_dir ~ '/cluster2/remote-cluster1.key') }}"
  delegate_to: localhost
"""

RETURN = r"""
keys:
  description: The keys of the Secret after the task (never their values).
  returned: always
  type: list
  elements: str
  sample: [cluster2, cluster2.etcd-client-ca.crt, cluster2.etcd-client.crt, cluster2.etcd-client.key]
"""

import tempfile
import traceback

from ansible.module_utils.basic import AnsibleModule, missing_required_lib

from ansible_collections.clustermesh.core.plugins.module_utils.cluster_secret import reconcile_secret, secret_data
from ansible_collections.clustermesh.core.plugins.module_utils.control_plane import (
    PEERS_ARGUMENT_SPEC,
    JoinError,
    join_file_plan,
)

try:
    from kubernetes import client as k8s_client
    from kubernetes import config as k8s_config
    from kubernetes.client.exceptions import ApiException
    from kubernetes.config.config_exception import ConfigException
    from urllib3.exceptions import HTTPError as TransportError
except ImportError:
    K8S_IMPORT_ERROR = traceback.format_exc()
else:
    K8S_IMPORT_ERROR = None


def main():
    module = AnsibleModule(
        argument_spec=dict(
            cluster=dict(type="str", required=True),
            kubeconfig=dict(type="path", required=True),
            context=dict(type="str"),
            namespace=dict(type="str", default="kube-system"),
            peers=PEERS_ARGUMENT_SPEC,
            state=dict(type="str", default="present", choices=["present", "absent"]),
        ),
        supports_check_mode=True,
    )
    if K8S_IMPORT_ERROR:
        module.fail_json(msg=missing_required_lib("kubernetes"), exception=K8S_IMPORT_ERROR)
    p = module.params
    try:
        with tempfile.TemporaryDirectory() as scratch:  # validation only: the same checks as mesh_join
            join_file_plan(p["cluster"], None, p["peers"], scratch)
        data = secret_data(p["peers"])
    except JoinError as exc:
        module.fail_json(msg=str(exc))
    try:
        api = k8s_config.new_client_from_config(config_file=p["kubeconfig"], context=p["context"])
        core_v1 = k8s_client.CoreV1Api(api)
        changed, _before, after = reconcile_secret(core_v1, p["namespace"], data, p["state"], module.check_mode)
    except ConfigException as exc:
        module.fail_json(msg="kubeconfig %s: %s" % (p["kubeconfig"], exc))
    except ApiException as exc:
        module.fail_json(
            msg="Kubernetes API refused the Secret %s/cilium-clustermesh: %s %s"
            % (p["namespace"], exc.status, exc.reason)
        )
    except (OSError, TransportError) as exc:
        module.fail_json(msg="Kubernetes API unreachable: %s" % exc)
    module.exit_json(changed=changed, keys=after or [])


if __name__ == "__main__":
    main()
