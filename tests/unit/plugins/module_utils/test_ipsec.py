"""The IPsec planner: key lines, SPIs, per-pair keys, the states and policies of a node, and the ordered
changes (idempotence, rotation, peer removal, ownership)."""

from __future__ import annotations

import dataclasses
import hashlib
import ipaddress
import re

import pytest

from ansible_collections.clustermesh.core.plugins.module_utils.ipsec import (
    IPSEC_OVERHEAD,
    MTU_RESERVE,
    PRIORITY_BLOCK,
    PRIORITY_ENCRYPT,
    REQID,
    IpsecKeyError,
    IpsecPlanError,
    algorithm_label,
    derive_pair_key,
    diff_ipsec,
    format_key_line,
    generate_next_key,
    mtu_overhead,
    next_key_id,
    parse_key_file,
    parse_key_line,
    plan_ipsec,
    policy_kind,
    removal,
    spi,
    state_algorithms,
)
from ansible_collections.clustermesh.core.plugins.module_utils.routing_plan import VXLAN_PORT
from ansible_collections.clustermesh.core.plugins.module_utils.xfrm import (
    IPPROTO_UDP,
    Algorithm,
    Selector,
    Template,
    XfrmPolicy,
    XfrmState,
)

GCM_HEX = "0123456789abcdef0123456789abcdef" + "cafebabe"  # AES-128 + salt
GCM_HEX_256 = "a1" * 32 + "5a17" * 2
AUTH_HEX = "b2" * 32
CBC_HEX = "c3" * 16
GCM_LINE = "3 rfc4106(gcm(aes)) %s 128" % GCM_HEX
GCM_PLUS_LINE = "3+ rfc4106(gcm(aes)) %s 128" % GCM_HEX
CBC_LINE = "5 hmac(sha256) %s cbc(aes) %s" % (AUTH_HEX, CBC_HEX)

K3 = parse_key_line("3 rfc4106(gcm(aes)) %s 128" % ("33" * 20))
K4 = parse_key_line("4 rfc4106(gcm(aes)) %s 128" % ("44" * 20))
K3P = parse_key_line("3+ rfc4106(gcm(aes)) %s 96" % ("35" * 36))
K4P = parse_key_line("4+ rfc4106(gcm(aes)) %s 96" % ("45" * 36))
K5C = parse_key_line(CBC_LINE)
K5CP = parse_key_line("5+ hmac(sha256) %s cbc(aes) %s" % (AUTH_HEX, "d4" * 32))

NODES = {
    "c1-n1": {"name": "c1-n1", "cluster": "cluster1", "ip": "198.18.1.11", "pod_cidrs": ["10.1.0.0/24"]},
    "c1-n2": {"name": "c1-n2", "cluster": "cluster1", "ip": "198.18.1.12", "pod_cidrs": ["10.1.1.0/24"]},
    "c2-n1": {"name": "c2-n1", "cluster": "cluster2", "ip": "198.18.2.11", "pod_cidrs": ["10.2.0.0/24"]},
    "c2-n2": {"name": "c2-n2", "cluster": "cluster2", "ip": "198.18.2.12", "pod_cidrs": ["10.2.1.0/24", "10.2.2.0/24"]},
}
BLOCKS = ["10.1.0.0/16", "10.2.0.0/16"]


def view(name, modes=None, boot_ids=None, members=None):
    """``name``'s node dict and its peers (every other member), each with a routing mode."""
    modes = modes or {}
    boot_ids = boot_ids or {}
    members = members or list(NODES)

    def with_boot(d):
        d = dict(d)
        if d["name"] in boot_ids:
            d["boot_id"] = boot_ids[d["name"]]
        return d

    node = with_boot({k: v for k, v in NODES[name].items() if k != "cluster"})
    peers = [dict(with_boot(NODES[p]), mode=modes.get(p, modes.get("*", "direct"))) for p in members if p != name]
    return node, peers


def plan_for(name, keys=(K3,), enc=3, modes=None, boot_ids=None, members=None, node_encryption=False):
    node, peers = view(name, modes, boot_ids, members)
    return plan_ipsec(node, peers, list(keys), enc, BLOCKS, node_encryption=node_encryption)


def apply(current_states, current_policies, changes):
    """What the kernel holds after applying ``changes`` (in order; each action must be valid)."""
    states = {s.id: s for s in current_states}
    policies = {p.id: p for p in current_policies}
    for verb, obj in changes.actions:
        if verb == "add_state":
            assert obj.id not in states, "EEXIST on %s" % (obj.id,)
            states[obj.id] = obj
        elif verb == "delete_state":
            assert obj.id in states
            del states[obj.id]
        elif verb == "add_policy":
            assert obj.id not in policies
            policies[obj.id] = obj
        elif verb == "update_policy":
            assert obj.id in policies
            policies[obj.id] = obj
        elif verb == "delete_policy":
            assert obj.id in policies
            del policies[obj.id]
        else:
            raise AssertionError(verb)
    return list(states.values()), list(policies.values())


def converge(plan, states=(), policies=()):
    changes = diff_ipsec(list(states), list(policies), plan)
    return (*apply(list(states), list(policies), changes), changes)


# ------------------------------------------------------------------------------------------- keys


