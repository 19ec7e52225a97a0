"""fedpress.federation over real sockets on 127.0.0.1 (OS-picked ports).

The task is linear regression on synthetic numpy data with a numpy train_fn,
so a round takes milliseconds. Every test runs its event loop under a hard
timeout (asyncio.wait_for), and everything it started is cancelled and closed
at the end, so a hang fails fast instead of stalling the suite.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import ssl
import struct
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from typing import Any, Awaitable, Callable, Optional

import fedpress as fp
import numpy as np
import pytest
from cli_helpers import run_cli, server_args
from fedpress.federation import AuthenticationError, Client, ErrorCode, Server, client_context, server_context
from fedpress.federation import model as M
from fedpress.federation import protocol as P
from fedpress.federation.tls import self_signed_certificate

TOKEN = b"federation-test-token-0123456789"
DIM = 16
ROW_FIELDS = (
    "round",
    "phase",
    "status",
    "sampled",
    "completed",
    "failed",
    "failures",
    "uplink_payload_bytes",
    "uplink_wire_bytes",
    "downlink_payload_bytes",
    "downlink_wire_bytes",
    "rejected_connections",
    "rejected_wire_bytes",
    "rejected_uplink_wire_bytes",
    "rejected_downlink_wire_bytes",
    "seconds",
    "test_accuracy",
    "test_loss",
    "client_bytes",
    "clients",
    "num_examples",
    "fit_metrics",
)

# ------------------------------------------------------------------- the task --
W_TRUE = np.random.default_rng(1234).standard_normal(DIM).astype(np.float32)


def make_data(seed: int, n: int = 128, dim: int = DIM) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    w = W_TRUE if dim == DIM else np.random.default_rng(99).standard_normal(dim).astype(np.float32)
    x = rng.standard_normal((n, dim)).astype(np.float32)
    return x, (x @ w + 0.5 + 0.01 * rng.standard_normal(n)).astype(np.float32)


def initial_params(dim: int = DIM) -> dict[str, np.ndarray]:
    return {"w": np.zeros(dim, np.float32), "b": np.zeros(1, np.float32), "steps": np.zeros((), np.int64)}


def evaluate_fn(dim: int = DIM) -> Callable[[dict], dict]:
    x, y = make_data(10_000, 512, dim)

    def evaluate(params: dict) -> dict:
        loss = float(np.mean((x @ params["w"] + params["b"][0] - y) ** 2))
        return {"loss": loss, "accuracy": 1.0 / (1.0 + loss)}

    return evaluate


def make_train_fn(
    seed: int, *, dim: int = DIM, delay: float = 0.0, steps: int = 5, hook: Optional[Callable[[dict], None]] = None
) -> Callable:
    x, y = make_data(seed, dim=dim)

    def train(params: dict, config: dict) -> tuple[dict, int, dict]:
        if hook is not None:
            hook(config)
        if delay:
            time.sleep(delay)
        w, b = params["w"].copy(), params["b"].copy()
        lr = float(config.get("lr", 0.1))
        for _ in range(steps):
            err = x @ w + b[0] - y
            w -= lr * (x.T @ err) / len(y)
            b -= lr * np.float32(err.mean())
        return (
            {"w": w - params["w"], "b": b - params["b"], "steps": np.array(steps, np.int64)},
            len(y),
            {"loss": float(np.mean(err**2))},
        )

    return train


# -------------------------------------------------------------------- harness --
class Harness:
    """Tasks started by a test; all cancelled and awaited at the end."""

    def __init__(self) -> None:
        self.tasks: list[asyncio.Task] = []
        self.closers: list[Callable[[], Awaitable[None]]] = []

    def spawn(self, coro: Awaitable[Any]) -> asyncio.Task:
        task = asyncio.ensure_future(coro)
        self.tasks.append(task)
        return task

    async def close(self) -> None:
        for task in self.tasks:
            if not task.done():
                task.cancel()
        await asyncio.gather(*self.tasks, return_exceptions=True)
        for closer in reversed(self.closers):
            await closer()


def run_async(fn: Callable[[Harness], Awaitable[Any]], timeout: float = 20.0) -> Any:
    async def main() -> Any:
        h = Harness()
        try:
            return await asyncio.wait_for(fn(h), timeout)
        finally:
            await asyncio.wait_for(h.close(), 10)

    return asyncio.run(main())


def server_for(port: int = 0, **kw: Any) -> Server:
    options: dict[str, Any] = dict(
        rounds=3,
        clients_per_round=3,
        min_clients=3,
        codec="topk:0.25+q8",
        token=TOKEN,
        round_timeout=10.0,
        min_fit=1,
        evaluate_fn=evaluate_fn(),
        fit_config={"lr": 0.1},
        shutdown_timeout=3.0,
        handshake_timeout=3.0,
    )
    options["insecure"] = kw.get("ssl_context") is None  # loopback; the TLS tests pass a context
    options.update(kw)
    params = options.pop("initial_params", None) or initial_params()
    return Server("127.0.0.1", port, params, **options)


def client_for(port: int, i: int, **kw: Any) -> Client:
    options: dict[str, Any] = dict(
        client_id=f"c{i}",
        backoff=0.05,
        max_backoff=0.2,
        max_retries=40,
        connect_timeout=3.0,
        shutdown_timeout=3.0,
        insecure=kw.get("ssl_context") is None,
    )
    train_fn = kw.pop("train_fn", None) or make_train_fn(i)
    token = kw.pop("token", TOKEN)
    options.update(kw)
    return Client(f"127.0.0.1:{port}", token, train_fn, **options)


async def wait_until(predicate: Callable[[], bool], timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError("condition not reached in time")
        await asyncio.sleep(0.005)


def read_rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def header(ftype: int, length: int, *, magic: bytes = b"FP", version: int = P.PROTOCOL_VERSION) -> bytes:
    return struct.pack("<2sBBI", magic, version, ftype, length)


async def raw_exchange(
    port: int, data: bytes, *, ssl_context: Optional[ssl.SSLContext] = None, read_error: bool = True
) -> Optional[tuple[int, str]]:
    """Sends raw bytes, returns the ERROR frame the server answers with (code, message)
    and checks that the server then closes the connection."""
    reader, writer = await asyncio.open_connection(
        "127.0.0.1", port, ssl=ssl_context, server_hostname="localhost" if ssl_context else None
    )
    try:
        writer.write(data)
        await writer.drain()
        if not read_error:
            await asyncio.wait_for(reader.read(), 5)
            return None
        head = await asyncio.wait_for(reader.readexactly(8), 5)
        magic, version, ftype, length = struct.unpack("<2sBBI", head)
        assert (magic, version, ftype) == (b"FP", P.PROTOCOL_VERSION, 7)
        body = await reader.readexactly(length)
        assert await asyncio.wait_for(reader.read(), 5) == b""  # then the server closes
        return struct.unpack("<H", body[:2])[0], body[2:].decode()
    finally:
        writer.close()
        try:
            await writer.wait_closed()
        except (ConnectionError, ssl.SSLError):
            pass


class RawSession:
    """A hand-written client after its handshake: seals what it sends and checks
    what it receives as the protocol requires (or not, to test the server)."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, c2s: bytes, s2c: bytes):
        self.reader, self.writer = reader, writer
        self.sealer, self.opener = P.FrameSealer(c2s), P.FrameOpener(s2c)

    def frame(self, ftype: int, body: bytes) -> bytes:
        return b"".join(bytes(p) for p in self.sealer.seal(ftype, body))

    def send(self, ftype: int, body: bytes) -> None:
        self.writer.write(self.frame(ftype, body))

    async def recv(self) -> tuple[int, bytes]:
        ftype, body = await raw_frame(self.reader)
        opened = self.opener.open(P.Frame(P.FrameType(ftype), body))
        return ftype, opened.body


