#!/usr/bin/python
# -*- coding: utf-8 -*-
# Copyright: clustermesh.core contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)

from __future__ import annotations

DOCUMENTATION = r"""
module: daemon
short_description: Run a mesh daemon as a systemd unit or, without systemd, as a supervised process
description:
  - Starts, stops, restarts or reloads one of the mesh's long-running programs (etcd, HAProxy, the agent).
  - Where PID 1 is systemd the program becomes the unit C(clustermesh-<name>.service).
  - Elsewhere (containers, the lab) a detached supervisor runs it, restarts it when it exits and keeps
    the pidfiles C(<run_dir>/<name>.pid) (program) and C(<run_dir>/<name>.supervisor.pid). Processes
    are only ever found through these pidfiles and only signalled while they carry the module's marker.
  - A running daemon whose command line or environment differs from the requested one is restarted.
version_added: 0.1.0
author: clustermesh.core developers (@clustermesh)
extends_documentation_fragment:
  - ansible.builtin.action_common_attributes
options:
  name:
    description: Short name of the daemon (file-name safe), for example C(etcd) or C(haproxy).
    type: str
    required: true
  argv:
    description: Program and arguments. Required for O(state=started), O(state=restarted) and O(state=reloaded).
    type: list
    elements: str
  env:
    description: Extra environment variables for the program.
    type: dict
    default: {}
  state:
    description:
      - V(started) starts it when it is not running or runs with other arguments.
      - V(restarted) always restarts; V(reloaded) sends O(reload_signal) (starts it if it is not running).
    type: str
    choices: [started, stopped, restarted, reloaded]
    default: started
  reload_signal:
    description: Signal sent for O(state=reloaded).
    type: str
    default: HUP
    choices: [HUP, USR1, USR2]
  manager:
    description: V(auto) uses systemd when PID 1 is systemd, else the supervisor.
    type: str
    choices: [auto, systemd, supervisor]
    default: auto
  run_dir:
    description: Directory of the pidfiles (supervisor only).
    type: path
    default: /run/clustermesh
  log_dir:
    description: Directory of the program's log C(<name>.log) (supervisor only; systemd uses the journal).
    type: path
    default: /var/log/clustermesh
  wait:
    description: Seconds to wait for the program to be running after a start.
    type: float
    default: 10
attributes:
  platform:
    platforms: posix
  check_mode:
    support: full
  diff_mode:
    support: none
"""

EXAMPLES = r"""
- name: Run etcd
  clustermesh.core.daemon:
    name: etcd
    argv: [/usr/bin/etcd, --config-file, /etc/clustermesh/etcd/etcd.conf.yml]

- name: Stop it
  clustermesh.core.daemon:
    name: etcd
    state: stopped
"""

RETURN = r"""
manager:
  description: How the daemon is run.
  returned: always
  type: str
  sample: supervisor
pid:
  description: PID of the program (supervisor manager), when running.
  returned: always
  type: int
  sample: 4242
log:
  description: Where the program's output goes.
  returned: always
  type: str
  sample: /var/log/clustermesh/etcd.log
"""

import os
import signal

from ansible.module_utils.basic import AnsibleModule

from ansible_collections.clustermesh.core.plugins.module_utils.daemon import (
    SYSTEMD_UNIT_DIR,
    DaemonError,
    DaemonSpec,
    render_unit,
    signal_supervised,
    start_supervised,
    stop_supervised,
    supervised_status,
    systemctl,
    systemd_is_init,
    unit_name,
)


def run_supervised(module, spec, state):
    status = supervised_status(spec)
    running = status["running"]
    want_fp = spec.fingerprint()
    result = {"manager": "supervisor", "log": spec.logfile, "pid": status["pid"], "changed": False}
    if state == "stopped":
        result["changed"] = running
        if running and not module.check_mode:
            stop_supervised(spec)
        result["pid"] = None
        return result
    action = None
    if not running:
        action = "start"
    elif state == "restarted" or status["fingerprint"] != want_fp:
        action = "restart"
    elif state == "reloaded":
        action = "reload"
    result["changed"] = action is not None
    if module.check_mode or action is None:
        return result
    if action == "reload":
        signal_supervised(spec, getattr(signal, "SIG" + module.params["reload_signal"]))
        return result
    if action == "restart":
        stop_supervised(spec)
    result["pid"] = start_supervised(spec, wait=module.params["wait"])
    return result


def run_systemd(module, spec, state):
    unit = unit_name(spec)
    path = os.path.join(SYSTEMD_UNIT_DIR, unit)
    result = {"manager": "systemd", "log": "journalctl -u %s" % unit, "pid": None, "changed": False}
    active = systemctl("is-active", "--quiet", unit)[0] == 0
    if state == "stopped":
        result["changed"] = active
        if active and not module.check_mode:
            systemctl("disable", "--now", unit)
        return result
    content = render_unit(spec)
    try:
        with open(path) as f:
            unit_changed = f.read() != content
    except OSError:
        unit_changed = True
    action = None
    if not active:
        action = "start"
    elif unit_changed or state == "restarted":
        action = "restart"
    elif state == "reloaded":
        action = "reload"
    result["changed"] = action is not None
    if module.check_mode or action is None:
        return result
    if unit_changed:
        with open(path, "w") as f:
            f.write(content)
        systemctl("daemon-reload")
    verb = {"restart": "restart", "start": "start", "reload": "kill"}[action]
    args = [verb, unit] if verb != "kill" else ["kill", "--signal", module.params["reload_signal"], unit]
    code, _out, err = systemctl(*args)
    if code != 0:
        module.fail_json(msg="systemctl %s failed: %s" % (" ".join(args), err))
    systemctl("enable", unit)
    pid = systemctl("show", "--property=MainPID", "--value", unit)[1]
    result["pid"] = int(pid) if pid.isdigit() and int(pid) else None
    return result


def main():
    module = AnsibleModule(
        argument_spec=dict(
            name=dict(type="str", required=True),
            argv=dict(type="list", elements="str"),
            env=dict(type="dict", default={}),
            state=dict(type="str", default="started", choices=["started", "stopped", "restarted", "reloaded"]),
            reload_signal=dict(type="str", default="HUP", choices=["HUP", "USR1", "USR2"]),
            manager=dict(type="str", default="auto", choices=["auto", "systemd", "supervisor"]),
            run_dir=dict(type="path", default="/run/clustermesh"),
            log_dir=dict(type="path", default="/var/log/clustermesh"),
            wait=dict(type="float", default=10.0),
        ),
        required_if=[
            ("state", "started", ["argv"]),
            ("state", "restarted", ["argv"]),
            ("state", "reloaded", ["argv"]),
        ],
        supports_check_mode=True,
    )
    p = module.params
    manager = p["manager"]
    if manager == "auto":
        manager = "systemd" if systemd_is_init() else "supervisor"
    try:
        spec = DaemonSpec(
            p["name"], p["argv"] or ["/bin/true"], env=p["env"], run_dir=p["run_dir"], log_dir=p["log_dir"]
        )
        runner = run_systemd if manager == "systemd" else run_supervised
        result = runner(module, spec, p["state"])
    except (DaemonError, OSError) as exc:
        module.fail_json(msg=str(exc))
    module.exit_json(**result)


if __name__ == "__main__":
    main()