def test_parse_gcm_line():
    key = parse_key_line(GCM_LINE)
    assert key.key_id == 3 and not key.per_node
    assert key.aead == Algorithm("rfc4106(gcm(aes))", bytes.fromhex(GCM_HEX), 128)
    assert key.auth is None and key.crypt is None
    assert parse_key_line(GCM_PLUS_LINE).per_node


@pytest.mark.parametrize("icv", [64, 96, 128])
@pytest.mark.parametrize("hexkey", ["11" * 20, "22" * 28, "33" * 36])
def test_parse_gcm_sizes_and_icv(hexkey, icv):
    key = parse_key_line("15+ rfc4106(gcm(aes)) 0x%s %d" % (hexkey, icv))
    assert key.key_id == 15 and key.per_node
    assert key.aead.key == bytes.fromhex(hexkey) and key.aead.bits == icv


@pytest.mark.parametrize("size", [16, 24, 32])
def test_parse_cbc_line(size):
    key = parse_key_line("1 hmac(sha256) 0X%s cbc(aes) %s" % (AUTH_HEX.upper(), "ab" * size))
    assert key.aead is None
    assert key.auth == Algorithm("hmac(sha256)", bytes.fromhex(AUTH_HEX), 128)
    assert key.crypt == Algorithm("cbc(aes)", bytes.fromhex("ab" * size), 0)


BAD_LINES = [
    ("3 rfc4106(gcm(aes)) %s" % GCM_HEX, "3 fields"),
    ("3 rfc4106(gcm(aes)) %s 128 extra more" % GCM_HEX, "6 fields"),
    ("0 rfc4106(gcm(aes)) %s 128" % GCM_HEX, "key ID: expected a number 1..15"),
    ("16 rfc4106(gcm(aes)) %s 128" % GCM_HEX, "key ID: expected a number 1..15"),
    ("3- rfc4106(gcm(aes)) %s 128" % GCM_HEX, "key ID"),
    ("%s rfc4106(gcm(aes)) %s 128" % (GCM_HEX, GCM_HEX), "key ID"),
    ("3 gcm(aes) %s 128" % GCM_HEX, "algorithm: a 4-field line must name rfc4106(gcm(aes))"),
    ("3 %s rfc4106(gcm(aes)) 128" % GCM_HEX, "algorithm"),
    ("3 rfc4106(gcm(aes)) %s 128" % GCM_HEX[:-2], "expected 20/28/36 bytes"),
    ("3 rfc4106(gcm(aes)) %s 128" % (GCM_HEX + "00"), "got 42 hex digits"),
    ("3 rfc4106(gcm(aes)) %s 128" % (GCM_HEX[:-1] + "g"), "as hexadecimal digits"),
    ("3 rfc4106(gcm(aes)) %s 128" % GCM_HEX[:-1], "as hexadecimal digits"),
    ("3 rfc4106(gcm(aes)) 0x 128", "as hexadecimal digits"),
    ("3 rfc4106(gcm(aes)) %s 127" % GCM_HEX, "ICV bits: expected one of 64, 96, 128"),
    ("3 rfc4106(gcm(aes)) 128 %s" % GCM_HEX, "rfc4106(gcm(aes)) key"),
    ("3 hmac(sha1) %s cbc(aes) %s" % (AUTH_HEX, CBC_HEX), "algorithm: a 5-field line must name hmac(sha256) then"),
    ("3 hmac(sha256) %s cbc(des) %s" % (AUTH_HEX, CBC_HEX), "algorithm: a 5-field line"),
    ("3 hmac(sha256) %s cbc(aes) %s" % (AUTH_HEX[:-2], CBC_HEX), "hmac(sha256) key: expected 32 bytes"),
    ("3 hmac(sha256) %s cbc(aes) %s" % (AUTH_HEX, CBC_HEX + "00"), "cbc(aes) key: expected 16/24/32 bytes"),
    ("3 hmac(sha256) %s cbc(aes) %s" % (AUTH_HEX, "zz" * 16), "cbc(aes) key: expected"),
]


def _hex_fragments(text):
    """Every hex run of 8+ digits in ``text`` (the key material of the test lines)."""
    return {m.lower() for m in re.findall(r"[0-9a-fA-F]{8,}", text)}


@pytest.mark.parametrize("line,expected", BAD_LINES)
def test_bad_key_lines_name_line_and_field_never_key(line, expected):
    with pytest.raises(IpsecKeyError) as info:
        parse_key_line(line, lineno=7)
    message = str(info.value)
    assert message.startswith("key line 7: ")
    assert expected in message
    for fragment in _hex_fragments(line):
        assert fragment not in message.lower()
        # not even a chunk of it
        for i in range(0, len(fragment) - 7):
            assert fragment[i : i + 8] not in message.lower()


def test_key_error_is_value_error():
    assert issubclass(IpsecKeyError, ValueError) and issubclass(IpsecPlanError, ValueError)


def test_repr_and_str_never_show_key_bytes():
    for key in (parse_key_line(GCM_LINE), parse_key_line(CBC_LINE), K3P):
        text = repr(key) + str(key) + repr([key]) + repr(key.aead) + repr(key.auth) + repr(key.crypt)
        for material in (GCM_HEX, AUTH_HEX, CBC_HEX, "35" * 8):
            assert material not in text
        assert "key_id=%d" % key.key_id in repr(key)
    assert (
        repr(parse_key_line(GCM_PLUS_LINE))
        == "IpsecKey(key_id=3, per_node=True, algorithm='rfc4106(gcm(aes))', icv=128)"
    )


