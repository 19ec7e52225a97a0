"""fedpress.privacy: clipping, central Gaussian noise, distributed Skellam noise and
the privacy accountant, against published figures and reference computations."""

from __future__ import annotations

import json
import math
import subprocess
import sys

import numpy as np
import pytest
from fedpress import privacy
from fedpress.privacy import (
    PrivacyAccountant,
    add_central_noise,
    clip_update,
    clip_vector,
    code_sensitivity,
    gaussian_noise,
    noise_multiplier_for_epsilon,
    noisy_mean,
    skellam_noise,
    skellam_params,
    skellam_rdp,
)
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp
from scipy import stats
from scipy.special import ive, logsumexp


def _norm(tensors) -> float:
    """float64 reference L2 norm over a list of arrays."""
    return math.sqrt(sum(float(np.sum(np.asarray(t, dtype=np.float64) ** 2)) for t in tensors))


@pytest.fixture
def dp_accounting():
    return pytest.importorskip("dp_accounting")


# --------------------------------------------------------------------- clipping --


@pytest.mark.parametrize("dtype", [np.float16, np.float32, np.float64])
@pytest.mark.parametrize("clip", [0.5, 3.0, 1e6])
def test_clip_gives_min_of_norm_and_bound_and_keeps_the_direction(dtype, clip):
    rng = np.random.default_rng(7)
    update = {"w": rng.normal(size=(40, 30)).astype(dtype), "b": rng.normal(size=30).astype(dtype)}
    before = _norm(update.values())
    clipped, norm = clip_update(update, clip)
    assert norm == pytest.approx(before, rel=1e-12)
    after = _norm(clipped.values())
    assert after <= clip  # never above the bound, whatever the dtype's rounding
    eps = float(np.finfo(dtype).eps)
    assert after == pytest.approx(min(before, clip), rel=8 * eps)
    factor = min(1.0, clip / before)
    for name, value in update.items():
        assert clipped[name].dtype == value.dtype and clipped[name].shape == value.shape
        reference = value.astype(np.float64) * factor
        np.testing.assert_allclose(clipped[name].astype(np.float64), reference, rtol=8 * eps, atol=1e-30)


def test_clip_below_the_bound_returns_the_same_arrays():
    update = {"w": np.array([3.0, 4.0], dtype=np.float32), "n": np.array([7], dtype=np.int64)}
    clipped, norm = clip_update(update, 5.0)
    assert norm == 5.0
    assert clipped["w"] is update["w"] and clipped["n"] is update["n"]
    vector, vnorm = clip_vector(update["w"], 10.0)
    assert vector is update["w"] and vnorm == 5.0


def test_clip_passes_integer_and_bool_tensors_through_and_leaves_them_out_of_the_norm():
    steps = np.array([123456789], dtype=np.int64)
    mask = np.array([True, False, True])
    counts = np.arange(10, dtype=np.uint8)
    update = {"w": np.full(4, 2.0, dtype=np.float32), "steps": steps, "mask": mask, "counts": counts}
    clipped, norm = clip_update(update, 1.0)
    assert norm == pytest.approx(4.0)  # the float tensor's alone: ||(2,2,2,2)|| = 4
    assert clipped["steps"] is steps and clipped["mask"] is mask and clipped["counts"] is counts
    assert _norm([clipped["w"]]) == pytest.approx(1.0, rel=1e-6)


def test_clip_of_an_update_without_float_tensors_is_the_update():
    update = {"n": np.array([1, 2], dtype=np.int32)}
    clipped, norm = clip_update(update, 1.0)
    assert norm == 0.0 and clipped["n"] is update["n"]


