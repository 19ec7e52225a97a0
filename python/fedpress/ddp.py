"""A PyTorch DDP communication hook that sends fedpress payloads instead of a float32 all-reduce.

    state = CompressionState("topk:0.01+q8")
    model.register_comm_hook(state, compress_hook)

Each gradient bucket is encoded with error feedback (what a step does not send is
added to the next one), the payloads of all ranks are all-gathered (compressed
forms are not additive, so they cannot be all-reduced), and every rank decodes
all of them in rank order into the bucket: the mean of the decoded gradients,
bit-identical on every rank. The first ``start_iter`` steps use a plain
all-reduce, because DDP rebuilds its buckets after the first iteration.
``state.history`` and ``state.totals()`` report the bytes of each step.

Importing this module imports torch; ``import fedpress`` alone never does.
"""

# No ``from __future__ import annotations`` here: DDP's register_comm_hook compares the hook's
# annotations with the objects dist.GradBucket and torch.futures.Future[torch.Tensor], and
# postponed annotations would be strings that fail that check.

import collections
from dataclasses import dataclass
from typing import Any, Optional

import numpy as np
import torch  # absolute: the real torch
import torch.distributed as dist

from ._seeds import PURPOSE_PAYLOAD, PURPOSE_ROTATION, derive_seed
from .aggregate import Aggregator
from .codec import Codec
from .encoder import Encoder

__all__ = ["CompressionState", "StepBytes", "compress_hook"]

# The one tensor of a bucket's payload; its shape is the bucket's (flat) shape.
_TENSOR = "bucket"
# Bytes of the all-gathered payload size each rank contributes.
_SIZE_BYTES = 8


@dataclass(frozen=True)
class StepBytes:
    """Bytes of one DDP step on this rank, summed over its buckets.

    ``raw_bytes``: the buckets' bytes, which a plain all-reduce takes from each rank
    (4 per element for float32). ``payload_bytes``: this rank's encoded payloads.
    ``sent_bytes``: what this rank puts into the collectives: its payload padded to
    the largest rank's plus the 8-byte size. ``gathered_bytes``: what it receives
    into the collectives' outputs (every rank's size and padded payload, its own
    included). On all-reduce steps all four equal ``raw_bytes``. These count each
    collective's input and output; a ring all-reduce moves 2(n-1)/n times its input
    per rank and a ring all-gather (n-1) times, the same factor 1 at two ranks.
    """

    step: int
    compressed: bool
    raw_bytes: int
    payload_bytes: int
    sent_bytes: int
    gathered_bytes: int

    @property
    def ratio(self) -> float:
        """raw_bytes / sent_bytes: how many times fewer bytes this rank sent."""
        return self.raw_bytes / self.sent_bytes if self.sent_bytes else 0.0


_BYTE_FIELDS = ("raw_bytes", "payload_bytes", "sent_bytes", "gathered_bytes")


class CompressionState:
    """State of ``compress_hook``: the spec, one error-feedback encoder per bucket, the
    step counter and byte accounting.

    ``spec`` is a fedpress spec (``"q8"``, ``"topk:0.01+q8+zstd"``, ...); a bad one raises
    ValueError here. Steps before ``start_iter`` use a plain averaging all-reduce.
    ``error_feedback`` keeps what a step did not send (the gradient minus the decoded payload)
    per bucket, keyed by ``bucket.index()``, and adds it to the next step's gradient.
    ``process_group`` None means the default group. ``seed`` fixes the encoders' random
    choices (stochastic rounding, random-k): each payload's seed is a function of
    (seed, rank, step, bucket index), so ranks differ and a rerun repeats. ``codec_options``
    go to ``fedpress.Codec`` (``bucket=``, ``per_tensor=``, ``rht_block=``).

    ``history`` holds a ``StepBytes`` per finished step (the last ``history_size``);
    ``totals()`` sums every step. Pickling drops the process group (it cannot be
    pickled); an unpickled state uses the default group, as torch's PowerSGDState does.
    """

    def __init__(
        self,
        spec: str,
        start_iter: int = 2,
        error_feedback: bool = True,
        process_group: Optional[dist.ProcessGroup] = None,
        *,
        seed: int = 0,
        history_size: Optional[int] = 10_000,
        **codec_options: Any,
    ) -> None:
        codec = Codec(spec, **codec_options)  # raises ValueError on a bad spec or option
        if isinstance(start_iter, bool) or not isinstance(start_iter, int) or start_iter < 0:
            raise ValueError(f"start_iter must be an integer >= 0, got {start_iter!r}")
        if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
            raise ValueError(f"seed must be an integer >= 0, got {seed!r}")
        if history_size is not None and history_size < 0:
            raise ValueError(f"history_size must be >= 0 or None, got {history_size!r}")
        self.spec = str(codec.spec)
        self.start_iter = start_iter
        self.error_feedback = bool(error_feedback)
        self.process_group = process_group
        self.seed = seed
        self.codec_options = dict(codec_options)
        self.encoders: dict[int, Encoder] = {}
        self.iter = 0
        self.history: collections.deque[StepBytes] = collections.deque(maxlen=history_size)
        self._totals = dict.fromkeys(("steps", "compressed_steps", *_BYTE_FIELDS), 0)
        self._step = dict.fromkeys(_BYTE_FIELDS, 0)

    def __repr__(self) -> str:
        return (
            f"CompressionState({self.spec!r}, start_iter={self.start_iter}, "
            f"error_feedback={self.error_feedback}, iter={self.iter})"
        )

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state.pop("process_group")  # a ProcessGroup cannot be pickled
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self.process_group = None  # the default group, looked up when the hook runs

    def totals(self) -> dict[str, int]:
        """Sums over every finished step: ``steps``, ``compressed_steps`` and the byte
        fields of ``StepBytes``."""
        return dict(self._totals)

    def residual_norm(self) -> float:
        """L2 norm of everything not yet sent, over all buckets."""
        return float(np.sqrt(sum(e.residual_norm() ** 2 for e in self.encoders.values())))

    # -- used by compress_hook ------------------------------------------------
    def _group(self) -> dist.ProcessGroup:
        group = self.process_group if self.process_group is not None else dist.group.WORLD
        if group is None:
            raise RuntimeError("compress_hook needs a process group: call torch.distributed.init_process_group first")
        return group

    def _encoder(self, bucket_index: int) -> Encoder:
        encoder = self.encoders.get(bucket_index)
        if encoder is None:
            encoder = Encoder(self.spec, error_feedback=self.error_feedback, **self.codec_options)
            self.encoders[bucket_index] = encoder
        return encoder

    def _rotation_seed(self, bucket_index: int) -> int:
        """The rotation every rank shares for one bucket at the current step (edenB:shared)."""
        return derive_seed(self.seed, PURPOSE_ROTATION, self.iter, bucket_index)

    def _payload_seed(self, rank: int, bucket_index: int) -> int:
        """The seed of one rank's payload for one bucket at the current step."""
        return derive_seed(self.seed, PURPOSE_PAYLOAD, rank, self.iter, bucket_index)

    def _count(self, bucket: dist.GradBucket, raw: int, payload: int, sent: int, gathered: int) -> None:
        """Adds a bucket's bytes to the step; the last bucket of a step closes it."""
        for name, value in zip(_BYTE_FIELDS, (raw, payload, sent, gathered)):
            self._step[name] += value
        if not bucket.is_last():
            return
        compressed = self.iter >= self.start_iter
        self.history.append(StepBytes(step=self.iter, compressed=compressed, **self._step))
        for name in _BYTE_FIELDS:
            self._totals[name] += self._step[name]
            self._step[name] = 0
        self._totals["steps"] += 1
        self._totals["compressed_steps"] += int(compressed)
        self.iter += 1


