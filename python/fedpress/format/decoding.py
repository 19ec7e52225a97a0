"""Decoding a payload into arrays: ``decode`` (the update), ``decode_parts`` (kept
entries only, for error feedback) and ``inspect`` (what a payload holds), over the
records ``reader.parse`` validated; ``sparse_parts`` and ``raw_array`` decode one
record (the Aggregator sums them without a dense copy)."""

from __future__ import annotations

import math
from collections.abc import Collection, Mapping, Sequence
from typing import Any, Callable, Optional, Union

import numpy as np

from .. import _core, ops
from .._arrays import flat_views
from .errors import DecodeError, out_of_memory_as_decode_error
from .limits import DEFAULT_LIMITS, Limits
from .reader import Parsed, TensorRecord, checksum_verified, finish_checksum, output_dtype, parse
from .registry import (
    FLAG_TABLE_DIGEST,
    FLAG_ZSTD,
    KIND_DENSE,
    KIND_NAMES,
    KIND_RAW,
    KIND_SPARSE,
    KIND_SPARSE_SEEDED,
    PURPOSE_RANDK,
    PURPOSE_RHT,
    stage_seed,
)
from .tables import entry_head, heads_digest
from .values import QUANT_BITS, decode_values, quantized_parts, unchecked_quantized_parts

__all__ = ["decode", "decode_parts", "inspect", "accumulate"]

FLOAT_CODES = ("fp32", "fp16", "bf16")  # value codes decoded as the checksum reads them


def sparse_parts(
    rec: TensorRecord, seed: int, out: Optional[tuple[np.ndarray, np.ndarray]] = None
) -> tuple[Optional[np.ndarray], np.ndarray]:
    """(indices or None for dense, float32 values) of a float tensor, decoded and validated.
    ``out``: (uint32, float32) arrays of the kept count to decode a sparse tensor into (an
    aggregator decodes a batch into two buffers allocated once, not two per payload)."""
    if out is not None and rec.kind == KIND_DENSE:
        raise ValueError("out is for sparse tensors")
    if rec.eden is not None:
        values = rec.eden.values()
    elif rec.intcode is not None:
        try:
            values = rec.intcode.values()
        except DecodeError as exc:
            raise DecodeError(f"tensor {rec.name!r}: {exc}") from None
    else:
        rotated = bool(rec.rht_block and rec.count)
        coded = ops.rht_padded_size(rec.count, rec.rht_block) if rotated else rec.count
        try:
            values = decode_values(
                rec.value_code, rec.value_data, coded, rec.bucket, None if out is None or rotated else out[1]
            )
        except DecodeError as exc:
            raise DecodeError(f"tensor {rec.name!r}: {exc}") from None
        if rotated:
            values = ops.irht(values, rec.count, stage_seed(seed, rec.ordinal, PURPOSE_RHT), block=rec.rht_block)
    if out is not None and not np.may_share_memory(values, out[1]):  # a path that made its own array
        out[1][...] = values
        values = out[1]
    # decode_values returns finite values (quantized codes times a checked finite scale
    # cannot leave the scale's range; float codes are checked as they are converted), and
    # an eden section's inverse rotation is finite when its bound is within float32: only
    # a plain rotation's output, and an eden section beyond its bound, need the full pass.
    if rec.eden is not None:
        finite_by_construction = rec.eden.rotation_bound() <= 1e38
    elif rec.intcode is not None:
        finite_by_construction = rec.intcode.rotation_bound() <= 1e38  # a huge clip can overflow it
    elif rec.rht_block and rec.count and rec.value_code in _QUANTIZED_CODES:
        # Codes times checked scales lie within +-max(scale), and no sum of the transform (its
        # butterflies included) exceeds the block's size times that: finite below float32's
        # range, without a pass over the output.
        _, scales, _ = unchecked_quantized_parts(
            rec.value_code, rec.value_data, ops.rht_padded_size(rec.count, rec.rht_block), rec.bucket
        )
        finite_by_construction = float(scales.max(initial=0.0)) * rec.rht_block <= 1e38
    else:
        finite_by_construction = not rec.rht_block  # decode_values checks or guarantees it
    if not finite_by_construction and not np.all(np.isfinite(values)):
        raise DecodeError(f"tensor {rec.name!r}: values section decodes to non-finite values (NaN or infinity)")
    if rec.kind == KIND_DENSE:
        return None, values
    if rec.kind == KIND_SPARSE_SEEDED:
        support = rec.intcode.support_seed if rec.intcode is not None else None  # a round's shared support
        support = stage_seed(seed, rec.ordinal, PURPOSE_RANDK) if support is None else support
        seeded = ops.randomk_indices(rec.size, rec.count, support)
        if out is not None:
            out[0][...] = seeded
            seeded = out[0]
        return seeded, values
    try:
        idx = ops.decode_indices(
            rec.index_data,
            rec.size,
            max_count=rec.count,
            out=None if out is None else out[0],
            version=rec.index_version,
        )
    except ValueError as exc:
        raise DecodeError(f"tensor {rec.name!r}: {exc}") from None
    if idx.size != rec.count:
        raise DecodeError(f"tensor {rec.name!r}: index stream holds {idx.size} indices, the table says {rec.count}")
    return idx, values


