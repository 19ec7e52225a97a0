"""Tasks x cells x seeds: run what is missing, keep what is done, write the reports.

``DIR/sweep.json`` records the settings a sweep ran with; ``DIR/runs.jsonl``
holds every round of every finished run. A run is appended whole when it
ends, so a sweep that is stopped loses at most the runs in flight, and the
same command started again runs only what is missing. Adding cells or seeds
to a finished sweep runs just those; changing the settings is refused (the
rows would no longer be comparable), unless ``overwrite=True``.
"""

from __future__ import annotations

import json
import logging
import multiprocessing
import os
import sys
import time
from collections.abc import Sequence
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from pathlib import Path
from typing import Any, Optional, Union

from .. import __version__
from .cell import Cell, parse_cell
from .report import cell_summaries, plot_summary, run_summary, summary_markdown
from .simulate import Settings, SweepTask, builtin_task, simulate

__all__ = ["run_sweep", "SweepError", "RUNS_FILE", "SUMMARY_JSON", "SUMMARY_MD", "SWEEP_JSON"]

log = logging.getLogger("fedpress.sweep")

RUNS_FILE = "runs.jsonl"
SWEEP_JSON = "sweep.json"
SUMMARY_JSON = "summary.json"
SUMMARY_MD = "summary.md"


class SweepError(ValueError):
    """A sweep cannot start as asked (the message says why and what to do)."""


TaskLike = Union[str, SweepTask]


def _task_key(task: SweepTask) -> dict[str, Any]:
    return {"name": task.name, "train": len(task.train), "test": len(task.test)}


def _load_runs(path: Path, rounds: int) -> tuple[dict[tuple, list], int]:
    """Complete runs by (task, cell, seed), and the number of rows dropped (runs cut short)."""
    runs: dict[tuple, list] = {}
    if not path.exists():
        return runs, 0
    lines = path.read_text().splitlines()
    for line in lines:
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except ValueError:
            continue  # a line torn by a stop in mid-write
        runs.setdefault((row["task"], row["cell"], int(row["seed"])), []).append(row)
    complete = {k: v for k, v in runs.items() if sorted(r["round"] for r in v) == list(range(rounds + 1))}
    dropped = sum(len(v) for k, v in runs.items() if k not in complete)
    return complete, dropped


def _write_text(path: Path, text: str) -> None:
    """Write-then-rename, so a stop mid-write never leaves half a file (mode per umask)."""
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _write_runs(path: Path, runs: dict[tuple, list]) -> None:
    _write_text(path, "".join(json.dumps(r) + "\n" for rows in runs.values() for r in rows))


def _append_run(path: Path, rows: list) -> None:
    with open(path, "ab") as f:
        f.write("".join(json.dumps(r) + "\n" for r in rows).encode())
        f.flush()
        os.fsync(f.fileno())


# Worker processes: one run each, torch with one thread (set inside simulate), and a queue
# that carries each finished round back to the progress bar.
_QUEUE: Any = None


def _init_worker(queue: Any) -> None:
    global _QUEUE
    _QUEUE = queue


def _task_in_worker(task: Any) -> SweepTask:
    if isinstance(task, tuple):  # a built-in task: loaded in the worker, not pickled
        return _BUILTIN_CACHE.setdefault(task, builtin_task(task[0], task[1]))
    return task


_BUILTIN_CACHE: dict[tuple, SweepTask] = {}


def _run_one(task: Any, cell: str, seed: int, settings: Settings) -> list[dict[str, Any]]:
    queue = _QUEUE
    return simulate(
        _task_in_worker(task), cell, seed, settings, on_round=(lambda row: queue.put(1)) if queue is not None else None
    )


#: The settings of a sweep run without any (a frozen dataclass: safe to share).
DEFAULT_SETTINGS = Settings()


