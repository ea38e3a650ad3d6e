# -*- coding: utf-8 -*-
# Copyright: clustermesh.core contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""What the node agent writes into its cluster's kvstore: identities, node, ipcache, heartbeat, canaries.

Small synchronous functions over a :class:`kvstore_client.KVStoreClient`; the agent's loop
calls them.  Values are encoded by :mod:`mesh_state`, keys built by :mod:`kvstore_layout`.

**Identity allocation** (:class:`IdentityAllocator`, :func:`allocate_identity`): an endpoint's
labels plus ``io.cilium.k8s.policy.cluster=<cluster>`` give a canonical label string; the
identity with that string is reused, otherwise the lowest ID of the cluster's identity range
that has no ``cilium/state/identities/v1/id/<ID>`` key (as of the allocator's last scan) is
taken.  Taking it is one etcd transaction that creates both the ID key (value: the label
string, as Cilium writes it) and our reverse index

    cilium/clustermesh-core/identities/v1/labels/<sha256 hex of the label string>  ->  "<ID>"

only if neither exists.  So two agents never take one ID for different labels (the ID key
exists for the loser), and two agents asking for the same labels end with one ID (the index
exists for the loser, who then reads it).  The index is only a shortcut for this cluster's
agents: it is outside what remote clusters may read, and when it is missing or stale (an ID
key written by someone else, an identity deleted) the allocator falls back to scanning the
ID keys and repairs it.  Identities are not under a lease: they outlive an agent (garbage
collection of unused identities is not done here).

**Publishing with a lease**: the node record, the node's ipcache entries, ``cilium/.heartbeat``
and the synced canaries are written under the agent's lease (see
``KVStoreClient.lease_grant`` / ``keep_lease_alive``), so they vanish when the agent dies and
the lease expires.  Writers skip unchanged values (a rewrite would wake every watcher in the
mesh); :func:`withdraw_ipcache_entry` deletes only an entry held under the caller's lease.
"""

from __future__ import annotations

import datetime
import hashlib
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from . import kvstore_layout as layout
from .kvstore_client import KVStoreClient, Lease, _key_bytes, _lease_id, etcdrpc
from .mesh_model import DEFAULT_MAX_CONNECTED_CLUSTERS, cluster_identity_range
from .mesh_state import (
    IPCacheEntry,
    NodeRecord,
    StateError,
    encode_ipcache_entry,
    encode_node,
    identity_label_string,
)

IDENTITY_INDEX_PREFIX = layout.OWN_PREFIX + "identities/v1/labels/"
DEFAULT_MAX_ATTEMPTS = 32


class IdentityAllocationError(Exception):
    """No identity could be allocated: the range is full, or contention did not settle."""


def identity_index_key(label_string: str) -> str:
    """Our reverse index entry of a label string (see the module docstring)."""
    return IDENTITY_INDEX_PREFIX + hashlib.sha256(label_string.encode()).hexdigest()


# --------------------------------------------------------------------------------------------
# identities
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Allocation:
    id: int
    label_string: str
    created: bool  # True when this call created the identity


def _via_index(client: KVStoreClient, index_key: str, label_string: str, first: int, last: int) -> int | None:
    """The ID the index names if its ID key still holds ``label_string``; drops a stale index."""
    index = client.get(index_key)
    if index is None:
        return None
    try:
        number = int(index.value)
    except ValueError:
        number = None
    if number is not None and first <= number <= last:
        current = client.get(layout.identity_key(number))
        if current is not None and current.value == label_string.encode():
            return number
    client.delete_if_mod_revision(index_key, index.mod_revision)  # stale: repaired below
    return None


def _scan(client: KVStoreClient, first: int, last: int) -> dict[int, bytes]:
    """The identities of the range ``first..last``: ID -> label string as stored."""
    found: dict[int, bytes] = {}
    for kv in client.get_prefix(layout.IDENTITY_ID_PREFIX):
        try:
            number = layout.parse_identity_key(kv.key)
        except layout.KeyLayoutError:
            continue
        if first <= number <= last:
            found[number] = kv.value
    return found


def _create_both(client: KVStoreClient, id_key: str, index_key: str, label_string: str, number: int) -> bool:
    """One transaction: create the ID key and the index only if neither exists."""
    compare = [
        etcdrpc.Compare(
            key=_key_bytes(key), target=etcdrpc.Compare.CREATE, result=etcdrpc.Compare.EQUAL, create_revision=0
        )
        for key in (id_key, index_key)
    ]
    success = [
        client._put_op(id_key, label_string, None),
        client._put_op(index_key, str(number), None),
    ]
    ok, unused = client._txn(compare, success, [], op="allocate identity", key=id_key)
    return ok


class IdentityAllocator:
    """Allocates identities of one cluster, remembering the last scan of its ID keys.

    A label set already in the index costs two reads.  A new one needs the taken IDs: they come
    from the last full scan of ``cilium/state/identities/v1/id/`` (plus what this object created
    since), refreshed when a create transaction loses (someone else took the ID) or the scan is
    older than ``scan_max_age`` seconds.  Correctness does not depend on the cache (the
    transaction decides); only an identity written *without* our index by someone else within
    ``scan_max_age`` may be missed and get a second ID for the same labels.  Not thread-safe:
    one per agent loop (concurrent agents are safe against each other through etcd).
    """

    def __init__(
        self,
        client: KVStoreClient,
        cluster: str,
        cluster_id: int,
        *,
        max_connected: int = DEFAULT_MAX_CONNECTED_CLUSTERS,
        max_attempts: int = DEFAULT_MAX_ATTEMPTS,
        scan_max_age: float = 10.0,
    ):
        self.client = client
        self.cluster = layout.validate_cluster_name(cluster, "cluster")
        self.cluster_id = cluster_id
        self.first, self.last = cluster_identity_range(cluster_id, max_connected)
        self.max_attempts = max_attempts
        self.scan_max_age = scan_max_age
        self._known: dict[int, bytes] | None = None  # ID -> label string, from the last scan
        self._scanned_at = 0.0
        self._next = self.first  # no free ID below this one at the last scan
        self.scans = 0

    def _rescan(self) -> None:
        self._known = _scan(self.client, self.first, self.last)
        self._scanned_at = time.monotonic()
        self._next = self.first
        self.scans += 1

    def _lowest_free(self) -> int | None:
        number = self._next
        while number in self._known:
            number += 1
        self._next = number
        return number if number <= self.last else None

    def allocate(self, labels: Mapping[str, str] | None) -> Allocation:
        """Reuse or allocate the identity of ``labels`` (+ the cluster label) in the cluster's range.

        Raises :class:`mesh_state.StateError` for invalid labels, :class:`IdentityAllocationError`
        when the range is full or ``max_attempts`` transactions lost to other writers, and
        ``KVStoreError`` for etcd failures.
        """
        label_string = identity_label_string(self.cluster, labels)
        wanted = label_string.encode()
        index_key = identity_index_key(label_string)
        scans_before = self.scans
        for _attempt in range(self.max_attempts):
            number = _via_index(self.client, index_key, label_string, self.first, self.last)
            if number is not None:
                return Allocation(number, label_string, False)
            if self._known is None or time.monotonic() - self._scanned_at > self.scan_max_age:
                self._rescan()
            matches = [n for n, value in self._known.items() if value == wanted]
            if matches:
                number = min(matches)
                current = self.client.get(layout.identity_key(number))
                if current is not None and current.value == wanted:
                    self.client.put_if_absent(index_key, str(number))  # repair the shortcut
                    return Allocation(number, label_string, False)
                self._rescan()  # the cache was wrong: that identity is gone
                continue
            number = self._lowest_free()
            if number is None and self.scans == scans_before:
                self._rescan()  # identities may have been removed since the last scan
                number = self._lowest_free()
            if number is None:
                raise IdentityAllocationError(
                    f"identity range {self.first}..{self.last} of cluster {self.cluster!r} "
                    f"(ID {self.cluster_id}) is full; remove unused identities under {layout.IDENTITY_ID_PREFIX}"
                )
            if _create_both(self.client, layout.identity_key(number), index_key, label_string, number):
                self._known[number] = wanted
                return Allocation(number, label_string, True)
            self._rescan()  # lost: someone took the ID or the labels meanwhile
        raise IdentityAllocationError(
            f"could not allocate an identity for {label_string!r} in {self.max_attempts} attempts (too much contention)"
        )


def allocate_identity(
    client: KVStoreClient,
    cluster: str,
    cluster_id: int,
    labels: Mapping[str, str] | None,
    *,
    max_connected: int = DEFAULT_MAX_CONNECTED_CLUSTERS,
    max_attempts: int = DEFAULT_MAX_ATTEMPTS,
) -> Allocation:
    """One allocation with a fresh scan (see :class:`IdentityAllocator` for many)."""
    allocator = IdentityAllocator(client, cluster, cluster_id, max_connected=max_connected, max_attempts=max_attempts)
    return allocator.allocate(labels)


def lookup_identity(client: KVStoreClient, identity: int) -> str | None:
    """The label string stored for ``identity``, or None."""
    kv = client.get(layout.identity_key(identity))
    return None if kv is None else kv.value.decode("utf-8", "replace")


# --------------------------------------------------------------------------------------------
# publishing under a lease
# --------------------------------------------------------------------------------------------


def put_if_changed(client: KVStoreClient, key: str, value: bytes, lease: int | Lease | None = None) -> bool:
    """Write ``value`` under ``lease`` unless the key already holds exactly that under that lease.

    Returns True when it wrote.  The write is a compare-and-swap on the revision read, so the
    "unchanged" decision is never made on stale state; after repeated contention it writes
    anyway (the agent owns the key it publishes).
    """
    lease_id = _lease_id(lease)
    for _attempt in range(3):
        current = client.get(key)
        if current is not None and current.value == value and current.lease == lease_id:
            return False
        if client.put_if_mod_revision(key, value, current.mod_revision if current else 0, lease=lease_id):
            return True
    client.put(key, value, lease=lease_id)
    return True


def register_node(client: KVStoreClient, node: NodeRecord, lease: int | Lease) -> bool:
    """Write the node record to ``cilium/state/nodes/v1/<cluster>/<node>`` under ``lease``."""
    return put_if_changed(client, layout.node_key(node.cluster, node.name), encode_node(node), lease)


def publish_ipcache_entry(client: KVStoreClient, entry: IPCacheEntry, lease: int | Lease) -> bool:
    """Write the entry to ``cilium/state/ip/v1/default/<ip>`` under ``lease`` (the node's)."""
    return put_if_changed(client, layout.ip_key(entry.ip), encode_ipcache_entry(entry), lease)


def delete_if_ours(client: KVStoreClient, key: str, lease: int | Lease) -> bool:
    """Delete ``key`` only if it is held under ``lease`` and unchanged since read.  True when deleted."""
    current = client.get(key)
    if current is None or current.lease != _lease_id(lease):
        return False
    return client.delete_if_mod_revision(key, current.mod_revision)


def withdraw_ipcache_entry(client: KVStoreClient, ip: str, lease: int | Lease) -> bool:
    """Delete the ipcache entry of ``ip`` if it is held under ``lease`` (an IP re-used by another
    node meanwhile is left alone).  True when deleted."""
    try:
        key = layout.ip_key(ip)
    except layout.KeyLayoutError as exc:
        raise StateError(str(exc)) from None
    return delete_if_ours(client, key, lease)


def deregister_node(client: KVStoreClient, cluster: str, name: str, lease: int | Lease) -> bool:
    """Remove this node's record on a clean shutdown (if it is still under ``lease``)."""
    return delete_if_ours(client, layout.node_key(cluster, name), lease)


def write_heartbeat(
    client: KVStoreClient, lease: int | Lease | None = None, now: datetime.datetime | None = None
) -> None:
    """``cilium/.heartbeat`` = RFC 3339 now (always written: its age is what readers judge)."""
    client.put(layout.HEARTBEAT_KEY, layout.encode_timestamp(now), lease=_lease_id(lease))


def write_synced_canaries(
    client: KVStoreClient,
    cluster: str,
    prefixes: Iterable[str] = layout.SYNCED_STATE_PREFIXES,
    *,
    lease: int | Lease | None = None,
    now: datetime.datetime | None = None,
) -> list[str]:
    """After the initial sync: ``cilium/synced/<cluster>/<prefix>`` = RFC 3339 now for each prefix.

    Returns the keys written.
    """
    keys = [layout.synced_key(cluster, prefix) for prefix in prefixes]  # validate all first
    stamp = layout.encode_timestamp(now)
    for key in keys:
        client.put(key, stamp, lease=_lease_id(lease))
    return keys
