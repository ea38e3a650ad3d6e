"""The agent's backend health checker, against real sockets on 127.0.0.1.

Servers used: listeners whose connections are accepted (Acceptor), a closed port (refused), a listener
whose accept queue is full (SYNs dropped: a connect never completes, i.e. a timeout) and an HTTP server
that answers a scripted sequence of status codes.
"""

from __future__ import annotations

import http.server
import logging
import os
import selectors
import socket
import threading
import time
from collections import defaultdict

import pytest

from ansible_collections.clustermesh.core.plugins.module_utils.health_check import (
    HealthChecker,
    Target,
    probe,
    target_for,
)
from ansible_collections.clustermesh.core.plugins.module_utils.services import (
    HealthCheck,
    ServiceDeclaration,
    ServicePort,
)

LOCAL = "127.0.0.1"


class Acceptor:
    """``n`` listening sockets on 127.0.0.1 whose connections are accepted (and closed) by one thread."""

    def __init__(self, n: int = 1):
        self.selector = selectors.DefaultSelector()
        self.listeners = []
        self.accepts: dict[int, list[float]] = defaultdict(list)
        for _index in range(n):
            sock = socket.socket()
            sock.bind((LOCAL, 0))
            sock.listen(128)
            sock.setblocking(False)
            self.listeners.append(sock)
            self.selector.register(sock, selectors.EVENT_READ)
        self.ports = [s.getsockname()[1] for s in self.listeners]
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    @property
    def port(self) -> int:
        return self.ports[0]

    def _run(self):
        while not self._stop.is_set():
            for key, _events in self.selector.select(0.02):
                try:
                    conn, _peer = key.fileobj.accept()
                except BlockingIOError:
                    continue
                self.accepts[key.fileobj.getsockname()[1]].append(time.monotonic())
                conn.close()

    def stop(self):
        """Stop accepting and close the listeners: their ports refuse connections from now on."""
        self._stop.set()
        self._thread.join(2)
        for sock in self.listeners:
            sock.close()
        self.selector.close()


@pytest.fixture
def acceptor():
    servers = []

    def make(n=1):
        servers.append(Acceptor(n))
        return servers[-1]

    yield make
    for server in servers:
        server.stop()


@pytest.fixture
def closed_port():
    """A port on 127.0.0.1 nothing listens on (bound, never listening: nobody else gets it meanwhile)."""
    sock = socket.socket()
    sock.bind((LOCAL, 0))
    yield sock.getsockname()[1]
    sock.close()


@pytest.fixture
def blackhole():
    """A listening port whose accept queue is full and never drained: new connections never complete."""
    listener = socket.socket()
    listener.bind((LOCAL, 0))
    listener.listen(0)
    port = listener.getsockname()[1]
    fillers = []
    for _index in range(2):
        filler = socket.socket()
        filler.setblocking(False)
        filler.connect_ex((LOCAL, port))
        fillers.append(filler)
    time.sleep(0.05)
    yield port
    for sock in [*fillers, listener]:
        sock.close()


class ScriptedHTTP:
    """An HTTP server answering the statuses of ``script`` in turn, then ``then`` forever; it logs the paths."""

    def __init__(self, script=(), then=200):
        self.script = list(script)
        self.then = then
        self.paths = []
        self.statuses = []
        owner = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self):  # noqa: N802 (http.server's name)
                status = owner.script.pop(0) if owner.script else owner.then
                owner.paths.append(self.path)
                owner.statuses.append(status)
                self.send_response(status)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *args):
                pass

        self.server = http.server.ThreadingHTTPServer((LOCAL, 0), Handler)
        self.server.daemon_threads = True
        self.port = self.server.server_address[1]
        self._thread = threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True)
        self._thread.start()

    def stop(self):
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def http_server():
    servers = []

    def make(script=(), then=200):
        servers.append(ScriptedHTTP(script, then))
        return servers[-1]

    yield make
    for server in servers:
        server.stop()


