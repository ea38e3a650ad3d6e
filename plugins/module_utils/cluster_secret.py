# -*- coding: utf-8 -*-
# Copyright: clustermesh.core contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""The Kubernetes Secret ``cilium-clustermesh``: the join of a cluster that runs Kubernetes.

Cilium reads one key per remote cluster, named after it, holding an etcd client config, plus the
keys ``<name>.etcd-client-ca.crt``, ``<name>.etcd-client.crt`` and ``<name>.etcd-client.key``; the
Secret is mounted at /var/lib/cilium/clustermesh, so the config names files there. The content is
the same as ``clusters.d/`` on a node (control_plane.join_file_plan).
"""

from __future__ import annotations

import base64

SECRET_NAME = "cilium-clustermesh"
CILIUM_MOUNT_DIR = "/var/lib/cilium/clustermesh"


def secret_data(peers):
    """``{key: text}`` of the Secret for the given peers (name, endpoints, ca, cert, key)."""
    from .control_plane import CLIENT_FILE_SUFFIXES, _etcd_config_text, _pem

    data = {}
    for peer in peers:
        name = peer["name"]
        files = [CILIUM_MOUNT_DIR + "/" + name + suffix for suffix in CLIENT_FILE_SUFFIXES]
        data[name] = _etcd_config_text(peer["endpoints"], *files).decode()
        for suffix, field in zip(CLIENT_FILE_SUFFIXES, ("ca", "cert", "key"), strict=True):
            data[name + suffix] = _pem(peer[field]).decode()
    return data


def decode_secret_data(raw):
    """The ``data`` of a Secret as returned by the API (base64 values) as text."""
    return {k: base64.b64decode(v).decode() for k, v in (raw or {}).items()}


def reconcile_secret(core_v1, namespace, data, state="present", check_mode=False):
    """Create, replace or delete the Secret; return (changed, before_keys, after_keys).

    ``core_v1`` is a kubernetes.client.CoreV1Api. Values are compared decoded; a Secret that
    already holds exactly ``data`` is left alone.
    """
    from kubernetes.client.exceptions import ApiException

    try:
        current = core_v1.read_namespaced_secret(SECRET_NAME, namespace)
    except ApiException as exc:
        if exc.status != 404:
            raise
        current = None
    before = decode_secret_data(current.data) if current is not None else None
    if state == "absent":
        if current is None:
            return False, None, None
        if not check_mode:
            core_v1.delete_namespaced_secret(SECRET_NAME, namespace)
        return True, sorted(before), None
    if before == data:
        return False, sorted(before), sorted(data)
    if not check_mode:
        body = {
            "apiVersion": "v1",
            "kind": "Secret",
            "type": "Opaque",
            "metadata": {
                "name": SECRET_NAME,
                "namespace": namespace,
                "labels": {"app.kubernetes.io/managed-by": "clustermesh.core"},
            },
            "data": {k: base64.b64encode(v.encode()).decode() for k, v in sorted(data.items())},
        }
        if current is None:
            core_v1.create_namespaced_secret(namespace, body)
        else:
            body["metadata"]["resourceVersion"] = current.metadata.resource_version
            core_v1.replace_namespaced_secret(SECRET_NAME, namespace, body)
    return True, sorted(before) if before is not None else None, sorted(data)