def run_sweep(
    tasks: Sequence[TaskLike],
    cells: Sequence[Union[str, Cell]],
    seeds: Sequence[int],
    settings: Settings = DEFAULT_SETTINGS,
    out_dir: Union[str, os.PathLike] = "fedpress-sweep",
    *,
    jobs: int = 1,
    data_dir: Optional[str] = None,
    baseline: str = "fp32",
    progress: bool = True,
    overwrite: bool = False,
) -> dict[str, Any]:
    """Runs every (task, cell, seed) not already in ``out_dir`` and writes the reports.

    ``tasks``: names of built-in tasks (``"digits"``, ``"mnist"``; ``data_dir`` for
    MNIST's IDX files) or ``SweepTask`` objects (your own model and data).
    ``cells``: cell strings (``SPEC[@key=value,...]``) or ``Cell``. Returns the
    summary (also in ``summary.json``)."""
    parsed = list(dict.fromkeys(parse_cell(c) if isinstance(c, str) else c for c in cells))
    if not parsed:
        raise SweepError("no cells to run: give at least one, e.g. fp32 topk:0.01+q4+zstd")
    seeds = list(dict.fromkeys(int(s) for s in seeds))
    if not seeds:
        raise SweepError("no seeds to run")
    jobs = int(jobs)
    if jobs < 1:
        raise SweepError(f"jobs must be at least 1, got {jobs}")
    resolved: list[tuple[Any, SweepTask]] = []
    for t in tasks:
        if isinstance(t, SweepTask):
            resolved.append((t, t))
        else:
            key = (str(t).lower(), data_dir)
            task = builtin_task(*key)
            _BUILTIN_CACHE[key] = task
            resolved.append((key, task))
    if not resolved:
        raise SweepError("no task to run")
    names = [task.name for _, task in resolved]
    if len(set(names)) != len(names):
        raise SweepError(f"two tasks share a name: {names}")

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    meta: dict[str, Any] = {
        "format": "fedpress-sweep-v1",
        "fedpress": __version__,
        "settings": settings.as_dict(),
        "tasks": [_task_key(task) for _, task in resolved],
    }
    meta_path, runs_path = out / SWEEP_JSON, out / RUNS_FILE
    if meta_path.exists() and not overwrite:
        try:
            old = json.loads(meta_path.read_text())
        except ValueError:
            raise SweepError(f"{meta_path} is not a sweep record; use another --out or --overwrite") from None
        differ = [k for k in ("settings",) if old.get(k) != meta[k]]
        old_tasks = {t["name"]: t for t in old.get("tasks", [])}
        differ += [f"task {t['name']}" for t in meta["tasks"] if t["name"] in old_tasks and old_tasks[t["name"]] != t]
        if differ:
            changed = [
                f"{k}: {old['settings'].get(k)} -> {v}"
                for k, v in meta["settings"].items()
                if old.get("settings", {}).get(k) != v
            ]
            raise SweepError(
                f"{out} holds a sweep with other settings ({'; '.join(changed) or ', '.join(differ)}); "
                "use another --out, or --overwrite to discard its runs"
            )
        meta["tasks"] = list(old_tasks.values()) + [t for t in meta["tasks"] if t["name"] not in old_tasks]
    elif overwrite and runs_path.exists():
        runs_path.unlink()
    meta["seeds"] = seeds
    meta["cells"] = [str(c) for c in parsed]
    done, dropped = _load_runs(runs_path, settings.rounds)
    if dropped:
        log.info("dropping %d rows of runs that were cut short; they run again", dropped)
        _write_runs(runs_path, done)
    _write_text(meta_path, json.dumps(meta, indent=1))

    todo = [
        (key, task, str(cell), seed)
        for key, task in resolved
        for cell in parsed
        for seed in seeds
        if (task.name, str(cell), seed) not in done
    ]
    log.info("%d runs to do, %d already in %s", len(todo), len(done), out)
    started = time.perf_counter()
    bar = _Progress(len(todo) * (settings.rounds + 1), enabled=progress and bool(todo))
    try:
        if jobs == 1 or len(todo) <= 1:
            for _key, task, cell, seed in todo:
                rows = simulate(task, cell, seed, settings, on_round=lambda row: bar.update(1))
                _append_run(runs_path, rows)
                done[(task.name, cell, seed)] = rows
                bar.note(f"{task.name} {cell} seed {seed}: accuracy {rows[-1]['test_accuracy']:.4f}")
        else:
            _run_parallel(todo, settings, jobs, runs_path, done, bar)
    finally:
        bar.close()
    log.info("runs done in %.1f s", time.perf_counter() - started)
    return write_reports(out, done, meta, baseline=baseline)


