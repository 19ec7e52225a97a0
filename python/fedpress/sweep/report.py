"""What a sweep's runs add up to: ``summary.json``, ``summary.md`` and two plots.

Per (cell, seed): the final accuracy, the mean of the last five evaluations,
the bytes each way, and the bytes and round at which the global model first
reached the target accuracy. Per cell, across seeds: accuracy mean and spread,
the gap to the uncompressed ``fp32`` cell paired by seed (same partition, same
initial model, same client sampling), and ratios of bytes against it.
"""

from __future__ import annotations

import math
import os
from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any, Optional

__all__ = ["run_summary", "cell_summaries", "summary_markdown", "plot_summary", "LAST_EVALUATIONS"]

LAST_EVALUATIONS = 5


def run_summary(rows: Sequence[Mapping[str, Any]], target: float) -> dict[str, Any]:
    """One (task, cell, seed) run from its rows (round 0 first)."""
    rows = sorted(rows, key=lambda r: r["round"])
    evals = [r for r in rows if r.get("test_accuracy") is not None]
    last = rows[-1]
    hit = next((r for r in evals if r["round"] > 0 and r["test_accuracy"] >= target), None)
    tail = [r["test_accuracy"] for r in evals if r["round"] > 0][-LAST_EVALUATIONS:]
    return {
        "task": last["task"],
        "cell": last["cell"],
        "seed": last["seed"],
        "rounds": last["round"],
        "final_accuracy": evals[-1]["test_accuracy"] if evals else None,
        "final_loss": evals[-1]["test_loss"] if evals else None,
        "mean_last_accuracy": sum(tail) / len(tail) if tail else None,
        "uplink_bytes": last["uplink_total"],
        "downlink_bytes": last["downlink_total"],
        "total_bytes": last["total_bytes"],
        "uplink_payload_bytes": sum(r["uplink_payload_bytes"] for r in rows),
        "downlink_payload_bytes": sum(r["downlink_payload_bytes"] for r in rows),
        "full_models_sent": sum(r.get("full_models", 0) for r in rows),
        "target": target,
        "round_to_target": hit["round"] if hit else None,
        "total_bytes_to_target": hit["total_bytes"] if hit else None,
        "uplink_bytes_to_target": hit["uplink_total"] if hit else None,
        "seconds": last["seconds"],
        # differential privacy (cell option dp): the run's epsilon at delta, from the last round's accountant
        "epsilon": (last.get("privacy") or {}).get("epsilon"),
        "delta": (last.get("privacy") or {}).get("delta"),
    }


def _mean(xs: Iterable[float]) -> Optional[float]:
    xs = [x for x in xs if x is not None]
    return sum(xs) / len(xs) if xs else None


def _std(xs: Sequence[float]) -> Optional[float]:
    if len(xs) < 2:
        return 0.0 if xs else None
    m = sum(xs) / len(xs)
    return math.sqrt(sum((x - m) ** 2 for x in xs) / (len(xs) - 1))


