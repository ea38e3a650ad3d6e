# -*- coding: utf-8 -*-
# Copyright: clustermesh.core contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""Key builders/parsers of Cilium's kvstore layout, the cluster-config codec and etcd-config YAML."""

from __future__ import annotations

import datetime
import json
import os
import stat

import pytest

from ansible_collections.clustermesh.core.plugins.module_utils import kvstore_layout as L
from ansible_collections.clustermesh.core.plugins.module_utils.kvstore_config import (
    EtcdClientConfig,
    KVStoreConfigError,
    dump_etcd_config,
    load_etcd_config,
    parse_etcd_config,
    write_etcd_config,
)

# --------------------------------------------------------------------------------------------
# keys
# --------------------------------------------------------------------------------------------


def test_fixed_keys_and_prefixes():
    assert L.heartbeat_key() == "cilium/.heartbeat"
    assert L.nodes_prefix() == "cilium/state/nodes/v1/"
    assert L.nodes_prefix("cluster1") == "cilium/state/nodes/v1/cluster1/"
    assert L.services_prefix() == "cilium/state/services/v1/"
    assert L.services_prefix("c1", "default") == "cilium/state/services/v1/c1/default/"
    assert L.ip_prefix() == "cilium/state/ip/v1/default/"
    assert L.synced_prefix("c1") == "cilium/synced/c1/"
    for prefix in (L.NODES_PREFIX, L.SERVICES_PREFIX, L.IP_PREFIX, L.IDENTITIES_PREFIX):
        assert prefix.startswith(L.STATE_PREFIX)
        assert prefix.endswith("/")


def test_cluster_config_key_round_trip():
    key = L.cluster_config_key("cluster1")
    assert key == "cilium/cluster-config/cluster1"
    assert L.parse_cluster_config_key(key) == "cluster1"


@pytest.mark.parametrize(
    "key",
    [
        "cilium/cluster-config/",
        "cilium/cluster-config/Cluster1",
        "cilium/cluster-config/c1/extra",
        "cilium/cluster-config/-c1",
        "cilium/cluster-config/" + "a" * 33,
        "cilium/state/nodes/v1/c1/n1",
    ],
)
def test_cluster_config_key_rejects_malformed(key):
    with pytest.raises(L.KeyLayoutError):
        L.parse_cluster_config_key(key)


def test_synced_key_round_trip():
    key = L.synced_key("cluster1", "cilium/state/nodes/v1")
    assert key == "cilium/synced/cluster1/cilium/state/nodes/v1"
    assert L.parse_synced_key(key) == L.SyncedKey("cluster1", "cilium/state/nodes/v1")
    # a trailing slash on the prefix is normalised away, as Cilium writes it
    assert L.synced_key("cluster1", "cilium/state/ip/v1/") == "cilium/synced/cluster1/cilium/state/ip/v1"
    for prefix in L.SYNCED_STATE_PREFIXES:
        assert L.parse_synced_key(L.synced_key("c2", prefix)).prefix == prefix


@pytest.mark.parametrize(
    "key",
    ["cilium/synced/c1", "cilium/synced/c1/", "cilium/synced/C1/cilium/state/nodes/v1", "cilium/synced/c1/other/x"],
)
def test_synced_key_rejects_malformed(key):
    with pytest.raises(L.KeyLayoutError):
        L.parse_synced_key(key)


def test_node_key_round_trip():
    key = L.node_key("cluster1", "node-a.example")
    assert key == "cilium/state/nodes/v1/cluster1/node-a.example"
    assert L.parse_node_key(key) == L.NodeKey("cluster1", "node-a.example")


@pytest.mark.parametrize(
    "key",
    [
        "cilium/state/nodes/v1/cluster1",
        "cilium/state/nodes/v1/cluster1/",
        "cilium/state/nodes/v1/cluster1/a/b",
        "cilium/state/nodes/v1//node",
        "cilium/state/nodes/v1/cluster1/-bad",
        "cilium/state/nodes/v1/cluster1/bad name",
        "cilium/state/nodes/v2/cluster1/n",
    ],
)
def test_node_key_rejects_malformed(key):
    with pytest.raises(L.KeyLayoutError):
        L.parse_node_key(key)


def test_service_key_round_trip():
    key = L.service_key("cluster1", "default", "rebel-base")
    assert key == "cilium/state/services/v1/cluster1/default/rebel-base"
    assert L.parse_service_key(key) == L.ServiceKey("cluster1", "default", "rebel-base")


