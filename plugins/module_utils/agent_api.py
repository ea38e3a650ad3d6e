# -*- coding: utf-8 -*-
# Copyright: clustermesh.core contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""The node agent's local API: JSON over HTTP/1.1 on a unix socket (server, handler registry, client).

The agent ``meshd`` listens on ``/run/clustermesh/meshd.sock`` (mode 0600: only root talks to it);
the CNI plugin (``agentSocket`` in its configuration) and ``meshctl`` are its clients. Routes::

    POST   /v1/endpoints                      a pod was added (body: an endpoint, see below) -> 200 {"endpoint": {...}}
    DELETE /v1/endpoints/<container>/<ifname> a pod was removed -> 200 {"deleted": true|false} (false: unknown)
    GET    /v1/endpoints                      -> {"endpoints": [...]}, sorted by IP
    GET    /v1/status                         -> {"status": {...}}
    GET    /v1/clusters                       -> {"clusters": [...]}
    GET    /v1/services                       -> {"services": [...]}
    GET    /v1/identities                     -> {"identities": [...]}

An endpoint is the CNI plugin's allocation record (``ipam``): ``containerID`` and ``ifname``
(required, the attachment's key), ``ip`` (required, a pod address of the node's pod CIDR),
``labels`` (``{key: value}``, Kubernetes label syntax), ``netns`` (absolute path), ``hostInterface``
(the host end of the veth), ``mac`` and ``args`` (``CNI_ARGS`` as a map). Other keys are refused.

Every answer is a JSON object; a failure is ``{"error": "<message naming the field>"}`` with
400 (bad JSON or a bad field), 404 (unknown path), 405 (method not allowed on the path), 411/413
(missing or too large body) or 500 (a handler failed: the message names the exception).

Handlers live in an :class:`AgentApi` registry (``api.route("GET", "/v1/clusters", fn)``); the agent
registers its own. :func:`default_api` wires an in-memory :class:`EndpointRegistry` and empty lists
for the rest. :class:`AgentClient` is the client; an agent that is not there raises
:class:`AgentUnreachable` naming the socket. Standard library only, no Ansible imports.
"""

from __future__ import annotations

import contextlib
import errno
import ipaddress
import json
import os
import re
import socket
import stat
import threading
import time
import urllib.parse

DEFAULT_SOCKET = "/run/clustermesh/meshd.sock"
SOCKET_MODE = 0o600
DEFAULT_TIMEOUT = 2.0  # client: connect + answer, seconds
SERVER_TIMEOUT = 10.0  # server: a client that sends nothing for this long is dropped (seconds)
MAX_BODY = 64 * 1024
API_PREFIX = "/v1"

ENDPOINT_REQUIRED = ("containerID", "ifname", "ip")
ENDPOINT_OPTIONAL = ("labels", "netns", "hostInterface", "mac", "args")
_CONTAINER_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.\-]*$")
_MAC_RE = re.compile(r"^[0-9a-fA-F]{2}(:[0-9a-fA-F]{2}){5}$")


class ApiError(Exception):
    """A request the API refuses: HTTP ``status`` and a message naming the field."""

    def __init__(self, status, message):
        super().__init__(message)
        self.status = status
        self.message = message


class AgentUnreachable(Exception):
    """Nobody answers on the socket (no agent, wrong path, no permission, timeout)."""

    def __init__(self, socket_path, reason):
        super().__init__("the agent is not reachable on %s: %s" % (socket_path, reason))
        self.socket_path = socket_path
        self.reason = reason


class AgentRequestError(Exception):
    """The agent answered with an error status; ``status`` and the agent's ``message``."""

    def __init__(self, status, message):
        super().__init__("agent answered %d: %s" % (status, message))
        self.status = status
        self.message = message


# endpoints ------------------------------------------------------------------------------------------
def _valid_ifname(name):
    return (
        isinstance(name, str)
        and 0 < len(name.encode("utf-8")) < 16
        and name not in (".", "..")
        and not any(c in name for c in "/:")
        and not any(c.isspace() for c in name)
    )


