"""The fedpress federation wire protocol: length-prefixed, typed frames.

Every message is one frame (all integers little-endian)::

    offset  size  field
    0       2     magic b"FP"
    2       1     protocol version (PROTOCOL_VERSION = 2)
    3       1     frame type (FrameType)
    4       4     body length N, u32; checked against the reader's limit
                  BEFORE a single body byte is read
    8       N     body

Frame bodies::

    HELLO      client -> server
               version u16 | id_len u16 | client id (UTF-8, 1..128 bytes, printable)
               | JSON object (rest): {"features": [...], "model": hex tag or null, "codec": spec or null}
    CHALLENGE  server -> client
               server nonce (32 bytes)
    AUTH       client -> server
               mac (32) = HMAC-SHA256(token, "fedpress-auth-client-v1" | server nonce | client nonce
                                      | id_len u16 | client id)
               | client nonce (32 bytes)
    WELCOME    server -> client
               mac (32) = HMAC-SHA256(token, "fedpress-auth-server-v1" | client nonce | server nonce
                                      | id_len u16 | client id)
               | JSON object (rest): accepted features, federation settings
    TASK       server -> client
               round u32 | kind u8 (0 full model, 1 delta chain) | n_payloads u16
               | model tag (16) | base tag (16; zeros for a full model) | config_len u32 | config JSON
               | n_payloads x (length u32 | fedpress payload)
    UPDATE     client -> server
               round u32 | status u8 (0 ok, 1 failed) | num_examples u64 | metrics_len u32
               | metrics JSON | fedpress payload (rest; empty when status is failed)
    SECAGG     either way (rounds under secure aggregation, docs/secure-aggregation.md)
               round u32 | step u8 | fedpress.secagg message (rest); steps: 1 ADVERTISE (client),
               2 KEYS (server), 3 SHARES (client), 4 ROUTED (server: the shares for this client),
               7 REPORT (client: the senders of bad shares), 8 VERDICT (server: who is out),
               5 UNMASK_REQUEST (server), 6 UNMASK (client), in that order
    ERROR      either way
               code u16 | message (UTF-8, rest)
    BYE        either way
               reason (UTF-8, rest; may be empty)

Every frame after WELCOME is sealed: its body is followed by a 16-byte tag,
and the header's length counts it::

    body | tag (16) = HMAC-SHA256(key, seq u64 | header | body)[:16]

``seq`` counts the frames of one direction from 0 and is never sent (as in TLS,
each side knows which frame comes next), so a replayed, reordered, dropped or
altered frame fails the same check: a protocol error that closes the
connection. 16 bytes is HMAC-SHA256-128 (RFC 4868), what IPsec uses, and the
smallest price per frame for compressed updates of a few hundred bytes. The
keys come from HKDF-SHA256 (``session_keys``) over the token, salted with
both nonces, with the client id and a SHA-256 of the HELLO and WELCOME bodies
in the info, so a proxy that changes either handshake frame gets keys that
verify nothing. One key per direction (client to server, server to client).

Tokens: either one shared token, or per-client tokens derived from a master
(``client_token``: HKDF-SHA256 of the master with the client id), so a
server holding only the master checks each client against its own token and
one client cannot speak for another.

The token never crosses the wire: the client proves it knows the token
by a MAC over the server's fresh nonce, the server proves it by a MAC over the
client's fresh nonce (mutual authentication; the two MACs use distinct labels
so neither can be replayed as the other). MACs are compared with
``hmac.compare_digest``.
"""

from __future__ import annotations

import enum
import hashlib
import hmac
import json
import math
import secrets
import struct
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

