"""Typed wrappers over the compiled kernels.

Every function takes numpy arrays or torch CPU tensors (torch is recognised
without being imported) and returns numpy arrays. Float inputs of any precision
are converted to float32; a contiguous float32 input is used without a copy.
Multi-dimensional inputs are flattened in C order, so indices are flat indices.

Results never depend on the number of threads (see ``set_num_threads``).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Optional, Union

import numpy as np

from . import _core
from ._args import bits as _bits
from ._args import bucket as _bucket
from ._args import count as _count
from ._args import seed as _seed
from ._arrays import MAX_ELEMENTS as _MAX_LEN
from ._arrays import as_float32 as _as_float32
from ._arrays import is_torch_tensor as _is_torch_tensor
from ._arrays import torch_to_numpy as _torch_to_numpy
from .format.limits import DEFAULT_ROTATION_BLOCK, MAX_ROTATION_BLOCK

__all__ = [
    "topk",
    "threshold_topk",
    "randomk",
    "randomk_indices",
    "ef_topk",
    "topk_many",
    "threshold_topk_many",
    "ef_topk_many",
    "quantize",
    "dequantize",
    "packed_size",
    "rht",
    "irht",
    "rht_padded_size",
    "fwht",
    "random_signs",
    "EDEN_CLIP",
    "eden_centroids",
    "eden_levels",
    "eden_quantize",
    "eden_dequantize",
    "eden_accumulate",
    "eden_encode",
    "eden_decode",
    "encode_indices",
    "decode_indices",
    "scatter_add",
    "scatter_add_many",
    "get_num_threads",
    "set_num_threads",
    "simd",
]

ArrayLike = Any  # numpy array, torch CPU tensor, or anything np.asarray accepts
Seed = Optional[int]


# --------------------------------------------------------------- conversion --
# (fedpress._arrays converts tensors for every module; these are the kernels' own.)
def _as_inplace_float32(x: ArrayLike, name: str) -> np.ndarray:
    """A flat float32 view sharing memory with x, which is updated in place."""
    if _is_torch_tensor(x):
        t = x.detach()
        if t.device.type != "cpu":
            raise ValueError(f"{name} is updated in place and must be a CPU tensor, got {t.device}")
        if str(t.dtype) != "torch.float32":
            raise TypeError(f"{name} is updated in place and must be float32, got {t.dtype}")
        if not t.is_contiguous():
            raise ValueError(f"{name} is updated in place and must be contiguous")
        arr = t.numpy()
    elif isinstance(x, np.ndarray):
        arr = x
    else:
        raise TypeError(f"{name} is updated in place and must be a numpy array or torch tensor, got {type(x).__name__}")
    if arr.dtype != np.float32:
        raise TypeError(f"{name} is updated in place and must be float32, got dtype {arr.dtype}")
    if not arr.flags.c_contiguous:
        raise ValueError(f"{name} is updated in place and must be C-contiguous")
    if not arr.flags.writeable:
        raise ValueError(f"{name} is updated in place and must be writable")
    return arr.reshape(-1)


def _as_indices(indices: ArrayLike, name: str, error: type = IndexError) -> np.ndarray:
    """Integer indices as a flat uint32 array; out-of-range values raise `error`."""
    if _is_torch_tensor(indices):
        arr = _torch_to_numpy(indices, name, want_float32=False)
    else:
        arr = np.asarray(indices)
    if arr.dtype.kind not in "iu":
        if arr.size == 0 and arr.dtype.kind == "f":
            arr = arr.astype(np.uint32)  # an empty list arrives as float64
        else:
            raise TypeError(f"{name} must be an integer array, got dtype {arr.dtype}")
    arr = arr.reshape(-1)
    if arr.dtype != np.uint32 and arr.size:
        lo, hi = int(arr.min()), int(arr.max())
        if lo < 0:
            raise error(f"{name} holds a negative index ({lo})")
        if hi > _MAX_LEN:
            raise error(f"{name} holds {hi}, beyond the uint32 range")
    return np.ascontiguousarray(arr, dtype=np.uint32)


def _as_packed(packed: ArrayLike) -> np.ndarray:
    """Packed codes as a flat contiguous uint8 array (bytes-like objects accepted)."""
    if isinstance(packed, (bytes, bytearray, memoryview)):
        p = np.frombuffer(packed, dtype=np.uint8)
    elif _is_torch_tensor(packed):
        p = _torch_to_numpy(packed, "packed", want_float32=False)
    else:
        p = np.asarray(packed)
    if p.dtype != np.uint8:
        raise TypeError(f"packed must be uint8, got dtype {p.dtype}")
    return np.ascontiguousarray(p.reshape(-1))


# ---------------------------------------------------------------- selection --
def topk(x: ArrayLike, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Exact top-k by magnitude.

    Returns ``(indices, values)``: uint32 indices strictly ascending and the
    float32 values ``x[indices]``. Among equal magnitudes the lower index wins.
    ``0 <= k <= len(x)``; a NaN in x raises ValueError.
    """
    arr = _as_float32(x, "x")
    return _core.topk(arr, _count(k, "k"))


