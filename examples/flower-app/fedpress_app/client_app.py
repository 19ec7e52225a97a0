"""ClientApp: train the digits MLP on this node's partition; fedpress compresses the reply.

The handlers are ordinary Flower handlers (they receive and return full weights);
``compress_mod`` turns the train reply into one fedpress payload of the update and,
when the server compresses the downlink, decodes the global model before the handler
sees it.
"""

from __future__ import annotations

from functools import lru_cache

from fedpress.flower import compress_mod
from flwr.app import ArrayRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from fedpress_app.task import get_model, load_partition, test, train


@lru_cache(maxsize=None)
def _compress_mod(spec: str, error_feedback: bool):
    return compress_mod(spec, error_feedback=error_feedback)


def fedpress_mod(msg: Message, context: Context, call_next):
    """``compress_mod(spec)`` with this run's ``spec`` ("none": plain Flower, no compression).

    With a spec fixed in code this whole function is one line,
    ``app = ClientApp(mods=[compress_mod("topk:0.01+q4+zstd")])``; reading it from the
    run config here lets ``flwr run ... --run-config 'spec="q8+zstd"'`` switch codecs.
    The mod keeps its error-feedback residual in ``context.state`` (one per node), so
    one cached mod per spec serves every node.
    """
    spec = str(context.run_config["spec"]).strip()
    if spec.lower() == "none":
        return call_next(msg, context)
    mod = _compress_mod(spec, bool(context.run_config.get("error-feedback", True)))
    return mod(msg, context, call_next)


app = ClientApp(mods=[fedpress_mod])  # fedpress: first in the list


def _node_data(context: Context):
    cfg, node = context.run_config, context.node_config
    return load_partition(
        int(node["partition-id"]),
        int(node["num-partitions"]),
        str(cfg.get("partitioning", "iid")),
        int(cfg.get("seed", 0)),
    )


@app.train()
def train_handler(msg: Message, context: Context) -> Message:
    """Load the global arrays, train ``local-epochs`` on this node's share, reply the weights."""
    cfg = context.run_config
    train_data, _ = _node_data(context)
    model = get_model(int(cfg.get("seed", 0)))
    model.load_state_dict(msg.content["arrays"].to_torch_state_dict())
    config = msg.content["config"]
    stats = train(
        model,
        train_data,
        epochs=int(cfg["local-epochs"]),
        lr=float(config.get("lr", cfg["lr"])),
        momentum=float(cfg.get("momentum", 0.0)),
        batch_size=int(cfg.get("batch-size", 32)),
        seed=int(cfg.get("seed", 0)),
        partition_id=int(context.node_config["partition-id"]),
        server_round=int(config.get("server-round", 0)),
    )
    content = RecordDict(
        {
            "arrays": ArrayRecord(model.state_dict()),
            "metrics": MetricRecord({"train_loss": float(stats["loss"]), "num-examples": len(train_data)}),
        }
    )
    return Message(content=content, reply_to=msg)


@app.evaluate()
def evaluate_handler(msg: Message, context: Context) -> Message:
    """Loss and accuracy of the global model on this node's share of the test split."""
    _, test_data = _node_data(context)
    model = get_model(int(context.run_config.get("seed", 0)))
    model.load_state_dict(msg.content["arrays"].to_torch_state_dict())
    loss, accuracy = test(model, test_data)
    content = RecordDict(
        {
            "metrics": MetricRecord(
                {"eval_loss": float(loss), "eval_acc": float(accuracy), "num-examples": len(test_data)}
            )
        }
    )
    return Message(content=content, reply_to=msg)
