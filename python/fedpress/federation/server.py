"""The federation server: rounds over TCP (optionally TLS), exact byte accounting.

    server = Server("0.0.0.0", 8080, initial_params, rounds=20, clients_per_round=8,
                    min_clients=8, codec="topk:0.01+q4+zstd", downlink="topk:0.1+fp16",
                    token=token, round_timeout=120, min_fit=4, evaluate_fn=evaluate,
                    out_dir="run1", ssl_context=server_context("cert.pem", "key.pem"))
    history = server.run_sync()          # or: await server.run()

Each round: wait until ``min_clients`` authenticated clients are idle, sample
``clients_per_round`` of them (RNG seeded by ``(seed, round)``), send each a
TASK, stream the UPDATEs into a ``fedpress.Aggregator`` (weighted by
``num_examples``) until all answered or ``round_timeout`` passed, then
``global += server_lr * mean update`` (see ``fedpress.federation.model`` for
integer and bool tensors). With fewer than ``min_fit`` valid updates the model
is kept and the round is marked failed. A client that disconnects, times out
or sends an invalid payload is left out of the round, never takes it down.

After each round: ``evaluate_fn(params) -> {"loss", "accuracy", ...}`` (if
given), one JSON line appended to ``out_dir/rounds.jsonl`` and the global model
checkpointed atomically (``checkpoint.json`` + ``checkpoint-<round>.npz``);
``resume=True`` continues from the last checkpoint. The same rows are in
``Server.history``.
"""

from __future__ import annotations

import asyncio
import hmac
import inspect
import json
import logging
import math
import os
import secrets
import ssl as _ssl
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional, TypeVar, Union

import numpy as np

from .._seeds import PURPOSE_ROTATION, PURPOSE_SAMPLING, derive_seed
from .._update_math import scale, unchanged, update_table
from ..aggregate import Aggregator
from ..codec import parse_spec
from ..format import DecodeError, decode
from ..robust import AggregationRule, cap_shares, clip_factor, robust_combine
from ..secagg import SecAggError
from . import protocol as P
from .accounting import ConnectionAccount, Ledger, TrafficRow
from .dp import RunPrivacy, run_privacy
from .model import (
    CHECKPOINT_JSON,
    DOWNLINK_MODES,
    ClientDownlink,
    Downlink,
    ServerOptimizer,
    as_params,
    atomic_write,
    load_checkpoint,
    make_downlink,
    remove_partial_writes,
    save_checkpoint,
    table,
    zero_reference,
)
from .secure import SecureRound, SecureSettings, check_masked_update, secure_settings
from .transport import BodyDeadline, Connection, CountingProtocol, CountingTransport, InflightBudget, establish, peek

__all__ = ["Server", "RunExistsError", "WaitTimeout", "previous_run", "round_config", "sample_clients"]

_Id = TypeVar("_Id")  # a client id (the sweep samples indices too)

log = logging.getLogger("fedpress.federation.server")

ROUNDS_FILE = "rounds.jsonl"


class _Peer:
    """An authenticated client connection."""

    def __init__(
        self, client_id: str, conn: Connection, account: ConnectionAccount, hello: P.Hello, features: tuple
    ) -> None:
        self.client_id = client_id
        self.conn = conn
        self.account = account
        self.held: Optional[bytes] = hello.model_tag
        self.deltas_ok = "downlink-delta" in features
        self.codec = hello.codec
        self.busy_round: Optional[int] = None
        self.task_tag: Optional[bytes] = None
        self.waiter: Optional[asyncio.Future] = None
        self.secagg_ok = "secure-aggregation" in features
        # SECAGG messages of the round this client takes part in securely (None: none);
        # None in the queue: the client is gone. The counter counts the round's protocol bytes.
        self.secagg_round: Optional[int] = None
        self.secagg_inbox: Optional[asyncio.Queue] = None
        self.secagg_counter: Optional[Callable[[str, bytes], None]] = None


class RunExistsError(P.FederationError, ValueError):
    """``out_dir`` holds a previous run, and neither resume nor overwrite was asked for."""


class WaitTimeout(P.FederationError, asyncio.TimeoutError):
    """Fewer than ``min_clients`` clients connected within ``wait_timeout`` seconds."""


def previous_run(out_dir: Path) -> str:
    """What of a previous run ``out_dir`` holds ("" if nothing): rounds or checkpoints."""
    out_dir = Path(out_dir)
    found = []
    rounds = out_dir / ROUNDS_FILE
    if rounds.is_file() and rounds.stat().st_size > 0:
        found.append(ROUNDS_FILE)
    if (out_dir / CHECKPOINT_JSON).exists() or any(out_dir.glob("checkpoint-*.npz")):
        found.append("a checkpoint")
    return " and ".join(found)


@dataclass
class _Held:
    """One valid update of the round, kept until the round closes."""

    payload: Any  # the compressed update (None: already in the sum)
    weight: float  # num_examples, capped by max_examples
    factor: float  # the clip factor, 1.0 when not clipped
    update: Optional[dict[str, np.ndarray]]  # decoded and clipped, for a robust statistic
    client: str = ""  # who sent it: held updates are summed in this order


async def _expect(conn: Any, kind: P.FrameType) -> bytes:
    """The body of the next handshake frame, which must be of type `kind`."""
    frame = await conn.read_frame(P.HANDSHAKE_MAX_FRAME)
    if frame.type == P.FrameType.ERROR:
        raise P.PeerError(*P.unpack_error(frame.body))
    if frame.type != kind:
        raise P.ProtocolError(P.ErrorCode.PROTOCOL, f"expected {kind.name}, got {frame.type.name}")
    return frame.body


