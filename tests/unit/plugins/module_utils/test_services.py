# -*- coding: utf-8 -*-
# Copyright: clustermesh.core contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""services.py: annotations, selectors, declarations, Cilium's ClusterService codec and the merge."""

from __future__ import annotations

import json

import pytest

from ansible_collections.clustermesh.core.plugins.module_utils import kvstore_layout as L
from ansible_collections.clustermesh.core.plugins.module_utils import services as S
from ansible_collections.clustermesh.core.plugins.module_utils.control_plane import remote_read_keys
from ansible_collections.clustermesh.core.plugins.module_utils.etcd_auth import desired_auth

# The reference ClusterService, as a Cilium agent writes it (../shared/reference/cilium-kvstore.md).
CILIUM_JSON = (
    '{"cluster": "cluster1", "namespace": "default", "name": "rebel-base",'
    ' "frontends": {"172.30.1.10": {"http": {"Protocol": "TCP", "Port": 80}}},'
    ' "backends":  {"10.1.0.21": {"http": {"Protocol": "TCP", "Port": 80}}},'
    ' "labels": {}, "selector": {"name": "rebel-base"},'
    ' "includeExternal": true, "shared": true, "clusterID": 1}'
)


def decl(annotations=None, ports=None, **kwargs):
    args = dict(
        namespace="default",
        name="rebel-base",
        cluster_ip="172.30.1.10",
        ports=ports if ports is not None else [{"name": "http", "port": 80, "protocol": "TCP"}],
        selector={"name": "rebel-base"},
        annotations=annotations if annotations is not None else {S.ANNOTATION_GLOBAL: "true"},
    )
    args.update(kwargs)
    return S.make_declaration(**args)


# --- annotations ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "annotations, expected",
    [
        ({}, S.ServiceOptions(False, False, "none")),
        ({"service.cilium.io/global": "true"}, S.ServiceOptions(True, True, "none")),
        ({"io.cilium/global-service": "TRUE"}, S.ServiceOptions(True, True, "none")),
        ({"service.cilium.io/global": "true", "service.cilium.io/shared": "false"}, S.ServiceOptions(True, False)),
        ({"io.cilium/global-service": "true", "io.cilium/shared-service": "false"}, S.ServiceOptions(True, False)),
        (
            {"service.cilium.io/global": "true", "service.cilium.io/affinity": "Local"},
            S.ServiceOptions(True, True, "local"),
        ),
        (
            {"service.cilium.io/global": "true", "io.cilium/service-affinity": "remote"},
            S.ServiceOptions(True, True, "remote"),
        ),
        ({"service.cilium.io/global": "false"}, S.ServiceOptions(False, False, "none")),
        (
            {"service.cilium.io/global": "true", "io.cilium/global-service": "true"},
            S.ServiceOptions(True, True, "none"),
        ),
        ({"other/annotation": "x"}, S.ServiceOptions(False, False, "none")),
    ],
)
def test_annotations_names_aliases_and_defaults(annotations, expected):
    assert S.parse_annotations(annotations) == expected


@pytest.mark.parametrize(
    "annotations, message",
    [
        ({"service.cilium.io/global": "yes"}, "'service.cilium.io/global'"),
        ({"io.cilium/shared-service": "1"}, "is not a boolean"),
        ({"service.cilium.io/affinity": "nearest"}, "is not an affinity; use one of local, remote, none"),
        ({"service.cilium.io/global": True}, "must be a string"),
        ({"service.cilium.io/global": "true", "io.cilium/global-service": "false"}, "disagree; set only one"),
    ],
)
def test_annotations_rejected(annotations, message):
    with pytest.raises(S.ServiceError, match=message.replace("(", r"\(")):
        S.parse_annotations(annotations)


def test_options_annotations_round_trip():
    for options in (S.ServiceOptions(True, False, "local"), S.ServiceOptions(True, True, "remote"), S.ServiceOptions()):
        assert S.parse_annotations(S.options_annotations(options)) == options
    assert S.ServiceOptions(True, True).exported and not S.ServiceOptions(True, False).exported
    assert not S.ServiceOptions(False, True).exported


# --- selectors ----------------------------------------------------------------------------------------


