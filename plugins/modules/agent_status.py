#!/usr/bin/python
# -*- coding: utf-8 -*-
# Copyright: clustermesh.core contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)

from __future__ import annotations

DOCUMENTATION = r"""
module: agent_status
short_description: What the node agent meshd knows, read over its local API (optionally waiting for its sync)
description:
  - Asks the node agent C(meshd) on its unix socket (C(GET /v1/status), C(/v1/clusters), C(/v1/services),
    C(/v1/endpoints)) and returns the answers, the same data C(meshctl status|clusters|services|endpoints)
    prints.
  - With O(wait_synced=true) it waits until the agent reports C(synced) - the initial sync of the local
    kvstore and of every remote cluster is done (a remote cluster that does not sync within the agent's
    C(initial_sync_timeout) does not hold it back) and the BPF maps are written - and fails after O(timeout)
    seconds naming what is not synced yet (which remote clusters, connected or not, and their last error).
    While waiting, a socket that is not there yet (the agent is starting) is retried.
  - Without O(wait_synced) a missing socket fails at once (the agent is not running).
  - Read-only - it never changes anything (C(changed) is always false), so check mode runs it the same way.
version_added: 0.1.0
author:
  - clustermesh.core developers (@clustermesh)
extends_documentation_fragment:
  - ansible.builtin.action_common_attributes
options:
  socket:
    description: The agent's API socket (C(api_socket) of C(/etc/clustermesh/agent.yaml)).
    type: path
    default: /run/clustermesh/meshd.sock
  wait_synced:
    description: Wait until the agent reports C(synced), for at most O(timeout) seconds.
    type: bool
    default: false
  timeout:
    description:
      - Seconds. With O(wait_synced), how long to wait for the agent to be reachable and synced.
      - Each request must be answered within this time too (at most 10 seconds per request).
    type: float
    default: 30
attributes:
  check_mode:
    support: full
  diff_mode:
    support: none
  platform:
    platforms: posix
notes:
  - The socket is root's (mode 0600), so the module needs root on the node (C(become)).
seealso:
  - module: clustermesh.core.daemon
  - name: The node agent
    description: docs/agent.md of the collection (what meshd does, files, troubleshooting).
    link: https://github.com/clustermesh/clustermesh.core/blob/main/docs/agent.md
"""

EXAMPLES = r"""
- name: Wait until the agent has synced the local and every remote cluster into its maps
  clustermesh.core.agent_status:
    wait_synced: true
    timeout: 60

- name: Read what the agent knows
  clustermesh.core.agent_status:
  register: agent

- name: Show the remote clusters
  ansible.builtin.debug:
    msg: "{{ agent.clusters | map(attribute='name') | list }}"
"""

RETURN = r"""
agent:
  description:
    - The agent's status (C(GET /v1/status)). The keys below are always there; the agent may add more.
  returned: success, and on failure when the agent answered
  type: dict
  contains:
    synced:
      description: The initial sync of the local kvstore and every remote cluster is done and the maps are written.
      type: bool
    cluster:
      description: The node's cluster.
      type: str
    node:
      description: The node's name.
      type: str
    endpoints:
      description: Number of local endpoints (pods).
      type: int
    services:
      description: Number of services in the maps.
      type: int
    clusters:
      description: Remote cluster name to its state (C(connected), C(synced), C(last_error), ...).
      type: dict
    kvstore:
      description: The local kvstore - C(connected), C(listed) (initial listing done), C(last_error).
      type: dict
  sample:
    synced: true
    cluster: cluster1
    node: c1-n1
    endpoints: 2
    services: 1
    clusters: {cluster2: {connected: true, synced: true}}
    kvstore: {connected: true, listed: true, last_error: null}
synced:
  description: The agent's C(synced) flag.
  returned: success, and on failure when the agent answered
  type: bool
  sample: true
clusters:
  description: The remote clusters (C(GET /v1/clusters)), each with C(name), C(id), C(connected), C(synced), ...
  returned: success
  type: list
  elements: dict
  sample: [{name: cluster2, id: 2, connected: true, synced: true, failures: 0}]
services:
  description: The services the agent load-balances (C(GET /v1/services)) with their backends.
  returned: success
  type: list
  elements: dict
  sample: [{namespace: default, name: rebel-base, frontend: "172.30.1.10:80/TCP", backends: []}]
endpoints:
  description: The local endpoints (C(GET /v1/endpoints)), sorted by IP.
  returned: success
  type: list
  elements: dict
  sample: [{containerID: 3e93df9ab, ifname: eth0, ip: 10.1.0.2, labels: {app: web}}]
waited:
  description: Seconds spent waiting for the agent (0 without O(wait_synced)).
  returned: always
  type: float
  sample: 1.25
socket:
  description: The socket asked.
  returned: always
  type: str
  sample: /run/clustermesh/meshd.sock
"""

import time

from ansible.module_utils.basic import AnsibleModule

from ansible_collections.clustermesh.core.plugins.module_utils.agent_api import (
    DEFAULT_SOCKET,
    AgentClient,
    AgentRequestError,
    AgentUnreachable,
)

