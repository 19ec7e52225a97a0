"""The federation client: connect, authenticate, train on each TASK, send UPDATEs.

    def train_fn(global_params, config):
        ...                                   # train from global_params
        return update, num_examples, {"loss": loss}

    client = Client("server.example:8080", token=token, train_fn=train_fn,
                    codec="topk:0.01+q4+zstd", client_id="hospital-3",
                    ssl_context=client_context("cert.pem"))
    stats = client.run_sync()                 # or: await client.run()

``update`` is ``{name: delta}`` (trained minus received; see
``fedpress.federation.model`` for integer and bool tensors; missing tensors
mean "unchanged"). It is compressed by one ``fedpress.Encoder`` that lives
as long as the Client, so error-feedback residuals carry across rounds and
reconnections. The client keeps the last global model it received, so a
server with a downlink codec can send it a compressed delta instead of the
full model. When the connection drops it reconnects with exponential backoff
(with jitter), up to ``max_retries`` consecutive failures; it returns on BYE.
A wrong token on either side raises ``AuthenticationError`` at once
(never retried): the server must prove it knows the token too.
"""

from __future__ import annotations

import asyncio
import functools
import hmac
import inspect
import logging
import random
import secrets
import ssl as _ssl
import time
from collections.abc import Mapping
from typing import Any, Callable, Optional

import numpy as np

from .._seeds import PURPOSE_PAYLOAD, derive_seed
from ..codec import parse_spec
from ..encoder import Encoder
from ..format import decode
from ..format.limits import MAX_INT_WEIGHT
from ..privacy import clip_update
from ..secagg import SecAggClient, SecAggError
from . import protocol as P
from .model import align_update, apply_downlink_delta, as_params, canonical, model_tag
from .secure import client_round, masked_codes
from .transport import BodyDeadline, Connection, open_connection

__all__ = ["Client", "parse_address"]

log = logging.getLogger("fedpress.federation.client")

TrainFn = Callable[[dict, dict], Any]


def parse_address(address: str) -> tuple[str, int]:
    """ "host:port" or "[v6 address]:port" -> (host, port)."""
    if not isinstance(address, str):
        raise TypeError(f"address must be a 'host:port' string, got {type(address).__name__}")
    host, sep, port_text = address.strip().rpartition(":")
    if not sep or not host or not port_text.isdigit() or not 0 < int(port_text) < 65536:
        raise ValueError(f"address must look like 'host:port', got {address!r}")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    return host, int(port_text)


class TLSMismatch(P.FederationError, ConnectionError):
    """One side speaks TLS and the other plain TCP: retrying cannot help."""


def _not_tls(exc: _ssl.SSLError) -> bool:
    """Whether a TLS handshake failed because the server answered in plain bytes."""
    return exc.reason in (
        "WRONG_VERSION_NUMBER",
        "RECORD_LAYER_FAILURE",
        "PACKET_LENGTH_TOO_LONG",
        "HTTP_REQUEST",
        "UNKNOWN_PROTOCOL",
    )


def _secure_weight(config: Any, num_examples: int) -> int:
    """What a client multiplies its codes by under secure aggregation: its example count,
    capped as the server caps it, when the round is weighted (not under DP)."""
    if not isinstance(config, Mapping) or not config.get("weighted"):
        return 1
    cap = config.get("weight_cap")
    weight = num_examples if cap is None else min(num_examples, int(cap))
    return max(1, min(int(weight), MAX_INT_WEIGHT))


