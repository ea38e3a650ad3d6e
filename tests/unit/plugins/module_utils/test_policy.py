# -*- coding: utf-8 -*-
# Copyright: clustermesh.core contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""policy.py: the CiliumNetworkPolicy / NetworkPolicy model, the loader, the codec and the compiler."""

from __future__ import annotations

import random

import pytest

from ansible_collections.clustermesh.core.plugins.module_utils import policy as P
from ansible_collections.clustermesh.core.plugins.module_utils.policy import PolicyEntry as E

CLUSTER = "io.cilium.k8s.policy.cluster"
NS = "io.kubernetes.pod.namespace"
NS_LABEL = "io.cilium.k8s.namespace.labels."
TCP, UDP, SCTP = 6, 17, 132

# The seed's example (../shared/reference/cilium-kvstore.md, "Policy").
SEED = """
apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata: {name: allow-cross-cluster}
spec:
  endpointSelector:
    matchLabels: {name: x-wing, io.cilium.k8s.policy.cluster: cluster1}
  egress:
  - toEndpoints:
    - matchLabels: {name: rebel-base, io.cilium.k8s.policy.cluster: cluster2}
"""

INGRESS_CNP = """
apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata: {name: rebel-base-from-cluster1-x-wing}
spec:
  endpointSelector:
    matchLabels: {name: rebel-base, k8s:io.cilium.k8s.policy.cluster: cluster2}
  ingress:
  - fromEndpoints:
    - matchLabels: {name: x-wing, k8s:io.cilium.k8s.policy.cluster: cluster1}
    toPorts:
    - ports: [{port: "80", protocol: TCP}]
"""

INGRESS_NP = """
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: rebel-base-from-cluster1-x-wing, namespace: default}
spec:
  podSelector:
    matchLabels: {name: rebel-base, io.cilium.k8s.policy.cluster: cluster2}
  policyTypes: [Ingress]
  ingress:
  - from:
    - podSelector:
        matchLabels: {name: x-wing, io.cilium.k8s.policy.cluster: cluster1}
    ports:
    - {port: 80, protocol: TCP}
"""

# identities: cluster1 ids 0x1xxxx, cluster2 0x2xxxx (cluster-scoped, as Cilium allocates)
XWING1, REBEL1, XWING2, REBEL2, TIE1 = 0x10101, 0x10102, 0x20101, 0x20102, 0x10103


def labels(name, cluster, namespace="default", **extra):
    result = {
        "name": name,
        CLUSTER: cluster,
        NS: namespace,
        NS_LABEL + "kubernetes.io/metadata.name": namespace,
    }
    result.update({NS_LABEL + k: v for k, v in extra.pop("ns_labels", {}).items()})
    result.update(extra)
    return result


def star_wars(repo):
    repo.set_identity(XWING1, labels("x-wing", "cluster1"))
    repo.set_identity(REBEL1, labels("rebel-base", "cluster1"))
    repo.set_identity(XWING2, labels("x-wing", "cluster2"))
    repo.set_identity(REBEL2, labels("rebel-base", "cluster2"))
    return repo


def repo_with(*texts):
    repo = P.PolicyRepository()
    repo.set_policies([p for text in texts for p in P.load_policies(text)])
    return star_wars(repo)


def cnp(spec, name="p", namespace=None):
    metadata = {"name": name}
    if namespace:
        metadata["namespace"] = namespace
    return {"apiVersion": "cilium.io/v2", "kind": "CiliumNetworkPolicy", "metadata": metadata, "spec": spec}


def np(spec, name="p", namespace=None):
    metadata = {"name": name}
    if namespace:
        metadata["namespace"] = namespace
    return {"apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy", "metadata": metadata, "spec": spec}


def repo_of(*documents, identities=None):
    repo = P.PolicyRepository()
    repo.set_policies([P.parse_policy(d) for d in documents])
    for identity, labels_ in (identities or {}).items():
        repo.set_identity(identity, labels_)
    return repo


def peers(result, direction):
    return {e.identity for e in result.entries if e.direction == direction}


def error(document):
    with pytest.raises(P.PolicyError) as info:
        P.parse_policy(document)
    return str(info.value)


# --- acceptance examples ----------------------------------------------------------------------------


def test_seed_allow_cross_cluster():
    repo = repo_with(SEED)
    xwing = repo.resolve(labels("x-wing", "cluster1"))
    assert xwing.egress_enforced and not xwing.ingress_enforced
    assert xwing.policies == ("default/CiliumNetworkPolicy/allow-cross-cluster",)
    assert xwing.entries == {E("egress", REBEL2, 0, 0)}
    assert xwing.allows("egress", REBEL2, 80, TCP)
    assert not xwing.allows("egress", REBEL1, 80, TCP)  # its own cluster's rebel-base: denied
    assert not xwing.allows("egress", P.RESERVED_WORLD, 53, UDP)
    # not selected: rebel-base, and x-wing of cluster2 (the selector names cluster1)
    for name, cluster in (("rebel-base", "cluster1"), ("x-wing", "cluster2"), ("rebel-base", "cluster2")):
        other = repo.resolve(labels(name, cluster))
        assert other == P.EndpointPolicy()
        assert other.allows("ingress", 12345, 1, TCP) and other.allows("egress", 12345, 1, TCP)


def test_ingress_policy_cnp_and_networkpolicy_give_the_same_entries():
    results = []
    for text in (INGRESS_CNP, INGRESS_NP):
        repo = repo_with(text)
        rebel2 = repo.resolve(labels("rebel-base", "cluster2"))
        assert rebel2.ingress_enforced and not rebel2.egress_enforced
        assert rebel2.entries == {E("ingress", XWING1, 80, TCP)}
        assert rebel2.allows("ingress", XWING1, 80, TCP)
        assert not rebel2.allows("ingress", XWING1, 81, TCP)
        assert not rebel2.allows("ingress", XWING1, 80, UDP)
        assert not rebel2.allows("ingress", XWING2, 80, TCP)
        assert repo.resolve(labels("rebel-base", "cluster1")) == P.EndpointPolicy()
        results.append((rebel2.ingress_enforced, rebel2.egress_enforced, rebel2.entries))
    assert results[0] == results[1]