def test_clip_handles_norms_beyond_the_float64_square_range():
    big = np.full(100, 1e200)  # finite, but its squares overflow float64
    clipped, norm = clip_update({"w": big}, 2.0)
    assert norm == pytest.approx(1e201, rel=1e-12)
    np.testing.assert_allclose(clipped["w"], np.full(100, 0.2), rtol=1e-12)


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_clip_refuses_non_finite_updates_naming_the_tensor(bad):
    update = {"ok": np.ones(3, dtype=np.float32), "layer.weight": np.array([1.0, bad], dtype=np.float32)}
    with pytest.raises(ValueError, match=r"'layer\.weight' holds NaN or infinity"):
        clip_update(update, 1.0)
    with pytest.raises(ValueError, match="NaN or infinity"):
        clip_vector(np.array([bad]), 1.0)


@pytest.mark.parametrize("clip", [0.0, -1.0, math.nan, math.inf])
def test_clip_refuses_a_bound_that_is_not_positive_and_finite(clip):
    with pytest.raises(ValueError, match="clip_norm must be finite and > 0"):
        clip_update({"w": np.ones(2)}, clip)


def test_clip_refuses_other_types():
    with pytest.raises(TypeError, match="clip_norm must be a real number"):
        clip_update({"w": np.ones(2)}, "1.0")  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="clip_norm must be a real number"):
        clip_update({"w": np.ones(2)}, True)
    with pytest.raises(TypeError, match="'z' has dtype complex128"):
        clip_update({"z": np.ones(2, dtype=np.complex128)}, 1.0)
    with pytest.raises(TypeError, match="floating vector"):
        clip_vector(np.arange(3), 1.0)


@settings(deadline=None)
@given(
    hnp.arrays(
        np.float32,
        st.integers(1, 200),
        elements=st.floats(-1e6, 1e6, width=32, allow_subnormal=False),
    ),
    st.floats(1e-3, 1e3),
)
def test_clip_vector_property(vector, clip):
    clipped, norm = clip_vector(vector, clip)
    before = _norm([vector])
    assert norm == pytest.approx(before, rel=1e-9, abs=1e-30)
    after = _norm([clipped])
    assert after <= clip
    if before > clip:
        assert after == pytest.approx(clip, rel=1e-5)
        np.testing.assert_allclose(clipped, vector.astype(np.float64) * (clip / before), rtol=1e-6, atol=1e-38)
    else:
        assert clipped is vector


# ------------------------------------------------------------------ central DP --


def test_gaussian_noise_has_the_requested_mean_and_variance():
    n, std = 200_000, 2.5
    noise = gaussian_noise(n, std, np.random.default_rng(11))
    assert noise.dtype == np.float64 and noise.shape == (n,)
    # Five standard errors: the mean's is std / sqrt(n), the variance's 2 std^4 / n.
    assert abs(noise.mean()) < 5 * std / math.sqrt(n)
    assert abs(noise.var() / std**2 - 1) < 5 * math.sqrt(2 / n)
    assert not gaussian_noise((3, 2), 0.0, np.random.default_rng(0)).any()


def test_add_central_noise_adds_z_times_c_to_the_sum_in_its_dtype():
    total = np.linspace(-1, 1, 100_000, dtype=np.float32)
    z, c = 1.3, 0.7
    noisy = add_central_noise(total, z, c, np.random.default_rng(3))
    assert noisy.dtype == np.float32 and noisy is not total
    noise = noisy.astype(np.float64) - total
    assert abs(noise.std() / (z * c) - 1) < 5 * math.sqrt(1 / (2 * total.size))
    again = add_central_noise(total, z, c, np.random.default_rng(3))
    np.testing.assert_array_equal(noisy, again)  # the generator is the only source


def test_central_noise_refuses_nonsense():
    rng = np.random.default_rng(0)
    with pytest.raises(ValueError, match="noise_multiplier must be finite and > 0"):
        add_central_noise(np.zeros(3), 0.0, 1.0, rng)
    with pytest.raises(ValueError, match="clip_norm"):
        add_central_noise(np.zeros(3), 1.0, -1.0, rng)
    with pytest.raises(ValueError, match="NaN or infinity"):
        add_central_noise(np.array([np.nan]), 1.0, 1.0, rng)
    with pytest.raises(TypeError, match="floating"):
        add_central_noise(np.zeros(3, dtype=np.int64), 1.0, 1.0, rng)
    with pytest.raises(ValueError, match="std must be finite and >= 0"):
        gaussian_noise(3, -1.0, rng)
    with pytest.raises(ValueError, match="size must be"):
        gaussian_noise(-2, 1.0, rng)
    with pytest.raises(TypeError, match="numpy.random.Generator"):
        gaussian_noise(3, 1.0, np.random.RandomState(0))  # type: ignore[arg-type]


