# -*- coding: utf-8 -*-
# Copyright: clustermesh.core contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""network_policy: argument handling, reading and validating the documents (before any connection: the
endpoint given is a closed port, so a test that got as far as connecting would fail with a kvstore error
instead of the message it expects), the change plan, diffs and the transactions written.  The etcd round
trip: tests/lab/test_network_policy_module.py."""

from __future__ import annotations

import json
import os
import re
import textwrap

import pytest
from ansible.module_utils.testing import patch_module_args

from ansible_collections.clustermesh.core.plugins.module_utils.kvstore_client import KV
from ansible_collections.clustermesh.core.plugins.module_utils.kvstore_layout import POLICIES_PREFIX
from ansible_collections.clustermesh.core.plugins.module_utils.policy import (
    RESERVED_WORLD,
    PolicyRepository,
    encode_policy,
    load_policies,
    parse_policy,
)
from ansible_collections.clustermesh.core.plugins.modules import network_policy as M
from ansible_collections.clustermesh.core.tests.etcd_fixture import free_port
from ansible_collections.clustermesh.core.tests.policy_examples import ALLOW_CROSS_CLUSTER

CNP = ALLOW_CROSS_CLUSTER
CNP_REF = "default/CiliumNetworkPolicy/allow-cross-cluster"
CNP_KEY = POLICIES_PREFIX + CNP_REF
NP = {
    "apiVersion": "networking.k8s.io/v1",
    "kind": "NetworkPolicy",
    "metadata": {"name": "allow-cross-cluster", "namespace": "default"},
    "spec": {"podSelector": {}, "policyTypes": ["Ingress"]},
}
NP_REF = "default/NetworkPolicy/allow-cross-cluster"
NP_KEY = POLICIES_PREFIX + NP_REF
BAD_PROTOCOL = textwrap.dedent(
    """\
    apiVersion: cilium.io/v2
    kind: CiliumNetworkPolicy
    metadata: {name: bad}
    spec:
      endpointSelector: {}
      egress:
      - toPorts:
        - ports:
          - {port: "80", protocol: TCPP}
    """
)
PROTOCOL_ERROR = "spec.egress[0].toPorts[0].ports[0].protocol: 'TCPP' is not TCP, UDP or ANY"


def run(args, capsys):
    args = {"endpoints": [f"https://127.0.0.1:{free_port()}"], "timeout": 1.0, **args}
    with patch_module_args(args), pytest.raises(SystemExit) as exc:
        M.main()
    return exc.value.code, json.loads(capsys.readouterr().out)


def kv(key, value, mod_revision=5):
    return KV(key, value, 1, mod_revision, 1, 0)


# --------------------------------------------------------------------------------------------
# arguments and validation before anything is written
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "args, message",
    [
        ({}, "state=present needs src or definition"),
        ({"definition": [CNP], "name": "x"}, "mutually exclusive"),
        ({"name": "x"}, "use them with state=absent only"),
        ({"state": "absent"}, "state=absent needs src or definition"),
        ({"state": "absent", "definition": [CNP], "exclusive": True}, "exclusive applies to state=present only"),
        ({"state": "absent", "namespace": "default"}, "missing parameter(s) required by 'namespace': name"),
        ({"state": "absent", "name": "x", "kind": "Policy"}, "value of kind must be one of"),
        ({"state": "absent", "name": "X_1"}, "policy name 'X_1' is not a DNS subdomain"),
        ({"state": "absent", "name": "x", "namespace": "Prod"}, "namespace 'Prod' is not a DNS label"),
        ({"definition": 5}, "definition: must be a policy document (a dictionary), a list of them or YAML text"),
        ({"definition": [CNP, BAD_PROTOCOL]}, "definition[1] document 1: " + PROTOCOL_ERROR),
        ({"definition": {**CNP, "kind": "Policy"}}, "definition: kind: 'Policy' is not CiliumNetworkPolicy"),
        ({"definition": [CNP, NP, CNP]}, f"definition: {CNP_REF} is defined twice (also in definition)"),
        ({"definition": "spec: [unclosed"}, "definition: line 1 column 16: malformed YAML"),
        ({"src": ["/nonexistent/cmpm.yaml"]}, "src: cannot read /nonexistent/cmpm.yaml: No such file or directory"),
    ],
)
def test_invalid_input_fails_before_connecting(args, message, capsys):
    code, result = run(args, capsys)
    assert code == 1 and result["failed"]
    assert message in result["msg"], result["msg"]
    assert "kvstore" not in result["msg"]


def test_a_bad_file_is_named_with_the_path_in_the_document(tmp_path, capsys):
    good = tmp_path / "good.yaml"
    good.write_text(json.dumps(CNP))
    bad = tmp_path / "bad.yaml"
    bad.write_text(BAD_PROTOCOL)
    code, result = run({"src": [str(good), str(bad)]}, capsys)
    assert code == 1 and result["msg"].startswith(f"{bad} document 1: {PROTOCOL_ERROR}")


def test_the_same_policy_in_a_file_and_inline_is_refused(tmp_path, capsys):
    path = tmp_path / "p.yaml"
    path.write_text(json.dumps(CNP))
    code, result = run({"src": [str(path)], "definition": CNP}, capsys)
    assert code == 1 and result["msg"] == f"definition: {CNP_REF} is defined twice (also in {path})"


def test_valid_input_goes_on_to_the_kvstore(capsys):
    """Everything valid: the failure is the connection, not the input."""
    code, result = run({"definition": [CNP, NP]}, capsys)
    assert code == 1 and result["msg"].startswith("kvstore: ")


def test_kvstore_config_defaults_to_the_nodes_file(monkeypatch, tmp_path, capsys):
    missing = str(tmp_path / "kvstore.yaml")
    monkeypatch.setattr(M, "DEFAULT_KVSTORE_CONFIG", missing)
    with patch_module_args({"definition": CNP}), pytest.raises(SystemExit) as exc:
        M.main()
    result = json.loads(capsys.readouterr().out)
    assert (
        exc.value.code == 1
        and result["msg"] == f"kvstore_config: cannot read etcd config {missing}: No such file or directory"
    )


# --------------------------------------------------------------------------------------------
# reading the documents
# --------------------------------------------------------------------------------------------


def refs(policies):
    return [p.ref for p in policies]


def test_definition_forms():
    assert refs(M.wanted_policies(None, CNP)) == [CNP_REF]
    assert refs(M.wanted_policies(None, [CNP, NP])) == [CNP_REF, NP_REF]
    text = json.dumps(CNP) + "\n---\n" + json.dumps(NP)
    assert refs(M.wanted_policies(None, text)) == [CNP_REF, NP_REF]
    assert refs(M.wanted_policies(None, [json.dumps(CNP), NP])) == [CNP_REF, NP_REF]
    items = {"apiVersion": "v1", "kind": "List", "items": [CNP, NP]}
    assert refs(M.wanted_policies(None, items)) == [CNP_REF, NP_REF]
    typed = {"kind": "NetworkPolicyList", "items": [{k: v for k, v in NP.items() if k != "kind"}]}
    assert refs(M.wanted_policies(None, [typed])) == [NP_REF]
    assert M.wanted_policies(None, []) == [] and M.wanted_policies(None, "") == []
    # what from_yaml_all gives for a file: empty documents (None) and documents that are lists
    assert refs(M.wanted_policies(None, [None, [CNP, NP], None])) == [CNP_REF, NP_REF]


def test_src_files_and_directories(tmp_path):
    one = tmp_path / "one.yaml"
    one.write_text(json.dumps(CNP))
    policies_dir = tmp_path / "policies.d"
    policies_dir.mkdir()
    (policies_dir / "b.yml").write_text(json.dumps(NP))
    other = {**NP, "metadata": {"name": "a", "namespace": "prod"}}
    (policies_dir / "a.json").write_text(json.dumps(other))
    (policies_dir / "README.md").write_text("not a policy")
    (policies_dir / ".hidden.yaml").write_text("not: [yaml")
    found = refs(M.wanted_policies([str(one), str(policies_dir)], None))
    assert found == [CNP_REF, "prod/NetworkPolicy/a", NP_REF]


def test_a_file_that_is_not_utf8(tmp_path):
    path = tmp_path / "latin1.yaml"
    path.write_bytes(b"metadata: {name: caf\xe9}\n")
    with pytest.raises(M.InputError, match="is not UTF-8 text"):
        M.wanted_policies([str(path)], None)


# --------------------------------------------------------------------------------------------
# the plan
# --------------------------------------------------------------------------------------------


def policies(*documents):
    return [parse_policy(d) for d in documents]


def test_plan_writes_only_what_differs_byte_for_byte():
    cnp, np_ = policies(CNP, NP)
    stored = {CNP_KEY: kv(CNP_KEY, encode_policy(cnp)), NP_KEY: kv(NP_KEY, b'{"kind": "NetworkPolicy"}')}
    changes = M.plan_changes(stored, [cnp, np_], state="present")
    assert changes == [M.Change(NP_KEY, NP_REF, encode_policy(np_))]
    stored[NP_KEY] = kv(NP_KEY, encode_policy(np_))
    assert M.plan_changes(stored, [cnp, np_], state="present") == []
    assert M.plan_changes({}, [cnp], state="present") == [M.Change(CNP_KEY, CNP_REF, encode_policy(cnp))]


def test_plan_exclusive_removes_everything_not_given():
    (cnp,) = policies(CNP)
    junk = POLICIES_PREFIX + "junk"
    other = POLICIES_PREFIX + "prod/NetworkPolicy/a"
    stored = {CNP_KEY: kv(CNP_KEY, encode_policy(cnp)), other: kv(other, b"{}"), junk: kv(junk, b"x")}
    assert M.plan_changes(stored, [cnp], state="present") == []
    changes = M.plan_changes(stored, [cnp], state="present", exclusive=True)
    assert changes == [M.Change(junk, junk), M.Change(other, "prod/NetworkPolicy/a")]
    assert M.plan_changes(stored, [], state="present", exclusive=True) == [
        M.Change(CNP_KEY, CNP_REF),
        M.Change(junk, junk),
        M.Change(other, "prod/NetworkPolicy/a"),
    ]


def test_plan_absent_by_document_and_by_name():
    cnp, np_ = policies(CNP, NP)
    other = POLICIES_PREFIX + "prod/CiliumNetworkPolicy/allow-cross-cluster"
    junk = POLICIES_PREFIX + "junk"
    stored = {key: kv(key, b"{}") for key in (CNP_KEY, NP_KEY, other, junk)}
    assert M.plan_changes(stored, [np_], state="absent") == [M.Change(NP_KEY, NP_REF)]
    assert M.plan_changes({}, [np_], state="absent") == []
    # by name: kind omitted = every kind of that name in the namespace (default: "default")
    match = M.removal_match(None, None, "allow-cross-cluster")
    assert M.plan_changes(stored, [], state="absent", match=match) == [
        M.Change(CNP_KEY, CNP_REF),
        M.Change(NP_KEY, NP_REF),
    ]
    match = M.removal_match("prod", "CiliumNetworkPolicy", "allow-cross-cluster")
    assert M.plan_changes(stored, [], state="absent", match=match) == [
        M.Change(other, "prod/CiliumNetworkPolicy/allow-cross-cluster")
    ]
    match = M.removal_match("default", "NetworkPolicy", "nothing")
    assert M.plan_changes(stored, [], state="absent", match=match) == []


def test_diffs_show_stored_and_wanted_json():
    (cnp,) = policies(CNP)
    stored = {NP_KEY: kv(NP_KEY, b"not json")}
    diffs = M.diffs_of(stored, [M.Change(CNP_KEY, CNP_REF, encode_policy(cnp)), M.Change(NP_KEY, NP_REF)])
    assert diffs[0]["before_header"] == CNP_KEY + " (absent)" and diffs[0]["before"] == ""
    assert json.loads(diffs[0]["after"]) == cnp.document and '\n  "kind": "CiliumNetworkPolicy"' in diffs[0]["after"]
    assert diffs[1] == {
        "before_header": NP_KEY,
        "after_header": NP_KEY + " (removed)",
        "before": "not json\n",
        "after": "",
    }


# --------------------------------------------------------------------------------------------
# writing: guarded transactions within etcd's limits
# --------------------------------------------------------------------------------------------


def test_batches_respect_etcds_operation_and_size_limits():
    small = [M.Change(f"{POLICIES_PREFIX}ns/NetworkPolicy/p{i}", "r", b"{}") for i in range(300)]
    assert [len(b) for b in M.batches(small)] == [128, 128, 44]
    big = [M.Change(f"{POLICIES_PREFIX}ns/NetworkPolicy/p{i}", "r", b"x" * 400_000) for i in range(5)]
    assert [len(b) for b in M.batches(big)] == [2, 2, 1]
    assert list(M.batches([])) == []


class FakeClient:
    def __init__(self, answers):
        self.answers = list(answers)
        self.txns = []

    def _txn(self, compare, success, failure, *, op, key):
        self.txns.append((compare, success, failure))
        return self.answers.pop(0), None


def test_apply_writes_one_transaction_guarded_by_mod_revisions():
    (cnp,) = policies(CNP)
    stored = {CNP_KEY: kv(CNP_KEY, b"old", mod_revision=7), NP_KEY: kv(NP_KEY, b"{}", mod_revision=9)}
    changes = [M.Change(CNP_KEY, CNP_REF, encode_policy(cnp)), M.Change(NP_KEY, NP_REF)]
    new_key = POLICIES_PREFIX + "prod/NetworkPolicy/a"
    changes.append(M.Change(new_key, "prod/NetworkPolicy/a", b"{}"))
    client = FakeClient([True])
    assert M.apply_changes(client, stored, changes) is None
    ((compare, success, failure),) = client.txns
    assert [(c.key.decode(), c.mod_revision) for c in compare] == [(CNP_KEY, 7), (NP_KEY, 9), (new_key, 0)]
    assert success[0].request_put.key.decode() == CNP_KEY and success[0].request_put.value == encode_policy(cnp)
    assert success[1].request_delete_range.key.decode() == NP_KEY
    assert success[2].request_put.key.decode() == new_key and failure == []


def test_apply_reports_a_refused_transaction():
    changes = [M.Change(f"{POLICIES_PREFIX}ns/NetworkPolicy/p{i}", "r", b"{}") for i in range(200)]
    client = FakeClient([True, False])
    assert M.apply_changes(client, {}, changes) == f"{POLICIES_PREFIX}ns/NetworkPolicy/p128"
    assert len(client.txns) == 2


# --------------------------------------------------------------------------------------------
# docs/policy.md: its examples are valid and mean what the text says
# --------------------------------------------------------------------------------------------

DOCS = os.path.join(os.path.dirname(__file__), "..", "..", "..", "..", "docs", "policy.md")


def doc_policies():
    with open(DOCS, encoding="utf-8") as handle:
        blocks = re.findall(r"```yaml\n(.*?)```", handle.read(), re.S)
    found = {}
    for block in blocks:
        if block.startswith("- name:"):  # a task, not a policy
            continue
        for pol in load_policies(block, "docs/policy.md"):
            found[pol.ref] = pol
    return found


def labels(name, cluster, namespace="default"):
    return {
        "name": name,
        "io.cilium.k8s.policy.cluster": cluster,
        "io.kubernetes.pod.namespace": namespace,
        "io.cilium.k8s.namespace.labels.kubernetes.io/metadata.name": namespace,
    }


IDENTITIES = {
    1001: labels("x-wing", "cluster1"),
    1002: labels("rebel-base", "cluster1"),
    2001: labels("x-wing", "cluster2"),
    2002: labels("rebel-base", "cluster2"),
}


def repository(*policies):
    repo = PolicyRepository()
    for identity, identity_labels in IDENTITIES.items():
        repo.set_identity(identity, identity_labels)
    repo.set_policies(policies)
    return repo


def test_docs_examples_are_valid_and_mean_what_the_text_says():
    found = doc_policies()
    assert set(found) == {
        "default/CiliumNetworkPolicy/allow-cross-cluster",
        "default/CiliumNetworkPolicy/rebel-base-from-cluster1",
        "default/NetworkPolicy/rebel-base-from-cluster1",
        "default/CiliumNetworkPolicy/api",
    }
    # the seed, in cluster1: x-wing -> rebel-base of cluster2 only; rebel-base is not selected
    repo = repository(found["default/CiliumNetworkPolicy/allow-cross-cluster"])
    x_wing = repo.resolve(IDENTITIES[1001])
    assert x_wing.allows("egress", 2002, 80, 6) and not x_wing.allows("egress", 1002, 80, 6)
    assert not repo.resolve(IDENTITIES[1002]).egress_enforced
    # rebel-base in cluster2 accepts x-wing of cluster1 on TCP 80 only; the NetworkPolicy is the same
    for ref in (
        "default/CiliumNetworkPolicy/rebel-base-from-cluster1",
        "default/NetworkPolicy/rebel-base-from-cluster1",
    ):
        rebel_base = repository(found[ref]).resolve(IDENTITIES[2002])
        assert rebel_base.allows("ingress", 1001, 80, 6), ref
        assert not rebel_base.allows("ingress", 2001, 80, 6), ref
        assert not rebel_base.allows("ingress", 1001, 81, 6), ref
        assert not rebel_base.allows("ingress", 1001, 80, 17), ref


def test_docs_example_api_namespace_peers_port_range_and_cidr_except():
    repo = repository(doc_policies()["default/CiliumNetworkPolicy/api"])
    repo.set_identity(3001, labels("probe", "cluster2", namespace="empire"))
    api = repo.resolve({**labels("api-1", "cluster1"), "app": "api"})
    assert api.allows("ingress", 3001, 8080, 6) and api.allows("ingress", 3001, 8089, 6)
    assert not api.allows("ingress", 3001, 8090, 6) and not api.allows("ingress", 1001, 8080, 6)
    ten = repo.cidr_identities()["10.0.0.0/8"]
    assert api.allows("egress", RESERVED_WORLD, 443, 6) and not api.allows("egress", ten, 443, 6)
