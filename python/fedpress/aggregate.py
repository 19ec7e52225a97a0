"""The streaming server aggregator: one running sum per tensor, never a dense
copy per client for sparse payloads.

Payloads coded ``edenB:shared`` under the round's common rotation seed are summed
in the rotated domain (QUIC-FL, THC): each one is a table lookup per coordinate
added into a rotated running sum, and ``result()`` applies the inverse rotation
once, instead of once per client.

Payloads coded ``intB`` are summed in integers: exactly, in any order, or modulo 2^m
when secure aggregation masks them, until ``unmask`` removes the masks of the round's
surviving clients; ``result()`` decodes the mean once.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from functools import partial
from typing import Any, Optional

import numpy as np

from . import _core, ops
from ._arrays import flat_views
from ._update_math import to_dtype
from .format.decoding import (
    checked_streams,
    finish_checksum_converting,
    index_stream,
    index_streams,
    raw_array,
    sparse_parts,
    streamable,
)
from .format.eden import EdenSection, eden_unrotate
from .format.errors import DecodeError, out_of_memory_as_decode_error
from .format.intcodes import IntLevels, IntSection
from .format.limits import DEFAULT_LIMITS, MAX_INT_WEIGHT, Limits
from .format.reader import output_dtype, parse
from .format.registry import FLAG_ZSTD, KIND_DENSE, KIND_RAW, KIND_SPARSE, KIND_SPARSE_SEEDED
from .format.tables import CheckedTable, table_difference, table_entries
from .format.values import quantized_parts, unchecked_quantized_parts

__all__ = ["Aggregator"]

_FLOAT32_MAX = float(np.finfo(np.float32).max)
_FLOAT32_TINY = float(np.finfo(np.float32).smallest_subnormal)


def _add_scaled(acc: np.ndarray, values: np.ndarray, weight: float) -> None:
    """``acc += weight * values`` without a temporary: ``values`` (decoded for this sum,
    owned by it) is scaled in place."""
    if weight != 1.0:
        np.multiply(values, acc.dtype.type(weight), out=values)
    np.add(acc, values, out=acc)


def _fused_dense_add(
    rec: Any, acc: np.ndarray, weight: float, *, accumulate: bool = True
) -> Optional[Callable[[], Any]]:
    """The step that adds a dense tensor's values straight from its section (a kernel that
    decodes into the sum, no decoded copy; with ``accumulate=False`` it writes the sum),
    validated now; None where the values must be decoded first (their finiteness is not
    known until they are). Quantized codes times a checked finite scale are finite, and so
    is an eden section whose inverse rotation is bounded below float32's range."""
    if rec.eden is not None:
        if not rec.eden.rotation_bound() <= 1e38:
            return None
        return partial(rec.eden.add_to, acc, weight, accumulate=accumulate)
    if rec.rht_block or rec.value_code not in ("q8", "q4", "q2", "sign"):
        return None
    # The section's scales and padding are checked with the payload's others, in one call
    # (``_check_sections``), before any step runs.
    body, scales, bits = unchecked_quantized_parts(rec.value_code, rec.value_data, rec.count, rec.bucket)
    return _Dequantize((body, scales, bits, rec.count, rec.bucket, acc, weight, accumulate), rec)


class _Dequantize:
    """The step that dequantizes a dense tensor into its sum: ``_run`` runs those of many
    tensors in one kernel call (``_core.dequantize_many``, one parallel pass). ``rec``: the
    tensor, whose section ``_check_sections`` checks."""

    __slots__ = ("job", "rec")

    def __init__(self, job: tuple, rec: Any) -> None:
        self.job, self.rec = job, rec

    def __call__(self) -> None:
        _core.dequantize_many([self.job])


class _AddStream:
    """The step that adds a sparse tensor's index stream into its sum: ``_run`` adds those
    of many tensors in one kernel call (``_core.add_streams_each``)."""

    __slots__ = ("acc", "stream", "weight")

    def __init__(self, acc: np.ndarray, stream: Any, weight: float) -> None:
        self.acc, self.stream, self.weight = acc, stream, weight

    def __call__(self) -> None:
        _core.add_streams(self.acc, [self.stream], [self.weight])


def _check_sections(steps: Sequence[Callable[[], Any]], owners: Optional[Sequence[int]] = None) -> None:
    """DecodeError naming the first tensor, in step order, whose quantized section the
    decoder would refuse (a negative or non-finite scale, a padding bit set), in the
    decoder's words: every dequantizing step's section checked in one kernel call.
    ``owners``: each step's payload position, which the message then starts with."""
    pending = [j for j, step in enumerate(steps) if isinstance(step, _Dequantize)]
    failed = _core.check_quantized_many([steps[j].job for j in pending]) if pending else None  # type: ignore[attr-defined]
    if failed is None:
        return
    at = pending[failed]
    rec = steps[at].rec  # type: ignore[attr-defined]
    where = "" if owners is None else f"payload {owners[at]}: "
    try:
        quantized_parts(rec.value_code, rec.value_data, rec.count, rec.bucket)
    except DecodeError as exc:
        raise DecodeError(f"{where}tensor {rec.name!r}: {exc}") from None
    raise AssertionError(f"tensor {rec.name!r}: the kernel refused a section the decoder accepts")