def test_selector_matching():
    assert S.selector_matches({"name": "rebel-base"}, {"name": "rebel-base", "tier": "x"})
    assert not S.selector_matches({"name": "rebel-base", "tier": "y"}, {"name": "rebel-base", "tier": "x"})
    assert not S.selector_matches({"name": "rebel-base"}, {})
    assert not S.selector_matches({}, {"name": "rebel-base"})  # no selector selects nothing


@pytest.mark.parametrize(
    "labels, message",
    [
        ("name=x", "must be a mapping"),
        ({"": "x"}, "label key '' must be a non-empty string"),
        ({"-bad": "x"}, "label key '-bad' is invalid"),
        ({"Bad_Prefix/x": "x"}, "invalid prefix"),
        ({"name": "a b"}, r"selector\['name'\]: label value 'a b' is invalid"),
        ({"name": 5}, "must be a string"),
    ],
)
def test_selector_validation(labels, message):
    with pytest.raises(S.ServiceError, match=message):
        S.validate_labels(labels, "selector")
    assert S.validate_labels({"app.kubernetes.io/name": "x", "empty": ""}, "selector")


def test_selected_backends_use_selector_and_canonical_ips():
    d = decl()
    eps = [
        S.Endpoint("10.1.0.21", {"name": "rebel-base"}),
        S.Endpoint("10.1.0.3", {"name": "rebel-base", "x": "y"}),
        S.Endpoint("10.1.0.4", {"name": "x-wing"}),
        S.Endpoint("fd00::0001", {"name": "rebel-base"}),
    ]
    assert S.selected_backends(d, eps) == ["10.1.0.3", "10.1.0.21", "fd00::1"]


# --- declarations ------------------------------------------------------------------------------------


def test_declaration_defaults_and_round_trip():
    d = decl(
        ports=[
            {"name": "http", "port": 80, "protocol": "TCP", "target_port": 8080},
            {"name": "dns", "port": 53, "protocol": "UDP"},
        ]
    )
    assert d.options == S.ServiceOptions(True, True, "none")
    assert d.health_check == S.HealthCheck()
    assert d.health_check_port == 8080
    data = json.loads(S.encode_declaration(d))
    assert data == {
        "version": 1,
        "namespace": "default",
        "name": "rebel-base",
        "clusterIP": "172.30.1.10",
        "ports": [
            {"name": "http", "port": 80, "protocol": "TCP", "targetPort": 8080},
            {"name": "dns", "port": 53, "protocol": "UDP", "targetPort": 53},
        ],
        "selector": {"name": "rebel-base"},
        "annotations": {
            "service.cilium.io/global": "true",
            "service.cilium.io/shared": "true",
            "service.cilium.io/affinity": "none",
        },
        "healthCheck": {
            "type": "tcp",
            "port": None,
            "interval": 2.0,
            "timeout": 1.0,
            "healthyThreshold": 1,
            "unhealthyThreshold": 1,
        },
    }
    again = S.decode_declaration(S.encode_declaration(d), namespace="default", name="rebel-base")
    assert again == d
    assert S.encode_declaration(again) == S.encode_declaration(d)


def test_declaration_http_health_check_round_trip():
    hc = {
        "type": "http",
        "port": 8080,
        "path": "/healthz",
        "interval": 5,
        "healthy_threshold": 2,
        "unhealthy_threshold": 3,
    }
    d = decl(health_check=hc)
    assert d.health_check == S.HealthCheck("http", 8080, "/healthz", 5.0, 1.0, 2, 3)
    assert json.loads(S.encode_declaration(d))["healthCheck"]["path"] == "/healthz"
    assert S.decode_declaration(S.encode_declaration(d)) == d
    assert decl(health_check={"interval": 0.5}).health_check.timeout == 0.5


