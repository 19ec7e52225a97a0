"""The payload path against the kernels it is built on: what orchestration costs.

Each row times a call users make (``Encoder``, ``Codec.encode``, ``Aggregator``, ``decode``) and the
bare kernel underneath it on the same float32 update of ``n`` elements, in one process, and prints
their ratio (medians of ``repeat`` runs each, the two taking turns, after one warm-up; ratios, not
absolute times, are what travels between machines). One row measures ``ops.topk`` in units of one
streaming read of its input. With ``memory``, a fresh process per row measures the peak resident
memory one encode adds. The targets are issue 13's, defined at 25.6M elements; whatever the ratios,
this is a benchmark, not a test, and nothing here fails.

Run it as ``fedpress bench --only pipeline [--memory]`` (at the largest ``--sizes``, 25.6M by
default, 4M with ``--quick``) or ``python bench/pipeline.py [--n 25.6M] [--memory] [--json PATH]``.
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from functools import partial
from typing import Any, Callable, Optional, Sequence, Union

import numpy as np

from . import Aggregator, Codec, Encoder, __version__, _core, decode, ops
from .bench import cpu_name, format_size, parse_size
from .format.intcodes import IntSection
from .format.reader import parse
from .format.values import unchecked_quantized_parts

__all__ = ["TARGET_N", "CLIENTS", "PEAK_TARGET", "PipelineRow", "machine", "run", "add_arguments", "main"]

#: The size the targets are defined at (a 25.6M-parameter model, ResNet-50).
TARGET_N = 25_600_000
CLIENTS = 100
SPARSE_SPEC = "topk:0.01+q4+zstd"
#: Peak resident memory of one encode, over the update plus the payload.
PEAK_TARGET = 1.10
_SEED = 0


@dataclasses.dataclass
class PipelineRow:
    """A product call against the kernel it is built on, both timed in this process."""

    call: str
    against: str
    product_s: float
    kernel_s: float
    target: Optional[float]  # the most the ratio may be; None: information only
    unit: str = "x"  # "x": a ratio of two calls; "reads": kernel_s is one streaming read

    @property
    def ratio(self) -> float:
        return self.product_s / self.kernel_s

    def as_dict(self, n: int) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["ratio"] = self.ratio
        # The targets are defined at 25.6M; a smaller run does not judge them.
        d["within_target"] = None if self.target is None or n < TARGET_N else self.ratio <= self.target
        return d

    def line(self, n: int) -> str:
        shown = f"{self.ratio:.1f} reads" if self.unit == "reads" else f"{self.ratio:.2f}x"
        if self.target is not None:
            shown += f" (target <= {self.target:g}{'' if self.unit == 'reads' else 'x'})"
            if n >= TARGET_N:
                shown += " ok" if self.ratio <= self.target else " OVER"
        return f"  {self.call:48s} {self.against:36s} {self.product_s * 1e3:10.3f} {self.kernel_s * 1e3:10.3f}  {shown}"


def _median_seconds(fn: Callable[[], Any], repeat: int) -> float:
    """Median wall time of ``fn()`` over ``repeat`` runs, after one untimed warm-up."""
    fn()
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def _paired_seconds(product: Callable[[], Any], kernel: Callable[[], Any], repeat: int) -> tuple[float, float]:
    """Median wall times of ``product()`` and ``kernel()`` over ``repeat`` runs each, after
    one untimed warm-up of each, the two taking turns: a shared machine's speed drifts
    over seconds, and timing one after the other in the same window keeps that drift
    out of their ratio."""
    product()
    kernel()
    product_times: list[float] = []
    kernel_times: list[float] = []
    for _ in range(repeat):
        for fn, times in ((product, product_times), (kernel, kernel_times)):
            start = time.perf_counter()
            fn()
            times.append(time.perf_counter() - start)
    return statistics.median(product_times), statistics.median(kernel_times)


def machine() -> dict[str, Any]:
    """What the ratios were measured on."""
    return {
        "processor": cpu_name(),
        "threads": ops.get_num_threads(),
        "simd": ops.simd(),
        "cpu_count": os.cpu_count(),
        "fedpress": __version__,
        "numpy": np.__version__,
        "python": platform.python_version(),
    }


# ------------------------------------------------------------- row groups --
def encode_rows(x: np.ndarray, k: int, repeat: int) -> list[PipelineRow]:
    """Encoder and Codec.encode against the kernel each spec is built on."""
    update = {"w": x}
    encoder = Encoder(SPARSE_SPEC)  # error feedback: every encode adds and updates the residual
    sparse = Codec(SPARSE_SPEC)
    q4, fp16, eden4 = Codec("q4"), Codec("fp16"), Codec("eden4")

    def topk() -> Any:
        return ops.topk(x, k)

    return [
        PipelineRow(
            f'Encoder("{SPARSE_SPEC}"), error feedback',
            "ops.topk(x, 1%)",
            *_paired_seconds(lambda: encoder.encode(update), topk, repeat),
            2.0,
        ),
        PipelineRow(
            f'Codec("{SPARSE_SPEC}").encode, no feedback',
            "ops.topk(x, 1%)",
            *_paired_seconds(lambda: sparse.encode(update), topk, repeat),
            None,
        ),
        PipelineRow(
            'Codec("q4").encode',
            "ops.quantize(x, 4)",
            *_paired_seconds(lambda: q4.encode(update), lambda: ops.quantize(x, 4, seed=1), repeat),
            1.3,
        ),
        PipelineRow(
            'Codec("fp16").encode',
            "x.astype(np.float16)",
            *_paired_seconds(lambda: fp16.encode(update), lambda: x.astype(np.float16), repeat),
            1.0,
        ),
        PipelineRow(
            'Codec("eden4").encode',
            "ops.eden_encode(x, 4)",
            *_paired_seconds(lambda: eden4.encode(update), lambda: ops.eden_encode(x, 4, seed=1), repeat),
            1.2,
        ),
    ]


def streaming_read(x: np.ndarray, repeat: int) -> dict[str, Any]:
    """One bandwidth-bound pass over ``x``: the faster of two full reductions.

    ``x.max()`` and ``np.add.reduce`` both read every element once and do little per element;
    when both run at about the same speed they are limited by memory, not arithmetic.
    """
    candidates = {"x.max()": lambda: x.max(), "np.add.reduce(x)": lambda: np.add.reduce(x)}
    times = {name: _median_seconds(fn, repeat) for name, fn in candidates.items()}
    op = min(times, key=times.__getitem__)
    return {"op": op, "seconds": times[op], "GBps": x.nbytes / times[op] / 1e9, "candidates_s": times}


def topk_in_reads_row(x: np.ndarray, k: int, repeat: int, read: dict[str, Any]) -> PipelineRow:
    """Top-k in units of one streaming read of its input (target: within 2.5 reads)."""
    return PipelineRow(
        "ops.topk(x, 1%)",
        f"one streaming read ({read['op']})",
        _median_seconds(lambda: ops.topk(x, k), repeat),
        read["seconds"],
        2.5,
        unit="reads",
    )


def dense_q4_rows(x: np.ndarray, repeat: int) -> list[PipelineRow]:
    """Summing and decoding one dense q4 payload against dequantizing its codes."""
    n = x.size
    payload = Codec("q4").encode({"w": x})
    packed, scales = ops.quantize(x, 4, seed=1)

    def dequantize() -> Any:
        return ops.dequantize(packed, scales, 4, n)

    def add_one() -> None:
        Aggregator().add(payload)

    return [
        PipelineRow(
            "Aggregator.add, one dense q4 payload",
            "ops.dequantize(4 bits)",
            *_paired_seconds(add_one, dequantize, repeat),
            1.2,
        ),
        PipelineRow(
            "fp.decode, a dense q4 payload",
            "ops.dequantize(4 bits)",
            *_paired_seconds(lambda: decode(payload), dequantize, repeat),
            1.2,
        ),
    ]


def dense_float_rows(x: np.ndarray, repeat: int) -> list[PipelineRow]:
    """Decoding dense float payloads (fp32, fp16, bf16) against the conversion that produces
    the same output: a copy, or widening the 16-bit codes (target: within 1.2x)."""
    rows = []
    half, brain = _core.to_half(x), _core.to_bfloat16(x)
    kernels: dict[str, tuple[str, Callable[[], Any]]] = {
        "fp32": ("x.copy()", x.copy),
        "fp16": ("from_half(16-bit codes)", lambda: _core.from_half(half)),
        "bf16": ("from_bfloat16(16-bit codes)", lambda: _core.from_bfloat16(brain)),
    }
    for spec, (against, kernel) in kernels.items():
        payload = Codec(spec).encode({"w": x})
        rows.append(
            PipelineRow(
                f"fp.decode, a dense {spec} payload",
                against,
                *_paired_seconds(partial(decode, payload), kernel, repeat),
                1.2,
            )
        )
        del payload
    return rows


def dense_coded_rows(x: np.ndarray, repeat: int) -> list[PipelineRow]:
    """Decoding the other dense value codes against the kernel that restores the same
    values from the payload's own section: q8 and sign (dequantizing its codes), eden4
    (the fused EDEN decoder) and int8 (its levels are a multiply-add; the inverse rotation
    of a float32 copy is what costs)."""
    n = x.size
    rows = []
    for spec, against in (("q8", "ops.dequantize(8 bits)"), ("sign", "ops.dequantize(1 bit)")):
        payload = Codec(spec).encode({"w": x})
        rec = parse(payload).tensors[0]
        body, scales, bits = unchecked_quantized_parts(rec.value_code, rec.value_data, rec.count, rec.bucket)
        body, scales = body.copy(), scales.copy()  # the kernel's input as it would have it, aligned
        rows.append(
            PipelineRow(
                f"fp.decode, a dense {spec} payload",
                against,
                *_paired_seconds(
                    partial(decode, payload), partial(ops.dequantize, body, scales, bits, n, rec.bucket), repeat
                ),
                1.2,
            )
        )
    payload = Codec("eden4").encode({"w": x})
    packed, eden_scales, _, _ = ops.eden_encode(x, 4, seed=1)
    rows.append(
        PipelineRow(
            "fp.decode, a dense eden4 payload",
            "ops.eden_decode(4 bits)",
            *_paired_seconds(
                partial(decode, payload), partial(ops.eden_decode, packed, eden_scales, n, 4, seed=1), repeat
            ),
            1.2,
        )
    )
    payload = Codec("int8").encode({"w": x})
    section = parse(payload).tensors[0].intcode
    assert isinstance(section, IntSection)
    levels = section.levels

    def copy_unrotated() -> Any:
        return _core.eden_unrotate(x.copy(), levels.block, levels.rotation_seed)

    rows.append(
        PipelineRow(
            "fp.decode, a dense int8 payload",
            "x.copy() + its inverse rotation",
            *_paired_seconds(partial(decode, payload), copy_unrotated, repeat),
            1.2,
        )
    )
    return rows


def model_of(x: np.ndarray, layers: int = 40) -> dict[str, np.ndarray]:
    """``x`` cut into a convolutional network's tensors (views, no copy): per layer a
    c x c x 3 x 3 kernel and three c-vectors (bias, norm scale and shift), c doubling every
    quarter of the layers, the kernels scaled so that the tensors cover ``x`` exactly."""
    layers = max(1, min(layers, x.size // 64))
    widths = [64 << (4 * i // layers) for i in range(layers)]
    if 3 * sum(widths) > x.size // 4:  # a small x: narrower vectors, so that the kernels stay most of it
        widths = [max(1, c * (x.size // 4) // (3 * sum(widths))) for c in widths]
    vectors = sum(3 * c for c in widths)
    weights = np.array([9 * c * c for c in widths], dtype=np.float64)
    sizes = np.floor(weights / weights.sum() * max(0, x.size - vectors)).astype(np.int64)
    sizes[-1] += x.size - vectors - sizes.sum()
    model, at = {}, 0
    for i, (c, size) in enumerate(zip(widths, sizes)):
        for name, length in (
            (f"layer{i}.weight", int(size)),
            *((f"layer{i}.{v}", c) for v in ("bias", "scale", "shift")),
        ):
            model[name] = x[at : at + length]
            at += length
    return model


def model_rows(x: np.ndarray, k: int, repeat: int) -> list[PipelineRow]:
    """The same calls on the same update cut into a model's 160 tensors, against the kernel
    on the whole update: what the payload path costs per tensor (the targets as for one)."""
    model = model_of(x)
    encoder = Encoder(SPARSE_SPEC)
    q4 = Codec("q4")
    payload = q4.encode(model)
    packed, scales = ops.quantize(x, 4, seed=1)
    n, tensors = x.size, len(model)

    def dequantize() -> Any:
        return ops.dequantize(packed, scales, 4, n)

    return [
        PipelineRow(
            f'Encoder("{SPARSE_SPEC}"), {tensors} tensors',
            "ops.topk(x, 1%)",
            *_paired_seconds(lambda: encoder.encode(model), lambda: ops.topk(x, k), repeat),
            2.0,
        ),
        PipelineRow(
            f'Codec("q4").encode, {tensors} tensors',
            "ops.quantize(x, 4)",
            *_paired_seconds(lambda: q4.encode(model), lambda: ops.quantize(x, 4, seed=1), repeat),
            1.3,
        ),
        PipelineRow(
            f"fp.decode, q4, {tensors} tensors",
            "ops.dequantize(4 bits)",
            *_paired_seconds(lambda: decode(payload), dequantize, repeat),
            1.2,
        ),
        PipelineRow(
            f"Aggregator.add, q4, {tensors} tensors",
            "ops.dequantize(4 bits)",
            *_paired_seconds(lambda: Aggregator().add(payload), dequantize, repeat),
            1.2,
        ),
    ]


def _fresh_mean_of(payloads: Sequence[bytes]) -> Any:
    """add_many + result(copy=False) on a new aggregator, one pass over the sums less."""
    return Aggregator().mean_of(payloads)


def sparse_rows(n: int, k: int, clients: int, repeat: int) -> list[PipelineRow]:
    """Aggregating and decoding top-1% payloads against scattering the same indices and values."""
    codec = Codec("topk:0.01")
    coded = {spec: Codec(spec) for spec in ("topk:0.01+q4", SPARSE_SPEC)}  # values as codes; and inflated
    payloads, indices, values = [], [], []
    coded_payloads: dict[str, list[bytes]] = {spec: [] for spec in coded}
    for c in range(clients):
        update = np.random.default_rng(_SEED + 100 + c).standard_normal(n, dtype=np.float32)
        idx, val = ops.topk(update, k)
        payloads.append(codec.encode({"w": update}))
        for spec, one in coded.items():
            coded_payloads[spec].append(one.encode({"w": update}))
        indices.append(idx)
        values.append(val)

    def aggregate_one_by_one() -> None:
        agg = Aggregator()
        for p in payloads:
            agg.add(p)
        agg.result(copy=False)

    def aggregate_many() -> None:
        agg = Aggregator()
        agg.add_many(payloads)
        agg.result(copy=False)

    def scatter_many() -> None:
        ops.scatter_add_many(np.zeros(n, np.float32), indices, values)

    def scatter_one() -> None:
        ops.scatter_add(np.zeros(n, np.float32), indices[0], values[0])

    few = max(3, repeat // 2)  # each call sums all the clients; 3 at least, for a median, not a mean of two
    return [
        PipelineRow(
            f"Aggregator.add x {clients} top-1% payloads",
            "ops.scatter_add_many, same data",
            *_paired_seconds(aggregate_one_by_one, scatter_many, few),
            None,
        ),
        PipelineRow(
            f"Aggregator.mean_of({clients} top-1% payloads)",
            "ops.scatter_add_many, same data",
            *_paired_seconds(partial(_fresh_mean_of, payloads), scatter_many, few),
            1.3,
        ),
        PipelineRow(
            "  add_many, then result(copy=False)",
            "ops.scatter_add_many, same data",
            *_paired_seconds(aggregate_many, scatter_many, few),
            1.3,
        ),
        PipelineRow(
            "fp.decode, a top-1% payload",
            "np.zeros + ops.scatter_add",
            *_paired_seconds(lambda: decode(payloads[0]), scatter_one, repeat),
            1.2,
        ),
        # The same updates coded as most deployments send them: the codes added as they lie,
        # and zstd inflated first (which the kernel, given decoded data, does not do).
        *(
            PipelineRow(
                f"Aggregator.mean_of({clients} {spec.removeprefix('topk:0.01+')} payloads)",
                "ops.scatter_add_many, decoded data",
                *_paired_seconds(partial(_fresh_mean_of, batch), scatter_many, few),
                None,
            )
            for spec, batch in coded_payloads.items()
        ),
    ]


# ------------------------------------------------------------ peak memory --
# (label, spec, whether it is an Encoder with error feedback)
_PEAK_ROWS: tuple[tuple[str, str, Union[bool, dict[str, Any]]], ...] = (
    ('Codec("q4").encode', "q4", False),
    ('Codec("fp16").encode', "fp16", False),
    ('Codec("eden4").encode', "eden4", False),
    ('Codec("eden4:shared").encode', "eden4:shared", False),
    ('Codec("rht+q4").encode', "rht+q4", False),
    ('Codec("int8").encode', "int8", False),
    ('Codec("q8+zstd").encode', "q8+zstd", False),
    (f'Encoder("{SPARSE_SPEC}").encode, 2nd round', SPARSE_SPEC, True),
    (f'Encoder("{SPARSE_SPEC}"), momentum, clip', SPARSE_SPEC, {"momentum": 0.9, "clip": 1.0}),
)


def _status_bytes(field: str) -> Optional[int]:
    """A ``kB`` field of /proc/self/status (VmRSS, VmHWM) in bytes, or None off Linux."""
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def _reset_peak() -> bool:
    """Set the process's resident high-water mark to its current resident set (Linux >= 4.0)."""
    try:
        with open("/proc/self/clear_refs", "w", encoding="ascii") as f:
            f.write("5")
    except OSError:
        return False
    return _status_bytes("VmHWM") is not None


