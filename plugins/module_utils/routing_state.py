# -*- coding: utf-8 -*-
# Copyright: clustermesh.core contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""Pod routing in the kernel: read the state we own, compare it with a plan, apply the difference.

What we own (and nothing else is read for change or touched):

* the device ``cm_vxlan`` (classic VXLAN with FDB entries, see docs/decisions/004-classic-vxlan.md),
  its addresses, FDB entries and permanent neighbours;
* routes with protocol 203 (``routing_plan.ROUTE_PROTOCOL``) in the main table;
* ``net.ipv4.ip_forward``, set to 1 when it is 0 (never reset).

Routes with protocol 204 (host routes to local pods, owned by the CNI plugin) and every other route,
device, neighbour or sysctl are left alone. Before anything is applied the whole difference is
computed, and everything a user can get wrong (bad plan input, no interface holding the node IP, a
foreign route or VXLAN device in the way) raises an error, so a failed run changes nothing.

The underlay is IPv4: routes to IPv6 pod CIDRs are skipped with a warning.

API (no Ansible imports; shared by the ``routing`` module and the node agent)::

    with IPRoute() as ipr:
        underlay = underlay_link(ipr, "198.18.1.11")        # {ifname, index, prefixlen, mtu}
        plan = plan_routing(node, peers, "hybrid", underlay["prefixlen"], underlay["mtu"])
        owned = read_owned(ipr)                               # OwnedState
        changes = diff(plan, owned, underlay)                 # [Change(text=...)], raises RoutingStateError
        apply(ipr, changes)

