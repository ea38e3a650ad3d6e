# -*- coding: utf-8 -*-
# Copyright: clustermesh.core contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)

from __future__ import annotations

DOCUMENTATION = r"""
name: netns
short_description: Run tasks inside a lab host made of Linux namespaces
description:
  - Runs commands, and copies files in and out, inside a host that is a network namespace plus
    a private mount namespace and a UTS namespace on the controller machine, as built by
    C(tools/lab). Every operation enters all of the host's namespaces with C(nsenter), so a file
    written under C(/etc) lands in the host's own overlay and C(hostname) prints the host's name.
  - The controller must run as root and have C(nsenter) from util-linux.
author: clustermesh.core developers (@clustermesh)
version_added: 0.1.0
options:
  netns_name:
    description:
      - Name of the network namespace (under C(/run/netns)).
      - Defaults to the host's address (C(ansible_host), else the inventory name).
    type: str
    vars:
      - name: ansible_netns_name
  netns_mount:
    description:
      - Path of the mount-namespace handle file (a bind mount of C(/proc/PID/ns/mnt)).
      - When neither this nor O(netns_lab_root) is set, the root mount namespace is used.
    type: path
    vars:
      - name: ansible_netns_mount
  netns_uts:
    description:
      - Path of the UTS-namespace handle file.
      - When neither this nor O(netns_lab_root) is set, the root UTS namespace is used.
    type: path
    vars:
      - name: ansible_netns_uts
  netns_lab_root:
    description:
      - State directory of a lab made by C(tools/lab) (for example C(/run/clustermesh-lab/cml)).
      - When set, O(netns_mount) and O(netns_uts) default to C(<lab root>/hosts/<netns name>/mnt) and C(.../uts).
    type: path
    env:
      - name: CLUSTERMESH_LAB_ROOT
    vars:
      - name: ansible_netns_lab_root
  pipelining:
    description: Send modules over the command's standard input instead of writing them to a file first.
    type: bool
    default: true
    vars:
      - name: ansible_pipelining
      - name: ansible_netns_pipelining
notes:
  - The lab writes these variables into its inventory; see C(tools/lab inventory --show).
  - C(become) works only where it needs no password prompt (the lab runs as root).
"""

EXAMPLES = r"""
# inventory (what tools/lab writes for each host)
# c1-n1:
#   ansible_connection: clustermesh.core.netns
#   ansible_netns_name: cml-c1-n1
#   ansible_netns_mount: /run/clustermesh-lab/cml/hosts/cml-c1-n1/mnt
#   ansible_netns_uts: /run/clustermesh-lab/cml/hosts/cml-c1-n1/uts

- name: Gather facts from inside the lab host
  ansible.builtin.setup:
"""

import os
import shlex
import subprocess

import ansible.constants as C
from ansible.errors import AnsibleConnectionFailure, AnsibleError, AnsibleFileNotFound
from ansible.module_utils.common.text.converters import to_bytes, to_text
from ansible.plugins.connection import ConnectionBase
from ansible.utils.display import Display

from ansible_collections.clustermesh.core.plugins.plugin_utils.nsenter import (
    host_handles,
    missing_handles,
    nsenter_argv,
)

display = Display()


class Connection(ConnectionBase):
    """Connection to a lab host: nsenter into its network, mount and UTS namespaces."""

    transport = "clustermesh.core.netns"
    has_pipelining = True
    default_user = "root"

    def _host_argv(self):
        netns_name = self.get_option("netns_name") or self._play_context.remote_addr
        mount_handle = self.get_option("netns_mount")
        uts_handle = self.get_option("netns_uts")
        lab_root = self.get_option("netns_lab_root")
        if lab_root:
            lab_mount, lab_uts = host_handles(lab_root, netns_name)
            mount_handle = mount_handle or lab_mount
            uts_handle = uts_handle or lab_uts
        missing = missing_handles(netns_name, mount_handle, uts_handle)
        if missing:
            raise AnsibleConnectionFailure(
                "lab host %r cannot be entered: %s missing. Is the lab up? (tools/lab status)"
                % (netns_name, ", ".join(missing))
            )
        return nsenter_argv(netns_name, mount_handle, uts_handle)

    def _connect(self):
        if not self._connected:
            if os.geteuid() != 0:
                raise AnsibleConnectionFailure("the netns connection needs root on the controller")
            self._argv = self._host_argv()
            display.vvv("ESTABLISH NETNS CONNECTION: %s" % " ".join(self._argv), host=self._play_context.remote_addr)
            self._connected = True
        return self

    def exec_command(self, cmd, in_data=None, sudoable=True):
        super().exec_command(cmd, in_data=in_data, sudoable=sudoable)
        executable = C.DEFAULT_EXECUTABLE.split()[0] if C.DEFAULT_EXECUTABLE else "/bin/sh"
        argv = self._argv + [executable, "-c", to_text(cmd)]
        display.vvv("EXEC %s" % to_text(cmd), host=self._play_context.remote_addr)
        proc = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd="/")
        stdout, stderr = proc.communicate(in_data)
        return proc.returncode, stdout, stderr

    def put_file(self, in_path, out_path):
        super().put_file(in_path, out_path)
        display.vvv("PUT %s TO %s" % (in_path, out_path), host=self._play_context.remote_addr)
        if not os.path.exists(to_bytes(in_path, errors="surrogate_or_strict")):
            raise AnsibleFileNotFound("file or module does not exist: %s" % in_path)
        # The destination is opened inside the host's mount namespace, so it lands in the host's overlay.
        write = ["/bin/sh", "-c", 'cat > "$1"', "sh", out_path]
        with open(to_bytes(in_path, errors="surrogate_or_strict"), "rb") as src:
            proc = subprocess.run(self._argv + write, stdin=src, capture_output=True, cwd="/", check=False)
        if proc.returncode != 0:
            raise AnsibleError("failed to write %s in the lab host: %s" % (out_path, to_text(proc.stderr).strip()))

    def fetch_file(self, in_path, out_path):
        super().fetch_file(in_path, out_path)
        display.vvv("FETCH %s TO %s" % (in_path, out_path), host=self._play_context.remote_addr)
        read = ["/bin/sh", "-c", 'exec cat -- "$1"', "sh", in_path]
        with open(to_bytes(out_path, errors="surrogate_or_strict"), "wb") as dst:
            proc = subprocess.run(self._argv + read, stdout=dst, stderr=subprocess.PIPE, cwd="/", check=False)
        if proc.returncode != 0:
            raise AnsibleFileNotFound(
                "failed to read %s in the lab host: %s"
                % (in_path, to_text(proc.stderr).strip() or shlex.quote(in_path))
            )

    def reset(self):
        self.close()

    def close(self):
        self._connected = False
