"""The peers of ``bench/quantizers.py``: the EDEN authors' PyTorch code and a torch QSGD.

The reference is ``cmprs-eden`` (Portnoy et al., the EDEN / DRIVE authors), installed
from PyPI::

    pip install --no-deps cmprs-eden distributed-mean-estimation "hadamard-transform==0.1.*"

(``--no-deps``: their metadata pins ``numpy==1.*``, which would replace numpy 2, and
``torch>=1.10``, which may pull a CUDA build.) Its public API::

    from cmprs_eden import eden
    t = eden(bits=b, rotation_seed=s)   # 'opt' quantization, expected (unbiased) scale
    out = t.forward(x)                  # FOut(tx, tcontext, bitrate)
    x_hat = t.backward(out.tx, out.tcontext)

``out.tx`` is an int64 tensor of Lloyd-Max cluster indices, one per coordinate of
``x`` zero-padded to the next power of two; ``out.tcontext`` holds the shape, the
original length, the scale (one float32) and the dtype; ``out.bitrate`` is ``b``.
The rotation signs come from a generator both sides of ``t`` share: every
``forward`` draws a fresh rotation and ``backward`` replays the one of the last
``forward``, so a payload must be decoded by the object that encoded it, before
it encodes again. The library packs nothing: the honest wire size is ``b`` bits per
padded coordinate plus a 32-bit scale (the rotation seed is shared, not sent).

The PyPI wheels (cmprs-eden 0.1a3, distributed-mean-estimation 0.1a2, the only
releases) are broken: ``setup.cfg`` uses ``packages = find:``, which drops the
folders without an ``__init__.py``, so ``cmprs_core.rotations.hadamard`` and
``cmprs_eden.quantization.*`` (and ``cmprs.rotations`` / ``cmprs.eden.quantization``)
are missing and ``import cmprs_eden`` raises ModuleNotFoundError. :func:`load`
supplies exactly those modules, written here to the upstream behaviour, and
imports everything else from the installed wheel:

* the rotation: the authors' own ``hadamard_transform`` package (PyPI
  ``hadamard-transform`` 0.1.x, the same torch.cat butterfly as upstream's in-repo
  copy) applied to ``x`` times Rademacher signs from the wheel's
  ``random_utils.rademacher_like`` and ``hook_shared_prng``; zero padding to the
  next power of two;
* the quantizer: ``torch.bucketize`` against float64 boundaries and ``torch.take``
  of float64 centroids, as upstream's ``OptQuantizer``; the centroids are the
  Lloyd-Max quantizer of N(0, 1) for each bit width and ``ep = E[Z Q(Z)]``, which
  upstream ships as precomputed .npz files and :func:`lloyd_max_normal` recomputes
  (the fixed point is unique for the normal density, so the values agree to
  float64 precision with Max's 1960 tables).

Everything timed in the reference apart from those few lines is the installed
code. :data:`SUPPLIED` lists what was filled in, for the benchmark to print.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.machinery
import importlib.util
import math
import os
import sys
import types
from dataclasses import dataclass, field
from functools import cache
from typing import Any, Callable, Optional

import numpy as np

__all__ = ["QSGD", "SUPPLIED", "Reference", "lloyd_max_normal", "load", "qsgd_vnmse_bound"]

SUPPLIED: list[str] = []


# ------------------------------------------------------------- Lloyd-Max --
def _normal_pdf(x: np.ndarray) -> np.ndarray:
    return np.exp(-0.5 * x * x) / math.sqrt(2.0 * math.pi)


def _normal_sf(x: np.ndarray) -> np.ndarray:
    return 0.5 * np.array([math.erfc(v / math.sqrt(2.0)) for v in np.ravel(x)]).reshape(np.shape(x))


@cache
def lloyd_max_normal(bits: int) -> tuple[np.ndarray, float]:
    """The positive half of the Lloyd-Max centroids of N(0, 1) with ``2**bits``
    levels, and ``E[Z Q(Z)]`` (= E[Q(Z)^2] at the fixed point)."""
    half = 1 << (bits - 1)
    c = np.linspace(0.5, 2.5, half) * (1.0 if bits > 1 else 0.8)
    for _ in range(20000):
        b = (c[:-1] + c[1:]) / 2
        lo = np.concatenate(([0.0], b))
        hi = np.concatenate((b, [np.inf]))
        mass = _normal_sf(lo) - _normal_sf(hi)
        new = (_normal_pdf(lo) - _normal_pdf(hi)) / mass
        if np.max(np.abs(new - c)) < 1e-15:
            c = new
            break
        c = new
    b = (c[:-1] + c[1:]) / 2
    lo = np.concatenate(([0.0], b))
    hi = np.concatenate((b, [np.inf]))
    mass = _normal_sf(lo) - _normal_sf(hi)
    ep = float(2.0 * np.sum(mass * c * c))
    return c, ep


# ----------------------------------------------------- supplied modules --
def _fill_hadamard(mod: types.ModuleType, core: str) -> None:
    """``<core>.rotations.hadamard``: what ``<core>/__init__`` and the eden pipeline import."""
    import torch.nn.functional as F
    from hadamard_transform import hadamard_transform  # the authors' FWHT package

    random_utils = importlib.import_module(f"{core}.random_utils")
    transform = importlib.import_module(f"{core}.transform")
    Transform, FOut = transform.Transform, transform.FOut
    rademacher_like, hook_shared_prng = random_utils.rademacher_like, random_utils.hook_shared_prng

    def randomized_hadamard_transform(x: Any, prng: Any) -> Any:
        return hadamard_transform(x * rademacher_like(x, prng))

    def inverse_randomized_hadamard_transform(tx: Any, prng: Any) -> Any:
        return hadamard_transform(tx) * rademacher_like(tx, prng)

    class RandomizedHadamard(Transform):
        """Assumes a vector whose length is a power of two."""

        def __init__(self, seed: Optional[int] = None) -> None:
            self.prng = hook_shared_prng(self, seed)

        def forward(self, x: Any) -> Any:
            return FOut(randomized_hadamard_transform(x, self.prng))

        def backward(self, tx: Any, context: Any) -> Any:
            return inverse_randomized_hadamard_transform(tx, self.prng)

    class Hadamard(Transform):
        def forward(self, x: Any) -> Any:
            return FOut(hadamard_transform(x))

        def backward(self, tx: Any, context: Any) -> Any:
            return hadamard_transform(tx)

    def next_power_of_2(n: int) -> int:
        return 2 ** (math.floor(math.log2(n)) + 1)

    def is_a_power_of_2(n: int) -> bool:
        return n & (n - 1) == 0

    class PadToPowerOf2(Transform):
        def forward(self, x: Any) -> Any:
            d = x.numel()
            if is_a_power_of_2(d):
                return FOut(x, d)
            return FOut(F.pad(x, (0, next_power_of_2(d) - d)), d)

        def backward(self, tx: Any, original_dim: int) -> Any:
            return tx[:original_dim]

    mod.hadamard_transform = hadamard_transform
    mod.randomized_hadamard_transform = randomized_hadamard_transform
    mod.inverse_randomized_hadamard_transform = inverse_randomized_hadamard_transform
    mod.RandomizedHadamard, mod.Hadamard = RandomizedHadamard, Hadamard
    mod.next_power_of_2, mod.is_a_power_of_2 = next_power_of_2, is_a_power_of_2
    mod.PadToPowerOf2, mod.padToPowerOf2 = PadToPowerOf2, PadToPowerOf2()


def _fill_quantizer(mod: types.ModuleType, core: str) -> None:
    """``<eden>.quantization.quantizer``: the abstract bases."""

    class QData:
        def ep_for_bits(self, bits_low: int, bits_frac: Optional[float] = None) -> float:
            raise NotImplementedError

    class Quantizer:
        data: Any = None

        def assign_clusters(self, x: Any) -> Any:
            raise NotImplementedError

        def to_values(self, assignments: Any) -> Any:
            raise NotImplementedError

    mod.QData, mod.Quantizer = QData, Quantizer


def _fill_opt(mod: types.ModuleType, core: str, eden_pkg: str) -> None:
    """``<eden>.quantization.opt``: Lloyd-Max levels of N(0, 1), as upstream's OptQuantizer."""
    import torch

    config = importlib.import_module(f"{core}.config")
    base = importlib.import_module(f"{eden_pkg}.quantization.quantizer")

    class OptData(base.QData):
        @property
        def eps(self) -> dict[int, float]:
            return {b: lloyd_max_normal(b)[1] for b in range(1, 9)}

        @property
        def clusters(self) -> tuple[dict[int, np.ndarray], dict[int, np.ndarray]]:
            centroids, boundaries = {}, {}
            for b in range(1, 9):
                c = lloyd_max_normal(b)[0]
                hb = (c[:-1] + c[1:]) / 2
                centroids[b] = np.concatenate([-np.flip(c), c])
                boundaries[b] = np.concatenate([-np.flip(hb), [0.0], hb])
            return centroids, boundaries

        def ep_for_bits(self, bits_low: int, bits_frac: Optional[float] = None) -> float:
            if bits_frac is None:
                return lloyd_max_normal(bits_low)[1]
            return bits_frac * lloyd_max_normal(bits_low)[1] + (1 - bits_frac) * lloyd_max_normal(bits_low + 1)[1]

    @cache
    def get_opt_in_device(device: str) -> tuple[dict[int, Any], dict[int, Any]]:
        centroids, boundaries = OptQuantizer.data.clusters
        return (
            {b: torch.from_numpy(c).to(device) for b, c in centroids.items()},
            {b: torch.from_numpy(v).to(device) for b, v in boundaries.items()},
        )

    class OptQuantizer(base.Quantizer):
        data = OptData()

        def __init__(self, bits: int) -> None:
            centroids, boundaries = get_opt_in_device(config.device)
            self.centroids = centroids[bits]
            self.boundaries = boundaries[bits]

        def assign_clusters(self, x: Any) -> Any:
            return torch.bucketize(x, self.boundaries)  # int64 cluster indices

        def to_values(self, assignments: Any) -> Any:
            return torch.take(self.centroids, assignments)  # float64 centroids

    mod.OptData, mod.OptQuantizer, mod.get_opt_in_device = OptData, OptQuantizer, get_opt_in_device


