# -*- coding: utf-8 -*-
# Copyright: clustermesh.core contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""Health of a node's kvstore connections: its own cluster and every cluster it connects to.

For each etcd-config file of a node (``<config_dir>/kvstore.yaml`` for the node's own cluster,
``<config_dir>/clusters.d/<peer>`` for every connected cluster; names with a '.' there are the
certificate files that go with them) :func:`check_cluster` reports:

* whether etcd answers, through which endpoint, and the latency of a small read;
* the server's identity: the certificate it presents in a TLS handshake made with Python's
  ``ssl`` module (CA verified, host name checked, client certificate loaded), and etcd's Status
  (version, member ID, leader, database size);
* ``cilium/cluster-config/<cluster>`` decoded, compared with an expected cluster ID if given;
* the age of ``cilium/.heartbeat`` (absent until the agent runs: reported as "no heartbeat yet");
* for a remote cluster, that its credentials are read-only: a put of a probe key under
  ``cilium/state/clustermesh-readonly-probe/<node>`` must be denied by etcd; if it is accepted
  the key is deleted again at once and the cluster is reported writable (a security problem);
* how many keys of each kind lie under ``cilium/state/`` (keys only, in pages).

:func:`row` and :func:`format_table` turn the results into the table that ``playbooks/status.yml``
prints.  No Ansible imports here.
"""

from __future__ import annotations

import datetime
import hashlib
import os
import re
import socket
import ssl
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any
from urllib.parse import urlsplit

from . import kvstore_layout as layout
from .control_plane import CLUSTERS_DIR, CONFIG_DIR, KVSTORE_CONFIG

# The etcd client (grpcio, etcd-sdk-python) and the config reader (PyYAML) are imported where they
# are used, so that the pure parts (classification, heartbeat, table) work without them;
# missing_requirements() says what is missing.

DEFAULT_TIMEOUT = 5.0
PROBE_PREFIX = layout.STATE_PREFIX + "clustermesh-readonly-probe/"
LIST_PAGE_SIZE = 1000
KEY_KINDS = ("nodes", "services", "ip", "identities", "other", "invalid", "foreign")
NO_HEARTBEAT = "no heartbeat yet"
# A heartbeat is written once a minute; older than this it is reported as stale.
HEARTBEAT_STALE_AFTER = 180.0
# etcd user names of the control plane (docs/control-plane.md).
_ADMIN_CN = re.compile(r"^admin-(.+)$")
_REMOTE_CN = re.compile(r"^remote-(.+)$")

# row key -> column title, in table order
TABLE_COLUMNS = {
    "node": "NODE",
    "cluster": "CLUSTER",
    "role": "ROLE",
    "reachable": "REACHABLE",
    "cluster_id": "ID",
    "heartbeat": "HEARTBEAT",
    "read_only": "READ-ONLY",
    "keys": "KEYS",
    "status": "STATUS",
    "error": "ERROR",
}


# --------------------------------------------------------------------------------------------
# which clusters a node talks to
# --------------------------------------------------------------------------------------------


def discover(config_dir: str = CONFIG_DIR) -> list[dict[str, Any]]:
    """``[{name, path, local}]``: the node's own cluster first (name None: unknown until its
    certificate is read), then one entry per etcd-config file in ``clusters.d``, sorted."""
    found = [{"name": None, "path": os.path.join(config_dir, KVSTORE_CONFIG), "local": True}]
    clusters_dir = os.path.join(config_dir, CLUSTERS_DIR)
    try:
        entries = sorted(os.listdir(clusters_dir))
    except FileNotFoundError:
        entries = []
    for entry in entries:
        path = os.path.join(clusters_dir, entry)
        # names with a '.' are the certificate files of a config (and hidden/temporary files)
        if "." in entry or not os.path.isfile(path):
            continue
        found.append({"name": entry, "path": path, "local": False})
    return found


def cluster_from_user(user: str | None, local: bool) -> str | None:
    """The cluster a client certificate CN names: ``admin-<cluster>`` is the own cluster's
    read-write user; ``remote-<cluster>`` is the user that ``<cluster>`` reads peers with."""
    if not user:
        return None
    match = (_ADMIN_CN if local else _REMOTE_CN).match(user)
    return match.group(1) if match else None


# --------------------------------------------------------------------------------------------
# pure helpers: key classification, heartbeat age, cluster config
# --------------------------------------------------------------------------------------------


def classify_key(key: str, cluster: str | None = None) -> str:
    """Kind of a key under ``cilium/state/``: ``nodes``, ``services``, ``ip``, ``identities``
    (identity ID keys), ``other`` (anything else, e.g. the allocator's value keys), ``invalid``
    (under a known prefix but malformed) or ``foreign`` (a node or service that names a cluster
    other than ``cluster``, which owns this kvstore: no cluster publishes another's state)."""
    try:
        if key.startswith(layout.NODES_PREFIX):
            owner = layout.parse_node_key(key).cluster
            return "foreign" if cluster and owner != cluster else "nodes"
        if key.startswith(layout.SERVICES_PREFIX):
            owner = layout.parse_service_key(key).cluster
            return "foreign" if cluster and owner != cluster else "services"
        if key.startswith(layout.IP_PREFIX):
            layout.parse_ip_key(key)
            return "ip"
        if key.startswith(layout.IDENTITY_ID_PREFIX):
            layout.parse_identity_key(key)
            return "identities"
    except layout.KeyLayoutError:
        return "invalid"
    return "other"


def count_keys(keys, cluster: str | None = None) -> dict[str, int]:
    """Counts per kind (every kind of KEY_KINDS present, 0 when none)."""
    counts = dict.fromkeys(KEY_KINDS, 0)
    for key in keys:
        counts[classify_key(key, cluster)] += 1
    return counts


def heartbeat_age(value: bytes | str | None, now: datetime.datetime | None = None) -> tuple[float | None, str | None]:
    """(age in seconds, note) of a ``cilium/.heartbeat`` value; None is a missing heartbeat.

    The note is None for a fresh heartbeat, else says what is wrong (absent, unparsable, stale,
    in the future).  A negative age means the clocks of the writer and this node disagree.
    """
    if value is None:
        return None, NO_HEARTBEAT
    try:
        written = layout.decode_timestamp(value)
    except layout.KeyLayoutError as exc:
        return None, f"heartbeat unreadable: {exc}"
    now = now or datetime.datetime.now(datetime.UTC)
    age = round((now - written).total_seconds(), 1)
    if age > HEARTBEAT_STALE_AFTER:
        return age, f"heartbeat stale ({age:g}s old)"
    if age < -5:
        return age, f"heartbeat {-age:g}s in the future (clock skew?)"
    return age, None


def probe_key(node: str | None = None) -> str:
    """The read-only probe key of this node (nobody else uses it)."""
    node = node or socket.gethostname() or "unknown"
    return PROBE_PREFIX + (re.sub(r"[^A-Za-z0-9._-]", "_", node) or "unknown")


# --------------------------------------------------------------------------------------------
# server identity (ssl)
# --------------------------------------------------------------------------------------------


def _fingerprint(der: bytes) -> str:
    return hashlib.sha256(der).hexdigest().upper()


def _colon(hex_text: str) -> str:
    return ":".join(hex_text[i : i + 2] for i in range(0, len(hex_text), 2))


def _name_field(name, oid_name: str) -> str | None:
    for rdn in name or ():
        for key, value in rdn:
            if key == oid_name:
                return value
    return None


def _name_text(name) -> str:
    return ",".join(f"{key}={value}" for rdn in name or () for key, value in rdn)


def describe_peer_certificate(info: dict | None, der: bytes | None) -> dict[str, Any]:
    """The server certificate as reported: subject CN, SANs (``DNS:x``, ``IP:y``), issuer, validity,
    SHA-256 fingerprint.  ``info`` is ``SSLSocket.getpeercert()`` (only filled after verification);
    without it the DER is decoded with ``cryptography`` when that is installed."""
    result: dict[str, Any] = {
        "subject_cn": None,
        "subject": None,
        "sans": [],
        "issuer_cn": None,
        "issuer": None,
        "not_after": None,
        "serial": None,
        "fingerprint_sha256": _colon(_fingerprint(der)) if der else None,
    }
    if info:
        result["subject_cn"] = _name_field(info.get("subject"), "commonName")
        result["subject"] = _name_text(info.get("subject"))
        result["issuer_cn"] = _name_field(info.get("issuer"), "commonName")
        result["issuer"] = _name_text(info.get("issuer"))
        sans = []
        for kind, value in info.get("subjectAltName", ()):
            kind = "IP" if kind == "IP Address" else kind
            sans.append(f"{kind}:{str(value).strip()}")
        result["sans"] = sans
        result["not_after"] = info.get("notAfter")
        result["serial"] = info.get("serialNumber")
        return result
    if der:
        try:
            from cryptography import x509
            from cryptography.x509.oid import NameOID
        except ImportError:  # the fingerprint is still there
            return result
        try:
            cert = x509.load_der_x509_certificate(der)
        except ValueError:
            return result
        cns = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
        icns = cert.issuer.get_attributes_for_oid(NameOID.COMMON_NAME)
        result["subject_cn"] = str(cns[0].value) if cns else None
        result["subject"] = cert.subject.rfc4514_string()
        result["issuer_cn"] = str(icns[0].value) if icns else None
        result["issuer"] = cert.issuer.rfc4514_string()
        try:
            ext = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
            result["sans"] = [f"DNS:{n}" for n in ext.get_values_for_type(x509.DNSName)] + [
                f"IP:{ip}" for ip in ext.get_values_for_type(x509.IPAddress)
            ]
        except x509.ExtensionNotFound:
            pass
        result["not_after"] = cert.not_valid_after_utc.strftime("%b %d %H:%M:%S %Y GMT")
        result["serial"] = format(cert.serial_number, "X")
    return result


def _split_url(url: str) -> tuple[str, int, bool]:
    parts = urlsplit(url)
    return parts.hostname or "", parts.port or 2379, parts.scheme == "https"


def _network_error(exc: BaseException, timeout: float) -> str:
    if isinstance(exc, TimeoutError | socket.timeout):
        return f"no answer within {timeout:g}s"
    if isinstance(exc, ConnectionRefusedError):
        return "connection refused (nothing listens on that port)"
    if isinstance(exc, socket.gaierror):
        return f"cannot resolve the host name: {exc.strerror or exc}"
    if isinstance(exc, ConnectionResetError):
        return "connection reset during the TLS handshake (is it a TLS endpoint? does it accept this client?)"
    return getattr(exc, "strerror", None) or str(exc) or type(exc).__name__


def probe_endpoint(
    url: str,
    *,
    ca_file: str | None,
    cert_file: str | None,
    key_file: str | None,
    timeout: float = DEFAULT_TIMEOUT,
) -> dict[str, Any]:
    """TLS handshake with ``url`` as the etcd client does it: CA verified, host name (or IP)
    checked against the certificate's SANs, client certificate presented.

    Returns ``{url, reachable, verified, error, tls_version, certificate}``.  ``reachable`` is
    False only for network failures (refused, unreachable, no answer within ``timeout``); when
    the certificate does not verify, a second, unverified handshake still fetches it, so the
    report shows what the server presented (``verified`` False, ``error`` says why).
    """
    host, port, secure = _split_url(url)
    out: dict[str, Any] = {
        "url": url,
        "reachable": False,
        "verified": False,
        "error": None,
        "tls_version": None,
        "certificate": None,
    }
    if not secure:
        try:
            socket.create_connection((host, port), timeout=timeout).close()
        except OSError as exc:
            out["error"] = _network_error(exc, timeout)
            return out
        out.update(reachable=True, error="plaintext endpoint: no server certificate")
        return out

    try:
        verifying = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=ca_file)
        trusting = ssl.create_default_context(ssl.Purpose.SERVER_AUTH)
        trusting.check_hostname = False
        trusting.verify_mode = ssl.CERT_NONE
        if cert_file:
            for context in (verifying, trusting):
                context.load_cert_chain(cert_file, key_file)
    except (OSError, ssl.SSLError) as exc:
        out.update(reachable=None, error=f"cannot load the TLS files (trusted-ca-file, cert-file, key-file): {exc}")
        return out

    def handshake(context):
        deadline = time.monotonic() + timeout
        with socket.create_connection((host, port), timeout=timeout) as sock:
            sock.settimeout(max(deadline - time.monotonic(), 0.05))
            with context.wrap_socket(sock, server_hostname=host) as tls:
                return tls.getpeercert(), tls.getpeercert(binary_form=True), tls.version()

    try:
        info, der, version = handshake(verifying)
    except ssl.SSLCertVerificationError as exc:
        out.update(reachable=True, error=f"server certificate rejected: {exc.verify_message or exc}")
        try:
            der, version = handshake(trusting)[1:]
        except OSError:  # includes ssl.SSLError
            return out
        out.update(tls_version=version, certificate=describe_peer_certificate(None, der))
        return out
    except ssl.SSLEOFError:
        out.update(
            reachable=True,
            error="the connection was closed during the TLS handshake (a proxy without a healthy backend?)",
        )
        return out
    except ssl.SSLError as exc:
        out.update(reachable=True, error=f"TLS handshake failed: {exc.reason or exc}")
        return out
    except OSError as exc:  # refused, unreachable, no answer in time
        out["error"] = _network_error(exc, timeout)
        return out
    out.update(
        reachable=True,
        verified=True,
        tls_version=version,
        certificate=describe_peer_certificate(info, der),
    )
    return out


def probe_endpoints(urls, *, ca_file, cert_file, key_file, timeout) -> list[dict[str, Any]]:
    """:func:`probe_endpoint` on every URL at once (each bounded by ``timeout``), in URL order."""
    urls = list(urls)
    with ThreadPoolExecutor(max_workers=max(1, min(len(urls), 8))) as pool:
        futures = [
            pool.submit(probe_endpoint, url, ca_file=ca_file, cert_file=cert_file, key_file=key_file, timeout=timeout)
            for url in urls
        ]
        return [future.result() for future in futures]


# --------------------------------------------------------------------------------------------
# one cluster
# --------------------------------------------------------------------------------------------


def empty_result(name: str | None, path: str, local: bool) -> dict[str, Any]:
    return {
        "name": name,
        "local": local,
        "config": path,
        "user": None,
        "reachable": False,
        "error": None,
        "endpoint": None,
        "endpoints": [],
        "latency_ms": None,
        "server": None,
        "etcd": None,
        "cluster_id": None,
        "cluster_id_expected": None,
        "cluster_id_ok": None,
        "heartbeat_age": None,
        "heartbeat_note": None,
        "read_only": None,
        "read_only_note": None,
        "probe_key_left": None,
        "keys": None,
        "problems": [],
        "ok": False,
    }


def _timed(func, *args, **kwargs):
    started = time.monotonic()
    result = func(*args, **kwargs)
    return result, round((time.monotonic() - started) * 1000.0, 2)


def _etcd_status(raw: dict[str, Any]) -> dict[str, Any]:
    return {
        "version": raw.get("version"),
        "member_id": format(raw.get("member_id") or 0, "x"),
        "leader": format(raw.get("leader") or 0, "x"),
        "is_leader": bool(raw.get("member_id")) and raw.get("member_id") == raw.get("leader"),
        "raft_term": raw.get("raft_term"),
        "revision": raw.get("revision"),
        "db_size": raw.get("db_size"),
        "etcd_cluster_id": format(raw.get("cluster_id") or 0, "x"),
    }


def _server(probe: dict[str, Any]) -> dict[str, Any]:
    return dict(
        probe["certificate"] or {},
        verified=probe["verified"],
        tls_version=probe["tls_version"],
        error=probe["error"],
    )


def missing_requirements() -> str | None:
    """None when the etcd client can be imported, else the import error."""
    try:
        from . import kvstore_client, kvstore_config  # noqa: F401
    except ImportError as exc:
        return str(exc)
    return None


def _connect(config, candidates: list[str], timeout: float, client_factory):
    """The first candidate endpoint whose etcd answers Status: (client, endpoint, status, errors)."""
    from .kvstore_client import KVStoreError, KVStorePermissionDenied

    errors = []
    for url in candidates:
        client = client_factory(config, endpoints=[url], timeout=timeout, connect_timeout=timeout)
        try:
            status = client.status()
        except KVStorePermissionDenied as exc:  # it answered: reachable, but Status is not allowed
            return client, url, {"error": str(exc)}, errors
        except KVStoreError as exc:
            client.close()
            errors.append(f"{url}: {exc.details or exc}")
            continue
        except BaseException:
            client.close()
            raise
        return client, url, _etcd_status(status), errors
    return None, None, None, errors


def check_cluster(
    name: str | None,
    path: str,
    *,
    local: bool,
    timeout: float = DEFAULT_TIMEOUT,
    expected: dict[str, int] | None = None,
    verify_read_only: bool = True,
    node: str | None = None,
    client_factory=None,
    now: datetime.datetime | None = None,
) -> dict[str, Any]:
    """Everything the module reports about one cluster (see the module's RETURN).

    ``name`` None for the local cluster means "from the admin certificate's CN".  ``expected``
    maps cluster names to the cluster IDs they must have.  Never raises for a problem of the
    cluster: it lands in ``error`` and ``problems`` (``ok`` is True when there is none).
    """
    from .kvstore_client import KVStoreClient, KVStoreError, certificate_common_name
    from .kvstore_config import KVStoreConfigError, load_etcd_config

    client_factory = client_factory or KVStoreClient.from_config
    result = empty_result(name, path, local)
    problems = result["problems"]

    # -- the config file and its credentials -------------------------------------------------
    if not os.path.exists(path):
        what = "this node's own cluster" if local else f"cluster {name}"
        result["error"] = f"{path} does not exist: the node has not joined {what} (role mesh, module mesh_join)"
        problems.append(result["error"])
        return result
    try:
        config = load_etcd_config(path, resolve_relative=True)
    except KVStoreConfigError as exc:
        result["error"] = str(exc)
        problems.append(result["error"])
        return result
    if config.cert_file:
        try:
            with open(config.cert_file, "rb") as handle:
                result["user"] = certificate_common_name(handle.read())
        except OSError as exc:
            result["error"] = f"{path}: cannot read cert-file {config.cert_file}: {exc.strerror}"
            problems.append(result["error"])
            return result
    if local and name is None:
        name = result["name"] = cluster_from_user(result["user"], True)
    if name is not None:
        try:
            layout.validate_cluster_name(name)
        except layout.KeyLayoutError as exc:
            result["error"] = f"{path}: {exc}"
            problems.append(result["error"])
            return result
    expected_id = (expected or {}).get(name) if name else None
    result["cluster_id_expected"] = expected_id

    # -- reachability and server identity -------------------------------------------------
    probes = probe_endpoints(
        config.endpoints,
        ca_file=config.trusted_ca_file,
        cert_file=config.cert_file,
        key_file=config.key_file,
        timeout=timeout,
    )
    result["endpoints"] = [{"url": p["url"], "reachable": p["reachable"], "error": p["error"]} for p in probes]
    if not any(p["reachable"] or p["reachable"] is None for p in probes):
        result["error"] = "no endpoint reachable: " + "; ".join(f"{p['url']}: {p['error']}" for p in probes)
        problems.append(result["error"])
        return result
    # verified endpoints first, then the others that answered, in config order
    candidates = [p["url"] for p in probes if p["verified"]] + [
        p["url"] for p in probes if not p["verified"] and p["reachable"] is not False
    ]
    try:
        client, endpoint, etcd, errors = _connect(config, candidates, timeout, client_factory)
    except KVStoreError as exc:  # bad TLS material and the like
        result["error"] = str(exc)
        problems.append(result["error"])
        return result
    if client is None:
        result["error"] = "etcd did not answer: " + "; ".join(errors)
        seen = [p for p in probes if p["error"]]
        if seen:
            result["error"] += " (TLS probe: " + "; ".join(f"{p['url']}: {p['error']}" for p in seen) + ")"
        presented = next((p for p in probes if p["certificate"]), None)
        if presented:  # what the server showed, to diagnose a wrong CA or name
            result["server"] = _server(presented)
        problems.append(result["error"])
        return result
    result.update(reachable=True, endpoint=endpoint, etcd=etcd)
    result["server"] = _server(next(p for p in probes if p["url"] == endpoint))
    down = [p["url"] for p in probes if p["reachable"] is False]
    if down:
        problems.append("unreachable endpoint(s): " + ", ".join(down))

    with client:
        # -- cluster config (also the latency sample: one small linearizable read) ----------
        if name is None:
            problems.append(
                f"cannot tell this node's cluster: the client certificate CN {result['user']!r} is not admin-<cluster>"
            )
        else:
            key = layout.cluster_config_key(name)
            try:
                kv, result["latency_ms"] = _timed(client.get, key)
            except KVStoreError as exc:
                problems.append(f"read {key}: {exc}")
                kv = None
            else:
                if kv is None:
                    problems.append(f"{key} does not exist (the kvstore role publishes it)")
                else:
                    try:
                        result["cluster_id"] = layout.decode_cluster_config(kv.value).id
                    except layout.KeyLayoutError as exc:
                        problems.append(f"{key}: {exc}")
            if expected_id is not None and result["cluster_id"] is not None:
                result["cluster_id_ok"] = result["cluster_id"] == expected_id
                if not result["cluster_id_ok"]:
                    problems.append(f"cluster ID is {result['cluster_id']}, expected {expected_id}")

        # -- heartbeat --------------------------------------------------------------------
        try:
            kv, latency = _timed(client.get, layout.HEARTBEAT_KEY)
            if result["latency_ms"] is None:
                result["latency_ms"] = latency
            age, note = heartbeat_age(kv.value if kv else None, now)
            result["heartbeat_age"], result["heartbeat_note"] = age, note
        except KVStoreError as exc:
            result["heartbeat_note"] = f"cannot read {layout.HEARTBEAT_KEY}: {exc}"

        # -- read-only (remote clusters) --------------------------------------------------
        if local:
            result["read_only_note"] = "not checked: the local cluster is written with the admin user"
        elif not verify_read_only:
            result["read_only_note"] = "not checked (verify_read_only=false)"
        else:
            _verify_read_only(client, probe_key(node), result)

        # -- key counts -------------------------------------------------------------------
        result["keys"] = _key_counts(client, name, problems)

    result["ok"] = not problems
    return result


def _verify_read_only(client, key: str, result: dict[str, Any]) -> None:
    from .kvstore_client import KVStoreError, KVStorePermissionDenied

    problems = result["problems"]
    value = layout.encode_timestamp()
    try:
        client.put(key, value)
    except KVStorePermissionDenied:
        result["read_only"] = True
        result["read_only_note"] = f"a write to {key} was denied"
        return
    except KVStoreError as exc:
        # the put may or may not have been applied (a timeout): try to remove it anyway
        try:
            client.delete(key)
        except KVStoreError:
            pass
        result["read_only_note"] = f"not verified: the probe write failed without an answer: {exc}"
        problems.append(result["read_only_note"])
        return
    result["read_only"] = False
    try:
        client.delete(key)
        undone = "it was deleted again"
    except KVStoreError as exc:
        undone = f"deleting it again FAILED ({exc}); remove {key} by hand"
        result["probe_key_left"] = key
    user = result.get("user") or "this client"
    result["read_only_note"] = (
        f"SECURITY: cluster {result['name']} accepted a write to {key} from user {user!r} ({undone}); "
        "the credentials in clusters.d must be the read-only remote-<cluster> user"
    )
    problems.append(result["read_only_note"])


def _key_counts(client, cluster: str | None, problems: list[str]) -> dict[str, int | None] | None:
    """Counts per kind under cilium/state/; kinds the user may not list are None."""
    from .kvstore_client import KVStoreError, KVStorePermissionDenied

    try:
        listing = client.get_prefix(layout.STATE_PREFIX, keys_only=True, page_size=LIST_PAGE_SIZE)
        return count_keys((kv.key for kv in listing), cluster)
    except KVStorePermissionDenied:
        pass
    except KVStoreError as exc:
        problems.append(f"list {layout.STATE_PREFIX}: {exc}")
        return None
    # the user may not list all of cilium/state/: count what it may read, kind by kind
    counts: dict[str, int | None] = dict.fromkeys(KEY_KINDS, None)
    for kind, prefix in (
        ("nodes", layout.NODES_PREFIX),
        ("services", layout.SERVICES_PREFIX),
        ("ip", layout.IP_PREFIX),
        ("identities", layout.IDENTITY_ID_PREFIX),
    ):
        try:
            listing = client.get_prefix(prefix, keys_only=True, page_size=LIST_PAGE_SIZE)
        except KVStorePermissionDenied:
            continue
        except KVStoreError as exc:
            problems.append(f"list {prefix}: {exc}")
            continue
        for key, count in count_keys((kv.key for kv in listing), cluster).items():
            if count or key == kind:
                counts[key] = (counts[key] or 0) + count
    return counts


# --------------------------------------------------------------------------------------------
# the whole node
# --------------------------------------------------------------------------------------------


def mesh_status(
    config_dir: str = CONFIG_DIR,
    *,
    cluster: str | None = None,
    timeout: float = DEFAULT_TIMEOUT,
    expected: dict[str, int] | None = None,
    verify_read_only: bool = True,
    node: str | None = None,
    client_factory=None,
) -> dict[str, Any]:
    """``{node, config_dir, clusters: [...], ok}`` for every cluster of ``config_dir``.

    ``cluster`` names the node's own cluster (default: from the CN ``admin-<cluster>`` of the
    certificate in kvstore.yaml).  The clusters are checked in parallel.
    """
    node = node or socket.gethostname()
    entries = discover(config_dir)
    entries[0]["name"] = cluster

    def one(entry):
        return check_cluster(
            entry["name"],
            entry["path"],
            local=entry["local"],
            timeout=timeout,
            expected=expected,
            verify_read_only=verify_read_only,
            node=node,
            client_factory=client_factory,
        )

    with ThreadPoolExecutor(max_workers=max(1, min(len(entries), 8))) as pool:
        results = list(pool.map(one, entries))
    local = results[0]
    # Cilium ignores a clusters.d file named after the node's own cluster; so do we
    clusters = [local] + [r for r in results[1:] if r["name"] != local["name"]]
    return {
        "node": node,
        "config_dir": config_dir,
        "clusters": clusters,
        "ok": all(r["ok"] for r in clusters),
    }


# --------------------------------------------------------------------------------------------
# the table
# --------------------------------------------------------------------------------------------


def _keys_text(keys: dict[str, int | None] | None) -> str:
    if keys is None:
        return "-"
    short = (("nodes", "nodes"), ("services", "svc"), ("ip", "ip"), ("identities", "id"))
    parts = [f"{label}={'?' if keys.get(kind) is None else keys[kind]}" for kind, label in short]
    for kind in ("other", "invalid", "foreign"):
        if keys.get(kind):
            parts.append(f"{kind}={keys[kind]}")
    return " ".join(parts)


def row(node: str, result: dict[str, Any]) -> dict[str, str]:
    """One table row (every cell a string) for one cluster seen from one node."""
    endpoints = result.get("endpoints") or []
    if result.get("reachable"):
        up = sum(1 for e in endpoints if e.get("reachable"))
        reachable = "yes" if not endpoints or up == len(endpoints) else f"yes {up}/{len(endpoints)}"
        if result.get("latency_ms") is not None:
            reachable += f" {result['latency_ms']:.1f}ms"
    else:
        reachable = "NO"
    cluster_id = "-" if result.get("cluster_id") is None else str(result["cluster_id"])
    if result.get("cluster_id_ok") is False:
        cluster_id += f" (want {result.get('cluster_id_expected')})"
    age = result.get("heartbeat_age")
    if age is not None:
        heartbeat = f"{age:.0f}s"
        if result.get("heartbeat_note"):
            heartbeat += " (stale)" if age > 0 else " (future)"
    elif result.get("reachable"):
        heartbeat = "none yet" if result.get("heartbeat_note") == NO_HEARTBEAT else "?"
    else:
        heartbeat = "-"
    read_only = {True: "yes", False: "NO (WRITABLE)", None: "-"}[result.get("read_only")]
    if result.get("read_only") is None and not result.get("local") and result.get("reachable"):
        read_only = "unverified"
    return {
        "node": node,
        "cluster": result.get("name") or "?",
        "role": "local" if result.get("local") else "remote",
        "reachable": reachable,
        "cluster_id": cluster_id,
        "heartbeat": heartbeat,
        "read_only": read_only,
        "keys": _keys_text(result.get("keys")),
        "status": "ok" if result.get("ok") else "FAIL",
        "error": "; ".join(result.get("problems") or ([result["error"]] if result.get("error") else [])),
    }


def failed_node_row(node: str, message: str) -> dict[str, str]:
    """The row of a node where the module could not run at all."""
    cells = dict.fromkeys(TABLE_COLUMNS, "-")
    cells.update(node=node, cluster="?", status="FAIL", error=message or "no result")
    return cells


def format_table(rows: list[dict[str, str]]) -> list[str]:
    """Aligned lines: a header, then one line per row (the last column is not padded)."""
    header = dict(TABLE_COLUMNS)
    keys = list(TABLE_COLUMNS)
    widths = {key: max(len(str(r.get(key, ""))) for r in [header, *rows]) for key in keys}
    lines = []
    for r in [header, *rows]:
        cells = [str(r.get(key, "")).ljust(widths[key]) for key in keys[:-1]] + [str(r.get(keys[-1], ""))]
        lines.append("  ".join(cells).rstrip())
    return lines
