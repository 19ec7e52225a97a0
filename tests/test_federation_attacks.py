"""The federation under attack, over real sockets on 127.0.0.1: a proxy that
rewrites, replays or reorders a client's frames after the handshake, a client
that claims another's id, a client that claims a huge weight.

The task and the helpers are those of test_federation.py.
"""

from __future__ import annotations

import asyncio
import logging
import struct
import time
from typing import Callable, Optional

import numpy as np
import pytest
from cli_helpers import run_cli, server_args
from fedpress.federation import AuthenticationError, Client, Server
from fedpress.federation import protocol as P
from test_federation import (
    TOKEN,
    CountingProxy,
    Harness,
    RawSession,
    client_for,
    close_writer,
    initial_params,
    make_train_fn,
    raw_frame,
    raw_handshake,
    run_async,
    server_for,
    wait_until,
)

UPDATE_HEAD = struct.Struct("<IBQI")  # round, status, num_examples, metrics length


class TamperingProxy(CountingProxy):
    """A TCP forwarder that hands every client-to-server frame after the
    handshake to ``tamper(index, frame) -> frames to send instead``."""

    def __init__(self, target_port: int, tamper: Callable[[int, bytes], list[bytes]]) -> None:
        super().__init__(target_port)
        self.tamper = tamper
        self.sealed = 0  # sealed client frames seen, all connections

    async def _pump(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, direction: str) -> None:
        if direction == "down":
            return await super()._pump(reader, writer, direction)
        try:
            for n in range(1 << 30):
                head = await reader.readexactly(P.HEADER.size)
                frame = head + await reader.readexactly(P.HEADER.unpack(head)[3])
                if n >= 2:  # HELLO and AUTH pass; the rest is sealed
                    out = self.tamper(self.sealed, frame)
                    self.sealed += 1
                else:
                    out = [frame]
                for f in out:
                    writer.write(f)
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError, OSError):
            pass
        finally:
            if not writer.transport.is_closing():
                writer.close()


def is_update(frame: bytes) -> bool:
    return frame[3] == P.FrameType.UPDATE


def rewrite_values(frame: bytes) -> bytes:
    """Every payload byte after the update's head and metrics replaced (the tag kept)."""
    body = frame[P.HEADER.size :]
    _, _, _, metrics_len = UPDATE_HEAD.unpack_from(body)
    start = P.HEADER.size + UPDATE_HEAD.size + metrics_len
    end = len(frame) - P.TRAILER_BYTES
    return frame[:start] + bytes(b ^ 0x55 for b in frame[start:end]) + frame[end:]


def rewrite_weight(frame: bytes) -> bytes:
    at = P.HEADER.size + 5
    return frame[:at] + struct.pack("<Q", 10**9) + frame[at + 8 :]


def make_tamper(mode: str) -> Callable[[int, bytes], list[bytes]]:
    kept: list[bytes] = []

    def tamper(index: int, frame: bytes) -> list[bytes]:
        if not is_update(frame):
            return [frame]
        if mode == "values":
            return [rewrite_values(frame)]
        if mode == "weight":
            return [rewrite_weight(frame)]
        assert mode == "replay"
        if not kept:  # the first update goes through, and every later one is replaced by it
            kept.append(frame)
            return [frame]
        return [kept[0]]

    return tamper


