# -*- coding: utf-8 -*-
# Copyright: clustermesh.core contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""The control plane's names, ports and files, in one place (see docs/control-plane.md).

Everything here is derived from the normalised mesh (``mesh_model.Mesh.to_dict()``): which
certificates the mesh needs, which etcd users exist and what they may read, which endpoints
a cluster exposes, and which files each node holds. Roles, modules and the agent all ask this
file instead of spelling paths and user names themselves.
"""

from __future__ import annotations

import os

KVSTORE_CLIENT_PORT = 2379
KVSTORE_PEER_PORT = 2380
KVSTORE_METRICS_PORT = 2381
KVSTORE_PROXY_PORT = 32379

CONFIG_DIR = "/etc/clustermesh"
MESH_DOMAIN = "mesh.local"

# Node-side paths, relative to CONFIG_DIR.
KVSTORE_CONFIG = "kvstore.yaml"
CLUSTERS_DIR = "clusters.d"
LOCAL_PKI_DIR = "pki"
ETCD_DIR = "etcd"
HAPROXY_DIR = "haproxy"


def admin_user(cluster):
    """Read-write etcd user of a cluster's own nodes."""
    return "admin-" + cluster


def remote_user(reader):
    """Read-only etcd user that cluster ``reader`` uses to read another cluster."""
    return "remote-" + reader


REMOTE_ROLE = "remote"


def remote_read_keys(owner):
    """(key, range_end-is-prefix) pairs the remote role may read in cluster ``owner``'s etcd."""
    return [
        ("cilium/.heartbeat", False),
        ("cilium/state/", True),
        ("cilium/cluster-config/" + owner, False),
        ("cilium/synced/" + owner + "/", True),
    ]


def cluster_dns_name(cluster, domain=MESH_DOMAIN):
    return "%s.%s" % (cluster, domain)


def _cluster(mesh, name):
    for cluster in mesh["clusters"]:
        if cluster["name"] == name:
            return cluster
    raise KeyError("cluster %r is not part of the mesh" % name)


def _nodes_by_name(cluster):
    return {node["name"]: node for node in cluster["nodes"]}


def member_nodes(cluster):
    nodes = _nodes_by_name(cluster)
    return [nodes[name] for name in cluster["kvstore_members"]]


def proxy_nodes(cluster):
    nodes = _nodes_by_name(cluster)
    return [nodes[name] for name in cluster["kvstore_proxies"]]


def member_endpoints(cluster, port=KVSTORE_CLIENT_PORT):
    """What the cluster's own nodes use: every etcd member directly."""
    return ["https://%s:%d" % (node["ip"], port) for node in member_nodes(cluster)]


def mesh_endpoints(cluster, port=KVSTORE_PROXY_PORT):
    """What other clusters use: the cluster's proxies."""
    return ["https://%s:%d" % (node["ip"], port) for node in proxy_nodes(cluster)]


def _cert(pki_dir, cluster, stem, kind, common_name, sans=()):
    base = os.path.join(pki_dir, cluster)
    return {
        "id": "%s/%s" % (cluster, stem),
        "cluster": cluster,
        "kind": kind,
        "common_name": common_name,
        "subject_alt_names": list(sans),
        "path": os.path.join(base, stem + ".crt"),
        "private_key_path": os.path.join(base, stem + ".key"),
        "ca_path": os.path.join(base, "ca.crt"),
        "ca_private_key_path": os.path.join(base, "ca.key"),
    }


def server_sans(cluster, node, domain=MESH_DOMAIN):
    """SANs of a member's certificate: remote clients reach it through any proxy address."""
    sans = ["DNS:" + node["name"], "DNS:localhost", "DNS:" + cluster_dns_name(cluster["name"], domain)]
    ips = [node["ip"], "127.0.0.1"] + [proxy["ip"] for proxy in proxy_nodes(cluster)]
    seen = []
    for ip in ips:
        if ip not in seen:
            seen.append(ip)
    return sans + ["IP:" + ip for ip in seen]


