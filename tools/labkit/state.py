"""Where a lab keeps its state and how everything it creates is named.

Everything a lab creates carries its prefix: network namespaces ``<prefix>-<host>``,
``<prefix>-router`` and ``<prefix>-fabric``, and the state directory
``/run/clustermesh-lab/<prefix>/``::

    state.json            written before anything is created: what ``down`` must remove
    topology.json         the normalised topology of the running lab
    fabric.json           the segments the fabric/router were built for
    hosts/                a private bind mount of itself, holding per host:
      <netns>/mnt, uts    mount and UTS namespace handles (bind-mounted by unshare)
      <netns>/etc/{upper,work}, varlib/, varlog/       overlay layers for /etc, /var/lib, /var/log
      <netns>/ready.json  the host record, written when the host is complete
    inventory/hosts.yml   the Ansible inventory
"""

from __future__ import annotations

import fcntl
import importlib.util
import json
import os
import re

TOOLS_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
REPO_ROOT = os.path.dirname(TOOLS_DIR)
VENV_PYTHON = os.path.join(REPO_ROOT, ".venv", "bin", "python")
NSENTER_PY = os.path.join(REPO_ROOT, "plugins", "plugin_utils", "nsenter.py")

DEFAULT_PREFIX = "cml"
PREFIX_ENV = "CLUSTERMESH_LAB_PREFIX"
PREFIX_RE = re.compile(r"^[a-z0-9]{1,6}$")


def _load_nsenter():
    """plugins/plugin_utils/nsenter.py, loaded from its path (tools/ is not in the collection's package)."""
    spec = importlib.util.spec_from_file_location("clustermesh_lab_nsenter", NSENTER_PY)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


nsenter = _load_nsenter()


class LabError(Exception):
    """A failure to report to the user (no traceback)."""


def check_prefix(prefix):
    if not isinstance(prefix, str) or not PREFIX_RE.match(prefix):
        raise LabError("invalid lab prefix %r: 1 to 6 characters, lowercase letters and digits" % (prefix,))
    return prefix


def resolve_prefix(prefix=None):
    return check_prefix(prefix or os.environ.get(PREFIX_ENV) or DEFAULT_PREFIX)


class Lab:
    """Names and paths of one lab."""

    def __init__(self, prefix, lab_root=None):
        self.prefix = check_prefix(prefix)
        self.lab_root = lab_root or nsenter.DEFAULT_LAB_ROOT
        self.state_dir = os.path.join(self.lab_root, self.prefix)
        self.hosts_dir = os.path.join(self.state_dir, "hosts")
        self.state_path = os.path.join(self.state_dir, "state.json")
        self.topology_path = os.path.join(self.state_dir, "topology.json")
        self.fabric_path = os.path.join(self.state_dir, "fabric.json")
        self.inventory_path = os.path.join(self.state_dir, "inventory", "hosts.yml")
        self.router_ns = self.prefix + "-router"
        self.fabric_ns = self.prefix + "-fabric"

    def netns(self, host_name):
        return "%s-%s" % (self.prefix, host_name)

    def host_dir(self, netns_name):
        return os.path.join(self.hosts_dir, netns_name)

    def handles(self, netns_name):
        """(mount handle, uts handle) of a host, as the netns connection plugin expects them."""
        return nsenter.host_handles(self.state_dir, netns_name)

    def owns_netns(self, netns_name):
        return netns_name.startswith(self.prefix + "-")

    # state files -----------------------------------------------------------------------
    def read_json(self, path):
        try:
            with open(path, encoding="utf-8") as f:
                return json.load(f)
        except FileNotFoundError:
            return None
        except (OSError, ValueError):
            return None

    def write_json(self, path, data):
        os.makedirs(os.path.dirname(path), exist_ok=True)
        tmp = path + ".tmp"
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(data, f, indent=2, sort_keys=True)
            f.write("\n")
        os.replace(tmp, path)

    def topology(self):
        """The normalised topology of the running lab, or None."""
        from .topology import Topology

        data = self.read_json(self.topology_path)
        return Topology.from_dict(data) if data else None


class LabLock:
    """Serialises ``up``/``down`` runs on the machine (flock on the lab root directory)."""

    def __init__(self, lab_root):
        self.lab_root = lab_root
        self.fd = None

    def __enter__(self):
        os.makedirs(self.lab_root, exist_ok=True)
        self.fd = os.open(self.lab_root, os.O_RDONLY | os.O_DIRECTORY)
        fcntl.flock(self.fd, fcntl.LOCK_EX)
        return self

    def __exit__(self, *exc):
        os.close(self.fd)
        self.fd = None


def _unescape(field):
    return re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), field)


def mounts():
    """Mount points of the caller's mount namespace: list of (mount_point, fstype, root)."""
    result = []
    with open("/proc/self/mountinfo", encoding="utf-8") as f:
        for line in f:
            fields = line.split()
            sep = fields.index("-")
            result.append((_unescape(fields[4]), fields[sep + 1], _unescape(fields[3])))
    return result


def mount_points_under(path):
    """Mount points at or below path, deepest first."""
    path = path.rstrip("/")
    found = {m for m, _t, _r in mounts() if m == path or m.startswith(path + "/")}
    return sorted(found, key=lambda m: (m.count("/"), m), reverse=True)


def is_mount_point(path):
    return any(m == path for m, _t, _r in mounts())


def netns_names():
    try:
        return sorted(os.listdir(nsenter.NETNS_DIR))
    except FileNotFoundError:
        return []
