# -*- coding: utf-8 -*-
# Copyright: clustermesh.core contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""mesh_state: Cilium's node, ipcache and identity formats; validation of remote values."""

from __future__ import annotations

import json
import re

import pytest

from ansible_collections.clustermesh.core.plugins.module_utils.agent_kvstore import (
    IDENTITY_INDEX_PREFIX,
    identity_index_key,
)
from ansible_collections.clustermesh.core.plugins.module_utils.control_plane import remote_read_keys
from ansible_collections.clustermesh.core.plugins.module_utils.mesh_state import (
    CLUSTER_LABEL,
    KIND_IDENTITY,
    KIND_IPCACHE,
    KIND_NODE,
    KIND_SERVICE,
    Label,
    StateError,
    build_label_string,
    decode_identity,
    decode_ipcache_entry,
    decode_mask,
    decode_node,
    decode_remote_value,
    encode_ipcache_entry,
    encode_mask,
    encode_node,
    identity_label_string,
    identity_labels,
    ipcache_entry_to_dict,
    labels_as_dict,
    make_ipcache_entry,
    make_node_record,
    node_to_dict,
    parse_label_string,
)

# --------------------------------------------------------------------------------------------
# labels
# --------------------------------------------------------------------------------------------


def test_identity_label_string_is_cilium_sorted_form():
    text = identity_label_string("cluster1", {"name": "x-wing"})
    assert text == "k8s:io.cilium.k8s.policy.cluster=cluster1;k8s:name=x-wing;"
    # order of the input does not matter; both spellings of a key are accepted
    a = identity_label_string("c1", {"zeta": "1", "app.kubernetes.io/name": "web", "k8s:alpha": ""})
    b = identity_label_string("c1", {"alpha": "", "k8s:zeta": "1", "app.kubernetes.io/name": "web"})
    assert a == b == "k8s:alpha=;k8s:app.kubernetes.io/name=web;k8s:io.cilium.k8s.policy.cluster=c1;k8s:zeta=1;"
    # no labels: only the cluster label
    assert identity_label_string("c1", None) == "k8s:io.cilium.k8s.policy.cluster=c1;"
    # the cluster label may be given if it agrees
    assert identity_label_string("c1", {CLUSTER_LABEL: "c1"}) == identity_label_string("c1", {})


@pytest.mark.parametrize(
    "labels, match",
    [
        ({"name": "x wing"}, "label value 'x wing' of 'name'"),
        ({"-bad": "1"}, "label key '-bad'"),
        ({"a;b": "1"}, "label key 'a;b'"),
        ({CLUSTER_LABEL: "c2"}, "contradicts the cluster 'c1'"),
        ({"name": "a", "k8s:name": "b"}, "given twice"),
        ({"name": 3}, "must be a string"),
        (["name"], "must be a mapping"),
    ],
)
def test_identity_labels_rejects_bad_input(labels, match):
    with pytest.raises(StateError, match=match):
        identity_labels("c1", labels)


def test_identity_labels_rejects_bad_cluster():
    with pytest.raises(ValueError, match="Cluster1"):
        identity_labels("Cluster1", {})


def test_parse_label_string_round_trip_and_sources():
    text = "k8s:io.cilium.k8s.policy.cluster=c1;container:x=1;reserved:y=a=b;"  # sorted by key, not source
    labels = parse_label_string(text)
    assert labels == (
        Label("io.cilium.k8s.policy.cluster", "c1", "k8s"),
        Label("x", "1", "container"),
        Label("y", "a=b", "reserved"),
    )
    assert build_label_string(labels) == text
    assert parse_label_string(text.encode()) == labels
    assert labels_as_dict(labels) == {"io.cilium.k8s.policy.cluster": "c1", "x": "1", "y": "a=b"}


@pytest.mark.parametrize(
    "text, match",
    [
        ("", "non-empty"),
        ("k8s:a=1", "must end with ';'"),
        ("k8s:a;", "not 'source:key=value'"),
        ("a=1;", "not 'source:key=value'"),
        ("K8S:a=1;", "label source 'K8S'"),
        ("k8s:=1;", "label key ''"),
        ("k8s:a=1;k8s:a=2;", "appears twice"),
        ("k8s:b=1;k8s:a=2;", "not in canonical sorted form"),
        ("k8s:a=1;;", "not 'source:key=value'"),
        (b"\xff;", "not UTF-8"),
    ],
)
def test_parse_label_string_rejects(text, match):
    with pytest.raises(StateError, match=match):
        parse_label_string(text)