def streamable(rec: TensorRecord) -> bool:
    """Whether a tensor's kept entries can be added straight from its index stream: a
    version 2 stream (version 1's Golomb codes decode only serially) of plain values."""
    return rec.kind == KIND_SPARSE and rec.index_version >= 2 and rec.eden is None and not rec.rht_block


def index_stream(rec: TensorRecord, finite: bool = False) -> Any:
    """A streamable tensor's checked ``_core.IndexStream``: fp32 values read where they
    lie (checked finite with the stream unless ``finite``: the checksum's read checked
    them), q8/q4/q2/sign values added from their codes (the section's scales and padding
    checked first), fp16 and bf16 decoded first (finite by then)."""
    try:
        return _new_stream(rec, check_fp32=not finite, deferred=False)
    except DecodeError as exc:
        raise DecodeError(f"tensor {rec.name!r}: {exc}") from None


def _new_stream(rec: TensorRecord, *, check_fp32: bool, deferred: bool) -> Any:
    """The ``_core.IndexStream`` of a streamable tensor, checked now or (``deferred``) by
    ``check_payloads``: fp32 values where they lie (checked finite with ``check_fp32``),
    quantized codes added as they lie (their scales and padding checked here in the
    decoder's words, or deferred with the stream), fp16 and bf16 decoded first."""
    if rec.value_code in _QUANTIZED_CODES:
        parts = unchecked_quantized_parts if deferred else quantized_parts
        body, scales, bits = parts(rec.value_code, rec.value_data, rec.count, rec.bucket)
        return _core.IndexStream.quantized(
            rec.index_data, rec.size, rec.count, body, scales, bits, rec.bucket, deferred=deferred
        )
    if rec.value_code == "fp32":
        return _core.IndexStream(rec.index_data, rec.size, rec.count, rec.value_data, check_fp32, deferred=deferred)
    values = decode_values(rec.value_code, rec.value_data, rec.count, rec.bucket)  # finite by then
    return _core.IndexStream(rec.index_data, rec.size, rec.count, values, False, deferred=deferred)


def index_streams(records: Sequence[TensorRecord], finite: Collection[str] = ()) -> dict[int, Any]:
    """``index_stream`` of many streamable tensors, {id(record): checked stream}, in one
    native call for them all: q8/q4/q2/sign values are added from their codes, never
    decoded into a copy (``IndexStream.quantized``, whose check covers the section's scales
    and padding), and every stream is checked in parallel (``check_payloads``). ``finite``:
    names of the fp32 tensors whose values the checksum's read checked. The tensors from the
    first one in order that fails are left out: ``index_stream`` of it raises the error, by
    name."""
    made: list[tuple[TensorRecord, Any]] = []
    for rec in records:
        try:
            stream = _new_stream(rec, check_fp32=rec.name not in finite, deferred=True)
        except DecodeError:  # fp16, bf16: converted and checked one by one
            break
        made.append((rec, stream))
    # One item per stream: many items are checked one per thread.
    checks = _core.check_payloads([(None, [], [stream]) for _, stream in made]) if made else []
    out = {}
    for (rec, stream), (_, _, bad, _) in zip(made, checks):
        if bad is not None:
            break
        out[id(rec)] = stream
    return out


