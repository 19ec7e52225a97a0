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
import os
import threading
from collections.abc import Callable, Iterable, Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, NamedTuple, Optional

import numpy as np

from . import _core, ops
from ._arrays import as_float32, flat_views, to_numpy
from .codec import Codec
from .format import Limits, accumulate
from .format.decoding import prepare_accumulation

__all__ = ["Encoder"]


# Kept entries below which the residual's correction runs on the encoding thread: handing
# it to another costs about 0.1 ms, what correcting some 10^5 entries takes.
_SMALL_CORRECTION = 1 << 16
# The payloads an Encoder reads back are its own codec's: whatever it wrote is read, where a
# receiver's limits on untrusted payloads (the expansion of a constant tensor under zstd,
# 16 GiB of output) could refuse them.
_OWN_PAYLOADS = Limits(max_decoded_bytes=1 << 62, max_body_bytes=1 << 62, max_expansion=1 << 62)
# Elements per part of the steps that scale, check or fold an update into the state: the
# temporaries stay about a MiB (two alive at a time, a part and the next), where a whole
# float32 (or float64) copy of the update was as large as the update itself.
_PART = 1 << 18


def _float32_parts(
    update: np.ndarray,
    scale: Optional[float],
    velocity: Optional[np.ndarray] = None,
    momentum: float = 0.0,
    stop: Optional[int] = None,
) -> Iterable[tuple[slice, np.ndarray]]:
    """(slice, float32 values) over the flat ``update`` a part at a time, up to ``stop``:
    ``np.float32(update) * np.float32(scale)`` (without scale, the update in float32: a view
    of a float32 update), plus ``momentum * velocity`` when a flat velocity is given; the
    values whole-array numpy arithmetic gives, element by element."""
    flat = update.reshape(-1)
    end = flat.size if stop is None else stop
    for at in range(0, end, _PART):
        part = flat[at : min(end, at + _PART)]
        if scale is not None:
            part = part.astype(np.float32)  # a copy, scaled in place below
            part *= np.float32(scale)
        elif part.dtype != np.float32:
            part = part.astype(np.float32)
        where = slice(at, at + part.size)
        if velocity is not None:
            stepped = velocity[where] * np.float32(momentum)
            stepped += part
            part = stepped
        yield where, part


def _finite(a: np.ndarray) -> bool:
    """Whether ``a`` holds no NaN or infinity: one min and one max, no boolean copy."""
    return not a.size or (math.isfinite(float(a.min())) and math.isfinite(float(a.max())))


class _Added(NamedTuple):
    """What an encode added to a residual in place, for a failed one to take back: the
    update (times ``scale``) over its first ``stop`` values (None: all of them), and, with
    a deferred momentum step, ``momentum`` times the (unchanged) flat ``velocity``."""

    update: np.ndarray
    scale: Optional[float] = None
    stop: Optional[int] = None
    velocity: Optional[np.ndarray] = None
    momentum: float = 0.0


_pool: list[ThreadPoolExecutor] = []  # made at the first large correction
_pool_lock = threading.Lock()


def _correction_pool() -> ThreadPoolExecutor:
    """The threads that correct residuals while payloads are written, made once per process
    (not once per call: starting a thread cost 0.4 ms of a 160-tensor model's encode)."""
    with _pool_lock:
        if not _pool:
            _pool.append(
                ThreadPoolExecutor(max_workers=max(2, os.cpu_count() or 1), thread_name_prefix="fedpress-correction")
            )
        return _pool[0]


def _forget_pool_in_child() -> None:
    """A child made by fork has none of the parent's threads, and may have been made while
    another thread held the lock: it starts with neither."""
    global _pool_lock
    _pool_lock = threading.Lock()
    _pool.clear()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_forget_pool_in_child)