@pytest.mark.parametrize("mode", ["values", "weight", "replay"])
def test_tampering_proxy_frames_are_rejected_and_the_round_completes(mode, caplog):
    """A proxy between one client and the server rewrites that client's UPDATE
    values, its num_examples, or replays its first UPDATE in later rounds: each
    altered frame fails its MAC, costs that client its connection, is logged,
    and is never aggregated; the rounds complete with the honest clients."""

    async def body(h: Harness) -> tuple[Server, Server]:
        server = server_for(rounds=3, clients_per_round=3, min_clients=3, round_timeout=5.0)
        await server.start()
        proxy = TamperingProxy(server.port, make_tamper(mode))
        port = await proxy.start()
        h.closers.append(proxy.close)
        run = h.spawn(server.run())
        honest = [h.spawn(client_for(server.port, i).run()) for i in (0, 1)]
        h.spawn(client_for(port, 2).run())
        await run
        await asyncio.gather(*honest)
        return server, proxy

    with caplog.at_level(logging.WARNING, logger="fedpress.federation.server"):
        server, proxy = run_async(body, timeout=40)
    rows = server.history[1:]
    assert [r["status"] for r in rows] == ["ok"] * 3
    rejected = [r for r in rows if "c2" in r["failed"]]
    assert rejected, rows
    for r in rows:
        assert {"c0", "c1"} <= set(r["completed"])
    for r in rejected:
        assert "does not verify" in r["failures"]["c2"]
    tampered_rounds = rows[1:] if mode == "replay" else rows
    for r in tampered_rounds:  # every update the proxy touched was left out
        assert "c2" not in r["completed"]
    if mode == "replay":
        assert "c2" in rows[0]["completed"]
    assert any("does not verify" in rec.getMessage() for rec in caplog.records)
    assert rows[-1]["test_loss"] < server.history[0]["test_loss"]
    assert all(r["num_examples"] <= 2 * 128 + (128 if r is rows[0] else 0) for r in rows)


@pytest.mark.parametrize("mode", ["reorder", "unsealed", "foreign_key"])
def test_reordered_unsealed_or_foreign_frames_from_an_authenticated_client(mode):
    """A client that passed the handshake sends its UPDATE out of order (the
    second sealed frame first), without a tag, or sealed with another
    connection's key: the server closes it, the round completes without it."""

    async def rogue(port: int) -> Optional[tuple[int, str]]:
        session: RawSession = await raw_handshake(port, "rogue")
        try:
            ftype, body = await session.recv()
            assert ftype == P.FrameType.TASK
            task = P.Task.unpack(body)
            update = b"".join(bytes(p) for p in P.Update(task.round, 10**6, {}, b"x").parts())
            if mode == "reorder":
                first, second = session.frame(P.FrameType.UPDATE, update), session.frame(P.FrameType.BYE, b"")
                session.writer.write(second + first)
            elif mode == "unsealed":
                session.writer.write(b"".join(bytes(p) for p in P.encode_frame(P.FrameType.UPDATE, update)))
            else:
                other = P.FrameSealer(P.session_keys(b"k" * 32, b"s" * 32, b"c" * 32, "rogue", b"", b"")[0])
                session.writer.write(b"".join(bytes(p) for p in other.seal(P.FrameType.UPDATE, update)))
            await session.writer.drain()
            ftype, body = await session.recv()  # the server's answer is sealed too
            return P.unpack_error(body) if ftype == P.FrameType.ERROR else None
        except (asyncio.IncompleteReadError, ConnectionError):
            return None
        finally:
            await close_writer(session.writer)

    async def body(h: Harness) -> tuple[Server, Optional[tuple[int, str]]]:
        server = server_for(rounds=1, clients_per_round=3, min_clients=3)
        await server.start()
        run = h.spawn(server.run())
        bad = h.spawn(rogue(server.port))
        for i in (0, 1):
            h.spawn(client_for(server.port, i).run())
        await run
        return server, await bad

    server, answer = run_async(body)
    row = server.history[1]
    assert row["status"] == "ok" and sorted(row["completed"]) == ["c0", "c1"]
    assert row["failed"] == ["rogue"] and "does not verify" in row["failures"]["rogue"]
    assert row["num_examples"] == 2 * 128
    assert answer is not None and answer[0] == P.ErrorCode.INTEGRITY


def test_per_client_tokens_refuse_an_id_takeover():
    """With a master token on the server, each client authenticates with its own
    derived token: a client holding c1's token cannot connect as c0 (c0 keeps
    its connection and its rounds), nor can the master's holder be guessed."""
    master = b"master-token-0123456789abcdef-xyz"

    async def body(h: Harness) -> Server:
        server = server_for(rounds=2, clients_per_round=2, min_clients=2, token=None, master_token=master)
        await server.start()
        run = h.spawn(server.run())
        clients = [client_for(server.port, i, token=P.client_token(master, f"c{i}")) for i in (0, 1)]
        tasks = [h.spawn(clients[0].run())]
        await wait_until(lambda: server.clients == ["c0"], 10)  # no round starts before c1 joins
        for token in (P.client_token(master, "c1"), master, P.client_token(b"another master 0123456789", "c0")):
            thief = client_for(server.port, 0, token=token, reconnect=False)
            with pytest.raises(AuthenticationError):
                await thief.run()
        assert server.clients == ["c0"]
        tasks.append(h.spawn(clients[1].run()))
        await run
        await asyncio.gather(*tasks)
        return server

    server = run_async(body)
    assert [r["status"] for r in server.history[1:]] == ["ok", "ok"]
    assert all(sorted(r["completed"]) == ["c0", "c1"] for r in server.history[1:])
    assert sum(r["rejected_connections"] for r in server.history) == 3


