# -*- coding: utf-8 -*-
# Copyright: clustermesh.core contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""The mesh's PKI: CAs, etcd server/peer certificates and etcd client certificates.

Shared by the ``clustermesh.core.pki`` module, the roles' helpers, the node agent and the tests;
it imports nothing from Ansible.

Three kinds of certificate:

``ca``
    self-signed, ``basicConstraints CA:TRUE, pathlen:0`` (it signs leaves only),
    key usage keyCertSign + cRLSign + digitalSignature.
``server``
    ``CA:FALSE``, EKU serverAuth + clientAuth (so the same certificate serves etcd's client port and
    authenticates etcd peers), DNS and IP subject alternative names (at least one: Go's TLS, and so
    etcd, ignores the common name for host name checks).
``client``
    ``CA:FALSE``, EKU clientAuth; the common name is the etcd user name (etcd maps the client
    certificate's CN to its user when ``--client-cert-auth`` is on).

The private key is the durable part, the certificate is derived from it: re-issuing keeps a valid
existing key of the wanted type (so a renewed CA with the same key and name still verifies every
leaf it signed before), unless the caller asks for a new one.  See :func:`plan_certificate` for when
a certificate must be (re)issued.

Nothing here logs, prints or puts private key material into an exception message or a ``repr``.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import ipaddress
import os
import re
import tempfile
from dataclasses import dataclass, field

try:
    from cryptography import x509
    from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec, ed448, ed25519, rsa
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
except ImportError as exc:  # modules report it with missing_required_lib
    x509 = InvalidSignature = UnsupportedAlgorithm = hashes = serialization = None
    ec = ed448 = ed25519 = rsa = ExtendedKeyUsageOID = NameOID = None
    IMPORT_ERROR = exc
else:
    IMPORT_ERROR = None

KINDS = ("ca", "server", "client")
KEY_TYPES = ("ec256", "rsa2048")
DEFAULT_KEY_TYPE = "ec256"
DEFAULT_VALID_DAYS = {"ca": 3650, "server": 365, "client": 365}
DEFAULT_RENEW_BEFORE_DAYS = 30
# A new certificate is valid from a little before "now", so that hosts whose clocks lag the issuer's
# slightly accept it at once.
BACKDATE = _dt.timedelta(minutes=5)

KEY_FILE_MODE = 0o600
KEY_DIR_MODE = 0o700
CERT_FILE_MODE = 0o644
CERT_DIR_MODE = 0o755

REASON_NOT_SIGNED_BY_CA = "not signed by the current CA"

if IMPORT_ERROR is None:
    _EKU_NAMES = {
        ExtendedKeyUsageOID.SERVER_AUTH: "serverAuth",
        ExtendedKeyUsageOID.CLIENT_AUTH: "clientAuth",
        ExtendedKeyUsageOID.CODE_SIGNING: "codeSigning",
        ExtendedKeyUsageOID.EMAIL_PROTECTION: "emailProtection",
        ExtendedKeyUsageOID.TIME_STAMPING: "timeStamping",
        ExtendedKeyUsageOID.OCSP_SIGNING: "OCSPSigning",
    }
    _KIND_EKUS = {
        "server": frozenset({ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH}),
        "client": frozenset({ExtendedKeyUsageOID.CLIENT_AUTH}),
    }
_EC_CURVE_NAMES = {"secp256r1": "ec256", "secp384r1": "ec384", "secp521r1": "ec521"}
_DNS_RE = re.compile(r"^(\*\.)?([a-z0-9_]([a-z0-9_-]{0,61}[a-z0-9_])?)(\.[a-z0-9_]([a-z0-9_-]{0,61}[a-z0-9_])?)*\.?$")


class PKIError(ValueError):
    """A problem the caller can fix (bad input, unusable file); the message says which and how."""


class PrivateKeyPEM(bytes):
    """PEM private key bytes whose ``repr``/``str`` never show the key.

    Everything this library returns or reads as a private key is of this type, so that a traceback
    (which shows function arguments), a log line or a test failure cannot print key material by
    accident.  It is ``bytes`` in every other way (write it to a file, compare it, parse it).
    """

    __slots__ = ()

    def __repr__(self) -> str:
        return f"<PrivateKeyPEM: {len(self)} bytes, redacted>"

    __str__ = __repr__


@dataclass(frozen=True)
class IssuedCertificate:
    """A freshly issued certificate and its key.  ``key_pem`` is kept out of ``repr``."""

    cert_pem: bytes
    key_pem: bytes = field(repr=False)
    key_generated: bool


# ---------------------------------------------------------------------------------------------
# keys


def generate_private_key(key_type: str = DEFAULT_KEY_TYPE):
    """A new private key of ``key_type`` (one of :data:`KEY_TYPES`)."""
    if key_type == "ec256":
        return ec.generate_private_key(ec.SECP256R1())
    if key_type == "rsa2048":
        return rsa.generate_private_key(public_exponent=65537, key_size=2048)
    raise PKIError(f"key_type {key_type!r} is not supported; use one of {', '.join(KEY_TYPES)}")


def private_key_to_pem(key) -> PrivateKeyPEM:
    """Unencrypted PKCS#8 PEM of ``key``."""
    return PrivateKeyPEM(
        key.private_bytes(
            encoding=serialization.Encoding.PEM,
            format=serialization.PrivateFormat.PKCS8,
            encryption_algorithm=serialization.NoEncryption(),
        )
    )


def is_encrypted_private_key(key_pem: bytes | str) -> bool:
    """True if ``key_pem`` looks like a passphrase-protected PEM key (which this library does not manage)."""
    data = _to_bytes(key_pem)
    return b"-----BEGIN ENCRYPTED PRIVATE KEY-----" in data or b"Proc-Type: 4,ENCRYPTED" in data


def load_private_key(key_pem: bytes | str):
    """Parse an unencrypted PEM private key; :class:`PKIError` (with no key material in it) otherwise."""
    data = _to_bytes(key_pem)
    if is_encrypted_private_key(data):
        raise PKIError("the private key is encrypted; only unencrypted keys are supported")
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except (ValueError, TypeError, UnsupportedAlgorithm):
        # The library's message may quote the input; do not pass it on.
        raise PKIError("not a valid PEM private key") from None
    return key


def key_type_of(key) -> str:
    """``ec256``, ``rsa2048`` or a descriptive name (``ec384``, ``rsa4096``, ``ed25519`` ...) for a key.

    Works for private and public keys.
    """
    if isinstance(key, ec.EllipticCurvePrivateKey | ec.EllipticCurvePublicKey):
        return _EC_CURVE_NAMES.get(key.curve.name, f"ec-{key.curve.name}")
    if isinstance(key, rsa.RSAPrivateKey | rsa.RSAPublicKey):
        return f"rsa{key.key_size}"
    if isinstance(key, ed25519.Ed25519PrivateKey | ed25519.Ed25519PublicKey):
        return "ed25519"
    if isinstance(key, ed448.Ed448PrivateKey | ed448.Ed448PublicKey):
        return "ed448"
    return type(key).__name__


def _public_der(key) -> bytes:
    pub = key.public_key() if hasattr(key, "private_bytes") else key
    return pub.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)