class Recorder:
    """An on_change that records (target, healthy, time) and can wait for a number of calls."""

    def __init__(self):
        self.calls = []
        self.cond = threading.Condition()

    def __call__(self, target, healthy):
        with self.cond:
            self.calls.append((target, healthy, time.monotonic()))
            self.cond.notify_all()

    def wait(self, count, timeout=2.0):
        with self.cond:
            return self.cond.wait_for(lambda: len(self.calls) >= count, timeout)

    def states(self, target=None):
        with self.cond:
            return [h for t, h, _when in self.calls if target is None or t == target]


@pytest.fixture
def checker():
    made = []

    def make(on_change=None, **kwargs):
        made.append(HealthChecker(on_change, **kwargs).start())
        return made[-1]

    yield make
    for c in made:
        c.stop()


# --- Target --------------------------------------------------------------------------------------


def test_targets_with_the_same_check_are_one_target():
    a = Target("127.0.0.1", 80)
    b = Target("127.0.0.1", 80, "tcp", "/", 2.0, 1.0, 1, 1)
    assert a == b and len({a, b}) == 1
    assert Target("::0001", 80) == Target("::1", 80)  # the address is normalised
    assert Target("127.0.0.1", 80, interval=1.0) != a  # checked another way: another target


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"ip": "10.0.0.300"}, "ip: '10.0.0.300' is not an IPv4 or IPv6 address"),
        ({"port": 0}, "port: 0 is not a port"),
        ({"port": True}, "port: True is not a port"),
        ({"type": "udp"}, "type: 'udp' is not tcp or http"),
        ({"type": "http", "path": "health"}, "path: 'health' is not an HTTP path"),
        ({"type": "http", "path": "/a b"}, "path: '/a b' is not an HTTP path"),
        ({"interval": 0}, "interval: 0 is not a positive number of seconds"),
        ({"timeout": float("nan")}, "timeout: nan is not a positive number of seconds"),
        ({"healthy_threshold": 0}, "healthy_threshold: 0 is not an integer >= 1"),
        ({"unhealthy_threshold": 1.5}, "unhealthy_threshold: 1.5 is not an integer >= 1"),
    ],
)
def test_invalid_target_names_the_field(kwargs, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace("?", r"\?")):
        Target(**{"ip": "10.1.0.5", "port": 80, **kwargs})


def test_target_for_a_declaration_uses_its_health_check():
    ports = (ServicePort("web", 80, target_port=8080), ServicePort("admin", 81))
    check = HealthCheck("http", None, "/ready", 0.5, 0.25, healthy_threshold=2, unhealthy_threshold=3)
    declaration = ServiceDeclaration("default", "web", "10.96.0.10", ports, health_check=check)
    assert target_for("10.1.0.5", declaration) == Target("10.1.0.5", 8080, "http", "/ready", 0.5, 0.25, 2, 3)
    tcp = ServiceDeclaration("default", "web", "10.96.0.10", ports, health_check=HealthCheck(port=9000))
    assert target_for("10.1.0.5", tcp) == Target("10.1.0.5", 9000)


# --- probe ---------------------------------------------------------------------------------------


def test_tcp_probe_succeeds_when_the_connection_is_accepted(acceptor):
    server = acceptor()
    assert probe(Target(LOCAL, server.port)) == (True, None)


def test_tcp_probe_of_a_closed_port_fails_at_once(closed_port):
    start = time.monotonic()
    assert probe(Target(LOCAL, closed_port, timeout=5.0)) == (False, "connection refused")
    assert time.monotonic() - start < 0.1


def test_tcp_probe_that_never_connects_times_out(blackhole):
    start = time.monotonic()
    assert probe(Target(LOCAL, blackhole, timeout=0.2)) == (False, "timeout after 0.2s")
    assert 0.19 <= time.monotonic() - start < 0.5


@pytest.mark.parametrize("status, expected", [(200, (True, None)), (302, (True, None)), (503, (False, "HTTP 503"))])
def test_http_probe_judges_the_status(http_server, status, expected):
    server = http_server(then=status)
    assert probe(Target(LOCAL, server.port, "http", "/healthz?full=1")) == expected
    assert server.paths == ["/healthz?full=1"]