def test_parse_label_string_non_strict_accepts_unsorted():
    assert parse_label_string("k8s:b=1;k8s:a=2;", strict=False) == (Label("a", "2"), Label("b", "1"))


def test_decode_identity_checks_range_and_cluster_label():
    key = "cilium/state/identities/v1/id/65637"
    value = b"k8s:io.cilium.k8s.policy.cluster=cluster1;k8s:name=x-wing;"
    ident = decode_identity(key, value, cluster="cluster1", cluster_id=1)
    assert (ident.id, ident.cluster, ident.label_string) == (65637, "cluster1", value.decode())
    with pytest.raises(StateError, match=r"identity 65637: is outside the identity range 131072\.\.196607"):
        decode_identity(key, value, cluster_id=2)
    with pytest.raises(StateError, match="is 'cluster1', not 'cluster2'"):
        decode_identity(key, value, cluster="cluster2")
    with pytest.raises(StateError, match="is None, not 'cluster1'"):
        decode_identity(key, b"k8s:name=x-wing;", cluster="cluster1")
    with pytest.raises(StateError, match="not an identity key"):
        decode_identity("cilium/state/identities/v1/id/0065637", value)


# --------------------------------------------------------------------------------------------
# Go net types
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "prefixlen, version, text",
    [
        (24, 4, "////AA=="),
        (16, 4, "//8AAA=="),
        (32, 4, "/////w=="),
        (0, 4, "AAAAAA=="),
        (112, 6, "//////////////////8AAA=="),
    ],
)
def test_masks_as_go_marshals_them(prefixlen, version, text):
    assert encode_mask(prefixlen, version) == text
    assert decode_mask(text, "m", version) == prefixlen


def test_decode_mask_rejects():
    with pytest.raises(StateError, match="not base64"):
        decode_mask("!!", "m", 4)
    with pytest.raises(StateError, match="not a contiguous network mask"):
        decode_mask("/wD/AA==", "m", 4)
    with pytest.raises(StateError, match="8-byte mask; an IPv4 mask has 4 bytes"):
        decode_mask("/////wAAAAA=", "m", 4)
    # Go's 16-byte form of an IPv4 mask (12 bytes of ones first) is accepted
    assert decode_mask("////////////////////AA==", "m", 4) == 24


# --------------------------------------------------------------------------------------------
# node record
# --------------------------------------------------------------------------------------------


def _node(**kwargs):
    args = dict(
        name="c1-n1",
        cluster="cluster1",
        cluster_id=1,
        addresses=[("InternalIP", "198.18.1.11")],
        ipv4_alloc_cidr="10.1.0.0/24",
        ipv4_health_ip="10.1.0.2",
        boot_id="b-1",
    )
    args.update(kwargs)
    return make_node_record(**args)


def test_node_encodes_as_cilium_writes_it():
    data = json.loads(encode_node(_node()))
    assert list(data) == [
        "Name",
        "Cluster",
        "IPAddresses",
        "IPv4AllocCIDR",
        "IPv4SecondaryAllocCIDRs",
        "IPv6AllocCIDR",
        "IPv6SecondaryAllocCIDRs",
        "IPv4HealthIP",
        "IPv6HealthIP",
        "IPv4IngressIP",
        "IPv6IngressIP",
        "ClusterID",
        "Source",
        "EncryptionKey",
        "Labels",
        "Annotations",
        "NodeIdentity",
        "WireguardPubKey",
        "BootID",
    ]
    assert data["IPAddresses"] == [{"Type": "InternalIP", "IP": "198.18.1.11"}]
    assert data["IPv4AllocCIDR"] == {"IP": "10.1.0.0", "Mask": "////AA=="}
    assert data["IPv6AllocCIDR"] is None
    assert (data["IPv4HealthIP"], data["IPv6HealthIP"]) == ("10.1.0.2", "")
    assert (data["ClusterID"], data["Source"], data["BootID"]) == (1, "local", "b-1")