def test_parse_key_file():
    text = "# rotation window\n\n  3 rfc4106(gcm(aes)) %s 128\n   # next\n4+ rfc4106(gcm(aes)) %s 64\n" % (
        "33" * 20,
        "44" * 28,
    )
    keys = parse_key_file(text)
    assert [(k.key_id, k.per_node, k.aead.bits, len(k.aead.key)) for k in keys] == [
        (3, False, 128, 20),
        (4, True, 64, 28),
    ]


def test_parse_key_file_errors_name_line_number():
    with pytest.raises(IpsecKeyError, match=r"key line 3: key ID: 3 is also the ID of line 1"):
        parse_key_file("%s\n\n%s\n" % (GCM_LINE, GCM_PLUS_LINE))
    with pytest.raises(IpsecKeyError, match=r"key line 4: at most 2 keys"):
        parse_key_file("%s\n#\n%s\n%s\n" % (GCM_LINE, CBC_LINE, format_key_line(K4)))
    with pytest.raises(IpsecKeyError, match=r"key line 2: ICV bits"):
        parse_key_file("# c\n3 rfc4106(gcm(aes)) %s 100\n" % GCM_HEX)
    with pytest.raises(IpsecKeyError, match=r"key file: no key line"):
        parse_key_file("# only a comment\n\n")
    for text in ("%s\n%s\n" % (GCM_LINE, GCM_PLUS_LINE), "x\n3 rfc4106(gcm(aes)) %s 1\n" % GCM_HEX):
        with pytest.raises(IpsecKeyError) as info:
            parse_key_file(text)
        assert GCM_HEX not in str(info.value) and GCM_HEX[:8] not in str(info.value)


def test_next_key_id_wraps():
    assert [next_key_id(i) for i in range(1, 16)] == list(range(2, 16)) + [1]
    for bad in (0, 16, -1):
        with pytest.raises(ValueError):
            next_key_id(bad)


@pytest.mark.parametrize("line", [GCM_LINE, GCM_PLUS_LINE, CBC_LINE, format_key_line(K5CP), format_key_line(K3P)])
def test_format_parse_round_trip(line):
    key = parse_key_line(line)
    assert parse_key_line(format_key_line(key)) == key
    assert format_key_line(key) == line


def test_generate_next_key_keeps_shape_with_fresh_bytes():
    calls = []

    def fake_random(n):
        calls.append(n)
        return bytes([len(calls)]) * n

    key = generate_next_key(K3P, fake_random)
    assert key.key_id == 4 and key.per_node and key.aead.bits == 96 and key.aead.name == K3P.aead.name
    assert key.aead.key == b"\x01" * 36 and calls == [36]
    assert parse_key_line(format_key_line(key)) == key

    calls.clear()
    wrapped = generate_next_key(parse_key_line("15 " + CBC_LINE.split(" ", 1)[1]), fake_random)
    assert wrapped.key_id == 1 and not wrapped.per_node
    assert calls == [32, 16] and wrapped.auth.key == b"\x01" * 32 and wrapped.crypt.key == b"\x02" * 16
    assert wrapped.auth.bits == 128

    real = generate_next_key(K3)
    assert real.key_id == 4 and len(real.aead.key) == 20 and real.aead.key != K3.aead.key


def test_mtu_overhead():
    assert mtu_overhead(parse_key_line(GCM_LINE)) == 20 + 8 + 8 + 2 + 3 + 16
    assert mtu_overhead(K3P) == 20 + 8 + 8 + 2 + 3 + 12
    assert mtu_overhead(K5C) == 20 + 8 + 16 + 2 + 15 + 16
    assert set(IPSEC_OVERHEAD) == {"rfc4106(gcm(aes))", "cbc(aes)"}
    # the pod MTU reserve fits every key a rotation may move to
    assert MTU_RESERVE == 77 and all(mtu_overhead(k) <= MTU_RESERVE for k in (K3, K3P, K5C, K5CP))


def test_algorithm_label():
    assert algorithm_label(K3) == "rfc4106(gcm(aes))" and algorithm_label(K5C) == "hmac(sha256)+cbc(aes)"


# --------------------------------------------------------------------------------- SPI and keys


def test_spi_layout():
    assert spi(3, "198.18.0.3") == 0x30120003
    assert spi(15, "10.255.254.253") == 0xF0FFFEFD
    assert spi(1, ipaddress.IPv4Address("198.18.0.2")) == 0x10120002
    with pytest.raises(ValueError):
        spi(0, "198.18.0.3")
    with pytest.raises(ValueError):
        spi(16, "198.18.0.3")