def validate_endpoint(payload, pod_cidr=None):
    """A checked copy of an endpoint payload; ApiError(400) naming the first bad field.

    ``pod_cidr`` (the node's, e.g. ``"10.1.0.0/24"``): when given, ``ip`` must be one of its pod
    addresses (not the network, broadcast or the node's own first address)."""
    if not isinstance(payload, dict):
        raise ApiError(400, "endpoint: the body must be a JSON object, got %s" % type(payload).__name__)
    unknown = sorted(set(payload) - set(ENDPOINT_REQUIRED) - set(ENDPOINT_OPTIONAL))
    if unknown:
        raise ApiError(
            400,
            "endpoint: unknown field(s) %s; known: %s"
            % (", ".join(unknown), ", ".join(ENDPOINT_REQUIRED + ENDPOINT_OPTIONAL)),
        )
    for key in ENDPOINT_REQUIRED:
        if key not in payload:
            raise ApiError(400, "endpoint.%s: missing (required: %s)" % (key, ", ".join(ENDPOINT_REQUIRED)))
    container = payload["containerID"]
    if not isinstance(container, str) or not container.strip():
        raise ApiError(400, "endpoint.containerID: must be a non-empty string, got %s" % json.dumps(container))
    if not _CONTAINER_RE.match(container):
        raise ApiError(
            400,
            "endpoint.containerID: %r must be letters, digits, '_', '.', '-', starting with a letter or digit"
            % container,
        )
    if not _valid_ifname(payload["ifname"]):
        raise ApiError(
            400,
            "endpoint.ifname: %s is not an interface name (1-15 bytes, no '/', ':' or spaces)"
            % json.dumps(payload["ifname"]),
        )
    try:
        ip = ipaddress.IPv4Address(payload["ip"])
    except (ValueError, TypeError):
        raise ApiError(400, "endpoint.ip: %s is not an IPv4 address" % json.dumps(payload["ip"])) from None
    if pod_cidr is not None:
        from .ipam import usable_range

        network = ipaddress.IPv4Network(pod_cidr)
        first, count = usable_range(network)
        if ip not in network:
            raise ApiError(400, "endpoint.ip: %s is outside this node's pod CIDR %s" % (ip, network))
        if first is None or not 0 <= int(ip) - int(first) < count:
            raise ApiError(
                400,
                "endpoint.ip: %s is not a pod address of %s (network, broadcast and the node's first address "
                "are reserved)" % (ip, network),
            )
    labels = payload.get("labels") or {}
    if labels:
        from .services import ServiceError, validate_labels

        try:
            labels = validate_labels(labels, "endpoint.labels")
        except ServiceError as exc:
            raise ApiError(400, str(exc)) from None
    elif not isinstance(labels, dict):
        raise ApiError(400, "endpoint.labels: must be an object of label keys to values")
    netns = payload.get("netns")
    if netns is not None and (not isinstance(netns, str) or not netns.startswith("/")):
        raise ApiError(400, "endpoint.netns: %s must be an absolute path" % json.dumps(netns))
    host = payload.get("hostInterface")
    if host is not None and not _valid_ifname(host):
        raise ApiError(400, "endpoint.hostInterface: %s is not an interface name" % json.dumps(host))
    mac = payload.get("mac")
    if mac is not None and (not isinstance(mac, str) or not _MAC_RE.match(mac)):
        raise ApiError(400, "endpoint.mac: %s is not a MAC address (aa:bb:cc:dd:ee:ff)" % json.dumps(mac))
    args = payload.get("args") or {}
    if not isinstance(args, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in args.items()):
        raise ApiError(400, "endpoint.args: must be an object of strings (CNI_ARGS)")
    result = {"containerID": container, "ifname": payload["ifname"], "ip": str(ip), "labels": dict(labels)}
    result.update({k: payload[k] for k in ("netns", "hostInterface", "mac") if payload.get(k) is not None})
    result["args"] = dict(args)
    return result


