# -*- coding: utf-8 -*-
# Copyright: clustermesh.core contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""The CNI plugin ``clustermesh-cni`` (CNI spec 1.0.0; also 0.3.0, 0.3.1 and 0.4.0): ADD, DEL, CHECK, VERSION.

Installed on nodes by role ``cni`` as one executable file (``node_bundle``, entry point ``cni``) and run
by the container runtime with the plugin configuration on stdin and ``CNI_*`` in the environment. The
result (or an error ``{cniVersion, code, msg, details}``) goes to stdout; the exit status is 0 only on
success.

Plugin configuration (one entry of a conflist's ``plugins``; the runtime adds ``name``, ``cniVersion``
and, for CHECK and DEL, ``prevResult``)::

    {"type": "clustermesh-cni",           # required
     "podCIDR": "10.1.0.0/24",            # required: the node's IPv4 pod CIDR (/16 to /30)
     "mtu": 1450,                         # required: MTU of both ends of the pod's veth (68..65535)
     "dataDir": "/var/lib/cni/networks",  # optional: IPAM state, <dataDir>/<name>/<ip>
     "agentSocket": "/run/clustermesh/meshd.sock",   # optional: tell the node agent (notify_agent)
     "dns": {"nameservers": [...], ...}}  # optional, well-known: copied into the result

Labels of the pod come from ``args.cni.labels`` (the CNI conventions' ``[{"key": k, "value": v}]``,
set by the runtime) and, when the runtime passes them as a capability, ``runtimeConfig.labels``
(the same list, or a ``{key: value}`` map; these win). They are stored with the pod's address in the
IPAM state (``ipam.read_allocations``), where the node agent reads them, together with ``CNI_ARGS``
(``K8S_POD_NAMESPACE``, ``K8S_POD_NAME``... as given).

Error codes: the spec's (1 incompatible version, 2 unsupported field, 3 unknown container, 4 invalid
environment variable, 5 I/O, 6 undecodable input, 7 invalid configuration, 11 try again) and ours:
100 the pod CIDR has no free address, 101 the interface already exists in the pod, 102 a kernel
(netlink) operation failed, 103 CHECK found the attachment not as ADD made it, 104 a Python package is
missing on the node, 105 an unexpected failure (a bug: the message names the exception).
"""

from __future__ import annotations

import contextlib
import ipaddress
import json
import os
import re
import sys

SUPPORTED_VERSIONS = ("0.3.0", "0.3.1", "0.4.0", "1.0.0")
PLUGIN_TYPE = "clustermesh-cni"
DEFAULT_DATA_DIR = "/var/lib/cni/networks"
MIN_MTU, MAX_MTU = 68, 65535
MIN_POD_PREFIX, MAX_POD_PREFIX = 16, 30

# the spec's well-known error codes
ERR_INCOMPATIBLE_VERSION = 1
ERR_UNSUPPORTED_FIELD = 2
ERR_UNKNOWN_CONTAINER = 3
ERR_INVALID_ENV = 4
ERR_IO = 5
ERR_DECODE = 6
ERR_INVALID_CONFIG = 7
ERR_TRY_AGAIN = 11
# ours (100+)
ERR_POOL_EXHAUSTED = 100
ERR_INTERFACE_EXISTS = 101
ERR_KERNEL = 102
ERR_CHECK_FAILED = 103
ERR_MISSING_PACKAGE = 104
ERR_INTERNAL = 105

COMMANDS = ("ADD", "DEL", "CHECK", "VERSION")
CONFIG_KEYS = (
    "type",
    "podCIDR",
    "mtu",
    "dataDir",
    "agentSocket",
    "dns",
    # set by the runtime
    "cniVersion",
    "name",
    "args",
    "runtimeConfig",
    "prevResult",
)
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.\-]*$")  # network names and container IDs (spec)
_LABEL_KEY_RE = re.compile(r"^[A-Za-z0-9]([A-Za-z0-9_.\-/]*[A-Za-z0-9])?$")


class CniError(Exception):
    """A failure reported to the runtime as the spec's error JSON."""

    def __init__(self, code, msg, details=""):
        super().__init__(msg)
        self.code = code
        self.msg = msg
        self.details = details

    def to_dict(self, cni_version):
        return {"cniVersion": cni_version, "code": self.code, "msg": self.msg, "details": self.details}


