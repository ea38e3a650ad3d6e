# -*- coding: utf-8 -*-
# Copyright: clustermesh.core contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""The IPsec filters: key facts without key material, the next key of a rotation, the pod MTU."""

from __future__ import annotations

import pytest
from ansible.errors import AnsibleFilterError

from ansible_collections.clustermesh.core.plugins.filter.ipsec import (
    ipsec_key_info,
    ipsec_key_line,
    ipsec_next_key,
    ipsec_pod_mtu,
)
from ansible_collections.clustermesh.core.plugins.filter.mesh import mesh_vars
from ansible_collections.clustermesh.core.plugins.module_utils import ipsec

KEY = "15+ rfc4106(gcm(aes)) " + "5e" * 20 + " 128"


def test_key_info_has_no_key_material():
    info = ipsec_key_info(KEY)
    assert info == {
        "key_id": 15,
        "per_node": True,
        "algorithm": "rfc4106(gcm(aes))",
        "next_key_id": 1,
        "mtu_overhead": ipsec.mtu_overhead(ipsec.parse_key_line(KEY)),
    }
    assert "5e5e" not in repr(info)


@pytest.mark.parametrize("line", ["16 rfc4106(gcm(aes)) %s 128" % ("5e" * 20), "3 rfc4106(gcm(aes)) 5e5e5e5e 128", 3])
def test_bad_key_is_a_filter_error_without_the_key(line):
    with pytest.raises(AnsibleFilterError) as info:
        ipsec_key_info(line)
    assert "5e5e" not in str(info.value)


def test_key_line_is_canonical():
    assert ipsec_key_line("  15+ rfc4106(gcm(aes)) 0x" + "5E" * 20 + " 128 ") == KEY
    assert ipsec_key_line(KEY) == KEY
    with pytest.raises(AnsibleFilterError, match="ipsec_key_line") as info:
        ipsec_key_line("15+ rfc4106(gcm(aes)) 5e5e 128")
    assert "5e5e" not in str(info.value)


def test_next_key_wraps_and_keeps_the_algorithm_with_new_bytes():
    new = ipsec.parse_key_line(ipsec_next_key(KEY))
    old = ipsec.parse_key_line(KEY)
    assert new.key_id == 1 and new.per_node and new.algorithm == old.algorithm
    assert new.aead.key != old.aead.key and len(new.aead.key) == len(old.aead.key)


def test_pod_mtu():
    assert ipsec_pod_mtu(1450, "none") == 1450
    assert ipsec_pod_mtu(1450, "ipsec") == 1450 - ipsec.MTU_RESERVE
    assert ipsec_pod_mtu(None, "ipsec") is None
    with pytest.raises(AnsibleFilterError, match="not one of none, ipsec"):
        ipsec_pod_mtu(1500, "wireguard")


def test_mesh_vars_never_passes_the_key_to_mesh_validate():
    hostvars = {"a": {"clustermesh_ipsec_key": KEY, "clustermesh_node_ip": "198.18.1.11", "other": 1}}
    assert mesh_vars(hostvars, ["a"]) == {"a": {"clustermesh_node_ip": "198.18.1.11"}}