class EndpointRegistry:
    """The node's endpoints in memory, keyed by (containerID, ifname); thread-safe.

    ``on_change(event, endpoint)`` ("add" / "del") is called after each change, outside the lock."""

    def __init__(self, pod_cidr=None, on_change=None):
        self.pod_cidr = pod_cidr
        self.on_change = on_change
        self._lock = threading.Lock()
        self._endpoints = {}

    def add(self, payload):
        """Validate and store an endpoint (replacing one with the same key, or one holding the same IP:
        an address belongs to one pod). Returns the stored endpoint."""
        endpoint = validate_endpoint(payload, self.pod_cidr)
        key = (endpoint["containerID"], endpoint["ifname"])
        displaced = []
        with self._lock:
            for other, existing in list(self._endpoints.items()):
                if other != key and existing["ip"] == endpoint["ip"]:
                    displaced.append(self._endpoints.pop(other))
            self._endpoints[key] = endpoint
        if self.on_change:
            for old in displaced:
                self.on_change("del", old)
            self.on_change("add", endpoint)
        return endpoint

    def remove(self, container_id, ifname):
        """Forget an endpoint; the removed one, or None when unknown."""
        with self._lock:
            endpoint = self._endpoints.pop((container_id, ifname), None)
        if endpoint is not None and self.on_change:
            self.on_change("del", endpoint)
        return endpoint

    def get(self, container_id, ifname):
        with self._lock:
            return self._endpoints.get((container_id, ifname))

    def list(self):
        """Every endpoint, sorted by IP."""
        with self._lock:
            values = list(self._endpoints.values())
        return sorted(values, key=lambda e: ipaddress.IPv4Address(e["ip"]))

    def load_allocations(self, records):
        """(Re)fill from IPAM allocation records (``ipam.read_allocations``) at agent start: the pods the
        CNI plugin added while the agent was down. Records that do not validate are returned with the
        reason, not stored: ``[(record, message), ...]``."""
        skipped = []
        for record in records:
            payload = {k: v for k, v in record.items() if k in ENDPOINT_REQUIRED + ENDPOINT_OPTIONAL}
            try:
                self.add(payload)
            except ApiError as exc:
                skipped.append((record, exc.message))
        return skipped

    def __len__(self):
        with self._lock:
            return len(self._endpoints)


# the handler registry --------------------------------------------------------------------------------
class Request:
    """What a handler gets: ``method``, ``path``, ``params`` (from ``{name}`` segments), ``query`` (dict of
    lists) and ``json()`` (the decoded body; ApiError(400) when it is not JSON)."""

    def __init__(self, method, path, params, query, body):
        self.method = method
        self.path = path
        self.params = params
        self.query = query
        self.body = body

    def json(self):
        if not self.body:
            raise ApiError(400, "body: missing; send a JSON object")
        try:
            return json.loads(self.body.decode("utf-8"))
        except (UnicodeDecodeError, ValueError) as exc:
            raise ApiError(400, "body: not valid JSON (%s)" % exc) from None


