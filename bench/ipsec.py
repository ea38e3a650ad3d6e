"""IPsec benchmarks (issue 7): what a planned 50-node mesh installs and how fast, and ESP's cost on throughput.

    .venv/bin/python bench/ipsec.py [--rounds N] (--all | --plan | --datapath) [--time S] [--output FILE]

plan      On this machine (its kernel has XFRM but no ESP). A planned mesh of 50 nodes: 2 clusters x 25
          nodes, node IPs 198.18.1.11.. / 198.18.2.11.., pod CIDRs 10.1.N.0/24 / 10.2.N.0/24, one
          rfc4106(gcm(aes)) 128 key. Peer modes as routing_plan.plan_routing decides them: ``hybrid``
          (underlay /24 per cluster: the 24 peers of the node's own cluster direct, the 25 of the other
          tunnel), ``direct`` (one /16 underlay: every peer direct), ``tunnel`` (every peer tunnelled),
          and ``hybrid_node_encryption`` (hybrid with node_encryption). Per variant: states and
          policies per node (every one of the 50), the actions diff_ipsec gives against an empty
          kernel, and the actions of a rotation's three steps (key file [old, new] encrypt old ->
          encrypt new -> key file [new]), each diffed against the previous step's plan. Timed per
          round: plan_ipsec + diff_ipsec of all 50 nodes against an empty kernel (per node: the mean),
          and the POLICIES of hybrid node c1-n1 applied for real through xfrm.XfrmSocket in a scratch
          network namespace (kernel_features.call_in_scratch_netns: a forked child, never the root
          namespace), dumped back (the count must match the plan, and diff_ipsec must then ask for
          states only), and removed (ipsec.removal). States are counted only: this kernel has no ESP.
datapath  Inside a virtme-ng VM with Debian's kernel (ESP): ``tools/vm-run -- .venv/bin/python
          bench/ipsec.py --datapath``. Two namespaces cmbi-a / cmbi-b, a veth between them,
          198.18.251.1/24 and .2/24 (IPsec: node-to-node, node_encryption=True, the states and policies
          of plan_ipsec installed with XfrmSocket at both ends) plus .11/24 and .12/24 on the same veth
          (plain: no policy matches them). Per round, plain and IPsec one after the other (order
          alternating): iperf3, one TCP stream, --time seconds; the out state's byte counter proves the
          IPsec run went through ESP and the plain one did not. Ratio ipsec/plain per round. Then, in a
          scratch namespace of the VM: the 50-node hybrid plan of c1-n1 applied (states and policies,
          real ESP), the rotation's three steps, and removal, timed. TCG emulation: absolute numbers
          are not those of real hardware; only the ratio means something.
all       plan here, then datapath through tools/vm-run (results dir build/vm/bench-ipsec), merged into
          one document: bench/results/ipsec.json (``make bench``).

Namespaces are removed at the end, also on failure (by name: cmbi-a, cmbi-b only).
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import signal
import subprocess
import sys
import time
import traceback

import benchlib
from datapath import MeasurementError, log, parse_iperf3, run

NAME = "ipsec"
CLUSTERS = ((1, "198.18.1.%d", "10.1.%d.0/24", "10.1.0.0/16"), (2, "198.18.2.%d", "10.2.%d.0/24", "10.2.0.0/16"))
NODES_PER_CLUSTER = 25
VARIANTS = {  # name -> (routing mode, underlay prefix length, node_encryption)
    "hybrid": ("hybrid", 24, False),
    "direct": ("direct", 16, False),
    "tunnel": ("tunnel", 24, False),
    "hybrid_node_encryption": ("hybrid", 24, True),
}
APPLY_NODE = "c1-n1"
VM_RESULTS = os.path.join(benchlib.REPO_ROOT, "build", "vm", "bench-ipsec")
VM_DOC = "ipsec-datapath.json"
NS_A, NS_B = "cmbi-a", "cmbi-b"
IP_A, IP_B = "198.18.251.1", "198.18.251.2"
PLAIN_A, PLAIN_B = "198.18.251.11", "198.18.251.12"
POD_A, POD_B = "10.251.1.0/24", "10.251.2.0/24"
IPERF_PORT = 5201
CLONE_NEWNET = 0x40000000
TCG_NOTE = (
    "measured in a virtme-ng VM under QEMU TCG (no KVM): CPU and crypto are emulated, so absolute "
    "throughput and times are not those of real hardware; only the ratio IPsec/plain is meaningful"
)
STATES_NOTE = "states: check mode count only on this kernel (XFRM without ESP: states cannot be installed here)"


def lib():
    """The collection's library, imported from the working tree (build/pytest-collections)."""
    benchlib.ensure_collection_link()
    if benchlib.COLLECTIONS_ROOT not in sys.path:
        sys.path.insert(0, benchlib.COLLECTIONS_ROOT)
    from ansible_collections.clustermesh.core.plugins.module_utils import (
        ipsec,
        ipsec_state,
        kernel_features,
        routing_plan,
        xfrm,
    )

    return ipsec, ipsec_state, kernel_features, routing_plan, xfrm