def test_report_is_json_able_and_sorted():
    report = repo_with(INGRESS_CNP).resolve(labels("rebel-base", "cluster2")).report()
    assert report == {
        "ingress_enforced": True,
        "egress_enforced": False,
        "policies": ["default/CiliumNetworkPolicy/rebel-base-from-cluster1-x-wing"],
        "ingress": [{"identity": XWING1, "port": 80, "protocol": "TCP"}],
        "egress": [],
    }


# --- selectors --------------------------------------------------------------------------------------


def test_cluster_label_in_both_spellings_and_no_implicit_cluster():
    plain = cnp({"endpointSelector": {}, "ingress": [{"fromEndpoints": [{"matchLabels": {CLUSTER: "cluster2"}}]}]})
    prefixed = cnp(
        {"endpointSelector": {}, "ingress": [{"fromEndpoints": [{"matchLabels": {"k8s:" + CLUSTER: "cluster2"}}]}]}
    )
    anysrc = cnp(
        {"endpointSelector": {}, "ingress": [{"fromEndpoints": [{"matchLabels": {"any:" + CLUSTER: "cluster2"}}]}]}
    )
    for document in (plain, prefixed, anysrc):
        repo = star_wars(repo_of(document))
        assert peers(repo.resolve(labels("x-wing", "cluster1")), "ingress") == {XWING2, REBEL2}
    # no cluster label: every cluster
    repo = star_wars(repo_of(cnp({"endpointSelector": {}, "ingress": [{"fromEndpoints": [{"matchLabels": {}}]}]})))
    assert peers(repo.resolve(labels("x-wing", "cluster1")), "ingress") == {XWING1, REBEL1, XWING2, REBEL2}


def test_namespaces_as_cilium():
    ids = {
        XWING1: labels("x-wing", "cluster1"),
        TIE1: labels("tie", "cluster1", "empire", ns_labels={"side": "dark"}),
        0x10104: labels("vader", "cluster1", "sith", ns_labels={"side": "dark"}),
    }
    # fromEndpoints without namespace: the policy's namespace (empire)
    doc = cnp({"endpointSelector": {}, "ingress": [{"fromEndpoints": [{}]}]}, namespace="empire")
    repo = repo_of(doc, identities=ids)
    tie = repo.resolve(ids[TIE1])
    assert tie.policies == ("empire/CiliumNetworkPolicy/p",)
    assert peers(tie, "ingress") == {TIE1}
    # the endpointSelector applies in the policy's namespace only
    assert repo.resolve(ids[XWING1]) == P.EndpointPolicy()
    # naming the namespace key (matchLabels, either spelling, or an expression) turns the injection off
    for selector in (
        {"matchLabels": {NS: "default"}},
        {"matchLabels": {"k8s:" + NS: "default"}},
        {"matchExpressions": [{"key": NS, "operator": "In", "values": ["default", "sith"]}]},
    ):
        doc = cnp({"endpointSelector": {}, "ingress": [{"fromEndpoints": [selector]}]}, namespace="empire")
        expected = {XWING1} | ({0x10104} if "matchExpressions" in selector else set())
        assert peers(repo_of(doc, identities=ids).resolve(ids[TIE1]), "ingress") == expected
    # namespace labels via io.cilium.k8s.namespace.labels.*: still within the policy's namespace
    doc = cnp(
        {"endpointSelector": {}, "ingress": [{"fromEndpoints": [{"matchLabels": {NS_LABEL + "side": "dark"}}]}]},
        namespace="empire",
    )
    assert peers(repo_of(doc, identities=ids).resolve(ids[TIE1]), "ingress") == {TIE1}
    # reserved selectors get no namespace
    doc = cnp({"endpointSelector": {}, "ingress": [{"fromEndpoints": [{"matchLabels": {"reserved:host": ""}}]}]})
    assert peers(repo_of(doc, identities=ids).resolve(ids[XWING1]), "ingress") == {P.RESERVED_HOST}


def test_endpoint_selector_namespace_must_be_the_policys():
    ok = cnp({"endpointSelector": {"matchLabels": {NS: "empire"}}, "egress": []}, namespace="empire")
    assert P.parse_policy(ok).namespace == "empire"
    message = error(cnp({"endpointSelector": {"matchLabels": {NS: "empire"}}, "egress": []}))
    assert message.startswith("spec.endpointSelector: selects namespace 'empire'")
    assert "metadata.namespace" in message


def test_match_expressions():
    ids = {
        1001: labels("a", "cluster1", tier="front"),
        1002: labels("b", "cluster1", tier="back"),
        1003: labels("c", "cluster1"),
    }

    def selected(*expressions):
        doc = cnp({"endpointSelector": {}, "egress": [{"toEndpoints": [{"matchExpressions": list(expressions)}]}]})
        return peers(repo_of(doc, identities=ids).resolve(ids[1003]), "egress")

    assert selected({"key": "tier", "operator": "In", "values": ["front", "back"]}) == {1001, 1002}
    assert selected({"key": "tier", "operator": "NotIn", "values": ["front"]}) == {1002, 1003}
    assert selected({"key": "tier", "operator": "Exists"}) == {1001, 1002}
    assert selected({"key": "k8s:tier", "operator": "DoesNotExist"}) == {1003}
    assert selected({"key": "tier", "operator": "Exists"}, {"key": "name", "operator": "NotIn", "values": ["a"]}) == {
        1002
    }


