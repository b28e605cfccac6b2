"""The platform as the tests and benches run it: `embedded.Platform` in this process, its API over real HTTP.

`Served` starts the one in-process assembly of the platform (embedded.py: the monitor, the coordinator and,
on the in-memory broker, in-process peers), serves its API on a port of its own (grants on local storage
name it), and starts peers as their owners would: registered like an operator registers them, each a
`celery worker` process with its own broker login and nothing else. `stop()` undoes all of it.
"""

from __future__ import annotations

import dataclasses
import logging
import threading
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

from werkzeug.serving import make_server

import embedded
from harness.http import Api
from harness.processes import PeerProcess, peer_environment
from harness.waiting import free_port, wait_until
from models import Peer
from models.peer import ONLINE
from settings import Settings
from tasks import protocol, registry
from tasks.brokeradmin import BrokerAdmin

log = logging.getLogger(__name__)


class Served:
    """The platform in this process, its API served on `http://127.0.0.1:<port>`, peers as processes."""

    def __init__(self, settings: Settings, log_dir: Path, peers: list[str] | None = None, **options: Any) -> None:
        port = free_port()
        # Peers reach local storage through this API (its address is in their grants), unless PUBLIC_URL names
        # another process that serves them.
        self.settings = dataclasses.replace(settings, host="127.0.0.1", port=port)
        self.log_dir = log_dir
        self.base_url = f"http://127.0.0.1:{port}"
        self.platform = embedded.Platform(self.settings, peers=peers or [], keep_data=False, **options)
        self.peers: dict[str, PeerProcess] = {}
        self.environments: dict[str, dict[str, str]] = {}
        self.logins: list[str] = []
        self._server = None

    def start(self) -> Served:
        api = self.platform.start()
        self.api_app = api
        self._server = make_server("127.0.0.1", self.settings.port, api, threaded=True)
        threading.Thread(target=self._server.serve_forever, name="api", daemon=True).start()
        return self

    @property
    def storage_url(self) -> str:
        return self.settings.storage_url

    @property
    def s3_endpoint(self) -> str:
        return self.settings.s3_endpoint_url

    @property
    def celery(self) -> Any:
        return self.platform.celery

    @property
    def monitor(self) -> Any:
        """The platform's monitor: what it stored and dropped."""
        return self.platform.monitor

    def user(self, name: str | None = None) -> Api:
        return Api(self.base_url).sign_up_and_in(name or f"user{uuid.uuid4().hex[:8]}")

    def register(self, name: str) -> dict[str, str]:
        """Register peer `name` as an operator does; returns what its machine is given."""
        enrolment = registry.add(name, self.settings)
        self.logins.append(protocol.broker_user(name, self.settings.broker_scope))
        return enrolment.environment

    def start_peers(self, *names: str, app: str = "tasks.peer", timeout: float = 60, **env: str) -> list[str]:
        """Register and start peer processes (of Celery app `app`); wait until the monitor sees them ONLINE."""
        for name in names:
            environment = peer_environment(**self.register(name), PEER_THREADS="1", **env)
            self.environments[name] = environment
            self.peers[name] = PeerProcess(name, self.log_dir, environment, app=app)
        try:
            wait_until(lambda: Peer.objects(name__in=names, status=ONLINE).count() == len(names), timeout,
                       f"peers {names} to come ONLINE")
        except AssertionError:
            for name in names:
                print(self.peers[name].log()[-3000:])
            raise
        return list(names)

    def start_peer_here(self, name: str, around: Callable[[Callable[..., Any]], Callable[..., Any]]) -> None:
        """Register peer `name` and run it on this process's workers (the in-memory broker's), its real `train`
        task replaced by `around(the real one)`: a peer that lies or lags in a way a bench chooses."""
        from tasks import peer as peer_app  # torch loads with the peer's task

        enrolment = self.register(name)
        app = peer_app.create_app(enrolment["BROKER_URL"], self.settings, enrolment["EVENT_EXCHANGE"])
        task = app.tasks["peertrain.train"]
        task.run = around(task.run)
        self.platform.workers.start(app, protocol.task_queue(name), protocol.worker_name(name, "here"))

    def stop_peer(self, name: str) -> None:
        self.peers.pop(name).stop()

    def kill_peer(self, name: str) -> None:
        self.peers.pop(name).kill()

    def stop(self) -> None:
        """Stop the peers, the API and the platform; revoke the logins this run issued."""
        for name in list(self.peers):
            self.stop_peer(name)
        if self._server is not None:
            self._server.shutdown()
        self.platform.stop(reason="the test platform stopped")
        if self.logins and not self.settings.embedded_broker:
            admin = BrokerAdmin.from_settings(self.settings)
            for user in self.logins:
                admin.remove_user(user)