class Server:
    """A federated-learning server on host:port (port 0: the OS picks; see
    ``port`` once bound).

    Parameters
    ----------
    host, port: where to listen.
    initial_params: the model, ``{name: array}`` (numpy or torch tensors).
    rounds: rounds to run (rounds already done count when resuming).
    clients_per_round: clients sampled per round.
    min_clients: idle authenticated clients to wait for before a round
        (default ``clients_per_round``).
    codec: the uplink codec spec announced to clients that do not pick their own.
    downlink: None (the full model, fp32, every TASK) or a codec spec for
        compressed deltas to clients that hold the previous global model.
    token: the shared secret (bytes or str); it never crosses the wire.
    master_token: instead of ``token``: each client authenticates with its own
        token, ``fedpress.federation.protocol.client_token`` of this master and
        its client id (``fedpress token --master F --client-id ID``), so one client
        cannot claim another's id. The server holds only the master.
    round_timeout: seconds from sending the TASKs until the round closes.
    min_fit: valid updates needed for the round to change the model.
    server_lr: the server step applied to the mean update.
    server_momentum: FedAvgM's beta (0: plain FedAvg); see ``ServerOptimizer``.
    server_lr_decay: None, or the fraction of ``server_lr`` a half-cosine schedule reaches
        in the last round.
    evaluate_fn: ``evaluate_fn(params) -> {"loss": .., "accuracy": ..}`` after
        each round (and on the initial model, in the round-0 row).
    out_dir: where ``rounds.jsonl`` and the checkpoints go (None: nowhere). A previous
        run there is never replaced silently: RunExistsError unless ``resume`` or ``overwrite``.
    resume: continue from ``out_dir``'s last checkpoint.
    overwrite: start afresh in an ``out_dir`` that holds a previous run (its rounds.jsonl
        and checkpoints are replaced once the listener is bound, not before).
    ordered: sum each round's updates in client-id order, not in their order of
        arrival, so that a seeded run repeats bit for bit (float sums depend on their
        order); the round's compressed updates are held until it closes.
    seed: client sampling seed.
    ssl_context: a server-side ``ssl.SSLContext`` for TLS
        (``fedpress.federation.server_context``). Required unless ``insecure``.
    insecure: serve plain TCP (frames stay authenticated, but the model and the
        updates cross the network in clear): for loopback and trusted networks.
    max_frame_bytes: the largest frame body accepted from an authenticated
        client (handshake frames are capped at 64 KiB). None: twice the model's
        float32 size plus 1 MiB (an fp32 update and its framing fit with room).
    handshake_timeout: seconds for TCP accept to WELCOME (TLS included).
    hello_timeout: seconds from TCP accept to a complete HELLO (TLS included): an
        idle connection is dropped this soon.
    max_pending_per_address: connections from one IP address allowed in their
        handshake at once; a further one evicts that address's oldest.
    frame_grace, frame_min_rate: once a frame header is in, its body must arrive
        within ``frame_grace + length / frame_min_rate`` seconds (bytes per second);
        a client that announces a frame and stalls loses its connection.
    inflight_bytes: the most frame-body bytes being received at once over all
        connections (a body waits for room, within its deadline); None: four
        times ``max_frame_bytes``, at least 64 MiB.
    fit_config: a dict, or ``fit_config(round) -> dict``, merged into each TASK's config.
    downlink_history: delta versions kept for clients that skipped rounds.
    downlink_mode: ``"chain"`` (one replica for all clients; a client that skipped
        rounds receives every delta it missed) or ``"client"`` (the server keeps the
        model each client holds and sends it one compressed difference; the
        downlink then shrinks with participation). See ``ClientDownlink``.
    downlink_clients: with ``downlink_mode="client"``, the most client models kept
        (least recently sampled forgotten first; a forgotten client receives the full
        model); None: all. Each costs one model of server memory.
    shutdown_timeout: seconds to wait for clients to close after BYE.
    wait_timeout: seconds to wait for ``min_clients`` before a round (None: forever);
        exceeding it raises TimeoutError from ``run``.
    max_pending: connections allowed in their handshake at once; a further one
        evicts the oldest.
    max_examples: the most ``num_examples`` one client's update may weigh; a larger
        claim is cut to it (and marked ``weight_capped`` in the round's row).
    max_share: the largest fraction of a round's total weight one client may hold
        (``fedpress.robust.cap_shares``); None: no cap.
    clip_norm: each decoded update is scaled to at most this L2 norm before it is
        averaged (the mean still divides by the unclipped weights); None: no clip.
    secure_aggregation: the server learns only the sum of each round's updates
        (``fedpress.secagg``; docs/secure-aggregation.md): ``codec`` must be ``intB``, clients
        follow it and mask their codes, each update weighs the same, and up to
        ``dropout_tolerance`` of the sampled clients may drop out. Each stage of the
        protocol waits ``secagg_timeout`` seconds for the clients' messages.
    dp_noise_multiplier, dp_target_epsilon: differential privacy (``fedpress.federation.dp``),
        with one of them: Gaussian noise of z * ``clip_norm`` on the sum of clipped updates
        (central), or under secure aggregation Skellam noise the clients add to their codes
        (distributed); every update weighs the same, clients clip to ``clip_norm`` before
        compressing, and rounds.jsonl carries (epsilon, ``dp_delta``) after each round.
        ``dp_sampling_rate``: the fraction of the population sampled per round (1: no
        amplification by sampling claimed).
    aggregation: ``"mean"`` (FedAvg, streamed over compressed payloads), ``"median"`` or
        ``"trimmed:F"`` (coordinate-wise over the decoded updates, unweighted; the
        round's updates are held at once, so the model must fit
        ``clients_per_round`` times in ``robust_memory`` bytes).
    """

    def __init__(
        self,
        host: str,
        port: int,
        initial_params: Mapping[str, Any],
        rounds: int,
        clients_per_round: int,
        min_clients: Optional[int] = None,
        codec: Optional[str] = None,
        downlink: Optional[str] = None,
        token: Union[bytes, str, None] = None,
        round_timeout: float = 60.0,
        min_fit: int = 1,
        server_lr: float = 1.0,
        evaluate_fn: Optional[Callable[[dict], Mapping[str, Any]]] = None,
        out_dir: Union[str, os.PathLike, None] = None,
        resume: bool = False,
        seed: int = 0,
        ssl_context: Optional[_ssl.SSLContext] = None,
        max_frame_bytes: Optional[int] = None,
        handshake_timeout: float = 10.0,
        *,
        fit_config: Union[Mapping[str, Any], Callable[[int], Mapping[str, Any]], None] = None,
        downlink_history: int = 8,
        shutdown_timeout: float = 5.0,
        wait_timeout: Optional[float] = None,
        max_pending: int = 256,
        server_momentum: float = 0.0,
        server_lr_decay: Optional[float] = None,
        downlink_mode: str = "chain",
        downlink_clients: Optional[int] = None,
        master_token: Union[bytes, str, None] = None,
        max_examples: Optional[int] = None,
        max_share: Optional[float] = None,
        clip_norm: Optional[float] = None,
        aggregation: str = "mean",
        robust_memory: int = 2 << 30,
        hello_timeout: float = 2.0,
        max_pending_per_address: int = 16,
        frame_grace: float = 30.0,
        frame_min_rate: float = 64 * 1024,
        inflight_bytes: Optional[int] = None,
        insecure: bool = False,
        overwrite: bool = False,
        ordered: bool = False,
        secure_aggregation: bool = False,
        dropout_tolerance: float = 0.3,
        secagg_timeout: float = 30.0,
        dp_noise_multiplier: Optional[float] = None,
        dp_target_epsilon: Optional[float] = None,
        dp_delta: float = 1e-5,
        dp_sampling_rate: float = 1.0,
    ) -> None:
        if (token is None) == (master_token is None):
            raise ValueError(
                "give exactly one of token (shared by all clients) and master_token (per-client tokens derived from it)"
            )
        self.token = None if token is None else P.as_token(token)
        self.master_token = None if master_token is None else P.as_token(master_token)
        self.host = host
        self._requested_port = int(port)
        if not 0 <= self._requested_port <= 65535:
            raise ValueError(f"port must be in 0..65535, got {port}")
        self.params = as_params(initial_params)
        self.rounds = _positive_int(rounds, "rounds")
        self.clients_per_round = _positive_int(clients_per_round, "clients_per_round")
        self.min_clients = self.clients_per_round if min_clients is None else _positive_int(min_clients, "min_clients")
        self.min_fit = _positive_int(min_fit, "min_fit")
        if self.min_fit > self.clients_per_round:
            raise ValueError(f"min_fit ({min_fit}) cannot exceed clients_per_round ({clients_per_round})")
        self.codec = str(parse_spec(codec)) if codec else None
        self.downlink = str(parse_spec(downlink)) if downlink else None
        self.round_timeout = _positive_float(round_timeout, "round_timeout")
        self.handshake_timeout = _positive_float(handshake_timeout, "handshake_timeout")
        self.shutdown_timeout = _positive_float(shutdown_timeout, "shutdown_timeout")
        self.wait_timeout = None if wait_timeout is None else _positive_float(wait_timeout, "wait_timeout")
        self.server_lr = float(server_lr)
        if not math.isfinite(self.server_lr):
            raise ValueError(f"server_lr must be finite, got {server_lr}")
        self.optimizer = ServerOptimizer(self.server_lr, server_momentum, decay=server_lr_decay, rounds=self.rounds)
        self.evaluate_fn = evaluate_fn
        self.out_dir = Path(out_dir) if out_dir is not None else None
        if resume and self.out_dir is None:
            raise ValueError("resume=True needs out_dir")
        if resume and overwrite:
            raise ValueError("resume=True continues the run in out_dir, overwrite=True replaces it: not both")
        self.resume = bool(resume)
        self.overwrite = bool(overwrite)
        self.ordered = bool(ordered)
        if self.out_dir is not None and not (self.resume or self.overwrite):
            found = previous_run(self.out_dir)
            if found:
                raise RunExistsError(
                    f"{self.out_dir} holds a previous run ({found}): resume it (resume=True, "
                    "--resume) or replace it (overwrite=True, --overwrite), or choose another "
                    "directory"
                )
        self.seed = int(seed)
        if ssl_context is not None and not isinstance(ssl_context, _ssl.SSLContext):
            raise TypeError(f"ssl_context must be an ssl.SSLContext, got {type(ssl_context).__name__}")
        if ssl_context is None and not insecure:
            raise ValueError(
                "no TLS: give ssl_context=server_context(cert, key) (`fedpress certificate` makes a "
                "self-signed pair for a test deployment), or insecure=True to serve plain TCP"
            )
        self.ssl_context = ssl_context
        self.insecure = ssl_context is None
        if max_frame_bytes is None:
            fp32 = sum(4 * int(v.size) for v in self.params.values())
            max_frame_bytes = min(2 * fp32 + (1 << 20), P.MAX_FRAME_LIMIT - P.TRAILER_BYTES)
        self.max_frame_bytes = int(max_frame_bytes)
        if not 1 <= self.max_frame_bytes <= P.MAX_FRAME_LIMIT:
            raise ValueError(f"max_frame_bytes must be in 1..{P.MAX_FRAME_LIMIT}, got {max_frame_bytes}")
        self.hello_timeout = _positive_float(hello_timeout, "hello_timeout")
        self.max_pending_per_address = _positive_int(max_pending_per_address, "max_pending_per_address")
        self.body_deadline = BodyDeadline(
            _positive_float(frame_grace, "frame_grace"), _positive_float(frame_min_rate, "frame_min_rate")
        )
        if inflight_bytes is None:
            inflight_bytes = max(4 * (self.max_frame_bytes + P.TRAILER_BYTES), 64 << 20)
        if int(inflight_bytes) < self.max_frame_bytes + P.TRAILER_BYTES:
            raise ValueError(
                f"inflight_bytes ({inflight_bytes}) must hold at least one frame of max_frame_bytes "
                f"({self.max_frame_bytes}) and its tag"
            )
        self.budget = InflightBudget(int(inflight_bytes))
        self.fit_config = fit_config
        self.downlink_history = int(downlink_history)
        if downlink_mode not in DOWNLINK_MODES:
            raise ValueError(f"downlink_mode must be one of {', '.join(DOWNLINK_MODES)}, got {downlink_mode!r}")
        if downlink_mode == "client" and self.downlink is None:
            raise ValueError("downlink_mode='client' needs a downlink codec spec (downlink=...)")
        self.downlink_mode = downlink_mode
        self.downlink_clients = (
            None if downlink_clients is None else _positive_int(downlink_clients, "downlink_clients")
        )
        self.max_pending = _positive_int(max_pending, "max_pending")
        self.max_examples = None if max_examples is None else _positive_int(max_examples, "max_examples")
        self.max_share = None if max_share is None else float(max_share)
        if self.max_share is not None and not 0.0 < self.max_share <= 1.0:
            raise ValueError(f"max_share must be in (0, 1], got {max_share}")
        self.clip_norm = None if clip_norm is None else _positive_float(clip_norm, "clip_norm")
        self.aggregation = AggregationRule.parse(aggregation)
        if self.aggregation.holds_updates:
            held = self.clients_per_round * sum(4 * max(1, int(v.size)) for v in self.params.values())
            if held > robust_memory:
                raise ValueError(
                    f"aggregation={aggregation!r} holds the round's {self.clients_per_round} decoded "
                    f"updates ({held / 2**20:.0f} MiB) in memory, more than robust_memory "
                    f"({robust_memory / 2**20:.0f} MiB): use the streamed mean with clip_norm / "
                    "max_share, or raise robust_memory"
                )

        self.secagg_timeout = _positive_float(secagg_timeout, "secagg_timeout")
        self.secure: Optional[SecureSettings] = None
        private = dp_noise_multiplier is not None or dp_target_epsilon is not None
        if (secure_aggregation or private) and (self.aggregation.holds_updates or self.max_share is not None):
            raise ValueError(
                "secure aggregation and differential privacy take the plain mean: no robust aggregation or max_share"
            )
        if secure_aggregation:
            self.secure = secure_settings(self.codec, self.params, self.clients_per_round, dropout_tolerance)
        # Clients clip their updates before compressing them under secure aggregation (the
        # server sees only the sum) and differential privacy; the server clips decoded
        # updates itself whenever it sees them.
        self.client_clip_norm = self.clip_norm if (secure_aggregation or private) else None
        if secure_aggregation:
            self.clip_norm = None
        self.dp: Optional[RunPrivacy] = None
        if private:
            self.dp = run_privacy(
                noise_multiplier=dp_noise_multiplier,
                target_epsilon=dp_target_epsilon,
                clip_norm=self.client_clip_norm,
                delta=float(dp_delta),
                sampling_rate=float(dp_sampling_rate),
                rounds=self.rounds,
                clients_per_round=self.clients_per_round,
                secure=self.secure,
            )

        #: The port the server listens on (None until bound).
        self.port: Optional[int] = None
        #: One dict per row of rounds.jsonl: the round-0 setup row(s), then one per round.
        self.history: list[dict[str, Any]] = []
        #: The last completed round.
        self.round = 0
        #: Connections rejected since this server started (all rows).
        self.rejected_connections = 0
        self.federation_id = secrets.token_hex(8)

        self._start_round = 0
        self._downlink_state: Optional[Union[Downlink, ClientDownlink]] = None
        self._ledger = Ledger()
        self._peers: dict[str, _Peer] = {}
        self._tasks: set[asyncio.Task] = set()
        # Connections in their handshake, oldest first, with their IP address.
        self._handshaking: dict[asyncio.Task, str] = {}
        self._evicted: dict[asyncio.Task, str] = {}
        self._listener: Optional[asyncio.AbstractServer] = None
        self._changed: Optional[asyncio.Event] = None
        self._closing = False
        self._started = False
        self._reference: Optional[bytes] = None

    def __repr__(self) -> str:
        return (
            f"Server({self.host!r}, port={self.port}, rounds={self.rounds}, "
            f"clients_per_round={self.clients_per_round}, codec={self.codec!r}, downlink={self.downlink!r})"
        )

    # ================================================================ lifecycle
    @property
    def address(self) -> tuple[str, Optional[int]]:
        return self.host, self.port

    @property
    def clients(self) -> list[str]:
        """Ids of the authenticated clients connected now."""
        return sorted(self._peers)

    async def start(self) -> None:
        """Loads the checkpoint (resume) and binds the listener; ``port`` is
        valid afterwards. ``run`` calls it when needed."""
        if self._started:
            return
        self._started = True
        loop = asyncio.get_running_loop()
        self._changed = asyncio.Event()
        self._ledger = Ledger()
        # Bound first: a server that cannot listen (the port is taken) leaves out_dir as it was.
        self._listener = await loop.create_server(
            lambda: CountingProtocol(self._accept), self.host, self._requested_port
        )
        try:
            self._prepare_state()
        except BaseException:
            self._listener.close()
            raise
        self.port = self._listener.sockets[0].getsockname()[1]
        log.info(
            "listening on %s:%d (%s), rounds %d..%d",
            self.host,
            self.port,
            "TLS" if self.ssl_context else "plain TCP",
            self._start_round + 1,
            self.rounds,
        )
        if self.insecure:  # loud unless nothing leaves the machine
            loopback = self.host in ("127.0.0.1", "::1", "localhost")
            log.log(
                logging.INFO if loopback else logging.WARNING,
                "plain TCP on %s:%d: frames are authenticated, but models and updates travel in clear",
                self.host,
                self.port,
            )

    async def run(self) -> list[dict[str, Any]]:
        """Runs the remaining rounds, says BYE and closes; returns ``history``.

        Cancelling it (or an error) aborts every connection without BYE and
        writes nothing more: a crash, from which ``resume=True`` recovers.
        """
        if self._closing:
            raise RuntimeError("this Server has already run; create a new one (resume=True continues)")
        await self.start()
        graceful = False
        try:
            setup_row: dict[str, Any] = {
                "round": 0,
                "phase": "setup",
                "status": "ok",
                "failed_round": False,
                "resumed_from": self._start_round if self._start_round else None,
                "sampled": [],
                "completed": [],
                "failed": [],
                "failures": {},
                "num_examples": 0,
                "fit_metrics": {},
                "clients": {},
            }
            if self._start_round >= self.rounds:
                log.info("checkpoint is at round %d of %d: nothing to do", self._start_round, self.rounds)
                await self._shutdown(graceful=True)
                graceful = True
                return self.history
            setup_row.update(await self._evaluate(self.params))
            setup: Optional[dict[str, Any]] = setup_row  # until the first round starts
            for r in range(self._start_round + 1, self.rounds + 1):
                await self._wait_for_clients(r)
                if setup is not None:  # the first round starts: the setup row is complete
                    row = self._ledger.row
                    self._ledger.start_row(r)
                    self._finish_row(row, setup)
                    setup = None
                info = await self._train_round(r)
                self.round = r
                if r == self.rounds:
                    await self._shutdown(graceful=True)
                    graceful = True
                row = self._ledger.row
                if r < self.rounds:
                    self._ledger.start_row(r + 1)
                self._finish_row(row, info)
                self._checkpoint(r)
            return self.history
        finally:
            if not graceful:
                await self._shutdown(graceful=False)

    def run_sync(self) -> list[dict[str, Any]]:
        """``asyncio.run(self.run())``."""
        return asyncio.run(self.run())

    # ============================================================ state / disk
    def _prepare_state(self) -> None:
        if self.out_dir is not None:
            self.out_dir.mkdir(parents=True, exist_ok=True)
        self._downlink_state = self._new_downlink()
        self._reference = zero_reference(self.params)
        if self.out_dir is None:
            return
        rounds_path = self.out_dir / ROUNDS_FILE
        for leftover in remove_partial_writes(self.out_dir, [CHECKPOINT_JSON, "checkpoint-*.npz", ROUNDS_FILE]):
            log.info("removed %s, left by a write that was interrupted", leftover)
        checkpoint = load_checkpoint(self.out_dir) if self.resume else None
        if self.resume and checkpoint is None:
            log.info("resume: no checkpoint in %s, starting from round 0", self.out_dir)
        if checkpoint is None:
            # A fresh federation (overwrite=True, or nothing was there): forget any earlier run.
            for stale in [self.out_dir / CHECKPOINT_JSON, *self.out_dir.glob("checkpoint-*.npz")]:
                if stale.exists():
                    stale.unlink()
            atomic_write(rounds_path, lambda f: None)
            return
        meta, params, arrays = checkpoint
        if table(params) != table(self.params):
            raise ValueError(
                f"checkpoint in {self.out_dir} holds a different model "
                f"({len(params)} tensors) than initial_params ({len(self.params)} tensors)"
            )
        self.params = {k: np.array(v) for k, v in params.items()}
        if self.optimizer.momentum and meta.get("server_momentum") == self.optimizer.momentum:
            self.optimizer.buffers = {
                name: np.array(arrays[f"m{i}"]) for i, name in enumerate(self.params) if f"m{i}" in arrays
            }
        self._start_round = self.round = int(meta["round"])
        self.federation_id = str(meta.get("federation", self.federation_id))
        self._downlink_state = self._new_downlink()
        saved = meta.get("downlink")
        if (
            self.downlink is not None
            and saved
            and meta.get("downlink_spec") == self.downlink
            and saved.get("mode", "chain") == self.downlink_mode
        ):
            self._downlink_state.restore(saved, arrays, list(self.params))
        rows = []
        if rounds_path.exists():
            for line in rounds_path.read_text().splitlines():
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except ValueError:
                    continue  # a line torn by the crash
                if int(row.get("round", 0)) <= self._start_round:
                    rows.append(row)
        text = "".join(json.dumps(r) + "\n" for r in rows).encode()
        atomic_write(rounds_path, lambda f: f.write(text))
        self.history = rows
        if self.dp is not None:  # the privacy the rounds before spent (those that released a model)
            spent = sum(1 for r in rows if r.get("phase") == "train" and r.get("status") == "ok")
            if spent:
                self.dp.accountant.step(spent)
        log.info("resumed from %s at round %d", self.out_dir, self._start_round)

    def _new_downlink(self) -> Union[Downlink, ClientDownlink]:
        return make_downlink(
            self.downlink,
            self.params,
            self.downlink_mode,
            history=self.downlink_history,
            seed=self.seed,
            max_clients=self.downlink_clients,
        )

    def _checkpoint(self, r: int) -> None:
        if self.out_dir is None:
            return
        dl = self._downlink_state if self.downlink is not None else None
        save_checkpoint(
            self.out_dir,
            r,
            self.params,
            {
                "federation": self.federation_id,
                "seed": self.seed,
                "rounds": self.rounds,
                "downlink_spec": self.downlink,
                "codec": self.codec,
                "time": time.time(),
                "server_momentum": self.optimizer.momentum,
            },
            dl,
            self.optimizer.buffers,
        )

    def _finish_row(self, row: TrafficRow, info: dict[str, Any]) -> dict[str, Any]:
        record = dict(info)
        record.update(row.totals())
        record["seconds"] = round(time.monotonic() - row.started, 6)
        record["codec"] = self.codec
        record["downlink"] = self.downlink
        if self.downlink_mode != "chain":
            record["downlink_mode"] = self.downlink_mode
        record["connected"] = len(self._peers)
        record = json.loads(P.dumps_json(record))
        self.history.append(record)
        if record.get("phase") == "train":
            log.info("%s", round_line(record, self.rounds))
        if self.out_dir is not None:
            with open(self.out_dir / ROUNDS_FILE, "ab") as f:
                f.write(json.dumps(record, allow_nan=False).encode() + b"\n")
                f.flush()
                os.fsync(f.fileno())
        return record

    # ============================================================ connections
    def _accept(self, counting: CountingTransport) -> None:
        """CountingProtocol.connection_made: a new socket."""
        account = self._ledger.account()
        counting.on_bytes = account
        task = asyncio.get_running_loop().create_task(self._serve_connection(counting, account))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        if self._closing:
            return
        address = _host(counting)
        same = [t for t, a in self._handshaking.items() if a == address]
        if len(same) >= self.max_pending_per_address:
            self._evict(same[0], f"{len(same)} handshakes pending from {address}; the oldest goes")
        elif len(self._handshaking) >= self.max_pending:
            self._evict(next(iter(self._handshaking)), f"{len(self._handshaking)} handshakes pending; the oldest goes")
        self._handshaking[task] = address

    def _evict(self, task: asyncio.Task, reason: str) -> None:
        """Ends a connection still in its handshake to make room for a newer one:
        an idle flood cannot lock out a client that completes its handshake."""
        del self._handshaking[task]
        self._evicted[task] = reason
        task.cancel()

    async def _serve_connection(self, counting: CountingTransport, account: ConnectionAccount) -> None:
        holder: dict[str, Any] = {}
        peer: Optional[_Peer] = None
        try:
            if self._closing:
                await self._reject(counting, account, holder, None, "server shutting down")
                return
            try:
                hello, nonce, auth = await asyncio.wait_for(self._handshake(counting, holder), self.handshake_timeout)
            except asyncio.TimeoutError:
                await self._reject(counting, account, holder, P.ErrorCode.TIMEOUT, "handshake timed out")
                return
            except P.ProtocolError as exc:
                await self._reject(counting, account, holder, exc.code, str(exc))
                return
            except P.AuthenticationError as exc:
                await self._reject(
                    counting, account, holder, P.ErrorCode.AUTH, str(exc), public="authentication failed"
                )
                return
            except P.PeerError as exc:
                await self._reject(counting, account, holder, None, str(exc))
                return
            except (ConnectionError, OSError, _ssl.SSLError, EOFError) as exc:
                await self._reject(counting, account, holder, None, f"connection failed: {exc!r}")
                return
            except Exception as exc:  # noqa: BLE001 - a bug here must not leak the socket
                log.exception("handshake failed unexpectedly")
                await self._reject(
                    counting, account, holder, P.ErrorCode.INTERNAL, f"internal error: {exc!r}", public="internal error"
                )
                return
            finally:
                self._handshaking.pop(asyncio.current_task(), None)  # type: ignore[arg-type]
            conn: Connection = holder["conn"]
            account.admit(hello.client_id)
            features = P.check_features(hello.features)
            if self.downlink is None:
                features = tuple(f for f in features if f != "downlink-delta")
            peer = _Peer(hello.client_id, conn, account, hello, features)
            settings = {
                "features": list(features),
                "federation": self.federation_id,
                "codec": self.codec,
                "downlink": self.downlink,
                "rounds": self.rounds,
                "round": self.round,
                "max_frame_bytes": self.max_frame_bytes,
            }
            token = self._token_for(hello.client_id)
            welcome_body = P.Welcome(P.server_mac(token, auth.client_nonce, nonce, hello.client_id), settings).pack()
            try:
                await conn.send(P.FrameType.WELCOME, welcome_body)
                c2s, s2c = P.session_keys(
                    token, nonce, auth.client_nonce, hello.client_id, holder["hello"], welcome_body
                )
                conn.secure(send_key=s2c, recv_key=c2s)
            except (ConnectionError, OSError) as exc:
                log.info("client %s dropped during its WELCOME: %r", hello.client_id, exc)
                await conn.close(1.0)
                return
            conn.body_timeout, conn.budget = self.body_deadline, self.budget
            self._register(peer)
            await self._peer_loop(peer)
        except asyncio.CancelledError:
            task = asyncio.current_task()
            evicted = self._evicted.pop(task, None)  # type: ignore[arg-type]
            if evicted is not None and not self._closing:
                uncancel = getattr(task, "uncancel", None)
                if uncancel is not None:
                    uncancel()
                await self._reject(counting, account, holder, P.ErrorCode.BUSY, f"evicted: {evicted}")
                return
            if account.state == "pending":  # cancelled in its handshake (shutdown)
                account.reject()
                self.rejected_connections += 1
            opened = holder.get("conn")
            if opened is not None:
                opened.abort()
            else:
                counting.abort()
            if peer is not None:
                self._drop_peer(peer, "server stopped")
            raise

    async def _handshake(self, counting: CountingTransport, holder: dict[str, Any]) -> tuple[P.Hello, bytes, P.Auth]:
        async def first_frame() -> bytes:
            if self.ssl_context is not None and await peek(counting, len(P.MAGIC)) == P.MAGIC:
                # A plain-TCP client: tell it in plain TCP, so that it stops instead of retrying.
                counting.writelines(
                    P.encode_frame(
                        P.FrameType.ERROR,
                        P.pack_error(
                            P.ErrorCode.TLS_REQUIRED, "this server requires TLS: connect with --tls-ca (not --insecure)"
                        ),
                    )
                )
                raise P.ProtocolError(P.ErrorCode.TLS_REQUIRED, "a plain-TCP HELLO on this TLS server")
            conn = await establish(
                counting,
                ssl_context=self.ssl_context,
                server_side=True,
                handshake_timeout=self.hello_timeout,
                shutdown_timeout=self.shutdown_timeout,
            )
            holder["conn"] = conn
            return await _expect(conn, P.FrameType.HELLO)

        try:
            holder["hello"] = await asyncio.wait_for(first_frame(), self.hello_timeout)
        except asyncio.TimeoutError:
            raise P.ProtocolError(
                P.ErrorCode.TIMEOUT, f"no HELLO within {self.hello_timeout:g} s of connecting"
            ) from None
        conn: Connection = holder["conn"]
        hello = P.Hello.unpack(holder["hello"])
        nonce = P.new_nonce()
        await conn.send(P.FrameType.CHALLENGE, nonce)
        auth = P.Auth.unpack(await _expect(conn, P.FrameType.AUTH))
        expected = P.client_mac(self._token_for(hello.client_id), nonce, auth.client_nonce, hello.client_id)
        if not hmac.compare_digest(expected, auth.mac):
            raise P.AuthenticationError(f"client {hello.client_id!r}: wrong token")
        return hello, nonce, auth

    def _token_for(self, client_id: str) -> bytes:
        if self.master_token is not None:
            return P.client_token(self.master_token, client_id)
        assert self.token is not None
        return self.token

    async def _reject(
        self,
        counting: CountingTransport,
        account: ConnectionAccount,
        holder: dict[str, Any],
        code: Optional[int],
        reason: str,
        public: Optional[str] = None,
    ) -> None:
        """Counts the connection as rejected, logs one line, sends ERROR when the
        connection can still carry a frame, closes."""
        account.reject()
        self.rejected_connections += 1
        conn: Optional[Connection] = holder.get("conn")
        log.warning("rejected connection from %s: %s", conn.peer if conn else _peer(counting), reason)
        if conn is None:
            counting.close()
            try:
                await asyncio.wait_for(asyncio.shield(counting.closed), 1.0)
            except asyncio.TimeoutError:
                counting.abort()
            return
        if code is not None:
            conn.send_nowait(P.FrameType.ERROR, P.pack_error(code, public or reason))
        await conn.close(1.0)

    def _register(self, peer: _Peer) -> None:
        old = self._peers.get(peer.client_id)
        if old is not None:
            log.info("client %s reconnected: closing its previous connection", peer.client_id)
            old.conn.send_nowait(P.FrameType.ERROR, P.pack_error(P.ErrorCode.REPLACED, "replaced by a new connection"))
            self._drop_peer(old, "replaced by a new connection")
            old.conn.writer.close()
        self._peers[peer.client_id] = peer
        log.info("client %s joined from %s (%d connected)", peer.client_id, peer.conn.peer, len(self._peers))
        if self._closing:  # its handshake finished while the server was saying BYE
            peer.conn.send_nowait(P.FrameType.BYE, P.pack_text("federation finished"))
        self._notify()

    def _drop_peer(self, peer: _Peer, reason: str) -> None:
        if self._peers.get(peer.client_id) is peer:
            del self._peers[peer.client_id]
            log.info("client %s left: %s", peer.client_id, reason)
        if peer.waiter is not None and not peer.waiter.done():
            peer.waiter.set_result(("failed", reason))
        if peer.secagg_inbox is not None:
            peer.secagg_inbox.put_nowait(None)  # its secure aggregation stages stop waiting
        peer.busy_round = None
        self._notify()

    def _notify(self) -> None:
        if self._changed is not None:
            self._changed.set()

    async def _peer_loop(self, peer: _Peer) -> None:
        reason = "disconnected"
        try:
            while True:
                frame = await peer.conn.read_frame(self.max_frame_bytes)
                if frame.type == P.FrameType.UPDATE:
                    update = P.Update.unpack(frame.body)
                    peer.account.payload("rx", update.payload_bytes)
                    self._on_update(peer, update)
                elif frame.type == P.FrameType.SECAGG:
                    secagg = P.SecAgg.unpack(frame.body)
                    if peer.secagg_counter is not None:  # the round's protocol traffic, every frame of it
                        peer.secagg_counter("uplink", secagg.message)
                    if peer.secagg_inbox is not None and secagg.round == peer.secagg_round:
                        try:
                            peer.secagg_inbox.put_nowait(secagg)
                        except asyncio.QueueFull:  # one message per stage: more is a flood, dropped
                            log.info("client %s: SECAGG message beyond its stage dropped", peer.client_id)
                    else:
                        log.info("client %s: SECAGG message for round %d ignored", peer.client_id, secagg.round)
                elif frame.type == P.FrameType.BYE:
                    reason = "said BYE"
                    break
                elif frame.type == P.FrameType.ERROR:
                    code, message = P.unpack_error(frame.body)
                    reason = f"sent ERROR {P.ErrorCode.name_of(code)}: {message}"
                    log.warning("client %s %s", peer.client_id, reason)
                    break
                else:
                    raise P.ProtocolError(P.ErrorCode.PROTOCOL, f"unexpected {frame.type.name} frame")
        except P.ProtocolError as exc:
            reason = f"protocol error: {exc}"
            log.warning("client %s: %s; closing", peer.client_id, exc)
            peer.conn.send_nowait(P.FrameType.ERROR, P.pack_error(exc.code, str(exc)))
        except (ConnectionError, OSError, _ssl.SSLError) as exc:
            reason = "disconnected" if isinstance(exc, P.ConnectionClosed) else f"disconnected ({exc!r})"
        except Exception as exc:  # noqa: BLE001 - a bug here must not take the server down
            log.exception("client %s: unexpected error", peer.client_id)
            reason = f"internal error: {exc!r}"
            peer.conn.send_nowait(P.FrameType.ERROR, P.pack_error(P.ErrorCode.INTERNAL, "internal error"))
        self._drop_peer(peer, reason)
        await peer.conn.close(self.shutdown_timeout)

    def _on_update(self, peer: _Peer, update: P.Update) -> None:
        if peer.busy_round is None or update.round != peer.busy_round:
            log.warning(
                "client %s sent an update for round %d without a task for it; ignored", peer.client_id, update.round
            )
            return
        peer.busy_round = None
        if peer.waiter is not None and not peer.waiter.done():
            peer.waiter.set_result(("update", update))
        else:
            log.info("client %s: late update for round %d discarded", peer.client_id, update.round)
        peer.waiter = None
        self._notify()

    # ================================================================= rounds
    def _idle(self) -> list[str]:
        return sorted(cid for cid, p in self._peers.items() if p.busy_round is None)

    async def _wait_for_clients(self, r: int) -> None:
        assert self._changed is not None
        loop = asyncio.get_running_loop()
        deadline = None if self.wait_timeout is None else loop.time() + self.wait_timeout
        next_log = loop.time()
        while len(self._idle()) < self.min_clients:
            if loop.time() >= next_log:  # at once, then every 30 s of waiting
                log.info(
                    "round %d: waiting for clients: %d of the %d needed connected (%d idle)",
                    r,
                    len(self._peers),
                    self.min_clients,
                    len(self._idle()),
                )
                next_log = loop.time() + 30.0
            self._changed.clear()
            timeout = next_log - loop.time()
            if deadline is not None:
                if deadline - loop.time() <= 0:
                    raise WaitTimeout(
                        f"round {r}: waited {self.wait_timeout:g} s for {self.min_clients} clients, "
                        f"{len(self._peers)} connected ({len(self._idle())} idle)"
                    )
                timeout = min(timeout, deadline - loop.time())
            try:
                await asyncio.wait_for(self._changed.wait(), max(timeout, 0.0))
            except asyncio.TimeoutError:
                pass

    def _config(self, r: int) -> dict[str, Any]:
        skellam = None if self.dp is None else self.dp.skellam
        return round_config(
            self.seed,
            r,
            self.rounds,
            self.codec,
            self.fit_config,
            clip_norm=self.client_clip_norm,
            skellam_mu=None if skellam is None else skellam.client_mu,
        )

    async def _send_task(self, peer: _Peer, task: P.Task) -> None:
        try:
            parts = task.parts()
            peer.account.payload("tx", task.payload_bytes)
            await peer.conn.send(P.FrameType.TASK, *parts)
        except (ConnectionError, OSError, _ssl.SSLError) as exc:
            if peer.waiter is not None and not peer.waiter.done():
                peer.waiter.set_result(("failed", f"sending the task failed ({exc!r})"))

    async def _train_round(self, r: int) -> dict[str, Any]:
        loop = asyncio.get_running_loop()
        assert self._downlink_state is not None and self._reference is not None
        dl = self._downlink_state
        await asyncio.to_thread(dl.full)  # model-sized work stays off the event loop
        idle = self._idle()
        if self.secure is not None:  # a client that cannot mask would send its update in the clear
            idle = [c for c in idle if self._peers[c].secagg_ok]
        sampled = sample_clients(self.seed, r, idle, self.clients_per_round)
        if self.secure is not None and len(sampled) < 2:
            # One client's sum is its update: nobody is sampled, and the round fails.
            log.warning("round %d: secure aggregation needs 2 clients that can mask, %d idle", r, len(sampled))
            sampled = []
        config = self._config(r)
        secure = None
        if self.secure is not None and sampled:
            secure = SecureRound(r, sampled, self.secure, self.seed, config["rotation_seed"])
            # Clients weigh their codes by their example count (capped), unless DP wants equal shares.
            weighting = {"weighted": self.dp is None, "weight_cap": self.max_examples}
            config.update(codec=self.secure.codec, secagg={**secure.config(), **weighting})
            for cid in sampled:
                self._peers[cid].secagg_round = r
                self._peers[cid].secagg_inbox = asyncio.Queue(maxsize=2)
                self._peers[cid].secagg_counter = secure.count
        outcomes: dict[str, dict[str, Any]] = {}
        waiters: dict[asyncio.Future, str] = {}
        sends = []
        for cid in sampled:
            peer = self._peers[cid]
            kind, base, tag, payloads = dl.task_for(cid, peer.held, peer.deltas_ok)
            task = P.Task(r, P.TASK_FULL if kind == "full" else P.TASK_DELTA, tag, base, config, payloads)
            peer.busy_round = r
            peer.task_tag = tag
            peer.held = None  # unknown until it answers
            peer.waiter = loop.create_future()
            waiters[peer.waiter] = cid
            outcomes[cid] = {
                "status": "pending",
                "downlink": kind,
                "downlink_payloads": len(payloads),
                "codec": peer.codec or self.codec,
            }
            sends.append(loop.create_task(self._send_task(peer, task)))
        log.info("round %d: sampled %s", r, ", ".join(sampled))
        aggregator = Aggregator()
        aggregator.add(self._reference, 0.0)
        held: list[_Held] = []  # the updates, when the mean is not simply streamed
        if secure is not None:
            await self._secagg_setup(secure, outcomes)
        deadline = loop.time() + self.round_timeout
        left_out = {cid for cid, outcome in outcomes.items() if "secagg_reason" in outcome}
        pending = {
            fut for fut in waiters if waiters[fut] not in left_out and (not fut.done() or fut.result()[0] == "update")
        }
        for fut in set(waiters) - pending:  # out in the secure aggregation setup
            cid = waiters[fut]
            reason = outcomes[cid].get("secagg_reason") or fut.result()[1]
            outcomes[cid].update(status="failed", reason=f"secure aggregation: {reason}")
        try:
            while pending:
                timeout = deadline - loop.time()
                if timeout <= 0:
                    break
                done, pending = await asyncio.wait(pending, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
                for fut in done:
                    cid = waiters[fut]
                    what, value = fut.result()
                    if what == "update":
                        await self._take_update(aggregator, held, cid, value, outcomes[cid], secure)
                    else:
                        outcomes[cid].update(status="failed", reason=value)
        finally:
            for fut in pending:
                cid = waiters[fut]
                outcomes[cid].update(status="failed", reason=f"timed out after {self.round_timeout} s")
                fut.cancel()
                waiting = self._peers.get(cid)
                if waiting is not None and waiting.waiter is fut:
                    waiting.waiter = None  # still busy until its late update arrives
            for s in sends:
                if not s.done():
                    s.cancel()
            await asyncio.gather(*sends, return_exceptions=True)
        if secure is not None:
            try:
                await self._secagg_unmask(secure, aggregator)
            except (SecAggError, ValueError) as exc:
                secure.error = str(exc)
                log.warning("round %d: secure aggregation failed: %s", r, exc)
                for c in sampled:
                    if outcomes[c]["status"] == "ok":
                        outcomes[c].update(status="failed", reason=f"secure aggregation failed: {exc}")
            finally:
                for c in sampled:
                    taking_part = self._peers.get(c)
                    if taking_part is None or taking_part.secagg_round != r:
                        continue
                    taking_part.secagg_round = taking_part.secagg_inbox = taking_part.secagg_counter = None
                    if "secagg_reason" in outcomes[c] and taking_part.busy_round == r:
                        # left out in the setup: it sends no update, and is free for the next round
                        taking_part.busy_round = taking_part.waiter = None
        completed = [c for c in sampled if outcomes[c]["status"] == "ok"]
        failed = [c for c in sampled if outcomes[c]["status"] != "ok"]
        for c in failed:
            log.warning("round %d: client %s left out: %s", r, c, outcomes[c].get("reason"))
        ok = len(completed) >= self.min_fit
        round_error = None
        if ok:
            stepped = await asyncio.to_thread(self._step, aggregator, held, r)
            if stepped is None:
                ok = False
                round_error = "the mean update is not finite (an update too large to sum: see clip_norm)"
                log.warning("round %d failed: %s; the model is kept", r, round_error)
            else:
                self.params = stepped
        else:
            log.warning(
                "round %d failed: %d valid updates, min_fit is %d; the model is kept", r, len(completed), self.min_fit
            )
        evaluation = await self._evaluate(self.params)
        examples = {c: int(outcomes[c]["num_examples"]) for c in completed}
        info: dict[str, Any] = {
            "round": r,
            "phase": "train",
            "status": "ok" if ok else "failed",
            "failed_round": not ok,
            "sampled": sampled,
            "completed": completed,
            "failed": failed,
            "failures": {c: outcomes[c].get("reason") for c in failed},
            "num_examples": sum(examples.values()),
            "fit_metrics": _weighted_metrics([(examples[c], outcomes[c].get("metrics", {})) for c in completed]),
            "clients": outcomes,
        }
        if round_error is not None:
            info["error"] = round_error
        if secure is not None:
            info["secure_aggregation"] = secure.summary()
        if self.dp is not None:
            if ok:  # a round that released a model spends privacy
                self.dp.accountant.step()
            info["privacy"] = self.dp.record()
        info.update(evaluation)
        return info

    async def _secagg_send(self, secure: SecureRound, cid: str, step: P.SecAggStep, message: bytes) -> bool:
        """Sends one SECAGG message; False when the client is gone."""
        peer = self._peers.get(cid)
        if peer is None or peer.secagg_round != secure.round:  # gone, or reconnected since the round began
            return False
        try:
            # a client that stops reading must not stall the round
            await asyncio.wait_for(
                peer.conn.send(P.FrameType.SECAGG, *P.SecAgg(secure.round, step, message).parts()),
                self.secagg_timeout,
            )
        except (ConnectionError, OSError, _ssl.SSLError, asyncio.TimeoutError):
            return False
        secure.count("downlink", message)
        return True

    async def _secagg_collect(self, secure: SecureRound, members: list[str], step: P.SecAggStep) -> dict[str, bytes]:
        """The ``step`` messages of ``members`` that arrive within ``secagg_timeout``."""

        async def one(cid: str) -> tuple[str, Optional[bytes]]:
            peer = self._peers.get(cid)
            if peer is None or peer.secagg_inbox is None:
                return cid, None
            message = await peer.secagg_inbox.get()
            if message is None or message.step != step:  # gone, or out of step: out of the round
                return cid, None
            return cid, message.message

        tasks = [asyncio.ensure_future(one(cid)) for cid in members]
        if not tasks:
            return {}
        done, pending = await asyncio.wait(tasks, timeout=self.secagg_timeout)
        for task in pending:
            task.cancel()
        got = {}
        for task in done:
            cid, message = task.result()
            if message is not None:
                got[cid] = message
        return got

    async def _secagg_setup(self, secure: SecureRound, outcomes: dict[str, dict[str, Any]]) -> None:
        """Steps 1 to 4b of a secure round (keys, then shares, routed, the reports on them
        and the verdict): a client that misses a step, whose message is refused, or whose
        shares a neighbour reports, is out of the round (its masks are then removed from
        the sum like a dropped client's); when too few are left, all are."""

        def out(cid: str, reason: str) -> None:
            outcomes[cid]["secagg_reason"] = reason
            peer = self._peers.get(cid)
            if peer is not None and peer.waiter is not None and not peer.waiter.done():
                peer.waiter.set_result(("failed", f"secure aggregation: {reason}"))

        server, index = secure.server, secure.index

        def take(members: list[str], got: dict[str, bytes], what: str, accept: Callable[[int, bytes], None]) -> None:
            for cid in members:
                try:
                    if cid not in got:
                        raise SecAggError(f"no {what} within {self.secagg_timeout} s")
                    accept(index(cid), got[cid])
                except SecAggError as exc:
                    out(cid, str(exc))

        try:
            got = await self._secagg_collect(secure, secure.clients, P.SecAggStep.ADVERTISE)
            take(secure.clients, got, "keys", server.receive_advertise)
            members = [secure.clients[i] for i in server.advertised]
            sent = [
                c for c in members if await self._secagg_send(secure, c, P.SecAggStep.KEYS, server.keys_for(index(c)))
            ]
            take(
                members, await self._secagg_collect(secure, sent, P.SecAggStep.SHARES), "shares", server.receive_shares
            )
            routed = []
            for cid in [secure.clients[i] for i in server.shared]:
                if await self._secagg_send(secure, cid, P.SecAggStep.ROUTED, server.shares_for(index(cid))):
                    routed.append(cid)
                else:
                    out(cid, "gone before its shares were routed")
            # Every report before any masked vector counts: a client whose shares a neighbour
            # could not use is out, and the verdict tells the others not to mask with it.
            got = await self._secagg_collect(secure, routed, P.SecAggStep.REPORT)
            take(routed, got, "report", server.receive_report)
            reports = server.reports
            for cid in routed:
                reporters = [secure.clients[v] for v, named in reports.items() if index(cid) in named]
                if reporters:
                    out(cid, f"named in the reports of {', '.join(reporters)}: the shares it sent them were unusable")
                elif "secagg_reason" not in outcomes[cid]:
                    if not await self._secagg_send(secure, cid, P.SecAggStep.VERDICT, server.verdict()):
                        out(cid, "gone before the verdict")
        except SecAggError as exc:  # the round as a whole: too few clients left
            secure.error = str(exc)
            log.warning("round %d: secure aggregation setup failed: %s", secure.round, exc)
            for cid in secure.clients:
                out(cid, f"setup failed: {exc}")

    async def _secagg_unmask(self, secure: SecureRound, aggregator: Aggregator) -> None:
        """Steps 5 and 6, then the correction out of the aggregator's sum (SecAggError
        when the surviving clients cannot unmask it)."""
        if secure.error:
            raise SecAggError(secure.error)
        server = secure.server
        request = server.unmask_request()
        survivors = [secure.clients[i] for i in server.survivors]
        sent = [c for c in survivors if await self._secagg_send(secure, c, P.SecAggStep.UNMASK_REQUEST, request)]
        got = await self._secagg_collect(secure, sent, P.SecAggStep.UNMASK)
        for cid, message in got.items():
            try:
                server.receive_unmask(secure.index(cid), message)
            except SecAggError as exc:
                log.warning("round %d: client %s's unmask message refused: %s", secure.round, cid, exc)
        if not survivors:
            raise SecAggError("no masked update arrived")
        skellam = None if self.dp is None else self.dp.skellam
        if skellam is not None and len(survivors) < skellam.num_clients:
            raise SecAggError(
                f"{len(survivors)} masked updates carry less Skellam noise than the {skellam.num_clients} the "
                "privacy accounting assumes: the sum is not released"
            )
        correction = await asyncio.to_thread(server.correction)
        aggregator.unmask(correction)

    @property
    def _streamed(self) -> bool:
        """Whether each update goes straight into the running weighted sum (decoded
        first when it is clipped; the shares of max_share are known only at the end)."""
        if self.secure is not None or self.dp is not None:
            # masked codes: summed as they come, in integers (order-free); DP's noise is fresh anyway
            return True
        return not (self.aggregation.holds_updates or self.max_share is not None or self.ordered)

    def _combine(self, aggregator: Aggregator, held: list[_Held]) -> dict[str, np.ndarray]:
        """The round's update: the streamed mean, or the held updates combined with
        capped shares and clip factors, or their robust statistic (worker thread)."""
        if self._streamed:
            mean = aggregator.result(copy=False)
            if self.dp is not None and self.secure is None:  # central DP: noise on the clipped sum
                clipped = sum(h.factor for h in held)
                return self.dp.noisy_mean(mean, clipped, self.clients_per_round, np.random.default_rng())
            if self.clip_norm is None:
                return mean
            # The aggregator divided by sum(w * f); FedAvg with clipping divides by sum(w).
            scaled, total = sum(h.weight * h.factor for h in held), sum(h.weight for h in held)
            if scaled <= 0:
                return {k: unchanged(v) for k, v in self.params.items()}
            return {k: scale(v, scaled / total) for k, v in mean.items()}
        held = sorted(held, key=lambda h: h.client)  # the same sums whatever the order of arrival
        if self.aggregation.holds_updates:
            # _hold decoded every one of them (holds_updates).
            return robust_combine(self.aggregation, [h.update for h in held if h.update is not None])
        weights = [h.weight for h in held]
        if self.max_share is not None:
            weights = cap_shares(weights, self.max_share)
        scaled = 0.0
        for h, w in zip(held, weights):
            scaled += w * h.factor
        if scaled <= 0:  # every update clipped to nothing (non-finite norms): no change
            return {k: unchanged(v) for k, v in self.params.items()}
        capped = Aggregator()
        capped.add(self._reference, 0.0)  # the model's table, which every payload must match
        # In one call, cache-blocked: the same sums as adding them one by one, in this order.
        # The aggregator divides by sum(w * f), in the pass that sums; FedAvg with clipping
        # divides by sum(w).
        payloads, factors = [h.payload for h in held], [w * h.factor for h, w in zip(held, weights)]
        ratio = scaled / sum(weights)
        return {k: scale(v, ratio) for k, v in capped.mean_of(payloads, factors).items()}

    def _step(self, aggregator: Aggregator, held: list[_Held], r: int) -> Optional[dict[str, np.ndarray]]:
        """The next global model, and the downlink replica that follows it (worker
        thread); None, and nothing changes, when the round's update is not finite."""
        assert self._downlink_state is not None
        with np.errstate(over="ignore", invalid="ignore"):
            update = self._combine(aggregator, held)
        if not all(np.isfinite(v).all() for v in update.values()):
            return None
        params = self.optimizer.step(self.params, update, round=r)
        self._downlink_state.advance(params)
        return params

    async def _take_update(
        self,
        aggregator: Aggregator,
        held: list[_Held],
        cid: str,
        update: P.Update,
        outcome: dict[str, Any],
        secure: Optional[SecureRound] = None,
    ) -> None:
        outcome["num_examples"] = int(update.num_examples)
        outcome["metrics"] = update.metrics
        if update.status != P.UPDATE_OK:
            error = update.metrics.get("error", "no reason given")
            outcome.update(status="failed", reason=f"client reported a failure: {error}")
            return
        if update.num_examples <= 0:
            outcome.update(status="failed", reason="num_examples must be positive")
            return
        weight = float(update.num_examples)
        if self.max_examples is not None and update.num_examples > self.max_examples:
            weight = float(self.max_examples)
            outcome["weight_capped"] = True
            log.warning(
                "client %s claims %d examples; weighed as %d (max_examples)",
                cid,
                update.num_examples,
                self.max_examples,
            )
        if self.dp is not None:
            weight = 1.0  # DP bounds each client's share
        outcome["weight"] = weight
        try:
            if secure is not None:  # masked codes of the round's own kind, from a client of its setup
                await asyncio.to_thread(check_masked_update, secure, cid, update.payload, weight)
            if self._streamed and self.clip_norm is None:
                await asyncio.to_thread(_add_update, aggregator, update.payload, weight)
            elif self._streamed:  # decoded once, for its norm, and added as decoded
                held.append(await asyncio.to_thread(self._add_clipped, aggregator, update.payload, weight, outcome))
            else:
                held.append(await asyncio.to_thread(self._hold, update.payload, weight, outcome, cid))
        except (DecodeError, ValueError, TypeError) as exc:
            outcome.update(status="failed", reason=f"invalid payload: {exc}")
            log.warning("client %s sent an invalid payload: %s", cid, exc)
            return
        if secure is not None:
            secure.server.receive_masked(secure.index(cid))
        outcome["status"] = "ok"
        peer = self._peers.get(cid)
        if peer is not None and peer.task_tag is not None:
            peer.held = peer.task_tag
            if self._downlink_state is not None:
                self._downlink_state.confirm(cid, peer.task_tag)

    def _add_clipped(self, aggregator: Aggregator, payload: Any, weight: float, outcome: dict[str, Any]) -> _Held:
        """Decodes one update, clips it and adds it to the running sum (worker thread);
        what is held is its weight and clip factor, not the update."""
        update, factor = self._decode_clipped(payload, outcome)
        if factor > 0:  # 0: a norm too large to compute, the update counts for nothing
            with np.errstate(over="ignore", invalid="ignore"):
                aggregator.add_update(update, weight * factor)
        return _Held(None, weight, factor, None)

    def _decode_clipped(self, payload: Any, outcome: dict[str, Any]) -> tuple[dict[str, np.ndarray], float]:
        """One update decoded against the model, and its clip factor (1.0 when not
        clipped); an update made for another model raises DecodeError."""
        update = decode(payload, table=update_table(self.params))
        if list(update) != list(self.params) or any(update[k].shape != v.shape for k, v in self.params.items()):
            raise DecodeError("the update's tensors are not the model's")
        factor = 1.0 if self.clip_norm is None else clip_factor(update, self.clip_norm)
        if factor < 1.0:
            outcome["clip_factor"] = factor
        return update, factor

    def _hold(self, payload: Any, weight: float, outcome: dict[str, Any], client: str = "") -> _Held:
        """Decodes one update against the model, for max_share or a robust statistic
        (worker thread); an update made for another model raises DecodeError."""
        update, factor = self._decode_clipped(payload, outcome)
        if self.aggregation.holds_updates:
            return _Held(
                None,
                weight,
                factor,
                {
                    k: np.asarray(v, np.float32 if v.dtype == np.float32 else np.float64) * factor
                    for k, v in update.items()
                },
                client,
            )
        return _Held(payload, weight, factor, None, client)

    async def _evaluate(self, params: dict[str, np.ndarray]) -> dict[str, Any]:
        out: dict[str, Any] = {"test_accuracy": None, "test_loss": None}
        if self.evaluate_fn is None:
            return out
        try:
            result = await asyncio.to_thread(self.evaluate_fn, {k: v.copy() for k, v in params.items()})
            if inspect.isawaitable(result):
                result = await result
            metrics = dict(result or {})
        except Exception as exc:  # noqa: BLE001 - a broken evaluate_fn must not stop the federation
            log.exception("evaluate_fn failed")
            out["test_error"] = repr(exc)
            return out
        out["test_accuracy"] = _number(metrics.get("accuracy"))
        out["test_loss"] = _number(metrics.get("loss"))
        out["test_metrics"] = metrics
        return out

    # =============================================================== shutdown
    async def _shutdown(self, graceful: bool) -> None:
        """Graceful: BYE to every client, wait for them to close (up to
        shutdown_timeout), then close. Otherwise (an error or cancellation):
        abort every connection at once."""
        if self._closing:
            return
        self._closing = True
        if self._listener is not None:
            self._listener.close()
        if graceful:
            for peer in list(self._peers.values()):
                peer.conn.send_nowait(P.FrameType.BYE, P.pack_text("federation finished"))
            if self._tasks:
                await asyncio.wait(set(self._tasks), timeout=self.shutdown_timeout)
        for task in list(self._tasks):
            task.cancel()
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)
        if self._listener is not None:
            await self._listener.wait_closed()
        log.info("server closed")