def test_noisy_mean_divides_by_the_fixed_expected_count():
    total = np.array([10.0, -20.0], dtype=np.float32)
    mean = noisy_mean(total, 40)
    np.testing.assert_array_equal(mean, np.array([0.25, -0.5], dtype=np.float32))
    assert mean.dtype == np.float32
    with pytest.raises(ValueError, match="expected_clients"):
        noisy_mean(total, 0)


# ----------------------------------------------------------- distributed Skellam --


def _skellam_gof(samples: np.ndarray, mu: float) -> float:
    """p-value of a chi-square test of integer samples against Sk_mu = Poisson(mu/2) -
    Poisson(mu/2) (scipy.stats.skellam), tails pooled into two cells."""
    dist = stats.skellam(mu / 2, mu / 2)
    lo, hi = (int(v) for v in dist.ppf([0.001, 0.999]))
    inner = np.arange(lo + 1, hi)
    observed = np.concatenate(
        [[np.sum(samples <= lo)], np.array([np.sum(samples == k) for k in inner]), [np.sum(samples >= hi)]]
    )
    probs = np.concatenate([[dist.cdf(lo)], dist.pmf(inner), [dist.sf(hi - 1)]])
    expected = probs / probs.sum() * samples.size
    return float(stats.chisquare(observed, expected).pvalue)


@pytest.mark.parametrize("mu", [0.6, 8.0, 300.0])
def test_skellam_noise_has_mean_zero_variance_mu_and_the_skellam_law(mu):
    n = 200_000
    noise = skellam_noise(n, mu, np.random.default_rng(2021))
    assert noise.dtype == np.int64 and noise.shape == (n,)
    # Standard errors: the mean's sqrt(mu / n); the sample variance's
    # sqrt((kappa4 + 2 mu^2) / n), the fourth cumulant of Sk_mu being mu.
    assert abs(noise.mean()) < 5 * math.sqrt(mu / n)
    assert abs(noise.var() - mu) < 5 * math.sqrt((mu + 2 * mu**2) / n)
    # The whole law, not only two moments: a wrong split (Poisson(mu) - Poisson(mu), say)
    # fails here at once.
    assert _skellam_gof(noise, mu) > 1e-4


def test_skellam_noise_of_n_clients_sums_to_the_central_variance():
    params = skellam_params(clip_norm=1.0, scale=4.0, dim=16, num_clients=25, noise_multiplier=0.3)
    assert params.central_mu == pytest.approx((0.3 * params.l2_sensitivity) ** 2)
    assert params.client_mu * params.num_clients == pytest.approx(params.central_mu)
    rng = np.random.default_rng(5)
    coords = 40_000
    total = np.zeros(coords, dtype=np.int64)
    for _ in range(params.num_clients):
        total += skellam_noise(coords, params.client_mu, rng)
    mu = params.central_mu
    assert abs(total.var() - mu) < 5 * math.sqrt((mu + 2 * mu**2) / coords)
    assert _skellam_gof(total, mu) > 1e-4  # closed under summation: the sum is Sk_mu itself


def test_skellam_noise_refuses_nonsense():
    rng = np.random.default_rng(0)
    assert not skellam_noise((2, 3), 0.0, rng).any()
    for bad in (-1.0, math.nan, math.inf, 2.0**61):
        with pytest.raises(ValueError, match="mu must be in"):
            skellam_noise(4, bad, rng)