def new_key(key_id: int):
    """A random rfc4106(gcm(aes)) 128 key (AES-128 + 4-byte salt, ICV 128); its bytes never printed."""
    ipsec = lib()[0]
    return ipsec.parse_key_line("%d %s %s 128" % (key_id, ipsec.AEAD_ALGORITHM, os.urandom(20).hex()))


# --------------------------------------------------------------------------------------------
# the planned mesh
# --------------------------------------------------------------------------------------------


def mesh_nodes() -> list[dict]:
    nodes = []
    for cluster, ip, pod, _block in CLUSTERS:
        for n in range(1, NODES_PER_CLUSTER + 1):
            nodes.append(
                {
                    "name": "c%d-n%d" % (cluster, n),
                    "cluster": "cluster%d" % cluster,
                    "ip": ip % (10 + n),
                    "pod_cidrs": [pod % n],
                }
            )
    return nodes


BLOCK_CIDRS = [block for _c, _ip, _pod, block in CLUSTERS]


def node_inputs(nodes: list[dict], name: str, variant: str) -> tuple[dict, list[dict], bool]:
    """(node, peers with their mode as routing_plan decides it, node_encryption) for plan_ipsec."""
    routing_plan = lib()[3]
    mode, prefixlen, node_encryption = VARIANTS[variant]
    node = next(n for n in nodes if n["name"] == name)
    peers = [n for n in nodes if n["name"] != name]
    modes = routing_plan.plan_routing(node, peers, mode, prefixlen).peer_modes
    return node, [dict(p, mode=modes[p["name"]]) for p in peers], node_encryption


def plan_node(nodes, name, variant, keys, encrypt_key_id):
    ipsec = lib()[0]
    node, peers, node_encryption = node_inputs(nodes, name, variant)
    return ipsec.plan_ipsec(node, peers, keys, encrypt_key_id, BLOCK_CIDRS, node_encryption=node_encryption)


def rotation_actions(nodes, name, variant, old, new) -> dict:
    """Actions (per verb and total) of the rotation's three steps on one node, each against the previous plan."""
    ipsec = lib()[0]
    steps = [
        ("install_old", [old], old.key_id),
        ("add_new_key", [old, new], old.key_id),
        ("encrypt_new", [old, new], new.key_id),
        ("remove_old_key", [new], new.key_id),
    ]
    out = {}
    states, policies = [], []
    for step, keys, encrypt in steps:
        plan = plan_node(nodes, name, variant, keys, encrypt)
        changes = ipsec.diff_ipsec(states, policies, plan)
        if step != "install_old":
            summary = {verb: n for verb, n in changes.summary().items() if n}
            out[step] = dict(summary, total=len(changes.actions))
        states, policies = plan.states, plan.policies
    return out


