"""Payload benchmark: bytes per spec on a real update, and codec throughput.

    python bench/payload.py [--quick] [--json PATH] [--n 25.6M] [--clients 100]

1. Bytes: a small CNN trained a few SGD steps on scikit-learn's digits; the
   update is the parameter delta. Each spec's payload size, the ratio against
   float32 (4 bytes per float parameter) and the relative L2 error of the
   decoded update.
2. Throughput at N floats (default 25.6M, ResNet-50 size): encode / decode /
   aggregate time per spec, next to the exact top-k kernel alone.
3. Memory: peak traced allocation while aggregating `--clients` payloads of
   topk:0.01+q4+zstd at N floats, against the dense model's bytes.
Targets (from the issue) are printed with PASS/FAIL; the exit status is 0
unless a correctness check fails.
"""

from __future__ import annotations

import argparse
import gc
import json
import sys
import time
import tracemalloc

import fedpress as fp
import numpy as np
from fedpress import ops

SPECS = [
    "fp32",
    "fp16",
    "bf16",
    "q8",
    "q8+zstd",
    "q4",
    "q2",
    "sign",
    "rht+q2+zstd",
    "topk:0.01",
    "topk:0.01+q4",
    "topk:0.01+q4+zstd",
    "topk:0.001+q4+zstd",
    "thresh:0.01+q4+zstd",
    "randk:0.01+fp16",
]
THROUGHPUT_SPECS = ["topk:0.01+q4+zstd", "topk:0.001+q4+zstd", "q8+zstd", "sign", "fp16"]


def parse_size(text: str) -> int:
    t = text.strip().upper()
    mult = 1
    if t.endswith("M"):
        mult, t = 1_000_000, t[:-1]
    elif t.endswith("K"):
        mult, t = 1_000, t[:-1]
    return int(round(float(t) * mult))


def cnn_update(steps: int = 30, seed: int = 0) -> dict[str, np.ndarray]:
    """The delta of a small CNN after `steps` SGD steps on the digits data set."""
    import torch
    from sklearn.datasets import load_digits

    torch.manual_seed(seed)
    digits = load_digits()
    x = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16.0
    y = torch.tensor(digits.target, dtype=torch.long)
    model = torch.nn.Sequential(
        torch.nn.Conv2d(1, 32, 3, padding=1),
        torch.nn.ReLU(),
        torch.nn.Conv2d(32, 64, 3, padding=1),
        torch.nn.ReLU(),
        torch.nn.MaxPool2d(2),
        torch.nn.Flatten(),
        torch.nn.Linear(64 * 16, 128),
        torch.nn.ReLU(),
        torch.nn.Linear(128, 10),
    )
    before = {k: v.detach().clone() for k, v in model.state_dict().items()}
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    gen = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        idx = torch.randint(0, len(y), (64,), generator=gen)
        opt.zero_grad()
        torch.nn.functional.cross_entropy(model(x[idx]), y[idx]).backward()
        opt.step()
    return {k: (v.detach() - before[k]).numpy() for k, v in model.state_dict().items()}


def timed(fn, repeat: int) -> float:
    best = float("inf")
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def rel_err(a: dict, b: dict) -> float:
    num = sum(float(np.sum((a[k].astype(np.float64) - b[k]) ** 2)) for k in b)
    den = sum(float(np.sum(b[k].astype(np.float64) ** 2)) for k in b)
    return (num / den) ** 0.5 if den else 0.0


def bytes_table(results: dict, quick: bool) -> bool:
    try:
        update = cnn_update(steps=10 if quick else 30)
    except ImportError as exc:
        print(f"(skipping the CNN update: {exc}; install torch and scikit-learn)")
        return True
    floats = sum(v.size for v in update.values())
    raw = 4 * floats
    print(f"\nBytes on a real update: CNN on digits, {floats} float parameters, {raw} bytes as float32")
    print(f"{'spec':22s} {'bytes':>9s} {'ratio':>9s} {'rel L2 err':>11s}")
    rows = {}
    ok = True
    for spec in SPECS:
        payload = fp.Codec(spec).encode(update, seed=1)
        decoded = fp.decode(payload)
        if set(decoded) != set(update) or any(decoded[k].shape != update[k].shape for k in update):
            print(f"{spec}: decoded update has the wrong tensors or shapes")
            ok = False
        err = rel_err(decoded, update)
        rows[spec] = {"bytes": len(payload), "ratio": raw / len(payload), "rel_l2_error": err}
        print(f"{spec:22s} {len(payload):9d} {raw / len(payload):8.1f}x {err:11.4f}")
    results["bytes"] = {"floats": floats, "raw_float32_bytes": raw, "specs": rows}
    return ok


