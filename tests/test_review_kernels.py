"""Review tests for the worker pool (csrc/parallel.cpp), the selection kernels over many
arrays (csrc/topk.cpp: topk_many, threshold_topk_many, ef_topk_many), dequantize_many,
scatter_add_each and the payload writer that spreads its pieces over the threads
(csrc/assemble.cpp).

They try to break: exceptions thrown inside pool tasks, concurrent callers from several
Python threads (the GIL is released) while the thread count changes, fork with a warm
pool, indices into arrays taken back to back near 2^32, empty arrays and zero-length
segments, outputs that share memory with inputs, results that depend on the thread
count, and the errors bad arguments raise.

Strict xfails mark real bugs found by the review; each reason says what is wrong (the ones
fixed since are plain tests now).
"""

from __future__ import annotations

import contextlib
import os
import threading
import time
import warnings
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
from fedpress import _core, ops

CHUNK = 1 << 16  # the selection kernels' fixed chunk
THREAD_COUNTS = (1, 2, 3, 5, 64)


@contextlib.contextmanager
def nthreads(n: int) -> Iterator[None]:
    old = ops.get_num_threads()
    ops.set_num_threads(n)
    try:
        yield
    finally:
        ops.set_num_threads(old)


def values(rng: np.random.Generator, n: int, kind: str) -> np.ndarray:
    x = rng.standard_normal(n).astype(np.float32)
    if kind == "ties":
        x = np.round(x * 2).astype(np.float32)  # few magnitudes: ties across segments
    return x


def concat(arrays: Sequence[np.ndarray]) -> np.ndarray:
    return np.concatenate(arrays) if len(arrays) else np.zeros(0, np.float32)


def split(idx: np.ndarray, val: np.ndarray, sizes: Sequence[int]) -> list[tuple[bytes, bytes]]:
    out, start = [], 0
    for n in sizes:
        keep = (idx >= start) & (idx < start + n)
        out.append(((idx[keep] - start).astype(np.uint32).tobytes(), val[keep].tobytes()))
        start += n
    return out


def as_bytes(parts: Sequence[tuple[np.ndarray, np.ndarray]]) -> list[tuple[bytes, bytes]]:
    return [(np.asarray(i, np.uint32).tobytes(), np.asarray(v, np.float32).tobytes()) for i, v in parts]


# Zero-length segments on and around the 2^16 chunk boundaries, tensors smaller than a
# SIMD vector, a chunk made of thousands of tensors, and enough elements for the sampled path.
LAYOUTS = {
    "zeros_at_chunk_edges": [0, CHUNK - 1, 0, 1, 0, CHUNK, 0, 0, 2, 70_001, 0],
    "tiny_then_big": [1] * 3000 + [140_000],
    "big_then_tiny": [140_000, 0, 0, 7, 0] + [17] * 200 + [0],
}


@pytest.fixture(scope="module")
def layouts() -> dict[tuple[str, str], list[np.ndarray]]:
    rng = np.random.default_rng(20261207)
    out = {}
    for name, sizes in LAYOUTS.items():
        for kind in ("normal", "ties"):
            arrays = [values(rng, n, kind) for n in sizes]
            for a in arrays:
                a.setflags(write=False)
            out[(name, kind)] = arrays
    return out


