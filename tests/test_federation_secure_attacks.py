"""Secure aggregation in the TCP federation under attack, over real sockets on 127.0.0.1.

Clients that send SECAGG messages out of order, for another round, twice, truncated or
garbled; that vanish at each stage of the protocol, or more of them than the tolerance;
whose UPDATE carries codes that are not masked; that fall silent or stop reading; a server
that asks for both secrets of one client. The server must leave out only the client that
misbehaves (or fail the whole round cleanly when too few remain), never raise, never wait
past ``secagg_timeout`` per stage, and reach bit for bit the model of a plain run in which
the same clients' updates count. A bug found here is marked ``xfail(strict=True)`` with its
cause until it is fixed (none is, now).

The task and the helpers are those of test_federation.py and test_federation_secure.py.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import os
import socket
import struct
import time
from dataclasses import dataclass
from typing import Any, Callable, Optional

import numpy as np
import pytest
from fedpress import Codec
from fedpress import secagg as S
from fedpress.federation import Client, Server, WaitTimeout
from fedpress.federation import protocol as P
from fedpress.federation.secure import SecureRound, client_round
from test_federation import (
    TOKEN,
    Harness,
    RawSession,
    close_writer,
    header,
    raw_frame,
    raw_handshake,
    run_async,
    wait_until,
)
from test_federation_secure import CODEC, params, server_settings, train_fn

N = 4  # clients; secure rounds of 4 tolerate 1 dropout (threshold 2 of 3 neighbours)
ATTACKER = 2  # c2 misbehaves; c0, c1 and c3 are honest
HONEST = ["c0", "c1", "c3"]
EVERYONE = ["c0", "c1", "c2", "c3"]
SECAGG_TIMEOUT = 1.0
SA_HEADER = 12  # a fedpress.secagg message's magic, version, type and round tag

FrameOut = tuple[int, bytes]  # a frame to send: its type and body
Tamper = Callable[["Adversary", int, P.SecAggStep, bytes], list[FrameOut]]


def secagg(r: int, step: P.SecAggStep, message: bytes) -> FrameOut:
    """A SECAGG frame carrying ``message`` as ``step`` of round ``r``."""
    return P.FrameType.SECAGG, b"".join(bytes(p) for p in P.SecAgg(r, step, message).parts())


class _Rewriting:
    """A client's connection whose UPDATE frames ``rewrite(update) -> Update`` replaces."""

    def __init__(self, conn: Any, rewrite: Callable[[P.Update], P.Update]) -> None:
        self._conn, self._rewrite = conn, rewrite

    async def send(self, ftype: int, *parts: Any) -> None:
        if ftype == P.FrameType.UPDATE:
            update = P.Update.unpack(b"".join(bytes(p) for p in parts))
            if update.status == P.UPDATE_OK:
                parts = tuple(self._rewrite(update).parts())
        await self._conn.send(ftype, *parts)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._conn, name)


