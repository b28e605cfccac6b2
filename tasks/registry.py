"""Registering and removing peers: `python -m tasks.registry add|remove|restore|list`.

    python -m tasks.registry add gpu1 [--env-file gpu1.env]   # prints (or writes) all the peer machine needs
    python -m tasks.registry remove gpu1                      # revokes its login at once
    python -m tasks.registry restore gpu1                     # a quarantined peer takes work again
    python -m tasks.registry list

A peer machine gets exactly its own broker login (a user with rights on its own queues and the two
exchanges it reports on) and the names of those exchanges: no database, storage or result-backend
credentials. Its tasks then carry grants to the objects each one needs.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys

from mongoengine import NotUniqueError

import models
from models import peer as peers
from models import session as sessions
from settings import Settings
from tasks import lifecycle, protocol
from tasks.celery import create_app
from tasks.enrolment import Enrolment, issue_login, revoke

__all__ = ["Enrolment", "add", "issue_login", "main", "remove"]

log = logging.getLogger(__name__)


def add(name: str, settings: Settings) -> Enrolment:
    """Register peer `name` and issue its broker login; ValueError if the name is bad or taken."""
    protocol.check_name(name)
    try:
        peers.register(name)
    except NotUniqueError:
        raise ValueError(f"a peer named {name!r} is registered already; remove it first") from None
    try:
        enrolment = issue_login(name, settings)
    except Exception:
        peers.unregister(name)
        raise
    log.info("peer %s registered", name)
    return enrolment


def remove(name: str, settings: Settings) -> bool:
    """Revoke peer `name`: its login and connections go, and a session it was training fails; False if unknown."""
    before = peers.unregister(name)
    revoke(name, settings)
    app = create_app(settings)
    if before is None:
        return False
    if before.status == peers.TRAINING and before.session_id is not None:
        lifecycle.end(app, before.session_id, sessions.FAILED, f"peer {name} was removed from the platform")
    log.info("peer %s removed", name)
    return True


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tasks.registry", description="Register and remove peers.")
    commands = parser.add_subparsers(dest="command", required=True)
    adding = commands.add_parser("add", help="register a peer and print what its machine needs")
    adding.add_argument("name")
    adding.add_argument("--env-file", help="write the peer's environment to this file (mode 0600) instead")
    adding.add_argument("--rotate", action="store_true",
                        help="if the peer is registered already, issue it a new login (the old one stops working)")
    commands.add_parser("remove", help="revoke a peer's login and forget it").add_argument("name")
    commands.add_parser("list", help="the registered peers, their status and record")
    commands.add_parser("restore", help="let a quarantined peer take work again").add_argument("name")
    args = parser.parse_args(argv)
    settings = Settings.from_env()
    logging.basicConfig(level=settings.log_level, format="%(levelname)s %(name)s: %(message)s")
    models.ensure_connected(settings.mongodb_uri)
    try:
        if args.command == "add":
            known = args.rotate and peers.Peer.objects(name=args.name).first() is not None
            enrolment = issue_login(args.name, settings) if known else add(args.name, settings)
            if args.env_file:
                fd = os.open(args.env_file, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
                with os.fdopen(fd, "w") as out:
                    out.write(enrolment.env_file())
                print(f"peer {args.name} registered; its environment is in {args.env_file}. On the peer machine:")
            else:
                print(f"peer {args.name} registered. Give its machine exactly this environment:\n")
                print(enrolment.env_file())
                print("and run there:")
            print(f"  {enrolment.command}")
        elif args.command == "remove":
            if not remove(args.name, settings):
                print(f"no peer named {args.name!r} was registered", file=sys.stderr)
                return 1
            print(f"peer {args.name} removed; its login no longer works")
        elif args.command == "restore":
            if not peers.restore(args.name):
                print(f"no quarantined peer named {args.name!r}", file=sys.stderr)
                return 1
            print(f"peer {args.name} restored: it takes work again once it is seen")
        else:
            for peer in peers.Peer.objects.order_by("name"):
                record = " ".join(f"{name} {getattr(peer, name)}" for name in peers.COUNTERS)
                print(f"{peer.name}\t{peer.status}\t{peer.last_seen or '-'}\treputation {peer.reputation:.2f}"
                      f"\t{record}")
    except ValueError as exc:
        print(exc, file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
