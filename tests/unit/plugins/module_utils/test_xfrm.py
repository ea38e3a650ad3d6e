# -*- coding: utf-8 -*-
# Copyright: clustermesh.core contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""xfrm: the NETLINK_XFRM codec against the kernel's uapi layouts, without a kernel (a fake socket)."""

from __future__ import annotations

import errno
import os
import shutil
import socket
import struct
import subprocess

import pytest

from ansible_collections.clustermesh.core.plugins.module_utils import xfrm as x

REQID = 0x636D
AEAD_KEY = bytes(range(1, 21))
AUTH_KEY = bytes(range(100, 132))
CRYPT_KEY = bytes(range(200, 216))

AEAD_STATE = x.XfrmState(
    "198.18.250.1", "198.18.250.2", 0x1000_0002, REQID, aead=x.Algorithm("rfc4106(gcm(aes))", AEAD_KEY, 128)
)
CBC_STATE = x.XfrmState(
    "198.18.250.2",
    "198.18.250.1",
    0x2000_0001,
    REQID,
    auth=x.Algorithm("hmac(sha256)", AUTH_KEY, 128),
    crypt=x.Algorithm("cbc(aes)", CRYPT_KEY),
)
OUT_POLICY = x.XfrmPolicy(
    x.Selector("0.0.0.0/0", "10.2.0.0/16"),
    "out",
    100,
    templates=(x.Template("198.18.250.1", "198.18.250.2", REQID, spi=0x1000_0002),),
)
IN_POLICY = x.XfrmPolicy(
    x.Selector(dst="198.18.250.1/32"), "in", 100, templates=(x.Template("0.0.0.0", "0.0.0.0", REQID, optional=True),)
)
BLOCK_POLICY = x.XfrmPolicy(x.Selector("198.18.250.1/32", "0.0.0.0/0", x.IPPROTO_UDP, 8472), "out", 200, "block")

# sizeof() on x86_64 of the uapi structs (include/uapi/linux/xfrm.h), worked out from the header:
# selector 16+16+4*2+2+3*1 (+3 pad) +4+4; usersa_info 56 + id 24 + 16 + 64 + 32 + 12 + 4+4+2+1+1+1 = 217 -> 224
# (8-aligned by __u64); userpolicy_info 56+64+32+4+4+4*1 = 164 -> 168; user_tmpl 24+2(+2)+16+4+3(+1)+12 = 64.
EXPECTED_SIZES = {
    "xfrm_selector": 56,
    "xfrm_usersa_info": 224,
    "xfrm_usersa_id": 24,
    "xfrm_userpolicy_info": 168,
    "xfrm_userpolicy_id": 64,
    "xfrm_user_tmpl": 64,
    "xfrm_userpolicy_type": 6,
    "xfrm_algo": 68,
    "xfrm_algo_auth": 72,
    "xfrm_algo_aead": 72,
    "xfrm_lifetime_cfg": 64,
    "xfrm_lifetime_cur": 32,
    "xfrm_stats": 12,
}


def test_struct_sizes_match_the_kernel_header():
    assert x.STRUCT_SIZES == EXPECTED_SIZES


@pytest.mark.skipif(
    not (shutil.which("gcc") and os.path.exists("/usr/include/linux/xfrm.h")), reason="no gcc or linux headers"
)
def test_struct_sizes_match_the_c_compiler(tmp_path):
    source = tmp_path / "sizes.c"
    source.write_text(
        "#include <stdio.h>\n#include <linux/xfrm.h>\nint main(void) {\n"
        + "".join(f'printf("{name} %zu\\n", sizeof(struct {name}));\n' for name in EXPECTED_SIZES)
        + "return 0; }\n"
    )
    binary = tmp_path / "sizes"
    subprocess.run(["gcc", "-o", str(binary), str(source)], check=True)
    output = subprocess.run([str(binary)], check=True, capture_output=True, text=True).stdout
    compiled = {name: int(size) for name, size in (line.split() for line in output.splitlines())}
    assert compiled == x.STRUCT_SIZES


