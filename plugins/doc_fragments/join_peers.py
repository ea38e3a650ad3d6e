# -*- coding: utf-8 -*-
# Copyright: clustermesh.core contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)

from __future__ import annotations


class ModuleDocFragment:
    DOCUMENTATION = r"""
options:
  peers:
    description: The clusters this one connects to.
    type: list
    elements: dict
    default: []
    suboptions:
      name:
        description: The peer cluster's name.
        type: str
        required: true
      endpoints:
        description: The peer's mesh endpoints (its proxies).
        type: list
        elements: str
        required: true
      ca:
        description: PEM of the peer's CA.
        type: str
        required: true
      cert:
        description: PEM of the C(remote-<cluster>) client certificate the peer issued for this cluster.
        type: str
        required: true
      key:
        description: PEM of its private key.
        type: str
        required: true
"""
