"""``tools/lab pod``: pods on lab hosts, wired by the node's CNI plugin as a container runtime would.

Each command enters the host exactly like ``tools/lab exec`` (its network, mount and UTS namespaces)
and runs ``pod_runtime.py`` there (over plugins/module_utils/cni_runtime.py), which creates the pod's
network namespace in the host's private /run, runs the plugins of the host's
``/etc/cni/net.d/*.conflist`` from ``CNI_PATH`` (the lab's ``/var/lib/cni/bin``) and keeps the ADD
result for CHECK and DEL. Pods live and die with their host: ``tools/lab down`` leaves no pod
namespace or process behind.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys

from .pod_runtime import LAB_CNI_BIN_DIR, PodError, check_pod_name, netns_path, parse_labels
from .state import PREFIX_ENV, Lab, LabError, nsenter, resolve_prefix

RUNTIME = os.path.join(os.path.dirname(os.path.abspath(__file__)), "pod_runtime.py")


def _host_argv(lab, host):
    data = lab.read_json(lab.topology_path)
    if not data:
        raise LabError(
            "lab %s is not up (no %s); run: tools/lab up --prefix %s" % (lab.prefix, lab.topology_path, lab.prefix)
        )
    names = [h["name"] for h in data.get("hosts", [])]
    if host not in names:
        raise LabError("lab %s has no host %r; hosts: %s" % (lab.prefix, host, ", ".join(names)))
    ns = lab.netns(host)
    mnt, uts = lab.handles(ns)
    missing = nsenter.missing_handles(ns, mnt, uts)
    if missing:
        raise LabError("cannot enter %s: missing %s (is the lab up?)" % (host, ", ".join(missing)))
    return nsenter.nsenter_argv(ns, mnt, uts)


def _runtime_argv(lab, host, *args):
    return _host_argv(lab, host) + [sys.executable, RUNTIME, *args]


def _env(args):
    env = dict(os.environ)
    env["CLUSTERMESH_LAB_CNI_PATH"] = args.cni_path
    return env


def _checked_name(name):
    try:
        return check_pod_name(name)
    except PodError as exc:
        raise LabError(str(exc)) from None


def cmd_add(args):
    lab = Lab(resolve_prefix(args.prefix))
    _checked_name(args.name)
    try:
        parse_labels(args.labels)  # fail before entering the host
    except PodError as exc:
        raise LabError(str(exc)) from None
    argv = _runtime_argv(lab, args.host, "add", args.name, args.labels or "", args.namespace)
    return subprocess.run(argv, env=_env(args), check=False).returncode


def cmd_del(args):
    lab = Lab(resolve_prefix(args.prefix))
    _checked_name(args.name)
    return subprocess.run(_runtime_argv(lab, args.host, "del", args.name), env=_env(args), check=False).returncode


def cmd_check(args):
    lab = Lab(resolve_prefix(args.prefix))
    _checked_name(args.name)
    return subprocess.run(_runtime_argv(lab, args.host, "check", args.name), env=_env(args), check=False).returncode


def cmd_exec(args):
    lab = Lab(resolve_prefix(args.prefix))
    _checked_name(args.name)
    command = list(args.command)
    if command and command[0] == "--":
        command = command[1:]
    if not command:
        command = ["bash"] if shutil.which("bash") else ["sh"]
    # no Python inside: the host's shell checks the pod exists and enters its netns (nsenter, never
    # ip netns exec, which would remount /sys)
    script = (
        'if [ ! -e "$1" ]; then echo "tools/lab: no pod $2 on $(uname -n)" >&2; exit 1; fi; '
        'ns=$1; shift 2; exec nsenter --net="$ns" -- "$@"'
    )
    argv = _host_argv(lab, args.host) + ["sh", "-c", script, "sh", netns_path(args.name), args.name, *command]
    sys.stdout.flush()
    os.execvp(argv[0], argv)
    return 127  # not reached


def list_pods(lab, host):
    proc = subprocess.run(_runtime_argv(lab, host, "list"), capture_output=True, text=True, check=False, timeout=60)
    if proc.returncode != 0:
        raise LabError("listing pods on %s failed: %s" % (host, proc.stderr.strip()))
    return json.loads(proc.stdout)


def cmd_list(args):
    lab = Lab(resolve_prefix(args.prefix))
    if args.host:
        hosts = [args.host]
    else:
        data = lab.read_json(lab.topology_path)
        if not data:
            raise LabError("lab %s is not up; run: tools/lab up --prefix %s" % (lab.prefix, lab.prefix))
        hosts = [h["name"] for h in data.get("hosts", [])]
    rows = []
    for host in hosts:
        for pod in list_pods(lab, host):
            labels = ",".join("%s=%s" % kv for kv in sorted(pod["labels"].items())) or "-"
            netns = pod["netns"] if pod["netns_present"] else pod["netns"] + " (missing)"
            rows.append((host, pod["name"], pod["ip"] or "-", netns, labels))
    if args.json:
        print(json.dumps([dict(zip(("host", "name", "ip", "netns", "labels"), r, strict=True)) for r in rows]))
        return 0
    titles = ("HOST", "POD", "IP", "NETNS", "LABELS")
    widths = [max(len(t), *(len(r[i]) for r in rows)) if rows else len(t) for i, t in enumerate(titles)]
    for row in [titles, *rows]:
        print("  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip())
    return 0


def add_parser(sub, common):
    """Register ``tools/lab pod ...`` on the lab's subparsers."""
    cni = argparse.ArgumentParser(add_help=False)
    cni.add_argument(
        "--cni-path",
        default=LAB_CNI_BIN_DIR,
        metavar="DIRS",
        help="CNI_PATH inside the host (default: %(default)s, the lab's cni_bin_dir)",
    )
    # --prefix is accepted before and after the pod command (tools/lab pod --prefix P add ... or
    # tools/lab pod add --prefix P ...); SUPPRESS keeps the inner one from resetting the outer one.
    prefix = argparse.ArgumentParser(add_help=False)
    prefix.add_argument("--prefix", default=argparse.SUPPRESS, help="lab prefix (default: $%s or cml)" % PREFIX_ENV)
    pod = sub.add_parser(
        "pod",
        parents=[common],
        help="pods on a host, wired by its CNI plugin (add, del, exec, list, check)",
        description="Pods on lab hosts: network namespaces wired by the host's CNI plugin, exactly as a "
        "container runtime calls it (see docs/lab.md).",
    )
    psub = pod.add_subparsers(dest="pod_cmd", required=True, metavar="POD_COMMAND")

    p = psub.add_parser(
        "add",
        parents=[prefix, cni],
        help="create a pod; the last line printed is its IP address",
        usage="tools/lab pod add [--prefix P] [--labels k=v,...] [--namespace NS] HOST NAME",
    )
    p.add_argument("host", metavar="HOST")
    p.add_argument("name", metavar="NAME")
    p.add_argument("--labels", default="", metavar="k=v,...", help="pod labels, passed as args.cni.labels")
    p.add_argument(
        "--namespace", default="default", metavar="NS", help="the pod's namespace, K8S_POD_NAMESPACE (%(default)s)"
    )
    p.set_defaults(func=cmd_add)

    p = psub.add_parser("del", parents=[prefix, cni], help="stop the pod's processes, CNI DEL, remove its netns")
    p.add_argument("host", metavar="HOST")
    p.add_argument("name", metavar="NAME")
    p.set_defaults(func=cmd_del)

    p = psub.add_parser(
        "exec",
        parents=[prefix],
        help="run a command in the pod (host's mount/UTS, pod's netns)",
        usage="tools/lab pod exec [--prefix P] HOST NAME [--] [CMD ...]",
    )
    p.add_argument("host", metavar="HOST")
    p.add_argument("name", metavar="NAME")
    p.add_argument("command", nargs=argparse.REMAINDER, metavar="CMD")
    p.set_defaults(func=cmd_exec)

    p = psub.add_parser("list", parents=[prefix], help="pods of one host or of every host")
    p.add_argument("host", nargs="?", metavar="HOST")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.set_defaults(func=cmd_list)

    p = psub.add_parser("check", parents=[prefix, cni], help="CNI CHECK of the pod's attachment")
    p.add_argument("host", metavar="HOST")
    p.add_argument("name", metavar="NAME")
    p.set_defaults(func=cmd_check)
    return pod