__all__ = [
    "MAGIC",
    "PROTOCOL_VERSION",
    "HEADER",
    "NONCE_BYTES",
    "TAG_BYTES",
    "MAC_BYTES",
    "HANDSHAKE_MAX_FRAME",
    "DEFAULT_MAX_FRAME",
    "MAX_FRAME_LIMIT",
    "FEATURES",
    "FrameType",
    "ErrorCode",
    "FederationError",
    "ProtocolError",
    "NotAFrame",
    "FrameTooLarge",
    "PeerError",
    "AuthenticationError",
    "ConnectionClosed",
    "Frame",
    "Hello",
    "Auth",
    "Welcome",
    "Task",
    "Update",
    "SecAgg",
    "SecAggStep",
    "encode_frame",
    "parse_header",
    "read_frame",
    "client_mac",
    "server_mac",
    "new_nonce",
    "new_tag",
    "SEQ",
    "TRAILER_BYTES",
    "session_keys",
    "client_token",
    "FrameSealer",
    "FrameOpener",
    "pack_error",
    "unpack_error",
    "pack_text",
    "unpack_text",
    "dumps_json",
    "loads_json",
    "check_client_id",
    "as_token",
    "check_features",
    "TASK_FULL",
    "TASK_DELTA",
    "UPDATE_OK",
    "UPDATE_FAILED",
]

MAGIC = b"FP"
PROTOCOL_VERSION = 2
HEADER = struct.Struct("<2sBBI")  # magic, version, type, body length
NONCE_BYTES = 32
MAC_BYTES = 32
SEQ = struct.Struct("<Q")
TRAILER_BYTES = 16  # the tag sealing adds to every frame after the handshake (HMAC-SHA256-128)
TAG_BYTES = 16
MAX_JSON_DEPTH = 32  # settings and configs are shallow; deeper is an attack
HANDSHAKE_MAX_FRAME = 64 * 1024  # HELLO / AUTH / WELCOME / CHALLENGE are small
DEFAULT_MAX_FRAME = 1 << 30  # TASK / UPDATE: a 256M-parameter fp32 model
MAX_FRAME_LIMIT = (1 << 32) - 1  # the u32 length field
MAX_CLIENT_ID_BYTES = 128
MAX_JSON_BYTES = 1 << 20

#: Optional features a client may request in HELLO; the server answers with
#: those it grants in WELCOME. "downlink-delta": the client keeps the last
#: global model and accepts TASKs carrying a compressed delta chain.
FEATURES = ("downlink-delta", "secure-aggregation")

_LABEL_CLIENT = b"fedpress-auth-client-v1"
_LABEL_SERVER = b"fedpress-auth-server-v1"
_LABEL_SESSION = b"fedpress-session-v1"
_LABEL_CLIENT_TOKEN = b"fedpress-client-token-v1"


class FrameType(enum.IntEnum):
    """The type byte of a frame."""

    HELLO = 1
    CHALLENGE = 2
    AUTH = 3
    WELCOME = 4
    TASK = 5
    UPDATE = 6
    ERROR = 7
    BYE = 8
    SECAGG = 9


class ErrorCode(enum.IntEnum):
    """The code of an ERROR frame."""

    PROTOCOL = 1  # malformed or unexpected frame
    VERSION = 2  # protocol version mismatch
    AUTH = 3  # authentication failed
    TOO_LARGE = 4  # a frame's declared length exceeds the receiver's limit
    TIMEOUT = 5  # the handshake took too long
    BUSY = 6  # too many connections waiting for their handshake
    REPLACED = 7  # a newer connection with the same client id took over
    SHUTDOWN = 8  # the server is shutting down
    INTERNAL = 9  # unexpected failure on the sender's side
    INTEGRITY = 10  # a sealed frame failed its MAC or came out of sequence (altered in transit)
    TLS_REQUIRED = 11  # a plain-TCP HELLO reached a TLS server (sent in plain TCP, before closing)

    @classmethod
    def name_of(cls, code: int) -> str:
        try:
            return cls(code).name
        except ValueError:
            return f"UNKNOWN({code})"


class FederationError(Exception):
    """Base class of the federation errors."""


class ProtocolError(FederationError):
    """The peer broke the protocol; ``code`` is the ERROR code to answer with."""

    def __init__(self, code: int, message: str) -> None:
        super().__init__(message)
        self.code = int(code)
        self.message = message


