"""Lab topology files: load, validate, normalise.

A topology names clusters (inventory metadata), L2 segments inside 198.18.0.0/15 and the hosts
on them. ``load_topology`` / ``parse_topology`` check the whole file and raise ``TopologyError``
listing every problem found, so that nothing is created from a bad file. The format is
documented in docs/lab.md.
"""

from __future__ import annotations

import hashlib
import ipaddress
import os
import re
from dataclasses import asdict, dataclass, field

import yaml

LAB_UNDERLAY = ipaddress.ip_network("198.18.0.0/15")
# A dummy network inside the router namespace, for masquerade tests ("the outside world").
OUTSIDE_NETWORK = ipaddress.ip_network("198.19.255.0/24")
OUTSIDE_ADDRESS = ipaddress.ip_address("198.19.255.1")
OUTSIDE_DEVICE = "outside0"

# First host number handed out by auto-assignment (.11, .12 ...); .1 is the router.
AUTO_FIRST_HOST = 11

MAX_HOST_NAME = 63  # a hostname label
MAX_SEGMENT_NAME = 12  # "br-" / "rt-" / "to-" + name must fit a 15-character device name
MAX_CLUSTER_NAME = 32
IFNAMSIZ = 15

HOST_NAME_RE = re.compile(r"^[a-z0-9]([a-z0-9-]*[a-z0-9])?$")
SEGMENT_NAME_RE = re.compile(r"^[a-z]([a-z0-9-]*[a-z0-9])?$")
CLUSTER_NAME_RE = re.compile(r"^[a-z][a-z0-9_]*$")

# Host names that would clash with the lab's own namespaces <prefix>-router / <prefix>-fabric.
RESERVED_HOST_NAMES = ("router", "fabric")
# Inventory groups tools/lab writes itself (plus Ansible's implicit ones).
RESERVED_GROUP_NAMES = ("all", "ungrouped", "lab", "clusters")

TOP_KEYS = ("clusters", "segments", "hosts")
CLUSTER_KEYS = ("id", "pod_cidr")
SEGMENT_KEYS = ("name", "cidr")
HOST_KEYS = ("name", "cluster", "segment", "address")

DEFAULT_TOPOLOGY = os.path.join(os.path.dirname(os.path.abspath(__file__)), "default-topology.yml")


class TopologyError(Exception):
    """A topology that cannot be built; ``problems`` lists every problem found."""

    def __init__(self, problems, source=None):
        self.problems = list(problems)
        self.source = source
        where = " in %s" % source if source else ""
        lines = ["invalid lab topology%s (%d problem%s):" % (where, len(self.problems), "s"[: len(self.problems) != 1])]
        lines += ["  - " + p for p in self.problems]
        super().__init__("\n".join(lines))


@dataclass
class Cluster:
    name: str
    id: int | None = None
    pod_cidr: str | None = None


@dataclass
class Segment:
    name: str
    cidr: str
    gateway: str  # the router's address on the segment (first address)
    prefixlen: int
    bridge: str  # bridge in the fabric namespace
    fabric_router_port: str  # fabric end of the router's leg
    router_device: str  # router end of the router's leg


@dataclass
class Host:
    name: str
    segment: str
    address: str
    prefixlen: int
    gateway: str
    cluster: str | None = None
    address_auto: bool = False
    fabric_port: str = ""  # fabric end of the host's veth (eth0 inside the host)


@dataclass
class Topology:
    clusters: list[Cluster] = field(default_factory=list)
    segments: list[Segment] = field(default_factory=list)
    hosts: list[Host] = field(default_factory=list)

    def host(self, name):
        for h in self.hosts:
            if h.name == name:
                return h
        return None

    def segment(self, name):
        for s in self.segments:
            if s.name == name:
                return s
        return None

    def cluster(self, name):
        for c in self.clusters:
            if c.name == name:
                return c
        return None

    def to_dict(self):
        return {
            "clusters": [asdict(c) for c in self.clusters],
            "segments": [asdict(s) for s in self.segments],
            "hosts": [asdict(h) for h in self.hosts],
            "outside": {"network": str(OUTSIDE_NETWORK), "address": str(OUTSIDE_ADDRESS), "device": OUTSIDE_DEVICE},
        }

    @classmethod
    def from_dict(cls, data):
        return cls(
            clusters=[Cluster(**c) for c in data.get("clusters", [])],
            segments=[Segment(**s) for s in data.get("segments", [])],
            hosts=[Host(**h) for h in data.get("hosts", [])],
        )


def host_fabric_port(host_name):
    """Name of the fabric end of a host's veth: ``h-<host>``, shortened with a hash when too long."""
    name = "h-" + host_name
    if len(name) <= IFNAMSIZ:
        return name
    digest = hashlib.sha256(host_name.encode()).hexdigest()[:5]
    return "h-%s%s" % (host_name[:8], digest)