@pytest.mark.parametrize(
    "key",
    [
        "cilium/state/services/v1/cluster1/default",
        "cilium/state/services/v1/cluster1/default/",
        "cilium/state/services/v1/cluster1/default/a/b",
        "cilium/state/services/v1/cluster1/Default/x",
        "cilium/state/services/v1/cluster1/default/x_y",
        "cilium/state/services/v1/cluster1/" + "n" * 64 + "/x",
    ],
)
def test_service_key_rejects_malformed(key):
    with pytest.raises(L.KeyLayoutError):
        L.parse_service_key(key)


def test_service_builder_rejects_bad_parts():
    with pytest.raises(L.KeyLayoutError, match="namespace"):
        L.service_key("c1", "Bad_NS", "svc")
    with pytest.raises(L.KeyLayoutError, match="cluster name"):
        L.service_key("c1/x", "default", "svc")
    with pytest.raises(L.KeyLayoutError):
        L.services_prefix(None, "default")


@pytest.mark.parametrize(
    "ip,expected",
    [
        ("10.1.0.5", "10.1.0.5"),
        ("fd00::1", "fd00::1"),
        ("fd00:0:0::0001", "fd00::1"),
        ("10.1.0.0/24", "10.1.0.0/24"),
    ],
)
def test_ip_key_round_trip(ip, expected):
    key = L.ip_key(ip)
    assert key == "cilium/state/ip/v1/default/" + expected
    assert L.parse_ip_key(key) == L.IPKey("default", expected)


@pytest.mark.parametrize(
    "key",
    [
        "cilium/state/ip/v1/default/",
        "cilium/state/ip/v1/default/10.1.0.256",
        "cilium/state/ip/v1/default/10.1.0.1/24",  # host bits set
        "cilium/state/ip/v1/default/not-an-ip",
        "cilium/state/ip/v1/default",
        "cilium/state/ip/v1/Default/10.1.0.1",
    ],
)
def test_ip_key_rejects_malformed(key):
    with pytest.raises(L.KeyLayoutError):
        L.parse_ip_key(key)


def test_ip_key_non_canonical_is_strict_by_default():
    key = "cilium/state/ip/v1/default/fd00:0::1"
    with pytest.raises(L.KeyLayoutError, match="canonical"):
        L.parse_ip_key(key)
    assert L.parse_ip_key(key, strict=False).ip == "fd00::1"


def test_identity_key_round_trip():
    key = L.identity_key(65637)
    assert key == "cilium/state/identities/v1/id/65637"
    assert L.parse_identity_key(key) == 65637


@pytest.mark.parametrize(
    "key",
    [
        "cilium/state/identities/v1/id/",
        "cilium/state/identities/v1/id/0",
        "cilium/state/identities/v1/id/0123",
        "cilium/state/identities/v1/id/-5",
        "cilium/state/identities/v1/id/16777216",
        "cilium/state/identities/v1/id/12a",
        "cilium/state/identities/v1/id/\u0661\u0662",  # non-ASCII digits
        "cilium/state/identities/v1/value/k8s:a=b",
    ],
)
def test_identity_key_rejects_malformed(key):
    with pytest.raises(L.KeyLayoutError):
        L.parse_identity_key(key)


def test_identity_builder_rejects_bool_and_range():
    for bad in (True, 0, 1 << 24, "5"):
        with pytest.raises(L.KeyLayoutError):
            L.identity_key(bad)


@pytest.mark.parametrize(
    "state_key,cache_key",
    [
        ("cilium/state/nodes/v1/c2/node1", "cilium/cache/nodes/v1/c2/node1"),
        ("cilium/state/services/v1/c2/default/web", "cilium/cache/services/v1/c2/default/web"),
        ("cilium/state/identities/v1/id/131073", "cilium/cache/identities/v1/c2/id/131073"),
        ("cilium/state/ip/v1/default/10.2.0.7", "cilium/cache/ip/v1/c2/10.2.0.7"),
    ],
)
def test_cache_keys_round_trip(state_key, cache_key):
    assert L.state_to_cache_key(state_key, "c2") == cache_key
    parsed = L.parse_cache_key(cache_key)
    assert parsed.cluster == "c2"
    assert parsed.state_key == state_key
    assert cache_key.startswith(L.cache_prefix(parsed.kind, "c2"))


