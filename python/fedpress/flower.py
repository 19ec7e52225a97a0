"""Flower adapter: a client mod that compresses train replies and a strategy
wrapper that takes them apart again (Flower >= 1.21, the Message API).

Client, one argument added to the ``ClientApp``::

    from fedpress.flower import compress_mod
    app = ClientApp(mods=[compress_mod("topk:0.01+q4+zstd")])   # first in the list

Server, one wrapper around any strategy::

    from fedpress.flower import FedPress
    strategy = FedPress(FedAvg(), downlink="fp16")
    strategy.start(grid=grid, initial_arrays=arrays, num_rounds=10)
    strategy.history   # bytes per round

Handlers keep sending full weights as Flower apps always do. On a train message
the mod remembers the arrays the server sent, lets the handler train, and
replaces the reply's ArrayRecord by one ``uint8`` Array holding a fedpress
payload of ``reply - received`` (the update), encoded with an error-feedback
residual kept in ``Context.state``. Sizes go in a ConfigRecord named
``"fedpress"``, never in the MetricRecord that strategies average. The wrapper
rebuilds ``global + update`` for its inner strategy or, when the inner strategy
is plain FedAvg, streams the payloads into ``fedpress.Aggregator`` without
one dense model per client. With ``downlink=`` the global model travels as one
payload compressed once per round, and the mod decodes it before any handler
(or later mod) sees the message.

A packed reply that reaches a strategy without the wrapper fails in Flower's own
``Array.numpy()`` with "Unsupported serialization type ... 'fedpress/2'"; inside
the wrapper a reply that cannot be decoded is logged and left out of the round.
"""

from __future__ import annotations

import logging
import secrets
from collections.abc import Iterable, Mapping
from typing import Any, Callable, Optional

import numpy as np

from ._seeds import PURPOSE_PAYLOAD, PURPOSE_ROTATION, derive_seed
from ._update_math import add, subtract, update_table
from .aggregate import Aggregator
from .codec import Codec, parse_spec
from .encoder import Encoder
from .format import (
    DEFAULT_LIMITS,
    FORMAT_VERSION,
    READ_VERSIONS,
    DecodeError,
    Limits,
    decode,
    inspect,
    payload_table_digest,
)

try:
    from flwr.app import (
        Array,
        ArrayRecord,
        ConfigRecord,
        Context,
        Error,
        Message,
        MessageType,
        MetricRecord,
        RecordDict,
    )
    from flwr.common.constant import ErrorCode
    from flwr.serverapp.strategy import FedAvg, Strategy
except ImportError as exc:  # pragma: no cover - exercised only without the extra
    raise ImportError(
        "fedpress.flower needs Flower >= 1.21 (the Message API and its strategies): pip install 'fedpress[flower]'"
    ) from exc

__all__ = [
    "STYPE",
    "RECORD_NAME",
    "ROTATION_SEED_KEY",
    "compress_mod",
    "FedPress",
    "pack",
    "unpack",
    "is_packed",
    "arrays_to_numpy",
    "numpy_to_arrays",
]

STYPE = f"fedpress/{FORMAT_VERSION}"  # what pack writes
READ_STYPES = tuple(f"fedpress/{v}" for v in READ_VERSIONS)  # what unpack reads
RECORD_NAME = "fedpress"  # the reply's ConfigRecord with the sizes
PACKED_KEY = "payload"  # the one Array inside a packed ArrayRecord
ROTATION_SEED_KEY = "fedpress.rotation-seed"  # in the train config: the round's shared rotation
_STATE_RESIDUALS = "fedpress.residuals"
_STATE_INFO = "fedpress.encoder"

# A child of Flower's logger: its console handler shows these lines beside its own.
log = logging.getLogger("flwr.fedpress")


# ----------------------------------------------------------- packed records --
def pack(payload: bytes) -> ArrayRecord:
    """One fedpress payload as an ArrayRecord of a single ``uint8`` Array."""
    data = bytes(payload)
    return ArrayRecord({PACKED_KEY: Array(dtype="uint8", shape=(len(data),), stype=STYPE, data=data)})


def is_packed(record: Any) -> bool:
    """True when ``record`` is an ArrayRecord holding a fedpress payload."""
    if not isinstance(record, ArrayRecord) or len(record) != 1:
        return False
    arr = next(iter(record.values()))
    return isinstance(arr, Array) and isinstance(arr.stype, str) and arr.stype.startswith("fedpress/")