def test_derive_pair_key_definition():
    key = bytes(range(36))
    prefix = key + bytes([198, 18, 0, 2]) + bytes([198, 18, 0, 3]) + b"boot-a" + b"boot-b"
    expected = (hashlib.sha256(prefix + b"\x00").digest() + hashlib.sha256(prefix + b"\x01").digest())[:36]
    assert derive_pair_key(key, "198.18.0.2", "198.18.0.3", "boot-a", "boot-b") == expected
    assert len(derive_pair_key(key[:20], "198.18.0.2", "198.18.0.3")) == 20
    assert len(derive_pair_key(bytes(64), "198.18.0.2", "198.18.0.3")) == 64
    # direction and boot IDs matter
    assert derive_pair_key(key, "198.18.0.2", "198.18.0.3") != derive_pair_key(key, "198.18.0.3", "198.18.0.2")
    assert derive_pair_key(key, "198.18.0.2", "198.18.0.3") != derive_pair_key(key, "198.18.0.2", "198.18.0.3", "x")


def test_state_algorithms_shared_and_per_node():
    assert state_algorithms(K3, "198.18.0.2", "198.18.0.3") == {"aead": K3.aead}
    derived = state_algorithms(K3P, "198.18.0.2", "198.18.0.3", "a", "b")["aead"]
    assert derived.name == K3P.aead.name and derived.bits == 96
    assert derived.key == derive_pair_key(K3P.aead.key, "198.18.0.2", "198.18.0.3", "a", "b")
    cbc = state_algorithms(K5CP, "198.18.0.2", "198.18.0.3")
    assert set(cbc) == {"auth", "crypt"}
    assert cbc["auth"].key == derive_pair_key(K5CP.auth.key, "198.18.0.2", "198.18.0.3")
    assert cbc["crypt"].key == derive_pair_key(K5CP.crypt.key, "198.18.0.2", "198.18.0.3")
    assert len(cbc["crypt"].key) == 32 and cbc["auth"].bits == 128
    assert state_algorithms(K5C, "1.1.1.1", "2.2.2.2") == {"auth": K5C.auth, "crypt": K5C.crypt}


# ---------------------------------------------------------------------------------------- planning


@pytest.mark.parametrize(
    "keys", [(K3,), (K3P,), (K5C,), (K5CP,), (K3P, K4)], ids=["shared", "pernode", "cbc", "cbc+", "mix"]
)
@pytest.mark.parametrize("mode", ["direct", "tunnel", "external", "hybrid"])
@pytest.mark.parametrize("boot", [False, True])
def test_out_state_of_a_equals_in_state_of_b(keys, mode, boot):
    """The core property: what A sends with is exactly what B receives with, for every pair and key."""

    # hybrid: c2-n2 is on another segment, so every pair with it is tunnelled (both ends agree)
    def modes(n):
        if mode != "hybrid":
            return {"*": mode}
        return {"*": "tunnel"} if n == "c2-n2" else {"*": "direct", "c2-n2": "tunnel"}

    boot_ids = {n: "b00t-%s" % n for n in NODES} if boot else {}
    enc = keys[0].key_id
    plans = {n: plan_for(n, keys, enc, modes=modes(n), boot_ids=boot_ids) for n in NODES}
    for a in NODES:
        for b in NODES:
            if a == b:
                continue
            ip_a, ip_b = NODES[a]["ip"], NODES[b]["ip"]
            out_a = [s for s in plans[a].states if s.src == ip_a and s.dst == ip_b]
            in_b = [s for s in plans[b].states if s.src == ip_a and s.dst == ip_b]
            assert out_a == in_b and len(out_a) == len(keys)
            assert {s.spi for s in out_a} == {spi(k.key_id, ip_a) for k in keys}
            # A's encrypt template names an SA that B holds
            spis = {t.spi for p in plans[a].policies for t in p.templates if t.dst == ip_b}
            assert spis == {spi(enc, ip_a)}
            assert spis <= {s.spi for s in in_b}
    if any(k.per_node for k in keys):
        ab = [s for s in plans["c1-n1"].states if s.dst == NODES["c1-n2"]["ip"] and s.spi >> 28 == keys[0].key_id]
        ba = [s for s in plans["c1-n1"].states if s.src == NODES["c1-n2"]["ip"] and s.spi >> 28 == keys[0].key_id]
        assert (ab[0].aead, ab[0].auth, ab[0].crypt) != (ba[0].aead, ba[0].auth, ba[0].crypt)


def test_direct_plan_policies():
    plan = plan_for("c1-n1", modes={"*": "direct"})
    n1 = "198.18.1.11"
    tmpl_to = {
        ip: Template(src=n1, dst=ip, reqid=REQID, spi=spi(3, n1))
        for ip in ("198.18.1.12", "198.18.2.11", "198.18.2.12")
    }
    optional = Template(src="0.0.0.0", dst="0.0.0.0", reqid=REQID, optional=True)

    def out_enc(dst, ip):
        return XfrmPolicy(Selector(dst=dst), "out", PRIORITY_ENCRYPT, "allow", (tmpl_to[ip],))

    expected = [
        XfrmPolicy(Selector(dst="10.1.0.0/16"), "out", PRIORITY_BLOCK, "block"),
        XfrmPolicy(Selector(dst="10.1.0.0/24"), "out", PRIORITY_ENCRYPT, "allow"),
        out_enc("10.1.1.0/24", "198.18.1.12"),
        XfrmPolicy(Selector(dst="10.2.0.0/16"), "out", PRIORITY_BLOCK, "block"),
        out_enc("10.2.0.0/24", "198.18.2.11"),
        out_enc("10.2.1.0/24", "198.18.2.12"),
        out_enc("10.2.2.0/24", "198.18.2.12"),
        XfrmPolicy(Selector(dst="198.18.1.11/32"), "in", PRIORITY_ENCRYPT, "allow", (optional,)),
        XfrmPolicy(Selector(dst="10.1.0.0/24"), "fwd", PRIORITY_ENCRYPT, "allow", (optional,)),
    ]
    assert plan.policies == expected
    assert plan.peer_modes == {"c1-n2": "direct", "c2-n1": "direct", "c2-n2": "direct"}
    # 3 peers x 1 key x 2 directions, all ours, ESP tunnel mode
    assert len(plan.states) == 6
    assert all(s.reqid == REQID and s.mode == "tunnel" and s.proto == 50 for s in plan.states)
    assert {(s.src, s.dst) for s in plan.states} == {(n1, p) for p in tmpl_to} | {(p, n1) for p in tmpl_to}
    assert plan.warnings == [] and plan.counts() == {"states": 6, "policies": 9}
    assert plan.mtu_overhead == mtu_overhead(K3)


