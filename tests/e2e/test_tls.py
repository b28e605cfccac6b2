"""Encrypted transport: `make run` over `amqps://` to RabbitMQ and `rediss://` to Redis, certificates made here."""

from __future__ import annotations

import json
import os
import shutil
import subprocess

import pytest

from harness import rabbitnode
from harness.http import Api
from harness.processes import make_target
from harness.waiting import wait_until
from settings import ROOT
from tests import services

pytestmark = pytest.mark.e2e


@pytest.fixture
def certificates(tmp_path) -> rabbitnode.Certificates:
    services.require(shutil.which("openssl") is not None, "openssl")
    return rabbitnode.Certificates.make(tmp_path / "certs")


@pytest.fixture
def tls_rabbit(tmp_path, certificates):
    services.require(rabbitnode.available(), "a private RabbitMQ node (rabbitmq-server, as root)")
    node = rabbitnode.RabbitNode(tls=certificates)
    try:
        node.start()
        yield node
    finally:
        node.remove()


@pytest.fixture
def tls_redis(tmp_path, certificates):
    services.require(shutil.which("redis-server") is not None, "redis-server")
    port = rabbitnode.free_port()
    process = subprocess.Popen(
        ["redis-server", "--port", "0", "--tls-port", str(port), "--bind", "127.0.0.1", "--tls-cert-file",
         str(certificates.cert), "--tls-key-file", str(certificates.key), "--tls-auth-clients", "no", "--save", "",
         "--appendonly", "no", "--dir", str(tmp_path)], stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
    wait_until(lambda: services.reachable("127.0.0.1", port), 20, "Redis to listen for TLS")
    yield f"rediss://localhost:{port}/0"
    process.terminate()
    process.wait(10)


def test_a_session_runs_with_every_link_to_the_broker_and_redis_encrypted(tmp_path, tls_rabbit, tls_redis,
                                                                          certificates):
    # The node listens for TLS only: anything that got through spoke TLS, its certificate checked
    # against the CA made above (the peers' included: they are given BROKER_CA_FILE when registered).
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("BROKER_", "RESULT_", "MONGODB_", "STORAGE_", "S3_", "JWT_", "PEERTRAIN_"))}
    env.update(BROKER_URL=tls_rabbit.url, BROKER_ADMIN_URL=tls_rabbit.admin_url, BROKER_CA_FILE=str(certificates.ca),
               RESULT_BACKEND=tls_redis, STORAGE_URL=str(tmp_path / "storage"), LOCAL_PEERS="2")
    with make_target("run", env, tmp_path / "make-run.log") as base:
        user = Api(base).sign_up_and_in("tess")
        wait_until(lambda: user.get("/peers").json()["online"] == 2, 60, "the two TLS peers to come ONLINE")
        hp = json.dumps({"learning_rate": 0.01, "epochs": 5})
        response = user.start(ROOT / "samples" / "wine.csv", num_peers=2, hyperparameters=hp)
        assert response.status_code == 202, response.text
        session = user.wait_finished(response.json()["session_id"], timeout=90)
        assert session["status"] == "COMPLETED", session
        assert len(user.heartbeats(session["id"])) == 10
        connections = tls_rabbit.ctl("list_connections", "user", "ssl", "--quiet")
        rows = [line.split() for line in connections.splitlines()[1:] if line.strip()]  # after the header
        assert {row[0] for row in rows} >= {"guest", "peer.local1", "peer.local2"}
        assert all(row[1] == "true" for row in rows), rows