def answer_once(reply: bytes) -> tuple[bool, str | None]:
    """Probe (http) a server that reads the request, sends ``reply`` and closes."""
    listener = socket.socket()
    listener.bind((LOCAL, 0))
    listener.listen(1)

    def answer():
        conn, _peer = listener.accept()
        conn.recv(4096)
        conn.sendall(reply)
        conn.close()

    thread = threading.Thread(target=answer, daemon=True)
    thread.start()
    try:
        return probe(Target(LOCAL, listener.getsockname()[1], "http"))
    finally:
        thread.join(2)
        listener.close()


def test_http_probe_of_something_that_is_not_http():
    assert answer_once(b"") == (False, "connection closed before the HTTP response")
    assert answer_once(b"SSH-2.0-OpenSSH_9.6\r\n") == (False, "invalid HTTP status line b'SSH-2.0-OpenSSH_9.6'")
    assert answer_once(b"HTTP/1.1 204 No Content\r\n\r\n") == (True, None)


def test_http_probe_that_gets_no_answer_times_out():
    """Connected, request sent, but the server never answers: the timeout covers the whole exchange."""
    listener = socket.socket()
    listener.bind((LOCAL, 0))
    listener.listen(1)
    try:
        start = time.monotonic()
        assert probe(Target(LOCAL, listener.getsockname()[1], "http", timeout=0.15)) == (False, "timeout after 0.15s")
        assert time.monotonic() - start < 0.5
    finally:
        listener.close()


# --- HealthChecker -------------------------------------------------------------------------------


def test_new_target_is_unknown_until_its_first_probe_which_sets_the_state(checker, acceptor, closed_port):
    recorder = Recorder()
    hc = checker(recorder)
    up, down = Target(LOCAL, acceptor().port, interval=5.0), Target(LOCAL, closed_port, interval=5.0)
    assert hc.healthy(up) is None
    start = time.monotonic()
    hc.set_targets([up, down])
    assert hc.wait_probed([up, down], 2.0)
    assert time.monotonic() - start < 0.2  # probed at once, not after an interval
    assert hc.healthy(up) is True and hc.healthy(down) is False
    # the first result is a flip, reported; wait_probed returns after those callbacks ran
    assert sorted((t.port, h) for t, h, _when in recorder.calls) == sorted([(up.port, True), (down.port, False)])
    rows = {r["port"]: r for r in hc.status()}
    assert rows[down.port]["last_error"] == "connection refused"
    assert rows[down.port]["consecutive_failures"] == 1 and rows[down.port]["healthy"] is False
    assert rows[up.port]["last_error"] is None and rows[up.port]["consecutive_successes"] == 1
    assert abs(rows[up.port]["last_probe"] - time.time()) < 1.0
    assert rows[up.port]["ip"] == LOCAL and rows[up.port]["type"] == "tcp"


def test_thresholds_and_callback_order(checker, http_server):
    """healthy_threshold 2, unhealthy_threshold 3: two failures or one success in between change nothing."""
    server = http_server(script=[200, 503, 503, 200, 503, 503, 503, 200, 503, 200, 200])
    recorder = Recorder()
    hc = checker(recorder)
    target = Target(LOCAL, server.port, "http", "/health", interval=0.05, healthy_threshold=2, unhealthy_threshold=3)
    hc.set_targets([target])
    deadline = time.monotonic() + 3
    while len(server.statuses) < 13 and time.monotonic() < deadline:
        time.sleep(0.02)
    time.sleep(0.05)  # callbacks of the last flips delivered
    assert recorder.states() == [True, False, True]
    # the flips happened at the 7th and 11th answers: the 3rd consecutive 503, the 2nd consecutive 200
    assert set(server.paths) == {"/health"}
    flips = [when for _target, _healthy, when in recorder.calls]
    assert flips == sorted(flips)


def test_failover_is_reported_within_the_interval(checker, acceptor):
    """Backends stopped: the next probe is refused and the callback follows within milliseconds."""
    server = acceptor()
    recorder = Recorder()
    hc = checker(recorder)
    target = Target(LOCAL, server.port, interval=0.2)
    hc.set_targets([target])
    assert recorder.wait(1)
    stopped = time.monotonic()
    server.stop()
    assert recorder.wait(2, timeout=1.0)
    assert recorder.states() == [True, False]
    assert recorder.calls[1][2] - stopped < 0.2 + 0.1
    assert hc.status()[0]["last_error"] == "connection refused"