def verify_pair(cert_pem: bytes | str, key_pem: bytes | str) -> bool:
    """True if the private key in ``key_pem`` belongs to the certificate in ``cert_pem``.

    Raises :class:`PKIError` if either cannot be parsed.
    """
    cert = load_certificate(cert_pem)
    key = load_private_key(key_pem)
    return _public_der(key) == _public_der(cert.public_key())


# ---------------------------------------------------------------------------------------------
# certificates


def load_certificates(pem: bytes | str) -> list[x509.Certificate]:
    """All certificates of a PEM bundle, in file order; :class:`PKIError` if there is none or it is garbage."""
    data = _to_bytes(pem)
    try:
        certs = x509.load_pem_x509_certificates(data)
    except ValueError:
        raise PKIError("not a valid PEM certificate") from None
    if not certs:
        raise PKIError("not a valid PEM certificate")
    return certs


def load_certificate(pem: bytes | str) -> x509.Certificate:
    """The single certificate of ``pem``; :class:`PKIError` if there is not exactly one."""
    certs = load_certificates(pem)
    if len(certs) != 1:
        raise PKIError(f"holds {len(certs)} certificates, want exactly one")
    return certs[0]


def certificate_to_pem(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


def fingerprint(cert: x509.Certificate) -> str:
    """SHA-256 over the DER encoding, lower-case hex without separators."""
    return hashlib.sha256(cert.public_bytes(serialization.Encoding.DER)).hexdigest()


def certificate_kind(cert: x509.Certificate) -> str:
    """``ca``, ``server``, ``client`` as this library issues them, or ``other``."""
    try:
        bc = cert.extensions.get_extension_for_class(x509.BasicConstraints).value
        is_ca = bc.ca
    except x509.ExtensionNotFound:
        is_ca = False
    if is_ca:
        return "ca"
    ekus = frozenset(_extended_key_usages(cert))
    for kind, wanted in _KIND_EKUS.items():
        if ekus == wanted:
            return kind
    return "other"


def _extended_key_usages(cert: x509.Certificate) -> list[x509.ObjectIdentifier]:
    try:
        return list(cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value)
    except x509.ExtensionNotFound:
        return []


def _common_name(name: x509.Name) -> str | None:
    attrs = name.get_attributes_for_oid(NameOID.COMMON_NAME)
    return str(attrs[0].value) if attrs else None


def certificate_subject_alt_names(cert: x509.Certificate) -> list[str]:
    """The certificate's DNS and IP SANs as ``DNS:name`` / ``IP:address`` strings, in certificate order.

    Other SAN types are returned as ``<type>:<value>`` so that a comparison notices them.
    """
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return []
    out = []
    for gn in san:
        if isinstance(gn, x509.DNSName):
            out.append(f"DNS:{gn.value.lower()}")
        elif isinstance(gn, x509.IPAddress):
            out.append(f"IP:{gn.value}")
        elif isinstance(gn, x509.RFC822Name):
            out.append(f"email:{gn.value}")
        elif isinstance(gn, x509.UniformResourceIdentifier):
            out.append(f"URI:{gn.value}")
        else:
            out.append(f"{type(gn).__name__}:{gn.value}")
    return out


def normalize_subject_alt_names(names) -> list[str]:
    """Validate and normalise SANs given as ``DNS:name`` or ``IP:address``.

    The prefix is case-insensitive, DNS names are lower-cased, IP addresses written in their
    canonical form; duplicates are dropped, the first occurrence's position is kept.
    """
    if names is None:
        return []
    if isinstance(names, str):
        raise PKIError("subject_alt_names must be a list such as ['DNS:etcd-1.cluster1.mesh', 'IP:198.18.1.11']")
    out: list[str] = []
    for raw in names:
        if not isinstance(raw, str):
            raise PKIError(f"subject_alt_names entry {raw!r} must be a string such as 'DNS:name' or 'IP:address'")
        entry = raw.strip()
        kind, sep, value = entry.partition(":")
        kind = kind.strip().upper()
        value = value.strip()
        if not sep or kind not in ("DNS", "IP") or not value:
            raise PKIError(
                f"subject_alt_names entry {raw!r} must start with 'DNS:' or 'IP:' "
                "(for example 'DNS:etcd-1.cluster1.mesh' or 'IP:198.18.1.11')"
            )
        if kind == "DNS":
            value = value.lower()
            if len(value) > 253 or not value.isascii() or not _DNS_RE.match(value):
                raise PKIError(
                    f"subject_alt_names entry {raw!r} is not a valid DNS name "
                    "(ASCII letters, digits, '-', '.', optionally a leading '*.'; use IDNA/punycode for others)"
                )
            norm = f"DNS:{value}"
        else:
            try:
                norm = f"IP:{ipaddress.ip_address(value)}"
            except ValueError:
                raise PKIError(f"subject_alt_names entry {raw!r} is not a valid IPv4 or IPv6 address") from None
        if norm not in out:
            out.append(norm)
    return out


def _general_names(normalized: list[str]) -> list[x509.GeneralName]:
    out: list[x509.GeneralName] = []
    for entry in normalized:
        kind, unused, value = entry.partition(":")
        if kind == "DNS":
            out.append(x509.DNSName(value))
        else:
            out.append(x509.IPAddress(ipaddress.ip_address(value)))
    return out


def _iso(ts: _dt.datetime) -> str:
    return ts.astimezone(_dt.UTC).isoformat()


def is_self_signed(cert: x509.Certificate) -> bool:
    return signed_by_problem(cert, cert) is None


def signed_by_problem(cert: x509.Certificate, ca_cert: x509.Certificate) -> str | None:
    """None if ``cert`` was issued by ``ca_cert`` (issuer name and signature); else a short explanation."""
    if cert.issuer != ca_cert.subject:
        return f"issuer {cert.issuer.rfc4514_string()!r} is not the CA's subject {ca_cert.subject.rfc4514_string()!r}"
    try:
        cert.verify_directly_issued_by(ca_cert)
    except InvalidSignature:
        return "the signature does not verify with the CA's public key"
    except (ValueError, TypeError, UnsupportedAlgorithm) as exc:
        return f"cannot be verified against the CA: {exc}"
    return None


def describe_certificate(pem: bytes | str | x509.Certificate) -> dict:
    """A JSON-friendly summary of a certificate (never anything secret).

    Keys: ``subject``, ``common_name``, ``issuer``, ``subject_alt_names``, ``serial`` (lower-case hex),
    ``not_before``, ``not_after`` (ISO 8601, UTC), ``fingerprint`` (SHA-256 of the DER, hex), ``kind``,
    ``is_ca``, ``extended_key_usage``, ``key_type``, ``self_signed``.
    """
    cert = pem if isinstance(pem, x509.Certificate) else load_certificate(pem)
    kind = certificate_kind(cert)
    return {
        "subject": cert.subject.rfc4514_string(),
        "common_name": _common_name(cert.subject),
        "issuer": cert.issuer.rfc4514_string(),
        "subject_alt_names": certificate_subject_alt_names(cert),
        "serial": format(cert.serial_number, "x"),
        "not_before": _iso(cert.not_valid_before_utc),
        "not_after": _iso(cert.not_valid_after_utc),
        "fingerprint": fingerprint(cert),
        "kind": kind,
        "is_ca": kind == "ca",
        "extended_key_usage": [_EKU_NAMES.get(oid, oid.dotted_string) for oid in _extended_key_usages(cert)],
        "key_type": key_type_of(cert.public_key()),
        "self_signed": is_self_signed(cert),
    }


SUMMARY_KEYS = ("subject", "subject_alt_names", "issuer", "not_after", "fingerprint")


def summarize_certificate(pem: bytes | str | x509.Certificate | None) -> dict:
    """The short form used for diffs: subject, SANs, issuer, not_after, fingerprint ({} for None)."""
    if pem is None:
        return {}
    desc = describe_certificate(pem)
    return {k: desc[k] for k in SUMMARY_KEYS}


def verify_chain(
    cert_pem: bytes | str,
    trust_pem: bytes | str,
    *,
    now: _dt.datetime | None = None,
    max_depth: int = 8,
) -> list[x509.Certificate]:
    """Verify a certificate (optionally followed by intermediates) against trusted CA certificates.

    ``cert_pem`` holds the leaf first, then any intermediates; ``trust_pem`` holds one or more trusted
    CA certificates.  Checks at ``now``: validity periods, issuer names and signatures, and that every
    issuer is a CA.  Returns the path from the leaf to the trust anchor; raises :class:`PKIError`
    naming the first problem.  This is a structural check for the mesh's own PKI, not a full RFC 5280
    path validation (no name constraints, policies or revocation).
    """
    now = _now(now)
    chain = load_certificates(cert_pem)
    anchors = load_certificates(trust_pem)
    leaf, intermediates = chain[0], chain[1:]
    path = [leaf]
    current = leaf
    for _unused in range(max_depth):
        _check_time(current, now)
        anchor = next((a for a in anchors if signed_by_problem(current, a) is None), None)
        if anchor is not None:
            _check_issuer_is_ca(anchor)
            _check_time(anchor, now)
            if anchor != current:
                path.append(anchor)
            return path
        nxt = next((i for i in intermediates if i is not current and signed_by_problem(current, i) is None), None)
        if nxt is None:
            raise PKIError(
                f"{current.subject.rfc4514_string()!r} is {REASON_NOT_SIGNED_BY_CA} "
                f"(no trusted or intermediate certificate issued it; issuer {current.issuer.rfc4514_string()!r})"
            )
        _check_issuer_is_ca(nxt)
        path.append(nxt)
        current = nxt
    raise PKIError(f"certificate chain is longer than {max_depth}")


def _check_time(cert: x509.Certificate, now: _dt.datetime) -> None:
    if now < cert.not_valid_before_utc:
        raise PKIError(f"{cert.subject.rfc4514_string()!r} is not valid before {_iso(cert.not_valid_before_utc)}")
    if now > cert.not_valid_after_utc:
        raise PKIError(f"{cert.subject.rfc4514_string()!r} expired on {_iso(cert.not_valid_after_utc)}")


def _check_issuer_is_ca(cert: x509.Certificate) -> None:
    if certificate_kind(cert) != "ca":
        raise PKIError(f"{cert.subject.rfc4514_string()!r} issued a certificate but is not a CA")


# ---------------------------------------------------------------------------------------------
# planning


def plan_certificate(
    kind: str,
    common_name: str,
    subject_alt_names=(),
    *,
    cert_pem: bytes | str | None,
    key_pem: bytes | str | None,
    ca_cert_pem: bytes | str | None = None,
    key_type: str | None = None,
    renew_before_days: int = DEFAULT_RENEW_BEFORE_DAYS,
    now: _dt.datetime | None = None,
) -> tuple[bool, list[str]]:
    """Decide whether the certificate in ``cert_pem`` (with ``key_pem``) must be (re)issued.

    ``cert_pem``/``key_pem`` are the current file contents (None if the file is missing).  For
    ``server``/``client``, ``ca_cert_pem`` is the current signing CA; None skips the issuer check.
    ``key_type`` (None: any) is the wanted key type.

    Returns ``(needed, reasons)``; reasons are short sentences (``"not signed by the current CA"`` is
    exactly :data:`REASON_NOT_SIGNED_BY_CA`).  Causes: missing/unreadable certificate or key, key not
    matching the certificate, key type, subject/common name, SANs (order-insensitive), kind (CA or
    not, extended key usage), issuer (name and signature against the CA; a CA must be self-signed),
    not yet valid, expired or expiring within ``renew_before_days``.  A changed validity period
    (``valid_days``) alone is not a cause.
    """
    _check_kind(kind)
    if key_type is not None and key_type not in KEY_TYPES:
        raise PKIError(f"key_type {key_type!r} is not supported; use one of {', '.join(KEY_TYPES)}")
    wanted_sans = normalize_subject_alt_names(subject_alt_names)
    now = _now(now)
    reasons: list[str] = []

    cert = None
    if cert_pem is None:
        reasons.append("certificate file is missing")
    else:
        try:
            cert = load_certificate(cert_pem)
        except PKIError as exc:
            reasons.append(f"certificate file is unreadable: {exc}")

    key = None
    if key_pem is None:
        reasons.append("private key file is missing")
    else:
        try:
            key = load_private_key(key_pem)
        except PKIError as exc:
            reasons.append(f"private key file is unreadable: {exc}")

    if key is not None and key_type is not None and key_type_of(key) != key_type:
        reasons.append(f"private key type is {key_type_of(key)}, want {key_type}")

    if cert is None:
        return True, reasons

    if key is not None and _public_der(key) != _public_der(cert.public_key()):
        reasons.append("private key does not match the certificate")

    have_cn = _common_name(cert.subject)
    want_subject = _subject(common_name)
    if have_cn != common_name:
        reasons.append(f"common name is {have_cn!r}, want {common_name!r}")
    elif cert.subject != want_subject:
        reasons.append(f"subject is {cert.subject.rfc4514_string()!r}, want {want_subject.rfc4514_string()!r}")

    have_sans = certificate_subject_alt_names(cert)
    if set(have_sans) != set(wanted_sans):
        missing = [s for s in wanted_sans if s not in have_sans]
        extra = [s for s in have_sans if s not in wanted_sans]
        parts = []
        if missing:
            parts.append("missing " + ", ".join(missing))
        if extra:
            parts.append("unwanted " + ", ".join(extra))
        reasons.append("subject alternative names differ: " + "; ".join(parts))

    have_kind = certificate_kind(cert)
    if have_kind != kind:
        ekus = [_EKU_NAMES.get(o, o.dotted_string) for o in _extended_key_usages(cert)]
        reasons.append(
            f"certificate kind is {have_kind} (extended key usage: {', '.join(ekus) or 'none'}), want {kind}"
        )

    if kind == "ca":
        problem = signed_by_problem(cert, cert)
        if problem is not None:
            reasons.append(f"CA certificate is not self-signed ({problem})")
    elif ca_cert_pem is not None:
        ca_cert = load_certificate(ca_cert_pem)
        if signed_by_problem(cert, ca_cert) is not None:
            reasons.append(REASON_NOT_SIGNED_BY_CA)

    not_before = cert.not_valid_before_utc
    not_after = cert.not_valid_after_utc
    if now < not_before:
        reasons.append(f"not valid before {_iso(not_before)}")
    if now >= not_after:
        reasons.append(f"expired on {_iso(not_after)}")
    elif now >= not_after - _dt.timedelta(days=renew_before_days):
        reasons.append(f"expires on {_iso(not_after)}, within renew_before ({renew_before_days} days)")

    return bool(reasons), reasons


def reusable_private_key(key_pem: bytes | str | None, key_type: str | None = None) -> bool:
    """True if ``key_pem`` is a valid unencrypted key (of ``key_type`` if given) that a reissue may keep."""
    if key_pem is None:
        return False
    try:
        key = load_private_key(key_pem)
    except PKIError:
        return False
    return key_type is None or key_type_of(key) == key_type


# ---------------------------------------------------------------------------------------------
# issuing


def issue_ca(
    common_name: str,
    *,
    key_pem: bytes | str | None = None,
    key_type: str = DEFAULT_KEY_TYPE,
    valid_days: int | None = None,
    now: _dt.datetime | None = None,
) -> IssuedCertificate:
    """A self-signed CA certificate (``CA:TRUE, pathlen:0``).

    Uses the key in ``key_pem`` if given (a renewed CA with the same key and name keeps every leaf
    it signed valid), else generates a ``key_type`` key.
    """
    valid_days = DEFAULT_VALID_DAYS["ca"] if valid_days is None else valid_days
    key, key_pem_out, generated = _key_for_issue(key_pem, key_type)
    subject = _subject(common_name)
    now = _now(now)
    ski = x509.SubjectKeyIdentifier.from_public_key(key.public_key())
    builder = (
        _base_builder(subject, subject, key.public_key(), now, valid_days)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(ski, critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ski), critical=False)
    )
    cert = builder.sign(key, _hash_for(key))
    return IssuedCertificate(cert_pem=certificate_to_pem(cert), key_pem=key_pem_out, key_generated=generated)


