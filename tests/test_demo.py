"""`fedpress demo --quick` end to end: real loopback sockets, table, JSON and plot;
the same seed gives the same numbers."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

pytest.importorskip("sklearn")

CODECS = ["fp32", "topk:0.01+q4+zstd", "eden4"]


def run_quick(out, *extra: str) -> dict:
    from fedpress.cli import main

    assert main(["demo", "--quick", "--codecs", *CODECS, "--out", str(out), "--no-progress", *extra]) == 0
    return {r["codec"]: r for r in json.loads((out / "results.json").read_text())["results"]}


def test_demo_quick_writes_results(tmp_path, capsys) -> None:
    out = tmp_path / "demo"
    by_codec = run_quick(out)
    assert set(by_codec) == set(CODECS)
    for r in by_codec.values():
        assert r["rounds"] == 4
        assert 0.0 <= r["final_accuracy"] <= 1.0
        assert r["uplink_wire_bytes"] > r["uplink_payload_bytes"] > 0
        assert r["total_wire_bytes"] == r["uplink_wire_bytes"] + r["downlink_wire_bytes"]
    fp32, topk = by_codec["fp32"], by_codec["topk:0.01+q4+zstd"]
    assert fp32["downlink"] is None and topk["downlink"] == "q8+zstd"  # compressed rows compress the downlink
    assert topk["uplink_wire_bytes"] * 10 < fp32["uplink_wire_bytes"]
    assert topk["downlink_wire_bytes"] * 2 < fp32["downlink_wire_bytes"]
    assert topk["total_ratio_vs_fp32"] == pytest.approx(fp32["total_wire_bytes"] / topk["total_wire_bytes"])
    assert fp32["final_accuracy"] > 0.5
    table = capsys.readouterr().out
    assert "uplink vs fp32" in table and "total vs fp32" in table and "topk:0.01+q4+zstd" in table
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return
    assert (out / "accuracy_vs_bytes.png").stat().st_size > 1000


def test_demo_numbers_repeat_for_a_seed(tmp_path) -> None:
    first, second = run_quick(tmp_path / "a"), run_quick(tmp_path / "b")
    for codec in CODECS:
        for key in ("final_accuracy", "curve", "uplink_payload_bytes", "downlink_wire_bytes"):
            assert first[codec][key] == second[codec][key], (codec, key)
    assert run_quick(tmp_path / "c", "--seed", "1")["fp32"]["curve"] != first["fp32"]["curve"]


def test_the_downlink_can_be_the_full_model(tmp_path) -> None:
    by_codec = run_quick(tmp_path / "demo", "--downlink", "none")
    assert all(r["downlink"] is None for r in by_codec.values())


NO_TORCH = """
import sys

class NoTorch:  # as if torch were not installed
    def find_spec(self, name, path=None, target=None):
        if name == "torch" or name.startswith("torch."):
            raise ImportError("No module named 'torch'")

sys.meta_path.insert(0, NoTorch())
from fedpress.cli import main
status = main(sys.argv[1:])
assert "torch" not in sys.modules
sys.exit(status)
"""


def test_the_demo_needs_no_torch(tmp_path) -> None:
    """The digits task trains a numpy MLP: `pip install '.[demo]'` brings no torch."""
    out = tmp_path / "demo"
    result = subprocess.run(
        [
            sys.executable,
            "-c",
            NO_TORCH,
            "demo",
            "--quick",
            "--codecs",
            "fp32",
            "q4",
            "--out",
            str(out),
            "--no-progress",
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    rows = {r["codec"]: r for r in json.loads((out / "results.json").read_text())["results"]}
    assert rows["fp32"]["final_accuracy"] > 0.5 and rows["q4"]["final_accuracy"] > 0.5
