"""Spec strings and the stage pipeline that turns an update into a payload.

A spec names up to four stages joined by ``+``, in this order, each optional::

    sparsifier   topk:R | thresh:R | randk:R | randk:R:shared   (R = fraction of entries kept, 0 < R <= 1)
    rotation     rht                             (seeded randomized Hadamard transform)
    values       fp32 | fp16 | bf16 | q8 | q4 | q2 | sign
                 | edenB | edenB:shared | edenB:mse  (B = 1, 2, 3, 4, 8 bits; EDEN rotates by itself)
                 | intB[:clip=C][:nmax=N]            (B = 2..16 bits; linear levels that add up)
    entropy      zstd | zstd:L                   (L = zstd level 1..22; plain zstd picks 19 for
                                                  bodies up to 4 KiB, 9 up to 64 KiB, else 3)

Examples: ``fp32``, ``q8+zstd:3``, ``topk:0.01+q4+zstd``, ``randk:0.01+fp16``, ``rht+q2+zstd``,
``eden4``, ``topk:0.01+eden2+zstd``, ``eden4:shared``.

``edenB`` is EDEN (Vargaftik et al., 2022): a seeded Hadamard rotation, then each
coordinate rounded to the nearest Lloyd-Max level of N(0, 1) for B bits, one
unbiased scale per rotation block. ``edenB:mse`` uses the error-minimising scale
instead (biased; for use under error feedback). ``edenB:shared`` is the mode for a
round whose clients share one rotation seed (``Codec.encode(..., rotation_seed=)``):
unbiased stochastic rounding between neighbouring levels, so the server can sum
the clients in the rotated domain and invert once (see ``fedpress.Aggregator``).

``intB`` is the linear stage of secure aggregation: the vector rotated as EDEN rotates
it (under the round's ``rotation_seed`` when given), clipped to [-C, C] (default
``clip=0.01``) and rounded without bias to one of 2^B evenly spaced levels. The codes of
clients that share C and the rotation add up: ``fedpress.Aggregator`` sums them in
integers, exactly, and decodes the mean once. Under secure aggregation
(``Codec.encode(..., mask=)``) they travel as residues modulo 2^m,
m = B + ceil(log2(N)) + 1 bits each, N (default ``nmax=128``) bounding the clients
of one sum (their total weight, when clients weigh their codes by their example counts),
so that the pairwise masks cancel in the sum. ``randk:R:shared+intB`` keeps the same random
R of the coordinates on every client of a round (drawn from the round's ``rotation_seed``):
codes over one shared support add up too, at R times the bytes.
"""

from __future__ import annotations

import functools
import math
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Optional

import numpy as np

from . import _args, _core, ops
from ._arrays import as_float32, flat_views, to_numpy
from .format.eden import eden_fixed_size, encode_eden, parse_eden
from .format.intcodes import (
    MAX_BITS,
    MAX_MODULUS_BITS,
    IntLevels,
    encode_int,
    int_head,
    int_piece,
    int_section,
    int_size,
    modulus_bits,
    parse_int,
)
from .format.limits import DEFAULT_ROTATION_BLOCK, MAX_CODEC_BUCKET, MAX_INT_WEIGHT, MAX_ROTATION_BLOCK
from .format.registry import (
    EDEN_BITS,
    KIND_DENSE,
    KIND_SPARSE,
    KIND_SPARSE_SEEDED,
    PURPOSE_QUANT,
    PURPOSE_RANDK,
    PURPOSE_RHT,
    QUANT_BITS,
    TABLE_FORMS,
    VALUE_CODES,
    stage_seed,
)
from .format.values import KernelSection, decode_values, encode_values, values_size
from .format.writer import Entry, KernelRefused, plan_index_streams, raw_entry, write_payload

__all__ = ["Spec", "parse_spec", "Codec"]

SPARSIFIERS = ("topk", "thresh", "randk")
EDEN_STAGES = tuple(EDEN_BITS)  # the value stages are the format's value codes
EDEN_MODES = ("shared", "mse")
VALUE_STAGES = tuple(code for code in VALUE_CODES if code != "int")  # intB names its bits
INT_STAGE = re.compile(r"^int(\d+)$")
INT_MIN_BITS = 2  # one bit is sign's job
DEFAULT_INT_CLIP, DEFAULT_INT_CLIENTS = 0.01, 128
_STAGE_RANK = {"sparsifier": 0, "rotation": 1, "values": 2, "entropy": 3}
_RATIO = re.compile(r"^(?:\d+(?:\.\d*)?|\.\d+)(?:[eE][-+]?\d+)?$")