def test_entities():
    doc = cnp(
        {
            "endpointSelector": {},
            "ingress": [{"fromEntities": ["cluster"]}],
            "egress": [{"toEntities": ["world"], "toPorts": [{"ports": [{"port": "443", "protocol": "TCP"}]}]}],
        },
        name="ents",
    )
    cidr = cnp({"endpointSelector": {"matchLabels": {"name": "nobody"}}, "egress": [{"toCIDR": ["192.0.2.0/24"]}]})
    repo = star_wars(repo_of(doc, cidr))
    cidr_id = repo.cidr_identities()["192.0.2.0/24"]
    result = repo.resolve(labels("x-wing", "cluster1"))
    assert peers(result, "ingress") == {XWING1, REBEL1, XWING2, REBEL2, P.RESERVED_HOST, P.RESERVED_REMOTE_NODE}
    assert peers(result, "egress") == {P.RESERVED_WORLD, cidr_id}
    assert {(e.port, e.protocol) for e in result.entries if e.direction == "egress"} == {(443, TCP)}
    # the cluster entity follows identities as they come and go
    repo.set_identity(0x30101, labels("u-wing", "cluster3"))
    repo.remove_identity(REBEL1)
    assert peers(repo.resolve(labels("x-wing", "cluster1")), "ingress") == {
        XWING1,
        XWING2,
        REBEL2,
        0x30101,
        P.RESERVED_HOST,
        P.RESERVED_REMOTE_NODE,
    }
    one = {
        "all": {0},
        "host": {P.RESERVED_HOST},
        "remote-node": {P.RESERVED_REMOTE_NODE},
    }
    for entity, expected in one.items():
        repo = star_wars(repo_of(cnp({"endpointSelector": {}, "egress": [{"toEntities": [entity]}]})))
        assert peers(repo.resolve(labels("x-wing", "cluster1")), "egress") == expected
    # all together with other peers collapses to "any"
    doc = cnp({"endpointSelector": {}, "egress": [{"toEntities": ["all", "host"]}]})
    assert star_wars(repo_of(doc)).resolve(labels("x-wing", "cluster1")).entries == {E("egress", 0, 0, 0)}


def test_cidr_with_except_and_nested_prefixes():
    wide = cnp(
        {
            "endpointSelector": {"matchLabels": {"name": "x-wing"}},
            "egress": [{"toCIDRSet": [{"cidr": "10.0.0.0/8", "except": ["10.1.0.0/16"]}]}],
        },
        name="wide",
    )
    narrow = cnp(
        {
            "endpointSelector": {"matchLabels": {"name": "rebel-base"}},
            "egress": [{"toCIDR": ["10.2.0.0/16", "10.1.2.0/24", "192.0.2.1"]}],
        },
        name="narrow",
    )
    repo = star_wars(repo_of(wide, narrow))
    ids = repo.cidr_identities()
    assert set(ids) == {"10.0.0.0/8", "10.1.0.0/16", "10.2.0.0/16", "10.1.2.0/24", "192.0.2.1/32"}
    assert all(identity >= P.LOCAL_IDENTITY_BASE for identity in ids.values())
    assert len(set(ids.values())) == len(ids)
    # 10/8 except 10.1/16: 10/8 itself and the nested 10.2/16; nothing inside the except
    assert peers(repo.resolve(labels("x-wing", "cluster1")), "egress") == {ids["10.0.0.0/8"], ids["10.2.0.0/16"]}
    assert peers(repo.resolve(labels("rebel-base", "cluster1")), "egress") == {
        ids["10.2.0.0/16"],
        ids["10.1.2.0/24"],
        ids["192.0.2.1/32"],
    }
    # removing a policy drops its prefixes; the others keep their identities
    repo.set_policies([P.parse_policy(wide)])
    assert repo.cidr_identities() == {"10.0.0.0/8": ids["10.0.0.0/8"], "10.1.0.0/16": ids["10.1.0.0/16"]}
    assert peers(repo.resolve(labels("x-wing", "cluster1")), "egress") == {ids["10.0.0.0/8"]}


def test_default_route_selects_world():
    doc = cnp({"endpointSelector": {}, "egress": [{"toCIDRSet": [{"cidr": "0.0.0.0/0", "except": ["10.0.0.0/8"]}]}]})
    repo = star_wars(repo_of(doc))
    ids = repo.cidr_identities()
    assert peers(repo.resolve(labels("x-wing", "cluster1")), "egress") == {P.RESERVED_WORLD, ids["0.0.0.0/0"]}


def test_cidr_errors():
    def cidr_error(value, field="toCIDR"):
        return error(cnp({"endpointSelector": {}, "egress": [{field: value}]}))

    assert cidr_error(["10.0.0.1/8"]) == (
        "spec.egress[0].toCIDR[0]: '10.0.0.1/8' has host bits set; did you mean '10.0.0.0/8'?"
    )
    assert cidr_error(["fd00::/64"]).startswith("spec.egress[0].toCIDR[0]: 'fd00::/64' is an IPv6 prefix")
    assert cidr_error(["ten/8"]).startswith("spec.egress[0].toCIDR[0]: 'ten/8' is not an IPv4 prefix")
    assert cidr_error([{"cidr": "10.0.0.0/8", "except": ["11.0.0.0/16"]}], "toCIDRSet") == (
        "spec.egress[0].toCIDRSet[0].except[0]: '11.0.0.0/16' is not inside cidr '10.0.0.0/8'"
    )
    assert cidr_error([{"except": []}], "toCIDRSet") == "spec.egress[0].toCIDRSet[0].cidr: is required"
    assert "not supported by clustermesh.core" in cidr_error([{"cidrGroupRef": "x"}], "toCIDRSet")


# --- rule semantics ---------------------------------------------------------------------------------


def test_rule_shapes():
    def entries(rule):
        repo = star_wars(repo_of(cnp({"endpointSelector": {}, "ingress": [rule]})))
        result = repo.resolve(labels("x-wing", "cluster1"))
        assert result.ingress_enforced
        return result.entries

    assert entries({}) == set()  # an empty rule allows nothing
    assert entries({"fromEndpoints": []}) == set()  # a present, empty peer list selects no peer
    assert entries({"toPorts": [{"ports": [{"port": "53", "protocol": "UDP"}]}]}) == {E("ingress", 0, 53, UDP)}
    assert entries({"fromEntities": ["host"]}) == {E("ingress", 1, 0, 0)}
    assert entries({"fromEntities": ["host"], "toPorts": [{}]}) == {E("ingress", 1, 0, p) for p in (TCP, UDP, SCTP)}
    # ingress: [] is enforced with no entries (deny all)
    repo = star_wars(repo_of(cnp({"endpointSelector": {}, "ingress": []})))
    result = repo.resolve(labels("x-wing", "cluster1"))
    assert result.ingress_enforced and not result.egress_enforced and not result.entries
    assert not result.allows("ingress", XWING2, 80, TCP)


