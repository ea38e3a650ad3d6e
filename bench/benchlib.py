"""Shared helpers of the benchmarks in bench/: statistics, result documents, host facts, timed playbooks.

The pure part (median, percentile, ratio, summaries, result documents, task timings, tables) has
unit tests in tests/unit/bench/test_benchlib.py. The rest runs things: ansible-playbook against a
lab (like tests/lab/labtools.py, whose helpers it imports, but streamed so that each task's wall
time is known), git, os.getloadavg().

Rules of the project for benchmarks: compare side by side in one run (ratios of samples taken in
the same round), report medians of several rounds (at least 3), print the machine's load average,
and write bench/results/<name>.json.
"""

from __future__ import annotations

import datetime
import json
import math
import os
import platform
import queue
import re
import shlex
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RESULTS_DIR = os.path.join(REPO_ROOT, "bench", "results")
COLLECTIONS_ROOT = os.path.join(REPO_ROOT, "build", "pytest-collections")
COLLECTION_LINK = os.path.join(COLLECTIONS_ROOT, "ansible_collections", "clustermesh", "core")
MIN_ROUNDS = 3

if REPO_ROOT not in sys.path:
    sys.path.insert(0, REPO_ROOT)

from tests.lab import labtools  # noqa: E402  (needs REPO_ROOT on sys.path)

# --------------------------------------------------------------------------------------------
# statistics (pure)
# --------------------------------------------------------------------------------------------


def _clean(values: Iterable[float | None]) -> list[float]:
    return sorted(float(v) for v in values if v is not None and not (isinstance(v, float) and math.isnan(v)))


def median(values: Iterable[float | None]) -> float | None:
    """The median of the values that are not None (None when there are none)."""
    data = _clean(values)
    if not data:
        return None
    mid = len(data) // 2
    return data[mid] if len(data) % 2 else (data[mid - 1] + data[mid]) / 2


def percentile(values: Iterable[float | None], p: float) -> float | None:
    """The p-th percentile (0..100), linear interpolation between closest ranks (numpy's default)."""
    if not 0 <= p <= 100:
        raise ValueError("percentile must be within 0..100, got %r" % p)
    data = _clean(values)
    if not data:
        return None
    pos = (len(data) - 1) * p / 100.0
    low = math.floor(pos)
    high = min(low + 1, len(data) - 1)
    return data[low] + (data[high] - data[low]) * (pos - low)


def ratio(numerator: float | None, denominator: float | None) -> float | None:
    """numerator / denominator; None when either is missing or the denominator is 0."""
    if numerator is None or denominator is None or denominator == 0:
        return None
    return numerator / denominator


def summary(values: Iterable[float | None]) -> dict:
    """n, median, min, max of the values that are not None."""
    data = _clean(values)
    return {
        "n": len(data),
        "median": median(data),
        "min": data[0] if data else None,
        "max": data[-1] if data else None,
    }


def round_ratios(numerators: Sequence[float | None], denominators: Sequence[float | None]) -> list[float | None]:
    """Per-round ratios of two series measured side by side (same index = same round)."""
    if len(numerators) != len(denominators):
        raise ValueError("ratio series differ in length: %d and %d" % (len(numerators), len(denominators)))
    return [ratio(n, d) for n, d in zip(numerators, denominators, strict=True)]


# --------------------------------------------------------------------------------------------
# result documents (pure)
# --------------------------------------------------------------------------------------------

_OPS = {
    "<=": lambda v, lim: v <= lim,
    ">=": lambda v, lim: v >= lim,
    "<": lambda v, lim: v < lim,
    ">": lambda v, lim: v > lim,
}


def check_target(value: float | None, op: str, limit: float) -> bool | None:
    """Whether value meets ``op limit`` (None when there is no value)."""
    if op not in _OPS:
        raise ValueError("unknown target operator %r (use one of %s)" % (op, " ".join(_OPS)))
    if value is None:
        return None
    return bool(_OPS[op](value, limit))


