# -*- coding: utf-8 -*-
# Copyright: clustermesh.core contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""How modules name an etcd connection: the argument spec behind the ``kvstore`` doc fragment."""

from __future__ import annotations

CONNECTION_ARGUMENT_SPEC = dict(
    kvstore_config=dict(type="path"),
    endpoints=dict(type="list", elements="str"),
    ca_file=dict(type="path"),
    cert_file=dict(type="path"),
    key_file=dict(type="path"),
    timeout=dict(type="float", default=10.0),
)
CONNECTION_MUTUALLY_EXCLUSIVE = [("kvstore_config", "endpoints")]
CONNECTION_REQUIRED_ONE_OF = [("kvstore_config", "endpoints")]


def client_from_params(params, **kwargs):
    """A KVStoreClient from module parameters (raises KVStoreError / KVStoreConfigError)."""
    from .kvstore_client import KVStoreClient
    from .kvstore_config import load_etcd_config

    if params.get("kvstore_config"):
        return KVStoreClient.from_config(
            load_etcd_config(params["kvstore_config"]), timeout=params["timeout"], **kwargs
        )
    return KVStoreClient(
        params["endpoints"],
        ca_file=params.get("ca_file"),
        cert_file=params.get("cert_file"),
        key_file=params.get("key_file"),
        timeout=params["timeout"],
        **kwargs,
    )