def test_tunnel_plan_encrypts_vxlan_and_lets_inner_packets_pass_the_block():
    plan = plan_for("c1-n1", modes={"*": "tunnel"})
    n1 = "198.18.1.11"
    by_kind = {}
    for p in plan.policies:
        by_kind.setdefault(policy_kind(p), []).append(p)
    vxlan = [p.selector for p in by_kind["encrypt"]]
    assert vxlan == [
        Selector(src=n1 + "/32", dst=ip + "/32", proto=IPPROTO_UDP, dport=VXLAN_PORT)
        for ip in ("198.18.1.12", "198.18.2.11", "198.18.2.12")
    ]
    assert [p.templates[0].spi for p in by_kind["encrypt"]] == [spi(3, n1)] * 3
    # inner packets to tunnel peers' pods go into cm_vxlan: allowed (the VXLAN packet is what is encrypted)
    assert {p.selector.dst for p in by_kind["allow"]} == {
        "10.1.0.0/24",
        "10.1.1.0/24",
        "10.2.0.0/24",
        "10.2.1.0/24",
        "10.2.2.0/24",
    }
    assert {(p.selector.src, p.selector.dst, p.selector.proto, p.selector.dport) for p in by_kind["block"]} == {
        ("0.0.0.0/0", "10.1.0.0/16", 0, 0),
        ("0.0.0.0/0", "10.2.0.0/16", 0, 0),
        (n1 + "/32", "0.0.0.0/0", IPPROTO_UDP, VXLAN_PORT),
    }
    assert all(p.priority == PRIORITY_BLOCK for p in by_kind["block"])
    assert len(by_kind["inbound"]) == 2
    assert plan.peer_modes == {"c1-n2": "tunnel", "c2-n1": "tunnel", "c2-n2": "tunnel"}


def test_hybrid_plan_mixes_and_external_is_direct():
    plan = plan_for("c1-n1", modes={"c1-n2": "direct", "c2-n1": "external", "c2-n2": "tunnel"})
    assert plan.peer_modes == {"c1-n2": "direct", "c2-n1": "direct", "c2-n2": "tunnel"}
    enc = {(p.selector.dst, p.selector.proto) for p in plan.policies if policy_kind(p) == "encrypt"}
    assert enc == {("10.1.1.0/24", 0), ("10.2.0.0/24", 0), ("198.18.2.12/32", IPPROTO_UDP)}
    assert any(p.selector.dport == VXLAN_PORT and p.action == "block" for p in plan.policies)
    direct_only = plan_for("c1-n1", modes={"*": "direct"})
    assert not any(p.selector.dport == VXLAN_PORT for p in direct_only.policies)


def test_node_encryption_replaces_vxlan_policy():
    plan = plan_for("c1-n1", modes={"c1-n2": "direct", "c2-n1": "tunnel", "c2-n2": "tunnel"}, node_encryption=True)
    n1 = "198.18.1.11"
    enc = {(p.selector.src, p.selector.dst, p.selector.proto) for p in plan.policies if policy_kind(p) == "encrypt"}
    assert enc == {
        ("0.0.0.0/0", "10.1.1.0/24", 0),
        (n1 + "/32", "198.18.1.12/32", 0),
        (n1 + "/32", "198.18.2.11/32", 0),
        (n1 + "/32", "198.18.2.12/32", 0),
    }
    # the VXLAN block stays: no tunnel packet leaves without its peer's encrypt policy
    assert any(p.selector.dport == VXLAN_PORT and p.action == "block" for p in plan.policies)
    assert len(plan.states) == len(plan_for("c1-n1").states)


def test_plan_is_deterministic_whatever_the_input_order():
    node, peers = view("c2-n2", {"*": "direct"})
    a = plan_ipsec(node, peers, [K3, K4], 4, BLOCKS)
    b = plan_ipsec(node, list(reversed(peers)), [K4, K3], 4, list(reversed(BLOCKS)))
    assert a == b
    assert [s.spi >> 28 for s in a.states if s.src == "198.18.1.11"] == [3, 4]


