"""Command line of tools/lab (see docs/lab.md)."""

from __future__ import annotations

import argparse
import os
import shutil
import sys

from .state import PREFIX_ENV, Lab, LabError, LabLock, nsenter, resolve_prefix

# labkit.hosts and labkit.topology (PyYAML) are imported by the commands that need them, which keeps
# ``tools/lab exec`` quick.

SPECIAL_NAMESPACES = ("router", "fabric")


def _lab(args):
    return Lab(resolve_prefix(args.prefix))


def _not_up(lab):
    return LabError(
        "lab %s is not up (no %s); run: tools/lab up --prefix %s" % (lab.prefix, lab.topology_path, lab.prefix)
    )


def _running_topology(lab):
    topo = lab.topology()
    if topo is None:
        raise _not_up(lab)
    return topo


def cmd_up(args):
    from . import hosts
    from .topology import TopologyError, load_topology

    # Validate everything before anything is created.
    lab = _lab(args)
    try:
        topo = load_topology(args.topology)
    except TopologyError as e:
        print("tools/lab: %s" % e, file=sys.stderr)
        return 2
    if os.geteuid() != 0:
        raise LabError("tools/lab up needs root (it creates namespaces and mounts)")
    for tool in ("ip", "nsenter", "unshare", "mount", "sysctl"):
        if shutil.which(tool) is None:
            raise LabError("%s not found in PATH (Debian packages iproute2, util-linux, mount, procps)" % tool)
    try:
        summary = hosts.up(lab, topo, log=lambda msg: print(msg, file=sys.stderr))
    except LabError as e:
        raise LabError(
            "%s\nlab %s is partly built; tools/lab down --prefix %s removes it" % (e, lab.prefix, lab.prefix)
        ) from None
    parts = ["%d built" % len(summary["built"]), "%d kept" % len(summary["kept"])]
    if summary["removed"]:
        parts.append("%d removed (%s)" % (len(summary["removed"]), ", ".join(summary["removed"])))
    print("lab %s: %d hosts up (%s) in %.2f s" % (lab.prefix, len(topo.hosts), ", ".join(parts), summary["elapsed"]))
    print(lab.inventory_path)
    return 0


def cmd_down(args):
    from . import hosts

    lab = _lab(args)
    if os.geteuid() != 0:
        raise LabError("tools/lab down needs root")
    with LabLock(lab.lab_root):
        summary = hosts.teardown(lab)
    if not summary["netns"] and not summary["state_dir"] and not summary["mounts"]:
        print("lab %s: nothing to remove" % lab.prefix)
    else:
        print(
            "lab %s: removed %d network namespaces, %d mounts, %d processes"
            % (lab.prefix, len(summary["netns"]), len(summary["mounts"]), len(summary["pids"]))
        )
    return 0


def cmd_inventory(args):
    lab = _lab(args)
    _running_topology(lab)
    if not os.path.exists(lab.inventory_path):
        raise LabError(
            "lab %s has no inventory at %s; run: tools/lab up --prefix %s"
            % (lab.prefix, lab.inventory_path, lab.prefix)
        )
    if args.show:
        with open(lab.inventory_path, encoding="utf-8") as f:
            sys.stdout.write(f.read())
    else:
        print(lab.inventory_path)
    return 0


def cmd_status(args):
    from . import hosts

    lab = _lab(args)
    topo = _running_topology(lab)
    rows = hosts.status(lab, topo)
    cols = [
        ("HOST", "host"),
        ("NETNS", "netns"),
        ("SEGMENT", "segment"),
        ("ADDRESS", "address"),
        ("HOSTNAME", "hostname"),
        ("REACHABLE", "reachable"),
    ]
    widths = [max(len(title), *(len(str(r[key])) for r in rows)) for title, key in cols]
    print("  ".join(title.ljust(w) for (title, _k), w in zip(cols, widths, strict=True)).rstrip())
    for row in rows:
        print("  ".join(str(row[key]).ljust(w) for (_t, key), w in zip(cols, widths, strict=True)).rstrip())
    healthy = all(r["reachable"] == "yes" and r["hostname"] == r["host"] for r in rows)
    return 0 if healthy else 1


def cmd_exec(args):
    lab = _lab(args)
    command = list(args.command)
    if command and command[0] == "--":
        command = command[1:]
    if not command:
        command = ["bash"] if shutil.which("bash") else ["sh"]
    if args.host in SPECIAL_NAMESPACES:
        ns = "%s-%s" % (lab.prefix, args.host)
        mnt = uts = None
    else:
        data = lab.read_json(lab.topology_path)
        if not data:
            raise _not_up(lab)
        names = [h["name"] for h in data.get("hosts", [])]
        if args.host not in names:
            raise LabError(
                "lab %s has no host %r; hosts: %s (or router, fabric)" % (lab.prefix, args.host, ", ".join(names))
            )
        ns = lab.netns(args.host)
        mnt, uts = lab.handles(ns)
    missing = nsenter.missing_handles(ns, mnt, uts)
    if missing:
        raise LabError("cannot enter %s: missing %s (is the lab up?)" % (args.host, ", ".join(missing)))
    argv = nsenter.nsenter_argv(ns, mnt, uts) + command
    sys.stdout.flush()
    os.execvp(argv[0], argv)
    return 127  # not reached


def build_parser():
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "--prefix",
        help="lab prefix, 1-6 of [a-z0-9] (default: $%s or cml)" % PREFIX_ENV,
    )
    parser = argparse.ArgumentParser(
        prog="tools/lab",
        description="Lab hosts made of Linux namespaces for clustermesh.core (see docs/lab.md).",
    )
    sub = parser.add_subparsers(dest="cmd", required=True, metavar="COMMAND")

    p = sub.add_parser("up", parents=[common], help="build (or reconcile) the lab, print the inventory path")
    p.add_argument("--topology", metavar="FILE", help="topology file (default: the embedded default topology)")
    p.set_defaults(func=cmd_up)

    p = sub.add_parser("down", parents=[common], help="remove everything the lab created")
    p.set_defaults(func=cmd_down)

    p = sub.add_parser("inventory", parents=[common], help="print the inventory path")
    p.add_argument("--show", action="store_true", help="print the inventory content instead")
    p.set_defaults(func=cmd_inventory)

    p = sub.add_parser("status", parents=[common], help="table of hosts; exit 1 if one is unhealthy")
    p.set_defaults(func=cmd_status)

    p = sub.add_parser(
        "exec",
        parents=[common],
        help="run a command in a host (or in the router/fabric netns)",
        usage="tools/lab exec [--prefix P] HOST [--] [CMD ...]",
    )
    p.add_argument("host", metavar="HOST")
    p.add_argument("command", nargs=argparse.REMAINDER, metavar="CMD")
    p.set_defaults(func=cmd_exec)

    from . import pods

    pods.add_parser(sub, common)
    return parser


def main(argv=None):
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except LabError as e:
        print("tools/lab: %s" % e, file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:  # output piped into head & co.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1