class Adversary(Client):
    """A Client that misbehaves in round ``attack_round`` only (honest without options).

    ``tamper(self, r, step, message)``: the frames (type, body) sent instead of each of its
    SECAGG messages; ``drop_after``: the stage after which it disconnects ("task",
    "advertise", "shares", "update", or "unmask": on receiving the unmask request), then
    reconnects after its backoff; ``rewrite(self, update)``: the UPDATE sent instead of its
    own; ``late``: seconds it waits before sending a step's message (a slow honest link)."""

    def __init__(
        self,
        *args: Any,
        attack_round: int = 1,
        tamper: Optional[Tamper] = None,
        drop_after: Optional[str] = None,
        rewrite: Optional[Callable[[Adversary, P.Update], P.Update]] = None,
        late: Optional[dict[P.SecAggStep, float]] = None,
        **kw: Any,
    ) -> None:
        super().__init__(*args, **kw)
        self.attack_round = attack_round
        self.tamper = tamper
        self.drop_after = drop_after
        self.rewrite = rewrite
        self.late = late or {}
        self.secagg_wire_bytes = 0  # the SECAGG frames it sent, as they cross the wire
        self.config: dict[str, Any] = {}  # the TASK config of the round it is in

    async def _drop(self, conn: Any, r: int, stage: str) -> None:
        if self.drop_after == stage and r == self.attack_round:
            await conn.close(1.0)
            raise ConnectionResetError(f"{self.client_id} drops after {stage} on purpose")

    async def _on_task(self, conn: Any, task: P.Task) -> None:
        self.config = dict(task.config)
        if self.rewrite is not None and task.round == self.attack_round:
            conn = _Rewriting(conn, functools.partial(self.rewrite, self))
        await super()._on_task(conn, task)
        await self._drop(conn, task.round, "update")

    async def _secagg_setup(self, conn: Any, r: int, secure: S.SecAggClient) -> Optional[bytes]:
        await self._drop(conn, r, "task")
        return await super()._secagg_setup(conn, r, secure)

    async def _send_secagg(self, conn: Any, r: int, step: P.SecAggStep, message: bytes) -> None:
        frames = [secagg(r, step, message)]
        if r == self.attack_round:
            if self.tamper is not None:
                frames = self.tamper(self, r, step, message)
            await asyncio.sleep(self.late.get(step, 0.0))
        for ftype, body in frames:
            await conn.send(ftype, body)
            if ftype == P.FrameType.SECAGG:
                self.secagg_wire_bytes += P.HEADER.size + len(body) + P.TRAILER_BYTES
        self.stats["secagg_uplink_bytes"] += len(message)
        await self._drop(conn, r, step.name.lower())

    async def _on_unmask_request(self, conn: Any, message: P.SecAgg) -> None:
        await self._drop(conn, message.round, "unmask")
        await super()._on_unmask_request(conn, message)


def slow(train: Callable, delay: float) -> Callable:
    def train_slowly(model: dict, config: dict) -> Any:
        time.sleep(delay)
        return train(model, config)

    return train_slowly


@dataclass
class Run:
    server: Server
    rows: list[dict]  # rounds.jsonl's rows: the setup row, then one per round
    clients: list[Adversary]
    error: Optional[BaseException]  # what server.run() raised: never anything


def federate(
    *,
    secure: bool = True,
    rounds: int = 1,
    attacks: Optional[dict[int, dict[str, Any]]] = None,
    fail: Optional[dict[int, tuple[int, ...]]] = None,
    delay: Optional[dict[int, float]] = None,
    during: Optional[Callable[[Server], Any]] = None,
    timeout: float = 30.0,
    **server_options: Any,
) -> Run:
    """N clients (c0..c3) for ``rounds`` rounds of 4, securely or not: ``attacks`` gives
    Adversary options per client, ``fail`` the rounds in which a client's training fails,
    ``delay`` seconds a client's training sleeps; ``during(server)``, a coroutine run beside
    the federation. The server waits at most 3 s for 4 idle clients before a round."""

    async def body(h: Harness) -> Run:
        options = server_settings(
            secure=secure,
            rounds=rounds,
            clients_per_round=N,
            secagg_timeout=SECAGG_TIMEOUT,
            shutdown_timeout=2.0,
            wait_timeout=3.0,
        )
        options.update(server_options)
        server = Server("127.0.0.1", 0, params(), **options)
        await server.start()
        clients = []
        for i in range(N):
            train = train_fn(i, (fail or {}).get(i, ()))
            if (delay or {}).get(i):
                train = slow(train, (delay or {})[i])
            attack: dict[str, Any] = dict(backoff=0.05, max_backoff=0.2)
            attack.update((attacks or {}).get(i, {}))
            clients.append(
                Adversary(
                    f"127.0.0.1:{server.port}",
                    TOKEN,
                    train,
                    client_id=f"c{i}",
                    insecure=True,
                    seed=11,
                    error_feedback=False,
                    max_retries=40,
                    connect_timeout=3.0,
                    shutdown_timeout=2.0,
                    **attack,
                )
            )
        tasks = [h.spawn(c.run()) for c in clients]
        if during is not None:
            h.spawn(during(server))
        error: Optional[BaseException] = None
        try:
            await server.run()
        except Exception as exc:  # the server must never raise: the tests assert error is None
            error = exc
        await asyncio.wait(tasks, timeout=0.5)  # they got BYE; one still reconnecting is cancelled
        return Run(server, server.history, clients, error)

    return run_async(body, timeout=timeout)


