"""Helpers for tests that run playbooks against a lab: build a lab, run ansible, run code inside hosts."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import textwrap
from contextlib import contextmanager
from dataclasses import dataclass, field

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
LAB = os.path.join(REPO_ROOT, "tools", "lab")
BIN = os.path.dirname(sys.executable)
PYTHON = os.path.join(REPO_ROOT, ".venv", "bin", "python")


def lab(*args, prefix, check=True, timeout=180, input=None):
    proc = subprocess.run(
        [LAB, args[0], "--prefix", prefix, *args[1:]],
        capture_output=True,
        text=True,
        timeout=timeout,
        input=input,
        check=False,
    )
    if check and proc.returncode != 0:
        raise AssertionError(
            "tools/lab %s failed (%d):\n%s\n%s" % (" ".join(args), proc.returncode, proc.stdout, proc.stderr)
        )
    return proc


@contextmanager
def lab_session(prefix, *up_args, timeout=180):
    """``tools/lab up --prefix PREFIX [UP_ARGS]`` for the body, ``tools/lab down`` before (leftovers of an
    interrupted run) and after, also when the body fails. Module fixtures: ``with lab_session(P): yield``."""
    lab("down", prefix=prefix, check=False, timeout=timeout)
    try:
        lab("up", *up_args, prefix=prefix, timeout=timeout)
        yield
    finally:
        lab("down", prefix=prefix, check=False, timeout=timeout)


def inventory_path(prefix):
    return "/run/clustermesh-lab/%s/inventory/hosts.yml" % prefix


def run_in(prefix, host, *command, check=True, timeout=120):
    return lab("exec", host, "--", *command, prefix=prefix, check=check, timeout=timeout)


def python_in(prefix, host, code, check=True, timeout=120):
    """Run Python inside a lab host with the repository's venv; the collection is importable.

    The script's last stdout line is parsed as JSON and returned (None when it is not JSON).
    """
    prelude = "import sys; sys.path.insert(0, %r)\n" % os.path.join(REPO_ROOT, "build", "pytest-collections")
    proc = run_in(prefix, host, PYTHON, "-c", prelude + textwrap.dedent(code), check=check, timeout=timeout)
    lines = proc.stdout.strip().splitlines()
    try:
        return json.loads(lines[-1]) if lines else None
    except ValueError:
        return None


@dataclass
class PlaybookRun:
    returncode: int
    output: str
    changed: list = field(default_factory=list)  # (task name, host)

    def changed_hosts(self):
        return sorted({host for _task, host in self.changed})

    def changed_tasks(self, host):
        return [task for task, h in self.changed if h == host]


_TASK = re.compile(r"^TASK \[(.*)\] \**$")
_CHANGED = re.compile(r"^changed: \[([^\]]+)\]")


def playbook(prefix, playbook_path, *extra, inventory=None, check=True, timeout=900):
    """ansible-playbook against the lab's inventory, using the working tree's collection."""
    env = dict(
        os.environ,
        ANSIBLE_CONFIG=os.path.join(REPO_ROOT, "ansible.cfg"),
        ANSIBLE_COLLECTIONS_PATH=os.path.join(REPO_ROOT, "build", "pytest-collections"),
        ANSIBLE_NOCOLOR="1",
        ANSIBLE_FORCE_COLOR="0",
        PATH=BIN + os.pathsep + os.environ.get("PATH", ""),
    )
    cmd = [os.path.join(BIN, "ansible-playbook"), "-i", inventory or inventory_path(prefix), playbook_path, *extra]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=REPO_ROOT, timeout=timeout, check=False)
    output = proc.stdout + proc.stderr
    changed, task = [], None
    for line in proc.stdout.splitlines():
        m = _TASK.match(line)
        if m:
            task = m.group(1)
            continue
        m = _CHANGED.match(line)
        if m:
            # "host -> localhost" is a task delegated to the controller: it changed the controller
            changed.append((task, m.group(1).split(" -> ")[-1].strip()))
    run = PlaybookRun(proc.returncode, output, changed)
    if check and proc.returncode != 0:
        raise AssertionError("ansible-playbook %s failed (%d):\n%s" % (playbook_path, proc.returncode, output[-6000:]))
    return run