def test_probes_are_due_one_interval_after_the_previous_one_without_drift(checker, acceptor):
    server = acceptor()
    hc = checker()
    target = Target(LOCAL, server.port, interval=0.1)
    hc.set_targets([target])
    time.sleep(1.03)
    times = list(server.accepts[server.port])
    assert 10 <= len(times) <= 12
    # the n-th probe starts n intervals after the first, not n intervals plus n times the loop's latency
    assert abs((times[-1] - times[0]) - (len(times) - 1) * 0.1) < 0.03


def test_targets_checked_the_same_way_share_one_probe(checker, acceptor):
    server = acceptor()
    hc = checker()
    hc.set_targets([Target(LOCAL, server.port, interval=0.1), Target("127.0.0.1", server.port, "tcp", interval=0.1)])
    time.sleep(0.35)
    assert len(hc.status()) == 1
    assert 3 <= len(server.accepts[server.port]) <= 5


def test_removed_target_is_forgotten_without_a_callback(checker, acceptor):
    server = acceptor()
    recorder = Recorder()
    hc = checker(recorder)
    kept, removed = Target(LOCAL, server.port, interval=0.05), Target(LOCAL, server.port, interval=0.06)
    hc.set_targets([kept, removed])
    assert hc.wait_probed([kept, removed], 2.0)
    hc.set_targets([kept])
    assert hc.healthy(removed) is None
    assert [r["interval"] for r in hc.status()] == [0.05]
    assert not hc.wait_probed([removed], 1.0)  # at once: it will never be probed
    server.stop()  # both would turn unhealthy: only the kept one is reported
    assert recorder.wait(3)
    time.sleep(0.15)
    assert [(t.interval, h) for t, h, _when in recorder.calls[2:]] == [(0.05, False)]
    # added again: a new target, unknown until probed, its first result reported
    hc.set_targets([kept, removed])
    assert hc.wait_probed([removed], 2.0)
    assert recorder.states(removed) == [True, False]


def test_callback_exception_is_logged_and_checking_goes_on(checker, http_server, caplog):
    server = http_server(script=[200, 503])
    calls = []

    def on_change(target, healthy):
        calls.append(healthy)
        if len(calls) == 1:
            raise RuntimeError("agent bug")

    hc = checker(on_change)
    target = Target(LOCAL, server.port, "http", interval=0.05)
    with caplog.at_level(logging.ERROR):
        hc.set_targets([target])
        deadline = time.monotonic() + 2
        while len(calls) < 3 and time.monotonic() < deadline:
            time.sleep(0.02)
    assert calls == [True, False, True]
    assert "health check callback failed" in caplog.text and "agent bug" in caplog.text


def test_callback_may_use_the_checker(checker, acceptor, closed_port):
    """Callbacks run without the checker's lock: they can read its state and change the targets."""
    server = acceptor()
    seen = []
    hc = None
    up, down = Target(LOCAL, server.port, interval=0.05), Target(LOCAL, closed_port, interval=0.05)

    def on_change(target, healthy):
        seen.append((target, healthy, hc.healthy(target), len(hc.status())))
        if not healthy:
            hc.set_targets([up])  # drop the failing one from inside the callback

    hc = checker(on_change)
    hc.set_targets([down, up])
    deadline = time.monotonic() + 2
    while len(seen) < 2 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert sorted((t.port, h, now) for t, h, now, _rows in seen) == sorted(
        [(down.port, False, False), (up.port, True, True)]
    )
    assert hc.targets() == {up} and hc.healthy(down) is None


def test_wait_probed_times_out_for_a_target_without_a_result(checker, blackhole):
    hc = checker()
    target = Target(LOCAL, blackhole, interval=5.0, timeout=1.0)
    hc.set_targets([target])
    start = time.monotonic()
    assert hc.wait_probed([target], 0.2) is False
    assert 0.19 <= time.monotonic() - start < 0.5
    assert hc.healthy(target) is None


