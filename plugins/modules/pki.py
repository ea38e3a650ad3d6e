#!/usr/bin/python
# -*- coding: utf-8 -*-
# Copyright: clustermesh.core contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
from __future__ import annotations

DOCUMENTATION = r"""
---
module: pki
short_description: Manage the mesh's CA, etcd server/peer and etcd client certificates
version_added: 0.1.0
description:
  - Manages one certificate and its private key as PEM files on the target host, idempotently.
  - V(ca) is a self-signed CA (C(CA:TRUE, pathlen:0)) that signs the leaves.
  - V(server) is an etcd server certificate, also used for etcd peer authentication; extended key usage
    serverAuth and clientAuth; needs at least one subject alternative name because etcd and other Go TLS
    clients ignore the common name when they check the host.
  - V(client) is an etcd client certificate, extended key usage clientAuth; its common name is the etcd
    user name (etcd maps the client certificate's CN to its user).
  - A valid, matching certificate is kept. It is (re)issued when a file is missing or unreadable, the key does
    not match the certificate, the key type differs from O(key_type), the common name or the subject alternative
    names (order-insensitive) differ, the kind or extended key usage differs, a leaf no longer verifies against
    the CA in O(ca_path) (issuer name or signature; so replacing a CA reissues every leaf on the next run of its
    task), a CA is not self-signed, or the certificate expires within O(renew_before) days.
    A changed O(valid_days) alone does not reissue.
  - On a reissue the existing private key is kept if it is valid and of the wanted O(key_type), unless
    O(regenerate_key=true). The key is the durable part, the certificate is derived from it. A CA renewed with
    its old key and name still verifies every leaf it signed, so renewing a CA does not cascade; a CA with a new
    key does.
  - Files are written atomically (a temporary file in the same directory, renamed over the target). The private
    key file is created with mode C(0600) before any content is written and is kept at C(0600); a missing parent
    directory of the key is created with mode C(0700) (C(0755) for a separate certificate directory).
  - The private key never appears in the module's arguments, results, diff or messages.
  - Leaves are signed on the host the task runs on, so the CA private key must be there
    (O(ca_private_key_path)).
author:
  - clustermesh.core developers (@clustermesh)
requirements:
  - cryptography >= 42 on the target host
options:
  kind:
    description: Which kind of certificate to manage.
    type: str
    required: true
    choices: [ca, server, client]
  path:
    description: Where the certificate (PEM) is written.
    type: path
    required: true
  private_key_path:
    description:
      - Where the private key (unencrypted PKCS#8 PEM, mode C(0600)) is written.
      - An existing passphrase-protected key is refused, never overwritten.
    type: path
    required: true
  ca_path:
    description:
      - The signing CA's certificate. Required for O(kind=server) and O(kind=client) when O(state=present).
      - In check mode a missing or unusable CA is reported as a pending change instead of an error, since the
        CA's own task would create it.
    type: path
  ca_private_key_path:
    description:
      - The signing CA's private key. Required for O(kind=server) and O(kind=client) when O(state=present).
    type: path
  common_name:
    description:
      - The certificate's subject common name (the subject is exactly C(CN=<common_name>)).
      - For O(kind=client) this is the etcd user name, for example C(remote-cluster2).
      - Required when O(state=present).
    type: str
  subject_alt_names:
    description:
      - Subject alternative names as V(DNS:name) or V(IP:address). DNS names are compared case-insensitively,
        IP addresses in canonical form, the list order does not matter.
      - At least one is required for O(kind=server); not allowed for O(kind=ca).
    type: list
    elements: str
    default: []
  key_type:
    description: Private key type used when a key is generated. An existing key of another type triggers a reissue.
    type: str
    choices: [ec256, rsa2048]
    default: ec256
  valid_days:
    description:
      - Validity period of a newly issued certificate, in days. Default V(3650) for O(kind=ca), V(365) otherwise.
    type: int
  renew_before:
    description:
      - Reissue when the certificate expires within this many days. Must be smaller than O(valid_days).
    type: int
    default: 30
  regenerate_key:
    description:
      - Generate a new private key whenever the certificate is (re)issued. Does not by itself cause a reissue;
        combine with O(force=true) to rotate a key now.
    type: bool
    default: false
  force:
    description: Reissue the certificate even if it is valid (reason V(force requested)).
    type: bool
    default: false
  state:
    description:
      - V(present) ensures the certificate and key; V(absent) removes both files (not the CA's).
    type: str
    choices: [present, absent]
    default: present
  owner:
    description: Owner of the certificate, the key and any directory this module creates.
  group:
    description: Group of the certificate, the key and any directory this module creates.
  mode:
    description:
      - Mode of the certificate file only; a new certificate is created C(0644), a replaced one keeps its mode.
      - The private key file is always C(0600).
extends_documentation_fragment:
  - ansible.builtin.files
  - ansible.builtin.action_common_attributes
  - ansible.builtin.action_common_attributes.files
attributes:
  check_mode:
    support: full
    details: Reports what would be (re)issued and why; writes nothing.
  diff_mode:
    support: full
    details: Before/after of the certificate summary (subject, SANs, issuer, not_after, fingerprint), no key material.
  platform:
    platforms: posix
  safe_file_operations:
    description: Uses Ansible's strict file operation functions to ensure proper permissions and avoid data corruption.
    support: partial
    details: Writes atomically with its own temporary-file-and-rename code, then applies owner/group/mode/SELinux.
  vault:
    description: Can automatically decrypt Ansible vaulted files.
    support: none
notes:
  - Rerunning the CA task with a new CA (new key or new name) makes each leaf task reissue its certificate
    (reason V(not signed by the current CA)).
seealso:
  - name: etcd transport security
    description: How etcd uses server, peer and client certificates.
    link: https://etcd.io/docs/v3.4/op-guide/security/
"""