def certificate_plan(mesh, pki_dir, domain=MESH_DOMAIN):
    """Every certificate of the mesh, CAs first, in a stable order."""
    plan = []
    for cluster in mesh["clusters"]:
        name = cluster["name"]
        ca = _cert(pki_dir, name, "ca", "ca", "clustermesh-%s-ca" % name)
        ca["ca_path"] = ca["ca_private_key_path"] = None
        plan.append(ca)
    for cluster in mesh["clusters"]:
        name = cluster["name"]
        for node in member_nodes(cluster):
            plan.append(
                _cert(
                    pki_dir, name, "server-" + node["name"], "server", node["name"], server_sans(cluster, node, domain)
                )
            )
        plan.append(_cert(pki_dir, name, "root", "client", "root"))
        plan.append(_cert(pki_dir, name, "admin", "client", admin_user(name)))
        for reader in cluster["connected_from"]:
            plan.append(_cert(pki_dir, name, "remote-" + reader, "client", remote_user(reader)))
    return plan


def node_files(mesh, node_name, pki_dir, config_dir=CONFIG_DIR):
    """Which controller files a node gets, and the settings of its kvstore configs.

    Returns ``{"local": {...}, "peers": [...], "member": bool, "member_credentials": {...} or None,
    "proxy": bool, "proxy_backends": [...]}``: ``local`` and each peer hold the Cilium etcd-config
    settings (name, endpoints, trusted-ca-file, cert-file, key-file) and the controller files of
    their credentials (ca_src, cert_src, key_src); ``member_credentials`` the controller files of
    a kvstore member's etcd certificates. Role ``mesh`` reads them and hands them to ``mesh_join``.
    ``proxy_backends`` are the cluster's etcd members as role ``kvstore_proxy`` wants them;
    ``sources`` every controller file the node's credentials come from.
    """
    node = cluster = None
    for c in mesh["clusters"]:
        for n in c["nodes"]:
            if n["name"] == node_name or n.get("host") == node_name:
                node, cluster = n, c
    if node is None:
        raise KeyError("node %r is not part of the mesh" % node_name)
    name = cluster["name"]
    own = os.path.join(pki_dir, name)
    local_pki = os.path.join(config_dir, LOCAL_PKI_DIR)
    local = {
        "name": name,
        "endpoints": member_endpoints(cluster),
        "trusted-ca-file": os.path.join(local_pki, "ca.crt"),
        "cert-file": os.path.join(local_pki, "admin.crt"),
        "key-file": os.path.join(local_pki, "admin.key"),
        "ca_src": os.path.join(own, "ca.crt"),
        "cert_src": os.path.join(own, "admin.crt"),
        "key_src": os.path.join(own, "admin.key"),
    }
    clusters_dir = os.path.join(config_dir, CLUSTERS_DIR)
    peers = []
    for peer_name in cluster["connect_to"]:
        peer = _cluster(mesh, peer_name)
        src = os.path.join(pki_dir, peer_name)
        dest = os.path.join(clusters_dir, peer_name)
        peers.append(
            {
                "name": peer_name,
                "endpoints": mesh_endpoints(peer),
                "trusted-ca-file": dest + ".etcd-client-ca.crt",
                "cert-file": dest + ".etcd-client.crt",
                "key-file": dest + ".etcd-client.key",
                "ca_src": os.path.join(src, "ca.crt"),
                "cert_src": os.path.join(src, "remote-%s.crt" % name),
                "key_src": os.path.join(src, "remote-%s.key" % name),
            }
        )
    member = None
    if node["name"] in cluster["kvstore_members"]:
        member = {
            "ca_src": os.path.join(own, "ca.crt"),
            "cert_src": os.path.join(own, "server-%s.crt" % node["name"]),
            "key_src": os.path.join(own, "server-%s.key" % node["name"]),
            "root_cert_src": os.path.join(own, "root.crt"),
            "root_key_src": os.path.join(own, "root.key"),
        }
    sources = [local["ca_src"], local["cert_src"], local["key_src"]]
    for peer in peers:
        sources += [peer["ca_src"], peer["cert_src"], peer["key_src"]]
    sources += sorted((member or {}).values())
    return {
        "cluster": name,
        "sources": sources,
        "proxy_backends": [
            {"name": m["name"], "address": m["ip"], "port": KVSTORE_CLIENT_PORT, "check_port": KVSTORE_METRICS_PORT}
            for m in member_nodes(cluster)
        ],
        "local": local,
        "peers": peers,
        "member": member is not None,
        "member_credentials": member,
        "proxy": node["name"] in cluster["kvstore_proxies"],
    }


