# -*- coding: utf-8 -*-
# Copyright: clustermesh.core contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""Pod plumbing with pyroute2: a veth pair from the node into the pod's network namespace.

What one attachment (container ID, interface name) gets::

    pod netns                                  node (the caller's netns)
    <ifname> 10.1.0.7/32, MTU from config      cm_<11 hex>  (veth peer, up, MTU from config)
      169.254.1.1 dev <ifname> scope link      10.1.0.7/32 dev cm_<hex> scope link proto 204
      default via 169.254.1.1 dev <ifname>     neighbour 10.1.0.7 -> pod MAC, permanent
      neighbour 169.254.1.1 -> cm_<hex> MAC,   net.ipv4.ip_forward=1
        permanent

The host side is named ``cm_`` + 11 hex characters of SHA-256 of ``<container id>/<ifname>`` (never
``cm_vxlan``, which is not hex). No ARP is needed in either direction; the node routes pod traffic.
The host route carries protocol 204 (``routing_plan.POD_ROUTE_PROTOCOL``) so the routing code and the
agent can tell pod routes apart.

The pod's namespace is entered with setns(2) on the calling thread just long enough to open a
netlink socket there (a socket stays in the namespace it was created in); ``ip netns exec`` is
never used (it remounts /sys, which would hide pinned BPF maps).
"""

from __future__ import annotations

import ctypes
import errno
import hashlib
import os
import socket
from dataclasses import dataclass

from .routing_plan import POD_ROUTE_PROTOCOL

try:
    from pyroute2 import IPRoute
    from pyroute2.netlink.exceptions import NetlinkError
except ImportError as exc:  # reported by the caller (cni_plugin) as a clear error
    IPRoute = None
    NetlinkError = OSError
    IMPORT_ERROR = exc
else:
    IMPORT_ERROR = None

HOST_VETH_PREFIX = "cm_"
HOST_VETH_HASH_LEN = 11
GATEWAY = "169.254.1.1"  # link-local next hop of every pod, answered by a permanent neighbour entry
IP_FORWARD = "/proc/sys/net/ipv4/ip_forward"

CLONE_NEWNET = 0x40000000
NUD_PERMANENT = 0x80
RT_SCOPE_LINK = 253
RT_TABLE_MAIN = 254
IFF_UP = 0x1


class PodNetworkError(Exception):
    """A pod plumbing failure. ``reason``: ``no-netns`` (the namespace is missing), ``exists`` (the
    interface is already there), ``kernel`` (a netlink call failed), ``check`` (CHECK found problems,
    listed in ``problems``)."""

    def __init__(self, msg, reason, details="", problems=None):
        super().__init__(msg)
        self.reason = reason
        self.details = details
        self.problems = list(problems or [])


@dataclass(frozen=True)
class Attachment:
    container_id: str
    ifname: str
    netns: str
    ip: str
    mtu: int

    @property
    def host_ifname(self):
        return host_veth_name(self.container_id, self.ifname)


def host_veth_name(container_id, ifname):
    """The node-side veth of an attachment: ``cm_`` + 11 hex characters (14 characters in all)."""
    digest = hashlib.sha256(("%s/%s" % (container_id, ifname)).encode("utf-8")).hexdigest()
    return HOST_VETH_PREFIX + digest[:HOST_VETH_HASH_LEN]


# entering the pod's namespace -------------------------------------------------------------------
_libc = None


def _setns(fd):
    global _libc
    if _libc is None:
        _libc = ctypes.CDLL(None, use_errno=True)
    if _libc.setns(fd, CLONE_NEWNET) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))


def open_netns(path):
    """An fd of the network namespace at ``path``; PodNetworkError(no-netns) when it is missing."""
    try:
        return os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError as exc:
        raise PodNetworkError("network namespace %s does not exist" % path, "no-netns") from exc
    except OSError as exc:
        raise PodNetworkError("cannot open network namespace %s: %s" % (path, exc.strerror), "no-netns") from exc


def netlink_in(netns_fd, path="the pod's namespace"):
    """An IPRoute whose socket lives in the namespace of ``netns_fd``."""
    here = os.open("/proc/thread-self/ns/net", os.O_RDONLY | os.O_CLOEXEC)
    try:
        try:
            _setns(netns_fd)
        except OSError as exc:
            raise PodNetworkError(
                "%s is not a network namespace this process can enter: %s" % (path, exc.strerror), "no-netns"
            ) from exc
        try:
            return IPRoute()
        finally:
            _setns(here)  # back to the node's namespace, whatever happened
    finally:
        os.close(here)


# small netlink helpers -------------------------------------------------------------------------
def _link_index(ipr, name):
    found = ipr.link_lookup(ifname=name)
    return found[0] if found else None


def _link(ipr, index):
    return ipr.get_links(index)[0]


def _link_kind(link):
    info = link.get("IFLA_LINKINFO")
    return info.get("IFLA_INFO_KIND") if info is not None else None


def _ipv4_addresses(ipr, index):
    return {(a.get("IFA_ADDRESS"), a["prefixlen"]) for a in ipr.get_addr(family=socket.AF_INET, index=index)}


def _routes(ipr):
    out = []
    for r in ipr.get_routes(family=socket.AF_INET, table=RT_TABLE_MAIN):
        out.append(
            {
                "dst": "%s/%d" % (r.get("RTA_DST") or "0.0.0.0", r["dst_len"]),
                "gateway": r.get("RTA_GATEWAY"),
                "oif": r.get("RTA_OIF"),
                "scope": r["scope"],
                "proto": r["proto"],
            }
        )
    return out


def _neighbour(ipr, index, ip):
    for n in ipr.get_neighbours(family=socket.AF_INET, ifindex=index):
        if n.get("NDA_DST") == ip:
            return n
    return None


def _ensure_ip_forward():
    with open(IP_FORWARD, encoding="ascii") as handle:
        if handle.read().strip() == "1":
            return
    with open(IP_FORWARD, "w", encoding="ascii") as handle:
        handle.write("1\n")


def _kernel_error(what, exc):
    detail = getattr(exc, "strerror", None) or str(exc)
    return PodNetworkError("%s failed: %s" % (what, detail), "kernel", details=repr(exc))


# ADD -----------------------------------------------------------------------------------------------
def setup(att):
    """Create the attachment's veth pair and everything listed in the module docstring. Validates first;
    on any failure removes what it created (the node is left as before) and raises PodNetworkError.
    Returns {host_ifname, host_mac, host_index, pod_mac, pod_index}."""
    fd = open_netns(att.netns)
    host = pod = None
    created = False
    host_name = att.host_ifname
    try:
        pod = netlink_in(fd, att.netns)
        host = IPRoute()
        if _link_index(pod, att.ifname) is not None:
            raise PodNetworkError(
                "interface %s already exists in %s" % (att.ifname, att.netns),
                "exists",
                details="a second ADD for the same container and interface needs a DEL in between",
            )
        try:
            _ensure_ip_forward()
        except OSError as exc:
            raise _kernel_error("setting net.ipv4.ip_forward=1", exc) from exc
        stale = _link_index(host, host_name)
        if stale is not None:  # left by an earlier attachment whose pod side is gone: ours by name
            try:
                host.link("del", index=stale)
            except NetlinkError as exc:
                raise _kernel_error("removing the stale %s" % host_name, exc) from exc
        step = "creating veth %s with %s in %s" % (host_name, att.ifname, att.netns)
        try:
            host.link(
                "add",
                ifname=host_name,
                kind="veth",
                mtu=att.mtu,
                peer={"ifname": att.ifname, "net_ns_fd": fd, "mtu": att.mtu},
            )
            created = True
            host_index = _link_index(host, host_name)
            pod_index = _link_index(pod, att.ifname)
            if host_index is None or pod_index is None:
                raise PodNetworkError("the new veth pair %s/%s is not visible" % (host_name, att.ifname), "kernel")
            host_mac = _link(host, host_index).get("IFLA_ADDRESS")
            pod_mac = _link(pod, pod_index).get("IFLA_ADDRESS")
            step = "configuring %s in %s" % (att.ifname, att.netns)
            pod.link("set", index=pod_index, state="up")
            pod.addr("add", index=pod_index, address=att.ip, prefixlen=32)
            pod.route("add", dst=GATEWAY + "/32", oif=pod_index, scope=RT_SCOPE_LINK)
            pod.route("add", dst="0.0.0.0/0", gateway=GATEWAY, oif=pod_index)
            pod.neigh("add", dst=GATEWAY, lladdr=host_mac, ifindex=pod_index, state=NUD_PERMANENT)
            step = "configuring %s" % host_name
            host.link("set", index=host_index, state="up")
            host.neigh("add", dst=att.ip, lladdr=pod_mac, ifindex=host_index, state=NUD_PERMANENT)
            step = "adding the route %s/32 dev %s" % (att.ip, host_name)
            host.route(
                "add",
                dst=att.ip + "/32",
                oif=host_index,
                scope=RT_SCOPE_LINK,
                proto=POD_ROUTE_PROTOCOL,
            )
        except NetlinkError as exc:
            if exc.code == errno.EEXIST and not created:
                raise PodNetworkError(
                    "%s failed: an interface named %s already exists" % (step, att.ifname), "exists"
                ) from exc
            if exc.code == errno.EEXIST and step.startswith("adding the route"):
                raise PodNetworkError(
                    "%s failed: the node already has a route to %s/32 (another pod with this address?)"
                    % (step, att.ip),
                    "kernel",
                ) from exc
            raise _kernel_error(step, exc) from exc
        return {
            "host_ifname": host_name,
            "host_mac": host_mac,
            "host_index": host_index,
            "pod_mac": pod_mac,
            "pod_index": pod_index,
        }
    except BaseException:
        if created and host is not None:
            _delete_link(host, host_name)  # takes the pod side, its address, routes, neighbours with it
        raise
    finally:
        for ipr in (pod, host):
            if ipr is not None:
                ipr.close()
        os.close(fd)


def _delete_link(ipr, name):
    index = _link_index(ipr, name)
    if index is None:
        return False
    try:
        ipr.link("del", index=index)
    except NetlinkError as exc:
        if exc.code == errno.ENODEV:
            return False
        raise
    return True


# DEL -----------------------------------------------------------------------------------------------
def teardown(container_id, ifname, netns=None):
    """Remove the attachment's veth pair (the pod side, its routes and neighbours go with it). Missing
    pieces are fine: a second DEL, or a DEL after the namespace is gone, succeeds. Returns the names
    removed."""
    removed = []
    host_name = host_veth_name(container_id, ifname)
    host = IPRoute()
    try:
        try:
            if _delete_link(host, host_name):
                removed.append(host_name)
        except NetlinkError as exc:
            raise _kernel_error("removing %s" % host_name, exc) from exc
    finally:
        host.close()
    if removed or not netns:
        return removed
    # The node side is gone but the pod side may still be there (its peer was deleted by hand?):
    # remove CNI_IFNAME when it is a veth, which is what we create.
    try:
        fd = open_netns(netns)
    except PodNetworkError:
        return removed
    try:
        try:
            pod = netlink_in(fd, netns)
        except PodNetworkError:
            return removed
        try:
            index = _link_index(pod, ifname)
            if index is not None and _link_kind(_link(pod, index)) == "veth":
                pod.link("del", index=index)
                removed.append("%s:%s" % (netns, ifname))
        except NetlinkError as exc:
            if exc.code != errno.ENODEV:
                raise _kernel_error("removing %s in %s" % (ifname, netns), exc) from exc
        finally:
            pod.close()
    finally:
        os.close(fd)
    return removed


# CHECK ---------------------------------------------------------------------------------------------
def check(att, pod_mac=None, host_mac=None):
    """Compare the attachment with what ``setup`` makes. Raises PodNetworkError (reason ``check``, the
    list in ``problems``) when anything is missing or wrong; ``no-netns`` when the namespace is gone."""
    problems = []
    fd = open_netns(att.netns)
    host = pod = None
    host_name = att.host_ifname
    try:
        pod = netlink_in(fd, att.netns)
        host = IPRoute()
        pod_index = _link_index(pod, att.ifname)
        host_index = _link_index(host, host_name)
        real_host_mac = real_pod_mac = None
        if host_index is None:
            problems.append("the node's veth %s is missing" % host_name)
        else:
            link = _link(host, host_index)
            real_host_mac = link.get("IFLA_ADDRESS")
            if not link["flags"] & IFF_UP:
                problems.append("%s is down" % host_name)
            if link.get("IFLA_MTU") != att.mtu:
                problems.append("%s has MTU %s, expected %d" % (host_name, link.get("IFLA_MTU"), att.mtu))
            if host_mac and real_host_mac != host_mac:
                problems.append("%s has MAC %s, expected %s" % (host_name, real_host_mac, host_mac))
        if pod_index is None:
            problems.append("interface %s is missing in %s" % (att.ifname, att.netns))
        else:
            link = _link(pod, pod_index)
            real_pod_mac = link.get("IFLA_ADDRESS")
            if not link["flags"] & IFF_UP:
                problems.append("%s in the pod is down" % att.ifname)
            if link.get("IFLA_MTU") != att.mtu:
                problems.append("%s in the pod has MTU %s, expected %d" % (att.ifname, link.get("IFLA_MTU"), att.mtu))
            if pod_mac and real_pod_mac != pod_mac:
                problems.append("%s in the pod has MAC %s, expected %s" % (att.ifname, real_pod_mac, pod_mac))
            if (att.ip, 32) not in _ipv4_addresses(pod, pod_index):
                problems.append("address %s/32 is missing on %s in the pod" % (att.ip, att.ifname))
            routes = _routes(pod)
            if not any(
                r["dst"] == GATEWAY + "/32" and r["oif"] == pod_index and r["scope"] == RT_SCOPE_LINK for r in routes
            ):
                problems.append("route %s dev %s scope link is missing in the pod" % (GATEWAY, att.ifname))
            if not any(r["dst"] == "0.0.0.0/0" and r["gateway"] == GATEWAY and r["oif"] == pod_index for r in routes):
                problems.append("default route via %s dev %s is missing in the pod" % (GATEWAY, att.ifname))
            neigh = _neighbour(pod, pod_index, GATEWAY)
            if neigh is None or not neigh["state"] & NUD_PERMANENT:
                problems.append("permanent neighbour %s is missing in the pod" % GATEWAY)
            elif real_host_mac and neigh.get("NDA_LLADDR") != real_host_mac:
                problems.append(
                    "neighbour %s in the pod points to %s, not %s's %s"
                    % (GATEWAY, neigh.get("NDA_LLADDR"), host_name, real_host_mac)
                )
        if host_index is not None:
            routes = _routes(host)
            if not any(
                r["dst"] == att.ip + "/32" and r["oif"] == host_index and r["proto"] == POD_ROUTE_PROTOCOL
                for r in routes
            ):
                problems.append(
                    "route %s/32 dev %s proto %d is missing on the node" % (att.ip, host_name, POD_ROUTE_PROTOCOL)
                )
            neigh = _neighbour(host, host_index, att.ip)
            if neigh is None or not neigh["state"] & NUD_PERMANENT:
                problems.append("permanent neighbour %s on %s is missing on the node" % (att.ip, host_name))
            elif real_pod_mac and neigh.get("NDA_LLADDR") != real_pod_mac:
                problems.append(
                    "neighbour %s on %s points to %s, not the pod's %s"
                    % (att.ip, host_name, neigh.get("NDA_LLADDR"), real_pod_mac)
                )
        try:
            with open(IP_FORWARD, encoding="ascii") as handle:
                if handle.read().strip() != "1":
                    problems.append("net.ipv4.ip_forward is not 1 on the node")
        except OSError as exc:
            problems.append("cannot read %s: %s" % (IP_FORWARD, exc.strerror))
    except NetlinkError as exc:
        raise _kernel_error("reading the attachment's state", exc) from exc
    finally:
        for ipr in (pod, host):
            if ipr is not None:
                ipr.close()
        os.close(fd)
    if problems:
        more = " (and %d more)" % (len(problems) - 1) if len(problems) > 1 else ""
        raise PodNetworkError(
            "attachment %s/%s is not as ADD made it: %s%s" % (att.container_id, att.ifname, problems[0], more),
            "check",
            details="; ".join(problems),
            problems=problems,
        )
