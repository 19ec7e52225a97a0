"""The checks the fuzz harnesses (fuzz/fuzz_payload.py, fuzz/fuzz_frames.py) run on
every input, shared with tests/test_fuzz_corpus.py, which replays the committed
corpus (fuzz/corpus/) through them without atheris.

This module lives in tests/ (next to conftest.py, not collected: its name does not
start with ``test_``) so the replay test imports it like conftest's helpers; the
harnesses put tests/ on sys.path. It needs fedpress and numpy only (no pytest, no
atheris).

Contract of each check: it returns when the input was handled correctly (decoded,
or refused with the one allowed exception) and raises :class:`Finding` otherwise:

  payloads  fedpress.decode / inspect / payload_table_digest / Aggregator.add + result,
            with and without ``table=`` (the small model of :func:`small_update`), and
            decode under small Limits as well as the default ones: success
            or ``fedpress.DecodeError``. Anything else (IndexError, struct.error,
            OverflowError, MemoryError, ...) is a finding; so is a broken invariant
            between the entry points (decode succeeds but inspect or Aggregator.add
            refuses the same bytes, names or shapes disagree, ...).
  frames    fedpress.federation.protocol: read_frame over a StreamReader holding the
            bytes, then EOF (a small max_body), Hello/Auth/Welcome/Task/Update.unpack,
            unpack_error, unpack_text, loads_json and FrameOpener(KEY).open: success or
            ProtocolError (its subclasses included); read_frame may also raise
            ConnectionClosed, its documented answer to EOF in or before a frame.
            A value that unpacks must pack and unpack to the same value again.

Warnings raised while checking are errors (as under the test suite's
filterwarnings=error), so a numpy RuntimeWarning on hostile input is a finding.

Every check runs with the address space capped at its current size plus
MEMORY_CAP_EXTRA (Linux), so an input that makes the decoder allocate gigabytes
raises MemoryError at once (a finding) instead of swapping the machine.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import sys
import traceback
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Callable, Optional

import fedpress as fp
import numpy as np
from conftest import capped_memory as _conftest_capped_memory
from fedpress.federation import protocol as P
from fedpress.format import payload_table_digest

ROOT = Path(__file__).resolve().parent.parent
CORPUS = ROOT / "fuzz" / "corpus"
PAYLOAD_CORPUS = CORPUS / "payload"
FRAMES_CORPUS = CORPUS / "frames"

MEMORY_CAP_EXTRA = 1 << 30  # bytes of address space a check may add
FRAME_MAX_BODY = 8192  # read_frame's limit: small, so FrameTooLarge is reachable
FRAMES_PER_INPUT = 4  # frames read_frame reads from one input at most
KEY = bytes(range(32))  # the sealing key of the frames harness (seeds are sealed with it)


class Finding(AssertionError):
    """An input made a decoder misbehave. ``signature`` names the bug (entry point,
    exception type, innermost fedpress source line), for deduplication."""

    def __init__(self, what: str, message: str, signature: str) -> None:
        super().__init__(f"{what}: {message}")
        self.what = what
        self.signature = signature


def _signature(what: str, exc: BaseException) -> str:
    where = ""
    for frame in traceback.extract_tb(exc.__traceback__):
        if "fedpress" in frame.filename or "federation" in frame.filename:
            where = f"{Path(frame.filename).name}:{frame.lineno}"
    return f"{what}|{type(exc).__name__}|{where}"


def _unexpected(what: str, exc: BaseException) -> Finding:
    return Finding(what, f"{type(exc).__name__} instead of the allowed exception: {exc}", _signature(what, exc))


def _broken(what: str, message: str) -> Finding:
    return Finding(what, f"invariant broken: {message}", f"{what}|invariant|{message.split(':')[0]}")


def _attempt(what: str, allowed: tuple, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> tuple[bool, Any]:
    """(True, result) or (False, None) when fn raised one of ``allowed``; any other
    exception becomes a Finding (chained to it)."""
    try:
        return True, fn(*args, **kwargs)
    except allowed:
        return False, None
    except Exception as exc:  # every other exception is what we look for
        raise _unexpected(what, exc) from exc


# ------------------------------------------------------------- memory cap --
_warmed = False


def warm_up() -> None:
    """Starts the kernels' worker threads (each reserves address space for its stack
    and malloc arena) before the first cap, so the cap measures what decoding adds."""
    global _warmed
    if _warmed:
        return
    x = np.linspace(-1.0, 1.0, 1 << 21, dtype=np.float32)
    fp.ops.topk(x, 100)
    fp.ops.quantize(x, 4, seed=0)
    fp.ops.scatter_add(np.zeros(x.size, np.float32), np.arange(0, x.size, 7), x[::7])
    for spec in ("eden4:shared", "rht+q2+zstd", "topk:0.1+q4"):
        fp.decode(fp.Codec(spec).encode(small_update(), seed=1))
    _warmed = True


@contextlib.contextmanager
def capped_memory(extra: int = MEMORY_CAP_EXTRA) -> Iterator[None]:
    """conftest's address-space cap, after the lazy allocations are warmed up
    (so the cap does not fail them)."""
    if sys.platform.startswith("linux"):
        warm_up()
    with _conftest_capped_memory(extra):
        yield


# ---------------------------------------------------------------- payloads --
def small_update() -> dict:
    """The update the payload seeds encode (tests/test_payload_fuzz.py's): its table is
    the receiver's model of the ``table=`` checks."""
    rng = np.random.default_rng(2024)
    return {
        "w": rng.standard_normal((6, 7)).astype(np.float32),
        "v": rng.standard_normal(20) * 3,  # float64
        "h": rng.standard_normal(3).astype(np.float16),
        "s": np.array(0.5, np.float32),  # 0-d
        "e": np.zeros((0, 2), np.float32),  # empty
        "i": np.array([-3, 0, 7, 1 << 40], np.int64),
        "m": np.array([True, False, True]),
    }


MODEL = [(name, a.dtype.name, a.shape) for name, a in small_update().items()]
# Small limits (tests/test_payload_fuzz.py's FUZZ_LIMITS too): a second decode under them reaches the limit checks.
SMALL_LIMITS = fp.Limits(
    max_tensors=64,
    max_dims=8,
    max_elements=1 << 20,
    max_total_elements=1 << 21,
    max_decoded_bytes=1 << 24,
    max_body_bytes=1 << 22,
)
_DECODE_ERRORS = (fp.DecodeError,)


def _aggregate(what: str, data: bytes, table: Any) -> bool:
    """Aggregator.add of the payload, then result() (DecodeError allowed: an output beyond memory)."""
    agg = fp.Aggregator(table=table)
    ok, _ = _attempt(what, _DECODE_ERRORS, agg.add, data)
    if ok:
        _attempt(what.replace(".add", ".result"), _DECODE_ERRORS, agg.result)
    return ok


def check_payload(data: bytes) -> None:
    """Every payload entry point on ``data``, under the memory cap; Finding on misbehaviour."""
    with capped_memory(), warnings.catch_warnings():
        warnings.simplefilter("error")  # as the test suite's filterwarnings=error: a warning is a finding
        _check_payload(bytes(data))


def _check_payload(data: bytes) -> None:
    ok_dec, decoded = _attempt("decode", _DECODE_ERRORS, fp.decode, data)
    ok_small, _ = _attempt("decode(limits=small)", _DECODE_ERRORS, fp.decode, data, limits=SMALL_LIMITS)
    ok_ins, info = _attempt("inspect", _DECODE_ERRORS, fp.inspect, data)
    ok_dig, digest = _attempt("payload_table_digest", _DECODE_ERRORS, payload_table_digest, data)
    ok_tdec, tdecoded = _attempt("decode(table=)", _DECODE_ERRORS, fp.decode, data, table=MODEL)
    ok_agg = _aggregate("Aggregator.add", data, None)
    ok_tagg = _aggregate("Aggregator(table=).add", data, MODEL)

    # Invariants between the entry points: the same bytes, the same answers.
    if ok_small and not ok_dec:
        raise _broken("decode", "refuses under the default Limits a payload smaller Limits accept")
    if ok_dec:
        if not ok_ins:
            raise _broken("inspect", "decode accepts a payload inspect refuses")
        names = [t["name"] for t in info["tensors"]]
        if list(decoded) != names:
            raise _broken("inspect", f"names differ: decode {list(decoded)}, inspect {names}")
        for t in info["tensors"]:
            arr = decoded[t["name"]]
            want = np.float32 if t["dtype"] == "bfloat16" else np.dtype(t["dtype"])
            if arr.shape != tuple(t["shape"]) or arr.dtype != want:
                raise _broken(
                    "decode",
                    f"tensor {t['name']!r}: decode gives {arr.dtype}{arr.shape}, "
                    f"inspect says {t['dtype']}{tuple(t['shape'])}",
                )
        if not ok_agg:
            raise _broken("Aggregator.add", "decode accepts a payload Aggregator.add refuses")
    if ok_tdec and not ok_tagg:
        raise _broken("Aggregator(table=).add", "decode(table=) accepts a payload Aggregator(table=).add refuses")
    if ok_ins:
        if not ok_dig:
            raise _broken("payload_table_digest", "inspect accepts a payload payload_table_digest refuses")
        if (info["table"] == "digest") != (digest is not None):
            raise _broken("payload_table_digest", f"table {info['table']!r} but payload_table_digest gives {digest!r}")
        if digest is not None and digest.hex() != info["table_digest"]:
            raise _broken("payload_table_digest", f"digest {digest.hex()}, inspect says {info['table_digest']}")
    # An inline payload that matches the model decodes without it too, to the same tensors.
    if ok_tdec and ok_dig and digest is None and (not ok_dec or list(decoded) != list(tdecoded)):
        raise _broken("decode(table=)", "an inline payload decodes with table= but not without")


# ------------------------------------------------------------------ frames --
_PROTOCOL_ERRORS = (P.ProtocolError,)
_STREAM_ERRORS = (P.ProtocolError, P.ConnectionClosed)


def _hello(body: bytes) -> None:
    ok, h = _attempt("Hello.unpack", _PROTOCOL_ERRORS, P.Hello.unpack, body)
    if ok:
        again = _repack("Hello", P.Hello.unpack, h.pack())
        if again != h:
            raise _broken("Hello.unpack", f"pack/unpack changes the value: {h!r} -> {again!r}")


def _auth(body: bytes) -> None:
    ok, a = _attempt("Auth.unpack", _PROTOCOL_ERRORS, P.Auth.unpack, body)
    if ok and a.pack() != bytes(body):
        raise _broken("Auth.unpack", "pack() differs from the body it was unpacked from")


def _welcome(body: bytes) -> None:
    ok, w = _attempt("Welcome.unpack", _PROTOCOL_ERRORS, P.Welcome.unpack, body)
    if ok:
        packed = w.pack()
        again = _repack("Welcome", P.Welcome.unpack, packed)
        if again.pack() != packed or again.mac != w.mac:
            raise _broken("Welcome.unpack", f"pack/unpack is not a fixpoint: {packed[:80]!r}")


def _joined(parts: list) -> bytes:
    return b"".join(bytes(p) for p in parts)


def _task(body: bytes) -> None:
    ok, t = _attempt("Task.unpack", _PROTOCOL_ERRORS, P.Task.unpack, body)
    if ok:
        packed = _joined(t.parts())
        again = _repack("Task", P.Task.unpack, packed)
        same = (again.round, again.kind, again.model_tag, again.base_tag, [bytes(p) for p in again.payloads]) == (
            t.round,
            t.kind,
            t.model_tag,
            t.base_tag,
            [bytes(p) for p in t.payloads],
        )
        if not same or _joined(again.parts()) != packed or again.payload_bytes != t.payload_bytes:
            raise _broken("Task.unpack", f"pack/unpack changes the value: {t!r}")


def _update(body: bytes) -> None:
    ok, u = _attempt("Update.unpack", _PROTOCOL_ERRORS, P.Update.unpack, body)
    if ok:
        packed = _joined(u.parts())
        again = _repack("Update", P.Update.unpack, packed)
        same = (again.round, again.status, again.num_examples, bytes(again.payload)) == (
            u.round,
            u.status,
            u.num_examples,
            bytes(u.payload),
        )
        if not same or _joined(again.parts()) != packed or again.payload_bytes != u.payload_bytes:
            raise _broken("Update.unpack", f"pack/unpack changes the value: {u!r}")


def _error(body: bytes) -> None:
    _, (code, message) = _attempt("unpack_error", (), P.unpack_error, body)
    _, packed = _attempt("pack_error", (), P.pack_error, code, message)
    _valid_utf8("pack_error", packed[2:])


def _text(body: bytes) -> None:
    _, text = _attempt("unpack_text", (), P.unpack_text, body)
    _, packed = _attempt("pack_text", (), P.pack_text, text)
    _valid_utf8("pack_text", packed)


def _valid_utf8(name: str, raw: bytes) -> None:
    """What a frame carries as text is whole UTF-8 (a long message is cut between characters)."""
    try:
        bytes(raw).decode("utf-8")
    except UnicodeDecodeError as exc:
        raise _broken(name, f"writes invalid UTF-8 ({exc})") from None


def _json(body: bytes) -> None:
    ok, value = _attempt("loads_json", _PROTOCOL_ERRORS, P.loads_json, body, "fuzz")
    if ok:
        _, text = _attempt("dumps_json", (), P.dumps_json, value)
        if _repack("loads_json", lambda b: P.loads_json(b, "fuzz"), text) != value:
            raise _broken("loads_json", f"dumps_json does not give back what was read: {value!r}"[:300])


def _repack(name: str, unpack: Callable[[bytes], Any], packed: bytes) -> Any:
    try:
        return unpack(packed)
    except Exception as exc:  # what pack wrote must unpack
        raise _broken(f"{name}.unpack", f"its own pack() output does not unpack ({type(exc).__name__}: {exc})") from exc


def _challenge(body: bytes) -> None:
    """CHALLENGE has no parser: the client checks its length (client.py)."""


UNPACKERS: dict = {
    P.FrameType.HELLO: _hello,
    P.FrameType.CHALLENGE: _challenge,
    P.FrameType.AUTH: _auth,
    P.FrameType.WELCOME: _welcome,
    P.FrameType.TASK: _task,
    P.FrameType.UPDATE: _update,
    P.FrameType.ERROR: _error,
    P.FrameType.BYE: _text,
}
BODY_CHECKS = (_hello, _auth, _welcome, _task, _update, _error, _text, _json)


async def _read_frames(data: bytes) -> list:
    reader = asyncio.StreamReader()
    reader.feed_data(data)
    reader.feed_eof()
    frames = []
    for _ in range(FRAMES_PER_INPUT):
        ok, frame = await _read_one(reader)
        if not ok:
            break
        frames.append(frame)
    return frames


async def _read_one(reader: asyncio.StreamReader) -> tuple[bool, Optional[P.Frame]]:
    try:
        frame = await P.read_frame(reader, FRAME_MAX_BODY)
    except _STREAM_ERRORS:
        return False, None
    except Exception as exc:
        raise _unexpected("read_frame", exc) from exc
    if not isinstance(frame, P.Frame) or not isinstance(frame.type, P.FrameType) or len(frame.body) > FRAME_MAX_BODY:
        raise _broken("read_frame", f"returned {frame!r:.200}")
    return True, frame


def _seal_roundtrip(frame: P.Frame) -> None:
    """What FrameSealer seals, FrameOpener opens, to the same body."""
    bufs = P.FrameSealer(KEY).seal(frame.type, frame.body)
    ftype, length = P.parse_header(bufs[0], P.MAX_FRAME_LIMIT)
    sealed = _joined(bufs[1:])
    if ftype != frame.type or length != len(sealed):
        raise _broken("FrameSealer.seal", f"header says {ftype!r} {length}, sealed {len(sealed)} bytes")
    ok, opened = _attempt("FrameOpener.open", _PROTOCOL_ERRORS, P.FrameOpener(KEY).open, P.Frame(ftype, sealed))
    if not ok or opened.body != bytes(frame.body):
        raise _broken("FrameOpener.open", "a frame FrameSealer sealed does not open to its body")


class FrameChecker:
    """check(data) for the frames harness; holds the event loop read_frame runs on.
    Use as a context manager (or call close()) so the loop is closed."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()

    def close(self) -> None:
        self.loop.close()

    def __enter__(self) -> FrameChecker:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def check(self, data: bytes) -> None:
        """Every frame parser on ``data``, under the memory cap; Finding on misbehaviour."""
        data = bytes(data)
        with capped_memory(), warnings.catch_warnings():
            warnings.simplefilter("error")
            # 1. The bytes as a stream: up to FRAMES_PER_INPUT frames, each unpacked by
            #    its type, both as it is (handshake frames) and opened as a sealed frame
            #    of one connection (KEY, sequence numbers from 0).
            frames = self.loop.run_until_complete(_read_frames(data))
            opener = P.FrameOpener(KEY)
            for frame in frames:
                UNPACKERS[frame.type](frame.body)
                _seal_roundtrip(frame)
                ok, inner = _attempt("FrameOpener.open", _PROTOCOL_ERRORS, opener.open, frame)
                if ok:
                    UNPACKERS[inner.type](inner.body)
            # 2. The bytes as a frame body, for every parser.
            for check in BODY_CHECKS:
                check(data)
            _attempt("FrameOpener.open", _PROTOCOL_ERRORS, P.FrameOpener(KEY).open, P.Frame(P.FrameType.UPDATE, data))


# ------------------------------------------------------------------ corpus --
def corpus_files(directory: Path) -> list:
    """The corpus files of one harness, sorted (README and dot files excepted)."""
    if not directory.is_dir():
        return []
    return sorted(p for p in directory.iterdir() if p.is_file() and not p.name.startswith(".") and p.suffix != ".md")


def finding_name(data: bytes, finding: Finding) -> str:
    """A corpus file name for a finding: its entry point and exception, then the content hash."""
    kind = finding.signature.split("|")
    label = "-".join(part for part in kind[:2] if part)
    label = "".join(c if c.isalnum() else "_" for c in label).strip("_")
    return f"finding-{label}-{hashlib.sha1(data).hexdigest()}"