def test_ports():
    def entries(*ports):
        doc = cnp({"endpointSelector": {}, "ingress": [{"toPorts": [{"ports": list(ports)}]}]})
        return {(e.port, e.protocol) for e in star_wars(repo_of(doc)).resolve(labels("x", "cluster1")).entries}

    assert entries({"port": 80}) == {(80, TCP), (80, UDP), (80, SCTP)}  # ANY by default
    assert entries({"port": "80", "protocol": "ANY"}) == {(80, TCP), (80, UDP), (80, SCTP)}
    assert entries({"port": "0", "protocol": "TCP"}) == {(0, TCP)}
    assert entries({"protocol": "UDP"}) == {(0, UDP)}  # no port: every port
    assert entries({"port": 0}) == {(0, TCP), (0, UDP), (0, SCTP)}
    assert entries({"port": 8080, "endPort": 8082, "protocol": "UDP"}) == {(8080, UDP), (8081, UDP), (8082, UDP)}
    assert entries({"port": 1, "endPort": 1024, "protocol": "SCTP"}) == {(p, SCTP) for p in range(1, 1025)}


@pytest.mark.parametrize(
    "port, message",
    [
        (
            {"port": "80", "protocol": "TCPP"},
            "spec.egress[0].toPorts[0].ports[0].protocol: 'TCPP' is not TCP, UDP or ANY; "
            "use one of TCP, UDP, SCTP, ANY",
        ),
        ({"port": "80", "protocol": "tcp"}, "spec.egress[0].toPorts[0].ports[0].protocol: 'tcp' is not TCP"),
        ({"port": "http"}, "spec.egress[0].toPorts[0].ports[0].port: named port 'http' is not supported"),
        ({"port": 70000}, "spec.egress[0].toPorts[0].ports[0].port: port 70000 is outside 0..65535"),
        ({"port": -1}, "spec.egress[0].toPorts[0].ports[0].port: port -1 is outside 0..65535"),
        ({"port": True}, "spec.egress[0].toPorts[0].ports[0].port: True is not a port number"),
        ({"port": 80, "endPort": 79}, "spec.egress[0].toPorts[0].ports[0].endPort: 79 must be between port 80"),
        ({"port": 0, "endPort": 79}, "spec.egress[0].toPorts[0].ports[0].endPort: needs a port other than 0"),
        (
            {"port": 1000, "endPort": 2024},
            "spec.egress[0].toPorts[0].ports[0].endPort: the range 1000-2024 spans 1025 ports; at most 1024",
        ),
        ({"port": 80, "name": "x"}, "spec.egress[0].toPorts[0].ports[0].name: unknown field 'name'"),
    ],
)
def test_port_errors(port, message):
    assert error(cnp({"endpointSelector": {}, "egress": [{"toPorts": [{"ports": [port]}]}]})).startswith(message)


# --- CiliumNetworkPolicy errors ---------------------------------------------------------------------


