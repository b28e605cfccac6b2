"""`python -m tasks.registry`: registering a peer issues its own broker login; removing it revokes it."""

from __future__ import annotations

import stat

import pytest
from kombu import Connection

from models import Peer
from settings import Settings
from tasks import protocol, registry
from tests import conftest, services


def test_add_writes_the_peers_login_and_remove_revokes_it(db, tmp_path, capsys):
    services.require(bool(conftest.VHOST), "RabbitMQ with its management plugin")
    name = f"reg{conftest.RUN_ID}"
    env_file = tmp_path / "peer.env"
    assert registry.main(["add", name, "--env-file", str(env_file)]) == 0
    user = protocol.broker_user(name, Settings.from_env().broker_scope)
    conftest.PEER_USERS.append(user)
    assert stat.S_IMODE(env_file.stat().st_mode) == 0o600
    environment = dict(line.split("=", 1) for line in env_file.read_text().splitlines())
    assert set(environment) == {"BROKER_URL", "EVENT_EXCHANGE", "RESULTS_QUEUE", "TRAIN_TIME_LIMIT"}
    assert f"celery -A tasks.peer worker -Q peer.{name}" in capsys.readouterr().out
    with Connection(environment["BROKER_URL"], connect_timeout=5) as login:
        login.ensure_connection(max_retries=1)
        assert login.userid == user
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


def test_no_name_the_platform_declares_binds_or_publishes_to_is_one_a_peer_may_configure(settings):
    """Every exchange and queue of the platform's, as its own code names them, against what peer `alice`'s login
    may do: configure none, write only the two exchanges it reports on (its own event exchange, not the
    platform's), read only its own two queues."""
    import re

    from tasks import feed
    from tasks.celery import create_app

    app = create_app(settings)
    platforms = {settings.coordinator_queue: "", settings.monitor_queue: "", feed.exchange(app).name: "",
                 protocol.TASKS_EXCHANGE: "", protocol.STOPS_EXCHANGE: "", settings.event_exchange: "",
                 settings.results_queue: "w", app.conf.task_default_exchange or "celery": "",
                 "celery.pidbox": "", "reply.celery.pidbox": "", "amq.default": ""}  # RabbitMQ checks "" so
    for peer in ("alice", "bob", "alicex"):
        queues = protocol.declarations(peer, settings.event_exchange, settings.monitor_queue)
        for queue in queues[:2]:
            platforms[queue.name] = "r" if peer == "alice" else ""
            platforms[queue.exchange.name] = ""
        events = queues[2]  # the monitor's queue of its events: only its exchange is the peer's to publish to
        platforms[events.name] = ""
        platforms[protocol.event_exchange(settings.event_exchange, peer)] = "w" if peer == "alice" else ""
    rules = protocol.permissions("alice", settings.event_exchange, settings.results_queue)
    for resource, allowed in platforms.items():
        got = "".join(k[0] for k in ("configure", "write", "read") if re.search(rules[k], resource))
        assert got == allowed, (resource, got)


def test_two_deployments_on_one_broker_register_the_same_peer_name_apart(db):
    """Staging and production on two virtual hosts of one RabbitMQ: a peer `gpu1` in each gets a login of its
    own (RabbitMQ's users are the node's); registering it in one leaves the other's working."""
    from dataclasses import replace

    from tasks.brokeradmin import BrokerAdmin

    services.require(bool(conftest.VHOST), "RabbitMQ with its management plugin")
    settings = Settings.from_env()
    other_vhost = f"{conftest.VHOST}-other"
    BrokerAdmin(services.RABBITMQ_ADMIN_URL, "/").add_vhost(other_vhost, "guest")
    other = replace(settings, broker_url=settings.broker_url.rsplit("/", 1)[0] + f"/{other_vhost}")
    name = f"twice{conftest.RUN_ID}"
    try:
        here = registry.issue_login(name, settings).environment["BROKER_URL"]
        there = registry.issue_login(name, other).environment["BROKER_URL"]
        conftest.PEER_USERS.extend(protocol.broker_user(name, s.broker_scope) for s in (settings, other))
        logins = [Connection(url, connect_timeout=5) for url in (here, there)]
        for login in logins:  # the second registration did not replace the first's password
            with login:
                login.ensure_connection(max_retries=1)
        assert logins[0].userid != logins[1].userid
        assert {protocol.peer_of(login.userid) for login in logins} == {name}
        # Each login is good on its own deployment's virtual host only.
        crossed = Connection(here.rsplit("/", 1)[0] + f"/{other_vhost}", connect_timeout=5)
        with pytest.raises(Exception, match="(?i)access|refused|vhost|permission"), crossed:
            crossed.ensure_connection(max_retries=1)
    finally:
        BrokerAdmin(services.RABBITMQ_ADMIN_URL, "/").remove_vhost(other_vhost)
