"""The stateful client encoder: error feedback and momentum correction.

With error feedback, what a round does not send is not lost: it is kept as a
residual and added to the next round's update (Seide et al. 2014; Stich et al.
2018). The residual is "everything minus what the server will decode", computed
from the payload itself, so it also absorbs quantization error. Momentum
correction (Lin et al., Deep Gradient Compression, 2018) accumulates a velocity
``v = m * v + update`` and compresses that, clearing the velocity of entries
that were sent so stale momentum is not applied twice.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Optional

import numpy as np

from . import ops
from .codec import Codec, _to_numpy
from .payload import decode

__all__ = ["Encoder"]


class Encoder:
    """Per-client encoder: ``payload = enc.encode(update)`` each round.

    Float tensors carry a float32 residual per tensor name between rounds (with
    ``error_feedback=True``); other tensors pass through the codec unchanged.
    ``state_dict()`` / ``load_state_dict()`` persist the residuals and velocities.
    """

    def __init__(self, spec: str, error_feedback: bool = True, momentum: Optional[float] = None,
                 **codec_options: Any) -> None:
        self.codec = Codec(spec, **codec_options)
        self.error_feedback = bool(error_feedback)
        if momentum is not None and not 0.0 <= float(momentum) < 1.0:
            raise ValueError(f"momentum must be in [0, 1), got {momentum}")
        self.momentum = None if momentum is None else float(momentum)
        self.residuals: dict[str, np.ndarray] = {}
        self.velocities: dict[str, np.ndarray] = {}
        self.rounds = 0

    @property
    def spec(self) -> str:
        return str(self.codec.spec)

    def encode(self, update: Mapping[str, Any], *, seed: Optional[int] = None,
               rotation_seed: Optional[int] = None) -> bytes:
        """The payload of ``update`` plus what earlier rounds did not send; ``seed`` and
        ``rotation_seed`` as in :meth:`fedpress.Codec.encode`."""
        if not isinstance(update, Mapping):
            raise TypeError(f"update must be a mapping of names to tensors, got {type(update).__name__}")
        to_send: dict[str, np.ndarray] = {}
        dtypes: dict[str, str] = {}
        for name, value in update.items():
            arr, dtype = _to_numpy(str(name), value)
            if arr.dtype.kind != "f":
                to_send[name] = arr
                continue
            dtypes[name] = dtype
            g = np.array(arr, dtype=np.float32, copy=True).reshape(arr.shape)
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
        payload = self.codec.encode(to_send, seed=seed, rotation_seed=rotation_seed, _dtypes=dtypes)
        if self.error_feedback or self.momentum is not None:
            sent = decode(payload)
            for name, g in to_send.items():
                if g.dtype != np.float32 or name not in sent:
                    continue
                s = sent[name].astype(np.float32, copy=False)
                if self.error_feedback:
                    self.residuals[name] = g - s
                if self.momentum is not None:
                    # Momentum factor masking: entries that went out stop carrying velocity.
                    self.velocities[name][s != 0] = 0.0
        self.rounds += 1
        return payload

    def residual_norm(self) -> float:
        """L2 norm of everything not yet sent."""
        return float(np.sqrt(sum(float(np.dot(r.ravel(), r.ravel())) for r in self.residuals.values())))

    def state_dict(self) -> dict[str, Any]:
        return {
            "spec": self.spec, "error_feedback": self.error_feedback, "momentum": self.momentum,
            "rounds": self.rounds,
            "residuals": {k: v.copy() for k, v in self.residuals.items()},
            "velocities": {k: v.copy() for k, v in self.velocities.items()},
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        if state.get("spec") not in (None, self.spec):
            raise ValueError(f"state was saved by an encoder with spec {state.get('spec')!r}, this one has "
                             f"{self.spec!r}")
        self.residuals = {k: ops._as_float32(v, f"residuals[{k!r}]").reshape(np.shape(v)).copy()
                          for k, v in dict(state.get("residuals", {})).items()}
        self.velocities = {k: ops._as_float32(v, f"velocities[{k!r}]").reshape(np.shape(v)).copy()
                           for k, v in dict(state.get("velocities", {})).items()}
        self.rounds = int(state.get("rounds", 0))