def test_server_needs_exactly_one_kind_of_token():
    params = {"w": np.zeros(3, np.float32)}
    for kw in ({}, {"token": b"t" * 32, "master_token": b"m" * 32}):
        with pytest.raises(ValueError, match="exactly one"):
            Server(
                "127.0.0.1", 0, params, rounds=1, clients_per_round=1, min_clients=1, codec="fp32", insecure=True, **kw
            )


def test_token_command_makes_and_derives_token_files(tmp_path, capsys):
    from fedpress import cli

    master = tmp_path / "master"
    assert cli.main(["token", "--new", "--out", str(master)]) == 0
    assert master.stat().st_mode & 0o777 == 0o600
    secret = master.read_bytes().strip()
    assert len(secret) == 64 and int(secret, 16) >= 0
    with pytest.raises(SystemExit, match="exists; pass --force"):
        run_cli(["token", "--new", "--out", str(master)])
    assert master.read_bytes().strip() == secret  # nothing a user made is lost without --force
    capsys.readouterr()
    assert cli.main(["token", "--master", str(master), "--client-id", "site-3"]) == 0
    assert capsys.readouterr().out.strip().encode() == P.client_token(secret, "site-3")
    site = tmp_path / "site-3.token"
    assert cli.main(["token", "--master", str(master), "--client-id", "site-3", "--out", str(site)]) == 0
    assert site.read_bytes().strip() == P.client_token(secret, "site-3")
    for argv, message in [
        (["--master", str(master)], "needs --client-id"),
        (["--new", "--client-id", "a"], "goes with --master"),
        (["--master", str(tmp_path / "none"), "--client-id", "a"], "cannot read the token file"),
        (["--master", str(master), "--client-id", "x" * 300], "client id must be"),
    ]:
        with pytest.raises(SystemExit, match=message):
            run_cli(["token", *argv])


def test_server_command_takes_exactly_one_token_option(tmp_path, capsys):
    from fedpress import cli

    token = tmp_path / "token"
    token.write_text("x" * 32)
    base = [
        "server",
        "--port",
        "0",
        "--rounds",
        "1",
        "--clients-per-round",
        "1",
        "--min-clients",
        "1",
        "--codec",
        "q8",
        "--out",
        str(tmp_path / "run"),
    ]
    for extra in ([], ["--token-file", str(token), "--master-token-file", str(token)]):
        with pytest.raises(SystemExit):  # argparse's own usage error
            cli.main(base + extra)
        assert "token-file" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


# ------------------------------------------------------- weights and values --
def poisoned_train_fn(num_examples: int = 128, scale: float = 1.0) -> Callable:
    """An authenticated client that lies: a huge weight, or an update scaled up."""
    honest = make_train_fn(7)

    def train(params: dict, config: dict) -> tuple[dict, int, dict]:
        update, _, metrics = honest(params, config)
        return (
            {k: (v * np.float32(scale) if v.dtype == np.float32 else v) for k, v in update.items()},
            num_examples,
            metrics,
        )

    return train


def run_with_liar(liar: Callable, rounds: int = 3, **server_kw: object) -> Server:
    async def body(h: Harness) -> Server:
        server = server_for(rounds=rounds, clients_per_round=4, min_clients=4, **server_kw)
        await server.start()
        run = h.spawn(server.run())
        tasks = [h.spawn(client_for(server.port, i).run()) for i in range(3)]
        tasks.append(h.spawn(client_for(server.port, 9, train_fn=liar).run()))
        await run
        await asyncio.gather(*tasks)
        return server

    return run_async(body, timeout=30)