@functools.lru_cache(maxsize=None)
def plain(c2_fails: bool) -> dict[str, np.ndarray]:
    """The model a plain run of the same clients, codec and seeds reaches in one round: all
    four clients' updates count, or c2's training fails."""
    run = federate(secure=False, fail={ATTACKER: (1,)} if c2_fails else None)
    assert run.error is None and run.rows[1]["status"] == "ok", run.error
    return run.server.params


def assert_model(run: Run, c2_counted: bool) -> None:
    """The secure round reached the plain round's model bit for bit: with c2's update in
    the sum when ``c2_counted``, else without it."""
    for name, value in plain(not c2_counted).items():
        np.testing.assert_array_equal(run.server.params[name], value, err_msg=name)


def assert_round_without_c2(run: Run, r: int = 1) -> dict:
    """Round ``r`` went on with the honest clients, c2 left out; its row."""
    assert run.error is None, repr(run.error)
    row = run.rows[r]
    assert row["status"] == "ok", row
    assert row["completed"] == HONEST and row["failed"] == ["c2"], row
    assert row["secure_aggregation"]["survivors"] == HONEST, row["secure_aggregation"]
    assert row["secure_aggregation"]["error"] is None
    return row


def assert_round_with_everyone(run: Run, r: int = 1) -> dict:
    assert run.error is None, repr(run.error)
    row = run.rows[r]
    assert row["status"] == "ok" and row["completed"] == EVERYONE, row
    assert row["secure_aggregation"]["survivors"] == EVERYONE, row["secure_aggregation"]
    return row


# ---------------------------------------------------------- malformed SECAGG --
def _replace(step: P.SecAggStep, make: Callable[[Adversary, int, bytes], list[FrameOut]]) -> Tamper:
    """A tamper that replaces only the ``step`` message by what ``make(client, r, message)`` gives."""

    def tamper(client: Adversary, r: int, at: P.SecAggStep, message: bytes) -> list[FrameOut]:
        return make(client, r, message) if at == step else [secagg(r, at, message)]

    return tamper


def _bad_shares(message: bytes) -> bytes:
    """An UNMASK message with every share replaced by a random field element."""
    out = bytearray(message)
    for at in range(SA_HEADER + 8 + 5, len(out), 38):  # entries: owner (4), kind (1), share (33)
        out[at : at + 33] = os.urandom(32) + b"\x00"
    return bytes(out)


def _impersonation(client: Adversary, r: int, message: bytes) -> list[FrameOut]:
    """c2 advertises keys in c0's name (a valid message of the round, for the wrong sender)."""
    return [secagg(r, P.SecAggStep.ADVERTISE, client_round(client.config["secagg"], "c0").advertise())]


ADV, SHARES, UNMASK = P.SecAggStep.ADVERTISE, P.SecAggStep.SHARES, P.SecAggStep.UNMASK

# name -> (tamper, whether c2's masked update stays in the sum)
MALFORMED: dict[str, tuple[Tamper, bool]] = {
    "garbage advertise": (_replace(ADV, lambda c, r, m: [secagg(r, ADV, os.urandom(len(m)))]), False),
    "truncated shares": (_replace(SHARES, lambda c, r, m: [secagg(r, SHARES, m[:-7])]), False),
    "advertise for another round": (_replace(ADV, lambda c, r, m: [secagg(r + 7, ADV, m)]), False),
    "out of order": (_replace(SHARES, lambda c, r, m: [secagg(r, UNMASK, m), secagg(r, SHARES, m)]), False),
    "advertise twice": (_replace(ADV, lambda c, r, m: [secagg(r, ADV, m)] * 2), False),
    "advertise in c0's name": (_replace(ADV, _impersonation), False),
    "truncated frame": (_replace(ADV, lambda c, r, m: [(P.FrameType.SECAGG, b"\x01\x00")]), False),
    "unknown step": (_replace(ADV, lambda c, r, m: [(P.FrameType.SECAGG, struct.pack("<IB", r, 99) + m)]), False),
    # (the second SHARES arrives where its report is due)
    "shares twice": (_replace(SHARES, lambda c, r, m: [secagg(r, SHARES, m)] * 2), False),
    "garbage unmask": (_replace(UNMASK, lambda c, r, m: [secagg(r, UNMASK, os.urandom(len(m)))]), True),
    "wrong shares in unmask": (_replace(UNMASK, lambda c, r, m: [secagg(r, UNMASK, _bad_shares(m))]), True),
}


