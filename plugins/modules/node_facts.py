#!/usr/bin/python
# -*- coding: utf-8 -*-
# Copyright: clustermesh.core contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
from __future__ import annotations

DOCUMENTATION = r"""
---
module: node_facts
short_description: Detect the kernel features a mesh node can use, by trying them
version_added: "0.1.0"
description:
  - Probes the host for the kernel features the mesh needs and returns them as the fact
    C(clustermesh_node). Nothing is inferred from kernel versions; every feature is tried.
  - Probes that create kernel state (links, qdiscs, BPF attachments, XFRM states, nftables tables)
    run in a throwaway network namespace made by a forked child process with C(unshare) of C(CLONE_NEWNET).
    When the child exits the namespace and everything in it are gone, so the host's own network
    namespace is never changed. Host-side reads are the sysctls, C(/sys/kernel/btf/vmlinux), the
    host's addresses and routes; the bpf(2) probe creates and closes a one-entry array map.
  - A probe that cannot run (no permission, missing binary, missing Python library, timeout) reports
    its features unavailable with the reason; it never fails the module, unless O(required) names it.
  - Needs root (C(CAP_SYS_ADMIN) for the scratch namespace, C(CAP_BPF)/C(CAP_NET_ADMIN) for the BPF
    probes), C(pyroute2) on the node for the link, tc and underlay probes, and the C(ip) and C(nft)
    binaries for the ESP and nftables probes.
author:
  - clustermesh.core developers (@clustermesh)
extends_documentation_fragment:
  - ansible.builtin.action_common_attributes
options:
  probes:
    description:
      - Which probes to run. V(all) runs every probe.
      - V(vxlan), V(geneve), V(wireguard) create such a link in the scratch namespace.
      - V(bpf) creates a BPF array map; V(bpf_jit) reads C(net.core.bpf_jit_enable); V(btf) reads
        C(/sys/kernel/btf/vmlinux).
      - V(tc_bpf) adds a clsact qdisc on C(lo) and attaches a trivial SCHED_CLS program as a
        direct-action cls_bpf filter (features C(tc_clsact) and C(tc_bpf)); V(tcx) attaches one through
        a tcx BPF link.
      - V(xfrm) asks a NETLINK_XFRM socket for an SA dump; V(esp) adds ESP states with
        AES-GCM (rfc4106) and with AES-CBC + HMAC-SHA256, all-zero keys (features C(esp),
        C(esp_gcm_aes), C(esp_cbc_aes_hmac_sha256)).
      - V(nftables) looks for the C(nft) binary and adds a table and a masquerade rule (features
        C(nft_binary), C(nftables), C(nftables_nat)).
      - V(ip_forward) reads the host's C(net.ipv4.ip_forward); available means forwarding is on.
      - V(underlay) reports the host's addresses and default routes (not a feature).
    type: list
    elements: str
    default: [all]
    choices: [all, vxlan, geneve, wireguard, bpf, bpf_jit, btf, tc_bpf, tcx, xfrm, esp, nftables, ip_forward, underlay]
  required:
    description:
      - Feature names (as in RV(ansible_facts.clustermesh_node.features)) that must be available.
      - When one is missing the module fails with a message naming each missing feature and why,
        and still returns the facts.
      - The probes that report a required feature must be selected by O(probes).
    type: list
    elements: str
    default: []
  timeout:
    description:
      - Seconds to wait for the scratch-namespace probes before giving up on them.
    type: float
    default: 30
notes:
  - Supports check mode; the module changes nothing either way.
  - The ESP keys are all zeros and never appear in the output.
attributes:
  platform:
    platforms: posix
  check_mode:
    support: full
    description: The module never changes the host, so check mode runs the same probes.
  diff_mode:
    support: none
    description: Nothing changes, so there is nothing to diff.
  facts:
    support: full
    description: Returns C(ansible_facts.clustermesh_node).
"""

EXAMPLES = r"""
- name: Detect what this node's kernel can do
  clustermesh.core.node_facts:

- name: Only the tunnel probes
  clustermesh.core.node_facts:
    probes: [vxlan, geneve]

- name: Refuse to enable IPsec where ESP with AES-GCM is missing
  clustermesh.core.node_facts:
    probes: [xfrm, esp]
    required: [xfrm, esp, esp_gcm_aes]

- name: Use the facts
  ansible.builtin.debug:
    msg: >-
      tunnel={{ ansible_facts.clustermesh_node.features.vxlan }}
      missing={{ ansible_facts.clustermesh_node.missing | join(',') }}
      underlay={{ ansible_facts.clustermesh_node.underlay.ipv4 | map(attribute='cidr') | list }}
"""