def test_skellam_rdp_matches_the_papers_formula_at_hand_checked_points():
    # alpha = 2, D2 = 10, D1 = 30, mu = 1000:
    #   alpha D2^2 / (2 mu)                       = 200 / 2000        = 0.1
    #   ((2 alpha - 1) D2^2 + 6 D1) / (4 mu^2)     = (300 + 180) / 4e6 = 1.2e-4   <- the smaller
    #   3 D1 / (2 mu)                              = 90 / 2000         = 0.045
    assert skellam_rdp([2], 1000.0, 10.0, 30.0)[0] == pytest.approx(0.10012, rel=1e-12)
    # alpha = 2, D2 = D1 = 1, mu = 1: 2/2 + min((3 + 6) / 4, 3 / 2) = 1 + 1.5 (the other branch)
    assert skellam_rdp([2], 1.0, 1.0, 1.0)[0] == pytest.approx(2.5, rel=1e-12)
    # L1 defaults to D2^2: alpha = 3, D2 = 2 (D1 = 4), mu = 8:
    #   3 * 4 / 16 + min((5 * 4 + 24) / 256, 12 / 16) = 0.75 + 44 / 256
    assert skellam_rdp([3], 8.0, 2.0)[0] == pytest.approx(0.75 + 44 / 256, rel=1e-12)


def _exact_skellam_divergence(alpha: int, mu: float, shift: int) -> float:
    """D_alpha(Sk_mu + shift || Sk_mu), summed from the pmf exp(-mu) I_k(mu) = ive(|k|, mu)."""
    half_width = int(mu + 40 * math.sqrt(mu) + 60)
    k = np.arange(-half_width, half_width + 1)
    with np.errstate(divide="ignore"):
        log_q = np.log(ive(np.abs(k), mu))
        log_p = np.log(ive(np.abs(k - shift), mu))
    ok = np.isfinite(log_q) & np.isfinite(log_p)
    return float(logsumexp(alpha * log_p[ok] + (1 - alpha) * log_q[ok]) / (alpha - 1))


@pytest.mark.parametrize("mu", [2.0, 50.0, 500.0])
def test_skellam_rdp_bounds_the_exact_divergence_of_the_sampled_law(mu):
    """The bound, at the variance parametrization skellam_noise samples (checked above
    against scipy's Skellam), is above the exact Renyi divergence computed from the pmf,
    and close to it once mu is large: a bound for a different parametrization would
    fall below the exact value here."""
    for alpha in (2, 5, 10, 50):
        for shift in (1, 3):
            exact = _exact_skellam_divergence(alpha, mu, shift)
            bound = skellam_rdp([alpha], mu, float(shift), float(shift))[0]
            assert exact <= bound
            if mu >= 500 and alpha <= 10:
                assert bound <= exact * 1.01
        # Two coordinates shifted by (1, 2): divergences add; D2^2 = 5, D1 = 3.
        exact2 = _exact_skellam_divergence(alpha, mu, 1) + _exact_skellam_divergence(alpha, mu, 2)
        assert exact2 <= skellam_rdp([alpha], mu, math.sqrt(5), 3.0)[0]


def test_skellam_rdp_approaches_the_gaussians_as_mu_grows():
    orders = np.arange(2, 65)
    previous = math.inf
    for d2 in (10.0, 100.0, 1e3, 1e4):  # noise multiplier 1: mu = d2^2, D1 at its largest, d2^2
        mu = d2**2
        gaussian = orders * d2**2 / (2 * mu)
        ratio = skellam_rdp(orders.tolist(), mu, d2) / gaussian
        assert np.all(ratio >= 1)  # never below the Gaussian at the same variance
        assert ratio.max() < previous  # and closer at every step
        previous = ratio.max()
    assert previous < 1 + 1e-3


def test_skellam_rdp_refuses_non_integer_orders():
    with pytest.raises(ValueError, match="integer orders > 1"):
        skellam_rdp([1.5, 2], 10.0, 1.0)
    with pytest.raises(ValueError, match="integer orders > 1"):
        skellam_rdp([1], 10.0, 1.0)
    with pytest.raises(ValueError, match="mu must be finite and > 0"):
        skellam_rdp([2], 0.0, 1.0)


