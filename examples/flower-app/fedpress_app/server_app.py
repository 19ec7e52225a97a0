"""ServerApp: FedAvg over the SuperNodes, wrapped in ``FedPress`` to read compressed replies.

Central evaluation on the digits test split after every round; at the end a table of
accuracy and uplink bytes per round (from ``strategy.history``) is logged and, with
``results-path`` set, written as JSON.
"""

from __future__ import annotations

import json
from logging import INFO
from pathlib import Path
from typing import Any, Optional

from fedpress.flower import FedPress
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord
from flwr.common import log
from flwr.serverapp import Grid, ServerApp
from flwr.serverapp.strategy import FedAvg

from fedpress_app.task import get_model, load_test, test

app = ServerApp()


def _none(value: Any) -> Optional[str]:
    text = str(value).strip()
    return None if text.lower() in ("", "none") else text


class ByteCountingFedAvg(FedAvg):
    """Plain FedAvg that also records what its messages weigh, in the shape of
    ``FedPress.history``: the "none" baseline (no mod, no wrapper) gets the same table."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.history: list[dict[str, Any]] = []

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid):
        messages = list(super().configure_train(server_round, arrays, config, grid))
        sent = sum(_array_bytes(m) for m in messages)
        self.history.append(
            {
                "round": server_round,
                "uplink_payload": 0,
                "uplink_raw": 0,
                "replies": 0,
                "skipped": 0,
                "failures": 0,
                "path": "flower",
                "train_downlink_payload": sent,
                "train_downlink_raw": sent,
                "train_messages": len(messages),
            }
        )
        return messages

    def aggregate_train(self, server_round: int, replies):
        replies = list(replies)
        row = self.history[-1]
        for msg in replies:
            if msg.has_error() or not msg.has_content():
                row["failures"] += 1
                continue
            row["replies"] += 1
            row["uplink_payload"] += _array_bytes(msg)
            row["uplink_raw"] += _array_bytes(msg)
        return super().aggregate_train(server_round, replies)


def _array_bytes(msg: Message) -> int:
    """Bytes of Array data a message carries (Flower's npy-serialised arrays)."""
    if not msg.has_content():
        return 0
    return sum(len(a.data) for rec in msg.content.array_records.values() for a in rec.values())


@app.main()
def main(grid: Grid, context: Context) -> None:
    cfg = context.run_config
    num_rounds = int(cfg["num-server-rounds"])
    seed = int(cfg.get("seed", 0))
    spec = _none(cfg.get("spec", "none"))
    downlink = _none(cfg.get("downlink", "none"))
    fraction_evaluate = float(cfg.get("fraction-evaluate", 1.0))
    min_nodes = int(cfg.get("min-nodes", 2))

    fedavg_args = dict(
        fraction_train=1.0,
        fraction_evaluate=fraction_evaluate,
        min_train_nodes=min_nodes,
        min_evaluate_nodes=min_nodes if fraction_evaluate > 0 else 0,
        min_available_nodes=min_nodes,
    )
    if spec is None:  # plain Flower: float32 arrays both ways
        if downlink is not None:
            log(INFO, 'fedpress app: spec is "none" (no wrapper): downlink=%s is ignored', downlink)
            downlink = None
        strategy = ByteCountingFedAvg(**fedavg_args)
    else:  # fedpress: the one line on the server
        strategy = FedPress(FedAvg(**fedavg_args), downlink=downlink)

    test_data = load_test(seed)
    model = get_model(seed)

    def evaluate_fn(server_round: int, arrays: ArrayRecord) -> MetricRecord:
        model.load_state_dict(arrays.to_torch_state_dict())
        loss, accuracy = test(model, test_data)
        return MetricRecord({"accuracy": float(accuracy), "loss": float(loss)})

    log(
        INFO,
        "fedpress app: spec=%s downlink=%s rounds=%d local-epochs=%s lr=%s",
        spec or "none",
        downlink or "none",
        num_rounds,
        cfg["local-epochs"],
        cfg["lr"],
    )
    result = strategy.start(
        grid=grid,
        initial_arrays=ArrayRecord(model.state_dict()),
        num_rounds=num_rounds,
        train_config=ConfigRecord({"lr": float(cfg["lr"])}),
        evaluate_fn=evaluate_fn,
    )

    rows = _table_rows(strategy.history, result.evaluate_metrics_serverapp)
    for line in _format_table(rows, spec or "none", downlink or "none").splitlines():
        log(INFO, "%s", line)
    path = _none(cfg.get("results-path", ""))
    if path is not None:
        out = {
            "spec": spec or "none",
            "downlink": downlink or "none",
            "num-server-rounds": num_rounds,
            "local-epochs": int(cfg["local-epochs"]),
            "lr": float(cfg["lr"]),
            "initial-accuracy": _metric(result.evaluate_metrics_serverapp.get(0), "accuracy"),
            "rounds": rows,
            "history": strategy.history,
        }
        target = Path(path).expanduser()
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(json.dumps(out, indent=2) + "\n", encoding="utf-8")
        log(INFO, "fedpress app: results written to %s", target.resolve())


def _metric(record: Optional[MetricRecord], key: str) -> Optional[float]:
    return None if record is None or key not in record else float(record[key])


def _table_rows(history: list[dict[str, Any]], central: dict[int, MetricRecord]) -> list[dict[str, Any]]:
    rows = []
    for h in history:
        payload, raw = int(h["uplink_payload"]), int(h["uplink_raw"])
        rows.append(
            {
                "round": int(h["round"]),
                "accuracy": _metric(central.get(h["round"]), "accuracy"),
                "loss": _metric(central.get(h["round"]), "loss"),
                "replies": int(h["replies"]),
                "uplink_payload_bytes": payload,
                "uplink_raw_bytes": raw,
                "ratio": raw / payload if payload else None,
                "train_downlink_bytes": int(h["train_downlink_payload"]),
                "train_downlink_raw_bytes": int(h["train_downlink_raw"]),
            }
        )
    return rows


def _format_table(rows: list[dict[str, Any]], spec: str, downlink: str) -> str:
    lines = [
        f"fedpress per-round table (uplink spec {spec}, downlink {downlink}):",
        f"{'round':>5} {'accuracy':>8} {'replies':>7} {'uplink B':>10} {'raw B':>10} {'ratio':>7} {'downlink B':>10}",
    ]
    for r in rows:
        acc = f"{r['accuracy']:.4f}" if r["accuracy"] is not None else "-"
        ratio = f"{r['ratio']:.1f}x" if r["ratio"] is not None else "-"
        lines.append(
            f"{r['round']:>5} {acc:>8} {r['replies']:>7} {r['uplink_payload_bytes']:>10,} "
            f"{r['uplink_raw_bytes']:>10,} {ratio:>7} {r['train_downlink_bytes']:>10,}"
        )
    if rows:
        up = sum(r["uplink_payload_bytes"] for r in rows)
        raw = sum(r["uplink_raw_bytes"] for r in rows)
        lines.append(
            f"total uplink {up:,} B (raw {raw:,} B, {raw / up if up else float('nan'):.1f}x) over {len(rows)} rounds"
        )
    return "\n".join(lines)