EXAMPLES = r"""
- name: The cluster's kvstore CA
  clustermesh.core.pki:
    kind: ca
    common_name: cluster1 kvstore CA
    path: /etc/clustermesh/pki/ca.crt
    private_key_path: /etc/clustermesh/pki/ca.key

- name: etcd server and peer certificate
  clustermesh.core.pki:
    kind: server
    common_name: etcd-1.cluster1.mesh
    subject_alt_names:
      - DNS:etcd-1.cluster1.mesh
      - DNS:localhost
      - IP:198.18.1.11
      - IP:127.0.0.1
    path: /etc/clustermesh/pki/etcd-1.crt
    private_key_path: /etc/clustermesh/pki/etcd-1.key
    ca_path: /etc/clustermesh/pki/ca.crt
    ca_private_key_path: /etc/clustermesh/pki/ca.key
    owner: etcd
    group: etcd

- name: Read-only client certificate for cluster2 (CN is the etcd user)
  clustermesh.core.pki:
    kind: client
    common_name: remote-cluster2
    path: /etc/clustermesh/pki/remote-cluster2.crt
    private_key_path: /etc/clustermesh/pki/remote-cluster2.key
    ca_path: /etc/clustermesh/pki/ca.crt
    ca_private_key_path: /etc/clustermesh/pki/ca.key
  register: client_cert

- name: Rotate the CA key now (every leaf is reissued on its next run)
  clustermesh.core.pki:
    kind: ca
    common_name: cluster1 kvstore CA
    path: /etc/clustermesh/pki/ca.crt
    private_key_path: /etc/clustermesh/pki/ca.key
    force: true
    regenerate_key: true
"""

RETURN = r"""
reasons:
  description: Why the certificate was (or in check mode would be) (re)issued; empty when it was kept.
  returned: always
  type: list
  elements: str
  sample: ["common name is 'etcd-1', want 'etcd-1.cluster1.mesh'", "not signed by the current CA"]
fingerprint:
  description:
    - SHA-256 of the certificate's DER encoding, lower-case hex.
    - V(null) in check mode when a (re)issue is pending, and after O(state=absent).
  returned: always
  type: str
  sample: 3f2a0c9d5e4b1a7f3f2a0c9d5e4b1a7f3f2a0c9d5e4b1a7f3f2a0c9d5e4b1a7f
serial:
  description: Serial number, lower-case hex. V(null) when RV(fingerprint) is.
  returned: always
  type: str
  sample: 5c1d0e2f3a4b
not_before:
  description: Start of validity, ISO 8601 in UTC.
  returned: when O(state=present)
  type: str
  sample: "2025-01-01T00:00:00+00:00"
not_after:
  description: End of validity, ISO 8601 in UTC.
  returned: always
  type: str
  sample: "2026-01-01T00:05:00+00:00"
subject:
  description: The subject as an RFC 4514 string.
  returned: always
  type: str
  sample: CN=etcd-1.cluster1.mesh
common_name:
  description: The subject common name.
  returned: always
  type: str
  sample: etcd-1.cluster1.mesh
subject_alt_names:
  description: Subject alternative names in certificate order, normalised (V(DNS:) lower-case, canonical V(IP:)).
  returned: always
  type: list
  elements: str
  sample: ["DNS:etcd-1.cluster1.mesh", "IP:198.18.1.11"]
issuer:
  description: The issuer as an RFC 4514 string (the subject itself for a CA).
  returned: always
  type: str
  sample: CN=cluster1 kvstore CA
kind:
  description: The certificate's kind as read from it (V(ca), V(server), V(client)).
  returned: when O(state=present)
  type: str
  sample: server
key_type:
  description: The public key type of the certificate.
  returned: when O(state=present)
  type: str
  sample: ec256
private_key_generated:
  description: Whether a new private key was (or in check mode would be) generated.
  returned: always
  type: bool
  sample: false
"""

