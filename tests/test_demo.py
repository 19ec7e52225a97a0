"""`fedpress demo --quick` end to end: real loopback sockets, table, JSON and plot."""

from __future__ import annotations

import json

import pytest

pytest.importorskip("torch")
pytest.importorskip("sklearn")


def test_demo_quick_writes_results(tmp_path, capsys) -> None:
    from fedpress.cli import main

    out = tmp_path / "demo"
    assert main(["demo", "--quick", "--codecs", "fp32", "topk:0.01+q4+zstd", "--out", str(out),
                 "--no-progress"]) == 0
    summary = json.loads((out / "results.json").read_text())
    by_codec = {r["codec"]: r for r in summary["results"]}
    assert set(by_codec) == {"fp32", "topk:0.01+q4+zstd"}
    for r in by_codec.values():
        assert r["rounds"] == 4
        assert 0.0 <= r["final_accuracy"] <= 1.0
        assert r["uplink_wire_bytes"] > r["uplink_payload_bytes"] > 0
    assert by_codec["topk:0.01+q4+zstd"]["uplink_wire_bytes"] * 10 < by_codec["fp32"]["uplink_wire_bytes"]
    assert by_codec["fp32"]["final_accuracy"] > 0.5
    table = capsys.readouterr().out
    assert "uplink vs fp32" in table and "topk:0.01+q4+zstd" in table
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return
    assert (out / "accuracy_vs_uplink.png").stat().st_size > 1000