def checked_streams(batch: Sequence[tuple[Parsed, list[TensorRecord]]]) -> list[Union[dict[str, Any], DecodeError]]:
    """Finishes the deferred checksums of many parsed payloads and checks the index
    streams of their ``streamable`` tensors (given with each), in one native call that
    runs in parallel without the GIL, each payload's streams and fp32 values checked right
    after its checksum, while its bytes are in cache. For each payload: {name: checked
    ``_core.IndexStream``}, or the DecodeError it fails with (a checksum mismatch first)."""
    items = []
    for parsed, streamed in batch:
        deferred = parsed.unchecked is not None
        fp32 = [rec for rec in streamed if rec.value_code == "fp32"]
        # With a deferred checksum, the checksum's read checks the values finite.
        jobs = [(rec.value_offset, "fp32-finite", rec.count, None) for rec in fp32] if deferred else []
        streams = [
            _core.IndexStream(rec.index_data, rec.size, rec.count, rec.value_data, not deferred, deferred=True)
            for rec in fp32
        ]
        items.append((parsed.unchecked, jobs, streams))
    results: list[Union[dict[str, Any], DecodeError]] = []
    pending: list[tuple[int, dict[str, Any], list[TensorRecord]]] = []  # each sound payload's other codes
    for (parsed, streamed), (_, _, streams), (crc, finite, failed, error) in zip(
        batch, items, _core.check_payloads(items)
    ):
        fp32 = [rec for rec in streamed if rec.value_code == "fp32"]
        try:
            if crc is not None:
                checksum_verified(parsed, crc)
            for rec, ok in zip(fp32, finite):
                if not ok:
                    raise DecodeError(
                        f"tensor {rec.name!r}: values section decodes to non-finite values (NaN or infinity)"
                    )
            if failed is not None:
                raise DecodeError(f"tensor {fp32[failed].name!r}: {error}")
        except DecodeError as exc:
            results.append(exc)
            continue
        checked = {rec.name: stream for rec, stream in zip(fp32, streams)}
        pending.append((len(results), checked, [rec for rec in streamed if rec.value_code != "fp32"]))
        results.append(checked)
    # Other value codes are decoded now, their checksums verified: every payload's together,
    # into one buffer (100 top-1% q4 payloads: one allocation and one parallel call, not 100
    # of each). A tensor the batch leaves out (from the first that fails) is decoded on its
    # own, which names what is wrong, as its payload's error.
    made = index_streams([rec for _, _, others in pending for rec in others])
    for at, checked, others in pending:
        try:
            checked.update((rec.name, made[id(rec)] if id(rec) in made else index_stream(rec)) for rec in others)
        except DecodeError as exc:
            results[at] = exc
    return results


def finish_checksum_converting(
    parsed: Any,
    streamed: list[TensorRecord],
    convert_dense: bool = False,
    outs: Optional[dict[int, np.ndarray]] = None,
    weight: Optional[float] = None,
) -> tuple[dict[str, np.ndarray], set[str]]:
    """Verifies a deferred checksum (nothing to do when it was not deferred), in the same
    read of the payload decoding the plain dense value sections (fp32, fp16, bf16, and
    q8/q4/q2/sign, neither rotated nor EDEN) with ``convert_dense`` (into
    ``outs[id(record)]`` where given) and checking the fp32 values of the ``streamed``
    tensors for NaN and infinity: ({name: float32 values} of the dense tensors, names of
    the checked ones). A quantized section the decoder would refuse (a bad scale or
    padding bit) is left out of the first, for the caller's checked path to name.

    ``weight``: the outputs are new sums, each the first term of its sum: ``0 + weight *
    values`` in float32 (numpy's two steps, bit for bit), and a float section holding NaN
    or infinity is left out too (the caller's path names the first bad tensor in order)
    instead of raising here."""
    if parsed.unchecked is None:
        return {}, set()
    outs = outs or {}
    converted = {
        rec.name: (rec, outs[id(rec)] if id(rec) in outs else np.empty(rec.count, np.float32))
        for rec in parsed.tensors
        if convert_dense
        and rec.kind == KIND_DENSE
        and rec.eden is None
        and rec.intcode is None
        and not rec.rht_block
        and (rec.value_code in FLOAT_CODES or (rec.count and rec.value_code in _QUANTIZED_CODES))
    }
    checked = [rec for rec in streamed if rec.value_code == "fp32"]
    jobs: list[tuple] = [_decoding_job(rec, values, weight) for rec, values in converted.values()]
    jobs += [(rec.value_offset, "fp32-finite", rec.count, None) for rec in checked]
    records = [rec for rec, _ in converted.values()] + checked
    for rec, finite in zip(records, finish_checksum(parsed, jobs)):
        if finite:
            continue
        if rec.value_code not in FLOAT_CODES or weight is not None:
            del converted[rec.name]  # decoded again by the checked path, which names what is wrong
            continue
        raise DecodeError(f"tensor {rec.name!r}: values section decodes to non-finite values (NaN or infinity)")
    return {name: values for name, (_, values) in converted.items()}, {rec.name for rec in checked}


