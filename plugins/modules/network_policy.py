#!/usr/bin/python
# -*- coding: utf-8 -*-
# Copyright: clustermesh.core contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)

from __future__ import annotations

DOCUMENTATION = r"""
module: network_policy
short_description: Import network policies into a cluster's kvstore, or remove them
description:
  - Imports CiliumNetworkPolicy (C(cilium.io/v2)) and Kubernetes NetworkPolicy (C(networking.k8s.io/v1))
    documents into the cluster's own kvstore, one key per policy,
    C(cilium/clustermesh-core/policies/v1/<namespace>/<Kind>/<name>), whose value is the policy as
    canonical JSON. The node agents of the cluster watch that prefix and enforce the policies on the
    cluster's endpoints, against the identities of every connected cluster (see docs/policy.md).
  - Policies are not propagated - each cluster imports the policies it wants, and remote clusters cannot
    read them (their etcd role may read C(cilium/state/) and a few keys only).
  - The documents come from files on the managed node (O(src)) and/or inline (O(definition)). Every
    document is parsed and validated before anything is written; on the first error the module fails
    with a message naming the file or item and the path in the document, for example
    C(definition[0] - spec.egress[0].toPorts[0].ports[0].protocol - 'TCPP' is not TCP, UDP or ANY), and
    writes nothing.
  - All changes of one run are written in one etcd transaction (several when more than 128 keys change),
    which fails without writing anything when one of the keys was changed by someone else meanwhile.
  - Idempotent - the stored value is compared byte for byte with the canonical JSON of the wanted policy;
    nothing is written when they are equal.
version_added: 0.1.0
author:
  - clustermesh.core developers (@clustermesh)
extends_documentation_fragment:
  - ansible.builtin.action_common_attributes
  - clustermesh.core.kvstore
options:
  kvstore_config:
    description:
      - Path on the node of a Cilium etcd-config YAML (C(endpoints), C(trusted-ca-file), C(cert-file),
        C(key-file)).
      - Default - C(/etc/clustermesh/kvstore.yaml) (written by C(clustermesh.core.mesh_join)) unless
        O(endpoints) is given.
      - Mutually exclusive with O(endpoints).
    type: path
  src:
    description:
      - Paths on the managed node of YAML files holding policies - one or many documents per file
        (separated by C(---)), each a policy, a list of policies, or a C(List) (or
        C(CiliumNetworkPolicyList), C(NetworkPolicyList)) with C(items).
      - A directory stands for its C(*.yaml), C(*.yml) and C(*.json) files, in name order.
      - Combined with O(definition) when both are given. A policy (namespace, kind, name) may be
        defined once only.
    type: list
    elements: path
  definition:
    description:
      - Policies inline - a policy document (a dictionary), a list of them, or YAML text in the format of
        O(src).
    type: raw
  state:
    description:
      - V(present) - the given policies are stored (created or updated).
      - V(absent) - the given policies (by O(src)/O(definition), or by O(name)) are removed.
    type: str
    choices: [present, absent]
    default: present
  exclusive:
    description:
      - With O(state=present), also remove every policy of the cluster that is not given, in every
        namespace - the cluster then has exactly these policies. With an empty O(definition) this removes
        all policies of the cluster.
    type: bool
    default: false
  name:
    description:
      - With O(state=absent), remove the policy of this name (in O(namespace), of O(kind)) without giving
        its document. Mutually exclusive with O(src) and O(definition).
    type: str
  namespace:
    description: Namespace of the policy O(name). Default - C(default), as for documents without one.
    type: str
  kind:
    description: Kind of the policy O(name). Default - every kind (both a CiliumNetworkPolicy and a
      NetworkPolicy of that name are removed).
    type: str
    choices: [CiliumNetworkPolicy, NetworkPolicy]
requirements:
  - grpcio, etcd-sdk-python and PyYAML (the etcd client) on the node
attributes:
  platform:
    platforms: posix
  check_mode:
    support: full
  diff_mode:
    support: full
    details: One diff per policy key that changes, showing the stored and the wanted JSON.
seealso:
  - module: clustermesh.core.global_service
notes:
  - Run it on one node of the cluster (C(run_once)); the policies are cluster-wide.
  - Selectors may name a cluster with the label C(io.cilium.k8s.policy.cluster) (or
    C(k8s:io.cilium.k8s.policy.cluster)); a selector without it matches endpoints of every cluster.
"""