class _UniqueKeyLoader(yaml.SafeLoader):
    """SafeLoader that refuses duplicate mapping keys instead of keeping the last one."""


def _construct_mapping(loader, node, deep=False):
    seen = {}
    for key_node, _value_node in node.value:
        key = loader.construct_object(key_node, deep=deep)
        try:
            hash(key)
        except TypeError:
            continue  # let the default constructor report it
        if key in seen:
            raise yaml.constructor.ConstructorError(
                "while constructing a mapping",
                node.start_mark,
                "found duplicate key %r (first at line %d)" % (key, seen[key].start_mark.line + 1),
                key_node.start_mark,
            )
        seen[key] = key_node
    return loader.construct_mapping(node, deep=deep)


_UniqueKeyLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_mapping)


def load_topology(path=None):
    """Read and validate a topology file (the embedded default when path is None)."""
    path = path or DEFAULT_TOPOLOGY
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except OSError as e:
        raise TopologyError(["cannot read the file: %s" % e.strerror], source=path) from None
    return parse_topology_text(text, source=path)


def parse_topology_text(text, source=None):
    try:
        data = yaml.load(text, Loader=_UniqueKeyLoader)  # a SafeLoader subclass
    except yaml.YAMLError as e:
        raise TopologyError(["not valid YAML: %s" % str(e).replace("\n", " ")], source=source) from None
    return parse_topology(data, source=source)


def _is_int(value):
    return isinstance(value, int) and not isinstance(value, bool)


def _check_keys(problems, where, item, allowed):
    unknown = sorted(str(k) for k in item if k not in allowed)
    if unknown:
        problems.append("%s: unknown key %s (allowed: %s)" % (where, ", ".join(unknown), ", ".join(allowed)))


def _network(value):
    """Parse a strict IPv4 network; return (network, None) or (None, reason)."""
    if not isinstance(value, str):
        return None, "must be a string like 198.18.1.0/24, got %r" % (value,)
    if "/" not in value:
        return None, "%r is not a CIDR (missing /prefix length)" % value
    try:
        net = ipaddress.ip_network(value, strict=False)
    except ValueError:
        return None, "%r is not a valid IPv4 CIDR" % value
    if net.version != 4:
        return None, "%r is not an IPv4 CIDR" % value
    if ipaddress.ip_interface(value).ip != net.network_address:
        return None, "%r has host bits set (the network is %s)" % (value, net)
    return net, None


def _check_clusters(raw, problems):
    clusters = []
    if raw is None:
        return clusters
    if not isinstance(raw, dict):
        problems.append("clusters: must be a mapping of cluster name to {id, pod_cidr}")
        return clusters
    ids = {}
    cidrs = []
    for name, spec in raw.items():
        where = "clusters.%s" % name
        ok = True
        if not isinstance(name, str) or not CLUSTER_NAME_RE.match(name):
            problems.append(
                "%s: invalid cluster name %r (lowercase letters, digits and _, starting with a letter; "
                "it becomes an inventory group)" % (where, name)
            )
            ok = False
        elif len(name) > MAX_CLUSTER_NAME:
            problems.append("%s: cluster name too long (%d > %d characters)" % (where, len(name), MAX_CLUSTER_NAME))
            ok = False
        elif name in RESERVED_GROUP_NAMES:
            problems.append(
                "%s: %r is reserved (inventory groups written by tools/lab: %s)"
                % (where, name, ", ".join(RESERVED_GROUP_NAMES))
            )
            ok = False
        if spec is None:
            spec = {}
        if not isinstance(spec, dict):
            problems.append("%s: must be a mapping {id, pod_cidr}" % where)
            clusters.append(Cluster(name=str(name)))
            continue
        _check_keys(problems, where, spec, CLUSTER_KEYS)
        cluster = Cluster(name=str(name))
        if "id" in spec:
            cid = spec["id"]
            if not _is_int(cid) or not 1 <= cid <= 255:
                problems.append("%s: id must be an integer 1..255, got %r" % (where, cid))
            elif cid in ids:
                problems.append("%s: id %d is already used by cluster %s" % (where, cid, ids[cid]))
            else:
                ids[cid] = name
                cluster.id = cid
        if "pod_cidr" in spec:
            net, why = _network(spec["pod_cidr"])
            if why:
                problems.append("%s: bad pod_cidr: %s" % (where, why))
            elif net.overlaps(LAB_UNDERLAY):
                problems.append("%s: pod_cidr %s overlaps the lab underlay %s" % (where, net, LAB_UNDERLAY))
            else:
                for other_name, other in cidrs:
                    if net.overlaps(other):
                        problems.append(
                            "%s: pod_cidr %s overlaps pod_cidr %s of cluster %s" % (where, net, other, other_name)
                        )
                cidrs.append((name, net))
                cluster.pod_cidr = str(net)
        if ok:
            clusters.append(cluster)
    return clusters


