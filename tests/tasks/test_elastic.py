"""Elastic sessions: a peer that comes online while a session runs is given work when the session allows it.

The monitor's recruiting step (`lifecycle.recruit`) claims free peers for running elastic sessions, within
each session's pool; the coordinator's `recruit` task hands them to the session's strategy."""

from __future__ import annotations

from collections import Counter

from bson import ObjectId

from models import Peer, TrainingSession
from models import peer as peers
from models import session as sessions
from models import trial as trials
from models import update as updates
from tasks import lifecycle, protocol
from tests.tasks.test_coordinator import ASYNC, FEDERATED, run_session
from tests.tasks.test_search import search


def elastic(kit, session, max_peers: int = 3, pool: str = "public") -> TrainingSession:
    TrainingSession.objects(id=session.id).update_one(set__elastic=True, set__max_peers=max_peers, set__pool=pool)
    return kit.reload(session)


def comes_online(name: str, owner: ObjectId | None = None) -> None:
    if Peer.objects(name=name).first() is None:
        peers.register(name)
    if owner is not None:
        Peer.objects(name=name).update_one(set__owner_id=owner)
    peers.seen(name, f"peer.{name}@host")


def tasks_of(kit, name: str) -> list[dict]:
    return kit.take(protocol.task_queue(name))


def test_an_asynchronous_session_hands_a_peer_that_comes_online_its_next_task_at_once(kit):
    session = elastic(kit, kit.session(**{**ASYNC, "max_updates": 8}))
    run_session(kit, session)
    session_rows_before = kit.reload(session).plan.shard_rows.values()
    newcomer = kit.peer(2)
    comes_online(newcomer)
    assert lifecycle.recruit(kit.app) == {str(session.id): [newcomer]}
    assert Peer.objects.get(name=newcomer).status == peers.TRAINING
    kit.coordinate()
    sent = tasks_of(kit, newcomer)
    assert len(sent) == 1 and sent[0]["task"] == "peertrain.train"
    grown = kit.reload(session)
    assert [run.name for run in grown.peers][-1] == newcomer and grown.min_peers == 2
    # The training rows split again among the three: every row in exactly one shard, none of the held-out ones.
    plan = grown.plan
    assert {name: plan.shards[name].split("/shards/")[1].split("/")[0] for name in plan.shards} == \
        {run.name: "n3" for run in grown.peers}
    assert sum(plan.shard_rows[run.name] for run in grown.peers) == sum(session_rows_before)
    assert "/shards/n3/" in protocol.train_spec(sent[0]["args"][0])["data_id"]
    # Recruiting again finds it already there: nothing is claimed twice; the coordinator's task run twice adds
    # the peer once and sends it no second task.
    assert lifecycle.recruit(kit.app) == {}
    kit.app.tasks["peertrain.recruit"](str(session.id), [newcomer])
    assert tasks_of(kit, newcomer) == []
    assert [run.name for run in kit.reload(session).peers].count(newcomer) == 1

    kit.answer(sent[0], newcomer)
    done = kit.run_to_end(kit.reload(session))
    assert done.status == sessions.COMPLETED, done.reason
    per_peer = Counter(u.peer for u in updates.for_session(session.id) if u.status == updates.FOLDED)
    assert per_peer[newcomer] >= 1 and sum(per_peer.values()) == 8
    assert Peer.objects.get(name=newcomer).status == peers.ONLINE  # freed with the others


def test_a_synchronous_elastic_session_adds_a_newcomer_at_the_next_round_up_to_max_peers(kit):
    session = elastic(kit, kit.session(**FEDERATED), max_peers=3)
    run_session(kit, session)
    first, second = kit.peer(2), kit.peer(3)
    comes_online(first)
    comes_online(second)
    handed = lifecycle.recruit(kit.app)  # either may be taken: the most reputable first, equals at random
    assert list(handed) == [str(session.id)] and len(handed[str(session.id)]) == 1
    joined = handed[str(session.id)][0]
    left = second if joined == first else first
    kit.coordinate()
    assert [run.name for run in kit.reload(session).peers][2:] == [joined]
    assert Peer.objects.get(name=left).status == peers.ONLINE  # max_peers 3: no room for the other
    assert tasks_of(kit, joined) == []  # round 0 was out before it came
    assert kit.answer_all(session) == 2
    kit.coordinate()
    grown = kit.reload(session)
    assert grown.launch.round == 1 and joined in grown.launch.peers
    sent = tasks_of(kit, joined)
    assert len(sent) == 1 and "/shards/n3/" in protocol.train_spec(sent[0]["args"][0])["data_id"]
    kit.answer(sent[0], joined)
    done = kit.run_to_end(grown)
    assert done.status == sessions.COMPLETED, done.reason
    assert [sorted(r.peers) for r in done.rounds] == [sorted(run.name for run in session.peers)] + \
        [sorted([*(run.name for run in session.peers), joined])] * 2


