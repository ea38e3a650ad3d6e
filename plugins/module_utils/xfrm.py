# -*- coding: utf-8 -*-
# Copyright: clustermesh.core contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""XFRM (IPsec) states and policies: value types and a small netlink codec (NETLINK_XFRM).

pyroute2 has no XFRM state/policy API; this file speaks the kernel's xfrm_user messages with
``struct`` over a raw netlink socket (ADR 011): no ``ip`` process, so key material never reaches a
command line, and one socket serves dumps and changes with typed errors.

Only what the mesh uses is covered: IPv4, ESP in tunnel mode, AEAD or auth+cipher algorithms,
policies with a selector, a priority, allow/block and templates. Key bytes are never part of a
value's ``repr`` nor of an error message.

Layouts follow include/uapi/linux/xfrm.h on x86_64/arm64 (native byte order, the C compiler's
padding spelled out as ``x``; SPIs and ports in network order). ``XfrmSocket`` is the one entry point
that touches the kernel; the ``encode_*``/``decode_*`` functions are pure and unit-tested.

Choices (kept equal to what ``ip xfrm state add ... mode tunnel`` does unless said):
- lifetimes: byte/packet limits ``XFRM_INF``, expiry seconds 0 (= never; ``XFRM_INF`` seconds would
  overflow the kernel's timer arithmetic and expire the SA at once);
- replay window 32, the largest window without ESN (the kernel clamps a legacy window to the 32-bit
  bitmap): inbound SAs get anti-replay protection. ESN is not used, so an SA carries at most 2**32
  packets before the kernel refuses to send on it; key rotation replaces SAs long before that at
  normal rates;
- templates accept every algorithm (aalgos/ealgos/calgos all ones), share ``any``.
"""

from __future__ import annotations

import errno as errno_codes
import ipaddress
import os
import socket
import struct
from dataclasses import dataclass, field

DIRECTIONS = ("in", "out", "fwd")
ACTIONS = ("allow", "block")
IPPROTO_ESP = 50
IPPROTO_UDP = 17

# --- kernel constants (include/uapi/linux/netlink.h, linux/xfrm.h) ---------------------------------
NETLINK_XFRM = 6
SOL_NETLINK = 270
NETLINK_CAP_ACK = 10
NETLINK_EXT_ACK = 11

NLMSG_ERROR = 2
NLMSG_DONE = 3
NLM_F_REQUEST = 0x1
NLM_F_MULTI = 0x2
NLM_F_ACK = 0x4
NLM_F_DUMP_INTR = 0x10
NLM_F_DUMP = 0x300
NLM_F_CAPPED = 0x100  # in an NLMSG_ERROR: the request was not echoed
NLM_F_ACK_TLVS = 0x200  # in an NLMSG_ERROR: extended-ack attributes follow
NLMSGERR_ATTR_MSG = 1

XFRM_MSG_NEWSA = 0x10
XFRM_MSG_DELSA = 0x11
XFRM_MSG_GETSA = 0x12
XFRM_MSG_NEWPOLICY = 0x13
XFRM_MSG_DELPOLICY = 0x14
XFRM_MSG_GETPOLICY = 0x15
XFRM_MSG_UPDPOLICY = 0x19

XFRMA_ALG_AUTH = 1
XFRMA_ALG_CRYPT = 2
XFRMA_TMPL = 5
XFRMA_SRCADDR = 13
XFRMA_POLICY_TYPE = 16
XFRMA_ALG_AEAD = 18
XFRMA_ALG_AUTH_TRUNC = 20

XFRM_POLICY_TYPE_MAIN = 0
XFRM_POLICY_MAX = 3  # a dumped policy with dir >= this is a per-socket policy
XFRM_INF = (1 << 64) - 1
XFRM_REPLAY_WINDOW = 32
ALL_ALGORITHMS = 0xFFFFFFFF

MODES = {"transport": 0, "tunnel": 1, "ro": 2, "in_trigger": 3, "beet": 4}
MODE_NAMES = {number: name for name, number in MODES.items()}
DIRECTION_NUMBERS = {"in": 0, "out": 1, "fwd": 2}
ACTION_NUMBERS = {"allow": 0, "block": 1}
PROTOCOL_NAMES = {0: "any", 1: "icmp", 6: "tcp", IPPROTO_UDP: "udp", IPPROTO_ESP: "esp", 51: "ah", 132: "sctp"}

# --- layouts ---------------------------------------------------------------------------------------
NLMSGHDR = struct.Struct("=IHHII")  # len, type, flags, seq, pid
NLATTR = struct.Struct("=HH")  # len, type
NLMSGERR = struct.Struct("=i")  # error, then the request's nlmsghdr (+ payload unless capped)
# xfrm_selector: daddr, saddr, dport, dport_mask, sport, sport_mask (be16 as raw bytes), family,
# prefixlen_d, prefixlen_s, proto, 3 pad, ifindex, user
SELECTOR = struct.Struct("=16s16s2s2s2s2sHBBB3xiI")
# xfrm_lifetime_cfg: soft/hard byte, soft/hard packet limits, soft/hard add expiry, soft/hard use expiry
LIFETIME_CFG = struct.Struct("=8Q")
LIFETIME_CUR = struct.Struct("=4Q")  # bytes, packets, add_time, use_time
STATS = struct.Struct("=3I")  # replay_window, replay, integrity_failed
# xfrm_usersa_info: sel, id{daddr, spi(be), proto, 3 pad}, saddr, lft, curlft, stats, seq, reqid,
# family, mode, replay_window, flags, 7 pad (the struct is 8-aligned by its __u64 members)
USERSA_INFO = struct.Struct("=56s16s4sB3x16s64s32s12sIIHBBB7x")
# xfrm_usersa_id: daddr, spi(be), family, proto, 1 pad
USERSA_ID = struct.Struct("=16s4sHBx")
# xfrm_userpolicy_info: sel, lft, curlft, priority, index, dir, action, flags, share, 4 pad
USERPOLICY_INFO = struct.Struct("=56s64s32sIIBBBB4x")
# xfrm_userpolicy_id: sel, index, dir, 3 pad
USERPOLICY_ID = struct.Struct("=56sIB3x")
# xfrm_user_tmpl: id{daddr, spi(be), proto, 3 pad}, family, 2 pad, saddr, reqid, mode, share,
# optional, 1 pad, aalgos, ealgos, calgos
USER_TMPL = struct.Struct("=16s4sB3xH2x16sIBBBxIII")
USERPOLICY_TYPE = struct.Struct("=BxHBx")  # type, 1 pad, reserved1, reserved2, 1 pad
ALGO = struct.Struct("=64sI")  # xfrm_algo: name, key_len (bits); key follows
ALGO_AUTH = struct.Struct("=64sII")  # xfrm_algo_auth: name, key_len, trunc_len (bits); key follows
ALGO_AEAD = struct.Struct("=64sII")  # xfrm_algo_aead: name, key_len, icv_len (bits); key follows

STRUCT_SIZES = {
    "xfrm_selector": SELECTOR.size,
    "xfrm_usersa_info": USERSA_INFO.size,
    "xfrm_usersa_id": USERSA_ID.size,
    "xfrm_userpolicy_info": USERPOLICY_INFO.size,
    "xfrm_userpolicy_id": USERPOLICY_ID.size,
    "xfrm_user_tmpl": USER_TMPL.size,
    "xfrm_userpolicy_type": USERPOLICY_TYPE.size,
    "xfrm_algo": ALGO.size,
    "xfrm_algo_auth": ALGO_AUTH.size,
    "xfrm_algo_aead": ALGO_AEAD.size,
    "xfrm_lifetime_cfg": LIFETIME_CFG.size,
    "xfrm_lifetime_cur": LIFETIME_CUR.size,
    "xfrm_stats": STATS.size,
}

RECV_BUFFER = 1 << 20  # one datagram never exceeds this; a dump arrives over several recv() calls
DUMP_ATTEMPTS = 5  # a dump interrupted by a concurrent change (NLM_F_DUMP_INTR) is restarted


# --- value types -----------------------------------------------------------------------------------
def _address(value, what):
    try:
        return str(ipaddress.ip_address(str(value).strip()))
    except ValueError:
        raise ValueError(f"{what}: {value!r} is not an IP address") from None


def _network(value, what):
    try:
        return ipaddress.ip_network(str(value).strip(), strict=False).with_prefixlen
    except ValueError:
        raise ValueError(f"{what}: {value!r} is not a CIDR (like 10.1.0.0/16)") from None


@dataclass(frozen=True)
class Algorithm:
    """One algorithm of a state: ``name`` as the kernel's crypto API spells it (``rfc4106(gcm(aes))``,
    ``cbc(aes)``, ``hmac(sha256)``), its key, and ``bits``: the ICV length for an AEAD, the truncation
    length for an auth algorithm, 0 for a cipher."""

    name: str
    key: bytes = field(repr=False)
    bits: int = 0


@dataclass(frozen=True)
class XfrmState:
    """An ESP tunnel-mode SA from ``src`` to ``dst`` (IPv4 strings). Either ``aead`` or both ``auth``
    and ``crypt``."""

    src: str
    dst: str
    spi: int
    reqid: int
    aead: Algorithm | None = None
    auth: Algorithm | None = None
    crypt: Algorithm | None = None
    proto: int = IPPROTO_ESP
    mode: str = "tunnel"

    def __post_init__(self):
        object.__setattr__(self, "src", _address(self.src, "XFRM state src"))
        object.__setattr__(self, "dst", _address(self.dst, "XFRM state dst"))

    @property
    def id(self):
        """What the kernel keys an SA by (and what deleting one needs)."""
        return (self.dst, self.spi, self.proto)


@dataclass(frozen=True)
class Selector:
    """Which packets a policy matches: IPv4 CIDRs, protocol (0 = any) and destination port (0 = any).
    CIDRs are normalised (``10.1.0.7/24`` -> ``10.1.0.0/24``, ``10.1.0.7`` -> ``10.1.0.7/32``)."""

    src: str = "0.0.0.0/0"
    dst: str = "0.0.0.0/0"
    proto: int = 0
    dport: int = 0

    def __post_init__(self):
        object.__setattr__(self, "src", _network(self.src, "XFRM selector src"))
        object.__setattr__(self, "dst", _network(self.dst, "XFRM selector dst"))


@dataclass(frozen=True)
class Template:
    """An ESP tunnel template: the SA a matching packet must use (out) or may have used (in/fwd).
    ``0.0.0.0`` addresses and ``spi`` 0 are wildcards; ``optional`` is ip-xfrm's ``level use``."""

    src: str
    dst: str
    reqid: int
    spi: int = 0
    optional: bool = False
    proto: int = IPPROTO_ESP
    mode: str = "tunnel"

    def __post_init__(self):
        object.__setattr__(self, "src", _address(self.src, "XFRM template src"))
        object.__setattr__(self, "dst", _address(self.dst, "XFRM template dst"))
        object.__setattr__(self, "optional", bool(self.optional))