def test_a_claimed_weight_is_cut_to_max_examples():
    """num_examples = 2**64 - 1 would make one client the whole mean; with
    max_examples it weighs as much as an honest client and the model learns."""
    liar = poisoned_train_fn(num_examples=2**64 - 1, scale=-1.0)  # its update points the wrong way
    free = run_with_liar(liar)
    capped = run_with_liar(liar, max_examples=128)
    assert free.history[-1]["test_loss"] > free.history[0]["test_loss"]  # the liar steers the mean
    for row in capped.history[1:]:
        assert row["clients"]["c9"]["weight_capped"] is True and row["clients"]["c9"]["weight"] == 128
        assert row["clients"]["c0"]["weight"] == 128 and "weight_capped" not in row["clients"]["c0"]
        assert row["clients"]["c9"]["num_examples"] == 2**64 - 1  # what it claimed stays on record
    assert capped.history[-1]["test_loss"] < capped.history[0]["test_loss"] / 2


def test_max_share_bounds_one_clients_weight():
    liar = poisoned_train_fn(num_examples=10**12, scale=-1.0)
    shared = run_with_liar(liar, max_share=0.3)
    free = run_with_liar(liar)
    assert free.history[-1]["test_loss"] > free.history[0]["test_loss"]
    assert shared.history[-1]["test_loss"] < shared.history[0]["test_loss"] * 0.75
    weights = {c: v["weight"] for c, v in shared.history[1]["clients"].items()}
    assert weights["c9"] == 10**12  # the cap applies to the round's mean, the row keeps the claim


@pytest.mark.parametrize("defense", [dict(clip_norm=1.0), dict(aggregation="median"), dict(aggregation="trimmed:0.25")])
def test_clipping_or_a_robust_rule_stops_a_huge_update(defense):
    """An update of 3e37-sized values: finite, accepted by the decoder, and an
    overflowing sum under a plain mean (the round fails, the model is kept: never
    an inf model); clipped, or outvoted coordinate-wise, it does no harm."""
    liar = poisoned_train_fn(scale=3e38 / 10)
    plain = run_with_liar(liar, rounds=2, codec="fp32")
    defended = run_with_liar(liar, rounds=2, codec="fp32", **defense)
    assert [r["status"] for r in plain.history[1:]] == ["failed", "failed"]
    assert "not finite" in plain.history[1]["error"]
    assert plain.history[-1]["test_loss"] == plain.history[0]["test_loss"]
    assert defended.history[-1]["test_loss"] < defended.history[0]["test_loss"]
    assert all(r["status"] == "ok" and "c9" in r["completed"] for r in defended.history[1:])
    if "clip_norm" in defense:
        assert defended.history[1]["clients"]["c9"]["clip_factor"] < 1e-30


def test_a_clipped_update_is_decoded_once_and_streamed(monkeypatch):
    """With clip_norm alone each update is decoded once (for its norm) and added as
    decoded; with max_share as well the shares are known at the round's end, so the
    payloads are held and decoded again. Both give the same clipped FedAvg."""
    import fedpress.federation.server as S

    calls = {"decode": 0, "add": 0}
    real_decode, real_add, real_add_many = S.decode, S.Aggregator.add, S.Aggregator.add_many
    real_mean_of = S.Aggregator.mean_of

    def decode(*a: object, **kw: object) -> object:
        calls["decode"] += 1
        return real_decode(*a, **kw)

    def add(self: object, payload: object, weight: float = 1.0) -> None:
        calls["add"] += weight > 0  # the round's reference payload goes in with weight 0
        real_add(self, payload, weight)

    def add_many(self: object, payloads: list, weights: list) -> None:  # the held payloads, in one call
        calls["add"] += sum(w > 0 for w in weights)
        real_add_many(self, payloads, weights)

    def mean_of(self: object, payloads: list, weights: list) -> object:  # the same, and the mean
        calls["add"] += sum(w > 0 for w in weights)
        return real_mean_of(self, payloads, weights)

    monkeypatch.setattr(S, "decode", decode)
    monkeypatch.setattr(S.Aggregator, "add", add)
    monkeypatch.setattr(S.Aggregator, "add_many", add_many)
    monkeypatch.setattr(S.Aggregator, "mean_of", mean_of)
    liar = poisoned_train_fn(scale=100.0)
    streamed = run_with_liar(liar, rounds=2, codec="fp32", clip_norm=0.05)
    updates = sum(len(r["completed"]) for r in streamed.history[1:])
    assert updates == 8 and calls == {"decode": updates, "add": 0}
    calls.update(decode=0, add=0)
    held = run_with_liar(liar, rounds=2, codec="fp32", clip_norm=0.05, max_share=1.0)
    assert calls == {"decode": updates, "add": updates}
    for a, b in zip(streamed.history[1:], held.history[1:]):
        assert a["clients"]["c9"]["clip_factor"] == pytest.approx(b["clients"]["c9"]["clip_factor"], rel=1e-6)
        assert a["test_loss"] == pytest.approx(b["test_loss"], rel=1e-4)


