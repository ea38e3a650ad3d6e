# -*- coding: utf-8 -*-
# Copyright: clustermesh.core contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""Backend health checks of the node agent: TCP connect or HTTP GET, on an interval, with thresholds.

The agent hands :class:`HealthChecker` the full set of :class:`Target` s it wants checked (one per local
backend ip:port and way of checking; two services checking the same ip:port the same way share one
probe) and is told through ``on_change(target, healthy)`` whenever a target's state flips.

Semantics:

* a new target is unknown (:meth:`HealthChecker.healthy` is None) until its first probe, which starts
  as soon as :meth:`HealthChecker.set_targets` names it; the first result sets the state directly, so a
  new backend is usable as soon as one probe passes;
* after that a target is probed every ``interval`` seconds: a probe is due ``interval`` after the
  previous one was due (no drift), or at once when the previous one ran longer than that;
* the state turns unhealthy after ``unhealthy_threshold`` consecutive failures and healthy again after
  ``healthy_threshold`` consecutive successes;
* ``on_change`` is called for every flip, including the first result, in the order the flips happened,
  from the checker's own notifier thread and never while a lock is held (a slow callback delays later
  callbacks, never probes); an exception in it is logged and checking goes on;
* a target dropped from the wanted set is forgotten at once: no callback for the removal, and a result
  or flip of it still under way is discarded.