def test_a_synchronous_session_without_elastic_and_a_plain_sweep_take_no_one(kit):
    sync = kit.session(**FEDERATED)
    run_session(kit, sync)
    comes_online(kit.peer(5))
    assert lifecycle.recruit(kit.app) == {}
    # Claimed for it all the same (an operator's mistake, a race with a setting changed): it is let go.
    Peer.objects(name=kit.peer(5)).update_one(set__status=peers.TRAINING, set__session_id=sync.id)
    kit.app.tasks["peertrain.recruit"](str(sync.id), [kit.peer(5)])
    assert Peer.objects.get(name=kit.peer(5)).status == peers.ONLINE
    assert len(kit.reload(sync).peers) == 2


def test_a_search_hands_a_newcomer_the_next_trial(kit):
    session = elastic(kit, search(kit, peers_=1))
    run_session(kit, session)
    newcomer = kit.peer(7)
    comes_online(newcomer)
    assert lifecycle.recruit(kit.app) == {str(session.id): [newcomer]}
    kit.coordinate()
    assert trials.open_of(session.id, newcomer) is not None
    done = kit.run_to_end(kit.reload(session))
    assert done.status == sessions.COMPLETED, done.reason
    assert newcomer in {t["peer"] for t in trials.of_session(session.id)}


def test_a_session_takes_newcomers_only_from_its_pool(kit):
    owner, stranger = ObjectId(), ObjectId()
    session = kit.session(**ASYNC)
    TrainingSession.objects(id=session.id).update_one(set__owner_id=owner)
    session = elastic(kit, session, pool="mine")
    run_session(kit, session)
    comes_online(kit.peer(8))  # the platform's
    comes_online(kit.peer(9), owner=stranger)  # someone else's, not shared
    assert lifecycle.recruit(kit.app) == {}
    comes_online(kit.peer(10), owner=owner)
    assert lifecycle.recruit(kit.app) == {str(session.id): [kit.peer(10)]}


def test_a_peer_claimed_for_a_session_that_ended_meanwhile_is_let_go(kit):
    session = elastic(kit, kit.session(**ASYNC))
    run_session(kit, session)
    comes_online(kit.peer(4))
    assert lifecycle.recruit(kit.app)
    lifecycle.end(kit.app, session.id, sessions.CANCELLED, "cancelled by the user")
    kit.coordinate()
    assert Peer.objects.get(name=kit.peer(4)).status == peers.ONLINE
    assert kit.peer(4) not in {run.name for run in kit.reload(session).peers}


def test_a_peer_claimed_while_the_broker_is_away_is_freed_again(kit, monkeypatch):
    import pytest
    from kombu.exceptions import OperationalError

    session = elastic(kit, kit.session(**ASYNC))
    run_session(kit, session)
    comes_online(kit.peer(6))

    def away(*args, **kwargs):
        raise OperationalError("the broker is away")

    monkeypatch.setattr(kit.app, "send_task", away)
    with pytest.raises(OperationalError):
        lifecycle.recruit(kit.app)
    assert Peer.objects.get(name=kit.peer(6)).status == peers.ONLINE
    monkeypatch.undo()
    assert lifecycle.recruit(kit.app) == {str(session.id): [kit.peer(6)]}  # the next look takes it


def test_a_peer_claimed_by_a_look_that_died_before_telling_the_coordinator_is_told_of_at_the_next(kit):
    session = elastic(kit, kit.session(**ASYNC))
    run_session(kit, session)
    stray = kit.peer(11)
    comes_online(stray)
    # What a monitor killed between its claim and its message leaves: the peer TRAINING for a session that
    # does not know it.
    Peer.objects(name=stray).update_one(set__status=peers.TRAINING, set__session_id=session.id)
    assert lifecycle.recruit(kit.app) == {str(session.id): [stray]}
    kit.coordinate()
    assert stray in {run.name for run in kit.reload(session).peers}
    assert len(tasks_of(kit, stray)) == 1
    assert lifecycle.recruit(kit.app) == {}  # known now: nothing more to tell