@pytest.mark.parametrize("attack", list(MALFORMED))
def test_a_malformed_secagg_message_costs_only_its_sender(attack: str) -> None:
    """c2 sends one SECAGG message of round 1 garbled, truncated, for another round, out of
    order, twice, in another client's name, or in a frame that does not parse (which costs
    it its connection). The server leaves c2 out of the protocol from that stage on (an
    UNMASK it cannot use only loses c2's shares, which the others' replace): the round goes
    on with the rest and reaches the plain sum of the updates it kept."""
    tamper, counted = MALFORMED[attack]
    run = federate(attacks={ATTACKER: dict(tamper=tamper, backoff=5.0)})
    if counted:
        assert_round_with_everyone(run)
    else:
        row = assert_round_without_c2(run)
        if attack == "advertise for another round":  # ignored: stage 1 waited for c2
            assert row["secure_aggregation"]["seconds"] >= SECAGG_TIMEOUT
    assert_model(run, counted)


def _altered_ciphertexts(client: Adversary, r: int, message: bytes) -> list[FrameOut]:
    """c2's SHARES with the last byte of every ciphertext (its AEAD tag) flipped."""
    out = bytearray(message)
    for end in range(SA_HEADER + 40 + 86, len(out) + 1, 86):  # entries: recipient (4), ciphertext (82)
        out[end - 1] ^= 0x01
    return [secagg(r, SHARES, bytes(out))]


def _altered_ciphertext_for_c0(client: Adversary, r: int, message: bytes) -> list[FrameOut]:
    """c2's SHARES with the AEAD tag of its first ciphertext (for c0) flipped: only c0 sees it."""
    out = bytearray(message)
    out[SA_HEADER + 40 + 86 - 1] ^= 0x01
    return [secagg(r, SHARES, bytes(out))]


def _low_order_key(client: Adversary, r: int, message: bytes) -> list[FrameOut]:
    """c2's ADVERTISE with its share-encryption key replaced by 0, a low-order X25519 point."""
    at = SA_HEADER + 4
    return [secagg(r, ADV, message[:at] + bytes(32) + message[at + 32 :])]


@pytest.mark.parametrize(
    "tamper",
    [
        pytest.param(_replace(SHARES, _altered_ciphertexts), id="altered ciphertexts"),
        pytest.param(_replace(SHARES, _altered_ciphertext_for_c0), id="one altered ciphertext"),
        pytest.param(
            _replace(ADV, _low_order_key),
            id="low-order public key",
        ),
    ],
)
def test_a_message_the_server_cannot_check_costs_only_its_sender(tamper: Tamper) -> None:
    """c2's message is well formed, but what it carries is bad where only its neighbours can
    see it: ciphertexts that fail authentication (for every neighbour, or for c0 only), or a
    low-order public key. The round goes on without c2: the neighbours report its shares before
    anyone masks, the server's verdict leaves it out, and nobody masks with it."""
    run = federate(attacks={ATTACKER: dict(tamper=tamper)})
    assert_round_without_c2(run)


# ---------------------------------------------------------------- dropouts --
@pytest.mark.parametrize(
    "stage, counted",
    [("task", False), ("advertise", False), ("shares", False), ("update", True), ("unmask", True)],
)
def test_a_client_that_disconnects_at_any_stage(stage: str, counted: bool) -> None:
    """c2 disconnects in round 1 after receiving its TASK, after advertising its keys, after
    sending its shares, after sending its masked update, or on receiving the unmask request.
    Three of four survive, above the threshold: the round succeeds with the plain sum of the
    updates that arrived (c2's too when it was in the sum)."""
    run = federate(attacks={ATTACKER: dict(drop_after=stage, backoff=5.0)})
    if counted:
        sa = assert_round_with_everyone(run)["secure_aggregation"]
        assert sa["dropped"] == []
    else:
        sa = assert_round_without_c2(run)["secure_aggregation"]
        assert sa["advertised"] == (3 if stage == "task" else 4)
        assert sa["shared_keys"] == (4 if stage == "shares" else 3)
        assert sa["dropped"] == (["c2"] if stage == "shares" else [])
    assert_model(run, counted)


