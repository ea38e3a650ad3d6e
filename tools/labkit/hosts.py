"""Build and tear down lab hosts (network + mount + UTS namespaces, bridges, a router).

Layout of a lab with prefix P (see docs/lab.md):
  P-fabric   one bridge per segment (br-<segment>); the fabric end of every veth is attached to it
  P-router   one leg per segment (to-<segment>) holding the segment's first address, ip_forward=1,
             and a dummy device outside0 with 198.19.255.1/24
  P-<host>   eth0 (veth to the fabric) with the host's address, lo, a route to 198.18.0.0/15 via
             the router, no default route; plus a mount namespace (overlay /etc, /var/lib and /var/log,
             tmpfs /run and /tmp, fresh sysfs and bpffs) and a UTS namespace kept by handle files.
Nothing is created in the root network namespace; in the root mount namespace only the netns
files in /run/netns and the mounts below the lab's state directory.
"""

from __future__ import annotations

import concurrent.futures
import ctypes
import errno
import ipaddress
import os
import select
import shlex
import shutil
import signal
import subprocess
import time
from dataclasses import asdict

from . import inventory
from .state import REPO_ROOT, Lab, LabError, LabLock, is_mount_point, mount_points_under, netns_names, nsenter
from .topology import LAB_UNDERLAY, OUTSIDE_ADDRESS, OUTSIDE_DEVICE, OUTSIDE_NETWORK, Topology, host_fabric_port

MNT_DETACH = 2
TERM_GRACE = 2.0  # seconds between SIGTERM and SIGKILL
MAX_PARALLEL = 16
OUTSIDE_DEVICE_KINDS = ("dummy", "ifb")

_libc = ctypes.CDLL(None, use_errno=True)


# helpers --------------------------------------------------------------------------------
def run(argv, input=None, check=True, timeout=60):
    proc = subprocess.run(argv, input=input, capture_output=True, text=True, timeout=timeout, check=False)
    if check and proc.returncode != 0:
        detail = (proc.stderr or proc.stdout).strip()
        raise LabError("command failed (exit %d): %s\n%s" % (proc.returncode, shlex.join(argv), detail))
    return proc


def ip_batch(commands, netns=None, force=False):
    """Run ip commands in one process (``ip [-n NS] -batch -``)."""
    if not commands:
        return
    argv = ["ip"]
    if netns:
        argv += ["-n", netns]
    if force:
        argv.append("-force")
    argv += ["-batch", "-"]
    run(argv, input="\n".join(commands) + "\n", check=not force)


def in_netns(netns_name, argv, check=True):
    """Run argv in a network namespace only (router, fabric)."""
    return run(nsenter.nsenter_argv(netns_name) + list(argv), check=check)


def umount_lazy(path):
    if _libc.umount2(os.fsencode(path), MNT_DETACH) != 0:
        err = ctypes.get_errno()
        if err not in (errno.EINVAL, errno.ENOENT):
            raise LabError("umount -l %s: %s" % (path, os.strerror(err)))


def _ns_id(path):
    st = os.stat(path)
    return (st.st_dev, st.st_ino)


def host_mac(host):
    """eth0's MAC address, derived from the host's address (02:00:<IPv4 bytes>): a rebuilt host keeps
    it, so its neighbours' ARP caches stay right."""
    return "02:00:" + ":".join("%02x" % b for b in ipaddress.ip_address(host.address).packed)


# Bumped whenever hosts are built differently, so that ``up`` rebuilds hosts made by older code.
HOST_FORMAT = 2


def host_record(host):
    """What a built host looks like; compared on the next ``up`` to decide whether to keep it."""
    return dict(asdict(host), format=HOST_FORMAT, repo=REPO_ROOT)


# processes ------------------------------------------------------------------------------
def _pids_in(net_ids, mnt_ids):
    """PIDs whose network or mount namespace is one of the given ones (what ``ip netns pids`` lists,
    plus processes that entered a host's mount namespace from another network namespace)."""
    me = os.getpid()
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == me:
            continue
        for kind, ids in (("net", net_ids), ("mnt", mnt_ids)):
            if not ids:
                continue
            try:
                if _ns_id("/proc/%s/ns/%s" % (entry, kind)) in ids:
                    found.append(int(entry))
                    break
            except OSError:
                continue
    return found


def _wait_exit(pidfds, timeout):
    poller = select.poll()
    for fd in pidfds.values():
        poller.register(fd, select.POLLIN)
    deadline = time.monotonic() + timeout
    alive = dict(pidfds)
    while alive:
        left = deadline - time.monotonic()
        if left <= 0:
            break
        for fd, _ev in poller.poll(left * 1000):
            for pid, pfd in list(alive.items()):
                if pfd == fd:
                    del alive[pid]
                    poller.unregister(fd)
    return alive