import grp
import os
import pwd

from ansible.module_utils.basic import AnsibleModule

from ansible_collections.clustermesh.core.plugins.module_utils import pki as pki_lib
from ansible_collections.clustermesh.core.plugins.module_utils.pki import (
    CERT_DIR_MODE,
    CERT_FILE_MODE,
    DEFAULT_VALID_DAYS,
    KEY_DIR_MODE,
    KEY_FILE_MODE,
    KEY_TYPES,
    KINDS,
    PKIError,
    check_signing_ca,
    describe_certificate,
    ensure_parent_dir,
    is_encrypted_private_key,
    issue_ca,
    issue_leaf,
    normalize_subject_alt_names,
    plan_certificate,
    read_optional,
    reusable_private_key,
    summarize_certificate,
    write_file_atomic,
)
from ansible_collections.clustermesh.core.plugins.module_utils.requirements import missing_requirements

_RESULT_FIELDS = (
    "fingerprint",
    "serial",
    "not_before",
    "not_after",
    "subject",
    "common_name",
    "subject_alt_names",
    "issuer",
    "kind",
    "key_type",
)


def _argument_spec():
    return dict(
        kind=dict(type="str", required=True, choices=list(KINDS)),
        path=dict(type="path", required=True),
        private_key_path=dict(type="path", required=True),
        ca_path=dict(type="path"),
        ca_private_key_path=dict(type="path"),
        common_name=dict(type="str"),
        subject_alt_names=dict(type="list", elements="str", default=[]),
        key_type=dict(type="str", choices=list(KEY_TYPES), default="ec256"),
        valid_days=dict(type="int"),
        renew_before=dict(type="int", default=30),
        regenerate_key=dict(type="bool", default=False),
        force=dict(type="bool", default=False),
        state=dict(type="str", choices=["present", "absent"], default="present"),
    )


def _read(module, path, option, secret=False):
    try:
        return read_optional(path, secret=secret)
    except IsADirectoryError:
        module.fail_json(msg=f"{option}={path} is a directory; give the path of a file")
    except OSError as exc:
        module.fail_json(msg=f"cannot read {option}={path}: {exc.strerror}; run with become or fix its permissions")


def _validate(module):
    p = module.params
    kind = p["kind"]
    if kind != "ca" and p["state"] == "present":
        missing = [o for o in ("ca_path", "ca_private_key_path") if not p[o]]
        if missing:
            module.fail_json(
                msg=f"kind={kind} needs {' and '.join(missing)}: the certificate and key of the CA that signs it"
            )
    paths = {"path": p["path"], "private_key_path": p["private_key_path"]}
    if kind != "ca":
        paths.update(ca_path=p["ca_path"], ca_private_key_path=p["ca_private_key_path"])
    seen = {}
    for option, value in paths.items():
        if not value:
            continue
        real = os.path.realpath(value)
        if real in seen:
            module.fail_json(msg=f"{option} and {seen[real]} are the same file ({value}); give each its own path")
        seen[real] = option
    if p["state"] == "absent":
        return None, None
    try:
        sans = normalize_subject_alt_names(p["subject_alt_names"])
    except PKIError as exc:
        module.fail_json(msg=str(exc))
    if kind == "ca" and sans:
        module.fail_json(
            msg="subject_alt_names is not used for kind=ca; remove it (SANs belong on server certificates)"
        )
    if kind == "server" and not sans:
        module.fail_json(
            msg="kind=server needs at least one subject_alt_names entry (DNS:name or IP:address); "
            "etcd and other Go TLS clients ignore the common name when checking the host"
        )
    valid_days = p["valid_days"] if p["valid_days"] is not None else DEFAULT_VALID_DAYS[kind]
    if valid_days < 1:
        module.fail_json(msg=f"valid_days must be at least 1, got {valid_days}")
    if p["renew_before"] < 0:
        module.fail_json(msg=f"renew_before must not be negative, got {p['renew_before']}")
    if p["renew_before"] >= valid_days:
        module.fail_json(
            msg=f"renew_before ({p['renew_before']}) must be smaller than valid_days ({valid_days}), "
            "otherwise every run would reissue the certificate"
        )
    return sans, valid_days