def test_single_port_may_be_unnamed_and_defaults_to_tcp():
    d = decl(ports=[{"port": 80}])
    assert d.ports == (S.ServicePort("", 80, "TCP", 80),)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"namespace": ""}, "namespace must be a non-empty string"),
        ({"namespace": "Default"}, "namespace 'Default' is not a DNS label"),
        ({"name": "rebel_base"}, "service name 'rebel_base' is not a DNS label"),
        ({"cluster_ip": "172.30.1"}, "cluster_ip: '172.30.1' is not an IP address"),
        ({"cluster_ip": "172.30.1.0/24"}, "cluster_ip: '172.30.1.0/24' is not an IP address"),
        ({"cluster_ip": "127.0.0.1"}, "cluster_ip: '127.0.0.1' cannot be a ClusterIP"),
        ({"cluster_ip": None}, "cluster_ip: None is not an IP address"),
        ({"ports": []}, "ports: must be a non-empty list"),
        ({"ports": [{"name": "http", "port": 0}]}, r"ports\[0\].port: 0 is outside 1..65535"),
        ({"ports": [{"name": "http", "port": 70000}]}, r"ports\[0\].port: 70000 is outside"),
        ({"ports": [{"name": "http", "port": "80"}]}, r"ports\[0\].port: '80' is not a port number"),
        ({"ports": [{"name": "http", "port": True}]}, r"ports\[0\].port: True is not a port number"),
        (
            {"ports": [{"name": "http", "port": 80, "protocol": "SCTP"}]},
            r"ports\[0\].protocol: 'SCTP' is not supported",
        ),
        ({"ports": [{"name": "http", "port": 80, "protocol": "tcp"}]}, r"ports\[0\].protocol: 'tcp' is not supported"),
        ({"ports": [{"name": "http", "port": 80, "target_port": 0}]}, r"ports\[0\].target_port: 0 is outside"),
        ({"ports": [{"name": "Http", "port": 80}]}, r"ports\[0\].name: port name 'Http' is not a DNS label"),
        ({"ports": [{"name": "a", "port": 80}, {"port": 81}]}, r"ports\[1\].name: is required when"),
        ({"ports": [{"name": "a", "port": 80}, {"name": "a", "port": 81}]}, r"ports\[1\].name: 'a' is used by another"),
        (
            {"ports": [{"name": "a", "port": 80}, {"name": "b", "port": 80}]},
            r"ports\[1\].port: 80/TCP is declared twice",
        ),
        ({"ports": [{"name": "a", "port": 80, "bogus": 1}]}, r"ports\[0\]: unknown field\(s\) bogus"),
        ({"ports": ["http"]}, r"ports\[0\]: must be a mapping"),
        ({"selector": {"name": "a b"}}, "selector"),
        ({"annotations": {"service.cilium.io/affinity": "near"}}, "affinity"),
        ({"health_check": {"type": "grpc"}}, "health_check.type: 'grpc' is not a health check type"),
        ({"health_check": {"port": 0}}, "health_check.port: 0 is outside"),
        ({"health_check": {"path": "/x"}}, "health_check.path: is only used by type http"),
        ({"health_check": {"type": "http", "path": "healthz"}}, "health_check.path: 'healthz' is not an HTTP path"),
        ({"health_check": {"interval": 0}}, r"health_check.interval: 0 is outside 0.1..3600"),
        ({"health_check": {"interval": "2s"}}, "health_check.interval: '2s' is not a number of seconds"),
        ({"health_check": {"interval": 1, "timeout": 2}}, "health_check.timeout: 2.0 is longer than the interval"),
        ({"health_check": {"unhealthy_threshold": 0}}, "health_check.unhealthy_threshold: 0 is not a count"),
        ({"health_check": {"healthy_threshold": 1.5}}, "health_check.healthy_threshold: 1.5 is not a count"),
        ({"health_check": {"retries": 3}}, r"health_check: unknown field\(s\) retries"),
    ],
)
def test_declaration_rejections_name_the_field(kwargs, message):
    with pytest.raises(S.ServiceError, match=message):
        decl(**kwargs)


@pytest.mark.parametrize(
    "mutate, message",
    [
        (lambda d: "not json", "not valid JSON"),
        (lambda d: "[]", "must be a JSON object"),
        (lambda d: json.dumps({**d, "version": 2}), "version: 2 is not a known declaration version"),
        (lambda d: json.dumps({**d, "clusterIP": "x"}), "cluster_ip: 'x' is not an IP address"),
        (lambda d: json.dumps({**d, "name": "other"}), "name: 'other' does not match the key's name 'rebel-base'"),
        (lambda d: json.dumps({**d, "namespace": "kube-system"}), "namespace: 'kube-system' does not match"),
    ],
)
def test_declaration_decode_rejections(mutate, message):
    stored = json.loads(S.encode_declaration(decl()))
    with pytest.raises(S.ServiceError, match=message):
        S.decode_declaration(mutate(stored), namespace="default", name="rebel-base")


