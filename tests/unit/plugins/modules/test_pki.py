# -*- coding: utf-8 -*-
# Copyright: clustermesh.core contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""Tests of the clustermesh.core.pki module: in-process through ansible-core's
``ansible.module_utils.testing.patch_module_args``, and once end to end through the ``ansible`` CLI.

Keys are compared through digests; no test shows key material, also not when it fails.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest
from ansible.module_utils.testing import patch_module_args
from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding
from cryptography.x509.oid import ExtendedKeyUsageOID

from ansible_collections.clustermesh.core.plugins.module_utils import pki as lib
from ansible_collections.clustermesh.core.plugins.modules import pki as pki_module

REPO_ROOT = Path(__file__).resolve().parents[4]
SANS = ["DNS:etcd-1.cluster1.mesh", "DNS:localhost", "IP:198.18.1.11", "IP:127.0.0.1"]


def _no_key_material(text: str) -> bool:
    return "PRIVATE KEY" not in text


@pytest.fixture
def run(capsys):
    def _run(args, *, check=False, diff=False):
        args = dict(args)
        if check:
            args["_ansible_check_mode"] = True
        if diff:
            args["_ansible_diff"] = True
        with patch_module_args(args), pytest.raises(SystemExit) as exc:
            pki_module.main()
        captured = capsys.readouterr()
        clean = _no_key_material(captured.out + captured.err)
        assert clean, "private key material in the module's output"
        result = json.loads(captured.out)
        result["rc"] = exc.value.code
        # in-process, ansible-core shows module warnings through the controller's Display (stderr)
        result["warning_text"] = json.dumps(result.get("warnings", [])) + captured.err
        return result

    return _run


@pytest.fixture
def pkidir(tmp_path):
    return tmp_path / "pki"


def ca_args(d, **kw):
    return {
        "kind": "ca",
        "common_name": "cluster1 kvstore CA",
        "path": str(d / "ca.crt"),
        "private_key_path": str(d / "ca.key"),
        **kw,
    }


def leaf_args(d, kind, name, **kw):
    args = dict(
        kind=kind,
        common_name=name,
        path=str(d / f"{name}.crt"),
        private_key_path=str(d / f"{name}.key"),
        ca_path=str(d / "ca.crt"),
        ca_private_key_path=str(d / "ca.key"),
    )
    if kind == "server":
        args["subject_alt_names"] = list(SANS)
    args.update(kw)
    return args


def server_args(d, **kw):
    return leaf_args(d, "server", "etcd-1", **kw)


def client_args(d, **kw):
    return leaf_args(d, "client", "remote-cluster2", **kw)