class FrameTooLarge(ProtocolError):
    """A frame header declared a body larger than the reader accepts."""

    def __init__(self, length: int, limit: int) -> None:
        super().__init__(ErrorCode.TOO_LARGE, f"frame of {length} bytes exceeds the limit of {limit}")
        self.length = length
        self.limit = limit


class PeerError(FederationError):
    """The peer sent an ERROR frame."""

    def __init__(self, code: int, message: str) -> None:
        super().__init__(f"peer error {ErrorCode.name_of(code)}: {message}")
        self.code = int(code)
        self.message = message


class AuthenticationError(FederationError):
    """Authentication failed: a wrong token on either side (never retried)."""


class NotAFrame(ProtocolError):
    """The peer's bytes do not start with a fedpress frame header (``header``: the
    8 bytes read, which say what the peer speaks instead, e.g. a TLS record)."""

    def __init__(self, header: bytes) -> None:
        super().__init__(ErrorCode.PROTOCOL, f"not a fedpress frame (magic {bytes(header[:4])!r})")
        self.header = bytes(header)

    @property
    def tls(self) -> bool:
        """Whether the bytes are a TLS record (an alert or a handshake)."""
        return self.header[:1] in (b"\x15", b"\x16") and self.header[1:2] == b"\x03"


class ConnectionClosed(FederationError, ConnectionError):
    """The connection ended (EOF), possibly in the middle of a frame."""


# ----------------------------------------------------------------- frames --
@dataclass(frozen=True)
class Frame:
    """A received frame: its type and body (bytes)."""

    type: FrameType
    body: bytes


def encode_frame(ftype: int, *parts: Any) -> list:
    """The buffers of one frame (header first, then the body parts, not joined,
    so a large payload is never copied). Parts are bytes-like."""
    length = sum(memoryview(p).nbytes for p in parts)
    if length > MAX_FRAME_LIMIT:
        raise ValueError(f"frame body of {length} bytes exceeds the u32 length field")
    return [HEADER.pack(MAGIC, PROTOCOL_VERSION, int(ftype), length), *parts]


def parse_header(header: bytes, max_body: int) -> tuple[FrameType, int]:
    """Validates an 8-byte frame header: (type, body length). Raises ProtocolError
    (bad magic, version, type) or FrameTooLarge before any body byte is read."""
    magic, version, ftype, length = HEADER.unpack(header)
    if magic != MAGIC:
        raise NotAFrame(bytes(header))
    if version != PROTOCOL_VERSION:
        raise ProtocolError(
            ErrorCode.VERSION, f"protocol version {version} in frame header, this side speaks {PROTOCOL_VERSION}"
        )
    try:
        kind = FrameType(ftype)
    except ValueError:
        raise ProtocolError(ErrorCode.PROTOCOL, f"unknown frame type {ftype}") from None
    if length > max_body:
        raise FrameTooLarge(length, max_body)
    return kind, length


async def read_frame(
    reader: Any, max_body: int, *, body_timeout: Optional[Callable[[int], float]] = None, budget: Any = None
) -> Frame:
    """Reads one frame from an asyncio StreamReader. EOF raises ConnectionClosed;
    a bad header raises ProtocolError before the body is read.

    ``body_timeout(length)``: seconds the body may take once its header is in (a
    peer that announces a frame and stalls is cut off: ProtocolError TIMEOUT).
    ``budget``: an object with ``async acquire(n)`` / ``release(n)`` (see
    ``fedpress.federation.transport.InflightBudget``) holding the body's bytes
    while they are received, so that all connections together buffer at most its
    total; waiting for it counts against the body's time."""
    import asyncio

    try:
        header = await reader.readexactly(HEADER.size)
    except asyncio.IncompleteReadError as exc:
        where = "in a frame header" if exc.partial else "between frames"
        raise ConnectionClosed(f"connection closed {where}") from None
    ftype, length = parse_header(header, max_body)
    if not length:
        return Frame(ftype, b"")

    async def body() -> bytes:
        if budget is None:
            return await _read_body(reader, ftype, length)
        await budget.acquire(length)
        try:
            return await _read_body(reader, ftype, length)
        finally:
            budget.release(length)

    seconds = None if body_timeout is None else body_timeout(length)
    try:
        data = await asyncio.wait_for(body(), seconds)
    except asyncio.TimeoutError:
        raise ProtocolError(
            ErrorCode.TIMEOUT, f"{ftype.name} frame body of {length} bytes not received within {seconds:.1f} s"
        ) from None
    return Frame(ftype, data)