def throughput(results: dict, n: int, repeat: int) -> bool:
    rng = np.random.default_rng(0)
    x = (rng.standard_t(4, n) * 1e-3).astype(np.float32)
    update = {"w": x}
    k = n // 100
    t_topk = timed(lambda: ops.topk(x, k), repeat)
    print(
        f"\nThroughput at N = {n:,} floats ({4 * n / 1e6:.1f} MB), {ops.get_num_threads()} threads;"
        f" exact top-k 1% kernel alone: {t_topk * 1e3:.2f} ms"
    )
    print(
        f"{'spec':22s} {'bytes':>10s} {'ratio':>8s} {'encode ms':>10s} {'/topk':>6s} {'decode ms':>10s}"
        f" {'agg add ms':>11s} {'encode GB/s':>12s}"
    )
    rows = {}
    ok = True
    for spec in THROUGHPUT_SPECS:
        codec = fp.Codec(spec)
        payload = codec.encode(update, seed=3)
        t_enc = timed(lambda codec=codec: codec.encode(update, seed=3), repeat)
        t_dec = timed(lambda payload=payload: fp.decode(payload), repeat)

        def agg_once(payload: bytes = payload) -> None:
            agg = fp.Aggregator()
            agg.add(payload, 1.0)

        t_agg = timed(agg_once, repeat)
        dec = fp.decode(payload)["w"]
        agg = fp.Aggregator()
        agg.add(payload, 2.0)
        if not np.allclose(agg.result()["w"], dec, rtol=1e-6, atol=1e-12):
            print(f"{spec}: aggregator mean differs from the decoded payload")
            ok = False
        rows[spec] = {
            "bytes": len(payload),
            "ratio": 4 * n / len(payload),
            "encode_ms": t_enc * 1e3,
            "encode_over_topk": t_enc / t_topk,
            "decode_ms": t_dec * 1e3,
            "aggregate_add_ms": t_agg * 1e3,
        }
        print(
            f"{spec:22s} {len(payload):10d} {4 * n / len(payload):7.1f}x {t_enc * 1e3:10.2f} "
            f"{t_enc / t_topk:6.2f} {t_dec * 1e3:10.2f} {t_agg * 1e3:11.2f} {4 * n / t_enc / 1e9:12.2f}"
        )
    results["throughput"] = {"n": n, "topk_ms": t_topk * 1e3, "specs": rows}
    return ok


def aggregation_memory(results: dict, n: int, clients: int) -> bool:
    rng = np.random.default_rng(1)
    codec = fp.Codec("topk:0.01+q4+zstd")
    payloads = []
    for c in range(clients):
        x = rng.standard_normal(n, dtype=np.float32)
        payloads.append(codec.encode({"w": x}, seed=c))
        del x
    gc.collect()
    dense = 4 * n
    tracemalloc.start()
    t0 = time.perf_counter()
    agg = fp.Aggregator()
    for c, p in enumerate(payloads):
        agg.add(p, 1.0 + c)
    _, peak_adds = tracemalloc.get_traced_memory()
    mean = agg.result(copy=False)  # the server's path: the sums become the mean in place
    elapsed = time.perf_counter() - t0
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    check = fp.Aggregator()
    for c, p in enumerate(payloads[:3]):
        check.add(p, 1.0 + c)
    copied = check.result()
    del check
    held = sum(len(p) for p in payloads)
    print(
        f"\nAggregating {clients} payloads of topk:0.01+q4+zstd at N = {n:,}: {elapsed * 1e3:.0f} ms "
        f"({elapsed / clients * 1e3:.2f} ms per payload); peak traced allocation {peak / 1e6:.1f} MB "
        f"= {peak / dense:.2f}x the dense model ({dense / 1e6:.1f} MB) with result(copy=False) "
        f"({peak_adds / dense:.2f}x during the adds; result() with a copy adds 1x); "
        f"the {clients} payloads themselves hold {held / 1e6:.1f} MB"
    )
    results["aggregation"] = {
        "n": n,
        "clients": clients,
        "ms": elapsed * 1e3,
        "peak_bytes": peak,
        "dense_bytes": dense,
        "peak_over_dense": peak / dense,
        "peak_adds_over_dense": peak_adds / dense,
        "payload_bytes": held,
    }
    return mean["w"].shape == (n,) and copied["w"].shape == (n,)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="small sizes, a run of seconds")
    ap.add_argument("--n", default="25.6M", help="floats for the throughput and memory runs")
    ap.add_argument("--clients", type=int, default=100)
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--json", default=None, help="write all numbers to this file")
    args = ap.parse_args(argv)
    if args.threads:
        ops.set_num_threads(args.threads)
    n = 1_000_000 if args.quick else parse_size(args.n)
    clients = 10 if args.quick else args.clients
    repeat = 2 if args.quick else args.repeat
    results: dict = {"threads": ops.get_num_threads(), "simd": ops.simd(), "fedpress": fp.__version__}
    ok = bytes_table(results, args.quick)
    ok &= throughput(results, n, repeat)
    ok &= aggregation_memory(results, n, clients)

    print("\ntargets:")
    b = results.get("bytes", {}).get("specs", {})
    t = results["throughput"]["specs"]
    checks = [
        (
            "topk:0.01+q4+zstd >= 240x smaller than float32 (CNN update)",
            b.get("topk:0.01+q4+zstd", {}).get("ratio"),
            240,
            ">=",
        ),
        ("topk:0.001+q4+zstd >= 1500x (CNN update)", b.get("topk:0.001+q4+zstd", {}).get("ratio"), 1500, ">="),
        ("q8+zstd >= 4x (CNN update)", b.get("q8+zstd", {}).get("ratio"), 4, ">="),
        ("sign >= 30x (CNN update)", b.get("sign", {}).get("ratio"), 30, ">="),
        (
            f"encode topk:0.01+q4+zstd within 2x of exact top-k at N={n:,}",
            t["topk:0.01+q4+zstd"]["encode_over_topk"],
            2,
            "<=",
        ),
        (
            f"aggregating {clients} payloads peaks under 2x the dense model",
            results["aggregation"]["peak_over_dense"],
            2,
            "<",
        ),
    ]
    for name, value, target, op in checks:
        if value is None:
            print(f"  {name:70s} {'n/a':>9s}  SKIP")
            continue
        good = {">=": value >= target, "<=": value <= target, "<": value < target}[op]
        print(f"  {name:70s} {value:9.2f}  {'PASS' if good else 'FAIL'}")
    results["targets"] = [{"name": c[0], "value": c[1], "target": c[2], "op": c[3]} for c in checks]
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)
    if not ok:
        print("a correctness check failed", file=sys.stderr)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
