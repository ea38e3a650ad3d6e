#!/usr/bin/python
# -*- coding: utf-8 -*-
# Copyright: clustermesh.core contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)

from __future__ import annotations

DOCUMENTATION = r"""
module: pod_probe
short_description: Run connectivity checks from a pod, and the echo server they talk to
description:
  - With O(server=started), starts (once) a small TCP echo server inside the pod's network namespace. It
    answers every connection with one JSON line naming itself and the client address it saw. It runs
    detached, with a pidfile in C(/run/clustermesh/probe/); O(server=stopped) stops exactly that process.
  - With O(targets), checks each target from inside the pod's network namespace, so the checks take the
    pod's own routes - ICMP echo (O(icmp_count) requests) and a TCP connection to the target's echo server.
    A target passes when both answer and the server saw the pod's own IP (O(source_ip)) as the client,
    that is, nothing NATed the traffic.
  - A target may say, per protocol, that its path is expected to be denied (O(targets[].expect)). Such a
    protocol passes when it gets no answer within O(deny_timeout) - no ICMP echo reply, no completed TCP
    handshake - and fails when it answers. RV(results[].observed) tells what each protocol did.
  - With O(services), opens O(services[].count) TCP connections from the pod to each service's ClusterIP
    (load-balanced by the node agent's datapath to echo servers); a service passes when every connection is
    answered, no server saw another client address than O(source_ip), and every address in
    O(services[].expect) answered at least once.
  - Checks never change anything; only starting or stopping the server reports C(changed).
  - Used by C(playbooks/connectivity.yml), which prints the matrix of every pod to every other pod.
version_added: 0.1.0
author:
  - clustermesh.core developers (@clustermesh)
extends_documentation_fragment:
  - ansible.builtin.action_common_attributes
attributes:
  check_mode:
    support: full
    details: In check mode the server is not started or stopped; checks still run (they change nothing).
  diff_mode:
    support: none
  platform:
    platforms: posix
options:
  pod:
    description: The pod's name; names the server's pidfile.
    type: str
    required: true
  netns:
    description: Path of the pod's network namespace (what the CNI plugin got as C(CNI_NETNS)).
    type: path
    required: true
  source_ip:
    description: The pod's own IP. A target whose server saw another client address fails as NATed.
    type: str
  server:
    description: Start or stop the pod's echo server. Omit to leave it as it is.
    type: str
    choices: [started, stopped]
  port:
    description: TCP port of the echo servers.
    type: int
    default: 8080
  targets:
    description: What to check from this pod.
    type: list
    elements: dict
    default: []
    suboptions:
      name:
        description: Name shown in the results (usually the target pod's node).
        type: str
        required: true
      ip:
        description: The target's IPv4 address.
        type: str
        required: true
      port:
        description: The target's echo server port (default O(port)).
        type: int
      expect:
        description: What the path should do per protocol; a protocol not given is expected to be allowed.
        type: dict
        suboptions:
          icmp:
            description: Whether ICMP echo requests to the target should be answered.
            type: str
            choices: [allow, deny]
            default: allow
          tcp:
            description: Whether a TCP connection to the target's echo server should be accepted.
            type: str
            choices: [allow, deny]
            default: allow
  services:
    description: ClusterIPs to check from this pod (see the description).
    type: list
    elements: dict
    default: []
    suboptions:
      name:
        description: Name shown in the results (usually the service's cluster).
        type: str
        required: true
      ip:
        description: The ClusterIP.
        type: str
        required: true
      port:
        description: The service port (default O(port)).
        type: int
      count:
        description: Connections to open.
        type: int
        default: 20
      expect:
        description: Backend addresses that must each answer at least once.
        type: list
        elements: str
        default: []
  icmp_count:
    description: ICMP echo requests per target.
    type: int
    default: 3
  timeout:
    description: Seconds to wait for each reply.
    type: float
    default: 1.0
  deny_timeout:
    description:
      - Seconds a protocol expected to be denied is given to answer anyway. Its ICMP requests go out
        together and any reply counts; its TCP connection gets one SYN (the kernel retransmits after 1 s).
      - Paths in a mesh answer in milliseconds, so 1 s is a wide margin that keeps a matrix of denials quick
        (targets are checked in parallel).
    type: float
    default: 1.0
"""

EXAMPLES = r"""
- name: Start the echo server in the probe pod
  clustermesh.core.pod_probe:
    pod: cm-probe
    netns: /run/netns/cm-probe
    server: started

- name: Check the other pods
  clustermesh.core.pod_probe:
    pod: cm-probe
    netns: /run/netns/cm-probe
    source_ip: 10.1.0.2
    targets:
      - {name: c2-n1, ip: 10.2.0.2}
      - {name: c2-n2, ip: 10.2.1.2, expect: {tcp: deny, icmp: deny}}
  register: probe

- name: Check the cluster's ClusterIP of a global service reaches all four backends
  clustermesh.core.pod_probe:
    pod: cm-probe
    netns: /run/netns/cm-probe
    source_ip: 10.1.0.2
    services:
      - {name: cluster1, ip: 172.30.1.254, count: 40, expect: [10.1.0.2, 10.1.1.2, 10.2.0.2, 10.2.1.2]}
"""

