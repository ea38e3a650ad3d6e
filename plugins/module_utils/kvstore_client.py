# -*- coding: utf-8 -*-
# Copyright: clustermesh.core contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""The one etcd v3 client of the collection and the node agent.

Built on the generated etcd v3 gRPC stubs that ``etcd-sdk-python`` ships (``pyetcd.etcdrpc``),
not on its ``Etcd3Client`` class, because that class hides what this project must see:

* a watch denied by RBAC is answered ``created=true, canceled=true, watch_id=-1``; pyetcd
  registers it as watch -1 and never calls back, so the watch hangs silently;
* its errors drop the server's message (``ConnectionFailedError()`` without the cause), it
  leaves PERMISSION_DENIED as a raw ``grpc.RpcError``, and a failed endpoint is skipped for
  300 s;
* its watches never resume after an etcd restart, and it has no ``no_password`` user option.

What this module gives instead:

* mutual TLS (CA + client certificate/key) to one or more endpoints, trying each in turn;
  plaintext only with ``allow_plaintext=True`` (tests);
* a deadline on every RPC (``timeout``) and a bounded connection set-up (``connect_timeout``),
  keepalive pings so a dead peer is noticed, a 64 MiB receive limit for large prefixes;
* typed results (:class:`KV`, :class:`PrefixListing`, :class:`Lease`) and typed errors
  (:class:`KVStoreUnavailable`, :class:`KVStoreTLSError`, :class:`KVStorePermissionDenied`, ...);
* :meth:`KVStoreClient.watch_prefix`: list first (a denied read raises at once), then watch from
  revision+1; resume after any stream error from the last revision seen; re-list on compaction
  (emitting deletes for keys that vanished and puts for keys that changed); detect RBAC
  cancellation; stop promptly from another thread;
* thin wrappers of the auth API (users without password, identified by certificate CN).

No Ansible imports: the node agent uses this file as it is.
"""

from __future__ import annotations

import logging
import random
import threading
import time
import weakref
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any, TypeVar
from urllib.parse import urlsplit

try:
    import grpc
    from pyetcd import etcdrpc
except ImportError as exc:  # modules report it with missing_required_lib
    grpc = etcdrpc = None
    IMPORT_ERROR = exc
else:
    IMPORT_ERROR = None

log = logging.getLogger(__name__)

T = TypeVar("T")

DEFAULT_TIMEOUT = 10.0
DEFAULT_CONNECT_TIMEOUT = 5.0
DEFAULT_PORT = 2379
MAX_RECEIVE_BYTES = 64 * 1024 * 1024
# etcd refuses requests above --max-request-bytes (1.5 MiB by default) itself.
MAX_SEND_BYTES = 16 * 1024 * 1024

# gRPC metadata of clientv3's WithRequireLeader.
REQUIRE_LEADER = (("hasleader", "true"),)

EVENT_PUT = "put"
EVENT_DELETE = "delete"

UPDATE_INITIAL = "initial"
UPDATE_EVENTS = "events"
UPDATE_RESYNC = "resync"

PERMISSIONS = {"read": 0, "write": 1, "readwrite": 2}
_PERMISSION_NAMES = {v: k for k, v in PERMISSIONS.items()}

# Markers in gRPC's status details that say the TLS handshake failed (wrong CA, certificate
# refused by the server, no client certificate) rather than the network.
_TLS_MARKERS = (
    "TSI_DATA_CORRUPTED",
    "TSI_PROTOCOL_FAILURE",
    "CERTIFICATE_VERIFY_FAILED",
    "SSL_ERROR",
    "Tls handshake failed",
    "tls: ",
    "certificate",
)


# --------------------------------------------------------------------------------------------
# errors
# --------------------------------------------------------------------------------------------


class KVStoreError(Exception):
    """Base of all kvstore errors.  ``code`` is the gRPC status name, ``details`` etcd's message."""

    def __init__(self, message: str, *, code: str | None = None, details: str | None = None):
        super().__init__(message)
        self.code = code
        self.details = details


class KVStoreUnavailable(KVStoreError):
    """No endpoint answered (refused, unreachable, timed out, no leader): names endpoints and causes."""


class KVStoreTLSError(KVStoreUnavailable):
    """The TLS handshake failed: wrong CA, or the server refused the client certificate."""


class KVStorePermissionDenied(KVStoreError):
    """etcd RBAC denied the operation (``key`` and ``user`` are set when known)."""

    def __init__(self, message: str, *, key: str | None = None, user: str | None = None, **kwargs):
        super().__init__(message, **kwargs)
        self.key = key
        self.user = user


class KVStoreLeaseNotFound(KVStoreError):
    """The lease does not exist (expired or revoked)."""


class KVStoreCompacted(KVStoreError):
    """The requested revision has been compacted away."""


class KVStoreConfigError(KVStoreError, ValueError):
    """The client settings are invalid (bad endpoint URL, unreadable certificate file, ...)."""


class _Stopped(Exception):
    """Internal: the watcher was stopped while waiting."""


class _Relist(Exception):
    """Internal: the watcher must list the prefix again (compaction, store reset)."""


# --------------------------------------------------------------------------------------------
# results
# --------------------------------------------------------------------------------------------


def _key_bytes(key: str | bytes) -> bytes:
    return key if isinstance(key, bytes) else key.encode("utf-8", "surrogateescape")


def _key_str(key: bytes) -> str:
    return key.decode("utf-8", "surrogateescape")


def _value_bytes(value: str | bytes) -> bytes:
    return value if isinstance(value, bytes) else value.encode("utf-8")


def prefix_range_end(prefix: bytes) -> bytes:
    """The range end that selects every key starting with ``prefix`` (``b"\\0"`` for all keys)."""
    data = bytearray(prefix)
    while data:
        if data[-1] < 0xFF:
            data[-1] += 1
            return bytes(data)
        data.pop()
    return b"\0"


@dataclass(frozen=True)
class KV:
    key: str
    value: bytes
    create_revision: int
    mod_revision: int
    version: int
    lease: int

    def text(self) -> str:
        return self.value.decode("utf-8")

    @classmethod
    def from_pb(cls, kv) -> KV:
        return cls(_key_str(kv.key), kv.value, kv.create_revision, kv.mod_revision, kv.version, kv.lease)