def _result_from(desc):
    return {k: desc.get(k) for k in _RESULT_FIELDS}


def _absent(module):
    p = module.params
    changed = False
    before = {}
    cert_pem = _read(module, p["path"], "path")
    if cert_pem is not None:
        try:
            before = summarize_certificate(cert_pem)
        except PKIError:
            before = {"unreadable": True}
    for option in ("path", "private_key_path"):
        target = p[option]
        if os.path.lexists(target):
            changed = True
            if not module.check_mode:
                try:
                    os.unlink(target)
                except OSError as exc:
                    module.fail_json(msg=f"cannot remove {option}={target}: {exc.strerror}")
    result = dict(changed=changed, reasons=[], private_key_generated=False)
    result.update({k: None for k in _RESULT_FIELDS})
    result["subject_alt_names"] = []
    if module._diff:
        result["diff"] = {"before": before, "after": {}, "before_header": p["path"], "after_header": p["path"]}
    return result


def _present(module, sans, valid_days):
    p = module.params
    kind = p["kind"]
    path = p["path"]
    key_path = p["private_key_path"]

    cert_pem = _read(module, path, "path")
    key_pem = _read(module, key_path, "private_key_path", secret=True)
    if key_pem is not None and is_encrypted_private_key(key_pem):
        module.fail_json(
            msg=f"private_key_path={key_path} holds a passphrase-protected key; this module manages unencrypted "
            "keys only and will not overwrite it; move it away or choose another private_key_path"
        )

    ca_cert_pem = ca_key_pem = None
    ca_problem = None
    if kind != "ca":
        ca_cert_pem = _read(module, p["ca_path"], "ca_path")
        ca_key_pem = _read(module, p["ca_private_key_path"], "ca_private_key_path", secret=True)
        if ca_cert_pem is None or ca_key_pem is None:
            missing = "ca_path" if ca_cert_pem is None else "ca_private_key_path"
            ca_problem = f"{missing}={p[missing]} does not exist; create the CA first (a task with kind=ca)"
        else:
            try:
                check_signing_ca(ca_cert_pem, ca_key_pem)
            except PKIError as exc:
                ca_problem = f"{exc} (ca_path={p['ca_path']}, ca_private_key_path={p['ca_private_key_path']})"
        if ca_problem is not None:
            if not module.check_mode:
                module.fail_json(msg=ca_problem)
            module.warn(f"check mode: the signing CA is not usable yet: {ca_problem}")
            ca_cert_pem = ca_key_pem = None

    try:
        needed, reasons = plan_certificate(
            kind,
            p["common_name"],
            sans,
            cert_pem=cert_pem,
            key_pem=key_pem,
            ca_cert_pem=ca_cert_pem,
            key_type=p["key_type"],
            renew_before_days=p["renew_before"],
        )
    except PKIError as exc:
        module.fail_json(msg=str(exc))
    if ca_problem is not None:
        reasons.append("the signing CA is not usable yet (check mode)")
        needed = True
    if p["force"]:
        reasons.append("force requested")
        needed = True

    try:
        before = summarize_certificate(cert_pem)
    except PKIError:
        before = {"unreadable": True}

    changed = False
    key_generated = False
    if not needed:
        desc = describe_certificate(cert_pem)
        after = before
    else:
        changed = True
        keep_key = not p["regenerate_key"] and reusable_private_key(key_pem, p["key_type"])
        key_generated = not keep_key
        if ca_problem is not None:
            # check mode without a usable CA: describe what is known of the certificate to be issued
            desc = {
                "subject": f"CN={p['common_name']}",
                "common_name": p["common_name"],
                "subject_alt_names": sans,
                "kind": kind,
                "key_type": p["key_type"],
            }
        else:
            try:
                if kind == "ca":
                    issued = issue_ca(
                        p["common_name"],
                        key_pem=key_pem if keep_key else None,
                        key_type=p["key_type"],
                        valid_days=valid_days,
                    )
                else:
                    issued = issue_leaf(
                        kind,
                        p["common_name"],
                        ca_cert_pem=ca_cert_pem,
                        ca_key_pem=ca_key_pem,
                        subject_alt_names=sans,
                        key_pem=key_pem if keep_key else None,
                        key_type=p["key_type"],
                        valid_days=valid_days,
                    )
            except PKIError as exc:
                module.fail_json(msg=str(exc))
            desc = describe_certificate(issued.cert_pem)
            if kind != "ca":
                ca_desc = describe_certificate(ca_cert_pem)
                if desc["not_after"] > ca_desc["not_after"]:
                    module.warn(
                        f"the certificate ({path}) is valid until {desc['not_after']}, after its CA expires "
                        f"({ca_desc['not_after']}); renew the CA before then"
                    )
            if module.check_mode:
                desc["fingerprint"] = None
                desc["serial"] = None
            else:
                _write(module, path, key_path, issued)
        after = {k: desc.get(k) for k in ("subject", "subject_alt_names", "issuer", "not_after", "fingerprint")}

    # owner/group/mode/SELinux: the certificate as requested, the key always 0600
    diffs = []
    cert_args = module.load_file_common_arguments(p, path=path)
    key_args = module.load_file_common_arguments(p, path=key_path)
    key_args["mode"] = KEY_FILE_MODE
    for args in (cert_args, key_args):
        fs_diff = {}
        changed = module.set_fs_attributes_if_different(args, changed, diff=fs_diff)
        if fs_diff.get("before") or fs_diff.get("after"):
            fs_diff["before_header"] = fs_diff["after_header"] = f"{args['path']} (file attributes)"
            diffs.append(fs_diff)

    result = dict(changed=changed, reasons=reasons if needed else [], private_key_generated=key_generated)
    result.update(_result_from(desc))
    if module._diff:
        cert_diff = {"before": before, "after": after, "before_header": path, "after_header": path}
        result["diff"] = [cert_diff, *diffs]
    return result


