"""A private RabbitMQ node for the tests and benches that stop a broker or speak TLS to one (never the shared node).

Started as root with every path of its own (see ../shared/FIELD-NOTES.md), the management plugin on
(peers' logins are made through it), and optionally a TLS listener with certificates made by openssl.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from harness.waiting import free_port, reachable


def available() -> bool:
    """True when this machine can start a private node (RabbitMQ installed, running as root)."""
    return shutil.which("rabbitmq-server") is not None and os.geteuid() == 0


@dataclass
class Certificates:
    """A CA and a server certificate for localhost/127.0.0.1 signed by it, made with openssl."""

    ca: Path
    cert: Path
    key: Path

    @classmethod
    def make(cls, directory: Path) -> Certificates:
        directory.mkdir(parents=True, exist_ok=True)
        ca_key, ca, key, csr, cert = (directory / n for n in ("ca.key", "ca.pem", "server.key", "server.csr",
                                                             "server.pem"))
        extensions = directory / "san.cnf"
        extensions.write_text("subjectAltName=DNS:localhost,IP:127.0.0.1\n")

        def run(*args: str) -> None:
            subprocess.run(["openssl", *args], check=True, capture_output=True, timeout=60)

        run("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(ca_key), "-out", str(ca), "-days", "2",
            "-subj", "/CN=peertrain test CA")
        run("req", "-newkey", "rsa:2048", "-nodes", "-keyout", str(key), "-out", str(csr), "-subj", "/CN=localhost")
        run("x509", "-req", "-in", str(csr), "-CA", str(ca), "-CAkey", str(ca_key), "-CAcreateserial", "-out",
            str(cert), "-days", "2", "-extfile", str(extensions))
        for path in (key, cert, ca):
            path.chmod(0o644)
        return cls(ca, cert, key)


class RabbitNode:
    """`rabbitmq-server -detached` on ports of its own; stop() and start() again keep its data."""

    def __init__(self, tls: Certificates | None = None) -> None:
        # The node runs as user rabbitmq, which cannot enter pytest's private temporary directories.
        directory = self.dir = Path(tempfile.mkdtemp(prefix="peertrain-rabbit-"))
        if tls is not None:
            copies = directory / "certs"
            copies.mkdir()
            tls = Certificates(*(Path(shutil.copy(p, copies)) for p in (tls.ca, tls.cert, tls.key)))
        self.tls = tls
        self.name = f"t{os.getpid()}{free_port()}@localhost"
        self.port, self.admin_port, self.dist_port = free_port(), free_port(), free_port()
        directory.mkdir(parents=True, exist_ok=True)
        directory.chmod(0o755)
        for sub in ("mnesia", "log"):
            (directory / sub).mkdir(exist_ok=True)
        (directory / "enabled_plugins").write_text("[rabbitmq_management].\n")
        listener = f"listeners.tcp.local = 127.0.0.1:{self.port}\n"
        if tls:  # TLS only: nothing can reach this node in clear
            listener = (f"listeners.tcp = none\nlisteners.ssl.default = 127.0.0.1:{self.port}\n"
                        f"ssl_options.cacertfile = {tls.ca}\nssl_options.certfile = {tls.cert}\n"
                        f"ssl_options.keyfile = {tls.key}\nssl_options.verify = verify_none\n"
                        "ssl_options.fail_if_no_peer_cert = false\n")
        (directory / "rabbitmq.conf").write_text(
            f"{listener}loopback_users = none\nmanagement.tcp.port = {self.admin_port}\n"
            "management.tcp.ip = 127.0.0.1\n")
        (directory / "env.conf").write_text(
            f"NODENAME={self.name}\nERL_EPMD_ADDRESS=127.0.0.1\n"
            'export ERL_FLAGS="-kernel inet_dist_use_interface {127,0,0,1}"\n')
        subprocess.run(["chown", "-R", "rabbitmq:", str(directory)], check=True)
        self.env = {**os.environ, "RABBITMQ_CONF_ENV_FILE": str(directory / "env.conf"), "RABBITMQ_NODENAME": self.name,
                    "RABBITMQ_NODE_PORT": str(self.port), "RABBITMQ_DIST_PORT": str(self.dist_port),
                    "RABBITMQ_MNESIA_BASE": str(directory / "mnesia"), "RABBITMQ_LOG_BASE": str(directory / "log"),
                    "RABBITMQ_CONFIG_FILE": str(directory / "rabbitmq"),
                    "RABBITMQ_ENABLED_PLUGINS_FILE": str(directory / "enabled_plugins"),
                    "RABBITMQ_PID_FILE": str(directory / "node.pid")}

    @property
    def url(self) -> str:
        scheme = "amqps" if self.tls else "amqp"
        return f"{scheme}://guest:guest@localhost:{self.port}//"

    @property
    def admin_url(self) -> str:
        return f"http://guest:guest@127.0.0.1:{self.admin_port}"

    def start(self, timeout: float = 90.0) -> None:
        subprocess.run(["rabbitmq-server", "-detached"], env=self.env, check=True, capture_output=True, timeout=60)
        deadline = time.monotonic() + timeout
        while not (reachable("127.0.0.1", self.port) and reachable("127.0.0.1", self.admin_port)):
            if time.monotonic() > deadline:
                raise AssertionError(f"RabbitMQ node {self.name} did not come up: {self.log()[-2000:]}")
            time.sleep(0.2)

    def stop(self) -> None:
        subprocess.run(["rabbitmqctl", "-n", self.name, "stop"], env=self.env, capture_output=True, timeout=60)
        deadline = time.monotonic() + 30
        while reachable("127.0.0.1", self.port) and time.monotonic() < deadline:
            time.sleep(0.1)

    def remove(self) -> None:
        """Stop the node and delete its files."""
        self.stop()
        shutil.rmtree(self.dir, ignore_errors=True)

    def ctl(self, *args: str) -> str:
        return subprocess.run(["rabbitmqctl", "-n", self.name, *args], env=self.env, capture_output=True, text=True,
                              timeout=60).stdout

    def log(self) -> str:
        return "\n".join(p.read_text(errors="replace") for p in (self.dir / "log").glob("*.log"))
