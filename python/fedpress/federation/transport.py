"""Byte-exact connections: counting below TLS, frames above it.

How bytes are counted
---------------------
Every connection starts as a plain asyncio socket transport whose protocol is
a ``CountingProtocol``. That protocol never goes away: it counts every
byte the socket delivers (``buffer_updated``) and hands the bytes on to an
*upper* protocol. Writes go through a ``CountingTransport`` that wraps
the socket transport, counts each buffer and passes it down. The streams
(asyncio StreamReader / StreamWriter) sit on top:

    plain TCP:  StreamReader/Writer -> CountingTransport -> socket transport
    TLS:        StreamReader/Writer -> SSL app transport -> SSLProtocol
                -> CountingTransport -> socket transport

For TLS the CountingTransport is handed to ``asyncio.loop.start_tls``
(it declares ``_start_tls_compatible``); start_tls installs its SSLProtocol
as the CountingTransport's upper protocol and writes its records through it.
So the counts are the ciphertext: TLS handshakes, record headers, MACs and
close_notify alerts included, exactly the bytes the socket sent and received.

Writes are counted when handed to the socket transport; bytes still queued in
user space when a connection is aborted are subtracted again (they never left).
"""

from __future__ import annotations

import asyncio
import logging
import math
import ssl as _ssl
import sys
from typing import Any, Callable, Optional, cast

from .protocol import (
    MAX_FRAME_LIMIT,
    TRAILER_BYTES,
    ConnectionClosed,
    Frame,
    FrameOpener,
    FrameSealer,
    encode_frame,
    read_frame,
)

__all__ = [
    "CountingProtocol",
    "CountingTransport",
    "Connection",
    "InflightBudget",
    "BodyDeadline",
    "establish",
    "peek",
    "open_connection",
]

log = logging.getLogger("fedpress.federation")

#: on_bytes(direction, n): direction "rx" (received) or "tx" (sent); n may be
#: negative when queued bytes are dropped by an abort.
ByteSink = Callable[[str, int], None]

_READ_CHUNK = 64 * 1024  # receive buffer for a stream (non-TLS) upper protocol, made on first use


class CountingProtocol(asyncio.BufferedProtocol):
    """The socket transport's protocol for the whole connection: counts every
    received byte, then forwards to the upper protocol (a stream protocol, or
    an SSLProtocol when TLS runs on top)."""

    def __init__(self, on_connection: Optional[Callable[[CountingTransport], None]] = None) -> None:
        self._on_connection = on_connection
        self.transport: Optional[CountingTransport] = None
        self._upper: Optional[asyncio.BaseProtocol] = None
        self._upper_buffered = False
        self._own: Optional[memoryview] = None
        self._early = bytearray()
        self._early_waiter: Optional[asyncio.Future] = None
        self.closed: Optional[asyncio.Future] = None

    # -- socket transport side
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.closed = asyncio.get_running_loop().create_future()
        # A connection's transport (create_server, create_connection): it reads and writes.
        stream = cast(asyncio.Transport, transport)
        # Nothing may be delivered before an upper protocol is installed.
        stream.pause_reading()
        self.transport = CountingTransport(stream, self)
        if self._on_connection is not None:
            self._on_connection(self.transport)

    def get_buffer(self, sizehint: int) -> Any:
        if self._upper is not None and self._upper_buffered:
            return self._upper.get_buffer(sizehint)  # type: ignore[attr-defined]
        if self._own is None:
            self._own = memoryview(bytearray(_READ_CHUNK))
        return self._own

    def buffer_updated(self, nbytes: int) -> None:
        assert self.transport is not None
        self.transport._count("rx", nbytes)
        upper = self._upper
        if upper is not None and self._upper_buffered:
            upper.buffer_updated(nbytes)  # type: ignore[attr-defined]
            return
        assert self._own is not None
        if upper is None:
            self._early += self._own[:nbytes]
            self._wake_early()
        else:
            upper.data_received(bytes(self._own[:nbytes]))  # type: ignore[attr-defined]

    def eof_received(self) -> Optional[bool]:
        if self._upper is not None:
            return self._upper.eof_received()  # type: ignore[attr-defined]
        return None

    def _wake_early(self) -> None:
        if self._early_waiter is not None and not self._early_waiter.done():
            self._early_waiter.set_result(None)

    def connection_lost(self, exc: Optional[Exception]) -> None:
        self._wake_early()
        if self.closed is not None and not self.closed.done():
            self.closed.set_result(None)
        if self._upper is not None:
            self._upper.connection_lost(exc)

    def pause_writing(self) -> None:
        if self._upper is not None:
            self._upper.pause_writing()

    def resume_writing(self) -> None:
        if self._upper is not None:
            self._upper.resume_writing()

    # -- upper side
    def _set_upper(self, protocol: asyncio.BaseProtocol) -> None:
        self._upper = protocol
        self._upper_buffered = isinstance(protocol, asyncio.BufferedProtocol)

    def _deliver_early(self) -> None:
        """Bytes that arrived before the upper protocol was installed (only
        possible on Pythons whose transports ignore an early pause_reading)."""
        if not self._early or self._upper is None:
            return
        data, self._early = bytes(self._early), bytearray()
        if self._upper_buffered:
            view = memoryview(data)
            while view:
                buf = self._upper.get_buffer(len(view))  # type: ignore[attr-defined]
                n = min(len(buf), len(view))
                buf[:n] = view[:n]
                self._upper.buffer_updated(n)  # type: ignore[attr-defined]
                view = view[n:]
        else:
            self._upper.data_received(data)  # type: ignore[attr-defined]