@pytest.mark.parametrize("stage", ["task", "shares", "update"])
def test_more_dropouts_than_tolerated_fail_the_round_cleanly(stage: str) -> None:
    """c1 and c2 both disconnect at the same stage of round 1 (and come back): 2 of 4, above the
    tolerance of one. The round fails (the model is kept, no client completes, the secure
    aggregation's error says why), the server carries on, and round 2 works."""
    drop = dict(drop_after=stage, backoff=0.3, max_backoff=0.3)
    run = federate(rounds=2, attacks={1: drop, 2: drop})
    assert run.error is None, repr(run.error)
    row = run.rows[1]
    assert row["status"] == "failed" and row["completed"] == [], row
    assert row["secure_aggregation"]["error"], row["secure_aggregation"]
    assert row["test_loss"] == run.rows[0]["test_loss"]  # the model was kept
    assert_round_with_everyone(run, 2)


def test_a_client_too_slow_for_one_stage_is_back_in_the_next_round() -> None:
    """c2 is honest but slow: its keys arrive after ``secagg_timeout``. Round 1 goes on without
    it; round 2 must sample it again."""
    run = federate(rounds=2, attacks={ATTACKER: dict(late={ADV: SECAGG_TIMEOUT + 0.5})})
    assert_round_without_c2(run)
    assert_round_with_everyone(run, 2)


# ---------------------------------------------------- updates that are not masked --
def _payload(client: Adversary, codec: str = CODEC, *, masked: bool = False, weight: int = 1) -> bytes:
    """A payload of the model's tensors that is not c2's masked update: ``codec``'s (intB with
    the round's rotation; ``masked``: flagged masked, with codes left as they are)."""
    values = {"w": np.full(16, 0.01, np.float32), "b": np.zeros(1, np.float32)}
    if codec != CODEC:
        return Codec(codec).encode(values)
    mask = (lambda codes: np.asarray(codes, np.uint64)) if masked else None
    return Codec(CODEC).encode(values, seed=1, rotation_seed=client.config["rotation_seed"], mask=mask, weight=weight)


def _plain_codes(client: Adversary, update: P.Update) -> P.Update:
    """The same UPDATE with intB codes that are not masked (the round's codec and rotation)."""
    return P.Update(update.round, update.num_examples, update.metrics, _payload(client))


def _unweighted(client: Adversary, update: P.Update) -> P.Update:
    """The same UPDATE (128 examples) with masked-looking codes that record no weight."""
    return P.Update(update.round, update.num_examples, update.metrics, _payload(client, masked=True))


def _fp32(client: Adversary, update: P.Update) -> P.Update:
    """The same UPDATE with an fp32 payload (another codec than the round's)."""
    return P.Update(update.round, update.num_examples, update.metrics, _payload(client, "fp32"))


def test_unmasked_codes_after_masked_ones_are_refused_for_their_sender_only() -> None:
    """c2 shares keys, then sends plain int codes, after the others' masked updates arrived:
    refused, its masks are removed like a dropped client's, the round's sum is the others'."""
    run = federate(attacks={ATTACKER: dict(rewrite=_plain_codes)}, delay={ATTACKER: 0.5})
    row = assert_round_without_c2(run)
    assert "invalid payload" in row["failures"]["c2"]
    assert row["secure_aggregation"]["dropped"] == ["c2"]
    assert_model(run, False)


@pytest.mark.parametrize("rewrite", [_plain_codes, _unweighted], ids=["plain codes", "masked, weight not recorded"])
def test_a_first_update_that_does_not_fit_the_round_is_refused_for_its_sender_only(rewrite: Callable) -> None:
    """c2's update arrives before the honest masked ones (they train slowly) and is not what the
    round asks for: plain int codes, or masked codes that do not record its 128 examples. It
    must be refused alone: one client must not be able to fail the round for everyone."""
    run = federate(attacks={ATTACKER: dict(rewrite=rewrite)}, delay={0: 0.5, 1: 0.5, 3: 0.5})
    row = assert_round_without_c2(run)
    assert "invalid payload" in row["failures"]["c2"]


def test_an_update_of_another_codec_is_refused_for_its_sender_only() -> None:
    """c2 shares keys, then sends an fp32 payload instead of masked intB codes: it must be
    refused like any invalid payload, and the round's sum be the others'."""
    run = federate(attacks={ATTACKER: dict(rewrite=_fp32)})
    assert_round_without_c2(run)
    assert_model(run, False)


