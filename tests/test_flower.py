"""fedpress.flower: the ClientApp mod and the FedPress strategy wrapper, on
hand-built Messages and Contexts, and end to end through Flower's own
``Strategy.start`` loop with an in-process grid (no Ray)."""

from __future__ import annotations

import copy
import itertools
import logging
import time
from typing import Any, Optional

import fedpress as fp
import numpy as np
import pytest

flwr_app = pytest.importorskip("flwr.app")
from fedpress.flower import (  # noqa: E402
    RECORD_NAME,
    STYPE,
    FedPress,
    arrays_to_numpy,
    compress_mod,
    is_packed,
    numpy_to_arrays,
    pack,
    unpack,
)
from flwr.app import (  # noqa: E402
    Array,
    ArrayRecord,
    ConfigRecord,
    Context,
    Error,
    Message,
    MessageType,
    Metadata,
    MetricRecord,
    RecordDict,
)
from flwr.clientapp import ClientApp  # noqa: E402
from flwr.serverapp import Grid  # noqa: E402
from flwr.serverapp.strategy import (  # noqa: E402
    DifferentialPrivacyServerSideFixedClipping,
    FedAdam,
    FedAvg,
    FedMedian,
    FedProx,
    Krum,
)

_ids = itertools.count(1)


@pytest.fixture(autouse=True)
def _server_identity():
    """Strategies build Messages stamped with the running task's identity, which a
    ServerApp process sets; here the tests play that process."""
    try:
        from flwr.supercore.task_identity import TaskIdentity
    except ImportError:  # older Flower stamps messages without it
        yield
        return
    saved = (TaskIdentity._run_id, TaskIdentity._node_id, TaskIdentity._task_id)
    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 0, 0
    yield
    TaskIdentity._run_id, TaskIdentity._node_id, TaskIdentity._task_id = saved


