# -*- coding: utf-8 -*-
# Copyright: clustermesh.core contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""Pod IP allocation from the node's pod CIDR, backed by files (the layout of the CNI host-local plugin).

State directory ``<data_dir>/<network>/``:

* ``<ip>``: one file per allocated address (e.g. ``10.1.0.7``), a JSON object::

      {"containerID": "...", "ifname": "eth0", "labels": {"app": "web"}, "args": {"K8S_POD_NAME": "web-0"},
       "netns": "/run/netns/...", "hostInterface": "cm_...", "mac": "..."}

  ``containerID`` and ``ifname`` identify the attachment; the rest is written by the CNI plugin once the
  pod's interface exists, so the node agent can read which pod has which address, interface and labels
  (``read_allocations``). Files in host-local's own format (``<container id>\\n<ifname>``) are understood.
* ``last_reserved_ip``: the address handed out last; the next allocation starts after it (round robin, so
  a released address is not reused at once while other addresses are free).
* ``lock``: ``flock``-ed for every change, so concurrent ADD/DEL calls never hand out an address twice.

Reserved, never allocated: the network and broadcast addresses and the first host address, which is the
node's own address in its pod CIDR (``routing_plan.overlay_ip``, used by the tunnel).
"""

from __future__ import annotations

import contextlib
import fcntl
import ipaddress
import json
import os
import tempfile

LOCK_FILE = "lock"
LAST_RESERVED_FILE = "last_reserved_ip"
DEFAULT_DATA_DIR = "/var/lib/cni/networks"


class IpamError(Exception):
    """An allocation problem; ``reason`` is machine-readable (``exhausted``, ``io``)."""

    def __init__(self, msg, reason="io", details=""):
        super().__init__(msg)
        self.reason = reason
        self.details = details


def usable_range(pod_cidr):
    """(first, count) of the addresses pods may get from ``pod_cidr``: every host address but the first
    (the node's). A /30 has one (.2); a /31 or /32 none (first is then None)."""
    network = ipaddress.IPv4Network(pod_cidr)
    first = int(network.network_address) + 2
    last = int(network.broadcast_address) - 1
    return ipaddress.IPv4Address(first) if last >= first else None, max(0, last - first + 1)


def _parse_allocation(text):
    """The JSON record of an allocation file; host-local's ``<container id>\\n<ifname>`` format too."""
    text = text.strip()
    try:
        data = json.loads(text)
    except ValueError:
        data = None
    if isinstance(data, dict):
        return data
    lines = text.splitlines()
    return {"containerID": lines[0].strip() if lines else "", "ifname": lines[1].strip() if len(lines) > 1 else ""}


def _write_atomic(path, data):
    directory = os.path.dirname(path)
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", dir=directory)
    try:
        os.fchmod(fd, 0o644)
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


class PodIpam:
    """Allocations of one CNI network on one node."""

    def __init__(self, data_dir, network, pod_cidr):
        self.network = network
        self.pod_cidr = ipaddress.IPv4Network(pod_cidr)
        self.directory = os.path.join(data_dir, network)

    # locking --------------------------------------------------------------------------------------
    @contextlib.contextmanager
    def locked(self):
        try:
            os.makedirs(self.directory, mode=0o755, exist_ok=True)
            fd = os.open(os.path.join(self.directory, LOCK_FILE), os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as exc:
            raise IpamError("cannot open the IPAM state directory %s: %s" % (self.directory, exc)) from exc
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)  # releases the lock

    # reading --------------------------------------------------------------------------------------
    def _records(self):
        """{ip: record} of every allocation file in the directory (whatever the pod CIDR)."""
        records = {}
        try:
            names = os.listdir(self.directory)
        except FileNotFoundError:
            return records
        for name in names:
            try:
                ip = ipaddress.IPv4Address(name)
            except ValueError:
                continue  # lock, last_reserved_ip, temporary files
            try:
                with open(os.path.join(self.directory, name), encoding="utf-8") as handle:
                    records[ip] = _parse_allocation(handle.read())
            except FileNotFoundError:
                continue
        return records

    def _find(self, records, container_id, ifname):
        return sorted(
            ip for ip, rec in records.items() if rec.get("containerID") == container_id and rec.get("ifname") == ifname
        )

    def lookup(self, container_id, ifname):
        """The address held by the attachment, or None."""
        found = self._find(self._records(), container_id, ifname)
        return str(found[0]) if found else None

    def allocations(self):
        """Every allocation: list of records with ``ip`` added, sorted by address."""
        return [dict(rec, ip=str(ip)) for ip, rec in sorted(self._records().items())]

    # changing -------------------------------------------------------------------------------------
    def allocate(self, container_id, ifname, record=None):
        """Reserve an address for the attachment and return ``(ip, new)``: the address it already holds
        (``new`` False) or the next free one after the last handed out. ``record`` (labels, args...) is
        stored with it. Raises IpamError(reason="exhausted") when every usable address is taken."""
        with self.locked():
            records = self._records()
            held = self._find(records, container_id, ifname)
            if held:
                return str(held[0]), False
            first, count = usable_range(self.pod_cidr)
            if not count:
                raise IpamError(
                    "pod CIDR %s has no address for pods (the first host address is the node's)" % self.pod_cidr,
                    reason="exhausted",
                )
            start = 0
            last = self._last_reserved()
            if last is not None and 0 <= int(last) - int(first) < count:
                start = int(last) - int(first) + 1
            for i in range(count):
                ip = first + (start + i) % count
                if ip in records:
                    continue
                data = dict(record or {}, containerID=container_id, ifname=ifname)
                path = os.path.join(self.directory, str(ip))
                try:
                    _write_atomic(path, json.dumps(data, sort_keys=True) + "\n")
                    _write_atomic(os.path.join(self.directory, LAST_RESERVED_FILE), str(ip) + "\n")
                except OSError as exc:
                    raise IpamError("cannot write %s: %s" % (path, exc)) from exc
                return str(ip), True
            raise IpamError(
                "no free address in pod CIDR %s: all %d pod addresses are allocated" % (self.pod_cidr, count),
                reason="exhausted",
                details="allocations in %s; remove pods (CNI DEL) to free addresses" % self.directory,
            )

    def update(self, ip, container_id, ifname, **fields):
        """Add fields to the attachment's allocation record (after the interface exists)."""
        with self.locked():
            path = os.path.join(self.directory, str(ipaddress.IPv4Address(ip)))
            try:
                with open(path, encoding="utf-8") as handle:
                    record = _parse_allocation(handle.read())
            except FileNotFoundError as exc:
                raise IpamError("allocation %s vanished while the pod was being added" % path) from exc
            if record.get("containerID") != container_id or record.get("ifname") != ifname:
                raise IpamError("allocation %s belongs to another attachment" % path)
            record.update(fields)
            try:
                _write_atomic(path, json.dumps(record, sort_keys=True) + "\n")
            except OSError as exc:
                raise IpamError("cannot write %s: %s" % (path, exc)) from exc

    def release(self, container_id, ifname):
        """Free every address held by the attachment; returns them (empty when none: not an error)."""
        if not os.path.isdir(self.directory):
            return []
        with self.locked():
            released = []
            for ip in self._find(self._records(), container_id, ifname):
                try:
                    os.unlink(os.path.join(self.directory, str(ip)))
                except FileNotFoundError:
                    continue
                except OSError as exc:
                    raise IpamError("cannot remove %s: %s" % (os.path.join(self.directory, str(ip)), exc)) from exc
                released.append(str(ip))
            return released

    def _last_reserved(self):
        try:
            with open(os.path.join(self.directory, LAST_RESERVED_FILE), encoding="utf-8") as handle:
                return ipaddress.IPv4Address(handle.read().strip())
        except (OSError, ValueError):
            return None


def read_allocations(data_dir, network):
    """Every allocation of a network on this node, for the node agent: list of records (``ip``,
    ``containerID``, ``ifname``, ``labels``, ``args``, ``netns``, ``hostInterface``, ``mac``)."""
    reader = PodIpam(data_dir, network, "0.0.0.0/32")
    return reader.allocations()
