"""Kernel benchmark: every fedpress kernel against its fastest peers, in one process.

Each kernel is timed next to the numpy / torch / zstd code a user would write
instead, on the same input, in the same process (so both see the same CPU
frequency, the same page cache and the same thread settings), and the two
answers are compared. Times are medians of several runs after a warm-up.

Besides ``peer ms / fedpress ms`` every row shows fedpress's time divided by
one streaming read of the input (the fastest of a few full-read numpy
reductions): a kernel near 1x is memory bound and has nothing left to win.

A second row group, ``pipeline`` (:mod:`fedpress._bench_pipeline`), times the
payload path (Encoder, Codec.encode, Aggregator, decode) against the kernels it
is built on, at the largest size.

Run it as ``fedpress bench [options]`` or ``python bench/kernels.py [options]``.
The exit status is 1 only when a correctness check fails; the performance
targets printed at the end are informational.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import gc
import importlib
import json
import math
import os
import platform
import statistics
import sys
import time
import warnings
from decimal import Decimal, InvalidOperation
from types import ModuleType
from typing import Any, Callable, Optional, Sequence

import numpy as np

from . import __version__, ops

try:
    import resource  # POSIX only; page-fault counts are omitted elsewhere
except ImportError:  # pragma: no cover - Windows
    resource = None  # type: ignore[assignment]

__all__ = [
    "KERNELS",
    "DEFAULT_SIZES",
    "QUICK_SIZES",
    "Row",
    "parse_size",
    "format_size",
    "cpu_name",
    "add_arguments",
    "run",
    "run_from_args",
    "main",
]

# ResNet-18 has 11.7M parameters and ResNet-50 25.6M: the update sizes a
# federated client actually sends; 1M shows the in-cache regime.
DEFAULT_SIZES: tuple[int, ...] = (1_000_000, 11_700_000, 25_600_000)
QUICK_SIZES: tuple[int, ...] = (1_000_000, 4_000_000)
#: The size the performance targets are defined at (a 25.6M-parameter model).
TARGET_SIZE = 25_600_000
KERNELS: tuple[str, ...] = ("topk", "threshold", "quantize4", "int8", "scatter", "indexcode", "ef_topk")
#: Row groups beside the kernels: the payload path against its kernels (fedpress._bench_pipeline).
PIPELINE = "pipeline"

DENSITY = 0.01  # top-k / random-k keep 1% of the entries
BUCKET = 512
CLIENTS = 100
SEED = 12345
# Error bounds hold in exact arithmetic; float32 rounding of the scale, of the
# reconstruction and of x - deq adds a few ulps of the bucket's scale (an input
# exactly halfway between two levels already exceeds half a step by ~1e-5).
_ULPS = 8 * float(np.finfo(np.float32).eps)
_NOISY = 1.3  # rows whose median exceeds 1.3x their fastest run are flagged


# ------------------------------------------------------------------ helpers --
def parse_size(text: str) -> int:
    """'1M', '11.7M', '25.6m', '4k', '1e6', '1000000', '1_000_000' -> int."""
    s = text.strip().replace("_", "")
    mult = 1
    suffixes = {"k": 10**3, "m": 10**6, "g": 10**9}
    if s and s[-1].lower() in suffixes:
        mult = suffixes[s[-1].lower()]
        s = s[:-1]
    try:
        # Decimal, not float, so '11.7M' is exactly 11_700_000.
        value = Decimal(s) * mult
    except InvalidOperation:
        raise argparse.ArgumentTypeError(f"not a size: {text!r} (try 1M, 11.7M, 1000000)") from None
    if value != value.to_integral_value() or value < 1:
        raise argparse.ArgumentTypeError(f"size must be a positive whole number: {text!r}")
    return int(value)


def format_size(n: int) -> str:
    """25_600_000 -> '25.6M' (inverse of parse_size for the usual sizes)."""
    for unit, mult in (("G", 10**9), ("M", 10**6), ("k", 10**3)):
        if n >= mult and (n * 10) % mult == 0:
            return f"{n / mult:g}{unit}"
    return str(n)


def _fmt_ms(ms: Optional[float]) -> str:
    if ms is None:
        return "-"
    if ms >= 100:
        return f"{ms:.0f}"
    if ms >= 10:
        return f"{ms:.1f}"
    if ms >= 1:
        return f"{ms:.2f}"
    return f"{ms:.3f}"


def _fmt_ratio(r: Optional[float]) -> str:
    if r is None:
        return "-"
    return f"{r:.1f}x" if r >= 10 else f"{r:.2f}x"


class _Timing(float):
    """A median time in ms (usable as a float) that also carries run statistics."""

    min_ms: float
    runs: int
    faults_per_run: float  # minor page faults per timed call: fresh memory being zeroed

    def __new__(cls, median_ms: float, min_ms: float, runs: int, faults_per_run: float) -> "_Timing":
        obj = super().__new__(cls, median_ms)
        obj.min_ms, obj.runs, obj.faults_per_run = min_ms, runs, faults_per_run
        return obj

    def __deepcopy__(self, memo: dict[int, Any]) -> float:
        # dataclasses.asdict deep-copies; the JSON wants a plain number.
        return float(self)


def _minor_faults() -> int:
    if resource is None:
        return 0
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


def _timeit(
    fn: Callable[[], Any],
    *,
    repeat: int,
    warmup: int = 1,
    setup: Optional[Callable[[], Any]] = None,
    min_total: float = 0.0,
    max_runs: int = 50,
) -> _Timing:
    """Median wall time of fn() in milliseconds.

    `setup` runs untimed before every call (e.g. to restore an input that fn
    modifies in place). Fast calls are repeated until about `min_total`
    seconds were measured, because a median of 5 sub-millisecond runs is noise.
    Page faults inside the timed calls are counted: a call that gets fresh
    memory from the kernel pays for zeroing it, which can double a
    memory-bound kernel's time depending on the allocator's state.
    """
    for _ in range(warmup):
        if setup is not None:
            setup()
        fn()
    times: list[float] = []
    faults = 0
    runs = repeat
    while len(times) < runs:
        if setup is not None:
            setup()
        f0 = _minor_faults()
        t0 = time.perf_counter()
        result = fn()
        t1 = time.perf_counter()
        faults += _minor_faults() - f0
        del result  # freeing the output is not part of either side's time
        times.append(t1 - t0)
        if len(times) == 1 and min_total > 0:
            runs = max(repeat, min(max_runs, int(min_total / max(times[0], 1e-9))))
    return _Timing(statistics.median(times) * 1e3, min(times) * 1e3, len(times), faults / len(times))


@dataclasses.dataclass
class Row:
    """One line of the table: a fedpress kernel against one peer at one size."""

    kernel: str
    n: int
    fedpress_ms: Optional[float]
    peer: str
    peer_ms: Optional[float]
    read_ms: float
    ok: Optional[bool]  # None: nothing to check on this row
    note: str = ""
    extra: dict[str, Any] = dataclasses.field(default_factory=dict)

    @property
    def ratio(self) -> Optional[float]:
        """Peer time / fedpress time (> 1: fedpress is faster)."""
        if self.fedpress_ms is None or self.peer_ms is None or self.fedpress_ms <= 0:
            return None
        return self.peer_ms / self.fedpress_ms

    @property
    def read_ratio(self) -> Optional[float]:
        """Fedpress time in units of one streaming read of the input."""
        if self.fedpress_ms is None or self.read_ms <= 0:
            return None
        return self.fedpress_ms / self.read_ms

    def as_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["ratio"] = self.ratio
        d["read_ratio"] = self.read_ratio
        return d


_COLS = (
    ("kernel", 16, "<"),
    ("N", 6, ">"),
    ("fedpress ms", 11, ">"),
    ("peer", 30, "<"),
    ("peer ms", 9, ">"),
    ("ratio", 7, ">"),
    ("/read", 6, ">"),
    ("check", 5, "<"),
    ("note", 0, "<"),
)


def _line(cells: Sequence[str]) -> str:
    parts = []
    for (_, width, align), cell in zip(_COLS, cells):
        parts.append(f"{cell:{align}{width}}" if width else cell)
    return "  ".join(parts).rstrip()


def _row_line(row: Row) -> str:
    check = "-" if row.ok is None else ("OK" if row.ok else "FAIL")
    return _line(
        [
            row.kernel,
            format_size(row.n),
            _fmt_ms(row.fedpress_ms),
            row.peer,
            _fmt_ms(row.peer_ms) if row.peer_ms is not None else "skip",
            _fmt_ratio(row.ratio),
            _fmt_ratio(row.read_ratio),
            check,
            row.note,
        ]
    )


def _same_selection(a: np.ndarray, b: np.ndarray, mag: np.ndarray) -> tuple[bool, int]:
    """Whether two top-k index sets agree up to ties at the k-th magnitude.

    argpartition and torch.topk break ties arbitrarily, so with float32 data
    at 25M elements two correct answers may differ in which of several equal
    magnitudes at the boundary they keep. Returns (agree, number swapped).
    """
    a = np.sort(a.astype(np.int64, copy=False))
    b = np.sort(b.astype(np.int64, copy=False))
    if a.size != b.size:
        return False, -1
    if np.array_equal(a, b):
        return True, 0
    diff = np.setxor1d(a, b, assume_unique=True)
    kth_a, kth_b = mag[a].min(), mag[b].min()
    return bool(kth_a == kth_b and np.all(mag[diff] == kth_a)), diff.size // 2


def _selection_note(same: bool, swapped: int) -> str:
    if not same:
        return "index sets differ" + (f" in {swapped} entries" if swapped > 0 else " in size")
    return f"{swapped} tied entries swapped" if swapped else ""


def _lower_index_wins(idx: np.ndarray, mag: np.ndarray) -> bool:
    """fedpress documents that among equal magnitudes the lower index wins."""
    if idx.size == 0:
        return True
    kth = mag[idx].min()
    tied = np.flatnonzero(mag == kth)
    chosen = np.isin(tied, idx)
    # The chosen tied entries must be a prefix of all tied entries.
    return bool(np.all(chosen[: int(chosen.sum())]))


def _bucket_max(a: np.ndarray, bucket: int) -> np.ndarray:
    """Per-bucket maximum of a non-negative array (zero padding is harmless)."""
    pad = (-a.size) % bucket
    if pad:
        a = np.concatenate([a, np.zeros(pad, dtype=a.dtype)])
    return a.reshape(-1, bucket).max(axis=1)


def _log2_binom(n: int, k: int) -> float:
    return (math.lgamma(n + 1) - math.lgamma(k + 1) - math.lgamma(n - k + 1)) / math.log(2)


def _busy_cpu_seconds() -> Optional[float]:
    """CPU seconds all processes on this machine (or VM) have spent busy, or None."""
    try:
        with open("/proc/stat", encoding="utf-8") as f:
            fields = f.readline().split()
    except OSError:
        return None
    if not fields or fields[0] != "cpu":
        return None
    # user nice system idle iowait irq softirq steal ...; idle and iowait are not busy.
    ticks = [int(v) for v in fields[1:]]
    busy = sum(ticks) - ticks[3] - (ticks[4] if len(ticks) > 4 else 0)
    return busy / os.sysconf("SC_CLK_TCK")


def _optional_module(name: str) -> Optional[ModuleType]:
    """The module, or None where it is not installed (its peers are then skipped)."""
    try:
        return importlib.import_module(name)
    except ImportError:
        return None


def cpu_name() -> str:
    """The processor's model name (from /proc/cpuinfo where there is one)."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


