"""A minimal CNI runtime for lab pods (``tools/lab pod``), run INSIDE a lab host's namespaces.

``tools/lab pod ...`` enters the host (its network, mount and UTS namespaces, exactly like
``tools/lab exec``) and runs this file with the repository's Python; it then does what a container
runtime (libcni) does:

* a pod is a network namespace ``cm-pod-<name>`` created with ``ip netns add`` in the host's own
  ``/run/netns`` (the host's private /run tmpfs: it vanishes with the host), with ``lo`` up;
* the network configuration is the first ``*.conflist`` (by file name) in ``/etc/cni/net.d``;
* every plugin of the list runs with the spec's request configuration (the plugin object without
  ``capabilities``, plus ``cniVersion``, ``name``, ``args.cni.labels``, ``runtimeConfig`` for the
  declared capabilities and ``prevResult``) on stdin and ``CNI_COMMAND``, ``CNI_CONTAINERID``,
  ``CNI_NETNS``, ``CNI_IFNAME`` (eth0), ``CNI_ARGS`` and ``CNI_PATH`` in the environment; ADD and
  CHECK in list order, DEL in reverse, CHECK and DEL with the cached ADD result as ``prevResult``;
* a failed ADD is followed by a DEL (the spec's rule) and the namespace is removed again;
* the ADD result is cached in ``/run/clustermesh-lab-pods/<name>.json`` (host-private too).

Standard library only (it runs as a script); ``del`` borrows ``labkit.hosts.kill_processes`` to stop
the processes still running in the pod.
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
import uuid

LAB_CNI_BIN_DIR = "/var/lib/cni/bin"  # lab hosts overlay /var/lib but not /opt (the machine's own)
CNI_CONF_DIR = "/etc/cni/net.d"
POD_STATE_DIR = "/run/clustermesh-lab-pods"
NETNS_DIR = "/run/netns"
POD_NETNS_PREFIX = "cm-pod-"
POD_IFNAME = "eth0"
POD_NAMESPACE = "lab"  # K8S_POD_NAMESPACE given to plugins
PLUGIN_TIMEOUT = 60
POD_NAME_RE = re.compile(r"^[a-z0-9]([a-z0-9-]{0,30}[a-z0-9])?$")
LABEL_KEY_RE = re.compile(r"^[A-Za-z0-9]([A-Za-z0-9_.\-/]*[A-Za-z0-9])?$")


class RuntimeError_(Exception):
    """A failure to report (no traceback); exit status 1."""


def _host():
    return socket.gethostname()  # lab hosts are named after themselves (own UTS namespace)


def check_pod_name(name):
    if not POD_NAME_RE.match(name or ""):
        raise RuntimeError_(
            "invalid pod name %r: 1 to 32 characters of [a-z0-9-], starting and ending with a letter or digit" % name
        )
    return name


def parse_labels(text):
    """``k=v,k2=v2`` -> [{"key": k, "value": v}, ...] (the CNI conventions' args.cni.labels)."""
    labels = []
    if not text:
        return labels
    seen = set()
    for item in text.split(","):
        key, sep, value = item.partition("=")
        key = key.strip()
        if not sep or not LABEL_KEY_RE.match(key):
            raise RuntimeError_("--labels: %r is not KEY=VALUE (e.g. --labels app=web,tier=front)" % item)
        if key in seen:
            raise RuntimeError_("--labels: %s is given twice" % key)
        seen.add(key)
        labels.append({"key": key, "value": value.strip()})
    return labels


def netns_path(name):
    return os.path.join(NETNS_DIR, POD_NETNS_PREFIX + name)


def state_path(name):
    return os.path.join(POD_STATE_DIR, name + ".json")


def read_state(name):
    try:
        with open(state_path(name), encoding="utf-8") as handle:
            return json.load(handle)
    except FileNotFoundError:
        return None


def write_state(name, data):
    os.makedirs(POD_STATE_DIR, mode=0o700, exist_ok=True)
    tmp = state_path(name) + ".tmp"
    with open(tmp, "w", encoding="utf-8") as handle:
        json.dump(data, handle, indent=2, sort_keys=True)
        handle.write("\n")
    os.replace(tmp, state_path(name))


def run(argv, check=True):
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=30, check=False)
    if check and proc.returncode != 0:
        raise RuntimeError_("%s failed (exit %d): %s" % (" ".join(argv), proc.returncode, proc.stderr.strip()))
    return proc


