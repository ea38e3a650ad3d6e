"""A STAND-IN (mock) for the Kubernetes API server: only the Secret endpoints of core/v1.

No Kubernetes runs on this machine, so tests of the Secret output talk to this small HTTP server
instead. It keeps Secrets in memory, answers like the real API (404 Status for a missing Secret,
409 on a stale resourceVersion) and records every request so tests can assert what was sent.
"""

from __future__ import annotations

import json
import re
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

_ITEM = re.compile(r"^/api/v1/namespaces/([^/]+)/secrets/([^/?]+)$")
_LIST = re.compile(r"^/api/v1/namespaces/([^/]+)/secrets/?$")


class KubernetesStandIn:
    def __init__(self):
        self.secrets = {}  # (namespace, name) -> object
        self.requests = []  # (method, path)
        self._version = 0
        standin = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def _send(self, code, body):
                data = json.dumps(body).encode()
                self.send_response(code)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def _body(self):
                return json.loads(self.rfile.read(int(self.headers.get("Content-Length", 0))) or b"{}")

            def _status(self, code, reason):
                self._send(
                    code, {"kind": "Status", "apiVersion": "v1", "status": "Failure", "reason": reason, "code": code}
                )

            def do_GET(self):
                standin.requests.append(("GET", self.path))
                m = _ITEM.match(self.path.split("?")[0])
                if not m or (m.group(1), m.group(2)) not in standin.secrets:
                    return self._status(404, "NotFound")
                return self._send(200, standin.secrets[(m.group(1), m.group(2))])

            def do_POST(self):
                standin.requests.append(("POST", self.path))
                m = _LIST.match(self.path.split("?")[0])
                body = self._body()
                key = (m.group(1), body["metadata"]["name"])
                if key in standin.secrets:
                    return self._status(409, "AlreadyExists")
                return self._send(201, standin._store(key, body))

            def do_PUT(self):
                standin.requests.append(("PUT", self.path))
                m = _ITEM.match(self.path.split("?")[0])
                key = (m.group(1), m.group(2))
                body = self._body()
                if key not in standin.secrets:
                    return self._status(404, "NotFound")
                if body["metadata"].get("resourceVersion") != standin.secrets[key]["metadata"]["resourceVersion"]:
                    return self._status(409, "Conflict")
                return self._send(200, standin._store(key, body))

            def do_DELETE(self):
                standin.requests.append(("DELETE", self.path))
                m = _ITEM.match(self.path.split("?")[0])
                key = (m.group(1), m.group(2))
                if standin.secrets.pop(key, None) is None:
                    return self._status(404, "NotFound")
                return self._send(200, {"kind": "Status", "status": "Success"})

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def _store(self, key, body):
        self._version += 1
        body.setdefault("metadata", {})["resourceVersion"] = str(self._version)
        body["metadata"]["namespace"] = key[0]
        self.secrets[key] = body
        return body

    @property
    def url(self):
        return "http://127.0.0.1:%d" % self.server.server_address[1]

    def kubeconfig(self, path):
        config = {
            "apiVersion": "v1",
            "kind": "Config",
            "clusters": [{"name": "standin", "cluster": {"server": self.url}}],
            "users": [{"name": "standin", "user": {"token": "stand-in-token"}}],
            "contexts": [{"name": "standin", "context": {"cluster": "standin", "user": "standin"}}],
            "current-context": "standin",
        }
        with open(path, "w") as f:
            json.dump(config, f)
        return str(path)

    def start(self):
        self.thread.start()
        return self

    def stop(self):
        self.server.shutdown()
        self.server.server_close()
