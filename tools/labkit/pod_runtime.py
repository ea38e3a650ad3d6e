"""The command line ``tools/lab pod`` runs INSIDE a lab host's namespaces (add, del, check, list).

A thin wrapper over the collection's CNI runtime, ``plugins/module_utils/cni_runtime.py`` (the same
code the module ``cni_pod`` runs on real nodes): it creates the pod's network namespace in the host's
private /run, runs the plugins of the host's ``/etc/cni/net.d/*.conflist`` from ``CNI_PATH`` (the
lab's ``/var/lib/cni/bin``) and keeps the ADD result for CHECK and DEL. Standard library only.
"""

from __future__ import annotations

import json
import os
import signal
import sys

sys.path.insert(
    0,
    os.path.join(
        os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))), "plugins", "module_utils"
    ),
)
import cni_runtime as runtime  # noqa: E402  (the library, found through the path above)

LAB_CNI_BIN_DIR = "/var/lib/cni/bin"  # lab hosts overlay /var/lib but not /opt (the machine's own)
POD_NAMESPACE = "default"  # K8S_POD_NAMESPACE given to plugins unless the command names another
PodError = runtime.PodRuntimeError
check_pod_name = runtime.check_pod_name
netns_path = runtime.netns_path
parse_labels = runtime.labels_from_text


def cmd_add(name, labels, cni_path, namespace=POD_NAMESPACE):
    state = runtime.add_pod(name, labels, cni_path, namespace=namespace)
    ip = runtime.pod_ip(state["result"])
    print("pod %s: netns %s, container %s, %s %s" % (name, state["netns"], state["containerID"], state["ifname"], ip))
    print(ip or "")
    return 0


def cmd_del(name, cni_path):
    state, stopped = runtime.delete_pod(name, cni_path)
    if state is None:
        print("pod %s: removed its network namespace (no CNI state was recorded)" % name)
        return 0
    extra = ", %d process(es) stopped" % len(stopped) if stopped else ""
    print("pod %s: deleted (%s released%s)" % (name, runtime.pod_ip(state.get("result")) or "no address", extra))
    return 0


def cmd_check(name, cni_path):
    runtime.check_pod(name, cni_path)
    print("pod %s: CHECK passed" % name)
    return 0


def main(argv):
    """``pod_runtime.py add NAME [LABELS]`` / ``del NAME`` / ``check NAME`` / ``list``"""
    signal.signal(signal.SIGPIPE, signal.SIG_DFL)
    cni_path = os.environ.get("CLUSTERMESH_LAB_CNI_PATH") or LAB_CNI_BIN_DIR
    try:
        action = argv[0] if argv else ""
        if action == "add":
            return cmd_add(
                argv[1], parse_labels(argv[2] if len(argv) > 2 else ""), cni_path, *(argv[3:4] or [POD_NAMESPACE])
            )
        if action == "del":
            return cmd_del(argv[1], cni_path)
        if action == "check":
            return cmd_check(argv[1], cni_path)
        if action == "list":
            print(json.dumps(runtime.list_pods()))
            return 0
        raise PodError("unknown action %r" % action)
    except PodError as exc:
        print("tools/lab: %s" % exc, file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
