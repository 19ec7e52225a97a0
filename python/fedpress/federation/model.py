"""Model arithmetic shared by server and client: updates, downlink deltas,
checkpoints.

Update semantics (what ``train_fn`` returns and the server applies), the
arithmetic of ``fedpress._update_math`` that the torch adapter and the Flower
integration share:

* float tensors carry a delta (float32; float64 for float64 tensors): ``new
  global = global + server_lr * weighted mean``;
* integer tensors carry an int64 delta too (e.g. a BatchNorm step counter):
  ``global + the weighted mean rounded to an integer`` (no server_lr), clamped to
  the tensor's range, never wrapped around;
* bool tensors carry the client's new value: the weighted majority wins.

An update travels in those dtypes (``update_table``), whatever the model's own
(a uint8 buffer's update is int64, a float16 tensor's float32). A tensor missing
from an update means "unchanged" (a zero delta, or the held value for bools); a
tensor the model does not have is an error.

Downlink: the model the clients train on is the server's *replica*. Without a
downlink codec the replica is the global model and travels as one fp32
payload. With a downlink codec, each new global model becomes a compressed
delta ``C(global - replica)`` that is applied to the replica (what is not sent
stays in the difference and goes out later: error feedback on the server);
integer and bool tensors, which the codec sends losslessly, travel as their
values and replace the replica's (``make_downlink_delta``,
``apply_downlink_delta``).
Clients that hold the previous replica receive the chain of deltas since the
one they hold; the others receive the replica in full. Delta application is
float32 arithmetic on both sides, so client and server replicas stay
bit-identical; float64 tensors are kept at float32 precision in the replica
(they travel as float32 values).

The first replica's tag is a digest of the initial model itself
(``model_tag``), so a client that builds the same initial model (the same
model factory and seed) announces that tag and receives deltas from the first
round on: the initial model need not cross the wire.

Per-client downlink (``ClientDownlink``, ``downlink_mode="client"``): the
chain costs every client the sum of all the deltas it missed, so with few
clients per round the downlink no longer shrinks with participation. Instead
the server may keep the model each client holds and send a sampled client one
compressed difference ``C(global - held)``; what is not sent stays in that
client's difference and goes out the next time it is sampled (error feedback
per client, as in Sattler et al.'s sparse ternary compression). Each client then
trains on its own approximation of the global model; the server's memory grows
by one model per client it remembers (``max_clients`` bounds it; a client it
forgot receives the full model).

Server momentum (FedAvgM, Hsu et al. 2019): ``m = beta * m + mean``, then
``global += server_lr * m``; with sparse updates it keeps applying the
coordinates a round's sample did not touch, so what rarely-sampled clients
sent keeps acting (``ServerOptimizer``).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import tempfile
from collections import OrderedDict
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Iterable, Optional, Union

import numpy as np

from .._arrays import to_numpy
from .._seeds import PURPOSE_DOWNLINK, derive_seed
from .._update_math import add, delta_dtype, is_floating, subtract, to_dtype, unchanged, update_table
from ..codec import Codec
from ..format import decode
from .protocol import TAG_BYTES, new_tag

__all__ = [
    "as_params",
    "table",
    "canonical",
    "encode_full",
    "decode_params",
    "make_downlink_delta",
    "apply_downlink_delta",
    "apply_update",
    "align_update",
    "update_table",
    "zero_reference",
    "Downlink",
    "ClientDownlink",
    "make_downlink",
    "DOWNLINK_MODES",
    "ServerOptimizer",
    "model_tag",
    "save_checkpoint",
    "load_checkpoint",
    "atomic_write",
    "remove_partial_writes",
    "CHECKPOINT_JSON",
]

_FULL = Codec("fp32")
CHECKPOINT_JSON = "checkpoint.json"


def as_params(params: Mapping[str, Any]) -> dict[str, np.ndarray]:
    """A model as ``{name: numpy array}`` (copies; torch tensors are converted,
    bfloat16 becomes float32). Tensors must be float, integer or bool."""
    if not isinstance(params, Mapping) or not params:
        raise TypeError("params must be a non-empty mapping of names to tensors")
    out = {}
    for name, value in params.items():
        if not isinstance(name, str):
            raise TypeError(f"tensor names must be strings, got {type(name).__name__}")
        arr, _ = to_numpy(name, value)
        out[name] = np.array(arr, copy=True, order="C")
    return out


def table(params: Mapping[str, np.ndarray]) -> list[tuple[str, str, tuple]]:
    return [(k, v.dtype.name, tuple(v.shape)) for k, v in params.items()]


def canonical(params: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """float64 tensors rounded to float32 precision (what a full fp32 payload
    carries); other tensors are shared, not copied."""
    return {k: v.astype(np.float32).astype(np.float64) if v.dtype == np.float64 else v for k, v in params.items()}


def encode_full(params: Mapping[str, np.ndarray]) -> bytes:
    """The whole model as one fp32 payload (deterministic bytes)."""
    return _FULL.encode(params, seed=0)


def decode_params(payload: Any) -> dict[str, np.ndarray]:
    return decode(payload)


def make_downlink_delta(target: Mapping[str, np.ndarray], replica: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """What brings the clients' ``replica`` to ``target``: the float differences
    (``target - replica``) for float tensors, the target values for the others."""
    return {k: subtract(t, replica[k]) if is_floating(t.dtype) else t for k, t in target.items()}


def apply_downlink_delta(model: Mapping[str, np.ndarray], delta: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """One downlink delta (``make_downlink_delta``, decoded) applied to the replica a
    client holds: new arrays, ``model`` is left as it was. Float tensors are updated in
    float32, so float64 tensors stay at the float32 precision of the replica
    (``canonical``) and client and server replicas stay bit-identical; the others take
    the delta's values. Raises ValueError when the delta does not fit the model."""
    if list(delta) != list(model):
        raise ValueError("downlink delta does not list the model's tensors")
    out = {}
    for k, m in model.items():
        d = delta[k]
        if d.shape != m.shape:
            raise ValueError(f"downlink delta for {k!r} has shape {d.shape}, the model {m.shape}")
        try:
            if is_floating(m.dtype):
                out[k] = to_dtype(add(m.astype(np.float32, copy=False), d), m.dtype)
            else:  # saturating, as every conversion of an update (a uint8 given 256 stays 255)
                out[k] = to_dtype(d, m.dtype)
        except (TypeError, ValueError) as exc:
            raise ValueError(f"downlink delta for {k!r}: {exc}") from None
    return out