def test_code_sensitivity_bounds_stochastically_rounded_codes():
    clip, scale, dim = 1.0, 20.0, 400
    l2, l1 = code_sensitivity(clip, scale, dim)
    assert l2 == pytest.approx(scale * clip + math.sqrt(dim))
    assert l1 == pytest.approx(min(math.sqrt(dim) * l2, l2**2))
    rng = np.random.default_rng(9)
    worst_l2 = worst_l1 = 0.0
    for _ in range(200):
        x, _ = clip_vector(rng.standard_t(2, dim), clip)
        scaled = x * scale
        low = np.floor(scaled)
        codes = low + (rng.random(dim) < scaled - low)  # stochastic rounding
        worst_l2 = max(worst_l2, float(np.linalg.norm(codes)))
        worst_l1 = max(worst_l1, float(np.abs(codes).sum()))
    assert worst_l2 <= l2 and worst_l1 <= l1
    with pytest.raises(ValueError, match="dim must be an integer >= 1"):
        code_sensitivity(1.0, 1.0, 0)


def test_skellam_params_noise_std_is_in_update_units():
    params = skellam_params(clip_norm=0.5, scale=1000.0, dim=100, num_clients=10, noise_multiplier=1.2)
    assert params.noise_std == pytest.approx(1.2 * params.l2_sensitivity / 1000.0)
    with pytest.raises(ValueError, match="num_clients"):
        skellam_params(clip_norm=0.5, scale=1000.0, dim=100, num_clients=0, noise_multiplier=1.2)


# ------------------------------------------------------------------- accounting --

# TensorFlow Privacy's MNIST tutorial (tensorflow/privacy, tutorials/README.md, "Select
# Parameters" table and `compute_dp_sgd_privacy.py --N=60000 --batch_size=256
# --noise_multiplier=1.1 --epochs=60 --delta=1e-5`): (noise multiplier, epochs, eps).
_TF_PRIVACY_TABLE = [(1.1, 60, 3.01), (1.3, 15, 1.19), (0.7, 45, 7.10)]
# compute_dp_sgd_privacy's orders and its conversion of that time, eps = min over orders
# of rdp - log(delta) / (order - 1) (Mironov 2017, Prop. 3).
_TF_ORDERS = [1 + x / 10.0 for x in range(1, 100)] + list(range(12, 64)) + [128, 256, 512]


def _classic_epsilon(orders, rdp, delta) -> float:
    return float(np.min(np.asarray(rdp) - math.log(delta) / (np.asarray(orders) - 1)))


@pytest.mark.parametrize(("z", "epochs", "published"), _TF_PRIVACY_TABLE)
def test_accountant_reproduces_the_tensorflow_privacy_tutorial(dp_accounting, z, epochs, published):
    q = 256 / 60000
    steps = math.ceil(epochs * 60000 / 256)  # compute_dp_sgd_privacy's step count
    acc = PrivacyAccountant(z, q, 1e-5, orders=_TF_ORDERS)
    acc.step(steps)
    # The same RDP curve with the same conversion gives the published figure to its digits.
    orders, rdp = acc.rdp_curve()
    assert round(_classic_epsilon(orders, rdp, 1e-5), 2) == published
    # Our epsilon uses the tighter conversion (Canonne, Kamath, Steinke 2020), which
    # saves 10-20% here: never more than published, never far below.
    assert 0.75 * published <= acc.epsilon <= 0.95 * _classic_epsilon(orders, rdp, 1e-5)