@pytest.mark.parametrize(
    "spec, message",
    [
        ({"egress": []}, "spec.endpointSelector: is required"),
        (
            {"endpointSelector": {}, "ingressDeny": []},
            "spec.ingressDeny: ingressDeny is not supported by clustermesh.core",
        ),
        (
            {"endpointSelector": {}, "egressDeny": []},
            "spec.egressDeny: egressDeny is not supported by clustermesh.core",
        ),
        ({"nodeSelector": {}}, "spec.nodeSelector: nodeSelector is not supported by clustermesh.core"),
        (
            {"endpointSelector": {}, "enableDefaultDeny": {}},
            "spec.enableDefaultDeny: enableDefaultDeny is not supported",
        ),
        ({"endpointSelector": {}, "egres": []}, "spec.egres: unknown field 'egres'"),
        ({"endpointSelector": {}, "ingress": None}, "spec.ingress: is null: give a list of rules ([] denies all"),
        ({"endpointSelector": {}, "ingress": {}}, "spec.ingress: must be a list of rules, got dict"),
        ({"endpointSelector": {}, "egress": [{"toFQDNs": []}]}, "spec.egress[0].toFQDNs: toFQDNs is not supported"),
        (
            {"endpointSelector": {}, "egress": [{"toServices": []}]},
            "spec.egress[0].toServices: toServices is not supported",
        ),
        (
            {"endpointSelector": {}, "egress": [{"toRequires": []}]},
            "spec.egress[0].toRequires: toRequires is not supported",
        ),
        ({"endpointSelector": {}, "egress": [{"toNodes": []}]}, "spec.egress[0].toNodes: toNodes is not supported"),
        ({"endpointSelector": {}, "egress": [{"toGroups": []}]}, "spec.egress[0].toGroups: toGroups is not supported"),
        ({"endpointSelector": {}, "egress": [{"icmps": []}]}, "spec.egress[0].icmps: icmps is not supported"),
        (
            {"endpointSelector": {}, "ingress": [{"fromRequires": []}]},
            "spec.ingress[0].fromRequires: fromRequires is not supp",
        ),
        (
            {"endpointSelector": {}, "ingress": [{"fromNodes": []}]},
            "spec.ingress[0].fromNodes: fromNodes is not supported",
        ),
        (
            {"endpointSelector": {}, "ingress": [{"authentication": {}}]},
            "spec.ingress[0].authentication: authentication is not",
        ),
        ({"endpointSelector": {}, "ingress": [{"toEndpoints": []}]}, "spec.ingress[0].toEndpoints: unknown field"),
        ({"endpointSelector": {}, "egress": [{"fromCIDR": []}]}, "spec.egress[0].fromCIDR: unknown field"),
        (
            {"endpointSelector": {}, "ingress": [{"toPorts": [{"ports": [{"port": "80"}], "rules": {"http": []}}]}]},
            "spec.ingress[0].toPorts[0].rules: rules is not supported by clustermesh.core (L4 rules only",
        ),
        (
            {"endpointSelector": {}, "ingress": [{"toPorts": [{"listener": {}}]}]},
            "spec.ingress[0].toPorts[0].listener: listener is not supported",
        ),
        (
            {"endpointSelector": {}, "ingress": [{"toPorts": [{"serverNames": []}]}]},
            "spec.ingress[0].toPorts[0].serverNames: serverNames is not supported",
        ),
        (
            {"endpointSelector": {}, "ingress": [{"toPorts": [{"terminatingTLS": {}}]}]},
            "spec.ingress[0].toPorts[0].terminatingTLS: terminatingTLS is not supported",
        ),
        (
            {"endpointSelector": {}, "ingress": [{"toPorts": [{"originatingTLS": {}}]}]},
            "spec.ingress[0].toPorts[0].originatingTLS: originatingTLS is not supported",
        ),
        ({"endpointSelector": {}, "egress": [{"toEntities": ["galaxy"]}]}, "spec.egress[0].toEntities[0]: 'galaxy'"),
        (
            {"endpointSelector": {}, "egress": [{"toEntities": ["kube-apiserver"]}]},
            "spec.egress[0].toEntities[0]: entity 'kube-apiserver' is not supported by clustermesh.core",
        ),
        ({"endpointSelector": {"matchLabel": {}}}, "spec.endpointSelector.matchLabel: unknown field 'matchLabel'"),
        (
            {"endpointSelector": {"matchLabels": {"reserved:host": ""}}},
            "spec.endpointSelector.matchLabels['reserved:host']: reserved label 'reserved:host' can only be",
        ),
        (
            {"endpointSelector": {}, "egress": [{"toEndpoints": [{"matchLabels": {"reserved:health": ""}}]}]},
            "spec.egress[0].toEndpoints[0].matchLabels['reserved:health']: reserved label 'reserved:health' is not",
        ),
        (
            {"endpointSelector": {}, "egress": [{"toEndpoints": [{"matchLabels": {"cidr:10.0.0.0/8": ""}}]}]},
            "spec.egress[0].toEndpoints[0].matchLabels['cidr:10.0.0.0/8']: label source 'cidr' of",
        ),
        (
            {"endpointSelector": {"matchLabels": {"bad key": "x"}}},
            "spec.endpointSelector.matchLabels['bad key']: label key 'bad key' is invalid",
        ),
        (
            {"endpointSelector": {"matchLabels": {"name": "no spaces"}}},
            "spec.endpointSelector.matchLabels['name']: label value 'no spaces' is invalid",
        ),
        (
            {"endpointSelector": {"matchLabels": {"version": 2}}},
            "spec.endpointSelector.matchLabels['version']: label value 2 must be a string (quote it: '2')",
        ),
        (
            {"endpointSelector": {"matchLabels": {"name": "a", "k8s:name": "b"}}},
            "spec.endpointSelector.matchLabels['k8s:name']: label key 'name' is given twice",
        ),
        (
            {"endpointSelector": {"matchExpressions": [{"key": "a", "operator": "Has"}]}},
            "spec.endpointSelector.matchExpressions[0].operator: 'Has' is not In, NotIn, Exists or DoesNotExist",
        ),
        (
            {"endpointSelector": {"matchExpressions": [{"key": "a", "operator": "In", "values": []}]}},
            "spec.endpointSelector.matchExpressions[0].values: operator In needs a non-empty list of values",
        ),
        (
            {"endpointSelector": {"matchExpressions": [{"key": "a", "operator": "Exists", "values": ["x"]}]}},
            "spec.endpointSelector.matchExpressions[0].values: operator Exists takes no values",
        ),
        (
            {"endpointSelector": {"matchExpressions": [{"operator": "Exists"}]}},
            "spec.endpointSelector.matchExpressions[0].key: is required",
        ),
        ({"endpointSelector": {}, "description": 5}, "spec.description: must be a string, got int"),
    ],
)
def test_cnp_errors(spec, message):
    assert error(cnp(spec)).startswith(message)


@pytest.mark.parametrize(
    "document, message",
    [
        ({"kind": "Pod"}, "kind: 'Pod' is not CiliumNetworkPolicy or NetworkPolicy"),
        ({"kind": "CiliumClusterwideNetworkPolicy"}, "kind: CiliumClusterwideNetworkPolicy is not supported"),
        ({"kind": "NetworkPolicy", "apiVersion": "cilium.io/v2"}, "apiVersion: 'cilium.io/v2' is not"),
        (dict(cnp({"endpointSelector": {}}), extra=1), "extra: unknown field 'extra'"),
        ({"kind": "CiliumNetworkPolicy", "apiVersion": "cilium.io/v2", "spec": {}}, "metadata: is required"),
        (cnp({"endpointSelector": {}}, name="Bad_Name"), "metadata.name: 'Bad_Name' is not a DNS subdomain"),
        (cnp({"endpointSelector": {}}, name="a" * 254), "metadata.name: 'aaaa"),
        (cnp({"endpointSelector": {}}, namespace="Kube_System"), "metadata.namespace: namespace 'Kube_System' is"),
        (
            {**cnp({}), "metadata": {"name": "a", "uid": "x"}},
            "metadata.uid: unknown field 'uid'",
        ),
        ({**cnp({}), "metadata": {}}, "metadata.name: is required"),
        ({k: v for k, v in cnp({}).items() if k != "spec"}, "spec: is required (or specs"),
        ({**cnp({"endpointSelector": {}}), "specs": []}, "specs: must hold at least one rule spec"),
        (cnp({"endpointSelector": {}, "description": __import__("datetime").date(2026, 1, 1)}), "spec.description:"),
        ("text", "must be a policy mapping"),
    ],
)
def test_document_errors(document, message):
    assert message in error(document)
    assert error(document).startswith(message.split(":")[0])


