"""Differential privacy for federated updates: clipping, central Gaussian noise,
distributed Skellam noise for integer codes, and an accountant that says what a
run has spent.

Three building blocks, each usable alone:

1. **Client-level clipping** (``clip_update``, ``clip_vector``). Every DP guarantee
   here is about one *client*: its whole update, all floating tensors together, is
   scaled down to an L2 norm of at most ``clip_norm`` C, so that adding or removing
   one client moves the sum of clipped updates by at most C (the L2 sensitivity).

2. **Central DP, DP-FedAvg** (McMahan, Ramage, Talwar, Zhang, "Learning
   Differentially Private Recurrent Language Models", ICLR 2018). The server sums
   the clipped updates of a round, adds Gaussian noise N(0, (z C)^2) to every
   coordinate of the *sum* (``add_central_noise``), and divides by a *fixed*
   denominator, the expected number of clients per round (``noisy_mean``), never by
   the number that actually arrived: that count depends on who took part, and
   dividing by it would make the output's sensitivity depend on the data. Clients
   are sampled independently with probability q each round (Poisson sampling), which
   is what the accountant's subsampling amplification assumes.

3. **Distributed DP for integer codes, the Skellam mechanism** (Agarwal, Kairouz,
   Liu, "The Skellam Mechanism for Differentially Private Federated Learning",
   NeurIPS 2021, arXiv:2110.04995). Each client scales its clipped update to integer
   codes, adds its own share of Skellam noise (``skellam_noise``) and only then hands
   the codes to secure aggregation, so the server only ever sees the noisy sum. The
   Skellam distribution is closed under summation: n shares of variance mu / n sum to
   exactly Skellam of variance mu, so the noise in the sum is the one the accounting
   assumes (``skellam_params`` gives every number a codec needs).

The accountant (``PrivacyAccountant``, ``noise_multiplier_for_epsilon``) uses Google's
``dp_accounting`` library (the optional extra ``pip install 'fedpress[privacy]'``),
imported only when an accountant is built, so ``import fedpress.privacy`` works
without it.

Randomness: the samplers take a ``numpy.random.Generator``. Noise that protects
anyone must be unpredictable: seed it from the operating system
(``np.random.default_rng()``), never from a run seed that others can derive; fixed
seeds are for tests. numpy's generators are statistical, not cryptographic, and the
Gaussian sampler works in floating point (Mironov, CCS 2012, shows how the low bits of
a floating-point Laplace sample can leak): both are the usual trade-off of research
federated learning, not a hardened deployment.
"""

from __future__ import annotations

import importlib
import math
import numbers
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from types import ModuleType
from typing import Any, Optional, Union

import numpy as np
import numpy.typing as npt

from .robust import update_norm

__all__ = [
    "clip_update",
    "clip_vector",
    "gaussian_noise",
    "add_central_noise",
    "noisy_mean",
    "skellam_noise",
    "skellam_rdp",
    "code_sensitivity",
    "skellam_client_mu",
    "SkellamParams",
    "skellam_params",
    "SKELLAM_ORDERS",
    "PrivacyAccountant",
    "noise_multiplier_for_epsilon",
    "MECHANISMS",
    "ACCOUNTANTS",
]

#: Noise mechanisms the accountant knows: the Gaussian of DP-FedAvg, and Skellam.
MECHANISMS = ("gaussian", "skellam")
#: Accountants: Renyi DP (both mechanisms) and privacy loss distributions (Gaussian only).
ACCOUNTANTS = ("rdp", "pld")

#: RDP orders of the Skellam accounting: its bound holds for integer orders only. 2..128
#: cover every epsilon of practical interest; the few large ones serve tiny epsilons.
SKELLAM_ORDERS: tuple[int, ...] = tuple(range(2, 129)) + (160, 192, 256, 384, 512, 1024)

# numpy's Poisson sampler refuses lam near 2**63; a variance this large would not fit
# any bit width a secure sum uses anyway.
_MAX_SKELLAM_MU = float(2**60)
# The range noise_multiplier_for_epsilon searches: below 0.01 no round gives a useful
# guarantee, above 1e4 dp_accounting's subsampled Gaussian stops converging.
_Z_MIN = 1e-2
_Z_MAX = 1e4