def test_accountant_reproduces_abadi_et_al_2016(dp_accounting):
    # Abadi et al., "Deep Learning with Differential Privacy" (CCS 2016), Sec. 3.1: q = 0.01,
    # sigma = 4, delta = 1e-5, T = 10000 steps gives eps ~ 1.26 with the moments accountant,
    # whose log moments are RDP at integer orders (lambda = order - 1 <= 32 in the paper).
    orders = list(range(2, 34))
    acc = PrivacyAccountant(4.0, 0.01, 1e-5, orders=orders)
    acc.step(10_000)
    assert round(_classic_epsilon(*acc.rdp_curve(), 1e-5), 2) == 1.26
    assert 0.75 * 1.26 <= PrivacyAccountant(4.0, 0.01, 1e-5).epsilon_after(10_000) <= 1.26


def test_accountant_reproduces_dp_accountings_documented_gaussian(dp_accounting):
    # dp_accounting's rdp_privacy_accountant_test: noise multiplier 4.530877117 without
    # sampling "is chosen to obtain exactly (1, 1e-6)-DP" over orders 1.001 .. 99.999.
    orders = [0.001 * i for i in range(1001, 100000)]
    acc = PrivacyAccountant(4.530877117, 1.0, 1e-6, orders=orders)
    assert acc.step() == pytest.approx(1.0, abs=1e-6)


def test_pld_accountant_matches_the_analytic_gaussian(dp_accounting):
    # One unsampled Gaussian release: its exact privacy curve is Balle & Wang (ICML 2018),
    # Theorem 8: delta(eps) = Phi(1/(2z) - eps z) - e^eps Phi(-1/(2z) - eps z).
    z, delta = 2.0, 1e-6

    def exact_delta(eps: float) -> float:
        return float(stats.norm.cdf(1 / (2 * z) - eps * z) - math.exp(eps) * stats.norm.cdf(-1 / (2 * z) - eps * z))

    eps_pld = PrivacyAccountant(z, 1.0, delta, accountant="pld").step()
    assert exact_delta(eps_pld) <= delta * 1.001  # an upper bound ...
    assert exact_delta(eps_pld - 0.01) > delta  # ... and a tight one
    eps_rdp = PrivacyAccountant(z, 1.0, delta).step()
    assert eps_pld < eps_rdp  # RDP's conversion loses a little


def test_pld_is_tighter_than_rdp_for_sampled_rounds(dp_accounting):
    rdp = PrivacyAccountant(1.1, 0.01, accountant="rdp")
    pld = PrivacyAccountant(1.1, 0.01, accountant="pld")
    rdp.step(500)
    pld.step(500)
    assert 0.7 * rdp.epsilon < pld.epsilon < rdp.epsilon


def test_rdp_shortcut_equals_dp_accountings_self_composition(dp_accounting):
    acc = PrivacyAccountant(0.9, 0.02)
    acc.step(1234)
    direct = dp_accounting.rdp.RdpAccountant()
    direct.compose(
        dp_accounting.SelfComposedDpEvent(
            dp_accounting.PoissonSampledDpEvent(0.02, dp_accounting.GaussianDpEvent(0.9)), 1234
        )
    )
    orders, rdp = acc.rdp_curve()
    np.testing.assert_array_equal(orders, direct.orders)
    np.testing.assert_allclose(rdp, direct.rdp, rtol=1e-12)
    assert acc.epsilon == pytest.approx(direct.get_epsilon(1e-5), rel=1e-12)


@pytest.mark.parametrize("mechanism", ["gaussian", "skellam"])
def test_epsilon_grows_with_rounds_and_falls_with_noise(dp_accounting, mechanism):
    extra = {"l2_sensitivity": 50.0} if mechanism == "skellam" else {}
    acc = PrivacyAccountant(1.0, 0.05, mechanism=mechanism, **extra)
    assert acc.epsilon == 0.0 and acc.rounds == 0
    seen = [acc.step() for _ in range(3)] + [acc.step(10), acc.step(100)]
    assert acc.rounds == 113
    assert all(a < b for a, b in zip(seen, seen[1:]))
    assert acc.epsilon_per_round == pytest.approx(seen[0])
    assert acc.step(0) == seen[-1]
    by_noise = [PrivacyAccountant(z, 0.05, mechanism=mechanism, **extra).epsilon_after(100) for z in (0.7, 1.0, 2.0)]
    assert by_noise[0] > by_noise[1] > by_noise[2]


