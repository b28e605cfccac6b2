"""Peer liveness and the atomic claim."""

from __future__ import annotations

import threading
from datetime import timedelta

import pytest
from bson import ObjectId
from mongoengine import NotUniqueError

from models import Peer, utcnow
from models import peer as peers
from models.peer import OFFLINE, ONLINE, TRAINING


def online(*names: str, at=None) -> None:
    for name in names:
        peers.register(name)
        peers.seen(name, f"peer.{name}@h", at=at)


def test_a_registered_peer_is_offline_until_seen_then_online(db):
    peers.register("a")
    assert Peer.objects.get(name="a").status == OFFLINE
    assert peers.seen("a", "peer.a@host1")
    peer = Peer.objects.get(name="a")
    assert peer.status == ONLINE and peer.hostname == "peer.a@host1"
    assert peer.last_seen is not None


def test_an_unregistered_peer_is_never_recorded(db):
    assert not peers.seen("stranger", "peer.stranger@h")
    assert Peer.objects(name="stranger").count() == 0


def test_a_name_registers_once_and_unregistering_forgets_it(db):
    peers.register("a")
    with pytest.raises(NotUniqueError):
        peers.register("a")
    assert peers.unregister("a").name == "a"
    assert peers.unregister("a") is None
    assert not peers.seen("a", "peer.a@h")


def test_seen_keeps_a_training_peer_training(db):
    online("a")
    session = ObjectId()
    assert peers.claim(session, 1) == ["a"]
    peers.seen("a", "peer.a@h")
    assert Peer.objects.get(name="a").status == TRAINING


def test_gone_then_seen_comes_back_online(db):
    online("a")
    before = peers.gone("a")
    assert before.status == ONLINE
    assert Peer.objects.get(name="a").status == OFFLINE
    assert peers.gone("a") is None
    peers.seen("a", "peer.a@h")
    assert Peer.objects.get(name="a").status == ONLINE


def test_silent_peers_are_found_by_their_last_beat(db):
    online("fresh")
    online("old", at=utcnow() - timedelta(minutes=1))
    assert peers.silent_since(utcnow() - timedelta(seconds=10)) == ["old"]


def test_claim_is_all_or_nothing(db):
    online(*"abc")
    assert peers.claim(ObjectId(), 4) == []
    assert Peer.objects(status=ONLINE).count() == 3
    got = peers.claim(ObjectId(), 2)
    assert len(got) == 2 and Peer.objects(status=TRAINING).count() == 2


def test_release_frees_only_that_sessions_peers_and_leaves_offline_ones_offline(db):
    online(*"abcd")
    first, second = ObjectId(), ObjectId()
    mine = peers.claim(first, 2)
    theirs = peers.claim(second, 2)
    peers.gone(mine[0])
    assert peers.release(first) == 1
    assert Peer.objects.get(name=mine[0]).status == OFFLINE
    assert Peer.objects.get(name=mine[0]).session_id is None
    assert Peer.objects.get(name=mine[1]).status == ONLINE
    assert {p.name for p in Peer.objects(status=TRAINING)} == set(theirs)


def test_racing_claims_never_share_a_peer(db):
    online(*(f"p{i}" for i in range(10)))
    results: dict[int, list[str]] = {}
    barrier = threading.Barrier(12)

    def claim(i: int) -> None:
        barrier.wait()
        results[i] = peers.claim(ObjectId(), 3)

    threads = [threading.Thread(target=claim, args=(i,)) for i in range(12)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    taken = [name for names in results.values() for name in names]
    assert len(taken) == len(set(taken))
    assert Peer.objects(status=TRAINING).count() == len(taken)
    assert 1 <= len([n for n in results.values() if n]) <= 3
    assert all(len(n) in (0, 3) for n in results.values())


def test_peers_held_for_sessions_that_ended_are_given_back(db):
    online(*"abc")
    running, ended = ObjectId(), ObjectId()
    assert peers.claim(running, 1) and peers.claim(ended, 1)
    assert peers.release_orphans([running]) == 1
    assert Peer.objects(status=TRAINING).get().session_id == running
    assert Peer.objects(status=ONLINE).count() == 2


def test_updates_used_are_counted_on_each_peer_as_often_as_it_had_one(db):
    online("a", "b", "c")
    peers.count_accepted(["a", "b", "a", "c", "a"])
    peers.count_accepted(["b"])
    assert {p.name: p.accepted for p in Peer.objects(name__in=["a", "b", "c"])} == {"a": 3, "b": 2, "c": 1}