def _release_freed_memory() -> None:
    """Return freed heap pages to the system, so a later encode cannot reuse them unseen."""
    gc.collect()
    try:
        import ctypes

        ctypes.CDLL(None).malloc_trim(0)  # glibc; elsewhere there is nothing to call
    except (OSError, AttributeError):
        pass


def _peak_child(n: int, spec: str, encoder: Union[bool, dict[str, Any]]) -> None:
    """In a fresh process: print update bytes, payload bytes, peak bytes added, and how
    measured. ``encoder``: False for ``Codec(spec)``, True or ``Encoder``'s options for an
    ``Encoder``."""
    import resource

    x = np.random.default_rng(_SEED).standard_normal(n, dtype=np.float32)  # no float64 temporary
    if encoder is not False:
        coder: Any = Encoder(spec, **(encoder if isinstance(encoder, dict) else {}))
        # The residual is state that lives between rounds, not memory of one encode: the first
        # round allocates it, the second is what one encode costs.
        coder.encode({"w": x})
    else:
        coder = Codec(spec)
        # Imports, thread pools and caches, before the baseline.
        coder.encode({"w": np.random.default_rng(1).standard_normal(1000, dtype=np.float32)})
    _release_freed_memory()
    if _reset_peak():
        method = "VmHWM after clear_refs"
        base = _status_bytes("VmRSS") or 0
        payload = coder.encode({"w": x})
        peak = _status_bytes("VmHWM") or 0
    else:
        # The peak since the process started: for the Encoder it includes the first round.
        method = "ru_maxrss since start"
        unit = 1 if sys.platform == "darwin" else 1024  # bytes on macOS, KiB elsewhere
        base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * unit
        payload = coder.encode({"w": x})
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * unit
    print(x.nbytes, len(payload), max(0, peak - base), method)