def _settle(futures: list[Future]) -> bool:
    """Waits for every future (an interrupt, too, must not leave a correction running while
    the residuals are restored); whether each one completed without an exception."""
    made = True
    for f in futures:
        while True:
            try:
                made = f.exception() is None and made
                break
            except BaseException:  # noqa: BLE001 - interrupted while waiting: wait again
                continue
    return made


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
        mask: Optional[Callable[[np.ndarray], np.ndarray]] = None,
        weight: int = 1,
    ) -> bytes:
        """The payload of ``update`` plus what earlier rounds did not send; ``seed``,
        ``rotation_seed``, ``mask`` and ``weight`` (secure aggregation) as in ``fedpress.Codec.encode``
        (error feedback keeps what the masked codes stand for, not the masks). ``round`` (1-based, the
        federation's round) places the call in the density warm-up; without it the
        encoder counts its own calls."""
        if not isinstance(update, Mapping):
            raise TypeError(f"update must be a mapping of names to tensors, got {type(update).__name__}")
        codec = self._codec_for(self.density(round)) if self.warmup_rounds else self.codec
        scale = self._clip_scale(update) if self.clip is not None else None
        arrays: dict[str, np.ndarray] = {}
        dtypes: dict[str, str] = {}
        for name, value in update.items():
            arrays[name], dtype = to_numpy(str(name), value)
            if arrays[name].dtype.kind == "f":
                dtypes[name] = dtype
        if not self.error_feedback and self.momentum is None:
            # Nothing carried between rounds: the codec compresses the float32 update.
            # (the codec reads float32 tensors as they are: a copy only where scaled)
            to_send = {
                name: self._float32(a, scale) if name in dtypes and scale is not None else a
                for name, a in arrays.items()
            }
            payload = codec.encode(
                to_send, seed=seed, rotation_seed=rotation_seed, dtypes=dtypes, mask=mask, weight=weight
            )
            self.rounds += 1
            return payload
        for name in dtypes:  # once, not in every pass that reads an update flat
            if not arrays[name].flags.c_contiguous:
                arrays[name] = np.ascontiguousarray(arrays[name])
        fused = self._fused_topk(codec, arrays, dtypes, scale)
        # Refused before the state changes, which stays bit for bit. (randk reads only the
        # entries it keeps: a NaN elsewhere would stay in the residual, and fail some later
        # round at random.)
        if self.momentum is not None or (self.error_feedback and codec.spec.sparsifier == "randk"):
            self._check_finite(arrays, dtypes, scale)
        replaced = self._add_residuals(arrays, dtypes) if self.error_feedback else {}
        velocities: dict[str, Optional[np.ndarray]] = {}  # what new velocities replaced
        deferred: dict[str, tuple[np.ndarray, Optional[float]]] = {}  # velocities stepped after success
        to_send = dict(arrays)
        added: dict[str, _Added] = {}  # what went into each residual in place, to undo on failure
        selected: dict[str, tuple[np.ndarray, np.ndarray]] = {}
        correcting: list[Future] = []  # the residual's correction, on a second thread
        early: dict[str, tuple[Optional[np.ndarray], np.ndarray]] = {}  # the tensors it corrects
        taken = False  # whether a dense payload was taken out of the residuals (``after`` below)

        def residuals_of(names: Iterable[str]) -> dict[str, np.ndarray]:
            return {name: self.residuals[name] for name in names}

        payload = b""
        try:
            if self._fuses_globally(codec, dtypes, scale):
                # Every residual += its update and the top-k of them all, in one pass over each,
                # without concatenating them; the kept entries stay in the residuals.
                fused = dict.fromkeys(dtypes, 0)
                updates, residuals = [], []
                for name in dtypes:
                    updates.append(as_float32(arrays[name], name))
                    residuals.append(self.residuals[name].reshape(-1))
                total = sum(u.size for u in updates)
                try:
                    parts = ops.ef_topk_many(updates, residuals, codec.spec.kept(total), zero_selected=False)
                except ValueError as exc:
                    if "NaN" not in str(exc):  # refused before adding anything
                        raise
                    added.update((n, _Added(u)) for n, u in zip(dtypes, updates))  # residual + update in each
                    bad = next((n for n, r in zip(dtypes, residuals) if not np.isfinite(r).all()), next(iter(dtypes)))
                    raise ValueError(
                        f"tensor {bad!r} holds NaN (the update plus what earlier rounds did not send); "
                        "compressed tensors must be finite"
                    ) from None
                added.update((n, _Added(u)) for n, u in zip(dtypes, updates))
                selected.update(zip(dtypes, parts))
            for name in dtypes:
                g = None if name in fused else self._velocity_step(name, arrays[name], scale, velocities, deferred)
                if self.error_feedback:
                    r = self.residuals[name]
                    if name in selected:  # chosen with every tensor above
                        to_send[name] = r
                        continue
                    if g is None and (scale is not None or name in deferred):
                        # residual += (momentum * velocity +) the clipped update, a part at a
                        # time: no scaled copy, and the velocity is stepped once the payload is made.
                        m = self.momentum or 0.0
                        velocity = self.velocities[name].reshape(-1) if name in deferred else None
                        flat = r.reshape(-1)
                        added[name] = _Added(arrays[name], scale, 0, velocity, m)
                        for part, u in _float32_parts(arrays[name], scale, velocity, m):
                            with np.errstate(over="ignore"):
                                flat[part] += u
                            added[name] = _Added(arrays[name], scale, part.stop, velocity, m)  # as far as it went
                        to_send[name] = r
                        continue
                    update32 = as_float32(arrays[name], name) if g is None else g
                    added[name] = _Added(update32)
                    if name in fused:
                        # residual += update and its top-k chosen in the same pass; the kept
                        # entries stay in it, and the correction below leaves their rounding.
                        try:
                            selected[name] = ops.ef_topk(update32, r.reshape(-1), fused[name], zero_selected=False)
                        except ValueError:
                            raise ValueError(
                                f"tensor {name!r} holds NaN (the update plus what earlier rounds did not send); "
                                "compressed tensors must be finite"
                            ) from None
                    else:
                        with np.errstate(over="ignore"):  # (an overflow is refused by name below)
                            r += update32.reshape(r.shape)
                    g = r
                assert g is not None  # with neither feedback nor momentum, encode returned above
                to_send[name] = g
            if self.error_feedback and codec.spec.sparsifier == "randk":
                # A finite update can still overflow the residual it is added to, and random-k
                # would not read it there: refused now, by name (the update is taken back out).
                for name in dtypes:
                    if not _finite(self.residuals[name]):
                        raise ValueError(
                            f"tensor {name!r}: the update plus what earlier rounds did not send overflows "
                            "float32; compressed tensors must be finite"
                        )
            sent: dict[str, tuple[Optional[np.ndarray], np.ndarray]] = {}
            # The residual's correction (what the receiver decodes, taken out) runs on a second
            # thread while the codec writes the payload (index coding, zstd, checksum): both
            # release the GIL, and neither needs the other. A small one runs here.

            def correct(values_known: Mapping[str, tuple[Optional[np.ndarray], np.ndarray]]) -> None:
                sent.update(values_known)
                # Sparse tensors only: their sections hold copies of the kept values, while
                # a dense fp32 section is the residual itself, still to be written.
                sparse = {name: v for name, v in values_known.items() if v[0] is not None}
                if self.error_feedback and sparse:
                    early.update(sparse)
                    if sum(v[1].size for v in sparse.values()) >= _SMALL_CORRECTION:
                        correcting.append(_correction_pool().submit(self._take_out, sparse, -1.0))
                    else:  # a hand-off to another thread would cost more than the correction
                        made: Future = Future()
                        self._take_out(sparse, -1.0)
                        made.set_result(None)
                        correcting.append(made)

            # Every tensor dense, no velocity to mask, a payload this encoder can read: the
            # codec writes its sections in place, and what the receiver decodes is taken out
            # of the residuals from the payload itself, dequantized straight into them (no
            # decoded copy of the update: a dense q4 encode peaked at twice the update).
            # (Under zstd, only quantized codes: reading another section back means
            # decompressing the body, which costs more than the decoded copy it saves.)
            after = (
                self.error_feedback
                and self.momentum is None
                and mask is None
                and codec.spec.sparsifier is None
                and codec.table == "inline"
                and (codec.spec.zstd_level is None or codec.spec.values in ("q8", "q4", "q2", "sign"))
            )
            try:
                payload = codec.encode(
                    to_send,
                    seed=seed,
                    rotation_seed=rotation_seed,
                    dtypes=dtypes,
                    mask=mask,
                    weight=weight,
                    selected=selected or None,
                    on_decoded=None if after else correct,
                )
                if after:
                    take_out = prepare_accumulation(payload, residuals_of(dtypes), -1.0, limits=_OWN_PAYLOADS, own=True)
                    taken = True  # (from here, an interrupt puts the payload back, whatever it caught)
                    take_out()
            finally:
                for f in correcting:  # joined, success or not
                    f.result()
        except BaseException:
            if taken:  # an interrupt as the payload was taken out: put it back first
                accumulate(payload, residuals_of(dtypes), 1.0, limits=_OWN_PAYLOADS)
            if correcting and _settle(correcting):
                self._take_out(early, 1.0)  # the correction was made: put it back first
            self._undo(added)
            for state, kept in ((self.residuals, replaced), (self.velocities, velocities)):
                for name, before in kept.items():  # a failed encode leaves no new state either
                    if before is None:
                        del state[name]
                    else:
                        state[name] = before
            raise
        if self.error_feedback:
            self._take_out({name: v for name, v in sent.items() if name not in early}, -1.0)
        for name, (arr, clip_scale) in deferred.items():  # v = m * v + update, as the residual took it
            flat = self.velocities[name].reshape(-1)
            for part, stepped in _float32_parts(arr, clip_scale, flat, self.momentum or 0.0):
                flat[part] = stepped
        for name, (idx, s) in sent.items():
            if self.momentum is not None:
                # Momentum factor masking: entries that went out stop carrying velocity.
                velocity = self.velocities[name].reshape(-1)
                if idx is None:
                    velocity[s != 0] = 0.0
                else:
                    velocity[idx[s != 0]] = 0.0
        self.rounds += 1
        return payload

    def _add_residuals(self, arrays: Mapping[str, np.ndarray], names: Iterable[str]) -> dict[str, Optional[np.ndarray]]:
        """A zero residual for each of these tensors that has none of its shape, all of them
        in one allocation: numpy asks the kernel for huge pages for a large one, where an
        array per tensor faults a 4 KiB page at a time (the first error-feedback top-k over a
        model of 160 tensors, 25.6M floats, took 87 ms that way and 21 ms in one buffer).
        Returns what each new one replaced (None: nothing), for a failed encode to put back."""
        missing = [name for name in names if getattr(self.residuals.get(name), "shape", None) != arrays[name].shape]
        replaced = {name: self.residuals.get(name) for name in missing}
        views = flat_views([arrays[name].size for name in missing], np.float32, np.zeros)
        for name, view in zip(missing, views):
            self.residuals[name] = view.reshape(arrays[name].shape)
        return replaced

    def _take_out(self, sent: Mapping[str, tuple[Optional[np.ndarray], np.ndarray]], sign: float) -> None:
        """The residual becomes what was meant minus what the receiver decodes (``sign``
        -1; +1 reverts it), in O(kept entries) for a sparse tensor."""
        accs, indices, values = [], [], []
        for name, (idx, s) in sent.items():
            flat = self.residuals[name].reshape(-1)
            if idx is None:
                (np.subtract if sign < 0 else np.add)(flat, s, out=flat)
            else:
                accs.append(flat)
                indices.append(idx)
                values.append(as_float32(s, name))
        if accs:  # a model's sparse tensors in one call, spread over the threads
            _core.scatter_add_each(accs, indices, values, sign)

    @staticmethod
    def _float32(arr: np.ndarray, scale: Optional[float]) -> np.ndarray:
        """The update tensor in float32 (times the clip factor): a new array."""
        g = np.array(arr, dtype=np.float32, copy=True, order="C").reshape(arr.shape)  # (state: C order)
        if scale is not None:
            g *= np.float32(scale)
        return g

    def _velocity_step(
        self,
        name: str,
        arr: np.ndarray,
        scale: Optional[float],
        created: dict[str, Optional[np.ndarray]],
        deferred: dict[str, tuple[np.ndarray, Optional[float]]],
    ) -> Optional[np.ndarray]:
        """With momentum, the new velocity ``v = m * v + update`` (times the clip factor) to
        send, or to add to the residual; else None. A new velocity is a new array (C order),
        recorded in ``created`` with what it replaced, for a failed encode to put back. With
        error feedback and a velocity of this shape, None as well, and the step is
        ``deferred``: ``encode`` adds ``m * v + update`` to the residual a part at a time and
        steps v in place once the payload is made (no copy of the update or of v, and a
        failed encode leaves v as it was, bit for bit)."""
        if self.momentum is None:
            return None
        v = self.velocities.get(name)
        if self.error_feedback and v is not None and v.shape == arr.shape:
            deferred[name] = (arr, scale)
            return None
        created.setdefault(name, v)
        if v is None or v.shape != arr.shape:
            new = self._float32(arr, scale)
        else:  # without error feedback the new velocity is what is sent: a new array
            new = np.empty(arr.shape, np.float32)
            flat = new.reshape(-1)
            for part, u in _float32_parts(arr, scale, v.reshape(-1), self.momentum):
                flat[part] = u
        self.velocities[name] = new
        return new

    @staticmethod
    def _check_finite(arrays: Mapping[str, np.ndarray], names: Iterable[str], scale: Optional[float]) -> None:
        """ValueError naming the first of these tensors that holds NaN or infinity (in
        float32, times ``scale``): one min and one max a part at a time, no copy of a float32
        update."""
        for name in names:
            for _, u in _float32_parts(arrays[name], scale):
                if not _finite(u):
                    raise ValueError(
                        f"tensor {name!r} holds NaN or infinity (or float64 values beyond the float32 range); "
                        "compressed tensors must be finite"
                    )

    def _fused_topk(
        self, codec: Codec, arrays: Mapping[str, np.ndarray], dtypes: Mapping[str, str], scale: Optional[float]
    ) -> dict[str, int]:
        """{name: k} of the tensors whose error-feedback top-k runs fused (``ops.ef_topk``:
        the update is added to the residual and the residual's top-k chosen in one pass):
        exact top-k per tensor (one float tensor, or ``per_tensor``), sent sparse, with a
        residual of the tensor's shape, no momentum and no clipping."""
        sp = codec.spec
        if (
            not self.error_feedback
            or self.momentum is not None
            or scale is not None
            or sp.sparsifier != "topk"
            or sp.ratio >= 1.0
            or not (len(dtypes) == 1 or codec.per_tensor)
        ):
            return {}
        fused = {}
        for name in dtypes:
            r, n = self.residuals.get(name), arrays[name].size
            k = sp.kept(n)
            if r is not None and r.shape == arrays[name].shape and n and codec.sends_sparse(n, k):
                fused[name] = k
        return fused

    def _fuses_globally(self, codec: Codec, dtypes: Mapping[str, str], scale: Optional[float]) -> bool:
        """Whether the error-feedback top-k over several float tensors runs fused
        (``ops.ef_topk_many``: each update added to its residual and the top-k of them all
        chosen in one pass, without concatenating them): exact top-k over every tensor
        together, no momentum and no clipping."""
        sp = codec.spec
        return (
            self.error_feedback
            and self.momentum is None
            and scale is None
            and sp.sparsifier == "topk"
            and sp.ratio < 1.0
            and len(dtypes) > 1
            and not codec.per_tensor
        )

    def _undo(self, added: Mapping[str, _Added]) -> None:
        """Takes back what a failed encode added to the residuals, as far as it went:
        exactly where the update was not finite (those entries go back to zero, which is
        all that can be said of them), to within a rounding elsewhere (``(r + u) - u``)."""
        for name, a in added.items():
            r = self.residuals[name].reshape(-1)
            for part, u in _float32_parts(a.update, a.scale, a.velocity, a.momentum, stop=a.stop):
                segment = r[part]
                with np.errstate(invalid="ignore", over="ignore"):
                    segment -= u
                segment[~np.isfinite(segment)] = 0.0

    def _clip_scale(self, update: Mapping[str, Any]) -> Optional[float]:
        """The factor that brings the update's L2 norm (over its float tensors) down to
        ``clip``, or None when it is within it (or not finite)."""
        total = 0.0
        for name, value in update.items():
            arr, _ = to_numpy(str(name), value)
            if arr.dtype.kind == "f":
                flat = arr.reshape(-1)
                # In float64, a part at a time (no whole copy), squared and summed pairwise: a
                # float64 np.dot of each part went through BLAS at a fifth of the speed.
                for at in range(0, flat.size, _PART):
                    part = flat[at : at + _PART].astype(np.float64)
                    part *= part
                    total += float(part.sum())
        norm = math.sqrt(total)
        assert self.clip is not None
        # (an update that is not finite is left unscaled, for the check that refuses it by name)
        return self.clip / norm if self.clip < norm < math.inf else None

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
            k: as_float32(v, f"residuals[{k!r}]").reshape(np.shape(v)).copy()
            for k, v in dict(state.get("residuals", {})).items()
        }
        self.velocities = {
            k: as_float32(v, f"velocities[{k!r}]").reshape(np.shape(v)).copy()
            for k, v in dict(state.get("velocities", {})).items()
        }
        self.rounds = int(state.get("rounds", 0))