def unpack(record: ArrayRecord) -> bytes:
    """The payload bytes of a packed record (DecodeError if it is not one this version reads)."""
    if not is_packed(record):
        raise DecodeError(f"record is not a packed fedpress payload: expected one Array with stype {STYPE!r}")
    arr = next(iter(record.values()))
    if arr.stype not in READ_STYPES:
        readable = ", ".join(repr(s) for s in READ_STYPES)
        raise DecodeError(f"packed payload has stype {arr.stype!r}, this fedpress reads {readable}")
    if arr.dtype != "uint8" or tuple(arr.shape) != (len(arr.data),):
        raise DecodeError(
            f"packed payload Array must be uint8 of shape ({len(arr.data)},), got {arr.dtype} {tuple(arr.shape)}"
        )
    return arr.data


def arrays_to_numpy(record: ArrayRecord) -> dict[str, np.ndarray]:
    """``{key: ndarray}`` of an ordinary (numpy-serialised) ArrayRecord, in its order."""
    return {key: arr.numpy() for key, arr in record.items()}


def numpy_to_arrays(arrays: Mapping[str, np.ndarray]) -> ArrayRecord:
    # asarray, not ascontiguousarray: the latter turns 0-d tensors into 1-d ones.
    return ArrayRecord({key: Array(np.asarray(value, order="C")) for key, value in arrays.items()})


def _raw_bytes(arrays: Mapping[str, np.ndarray]) -> int:
    return int(sum(a.nbytes for a in arrays.values()))


def _key_mismatch(expected: Mapping[str, Any], got: Mapping[str, Any]) -> Optional[str]:
    """ "missing [...], extra [...]" when the key sets differ, else None."""
    if set(expected) == set(got):
        return None
    return f"missing {sorted(set(expected) - set(got))}, extra {sorted(set(got) - set(expected))}"


