# -*- coding: utf-8 -*-
# Copyright: clustermesh.core contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""XFRM (IPsec) states and policies: value types and a small netlink codec (NETLINK_XFRM).

pyroute2 has no XFRM state/policy API; this file speaks the kernel's xfrm_user messages with
``struct`` over a raw netlink socket (ADR 011): no ``ip`` process, so key material never reaches a
command line, and one socket serves dumps and changes with typed errors.

Only what the mesh uses is covered: IPv4, ESP in tunnel mode, AEAD or auth+cipher algorithms,
policies with a selector, a priority, allow/block and templates. Key bytes are never part of a
value's ``repr``.
"""

from __future__ import annotations

from dataclasses import dataclass, field

DIRECTIONS = ("in", "out", "fwd")
ACTIONS = ("allow", "block")
IPPROTO_ESP = 50
IPPROTO_UDP = 17


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

    @property
    def id(self):
        """What the kernel keys an SA by (and what deleting one needs)."""
        return (self.dst, self.spi, self.proto)


@dataclass(frozen=True)
class Selector:
    """Which packets a policy matches: IPv4 CIDRs, protocol (0 = any) and destination port (0 = any)."""

    src: str = "0.0.0.0/0"
    dst: str = "0.0.0.0/0"
    proto: int = 0
    dport: int = 0


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


@dataclass(frozen=True)
class XfrmPolicy:
    selector: Selector
    direction: str  # in | out | fwd
    priority: int
    action: str = "allow"  # allow | block
    templates: tuple[Template, ...] = ()

    @property
    def id(self):
        """What the kernel keys a policy by (its priority is not part of it)."""
        return (self.selector, self.direction)
