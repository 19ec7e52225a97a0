"""The stateful client encoder: error feedback and momentum correction.

With error feedback, what a round does not send is not lost: it is kept as a
residual and added to the next round's update (Seide et al. 2014; Stich et al.
2018). The residual is "everything minus what the server will decode", computed
from the payload itself, so it also absorbs quantization error. Momentum
correction (Lin et al., Deep Gradient Compression, 2018) accumulates a velocity
``v = m * v + update`` and compresses that, clearing the velocity of entries
that were sent so stale momentum is not applied twice. Two more pieces of Deep
Gradient Compression make it hold at high sparsity: local clipping (the update's
L2 norm is capped before it enters the velocity, so one outlier round cannot
flood the residual) and a density warm-up (the sparsifier keeps more entries in
the first rounds, falling geometrically to the spec's ratio, while the model
still changes fast).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from typing import Any, Optional

import numpy as np

from . import ops
from .codec import Codec, _to_numpy
from .format import decode_parts
from .format.tables import wire_dtype

__all__ = ["Encoder"]


class Encoder:
    """Per-client encoder: ``payload = enc.encode(update)`` each round.

    Float tensors carry a float32 residual per tensor name between rounds (with
    ``error_feedback=True``); other tensors pass through the codec unchanged.
    ``state_dict()`` / ``load_state_dict()`` persist the residuals and velocities.
    """

    def __init__(
        self,
        spec: str,
        error_feedback: bool = True,
        momentum: Optional[float] = None,
        *,
        clip: Optional[float] = None,
        warmup_rounds: int = 0,
        warmup_start: float = 0.25,
        **codec_options: Any,
    ) -> None:
        self.codec = Codec(spec, **codec_options)
        self._codec_options = dict(codec_options)
        self._warm_codecs: dict[float, Codec] = {}
        self.error_feedback = bool(error_feedback)
        if momentum is not None and not 0.0 <= float(momentum) < 1.0:
            raise ValueError(f"momentum must be in [0, 1), got {momentum}")
        self.momentum = None if momentum is None else float(momentum)
        if clip is not None and not (math.isfinite(float(clip)) and float(clip) > 0.0):
            raise ValueError(f"clip must be a positive number (the largest L2 norm of an update), got {clip}")
        self.clip = None if clip is None else float(clip)
        if int(warmup_rounds) < 0:
            raise ValueError(f"warmup_rounds must be >= 0, got {warmup_rounds}")
        self.warmup_rounds = int(warmup_rounds)
        if not 0.0 < float(warmup_start) <= 1.0:
            raise ValueError(f"warmup_start must be in (0, 1], got {warmup_start}")
        self.warmup_start = float(warmup_start)
        if self.warmup_rounds and self.codec.spec.sparsifier is None:
            raise ValueError(f"warmup_rounds needs a sparsifier in the spec (topk/thresh/randk), got {self.spec}")
        self.residuals: dict[str, np.ndarray] = {}
        self.velocities: dict[str, np.ndarray] = {}
        self.rounds = 0

    @property
    def spec(self) -> str:
        return str(self.codec.spec)

    def density(self, round: Optional[int] = None) -> float:
        """The sparsifier's ratio in ``round`` (1-based; default: this encoder's next
        round): during the warm-up it falls geometrically from ``warmup_start`` to
        the spec's ratio (DGC's exponential schedule), then stays there."""
        target = self.codec.spec.ratio
        t = self.rounds if round is None else max(int(round) - 1, 0)
        if t >= self.warmup_rounds or self.warmup_start <= target:
            return target
        return float(self.warmup_start * (target / self.warmup_start) ** (t / self.warmup_rounds))

    def _codec_for(self, ratio: float) -> Codec:
        if ratio == self.codec.spec.ratio:
            return self.codec
        codec = self._warm_codecs.get(ratio)
        if codec is None:
            spec = str(dataclasses.replace(self.codec.spec, ratio=ratio))
            codec = self._warm_codecs[ratio] = Codec(spec, **self._codec_options)
        return codec

    def encode(
        self,
        update: Mapping[str, Any],
        *,
        seed: Optional[int] = None,
        rotation_seed: Optional[int] = None,
        round: Optional[int] = None,
    ) -> bytes:
        """The payload of ``update`` plus what earlier rounds did not send; ``seed`` and
        ``rotation_seed`` as in ``fedpress.Codec.encode``. ``round`` (1-based, the
        federation's round) places the call in the density warm-up; without it the
        encoder counts its own calls."""
        if not isinstance(update, Mapping):
            raise TypeError(f"update must be a mapping of names to tensors, got {type(update).__name__}")
        to_send: dict[str, np.ndarray] = {}
        dtypes: dict[str, str] = {}
        scale = self._clip_scale(update) if self.clip is not None else None
        for name, value in update.items():
            arr, dtype = _to_numpy(str(name), value)
            if arr.dtype.kind != "f":
                to_send[name] = arr
                continue
            dtypes[name] = dtype
            g = np.array(arr, dtype=np.float32, copy=True).reshape(arr.shape)
            if scale is not None:
                g *= np.float32(scale)
            if self.momentum is not None:
                v = self.velocities.get(name)
                if v is not None and v.shape == g.shape:
                    v *= np.float32(self.momentum)
                    v += g
                else:
                    v = g.copy()
                self.velocities[name] = v
                g = v.copy()
            if self.error_feedback:
                r = self.residuals.get(name)
                if r is not None and r.shape == g.shape:
                    g += r
            to_send[name] = g
        codec = self._codec_for(self.density(round)) if self.warmup_rounds else self.codec
        payload = codec.encode(to_send, seed=seed, rotation_seed=rotation_seed, _dtypes=dtypes)
        if self.error_feedback or self.momentum is not None:
            table = None
            if codec.table == "digest":  # the payload decodes with the update's own table (its original dtypes)
                table = [(name, dtypes.get(name) or wire_dtype(a), a.shape) for name, a in to_send.items()]
            # What the receiver decodes, as (indices, values): the residual is what was
            # meant minus that, made in place in O(kept entries) for a sparse tensor.
            sent = decode_parts(payload, table=table)
            for name, g in to_send.items():
                if g.dtype != np.float32 or name not in sent:
                    continue
                idx, s = sent[name]
                if self.error_feedback:
                    flat = g.reshape(-1)  # g is this encoder's own copy
                    if idx is None:
                        flat -= s
                    else:
                        ops.scatter_add(flat, idx, s, -1.0)
                    self.residuals[name] = g
                if self.momentum is not None:
                    # Momentum factor masking: entries that went out stop carrying velocity.
                    velocity = self.velocities[name].reshape(-1)
                    if idx is None:
                        velocity[s != 0] = 0.0
                    else:
                        velocity[idx[s != 0]] = 0.0
        self.rounds += 1
        return payload

    def _clip_scale(self, update: Mapping[str, Any]) -> Optional[float]:
        """The factor that brings the update's L2 norm (over its float tensors) down to
        ``clip``, or None when it is within it."""
        total = 0.0
        for name, value in update.items():
            arr, _ = _to_numpy(str(name), value)
            if arr.dtype.kind == "f":
                flat = arr.reshape(-1).astype(np.float64, copy=False)
                total += float(np.dot(flat, flat))
        norm = math.sqrt(total)
        assert self.clip is not None
        return self.clip / norm if norm > self.clip else None

    def residual_norm(self) -> float:
        """L2 norm of everything not yet sent."""
        return float(np.sqrt(sum(float(np.dot(r.ravel(), r.ravel())) for r in self.residuals.values())))

    def state_dict(self) -> dict[str, Any]:
        return {
            "spec": self.spec,
            "error_feedback": self.error_feedback,
            "momentum": self.momentum,
            "clip": self.clip,
            "warmup_rounds": self.warmup_rounds,
            "warmup_start": self.warmup_start,
            "rounds": self.rounds,
            "residuals": {k: v.copy() for k, v in self.residuals.items()},
            "velocities": {k: v.copy() for k, v in self.velocities.items()},
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        if state.get("spec") not in (None, self.spec):
            raise ValueError(
                f"state was saved by an encoder with spec {state.get('spec')!r}, this one has {self.spec!r}"
            )
        self.residuals = {
            k: ops._as_float32(v, f"residuals[{k!r}]").reshape(np.shape(v)).copy()
            for k, v in dict(state.get("residuals", {})).items()
        }
        self.velocities = {
            k: ops._as_float32(v, f"velocities[{k!r}]").reshape(np.shape(v)).copy()
            for k, v in dict(state.get("velocities", {})).items()
        }
        self.rounds = int(state.get("rounds", 0))