_BODY_CHUNK = 1 << 20


async def _read_body(reader: Any, ftype: FrameType, length: int) -> bytes:
    """``length`` bytes, collected in chunks of at most 1 MiB and joined at the end:
    a peer that stops halfway holds what it sent, not a buffer grown (and copied
    on each growth) to the size it announced."""
    import asyncio

    if length <= _BODY_CHUNK:
        try:
            return await reader.readexactly(length)
        except asyncio.IncompleteReadError as exc:
            got = len(exc.partial)
    else:
        chunks, got = [], 0
        while got < length:
            chunk = await reader.read(min(length - got, _BODY_CHUNK))
            if not chunk:
                break
            chunks.append(chunk)
            got += len(chunk)
        if got == length:
            return b"".join(chunks)
    raise ConnectionClosed(f"connection closed in a {ftype.name} frame body ({got} of {length} bytes)")


# ------------------------------------------------------------------- JSON --
def _no_constants(name: str) -> Any:
    raise ValueError(f"{name} is not valid JSON")


def _finite_float(text: str) -> float:
    """A JSON number that overflows a float (1e400) is refused, not read as inf."""
    value = float(text)
    if not math.isfinite(value):
        raise ValueError(f"number {text[:40]} is out of the float range")
    return value


def _json_default(value: Any) -> Any:
    """numpy / torch scalars and small arrays become plain numbers and lists."""
    if hasattr(value, "tolist"):
        return value.tolist()
    if hasattr(value, "item"):
        return value.item()
    if isinstance(value, (set, frozenset, tuple)):
        return list(value)
    return str(value)