# --------------------------------------------------------------------- clipping --


def _positive_finite(name: str, value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a real number, got {type(value).__name__}")
    x = float(value)
    if not (math.isfinite(x) and x > 0):
        raise ValueError(f"{name} must be finite and > 0, got {value!r}")
    return x


def _float_norm(tensors: Mapping[str, np.ndarray]) -> float:
    """L2 norm over float tensors already checked finite; rescaled by the largest
    magnitude when the sum of squares overflows float64 (entries beyond ~1e154)."""
    with np.errstate(over="ignore"):  # an overflow is seen in the result and handled below
        norm = update_norm(tensors)
    if math.isfinite(norm):
        return norm
    peak = max(float(np.max(np.abs(v))) for v in tensors.values() if v.size)
    return peak * update_norm({k: np.asarray(v, dtype=np.float64) / peak for k, v in tensors.items()})


def clip_update(update: Mapping[str, np.ndarray], clip_norm: float) -> tuple[dict[str, np.ndarray], float]:
    """The update scaled to an L2 norm of at most ``clip_norm``, and its norm before.

    The norm is taken over all floating tensors together (float16/32/64), so a
    client's whole contribution, not each tensor, is bounded: that is the sensitivity
    the accountant assumes. Each clipped tensor keeps its dtype; the scale is
    computed in float64 and, should the rounding of a low-precision dtype leave the
    result a hair above ``clip_norm``, shrunk until it is not (the guarantee is never
    exceeded by rounding). An update already within ``clip_norm`` is returned as
    given: the same arrays, not copies.

    Integer and bool tensors (BatchNorm's ``num_batches_tracked``) pass through
    untouched and are *not* protected by any guarantee here; leave them out of what a
    private round sends, or send them knowing that. A NaN or infinity is refused
    (``ValueError`` naming the tensor): clipping would hide it as a zero update or
    spread it, and a non-finite update means a broken client. Complex and other dtypes
    are refused with ``TypeError``.
    """
    bound = _positive_finite("clip_norm", clip_norm)
    floats: dict[str, np.ndarray] = {}
    out: dict[str, np.ndarray] = {}
    for name, value in update.items():
        arr = np.asarray(value)
        kind = arr.dtype.kind
        if kind == "f":
            if not np.all(np.isfinite(arr)):
                raise ValueError(f"tensor {name!r} holds NaN or infinity: refusing to clip a non-finite update")
            floats[name] = arr
        elif kind not in "biu":
            raise TypeError(f"tensor {name!r} has dtype {arr.dtype}: clip_update takes float, integer or bool tensors")
        out[name] = value
    norm = _float_norm(floats) if floats else 0.0
    if norm <= bound:
        return out, norm
    factor = bound / norm
    # Rounding to float16/32 can push the norm past the bound by an ulp or so; each
    # retry shrinks by more than that, so two or three passes at most.
    for _ in range(8):
        clipped = {k: (v.astype(np.float64) * factor).astype(v.dtype) for k, v in floats.items()}
        after = _float_norm(clipped)
        if after <= bound:
            break
        factor *= (bound / after) * (1.0 - 4.0 * max(float(np.finfo(v.dtype).eps) for v in floats.values()))
    else:  # pragma: no cover - only a broken float type gets here
        raise ArithmeticError(f"could not scale the update below clip_norm {bound!r}")
    out.update(clipped)
    return out, norm


def clip_vector(vector: np.ndarray, clip_norm: float) -> tuple[np.ndarray, float]:
    """``clip_update`` for one flat float vector: the vector scaled to an L2 norm of at
    most ``clip_norm`` (the same array when already within it), and its norm before."""
    arr = np.asarray(vector)
    if arr.dtype.kind != "f":
        raise TypeError(f"clip_vector takes a floating vector, got dtype {arr.dtype}")
    clipped, norm = clip_update({"vector": arr}, clip_norm)
    return clipped["vector"], norm


# ------------------------------------------------------------------ central DP --


def _check_rng(rng: object) -> np.random.Generator:
    if not isinstance(rng, np.random.Generator):
        raise TypeError(f"rng must be a numpy.random.Generator, got {type(rng).__name__}")
    return rng


def _check_size(size: Union[int, Sequence[int]]) -> tuple[int, ...]:
    items: tuple[object, ...] = (size,) if isinstance(size, (int, np.integer)) else tuple(size)
    shape = []
    for s in items:
        if isinstance(s, bool) or not isinstance(s, (int, np.integer)) or s < 0:
            raise ValueError(f"size must be a non-negative integer or a tuple of them, got {size!r}")
        shape.append(int(s))
    return tuple(shape)


def gaussian_noise(size: Union[int, Sequence[int]], std: float, rng: np.random.Generator) -> np.ndarray:
    """float64 samples of N(0, std^2), independent per coordinate; ``std`` >= 0 and
    finite (0 gives zeros, for runs that switch noise off)."""
    shape = _check_size(size)
    if isinstance(std, bool) or not isinstance(std, numbers.Real) or not (math.isfinite(std) and std >= 0):
        raise ValueError(f"std must be finite and >= 0, got {std!r}")
    gen = _check_rng(rng)
    if std == 0:
        return np.zeros(shape, dtype=np.float64)
    return gen.normal(0.0, float(std), size=shape)


def add_central_noise(
    sum_vector: np.ndarray, noise_multiplier: float, clip_norm: float, rng: np.random.Generator
) -> np.ndarray:
    """The sum of a round's clipped updates plus N(0, (noise_multiplier * clip_norm)^2)
    per coordinate, as a new array of the sum's float dtype (the noise is drawn and
    added in float64).

    Noise goes on the *sum*, whose L2 sensitivity to one client is ``clip_norm`` (each
    update clipped with ``clip_update``); divide afterwards with ``noisy_mean``. The
    accountant's ``noise_multiplier`` is this one."""
    arr = np.asarray(sum_vector)
    if arr.dtype.kind != "f":
        raise TypeError(f"sum_vector must be floating, got dtype {arr.dtype}")
    if not np.all(np.isfinite(arr)):
        raise ValueError("sum_vector holds NaN or infinity")
    z = _positive_finite("noise_multiplier", noise_multiplier)
    c = _positive_finite("clip_norm", clip_norm)
    noise = gaussian_noise(arr.shape, z * c, rng)
    return (arr.astype(np.float64) + noise).astype(arr.dtype)


def noisy_mean(noisy_sum: np.ndarray, expected_clients: float) -> np.ndarray:
    """DP-FedAvg's mean: the noisy sum divided by the *expected* number of clients per
    round (q times the population), a constant fixed before the run.

    Dividing by the number of updates that actually arrived would leak it (it changes
    by one when one client is added or removed) and would make the sensitivity of the
    mean depend on the round; McMahan et al. 2018 use this fixed-denominator estimator
    for that reason. Its expectation is the true mean; its variance is higher when far
    fewer clients than expected arrive."""
    m = _positive_finite("expected_clients", expected_clients)
    arr = np.asarray(noisy_sum)
    if arr.dtype.kind != "f":
        raise TypeError(f"noisy_sum must be floating, got dtype {arr.dtype}")
    return arr / np.asarray(m, dtype=arr.dtype)


# ----------------------------------------------------------- distributed Skellam --


def skellam_noise(size: Union[int, Sequence[int]], mu: float, rng: np.random.Generator) -> npt.NDArray[np.int64]:
    """int64 samples of the symmetric Skellam distribution of variance ``mu``:
    Poisson(mu / 2) - Poisson(mu / 2), independent per coordinate.

    This is the paper's Sk_mu (Agarwal, Kairouz, Liu 2021, Sec. 3): mean 0, variance
    mu, P(k) = exp(-mu) I_k(mu) with I_k the modified Bessel function of the first
    kind. The sum of independent Skellams of variances mu_1 .. mu_n is Skellam of
    variance mu_1 + ... + mu_n (Poisson variables add), so n clients each calling this
    with ``mu / n`` put exactly Sk_mu into the secure sum. ``mu`` = 0 gives zeros."""
    shape = _check_size(size)
    if isinstance(mu, bool) or not isinstance(mu, numbers.Real) or not (0 <= mu <= _MAX_SKELLAM_MU):
        raise ValueError(f"mu must be in [0, 2**60] (the variance per coordinate), got {mu!r}")
    gen = _check_rng(rng)
    if mu == 0:
        return np.zeros(shape, dtype=np.int64)
    lam = float(mu) / 2.0
    plus = gen.poisson(lam, size=shape).astype(np.int64, copy=False)
    return plus - gen.poisson(lam, size=shape).astype(np.int64, copy=False)


def skellam_rdp(
    orders: Sequence[int], mu: float, l2_sensitivity: float, l1_sensitivity: Optional[float] = None
) -> npt.NDArray[np.float64]:
    """Renyi DP of one release of the multi-dimensional Skellam mechanism, at each
    integer order alpha > 1 (Agarwal, Kairouz, Liu 2021, Sec. 3: the Renyi DP of the
    multi-dimensional Skellam mechanism, Theorem 3.5 of arXiv:2110.04995v2; one later
    implementation cites it as Corollary 3.6). The formula is the authors' own
    accounting code's (google-research/federated, distributed_dp/accounting_utils.py),
    written in code units, and the tests check it against the exact divergence:

        eps(alpha) = alpha D2^2 / (2 mu)
                     + min( ((2 alpha - 1) D2^2 + 6 D1) / (4 mu^2),  3 D1 / (2 mu) )

    for integer vectors released with Sk_mu noise added to every coordinate (variance
    ``mu``, see ``skellam_noise``), where neighbouring inputs differ by an integer
    vector of L2 norm at most D2 = ``l2_sensitivity`` and L1 norm at most D1 =
    ``l1_sensitivity``, both in code units (after scaling and rounding; see
    ``code_sensitivity``). The first term is the Gaussian mechanism's RDP at the same
    variance; the rest is what discreteness costs, and vanishes as mu grows.

    ``l1_sensitivity`` defaults to D2^2, which bounds the L1 norm of every integer
    vector of L2 norm D2 (each nonzero integer coordinate has |x| <= x^2). The theorem
    holds for integer orders only, so others are refused."""
    m = _positive_finite("mu", mu)
    d2 = _positive_finite("l2_sensitivity", l2_sensitivity)
    d1 = d2 * d2 if l1_sensitivity is None else _positive_finite("l1_sensitivity", l1_sensitivity)
    alphas = np.asarray(orders, dtype=np.float64)
    if alphas.ndim != 1 or alphas.size == 0:
        raise ValueError("orders must be a non-empty sequence of integers > 1")
    if np.any(alphas != np.round(alphas)) or np.any(alphas <= 1):
        raise ValueError(f"the Skellam bound holds for integer orders > 1 only, got {list(orders)!r}")
    gaussian = alphas * d2 * d2 / (2.0 * m)
    discrete = np.minimum(((2.0 * alphas - 1.0) * d2 * d2 + 6.0 * d1) / (4.0 * m * m), 3.0 * d1 / (2.0 * m))
    return gaussian + discrete


def code_sensitivity(clip_norm: float, scale: float, dim: int) -> tuple[float, float]:
    """(L2, L1) bounds, in code units, on one client's integer codes.

    The codes are the clipped update (L2 norm <= ``clip_norm``, after any orthogonal
    rotation, which keeps norms) times ``scale`` codes per unit, each of its ``dim``
    coordinates rounded to one of its two neighbouring integers (stochastic rounding,
    or any other rule that moves a coordinate by less than 1). Rounding moves the
    vector by less than sqrt(dim), so L2 <= scale * clip_norm + sqrt(dim); the L1 norm
    of an integer vector is at most sqrt(dim) * L2 (Cauchy-Schwarz) and at most L2^2.

    The sqrt(dim) term is why a codec needs a large scale: it must dominate
    scale * clip_norm, or most of the noise pays for rounding. A codec that enforces a
    tighter bound on its codes (rejecting roundings above a norm, as the distributed
    discrete Gaussian's conditional rounding does) passes that bound instead."""
    c = _positive_finite("clip_norm", clip_norm)
    s = _positive_finite("scale", scale)
    if isinstance(dim, bool) or not isinstance(dim, numbers.Integral) or dim < 1:
        raise ValueError(f"dim must be an integer >= 1, got {dim!r}")
    l2 = s * c + math.sqrt(int(dim))
    return l2, min(math.sqrt(int(dim)) * l2, l2 * l2)


def skellam_client_mu(noise_multiplier: float, l2_sensitivity: float, num_clients: int) -> float:
    """Each client's Skellam variance, so that ``num_clients`` shares sum to variance
    (noise_multiplier * l2_sensitivity)^2: the noise multiplier is the summed noise's
    standard deviation over the L2 sensitivity, as for the Gaussian."""
    z = _positive_finite("noise_multiplier", noise_multiplier)
    d2 = _positive_finite("l2_sensitivity", l2_sensitivity)
    if isinstance(num_clients, bool) or not isinstance(num_clients, numbers.Integral) or num_clients < 1:
        raise ValueError(f"num_clients must be an integer >= 1, got {num_clients!r}")
    return (z * d2) ** 2 / int(num_clients)


@dataclass(frozen=True)
class SkellamParams:
    """Everything a codec and an accountant need for one distributed Skellam setup
    (made by ``skellam_params``); sensitivities and variances are in code units."""

    clip_norm: float
    scale: float
    dim: int
    num_clients: int
    noise_multiplier: float
    #: L2 and L1 bounds on one client's codes (``code_sensitivity``).
    l2_sensitivity: float
    l1_sensitivity: float
    #: Variance per coordinate of the summed noise: (noise_multiplier * l2_sensitivity)^2.
    central_mu: float
    #: Each client's share: ``skellam_noise(dim, client_mu, rng)`` added to its codes.
    client_mu: float

    @property
    def noise_std(self) -> float:
        """Standard deviation per coordinate of the summed noise, in update units
        (sqrt(central_mu) / scale): what the decoded sum carries."""
        return math.sqrt(self.central_mu) / self.scale

    def accountant(self, sampling_rate: float = 1.0, delta: float = 1e-5) -> PrivacyAccountant:
        """A ``PrivacyAccountant`` for these parameters (``mechanism="skellam"``)."""
        return PrivacyAccountant(
            self.noise_multiplier,
            sampling_rate,
            delta,
            mechanism="skellam",
            l2_sensitivity=self.l2_sensitivity,
            l1_sensitivity=self.l1_sensitivity,
        )


def skellam_params(
    clip_norm: float, scale: float, dim: int, num_clients: int, noise_multiplier: float
) -> SkellamParams:
    """The Skellam parameters of a round: clients clip to ``clip_norm``, multiply by
    ``scale`` codes per unit, round ``dim`` coordinates to integers (``code_sensitivity``)
    and add ``skellam_noise(dim, client_mu, rng)`` before secure aggregation.

    ``num_clients`` is the number of clients whose noise shares are sure to reach the
    sum: count only those trusted to add their share and expected to survive dropout.
    Fewer shares than that leave less noise than the accounting assumes; more only
    add noise. The guarantee is for zero-out neighbours: one client's codes replaced
    by zeros while its noise share is still added (see ``PrivacyAccountant``).

    The codec must also choose a bit width whose modular sum does not wrap: the
    summed codes reach about num_clients * scale * clip_norm / sqrt(dim) per
    coordinate after a flattening rotation, plus a few times sqrt(central_mu) of
    noise; a wrap costs accuracy, not privacy."""
    l2, l1 = code_sensitivity(clip_norm, scale, dim)
    client_mu = skellam_client_mu(noise_multiplier, l2, num_clients)
    return SkellamParams(
        clip_norm=float(clip_norm),
        scale=float(scale),
        dim=int(dim),
        num_clients=int(num_clients),
        noise_multiplier=float(noise_multiplier),
        l2_sensitivity=l2,
        l1_sensitivity=l1,
        central_mu=client_mu * int(num_clients),
        client_mu=client_mu,
    )


# ------------------------------------------------------------------- accounting --


def _dp_accounting() -> ModuleType:
    """Google's dp_accounting, imported on first use (an optional dependency)."""
    try:
        # importlib keeps the optional, untyped library out of mypy's import graph:
        # attributes of the module are Any whether or not it is installed.
        return importlib.import_module("dp_accounting")
    except ImportError as exc:
        raise ImportError(
            "the privacy accountant needs Google's dp-accounting library: pip install 'fedpress[privacy]'"
        ) from exc


def _check_probability(name: str, value: object, *, closed_top: bool) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a real number, got {type(value).__name__}")
    x = float(value)
    ok = 0.0 < x <= 1.0 if closed_top else 0.0 < x < 1.0
    if not ok:
        interval = "(0, 1]" if closed_top else "(0, 1)"
        raise ValueError(f"{name} must be in {interval}, got {value!r}")
    return x


def _check_rounds(rounds: object) -> int:
    if isinstance(rounds, bool) or not isinstance(rounds, numbers.Integral) or rounds < 0:
        raise ValueError(f"rounds must be an integer >= 0, got {rounds!r}")
    return int(rounds)


class PrivacyAccountant:
    """The (epsilon, delta) a run of private rounds has spent, for one client.

    ``mechanism="gaussian"`` (DP-FedAvg, central noise): each round samples every
    client independently with probability ``sampling_rate`` q (Poisson sampling), sums
    their updates clipped to C and adds N(0, (z C)^2) per coordinate, z =
    ``noise_multiplier``. Neighbouring runs differ by adding or removing one client's
    data. A round is ``dp_accounting``'s ``PoissonSampledDpEvent(q, GaussianDpEvent(z))``
    and ``rounds`` of them its ``SelfComposedDpEvent``: with ``accountant="rdp"`` the
    Renyi DP accountant (the sampled Gaussian's RDP of Mironov, Talwar, Zhang 2019,
    composed over rounds and converted with the bound of Canonne, Kamath, Steinke 2020,
    Prop. 12), with ``"pld"`` the privacy loss distribution accountant, tighter but
    slower (each new round count composes anew, about a second at 10^4 rounds).

    ``mechanism="skellam"`` (distributed noise on integer codes, see
    ``skellam_params``): each round the secure sum of the participants' codes carries
    Skellam noise of variance mu = (z * D2)^2 per coordinate, where D2 =
    ``l2_sensitivity`` and D1 = ``l1_sensitivity`` (default D2^2) bound one client's
    codes in code units. Each round's RDP is the paper's bound (``skellam_rdp``) at
    the integer orders ``SKELLAM_ORDERS``, rounds compose by adding RDP (Mironov 2017,
    Prop. 1), and the total is converted to (epsilon, delta) by ``dp_accounting``'s
    ``compute_epsilon`` (the same conversion as above). Neighbouring rounds differ by
    one client's codes being replaced by zeros, its noise share still added. *No*
    amplification by subsampling is claimed: the paper proves no subsampled bound, so
    every round counts in full whatever ``sampling_rate`` is (it is kept for the log;
    ``to_dict()`` says ``"amplification": false``). The bound exceeds the Gaussian's
    at every order and approaches it as mu grows.

    Use: ``acc.step()`` once per round that ran, then read ``acc.epsilon``;
    ``to_dict()`` is a JSON log line."""

    def __init__(
        self,
        noise_multiplier: float,
        sampling_rate: float,
        delta: float = 1e-5,
        mechanism: str = "gaussian",
        *,
        accountant: str = "rdp",
        l2_sensitivity: Optional[float] = None,
        l1_sensitivity: Optional[float] = None,
        orders: Optional[Sequence[float]] = None,
    ) -> None:
        self._z = _positive_finite("noise_multiplier", noise_multiplier)
        self._q = _check_probability("sampling_rate", sampling_rate, closed_top=True)
        self._delta = _check_probability("delta", delta, closed_top=False)
        if mechanism not in MECHANISMS:
            raise ValueError(f"unknown mechanism {mechanism!r}: use one of {', '.join(MECHANISMS)}")
        if accountant not in ACCOUNTANTS:
            raise ValueError(f"unknown accountant {accountant!r}: use one of {', '.join(ACCOUNTANTS)}")
        self._mechanism = mechanism
        self._accountant = accountant
        self._l2: Optional[float] = None
        self._l1: Optional[float] = None
        if mechanism == "skellam":
            if accountant != "rdp":
                raise ValueError("the Skellam mechanism is accounted in Renyi DP: use accountant='rdp'")
            if l2_sensitivity is None:
                raise ValueError("mechanism='skellam' needs l2_sensitivity, the L2 bound of one client's codes")
            self._l2 = _positive_finite("l2_sensitivity", l2_sensitivity)
            self._l1 = self._l2**2 if l1_sensitivity is None else _positive_finite("l1_sensitivity", l1_sensitivity)
        elif l2_sensitivity is not None or l1_sensitivity is not None:
            raise ValueError("l2_sensitivity and l1_sensitivity belong to mechanism='skellam' (the Gaussian's is C)")
        if orders is not None and accountant == "pld":
            raise ValueError("orders are RDP orders: they do not apply to accountant='pld'")
        self._dpa = _dp_accounting()
        self._rounds = 0
        self._epsilons: dict[int, float] = {}
        self._orders: Optional[np.ndarray] = None
        self._rdp_round: Optional[np.ndarray] = None
        if accountant == "rdp":
            self._orders, self._rdp_round = self._round_rdp(orders)

    # The RDP of one round at each order: rounds compose by adding RDP, so the total
    # after n rounds is n times this curve, exactly what RdpAccountant computes for a
    # SelfComposedDpEvent(event, n), computed once here instead of once per epsilon.
    def _round_rdp(self, orders: Optional[Sequence[float]]) -> tuple[np.ndarray, np.ndarray]:
        if self._mechanism == "skellam":
            alphas = np.asarray(SKELLAM_ORDERS if orders is None else orders, dtype=np.float64)
            assert self._l2 is not None and self._l1 is not None
            mu = (self._z * self._l2) ** 2
            return alphas, skellam_rdp(alphas.tolist(), mu, self._l2, self._l1)
        rdp_accountant = self._dpa.rdp.RdpAccountant(orders=None if orders is None else list(orders))
        rdp_accountant.compose(self._event(1))
        return np.asarray(rdp_accountant.orders, dtype=np.float64), np.asarray(rdp_accountant.rdp, dtype=np.float64)

    def _event(self, rounds: int) -> Any:
        dpa = self._dpa
        one = dpa.PoissonSampledDpEvent(self._q, dpa.GaussianDpEvent(self._z))
        return one if rounds == 1 else dpa.SelfComposedDpEvent(one, rounds)

    def _epsilon_after(self, rounds: int) -> float:
        if rounds == 0:
            return 0.0
        cached = self._epsilons.get(rounds)
        if cached is not None:
            return cached
        if self._accountant == "rdp":
            assert self._orders is not None and self._rdp_round is not None
            eps, _ = self._dpa.rdp.compute_epsilon(self._orders, rounds * self._rdp_round, self._delta)
        else:
            pld = self._dpa.pld.PLDAccountant()
            pld.compose(self._event(rounds))
            eps = pld.get_epsilon(self._delta)
        value = float(eps)
        self._epsilons[rounds] = value
        return value

    def step(self, rounds: int = 1) -> float:
        """Record ``rounds`` more rounds (each one release of a noisy sum) and return
        the total epsilon so far."""
        self._rounds += _check_rounds(rounds)
        return self.epsilon

    @property
    def epsilon(self) -> float:
        """Total epsilon, at ``delta``, of every round recorded so far (0 before any)."""
        return self._epsilon_after(self._rounds)

    @property
    def epsilon_per_round(self) -> float:
        """Epsilon, at ``delta``, of one round alone."""
        return self._epsilon_after(1)

    def epsilon_after(self, rounds: int) -> float:
        """Epsilon, at ``delta``, that ``rounds`` rounds in all would spend: for
        planning a run before it starts; does not record them."""
        return self._epsilon_after(_check_rounds(rounds))

    def rdp_curve(self) -> tuple[npt.NDArray[np.float64], npt.NDArray[np.float64]]:
        """(orders, RDP of every round so far at each order): the Renyi curve behind
        ``epsilon``, for a conversion of one's own or for comparing with another tool."""
        if self._orders is None or self._rdp_round is None:
            raise ValueError("accountant='pld' has no RDP curve")
        return self._orders.copy(), self._rounds * self._rdp_round

    @property
    def rounds(self) -> int:
        return self._rounds

    @property
    def noise_multiplier(self) -> float:
        return self._z

    @property
    def sampling_rate(self) -> float:
        return self._q

    @property
    def delta(self) -> float:
        return self._delta

    @property
    def mechanism(self) -> str:
        return self._mechanism

    @property
    def accountant(self) -> str:
        return self._accountant

    def to_dict(self) -> dict[str, Any]:
        """The state as JSON-ready values, for a log line."""
        row: dict[str, Any] = {
            "mechanism": self._mechanism,
            "accountant": f"dp_accounting.{self._accountant}",
            "noise_multiplier": self._z,
            "sampling_rate": self._q,
            "amplification": self._mechanism == "gaussian",
            "delta": self._delta,
            "rounds": self._rounds,
            "epsilon": self.epsilon,
        }
        if self._mechanism == "skellam":
            row["l2_sensitivity"] = self._l2
            row["l1_sensitivity"] = self._l1
        return row

    def __repr__(self) -> str:
        return (
            f"PrivacyAccountant(noise_multiplier={self._z!r}, sampling_rate={self._q!r}, delta={self._delta!r}, "
            f"mechanism={self._mechanism!r}, accountant={self._accountant!r}, rounds={self._rounds})"
        )


def noise_multiplier_for_epsilon(
    target_epsilon: float,
    rounds: int,
    sampling_rate: float,
    delta: float = 1e-5,
    mechanism: str = "gaussian",
    *,
    accountant: str = "rdp",
    l2_sensitivity: Optional[float] = None,
    l1_sensitivity: Optional[float] = None,
    orders: Optional[Sequence[float]] = None,
    rtol: float = 1e-3,
) -> float:
    """The noise multiplier z at which ``rounds`` rounds spend at most
    ``target_epsilon`` (at ``delta``), as ``PrivacyAccountant`` with the same arguments
    counts them.

    A bisection in log z, valid because epsilon falls as z grows for both mechanisms.
    The answer z meets the target (its epsilon is <= ``target_epsilon``) and is within a
    factor 1 + ``rtol`` of the smallest z that does: z / (1 + rtol) misses it. The search
    spans z in [0.01, 1e4]; a target that z = 1e4 cannot meet, or that z = 0.01 already
    meets, is refused with ValueError."""
    target = _positive_finite("target_epsilon", target_epsilon)
    n = _check_rounds(rounds)
    if n < 1:
        raise ValueError("rounds must be >= 1: no round spends no epsilon")
    tol = _positive_finite("rtol", rtol)

    def epsilon(z: float) -> float:
        acc = PrivacyAccountant(
            z,
            sampling_rate,
            delta,
            mechanism,
            accountant=accountant,
            l2_sensitivity=l2_sensitivity,
            l1_sensitivity=l1_sensitivity,
            orders=orders,
        )
        return acc.epsilon_after(n)

    # Bracket by doubling from z = 1 (where practical runs live), clamped to the range.
    if epsilon(1.0) <= target:
        hi, lo = 1.0, 0.5
        while epsilon(lo) <= target:
            if lo <= _Z_MIN:
                raise ValueError(
                    f"target_epsilon {target!r} is met by every noise multiplier down to {_Z_MIN:g}: "
                    "the search goes no lower (check rounds, sampling_rate and delta)"
                )
            hi, lo = lo, max(lo / 2.0, _Z_MIN)
    else:
        lo, hi = 1.0, 2.0
        while epsilon(hi) > target:
            if hi >= _Z_MAX:
                raise ValueError(
                    f"target_epsilon {target!r} is unreachable: even noise multiplier {_Z_MAX:g} spends more "
                    f"over {n} rounds"
                )
            lo, hi = hi, min(hi * 2.0, _Z_MAX)
    # Invariant: epsilon(lo) > target >= epsilon(hi).
    while hi / lo > 1.0 + tol:
        mid = math.sqrt(lo * hi)
        if epsilon(mid) <= target:
            hi = mid
        else:
            lo = mid
    return hi