def kill_processes(net_ids, mnt_ids):
    """SIGTERM every process in the namespaces, wait briefly, SIGKILL the rest. Returns the PIDs signalled."""
    signalled = []
    for _round in range(3):
        pidfds = {}
        for pid in _pids_in(net_ids, mnt_ids):
            try:
                fd = os.pidfd_open(pid)
            except OSError:
                continue
            # the PID could have been reused between the scan and pidfd_open: check again
            if pid in _pids_in_one(pid, net_ids, mnt_ids):
                pidfds[pid] = fd
            else:
                os.close(fd)
        if not pidfds:
            break
        try:
            for fd in pidfds.values():
                try:
                    signal.pidfd_send_signal(fd, signal.SIGTERM)
                except ProcessLookupError:
                    pass
            signalled.extend(pidfds)
            alive = _wait_exit(pidfds, TERM_GRACE)
            for fd in alive.values():
                try:
                    signal.pidfd_send_signal(fd, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            _wait_exit(alive, TERM_GRACE)
        finally:
            for fd in pidfds.values():
                os.close(fd)
    return sorted(set(signalled))


def _pids_in_one(pid, net_ids, mnt_ids):
    for kind, ids in (("net", net_ids), ("mnt", mnt_ids)):
        try:
            if _ns_id("/proc/%d/ns/%s" % (pid, kind)) in ids:
                return [pid]
        except OSError:
            pass
    return []


# teardown -------------------------------------------------------------------------------
def _namespace_ids(lab, netns_list):
    net_ids, mnt_ids = set(), set()
    for ns in netns_list:
        try:
            net_ids.add(_ns_id(nsenter.netns_path(ns)))
        except OSError:
            pass
        mnt_handle, _uts = lab.handles(ns)
        if is_mount_point(mnt_handle):
            try:
                mnt_ids.add(_ns_id(mnt_handle))
            except OSError:
                pass
    return net_ids, mnt_ids


def _delete_netns(netns_list):
    existing = set(netns_names())
    ip_batch(["netns delete " + ns for ns in netns_list if ns in existing], force=True)


def remove_hosts(lab, netns_list):
    """Remove some hosts of a running lab (reconcile): processes, fabric port, mounts, netns, files."""
    if not netns_list:
        return
    net_ids, mnt_ids = _namespace_ids(lab, netns_list)
    kill_processes(net_ids, mnt_ids)
    if lab.fabric_ns in netns_names():
        # delete the veth now: the host's netns is freed asynchronously and its peer with it
        ports = [host_fabric_port(ns[len(lab.prefix) + 1 :]) for ns in netns_list]
        ip_batch(["link del " + p for p in ports], netns=lab.fabric_ns, force=True)
    for ns in netns_list:
        for mount_point in mount_points_under(lab.host_dir(ns)):
            umount_lazy(mount_point)
    _delete_netns(netns_list)
    for ns in netns_list:
        shutil.rmtree(lab.host_dir(ns), ignore_errors=True)


def lab_netns(lab):
    """Every netns that belongs to the lab: recorded in its state, or named <prefix>-*."""
    names = set()
    state = lab.read_json(lab.state_path) or {}
    names.update(state.get("netns", []))
    names.update(n for n in netns_names() if lab.owns_netns(n))
    if os.path.isdir(lab.hosts_dir):
        names.update(d for d in os.listdir(lab.hosts_dir) if lab.owns_netns(d))
    return sorted(n for n in names if lab.owns_netns(n))


def teardown(lab):
    """Remove everything the lab created. Returns a summary dict; raises LabError if something is left."""
    netns_list = lab_netns(lab)
    existing = [n for n in netns_list if n in set(netns_names())]
    net_ids, mnt_ids = _namespace_ids(lab, netns_list)
    pids = kill_processes(net_ids, mnt_ids)
    mount_list = mount_points_under(lab.state_dir)
    for mount_point in mount_list:
        umount_lazy(mount_point)
    _delete_netns(existing)
    had_state = os.path.isdir(lab.state_dir)
    shutil.rmtree(lab.state_dir, ignore_errors=True)

    problems = []
    left_ns = [n for n in netns_names() if lab.owns_netns(n)]
    if left_ns:
        problems.append("network namespaces left: %s" % ", ".join(left_ns))
    left_mounts = mount_points_under(lab.state_dir)
    if left_mounts:
        problems.append("mounts left: %s" % ", ".join(left_mounts))
    if os.path.exists(lab.state_dir):
        problems.append("state directory left: %s" % lab.state_dir)
    if problems:
        raise LabError("lab %s: teardown incomplete: %s" % (lab.prefix, "; ".join(problems)))
    return {"netns": existing, "pids": pids, "mounts": mount_list, "state_dir": had_state}


# build ----------------------------------------------------------------------------------
def etc_hosts(topo, host):
    lines = [
        "# /etc/hosts of lab host %s, written by tools/lab" % host.name,
        "127.0.0.1\tlocalhost",
        "::1\tlocalhost ip6-localhost ip6-loopback",
        "ff02::1\tip6-allnodes",
        "ff02::2\tip6-allrouters",
        "",
        "# lab hosts",
    ]
    lines += ["%s\t%s" % (h.address, h.name) for h in topo.hosts]
    return "\n".join(lines) + "\n"


# Directories each host sees through its own overlay: configuration, state and logs of the
# daemons it runs (/var/log too, or hosts running the same daemon would share a log file).
OVERLAYS = (("/etc", "etc"), ("/var/lib", "varlib"), ("/var/log", "varlog"))


def _prepare_host_files(lab, topo, host):
    ns = lab.netns(host.name)
    host_dir = lab.host_dir(ns)
    for lower, layer in OVERLAYS:
        lst = os.stat(lower)
        for part in ("upper", "work"):
            path = os.path.join(host_dir, layer, part)
            os.makedirs(path, exist_ok=True)
        # the upper directory's mode and owner become those of the merged directory
        upper = os.path.join(host_dir, layer, "upper")
        os.chmod(upper, lst.st_mode & 0o7777)
        os.chown(upper, lst.st_uid, lst.st_gid)
    etc = os.path.join(host_dir, "etc", "upper")
    for name, content in (("hosts", etc_hosts(topo, host)), ("resolv.conf", ""), ("hostname", host.name + "\n")):
        with open(os.path.join(etc, name), "w", encoding="utf-8") as f:
            f.write(content)
        os.chmod(os.path.join(etc, name), 0o644)
    mnt, uts = lab.handles(ns)
    for handle in (mnt, uts):
        with open(handle, "a"):
            pass
    return ns, mnt, uts


# Hosts get their own /run and /tmp. A checkout that lives there (CI may clone into /tmp) must stay
# visible, since hosts run the repository's .venv python: park it on a mount point inside the host's
# private /var/lib overlay, then move it back over the fresh tmpfs.
_KEEP = "/var/lib/.clustermesh-lab-keep"


def _hidden_by_tmpfs(path):
    return any(path == top or path.startswith(top + "/") for top in ("/run", "/tmp"))


def _keep_visible_before(path):
    if not _hidden_by_tmpfs(path):
        return []
    return ["mkdir -p %s" % _KEEP, "mount --bind %s %s" % (shlex.quote(path), _KEEP)]


def _keep_visible_after(path):
    if not _hidden_by_tmpfs(path):
        return []
    return ["mkdir -p %s" % shlex.quote(path), "mount --move %s %s" % (_KEEP, shlex.quote(path))]


def host_script(lab, host):
    """Shell script run by the first process of a host (inside its new mount and UTS namespaces)."""
    ns = lab.netns(host.name)
    host_dir = lab.host_dir(ns)
    q = shlex.quote

    def overlay(lower, layer):
        upper = os.path.join(host_dir, layer, "upper")
        work = os.path.join(host_dir, layer, "work")
        return "mount -t overlay overlay -o lowerdir=%s,upperdir=%s,workdir=%s %s" % (lower, upper, work, lower)

    return "\n".join(
        [
            "set -e",
            "ip -batch - <<'EOF'",
            "link set lo up",
            "addr add %s/%d dev eth0" % (host.address, host.prefixlen),
            "link set eth0 up",
            "route add %s via %s dev eth0" % (LAB_UNDERLAY, host.gateway),
            "EOF",
            *(overlay(lower, layer) for lower, layer in OVERLAYS),
            # drop this namespace's copies of netns files and other hosts' handles: they would keep
            # those namespaces alive after their own lab is torn down
            "umount -l /run/netns 2>/dev/null || true",
            'for m in %s/*/hosts; do umount -l "$m" 2>/dev/null || true; done' % q(lab.lab_root),
            *_keep_visible_before(REPO_ROOT),
            "mount -t tmpfs -o mode=0755,nosuid,nodev tmpfs /run",
            "mkdir -m 1777 /run/lock",
            "mount -t tmpfs -o mode=1777,nosuid,nodev tmpfs /tmp",
            *_keep_visible_after(REPO_ROOT),
            "umount -l /sys",
            "mount -t sysfs sysfs /sys",
            "mount -t bpf -o mode=0700 bpf /sys/fs/bpf",
            "hostname %s" % q(host.name),
        ]
    )


def _start_host(lab, host, mnt, uts):
    ns = lab.netns(host.name)
    argv = nsenter.nsenter_argv(ns) + [
        "unshare",
        "--mount=" + mnt,
        "--uts=" + uts,
        "--propagation",
        "private",
        "sh",
        "-c",
        host_script(lab, host),
    ]
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=60, check=False)
    if proc.returncode != 0:
        return "host %s: setup failed (exit %d): %s" % (host.name, proc.returncode, proc.stderr.strip())
    return None