@dataclass(frozen=True)
class PrefixListing:
    """The keys under a prefix at one store ``revision`` (watch from ``revision + 1``)."""

    revision: int
    kvs: tuple[KV, ...]
    cluster_id: int = 0

    def __iter__(self) -> Iterator[KV]:
        return iter(self.kvs)

    def __len__(self) -> int:
        return len(self.kvs)

    def as_dict(self) -> dict[str, KV]:
        return {kv.key: kv for kv in self.kvs}


@dataclass(frozen=True)
class Lease:
    id: int
    ttl: int


@dataclass(frozen=True)
class Permission:
    permission: str  # read / write / readwrite
    key: str
    range_end: str | None  # None: the single key

    @property
    def is_prefix(self) -> bool:
        return self.range_end is not None and _key_bytes(self.range_end) == prefix_range_end(_key_bytes(self.key))


@dataclass(frozen=True)
class WatchEvent:
    type: str  # EVENT_PUT or EVENT_DELETE
    key: str
    value: bytes  # b"" for deletes
    revision: int  # mod revision of the change; for synthetic events the listing revision
    kv: KV | None = None  # the new KV for puts
    synthetic: bool = False  # made up from a re-list rather than received from etcd


@dataclass(frozen=True)
class WatchUpdate:
    """What :class:`PrefixWatcher` yields.

    ``kind`` is ``initial`` (first listing: a put per key), ``events`` (changes received) or
    ``resync`` (a re-list after compaction or a store reset: deletes for keys that vanished,
    puts for keys that are new or changed).  ``snapshot`` is the full listing for ``initial``
    and ``resync`` and None otherwise.  ``revision``: everything up to it has been delivered.
    """

    kind: str
    revision: int
    events: tuple[WatchEvent, ...]
    snapshot: tuple[KV, ...] | None = None


# --------------------------------------------------------------------------------------------
# endpoints
# --------------------------------------------------------------------------------------------


class _Endpoint:
    def __init__(self, url: str, target: str, secure: bool):
        self.url = url
        self.target = target
        self.secure = secure
        self.channel: grpc.Channel | None = None
        self.stubs: dict[str, Any] = {}
        self.failed_at = 0.0

    def __repr__(self) -> str:
        return f"_Endpoint({self.url})"


def parse_endpoint(url: str) -> tuple[str, bool]:
    """``https://host:port`` -> (``host:port`` gRPC target, secure)."""
    if not isinstance(url, str) or not url.strip():
        raise KVStoreConfigError(f"etcd endpoint must be a non-empty URL, got {url!r}")
    text = url.strip()
    if "://" not in text:
        raise KVStoreConfigError(f"etcd endpoint {url!r} needs a scheme: https://host:port")
    parts = urlsplit(text)
    if parts.scheme not in ("https", "http"):
        raise KVStoreConfigError(f"etcd endpoint {url!r}: scheme must be https (or http for a plaintext test etcd)")
    try:
        port = parts.port or DEFAULT_PORT
    except ValueError:
        raise KVStoreConfigError(f"etcd endpoint {url!r} has an invalid port") from None
    host = parts.hostname
    if not host or parts.path not in ("", "/"):
        raise KVStoreConfigError(f"etcd endpoint {url!r} must be scheme://host[:port]")
    target = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    return target, parts.scheme == "https"


def _read_file(path: str | None, what: str) -> bytes | None:
    if path is None:
        return None
    try:
        with open(path, "rb") as handle:
            return handle.read()
    except OSError as exc:
        raise KVStoreConfigError(f"cannot read {what} {path}: {exc.strerror}") from None


def certificate_common_name(pem: bytes | None) -> str | None:
    """CN of a PEM certificate (the etcd user name with client-certificate auth)."""
    if not pem:
        return None
    try:
        from cryptography import x509
        from cryptography.x509.oid import NameOID

        cert = x509.load_pem_x509_certificate(pem)
        names = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
        return str(names[0].value) if names else None
    except Exception:  # noqa: BLE001 - the CN is only used in messages
        return None


# --------------------------------------------------------------------------------------------
# the client
# --------------------------------------------------------------------------------------------


