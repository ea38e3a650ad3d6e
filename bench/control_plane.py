"""Control-plane benchmarks (issue 3), on a lab of prefix ``cmb``.

    .venv/bin/python bench/control_plane.py [--rounds N] [--only site|onboard|watch] [--output PATH]

site     site.yml from scratch on a fresh default lab (2 clusters x 2 nodes) and the no-change
         rerun right after it, every round: both wall times, ratio rerun / scratch.
onboard  the site.yml run that adds cluster3 (host c3-n1 on the existing segment dc2) and the
         no-change rerun right after it, every round: ratio onboard / rerun. Between rounds
         cluster3 is removed again (default topology + site.yml) and its certificates are
         deleted from the lab's PKI, so that every round onboards a cluster never seen before.
watch    10,000 keys written in cluster2 (admin, from c2-n2, batched puts) seen by a watcher
         on c1-n2 through cluster2's HAProxy (read-only remote user), and, in the same round,
         by the same watcher on c2-n1 straight at cluster2's etcd (admin): events/s and p50/p99
         lag (receive time - write timestamp), ratios proxy / direct.

Prints the load average, a table of medians and ratios, and writes bench/results/control_plane.json.
The lab is removed at the end (also on failure).
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import traceback

import benchlib
import yaml
from benchlib import labtools

PREFIX = "cmb"
NAME = "control_plane"
SITE = os.path.join(benchlib.REPO_ROOT, "playbooks", "site.yml")
DEFAULT_TOPOLOGY = os.path.join(benchlib.REPO_ROOT, "tools", "labkit", "default-topology.yml")
INVENTORY_DIR = os.path.dirname(labtools.inventory_path(PREFIX))
PKI_DIR = os.path.join(INVENTORY_DIR, "clustermesh-pki")
PLAYBOOK_TIMEOUT = 900
WATCH_KEYS = 10_000
WATCH_BATCH = 100  # puts per etcd transaction (etcd's --max-txn-ops defaults to 128)
WATCH_TIMEOUT = 120.0  # per watcher process, and for the writer

# Watcher: list-then-watch a prefix with KVStoreClient.watch_prefix; print one "ready" JSON line
# after the initial listing, then, once every expected put was seen (or at the deadline), a JSON
# summary with each event's lag in microseconds. argv: config file, prefix, expected, timeout.
WATCHER = r"""
import json, sys, threading, time
from ansible_collections.clustermesh.core.plugins.module_utils.kvstore_client import EVENT_PUT, KVStoreClient
from ansible_collections.clustermesh.core.plugins.module_utils.kvstore_config import load_etcd_config