def _ensure_hosts_mount(lab):
    """<state>/hosts: a bind mount of itself with private propagation, so unshare can bind the handles there."""
    os.makedirs(lab.hosts_dir, exist_ok=True)
    if not is_mount_point(lab.hosts_dir):
        run(["mount", "--bind", lab.hosts_dir, lab.hosts_dir])
    run(["mount", "--make-private", lab.hosts_dir])


def _add_outside_device(lab):
    """The router's "outside" device: a dummy, or an ifb (which, unused, behaves like one: NOARP,
    drops what is sent to it) on kernels built without the dummy driver."""
    for kind in OUTSIDE_DEVICE_KINDS:
        proc = run(["ip", "-n", lab.router_ns, "link", "add", OUTSIDE_DEVICE, "type", kind], check=False)
        if proc.returncode == 0:
            return kind
    raise LabError("cannot create %s in %s: %s" % (OUTSIDE_DEVICE, lab.router_ns, proc.stderr.strip()))


def fabric_record(lab, topo):
    return {"prefix": lab.prefix, "segments": [asdict(s) for s in topo.segments]}


def up(lab, topo: Topology, log=print):
    """Create or reconcile the lab. Returns a summary dict."""
    started = time.monotonic()
    with LabLock(lab.lab_root):
        present = set(netns_names())
        fabric_ok = (
            lab.read_json(lab.fabric_path) == fabric_record(lab, topo)
            and lab.router_ns in present
            and lab.fabric_ns in present
            and is_mount_point(lab.hosts_dir)
        )
        rebuilt_all = False
        if not fabric_ok and (os.path.exists(lab.state_dir) or any(lab.owns_netns(n) for n in present)):
            log("lab %s: segments changed or the last up did not finish: rebuilding the whole lab" % lab.prefix)
            teardown(lab)
            rebuilt_all = True
            present = set(netns_names())

        wanted = {lab.netns(h.name): h for h in topo.hosts}
        planned = [lab.router_ns, lab.fabric_ns] + list(wanted)
        state = lab.read_json(lab.state_path) or {}
        state.update(
            {
                "prefix": lab.prefix,
                "status": "building",
                "netns": sorted(set(state.get("netns", [])) | set(planned)),
            }
        )
        os.makedirs(lab.state_dir, exist_ok=True)
        lab.write_json(lab.state_path, state)  # before anything is created: down relies on it
        _ensure_hosts_mount(lab)

        keep, build = [], []
        for ns, host in wanted.items():
            mnt, uts = lab.handles(ns)
            ready = lab.read_json(os.path.join(lab.host_dir(ns), "ready.json"))
            if (
                fabric_ok
                and ready == host_record(host)
                and ns in present
                and is_mount_point(mnt)
                and is_mount_point(uts)
            ):
                keep.append(host)
            else:
                build.append(host)
        known = set(lab_netns(lab)) - {lab.router_ns, lab.fabric_ns}
        stale = sorted(known - set(wanted))
        redo = [
            lab.netns(h.name)
            for h in build
            if lab.netns(h.name) in present or os.path.exists(lab.host_dir(lab.netns(h.name)))
        ]
        remove_hosts(lab, stale + redo)

        # network namespaces, fabric, router
        new_ns = ([] if fabric_ok else [lab.router_ns, lab.fabric_ns]) + [lab.netns(h.name) for h in build]
        ip_batch(["netns add " + ns for ns in new_ns])
        fabric_cmds = []
        if not fabric_ok:
            in_netns(
                lab.fabric_ns,
                ["sysctl", "-q", "-w", "net.ipv6.conf.all.disable_ipv6=1", "net.ipv6.conf.default.disable_ipv6=1"],
            )
            fabric_cmds.append("link set lo up")
            for seg in topo.segments:
                fabric_cmds += [
                    "link add %s type bridge" % seg.bridge,
                    "link set %s up" % seg.bridge,
                    "link add %s type veth peer name %s netns %s"
                    % (seg.fabric_router_port, seg.router_device, lab.router_ns),
                    "link set %s master %s" % (seg.fabric_router_port, seg.bridge),
                    "link set %s up" % seg.fabric_router_port,
                ]
        for host in build:
            seg = topo.segment(host.segment)
            fabric_cmds += [
                "link add %s type veth peer name eth0 address %s netns %s"
                % (host.fabric_port, host_mac(host), lab.netns(host.name)),
                "link set %s master %s" % (host.fabric_port, seg.bridge),
                "link set %s up" % host.fabric_port,
            ]
        ip_batch(fabric_cmds, netns=lab.fabric_ns)
        if not fabric_ok:
            _add_outside_device(lab)
            router_cmds = [
                "link set lo up",
                "addr add %s/%d dev %s" % (OUTSIDE_ADDRESS, OUTSIDE_NETWORK.prefixlen, OUTSIDE_DEVICE),
                "link set %s up" % OUTSIDE_DEVICE,
            ]
            for seg in topo.segments:
                router_cmds += [
                    "addr add %s/%d dev %s" % (seg.gateway, seg.prefixlen, seg.router_device),
                    "link set %s up" % seg.router_device,
                ]
            ip_batch(router_cmds, netns=lab.router_ns)
            in_netns(lab.router_ns, ["sysctl", "-q", "-w", "net.ipv4.ip_forward=1"])

        # hosts: files first, then one process chain per host, in parallel
        prepared = [(host,) + _prepare_host_files(lab, topo, host)[1:] for host in build]
        errors = []
        if prepared:
            workers = min(MAX_PARALLEL, len(prepared))
            with concurrent.futures.ThreadPoolExecutor(max_workers=workers) as pool:
                futures = {pool.submit(_start_host, lab, host, mnt, uts): host for host, mnt, uts in prepared}
                for future in concurrent.futures.as_completed(futures):
                    err = future.result()
                    if err:
                        errors.append(err)
                    else:
                        host = futures[future]
                        lab.write_json(
                            os.path.join(lab.host_dir(lab.netns(host.name)), "ready.json"), host_record(host)
                        )
        if errors:
            raise LabError("\n".join(sorted(errors)))

        # kept hosts see the current host list in /etc/hosts (written in place in the upper layer)
        for host in keep:
            path = os.path.join(lab.host_dir(lab.netns(host.name)), "etc", "upper", "hosts")
            content = etc_hosts(topo, host)
            try:
                with open(path, encoding="utf-8") as f:
                    current = f.read()
            except OSError:
                current = None
            if current != content:
                with open(path, "w", encoding="utf-8") as f:
                    f.write(content)

        lab.write_json(lab.fabric_path, fabric_record(lab, topo))
        lab.write_json(lab.topology_path, dict(topo.to_dict(), prefix=lab.prefix))
        inventory.write(lab, topo)
        state.update({"status": "up", "netns": sorted(planned)})
        lab.write_json(lab.state_path, state)
    return {
        "built": [h.name for h in build],
        "kept": [h.name for h in keep],
        "removed": stale,
        "rebuilt_all": rebuilt_all,
        "elapsed": time.monotonic() - started,
    }


