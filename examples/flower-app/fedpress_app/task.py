"""Data, model and training helpers of the app, built on ``fedpress.train``.

The data set is scikit-learn's bundled 8x8 digits (no download): a stratified,
seeded 80/20 train/test split; the train split is cut into ``num-partitions``
shares, one per SuperNode. The model is fedpress's digits MLP (64-64-10).
"""

from __future__ import annotations

from functools import lru_cache
from typing import Any

import torch
from fedpress.train import Dataset, evaluate, load_task, make_model, partition, round_seed, train_local

TASK = "digits"


@lru_cache(maxsize=4)
def load_splits(seed: int = 0) -> tuple[Dataset, Dataset]:
    """(train, test) of the digits task; cached, as a node runs its ClientApp many times."""
    return load_task(TASK, seed=seed)


@lru_cache(maxsize=16)
def load_partition(
    partition_id: int, num_partitions: int, scheme: str = "iid", seed: int = 0
) -> tuple[Dataset, Dataset]:
    """This node's share of the train split and of the test split (disjoint between nodes)."""
    partition_id, num_partitions = int(partition_id), int(num_partitions)
    if not 0 <= partition_id < num_partitions:
        raise ValueError(
            f"partition-id {partition_id} outside 0..{num_partitions - 1}: set the node "
            "config, e.g. --node-config 'partition-id=0 num-partitions=3'"
        )
    train, test = load_splits(seed)
    train_part = train.subset(partition(train.y, num_partitions, scheme, seed=seed)[partition_id])
    test_part = test.subset(partition(test.y, num_partitions, "iid", seed=seed)[partition_id])
    return train_part, test_part


def load_test(seed: int = 0) -> Dataset:
    """The whole test split (the server's central evaluation)."""
    return load_splits(seed)[1]


def get_model(seed: int = 0) -> torch.nn.Module:
    """The digits MLP, its initial weights a function of ``seed``."""
    return make_model(TASK, seed=seed)


def train(
    model: torch.nn.Module,
    data: Dataset,
    epochs: int,
    lr: float,
    momentum: float,
    batch_size: int,
    seed: int,
    partition_id: int,
    server_round: int,
) -> dict[str, Any]:
    """Local SGD on ``data`` in place; each node and round shuffles with its own seed."""
    return train_local(
        model,
        data,
        epochs=epochs,
        batch_size=batch_size,
        lr=lr,
        momentum=momentum,
        seed=round_seed(seed * 1000 + partition_id, server_round),
    )


def test(model: torch.nn.Module, data: Dataset) -> tuple[float, float]:
    """(loss, accuracy) of ``model`` on ``data``."""
    return evaluate(model, data)