def test_selector_bytes_follow_the_kernel_layout():
    raw = x.encode_selector(BLOCK_POLICY.selector)
    assert len(raw) == 56
    assert raw[0:16] == bytes(16)  # daddr 0.0.0.0
    assert raw[16:20] == bytes([198, 18, 250, 1]) and raw[20:32] == bytes(12)  # saddr
    assert raw[32:34] == (8472).to_bytes(2, "big")  # dport, network order
    assert raw[34:36] == b"\xff\xff"  # dport_mask
    assert raw[36:40] == bytes(4)  # sport, sport_mask
    assert struct.unpack_from("=H", raw, 40)[0] == socket.AF_INET
    assert (raw[42], raw[43], raw[44]) == (0, 32, x.IPPROTO_UDP)  # prefixlen_d, prefixlen_s, proto
    assert raw[48:56] == bytes(8)  # ifindex, user


def test_state_bytes_follow_the_kernel_layout():
    raw = x.encode_state(AEAD_STATE)
    info = raw[:224]
    assert info[56:60] == bytes([198, 18, 250, 2])  # id.daddr
    assert info[72:76] == bytes.fromhex("10000002")  # id.spi, network order
    assert info[76] == x.IPPROTO_ESP
    assert info[80:84] == bytes([198, 18, 250, 1])  # saddr
    lft = struct.unpack_from("=8Q", info, 96)
    assert lft == (x.XFRM_INF,) * 4 + (0,) * 4  # no byte/packet limit, never expires
    assert info[160:204] == bytes(44)  # curlft, stats
    assert struct.unpack_from("=IIHBBB", info, 204) == (0, REQID, socket.AF_INET, 1, 32, 0)
    assert info[217:] == bytes(7)
    attr_len, attr_type = struct.unpack_from("=HH", raw, 224)
    assert (attr_len, attr_type) == (4 + 72 + 20, x.XFRMA_ALG_AEAD)
    name, key_bits, icv = struct.unpack_from("=64sII", raw, 228)
    assert (name.rstrip(b"\0"), key_bits, icv) == (b"rfc4106(gcm(aes))", 160, 128)
    assert raw[300:320] == AEAD_KEY
    assert len(raw) == 320


def test_policy_and_template_bytes_follow_the_kernel_layout():
    raw = x.encode_policy(OUT_POLICY)
    assert struct.unpack_from("=IIBBBB", raw, 152) == (100, 0, 1, 0, 0, 0)  # priority index dir action flags share
    assert struct.unpack_from("=HH", raw, 168) == (4 + 64, x.XFRMA_TMPL)
    tmpl = raw[172:236]
    assert tmpl[0:4] == bytes([198, 18, 250, 2]) and tmpl[16:20] == bytes.fromhex("10000002")
    assert tmpl[20] == x.IPPROTO_ESP
    assert struct.unpack_from("=H", tmpl, 24)[0] == socket.AF_INET
    assert tmpl[28:32] == bytes([198, 18, 250, 1])
    assert struct.unpack_from("=IBBB", tmpl, 44) == (REQID, 1, 0, 0)  # reqid, tunnel, share any, not optional
    assert struct.unpack_from("=III", tmpl, 52) == (0xFFFFFFFF,) * 3
    assert len(raw) == 236
    assert len(x.encode_policy(BLOCK_POLICY)) == 168  # no XFRMA_TMPL without templates
    assert x.encode_policy_id(OUT_POLICY) == raw[:56] + struct.pack("=IB3x", 0, 1)


@pytest.mark.parametrize("state", [AEAD_STATE, CBC_STATE], ids=["aead", "cbc-hmac"])
def test_state_round_trip_keeps_keys_and_reqid(state):
    decoded = x.decode_state(x.encode_state(state))
    assert decoded == state
    assert (decoded.aead or decoded.crypt).key == (state.aead or state.crypt).key