def cell_summaries(
    runs: Sequence[Mapping[str, Any]], *, baseline: str = "fp32", participation: Optional[float] = None
) -> list[dict[str, Any]]:
    """Per (task, cell), across seeds, in the order the cells first appear.

    Ratios are the baseline's bytes over the cell's, summed over the seeds both
    ran; the gap is the mean over those seeds of (cell - baseline) final
    accuracy, in points."""
    groups: dict[tuple, list] = defaultdict(list)
    for run in runs:
        groups[(run["task"], run["cell"])].append(run)
    out = []
    for (task, cell), members in groups.items():
        members = sorted(members, key=lambda r: r["seed"])
        base = {r["seed"]: r for r in groups.get((task, baseline), [])}
        acc = [r["final_accuracy"] for r in members if r["final_accuracy"] is not None]
        last = [r["mean_last_accuracy"] for r in members if r["mean_last_accuracy"] is not None]
        paired = [r for r in members if r["seed"] in base]
        entry: dict[str, Any] = {
            "task": task,
            "cell": cell,
            "seeds": [r["seed"] for r in members],
            "final_accuracy_mean": _mean(acc),
            "final_accuracy_std": _std(acc),
            "final_accuracy_min": min(acc) if acc else None,
            "final_accuracy_max": max(acc) if acc else None,
            "mean_last_accuracy": _mean(last),
            "uplink_bytes_mean": _mean(r["uplink_bytes"] for r in members),
            "downlink_bytes_mean": _mean(r["downlink_bytes"] for r in members),
            "total_bytes_mean": _mean(r["total_bytes"] for r in members),
            "reached_target": sum(r["round_to_target"] is not None for r in members),
            "round_to_target_mean": _mean(r["round_to_target"] for r in members),
            "total_bytes_to_target_mean": _mean(r["total_bytes_to_target"] for r in members),
            "participation": participation,
            "baseline": baseline if paired else None,
            "epsilon": _mean(r.get("epsilon") for r in members),
        }
        if paired:
            b = [base[r["seed"]] for r in paired]
            entry["gap_points"] = _mean(100.0 * (r["final_accuracy"] - q["final_accuracy"]) for r, q in zip(paired, b))
            entry["gap_last_points"] = _mean(
                100.0 * (r["mean_last_accuracy"] - q["mean_last_accuracy"]) for r, q in zip(paired, b)
            )
            entry["uplink_ratio"] = sum(q["uplink_bytes"] for q in b) / max(sum(r["uplink_bytes"] for r in paired), 1)
            entry["downlink_ratio"] = sum(q["downlink_bytes"] for q in b) / max(
                sum(r["downlink_bytes"] for r in paired), 1
            )
            entry["total_ratio"] = sum(q["total_bytes"] for q in b) / max(sum(r["total_bytes"] for r in paired), 1)
            both = [
                (r, q)
                for r, q in zip(paired, b)
                if r["total_bytes_to_target"] is not None and q["total_bytes_to_target"] is not None
            ]
            entry["to_target_ratio"] = (
                (sum(q["total_bytes_to_target"] for _, q in both) / sum(r["total_bytes_to_target"] for r, _ in both))
                if both
                else None
            )
        out.append(entry)
    return out


def _mb(n: Optional[float]) -> str:
    return "n/a" if n is None else f"{n / 1e6:.3g} MB" if n >= 1e5 else f"{n / 1e3:.3g} kB"


def _ratio(x: Optional[float]) -> str:
    return "n/a" if x is None else f"{x:,.0f}x" if x >= 10 else f"{x:.1f}x"


def summary_markdown(cells: Sequence[Mapping[str, Any]], meta: Mapping[str, Any]) -> str:
    """``summary.md``: one table per task, one row per cell."""
    s = meta.get("settings", {})
    target = s.get("target")
    part = s.get("per_round", 0) / max(s.get("clients", 1), 1)
    lines = [
        "# fedpress sweep",
        "",
        f"{s.get('clients')} clients ({s.get('partition')}"
        + (f", alpha {s.get('alpha')}" if s.get("partition") == "dirichlet" else "")
        + f"), {s.get('per_round')} per round (participation {part:.0%}), {s.get('rounds')} rounds, "
        f"{s.get('local_epochs')} local epoch(s) of SGD lr {s.get('lr')} batch {s.get('batch_size')}; "
        f"seeds {', '.join(map(str, meta.get('seeds', [])))}; evaluated every {s.get('eval_every')} rounds "
        f"(and the last). Bytes are what the TCP federation carries (frames included, no TLS); "
        f"ratios are against the `fp32` cell over the same seeds; the gap is paired by seed, in points; "
        f"'last 5' is the mean of the last {LAST_EVALUATIONS} evaluations.",
        "",
    ]
    for task in dict.fromkeys(c["task"] for c in cells):
        lines += [
            f"## {task}",
            "",
            f"| cell | final acc (mean ± sd) | last 5 | gap vs fp32 | uplink | uplink ratio | total (up+down) "
            f"| total ratio | to {target}: bytes (ratio), round | participation | epsilon |",
            "|---|---|---|---|---|---|---|---|---|---|---|",
        ]
        for c in (c for c in cells if c["task"] == task):
            acc = (
                "n/a"
                if c["final_accuracy_mean"] is None
                else f"{c['final_accuracy_mean']:.4f} ± {c['final_accuracy_std']:.4f}"
            )
            last = "n/a" if c["mean_last_accuracy"] is None else f"{c['mean_last_accuracy']:.4f}"
            gap = "—" if c.get("gap_points") is None else f"{c['gap_points']:+.2f} pt"
            n = len(c["seeds"])
            if c["reached_target"]:
                reach = (
                    f"{_mb(c['total_bytes_to_target_mean'])} ({_ratio(c.get('to_target_ratio'))}), "
                    f"r{c['round_to_target_mean']:.0f}"
                    + ("" if c["reached_target"] == n else f" ({c['reached_target']}/{n} seeds)")
                )
            else:
                reach = "not reached"
            lines.append(
                f"| `{c['cell']}` | {acc} | {last} | {gap} | {_mb(c['uplink_bytes_mean'])} | "
                f"{_ratio(c.get('uplink_ratio'))} | {_mb(c['total_bytes_mean'])} | "
                f"{_ratio(c.get('total_ratio'))} | {reach} | {part:.0%} | "
                + ("—" if c.get("epsilon") is None else f"{c['epsilon']:.2f}")
                + " |"
            )
        lines.append("")
    return "\n".join(lines)