# status ---------------------------------------------------------------------------------
def host_status(lab, host):
    ns = lab.netns(host.name)
    mnt, uts = lab.handles(ns)
    row = {"host": host.name, "netns": ns, "segment": host.segment, "address": host.address}
    if nsenter.missing_handles(ns, mnt, uts):
        row.update(hostname="-", reachable="no (missing)")
        return row
    proc = run(nsenter.nsenter_argv(ns, mnt, uts) + ["uname", "-n"], check=False, timeout=10)
    row["hostname"] = proc.stdout.strip() if proc.returncode == 0 else "? (exit %d)" % proc.returncode
    if shutil.which("ping") is None:
        row["reachable"] = "? (no ping)"
    else:
        ping = run(
            nsenter.nsenter_argv(lab.router_ns) + ["ping", "-n", "-q", "-c1", "-W1", host.address],
            check=False,
            timeout=10,
        )
        row["reachable"] = "yes" if ping.returncode == 0 else "no"
    return row


def status(lab, topo):
    with concurrent.futures.ThreadPoolExecutor(max_workers=min(MAX_PARALLEL, len(topo.hosts) or 1)) as pool:
        return list(pool.map(lambda h: host_status(lab, h), topo.hosts))


__all__ = ["Lab", "up", "teardown", "status", "remove_hosts"]
