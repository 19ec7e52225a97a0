"""Generates csrc/eden_tables.cpp: EDEN's tables for N(0, 1) coordinates.

    python tools/lloyd_max.py > csrc/eden_tables.cpp

Two tables per width b = 1, 2, 3, 4, 8, both of 2^b values, ascending and
symmetric, everything computed in float64 with exact Gaussian integrals
(math.erfc and math.exp, no scipy).

Nearest rounding: the Lloyd-Max quantizer, minimising E[(Z - Q(Z))^2] for
Z ~ N(0, 1). Its decision boundaries are the midpoints between consecutive
centroids, and each centroid is the conditional mean of its cell. Lloyd's
iteration (boundaries from centroids, centroids from boundaries) converges
to it, on the positive half only (the middle boundary is 0). It converges
linearly, slowly for many levels (about 10^5 steps at 8 bits), so once its
steps are below 1e-12 a few Newton steps on the same fixed-point equations
remove the remaining error; the result is checked to be a Lloyd fixed point
to 1e-13. The MSE of each quantizer is printed in the generated comments;
EDEN's unbiased scale turns it into vNMSE = mse / (1 - mse).

Stochastic rounding (the shared-rotation mode): z in [l_j, l_{j+1}] becomes
l_{j+1} with probability (z - l_j) / (l_{j+1} - l_j), else l_j, which is
unbiased and has variance (z - l_j)(l_{j+1} - z). The levels span
[-CLIP, CLIP] (beyond it coordinates are sent exactly), the two ends fixed,
and the interior ones minimise the expected variance

    J(l) = sum_j integral_{l_j}^{l_{j+1}} (z - l_j)(l_{j+1} - z) phi(z) dz,

which is also the mode's vNMSE. J is a sum over intervals of
-M2 + (a + b) M1 - a b M0, with M_k the partial moments of phi over [a, b],
so its gradient and (tridiagonal) Hessian have closed forms; Newton's method
from uniform levels, halving a step that would not lower J or would unorder
the levels, converges in a few dozen steps (each made exactly symmetric);
the result is checked to be stationary, |dJ/dl_j| < 1e-15.
"""

from __future__ import annotations

import math
import sys

BITS = (1, 2, 3, 4, 8)
TOL = 1e-12
# kEdenClip in csrc/eden.hpp: the stochastic levels' ends (the generated file
# checks that they equal it).
CLIP = 3.3
_SQRT2 = math.sqrt(2.0)
_INV_SQRT_2PI = 1.0 / math.sqrt(2.0 * math.pi)


def pdf(x: float) -> float:
    return 0.0 if math.isinf(x) else _INV_SQRT_2PI * math.exp(-0.5 * x * x)


def upper_tail(x: float) -> float:
    """P(Z > x), accurate in the tail."""
    return 0.0 if math.isinf(x) else 0.5 * math.erfc(x / _SQRT2)


def boundaries(c: list[float]) -> list[float]:
    """Cell edges of the positive half: 0, the midpoints, +inf."""
    return [0.0] + [0.5 * (c[j] + c[j + 1]) for j in range(len(c) - 1)] + [math.inf]


def cell_mass(a: float, b: float) -> float:
    """P(a < Z < b), from the tails on the side where they are small."""
    if a >= 0.0:
        return upper_tail(a) - upper_tail(b)
    if b <= 0.0:
        return upper_tail(-b) - upper_tail(-a)
    return 1.0 - upper_tail(b) - upper_tail(-a)


def solve_tridiagonal(
    lower: list[float], diag: list[float], upper: list[float], rhs: list[float]
) -> list[float]:
    """x with lower[j] x[j-1] + diag[j] x[j] + upper[j] x[j+1] = rhs[j] (Thomas algorithm)."""
    h = len(diag)
    diag, rhs = diag[:], rhs[:]
    for j in range(1, h):
        w = lower[j] / diag[j - 1]
        diag[j] -= w * upper[j - 1]
        rhs[j] -= w * rhs[j - 1]
    x = [0.0] * h
    x[h - 1] = rhs[h - 1] / diag[h - 1]
    for j in range(h - 2, -1, -1):
        x[j] = (rhs[j] - upper[j] * x[j + 1]) / diag[j]
    return x


def lloyd_step(c: list[float]) -> list[float]:
    """Centroids (conditional means) of the cells the midpoints of c define."""
    t = boundaries(c)
    return [(pdf(t[j]) - pdf(t[j + 1])) / cell_mass(t[j], t[j + 1]) for j in range(len(c))]