@dataclass(frozen=True)
class XfrmPolicy:
    selector: Selector
    direction: str  # in | out | fwd
    priority: int
    action: str = "allow"  # allow | block
    templates: tuple[Template, ...] = ()

    def __post_init__(self):
        object.__setattr__(self, "templates", tuple(self.templates))

    @property
    def id(self):
        """What the kernel keys a policy by (its priority is not part of it)."""
        return (self.selector, self.direction)


def describe_state(state):
    """``XFRM state 198.18.0.1 -> 198.18.0.2 spi 0x10000002 reqid 0x636d with rfc4106(gcm(aes))``: no keys."""
    algorithms = [alg.name for alg in (state.aead, state.auth, state.crypt) if alg is not None]
    text = f"XFRM state {state.src} -> {state.dst} spi 0x{state.spi:08x} reqid 0x{state.reqid:x}"
    return text + (f" with {' + '.join(algorithms)}" if algorithms else "")


def describe_selector(selector):
    text = f"{selector.src} -> {selector.dst}"
    if selector.proto:
        text += f" proto {PROTOCOL_NAMES.get(selector.proto, selector.proto)}"
    if selector.dport:
        text += f" dport {selector.dport}"
    return text


def describe_policy(policy):
    """``XFRM policy out 0.0.0.0/0 -> 10.2.0.0/16 priority 100 (allow, 1 template)``."""
    count = len(policy.templates)
    return (
        f"XFRM policy {policy.direction} {describe_selector(policy.selector)} priority {policy.priority}"
        f" ({policy.action}, {count} template{'' if count == 1 else 's'})"
    )