def _subtract(new: Mapping[str, np.ndarray], old: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """``new - old`` per tensor (``fedpress._update_math.subtract``: bool tensors travel as
    their values, integer ones as int64 differences); the key sets and shapes must agree."""
    mismatch = _key_mismatch(old, new)
    if mismatch:
        raise ValueError(f"reply arrays differ from the arrays received: {mismatch}")
    out = {}
    for key, value in new.items():
        ref = old[key]
        if value.shape != ref.shape:
            raise ValueError(
                f"array {key!r} has shape {value.shape} in the reply but {ref.shape} in the message received"
            )
        out[key] = subtract(value, ref)
    return out


def _add(base: Mapping[str, np.ndarray], update: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """``base + update`` in the base's dtypes (the inverse of ``_subtract``);
    ``update`` has passed ``_check_fits`` against ``base``."""
    return {key: add(ref, update[key].reshape(ref.shape)) for key, ref in base.items()}


def _table_for(payload: bytes, base: Mapping[str, np.ndarray], limits: Limits) -> Optional[list]:
    """The table to decode ``payload`` with: None when it carries its own, else the table of
    the update ``compress_mod`` makes against ``base`` (what ``table="digest"`` was made for)."""
    return None if payload_table_digest(payload, limits=limits) is None else update_table(base)


def _check_fits(info: Mapping[str, Any], base: Mapping[str, np.ndarray]) -> None:
    """DecodeError unless the payload described by ``info`` has the base model's tensors."""
    tensors = {t["name"]: t for t in info["tensors"]}
    mismatch = _key_mismatch(base, tensors)
    if mismatch:
        raise DecodeError(f"payload tensors differ from the global model: {mismatch}")
    for key, ref in base.items():
        shape = tuple(tensors[key]["shape"])
        if shape != ref.shape:
            raise DecodeError(f"payload tensor {key!r} has shape {shape}, the global model {ref.shape}")


def _category(message: Message) -> str:
    return str(message.metadata.message_type).split(".", 1)[0]


def _error_reply(message: Message, reason: str) -> Message:
    log.error(reason)
    return Message(Error(code=ErrorCode.MOD_FAILED_PRECONDITION, reason=reason), reply_to=message)


def _decode_downlink(msg: Message, limits: Limits) -> Message:
    """``msg`` with every packed ArrayRecord replaced by the arrays it holds.

    A new Message over a new RecordDict: the caller's message (whose records a
    simulation may share between nodes) is left as it was.
    """
    if not msg.has_content() or not any(is_packed(r) for r in msg.content.array_records.values()):
        return msg
    content = RecordDict(dict(msg.content.items()))
    for name, record in msg.content.array_records.items():
        if is_packed(record):
            content[name] = numpy_to_arrays(decode(unpack(record), limits=limits))
    return _with_content(msg, content)


def _with_content(msg: Message, content: RecordDict) -> Message:
    """A new Message with ``msg``'s metadata (sender, reply-to, round...) and ``content``."""
    # flwr's typed overloads leave out the metadata= keyword its __init__ takes (for internal
    # use): the one way to keep a message's metadata while replacing its content.
    return Message(content=content, metadata=msg.metadata)  # type: ignore[call-overload]


# -------------------------------------------------------------- client mod --
def compress_mod(
    spec: str,
    error_feedback: bool = True,
    *,
    momentum: Optional[float] = None,
    seed: Optional[int] = None,
    limits: Limits = DEFAULT_LIMITS,
    clip: Optional[float] = None,
    warmup_rounds: int = 0,
    warmup_start: float = 0.25,
    **codec_options: Any,
) -> Callable[..., Message]:
    """A ``ClientApp`` mod compressing train replies with ``spec`` (put it first in ``mods``).

    ``error_feedback`` keeps what a round did not send in ``Context.state`` and
    adds it to the next update; ``momentum`` enables DGC momentum correction;
    ``seed`` makes every payload's random choices a function of (seed, node id,
    round), so a run repeats exactly (by default they are fresh);
    ``clip``, ``warmup_rounds`` and ``warmup_start`` are the Encoder's DGC local
    clipping and density warm-up (counted in this node's own rounds);
    ``codec_options`` go to ``fedpress.Codec`` (``per_tensor``, ``bucket``,
    ``table="digest"``: the ``FedPress`` wrapper decodes with the model it sent).
    """
    # Bad arguments fail here, not in the first round.
    Encoder(
        spec,
        error_feedback,
        momentum,
        clip=clip,
        warmup_rounds=warmup_rounds,
        warmup_start=warmup_start,
        **codec_options,
    )
    encoder_options = {"clip": clip, "warmup_rounds": warmup_rounds, "warmup_start": warmup_start, **codec_options}
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int) or seed < 0):
        raise ValueError(f"seed must be a non-negative integer or None, got {seed!r}")
    spec_text = str(parse_spec(spec))
    shared = parse_spec(spec).shares_rotation

    def fedpress_compress_mod(msg: Message, ctxt: Context, call_next: Callable[[Message, Context], Message]) -> Message:
        try:
            msg = _decode_downlink(msg, limits)
        except DecodeError as exc:
            return _error_reply(msg, f"fedpress: cannot decode the downlink payload: {exc}")
        if _category(msg) != MessageType.TRAIN or not msg.has_content() or len(msg.content.array_records) != 1:
            return call_next(msg, ctxt)
        received = arrays_to_numpy(next(iter(msg.content.array_records.values())))

        reply = call_next(msg, ctxt)
        if reply.has_error() or not reply.has_content():
            return reply
        records = reply.content.array_records
        if not records:
            return reply  # nothing to compress (a metrics-only reply)
        if len(records) != 1:
            return _error_reply(
                msg, f"fedpress compress_mod expects exactly one ArrayRecord in the train reply, found {len(records)}"
            )
        record_name, record = next(iter(records.items()))
        try:
            update = _subtract(arrays_to_numpy(record), received)
        except (TypeError, ValueError) as exc:
            return _error_reply(msg, f"fedpress compress_mod: {exc}")

        encoder = _load_encoder(ctxt, spec_text, error_feedback, momentum, encoder_options)
        payload_seed = None
        if seed is not None:
            payload_seed = derive_seed(seed, PURPOSE_PAYLOAD, int(ctxt.node_id), encoder.rounds)
        payload = encoder.encode(update, seed=payload_seed, rotation_seed=_round_rotation_seed(msg) if shared else None)
        _save_encoder(ctxt, encoder)
        reply.content[record_name] = pack(payload)
        reply.content[RECORD_NAME] = ConfigRecord(
            {
                "spec": spec_text,
                "format": FORMAT_VERSION,
                "raw-bytes": _raw_bytes(update),
                "flower-bytes": sum(len(a.data) for a in record.values()),
                "payload-bytes": len(payload),
                "residual-norm": encoder.residual_norm(),
            }
        )
        return reply

    return fedpress_compress_mod