POLL_INTERVAL = 0.2  # seconds between status requests while waiting
MAX_REQUEST_TIMEOUT = 10.0
LOG_HINT = "see /var/log/clustermesh/meshd.log (or journalctl -u clustermesh-meshd)"


class AgentStatusError(Exception):
    """The module fails: ``msg`` and what is known so far (``result``)."""

    def __init__(self, msg, **result):
        super().__init__(msg)
        self.msg = msg
        self.result = result


def not_synced(status):
    """What the agent reports as not synced yet, one description each (never empty)."""
    pending = []
    kvstore = status.get("kvstore")
    if isinstance(kvstore, dict) and (kvstore.get("listed") is False or kvstore.get("connected") is False):
        text = "the local kvstore (%s)" % ("connected, not listed yet" if kvstore.get("connected") else "not connected")
        if kvstore.get("last_error"):
            text += ": %s" % kvstore["last_error"]
        pending.append(text)
    clusters = status.get("clusters")
    if isinstance(clusters, list):  # tolerate the list form of /v1/clusters
        clusters = {c.get("name", "?"): c for c in clusters if isinstance(c, dict)}
    for name in sorted(clusters or {}) if isinstance(clusters, dict) else ():
        state = clusters[name] if isinstance(clusters[name], dict) else {}
        if state.get("synced"):
            continue
        text = "cluster %s (%s)" % (name, "connected, not synced" if state.get("connected") else "not connected")
        if state.get("last_error"):
            text += ": %s" % state["last_error"]
        pending.append(text)
    for key in sorted(status):  # other parts the agent reports with their own flag (e.g. the local kvstore)
        value = status[key]
        if key not in ("clusters", "kvstore") and isinstance(value, dict) and value.get("synced") is False:
            pending.append("%s (not synced)" % key)
    if not pending:
        pending.append("the local kvstore or the BPF maps (every remote cluster is synced)")
    return pending


def run(params, clock=time.monotonic, sleep=time.sleep):
    """The module's result for ``params`` (socket, wait_synced, timeout); AgentStatusError when it fails."""
    socket_path, wait, timeout = params["socket"], params["wait_synced"], params["timeout"]
    if timeout <= 0:
        raise AgentStatusError("timeout: must be a positive number of seconds, got %s" % timeout, socket=socket_path)
    client = AgentClient(socket_path, timeout=min(timeout, MAX_REQUEST_TIMEOUT))
    started = clock()
    deadline = started + timeout
    status = None
    unreachable = None
    while True:
        try:
            status = client.status()
            unreachable = None
        except AgentUnreachable as exc:
            if not wait:
                raise AgentStatusError(
                    "%s; is the agent meshd running on this node? (role clustermesh.core.agent starts it; %s)"
                    % (exc, LOG_HINT),
                    socket=socket_path,
                    waited=0.0,
                ) from None
            unreachable = exc
        except AgentRequestError as exc:
            raise AgentStatusError(
                "the agent on %s refused GET /v1/status: %s" % (socket_path, exc), socket=socket_path
            ) from None
        if not isinstance(status, (dict, type(None))):
            raise AgentStatusError(
                "the agent on %s answered GET /v1/status with %r, not an object" % (socket_path, status),
                socket=socket_path,
            )
        if not wait or (status is not None and status.get("synced") is True):
            break
        now = clock()
        if now >= deadline:
            waited = round(now - started, 3)
            if status is None or unreachable is not None:
                raise AgentStatusError(
                    "the agent did not answer within %gs: %s; %s" % (timeout, unreachable, LOG_HINT),
                    socket=socket_path,
                    waited=waited,
                    **({"agent": status} if status is not None else {}),
                )
            raise AgentStatusError(
                "the agent on %s is not synced after %gs; not synced yet: %s. `meshctl clusters` shows every "
                "cluster's state; %s" % (socket_path, timeout, "; ".join(not_synced(status)), LOG_HINT),
                socket=socket_path,
                waited=waited,
                agent=status,
                synced=False,
            )
        sleep(min(POLL_INTERVAL, max(0.0, deadline - now)))
    waited = round(clock() - started, 3) if wait else 0.0
    try:
        lists = {name: getattr(client, name)() for name in ("clusters", "services", "endpoints")}
    except (AgentUnreachable, AgentRequestError) as exc:
        raise AgentStatusError(
            "the agent on %s answered its status but then failed: %s" % (socket_path, exc),
            socket=socket_path,
            waited=waited,
            agent=status,
        ) from None
    return dict(
        changed=False,
        agent=status,
        synced=status.get("synced") is True,
        socket=socket_path,
        waited=waited,
        **lists,
    )


def main():
    module = AnsibleModule(
        argument_spec=dict(
            socket=dict(type="path", default=DEFAULT_SOCKET),
            wait_synced=dict(type="bool", default=False),
            timeout=dict(type="float", default=30.0),
        ),
        supports_check_mode=True,
    )
    try:
        result = run(module.params)
    except AgentStatusError as exc:
        module.fail_json(msg=exc.msg, changed=False, **exc.result)
    module.exit_json(**result)


if __name__ == "__main__":
    main()
