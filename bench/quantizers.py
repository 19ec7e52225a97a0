"""Quantizer benchmark: fedpress's EDEN and uniform quantizers next to the EDEN
authors' PyTorch code and a torch QSGD, in one process (GitHub issue 6).

For each size d, on a N(0, 1) and a LogNormal(0, 1) float32 vector, every row gives
the bits per coordinate actually produced, vNMSE = ||x_hat - x||^2 / ||x||^2 (one
round trip per vector; at d >= 2^20 one trial is within a percent of the
expectation), and the median encode / decode times:

  fedpress  q2 q4 q8 rht+q4 eden1..4  fp.Codec(spec).encode({"x": x}) / fp.decode;
                                      bits = 8*len(payload)/d
  fedpress  eden1..4 (kernel)         fedpress.ops.eden_encode / eden_decode; bits = the arrays
  reference eden b=1..4               cmprs-eden (PyPI), see bench/_eden_reference.py; bits = b
                                      per padded coordinate + a float32 scale (it packs nothing)
  torch     QSGD 4b                   bucket 512, L2 norm, stochastic levels and a sign, packed
  reference qsgd(4)                   the authors' QSGD: one norm per vector (informative)

Every row runs on ONE thread (fedpress.ops.set_num_threads(1), torch.set_num_threads(1));
the fedpress eden4 rows are repeated with --threads (default: fedpress's default).
``ref/fp`` is reference time / fedpress time for the same bit width. Then the
aggregation row at d = 2^20: 100 clients' ``eden4:shared`` payloads under one
rotation seed summed by ``fp.Aggregator`` (rotated domain, one inverse transform at
the end) against decoding each of 100 reference payloads and averaging.

    python bench/quantizers.py                   # d = 2^20 and 25.6M
    python bench/quantizers.py --quick           # d = 2^20, under 2 minutes
    python bench/quantizers.py --sizes 1M --repeats 9 --json out.json

The exit status is 1 only when a check fails (fedpress's vNMSE far from the
reference's at the same bits, a payload that depends on the thread count, a peer
off its own bound); the targets printed at the end are informational.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Optional

import numpy as np

try:
    import fedpress as fp
    from fedpress import ops
    from fedpress.bench import format_size, parse_size
except ImportError as exc:  # the compiled core is only there once installed
    sys.exit(f"cannot import fedpress ({exc}); install it first: pip install -e .")

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _eden_reference as eref  # noqa: E402 (the helper next to this file)

__all__ = ["main"]

DEFAULT_SIZES = (1 << 20, 25_600_000)
AGG_SIZE = 1 << 20
SEED = 20240606
ROTATION_SEED = 0x5EED
QSGD_BUCKET = 512
EDEN_BITS = (1, 2, 3, 4)
# fedpress's vNMSE must stay within these factors of the reference's at the same bits:
# both quantize a rotated vector with the Lloyd-Max levels of N(0, 1) and the unbiased scale.
VNMSE_BAND = (0.8, 1.25)
AGG_SAME_TOL = 1e-5  # rel. L2 gap allowed between the rotated-domain sum and decode-each
AGG_INDEPENDENT = 1.25  # the mean's NMSE over what independent client errors would give


# ------------------------------------------------------------------ helpers --
def _time(fn: Callable[[], Any], repeats: int, warmup: bool = True) -> tuple[float, float]:
    """(median, min) ms over ``repeats`` calls, after one warm-up call unless told not to."""
    if warmup:
        fn()
    gc.collect()
    was = gc.isenabled()
    gc.disable()
    try:
        runs = []
        for _ in range(max(1, repeats)):
            t0 = time.perf_counter()
            fn()
            runs.append((time.perf_counter() - t0) * 1e3)
    finally:
        if was:
            gc.enable()
    return statistics.median(runs), min(runs)


def _vnmse(x_hat: Any, x: np.ndarray) -> float:
    x_hat = np.asarray(x_hat, dtype=np.float64).reshape(-1)
    x64 = x.astype(np.float64)
    return float(np.sum((x_hat - x64) ** 2) / np.sum(x64 * x64))


def _fmt_ms(ms: Optional[float]) -> str:
    if ms is None:
        return "-"
    return f"{ms:.0f}" if ms >= 100 else f"{ms:.1f}" if ms >= 10 else f"{ms:.2f}"


def _fmt_ratio(r: Optional[float]) -> str:
    if r is None:
        return "-"
    return f"{r:.1f}x" if r >= 10 else f"{r:.2f}x"


def _join(*parts: str) -> str:
    return "; ".join(p for p in parts if p)


def _label(d: int) -> str:
    return f"2^{d.bit_length() - 1}" if d & (d - 1) == 0 else format_size(d)


def _fmt_e(v: Optional[float]) -> str:
    return "-" if v is None else f"{v:.4g}"


@dataclass
class Row:
    size: int
    impl: str  # fedpress codec | fedpress kernel | reference | torch
    method: str  # q4, eden4, ...
    threads: int
    bits: Optional[float] = None
    vnmse_normal: Optional[float] = None
    vnmse_lognormal: Optional[float] = None
    encode_ms: Optional[float] = None
    decode_ms: Optional[float] = None
    encode_min_ms: Optional[float] = None
    decode_min_ms: Optional[float] = None
    ref_over_fp_encode: Optional[float] = None
    ref_over_fp_decode: Optional[float] = None
    ok: Optional[bool] = None
    note: str = ""
    padded: Optional[int] = None  # the reference's power-of-two length


def _time_round_trip(row: Row, t: Any, x: Any, reps: int) -> None:
    """Times a reference transform's forward, then the backward of its last forward's
    output (backward replays the rotation the last forward drew)."""
    last: list[Any] = [None]

    def encode() -> None:
        last[0] = t.forward(x)

    row.encode_ms, row.encode_min_ms = _time(encode, reps, warmup=reps > 2)
    row.decode_ms, row.decode_min_ms = _time(lambda: t.backward(last[0].tx, last[0].tcontext), reps, warmup=reps > 2)


@dataclass
class Bench:
    args: argparse.Namespace
    torch: Any
    ref: Optional[eref.Reference]
    fp_threads: int
    rows: list[Row] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    aggregation: dict[str, Any] = field(default_factory=dict)
    failed: bool = False

    def echo(self, text: str = "") -> None:
        print(text, flush=True)

    def add(self, row: Row) -> None:
        self.rows.append(row)
        if row.ok is False:
            self.failed = True

    # -- fedpress ---------------------------------------------------------
    def codec_row(
        self, d: int, spec: str, xs: dict[str, np.ndarray], threads: int, method: Optional[str] = None
    ) -> Optional[Row]:
        x = xs["normal"]
        ops.set_num_threads(threads)
        codec = fp.Codec(spec)
        row = Row(d, "fedpress codec", method or spec, threads)
        try:
            payload = codec.encode({"x": x}, seed=SEED)
            row.bits = 8 * len(payload) / d
            row.vnmse_normal = _vnmse(fp.decode(payload)["x"], x)
            lx = xs["lognormal"]
            row.vnmse_lognormal = _vnmse(fp.decode(codec.encode({"x": lx}, seed=SEED + 1))["x"], lx)
            row.encode_ms, row.encode_min_ms = _time(lambda: codec.encode({"x": x}, seed=SEED), self.args.repeats)
            row.decode_ms, row.decode_min_ms = _time(lambda: fp.decode(payload), self.args.repeats)
        except Exception as exc:  # noqa: BLE001 - a missing stage is reported, not fatal
            row.note = f"unavailable: {type(exc).__name__}: {exc}"[:160]
        finally:
            ops.set_num_threads(self.fp_threads)
        self.add(row)
        return row

    def kernel_row(self, d: int, bits: int, xs: dict[str, np.ndarray], threads: int) -> Row:
        row = Row(d, "fedpress kernel", f"eden{bits}", threads)
        if not hasattr(ops, "eden_encode") or not hasattr(ops, "eden_decode"):
            row.note = "unavailable: fedpress.ops.eden_encode / eden_decode not built yet"
            self.add(row)
            return row
        ops.set_num_threads(threads)
        try:
            x = xs["normal"]

            def enc(v: np.ndarray, seed: int = SEED) -> tuple:
                return ops.eden_encode(v, bits, seed)

            def dec(coded: tuple, n: int, seed: int = SEED) -> np.ndarray:
                packed, scales, oidx, oval = coded
                return ops.eden_decode(packed, scales, n, bits, seed, outlier_idx=oidx, outlier_val=oval)

            coded = enc(x)
            row.bits = 8 * sum(int(np.asarray(a).nbytes) for a in coded if a is not None) / d
            row.vnmse_normal = _vnmse(dec(coded, d), x)
            lx = xs["lognormal"]
            row.vnmse_lognormal = _vnmse(dec(enc(lx, SEED + 1), d, SEED + 1), lx)
            row.encode_ms, row.encode_min_ms = _time(lambda: enc(x), self.args.repeats)
            row.decode_ms, row.decode_min_ms = _time(lambda: dec(coded, d), self.args.repeats)
        except Exception as exc:  # noqa: BLE001
            row.note = f"unavailable: {type(exc).__name__}: {exc}"[:160]
        finally:
            ops.set_num_threads(self.fp_threads)
        self.add(row)
        return row

    def thread_invariance(self, d: int, x: np.ndarray) -> None:
        """The same seed must give the same eden4 payload on 1 and on N threads."""
        if self.fp_threads == 1:
            return
        try:
            ops.set_num_threads(1)
            one = fp.Codec("eden4").encode({"x": x}, seed=SEED)
            ops.set_num_threads(self.fp_threads)
            many = fp.Codec("eden4").encode({"x": x}, seed=SEED)
        except Exception:  # noqa: BLE001 - the codec rows already say it is missing
            return
        finally:
            ops.set_num_threads(self.fp_threads)
        same = one == many
        self.notes.append(
            f"d={_label(d)}: eden4 payload on 1 vs {self.fp_threads} threads: "
            + ("identical" if same else "DIFFERENT (results depend on threads)")
        )
        if not same:
            self.failed = True

    # -- peers --------------------------------------------------------------
    def reference_rows(self, d: int, xs: dict[str, np.ndarray]) -> dict[int, Row]:
        """The authors' eden(b), eden4 first so that a cut budget still times the target."""
        torch = self.torch
        out: dict[int, Row] = {}
        if self.ref is None:
            return out
        budget = self.args.ref_budget
        x = torch.from_numpy(xs["normal"])
        start = time.perf_counter()
        for b in sorted(EDEN_BITS, reverse=True):
            row = Row(d, "reference", f"eden{b}", 1)
            out[b] = row
            left = budget - (time.perf_counter() - start)
            if left <= 0:
                row.note = f"skipped: --ref-budget {budget:g} s spent at this size"
                continue
            t = self.ref.eden(bits=b, rotation_seed=SEED + b)
            # The first round trip is the warm-up, the vNMSE sample and the cost estimate.
            t0 = time.perf_counter()
            first = t.forward(x)
            t1 = time.perf_counter()
            x_hat = t.backward(first.tx, first.tcontext)
            call_s = time.perf_counter() - t0
            row.padded = int(first.tx.numel())
            # The library keeps int64 indices; on a wire they are b bits each, plus the scale.
            row.bits = (b * row.padded + 32) / d
            row.vnmse_normal = _vnmse(x_hat.numpy(), xs["normal"])
            del x_hat
            if first.bitrate != b:
                row.ok = False
                row.note = f"declared bitrate {first.bitrate} != {b}"
            share = left / b  # b = how many bit widths are left to run: 4, 3, 2, 1
            if share >= 2 * call_s:
                tl = self.ref.eden(bits=b, rotation_seed=SEED + 10 + b)
                lo = tl.forward(torch.from_numpy(xs["lognormal"]))
                row.vnmse_lognormal = _vnmse(tl.backward(lo.tx, lo.tcontext).numpy(), xs["lognormal"])
                del tl, lo
            reps = min(self.args.repeats, int(share / call_s) - 2)
            if reps >= 1:
                _time_round_trip(row, t, x, reps)
                if reps < self.args.repeats:
                    row.note = _join(row.note, f"{reps} timed run(s), --ref-budget")
            else:  # not even one more: report the warm-up round trip itself
                row.encode_ms = row.encode_min_ms = (t1 - t0) * 1e3
                row.decode_ms = row.decode_min_ms = (call_s - (t1 - t0)) * 1e3
                row.note = _join(row.note, "timed once, cold (--ref-budget)")
            if row.padded != d:
                row.note = _join(row.note, f"pads to 2^{row.padded.bit_length() - 1}")
        for b in EDEN_BITS:
            self.add(out[b])
        return out

    def qsgd_rows(self, d: int, xs: dict[str, np.ndarray]) -> None:
        torch = self.torch
        q = eref.QSGD(bits=4, bucket=QSGD_BUCKET, seed=SEED)
        x = torch.from_numpy(xs["normal"])
        row = Row(d, "torch", f"QSGD 4b b{QSGD_BUCKET}", 1)
        packed, norms, n = q.encode(x)
        row.bits = q.wire_bits(packed, norms) / d
        row.vnmse_normal = _vnmse(q.decode(packed, norms, n).numpy(), xs["normal"])
        lx = xs["lognormal"]
        lp, ln, _ = q.encode(torch.from_numpy(lx))
        row.vnmse_lognormal = _vnmse(q.decode(lp, ln, d).numpy(), lx)
        row.encode_ms, row.encode_min_ms = _time(lambda: q.encode(x), self.args.repeats)
        row.decode_ms, row.decode_min_ms = _time(lambda: q.decode(packed, norms, n), self.args.repeats)
        bound = eref.qsgd_vnmse_bound(4, QSGD_BUCKET)
        row.ok = row.vnmse_normal <= bound and row.vnmse_lognormal <= bound
        row.note = f"vNMSE bound {bound:.3g}"
        self.add(row)

        if self.ref is None or self.ref.qsgd is None:
            return
        t = self.ref.qsgd(4, rounding_seed=SEED)
        row = Row(d, "reference", "qsgd(4)", 1)
        o = t.forward(x)
        row.bits = float(o.bitrate) + 32 / d  # sign + Elias-coded level, and the norm
        row.vnmse_normal = _vnmse(t.backward(o.tx, o.tcontext).numpy(), xs["normal"])
        lo = t.forward(torch.from_numpy(lx))
        row.vnmse_lognormal = _vnmse(t.backward(lo.tx, lo.tcontext).numpy(), lx)
        row.encode_ms, row.encode_min_ms = _time(lambda: t.forward(x), self.args.repeats)
        last = t.forward(x)
        row.decode_ms, row.decode_min_ms = _time(lambda: t.backward(last.tx, last.tcontext), self.args.repeats)
        row.note = "one L2 norm per vector; bits = its Elias-omega estimate, nothing packed"
        self.add(row)

    # -- one size -------------------------------------------------------------
    def run_size(self, d: int) -> None:
        rng = np.random.default_rng(SEED ^ d)
        xs = {
            "normal": rng.standard_normal(d, dtype=np.float32),
            "lognormal": rng.lognormal(0.0, 1.0, d).astype(np.float32),
        }
        self.echo(f"\n== d = {d:,} ({_label(d)})")
        for spec in ("q2", "q4", "q8", "rht+q4"):
            self.codec_row(d, spec, xs, 1)
        fp_codec = {b: self.codec_row(d, f"eden{b}", xs, 1) for b in EDEN_BITS}
        fp_kernel = {b: self.kernel_row(d, b, xs, 1) for b in EDEN_BITS}
        many = {}
        if self.fp_threads != 1:
            many["codec"] = self.codec_row(d, "eden4", xs, self.fp_threads)
            many["kernel"] = self.kernel_row(d, 4, xs, self.fp_threads)
        self.thread_invariance(d, xs["normal"])
        refs = self.reference_rows(d, xs)
        self.qsgd_rows(d, xs)
        for b in EDEN_BITS:
            rows = [fp_codec[b], fp_kernel[b]] + ([many["codec"], many["kernel"]] if b == 4 and many else [])
            self._compare(refs.get(b), [r for r in rows if r is not None])
        self.print_table(d)

    def _compare(self, ref: Optional[Row], rows: list[Row]) -> None:
        for row in rows:
            if row.encode_ms is None or ref is None or ref.vnmse_normal is None:
                continue
            if ref.encode_ms is not None:
                row.ref_over_fp_encode = ref.encode_ms / row.encode_ms
                row.ref_over_fp_decode = ref.decode_ms / row.decode_ms
            # The reference rotates d_pad >= d coordinates and drops the padding after the
            # inverse rotation, with it a share 1 - d/d_pad of the error (and it sends
            # d_pad/d times the bits): compare per rotated coordinate.
            pad = (ref.padded or row.size) / row.size
            ok = True
            for kind in ("vnmse_normal", "vnmse_lognormal"):
                if getattr(ref, kind) is None:
                    continue
                ratio = getattr(row, kind) / (getattr(ref, kind) * pad)
                if not VNMSE_BAND[0] <= ratio <= VNMSE_BAND[1]:
                    ok = False
                    row.note = _join(row.note, f"{kind} {ratio:.2f}x the reference's")
            row.ok = ok
            if not ok:
                self.failed = True

    def print_table(self, d: int) -> None:
        head = (
            "impl",
            "method",
            "thr",
            "bits/coord",
            "vNMSE N(0,1)",
            "vNMSE LogN",
            "enc ms",
            "dec ms",
            "ref/fp enc",
            "ref/fp dec",
            "check / note",
        )
        widths = (15, 14, 3, 10, 12, 10, 8, 8, 10, 10, 0)
        lines = []
        for r in [r for r in self.rows if r.size == d]:
            check = {True: "ok", False: "FAIL", None: ""}[r.ok]
            note = "; ".join(s for s in (check, r.note) if s)
            lines.append(
                (
                    r.impl,
                    r.method,
                    str(r.threads),
                    "-" if r.bits is None else f"{r.bits:.3f}",
                    _fmt_e(r.vnmse_normal),
                    _fmt_e(r.vnmse_lognormal),
                    _fmt_ms(r.encode_ms),
                    _fmt_ms(r.decode_ms),
                    _fmt_ratio(r.ref_over_fp_encode),
                    _fmt_ratio(r.ref_over_fp_decode),
                    note,
                )
            )
        for cells in [head, *lines]:
            self.echo(
                "  ".join(
                    c.ljust(w) if i < 2 or i == len(cells) - 1 else c.rjust(w)
                    for i, (c, w) in enumerate(zip(cells, widths))
                ).rstrip()
            )

    # -- aggregation --------------------------------------------------------------
    def run_aggregation(self) -> None:
        d, clients, torch = AGG_SIZE, self.args.clients, self.torch
        self.echo(f"\n== aggregation: {clients} clients x eden4 at d = {d:,} (mean of the payloads)")
        rng = np.random.default_rng(SEED + 7)
        common = rng.standard_normal(d, dtype=np.float32)
        # Clients share a direction and differ by noise, as gradients of one round do.
        xs = [common + rng.standard_normal(d, dtype=np.float32) for _ in range(clients)]
        truth = np.mean(np.stack(xs), axis=0, dtype=np.float64)
        agg: dict[str, Any] = {"d": d, "clients": clients}
        reps = min(self.args.repeats, 3)

        # fedpress: shared rotation, rotated-domain sums, one inverse transform.
        fp_ms = None
        try:
            codec = fp.Codec("eden4:shared")
            # Every client rotates with the round's seed; its rounding seed is its own.
            payloads = [codec.encode({"x": x}, seed=SEED + i, rotation_seed=ROTATION_SEED) for i, x in enumerate(xs)]
            agg["fp_bits"] = 8 * len(payloads[0]) / d

            def fp_aggregate() -> np.ndarray:
                a = fp.Aggregator()
                for p in payloads:
                    a.add(p)
                return a.result(copy=False)["x"]

            def fp_decode_each() -> np.ndarray:
                acc = np.zeros(d, np.float32)
                for p in payloads:
                    acc += fp.decode(p)["x"]
                return acc / np.float32(clients)

            mean = fp_aggregate()
            agg["fp_nmse"] = _vnmse(mean, truth)
            each = fp_decode_each()
            agg["fp_vs_decode_each"] = float(np.linalg.norm(mean - each) / np.linalg.norm(each))
            sse = [np.sum((fp.decode(p)["x"].astype(np.float64) - x) ** 2) for p, x in zip(payloads, xs)]
            agg["fp_client_vnmse"] = float(np.mean([e / np.sum(x.astype(np.float64) ** 2) for e, x in zip(sse, xs)]))
            # Independent client errors add up: the mean's error is their sum over n^2.
            agg["fp_nmse_if_independent"] = float(sum(sse) / clients**2 / np.sum(truth**2))
            del mean, each
            for threads in sorted({1, self.fp_threads}):
                ops.set_num_threads(threads)
                agg[f"fp_aggregator_ms_t{threads}"], _ = _time(fp_aggregate, reps)
                agg[f"fp_decode_each_ms_t{threads}"], _ = _time(fp_decode_each, reps)
            ops.set_num_threads(self.fp_threads)
            fp_ms = agg["fp_aggregator_ms_t1"]
        except Exception as exc:  # noqa: BLE001
            agg["fp_note"] = f"unavailable: {type(exc).__name__}: {exc}"[:200]
        finally:
            ops.set_num_threads(self.fp_threads)

        # Reference: each client's own rotation; decode each payload, then average.
        ref_ms = None
        if self.ref is not None:
            ts = [self.ref.eden(bits=4, rotation_seed=SEED + i) for i in range(clients)]
            outs = [t.forward(torch.from_numpy(x)) for t, x in zip(ts, xs)]
            agg["ref_bits"] = (4 * int(outs[0].tx.numel()) + 32) / d

            def ref_decode_each() -> Any:
                acc = torch.zeros(d)
                for t, o in zip(ts, outs):
                    acc += t.backward(o.tx, o.tcontext)
                return acc / clients

            agg["ref_nmse"] = _vnmse(ref_decode_each().numpy(), truth)
            agg["ref_client_vnmse"] = float(
                np.mean([_vnmse(t.backward(o.tx, o.tcontext).numpy(), x) for t, o, x in zip(ts, outs, xs)])
            )
            ref_ms, _ = _time(ref_decode_each, reps)
            agg["ref_decode_each_ms"] = ref_ms
            del ts, outs
        del xs

        if fp_ms is not None:
            # The rotated-domain sum must equal decoding every payload (float32 rounding
            # apart), and the clients' rounding errors must be independent (no shared dither).
            agg["ok"] = (
                agg["fp_vs_decode_each"] <= AGG_SAME_TOL
                and agg["fp_nmse"] <= AGG_INDEPENDENT * agg["fp_nmse_if_independent"]
            )
            if not agg["ok"]:
                self.failed = True
        if fp_ms is not None and ref_ms is not None:
            agg["ratio_t1"] = ref_ms / fp_ms
            agg[f"ratio_t{self.fp_threads}"] = ref_ms / agg[f"fp_aggregator_ms_t{self.fp_threads}"]
        self.aggregation = agg
        self.echo(f"  {'what':<58}{'ms':>9}  {'NMSE of mean':>12}  bits/coord")
        if "fp_note" in agg:
            self.echo(f"  fedpress eden4:shared + Aggregator: {agg['fp_note']}")
        else:
            for threads in sorted({1, self.fp_threads}):
                self.echo(
                    f"  {f'fedpress Aggregator, rotated-domain sum ({threads} thr)':<58}"
                    f"{_fmt_ms(agg[f'fp_aggregator_ms_t{threads}']):>9}  "
                    f"{agg['fp_nmse']:>12.4g}  {agg['fp_bits']:.3f}"
                )
                self.echo(
                    f"  {f'fedpress decode each + average ({threads} thr)':<58}"
                    f"{_fmt_ms(agg[f'fp_decode_each_ms_t{threads}']):>9}"
                )
        if ref_ms is not None:
            self.echo(
                f"  {'reference decode each + average (1 thr)':<58}{_fmt_ms(ref_ms):>9}  "
                f"{agg['ref_nmse']:>12.4g}  {agg['ref_bits']:.3f}"
            )
        if "ok" in agg:
            self.echo(
                f"  check {'ok' if agg['ok'] else 'FAIL'}: Aggregator vs decode-each "
                f"mean differ by {agg['fp_vs_decode_each']:.1e} (rel. L2, <= "
                f"{AGG_SAME_TOL:g}); NMSE of the mean {agg['fp_nmse']:.4g} vs "
                f"{agg['fp_nmse_if_independent']:.4g} for independent client errors"
            )
        if "ratio_t1" in agg:
            more = (
                f", {_fmt_ratio(agg[f'ratio_t{self.fp_threads}'])} on {self.fp_threads}" if self.fp_threads != 1 else ""
            )
            self.echo(f"  reference / fedpress: {_fmt_ratio(agg['ratio_t1'])} on 1 thread{more}")
            self.echo(
                f"  error: fedpress's mean has {agg['fp_nmse'] / agg['ref_nmse']:.2f}x the "
                f"reference's NMSE; per client vNMSE {agg['fp_client_vnmse']:.4g} "
                f"(eden4:shared, stochastic rounding) vs {agg['ref_client_vnmse']:.4g} "
                "(reference, own rotation, nearest level)"
            )

    # -- targets --------------------------------------------------------------------
    def targets(self) -> list[dict[str, Any]]:
        def pick(impl: str, threads: int, d: int) -> Optional[Row]:
            for r in self.rows:
                if (r.impl, r.method, r.threads, r.size) == (impl, "eden4", threads, d):
                    return r
            return None

        out = []
        d = AGG_SIZE if AGG_SIZE in self.args.sizes else self.args.sizes[0]
        for impl in ("fedpress codec", "fedpress kernel"):
            row = pick(impl, 1, d)
            for what, attr, goal in (("encode", "ref_over_fp_encode", 10.0), ("decode", "ref_over_fp_decode", 10.0)):
                value = getattr(row, attr) if row is not None else None
                out.append(
                    {
                        "target": f"eden4 {what} vs reference, 1 thread, {impl}, d={d}",
                        "goal": goal,
                        "value": value,
                        "met": None if value is None else value >= goal,
                    }
                )
        value = self.aggregation.get("ratio_t1")
        out.append(
            {
                "target": f"aggregation of {self.args.clients} clients vs reference decode-each, 1 thread",
                "goal": 20.0,
                "value": value,
                "met": None if value is None else value >= 20.0,
            }
        )
        return out