def test_specs_list_each_with_its_selector():
    doc = cnp({"endpointSelector": {"matchLabels": {"name": "x-wing"}}, "egress": []})
    doc["specs"] = [{"endpointSelector": {"matchLabels": {"name": "rebel-base"}}, "ingress": [{}]}]
    repo = star_wars(repo_of(doc))
    assert repo.resolve(labels("x-wing", "cluster1")).egress_enforced
    assert not repo.resolve(labels("x-wing", "cluster1")).ingress_enforced
    assert repo.resolve(labels("rebel-base", "cluster2")).ingress_enforced
    message = error({**doc, "specs": [{"endpointSelector": {}, "ingress": [{"bogus": 1}]}]})
    assert message.startswith("specs[0].ingress[0].bogus: unknown field 'bogus'")


# --- Kubernetes NetworkPolicy ------------------------------------------------------------------------


NP_IDS = {
    XWING1: labels("x-wing", "cluster1", ns_labels={"side": "light"}),
    REBEL2: labels("rebel-base", "cluster2", ns_labels={"side": "light"}),
    TIE1: labels("tie", "cluster1", "empire", ns_labels={"side": "dark"}),
    0x20103: labels("tie", "cluster2", "empire", ns_labels={"side": "dark"}),
}


def np_peers(spec, subject=XWING1, direction="ingress"):
    repo = repo_of(np(spec), identities=NP_IDS)
    result = repo.resolve(NP_IDS[subject])
    return peers(result, direction)