# --- keys -----------------------------------------------------------------------------------------


def test_declaration_key_is_writable_by_the_admin_and_invisible_to_remote_clusters():
    key = L.service_declaration_key("default", "rebel-base")
    assert key == "cilium/clustermesh-core/services/v1/default/rebel-base"
    assert L.parse_service_declaration_key(key) == L.ServiceDeclarationKey("default", "rebel-base")
    with pytest.raises(L.KeyLayoutError):
        L.parse_service_declaration_key("cilium/clustermesh-core/services/v1/default")
    with pytest.raises(L.KeyLayoutError):
        L.service_declaration_key("default", "Bad")
    plan = desired_auth("cluster1", ["cluster2"])
    admin = plan.roles["admin-cluster1"]
    assert any(g.permission == "readwrite" and g.prefix and key.startswith(g.key) for g in admin)
    for readable, is_prefix in remote_read_keys("cluster1"):
        assert not (key.startswith(readable) if is_prefix else key == readable)
    # ... while the ClusterService is where remote clusters read
    svc_key = L.service_key("cluster1", "default", "rebel-base")
    assert any(is_prefix and svc_key.startswith(k) for k, is_prefix in remote_read_keys("cluster1"))


# --- ClusterService codec -----------------------------------------------------------------------------


def test_cilium_cluster_service_decodes_and_encodes_back_identically():
    svc = S.decode_cluster_service(
        CILIUM_JSON, cluster="cluster1", cluster_id=1, namespace="default", name="rebel-base"
    )
    assert svc == S.ClusterService(
        cluster="cluster1",
        namespace="default",
        name="rebel-base",
        frontends={"172.30.1.10": {"http": S.L4Addr("TCP", 80)}},
        backends={"10.1.0.21": {"http": S.L4Addr("TCP", 80)}},
        labels={},
        selector={"name": "rebel-base"},
        include_external=True,
        shared=True,
        cluster_id=1,
    )
    assert json.loads(S.encode_cluster_service(svc)) == json.loads(CILIUM_JSON)
    # Go's field order and compact form
    assert S.encode_cluster_service(svc).decode() == json.dumps(json.loads(CILIUM_JSON), separators=(",", ":"))


def test_cluster_service_tolerates_go_nulls_and_newer_fields():
    data = json.loads(CILIUM_JSON)
    data.update(backends=None, labels=None, selector=None, hostnames={"10.1.0.21": "pod-a"})
    data["frontends"]["172.30.1.10"] = None
    svc = S.decode_cluster_service(json.dumps(data))
    assert svc.backends == {} and svc.labels == {} and svc.selector == {}
    assert svc.frontends == {"172.30.1.10": {}}
    del data["shared"], data["includeExternal"]
    svc = S.decode_cluster_service(json.dumps(data))
    assert not svc.shared and not svc.include_external  # Go zero values


def _bad(**changes):
    data = json.loads(CILIUM_JSON)
    for key, value in changes.items():
        if value is _DELETE:
            del data[key]
        else:
            data[key] = value
    return json.dumps(data)


_DELETE = object()