def test_server_refuses_bad_defense_settings():
    params = {"w": np.zeros(1000, np.float32)}
    base = dict(rounds=1, clients_per_round=10, min_clients=1, codec="fp32", token=b"t" * 32, insecure=True)
    for kw, message in [
        (dict(max_examples=0), "max_examples"),
        (dict(max_share=1.5), "max_share"),
        (dict(clip_norm=-1.0), "clip_norm"),
        (dict(aggregation="mode"), "unknown aggregation"),
        (dict(aggregation="trimmed:0.5"), "trimmed"),
        (dict(aggregation="median", robust_memory=1000), "robust_memory"),
    ]:
        with pytest.raises(ValueError, match=message):
            Server("127.0.0.1", 0, params, **base, **kw)  # type: ignore[arg-type]


# ------------------------------------------------------ time and memory limits --
async def idle_connections(port: int, n: int) -> list[asyncio.StreamWriter]:
    writers = []
    for _ in range(n):
        _, writer = await asyncio.open_connection("127.0.0.1", port)
        writers.append(writer)
    return writers


@pytest.mark.parametrize("hello_timeout", [60.0, 2.0])
def test_a_client_joins_while_300_idle_connections_are_held(hello_timeout):
    """300 connections from the client's own address that never speak: the
    per-address cap evicts the oldest, so the legitimate client's handshake gets
    a slot at once (with hello_timeout 60 s the idle ones would otherwise stay)."""

    async def body(h: Harness) -> tuple[Server, float, list[bool]]:
        server = server_for(
            rounds=1,
            clients_per_round=1,
            min_clients=1,
            hello_timeout=hello_timeout,
            handshake_timeout=max(hello_timeout, 3.0),
        )
        await server.start()
        run = h.spawn(server.run())
        idle = await idle_connections(server.port, 300)
        h.closers.append(lambda: asyncio.gather(*(close_writer(w) for w in idle)))
        assert len(server._handshaking) <= server.max_pending_per_address
        started = time.monotonic()
        client = client_for(server.port, 0, reconnect=False)
        await client.run()
        joined = time.monotonic() - started
        await run
        return server, joined, [w.transport.is_closing() or w.is_closing() for w in idle]

    server, joined, _ = run_async(body, timeout=40)
    assert joined < 5.0
    assert server.history[1]["completed"] == ["c0"]
    assert server.rejected_connections >= 300 - server.max_pending_per_address


def test_a_silent_connection_is_dropped_after_hello_timeout():
    async def body(h: Harness) -> tuple[Optional[tuple[int, str]], float]:
        server = server_for(rounds=1, clients_per_round=1, min_clients=1, hello_timeout=0.5)
        await server.start()
        h.spawn(server.run())
        reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
        started = time.monotonic()
        try:
            ftype, body = await raw_frame(reader)
            data = await asyncio.wait_for(reader.read(), 5)
        finally:
            await close_writer(writer)
        assert ftype == P.FrameType.ERROR and data == b""
        return P.unpack_error(body), time.monotonic() - started

    (code, message), took = run_async(body)
    assert code == P.ErrorCode.TIMEOUT and "no HELLO within 0.5 s" in message
    assert 0.4 < took < 3.0