# --- joining: the files a node holds for its own cluster and the clusters it connects to --------

CLIENT_FILE_SUFFIXES = (".etcd-client-ca.crt", ".etcd-client.crt", ".etcd-client.key")

# Argument spec of one connection's credentials and of a peer (doc fragment clustermesh.core.join_peers).
CREDENTIALS_ARGUMENT_SPEC = dict(
    endpoints=dict(type="list", elements="str", required=True),
    ca=dict(type="str", required=True),
    cert=dict(type="str", required=True),
    key=dict(type="str", required=True, no_log=True),
)
PEERS_ARGUMENT_SPEC = dict(
    type="list",
    elements="dict",
    default=[],
    options=dict(name=dict(type="str", required=True), **CREDENTIALS_ARGUMENT_SPEC),
)


class JoinError(ValueError):
    """Bad join input (a wrong certificate, an unknown name); nothing has been written."""


def _check_credentials(what, creds):
    """The CA, certificate and key of one kvstore connection must fit together."""
    from .pki import PKIError, describe_certificate, verify_chain, verify_pair

    try:
        if not verify_pair(creds["cert"], creds["key"]):
            raise JoinError("%s: the private key does not belong to the client certificate" % what)
        verify_chain(creds["cert"], creds["ca"])
    except PKIError as exc:
        raise JoinError("%s: %s" % (what, exc)) from None
    return describe_certificate(creds["cert"])["common_name"]


def _etcd_config_text(endpoints, ca_file, cert_file, key_file):
    from .kvstore_config import EtcdClientConfig, KVStoreConfigError, dump_etcd_config

    try:
        config = EtcdClientConfig(endpoints=endpoints, trusted_ca_file=ca_file, cert_file=cert_file, key_file=key_file)
    except KVStoreConfigError as exc:
        raise JoinError(str(exc)) from None
    return dump_etcd_config(config).encode()


def _member_files(cluster, member, config_dir):
    """A kvstore member's etcd certificates: server (also for peers) and root (for etcd_auth)."""
    from .pki import PKIError, describe_certificate, verify_chain, verify_pair

    etcd_dir = os.path.join(config_dir, ETCD_DIR)
    what = "kvstore member of %s" % cluster
    try:
        for cert, key, label in (
            (member["cert"], member["key"], "server"),
            (member["root_cert"], member["root_key"], "root"),
        ):
            if not verify_pair(cert, key):
                raise JoinError("%s: the %s private key does not belong to its certificate" % (what, label))
            verify_chain(cert, member["ca"])
        if describe_certificate(member["root_cert"])["common_name"] != "root":
            raise JoinError("%s: the root client certificate's CN must be 'root'" % what)
    except PKIError as exc:
        raise JoinError("%s: %s" % (what, exc)) from None
    return {
        os.path.join(etcd_dir, "ca.crt"): (_pem(member["ca"]), 0o644),
        os.path.join(etcd_dir, "server.crt"): (_pem(member["cert"]), 0o644),
        os.path.join(etcd_dir, "server.key"): (_pem(member["key"]), 0o600),
        os.path.join(etcd_dir, "root.crt"): (_pem(member["root_cert"]), 0o644),
        os.path.join(etcd_dir, "root.key"): (_pem(member["root_key"]), 0o600),
    }