def test_a_timing_out_target_does_not_delay_200_others(checker, acceptor, blackhole):
    servers = acceptor(199)
    hc = checker()
    others = [Target(LOCAL, port, interval=0.2, timeout=0.15) for port in servers.ports]
    slow = Target(LOCAL, blackhole, interval=0.2, timeout=1.0)
    start = time.monotonic()
    hc.set_targets([slow, *others])
    assert hc.wait_probed(others, 1.0)
    assert time.monotonic() - start < 0.5
    assert hc.healthy(slow) is None  # still connecting
    time.sleep(1.1 - (time.monotonic() - start))
    rows = {r["port"]: r for r in hc.status()}
    assert rows[blackhole]["healthy"] is False and rows[blackhole]["last_error"] == "timeout after 1.0s"
    # every other target kept its 0.2 s rhythm all along: 6 probes in 1.1 s (5 or 7 at the edges)
    counts = sorted(len(servers.accepts[port]) for port in servers.ports)
    assert counts[0] >= 5 and counts[-1] <= 7
    assert all(rows[port]["healthy"] for port in servers.ports)


def test_stop_ends_probing_and_callbacks_and_closes_sockets(acceptor, blackhole):
    server = acceptor()
    recorder = Recorder()
    fds_before = len(os.listdir("/proc/self/fd"))
    hc = HealthChecker(recorder).start()
    hc.set_targets([Target(LOCAL, server.port, interval=0.05), Target(LOCAL, blackhole, interval=5.0, timeout=2.0)])
    assert recorder.wait(1)
    start = time.monotonic()
    hc.stop()
    assert time.monotonic() - start < 0.5  # does not wait for the probe in flight
    # A probe succeeds once the kernel completes the handshake, before the acceptor's thread takes the
    # connection from the backlog: let it catch up with the probes made before stop() first.
    deadline = time.monotonic() + 2
    while not server.accepts[server.port] and time.monotonic() < deadline:
        time.sleep(0.01)
    time.sleep(0.1)
    accepted = len(server.accepts[server.port])
    time.sleep(0.3)  # six probe intervals
    assert len(server.accepts[server.port]) == accepted
    server.stop()  # would be reported as unhealthy if the checker still ran
    time.sleep(0.2)
    assert len(recorder.calls) == 1
    assert not any(t.name.startswith("health-check") for t in threading.enumerate())
    assert len(os.listdir("/proc/self/fd")) <= fds_before  # pipe and probe sockets closed
    hc.stop()  # twice is fine
    with pytest.raises(RuntimeError, match="already stopped"):
        hc.start()


def test_max_workers_bounds_probes_in_flight(checker, acceptor, blackhole):
    """With one probe in flight at a time, a hanging probe holds the others back: the bound is real."""
    server = acceptor()
    hc = checker(max_workers=1)
    slow, fast = Target(LOCAL, blackhole, interval=5.0, timeout=0.3), Target(LOCAL, server.port, interval=5.0)
    hc.set_targets([slow])
    time.sleep(0.05)
    hc.set_targets([slow, fast])
    assert not hc.wait_probed([fast], 0.15)
    assert hc.wait_probed([fast], 1.0)
    with pytest.raises(ValueError, match="max_workers: 0 must be an integer >= 1"):
        HealthChecker(max_workers=0)


def test_ipv6_targets_are_probed_and_listed_after_ipv4(checker, acceptor):
    listener = socket.socket(socket.AF_INET6)
    listener.bind(("::1", 0))
    listener.listen(16)
    server = acceptor()
    try:
        v6, v4 = Target("::1", listener.getsockname()[1], interval=5.0), Target(LOCAL, server.port, interval=5.0)
        assert probe(v6) == (True, None)
        hc = checker()
        hc.set_targets([v6, v4])
        assert hc.wait_probed([v6, v4], 2.0)
        assert [(r["ip"], r["healthy"]) for r in hc.status()] == [(LOCAL, True), ("::1", True)]
    finally:
        listener.close()
