# -*- coding: utf-8 -*-
# Copyright: clustermesh.core contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""Masquerade of pod traffic that leaves the mesh: the nftables table ``ip clustermesh``.

The table is ours alone; nothing else in the ruleset is read or changed. It holds two named
interval sets, one NAT rule, and raw-priority chains that keep pod-to-pod traffic out of
connection tracking::

    table ip clustermesh {
      set node_pod_cidrs { type ipv4_addr; flags interval; elements = { 10.1.0.0/24 } }
      set mesh_pod_cidrs { type ipv4_addr; flags interval; elements = { 10.1.0.0/16, 10.2.0.0/16 } }
      chain mesh_source {
        ip daddr 10.1.0.0/16 notrack comment "..."
        ip daddr 10.2.0.0/16 notrack comment "..."
      }
      chain raw_prerouting {
        type filter hook prerouting priority raw; policy accept;
        ip saddr 10.1.0.0/16 goto mesh_source
        ip saddr 10.2.0.0/16 goto mesh_source
        ip daddr 198.18.1.11 udp dport 8472 notrack comment "..."
      }
      chain raw_output {
        type filter hook output priority raw; policy accept;
        ip saddr 10.1.0.0/16 goto mesh_source
        ip saddr 10.2.0.0/16 goto mesh_source
        ip saddr 198.18.1.11 udp dport 8472 notrack comment "..."
      }
      chain postrouting {
        type nat hook postrouting priority srcnat; policy accept;
        ip saddr @node_pod_cidrs ip daddr != @mesh_pod_cidrs snat to 198.18.1.11 comment "..."
      }
    }

so traffic from this node's pods to anything outside every pod CIDR of the mesh leaves with the
node's underlay IP, and pod-to-pod traffic is never translated (the node's own and its peers' pod
CIDRs are always part of ``mesh_pod_cidrs``, whatever the caller passes).