def test_node_round_trip_and_cilium_sample():
    node = _node(ipv6_alloc_cidr="fd00:1::/112", addresses=[("InternalIP", "198.18.1.11"), ("InternalIP", "fd00::b")])
    decoded = decode_node(
        encode_node(node), key="cilium/state/nodes/v1/cluster1/c1-n1", cluster="cluster1", cluster_id=1
    )
    assert decoded == node
    assert decoded.address("InternalIP", 6) == "fd00::b"
    # as a real Cilium agent writes it (unknown fields, older "AddressType", no BootID)
    sample = {
        "Name": "k8s-node1",
        "Cluster": "cluster2",
        "IPAddresses": [
            {"Type": "InternalIP", "IP": "10.5.1.132"},
            {"AddressType": "CiliumInternalIP", "IP": "10.6.6.71"},
        ],
        "IPv4AllocCIDR": {"IP": "10.6.6.0", "Mask": "////AA=="},
        "IPv6AllocCIDR": None,
        "IPv4HealthIP": "10.6.6.79",
        "IPv6HealthIP": "",
        "ClusterID": 2,
        "Source": "custom-resource",
        "EncryptionKey": 0,
        "SomethingNew": {"x": 1},
    }
    node2 = decode_node(json.dumps(sample), cluster="cluster2", cluster_id=2)
    assert node2.ipv4_alloc_cidr == "10.6.6.0/24"
    assert node2.address("CiliumInternalIP") == "10.6.6.71"
    assert node2.labels == {} and node2.boot_id == ""


@pytest.mark.parametrize(
    "change, kwargs, match",
    [
        (
            {"Cluster": "cluster2"},
            {"cluster": "cluster1"},
            "Cluster is 'cluster2' but it was read from cluster 'cluster1'",
        ),
        ({"ClusterID": 3}, {"cluster_id": 1}, "ClusterID is 3 but cluster 'cluster1' has ID 1"),
        ({"ClusterID": 0}, {}, "ClusterID 0 is not a valid cluster ID for a mesh"),
        ({"ClusterID": "1"}, {}, "ClusterID must be an integer"),
        ({"Name": "other"}, {"key": "cilium/state/nodes/v1/cluster1/c1-n1"}, "do not match its key"),
        ({"Name": ""}, {}, "node name must be a non-empty string"),
        ({"Cluster": "Bad_Name"}, {}, "Cluster 'Bad_Name' is invalid"),
        ({"IPAddresses": "x"}, {}, "IPAddresses must be a list"),
        ({"IPAddresses": [{"Type": "InternalIP", "IP": "1.2.3"}]}, {}, r"IPAddresses\[0\].IP: '1.2.3' is not an IP"),
        ({"IPv4AllocCIDR": {"IP": "10.1.0.1", "Mask": "////AA=="}}, {}, "has host bits set"),
        ({"IPv4AllocCIDR": {"IP": "10.1.0.0", "Mask": "/wD/AA=="}}, {}, "not a contiguous network mask"),
        ({"IPv4AllocCIDR": {"IP": "fd00::", "Mask": "//////////////////8AAA=="}}, {}, "not an IPv4 prefix"),
        ({"IPv4AllocCIDR": 5}, {}, "must be an object"),
        ({"EncryptionKey": 300}, {}, r"EncryptionKey: must be an integer in 0\.\.255"),
        ({"Labels": {"a": 1}}, {}, "Labels: must be a mapping of strings"),
    ],
)
def test_decode_node_rejects_with_reason(change, kwargs, match):
    data = node_to_dict(_node())
    data.update(change)
    with pytest.raises(StateError, match=match):
        decode_node(json.dumps(data), **kwargs)


@pytest.mark.parametrize("value, match", [(b"{", "not valid JSON"), (b"[]", "must be a JSON object")])
def test_decode_node_rejects_non_objects(value, match):
    with pytest.raises(StateError, match=match):
        decode_node(value)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"addresses": [("ExternalIP", "1.2.3.4")]}, "at least one InternalIP"),
        ({"addresses": [("Weird", "1.2.3.4")]}, r"addresses\[0\].type: 'Weird' is not one of"),
        ({"cluster_id": 0}, "cluster_id: 0 is not a valid cluster ID"),
        ({"ipv4_alloc_cidr": "10.1.0.1/24"}, "ipv4_alloc_cidr: '10.1.0.1/24' is not a network prefix"),
        ({"ipv6_alloc_cidr": "10.1.0.0/24"}, "ipv6_alloc_cidr: 10.1.0.0/24 is not an IPv6 prefix"),
        ({"name": "bad name"}, "node name 'bad name' is invalid"),
        ({"encryption_key": -1}, "encryption_key"),
    ],
)
def test_make_node_record_rejects(kwargs, match):
    with pytest.raises(StateError, match=match):
        _node(**kwargs)


# --------------------------------------------------------------------------------------------
# ipcache entries
# --------------------------------------------------------------------------------------------


