# -*- coding: utf-8 -*-
# Copyright: clustermesh.core contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""Filters that let the encryption role and the rotation playbook ask the library about IPsec keys
without ever putting key material into an error message (docs in the .yml files beside this one)."""

from __future__ import annotations

from ansible.errors import AnsibleFilterError

from ansible_collections.clustermesh.core.plugins.module_utils import ipsec


def _parse(line, what):
    if not isinstance(line, str):
        raise AnsibleFilterError(
            "%s: the IPsec key must be a string (one key line), not %s" % (what, type(line).__name__)
        )
    try:
        return ipsec.parse_key_line(line.strip())
    except ipsec.IpsecKeyError as exc:
        raise AnsibleFilterError("%s: %s" % (what, exc)) from None


def ipsec_key_info(line):
    key = _parse(line, "ipsec_key_info")
    return {
        "key_id": key.key_id,
        "per_node": key.per_node,
        "algorithm": ipsec.algorithm_label(key),
        "next_key_id": ipsec.next_key_id(key.key_id),
        "mtu_overhead": ipsec.mtu_overhead(key),
    }


def ipsec_key_line(line):
    return ipsec.format_key_line(_parse(line, "ipsec_key_line"))


def ipsec_next_key(line):
    return ipsec.format_key_line(ipsec.generate_next_key(_parse(line, "ipsec_next_key")))


def ipsec_pod_mtu(pod_mtu, encryption="ipsec"):
    if pod_mtu is None:  # routing removed: no pods to size
        return None
    if encryption in (None, "", "none", False):
        return int(pod_mtu)
    if encryption != "ipsec":
        raise AnsibleFilterError("ipsec_pod_mtu: encryption %r is not one of none, ipsec" % (encryption,))
    return int(pod_mtu) - ipsec.MTU_RESERVE


class FilterModule:
    def filters(self):
        return {
            "ipsec_key_info": ipsec_key_info,
            "ipsec_key_line": ipsec_key_line,
            "ipsec_next_key": ipsec_next_key,
            "ipsec_pod_mtu": ipsec_pod_mtu,
        }