def threshold_topk(x: ArrayLike, ratio: float, seed: Seed = None) -> tuple[np.ndarray, np.ndarray]:
    """Approximate top-k by a threshold estimated from a seeded sample (DGC).

    Returns about ``round(ratio * len(x))`` of the largest magnitudes, always
    within +-10% of it, usually after a single pass over x.
    """
    arr = _as_float32(x, "x")
    r = float(ratio)
    if not 0.0 <= r <= 1.0:
        raise ValueError(f"ratio must be in [0, 1], got {ratio!r}")
    return _core.threshold_topk(arr, r, _seed(seed))


def randomk(x: ArrayLike, k: int, seed: Seed = None) -> tuple[np.ndarray, np.ndarray]:
    """k entries of x chosen uniformly without replacement; indices ascending.

    The indices depend only on ``(len(x), k, seed)``: a receiver that knows the
    seed can regenerate them with ``randomk_indices``.
    """
    arr = _as_float32(x, "x")
    return _core.randomk(arr, _count(k, "k"), _seed(seed))


def randomk_indices(n: int, k: int, seed: int) -> np.ndarray:
    """The indices ``randomk(x, k, seed)`` selects for ``len(x) == n``."""
    n = _count(n, "n")
    if n > _MAX_LEN:
        raise ValueError(f"n must be < 2**32, got {n}")
    k = _count(k, "k")
    if k > n:
        raise ValueError(f"k = {k} exceeds n = {n}")
    return _core.randomk_indices(n, k, _seed(seed))


def ef_topk(
    update: ArrayLike, residual: ArrayLike, k: int, zero_selected: bool = True
) -> tuple[np.ndarray, np.ndarray]:
    """Error-feedback top-k, fused in one pass.

    ``residual += update``; select the exact top-k of the residual; zero the
    selected entries of the residual (it is modified in place and must be a
    writable contiguous float32 array or tensor); return ``(indices, values)``.
    ``zero_selected=False`` leaves the selected entries in the residual (equal to
    the values returned), for a caller that overwrites them anyway. If it raises
    (a NaN in the sum), the residual holds ``residual + update`` in full.
    """
    res = _as_inplace_float32(residual, "residual")
    upd = _as_float32(update, "update")
    if upd.size != res.size:
        raise ValueError(f"update has {upd.size} elements but residual has {res.size}")
    return _core.ef_topk(upd, res, _count(k, "k"), bool(zero_selected))


def _split(idx: np.ndarray, vals: np.ndarray, cuts: Sequence[int]) -> list[tuple[np.ndarray, np.ndarray]]:
    """A selection over arrays taken back to back, its indices already local to their
    array (the kernel made them so), cut into views: no array made per tensor."""
    return [(idx[a:b], vals[a:b]) for a, b in zip(cuts[:-1], cuts[1:])]


def _float32_list(arrays: Sequence[ArrayLike], name: str) -> list[np.ndarray]:
    if isinstance(arrays, (np.ndarray, str, bytes)) or not isinstance(arrays, Sequence):
        raise TypeError(f"{name} must be a sequence of arrays, got {type(arrays).__name__}")
    return [_as_float32(a, f"{name}[{i}]") for i, a in enumerate(arrays)]


def topk_many(arrays: Sequence[ArrayLike], k: int) -> list[tuple[np.ndarray, np.ndarray]]:
    """``topk`` over several arrays as if concatenated, without concatenating them (a
    model's tensors selected together): the k largest magnitudes of them all, as one
    ``(indices, values)`` per array, indices into that array. Ties go to the earlier
    array, then the lower index, as in the concatenation."""
    flat = _float32_list(arrays, "arrays")
    return _split(*_core.topk_many(flat, _count(k, "k")))