def test_ipcache_entry_encodes_as_cilium_writes_it():
    entry = make_ipcache_entry("10.1.0.5", 65637, "198.18.1.11", k8s_namespace="default", k8s_pod_name="x-wing")
    assert json.loads(encode_ipcache_entry(entry)) == {
        "IP": "10.1.0.5",
        "Mask": None,
        "HostIP": "198.18.1.11",
        "ID": 65637,
        "Key": 0,
        "Metadata": "",
        "K8sNamespace": "default",
        "K8sPodName": "x-wing",
    }
    # omitempty: no namespace / pod name keys when empty
    plain = ipcache_entry_to_dict(make_ipcache_entry("10.1.0.6", 65638, "198.18.1.11"))
    assert "K8sNamespace" not in plain and "K8sPodName" not in plain
    # a prefix entry carries the mask; a /32 is the host entry
    prefix = ipcache_entry_to_dict(make_ipcache_entry("10.1.0.0/24", 65639, ""))
    assert (prefix["IP"], prefix["Mask"]) == ("10.1.0.0", "////AA==")
    assert make_ipcache_entry("10.1.0.7/32", 65640, "").ip == "10.1.0.7"


def test_ipcache_entry_round_trip_and_key_check():
    entry = make_ipcache_entry("10.1.0.5", 65637, "198.18.1.11", key=3, k8s_namespace="default", k8s_pod_name="x")
    assert (
        decode_ipcache_entry(encode_ipcache_entry(entry), key="cilium/state/ip/v1/default/10.1.0.5", cluster_id=1)
        == entry
    )
    prefix = make_ipcache_entry("fd00:1::/112", 65637, "fd00::b")
    assert decode_ipcache_entry(encode_ipcache_entry(prefix), key="cilium/state/ip/v1/default/fd00:1::/112") == prefix
    with pytest.raises(StateError, match="does not match its key"):
        decode_ipcache_entry(encode_ipcache_entry(entry), key="cilium/state/ip/v1/default/10.1.0.6")


def test_remote_ipcache_identity_outside_cluster_range_is_rejected():
    value = encode_ipcache_entry(make_ipcache_entry("10.2.0.5", 65637, "198.18.2.11"))  # cluster 1's range
    with pytest.raises(StateError, match=r"identity 65637 is outside the range 131072\.\.196607 of cluster ID 2"):
        decode_ipcache_entry(value, cluster_id=2)
    # with 511 clusters the split is 15 bits
    value = encode_ipcache_entry(make_ipcache_entry("10.2.0.5", 3 << 15, "198.18.2.11"))
    assert decode_ipcache_entry(value, cluster_id=3, max_connected=511).id == 98304
    with pytest.raises(StateError, match="outside"):
        decode_ipcache_entry(value, cluster_id=3)


@pytest.mark.parametrize(
    "change, match",
    [
        ({"IP": "nope"}, "IP: 'nope' is not an IP address"),
        ({"IP": None}, "IP: is missing"),
        ({"ID": 0}, "ID must be a positive integer"),
        ({"ID": "65637"}, "ID must be a positive integer"),
        ({"ID": True}, "ID must be a positive integer"),
        ({"HostIP": "x"}, "HostIP: 'x' is not an IP"),
        ({"Key": 256}, r"Key: must be an integer in 0\.\.255"),
        ({"Mask": "////AA=="}, "has host bits set"),
        ({"Mask": 5}, "must be a base64 IP mask"),
        ({"K8sPodName": 1}, "K8sPodName: must be a string"),
    ],
)
def test_decode_ipcache_entry_rejects_with_reason(change, match):
    data = ipcache_entry_to_dict(make_ipcache_entry("10.1.0.5", 65637, "198.18.1.11"))
    data.update(change)
    with pytest.raises(StateError, match=match):
        decode_ipcache_entry(json.dumps(data))


@pytest.mark.parametrize(
    "args, match",
    [
        (("10.1.0.x", 65637, ""), "ip: '10.1.0.x' is not an IP"),
        (("10.1.0.5", 0, ""), "identity: must be a positive integer"),
        (("10.1.0.5", 65637, "host"), "host_ip: 'host' is not an IP"),
    ],
)
def test_make_ipcache_entry_rejects(args, match):
    with pytest.raises(StateError, match=match):
        make_ipcache_entry(*args)


# --------------------------------------------------------------------------------------------
# values read from a remote cluster
# --------------------------------------------------------------------------------------------

SERVICE_JSON = {
    "cluster": "cluster2",
    "namespace": "default",
    "name": "rebel-base",
    "frontends": {"172.30.2.10": {"http": {"Protocol": "TCP", "Port": 80}}},
    "backends": {"10.2.0.21": {"http": {"Protocol": "TCP", "Port": 80}}},
    "labels": {},
    "selector": {"name": "rebel-base"},
    "includeExternal": True,
    "shared": True,
    "clusterID": 2,
}