def test_skellam_accountant_approaches_the_unsampled_gaussian(dp_accounting):
    orders = list(privacy.SKELLAM_ORDERS)
    gaussian = PrivacyAccountant(1.0, 1.0, orders=orders).epsilon_after(50)
    coarse = PrivacyAccountant(1.0, 1.0, mechanism="skellam", l2_sensitivity=20.0).epsilon_after(50)
    fine = PrivacyAccountant(1.0, 1.0, mechanism="skellam", l2_sensitivity=1e4).epsilon_after(50)
    assert coarse > fine > gaussian
    assert fine == pytest.approx(gaussian, rel=1e-3)


def test_skellam_accountant_claims_no_amplification(dp_accounting):
    sampled = PrivacyAccountant(1.0, 0.01, mechanism="skellam", l2_sensitivity=100.0)
    full = PrivacyAccountant(1.0, 1.0, mechanism="skellam", l2_sensitivity=100.0)
    assert sampled.epsilon_after(10) == full.epsilon_after(10)
    assert sampled.to_dict()["amplification"] is False
    assert PrivacyAccountant(1.0, 0.01).epsilon_after(10) < sampled.epsilon_after(10)


def test_skellam_params_make_their_accountant(dp_accounting):
    params = skellam_params(clip_norm=1.0, scale=512.0, dim=1000, num_clients=20, noise_multiplier=1.5)
    acc = params.accountant(delta=1e-6)
    direct = PrivacyAccountant(
        1.5,
        1.0,
        1e-6,
        mechanism="skellam",
        l2_sensitivity=params.l2_sensitivity,
        l1_sensitivity=params.l1_sensitivity,
    )
    assert acc.epsilon_after(30) == direct.epsilon_after(30)


def test_to_dict_is_a_json_log_line(dp_accounting):
    acc = PrivacyAccountant(1.2, 0.1, 1e-6)
    acc.step(7)
    row = json.loads(json.dumps(acc.to_dict()))
    assert row == {
        "mechanism": "gaussian",
        "accountant": "dp_accounting.rdp",
        "noise_multiplier": 1.2,
        "sampling_rate": 0.1,
        "amplification": True,
        "delta": 1e-6,
        "rounds": 7,
        "epsilon": acc.epsilon,
    }
    skellam = PrivacyAccountant(1.2, 0.1, mechanism="skellam", l2_sensitivity=30.0).to_dict()
    assert skellam["l2_sensitivity"] == 30.0 and skellam["l1_sensitivity"] == 900.0


def test_noise_multiplier_for_epsilon_inverts_the_accountant(dp_accounting):
    q, rounds, rtol = 256 / 60000, 14063, 1e-3
    # Published: z = 1.1 over these steps is eps 3.01 with the classic conversion; find the z
    # our accountant needs for our own epsilon at z = 1.1, which must be 1.1 again.
    target = PrivacyAccountant(1.1, q).epsilon_after(rounds)
    z = noise_multiplier_for_epsilon(target, rounds, q, rtol=rtol)
    assert z == pytest.approx(1.1, rel=rtol)
    assert PrivacyAccountant(z, q).epsilon_after(rounds) <= target
    assert PrivacyAccountant(z / (1 + rtol), q).epsilon_after(rounds) > target


def test_noise_multiplier_for_epsilon_is_monotone_and_meets_each_target(dp_accounting):
    found = []
    for target in (0.5, 1.0, 2.0, 8.0):
        z = noise_multiplier_for_epsilon(target, 200, 0.02)
        assert PrivacyAccountant(z, 0.02).epsilon_after(200) <= target
        found.append(z)
    assert all(a > b for a, b in zip(found, found[1:]))


