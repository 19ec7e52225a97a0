"""Split a data set over federated clients: IID, Dirichlet label skew, or label shards.

Every scheme returns ``num_clients`` sorted int64 index arrays that are disjoint,
cover ``range(len(labels))``, are all non-empty, and depend only on the inputs
and ``seed``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from .datasets import Dataset

__all__ = ["SCHEMES", "partition", "partition_iid", "partition_dirichlet", "partition_shards", "client_partition"]

SCHEMES = ("iid", "dirichlet", "shards")
_DIRICHLET_TRIES = 100


def _labels(labels: np.ndarray) -> np.ndarray:
    y = np.asarray(labels)
    if y.ndim != 1:
        raise ValueError(f"labels must be one-dimensional, got shape {y.shape}")
    return y


def _check_clients(n: int, num_clients: int, per_client: int = 1) -> int:
    num_clients = int(num_clients)
    if num_clients < 1:
        raise ValueError(f"num_clients must be at least 1, got {num_clients}")
    if n < num_clients * per_client:
        raise ValueError(f"{n} examples cannot give {num_clients} clients {per_client} each")
    return num_clients


def _finish(parts: list) -> list:
    return [np.sort(np.asarray(p, dtype=np.int64)) for p in parts]


def partition_iid(labels: np.ndarray, num_clients: int, seed: int = 0) -> list:
    """A seeded random permutation cut into ``num_clients`` near-equal parts."""
    y = _labels(labels)
    num_clients = _check_clients(y.shape[0], num_clients)
    perm = np.random.default_rng(seed).permutation(y.shape[0])
    return _finish(np.array_split(perm, num_clients))


def partition_dirichlet(
    labels: np.ndarray, num_clients: int, alpha: float = 0.5, seed: int = 0, min_size: int = 1
) -> list:
    """Label skew (Hsu et al. 2019): each class is spread over the clients in
    proportions drawn from Dirichlet(alpha); small alpha gives each client few
    classes, large alpha approaches IID. Draws are repeated (seeded) until every
    client holds at least ``min_size`` examples; if that keeps failing, the
    largest clients give examples to the small ones."""
    y = _labels(labels)
    alpha = float(alpha)
    if not alpha > 0.0 or not np.isfinite(alpha):
        raise ValueError(f"alpha must be a positive number, got {alpha}")
    min_size = max(int(min_size), 1)
    n = y.shape[0]
    num_clients = _check_clients(n, num_clients, min_size)
    rng = np.random.default_rng(seed)
    classes = np.unique(y)
    members = [np.flatnonzero(y == c) for c in classes]
    parts: list = []
    for _ in range(_DIRICHLET_TRIES):
        parts = [[] for _ in range(num_clients)]
        for idx in members:
            idx = idx[rng.permutation(idx.size)]
            p = rng.dirichlet(np.full(num_clients, alpha))
            cuts = (np.cumsum(p)[:-1] * idx.size).astype(np.int64)
            for client, chunk in enumerate(np.split(idx, cuts)):
                parts[client].append(chunk)
        parts = [np.concatenate(p) for p in parts]
        if min(p.size for p in parts) >= min_size:
            return _finish(parts)
    # Repair the last draw deterministically: move examples from the largest client.
    parts = [np.sort(p) for p in parts]
    for client in range(num_clients):
        while parts[client].size < min_size:
            donor = max(range(num_clients), key=lambda c: (parts[c].size, -c))
            parts[client] = np.append(parts[client], parts[donor][-1])
            parts[donor] = parts[donor][:-1]
    return _finish(parts)


def partition_shards(labels: np.ndarray, num_clients: int, shards_per_client: int = 2, seed: int = 0) -> list:
    """The pathological non-IID split of McMahan et al. (2017): sort by label (ties
    in seeded random order), cut into ``num_clients * shards_per_client`` shards
    and give each client ``shards_per_client`` of them at random, so each client
    sees about ``shards_per_client`` labels."""
    y = _labels(labels)
    shards_per_client = int(shards_per_client)
    if shards_per_client < 1:
        raise ValueError(f"shards_per_client must be at least 1, got {shards_per_client}")
    num_clients = _check_clients(y.shape[0], num_clients, shards_per_client)
    rng = np.random.default_rng(seed)
    perm = rng.permutation(y.shape[0])
    order = perm[np.argsort(y[perm], kind="stable")]
    shards = np.array_split(order, num_clients * shards_per_client)
    ids = rng.permutation(len(shards))
    return _finish(
        [
            np.concatenate([shards[s] for s in ids[c * shards_per_client : (c + 1) * shards_per_client]])
            for c in range(num_clients)
        ]
    )


def partition(
    labels: np.ndarray,
    num_clients: int,
    scheme: str = "iid",
    alpha: float = 0.5,
    seed: int = 0,
    shards_per_client: int = 2,
) -> list:
    """Dispatch on ``scheme``: ``"iid"``, ``"dirichlet"`` (uses ``alpha``) or ``"shards"``."""
    s = str(scheme).lower()
    if s == "iid":
        return partition_iid(labels, num_clients, seed)
    if s == "dirichlet":
        return partition_dirichlet(labels, num_clients, alpha, seed)
    if s == "shards":
        return partition_shards(labels, num_clients, shards_per_client, seed)
    raise ValueError(f"unknown partition scheme {scheme!r}; choose one of {', '.join(SCHEMES)}")


def client_partition(
    dataset: Dataset,
    index: int,
    num_clients: int,
    scheme: str = "iid",
    alpha: float = 0.5,
    seed: int = 0,
    shards_per_client: int = 2,
) -> Dataset:
    """Client ``index``'s share (of ``num_clients``) of ``dataset`` under ``scheme``;
    every client computing its own share with the same arguments gets disjoint data."""
    index, num_clients = int(index), int(num_clients)
    if not 0 <= index < num_clients:
        raise ValueError(f"client index {index} outside 0..{num_clients - 1}")
    parts = partition(
        dataset.y, num_clients, scheme=scheme, alpha=alpha, seed=seed, shards_per_client=shards_per_client
    )
    return dataset.subset(parts[index])