def _finite(value: Any) -> Any:
    """Non-finite floats become None (strict JSON has no NaN)."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {str(k): _finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v) for v in value]
    return value


def dumps_json(value: Any) -> bytes:
    """Strict JSON (no NaN/Infinity) in UTF-8; numpy scalars are converted."""
    text = json.dumps(value, default=_json_default, separators=(",", ":"))
    return json.dumps(_finite(json.loads(text)), separators=(",", ":"), allow_nan=False).encode()


def loads_json(data: Any, what: str, *, limit: int = MAX_JSON_BYTES) -> dict:
    """Parses a JSON object; anything else raises ProtocolError."""
    if len(data) > limit:
        raise ProtocolError(ErrorCode.PROTOCOL, f"{what}: {len(data)} bytes of JSON exceed {limit}")
    try:
        value = json.loads(bytes(data).decode("utf-8"), parse_constant=_no_constants, parse_float=_finite_float)
    except (UnicodeDecodeError, ValueError) as exc:
        raise ProtocolError(ErrorCode.PROTOCOL, f"{what}: invalid JSON ({exc})") from None
    except RecursionError:  # the parser recurses once per level of nesting
        raise ProtocolError(ErrorCode.PROTOCOL, f"{what}: JSON nested too deeply") from None
    if not isinstance(value, dict):
        raise ProtocolError(ErrorCode.PROTOCOL, f"{what}: expected a JSON object")
    if _json_depth(value) > MAX_JSON_DEPTH:
        raise ProtocolError(ErrorCode.PROTOCOL, f"{what}: JSON nested deeper than {MAX_JSON_DEPTH} levels")
    return value


def _json_depth(value: Any) -> int:
    """Nesting depth of a parsed JSON value, without recursion."""
    deepest, stack = 0, [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, (dict, list)):
            deepest = max(deepest, depth)
            stack.extend((child, depth + 1) for child in (item.values() if isinstance(item, dict) else item))
    return deepest


class _Cursor:
    """Reads fields from a frame body; running out raises ProtocolError."""

    def __init__(self, body: bytes, what: str) -> None:
        self.view = memoryview(body)
        self.pos = 0
        self.what = what

    def take(self, n: int, name: str) -> memoryview:
        if n < 0 or self.pos + n > len(self.view):
            raise ProtocolError(
                ErrorCode.PROTOCOL,
                f"{self.what} frame truncated in {name} (needs {n} bytes at offset {self.pos}, "
                f"body has {len(self.view)})",
            )
        out = self.view[self.pos : self.pos + n]
        self.pos += n
        return out

    def unpack(self, fmt: struct.Struct, name: str) -> tuple:
        return fmt.unpack(self.take(fmt.size, name))

    def rest(self) -> memoryview:
        out = self.view[self.pos :]
        self.pos = len(self.view)
        return out

    def done(self) -> None:
        if self.pos != len(self.view):
            raise ProtocolError(ErrorCode.PROTOCOL, f"{self.what} frame has {len(self.view) - self.pos} trailing bytes")


_U16 = struct.Struct("<H")
_U32 = struct.Struct("<I")


def check_client_id(client_id: str) -> str:
    """A client id: 1..128 UTF-8 bytes of printable characters."""
    if not isinstance(client_id, str):
        raise TypeError(f"client id must be a string, got {type(client_id).__name__}")
    raw = client_id.encode("utf-8", "surrogatepass")
    if not 1 <= len(raw) <= MAX_CLIENT_ID_BYTES or not client_id.isprintable():
        raise ValueError(f"client id must be 1..{MAX_CLIENT_ID_BYTES} bytes of printable characters, got {client_id!r}")
    return client_id


@dataclass(frozen=True)
class Hello:
    """HELLO: protocol version, client id, requested features, the tag of the
    global model the client holds (None: none) and its uplink codec."""

    client_id: str
    features: tuple = ()
    model_tag: Optional[bytes] = None
    codec: Optional[str] = None
    version: int = PROTOCOL_VERSION

    def pack(self) -> bytes:
        cid = self.client_id.encode("utf-8")
        meta = {
            "features": list(self.features),
            "model": self.model_tag.hex() if self.model_tag else None,
            "codec": self.codec,
        }
        return _U16.pack(self.version) + _U16.pack(len(cid)) + cid + dumps_json(meta)

    @classmethod
    def unpack(cls, body: bytes) -> Hello:
        c = _Cursor(body, "HELLO")
        (version,) = c.unpack(_U16, "version")
        if version != PROTOCOL_VERSION:
            raise ProtocolError(
                ErrorCode.VERSION, f"client speaks protocol version {version}, the server speaks {PROTOCOL_VERSION}"
            )
        (n,) = c.unpack(_U16, "client id length")
        try:
            cid = check_client_id(bytes(c.take(n, "client id")).decode("utf-8"))
        except (UnicodeDecodeError, ValueError) as exc:
            raise ProtocolError(ErrorCode.PROTOCOL, f"HELLO: bad client id ({exc})") from None
        meta = loads_json(c.rest(), "HELLO", limit=HANDSHAKE_MAX_FRAME)
        features = meta.get("features", [])
        if not isinstance(features, list) or not all(isinstance(f, str) for f in features):
            raise ProtocolError(ErrorCode.PROTOCOL, "HELLO: features must be a list of strings")
        tag = meta.get("model")
        model_tag = None
        if tag is not None:
            try:
                model_tag = bytes.fromhex(tag)
            except (TypeError, ValueError):
                raise ProtocolError(ErrorCode.PROTOCOL, "HELLO: model tag is not hex") from None
            if len(model_tag) != TAG_BYTES:
                raise ProtocolError(ErrorCode.PROTOCOL, f"HELLO: model tag must be {TAG_BYTES} bytes")
        codec = meta.get("codec")
        if codec is not None and not isinstance(codec, str):
            raise ProtocolError(ErrorCode.PROTOCOL, "HELLO: codec must be a string")
        return cls(cid, tuple(features), model_tag, codec, version)


@dataclass(frozen=True)
class Auth:
    """AUTH: the client's MAC over the server nonce and its own nonce."""

    mac: bytes
    client_nonce: bytes

    def pack(self) -> bytes:
        return self.mac + self.client_nonce

    @classmethod
    def unpack(cls, body: bytes) -> Auth:
        c = _Cursor(body, "AUTH")
        mac = bytes(c.take(MAC_BYTES, "mac"))
        nonce = bytes(c.take(NONCE_BYTES, "client nonce"))
        c.done()
        return cls(mac, nonce)