Why the raw chains: the SNAT rule turns connection tracking on for the whole network namespace, so
every forwarded packet, pod-to-pod included, would be looked up and tracked although it is never
translated. Packets whose source and destination both lie in the mesh pod CIDRs are marked
``notrack`` before conntrack sees them (priority raw, in prerouting for forwarded and received
traffic and in output for the node's own, both directions alike since the match is symmetric), so
conntrack skips them and the NAT chain never sees them. The same holds for the VXLAN packets that
carry pod-to-pod traffic between nodes in tunnel and hybrid mode (UDP to the mesh's port 8472 sent
from or received at the node IP), which the NAT chain would otherwise track too. Traffic that is
masqueraded, its replies (addressed to the node IP) and anything else between a pod and a non-pod
address stay tracked.
The match is written as one prefix comparison per CIDR (a payload compare, no set lookup) while
there are at most ``MAX_PREFIX_RULES`` mesh CIDRs: measured with bench/datapath.py's tcp_rr,
two interval-set lookups per packet cost as much as the tracking they save (22.4 vs 22.5 us per
transaction), prefix compares almost nothing (21.7 us; 20.4 without the table); beyond that the
chains look the CIDRs up in ``mesh_pod_cidrs`` instead. A host firewall that accepts forwarded
pod traffic only as ``ct state established`` must accept ``ct state untracked`` too.

IPv4 only: IPv6 pod CIDRs are skipped with a warning (there is no ``ip6`` table).

The live table (``nft -j list table ip clustermesh``) is compared with the desired one as a
normalised model (sets with their elements, chains, rules without handles); when they differ the
whole table is replaced in one ``nft -f`` transaction (declare, delete, re-create), so the
ruleset never shows a half-written table. This file imports nothing from Ansible.
"""

from __future__ import annotations

import ipaddress
import json
import os
import shutil
import subprocess

from .routing_plan import VXLAN_PORT

FAMILY = "ip"
TABLE = "clustermesh"
CHAIN = "postrouting"
RAW_CHAINS = {"raw_prerouting": "prerouting", "raw_output": "output"}  # chain -> hook
MESH_SOURCE_CHAIN = "mesh_source"
NODE_SET = "node_pod_cidrs"
MESH_SET = "mesh_pod_cidrs"
RULE_COMMENT = "clustermesh: SNAT pod traffic leaving the mesh to the node IP"
NOTRACK_COMMENT = "clustermesh: pod-to-pod traffic is never NATed, so not tracked"
TUNNEL_NOTRACK_COMMENT = "clustermesh: VXLAN between nodes carries pod-to-pod traffic, not tracked"
MAX_PREFIX_RULES = 8  # more mesh CIDRs than this: the raw chains use set lookups instead of prefix compares
NFT_TIMEOUT = 15.0
SBIN_DIRS = ("/usr/local/sbin", "/usr/sbin", "/sbin", "/usr/local/bin", "/usr/bin", "/bin")
SRCNAT_PRIORITY = 100
RAW_PRIORITY = -300


class MasqueradeError(RuntimeError):
    """The nft binary is missing or refused a command; the message says which and why."""


def _v4_networks(cidrs, what, warnings):
    nets = []
    for cidr in cidrs:
        try:
            net = ipaddress.ip_network(cidr)
        except ValueError as exc:
            raise MasqueradeError("%s: %r is not a CIDR (%s)" % (what, cidr, exc)) from None
        if net.version != 4:
            warnings.append("masquerade: %s %s skipped (IPv4 only: no ip6 masquerade table is managed)" % (what, net))
            continue
        nets.append(net)
    return nets


def desired_table(node_ip, node_pod_cidrs, mesh_pod_cidrs=(), notrack=True, tunnel_port=VXLAN_PORT):
    """The normalised model of the table we want, and warnings (skipped IPv6 CIDRs).

    ``mesh_pod_cidrs`` is completed with ``node_pod_cidrs`` (pod-to-pod is never translated);
    overlapping CIDRs are merged. With ``notrack`` (the default) pod-to-pod traffic is kept out of
    connection tracking by the raw chains, and so is UDP to ``tunnel_port`` (the VXLAN port; None:
    no such rule) sent from or received at the node IP. Raises MasqueradeError for a non-IPv4 node IP
    or bad CIDRs; returns (None, warnings) when the node has no IPv4 pod CIDR (nothing to masquerade).
    """
    warnings = []
    try:
        address = ipaddress.ip_address(node_ip)
    except ValueError:
        raise MasqueradeError("node ip: %r is not an IP address" % (node_ip,)) from None
    if address.version != 4:
        raise MasqueradeError("node ip: %s is IPv6; masquerade supports an IPv4 node IP only" % address)
    own = _v4_networks(node_pod_cidrs, "node pod CIDR", warnings)
    mesh = _v4_networks(list(mesh_pod_cidrs), "mesh pod CIDR", warnings)
    if not own:
        warnings.append("masquerade: the node has no IPv4 pod CIDR; nothing to masquerade")
        return None, warnings
    mesh_set = _set_model(mesh + own)
    model = {
        "sets": {NODE_SET: _set_model(own), MESH_SET: mesh_set},
        "chains": {},
        "rules": {},
        "other": [],
    }
    if notrack:
        nets = [ipaddress.ip_network(e) for e in mesh_set["elements"]]
        model["chains"][MESH_SOURCE_CHAIN] = {"type": None, "hook": None, "prio": None, "policy": None}
        model["rules"][MESH_SOURCE_CHAIN] = [
            _rule_key([_match("daddr", right), {"notrack": None}], NOTRACK_COMMENT) for right in _rights(nets)
        ]
        for chain, hook in RAW_CHAINS.items():
            model["chains"][chain] = {"type": "filter", "hook": hook, "prio": RAW_PRIORITY, "policy": "accept"}
            model["rules"][chain] = [
                _rule_key([_match("saddr", right), {"goto": {"target": MESH_SOURCE_CHAIN}}], None)
                for right in _rights(nets)
            ]
            if tunnel_port is not None:
                node_field = "daddr" if hook == "prerouting" else "saddr"  # received at / sent from the node
                expr = [_match(node_field, str(address)), _match("dport", tunnel_port, protocol="udp")]
                model["rules"][chain].append(_rule_key(expr + [{"notrack": None}], TUNNEL_NOTRACK_COMMENT))
    model["chains"][CHAIN] = {"type": "nat", "hook": "postrouting", "prio": SRCNAT_PRIORITY, "policy": "accept"}
    model["rules"][CHAIN] = [_rule_key(_snat_expr(str(address)), RULE_COMMENT)]
    return model, warnings


def _rights(nets):
    """The right-hand sides that match the mesh CIDRs: one prefix per CIDR (nft -j spells a /32 as a
    plain address), or the set when there are more than MAX_PREFIX_RULES."""
    if len(nets) > MAX_PREFIX_RULES:
        return ["@" + MESH_SET]
    return [_prefix(n) for n in nets]


def _prefix(net):
    if net.prefixlen == net.max_prefixlen:
        return str(net.network_address)
    return {"prefix": {"addr": str(net.network_address), "len": net.prefixlen}}


def _match(field, right, op="==", protocol="ip"):
    return {"match": {"op": op, "left": {"payload": {"protocol": protocol, "field": field}}, "right": right}}


def _set_model(nets):
    return {
        "type": "ipv4_addr",
        "flags": ["interval"],
        "elements": [str(n) for n in ipaddress.collapse_addresses(nets)],
    }


def _snat_expr(address):
    return [
        _match("saddr", "@" + NODE_SET),
        _match("daddr", "@" + MESH_SET, op="!="),
        {"snat": {"addr": address}},
    ]


def _rule_key(expr, comment):
    return json.dumps({"expr": expr, "comment": comment}, sort_keys=True)


def _elements(elem):
    """Set elements of ``nft -j`` output as CIDR strings (prefixes, single addresses, ranges)."""
    nets = []
    for item in elem or []:
        if isinstance(item, dict) and "elem" in item:  # element with options (timeout, comment, ...)
            item = item["elem"].get("val")
        if isinstance(item, str):
            nets.append(ipaddress.ip_network(item))
        elif isinstance(item, dict) and "prefix" in item:
            nets.append(ipaddress.ip_network("%s/%s" % (item["prefix"]["addr"], item["prefix"]["len"])))
        elif isinstance(item, dict) and "range" in item:
            low, high = (ipaddress.ip_address(a) for a in item["range"])
            nets.extend(ipaddress.summarize_address_range(low, high))
        else:
            return ["unparsed:" + json.dumps(item, sort_keys=True)]
    return [str(n) for n in ipaddress.collapse_addresses(nets)]


def normalize(document):
    """The normalised model of ``nft -j list table ip clustermesh`` output (a parsed JSON document)."""
    model = {"sets": {}, "chains": {}, "rules": {}, "other": []}
    for item in document.get("nftables", []):
        ((kind, body),) = item.items()
        if kind in ("metainfo", "table"):
            continue
        if kind == "set":
            flags = body.get("flags", [])
            model["sets"][body["name"]] = {
                "type": body.get("type"),
                "flags": sorted(flags if isinstance(flags, list) else [flags]),
                "elements": _elements(body.get("elem")),
            }
        elif kind == "chain":
            model["chains"][body["name"]] = {key: body.get(key) for key in ("type", "hook", "prio", "policy")}
        elif kind == "rule":
            model["rules"].setdefault(body["chain"], []).append(_rule_key(body.get("expr"), body.get("comment")))
        else:
            model["other"].append(kind + ":" + body.get("name", "?"))
    return model


def render(model):
    """The nft text of a desired model (the table's body as ``nft list`` would show it)."""
    lines = ["table %s %s {" % (FAMILY, TABLE)]
    for name, s in model["sets"].items():
        lines += [
            "  set %s {" % name,
            "    type %s" % s["type"],
            "    flags %s" % ", ".join(s["flags"]),
            "    elements = { %s }" % ", ".join(s["elements"]),
            "  }",
        ]
    for name, c in model["chains"].items():
        lines.append("  chain %s {" % name)
        if c["hook"] is not None:  # a base chain (a regular one is only jumped to)
            lines.append("    type %s hook %s priority %d; policy %s;" % (c["type"], c["hook"], c["prio"], c["policy"]))
        for key in model["rules"].get(name, []):
            lines.append("    " + _rule_text(key))
        lines.append("  }")
    lines += ["  # also: %s" % other for other in model.get("other", [])]
    lines.append("}")
    return "\n".join(lines) + "\n"


def _rule_text(key):
    rule = json.loads(key)
    expr = rule["expr"]
    parts = []
    for e in expr:
        if "match" in e:
            m = e["match"]
            field = "%(protocol)s %(field)s" % m["left"]["payload"]
            op = "" if m["op"] == "==" else m["op"] + " "
            right = m["right"]
            if isinstance(right, dict) and "prefix" in right:
                right = "%s/%s" % (right["prefix"]["addr"], right["prefix"]["len"])
            parts.append("%s %s%s" % (field, op, right))
        elif "snat" in e:
            parts.append("snat to %s" % e["snat"]["addr"])
        elif "goto" in e:
            parts.append("goto %s" % e["goto"]["target"])
        elif "notrack" in e:
            parts.append("notrack")
        else:
            parts.append(json.dumps(e, sort_keys=True))
    if rule.get("comment"):
        parts.append('comment "%s"' % rule["comment"])
    return " ".join(parts)


def script(model):
    """The ``nft -f`` input that replaces our table atomically (or removes it when model is None)."""
    head = "table %s %s\ndelete table %s %s\n" % (FAMILY, TABLE, FAMILY, TABLE)
    return head if model is None else head + render(model)


def find_nft():
    path = os.environ.get("PATH", "")
    return shutil.which("nft", path=os.pathsep.join([path, *SBIN_DIRS]))


def _nft(args, stdin=None, nft=None):
    binary = nft or find_nft()
    if not binary:
        raise MasqueradeError("the nft binary is not installed (Debian package nftables); it is needed for masquerade")
    try:
        proc = subprocess.run(
            [binary, *args], input=stdin, capture_output=True, text=True, timeout=NFT_TIMEOUT, check=False
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise MasqueradeError("nft %s: %s" % (" ".join(args), exc)) from None
    return proc


def read_live(nft=None):
    """The normalised model of the live table, or None when it does not exist."""
    proc = _nft(["-j", "list", "tables", FAMILY], nft=nft)
    if proc.returncode != 0:
        raise MasqueradeError("nft -j list tables %s failed: %s" % (FAMILY, proc.stderr.strip()))
    tables = [i["table"]["name"] for i in json.loads(proc.stdout or "{}").get("nftables", []) if "table" in i]
    if TABLE not in tables:
        return None
    proc = _nft(["-j", "list", "table", FAMILY, TABLE], nft=nft)
    if proc.returncode != 0:
        raise MasqueradeError("nft -j list table %s %s failed: %s" % (FAMILY, TABLE, proc.stderr.strip()))
    return normalize(json.loads(proc.stdout))


def changes(desired, live):
    """Human readable changes from the live model to the desired one ([] when equal)."""
    if desired == live:
        return []
    if desired is None:
        return ["delete nft table %s %s" % (FAMILY, TABLE)]
    if live is None:
        return ["create nft table %s %s: SNAT %s to %s unless destined to %s" % _summary(desired)]
    return ["replace nft table %s %s: SNAT %s to %s unless destined to %s" % _summary(desired)]


def _summary(model):
    snat = json.loads(model["rules"][CHAIN][0])["expr"][-1]["snat"]["addr"]
    return (
        FAMILY,
        TABLE,
        ", ".join(model["sets"][NODE_SET]["elements"]),
        snat,
        ", ".join(model["sets"][MESH_SET]["elements"]),
    )


def apply(desired, nft=None):
    """Replace (or with None remove) our table in one nft transaction."""
    proc = _nft(["-f", "-"], stdin=script(desired), nft=nft)
    if proc.returncode != 0:
        raise MasqueradeError("nft -f (table %s %s) failed: %s" % (FAMILY, TABLE, proc.stderr.strip()))


def reconcile_masquerade(
    node_ip,
    node_pod_cidrs,
    mesh_pod_cidrs=(),
    enabled=True,
    check=False,
    nft=None,
    notrack=True,
    tunnel_port=VXLAN_PORT,
):
    """Make the table match ``enabled`` (removed when False); ``notrack``: see desired_table.

    Returns {changed, changes, before, after, warnings}; ``before``/``after`` are nft text ("" for no
    table). With ``check`` nothing is applied. Errors (no nft binary while a table is wanted, nft
    refusing the ruleset) raise MasqueradeError.
    """
    warnings = []
    desired = None
    if enabled:
        desired, warnings = desired_table(
            node_ip, node_pod_cidrs, mesh_pod_cidrs, notrack=notrack, tunnel_port=tunnel_port
        )
    # without nft (and no table wanted) there is no table of ours to remove
    live = None if desired is None and not (nft or find_nft()) else read_live(nft=nft)
    todo = changes(desired, live)
    if todo and not check:
        apply(desired, nft=nft)
    before = render(live) if live is not None else ""
    after = render(desired) if desired is not None else ""
    return {"changed": bool(todo), "changes": todo, "before": before, "after": after, "warnings": warnings}