def newton_step(c: list[float]) -> list[float]:
    """One Newton step on F(c) = lloyd_step(c) - c = 0 (F's Jacobian is tridiagonal).

    For the mean m(a, b) of a cell [a, b]: dm/da = pdf(a) (m - a) / P and
    dm/db = pdf(b) (b - m) / P, P the cell's mass; the edges are midpoints, so
    each moves by half of its two centroids' moves (the edge 0 stays)."""
    h = len(c)
    t = boundaries(c)
    m = lloyd_step(c)
    lower, diag, upper = [0.0] * h, [0.0] * h, [0.0] * h
    for j in range(h):
        p = cell_mass(t[j], t[j + 1])
        da = pdf(t[j]) * (m[j] - t[j]) / p if j > 0 else 0.0
        db = pdf(t[j + 1]) * (t[j + 1] - m[j]) / p if j < h - 1 else 0.0
        diag[j] = 0.5 * da + 0.5 * db - 1.0
        if j > 0:
            lower[j] = 0.5 * da
        if j < h - 1:
            upper[j] = 0.5 * db
    delta = solve_tridiagonal(lower, diag, upper, [c[j] - m[j] for j in range(h)])  # J * delta = -F
    return [c[j] + delta[j] for j in range(h)]


def max_change(a: list[float], b: list[float]) -> float:
    return max(abs(x - y) for x, y in zip(a, b))


def positive_centroids(bits: int) -> list[float]:
    """The 2^(bits-1) positive Lloyd-Max centroids of N(0, 1), ascending."""
    h = 1 << (bits - 1)
    c = [(j + 0.5) * 3.0 / h for j in range(h)]
    while True:
        new = lloyd_step(c)
        done = max_change(new, c) < TOL
        c = new
        if done:
            break
    # Newton's steps shrink quadratically to the rounding floor (about 1e-12
    # at 8 bits, where the slow mode amplifies rounding); stop there.
    for _ in range(8):
        new = newton_step(c)
        done = max_change(new, c) < 1e-11
        c = new
        if done:
            break
    residual = max_change(lloyd_step(c), c)
    if residual > 1e-13:
        raise RuntimeError(f"{bits} bits: not a Lloyd fixed point (residual {residual:.3g})")
    return c


def mse(c: list[float]) -> float:
    """E[(Z - Q(Z))^2] of the symmetric quantizer with positive centroids c."""
    t = boundaries(c)
    total = 0.0
    for j, cj in enumerate(c):
        a, b = t[j], t[j + 1]
        mass = cell_mass(a, b)
        second = mass + a * pdf(a) - (0.0 if math.isinf(b) else b * pdf(b))  # integral of z^2 pdf
        first = pdf(a) - pdf(b)
        total += second - 2.0 * cj * first + cj * cj * mass
    return 2.0 * total


def moments(a: float, b: float) -> tuple[float, float, float]:
    """The integrals of phi, z phi and z^2 phi over [a, b] (finite a, b)."""
    m0 = cell_mass(a, b)
    m1 = pdf(a) - pdf(b)
    return m0, m1, m0 + a * pdf(a) - b * pdf(b)


def rounding_variance(levels: list[float]) -> float:
    """J: E[(Z - l_j)(l_{j+1} - Z); l_0 <= Z <= l_top], the mean variance of
    stochastic rounding between the levels."""
    total = 0.0
    for a, b in zip(levels[:-1], levels[1:]):
        m0, m1, m2 = moments(a, b)
        total += -m2 + (a + b) * m1 - a * b * m0
    return total


def rounding_variance_newton(levels: list[float]) -> tuple[list[float], list[float]]:
    """(dJ/dl_j, Newton step) for the interior levels l_1 .. l_{top-1}.

    Moving the upper end b of [a, b] changes its term by the integral of
    (z - a) phi = M1 - a M0, moving the lower end a by -(b M0 - M1); so
    dJ/dl_j = (M1 - l_{j-1} M0) over [l_{j-1}, l_j] - (l_{j+1} M0 - M1) over
    [l_j, l_{j+1}]. Differentiating again, d2J/dl_j^2 = (l_{j+1} - l_{j-1})
    phi(l_j) and d2J/dl_j dl_{j+1} = -M0 over [l_j, l_{j+1}]."""
    mom = [moments(a, b) for a, b in zip(levels[:-1], levels[1:])]
    grad, diag, lower, upper = [], [], [], []
    for j in range(1, len(levels) - 1):
        (m0l, m1l, _), (m0r, m1r, _) = mom[j - 1], mom[j]
        grad.append((m1l - levels[j - 1] * m0l) - (levels[j + 1] * m0r - m1r))
        diag.append((levels[j + 1] - levels[j - 1]) * pdf(levels[j]))
        lower.append(-m0l)
        upper.append(-m0r)
    return grad, solve_tridiagonal(lower, diag, upper, [-g for g in grad]) if grad else []