def issue_leaf(
    kind: str,
    common_name: str,
    *,
    ca_cert_pem: bytes | str,
    ca_key_pem: bytes | str,
    subject_alt_names=(),
    key_pem: bytes | str | None = None,
    key_type: str = DEFAULT_KEY_TYPE,
    valid_days: int | None = None,
    now: _dt.datetime | None = None,
) -> IssuedCertificate:
    """A ``server`` or ``client`` certificate signed by the CA in ``ca_cert_pem``/``ca_key_pem``.

    ``server``: EKU serverAuth + clientAuth, at least one SAN.  ``client``: EKU clientAuth; the
    common name is the etcd user name; SANs optional.  Checks that the CA is a CA, that its key
    matches and that it is valid at ``now``.
    """
    if kind not in ("server", "client"):
        raise PKIError(f"kind {kind!r} is not a leaf kind; use 'server' or 'client' (or issue_ca for a CA)")
    valid_days = DEFAULT_VALID_DAYS[kind] if valid_days is None else valid_days
    sans = normalize_subject_alt_names(subject_alt_names)
    if kind == "server" and not sans:
        raise PKIError(
            "a server certificate needs at least one subject_alt_names entry (DNS:name or IP:address); "
            "etcd and other Go TLS clients ignore the common name when checking the host"
        )
    now = _now(now)
    ca_cert, ca_key = check_signing_ca(ca_cert_pem, ca_key_pem, now=now)
    key, key_pem_out, generated = _key_for_issue(key_pem, key_type)

    if kind == "server":
        ekus = [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]
    else:
        ekus = [ExtendedKeyUsageOID.CLIENT_AUTH]
    is_rsa = isinstance(key, rsa.RSAPrivateKey)
    builder = (
        _base_builder(_subject(common_name), ca_cert.subject, key.public_key(), now, valid_days)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=is_rsa,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=False,
                crl_sign=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.ExtendedKeyUsage(ekus), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .add_extension(_authority_key_identifier(ca_cert), critical=False)
    )
    if sans:
        builder = builder.add_extension(x509.SubjectAlternativeName(_general_names(sans)), critical=False)
    cert = builder.sign(ca_key, _hash_for(ca_key))
    return IssuedCertificate(cert_pem=certificate_to_pem(cert), key_pem=key_pem_out, key_generated=generated)