# --- errors ----------------------------------------------------------------------------------------
class XfrmError(OSError):
    """A refused XFRM request: ``errno`` as the kernel said it, ``str()`` a sentence that names the
    operation and the object (never a key), e.g. ``cannot add XFRM state ... : the kernel has no ESP
    support (module esp4 missing)``."""

    def __init__(self, code, message, kernel_message="", reason=""):
        super().__init__(code, message)
        self.kernel_message = kernel_message
        self.reason = reason or message  # the cause alone, without the operation and object

    def __str__(self):
        return str(self.strerror)

    @property
    def not_found(self):
        return self.errno in (errno_codes.ESRCH, errno_codes.ENOENT)

    @property
    def exists(self):
        return self.errno == errno_codes.EEXIST


def _algorithm_names(state, kernel_message):
    """The algorithm(s) a NEWSA ENOSYS/ENOENT is about; the extended ack (kernel >= 6.2) says which."""
    message = kernel_message.lower()
    for word, alg in (("aead", state.aead), ("auth", state.auth), ("crypt", state.crypt)):
        if alg is not None and word in message:
            return alg.name
    return " or ".join(alg.name for alg in (state.aead, state.auth, state.crypt) if alg is not None)


def explain_error(code, operation, obj, kernel_message=""):
    """The ``XfrmError`` for errno ``code`` from ``operation`` (add/delete/update) on ``obj`` (a state or
    a policy)."""
    is_state = isinstance(obj, XfrmState)
    what = describe_state(obj) if is_state else describe_policy(obj)
    reason = None
    if code == errno_codes.EPERM:
        reason = "permission denied (needs root / CAP_NET_ADMIN)"
    elif is_state and operation == "add":
        if code == errno_codes.EPROTONOSUPPORT:
            if obj.proto == IPPROTO_ESP:
                reason = "the kernel has no ESP support (module esp4 missing)"
            else:
                reason = f"the kernel does not support IPsec protocol {obj.proto}"
        elif code in (errno_codes.ENOSYS, errno_codes.ENOENT):
            reason = f"the kernel has no {_algorithm_names(obj, kernel_message)} (crypto module missing)"
        elif code == errno_codes.EEXIST:
            reason = "an SA with this destination, SPI and protocol already exists"
        elif code == errno_codes.EINVAL:
            reason = "the kernel rejected it as invalid (wrong key length, ICV or truncation length for the algorithm?)"
    elif operation == "add" and code == errno_codes.EEXIST:
        reason = "a policy with this selector and direction already exists"
    elif operation == "delete" and code in (errno_codes.ESRCH, errno_codes.ENOENT):
        reason = "no such SA" if is_state else "no such policy"
    if reason is None:
        reason = os.strerror(code)
    cause = reason
    if kernel_message:
        reason += f" (kernel: {kernel_message})"
    return XfrmError(code, f"cannot {operation} {what}: {reason}", kernel_message, reason=cause)