def threshold_topk_many(
    arrays: Sequence[ArrayLike], ratio: float, seed: Seed = None
) -> list[tuple[np.ndarray, np.ndarray]]:
    """``threshold_topk`` over several arrays as if concatenated, one ``(indices, values)`` per array."""
    flat = _float32_list(arrays, "arrays")
    r = float(ratio)
    if not 0.0 <= r <= 1.0:
        raise ValueError(f"ratio must be in [0, 1], got {ratio!r}")
    return _split(*_core.threshold_topk_many(flat, r, _seed(seed)))


def ef_topk_many(
    updates: Sequence[ArrayLike], residuals: Sequence[ArrayLike], k: int, zero_selected: bool = True
) -> list[tuple[np.ndarray, np.ndarray]]:
    """``ef_topk`` over pairs of (update, residual) as if each were concatenated: every
    residual += its update, the k largest magnitudes of all the residuals together, one
    ``(indices, values)`` per pair. If it raises (a NaN in a sum), every residual holds
    residual + update in full."""
    if isinstance(residuals, (np.ndarray, str, bytes)) or not isinstance(residuals, Sequence):
        raise TypeError(f"residuals must be a sequence of arrays, got {type(residuals).__name__}")
    res = [_as_inplace_float32(r, f"residuals[{i}]") for i, r in enumerate(residuals)]
    upd = _float32_list(updates, "updates")
    if len(upd) != len(res):
        raise ValueError(f"{len(upd)} updates but {len(res)} residuals")
    for i, (u, r) in enumerate(zip(upd, res)):
        if u.size != r.size:
            raise ValueError(f"updates[{i}] has {u.size} elements but residuals[{i}] has {r.size}")
    return _split(*_core.ef_topk_many(upd, res, _count(k, "k"), bool(zero_selected)))


# ------------------------------------------------------------- quantization --
def packed_size(n: int, bits: int) -> int:
    """Bytes of ``quantize``'s packed output for n elements: ceil(n * bits / 8)."""
    return (_count(n, "n") * _bits(bits) + 7) // 8


def quantize(
    x: ArrayLike, bits: int, bucket: int = 512, stochastic: bool = True, seed: Seed = None
) -> tuple[np.ndarray, np.ndarray]:
    """Quantize to 1, 2, 4 or 8 bits with one max-abs scale per bucket.

    Codes ``j in [0, 2**bits - 1]`` stand for ``scale * (2j - L) / L`` with
    ``L = 2**bits - 1``: a symmetric grid from -scale to +scale. Stochastic
    rounding is unbiased and reproducible for a given seed; ``stochastic=False``
    rounds to nearest. Returns ``(packed, scales)``: uint8 of exactly
    ``ceil(n * bits / 8)`` bytes (element i at bit i*bits, LSB first) and
    float32 of ``ceil(n / bucket)`` scales. NaN or infinity raises ValueError.
    """
    arr = _as_float32(x, "x")
    b = _bits(bits)
    return _core.quantize(arr, b, _bucket(bucket), bool(stochastic), _seed(seed) if stochastic else 0)


def dequantize(
    packed: ArrayLike,
    scales: ArrayLike,
    bits: int,
    n: int,
    bucket: int = 512,
    acc: Optional[ArrayLike] = None,
    weight: float = 1.0,
    accumulate: bool = True,
) -> np.ndarray:
    """Inverse of ``quantize``, times ``weight`` (1: the values themselves): float32[n].

    With ``acc`` (a writable float32[n]) the result goes there instead of a new array
    and ``acc`` is returned: added to it (bit for bit ``acc + float32(weight) *
    dequantize(...)``, without building the dequantized vector), or with
    ``accumulate=False`` written over it.
    """
    p = _as_packed(packed)
    s = _as_float32(scales, "scales")
    target = None if acc is None else _as_inplace_float32(acc, "acc")
    return _core.dequantize(p, s, _bits(bits), _count(n, "n"), _bucket(bucket), target, float(weight), bool(accumulate))


# ----------------------------------------------------------------- rotation --
_RHT_BLOCK = DEFAULT_ROTATION_BLOCK