def _check_segments(raw, problems):
    segments = []
    nets = {}  # name -> network, only for valid segments
    if raw is None:
        problems.append("segments: missing (a list of {name, cidr} inside %s)" % LAB_UNDERLAY)
        return segments, nets
    if not isinstance(raw, list) or not raw:
        problems.append("segments: must be a non-empty list of {name, cidr}")
        return segments, nets
    names = set()
    for i, item in enumerate(raw):
        where = "segments[%d]" % i
        if not isinstance(item, dict):
            problems.append("%s: must be a mapping {name, cidr}" % where)
            continue
        name = item.get("name")
        if isinstance(name, str):
            where = "segments[%d] (%s)" % (i, name)
        _check_keys(problems, where, item, SEGMENT_KEYS)
        ok = True
        if not isinstance(name, str) or not name:
            problems.append("%s: name missing or not a string" % where)
            ok = False
        elif len(name) > MAX_SEGMENT_NAME:
            problems.append(
                "%s: segment name too long (%d > %d characters; it names network devices)"
                % (where, len(name), MAX_SEGMENT_NAME)
            )
            ok = False
        elif not SEGMENT_NAME_RE.match(name):
            problems.append(
                "%s: invalid segment name %r (lowercase letters, digits and -, starting with a letter)" % (where, name)
            )
            ok = False
        elif name in names:
            problems.append("%s: duplicate segment name %r" % (where, name))
            ok = False
        if isinstance(name, str):
            names.add(name)
        if "cidr" not in item:
            problems.append("%s: cidr missing" % where)
            continue
        net, why = _network(item["cidr"])
        if why:
            problems.append("%s: bad cidr: %s" % (where, why))
            continue
        if not net.subnet_of(LAB_UNDERLAY):
            problems.append("%s: cidr %s is outside the lab underlay %s" % (where, net, LAB_UNDERLAY))
            continue
        if net.prefixlen > 30:
            problems.append("%s: cidr %s is too small (at most /30: the router and one host)" % (where, net))
            continue
        if net.overlaps(OUTSIDE_NETWORK):
            problems.append(
                "%s: cidr %s overlaps %s, reserved for the router's outside test network"
                % (where, net, OUTSIDE_NETWORK)
            )
            continue
        clash = False
        for other_name, other in nets.items():
            if net.overlaps(other):
                problems.append("%s: cidr %s overlaps segment %s (%s)" % (where, net, other_name, other))
                clash = True
        if not ok or clash:
            continue
        nets[name] = net
        segments.append(
            Segment(
                name=name,
                cidr=str(net),
                gateway=str(net.network_address + 1),
                prefixlen=net.prefixlen,
                bridge="br-" + name,
                fabric_router_port="rt-" + name,
                router_device="to-" + name,
            )
        )
    return segments, nets