RETURN = r"""
server_pid:
  description: PID of the pod's echo server, when it runs.
  returned: always
  type: int
  sample: 4242
results:
  description: One entry per target, in O(targets) order.
  returned: always
  type: list
  elements: dict
  contains:
    name:
      description: The target's name.
      type: str
    ip:
      description: The target's address.
      type: str
    ok:
      description: >-
        Each protocol did what O(targets[].expect) says - by default ICMP and TCP answered and the server saw
        O(source_ip).
      type: bool
    expect:
      description: The expectation checked, C({icmp, tcp}) of C(allow) or C(deny).
      type: dict
    observed:
      description: >-
        What each protocol did, C({icmp, tcp}) - C(allow) when it answered (an echo reply; a completed TCP
        handshake), else C(deny).
      type: dict
    icmp:
      description: C(ok), C(sent), C(received), C(rtt_ms) (median), C(detail).
      type: dict
    tcp:
      description: >-
        C(ok), C(connected) (the handshake completed), C(rtt_ms) (connect time), C(reply) (the server's JSON
        line), C(detail).
      type: dict
    source_seen:
      description: The client address the server saw.
      type: str
    nat:
      description: The server saw another address than O(source_ip).
      type: bool
service_results:
  description: One entry per service, in O(services) order.
  returned: always
  type: list
  elements: dict
  contains:
    name:
      description: The service's name.
      type: str
    ip:
      description: The ClusterIP.
      type: str
    ok:
      description: Every connection answered, no NAT, every expected backend answered.
      type: bool
    backends:
      description: Backend address (as the echo server saw itself) -> number of answers.
      type: dict
    failures:
      description: Why connections failed.
      type: list
      elements: str
    missing:
      description: Expected backends that never answered.
      type: list
      elements: str
    nat:
      description: Client addresses the servers saw other than O(source_ip).
      type: list
      elements: str
"""

from ansible.module_utils.basic import AnsibleModule

from ansible_collections.clustermesh.core.plugins.module_utils.probe import (
    ProbeError,
    check_services,
    check_targets,
    server_pid,
    start_server,
    stop_server,
)


def main():
    module = AnsibleModule(
        argument_spec=dict(
            pod=dict(type="str", required=True),
            netns=dict(type="path", required=True),
            source_ip=dict(type="str"),
            server=dict(type="str", choices=["started", "stopped"]),
            port=dict(type="int", default=8080),
            targets=dict(
                type="list",
                elements="dict",
                default=[],
                options=dict(
                    name=dict(type="str", required=True),
                    ip=dict(type="str", required=True),
                    port=dict(type="int"),
                    expect=dict(
                        type="dict",
                        options=dict(
                            icmp=dict(type="str", choices=["allow", "deny"], default="allow"),
                            tcp=dict(type="str", choices=["allow", "deny"], default="allow"),
                        ),
                    ),
                ),
            ),
            services=dict(
                type="list",
                elements="dict",
                default=[],
                options=dict(
                    name=dict(type="str", required=True),
                    ip=dict(type="str", required=True),
                    port=dict(type="int"),
                    count=dict(type="int", default=20),
                    expect=dict(type="list", elements="str", default=[]),
                ),
            ),
            icmp_count=dict(type="int", default=3),
            timeout=dict(type="float", default=1.0),
            deny_timeout=dict(type="float", default=1.0),
        ),
        supports_check_mode=True,
    )
    p = module.params
    for option in ("timeout", "deny_timeout"):
        if p[option] <= 0:
            module.fail_json(msg="%s: %s is not a positive number of seconds" % (option, p[option]))
    changed = False
    try:
        if p["server"] == "started":
            if server_pid(p["pod"]) is None:
                changed = True
                if not module.check_mode:
                    start_server(p["pod"], p["netns"], p["port"])
        elif p["server"] == "stopped" and server_pid(p["pod"]) is not None:
            changed = True
            if not module.check_mode:
                stop_server(p["pod"])
        targets = [dict(t, port=t["port"] or p["port"]) for t in p["targets"]]
        results = (
            check_targets(targets, p["source_ip"], p["netns"], p["icmp_count"], p["timeout"], p["deny_timeout"])
            if targets
            else []
        )
        services = [dict(s, port=s["port"] or p["port"]) for s in p["services"]]
        service_results = (
            check_services(services, p["source_ip"], p["netns"], max(p["timeout"], 1.0) * 2) if services else []
        )
    except ProbeError as exc:
        module.fail_json(msg=str(exc))
    module.exit_json(changed=changed, server_pid=server_pid(p["pod"]), results=results, service_results=service_results)


if __name__ == "__main__":
    main()