def _refuse_masked(ints: Mapping[str, Any], advice: str) -> None:
    """ValueError when any of these int sums is masked by secure aggregation: its mean
    cannot be taken yet (``advice``: what to do first)."""
    masked = [name for name, one in ints.items() if one.masked]
    if masked:
        raise ValueError(f"the sums of {', '.join(map(repr, masked))} are masked by secure aggregation: {advice}")


def _run(steps: Sequence[Callable[[], Any]]) -> None:
    """Runs the steps in order, consecutive dequantizing steps in one kernel call each run
    (a sum met twice starts another call: two writers of one sum in a call would race), and
    consecutive stream additions in one call each run (grouped by sum, in order)."""
    batch: list[tuple] = []
    targets: set[int] = set()
    groups: dict[int, tuple[np.ndarray, list, list]] = {}

    def flush() -> None:
        if batch:
            _core.dequantize_many(batch)
            batch.clear()
            targets.clear()
        if groups:
            _core.add_streams_each(list(groups.values()))
            groups.clear()

    for step in steps:
        if isinstance(step, _Dequantize):
            if groups or id(step.job[5]) in targets:
                flush()
            batch.append(step.job)
            targets.add(id(step.job[5]))
        elif isinstance(step, _AddStream):
            if batch:
                flush()
            group = groups.setdefault(id(step.acc), (step.acc, [], []))
            group[1].append(step.stream)
            group[2].append(step.weight)
        else:
            flush()
            step()
    flush()


@dataclass
class _IntSum:
    """The running sum of one tensor's integer codes: what every client added shares
    (levels, code width, masked or not) and the total, sum of k * codes (uint64: exact,
    or residues modulo 2^m), each payload's weight being k * ``unit``. Plain codes take
    integer weights (example counts) as k, unit 1; residues add up with equal weights
    only (k = 1, unit the common weight): masked codes cannot be multiplied by the server."""

    levels: IntLevels
    width: int
    masked: bool
    total: np.ndarray
    unit: float
    multipliers: int = 0  # the sum of the payloads' k
    clients: int = 0
    support: Optional[tuple[int, int]] = None  # randk:R:shared: (tensor size, seed of the kept entries)

    @classmethod
    def starting(cls, sec: IntSection, weight: float, support: Optional[tuple[int, int]]) -> _IntSum:
        """An empty sum whose unit the first payload's weight sets (residues: weight over
        the weight its codes were multiplied by, which their payload records)."""
        if sec.modular:
            unit = weight / sec.weight
        else:
            unit = 1.0 if float(weight).is_integer() and 0 <= weight <= MAX_INT_WEIGHT else weight
        return cls(sec.levels, sec.width, sec.masked, np.zeros(sec.count, np.uint64), unit, support=support)

    def key(self) -> tuple:
        """What the payloads of one sum share."""
        return (self.levels, self.width, self.masked, self.support)

    @property
    def modular(self) -> bool:
        return self.width == self.levels.modulus_bits

    def describe(self) -> str:
        lv = self.levels
        mode = "masked" if self.masked else ("residues" if self.modular else "plain")
        support = "" if self.support is None else f", support seed {self.support[1]}"
        return f"int{lv.bits} clip={lv.clip!r} m={lv.modulus_bits} rotation {lv.rotation_seed}{support} ({mode})"

    def multiplier(self, weight: float, pending: int, recorded: int = 1) -> int:
        """The k of a payload of ``weight`` whose codes were multiplied by ``recorded`` (ValueError
        when the weight does not fit the sum), checked that the sum, ``pending`` multipliers
        already promised, cannot overflow: 63 bits, or for residues half the modulus."""
        if self.modular:
            k = recorded
            if weight != k * self.unit:
                raise ValueError(
                    f"masked int codes weigh what their payload records ({k} x {self.unit!r}), "
                    f"not {weight!r}: the server cannot multiply them"
                )
        elif weight == self.unit:
            k = 1
        elif self.unit == 1.0 and float(weight).is_integer() and 0 <= weight <= MAX_INT_WEIGHT:
            k = int(weight)
        else:
            raise ValueError(
                "int codes add up exactly with integer weights (example counts) or equal weights: "
                f"weight {weight!r} does not fit the sum's"
            )
        total = self.multipliers + pending + k
        top = (1 << self.levels.bits) - 1
        if self.modular and total * top >= 1 << (self.levels.modulus_bits - 1):
            raise ValueError(
                f"a sum of total weight {total} would wrap the {self.levels.modulus_bits}-bit residues: "
                f"the codec's nmax must be at least {total}"
            )
        if total * top >= 1 << 63:
            raise ValueError("the weights of this int sum are too large to sum in 63 bits")
        return k

    def add(self, sec: IntSection, k: int) -> None:
        codes = sec.codes()
        if k != 1 and not self.modular:  # residues come multiplied by their client
            np.multiply(codes, np.uint64(k), out=codes)
        np.add(self.total, codes, out=self.total)  # uint64 wraps modulo 2^64: fine modulo 2^m
        if self.modular:
            np.bitwise_and(self.total, np.uint64((1 << self.levels.modulus_bits) - 1), out=self.total)
        self.multipliers += k
        self.clients += 1

    def weighted_sum(self) -> np.ndarray:
        """The float32 sum of the clients' values times their weights, unrotated (and put
        back in place, for a shared random-k support)."""
        kept = self.levels.values_of_residues(
            self.total, self.levels.modulus_bits if self.modular else 0, self.multipliers, self.unit
        )
        if self.support is None:
            return kept
        size, seed = self.support
        dense = np.zeros(size, np.float32)
        dense[ops.randomk_indices(size, kept.size, seed).astype(np.intp)] = kept
        return dense