def stochastic_levels(bits: int) -> list[float]:
    """The 2^bits levels on [-CLIP, CLIP] minimising J, ascending."""
    top = (1 << bits) - 1
    levels = [CLIP * (2 * j - top) / top for j in range(top + 1)]
    for _ in range(200):
        _, step = rounding_variance_newton(levels)
        if not step:
            return levels
        # Damped: halve a step that unorders the levels or raises J.
        t = 1.0
        while True:
            new = [levels[0]] + [v + t * d for v, d in zip(levels[1:-1], step)] + [levels[-1]]
            ordered = all(a < b for a, b in zip(new[:-1], new[1:]))
            if ordered and rounding_variance(new) <= rounding_variance(levels) + 1e-15:
                break
            t *= 0.5
        # Symmetric in exact arithmetic; keep it so in float64.
        new = [0.5 * (v - w) for v, w in zip(new, reversed(new))]
        done = max_change(new, levels) < TOL
        levels = new
        if done:
            break
    residual = max(abs(g) for g in rounding_variance_newton(levels)[0])
    if residual > 1e-15:
        raise RuntimeError(f"{bits} bits: dJ/dl is {residual:.3g}, not 0")
    return levels


def c_array(name: str, values: list[float]) -> list[str]:
    out = [f"constexpr float {name}[{len(values)}] = {{"]
    per_line = 6
    for i in range(0, len(values), per_line):
        row = ", ".join(f"{v:.9g}f" for v in values[i : i + per_line])
        out.append(f"    {row},")
    return out + ["};", ""]


def c_accessor(function: str, prefix: str) -> list[str]:
    """function(bits): the table prefix<bits>, nullptr for other widths."""
    tables = ", ".join(f"{prefix}{bits}" for bits in BITS)
    return [
        f"const float* {function}(int bits) {{",
        f"  constexpr const float* tables[] = {{{tables}}};",
        "  const int i = width_index(bits);",
        "  return i < 0 ? nullptr : tables[i];",
        "}",
        "",
    ]


def table_source(
    centroids: dict[int, list[float]],
    errors: dict[int, float],
    levels: dict[int, list[float]],
    variances: dict[int, float],
    uniform: dict[int, float],
) -> str:
    out = [
        "// Generated by tools/lloyd_max.py; do not edit by hand.",
        "//",
        "// kCentroids<bits>: Lloyd-Max centroids of N(0, 1) for 2^bits levels,",
        "// ascending and symmetric. MSE of each quantizer (E[(Z - Q(Z))^2]) and the",
        "// vNMSE of EDEN's unbiased scale, mse / (1 - mse):",
    ]
    for bits in BITS:
        e = errors[bits]
        unit = "bits" if bits > 1 else "bit "
        out.append(f"//   {bits} {unit}: mse {e:.10g}, vnmse {e / (1 - e):.10g}")
    out += [
        "//",
        "// kStochastic<bits>: the 2^bits levels of stochastic rounding on",
        "// [-kEdenClip, kEdenClip], ends fixed, the interior ones minimising the",
        "// rounding variance J = E[(Z - l_j)(l_{j+1} - Z); |Z| <= kEdenClip], which is",
        "// the shared mode's vNMSE (uniform levels would give the second value):",
    ]
    for bits in BITS:
        unit = "bits" if bits > 1 else "bit "
        out.append(f"//   {bits} {unit}: J {variances[bits]:.10g} (uniform {uniform[bits]:.10g})")
    out += ['#include "eden.hpp"', "", "namespace fedpress {", "namespace {", ""]
    for bits in BITS:
        pos = centroids[bits]
        out += c_array(f"kCentroids{bits}", [-v for v in reversed(pos)] + pos)
    for bits in BITS:
        out += c_array(f"kStochastic{bits}", levels[bits])
    ends = " &&\n              ".join(
        f"kStochastic{b}[0] == -kEdenClip && kStochastic{b}[{(1 << b) - 1}] == kEdenClip"
        for b in BITS
    )
    out += [
        f"static_assert({ends},",
        '              "the stochastic levels end at -+kEdenClip");',
        "",
    ]
    out += ["// The index of a width among 1, 2, 3, 4, 8; -1 for others.", "int width_index(int bits) {"]
    out += ["  switch (bits) {"]
    for i, bits in enumerate(BITS):
        out += [f"    case {bits}:", f"      return {i};"]
    out += ["    default:", "      return -1;", "  }", "}", "", "}  // namespace", ""]
    out += c_accessor("eden_centroids", "kCentroids")
    out += c_accessor("eden_stochastic_levels", "kStochastic")
    out += ["}  // namespace fedpress", ""]
    return "\n".join(out)


def main() -> None:
    centroids = {bits: positive_centroids(bits) for bits in BITS}
    errors = {bits: mse(c) for bits, c in centroids.items()}
    levels = {bits: stochastic_levels(bits) for bits in BITS}
    variances = {bits: rounding_variance(v) for bits, v in levels.items()}
    uniform = {}
    for bits in BITS:
        top = (1 << bits) - 1
        uniform[bits] = rounding_variance([CLIP * (2 * j - top) / top for j in range(top + 1)])
    for bits in BITS:
        e = errors[bits]
        print(
            f"{bits} bits: mse {e:.10g}, unbiased vNMSE {e / (1 - e):.10g}; "
            f"stochastic J {variances[bits]:.10g} (uniform {uniform[bits]:.10g})",
            file=sys.stderr,
        )
    sys.stdout.write(table_source(centroids, errors, levels, variances, uniform))


if __name__ == "__main__":
    main()