class AgentApi:
    """Routes ``(method, pattern)`` -> handler. A pattern is a path whose ``{name}`` segments match one
    path segment (URL-decoded into ``request.params[name]``). A handler takes a :class:`Request` and
    returns a JSON-serialisable object (status 200) or ``(status, object)``; it raises ApiError to refuse."""

    def __init__(self):
        self._routes = []  # (method, segments, handler)

    def route(self, method, pattern, handler):
        """Register (or replace) the handler of ``method`` on ``pattern``."""
        method = method.upper()
        segments = tuple(pattern.strip("/").split("/"))
        self._routes = [r for r in self._routes if not (r[0] == method and r[1] == segments)]
        self._routes.append((method, segments, handler))

    def routes(self):
        return sorted((m, "/" + "/".join(s)) for m, s, _h in self._routes)

    @staticmethod
    def _match(segments, parts):
        if len(segments) != len(parts):
            return None
        params = {}
        for seg, part in zip(segments, parts, strict=True):
            if seg.startswith("{") and seg.endswith("}"):
                if not part:
                    return None
                params[seg[1:-1]] = urllib.parse.unquote(part)
            elif seg != part:
                return None
        return params

    def dispatch(self, method, target, body=b""):
        """(status, JSON object) for one request; never raises."""
        split = urllib.parse.urlsplit(target)
        parts = split.path.strip("/").split("/")
        allowed = []
        for route_method, segments, handler in self._routes:
            params = self._match(segments, parts)
            if params is None:
                continue
            if route_method != method:
                allowed.append(route_method)
                continue
            request = Request(method, split.path, params, urllib.parse.parse_qs(split.query), body)
            try:
                answer = handler(request)
            except ApiError as exc:
                return exc.status, {"error": exc.message}
            except Exception as exc:  # a handler bug must not take the agent down
                return 500, {"error": "%s %s failed: %s: %s" % (method, split.path, type(exc).__name__, exc)}
            if isinstance(answer, tuple):
                return answer
            return 200, answer
        if allowed:
            return 405, {"error": "%s is not allowed on %s (allowed: %s)" % (method, split.path, ", ".join(allowed))}
        return 404, {"error": "no such path %s (paths: %s)" % (split.path, ", ".join(p for _m, p in self.routes()))}


def default_api(registry=None, status=None):
    """An AgentApi with the endpoint routes on ``registry`` (a new EndpointRegistry when None) and stubs
    for clusters, services and identities (empty lists). ``status`` is a callable returning a dict
    merged into the status answer."""
    registry = registry if registry is not None else EndpointRegistry()
    api = AgentApi()
    started = time.time()

    def add(request):
        return {"endpoint": registry.add(request.json())}

    def delete(request):
        return {"deleted": registry.remove(request.params["container"], request.params["ifname"]) is not None}

    def status_handler(_request):
        answer = {"endpoints": len(registry), "started": started, "uptime": round(time.time() - started, 3)}
        if status is not None:
            answer.update(status())
        return {"status": answer}

    api.route("POST", API_PREFIX + "/endpoints", add)
    api.route("GET", API_PREFIX + "/endpoints", lambda _r: {"endpoints": registry.list()})
    api.route("DELETE", API_PREFIX + "/endpoints/{container}/{ifname}", delete)
    api.route("GET", API_PREFIX + "/status", status_handler)
    for name in ("clusters", "services", "identities"):
        api.route("GET", "%s/%s" % (API_PREFIX, name), lambda _r, name=name: {name: []})
    api.registry = registry
    return api


# the server ------------------------------------------------------------------------------------------
_SERVER_CLASSES = None