def test_every_key_gets_states_but_only_the_encrypt_key_is_used():
    plan = plan_for("c1-n1", keys=(K3, K4), enc=4)
    assert sorted({s.spi >> 28 for s in plan.states}) == [3, 4] and len(plan.states) == 12
    assert {t.spi >> 28 for p in plan.policies for t in p.templates if t.spi} == {4}


def test_block_cidr_equal_to_a_pod_cidr_is_left_to_that_policy():
    node, peers = view("c1-n1", {"*": "direct"})
    plan = plan_ipsec(node, peers, [K3], 3, BLOCKS + ["10.2.0.0/24", "10.1.0.0/24"])
    assert len(plan.warnings) == 2 and "10.2.0.0/24" in plan.warnings[0] + plan.warnings[1]
    assert len({p.id for p in plan.policies}) == len(plan.policies)
    assert policy_kind(next(p for p in plan.policies if p.selector.dst == "10.2.0.0/24")) == "encrypt"


def test_spi_collision_names_both_nodes():
    node = {"name": "a", "ip": "198.18.0.2", "pod_cidrs": ["10.1.0.0/24"]}
    peers = [
        {"name": "b", "cluster": "x", "ip": "199.18.0.2", "pod_cidrs": ["10.2.0.0/24"], "mode": "direct"},
        {"name": "c", "cluster": "x", "ip": "198.18.0.3", "pod_cidrs": ["10.3.0.0/24"], "mode": "direct"},
        {"name": "d", "cluster": "x", "ip": "197.18.0.3", "pod_cidrs": ["10.4.0.0/24"], "mode": "tunnel"},
    ]
    with pytest.raises(IpsecPlanError) as info:
        plan_ipsec(node, peers, [K3], 3, BLOCKS)
    problems = info.value.problems
    assert len(problems) == 2
    assert problems[0].startswith(
        "SPI collision: nodes a (198.18.0.2) and b (199.18.0.2) share the low 24 bits of their IP"
    )
    # between two peers too: both send to this node
    assert "nodes c (198.18.0.3) and d (197.18.0.3)" in problems[1]


def test_plan_validation_lists_every_problem():
    node = {"name": "a", "ip": "fd00::1", "pod_cidrs": ["10.1.0.0/24", "fd10::/64"]}
    peers = [
        {"name": "b", "cluster": "x", "ip": "198.18.0.3", "pod_cidrs": [], "mode": "direct"},
        {"name": "c", "cluster": "x", "ip": "198.18.0.3", "pod_cidrs": ["10.2.0.0/24"], "mode": "vpn"},
        {"name": "d", "cluster": "x", "ip": "nope", "pod_cidrs": ["10.1.0.0/25", "bad"], "mode": "tunnel"},
    ]
    with pytest.raises(IpsecPlanError) as info:
        plan_ipsec(node, peers, [K3], 4, ["10.0.0.0/8", "fd00::/8"], node_encryption="yes")
    text = "\n".join(info.value.problems)
    for fragment in (
        "node a: ip: 'fd00::1' is not an IPv4 address (IPsec covers IPv4 only)",
        "node a: pod_cidrs: fd10::/64 is IPv6",
        "peer b: pod_cidrs: empty, but mode direct encrypts traffic",
        "peer c: mode 'vpn' is not one of direct, tunnel, external",
        "peer c: ip 198.18.0.3 is also the IP of node b",
        "peer d: ip: 'nope' is not an IPv4 address",
        "peer d: pod_cidrs: 'bad' is not a CIDR",
        "peer d: pod CIDR 10.1.0.0/25 overlaps 10.1.0.0/24 of node a",
        "block_cidrs: fd00::/8 is IPv6",
        "encrypt_key_id: key 4 is not one of the keys (key IDs: 3)",
        "node_encryption: 'yes' is not a boolean",
    ):
        assert fragment in text
    assert str(info.value) == "; ".join(info.value.problems)


def test_plan_key_problems():
    node, peers = view("c1-n1")
    with pytest.raises(IpsecPlanError, match="keys: no IPsec key"):
        plan_ipsec(node, peers, [], 3, BLOCKS)
    with pytest.raises(IpsecPlanError, match="keys: key ID 3 given twice"):
        plan_ipsec(node, peers, [K3, K3P], 3, BLOCKS)
    with pytest.raises(IpsecPlanError, match="keys: str is not an IpsecKey"):
        plan_ipsec(node, peers, [K3, GCM_LINE], 3, BLOCKS)


def test_tunnel_peer_without_pod_cidrs_is_fine():
    node, _peers = view("c1-n1")
    peer = {"name": "t", "cluster": "x", "ip": "198.18.9.9", "pod_cidrs": [], "mode": "tunnel"}
    plan = plan_ipsec(node, [peer], [K3], 3, BLOCKS)
    assert len(plan.states) == 2


# ------------------------------------------------------------------------------------------- diff