class CountingTransport(asyncio.Transport):
    """Wraps a socket transport: counts every written byte, forwards everything.
    ``rx`` / ``tx`` are the totals; ``on_bytes`` (if set) sees each count."""

    _start_tls_compatible = True

    def __init__(self, raw: asyncio.Transport, shim: CountingProtocol) -> None:
        super().__init__()
        self._raw = raw
        self._shim = shim
        self.rx = 0
        self.tx = 0
        self.on_bytes: Optional[ByteSink] = None

    def _count(self, direction: str, n: int) -> None:
        if direction == "rx":
            self.rx += n
        else:
            self.tx += n
        if self.on_bytes is not None:
            self.on_bytes(direction, n)

    def _drop_unsent(self) -> None:
        try:
            unsent = self._raw.get_write_buffer_size()
        except Exception:  # noqa: BLE001 - a transport already torn down
            unsent = 0
        if unsent:
            self._count("tx", -unsent)

    # -- writing
    def write(self, data: Any) -> None:
        n = memoryview(data).nbytes
        # A socket transport silently drops writes once its connection is lost.
        if n and not getattr(self._raw, "_conn_lost", 0) and not self.closed.done():
            self._count("tx", n)
        self._raw.write(data)

    def writelines(self, list_of_data: Any) -> None:
        for data in list_of_data:
            self.write(data)

    def write_eof(self) -> None:
        self._raw.write_eof()

    def can_write_eof(self) -> bool:
        return self._raw.can_write_eof()

    def get_write_buffer_size(self) -> int:
        return self._raw.get_write_buffer_size()

    def get_write_buffer_limits(self) -> tuple:
        return self._raw.get_write_buffer_limits()

    def set_write_buffer_limits(self, high: Optional[int] = None, low: Optional[int] = None) -> None:
        self._raw.set_write_buffer_limits(high, low)

    # -- reading
    def pause_reading(self) -> None:
        self._raw.pause_reading()

    def resume_reading(self) -> None:
        self._raw.resume_reading()
        self._shim._deliver_early()

    def is_reading(self) -> bool:
        return self._raw.is_reading()

    # -- lifetime
    def close(self) -> None:
        self._raw.close()

    def abort(self) -> None:
        self._drop_unsent()
        self._raw.abort()

    def _force_close(self, exc: Optional[BaseException]) -> None:  # called by asyncio's SSLProtocol
        self._drop_unsent()
        force = getattr(self._raw, "_force_close", None)
        if force is not None:
            force(exc)
        else:
            self._raw.abort()

    def is_closing(self) -> bool:
        return self._raw.is_closing()

    def set_protocol(self, protocol: asyncio.BaseProtocol) -> None:
        self._shim._set_upper(protocol)

    def get_protocol(self) -> asyncio.BaseProtocol:
        return self._shim._upper  # type: ignore[return-value]

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return self._raw.get_extra_info(name, default)

    @property
    def closed(self) -> asyncio.Future:
        """Resolves when the socket is gone (connection_lost)."""
        assert self._shim.closed is not None
        return self._shim.closed


