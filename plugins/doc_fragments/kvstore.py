# -*- coding: utf-8 -*-
# Copyright: clustermesh.core contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)

from __future__ import annotations


class ModuleDocFragment:
    DOCUMENTATION = r"""
options:
  kvstore_config:
    description:
      - Path on the node of a Cilium etcd-config YAML (C(endpoints), C(trusted-ca-file), C(cert-file),
        C(key-file)), for example C(/etc/clustermesh/kvstore.yaml).
      - Mutually exclusive with O(endpoints).
    type: path
  endpoints:
    description: etcd endpoints (C(https://host:port)); each is tried in turn.
    type: list
    elements: str
  ca_file:
    description: CA that signed the etcd server certificate (with O(endpoints)).
    type: path
  cert_file:
    description: Client certificate; its CN is the etcd user (with O(endpoints)).
    type: path
  key_file:
    description: Private key of O(cert_file) (with O(endpoints)).
    type: path
  timeout:
    description: Deadline in seconds of each request to etcd.
    type: float
    default: 10
"""