@dataclass(frozen=True)
class Spec:
    """A parsed spec. ``str(spec)`` gives its canonical text."""

    sparsifier: Optional[str] = None
    ratio: float = 1.0
    rotate: bool = False
    values: str = "fp32"
    zstd_level: Optional[int] = None
    shared_support: bool = False  # randk:R:shared: the round's clients keep the same entries
    eden_mode: Optional[str] = None  # edenB values: None, "shared" or "mse"
    int_clip: float = DEFAULT_INT_CLIP  # intB values: the clip range [-C, C]
    int_clients: int = DEFAULT_INT_CLIENTS  # intB values: the most clients one secure sum holds

    @functools.cached_property
    def eden(self) -> bool:
        return self.values in EDEN_STAGES

    @property
    def shares_rotation(self) -> bool:
        """Whether the round's clients share one seed (``Codec.encode(rotation_seed=)``):
        ``edenB:shared`` and ``intB`` rotate with it (the server sums in the rotated domain),
        ``randk:R:shared`` draws its entries from it."""
        return self.eden_mode == "shared" or self.int_bits > 0

    def kept(self, n: int) -> int:
        """Entries the sparsifier keeps of a tensor of n: all without one, else the ratio's
        share, at least one of a non-empty tensor."""
        if self.sparsifier is None or n == 0:
            return n
        return min(n, max(1, int(round(self.ratio * n))))

    @functools.cached_property
    def int_bits(self) -> int:
        """Bits per level of intB values; 0 for other stages (asked per tensor: kept)."""
        match = INT_STAGE.match(self.values)
        return int(match.group(1)) if match else 0

    def __str__(self) -> str:
        parts = []
        if self.sparsifier:
            shared = ":shared" if self.shared_support else ""
            parts.append(f"{self.sparsifier}:{self.ratio!r}{shared}")  # shortest text that parses back exactly
        if self.rotate:
            parts.append("rht")
        if self.int_bits:
            # the shortest text of the float32 clip the payload records ("+" joins stages)
            clip = str(np.float32(self.int_clip)).replace("e+", "e")
            parts.append(f"{self.values}:clip={clip}:nmax={self.int_clients}")
        else:
            parts.append(f"{self.values}:{self.eden_mode}" if self.eden_mode else self.values)
        if self.zstd_level is not None:
            parts.append(f"zstd:{self.zstd_level}" if self.zstd_level else "zstd")
        return "+".join(parts)


def _stage_error(spec: str, stage: str, why: str) -> ValueError:
    return ValueError(f"bad stage {stage!r} in spec {spec!r}: {why}")


def parse_spec(spec: str) -> Spec:
    """Parses a spec string; a bad one raises ValueError naming the bad stage."""
    if not isinstance(spec, str):
        raise TypeError(f"spec must be a string, got {type(spec).__name__}")
    text = spec.strip().lower()
    if not text:
        raise ValueError("empty spec: expected stages such as 'topk:0.01+q4+zstd'")
    fields: dict[str, Any] = {}
    last_rank = -1
    for raw in text.split("+"):
        stage = raw.strip()
        name, _, arg = stage.partition(":")
        if name in SPARSIFIERS:
            kind = "sparsifier"
            if name == "randk" and arg.endswith(":shared"):
                arg = arg[: -len(":shared")]
                fields["shared_support"] = True
            if not arg or not _RATIO.match(arg):
                raise _stage_error(spec, stage, f"{name} needs a ratio, e.g. '{name}:0.01'")
            ratio = float(arg)
            if not (0.0 < ratio <= 1.0) or not math.isfinite(ratio):
                raise _stage_error(spec, stage, f"ratio must be in (0, 1], got {arg}")
            fields.update(sparsifier=name, ratio=ratio)
        elif name == "rht":
            kind = "rotation"
            if arg:
                raise _stage_error(spec, stage, "rht takes no argument")
            fields["rotate"] = True
        elif INT_STAGE.match(name):
            kind = "values"
            fields.update(_int_stage(spec, stage, name, arg, rotated=bool(fields.get("rotate"))))
        elif name in VALUE_STAGES:
            kind = "values"
            if name in EDEN_STAGES:
                if fields.get("rotate"):
                    raise _stage_error(spec, stage, f"{name} rotates by itself: drop the rht stage")
                if arg and arg not in EDEN_MODES:
                    raise _stage_error(spec, stage, f"{name} takes ':shared' or ':mse', got {arg!r}")
                fields["eden_mode"] = arg or None
            elif arg:
                raise _stage_error(spec, stage, f"{name} takes no argument")
            fields["values"] = name
        elif name == "zstd":
            kind = "entropy"
            level = 0  # adaptive: see format.writer.write_payload
            if arg:
                if not arg.lstrip("-").isdigit() or not 1 <= int(arg) <= 22:
                    raise _stage_error(spec, stage, f"zstd level must be an integer in 1..22, got {arg!r}")
                level = int(arg)
            fields["zstd_level"] = level
        else:
            known = ", ".join((*SPARSIFIERS, "rht", *VALUE_STAGES, "intB", "zstd"))
            raise _stage_error(spec, stage or "(empty)", f"unknown stage; known stages: {known}")
        if kind == "values" and fields.get("shared_support") and not INT_STAGE.match(name):
            raise _stage_error(spec, stage, "randk:R:shared is for intB values, whose codes add up over the support")
        rank = _STAGE_RANK[kind]
        if rank == last_rank:
            raise _stage_error(spec, stage, f"a second {kind} stage")
        if rank < last_rank:
            raise _stage_error(spec, stage, "stages must come in the order sparsifier, rht, values, zstd")
        last_rank = rank
    if fields.get("sparsifier") in ("topk", "thresh") and INT_STAGE.match(fields.get("values", "")):
        raise ValueError(
            f"spec {spec!r}: intB codes add up over a support the clients share, not over each one's top-k: "
            "use randk:R:shared or no sparsifier"
        )
    if fields.get("shared_support") and "values" not in fields:
        raise ValueError(f"spec {spec!r}: randk:R:shared needs intB values (e.g. 'randk:0.1:shared+int8')")
    return Spec(**fields)