def test_cache_key_errors():
    with pytest.raises(L.KeyLayoutError, match="belongs to cluster"):
        L.state_to_cache_key("cilium/state/nodes/v1/c1/n", "c2")
    with pytest.raises(L.KeyLayoutError):
        L.state_to_cache_key("cilium/.heartbeat", "c2")
    with pytest.raises(L.KeyLayoutError, match="kind"):
        L.cache_prefix("endpoints")
    for bad in (
        "cilium/cache/nodes/v1/c2",
        "cilium/cache/nodes/v1/c2/",
        "cilium/cache/nodes/v1/c2/a/b",
        "cilium/cache/things/v1/c2/x",
        "cilium/cache/identities/v1/c2/131073",
        "cilium/cache/ip/v1/c2/999.1.1.1",
    ):
        with pytest.raises(L.KeyLayoutError):
            L.parse_cache_key(bad)


@pytest.mark.parametrize("name", ["c", "cluster1", "a-b", "a" * 32, "1x"])
def test_valid_cluster_names(name):
    assert L.validate_cluster_name(name) == name


@pytest.mark.parametrize("name", ["", "A", "a_b", "-a", "a-", "a" * 33, "a.b", None, 5])
def test_invalid_cluster_names(name):
    with pytest.raises(L.KeyLayoutError):
        L.validate_cluster_name(name)


def test_parsers_reject_non_strings():
    for parser in (L.parse_node_key, L.parse_service_key, L.parse_ip_key, L.parse_identity_key):
        with pytest.raises(L.KeyLayoutError):
            parser(b"cilium/state/nodes/v1/c/n")


# --------------------------------------------------------------------------------------------
# network policies (clustermesh.core's own prefix)
# --------------------------------------------------------------------------------------------


def test_policy_key_round_trip():
    key = L.policy_key("default", "CiliumNetworkPolicy", "allow-cross-cluster")
    assert key == "cilium/clustermesh-core/policies/v1/default/CiliumNetworkPolicy/allow-cross-cluster"
    parsed = L.parse_policy_key(key)
    assert parsed == L.PolicyKey("default", "CiliumNetworkPolicy", "allow-cross-cluster")
    assert parsed.ref == "default/CiliumNetworkPolicy/allow-cross-cluster"
    # Kubernetes object names are DNS subdomains: dots allowed
    key = L.policy_key("prod", "NetworkPolicy", "allow.web-80")
    assert L.parse_policy_key(key) == L.PolicyKey("prod", "NetworkPolicy", "allow.web-80")


def test_policies_prefix():
    assert L.policies_prefix() == L.POLICIES_PREFIX == "cilium/clustermesh-core/policies/v1/"
    assert L.policies_prefix("default") == "cilium/clustermesh-core/policies/v1/default/"
    assert L.policy_key("default", "NetworkPolicy", "x").startswith(L.policies_prefix("default"))
    # "default/" must not also be the prefix of namespace "default2"'s keys
    assert not L.policy_key("default2", "NetworkPolicy", "x").startswith(L.policies_prefix("default"))
    with pytest.raises(L.KeyLayoutError, match="namespace"):
        L.policies_prefix("Default")


def test_policies_are_invisible_to_remote_clusters():
    """The remote role's read grants (etcd_auth) cover none of the policy keys; the admin's do."""
    from ansible_collections.clustermesh.core.plugins.module_utils.control_plane import remote_read_keys

    assert L.POLICIES_PREFIX.startswith(L.OWN_PREFIX)
    key = L.policy_key("default", "CiliumNetworkPolicy", "p")
    for grant, is_prefix in remote_read_keys("cluster1"):
        assert not (key.startswith(grant) if is_prefix else key == grant), grant
    assert key.startswith(L.ROOT)  # the node's admin user may write under cilium/


@pytest.mark.parametrize(
    "key",
    [
        "cilium/clustermesh-core/policies/v1/default/CiliumNetworkPolicy",
        "cilium/clustermesh-core/policies/v1/default/CiliumNetworkPolicy/",
        "cilium/clustermesh-core/policies/v1/default/CiliumNetworkPolicy/a/b",
        "cilium/clustermesh-core/policies/v1/default/CiliumClusterwideNetworkPolicy/a",
        "cilium/clustermesh-core/policies/v1/default/ciliumnetworkpolicy/a",
        "cilium/clustermesh-core/policies/v1/Default/NetworkPolicy/a",
        "cilium/clustermesh-core/policies/v1/default/NetworkPolicy/Allow",
        "cilium/clustermesh-core/policies/v1/default/NetworkPolicy/a..b",
        "cilium/clustermesh-core/policies/v1/default/NetworkPolicy/" + "a" * 254,
        "cilium/clustermesh-core/services/v1/default/rebel-base",
        "cilium/clustermesh-core/policies/v2/default/NetworkPolicy/a",
    ],
)
def test_policy_key_rejects_malformed(key):
    with pytest.raises(L.KeyLayoutError):
        L.parse_policy_key(key)