@dataclass(frozen=True)
class Welcome:
    """WELCOME: the server's MAC over the client nonce and the session settings."""

    mac: bytes
    settings: dict = field(default_factory=dict)

    def pack(self) -> bytes:
        return self.mac + dumps_json(self.settings)

    @classmethod
    def unpack(cls, body: bytes) -> Welcome:
        c = _Cursor(body, "WELCOME")
        mac = bytes(c.take(MAC_BYTES, "mac"))
        return cls(mac, loads_json(c.rest(), "WELCOME", limit=HANDSHAKE_MAX_FRAME))


TASK_FULL, TASK_DELTA = 0, 1
_TASK_HEAD = struct.Struct(f"<IBH{TAG_BYTES}s{TAG_BYTES}sI")


@dataclass
class Task:
    """TASK: the round, the training config and the global model, either one
    full fp32 payload (kind TASK_FULL) or a chain of delta payloads that turn the
    model tagged ``base_tag`` into the one tagged ``model_tag`` (kind TASK_DELTA)."""

    round: int
    kind: int
    model_tag: bytes
    base_tag: bytes
    config: dict
    payloads: list

    def parts(self) -> list:
        """The body as buffers: head, config, then each payload with its length."""
        config = dumps_json(self.config)
        head = _TASK_HEAD.pack(
            self.round, self.kind, len(self.payloads), self.model_tag, self.base_tag or bytes(TAG_BYTES), len(config)
        )
        out: list = [head, config]
        for p in self.payloads:
            out += [_U32.pack(memoryview(p).nbytes), p]
        return out

    @property
    def payload_bytes(self) -> int:
        return sum(memoryview(p).nbytes for p in self.payloads)

    @classmethod
    def unpack(cls, body: bytes) -> Task:
        c = _Cursor(body, "TASK")
        rnd, kind, n, tag, base, config_len = c.unpack(_TASK_HEAD, "header")
        if kind not in (TASK_FULL, TASK_DELTA):
            raise ProtocolError(ErrorCode.PROTOCOL, f"TASK: unknown model kind {kind}")
        if kind == TASK_FULL and n != 1:
            raise ProtocolError(ErrorCode.PROTOCOL, f"TASK: a full model is one payload, got {n}")
        config = loads_json(c.take(config_len, "config"), "TASK config")
        payloads = []
        for i in range(n):
            (size,) = c.unpack(_U32, f"payload {i} length")
            payloads.append(c.take(size, f"payload {i}"))
        c.done()
        return cls(rnd, kind, bytes(tag), bytes(base), config, payloads)


UPDATE_OK, UPDATE_FAILED = 0, 1
_UPDATE_HEAD = struct.Struct("<IBQI")