# versions ------------------------------------------------------------------------------------------
def _version_tuple(version):
    try:
        parts = tuple(int(p) for p in version.split("."))
    except (AttributeError, ValueError):
        return None
    return parts if len(parts) == 3 else None


def version_result(cni_version=None):
    """What VERSION prints: the caller's cniVersion (1.0.0 when none was given) and ours."""
    return {"cniVersion": cni_version or "1.0.0", "supportedVersions": list(SUPPORTED_VERSIONS)}


# environment -----------------------------------------------------------------------------------------
def valid_ifname(name):
    """Linux interface name rules (what the reference plugins check)."""
    return (
        bool(name)
        and len(name.encode("utf-8")) < 16
        and name not in (".", "..")
        and not any(c in name for c in "/:")
        and not any(c.isspace() for c in name)
    )


def parse_cni_args(text):
    """CNI_ARGS ``K=V;K2=V2`` as a dict; raises CniError(4) on a malformed pair."""
    result = {}
    if not text:
        return result
    for pair in text.split(";"):
        if not pair:
            continue
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise CniError(
                ERR_INVALID_ENV,
                "CNI_ARGS: %r is not KEY=VALUE" % pair,
                "CNI_ARGS is a list of KEY=VALUE pairs separated by ';'",
            )
        result[key] = value
    return result


def read_environment(environ):
    """The CNI_* parameters of the call, checked for the command. Raises CniError(4) naming every
    invalid variable."""
    command = environ.get("CNI_COMMAND", "")
    if command not in COMMANDS:
        raise CniError(
            ERR_INVALID_ENV,
            "CNI_COMMAND: %r is not one of %s" % (command, ", ".join(COMMANDS))
            if command
            else "CNI_COMMAND is not set",
            "this plugin implements %s (CNI spec %s)" % (", ".join(COMMANDS), ", ".join(SUPPORTED_VERSIONS)),
        )
    params = {"command": command}
    if command == "VERSION":
        return params
    problems = []
    container_id = environ.get("CNI_CONTAINERID", "")
    if not container_id:
        problems.append("CNI_CONTAINERID is not set")
    elif not _NAME_RE.match(container_id):
        problems.append(
            "CNI_CONTAINERID %r: must start with a letter or digit, then letters, digits, '_', '.', '-'" % container_id
        )
    ifname = environ.get("CNI_IFNAME", "")
    if not ifname:
        problems.append("CNI_IFNAME is not set")
    elif not valid_ifname(ifname):
        problems.append("CNI_IFNAME %r is not a valid interface name (1-15 bytes, no '/', ':' or spaces)" % ifname)
    netns = environ.get("CNI_NETNS", "")
    if command in ("ADD", "CHECK") and not netns:
        problems.append("CNI_NETNS is not set (needed for %s)" % command)
    elif netns and not netns.startswith("/"):
        problems.append("CNI_NETNS %r is not an absolute path to a network namespace" % netns)
    try:
        args = parse_cni_args(environ.get("CNI_ARGS", ""))
    except CniError as exc:
        problems.append(exc.msg)
        args = {}
    if problems:
        raise CniError(ERR_INVALID_ENV, "; ".join(problems))
    params.update(container_id=container_id, ifname=ifname, netns=netns or None, args=args)
    return params


# configuration -------------------------------------------------------------------------------------
class PluginConfig:
    """A validated plugin configuration (see the module docstring for the keys)."""

    def __init__(self, raw, cni_version, name, pod_cidr, mtu, data_dir, agent_socket, labels, prev_result, dns):
        self.raw = raw
        self.cni_version = cni_version
        self.name = name
        self.pod_cidr = pod_cidr
        self.mtu = mtu
        self.data_dir = data_dir
        self.agent_socket = agent_socket
        self.labels = labels
        self.prev_result = prev_result
        self.dns = dns


def decode_config(data):
    """stdin bytes -> dict; CniError(6) when it is not a JSON object."""
    try:
        raw = json.loads(data.decode("utf-8") if isinstance(data, bytes) else data)
    except (UnicodeDecodeError, ValueError) as exc:
        raise CniError(ERR_DECODE, "the network configuration on stdin is not JSON: %s" % exc) from exc
    if not isinstance(raw, dict):
        raise CniError(ERR_DECODE, "the network configuration on stdin is not a JSON object")
    return raw