# ------------------------------------------------------------------ helpers --
def _params(seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {
        "fc.weight": rng.standard_normal((40, 30)).astype(np.float32),
        "fc.bias": rng.standard_normal(40).astype(np.float32),
        "bn.running_var": rng.random(8).astype(np.float64) + 0.5,
        "bn.num_batches_tracked": np.array(7, np.int64),
        "mask": rng.random(6) < 0.5,
    }


def _metadata(message_type: str, dst: int, src: int = 0, reply_to: str = "") -> Metadata:
    return Metadata(
        run_id=1,
        message_id=f"m{next(_ids)}",
        src_node_id=src,
        dst_node_id=dst,
        reply_to_message_id=reply_to,
        group_id="1",
        created_at=time.time(),
        ttl=3600.0,
        message_type=message_type,
    )


def _message(
    arrays: dict[str, np.ndarray],
    node: int = 5,
    message_type: str = MessageType.TRAIN,
    config: Optional[dict[str, Any]] = None,
) -> Message:
    content = RecordDict({"arrays": numpy_to_arrays(arrays), "config": ConfigRecord(config or {"lr": 0.1})})
    return Message(content=content, metadata=_metadata(message_type, dst=node))


def _context(node: int = 5) -> Context:
    return Context(run_id=1, node_id=node, node_config={}, state=RecordDict(), run_config={})


def _trained(received: dict[str, np.ndarray], seed: int) -> dict[str, np.ndarray]:
    """What a local training run might return: the received weights moved a little."""
    rng = np.random.default_rng(seed)
    out = {}
    for key, value in received.items():
        if value.dtype.kind == "f":
            out[key] = (value + 0.05 * rng.standard_normal(value.shape)).astype(value.dtype)
        elif value.dtype.kind == "b":
            out[key] = ~value
        else:
            out[key] = np.asarray(value + 3)
    return out


def _update(trained: dict[str, np.ndarray], received: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """What compress_mod sends: differences, except bool tensors, which travel as values."""
    return {k: trained[k] if trained[k].dtype.kind == "b" else np.subtract(trained[k], received[k]) for k in received}


def _handler(seed: int = 1, num_examples: int = 10, seen: Optional[list] = None):
    def handler(msg: Message, ctxt: Context) -> Message:
        received = arrays_to_numpy(msg.content["arrays"])
        if seen is not None:
            seen.append(received)
        content = RecordDict(
            {
                "arrays": numpy_to_arrays(_trained(received, seed)),
                "metrics": MetricRecord({"num-examples": num_examples, "train_loss": 0.5}),
            }
        )
        return Message(content=content, reply_to=msg)

    return handler


def _reply(
    spec: str,
    global_arrays: dict[str, np.ndarray],
    node: int,
    seed: int,
    num_examples: int,
    ctxt: Optional[Context] = None,
) -> Message:
    """A node's train reply passed through compress_mod (spec None: Flower's plain reply)."""
    msg = _message(global_arrays, node=node)
    handler = _handler(seed, num_examples)
    if spec is None:
        return handler(msg, ctxt or _context(node))
    return compress_mod(spec)(msg, ctxt or _context(node), handler)


class _NodesGrid(Grid):
    """Only what ``configure_train`` needs: node ids."""

    def __init__(self, nodes: list[int]) -> None:
        self.nodes = nodes

    def set_run(self, run: Any) -> None:
        pass

    @property
    def run(self) -> Any:
        return None

    def create_message(self, content, message_type, dst_node_id, group_id, ttl=None):  # type: ignore[override]
        return Message(content=content, metadata=_metadata(message_type, dst=dst_node_id))

    def get_node_ids(self) -> list[int]:
        return list(self.nodes)

    def push_messages(self, messages):  # type: ignore[override]
        raise NotImplementedError

    def pull_messages(self, message_ids):  # type: ignore[override]
        raise NotImplementedError

    def send_and_receive(self, messages, *, timeout=None):  # type: ignore[override]
        raise NotImplementedError


class _LocalGrid(_NodesGrid):
    """Delivers each message to an in-process ClientApp, copying it as a transport would."""

    def __init__(self, app: ClientApp, contexts: dict[int, Context]) -> None:
        super().__init__(sorted(contexts))
        self.app = app
        self.contexts = contexts

    def send_and_receive(self, messages, *, timeout=None):  # type: ignore[override]
        replies = []
        for msg in messages:
            delivered = Message(
                content=copy.deepcopy(msg.content),
                metadata=_metadata(msg.metadata.message_type, dst=msg.metadata.dst_node_id),
            )
            replies.append(self.app(delivered, self.contexts[msg.metadata.dst_node_id]))
        return replies


def _close(a: dict[str, np.ndarray], b: dict[str, np.ndarray], atol: float = 1e-6) -> None:
    assert list(a) == list(b)
    for key in a:
        np.testing.assert_allclose(
            np.asarray(a[key], np.float64), np.asarray(b[key], np.float64), rtol=0, atol=atol, err_msg=key
        )


# --------------------------------------------------------------- pack form --
def test_pack_round_trip_and_form() -> None:
    payload = fp.Codec("q8").encode(_params())
    record = pack(payload)
    (arr,) = record.values()
    assert (arr.dtype, tuple(arr.shape), arr.stype) == ("uint8", (len(payload),), STYPE)
    assert STYPE == f"fedpress/{fp.format.FORMAT_VERSION}"
    assert is_packed(record) and unpack(record) == payload
    assert not is_packed(numpy_to_arrays(_params()))
    with pytest.raises(fp.DecodeError, match="not a packed fedpress payload"):
        unpack(numpy_to_arrays(_params()))
    with pytest.raises(fp.DecodeError, match="stype 'fedpress/99'"):
        unpack(ArrayRecord({"p": Array(dtype="uint8", shape=(3,), stype="fedpress/99", data=b"abc")}))
    with pytest.raises(fp.DecodeError, match="must be uint8 of shape"):
        unpack(ArrayRecord({"p": Array(dtype="uint8", shape=(4,), stype=STYPE, data=b"abc")}))


def test_numpy_to_arrays_keeps_zero_d_and_order() -> None:
    arrays = _params()
    back = arrays_to_numpy(numpy_to_arrays(arrays))
    assert list(back) == list(arrays)
    for key in arrays:
        assert back[key].shape == arrays[key].shape and back[key].dtype == arrays[key].dtype
        np.testing.assert_array_equal(back[key], arrays[key])


# -------------------------------------------------------------- client mod --
@pytest.mark.parametrize("spec", ["fp32", "q8+zstd", "topk:0.1+q4+zstd"])
def test_mod_packs_the_update_of_a_train_reply(spec: str) -> None:
    g = _params()
    ctxt = _context()
    reply = compress_mod(spec, error_feedback=False)(_message(g), ctxt, _handler(seed=3))
    assert set(reply.content.keys()) == {"arrays", "metrics", RECORD_NAME}
    record = reply.content["arrays"]
    assert is_packed(record)
    payload = unpack(record)
    info = reply.content[RECORD_NAME]
    assert info["spec"] == str(fp.parse_spec(spec)) and info["format"] == fp.format.FORMAT_VERSION
    expected = _trained(g, 3)
    update = _update(expected, g)
    assert info["payload-bytes"] == len(payload)
    assert info["raw-bytes"] == sum(u.nbytes for u in update.values())
    assert info["flower-bytes"] == numpy_to_arrays(expected).count_bytes() - sum(
        len(k) for k in expected
    )  # Array data only, not the keys
    # The metrics a strategy averages are untouched.
    assert dict(reply.content["metrics"]) == {"num-examples": 10, "train_loss": 0.5}
    decoded = fp.decode(payload)
    assert list(decoded) == list(g)
    assert decoded["bn.num_batches_tracked"] == 3  # integer tensors travel exactly
    if spec == "fp32":
        _close(decoded, update, atol=1e-7)
    else:
        err = np.linalg.norm(decoded["fc.weight"] - update["fc.weight"]) / np.linalg.norm(update["fc.weight"])
        assert err < (0.02 if spec.startswith("q8") else 0.97)
    assert _has_no_residual(ctxt)


def _has_no_residual(ctxt: Context) -> bool:
    return "fedpress.residuals" not in ctxt.state


def test_mod_error_feedback_keeps_the_residual_in_context_state() -> None:
    g = _params()
    ctxt = _context()
    mod = compress_mod("topk:0.05+fp32")
    sent = []
    updates = []
    for seed in (11, 12, 13):
        reply = mod(_message(g), ctxt, _handler(seed))
        sent.append(fp.decode(unpack(reply.content["arrays"])))
        trained = _trained(g, seed)
        updates.append(_update(trained, g))
    residual = arrays_to_numpy(ctxt.state["fedpress.residuals"])
    assert ctxt.state["fedpress.encoder"]["rounds"] == 3
    # Error feedback loses nothing: what was sent plus what is pending is everything.
    for key in ("fc.weight", "fc.bias"):
        total_sent = sum(s[key].astype(np.float64) for s in sent)
        total = sum(u[key].astype(np.float64) for u in updates)
        np.testing.assert_allclose(total_sent + residual[key], total, atol=1e-5)
        assert np.linalg.norm(residual[key]) > 0


def test_mod_resets_the_residual_when_the_spec_changes() -> None:
    g = _params()
    ctxt = _context()
    compress_mod("topk:0.05+fp32")(_message(g), ctxt, _handler(1))
    assert "fedpress.residuals" in ctxt.state
    reply = compress_mod("fp32")(_message(g), ctxt, _handler(2))
    trained = _trained(g, 2)
    _close(fp.decode(unpack(reply.content["arrays"])), _update(trained, g), atol=1e-7)
    assert ctxt.state["fedpress.encoder"]["spec"] == "fp32"


@pytest.mark.parametrize("message_type", [MessageType.EVALUATE, MessageType.QUERY, "train.custom"])
def test_mod_passes_other_messages_through(message_type: str) -> None:
    g = _params()
    reply = compress_mod("topk:0.1+q4")(_message(g, message_type=message_type), _context(), _handler(4))
    if message_type == "train.custom":  # an action of the train category is a train message
        assert is_packed(reply.content["arrays"])
    else:
        assert not is_packed(reply.content["arrays"])
        assert RECORD_NAME not in reply.content
        _close(arrays_to_numpy(reply.content["arrays"]), _trained(g, 4), atol=0)


@pytest.mark.parametrize("message_type", [MessageType.TRAIN, MessageType.EVALUATE])
def test_mod_decodes_a_compressed_downlink_before_the_handler(message_type: str) -> None:
    g = _params()
    downlink = fp.Codec("fp16").encode(g)
    msg = Message(
        content=RecordDict({"arrays": pack(downlink), "config": ConfigRecord({"lr": 0.1})}),
        metadata=_metadata(message_type, dst=5),
    )
    seen: list = []
    reply = compress_mod("fp32", error_feedback=False)(msg, _context(), _handler(6, seen=seen))
    assert is_packed(msg.content["arrays"])  # the caller's message is left as it was
    received = fp.decode(downlink)
    _close(seen[0], received, atol=0)
    if message_type == MessageType.TRAIN:
        # The update is relative to what the node received, not to the server's exact weights.
        trained = _trained(received, 6)
        _close(fp.decode(unpack(reply.content["arrays"])), _update(trained, received), atol=1e-7)


def test_mod_reports_a_corrupt_downlink_as_an_error_reply() -> None:
    payload = bytearray(fp.Codec("fp16").encode(_params()))
    payload[20] ^= 0xFF
    msg = Message(content=RecordDict({"arrays": pack(bytes(payload))}), metadata=_metadata("train", dst=5))
    called = []
    reply = compress_mod("q8")(msg, _context(), lambda m, c: called.append(1))
    assert not called and reply.has_error()
    assert "cannot decode the downlink payload" in reply.error.reason


def test_mod_leaves_error_replies_alone_and_rejects_mismatched_arrays() -> None:
    g = _params()
    mod = compress_mod("q8")

    def failing(msg: Message, ctxt: Context) -> Message:
        return Message(Error(code=0, reason="out of memory"), reply_to=msg)

    reply = mod(_message(g), _context(), failing)
    assert reply.has_error() and reply.error.reason == "out of memory"

    def renamed(msg: Message, ctxt: Context) -> Message:
        arrays = {"other": np.zeros(3, np.float32)}
        return Message(
            content=RecordDict({"arrays": numpy_to_arrays(arrays), "metrics": MetricRecord({"num-examples": 1})}),
            reply_to=msg,
        )

    reply = mod(_message(g), _context(), renamed)
    assert reply.has_error() and "missing" in reply.error.reason and "'other'" in reply.error.reason

    def reshaped(msg: Message, ctxt: Context) -> Message:
        arrays = dict(g, **{"fc.bias": np.zeros(41, np.float32)})
        return Message(
            content=RecordDict({"arrays": numpy_to_arrays(arrays), "metrics": MetricRecord({"num-examples": 1})}),
            reply_to=msg,
        )

    reply = mod(_message(g), _context(), reshaped)
    assert reply.has_error() and "'fc.bias' has shape (41,)" in reply.error.reason


def test_compress_mod_rejects_a_bad_spec_at_once() -> None:
    with pytest.raises(ValueError):
        compress_mod("topk:2+q4")
    with pytest.raises(ValueError):
        compress_mod("nonsense")


# --------------------------------------------------------- strategy wrapper --
def _configured(strategy: FedPress, g: dict[str, np.ndarray], nodes: list[int], server_round: int = 1) -> list[Message]:
    return list(strategy.configure_train(server_round, numpy_to_arrays(g), ConfigRecord(), _NodesGrid(nodes)))


def _round_replies(spec: Optional[str], g: dict[str, np.ndarray], nodes: list[int]) -> list[Message]:
    return [_reply(spec, g, node, seed=100 + node, num_examples=10 * (i + 1)) for i, node in enumerate(nodes)]


def _plain_fedavg(g: dict[str, np.ndarray], packed_replies: list[Message]) -> dict[str, np.ndarray]:
    """Flower's own FedAvg over full arrays rebuilt from each node's decoded payload."""
    replies = []
    for msg in packed_replies:
        update = fp.decode(unpack(msg.content["arrays"]))
        full = {k: update[k] if g[k].dtype.kind == "b" else (g[k] + update[k]).astype(g[k].dtype) for k in g}
        replies.append(
            Message(
                content=RecordDict({"arrays": numpy_to_arrays(full), "metrics": msg.content["metrics"]}),
                metadata=msg.metadata,
            )
        )
    arrays, _ = FedAvg().aggregate_train(1, replies)
    return arrays_to_numpy(arrays)


@pytest.mark.parametrize("spec", ["fp32", "q8+zstd", "topk:0.1+q4+zstd"])
def test_fast_and_generic_paths_give_flowers_fedavg(spec: str) -> None:
    g = _params()
    nodes = [3, 4, 5]
    replies = _round_replies(spec, g, nodes)
    expected = _plain_fedavg(g, replies)
    results = {}
    for fast in (True, False):
        strategy = FedPress(FedAvg(), fast_path=fast)
        _configured(strategy, g, nodes)
        arrays, metrics = strategy.aggregate_train(1, replies)
        assert strategy.history[-1]["path"] == ("fast" if fast else "generic")
        assert metrics["train_loss"] == pytest.approx(0.5)
        results[fast] = arrays_to_numpy(arrays)
        row = strategy.history[-1]
        assert row["replies"] == 3 and row["skipped"] == 0
    for key in g:
        np.testing.assert_allclose(results[True][key], results[False][key], rtol=0, atol=1e-6)
        # FedAvg turns integer tensors into float means; the fast path keeps their dtype.
        np.testing.assert_allclose(
            np.asarray(results[False][key], np.float64), np.asarray(expected[key], np.float64), rtol=0, atol=1e-6
        )
    assert results[True]["bn.num_batches_tracked"].dtype == np.int64
    assert results[True]["bn.num_batches_tracked"] == 10
    assert results[True]["bn.running_var"].dtype == np.float64


def test_history_counts_uplink_payload_and_raw_bytes() -> None:
    g = _params()
    strategy = FedPress(FedAvg())
    _configured(strategy, g, [1, 2])
    replies = _round_replies("topk:0.1+q8+zstd", g, [1, 2])
    strategy.aggregate_train(1, replies)
    row = strategy.history[-1]
    assert row["round"] == 1 and row["replies"] == 2
    assert row["uplink_payload"] == sum(len(unpack(m.content["arrays"])) for m in replies)
    assert row["uplink_raw"] == sum(m.content[RECORD_NAME]["flower-bytes"] for m in replies)
    assert row["uplink_raw"] > 5 * row["uplink_payload"]
    assert row["train_messages"] == 2
    assert (
        row["train_downlink_payload"]
        == row["train_downlink_raw"]
        == 2 * sum(len(a.data) for a in numpy_to_arrays(g).values())
    )


@pytest.mark.parametrize("fast", [True, False])
def test_a_corrupt_payload_is_left_out_of_the_round(fast: bool, caplog: pytest.LogCaptureFixture) -> None:
    g = _params()
    nodes = [1, 2, 3]
    replies = _round_replies("q8+zstd", g, nodes)
    data = bytearray(unpack(replies[1].content["arrays"]))
    data[len(data) // 2] ^= 0x5A
    replies[1].content["arrays"] = pack(bytes(data))
    strategy = FedPress(FedAvg(), fast_path=fast)
    _configured(strategy, g, nodes)
    with caplog.at_level(logging.WARNING, logger="flwr.fedpress"):
        arrays, _ = strategy.aggregate_train(1, replies)
    assert strategy.history[-1]["skipped"] == 1 and strategy.history[-1]["replies"] == 2
    assert any("node 2 left out of the round" in r.getMessage() for r in caplog.records)
    good = [replies[0], replies[2]]
    reference = FedPress(FedAvg(), fast_path=fast)
    _configured(reference, g, nodes)
    expected, _ = reference.aggregate_train(1, good)
    _close(arrays_to_numpy(arrays), arrays_to_numpy(expected), atol=0)


def test_a_payload_for_another_model_is_left_out() -> None:
    g = _params()
    strategy = FedPress(FedAvg())
    _configured(strategy, g, [1, 2])
    replies = _round_replies("q8", g, [1, 2])
    other = dict(g)
    other["fc.bias"] = np.zeros(41, np.float32)
    replies[0].content["arrays"] = pack(fp.Codec("q8").encode(other))
    for fast in (True, False):
        strategy = FedPress(FedAvg(), fast_path=fast)
        _configured(strategy, g, [1, 2])
        arrays, _ = strategy.aggregate_train(1, list(replies))
        assert arrays is not None
        assert strategy.history[-1]["skipped"] == 1


def test_error_replies_and_unpacked_replies_do_not_lose_the_round() -> None:
    g = _params()
    nodes = [1, 2, 3]
    strategy = FedPress(FedAvg())
    messages = _configured(strategy, g, nodes)
    packed = _round_replies("fp32", g, [1, 2])
    plain = _reply(None, g, 3, seed=103, num_examples=30)
    failed = Message(Error(code=0, reason="node crashed"), reply_to=messages[0])
    arrays, _ = strategy.aggregate_train(1, packed + [plain, failed])
    row = strategy.history[-1]
    assert (row["path"], row["replies"], row["failures"], row["skipped"]) == ("generic", 3, 1, 0)
    expected = {}
    total = 10 + 20 + 30
    for key in ("fc.weight", "fc.bias"):
        expected[key] = sum(
            w / total * _trained(g, 100 + n)[key].astype(np.float64) for n, w in ((1, 10), (2, 20), (3, 30))
        )
    got = arrays_to_numpy(arrays)
    for key in expected:
        np.testing.assert_allclose(got[key], expected[key], atol=1e-5)


_INNER_STRATEGIES = {
    "FedMedian": lambda: FedMedian(),
    "FedProx": lambda: FedProx(proximal_mu=0.1),
    "FedAdam": lambda: FedAdam(eta=0.05),
    "Krum": lambda: Krum(num_malicious_nodes=0),
    "DP-server-fixed-clipping": lambda: DifferentialPrivacyServerSideFixedClipping(
        FedAvg(), noise_multiplier=0.0, clipping_norm=0.5, num_sampled_clients=3
    ),
}


@pytest.mark.parametrize("name", sorted(_INNER_STRATEGIES))
def test_any_inner_strategy_sees_full_arrays(name: str) -> None:
    g = {k: v for k, v in _params().items() if v.dtype.kind != "b"}  # Flower's DP cannot subtract bools
    nodes = [1, 2, 3]
    strategy = FedPress(_INNER_STRATEGIES[name]())
    assert len(_configured(strategy, g, nodes)) == 3
    arrays, _ = strategy.aggregate_train(1, _round_replies("fp32", g, nodes))
    assert strategy.history[-1]["path"] == "generic" and strategy.history[-1]["replies"] == 3
    # The same strategy on the replies a plain Flower client would have sent.
    reference = _INNER_STRATEGIES[name]()
    list(reference.configure_train(1, numpy_to_arrays(g), ConfigRecord(), _NodesGrid(nodes)))
    plain = [_reply(None, g, n, seed=100 + n, num_examples=10 * (i + 1)) for i, n in enumerate(nodes)]
    expected, _ = reference.aggregate_train(1, plain)
    assert expected is not None
    floats = [k for k in g if g[k].dtype.kind == "f"]
    _close(
        {k: arrays_to_numpy(arrays)[k] for k in floats}, {k: arrays_to_numpy(expected)[k] for k in floats}, atol=1e-6
    )


def test_downlink_is_compressed_once_per_round() -> None:
    g = _params()
    strategy = FedPress(FedAvg(), downlink="fp16")
    messages = _configured(strategy, g, [1, 2, 3])
    records = [m.content["arrays"] for m in messages]
    assert all(is_packed(r) for r in records)
    assert all(r is records[0] for r in records)  # one payload, shared
    payload = unpack(records[0])
    _close(
        fp.decode(payload),
        {k: v.astype(np.float16).astype(v.dtype) if v.dtype.kind == "f" else v for k, v in g.items()},
        atol=1e-3,
    )
    row = strategy.history[-1]
    assert row["train_messages"] == 3
    assert row["train_downlink_payload"] == 3 * len(payload)
    assert row["train_downlink_raw"] == 3 * sum(len(a.data) for a in numpy_to_arrays(g).values())
    # The server rebuilds from its exact weights, not from the fp16 copy nodes trained from.
    replies = []
    for msg, node in zip(messages, [1, 2, 3]):
        delivered = Message(content=copy.deepcopy(msg.content), metadata=_metadata("train", dst=node))
        replies.append(compress_mod("fp32")(delivered, _context(node), _handler(100 + node)))
    arrays, _ = strategy.aggregate_train(1, replies)
    received = fp.decode(payload)
    mean_update = {
        k: np.mean([_trained(received, 100 + n)[k].astype(np.float64) - received[k] for n in (1, 2, 3)], axis=0)
        for k in ("fc.weight", "fc.bias")
    }
    got = arrays_to_numpy(arrays)
    for key, update in mean_update.items():
        np.testing.assert_allclose(got[key], g[key] + update, atol=1e-5)


def test_downlink_needs_an_absolute_codec() -> None:
    with pytest.raises(ValueError, match="absolute codec"):
        FedPress(FedAvg(), downlink="topk:0.1+q8")
    with pytest.raises(ValueError):
        FedPress(FedAvg(), downlink="bogus")
    with pytest.raises(TypeError, match="wraps a flwr Strategy"):
        FedPress(object())  # type: ignore[arg-type]


def test_wrapper_reads_the_inner_strategys_attributes() -> None:
    strategy = FedPress(FedAvg(weighted_by_key="n", fraction_train=0.5))
    assert strategy.weighted_by_key == "n" and strategy.fraction_train == 0.5
    with pytest.raises(AttributeError):
        strategy.no_such_attribute  # noqa: B018


def test_a_packed_reply_to_a_plain_strategy_fails_with_a_clear_message() -> None:
    g = _params()
    replies = _round_replies("q8", g, [1, 2])
    with pytest.raises(TypeError, match=f"Unsupported serialization type.*{STYPE}"):
        FedAvg().aggregate_train(1, replies)


# ---------------------------------------------------------------- end to end --
def _digits_apps(spec: Optional[str], rounds: int, num_nodes: int = 3) -> tuple[FedPress, list[float]]:
    torch = pytest.importorskip("torch")
    pytest.importorskip("sklearn")
    from fedpress.train import load_task, partition
    from fedpress.train.loops import evaluate, train_local
    from fedpress.train.models import make_model

    torch.manual_seed(0)
    train, test = load_task("digits")
    parts = partition(train.y, num_nodes, "iid", seed=0)
    app = ClientApp(mods=[compress_mod(spec)] if spec else [])

    @app.train()
    def train_handler(msg: Message, ctxt: Context) -> Message:
        model = make_model("digits")
        model.load_state_dict(msg.content["arrays"].to_torch_state_dict())
        data = train.subset(parts[ctxt.node_id])
        stats = train_local(
            model, data, epochs=2, lr=0.05, momentum=0.9, seed=int(msg.content["config"]["server-round"])
        )
        return Message(
            content=RecordDict(
                {
                    "arrays": ArrayRecord(model.state_dict()),
                    "metrics": MetricRecord({"num-examples": len(data), "train_loss": float(stats["loss"])}),
                }
            ),
            reply_to=msg,
        )

    contexts = {
        i: Context(run_id=1, node_id=i, node_config={}, state=RecordDict(), run_config={}) for i in range(num_nodes)
    }
    strategy = FedPress(
        FedAvg(fraction_evaluate=0.0, min_train_nodes=num_nodes, min_available_nodes=num_nodes),
        downlink="fp16" if spec else None,
    )
    accuracies: list[float] = []

    def evaluate_fn(server_round: int, arrays: ArrayRecord) -> MetricRecord:
        model = make_model("digits")
        model.load_state_dict(arrays.to_torch_state_dict())
        _, accuracy = evaluate(model, test)
        accuracies.append(accuracy)
        return MetricRecord({"accuracy": accuracy})

    strategy.start(
        grid=_LocalGrid(app, contexts),
        initial_arrays=ArrayRecord(make_model("digits").state_dict()),
        num_rounds=rounds,
        evaluate_fn=evaluate_fn,
    )
    return strategy, accuracies


def test_end_to_end_digits_through_flowers_strategy_loop() -> None:
    strategy, accuracies = _digits_apps("topk:0.05+q8+zstd", rounds=6)
    assert accuracies[-1] > 0.85 > accuracies[0]
    assert len(strategy.history) == 6
    for row in strategy.history:
        assert row["path"] == "fast" and row["replies"] == 3 and row["skipped"] == 0
        assert row["uplink_raw"] > 20 * row["uplink_payload"]
        assert row["train_downlink_raw"] > 1.9 * row["train_downlink_payload"]


@pytest.mark.simulation
def test_flower_simulation_runtime_on_digits(tmp_path) -> None:
    """The real thing: Flower's Simulation Runtime (Ray) runs bench/flower.py's apps."""
    pytest.importorskip("ray")
    pytest.importorskip("torch")
    pytest.importorskip("sklearn")
    import json
    import os
    import subprocess
    import sys

    script = os.path.join(os.path.dirname(__file__), os.pardir, "bench", "flower.py")
    out = tmp_path / "flower.json"
    proc = subprocess.run(
        [
            sys.executable,
            script,
            "--specs",
            "topk:0.05+q8+zstd",
            "--rounds",
            "3",
            "--downlink",
            "fp16",
            "--json",
            str(out),
        ],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    (result,) = json.loads(out.read_text())
    assert result["accuracy"][-1] > 0.7 > result["accuracy"][0]
    assert [row["round"] for row in result["history"]] == [1, 2, 3]
    for row in result["history"]:
        assert row["path"] == "fast" and row["replies"] == 3 and row["skipped"] == 0
        assert row["uplink_raw"] > 20 * row["uplink_payload"]
        assert row["train_downlink_raw"] > 1.9 * row["train_downlink_payload"]


def test_client_side_dp_clipping_mod_composes_with_compress_mod() -> None:
    from flwr.clientapp.mod import fixedclipping_mod
    from flwr.serverapp.strategy import DifferentialPrivacyClientSideFixedClipping

    g = {k: v for k, v in _params().items() if v.dtype == np.float32}
    app = ClientApp(mods=[compress_mod("fp32", error_feedback=False), fixedclipping_mod])

    @app.train()
    def train_handler(msg: Message, ctxt: Context) -> Message:
        received = arrays_to_numpy(msg.content["arrays"])
        return Message(
            content=RecordDict(
                {
                    "arrays": numpy_to_arrays(_trained(received, ctxt.node_id)),
                    "metrics": MetricRecord({"num-examples": 10}),
                }
            ),
            reply_to=msg,
        )

    contexts = {i: _context(i) for i in range(3)}
    strategy = FedPress(
        DifferentialPrivacyClientSideFixedClipping(
            FedAvg(fraction_evaluate=0.0, min_available_nodes=3),
            noise_multiplier=0.0,
            clipping_norm=0.1,
            num_sampled_clients=3,
        ),
        downlink="fp16",
    )
    result = strategy.start(grid=_LocalGrid(app, contexts), initial_arrays=numpy_to_arrays(g), num_rounds=1)
    new = arrays_to_numpy(result.arrays)
    moved = np.sqrt(sum(float(np.sum((new[k].astype(np.float64) - g[k]) ** 2)) for k in g))
    # Each node's update was clipped to norm 0.1 (after the fp16 downlink was decoded), so their mean is too.
    assert 0.0 < moved <= 0.1 + 1e-5
    assert strategy.history[-1]["replies"] == 3 and strategy.history[-1]["path"] == "generic"


def test_shared_eden_rotation_is_summed_in_the_rotated_domain(monkeypatch: pytest.MonkeyPatch) -> None:
    """FedPress hands each round a rotation seed; compress_mod('eden4:shared') uses it, so the
    FedAvg fast path sums the nodes' payloads in the rotated domain."""
    from fedpress.aggregate import Aggregator
    from fedpress.flower import ROTATION_SEED_KEY

    seeds: list[int] = []
    original = Aggregator._add_rotated
    monkeypatch.setattr(
        Aggregator,
        "_add_rotated",
        lambda self, name, sec, w: (seeds.append(sec.rotation_seed), original(self, name, sec, w)),
    )
    g = {k: v for k, v in _params().items() if v.dtype.kind == "f"}
    app = ClientApp(mods=[compress_mod("eden4:shared")])
    received_seeds: list[int] = []

    @app.train()
    def train_handler(msg: Message, ctxt: Context) -> Message:
        received_seeds.append(msg.content["config"][ROTATION_SEED_KEY])
        received = arrays_to_numpy(msg.content["arrays"])
        return Message(
            content=RecordDict(
                {
                    "arrays": numpy_to_arrays(_trained(received, ctxt.node_id)),
                    "metrics": MetricRecord({"num-examples": 10}),
                }
            ),
            reply_to=msg,
        )

    strategy = FedPress(FedAvg(fraction_evaluate=0.0, min_available_nodes=3))
    strategy.start(
        grid=_LocalGrid(app, {i: _context(i) for i in range(3)}), initial_arrays=numpy_to_arrays(g), num_rounds=2
    )
    assert [row["path"] for row in strategy.history] == ["fast", "fast"]
    assert len(set(received_seeds)) == 2 and len(received_seeds) == 6  # one seed per round, for every node
    assert len(seeds) == 2 * 3 * len(g) and len(set(seeds)) == 2 * len(g)


def test_seeded_mod_repeats_its_payloads_exactly() -> None:
    g = _params()

    def run(seed):
        ctxt = _context(7)
        mod = compress_mod("topk:0.1+q4+zstd", seed=seed)
        return [unpack(mod(_message(g, node=7), ctxt, _handler(s)).content["arrays"]) for s in (1, 2)]

    first, again = run(11), run(11)
    assert first == again and first[0] != first[1]  # rounds differ, reruns do not
    assert run(12) != first and run(None) != run(None)
    with pytest.raises(ValueError, match="seed must be"):
        compress_mod("q8", seed=-1)


@pytest.mark.parametrize("fast", [True, False])
def test_small_integer_tensors_do_not_wrap_around(fast: bool) -> None:
    g = {
        "w": np.zeros(3, np.float32),
        "u8": np.array([200, 200, 10, 10], np.uint8),
        "i8": np.array([-100, 100], np.int8),
    }
    targets = [
        {"u8": np.array([100, 200, 10, 60], np.uint8), "i8": np.array([100, -100], np.int8)},
        {"u8": np.array([200, 200, 10, 10], np.uint8), "i8": np.array([-100, 100], np.int8)},
    ]
    replies = []
    for node, target in zip((1, 2), targets):

        def handler(msg: Message, ctxt: Context, target=target) -> Message:
            arrays = dict(g, **target)
            return Message(
                content=RecordDict({"arrays": numpy_to_arrays(arrays), "metrics": MetricRecord({"num-examples": 1})}),
                reply_to=msg,
            )

        replies.append(compress_mod("fp32")(_message(g, node=node), _context(node), handler))
    strategy = FedPress(FedAvg(), fast_path=fast)
    _configured(strategy, g, [1, 2])
    arrays, _ = strategy.aggregate_train(1, replies)
    got = arrays_to_numpy(arrays)
    np.testing.assert_array_equal(got["u8"], [150, 200, 10, 35])
    np.testing.assert_array_equal(got["i8"], [0, 0])


def test_a_metrics_only_train_reply_passes_through() -> None:
    def metrics_only(msg: Message, ctxt: Context) -> Message:
        return Message(content=RecordDict({"metrics": MetricRecord({"num-examples": 0})}), reply_to=msg)

    reply = compress_mod("q8")(_message(_params()), _context(), metrics_only)
    assert not reply.has_error() and list(reply.content.keys()) == ["metrics"]


def test_digest_payloads_and_dgc_options_through_the_mod() -> None:
    """compress_mod(table="digest", clip=, warmup_rounds=) makes smaller payloads the wrapper
    decodes with the model it sent; both paths give the same model as inline payloads."""
    g = _params()
    nodes = [3, 4, 5]

    def replies(**options: Any) -> list[Message]:
        out = []
        for i, node in enumerate(nodes):
            mod = compress_mod("topk:0.1+q4+zstd", seed=7, clip=50.0, warmup_rounds=2, warmup_start=0.5, **options)
            out.append(mod(_message(g, node=node), _context(node), _handler(100 + node, 10 * (i + 1))))
        return out

    inline, digest = replies(), replies(table="digest")
    sizes = [(len(unpack(a.content["arrays"])), len(unpack(b.content["arrays"]))) for a, b in zip(inline, digest)]
    assert all(d < i for i, d in sizes)
    with pytest.raises(fp.DecodeError, match="omits its tensor table"):
        fp.decode(unpack(digest[0].content["arrays"]))
    results = {}
    for name, batch in (("inline", inline), ("digest", digest)):
        for fast in (True, False):
            strategy = FedPress(FedAvg(), fast_path=fast)
            _configured(strategy, g, nodes)
            arrays, _ = strategy.aggregate_train(1, batch)
            assert strategy.history[-1]["skipped"] == 0 and strategy.history[-1]["replies"] == 3
            results[name, fast] = arrays_to_numpy(arrays)
    for key in g:
        for other in (("digest", True), ("digest", False), ("inline", False)):
            np.testing.assert_allclose(
                np.asarray(results[other][key], np.float64),
                np.asarray(results["inline", True][key], np.float64),
                atol=1e-6,
            )