def section(
    samples: dict[str, Sequence[float | None]],
    *,
    ratios: dict[str, tuple[str, str]] | None = None,
    targets: dict[str, tuple[str, str, float]] | None = None,
    units: dict[str, str] | None = None,
    notes: Sequence[str] = (),
    extra: dict | None = None,
) -> dict:
    """One benchmark's results: raw samples per metric (one value per round), their medians and
    spread, ratios of metrics measured side by side, and targets.

    ``ratios``: name -> (numerator metric, denominator metric). Each ratio is computed per round
    (both taken in that round) and reported as the median of those (``median``) and, for
    comparison, as the ratio of the two medians (``of_medians``).
    ``targets``: name -> (``medians.<metric>`` or ``ratios.<ratio>``, operator, limit).
    """
    samples = {name: list(values) for name, values in samples.items()}
    medians = {name: median(values) for name, values in samples.items()}
    spread = {name: summary(values) for name, values in samples.items()}
    ratio_docs = {}
    for name, (num, den) in (ratios or {}).items():
        if num not in samples or den not in samples:
            raise KeyError("ratio %r needs samples of %r and %r" % (name, num, den))
        per_round = round_ratios(samples[num], samples[den])
        ratio_docs[name] = {
            "numerator": num,
            "denominator": den,
            "per_round": per_round,
            "median": median(per_round),
            "of_medians": ratio(medians[num], medians[den]),
        }
    target_docs = {}
    for name, (metric, op, limit) in (targets or {}).items():
        kind, _sep, key = metric.partition(".")
        if kind == "medians":
            value = medians.get(key)
        elif kind == "ratios":
            value = ratio_docs[key]["median"] if key in ratio_docs else None
        else:
            raise ValueError("target %r: metric must be medians.<name> or ratios.<name>, got %r" % (name, metric))
        target_docs[name] = {
            "metric": metric,
            "op": op,
            "limit": limit,
            "value": value,
            "met": check_target(value, op, limit),
        }
    doc = {
        "samples": samples,
        "medians": medians,
        "spread": spread,
        "ratios": ratio_docs,
        "targets": target_docs,
        "units": dict(units or {}),
        "notes": list(notes),
    }
    if extra:
        doc["extra"] = extra
    return doc


def result_document(
    name: str,
    *,
    rounds: int,
    benchmarks: dict[str, dict],
    timestamp: str,
    commit: dict,
    host: dict,
    load_average: dict,
    argv: Sequence[str] = (),
    duration_s: float | None = None,
) -> dict:
    """The JSON document written to bench/results/<name>.json."""
    met = [t["met"] for b in benchmarks.values() for t in b.get("targets", {}).values()]
    return {
        "name": name,
        "timestamp": timestamp,
        "commit": commit,
        "host": host,
        "load_average": load_average,
        "rounds": rounds,
        "argv": list(argv),
        "duration_s": duration_s,
        "all_targets_met": None if not met or None in met else all(met),
        "benchmarks": benchmarks,
    }


def write_result(doc: dict, name: str | None = None, directory: str = RESULTS_DIR, path: str | None = None) -> str:
    """Write the document as bench/results/<name>.json (or ``path``); returns the path."""
    path = path or os.path.join(directory, "%s.json" % (name or doc["name"]))
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(doc, f, indent=1, sort_keys=False)
        f.write("\n")
    os.replace(tmp, path)
    return path


def finish(
    name: str,
    *,
    benchmarks: dict[str, dict],
    rounds: int,
    started: float,
    load_start: Sequence[float],
    report: str,
    output: str | None = None,
    argv: Sequence[str] | None = None,
) -> tuple[dict, str]:
    """The end of a benchmark run: the result document (load average now, duration since ``started``, a
    ``time.monotonic()`` value, argv = ``sys.argv[1:]`` unless given) written to bench/results/<name>.json
    (or ``output``), then ``report`` (the run's tables, or its error), the load average and the path
    printed. Returns (document, path)."""
    load_end = load_average()
    doc = result_document(
        name,
        rounds=rounds,
        benchmarks=benchmarks,
        timestamp=utc_timestamp(),
        commit=git_commit(),
        host=host_facts(),
        load_average={"start": tuple(load_start), "end": load_end},
        argv=sys.argv[1:] if argv is None else argv,
        duration_s=round(time.monotonic() - started, 1),
    )
    path = write_result(doc, path=output)
    print()
    print(report)
    print()
    print("load average: start %s, end %s (%s CPUs)" % (tuple(load_start), load_end, doc["host"]["nproc"]))
    print("results: %s" % path)
    return doc, path