def peak_memory_rows(n: int, echo: Callable[[str], None] = print) -> list[dict[str, Any]]:
    """The peak resident memory one encode needs, over the update plus the payload.

    One fresh process per row, so every allocation counts, C++ ones included, and no row
    inherits another's heap.
    """
    # The children import this very copy of fedpress, installed or not.
    package_root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [package_root, os.environ.get("PYTHONPATH")])))
    out: list[dict[str, Any]] = []
    for label, spec, encoder in _PEAK_ROWS:
        script = f"from fedpress._bench_pipeline import _peak_child; _peak_child({n}, {spec!r}, {encoder!r})"
        result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env)
        if result.returncode != 0:
            why = (result.stderr.strip().splitlines() or [f"exit status {result.returncode}"])[-1]
            out.append({"call": label, "error": why})
            echo(f"  {label:48s} the measuring process failed: {why}")
            continue
        update_s, payload_s, extra_s, method = result.stdout.split(maxsplit=3)
        update, payload, extra = int(update_s), int(payload_s), int(extra_s)
        # Before the encode the process held the update; at the peak it holds that plus `extra`.
        ratio = (update + extra) / (update + payload)
        out.append(
            {
                "call": label,
                "update_bytes": update,
                "payload_bytes": payload,
                "extra_bytes": extra,
                "peak_over_update_plus_payload": ratio,
                "target": PEAK_TARGET,
                "within_target": None if n < TARGET_N else ratio <= PEAK_TARGET,
                "method": method.strip(),
            }
        )
        mib = 2.0**20
        echo(
            f"  {label:48s} update {update / mib:8.1f} MiB  payload {payload / mib:7.1f} MiB  "
            f"added at peak {extra / mib:8.1f} MiB  peak/(update+payload) {ratio:5.2f} (target <= {PEAK_TARGET:.2f})"
        )
    return out