def apply_update(
    params: Mapping[str, np.ndarray], mean: Mapping[str, np.ndarray], server_lr: float
) -> dict[str, np.ndarray]:
    """The next global model from the weighted mean update (see the module doc)."""
    return {k: add(g, mean[k], server_lr) for k, g in params.items()}


def align_update(update: Mapping[str, Any], model: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """An update in the model's tensor order and shapes, in the update's dtypes
    (``update_table``: float32 or float64, int64 rounded from floats, bool). Missing
    tensors are unchanged (zero delta / held bool); unknown names or wrong shapes raise
    ValueError."""
    if not isinstance(update, Mapping):
        raise TypeError(f"train_fn must return a mapping of names to tensors, got {type(update).__name__}")
    unknown = [k for k in update if k not in model]
    if unknown:
        raise ValueError(f"update holds tensors the model does not have: {unknown[:5]}")
    out = {}
    for k, ref in model.items():
        if k not in update:
            out[k] = unchanged(ref)
            continue
        arr, _ = to_numpy(k, update[k])
        if arr.shape != ref.shape:
            raise ValueError(f"update for {k!r} has shape {arr.shape}, the model {ref.shape}")
        out[k] = to_dtype(arr, delta_dtype(ref.dtype))
    return out


def model_tag(params: Mapping[str, np.ndarray]) -> bytes:
    """The tag of an initial model: the first TAG_BYTES of SHA-256 over its full fp32
    payload, so a client holding the same model computes the same tag."""
    return hashlib.sha256(encode_full(canonical(params))).digest()[:TAG_BYTES]


class ServerOptimizer:
    """The server's step from the weighted mean update: plain FedAvg
    (``global += server_lr * mean``) or, with ``momentum`` beta > 0, FedAvgM
    (``m = beta * m + mean; global += server_lr * m``) on the float tensors;
    integer and bool tensors follow ``apply_update``.

    ``decay`` (with ``rounds``): the step size follows a half cosine from
    ``server_lr`` in round 1 to ``decay * server_lr`` in round ``rounds``. With few
    clients per round on skewed data, each round's mean points somewhere else and
    momentum carries that around; a falling step lets the last rounds settle
    instead of ending on a swing."""

    def __init__(
        self,
        server_lr: float = 1.0,
        momentum: float = 0.0,
        *,
        decay: Optional[float] = None,
        rounds: Optional[int] = None,
    ) -> None:
        self.server_lr = float(server_lr)
        if not math.isfinite(self.server_lr):
            raise ValueError(f"server_lr must be finite, got {server_lr}")
        self.momentum = float(momentum)
        if not 0.0 <= self.momentum < 1.0:
            raise ValueError(f"server momentum must be in [0, 1), got {momentum}")
        if decay is not None:
            if not 0.0 <= float(decay) <= 1.0:
                raise ValueError(f"server lr decay must be a fraction in [0, 1], got {decay}")
            if rounds is None or int(rounds) < 1:
                raise ValueError("a server lr decay needs the number of rounds")
        self.decay = None if decay is None else float(decay)
        self.rounds = None if rounds is None else int(rounds)
        self.buffers: dict[str, np.ndarray] = {}

    def lr(self, round: Optional[int] = None) -> float:
        """The step size of ``round`` (1-based)."""
        if self.decay is None or round is None or self.rounds is None:
            return self.server_lr
        t = min(max(int(round) - 1, 0), self.rounds - 1) / max(self.rounds - 1, 1)
        return self.server_lr * (self.decay + (1.0 - self.decay) * 0.5 * (1.0 + math.cos(math.pi * t)))

    def step(
        self, params: Mapping[str, np.ndarray], mean: Mapping[str, np.ndarray], round: Optional[int] = None
    ) -> dict[str, np.ndarray]:
        lr = self.lr(round)
        if self.momentum == 0.0:
            return apply_update(params, mean, lr)
        moved = dict(mean)
        for k, g in params.items():
            if not is_floating(g.dtype):
                continue
            work = np.float64 if g.dtype == np.float64 else np.float32
            m = self.buffers.get(k)
            if m is None or m.shape != g.shape:
                m = np.zeros(g.shape, work)
            m *= work(self.momentum)
            m += mean[k].astype(work, copy=False)
            self.buffers[k] = m
            moved[k] = m
        return apply_update(params, moved, lr)


def zero_reference(params: Mapping[str, np.ndarray]) -> bytes:
    """A payload of zeros with the tensor table of the model's updates (``update_table``):
    added to an Aggregator with weight 0, it makes every payload with another table fail."""
    return _FULL.encode({name: np.zeros(shape, dtype) for name, dtype, shape in update_table(params)}, seed=0)


class Downlink:
    """The replica the clients hold and the deltas that bring them up to date.

    ``tag`` names the current replica (16 random bytes, new for each version);
    ``chain`` holds the last ``history`` deltas as (base tag, tag, payload).
    """

    mode = "chain"

    def __init__(
        self, spec: Optional[str], params: Mapping[str, np.ndarray], history: int = 8, seed: Optional[int] = None
    ) -> None:
        self.codec = Codec(spec) if spec else None
        self.history = max(0, int(history))
        #: With a seed, each delta's random choices derive from (seed, version): runs repeat exactly.
        self.seed = None if seed is None else int(seed)
        self.version = 0
        self.replica = canonical(params)
        self.tag = model_tag(self.replica)
        self.chain: list[tuple[bytes, bytes, bytes]] = []
        self._full: Optional[tuple[bytes, bytes]] = None

    def advance(self, params: Mapping[str, np.ndarray]) -> None:
        """A new global model: a new replica version."""
        old = self.tag
        self.tag = new_tag()
        if self.codec is None:
            self.replica = canonical(params)
            return
        self.version += 1
        seed = None if self.seed is None else derive_seed(self.seed, PURPOSE_DOWNLINK, self.version)
        payload = self.codec.encode(make_downlink_delta(params, self.replica), seed=seed)
        self.replica = apply_downlink_delta(self.replica, decode(payload))
        self.chain.append((old, self.tag, payload))
        del self.chain[: max(0, len(self.chain) - self.history)]

    def task_for(self, client_id: str, held: Optional[bytes], deltas_ok: bool) -> tuple[str, bytes, bytes, list]:
        """(kind, base tag, tag the client will hold, payloads) of the TASK for ``client_id``."""
        kind, base, payloads = self.plan(held, deltas_ok)
        return kind, base, self.tag, payloads

    def confirm(self, client_id: str, tag: bytes) -> None:
        """``client_id`` answered the task that gave it ``tag`` (nothing to do for a chain)."""

    def full(self) -> bytes:
        """The replica as one fp32 payload (cached per version)."""
        if self._full is None or self._full[0] != self.tag:
            self._full = (self.tag, encode_full(self.replica))
        return self._full[1]

    def plan(self, held: Optional[bytes], deltas_ok: bool) -> tuple[str, bytes, list]:
        """("full", b"", [payload]) or ("delta", base tag, [payloads...]) for a
        client holding the replica tagged ``held``."""
        if self.codec is not None and deltas_ok and held is not None:
            if held == self.tag:
                return "delta", held, []
            for i, (base, _, _) in enumerate(self.chain):
                if base == held:
                    payloads = [p for _, _, p in self.chain[i:]]
                    if sum(len(p) for p in payloads) < len(self.full()):
                        return "delta", held, payloads
                    break
        return "full", bytes(TAG_BYTES), [self.full()]

    # -- persistence
    def state(self) -> tuple[dict, dict[str, np.ndarray]]:
        meta = {
            "tag": self.tag.hex(),
            "version": self.version,
            "chain": [{"base": b.hex(), "tag": t.hex()} for b, t, _ in self.chain],
        }
        arrays = {f"r{i}": v for i, v in enumerate(self.replica.values())}
        arrays.update({f"h{i}": np.frombuffer(p, np.uint8) for i, (_, _, p) in enumerate(self.chain)})
        return meta, arrays

    def restore(self, meta: Mapping[str, Any], arrays: Mapping[str, np.ndarray], names: list) -> None:
        self.replica = {name: np.array(arrays[f"r{i}"]) for i, name in enumerate(names)}
        self.tag = bytes.fromhex(meta["tag"])
        self.version = int(meta.get("version", 0))
        self.chain = [
            (bytes.fromhex(c["base"]), bytes.fromhex(c["tag"]), np.asarray(arrays[f"h{i}"]).tobytes())
            for i, c in enumerate(meta.get("chain", []))
        ]
        self._full = None


class ClientDownlink:
    """The downlink with one model per client: a sampled client receives one
    compressed difference between the global model and the model it holds
    (see the module doc).

    ``tag`` names the exact global model (what a full payload carries); each
    catch-up gives the client a fresh tag for its new model. Until the client
    answers (``confirm``), the server keeps both the model it held and the one
    it was sent, so a client that fails in between and comes back with either
    tag still receives a delta. A server resumed from a checkpoint does not know
    the models it sent after that checkpoint: those clients receive the full model
    once.
    """

    mode = "client"

    def __init__(
        self, spec: str, params: Mapping[str, np.ndarray], seed: Optional[int] = None, max_clients: Optional[int] = None
    ) -> None:
        if not spec:
            raise ValueError("a per-client downlink needs a downlink codec spec")
        self.codec = Codec(spec)
        self.seed = None if seed is None else int(seed)
        if max_clients is not None and int(max_clients) < 1:
            raise ValueError(f"max_clients must be at least 1, got {max_clients}")
        self.max_clients = None if max_clients is None else int(max_clients)
        self.params = canonical(params)
        self.tag = model_tag(self.params)
        #: The initial model: a client that built it itself announces its tag.
        self.initial: tuple[bytes, dict[str, np.ndarray]] = (self.tag, self.params)
        #: client id -> {tag: the model that tag names}, least recently used first.
        self.models: OrderedDict[str, dict[bytes, dict[str, np.ndarray]]] = OrderedDict()
        self.version = 0
        self._full: Optional[tuple[bytes, bytes]] = None

    def advance(self, params: Mapping[str, np.ndarray]) -> None:
        """A new global model."""
        self.params = canonical(params)
        self.tag = new_tag()
        self.version += 1

    def full(self) -> bytes:
        """The global model as one fp32 payload (cached per version)."""
        if self._full is None or self._full[0] != self.tag:
            self._full = (self.tag, encode_full(self.params))
        return self._full[1]

    def held_model(self, client_id: str, held: Optional[bytes]) -> Optional[dict[str, np.ndarray]]:
        """The model ``client_id`` holds when it announces ``held``, if the server knows it."""
        if held is None:
            return None
        known = self.models.get(client_id, {})
        if held in known:
            return known[held]
        return self.initial[1] if held == self.initial[0] else None

    def task_for(self, client_id: str, held: Optional[bytes], deltas_ok: bool) -> tuple[str, bytes, bytes, list]:
        """(kind, base tag, tag the client will hold, payloads) of the TASK for ``client_id``;
        the model it will hold is remembered under that tag."""
        base_model = self.held_model(client_id, held) if deltas_ok else None
        if base_model is None or held is None:  # (a held model has a tag)
            kind, base, tag, payloads, model = "full", bytes(TAG_BYTES), self.tag, [self.full()], self.params
        elif held == self.tag:
            kind, base, tag, payloads, model = "delta", held, held, [], base_model
        else:
            seed = None if self.seed is None else derive_seed(self.seed, PURPOSE_DOWNLINK, client_id, self.version)
            payload = self.codec.encode(make_downlink_delta(self.params, base_model), seed=seed)
            kind, base, tag, payloads = "delta", held, new_tag(), [payload]
            model = apply_downlink_delta(base_model, decode(payload))
        entries = self.models.pop(client_id, {})
        if held is not None and held in entries:
            entries = {held: entries[held]}
        else:
            entries = {}
        entries[tag] = model
        self.models[client_id] = entries
        while self.max_clients is not None and len(self.models) > self.max_clients:
            self.models.popitem(last=False)
        return kind, base, tag, payloads

    def confirm(self, client_id: str, tag: bytes) -> None:
        """``client_id`` answered the task that gave it ``tag``: the model it held before is gone."""
        entries = self.models.get(client_id)
        if entries is not None and tag in entries:
            self.models[client_id] = {tag: entries[tag]}

    # -- persistence
    def state(self) -> tuple[dict, dict[str, np.ndarray]]:
        arrays: dict[str, np.ndarray] = {f"i{i}": v for i, v in enumerate(self.initial[1].values())}
        clients = []
        for j, (cid, entries) in enumerate(self.models.items()):
            tags = []
            for t, (tag, model) in enumerate(entries.items()):
                tags.append(tag.hex())
                arrays.update({f"c{j}_{t}_{i}": v for i, v in enumerate(model.values())})
            clients.append([cid, tags])
        meta = {
            "mode": self.mode,
            "tag": self.tag.hex(),
            "version": self.version,
            "initial": self.initial[0].hex(),
            "clients": clients,
        }
        return meta, arrays

    def restore(self, meta: Mapping[str, Any], arrays: Mapping[str, np.ndarray], names: list) -> None:
        def model(prefix: str) -> dict[str, np.ndarray]:
            return {name: np.array(arrays[f"{prefix}{i}"]) for i, name in enumerate(names)}

        self.tag = bytes.fromhex(meta["tag"])
        self.version = int(meta.get("version", 0))
        self.initial = (bytes.fromhex(meta["initial"]), model("i"))
        self.models = OrderedDict()
        for j, (cid, tags) in enumerate(meta.get("clients", [])):
            self.models[str(cid)] = {bytes.fromhex(tag): model(f"c{j}_{t}_") for t, tag in enumerate(tags)}
        self._full = None


#: The downlink's ways of catching a client up (``make_downlink``).
DOWNLINK_MODES = ("chain", "client")


def make_downlink(
    spec: Optional[str],
    params: Mapping[str, np.ndarray],
    mode: str = "chain",
    *,
    history: int = 8,
    seed: Optional[int] = None,
    max_clients: Optional[int] = None,
) -> Any:
    """The server's downlink: ``Downlink`` (one shared replica and the chain of
    deltas since it) or, with ``mode="client"``, ``ClientDownlink``."""
    if mode not in DOWNLINK_MODES:
        raise ValueError(f"downlink mode must be one of {', '.join(DOWNLINK_MODES)}, got {mode!r}")
    if mode == "client":
        if not spec:
            raise ValueError("downlink mode 'client' needs a downlink codec spec (--downlink SPEC)")
        return ClientDownlink(spec, params, seed=seed, max_clients=max_clients)
    return Downlink(spec, params, history, seed=seed)


# ------------------------------------------------------------ checkpoints --
def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # pragma: no cover - platforms without directory fds
        return
    try:
        os.fsync(fd)
    except OSError:  # pragma: no cover
        pass
    finally:
        os.close(fd)


def atomic_write(path: Path, write: Any) -> None:
    """Writes a file atomically: ``write(fileobj)`` into a temporary file in the
    same directory, flush, fsync, os.replace, fsync the directory."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
    _fsync_dir(path.parent)


def remove_partial_writes(directory: Path, names: Iterable[str]) -> list[Path]:
    """Deletes the temporary files ``atomic_write`` leaves when killed before
    its rename (``.<name>.<random>.tmp`` for each target name, a glob pattern
    such as ``checkpoint-*.npz`` included); returns what it removed."""
    removed = []
    for name in names:
        for tmp in Path(directory).glob(f".{name}.*.tmp"):
            try:
                tmp.unlink()
                removed.append(tmp)
            except FileNotFoundError:
                pass
    return removed


def save_checkpoint(
    out_dir: Path,
    round: int,
    params: Mapping[str, np.ndarray],
    meta: Mapping[str, Any],
    downlink: Optional[Union[Downlink, ClientDownlink]],
    momentum: Optional[Mapping[str, np.ndarray]] = None,
) -> Path:
    """checkpoint-<round>.npz (global model, replica, delta chain) and then
    checkpoint.json naming it, each written atomically; older npz files go."""
    out_dir = Path(out_dir)
    names = list(params)
    # Any, not ndarray: np.savez's stub would read **arrays as possibly its allow_pickle flag
    # (the keys are g<i>, m<i> and the downlink's, never that).
    arrays: dict[str, Any] = {f"g{i}": v for i, v in enumerate(params.values())}
    info = dict(meta)
    info.update(
        format="fedpress-checkpoint-v1", round=int(round), names=names, dtypes=[v.dtype.name for v in params.values()]
    )
    if momentum:
        # The server's momentum buffers, so a resumed run takes the same steps.
        arrays.update({f"m{names.index(k)}": v for k, v in momentum.items()})
    if downlink is not None:
        dmeta, darrays = downlink.state()
        arrays.update(darrays)
        info["downlink"] = dmeta
    npz_name = f"checkpoint-{int(round):06d}.npz"
    info["npz"] = npz_name
    atomic_write(out_dir / npz_name, lambda f: np.savez(f, **arrays))
    atomic_write(out_dir / CHECKPOINT_JSON, lambda f: f.write(json.dumps(info, indent=1).encode()))
    for stale in out_dir.glob("checkpoint-*.npz"):
        if stale.name != npz_name:
            try:
                stale.unlink()
            except OSError:  # pragma: no cover
                pass
    return out_dir / CHECKPOINT_JSON


def load_checkpoint(out_dir: Path) -> Optional[tuple[dict, dict[str, np.ndarray], dict[str, np.ndarray]]]:
    """(meta, global params, all arrays) of the last checkpoint, or None."""
    path = Path(out_dir) / CHECKPOINT_JSON
    if not path.exists():
        return None
    meta = json.loads(path.read_text())
    if meta.get("format") != "fedpress-checkpoint-v1":
        raise ValueError(f"{path}: not a fedpress checkpoint")
    with np.load(Path(out_dir) / meta["npz"], allow_pickle=False) as z:
        arrays = {k: z[k] for k in z.files}
    params = {name: arrays[f"g{i}"] for i, name in enumerate(meta["names"])}
    return meta, params, arrays