async def stalling_rogue(port: int, announce: int, send: int, name: str = "rogue") -> tuple[float, Optional[int]]:
    """Authenticates, takes its TASK, announces an UPDATE of ``announce`` bytes,
    sends ``send`` of them and stops; returns (seconds until the server closed
    the connection, the ERROR code it got)."""
    session = await raw_handshake(port, name)
    try:
        ftype, _ = await session.recv()
        assert ftype == P.FrameType.TASK
        session.writer.write(P.HEADER.pack(P.MAGIC, P.PROTOCOL_VERSION, P.FrameType.UPDATE, announce))
        chunk = b"\0" * (1 << 20)
        for start in range(0, send, len(chunk)):
            session.writer.write(chunk[: min(len(chunk), send - start)])
            await session.writer.drain()
        stalled = time.monotonic()
        code = None
        try:
            ftype, body = await asyncio.wait_for(raw_frame(session.reader), 30)
            if ftype == P.FrameType.ERROR:
                code = P.unpack_error(session.opener.open(P.Frame(P.FrameType(ftype), body)).body)[0]
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        return time.monotonic() - stalled, code
    finally:
        await close_writer(session.writer)


def small_steps(params: dict, config: dict) -> tuple[dict, int, dict]:
    """A train_fn for a large model that costs nothing: a tiny step on every weight."""
    return {k: np.full(v.shape, 1e-3, v.dtype) for k, v in params.items()}, 10, {}


def test_a_stalled_frame_is_cut_off_and_the_round_completes():
    """A client announces a 4 MiB UPDATE, sends 2 MiB and stalls: after
    frame_grace + 4 MiB / frame_min_rate the server cuts it (TIMEOUT), the
    in-flight budget is free again, and the round completes with the others."""
    big = initial_params(dim=1 << 20)  # a 4 MiB model: the derived max frame is 9 MiB

    async def body(h: Harness) -> tuple[Server, tuple[float, Optional[int]]]:
        server = server_for(
            rounds=1,
            clients_per_round=3,
            min_clients=3,
            initial_params=big,
            frame_grace=0.5,
            frame_min_rate=8 << 20,
            round_timeout=20.0,
            evaluate_fn=None,
            codec="topk:0.001",
        )
        await server.start()
        run = h.spawn(server.run())
        rogue = h.spawn(stalling_rogue(server.port, 4 << 20, 2 << 20))
        for i in (0, 1):
            h.spawn(client_for(server.port, i, train_fn=small_steps).run())
        result = await rogue
        assert server.budget.used == 0
        await run
        return server, result

    server, (took, code) = run_async(body, timeout=40)
    assert code == P.ErrorCode.TIMEOUT and 0.3 < took < 5.0
    row = server.history[1]
    assert row["status"] == "ok" and sorted(row["completed"]) == ["c0", "c1"]
    assert "not received within" in row["failures"]["rogue"]
    assert server.max_frame_bytes == 2 * 4 * ((1 << 20) + 1 + 1) + (1 << 20)
    assert server.budget.peak <= server.budget.total


def test_a_frame_larger_than_the_model_allows_is_refused_before_its_body():
    async def body(h: Harness) -> tuple[float, Optional[int]]:
        server = server_for(rounds=1, clients_per_round=2, min_clients=2)
        await server.start()
        h.spawn(server.run())
        rogue = h.spawn(stalling_rogue(server.port, 400 << 20, 0))
        h.spawn(client_for(server.port, 0).run())
        return await rogue

    took, code = run_async(body)
    assert code == P.ErrorCode.TOO_LARGE and took < 2.0


def test_the_inflight_budget_bounds_what_stalled_frames_hold():
    """Three clients announce 1 MiB bodies against a 2.5 MiB budget and stall:
    at most two hold the budget, the third waits (and times out like them)."""

    async def body(h: Harness) -> Server:
        server = server_for(
            rounds=1,
            clients_per_round=3,
            min_clients=3,
            max_frame_bytes=1 << 20,
            inflight_bytes=(5 << 20) // 2,
            frame_grace=1.0,
            frame_min_rate=1 << 20,
        )
        await server.start()
        run = h.spawn(server.run())
        rogues = [h.spawn(stalling_rogue(server.port, 1 << 20, 1 << 19, f"rogue{i}")) for i in range(3)]
        results = await asyncio.gather(*rogues)
        assert all(code == P.ErrorCode.TIMEOUT for _, code in results)
        await run
        return server

    server = run_async(body)
    assert server.budget.peak == 2 * (1 << 20) and server.budget.used == 0
    assert server.history[1]["status"] == "failed"