class InflightBudget:
    """The bytes of frame bodies being received, over all connections: a body
    holds its announced length from its header until it is complete, and waits
    while the total would exceed ``total``. So a few peers that announce large
    frames and stall hold at most ``total`` bytes of memory together."""

    def __init__(self, total: int) -> None:
        if total < 1:
            raise ValueError(f"the in-flight budget must be at least 1 byte, got {total}")
        self.total = int(total)
        self.used = 0
        self.peak = 0
        self._waiters: list[asyncio.Future] = []

    async def acquire(self, n: int) -> None:
        if n > self.total:  # the server checks max_frame_bytes <= total, so only a bug gets here
            raise ValueError(f"a body of {n} bytes cannot fit an in-flight budget of {self.total}")
        while self.used + n > self.total:
            waiter = asyncio.get_running_loop().create_future()
            self._waiters.append(waiter)
            try:
                await waiter
            finally:
                if waiter in self._waiters:
                    self._waiters.remove(waiter)
        self.used += n
        self.peak = max(self.peak, self.used)

    def release(self, n: int) -> None:
        self.used -= n
        waiters, self._waiters = self._waiters, []
        for waiter in waiters:  # each checks again whether its body fits now
            if not waiter.done():
                waiter.set_result(None)


class BodyDeadline:
    """The time a frame body may take once its header is in: ``grace`` seconds
    plus its length at ``min_rate`` bytes per second (a slow link is fine, a
    peer that announces a frame and stops sending is not)."""

    def __init__(self, grace: float = 30.0, min_rate: float = 64 * 1024) -> None:
        for name, value in (("frame_grace", grace), ("frame_min_rate", min_rate)):
            if not (isinstance(value, (int, float)) and value > 0 and math.isfinite(value)):
                unit = "seconds" if name == "frame_grace" else "bytes per second"
                raise ValueError(f"{name} must be a positive number of {unit}, got {value!r}")
        self.grace = float(grace)
        self.min_rate = float(min_rate)

    def __call__(self, length: int) -> float:
        return self.grace + length / self.min_rate


class Connection:
    """A framed, counted stream connection (either side).

    ``rx`` / ``tx`` are the socket-level byte totals (ciphertext under TLS).
    """

    def __init__(
        self, counting: CountingTransport, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, peer: str
    ) -> None:
        self.counting = counting
        self.reader = reader
        self.writer = writer
        self.peer = peer
        self._sealer: Optional[FrameSealer] = None
        self._opener: Optional[FrameOpener] = None
        #: Limits on each frame body (None: none): see ``.protocol.read_frame``.
        self.body_timeout: Optional[Callable[[int], float]] = None
        self.budget: Optional[InflightBudget] = None

    def secure(self, send_key: bytes, recv_key: bytes) -> None:
        """From now on every frame is sealed (sequence number and MAC) and every
        frame received must verify (see ``.protocol``)."""
        self._sealer = FrameSealer(send_key)
        self._opener = FrameOpener(recv_key)

    def _frame(self, ftype: int, parts: tuple) -> list:
        return self._sealer.seal(ftype, *parts) if self._sealer is not None else encode_frame(ftype, *parts)

    @property
    def rx(self) -> int:
        return self.counting.rx

    @property
    def tx(self) -> int:
        return self.counting.tx

    @property
    def closing(self) -> bool:
        return self.writer.transport.is_closing()

    async def read_frame(self, max_body: int) -> Frame:
        """The next frame; after ``secure``, verified and without its trailer
        (``max_body`` bounds the body without the trailer)."""
        if self._opener is None:
            return await read_frame(self.reader, max_body, body_timeout=self.body_timeout, budget=self.budget)
        limit = min(max_body + TRAILER_BYTES, MAX_FRAME_LIMIT)
        return self._opener.open(
            await read_frame(self.reader, limit, body_timeout=self.body_timeout, budget=self.budget)
        )

    async def send(self, ftype: int, *parts: Any) -> None:
        """Writes one frame and waits until the transport buffer drains."""
        if self.writer.transport.is_closing():
            raise ConnectionClosed("connection is closing")
        self.writer.writelines(self._frame(ftype, parts))
        await self.writer.drain()

    def send_nowait(self, ftype: int, *parts: Any) -> None:
        """Queues one frame (best effort, e.g. an ERROR right before closing)."""
        if not self.writer.transport.is_closing():
            self.writer.writelines(self._frame(ftype, parts))

    def abort(self) -> None:
        self.writer.transport.abort()

    async def close(self, timeout: float = 5.0) -> None:
        """Closes gracefully (flush, TLS close_notify, FIN) and waits until the
        socket is gone; aborts after ``timeout`` seconds."""
        try:
            if not self.writer.transport.is_closing():
                self.writer.close()
            await asyncio.wait_for(asyncio.shield(self.counting.closed), timeout)
        except (asyncio.TimeoutError, OSError):
            self.counting.abort()
            self.writer.transport.abort()
            try:
                await asyncio.wait_for(asyncio.shield(self.counting.closed), 1.0)
            except asyncio.TimeoutError:  # pragma: no cover - the loop never delivered connection_lost
                log.warning("connection to %s did not close", self.peer)
        except asyncio.CancelledError:
            self.counting.abort()
            self.writer.transport.abort()
            raise
        await asyncio.sleep(0)  # let the stream protocol see connection_lost