def compress_hook(state: CompressionState, bucket: dist.GradBucket) -> torch.futures.Future[torch.Tensor]:
    """DDP communication hook: ``model.register_comm_hook(state, compress_hook)``.

    Before ``state.start_iter``: the bucket averaged by an all-reduce. From then on: the
    bucket encoded with ``state.spec`` and error feedback, every rank's payload
    all-gathered, and the bucket set to the mean of all decoded payloads, the same bits
    on every rank. Float buckets of any precision are accepted; the payload carries
    float32 values and the mean is rounded once to the bucket's dtype.
    """
    group = state._group()
    buffer = bucket.buffer()
    raw = buffer.numel() * buffer.element_size()
    if state.iter < state.start_iter:
        state._count(bucket, raw, raw, raw, raw)
        buffer.div_(group.size())  # before the sum, so half-precision sums cannot overflow
        return dist.all_reduce(buffer, group=group, async_op=True).get_future().then(lambda fut: fut.value()[0])
    if not buffer.is_floating_point():
        raise TypeError(
            f"compress_hook: bucket {bucket.index()} holds {buffer.dtype} gradients; "
            "only floating-point buckets can be compressed"
        )
    rank = dist.get_rank(group)
    world = group.size()
    encoder = state._encoder(bucket.index())
    # edenB:shared: every rank rotates this bucket with the same seed, so the callback's
    # Aggregator sums the payloads in the rotated domain and inverts once.
    shared = encoder.codec.spec.shares_rotation
    payload = encoder.encode(
        {_TENSOR: buffer},
        seed=state._payload_seed(rank, bucket.index()),
        rotation_seed=state._rotation_seed(bucket.index()) if shared else None,
    )

    # All-gather needs equal shapes, so every rank pads to the longest payload; the sizes go
    # first, blocking, and are issued here rather than in a callback so that every rank
    # issues its collectives in the same order.
    size = torch.tensor([len(payload)], dtype=torch.int64, device=buffer.device)
    sizes = [torch.empty_like(size) for _ in range(world)]
    dist.all_gather(sizes, size, group=group)
    lengths = [int(s.item()) for s in sizes]
    longest = max(lengths)
    host = torch.zeros(longest, dtype=torch.uint8)
    host.numpy()[: len(payload)] = np.frombuffer(payload, dtype=np.uint8)
    padded = host.to(buffer.device)
    gathered = [torch.empty_like(padded) for _ in range(world)]
    work = dist.all_gather(gathered, padded, group=group, async_op=True)
    state._count(bucket, raw, len(payload), longest + _SIZE_BYTES, world * (longest + _SIZE_BYTES))

    def average(fut: torch.futures.Future) -> torch.Tensor:
        fut.value()  # re-raises a failed all-gather
        # Every rank adds the same bytes in rank order, so every rank gets the same floats.
        # Decoding and the sparse scatter-adds run in the compiled kernels without the GIL.
        aggregator = Aggregator()
        for data, length in zip(gathered, lengths):
            aggregator.add(data.cpu().numpy()[:length].data, 1.0)  # a memoryview: no copy
        mean = aggregator.result(copy=False)[_TENSOR]
        buffer.copy_(torch.from_numpy(mean))
        return buffer

    return work.get_future().then(average)