@pytest.mark.parametrize(
    "value, message",
    [
        ("{", "not valid JSON"),
        ("[1]", "must be a JSON object"),
        (_bad(cluster=""), "cluster: must be a non-empty string"),
        (_bad(namespace=""), "namespace: must be a non-empty string"),
        (_bad(name=_DELETE), "name: must be a non-empty string, got None"),
        (_bad(cluster="Cluster1"), "cluster name 'Cluster1' is invalid"),
        (_bad(cluster="cluster2"), "cluster: 'cluster2' does not match the cluster it was read from"),
        (_bad(name="x-wing"), "name: 'x-wing' does not match its key"),
        (_bad(clusterID=0), "clusterID: 0 is not a valid cluster ID for a mesh"),
        (_bad(clusterID=256), "clusterID: 256 is not a valid cluster ID"),
        (_bad(clusterID=_DELETE), "clusterID: 0 is not a valid cluster ID"),
        (_bad(clusterID="1"), "clusterID: '1' is not a valid cluster ID"),
        (_bad(clusterID=2), "clusterID: 2 does not match the ID 1 of cluster 'cluster1'"),
        (_bad(frontends={"172.30.1": {}}), "frontends: '172.30.1' is not an IP address"),
        (_bad(backends={"10.1.0.0/24": {}}), "backends: '10.1.0.0/24' is not an IP address"),
        (_bad(backends={"10.1.0.21": {}, "10.1.0.021": {}}), "is not an IP address|repeats"),
        (_bad(backends={"fd00::1": {}, "FD00::1": {}}), "'FD00::1' repeats the address 'fd00::1'"),
        (_bad(backends=[]), "backends: must be an object of IP -> ports"),
        (_bad(backends={"10.1.0.21": []}), r"backends\['10.1.0.21'\]: must be an object"),
        (_bad(backends={"10.1.0.21": {"http": None}}), "must be an object {Protocol, Port}"),
        (_bad(backends={"10.1.0.21": {"http": {"Protocol": "tcp", "Port": 80}}}), "Protocol: 'tcp' is not a protocol"),
        (_bad(backends={"10.1.0.21": {"http": {"Protocol": "ANY", "Port": 80}}}), "'ANY' is not a protocol"),
        (_bad(backends={"10.1.0.21": {"http": {"Protocol": "TCP", "Port": 0}}}), "Port: 0 is outside 1..65535"),
        (_bad(backends={"10.1.0.21": {"http": {"Protocol": "TCP", "Port": 65536}}}), "Port: 65536 is outside"),
        (_bad(backends={"10.1.0.21": {"http": {"Protocol": "TCP", "Port": 80.0}}}), "Port: 80.0 is not a port number"),
        (_bad(backends={"10.1.0.21": {"http": {"Protocol": "TCP"}}}), "Port: None is not a port number"),
        (_bad(shared="true"), "shared: must be true or false"),
        (_bad(includeExternal=1), "includeExternal: must be true or false"),
        (_bad(labels=[]), "labels: must be an object of strings"),
        (_bad(selector={"name": 1}), "selector: must be an object of strings"),
    ],
)
def test_cluster_service_rejections_give_the_reason(value, message):
    with pytest.raises(S.ServiceError, match=message.replace("{", r"\{").replace("}", r"\}")):
        S.decode_cluster_service(value, cluster="cluster1", cluster_id=1, namespace="default", name="rebel-base")


def test_cluster_id_range_follows_max_connected_clusters():
    value = _bad(clusterID=300)
    with pytest.raises(S.ServiceError, match="set max_connected_clusters to 511"):
        S.decode_cluster_service(value)
    assert S.decode_cluster_service(value, max_connected=511).cluster_id == 300


def test_build_and_export_cluster_service():
    d = decl(ports=[{"name": "http", "port": 80, "target_port": 8080}, {"name": "dns", "port": 53, "protocol": "UDP"}])
    svc = S.build_cluster_service(d, "cluster1", 1, ["10.1.0.21", "10.1.0.3"])
    data = json.loads(S.encode_cluster_service(svc))
    assert data == {
        "cluster": "cluster1",
        "namespace": "default",
        "name": "rebel-base",
        "frontends": {"172.30.1.10": {"dns": {"Protocol": "UDP", "Port": 53}, "http": {"Protocol": "TCP", "Port": 80}}},
        "backends": {
            "10.1.0.21": {"dns": {"Protocol": "UDP", "Port": 53}, "http": {"Protocol": "TCP", "Port": 8080}},
            "10.1.0.3": {"dns": {"Protocol": "UDP", "Port": 53}, "http": {"Protocol": "TCP", "Port": 8080}},
        },
        "labels": {},
        "selector": {"name": "rebel-base"},
        "includeExternal": True,
        "shared": True,
        "clusterID": 1,
    }
    # what we publish, a Cilium agent (and our own decoder) accepts
    assert S.decode_cluster_service(S.encode_cluster_service(svc), cluster="cluster1", cluster_id=1) == svc
    assert S.exported_cluster_service(d, "cluster1", 1, []) is not None
    not_shared = decl({S.ANNOTATION_GLOBAL: "true", S.ANNOTATION_SHARED: "false"})
    assert S.exported_cluster_service(not_shared, "cluster1", 1, ["10.1.0.21"]) is None
    assert S.exported_cluster_service(decl({}), "cluster1", 1, ["10.1.0.21"]) is None


