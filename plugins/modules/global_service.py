#!/usr/bin/python
# -*- coding: utf-8 -*-
# Copyright: clustermesh.core contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)

from __future__ import annotations

DOCUMENTATION = r"""
module: global_service
short_description: Declare a (global) service in a cluster's kvstore, for clusters without Kubernetes
description:
  - Writes the declaration of service O(namespace)/O(name) - its ClusterIP, ports, selector, the Cilium
    annotations C(service.cilium.io/global), C(service.cilium.io/shared) and C(service.cilium.io/affinity),
    and how its backends are health-checked - under
    C(cilium/clustermesh-core/services/v1/<namespace>/<name>) in the cluster's own kvstore, as JSON
    (see docs/services.md). O(state=absent) removes it.
  - The node agent of every node of the cluster reads the declaration, selects the local endpoints whose
    labels match O(selector), health-checks them, publishes the healthy ones as Cilium's ClusterService
    under C(cilium/state/services/v1/<cluster>/<namespace>/<name>) (only when global and shared), and
    load-balances O(cluster_ip) to the backends of all clusters as O(shared) and O(affinity) say. The
    agent, not this module, removes the ClusterService when the declaration is removed.
  - Remote clusters cannot read the declaration (their etcd role may read C(cilium/state/) and a few keys
    only); they see the ClusterService.
  - Every option is validated before anything is written; an invalid one fails naming it.
  - Idempotent - the stored JSON is compared with the wanted one; nothing is written when they are equal.
version_added: 0.1.0
author:
  - clustermesh.core developers (@clustermesh)
extends_documentation_fragment:
  - ansible.builtin.action_common_attributes
  - clustermesh.core.kvstore
options:
  namespace:
    description: Namespace of the service (a DNS label). Services merge across clusters by namespace and name.
    type: str
    default: default
  name:
    description: Name of the service (a DNS label).
    type: str
    required: true
  cluster_ip:
    description:
      - The service's virtual IP in this cluster (IPv4 or IPv6). Each cluster has its own ClusterIP for the
        same global service.
      - Required with O(state=present).
    type: str
  ports:
    description:
      - The service's ports. Required with O(state=present).
      - A backend port serves the frontend port of the same O(ports[].name) and O(ports[].protocol), in
        every cluster; give ports the same names in all clusters.
    type: list
    elements: dict
    suboptions:
      name:
        description: Port name (a DNS label); required and unique when there is more than one port.
        type: str
      port:
        description: Port of O(cluster_ip) (1-65535).
        type: int
        required: true
      protocol:
        description: Transport protocol.
        type: str
        choices: [TCP, UDP]
        default: TCP
      target_port:
        description: Port on the backends. Default - O(ports[].port).
        type: int
  selector:
    description:
      - Labels that select this cluster's backends among the cluster's endpoints (pods); an endpoint is a
        backend when it has every label given here.
      - Empty selects no local endpoint - the cluster then only consumes remote backends.
    type: dict
    default: {}
  global:
    description:
      - Annotation C(service.cilium.io/global) - merge this service with the services of the same namespace
        and name in all clusters. A cluster uses remote backends only when it declares the service global
        itself.
    type: bool
    default: true
  shared:
    description:
      - Annotation C(service.cilium.io/shared). V(false) - this cluster does not export its backends, but
        still uses those of the other clusters.
      - Default - the value of O(global). Has no effect on a service that is not global.
    type: bool
  affinity:
    description:
      - Annotation C(service.cilium.io/affinity).
      - V(local) - use this cluster's healthy backends; remote ones only while no local backend is healthy.
      - V(remote) - the mirror image. V(none) - all healthy backends of all clusters.
      - Has no effect on a service that is not global.
    type: str
    choices: [local, remote, none]
    default: none
  health_check:
    description: How the agents check this cluster's backends. Only healthy backends are used and exported.
    type: dict
    default: {}
    suboptions:
      type:
        description: V(tcp) - a TCP connect; V(http) - an HTTP GET of O(health_check.path) answered 2xx or 3xx.
        type: str
        choices: [tcp, http]
        default: tcp
      port:
        description: Port on the backend. Default - the target port of the first of O(ports).
        type: int
      path:
        description: Path of the HTTP GET (with O(health_check.type=http) only). Default - C(/).
        type: str
      interval:
        description: Seconds between two checks of a backend (0.1-3600).
        type: float
        default: 2
      timeout:
        description: Seconds a check may take, at most O(health_check.interval). Default - 1 or the interval if shorter.
        type: float
      healthy_threshold:
        description: Consecutive successes that make a backend healthy again (1-100).
        type: int
        default: 1
      unhealthy_threshold:
        description: Consecutive failures that make a backend unhealthy (1-100).
        type: int
        default: 1
  state:
    description: Whether the service is declared.
    type: str
    choices: [present, absent]
    default: present
requirements:
  - grpcio, etcd-sdk-python and PyYAML (the etcd client) on the node
attributes:
  platform:
    platforms: posix
  check_mode:
    support: full
  diff_mode:
    support: full
    details: The diff shows the stored and the wanted declaration JSON.
seealso:
  - module: clustermesh.core.kvstore_key
notes:
  - Run it on one node of the cluster (C(run_once)) with the node's C(/etc/clustermesh/kvstore.yaml); the
    declaration is cluster-wide.
"""

