"""Policies the tests share: the seed's example and issue 6's rebel-base ingress policy (both kinds).

The seed's example (../shared/reference/cilium-kvstore.md): x-wing of cluster1 may reach rebel-base of
cluster2 only. The ingress policy: rebel-base (in the cluster that imports it) accepts only x-wing of
cluster1, on TCP 80; the Kubernetes NetworkPolicy says the same.
"""

from __future__ import annotations

import copy

ALLOW_CROSS_CLUSTER = {
    "apiVersion": "cilium.io/v2",
    "kind": "CiliumNetworkPolicy",
    "metadata": {"name": "allow-cross-cluster"},
    "spec": {
        "endpointSelector": {"matchLabels": {"name": "x-wing", "io.cilium.k8s.policy.cluster": "cluster1"}},
        "egress": [
            {"toEndpoints": [{"matchLabels": {"name": "rebel-base", "io.cilium.k8s.policy.cluster": "cluster2"}}]}
        ],
    },
}
ALLOW_CROSS_CLUSTER_REF = "default/CiliumNetworkPolicy/allow-cross-cluster"

REBEL_BASE_INGRESS = {
    "apiVersion": "cilium.io/v2",
    "kind": "CiliumNetworkPolicy",
    "metadata": {"name": "rebel-base-from-cluster1", "namespace": "default"},
    "spec": {
        "endpointSelector": {"matchLabels": {"name": "rebel-base"}},
        "ingress": [
            {
                "fromEndpoints": [{"matchLabels": {"name": "x-wing", "k8s:io.cilium.k8s.policy.cluster": "cluster1"}}],
                "toPorts": [{"ports": [{"port": "80", "protocol": "TCP"}]}],
            }
        ],
    },
}
REBEL_BASE_INGRESS_K8S = {
    "apiVersion": "networking.k8s.io/v1",
    "kind": "NetworkPolicy",
    "metadata": {"name": "rebel-base-from-cluster1", "namespace": "default"},
    "spec": {
        "podSelector": {"matchLabels": {"name": "rebel-base"}},
        "policyTypes": ["Ingress"],
        "ingress": [
            {
                "from": [
                    {"podSelector": {"matchLabels": {"name": "x-wing", "io.cilium.k8s.policy.cluster": "cluster1"}}}
                ],
                "ports": [{"port": 80, "protocol": "TCP"}],
            }
        ],
    },
}


def policy(document):
    """A deep copy to change in a test."""
    return copy.deepcopy(document)