# --- the merge ----------------------------------------------------------------------------------------


def cs(cluster, cid, ips, *, shared=True, port=80, name="http", protocol="TCP", svc_name="rebel-base"):
    return S.ClusterService(
        cluster=cluster,
        namespace="default",
        name=svc_name,
        frontends={f"172.30.{cid}.10": {name: S.L4Addr(protocol, port)}},
        backends={ip: {name: S.L4Addr(protocol, port)} for ip in ips},
        include_external=True,
        shared=shared,
        cluster_id=cid,
    )


C1 = ["10.1.0.21", "10.1.0.22"]
C2 = ["10.2.0.21", "10.2.0.22"]


def backends_of(merged, index=0):
    return [(b.cluster, b.ip, b.port) for b in merged.frontends[index].backends]


def merge(annotations, services, health=None, **kwargs):
    return S.merge_service(decl(annotations, **kwargs), "cluster1", services, health)


GLOBAL = {S.ANNOTATION_GLOBAL: "true"}


def test_merge_none_affinity_uses_all_healthy_backends_of_all_clusters():
    merged = merge(GLOBAL, [cs("cluster1", 1, C1), cs("cluster2", 2, C2)])
    assert backends_of(merged) == [("cluster1", ip, 80) for ip in C1] + [("cluster2", ip, 80) for ip in C2]
    assert merged.frontends[0].ip == "172.30.1.10" and merged.frontends[0].port == 80
    assert merged.clusters == ("cluster1", "cluster2") and merged.using == "all"


def test_merge_skips_unhealthy_backends():
    health = {("cluster1", "10.1.0.21"): False, ("cluster2", "10.2.0.22"): False, ("cluster2", "10.2.0.21"): True}
    merged = merge(GLOBAL, [cs("cluster1", 1, C1), cs("cluster2", 2, C2)], health)
    assert backends_of(merged) == [("cluster1", "10.1.0.22", 80), ("cluster2", "10.2.0.21", 80)]


def test_merge_local_affinity_prefers_healthy_local_and_fails_over_to_remote():
    ann = {**GLOBAL, S.ANNOTATION_AFFINITY: "local"}
    services = [cs("cluster1", 1, C1), cs("cluster2", 2, C2)]
    merged = merge(ann, services)
    assert backends_of(merged) == [("cluster1", ip, 80) for ip in C1] and merged.using == "local"
    one_down = {("cluster1", "10.1.0.21"): False}
    assert backends_of(merge(ann, services, one_down)) == [("cluster1", "10.1.0.22", 80)]
    all_down = {("cluster1", ip): False for ip in C1}
    merged = merge(ann, services, all_down)
    assert backends_of(merged) == [("cluster2", ip, 80) for ip in C2] and merged.using == "remote"
    # no local backend at all (a consumer-only cluster): remote ones
    assert backends_of(merge(ann, [cs("cluster1", 1, []), cs("cluster2", 2, C2)])) == [
        ("cluster2", ip, 80) for ip in C2
    ]


def test_merge_remote_affinity_is_the_mirror_image():
    ann = {**GLOBAL, S.ANNOTATION_AFFINITY_ALIAS: "remote"}
    services = [cs("cluster1", 1, C1), cs("cluster2", 2, C2)]
    assert backends_of(merge(ann, services)) == [("cluster2", ip, 80) for ip in C2]
    down = {("cluster2", ip): False for ip in C2}
    merged = merge(ann, services, down)
    assert backends_of(merged) == [("cluster1", ip, 80) for ip in C1] and merged.using == "local"


