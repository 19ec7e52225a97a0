"""Review of ``Aggregator.mean_of``: the same arrays, bit for bit, as ``add_many`` then
``result(copy=False)`` whatever the aggregator held before (dense, sparse, int, rotated sums,
merged or added one by one), whatever the batch mixes, weighs and how many threads sum it;
the aggregator empty afterwards; and on a refusal nothing added. Also the two callers (the
ordered server's ``_combine``, Flower's FedAvg fast path) against add_many then result."""

from __future__ import annotations

import fedpress as fp
import numpy as np
import pytest
from _payload_helpers import corrupt
from conftest import num_threads
from fedpress.format import decoding
from fedpress.format.reader import parse


def base_model(rng: np.random.Generator) -> dict[str, np.ndarray]:
    return {
        "a": rng.standard_normal(70_001).astype(np.float32),  # three ranges, the last ragged
        "b": rng.standard_normal(1 << 15).astype(np.float32),  # exactly one range
        "tiny": 1e-6 * rng.standard_normal(2000).astype(np.float32),  # no entry kept by a global top-k
        "h": rng.standard_normal(3000).astype(np.float16),
        "d": rng.standard_normal(500),
        "e": np.zeros((0, 3), np.float32),
        "steps": np.array(7, np.int64),
    }


def enc(spec: str, base: dict[str, np.ndarray], i: int, **kw: object) -> bytes:
    update = {k: v * (i + 1) if v.dtype.kind == "f" else v + i for k, v in base.items()}
    return fp.Codec(spec).encode(update, seed=i, **kw)  # type: ignore[arg-type]


def assert_same(got: dict[str, np.ndarray], want: dict[str, np.ndarray]) -> None:
    assert list(got) == list(want)
    for name in want:
        assert got[name].dtype == want[name].dtype and got[name].shape == want[name].shape, name
        assert got[name].tobytes() == want[name].tobytes(), name  # bits, NaNs and -0.0 included


def compare(prior: list, batch: list[bytes], weights: list[float] | None, **agg_kw: object) -> fp.Aggregator:
    """mean_of against add_many + result(copy=False), both after the same ``prior`` steps
    (callables given the aggregator); returns the aggregator mean_of emptied."""
    want_agg, got_agg = fp.Aggregator(**agg_kw), fp.Aggregator(**agg_kw)  # type: ignore[arg-type]
    for step in prior:
        step(want_agg)
        step(got_agg)
    want_agg.add_many(batch, weights)
    want = want_agg.result(copy=False)
    assert_same(got_agg.mean_of(batch, weights), want)
    assert got_agg.count == 0 and got_agg.total_weight == 0.0 and got_agg._table is None
    return got_agg


def dense_and_stream(rng: np.random.Generator) -> dict[str, np.ndarray]:
    """A model that a global top-k:0.3 sends "big" dense (most of it kept) and "small" as a stream."""
    return {
        "big": 100 * rng.standard_normal(1000).astype(np.float32),
        "small": rng.standard_normal(10_000).astype(np.float32),
    }


def state(agg: fp.Aggregator) -> tuple:
    return agg.count, agg.total_weight, {k: v.tobytes() for k, v in agg.result().items()}


RNG = np.random.default_rng(2024)
BASE = base_model(RNG)
TOPK = [enc("topk:0.05+q4", BASE, i) for i in range(4)]
WEIGHTS = [1.0, 0.0, 2.5, 0.3]  # a zero weight among them


@pytest.mark.parametrize(
    ("prior_spec", "kw"),
    [
        ("q8", {}),
        ("fp32", {}),
        ("topk:0.05", {}),
        ("randk:0.1", {}),
        ("eden4", {}),
        ("rht+q4", {}),
        ("eden4:shared", {"rotation_seed": 5}),
        ("int4:clip=0.01:nmax=8", {"rotation_seed": 7}),
    ],
)
@pytest.mark.parametrize("how", ["add", "add_many"])
def test_prior_sums_are_in_the_mean(prior_spec: str, kw: dict, how: str) -> None:
    prior = [enc(prior_spec, BASE, 9, **kw), enc(prior_spec, BASE, 10, **kw)]
    if how == "add":
        steps = [lambda agg, p=p: agg.add(p, 1.5) for p in prior]
    else:
        steps = [lambda agg: agg.add_many(prior, [1.0, 2.0])]
    compare(steps, TOPK, WEIGHTS)


