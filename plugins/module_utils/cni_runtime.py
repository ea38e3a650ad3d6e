# -*- coding: utf-8 -*-
# Copyright: clustermesh.core contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""A minimal CNI runtime: what a container runtime (libcni) does to give a pod its network.

Used by the module ``cni_pod`` (probe pods of playbooks/connectivity.yml) and by ``tools/lab pod``;
it runs on the node, inside the node's namespaces:

* a pod is a network namespace ``cm-pod-<name>`` made with ``ip netns add`` in the node's
  ``/run/netns``, with ``lo`` up;
* the network configuration is the first ``*.conflist`` (by file name) in ``/etc/cni/net.d``;
* every plugin of the list runs with the spec's request configuration (the plugin object without
  ``capabilities``, plus ``cniVersion``, ``name``, ``args.cni.labels``, ``runtimeConfig`` for the
  declared capabilities and ``prevResult``) on stdin and ``CNI_COMMAND``, ``CNI_CONTAINERID``,
  ``CNI_NETNS``, ``CNI_IFNAME`` (eth0), ``CNI_ARGS`` and ``CNI_PATH`` in the environment; ADD and
  CHECK in list order, DEL in reverse, CHECK and DEL with the cached ADD result as ``prevResult``;
* a failed ADD is followed by a DEL (the spec's rule) and the namespace is removed again;
* the ADD result is cached in ``/run/clustermesh/pods/<name>.json`` (gone at reboot, like the netns).

Standard library only, and no imports of sibling files: ``tools/lab`` imports this file on its own.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import time
import uuid

DEFAULT_CNI_PATH = "/opt/cni/bin"
CNI_CONF_DIR = "/etc/cni/net.d"
POD_STATE_DIR = "/run/clustermesh/pods"
NETNS_DIR = "/run/netns"
POD_NETNS_PREFIX = "cm-pod-"
POD_IFNAME = "eth0"
PLUGIN_TIMEOUT = 60
POD_NAME_RE = re.compile(r"^[a-z0-9]([a-z0-9-]{0,30}[a-z0-9])?$")
LABEL_KEY_RE = re.compile(r"^[A-Za-z0-9]([A-Za-z0-9_.\-/]*[A-Za-z0-9])?$")


class PodRuntimeError(Exception):
    """A failure to report to the user (what and how to fix), no traceback."""


def check_pod_name(name):
    if not isinstance(name, str) or not POD_NAME_RE.match(name):
        raise PodRuntimeError(
            "invalid pod name %r: 1 to 32 characters of [a-z0-9-], starting and ending with a letter or digit" % name
        )
    return name


def labels_from_text(text):
    """``k=v,k2=v2`` -> [{"key": k, "value": v}, ...] (the CNI conventions' args.cni.labels)."""
    pairs = []
    for item in (text or "").split(","):
        if not item.strip():
            continue
        key, sep, value = item.partition("=")
        if not sep:
            raise PodRuntimeError("labels: %r is not KEY=VALUE (e.g. app=web,tier=front)" % item)
        pairs.append((key.strip(), value.strip()))
    return check_labels(pairs)


def labels_from_dict(mapping):
    return check_labels(sorted((str(k), "" if v is None else str(v)) for k, v in (mapping or {}).items()))


def check_labels(pairs):
    labels, seen = [], set()
    for key, value in pairs:
        if not LABEL_KEY_RE.match(key):
            raise PodRuntimeError("labels: %r is not a valid label key" % key)
        if key in seen:
            raise PodRuntimeError("labels: %s is given twice" % key)
        seen.add(key)
        labels.append({"key": key, "value": value})
    return labels


def netns_path(name):
    return os.path.join(NETNS_DIR, POD_NETNS_PREFIX + name)


def state_path(name, state_dir=POD_STATE_DIR):
    return os.path.join(state_dir, name + ".json")


def read_state(name, state_dir=POD_STATE_DIR):
    try:
        with open(state_path(name, state_dir), encoding="utf-8") as handle:
            return json.load(handle)
    except FileNotFoundError:
        return None


def write_state(name, data, state_dir=POD_STATE_DIR):
    os.makedirs(state_dir, mode=0o700, exist_ok=True)
    tmp = state_path(name, state_dir) + ".tmp"
    with open(tmp, "w", encoding="utf-8") as handle:
        json.dump(data, handle, indent=2, sort_keys=True)
        handle.write("\n")
    os.replace(tmp, state_path(name, state_dir))


def _run(argv, check=True):
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=30, check=False)
    if check and proc.returncode != 0:
        raise PodRuntimeError("%s failed (exit %d): %s" % (" ".join(argv), proc.returncode, proc.stderr.strip()))
    return proc


def _host():
    return os.uname().nodename


# network configuration --------------------------------------------------------------------------


def load_network(conf_dir=CNI_CONF_DIR):
    """(path, network configuration) of the first *.conflist in conf_dir, checked like libcni does."""
    try:
        names = sorted(n for n in os.listdir(conf_dir) if n.endswith(".conflist"))
    except FileNotFoundError:
        names = []
    if not names:
        raise PodRuntimeError(
            "no *.conflist in %s on %s: install the CNI first (role clustermesh.core.cni)" % (conf_dir, _host())
        )
    path = os.path.join(conf_dir, names[0])
    try:
        with open(path, encoding="utf-8") as handle:
            conf = json.load(handle)
    except (OSError, ValueError) as exc:
        raise PodRuntimeError("%s: not a JSON network configuration list: %s" % (path, exc)) from exc
    if not isinstance(conf, dict):
        raise PodRuntimeError("%s: not a JSON object" % path)
    problems = []
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
        raise PodRuntimeError("%s: %s" % (path, "; ".join(problems)))
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
    raise PodRuntimeError("CNI plugin %r not found in CNI_PATH %s" % (plugin_type, cni_path))


