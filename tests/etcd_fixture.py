# -*- coding: utf-8 -*-
# Copyright: clustermesh.core contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""Reusable helpers to run a REAL etcd for tests: throwaway PKI, process, auth, a TCP proxy.

Everything listens on 127.0.0.1 only, on free ports; data, certificates, logs and the pidfile
live under a directory the caller owns (``tmp_path``).  Processes are stopped by the PID this
module started, never by name.  Private keys are written with mode 0600 and never printed.

Typical use in a test module::

    from ansible_collections.clustermesh.core.tests.etcd_fixture import EtcdServer, TestPKI

    @pytest.fixture
    def etcd(tmp_path):
        server = EtcdServer(tmp_path, TestPKI(tmp_path / "pki"))
        server.start()
        yield server
        server.stop()

The certificates are made here with ``cryptography`` on purpose: the fixture must not depend on
the collection's own PKI code it may be used to test.
"""

from __future__ import annotations

import datetime
import ipaddress
import os
import select
import shutil
import signal
import socket
import subprocess
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

ETCD_BIN = shutil.which("etcd") or "/usr/bin/etcd"
ETCDCTL_BIN = shutil.which("etcdctl") or "/usr/bin/etcdctl"
LOCALHOST = "127.0.0.1"


def etcd_available() -> bool:
    return os.access(ETCD_BIN, os.X_OK) and os.access(ETCDCTL_BIN, os.X_OK)


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((LOCALHOST, 0))
        return sock.getsockname()[1]


# --------------------------------------------------------------------------------------------
# PKI
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class CertPair:
    cert: str
    key: str


class TestPKI:
    """A throwaway CA that issues server and client certificates (EC P-256) into ``directory``."""

    __test__ = False  # not a pytest test class

    def __init__(self, directory, name: str = "clustermesh-test-ca"):
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self.name = name
        self._key = ec.generate_private_key(ec.SECP256R1())
        now = datetime.datetime.now(datetime.UTC)
        subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
        self._cert = (
            x509.CertificateBuilder()
            .subject_name(subject)
            .issuer_name(subject)
            .public_key(self._key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(
                x509.KeyUsage(
                    digital_signature=True,
                    content_commitment=False,
                    key_encipherment=False,
                    data_encipherment=False,
                    key_agreement=False,
                    key_cert_sign=True,
                    crl_sign=True,
                    encipher_only=False,
                    decipher_only=False,
                ),
                critical=True,
            )
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(self._key.public_key()), critical=False)
            .sign(self._key, hashes.SHA256())
        )
        self.ca_cert = str(self.directory / f"{name}.crt")
        Path(self.ca_cert).write_bytes(self._cert.public_bytes(serialization.Encoding.PEM))

    def issue(
        self,
        common_name: str,
        *,
        server: bool = False,
        client: bool = True,
        ips: tuple[str, ...] = (LOCALHOST,),
        dns_names: tuple[str, ...] = ("localhost",),
        filename: str | None = None,
    ) -> CertPair:
        key = ec.generate_private_key(ec.SECP256R1())
        now = datetime.datetime.now(datetime.UTC)
        usages = []
        if server:
            usages.append(ExtendedKeyUsageOID.SERVER_AUTH)
        if client:
            usages.append(ExtendedKeyUsageOID.CLIENT_AUTH)
        builder = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)]))
            .issuer_name(self._cert.subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.ExtendedKeyUsage(usages), critical=False)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(self._key.public_key()), critical=False)
        )
        if server:
            sans = [x509.IPAddress(ipaddress.ip_address(ip)) for ip in ips]
            sans += [x509.DNSName(name) for name in dns_names]
            builder = builder.add_extension(x509.SubjectAlternativeName(sans), critical=False)
        cert = builder.sign(self._key, hashes.SHA256())
        stem = filename or common_name
        cert_path = self.directory / f"{stem}.crt"
        key_path = self.directory / f"{stem}.key"
        cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        fd = os.open(key_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "wb") as handle:
            handle.write(
                key.private_bytes(
                    serialization.Encoding.PEM,
                    serialization.PrivateFormat.PKCS8,
                    serialization.NoEncryption(),
                )
            )
        return CertPair(str(cert_path), str(key_path))

    def client(self, common_name: str) -> CertPair:
        """A client certificate whose CN is the etcd user name (cached per CN)."""
        cert_path = self.directory / f"client-{common_name}.crt"
        key_path = self.directory / f"client-{common_name}.key"
        if cert_path.exists() and key_path.exists():
            return CertPair(str(cert_path), str(key_path))
        return self.issue(common_name, filename=f"client-{common_name}")


# --------------------------------------------------------------------------------------------
# etcd process
# --------------------------------------------------------------------------------------------


class EtcdStartError(RuntimeError):
    pass


class EtcdServer:
    """One etcd member on 127.0.0.1 with mTLS on the client port (``--client-cert-auth``).

    ``directory`` holds ``data/``, ``etcd.log`` and ``etcd.pid``.  The server certificate and
    a ``root`` client certificate are issued from ``pki``.  ``restart()`` keeps the data
    directory (and so the revision history); ``kill()`` sends SIGKILL to the PID we started.
    """

    def __init__(
        self,
        directory,
        pki: TestPKI,
        *,
        name: str = "cm-test",
        client_port: int | None = None,
        peer_port: int | None = None,
        auto_compaction_retention: str = "1",
        extra_args: tuple[str, ...] = (),
    ):
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self.pki = pki
        self.name = name
        self.client_port = client_port or free_port()
        self.peer_port = peer_port or free_port()
        self.auto_compaction_retention = auto_compaction_retention
        self.extra_args = tuple(extra_args)
        self.data_dir = self.directory / "data"
        self.log_path = self.directory / "etcd.log"
        self.pidfile = self.directory / "etcd.pid"
        self.server_cert = pki.issue(f"{name}-server", server=True, client=True, filename=f"{name}-server")
        self.root_cert = pki.client("root")
        self._proc: subprocess.Popen | None = None
        self._log_handle = None

    # -- addresses ------------------------------------------------------------------------
    @property
    def endpoint(self) -> str:
        return f"https://{LOCALHOST}:{self.client_port}"

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None else None

    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def command(self) -> list[str]:
        peer = f"http://{LOCALHOST}:{self.peer_port}"
        return [
            ETCD_BIN,
            "--name",
            self.name,
            "--data-dir",
            str(self.data_dir),
            "--listen-client-urls",
            self.endpoint,
            "--advertise-client-urls",
            self.endpoint,
            "--listen-peer-urls",
            peer,
            "--initial-advertise-peer-urls",
            peer,
            "--initial-cluster",
            f"{self.name}={peer}",
            "--initial-cluster-state",
            "new",
            "--client-cert-auth",
            "--trusted-ca-file",
            self.pki.ca_cert,
            "--cert-file",
            self.server_cert.cert,
            "--key-file",
            self.server_cert.key,
            "--auto-compaction-mode",
            "periodic",
            f"--auto-compaction-retention={self.auto_compaction_retention}",
            "--heartbeat-interval",
            "20",
            "--election-timeout",
            "200",
            "--logger",
            "zap",
            "--log-outputs",
            "stderr",
            *self.extra_args,
        ]

    # -- lifecycle ------------------------------------------------------------------------
    def start(self, timeout: float = 20.0) -> EtcdServer:
        if self.running():
            raise EtcdStartError(f"etcd {self.name} already running as PID {self.pid}")
        self._log_handle = open(self.log_path, "ab")  # noqa: SIM115 - closed in _reap
        self._proc = subprocess.Popen(
            self.command(),
            stdin=subprocess.DEVNULL,
            stdout=self._log_handle,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        self.pidfile.write_text(f"{self._proc.pid}\n")
        deadline = time.monotonic() + timeout
        last = ""
        while time.monotonic() < deadline:
            if self._proc.poll() is not None:
                self._reap()
                raise EtcdStartError(f"etcd exited with {self._proc.returncode}:\n{self.log_tail()}")
            result = self.etcdctl("endpoint", "health", check=False, command_timeout="1s")
            if result.returncode == 0:
                return self
            last = (result.stdout + result.stderr).strip()
            time.sleep(0.05)
        self.stop()
        raise EtcdStartError(f"etcd not healthy within {timeout}s ({last}):\n{self.log_tail()}")

    def stop(self, timeout: float = 10.0) -> None:
        """SIGTERM the PID we started, SIGKILL after ``timeout``; idempotent."""
        if self._proc is None:
            return
        if self._proc.poll() is None:
            try:
                os.kill(self._proc.pid, signal.SIGTERM)
                self._proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                os.kill(self._proc.pid, signal.SIGKILL)
                self._proc.wait(timeout=timeout)
            except ProcessLookupError:
                pass
        self._reap()

    def kill(self) -> None:
        """SIGKILL the PID we started (a crash), keeping the data directory."""
        if self._proc is not None and self._proc.poll() is None:
            os.kill(self._proc.pid, signal.SIGKILL)
            self._proc.wait(timeout=10)
        self._reap()

    def restart(self, timeout: float = 20.0, *, hard: bool = True) -> EtcdServer:
        self.kill() if hard else self.stop()
        return self.start(timeout=timeout)

    def _reap(self) -> None:
        if self._log_handle is not None:
            self._log_handle.close()
            self._log_handle = None
        try:
            self.pidfile.unlink()
        except FileNotFoundError:
            pass

    def log_tail(self, lines: int = 30) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""

    # -- etcdctl --------------------------------------------------------------------------
    def etcdctl(
        self,
        *args: str,
        user: str = "root",
        check: bool = True,
        command_timeout: str = "5s",
        input_text: str | None = None,
    ) -> subprocess.CompletedProcess:
        """Run etcdctl (API v3) against this server as the client-certificate user ``user``."""
        pair = self.pki.client(user)
        env = dict(os.environ, ETCDCTL_API="3")
        cmd = [
            ETCDCTL_BIN,
            "--endpoints",
            self.endpoint,
            "--cacert",
            self.pki.ca_cert,
            "--cert",
            pair.cert,
            "--key",
            pair.key,
            "--dial-timeout",
            "1s",
            "--command-timeout",
            command_timeout,
            *args,
        ]
        result = subprocess.run(cmd, env=env, capture_output=True, text=True, input=input_text, timeout=30, check=False)
        if check and result.returncode != 0:
            raise RuntimeError(f"etcdctl {' '.join(args)} failed: {result.stderr.strip() or result.stdout.strip()}")
        return result

    def enable_auth(self, users: dict[str, list[tuple[str, str, bool]]] | None = None) -> None:
        """Create ``root`` (role root) and CN users without password, then ``auth enable``.

        ``users`` maps a user name to grants ``(permission, key, is_prefix)`` with permission
        ``read``/``write``/``readwrite``; each user gets a role named ``<user>-role``.
        """
        self.etcdctl("user", "add", "root", "--no-password")
        self.etcdctl("user", "grant-role", "root", "root")
        for user, grants in (users or {}).items():
            role = f"{user}-role"
            self.etcdctl("user", "add", user, "--no-password")
            self.etcdctl("role", "add", role)
            for perm, key, is_prefix in grants:
                args = ["role", "grant-permission", role, perm, key]
                if is_prefix:
                    args.append("--prefix=true")
                self.etcdctl(*args)
            self.etcdctl("user", "grant-role", user, role)
        self.etcdctl("auth", "enable")

    def current_revision(self) -> int:
        import json

        out = self.etcdctl("endpoint", "status", "-w", "json").stdout
        return int(json.loads(out)[0]["Status"]["header"]["revision"])

    def compact(self, revision: int | None = None) -> int:
        revision = revision or self.current_revision()
        self.etcdctl("compaction", "--physical", str(revision))
        return revision


# --------------------------------------------------------------------------------------------
# A TCP proxy that can cut connections (an L4 passthrough like HAProxy in mode tcp)
# --------------------------------------------------------------------------------------------


class TCPProxy:
    """Forwards 127.0.0.1:<port> to ``target``; TLS passes through untouched.

    ``block()`` closes every connection and refuses new ones until ``unblock()``: a network
    partition between a client and etcd that the test controls exactly.  ``freeze()`` makes the
    current connections silently stop forwarding while staying open (a half-open connection,
    as after lost NAT state); new connections work.
    """

    def __init__(self, target_port: int, port: int | None = None):
        self.target = (LOCALHOST, target_port)
        self.port = port or free_port()
        self._blocked = threading.Event()
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._conns: list[socket.socket] = []
        self._frozen: set[socket.socket] = set()
        self._listener: socket.socket | None = None
        self._thread: threading.Thread | None = None

    @property
    def endpoint(self) -> str:
        return f"https://{LOCALHOST}:{self.port}"

    def start(self) -> TCPProxy:
        self._listen()
        self._thread = threading.Thread(target=self._accept_loop, name=f"tcpproxy-{self.port}", daemon=True)
        self._thread.start()
        return self

    def _listen(self) -> None:
        listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind((LOCALHOST, self.port))
        listener.listen(64)
        listener.settimeout(0.1)
        self._listener = listener

    def _accept_loop(self) -> None:
        while not self._stop.is_set():
            listener = self._listener
            if listener is None:
                time.sleep(0.05)
                continue
            try:
                client, unused = listener.accept()
            except (TimeoutError, OSError):
                continue
            if self._blocked.is_set():
                client.close()
                continue
            try:
                upstream = socket.create_connection(self.target, timeout=2)
            except OSError:
                client.close()
                continue
            with self._lock:
                self._conns += [client, upstream]
            for src, dst in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pump, args=(src, dst), daemon=True).start()

    def _pump(self, src: socket.socket, dst: socket.socket) -> None:
        src.settimeout(None)
        try:
            while not self._stop.is_set():
                if src in self._frozen:
                    time.sleep(0.1)
                    continue
                ready = select.select([src], [], [], 0.1)[0]
                if not ready:
                    continue
                data = src.recv(65536)
                if not data:
                    break
                dst.sendall(data)
        except (OSError, ValueError):  # ValueError: select() on a socket block() closed
            pass
        finally:
            for sock in (src, dst):
                try:
                    sock.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

    def _close_conns(self) -> None:
        with self._lock:
            conns, self._conns = self._conns, []
        for sock in conns:
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            sock.close()

    def freeze(self) -> None:
        """Current connections stop forwarding in both directions, without being closed."""
        with self._lock:
            self._frozen.update(self._conns)

    def block(self) -> None:
        """Cut every connection and refuse new ones (the port stops listening)."""
        self._blocked.set()
        listener, self._listener = self._listener, None
        if listener is not None:
            listener.close()
        self._close_conns()

    def unblock(self) -> None:
        self._blocked.clear()
        if self._listener is None:
            self._listen()

    def stop(self) -> None:
        self._stop.set()
        self.block()
        if self._thread is not None:
            self._thread.join(timeout=5)


class SilentListener:
    """Accepts TCP connections on 127.0.0.1 and never answers: a peer that hangs a TLS handshake."""

    def __init__(self):
        self._sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self._sock.bind((LOCALHOST, 0))
        self._sock.listen(64)
        self.port = self._sock.getsockname()[1]

    @property
    def endpoint(self) -> str:
        return f"https://{LOCALHOST}:{self.port}"

    def close(self) -> None:
        self._sock.close()