or all of it, masquerade included: ``reconcile(node, peers, mode, ...)`` -> result dict.
"""

from __future__ import annotations

import ipaddress
import socket
from dataclasses import dataclass, field, replace

from . import masquerade as masq
from .routing_plan import (
    ROUTE_PROTOCOL,
    VXLAN_DEVICE,
    RoutingPlan,
    RoutingPlanError,
    plan_routing,
    pod_mtu,
)

try:
    from pyroute2 import IPRoute
    from pyroute2.netlink.exceptions import NetlinkError
except ImportError as exc:  # modules report it with missing_requirements
    IPRoute = None

    class NetlinkError(Exception):  # noqa: N818 - stand-in so except clauses still work
        pass

    IMPORT_ERROR = exc
else:
    IMPORT_ERROR = None

PROC_IP_FORWARD = "/proc/sys/net/ipv4/ip_forward"
MAIN_TABLE = 254
RTNH_F_ONLINK = 4
NUD_PERMANENT = 0x80
IFF_UP = 0x1
STATES = ("present", "absent")
PROTOCOL_NAMES = {0: "unspec", 1: "redirect", 2: "kernel", 3: "boot", 4: "static", 186: "bgp", 188: "ospf"}

__all__ = [
    "Change",
    "OwnedRoute",
    "OwnedState",
    "RoutingStateError",
    "apply",
    "desired_state",
    "diff",
    "read_owned",
    "reconcile",
    "state_text",
    "underlay_link",
]


class RoutingStateError(RuntimeError):
    """A problem found on the node (no underlay, something in the way, the kernel refusing a change)."""


# --- the node's state -----------------------------------------------------------------------------


@dataclass(frozen=True)
class OwnedRoute:
    dst: str  # "10.2.1.0/24"
    via: str | None
    dev: str | None
    onlink: bool = False
    family: int = 4
    priority: int = 0
    tos: int = 0

    def text(self):
        words = ["route", self.dst]
        if self.via:
            words += ["via", self.via]
        if self.dev:
            words += ["dev", self.dev]
        if self.onlink:
            words.append("onlink")
        words += ["proto", str(ROUTE_PROTOCOL)]
        if self.priority:
            words += ["metric", str(self.priority)]
        if self.tos:
            words += ["tos", str(self.tos)]
        return " ".join(words)

    @property
    def key(self):
        """What identifies a route to the kernel (a replace with the same key replaces it)."""
        return (self.family, self.dst, self.priority, self.tos)


@dataclass
class OwnedState:
    """The state we own on this node, as read from the kernel (or projected from a plan)."""

    ip_forward: bool | None = None
    # cm_vxlan: {kind, vni, port, local, link, learning, external, mtu, mac, addresses, up} or None
    vxlan: dict | None = None
    routes: list = field(default_factory=list)  # OwnedRoute
    fdb: list = field(default_factory=list)  # (mac, dst) on cm_vxlan
    neighbours: list = field(default_factory=list)  # (ip, mac), permanent, on cm_vxlan
    # Not ours, read only to refuse a plan that would collide with them:
    foreign_routes: dict = field(default_factory=dict)  # "dst/len" -> protocol (main table, IPv4, metric 0)
    foreign_vxlan: list = field(default_factory=list)  # [{name, port, vni, external}]

    def to_dict(self):
        return {
            "ip_forward": self.ip_forward,
            "vxlan": self.vxlan,
            "routes": [r.text() for r in sorted(self.routes, key=_route_sort)],
            "fdb": [{"mac": m, "dst": d} for m, d in sorted(self.fdb)],
            "neighbours": [{"ip": i, "mac": m} for i, m in sorted(self.neighbours, key=_neigh_sort)],
        }


def _route_sort(route):
    net = ipaddress.ip_network(route.dst)
    return (net.version, net, route.priority, route.tos)


def _neigh_sort(entry):
    return ipaddress.ip_address(entry[0])


def _vxlan_text(v, with_state=True):
    return "link %s %s id %s local %s dev %s dstport %s %s%s address %s mtu %s%s" % (
        VXLAN_DEVICE,
        v["kind"],
        v["vni"],
        v["local"],
        v["link"],
        v["port"],
        "learning" if v["learning"] else "nolearning",
        " external" if v["external"] else "",
        v["mac"],
        v["mtu"],
        (" up" if v["up"] else " down") if with_state else "",
    )


def state_text(state):
    """Our state as text, one object per line (the before/after of diff mode)."""
    lines = []
    if state.ip_forward is not None:
        lines.append("net.ipv4.ip_forward = %d" % int(state.ip_forward))
    if state.vxlan:
        lines.append(_vxlan_text(state.vxlan))
        lines += ["address %s dev %s" % (a, VXLAN_DEVICE) for a in state.vxlan["addresses"]]
        lines += ["fdb %s dst %s dev %s" % (m, d, VXLAN_DEVICE) for m, d in sorted(state.fdb)]
        lines += [
            "neighbour %s lladdr %s dev %s permanent" % (i, m, VXLAN_DEVICE)
            for i, m in sorted(state.neighbours, key=_neigh_sort)
        ]
    lines += [r.text() for r in sorted(state.routes, key=_route_sort)]
    return "\n".join(lines) + "\n"


def _not_underlay(label):
    label = str(label or "")
    return label == "lo" or label.startswith("cm_")


def underlay_link(ipr, node_ip, ifname=None):
    """The underlay: the interface holding ``node_ip`` (or ``ifname`` when given), as
    {ifname, index, prefixlen, mtu}; ``prefixlen`` is that of the node IP's address, which decides
    which peers are on-link. Raises RoutingStateError when no interface holds the node IP."""
    holders = [
        m for m in ipr.get_addr(family=socket.AF_INET) if (m.get("IFA_LOCAL") or m.get("IFA_ADDRESS")) == node_ip
    ]
    # the node IP may also sit on lo or on a device of ours (anycast, tests): a real link wins
    holders.sort(key=lambda m: _not_underlay(m.get("IFA_LABEL")))
    holder = holders[0] if holders else None
    if holder is None:
        raise RoutingStateError(
            "node ip %s: no interface of this node holds it, so there is no underlay to route over; "
            "check clustermesh_node_ip of this host (it must be an address configured on the node)" % node_ip
        )
    index = holder["index"]
    if ifname:
        found = ipr.link_lookup(ifname=ifname)
        if not found:
            raise RoutingStateError(
                "underlay_interface: this node has no interface named %r; omit it to use the interface "
                "holding %s" % (ifname, node_ip)
            )
        index = found[0]
    link = ipr.link("get", index=index)[0]
    name = link.get("IFLA_IFNAME")
    if name == VXLAN_DEVICE:
        raise RoutingStateError("underlay: %s is our own VXLAN device, not an underlay" % name)
    return {"ifname": name, "index": index, "prefixlen": holder["prefixlen"], "mtu": link.get("IFLA_MTU")}


def read_ip_forward(path=PROC_IP_FORWARD):
    try:
        with open(path, encoding="ascii") as f:
            return f.read().strip() == "1"
    except OSError:
        return None


def _route_dst(msg):
    dst = msg.get("RTA_DST")
    family = msg["family"]
    if dst is None:
        dst = "0.0.0.0" if family == socket.AF_INET else "::"
    return str(ipaddress.ip_network("%s/%s" % (dst, msg["dst_len"]), strict=False))


def _parse_vxlan(ipr, msg, names):
    info = msg.get("IFLA_LINKINFO")
    kind = info.get("IFLA_INFO_KIND") if info else None
    data = (info.get("IFLA_INFO_DATA") if info else None) or {}

    def get(name, default=None):
        return data.get(name, default) if hasattr(data, "get") else default

    index = msg["index"]
    addresses = sorted(
        (
            "%s/%s" % (a.get("IFA_LOCAL") or a.get("IFA_ADDRESS"), a["prefixlen"])
            for a in ipr.get_addr(index=index, family=socket.AF_INET)
        ),
        key=ipaddress.ip_interface,
    )
    return {
        "kind": kind,
        "vni": get("IFLA_VXLAN_ID"),
        "port": get("IFLA_VXLAN_PORT"),
        "local": get("IFLA_VXLAN_LOCAL"),
        "link": names.get(get("IFLA_VXLAN_LINK"), get("IFLA_VXLAN_LINK")),
        "learning": bool(get("IFLA_VXLAN_LEARNING", 0)),
        "external": bool(get("IFLA_VXLAN_COLLECT_METADATA", 0)),
        "mtu": msg.get("IFLA_MTU"),
        "mac": msg.get("IFLA_ADDRESS"),
        "addresses": addresses,
        "up": bool(msg["flags"] & IFF_UP),
        "index": index,
    }


def read_owned(ipr, ip_forward_path=PROC_IP_FORWARD):
    """Read what we own from the current network namespace."""
    state = OwnedState(ip_forward=read_ip_forward(ip_forward_path))
    links = ipr.get_links()
    names = {m["index"]: m.get("IFLA_IFNAME") for m in links}
    vx_index = None
    for msg in links:
        info = msg.get("IFLA_LINKINFO")
        kind = info.get("IFLA_INFO_KIND") if info else None
        if msg.get("IFLA_IFNAME") == VXLAN_DEVICE:
            state.vxlan = _parse_vxlan(ipr, msg, names)
            vx_index = msg["index"]
        elif kind == "vxlan":
            other = _parse_vxlan(ipr, msg, names)
            state.foreign_vxlan.append(
                {
                    "name": msg.get("IFLA_IFNAME"),
                    "port": other["port"],
                    "vni": other["vni"],
                    "external": other["external"],
                }
            )
    for family, version in ((socket.AF_INET, 4), (socket.AF_INET6, 6)):
        try:
            dump = ipr.get_routes(family=family, table=MAIN_TABLE)
        except NetlinkError:  # IPv6 disabled
            dump = []
        for msg in dump:
            if (msg.get("RTA_TABLE") or msg["table"]) != MAIN_TABLE:
                continue
            dst = _route_dst(msg)
            if msg["proto"] != ROUTE_PROTOCOL:
                if version == 4 and not msg.get("RTA_PRIORITY") and not msg["tos"]:
                    state.foreign_routes.setdefault(dst, msg["proto"])
                continue
            via = msg.get("RTA_GATEWAY")
            if via is None and msg.get("RTA_VIA"):
                via = msg.get("RTA_VIA").get("addr")
            state.routes.append(
                OwnedRoute(
                    dst=dst,
                    via=via,
                    dev=names.get(msg.get("RTA_OIF")),
                    onlink=bool(msg["flags"] & RTNH_F_ONLINK),
                    family=version,
                    priority=msg.get("RTA_PRIORITY") or 0,
                    tos=msg["tos"],
                )
            )
    if vx_index is not None:
        for msg in ipr.fdb("dump", ifindex=vx_index):
            if msg["ifindex"] != vx_index:
                continue
            state.fdb.append((msg.get("NDA_LLADDR"), msg.get("NDA_DST")))
        for msg in ipr.get_neighbours(ifindex=vx_index, family=socket.AF_INET):
            if msg["ifindex"] == vx_index and msg["state"] & NUD_PERMANENT:
                state.neighbours.append((msg.get("NDA_DST"), msg.get("NDA_LLADDR")))
    return state


# --- desired state and the difference -------------------------------------------------------------


def desired_state(plan, underlay, ip_forward_before=None):
    """The OwnedState that ``plan`` asks for (None: remove everything ours), and warnings.

    ``ip_forward`` stays as it was for removal (we never reset it)."""
    warnings = []
    if plan is None:
        return OwnedState(ip_forward=ip_forward_before), warnings
    state = OwnedState(ip_forward=True)
    if plan.vxlan:
        v = plan.vxlan
        state.vxlan = {
            "kind": "vxlan",
            "vni": v["vni"],
            "port": v["port"],
            "local": v["local"],
            "link": underlay["ifname"],
            "learning": False,
            "external": False,
            "mtu": v["mtu"],
            "mac": v["mac"],
            "addresses": ["%s/32" % v["address"]],
            "up": True,
        }
        state.fdb = [(f.mac, f.dst) for f in plan.fdb]
        state.neighbours = [(n.ip, n.mac) for n in plan.neighbours]
    for r in plan.routes:
        if ipaddress.ip_network(r.dst).version != 4:
            warnings.append(
                "peer %s: pod CIDR %s skipped (the underlay is IPv4; IPv6 pod routes are not supported)"
                % (r.peer, r.dst)
            )
            continue
        state.routes.append(
            OwnedRoute(
                dst=str(ipaddress.ip_network(r.dst)), via=r.via, dev=r.dev or underlay["ifname"], onlink=r.onlink
            )
        )
    return state, warnings


@dataclass
class Change:
    """One netlink (or sysctl) operation; ``text`` says what it does, as ``ip`` would."""

    kind: str  # sysctl | link | address | fdb | neighbour | route
    action: str  # set | create | recreate | delete | add | replace | append
    text: str
    args: dict = field(default_factory=dict)

    def __str__(self):
        return self.text


_IDENTITY = ("kind", "vni", "port", "local", "link", "learning", "external", "mac")


def _check_conflicts(want, owned):
    problems = []
    for r in want.routes:
        proto = owned.foreign_routes.get(r.dst) if r.family == 4 and not r.priority and not r.tos else None
        if proto is not None:
            problems.append(
                "route %s: the main table already has a route to it with protocol %s (%s), not ours (%d); "
                "remove it (ip route del %s) or leave that pod CIDR out of the mesh"
                % (r.dst, proto, PROTOCOL_NAMES.get(proto, "?"), ROUTE_PROTOCOL, r.dst)
            )
    if want.vxlan:
        for other in owned.foreign_vxlan:
            if other["port"] == want.vxlan["port"] and (other["external"] or other["vni"] == want.vxlan["vni"]):
                problems.append(
                    "device %s: a VXLAN device on UDP port %s (%s) that is not ours is in the way of %s; "
                    "remove it or use another node for it"
                    % (
                        other["name"],
                        other["port"],
                        "collect-metadata" if other["external"] else "VNI %s" % other["vni"],
                        VXLAN_DEVICE,
                    )
                )
    if problems:
        raise RoutingStateError("; ".join(problems))


def diff(plan, owned, underlay=None, want=None):
    """The changes that turn ``owned`` into what ``plan`` asks for, in the order to apply them.

    ``plan`` is a RoutingPlan (or None: remove everything ours); ``underlay`` comes from
    underlay_link() (needed when plan is not None). ``want`` may pass desired_state()'s result
    instead. Raises RoutingStateError when something not ours is in the way (nothing is changed)."""
    if want is None:
        want, unused = desired_state(plan, underlay, owned.ip_forward)
    _check_conflicts(want, owned)
    first, links, l2, routes, route_deletes, l2_deletes, last = [], [], [], [], [], [], []

    if want.ip_forward and owned.ip_forward is False:
        first.append(Change("sysctl", "set", "set net.ipv4.ip_forward = 1 (was 0)", {"path": PROC_IP_FORWARD}))

    have_vx, want_vx = owned.vxlan, want.vxlan
    fresh = False  # the device is (re)created: none of its old addresses, FDB, neighbours, routes remain
    if want_vx and not have_vx:
        fresh = True
        links.append(Change("link", "create", "create " + _vxlan_text(want_vx, False), dict(want_vx)))
    elif want_vx and have_vx:
        wrong = [k for k in _IDENTITY if have_vx.get(k) != want_vx[k]]
        if wrong:
            fresh = True
            what = ", ".join("%s %s -> %s" % (k, have_vx.get(k), want_vx[k]) for k in wrong)
            links.append(
                Change("link", "recreate", "recreate %s (%s)" % (_vxlan_text(want_vx, False), what), dict(want_vx))
            )
        elif have_vx["mtu"] != want_vx["mtu"]:
            links.append(
                Change(
                    "link",
                    "set",
                    "set %s mtu %s (was %s)" % (VXLAN_DEVICE, want_vx["mtu"], have_vx["mtu"]),
                    {"mtu": want_vx["mtu"]},
                )
            )
    if want_vx:
        have_addrs = [] if fresh else have_vx["addresses"]
        for a in want_vx["addresses"]:
            if a not in have_addrs:
                links.append(Change("address", "add", "add address %s dev %s" % (a, VXLAN_DEVICE), {"address": a}))
        for a in have_addrs:
            if a not in want_vx["addresses"]:
                links.append(
                    Change("address", "delete", "delete address %s dev %s" % (a, VXLAN_DEVICE), {"address": a})
                )
        if fresh or not have_vx["up"]:
            links.append(Change("link", "set", "set %s up" % VXLAN_DEVICE, {"up": True}))

        have_fdb = set() if fresh else set(owned.fdb)
        want_fdb = set(want.fdb)
        want_macs = {m for m, unused in want_fdb}
        for mac, dst in sorted(have_fdb - want_fdb):
            change = Change("fdb", "delete", "delete fdb %s dst %s dev %s" % (mac, dst, VXLAN_DEVICE), _fdb(mac, dst))
            # a wrong destination for a wanted MAC goes before the right one is added, a peer gone after routes
            (l2 if mac in want_macs else l2_deletes).append(change)
        for mac, dst in sorted(want_fdb - have_fdb):
            l2.append(
                Change(
                    "fdb",
                    "append",
                    "append fdb %s dst %s dev %s self permanent" % (mac, dst, VXLAN_DEVICE),
                    _fdb(mac, dst),
                )
            )
        have_neigh = {} if fresh else dict(owned.neighbours)
        want_neigh = dict(want.neighbours)
        for ip, mac in sorted(want_neigh.items(), key=_neigh_sort):
            if have_neigh.get(ip) != mac:
                verb = "replace" if ip in have_neigh else "add"
                l2.append(
                    Change(
                        "neighbour",
                        "replace",
                        "%s neighbour %s lladdr %s dev %s nud permanent" % (verb, ip, mac, VXLAN_DEVICE),
                        {"ip": ip, "mac": mac},
                    )
                )
        for ip, mac in sorted(have_neigh.items(), key=_neigh_sort):
            if ip not in want_neigh:
                l2_deletes.append(
                    Change(
                        "neighbour",
                        "delete",
                        "delete neighbour %s lladdr %s dev %s" % (ip, mac, VXLAN_DEVICE),
                        {"ip": ip, "mac": mac},
                    )
                )

    # routes: on a (re)created device the old routes through it are gone
    have_routes = [r for r in owned.routes if not (fresh and have_vx and r.dev == VXLAN_DEVICE)]
    by_key = {r.key: r for r in have_routes}
    want_keys = set()
    for r in sorted(want.routes, key=_route_sort):
        want_keys.add(r.key)
        old = by_key.get(r.key)
        if old == r:
            continue
        if old is None:
            text = "add " + r.text()
        else:
            text = "replace %s (was %s)" % (r.text(), old.text()[len("route %s " % old.dst) :])
        routes.append(Change("route", "replace", text, {"route": r}))
    for r in sorted(have_routes, key=_route_sort):
        if r.key not in want_keys:
            route_deletes.append(Change("route", "delete", "delete " + r.text(), {"route": r}))

    if have_vx and not want_vx:
        last.append(
            Change(
                "link",
                "delete",
                "delete link %s (with its %d FDB entries and %d neighbours)"
                % (VXLAN_DEVICE, len(owned.fdb), len(owned.neighbours)),
            )
        )
    return first + links + l2 + routes + route_deletes + l2_deletes + last


def _fdb(mac, dst):
    return {"mac": mac, "dst": dst}


# --- applying ------------------------------------------------------------------------------------


def _index(ipr, name):
    found = ipr.link_lookup(ifname=name)
    if not found:
        raise RoutingStateError("device %s is missing" % name)
    return found[0]


def _create_vxlan(ipr, v):
    ipr.link(
        "add",
        ifname=VXLAN_DEVICE,
        kind="vxlan",
        vxlan_id=v["vni"],
        vxlan_port=v["port"],
        vxlan_local=v["local"],
        vxlan_link=_index(ipr, v["link"]),
        vxlan_learning=0,
        address=v["mac"],
        mtu=v["mtu"],
    )


def _apply_one(ipr, change, ip_forward_path):
    kind, action, args = change.kind, change.action, change.args
    if kind == "sysctl":
        with open(ip_forward_path, "w", encoding="ascii") as f:
            f.write("1\n")
    elif kind == "link":
        if action == "create":
            _create_vxlan(ipr, args)
        elif action == "recreate":
            ipr.link("del", index=_index(ipr, VXLAN_DEVICE))
            _create_vxlan(ipr, args)
        elif action == "delete":
            ipr.link("del", index=_index(ipr, VXLAN_DEVICE))
        elif "mtu" in args:
            ipr.link("set", index=_index(ipr, VXLAN_DEVICE), mtu=args["mtu"])
        else:
            ipr.link("set", index=_index(ipr, VXLAN_DEVICE), state="up")
    elif kind == "address":
        address, prefixlen = args["address"].split("/")
        op = "add" if action == "add" else "del"
        ipr.addr(op, index=_index(ipr, VXLAN_DEVICE), address=address, prefixlen=int(prefixlen))
    elif kind == "fdb":
        op = "append" if action == "append" else "del"
        ipr.fdb(op, ifindex=_index(ipr, VXLAN_DEVICE), lladdr=args["mac"], dst=args["dst"])
    elif kind == "neighbour":
        index = _index(ipr, VXLAN_DEVICE)
        if action == "replace":
            ipr.neigh("replace", dst=args["ip"], lladdr=args["mac"], ifindex=index, state=NUD_PERMANENT)
        else:
            ipr.neigh("del", dst=args["ip"], lladdr=args["mac"], ifindex=index)
    elif kind == "route":
        r = args["route"]
        net = ipaddress.ip_network(r.dst)
        spec = dict(
            dst=str(net.network_address),
            dst_len=net.prefixlen,
            family=socket.AF_INET if r.family == 4 else socket.AF_INET6,
            table=MAIN_TABLE,
            proto=ROUTE_PROTOCOL,
            priority=r.priority,
            tos=r.tos,
        )
        if r.via:
            spec["gateway"] = r.via
        if action == "replace":
            spec["oif"] = _index(ipr, r.dev)
            spec["flags"] = RTNH_F_ONLINK if r.onlink else 0
        ipr.route("replace" if action == "replace" else "del", **spec)
    else:  # pragma: no cover - diff() makes no other kinds
        raise RoutingStateError("unknown change %r" % change)


def apply(ipr, changes, ip_forward_path=PROC_IP_FORWARD):
    """Apply ``changes`` (from diff()) in order; a kernel refusal raises RoutingStateError naming the
    change and how many were applied before it."""
    for done, change in enumerate(changes):
        try:
            _apply_one(ipr, change, ip_forward_path)
        except (NetlinkError, OSError) as exc:
            raise RoutingStateError(
                "%s: %s (the %d changes before it were applied)" % (change.text, _error_text(exc), done)
            ) from None


def _error_text(exc):
    code = exc.args[0] if exc.args else None
    if isinstance(code, int) and len(exc.args) > 1:
        return "%s (errno %d)" % (exc.args[1], code)
    return str(exc)


# --- everything at once ---------------------------------------------------------------------------


def _projected(want, owned):
    """What read_owned() will show once the changes are applied."""
    return replace(want, foreign_routes=owned.foreign_routes, foreign_vxlan=owned.foreign_vxlan)


def _check_node(node):
    try:
        ip = ipaddress.ip_address(node["ip"])
    except ValueError:
        raise RoutingPlanError(["node %s: ip %r is not an IP address" % (node.get("name"), node["ip"])]) from None
    if ip.version != 4:
        raise RoutingPlanError(["node %s: ip %s is IPv6; the underlay must be IPv4" % (node.get("name"), ip)])


def _all_pod_cidrs(node, peers, mesh_pod_cidrs):
    cidrs = list(mesh_pod_cidrs or ())
    for item in [node, *peers]:
        cidrs += [c for c in item["pod_cidrs"] if c not in cidrs]
    return cidrs


def reconcile(
    node,
    peers,
    mode,
    external_router=False,
    masquerade=True,
    mesh_pod_cidrs=(),
    check=False,
    state="present",
    underlay_interface=None,
    ip_forward_path=PROC_IP_FORWARD,
    nft=None,
):
    """Make this network namespace route pods as ``mode`` asks, with masquerade, or remove it all.

    ``node`` {name, ip, pod_cidrs} and ``peers`` [{name, cluster, ip, pod_cidrs}] are the shape of
    routing_plan.routing_inputs(); ``mesh_pod_cidrs`` are the pod CIDRs never masqueraded (the
    pod CIDRs of node and peers are always added). ``state="absent"`` removes cm_vxlan, every
    protocol-203 route and our nft table (``node``/``peers``/``mode`` are then not checked).
    With ``check`` nothing is applied.

    Everything is validated and computed before the first change; errors raise RoutingPlanError
    (bad input), RoutingStateError (the node) or masquerade.MasqueradeError (nft).

    Returns {changed, changes (texts, in order), plan (RoutingPlan.to_dict() or None),
    peer_modes, underlay ({ifname, index, prefixlen, mtu} or None), pod_mtu, masquerade
    ({enabled, changes, table}), before, after (text of our state), warnings}.
    """
    if state not in STATES:
        raise RoutingPlanError(["state: %r is not one of %s" % (state, ", ".join(STATES))])
    if IPRoute is None:
        raise RoutingStateError("pyroute2 is not importable (%s); install requirements/node.txt" % IMPORT_ERROR)
    present = state == "present"
    plan = underlay = None
    warnings = []
    with IPRoute() as ipr:
        try:
            if present:
                _check_node(node)
                underlay = underlay_link(ipr, node["ip"], underlay_interface)
                plan = plan_routing(
                    node,
                    peers,
                    mode,
                    underlay["prefixlen"],
                    underlay_mtu=underlay["mtu"],
                    external_router=external_router,
                )
            owned = read_owned(ipr, ip_forward_path)
            want, warnings = desired_state(plan, underlay, owned.ip_forward)
            changes = diff(plan, owned, underlay, want=want)
            # masquerade is planned before anything is applied, too
            nat_desired, nat_warnings = None, []
            if present and masquerade:
                nat_desired, nat_warnings = masq.desired_table(
                    node["ip"], node["pod_cidrs"], _all_pod_cidrs(node, peers, mesh_pod_cidrs)
                )
            nat_live = None if nat_desired is None and not (nft or masq.find_nft()) else masq.read_live(nft=nft)
            nat_changes = masq.changes(nat_desired, nat_live)
        except (RoutingStateError, masq.MasqueradeError) as exc:
            raise type(exc)("%s; nothing was changed" % exc) from None
        if not check:
            apply(ipr, changes, ip_forward_path)
            if nat_changes:
                masq.apply(nat_desired, nft=nft)
    before = state_text(owned) + (masq.render(nat_live) if nat_live else "")
    after = state_text(_projected(want, owned)) + (masq.render(nat_desired) if nat_desired else "")
    return {
        "changed": bool(changes or nat_changes),
        "changes": [c.text for c in changes] + nat_changes,
        "plan": plan.to_dict() if isinstance(plan, RoutingPlan) else None,
        "peer_modes": dict(plan.peer_modes) if plan else {},
        "underlay": underlay,
        "pod_mtu": pod_mtu(mode, underlay["mtu"]) if underlay else None,
        "masquerade": {
            "enabled": bool(nat_desired),
            "changes": nat_changes,
            "table": masq.render(nat_desired) if nat_desired else "",
        },
        "before": before,
        "after": after,
        "warnings": warnings + nat_warnings,
    }