def format_table(headers: Sequence[str], rows: Iterable[Sequence]) -> str:
    """A plain text table; floats with 3 significant decimals, None as '-'."""

    def cell(v):
        if v is None:
            return "-"
        if isinstance(v, float):
            return "%.3f" % v if abs(v) < 100 else "%.1f" % v
        return str(v)

    table = [list(map(str, headers))] + [[cell(v) for v in row] for row in rows]
    widths = [max(len(r[i]) for r in table) for i in range(len(headers))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in table]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------
# playbook output -> per-task wall time (pure)
# --------------------------------------------------------------------------------------------

_BANNER = re.compile(r"^(PLAY RECAP|TASK|RUNNING HANDLER|PLAY) ?\[?(.*?)\]? \**$")


def task_times(lines: Iterable[tuple[float, str]]) -> list[tuple[str, float]]:
    """Wall time of each task from ansible's default output, each line stamped with its arrival time.

    A task runs from its banner (``TASK [...]``, ``RUNNING HANDLER [...]``) to the next banner of
    any kind (``PLAY [...]``, ``PLAY RECAP``). Returns (``TASK name`` or ``HANDLER name``, seconds)
    in order; ``startup`` is the time before the first banner (ansible's own start, inventory).
    """
    out: list[tuple[str, float]] = []
    current, since, first = None, None, None
    last = None
    for stamp, line in lines:
        last = stamp
        if first is None:
            first = stamp
        m = _BANNER.match(line.rstrip("\n"))
        if not m:
            continue
        if current is not None:
            out.append((current, stamp - since))
        elif not out:
            out.append(("startup", stamp - first))
        kind, name = m.group(1), m.group(2)
        current = {"TASK": "TASK " + name, "RUNNING HANDLER": "HANDLER " + name}.get(kind)
        since = stamp
        if kind == "PLAY RECAP":
            current = None
    if current is not None and last is not None:
        out.append((current, last - since))
    return out


def top_tasks(runs: Sequence[Sequence[tuple[str, float]]], n: int = 10) -> list[dict]:
    """Tasks with the largest median wall time over several runs (a task absent from a run counts 0)."""
    names: dict[str, list[float]] = {}
    for i, run in enumerate(runs):
        totals: dict[str, float] = {}
        for name, seconds in run:
            totals[name] = totals.get(name, 0.0) + seconds
        for name, seconds in totals.items():
            names.setdefault(name, [0.0] * len(runs))[i] = seconds
    ranked = sorted(((median(v), name) for name, v in names.items()), reverse=True)
    return [{"task": name, "median_s": m} for m, name in ranked[:n]]


# --------------------------------------------------------------------------------------------
# facts about this run
# --------------------------------------------------------------------------------------------


def load_average() -> tuple[float, float, float]:
    return tuple(round(v, 2) for v in os.getloadavg())


def host_facts() -> dict:
    uname = platform.uname()
    try:
        usable = len(os.sched_getaffinity(0))
    except AttributeError:
        usable = None
    mem = None
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemTotal:"):
                    mem = int(line.split()[1]) * 1024
    except OSError:
        pass
    return {
        "hostname": uname.node,
        "nproc": usable or os.cpu_count(),
        "cpu_count": os.cpu_count(),
        "kernel": uname.release,
        "machine": uname.machine,
        "python": platform.python_version(),
        "mem_total_bytes": mem,
    }


def git_commit(repo: str = REPO_ROOT) -> dict:
    def git(*args):
        proc = subprocess.run(["git", "-C", repo, *args], capture_output=True, text=True, timeout=30, check=False)
        return proc.stdout.strip() if proc.returncode == 0 else None

    status = git("status", "--porcelain", "--untracked-files=no")
    return {"sha": git("rev-parse", "HEAD"), "dirty": bool(status) if status is not None else None}


def utc_timestamp() -> str:
    return datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")


# --------------------------------------------------------------------------------------------
# labs and playbooks
# --------------------------------------------------------------------------------------------


def ensure_collection_link() -> None:
    """build/pytest-collections/ansible_collections/clustermesh/core -> the repository (as tests/conftest.py)."""
    if os.path.islink(COLLECTION_LINK):
        return
    os.makedirs(os.path.dirname(COLLECTION_LINK), exist_ok=True)
    try:
        os.symlink(REPO_ROOT, COLLECTION_LINK)
    except FileExistsError:
        pass


