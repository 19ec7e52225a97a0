"""`fedpress bench --only pipeline` and bench/pipeline.py: the payload path against its kernels.
Tiny sizes, one run each: the rows and the JSON keys are checked, never the timings."""

from __future__ import annotations

import json
import math

import pytest
from cli_helpers import run_cli
from fedpress import _bench_pipeline, bench

ROW_KEYS = {"call", "against", "product_s", "kernel_s", "ratio", "target", "unit", "within_target"}
CALLS = [
    'Encoder("topk:0.01+q4+zstd"), error feedback',
    'Codec("topk:0.01+q4+zstd").encode, no feedback',
    'Codec("q4").encode',
    'Codec("fp16").encode',
    'Codec("eden4").encode',
    "ops.topk(x, 1%)",
    "Aggregator.add, one dense q4 payload",
    "fp.decode, a dense q4 payload",
    "fp.decode, a dense fp32 payload",
    "fp.decode, a dense fp16 payload",
    "fp.decode, a dense bf16 payload",
    "fp.decode, a dense q8 payload",
    "fp.decode, a dense sign payload",
    "fp.decode, a dense eden4 payload",
    "fp.decode, a dense int8 payload",
    'Encoder("topk:0.01+q4+zstd"), 160 tensors',
    'Codec("q4").encode, 160 tensors',
    "fp.decode, q4, 160 tensors",
    "Aggregator.add, q4, 160 tensors",
    "Aggregator.add x 3 top-1% payloads",
    "Aggregator.mean_of(3 top-1% payloads)",
    "  add_many, then result(copy=False)",
    "fp.decode, a top-1% payload",
    "Aggregator.mean_of(3 q4 payloads)",
    "Aggregator.mean_of(3 q4+zstd payloads)",
]


def positive_finite(value: float) -> bool:
    return isinstance(value, float) and math.isfinite(value) and value > 0


def test_every_row_has_both_timings_a_ratio_and_its_target():
    lines: list[str] = []
    report = _bench_pipeline.run(100_000, repeat=1, clients=3, echo=lines.append)
    assert [row["call"] for row in report["rows"]] == CALLS
    for row in report["rows"]:
        assert set(row) == ROW_KEYS
        assert all(positive_finite(row[key]) for key in ("product_s", "kernel_s", "ratio"))
        assert row["within_target"] is None  # the targets are defined at 25.6M
    targets = {row["call"]: row["target"] for row in report["rows"]}
    assert targets['Codec("q4").encode'] == 1.3 and targets["fp.decode, a dense q4 payload"] == 1.2
    assert targets["fp.decode, a dense bf16 payload"] == 1.2
    assert all(targets[f"fp.decode, a dense {code} payload"] == 1.2 for code in ("q8", "sign", "eden4", "int8"))
    assert targets["Aggregator.mean_of(3 top-1% payloads)"] == 1.3
    assert targets["  add_many, then result(copy=False)"] == 1.3
    reads = report["rows"][CALLS.index("ops.topk(x, 1%)")]
    assert reads["unit"] == "reads" and reads["against"].startswith("one streaming read")
    assert report["streaming_read"]["op"] in report["streaming_read"]["candidates_s"]
    assert {"processor", "threads", "simd"} <= set(report["machine"])
    assert report["memory"] == []
    text = "\n".join(lines)
    assert "reads (target <= 2.5)" in text and "(target <= 1.3x)" in text
    assert "the ratios are information only" in text
    json.dumps(report)  # plain numbers and strings only


@pytest.mark.parametrize("n", [100, 5_000, 100_000, 25_600_000])
def test_the_model_rows_cut_the_update_into_views_that_cover_it(n):
    np = pytest.importorskip("numpy")
    x = np.arange(n, dtype=np.float32)
    model = _bench_pipeline.model_of(x)
    assert len(model) == (160 if n >= 40 * 64 else 4 * max(1, n // 64))
    assert all(np.shares_memory(v, x) or v.size == 0 for v in model.values())
    np.testing.assert_array_equal(np.concatenate(list(model.values())), x)


def test_peak_memory_rows_measure_each_encode_in_a_fresh_process():
    rows = _bench_pipeline.peak_memory_rows(100_000, echo=lambda line: None)
    assert [row["call"] for row in rows] == [
        'Codec("q4").encode',
        'Codec("fp16").encode',
        'Codec("eden4").encode',
        'Codec("eden4:shared").encode',
        'Codec("rht+q4").encode',
        'Codec("int8").encode',
        'Codec("q8+zstd").encode',
        'Encoder("topk:0.01+q4+zstd").encode, 2nd round',
        'Encoder("topk:0.01+q4+zstd"), momentum, clip',
    ]
    for row in rows:
        assert "error" not in row, row
        assert row["update_bytes"] == 400_000 and row["payload_bytes"] > 0 and row["extra_bytes"] >= 0
        assert positive_finite(row["peak_over_update_plus_payload"]) and row["target"] == 1.10


def test_fedpress_bench_runs_the_pipeline_group_alone():
    lines: list[str] = []
    report = bench.run(sizes=[100_000], repeat=1, only=["pipeline"], echo=lines.append)
    assert report["results"] == [] and report["targets"] == [] and report["failures"] == []
    assert report["meta"]["pipeline"] and report["pipeline"]["n"] == 100_000
    assert report["pipeline"]["clients"] == bench.CLIENTS
    assert len(report["pipeline"]["rows"]) == len(CALLS)
    # The kernels' table is left out when only the pipeline group runs.
    assert not any(line.startswith("kernel ") for line in lines)


def test_bench_script_writes_json_and_exits_0_whatever_the_ratios(tmp_path, capsys):
    out = tmp_path / "pipeline.json"
    assert _bench_pipeline.main(["--n", "100k", "--repeat", "1", "--clients", "3", "--json", str(out)]) == 0
    report = json.loads(out.read_text())
    assert {"n", "clients", "repeat", "machine", "streaming_read", "rows", "memory"} <= set(report)
    assert report["n"] == 100_000 and len(report["rows"]) == len(CALLS)
    assert "payload path vs kernels" in capsys.readouterr().out


def test_memory_without_the_pipeline_group_is_a_usage_error():
    with pytest.raises(SystemExit, match=r"\[2\].*add pipeline to --only"):
        run_cli(["bench", "--only", "topk", "--memory"])