def _fill_entropy_delta(mod: types.ModuleType, core: str, eden_pkg: str) -> None:
    """``<eden>.quantization.entropy_delta``: imported by eden's ``__init__`` but only used
    by ``quantization='entropy_delta'``, which this benchmark does not run."""
    base = importlib.import_module(f"{eden_pkg}.quantization.quantizer")

    class EntropyDeltaQuantizer(base.Quantizer):
        data = None

        def __init__(self, bits: int) -> None:
            raise NotImplementedError(
                "entropy_delta quantization is missing from the PyPI wheel and not supplied by bench/_eden_reference.py"
            )

    mod.EntropyDeltaQuantizer = EntropyDeltaQuantizer


class _Supplier(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Serves the named modules, each filled by a function, when imported."""

    def __init__(self, fillers: dict[str, Optional[Callable[[types.ModuleType], None]]]) -> None:
        self.fillers = fillers

    def find_spec(self, fullname: str, path: Any = None, target: Any = None) -> Any:
        if fullname not in self.fillers:
            return None
        is_pkg = self.fillers[fullname] is None
        return importlib.machinery.ModuleSpec(fullname, self, is_package=is_pkg)

    def create_module(self, spec: Any) -> None:
        return None

    def exec_module(self, module: types.ModuleType) -> None:
        fill = self.fillers[module.__name__]
        if fill is None:
            module.__path__ = []  # a namespace for the submodules below
        else:
            fill(module)


def _installed_dir(package: str) -> Optional[str]:
    """The folder of an installed package, found without importing it."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        return None
    return next(iter(spec.submodule_search_locations))


def _supply(core: str, eden_pkg: str) -> list[str]:
    """Registers the modules the wheel lacks; returns their names."""
    core_dir = _installed_dir(core.split(".")[0])
    if core_dir is None:
        return []
    core_sub = core.split(".")[1:]
    eden_sub = eden_pkg.split(".")[1:] if eden_pkg.startswith(core.split(".")[0] + ".") else None
    eden_dir = os.path.join(core_dir, *eden_sub) if eden_sub is not None else _installed_dir(eden_pkg)
    fillers: dict[str, Optional[Callable[[types.ModuleType], None]]] = {}
    if not os.path.exists(os.path.join(core_dir, *core_sub, "rotations", "hadamard.py")):
        fillers[f"{core}.rotations"] = None
        fillers[f"{core}.rotations.hadamard"] = lambda m: _fill_hadamard(m, core)
    if eden_dir and not os.path.exists(os.path.join(eden_dir, "quantization", "opt")):
        fillers[f"{eden_pkg}.quantization"] = None
        fillers[f"{eden_pkg}.quantization.quantizer"] = lambda m: _fill_quantizer(m, core)
        fillers[f"{eden_pkg}.quantization.opt"] = lambda m: _fill_opt(m, core, eden_pkg)
        fillers[f"{eden_pkg}.quantization.entropy_delta"] = lambda m: _fill_entropy_delta(m, core, eden_pkg)
    if fillers:
        sys.meta_path.insert(0, _Supplier(fillers))
    return [n for n, f in fillers.items() if f is not None]


def _version(dist: str) -> str:
    try:
        from importlib.metadata import version

        return version(dist)
    except Exception:  # noqa: BLE001 - only for the printed note
        return "?"


@dataclass
class Reference:
    """The loaded reference: ``eden(bits, rotation_seed=)`` and the authors' ``qsgd``."""

    eden: Callable[..., Any]
    package: str
    version: str
    qsgd: Optional[Callable[..., Any]] = None
    supplied: list[str] = field(default_factory=list)

    def note(self) -> str:
        text = f"reference: {self.package} {self.version} (PyPI), eden(bits, rotation_seed=s)"
        if self.supplied:
            text += (
                "; its wheel lacks "
                + ", ".join(self.supplied)
                + " (supplied by bench/_eden_reference.py: rotation = hadamard-transform "
                + _version("hadamard-transform")
                + " x Rademacher signs, quantizer = torch.bucketize/take over Lloyd-Max "
                + "levels of N(0,1))"
            )
        return text


def load() -> Reference:
    """Imports the reference, supplying the modules its wheel lacks. Raises ImportError
    (with the install command) when neither package is installed."""
    errors = []
    for dist, core, eden_pkg in (
        ("cmprs-eden", "cmprs_core", "cmprs_eden"),
        ("distributed-mean-estimation", "cmprs", "cmprs.eden"),
    ):
        if _installed_dir(core) is None:
            errors.append(f"{dist} not installed")
            continue
        supplied = _supply(core, eden_pkg)
        try:
            eden_mod = importlib.import_module(eden_pkg)
            core_mod = importlib.import_module(core)
        except Exception as exc:  # noqa: BLE001 - reported, then the next package is tried
            errors.append(f"{dist}: {type(exc).__name__}: {exc}")
            continue
        SUPPLIED[:] = supplied
        return Reference(
            eden=eden_mod.eden,
            package=dist,
            version=_version(dist),
            qsgd=getattr(core_mod, "qsgd", None),
            supplied=supplied,
        )
    raise ImportError(
        "; ".join(errors) + ". Install the reference with: pip install --no-deps "
        "cmprs-eden distributed-mean-estimation 'hadamard-transform==0.1.*'"
    )


# ------------------------------------------------------------------ QSGD --
class QSGD:
    """QSGD (Alistarh et al., NeurIPS 2017) in torch, packed to ``bits`` per coordinate.

    Per bucket of ``bucket`` coordinates: the L2 norm (float32), then each
    coordinate's ``|x| / norm * s`` rounded stochastically to one of ``s + 1``
    levels ``0..s`` with ``s = 2**(bits-1) - 1``, and its sign: ``bits`` bits
    (``sign << (bits-1) | level``), so 4-bit QSGD is 4 + 32/bucket bits per coordinate.
    Unbiased; vNMSE <= min(bucket / s^2, sqrt(bucket) / s).
    """

    def __init__(self, bits: int = 4, bucket: int = 512, seed: int = 0) -> None:
        import torch

        if bits not in (2, 4, 8):
            raise ValueError(f"bits must be 2, 4 or 8 (whole codes per byte), got {bits}")
        self.torch = torch
        self.bits, self.bucket = bits, bucket
        self.s = (1 << (bits - 1)) - 1
        self.gen = torch.Generator().manual_seed(seed)

    def encode(self, x: Any) -> tuple[Any, Any, int]:
        torch = self.torch
        n = x.numel()
        pad = (-n) % self.bucket
        v = torch.nn.functional.pad(x, (0, pad)).view(-1, self.bucket)
        norm = torch.linalg.vector_norm(v, dim=1, keepdim=True)
        safe = torch.where(norm > 0, norm, torch.ones_like(norm))
        u = v.abs().div_(safe).mul_(self.s)
        u.add_(torch.rand(u.shape, generator=self.gen)).floor_().clamp_(max=self.s)
        code = u.to(torch.uint8) | (v < 0).to(torch.uint8) << (self.bits - 1)
        code = code.view(-1)
        per = 8 // self.bits
        code = torch.nn.functional.pad(code, (0, (-code.numel()) % per)).view(-1, per)
        packed = code[:, 0].clone()
        for j in range(1, per):
            packed |= code[:, j] << (j * self.bits)
        return packed, norm.view(-1), n

    def decode(self, packed: Any, norms: Any, n: int) -> Any:
        torch = self.torch
        per = 8 // self.bits
        mask = (1 << self.bits) - 1
        codes = torch.stack([(packed >> (j * self.bits)) & mask for j in range(per)], dim=1)
        codes = codes.view(-1)
        codes = codes[: norms.numel() * self.bucket].view(-1, self.bucket)
        level = (codes & self.s).to(torch.float32)
        sign = 1.0 - 2.0 * (codes >> (self.bits - 1)).to(torch.float32)
        out = level.mul_(sign).mul_(norms.view(-1, 1) / self.s)
        return out.view(-1)[:n]

    def wire_bits(self, packed: Any, norms: Any) -> int:
        return 8 * packed.numel() + 32 * norms.numel()


def qsgd_vnmse_bound(bits: int, bucket: int) -> float:
    s = (1 << (bits - 1)) - 1
    return min(bucket / s**2, math.sqrt(bucket) / s)