def check_signing_ca(ca_cert_pem: bytes | str, ca_key_pem: bytes | str, *, now: _dt.datetime | None = None):
    """Load and check a signing CA: a CA certificate, valid at ``now``, whose key matches.

    Returns ``(ca_cert, ca_key)``; raises :class:`PKIError` saying what is wrong.
    """
    try:
        ca_cert = load_certificate(ca_cert_pem)
    except PKIError as exc:
        raise PKIError(f"the CA certificate is unusable: {exc}") from None
    try:
        ca_key = load_private_key(ca_key_pem)
    except PKIError as exc:
        raise PKIError(f"the CA private key is unusable: {exc}") from None
    if certificate_kind(ca_cert) != "ca":
        raise PKIError(
            f"the CA certificate {ca_cert.subject.rfc4514_string()!r} is not a CA (basicConstraints CA:TRUE missing)"
        )
    if _public_der(ca_key) != _public_der(ca_cert.public_key()):
        raise PKIError("the CA private key does not belong to the CA certificate")
    now = _now(now)
    if now > ca_cert.not_valid_after_utc:
        raise PKIError(f"the CA certificate expired on {_iso(ca_cert.not_valid_after_utc)}; renew the CA first")
    if now < ca_cert.not_valid_before_utc:
        raise PKIError(f"the CA certificate is not valid before {_iso(ca_cert.not_valid_before_utc)}")
    return ca_cert, ca_key