class Aggregator:
    """Weighted mean of many payloads: ``agg.add(payload, weight)``, then ``agg.result()``.

    Each payload is validated in full, and everything it needs allocated, before
    the sums change, so a malformed one (or one whose tensor table disagrees with
    the first, or whose output this process cannot allocate) raises DecodeError
    and leaves the aggregate as it was. Sparse sections are scattered straight
    into the float32 (or float64, ``dtype=np.float64``) sums.

    ``table`` (as for ``fedpress.table_digest``: the model, or a list of (name,
    dtype name, shape)) is the model every payload must be made for, and lets the
    aggregator read payloads encoded with ``table="digest"`` from the first one on.
    Without it the aggregator learns the table from the first payload that carries
    one, and then reads digest payloads that match it.

    A weight (an example count, say) must be finite and >= 0; with float32 sums, also
    0 or within float32's range, since the sums are multiplied by it in float32
    (ValueError otherwise, naming ``dtype=np.float64``, which takes any).
    """

    def __init__(self, dtype: Any = np.float32, limits: Limits = DEFAULT_LIMITS, table: Any = None) -> None:
        self.dtype = np.dtype(dtype)
        if self.dtype not in (np.float32, np.float64):
            raise ValueError(f"dtype must be float32 or float64, got {self.dtype}")
        self.limits = limits
        # The receiver's model: kept across reset(), unlike the table learned from payloads.
        self._model: Optional[list[tuple[str, str, tuple]]] = None if table is None else table_entries(table)
        self._sums: dict[str, np.ndarray] = {}
        # name -> (rotation seed, rotation block, values, float32 rotated sum)
        self._rotated: dict[str, tuple[int, int, int, np.ndarray]] = {}
        self._table: Optional[list[tuple[str, str, tuple]]] = None
        self._ints: dict[str, _IntSum] = {}  # intB tensors: their integer sums
        self.count = 0
        self.total_weight = 0.0

    def _weight(self, weight: Any, what: str) -> float:
        """A payload's weight as a float: ValueError unless it is finite, >= 0 and, for
        float32 sums, 0 or within float32's range (the sums are multiplied by it in float32,
        where a larger one would turn them into infinities and NaN, and a positive one that
        rounds to 0 would add nothing while counting in the total: a NaN mean)."""
        w = float(weight)
        if not np.isfinite(w) or w < 0:
            raise ValueError(f"{what} must be finite and >= 0, got {weight!r}")
        if self.dtype == np.float32 and (w > _FLOAT32_MAX or (w > 0 and np.float32(w) == 0)):
            raise ValueError(
                f"{what} is {w:.3g}, beyond float32's range ({_FLOAT32_TINY:.3g} to {_FLOAT32_MAX:.3g}), the "
                "dtype of this aggregator's sums (a smaller one would count in the total and add nothing): "
                "scale the weights, or use Aggregator(dtype=np.float64)"
            )
        return w

    def add(self, payload: Any, weight: float = 1.0) -> None:
        w = self._weight(weight, "weight")
        with out_of_memory_as_decode_error():
            fresh = self._table is None
            # The payload must match the table this aggregator sums (parse checks it). Into
            # new float32 sums, an uncompressed payload's plain dense sections are written, times
            # the weight, as its checksum reads them (one read of the payload, as decode makes).
            parsed = parse(
                payload,
                self.limits,
                self._table if self._table is not None else self._model,
                defer_checksum=fresh and self.dtype == np.float32,
            )
            # Everything that allocates comes first: a payload that fails, malformed or beyond
            # this process's memory, leaves the aggregate as it was.
            sums = self._sums
            # fresh: unwritten, each step writes its sum, or has it zeroed first
            sums = self._float_sums({} if fresh else sums, [parsed], np.empty if fresh else np.zeros)
            written: dict[str, np.ndarray] = {}
            if parsed.unchecked is not None:
                outs = {id(rec): sums[rec.name] for rec in parsed.tensors if rec.intcode is None}
                written, _ = finish_checksum_converting(parsed, [], convert_dense=True, outs=outs, weight=w)
            new_ints, int_steps = self._int_steps([parsed], [w], fresh)
            new_rotated: dict[str, tuple[int, int, int, np.ndarray]] = {}
            steps: list[Callable[[], Any]] = []
            streams = index_streams(
                [
                    rec
                    for rec in parsed.tensors
                    if rec.intcode is None and streamable(rec) and sums[rec.name].dtype == np.float32
                ]
            )
            try:
                for rec in parsed.tensors:
                    if rec.intcode is None and rec.name not in written:
                        acc = sums[rec.name]
                        steps.append(self._prepare(rec, parsed.seed, w, acc, new_rotated, fresh=fresh, streams=streams))
            except DecodeError:
                _check_sections(steps)  # an earlier tensor's bad section is the first error
                raise
            _check_sections(steps)
            steps += int_steps
            self._ints = new_ints
            # (the same table as before, if any: the payload matched it)
            table = (
                self._table
                if self._table is not None
                else CheckedTable((t.name, t.dtype, t.shape) for t in parsed.tensors)
            )
            self._rotated.update(new_rotated)
            _run(steps)  # in place, allocating nothing sized by the payload
        self._table, self._sums = table, sums
        self.count += 1
        self.total_weight += w

    def add_many(self, payloads: Sequence[Any], weights: Optional[Sequence[float]] = None) -> None:
        """Adds many payloads in one call, as ``add`` each would, faster: payloads are
        checked in parallel threads, and the sparse tensors of all of them are summed
        together, cache-blocked, instead of one scatter per payload. A version 2 index
        stream is checked right after its payload's checksum and decoded as it is added,
        never into an array; other sparse tensors (version 1 payloads, random-k, rotated)
        are decoded first into two buffers for the batch and added by
        ``ops.scatter_add_many``. Every payload is checked (and decoded where it must be)
        before any sum changes: a bad one raises DecodeError naming its position and
        nothing is added. It never holds a dense copy per payload."""
        self._add_many(payloads, weights, mean=False)

    def mean_of(self, payloads: Sequence[Any], weights: Optional[Sequence[float]] = None) -> dict[str, np.ndarray]:
        """``add_many(payloads, weights)`` then ``result(copy=False)``, the same arrays bit for
        bit, with one pass over the sums less: a tensor every payload sends as a version 2
        index stream (top-k and thresholded sparsifiers, whatever their value code) is divided
        by the total weight range by range, right after the range's last addition, while it
        is in cache, instead of in a pass of its own afterwards. The one call a FedAvg server
        that holds a round's payloads makes. It either returns the mean, the aggregator then
        empty (as after ``result(copy=False)``), or raises with nothing added: DecodeError for
        a bad payload, ValueError for bad weights, a total weight of zero, or sums masked by
        secure aggregation (those take add_many, unmask, then result)."""
        payloads = list(payloads)
        divided = self._add_many(payloads, weights, mean=True)
        if not payloads:
            return self.result(copy=False)
        with out_of_memory_as_decode_error():
            assert self._table is not None
            return self._result(self._table, False, divided)

    def _add_many(self, payloads: Sequence[Any], weights: Optional[Sequence[float]], mean: bool) -> frozenset[str]:
        """add_many; with ``mean``, the sums that can be are also divided by the total weight
        they then hold, in the pass that adds to them: their names (result skips them)."""
        payloads = list(payloads)
        ws = [1.0] * len(payloads) if weights is None else [float(w) for w in weights]
        if len(ws) != len(payloads):
            raise ValueError(f"{len(payloads)} payloads but {len(ws)} weights")
        for i, w in enumerate(ws):
            self._weight(w, f"weight {i}")
        if not payloads:
            return frozenset()
        stream = self.dtype == np.float32
        prior = {} if self._table is None else self._sums

        def streams_into(rec: Any) -> bool:
            """Added straight from its index stream: into a float32 sum (as add), new or not (a
            float64 one, from add_update or merge, takes the tensor decoded)."""
            return stream and streamable(rec) and (rec.name not in prior or prior[rec.name].dtype == np.float32)

        with out_of_memory_as_decode_error(), ThreadPoolExecutor(max_workers=max(1, ops.get_num_threads())) as pool:
            table = self._table if self._table is not None else self._model

            def parse_one(i: int) -> Any:
                try:
                    return parse(payloads[i], self.limits, table, defer_checksum=True)
                except DecodeError as exc:
                    return DecodeError(f"payload {i}: {exc}")

            try:  # (checked by kind, not in order: on a failure, the first bad one in order is found)
                first = parse_one(0)
                if isinstance(first, DecodeError):
                    raise first
                if table is None:  # the first payload sets the table for the others
                    table = CheckedTable((t.name, t.dtype, t.shape) for t in first.tensors)
                # Compressed bodies are inflated in the pool's threads (zstd lets go of the GIL
                # while it works, and checksums them first natively): 100 top-1% q4+zstd payloads,
                # 30 -> 17 ms. Plain ones parse faster in this thread than handed about.
                rest = range(1, len(payloads))
                parsed = [first, *(pool.map(parse_one, rest) if first.flags & FLAG_ZSTD else map(parse_one, rest))]
                # Up to the first that fails to parse, the payloads' checksums and index streams
                # are checked in one call, in parallel: the first failure in order is reported.
                broken = next((i for i, one in enumerate(parsed) if isinstance(one, DecodeError)), len(parsed))
                checks = checked_streams(
                    [(one, [rec for rec in one.tensors if streams_into(rec)]) for one in parsed[:broken]]
                )
                streams: list[dict[str, Any]] = []
                for i, result in enumerate(checks):
                    if isinstance(result, DecodeError):
                        raise DecodeError(f"payload {i}: {result}") from None
                    streams.append(result)
                if broken < len(parsed):
                    raise parsed[broken]
                sums = self._sums
                new_ints, int_steps = self._int_steps(parsed, ws, self._table is None)
                total = self.total_weight + sum(ws)
                if mean:  # what result would refuse, refused before anything is added
                    _refuse_masked(
                        new_ints,
                        "add them with add_many, apply the round's correction (Aggregator.unmask), then result",
                    )
                    if not total > 0:
                        raise ValueError("the total weight is zero")
                sums = self._float_sums({} if self._table is None else sums, parsed, np.zeros)
                # The other sparse float32 tensors go into two buffers allocated once (many small
                # arrays would each fault their pages in, one large one takes huge pages).
                batched = [
                    (i, rec)
                    for i, one in enumerate(parsed)
                    for rec in one.tensors
                    if rec.kind in (KIND_SPARSE, KIND_SPARSE_SEEDED)
                    and rec.eden is None
                    and rec.intcode is None
                    and sums[rec.name].dtype == np.float32
                    and rec.name not in streams[i]
                ]
                starts = np.cumsum([0] + [rec.count for _, rec in batched])
                all_idx = np.empty(int(starts[-1]), np.uint32)
                all_val = np.empty(int(starts[-1]), np.float32)

                def decode_one(j: int) -> tuple[Optional[np.ndarray], np.ndarray]:
                    i, rec = batched[j]
                    into = (all_idx[starts[j] : starts[j + 1]], all_val[starts[j] : starts[j + 1]])
                    return sparse_parts(rec, parsed[i].seed, into)

                try:
                    decoded = list(pool.map(decode_one, range(len(batched))))
                except DecodeError as exc:
                    raise DecodeError(f"in a batch of {len(payloads)} payloads: {exc}") from None
                new_rotated: dict[str, tuple[int, int, int, np.ndarray]] = {}
                steps: list[Callable[[], Any]] = []
                skip = {(i, rec.name) for i, rec in batched}
                # A tensor that some payloads send one way (dense, say) and others another (a
                # stream) is summed step by step in payload order, as adding them one by one would.
                routes: dict[str, set[int]] = {}
                for i, one in enumerate(parsed):
                    for rec in one.tensors:
                        if rec.intcode is None:
                            route = 0 if rec.name in streams[i] else 1 if (i, rec.name) in skip else 2
                            routes.setdefault(rec.name, set()).add(route)
                mixed = {name for name, seen in routes.items() if len(seen) > 1}
                decoded_at = {(i, rec.name): parts for (i, rec), parts in zip(batched, decoded)}
                owners: list[int] = []  # each step's payload, for the messages
                for i, one in enumerate(parsed):
                    for rec in one.tensors:
                        if rec.intcode is not None:
                            continue
                        acc = sums[rec.name]
                        if rec.name in streams[i] or (i, rec.name) in skip:
                            if rec.name not in mixed:
                                continue  # summed with the other payloads' below
                            if rec.name in streams[i]:
                                steps.append(_AddStream(acc, streams[i][rec.name], ws[i]))
                            else:
                                idx, values = decoded_at[(i, rec.name)]
                                steps.append(partial(ops.scatter_add, acc, idx, values, ws[i]))
                        else:
                            try:
                                steps.append(self._prepare(rec, one.seed, ws[i], acc, new_rotated))
                            except DecodeError as exc:
                                _check_sections(steps, owners)  # an earlier tensor's bad section is the first error
                                raise DecodeError(f"payload {i}: {exc}") from None
                        owners.append(i)
                _check_sections(steps, owners)
            except DecodeError as exc:
                raise self._first_bad(payloads, ws, exc) from None
            groups: dict[str, tuple[list, list, list]] = {}
            for (i, rec), (idx, values) in zip(batched, decoded):
                if rec.name in mixed:
                    continue
                g = groups.setdefault(rec.name, ([], [], []))
                g[0].append(idx)
                g[1].append(values)
                g[2].append(ws[i])
            stream_groups: dict[str, tuple[list, list]] = {}
            for i, by_name in enumerate(streams):
                for name, checked in by_name.items():
                    if name in mixed:
                        continue
                    g2 = stream_groups.setdefault(name, ([], []))
                    g2[0].append(checked)
                    g2[1].append(ws[i])
            # Divided in the adding pass: a float32 tensor summed from streams only, with no
            # int or rotated parts that result would add to it first (decided before any sum
            # changes: nothing below refuses).
            wire = {t.name: t.dtype for t in parsed[0].tensors}
            divided = frozenset(
                name
                for name in stream_groups
                if mean
                and 0 < total < float("inf")
                and not new_ints
                and wire[name] == "float32"
                and name not in self._rotated
                and name not in new_rotated
            )
            self._rotated.update(new_rotated)
            self._ints = new_ints
            _run(steps + int_steps)
            if stream_groups:
                _core.add_streams_each(
                    [
                        (sums[name], *group, total) if name in divided else (sums[name], *group)
                        for name, group in stream_groups.items()
                    ]
                )
            for name, (idx_list, val_list, w_list) in groups.items():
                ops.scatter_add_many(sums[name], idx_list, val_list, w_list)
        self._table = table  # that of the first payload, every other one matched
        self._sums = sums
        self.count += len(payloads)
        self.total_weight = total
        return divided

    def _first_bad(self, payloads: Sequence[Any], weights: Sequence[float], found: DecodeError) -> DecodeError:
        """The error ``add`` would meet first, adding the payloads one by one (in order, each
        one's tensors in table order), for a batch that failed with ``found``: add_many checks
        by kind (checksums and streams of every payload, then sections), not in that order.
        Each payload is added in turn to a scratch aggregator, nothing of this one changes."""
        # The payload ``found`` names: none after it needs trying (and what only this
        # aggregator's sums refuse, int sums of other levels say, the probe cannot see).
        named = re.match(r"payload (\d+): ", str(found))
        last = int(named.group(1)) if named else len(payloads) - 1
        probe = Aggregator(self.dtype, self.limits, table=self._table if self._table is not None else self._model)
        for i, (payload, w) in enumerate(zip(payloads[: last + 1], weights)):
            try:
                probe.add(payload, w)
            except DecodeError as exc:
                return DecodeError(f"payload {i}: {exc}")
            if self._ints:  # and what this aggregator's int sums refuse (the probe has none of them)
                try:
                    self._int_steps([parse(payload, self.limits, probe._table)], [w], False)
                except DecodeError as exc:  # (its message names the payload as the batch's first)
                    return DecodeError(f"payload {i}: {str(exc).removeprefix('payload 0: ')}")
        return found

    def add_update(self, update: Any, weight: float = 1.0) -> None:
        """Adds an update that is already decoded, ``{name: numpy array}``:
        what a server that had to decode a payload anyway (to clip its norm) adds,
        instead of decoding it a second time. Its tensors must be those of the table
        summed so far (or of the ``table`` given to the constructor): DecodeError
        otherwise, and the aggregate is left as it was."""
        w = self._weight(weight, "weight")
        if not isinstance(update, Mapping):
            raise TypeError(f"update must be a mapping of names to arrays, got {type(update).__name__}")
        arrays = {name: np.asarray(value) for name, value in update.items()}
        table = table_entries(arrays)
        expected = self._table if self._table is not None else self._model
        if expected is not None and table != expected:
            raise DecodeError(
                table_difference(
                    expected, table, "the first payload" if self._table is not None else "the receiver's model"
                )
            )
        with out_of_memory_as_decode_error():
            sums = self._sums
            if self._table is None:
                sums = {
                    name: np.zeros(a.size, self.dtype if a.dtype == np.float32 or a.dtype == np.float16 else np.float64)
                    for name, a in arrays.items()
                }
            for name, a in arrays.items():  # the sums exist: nothing below allocates a failure
                acc = sums[name]
                np.add(acc, a.reshape(-1).astype(acc.dtype, copy=False) * acc.dtype.type(w), out=acc)
        self._table, self._sums = table, sums
        self.count += 1
        self.total_weight += w

    def _int_steps(
        self, batch: Sequence[Any], weights: Sequence[float], fresh: bool
    ) -> tuple[dict[str, _IntSum], list[Callable[[], Any]]]:
        """The integer sums a batch of parsed payloads adds to (this aggregator's, and new
        ones allocated) and the steps that add them, once every payload of the batch is
        checked: DecodeError when a payload's intB tensor does not add up with the sum
        (other levels, clip, modulus, rotation or masking), ValueError for weights the sum
        cannot take (see ``_IntSum``). A tensor may also have float payloads, summed apart
        and combined by ``result``. Nothing of this aggregator changes here."""
        ints = {} if fresh else dict(self._ints)
        pending: dict[str, int] = {}  # multipliers the batch adds to each sum
        steps: list[Callable[[], Any]] = []
        for i, parsed in enumerate(batch):
            for rec in parsed.tensors:
                sec = rec.intcode
                if sec is None:
                    continue
                support = None
                if rec.kind != KIND_DENSE:
                    if rec.kind != KIND_SPARSE_SEEDED or sec.support_seed is None:
                        raise DecodeError(f"payload {i}: tensor {rec.name!r}: sparse int codes do not add up")
                    support = (rec.size, sec.support_seed)
                current = ints.get(rec.name)
                if current is None:
                    current = ints[rec.name] = _IntSum.starting(sec, weights[i], support)
                theirs = _IntSum(sec.levels, sec.width, sec.masked, current.total, current.unit, support=support)
                if current.key() != theirs.key() or current.total.size != sec.count:
                    raise DecodeError(
                        f"payload {i}: tensor {rec.name!r}: {theirs.describe()} does not add up with the "
                        f"sum's {current.describe()}"
                    )
                try:
                    k = current.multiplier(weights[i], pending.get(rec.name, 0), sec.weight)
                except ValueError as exc:
                    raise ValueError(f"payload {i}: tensor {rec.name!r}: {exc}") from None
                pending[rec.name] = pending.get(rec.name, 0) + k
                steps.append(partial(current.add, sec, k))
        return ints, steps

    def _float_sums(
        self, sums: dict[str, np.ndarray], batch: Sequence[Any], make: Callable[..., np.ndarray]
    ) -> dict[str, np.ndarray]:
        """``sums``, with a new one (``make``: np.zeros, or np.empty for steps that write
        it) for each tensor that a payload of the batch sends as floats and that has none:
        a tensor whose payloads were all int codes so far has no float sum."""
        new: dict[str, tuple[int, Any]] = {}
        for parsed in batch:
            for rec in parsed.tensors:
                if rec.intcode is None and rec.name not in sums and rec.name not in new:
                    new[rec.name] = (rec.size, np.float64 if rec.kind == KIND_RAW else self.dtype)
        for dtype in {d for _, d in new.values()}:  # one allocation per dtype for a model's tensors
            names = [name for name, (_, d) in new.items() if d == dtype]
            sums.update(zip(names, flat_views([new[name][0] for name in names], dtype, make)))
        return sums

    @property
    def masked_length(self) -> int:
        """How many codes the secure-aggregation correction covers: those of the masked
        int tensors, concatenated in table order."""
        return sum(s.total.size for s in self._masked_sums())

    def _masked_sums(self) -> list[_IntSum]:
        order = [name for name, _, _ in self._table or []]
        return [self._ints[name] for name in order if name in self._ints and self._ints[name].masked]

    def unmask(self, correction: Any) -> None:
        """Removes secure aggregation's masks from the masked int sums: ``correction``
        (uint64, ``masked_length`` residues modulo 2^m, the masked tensors concatenated in
        table order) is what ``fedpress.secagg``'s server computes from the round's
        surviving clients; the sums then hold the plain sum of their codes."""
        masked = self._masked_sums()
        if not masked:
            raise ValueError("no masked int sum to unmask")
        c = np.asarray(correction)
        if c.dtype != np.uint64 or c.shape != (self.masked_length,):
            raise ValueError(f"correction must be {self.masked_length} uint64 values, got {c.dtype} {c.shape}")
        start = 0
        for one in masked:
            part = c[start : start + one.total.size]
            start += one.total.size
            m = one.levels.modulus_bits
            if part.size and int(part.max()) >> m:
                raise ValueError(f"correction values must be residues modulo 2^{m}")
        start = 0
        for one in masked:
            part = c[start : start + one.total.size]
            start += one.total.size
            one.total -= part  # uint64 wraps modulo 2^64: fine modulo 2^m
            np.bitwise_and(one.total, np.uint64((1 << one.levels.modulus_bits) - 1), out=one.total)
            one.masked = False

    def _prepare(
        self,
        rec: Any,
        seed: int,
        weight: float,
        acc: np.ndarray,
        new_rotated: dict[str, tuple[int, int, int, np.ndarray]],
        *,
        fresh: bool = False,
        streams: Optional[dict[int, Any]] = None,
    ) -> Callable[[], Any]:
        """Decodes one tensor; returns the step that adds it, times ``weight``, to ``acc``
        (or to its rotated-domain sum, a new one going into ``new_rotated``). ``fresh``:
        ``acc`` is a new, unwritten sum: a dense section's kernel writes it (one pass, no
        read of zero pages), every other step has it zeroed here first. ``streams``: checked
        index streams made for a batch of tensors (``index_streams``), by record id."""
        if (
            fresh
            and rec.kind == KIND_DENSE
            and acc.dtype == np.float32
            and not self._sums_rotated(rec, new_rotated)
            and (write := _fused_dense_add(rec, acc, weight, accumulate=False))
        ):
            return write
        if fresh:
            acc.fill(0)
        if rec.kind == KIND_RAW:
            idx, values = None, raw_array(rec).reshape(-1)
        elif self._sums_rotated(rec, new_rotated):
            sec = rec.eden
            if rec.name not in self._rotated and rec.name not in new_rotated:
                new_rotated[rec.name] = (sec.rotation_seed, sec.block, sec.n, np.zeros(sec.n, np.float32))
            sec.outlier_correction()  # made now, used by the step
            return partial(self._add_rotated, rec.name, sec, weight)
        elif rec.kind == KIND_DENSE and acc.dtype == np.float32 and (add := _fused_dense_add(rec, acc, weight)):
            return add
        elif acc.dtype == np.float32 and streamable(rec):
            stream = None if streams is None else streams.get(id(rec))
            return _AddStream(acc, index_stream(rec) if stream is None else stream, weight)
        else:
            idx, values = sparse_parts(rec, seed)
        if idx is None:
            values = values.astype(acc.dtype, copy=False)
            if weight != 1.0 and not (values.flags.writeable and values.flags.owndata):
                values = values * acc.dtype.type(weight)  # a view of the payload: scaled on a copy, now
                weight = 1.0
            return partial(_add_scaled, acc, values, weight)
        if acc.dtype == np.float32:
            return partial(ops.scatter_add, acc, idx, values, weight)
        return partial(np.add.at, acc, idx.astype(np.intp), values.astype(np.float64) * weight)

    def _sums_rotated(self, rec: Any, pending: Optional[dict] = None) -> bool:
        """Whether a tensor joins the rotated-domain sum: a dense shared-mode eden section
        whose rotation matches the one already summed, or about to be (``pending``: the
        sums a batch creates), or the first one."""
        sec = rec.eden
        if sec is None or not sec.shared or rec.kind != KIND_DENSE or self.dtype != np.float32 or sec.n == 0:
            return False
        if not sec.rotation_bound() <= 1e38:
            return False  # could overflow: decode it, whose finiteness check rejects what must be
        current = self._rotated.get(rec.name)
        if current is None and pending:
            current = pending.get(rec.name)
        return current is None or current[:3] == (sec.rotation_seed, sec.block, sec.n)

    def _add_rotated(self, name: str, sec: EdenSection, weight: float) -> None:
        """Adds a section to its tensor's rotated-domain sum, in place."""
        sec.accumulate(self._rotated[name][3], weight)

    def _unrotated(self, name: str, *, consume: bool = False) -> Optional[np.ndarray]:
        """The rotated-domain sum of a tensor brought back: one inverse transform, in place
        on the sum itself when ``consume`` (the aggregator is being emptied)."""
        current = self._rotated.get(name)
        if current is None:
            return None
        seed, block, n, acc = current
        return eden_unrotate(acc if consume else acc.copy(), seed, block)

    def merge(self, other: Aggregator) -> None:
        """Adds another aggregator's sums (hierarchical aggregation)."""
        if not isinstance(other, Aggregator):
            raise TypeError(f"can only merge an Aggregator, got {type(other).__name__}")
        if other._table is None:
            return
        for name, theirs in other._ints.items():  # checked before anything is merged
            ours = self._ints.get(name)
            if ours is None:
                continue
            if ours.key() != theirs.key():
                raise DecodeError(f"tensor {name!r}: {theirs.describe()} does not add up with {ours.describe()}")
            if ours.unit != theirs.unit:
                raise ValueError(f"tensor {name!r}: int sums of weight units {theirs.unit!r} and {ours.unit!r}")
        if self._table is None:
            if self._model is not None and other._table != self._model:
                raise DecodeError(table_difference(self._model, other._table, "the receiver's model"))
            self._table = CheckedTable(other._table)
            self._sums = {k: v.astype(np.result_type(v.dtype, self.dtype)) for k, v in other._sums.items()}
        else:
            if other._table != self._table:
                raise DecodeError(table_difference(self._table, other._table, "the first payload"))
            for k, v in other._sums.items():
                self._sums[k] += v.astype(self._sums[k].dtype, copy=False)
        for name, theirs in other._ints.items():
            ours = self._ints.get(name)
            if ours is None:
                self._ints[name] = _IntSum(
                    theirs.levels,
                    theirs.width,
                    theirs.masked,
                    theirs.total.copy(),
                    theirs.unit,
                    theirs.multipliers,
                    theirs.clients,
                    theirs.support,
                )
                continue
            ours.total += theirs.total
            if ours.modular:
                np.bitwise_and(ours.total, np.uint64((1 << ours.levels.modulus_bits) - 1), out=ours.total)
            ours.multipliers += theirs.multipliers
            ours.clients += theirs.clients
        for name, (seed, block, n, acc) in other._rotated.items():
            mine = self._rotated.get(name)
            if mine is None and self.dtype == np.float32:
                self._rotated[name] = (seed, block, n, acc.copy())
            elif mine is not None and mine[:3] == (seed, block, n):
                np.add(mine[3], acc, out=mine[3])
            else:  # summed under another rotation: bring it back first
                self._sums[name] += eden_unrotate(acc.copy(), seed, block).astype(self._sums[name].dtype, copy=False)
        self.count += other.count
        self.total_weight += other.total_weight

    def result(self, *, copy: bool = True) -> dict[str, np.ndarray]:
        """The weighted mean of everything added, ``{name: array}`` in the original shapes.

        With ``copy=False`` the running sums are divided in place and handed
        over, so no second model-sized buffer is allocated; the aggregator is
        then empty again (``count`` 0), ready for the next round. An output this
        process cannot allocate raises DecodeError, as ``add`` does.
        """
        if self._table is None:
            raise ValueError("no payload was added")
        if self.total_weight <= 0:
            raise ValueError("the total weight is zero")
        with out_of_memory_as_decode_error():
            return self._result(self._table, copy)

    def _result(
        self, table: list[tuple[str, str, tuple]], copy: bool, divided: frozenset[str] = frozenset()
    ) -> dict[str, np.ndarray]:
        """result; the sums named in ``divided`` already hold their means (mean_of)."""
        out = {}
        _refuse_masked(self._ints, "apply the round's correction first (Aggregator.unmask)")
        for name, dtype, shape in table:
            in_place = not copy  # whether acc may be divided where it lies
            acc = self._sums.get(name)
            if name in self._ints:
                part = self._ints[name].weighted_sum().astype(self.dtype, copy=False)
                # float payloads of the same tensor, if any, were summed apart
                acc = part if acc is None else (acc + part if copy else np.add(acc, part, out=acc))
                in_place = True  # a new array, or the sums handed over
            assert acc is not None
            unrotated = self._unrotated(name, consume=not copy)
            if unrotated is not None:
                acc = np.add(acc, unrotated, out=acc) if in_place else acc + unrotated
                in_place = True
            if dtype in ("float32", "float16", "float64", "bfloat16"):
                target = self.dtype if dtype == "float32" else output_dtype(dtype)
                if not in_place:
                    mean = np.divide(acc, acc.dtype.type(self.total_weight), dtype=acc.dtype)
                else:
                    mean = acc
                    if name in divided:  # divided as it was summed (mean_of)
                        pass
                    elif mean.dtype == np.float32 and mean.flags.c_contiguous:
                        _core.divide(mean.reshape(-1), self.total_weight)  # in parallel, the same bits
                    else:
                        mean /= acc.dtype.type(self.total_weight)
                out[name] = to_dtype(mean, target).reshape(shape)  # float16 saturates
            else:
                # Integers: the mean rounded and clamped to the type's range; bool: the majority.
                out[name] = to_dtype(acc / self.total_weight, dtype).reshape(shape)
        if not copy:
            self.reset()
        return out

    def reset(self) -> None:
        """Forgets everything added (the tensor table learned from payloads too; a
        ``table`` given to the constructor stays)."""
        self._sums = {}
        self._rotated = {}
        self._ints = {}
        self._table = None
        self.count = 0
        self.total_weight = 0.0