def mesh_counts(nodes, variant, key) -> dict:
    """States, policies and actions against an empty kernel for every node; peer modes of c1-n1."""
    ipsec = lib()[0]
    per_node = {}
    for node in nodes:
        plan = plan_node(nodes, node["name"], variant, [key], key.key_id)
        changes = ipsec.diff_ipsec([], [], plan)
        kinds = {}
        for policy in plan.policies:
            kind = "%s_%s" % (policy.direction, ipsec.policy_kind(policy))
            kinds[kind] = kinds.get(kind, 0) + 1
        per_node[node["name"]] = dict(plan.counts(), actions=len(changes.actions), policy_kinds=kinds)
    first = plan_node(nodes, APPLY_NODE, variant, [key], key.key_id)
    modes = {}
    for mode in first.peer_modes.values():
        modes[mode] = modes.get(mode, 0) + 1

    def spread(field):
        values = [c[field] for c in per_node.values()]
        return {"min": min(values), "max": max(values), "total_mesh": sum(values)}

    return {
        "node": APPLY_NODE,
        "peer_modes": modes,
        "per_node": {k: per_node[APPLY_NODE][k] for k in ("states", "policies", "actions")},
        "policy_kinds": per_node[APPLY_NODE]["policy_kinds"],
        "states": spread("states"),
        "policies": spread("policies"),
        "actions_from_empty": spread("actions"),
    }


def time_plan_diff(nodes, variant, key) -> float:
    """Seconds to plan_ipsec + diff_ipsec (empty kernel) every node of the mesh, peer modes given."""
    ipsec = lib()[0]
    inputs = [node_inputs(nodes, n["name"], variant) for n in nodes]
    started = time.perf_counter()
    for node, peers, node_encryption in inputs:
        plan = ipsec.plan_ipsec(node, peers, [key], key.key_id, BLOCK_CIDRS, node_encryption=node_encryption)
        ipsec.diff_ipsec([], [], plan)
    return time.perf_counter() - started


def _timed_apply(sock, changes) -> float:
    ipsec_state = lib()[1]
    started = time.perf_counter()
    ipsec_state._apply(sock, changes)  # the module's own loop: getattr(sock, verb)(obj), errors named
    return time.perf_counter() - started


def apply_policies_here(plan) -> dict:
    """In the caller's (scratch) namespace: the plan's policies added, dumped, diffed, removed; times in ms."""
    ipsec, _ipsec_state, _kf, _rp, xfrm = lib()
    changes = ipsec.diff_ipsec([], [], plan)
    changes.actions = [(verb, obj) for verb, obj in changes.actions if verb.endswith("_policy")]
    with xfrm.XfrmSocket() as sock:
        add_s = _timed_apply(sock, changes)
        started = time.perf_counter()
        dumped = sock.policies()
        dump_s = time.perf_counter() - started
        again = ipsec.diff_ipsec([], dumped, plan)
        removal = ipsec.removal([], sock.policies())
        remove_s = _timed_apply(sock, removal)
        left = len(sock.policies())
    return {
        "policies_added": len(changes.actions),
        "policies_in_kernel": len(dumped),
        "rediff_policy_actions": sum(1 for verb, _o in again.actions if verb.endswith("_policy")),
        "rediff_state_actions": sum(1 for verb, _o in again.actions if verb.endswith("_state")),
        "removed": len(removal.actions),
        "left": left,
        "add_ms": add_s * 1000,
        "dump_ms": dump_s * 1000,
        "remove_ms": remove_s * 1000,
    }