def _authority_key_identifier(ca_cert: x509.Certificate) -> x509.AuthorityKeyIdentifier:
    try:
        ski = ca_cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
        return x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ski)
    except x509.ExtensionNotFound:
        return x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_cert.public_key())


def _base_builder(subject, issuer, public_key, now, valid_days) -> x509.CertificateBuilder:
    if not isinstance(valid_days, int) or valid_days < 1:
        raise PKIError(f"valid_days must be a whole number of days >= 1, got {valid_days!r}")
    return (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer)
        .public_key(public_key)
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - BACKDATE)
        .not_valid_after(now + _dt.timedelta(days=valid_days))
    )


def _key_for_issue(key_pem, key_type):
    if key_pem is None:
        key = generate_private_key(key_type)
        return key, private_key_to_pem(key), True
    key = load_private_key(key_pem)
    if key_type is not None and key_type_of(key) != key_type:
        raise PKIError(f"the given private key is {key_type_of(key)}, but key_type is {key_type}")
    return key, PrivateKeyPEM(_to_bytes(key_pem)), False


def _hash_for(key):
    if isinstance(key, ed25519.Ed25519PrivateKey | ed448.Ed448PrivateKey):
        return None
    return hashes.SHA256()


def _subject(common_name: str) -> x509.Name:
    if not isinstance(common_name, str) or not common_name.strip():
        raise PKIError("common_name must be a non-empty string (for a client certificate: the etcd user name)")
    if len(common_name) > 64:
        raise PKIError(f"common_name {common_name!r} is longer than 64 characters (the X.509 limit)")
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def _check_kind(kind: str) -> None:
    if kind not in KINDS:
        raise PKIError(f"kind {kind!r} is not supported; use one of {', '.join(KINDS)}")