class Client:
    """A federation client.

    Parameters
    ----------
    connect: "host:port" of the server.
    token: the shared secret (bytes or str).
    train_fn: ``train_fn(global_params, config) -> (update, num_examples, metrics)``;
        a plain function runs in a worker thread (``train_in_thread``), an
        ``async def`` one on the event loop. It gets its own copy of the model.
    codec: the uplink codec spec; None takes the one the server announces
        (fp32 if it announces none).
    error_feedback: keep what a round did not send for the next one.
    client_id: this client's name on the server (default: random); reconnecting
        with the same id replaces the previous connection.
    ssl_context: a client-side ``ssl.SSLContext`` (``fedpress.federation.client_context``
        with the server's CA). Required unless ``insecure``.
    insecure: connect in plain TCP (no TLS): for loopback and trusted networks.
    reconnect, max_retries, backoff, max_backoff: after a dropped connection,
        retry after ``backoff * 2**(n-1)`` seconds (capped at ``max_backoff``,
        with jitter), at most ``max_retries`` consecutive failures.
    server_hostname: the name the TLS certificate is checked against (default: the host).
    momentum: momentum correction in the Encoder (None: off).
    connect_timeout: seconds for TCP connect plus TLS and the handshake.
    max_frame_bytes: the largest TASK accepted.
    frame_grace, frame_min_rate: once a frame header is in, its body must arrive within
        ``frame_grace + length / frame_min_rate`` seconds (bytes per second), so that a
        server stalling in the middle of a TASK costs a reconnect, not a hung client.
    downlink_deltas: ask for compressed downlink deltas (when the server has a downlink codec).
    initial_params: the initial model, when this client builds it itself (the same model
        factory and seed as the server): it announces the model's tag and the server
        sends compressed deltas from the first round on instead of the full model.
    seed: makes every payload's random choices a function of (seed, client id, round),
        so a run repeats byte for byte (None: fresh randomness).
    clip, warmup_rounds, warmup_start: the Encoder's local clipping and density warm-up.
    codec_options: more ``fedpress.Codec`` options (e.g. ``table="digest"``).
    """

    def __init__(
        self,
        connect: str,
        token: Any,
        train_fn: TrainFn,
        codec: Optional[str] = None,
        error_feedback: bool = True,
        client_id: Optional[str] = None,
        ssl_context: Optional[_ssl.SSLContext] = None,
        reconnect: bool = True,
        max_retries: int = 10,
        backoff: float = 0.5,
        max_backoff: float = 30.0,
        *,
        server_hostname: Optional[str] = None,
        momentum: Optional[float] = None,
        connect_timeout: float = 10.0,
        max_frame_bytes: int = P.DEFAULT_MAX_FRAME,
        train_in_thread: bool = True,
        downlink_deltas: bool = True,
        shutdown_timeout: float = 5.0,
        initial_params: Optional[Mapping[str, Any]] = None,
        seed: Optional[int] = None,
        clip: Optional[float] = None,
        warmup_rounds: int = 0,
        warmup_start: float = 0.25,
        codec_options: Optional[Mapping[str, Any]] = None,
        insecure: bool = False,
        frame_grace: float = 30.0,
        frame_min_rate: float = 64 * 1024,
    ) -> None:
        self.host, self.port = parse_address(connect)
        self.token = P.as_token(token)
        if not callable(train_fn):
            raise TypeError("train_fn must be callable")
        self.train_fn = train_fn
        self.codec = str(parse_spec(codec)) if codec else None
        self.error_feedback = bool(error_feedback)
        self.momentum = momentum
        self.client_id = P.check_client_id(client_id if client_id is not None else f"client-{secrets.token_hex(4)}")
        if ssl_context is not None and not isinstance(ssl_context, _ssl.SSLContext):
            raise TypeError(f"ssl_context must be an ssl.SSLContext, got {type(ssl_context).__name__}")
        if ssl_context is None and not insecure:
            raise ValueError(
                "no TLS: give ssl_context=client_context(ca_file) (None: the system's CAs), or "
                "insecure=True to connect in plain TCP"
            )
        self.ssl_context = ssl_context
        self.server_hostname = server_hostname
        self.reconnect = bool(reconnect)
        self.max_retries = int(max_retries)
        if self.max_retries < 0:
            raise ValueError(f"max_retries must be >= 0, got {max_retries}")
        self.backoff = float(backoff)
        self.max_backoff = float(max_backoff)
        if not (self.backoff >= 0 and self.max_backoff >= 0):
            raise ValueError("backoff and max_backoff must be >= 0")
        self.connect_timeout = float(connect_timeout)
        self.shutdown_timeout = float(shutdown_timeout)
        self.max_frame_bytes = int(max_frame_bytes)
        self.body_deadline = BodyDeadline(frame_grace, frame_min_rate)
        self.train_in_thread = bool(train_in_thread)
        self.downlink_deltas = bool(downlink_deltas)
        self.seed = None if seed is None else int(seed)
        self.encoder_options: dict[str, Any] = {
            "clip": clip,
            "warmup_rounds": int(warmup_rounds),
            "warmup_start": float(warmup_start),
            **dict(codec_options or {}),
        }

        #: The fedpress Encoder (created at the first TASK, kept across reconnects).
        self.encoder: Optional[Encoder] = None
        #: The last global model received, and its tag.
        self.model: Optional[dict[str, np.ndarray]] = None
        self.model_tag: Optional[bytes] = None
        #: The settings from the server's last WELCOME.
        self.settings: dict[str, Any] = {}
        #: Counters: rounds trained/failed, sessions, reconnects, socket bytes
        #: (uplink = sent, downlink = received, TLS records included) and payload bytes.
        self.stats: dict[str, Any] = {
            "rounds": 0,
            "failed_rounds": 0,
            "sessions": 0,
            "reconnects": 0,
            "last_round": None,
            "uplink_wire_bytes": 0,
            "downlink_wire_bytes": 0,
            "uplink_payload_bytes": 0,
            "downlink_payload_bytes": 0,
            "full_models": 0,
            "delta_models": 0,
            "secagg_uplink_bytes": 0,
            "bye": None,
        }
        self._conn: Optional[Connection] = None
        self._pushed_back: Optional[P.Frame] = None  # a frame read while a secure round waited
        self._secure_rounds: dict[int, SecAggClient] = {}  # rounds whose sum this client helps unmask
        self._rng = random.Random()
        if initial_params is not None:
            self.model = canonical(as_params(initial_params))
            self.model_tag = model_tag(self.model)

    def __repr__(self) -> str:
        return f"Client({self.host}:{self.port}, id={self.client_id!r}, codec={self.codec!r})"

    # ================================================================ running
    async def run(self) -> dict[str, Any]:
        """Serves TASKs until the server says BYE; returns ``stats``.

        Raises AuthenticationError (wrong token on either side, never retried),
        or ConnectionError once ``max_retries`` consecutive attempts failed.
        """
        failures = 0
        while True:
            reason = ""
            conn: Optional[Connection] = None
            try:
                conn = await self._connect()
                failures = 0
                self.stats["sessions"] += 1
                if await self._session(conn):
                    return self.stats
                reason = "the server closed the connection"
            except (P.AuthenticationError, _ssl.SSLCertVerificationError):
                raise
            except _ssl.SSLError as exc:
                if _not_tls(exc):  # no retry heals a server that does not speak TLS
                    raise TLSMismatch(
                        f"the server at {self.host}:{self.port} does not speak TLS ({exc.reason}): "
                        "it serves plain TCP (--insecure), so connect with --insecure, or ask for "
                        "a TLS server"
                    ) from None
                reason = str(exc) or type(exc).__name__
            except P.PeerError as exc:
                if exc.code in (P.ErrorCode.AUTH, P.ErrorCode.VERSION, P.ErrorCode.REPLACED):
                    raise
                reason = str(exc)
            except TLSMismatch:
                raise
            except ConnectionRefusedError as exc:
                reason = f"{exc.strerror or exc} (is the server running and listening on that port?)"
            except (ConnectionError, OSError, asyncio.TimeoutError, P.ProtocolError, EOFError) as exc:
                reason = str(exc) or type(exc).__name__
            finally:
                if conn is not None:
                    await self._close(conn)
            failures += 1
            if not self.reconnect or failures > self.max_retries:
                raise ConnectionError(
                    f"client {self.client_id}: giving up after {failures} failed "
                    f"attempt(s) to reach {self.host}:{self.port}: {reason}"
                )
            delay = min(self.max_backoff, self.backoff * 2 ** (failures - 1)) * (0.5 + 0.5 * self._rng.random())
            log.info(
                "client %s: %s; reconnecting in %.2f s (attempt %d of %d)",
                self.client_id,
                reason,
                delay,
                failures,
                self.max_retries,
            )
            self.stats["reconnects"] += 1
            await asyncio.sleep(delay)

    def run_sync(self) -> dict[str, Any]:
        """``asyncio.run(self.run())``."""
        return asyncio.run(self.run())

    async def _close(self, conn: Connection) -> None:
        try:
            await conn.close(self.shutdown_timeout)
        finally:
            self.stats["uplink_wire_bytes"] += conn.tx
            self.stats["downlink_wire_bytes"] += conn.rx
            self._conn = None

    # ============================================================== handshake
    async def _connect(self) -> Connection:
        conn = await open_connection(
            self.host,
            self.port,
            ssl_context=self.ssl_context,
            server_hostname=self.server_hostname,
            timeout=self.connect_timeout,
            shutdown_timeout=self.shutdown_timeout,
        )
        self._conn = conn
        try:
            await asyncio.wait_for(self._handshake(conn), self.connect_timeout)
        except P.ProtocolError as exc:
            await self._close(conn)
            if self.ssl_context is None and isinstance(exc, P.NotAFrame) and exc.tls:
                raise TLSMismatch(
                    f"the server at {self.host}:{self.port} speaks TLS: connect with --tls-ca FILE "
                    "(its certificate or CA; Client(ssl_context=client_context(FILE))), not "
                    "--insecure"
                ) from None
            raise
        except P.ConnectionClosed as exc:
            await self._close(conn)
            if self.ssl_context is None:  # the usual cause: a TLS server, which drops a plain HELLO
                raise P.ConnectionClosed(
                    f"{exc} during the handshake (if the server requires TLS, connect with "
                    "an ssl_context / --tls-ca instead of insecure plain TCP)"
                ) from None
            raise
        except BaseException as exc:
            if isinstance(exc, (asyncio.CancelledError, asyncio.TimeoutError)):
                conn.abort()
            await self._close(conn)  # otherwise graceful: a queued ERROR frame still goes out
            raise
        return conn

    async def _handshake(self, conn: Connection) -> None:
        features = P.FEATURES if self.downlink_deltas else ()
        hello = P.Hello(self.client_id, tuple(features), self.model_tag, self.codec).pack()
        await conn.send(P.FrameType.HELLO, hello)
        frame = await self._expect(conn, P.FrameType.CHALLENGE)
        if len(frame.body) != P.NONCE_BYTES:
            raise P.ProtocolError(P.ErrorCode.PROTOCOL, f"CHALLENGE of {len(frame.body)} bytes")
        server_nonce = frame.body
        client_nonce = P.new_nonce()
        mac = P.client_mac(self.token, server_nonce, client_nonce, self.client_id)
        await conn.send(P.FrameType.AUTH, P.Auth(mac, client_nonce).pack())
        frame = await self._expect(conn, P.FrameType.WELCOME)
        welcome = P.Welcome.unpack(frame.body)
        expected = P.server_mac(self.token, client_nonce, server_nonce, self.client_id)
        if not hmac.compare_digest(expected, welcome.mac):
            conn.send_nowait(P.FrameType.ERROR, P.pack_error(P.ErrorCode.AUTH, "server failed to authenticate"))
            raise P.AuthenticationError(f"the server at {self.host}:{self.port} does not know the token")
        c2s, s2c = P.session_keys(self.token, server_nonce, client_nonce, self.client_id, hello, frame.body)
        conn.secure(send_key=c2s, recv_key=s2c)
        conn.body_timeout = self.body_deadline
        self.settings = welcome.settings
        log.info("client %s: connected to %s:%d", self.client_id, self.host, self.port)

    async def _expect(self, conn: Connection, ftype: P.FrameType) -> P.Frame:
        frame = await conn.read_frame(P.HANDSHAKE_MAX_FRAME)
        if frame.type == P.FrameType.ERROR:
            code, message = P.unpack_error(frame.body)
            if code == P.ErrorCode.AUTH:
                raise P.AuthenticationError(f"the server rejected the token: {message}")
            if code == P.ErrorCode.TLS_REQUIRED:
                raise TLSMismatch(
                    f"the server at {self.host}:{self.port} speaks TLS: connect with --tls-ca FILE "
                    "(its certificate or CA; Client(ssl_context=client_context(FILE))), not "
                    "--insecure"
                )
            raise P.PeerError(code, message)
        if frame.type != ftype:
            raise P.ProtocolError(P.ErrorCode.PROTOCOL, f"expected {ftype.name}, got {frame.type.name}")
        return frame

    # ================================================================ session
    async def _session(self, conn: Connection) -> bool:
        """Serves frames; True on BYE."""
        while True:
            try:
                frame = self._pushed_back or await conn.read_frame(self.max_frame_bytes)
                self._pushed_back = None
                if frame.type == P.FrameType.TASK:
                    task = P.Task.unpack(frame.body)
                    await self._on_task(conn, task)
                elif frame.type == P.FrameType.SECAGG:
                    await self._on_unmask_request(conn, P.SecAgg.unpack(frame.body))
                elif frame.type == P.FrameType.BYE:
                    self.stats["bye"] = P.unpack_text(frame.body)
                    log.info("client %s: server said BYE (%s)", self.client_id, self.stats["bye"])
                    return True
                elif frame.type == P.FrameType.ERROR:
                    raise P.PeerError(*P.unpack_error(frame.body))
                else:
                    raise P.ProtocolError(P.ErrorCode.PROTOCOL, f"unexpected {frame.type.name} frame")
            except P.ProtocolError as exc:
                log.warning("client %s: protocol error from the server: %s", self.client_id, exc)
                conn.send_nowait(P.FrameType.ERROR, P.pack_error(exc.code, str(exc)))
                raise

    async def _call(self, fn: Callable, *args: Any) -> Any:
        if inspect.iscoroutinefunction(fn):
            return await fn(*args)
        if self.train_in_thread:
            result = await asyncio.to_thread(fn, *args)
        else:
            result = fn(*args)
        if inspect.isawaitable(result):
            result = await result
        return result

    def _apply_model(self, task: P.Task) -> dict[str, np.ndarray]:
        """The model a TASK carries, decoded against the model this client holds
        (its tensors, dtypes and shapes bound what a payload may declare)."""
        if task.kind == P.TASK_FULL:
            if len(task.payloads) != 1:
                raise ValueError(f"a full-model TASK carries one payload, this one {len(task.payloads)}")
            return decode(task.payloads[0], table=self.model)
        if self.model is None or task.base_tag != self.model_tag:
            raise ValueError("out of sync: the delta applies to a model this client does not hold")
        params = self.model
        for payload in task.payloads:
            params = apply_downlink_delta(params, decode(payload, table=params))
        return params

    async def _on_task(self, conn: Connection, task: P.Task) -> None:
        r = task.round
        self.stats["downlink_payload_bytes"] += task.payload_bytes
        self.stats["full_models" if task.kind == P.TASK_FULL else "delta_models"] += 1
        started = time.monotonic()
        try:
            model = await asyncio.to_thread(self._apply_model, task)
        except Exception as exc:  # noqa: BLE001 - a bad TASK costs this round, never the client
            self.model = self.model_tag = None  # ask for a full model next time
            log.warning("client %s: cannot use the model of round %d: %s", self.client_id, r, exc)
            await self._send_failure(conn, r, f"cannot apply the model: {exc}")
            return
        self.model, self.model_tag = model, task.model_tag
        secure: Optional[SecAggClient] = None
        if "secagg" in task.config:  # the server aggregates securely: its codec, masked codes
            try:
                secure = client_round(task.config["secagg"], self.client_id)
                ready = await self._secagg_setup(conn, r, secure)
            except (ValueError, SecAggError) as exc:
                log.warning("client %s: secure aggregation of round %d failed: %s", self.client_id, r, exc)
                await self._send_failure(conn, r, f"secure aggregation: {exc}")
                return
            if not ready:  # the server went on without this client
                return
        codec = (
            (task.config.get("codec") if secure is not None else None)
            or self.codec
            or task.config.get("codec")
            or self.settings.get("codec")
            or "fp32"
        )
        if self.encoder is None or self.encoder.spec != str(parse_spec(codec)):
            self.encoder = Encoder(
                codec, error_feedback=self.error_feedback, momentum=self.momentum, **self.encoder_options
            )
        try:
            result = await self._call(self.train_fn, {k: v.copy() for k, v in model.items()}, dict(task.config))
            if not isinstance(result, (tuple, list)) or len(result) != 3:
                raise TypeError("train_fn must return (update, num_examples, metrics)")
            update, num_examples, metrics = result
            num_examples = int(num_examples)
            if not 0 <= num_examples < 2**64:
                raise ValueError(f"num_examples must be a non-negative integer, got {num_examples}")
            metrics = dict(metrics) if isinstance(metrics, Mapping) else {}
            aligned = align_update(update, model)
            if task.config.get("clip_norm") is not None:  # the server asks for client-level clipping
                aligned, _ = clip_update(aligned, float(task.config["clip_norm"]))
            encoder = self.encoder
            # edenB:shared and intB rotate with the round's common seed (the server sums in the rotated domain).
            shared = encoder.codec.spec.shares_rotation
            rotation_seed = task.config.get("rotation_seed") if shared else None
            payload_seed = None if self.seed is None else derive_seed(self.seed, PURPOSE_PAYLOAD, self.client_id, r)
            mu = task.config.get("skellam_mu")  # distributed DP: noise on the codes, under the masks
            # the noise comes from the OS's randomness, never from a seed
            mask = None if secure is None else functools.partial(masked_codes, secure, mu, np.random.default_rng())
            weight = _secure_weight(task.config.get("secagg"), num_examples) if secure is not None else 1
            payload = await asyncio.to_thread(
                functools.partial(
                    encoder.encode,
                    aligned,
                    seed=payload_seed,
                    rotation_seed=rotation_seed,
                    round=r,
                    mask=mask,
                    weight=weight,
                )
            )
        except Exception as exc:  # noqa: BLE001 - a failed round is reported, the client carries on
            log.exception("client %s: training failed in round %d", self.client_id, r)
            await self._send_failure(conn, r, repr(exc))
            return
        if self.seed is None:  # with a seed the bytes repeat exactly: no timings in them
            metrics.setdefault("train_seconds", round(time.monotonic() - started, 6))
        update_frame = P.Update(r, num_examples, metrics, payload)
        await conn.send(P.FrameType.UPDATE, *update_frame.parts())
        if secure is not None:
            self._secure_rounds[r] = secure  # for the server's unmask request
        self.stats["uplink_payload_bytes"] += len(payload)
        self.stats["rounds"] += 1
        self.stats["last_round"] = r

    async def _secagg_setup(self, conn: Connection, r: int, secure: SecAggClient) -> bool:
        """Steps 1 to 4b of a secure round: this client's keys out, its neighbours' in, its
        shares out, those for it in, its report on them out, the server's verdict in (the
        clients out of the round). False when another frame came instead (a new TASK,
        BYE): the server went on without this client, and the session serves it."""
        await self._send_secagg(conn, r, P.SecAggStep.ADVERTISE, secure.advertise())
        keys = await self._expect_secagg(conn, r, P.SecAggStep.KEYS)
        if keys is None:
            return False
        await self._send_secagg(conn, r, P.SecAggStep.SHARES, secure.share_keys(keys))
        routed = await self._expect_secagg(conn, r, P.SecAggStep.ROUTED)
        if routed is None:
            return False
        await self._send_secagg(conn, r, P.SecAggStep.REPORT, secure.report(routed))
        verdict = await self._expect_secagg(conn, r, P.SecAggStep.VERDICT)
        if verdict is None:
            return False
        secure.exclude(verdict)
        return True

    async def _send_secagg(self, conn: Connection, r: int, step: P.SecAggStep, message: bytes) -> None:
        await conn.send(P.FrameType.SECAGG, *P.SecAgg(r, step, message).parts())
        self.stats["secagg_uplink_bytes"] += len(message)

    async def _expect_secagg(self, conn: Connection, r: int, step: P.SecAggStep) -> Optional[bytes]:
        frame = await conn.read_frame(self.max_frame_bytes)
        if frame.type == P.FrameType.SECAGG:
            message = P.SecAgg.unpack(frame.body)
            if message.round != r or message.step != step:
                raise P.ProtocolError(
                    P.ErrorCode.PROTOCOL, f"SECAGG {message.step.name} of round {message.round}, expected {step.name}"
                )
            return message.message
        self._pushed_back = frame
        return None

    async def _on_unmask_request(self, conn: Connection, message: P.SecAgg) -> None:
        """Step 5 to 6: the shares that unmask the round's sum (only to the server, once)."""
        secure = self._secure_rounds.pop(message.round, None)
        if secure is None or message.step != P.SecAggStep.UNMASK_REQUEST:
            raise P.ProtocolError(P.ErrorCode.PROTOCOL, f"unexpected SECAGG {message.step.name}")
        self._secure_rounds.clear()  # earlier rounds are over
        try:
            reply = secure.unmask(message.message)
        except SecAggError as exc:  # e.g. a request for both secrets of one client: refused
            log.warning("client %s: unmask request of round %d refused: %s", self.client_id, message.round, exc)
            return
        await self._send_secagg(conn, message.round, P.SecAggStep.UNMASK, reply)

    async def _send_failure(self, conn: Connection, r: int, error: str) -> None:
        self.stats["failed_rounds"] += 1
        await conn.send(P.FrameType.UPDATE, *P.Update(r, 0, {"error": error[:1000]}, b"", P.UPDATE_FAILED).parts())