def _int_stage(spec: str, stage: str, name: str, arg: str, *, rotated: bool) -> dict[str, Any]:
    """The fields of an ``intB[:clip=C][:nmax=N]`` stage."""
    bits = int(name[3:])
    if not INT_MIN_BITS <= bits <= MAX_BITS:
        raise _stage_error(spec, stage, f"int takes {INT_MIN_BITS} to {MAX_BITS} bits, got {bits}")
    if rotated:
        raise _stage_error(spec, stage, f"{name} rotates by itself: drop the rht stage")
    fields: dict[str, Any] = {"values": name}
    for option in arg.split(":") if arg else []:
        key, _, value = option.partition("=")
        if key == "clip":
            clip = float(value) if _RATIO.match(value) else math.nan
            if not (math.isfinite(clip) and clip > 0 and math.isfinite(float(np.float32(clip)))):
                raise _stage_error(spec, stage, f"clip must be a positive number, got {value!r}")
            fields["int_clip"] = float(np.float32(clip))  # what the payload records
        elif key == "nmax":
            if not value.isdigit() or int(value) < 1:
                raise _stage_error(spec, stage, f"nmax must be a positive integer, got {value!r}")
            fields["int_clients"] = int(value)
            if modulus_bits(bits, int(value)) > MAX_MODULUS_BITS:
                raise _stage_error(
                    spec,
                    stage,
                    f"nmax={value} needs {modulus_bits(bits, int(value))}-bit sums, over {MAX_MODULUS_BITS}",
                )
        else:
            raise _stage_error(spec, stage, f"{name} takes ':clip=C' and ':nmax=N', got {option!r}")
    return fields


