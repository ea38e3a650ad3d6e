# -*- coding: utf-8 -*-
# Copyright: clustermesh.core contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""``meshctl``: what the node agent knows, read over its local API (``agent_api``).

::

    meshctl [--socket PATH] [--timeout S] status|clusters|services|endpoints|identities|drops [--json]
    meshctl [--socket PATH] [--timeout S] policy ENDPOINT [--json]

``policy ENDPOINT`` (a pod IP, host interface or container ID of this node) shows the policies that
select the endpoint and the entries they allow, peers named by labels; ``drops`` the datapath's drop
counters: which endpoint dropped what from or to which peer, and why.

Prints a table (or the agent's JSON with ``--json``). Exit status: 0 success, 1 the agent is not
reachable (the message names the socket), 2 bad usage, 3 the agent answered with an error.
Entry point ``meshctl`` of the node bundle (``main``). No Ansible imports.
"""

from __future__ import annotations

import argparse
import json
import sys
import time

from .agent_api import DEFAULT_SOCKET, DEFAULT_TIMEOUT, AgentClient, AgentRequestError, AgentUnreachable

EXIT_OK, EXIT_UNREACHABLE, EXIT_USAGE, EXIT_AGENT_ERROR = 0, 1, 2, 3
_clock = time.time  # the "now" of LAST-SYNC ages (tests replace it)
COMMANDS = ("status", "clusters", "services", "endpoints", "identities", "policy", "drops")

# command -> [(heading, how to get the cell from one row)]
_TABLES = {
    "endpoints": [
        ("CONTAINER", lambda r: r.get("containerID", "")[:12]),
        ("IFNAME", lambda r: r.get("ifname", "")),
        ("IP", lambda r: r.get("ip", "")),
        ("HOST-IF", lambda r: r.get("hostInterface", "")),
        ("IDENTITY", lambda r: r.get("identity", "")),
        ("LABELS", lambda r: _labels(r.get("labels"))),
    ],
    "clusters": [
        ("NAME", lambda r: r.get("name", "")),
        ("ID", lambda r: r.get("id", "")),
        ("CONNECTED", lambda r: _yes_no(r.get("connected"))),
        ("SYNCED", lambda r: _yes_no(r.get("synced"))),
        ("LAST-SYNC", lambda r: _ago(r.get("last_sync"))),
        ("FAILURES", lambda r: r.get("failures", "")),
        ("NODES", lambda r: r.get("nodes", "")),
        ("ENDPOINTS", lambda r: r.get("endpoints", "")),
        ("SERVICES", lambda r: r.get("services", "")),
        ("ERROR", lambda r: r.get("last_error") or ""),
    ],
    "services": [
        ("NAMESPACE", lambda r: r.get("namespace", "")),
        ("NAME", lambda r: r.get("name", "")),
        ("FRONTEND", lambda r: r.get("frontend", "")),
        ("SHARED", lambda r: _yes_no(r.get("shared"))),
        ("AFFINITY", lambda r: r.get("affinity", "")),
        ("BACKENDS", lambda r: _backends(r.get("backends"))),
    ],
    "identities": [
        ("ID", lambda r: r.get("id", "")),
        ("CLUSTER", lambda r: r.get("cluster", "")),
        ("LABELS", lambda r: _labels(r.get("labels"))),
    ],
    "drops": [
        ("ENDPOINT", lambda r: r.get("endpoint") or "ifindex %s" % r.get("ifindex", "?")),
        ("POD", lambda r: r.get("pod") or ""),
        ("DIRECTION", lambda r: r.get("direction", "")),
        ("PEER", lambda r: r.get("peer", "")),
        ("PORT", lambda r: r.get("port") or "-"),
        ("PROTO", lambda r: _PROTOS.get(r.get("proto"), r.get("proto", ""))),
        ("REASON", lambda r: r.get("reason", "")),
        ("PACKETS", lambda r: r.get("packets", "")),
        ("BYTES", lambda r: r.get("bytes", "")),
    ],
    "policy": [
        ("DIRECTION", lambda r: r.get("direction", "")),
        ("PEER", lambda r: r.get("peer", "")),
        ("IDENTITY", lambda r: r.get("identity", "")),
        ("PORT", lambda r: r.get("port") or "any"),
        ("PROTOCOL", lambda r: r.get("protocol", "")),
    ],
}
_PROTOS = {0: "any", 1: "ICMP", 6: "TCP", 17: "UDP", 132: "SCTP"}


def _labels(labels):
    if isinstance(labels, dict):
        return ",".join("%s=%s" % (k, v) for k, v in sorted(labels.items()))
    if isinstance(labels, list):
        return ",".join(str(x) for x in labels)
    return "" if labels is None else str(labels)


def _yes_no(value):
    if value is None or value == "":
        return ""
    return "yes" if value else "no"


def _ago(timestamp, now=None):
    if not isinstance(timestamp, (int, float)) or isinstance(timestamp, bool) or timestamp <= 0:
        return "never" if timestamp in (None, 0) else str(timestamp)
    seconds = max(0.0, (now if now is not None else _clock()) - timestamp)
    if seconds < 60:
        return "%.1fs ago" % seconds
    if seconds < 3600:
        return "%dm%02ds ago" % (seconds // 60, seconds % 60)
    return "%dh%02dm ago" % (seconds // 3600, (seconds % 3600) // 60)


def _backends(backends):
    if not isinstance(backends, list):
        return "" if backends is None else str(backends)
    cells = []
    for b in backends:
        if isinstance(b, dict):
            cell = "%s:%s" % (b.get("ip", "?"), b.get("port", "?"))
            if b.get("cluster"):
                cell += "@" + str(b["cluster"])
            if b.get("healthy") is False:
                cell += "(unhealthy)"
            cells.append(cell)
        else:
            cells.append(str(b))
    return " ".join(cells)


def format_table(headings, rows):
    """Rows (lists of cells) under headings, columns padded to the widest cell, no trailing spaces."""
    table = [list(headings)] + [["" if c is None else str(c) for c in row] for row in rows]
    widths = [max(len(row[i]) for row in table) for i in range(len(headings))]
    lines = []
    for row in table:
        lines.append("  ".join(cell.ljust(widths[i]) for i, cell in enumerate(row)).rstrip())
    return "\n".join(lines)


def format_status(status):
    """``key: value`` lines, nested dicts indented."""
    lines = []

    def walk(value, indent):
        for key in sorted(value):
            item = value[key]
            if isinstance(item, dict):
                lines.append("%s%s:" % (" " * indent, key))
                walk(item, indent + 2)
            elif isinstance(item, list):
                lines.append("%s%s: %s" % (" " * indent, key, ", ".join(str(x) for x in item) or "-"))
            else:
                lines.append("%s%s: %s" % (" " * indent, key, item))

    walk(status, 0)
    return "\n".join(lines)


def format_policy(report):
    """``meshctl policy``: the endpoint, what is enforced, the selecting policies, then the entries."""
    enforced = report.get("enforced") or {}
    lines = [
        "endpoint: %s (identity %s, %s)"
        % (report.get("ip", "?"), report.get("identity", "?"), report.get("hostInterface", "?")),
        "labels: %s" % (_labels(report.get("labels")) or "-"),
        "ingress: %s" % ("enforced (default deny)" if enforced.get("ingress") else "not enforced (allow all)"),
        "egress: %s" % ("enforced (default deny)" if enforced.get("egress") else "not enforced (allow all)"),
        "policies: %s" % (", ".join(report.get("policies") or []) or "none select it"),
    ]
    rows = report.get("entries_by_peer") or []
    if rows:
        columns = _TABLES["policy"]
        lines.append(format_table([h for h, _g in columns], [[get(r) for _h, get in columns] for r in rows]))
    return "\n".join(lines)


def render(command, answer):
    """What ``meshctl <command>`` prints for the agent's answer (the unwrapped value)."""
    if command == "status":
        return format_status(answer)
    if command == "policy":
        return format_policy(answer)
    columns = _TABLES[command]
    if not answer:
        return "no %s" % command
    rows = [[get(row) if isinstance(row, dict) else row for _h, get in columns] for row in answer]
    return format_table([h for h, _g in columns], rows)


def parser():
    p = argparse.ArgumentParser(prog="meshctl", description="Show what the clustermesh node agent (meshd) knows.")
    p.add_argument(
        "--socket", default=DEFAULT_SOCKET, help="the agent's API socket (default %(default)s)", metavar="PATH"
    )
    p.add_argument(
        "--timeout", type=float, default=DEFAULT_TIMEOUT, help="seconds to wait for the agent (default %(default)s)"
    )
    p.add_argument("command", choices=COMMANDS)
    p.add_argument("endpoint", nargs="?", help="policy: a pod IP, host interface or container ID of this node")
    p.add_argument("--json", action="store_true", help="print the agent's JSON answer")
    return p


def main(argv=None, stdout=None, stderr=None):
    """Entry point ``meshctl``; returns the exit status."""
    stdout = stdout or sys.stdout
    stderr = stderr or sys.stderr
    try:
        args = parser().parse_args(argv)
    except SystemExit as exc:  # argparse: --help (0) or a usage error (2)
        return exc.code if isinstance(exc.code, int) else EXIT_USAGE
    if (args.command == "policy") != (args.endpoint is not None):
        stderr.write("meshctl: %s\n" % ("policy needs an ENDPOINT" if args.command == "policy" else
                                        "only policy takes an ENDPOINT"))  # fmt: skip
        return EXIT_USAGE
    client = AgentClient(args.socket, timeout=args.timeout)
    try:
        answer = client.policy(args.endpoint) if args.command == "policy" else getattr(client, args.command)()
    except AgentUnreachable as exc:
        stderr.write("meshctl: %s\n" % exc)
        return EXIT_UNREACHABLE
    except AgentRequestError as exc:
        stderr.write("meshctl: %s %s: %s\n" % (args.command, args.socket, exc))
        return EXIT_AGENT_ERROR
    except (KeyError, TypeError) as exc:
        stderr.write("meshctl: %s: unexpected answer from the agent on %s (%s)\n" % (args.command, args.socket, exc))
        return EXIT_AGENT_ERROR
    if args.json:
        stdout.write(json.dumps(answer, indent=2, sort_keys=True) + "\n")
    else:
        stdout.write(render(args.command, answer) + "\n")
    return EXIT_OK