def test_dumped_state_with_plain_auth_and_trunc_prefers_the_truncation():
    # the kernel dumps an auth algorithm twice: XFRMA_ALG_AUTH (no truncation) and XFRMA_ALG_AUTH_TRUNC
    raw = x.encode_state(CBC_STATE)
    plain = x._attr(x.XFRMA_ALG_AUTH, struct.pack("=64sI", b"hmac(sha256)", 256) + AUTH_KEY)
    assert x.decode_state(raw[:224] + plain + raw[224:]) == CBC_STATE


def test_delete_state_payload_names_dst_spi_proto_and_src():
    raw = x.encode_state_id(CBC_STATE)
    assert raw[:4] == bytes([198, 18, 250, 1]) and raw[16:20] == bytes.fromhex("20000001")
    assert struct.unpack_from("=HB", raw, 20) == (socket.AF_INET, x.IPPROTO_ESP)
    assert struct.unpack_from("=HH", raw, 24) == (20, x.XFRMA_SRCADDR)
    assert raw[28:32] == bytes([198, 18, 250, 2])


@pytest.mark.parametrize(
    "policy",
    [
        OUT_POLICY,
        IN_POLICY,
        BLOCK_POLICY,
        x.XfrmPolicy(
            x.Selector("10.1.0.0/24", "10.2.0.0/24"),
            "fwd",
            7,
            templates=(
                x.Template("0.0.0.0", "0.0.0.0", REQID, optional=True),
                x.Template("198.18.0.1", "198.18.0.9", 1, spi=0xFFFFFFFF),
            ),
        ),
    ],
    ids=["out", "in-optional", "block", "fwd-two-templates"],
)
def test_policy_round_trip(policy):
    assert x.decode_policy(x.encode_policy(policy)) == policy


def test_selectors_are_normalised():
    assert x.Selector("10.1.0.7/24", "198.18.0.1") == x.Selector("10.1.0.0/24", "198.18.0.1/32")
    assert x.Selector().src == "0.0.0.0/0"
    assert x.Template(" 0.0.0.0", "198.18.0.1", REQID).src == "0.0.0.0"
    with pytest.raises(ValueError, match="XFRM selector dst: '10.300.0.0/16' is not a CIDR"):
        x.Selector(dst="10.300.0.0/16")


def test_socket_and_sub_policies_are_not_decoded():
    raw = bytearray(x.encode_policy(OUT_POLICY))
    raw[160] = x.XFRM_POLICY_MAX + 1  # a per-socket "out" policy
    assert x.decode_policy(bytes(raw)) is None
    sub = x.encode_policy(BLOCK_POLICY) + x._attr(x.XFRMA_POLICY_TYPE, x.USERPOLICY_TYPE.pack(1, 0, 0))
    assert x.decode_policy(sub) is None
    main = x.encode_policy(BLOCK_POLICY) + x._attr(x.XFRMA_POLICY_TYPE, x.USERPOLICY_TYPE.pack(0, 0, 0))
    assert x.decode_policy(main) == BLOCK_POLICY


@pytest.mark.parametrize(
    ("encode", "value", "message"),
    [
        (x.encode_state, x.XfrmState("198.18.0.1", "198.18.0.2", 1, REQID), "needs aead, or both auth and crypt"),
        (x.encode_state, x.XfrmState("fd00::1", "fd00::2", 1, REQID, aead=AEAD_STATE.aead), "only IPv4"),
        (x.encode_state, x.XfrmState("198.18.0.1", "198.18.0.2", 0, REQID, aead=AEAD_STATE.aead), "spi 0 must be"),
        (x.encode_policy, x.XfrmPolicy(x.Selector(), "inbound", 1), "direction 'inbound' must be one of in"),
        (x.encode_policy, x.XfrmPolicy(x.Selector(), "out", 1, "drop"), "action 'drop' must be one of allow"),
        (x.encode_policy, x.XfrmPolicy(x.Selector(dport=53), "out", 1), "dport 53 needs a proto"),
    ],
)
def test_invalid_values_are_refused_before_the_kernel(encode, value, message):
    with pytest.raises(ValueError, match=message):
        encode(value)