def _run_parallel(todo: list, settings: Settings, jobs: int, runs_path: Path, done: dict, bar: Any) -> None:
    ctx = multiprocessing.get_context("spawn")  # torch and fork do not mix
    with ctx.Manager() as manager:
        queue = manager.Queue()
        with ProcessPoolExecutor(max_workers=jobs, mp_context=ctx, initializer=_init_worker, initargs=(queue,)) as pool:
            futures = {
                pool.submit(_run_one, key, cell, seed, settings): (task.name, cell, seed)
                for key, task, cell, seed in todo
            }
            pending = set(futures)
            while pending:
                finished, pending = wait(pending, timeout=0.2, return_when=FIRST_COMPLETED)
                while not queue.empty():
                    bar.update(queue.get_nowait())
                for fut in finished:
                    rows = fut.result()
                    _append_run(runs_path, rows)
                    done[futures[fut]] = rows
                    name, cell, seed = futures[fut]
                    bar.note(f"{name} {cell} seed {seed}: accuracy {rows[-1]['test_accuracy']:.4f}")


def write_reports(out: Path, runs: dict[tuple, list], meta: dict, *, baseline: str = "fp32") -> dict[str, Any]:
    """summary.json, summary.md and the plots from every complete run in ``runs``."""
    settings = meta["settings"]
    order = {c: i for i, c in enumerate(meta.get("cells", []))}
    keys = sorted(runs, key=lambda k: (k[0], order.get(k[1], len(order)), k[1], k[2]))
    per_run = [run_summary(runs[k], settings["target"]) for k in keys]
    cells = cell_summaries(
        per_run, baseline=str(parse_cell(baseline)), participation=settings["per_round"] / settings["clients"]
    )
    summary = {
        "format": "fedpress-sweep-summary-v1",
        "settings": settings,
        "seeds": meta.get("seeds"),
        "runs": per_run,
        "cells": cells,
    }
    _write_text(out / SUMMARY_JSON, json.dumps(summary, indent=1))
    _write_text(out / SUMMARY_MD, summary_markdown(cells, meta))
    note = plot_summary(cells, [r for k in keys for r in runs[k]], out)
    if note:
        log.warning(note)
    return summary


class _Progress:
    """A tqdm bar on stderr when tqdm is installed, else a plain counter line."""

    def __init__(self, total: int, enabled: bool) -> None:
        self.total, self.count, self.enabled = total, 0, enabled
        self._bar = None
        if enabled:
            try:
                from tqdm import tqdm

                self._bar = tqdm(total=total, unit="round", desc="sweep", file=sys.stderr, dynamic_ncols=True)
            except ImportError:
                pass

    def update(self, n: int) -> None:
        if not self.enabled:
            return
        self.count += n
        if self._bar is not None:
            self._bar.update(n)
        elif self.count == self.total or self.count % 10 == 0:
            sys.stderr.write(f"\rsweep: {self.count}/{self.total} rounds")
            sys.stderr.flush()

    def note(self, text: str) -> None:
        if not self.enabled:
            return
        if self._bar is not None:
            self._bar.write(text, file=sys.stderr)
        else:
            sys.stderr.write(f"\r{text}\n")

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
        elif self.enabled and self.count:
            sys.stderr.write("\n")