# network configuration --------------------------------------------------------------------------
def load_network(conf_dir=CNI_CONF_DIR):
    """(path, network configuration) of the first *.conflist in conf_dir, checked like libcni does."""
    try:
        names = sorted(n for n in os.listdir(conf_dir) if n.endswith(".conflist"))
    except FileNotFoundError:
        names = []
    if not names:
        raise RuntimeError_(
            "no *.conflist in %s on %s: install the CNI first (role clustermesh.core.cni)" % (conf_dir, _host())
        )
    path = os.path.join(conf_dir, names[0])
    try:
        with open(path, encoding="utf-8") as handle:
            conf = json.load(handle)
    except (OSError, ValueError) as exc:
        raise RuntimeError_("%s: not a JSON network configuration list: %s" % (path, exc)) from exc
    problems = []
    if not isinstance(conf, dict):
        raise RuntimeError_("%s: not a JSON object" % path)
    if not isinstance(conf.get("name"), str) or not conf["name"]:
        problems.append("name is missing")
    if not isinstance(conf.get("cniVersion"), str):
        problems.append("cniVersion is missing")
    plugins = conf.get("plugins")
    if not isinstance(plugins, list) or not plugins:
        problems.append("plugins must be a non-empty list")
    else:
        for i, plugin in enumerate(plugins):
            if not isinstance(plugin, dict) or not isinstance(plugin.get("type"), str) or "/" in plugin["type"]:
                problems.append("plugins[%d] has no valid type" % i)
    if problems:
        raise RuntimeError_("%s: %s" % (path, "; ".join(problems)))
    return path, conf


def request_config(network, plugin, labels, prev_result=None):
    """The request configuration of one plugin (spec section 3, "Deriving execution configuration")."""
    conf = {k: v for k, v in plugin.items() if k != "capabilities"}
    conf["cniVersion"] = network["cniVersion"]
    conf["name"] = network["name"]
    conf["args"] = {"cni": {"labels": labels}}
    capability_args = {"labels": labels}
    declared = plugin.get("capabilities") or {}
    runtime = {k: v for k, v in capability_args.items() if declared.get(k)}
    if runtime:
        conf["runtimeConfig"] = runtime
    if prev_result is not None:
        conf["prevResult"] = prev_result
    return conf


def find_plugin(plugin_type, cni_path):
    for directory in cni_path.split(":"):
        candidate = os.path.join(directory, plugin_type)
        if directory and os.path.isfile(candidate) and os.access(candidate, os.X_OK):
            return candidate
    raise RuntimeError_("CNI plugin %r not found in CNI_PATH %s" % (plugin_type, cni_path))


class PluginError(RuntimeError_):
    def __init__(self, plugin_type, command, status, error, stderr):
        self.plugin_type = plugin_type
        self.error = error  # the error JSON (dict) or None
        if isinstance(error, dict):
            what = "error %s: %s" % (error.get("code"), error.get("msg"))
            if error.get("details"):
                what += " (%s)" % error["details"]
        else:
            what = "exit %d, no error JSON" % status
        msg = "CNI %s of plugin %s failed: %s" % (command, plugin_type, what)
        if stderr.strip():
            msg += "\n" + stderr.strip()
        super().__init__(msg)


def exec_plugin(command, plugin_type, conf, container_id, netns, cni_path, pod_name):
    env = {k: v for k, v in os.environ.items() if not k.startswith("CNI_")}
    env.update(
        CNI_COMMAND=command,
        CNI_CONTAINERID=container_id,
        CNI_NETNS=netns,
        CNI_IFNAME=POD_IFNAME,
        CNI_ARGS="IgnoreUnknown=1;K8S_POD_NAMESPACE=%s;K8S_POD_NAME=%s" % (POD_NAMESPACE, pod_name),
        CNI_PATH=cni_path,
    )
    path = find_plugin(plugin_type, cni_path)
    proc = subprocess.run(
        [path],
        input=json.dumps(conf).encode("utf-8"),
        capture_output=True,
        env=env,
        timeout=PLUGIN_TIMEOUT,
        check=False,
    )
    stdout = proc.stdout.decode("utf-8", "replace")
    stderr = proc.stderr.decode("utf-8", "replace")
    try:
        out = json.loads(stdout) if stdout.strip() else None
    except ValueError:
        out = None
    if proc.returncode != 0:
        raise PluginError(plugin_type, command, proc.returncode, out, stderr)
    if command == "ADD" and not isinstance(out, dict):
        raise RuntimeError_("CNI ADD of plugin %s printed no result JSON: %r" % (plugin_type, stdout[:200]))
    return out


def run_chain(command, network, state, cni_path):
    """ADD (returns the final result), CHECK or DEL over the network's plugin list."""
    plugins = network["plugins"]
    labels = state["labels"]
    if command == "ADD":
        result = None
        for plugin in plugins:
            conf = request_config(network, plugin, labels, result)
            result = exec_plugin(
                "ADD", plugin["type"], conf, state["containerID"], state["netns"], cni_path, state["name"]
            )
        return result
    if command == "CHECK" and network.get("disableCheck"):
        return None
    order = plugins if command == "CHECK" else list(reversed(plugins))
    for plugin in order:
        conf = request_config(network, plugin, labels, state.get("result"))
        exec_plugin(command, plugin["type"], conf, state["containerID"], state["netns"], cni_path, state["name"])
    return None