def test_networkpolicy_peers():
    # podSelector alone: the policy's namespace
    assert np_peers({"podSelector": {}, "ingress": [{"from": [{"podSelector": {}}]}]}) == {XWING1, REBEL2}
    # namespaceSelector alone: pods of matching namespaces (namespace labels)
    dark = {"namespaceSelector": {"matchLabels": {"side": "dark"}}}
    assert np_peers({"podSelector": {}, "ingress": [{"from": [dark]}]}) == {TIE1, 0x20103}
    by_name = {"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "empire"}}}
    assert np_peers({"podSelector": {}, "ingress": [{"from": [by_name]}]}) == {TIE1, 0x20103}
    expr = {"namespaceSelector": {"matchExpressions": [{"key": "side", "operator": "NotIn", "values": ["light"]}]}}
    assert np_peers({"podSelector": {}, "ingress": [{"from": [expr]}]}) == {TIE1, 0x20103}
    # namespaceSelector {}: every pod of every namespace (no reserved identities)
    assert np_peers({"podSelector": {}, "ingress": [{"from": [{"namespaceSelector": {}}]}]}) == set(NP_IDS)
    # both: AND
    both = {**dark, "podSelector": {"matchLabels": {CLUSTER: "cluster2"}}}
    assert np_peers({"podSelector": {}, "ingress": [{"from": [both]}]}) == {0x20103}
    # no / empty from: any peer
    assert np_peers({"podSelector": {}, "ingress": [{}]}) == {0}
    assert np_peers({"podSelector": {}, "ingress": [{"from": []}]}) == {0}
    # ipBlock
    repo = repo_of(
        np({"podSelector": {}, "policyTypes": ["Egress"], "egress": [{"to": [{"ipBlock": {"cidr": "10.0.0.0/8"}}]}]}),
        identities=NP_IDS,
    )
    assert peers(repo.resolve(NP_IDS[XWING1]), "egress") == {repo.cidr_identities()["10.0.0.0/8"]}


def test_networkpolicy_types_and_ports():
    def resolve(spec, subject=XWING1):
        return repo_of(np(spec), identities=NP_IDS).resolve(NP_IDS[subject])

    # default policyTypes: Ingress; no ingress rules -> deny all ingress
    result = resolve({"podSelector": {}})
    assert result.ingress_enforced and not result.egress_enforced and not result.entries
    # Egress added by default when spec.egress is present
    result = resolve({"podSelector": {}, "egress": [{"ports": [{"port": 53, "protocol": "UDP"}, {"port": "80"}]}]})
    assert result.ingress_enforced and result.egress_enforced
    assert result.entries == {E("egress", 0, 53, UDP), E("egress", 0, 80, TCP)}
    result = resolve({"podSelector": {}, "policyTypes": ["Egress"]})
    assert not result.ingress_enforced and result.egress_enforced
    result = resolve({"podSelector": {}, "ingress": [{"ports": [{"protocol": "SCTP"}, {"port": 10, "endPort": 11}]}]})
    assert result.entries == {E("ingress", 0, 0, SCTP), E("ingress", 0, 10, TCP), E("ingress", 0, 11, TCP)}
    # podSelector selects within the namespace
    assert resolve({"podSelector": {"matchLabels": {"name": "tie"}}}, subject=TIE1) == P.EndpointPolicy()
    assert resolve({"podSelector": {"matchLabels": {"name": "x-wing"}}}).ingress_enforced


@pytest.mark.parametrize(
    "spec, message",
    [
        ({"ingress": []}, "spec.podSelector: is required"),
        ({"podSelector": {}, "policyTypes": ["Inbound"]}, "spec.policyTypes[0]: 'Inbound' is not Ingress or Egress"),
        ({"podSelector": {}, "policyTypes": []}, "spec.policyTypes: must name Ingress and/or Egress"),
        (
            {"podSelector": {}, "policyTypes": ["Ingress"], "egress": [{}]},
            "spec.egress: has rules but policyTypes does not include Egress",
        ),
        ({"podSelector": {}, "ingress": [{"from": [{}]}]}, "spec.ingress[0].from[0]: a peer needs podSelector"),
        (
            {"podSelector": {}, "ingress": [{"from": [{"ipBlock": {"cidr": "10.0.0.0/8"}, "podSelector": {}}]}]},
            "spec.ingress[0].from[0]: ipBlock cannot be combined with podSelector or namespaceSelector",
        ),
        (
            {
                "podSelector": {},
                "ingress": [{"from": [{"ipBlock": {"cidr": "10.0.0.0/8", "except": ["10.0.0.1/32"]}}]}],
            },
            None,
        ),
        (
            {"podSelector": {}, "ingress": [{"ports": [{"port": "http"}]}]},
            "spec.ingress[0].ports[0].port: named port 'http' is not supported by clustermesh.core",
        ),
        ({"podSelector": {}, "ingress": [{"ports": [{"port": 0}]}]}, "spec.ingress[0].ports[0].port: port 0 is outsi"),
        (
            {"podSelector": {}, "ingress": [{"ports": [{"port": 80, "protocol": "ICMP"}]}]},
            "spec.ingress[0].ports[0].protocol: 'ICMP' is not TCP, UDP or SCTP",
        ),
        ({"podSelector": {}, "ingress": [{"ports": [{"endPort": 90}]}]}, "spec.ingress[0].ports[0].endPort: needs"),
        ({"podSelector": {}, "egress": [{"from": []}]}, "spec.egress[0].from: unknown field 'from'"),
        ({"podSelector": {}, "ingress": [{"to": []}]}, "spec.ingress[0].to: unknown field 'to'"),
        ({"podSelector": {}, "egress": [{"to": [{"ipBlock": {"cidr": "::/0"}}]}]}, "spec.egress[0].to[0].ipBlock.cidr"),
        ({"podSelector": {"matchLabels": {"reserved:host": ""}}}, "spec.podSelector.matchLabels['reserved:host']"),
    ],
)
def test_networkpolicy_errors(spec, message):
    if message is None:
        assert P.parse_policy(np(spec)).kind == "NetworkPolicy"
        return
    assert error(np(spec)).startswith(message)


# --- loader and codec --------------------------------------------------------------------------------


def test_load_policies_shapes():
    multi = SEED + "---\n" + INGRESS_NP + "---\n"
    assert [p.ref for p in P.load_policies(multi)] == [
        "default/CiliumNetworkPolicy/allow-cross-cluster",
        "default/NetworkPolicy/rebel-base-from-cluster1-x-wing",
    ]
    listed = "- " + SEED.strip().replace("\n", "\n  ")
    assert [p.name for p in P.load_policies(listed)] == ["allow-cross-cluster"]
    as_list = "apiVersion: v1\nkind: List\nitems:\n- " + INGRESS_CNP.strip().replace("\n", "\n  ")
    assert [p.kind for p in P.load_policies(as_list)] == ["CiliumNetworkPolicy"]
    typed = "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicyList\nitems:\n- metadata: {name: a}\n  spec:\n"
    typed += "    podSelector: {}\n"
    assert [p.ref for p in P.load_policies(typed)] == ["default/NetworkPolicy/a"]
    assert P.load_policies("") == [] and P.load_policies("---\n---\n") == []


def test_load_policies_errors_name_source_and_document():
    bad = SEED + "---\n" + SEED.replace("egress:", "egres:")
    with pytest.raises(P.PolicyError, match=r"^policies/a\.yaml document 2: spec\.egres: unknown field 'egres'"):
        P.load_policies(bad, "policies/a.yaml")
    with pytest.raises(P.PolicyError, match=r"^a\.yaml document 2: default/CiliumNetworkPolicy/allow-cross-cluster "):
        P.load_policies(SEED + "---\n" + SEED, "a.yaml")
    # the same name in another namespace or kind is fine
    assert len(P.load_policies(SEED + "---\n" + SEED.replace("metadata: {", "metadata: {namespace: x, "))) == 2
    with pytest.raises(P.PolicyError, match=r"^a\.yaml: line 4 column 8: malformed YAML: mapping values are not"):
        P.load_policies("kind: NetworkPolicy\nmetadata:\n  name: a\n   spec: x\n", "a.yaml")
    with pytest.raises(P.PolicyError, match=r"^a\.yaml: line 2 column 1: malformed YAML: duplicate key 'kind'"):
        P.load_policies("kind: NetworkPolicy\nkind: NetworkPolicy\n", "a.yaml")
    with pytest.raises(P.PolicyError, match=r"^a\.yaml document 1 items\[0\]: metadata\.name"):
        P.load_policies("kind: CiliumNetworkPolicyList\nitems:\n- metadata: {}\n", "a.yaml")
    with pytest.raises(P.PolicyError, match=r"^<inline> document 1: .*must be a policy mapping"):
        P.load_policies("just text")


def test_codec_roundtrip_and_canonical_document():
    text = SEED.replace(
        "metadata: {name: allow-cross-cluster}", "metadata: {name: allow-cross-cluster, labels: {a: b}}"
    )
    text += "status: {ok: true}\n"
    policy = P.load_policies(text)[0]
    assert policy.document["metadata"] == {"name": "allow-cross-cluster", "namespace": "default", "labels": {"a": "b"}}
    assert "status" not in policy.document
    value = P.encode_policy(policy)
    assert value.startswith(b'{"apiVersion":"cilium.io/v2","kind":"CiliumNetworkPolicy","metadata":')
    decoded = P.decode_policy(value)
    assert decoded == policy and P.encode_policy(decoded) == value and hash(decoded) == hash(policy)
    assert P.decode_policy(value.decode()).rules == policy.rules
    with pytest.raises(P.PolicyError, match="^k: policy value is not JSON"):
        P.decode_policy(b"{", "k")
    with pytest.raises(P.PolicyError, match="^k: policy value is not UTF-8"):
        P.decode_policy(b"\xff", "k")
    with pytest.raises(P.PolicyError, match="^k: spec.endpointSelector: is required"):
        P.decode_policy(
            b'{"apiVersion":"cilium.io/v2","kind":"CiliumNetworkPolicy","metadata":{"name":"a"},"spec":{}}', "k"
        )


# --- the repository ----------------------------------------------------------------------------------


def test_set_policies_reports_change():
    repo = P.PolicyRepository()
    seed = P.load_policies(SEED)
    assert repo.set_policies(seed)
    revision = repo.revision
    assert not repo.set_policies(P.load_policies(SEED))
    assert repo.revision == revision
    assert repo.set_policies([])
    assert repo.revision > revision
    with pytest.raises(P.PolicyError, match="given twice"):
        repo.set_policies(seed + seed)


def test_identity_add_remove_updates_resolve():
    repo = P.PolicyRepository()
    repo.set_policies(P.load_policies(INGRESS_CNP))
    rebel2 = labels("rebel-base", "cluster2")
    assert repo.resolve(rebel2).entries == set()
    revision = repo.revision
    repo.set_identity(XWING1, labels("x-wing", "cluster1"))
    assert repo.revision > revision
    assert repo.resolve(rebel2).entries == {E("ingress", XWING1, 80, TCP)}
    # an identity no selector cares about changes nothing: same revision, same cached object
    cached, revision = repo.resolve(rebel2), repo.revision
    repo.set_identity(XWING2, labels("x-wing", "cluster2"))
    repo.set_identity(XWING2, labels("x-wing", "cluster2"))
    assert repo.revision == revision and repo.resolve(rebel2) is cached
    # a second x-wing of cluster1 (another label set) is allowed too; relabelled away -> gone
    repo.set_identity(0x10199, labels("x-wing", "cluster1", version="2"))
    assert peers(repo.resolve(rebel2), "ingress") == {XWING1, 0x10199}
    repo.set_identity(0x10199, labels("y-wing", "cluster1"))
    assert peers(repo.resolve(rebel2), "ingress") == {XWING1}
    repo.remove_identity(XWING1)
    repo.remove_identity(XWING1)  # unknown: no-op
    assert repo.resolve(rebel2).entries == set() and repo.resolve(rebel2).ingress_enforced
    # labels may be given with the k8s: source
    repo.set_identity(XWING1, {"k8s:" + k: v for k, v in labels("x-wing", "cluster1").items()})
    assert peers(repo.resolve(rebel2), "ingress") == {XWING1}


@pytest.mark.parametrize("identity", [0, 1, 2, 6, 255, P.LOCAL_IDENTITY_BASE, True, "300"])
def test_set_identity_refuses_reserved_and_local_identities(identity):
    with pytest.raises(P.PolicyError, match="identity"):
        P.PolicyRepository().set_identity(identity, {"name": "x"})


def _random_policies(rng, count):
    names = [f"app{i}" for i in range(40)]
    clusters = ["cluster1", "cluster2", "cluster3"]
    documents = []
    for index in range(count):
        peer = {"matchLabels": {"name": rng.choice(names)}}
        if rng.random() < 0.5:
            peer["matchLabels"][CLUSTER] = rng.choice(clusters)
        if rng.random() < 0.3:
            peer["matchExpressions"] = [{"key": "tier", "operator": rng.choice(["In", "NotIn"]), "values": ["a"]}]
        rule = {"fromEndpoints": [peer]} if index % 2 else {"toEndpoints": [peer]}
        if rng.random() < 0.5:
            rule["toPorts"] = [{"ports": [{"port": str(rng.randrange(1, 1000)), "protocol": "TCP"}]}]
        if index % 10 == 0:
            rule["fromEntities" if index % 2 else "toEntities"] = ["cluster"]
        if index % 7 == 0:
            rule["fromCIDR" if index % 2 else "toCIDR"] = [f"10.{index % 256}.0.0/16"]
        direction = "ingress" if index % 2 else "egress"
        documents.append(
            cnp({"endpointSelector": {"matchLabels": {"name": rng.choice(names)}}, direction: [rule]}, f"p{index}")
        )
    return [P.parse_policy(d) for d in documents], names, clusters


def test_incremental_repository_matches_a_fresh_compile_at_scale():
    """100 policies, 1,000 identity changes, 20 endpoints: the incrementally updated repository
    resolves exactly what a repository built from the final identities resolves."""
    rng = random.Random(6)
    policies, names, clusters = _random_policies(rng, 100)
    repo = P.PolicyRepository()
    repo.set_policies(policies)
    endpoints = [labels(rng.choice(names), rng.choice(clusters)) for _index in range(20)]
    for endpoint in endpoints:
        repo.resolve(endpoint)  # populate the cache so that invalidation is exercised
    current: dict[int, dict[str, str]] = {}
    for step in range(1000):
        identity = 1000 + rng.randrange(400)
        if identity in current and rng.random() < 0.2:
            repo.remove_identity(identity)
            del current[identity]
            continue
        extra = {"tier": rng.choice(["a", "b"])} if rng.random() < 0.5 else {}
        current[identity] = labels(rng.choice(names), rng.choice(clusters), **extra)
        repo.set_identity(identity, current[identity])
        if step % 50 == 0:
            repo.resolve(endpoints[step % 20])
    fresh = P.PolicyRepository()
    for identity, identity_labels in current.items():
        fresh.set_identity(identity, identity_labels)
    fresh.set_policies(policies)
    enforced = 0
    for endpoint in endpoints:
        assert repo.resolve(endpoint) == fresh.resolve(endpoint)
        enforced += repo.resolve(endpoint).ingress_enforced or repo.resolve(endpoint).egress_enforced
    assert enforced >= 10  # the workload really selects endpoints
    # and entries really name the identities: pick one selector and check by brute force
    sample = policies[1].rules[0].ingress[0].peers[0]
    expected = {i for i, lab in current.items() if sample.matches(P._Ident(i, lab))}
    assert repo.selection(sample) == expected


def test_resolve_cache_is_bounded_and_stays_correct(monkeypatch):
    monkeypatch.setattr(P, "RESOLVE_CACHE_MAX", 3)
    repo = repo_with(SEED)
    for index in range(10):
        assert repo.resolve(labels("x-wing", "cluster1", build=str(index))).entries == {E("egress", REBEL2, 0, 0)}
    assert len(repo._resolved) <= 3
    repo.remove_identity(REBEL2)
    assert repo.resolve(labels("x-wing", "cluster1", build="9")).entries == set()
