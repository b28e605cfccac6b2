"""The federated coordinator's choices: which aggregate resists a bad peer, who is an outlier."""

from __future__ import annotations

import pytest
import torch

from tasks.federated import combine, outliers


def states(values):
    return [{"w": torch.tensor([v, -v]), "b": torch.tensor([v])} for v in values]


@pytest.mark.parametrize("honest", [2, 3, 4])
@pytest.mark.parametrize("method", ["median", "trimmed_mean"])
def test_robust_aggregates_ignore_one_wild_peer(method, honest):
    peers = states([1.0 + 0.01 * i for i in range(honest)] + [1e6])
    merged = combine(method, peers, [100] * len(peers))
    assert 0.99 < merged["b"].item() < 1.05
    assert torch.allclose(merged["w"], torch.tensor([merged["b"].item(), -merged["b"].item()]))


def test_fedavg_weights_peers_by_their_samples():
    merged = combine("fedavg", states([1.0, 4.0]), [300, 100])
    assert merged["b"].item() == pytest.approx(1.75)


def test_outliers_are_peers_far_from_the_aggregate():
    peers = dict(zip("abcd", states([1.0, 1.01, 0.99, 500.0]), strict=True))
    merged = combine("median", list(peers.values()), [1] * 4)
    found = outliers(merged, peers)
    assert list(found) == ["d"] and found["d"] > 10
    assert outliers(merged, dict(list(peers.items())[:2])) == {}


@pytest.mark.parametrize("name", ["global", "validation", "initial", "dataset", "model"])
def test_no_peer_name_reaches_an_object_of_the_coordinators(name):
    """Attack: a peer registered as `global` (or `validation`) would, with keys built from names alone, get
    the write grant of the round's global weights (or read and overwrite the validation rows)."""
    from tasks import asynchronous, federated, sweep

    prefix = "users/u/sessions/s"
    coordinators = {f"{prefix}/rounds/0/global.safetensors", f"{prefix}/rounds/initial.safetensors",
                    f"{prefix}/shards/validation.csv", f"{prefix}/dataset.csv", f"{prefix}/model.safetensors",
                    f"{prefix}/versions/1.safetensors"}
    assert federated.weights_key(prefix, 0, name) not in coordinators
    assert asynchronous.weights_key(prefix, 1, name) not in coordinators
    assert sweep.weights_key(prefix, name) not in coordinators