def parse_topology(data, source=None):
    """Validate a topology (already parsed YAML) and return a normalised ``Topology``."""
    problems = []
    if not isinstance(data, dict):
        raise TopologyError(["the file must be a mapping with keys %s" % ", ".join(TOP_KEYS)], source=source)
    _check_keys(problems, "top level", data, TOP_KEYS)
    clusters = _check_clusters(data.get("clusters"), problems)
    cluster_names = {c.name for c in clusters}
    declared_clusters = set(data["clusters"]) if isinstance(data.get("clusters"), dict) else set()
    segments, nets = _check_segments(data.get("segments"), problems)
    seg_by_name = {s.name: s for s in segments}
    bad_segments = set()
    if isinstance(data.get("segments"), list):
        bad_segments = {s.get("name") for s in data["segments"] if isinstance(s, dict)} - set(seg_by_name)

    raw_hosts = data.get("hosts")
    hosts = []
    if raw_hosts is None:
        problems.append("hosts: missing (a list of {name, segment, cluster, address})")
        raw_hosts = []
    elif not isinstance(raw_hosts, list) or not raw_hosts:
        problems.append("hosts: must be a non-empty list of {name, segment, cluster, address}")
        raw_hosts = []

    names = set()
    ports = {}
    used = {}  # address -> host name (explicit addresses)
    for i, item in enumerate(raw_hosts):
        where = "hosts[%d]" % i
        if not isinstance(item, dict):
            problems.append("%s: must be a mapping {name, segment, cluster, address}" % where)
            continue
        name = item.get("name")
        if isinstance(name, str):
            where = "hosts[%d] (%s)" % (i, name)
        _check_keys(problems, where, item, HOST_KEYS)
        ok = True
        if not isinstance(name, str) or not name:
            problems.append("%s: name missing or not a string" % where)
            ok = False
        elif len(name) > MAX_HOST_NAME:
            problems.append(
                "%s: host name too long (%d > %d characters, the limit of a hostname label)"
                % (where, len(name), MAX_HOST_NAME)
            )
            ok = False
        elif not HOST_NAME_RE.match(name):
            problems.append(
                "%s: %r is not a valid hostname (lowercase letters, digits and -, "
                "not starting or ending with -)" % (where, name)
            )
            ok = False
        elif name in RESERVED_HOST_NAMES:
            problems.append(
                "%s: host name %r is reserved (the lab's %s namespaces)"
                % (where, name, " and ".join(RESERVED_HOST_NAMES))
            )
            ok = False
        elif name in names:
            problems.append("%s: duplicate host name %r" % (where, name))
            ok = False
        if isinstance(name, str):
            names.add(name)
        if ok:
            port = host_fabric_port(name)
            if port in ports:
                problems.append(
                    "%s: host names %s and %s give the same device name %s; rename one"
                    % (where, ports[port], name, port)
                )
                ok = False
            ports[port] = name

        cluster = item.get("cluster")
        if cluster is not None:
            if not isinstance(cluster, str):
                problems.append("%s: cluster must be a string, got %r" % (where, cluster))
                ok = False
            elif cluster not in declared_clusters:
                known = ", ".join(sorted(declared_clusters)) or "none declared"
                problems.append("%s: unknown cluster %r (clusters: %s)" % (where, cluster, known))
                ok = False
            elif cluster not in cluster_names:
                ok = False  # the cluster itself is invalid, already reported

        seg_name = item.get("segment")
        segment = None
        if seg_name is None:
            problems.append("%s: segment missing" % where)
            ok = False
        elif seg_name in seg_by_name:
            segment = seg_by_name[seg_name]
        elif seg_name in bad_segments:
            ok = False  # reported with the segment
        else:
            known = ", ".join(seg_by_name) or "none valid"
            problems.append("%s: unknown segment %r (segments: %s)" % (where, seg_name, known))
            ok = False

        address = None
        if "address" in item:
            raw_addr = item["address"]
            try:
                if not isinstance(raw_addr, str) or "/" in raw_addr:
                    raise ValueError
                address = ipaddress.ip_address(raw_addr)
                if address.version != 4:
                    raise ValueError
            except ValueError:
                hint = (
                    " (give a plain address; the prefix length comes from the segment)" if "/" in str(raw_addr) else ""
                )
                problems.append("%s: bad address %r%s" % (where, raw_addr, hint))
                address = None
                ok = False
            if address is not None and segment is not None:
                net = nets[segment.name]
                if address not in net:
                    problems.append(
                        "%s: address %s is outside its segment %s (%s)" % (where, address, segment.name, net)
                    )
                    ok = False
                elif address in (net.network_address, net.broadcast_address):
                    problems.append(
                        "%s: address %s is the network or broadcast address of segment %s"
                        % (where, address, segment.name)
                    )
                    ok = False
                elif str(address) == segment.gateway:
                    problems.append(
                        "%s: address %s is the router's address on segment %s" % (where, address, segment.name)
                    )
                    ok = False
            if address is not None:
                if address in used:
                    problems.append("%s: address %s is already used by host %s" % (where, address, used[address]))
                    ok = False
                else:
                    used[address] = name
        if ok:
            hosts.append(
                Host(
                    name=name,
                    segment=segment.name,
                    address=str(address) if address is not None else "",
                    prefixlen=segment.prefixlen,
                    gateway=segment.gateway,
                    cluster=cluster,
                    address_auto=address is None,
                    fabric_port=host_fabric_port(name),
                )
            )

    # Auto-assign the remaining addresses: .11, .12 ... of each segment, skipping explicit ones.
    next_free = {}
    for host in hosts:
        if host.address:
            continue
        net = nets[host.segment]
        candidate = next_free.get(host.segment)
        if candidate is None:
            first = AUTO_FIRST_HOST if net.num_addresses > AUTO_FIRST_HOST + 1 else 2
            candidate = net.network_address + first
        while candidate in used and candidate in net:
            candidate += 1
        if candidate not in net or candidate == net.broadcast_address:
            problems.append(
                "hosts (%s): no free address left on segment %s (%s) to auto-assign; "
                "use a larger segment or give addresses" % (host.name, host.segment, net)
            )
            next_free[host.segment] = candidate
            continue
        used[candidate] = host.name
        host.address = str(candidate)
        next_free[host.segment] = candidate + 1

    if problems:
        raise TopologyError(problems, source=source)
    return Topology(clusters=clusters, segments=segments, hosts=hosts)