def negotiate_version(raw):
    """The configuration's cniVersion, checked against ours (error 7 when missing, 1 when unsupported)."""
    version = raw.get("cniVersion")
    if version is None or not isinstance(version, str) or not version:
        raise CniError(ERR_INVALID_CONFIG, 'cniVersion: missing or not a string (e.g. "1.0.0")')
    if version not in SUPPORTED_VERSIONS:
        raise CniError(
            ERR_INCOMPATIBLE_VERSION,
            "incompatible CNI version %s: clustermesh-cni supports %s" % (version, ", ".join(SUPPORTED_VERSIONS)),
            "set cniVersion of the network configuration to one of the supported versions",
        )
    return version


def _labels_from(value, where):
    """Labels as a dict from a list of {key, value} or a {key: value} map; CniError(7) naming the entry."""
    labels = {}
    if isinstance(value, dict):
        items = [(k, v, "%s.%s" % (where, k)) for k, v in value.items()]
    elif isinstance(value, list):
        items = []
        for i, entry in enumerate(value):
            if not isinstance(entry, dict) or set(entry) - {"key", "value"} or "key" not in entry:
                raise CniError(
                    ERR_INVALID_CONFIG,
                    '%s[%d]: must be an object {"key": ..., "value": ...}, got %s' % (where, i, json.dumps(entry)),
                )
            items.append((entry["key"], entry.get("value", ""), "%s[%d]" % (where, i)))
    else:
        raise CniError(ERR_INVALID_CONFIG, '%s: must be a list of {"key", "value"} objects' % where)
    for key, val, field in items:
        if not isinstance(key, str) or not _LABEL_KEY_RE.match(key) or len(key) > 317:
            raise CniError(ERR_INVALID_CONFIG, "%s: label key %r is not a valid label key" % (field, key))
        if not isinstance(val, str):
            raise CniError(ERR_INVALID_CONFIG, "%s: label %s has a non-string value %r" % (field, key, val))
        labels[key] = val
    return labels


def _did_you_mean(raw, key):
    for k in raw:
        if k != key and k.lower() == key.lower():
            return " (found %r: keys are case-sensitive)" % k
    return ""


def parse_config(raw, command):
    """Validate a plugin configuration for ``command``; CniError (7, 2 or 1) names the field and the fix."""
    version = negotiate_version(raw)
    if command == "CHECK" and _version_tuple(version) < (0, 4, 0):
        raise CniError(
            ERR_INCOMPATIBLE_VERSION,
            "CHECK is not part of CNI %s: it needs cniVersion 0.4.0 or later" % version,
        )
    problems = []
    name = raw.get("name")
    if not isinstance(name, str) or not _NAME_RE.match(name):
        problems.append(
            "name: %s is not a valid network name (letters, digits, '_', '.', '-', starting with a letter or digit)"
            % json.dumps(name)
        )
    ptype = raw.get("type")
    if not isinstance(ptype, str) or not ptype:
        problems.append("type: missing (%r)" % PLUGIN_TYPE)
    pod_cidr = None
    value = raw.get("podCIDR")
    if value is None:
        problems.append(
            'podCIDR: missing; set it to the node\'s IPv4 pod CIDR, e.g. "10.1.0.0/24"%s'
            % _did_you_mean(raw, "podCIDR")
        )
    else:
        try:
            pod_cidr = ipaddress.IPv4Network(value, strict=True)
        except (TypeError, ValueError) as exc:
            problems.append("podCIDR: %s is not an IPv4 network with host bits zero (%s)" % (json.dumps(value), exc))
        else:
            if not MIN_POD_PREFIX <= pod_cidr.prefixlen <= MAX_POD_PREFIX:
                problems.append(
                    "podCIDR: %s must be a /%d to /%d (the node's pod CIDR, usually a /24)"
                    % (value, MIN_POD_PREFIX, MAX_POD_PREFIX)
                )
                pod_cidr = None
    mtu = raw.get("mtu")
    if mtu is None:
        problems.append(
            "mtu: missing; set the pod MTU (the underlay MTU, minus 50 in tunnel or hybrid mode)%s"
            % _did_you_mean(raw, "mtu")
        )
    elif isinstance(mtu, bool) or not isinstance(mtu, int) or not MIN_MTU <= mtu <= MAX_MTU:
        problems.append("mtu: %s must be an integer from %d to %d" % (json.dumps(mtu), MIN_MTU, MAX_MTU))
    data_dir = raw.get("dataDir", DEFAULT_DATA_DIR)
    if not isinstance(data_dir, str) or not data_dir.startswith("/"):
        problems.append("dataDir: %s must be an absolute path" % json.dumps(data_dir))
    agent_socket = raw.get("agentSocket")
    if agent_socket is not None and (not isinstance(agent_socket, str) or not agent_socket.startswith("/")):
        problems.append("agentSocket: %s must be an absolute path" % json.dumps(agent_socket))
    dns = raw.get("dns", {})
    if not isinstance(dns, dict):
        problems.append("dns: must be an object (nameservers, domain, search, options)")
        dns = {}
    labels = {}
    try:
        args = raw.get("args") or {}
        cni_args = args.get("cni") if isinstance(args, dict) else None
        if isinstance(cni_args, dict) and "labels" in cni_args:
            labels.update(_labels_from(cni_args["labels"], "args.cni.labels"))
        runtime = raw.get("runtimeConfig") or {}
        if isinstance(runtime, dict) and "labels" in runtime:
            labels.update(_labels_from(runtime["labels"], "runtimeConfig.labels"))
    except CniError as exc:
        problems.append(exc.msg)
    prev_result = raw.get("prevResult")
    if prev_result is not None and not isinstance(prev_result, dict):
        problems.append("prevResult: must be an object (the result of ADD)")
        prev_result = None
    if problems:
        raise CniError(ERR_INVALID_CONFIG, "invalid network configuration: " + "; ".join(problems))
    ipam = raw.get("ipam")
    if ipam:
        raise CniError(
            ERR_UNSUPPORTED_FIELD,
            "unsupported field ipam=%s: clustermesh-cni allocates pod addresses itself from podCIDR; "
            "remove the ipam section" % json.dumps(ipam, sort_keys=True),
        )
    return PluginConfig(
        raw=raw,
        cni_version=version,
        name=name,
        pod_cidr=str(pod_cidr),
        mtu=mtu,
        data_dir=data_dir,
        agent_socket=agent_socket,
        labels=labels,
        prev_result=prev_result,
        dns=dns,
    )


