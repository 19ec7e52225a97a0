"""fedpress._seeds: one derivation with named purposes, and every caller deriving through it."""

from __future__ import annotations

import hashlib
import importlib
import importlib.util

import numpy as np
import pytest
from fedpress import _seeds
from fedpress._seeds import (
    PURPOSE_DOWNLINK,
    PURPOSE_PAYLOAD,
    PURPOSE_ROTATION,
    PURPOSE_SAMPLING,
    PURPOSE_SHUFFLE,
    PURPOSE_TRAINING,
    PURPOSES,
    derive_seed,
)
from fedpress.federation.server import round_config, sample_clients


def test_derive_seed_is_a_64_bit_function_of_its_arguments() -> None:
    seeds = {derive_seed(7, purpose, 3) for purpose in PURPOSES}
    assert len(seeds) == len(PURPOSES)  # each purpose its own stream
    assert all(0 <= s < 2**64 for s in seeds)
    assert derive_seed(7, PURPOSE_PAYLOAD, "client-1", 3) == derive_seed(7, PURPOSE_PAYLOAD, "client-1", 3)
    assert derive_seed(7, PURPOSE_PAYLOAD, "client-1", 3) != derive_seed(7, PURPOSE_PAYLOAD, "client-2", 3)
    assert derive_seed(7, PURPOSE_PAYLOAD, 1, 3) != derive_seed(7, PURPOSE_PAYLOAD, 3, 1)
    # SeedSequence over (seed, SHA-256 of the purpose, entropy): the mixing numpy documents.
    word = int.from_bytes(hashlib.sha256(b"payload").digest()[:8], "little")
    want = int(np.random.SeedSequence([7, word, 3]).generate_state(1, np.uint64)[0])
    assert derive_seed(7, PURPOSE_PAYLOAD, 3) == want


def test_an_unnamed_purpose_is_refused() -> None:
    with pytest.raises(ValueError, match="unknown seed purpose 'rotaton'"):
        derive_seed(1, "rotaton", 2)
    assert set(_seeds.__all__) >= {"derive_seed", "PURPOSES"}


def test_the_server_and_the_sweep_derive_round_seeds_here() -> None:
    assert round_config(5, 3, 10, "eden4:shared")["rotation_seed"] == derive_seed(5, PURPOSE_ROTATION, 3)
    ids = [f"c{i}" for i in range(10)]
    rng = np.random.default_rng(derive_seed(5, PURPOSE_SAMPLING, 3))
    assert sample_clients(5, 3, ids, 4) == [ids[i] for i in sorted(rng.choice(10, size=4, replace=False))]
    assert sample_clients(5, 3, ids, 40) == ids

    simulate_module = importlib.import_module("fedpress.sweep.simulate")

    assert simulate_module.sample_clients is sample_clients  # one sampler: the sweep counts the server's rounds


def test_training_and_downlink_seeds() -> None:
    from fedpress.train import round_seed

    assert round_seed(11, 2) == derive_seed(11, PURPOSE_SHUFFLE, 2) >> 1 < 2**63
    assert PURPOSE_DOWNLINK == "downlink"  # the downlink's seeds kept their values


def test_client_training_seeds_never_collide() -> None:
    # The seed client i trains from, one derivation for the command line's clients, the
    # demo and the sweep: (seed 0, client 1000) and (seed 1, client 0), which an earlier
    # seed * 1000 + i gave the same seed, differ.
    from fedpress.sweep.simulate import _client_seed

    assert _client_seed(3, 7) == derive_seed(3, PURPOSE_TRAINING, 7)
    seeds = {_client_seed(seed, i) for seed in range(3) for i in range(2000)}
    assert len(seeds) == 3 * 2000
    assert _client_seed(0, 1000) != _client_seed(1, 0)


@pytest.mark.skipif(importlib.util.find_spec("torch") is None, reason="needs torch")
def test_ddp_seeds() -> None:
    from fedpress.ddp import CompressionState

    state = CompressionState("eden4:shared", seed=4)
    state.iter = 6
    assert state._payload_seed(1, 2) == derive_seed(4, PURPOSE_PAYLOAD, 1, 6, 2)
    assert state._rotation_seed(2) == derive_seed(4, PURPOSE_ROTATION, 6, 2)
