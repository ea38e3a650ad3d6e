# -*- coding: utf-8 -*-
# Copyright: clustermesh.core contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""Run the mesh's daemons (etcd, HAProxy, the agent) the same way on every node.

Where PID 1 is systemd, a daemon is a systemd unit ``clustermesh-<name>.service``. Elsewhere
(containers, the lab) it is a supervised process: a small supervisor, detached from the caller,
starts the program, restarts it when it dies (with backoff) and keeps two pidfiles —
``<run_dir>/<name>.pid`` for the program and ``<name>.supervisor.pid`` for itself. Processes are
found only through these pidfiles, and a pid is trusted only while ``/proc/<pid>/environ`` still
carries our marker, so a recycled pid is never signalled.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import time

DEFAULT_RUN_DIR = "/run/clustermesh"
DEFAULT_LOG_DIR = "/var/log/clustermesh"
SYSTEMD_UNIT_DIR = "/etc/systemd/system"
MARKER_ENV = "CLUSTERMESH_DAEMON"


class DaemonError(Exception):
    pass


def systemd_is_init():
    try:
        with open("/proc/1/comm") as f:
            return f.read().strip() == "systemd"
    except OSError:
        return False


class DaemonSpec:
    """What to run: argv, environment, where its pidfiles and log live."""

    def __init__(self, name, argv, env=None, run_dir=DEFAULT_RUN_DIR, log_dir=DEFAULT_LOG_DIR, workdir="/"):
        if not name or "/" in name or name.startswith("."):
            raise DaemonError("daemon name %r is not a plain file name" % (name,))
        if not argv:
            raise DaemonError("daemon %s: argv is empty" % name)
        self.name = name
        self.argv = [str(a) for a in argv]
        self.env = {str(k): str(v) for k, v in (env or {}).items()}
        self.run_dir = run_dir
        self.log_dir = log_dir
        self.workdir = workdir

    @property
    def pidfile(self):
        return os.path.join(self.run_dir, self.name + ".pid")

    @property
    def supervisor_pidfile(self):
        return os.path.join(self.run_dir, self.name + ".supervisor.pid")

    @property
    def specfile(self):
        return os.path.join(self.run_dir, self.name + ".spec.json")

    @property
    def logfile(self):
        return os.path.join(self.log_dir, self.name + ".log")

    @property
    def marker(self):
        return "%s=%s" % (MARKER_ENV, self.name)

    def fingerprint(self):
        """Changes whenever what would be run changes, so a started daemon can be compared."""
        blob = json.dumps({"argv": self.argv, "env": self.env, "workdir": self.workdir}, sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()[:16]


def _read_pidfile(path):
    """(pid, start time or None) from a pidfile, or (None, None)."""
    try:
        with open(path) as f:
            fields = f.read().split()
        return int(fields[0]), (int(fields[1]) if len(fields) > 1 else None)
    except (OSError, ValueError, IndexError):
        return None, None


def _read_pid(path):
    return _read_pidfile(path)[0]


def _start_time(pid):
    """Start time of a live pid in clock ticks since boot (field 22 of /proc/PID/stat).

    None when the pid does not exist or is a zombie (dead, only waiting to be reaped).
    """
    try:
        with open("/proc/%d/stat" % pid) as f:
            stat = f.read()
    except OSError:
        return None
    # the command name (field 2) may contain spaces and parentheses: split after the last ')'
    fields = stat.rsplit(")", 1)[1].split()
    return None if fields[0] in ("Z", "X") else int(fields[19])


def _supervisor_is_ours(path):
    """The supervisor is a fork, not an exec, so it carries no marker in its environment; it is
    ours while the pid's start time is the one it wrote next to its pid."""
    pid, started = _read_pidfile(path)
    return pid if pid and started is not None and _start_time(pid) == started else None


def _pid_is_ours(pid, spec):
    """True when pid is alive and carries our marker in its environment."""
    if not pid or _start_time(pid) is None:
        return False
    try:
        with open("/proc/%d/environ" % pid, "rb") as f:
            environ = f.read().split(b"\0")
    except OSError:
        return False
    return spec.marker.encode() in environ


def supervised_status(spec):
    """{'running': bool, 'pid': int|None, 'supervisor_pid': int|None, 'fingerprint': str|None}."""
    sup = _supervisor_is_ours(spec.supervisor_pidfile)
    pid = _read_pid(spec.pidfile)
    sup_alive = sup is not None
    pid_alive = _pid_is_ours(pid, spec)
    fingerprint = None
    try:
        with open(spec.specfile) as f:
            fingerprint = json.load(f).get("fingerprint")
    except (OSError, ValueError):
        pass
    return {
        "running": sup_alive or pid_alive,
        "pid": pid if pid_alive else None,
        "supervisor_pid": sup if sup_alive else None,
        "fingerprint": fingerprint if (sup_alive or pid_alive) else None,
    }


def _supervise(spec, min_uptime=5.0, max_backoff=10.0):
    """Body of the detached supervisor: run the program, restart it when it exits."""
    child = None
    stopping = False

    def on_term(signum, _frame):
        nonlocal stopping
        stopping = True
        if child and child.poll() is None:
            child.send_signal(signum)

    def forward(signum, _frame):
        if child and child.poll() is None:
            child.send_signal(signum)

    signal.signal(signal.SIGTERM, on_term)
    signal.signal(signal.SIGINT, on_term)
    signal.signal(signal.SIGHUP, forward)
    signal.signal(signal.SIGUSR1, forward)
    signal.signal(signal.SIGUSR2, forward)

    env = dict(os.environ)
    env.update(spec.env)
    backoff = 0.5
    while not stopping:
        started = time.monotonic()
        with open(spec.logfile, "ab", buffering=0) as log:
            child = subprocess.Popen(
                spec.argv, env=env, cwd=spec.workdir, stdin=subprocess.DEVNULL, stdout=log, stderr=log, close_fds=True
            )
        _write_atomic(spec.pidfile, "%d\n" % child.pid)
        while True:
            try:
                code = child.wait()
                break
            except InterruptedError:
                continue
        if stopping:
            break
        with open(spec.logfile, "ab") as log:
            log.write(("clustermesh supervisor: %s exited with %s, restarting\n" % (spec.argv[0], code)).encode())
        backoff = 0.5 if time.monotonic() - started > min_uptime else min(backoff * 2, max_backoff)
        deadline = time.monotonic() + backoff
        while not stopping and time.monotonic() < deadline:
            time.sleep(0.1)
    for path in (spec.pidfile, spec.supervisor_pidfile):
        try:
            os.unlink(path)
        except OSError:
            pass


def _write_atomic(path, content, mode=0o644):
    tmp = "%s.tmp.%d" % (path, os.getpid())
    with open(tmp, "w") as f:
        f.write(content)
    os.chmod(tmp, mode)
    os.replace(tmp, path)


def start_supervised(spec, wait=10.0):
    """Start the supervisor (double fork, detached from the caller's stdio); return the program's pid."""
    os.makedirs(spec.run_dir, exist_ok=True)
    os.makedirs(spec.log_dir, exist_ok=True)
    if not os.path.exists(spec.argv[0]) and "/" in spec.argv[0]:
        raise DaemonError("daemon %s: program %s does not exist" % (spec.name, spec.argv[0]))
    _write_atomic(spec.specfile, json.dumps({"argv": spec.argv, "fingerprint": spec.fingerprint()}) + "\n")
    os.environ[MARKER_ENV] = spec.name  # inherited by the supervisor and the program
    pid = os.fork()
    if pid == 0:  # first child
        try:
            os.setsid()
            if os.fork() != 0:
                os._exit(0)
            devnull = os.open(os.devnull, os.O_RDWR)
            for fd in (0, 1, 2):
                os.dup2(devnull, fd)
            os.closerange(3, 65536)
            _write_atomic(spec.supervisor_pidfile, "%d %d\n" % (os.getpid(), _start_time(os.getpid())))
            _supervise(spec)
        finally:
            os._exit(0)
    os.waitpid(pid, 0)
    del os.environ[MARKER_ENV]
    deadline = time.monotonic() + wait
    while time.monotonic() < deadline:
        status = supervised_status(spec)
        if status["pid"]:
            return status["pid"]
        time.sleep(0.05)
    raise DaemonError("daemon %s did not start within %.0fs; see %s" % (spec.name, wait, spec.logfile))


def stop_supervised(spec, timeout=15.0):
    """Stop supervisor and program by pid (SIGTERM, then SIGKILL after timeout). True if something ran."""
    status = supervised_status(spec)
    pids = [p for p in (status["supervisor_pid"], status["pid"]) if p]
    if not pids:
        return False
    for pid in pids:  # the supervisor first, so it does not restart the program
        try:
            os.kill(pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
    sup_started = _start_time(status["supervisor_pid"]) if status["supervisor_pid"] else None

    def alive(pid):
        if pid == status["supervisor_pid"]:
            return _start_time(pid) == sup_started
        return _pid_is_ours(pid, spec)

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and any(alive(p) for p in pids):
        time.sleep(0.05)
    for pid in pids:
        if alive(pid):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
    for path in (spec.pidfile, spec.supervisor_pidfile):
        try:
            os.unlink(path)
        except OSError:
            pass
    return True


def signal_supervised(spec, signum):
    status = supervised_status(spec)
    if not status["pid"]:
        raise DaemonError("daemon %s is not running; cannot send signal %d" % (spec.name, signum))
    os.kill(status["pid"], signum)


# --- systemd -----------------------------------------------------------------------------------


def unit_name(spec):
    return "clustermesh-%s.service" % spec.name


def render_unit(spec, description=None):
    def quote(arg):
        return '"%s"' % arg.replace("\\", "\\\\").replace('"', '\\"') if any(c in arg for c in ' "\\') else arg

    lines = [
        "[Unit]",
        "Description=%s" % (description or "clustermesh %s" % spec.name),
        "After=network-online.target",
        "",
        "[Service]",
        "ExecStart=%s" % " ".join(quote(a) for a in spec.argv),
        "WorkingDirectory=%s" % spec.workdir,
        "Restart=always",
        "RestartSec=1",
        "Environment=%s" % quote(spec.marker),
    ]
    lines += ["Environment=%s" % quote("%s=%s" % kv) for kv in sorted(spec.env.items())]
    lines += ["", "[Install]", "WantedBy=multi-user.target", ""]
    return "\n".join(lines)


def systemctl(*args):
    proc = subprocess.run(["systemctl", *args], capture_output=True, text=True, check=False)
    return proc.returncode, proc.stdout.strip(), proc.stderr.strip()
