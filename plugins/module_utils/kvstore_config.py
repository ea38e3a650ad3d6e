# -*- coding: utf-8 -*-
# Copyright: clustermesh.core contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""Cilium's etcd client configuration file (YAML): read, validate, write, turn into client settings.

The format is the one Cilium reads for ``--kvstore-opt etcd.config=`` and for every remote
cluster in the clustermesh config directory (one file per remote cluster, named after it)::

    endpoints:
    - https://cluster2.mesh.example:2379
    trusted-ca-file: /var/lib/cilium/clustermesh/cluster2.etcd-client-ca.crt
    key-file: /var/lib/cilium/clustermesh/cluster2.etcd-client.key
    cert-file: /var/lib/cilium/clustermesh/cluster2.etcd-client.crt

Keys this module does not know are kept (``extra``) and written back unchanged.  Relative
file paths are kept as written; :func:`load_etcd_config` can resolve them against the file's
directory.  No Ansible imports here.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

try:
    import yaml
except ImportError as exc:  # modules report it with missing_required_lib
    yaml = None
    IMPORT_ERROR = exc
else:
    IMPORT_ERROR = None

KNOWN_KEYS = ("endpoints", "trusted-ca-file", "key-file", "cert-file")
_SCHEMES = ("https", "http")


class KVStoreConfigError(ValueError):
    """An etcd client configuration is malformed; the message names the field and the fix."""


@dataclass(frozen=True)
class EtcdClientConfig:
    endpoints: tuple[str, ...]
    trusted_ca_file: str | None = None
    key_file: str | None = None
    cert_file: str | None = None
    extra: dict[str, Any] = field(default_factory=dict, compare=True)

    def __post_init__(self):
        object.__setattr__(self, "endpoints", tuple(self.endpoints))
        validate_etcd_config(self)

    @property
    def uses_tls(self) -> bool:
        return any(urlsplit(ep).scheme == "https" for ep in self.endpoints)

    def client_settings(self) -> dict[str, Any]:
        """Keyword arguments for :class:`kvstore_client.KVStoreClient`."""
        settings: dict[str, Any] = {
            "endpoints": list(self.endpoints),
            "ca_file": self.trusted_ca_file,
            "cert_file": self.cert_file,
            "key_file": self.key_file,
        }
        if not self.uses_tls:
            settings["allow_plaintext"] = True
        return settings

    def to_dict(self) -> dict[str, Any]:
        data: dict[str, Any] = {"endpoints": list(self.endpoints)}
        for key, value in (
            ("trusted-ca-file", self.trusted_ca_file),
            ("key-file", self.key_file),
            ("cert-file", self.cert_file),
        ):
            if value is not None:
                data[key] = value
        for key, value in self.extra.items():
            data.setdefault(key, value)
        return data


def validate_endpoint(endpoint: str) -> str:
    if not isinstance(endpoint, str) or not endpoint.strip():
        raise KVStoreConfigError(f"endpoints: each endpoint must be a non-empty URL string, got {endpoint!r}")
    parts = urlsplit(endpoint)
    if parts.scheme not in _SCHEMES:
        raise KVStoreConfigError(
            f"endpoints: {endpoint!r} must start with https:// (or http:// for a plaintext test etcd)"
        )
    try:
        port = parts.port
    except ValueError:
        raise KVStoreConfigError(f"endpoints: {endpoint!r} has an invalid port") from None
    if not parts.hostname:
        raise KVStoreConfigError(f"endpoints: {endpoint!r} has no host")
    if parts.path not in ("", "/") or parts.query or parts.fragment or parts.username:
        raise KVStoreConfigError(f"endpoints: {endpoint!r} must be scheme://host[:port] only")
    if port == 0:
        raise KVStoreConfigError(f"endpoints: {endpoint!r} has port 0")
    return endpoint


def validate_etcd_config(config: EtcdClientConfig) -> None:
    if not config.endpoints:
        raise KVStoreConfigError("endpoints: at least one etcd endpoint is required")
    for endpoint in config.endpoints:
        validate_endpoint(endpoint)
    for name, value in (
        ("trusted-ca-file", config.trusted_ca_file),
        ("key-file", config.key_file),
        ("cert-file", config.cert_file),
    ):
        if value is not None and (not isinstance(value, str) or not value):
            raise KVStoreConfigError(f"{name}: must be a non-empty path string, got {value!r}")
    if (config.key_file is None) != (config.cert_file is None):
        raise KVStoreConfigError("key-file and cert-file must be given together (mutual TLS needs both)")
    if not isinstance(config.extra, dict):
        raise KVStoreConfigError("extra settings must be a mapping")


def parse_etcd_config(text: str, source: str = "<string>") -> EtcdClientConfig:
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise KVStoreConfigError(f"{source}: not valid YAML: {exc}") from None
    if not isinstance(data, dict):
        raise KVStoreConfigError(f"{source}: must be a YAML mapping with 'endpoints', got {type(data).__name__}")
    endpoints = data.get("endpoints")
    if isinstance(endpoints, str):
        endpoints = [endpoints]
    if not isinstance(endpoints, list):
        raise KVStoreConfigError(f"{source}: 'endpoints' must be a list of URLs")
    extra = {k: v for k, v in data.items() if k not in KNOWN_KEYS}
    try:
        return EtcdClientConfig(
            endpoints=tuple(endpoints),
            trusted_ca_file=data.get("trusted-ca-file"),
            key_file=data.get("key-file"),
            cert_file=data.get("cert-file"),
            extra=extra,
        )
    except KVStoreConfigError as exc:
        raise KVStoreConfigError(f"{source}: {exc}") from None


def load_etcd_config(path: str, *, resolve_relative: bool = False) -> EtcdClientConfig:
    """Read ``path``; with ``resolve_relative`` relative file paths are taken from its directory."""
    try:
        with open(path, encoding="utf-8") as handle:
            config = parse_etcd_config(handle.read(), source=path)
    except OSError as exc:
        raise KVStoreConfigError(f"cannot read etcd config {path}: {exc.strerror}") from None
    if not resolve_relative:
        return config
    base = os.path.dirname(os.path.abspath(path))

    def resolve(value: str | None) -> str | None:
        return value if value is None or os.path.isabs(value) else os.path.join(base, value)

    return EtcdClientConfig(
        endpoints=config.endpoints,
        trusted_ca_file=resolve(config.trusted_ca_file),
        key_file=resolve(config.key_file),
        cert_file=resolve(config.cert_file),
        extra=config.extra,
    )


def dump_etcd_config(config: EtcdClientConfig) -> str:
    return yaml.safe_dump(config.to_dict(), default_flow_style=False, sort_keys=False)


def write_etcd_config(path: str, config: EtcdClientConfig, mode: int = 0o644) -> bool:
    """Write atomically (temp file + rename); return False when the file already had this content."""
    from .files import ensure_file

    return ensure_file(path, dump_etcd_config(config).encode(), mode)