class PluginError(PodRuntimeError):
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


def exec_plugin(command, plugin_type, conf, state, cni_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith("CNI_")}
    env.update(
        CNI_COMMAND=command,
        CNI_CONTAINERID=state["containerID"],
        CNI_NETNS=state["netns"],
        CNI_IFNAME=state.get("ifname", POD_IFNAME),
        CNI_ARGS="IgnoreUnknown=1;K8S_POD_NAMESPACE=%s;K8S_POD_NAME=%s"
        % (state.get("namespace", "default"), state["name"]),
        CNI_PATH=cni_path,
    )
    proc = subprocess.run(
        [find_plugin(plugin_type, cni_path)],
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
        raise PodRuntimeError("CNI ADD of plugin %s printed no result JSON: %r" % (plugin_type, stdout[:200]))
    return out


def run_chain(command, network, state, cni_path):
    """ADD (returns the final result), CHECK or DEL over the network's plugin list."""
    plugins = network["plugins"]
    labels = state["labels"]
    if command == "ADD":
        result = None
        for plugin in plugins:
            result = exec_plugin(
                "ADD", plugin["type"], request_config(network, plugin, labels, result), state, cni_path
            )
        return result
    if command == "CHECK" and network.get("disableCheck"):
        return None
    order = plugins if command == "CHECK" else list(reversed(plugins))
    for plugin in order:
        conf = request_config(network, plugin, labels, state.get("result"))
        exec_plugin(command, plugin["type"], conf, state, cni_path)
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
        _run(["ip", "netns", "delete", POD_NETNS_PREFIX + name], check=False)
    if os.path.exists(path):
        raise PodRuntimeError("cannot remove network namespace %s" % path)


def pod_processes(name):
    """PIDs of the processes whose network namespace is the pod's."""
    try:
        st = os.stat(netns_path(name))
    except FileNotFoundError:
        return []
    pids = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            ns = os.stat("/proc/%s/ns/net" % entry)
        except OSError:
            continue
        if (ns.st_dev, ns.st_ino) == (st.st_dev, st.st_ino) and int(entry) != os.getpid():
            pids.append(int(entry))
    return pids


def stop_pod_processes(name, timeout=2.0):
    """Stop what still runs in the pod (a runtime stops the container before removing its network):
    SIGTERM, then SIGKILL after ``timeout``; only processes found in the pod's own namespace."""
    pids = pod_processes(name)
    for pid in pids:
        try:
            os.kill(pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and pod_processes(name):
        time.sleep(0.05)
    for pid in pod_processes(name):
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    return pids


def add_pod(name, labels, cni_path=DEFAULT_CNI_PATH, namespace="default", conf_dir=CNI_CONF_DIR):
    """Create the pod's namespace and run ADD; returns the recorded state (with ``result``)."""
    check_pod_name(name)
    if read_state(name) is not None or os.path.exists(netns_path(name)):
        raise PodRuntimeError("pod %s exists on %s: delete it first" % (name, _host()))
    conf_path, network = load_network(conf_dir)
    state = {
        "name": name,
        "namespace": namespace,
        "containerID": uuid.uuid4().hex,
        "netns": netns_path(name),
        "ifname": POD_IFNAME,
        "labels": labels,
        "network": network["name"],
        "conflist": conf_path,
        "created": time.time(),
    }
    _run(["ip", "netns", "add", POD_NETNS_PREFIX + name])
    try:
        _run(["nsenter", "--net=" + state["netns"], "--", "ip", "link", "set", "lo", "up"])
        result = run_chain("ADD", network, state, cni_path)
    except BaseException as exc:
        cleanup = ""
        try:
            run_chain("DEL", network, state, cni_path)  # the spec: a DEL follows even a failed ADD
        except Exception as second:  # report the ADD failure, mention the cleanup one
            cleanup = " (cleanup after the failed ADD: %s)" % second
        _remove_netns(name)
        if isinstance(exc, PodRuntimeError) and cleanup:
            raise PodRuntimeError(str(exc) + cleanup) from None
        raise
    state["result"] = result
    write_state(name, state)
    return state


def _network_of(state, conf_dir=CNI_CONF_DIR):
    try:
        with open(state.get("conflist"), encoding="utf-8") as handle:
            return json.load(handle)
    except (OSError, ValueError, TypeError):
        return load_network(conf_dir)[1]


def delete_pod(name, cni_path=DEFAULT_CNI_PATH):
    """Stop the pod's processes, run DEL, remove its namespace. Returns (state or None, stopped pids);
    raises PodRuntimeError when there is no such pod."""
    check_pod_name(name)
    state = read_state(name)
    if state is None:
        if not os.path.exists(netns_path(name)):
            raise PodRuntimeError("no pod %s on %s" % (name, _host()))
        stopped = stop_pod_processes(name)
        _remove_netns(name)
        return None, stopped
    stopped = stop_pod_processes(name)
    run_chain("DEL", _network_of(state), state, cni_path)
    _remove_netns(name)
    os.unlink(state_path(name))
    return state, stopped


def check_pod(name, cni_path=DEFAULT_CNI_PATH):
    check_pod_name(name)
    state = read_state(name)
    if state is None:
        raise PodRuntimeError("no pod %s on %s" % (name, _host()))
    run_chain("CHECK", _network_of(state), state, cni_path)
    return state


def list_pods(state_dir=POD_STATE_DIR):
    pods = []
    try:
        names = sorted(n[: -len(".json")] for n in os.listdir(state_dir) if n.endswith(".json"))
    except FileNotFoundError:
        names = []
    for name in names:
        state = read_state(name, state_dir)
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
    return pods
