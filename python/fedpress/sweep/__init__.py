"""``fedpress sweep``: how many bytes does this accuracy cost, on your setting?

An in-process FedAvg simulation over tasks x cells x seeds that counts the
bytes the TCP federation would carry for the same configuration, and writes
``runs.jsonl``, ``summary.json``, ``summary.md`` and two plots::

    from fedpress.sweep import Settings, SweepTask, run_sweep
    run_sweep(["mnist"], ["fp32", "topk:0.01+q4+zstd@momentum=0.9"], seeds=[0, 1, 2],
              settings=Settings(clients=50, per_round=10, rounds=100), out_dir="sweep-out", jobs=2)

    # your own model and data:
    task = SweepTask("mine", model_fn=make_my_model, train=(x_train, y_train), test=(x_test, y_test))
    run_sweep([task], cells, seeds=[0])

A cell is an uplink spec with options, ``SPEC[@key=value,...]`` (see
``fedpress.sweep.cell.OPTIONS``).
"""

from __future__ import annotations

from .cell import OPTIONS, Cell, parse_cell
from .runner import SweepError, run_sweep
from .simulate import Settings, SweepTask, builtin_task, simulate

__all__ = [
    "Cell",
    "parse_cell",
    "OPTIONS",
    "Settings",
    "SweepTask",
    "builtin_task",
    "simulate",
    "run_sweep",
    "SweepError",
]