def _round_rotation_seed(msg: Message) -> Optional[int]:
    """The rotation seed FedPress put in the train config (edenB:shared), if any."""
    for record in msg.content.config_records.values():
        value = record.get(ROTATION_SEED_KEY)
        if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
            return value
    return None


def _load_encoder(
    ctxt: Context, spec: str, error_feedback: bool, momentum: Optional[float], encoder_options: Mapping[str, Any]
) -> Encoder:
    encoder = Encoder(spec, error_feedback=error_feedback, momentum=momentum, **encoder_options)
    info = ctxt.state.get(_STATE_INFO)
    if isinstance(info, ConfigRecord) and info.get("spec") == spec:
        residuals = ctxt.state.get(_STATE_RESIDUALS)
        velocities = ctxt.state.get(_STATE_RESIDUALS + ".velocity")
        rounds = info.get("rounds", 0)
        encoder.load_state_dict(
            {
                "spec": spec,
                "rounds": rounds if isinstance(rounds, int) else 0,
                "residuals": arrays_to_numpy(residuals) if isinstance(residuals, ArrayRecord) else {},
                "velocities": arrays_to_numpy(velocities) if isinstance(velocities, ArrayRecord) else {},
            }
        )
    return encoder


def _save_encoder(ctxt: Context, encoder: Encoder) -> None:
    ctxt.state[_STATE_INFO] = ConfigRecord({"spec": encoder.spec, "rounds": encoder.rounds})
    if encoder.residuals:
        ctxt.state[_STATE_RESIDUALS] = numpy_to_arrays(encoder.residuals)
    if encoder.velocities:
        ctxt.state[_STATE_RESIDUALS + ".velocity"] = numpy_to_arrays(encoder.velocities)