def _now(now: _dt.datetime | None) -> _dt.datetime:
    if now is None:
        return _dt.datetime.now(_dt.UTC)
    if now.tzinfo is None:
        raise PKIError("now must be timezone-aware (for example datetime.now(timezone.utc))")
    return now


def _to_bytes(data: bytes | str) -> bytes:
    # bytes (and PrivateKeyPEM) pass through unchanged, keeping the redacting type
    return data.encode("ascii", "surrogateescape") if isinstance(data, str) else data


# ---------------------------------------------------------------------------------------------
# files


def read_optional(path: str, *, secret: bool = False) -> bytes | None:
    """The file's bytes, or None if it does not exist.  Other OS errors (permissions) propagate.

    With ``secret`` the content is returned as :class:`PrivateKeyPEM` (redacted ``repr``).
    """
    try:
        with open(path, "rb") as fh:
            data = fh.read()
    except FileNotFoundError:
        return None
    return PrivateKeyPEM(data) if secret else data


def ensure_parent_dir(path: str, mode: int, *, uid: int = -1, gid: int = -1) -> bool:
    """Create the parent directory of ``path`` with ``mode`` if it is missing (ancestors 0755).

    Returns True if it was created.  ``uid``/``gid`` (-1: unchanged) are applied to the created directory.
    """
    parent = os.path.dirname(os.path.abspath(path))
    if os.path.isdir(parent):
        return False
    os.makedirs(os.path.dirname(parent), mode=0o755, exist_ok=True)
    os.mkdir(parent, mode)
    os.chmod(parent, mode)  # umask-independent
    if uid != -1 or gid != -1:
        os.chown(parent, uid, gid)
    return True