EXAMPLES = r"""
- name: Let x-wing of cluster1 reach rebel-base of cluster2 only (the seed's example)
  clustermesh.core.network_policy:
    definition:
      apiVersion: cilium.io/v2
      kind: CiliumNetworkPolicy
      metadata:
        name: allow-cross-cluster
      spec:
        endpointSelector:
          matchLabels: {name: x-wing, io.cilium.k8s.policy.cluster: cluster1}
        egress:
          - toEndpoints:
              - matchLabels: {name: rebel-base, io.cilium.k8s.policy.cluster: cluster2}
  run_once: true

- name: Import the policies of files copied to the node before
  clustermesh.core.network_policy:
    src:
      - /etc/clustermesh/policies/rebel-base.yaml
      - /etc/clustermesh/policies/extra.d
  run_once: true

- name: This cluster has exactly the policies of one file (any other is removed)
  clustermesh.core.network_policy:
    definition: "{{ lookup('ansible.builtin.file', 'policies/cluster1.yaml') }}"
    exclusive: true
  run_once: true

- name: Remove one policy by name
  clustermesh.core.network_policy:
    namespace: default
    kind: CiliumNetworkPolicy
    name: allow-cross-cluster
    state: absent
  run_once: true

- name: Remove every policy of the cluster
  clustermesh.core.network_policy:
    definition: []
    exclusive: true
  run_once: true
"""

RETURN = r"""
policies:
  description:
    - The policies given (C(<namespace>/<Kind>/<name>)), in the order given, all stored after the run.
    - Empty with O(state=absent).
  returned: always
  type: list
  elements: str
  sample: [default/CiliumNetworkPolicy/allow-cross-cluster]
written:
  description: The policies created or changed (would be, in check mode).
  returned: always
  type: list
  elements: str
  sample: [default/CiliumNetworkPolicy/allow-cross-cluster]
removed:
  description:
    - The policies removed (would be, in check mode) - with O(state=absent), or not given with O(exclusive).
    - A key under the policies prefix that is not a valid policy key is listed (and removed by O(exclusive)) as
      the key itself.
  returned: always
  type: list
  elements: str
  sample: [default/NetworkPolicy/allow-old]
prefix:
  description: The kvstore prefix of the cluster's policies.
  returned: always
  type: str
  sample: cilium/clustermesh-core/policies/v1/
"""

import json
import os
from typing import NamedTuple

from ansible.module_utils.basic import AnsibleModule

from ansible_collections.clustermesh.core.plugins.module_utils import kvstore_client, kvstore_config, policy
from ansible_collections.clustermesh.core.plugins.module_utils.kvstore_client import KVStoreError
from ansible_collections.clustermesh.core.plugins.module_utils.kvstore_config import KVStoreConfigError
from ansible_collections.clustermesh.core.plugins.module_utils.kvstore_connection import (
    CONNECTION_ARGUMENT_SPEC,
    CONNECTION_MUTUALLY_EXCLUSIVE,
    client_from_params,
)
from ansible_collections.clustermesh.core.plugins.module_utils.kvstore_layout import (
    POLICIES_PREFIX,
    POLICY_KINDS,
    KeyLayoutError,
    parse_policy_key,
    policies_prefix,
    policy_key,
    validate_policy_name,
)
from ansible_collections.clustermesh.core.plugins.module_utils.policy import (
    PolicyError,
    encode_policy,
    load_policies,
    parse_policy,
)
from ansible_collections.clustermesh.core.plugins.module_utils.requirements import missing_requirements

DEFAULT_KVSTORE_CONFIG = "/etc/clustermesh/kvstore.yaml"
SRC_SUFFIXES = (".yaml", ".yml", ".json")
# etcd refuses a transaction with more than --max-txn-ops (default 128) compares or operations,
# or a request above --max-request-bytes (default 1.5 MiB).
TXN_MAX_OPS = 128
TXN_MAX_BYTES = 1024 * 1024

ARGUMENT_SPEC = dict(
    src=dict(type="list", elements="path"),
    definition=dict(type="raw"),
    state=dict(type="str", default="present", choices=["present", "absent"]),
    exclusive=dict(type="bool", default=False),
    name=dict(type="str"),
    namespace=dict(type="str"),
    kind=dict(type="str", choices=list(POLICY_KINDS)),
    **CONNECTION_ARGUMENT_SPEC,
)


class InputError(ValueError):
    """The module's input is invalid (message names the option, file or document path)."""


class Change(NamedTuple):
    """One key to write (``value``: the canonical JSON) or to delete (``value`` None)."""

    key: str
    ref: str
    value: bytes | None = None


# --------------------------------------------------------------------------------------------
# reading the wanted policies (no kvstore access)
# --------------------------------------------------------------------------------------------


def _src_files(path):
    if os.path.isdir(path):
        try:
            names = sorted(os.listdir(path))
        except OSError as exc:
            raise InputError(f"src: cannot read the directory {path}: {exc.strerror}") from None
        return [os.path.join(path, n) for n in names if n.endswith(SRC_SUFFIXES) and not n.startswith(".")]
    return [path]