def test_first_apply_order_and_idempotence():
    plan = plan_for("c1-n1", modes={"c1-n2": "direct", "c2-n1": "tunnel", "c2-n2": "direct"})
    states, policies, changes = converge(plan)
    verbs = [(v, policy_kind(o) if v.endswith("policy") else "state") for v, o in changes.actions]
    phases = [
        ("add_policy", "allow"),
        ("add_policy", "block"),
        ("add_state", "state"),
        ("add_policy", "inbound"),
        ("add_policy", "encrypt"),
    ]
    assert [phases.index(v) for v in verbs] == sorted(phases.index(v) for v in verbs)
    assert set(verbs) == set(phases)
    assert sorted(states, key=lambda s: (s.dst, s.spi)) == sorted(plan.states, key=lambda s: (s.dst, s.spi))
    assert sorted(map(repr, policies)) == sorted(map(repr, plan.policies))
    assert changes.summary() == {
        "add_state": 6,
        "delete_state": 0,
        "add_policy": len(plan.policies),
        "update_policy": 0,
        "delete_policy": 0,
    }
    again = diff_ipsec(states, policies, plan)
    assert again.actions == [] and not again.changed and again.rekeyed == [] and again.conflicts == []
    assert diff_ipsec(plan.states, plan.policies, plan).actions == []


def _verbs(changes):
    return [(v, policy_kind(o) if v.endswith("policy") else o.spi >> 28) for v, o in changes.actions]


@pytest.mark.parametrize("k_old,k_new", [(K3, K4), (K3P, K4P)], ids=["shared", "pernode"])
def test_rotation_sequence(k_old, k_new):
    boot = {n: "boot-" + n for n in NODES}
    states, policies, _changes = converge(plan_for("c2-n1", [k_old], 3, boot_ids=boot, modes={"c1-n1": "tunnel"}))

    # 1. key file [old, new], encrypt old: only the new key's states are added
    step = plan_for("c2-n1", [k_old, k_new], 3, boot_ids=boot, modes={"c1-n1": "tunnel"})
    states, policies, changes = converge(step, states, policies)
    assert set(_verbs(changes)) == {("add_state", 4)} and len(changes.actions) == 6

    # 2. encrypt new: only the out encrypt policies change (UPDPOLICY, atomic switch of the SPI)
    step = plan_for("c2-n1", [k_old, k_new], 4, boot_ids=boot, modes={"c1-n1": "tunnel"})
    states, policies, changes = converge(step, states, policies)
    assert set(_verbs(changes)) == {("update_policy", "encrypt")}
    assert len(changes.actions) == 4  # 10.1.1.0/24, 10.2.1.0/24, 10.2.2.0/24 and the VXLAN one of c1-n1
    assert all(o.templates[0].spi >> 28 == 4 for _v, o in changes.actions)

    # 3. key file [new]: only the old key's states go
    step = plan_for("c2-n1", [k_new], 4, boot_ids=boot, modes={"c1-n1": "tunnel"})
    states, policies, changes = converge(step, states, policies)
    assert set(_verbs(changes)) == {("delete_state", 3)} and len(changes.actions) == 6
    assert {s.spi >> 28 for s in states} == {4}
    assert diff_ipsec(states, policies, step).actions == []


def test_peer_removal_removes_its_states_and_policies_in_order():
    states, policies, _changes = converge(plan_for("c1-n1", [K3, K4], 4, modes={"c2-n2": "tunnel"}))
    smaller = plan_for("c1-n1", [K3, K4], 4, modes={"c2-n2": "tunnel"}, members=["c1-n1", "c1-n2", "c2-n1"])
    states2, policies2, changes = converge(smaller, states, policies)
    gone = "198.18.2.12"
    deleted_states = [o for v, o in changes.actions if v == "delete_state"]
    assert len(deleted_states) == 4 and all(gone in (s.src, s.dst) for s in deleted_states)
    deleted_policies = [o for v, o in changes.actions if v == "delete_policy"]
    # the VXLAN encrypt policy, the pod CIDR allows of the tunnel peer, and the VXLAN block (no tunnel peer left)
    assert {(policy_kind(p), p.selector.dst) for p in deleted_policies} == {
        ("encrypt", gone + "/32"),
        ("allow", "10.2.1.0/24"),
        ("allow", "10.2.2.0/24"),
        ("block", "0.0.0.0/0"),
    }
    assert [v for v, _obj in changes.actions] == ["delete_policy"] + ["delete_state"] * 4 + ["delete_policy"] * 3
    kinds = [policy_kind(o) for v, o in changes.actions if v == "delete_policy"]
    assert kinds == ["encrypt", "block", "allow", "allow"]
    assert not any(gone in (s.src, s.dst) for s in states2)
    assert diff_ipsec(states2, policies2, smaller).actions == []


def test_foreign_states_and_policies_are_never_touched():
    plan = plan_for("c1-n1")
    foreign_state = XfrmState(
        "198.18.1.11", "192.0.2.1", 0x1234, 7, aead=Algorithm("rfc4106(gcm(aes))", b"\x00" * 20, 128)
    )
    foreign_policy = XfrmPolicy(
        Selector(dst="192.0.2.0/24"), "out", 100, "allow", (Template("198.18.1.11", "192.0.2.1", 7),)
    )
    foreign_block = XfrmPolicy(Selector(dst="10.9.0.0/16"), "out", PRIORITY_BLOCK + 1, "block")
    states, policies, changes = converge(plan, [foreign_state], [foreign_policy, foreign_block])
    assert foreign_state in states and foreign_policy in policies and foreign_block in policies
    assert all(obj not in (foreign_state, foreign_policy, foreign_block) for _v, obj in changes.actions)
    assert diff_ipsec(states, policies, plan).actions == []
    gone = removal(states, policies)
    left_states, left_policies = apply(states, policies, gone)
    assert left_states == [foreign_state] and sorted(map(repr, left_policies)) == sorted(
        map(repr, [foreign_policy, foreign_block])
    )