# results ---------------------------------------------------------------------------------------------
def format_result(version, interfaces, ips, routes, dns, prev_result=None):
    """An ADD result in the shape of ``version`` (0.3.x and 0.4.0 carry ``version`` in each IP).
    ``ips`` entries use indexes into ``interfaces``; with a ``prevResult`` ours are appended to it."""
    base_interfaces, base_ips, base_routes, base_dns = [], [], [], {}
    if prev_result:
        base_interfaces = list(prev_result.get("interfaces") or [])
        base_ips = [dict(ip) for ip in prev_result.get("ips") or []]
        base_routes = list(prev_result.get("routes") or [])
        base_dns = dict(prev_result.get("dns") or {})
    offset = len(base_interfaces)
    out_ips = []
    for ip in base_ips + [dict(ip, interface=ip["interface"] + offset) for ip in ips]:
        entry = {k: v for k, v in ip.items() if k != "version"}
        if _version_tuple(version) < (1, 0, 0):
            entry = dict({"version": "6" if ":" in entry["address"] else "4"}, **entry)
        out_ips.append(entry)
    return {
        "cniVersion": version,
        "interfaces": base_interfaces + interfaces,
        "ips": out_ips,
        "routes": base_routes + routes,
        "dns": base_dns or dict(dns or {}),
    }


def attachment_from_result(prev_result, ifname, netns):
    """(pod ip, pod mac, host mac) of our attachment in a prevResult: the sandbox interface ``ifname``
    at ``netns`` and the IPv4 address on it. CniError(7) when prevResult does not hold it."""
    interfaces = prev_result.get("interfaces") or []
    pod_index = None
    for i, iface in enumerate(interfaces):
        if isinstance(iface, dict) and iface.get("name") == ifname and iface.get("sandbox") == netns:
            pod_index = i
    if pod_index is None:
        raise CniError(
            ERR_INVALID_CONFIG,
            "prevResult: no interface %s with sandbox %s (is it the result of this container's ADD?)" % (ifname, netns),
        )
    address = None
    for ip in prev_result.get("ips") or []:
        if isinstance(ip, dict) and ip.get("interface") == pod_index and ":" not in str(ip.get("address", "")):
            address = ip.get("address")
    if not address:
        raise CniError(ERR_INVALID_CONFIG, "prevResult: no IPv4 address on interface %s" % ifname)
    try:
        ip = str(ipaddress.IPv4Interface(address).ip)
    except ValueError as exc:
        raise CniError(ERR_INVALID_CONFIG, "prevResult: address %r is not IPv4 CIDR notation" % address) from exc
    host_mac = None
    for iface in interfaces:
        if isinstance(iface, dict) and not iface.get("sandbox") and str(iface.get("name", "")).startswith("cm_"):
            host_mac = iface.get("mac")
    return ip, interfaces[pod_index].get("mac"), host_mac