def run_plan(args) -> dict:
    kernel_features = lib()[2]
    nodes = mesh_nodes()
    old, new = new_key(3), new_key(4)
    log("plan: counting states, policies and actions per node for %d nodes, %d variants" % (len(nodes), len(VARIANTS)))
    counts = {}
    for variant in VARIANTS:
        counts[variant] = mesh_counts(nodes, variant, old)
        counts[variant]["rotation"] = rotation_actions(nodes, APPLY_NODE, variant, old, new)
        c = counts[variant]
        log(
            "plan: %-24s %s: %d states, %d policies per node; rotation actions %s"
            % (
                variant,
                c["peer_modes"],
                c["per_node"]["states"],
                c["per_node"]["policies"],
                {s: v["total"] for s, v in c["rotation"].items()},
            )
        )
    hybrid_plan = plan_node(nodes, APPLY_NODE, "hybrid", [old], old.key_id)
    samples: dict[str, list] = {}
    applies = []
    for r in range(1, args.rounds + 1):
        for variant in VARIANTS:
            seconds = time_plan_diff(nodes, variant, old)
            samples.setdefault("plan_diff_ms_per_node.%s" % variant, []).append(seconds * 1000 / len(nodes))
            samples.setdefault("plan_diff_s_all_nodes.%s" % variant, []).append(seconds)
        result = kernel_features.call_in_scratch_netns(lambda: apply_policies_here(hybrid_plan), timeout=120)
        if (
            result["policies_in_kernel"] != len(hybrid_plan.policies)
            or result["left"]
            or result["rediff_policy_actions"]
        ):
            raise MeasurementError("policies in the scratch namespace do not match the plan: %s" % result)
        applies.append(result)
        for key in ("add_ms", "dump_ms", "remove_ms"):
            samples.setdefault("policy_%s" % key, []).append(result[key])
        log(
            "plan: round %d/%d: plan+diff %.2f ms/node (hybrid), %d policies applied in %.1f ms, removed in %.1f ms "
            "(load %s)"
            % (
                r,
                args.rounds,
                samples["plan_diff_ms_per_node.hybrid"][-1],
                result["policies_added"],
                result["add_ms"],
                result["remove_ms"],
                benchlib.load_average(),
            )
        )
    units = {name: ("ms" if "_ms" in name else "s") for name in samples}
    return benchlib.section(
        samples,
        units=units,
        notes=[
            STATES_NOTE,
            "mesh: 2 clusters x %d nodes; one rfc4106(gcm(aes)) 128 key; counts are per node (all nodes alike "
            "within a variant: min = max)" % NODES_PER_CLUSTER,
            "plan_diff_*: plan_ipsec + diff_ipsec against an empty kernel, every node of the mesh (peer modes "
            "from routing_plan computed before the clock starts); *_ms_per_node is the mean",
            "policy_*: node %s (hybrid), policies only, added through XfrmSocket in a scratch network namespace "
            "of this machine's kernel (%s), dumped back, removed" % (APPLY_NODE, benchlib.host_facts()["kernel"]),
            "rotation: actions of each step diffed against the previous step's plan (key file [old] -> [old, new] "
            "-> encrypt new -> [new])",
        ],
        extra={"counts": counts, "policy_apply_runs": applies, "nodes": len(nodes)},
    )


# --------------------------------------------------------------------------------------------
# the datapath (inside the VM)
# --------------------------------------------------------------------------------------------


def enter_netns(name: str) -> None:
    """setns() this process into network namespace ``name`` (only ever called in a forked child)."""
    libc = ctypes.CDLL(None, use_errno=True)
    fd = os.open("/run/netns/%s" % name, os.O_RDONLY)
    try:
        if libc.setns(fd, CLONE_NEWNET) != 0:
            err = ctypes.get_errno()
            raise OSError(err, "setns(%s): %s" % (name, os.strerror(err)))
    finally:
        os.close(fd)


def in_netns(name: str, func, timeout: float = 300):
    """func() in a forked child inside network namespace ``name`` (JSON-serialisable result)."""
    kernel_features = lib()[2]

    def child():
        enter_netns(name)
        return func()

    return kernel_features.call_in_scratch_netns(child, timeout=timeout)


def ns(name: str, *argv: str, timeout: float = 60, check: bool = True) -> str:
    cmd = ["ip", "netns", "exec", name, *argv]
    if check:
        return run(cmd, " ".join(argv[:3]) + " in " + name, timeout=timeout)
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, check=False).stdout


def remove_namespaces() -> None:
    for name in (NS_A, NS_B):
        if os.path.exists("/run/netns/%s" % name):
            subprocess.run(["ip", "netns", "del", name], capture_output=True, check=False)


