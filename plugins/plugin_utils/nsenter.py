# -*- coding: utf-8 -*-
# Copyright: clustermesh.core contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""How to enter a lab host: the single definition shared by the ``netns`` connection
plugin and ``tools/lab`` so that both run commands in exactly the same way.

A lab host is three namespaces: a network namespace named in /run/netns, and a mount
and a UTS namespace kept alive by bind-mounted handle files.  Only ``nsenter`` from
util-linux is needed on the controller.  This file imports nothing from Ansible so
``tools/lab`` can load it directly.
"""

from __future__ import annotations

import os

NETNS_DIR = "/run/netns"
DEFAULT_LAB_ROOT = "/run/clustermesh-lab"


def netns_path(netns_name):
    return os.path.join(NETNS_DIR, netns_name)


def host_handles(lab_root, netns_name):
    """Mount and UTS handle files that ``tools/lab`` creates for a host."""
    host_dir = os.path.join(lab_root, "hosts", netns_name)
    return os.path.join(host_dir, "mnt"), os.path.join(host_dir, "uts")


def nsenter_argv(netns_name, mount_handle=None, uts_handle=None):
    """argv prefix that runs the following command inside the host's namespaces.

    The network namespace is entered before the mount namespace so that the handle
    paths are resolved in the root mount namespace, where they live.
    """
    argv = ["nsenter", "--net=" + netns_path(netns_name)]
    if mount_handle:
        argv.append("--mount=" + mount_handle)
    if uts_handle:
        argv.append("--uts=" + uts_handle)
    argv.append("--")
    return argv


def missing_handles(netns_name, mount_handle=None, uts_handle=None):
    """Paths that must exist for the host to be entered, and do not."""
    wanted = [netns_path(netns_name)] + [p for p in (mount_handle, uts_handle) if p]
    return [p for p in wanted if not os.path.exists(p)]