def _server_classes():
    """(handler class, server class), built on first use: http.server costs ~30 ms to import, which
    clients (the CNI plugin on every pod ADD/DEL, meshctl) do not pay."""
    global _SERVER_CLASSES
    if _SERVER_CLASSES is not None:
        return _SERVER_CLASSES
    import http.server
    import socketserver

    class Handler(http.server.BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"
        server_version = "meshd"

        def setup(self):
            self.timeout = SERVER_TIMEOUT  # a client that sends nothing for this long is dropped
            super().setup()

        def _serve(self):
            body = b""
            if self.command in ("POST", "PUT", "PATCH"):
                length = self.headers.get("Content-Length")
                if length is None:
                    self.close_connection = True
                    return self._reply(411, {"error": "Content-Length: missing (send the JSON body with its length)"})
                try:
                    length = int(length)
                except ValueError:
                    self.close_connection = True
                    return self._reply(400, {"error": "Content-Length: %r is not a number" % length})
                if length > MAX_BODY:
                    self.close_connection = True
                    return self._reply(413, {"error": "body: %d bytes, the limit is %d" % (length, MAX_BODY)})
                body = self.rfile.read(length)
            status, answer = self.server.api.dispatch(self.command, self.path, body)
            return self._reply(status, answer)

        do_GET = do_POST = do_DELETE = do_PUT = _serve

        def _reply(self, status, answer):
            data = (json.dumps(answer, sort_keys=True) + "\n").encode("utf-8")
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def address_string(self):
            return "local"

        def log_message(self, format, *args):  # noqa: A002 (the base class's name)
            log = getattr(self.server, "log", None)
            if log is not None:
                log(format % args)

    class UnixHttpServer(socketserver.ThreadingMixIn, socketserver.UnixStreamServer):
        """A threaded HTTP server on a unix socket, answering with an AgentApi."""

        daemon_threads = True

        def __init__(self, socket_path, api, log=None):
            self.api = api
            self.log = log
            self.socket_path = socket_path
            super().__init__(socket_path, Handler, bind_and_activate=False)
            try:
                old = os.umask(0o177)  # the socket file is born 0600: no window where others may connect
                try:
                    self.server_bind()
                finally:
                    os.umask(old)
                os.chmod(socket_path, SOCKET_MODE)
                self.server_activate()
            except BaseException:
                self.server_close()
                raise

        def get_request(self):
            conn, addr = super().get_request()
            return conn, addr or "local"

    _SERVER_CLASSES = (Handler, UnixHttpServer)
    return _SERVER_CLASSES


def _prepare_socket_path(path):
    """Make the directory (0755) and remove a stale socket; OSError when a live agent owns the path or
    the path is something other than a socket."""
    directory = os.path.dirname(path) or "."
    os.makedirs(directory, mode=0o755, exist_ok=True)
    try:
        mode = os.lstat(path).st_mode
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(mode):
        raise OSError(errno.EEXIST, "%s exists and is not a socket; remove it or choose another socket path" % path)
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    probe.settimeout(0.5)
    try:
        probe.connect(path)
    except OSError:
        os.unlink(path)  # nobody listens: left behind by an agent that died
        return
    finally:
        probe.close()
    raise OSError(errno.EADDRINUSE, "%s: another agent is listening there" % path)


class AgentServer:
    """The API served on ``socket_path`` from a background thread: ``start()``, ``close()``; also a
    context manager. ``close()`` removes the socket file."""

    def __init__(self, socket_path=DEFAULT_SOCKET, api=None, log=None):
        self.socket_path = socket_path
        self.api = api if api is not None else default_api()
        self.log = log
        self._server = None
        self._thread = None

    def start(self):
        _prepare_socket_path(self.socket_path)
        self._server = _server_classes()[1](self.socket_path, self.api, self.log)
        self._thread = threading.Thread(
            target=self._server.serve_forever, kwargs={"poll_interval": 0.05}, name="agent-api", daemon=True
        )
        self._thread.start()
        return self

    def close(self):
        if self._server is None:
            return
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=5)
        self._server = None
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.socket_path)

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.close()


# the client ------------------------------------------------------------------------------------------
MAX_ANSWER = 16 * 1024 * 1024