# ------------------------------------------------------------ normalisation --
# ------------------------------------------------------------------ codec --
class Codec:
    """Encodes a whole update (a mapping of names to tensors) into self-describing bytes.

    ``Codec("topk:0.01+q4+zstd").encode(update)`` returns a payload that
    ``fedpress.decode`` restores without knowing the codec. Float tensors
    (float16/32/64, bfloat16) are compressed; integer and bool tensors travel
    losslessly. Selection runs over the whole update (a global top-k over all
    float tensors) unless ``per_tensor=True``. A tensor whose sparse form would
    be larger than its dense form is sent dense.

    ``table="digest"`` leaves the tensor table (names, dtypes, shapes) out of the
    payload and sends its 8-byte digest (``fedpress.table_digest``) instead: for
    a receiver that knows the model, which decodes with ``table=`` the model.
    """

    def __init__(
        self,
        spec: str,
        *,
        per_tensor: bool = False,
        bucket: int = 512,
        rht_block: int = DEFAULT_ROTATION_BLOCK,
        table: str = "inline",
    ) -> None:
        if table not in TABLE_FORMS:
            raise ValueError(f"table must be one of {', '.join(map(repr, TABLE_FORMS))}, got {table!r}")
        self.table = table
        self.spec = parse_spec(spec)
        self.per_tensor = bool(per_tensor)
        self.bucket = _args.bucket(bucket)
        if self.bucket > MAX_CODEC_BUCKET:
            raise ValueError(f"bucket must be <= {MAX_CODEC_BUCKET} (2**24), got {bucket}")
        if rht_block <= 0 or rht_block & (rht_block - 1) or rht_block > MAX_ROTATION_BLOCK:
            raise ValueError(f"rht_block must be a power of two <= 2**24, got {rht_block}")
        self.rht_block = int(rht_block)
        self._sparse_choices: dict[tuple[int, int], bool] = {}  # sends_sparse, by (n, k): a model's sizes recur

    def __repr__(self) -> str:
        table = f", table={self.table!r}" if self.table != "inline" else ""
        return f"Codec({str(self.spec)!r}, per_tensor={self.per_tensor}{table})"

    def encode(
        self,
        update: Mapping[str, Any],
        *,
        seed: Optional[int] = None,
        rotation_seed: Optional[int] = None,
        dtypes: Optional[Mapping[str, str]] = None,
        mask: Optional[Callable[[np.ndarray], np.ndarray]] = None,
        weight: int = 1,
        selected: Optional[Mapping[str, tuple[np.ndarray, np.ndarray]]] = None,
        on_decoded: Optional[Callable[[Mapping[str, tuple[Optional[np.ndarray], np.ndarray]]], None]] = None,
    ) -> bytes:
        """Compresses ``update`` into payload bytes. ``seed`` fixes every random
        choice (stochastic rounding, random-k, rotation signs); by default it is fresh.

        ``rotation_seed``: for ``edenB:shared``, the seed every client of the round
        rotates with (the server hands it out); each tensor's rotation derives from it
        and its position in the update. Without it the rotation derives from ``seed``
        and the server decodes the payload on its own.

        ``dtypes``: ``{name: dtype name}``, the dtype the payload records for a floating
        tensor instead of its own, which is what ``fedpress.decode`` returns: e.g. the
        float32 sum of a float16 tensor and what earlier rounds did not send (what
        ``Encoder`` sends) is recorded as ``"float16"``. One of ``float16``, ``bfloat16``,
        ``float32``, ``float64``; the values are compressed from float32 either way.

        ``mask``: for ``intB`` values under secure aggregation, a function given the integer
        codes of every float tensor (uint64, concatenated in table order) that returns the
        vector sent instead, of residues modulo 2^m (``fedpress.secagg``'s client adds its
        masks there, after any distributed-DP noise). The payload records its codes as
        masked: the server decodes them only in the round's sum. ``weight``: with ``mask``,
        an integer (e.g. the client's example count) the codes are multiplied by before they
        are masked, recorded in the payload, so that the sum is weighted without the server
        seeing a code.

        For an error-feedback encoder of your own (``fedpress.Encoder`` is one):
        ``selected`` gives, by float tensor name, the ``(indices, values)`` to keep instead of
        what this codec's sparsifier would choose (contiguous uint32 indices strictly ascending,
        float32 values of the same length; a tensor left out is sent dense, and a tensor whose
        sparse form would not be smaller too; a spec without a sparsifier sends the selection
        sparse all the same); not with ``randk``, whose indices come from the seed, nor with
        ``intB`` values. ``on_decoded`` is called once every section is coded and every index
        checked, before the payload is written, with ``{name: (indices or None for dense, the
        float32 values the receiver decodes)}`` for each float tensor, taken from the coded
        sections themselves (before any cast to the dtype the payload records): what the
        sender's residual must lose is exactly that, and work on it can run while the payload
        is written (``Encoder`` corrects its residuals meanwhile). If the payload then cannot
        be written, ``encode`` raises after the call.
        """
        if not isinstance(update, Mapping):
            raise TypeError(f"update must be a mapping of names to tensors, got {type(update).__name__}")
        payload_seed = _args.seed(seed)
        if rotation_seed is not None:
            rotation_seed = _args.seed(rotation_seed)
            if self.spec.eden_mode != "shared" and not self.spec.int_bits:
                raise ValueError(f"rotation_seed is for the edenB:shared and intB values, the spec is {self.spec}")
        if mask is not None:
            if not self.spec.int_bits:
                raise ValueError(f"mask is for intB values (secure aggregation), the spec is {self.spec}")
            if (
                isinstance(weight, bool)
                or not isinstance(weight, (int, np.integer))
                or not 1 <= weight <= MAX_INT_WEIGHT
            ):
                raise ValueError(f"weight must be an integer in [1, 2^32), got {weight!r}")
            if (self.spec.sparsifier is not None and not self.spec.shared_support) or selected is not None:
                raise ValueError(
                    f"secure aggregation sums every coordinate: the spec {self.spec} keeps a different "
                    "subset per client, whose masked codes would not add up; use intB without a sparsifier, "
                    "or randk:R:shared"
                )
            if self.spec.shared_support and rotation_seed is None:
                raise ValueError("randk:R:shared under secure aggregation needs the round's rotation_seed")
        names, arrays, recorded = [], [], []
        for name, value in update.items():
            if not isinstance(name, str):
                raise TypeError(f"tensor names must be strings, got {type(name).__name__}")
            arr, dtype = to_numpy(name, value)
            if dtypes is not None and name in dtypes:
                dtype = dtypes[name]
                if arr.dtype.kind != "f" or dtype not in ("float16", "bfloat16", "float32", "float64"):
                    raise ValueError(
                        f"dtypes[{name!r}] is {dtype!r}: only a floating tensor's recorded dtype can be set, "
                        "to float16, bfloat16, float32 or float64"
                    )
            names.append(name)
            arrays.append(arr)
            recorded.append(dtype)
        floats = [i for i, a in enumerate(arrays) if a.dtype.kind == "f"]
        flat = {i: as_float32(arrays[i], names[i]) for i in floats}
        support_base = payload_seed
        if selected is None:
            try:
                # randk:R:shared draws from the round's seed: every client keeps the same entries.
                support_base = rotation_seed if self.spec.shared_support and rotation_seed is not None else payload_seed
                chosen = self._select(flat, support_base)
            except ValueError:  # a NaN met by the sparsifier: name the tensor
                for i, v in flat.items():
                    _check_values(names[i], v, 0, sparse=False)
                raise
        else:
            chosen = self._caller_selection(selected, names, flat)
        decoded: Optional[dict[str, tuple[Optional[np.ndarray], np.ndarray]]] = None if on_decoded is None else {}
        entries = []
        decoding: list[tuple[str, Entry, Optional[tuple[np.ndarray, np.ndarray]], int]] = []  # for ``decoded``
        int_codes: dict[int, tuple[IntLevels, np.ndarray, Optional[int]]] = {}  # intB tensors: their levels and codes
        codes_out: dict[int, np.ndarray] = {}  # where each tensor's codes go, for the mask
        whole: Optional[np.ndarray] = None
        if mask is not None and self.spec.int_bits:
            # Every float tensor's codes in one buffer, in table order, which the mask takes
            # whole: no concatenated copy of them (8 bytes a value).
            counts = {i: (chosen[i][1].size if i in chosen else flat[i].size) for i in floats}
            whole = np.empty(sum(counts.values()), np.uint64)
            at = 0
            for i, count in counts.items():
                codes_out[i] = whole[at : at + count]
                at += count
        for i, (name, arr, dtype) in enumerate(zip(names, arrays, recorded)):
            if i not in flat:
                if mask is not None:
                    raise ValueError(
                        f"tensor {name!r} is {arr.dtype}: secure aggregation sums float tensors only, "
                        "and would send this one in the clear"
                    )
                entries.append(raw_entry(name, arr, dtype))
                continue
            if self.spec.int_bits:
                support = None
                if i in chosen:  # randk: the kept entries and the seed they come from
                    support = (chosen[i][1], stage_seed(support_base, i, PURPOSE_RANDK))
                entries.append(
                    self._int_entry(
                        name,
                        dtype,
                        arr.shape,
                        flat[i],
                        payload_seed,
                        i,
                        rotation_seed,
                        int_codes,
                        support,
                        in_place=decoded is None and mask is None,
                        codes_out=codes_out.get(i),
                        plain=mask is None or decoded is not None,
                    )
                )
                if decoded is not None:
                    decoded[name] = self._decoded(entries[-1], chosen.get(i), payload_seed, i)
                continue
            entry = self._float_entry(
                name, arr, dtype, flat[i], chosen.get(i), payload_seed, i, rotation_seed, in_place=decoded is None
            )
            entries.append(entry)
            if decoded is not None:
                decoding.append((name, entry, chosen.get(i), i))
        if decoded is not None:
            decoded.update(self._decoded_many(decoding, payload_seed))
        if mask is not None:
            _mask_int_entries(entries, int_codes, mask, int(weight), whole)
            whole = None  # the codes (8 bytes a value) are not kept while the payload is written
            codes_out.clear()
            int_codes.clear()
        elif weight != 1:
            raise ValueError("weight is for masked intB payloads (mask=)")
        plans = None
        if on_decoded is not None and decoded is not None:
            plans = plan_index_streams(entries)  # indices refused before the caller acts on them
            on_decoded(decoded)
        try:
            return write_payload(str(self.spec), payload_seed, entries, self.spec.zstd_level, self.table, plans=plans)
        except KernelRefused as exc:
            # A kernel writing its section in place refused its input: say why, by name.
            refused = next(e for e in entries if e.name == exc.tensor)
            parts = refused.values if isinstance(refused.values, tuple) else (refused.values,)
            piece = next(p.piece for p in parts if isinstance(p, KernelSection))
            _check_values(refused.name, piece[1], refused.rht_block, sparse=refused.kind != KIND_DENSE)
            if self.spec.eden:
                raise ValueError(
                    f"tensor {exc.tensor!r} holds {exc.why}; scale the update down or use a codec without eden"
                ) from None
            raise

    def _caller_selection(
        self, selected: Mapping[str, tuple[np.ndarray, np.ndarray]], names: list[str], flat: dict[int, np.ndarray]
    ) -> dict[int, tuple[np.ndarray, np.ndarray]]:
        """``encode``'s ``selected``, checked, by tensor position (the index coding checks
        that the indices ascend within the tensor, and names it)."""
        if not isinstance(selected, Mapping):
            raise TypeError(
                f"selected must be a mapping of tensor names to (indices, values), got {type(selected).__name__}"
            )
        if self.spec.sparsifier == "randk" or self.spec.int_bits:
            raise ValueError(f"selected is for specs whose kept entries travel with their indices, not {self.spec}")
        chosen = {}
        for i in flat:  # ~0.5 us a tensor: a model's 160 are checked in 0.1 ms
            pair = selected.get(names[i])
            if pair is None:
                continue
            if not (isinstance(pair, tuple) and len(pair) == 2):
                raise ValueError(f"selected[{names[i]!r}] must be an (indices, values) pair")
            indices, values = pair
            if not (
                type(indices) is np.ndarray
                and type(values) is np.ndarray
                and (indices.dtype is _UINT32 or indices.dtype == _UINT32)
                and (values.dtype is _FLOAT32 or values.dtype == _FLOAT32)
                and indices.ndim == 1
                and values.shape == indices.shape
                and indices.flags.c_contiguous
                and values.flags.c_contiguous
            ):
                raise ValueError(
                    f"selected[{names[i]!r}] must be (uint32 indices, float32 values), 1-D, contiguous, of one length"
                )
            if indices.size > flat[i].size:
                raise ValueError(f"selected[{names[i]!r}] keeps {indices.size} entries of {flat[i].size}")
            chosen[i] = (indices, values)
        if len(chosen) != len(selected):
            taken = {names[i] for i in chosen}
            unknown = next(name for name in selected if name not in taken)
            if unknown in {names[i] for i in flat}:  # a float tensor's entry that is not a pair (None)
                raise ValueError(f"selected[{unknown!r}] must be an (indices, values) pair")
            raise ValueError(f"selected[{unknown!r}]: the update has no floating tensor of that name")
        return chosen

    # -- selection ----------------------------------------------------------
    def _select(self, flat: dict[int, np.ndarray], seed: int) -> dict[int, tuple[np.ndarray, np.ndarray]]:
        """(indices, values) kept per float tensor; absent: the tensor is sent dense."""
        sp = self.spec
        if sp.sparsifier is None or sp.ratio >= 1.0 or not flat:
            return {}
        if sp.sparsifier == "randk":
            # Indices regenerate from the seed on decode; kept per tensor.
            return {i: ops.randomk(v, sp.kept(v.size), stage_seed(seed, i, PURPOSE_RANDK)) for i, v in flat.items()}
        if sp.sparsifier == "topk":

            def pick(v: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
                return ops.topk(v, sp.kept(v.size))
        else:

            def pick(v: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
                return ops.threshold_topk(v, sp.ratio, seed)

        if self.per_tensor or len(flat) == 1:
            return {i: pick(v) for i, v in flat.items()}
        # Global selection over every float tensor, as if concatenated (in their order).
        order = sorted(flat)
        tensors = [flat[i] for i in order]
        if sp.sparsifier == "topk":
            parts = ops.topk_many(tensors, sp.kept(sum(v.size for v in tensors)))
        else:
            parts = ops.threshold_topk_many(tensors, sp.ratio, seed)
        return dict(zip(order, parts))

    # -- values ---------------------------------------------------------------
    def _value_bucket(self) -> int:
        """Elements per scale: none for float formats; 8x wider for sign, whose
        one bit per value would otherwise pay 6% for its scales."""
        if self.spec.values == "sign":
            return self.bucket * 8
        return self.bucket if self.spec.values in ("q8", "q4", "q2") else 0

    def _values_bytes(self, count: int) -> int:
        """Bytes of a values section of ``count`` values (eden: without shared-mode outliers)."""
        if self.spec.eden:
            return eden_fixed_size(count, self.rht_block, EDEN_BITS[self.spec.values])
        if self.spec.int_bits:
            return int_size(count, self.spec.int_bits)
        return values_size(self.spec.values, count, self._value_bucket())

    def sends_sparse(self, n: int, k: int) -> bool:
        """Whether k kept entries of n go out sparse: not when the sparse form would not
        be smaller than the dense one (tiny tensors, high ratios)."""
        choice = self._sparse_choices.get((n, k))
        if choice is None:
            # Rice-coded gaps take about log2(n/k) + 1.6 bits per index, plus a varint and a byte.
            index_bytes = (k * (math.log2(n / k) + 1.6) / 8 + 4) if k else 1
            choice = self._values_bytes(k) + index_bytes < self._values_bytes(n)
            if len(self._sparse_choices) < 4096:
                self._sparse_choices[(n, k)] = choice
        return choice

    def _decoded(
        self, entry: Entry, selected: Optional[tuple[np.ndarray, np.ndarray]], payload_seed: int, ordinal: int
    ) -> tuple[Optional[np.ndarray], np.ndarray]:
        """(indices or None, float32 values) that the receiver decodes from a float entry:
        its values section decoded by the decoder's own functions, in O(section)."""
        sp = self.spec
        coded = entry.values if isinstance(entry.values, tuple) else (entry.values,)
        data = memoryview(b"".join(memoryview(p).cast("B") for p in coded))
        count, block = entry.count, entry.rht_block
        if entry.value_code == "int":
            values = parse_int(data, count, block).values()
        elif sp.eden:
            # (a shared-mode section carries its own rotation seed; parse_eden reads it)
            derived = stage_seed(payload_seed, ordinal, PURPOSE_RHT)
            values = parse_eden(sp.values, data, count, block, derived).values()
        elif block and count:
            values = decode_values(sp.values, data, ops.rht_padded_size(count, block), entry.bucket)
            values = ops.irht(values, count, stage_seed(payload_seed, ordinal, PURPOSE_RHT), block=block)
        else:
            values = decode_values(sp.values, data, count, entry.bucket)
        if entry.kind == KIND_DENSE:
            return None, values
        assert selected is not None
        return selected[0], values

    def _decoded_many(
        self, decoding: list[tuple[str, Entry, Optional[tuple[np.ndarray, np.ndarray]], int]], payload_seed: int
    ) -> dict[str, tuple[Optional[np.ndarray], np.ndarray]]:
        """``_decoded`` of many float entries, {name: (indices or None, values)}: the plain
        quantized sections (codes and scales as the codec made them, not rotated) are
        dequantized together, into one buffer, by one kernel call."""
        out = {}
        batched = []
        for name, entry, selected, ordinal in decoding:
            code = entry.value_code
            if (code in QUANT_BITS or code == "sign") and not entry.rht_block and isinstance(entry.values, tuple):
                batched.append((name, entry, selected))
            else:
                out[name] = self._decoded(entry, selected, payload_seed, ordinal)
        views = flat_views([entry.count for _, entry, _ in batched], np.float32, np.empty)
        jobs = []
        for (_, entry, _), view in zip(batched, views):
            scales, packed = entry.values  # as encode_values made them: what the section holds
            bits = 1 if entry.value_code == "sign" else QUANT_BITS[entry.value_code]
            jobs.append((packed, scales, bits, entry.count, entry.bucket, view, 1.0, False))
        if jobs:
            _core.dequantize_many(jobs)
        for (name, entry, selected), view in zip(batched, views):
            if entry.kind == KIND_DENSE:
                out[name] = (None, view)
            else:
                assert selected is not None
                out[name] = (selected[0], view)
        return out

    def _int_entry(
        self,
        name: str,
        dtype: str,
        shape: tuple,
        v: np.ndarray,
        payload_seed: int,
        ordinal: int,
        rotation_seed: Optional[int],
        int_codes: dict[int, tuple[IntLevels, np.ndarray, Optional[int]]],
        support: Optional[tuple[np.ndarray, int]] = None,
        *,
        in_place: bool = False,
        codes_out: Optional[np.ndarray] = None,
        plain: bool = True,
    ) -> Entry:
        """An intB entry, dense, or with ``support`` (the kept values of random-k and the
        seed of their indices) sparse-seeded; its codes also into ``int_codes`` (made in
        ``codes_out`` when given), for the mask. ``in_place`` (no mask, no decoding back): the
        codes are written by their kernel in the payload instead, and ``int_codes`` is left
        alone. Without ``plain`` (a masked payload nobody decodes back) the unmasked section
        is not made: the mask's replaces it."""
        sp = self.spec
        n = int(v.size)
        if support is not None:
            v, support_seed = support
        _check_values(name, v, 0, sparse=support is not None)  # the rotation is orthonormal: finite in, finite out
        levels = IntLevels(
            bits=sp.int_bits,
            clip=sp.int_clip,
            modulus_bits=modulus_bits(sp.int_bits, sp.int_clients),
            rotation_seed=stage_seed(
                rotation_seed if rotation_seed is not None else payload_seed, ordinal, PURPOSE_RHT
            ),
            block=self.rht_block,
        )
        quant_seed = stage_seed(payload_seed, ordinal, PURPOSE_QUANT)
        seed = None if support is None else support_seed
        if in_place and v.size and self.rht_block >= 8:
            head = int_head(levels, masked=False, width=levels.bits, support_seed=seed)
            section: Any = (head, int_piece(v, levels, quant_seed))
        else:
            codes = encode_int(v, levels, quant_seed, out=codes_out)
            int_codes[ordinal] = (levels, codes, seed)
            section = int_section(codes, levels, masked=False, width=levels.bits, support_seed=seed) if plain else ()
        return Entry(
            name=name,
            dtype=dtype,
            shape=tuple(int(d) for d in shape),
            kind=KIND_DENSE if support is None else KIND_SPARSE_SEEDED,
            count=n if support is None else int(v.size),
            rht_block=self.rht_block,
            values=section,
            value_code="int",
        )

    def _float_entry(
        self,
        name: str,
        original: np.ndarray,
        dtype: str,
        v: np.ndarray,
        selected: Optional[tuple[np.ndarray, np.ndarray]],
        payload_seed: int,
        ordinal: int,
        rotation_seed: Optional[int] = None,
        *,
        in_place: bool = False,
    ) -> Entry:
        sp = self.spec
        n = v.size
        indices, kept = selected if selected is not None else (None, None)
        if indices is not None and sp.sparsifier != "randk" and not self.sends_sparse(n, indices.size):
            indices = None
        if indices is None:
            values = v
            kind = KIND_DENSE
        else:
            assert kept is not None
            values = kept
            kind = KIND_SPARSE_SEEDED if sp.sparsifier == "randk" else KIND_SPARSE
        rotated = (sp.eden or sp.rotate) and values.size > 0

        # The quantizer finds NaN and infinity in its own max-abs pass, the sign stage in its
        # bucket sums and the EDEN kernel in its block norms, which a rotation overflowing
        # float32 makes infinite too (their errors are renamed below); every other stage is
        # checked here, in one max and one min.
        checked_by_kernel = (sp.values in ("q8", "q4", "q2", "sign") and not rotated) or sp.eden
        if not checked_by_kernel:
            _check_values(name, values, self.rht_block if rotated else 0, sparse=indices is not None)
        shape = original.shape
        if kind == KIND_DENSE and sp.values == "fp16" and original.dtype == np.float64:
            values = original.reshape(-1)  # round to half once, not through float32 first
        quant_seed = stage_seed(payload_seed, ordinal, PURPOSE_QUANT)
        block = self.rht_block if sp.eden or rotated else 0
        if sp.eden:
            shared = sp.eden_mode == "shared"
            rotation = stage_seed(
                rotation_seed if shared and rotation_seed is not None else payload_seed, ordinal, PURPOSE_RHT
            )
            bucket = 0
            flat = as_float32(values, name).reshape(-1)
            try:
                coded = encode_eden(
                    sp.values,
                    flat,
                    block,
                    rotation,
                    quant_seed,
                    shared=shared,
                    mse=sp.eden_mode == "mse",
                    in_place=in_place,
                )
            except ValueError as exc:
                _check_values(name, flat, block, sparse=indices is not None)  # names the tensor and the cause
                raise ValueError(
                    f"tensor {name!r} holds {exc}; scale the update down or use a codec without eden"
                ) from None
        elif rotated and in_place and sp.values in QUANT_BITS:
            # Rotated and quantized by one kernel, in the payload, a few blocks at a time:
            # no rotated copy of the tensor (checked above: finite, small enough to rotate).
            bucket = self._value_bucket()
            flat = as_float32(values, name)
            rotation = stage_seed(payload_seed, ordinal, PURPOSE_RHT)
            coded = KernelSection(
                ("rq", flat, QUANT_BITS[sp.values], bucket, quant_seed, block, rotation),
                values_size(sp.values, ops.rht_padded_size(flat.size, block), bucket),
            )
        else:
            if rotated:
                values = ops.rht(values, stage_seed(payload_seed, ordinal, PURPOSE_RHT), block=block)
            bucket = self._value_bucket()
            try:
                coded = encode_values(sp.values, values, bucket, quant_seed, in_place=in_place)
            except ValueError:
                if not checked_by_kernel:
                    raise
                _check_values(name, values, 0, sparse=indices is not None)  # names the tensor
                raise
        return Entry(
            name=name,
            dtype=dtype,
            shape=shape,  # an ndarray's shape: a tuple of ints already
            kind=kind,
            count=int(indices.size if indices is not None else n),
            rht_block=block,
            indices=None if kind != KIND_SPARSE else indices,
            values=coded,
            value_code=sp.values,
            bucket=bucket,
        )


_UINT32 = np.dtype(np.uint32)
_FLOAT32 = np.dtype(np.float32)


def _mask_int_entries(
    entries: list[Entry],
    int_codes: dict[int, tuple[IntLevels, np.ndarray, Optional[int]]],
    mask: Callable[[np.ndarray], np.ndarray],
    weight: int,
    whole: Optional[np.ndarray] = None,
) -> None:
    """Replaces the intB entries' codes by what ``mask`` makes of all of them together,
    times ``weight`` first: residues modulo 2^m, written m bits each and marked masked.
    ``whole``: the buffer the codes were made in, in table order (else they are joined)."""
    order = sorted(int_codes)
    if whole is None:
        whole = np.concatenate([int_codes[i][1] for i in order]) if order else np.zeros(0, np.uint64)
    codes = whole  # the codec's own buffer: weighted in place
    if weight != 1 and order:
        modulus = np.uint64((1 << int_codes[order[0]][0].modulus_bits) - 1)
        np.multiply(codes, np.uint64(weight), out=codes)
        np.bitwise_and(codes, modulus, out=codes)
    masked = mask(codes)
    if not isinstance(masked, np.ndarray) or masked.dtype != np.uint64 or masked.shape != codes.shape:
        raise ValueError(f"mask must return a uint64 array of shape {codes.shape}, got {type(masked).__name__}")
    start = 0
    for i in order:
        levels, own, support_seed = int_codes[i]
        part = masked[start : start + own.size]
        start += own.size
        if part.size and int(part.max()) >> levels.modulus_bits:
            raise ValueError(f"mask returned values of {levels.modulus_bits} bits or more (residues modulo 2^m)")
        head, packed = int_section(
            part, levels, masked=True, width=levels.modulus_bits, weight=weight, support_seed=support_seed
        )
        # The packed residues are this payload's alone: moved into it, their pages handed back.
        entries[i].values = (head, KernelSection(("move", packed), packed.nbytes))


def _check_values(name: str, values: np.ndarray, rotation_block: int, *, sparse: bool) -> None:
    """ValueError unless the values are finite and, when rotated, small enough that the
    unnormalised Hadamard butterflies (which grow a vector by up to its block length)
    stay within float32. One max and one min: NaN and infinity show in them too."""
    if not values.size:
        return
    peak = max(float(values.max()), -float(values.min()))
    if not math.isfinite(peak):
        if sparse:
            raise ValueError(f"tensor {name!r} holds NaN or infinity among its selected values")
        raise ValueError(
            f"tensor {name!r} holds NaN or infinity (or float64 values beyond the "
            "float32 range); compressed tensors must be finite"
        )
    bound = peak * math.sqrt(values.size) * rotation_block
    if bound > 1e38:
        raise ValueError(
            f"tensor {name!r} holds values too large to rotate in float32 "
            f"(max|x| * sqrt(n) * rht_block = {bound:.3g} > 1e38); scale the update "
            "down or use a codec without rht/eden"
        )