def make_namespaces() -> None:
    remove_namespaces()
    for name in (NS_A, NS_B):
        run(["ip", "netns", "add", name], "ip netns add %s" % name)
        run(["ip", "-n", name, "link", "set", "lo", "up"], "lo up in %s" % name)
    run(
        ["ip", "-n", NS_A, "link", "add", "cmbi0", "type", "veth", "peer", "name", "cmbi0", "netns", NS_B],
        "veth cmbi0 between %s and %s" % (NS_A, NS_B),
    )
    for name, addresses in ((NS_A, (IP_A, PLAIN_A)), (NS_B, (IP_B, PLAIN_B))):
        for address in addresses:
            run(["ip", "-n", name, "addr", "add", address + "/24", "dev", "cmbi0"], "address in %s" % name)
        run(["ip", "-n", name, "link", "set", "cmbi0", "up"], "cmbi0 up in %s" % name)


def pair_plan(keys, encrypt_key_id, side: str):
    ipsec = lib()[0]
    a = {"name": "a", "cluster": "cluster1", "ip": IP_A, "pod_cidrs": [POD_A]}
    b = {"name": "b", "cluster": "cluster1", "ip": IP_B, "pod_cidrs": [POD_B]}
    node, peer = (a, b) if side == "a" else (b, a)
    return ipsec.plan_ipsec(
        node, [dict(peer, mode="direct")], keys, encrypt_key_id, ["10.251.0.0/16"], node_encryption=True
    )


def install_pair(key) -> dict:
    ipsec = lib()[0]
    counts = {}
    for name, side in ((NS_A, "a"), (NS_B, "b")):
        plan = pair_plan([key], key.key_id, side)

        def apply(plan=plan):
            xfrm = lib()[4]
            with xfrm.XfrmSocket() as sock:
                changes = ipsec.diff_ipsec(sock.states(), sock.policies(), plan)
                ms = _timed_apply(sock, changes) * 1000
                return {"actions": len(changes.actions), "states": len(sock.states()), "ms": ms}

        counts[name] = in_netns(name, apply)
    return counts


def esp_bytes(name: str, src: str) -> int:
    """Bytes through the out state ``src`` -> peer in ``name`` (``ip -s xfrm state``'s lifetime current; the
    output, which holds keys, is parsed here and never printed)."""
    out = ns(name, "ip", "-s", "xfrm", "state")
    total, current_src, take = 0, None, False
    for line in out.splitlines():
        words = line.split()
        if line.startswith("src "):
            current_src = words[1]
        elif line.strip() == "lifetime current:":
            take = current_src == src
        elif take and "(bytes)," in line:
            total += int(words[0].split("(")[0])
            take = False
    return total


def xfrm_errors(name: str) -> dict:
    """The non-zero counters of /proc/net/xfrm_stat in namespace ``name`` (drops on the XFRM path)."""
    out = ns(name, "cat", "/proc/net/xfrm_stat", check=False)
    counters = (line.split() for line in out.splitlines())
    return {words[0]: int(words[1]) for words in counters if len(words) == 2 and words[1] != "0"}


