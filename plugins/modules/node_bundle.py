#!/usr/bin/python
# -*- coding: utf-8 -*-
# Copyright: clustermesh.core contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)

from __future__ import annotations

DOCUMENTATION = r"""
module: node_bundle
short_description: Install the collection's library on a node as one executable file (zipapp)
description:
  - Builds, on the controller, a zip application of the collection's C(plugins/module_utils) (as the
    package C(clustermesh_lib), so its relative imports work) with a C(__main__.py) that runs one entry
    point, and a shebang line naming the node's Python.
  - The build is deterministic (sorted entries, fixed timestamps, no C(__pycache__)), so the same code
    gives the same file and a rerun reports no change.
  - Installs it at O(dest) with M(ansible.builtin.copy), which compares checksums and supports check
    and diff mode (the bundle is binary, so the diff says only that it changed).
  - The entry point V(cni) is the CNI plugin C(clustermesh-cni) (run by the container runtime with the
    configuration on stdin and C(CNI_*) in the environment).
  - The entry point V(meshd) is the node agent, installed by role C(clustermesh.core.agent) with its
    CLI V(meshctl) beside it.
  - The node's Python needs the library's third-party packages (C(requirements/node.txt)); the CNI
    plugin needs pyroute2.
version_added: 0.1.0
author:
  - clustermesh.core developers (@clustermesh)
extends_documentation_fragment:
  - ansible.builtin.action_common_attributes
  - ansible.builtin.action_common_attributes.flow
options:
  dest:
    description: Where to install the bundle on the node (its directory must exist).
    type: path
    required: true
  entry_point:
    description:
      - What the bundle runs. V(cni) is the CNI plugin C(clustermesh-cni); V(meshd) the node agent
        (C(plugins/module_utils/meshd.py), run as C(meshd --config /etc/clustermesh/agent.yaml)); V(meshctl)
        the node agent's CLI (C(plugins/module_utils/meshctl.py)).
    type: str
    required: true
    choices: [cni, meshctl, meshd]
  interpreter:
    description:
      - The node's Python, written into the shebang line.
      - Default the host's C(ansible_python_interpreter), else the interpreter Ansible discovered on
        it (found with a ping when no module has run on the host yet).
    type: str
  mode:
    description: Permissions of O(dest).
    type: raw
    default: "0755"
  owner:
    description: Owner of O(dest) (default the connecting user's).
    type: str
  group:
    description: Group of O(dest).
    type: str
attributes:
  action:
    support: full
  async:
    support: none
  bypass_host_loop:
    support: none
  check_mode:
    support: full
  diff_mode:
    support: partial
    details: The bundle is binary; the diff shows that it changes, not how.
  platform:
    platforms: posix
seealso:
  - module: ansible.builtin.copy
notes:
  - The decision record C(docs/decisions/005-node-bundle-zipapp.md) explains the mechanism.
"""

EXAMPLES = r"""
- name: Install the CNI plugin
  clustermesh.core.node_bundle:
    entry_point: cni
    dest: /opt/cni/bin/clustermesh-cni

- name: Install the node agent for the Python of its virtualenv
  clustermesh.core.node_bundle:
    entry_point: meshd
    dest: /var/lib/clustermesh/agent/bin/meshd
    interpreter: /var/lib/clustermesh/agent/venv/bin/python

- name: Install it for another Python
  clustermesh.core.node_bundle:
    entry_point: cni
    dest: /opt/cni/bin/clustermesh-cni
    interpreter: /opt/clustermesh/venv/bin/python
"""

RETURN = r"""
dest:
  description: Where the bundle is.
  returned: success
  type: str
  sample: /opt/cni/bin/clustermesh-cni
entry_point:
  description: The entry point the bundle runs.
  returned: success
  type: str
  sample: cni
interpreter:
  description: The Python named in the shebang line.
  returned: success
  type: str
  sample: /usr/bin/python3
bundle_checksum:
  description: SHA-1 of the bundle built on the controller (the same as the installed file's checksum).
  returned: success
  type: str
  sample: 6e1a4ed4bc5d37e3e7ba4f5b5a1c9e2b0e0e8e2c
bundle_size:
  description: Size of the bundle in bytes.
  returned: success
  type: int
  sample: 41327
checksum:
  description: SHA-1 of the installed file (from M(ansible.builtin.copy)).
  returned: success
  type: str
  sample: 6e1a4ed4bc5d37e3e7ba4f5b5a1c9e2b0e0e8e2c
"""
