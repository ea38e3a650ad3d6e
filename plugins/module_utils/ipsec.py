# -*- coding: utf-8 -*-
# Copyright: clustermesh.core contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""IPsec between nodes: keys, SPIs, the XFRM states and policies of one node, and the ordered changes
that move the kernel from what it holds to that plan (no kernel access here; ``xfrm.py`` applies).

Keys use Cilium's key lines (one per line of the key file):

* ``<id>[+] rfc4106(gcm(aes)) <hex AES key + 4-byte salt> <ICV bits>``
* ``<id>[+] hmac(sha256) <hex auth key> cbc(aes) <hex cipher key>``

``+`` derives a key per ordered node pair from the shared key. Key IDs are 1..15 and wrap 15 -> 1.
Key bytes never appear in a ``repr``, an error message or a ``describe()`` line.

Per node N and peer P (docs: the issue 7 interface, ADR 011): ESP tunnel-mode states N->P and P->N for
every key of the key file (SPI = key id << 28 | low 24 bits of the sender's IP, reqid ``REQID``), and
policies at ``PRIORITY_ENCRYPT`` (out encrypt / out allow / in / fwd) or ``PRIORITY_BLOCK`` (catch-all
blocks that keep pod traffic from leaving in plain text while the encrypt policies change). Only states
with reqid ``REQID`` and policies with one of those two priorities are ours; nothing else is touched.
"""

from __future__ import annotations

import hashlib
import ipaddress
import os
import re
from dataclasses import dataclass, field

from .routing_plan import VXLAN_PORT
from .xfrm import IPPROTO_UDP, Algorithm, Selector, Template, XfrmPolicy, XfrmState

REQID = 0x636D  # "cm": the reqid of every state and template we own
PRIORITY_ENCRYPT = 0x636D0  # out encrypt, out allow, in, fwd
PRIORITY_BLOCK = 0x636D8  # catch-all blocks: a larger number is a lower precedence in XFRM

AEAD_ALGORITHM = "rfc4106(gcm(aes))"
AUTH_ALGORITHM = "hmac(sha256)"
CIPHER_ALGORITHM = "cbc(aes)"
AES_KEY_LENGTHS = (16, 24, 32)
GCM_SALT_LENGTH = 4
GCM_ICV_BITS = (64, 96, 128)
AUTH_KEY_LENGTH = 32
AUTH_TRUNC_BITS = 128
MIN_KEY_ID = 1
MAX_KEY_ID = 15
MAX_KEYS = 2  # the current key and, during a rotation, the next one

# Bytes of ESP tunnel-mode overhead per packet, BEFORE the ICV / HMAC truncation (mtu_overhead() adds it):
# outer IPv4 20 + ESP header 8 + IV + ESP trailer 2 + worst-case padding.
IPSEC_OVERHEAD = {
    AEAD_ALGORITHM: 20 + 8 + 8 + 2 + 3,  # 8-byte IV, payload aligned to 4 bytes
    CIPHER_ALGORITHM: 20 + 8 + 16 + 2 + 15,  # 16-byte IV, payload aligned to the 16-byte AES block
}
# The pod MTU reserve that fits every supported key (the worst case: cbc(aes) + hmac(sha256)), so that a
# rotation to another algorithm never needs a new pod MTU.
MTU_RESERVE = max(IPSEC_OVERHEAD[AEAD_ALGORITHM] + max(GCM_ICV_BITS) // 8, IPSEC_OVERHEAD[CIPHER_ALGORITHM] + 16)

MODES = ("direct", "tunnel", "external")

ROTATE_HINT = "rotate with playbooks/rotate_ipsec_key.yml"

_ID_RE = re.compile(r"^([0-9]{1,2})(\+?)$")
_HEX_RE = re.compile(r"^[0-9a-fA-F]*$")
_FORMATS = "expected '<id>[+] %s <hex key> <ICV bits>' or '<id>[+] %s <hex key> %s <hex key>'" % (
    AEAD_ALGORITHM,
    AUTH_ALGORITHM,
    CIPHER_ALGORITHM,
)


class IpsecKeyError(ValueError):
    """A key line or key file that cannot be used. The message names the line number, the field and
    what is expected; it never contains key material (nor any other token of the line)."""


class IpsecPlanError(ValueError):
    """Input the plan cannot be made from; ``problems`` lists every one, each naming the node, peer or field."""

    def __init__(self, problems):
        self.problems = list(problems)
        super().__init__("; ".join(self.problems))


# --------------------------------------------------------------------------------------------- keys


@dataclass(frozen=True)
class IpsecKey:
    """One key of the key file: ``aead`` (rfc4106(gcm(aes))) or ``auth`` + ``crypt`` (hmac(sha256) +
    cbc(aes)). ``per_node`` is the ``+`` flag: derive a key per node pair. The repr shows no key bytes."""

    key_id: int
    per_node: bool = False
    aead: Algorithm | None = None
    auth: Algorithm | None = None
    crypt: Algorithm | None = None

    @property
    def algorithm(self):
        """The algorithm as the key line names it (``rfc4106(gcm(aes))`` or ``hmac(sha256)+cbc(aes)``)."""
        if self.aead is not None:
            return self.aead.name
        return "%s+%s" % (self.auth.name, self.crypt.name)

    def __repr__(self):
        bits = ", icv=%d" % self.aead.bits if self.aead is not None else ""
        return "IpsecKey(key_id=%d, per_node=%s, algorithm=%r%s)" % (self.key_id, self.per_node, self.algorithm, bits)

    __str__ = __repr__


def _key_error(lineno, what):
    return IpsecKeyError("key line %d: %s" % (lineno, what))


def _parse_hex(token, lineno, field_name, expected_lengths, expected_text):
    text = token[2:] if token[:2].lower() == "0x" else token
    if not text or not _HEX_RE.match(text) or len(text) % 2:
        raise _key_error(
            lineno, "%s: expected %s as hexadecimal digits (optional 0x prefix)" % (field_name, expected_text)
        )
    raw = bytes.fromhex(text)
    if len(raw) not in expected_lengths:
        raise _key_error(
            lineno, "%s: expected %s, got %d hex digits (%d bytes)" % (field_name, expected_text, len(text), len(raw))
        )
    return raw


def parse_key_line(line, lineno=1):
    """Parse one key line (see the module docstring) into an IpsecKey. ``lineno`` is used in errors."""
    fields = line.split()
    if len(fields) not in (4, 5):
        raise _key_error(lineno, "%d fields: %s" % (len(fields), _FORMATS))
    match = _ID_RE.match(fields[0])
    if not match or not MIN_KEY_ID <= int(match.group(1)) <= MAX_KEY_ID:
        expected = "key ID: expected a number %d..%d, optionally followed by '+' (per node pair keys)"
        raise _key_error(lineno, expected % (MIN_KEY_ID, MAX_KEY_ID))
    key_id, per_node = int(match.group(1)), bool(match.group(2))
    if len(fields) == 4:
        if fields[1] != AEAD_ALGORITHM:
            raise _key_error(lineno, "algorithm: a 4-field line must name %s; %s" % (AEAD_ALGORITHM, _FORMATS))
        lengths = tuple(n + GCM_SALT_LENGTH for n in AES_KEY_LENGTHS)
        raw = _parse_hex(
            fields[2],
            lineno,
            "%s key" % AEAD_ALGORITHM,
            lengths,
            "%s bytes (an AES-128/192/256 key and a 4-byte salt: %s hex digits)"
            % ("/".join(map(str, lengths)), "/".join(str(2 * n) for n in lengths)),
        )
        if fields[3] not in {str(b) for b in GCM_ICV_BITS}:
            raise _key_error(lineno, "ICV bits: expected one of %s" % ", ".join(map(str, GCM_ICV_BITS)))
        return IpsecKey(key_id, per_node, aead=Algorithm(AEAD_ALGORITHM, raw, int(fields[3])))
    if fields[1] != AUTH_ALGORITHM or fields[3] != CIPHER_ALGORITHM:
        raise _key_error(
            lineno,
            "algorithm: a 5-field line must name %s then %s; %s" % (AUTH_ALGORITHM, CIPHER_ALGORITHM, _FORMATS),
        )
    auth = _parse_hex(
        fields[2],
        lineno,
        "%s key" % AUTH_ALGORITHM,
        (AUTH_KEY_LENGTH,),
        "%d bytes (%d hex digits)" % (AUTH_KEY_LENGTH, 2 * AUTH_KEY_LENGTH),
    )
    crypt = _parse_hex(
        fields[4],
        lineno,
        "%s key" % CIPHER_ALGORITHM,
        AES_KEY_LENGTHS,
        "%s bytes (AES-128/192/256: %s hex digits)"
        % ("/".join(map(str, AES_KEY_LENGTHS)), "/".join(str(2 * n) for n in AES_KEY_LENGTHS)),
    )
    return IpsecKey(
        key_id,
        per_node,
        auth=Algorithm(AUTH_ALGORITHM, auth, AUTH_TRUNC_BITS),
        crypt=Algorithm(CIPHER_ALGORITHM, crypt, 0),
    )


def parse_key_file(text):
    """The keys of a key file: one key line per non-empty line not starting with ``#``; at most
    ``MAX_KEYS`` keys with distinct IDs, and at least one."""
    keys = []
    seen = {}
    for lineno, line in enumerate(text.splitlines(), start=1):
        stripped = line.strip()
        if not stripped or stripped.startswith("#"):
            continue
        key = parse_key_line(stripped, lineno)
        if key.key_id in seen:
            raise _key_error(
                lineno,
                "key ID: %d is also the ID of line %d; every key needs its own ID" % (key.key_id, seen[key.key_id]),
            )
        seen[key.key_id] = lineno
        keys.append(key)
        if len(keys) > MAX_KEYS:
            raise _key_error(
                lineno,
                "at most %d keys (the current key and, during a rotation, the next one); this is key %d"
                % (MAX_KEYS, len(keys)),
            )
    if not keys:
        raise IpsecKeyError("key file: no key line; %s" % _FORMATS)
    return keys


def next_key_id(key_id):
    """The key ID after ``key_id``: 1..15, wrapping 15 -> 1."""
    if not isinstance(key_id, int) or not MIN_KEY_ID <= key_id <= MAX_KEY_ID:
        raise ValueError("key ID must be %d..%d" % (MIN_KEY_ID, MAX_KEY_ID))
    return key_id % MAX_KEY_ID + 1


def generate_next_key(key, random_bytes=os.urandom):
    """A fresh key for the rotation after ``key``: the next ID, the same algorithm, key lengths, ICV and
    ``+`` flag, new random bytes."""
    if key.aead is not None:
        aead = Algorithm(key.aead.name, random_bytes(len(key.aead.key)), key.aead.bits)
        return IpsecKey(next_key_id(key.key_id), key.per_node, aead=aead)
    return IpsecKey(
        next_key_id(key.key_id),
        key.per_node,
        auth=Algorithm(key.auth.name, random_bytes(len(key.auth.key)), key.auth.bits),
        crypt=Algorithm(key.crypt.name, random_bytes(len(key.crypt.key)), key.crypt.bits),
    )


def format_key_line(key):
    """The key line of ``key`` (parse_key_line(format_key_line(k)) == k). Contains key material."""
    head = "%d%s" % (key.key_id, "+" if key.per_node else "")
    if key.aead is not None:
        return "%s %s %s %d" % (head, key.aead.name, key.aead.key.hex(), key.aead.bits)
    return "%s %s %s %s %s" % (head, key.auth.name, key.auth.key.hex(), key.crypt.name, key.crypt.key.hex())


def algorithm_label(key):
    """The algorithm of ``key`` as one label (``rfc4106(gcm(aes))`` or ``hmac(sha256)+cbc(aes)``); no key bytes."""
    return key.algorithm


def mtu_overhead(key):
    """Bytes of ESP tunnel-mode overhead per packet with ``key`` (to subtract from the pod MTU)."""
    if key.aead is not None:
        return IPSEC_OVERHEAD[key.aead.name] + key.aead.bits // 8
    return IPSEC_OVERHEAD[key.crypt.name] + key.auth.bits // 8


# ------------------------------------------------------------------------------- SPIs and pair keys


def spi(key_id, src_ip):
    """The SPI of the SA from the node with IPv4 ``src_ip`` with key ``key_id``: the key ID in the top
    nibble, the low 24 bits of the sender's IP below (unique per sender at a receiver: checked by plan_ipsec)."""
    if not MIN_KEY_ID <= key_id <= MAX_KEY_ID:
        raise ValueError("key ID must be %d..%d" % (MIN_KEY_ID, MAX_KEY_ID))
    return key_id << 28 | (int(ipaddress.IPv4Address(src_ip)) & 0x00FFFFFF)


def spi_key_id(value):
    """The key ID an SPI carries (its top nibble)."""
    return value >> 28


def derive_pair_key(key_bytes, src_ip, dst_ip, src_boot_id="", dst_boot_id=""):
    """The per-pair key for traffic ``src_ip`` -> ``dst_ip`` (``+`` keys): the first len(key_bytes) bytes
    of sha256(key || src IPv4 (4 bytes) || dst IPv4 (4 bytes) || src boot ID || dst boot ID || counter)
    blocks, counter = 0, 1, ... (one byte). Both ends compute the same bytes for the same direction."""
    prefix = (
        bytes(key_bytes)
        + ipaddress.IPv4Address(src_ip).packed
        + ipaddress.IPv4Address(dst_ip).packed
        + src_boot_id.encode("ascii")
        + dst_boot_id.encode("ascii")
    )
    out = b""
    counter = 0
    while len(out) < len(key_bytes):
        out += hashlib.sha256(prefix + bytes([counter])).digest()
        counter += 1
    return out[: len(key_bytes)]


def state_algorithms(key, src_ip, dst_ip, src_boot_id="", dst_boot_id=""):
    """The algorithms of the state ``src_ip`` -> ``dst_ip`` with ``key``: ``{"aead": ...}`` or
    ``{"auth": ..., "crypt": ...}`` (xfrm.Algorithm); per-pair keys when ``key.per_node``."""

    def derive(alg):
        if not key.per_node:
            return alg
        return Algorithm(alg.name, derive_pair_key(alg.key, src_ip, dst_ip, src_boot_id, dst_boot_id), alg.bits)

    if key.aead is not None:
        return {"aead": derive(key.aead)}
    return {"auth": derive(key.auth), "crypt": derive(key.crypt)}


# ----------------------------------------------------------------------------------------- planning


@dataclass
class IpsecPlan:
    """The XFRM states and policies node ``node`` must hold (deterministic order). ``boot_dependent``:
    ids of states whose key depends on a boot ID (their bytes legitimately change when a node reboots);
    ``warnings``: things the plan left out on purpose; ``mtu_overhead``: the largest ESP overhead of the keys."""

    node: str
    encrypt_key_id: int
    states: list = field(default_factory=list)
    policies: list = field(default_factory=list)
    peer_modes: dict = field(default_factory=dict)
    boot_dependent: frozenset = frozenset()
    warnings: list = field(default_factory=list)
    mtu_overhead: int = 0

    def counts(self):
        return {"states": len(self.states), "policies": len(self.policies)}


def _ipv4(value, where, problems):
    try:
        return ipaddress.IPv4Address(value)
    except (ipaddress.AddressValueError, ValueError, TypeError):
        problems.append("%s: %r is not an IPv4 address (IPsec covers IPv4 only)" % (where, value))
        return None


def _ipv4_cidrs(values, where, problems):
    if values is None:
        values = []
    if isinstance(values, str):
        values = [values]
    nets = []
    for value in values:
        try:
            net = ipaddress.ip_network(value)
        except (ValueError, TypeError):
            problems.append("%s: %r is not a CIDR" % (where, value))
            continue
        if net.version != 4:
            problems.append(
                "%s: %s is IPv6; IPsec covers IPv4 only, so its traffic would leave in plain text" % (where, value)
            )
            continue
        nets.append(net)
    return nets


def _policy(dst, direction="out", src="0.0.0.0/0", priority=PRIORITY_ENCRYPT, action="allow", templates=(), **sel):
    return XfrmPolicy(
        selector=Selector(src=str(src), dst=str(dst), **sel),
        direction=direction,
        priority=priority,
        action=action,
        templates=tuple(templates),
    )


def policy_kind(policy):
    """``block``, ``allow`` (out, no template), ``encrypt`` (out with a template) or ``inbound`` (in/fwd)."""
    if policy.action == "block":
        return "block"
    if policy.direction != "out":
        return "inbound"
    return "encrypt" if policy.templates else "allow"


def _net_key(cidr):
    net = ipaddress.ip_network(cidr)
    return (int(net.network_address), net.prefixlen)


def _policy_sort_key(policy):
    sel = policy.selector
    return (
        ("out", "in", "fwd").index(policy.direction) if policy.direction in ("out", "in", "fwd") else 9,
        _net_key(sel.dst),
        _net_key(sel.src),
        sel.proto,
        sel.dport,
    )


def _state_sort_key(state):
    return (int(ipaddress.IPv4Address(state.dst)), int(ipaddress.IPv4Address(state.src)), state.spi)


def plan_ipsec(node, peers, keys, encrypt_key_id, block_cidrs, node_encryption=False):
    """The states and policies of ``node`` ({name, ip, pod_cidrs, boot_id?}) towards ``peers`` (each {name,
    cluster, ip, pod_cidrs, mode: direct|tunnel|external, boot_id?}; external = direct through a router).

    ``keys``: every key of the key file (each gets states in both directions, so all of them decrypt);
    ``encrypt_key_id``: the key the out policies use; ``block_cidrs``: the pod CIDRs of every cluster the
    node reaches (blocked unless an encrypt/allow policy matches first); ``node_encryption``: also
    encrypt node-to-node traffic (replaces the VXLAN-only policy of tunnel peers).

    Raises IpsecPlanError listing every problem before anything is planned."""
    problems = []
    name = node.get("name") or "?"
    where = "node %s" % name
    node_ip = _ipv4(node.get("ip"), where + ": ip", problems)
    node_cidrs = _ipv4_cidrs(node.get("pod_cidrs"), where + ": pod_cidrs", problems)

    # every node by IP, for duplicate IPs and SPI collisions
    endpoints = []  # (label, ip)
    if node_ip is not None:
        endpoints.append((name, node_ip))
    pod_owners = [(net, where) for net in node_cidrs]
    checked = []  # (peer, ip, nets, mode)
    for index, peer in enumerate(peers):
        pname = peer.get("name") or "#%d" % index
        pwhere = "peer %s" % pname
        pip = _ipv4(peer.get("ip"), pwhere + ": ip", problems)
        nets = _ipv4_cidrs(peer.get("pod_cidrs"), pwhere + ": pod_cidrs", problems)
        mode = peer.get("mode")
        if mode not in MODES:
            problems.append(
                "%s: mode %r is not one of %s (external = direct through a router)" % (pwhere, mode, ", ".join(MODES))
            )
        elif mode != "tunnel" and not nets and not peer.get("pod_cidrs"):
            problems.append(
                "%s: pod_cidrs: empty, but mode %s encrypts traffic to the peer's pod CIDRs: give its pod CIDRs"
                % (pwhere, mode)
            )
        if pip is not None:
            for other, other_ip in endpoints:
                if other_ip == pip:
                    problems.append(
                        "%s: ip %s is also the IP of node %s; every node needs its own IP" % (pwhere, pip, other)
                    )
                elif int(other_ip) & 0xFFFFFF == int(pip) & 0xFFFFFF:
                    problems.append(
                        "SPI collision: nodes %s (%s) and %s (%s) share the low 24 bits of their IP, which the SPI "
                        "carries; give them IPs that differ in their last three octets" % (other, other_ip, pname, pip)
                    )
            endpoints.append((pname, pip))
        for net in nets:
            for owner_net, owner in pod_owners:
                if net.overlaps(owner_net):
                    problems.append("%s: pod CIDR %s overlaps %s of %s" % (pwhere, net, owner_net, owner))
            pod_owners.append((net, pwhere))
        checked.append((peer, pname, pip, nets, "direct" if mode == "external" else mode))

    blocks = _ipv4_cidrs(block_cidrs, "block_cidrs", problems)

    keys = list(keys or [])
    if not keys:
        problems.append("keys: no IPsec key; give a key file with one key line")
    key_ids = []
    for key in keys:
        if not isinstance(key, IpsecKey):
            problems.append("keys: %s is not an IpsecKey (parse the key file with parse_key_file)" % type(key).__name__)
            continue
        if key.key_id in key_ids:
            problems.append("keys: key ID %d given twice; every key needs its own ID" % key.key_id)
        key_ids.append(key.key_id)
    if keys and encrypt_key_id not in key_ids:
        problems.append(
            "encrypt_key_id: key %r is not one of the keys (key IDs: %s); the key that encrypts must also be installed"
            % (encrypt_key_id, ", ".join(map(str, sorted(key_ids))) or "none")
        )
    if not isinstance(node_encryption, bool):
        problems.append("node_encryption: %r is not a boolean" % (node_encryption,))
    if problems:
        raise IpsecPlanError(problems)

    keys = sorted(keys, key=lambda k: k.key_id)
    node_boot = node.get("boot_id") or ""
    plan = IpsecPlan(node=name, encrypt_key_id=encrypt_key_id, mtu_overhead=max(mtu_overhead(k) for k in keys))
    boot_dependent = set()
    policies = {}

    def add(policy):
        policies[policy.id] = policy

    # out allow: local pod traffic stays plain
    for net in node_cidrs:
        add(_policy(net))
    in_tmpl = Template(src="0.0.0.0", dst="0.0.0.0", reqid=REQID, optional=True)
    add(_policy("%s/32" % node_ip, direction="in", templates=[in_tmpl]))
    for net in node_cidrs:
        add(_policy(net, direction="fwd", templates=[in_tmpl]))

    any_tunnel = False
    for peer, pname, pip, nets, mode in sorted(checked, key=lambda c: int(c[2])):
        plan.peer_modes[pname] = mode
        peer_boot = peer.get("boot_id") or ""
        for key in keys:
            for src, dst, sboot, dboot in ((node_ip, pip, node_boot, peer_boot), (pip, node_ip, peer_boot, node_boot)):
                state = XfrmState(
                    src=str(src),
                    dst=str(dst),
                    spi=spi(key.key_id, src),
                    reqid=REQID,
                    **state_algorithms(key, src, dst, sboot, dboot),
                )
                plan.states.append(state)
                if key.per_node and (sboot or dboot):
                    boot_dependent.add(state.id)
        out_tmpl = Template(src=str(node_ip), dst=str(pip), reqid=REQID, spi=spi(encrypt_key_id, node_ip))
        if mode == "direct":
            for net in nets:
                add(_policy(net, templates=[out_tmpl]))
        else:
            any_tunnel = True
            # the inner packets towards the peer's pods go into the VXLAN device: they must pass the
            # block policy (the VXLAN packet carrying them is what gets encrypted)
            for net in nets:
                add(_policy(net))
            if not node_encryption:
                add(
                    _policy(
                        "%s/32" % pip,
                        src="%s/32" % node_ip,
                        proto=IPPROTO_UDP,
                        dport=VXLAN_PORT,
                        templates=[out_tmpl],
                    )
                )
        if node_encryption:
            add(_policy("%s/32" % pip, src="%s/32" % node_ip, templates=[out_tmpl]))

    for net in blocks:
        block = _policy(net, priority=PRIORITY_BLOCK, action="block")
        if block.id in policies:
            plan.warnings.append(
                "block_cidrs: %s is also the pod CIDR of a node; its encrypt/allow policy stands in for the block" % net
            )
            continue
        add(block)
    if any_tunnel:
        add(
            _policy(
                "0.0.0.0/0",
                src="%s/32" % node_ip,
                proto=IPPROTO_UDP,
                dport=VXLAN_PORT,
                priority=PRIORITY_BLOCK,
                action="block",
            )
        )

    plan.states.sort(key=_state_sort_key)
    plan.policies = sorted(policies.values(), key=_policy_sort_key)
    plan.boot_dependent = frozenset(boot_dependent)
    return plan


# ------------------------------------------------------------------------------------------ changes


def owns_state(state):
    return state.reqid == REQID


def owns_policy(policy):
    return policy.priority in (PRIORITY_ENCRYPT, PRIORITY_BLOCK)


def _describe_algorithms(state):
    if state.aead is not None:
        return state.aead.name
    names = [a.name for a in (state.auth, state.crypt) if a is not None]
    return "+".join(names) or "no algorithm"


def _describe_selector(sel):
    text = "%s -> %s" % (sel.src, sel.dst)
    if sel.proto:
        text += " proto %s" % ("udp" if sel.proto == IPPROTO_UDP else sel.proto)
    if sel.dport:
        text += " dport %d" % sel.dport
    return text


def describe_state(state):
    return "state %s -> %s spi 0x%08x %s" % (state.src, state.dst, state.spi, _describe_algorithms(state))


def describe_policy(policy):
    kind = policy_kind(policy)
    text = "policy %s %s %s" % (policy.direction, _describe_selector(policy.selector), kind)
    for tmpl in policy.templates:
        text += " %s -> %s" % (tmpl.src, tmpl.dst)
        if tmpl.spi:
            text += " spi 0x%08x" % tmpl.spi
        if tmpl.optional:
            text += " optional"
    return text


_SIGNS = {"add_state": "+", "delete_state": "-", "add_policy": "+", "update_policy": "~", "delete_policy": "-"}
VERBS = tuple(_SIGNS)


@dataclass
class IpsecChanges:
    """Ordered actions ``(verb, obj)``, verb one of VERBS, safe for traffic when applied in order.
    ``rekeyed``: key IDs whose bytes changed without a new ID (states replaced: the module should refuse);
    ``replaced``: ids of states deleted and re-added; ``conflicts``: our objects' ids held by foreign ones."""

    actions: list = field(default_factory=list)
    rekeyed: list = field(default_factory=list)
    replaced: list = field(default_factory=list)
    conflicts: list = field(default_factory=list)

    @property
    def changed(self):
        return bool(self.actions)

    def rekey_problems(self):
        """One message per key ID in ``rekeyed``, for the module to refuse with."""
        return ["key %d changed its bytes without a new key ID: %s" % (k, ROTATE_HINT) for k in self.rekeyed]

    def summary(self):
        counts = dict.fromkeys(VERBS, 0)
        for verb, _obj in self.actions:
            counts[verb] += 1
        return counts

    def describe(self):
        """One line per action, without key material (for --diff)."""
        lines = []
        for verb, obj in self.actions:
            text = describe_state(obj) if verb.endswith("_state") else describe_policy(obj)
            lines.append("%s %s" % (_SIGNS[verb], text))
        return lines


def _policy_actions(desired, current, kinds):
    """add/update actions for the desired policies of ``kinds`` (in sort order)."""
    actions = []
    for policy in desired:
        if policy_kind(policy) not in kinds:
            continue
        have = current.get(policy.id)
        if have is None:
            actions.append(("add_policy", policy))
        elif have != policy:
            actions.append(("update_policy", policy))
    return actions


def _delete_policies(obsolete, kinds):
    return [("delete_policy", p) for p in obsolete if policy_kind(p) in kinds]


def diff_ipsec(current_states, current_policies, plan):
    """The ordered changes from what the kernel holds (``current_*``: everything, ours are picked by
    reqid / priority; nothing else is ever touched) to ``plan``:

    1. out allow policies, then block policies (add/update; allows first: they carve local traffic out
       of the blocks)
    2. new states, then changed states (delete + add: a state's key cannot change in place)
    3. in/fwd policies
    4. out encrypt policies (an update switches the SPI atomically)
    5. deletions: out encrypt policies, states, in/fwd policies, block policies, out allow policies last
    """
    ours_states = {s.id: s for s in current_states if owns_state(s)}
    foreign_states = {s.id: s for s in current_states if not owns_state(s)}
    ours_policies = {p.id: p for p in current_policies if owns_policy(p)}
    foreign_policies = {p.id: p for p in current_policies if not owns_policy(p)}
    changes = IpsecChanges()

    for state in plan.states:
        if state.id in foreign_states and state.id not in ours_states:
            changes.conflicts.append(
                "%s: the kernel holds a state with this SPI not made by us" % describe_state(state)
            )
    for policy in plan.policies:
        if policy.id in foreign_policies and policy.id not in ours_policies:
            changes.conflicts.append(
                "%s: the kernel holds a policy with this selector not made by us" % describe_policy(policy)
            )

    changes.actions += _policy_actions(plan.policies, ours_policies, ("allow",))
    changes.actions += _policy_actions(plan.policies, ours_policies, ("block",))

    new_states, replace_states = [], []
    rekeyed = set()
    for state in plan.states:
        have = ours_states.get(state.id)
        if have is None:
            new_states.append(("add_state", state))
        elif have != state:
            replace_states += [("delete_state", have), ("add_state", state)]
            changes.replaced.append(state.id)
            same_algorithms = (have.aead, have.auth, have.crypt) == (state.aead, state.auth, state.crypt)
            if not same_algorithms and state.id not in plan.boot_dependent:
                rekeyed.add(spi_key_id(state.spi))
    changes.actions += new_states + replace_states
    changes.rekeyed = sorted(rekeyed)

    changes.actions += _policy_actions(plan.policies, ours_policies, ("inbound",))
    changes.actions += _policy_actions(plan.policies, ours_policies, ("encrypt",))

    wanted_policies = {p.id for p in plan.policies}
    wanted_states = {s.id for s in plan.states}
    obsolete_policies = sorted((p for i, p in ours_policies.items() if i not in wanted_policies), key=_policy_sort_key)
    obsolete_states = sorted((s for i, s in ours_states.items() if i not in wanted_states), key=_state_sort_key)
    changes.actions += _delete_policies(obsolete_policies, ("encrypt",))
    changes.actions += [("delete_state", s) for s in obsolete_states]
    changes.actions += _delete_policies(obsolete_policies, ("inbound",))
    changes.actions += _delete_policies(obsolete_policies, ("block",))
    changes.actions += _delete_policies(obsolete_policies, ("allow",))
    return changes


def removal(current_states, current_policies):
    """The ordered changes that remove everything of ours (state=absent): out encrypt policies, in/fwd
    policies, states, block policies, and the out allow policies last (they carve local traffic out of the
    blocks). Foreign states and policies are left alone."""
    policies = sorted((p for p in current_policies if owns_policy(p)), key=_policy_sort_key)
    states = sorted((s for s in current_states if owns_state(s)), key=_state_sort_key)
    changes = IpsecChanges()
    changes.actions += _delete_policies(policies, ("encrypt",))
    changes.actions += _delete_policies(policies, ("inbound",))
    changes.actions += [("delete_state", s) for s in states]
    changes.actions += _delete_policies(policies, ("block",))
    changes.actions += _delete_policies(policies, ("allow",))
    return changes
