"""Differential privacy in the TCP federation (fedpress.federation.dp): central Gaussian
noise on the clipped sum, or Skellam noise the clients add under secure aggregation;
the accountant's epsilon in rounds.jsonl; settings that cannot work refused."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
from fedpress.federation import Server
from fedpress.federation.dp import run_privacy
from fedpress.federation.secure import secure_settings
from fedpress.privacy import PrivacyAccountant
from test_federation import TOKEN
from test_federation_secure import DIM, params
from test_federation_secure import run as run_federation


def run(**server_options: Any) -> tuple[Server, list[dict]]:
    server, rows, _ = run_federation(server_options.pop("secure_aggregation", False), codec="q8", **server_options)
    return server, rows


def privacy(**options: Any) -> Any:
    """``run_privacy`` with a central run's defaults."""
    settings: dict[str, Any] = dict(
        noise_multiplier=None,
        target_epsilon=None,
        clip_norm=1.0,
        delta=1e-5,
        sampling_rate=1.0,
        rounds=5,
        clients_per_round=10,
        secure=None,
    )
    settings.update(options)
    return run_privacy(**settings)


def test_central_dp_rounds_report_the_accountants_epsilon() -> None:
    server, rows = run(clip_norm=0.5, dp_noise_multiplier=0.8, dp_sampling_rate=0.5)
    expected = PrivacyAccountant(0.8, 0.5, 1e-5)
    for r, row in enumerate(rows[1:], start=1):
        assert row["status"] == "ok" and len(row["completed"]) == 4
        expected.step()
        privacy = row["privacy"]
        assert privacy["mechanism"] == "gaussian" and privacy["rounds"] == r
        assert privacy["epsilon"] == pytest.approx(expected.epsilon, rel=1e-9)
        assert privacy["clip_norm"] == 0.5 and privacy["noise_multiplier"] == 0.8
        assert all(row["clients"][c]["weight"] == 1.0 for c in row["completed"])
        # the clients clipped before compressing: the server's own clip barely bites
        assert all(row["clients"][c].get("clip_factor", 1.0) > 0.95 for c in row["completed"])
    assert rows[3]["privacy"]["epsilon"] > rows[1]["privacy"]["epsilon"]
    assert rows[-1]["test_loss"] < rows[0]["test_loss"]


def test_central_noise_has_the_promised_spread() -> None:
    dp = privacy(noise_multiplier=2.0, clip_norm=0.25)
    mean = {"w": np.full(200_000, 0.01, np.float32), "steps": np.array(3)}
    noisy = dp.noisy_mean(mean, 8.0, 10, np.random.default_rng(0))
    assert noisy["w"].dtype == np.float32 and noisy["steps"] == 3
    assert noisy["w"].mean() == pytest.approx(0.01 * 8 / 10, abs=5e-4)  # the noise's mean: 0.05 / sqrt(2e5)
    assert np.std(noisy["w"]) == pytest.approx(2.0 * 0.25 / 10, rel=0.01)


def test_target_epsilon_picks_the_noise_that_reaches_it() -> None:
    dp = privacy(target_epsilon=8.0, sampling_rate=0.1, rounds=50)
    assert dp.accountant.epsilon_after(50) <= 8.0
    looser = PrivacyAccountant(dp.noise_multiplier * 0.99, 0.1, 1e-5)
    assert looser.epsilon_after(50) > 8.0 * 0.999


def test_distributed_dp_under_secure_aggregation() -> None:
    codec = "int12:clip=0.05:nmax=64"
    server, rows, _ = run_federation(True, codec=codec, clip_norm=0.5, dp_noise_multiplier=0.5)
    for row in rows[1:]:
        assert row["status"] == "ok" and len(row["secure_aggregation"]["survivors"]) == 4
        assert row["privacy"]["mechanism"] == "skellam" and row["privacy"]["client_mu"] > 0
    assert rows[-1]["privacy"]["epsilon"] > rows[1]["privacy"]["epsilon"] > 0
    assert np.all(np.isfinite(server.params["w"])) and server.params["w"].shape == (DIM,)


def test_private_settings_that_cannot_work_are_refused() -> None:
    base: dict[str, Any] = dict(rounds=2, clients_per_round=4, token=TOKEN, insecure=True)
    with pytest.raises(ValueError, match="needs a clip norm"):
        Server("127.0.0.1", 0, params(), codec="q8", dp_noise_multiplier=1.0, **base)
    with pytest.raises(ValueError, match="exactly one"):
        Server(
            "127.0.0.1", 0, params(), codec="q8", clip_norm=1.0, dp_noise_multiplier=1.0, dp_target_epsilon=3.0, **base
        )
    with pytest.raises(ValueError, match="plain mean"):
        Server(
            "127.0.0.1", 0, params(), codec="q8", clip_norm=1.0, dp_noise_multiplier=1.0, aggregation="median", **base
        )
    secure = secure_settings("int4:clip=0.05:nmax=4", params(), 4, 0.3)
    with pytest.raises(ValueError, match="would wrap .* nmax to"):
        privacy(noise_multiplier=1.0, rounds=3, clients_per_round=4, secure=secure)