# --- encoders / decoders ---------------------------------------------------------------------------
def _ipv4(value, what):
    address = ipaddress.ip_address(value)
    if address.version != 4:
        raise ValueError(f"{what}: {value} is IPv6; only IPv4 is supported")
    return address.packed.ljust(16, b"\0")


def _decode_address(raw, family):
    if family == socket.AF_INET6:
        return str(ipaddress.IPv6Address(raw[:16]))
    return str(ipaddress.IPv4Address(raw[:4]))


def _spi(value, what, allow_zero):
    if not isinstance(value, int) or not (0 if allow_zero else 1) <= value <= 0xFFFFFFFF:
        low = 0 if allow_zero else 1
        raise ValueError(f"{what}: spi {value!r} must be an integer {low}..0xffffffff")
    return value.to_bytes(4, "big")


def _u32(value, what):
    if not isinstance(value, int) or not 0 <= value <= 0xFFFFFFFF:
        raise ValueError(f"{what}: {value!r} must be an integer 0..0xffffffff")
    return value


def _mode(value, what):
    try:
        return MODES[value]
    except KeyError:
        raise ValueError(f"{what}: mode {value!r} must be one of {', '.join(MODES)}") from None


def _infinite_lifetime():
    return LIFETIME_CFG.pack(XFRM_INF, XFRM_INF, XFRM_INF, XFRM_INF, 0, 0, 0, 0)