def playbook_env() -> dict:
    """ansible-playbook's environment: the working tree's collection, as labtools.playbook uses."""
    return dict(
        os.environ,
        ANSIBLE_CONFIG=os.path.join(REPO_ROOT, "ansible.cfg"),
        ANSIBLE_COLLECTIONS_PATH=COLLECTIONS_ROOT,
        ANSIBLE_NOCOLOR="1",
        ANSIBLE_FORCE_COLOR="0",
        PYTHONUNBUFFERED="1",
        PATH=labtools.BIN + os.pathsep + os.environ.get("PATH", ""),
    )


@dataclass
class TimedRun:
    """A playbook run: wall time, per-task wall times and what changed."""

    wall_s: float
    returncode: int
    output: str
    changed: list = field(default_factory=list)  # (task name, host)
    tasks: list = field(default_factory=list)  # (task, seconds)
    timed_out: bool = False


_CHANGED = re.compile(r"^changed: \[([^\]]+)\]")
_TASK = re.compile(r"^TASK \[(.*)\] \**$")


def run_playbook(
    prefix: str, playbook: str, *extra: str, inventory: str | None = None, timeout: float = 900
) -> TimedRun:
    """ansible-playbook against the lab's inventory, stdout streamed and stamped line by line."""
    cmd = [
        os.path.join(labtools.BIN, "ansible-playbook"),
        "-i",
        inventory or labtools.inventory_path(prefix),
        playbook,
        *extra,
    ]
    lines: list[tuple[float, str]] = []
    started = time.monotonic()
    proc = subprocess.Popen(
        cmd,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=playbook_env(),
        cwd=REPO_ROOT,
        start_new_session=True,  # its own process group: a timeout ends ansible's workers too
    )
    timed_out = threading.Event()

    def kill():
        timed_out.set()
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass

    timer = threading.Timer(timeout, kill)
    timer.daemon = True
    timer.start()
    try:
        for line in proc.stdout:
            lines.append((time.monotonic(), line))
        proc.wait()
    finally:
        timer.cancel()
        if proc.poll() is None:
            kill()
            proc.wait()
    wall = time.monotonic() - started
    changed, task = [], None
    for _stamp, line in lines:
        m = _TASK.match(line.rstrip("\n"))
        if m:
            task = m.group(1)
            continue
        m = _CHANGED.match(line)
        if m:
            changed.append((task, m.group(1).split(" -> ")[-1].strip()))
    stamped = [(started, "")] + lines
    return TimedRun(
        wall_s=wall,
        returncode=proc.returncode,
        output="".join(line for _s, line in lines),
        changed=changed,
        tasks=task_times(stamped),
        timed_out=timed_out.is_set(),
    )


def require_ok(run: TimedRun, what: str) -> TimedRun:
    if run.returncode != 0:
        reason = "timed out" if run.timed_out else "exit %d" % run.returncode
        raise RuntimeError("%s failed (%s):\n%s" % (what, reason, run.output[-6000:]))
    return run


def lab_up(prefix: str, topology: str | None = None, timeout: float = 180) -> float:
    """tools/lab up; returns its wall time."""
    started = time.monotonic()
    args = ["up"] + (["--topology", topology] if topology else [])
    labtools.lab(*args, prefix=prefix, timeout=timeout)
    return time.monotonic() - started


def lab_down(prefix: str, check: bool = True, timeout: float = 180) -> float:
    started = time.monotonic()
    labtools.lab("down", prefix=prefix, check=check, timeout=timeout)
    return time.monotonic() - started


def python_in(prefix: str, host: str, code: str, timeout: float = 120):
    """Python inside a lab host (labtools.python_in): the last stdout line parsed as JSON."""
    return labtools.python_in(prefix, host, code, timeout=timeout)


