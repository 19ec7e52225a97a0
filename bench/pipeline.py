"""The payload path against the kernels it is built on: what orchestration costs.

    python bench/pipeline.py [--n 25.6M] [--repeat 5] [--clients 100] [--memory] [--json PATH]

Each row times a call users make (Encoder, Codec.encode, Aggregator, decode) and the bare
kernel underneath it, on the same float32 update of N elements, in this process, and prints
their ratio (median of --repeat runs each; ratios, not absolute times, are what travels
between machines). The targets are those of issue 13; the exit status is 0 whatever the
ratios are (a benchmark, not a test).
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from typing import Any, Callable, Optional

import fedpress as fp
import numpy as np
from fedpress import ops


def _size(text: str) -> int:
    text = text.strip().upper()
    scale = {"K": 1_000, "M": 1_000_000}.get(text[-1:], 1)
    return int(float(text[:-1] if scale > 1 else text) * scale)


def timed(fn: Callable[[], Any], repeat: int, setup: Optional[Callable[[], None]] = None) -> float:
    """Median seconds of ``fn`` over ``repeat`` runs (after one warm-up), ``setup`` untimed."""
    times = []
    for i in range(repeat + 1):
        if setup is not None:
            setup()
        start = time.perf_counter()
        fn()
        if i:
            times.append(time.perf_counter() - start)
    return statistics.median(times)


def rows(n: int, repeat: int, clients: int) -> list[dict[str, Any]]:
    rng = np.random.default_rng(0)
    x = rng.standard_normal(n).astype(np.float32)
    k = max(1, n // 100)
    out: list[dict[str, Any]] = []

    def row(call: str, against: str, product: float, kernel: float, target: Optional[float]) -> None:
        out.append(
            {
                "call": call,
                "against": against,
                "product_s": product,
                "kernel_s": kernel,
                "ratio": product / kernel,
                "target": target,
            }
        )
        print(
            f"  {call:48s} {against:34s} {product * 1e3:9.1f} ms {kernel * 1e3:9.1f} ms "
            f"{product / kernel:7.2f}x" + (f"  (target <= {target:g}x)" if target else ""),
            flush=True,
        )

    encoder = fp.Encoder("topk:0.01+q4+zstd")
    row(
        'Encoder("topk:0.01+q4+zstd"), error feedback',
        "ops.topk(x, 1%)",
        timed(lambda: encoder.encode({"w": x}), repeat),
        timed(lambda: ops.topk(x, k), repeat),
        2.0,
    )
    q4 = fp.Codec("q4")
    row(
        'Codec("q4").encode',
        "ops.quantize(x, 4)",
        timed(lambda: q4.encode({"w": x}), repeat),
        timed(lambda: ops.quantize(x, 4, seed=1), repeat),
        1.3,
    )
    fp16 = fp.Codec("fp16")
    row(
        'Codec("fp16").encode',
        "x.astype(np.float16)",
        timed(lambda: fp16.encode({"w": x}), repeat),
        timed(lambda: x.astype(np.float16), repeat),
        1.0,
    )
    eden = fp.Codec("eden4")
    row(
        'Codec("eden4").encode',
        "ops.eden_encode(x, 4)",
        timed(lambda: eden.encode({"w": x}), repeat),
        timed(lambda: ops.eden_encode(x, 4, seed=1), repeat),
        1.2,
    )

    dense = q4.encode({"w": x})
    packed, scales = ops.quantize(x, 4, seed=1)

    def add_one() -> None:
        agg = fp.Aggregator()
        agg.add(dense)

    row(
        "Aggregator.add, one dense q4 payload",
        "ops.dequantize(4 bits)",
        timed(add_one, repeat),
        timed(lambda: ops.dequantize(packed, scales, 4, n), repeat),
        1.2,
    )

    topk = fp.Codec("topk:0.01")
    sparse, idx_list, val_list = [], [], []
    for c in range(clients):
        update = np.random.default_rng(100 + c).standard_normal(n).astype(np.float32)
        idx, val = ops.topk(update, k)
        payload = topk.encode({"w": update})
        sparse.append(payload)
        idx_list.append(idx)
        val_list.append(val)
        del update

    def aggregate() -> None:
        agg = fp.Aggregator()
        for p in sparse:
            agg.add(p)
        agg.result(copy=False)

    def scatter_many() -> None:
        acc = np.zeros(n, np.float32)
        ops.scatter_add_many(acc, idx_list, val_list)

    def aggregate_many() -> None:
        agg = fp.Aggregator()
        agg.add_many(sparse)
        agg.result(copy=False)

    few = max(1, repeat // 2)
    kernel = timed(scatter_many, few)
    row(
        f"Aggregator.add x {clients} top-1% payloads",
        "ops.scatter_add_many, same data",
        timed(aggregate, few),
        kernel,
        None,
    )
    row(
        f"Aggregator.add_many({clients} top-1% payloads)",
        "ops.scatter_add_many, same data",
        timed(aggregate_many, few),
        kernel,
        1.3,
    )

    def decode_sparse() -> None:
        fp.decode(sparse[0])

    def fill() -> None:
        acc = np.zeros(n, np.float32)
        ops.scatter_add(acc, idx_list[0], val_list[0])

    row(
        "fp.decode, a top-1% payload",
        "np.zeros + ops.scatter_add",
        timed(decode_sparse, repeat),
        timed(fill, repeat),
        1.2,
    )
    return out


_PEAK = """
import resource, sys
import numpy as np
import fedpress as fp
n, spec, encoder = int(sys.argv[1]), sys.argv[2], sys.argv[3] == "1"
coder = fp.Encoder(spec) if encoder else fp.Codec(spec)
small = np.random.default_rng(1).standard_normal(1000).astype(np.float32)
coder.encode({"w": small})  # imports, thread pools and caches, before the baseline
x = np.random.default_rng(0).standard_normal(n, dtype=np.float32)  # no float64 temporary
base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
payload = coder.encode({"w": x})
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print(x.nbytes, len(payload), (peak - base) * 1024)
"""


def peak_memory(n: int) -> list[dict[str, Any]]:
    """The memory one encode needs beyond its input, from the process's peak resident set
    (one fresh process per row, so every allocation counts, C++ ones included)."""
    import subprocess

    out = []
    for label, spec, encoder in (
        ('Codec("q4").encode', "q4", False),
        ('Codec("fp16").encode', "fp16", False),
        ('Encoder("topk:0.01+q4+zstd")', "topk:0.01+q4+zstd", True),
    ):
        result = subprocess.run(
            [sys.executable, "-c", _PEAK, str(n), spec, "1" if encoder else "0"],
            capture_output=True,
            text=True,
            check=True,
        )
        update, payload, extra = (int(v) for v in result.stdout.split())
        # The target: the update, the payload and 10% more, at the peak.
        ratio = (update + extra) / (update + payload)
        out.append(
            {
                "call": label,
                "update_bytes": update,
                "payload_bytes": payload,
                "extra_bytes": extra,
                "peak_over_update_plus_payload": ratio,
            }
        )
        print(
            f"  {label:40s} update {update / 2**20:7.1f} MiB  payload {payload / 2**20:7.1f} MiB  "
            f"extra at peak {extra / 2**20:7.1f} MiB  peak/(update+payload) {ratio:5.2f} (target <= 1.10)",
            flush=True,
        )
    return out


def main(argv: Optional[list] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=_size, default=25_600_000, help="elements of the update (default 25.6M)")
    parser.add_argument("--repeat", type=int, default=5, help="timed runs per measurement; the median is used")
    parser.add_argument("--clients", type=int, default=100, help="payloads the aggregation row sums")
    parser.add_argument("--json", default=None, metavar="PATH", help="also write the rows as JSON")
    parser.add_argument("--memory", action="store_true", help="also measure the peak memory of one encode")
    args = parser.parse_args(argv)
    print(
        f"fedpress payload path vs kernels: n = {args.n:,} float32, {ops.get_num_threads()} threads, "
        f"SIMD {ops.simd()}, {platform.processor() or platform.machine()}"
    )
    print(f"  {'call':48s} {'against':34s} {'product':>12s} {'kernel':>12s} {'ratio':>8s}")
    result = rows(args.n, args.repeat, args.clients)
    memory = []
    if args.memory:
        print("peak memory of one encode (a fresh process each):")
        memory = peak_memory(args.n)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(
                {"n": args.n, "threads": ops.get_num_threads(), "simd": ops.simd(), "rows": result, "memory": memory},
                f,
                indent=2,
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
