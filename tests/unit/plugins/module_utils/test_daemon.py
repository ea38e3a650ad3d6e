"""The supervisor for real: start, find by pidfile, restart after a crash, stop, never a stranger's pid."""

import os
import signal
import sys
import time

import pytest

from ansible_collections.clustermesh.core.plugins.module_utils.daemon import (
    DaemonError,
    DaemonSpec,
    render_unit,
    start_supervised,
    stop_supervised,
    supervised_status,
)


@pytest.fixture
def spec(tmp_path):
    s = DaemonSpec(
        "sleeper",
        [sys.executable, "-c", "import time; print('up', flush=True); time.sleep(300)"],
        run_dir=str(tmp_path / "run"),
        log_dir=str(tmp_path / "log"),
    )
    yield s
    stop_supervised(s, timeout=5)


def wait_for(predicate, timeout=10.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError("condition not met within %ss" % timeout)


def test_start_status_stop(spec):
    pid = start_supervised(spec)
    status = supervised_status(spec)
    assert status["running"] and status["pid"] == pid
    assert status["fingerprint"] == spec.fingerprint()
    assert open(spec.pidfile).read().strip() == str(pid)
    wait_for(lambda: "up" in open(spec.logfile).read())
    assert stop_supervised(spec)
    wait_for(lambda: not os.path.exists(f"/proc/{pid}") or open(f"/proc/{pid}/stat").read().split()[2] == "Z")
    assert not supervised_status(spec)["running"]
    assert not os.path.exists(spec.pidfile)
    assert not stop_supervised(spec)


def test_stop_stops_supervisor_too(spec):
    pid = start_supervised(spec)
    sup = supervised_status(spec)["supervisor_pid"]
    assert sup and sup != pid
    assert stop_supervised(spec)
    time.sleep(1.5)  # longer than the supervisor's restart backoff
    assert not supervised_status(spec)["running"]
    for gone in (pid, sup):
        assert not os.path.exists("/proc/%d" % gone) or open("/proc/%d/stat" % gone).read().split()[2] == "Z"


def test_restart_is_not_needed_when_unchanged(spec):
    start_supervised(spec)
    status = supervised_status(spec)
    assert status["supervisor_pid"] and status["fingerprint"] == spec.fingerprint()


def test_program_restarted_after_crash(spec):
    pid = start_supervised(spec)
    os.kill(pid, signal.SIGKILL)
    new_pid = wait_for(lambda: (supervised_status(spec)["pid"] or pid) != pid and supervised_status(spec)["pid"])
    assert new_pid != pid
    assert "restarting" in open(spec.logfile).read()


def test_stale_pidfile_of_foreign_process_is_ignored(spec):
    os.makedirs(spec.run_dir, exist_ok=True)
    # our own test process does not carry the daemon marker: it must never be treated as the daemon
    with open(spec.pidfile, "w") as f:
        f.write("%d\n" % os.getpid())
    status = supervised_status(spec)
    assert not status["running"] and status["pid"] is None
    assert not stop_supervised(spec)


def test_fingerprint_changes_with_argv(spec):
    other = DaemonSpec("sleeper", spec.argv + ["x"], run_dir=spec.run_dir, log_dir=spec.log_dir)
    assert other.fingerprint() != spec.fingerprint()


def test_bad_names_refused():
    with pytest.raises(DaemonError, match="plain file name"):
        DaemonSpec("../etc", ["/bin/true"])
    with pytest.raises(DaemonError, match="argv is empty"):
        DaemonSpec("x", [])


def test_missing_program_is_a_clear_error(tmp_path):
    s = DaemonSpec("ghost", ["/nonexistent/bin/etcd"], run_dir=str(tmp_path), log_dir=str(tmp_path))
    with pytest.raises(DaemonError, match="does not exist"):
        start_supervised(s)


def test_systemd_unit_rendering():
    s = DaemonSpec("etcd", ["/usr/bin/etcd", "--name", "a b"], env={"ETCD_X": "1"})
    unit = render_unit(s)
    assert 'ExecStart=/usr/bin/etcd --name "a b"' in unit
    assert "Environment=CLUSTERMESH_DAEMON=etcd" in unit
    assert "Environment=ETCD_X=1" in unit