def test_decode_remote_value_dispatches_and_accepts_good_values():
    node = make_node_record("c2-n1", "cluster2", 2, [("InternalIP", "198.18.2.11")])
    got = decode_remote_value(
        "cilium/state/nodes/v1/cluster2/c2-n1", encode_node(node), cluster="cluster2", cluster_id=2
    )
    assert (got.kind, got.value) == (KIND_NODE, node)
    entry = make_ipcache_entry("10.2.0.5", (2 << 16) + 5, "198.18.2.11")
    got = decode_remote_value(
        "cilium/state/ip/v1/default/10.2.0.5", encode_ipcache_entry(entry), cluster="cluster2", cluster_id=2
    )
    assert (got.kind, got.value) == (KIND_IPCACHE, entry)
    labels = identity_label_string("cluster2", {"name": "x-wing"})
    got = decode_remote_value(f"cilium/state/identities/v1/id/{2 << 16}", labels, cluster="cluster2", cluster_id=2)
    assert (got.kind, got.value.id) == (KIND_IDENTITY, 2 << 16)
    key = "cilium/state/services/v1/cluster2/default/rebel-base"
    got = decode_remote_value(key, json.dumps(SERVICE_JSON), cluster="cluster2", cluster_id=2)
    assert (got.kind, got.value.name, got.value.cluster_id) == (KIND_SERVICE, "rebel-base", 2)


@pytest.mark.parametrize(
    "key, value, match",
    [
        # a node of another cluster published in cluster2's kvstore
        (
            "cilium/state/nodes/v1/cluster1/c1-n1",
            encode_node(make_node_record("c1-n1", "cluster1", 1, [("InternalIP", "198.18.1.11")])),
            "a node of cluster 'cluster1' in cluster 'cluster2'",
        ),
        # a node record claiming another cluster ID
        (
            "cilium/state/nodes/v1/cluster2/c2-n1",
            encode_node(make_node_record("c2-n1", "cluster2", 3, [("InternalIP", "198.18.2.11")])),
            "ClusterID is 3 but cluster 'cluster2' has ID 2",
        ),
        # cluster2 claims an endpoint with cluster1's identity
        (
            "cilium/state/ip/v1/default/10.2.0.5",
            encode_ipcache_entry(make_ipcache_entry("10.2.0.5", 65637, "198.18.2.11")),
            "identity 65637 is outside the range 131072..196607 of cluster ID 2",
        ),
        (
            f"cilium/state/identities/v1/id/{2 << 16}",
            "k8s:io.cilium.k8s.policy.cluster=cluster1;k8s:name=x;",
            "is 'cluster1', not 'cluster2'",
        ),
        ("cilium/state/identities/v1/id/5", "k8s:io.cilium.k8s.policy.cluster=cluster2;", "outside the identity range"),
        (
            "cilium/state/services/v1/cluster1/default/rebel-base",
            json.dumps(SERVICE_JSON),
            "a service of cluster 'cluster1' in cluster 'cluster2'",
        ),
        (
            "cilium/state/services/v1/cluster2/default/rebel-base",
            json.dumps({**SERVICE_JSON, "clusterID": 7}),
            "cilium/state/services/v1/cluster2/default/rebel-base': ",
        ),
        ("cilium/state/ip/v1/default/10.2.0.5", b"{", "not valid JSON"),
        ("cilium/state/nodes/v1/cluster2/a/b", b"{}", "not a node key"),
        ("cilium/state/other/v1/x", b"{}", "is not a node, ipcache, identity or service key"),
    ],
)
def test_decode_remote_value_rejects_with_key_and_reason(key, value, match):
    with pytest.raises(StateError, match=re.escape(match)) as info:
        decode_remote_value(key, value, cluster="cluster2", cluster_id=2)
    assert repr(key) in str(info.value) or key in str(info.value)


def test_identity_index_is_ours_and_not_remotely_readable():
    """The reverse index lives under cilium/ (the admin user may write it) but outside every key
    a remote cluster may read, and does not depend on anything but the label string."""
    key = identity_index_key("k8s:io.cilium.k8s.policy.cluster=c1;k8s:name=x;")
    assert key == identity_index_key("k8s:io.cilium.k8s.policy.cluster=c1;k8s:name=x;")
    assert key != identity_index_key("k8s:io.cilium.k8s.policy.cluster=c2;k8s:name=x;")
    assert key.startswith(IDENTITY_INDEX_PREFIX) and key.startswith("cilium/clustermesh-core/")
    for allowed, is_prefix in remote_read_keys("c1"):
        assert not (key.startswith(allowed) if is_prefix else key == allowed)