def test_merge_remote_not_shared_is_not_used_but_local_not_shared_still_consumes():
    # cluster2 says shared=false: cluster1 never uses cluster2's backends
    merged = merge(GLOBAL, [cs("cluster1", 1, C1), cs("cluster2", 2, C2, shared=False)])
    assert backends_of(merged) == [("cluster1", ip, 80) for ip in C1]
    # even when cluster1 has no healthy backend left (local affinity would fail over)
    ann = {**GLOBAL, S.ANNOTATION_AFFINITY: "local"}
    down = {("cluster1", ip): False for ip in C1}
    merged = merge(ann, [cs("cluster1", 1, C1), cs("cluster2", 2, C2, shared=False)], down)
    assert backends_of(merged) == [] and merged.using == "none"
    # cluster1 itself shared=false: it still consumes cluster2's backends (and its own)
    not_shared = {**GLOBAL, S.ANNOTATION_SHARED: "false"}
    merged = merge(not_shared, [cs("cluster1", 1, C1, shared=False), cs("cluster2", 2, C2)])
    assert [b[0] for b in backends_of(merged)] == ["cluster1", "cluster1", "cluster2", "cluster2"]


def test_merge_consumes_only_when_this_cluster_declares_the_service_global():
    merged = merge({}, [cs("cluster1", 1, C1), cs("cluster2", 2, C2)])
    assert backends_of(merged) == [("cluster1", ip, 80) for ip in C1]
    # not global, no healthy local backend: nothing (no failover to other clusters)
    merged = merge({}, [cs("cluster1", 1, C1), cs("cluster2", 2, C2)], {("cluster1", ip): False for ip in C1})
    assert backends_of(merged) == [] and merged.using == "none"


def test_merge_matches_ports_by_name_and_protocol_and_ignores_other_services():
    ports = [{"name": "http", "port": 80}, {"name": "dns", "port": 53, "protocol": "UDP"}]
    services = [
        cs("cluster1", 1, C1),
        cs("cluster2", 2, ["10.2.0.53"], name="dns", protocol="UDP", port=5353),
        cs("cluster3", 3, ["10.3.0.1"], name="dns", protocol="TCP", port=53),  # wrong protocol
        cs("cluster4", 4, ["10.4.0.1"], svc_name="other"),  # another service
    ]
    merged = merge(GLOBAL, services, ports=ports)
    assert [(f.port_name, f.protocol) for f in merged.frontends] == [("http", "TCP"), ("dns", "UDP")]
    assert backends_of(merged, 0) == [("cluster1", ip, 80) for ip in C1]
    assert backends_of(merged, 1) == [("cluster2", "10.2.0.53", 5353)]
    assert merged.clusters == ("cluster1", "cluster2")


def test_merge_refuses_two_services_of_one_cluster():
    with pytest.raises(ValueError, match="two ClusterServices of cluster 'cluster2'"):
        merge(GLOBAL, [cs("cluster2", 2, C2), cs("cluster2", 2, C1)])


def test_merge_of_a_hand_written_cilium_value():
    remote = S.decode_cluster_service(
        CILIUM_JSON.replace("cluster1", "cluster2").replace('"clusterID": 1', '"clusterID": 2')
    )
    merged = S.merge_service(decl(GLOBAL, cluster_ip="172.30.2.10"), "cluster3", [remote])
    assert backends_of(merged) == [("cluster2", "10.1.0.21", 80)]


def test_merge_all_groups_by_service_and_ignores_undeclared_ones():
    other = decl(GLOBAL, name="x-wing", cluster_ip="172.30.1.11")
    services = [
        cs("cluster1", 1, C1),
        cs("cluster2", 2, C2),
        cs("cluster2", 2, ["10.2.0.99"], svc_name="x-wing"),
        cs("cluster2", 2, ["10.2.0.77"], svc_name="not-declared-here"),
    ]
    merged = S.merge_all([decl(GLOBAL), other], "cluster1", services, {("cluster2", "10.2.0.21"): False})
    assert sorted(merged) == [("default", "rebel-base"), ("default", "x-wing")]
    assert backends_of(merged["default", "rebel-base"]) == [("cluster1", ip, 80) for ip in C1] + [
        ("cluster2", "10.2.0.22", 80)
    ]
    assert backends_of(merged["default", "x-wing"]) == [("cluster2", "10.2.0.99", 80)]
    with pytest.raises(ValueError, match="two declarations of default/x-wing"):
        S.merge_all([other, other], "cluster1", services)