def _read_src(path):
    try:
        with open(path, "rb") as handle:
            data = handle.read()
    except OSError as exc:
        raise InputError(f"src: cannot read {path}: {exc.strerror}") from None
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        raise InputError(f"src: {path} is not UTF-8 text") from None


def _is_list_document(document):
    kind = document.get("kind") if isinstance(document, dict) else None
    return isinstance(kind, str) and kind.endswith("List")


def _definition_policies(definition):
    """Policies of the option ``definition``: a document, a list of documents, or YAML text."""
    if isinstance(definition, str):
        return load_policies(definition, "definition")
    if isinstance(definition, dict):
        items = [("definition", definition)]
    elif isinstance(definition, list):
        items = [(f"definition[{index}]", item) for index, item in enumerate(definition)]
    else:
        raise InputError(
            f"definition: must be a policy document (a dictionary), a list of them or YAML text, "
            f"got {type(definition).__name__}"
        )
    policies = []
    for where, item in items:
        if item is None:  # an empty YAML document (from_yaml_all of a file ending in ---), as in a file
            continue
        if isinstance(item, str):  # a list of YAML texts
            policies.extend(load_policies(item, where))
        elif isinstance(item, list) or _is_list_document(item):  # a list, or kind List / <Kind>List with items
            try:
                text = json.dumps(item)
            except (TypeError, ValueError) as exc:
                raise InputError(f"{where}: not a JSON-like document: {exc}") from None
            policies.extend(load_policies(text, where))
        else:
            policies.append(parse_policy(item, where))
    return policies


def wanted_policies(src, definition):
    """Every policy given, validated, in order; raises PolicyError/InputError naming where.

    A policy (namespace, kind, name) given twice is an error, as within one file."""
    found = []  # (where, policy)
    for path in src or ():
        for file_path in _src_files(path):
            found.extend((file_path, p) for p in load_policies(_read_src(file_path), file_path))
    if definition is not None:
        found.extend(("definition", p) for p in _definition_policies(definition))
    seen = {}
    result = []
    for where, pol in found:
        if pol.ref in seen:
            raise InputError(f"{where}: {pol.ref} is defined twice (also in {seen[pol.ref]})")
        seen[pol.ref] = where
        result.append(pol)
    return result


def removal_match(namespace, kind, name):
    """A predicate on PolicyKey for state=absent by name."""
    namespace = namespace or "default"
    policies_prefix(namespace)  # validates the namespace
    validate_policy_name(name)
    return lambda key: key.namespace == namespace and key.name == name and (kind is None or key.kind == kind)


# --------------------------------------------------------------------------------------------
# the plan: what to write and what to remove, from the stored keys
# --------------------------------------------------------------------------------------------


def _ref_of(key):
    try:
        return parse_policy_key(key).ref
    except KeyLayoutError:
        return key


def plan_changes(stored, wanted, *, state, exclusive=False, match=None):
    """The changes that bring the stored policies to what is asked: a list of Change, the writes
    first (in the order given), then the deletions (by key).

    ``stored`` maps every key under the policies prefix to its KV; ``wanted`` is a list of Policy;
    ``match`` (state=absent) selects more keys to delete by their PolicyKey.
    """
    wanted_keys = {policy_key(pol.namespace, pol.kind, pol.name): pol for pol in wanted}
    changes = []
    if state == "present":
        for key, pol in wanted_keys.items():
            value = encode_policy(pol)
            current = stored.get(key)
            if current is None or current.value != value:
                changes.append(Change(key, pol.ref, value))
        if exclusive:
            changes.extend(Change(key, _ref_of(key)) for key in sorted(stored) if key not in wanted_keys)
        return changes
    for key in sorted(stored):
        if key in wanted_keys:
            changes.append(Change(key, _ref_of(key)))
        elif match is not None:
            try:
                parsed = parse_policy_key(key)
            except KeyLayoutError:
                continue
            if match(parsed):
                changes.append(Change(key, parsed.ref))
    return changes


def _diff_text(value):
    if value is None:
        return ""
    text = value.decode("utf-8", "replace") if isinstance(value, bytes) else value
    try:
        return json.dumps(json.loads(text), indent=2, sort_keys=True, ensure_ascii=False) + "\n"
    except ValueError:
        return text + "\n"


def diffs_of(stored, changes):
    """Ansible diffs, one per changed key: the stored and the wanted JSON (pretty-printed)."""
    result = []
    for change in changes:
        current = stored.get(change.key)
        before_header = change.key if current is not None else f"{change.key} (absent)"
        after_header = change.key if change.value is not None else f"{change.key} (removed)"
        result.append(
            dict(
                before_header=before_header,
                after_header=after_header,
                before=_diff_text(current.value if current is not None else None),
                after=_diff_text(change.value),
            )
        )
    return result