def test_foreign_objects_on_our_ids_are_reported_as_conflicts():
    plan = plan_for("c1-n1")
    theirs = dataclasses.replace(plan.states[0], reqid=1)
    their_policy = dataclasses.replace(plan.policies[0], priority=10)
    changes = diff_ipsec([theirs], [their_policy], plan)
    assert len(changes.conflicts) == 2
    assert "not made by us" in changes.conflicts[0] and "spi 0x" in changes.conflicts[0]
    assert "33" * 4 not in " ".join(changes.conflicts)


def test_changed_key_bytes_for_same_id_is_flagged_and_replaced():
    states, policies, _changes = converge(plan_for("c1-n1", [K3]))
    other = parse_key_line("3 rfc4106(gcm(aes)) %s 128" % ("99" * 20))
    plan = plan_for("c1-n1", [other])
    changes = diff_ipsec(states, policies, plan)
    assert changes.rekeyed == [3]
    assert changes.rekey_problems() == [
        "key 3 changed its bytes without a new key ID: rotate with playbooks/rotate_ipsec_key.yml"
    ]
    assert len(changes.replaced) == 6
    assert [v for v, _obj in changes.actions] == ["delete_state", "add_state"] * 6
    for i in range(0, 12, 2):
        assert changes.actions[i][1].id == changes.actions[i + 1][1].id
    assert "99" * 4 not in "\n".join(changes.describe()) and "33" * 4 not in "\n".join(changes.describe())


def test_reboot_with_per_node_keys_replaces_without_rekey_flag():
    boot = {n: "boot-" + n for n in NODES}
    states, policies, _changes = converge(plan_for("c1-n1", [K3P], boot_ids=boot))
    boot["c1-n2"] = "rebooted"
    plan = plan_for("c1-n1", [K3P], boot_ids=boot)
    changes = diff_ipsec(states, policies, plan)
    assert changes.rekeyed == [] and len(changes.replaced) == 2  # both directions with c1-n2
    assert {v for v, _obj in changes.actions} == {"delete_state", "add_state"}
    # without boot IDs the derived key only changes when the shared key does: flagged
    states, policies, _changes = converge(plan_for("c1-n1", [K3P]))
    other = parse_key_line("3+ rfc4106(gcm(aes)) %s 96" % ("77" * 36))
    assert diff_ipsec(states, policies, plan_for("c1-n1", [other])).rekeyed == [3]


def test_changed_policy_is_updated_in_place():
    states, policies, _changes = converge(plan_for("c1-n1", modes={"*": "direct"}))
    plan = plan_for("c1-n1", modes={"*": "direct", "c1-n2": "tunnel"})
    changes = diff_ipsec(states, policies, plan)
    # 10.1.1.0/24 turns from an encrypt into an allow policy (same selector): one update, no gap
    assert ("update_policy", next(p for p in plan.policies if p.selector.dst == "10.1.1.0/24")) in changes.actions
    assert not any(v == "delete_policy" and o.selector.dst == "10.1.1.0/24" for v, o in changes.actions)


def test_describe_lines():
    plan = plan_for("c1-n1", modes={"c2-n1": "tunnel"})
    changes = diff_ipsec([], [], plan)
    lines = changes.describe()
    assert "+ state 198.18.1.11 -> 198.18.1.12 spi 0x3012010b rfc4106(gcm(aes))" in lines
    assert (
        "+ policy out 198.18.1.11/32 -> 198.18.2.11/32 proto udp dport 8472 encrypt 198.18.1.11 -> 198.18.2.11 "
        "spi 0x3012010b" in lines
    )
    assert "+ policy out 0.0.0.0/0 -> 10.1.0.0/16 block" in lines
    assert "+ policy in 0.0.0.0/0 -> 198.18.1.11/32 inbound 0.0.0.0 -> 0.0.0.0 optional" in lines
    assert len(lines) == len(changes.actions)
    text = "\n".join(lines)
    assert "33" * 4 not in text
    cbc = diff_ipsec([], [], plan_for("c1-n1", [K5CP], 5))
    assert "+ state 198.18.1.11 -> 198.18.1.12 spi 0x5012010b hmac(sha256)+cbc(aes)" in cbc.describe()
    gone = removal(plan.states, plan.policies).describe()
    assert gone[0].startswith("- policy out") and all(line.startswith("- ") for line in gone)


def test_removal_order():
    plan = plan_for("c1-n1", [K3, K4], 3, modes={"c2-n1": "tunnel"})
    changes = removal(plan.states, plan.policies)
    kinds = [policy_kind(o) if v == "delete_policy" else "state" for v, o in changes.actions]
    order = ["encrypt", "inbound", "state", "block", "allow"]
    assert kinds == sorted(kinds, key=order.index)
    assert set(kinds) == set(order)
    assert changes.summary()["delete_state"] == 12 and changes.summary()["delete_policy"] == len(plan.policies)
    assert apply(plan.states, plan.policies, changes) == ([], [])
    assert removal([], []).actions == [] and not removal([], []).changed