# the node agent ------------------------------------------------------------------------------------
AGENT_TIMEOUT = 1.0  # seconds the plugin waits for the agent before carrying on without it


def notify_agent(config, event, endpoint, stderr=None):
    """Tell the node agent ``meshd`` on ``config.agent_socket`` (``agentSocket``) that an endpoint was
    added (``event`` "add": POST /v1/endpoints with the allocation record: containerID, ifname, ip,
    labels, netns, hostInterface, mac, args) or removed ("del": DELETE /v1/endpoints/<container>/<ifname>).

    The rule: a pod never fails because of the agent. An agent that is down, slow (more than
    ``AGENT_TIMEOUT``) or refuses the endpoint gets a warning on stderr and the CNI call succeeds; the
    agent reads the IPAM state (``ipam.read_allocations``) when it starts, so it learns of every pod
    added or removed while it was away. Returns True when the agent took the change, False otherwise
    (also when no ``agentSocket`` is configured)."""
    if not config.agent_socket:
        return False
    stderr = stderr if stderr is not None else sys.stderr
    try:
        from .agent_api import AgentClient

        client = AgentClient(config.agent_socket, timeout=AGENT_TIMEOUT)
        if event == "add":
            client.add_endpoint(endpoint)
        else:
            client.delete_endpoint(endpoint["containerID"], endpoint["ifname"])
        return True
    except Exception as exc:  # never fail the pod: see the rule above
        with contextlib.suppress(Exception):
            stderr.write(
                "clustermesh-cni: warning: could not tell the agent of %s %s/%s (%s); it will find the pod in the "
                "IPAM state when it starts\n" % (event, endpoint.get("containerID"), endpoint.get("ifname"), exc)
            )
        return False


# commands ------------------------------------------------------------------------------------------
def _pod_network():
    from . import pod_network
    from .requirements import missing_requirements

    missing = missing_requirements(pod_network)
    if missing:
        raise CniError(ERR_MISSING_PACKAGE, missing, "the plugin runs with the Python of its first line (#!)")
    return pod_network


def _ipam(config):
    from .ipam import PodIpam

    return PodIpam(config.data_dir, config.name, config.pod_cidr)


def _ipam_error(exc):
    if exc.reason == "exhausted":
        return CniError(ERR_POOL_EXHAUSTED, str(exc), exc.details)
    return CniError(ERR_IO, str(exc), exc.details)


def _pod_error(exc):
    code = {
        "no-netns": ERR_UNKNOWN_CONTAINER,
        "exists": ERR_INTERFACE_EXISTS,
        "check": ERR_CHECK_FAILED,
    }.get(exc.reason, ERR_KERNEL)
    return CniError(code, str(exc), exc.details or "; ".join(exc.problems))


def cmd_add(params, config):
    from .ipam import IpamError

    pn = _pod_network()
    ipam = _ipam(config)
    record = {"labels": config.labels, "args": params["args"], "netns": params["netns"]}
    try:
        ip, new = ipam.allocate(params["container_id"], params["ifname"], record)
    except IpamError as exc:
        raise _ipam_error(exc) from exc
    att = pn.Attachment(params["container_id"], params["ifname"], params["netns"], ip, config.mtu)
    try:
        made = pn.setup(att)
        ipam.update(
            ip,
            params["container_id"],
            params["ifname"],
            hostInterface=made["host_ifname"],
            mac=made["pod_mac"],
            netns=params["netns"],
            labels=config.labels,
            args=params["args"],
        )
    except BaseException as exc:
        if new:  # an address this call took: give it back (one held from an earlier ADD stays)
            try:
                ipam.release(params["container_id"], params["ifname"])
            except IpamError:
                pass
        if isinstance(exc, pn.PodNetworkError):
            raise _pod_error(exc) from exc
        if isinstance(exc, IpamError):
            pn.teardown(params["container_id"], params["ifname"], params["netns"])
            raise _ipam_error(exc) from exc
        raise
    notify_agent(
        config,
        "add",
        dict(
            record,
            containerID=params["container_id"],
            ifname=params["ifname"],
            ip=ip,
            hostInterface=made["host_ifname"],
            mac=made["pod_mac"],
        ),
    )
    interfaces = [
        {"name": made["host_ifname"], "mac": made["host_mac"]},
        {"name": params["ifname"], "mac": made["pod_mac"], "sandbox": params["netns"]},
    ]
    ips = [{"address": ip + "/32", "gateway": pn.GATEWAY, "interface": 1}]
    routes = [{"dst": "0.0.0.0/0", "gw": pn.GATEWAY}]
    return format_result(config.cni_version, interfaces, ips, routes, config.dns, config.prev_result)