def encode_selector(selector=None):
    """``struct xfrm_selector`` for ``selector`` (None: everything, AF_INET)."""
    selector = selector or Selector()
    src = ipaddress.ip_network(selector.src)
    dst = ipaddress.ip_network(selector.dst)
    if not 0 <= selector.proto <= 255:
        raise ValueError(f"XFRM selector proto {selector.proto!r} must be 0..255")
    if not 0 <= selector.dport <= 0xFFFF:
        raise ValueError(f"XFRM selector dport {selector.dport!r} must be 0..65535")
    if selector.dport and not selector.proto:
        raise ValueError(f"XFRM selector dport {selector.dport} needs a proto (udp, tcp)")
    mask = 0xFFFF if selector.dport else 0
    return SELECTOR.pack(
        _ipv4(dst.network_address, "XFRM selector dst"),
        _ipv4(src.network_address, "XFRM selector src"),
        selector.dport.to_bytes(2, "big"),
        mask.to_bytes(2, "big"),
        b"\0\0",
        b"\0\0",
        socket.AF_INET,
        dst.prefixlen,
        src.prefixlen,
        selector.proto,
        0,
        0,
    )


def decode_selector(raw):
    daddr, saddr, dport, dport_mask, _sport, _sport_mask, family, plen_d, plen_s, proto, _ifindex, _user = (
        SELECTOR.unpack_from(raw)
    )
    family = family or socket.AF_INET
    port = int.from_bytes(dport, "big") & int.from_bytes(dport_mask, "big")
    return Selector(
        src=f"{_decode_address(saddr, family)}/{plen_s}",
        dst=f"{_decode_address(daddr, family)}/{plen_d}",
        proto=proto,
        dport=port,
    )


def _attr(kind, payload):
    length = NLATTR.size + len(payload)
    return NLATTR.pack(length, kind) + payload + b"\0" * (-length % 4)


def parse_attributes(raw):
    """``{type: payload}`` of a run of netlink attributes (the last one of a type wins)."""
    attrs = {}
    offset = 0
    while offset + NLATTR.size <= len(raw):
        length, kind = NLATTR.unpack_from(raw, offset)
        if length < NLATTR.size or offset + length > len(raw):
            raise ValueError(f"malformed netlink attribute at offset {offset} (length {length})")
        attrs[kind & 0x3FFF] = bytes(raw[offset + NLATTR.size : offset + length])
        offset += (length + 3) & ~3
    return attrs


def _name(value, what):
    raw = value.encode("ascii")
    if not raw or len(raw) > 63:
        raise ValueError(f"{what}: algorithm name {value!r} must be 1..63 ASCII characters")
    return raw


def _encode_algorithm(layout, alg, what, *extra):
    key = bytes(alg.key)
    return layout.pack(_name(alg.name, what), len(key) * 8, *extra) + key


