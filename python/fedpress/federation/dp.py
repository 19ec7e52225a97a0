"""Differential privacy in the TCP federation (``fedpress server --dp-noise-multiplier Z
--clip-norm C``): the settings of a private run and what each round does with them.

Two mechanisms, both over client-level clipping (each client scales its update to L2 norm
at most C before compressing it; ``fedpress.privacy.clip_update``):

* central DP (DP-FedAvg, McMahan et al. 2018): the server clips each decoded update again
  (compression may lengthen it), adds Gaussian noise of standard deviation z * C to the
  sum and divides by the expected number of clients, a fixed denominator that keeps the
  sensitivity C. The server sees each update: it is trusted.
* distributed DP, with secure aggregation: each client adds Skellam noise to its integer
  codes before masking them (Agarwal, Kairouz and Liu 2021), so that only the noisy sum
  is ever visible, to the server too.

An accountant (``fedpress.privacy.PrivacyAccountant``, over Google's dp-accounting) gives
epsilon for the run's delta after each round that changed the model; ``rounds.jsonl``
carries it. ``sampling_rate`` is the fraction of the population sampled per round; the
default, 1, claims no amplification by sampling.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Optional

import numpy as np

from .._update_math import scale
from ..codec import parse_spec
from ..privacy import PrivacyAccountant, SkellamParams, add_central_noise, noise_multiplier_for_epsilon, skellam_params
from .secure import SecureSettings

__all__ = ["RunPrivacy", "run_privacy"]


@dataclass
class RunPrivacy:
    """A private run: the noise multiplier z, the clip norm C, the accountant, and for
    distributed DP the Skellam parameters every client uses."""

    noise_multiplier: float
    clip_norm: float
    delta: float
    sampling_rate: float
    accountant: PrivacyAccountant
    skellam: Optional[SkellamParams] = None
    target_epsilon: Optional[float] = None

    @property
    def mechanism(self) -> str:
        return "skellam" if self.skellam is not None else "gaussian"

    def noisy_mean(
        self, mean: Mapping[str, np.ndarray], clipped: float, expected_clients: int, rng: np.random.Generator
    ) -> dict[str, np.ndarray]:
        """Central DP: from the mean of ``clipped`` (the sum of the clip factors, each
        update weighing one) clipped updates, their sum plus N(0, (z C)^2) per coordinate
        of the float tensors, over the expected number of clients (other tensors: their
        sum over it)."""
        out = {}
        ratio = clipped / expected_clients
        for name, value in mean.items():
            if value.dtype.kind == "f":
                total = np.asarray(value, np.float64) * clipped
                noisy = add_central_noise(total, self.noise_multiplier, self.clip_norm, rng) / expected_clients
                out[name] = noisy.astype(value.dtype)
            else:
                out[name] = scale(value, ratio)
        return out

    def record(self) -> dict[str, Any]:
        """The run's privacy so far, for rounds.jsonl."""
        record = self.accountant.to_dict()
        record.update(clip_norm=self.clip_norm, target_epsilon=self.target_epsilon)
        if self.skellam is not None:
            record.update(client_mu=self.skellam.client_mu, central_mu=self.skellam.central_mu)
        return record


def run_privacy(
    *,
    noise_multiplier: Optional[float],
    target_epsilon: Optional[float],
    clip_norm: Optional[float],
    delta: float,
    sampling_rate: float,
    rounds: int,
    clients_per_round: int,
    secure: Optional[SecureSettings],
) -> RunPrivacy:
    """The settings of a private run (ValueError naming what is wrong): give z or a
    target epsilon (z is then the smallest that reaches it over ``rounds``)."""
    if (noise_multiplier is None) == (target_epsilon is None):
        raise ValueError("differential privacy needs exactly one of a noise multiplier and a target epsilon")
    if clip_norm is None:
        raise ValueError("differential privacy needs a clip norm: each client's update is scaled to at most it")
    if not 0.0 < delta < 1.0:
        raise ValueError(f"delta must be in (0, 1), got {delta}")
    mechanism = "gaussian" if secure is None else "skellam"
    skellam_for = None
    if secure is not None:
        spec = parse_spec(secure.codec)
        scale = ((1 << spec.int_bits) - 1) / (2.0 * spec.int_clip)  # codes per unit of a rotated value
        # Only the noise of clients sure to survive is counted on.
        survivors = max(1, math.floor(clients_per_round * (1.0 - secure.dropout_tolerance)))

        def skellam_for(z: float) -> SkellamParams:
            return skellam_params(clip_norm, scale, secure.length, survivors, z)

    if noise_multiplier is None:
        assert target_epsilon is not None
        sensitivities: dict[str, Any] = {}
        if skellam_for is not None:
            probe = skellam_for(1.0)
            sensitivities = dict(l2_sensitivity=probe.l2_sensitivity, l1_sensitivity=probe.l1_sensitivity)
        noise_multiplier = noise_multiplier_for_epsilon(
            target_epsilon, rounds, sampling_rate, delta, mechanism, **sensitivities
        )
    skellam = None if skellam_for is None else skellam_for(noise_multiplier)
    if skellam is not None:
        assert secure is not None
        _check_headroom(skellam, secure, clients_per_round)
        accountant = skellam.accountant(sampling_rate, delta)
    else:
        accountant = PrivacyAccountant(noise_multiplier, sampling_rate, delta)
    return RunPrivacy(noise_multiplier, clip_norm, delta, sampling_rate, accountant, skellam, target_epsilon)


def _check_headroom(skellam: SkellamParams, secure: SecureSettings, clients: int) -> None:
    """The noisy modular sum must not wrap: 2^(m-2) codes of room below 0 (and above the
    codes' largest sum) must hold six standard deviations of the summed noise."""
    room = 1 << (secure.modulus_bits - 2)
    noise = 6.0 * math.sqrt(skellam.client_mu * clients)
    if noise >= room:
        needed = math.floor(math.log2(noise)) + 3  # the smallest m with 2^(m-2) > noise
        nmax = 1 << max(0, needed - secure.bits - 1)
        raise ValueError(
            f"the summed Skellam noise (6 sigma = {noise:.0f} codes) would wrap the {secure.modulus_bits}-bit "
            f"secure sum (room: {room} codes): raise the codec's nmax to {nmax} or more, or lower its bits or "
            "the noise"
        )