def write_file_atomic(path: str, data: bytes, mode: int, *, keep_owner: bool = True) -> None:
    """Write ``data`` to ``path`` atomically: a temporary file in the same directory, created with
    ``mode`` before any content is written, fsync'ed, then renamed over ``path``.

    With ``keep_owner`` and an existing ``path``, the new file gets the old file's uid/gid (when the
    process may set them), so replacing a certificate does not silently change its owner.
    """
    directory = os.path.dirname(os.path.abspath(path))
    old = None
    if keep_owner:
        try:
            old = os.stat(path)
        except FileNotFoundError:
            old = None
    fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.", suffix=".tmp", dir=directory)
    try:
        # mkstemp creates 0600; set the final mode before any content lands in the file.
        os.fchmod(fd, mode)
        if old is not None and (old.st_uid != os.geteuid() or old.st_gid != os.getegid()):
            try:
                os.fchown(fd, old.st_uid, old.st_gid)
            except PermissionError:
                pass
            os.fchmod(fd, mode)  # chown may clear set-id bits; keep the mode exact
        with os.fdopen(fd, "wb") as fh:
            fd = -1
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
        tmp = None
        dfd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)
    finally:
        if fd != -1:
            os.close(fd)
        if tmp is not None:
            try:
                os.unlink(tmp)
            except FileNotFoundError:
                pass