# --- the socket, over a fake ---------------------------------------------------------------------
def message(kind, seq, payload=b"", flags=0):
    return x.encode_message(kind, flags, seq, payload)


def ack(seq, code=0, extack=""):
    flags = x.NLM_F_CAPPED
    body = struct.pack("=i", -code) + x.NLMSGHDR.pack(16, 0, 0, seq, 0)
    if extack:
        flags |= x.NLM_F_ACK_TLVS
        body += x._attr(x.NLMSGERR_ATTR_MSG, extack.encode() + b"\0")
    return message(x.NLMSG_ERROR, seq, body, flags)


def done(seq, flags=0):
    return message(x.NLMSG_DONE, seq, struct.pack("=i", 0), x.NLM_F_MULTI | flags)


class FakeSocket:
    """Answers each recv_into() with the next prepared datagram; records what was sent."""

    def __init__(self, *datagrams):
        self.datagrams = list(datagrams)
        self.sent = []
        self.closed = False

    def send(self, data):
        self.sent.append(bytes(data))
        return len(data)

    def recv_into(self, buffer):
        data = self.datagrams.pop(0)
        buffer[: len(data)] = data
        return len(data)

    def close(self):
        self.closed = True

    def requests(self):
        return [(kind, flags, seq) for data in self.sent for kind, flags, seq, _payload in x.parse_messages(data)]


def test_state_dump_spans_several_datagrams():
    multi = x.NLM_F_MULTI
    first = message(x.XFRM_MSG_NEWSA, 1, x.encode_state(AEAD_STATE), multi)
    second = message(x.XFRM_MSG_NEWSA, 1, x.encode_state(CBC_STATE), multi)
    stale = message(x.XFRM_MSG_NEWSA, 99, x.encode_state(CBC_STATE), multi)  # another request's answer
    fake = FakeSocket(stale + first, second + done(1))
    with x.XfrmSocket(sock=fake) as xs:
        assert xs.states() == [AEAD_STATE, CBC_STATE]
    assert fake.requests() == [(x.XFRM_MSG_GETSA, x.NLM_F_REQUEST | x.NLM_F_DUMP, 1)]
    assert fake.closed


def test_policy_dump_skips_socket_policies_and_restarts_when_interrupted():
    multi = x.NLM_F_MULTI
    socket_policy = bytearray(x.encode_policy(OUT_POLICY))
    socket_policy[160] = x.XFRM_POLICY_MAX  # a per-socket "in" policy
    fake = FakeSocket(
        message(x.XFRM_MSG_NEWPOLICY, 1, x.encode_policy(OUT_POLICY), multi | x.NLM_F_DUMP_INTR),
        done(1, x.NLM_F_DUMP_INTR),
        message(x.XFRM_MSG_NEWPOLICY, 2, x.encode_policy(OUT_POLICY), multi)
        + message(x.XFRM_MSG_NEWPOLICY, 2, bytes(socket_policy), multi),
        message(x.XFRM_MSG_NEWPOLICY, 2, x.encode_policy(BLOCK_POLICY), multi) + done(2),
    )
    assert x.XfrmSocket(sock=fake).policies() == [OUT_POLICY, BLOCK_POLICY]
    assert [kind for kind, _flags, _seq in fake.requests()] == [x.XFRM_MSG_GETPOLICY] * 2