def _rht_block(block: Any) -> int:
    value = _count(block, "block")
    if not (1 <= value <= MAX_ROTATION_BLOCK and value & (value - 1) == 0):
        raise ValueError(f"block must be a power of two in [1, 2**24], got {value}")
    return value


def _required_seed(seed: Any) -> int:
    if seed is None:
        raise TypeError("seed is required: the inverse rotation needs the same seed")
    return _seed(seed)


def rht_padded_size(n: int, block: int = _RHT_BLOCK) -> int:
    """Length of ``rht``'s output for n elements.

    ``n // block`` full blocks, then the remaining ``n % block`` elements padded
    with zeros up to their next power of two (so a vector shorter than a block
    becomes one block of ``next_pow2(n)``); 0 for n = 0.
    """
    n = _count(n, "n")
    if n > _MAX_LEN:
        raise ValueError(f"n must be < 2**32, got {n}")
    return int(_core.rht_padded_size(n, _rht_block(block)))


def rht(x: ArrayLike, seed: int, block: int = _RHT_BLOCK) -> np.ndarray:
    """Seeded randomized Hadamard rotation: float32[rht_padded_size(len(x), block)].

    Each block (see ``rht_padded_size``) is multiplied by random signs
    (a pure function of ``(seed, index)``) and then by the orthonormal
    Walsh-Hadamard matrix, so norms are preserved and heavy-tailed vectors come
    out Gaussian-like, which suits max-abs ``quantize``. ``block`` is a power
    of two up to 2**24; ``irht`` with the same seed and block inverts it.
    """
    arr = _as_float32(x, "x")
    return _core.rht(arr, _required_seed(seed), _rht_block(block))


def irht(y: ArrayLike, n: int, seed: int, block: int = _RHT_BLOCK) -> np.ndarray:
    """Inverse of ``rht``: float32[n] from ``y`` of ``rht_padded_size(n, block)``."""
    arr = _as_float32(y, "y")
    n = _count(n, "n")
    if n > _MAX_LEN:
        raise ValueError(f"n must be < 2**32, got {n}")
    return _core.irht(arr, n, _required_seed(seed), _rht_block(block))


def fwht(x: ArrayLike, block: Optional[int] = None) -> ArrayLike:
    """Orthonormal Walsh-Hadamard transform of each block of x, in place; returns x.

    x is a writable contiguous float32 array or CPU tensor whose length is that
    of ``rht``'s output: whole blocks of ``block`` (a power of two), then at
    most one shorter power-of-two block. ``block=None`` transforms x as one
    block (its length must be a power of two). The transform is its own
    inverse (up to float rounding), and for a zero-padded x
    ``fwht(random_signs(x, seed), block)`` equals ``rht(x[:n], seed, block)``.
    """
    arr = _as_inplace_float32(x, "x")
    if block is None:
        size = arr.size
        if size & (size - 1):
            raise ValueError(f"x must have a power-of-two length when block is None, got {size}")
        if size > MAX_ROTATION_BLOCK:
            raise ValueError(f"x has {size} elements, beyond one block of 2**24: pass block")
        b = max(1, size)
    else:
        b = _rht_block(block)
    _core.fwht(arr, b)
    return x


def random_signs(x: ArrayLike, seed: int) -> ArrayLike:
    """``x_i *= s_i`` in place with the random signs ``rht`` uses for seed; returns x."""
    arr = _as_inplace_float32(x, "x")
    _core.random_signs(arr, _required_seed(seed))
    return x


# --------------------------------------------------------------------- eden --
EDEN_CLIP = 3.3
_EDEN_BITS = (1, 2, 3, 4, 8)
_EDEN_SCALES = ("unbiased", "mse")


def _eden_bits(bits: Any) -> int:
    value = _count(bits, "bits")
    if value not in _EDEN_BITS:
        raise ValueError(f"bits must be 1, 2, 3, 4 or 8, got {value}")
    return value


def _eden_mode(bits: Any, stochastic: Any, scale: Any) -> tuple[int, bool, bool]:
    """(bits, stochastic, mse) checked."""
    b = _eden_bits(bits)
    if scale not in _EDEN_SCALES:
        raise ValueError(f"scale must be 'unbiased' or 'mse', got {scale!r}")
    if scale == "mse" and stochastic:
        raise ValueError("scale='mse' is for nearest rounding; the stochastic scale is fixed")
    return b, bool(stochastic), scale == "mse"