def _decode_algorithm(layout, raw):
    name, key_bits, *extra = layout.unpack_from(raw)
    key = raw[layout.size : layout.size + (key_bits + 7) // 8]
    return Algorithm(name.split(b"\0", 1)[0].decode("ascii", "replace"), bytes(key), extra[0] if extra else 0)


def encode_state(state):
    """``struct xfrm_usersa_info`` + algorithm attributes: the payload of XFRM_MSG_NEWSA."""
    what = describe_state(state)
    if state.aead is not None and (state.auth is not None or state.crypt is not None):
        raise ValueError(f"{what}: give either aead or auth+crypt, not both")
    if state.aead is None and (state.auth is None or state.crypt is None):
        raise ValueError(f"{what}: needs aead, or both auth and crypt")
    info = USERSA_INFO.pack(
        encode_selector(),
        _ipv4(state.dst, what),
        _spi(state.spi, what, allow_zero=False),
        state.proto,
        _ipv4(state.src, what),
        _infinite_lifetime(),
        LIFETIME_CUR.pack(0, 0, 0, 0),
        STATS.pack(0, 0, 0),
        0,
        _u32(state.reqid, f"{what}: reqid"),
        socket.AF_INET,
        _mode(state.mode, what),
        XFRM_REPLAY_WINDOW,
        0,
    )
    attrs = b""
    if state.aead is not None:
        attrs += _attr(XFRMA_ALG_AEAD, _encode_algorithm(ALGO_AEAD, state.aead, what, state.aead.bits))
    else:
        attrs += _attr(XFRMA_ALG_AUTH_TRUNC, _encode_algorithm(ALGO_AUTH, state.auth, what, state.auth.bits))
        attrs += _attr(XFRMA_ALG_CRYPT, _encode_algorithm(ALGO, state.crypt, what))
    return info + attrs


def decode_state(raw):
    """The ``XfrmState`` of an XFRM_MSG_NEWSA payload (a dump entry)."""
    fields = USERSA_INFO.unpack_from(raw)
    _sel, daddr, spi, proto, saddr, _lft, _cur, _stats, _seq, reqid, family, mode, _window, _flags = fields
    attrs = parse_attributes(raw[USERSA_INFO.size :])
    aead = auth = crypt = None
    if XFRMA_ALG_AEAD in attrs:
        aead = _decode_algorithm(ALGO_AEAD, attrs[XFRMA_ALG_AEAD])
    if XFRMA_ALG_AUTH_TRUNC in attrs:
        auth = _decode_algorithm(ALGO_AUTH, attrs[XFRMA_ALG_AUTH_TRUNC])
    elif XFRMA_ALG_AUTH in attrs:
        auth = _decode_algorithm(ALGO, attrs[XFRMA_ALG_AUTH])
    if XFRMA_ALG_CRYPT in attrs:
        crypt = _decode_algorithm(ALGO, attrs[XFRMA_ALG_CRYPT])
    return XfrmState(
        src=_decode_address(saddr, family),
        dst=_decode_address(daddr, family),
        spi=int.from_bytes(spi, "big"),
        reqid=reqid,
        aead=aead,
        auth=auth,
        crypt=crypt,
        proto=proto,
        mode=MODE_NAMES.get(mode, str(mode)),
    )


def encode_state_id(state):
    """``struct xfrm_usersa_id`` + XFRMA_SRCADDR: the payload of XFRM_MSG_DELSA."""
    what = describe_state(state)
    return USERSA_ID.pack(
        _ipv4(state.dst, what), _spi(state.spi, what, allow_zero=False), socket.AF_INET, state.proto
    ) + _attr(XFRMA_SRCADDR, _ipv4(state.src, what))


def encode_template(template):
    what = f"XFRM template {template.src} -> {template.dst}"
    return USER_TMPL.pack(
        _ipv4(template.dst, what),
        _spi(template.spi, what, allow_zero=True),
        template.proto,
        socket.AF_INET,
        _ipv4(template.src, what),
        _u32(template.reqid, f"{what}: reqid"),
        _mode(template.mode, what),
        0,
        1 if template.optional else 0,
        ALL_ALGORITHMS,
        ALL_ALGORITHMS,
        ALL_ALGORITHMS,
    )


def decode_template(raw):
    daddr, spi, proto, family, saddr, reqid, mode, _share, optional, _a, _e, _c = USER_TMPL.unpack_from(raw)
    return Template(
        src=_decode_address(saddr, family),
        dst=_decode_address(daddr, family),
        reqid=reqid,
        spi=int.from_bytes(spi, "big"),
        optional=bool(optional),
        proto=proto,
        mode=MODE_NAMES.get(mode, str(mode)),
    )


def _direction(policy):
    try:
        return DIRECTION_NUMBERS[policy.direction]
    except KeyError:
        raise ValueError(f"XFRM policy direction {policy.direction!r} must be one of {', '.join(DIRECTIONS)}") from None


def encode_policy(policy):
    """``struct xfrm_userpolicy_info`` + XFRMA_TMPL: the payload of XFRM_MSG_NEWPOLICY/UPDPOLICY."""
    direction = _direction(policy)
    if policy.action not in ACTION_NUMBERS:
        raise ValueError(f"XFRM policy action {policy.action!r} must be one of {', '.join(ACTIONS)}")
    info = USERPOLICY_INFO.pack(
        encode_selector(policy.selector),
        _infinite_lifetime(),
        LIFETIME_CUR.pack(0, 0, 0, 0),
        _u32(policy.priority, "XFRM policy priority"),
        0,
        direction,
        ACTION_NUMBERS[policy.action],
        0,
        0,
    )
    if not policy.templates:
        return info
    return info + _attr(XFRMA_TMPL, b"".join(encode_template(t) for t in policy.templates))


def decode_policy(raw):
    """The ``XfrmPolicy`` of an XFRM_MSG_NEWPOLICY payload, or None for a per-socket or sub policy."""
    sel, _lft, _cur, priority, _index, direction, action, _flags, _share = USERPOLICY_INFO.unpack_from(raw)
    attrs = parse_attributes(raw[USERPOLICY_INFO.size :])
    if direction >= XFRM_POLICY_MAX:
        return None
    if XFRMA_POLICY_TYPE in attrs and USERPOLICY_TYPE.unpack_from(attrs[XFRMA_POLICY_TYPE])[0] != 0:
        return None
    tmpl = attrs.get(XFRMA_TMPL, b"")
    templates = tuple(decode_template(tmpl[i : i + USER_TMPL.size]) for i in range(0, len(tmpl), USER_TMPL.size))
    return XfrmPolicy(
        selector=decode_selector(sel),
        direction=DIRECTIONS[direction],
        priority=priority,
        action=ACTIONS[action] if action < len(ACTIONS) else str(action),
        templates=templates,
    )


def encode_policy_id(policy):
    """``struct xfrm_userpolicy_id`` (selector, index 0, dir): the payload of XFRM_MSG_DELPOLICY."""
    return USERPOLICY_ID.pack(encode_selector(policy.selector), 0, _direction(policy))


def encode_message(kind, flags, seq, payload=b""):
    return NLMSGHDR.pack(NLMSGHDR.size + len(payload), kind, flags, seq, 0) + payload


def parse_messages(buf):
    """``(type, flags, seq, payload)`` of each netlink message in one datagram."""
    offset = 0
    while offset + NLMSGHDR.size <= len(buf):
        length, kind, flags, seq, _pid = NLMSGHDR.unpack_from(buf, offset)
        if length < NLMSGHDR.size or offset + length > len(buf):
            raise ValueError(f"malformed netlink message at offset {offset} (length {length})")
        yield kind, flags, seq, bytes(buf[offset + NLMSGHDR.size : offset + length])
        offset += (length + 3) & ~3


def parse_error(flags, payload):
    """``(errno, extended-ack message)`` of an NLMSG_ERROR (errno 0: an ack) or NLMSG_DONE payload."""
    (code,) = NLMSGERR.unpack_from(payload) if len(payload) >= NLMSGERR.size else (0,)
    message = ""
    if flags & NLM_F_ACK_TLVS:
        offset = NLMSGERR.size
        if len(payload) >= offset + NLMSGHDR.size:  # NLMSG_ERROR: the request header (and body) follows
            request_length = NLMSGHDR.unpack_from(payload, offset)[0]
            offset += NLMSGHDR.size if flags & NLM_F_CAPPED else (request_length + 3) & ~3
        try:
            raw = parse_attributes(payload[offset:]).get(NLMSGERR_ATTR_MSG, b"")
        except ValueError:
            raw = b""
        message = raw.split(b"\0", 1)[0].decode("utf-8", "replace")
    return -code, message


# --- the socket ------------------------------------------------------------------------------------
class XfrmSocket:
    """One NETLINK_XFRM socket in the caller's network namespace (needs CAP_NET_ADMIN to change
    anything). Use as a context manager. Each change is acknowledged before the call returns; a
    refused change raises ``XfrmError``."""

    def __init__(self, sock=None):
        if sock is None:
            sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, NETLINK_XFRM)
            try:
                sock.bind((0, 0))
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, RECV_BUFFER)
                for option in (NETLINK_CAP_ACK, NETLINK_EXT_ACK):  # no request echo (keys); error text
                    try:
                        sock.setsockopt(SOL_NETLINK, option, 1)
                    except OSError:
                        pass
            except BaseException:
                sock.close()
                raise
        self._sock = sock
        self._seq = 0
        self._buffer = bytearray(RECV_BUFFER)

    def __enter__(self):
        return self

    def __exit__(self, *exc_info):
        self.close()

    def close(self):
        if self._sock is not None:
            self._sock.close()
            self._sock = None

    def _send(self, kind, flags, payload):
        self._seq += 1
        self._sock.send(encode_message(kind, NLM_F_REQUEST | flags, self._seq, payload))
        return self._seq

    def _receive(self):
        size = self._sock.recv_into(self._buffer)
        if size == 0:
            raise ConnectionError("the NETLINK_XFRM socket closed")
        return parse_messages(memoryview(self._buffer)[:size])

    def _request(self, kind, payload, operation, obj):
        seq = self._send(kind, NLM_F_ACK, payload)
        while True:
            for msg_kind, flags, msg_seq, body in self._receive():
                if msg_seq != seq or msg_kind != NLMSG_ERROR:
                    continue
                code, message = parse_error(flags, body)
                if code:
                    raise explain_error(code, operation, obj, message)
                return

    def _dump(self, kind, what):
        for _attempt in range(DUMP_ATTEMPTS):
            payloads, interrupted = self._dump_once(kind, what)
            if not interrupted:
                return payloads
        raise XfrmError(errno_codes.EINTR, f"cannot dump {what}: changed concurrently {DUMP_ATTEMPTS} times")

    def _dump_once(self, kind, what):
        seq = self._send(kind, NLM_F_DUMP, b"")
        payloads = []
        interrupted = False
        while True:
            for msg_kind, flags, msg_seq, body in self._receive():
                if msg_seq != seq:
                    continue
                interrupted = interrupted or bool(flags & NLM_F_DUMP_INTR)
                if msg_kind == NLMSG_DONE:
                    code, message = parse_error(flags, body)
                    if code:
                        raise XfrmError(code, f"cannot dump {what}: {os.strerror(code)}", message)
                    return payloads, interrupted
                if msg_kind == NLMSG_ERROR:
                    code, message = parse_error(flags, body)
                    detail = f" (kernel: {message})" if message else ""
                    raise XfrmError(code, f"cannot dump {what}: {os.strerror(code)}{detail}", message)
                if msg_kind == kind - 2:  # GETSA -> NEWSA, GETPOLICY -> NEWPOLICY
                    payloads.append(body)

    def states(self):
        """Every SA of this namespace (``XfrmState`` with keys, unless the kernel redacts them)."""
        return [decode_state(body) for body in self._dump(XFRM_MSG_GETSA, "XFRM states")]

    def policies(self):
        """Every main-type, non-socket policy of this namespace."""
        decoded = (decode_policy(body) for body in self._dump(XFRM_MSG_GETPOLICY, "XFRM policies"))
        return [policy for policy in decoded if policy is not None]

    def add_state(self, state):
        self._request(XFRM_MSG_NEWSA, encode_state(state), "add", state)

    def delete_state(self, state):
        """Delete the SA with ``state``'s (dst, spi, proto); only those fields and src are used."""
        self._request(XFRM_MSG_DELSA, encode_state_id(state), "delete", state)

    def add_policy(self, policy):
        self._request(XFRM_MSG_NEWPOLICY, encode_policy(policy), "add", policy)

    def update_policy(self, policy):
        """Add ``policy`` or replace the one with its selector and direction, atomically."""
        self._request(XFRM_MSG_UPDPOLICY, encode_policy(policy), "update", policy)

    def delete_policy(self, policy):
        """Delete the policy with ``policy``'s selector and direction."""
        self._request(XFRM_MSG_DELPOLICY, encode_policy_id(policy), "delete", policy)