@pytest.mark.parametrize(
    "batch",
    [
        pytest.param([enc("q8", BASE, 0), TOPK[1], enc("fp32", BASE, 2), TOPK[3]], id="dense-and-streams"),
        pytest.param([TOPK[0], enc("randk:0.05", BASE, 1), TOPK[2]], id="streams-and-seeded"),
        pytest.param(
            [enc("eden4:shared", BASE, 0, rotation_seed=3), TOPK[1], enc("eden4:shared", BASE, 2, rotation_seed=3)],
            id="rotated-and-streams",
        ),
        pytest.param([enc("int4:clip=0.01:nmax=8", BASE, 0, rotation_seed=7), TOPK[1], TOPK[2]], id="int-and-streams"),
        pytest.param([enc(s, BASE, i) for i, s in enumerate(["topk:0.01+sign", "topk:0.2+fp16+zstd"])], id="codes"),
        pytest.param([enc("topk:0.05+q8+zstd", BASE, i) for i in range(3)], id="zstd"),
        pytest.param(TOPK[:1], id="single"),
    ],
)
def test_mixed_batches(batch: list[bytes]) -> None:
    weights = [float(w) for w in range(1, len(batch) + 1)]  # integers: int sums take them
    compare([], batch, weights)
    compare([lambda agg: agg.add(enc("q8", BASE, 20), 2.0)], batch, weights)


def test_aggregator_kinds_and_recorded_dtypes() -> None:
    compare([], TOPK, WEIGHTS, dtype=np.float64)
    compare([], TOPK, WEIGHTS, table=BASE)
    digest = [fp.Codec("topk:0.05", table="digest").encode(BASE, seed=i) for i in range(3)]
    compare([], digest, None, table=BASE)
    # float32 arrays recorded as other float dtypes: divided by result, not in the pass
    recorded = {"a": "bfloat16", "b": "float16"}
    compare([], [fp.Codec("topk:0.05").encode(BASE, seed=i, dtypes=recorded) for i in range(3)], None)


@pytest.mark.parametrize("threads", [1, 2, 3])
def test_large_sums_split_over_threads(threads: int) -> None:
    rng = np.random.default_rng(threads)
    big = {"x": rng.standard_normal(1_000_003).astype(np.float32), "y": rng.standard_normal(65_537).astype(np.float32)}
    batch = [enc("topk:0.2", big, i) for i in range(5)]
    with num_threads(threads):
        compare([], batch, [1.0, 2.0, 3.0, 0.5, 0.0])
        compare([lambda agg: agg.add(enc("q8", big, 9), 0.7)], batch, [1.0, 2.0, 3.0, 0.5, 0.0])
        compare([lambda agg: agg.add(enc("q8", big, 9), 0.7)], batch, [0.0] * 5)  # nothing new, still divided


@pytest.mark.parametrize(
    "weights",
    [
        [1e30] * 4,
        [1e-30] * 4,
        [1e-45, 0.0, 0.0, 0.0],
        [3e38, 3e38, 0.0, 0.0],
    ],
)
def test_extreme_weights(weights: list[float]) -> None:
    with np.errstate(all="ignore"):  # the float32 divisor may be 0 or inf: both paths alike
        compare([], TOPK, weights)
        compare([lambda agg: agg.add(enc("q8", BASE, 20), 1.0)], TOPK, weights)


@pytest.mark.parametrize(
    "weights", [[1e300, 0, 0, 0], [1e39, 1e39, 1.0, 1.0], [1.0, 3.5e38, 0, 0], [1e-320, 0, 0, 0], [1.0, 1e-46, 1, 1]]
)
def test_a_weight_beyond_float32_is_refused_by_both_paths_and_adds_nothing(weights: list[float]) -> None:
    """float32 sums are multiplied by each weight in float32: one beyond its range would
    make them infinite or NaN, and a positive one that rounds to 0 would count in the total
    weight and add nothing (a NaN mean); either is refused before anything is added."""
    agg = fp.Aggregator()
    agg.add(enc("q8", BASE, 20), 1.0)
    before = state(agg)
    for call in (agg.add_many, agg.mean_of):
        with pytest.raises(ValueError, match="beyond float32's range"):
            call(TOPK, weights)
        assert state(agg) == before
    with np.errstate(all="ignore"):  # a float64 sum may overflow too: both paths alike
        wide = compare([], TOPK, weights, dtype=np.float64)  # float64 sums take them
    assert wide.count == 0


@pytest.mark.parametrize("how", ["add_update", "merge"])
def test_a_float64_sum_from_before(how: str) -> None:
    m = dense_and_stream(np.random.default_rng(6))
    if how == "add_update":  # a float64 tensor of the model: add_update sums it in float64
        m["small"] = m["small"].astype(np.float64)
    batch = [enc("topk:0.3", m, i) for i in range(3)]
    assert [decoding.streamable(r) for r in parse(batch[0]).tensors] == [False, True]

    def prior(agg: fp.Aggregator) -> None:
        if how == "add_update":
            agg.add_update(m, 1.0)
            return
        other = fp.Aggregator(np.float64)
        other.add(enc("q8", m, 7), 1.0)
        agg.merge(other)

    one_by_one = fp.Aggregator()
    prior(one_by_one)
    for p in batch:
        one_by_one.add(p)
    want = one_by_one.result(copy=False)
    agg = fp.Aggregator()
    prior(agg)
    got = agg.mean_of(batch)
    for name in want:
        np.testing.assert_allclose(got[name], want[name], rtol=1e-6, atol=1e-7)