def test_changes_are_acknowledged_requests():
    fake = FakeSocket(ack(1), ack(2), ack(3), ack(4), ack(5))
    xs = x.XfrmSocket(sock=fake)
    xs.add_state(AEAD_STATE)
    xs.delete_state(AEAD_STATE)
    xs.add_policy(OUT_POLICY)
    xs.update_policy(OUT_POLICY)
    xs.delete_policy(OUT_POLICY)
    flags = x.NLM_F_REQUEST | x.NLM_F_ACK
    kinds = [x.XFRM_MSG_NEWSA, x.XFRM_MSG_DELSA, x.XFRM_MSG_NEWPOLICY, x.XFRM_MSG_UPDPOLICY, x.XFRM_MSG_DELPOLICY]
    assert fake.requests() == [(kind, flags, seq) for seq, kind in enumerate(kinds, 1)]
    assert fake.sent[1][16:] == x.encode_state_id(AEAD_STATE)
    assert fake.sent[4][16:] == x.encode_policy_id(OUT_POLICY)


@pytest.mark.parametrize(
    ("call", "obj", "code", "extack", "text"),
    [
        ("add_state", CBC_STATE, errno.EPROTONOSUPPORT, "", "the kernel has no ESP support (module esp4 missing)"),
        ("add_state", AEAD_STATE, errno.ENOSYS, "", "the kernel has no rfc4106(gcm(aes)) (crypto module missing)"),
        ("add_state", CBC_STATE, errno.ENOENT, "", "the kernel has no hmac(sha256) or cbc(aes) (crypto module"),
        (
            "add_state",
            CBC_STATE,
            errno.ENOSYS,
            "Requested CRYPT algorithm not found",
            "the kernel has no cbc(aes) (crypto module missing) (kernel: Requested CRYPT algorithm not found)",
        ),
        ("add_state", AEAD_STATE, errno.EEXIST, "", "an SA with this destination, SPI and protocol already exists"),
        ("delete_state", AEAD_STATE, errno.ESRCH, "", "cannot delete XFRM state 198.18.250.1 -> 198.18.250.2 spi"),
        ("add_policy", OUT_POLICY, errno.EEXIST, "", "a policy with this selector and direction already exists"),
        ("delete_policy", BLOCK_POLICY, errno.ENOENT, "", "udp dport 8472 priority 200 (block, 0 templates): no such"),
        ("update_policy", OUT_POLICY, errno.EPERM, "", "permission denied (needs root / CAP_NET_ADMIN)"),
        ("update_policy", OUT_POLICY, errno.EINVAL, "bad tmpl", "Invalid argument (kernel: bad tmpl)"),
    ],
)
def test_kernel_errors_become_sentences_without_keys(call, obj, code, extack, text):
    xs = x.XfrmSocket(sock=FakeSocket(ack(1, code, extack)))
    with pytest.raises(x.XfrmError) as caught:
        getattr(xs, call)(obj)
    error = caught.value
    assert isinstance(error, OSError) and error.errno == code
    assert text in str(error)
    assert str(error).startswith(f"cannot {call.split('_')[0]} XFRM ")
    for key in (AEAD_KEY, AUTH_KEY, CRYPT_KEY):
        assert key.hex() not in str(error) and str(key) not in str(error)
    assert error.not_found == (code in (errno.ESRCH, errno.ENOENT))


def test_an_error_inside_a_dump_raises():
    fake = FakeSocket(ack(1, errno.EPERM))
    with pytest.raises(x.XfrmError, match="cannot dump XFRM states: Operation not permitted"):
        x.XfrmSocket(sock=fake).states()


def test_error_message_after_an_uncapped_echo_is_found():
    request = x.encode_message(x.XFRM_MSG_NEWSA, 5, 1, b"\xaa" * 10)
    body = struct.pack("=i", -errno.EINVAL) + request + b"\0\0" + x._attr(x.NLMSGERR_ATTR_MSG, b"bad key\0")
    assert x.parse_error(x.NLM_F_ACK_TLVS, body) == (errno.EINVAL, "bad key")


def test_keys_are_not_in_reprs():
    for state in (AEAD_STATE, CBC_STATE):
        assert AEAD_KEY.hex() not in repr(state) and str(AUTH_KEY) not in repr(state)
        assert str(AEAD_KEY) not in repr(state) and str(CRYPT_KEY) not in repr(state)