def test_a_round_where_no_update_is_masked_fails_cleanly() -> None:
    """Every client sends an fp32 payload instead of masked codes (a client build that ignores
    the TASK's codec): the round must fail, not take the server down."""
    run = federate(attacks={i: dict(rewrite=_fp32) for i in range(N)})
    assert run.error is None, repr(run.error)
    assert run.rows[1]["status"] == "failed"


def test_an_update_sent_before_the_protocol_let_it_is_refused() -> None:
    """c2 advertises, sends at once an UPDATE (masked-looking codes weighing its 128 examples),
    then garbage as its shares: it is out of the protocol, and its early update must be refused,
    not crash the server."""

    def early(client: Adversary, r: int, step: P.SecAggStep, message: bytes) -> list[FrameOut]:
        if step == SHARES:
            return [secagg(r, SHARES, os.urandom(len(message)))]
        update = P.Update(r, 128, {}, _payload(client, masked=True, weight=128))
        return [secagg(r, step, message), (P.FrameType.UPDATE, b"".join(bytes(p) for p in update.parts()))]

    run = federate(attacks={ATTACKER: dict(tamper=early)})
    assert_round_without_c2(run)


# ------------------------------------------------------ a dishonest request --
def test_clients_refuse_a_request_for_both_secrets_of_a_client(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """Round 1's unmask request marks c0 both SURVIVED and DROPPED (status 11), asking for its
    self-mask seed and its mask key at once. Every honest client refuses it (logs, sends
    nothing, keeps its connection); the server cannot unmask, fails the round cleanly and
    keeps the model; round 2, asked honestly, works."""
    honest_request = S.SecAggServer.unmask_request
    calls = []

    def both_secrets_of_c0(self: S.SecAggServer) -> bytes:
        request = honest_request(self)
        calls.append(1)
        if len(calls) > 1:
            return request
        return request[:SA_HEADER] + bytes([request[SA_HEADER] | 0b11]) + request[SA_HEADER + 1 :]

    monkeypatch.setattr(S.SecAggServer, "unmask_request", both_secrets_of_c0)
    with caplog.at_level(logging.WARNING, logger="fedpress.federation.client"):
        run = federate(rounds=2)
    assert run.error is None, repr(run.error)
    row = run.rows[1]
    assert row["status"] == "failed" and row["test_loss"] == run.rows[0]["test_loss"], row
    assert "cannot reconstruct" in row["secure_aggregation"]["error"]
    refused = [r.getMessage() for r in caplog.records if "unmask request of round 1 refused" in r.getMessage()]
    assert len(refused) == N, refused
    assert all(c.stats["sessions"] == 1 and c.stats["reconnects"] == 0 for c in run.clients)
    assert_round_with_everyone(run, 2)


# ----------------------------------------------------------------- timeouts --
@pytest.mark.parametrize("step", [ADV, SHARES, UNMASK], ids=lambda step: step.name.lower())
def test_a_silent_client_costs_at_most_one_stage_timeout(step: P.SecAggStep) -> None:
    """c2 keeps its connection but never sends its round-1 message of one stage: the round
    waits ``secagg_timeout`` for it once, goes on without it (or without its shares, which
    the others replace), and c2 keeps its connection."""
    run = federate(attacks={ATTACKER: dict(tamper=_replace(step, lambda c, r, m: []))})
    row = assert_round_with_everyone(run) if step == UNMASK else assert_round_without_c2(run)
    sa = row["secure_aggregation"]
    assert SECAGG_TIMEOUT <= sa["seconds"] < SECAGG_TIMEOUT + 3.0, sa
    assert run.clients[ATTACKER].stats["sessions"] == 1 and run.clients[ATTACKER].stats["bye"]
    assert_model(run, step == UNMASK)


async def secure_raw_session(port: int, client_id: str, receive_buffer: int) -> RawSession:
    """A hand-written client that announces secure aggregation, with a socket whose receive
    buffer is ``receive_buffer`` bytes (set before connecting, so the window stays small)."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, receive_buffer)
    sock.setblocking(False)
    await asyncio.get_running_loop().sock_connect(sock, ("127.0.0.1", port))
    reader, writer = await asyncio.open_connection(sock=sock)
    hello = P.Hello(client_id, ("secure-aggregation",)).pack()
    writer.write(header(P.FrameType.HELLO, len(hello)) + hello)
    _, challenge = await raw_frame(reader)
    nonce = os.urandom(32)
    auth = P.client_mac(TOKEN, challenge, nonce, client_id) + nonce
    writer.write(header(P.FrameType.AUTH, len(auth)) + auth)
    ftype, welcome = await raw_frame(reader)
    assert ftype == P.FrameType.WELCOME, welcome
    c2s, s2c = P.session_keys(TOKEN, challenge, nonce, client_id, hello, welcome)
    return RawSession(reader, writer, c2s, s2c)


def test_a_client_that_stops_reading_does_not_stall_the_round() -> None:
    """c2 advertises valid keys and never reads again, so the server's TASK to it (a model of
    8 MB) fills the socket buffers. Each stage must still end within ``secagg_timeout``: the
    round must end (ok or failed) long before the test gives up."""
    big = {"w": np.zeros(2_000_000, np.float32)}

    def train(model: dict, config: dict) -> tuple[dict, int, dict]:
        return {"w": np.full(model["w"].size, 0.001, np.float32)}, 100, {}

    async def body(h: Harness) -> list[dict]:
        server = Server(
            "127.0.0.1",
            0,
            big,
            rounds=1,
            clients_per_round=3,
            codec=CODEC,
            token=TOKEN,
            round_timeout=2.0,
            insecure=True,
            secure_aggregation=True,
            secagg_timeout=0.5,
            shutdown_timeout=1.0,
            seed=5,
        )
        await server.start()
        run = h.spawn(server.run())
        stuck = await secure_raw_session(server.port, "c2", 4096)
        h.closers.append(lambda: close_writer(stuck.writer))
        for i in range(2):
            client = Client(f"127.0.0.1:{server.port}", TOKEN, train, client_id=f"c{i}", insecure=True)
            h.spawn(client.run())
        await wait_until(lambda: server._peers.get("c2") is not None and server._peers["c2"].secagg_round == 1)
        rotation_seed = server._config(1)["rotation_seed"]
        config = SecureRound(1, ["c0", "c1", "c2"], server.secure, server.seed, rotation_seed).config()
        stuck.send(P.FrameType.SECAGG, secagg(1, ADV, client_round(config, "c2").advertise())[1])
        # 3 stages and the update wait, each bounded: 4 x 0.5 s + 2 s, and room for the CPU.
        await wait_until(lambda: len(server.history) >= 2, timeout=8.0)
        stuck.writer.transport.abort()
        await run
        return server.history

    rows = run_async(body, timeout=25.0)
    assert rows[1]["phase"] == "train"


# ------------------------------------------------------------- resources --
def test_a_flood_of_secagg_frames_is_not_queued_without_bound() -> None:
    """c2 advertises, then sends 300 SECAGG frames of 16 KiB for the same round. The server
    uses one message per client and stage: it should not keep the other 299."""
    flood = [secagg(1, SHARES, bytes(16 << 10))] * 300
    seen = [0]

    async def watch(server: Server) -> None:
        while True:
            peer = server._peers.get("c2")
            inbox = None if peer is None else peer.secagg_inbox
            seen[0] = max(seen[0], 0 if inbox is None else inbox.qsize())
            await asyncio.sleep(0.002)

    tamper = _replace(ADV, lambda c, r, m: [secagg(r, ADV, m), *flood])
    run = federate(attacks={ATTACKER: dict(tamper=tamper)}, delay={0: 0.5, 1: 0.5, 3: 0.5}, during=watch)
    assert_round_without_c2(run)
    assert seen[0] <= 2, f"{seen[0]} SECAGG frames of c2 queued at once"


# ------------------------------------------------------------------ leaks --
def test_a_secure_server_never_aggregates_a_lone_client_in_the_clear() -> None:
    """A secure server with 2 clients per round; one client can mask, the other (an older
    build, without the secure-aggregation feature) cannot, so only the first is sampled. Its
    update must not be taken unmasked: the round must fail (or wait), never run in the clear."""

    async def body(h: Harness) -> list[dict]:
        server = Server(
            "127.0.0.1",
            0,
            params(),
            rounds=1,
            clients_per_round=2,
            codec=CODEC,
            token=TOKEN,
            round_timeout=3.0,
            insecure=True,
            secure_aggregation=True,
            secagg_timeout=1.0,
            shutdown_timeout=1.0,
            wait_timeout=3.0,
            seed=5,
        )
        await server.start()
        run = h.spawn(server.run())
        legacy = await raw_handshake(server.port, "legacy")  # announces no features
        h.closers.append(lambda: close_writer(legacy.writer))
        h.spawn(Client(f"127.0.0.1:{server.port}", TOKEN, train_fn(0), client_id="c0", insecure=True).run())
        try:
            await asyncio.wait_for(asyncio.shield(run), 15.0)
        except WaitTimeout:  # waiting for a second client that can mask is fine too
            pass
        return server.history

    rows = run_async(body, timeout=25.0)
    for row in rows[1:]:
        assert row["status"] == "failed" or "secure_aggregation" in row, row


def test_a_private_round_never_carries_less_noise_than_it_accounts_for() -> None:
    """Distributed DP for 10 clients per round (each adds a Skellam share calibrated for the 7
    sure to survive); only 4 clients are there (min_clients=4). Either the round is not released
    or the noise of its survivors reaches what the accountant counts on."""
    run = federate(
        codec="int12:clip=0.05:nmax=64",
        clients_per_round=10,
        min_clients=4,
        clip_norm=0.5,
        dp_noise_multiplier=0.5,
    )
    assert run.error is None, repr(run.error)
    row = run.rows[1]
    privacy, survivors = row["privacy"], row["secure_aggregation"]["survivors"]
    assert row["status"] == "failed" or privacy["client_mu"] * len(survivors) >= privacy["central_mu"] * (1 - 1e-9), (
        privacy,
        survivors,
    )


# -------------------------------------------------------------- reconnects --
def test_a_client_that_reconnects_mid_round_is_not_sent_the_old_rounds_messages(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """c2 advertises, disconnects and reconnects at once, while c0's keys are late, so the server
    is still in stage 1. The round goes on without c2; its new connection must not be sent the
    round's KEYS (which that connection never asked for), so it needs no third session."""
    attacks = {
        0: dict(late={ADV: 0.5}),
        ATTACKER: dict(drop_after="advertise", backoff=0.01, max_backoff=0.01),
    }
    with caplog.at_level(logging.WARNING, logger="fedpress.federation.server"):
        run = federate(attacks=attacks)
    assert_round_without_c2(run)
    errors = [r.getMessage() for r in caplog.records if "c2 sent ERROR" in r.getMessage()]
    assert not errors, errors
    assert run.clients[ATTACKER].stats["sessions"] == 2