# ---------------------------------------------------------------- the bench --
@dataclasses.dataclass
class _Config:
    sizes: list[int]
    repeat: int
    warmup: int
    min_total: float
    quick: bool
    kernels: list[str]
    torch: Any  # the torch module, or None
    zstd: Any  # the zstandard module, or None
    echo: Callable[[str], None]


class _Bench:
    def __init__(self, cfg: _Config) -> None:
        self.cfg = cfg
        self.rows: list[Row] = []
        self.reads: list[dict[str, Any]] = []
        self.failures: list[str] = []

    # -- plumbing
    def time(self, fn: Callable[[], Any], setup: Optional[Callable[[], Any]] = None) -> _Timing:
        return _timeit(
            fn,
            repeat=self.cfg.repeat,
            warmup=self.cfg.warmup,
            setup=setup,
            min_total=self.cfg.min_total,
        )

    def slow_peer_ok(self, n: int) -> bool:
        """--quick skips the slow peers (seconds per call) above 4M."""
        return not self.cfg.quick or n <= 4_000_000

    def add(self, row: Row) -> None:
        # Keep the run statistics in the JSON, and plain floats in the fields.
        noisy = []
        for side in ("fedpress", "peer"):
            t = getattr(row, f"{side}_ms")
            if isinstance(t, _Timing):
                row.extra[f"{side}_min_ms"] = t.min_ms
                row.extra[f"{side}_runs"] = t.runs
                row.extra[f"{side}_faults_per_run"] = t.faults_per_run
                setattr(row, f"{side}_ms", float(t))
                # A median far above the best run means the machine was busy.
                if t.runs >= 3 and t.min_ms > 0 and float(t) > _NOISY * t.min_ms:
                    noisy.append(f"{side} median/min {float(t) / t.min_ms:.1f}")
        if noisy:
            row.note = (row.note + " " if row.note else "") + "[noisy: " + ", ".join(noisy) + "]"
        self.rows.append(row)
        if row.ok is False:
            self.failures.append(f"{row.kernel} N={format_size(row.n)} vs {row.peer}: {row.note}")
        self.cfg.echo(_row_line(row))

    def skipped(
        self, kernel: str, n: int, fp_ms: Optional[float], peer: str, read: float, why: str, ok: Optional[bool] = None
    ) -> None:
        """A row whose peer did not run; `ok` still reports fedpress's own checks."""
        self.add(Row(kernel, n, fp_ms, peer, None, read, ok, why))

    # -- per size
    def run_size(self, n: int) -> None:
        cfg = self.cfg
        rng = np.random.default_rng(SEED + n)
        x = rng.standard_normal(n, dtype=np.float32)
        k = max(1, round(n * DENSITY))

        # One streaming read: the fastest of a few full-read reductions (numpy
        # is single-threaded here except np.dot, which goes through BLAS).
        candidates = {
            "x.max()": lambda: x.max(),
            "np.sum(x)": lambda: np.sum(x),
            "np.dot(x,x)": lambda: np.dot(x, x),
        }
        read_times = {name: float(self.time(fn)) for name, fn in candidates.items()}
        read_name = min(read_times, key=read_times.__getitem__)
        read = read_times[read_name]
        out = np.empty_like(x)
        copy_ms = float(self.time(lambda: np.copyto(out, x)))
        del out
        gbs = x.nbytes / (read * 1e-3) / 1e9
        self.reads.append(
            {
                "n": n,
                "read_op": read_name,
                "read_ms": read,
                "read_GBps": gbs,
                "read_candidates_ms": read_times,
                "copyto_ms": copy_ms,
            }
        )
        cfg.echo("")
        cfg.echo(
            f"N = {format_size(n)} ({n} float32, {x.nbytes / 1e6:.0f} MB), k = {k}: "
            f"streaming read {_fmt_ms(read)} ms ({read_name}, {gbs:.1f} GB/s), "
            f"np.copyto {_fmt_ms(copy_ms)} ms"
        )

        ctx: dict[str, Any] = {"x": x, "k": k, "read": read}
        for name in cfg.kernels:
            getattr(self, f"k_{name}")(n, ctx)
            gc.collect()
        ctx.clear()
        del x
        gc.collect()

    # -- kernels
    def _argpartition_topk(self, x: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        idx = np.argpartition(np.abs(x), x.size - k)[x.size - k :]
        return idx, x[idx]

    def k_topk(self, n: int, ctx: dict[str, Any]) -> None:
        x, k, read = ctx["x"], ctx["k"], ctx["read"]
        mag = np.abs(x)
        fp_ms = self.time(lambda: ops.topk(x, k))
        idx, vals = ops.topk(x, k)
        fp_ok = bool(
            idx.size == k
            and np.all(idx[1:] > idx[:-1])
            and np.array_equal(vals, x[idx])
            and _lower_index_wins(idx, mag)
        )
        ctx["topk_idx"] = idx

        np_ms = self.time(lambda: self._argpartition_topk(x, k))
        ctx["argpartition_ms"] = np_ms
        pidx, pvals = self._argpartition_topk(x, k)
        same, swapped = _same_selection(idx, pidx, mag)
        note = _selection_note(same, swapped)
        if not fp_ok:
            note = "fedpress output not ascending / values != x[idx] / tie rule broken"
        self.add(Row("topk", n, fp_ms, "np.argpartition(|x|)+gather", np_ms, read, fp_ok and same, note))
        del pidx, pvals

        torch = self.cfg.torch
        peer = "torch.topk(|t|)+gather"
        if torch is None:
            self.skipped("topk", n, fp_ms, peer, read, "torch not installed", fp_ok)
        elif not self.slow_peer_ok(n):
            self.skipped("topk", n, fp_ms, peer, read, "skipped (--quick)", fp_ok)
        else:
            t = torch.from_numpy(x)

            def torch_topk() -> Any:
                _, i = torch.topk(torch.abs(t), k, sorted=False)
                return i, t[i]

            t_ms = self.time(torch_topk)
            ti, _ = torch_topk()
            same, swapped = _same_selection(idx, ti.numpy(), mag)
            self.add(Row("topk", n, fp_ms, peer, t_ms, read, fp_ok and same, _selection_note(same, swapped)))

    def k_threshold(self, n: int, ctx: dict[str, Any]) -> None:
        x, k, read = ctx["x"], ctx["k"], ctx["read"]
        fp_ms = self.time(lambda: ops.threshold_topk(x, DENSITY, SEED))
        idx, vals = ops.threshold_topk(x, DENSITY, SEED)
        mag = np.abs(x)
        sel = np.zeros(n, dtype=bool)
        sel[idx] = True
        # It must return exactly the count largest magnitudes, count within +-10% of k.
        largest = idx.size == 0 or idx.size == n or mag[sel].min() >= mag[~sel].max()
        ok = bool(
            abs(idx.size - k) <= 0.1 * k + 1 and np.all(idx[1:] > idx[:-1]) and np.array_equal(vals, x[idx]) and largest
        )
        np_ms = ctx.get("argpartition_ms")
        if np_ms is None:
            np_ms = self.time(lambda: self._argpartition_topk(x, k))
        note = f"count {idx.size} (k={k}, {100 * (idx.size - k) / k:+.1f}%)"
        if not largest:
            note += "; NOT the largest magnitudes"
        self.add(
            Row(
                "threshold_topk",
                n,
                fp_ms,
                "np.argpartition (exact k)",
                np_ms,
                read,
                ok,
                note,
                {"count": int(idx.size), "k": k},
            )
        )

    def k_quantize4(self, n: int, ctx: dict[str, Any]) -> None:
        x, read = ctx["x"], ctx["read"]
        bits, levels = 4, 15
        fp_ms = self.time(lambda: ops.quantize(x, bits, BUCKET, stochastic=True, seed=SEED))
        packed, scales = ops.quantize(x, bits, BUCKET, stochastic=True, seed=SEED)
        deq = ops.dequantize(packed, scales, bits, n, BUCKET)
        err = deq - x
        absx_max = _bucket_max(np.abs(x), BUCKET)
        # Stochastic rounding moves a value at most one grid step, 2*scale/L.
        bound_ok = bool(np.all(_bucket_max(np.abs(err), BUCKET) <= 2 * scales / levels + _ULPS * scales))
        scales_ok = bool(np.allclose(scales, absx_max, rtol=1e-6, atol=0))
        size_ok = packed.size == ops.packed_size(n, bits) and scales.size == -(-n // BUCKET)
        fp_mae = float(np.mean(np.abs(err)))
        fp_bias = float(np.mean(err))
        del deq, err

        torch = self.cfg.torch
        peer = "torch QSGD 4-bit packed"
        own_ok = bound_ok and scales_ok and size_ok
        own_note = "" if own_ok else "; fedpress error bound / scales / size wrong"
        if torch is None:
            self.skipped("quantize 4b", n, fp_ms, peer, read, "torch not installed" + own_note, own_ok)
            return
        if not self.slow_peer_ok(n):
            self.skipped("quantize 4b", n, fp_ms, peer, read, "skipped (--quick)" + own_note, own_ok)
            return
        t = torch.from_numpy(x)
        gen = torch.Generator().manual_seed(SEED)

        def qsgd() -> Any:
            pad = (-n) % BUCKET
            v = torch.nn.functional.pad(t, (0, pad)).view(-1, BUCKET)
            scale = v.abs().amax(dim=1, keepdim=True)
            safe = torch.where(scale > 0, scale, torch.ones_like(scale))
            u = v.div(safe).add_(1.0).mul_(levels / 2)  # in [0, L]
            u.add_(torch.rand(u.shape, generator=gen)).floor_().clamp_(0, levels)
            j = u.to(torch.uint8).view(-1)
            return (j[0::2] | (j[1::2] << 4)), scale.view(-1)

        t_ms = self.time(qsgd)
        tp, ts = qsgd()
        # Decode the peer independently of fedpress.
        codes = torch.stack([tp & 15, tp >> 4], dim=1).view(-1)[:n].to(torch.float32)
        pad = (-n) % BUCKET
        tdeq = torch.nn.functional.pad(codes, (0, pad)).view(-1, BUCKET) * (2.0 / levels) - 1.0
        tdeq = (tdeq * ts.view(-1, 1)).view(-1)[:n].numpy()
        terr = tdeq - x
        t_mae = float(np.mean(np.abs(terr)))
        # Same layout and grid, so fedpress's dequantize must read the peer's bytes too.
        cross = ops.dequantize(tp.numpy()[: ops.packed_size(n, bits)], ts.numpy(), bits, n, BUCKET)
        cross_ok = bool(np.allclose(cross, tdeq, rtol=1e-6, atol=1e-7))
        mae_ratio = fp_mae / t_mae if t_mae > 0 else 1.0
        ok = bound_ok and scales_ok and size_ok and cross_ok and 0.8 <= mae_ratio <= 1.25
        step = float(np.mean(2 * scales / levels))
        note = f"mean|err| fp {fp_mae:.4g} peer {t_mae:.4g} (x{mae_ratio:.3f}); bias fp {fp_bias / step:+.1e} step"
        if not bound_ok:
            note += "; |err| > 2*scale/15"
        if not scales_ok:
            note += "; scales != bucket absmax"
        if not cross_ok:
            note += "; fedpress.dequantize disagrees on peer bytes"
        self.add(
            Row(
                "quantize 4b",
                n,
                fp_ms,
                peer,
                t_ms,
                read,
                ok,
                note,
                {"fp_mean_abs_err": fp_mae, "peer_mean_abs_err": t_mae, "fp_bias": fp_bias},
            )
        )
        del tp, ts, codes, tdeq, terr, cross

    def k_int8(self, n: int, ctx: dict[str, Any]) -> None:
        x, read = ctx["x"], ctx["read"]
        fp_ms = self.time(lambda: ops.quantize(x, 8, BUCKET, stochastic=False))
        packed, scales = ops.quantize(x, 8, BUCKET, stochastic=False)
        deq = ops.dequantize(packed, scales, 8, n, BUCKET)
        err = np.abs(deq - x)
        # Round to nearest on a 255-step grid: at most half a step, scale/255.
        fp_ok = bool(np.all(_bucket_max(err, BUCKET) <= scales / 255 + _ULPS * scales))
        fp_mae = float(err.mean())
        fp_note = "" if fp_ok else "; fedpress |err| > scale/255"
        del deq, err
        torch = self.cfg.torch
        if torch is None:
            self.skipped("quantize 8b", n, fp_ms, "torch qint8", read, "torch not installed" + fp_note, fp_ok)
            return
        t = torch.from_numpy(x)

        def per_tensor() -> Any:
            # The scale pass is timed: fedpress finds its scales itself too.
            scale = float(t.abs().max()) / 127
            return torch.quantize_per_tensor(t, scale, 0, torch.qint8)

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # torch deprecates quantized tensors
            t_ms = self.time(per_tensor)
            q = per_tensor()
            terr = np.abs(q.dequantize().numpy() - x)
            t_ok = bool(terr.max() <= q.q_scale() / 2 + _ULPS * 127 * q.q_scale())
            self.add(
                Row(
                    "quantize 8b",
                    n,
                    fp_ms,
                    "torch.quantize_per_tensor qint8",
                    t_ms,
                    read,
                    fp_ok and t_ok,
                    f"mean|err| fp {fp_mae:.3g} (bucket {BUCKET}) torch {terr.mean():.3g}"
                    + fp_note
                    + ("" if t_ok else "; torch |err| > scale/2"),
                    {"fp_mean_abs_err": fp_mae, "peer_mean_abs_err": float(terr.mean())},
                )
            )
            del q, terr
            peer = "torch per-channel qint8 b512"
            if not self.slow_peer_ok(n):
                self.skipped("quantize 8b", n, fp_ms, peer, read, "skipped (--quick)" + fp_note, fp_ok)
                return
            pad = (-n) % BUCKET
            zeros = torch.zeros(-(-n // BUCKET), dtype=torch.long)

            def per_channel() -> Any:
                # The same bucketing as fedpress: one scale per 512 entries.
                v = torch.nn.functional.pad(t, (0, pad)).view(-1, BUCKET)
                s = v.abs().amax(dim=1).div_(127).clamp_(min=1e-30)
                return torch.quantize_per_channel(v, s.double(), zeros, 0, torch.qint8)

            c_ms = self.time(per_channel)
            q = per_channel()
            cerr = np.abs(q.dequantize().view(-1)[:n].numpy() - x)
            cscale = q.q_per_channel_scales().numpy()
            c_ok = bool(np.all(_bucket_max(cerr, BUCKET) <= cscale / 2 + _ULPS * 127 * cscale))
            self.add(
                Row(
                    "quantize 8b",
                    n,
                    fp_ms,
                    peer,
                    c_ms,
                    read,
                    fp_ok and c_ok,
                    f"mean|err| torch {cerr.mean():.3g}" + fp_note + ("" if c_ok else "; torch |err| > scale/2"),
                    {"fp_mean_abs_err": fp_mae, "peer_mean_abs_err": float(cerr.mean())},
                )
            )
            del q, cerr

    def k_scatter(self, n: int, ctx: dict[str, Any]) -> None:
        read = ctx["read"]
        k = ctx["k"]
        rng = np.random.default_rng(SEED + 1)
        idx_list = [ops.randomk_indices(n, k, SEED + c) for c in range(CLIENTS)]
        val_list = [rng.standard_normal(k, dtype=np.float32) for _ in range(CLIENTS)]
        weights = (rng.random(CLIENTS) + 0.5) / CLIENTS
        wlist = [float(w) for w in weights]
        # Peers get int64 indices made outside the timed region, as the brief's fair setup.
        idx64 = [i.astype(np.int64) for i in idx_list]
        acc = np.zeros(n, dtype=np.float32)
        label = f"scatter_add x{CLIENTS}"

        fp_ms = self.time(lambda: ops.scatter_add_many(acc, idx_list, val_list, wlist), setup=lambda: acc.fill(0))
        acc.fill(0)
        ops.scatter_add_many(acc, idx_list, val_list, wlist)
        fp_acc = acc.copy()

        def np_loop() -> None:
            # Each client's indices are distinct, so fancy-index += is exact here.
            for i, v, w in zip(idx64, val_list, wlist):
                acc[i] += w * v

        np_ms = self.time(np_loop, setup=lambda: acc.fill(0))
        acc.fill(0)
        np_loop()
        diff = float(np.max(np.abs(fp_acc - acc)))
        ok = bool(np.allclose(fp_acc, acc, rtol=1e-5, atol=1e-6))
        self.add(Row(label, n, fp_ms, "numpy acc[i] += w*v loop", np_ms, read, ok, f"max|diff| {diff:.2g}"))

        torch = self.cfg.torch
        if torch is None:
            self.skipped(label, n, fp_ms, "torch index_add_ loop", read, "torch not installed")
        else:
            acc_t = torch.from_numpy(acc)
            idx_t = [torch.from_numpy(i) for i in idx64]
            val_t = [torch.from_numpy(v) for v in val_list]

            def torch_loop() -> None:
                # alpha= folds the weight in without allocating vals * w.
                for i, v, w in zip(idx_t, val_t, wlist):
                    acc_t.index_add_(0, i, v, alpha=w)

            t_ms = self.time(torch_loop, setup=lambda: acc.fill(0))
            acc.fill(0)
            torch_loop()
            diff = float(np.max(np.abs(fp_acc - acc)))
            ok = bool(np.allclose(fp_acc, acc, rtol=1e-5, atol=1e-6))
            self.add(Row(label, n, fp_ms, "torch index_add_ loop", t_ms, read, ok, f"max|diff| {diff:.2g}"))
        del idx_list, val_list, idx64, acc, fp_acc

    def k_indexcode(self, n: int, ctx: dict[str, Any]) -> None:
        x, k, read = ctx["x"], ctx["k"], ctx["read"]
        # Top-k of i.i.d. data: uniformly spread indices, the case the bound is for.
        idx = ctx.get("topk_idx")
        if idx is None:
            idx = ops.topk(x, k)[0]
        bound = _log2_binom(n, k) / k
        enc_ms = self.time(lambda: ops.encode_indices(idx, n))
        buf = ops.encode_indices(idx, n)
        dec_ms = self.time(lambda: ops.decode_indices(buf, n))
        rt_ok = bool(np.array_equal(ops.decode_indices(buf, n), idx))
        fp_bits = 8 * len(buf) / k
        extra = {"bits_per_index": fp_bits, "bound_bits_per_index": bound, "bytes": len(buf), "decode_ms": dec_ms}
        zstd = self.cfg.zstd
        if zstd is None:
            self.add(
                Row(
                    "encode_indices",
                    n,
                    enc_ms,
                    "zstd (not installed)",
                    None,
                    read,
                    rt_ok,
                    f"{fp_bits:.3f} b/idx, bound {bound:.3f}",
                    extra,
                )
            )
            self.add(
                Row(
                    "decode_indices",
                    n,
                    dec_ms,
                    "zstd (not installed)",
                    None,
                    read,
                    rt_ok,
                    "round trip " + ("exact" if rt_ok else "WRONG"),
                    extra,
                )
            )
            return

        def delta_bytes() -> np.ndarray:
            return np.diff(idx, prepend=np.uint32(0)).astype(np.uint32, copy=False)

        def zencode(cctx: Any) -> bytes:
            return cctx.compress(delta_bytes())

        def zdecode(dctx: Any, blob: bytes) -> np.ndarray:
            d = np.frombuffer(dctx.decompress(blob), dtype=np.uint32)
            return np.cumsum(d, dtype=np.uint32)

        levels = [3, 19] if self.slow_peer_ok(n) else [3]
        first = True
        for level in levels:
            cctx = zstd.ZstdCompressor(level=level)
            dctx = zstd.ZstdDecompressor()
            z_ms = self.time(functools.partial(zencode, cctx))
            blob = zencode(cctx)
            zd_ms = self.time(functools.partial(zdecode, dctx, blob))
            z_ok = bool(np.array_equal(zdecode(dctx, blob), idx))
            z_bits = 8 * len(blob) / k
            peer = f"zstd-{level} on uint32 deltas"
            if first:
                self.add(
                    Row(
                        "encode_indices",
                        n,
                        enc_ms,
                        peer,
                        z_ms,
                        read,
                        rt_ok and z_ok,
                        f"b/idx: fp {fp_bits:.3f}, zstd {z_bits:.3f}, bound {bound:.3f}",
                        dict(extra, peer_bits_per_index=z_bits),
                    )
                )
                self.add(
                    Row(
                        "decode_indices",
                        n,
                        dec_ms,
                        peer,
                        zd_ms,
                        read,
                        rt_ok and z_ok,
                        "round trip " + ("exact" if rt_ok else "WRONG"),
                        dict(extra, peer_bits_per_index=z_bits),
                    )
                )
                first = False
            else:
                self.add(
                    Row(
                        "encode_indices",
                        n,
                        enc_ms,
                        peer,
                        z_ms,
                        read,
                        z_ok,
                        f"b/idx: zstd-{level} {z_bits:.3f}; decode {_fmt_ms(zd_ms)} ms",
                        dict(extra, peer_bits_per_index=z_bits, peer_decode_ms=zd_ms),
                    )
                )

    def k_ef_topk(self, n: int, ctx: dict[str, Any]) -> None:
        x, k, read = ctx["x"], ctx["k"], ctx["read"]
        rng = np.random.default_rng(SEED + 2)
        r0 = 0.5 * rng.standard_normal(n, dtype=np.float32)  # a carried-over residual
        res = np.empty_like(r0)
        restore = lambda: np.copyto(res, r0)  # noqa: E731 - untimed per-run reset

        fp_ms = self.time(lambda: ops.ef_topk(x, res, k), setup=restore)
        restore()
        idx, vals = ops.ef_topk(x, res, k)
        fp_res = res.copy()

        def np_ef() -> tuple[np.ndarray, np.ndarray]:
            res.__iadd__(x)
            i = np.argpartition(np.abs(res), n - k)[n - k :]
            v = res[i]
            res[i] = 0
            return i, v

        def check(pidx: np.ndarray) -> tuple[bool, str]:
            summed = r0 + x
            mag = np.abs(summed)
            same, swapped = _same_selection(idx, pidx, mag)
            keep = np.ones(n, dtype=bool)
            keep[np.setxor1d(idx.astype(np.int64), pidx.astype(np.int64))] = False
            res_ok = np.array_equal(fp_res[keep], res[keep])
            vals_ok = np.array_equal(vals, summed[idx]) and np.all(fp_res[idx] == 0)
            ok = bool(same and res_ok and vals_ok)
            note = _selection_note(same, swapped)
            if not res_ok:
                note += " residual differs"
            if not vals_ok:
                note += " values/zeroing wrong"
            return ok, note.strip()

        np_ms = self.time(np_ef, setup=restore)
        restore()
        pidx, _ = np_ef()
        ok, note = check(pidx)
        self.add(Row("ef_topk", n, fp_ms, "numpy +=, argpartition, zero", np_ms, read, ok, note))

        torch = self.cfg.torch
        peer = "torch add_, topk, zero"
        if torch is None:
            self.skipped("ef_topk", n, fp_ms, peer, read, "torch not installed")
        elif not self.slow_peer_ok(n):
            self.skipped("ef_topk", n, fp_ms, peer, read, "skipped (--quick)")
        else:
            res_t = torch.from_numpy(res)
            x_t = torch.from_numpy(x)

            def torch_ef() -> Any:
                res_t.add_(x_t)
                _, i = torch.topk(res_t.abs(), k, sorted=False)
                v = res_t[i]
                res_t[i] = 0
                return i, v

            t_ms = self.time(torch_ef, setup=restore)
            restore()
            tidx, _ = torch_ef()
            ok, note = check(tidx.numpy())
            self.add(Row("ef_topk", n, fp_ms, peer, t_ms, read, ok, note))
        del r0, res, fp_res

    # -- summary
    def targets(self) -> list[dict[str, Any]]:
        """The project's performance targets, judged at the largest N measured."""

        def pick(kernel: str, peer_prefix: str) -> Optional[Row]:
            cands = [
                r for r in self.rows if r.kernel == kernel and r.peer.startswith(peer_prefix) and r.peer_ms is not None
            ]
            return max(cands, key=lambda r: r.n) if cands else None

        out: list[dict[str, Any]] = []

        def target(desc: str, row: Optional[Row], value: Optional[float], passed: Optional[bool], shown: str) -> None:
            # The targets are defined at the largest default size: a smaller run (--quick, --sizes)
            # does not measure them, whatever its ratios say.
            measured = row is not None and row.n >= TARGET_SIZE
            out.append(
                {
                    "target": desc,
                    "n": row.n if row else None,
                    "value": value,
                    "pass": passed if measured else None,
                    "shown": shown,
                    "measured": measured,
                }
            )

        r = pick("topk", "np.argpartition")
        target(
            "topk >= 15x faster than np.argpartition (25.6M)",
            r,
            r.ratio if r else None,
            (r.ratio >= 15) if r and r.ratio is not None else None,
            _fmt_ratio(r.ratio) if r else "-",
        )
        r = pick("quantize 4b", "torch QSGD")
        target(
            "quantize 4b >= 50x faster than torch QSGD",
            r,
            r.ratio if r else None,
            (r.ratio >= 50) if r and r.ratio is not None else None,
            _fmt_ratio(r.ratio) if r else "-",
        )
        cands = [row for row in self.rows if row.kernel == "quantize 4b"]
        r = max(cands, key=lambda row: row.n) if cands else None
        rr = r.read_ratio if r else None
        target(
            "quantize 4b within 4x of one streaming read", r, rr, (rr <= 4) if rr is not None else None, _fmt_ratio(rr)
        )
        r = pick(f"scatter_add x{CLIENTS}", "torch index_add_")
        target(
            f"scatter_add_many ({CLIENTS} clients) >= 5x faster than torch index_add_ loop",
            r,
            r.ratio if r else None,
            (r.ratio >= 5) if r and r.ratio is not None else None,
            _fmt_ratio(r.ratio) if r else "-",
        )
        cands = [row for row in self.rows if row.kernel == "encode_indices"]
        r = max(cands, key=lambda row: row.n) if cands else None
        bits = r.extra.get("bits_per_index") if r else None
        target(
            "encode_indices <= 8.5 bits/index at 1% density",
            r,
            bits,
            (bits <= 8.5) if bits is not None else None,
            f"{bits:.3f} b/idx" if bits is not None else "-",
        )
        return out


def _print_targets(targets: list[dict[str, Any]], echo: Callable[[str], None]) -> None:
    echo("")
    echo("targets (informational, at the largest N where the peer ran):")
    for t in targets:
        if not t.get("measured", True):
            verdict = f"not measured (defined at {format_size(TARGET_SIZE)}; run without --quick)"
        else:
            verdict = "n/a" if t["pass"] is None else ("PASS" if t["pass"] else "FAIL")
        n = format_size(t["n"]) if t["n"] else "-"
        echo(f"  {t['target']:<72} {n:>6} {t['shown']:>12}  {verdict}")


# --------------------------------------------------------------------- api --
def run(
    sizes: Optional[Sequence[int]] = None,
    *,
    repeat: Optional[int] = None,
    threads: Optional[int] = None,
    quick: bool = False,
    only: Optional[Sequence[str]] = None,
    memory: bool = False,
    json_path: Optional[str] = None,
    echo: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Run the benchmark, print the table, and return every number as a dict.

    The dict has ``meta``, ``reads`` (the streaming-read baselines per size),
    ``results`` (one entry per table row), ``targets``, ``failures``
    (correctness checks that failed; empty when all passed) and ``pipeline``
    (the pipeline group's numbers, None when it did not run; ``memory`` adds
    its peak-memory rows).
    """
    t_start = time.perf_counter()
    # Other processes competing for the cores skew every memory-bound,
    # multi-threaded timing; measure how much CPU they took during the run.
    busy_start, own_start = _busy_cpu_seconds(), time.process_time()
    if sizes is None:
        sizes = QUICK_SIZES if quick else DEFAULT_SIZES
    if repeat is None:
        repeat = 3 if quick else 5
    if repeat < 1:
        raise ValueError(f"repeat must be >= 1, got {repeat}")
    kernels = list(only) if only else [*KERNELS, PIPELINE]
    unknown = [k for k in kernels if k not in KERNELS and k != PIPELINE]
    if unknown:
        raise ValueError(f"unknown kernel(s) {unknown}; choose from {[*KERNELS, PIPELINE]}")
    pipeline = PIPELINE in kernels
    # threshold reuses topk's argpartition time and indexcode topk's indices,
    # so keep the canonical order whatever order --only gave.
    kernels = [k for k in KERNELS if k in kernels]

    torch = _optional_module("torch")  # optional, and slow to import
    zstandard = _optional_module("zstandard")

    if threads is not None:
        ops.set_num_threads(threads)
    n_threads = ops.get_num_threads()
    if torch is not None:
        # Peers get the same number of threads as fedpress.
        torch.set_num_threads(n_threads)

    cfg = _Config(
        sizes=list(sizes),
        repeat=repeat,
        warmup=1,
        min_total=0.02 if quick else 0.2,
        quick=quick,
        kernels=kernels,
        torch=torch,
        zstd=zstandard,
        echo=echo,
    )
    meta = {
        "fedpress": __version__,
        "threads": n_threads,
        "simd": ops.simd(),
        "numpy": np.__version__,
        "torch": getattr(torch, "__version__", None),
        "torch_threads": torch.get_num_threads() if torch is not None else None,
        "zstandard": getattr(zstandard, "__version__", None),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpu": cpu_name(),
        "cpu_count": os.cpu_count(),
        "sizes": list(sizes),
        "repeat": repeat,
        "warmup": cfg.warmup,
        "quick": quick,
        "kernels": kernels,
        "pipeline": pipeline,
        "density": DENSITY,
        "bucket": BUCKET,
        "clients": CLIENTS,
        "timer": "time.perf_counter, median",
        "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    echo(
        f"fedpress {__version__} kernel benchmark: {meta['cpu']}, {n_threads} threads, "
        f"simd {meta['simd']}, numpy {np.__version__}, torch {meta['torch'] or 'missing'}, "
        f"zstandard {meta['zstandard'] or 'missing'}"
    )
    echo(
        f"times: median of >= {repeat} runs after {cfg.warmup} warm-up; ratio = peer ms / "
        "fedpress ms; /read = fedpress ms / one streaming read of x"
    )
    if torch is None:
        echo("note: torch is not installed; torch peers are skipped")
    if zstandard is None:
        echo("note: zstandard is not installed; zstd peers are skipped")
    echo("")
    bench = _Bench(cfg)
    targets: list[dict[str, Any]] = []
    if kernels:
        echo(_line([c[0] for c in _COLS]))
        echo(_line(["-" * max(c[1], 4) for c in _COLS]))
        for n in cfg.sizes:
            bench.run_size(n)
        targets = bench.targets()
        _print_targets(targets, echo)
    pipeline_report = None
    if pipeline:
        from . import _bench_pipeline

        if kernels:
            echo("")
        n = max(cfg.sizes)
        if quick:
            echo(f"pipeline group at n = {format_size(n)} (--quick; the largest quick size)")
        pipeline_report = _bench_pipeline.run(n, repeat=repeat, clients=CLIENTS, memory=memory, echo=echo)
    elapsed = time.perf_counter() - t_start
    meta["elapsed_s"] = elapsed
    busy_end = _busy_cpu_seconds()
    if busy_start is not None and busy_end is not None:
        other = max(0.0, (busy_end - busy_start) - (time.process_time() - own_start))
        share = other / (elapsed * (os.cpu_count() or 1))
        meta["other_cpu_s"] = other
        meta["other_cpu_share"] = share
        if share > 0.05:
            echo("")
            echo(
                f"WARNING: other processes used {other:.1f} CPU s ({100 * share:.0f}% of the "
                "machine) during the run; multi-threaded timings are unreliable"
            )
    echo("")
    if bench.failures:
        echo(f"CORRECTNESS FAILURES ({len(bench.failures)}):")
        for f in bench.failures:
            echo(f"  {f}")
    else:
        echo("all correctness checks passed")
    echo(f"elapsed {elapsed:.1f} s")

    report = {
        "meta": meta,
        "reads": bench.reads,
        "results": [r.as_dict() for r in bench.rows],
        "targets": targets,
        "failures": bench.failures,
        "pipeline": pipeline_report,
    }
    if json_path:
        with open(json_path, "w", encoding="utf-8") as out:
            json.dump(report, out, indent=2)
        echo(f"wrote {json_path}")
    return report


def add_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """The benchmark's options, shared by ``fedpress bench`` and bench/kernels.py."""
    parser.add_argument(
        "--sizes",
        nargs="+",
        metavar="N",
        type=_size_list,
        help="vector lengths, e.g. 1M 11.7M 25.6M or 1000000 (default "
        + " ".join(format_size(s) for s in DEFAULT_SIZES)
        + ")",
    )
    parser.add_argument(
        "--repeat",
        type=_positive_int,
        default=None,
        help="timed runs per measurement; the median is reported (default 5, quick 3)",
    )
    parser.add_argument(
        "--threads",
        type=_positive_int,
        default=None,
        help="threads for fedpress and torch (default: fedpress's default)",
    )
    parser.add_argument(
        "--quick", action="store_true", help="N = 1M and 4M, fewer repeats, slow peers skipped above 4M (< 30 s)"
    )
    parser.add_argument(
        "--only",
        nargs="+",
        choices=[*KERNELS, PIPELINE],
        metavar="GROUP",
        help="run only these kernels or row groups: "
        + ", ".join(KERNELS)
        + f", {PIPELINE} (the payload path against its kernels, at the largest size)",
    )
    parser.add_argument(
        "--memory",
        action="store_true",
        help=f"with the {PIPELINE} group, also measure the peak memory of one encode (a fresh process per row)",
    )
    parser.add_argument("--json", metavar="PATH", help="also write every number to this JSON file")
    return parser


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def _size_list(text: str) -> list[int]:
    # Accept both "--sizes 1M 4M" and "--sizes 1M,4M".
    return [parse_size(tok) for tok in text.split(",") if tok.strip()]


def run_from_args(args: argparse.Namespace) -> int:
    """Run with parsed options; exit status 1 when a correctness check failed."""
    sizes = None
    if args.sizes:
        sizes = [n for group in args.sizes for n in group]
    report = run(
        sizes,
        repeat=args.repeat,
        threads=args.threads,
        quick=args.quick,
        only=args.only,
        memory=args.memory,
        json_path=args.json,
    )
    return 1 if report["failures"] else 0


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python bench/kernels.py", description=__doc__.split("\n")[0])
    add_arguments(parser)
    return run_from_args(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