@dataclass
class Update:
    """UPDATE: the round, status, number of training examples, metrics and the
    fedpress payload of the update (empty when the client reports a failure)."""

    round: int
    num_examples: int
    metrics: dict
    payload: Any
    status: int = UPDATE_OK

    def parts(self) -> list:
        metrics = dumps_json(self.metrics)
        return [_UPDATE_HEAD.pack(self.round, self.status, self.num_examples, len(metrics)), metrics, self.payload]

    @property
    def payload_bytes(self) -> int:
        return memoryview(self.payload).nbytes

    @classmethod
    def unpack(cls, body: bytes) -> Update:
        c = _Cursor(body, "UPDATE")
        rnd, status, n, metrics_len = c.unpack(_UPDATE_HEAD, "header")
        if status not in (UPDATE_OK, UPDATE_FAILED):
            raise ProtocolError(ErrorCode.PROTOCOL, f"UPDATE: unknown status {status}")
        metrics = loads_json(c.take(metrics_len, "metrics"), "UPDATE metrics", limit=64 * 1024)
        payload = c.rest()
        if status == UPDATE_FAILED and len(payload):
            raise ProtocolError(ErrorCode.PROTOCOL, f"UPDATE: a failed update carries {len(payload)} payload bytes")
        return cls(rnd, n, metrics, payload, status)


class SecAggStep(enum.IntEnum):
    """The step byte of a SECAGG frame: the secure aggregation stage a message belongs to."""

    ADVERTISE = 1  # client -> server: its public keys
    KEYS = 2  # server -> client: its neighbours' public keys
    SHARES = 3  # client -> server: its encrypted shares, for its neighbours
    ROUTED = 4  # server -> client: the shares addressed to it
    UNMASK_REQUEST = 5  # server -> client: who survived, who dropped
    UNMASK = 6  # client -> server: the shares that request asks for
    REPORT = 7  # client -> server: the senders whose routed shares it could not use
    VERDICT = 8  # server -> client: the clients out of the round for bad shares


_SECAGG_HEAD = struct.Struct("<IB")


@dataclass
class SecAgg:
    """SECAGG: the round, the step and a ``fedpress.secagg`` message."""

    round: int
    step: SecAggStep
    message: bytes

    def parts(self) -> list:
        return [_SECAGG_HEAD.pack(self.round, self.step), self.message]

    @classmethod
    def unpack(cls, body: bytes) -> SecAgg:
        c = _Cursor(body, "SECAGG")
        rnd, step = c.unpack(_SECAGG_HEAD, "header")
        try:
            kind = SecAggStep(step)
        except ValueError:
            raise ProtocolError(ErrorCode.PROTOCOL, f"SECAGG: unknown step {step}") from None
        return cls(rnd, kind, bytes(c.rest()))


MAX_TEXT_BYTES = 4096


def _utf8_prefix(text: str, limit: int = MAX_TEXT_BYTES) -> bytes:
    """At most ``limit`` bytes of ``text`` in UTF-8, cut between characters."""
    raw = text.encode("utf-8", "replace")
    if len(raw) <= limit:
        return raw
    return raw[:limit].decode("utf-8", "ignore").encode("utf-8")


def pack_error(code: int, message: str) -> bytes:
    return _U16.pack(int(code)) + _utf8_prefix(message)


def unpack_error(body: bytes) -> tuple[int, str]:
    if len(body) < 2:
        return int(ErrorCode.PROTOCOL), "malformed ERROR frame"
    (code,) = _U16.unpack(body[:2])
    return code, bytes(body[2:]).decode("utf-8", "replace")


def pack_text(text: str) -> bytes:
    return _utf8_prefix(text)


def unpack_text(body: bytes) -> str:
    return bytes(body).decode("utf-8", "replace")


# ------------------------------------------------------------------- auth --
def new_nonce() -> bytes:
    return secrets.token_bytes(NONCE_BYTES)


def new_tag() -> bytes:
    return secrets.token_bytes(TAG_BYTES)


def _id_field(client_id: str) -> bytes:
    raw = client_id.encode("utf-8")
    return _U16.pack(len(raw)) + raw


def client_mac(token: bytes, server_nonce: bytes, client_nonce: bytes, client_id: str) -> bytes:
    """The client's proof: HMAC-SHA256 keyed with the token."""
    return hmac.new(token, _LABEL_CLIENT + server_nonce + client_nonce + _id_field(client_id), hashlib.sha256).digest()