class KVStoreClient:
    """etcd v3 client: mTLS, several endpoints with failover, deadlines on every call.

    ``timeout`` is the deadline of each RPC on each endpoint tried (so a call that fails over
    across N endpoints takes at most N x timeout; a second round that waits for a connection
    fits in what is left of ``timeout``); ``connect_timeout`` bounds TCP connect plus TLS
    handshake.  Writes are retried on another endpoint only when the request cannot have been
    sent (no connection); a write that timed out is reported, not repeated.  Keepalive pings
    (``keepalive_time``, at least 5 s: etcd refuses more frequent pings) detect a dead peer
    within ``keepalive_time + keepalive_timeout`` while a call or watch is open.
    Thread-safe; watchers share the client's connections.
    """

    def __init__(
        self,
        endpoints: Iterable[str] | str,
        *,
        ca_file: str | None = None,
        cert_file: str | None = None,
        key_file: str | None = None,
        timeout: float = DEFAULT_TIMEOUT,
        connect_timeout: float = DEFAULT_CONNECT_TIMEOUT,
        allow_plaintext: bool = False,
        server_name: str | None = None,
        max_receive_bytes: int = MAX_RECEIVE_BYTES,
        keepalive_time: float = 10.0,
        keepalive_timeout: float = 10.0,
        max_reconnect_backoff: float = 2.0,
    ):
        if isinstance(endpoints, str):
            endpoints = [endpoints]
        endpoints = list(endpoints)
        if not endpoints:
            raise KVStoreConfigError("at least one etcd endpoint is required")
        if timeout <= 0 or connect_timeout <= 0:
            raise KVStoreConfigError("timeout and connect_timeout must be positive")
        if (cert_file is None) != (key_file is None):
            raise KVStoreConfigError("cert_file and key_file must be given together (mutual TLS needs both)")
        self.timeout = float(timeout)
        self.connect_timeout = float(connect_timeout)
        self._endpoints: list[_Endpoint] = []
        for url in endpoints:
            target, secure = parse_endpoint(url)
            if not secure and not allow_plaintext:
                raise KVStoreConfigError(
                    f"etcd endpoint {url!r} is plaintext; use https:// (plaintext is for tests: allow_plaintext=True)"
                )
            self._endpoints.append(_Endpoint(url.strip(), target, secure))
        self._ca = _read_file(ca_file, "trusted CA file")
        cert = _read_file(cert_file, "client certificate file")
        key = _read_file(key_file, "client key file")
        self.user = certificate_common_name(cert)
        self._credentials = None
        if any(ep.secure for ep in self._endpoints):
            try:
                self._credentials = grpc.ssl_channel_credentials(self._ca, key, cert)
            except Exception as exc:  # noqa: BLE001 - grpc raises plain errors for bad PEM
                raise KVStoreConfigError(f"invalid TLS material: {exc}") from None
        self._options = [
            ("grpc.max_receive_message_length", int(max_receive_bytes)),
            ("grpc.max_send_message_length", MAX_SEND_BYTES),
            ("grpc.keepalive_time_ms", int(keepalive_time * 1000)),
            ("grpc.keepalive_timeout_ms", int(keepalive_timeout * 1000)),
            # grpcio 1.85 waits for the keepalive ping's ack for ping_timeout_ms (default 60 s),
            # not keepalive_timeout_ms: without this a half-open connection is kept for a minute.
            ("grpc.http2.ping_timeout_ms", int(keepalive_timeout * 1000)),
            # etcd (grpc-go) answers pings without streams with GOAWAY too_many_pings.
            ("grpc.keepalive_permit_without_calls", 0),
            ("grpc.http2.max_pings_without_data", 0),
            ("grpc.initial_reconnect_backoff_ms", 100),
            ("grpc.max_reconnect_backoff_ms", int(max_reconnect_backoff * 1000)),
            # gRPC core uses this as the connect (TCP + TLS handshake) timeout.
            ("grpc.min_reconnect_backoff_ms", int(self.connect_timeout * 1000)),
            ("grpc.enable_http_proxy", 0),
        ]
        if server_name:
            self._options.append(("grpc.ssl_target_name_override", server_name))
        self._lock = threading.Lock()
        self._preferred = 0
        self._closed = False
        self._watchers: weakref.WeakSet[PrefixWatcher] = weakref.WeakSet()

    # -- construction helpers -------------------------------------------------------------
    @classmethod
    def from_config(cls, config, **kwargs) -> KVStoreClient:
        """From a :class:`kvstore_config.EtcdClientConfig` (Cilium's etcd-config YAML)."""
        settings = config.client_settings()
        settings.update(kwargs)
        return cls(**settings)

    @classmethod
    def from_config_file(cls, path: str, **kwargs) -> KVStoreClient:
        from .kvstore_config import load_etcd_config

        return cls.from_config(load_etcd_config(path), **kwargs)

    @property
    def endpoints(self) -> list[str]:
        return [ep.url for ep in self._endpoints]

    def __enter__(self) -> KVStoreClient:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        """Stop every watcher of this client and close the connections."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            watchers = list(self._watchers)
        for watcher in watchers:
            watcher.stop()
        for ep in self._endpoints:
            if ep.channel is not None:
                ep.channel.close()
                ep.channel = None
                ep.stubs.clear()

    @property
    def closed(self) -> bool:
        return self._closed

    # -- plumbing -------------------------------------------------------------------------
    def _stub(self, ep: _Endpoint, service: str):
        with self._lock:
            if self._closed:
                raise KVStoreError("the kvstore client is closed")
            if ep.channel is None:
                if ep.secure:
                    ep.channel = grpc.secure_channel(ep.target, self._credentials, options=self._options)
                else:
                    ep.channel = grpc.insecure_channel(ep.target, options=self._options)
            stub = ep.stubs.get(service)
            if stub is None:
                stub = ep.stubs[service] = getattr(etcdrpc, f"{service}Stub")(ep.channel)
            return stub

    def stub(self, service: str):
        """The gRPC stub (``KV``, ``Watch``, ``Lease``, ``Auth``, ``Maintenance``, ``Cluster``) of
        the preferred endpoint, for RPCs this class does not wrap yet (no failover, no mapping:
        wrap them here instead when they are needed for real)."""
        return self._stub(self._order()[0], service)

    def _order(self) -> list[_Endpoint]:
        with self._lock:
            start = self._preferred
        return self._endpoints[start:] + self._endpoints[:start]

    def _mark_failed(self, ep: _Endpoint) -> None:
        with self._lock:
            ep.failed_at = time.monotonic()
            index = self._endpoints.index(ep)
            if self._preferred == index and len(self._endpoints) > 1:
                self._preferred = (index + 1) % len(self._endpoints)

    def _mark_ok(self, ep: _Endpoint) -> None:
        with self._lock:
            ep.failed_at = 0.0
            self._preferred = self._endpoints.index(ep)

    def _translate(
        self, exc: grpc.RpcError, ep: _Endpoint, op: str, key: str | None, timeout: float | None = None
    ) -> KVStoreError:
        code = exc.code() if hasattr(exc, "code") else None
        details = (exc.details() if hasattr(exc, "details") else None) or str(exc)
        name = code.name if code is not None else "UNKNOWN"
        what = f"{op} {key!r}" if key is not None else op
        if code == grpc.StatusCode.PERMISSION_DENIED:
            user = f"user {self.user!r}" if self.user else "this client"
            return KVStorePermissionDenied(
                f"{what}: etcd denied {user} ({details}) at {ep.url}; grant the user's role access to the key",
                key=key,
                user=self.user,
                code=name,
                details=details,
            )
        if code == grpc.StatusCode.UNAVAILABLE:
            if any(marker in details for marker in _TLS_MARKERS):
                return KVStoreTLSError(
                    f"{what}: TLS handshake with {ep.url} failed ({details}); check that trusted-ca-file is the "
                    "CA of the server certificate and that the server trusts the client certificate's CA",
                    code=name,
                    details=details,
                )
            return KVStoreUnavailable(f"{what}: {ep.url} unavailable: {details}", code=name, details=details)
        if code == grpc.StatusCode.DEADLINE_EXCEEDED:
            limit = f" within {timeout:g}s" if timeout else ""
            return KVStoreUnavailable(f"{what}: {ep.url} did not answer{limit}", code=name, details=details)
        if code == grpc.StatusCode.NOT_FOUND and "lease not found" in details:
            return KVStoreLeaseNotFound(f"{what}: {details}", code=name, details=details)
        if code == grpc.StatusCode.OUT_OF_RANGE and "compacted" in details:
            return KVStoreCompacted(f"{what}: {details}", code=name, details=details)
        if code == grpc.StatusCode.CANCELLED:
            return KVStoreUnavailable(f"{what}: call to {ep.url} cancelled ({details})", code=name, details=details)
        if code == grpc.StatusCode.RESOURCE_EXHAUSTED:
            return KVStoreError(
                f"{what}: {details} at {ep.url}; the message is too large (raise max_receive_bytes or page the read)",
                code=name,
                details=details,
            )
        return KVStoreError(f"{what}: {name}: {details} (at {ep.url})", code=name, details=details)

    def _failover(
        self,
        op: str,
        key: str | None,
        attempt: Callable[[_Endpoint, float, bool], T],
        *,
        idempotent: bool = True,
        timeout: float | None = None,
    ) -> T:
        """Run ``attempt(endpoint, deadline, wait_for_ready)`` on each endpoint until one answers.

        Round one fails fast on endpoints that cannot be connected to.  If every endpoint failed
        only to connect (not TLS, not a timeout), round two waits for a connection (gRPC
        ``wait_for_ready``) within what is left of ``timeout``, capped by ``connect_timeout``:
        this absorbs gRPC's reconnect backoff right after an etcd restart.
        """
        timeout = timeout or self.timeout
        started = time.monotonic()
        failures: dict[str, tuple[_Endpoint, KVStoreUnavailable]] = {}
        for round_two in (False, True):
            if round_two:
                remaining = timeout - (time.monotonic() - started)
                retryable = all(
                    "failed to connect" in (err.details or "") and not isinstance(err, KVStoreTLSError)
                    for unused, err in failures.values()
                )
                if not retryable or remaining < 0.05:
                    break
                deadline = min(remaining, self.connect_timeout)
            else:
                deadline = timeout
            for ep in self._order():
                try:
                    result = attempt(ep, deadline, round_two)
                except grpc.RpcError as exc:
                    err = self._translate(exc, ep, op, key, deadline)
                    if isinstance(err, KVStoreUnavailable) and not self._closed:
                        not_sent = "failed to connect" in (err.details or "")
                        if idempotent or not_sent:
                            self._mark_failed(ep)
                            # keep the first round's cause when the second only timed out waiting
                            if not (round_two and err.code == "DEADLINE_EXCEEDED" and ep.url in failures):
                                failures[ep.url] = (ep, err)
                            continue
                    raise err from None
                self._mark_ok(ep)
                return result
            if self._closed:
                break
        if self._closed:
            raise KVStoreError(f"{op}: the kvstore client is closed")
        what = f"{op} {key!r}" if key is not None else op
        errors = [err for unused, err in failures.values()]
        causes = "; ".join(f"{ep.url}: {err.details or err}" for ep, err in failures.values())
        tls = bool(errors) and all(isinstance(err, KVStoreTLSError) for err in errors)
        hint = (
            " (TLS handshake failed: check that trusted-ca-file is the CA of the server certificate "
            "and that the server trusts the client certificate's CA)"
            if tls
            else ""
        )
        raise (KVStoreTLSError if tls else KVStoreUnavailable)(
            f"{what}: no etcd endpoint answered within {timeout:g}s: {causes}{hint}",
            code=errors[-1].code if errors else None,
            details=errors[-1].details if errors else None,
        )

    def _unary(
        self,
        service: str,
        method: str,
        request,
        *,
        op: str,
        key: str | None = None,
        idempotent: bool = True,
        timeout: float | None = None,
    ):
        def attempt(ep: _Endpoint, deadline: float, wait: bool):
            return getattr(self._stub(ep, service), method)(request, timeout=deadline, wait_for_ready=wait)

        return self._failover(op, key, attempt, idempotent=idempotent, timeout=timeout)

    # -- key/value ------------------------------------------------------------------------
    def get(self, key: str, *, revision: int | None = None, serializable: bool = False) -> KV | None:
        request = etcdrpc.RangeRequest(key=_key_bytes(key), serializable=serializable)
        if revision:
            request.revision = revision
        response = self._unary("KV", "Range", request, op="get", key=key)
        return KV.from_pb(response.kvs[0]) if response.kvs else None

    def get_prefix(
        self, prefix: str, *, keys_only: bool = False, page_size: int = 0, revision: int | None = None
    ) -> PrefixListing:
        """All keys under ``prefix`` at one revision (sorted by key).

        ``page_size`` > 0 reads in pages pinned to the revision of the first page, so each
        response stays small; a compaction in between restarts the listing once.
        """
        listing, unused = self._list(prefix, keys_only=keys_only, page_size=page_size, revision=revision)
        return listing

    def _list(
        self,
        prefix: str,
        *,
        keys_only: bool = False,
        page_size: int = 0,
        revision: int | None = None,
        call: Callable | None = None,
    ) -> tuple[PrefixListing, int]:
        start = _key_bytes(prefix)
        end = prefix_range_end(start)
        for _unused in range(3):
            kvs: list[KV] = []
            pinned = revision or 0
            cursor = start
            cluster_id = 0
            try:
                while True:
                    request = etcdrpc.RangeRequest(
                        key=cursor,
                        range_end=end,
                        keys_only=keys_only,
                        sort_order=etcdrpc.RangeRequest.ASCEND,
                        sort_target=etcdrpc.RangeRequest.KEY,
                    )
                    if page_size:
                        request.limit = page_size
                    if pinned:
                        request.revision = pinned
                    if call is not None:
                        response = call(request)
                    else:
                        response = self._unary("KV", "Range", request, op="list", key=prefix)
                    pinned = pinned or response.header.revision
                    cluster_id = response.header.cluster_id
                    kvs.extend(KV.from_pb(kv) for kv in response.kvs)
                    if not (page_size and response.more and response.kvs):
                        break
                    cursor = response.kvs[-1].key + b"\0"
            except KVStoreCompacted:
                if revision:
                    raise
                continue
            return PrefixListing(pinned, tuple(kvs), cluster_id), cluster_id
        raise KVStoreCompacted(f"list {prefix!r}: the revision was compacted during three attempts")

    def put(self, key: str, value: str | bytes, *, lease: int | Lease | None = None) -> int:
        """Write ``key``; returns the store revision of the write."""
        request = etcdrpc.PutRequest(key=_key_bytes(key), value=_value_bytes(value), lease=_lease_id(lease))
        return self._unary("KV", "Put", request, op="put", key=key, idempotent=False).header.revision

    def delete(self, key: str) -> int:
        """Delete ``key``; returns how many keys were deleted (0 or 1)."""
        request = etcdrpc.DeleteRangeRequest(key=_key_bytes(key))
        return self._unary("KV", "DeleteRange", request, op="delete", key=key, idempotent=False).deleted

    def delete_prefix(self, prefix: str) -> int:
        """Delete every key under ``prefix`` (refuses the empty prefix); returns the count."""
        if not prefix:
            raise KVStoreConfigError("delete_prefix needs a non-empty prefix")
        start = _key_bytes(prefix)
        request = etcdrpc.DeleteRangeRequest(key=start, range_end=prefix_range_end(start))
        return self._unary("KV", "DeleteRange", request, op="delete_prefix", key=prefix, idempotent=False).deleted

    def _txn(self, compare, success, failure, *, op: str, key: str) -> tuple[bool, Any]:
        request = etcdrpc.TxnRequest(compare=compare, success=success, failure=failure)
        response = self._unary("KV", "Txn", request, op=op, key=key, idempotent=False)
        return response.succeeded, response

    @staticmethod
    def _put_op(key: str, value, lease) -> Any:
        return etcdrpc.RequestOp(
            request_put=etcdrpc.PutRequest(key=_key_bytes(key), value=_value_bytes(value), lease=_lease_id(lease))
        )

    def put_if_absent(self, key: str, value: str | bytes, *, lease: int | Lease | None = None) -> bool:
        """Create ``key`` only if it does not exist; True if this call created it."""
        compare = [
            etcdrpc.Compare(
                key=_key_bytes(key),
                target=etcdrpc.Compare.CREATE,
                result=etcdrpc.Compare.EQUAL,
                create_revision=0,
            )
        ]
        ok, unused = self._txn(compare, [self._put_op(key, value, lease)], [], op="put_if_absent", key=key)
        return ok

    def put_if_mod_revision(
        self, key: str, value: str | bytes, mod_revision: int, *, lease: int | Lease | None = None
    ) -> bool:
        """Compare-and-swap: write only if the key's mod revision is still ``mod_revision``
        (0 means "does not exist")."""
        compare = [
            etcdrpc.Compare(
                key=_key_bytes(key),
                target=etcdrpc.Compare.MOD,
                result=etcdrpc.Compare.EQUAL,
                mod_revision=mod_revision,
            )
        ]
        ok, unused = self._txn(compare, [self._put_op(key, value, lease)], [], op="put_if_mod_revision", key=key)
        return ok

    def delete_if_mod_revision(self, key: str, mod_revision: int) -> bool:
        """Delete only if the key's mod revision is still ``mod_revision``."""
        compare = [
            etcdrpc.Compare(
                key=_key_bytes(key),
                target=etcdrpc.Compare.MOD,
                result=etcdrpc.Compare.EQUAL,
                mod_revision=mod_revision,
            )
        ]
        success = [etcdrpc.RequestOp(request_delete_range=etcdrpc.DeleteRangeRequest(key=_key_bytes(key)))]
        ok, unused = self._txn(compare, success, [], op="delete_if_mod_revision", key=key)
        return ok

    def compact(self, revision: int, *, physical: bool = False) -> None:
        self._unary(
            "KV", "Compact", etcdrpc.CompactionRequest(revision=revision, physical=physical), op="compact", key=None
        )

    def status(self) -> dict[str, Any]:
        """The answering member's status: version, revision, leader, db size, cluster/member IDs."""
        response = self._unary("Maintenance", "Status", etcdrpc.StatusRequest(), op="status")
        return {
            "version": response.version,
            "revision": response.header.revision,
            "cluster_id": response.header.cluster_id,
            "member_id": response.header.member_id,
            "leader": response.leader,
            "raft_term": response.raftTerm,
            "db_size": response.dbSize,
        }

    # -- leases ---------------------------------------------------------------------------
    def lease_grant(self, ttl: int) -> Lease:
        response = self._unary(
            "Lease", "LeaseGrant", etcdrpc.LeaseGrantRequest(TTL=int(ttl)), op="lease_grant", idempotent=False
        )
        if response.error:
            raise KVStoreError(f"lease_grant: {response.error}")
        return Lease(response.ID, response.TTL)

    def lease_keepalive(self, lease: int | Lease) -> int:
        """Refresh the lease once; returns its new TTL; raises KVStoreLeaseNotFound when gone."""
        lease_id = _lease_id(lease)

        def attempt(ep: _Endpoint, deadline: float, wait: bool) -> int:
            call = self._stub(ep, "Lease").LeaseKeepAlive(
                iter([etcdrpc.LeaseKeepAliveRequest(ID=lease_id)]), timeout=deadline, wait_for_ready=wait
            )
            try:
                for response in call:
                    return response.TTL
            finally:
                call.cancel()
            return 0

        ttl = self._failover("lease_keepalive", f"lease {lease_id:x}", attempt)
        if ttl <= 0:
            raise KVStoreLeaseNotFound(f"lease_keepalive: lease {lease_id:x} has expired or was revoked")
        return ttl

    def lease_revoke(self, lease: int | Lease) -> None:
        lease_id = _lease_id(lease)
        self._unary("Lease", "LeaseRevoke", etcdrpc.LeaseRevokeRequest(ID=lease_id), op="lease_revoke")

    def lease_ttl(self, lease: int | Lease) -> int:
        """Remaining TTL in seconds, -1 if the lease does not exist."""
        lease_id = _lease_id(lease)
        response = self._unary("Lease", "LeaseTimeToLive", etcdrpc.LeaseTimeToLiveRequest(ID=lease_id), op="lease_ttl")
        return response.TTL

    def keep_lease_alive(
        self,
        lease: Lease,
        *,
        interval: float | None = None,
        on_lost: Callable[[KVStoreError], None] | None = None,
    ) -> LeaseKeeper:
        """Refresh ``lease`` every ``interval`` (default TTL/3) in a daemon thread until stopped."""
        return LeaseKeeper(self, lease, interval=interval, on_lost=on_lost).start()

    # -- watch ----------------------------------------------------------------------------
    def watch_prefix(
        self,
        prefix: str,
        *,
        start_revision: int | None = None,
        create_timeout: float | None = None,
        backoff_initial: float = 0.2,
        backoff_max: float = 5.0,
        give_up_after: float | None = None,
        on_error: Callable[[KVStoreError], None] | None = None,
    ) -> PrefixWatcher:
        """A :class:`PrefixWatcher` over ``prefix``; iterate it to receive :class:`WatchUpdate`.

        Without ``start_revision`` the prefix is listed first (an ``initial`` update), then
        watched from the listing's revision + 1.  With it, watching starts there (no listing;
        a later re-list can only report deletes of keys seen since).
        """
        watcher = PrefixWatcher(
            self,
            prefix,
            start_revision=start_revision,
            create_timeout=create_timeout,
            backoff_initial=backoff_initial,
            backoff_max=backoff_max,
            give_up_after=give_up_after,
            on_error=on_error,
        )
        with self._lock:
            if self._closed:
                raise KVStoreError("the kvstore client is closed")
            self._watchers.add(watcher)
        return watcher

    # -- auth administration (thin wrappers; the etcd_auth module builds on them) ---------
    def auth_enable(self) -> None:
        self._unary("Auth", "AuthEnable", etcdrpc.AuthEnableRequest(), op="auth_enable")

    def auth_enabled(self) -> bool:
        """Whether auth is on. etcd 3.4 has no AuthStatus call, but answers a password login
        with "authentication is not enabled" only while auth is off."""
        request = etcdrpc.AuthenticateRequest(name="clustermesh-auth-probe", password="-")
        try:
            self._unary("Auth", "Authenticate", request, op="auth_status")
        except KVStoreError as exc:
            details = exc.details or str(exc)
            if "not enabled" in details:
                return False
            if "authentication failed" in details or "invalid user" in details:
                return True
            raise
        return True

    def auth_disable(self) -> None:
        self._unary("Auth", "AuthDisable", etcdrpc.AuthDisableRequest(), op="auth_disable")

    def user_add(self, name: str, password: str | None = None) -> None:
        """Add a user; without ``password`` the user has none and is identified by the client
        certificate CN only (etcd >= 3.4 ``UserAddOptions.no_password``)."""
        request = etcdrpc.AuthUserAddRequest(name=name, password=password or "")
        if password is None:
            # pyetcd's proto predates field 3 (options: UserAddOptions{no_password = 1});
            # append it as an unknown field, which protobuf keeps when re-serialising.
            raw = request.SerializeToString() + b"\x1a\x02\x08\x01"
            request = etcdrpc.AuthUserAddRequest()
            request.ParseFromString(raw)
        self._unary("Auth", "UserAdd", request, op="user_add", key=name, idempotent=False)

    def user_delete(self, name: str) -> None:
        self._unary("Auth", "UserDelete", etcdrpc.AuthUserDeleteRequest(name=name), op="user_delete", key=name)

    def user_get(self, name: str) -> list[str]:
        """The roles of user ``name``."""
        response = self._unary("Auth", "UserGet", etcdrpc.AuthUserGetRequest(name=name), op="user_get", key=name)
        return list(response.roles)

    def user_list(self) -> list[str]:
        return list(self._unary("Auth", "UserList", etcdrpc.AuthUserListRequest(), op="user_list").users)

    def user_grant_role(self, user: str, role: str) -> None:
        request = etcdrpc.AuthUserGrantRoleRequest(user=user, role=role)
        self._unary("Auth", "UserGrantRole", request, op="user_grant_role", key=user)

    def user_revoke_role(self, user: str, role: str) -> None:
        request = etcdrpc.AuthUserRevokeRoleRequest(name=user, role=role)
        self._unary("Auth", "UserRevokeRole", request, op="user_revoke_role", key=user)

    def role_add(self, name: str) -> None:
        self._unary("Auth", "RoleAdd", etcdrpc.AuthRoleAddRequest(name=name), op="role_add", key=name, idempotent=False)

    def role_delete(self, name: str) -> None:
        self._unary("Auth", "RoleDelete", etcdrpc.AuthRoleDeleteRequest(role=name), op="role_delete", key=name)

    def role_list(self) -> list[str]:
        return list(self._unary("Auth", "RoleList", etcdrpc.AuthRoleListRequest(), op="role_list").roles)

    def role_get(self, name: str) -> list[Permission]:
        response = self._unary("Auth", "RoleGet", etcdrpc.AuthRoleGetRequest(role=name), op="role_get", key=name)
        return [
            Permission(
                _PERMISSION_NAMES.get(perm.permType, str(perm.permType)),
                _key_str(perm.key),
                _key_str(perm.range_end) if perm.range_end else None,
            )
            for perm in response.perm
        ]

    def role_grant_permission(
        self, role: str, key: str, *, permission: str = "read", prefix: bool = False, range_end: str | None = None
    ) -> None:
        """Grant ``permission`` (read/write/readwrite) on ``key``, on every key under it with
        ``prefix``, or on [key, range_end)."""
        if permission not in PERMISSIONS:
            raise KVStoreConfigError(f"permission {permission!r} is invalid; use read, write or readwrite")
        end = _range_end(key, prefix, range_end)
        perm = etcdrpc.Permission(permType=PERMISSIONS[permission], key=_key_bytes(key), range_end=end or b"")
        request = etcdrpc.AuthRoleGrantPermissionRequest(name=role, perm=perm)
        self._unary("Auth", "RoleGrantPermission", request, op="role_grant_permission", key=key)

    def role_revoke_permission(
        self, role: str, key: str, *, prefix: bool = False, range_end: str | None = None
    ) -> None:
        end = _range_end(key, prefix, range_end)
        request = etcdrpc.AuthRoleRevokePermissionRequest(role=role, key=key, range_end=_key_str(end) if end else "")
        self._unary("Auth", "RoleRevokePermission", request, op="role_revoke_permission", key=key)


