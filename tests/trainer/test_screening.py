"""Screening: one hostile update of five is bounded or refused, and every honest one counts."""

from __future__ import annotations

import math

import pytest
import torch

from trainer.screening import screen

TARGET = {"w": torch.full((50,), 1.0), "b": torch.full((5,), -1.0)}


def loss(state) -> float:
    return float(sum(torch.sum((state[k] - TARGET[k]) ** 2) for k in TARGET))


def honest(base, seed: int, step: float = 0.2):
    """A step towards the target with some noise, as local training moves the model."""
    g = torch.Generator().manual_seed(seed)
    return {k: v + step * (TARGET[k] - v) + 0.02 * torch.randn(v.shape, generator=g) for k, v in base.items()}


def attack(base, kind: str):
    good = honest(base, 99)
    if kind == "x100":
        return {k: base[k] + 100 * (good[k] - base[k]) for k in base}
    if kind == "flip":
        return {k: base[k] - (good[k] - base[k]) for k in base}
    if kind == "random":
        g = torch.Generator().manual_seed(7)
        return {k: 5 * torch.randn(v.shape, generator=g) for k, v in base.items()}
    if kind == "zero":
        return {k: torch.zeros_like(v) for k, v in base.items()}
    if kind == "nan":
        return {k: torch.full_like(v, float("nan")) for k, v in base.items()}
    raise ValueError(kind)


BASE = {"w": torch.full((50,), 0.3), "b": torch.full((5,), -0.3)}  # part of the way to the target


@pytest.mark.parametrize("kind", ["x100", "flip", "random", "zero", "nan"])
def test_one_hostile_update_of_five_is_bounded_or_refused_and_named(kind):
    states = {f"h{i}": honest(BASE, i) for i in range(4)} | {"bad": attack(BASE, kind)}
    result = screen(BASE, states, loss)
    assert set(result.states) >= {"h0", "h1", "h2", "h3"}  # every honest update counts
    assert "bad" in result.outliers or "bad" in result.rejected
    merged = {k: torch.stack([s[k] for s in result.states.values()]).mean(0) for k in BASE}
    honest_only = {k: torch.stack([states[f"h{i}"][k] for i in range(4)]).mean(0) for k in BASE}
    # What got through moves the model about as the honest ones alone would have.
    assert loss(merged) <= loss(honest_only) * 1.15 < loss(BASE)


def test_a_sign_flipped_update_is_refused_though_its_size_is_honest():
    states = {f"h{i}": honest(BASE, i) for i in range(4)} | {"bad": attack(BASE, "flip")}
    result = screen(BASE, states, loss)
    assert "bad" in result.rejected and "raises the held-out loss" in result.rejected["bad"]


def test_an_update_screened_alone_is_judged_against_recent_ones():
    """An asynchronous fold of one or two updates: the history of accepted ones says what is typical."""
    good = screen(BASE, {f"h{i}": honest(BASE, i) for i in range(4)}, loss)
    norms, gains = list(good.norms.values()), list(good.gains.values())
    for kind in ("x100", "flip", "random", "zero"):
        alone = screen(BASE, {"h": honest(BASE, 5), "bad": attack(BASE, kind)}, loss, recent_norms=norms,
                       recent_gains=gains)
        assert "h" in alone.states and ("bad" in alone.rejected or "bad" in alone.scaled), kind
        merged = {k: torch.stack([s[k] for s in alone.states.values()]).mean(0) for k in BASE}
        assert loss(merged) < loss(BASE)


def test_a_first_fold_of_two_still_refuses_what_is_plainly_harmful():
    for kind in ("x100", "random", "zero"):
        result = screen(BASE, {"h": honest(BASE, 1), "bad": attack(BASE, kind)}, loss)
        assert "h" in result.states and ("bad" in result.rejected or "bad" in result.scaled), kind


def test_honest_updates_near_convergence_all_count():
    close = {k: v.clone() * 0.999 for k, v in TARGET.items()}
    states = {f"h{i}": honest(close, i, step=0.01) for i in range(5)}
    result = screen(close, states, loss)
    assert set(result.states) == set(states) and not result.rejected
    assert all(math.isfinite(g) for g in result.gains.values())