# --------------------------------------------------------------------------------------------
# writing
# --------------------------------------------------------------------------------------------


def batches(changes):
    """Split the changes into transactions within etcd's limits (operations and request size)."""
    batch, size = [], 0
    for change in changes:
        change_size = len(change.key) * 2 + len(change.value or b"") + 64
        if batch and (len(batch) >= TXN_MAX_OPS or size + change_size > TXN_MAX_BYTES):
            yield batch
            batch, size = [], 0
        batch.append(change)
        size += change_size
    if batch:
        yield batch


def apply_changes(client, stored, changes):
    """Write the changes in etcd transactions, each guarded by the mod revision every one of its
    keys had when it was read (0: absent).  Returns None, or the first key of a transaction that
    etcd refused because one of its keys was changed meanwhile (that transaction wrote nothing)."""
    etcdrpc = kvstore_client.etcdrpc
    for batch in batches(changes):
        compare, success = [], []
        for change in batch:
            key = change.key.encode()
            current = stored.get(change.key)
            compare.append(
                etcdrpc.Compare(
                    key=key,
                    target=etcdrpc.Compare.MOD,
                    result=etcdrpc.Compare.EQUAL,
                    mod_revision=current.mod_revision if current is not None else 0,
                )
            )
            if change.value is None:
                success.append(etcdrpc.RequestOp(request_delete_range=etcdrpc.DeleteRangeRequest(key=key)))
            else:
                success.append(etcdrpc.RequestOp(request_put=etcdrpc.PutRequest(key=key, value=change.value)))
        # the client's transaction primitive (as agent_kvstore uses it): one Txn RPC, not retried
        ok, unused = client._txn(compare, success, [], op="network_policy", key=batch[0].key)
        if not ok:
            return batch[0].key
    return None


def main():
    module = AnsibleModule(
        argument_spec=ARGUMENT_SPEC,
        mutually_exclusive=CONNECTION_MUTUALLY_EXCLUSIVE + [("name", "src"), ("name", "definition")],
        required_by={"namespace": "name", "kind": "name"},
        supports_check_mode=True,
    )
    p = module.params
    missing = missing_requirements(kvstore_client, kvstore_config, policy)
    if missing:
        module.fail_json(msg=missing)
    state = p["state"]
    given = p["src"] is not None or p["definition"] is not None
    if state == "present" and p["name"] is not None:
        module.fail_json(msg="name, namespace and kind select a policy to remove: use them with state=absent only")
    if state == "present" and not given:
        module.fail_json(msg="state=present needs src or definition (definition: [] with exclusive: true removes all)")
    if state == "absent" and not given and p["name"] is None:
        module.fail_json(msg="state=absent needs src or definition (the policies to remove) or name")
    if state == "absent" and p["exclusive"]:
        module.fail_json(msg="exclusive applies to state=present only")
    if not p["kvstore_config"] and not p["endpoints"]:
        p["kvstore_config"] = DEFAULT_KVSTORE_CONFIG

    try:
        wanted = wanted_policies(p["src"], p["definition"])
        match = removal_match(p["namespace"], p["kind"], p["name"]) if p["name"] is not None else None
    except (PolicyError, InputError, KeyLayoutError) as exc:
        module.fail_json(msg=str(exc))

    try:
        with client_from_params(p) as client:
            stored = client.get_prefix(POLICIES_PREFIX).as_dict()
            changes = plan_changes(stored, wanted, state=state, exclusive=p["exclusive"], match=match)
            if changes and not module.check_mode:
                conflict = apply_changes(client, stored, changes)
                if conflict is not None:
                    module.fail_json(
                        msg=f"{conflict} was changed by someone else meanwhile; nothing of that transaction "
                        "was written; run again",
                        key=conflict,
                    )
    except KVStoreError as exc:
        module.fail_json(msg=f"kvstore: {exc}")
    except KVStoreConfigError as exc:  # kvstore_config's own error (the file is missing or invalid)
        module.fail_json(msg=f"kvstore_config: {exc}")

    result = dict(
        changed=bool(changes),
        policies=[pol.ref for pol in wanted] if state == "present" else [],
        written=[change.ref for change in changes if change.value is not None],
        removed=[change.ref for change in changes if change.value is None],
        prefix=POLICIES_PREFIX,
    )
    if module._diff:
        result["diff"] = diffs_of(stored, changes)
    module.exit_json(**result)


if __name__ == "__main__":
    main()