def _write(module, path, key_path, issued):
    p = module.params
    uid, gid = -1, -1
    if p["owner"] is not None or p["group"] is not None:
        uid, gid = _resolve_ids(module, p["owner"], p["group"])
    key_dir = os.path.dirname(os.path.abspath(key_path))
    cert_dir = os.path.dirname(os.path.abspath(path))
    try:
        ensure_parent_dir(key_path, KEY_DIR_MODE, uid=uid, gid=gid)
        ensure_parent_dir(path, KEY_DIR_MODE if cert_dir == key_dir else CERT_DIR_MODE, uid=uid, gid=gid)
        # key first: if writing the certificate fails, the next run sees a key/certificate mismatch and heals
        if issued.key_generated:
            write_file_atomic(key_path, issued.key_pem, KEY_FILE_MODE)
        cert_mode = CERT_FILE_MODE
        try:
            cert_mode = os.stat(path).st_mode & 0o7777
        except FileNotFoundError:
            pass
        write_file_atomic(path, issued.cert_pem, cert_mode)
    except OSError as exc:
        module.fail_json(msg=f"cannot write {exc.filename or path}: {exc.strerror}; check the directory's permissions")


def _resolve_ids(module, owner, group):
    uid = gid = -1
    try:
        if owner is not None:
            uid = int(owner) if owner.isdigit() else pwd.getpwnam(owner).pw_uid
        if group is not None:
            gid = int(group) if group.isdigit() else grp.getgrnam(group).gr_gid
    except KeyError:
        module.fail_json(msg=f"owner {owner!r} or group {group!r} does not exist on the host")
    return uid, gid


def main():
    module = AnsibleModule(
        argument_spec=_argument_spec(),
        add_file_common_args=True,
        supports_check_mode=True,
        required_if=[("state", "present", ("common_name",))],
    )
    missing = missing_requirements(pki_lib)
    if missing:
        module.fail_json(msg=missing)
    sans, valid_days = _validate(module)
    result = _absent(module) if module.params["state"] == "absent" else _present(module, sans, valid_days)
    module.exit_json(**result)


if __name__ == "__main__":
    main()