def test_a_bad_payload_in_the_middle_adds_nothing() -> None:
    rng = np.random.default_rng(7)
    m = {f"t{i}": rng.standard_normal(s).astype(np.float32) for i, s in enumerate([3000, 70_001, 500, 40_000])}
    good = [enc("topk:0.05+q4", m, i) for i in range(5)]
    streams = [r for r in parse(good[2]).tensors if decoding.streamable(r)]
    bad_late = corrupt(good[2], {streams[1].value_offset - 1: 0xFF})  # checksummed, a bad index stream
    bad_early = corrupt(good[3], {streams[0].value_offset - 1: 0xFF})
    dense = fp.Codec("q8").encode(m, seed=1)
    for batch, first in [
        ([good[0], bad_late, dense, bad_early], 1),
        ([good[0], dense, bad_early, bad_late], 2),
        ([dense, good[1], good[0], bad_late], 3),
    ]:
        messages = []
        for call in ("add_many", "mean_of"):
            agg = fp.Aggregator()
            agg.add(good[4], 2.0)
            before = state(agg)
            with pytest.raises(fp.DecodeError, match=f"^payload {first}: ") as info:
                getattr(agg, call)(batch, [1.0] * len(batch))
            assert state(agg) == before
            messages.append(str(info.value))
        assert messages[0] == messages[1]
    compare([lambda agg: agg.add(good[4], 2.0)], [good[0], dense, good[1]], None)


def test_twice_after_merge_and_not_aliased() -> None:
    agg = fp.Aggregator()
    r = agg.mean_of(TOPK, WEIGHTS)
    first = {k: v.copy() for k, v in r.items()}
    second = agg.mean_of(TOPK[:2], [1.0, 3.0])
    assert_same(r, first)  # the second call did not write into the first's arrays
    assert_same(second, fp.Aggregator().mean_of(TOPK[:2], [1.0, 3.0]))

    def merged(agg: fp.Aggregator) -> None:
        other = fp.Aggregator()
        other.add(enc("eden4:shared", BASE, 1, rotation_seed=5), 2.0)
        other.add(TOPK[0], 1.0)
        agg.merge(other)

    compare([merged], TOPK, WEIGHTS)
    with pytest.raises(ValueError, match="no payload was added"):
        agg.mean_of([])


def test_the_ordered_servers_combine_is_add_many_then_result() -> None:
    from fedpress._update_math import scale
    from fedpress.federation.model import zero_reference
    from fedpress.federation.server import Server, _Held

    params = {"w": np.zeros(70_001, np.float32), "b": np.zeros(3, np.float32), "steps": np.zeros((), np.int64)}
    server = Server("127.0.0.1", 0, params, rounds=1, clients_per_round=3, min_clients=3, codec="topk:0.05",
                    token=b"t" * 32, insecure=True, max_share=1.0)  # fmt: skip
    assert not server._streamed
    server._reference = zero_reference(server.params)
    rng = np.random.default_rng(8)
    ups = [{k: rng.standard_normal(v.shape).astype(v.dtype) for k, v in params.items()} for _ in range(3)]
    held = [
        _Held(fp.Codec("topk:0.05").encode(u, seed=i), w, f, None, f"c{i}")
        for i, (u, w, f) in enumerate(zip(ups, [10.0, 20.0, 5.0], [1.0, 0.5, 0.0]))
    ]
    got = server._combine(fp.Aggregator(), held)
    ref = fp.Aggregator()
    ref.add(server._reference, 0.0)
    ref.add_many([h.payload for h in held], [h.weight * h.factor for h in held])
    ratio = sum(h.weight * h.factor for h in held) / sum(h.weight for h in held)
    want = {k: scale(v, ratio) for k, v in ref.result(copy=False).items()}
    assert_same(got, want)


@pytest.mark.parametrize("spec", ["topk:0.1+q4", "topk:0.3+zstd"])
def test_flowers_fast_path_is_add_many_then_result(spec: str, monkeypatch: pytest.MonkeyPatch) -> None:
    pytest.importorskip("flwr.app")
    try:
        from flwr.supercore.task_identity import TaskIdentity

        for attr, value in (("_run_id", 1), ("_node_id", 0), ("_task_id", 0)):
            monkeypatch.setattr(TaskIdentity, attr, value)
    except ImportError:
        pass
    import test_flower as tf
    from fedpress.flower import FedPress, arrays_to_numpy
    from flwr.serverapp.strategy import FedAvg

    g = tf._params()
    replies = tf._round_replies(spec, g, [3, 4, 5])
    results = []
    for patched in (False, True):
        if patched:  # what the fast path did before mean_of
            monkeypatch.setattr(fp.Aggregator, "mean_of", lambda s, p, w: (s.add_many(p, w), s.result(copy=False))[1])
        strategy = FedPress(FedAvg(), fast_path=True)
        tf._configured(strategy, g, [3, 4, 5])
        arrays, _ = strategy.aggregate_train(1, replies)
        assert strategy.history[-1]["path"] == "fast" and strategy.history[-1]["replies"] == 3
        results.append(arrays_to_numpy(arrays))
    assert_same(results[0], results[1])