# ----------------------------------------------------------------- accounting --
def test_secagg_traffic_is_counted_frame_for_frame() -> None:
    """An honest round: rounds.jsonl's protocol uplink is the SECAGG frames the clients sent,
    byte for byte, and its downlink the server's messages plus one frame's framing each."""
    run = federate()
    sa = assert_round_with_everyone(run)["secure_aggregation"]
    assert sa["protocol_uplink_wire_bytes"] == sum(c.secagg_wire_bytes for c in run.clients)
    sent = sa["protocol_message_bytes"]
    frames = 4 * N  # KEYS, ROUTED, VERDICT, UNMASK_REQUEST to each client
    overhead = P.HEADER.size + 5 + P.TRAILER_BYTES
    assert sa["protocol_downlink_wire_bytes"] == (
        sent["keys_sent"] + sent["shares_sent"] + sent["verdict_sent"] + sent["unmask_request_sent"] + frames * overhead
    )


def test_secagg_frames_the_protocol_does_not_use_are_counted_too() -> None:
    """c2 sends its keys twice and once more for another round: the server received those
    frames, and the round's protocol uplink must count them."""
    tamper = _replace(ADV, lambda c, r, m: [secagg(r, ADV, m), secagg(r, ADV, m), secagg(r + 7, ADV, m)])
    run = federate(attacks={ATTACKER: dict(tamper=tamper)})
    sa = assert_round_without_c2(run)["secure_aggregation"]
    assert sa["protocol_uplink_wire_bytes"] == sum(c.secagg_wire_bytes for c in run.clients)