class LineReader:
    """Reads a process's stdout in a thread so that lines can be awaited with a timeout."""

    def __init__(self, stream):
        self._queue: queue.Queue = queue.Queue()
        self.lines: list[str] = []
        self._thread = threading.Thread(target=self._run, args=(stream,), daemon=True)
        self._thread.start()

    def _run(self, stream):
        for line in stream:
            self._queue.put(line)
        self._queue.put(None)

    def next_line(self, timeout: float) -> str | None:
        """The next line, or None at end of stream; raises TimeoutError after ``timeout`` seconds."""
        try:
            line = self._queue.get(timeout=timeout)
        except queue.Empty:
            raise TimeoutError("no output within %gs" % timeout) from None
        if line is not None:
            self.lines.append(line)
        return line

    def rest(self, timeout: float) -> list[str]:
        """Every remaining line until end of stream (raises TimeoutError when it does not end in time)."""
        deadline = time.monotonic() + timeout
        out = []
        while True:
            line = self.next_line(max(0.01, deadline - time.monotonic()))
            if line is None:
                return out
            out.append(line)


class Shell:
    """A ``sh`` kept running inside a lab host or pod (``argv`` enters it, e.g. lab_exec_argv(prefix, host,
    "sh")), so that each command costs a fork rather than a ``tools/lab exec`` start (about 0.5 s here).
    Commands run one at a time; stop it with close() (the process Popen started, by PID)."""

    MARK = "@@bench-shell-done"

    def __init__(self, name: str, argv: list[str]):
        self.name = name
        self.proc = subprocess.Popen(
            argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )
        self._out = LineReader(self.proc.stdout)
        self._err = LineReader(self.proc.stderr)

    def _drain_errors(self, wait: float = 0.0) -> str:
        lines = []
        try:
            while True:
                line = self._err.next_line(wait)
                if line is None:
                    break
                lines.append(line)
        except TimeoutError:
            pass
        return "".join(lines)

    def run(
        self, argv: Sequence[str], what: str, timeout: float = 60, input: str | None = None, check: bool = True
    ) -> str:
        """The command's stdout; RuntimeError (with its stderr) when it exits non-zero (unless not
        ``check``), TimeoutError (the shell is then stopped) when it does not finish in ``timeout`` s."""
        self._drain_errors()
        command = " ".join(shlex.quote(a) for a in argv)
        if input is not None:
            if "\n@@BENCH_EOF\n" in "\n" + input:
                raise ValueError("input contains the here-document's end marker")
            command += " <<'@@BENCH_EOF'\n%s%s@@BENCH_EOF" % (input, "" if input.endswith("\n") else "\n")
        self.proc.stdin.write("%s\nrc=$?; echo; echo %s $rc\n" % (command, self.MARK))
        self.proc.stdin.flush()
        deadline = time.monotonic() + timeout
        lines: list[str] = []
        try:
            while True:
                line = self._out.next_line(max(0.01, deadline - time.monotonic()))
                if line is None:
                    raise RuntimeError("%s: the shell in %s ended: %s" % (what, self.name, self._drain_errors(1)))
                if line.startswith(self.MARK + " "):
                    code = int(line.split()[1])
                    break
                lines.append(line)
        except TimeoutError:
            self.close()
            raise TimeoutError("%s: no end within %gs in %s" % (what, timeout, self.name)) from None
        if lines and lines[-1] == "\n":  # the echo before the mark
            lines.pop()
        out = "".join(lines)
        if code != 0 and check:
            raise RuntimeError(
                "%s failed in %s (exit %d): %s\n%s%s"
                % (what, self.name, code, command, out[-3000:], self._drain_errors(0.2))
            )
        return out

    def close(self) -> None:
        if self.proc.poll() is None:
            try:
                self.proc.stdin.close()
            except OSError:
                pass
            try:
                self.proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self.proc.terminate()
                try:
                    self.proc.wait(timeout=5)
                except subprocess.TimeoutExpired:
                    self.proc.kill()
                    self.proc.wait()


def lab_exec_argv(prefix: str, host: str, *command: str) -> list[str]:
    return [labtools.LAB, "exec", "--prefix", prefix, host, "--", *command]


def python_argv(prefix: str, host: str, code: str, *args: str) -> list[str]:
    """argv that runs ``code`` with the venv's Python inside a lab host, the collection importable."""
    prelude = "import sys; sys.path.insert(0, %r)\n" % COLLECTIONS_ROOT
    return lab_exec_argv(prefix, host, labtools.PYTHON, "-c", prelude + code, *args)