def test_policy_builder_names_the_bad_part():
    with pytest.raises(L.KeyLayoutError, match="namespace 'Prod'"):
        L.policy_key("Prod", "NetworkPolicy", "x")
    with pytest.raises(L.KeyLayoutError, match="policy kind 'Policy' is not CiliumNetworkPolicy or NetworkPolicy"):
        L.policy_key("default", "Policy", "x")
    with pytest.raises(L.KeyLayoutError, match="policy name 'x_y' is not a DNS subdomain"):
        L.policy_key("default", "NetworkPolicy", "x_y")
    with pytest.raises(L.KeyLayoutError, match="non-empty"):
        L.policy_key("default", "NetworkPolicy", "")
    with pytest.raises(L.KeyLayoutError):
        L.parse_policy_key(b"cilium/clustermesh-core/policies/v1/default/NetworkPolicy/x")


def test_policy_kinds_and_names_agree_with_the_policy_model():
    """Every policy the model accepts has a key, and the key's parts are the policy's."""
    from ansible_collections.clustermesh.core.plugins.module_utils import policy as P

    assert set(L.POLICY_KINDS) == set(P.KINDS)
    doc = {
        "apiVersion": "networking.k8s.io/v1",
        "kind": "NetworkPolicy",
        "metadata": {"name": "a." + "b" * 60 + ".c", "namespace": "prod"},
        "spec": {"podSelector": {}},
    }
    pol = P.parse_policy(doc)
    assert L.parse_policy_key(L.policy_key(pol.namespace, pol.kind, pol.name)).ref == pol.ref


# --------------------------------------------------------------------------------------------
# values
# --------------------------------------------------------------------------------------------


def test_cluster_config_encoding_matches_cilium():
    data = L.encode_cluster_config(L.ClusterConfig(id=3))
    assert json.loads(data) == {
        "id": 3,
        "capabilities": {"syncedCanaries": True, "cached": False, "maxConnectedClusters": 255},
    }
    assert data.startswith(b'{"id":3,"capabilities":{"syncedCanaries":true')
    assert L.decode_cluster_config(data) == L.ClusterConfig(id=3)


def test_cluster_config_round_trip_511():
    config = L.ClusterConfig(id=400, synced_canaries=True, cached=True, max_connected_clusters=511)
    assert L.decode_cluster_config(L.encode_cluster_config(config)) == config


def test_cluster_config_decode_defaults_and_unknown_fields():
    config = L.decode_cluster_config('{"id": 7, "capabilities": {"serviceExportsEnabled": true}, "new": 1}')
    assert config == L.ClusterConfig(id=7, synced_canaries=False, cached=False, max_connected_clusters=255)
    assert L.decode_cluster_config(b'{"id": 9}').max_connected_clusters == 255


@pytest.mark.parametrize(
    "value,match",
    [
        (b"not json", "JSON"),
        (b"[1]", "object"),
        (b"{}", "no 'id'"),
        (b'{"id": 0}', "outside"),
        (b'{"id": 256}', "outside"),
        (b'{"id": 300, "capabilities": {"maxConnectedClusters": 255}}', "outside"),
        (b'{"id": 1, "capabilities": {"maxConnectedClusters": 100}}', "maxConnectedClusters"),
        (b'{"id": "1"}', "integer"),
        (b'{"id": true}', "integer"),
        (b'{"id": 1, "capabilities": []}', "capabilities"),
        (b'{"id": 1, "capabilities": {"syncedCanaries": "yes"}}', "boolean"),
    ],
)
def test_cluster_config_decode_rejects(value, match):
    with pytest.raises(L.KeyLayoutError, match=match):
        L.decode_cluster_config(value)