def _range_end(key: str, prefix: bool, range_end: str | None) -> bytes | None:
    if prefix and range_end is not None:
        raise KVStoreConfigError("give either prefix=True or range_end, not both")
    if prefix:
        return prefix_range_end(_key_bytes(key))
    return _key_bytes(range_end) if range_end is not None else None


def _lease_id(lease: int | Lease | None) -> int:
    if lease is None:
        return 0
    if isinstance(lease, Lease):
        return lease.id
    return int(lease)


# --------------------------------------------------------------------------------------------
# lease keeper
# --------------------------------------------------------------------------------------------


class LeaseKeeper:
    """Refreshes a lease in a daemon thread; calls ``on_lost`` once if the lease is gone."""

    def __init__(self, client: KVStoreClient, lease: Lease, *, interval=None, on_lost=None):
        self.client = client
        self.lease = lease
        self.interval = interval or max(lease.ttl / 3.0, 0.5)
        self.on_lost = on_lost
        self.last_error: KVStoreError | None = None
        self.lost = False
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"kvstore-lease-{lease.id:x}", daemon=True)

    def start(self) -> LeaseKeeper:
        self._thread.start()
        return self

    def stop(self, timeout: float | None = None) -> None:
        self._stop.set()
        if self._thread.is_alive() and threading.current_thread() is not self._thread:
            self._thread.join(timeout)

    def _run(self) -> None:
        wait = self.interval
        while not self._stop.wait(wait):
            try:
                self.client.lease_keepalive(self.lease)
                self.last_error = None
                wait = self.interval
            except KVStoreLeaseNotFound as exc:
                self.lost = True
                self.last_error = exc
                if self.on_lost is not None:
                    self.on_lost(exc)
                return
            except KVStoreError as exc:
                if self._stop.is_set() or self.client.closed:
                    return
                self.last_error = exc
                log.warning("lease %x keepalive failed: %s", self.lease.id, exc)
                wait = min(self.interval, 1.0)