_QUANTIZED_CODES = frozenset(QUANT_BITS) | {"sign"}


def _decoding_job(rec: TensorRecord, out: np.ndarray, weight: Optional[float] = None) -> tuple:
    """The checksum's job (``_core.crc32c_decoding``) decoding a plain dense section into
    ``out``; with ``weight``, as the first term of a sum (``0 + weight * values``)."""
    extra = () if weight is None else (weight,)
    if rec.value_code in FLOAT_CODES:
        return (rec.value_offset, rec.value_code, rec.count, out, *extra)
    bits = 1 if rec.value_code == "sign" else QUANT_BITS[rec.value_code]
    scales = 4 * -(-rec.count // rec.bucket)  # the scales come first, then the packed codes
    return (rec.value_offset + scales, f"q{bits}", rec.count, out, rec.value_offset, rec.bucket, *extra)


def raw_array(rec: TensorRecord) -> np.ndarray:
    """A raw (lossless) tensor in its own dtype, bfloat16 widened to float32; bool bytes checked."""
    if rec.dtype == "bfloat16":
        data = np.frombuffer(rec.value_data, dtype="<u2").astype(np.uint32) << 16
        return data.view(np.float32).reshape(rec.shape)
    dt = np.dtype(rec.dtype).newbyteorder("<")
    arr = np.frombuffer(rec.value_data, dtype=dt).astype(np.dtype(rec.dtype))
    if rec.dtype == "bool" and arr.size and np.frombuffer(rec.value_data, np.uint8).max() > 1:
        raise DecodeError(f"tensor {rec.name!r}: bool section holds bytes other than 0 and 1")
    return arr.reshape(rec.shape)


def _to_output(values: np.ndarray, dtype: str) -> np.ndarray:
    """float32 values in the tensor's own dtype; float16 saturates instead of overflowing."""
    if dtype == "float16":
        values = np.clip(values, -65504.0, 65504.0)
    return values.astype(output_dtype(dtype), copy=False)


def decode(payload: Any, *, limits: Limits = DEFAULT_LIMITS, table: Any = None) -> dict[str, np.ndarray]:
    """Restores an update from payload bytes alone: ``{name: array}`` with the
    original shapes and dtypes (bfloat16 tensors come back as float32).

    ``table``: the model the payload was made for, as for ``table_digest`` (a
    mapping of names to arrays, or a list of (name, dtype name, shape)). A payload
    encoded with ``table="digest"`` needs it; any other payload must then match it.
    Without it, the output may be at most ``limits.max_expansion`` bytes per payload
    byte (docs/format.md, "Expansion bound"); with it, the model bounds the output."""
    with out_of_memory_as_decode_error():
        parsed = parse(payload, limits, table, defer_checksum=True)
        streamed = [rec for rec in parsed.tensors if streamable(rec)]
        streamed_ids = {id(rec) for rec in streamed}
        # The tensors whose values are decoded where they go get one buffer together: the
        # dense ones from np.empty (numpy asks the kernel for huge pages there, not for
        # np.zeros' calloc), the sparse ones from np.zeros (the kernel's zero pages: a fill
        # would write them all twice).
        placed = [rec for rec in parsed.tensors if rec.kind != KIND_RAW and _plain(rec)]
        views: dict[int, np.ndarray] = {}
        for written, make in ((True, np.empty), (False, np.zeros)):
            group = [rec for rec in placed if (rec.kind == KIND_DENSE) == written]
            views.update(zip(map(id, group), flat_views([rec.size for rec in group], np.float32, make)))
        converted, finite = finish_checksum_converting(parsed, streamed, convert_dense=True, outs=views)
        try:
            dequantized = _dequantize_dense(
                [rec for rec in placed if rec.kind == KIND_DENSE and rec.name not in converted], views
            )
        except DecodeError:  # it decoded none: the loop decodes them in order, naming the first bad tensor
            dequantized = set()
        streams = index_streams(streamed, finite)
        adds: list[tuple[np.ndarray, list, list]] = []  # every stream added in one call at the end
        out: dict[str, np.ndarray] = {}
        for rec in parsed.tensors:
            if rec.kind == KIND_RAW:
                out[rec.name] = raw_array(rec)
                continue
            view = views.get(id(rec))
            if id(rec) in streamed_ids:  # added into zeros as its stream decodes: no index array
                dense = np.zeros(rec.size, np.float32) if view is None else view
                stream = streams.get(id(rec))
                adds.append((dense, [index_stream(rec, rec.name in finite) if stream is None else stream], [1.0]))
            elif rec.name in converted:
                dense = converted[rec.name]
            elif id(rec) in dequantized:
                dense = views[id(rec)]
            elif view is not None and rec.kind == KIND_DENSE:
                try:
                    dense = decode_values(rec.value_code, rec.value_data, rec.count, rec.bucket, view)
                except DecodeError as exc:
                    raise DecodeError(f"tensor {rec.name!r}: {exc}") from None
            else:
                idx, values = sparse_parts(rec, parsed.seed)
                if idx is None:
                    dense = values
                else:
                    dense = np.zeros(rec.size, np.float32) if view is None else view
                    dense[idx.astype(np.intp)] = values
            out[rec.name] = dense  # in its dtype below, once every stream is added
        if adds:
            _core.add_streams_each(adds)
        for rec in parsed.tensors:
            if rec.kind != KIND_RAW:
                out[rec.name] = _to_output(out[rec.name], rec.dtype).reshape(rec.shape)
        return out


def _dequantize_dense(records: list[TensorRecord], views: dict[int, np.ndarray]) -> set[int]:
    """Dequantizes the dense quantized tensors among ``records`` into their views, all in
    one parallel kernel call (a model's tensors: one pass, not one call per tensor, each
    thread writing one half of the outputs); the ids of the records it decoded."""
    jobs, done = [], []
    for rec in records:
        if rec.value_code not in QUANT_BITS and rec.value_code != "sign":
            continue
        body, scales, bits = unchecked_quantized_parts(rec.value_code, rec.value_data, rec.count, rec.bucket)
        jobs.append((body, scales, bits, rec.count, rec.bucket, views[id(rec)], 1.0, False))
        done.append(rec)
    if jobs:
        failed = _core.dequantize_many(jobs, True)  # every section checked first, then decoded
        if isinstance(failed, int):
            _refuse_quantized(done[failed])
    return {id(rec) for rec in done}


def _refuse_quantized(rec: TensorRecord) -> None:
    """DecodeError for a quantized section the kernel's check refused, in the checks' own
    words for what is wrong with it."""
    try:
        quantized_parts(rec.value_code, rec.value_data, rec.count, rec.bucket)
    except DecodeError as exc:
        raise DecodeError(f"tensor {rec.name!r}: {exc}") from None
    raise AssertionError(f"tensor {rec.name!r}: the kernel refused a section the decoder accepts")


def accumulate(
    payload: Any, accs: Mapping[str, np.ndarray], weight: float = 1.0, *, limits: Limits = DEFAULT_LIMITS
) -> None:
    """``accs[name] += weight * values``, in place, for each float tensor of the payload
    named in ``accs`` (float32 arrays of the tensor's size, any shape, C-contiguous), the
    values the float32 ones ``decode`` computes before rounding to the recorded dtype. An
    encoder's error feedback takes its own payload out of its residual this way (weight
    -1) without a decoded copy: plain dense quantized sections are dequantized into the
    sums by one kernel call, a sparse tensor is scattered, the rest decoded and added.
    The payload and the arrays are checked whole (structure, checksum, every quantized
    section; each array's type, size, writability, and overlap with another or with the
    payload) before anything is added; a tensor not in ``accs`` is skipped."""
    prepare_accumulation(payload, accs, weight, limits=limits)()


def prepare_accumulation(
    payload: Any,
    accs: Mapping[str, np.ndarray],
    weight: float = 1.0,
    *,
    limits: Limits = DEFAULT_LIMITS,
    own: bool = False,
) -> Callable[[], None]:
    """``accumulate`` in two steps: everything checked and decoded now, and a function
    returned that adds (and can raise only on an interrupt): a caller that must take the
    additions back after a failure knows from its call whether any was made. ``own``: the
    payload was just written by the caller's own codec, which computed its checksum: it is
    not read a second time to verify it (the structure and the sections are still checked)."""
    if not isinstance(accs, Mapping):
        raise TypeError(f"accs must be a mapping of tensor names to float32 arrays, got {type(accs).__name__}")
    if isinstance(weight, bool) or not isinstance(weight, (int, float, np.integer, np.floating)):
        raise TypeError(f"weight must be a number, got {type(weight).__name__}")
    try:
        finite = math.isfinite(float(weight)) and abs(float(weight)) <= float(np.finfo(np.float32).max)
    except OverflowError:  # an int beyond float64
        finite = False
    if not finite:
        raise ValueError(f"weight must be finite in float32, got {weight!r}")
    weight = float(weight)
    with out_of_memory_as_decode_error():
        parsed = parse(payload, limits, defer_checksum=own)  # (a deferred checksum never finished: not read)
        records = [rec for rec in parsed.tensors if rec.kind != KIND_RAW and rec.name in accs]
        flats = {}
        spans = []  # (first byte, end, name): no sum may overlap another, or the payload
        with memoryview(payload) as whole:
            first = np.frombuffer(whole, np.uint8).__array_interface__["data"][0] if whole.nbytes else 0
            spans.append((first, first + whole.nbytes, None))
        for rec in records:
            acc = accs[rec.name]
            if not (isinstance(acc, np.ndarray) and acc.dtype == np.float32 and acc.flags.c_contiguous):
                raise TypeError(f"accs[{rec.name!r}] must be a C-contiguous float32 numpy array")
            if acc.size != rec.size:
                raise ValueError(f"accs[{rec.name!r}] has {acc.size} elements, the tensor {rec.size}")
            if not acc.flags.writeable:
                raise ValueError(f"accs[{rec.name!r}] is read-only")
            flats[rec.name] = acc.reshape(-1)
            if acc.nbytes:
                start = acc.__array_interface__["data"][0]
                spans.append((start, start + acc.nbytes, rec.name))
        spans.sort(key=lambda span: span[0])
        reach, owner = 0, None  # the furthest end so far, and whose
        for start, end, name in spans:
            if start < reach:
                what = "the payload" if owner is None or name is None else f"accs[{owner!r}]"
                raise ValueError(f"accs[{name or owner!r}] shares memory with {what}")
            if end > reach:
                reach, owner = end, name
        jobs, quantized, rest = [], [], []
        for rec in records:
            if rec.kind == KIND_DENSE and _plain(rec) and rec.count and rec.value_code in _QUANTIZED_CODES:
                body, scales, bits = unchecked_quantized_parts(rec.value_code, rec.value_data, rec.count, rec.bucket)
                jobs.append((body, scales, bits, rec.count, rec.bucket, flats[rec.name], weight, True))
                quantized.append(rec)
            else:
                rest.append(rec)
        failed = _core.check_quantized_many(jobs) if jobs else None
        if failed is not None:
            _refuse_quantized(quantized[failed])
        decoded = [(flats[rec.name], sparse_parts(rec, parsed.seed)) for rec in rest]  # all decoded first

    def add() -> None:
        if jobs:
            _core.dequantize_many(jobs)
        for acc, (idx, values) in decoded:
            if idx is None:  # (no weighted copy for the weights of a sum and of a difference)
                if weight == 1.0 or weight == -1.0:
                    (np.add if weight > 0 else np.subtract)(acc, values, out=acc)
                else:
                    acc += np.float32(weight) * values
            else:
                _core.scatter_add(acc, idx, values, weight)

    return add


def _plain(rec: TensorRecord) -> bool:
    """Whether a float tensor's values are decoded by a kernel that writes where told:
    not rotated, not EDEN, not int codes."""
    return rec.eden is None and rec.intcode is None and not rec.rht_block


def decode_parts(
    payload: Any, *, limits: Limits = DEFAULT_LIMITS, table: Any = None
) -> dict[str, tuple[Optional[np.ndarray], np.ndarray]]:
    """What ``decode`` restores for each float tensor, without the dense copy of a sparse
    one: ``{name: (indices or None for dense, float32 values)}``, the values as
    ``decode`` gives them (rounded to the tensor's dtype, then widened to float32), in
    the flattened tensor. Raw (integer, bool) tensors are left out. An encoder's error
    feedback subtracts these from what it meant to send, in O(kept entries)."""
    with out_of_memory_as_decode_error():
        parsed = parse(payload, limits, table)
        out: dict[str, tuple[Optional[np.ndarray], np.ndarray]] = {}
        for rec in parsed.tensors:
            if rec.kind == KIND_RAW:
                continue
            idx, values = sparse_parts(rec, parsed.seed)
            out[rec.name] = idx, _to_output(values, rec.dtype).astype(np.float32, copy=False)
        return out


def inspect(payload: Any, *, limits: Limits = DEFAULT_LIMITS, table: Any = None) -> dict[str, Any]:
    """What a payload holds: codec, each tensor's name, shape, dtype, section kind
    and bytes, the raw (float32/original) size, the payload size and the ratio,
    whether the table travels inline or as a digest, and the table's digest.
    ``table`` as for ``decode``."""
    with out_of_memory_as_decode_error():
        parsed = parse(payload, limits, table)
    tensors = []
    raw = 0
    for rec in parsed.tensors:
        itemsize = 2 if rec.dtype == "bfloat16" else np.dtype(rec.dtype).itemsize
        raw += rec.size * itemsize
        tensors.append(
            {
                "name": rec.name,
                "shape": list(rec.shape),
                "dtype": rec.dtype,
                "kind": KIND_NAMES[rec.kind],
                "values": rec.value_code,
                "count": rec.count,
                "rotated": bool(rec.rht_block),
                "index_bytes": rec.index_len,
                "value_bytes": rec.value_len,
                "bytes": rec.index_len + rec.value_len,
                "raw_bytes": rec.size * itemsize,
            }
        )
        if rec.eden is not None:
            tensors[-1]["eden"] = {
                "bits": rec.eden.bits,
                "shared": rec.eden.shared,
                "mse_scale": rec.eden.mse,
                "rotation_seed": rec.eden.rotation_seed,
                "outliers": int(rec.eden.outlier_idx.size),
            }
        if rec.intcode is not None:
            levels = rec.intcode.levels
            tensors[-1]["int"] = {
                "bits": levels.bits,
                "modulus_bits": levels.modulus_bits,
                "width": rec.intcode.width,
                "masked": rec.intcode.masked,
                "clip": levels.clip,
                "rotation_seed": levels.rotation_seed,
            }
    size = parsed.payload_size
    digest = parsed.table_digest or heads_digest([entry_head(r.name, r.dtype, r.shape) for r in parsed.tensors])
    return {
        "codec": parsed.spec,
        "format_version": parsed.version,
        "zstd": bool(parsed.flags & FLAG_ZSTD),
        "table": "digest" if parsed.flags & FLAG_TABLE_DIGEST else "inline",
        "table_digest": digest.hex(),
        "seed": parsed.seed,
        "tensors": tensors,
        "raw_bytes": raw,
        "payload_bytes": size,
        "ratio": (raw / size) if size else 0.0,
    }
