#!/usr/bin/python
# -*- coding: utf-8 -*-
# Copyright: clustermesh.core contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)

from __future__ import annotations

DOCUMENTATION = r"""
module: cni_pod
short_description: A pod network namespace wired by the node's CNI plugin, as a container runtime does it
description:
  - "Makes a pod without a container engine, for probes and tests (C(playbooks/connectivity.yml)): a network
    namespace C(cm-pod-<name>) in C(/run/netns), then CNI ADD of every plugin of the node's first
    C(*.conflist) in O(conf_dir), exactly as a container runtime calls them (CNI 1.0 request configuration,
    C(CNI_*) environment, C(args.cni.labels), the previous result as C(prevResult)); the ADD result is kept
    in C(/run/clustermesh/pods/<name>.json) for CHECK and DEL."
  - A pod that exists is checked with CNI CHECK; when the check fails (its address or interface is gone)
    it is deleted and made again, which reports C(changed).
  - O(state=absent) stops the processes still running in the pod's network namespace, runs CNI DEL (in
    reverse plugin order) and removes the namespace.
  - A failed ADD is followed by a DEL and the namespace is removed; the plugin's error (code and message)
    is the failure message.
version_added: 0.1.0
author:
  - clustermesh.core developers (@clustermesh)
extends_documentation_fragment:
  - ansible.builtin.action_common_attributes
attributes:
  check_mode:
    support: full
    details: Reports whether the pod would be made or removed; runs no plugin.
  diff_mode:
    support: none
  platform:
    platforms: posix
options:
  name:
    description: The pod's name, 1 to 32 characters of C([a-z0-9-]).
    type: str
    required: true
  state:
    description: V(present) makes the pod (once); V(absent) deletes it.
    type: str
    choices: [present, absent]
    default: present
  labels:
    description: The pod's labels, passed to the plugins as C(args.cni.labels).
    type: dict
    default: {}
  namespace:
    description: The pod's namespace, passed as C(K8S_POD_NAMESPACE) in C(CNI_ARGS).
    type: str
    default: default
  cni_path:
    description:
      - Where the plugins are (C(CNI_PATH)); the role C(cni) installs C(clustermesh-cni) into its C(cni_bin_dir).
    type: str
    default: /opt/cni/bin
  conf_dir:
    description: The node's CNI network configuration directory.
    type: path
    default: /etc/cni/net.d
requirements:
  - the C(ip) and C(nsenter) binaries (iproute2, util-linux)
"""

EXAMPLES = r"""
- name: A probe pod on every node
  clustermesh.core.cni_pod:
    name: probe
    labels:
      app: probe
    cni_path: "{{ cni_bin_dir | default('/opt/cni/bin') }}"
  register: pod

- name: Ping from inside it
  ansible.builtin.command: nsenter --net={{ pod.netns }} ping -c1 10.2.0.2
  changed_when: false
"""

RETURN = r"""
ip:
  description: The pod's IPv4 address.
  returned: when the pod exists
  type: str
  sample: 10.1.0.2
netns:
  description: Path of the pod's network namespace.
  returned: always
  type: str
  sample: /run/netns/cm-pod-probe
container_id:
  description: The container ID the plugins were given.
  returned: when the pod exists
  type: str
result:
  description: The CNI ADD result (interfaces, ips, routes, dns).
  returned: when the pod exists
  type: dict
"""

from ansible.module_utils.basic import AnsibleModule

from ansible_collections.clustermesh.core.plugins.module_utils import cni_runtime


def main():
    module = AnsibleModule(
        argument_spec=dict(
            name=dict(type="str", required=True),
            state=dict(type="str", choices=["present", "absent"], default="present"),
            labels=dict(type="dict", default={}),
            namespace=dict(type="str", default="default"),
            cni_path=dict(type="str", default=cni_runtime.DEFAULT_CNI_PATH),
            conf_dir=dict(type="path", default=cni_runtime.CNI_CONF_DIR),
        ),
        supports_check_mode=True,
    )
    p = module.params
    name = p["name"]
    try:
        cni_runtime.check_pod_name(name)
        labels = cni_runtime.labels_from_dict(p["labels"])
        state = cni_runtime.read_state(name)
        exists = state is not None or bool(cni_runtime.pod_processes(name))
        changed = False
        if p["state"] == "absent":
            if state is not None or cni_runtime.os.path.exists(cni_runtime.netns_path(name)):
                changed = True
                if not module.check_mode:
                    cni_runtime.delete_pod(name, p["cni_path"])
            module.exit_json(changed=changed, netns=cni_runtime.netns_path(name))
        if state is not None and not module.check_mode:
            try:
                cni_runtime.check_pod(name, p["cni_path"])
            except cni_runtime.PodRuntimeError:
                cni_runtime.delete_pod(name, p["cni_path"])
                state = None
        if state is None:
            changed = True
            if module.check_mode:
                module.exit_json(changed=True, netns=cni_runtime.netns_path(name))
            if not exists and cni_runtime.os.path.exists(cni_runtime.netns_path(name)):
                cni_runtime.delete_pod(name, p["cni_path"])  # a namespace left without state: start clean
            state = cni_runtime.add_pod(name, labels, p["cni_path"], namespace=p["namespace"], conf_dir=p["conf_dir"])
    except cni_runtime.PodRuntimeError as exc:
        module.fail_json(msg=str(exc))
    module.exit_json(
        changed=changed,
        ip=cni_runtime.pod_ip(state["result"]),
        netns=state["netns"],
        container_id=state["containerID"],
        result=state["result"],
    )


if __name__ == "__main__":
    main()