All probes run in one thread on non-blocking sockets (``selectors``): a thousand targets cost a thousand
sockets, not threads, and a target that times out never delays the others; a refused connection is
reported as soon as the kernel says so (microseconds on a local network).  :func:`probe` runs one probe
by itself.  Nothing here is specific to a network namespace: the checker probes from the namespace of
the process that runs it.  No Ansible imports.
"""

from __future__ import annotations

import contextlib
import errno
import heapq
import ipaddress
import itertools
import logging
import math
import os
import queue
import re
import selectors
import socket
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass

log = logging.getLogger(__name__)

CHECK_TYPES = ("tcp", "http")
#: Probes in flight at once by default (each one is a socket, not a thread).
DEFAULT_MAX_IN_FLIGHT = 256
USER_AGENT = "clustermesh-meshd"
#: The longest HTTP status line read before a response is declared invalid.
MAX_STATUS_LINE = 4096
_STATUS_LINE_RE = re.compile(rb"^HTTP/\d(?:\.\d)?\s+(\d{3})(?:\s|$)")
_PATH_RE = re.compile(r"^/[\x21-\x7e]*$")
_ERRNO_TEXT = {
    errno.ECONNREFUSED: "connection refused",
    errno.ECONNRESET: "connection reset",
    errno.EHOSTUNREACH: "host unreachable",
    errno.ENETUNREACH: "network unreachable",
    errno.ETIMEDOUT: "connection timed out",
}


def _is_number(value) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


@dataclass(frozen=True, slots=True)
class Target:
    """One thing to check: ``ip:port`` by TCP connect or HTTP GET ``path``, with its timing and thresholds.

    A target is identified by all its fields (frozen, hashable): two services checking the same ip:port
    the same way share one probe, and changing how a backend is checked makes it a new target.
    ``ip`` is normalised (``ipaddress``); an invalid field raises ``ValueError`` naming it.
    """

    ip: str
    port: int
    type: str = "tcp"
    path: str = "/"
    interval: float = 2.0
    timeout: float = 1.0
    healthy_threshold: int = 1
    unhealthy_threshold: int = 1

    def __post_init__(self):
        try:
            address = ipaddress.ip_address(self.ip)
        except ValueError:
            raise ValueError(f"health check target ip: {self.ip!r} is not an IPv4 or IPv6 address") from None
        object.__setattr__(self, "ip", str(address))
        if not isinstance(self.port, int) or isinstance(self.port, bool) or not 1 <= self.port <= 65535:
            raise ValueError(f"health check target {self.ip} port: {self.port!r} is not a port (1-65535)")
        if self.type not in CHECK_TYPES:
            raise ValueError(f"health check target {self.ip}:{self.port} type: {self.type!r} is not tcp or http")
        if not isinstance(self.path, str) or not _PATH_RE.match(self.path):
            raise ValueError(
                f"health check target {self.ip}:{self.port} path: {self.path!r} is not an HTTP path "
                "(starts with '/', no spaces)"
            )
        for name in ("interval", "timeout"):
            value = getattr(self, name)
            if not _is_number(value) or value <= 0:
                raise ValueError(
                    f"health check target {self.ip}:{self.port} {name}: {value!r} is not a positive number of seconds"
                )
        for name in ("healthy_threshold", "unhealthy_threshold"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"health check target {self.ip}:{self.port} {name}: {value!r} is not an integer >= 1")

    def __str__(self) -> str:
        host = f"[{self.ip}]" if ":" in self.ip else self.ip
        return f"{host}:{self.port} ({self.type}{' ' + self.path if self.type == 'http' else ''})"


def target_for(ip: str, declaration) -> Target:
    """The target that checks backend ``ip`` of a ``services.ServiceDeclaration`` (its ``health_check``)."""
    check = declaration.health_check
    return Target(
        ip=ip,
        port=declaration.health_check_port,
        type=check.type,
        path=check.path,
        interval=check.interval,
        timeout=check.timeout,
        healthy_threshold=check.healthy_threshold,
        unhealthy_threshold=check.unhealthy_threshold,
    )


def _errno_text(code: int) -> str:
    return _ERRNO_TEXT.get(code) or os.strerror(code).lower()


class _Probe:
    """One probe as a small state machine over a non-blocking socket: connect, [send request, read status]."""

    def __init__(self, target: Target, now: float):
        self.target = target
        self.deadline = now + target.timeout
        self.sock: socket.socket | None = None
        self.phase = "connect"
        self.request = b""
        self.response = b""

    def begin(self) -> tuple[bool, str | None] | None:
        """Start connecting; a result when it is already decided, else None (wait for :attr:`events`)."""
        family = socket.AF_INET6 if ":" in self.target.ip else socket.AF_INET
        try:
            self.sock = socket.socket(family, socket.SOCK_STREAM)
            self.sock.setblocking(False)
            code = self.sock.connect_ex((self.target.ip, self.target.port))
        except OSError as exc:
            return self._done(False, _errno_text(exc.errno) if exc.errno else str(exc))
        if code in (0, errno.EINPROGRESS, errno.EAGAIN, errno.EALREADY):
            return self._connected() if code == 0 else None
        return self._done(False, _errno_text(code))

    @property
    def events(self) -> int:
        return selectors.EVENT_READ if self.phase == "recv" else selectors.EVENT_WRITE

    def step(self) -> tuple[bool, str | None] | None:
        """Advance on readiness of the socket; a result when the probe is decided, else None."""
        try:
            if self.phase == "connect":
                code = self.sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
                if code:
                    return self._done(False, _errno_text(code))
                return self._connected()
            if self.phase == "send":
                sent = self.sock.send(self.request)
                self.request = self.request[sent:]
                if not self.request:
                    self.phase = "recv"
                return None
            data = self.sock.recv(MAX_STATUS_LINE)
        except (BlockingIOError, InterruptedError):
            return None
        except OSError as exc:
            return self._done(False, _errno_text(exc.errno) if exc.errno else str(exc))
        if data:
            self.response += data
            if b"\n" not in self.response and len(self.response) < MAX_STATUS_LINE:
                return None
        return self._done(*self._http_result())

    def expire(self) -> tuple[bool, str]:
        return False, f"timeout after {float(self.target.timeout)}s"

    def close(self) -> None:
        if self.sock is not None:
            self.sock.close()
            self.sock = None

    def _connected(self) -> tuple[bool, str | None] | None:
        if self.target.type == "tcp":
            return self._done(True, None)
        host = f"[{self.target.ip}]" if ":" in self.target.ip else self.target.ip
        self.request = (
            f"GET {self.target.path} HTTP/1.0\r\nHost: {host}:{self.target.port}\r\n"
            f"User-Agent: {USER_AGENT}\r\nAccept: */*\r\nConnection: close\r\n\r\n"
        ).encode("ascii")
        self.phase = "send"
        return None

    def _http_result(self) -> tuple[bool, str | None]:
        if not self.response:
            return False, "connection closed before the HTTP response"
        line = self.response.split(b"\n", 1)[0].rstrip(b"\r")
        match = _STATUS_LINE_RE.match(line)
        if not match:
            return False, f"invalid HTTP status line {line[:80]!r}"
        status = int(match.group(1))
        return (True, None) if 200 <= status <= 399 else (False, f"HTTP {status}")

    @staticmethod
    def _done(ok: bool, error: str | None) -> tuple[bool, str | None]:
        return ok, error


def probe(target: Target) -> tuple[bool, str | None]:
    """Probe ``target`` once, within ``target.timeout``: (True, None) or (False, why).

    TCP succeeds when the connection is accepted (the handshake completes); HTTP sends
    ``GET path HTTP/1.0`` and succeeds on a status of 200-399.  ``why`` is e.g. ``"connection refused"``,
    ``"timeout after 1.0s"`` or ``"HTTP 503"``.
    """
    attempt = _Probe(target, time.monotonic())
    try:
        result = attempt.begin()
        if result is not None:
            return result
        with selectors.DefaultSelector() as selector:
            while True:
                left = attempt.deadline - time.monotonic()
                if left <= 0:
                    return attempt.expire()
                selector.register(attempt.sock, attempt.events)
                ready = selector.select(left)
                selector.unregister(attempt.sock)
                if ready:
                    result = attempt.step()
                    if result is not None:
                        return result
    finally:
        attempt.close()


class _Entry:
    """The state of one wanted target (a re-added target gets a new entry)."""

    __slots__ = (
        "target",
        "healthy",
        "successes",
        "failures",
        "probes",
        "last_probe",
        "last_error",
        "due",
        "removed",
    )

    def __init__(self, target: Target, due: float):
        self.target = target
        self.healthy: bool | None = None
        self.successes = 0
        self.failures = 0
        self.probes = 0
        self.last_probe: float | None = None
        self.last_error: str | None = None
        self.due = due
        self.removed = False


def _status_order(row: dict) -> tuple:
    address = ipaddress.ip_address(row["ip"])
    return address.version, int(address), row["port"], row["type"], row["path"] or ""


class HealthChecker:
    """Checks a set of targets in the background and reports their state changes.

    ``on_change(target, healthy)`` is called from the checker's notifier thread for every flip (see the
    module docstring).  ``max_workers`` bounds the probes in flight at once: each is a non-blocking
    socket handled by one I/O thread, not a thread of its own.  Use :meth:`start` / :meth:`stop`, or
    ``with HealthChecker(...) as checker:``.
    """

    def __init__(
        self, on_change: Callable[[Target, bool], None] | None = None, *, max_workers: int = DEFAULT_MAX_IN_FLIGHT
    ):
        if not isinstance(max_workers, int) or isinstance(max_workers, bool) or max_workers < 1:
            raise ValueError(f"max_workers: {max_workers!r} must be an integer >= 1")
        self._on_change = on_change
        self._max_in_flight = max_workers
        self._lock = threading.Lock()
        self._cond = threading.Condition(self._lock)
        self._entries: dict[Target, _Entry] = {}
        self._pending: list[_Entry] = []  # new entries for the I/O thread's schedule
        self._events: queue.SimpleQueue = queue.SimpleQueue()
        self._queued = 0  # sequence number of the last flip queued
        self._delivered = 0  # ... and of the last one handled by the notifier
        self._started = False
        self._stopping = False
        self._wake_r = self._wake_w = -1  # a pipe that wakes the I/O thread (made by start)
        self._io_thread = threading.Thread(target=self._run_io, name="health-check-io", daemon=True)
        self._notifier = threading.Thread(target=self._run_notifier, name="health-check-notify", daemon=True)

    # --- lifecycle -----------------------------------------------------------------------------------

    def start(self) -> HealthChecker:
        with self._lock:
            if self._stopping:
                raise RuntimeError("HealthChecker.start: already stopped (make a new checker)")
            if self._started:
                raise RuntimeError("HealthChecker.start: already started (a checker starts once)")
            self._started = True
            self._wake_r, self._wake_w = os.pipe()
            os.set_blocking(self._wake_r, False)
            os.set_blocking(self._wake_w, False)
        self._io_thread.start()
        self._notifier.start()
        return self

    def stop(self, timeout: float = 5.0) -> None:
        """Stop probing and close every socket; no callback runs after this returns (except one under way)."""
        with self._lock:
            if self._stopping:
                return
            self._stopping = True
            started = self._started
            self._cond.notify_all()
        self._wake()
        self._events.put(None)
        if started:
            deadline = time.monotonic() + timeout
            for thread in (self._io_thread, self._notifier):
                if thread is not threading.current_thread():
                    thread.join(max(0.0, deadline - time.monotonic()))
            if not self._io_thread.is_alive():  # else it still uses the pipe: leave it open
                self._close_wake()

    def __enter__(self) -> HealthChecker:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    # --- the agent's side ----------------------------------------------------------------------------

    def set_targets(self, targets: Iterable[Target]) -> None:
        """Make ``targets`` the full set to check: new ones are probed at once, missing ones forgotten."""
        wanted = set(targets)
        for target in wanted:
            if not isinstance(target, Target):
                raise TypeError(f"HealthChecker.set_targets: {target!r} is not a health_check.Target")
        now = time.monotonic()
        with self._lock:
            for target in list(self._entries):
                if target not in wanted:
                    self._entries.pop(target).removed = True
            added = False
            for target in wanted:
                if target not in self._entries:
                    entry = _Entry(target, now)
                    self._entries[target] = entry
                    self._pending.append(entry)
                    added = True
        if added:
            self._wake()

    def targets(self) -> set[Target]:
        with self._lock:
            return set(self._entries)

    def healthy(self, target: Target) -> bool | None:
        """The target's state: True / False, or None when it has no result yet (or is not checked)."""
        with self._lock:
            entry = self._entries.get(target)
            return None if entry is None else entry.healthy

    def status(self) -> list[dict]:
        """One dict per target (sorted by ip, port, type): its state and its last probe."""
        with self._lock:
            entries = list(self._entries.values())
            rows = [
                {
                    "ip": e.target.ip,
                    "port": e.target.port,
                    "type": e.target.type,
                    "path": e.target.path if e.target.type == "http" else None,
                    "interval": e.target.interval,
                    "healthy": e.healthy,
                    "last_probe": e.last_probe,
                    "last_error": e.last_error,
                    "consecutive_successes": e.successes,
                    "consecutive_failures": e.failures,
                    "probes": e.probes,
                }
                for e in entries
            ]
        return sorted(rows, key=_status_order)

    def wait_probed(self, targets: Iterable[Target], timeout: float) -> bool:
        """Wait until every one of ``targets`` has a result and its callbacks so far have run.

        True when they all have one; False after ``timeout`` seconds, or at once when one of them is
        not in the wanted set (it would never be probed).  Called from ``on_change`` itself, it does
        not wait for the callbacks (that would wait for itself).
        """
        targets = list(targets)
        deadline = time.monotonic() + timeout
        in_notifier = threading.current_thread() is self._notifier
        with self._cond:
            while True:
                entries = [self._entries.get(t) for t in targets]
                if any(e is None for e in entries):
                    return False
                if all(e.healthy is not None for e in entries):
                    break
                left = deadline - time.monotonic()
                if left <= 0 or self._stopping:
                    return False
                self._cond.wait(left)
            if in_notifier:
                return True
            queued = self._queued
            while self._delivered < queued:
                left = deadline - time.monotonic()
                if left <= 0 or self._stopping:
                    return False
                self._cond.wait(left)
            return True

    # --- internals -----------------------------------------------------------------------------------

    def _wake(self) -> None:
        with self._lock:
            if self._wake_w >= 0:
                with contextlib.suppress(OSError):  # a full pipe is awake enough
                    os.write(self._wake_w, b"x")

    def _close_wake(self) -> None:
        with self._lock:
            fds, (self._wake_r, self._wake_w) = (self._wake_r, self._wake_w), (-1, -1)
        for fd in fds:
            if fd >= 0:
                os.close(fd)

    def _record(self, entry: _Entry, ok: bool, error: str | None) -> None:
        """Count one probe result and queue a flip (under the lock; the notifier calls back)."""
        with self._lock:
            if entry.removed or self._stopping:
                return
            entry.probes += 1
            entry.last_probe = time.time()
            entry.last_error = error
            if ok:
                entry.successes += 1
                entry.failures = 0
            else:
                entry.failures += 1
                entry.successes = 0
            state = entry.healthy
            if state is None:
                state = ok
            elif state and entry.failures >= entry.target.unhealthy_threshold:
                state = False
            elif not state and entry.successes >= entry.target.healthy_threshold:
                state = True
            flipped, first = state != entry.healthy, entry.healthy is None
            if flipped:
                entry.healthy = state
                self._queued += 1
                self._events.put((self._queued, entry, state))
            self._cond.notify_all()
        if flipped:  # logged outside the lock
            log.log(
                logging.DEBUG if first else logging.INFO,
                "backend %s is %s%s",
                entry.target,
                "healthy" if state else "unhealthy",
                f": {error}" if error else "",
            )

    def _run_notifier(self) -> None:
        while True:
            item = self._events.get()
            if item is None:
                return
            seq, entry, state = item
            with self._lock:
                deliver = not entry.removed and not self._stopping
            if deliver and self._on_change is not None:
                try:
                    self._on_change(entry.target, state)
                except Exception:  # the agent's bug must not stop health checking
                    log.exception("health check callback failed for %s (healthy=%s)", entry.target, state)
            with self._lock:
                self._delivered = seq
                self._cond.notify_all()

    def _run_io(self) -> None:
        selector = selectors.DefaultSelector()
        selector.register(self._wake_r, selectors.EVENT_READ)
        schedule: list[tuple[float, int, _Entry]] = []
        order = itertools.count()
        in_flight: dict[int, tuple[_Entry, _Probe]] = {}  # by file descriptor

        def finish(entry: _Entry, attempt: _Probe, result: tuple[bool, str | None]) -> None:
            if attempt.sock is not None:
                if attempt.sock.fileno() in in_flight:
                    del in_flight[attempt.sock.fileno()]
                    selector.unregister(attempt.sock)
                attempt.close()
            self._record(entry, *result)
            if not entry.removed:
                # due one interval after the previous due time (no drift); at once when that has passed
                entry.due = max(entry.due + entry.target.interval, time.monotonic())
                heapq.heappush(schedule, (entry.due, next(order), entry))

        def run(entry: _Entry, attempt: _Probe, action: Callable[[], tuple[bool, str | None] | None]) -> None:
            try:
                result = action()
            except Exception as exc:  # a bug here must not lose the target
                log.exception("health check of %s failed", entry.target)
                result = (False, f"internal error: {exc}")
            if result is not None:
                finish(entry, attempt, result)
            elif attempt.sock.fileno() in in_flight:
                selector.modify(attempt.sock, attempt.events)
            else:
                in_flight[attempt.sock.fileno()] = (entry, attempt)
                selector.register(attempt.sock, attempt.events)

        try:
            while True:
                with self._lock:
                    if self._stopping:
                        return
                    pending, self._pending = self._pending, []
                try:
                    for entry in pending:
                        heapq.heappush(schedule, (entry.due, next(order), entry))
                    now = time.monotonic()
                    # start every due probe (as far as the in-flight bound allows)
                    while schedule and len(in_flight) < self._max_in_flight:
                        due, _order, entry = schedule[0]
                        if not entry.removed and due > now:
                            break
                        heapq.heappop(schedule)
                        if not entry.removed:
                            attempt = _Probe(entry.target, now)
                            run(entry, attempt, attempt.begin)
                    # sleep until the next due probe, the next probe deadline, or a wake-up
                    wait = 60.0
                    if schedule and len(in_flight) < self._max_in_flight:
                        wait = min(wait, schedule[0][0] - now)
                    if in_flight:
                        wait = min(wait, min(a.deadline for _entry, a in in_flight.values()) - now)
                    for key, _mask in selector.select(max(0.0, wait)):
                        if key.fd == self._wake_r:
                            with contextlib.suppress(OSError):
                                os.read(self._wake_r, 4096)
                        elif key.fd in in_flight:
                            entry, attempt = in_flight[key.fd]
                            run(entry, attempt, attempt.step)
                    now = time.monotonic()
                    for entry, attempt in list(in_flight.values()):
                        if entry.removed:
                            finish(entry, attempt, (False, "removed"))  # closes it; _record ignores it
                        elif attempt.deadline <= now:
                            finish(entry, attempt, attempt.expire())
                except Exception:  # a bug: log it, keep checking
                    log.exception("health checker: unexpected error (checking goes on)")
                    time.sleep(0.1)
        finally:
            for _entry, attempt in in_flight.values():
                with contextlib.suppress(Exception):
                    selector.unregister(attempt.sock)
                attempt.close()
            selector.close()