def cmd_del(params, config):
    from .ipam import IpamError

    pn = _pod_network()
    try:
        pn.teardown(params["container_id"], params["ifname"], params["netns"])
    except pn.PodNetworkError as exc:
        raise _pod_error(exc) from exc
    try:
        released = _ipam(config).release(params["container_id"], params["ifname"])
    except IpamError as exc:
        raise _ipam_error(exc) from exc
    # every DEL, also one that found no address here (a repeated DEL whose first notice the agent missed)
    notify_agent(
        config,
        "del",
        {"ip": released[0] if released else None, "containerID": params["container_id"], "ifname": params["ifname"]},
    )
    return None


def cmd_check(params, config):
    pn = _pod_network()
    if not config.prev_result:
        raise CniError(ERR_INVALID_CONFIG, "prevResult: missing; CHECK needs the result of the container's ADD")
    ip, pod_mac, host_mac = attachment_from_result(config.prev_result, params["ifname"], params["netns"])
    held = _ipam(config).lookup(params["container_id"], params["ifname"])
    if held != ip:
        raise CniError(
            ERR_CHECK_FAILED,
            "attachment %s/%s: the IPAM state holds %s, prevResult says %s"
            % (params["container_id"], params["ifname"], held or "no address", ip),
        )
    if ipaddress.IPv4Address(ip) not in ipaddress.IPv4Network(config.pod_cidr):
        raise CniError(ERR_CHECK_FAILED, "address %s is outside podCIDR %s" % (ip, config.pod_cidr))
    att = pn.Attachment(params["container_id"], params["ifname"], params["netns"], ip, config.mtu)
    try:
        pn.check(att, pod_mac=pod_mac, host_mac=host_mac)
    except pn.PodNetworkError as exc:
        raise _pod_error(exc) from exc
    return None


def run(environ, stdin_bytes):
    """One plugin invocation: (exit status, stdout text). Never raises for a CNI-level failure."""
    cni_version = "1.0.0"
    try:
        params = read_environment(environ)
        if params["command"] == "VERSION":
            requested = None
            if stdin_bytes and stdin_bytes.strip():
                try:
                    requested = decode_config(stdin_bytes).get("cniVersion")
                except CniError:
                    requested = None
            return 0, json.dumps(version_result(requested if isinstance(requested, str) else None))
        raw = decode_config(stdin_bytes)
        if isinstance(raw.get("cniVersion"), str) and raw.get("cniVersion"):
            cni_version = raw["cniVersion"]
        config = parse_config(raw, params["command"])
        if params["command"] == "ADD":
            return 0, json.dumps(cmd_add(params, config))
        if params["command"] == "DEL":
            cmd_del(params, config)
        else:
            cmd_check(params, config)
        return 0, ""
    except CniError as exc:
        return 1, json.dumps(exc.to_dict(cni_version))
    except Exception as exc:  # a bug or an unexpected system failure: still the spec's error JSON
        return 1, json.dumps(
            CniError(
                ERR_IO if isinstance(exc, OSError) else ERR_INTERNAL, "%s: %s" % (type(exc).__name__, exc)
            ).to_dict(cni_version)
        )


def main(argv=None):
    """Entry point ``cni`` of the node bundle."""
    command = os.environ.get("CNI_COMMAND", "")
    data = b""
    if command != "VERSION" or not sys.stdin.isatty():
        try:
            data = sys.stdin.buffer.read()
        except OSError as exc:
            out = CniError(ERR_IO, "cannot read the network configuration from stdin: %s" % exc).to_dict("1.0.0")
            sys.stdout.write(json.dumps(out) + "\n")
            return 1
    status, out = run(os.environ, data)
    if out:
        sys.stdout.write(out + "\n")
    sys.stdout.flush()
    return status