def test_honest_updates_from_skewed_data_all_count_though_each_alone_makes_the_model_worse():
    """Label skew: each peer pulls the part of the model its own classes need and drags the rest along with
    it, one of them (the most skewed) much further than the others. Alone, each makes the held-out loss worse,
    that one by far the most; together they make it better, and none is refused: without the most skewed one
    its classes would be lost."""
    base = {"w": torch.full((50,), 0.5), "b": torch.full((5,), -0.5)}
    states = {}
    for i in range(5):
        own = torch.zeros(50, dtype=torch.bool)
        own[10 * i:10 * (i + 1)] = True
        w = base["w"].clone()
        w[own] += 0.9 * (TARGET["w"][own] - w[own])  # its own part, far towards the target
        w[~own] -= 0.12 if i == 0 else 0.08  # the others' part, dragged away
        states[f"p{i}"] = {"w": w, "b": base["b"] + 0.2 * (TARGET["b"] - base["b"])}
    assert all(loss(state) > loss(base) for state in states.values())
    result = screen(base, states, loss)
    assert set(result.states) == set(states) and not result.rejected, result.rejected
    merged = {k: torch.stack([s[k] for s in result.states.values()]).mean(0) for k in base}
    assert loss(merged) < loss(base)


def test_honest_updates_that_all_raise_the_held_out_loss_all_count():
    """Past the best epoch every local update overfits a little: none is refused for it."""
    states = {f"h{i}": {k: v + 0.05 * torch.randn(v.shape, generator=torch.Generator().manual_seed(i))
                        for k, v in TARGET.items()} for i in range(5)}
    assert all(loss(state) > loss(TARGET) for state in states.values())
    result = screen(TARGET, states, loss)
    assert set(result.states) == set(states) and not result.rejected, result.rejected


@pytest.mark.parametrize("kind", ["flip", "random", "zero"])
def test_a_peer_with_two_updates_in_a_fold_cannot_hide_one_behind_the_other(kind):
    """An asynchronous fold: a peer that answers at once can have two updates beside an honest one. Judged
    one update at a time, each of its two would look harmless while the other stays; judged by sender, both go."""
    good = screen(BASE, {f"h{i}": honest(BASE, i) for i in range(4)}, loss)
    states = {"h": honest(BASE, 5), "bad#1": attack(BASE, kind), "bad#2": attack(BASE, kind)}
    result = screen(BASE, states, loss, recent_norms=list(good.norms.values()),
                    recent_gains=list(good.gains.values()), senders={"bad#1": "bad", "bad#2": "bad"})
    assert "h" in result.states
    for name in ("bad#1", "bad#2"):
        assert name in result.rejected or (name in result.scaled and result.trust[name] < 0.5), (name, result)
    merged = {k: torch.stack([s[k] for s in result.states.values()]).mean(0) for k in BASE}
    assert loss(merged) < loss(BASE)


def test_a_peer_alone_in_a_fold_is_judged_update_by_update():
    """A fold left to one peer: random updates average out to little harm together, so each is judged by
    what it does alone, bounded to the session's typical size: what passes makes the model no more than
    noise worse."""
    good = screen(BASE, {f"h{i}": honest(BASE, i) for i in range(4)}, loss)
    states = {f"bad#{i}": {k: 5 * torch.randn(v.shape, generator=torch.Generator().manual_seed(i))
                           for k, v in BASE.items()} for i in range(6)}
    result = screen(BASE, states, loss, recent_norms=list(good.norms.values()),
                    recent_gains=list(good.gains.values()), senders=dict.fromkeys(states, "bad"))
    assert len(result.rejected) >= 4, result.rejected
    assert all(loss(state) <= loss(BASE) * 1.05 for state in result.states.values())
    together = screen(BASE, {"h": honest(BASE, 1), "h#2": honest(BASE, 2)}, loss, senders={"h#2": "h"},
                      recent_norms=list(good.norms.values()), recent_gains=list(good.gains.values()))
    assert set(together.states) == {"h", "h#2"}


def test_a_base_loss_the_caller_measured_is_not_measured_again_and_judges_the_same():
    states = {f"h{i}": honest(BASE, i) for i in range(4)} | {"bad": attack(BASE, "flip")}
    calls = []

    def counted(state) -> float:
        calls.append(state)
        return loss(state)

    measured = screen(BASE, states, counted)
    before = len(calls)
    given = screen(BASE, states, counted, base_loss=loss(BASE))
    assert len(calls) - before == before - 1 and not any(state is BASE for state in calls[before:])
    assert (given.rejected, given.trust, given.gains) == (measured.rejected, measured.trust, measured.gains)