def test_timestamps():
    when = datetime.datetime(2026, 11, 25, 10, 30, 5, 123456, tzinfo=datetime.UTC)
    encoded = L.encode_timestamp(when)
    assert encoded == b"2026-11-25T10:30:05Z"
    assert L.decode_timestamp(encoded) == when.replace(microsecond=0)
    offset = L.decode_timestamp("2026-11-25T11:30:05.5+01:00")
    assert offset == datetime.datetime(2026, 11, 25, 10, 30, 5, 500000, tzinfo=datetime.UTC)
    # Go's RFC3339Nano has nanoseconds: truncated to microseconds
    assert L.decode_timestamp("2026-11-25T10:30:05.123456789Z").microsecond == 123456
    assert L.encode_timestamp().endswith(b"Z")
    for bad in ("", "2026-11-25", "yesterday", "2026-13-01T00:00:00Z", "2026-11-25T10:30:05"):
        with pytest.raises(L.KeyLayoutError):
            L.decode_timestamp(bad)
    with pytest.raises(L.KeyLayoutError):
        L.encode_timestamp(datetime.datetime(2026, 1, 1))


# --------------------------------------------------------------------------------------------
# etcd-config YAML
# --------------------------------------------------------------------------------------------

CILIUM_EXAMPLE = """\
endpoints:
- https://cluster2.mesh.example:2379
trusted-ca-file: /var/lib/cilium/clustermesh/cluster2.etcd-client-ca.crt
key-file: /var/lib/cilium/clustermesh/cluster2.etcd-client.key
cert-file: /var/lib/cilium/clustermesh/cluster2.etcd-client.crt
"""


def test_etcd_config_parse_cilium_example():
    config = parse_etcd_config(CILIUM_EXAMPLE)
    assert config.endpoints == ("https://cluster2.mesh.example:2379",)
    assert config.trusted_ca_file.endswith("cluster2.etcd-client-ca.crt")
    assert config.key_file.endswith("cluster2.etcd-client.key")
    assert config.cert_file.endswith("cluster2.etcd-client.crt")
    assert config.uses_tls
    settings = config.client_settings()
    assert settings == {
        "endpoints": ["https://cluster2.mesh.example:2379"],
        "ca_file": config.trusted_ca_file,
        "cert_file": config.cert_file,
        "key_file": config.key_file,
    }
    # the dump is byte-identical to Cilium's layout
    assert dump_etcd_config(config) == CILIUM_EXAMPLE


def test_etcd_config_round_trip_keeps_unknown_keys(tmp_path):
    text = CILIUM_EXAMPLE + "username: ignored-by-us\n"
    config = parse_etcd_config(text)
    assert config.extra == {"username": "ignored-by-us"}
    path = tmp_path / "cluster2"
    assert write_etcd_config(str(path), config) is True
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o644
    assert load_etcd_config(str(path)) == config
    assert write_etcd_config(str(path), config) is False  # idempotent
    assert write_etcd_config(str(path), config, mode=0o600) is True
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    assert not [p for p in os.listdir(tmp_path) if p.startswith(".etcd-config.")]


def test_etcd_config_relative_paths(tmp_path):
    path = tmp_path / "c3"
    path.write_text("endpoints: [https://10.0.0.1:2379, 'https://[fd00::1]:2379']\ntrusted-ca-file: ca.crt\n")
    assert load_etcd_config(str(path)).trusted_ca_file == "ca.crt"
    resolved = load_etcd_config(str(path), resolve_relative=True)
    assert resolved.trusted_ca_file == str(tmp_path / "ca.crt")
    assert len(resolved.endpoints) == 2


def test_etcd_config_plaintext_is_flagged():
    config = EtcdClientConfig(endpoints=("http://127.0.0.1:2379",))
    assert not config.uses_tls
    assert config.client_settings()["allow_plaintext"] is True


@pytest.mark.parametrize(
    "text,match",
    [
        ("- a\n- b\n", "mapping"),
        ("endpoints: {a: 1}\n", "list"),
        ("endpoints: []\n", "at least one"),
        ("endpoints: [ftp://x:1]\n", "https://"),
        ("endpoints: ['cluster2:2379']\n", "https://"),
        ("endpoints: ['https://:2379']\n", "no host"),
        ("endpoints: ['https://h:99999']\n", "invalid port"),
        ("endpoints: ['https://h:2379/path']\n", "scheme://host"),
        ("endpoints: [https://h:2379]\nkey-file: /k\n", "together"),
        ("endpoints: [https://h:2379]\ntrusted-ca-file: ''\n", "trusted-ca-file"),
        ("endpoints: [https://h:2379\n", "YAML"),
    ],
)
def test_etcd_config_rejects(text, match):
    with pytest.raises(KVStoreConfigError, match=match):
        parse_etcd_config(text, source="cluster9")


def test_etcd_config_missing_file(tmp_path):
    with pytest.raises(KVStoreConfigError, match="cannot read"):
        load_etcd_config(str(tmp_path / "nope"))