class Server:
    """iperf3 -s in cmbi-b (stopped by its PID)."""

    def __init__(self):
        self.proc = subprocess.Popen(
            ["ip", "netns", "exec", NS_B, "iperf3", "-s", "-p", str(IPERF_PORT)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
        )

    def close(self):
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def iperf3(src: str, dst: str, seconds: float) -> dict:
    for attempt in range(10):
        out = ns(
            NS_A,
            "iperf3", "-c", dst, "-B", src, "-p", str(IPERF_PORT), "-t", "%g" % seconds, "-J",
            timeout=seconds + 90,
            check=False,
        )  # fmt: skip
        try:
            return parse_iperf3(out)
        except MeasurementError as exc:
            if attempt == 9 or "connect" not in str(exc) and "busy" not in str(exc):
                raise
            time.sleep(1)
    raise AssertionError("unreachable")


def scratch_apply(nodes, old, new) -> dict:
    """In a scratch namespace (real ESP): c1-n1's hybrid plan applied, the rotation's three steps, removal."""
    ipsec, _s, _k, _r, xfrm = lib()
    steps = [
        ("apply", [old], old.key_id),
        ("rotate_add_new_key", [old, new], old.key_id),
        ("rotate_encrypt_new", [old, new], new.key_id),
        ("rotate_remove_old_key", [new], new.key_id),
    ]
    plans = [(step, plan_node(nodes, APPLY_NODE, "hybrid", keys, encrypt)) for step, keys, encrypt in steps]
    out = {}
    with xfrm.XfrmSocket() as sock:
        for step, plan in plans:
            changes = ipsec.diff_ipsec(sock.states(), sock.policies(), plan)
            ms = _timed_apply(sock, changes) * 1000
            states, policies = sock.states(), sock.policies()
            if len(states) != len(plan.states) or len(policies) != len(plan.policies):
                raise MeasurementError(
                    "%s: the kernel holds %d states and %d policies, the plan %d and %d"
                    % (step, len(states), len(policies), len(plan.states), len(plan.policies))
                )
            out[step] = {"ms": ms, "actions": len(changes.actions), "states": len(states), "policies": len(policies)}
        changes = ipsec.removal(sock.states(), sock.policies())
        ms = _timed_apply(sock, changes) * 1000
        left = len(sock.states()) + len(sock.policies())
        out["remove"] = {"ms": ms, "actions": len(changes.actions), "left": left}
    return out


def crypto_drivers(names=("rfc4106(gcm(aes))", "gcm(aes)", "aes")) -> dict:
    """The kernel's implementation (driver, priority) of each algorithm in /proc/crypto, and whether the CPU
    has AES-NI: what explains ESP's cost in the VM."""
    found: dict = {}
    entry: dict = {}
    try:
        with open("/proc/crypto") as f:
            lines = f.read().splitlines() + [""]
    except OSError:
        lines = []
    for line in lines:
        if not line.strip():
            name = entry.get("name")
            if name in names and int(entry.get("priority", 0)) > found.get(name, {}).get("priority", -1):
                found[name] = {"driver": entry.get("driver"), "priority": int(entry.get("priority", 0))}
            entry = {}
            continue
        key, _sep, value = line.partition(":")
        entry[key.strip()] = value.strip()
    try:
        with open("/proc/cpuinfo") as f:
            flags = next((line.split(":", 1)[1].split() for line in f if line.startswith("flags")), [])
    except OSError:
        flags = []
    return {"algorithms": found, "cpu_aes_ni": "aes" in flags}


def run_datapath(args) -> dict:
    kernel_features = lib()[2]
    subprocess.run(["modprobe", "esp4"], capture_output=True, check=False)
    nodes = mesh_nodes()
    samples: dict[str, list] = {}
    runs = []
    server = None
    try:
        make_namespaces()
        key = new_key(3)
        installed = install_pair(key)
        log("datapath: IPsec between %s and %s: %s" % (IP_A, IP_B, installed))
        server = Server()
        time.sleep(1)
        for r in range(1, args.rounds + 1):
            order = ("plain", "ipsec") if r % 2 else ("ipsec", "plain")
            for case in order:
                src, dst = (PLAIN_A, PLAIN_B) if case == "plain" else (IP_A, IP_B)
                before = esp_bytes(NS_A, IP_A)
                result = iperf3(src, dst, args.time)
                esp = esp_bytes(NS_A, IP_A) - before
                sent = result["sent_gbps"] * 1e9 / 8 * (result["seconds"] or args.time)
                if case == "ipsec" and esp < 0.9 * sent:
                    raise MeasurementError("IPsec run: only %d ESP bytes for ~%d sent: not encrypted" % (esp, sent))
                if case == "plain" and esp > 1e6:
                    raise MeasurementError("plain run: %d bytes went through ESP" % esp)
                samples.setdefault("%s_gbps" % case, []).append(result["gbps"])
                runs.append(dict(result, case=case, round=r, esp_bytes=esp))
                log(
                    "datapath: round %d/%d %-5s %.3f Gbit/s (ESP bytes %d)"
                    % (r, args.rounds, case, result["gbps"], esp)
                )
            scratch = kernel_features.call_in_scratch_netns(lambda: scratch_apply(nodes, new_key(3), new_key(4)), 600)
            for step, values in scratch.items():
                samples.setdefault("%s_ms" % step, []).append(values["ms"])
            runs.append({"round": r, "scratch": scratch})
            log(
                "datapath: round %d/%d 50-node plan of %s: %d states + %d policies applied in %.0f ms, removed in "
                "%.0f ms (load %s)"
                % (
                    r,
                    args.rounds,
                    APPLY_NODE,
                    scratch["apply"]["states"],
                    scratch["apply"]["policies"],
                    scratch["apply"]["ms"],
                    scratch["remove"]["ms"],
                    benchlib.load_average(),
                )
            )
        xfrm_stat = {name: xfrm_errors(name) for name in (NS_A, NS_B)}
        log("datapath: /proc/net/xfrm_stat, non-zero: %s" % xfrm_stat)
    finally:
        if server is not None:
            server.close()
        remove_namespaces()
    units = {name: ("Gbit/s" if name.endswith("_gbps") else "ms") for name in samples}
    return benchlib.section(
        samples,
        ratios={"ipsec_over_plain": ("ipsec_gbps", "plain_gbps")},
        units=units,
        notes=[
            TCG_NOTE,
            "throughput: iperf3, one TCP stream, %g s, %s -> %s over a veth between namespaces %s and %s; IPsec: "
            "ESP tunnel mode, rfc4106(gcm(aes)) 128 (AES-128), node_encryption=True, states and policies of "
            "plan_ipsec installed with XfrmSocket at both ends; plain: addresses %s -> %s on the same veth, which "
            "no policy matches; plain and IPsec alternate within each round"
            % (args.time, IP_A, IP_B, NS_A, NS_B, PLAIN_A, PLAIN_B),
            "*_ms: node %s of the 50-node hybrid mesh in a scratch namespace of the VM (real ESP): apply = "
            "states + policies from an empty kernel; rotate_*: the rotation's three steps; remove = "
            "ipsec.removal" % APPLY_NODE,
            "extra.pair_install: the first ESP state of the VM's boot also loads esp4 and the crypto modules; "
            "extra.xfrm_stat: non-zero /proc/net/xfrm_stat counters of both namespaces after the runs; "
            "extra.crypto: the kernel's implementation of the AEAD in the VM and whether the emulated CPU has AES-NI",
        ],
        extra={
            "vm_host": benchlib.host_facts(),
            "crypto": crypto_drivers(),
            "xfrm_stat": xfrm_stat,
            "pair_install": installed,
            "runs": runs,
        },
    )


# --------------------------------------------------------------------------------------------
# main
# --------------------------------------------------------------------------------------------


def run_in_vm(args) -> dict:
    """This script's --datapath inside tools/vm-run; returns its datapath section."""
    cmd = [
        os.path.join(benchlib.REPO_ROOT, "tools", "vm-run"),
        "--results",
        VM_RESULTS,
        "--timeout",
        str(args.vm_timeout),
        "--",
        os.path.join(benchlib.REPO_ROOT, ".venv", "bin", "python"),
        os.path.join("bench", "ipsec.py"),
        "--datapath",
        "--rounds",
        str(args.rounds),
        "--time",
        "%g" % args.time,
        "--output",
        os.path.join(VM_RESULTS, VM_DOC),
    ]
    log("datapath: %s" % " ".join(cmd))
    proc = subprocess.run(cmd, cwd=benchlib.REPO_ROOT, check=False)
    if proc.returncode != 0:
        raise RuntimeError("tools/vm-run --datapath failed (exit %d)" % proc.returncode)
    with open(os.path.join(VM_RESULTS, VM_DOC)) as f:
        doc = json.load(f)
    return doc["benchmarks"]["datapath"]


def report(benchmarks: dict) -> str:
    parts = []
    plan = benchmarks.get("plan")
    if plan:
        rows = []
        for variant, c in plan["extra"]["counts"].items():
            rot = c["rotation"]
            rows.append(
                (
                    variant,
                    " ".join("%s=%d" % kv for kv in sorted(c["peer_modes"].items())),
                    c["per_node"]["states"],
                    c["per_node"]["policies"],
                    c["states"]["total_mesh"],
                    c["policies"]["total_mesh"],
                    plan["medians"]["plan_diff_ms_per_node.%s" % variant],
                    "/".join(str(rot[s]["total"]) for s in ("add_new_key", "encrypt_new", "remove_old_key")),
                )
            )
        parts.append(
            benchlib.format_table(
                ("variant", "peers", "states", "policies", "mesh states", "mesh policies", "plan+diff ms", "rotation"),
                rows,
            )
        )
        m = plan["medians"]
        parts.append(
            "policies of %s (hybrid) in a scratch netns here: add %.1f ms, dump %.1f ms, remove %.1f ms (%s)"
            % (APPLY_NODE, m["policy_add_ms"], m["policy_dump_ms"], m["policy_remove_ms"], STATES_NOTE)
        )
    dp = benchmarks.get("datapath")
    if dp:
        m = dp["medians"]
        parts.append(
            benchlib.format_table(
                ("metric", "median", "min", "max"),
                [(k, v["median"], v["min"], v["max"]) for k, v in dp["spread"].items()],
            )
        )
        parts.append(
            "ipsec/plain throughput ratio (median of rounds): %s (TCG)" % dp["ratios"]["ipsec_over_plain"]["median"]
        )
        del m
    return "\n\n".join(parts)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n", maxsplit=1)[0])
    what = parser.add_mutually_exclusive_group(required=True)
    what.add_argument("--all", action="store_true", help="--plan here, then --datapath through tools/vm-run")
    what.add_argument("--plan", action="store_true", help="the planned 50-node mesh (this machine)")
    what.add_argument("--datapath", action="store_true", help="throughput plain vs IPsec (inside the VM)")
    parser.add_argument("--rounds", type=int, default=benchlib.MIN_ROUNDS)
    parser.add_argument("--time", type=float, default=4.0, help="seconds per iperf3 sample (default 4)")
    parser.add_argument("--vm-timeout", type=float, default=1800, help="seconds before the VM is killed")
    parser.add_argument("--output", help="result file (default bench/results/ipsec.json)")
    args = parser.parse_args(argv)
    if args.rounds < 1:
        parser.error("--rounds must be at least 1")
    if args.datapath and not os.environ.get("CLUSTERMESH_IN_VM"):
        parser.error("--datapath runs inside the VM: tools/vm-run -- .venv/bin/python bench/ipsec.py --datapath")
    if os.geteuid() != 0:
        parser.error("must run as root (network namespaces, XFRM)")
    started = time.monotonic()
    load_start = benchlib.load_average()
    benchmarks = {}
    failure = None
    try:
        if args.plan or args.all:
            benchmarks["plan"] = run_plan(args)
        if args.datapath:
            benchmarks["datapath"] = run_datapath(args)
        if args.all:
            benchmarks["datapath"] = run_in_vm(args)
    except Exception:  # noqa: BLE001 - the result document records what failed
        failure = traceback.format_exc()
    output = args.output
    if output is None and args.datapath:
        output = os.path.join(os.environ.get("CLUSTERMESH_VM_RESULTS", VM_RESULTS), VM_DOC)
    text = failure or report(benchmarks)
    if failure:
        benchmarks["error"] = {"traceback": failure}
    benchlib.finish(NAME, benchmarks=benchmarks, rounds=args.rounds, started=started, load_start=load_start,
                    report=text, output=output)  # fmt: skip
    return 1 if failure else 0


if __name__ == "__main__":
    sys.exit(main())