# --------------------------------------------------------------------------------------------
# watcher
# --------------------------------------------------------------------------------------------


class PrefixWatcher:
    """List-then-watch of a prefix that survives etcd restarts, lost connections and compaction.

    Iterate it (once) to receive :class:`WatchUpdate` objects; ``stop()`` from any thread ends
    the iteration promptly.  Errors that a retry can fix (endpoint down, connection lost,
    watch cancelled by the server) are retried with exponential backoff from the last revision
    seen, reported to ``on_error`` and kept in ``last_error``; they end the iteration with
    :class:`KVStoreUnavailable` only when ``give_up_after`` seconds pass without success.
    A denied read or watch raises :class:`KVStorePermissionDenied` at once.
    """

    def __init__(
        self,
        client: KVStoreClient,
        prefix: str,
        *,
        start_revision: int | None = None,
        create_timeout: float | None = None,
        backoff_initial: float = 0.2,
        backoff_max: float = 5.0,
        give_up_after: float | None = None,
        on_error: Callable[[KVStoreError], None] | None = None,
    ):
        if not prefix:
            raise KVStoreConfigError("watch_prefix needs a non-empty prefix")
        self.client = client
        self.prefix = prefix
        self.create_timeout = create_timeout or client.timeout
        self.backoff_initial = backoff_initial
        self.backoff_max = backoff_max
        self.give_up_after = give_up_after
        self.on_error = on_error
        self.last_error: KVStoreError | None = None
        self.revision = (start_revision - 1) if start_revision else 0
        self.relists = 0
        self.reconnects = 0
        self._need_list = start_revision is None
        self._keys: dict[str, int] = {}
        self._cluster_id = 0
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._inflight: Any = None
        self._started = False
        self._thread: threading.Thread | None = None

    # -- control --------------------------------------------------------------------------
    def stop(self) -> None:
        """End the iteration promptly (safe from any thread, idempotent)."""
        self._stop.set()
        with self._lock:
            inflight = self._inflight
        if inflight is not None:
            inflight.cancel()

    @property
    def stopped(self) -> bool:
        return self._stop.is_set()

    def __enter__(self) -> PrefixWatcher:
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def start_thread(
        self,
        callback: Callable[[WatchUpdate], None],
        on_exit: Callable[[BaseException | None], None] | None = None,
    ) -> threading.Thread:
        """Iterate in a daemon thread calling ``callback(update)``; ``on_exit(error or None)`` at the end."""

        def run() -> None:
            error: BaseException | None = None
            try:
                for update in self:
                    callback(update)
            except BaseException as exc:  # noqa: BLE001 - handed to on_exit
                error = exc
                if on_exit is None:
                    log.error("watch of %r ended: %s", self.prefix, exc)
            finally:
                self.stop()
                if on_exit is not None:
                    on_exit(error)

        self._thread = threading.Thread(target=run, name=f"kvstore-watch-{self.prefix}", daemon=True)
        self._thread.start()
        return self._thread

    def __iter__(self) -> Iterator[WatchUpdate]:
        if self._started:
            raise KVStoreError("a PrefixWatcher can be iterated only once")
        self._started = True
        return self._run()

    # -- main loop ------------------------------------------------------------------------
    def _run(self) -> Iterator[WatchUpdate]:
        backoff = self.backoff_initial
        healthy_since = time.monotonic()
        first_list = self._need_list  # with start_revision, a later listing is a resync
        try:
            while not self._stop.is_set():
                try:
                    if self._need_list:
                        update = self._relist(initial=first_list)
                        first_list = False
                        self._need_list = False
                        backoff = self.backoff_initial
                        healthy_since = time.monotonic()
                        yield update
                        continue
                    for update in self._watch_once():
                        backoff = self.backoff_initial
                        healthy_since = time.monotonic()
                        if update is not None:
                            yield update
                    # the stream ended without error: only a stop does that on purpose
                    if self._stop.is_set():
                        return
                    raise KVStoreUnavailable(f"watch {self.prefix!r}: the server closed the watch stream")
                except _Relist:
                    self._need_list = True
                    continue
                except _Stopped:
                    return
                except KVStorePermissionDenied:
                    raise
                except KVStoreConfigError:
                    raise
                except KVStoreError as exc:
                    if self._stop.is_set() or self.client.closed:
                        return
                    self.last_error = exc
                    self.reconnects += 1
                    log.warning("watch of %r interrupted, retrying in %.1fs: %s", self.prefix, backoff, exc)
                    if self.on_error is not None:
                        try:
                            self.on_error(exc)
                        except Exception:  # noqa: BLE001
                            log.exception("watch on_error callback failed")
                    if self.give_up_after is not None and time.monotonic() - healthy_since > self.give_up_after:
                        raise KVStoreUnavailable(
                            f"watch {self.prefix!r}: no success for {self.give_up_after:g}s, giving up: {exc}",
                            code=exc.code,
                            details=exc.details,
                        ) from exc
                    if self._stop.wait(backoff * random.uniform(0.8, 1.2)):
                        return
                    backoff = min(backoff * 2, self.backoff_max)
        finally:
            self._stop.set()

    def _relist(self, *, initial: bool) -> WatchUpdate:
        """List the prefix; build the initial update or the diff against the keys known so far."""

        def call(request):
            def attempt(ep: _Endpoint, deadline: float, wait: bool):
                future = self.client._stub(ep, "KV").Range.future(request, timeout=deadline, wait_for_ready=wait)
                with self._lock:
                    self._inflight = future
                if self._stop.is_set():
                    future.cancel()
                try:
                    return future.result()
                except grpc.FutureCancelledError:
                    raise _Stopped() from None
                finally:
                    with self._lock:
                        self._inflight = None

            return self.client._failover("watch list", self.prefix, attempt)

        listing, cluster_id = self.client._list(self.prefix, call=call)
        self._cluster_id = cluster_id
        current = {kv.key: kv for kv in listing.kvs}
        events: list[WatchEvent] = []
        if not initial:
            self.relists += 1
            for key in sorted(set(self._keys) - set(current)):
                events.append(WatchEvent(EVENT_DELETE, key, b"", listing.revision, None, synthetic=True))
        for kv in listing.kvs:
            if initial or self._keys.get(kv.key) != kv.mod_revision:
                events.append(WatchEvent(EVENT_PUT, kv.key, kv.value, kv.mod_revision, kv, synthetic=True))
        self._keys = {kv.key: kv.mod_revision for kv in listing.kvs}
        self.revision = listing.revision
        return WatchUpdate(UPDATE_INITIAL if initial else UPDATE_RESYNC, listing.revision, tuple(events), listing.kvs)

    def _watch_once(self) -> Iterator[WatchUpdate | None]:
        """One watch stream from ``revision + 1``; yields updates, raises on any interruption."""
        endpoint = self.client._order()[0]
        stub = self.client._stub(endpoint, "Watch")
        start = _key_bytes(self.prefix)
        create = etcdrpc.WatchCreateRequest(
            key=start,
            range_end=prefix_range_end(start),
            start_revision=self.revision + 1,
            progress_notify=True,
        )
        done = threading.Event()

        def requests():
            yield etcdrpc.WatchRequest(create_request=create)
            # keep our side of the stream open until this attempt ends
            while not done.wait(1.0):
                if self._stop.is_set():
                    return

        # "hasleader": etcd closes the stream (UNAVAILABLE, no leader) when this member loses
        # its leader, instead of keeping a watch that can no longer see changes.
        call = stub.Watch(requests(), metadata=REQUIRE_LEADER)
        watchdog_fired = threading.Event()

        def watchdog():
            watchdog_fired.set()
            call.cancel()

        timer = threading.Timer(self.create_timeout, watchdog)
        timer.daemon = True
        with self._lock:
            self._inflight = call
        if self._stop.is_set():
            call.cancel()
        timer.start()
        created = False
        try:
            for response in call:
                if not created:
                    if not response.created:
                        continue
                    created = True
                    timer.cancel()
                    self.client._mark_ok(endpoint)
                    self._check_store(response)
                    if not response.canceled:
                        yield None  # tells the caller the watch is healthy (resets backoff)
                if response.compact_revision:
                    log.info(
                        "watch of %r: revision %d compacted (oldest %d), listing again",
                        self.prefix,
                        self.revision + 1,
                        response.compact_revision,
                    )
                    raise _Relist()
                if response.canceled:
                    raise self._cancelled(response, endpoint)
                if response.events:
                    update = self._apply(response)
                    if update is not None:
                        yield update
                elif response.header.revision > self.revision and not response.created:
                    # progress notification: nothing under the prefix changed up to this revision
                    self.revision = response.header.revision
            if self._stop.is_set():
                raise _Stopped()
        except grpc.RpcError as exc:
            if self._stop.is_set() or self.client.closed:
                raise _Stopped() from None
            if watchdog_fired.is_set():
                self.client._mark_failed(endpoint)
                raise KVStoreUnavailable(
                    f"watch {self.prefix!r}: {endpoint.url} did not create the watch within {self.create_timeout:g}s"
                ) from None
            err = self.client._translate(exc, endpoint, "watch", self.prefix)
            if isinstance(err, KVStoreUnavailable):
                self.client._mark_failed(endpoint)
            raise err from None
        finally:
            timer.cancel()
            done.set()
            with self._lock:
                self._inflight = None
            call.cancel()

    def _check_store(self, response) -> None:
        header = response.header
        if self._cluster_id and header.cluster_id and header.cluster_id != self._cluster_id:
            log.warning(
                "watch of %r: etcd cluster ID changed (%x -> %x), listing again",
                self.prefix,
                self._cluster_id,
                header.cluster_id,
            )
            raise _Relist()
        if self._cluster_id and header.revision and header.revision < self.revision:
            log.warning(
                "watch of %r: store revision went back (%d < %d), listing again",
                self.prefix,
                header.revision,
                self.revision,
            )
            raise _Relist()
        if header.cluster_id:
            self._cluster_id = header.cluster_id

    def _cancelled(self, response, endpoint: _Endpoint) -> KVStoreError:
        reason = response.cancel_reason or "no reason given"
        if "permission denied" in reason.lower():
            user = f"user {self.client.user!r}" if self.client.user else "this client"
            return KVStorePermissionDenied(
                f"watch {self.prefix!r}: etcd denied {user} ({reason}) at {endpoint.url}; "
                "grant the user's role read access to the prefix",
                key=self.prefix,
                user=self.client.user,
                code="PERMISSION_DENIED",
                details=reason,
            )
        return KVStoreError(f"watch {self.prefix!r}: cancelled by {endpoint.url}: {reason}", details=reason)

    def _apply(self, response) -> WatchUpdate | None:
        events: list[WatchEvent] = []
        for ev in response.events:
            kv = ev.kv
            if kv.mod_revision <= self.revision:
                continue  # already delivered before a reconnect
            key = _key_str(kv.key)
            if ev.type == 1:  # DELETE
                self._keys.pop(key, None)
                events.append(WatchEvent(EVENT_DELETE, key, b"", kv.mod_revision, None))
            else:
                item = KV.from_pb(kv)
                self._keys[key] = kv.mod_revision
                events.append(WatchEvent(EVENT_PUT, key, kv.value, kv.mod_revision, item))
        if not events:
            return None
        self.revision = max(self.revision, max(event.revision for event in events))
        return WatchUpdate(UPDATE_EVENTS, self.revision, tuple(events))