# ---------------------------------------------------------------------- main --
def _size(text: str) -> int:
    return parse_size(text)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument(
        "--sizes",
        nargs="+",
        type=_size,
        default=None,
        help="vector lengths (default: 1048576 25600000; --quick: 1048576)",
    )
    p.add_argument("--repeats", type=int, default=None, help="timed runs per row (default 7, --quick 3)")
    p.add_argument("--quick", action="store_true", help="d = 2^20 only, fewer runs (under 2 minutes)")
    p.add_argument("--json", metavar="PATH", help="also write the results as JSON")
    p.add_argument(
        "--threads",
        type=int,
        default=None,
        help="fedpress threads for the multi-thread rows (default: fedpress's default)",
    )
    p.add_argument("--clients", type=int, default=100, help="clients in the aggregation row")
    p.add_argument(
        "--ref-budget",
        type=float,
        default=150.0,
        metavar="S",
        help="seconds the reference may take per size; fewer timed runs, then none "
        "(default 150; it needs about 10 s per round trip at 25.6M)",
    )
    p.add_argument("--no-aggregation", action="store_true", help="skip the aggregation row")
    return p


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    if args.sizes is None:
        args.sizes = [1 << 20] if args.quick else list(DEFAULT_SIZES)
    if args.repeats is None:
        args.repeats = 3 if args.quick else 7
    try:
        import torch
    except ImportError:
        sys.exit("this benchmark needs torch (CPU build): pip install torch")
    torch.set_num_threads(1)  # the peers run on one thread
    fp_threads = args.threads or ops.get_num_threads()
    ops.set_num_threads(fp_threads)

    ref: Optional[eref.Reference] = None
    try:
        ref = eref.load()
        ref_note = ref.note()
    except ImportError as exc:
        ref_note = f"reference unavailable: {exc}"
    bench = Bench(args, torch, ref, fp_threads)
    bench.echo(
        f"fedpress {fp.__version__} ({ops.simd()}), torch {torch.__version__}, numpy "
        f"{np.__version__}, {platform.processor() or platform.machine()}, "
        f"{os.cpu_count()} cores; fedpress threads 1 and {fp_threads}, torch 1"
    )
    bench.echo(ref_note)
    if not hasattr(ops, "eden_encode"):
        bench.echo(
            "note: fedpress.ops.eden_encode is not built yet: the fedpress eden rows say "
            "'unavailable' and their ratios are missing"
        )
    for d in args.sizes:
        bench.run_size(d)
    if not args.no_aggregation:
        bench.run_aggregation()
    for note in bench.notes:
        bench.echo(note)
    targets = bench.targets()
    bench.echo("\ntargets (informative):")
    for t in targets:
        value = "n/a" if t["value"] is None else _fmt_ratio(t["value"])
        met = {True: "met", False: "NOT met", None: "not measured"}[t["met"]]
        bench.echo(f"  {t['target']}: {value} (goal >= {t['goal']:g}x) {met}")
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump(
                {
                    "fedpress": fp.__version__,
                    "torch": torch.__version__,
                    "fedpress_threads": fp_threads,
                    "reference": ref_note,
                    "sizes": args.sizes,
                    "rows": [asdict(r) for r in bench.rows],
                    "aggregation": bench.aggregation,
                    "notes": bench.notes,
                    "targets": targets,
                },
                f,
                indent=2,
            )
    if bench.failed:
        bench.echo("\nSOME CHECKS FAILED")
    return 1 if bench.failed else 0


if __name__ == "__main__":
    sys.exit(main())