# -------------------------------------------------------------------- api --
def run(
    n: int = TARGET_N,
    *,
    repeat: int = 5,
    clients: int = CLIENTS,
    memory: bool = False,
    echo: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Print the pipeline table and return its numbers (``rows``, ``memory``, ``machine``...)."""
    if n < 100:
        raise ValueError(f"n must be >= 100 (top-1% keeps n // 100 entries), got {n}")
    if repeat < 1 or clients < 1:
        raise ValueError(f"repeat and clients must be >= 1, got {repeat} and {clients}")
    k = n // 100
    info = machine()
    echo(
        f"payload path vs kernels: n = {n:,} float32, {clients} clients, median of {repeat}; "
        f"{info['processor']}, {info['threads']} threads, SIMD {info['simd']}"
    )
    if n < TARGET_N:
        echo(f"  (n is below the {TARGET_N:,} the targets are defined at: the ratios are information only)")

    x = np.random.default_rng(_SEED).standard_normal(n, dtype=np.float32)
    read = streaming_read(x, repeat)
    candidates = ", ".join(f"{op} {s * 1e3:.3f} ms" for op, s in read["candidates_s"].items())
    echo(f"  one streaming read of x: {candidates} -> {read['op']}, {read['GBps']:.1f} GB/s")
    echo(f"  {'call':48s} {'against':36s} {'product ms':>10s} {'kernel ms':>10s}  ratio")

    rows: list[PipelineRow] = []

    def emit(group: Sequence[PipelineRow]) -> None:
        for row in group:
            rows.append(row)
            echo(row.line(n))

    emit(encode_rows(x, k, repeat))
    emit([topk_in_reads_row(x, k, repeat, read)])
    emit(dense_q4_rows(x, repeat))
    emit(dense_float_rows(x, repeat))
    emit(dense_coded_rows(x, repeat))
    emit(model_rows(x, k, repeat))
    del x
    gc.collect()
    emit(sparse_rows(n, k, clients, repeat))

    memory_rows: list[dict[str, Any]] = []
    if memory:
        echo("  peak memory of one encode (a fresh process each):")
        memory_rows = peak_memory_rows(n, echo)
    return {
        "n": n,
        "clients": clients,
        "repeat": repeat,
        "targets_defined_at_n": TARGET_N,
        "machine": info,
        "streaming_read": read,
        "rows": [row.as_dict(n) for row in rows],
        "memory": memory_rows,
    }


def _count(text: str) -> int:
    if not text.strip().isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"must be a whole number >= 1, got {text!r}")
    return int(text)


def add_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """bench/pipeline.py's options."""
    parser.add_argument(
        "--n", type=parse_size, default=TARGET_N, help=f"elements of the update (default {format_size(TARGET_N)})"
    )
    parser.add_argument("--repeat", type=_count, default=5, help="timed runs per measurement; the median is used")
    parser.add_argument("--clients", type=_count, default=CLIENTS, help="payloads the aggregation rows sum")
    parser.add_argument("--memory", action="store_true", help="also measure the peak memory of one encode")
    parser.add_argument("--json", default=None, metavar="PATH", help="also write every number to this JSON file")
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    """``python bench/pipeline.py``: exit status 0 whatever the ratios."""
    parser = argparse.ArgumentParser(prog="python bench/pipeline.py", description=__doc__.split("\n")[0])
    args = add_arguments(parser).parse_args(argv)
    if args.n < 100:
        parser.error(f"--n must be at least 100 (top-1% keeps n // 100 entries), got {args.n}")
    report = run(args.n, repeat=args.repeat, clients=args.clients, memory=args.memory)
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump(report, f, indent=2)
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