def join_file_plan(cluster, local, peers, config_dir=CONFIG_DIR, member=None):
    """``{path: (bytes, mode)}`` of every file the join owns on a node.

    ``local`` and each of ``peers`` hold ``endpoints`` and PEM ``ca``, ``cert``, ``key``; peers also
    ``name``. ``member`` (kvstore members only) holds PEM ``ca``, ``cert``, ``key`` (the etcd server
    certificate) and ``root_cert``, ``root_key``. Raises JoinError naming the first problem (own
    cluster as peer, duplicate peer, a certificate that does not match its key or is not signed by
    the given CA).
    """
    from .mesh_model import cluster_name_error

    plan = {}
    pki_dir = os.path.join(config_dir, LOCAL_PKI_DIR)
    if local:
        cn = _check_credentials("local cluster %s" % cluster, local)
        if cn != admin_user(cluster):
            raise JoinError(
                "local cluster %s: client certificate CN is %r, expected %r" % (cluster, cn, admin_user(cluster))
            )
        paths = {
            k: os.path.join(pki_dir, f) for k, f in (("ca", "ca.crt"), ("cert", "admin.crt"), ("key", "admin.key"))
        }
        plan[os.path.join(config_dir, KVSTORE_CONFIG)] = (
            _etcd_config_text(local["endpoints"], paths["ca"], paths["cert"], paths["key"]),
            0o644,
        )
        plan[paths["ca"]] = (_pem(local["ca"]), 0o644)
        plan[paths["cert"]] = (_pem(local["cert"]), 0o644)
        plan[paths["key"]] = (_pem(local["key"]), 0o600)
    if member:
        plan.update(_member_files(cluster, member, config_dir))
    seen = set()
    clusters_dir = os.path.join(config_dir, CLUSTERS_DIR)
    for index, peer in enumerate(peers):
        name = peer.get("name")
        error = cluster_name_error(name)
        if error:
            raise JoinError("peers[%d].name: %s" % (index, error))
        if name == cluster:
            raise JoinError(
                "peers[%d].name: %r is this node's own cluster; a cluster does not join itself" % (index, name)
            )
        if name in seen:
            raise JoinError("peers[%d].name: %r appears twice" % (index, name))
        seen.add(name)
        cn = _check_credentials("peer %s" % name, peer)
        if cn != remote_user(cluster):
            raise JoinError(
                "peer %s: client certificate CN is %r, expected %r (the read-only user of cluster %s)"
                % (name, cn, remote_user(cluster), cluster)
            )
        base = os.path.join(clusters_dir, name)
        ca_file, cert_file, key_file = (base + suffix for suffix in CLIENT_FILE_SUFFIXES)
        plan[base] = (_etcd_config_text(peer["endpoints"], ca_file, cert_file, key_file), 0o644)
        plan[ca_file] = (_pem(peer["ca"]), 0o644)
        plan[cert_file] = (_pem(peer["cert"]), 0o644)
        plan[key_file] = (_pem(peer["key"]), 0o600)
    return plan


def _pem(text):
    data = text.encode() if isinstance(text, str) else bytes(text)
    return data if data.endswith(b"\n") else data + b"\n"


def stale_join_files(config_dir, wanted_peers):
    """Files in clusters.d of peers that are no longer wanted (only names the join writes)."""
    clusters_dir = os.path.join(config_dir, CLUSTERS_DIR)
    try:
        entries = sorted(os.listdir(clusters_dir))
    except FileNotFoundError:
        return []
    stale = []
    for entry in entries:
        peer = entry
        for suffix in CLIENT_FILE_SUFFIXES:
            if entry.endswith(suffix):
                peer = entry[: -len(suffix)]
        if "." in peer or peer.startswith("."):
            continue  # not a file of ours
        if peer not in wanted_peers:
            stale.append(os.path.join(clusters_dir, entry))
    return stale