async def raw_handshake(port: int, client_id: str, token: bytes = TOKEN) -> RawSession:
    """A hand-written client handshake: HELLO, CHALLENGE, AUTH, WELCOME."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    cid = client_id.encode()
    hello = struct.pack("<HH", P.PROTOCOL_VERSION, len(cid)) + cid + b'{"features":[]}'
    writer.write(header(1, len(hello)) + hello)
    ftype, body = await raw_frame(reader)
    assert ftype == 2 and len(body) == 32
    nonce = os.urandom(32)
    auth = P.client_mac(token, body, nonce, client_id) + nonce
    writer.write(header(3, len(auth)) + auth)
    ftype, welcome = await raw_frame(reader)
    assert ftype == 4, (ftype, welcome)
    assert welcome[:32] == P.server_mac(token, nonce, body, client_id)
    c2s, s2c = P.session_keys(token, body, nonce, client_id, hello, welcome)
    return RawSession(reader, writer, c2s, s2c)


async def raw_frame(reader: asyncio.StreamReader) -> tuple[int, bytes]:
    magic, version, ftype, length = struct.unpack("<2sBBI", await asyncio.wait_for(reader.readexactly(8), 5))
    assert magic == b"FP"
    return ftype, await reader.readexactly(length)


async def close_writer(writer: asyncio.StreamWriter) -> None:
    writer.close()
    try:
        await writer.wait_closed()
    except (ConnectionError, ssl.SSLError):
        pass


class CountingProxy:
    """A TCP forwarder between clients and the server that counts the bytes it
    relays in each direction (half-closes are passed on)."""

    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        self.up = 0  # client -> server
        self.down = 0  # server -> client
        self.seen = bytearray()
        self.handlers: set[asyncio.Task] = set()

    async def start(self) -> int:
        self.server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        return self.server.sockets[0].getsockname()[1]

    async def _handle(self, creader: asyncio.StreamReader, cwriter: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self.handlers.add(task)
        sreader, swriter = await asyncio.open_connection("127.0.0.1", self.target_port)
        try:
            await asyncio.gather(self._pump(creader, swriter, "up"), self._pump(sreader, cwriter, "down"))
        finally:
            await close_writer(swriter)
            await close_writer(cwriter)

    async def _pump(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, direction: str) -> None:
        try:
            while True:
                data = await reader.read(1 << 16)
                if not data:
                    break
                if direction == "up":
                    self.up += len(data)
                else:
                    self.down += len(data)
                self.seen += data
                writer.write(data)
                await writer.drain()
        except (ConnectionError, OSError):
            pass
        finally:
            if not writer.transport.is_closing() and writer.can_write_eof():
                try:
                    writer.write_eof()
                except OSError:
                    pass

    async def close(self) -> None:
        self.server.close()
        await self.server.wait_closed()
        if self.handlers:
            await asyncio.wait_for(asyncio.gather(*self.handlers, return_exceptions=True), 5)


def make_certificate(directory: Path) -> tuple[Path, Path]:
    """A self-signed certificate for localhost / 127.0.0.1."""
    cert, key = directory / "cert.pem", directory / "key.pem"
    self_signed_certificate(cert, key, ["localhost", "127.0.0.1"], days=2)
    return cert, key


@pytest.fixture(autouse=True)
def _asyncio_stays_quiet(caplog: pytest.LogCaptureFixture):
    """Fails a test whose event loop logged an error (a task exception never
    retrieved, a task destroyed while pending, an unclosed transport...)."""
    caplog.set_level(logging.INFO)
    yield
    noisy = [r for r in caplog.records if r.name == "asyncio" and r.levelno >= logging.WARNING]
    assert not noisy, [r.getMessage() for r in noisy]


def total(rows: list[dict], field: str) -> int:
    return sum(int(r[field]) for r in rows)


# ======================================================================= tests --
def test_full_federation_topk_three_clients(tmp_path):
    """3 clients, 3 rounds, a top-k codec: the model improves, rounds.jsonl has
    every field, and each client's own socket counts equal the server's rows."""

    async def body(h: Harness) -> tuple[Server, list[Client], list[dict]]:
        server = server_for(out_dir=tmp_path, codec="topk:0.25+q8+zstd")
        await server.start()
        clients = [client_for(server.port, i, codec=None) for i in range(3)]  # codec from the server
        client_tasks = [h.spawn(c.run()) for c in clients]
        history = await server.run()
        stats = await asyncio.gather(*client_tasks)
        assert all(s["bye"] == "federation finished" for s in stats)
        return server, clients, history

    server, clients, history = run_async(body)
    rows = read_rows(tmp_path / "rounds.jsonl")
    assert rows == history == server.history
    assert [r["round"] for r in rows] == [0, 1, 2, 3]
    assert [r["phase"] for r in rows] == ["setup", "train", "train", "train"]
    for row in rows:
        missing = [f for f in ROW_FIELDS if f not in row]
        assert not missing, missing
    for row in rows[1:]:
        assert row["status"] == "ok" and sorted(row["completed"]) == ["c0", "c1", "c2"] and row["failed"] == []
        assert row["uplink_payload_bytes"] > 0 and row["downlink_payload_bytes"] > 0
        assert row["uplink_wire_bytes"] > row["uplink_payload_bytes"]
        assert row["downlink_wire_bytes"] > row["downlink_payload_bytes"]
        assert row["num_examples"] == 3 * 128 and row["rejected_connections"] == 0
        assert all(row["clients"][c]["downlink"] == "full" for c in row["completed"])
        assert set(row["fit_metrics"]) >= {"loss", "train_seconds"}
    losses = [r["test_loss"] for r in rows]
    assert losses[0] > losses[1] > losses[2] > losses[3]
    assert rows[-1]["test_accuracy"] > rows[0]["test_accuracy"]
    assert int(server.params["steps"]) == 3 * 5  # integer deltas: + the mean, rounded
    # Byte for byte, per direction: what each client's socket saw is what the server counted for it.
    for c in clients:
        assert c.encoder is not None and c.encoder.spec == "topk:0.25+q8+zstd"
        up = sum(r["client_bytes"][c.client_id]["uplink_wire_bytes"] for r in rows)
        down = sum(r["client_bytes"][c.client_id]["downlink_wire_bytes"] for r in rows)
        assert (up, down) == (c.stats["uplink_wire_bytes"], c.stats["downlink_wire_bytes"])
        assert c.stats["uplink_payload_bytes"] == sum(
            r["client_bytes"][c.client_id]["uplink_payload_bytes"] for r in rows
        )
        assert c.stats["rounds"] == 3 and c.encoder.residual_norm() > 0  # error feedback kept a residual
    # The setup row holds the handshakes, the last row the BYEs.
    assert rows[0]["uplink_wire_bytes"] > 0 and rows[0]["uplink_payload_bytes"] == 0
    checkpoint = json.loads((tmp_path / "checkpoint.json").read_text())
    assert checkpoint["round"] == 3
    with np.load(tmp_path / checkpoint["npz"]) as z:
        assert np.array_equal(z["g0"], server.params["w"])
    assert not list(tmp_path.glob("*.tmp"))


def test_client_killed_mid_round(tmp_path):
    """A client process SIGKILLed while training: the round completes with the
    others as soon as the server sees the connection drop (not at the timeout)."""
    marker = tmp_path / "training"
    script = textwrap.dedent(f"""
        import sys, time, pathlib
        from fedpress.federation import Client
        def train(params, config):
            pathlib.Path({str(marker)!r}).write_text("x")
            time.sleep(60)
        Client("127.0.0.1:" + sys.argv[1], {TOKEN!r}, train, codec="fp16", client_id="victim",
               reconnect=False, insecure=True).run_sync()
    """)

    async def body(h: Harness) -> Server:
        server = server_for(rounds=2, round_timeout=15.0, min_fit=2)
        await server.start()
        log = open(tmp_path / "victim.log", "wb")
        proc = subprocess.Popen([sys.executable, "-c", script, str(server.port)], stdout=log, stderr=subprocess.STDOUT)

        async def reap() -> None:
            if proc.poll() is None:
                proc.kill()
            proc.wait(5)
            log.close()

        h.closers.append(reap)
        run = h.spawn(server.run())
        await wait_until(lambda: "victim" in server.clients, 15)
        survivors = [client_for(server.port, i) for i in range(2)]
        tasks = [h.spawn(c.run()) for c in survivors]
        await wait_until(marker.exists, 10)
        proc.kill()  # SIGKILL: no goodbye, the socket just drops
        await wait_until(lambda: len(server.history) >= 2, 10)
        newcomer = client_for(server.port, 7)  # round 2 needs three clients again
        tasks.append(h.spawn(newcomer.run()))
        await run
        await asyncio.gather(*tasks)
        return server

    server = run_async(body, timeout=30)
    assert (tmp_path / "victim.log").read_text() == ""  # it ran quietly until it was killed
    r1, r2 = server.history[1], server.history[2]
    assert sorted(r1["sampled"]) == ["c0", "c1", "victim"]
    assert sorted(r1["completed"]) == ["c0", "c1"] and r1["failed"] == ["victim"]
    assert "disconnected" in r1["failures"]["victim"]
    assert r1["status"] == "ok" and r1["seconds"] < 15.0
    assert sorted(r2["completed"]) == ["c0", "c1", "c7"] and r2["status"] == "ok"


def test_bad_connections_are_rejected_and_counted():
    """Garbage, an oversized length, a wrong token, wrong protocol versions:
    each gets an ERROR frame (when possible), is closed and counted as rejected
    in the row it happened in; the federation runs on."""

    async def body(h: Harness) -> tuple[Server, dict]:
        server = server_for(rounds=2, clients_per_round=2, min_clients=2, handshake_timeout=0.5)
        await server.start()
        run = h.spawn(server.run())
        port = server.port
        errors = {
            "garbage": await raw_exchange(port, b"GET / HTTP/1.1\r\nHost: x\r\n\r\n"),
            # 4 GiB - 1 announced, not one body byte sent: the ERROR comes at once.
            "oversized": await raw_exchange(port, header(1, 0xFFFFFFFF)),
            "header_version": await raw_exchange(port, header(1, 4, version=9) + b"abcd"),
            "hello_version": await raw_exchange(port, header(1, 7) + struct.pack("<HH", 99, 1) + b"x{}"),
            "not_hello": await raw_exchange(port, header(6, 0)),
        }
        bad = client_for(port, 9, token=b"not-the-token", reconnect=True)
        with pytest.raises(AuthenticationError, match="rejected the token"):
            await bad.run()  # never retried
        assert bad.stats["reconnects"] == 0
        silent_r, silent_w = await asyncio.open_connection("127.0.0.1", port)  # never says HELLO
        await wait_until(lambda: server._ledger.row.rejected_connections == 7, 10)
        assert await asyncio.wait_for(silent_r.read(), 5) != b""  # ERROR TIMEOUT, then EOF
        await close_writer(silent_w)
        clients = [client_for(port, i) for i in range(2)]
        await asyncio.gather(*(h.spawn(c.run()) for c in clients))
        await run
        return server, errors

    server, errors = run_async(body)
    assert errors["garbage"][0] == ErrorCode.PROTOCOL
    assert errors["oversized"][0] == ErrorCode.TOO_LARGE
    assert errors["header_version"][0] == ErrorCode.VERSION
    assert errors["hello_version"][0] == ErrorCode.VERSION and "99" in errors["hello_version"][1]
    assert errors["not_hello"][0] == ErrorCode.PROTOCOL
    setup = server.history[0]
    assert setup["rejected_connections"] == 7 and server.rejected_connections == 7
    assert setup["rejected_uplink_wire_bytes"] > 0 and setup["rejected_downlink_wire_bytes"] > 0
    assert setup["rejected_wire_bytes"] == setup["rejected_uplink_wire_bytes"] + setup["rejected_downlink_wire_bytes"]
    assert "c9" not in setup["client_bytes"]  # a rejected client is not a client
    assert [r["status"] for r in server.history[1:]] == ["ok", "ok"]


def test_bad_updates_are_left_out_and_min_fit(tmp_path):
    """An authenticated client answering with an invalid payload, one with a
    foreign tensor table and one sending a garbage frame are left out of the
    round; below min_fit valid updates the model is kept and the round fails."""

    async def rogue(port: int, mode: str) -> None:
        session = await raw_handshake(port, f"rogue-{mode}")
        writer = session.writer
        try:
            while True:
                ftype, body = await session.recv()
                if ftype != P.FrameType.TASK:
                    break
                task = P.Task.unpack(body)
                if mode == "frame":
                    writer.write(b"\xde\xad\xbe\xef" * 4)
                else:
                    payload = (
                        b"definitely not a payload"
                        if mode == "payload"
                        else fp.Codec("fp32").encode({"w": np.ones(3, np.float32)})
                    )
                    data = b"".join(bytes(p) for p in P.Update(task.round, 10, {}, payload).parts())
                    session.send(P.FrameType.UPDATE, data)
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            await close_writer(writer)

    async def body(h: Harness) -> tuple[Server, Server]:
        server = server_for(rounds=2, clients_per_round=4, min_clients=4, min_fit=1)
        await server.start()
        run = h.spawn(server.run())
        for mode in ("payload", "table", "frame"):
            h.spawn(rogue(server.port, mode))
        good = client_for(server.port, 0)
        h.spawn(good.run())
        await wait_until(lambda: len(server.history) >= 2, 10)
        h.spawn(client_for(server.port, 5).run())  # round 2: four idle clients again
        h.spawn(client_for(server.port, 6).run())
        await run

        strict = server_for(rounds=1, clients_per_round=2, min_clients=2, min_fit=2)
        await strict.start()
        run2 = h.spawn(strict.run())
        h.spawn(rogue(strict.port, "payload"))
        h.spawn(client_for(strict.port, 1).run())
        await run2
        return server, strict

    server, strict = run_async(body)
    r1 = server.history[1]
    assert r1["status"] == "ok" and r1["completed"] == ["c0"]
    assert sorted(r1["failed"]) == ["rogue-frame", "rogue-payload", "rogue-table"]
    assert "invalid payload" in r1["failures"]["rogue-payload"]
    assert "invalid payload" in r1["failures"]["rogue-table"]
    assert "protocol error" in r1["failures"]["rogue-frame"]
    assert server.history[2]["status"] == "ok"
    s1 = strict.history[1]
    assert s1["status"] == "failed" and s1["failed_round"] and s1["completed"] == ["c1"]
    assert all(np.array_equal(strict.params[k], v) for k, v in initial_params().items())  # the model is kept


def test_slow_client_times_out_and_is_not_resampled_while_busy():
    """A client slower than round_timeout is left out of the round; while its
    task is outstanding it is not sampled again; its late update is discarded."""

    async def body(h: Harness) -> tuple[Server, Client, dict]:
        calls = {"n": 0}

        def count(config: dict) -> None:
            calls["n"] += 1

        server = server_for(rounds=2, clients_per_round=4, min_clients=3, round_timeout=0.5)
        await server.start()  # handshakes are served from here on; rounds start with run()
        slow = client_for(server.port, 2, train_fn=make_train_fn(2, delay=1.0, hook=count))
        tasks = [h.spawn(c.run()) for c in [client_for(server.port, i) for i in (0, 1, 3)] + [slow]]
        await wait_until(lambda: len(server.clients) == 4, 5)
        await server.run()
        await asyncio.gather(*tasks)
        return server, slow, calls

    server, slow, calls = run_async(body)
    r1, r2 = server.history[1], server.history[2]
    assert sorted(r1["sampled"]) == ["c0", "c1", "c2", "c3"]
    assert r1["failed"] == ["c2"] and "timed out" in r1["failures"]["c2"]
    assert r1["seconds"] >= 0.5 and r1["status"] == "ok" and len(r1["completed"]) == 3
    assert sorted(r2["sampled"]) == ["c0", "c1", "c3"] and r2["status"] == "ok"
    assert calls["n"] == 1 and slow.stats["rounds"] == 1  # its late update went out and was discarded
    assert r2["uplink_payload_bytes"] >= 0


@pytest.mark.parametrize("mode", ["chain", "client"])
def test_server_killed_and_resumed(tmp_path, mode):
    """The server dies in round 3 (no BYE, no row); a new one resumes from the
    round-2 checkpoint on the same port, the clients reconnect and the
    federation finishes rounds 3 and 4. The restored downlink (the delta chain,
    or the model each client holds) still gives deltas."""

    async def body(h: Harness) -> tuple[Server, Server, list[Client]]:
        holder: dict[str, asyncio.Task] = {}

        def fit_config(r: int) -> dict:
            if r == 3 and "killed" not in holder:
                holder["killed"] = holder["run"]
                holder["run"].cancel()  # dies inside round 3
            return {"lr": 0.1}

        first = server_for(
            rounds=4, out_dir=tmp_path, fit_config=fit_config, downlink="topk:0.5+fp16", downlink_mode=mode
        )
        await first.start()
        port = first.port
        holder["run"] = h.spawn(first.run())
        clients = [client_for(port, i) for i in range(3)]
        tasks = [h.spawn(c.run()) for c in clients]
        with pytest.raises(asyncio.CancelledError):
            await holder["run"]
        assert [r["round"] for r in read_rows(tmp_path / "rounds.jsonl")] == [0, 1, 2]
        assert json.loads((tmp_path / "checkpoint.json").read_text())["round"] == 2
        # What a kill inside atomic_write leaves (before its rename), and a user's file that stays.
        for name in (".checkpoint.json.k3j2.tmp", ".checkpoint-3.npz.x9q1.tmp", ".rounds.jsonl.a1b2.tmp"):
            (tmp_path / name).write_bytes(b"partial")
        (tmp_path / ".notes.tmp").write_text("mine")
        second = server_for(port, rounds=4, out_dir=tmp_path, resume=True, downlink="topk:0.5+fp16", downlink_mode=mode)
        await second.run()
        await asyncio.gather(*tasks)
        return first, second, clients

    first, second, clients = run_async(body, timeout=30)
    rows = read_rows(tmp_path / "rounds.jsonl")
    assert [(r["round"], r["phase"]) for r in rows] == [
        (0, "setup"),
        (1, "train"),
        (2, "train"),
        (0, "setup"),
        (3, "train"),
        (4, "train"),
    ]
    assert rows == second.history
    assert sorted(p.name for p in tmp_path.glob(".*.tmp")) == [".notes.tmp"]
    assert rows[3]["resumed_from"] == 2
    assert rows[3]["test_loss"] == pytest.approx(rows[2]["test_loss"], rel=1e-6)  # the checkpointed model
    assert rows[4]["status"] == rows[5]["status"] == "ok"
    if mode == "chain":
        # The clients held round 2's model: the restored delta chain brought them up to date.
        assert all(rows[4]["clients"][c]["downlink"] == "delta" for c in rows[4]["completed"])
    else:
        # Round 3's tasks went out after the checkpoint: models the resumed server never saw
        # are replaced by the full model once, and deltas follow.
        assert all(rows[5]["clients"][c]["downlink"] == "delta" for c in rows[5]["completed"])
    assert rows[5]["test_loss"] < rows[2]["test_loss"]
    assert json.loads((tmp_path / "checkpoint.json").read_text())["round"] == 4
    assert len(list(tmp_path.glob("checkpoint-*.npz"))) == 1
    assert all(c.stats["reconnects"] >= 1 and c.stats["bye"] for c in clients)
    assert first.round == 2 and second.round == 4


@pytest.mark.parametrize("tls", [False, True], ids=["tcp", "tls"])
def test_wire_bytes_equal_a_forwarding_proxy(tmp_path, tls):
    """Everything the server reports (all rows, round 0 and the last row's BYEs
    included, rejected connections included) equals what a TCP proxy in front
    of it relayed, per direction. Under TLS both count ciphertext; the token
    never appears on the wire."""
    server_ctx = client_ctx = None
    if tls:
        cert, key = make_certificate(tmp_path)
        server_ctx, client_ctx = server_context(cert, key), client_context(cert)

    async def body(h: Harness) -> tuple[Server, CountingProxy, list[Client]]:
        server = server_for(ssl_context=server_ctx, downlink="fp16")
        await server.start()
        proxy = CountingProxy(server.port)
        port = await proxy.start()
        h.closers.append(proxy.close)
        run = h.spawn(server.run())
        if tls:
            await raw_exchange(port, b"GARBAGE!", read_error=False)  # not even TLS
        else:
            assert (await raw_exchange(port, b"GARBAGE!"))[0] == ErrorCode.PROTOCOL
            assert (await raw_exchange(port, header(1, 1 << 20)))[0] == ErrorCode.TOO_LARGE
        with pytest.raises(AuthenticationError):
            await client_for(port, 9, token=b"wrong", ssl_context=client_ctx).run()
        clients = [client_for(port, i, ssl_context=client_ctx, server_hostname="localhost") for i in range(3)]
        tasks = [h.spawn(c.run()) for c in clients]
        await run
        await asyncio.gather(*tasks)
        await proxy.close()
        return server, proxy, clients

    server, proxy, clients = run_async(body)
    rows = server.history
    up = total(rows, "uplink_wire_bytes") + total(rows, "rejected_uplink_wire_bytes")
    down = total(rows, "downlink_wire_bytes") + total(rows, "rejected_downlink_wire_bytes")
    assert (up, down) == (proxy.up, proxy.down)
    assert total(rows, "rejected_connections") == (2 if tls else 3)
    for c in clients:
        assert sum(r["client_bytes"][c.client_id]["uplink_wire_bytes"] for r in rows) == c.stats["uplink_wire_bytes"]
        assert (
            sum(r["client_bytes"][c.client_id]["downlink_wire_bytes"] for r in rows) == c.stats["downlink_wire_bytes"]
        )
    assert TOKEN not in proxy.seen
    payload = total(rows, "uplink_payload_bytes") + total(rows, "downlink_payload_bytes")
    assert rows[-1]["status"] == "ok" and payload > 0
    # WELCOME frames carry '"federation"' in their JSON: in clear over TCP, never under TLS.
    assert (b'"federation"' in proxy.seen) is (not tls)
    if tls:  # TLS records, MACs and handshakes come on top of the same frames
        assert up + down > payload + 3 * 1000


def test_tls_rejects_untrusted_and_plain_clients(tmp_path):
    cert, key = make_certificate(tmp_path)

    async def body(h: Harness) -> Server:
        server = server_for(rounds=1, clients_per_round=1, min_clients=1, ssl_context=server_context(cert, key))
        await server.start()
        run = h.spawn(server.run())
        untrusted = client_for(server.port, 8, ssl_context=client_context(None), reconnect=False)
        with pytest.raises(ssl.SSLCertVerificationError):
            await untrusted.run()
        plain = client_for(server.port, 9, reconnect=False)
        with pytest.raises(ConnectionError):
            await plain.run()
        await wait_until(lambda: server.rejected_connections == 2, 5)
        good = client_for(server.port, 0, ssl_context=client_context(cert))
        await asyncio.gather(h.spawn(good.run()), run)
        assert good.stats["rounds"] == 1
        return server

    server = run_async(body)
    assert server.history[0]["rejected_connections"] == 2
    assert server.history[1]["completed"] == ["c0"]


def test_client_refuses_a_server_that_does_not_know_the_token():
    """Mutual authentication: a fake server without the token cannot produce the
    WELCOME MAC, the client aborts before anything else crosses the wire."""

    async def body(h: Harness) -> list[int]:
        received: list[int] = []

        async def impostor(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            try:
                ftype, _ = await raw_frame(reader)
                received.append(ftype)
                writer.write(header(2, 32) + os.urandom(32))
                ftype, _ = await raw_frame(reader)
                received.append(ftype)
                welcome = os.urandom(32) + b"{}"
                writer.write(header(4, len(welcome)) + welcome)
                while True:
                    ftype, _ = await raw_frame(reader)
                    received.append(ftype)
            except (asyncio.IncompleteReadError, ConnectionError):
                pass
            finally:
                await close_writer(writer)

        fake = await asyncio.start_server(impostor, "127.0.0.1", 0)

        async def stop() -> None:
            fake.close()
            await fake.wait_closed()

        h.closers.append(stop)
        client = client_for(fake.sockets[0].getsockname()[1], 0)
        with pytest.raises(AuthenticationError, match="does not know the token"):
            await client.run()
        await asyncio.sleep(0.05)
        return received

    received = run_async(body)
    assert received == [P.FrameType.HELLO, P.FrameType.AUTH, P.FrameType.ERROR]


def test_downlink_deltas_are_smaller_and_exact():
    """downlink="topk:0.1+fp16": clients in sync get delta chains (bit-exact
    replicas), the others full models; far fewer downlink bytes than full models."""
    dim = 2000

    async def federation(
        h: Harness, downlink: Optional[str], clients: int, per_round: int, mode: str = "chain"
    ) -> tuple[Server, list[Client]]:
        server = server_for(
            initial_params=initial_params(dim),
            evaluate_fn=evaluate_fn(dim),
            rounds=4,
            clients_per_round=per_round,
            min_clients=clients,
            downlink=downlink,
            codec="topk:0.1+fp16",
            downlink_mode=mode,
        )
        await server.start()
        cs = [client_for(server.port, i, train_fn=make_train_fn(i, dim=dim)) for i in range(clients)]
        tasks = [h.spawn(c.run()) for c in cs]
        await server.run()
        await asyncio.gather(*tasks)
        return server, cs

    async def body(h: Harness) -> tuple:
        return (
            await federation(h, None, 3, 3),
            await federation(h, "topk:0.1+fp16", 3, 3),
            await federation(h, "topk:0.1+fp16", 5, 2),
            await federation(h, "topk:0.1+fp16", 5, 2, "client"),
        )

    (full, _), (delta, delta_clients), (sampled, sampled_clients), (own, own_clients) = run_async(body, timeout=40)
    full_bytes = total(full.history, "downlink_payload_bytes")
    delta_bytes = total(delta.history, "downlink_payload_bytes")
    assert delta_bytes < 0.5 * full_bytes
    assert total(delta.history, "downlink_wire_bytes") < 0.5 * total(full.history, "downlink_wire_bytes")
    assert all(v["downlink"] == "full" for v in delta.history[1]["clients"].values())
    for row in delta.history[2:]:
        assert all(v["downlink"] == "delta" and v["downlink_payloads"] == 1 for v in row["clients"].values())
    assert all(c.stats["full_models"] == 1 and c.stats["delta_models"] == 3 for c in delta_clients)
    assert delta.history[-1]["test_loss"] < delta.history[0]["test_loss"]
    # Whatever a client holds, the chain from there rebuilds the server's replica bit for bit.
    for server, clients in ((delta, delta_clients), (sampled, sampled_clients)):
        dl = server._downlink_state
        for c in clients:
            kind, base, payloads = dl.plan(c.model_tag, True)
            model = c.model
            if kind == "full":
                continue
            for p in payloads:
                model = M.apply_downlink_delta(model, fp.decode(p))
            assert all(np.array_equal(model[k], dl.replica[k]) for k in model)
    kinds = [v["downlink"] for r in sampled.history[1:] for v in r["clients"].values()]
    assert "delta" in kinds and "full" in kinds
    # Per-client downlink: one payload per task however many rounds a client skipped, and
    # the server knows the model each client holds, bit for bit.
    assert all(v["downlink_payloads"] == 1 for r in own.history[1:] for v in r["clients"].values())
    assert total(own.history, "downlink_payload_bytes") < total(sampled.history, "downlink_payload_bytes")
    assert all(r["downlink_mode"] == "client" for r in own.history)
    holding = [c for c in own_clients if c.model_tag is not None]  # a client never sampled holds none
    assert len(holding) >= 3
    for c in holding:
        held = own._downlink_state.held_model(c.client_id, c.model_tag)
        assert held is not None and all(np.array_equal(c.model[k], held[k]) for k in c.model)
    assert own.history[-1]["test_loss"] < own.history[0]["test_loss"]


def test_server_command_refuses_a_client_downlink_without_a_codec(tmp_path):
    token = tmp_path / "token"
    token.write_text("x" * 32)
    with pytest.raises(SystemExit, match="--downlink-mode client needs --downlink SPEC"):
        run_cli(server_args(tmp_path, str(token), "--downlink-mode", "client", insecure=False))
    assert not (tmp_path / "run").exists()


def test_train_fn_failure_is_reported_and_the_client_carries_on(tmp_path):
    async def body(h: Harness) -> tuple[Server, Client]:
        calls = {"n": 0}

        def flaky(params: dict, config: dict) -> tuple:
            calls["n"] += 1
            if calls["n"] == 1:
                raise RuntimeError("out of memory, pretend")
            return make_train_fn(5)(params, config)

        server = server_for(rounds=2, clients_per_round=2, min_clients=2, out_dir=tmp_path)
        await server.start()
        client = client_for(server.port, 5, train_fn=flaky)
        tasks = [h.spawn(client.run()), h.spawn(client_for(server.port, 0).run())]
        await server.run()
        await asyncio.gather(*tasks)
        return server, client

    server, client = run_async(body)
    r1, r2 = server.history[1], server.history[2]
    assert r1["failed"] == ["c5"] and "out of memory, pretend" in r1["failures"]["c5"]
    assert r1["status"] == "ok" and r1["completed"] == ["c0"]
    assert sorted(r2["completed"]) == ["c0", "c5"]
    assert client.stats["failed_rounds"] == 1 and client.stats["rounds"] == 1

    async def again(h: Harness) -> list:  # a finished run resumes to nothing
        done = server_for(rounds=2, out_dir=tmp_path, resume=True)
        return await done.run()

    rows = run_async(again)
    assert [r["round"] for r in rows] == [0, 1, 2]


def test_shared_rotation_codec_is_summed_in_the_rotated_domain(tmp_path, monkeypatch):
    """With eden4:shared every client rotates with the round's seed from the task, and the
    server's aggregator sums them in the rotated domain (one inverse transform per round)."""
    from fedpress.aggregate import Aggregator

    rotated_adds: list[int] = []
    original = Aggregator._add_rotated

    def counting(self, name, sec, weight):
        rotated_adds.append(sec.rotation_seed)
        return original(self, name, sec, weight)

    monkeypatch.setattr(Aggregator, "_add_rotated", counting)

    async def body(h: Harness) -> list[dict]:
        server = server_for(out_dir=tmp_path, codec="eden4:shared")
        await server.start()
        clients = [client_for(server.port, i, codec=None) for i in range(3)]
        tasks = [h.spawn(c.run()) for c in clients]
        history = await server.run()
        await asyncio.gather(*tasks)
        return history

    rows = run_async(body)
    assert all(r["status"] == "ok" and len(r["completed"]) == 3 for r in rows[1:])
    assert rows[-1]["test_loss"] < rows[0]["test_loss"]
    # Every float tensor of every client in every round went through the rotated sum,
    # and within a round all clients shared one seed per tensor.
    float_tensors = sum(1 for v in initial_params().values() if v.dtype.kind == "f")
    assert len(rotated_adds) == 3 * 3 * float_tensors
    assert len(set(rotated_adds)) == 3 * float_tensors