def _length(n: Any, name: str = "n") -> int:
    value = _count(n, name)
    if value > _MAX_LEN:
        raise ValueError(f"{name} must be < 2**32, got {value}")
    return value


def _eden_codes(packed: ArrayLike, scales: ArrayLike) -> tuple[np.ndarray, np.ndarray]:
    """The packed codes and the float32 scales."""
    return _as_packed(packed), _as_float32(scales, "scales")


def eden_centroids(bits: int) -> np.ndarray:
    """The ``2**bits`` Lloyd-Max centroids of N(0, 1), ascending and symmetric (float32).

    Nearest rounding maps each normalised coordinate to the closest of them;
    the decision boundaries are the float32 midpoints between neighbours.
    """
    return _core.eden_centroids(_eden_bits(bits))


def eden_levels(bits: int) -> np.ndarray:
    """The ``2**bits`` levels of the stochastic mode, ascending and symmetric
    (float32).

    They run from ``-EDEN_CLIP`` to ``EDEN_CLIP``, spaced for N(0, 1)
    coordinates: the interior levels minimise the variance of stochastic
    rounding, ``E[(z - l_j)(l_{j+1} - z)]`` for z ~ N(0, 1), which is the
    mode's vNMSE (about 0.625, 0.0989, 0.0206 at 2, 3, 4 bits). A coordinate
    between ``l_j`` and ``l_{j+1}`` becomes ``l_{j+1}`` with probability
    ``(z - l_j) / (l_{j+1} - l_j)``, else ``l_j``.
    """
    return _core.eden_levels(_eden_bits(bits))