# pods ---------------------------------------------------------------------------------------------
def pod_ip(result):
    for ip in (result or {}).get("ips") or []:
        address = ip.get("address", "")
        if address and ":" not in address:
            return address.split("/")[0]
    return None


def _remove_netns(name):
    path = netns_path(name)
    if os.path.exists(path):
        run(["ip", "netns", "delete", POD_NETNS_PREFIX + name], check=False)
    if os.path.exists(path):
        raise RuntimeError_("cannot remove network namespace %s" % path)


def cmd_add(name, labels, cni_path):
    check_pod_name(name)
    if read_state(name) is not None or os.path.exists(netns_path(name)):
        raise RuntimeError_("pod %s exists on %s (tools/lab pod del %s %s first)" % (name, _host(), _host(), name))
    conf_path, network = load_network()
    state = {
        "name": name,
        "containerID": uuid.uuid4().hex,
        "netns": netns_path(name),
        "ifname": POD_IFNAME,
        "labels": labels,
        "network": network["name"],
        "conflist": conf_path,
        "created": time.time(),
    }
    run(["ip", "netns", "add", POD_NETNS_PREFIX + name])
    try:
        run(["nsenter", "--net=" + state["netns"], "--", "ip", "link", "set", "lo", "up"])
        result = run_chain("ADD", network, state, cni_path)
    except BaseException:
        try:
            run_chain("DEL", network, state, cni_path)  # the spec: a DEL follows even a failed ADD
        except Exception as cleanup:  # report the ADD failure, mention the cleanup one
            print("tools/lab: cleanup after the failed ADD: %s" % cleanup, file=sys.stderr)
        _remove_netns(name)
        raise
    state["result"] = result
    write_state(name, state)
    ip = pod_ip(result)
    print("pod %s: netns %s, container %s, %s %s" % (name, state["netns"], state["containerID"], POD_IFNAME, ip))
    print(ip or "")
    return 0


def _kill_pod_processes(name):
    """Stop processes still running in the pod's network namespace (like a runtime stops the
    container before removing its network)."""
    try:
        st = os.stat(netns_path(name))
    except FileNotFoundError:
        return []
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    from labkit.hosts import kill_processes

    return kill_processes({(st.st_dev, st.st_ino)}, set())


def cmd_del(name, cni_path):
    check_pod_name(name)
    state = read_state(name)
    if state is None:
        if os.path.exists(netns_path(name)):
            _kill_pod_processes(name)
            _remove_netns(name)
            print("pod %s: removed its network namespace (no CNI state was recorded)" % name)
            return 0
        raise RuntimeError_("no pod %s on %s" % (name, _host()))
    killed = _kill_pod_processes(name)
    conf_path = state.get("conflist")
    try:
        with open(conf_path, encoding="utf-8") as handle:
            network = json.load(handle)
    except (OSError, ValueError, TypeError):
        _conf, network = load_network()
    run_chain("DEL", network, state, cni_path)
    _remove_netns(name)
    os.unlink(state_path(name))
    print(
        "pod %s: deleted (%s released%s)"
        % (
            name,
            pod_ip(state.get("result")) or "no address",
            ", %d process(es) stopped" % len(killed) if killed else "",
        )
    )
    return 0


def cmd_check(name, cni_path):
    check_pod_name(name)
    state = read_state(name)
    if state is None:
        raise RuntimeError_("no pod %s on %s" % (name, _host()))
    with open(state["conflist"], encoding="utf-8") as handle:
        network = json.load(handle)
    run_chain("CHECK", network, state, cni_path)
    print("pod %s: CHECK passed" % name)
    return 0


def cmd_list():
    pods = []
    try:
        names = sorted(n[: -len(".json")] for n in os.listdir(POD_STATE_DIR) if n.endswith(".json"))
    except FileNotFoundError:
        names = []
    for name in names:
        state = read_state(name)
        if state:
            pods.append(
                {
                    "name": name,
                    "ip": pod_ip(state.get("result")),
                    "containerID": state["containerID"],
                    "netns": state["netns"],
                    "labels": {label["key"]: label["value"] for label in state.get("labels", [])},
                    "netns_present": os.path.exists(state["netns"]),
                }
            )
    print(json.dumps(pods))
    return 0


def main(argv):
    """``cni_runtime.py add NAME [LABELS]`` / ``del NAME`` / ``check NAME`` / ``list``"""
    signal.signal(signal.SIGPIPE, signal.SIG_DFL)
    cni_path = os.environ.get("CLUSTERMESH_LAB_CNI_PATH") or LAB_CNI_BIN_DIR
    try:
        action = argv[0] if argv else ""
        if action == "add":
            return cmd_add(argv[1], parse_labels(argv[2] if len(argv) > 2 else ""), cni_path)
        if action == "del":
            return cmd_del(argv[1], cni_path)
        if action == "check":
            return cmd_check(argv[1], cni_path)
        if action == "list":
            return cmd_list()
        raise RuntimeError_("unknown action %r" % action)
    except RuntimeError_ as exc:
        print("tools/lab: %s" % exc, file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