def digest(path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def mode_of(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


def snapshot(root: Path) -> dict:
    return {str(p.relative_to(root)): (digest(p) if p.is_file() else "dir") for p in sorted(root.rglob("*"))}


def openssl_verify(ca: Path, cert: Path, purpose: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        ["openssl", "verify", "-purpose", purpose, "-CAfile", str(ca), str(cert)],
        capture_output=True,
        text=True,
        check=False,
    )


def test_ca_server_client_then_unchanged(run, pkidir):
    ca = run(ca_args(pkidir))
    assert ca["changed"] and ca["rc"] == 0
    assert ca["reasons"] == ["certificate file is missing", "private key file is missing"]
    assert ca["kind"] == "ca" and ca["subject"] == ca["issuer"] == "CN=cluster1 kvstore CA"
    assert ca["private_key_generated"] is True

    server = run(server_args(pkidir))
    assert server["changed"] and server["issuer"] == "CN=cluster1 kvstore CA"
    assert server["subject_alt_names"] == SANS
    client = run(client_args(pkidir))
    assert client["changed"] and client["common_name"] == "remote-cluster2"

    # files, modes, directory
    assert mode_of(pkidir) == 0o700
    for name in ("ca", "etcd-1", "remote-cluster2"):
        assert mode_of(pkidir / f"{name}.key") == 0o600
        assert mode_of(pkidir / f"{name}.crt") == 0o644
    assert sorted(os.listdir(pkidir)) == sorted(
        f"{n}.{e}" for n in ("ca", "etcd-1", "remote-cluster2") for e in ("crt", "key")
    )  # no temporary files left

    # second run: nothing to do
    before = snapshot(pkidir)
    for args, first in ((ca_args(pkidir), ca), (server_args(pkidir), server), (client_args(pkidir), client)):
        again = run(args)
        assert again["changed"] is False and again["reasons"] == []
        assert again["fingerprint"] == first["fingerprint"] and again["serial"] == first["serial"]
        assert again["private_key_generated"] is False
    assert snapshot(pkidir) == before

    # the certificates verify with openssl and carry what was asked for
    for cert, purpose in (("etcd-1", "sslserver"), ("etcd-1", "sslclient"), ("remote-cluster2", "sslclient")):
        out = openssl_verify(pkidir / "ca.crt", pkidir / f"{cert}.crt", purpose)
        assert out.returncode == 0, out.stdout + out.stderr
    cert = x509.load_pem_x509_certificate((pkidir / "etcd-1.crt").read_bytes())
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert [f"DNS:{v}" for v in san.get_values_for_type(x509.DNSName)] == SANS[:2]
    assert [f"IP:{v}" for v in san.get_values_for_type(x509.IPAddress)] == SANS[2:]
    cert = x509.load_pem_x509_certificate((pkidir / "remote-cluster2.crt").read_bytes())
    assert cert.subject.rfc4514_string() == "CN=remote-cluster2"
    assert list(cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value) == [
        ExtendedKeyUsageOID.CLIENT_AUTH
    ]
    assert client["fingerprint"] == hashlib.sha256(cert.public_bytes(Encoding.DER)).hexdigest()


def test_san_order_and_case_do_not_reissue(run, pkidir):
    run(ca_args(pkidir))
    run(server_args(pkidir))
    again = run(
        server_args(
            pkidir, subject_alt_names=["IP:127.0.0.1", "dns:LOCALHOST", "IP:198.18.1.11", "DNS:Etcd-1.cluster1.mesh"]
        )
    )
    assert again["changed"] is False


def test_common_name_change_reissues_and_keeps_key(run, pkidir):
    run(ca_args(pkidir))
    first = run(client_args(pkidir))
    key_before = digest(pkidir / "remote-cluster2.key")
    res = run(client_args(pkidir, common_name="remote-cluster3"))
    assert res["changed"] and res["reasons"] == ["common name is 'remote-cluster2', want 'remote-cluster3'"]
    assert res["common_name"] == "remote-cluster3" and res["fingerprint"] != first["fingerprint"]
    assert res["private_key_generated"] is False
    assert digest(pkidir / "remote-cluster2.key") == key_before
    assert run(client_args(pkidir, common_name="remote-cluster3"))["changed"] is False


def test_regenerate_key_applies_on_reissue_only(run, pkidir):
    run(ca_args(pkidir))
    run(client_args(pkidir))
    key_before = digest(pkidir / "remote-cluster2.key")
    assert run(client_args(pkidir, regenerate_key=True))["changed"] is False  # not a reissue cause by itself
    res = run(client_args(pkidir, common_name="other-user", regenerate_key=True))
    assert res["changed"] and res["private_key_generated"] is True
    assert digest(pkidir / "remote-cluster2.key") != key_before
    assert mode_of(pkidir / "remote-cluster2.key") == 0o600


def test_san_change_reissues(run, pkidir):
    run(ca_args(pkidir))
    run(server_args(pkidir))
    res = run(server_args(pkidir, subject_alt_names=[*SANS, "IP:198.18.1.12"]))
    assert res["changed"]
    assert res["reasons"] == ["subject alternative names differ: missing IP:198.18.1.12"]
    assert res["subject_alt_names"] == [*SANS, "IP:198.18.1.12"]
    assert run(server_args(pkidir, subject_alt_names=[*SANS, "IP:198.18.1.12"]))["changed"] is False


def test_kind_change_reissues(run, pkidir):
    run(ca_args(pkidir))
    run(client_args(pkidir))
    res = run(leaf_args(pkidir, "server", "remote-cluster2", subject_alt_names=["DNS:remote-cluster2"]))
    assert res["changed"] and res["kind"] == "server"
    assert "certificate kind is client (extended key usage: clientAuth), want server" in res["reasons"]


def test_key_type_change_reissues_with_new_key(run, pkidir):
    run(ca_args(pkidir))
    run(client_args(pkidir))
    res = run(client_args(pkidir, key_type="rsa2048"))
    assert res["changed"] and res["reasons"] == ["private key type is ec256, want rsa2048"]
    assert res["key_type"] == "rsa2048" and res["private_key_generated"] is True
    assert run(client_args(pkidir, key_type="rsa2048"))["changed"] is False


def test_ca_replaced_reissues_leaves(run, pkidir):
    run(ca_args(pkidir))
    first = run(server_args(pkidir))
    run(client_args(pkidir))

    # renewing the CA with its key keeps the leaves valid: no cascade
    renewed = run(ca_args(pkidir, force=True))
    assert renewed["changed"] and renewed["reasons"] == ["force requested"] and not renewed["private_key_generated"]
    assert run(server_args(pkidir))["changed"] is False

    # a new CA key: every leaf is reissued on its next run
    rotated = run(ca_args(pkidir, force=True, regenerate_key=True))
    assert rotated["changed"] and rotated["private_key_generated"]
    for args in (server_args(pkidir), client_args(pkidir)):
        res = run(args)
        assert res["changed"] and res["reasons"] == ["not signed by the current CA"]
        assert res["private_key_generated"] is False
        assert run(args)["changed"] is False
    assert run(server_args(pkidir))["fingerprint"] != first["fingerprint"]
    out = openssl_verify(pkidir / "ca.crt", pkidir / "etcd-1.crt", "sslserver")
    assert out.returncode == 0, out.stdout + out.stderr

    # a CA with another name (same key) also changes the issuer
    run(ca_args(pkidir, common_name="renamed CA"))
    res = run(server_args(pkidir))
    assert res["reasons"] == ["not signed by the current CA"] and res["issuer"] == "CN=renamed CA"


def _write_old_ca(pkidir: Path, now: dt.datetime):
    """A CA issued long ago (still valid), written where the module expects it."""
    pkidir.mkdir(mode=0o700, exist_ok=True)
    ca = lib.issue_ca("cluster1 kvstore CA", now=now)
    lib.write_file_atomic(str(pkidir / "ca.crt"), ca.cert_pem, 0o644)
    lib.write_file_atomic(str(pkidir / "ca.key"), ca.key_pem, 0o600)
    return ca


def test_expired_certificate_is_reissued(run, pkidir):
    real_now = dt.datetime.now(dt.UTC)
    ca = _write_old_ca(pkidir, real_now - dt.timedelta(days=400))
    old = lib.issue_leaf(
        "client",
        "remote-cluster2",
        ca_cert_pem=ca.cert_pem,
        ca_key_pem=ca.key_pem,
        valid_days=365,
        now=real_now - dt.timedelta(days=366),
    )
    lib.write_file_atomic(str(pkidir / "remote-cluster2.crt"), old.cert_pem, 0o644)
    lib.write_file_atomic(str(pkidir / "remote-cluster2.key"), old.key_pem, 0o600)
    key_before = digest(pkidir / "remote-cluster2.key")
    assert run(ca_args(pkidir))["changed"] is False
    res = run(client_args(pkidir))
    assert res["changed"] and len(res["reasons"]) == 1 and res["reasons"][0].startswith("expired on ")
    assert res["not_after"] > real_now.isoformat()
    assert digest(pkidir / "remote-cluster2.key") == key_before
    assert run(client_args(pkidir))["changed"] is False


def test_certificate_within_renew_before_is_reissued(run, pkidir):
    real_now = dt.datetime.now(dt.UTC)
    ca = _write_old_ca(pkidir, real_now - dt.timedelta(days=10))
    short = lib.issue_leaf(
        "client", "remote-cluster2", ca_cert_pem=ca.cert_pem, ca_key_pem=ca.key_pem, valid_days=20, now=real_now
    )
    lib.write_file_atomic(str(pkidir / "remote-cluster2.crt"), short.cert_pem, 0o644)
    lib.write_file_atomic(str(pkidir / "remote-cluster2.key"), short.key_pem, 0o600)
    # 20 days left: fine with renew_before 10, reissued with the default 30
    assert run(client_args(pkidir, renew_before=10))["changed"] is False
    res = run(client_args(pkidir))
    assert res["changed"] and res["reasons"][0].endswith("within renew_before (30 days)")
    assert run(client_args(pkidir))["changed"] is False


def test_garbage_certificate_reissued_key_kept(run, pkidir):
    run(ca_args(pkidir))
    run(client_args(pkidir))
    key_before = digest(pkidir / "remote-cluster2.key")
    (pkidir / "remote-cluster2.crt").write_text("garbage\n")
    res = run(client_args(pkidir))
    assert res["changed"] and res["reasons"] == ["certificate file is unreadable: not a valid PEM certificate"]
    assert res["private_key_generated"] is False and digest(pkidir / "remote-cluster2.key") == key_before
    assert lib.verify_pair(
        (pkidir / "remote-cluster2.crt").read_bytes(),
        lib.read_optional(str(pkidir / "remote-cluster2.key"), secret=True),
    )


def test_garbage_key_reissued_with_new_key(run, pkidir):
    run(ca_args(pkidir))
    run(client_args(pkidir))
    (pkidir / "remote-cluster2.key").write_bytes(b"\x00garbage")
    res = run(client_args(pkidir))
    assert res["changed"] and res["private_key_generated"] is True
    assert "private key file is unreadable: not a valid PEM private key" in res["reasons"]
    assert mode_of(pkidir / "remote-cluster2.key") == 0o600
    assert run(client_args(pkidir))["changed"] is False


def test_mismatched_key_reissues_certificate(run, pkidir):
    run(ca_args(pkidir))
    run(client_args(pkidir))
    run(server_args(pkidir))
    (pkidir / "remote-cluster2.key").write_bytes((pkidir / "etcd-1.key").read_bytes())
    res = run(client_args(pkidir))
    assert res["changed"] and res["reasons"] == ["private key does not match the certificate"]
    assert res["private_key_generated"] is False
    assert run(client_args(pkidir))["changed"] is False


def test_key_mode_is_enforced(run, pkidir):
    run(ca_args(pkidir))
    os.chmod(pkidir / "ca.key", 0o644)
    res = run(ca_args(pkidir), diff=True)
    assert res["changed"] and res["reasons"] == []
    assert mode_of(pkidir / "ca.key") == 0o600
    attr_diffs = [d for d in res["diff"] if d.get("before_header", "").endswith("(file attributes)")]
    assert attr_diffs == [
        {
            "before": {"mode": "0644"},
            "after": {"mode": "0600"},
            "before_header": f"{pkidir / 'ca.key'} (file attributes)",
            "after_header": f"{pkidir / 'ca.key'} (file attributes)",
        }
    ]
    assert run(ca_args(pkidir))["changed"] is False


def test_mode_option_applies_to_certificate_only(run, pkidir):
    res = run(ca_args(pkidir, mode="0640"))
    assert res["changed"]
    assert mode_of(pkidir / "ca.crt") == 0o640 and mode_of(pkidir / "ca.key") == 0o600
    assert run(ca_args(pkidir, mode="0640"))["changed"] is False


def test_separate_certificate_directory(run, tmp_path):
    args = dict(
        kind="ca",
        common_name="x",
        path=str(tmp_path / "certs" / "ca.crt"),
        private_key_path=str(tmp_path / "private" / "ca.key"),
    )
    run(args)
    assert mode_of(tmp_path / "certs") == 0o755 and mode_of(tmp_path / "private") == 0o700


def test_check_mode_writes_nothing(run, tmp_path, pkidir):
    res = run(ca_args(pkidir), check=True)
    assert res["changed"] and res["reasons"] == ["certificate file is missing", "private key file is missing"]
    assert res["fingerprint"] is None and res["serial"] is None and res["subject"] == "CN=cluster1 kvstore CA"
    assert not pkidir.exists()

    # a leaf whose CA does not exist yet: a pending change and a warning, no failure
    res = run(server_args(pkidir), check=True)
    assert res["changed"] and res["rc"] == 0
    assert "the signing CA is not usable yet (check mode)" in res["reasons"]
    assert "create the CA first" in res["warning_text"]
    assert not pkidir.exists()

    run(ca_args(pkidir))
    run(server_args(pkidir))
    before = snapshot(tmp_path)
    res = run(server_args(pkidir, common_name="etcd-2"), check=True, diff=True)
    assert res["changed"] and res["reasons"] == ["common name is 'etcd-1', want 'etcd-2'"]
    assert res["diff"][0]["before"]["subject"] == "CN=etcd-1" and res["diff"][0]["after"]["subject"] == "CN=etcd-2"
    res = run(ca_args(pkidir, force=True, regenerate_key=True), check=True)
    assert res["changed"] and res["private_key_generated"] is True
    os.chmod(pkidir / "ca.key", 0o640)
    before = snapshot(tmp_path)
    assert run(ca_args(pkidir), check=True)["changed"] is True  # the mode would be fixed
    assert mode_of(pkidir / "ca.key") == 0o640
    res = run(server_args(pkidir), check=True, diff=True)
    assert res["changed"] is False
    assert snapshot(tmp_path) == before


def test_diff_mode_shows_summary_not_keys(run, pkidir):
    run(ca_args(pkidir))
    first = run(server_args(pkidir), diff=True)
    cert_diff = first["diff"][0]
    assert cert_diff["before"] == {}
    assert set(cert_diff["after"]) == {"subject", "subject_alt_names", "issuer", "not_after", "fingerprint"}
    assert cert_diff["after"]["fingerprint"] == first["fingerprint"]
    res = run(server_args(pkidir, subject_alt_names=SANS[:2]), diff=True)
    cert_diff = res["diff"][0]
    assert cert_diff["before"]["subject_alt_names"] == SANS and cert_diff["after"]["subject_alt_names"] == SANS[:2]
    assert cert_diff["before"]["fingerprint"] == first["fingerprint"]
    assert cert_diff["after"]["fingerprint"] == res["fingerprint"]
    text = json.dumps(res)
    key_body = (pkidir / "etcd-1.key").read_text().splitlines()[1]
    leaked = key_body in text
    assert not leaked, "private key material in the diff"


def test_state_absent(run, pkidir):
    run(ca_args(pkidir))
    run(client_args(pkidir))
    absent = {**client_args(pkidir), "state": "absent"}
    absent.pop("common_name")
    res = run(absent, check=True)
    assert res["changed"] and (pkidir / "remote-cluster2.key").exists()
    res = run(absent, diff=True)
    assert res["changed"] and res["diff"]["before"]["subject"] == "CN=remote-cluster2"
    assert not (pkidir / "remote-cluster2.crt").exists() and not (pkidir / "remote-cluster2.key").exists()
    assert (pkidir / "ca.crt").exists() and (pkidir / "ca.key").exists()
    assert run(absent)["changed"] is False
    # removing a leaf does not need its CA
    run(client_args(pkidir))
    res = run({k: v for k, v in absent.items() if k not in ("ca_path", "ca_private_key_path")})
    assert res["changed"] and not (pkidir / "remote-cluster2.key").exists()


@pytest.mark.parametrize(
    "override, message",
    [
        ({"subject_alt_names": []}, "kind=server needs at least one subject_alt_names entry"),
        ({"subject_alt_names": ["etcd-1"]}, "must start with 'DNS:' or 'IP:'"),
        ({"renew_before": 400}, "renew_before (400) must be smaller than valid_days (365)"),
        ({"valid_days": 0}, "valid_days must be at least 1"),
        ({"private_key_path": "SAME"}, "private_key_path and path are the same file"),
        ({"common_name": ""}, "common_name must be a non-empty string"),
    ],
)
def test_user_errors(run, pkidir, override, message):
    run(ca_args(pkidir))
    args = server_args(pkidir, **override)
    if args["private_key_path"] == "SAME":
        args["private_key_path"] = args["path"]
    res = run(args)
    assert res["rc"] == 1 and res["failed"]
    assert message in res["msg"]


def test_ca_errors(run, pkidir):
    res = run(ca_args(pkidir, subject_alt_names=["DNS:x"]))
    assert res["failed"] and "subject_alt_names is not used for kind=ca" in res["msg"]
    res = run(server_args(pkidir))
    assert res["failed"] and "does not exist; create the CA first" in res["msg"]
    assert not pkidir.exists()
    run(ca_args(pkidir))
    run(client_args(pkidir))
    run(server_args(pkidir))
    res = run(client_args(pkidir, ca_private_key_path=str(pkidir / "etcd-1.key")))
    assert res["failed"] and "the CA private key does not belong to the CA certificate" in res["msg"]
    res = run(client_args(pkidir, ca_path=str(pkidir / "etcd-1.crt"), ca_private_key_path=str(pkidir / "etcd-1.key")))
    assert res["failed"] and "is not a CA" in res["msg"]
    res = run({k: v for k, v in client_args(pkidir).items() if k != "ca_path"})
    assert res["failed"] and res["msg"] == "kind=client needs ca_path: the certificate and key of the CA that signs it"


def test_encrypted_key_is_refused_not_overwritten(run, pkidir):
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    pkidir.mkdir(mode=0o700)
    enc = ec.generate_private_key(ec.SECP256R1()).private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.BestAvailableEncryption(b"pw")
    )
    lib.write_file_atomic(str(pkidir / "ca.key"), lib.PrivateKeyPEM(enc), 0o600)
    before = digest(pkidir / "ca.key")
    res = run(ca_args(pkidir))
    assert res["failed"] and "passphrase-protected" in res["msg"]
    assert digest(pkidir / "ca.key") == before and not (pkidir / "ca.crt").exists()


# --- end to end through the ansible CLI ---------------------------------------------------------


def _ansible(tmp_path: Path, module_args: str, *extra: str) -> subprocess.CompletedProcess:
    env = dict(os.environ)
    env.update(
        ANSIBLE_COLLECTIONS_PATH=str(REPO_ROOT / "build" / "pytest-collections"),
        ANSIBLE_HOME=str(tmp_path / "ansible-home"),
        ANSIBLE_LOCAL_TEMP=str(tmp_path / "ansible-tmp"),
        ANSIBLE_REMOTE_TEMP=str(tmp_path / "ansible-remote-tmp"),
        ANSIBLE_LOCALHOST_WARNING="false",
        ANSIBLE_NOCOLOR="1",
        ANSIBLE_FORCE_COLOR="0",
    )
    env.pop("ANSIBLE_CONFIG", None)
    ansible = Path(sys.executable).parent / "ansible"
    return subprocess.run(
        [str(ansible), "localhost", "-m", "clustermesh.core.pki", "-a", module_args, *extra],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )


def test_end_to_end_with_ansible_cli(tmp_path):
    if not (REPO_ROOT / "build" / "pytest-collections" / "ansible_collections" / "clustermesh" / "core").exists():
        pytest.skip("tests/conftest.py did not create the collection link")
    d = tmp_path / "pki"
    ca = f"kind=ca common_name=e2e-ca path={d}/ca.crt private_key_path={d}/ca.key"
    server = (
        f"kind=server common_name=etcd-1 subject_alt_names=DNS:etcd-1,IP:127.0.0.1 path={d}/etcd-1.crt "
        f"private_key_path={d}/etcd-1.key ca_path={d}/ca.crt ca_private_key_path={d}/ca.key"
    )
    outputs = []
    for args, expect in ((ca, "CHANGED"), (server, "CHANGED"), (ca, "SUCCESS"), (server, "SUCCESS")):
        proc = _ansible(tmp_path, args, "-vvv", "--diff")
        outputs.append(proc.stdout + proc.stderr)
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
        assert f"localhost | {expect} =>" in proc.stdout, proc.stdout[-3000:]
    # changed then not changed, and the key material appears nowhere (also not with -vvv)
    assert '"changed": true' in outputs[1] and '"changed": false' in outputs[3]
    key_lines = [
        line
        for name in ("ca.key", "etcd-1.key")
        for line in (d / name).read_text().splitlines()
        if line and not line.startswith("-----")
    ]
    text = "\n".join(outputs)
    leaked = "PRIVATE KEY" in text or any(line in text for line in key_lines)
    assert not leaked, "private key material in ansible's output"
    out = openssl_verify(d / "ca.crt", d / "etcd-1.crt", "sslserver")
    assert out.returncode == 0, out.stdout + out.stderr
    assert mode_of(d / "etcd-1.key") == 0o600 and mode_of(d) == 0o700