def _pareto(points: list[tuple[float, float, str]]) -> list[tuple[float, float, str]]:
    """The points no other point beats on both bytes (fewer) and accuracy (higher)."""
    front, best = [], -math.inf
    for x, y, name in sorted(points, key=lambda p: (p[0], -p[1])):
        if y > best:
            front.append((x, y, name))
            best = y
    return front


def plot_summary(cells: Sequence[Mapping[str, Any]], rows: Sequence[Mapping[str, Any]], out_dir: Path) -> Optional[str]:
    """``accuracy_vs_uplink.png`` and ``accuracy_vs_total_bytes.png``; returns a note
    when matplotlib is missing (no plots), else None."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "matplotlib is not installed: no plots (pip install 'fedpress[demo]')"
    out_dir = Path(out_dir)
    for task in dict.fromkeys(c["task"] for c in cells):
        suffix = "" if len({c["task"] for c in cells}) == 1 else f"_{task}"
        mine = [c for c in cells if c["task"] == task and c["final_accuracy_mean"] is not None]
        fig, ax = plt.subplots(figsize=(8, 5), dpi=120)
        points = []
        for c in mine:
            x, y = c["uplink_bytes_mean"], c["final_accuracy_mean"]
            yerr = [[y - c["final_accuracy_min"]], [c["final_accuracy_max"] - y]]
            ax.errorbar([x], [y], yerr=yerr, fmt="o", capsize=3, label=c["cell"])
            points.append((x, y, c["cell"]))
        front = _pareto(points)
        if len(front) > 1:
            ax.step(
                [p[0] for p in front],
                [p[1] for p in front],
                where="post",
                color="0.4",
                linestyle="--",
                linewidth=1,
                label="Pareto front",
            )
        _finish(
            plt,
            fig,
            ax,
            "total uplink bytes on the wire (all clients, all rounds)",
            "final test accuracy (mean, min-max over seeds)",
            f"fedpress sweep ({task}): accuracy against uplink bytes",
            out_dir / f"accuracy_vs_uplink{suffix}.png",
        )

        fig, ax = plt.subplots(figsize=(8, 5), dpi=120)
        for c in mine:
            curve: dict[int, list] = defaultdict(list)
            for r in rows:
                if (
                    r["task"] == task
                    and r["cell"] == c["cell"]
                    and r.get("test_accuracy") is not None
                    and r["round"] > 0
                ):
                    curve[r["round"]].append((r["total_bytes"], r["test_accuracy"]))
            pts = [(sum(b for b, _ in v) / len(v), sum(a for _, a in v) / len(v)) for _, v in sorted(curve.items())]
            if pts:
                ax.plot(*zip(*pts), marker=".", markersize=3, linewidth=1, label=c["cell"])
        _finish(
            plt,
            fig,
            ax,
            "cumulative bytes on the wire, uplink + downlink",
            "test accuracy (mean over seeds)",
            f"fedpress sweep ({task}): accuracy against total traffic",
            out_dir / f"accuracy_vs_total_bytes{suffix}.png",
        )
    return None


def _finish(plt: Any, fig: Any, ax: Any, xlabel: str, ylabel: str, title: str, path: Path) -> None:
    """Log x axis, labels, grid and legend; then the figure is saved (write, then rename) and closed."""
    ax.set_xscale("log")
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(True, which="both", alpha=0.3)
    # Below the axes: long cell names would cover the curves.
    handles, labels = ax.get_legend_handles_labels()
    rows = len(labels)
    fig.set_size_inches(fig.get_size_inches()[0], fig.get_size_inches()[1] + 0.16 * rows)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(0.0, -0.14), ncol=1, frameon=False)
    fig.tight_layout()
    tmp = path.with_name(path.name + ".tmp.png")
    fig.savefig(tmp)
    os.replace(tmp, path)
    plt.close(fig)