def eden_quantize(
    y: ArrayLike,
    n: int,
    bits: int,
    seed: Seed = None,
    block: int = _RHT_BLOCK,
    stochastic: bool = False,
    scale: str = "unbiased",
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """EDEN quantization of a rotated vector (Vargaftik et al., 2022).

    ``y`` is ``rht(x, seed, block)`` of some x of n elements, so it has
    ``rht_padded_size(n, block)`` elements. Each rotation block (length L, norm
    r) is normalised to ``z = y * sqrt(L) / r`` and every coordinate is coded
    in ``bits`` (1, 2, 3, 4 or 8) bits:

    * ``stochastic=False``: the nearest of ``eden_centroids``, with one
      scale per block, ``r**2 / <y, c>`` (``scale="unbiased"``, EDEN's: the
      error is about mse / (1 - mse) of ||x||^2 on any input) or
      ``<y, c> / ||c||**2`` (``scale="mse"``: smaller error, biased).
    * ``stochastic=True``: unbiased stochastic rounding between the
      ``eden_levels``, scale ``r / sqrt(L)``, driven by ``seed``;
      coordinates beyond ``EDEN_CLIP`` are outliers, sent exactly.

    Returns ``(packed, scales, outlier_idx, outlier_val)``: uint8 codes (element
    i at bits ``[i*bits, (i+1)*bits)``, LSB first, ``ceil(m*bits/8)`` bytes),
    float32 ``scales`` (one per block), and the outliers' ascending uint32
    positions in y and float32 values (empty unless stochastic).
    """
    arr = _as_float32(y, "y")
    b, stochastic, mse = _eden_mode(bits, stochastic, scale)
    return _core.eden_quantize(arr, _length(n), b, _seed(seed) if stochastic else 0, _rht_block(block), stochastic, mse)


def eden_dequantize(
    packed: ArrayLike, scales: ArrayLike, n: int, bits: int, block: int = _RHT_BLOCK, stochastic: bool = False
) -> np.ndarray:
    """The rotated vector ``eden_quantize``'s codes stand for:
    float32[rht_padded_size(n, block)], ``scales[block of i] * table[code_i]``.

    Outliers are not applied (``y[outlier_idx] = outlier_val`` does that).
    Nonzero padding bits in the last byte raise ValueError.
    """
    p, s = _eden_codes(packed, scales)
    return _core.eden_dequantize(p, s, _length(n), _eden_bits(bits), _rht_block(block), bool(stochastic))


def eden_accumulate(
    acc: ArrayLike,
    packed: ArrayLike,
    scales: ArrayLike,
    n: int,
    bits: int,
    block: int = _RHT_BLOCK,
    stochastic: bool = False,
    weight: float = 1.0,
) -> None:
    """``acc += float32(weight) * eden_dequantize(packed, scales, n, bits, block, stochastic)``
    in place, without building the dequantized vector (bit-identical to doing so).

    acc is a writable contiguous float32 array or CPU tensor of
    ``rht_padded_size(n, block)`` elements: a rotated-domain sum of clients
    that share one rotation. Outliers are not applied.
    """
    a = _as_inplace_float32(acc, "acc")
    p, s = _eden_codes(packed, scales)
    _core.eden_accumulate(a, p, s, _length(n), _eden_bits(bits), _rht_block(block), bool(stochastic), float(weight))


def eden_encode(
    x: ArrayLike,
    bits: int,
    seed: int,
    block: int = _RHT_BLOCK,
    stochastic: bool = False,
    scale: str = "unbiased",
    quant_seed: Seed = None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """EDEN in the wire layout of a payload's eden section (``docs/format.md``).

    ``x`` is cut into segments (all whole blocks, then power-of-two tails); each
    segment is rotated twice under seeds derived from ``seed`` and quantized by
    ``eden_quantize`` under a seed derived from ``quant_seed``, a cache-sized
    range of blocks at a time (the rotated vector is never built). ``quant_seed``
    defaults to a seed derived from ``seed``. Returns ``(packed, scales,
    outlier_idx, outlier_val)``: each segment's codes in turn (each from a byte
    boundary), the segments' scales in turn, and the stochastic mode's outliers
    (ascending positions in ``[0, len(x))``).
    """
    arr = _as_float32(x, "x")
    b, stochastic, mse = _eden_mode(bits, stochastic, scale)
    rot = _required_seed(seed)
    q = _core.eden_derived_seed(rot) if quant_seed is None else _seed(quant_seed)
    return _core.eden_encode(arr, b, rot, _rht_block(block), stochastic, mse, q)


def eden_decode(
    packed: ArrayLike,
    scales: ArrayLike,
    n: int,
    bits: int,
    seed: int,
    block: int = _RHT_BLOCK,
    stochastic: bool = False,
    outlier_idx: Optional[ArrayLike] = None,
    outlier_val: Optional[ArrayLike] = None,
    acc: Optional[ArrayLike] = None,
    weight: float = 1.0,
    accumulate: bool = True,
) -> np.ndarray:
    """Inverse of ``eden_encode``, times ``weight`` (1: the values themselves): float32[n].

    Dequantizes, puts the outliers (strictly ascending positions in ``[0, n)``)
    in place and undoes both rotations of every segment, a range of blocks at a
    time. With ``acc`` (a writable float32[n]) the result goes there and ``acc``
    is returned: added to it (without building the decoded vector), or with
    ``accumulate=False`` written over it.
    """
    p, s = _eden_codes(packed, scales)
    if (outlier_idx is None) != (outlier_val is None):
        raise ValueError("outlier_idx and outlier_val go together: give both or neither")
    if outlier_idx is None:
        idx, val = np.zeros(0, np.uint32), np.zeros(0, np.float32)
    else:
        idx = _as_indices(outlier_idx, "outlier_idx", error=ValueError)
        val = _as_float32(outlier_val, "outlier_val")
    return _core.eden_decode(
        p,
        s,
        _length(n),
        _eden_bits(bits),
        _required_seed(seed),
        _rht_block(block),
        bool(stochastic),
        idx,
        val,
        None if acc is None else _as_inplace_float32(acc, "acc"),
        float(weight),
        bool(accumulate),
    )


# ------------------------------------------------------------ index coding --
def encode_indices(indices: ArrayLike, n: int, *, version: int = 2) -> bytes:
    """Gap coding of strictly ascending indices in [0, n): the index stream of payload
    format ``version`` (docs/format.md, "Index stream").

    Version 2 (what payloads carry now) is a split Rice code: the gaps' quotients as a
    unary bitmap and their low bits as a fixed-width array, which decode without a serial
    chain and check without decoding; version 1 is the Golomb code of version-1 payloads.
    Both land within about 1% of the information bound ``log2(C(n, k)) / k`` bits per
    index for uniformly spread indices (version 2 about 0.01 bit above version 1).
    """
    idx = _as_indices(indices, "indices", error=ValueError)
    n = _count(n, "n")
    if n > _MAX_LEN + 1:  # indices < n fit in 32 bits
        raise ValueError(f"n must be <= 2**32, got {n}")
    return _core.encode_indices(idx, n, _stream_version(version))


def _stream_version(version: Any) -> int:
    if isinstance(version, bool) or version not in (1, 2):
        raise ValueError(f"version must be 1 or 2 (the payload format versions), got {version!r}")
    return int(version)


def decode_indices(
    buf: Union[bytes, bytearray, memoryview],
    n: int,
    max_count: Optional[int] = None,
    out: Optional[np.ndarray] = None,
    *,
    version: int = 2,
) -> np.ndarray:
    """Decode ``encode_indices`` output (of the same ``version``) into uint32 indices.

    The whole buffer must be one valid stream; any corruption (truncation,
    trailing bytes, an index >= n, a count above ``max_count`` (default n))
    raises ``fedpress.DecodeError`` (a ValueError) before more than the input's
    size is allocated. With ``out`` (a writable uint32 array), the indices go
    there and ``out`` is returned; a stream whose count is not ``len(out)`` is
    malformed.
    """
    if isinstance(buf, np.ndarray):
        buf = buf.tobytes()
    if not isinstance(buf, (bytes, bytearray, memoryview)):
        raise TypeError(f"buf must be bytes-like, got {type(buf).__name__}")
    n = _count(n, "n")
    if n > _MAX_LEN + 1:  # indices < n fit in 32 bits
        raise ValueError(f"n must be <= 2**32, got {n}")
    limit = n if max_count is None else _count(max_count, "max_count")
    return _core.decode_indices(memoryview(buf).cast("B"), n, limit, out, _stream_version(version))


# ------------------------------------------------------------- accumulation --
def _as_values(values: ArrayLike, name: str) -> np.ndarray:
    return _as_float32(values, name)


def scatter_add(acc: ArrayLike, indices: ArrayLike, values: ArrayLike, weight: float = 1.0) -> None:
    """``acc[indices] += weight * values`` in place (duplicates accumulate).

    acc must be a writable contiguous float32 array or CPU tensor. Every index is
    checked first: one >= len(acc) raises IndexError and nothing is written.
    """
    a = _as_inplace_float32(acc, "acc")
    idx = _as_indices(indices, "indices")
    val = _as_values(values, "values")
    _core.scatter_add(a, idx, val, float(weight))


def scatter_add_many(
    acc: ArrayLike,
    indices_list: Sequence[ArrayLike],
    values_list: Sequence[ArrayLike],
    weights: Optional[Sequence[float]] = None,
) -> None:
    """Adds many clients' sparse updates: for each client c in order,
    ``acc[indices_list[c]] += weights[c] * values_list[c]``.

    Blocked so each slice of acc stays in cache while every client's entries
    for it are added; each element receives its additions in client order, so
    the sum does not depend on the thread count. Sorted indices are used as
    they are; unsorted ones are sorted (stably) on a copy first. All indices are
    checked before anything is written.
    """
    a = _as_inplace_float32(acc, "acc")
    idx_list = list(indices_list)
    val_list = list(values_list)
    if weights is None:
        w = [1.0] * len(idx_list)
    else:
        w = [float(v) for v in weights]
    if not (len(idx_list) == len(val_list) == len(w)):
        raise ValueError(
            "indices_list, values_list and weights must have equal lengths, got "
            f"{len(idx_list)}, {len(val_list)}, {len(w)}"
        )
    idx_arrays, val_arrays = [], []
    for c, (i, v) in enumerate(zip(idx_list, val_list)):
        ia = _as_indices(i, f"indices_list[{c}]")
        va = _as_values(v, f"values_list[{c}]")
        idx_arrays.append(ia)
        val_arrays.append(va)
    _core.scatter_add_many(a, idx_arrays, val_arrays, w)


# ------------------------------------------------------------------ runtime --
def get_num_threads() -> int:
    """Threads the kernels may use (default: all cores, or FEDPRESS_NUM_THREADS)."""
    return int(_core.num_threads())


def set_num_threads(n: int) -> None:
    """Set the threads the kernels may use. Results are identical for any value."""
    _core.set_num_threads(_count(n, "n"))


def simd() -> str:
    """The instruction set of the explicitly dispatched kernels: avx512, avx2 or scalar."""
    return str(_core.simd())