def test_limit_settings_are_checked():
    params = {"w": np.zeros(10, np.float32)}
    base = dict(rounds=1, clients_per_round=1, min_clients=1, codec="fp32", token=b"t" * 32, insecure=True)
    for kw, message in [
        (dict(hello_timeout=0), "hello_timeout"),
        (dict(max_pending_per_address=0), "per_address"),
        (dict(frame_grace=-1), "frame_grace"),
        (dict(frame_min_rate=0), "frame_min_rate"),
        (dict(max_frame_bytes=1 << 20, inflight_bytes=1 << 10), "inflight_bytes"),
    ]:
        with pytest.raises(ValueError, match=message):
            Server("127.0.0.1", 0, params, **base, **kw)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    "flag, value, message",
    [
        ("--hello-timeout", "0", "hello_timeout"),
        ("--inflight-bytes", "10", "inflight_bytes"),
        ("--aggregate", "mode", "unknown aggregation"),
        ("--max-share", "2", "--max-share out of range"),
    ],
)
def test_server_command_explains_bad_limits(tmp_path, flag, value, message):
    token = tmp_path / "token"
    token.write_text("x" * 32)
    with pytest.raises(SystemExit, match=message):
        run_cli(server_args(tmp_path, str(token), flag, value))
    assert not (tmp_path / "run").exists()