# ------------------------------------------------------- strategy wrapper --
class FedPress(Strategy):
    """Wraps any Flower ``Strategy`` so it accepts fedpress-compressed train replies.

    ``downlink``: an absolute codec (``"fp16"``, ``"bf16"``, ``"q8"``, ``"q8+zstd"``...)
    for the global model sent to nodes, compressed once per round; ``None`` sends
    Flower's own arrays. ``fast_path``: stream payloads into one
    ``fedpress.Aggregator`` when the inner strategy is exactly ``FedAvg``
    (``None``: whenever possible).

    ``history`` holds one dict per round: ``round``; ``uplink_payload`` (bytes of the
    train replies' Arrays: payloads, or Flower's own arrays for a node without the mod)
    and ``uplink_raw`` (what Flower's own float32 arrays of those replies weigh);
    ``replies`` (aggregated), ``skipped`` (undecodable, left out), ``failures`` (error
    replies); ``train_downlink_payload`` / ``train_downlink_raw`` / ``train_messages``
    and the same three for ``evaluate``; ``path`` (``"fast"`` or ``"generic"``).
    """

    def __init__(
        self,
        inner: Strategy,
        downlink: Optional[str] = None,
        *,
        fast_path: Optional[bool] = None,
        limits: Limits = DEFAULT_LIMITS,
    ) -> None:
        if not isinstance(inner, Strategy):
            raise TypeError(f"FedPress wraps a flwr Strategy, got {type(inner).__name__}")
        self.inner = inner
        self.downlink = None
        if downlink is not None:
            codec = Codec(downlink)
            if codec.spec.sparsifier is not None:
                raise ValueError(
                    f"downlink needs an absolute codec (every weight sent), got {downlink!r}: drop the sparsifier"
                )
            self.downlink = codec
        self.fast_path = fast_path
        self.limits = limits
        self.history: list[dict[str, Any]] = []
        self._seed_base = secrets.randbits(63)
        self._bases: dict[int, dict[str, np.ndarray]] = {}  # node id -> the arrays it was sent
        self._downlink_cache: dict[int, tuple[ArrayRecord, ArrayRecord, int]] = {}

    def __getattr__(self, name: str) -> Any:
        # Attributes the inner strategy defines (weighted_by_key, fraction_train...) read through.
        if name == "inner":
            raise AttributeError(name)
        return getattr(self.inner, name)

    def summary(self) -> None:
        log.info(
            "FedPress: uplink decoded from fedpress payloads, downlink %s",
            self.downlink.spec if self.downlink else "uncompressed",
        )
        self.inner.summary()

    # -- rounds ---------------------------------------------------------------
    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Any
    ) -> Iterable[Message]:
        # One rotation seed per round: nodes coding edenB:shared all rotate with it, and the
        # FedAvg fast path sums their payloads in the rotated domain (one inverse transform).
        config[ROTATION_SEED_KEY] = derive_seed(self._seed_base, PURPOSE_ROTATION, server_round) >> 1  # fits sint64
        messages = list(self.inner.configure_train(server_round, arrays, config, grid))
        row = self._row(server_round)
        self._bases = {}
        self._downlink_cache = {}
        converted: dict[int, dict[str, np.ndarray]] = {}
        for msg in messages:
            if not msg.has_content() or len(msg.content.array_records) != 1:
                continue
            record = next(iter(msg.content.array_records.values()))
            if is_packed(record):
                continue
            if id(record) not in converted:
                converted[id(record)] = arrays_to_numpy(record)
            self._bases[msg.metadata.dst_node_id] = converted[id(record)]
        self._send(messages, row, "train")
        return messages

    def configure_evaluate(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Any
    ) -> Iterable[Message]:
        messages = list(self.inner.configure_evaluate(server_round, arrays, config, grid))
        self._send(messages, self._row(server_round), "evaluate")
        return messages

    def _send(self, messages: list[Message], row: dict[str, Any], phase: str) -> None:
        """Counts (and with ``downlink`` compresses) the arrays each message carries."""
        for msg in messages:
            if not msg.has_content():
                continue
            for name, record in list(msg.content.array_records.items()):
                if is_packed(record):
                    # A RecordDict shared by several messages was packed already.
                    packed_size = len(next(iter(record.values())).data)
                    row[f"{phase}_downlink_payload"] += packed_size
                    row[f"{phase}_downlink_raw"] += self._packed_raw(record)
                    continue
                raw = sum(len(a.data) for a in record.values())
                if self.downlink is None:
                    row[f"{phase}_downlink_payload"] += raw
                    row[f"{phase}_downlink_raw"] += raw
                    continue
                cached = self._downlink_cache.get(id(record))
                if cached is None or cached[0] is not record:
                    payload = self.downlink.encode(arrays_to_numpy(record))
                    cached = (record, pack(payload), raw)
                    self._downlink_cache[id(record)] = cached
                msg.content[name] = cached[1]
                row[f"{phase}_downlink_payload"] += len(next(iter(cached[1].values())).data)
                row[f"{phase}_downlink_raw"] += raw
            row[f"{phase}_messages"] += 1

    def _packed_raw(self, packed: ArrayRecord) -> int:
        for _original, record, raw in self._downlink_cache.values():
            if record is packed:
                return raw
        return 0

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[Optional[ArrayRecord], Optional[MetricRecord]]:
        replies = list(replies)
        row = self._row(server_round)
        kept: list[Message] = []
        unpacked: list[tuple[Message, str, bytes]] = []
        for msg in replies:
            if msg.has_error() or not msg.has_content():
                row["failures"] += 1
                kept.append(msg)  # the inner strategy logs errors its own way
                continue
            packed = [(name, rec) for name, rec in msg.content.array_records.items() if is_packed(rec)]
            if not packed:  # a node without the mod: Flower's own arrays
                sent = sum(sum(len(a.data) for a in rec.values()) for rec in msg.content.array_records.values())
                row["uplink_payload"] += sent
                row["uplink_raw"] += sent
                row["replies"] += 1
                kept.append(msg)
                continue
            name, record = packed[0]
            base = self._bases.get(msg.metadata.src_node_id)
            if base is None:
                self._skip(row, msg, "no global model was sent to this node this round")
                continue
            try:
                payload = unpack(record)
                _check_fits(inspect(payload, limits=self.limits, table=_table_for(payload, base, self.limits)), base)
            except DecodeError as exc:
                self._skip(row, msg, str(exc))
                continue
            row["uplink_payload"] += len(payload)
            info = msg.content.config_records.get(RECORD_NAME)
            # Raw: what Flower's own arrays of that reply would have weighed.
            raw = info.get("flower-bytes") if isinstance(info, ConfigRecord) else None
            row["uplink_raw"] += int(raw) if isinstance(raw, int) else 0
            unpacked.append((msg, name, payload))

        if unpacked and self._use_fast_path(kept, unpacked):
            result = self._aggregate_fedavg(row, unpacked)
            if result is not None:
                return result
        for msg, name, payload in unpacked:
            base = self._bases[msg.metadata.src_node_id]
            try:
                full = _add(base, decode(payload, limits=self.limits, table=_table_for(payload, base, self.limits)))
            except (DecodeError, ValueError) as exc:
                self._skip(row, msg, str(exc))
                continue
            # What a plain Flower client would have sent: full arrays, no fedpress record.
            content = RecordDict({key: value for key, value in msg.content.items() if key != RECORD_NAME})
            content[name] = numpy_to_arrays(full)
            row["replies"] += 1
            kept.append(_with_content(msg, content))
        row["path"] = "generic"
        self._log_row(row)
        return self.inner.aggregate_train(server_round, kept)

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> Optional[MetricRecord]:
        return self.inner.aggregate_evaluate(server_round, replies)

    # -- FedAvg fast path -----------------------------------------------------
    def _use_fast_path(self, kept: list[Message], unpacked: list[tuple[Message, str, bytes]]) -> bool:
        if self.fast_path is False or type(self.inner) is not FedAvg:
            return False
        if any(not m.has_error() for m in kept):
            return False  # an uncompressed reply: the generic path handles the mix
        # One running sum needs one base: every node must have been sent the same model.
        return len({id(self._bases[m.metadata.src_node_id]) for m, _, _ in unpacked}) == 1

    def _aggregate_fedavg(
        self, row: dict[str, Any], unpacked: list[tuple[Message, str, bytes]]
    ) -> Optional[tuple[Optional[ArrayRecord], Optional[MetricRecord]]]:
        inner: FedAvg = self.inner  # type: ignore[assignment]
        key = inner.weighted_by_key
        weights = []
        for msg, _, _ in unpacked:
            metrics = list(msg.content.metric_records.values())
            value = metrics[0].get(key) if len(metrics) == 1 else None
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                return None  # let FedAvg's own consistency checks report it
            weights.append(float(value))
        base = self._bases[unpacked[0][0].metadata.src_node_id]
        agg = Aggregator(limits=self.limits, table=update_table(base))
        used = []
        mean = None
        try:  # every reply in one call (the same sums as one by one, in order)
            if sum(weights) > 0:  # the mean in the pass that sums (nothing added if it raises)
                mean = agg.mean_of([payload for _, _, payload in unpacked], weights)
            else:
                agg.add_many([payload for _, _, payload in unpacked], weights)
            used = [msg for msg, _, _ in unpacked]
        except (DecodeError, ValueError):
            # A bad reply: add_many added nothing; one by one, each bad one is skipped.
            for (msg, _name, payload), w in zip(unpacked, weights):
                try:
                    agg.add(payload, w)
                except (DecodeError, ValueError) as exc:
                    self._skip(row, msg, str(exc))
                    continue
                used.append(msg)
        row["path"] = "fast"
        row["replies"] += len(used)
        self._log_row(row)
        if mean is None and (not used or agg.total_weight <= 0):
            return None, None
        full = _add(base, mean if mean is not None else agg.result(copy=False))
        aggregated = inner.train_metrics_aggr_fn([m.content for m in used], key)
        return numpy_to_arrays(full), aggregated

    # -- bookkeeping ----------------------------------------------------------
    def _row(self, server_round: int) -> dict[str, Any]:
        if self.history and self.history[-1]["round"] == server_round:
            return self.history[-1]
        row: dict[str, Any] = {
            "round": server_round,
            "uplink_payload": 0,
            "uplink_raw": 0,
            "replies": 0,
            "skipped": 0,
            "failures": 0,
            "path": None,
        }
        for phase in ("train", "evaluate"):
            row.update({f"{phase}_downlink_payload": 0, f"{phase}_downlink_raw": 0, f"{phase}_messages": 0})
        self.history.append(row)
        return row

    def _skip(self, row: dict[str, Any], msg: Message, reason: str) -> None:
        row["skipped"] += 1
        log.warning(
            "fedpress: round %d: reply from node %s left out of the round: %s",
            row["round"],
            msg.metadata.src_node_id,
            reason,
        )

    def _log_row(self, row: dict[str, Any]) -> None:
        ratio = row["uplink_raw"] / row["uplink_payload"] if row["uplink_payload"] else float("nan")
        log.info(
            "fedpress: round %d: %d replies, uplink %d B (raw %d B, %.1fx), train downlink %d B, %d skipped",
            row["round"],
            row["replies"],
            row["uplink_payload"],
            row["uplink_raw"],
            ratio,
            row["train_downlink_payload"],
            row["skipped"],
        )