def round_line(record: Mapping[str, Any], rounds: int) -> str:
    """A row of rounds.jsonl as the one log line a person reads per round."""
    accuracy = record.get("test_accuracy")
    text = (
        f"round {record['round']}/{rounds} {record['status']}: "
        f"accuracy {'n/a' if accuracy is None else f'{accuracy:.4f}'}, "
        f"clients {len(record.get('completed', []))}/{len(record.get('sampled', []))}, "
        f"up {_megabytes(record.get('uplink_wire_bytes', 0))}, "
        f"down {_megabytes(record.get('downlink_wire_bytes', 0))}, {record.get('seconds', 0):.1f} s"
    )
    secure = record.get("secure_aggregation")
    if secure:
        text += f", secure sum of {len(secure['survivors'])} ({len(secure['dropped'])} dropped)"
    privacy = record.get("privacy")
    if privacy:
        text += f", epsilon {privacy['epsilon']:.3g} (delta {privacy['delta']:g})"
    if record.get("status") != "ok":
        text += f" ({record.get('error') or 'too few valid updates; the model is kept'})"
    return text


def _megabytes(n: Any) -> str:
    return f"{n / 1e6:.3f} MB" if n >= 1e5 else f"{n / 1e3:.1f} kB"


def round_config(
    seed: int,
    r: int,
    rounds: int,
    codec: Optional[str],
    fit_config: Union[Mapping[str, Any], Callable[[int], Mapping[str, Any]], None] = None,
    *,
    clip_norm: Optional[float] = None,
    skellam_mu: Optional[float] = None,
) -> dict[str, Any]:
    """The config a round's TASKs carry (the in-process sweep sends the same bytes);
    ``clip_norm``: clients clip their updates to it, ``skellam_mu``: and add that
    Skellam noise to their codes (secure aggregation and differential privacy)."""
    # One rotation seed per round: clients coding edenB:shared all rotate with it, so the
    # aggregator sums them in the rotated domain and inverts once.
    rotation_seed = derive_seed(seed, PURPOSE_ROTATION, r)
    config: dict[str, Any] = {"round": r, "rounds": rounds, "codec": codec, "rotation_seed": rotation_seed}
    if clip_norm is not None:
        config["clip_norm"] = clip_norm
    if skellam_mu is not None:
        config["skellam_mu"] = skellam_mu
    extra = fit_config(r) if callable(fit_config) else fit_config
    if extra:
        config.update(dict(extra))
    return config