# ------------------------------------------------------------ a hostile server --
async def fake_handshake(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> tuple:
    """The server's side of the handshake (it knows the token: compromised, or the
    proxy of one): (sealer, opener) of the session."""
    ftype, hello = await raw_frame(reader)
    assert ftype == P.FrameType.HELLO
    cid = P.Hello.unpack(hello).client_id
    nonce = P.new_nonce()
    writer.write(b"".join(bytes(p) for p in P.encode_frame(P.FrameType.CHALLENGE, nonce)))
    _, auth_body = await raw_frame(reader)
    auth = P.Auth.unpack(auth_body)
    welcome = P.Welcome(P.server_mac(TOKEN, auth.client_nonce, nonce, cid), {"codec": "fp32"}).pack()
    writer.write(b"".join(bytes(p) for p in P.encode_frame(P.FrameType.WELCOME, welcome)))
    c2s, s2c = P.session_keys(TOKEN, nonce, auth.client_nonce, cid, hello, welcome)
    return P.FrameSealer(s2c), P.FrameOpener(c2s)


async def serve_fake(h: Harness, handler: Callable) -> int:
    """Starts ``handler`` as a server on 127.0.0.1 (closed with the harness): its port."""
    fake = await asyncio.start_server(handler, "127.0.0.1", 0)

    async def stop() -> None:
        fake.close()
        await fake.wait_closed()

    h.closers.append(stop)
    return fake.sockets[0].getsockname()[1]


def test_a_model_bomb_in_a_task_costs_the_client_one_round(wire):
    """A server (it knows the token: compromised, or the proxy of one) sends a
    TASK whose 47-byte model payload declares a 16 GiB float32 tensor: the client
    reports a failed round, asks for the full model again, and carries on to BYE
    (it used to exit with numpy's MemoryError)."""
    from test_payload_bounds import sparse_bomb

    bomb = sparse_bomb(wire)
    assert len(bomb) < 64
    seen: dict[str, object] = {}

    async def fake_server(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            sealer, opener = await fake_handshake(reader, writer)
            for r in (1, 2):
                task = P.Task(r, P.TASK_FULL, bytes(16), bytes(16), {}, [bomb])
                writer.write(b"".join(bytes(p) for p in sealer.seal(P.FrameType.TASK, *task.parts())))
                ftype, body = await raw_frame(reader)
                update = P.Update.unpack(opener.open(P.Frame(P.FrameType(ftype), body)).body)
                seen[f"round{r}"] = (update.status, update.metrics.get("error", ""))
            writer.write(b"".join(bytes(p) for p in sealer.seal(P.FrameType.BYE, b"done")))
            await writer.drain()
            await asyncio.wait_for(reader.read(), 5)
        finally:
            await close_writer(writer)

    async def body(h: Harness) -> Client:
        client = client_for(await serve_fake(h, fake_server), 0, reconnect=False)
        await client.run()
        return client

    client = run_async(body)
    assert client.stats["failed_rounds"] == 2 and client.stats["bye"] == "done" and client.model is None
    for r in ("round1", "round2"):
        status, error = seen[r]
        assert status == P.UPDATE_FAILED and "cannot apply the model" in str(error), seen


def test_a_server_stalling_mid_task_costs_the_client_a_reconnect():
    """A server announces a 64 MiB TASK, sends 1 MiB of it and stops: the client
    gives up on the frame after its body deadline (grace 0.5 s + 64 MiB at 64 MiB/s),
    tells the server ERROR TIMEOUT, reconnects, and ends at BYE. Without the deadline
    it would wait for the rest for ever."""
    sessions: list = []

    async def fake_server(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            sealer, opener = await fake_handshake(reader, writer)
            if sessions:  # the reconnect: a clean end
                writer.write(b"".join(bytes(p) for p in sealer.seal(P.FrameType.BYE, b"done")))
                await writer.drain()
                sessions.append("bye")
                await asyncio.wait_for(reader.read(), 5)
                return
            announced = 64 << 20
            writer.write(P.HEADER.pack(P.MAGIC, P.PROTOCOL_VERSION, int(P.FrameType.TASK), announced))
            writer.write(bytes(1 << 20))
            await writer.drain()
            stalled = time.monotonic()
            ftype, body = await asyncio.wait_for(raw_frame(reader), 10)
            code, message = P.unpack_error(opener.open(P.Frame(P.FrameType(ftype), body)).body)
            sessions.append((time.monotonic() - stalled, code, message))
            await asyncio.wait_for(reader.read(), 5)
        finally:
            await close_writer(writer)

    async def body(h: Harness) -> Client:
        client = client_for(
            await serve_fake(h, fake_server), 0, max_retries=1, frame_grace=0.5, frame_min_rate=64 << 20
        )
        await asyncio.wait_for(client.run(), 20)
        return client

    client = run_async(body)
    assert client.stats["bye"] == "done" and client.stats["reconnects"] == 1, client.stats
    waited, code, message = sessions[0]
    assert code == P.ErrorCode.TIMEOUT and "TASK" in message, message
    assert 1.0 <= waited < 5.0, waited
    assert sessions[1] == "bye"


def test_client_refuses_bad_frame_deadlines():
    for kw in ({"frame_grace": 0}, {"frame_min_rate": -1.0}, {"frame_grace": float("inf")}):
        with pytest.raises(ValueError, match=f"{next(iter(kw))} must be a positive number"):
            client_for(1, 0, **kw)


def test_a_deeply_nested_hello_is_one_protocol_error(caplog):
    """A HELLO whose JSON nests 5,000 levels: ERROR PROTOCOL and one log line, no
    traceback (it used to escape the parser as RecursionError)."""
    from test_federation import header, raw_exchange

    meta = b'{"features":' + b"[" * 5000 + b"]" * 5000 + b"}"
    hello = struct.pack("<HH", P.PROTOCOL_VERSION, 2) + b"c0" + meta

    async def body(h: Harness) -> tuple[Server, Optional[tuple[int, str]]]:
        server = server_for(rounds=1, clients_per_round=1, min_clients=1)
        await server.start()
        run = h.spawn(server.run())
        answer = await raw_exchange(server.port, header(P.FrameType.HELLO, len(hello)) + hello)
        await client_for(server.port, 0).run()
        await run
        return server, answer

    with caplog.at_level(logging.INFO, logger="fedpress.federation.server"):
        server, answer = run_async(body)
    assert answer is not None and answer[0] == P.ErrorCode.PROTOCOL and "nested too deeply" in answer[1]
    assert server.history[1]["status"] == "ok"
    assert not any(r.exc_info for r in caplog.records)
    assert sum("nested too deeply" in r.getMessage() for r in caplog.records) == 1
