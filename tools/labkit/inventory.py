"""The Ansible inventory of a lab: ``<state>/inventory/hosts.yml``.

Groups: ``lab`` (every host, with the connection variables), one group per cluster with the
cluster's ``clustermesh_*`` variables, and ``clusters``, the parent of the cluster groups.
"""

from __future__ import annotations

import os

import yaml

from .pod_runtime import LAB_CNI_BIN_DIR
from .state import VENV_PYTHON


def host_vars(lab, host):
    ns = lab.netns(host.name)
    mnt, uts = lab.handles(ns)
    return {
        "ansible_connection": "clustermesh.core.netns",
        "ansible_netns_name": ns,
        "ansible_netns_mount": mnt,
        "ansible_netns_uts": uts,
        "ansible_python_interpreter": VENV_PYTHON,
        "clustermesh_node_ip": host.address,
        "lab_segment": host.segment,
    }


def build(lab, topo):
    """The inventory as a dict (YAML inventory format)."""
    clusters = {}
    for cluster in topo.clusters:
        group_vars = {"clustermesh_cluster_name": cluster.name}
        if cluster.id is not None:
            group_vars["clustermesh_cluster_id"] = cluster.id
        if cluster.pod_cidr:
            group_vars["clustermesh_pod_cidrs"] = [cluster.pod_cidr]
        members = {h.name: None for h in topo.hosts if h.cluster == cluster.name}
        group = {}
        if members:
            group["hosts"] = members
        group["vars"] = group_vars
        clusters[cluster.name] = group
    children = {
        "lab": {
            "hosts": {h.name: host_vars(lab, h) for h in topo.hosts},
            # /opt is the machine's own in lab hosts (only /etc, /var/lib, /var/log are per host);
            # lab hosts cannot reach a package index and run the repository's .venv Python, which has
            # requirements/node.txt: the agent runs with it instead of a virtualenv of its own
            "vars": {"lab_prefix": lab.prefix, "cni_bin_dir": LAB_CNI_BIN_DIR, "agent_venv_create": False},
        }
    }
    if clusters:
        children["clusters"] = {"children": clusters}
    return {"all": {"children": children}}


def render(lab, topo):
    header = "# Ansible inventory of lab %r, written by `tools/lab up --prefix %s`; rewritten on every up.\n" % (
        lab.prefix,
        lab.prefix,
    )
    return header + yaml.safe_dump(build(lab, topo), sort_keys=False, default_flow_style=False)


def write(lab, topo):
    os.makedirs(os.path.dirname(lab.inventory_path), exist_ok=True)
    tmp = lab.inventory_path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(render(lab, topo))
    os.replace(tmp, lab.inventory_path)
    return lab.inventory_path
