"""bench/rounds.py --steps times the product's own functions (harness/steps.py): each must exist, and be put back."""

from __future__ import annotations

import torch

from harness.steps import STEPS, owner_of, timed_steps


def test_the_round_bench_times_functions_the_product_has_and_puts_them_back():
    originals = []
    for where, name, _ in STEPS:
        owner = owner_of(where)
        assert name in owner.__dict__, f"{where}.{name} is gone: harness/steps.py must follow the product"
        originals.append((owner, name, owner.__dict__[name]))
    times: dict[str, list] = {}
    with timed_steps(times):
        from tasks import federated

        merged = federated.combine("fedavg", [{"w": torch.ones(2)}, {"w": torch.zeros(2)}], [1.0, 1.0])
    assert torch.equal(merged["w"], torch.full((2,), 0.5))  # the product's own function ran, timed
    assert list(times) == ["aggregate: screened updates combined"] and len(times[list(times)[0]]) == 1
    assert all(owner.__dict__[name] is original for owner, name, original in originals)