config, prefix, expected, timeout = sys.argv[1], sys.argv[2], int(sys.argv[3]), float(sys.argv[4])
client = KVStoreClient.from_config(load_etcd_config(config), timeout=10)
watcher = client.watch_prefix(prefix)
timer = threading.Timer(timeout, watcher.stop)
timer.daemon = True
timer.start()
lags, recv, first_ts, updates, seen = [], [], None, 0, set()
error = None
try:
    for update in watcher:
        now = time.time_ns()
        if update.kind == "initial":
            print(json.dumps({"ready": True, "initial_keys": len(update.events)}), flush=True)
            continue
        updates += 1
        for event in update.events:
            if event.type != EVENT_PUT or event.key in seen:
                continue
            seen.add(event.key)
            ts = json.loads(event.value)["ts"]
            first_ts = ts if first_ts is None else min(first_ts, ts)
            lags.append((now - ts) // 1000)
            recv.append(now)
        if len(seen) >= expected:
            break
except Exception as exc:
    error = "%s: %s" % (type(exc).__name__, exc)
finally:
    timer.cancel()
    watcher.stop()
print(json.dumps({
    "user": client.user, "endpoints": client.endpoints, "received": len(seen), "updates": updates,
    "reconnects": watcher.reconnects, "relists": watcher.relists, "error": error,
    "first_write_ns": first_ts, "first_recv_ns": recv[0] if recv else None,
    "last_recv_ns": recv[-1] if recv else None, "lags_us": lags,
}))
client.close()
"""

# Writer: cluster2's admin writes COUNT keys under PREFIX in transactions of BATCH puts, each value
# carrying its own time.time_ns(). argv: prefix, count, batch.
WRITER = r"""
import json, sys, time
from pyetcd import etcdrpc
from ansible_collections.clustermesh.core.plugins.module_utils.kvstore_client import KVStoreClient
from ansible_collections.clustermesh.core.plugins.module_utils.kvstore_config import load_etcd_config

prefix, count, batch = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
client = KVStoreClient.from_config(load_etcd_config("/etc/clustermesh/kvstore.yaml"), timeout=30)
client.get("cilium/.heartbeat")  # connect (TLS handshake) before the clock starts
kv = client.stub("KV")
start = time.time_ns()
for base in range(0, count, batch):
    ops = [
        etcdrpc.RequestOp(request_put=etcdrpc.PutRequest(
            key=("%s%05d" % (prefix, i)).encode(),
            value=json.dumps({"ts": time.time_ns(), "seq": i}).encode()))
        for i in range(base, min(count, base + batch))
    ]
    kv.Txn(etcdrpc.TxnRequest(success=ops), timeout=30)
end = time.time_ns()
print(json.dumps({"user": client.user, "endpoints": client.endpoints, "keys": count,
                  "start_ns": start, "end_ns": end}))
client.close()
"""

CLEANUP = r"""
import json
from ansible_collections.clustermesh.core.plugins.module_utils.kvstore_client import KVStoreClient
from ansible_collections.clustermesh.core.plugins.module_utils.kvstore_config import load_etcd_config
client = KVStoreClient.from_config(load_etcd_config("/etc/clustermesh/kvstore.yaml"), timeout=30)
print(json.dumps({"deleted": client.delete_prefix("cilium/state/bench/")}))
"""


def log(msg: str) -> None:
    print("[%s] %s" % (time.strftime("%H:%M:%S"), msg), flush=True)


class Lab:
    """What this process knows about lab cmb: whether it holds a converged default mesh."""

    def __init__(self):
        self.converged_default = False

    def fresh(self) -> float:
        self.converged_default = False
        benchlib.lab_down(PREFIX)
        return benchlib.lab_up(PREFIX)

    def ensure_converged_default(self) -> None:
        if self.converged_default:
            return
        log("setup: fresh default lab + site.yml (not measured)")
        self.fresh()
        benchlib.require_ok(benchlib.run_playbook(PREFIX, SITE, timeout=PLAYBOOK_TIMEOUT), "setup site.yml")
        self.converged_default = True


def site_yml(what: str) -> benchlib.TimedRun:
    run = benchlib.require_ok(benchlib.run_playbook(PREFIX, SITE, timeout=PLAYBOOK_TIMEOUT), what)
    log("  %-34s %6.1f s  %3d changed" % (what, run.wall_s, len(run.changed)))
    return run


# --------------------------------------------------------------------------------------------
# 1. site.yml from scratch and the no-change rerun
# --------------------------------------------------------------------------------------------


def bench_site(lab: Lab, rounds: int) -> dict:
    scratch, rerun, lab_up, rerun_changed, loads = [], [], [], [], []
    tasks_scratch, tasks_rerun = [], []
    for r in range(rounds):
        log("site round %d/%d (load %s)" % (r + 1, rounds, benchlib.load_average()))
        loads.append(benchlib.load_average())
        lab_up.append(lab.fresh())
        first = site_yml("site.yml from scratch")
        again = site_yml("site.yml no-change rerun")
        lab.converged_default = True
        scratch.append(first.wall_s)
        rerun.append(again.wall_s)
        rerun_changed.append(len(again.changed))
        tasks_scratch.append(first.tasks)
        tasks_rerun.append(again.tasks)
    notes = ["every round: tools/lab down + up (fresh hosts, fresh PKI), site.yml, site.yml again"]
    if any(rerun_changed):
        notes.append("the rerun changed something in some round (see extra.rerun_changed): not idempotent")
    return benchlib.section(
        {"scratch_s": scratch, "rerun_s": rerun, "lab_up_s": lab_up},
        ratios={"rerun_over_scratch": ("rerun_s", "scratch_s")},
        units={"scratch_s": "s", "rerun_s": "s", "lab_up_s": "s"},
        notes=notes,
        extra={
            "rerun_changed": rerun_changed,
            "load_average_per_round": loads,
            "top_tasks_scratch": benchlib.top_tasks(tasks_scratch),
            "top_tasks_rerun": benchlib.top_tasks(tasks_rerun),
            "tasks_scratch": tasks_scratch,
            "tasks_rerun": tasks_rerun,
        },
    )


# --------------------------------------------------------------------------------------------
# 2. onboarding a third cluster
# --------------------------------------------------------------------------------------------


def three_cluster_topology(path: str) -> str:
    with open(DEFAULT_TOPOLOGY) as f:
        topo = yaml.safe_load(f)
    topo["clusters"]["cluster3"] = {"id": 3, "pod_cidr": "10.3.0.0/16"}
    # on an existing segment: a new segment would make tools/lab rebuild the whole lab
    topo["hosts"].append({"name": "c3-n1", "cluster": "cluster3", "segment": "dc2", "address": "198.18.2.31"})
    with open(path, "w") as f:
        yaml.safe_dump(topo, f)
    return path


def forget_cluster3_pki() -> list[str]:
    """Delete cluster3's CA and certificates and the other clusters' remote-cluster3 certificates."""
    removed = []
    own = os.path.join(PKI_DIR, "cluster3")
    if os.path.isdir(own):
        shutil.rmtree(own)
        removed.append(own)
    for path in sorted(glob.glob(os.path.join(PKI_DIR, "*", "remote-cluster3.*"))):
        os.remove(path)
        removed.append(path)
    return removed


def bench_onboard(lab: Lab, rounds: int, workdir: str) -> dict:
    three = three_cluster_topology(os.path.join(workdir, "three-clusters.yml"))
    lab.ensure_converged_default()
    onboard, rerun3, rerun2, offboard, loads = [], [], [], [], []
    onboard_changed_hosts, onboard_changed, rerun_changed, tasks_onboard, tasks_rerun3 = [], [], [], [], []
    for r in range(rounds):
        log("onboard round %d/%d (load %s)" % (r + 1, rounds, benchlib.load_average()))
        loads.append(benchlib.load_average())
        before = site_yml("site.yml no-change, 2 clusters")
        benchlib.lab_up(PREFIX, three)
        lab.converged_default = False
        joined = site_yml("site.yml onboarding cluster3")
        again = site_yml("site.yml no-change, 3 clusters")
        benchlib.lab_up(PREFIX, DEFAULT_TOPOLOGY)
        removed = site_yml("site.yml removing cluster3")
        lab.converged_default = True
        forget_cluster3_pki()
        rerun2.append(before.wall_s)
        onboard.append(joined.wall_s)
        rerun3.append(again.wall_s)
        offboard.append(removed.wall_s)
        onboard_changed_hosts.append(sorted({host for _task, host in joined.changed}))
        onboard_changed.append(sorted("%s | %s" % (host, task) for task, host in joined.changed))
        rerun_changed.append([len(before.changed), len(again.changed)])
        tasks_onboard.append(joined.tasks)
        tasks_rerun3.append(again.tasks)
    return benchlib.section(
        {"onboard_s": onboard, "rerun_3_clusters_s": rerun3, "rerun_2_clusters_s": rerun2, "remove_s": offboard},
        ratios={
            "onboard_over_rerun": ("onboard_s", "rerun_3_clusters_s"),
            "onboard_over_rerun_before": ("onboard_s", "rerun_2_clusters_s"),
        },
        units={k: "s" for k in ("onboard_s", "rerun_3_clusters_s", "rerun_2_clusters_s", "remove_s")},
        notes=[
            "every round: site.yml (no change, 2 clusters); tools/lab up with cluster3 (c3-n1 on dc2, "
            "198.18.2.31); site.yml (onboard); site.yml (no change, 3 clusters); tools/lab up default; "
            "site.yml (remove cluster3); cluster3's certificates deleted from the lab's PKI",
            "onboard_over_rerun: against the no-change rerun of the same 3-cluster inventory, same round",
        ],
        extra={
            "load_average_per_round": loads,
            "onboard_changed_hosts": onboard_changed_hosts,
            "onboard_changed": onboard_changed,
            "rerun_changed_2_and_3_clusters": rerun_changed,
            "top_tasks_onboard": benchlib.top_tasks(tasks_onboard),
            "top_tasks_rerun_3_clusters": benchlib.top_tasks(tasks_rerun3),
            "tasks_onboard": tasks_onboard,
            "tasks_rerun_3_clusters": tasks_rerun3,
        },
    )


# --------------------------------------------------------------------------------------------
# 3. 10,000 keys through the proxy vs. straight at etcd
# --------------------------------------------------------------------------------------------

WATCH_MODES = {
    # mode: (watcher host, config file)
    "proxy": ("c1-n2", "/etc/clustermesh/clusters.d/cluster2"),
    "direct": ("c2-n1", "/etc/clustermesh/kvstore.yaml"),
}


def watch_run(mode: str, tag: str, keys: int) -> dict:
    host, config = WATCH_MODES[mode]
    prefix = "cilium/state/bench/%s-%s/" % (tag, mode)
    argv = benchlib.python_argv(PREFIX, host, WATCHER, config, prefix, str(keys), str(WATCH_TIMEOUT))
    with tempfile.TemporaryFile("w+") as err:
        proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=err, text=True)
        try:
            reader = benchlib.LineReader(proc.stdout)
            line = reader.next_line(timeout=30)
            if not line or not json.loads(line).get("ready"):
                raise RuntimeError("watcher on %s did not start: %r" % (host, line))
            time.sleep(1.0)  # the watch stream is created right after the listing
            wrote = benchlib.python_in(
                PREFIX,
                "c2-n2",
                "import sys; sys.argv[1:] = %r\n" % [prefix, str(keys), str(WATCH_BATCH)] + WRITER,
                timeout=WATCH_TIMEOUT,
            )
            rest = reader.rest(timeout=WATCH_TIMEOUT + 30)
            proc.wait(timeout=30)
        finally:
            if proc.poll() is None:
                proc.kill()  # the watcher we started (tools/lab exec execs into it)
                proc.wait()
        err.seek(0)
        stderr = err.read()
    try:
        watched = json.loads(rest[-1])
    except (IndexError, ValueError):
        raise RuntimeError(
            "watcher on %s printed no summary (exit %s): %s" % (host, proc.returncode, stderr[-3000:])
        ) from None
    if watched["error"] or watched["received"] < keys:
        raise RuntimeError(
            "watcher on %s saw %d of %d keys: %s %s"
            % (host, watched["received"], keys, watched["error"], stderr[-2000:])
        )
    lags_ms = [v / 1000.0 for v in watched["lags_us"]]
    end_to_end = (watched["last_recv_ns"] - wrote["start_ns"]) / 1e9
    recv_span = (watched["last_recv_ns"] - watched["first_recv_ns"]) / 1e9
    write_span = (wrote["end_ns"] - wrote["start_ns"]) / 1e9
    return {
        "mode": mode,
        "watcher_host": host,
        "watcher_user": watched["user"],
        "watcher_endpoints": watched["endpoints"],
        "writer_user": wrote["user"],
        "writer_endpoints": wrote["endpoints"],
        "keys": keys,
        "updates": watched["updates"],
        "reconnects": watched["reconnects"],
        "events_per_s": keys / end_to_end,
        "receive_rate_per_s": keys / recv_span if recv_span > 0 else None,
        "writer_keys_per_s": keys / write_span if write_span > 0 else None,
        "write_s": write_span,
        "last_event_after_write_end_ms": (watched["last_recv_ns"] - wrote["end_ns"]) / 1e6,
        "lag_p50_ms": benchlib.percentile(lags_ms, 50),
        "lag_p99_ms": benchlib.percentile(lags_ms, 99),
        "lag_max_ms": max(lags_ms),
    }


def bench_watch(lab: Lab, rounds: int, keys: int = WATCH_KEYS) -> dict:
    lab.ensure_converged_default()
    runs = {"proxy": [], "direct": []}
    loads = []
    tag = "%d" % os.getpid()
    for r in range(rounds):
        loads.append(benchlib.load_average())
        order = ["proxy", "direct"] if r % 2 == 0 else ["direct", "proxy"]
        log("watch round %d/%d, %s first (load %s)" % (r + 1, rounds, order[0], benchlib.load_average()))
        for mode in order:
            result = watch_run(mode, "%s-r%d" % (tag, r), keys)
            runs[mode].append(result)
            log(
                "  %-6s %7.0f events/s  p50 %7.1f ms  p99 %7.1f ms  (writer %5.0f keys/s)"
                % (
                    mode,
                    result["events_per_s"],
                    result["lag_p50_ms"],
                    result["lag_p99_ms"],
                    result["writer_keys_per_s"],
                )
            )
            benchlib.python_in(PREFIX, "c2-n2", CLEANUP, timeout=60)
    samples = {}
    for metric in ("events_per_s", "lag_p50_ms", "lag_p99_ms", "writer_keys_per_s", "receive_rate_per_s"):
        for mode in ("proxy", "direct"):
            samples["%s_%s" % (metric, mode)] = [run[metric] for run in runs[mode]]
    return benchlib.section(
        samples,
        ratios={
            "events_per_s_proxy_over_direct": ("events_per_s_proxy", "events_per_s_direct"),
            "lag_p50_proxy_over_direct": ("lag_p50_ms_proxy", "lag_p50_ms_direct"),
            "lag_p99_proxy_over_direct": ("lag_p99_ms_proxy", "lag_p99_ms_direct"),
        },
        units={k: ("ms" if "lag" in k else "1/s") for k in samples},
        notes=[
            "writer: cluster2's admin on c2-n2 (kvstore.yaml), %d keys in transactions of %d puts, "
            "value {ts: time.time_ns(), seq}, written as fast as etcd takes them" % (keys, WATCH_BATCH),
            "proxy: watcher on c1-n2 with clusters.d/cluster2 (remote-cluster1, through cluster2's HAProxy); "
            "direct: watcher on c2-n1 with its kvstore.yaml (admin-cluster2, etcd member directly)",
            "the two runs of a round are sequential (order alternates per round), each on its own prefix",
            "events_per_s = keys / (last event received - writer start); lag = receive time - write timestamp",
        ],
        extra={"runs": runs, "load_average_per_round": loads},
    )


# --------------------------------------------------------------------------------------------


def table(benchmarks: dict) -> str:
    rows = []
    for bench, sec in benchmarks.items():
        if "error" in sec:
            rows.append([bench, "ERROR", None, None, None, sec["error"].splitlines()[0][:60]])
            continue
        for metric in sec["samples"]:
            s = sec["spread"][metric]
            rows.append([bench, metric, s["median"], s["min"], s["max"], sec["units"].get(metric, "")])
        for name, r in sec["ratios"].items():
            per_round = r["per_round"]
            rows.append(
                [
                    bench,
                    name,
                    r["median"],
                    benchlib.summary(per_round)["min"],
                    benchlib.summary(per_round)["max"],
                    "ratio",
                ]
            )
    return benchlib.format_table(["bench", "metric", "median", "min", "max", "unit"], rows)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n", maxsplit=1)[0])
    parser.add_argument("--rounds", type=int, default=benchlib.MIN_ROUNDS)
    parser.add_argument("--only", choices=["site", "onboard", "watch"])
    parser.add_argument("--output", help="result file (default: bench/results/%s.json)" % NAME)
    parser.add_argument("--keys", type=int, default=WATCH_KEYS, help="keys written by the watch benchmark")
    args = parser.parse_args(argv)
    if args.rounds < 1:
        parser.error("--rounds must be at least 1")
    if os.geteuid() != 0:
        print("the lab needs root", file=sys.stderr)
        return 2
    if args.rounds < benchlib.MIN_ROUNDS:
        log("warning: %d rounds; the project's rule is at least %d" % (args.rounds, benchlib.MIN_ROUNDS))
    benchlib.ensure_collection_link()
    started = time.monotonic()
    load_start = benchlib.load_average()
    log("host %s; load average at start %s" % (benchlib.host_facts(), load_start))
    selected = [args.only] if args.only else ["site", "onboard", "watch"]
    benchmarks, failed = {}, False
    lab = Lab()
    workdir = tempfile.mkdtemp(prefix="bench-cp-")
    try:
        for name in selected:
            try:
                if name == "site":
                    benchmarks[name] = bench_site(lab, args.rounds)
                elif name == "onboard":
                    benchmarks[name] = bench_onboard(lab, args.rounds, workdir)
                else:
                    benchmarks[name] = bench_watch(lab, args.rounds, args.keys)
            except Exception as exc:  # noqa: BLE001 - recorded, the other benchmarks still run
                failed = True
                lab.converged_default = False
                traceback.print_exc()
                benchmarks[name] = {"error": "%s: %s" % (type(exc).__name__, exc), "samples": {}, "ratios": {}}
    finally:
        log("tools/lab down --prefix %s" % PREFIX)
        try:
            benchlib.lab_down(PREFIX)
        except Exception:  # noqa: BLE001
            traceback.print_exc()
            failed = True
        shutil.rmtree(workdir, ignore_errors=True)
    benchlib.finish(
        NAME,
        benchmarks=benchmarks,
        rounds=args.rounds,
        started=started,
        load_start=load_start,
        report=table(benchmarks),
        output=args.output,
        argv=argv,
    )
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