def _peer_name(transport: asyncio.BaseTransport) -> str:
    peer = transport.get_extra_info("peername")
    if isinstance(peer, tuple) and len(peer) >= 2:
        host = peer[0]
        return f"[{host}]:{peer[1]}" if ":" in str(host) else f"{host}:{peer[1]}"
    return str(peer)


async def peek(counting: CountingTransport, n: int) -> bytes:
    """The first ``n`` bytes the peer sends (fewer if it closes first), before any
    upper protocol is installed; they stay queued and reach the protocol that
    ``establish`` installs (TLS or streams), so nothing is consumed. A server
    uses it to tell a plain-TCP HELLO from a TLS ClientHello."""
    shim = counting._shim
    while len(shim._early) < n and not counting.is_closing() and not (shim.closed is not None and shim.closed.done()):
        shim._early_waiter = asyncio.get_running_loop().create_future()
        counting._raw.resume_reading()
        try:
            await shim._early_waiter
        finally:
            shim._early_waiter = None
            if not counting._raw.is_closing():
                counting._raw.pause_reading()
    return bytes(shim._early[:n])


async def establish(
    counting: CountingTransport,
    *,
    ssl_context: Optional[_ssl.SSLContext] = None,
    server_side: bool = False,
    server_hostname: Optional[str] = None,
    handshake_timeout: Optional[float] = None,
    shutdown_timeout: Optional[float] = None,
) -> Connection:
    """Puts streams (and TLS, when ``ssl_context`` is given) on a counting transport."""
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader(limit=1 << 20)  # pauses the socket above 2 MiB unread
    protocol = asyncio.StreamReaderProtocol(reader)
    transport: asyncio.Transport
    if ssl_context is None:
        counting.set_protocol(protocol)
        protocol.connection_made(counting)
        transport = counting
        counting.resume_reading()
    else:
        kwargs: dict[str, Any] = {"server_side": server_side, "ssl_handshake_timeout": handshake_timeout}
        if not server_side:
            kwargs["server_hostname"] = server_hostname
        if shutdown_timeout is not None and sys.version_info >= (3, 11):
            kwargs["ssl_shutdown_timeout"] = shutdown_timeout
        tls = await loop.start_tls(counting, protocol, ssl_context, **kwargs)
        if tls is None:  # typeshed allows None; CPython always returns the TLS transport
            raise ConnectionError("TLS could not be started on this connection")
        transport = tls
        protocol.connection_made(transport)
    writer = asyncio.StreamWriter(transport, protocol, reader, loop)
    return Connection(counting, reader, writer, _peer_name(counting))


async def open_connection(
    host: str,
    port: int,
    *,
    ssl_context: Optional[_ssl.SSLContext] = None,
    server_hostname: Optional[str] = None,
    timeout: float = 10.0,
    shutdown_timeout: Optional[float] = None,
) -> Connection:
    """Connects to host:port (TCP, then TLS when ``ssl_context`` is given)."""
    loop = asyncio.get_running_loop()
    _, shim = await asyncio.wait_for(loop.create_connection(CountingProtocol, host, port), timeout)
    assert shim.transport is not None
    counting = shim.transport
    try:
        return await establish(
            counting,
            ssl_context=ssl_context,
            server_side=False,
            server_hostname=server_hostname or host,
            handshake_timeout=timeout,
            shutdown_timeout=shutdown_timeout,
        )
    except BaseException:
        counting.abort()
        raise