EXAMPLES = r"""
- name: Declare rebel-base as a global service of cluster1
  clustermesh.core.global_service:
    kvstore_config: /etc/clustermesh/kvstore.yaml
    namespace: default
    name: rebel-base
    cluster_ip: 172.30.1.10
    ports:
      - {name: http, port: 80, protocol: TCP}
    selector: {name: rebel-base}
    affinity: local
    health_check: {type: http, path: /, interval: 1}
  run_once: true

- name: Consume cluster1's backends from cluster2 without exporting cluster2's own
  clustermesh.core.global_service:
    kvstore_config: /etc/clustermesh/kvstore.yaml
    name: rebel-base
    cluster_ip: 172.30.2.10
    ports: [{name: http, port: 80}]
    selector: {name: rebel-base}
    shared: false
  run_once: true

- name: Remove the declaration
  clustermesh.core.global_service:
    kvstore_config: /etc/clustermesh/kvstore.yaml
    name: rebel-base
    state: absent
  run_once: true
"""

RETURN = r"""
key:
  description: The kvstore key of the declaration.
  returned: always
  type: str
  sample: cilium/clustermesh-core/services/v1/default/rebel-base
declaration:
  description: The declaration as stored (null with O(state=absent)); its format is in docs/services.md.
  returned: always
  type: dict
  sample:
    version: 1
    namespace: default
    name: rebel-base
    clusterIP: 172.30.1.10
    ports: [{name: http, port: 80, protocol: TCP, targetPort: 80}]
    selector: {name: rebel-base}
    annotations:
      service.cilium.io/global: "true"
      service.cilium.io/shared: "true"
      service.cilium.io/affinity: local
    healthCheck: {type: http, port: null, path: /, interval: 1.0, timeout: 1.0, healthyThreshold: 1,
                  unhealthyThreshold: 1}
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
    KeyLayoutError,
    service_declaration_key,
)
from ansible_collections.clustermesh.core.plugins.module_utils.requirements import missing_requirements
from ansible_collections.clustermesh.core.plugins.module_utils.services import (
    ServiceError,
    ServiceOptions,
    declaration_to_dict,
    make_declaration,
    options_annotations,
)

ARGUMENT_SPEC = dict(
    namespace=dict(type="str", default="default"),
    name=dict(type="str", required=True),
    cluster_ip=dict(type="str"),
    ports=dict(
        type="list",
        elements="dict",
        options=dict(
            name=dict(type="str"),
            port=dict(type="int", required=True),
            protocol=dict(type="str", default="TCP", choices=["TCP", "UDP"]),
            target_port=dict(type="int"),
        ),
    ),
    selector=dict(type="dict", default={}),
    **{"global": dict(type="bool", default=True)},  # a Python keyword
    shared=dict(type="bool"),
    affinity=dict(type="str", default="none", choices=["local", "remote", "none"]),
    health_check=dict(
        type="dict",
        default={},
        options=dict(
            type=dict(type="str", default="tcp", choices=["tcp", "http"]),
            port=dict(type="int"),
            path=dict(type="str"),
            interval=dict(type="float", default=2.0),
            timeout=dict(type="float"),
            healthy_threshold=dict(type="int", default=1),
            unhealthy_threshold=dict(type="int", default=1),
        ),
    ),
    state=dict(type="str", default="present", choices=["present", "absent"]),
    **CONNECTION_ARGUMENT_SPEC,
)


def declaration_from_params(params):
    """The validated declaration document (a dict) for state=present; raises ServiceError naming the option."""
    if params["global"]:
        shared = True if params["shared"] is None else params["shared"]
        options = ServiceOptions(global_=True, shared=shared, affinity=params["affinity"])
    else:  # shared and affinity mean nothing then; stored canonically
        options = ServiceOptions(global_=False, shared=False, affinity="none")
    ports = [{k: v for k, v in port.items() if v is not None} for port in params["ports"] or []]
    decl = make_declaration(
        params["namespace"],
        params["name"],
        params["cluster_ip"],
        ports,
        params["selector"],
        options_annotations(options),
        params["health_check"],
    )
    return declaration_to_dict(decl)


def _parse_stored(text):
    """The stored document, or the raw text when it is not JSON (then it differs from any wanted one)."""
    if text is None:
        return None
    try:
        return json.loads(text)
    except ValueError:
        return text


def _diff_text(document):
    if document is None:
        return ""
    if isinstance(document, str):
        return document + "\n"
    return json.dumps(document, indent=2, sort_keys=True) + "\n"


def main():
    module = AnsibleModule(
        argument_spec=ARGUMENT_SPEC,
        mutually_exclusive=CONNECTION_MUTUALLY_EXCLUSIVE,
        required_one_of=CONNECTION_REQUIRED_ONE_OF,
        required_if=[("state", "present", ("cluster_ip", "ports"))],
        supports_check_mode=True,
    )
    p = module.params
    warnings = []
    if not p["global"] and (p["shared"] is not None or p["affinity"] != "none"):
        warnings.append("shared and affinity have no effect on a service that is not global (global=false)")
    try:
        key = service_declaration_key(p["namespace"], p["name"])
        wanted = declaration_from_params(p) if p["state"] == "present" else None
    except (ServiceError, KeyLayoutError) as exc:
        module.fail_json(msg=str(exc))
    missing = missing_requirements(kvstore_client, kvstore_config)
    if missing:
        module.fail_json(msg=missing)
    try:
        with client_from_params(p) as client:
            current = client.get(key)
            before = _parse_stored(current.value.decode("utf-8", "replace") if current else None)
            changed = before != wanted
            if changed and not module.check_mode:
                revision = current.mod_revision if current else 0
                if wanted is None:
                    ok = client.delete_if_mod_revision(key, revision)
                else:
                    value = json.dumps(wanted, separators=(",", ":"), sort_keys=True)
                    ok = client.put_if_mod_revision(key, value, revision)
                if not ok:
                    module.fail_json(msg=f"{key} was changed by someone else meanwhile; run again", key=key)
    except (KVStoreError, KVStoreConfigError) as exc:  # an unreachable etcd, or a missing/invalid kvstore.yaml
        module.fail_json(msg=f"kvstore: {exc}", key=key)
    result = dict(changed=changed, key=key, declaration=wanted)
    for warning in warnings:
        module.warn(warning)
    if module._diff:
        result["diff"] = dict(
            before=_diff_text(before),
            after=_diff_text(wanted),
            before_header=key,
            after_header=key,
        )
    module.exit_json(**result)


if __name__ == "__main__":
    main()
