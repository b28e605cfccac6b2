"""`python -m tasks.registry`: registering a peer issues its own broker login; removing it revokes it."""

from __future__ import annotations

import stat

import pytest
from kombu import Connection

from models import Peer
from tasks import protocol, registry
from tests import conftest, services


def test_add_writes_the_peers_login_and_remove_revokes_it(db, tmp_path, capsys):
    services.require(bool(conftest.VHOST), "RabbitMQ with its management plugin")
    name = f"reg{conftest.RUN_ID}"
    env_file = tmp_path / "peer.env"
    assert registry.main(["add", name, "--env-file", str(env_file)]) == 0
    conftest.PEER_USERS.append(protocol.broker_user(name))
    assert stat.S_IMODE(env_file.stat().st_mode) == 0o600
    environment = dict(line.split("=", 1) for line in env_file.read_text().splitlines())
    assert set(environment) == {"BROKER_URL", "EVENT_EXCHANGE", "RESULTS_QUEUE", "TRAIN_TIME_LIMIT"}
    assert f"celery -A tasks.peer worker -Q peer.{name}" in capsys.readouterr().out
    with Connection(environment["BROKER_URL"], connect_timeout=5) as login:
        login.ensure_connection(max_retries=1)
        assert login.userid == f"peer.{name}"
    assert Peer.objects.get(name=name).status == "OFFLINE"

    assert registry.main(["add", name]) == 2
    assert "registered already" in capsys.readouterr().err
    assert registry.main(["list"]) == 0 and name in capsys.readouterr().out

    assert registry.main(["remove", name]) == 0
    assert Peer.objects(name=name).count() == 0
    with pytest.raises(Exception, match="ACCESS_REFUSED|refused"):
        with Connection(environment["BROKER_URL"], connect_timeout=5) as login:
            login.ensure_connection(max_retries=1)
    assert registry.main(["remove", name]) == 1


@pytest.mark.parametrize("name", ["", "a.b", "a b", "_a", "x" * 64, "peer/x"])
def test_names_that_cannot_name_queues_and_logins_are_refused(db, capsys, name):
    assert registry.main(["add", name]) == 2
    assert "a peer name is" in capsys.readouterr().err
    assert Peer.objects.count() == 0


def test_permissions_cover_only_the_peers_own_resources():
    rules = protocol.permissions("alice", "celeryev", "peertrain.results")
    import re

    for resource, allowed in (("peer.alice", "cwr"), ("peer.alice.stop", "cwr"), ("peer.alicex", ""),
                              ("peer.bob", ""), ("coordinator", ""), ("celeryev", "w"),
                              ("peertrain.results", "w"), ("celery.pidbox", ""), ("amq.default", "")):
        got = "".join(k[0] for k in ("configure", "write", "read") if re.match(rules[k], resource))
        assert got == allowed, (resource, got)