RETURN = r"""
ansible_facts:
  description: Facts about the node.
  returned: always
  type: dict
  contains:
    clustermesh_node:
      description: What the node's kernel can do, and its underlay addresses.
      returned: always
      type: dict
      contains:
        kernel:
          description: C(uname) of the node.
          type: dict
          returned: always
          sample: {"release": "6.18.44", "version": "#1 SMP PREEMPT_DYNAMIC", "machine": "x86_64"}
        probed:
          description: The probes that ran.
          type: list
          elements: str
          returned: always
          sample: [vxlan, esp, underlay]
        features:
          description: Flat summary, feature name to availability, for every probed feature.
          type: dict
          returned: always
          sample: {"vxlan": true, "geneve": false, "esp": false, "tc_bpf": true}
        missing:
          description: Sorted names of the probed features that are not available.
          type: list
          elements: str
          returned: always
          sample: [esp, esp_gcm_aes, geneve, wireguard]
        probes:
          description:
            - Per feature, C(available) (bool) and C(detail) (how it was detected, or the error
              that made it unavailable).
            - C(bpf_jit) and C(ip_forward) add C(value) (the sysctl), C(btf) adds C(size) (bytes),
              C(nft_binary) adds C(path).
          type: dict
          returned: always
          sample:
            vxlan: {"available": true, "detail": "created a vxlan link in a scratch network namespace"}
            esp:
              available: false
              detail: >-
                the kernel has no ESP support (esp4 missing): enc cbc(aes) + auth-trunc hmac(sha256) 128:
                Error: Requested type not found.
            bpf_jit: {"available": true, "detail": "net.core.bpf_jit_enable = 1", "value": 1}
        underlay:
          description:
            - The host's own IPv4 and IPv6 addresses, without loopback, link-local and the
              project's C(cm_*) devices, sorted by interface and address.
            - Each has C(address), C(prefixlen), C(cidr), C(interface), C(mtu) (of the interface),
              C(up) and C(default_route) (the family's main-table default route leaves through
              this interface).
            - C(default_route) gives per family the C(gateway) and C(interfaces) of the default
              route, or null; C(has_default_route) is true if either family has one.
            - Holds only C(error) if the addresses could not be read.
          type: dict
          returned: when O(probes) selects V(underlay) or V(all)
          sample:
            ipv4:
              - {"address": "198.18.1.10", "prefixlen": 24, "cidr": "198.18.1.10/24", "interface": "eth0",
                 "mtu": 1500, "up": true, "default_route": false}
            ipv6: []
            default_route: {"ipv4": null, "ipv6": null}
            has_default_route: false
"""

from ansible.module_utils.basic import AnsibleModule  # noqa: E402 (after the docs, as Ansible modules do)

from ansible_collections.clustermesh.core.plugins.module_utils.kernel_features import (  # noqa: E402
    ALL_PROBES,
    DEFAULT_TIMEOUT,
    PROBE_GROUPS,
    detect,
    select_groups,
)

FACT_NAME = "clustermesh_node"


def feature_names(groups):
    return {name for group in groups for name in PROBE_GROUPS[group]}


def main():
    module = AnsibleModule(
        argument_spec={
            "probes": {"type": "list", "elements": "str", "default": ["all"], "choices": ["all", *ALL_PROBES]},
            "required": {"type": "list", "elements": "str", "default": []},
            "timeout": {"type": "float", "default": DEFAULT_TIMEOUT},
        },
        supports_check_mode=True,
    )
    probes = module.params["probes"]
    required = module.params["required"]
    if module.params["timeout"] <= 0:
        module.fail_json(msg=f"timeout must be a positive number of seconds, got {module.params['timeout']}")

    groups, _underlay = select_groups(probes)
    unprobed = sorted(set(required) - feature_names(groups))
    if unprobed:
        known = feature_names(PROBE_GROUPS)
        unknown = sorted(set(unprobed) - known)
        if unknown:
            module.fail_json(
                msg=f"required names unknown feature(s) {', '.join(unknown)}; features are: {', '.join(sorted(known))}"
            )
        module.fail_json(
            msg=f"required feature(s) {', '.join(unprobed)} are not reported by the selected probes "
            f"{', '.join(groups) or '(none)'}: add their probes to 'probes'"
        )

    facts = detect(probes, timeout=module.params["timeout"])
    result = {"changed": False, "ansible_facts": {FACT_NAME: facts}}
    missing_required = [name for name in required if name in facts["missing"]]
    if missing_required:
        reasons = "; ".join(f"{name}: {facts['probes'][name]['detail']}" for name in missing_required)
        module.fail_json(msg=f"required kernel feature(s) missing: {reasons}", **result)
    module.exit_json(**result)


if __name__ == "__main__":
    main()