# ------------------------------------------------ results and the thread count --
@pytest.mark.parametrize("name", list(LAYOUTS))
@pytest.mark.parametrize("kind", ["normal", "ties"])
def test_many_kernels_equal_the_concatenation_for_any_thread_count(layouts, name: str, kind: str) -> None:
    arrays = layouts[(name, kind)]
    sizes = [a.size for a in arrays]
    whole = concat(arrays)
    total = whole.size
    rng = np.random.default_rng(7)
    residuals0 = [rng.standard_normal(n).astype(np.float32) for n in sizes]
    ks = (1, 1000, total // 4)  # sampled path, and the dense path (histogram / exact threshold)
    with nthreads(1):
        want_topk = {k: split(*ops.topk(whole, k), sizes) for k in ks}
        want_thr = {r: split(*ops.threshold_topk(whole, r, seed=11), sizes) for r in (0.001, 0.02)}
        want_ef = {}
        for k in ks:
            res = concat(residuals0).copy()
            got = ops.ef_topk(whole, res, k)
            want_ef[k] = (split(*got, sizes), res.tobytes())
    for t in THREAD_COUNTS:
        with nthreads(t):
            for k in ks:
                assert as_bytes(ops.topk_many(arrays, k)) == want_topk[k], (t, k)
                res = [r.copy() for r in residuals0]
                parts = ops.ef_topk_many(arrays, res, k)
                assert (as_bytes(parts), concat(res).tobytes()) == want_ef[k], (t, k)
            for r in want_thr:
                assert as_bytes(ops.threshold_topk_many(arrays, r, seed=11)) == want_thr[r], (t, r)


@pytest.mark.parametrize("threads", [1, 3])
@pytest.mark.parametrize("n", [1000, 3 * CHUNK + 5])  # exact path; sampled path
def test_ef_topk_many_nan_leaves_every_residual_summed(threads: int, n: int) -> None:
    rng = np.random.default_rng(n)
    sizes = [n, 0, 5, n]
    updates = [rng.standard_normal(m).astype(np.float32) for m in sizes]
    updates[3][n // 2] = np.nan  # rarely in the sample: the filtering pass finds it
    residuals = [rng.standard_normal(m).astype(np.float32) for m in sizes]
    want = [r + u for r, u in zip(residuals, updates)]
    with nthreads(threads), pytest.raises(ValueError, match="NaN"):
        ops.ef_topk_many(updates, residuals, 3)
    for r, w in zip(residuals, want):
        assert r.tobytes() == w.tobytes()


def dequantize_jobs(rng: np.random.Generator) -> tuple[list[tuple], list[int]]:
    """Jobs of every bit width and awkward sizes, their outputs back to back in one buffer."""
    specs = [(0, 4, 512), (1, 8, 7), (7, 2, 3), (CHUNK, 1, 512), (CHUNK + 1, 4, CHUNK + 8), (150_001, 8, 512)]
    specs += [(3, 4, 512)] * 50 + [(40_000, 2, 100)]
    jobs, sizes = [], []
    for n, bits, bucket in specs:
        x = rng.standard_normal(n).astype(np.float32)
        packed, scales = ops.quantize(x, bits, bucket, seed=n)
        jobs.append((packed, scales, bits, n, bucket))
        sizes.append(n)
    return jobs, sizes


def test_dequantize_many_equals_one_call_per_job_for_any_thread_count() -> None:
    jobs, sizes = dequantize_jobs(np.random.default_rng(3))
    start = np.random.default_rng(4).standard_normal(sum(sizes)).astype(np.float32)
    offsets = np.concatenate(([0], np.cumsum(sizes)))
    with nthreads(1):
        want_add = start.copy()
        for j, (p, s, bits, n, bucket) in enumerate(jobs):
            ops.dequantize(p, s, bits, n, bucket, acc=want_add[offsets[j] : offsets[j + 1]], weight=0.5)
        want_new = [ops.dequantize(p, s, bits, n, bucket).tobytes() for p, s, bits, n, bucket in jobs]
    for t in THREAD_COUNTS:
        with nthreads(t):
            buf = start.copy()
            views = [buf[offsets[j] : offsets[j + 1]] for j in range(len(jobs))]
            out = _core.dequantize_many([(*job, v, 0.5, True) for job, v in zip(jobs, views)])
            assert buf.tobytes() == want_add.tobytes(), t
            assert all(o is v for o, v in zip(out, views))
            fresh = _core.dequantize_many([(*job, None, 1.0, False) for job in jobs])
            assert [f.tobytes() for f in fresh] == want_new, t


def test_scatter_add_each_equals_scatter_add_for_any_thread_count() -> None:
    rng = np.random.default_rng(5)
    sizes = [0, 1, 9, CHUNK + 3, 200_000] + [33] * 40
    start = [rng.standard_normal(n).astype(np.float32) for n in sizes]
    idx = [rng.integers(0, max(n, 1), size=(0 if n == 0 else 3 * n)).astype(np.uint32) for n in sizes]  # duplicates
    val = [rng.standard_normal(i.size).astype(np.float32) for i in idx]
    with nthreads(1):
        want = [a.copy() for a in start]
        for a, i, v in zip(want, idx, val):
            ops.scatter_add(a, i, v, -1.0)
    for t in THREAD_COUNTS:
        with nthreads(t):
            accs = [a.copy() for a in start]
            assert _core.scatter_add_each(accs, idx, val, -1.0) is None
            assert [a.tobytes() for a in accs] == [w.tobytes() for w in want], t


def assemble_pieces(rng: np.random.Generator, nan_at: Sequence[int] = ()) -> list:
    """A payload of many similar sections (the pieces are spread over the threads)."""
    pieces: list = [b"header", b""]
    for j in range(12):
        x = rng.standard_normal(40_000 + 8 * j).astype(np.float32)
        if j in nan_at:
            x[len(x) // 2] = np.nan
        kernels = [("q", x, 4, 512, j), ("f16", x), ("bf16", x), ("sign", x, 256)]
        pieces.append(kernels[j % 4])
        pieces.append(np.zeros(0, np.float32).tobytes())
    return pieces


def test_assemble_bytes_equal_for_any_thread_count() -> None:
    pieces = assemble_pieces(np.random.default_rng(6))
    with nthreads(1):
        want = _core.assemble(pieces, True)
    for t in THREAD_COUNTS:
        with nthreads(t):
            assert _core.assemble(pieces, True) == want, t


# ------------------------------------------------------- exceptions in pool tasks --
def test_task_exceptions_propagate_and_leave_the_pool_working() -> None:
    rng = np.random.default_rng(8)
    bad = assemble_pieces(rng, nan_at=(0, 4, 11))  # q, q, sign sections (pieces 2, 10, 24): thrown in tasks
    good = assemble_pieces(np.random.default_rng(6))
    with nthreads(1):
        want = _core.assemble(good, False)
    for t in (2, 3, 8, 64):
        with nthreads(t):
            for _ in range(10):
                with pytest.raises(ValueError, match=r"^piece (2|10|24): x contains NaN or infinity$"):
                    _core.assemble(bad, False)
            assert _core.assemble(good, False) == want, t


def test_task_exceptions_from_concurrent_callers() -> None:
    bad = assemble_pieces(np.random.default_rng(8), nan_at=(0, 3, 8))  # q, sign, q
    good = assemble_pieces(np.random.default_rng(6))
    x = np.random.default_rng(9).standard_normal(300_007).astype(np.float32)
    with nthreads(1):
        want = (_core.assemble(good, False), ops.topk(x, 777)[0].tobytes())

    def caller(seed: int) -> int:
        failures = 0
        for i in range(12):
            if (i + seed) % 2:
                try:
                    _core.assemble(bad, False)
                except ValueError as exc:
                    failures += "x contains NaN" in str(exc)
            else:
                assert (_core.assemble(good, False), ops.topk(x, 777)[0].tobytes()) == want
        return failures

    with nthreads(3), ThreadPoolExecutor(max_workers=4) as pool:
        assert list(pool.map(caller, range(4))) == [6, 6, 6, 6]


def test_assemble_error_names_the_first_bad_piece() -> None:
    rng = np.random.default_rng(10)
    first_bad = rng.standard_normal(1 << 21).astype(np.float32)
    first_bad[-1] = np.nan  # found when the whole piece is quantized (about a millisecond)
    small_bad = rng.standard_normal(4096).astype(np.float32)
    small_bad[0] = np.nan  # found in microseconds by the thread that starts on it
    clean = rng.standard_normal(1 << 21).astype(np.float32)
    pieces = [("q", first_bad, 4, 512, 1), ("q", small_bad, 4, 512, 1), ("q", clean, 4, 512, 1)]
    messages = set()
    with nthreads(8):
        for _ in range(20):
            with pytest.raises(ValueError) as info:
                _core.assemble(pieces, False)
            messages.add(str(info.value))
    assert messages == {"piece 0: x contains NaN or infinity"}


# ------------------------------------------- concurrent callers, changing threads --
def test_concurrent_callers_while_the_thread_count_changes(layouts) -> None:
    arrays = layouts[("zeros_at_chunk_edges", "ties")]
    residuals0 = [np.full(a.size, 0.25, np.float32) for a in arrays]
    jobs, _ = dequantize_jobs(np.random.default_rng(12))
    pieces = assemble_pieces(np.random.default_rng(6))
    acc_sizes = [5, CHUNK + 1, 90_000]
    idx = [np.arange(n, dtype=np.uint32)[::-1].copy() for n in acc_sizes]
    val = [np.linspace(-1, 1, n, dtype=np.float32) for n in acc_sizes]

    def run_all() -> list[bytes]:
        out = [b"".join(i + v for i, v in as_bytes(ops.topk_many(arrays, 5000)))]
        res = [r.copy() for r in residuals0]
        out += [b"".join(i + v for i, v in as_bytes(ops.ef_topk_many(arrays, res, 999))), concat(res).tobytes()]
        out += [d.tobytes() for d in _core.dequantize_many([(*job, None, 2.0, False) for job in jobs])]
        accs = [np.ones(n, np.float32) for n in acc_sizes]
        _core.scatter_add_each(accs, idx, val, 0.5)
        out += [a.tobytes() for a in accs]
        out.append(_core.assemble(pieces, True))
        return out

    with nthreads(1):
        want = run_all()
    stop = threading.Event()

    def toggle() -> None:
        counts = (1, 2, 3, 8, 2, 16)
        i = 0
        while not stop.is_set():
            ops.set_num_threads(counts[i % len(counts)])
            i += 1
            time.sleep(0.0005)

    old = ops.get_num_threads()
    toggler = threading.Thread(target=toggle)
    toggler.start()
    try:
        with ThreadPoolExecutor(max_workers=4) as pool:
            results = list(pool.map(lambda _: [run_all() for _ in range(3)], range(4)))
    finally:
        stop.set()
        toggler.join()
        ops.set_num_threads(old)
    for per_thread in results:
        for got in per_thread:
            assert got == want


# --------------------------------------------------------------------------- fork --
def test_fork_child_runs_kernels_while_the_parent_pool_is_busy() -> None:
    x = np.random.default_rng(13).standard_normal(1 << 20).astype(np.float32)
    pieces = assemble_pieces(np.random.default_rng(6))
    with nthreads(1):
        want = (ops.topk(x, 1000)[0].tobytes(), _core.assemble(pieces, True))
    stop = threading.Event()

    def busy() -> None:
        while not stop.is_set():
            ops.topk(x, 1000)
            _core.assemble(pieces, True)

    pids = []
    with nthreads(4):
        ops.topk(x, 1000)  # the pool's workers exist
        worker = threading.Thread(target=busy)
        worker.start()
        try:
            for _ in range(4):
                time.sleep(0.005)
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore", DeprecationWarning)  # fork with threads (3.12+)
                    pid = os.fork()
                if pid == 0:  # the child: its pool must start afresh
                    code = 3
                    try:
                        ops.set_num_threads(4)
                        ok = all(
                            (ops.topk(x, 1000)[0].tobytes(), _core.assemble(pieces, True)) == want for _ in range(3)
                        )
                        code = 0 if ok else 1
                    finally:
                        os._exit(code)
                pids.append(pid)
        finally:
            stop.set()
            worker.join()
    deadline = time.monotonic() + 30
    codes = []
    for pid in pids:
        while True:
            done, status = os.waitpid(pid, os.WNOHANG)
            if done:
                codes.append(os.waitstatus_to_exitcode(status))
                break
            if time.monotonic() > deadline:
                os.kill(pid, 9)
                os.waitpid(pid, 0)
                codes.append("hung")
                break
            time.sleep(0.01)
    assert codes == [0] * len(pids)


# ------------------------------------------------------------ indices near 2^32 --
@pytest.fixture(scope="module")
def near_2_32() -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Two 4 GiB arrays of zeros that are never written (calloc: the kernel's zero page, a
    few MB resident), but for the last two elements of the second."""
    try:
        a = np.zeros(1 << 30, np.float32)
        b = np.zeros((1 << 30) - 1, np.float32)
    except MemoryError:
        pytest.skip("cannot reserve 8 GiB of address space")
    b[-1], b[-2] = 5.0, -4.0
    a.setflags(write=False)
    yield a, b
    del a, b


@pytest.mark.parametrize("threads", [1, 3])
def test_indices_just_below_2_32(near_2_32, threads: int) -> None:
    a, b = near_2_32
    arrays = [a, a, a, b]  # 2^32 - 1 elements together: the largest index is 2^32 - 2
    with nthreads(threads):
        idx, val, cuts = _core.topk_many(arrays, 2)  # indices local to their array
        assert idx.tolist() == [2**30 - 3, 2**30 - 2] and val.tolist() == [-4.0, 5.0] and cuts == [0, 0, 0, 0, 2]
        parts = ops.topk_many(arrays, 2)
        assert [p[0].size for p in parts] == [0, 0, 0, 2]
        assert parts[3][0].tolist() == [2**30 - 3, 2**30 - 2]
        idx, val, cuts = _core.threshold_topk_many(arrays, 1e-9, 3)  # target 4: two zeros, lowest indices
        assert idx.tolist() == [0, 1, 2**30 - 3, 2**30 - 2] and val.tolist() == [0.0, 0.0, -4.0, 5.0]
        assert cuts == [0, 2, 2, 2, 4]


def test_2_32_elements_together_are_refused(near_2_32) -> None:
    a, _ = near_2_32
    four = [a] * 4  # 2^32 elements
    with pytest.raises(ValueError, match=r"arrays hold 4294967296 elements together; at most 2\^32 - 1"):
        ops.topk_many(four, 1)
    with pytest.raises(ValueError, match=r"arrays hold 4294967296 elements together"):
        ops.threshold_topk_many(four, 0.5, seed=1)
    w = np.zeros(1 << 30, np.float32)  # writable, never written: refused before the kernel runs
    with pytest.raises(ValueError, match=r"updates hold 4294967296 elements together"):
        ops.ef_topk_many(four, [w] * 4, 1)


# -------------------------------------------------------- empty and zero-length --
def test_empty_inputs_and_zero_length_segments() -> None:
    e = np.zeros(0, np.float32)
    for t in (1, 3):
        with nthreads(t):
            assert ops.topk_many([], 0) == []
            assert ops.threshold_topk_many([], 0.5, seed=1) == []
            assert ops.ef_topk_many([], [], 0) == []
            idx, val, cuts = _core.topk_many([], 0)
            assert idx.dtype == np.uint32 and val.dtype == np.float32 and idx.size == val.size == 0 and cuts == [0]
            assert as_bytes(ops.topk_many([e, e, e], 0)) == [(b"", b"")] * 3
            assert as_bytes(ops.ef_topk_many([e, e], [e.copy(), e.copy()], 0)) == [(b"", b"")] * 2
            parts = ops.topk_many([e, np.array([1, -3], np.float32), e], 1)
            assert as_bytes(parts) == [(b"", b""), as_bytes([([1], [-3.0])])[0], (b"", b"")]
            with pytest.raises(ValueError):
                ops.topk_many([e, e], 1)
            assert _core.dequantize_many([]) == []
            (out,) = _core.dequantize_many([(np.zeros(0, np.uint8), e, 4, 0, 512, None, 1.0, False)])
            assert out.dtype == np.float32 and out.size == 0
            assert _core.scatter_add_each([], [], [], 1.0) is None
            z = np.zeros(0, np.uint32)
            buf = np.zeros(4, np.float32)
            _core.scatter_add_each([buf[:0], buf[:0], buf[1:1]], [z] * 3, [e] * 3, 1.0)  # empty views may coincide
            assert _core.assemble([], True) == _core.crc32c(b"").to_bytes(4, "little")


# ---------------------------------------------------------- shared memory / aliasing --
def test_overlapping_outputs_are_refused() -> None:
    x = np.random.default_rng(14).standard_normal(1000).astype(np.float32)
    p, s = ops.quantize(x, 4, 128, seed=1)
    buf = np.zeros(1500, np.float32)
    before = buf.tobytes()
    job = (p, s, 4, 1000, 128)
    with pytest.raises(ValueError, match="shares memory with another job"):
        _core.dequantize_many([(*job, buf[:1000], 1.0, True), (*job, buf[500:], 1.0, True)])
    with pytest.raises(ValueError, match="shares memory with another job"):
        _core.dequantize_many([(*job, buf[:1000], 1.0, True)] * 2)
    assert buf.tobytes() == before
    i = np.arange(10, dtype=np.uint32)
    v = np.ones(10, np.float32)
    with pytest.raises(ValueError, match="shares memory with another accumulator"):
        _core.scatter_add_each([buf[:10], buf[9:19]], [i, i], [v, v], 1.0)
    assert buf.tobytes() == before
    upd = np.ones(20, np.float32)
    with pytest.raises(ValueError, match="must not share memory with a residual"):
        ops.ef_topk_many([upd[:10], upd[10:]], [buf[:10], upd[5:15]], 3)
    with pytest.raises(ValueError, match="must not share memory with a residual"):
        ops.ef_topk_many([upd[:10], upd[:10]], [buf[:10], buf[5:15]], 3)
    assert buf.tobytes() == before and upd.tobytes() == np.ones(20, np.float32).tobytes()
    # Updates are only read: one may be given twice.
    res = [np.zeros(10, np.float32), np.zeros(10, np.float32)]
    got = ops.ef_topk_many([upd[:10], upd[:10]], res, 3)
    assert as_bytes(got) == split(*ops.topk(np.ones(20, np.float32), 3), [10, 10])


def test_dequantize_many_output_over_another_jobs_scales_is_refused() -> None:
    rng = np.random.default_rng(15)
    n0, n1 = 1 << 20, 1 << 16
    p0, s0 = ops.quantize(rng.standard_normal(n0).astype(np.float32), 4, n0, seed=1)
    p1, s1 = ops.quantize(rng.standard_normal(n1).astype(np.float32), 4, 512, seed=2)
    buf = np.zeros(n0, np.float32)
    buf[-s1.size :] = s1  # job 1's scales, where job 0 writes its output last
    jobs = [(p0, s0, 4, n0, n0, buf, 1.0, False), (p1, buf[-s1.size :], 4, n1, 512, None, 1.0, False)]
    with nthreads(8), pytest.raises(ValueError, match="shares memory"):
        _core.dequantize_many(jobs)


def test_scatter_add_each_acc_over_another_entrys_values_is_refused() -> None:
    n0, n1 = 1 << 20, 1 << 16
    acc0 = np.ones(n0, np.float32)
    acc1 = np.zeros(n1, np.float32)
    idx0, idx1 = np.arange(n0, dtype=np.uint32), np.arange(n1, dtype=np.uint32)
    with nthreads(8), pytest.raises(ValueError, match="shares memory"):
        _core.scatter_add_each([acc0, acc1], [idx0, idx1], [np.ones(n0, np.float32), acc0[-n1:]], 1.0)


# --------------------------------------------------------------- bad arguments --
def test_dequantize_many_bad_jobs_are_clear_errors() -> None:
    x = np.random.default_rng(16).standard_normal(100).astype(np.float32)
    p, s = ops.quantize(x, 4, 32, seed=1)
    good = (p, s, 4, 100, 32, None, 1.0, False)
    ro = np.zeros(100, np.float32)
    ro.setflags(write=False)
    cases = [
        ([list(good)], ValueError, r"a job is a tuple \(packed, scales"),
        ([good[:7]], ValueError, r"a job is a tuple \(packed, scales"),
        ([None], ValueError, r"a job is a tuple \(packed, scales"),
        ([(p.astype(np.int8), *good[1:])], TypeError, "packed must have dtype uint8"),
        ([(p, s.astype(np.float64), *good[2:])], TypeError, "scales must have dtype float32"),
        ([(p, s, 3, *good[3:])], ValueError, "bits must be 1, 2, 4 or 8"),
        ([(p, s, 4, 100, 0, *good[5:])], ValueError, "bucket must be positive"),
        ([(p, s, 4, -1, 32, *good[5:])], ValueError, r"n must be in \[0, 2\^32 - 1\]"),
        ([(p, s, 4, 2**32, 32, *good[5:])], ValueError, r"n must be in \[0, 2\^32 - 1\]"),
        ([(p, s, 4, 101, 32, *good[5:])], ValueError, "packed has 50 bytes, expected 51"),
        ([(p, s[:-1], *good[2:])], ValueError, "scales has 3 entries, expected 4"),
        ([(*good[:5], np.zeros(99, np.float32), 1.0, True)], ValueError, "acc has 99 elements, expected n = 100"),
        ([(*good[:5], ro, 1.0, True)], ValueError, "acc must be writable"),
        ([(*good[:5], np.zeros(100), 1.0, True)], TypeError, "acc must have dtype float32"),
        (42, TypeError, "incompatible function arguments"),
    ]
    for jobs, error, message in cases:
        with pytest.raises(error, match=message):
            _core.dequantize_many(jobs)


@pytest.mark.parametrize(
    "field, value",
    [(2, "4"), (2, 4.0), (2, 2**40), (3, 2**70), (4, None), (6, "heavy")],
    ids=["bits_str", "bits_float", "bits_huge", "n_huge", "bucket_none", "weight_str"],
)
def test_dequantize_many_wrongly_typed_fields_are_type_or_value_errors(field: int, value: object) -> None:
    x = np.random.default_rng(16).standard_normal(100).astype(np.float32)
    p, s = ops.quantize(x, 4, 32, seed=1)
    job = [p, s, 4, 100, 32, None, 1.0, False]
    job[field] = value
    try:
        _core.dequantize_many([tuple(job)])
    except (TypeError, ValueError):
        return
    except RuntimeError as exc:
        raise AssertionError(f"RuntimeError instead of TypeError/ValueError: {exc}") from None
    raise AssertionError("accepted")


def test_scatter_add_each_bad_arguments_are_clear_and_write_nothing() -> None:
    accs = [np.zeros(10, np.float32), np.zeros(20, np.float32)]
    i = [np.arange(10, dtype=np.uint32), np.array([3, 20], np.uint32)]
    v = [np.ones(10, np.float32), np.ones(2, np.float32)]
    with pytest.raises(IndexError, match=r"indices\[1\] holds 20, out of range for an accumulator of 20"):
        _core.scatter_add_each(accs, i, v, 1.0)
    assert not any(a.any() for a in accs)  # the first entry, valid, was not added either
    with pytest.raises(ValueError, match="must have equal lengths, got 2, 1, 2"):
        _core.scatter_add_each(accs, i[:1], v, 1.0)
    with pytest.raises(TypeError, match=r"indices\[0\] must have dtype uint32, got int64"):
        _core.scatter_add_each(accs[:1], [np.arange(10)], v[:1], 1.0)
    with pytest.raises(ValueError, match=r"indices\[1\] and values\[1\] lengths differ: 2 vs 1"):
        _core.scatter_add_each(accs, i, [v[0], v[1][:1]], 1.0)
    ro = np.zeros(10, np.float32)
    ro.setflags(write=False)
    with pytest.raises(ValueError, match=r"accs\[0\] must be writable"):
        _core.scatter_add_each([ro], i[:1], v[:1], 1.0)
    with pytest.raises(TypeError, match=r"accs\[0\] must be a numpy array"):
        _core.scatter_add_each([[0.0] * 10], i[:1], v[:1], 1.0)
    assert not any(a.any() for a in accs)


def test_many_selection_bad_arguments_are_clear() -> None:
    x = np.ones(4, np.float32)
    with pytest.raises(TypeError, match="arrays must be a sequence of arrays, got ndarray"):
        ops.topk_many(np.ones((2, 2), np.float32), 1)
    with pytest.raises(ValueError, match="k = 9 exceeds the length 8"):
        ops.topk_many([x, x], 9)
    with pytest.raises(ValueError, match="k must be >= 0"):
        ops.topk_many([x], -1)
    with pytest.raises(TypeError, match=r"arrays\[1\] must be a numpy array"):
        _core.topk_many([x, [1.0]], 1)
    with pytest.raises(ValueError, match=r"ratio must be in \[0, 1\]"):
        _core.threshold_topk_many([x], float("nan"), 1)
    with pytest.raises(ValueError, match=r"ratio must be in \[0, 1\]"):
        ops.threshold_topk_many([x], 1.5)
    r = np.zeros(4, np.float32)
    with pytest.raises(ValueError, match="1 updates but 2 residuals"):
        ops.ef_topk_many([x], [r, r.copy()], 1)
    with pytest.raises(ValueError, match=r"updates\[0\] has 4 elements but residuals\[0\] has 3"):
        ops.ef_topk_many([x], [r[:3]], 1)
    with pytest.raises(ValueError, match="updates and residuals must pair up"):
        _core.ef_topk_many([x], [r[:3]], 1, True)
    ro = np.zeros(4, np.float32)
    ro.setflags(write=False)
    with pytest.raises(ValueError, match="must be writable"):
        ops.ef_topk_many([x], [ro], 1)
    with pytest.raises(ValueError, match="is updated in place and must be 4-byte aligned"):
        _core.ef_topk_many([x], [np.frombuffer(bytearray(20), np.float32, 4, 2)], 1, True)
    assert not r.any()