def sample_clients(seed: int, r: int, idle: Sequence[_Id], k: int) -> list[_Id]:
    """The clients round ``r`` samples: ``k`` of ``idle`` (all of them when fewer), in
    their order there (the in-process sweep samples with this function too)."""
    rng = np.random.default_rng(derive_seed(seed, PURPOSE_SAMPLING, r))
    k = min(k, len(idle))
    return [idle[i] for i in sorted(rng.choice(len(idle), size=k, replace=False))]


def _add_update(aggregator: Aggregator, payload: Any, weight: float) -> None:
    """Adds one update to the round's running sum (worker thread). Finite values
    can still overflow the float32 sum: that is the round's problem, found when
    the sum is read (see Server._step), not this client's."""
    with np.errstate(over="ignore", invalid="ignore"):
        aggregator.add(payload, weight)


def _host(counting: CountingTransport) -> str:
    peer = counting.get_extra_info("peername")
    return str(peer[0]) if isinstance(peer, tuple) and peer else str(peer)


def _peer(counting: CountingTransport) -> str:
    peer = counting.get_extra_info("peername")
    return f"{peer[0]}:{peer[1]}" if isinstance(peer, tuple) and len(peer) >= 2 else str(peer)


def _positive_int(value: Any, name: str) -> int:
    if isinstance(value, bool) or int(value) != value or int(value) < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")
    return int(value)


def _positive_float(value: Any, name: str) -> float:
    v = float(value)
    if not (v > 0 and math.isfinite(v)):
        raise ValueError(f"{name} must be a positive number of seconds, got {value!r}")
    return v


def _number(value: Any) -> Optional[float]:
    try:
        v = float(value)
    except (TypeError, ValueError):
        return None
    return v if math.isfinite(v) else None


def _weighted_metrics(items: list[tuple[int, Mapping[str, Any]]]) -> dict[str, float]:
    """The num_examples-weighted mean of each numeric metric the clients reported."""
    sums: dict[str, float] = {}
    weights: dict[str, float] = {}
    for n, metrics in items:
        for key, value in metrics.items():
            v = _number(value) if not isinstance(value, bool) else None
            if v is None:
                continue
            sums[key] = sums.get(key, 0.0) + n * v
            weights[key] = weights.get(key, 0.0) + n
    return {k: sums[k] / weights[k] for k in sums if weights[k] > 0}