def server_mac(token: bytes, client_nonce: bytes, server_nonce: bytes, client_id: str) -> bytes:
    """The server's proof: HMAC-SHA256 keyed with the token, a different label."""
    return hmac.new(token, _LABEL_SERVER + client_nonce + server_nonce + _id_field(client_id), hashlib.sha256).digest()


def _hkdf(key: bytes, salt: bytes, info: bytes, length: int) -> bytes:
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.kdf.hkdf import HKDF

    return HKDF(algorithm=hashes.SHA256(), length=length, salt=salt, info=info).derive(key)


def session_keys(
    token: bytes, server_nonce: bytes, client_nonce: bytes, client_id: str, hello_body: bytes, welcome_body: bytes
) -> tuple[bytes, bytes]:
    """(client-to-server key, server-to-client key) of one connection (HKDF-SHA256)."""
    info = (
        _LABEL_SESSION
        + _id_field(client_id)
        + hashlib.sha256(hello_body).digest()
        + hashlib.sha256(welcome_body).digest()
    )
    keys = _hkdf(token, server_nonce + client_nonce, info, 2 * MAC_BYTES)
    return keys[:MAC_BYTES], keys[MAC_BYTES:]


def client_token(master: Any, client_id: str) -> bytes:
    """The token of ``client_id`` under a master token: HKDF-SHA256 of the master
    with the client id, as 64 hex digits (ASCII), so it can live in a token file."""
    key = _hkdf(as_token(master), b"", _LABEL_CLIENT_TOKEN + _id_field(check_client_id(client_id)), 32)
    return key.hex().encode("ascii")


def _frame_tag(key: bytes, seq: int, header: bytes, parts: Any) -> bytes:
    mac = hmac.new(key, SEQ.pack(seq) + header, hashlib.sha256)
    for p in parts:
        mac.update(p)
    return mac.digest()[:TRAILER_BYTES]


class FrameSealer:
    """Seals the frames one side sends after the handshake (see the module doc)."""

    def __init__(self, key: bytes) -> None:
        self.key = key
        self.seq = 0

    def seal(self, ftype: int, *parts: Any) -> list:
        length = sum(memoryview(p).nbytes for p in parts) + TRAILER_BYTES
        if length > MAX_FRAME_LIMIT:
            raise ValueError(f"frame body of {length} bytes exceeds the u32 length field")
        header = HEADER.pack(MAGIC, PROTOCOL_VERSION, int(ftype), length)
        tag = _frame_tag(self.key, self.seq, header, parts)
        self.seq += 1
        return [header, *parts, tag]


class FrameOpener:
    """Checks and strips the tag of each frame received after the handshake."""

    def __init__(self, key: bytes) -> None:
        self.key = key
        self.seq = 0

    def open(self, frame: Frame) -> Frame:
        body = memoryview(frame.body)
        if len(body) < TRAILER_BYTES:
            raise ProtocolError(ErrorCode.INTEGRITY, f"{frame.type.name} frame of {len(body)} bytes has no MAC tag")
        header = HEADER.pack(MAGIC, PROTOCOL_VERSION, int(frame.type), len(body))
        inner, tag = body[:-TRAILER_BYTES], body[-TRAILER_BYTES:]
        if not hmac.compare_digest(_frame_tag(self.key, self.seq, header, (inner,)), bytes(tag)):
            raise ProtocolError(
                ErrorCode.INTEGRITY,
                f"{frame.type.name} frame {self.seq} does not verify (altered, "
                "replayed, reordered, or sealed for another connection)",
            )
        self.seq += 1
        return Frame(frame.type, bytes(inner))


def as_token(token: Any) -> bytes:
    """The shared token as bytes (str is UTF-8 encoded); it must not be empty."""
    if isinstance(token, str):
        token = token.encode("utf-8")
    if not isinstance(token, (bytes, bytearray, memoryview)):
        raise TypeError(f"token must be bytes or str, got {type(token).__name__}")
    token = bytes(token)
    if not token:
        raise ValueError("token must not be empty")
    return token


def check_features(features: Sequence[str]) -> tuple:
    return tuple(f for f in features if f in FEATURES)