def test_noise_multiplier_for_epsilon_with_skellam(dp_accounting):
    coarse = {"mechanism": "skellam", "l2_sensitivity": 3.0}  # few codes per unit: discreteness shows
    z = noise_multiplier_for_epsilon(4.0, 10, 1.0, rtol=1e-4, **coarse)
    assert PrivacyAccountant(z, 1.0, **coarse).epsilon_after(10) <= 4.0
    assert PrivacyAccountant(z / (1 + 1e-4), 1.0, **coarse).epsilon_after(10) > 4.0
    gaussian = noise_multiplier_for_epsilon(4.0, 10, 1.0, orders=list(privacy.SKELLAM_ORDERS), rtol=1e-4)
    assert z > gaussian * (1 + 1e-3)  # discreteness costs some noise


def test_noise_multiplier_for_epsilon_refuses_nonsense(dp_accounting):
    with pytest.raises(ValueError, match="target_epsilon must be finite and > 0"):
        noise_multiplier_for_epsilon(0.0, 10, 0.1)
    with pytest.raises(ValueError, match="unreachable"):
        noise_multiplier_for_epsilon(1e-6, 10**6, 1.0)
    with pytest.raises(ValueError, match="met by every noise multiplier"):
        noise_multiplier_for_epsilon(1e7, 1, 0.001)
    with pytest.raises(ValueError, match="rounds must be >= 1"):
        noise_multiplier_for_epsilon(1.0, 0, 0.1)


@pytest.mark.parametrize(
    ("args", "kwargs", "message"),
    [
        ((0.0, 0.1), {}, "noise_multiplier must be finite and > 0"),
        ((-1.0, 0.1), {}, "noise_multiplier must be finite and > 0"),
        ((1.0, 0.0), {}, r"sampling_rate must be in \(0, 1\]"),
        ((1.0, 1.5), {}, r"sampling_rate must be in \(0, 1\]"),
        ((1.0, 0.1, 0.0), {}, r"delta must be in \(0, 1\)"),
        ((1.0, 0.1, 1.0), {}, r"delta must be in \(0, 1\)"),
        ((1.0, 0.1), {"mechanism": "laplace"}, "unknown mechanism 'laplace'"),
        ((1.0, 0.1), {"accountant": "moments"}, "unknown accountant 'moments'"),
        ((1.0, 0.1), {"mechanism": "skellam"}, "needs l2_sensitivity"),
        ((1.0, 0.1), {"mechanism": "skellam", "l2_sensitivity": 5.0, "accountant": "pld"}, "accountant='rdp'"),
        ((1.0, 0.1), {"l2_sensitivity": 5.0}, "belong to mechanism='skellam'"),
        ((1.0, 0.1), {"accountant": "pld", "orders": [2, 3]}, "do not apply"),
        ((1.0, 0.1), {"mechanism": "skellam", "l2_sensitivity": 5.0, "orders": [2.5]}, "integer orders"),
    ],
)
def test_accountant_refuses_nonsense(dp_accounting, args, kwargs, message):
    with pytest.raises(ValueError, match=message):
        PrivacyAccountant(*args, **kwargs)


def test_accountant_refuses_negative_rounds(dp_accounting):
    acc = PrivacyAccountant(1.0, 0.1)
    with pytest.raises(ValueError, match="rounds must be an integer >= 0"):
        acc.step(-1)
    with pytest.raises(ValueError, match="rounds must be an integer >= 0"):
        acc.epsilon_after(1.5)  # type: ignore[arg-type]
    assert acc.rounds == 0


def test_missing_dp_accounting_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "dp_accounting", None)  # makes the import fail
    with pytest.raises(ImportError, match=r"pip install 'fedpress\[privacy\]'"):
        PrivacyAccountant(1.0, 0.1)


def test_importing_the_module_does_not_import_dp_accounting():
    code = (
        "import sys; sys.modules['dp_accounting'] = None\n"
        "import fedpress.privacy as p, numpy as np\n"
        "p.clip_update({'w': np.ones(3)}, 1.0)\n"
        "print(p.skellam_noise(3, 2.0, np.random.default_rng(0)).dtype)\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "int64"