class AgentClient:
    """Talks to the agent on ``socket_path``: one connection per request (``Connection: close``), the
    whole exchange within ``timeout`` seconds. Every call raises AgentUnreachable (no agent, timeout,
    not an HTTP answer) or AgentRequestError (the agent refused: status and message). Plain sockets, no
    http.client: the CNI plugin pays for this on every pod."""

    def __init__(self, socket_path=DEFAULT_SOCKET, timeout=DEFAULT_TIMEOUT):
        self.socket_path = socket_path
        self.timeout = timeout

    def _exchange(self, method, path, data):
        """(status, body bytes) of one request."""
        head = "%s %s HTTP/1.1\r\nHost: meshd\r\nConnection: close\r\nAccept: application/json\r\n" % (method, path)
        if data is not None:
            head += "Content-Type: application/json\r\nContent-Length: %d\r\n" % len(data)
        deadline = time.monotonic() + self.timeout
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.settimeout(self.timeout)
            sock.connect(self.socket_path)
            sock.sendall(head.encode("ascii") + b"\r\n" + (data or b""))
            chunks, size = [], 0
            while True:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise TimeoutError
                sock.settimeout(remaining)
                chunk = sock.recv(65536)
                if not chunk:
                    break
                chunks.append(chunk)
                size += len(chunk)
                if size > MAX_ANSWER:
                    raise AgentUnreachable(self.socket_path, "the answer is larger than %d bytes" % MAX_ANSWER)
        finally:
            sock.close()
        raw = b"".join(chunks)
        header, sep, body = raw.partition(b"\r\n\r\n")
        lines = header.split(b"\r\n")
        status_line = lines[0].split(None, 2)
        if not sep or len(status_line) < 2 or not status_line[0].startswith(b"HTTP/") or not status_line[1].isdigit():
            raise AgentUnreachable(self.socket_path, "not an HTTP answer: %r" % raw[:80])
        for line in lines[1:]:
            name, _sep, value = line.partition(b":")
            if name.strip().lower() == b"content-length" and value.strip().isdigit():
                length = int(value.strip())
                if len(body) < length:
                    raise AgentUnreachable(
                        self.socket_path, "the answer was cut off (%d of %d bytes)" % (len(body), length)
                    )
                body = body[:length]
        return int(status_line[1]), body

    def request(self, method, path, body=None):
        """The decoded JSON answer of one request."""
        data = None if body is None else json.dumps(body).encode("utf-8")
        try:
            status, raw = self._exchange(method, path, data)
        except FileNotFoundError:
            raise AgentUnreachable(self.socket_path, "no such socket (is meshd running?)") from None
        except ConnectionRefusedError:
            raise AgentUnreachable(self.socket_path, "connection refused (is meshd running?)") from None
        except PermissionError:
            raise AgentUnreachable(self.socket_path, "permission denied (the socket is root's: run as root)") from None
        except TimeoutError:
            raise AgentUnreachable(self.socket_path, "no answer within %gs" % self.timeout) from None
        except OSError as exc:
            raise AgentUnreachable(self.socket_path, "%s: %s" % (type(exc).__name__, exc)) from None
        try:
            answer = json.loads(raw.decode("utf-8"))
        except (UnicodeDecodeError, ValueError):
            raise AgentRequestError(status, "the answer is not JSON: %r" % raw[:200]) from None
        if status >= 400:
            message = answer.get("error") if isinstance(answer, dict) else None
            raise AgentRequestError(status, message or json.dumps(answer))
        return answer

    def add_endpoint(self, endpoint):
        return self.request("POST", API_PREFIX + "/endpoints", endpoint)["endpoint"]

    def delete_endpoint(self, container_id, ifname):
        path = "%s/endpoints/%s/%s" % (
            API_PREFIX,
            urllib.parse.quote(container_id, safe=""),
            urllib.parse.quote(ifname, safe=""),
        )
        return self.request("DELETE", path)["deleted"]

    def endpoints(self):
        return self.request("GET", API_PREFIX + "/endpoints")["endpoints"]

    def status(self):
        return self.request("GET", API_PREFIX + "/status")["status"]

    def clusters(self):
        return self.request("GET", API_PREFIX + "/clusters")["clusters"]

    def services(self):
        return self.request("GET", API_PREFIX + "/services")["services"]

    def identities(self):
        return self.request("GET", API_PREFIX + "/identities")["identities"]

    def policy(self, endpoint):
        return self.request("GET", API_PREFIX + "/policy/" + urllib.parse.quote(endpoint, safe=""))["policy"]

    def drops(self):
        return self.request("GET", API_PREFIX + "/drops")["drops"]
