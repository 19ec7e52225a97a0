"""The federation's connection limits, measured over real sockets on 127.0.0.1.

    python bench/federation_limits.py [--params 25000000] [--idle 300]

1. Join time: a server holds ``--idle`` connections that never speak (opened from
   the client's own address, as a flood would be); how long a legitimate client
   takes from connect to the end of its first round.
2. Memory while a client stalls mid-frame: the server (a child process, so its
   memory is its own) serves a model of ``--params`` float32 weights; an
   authenticated client announces the largest UPDATE the server accepts, sends
   95% of it and stops. The server's resident memory is sampled before, during
   and after, until the frame deadline cuts the client off.

Prints one line per measurement; the figures in the issue's closing note come
from here.
"""

from __future__ import annotations

import argparse
import asyncio
import multiprocessing as mp
import os
import sys
import time
from typing import Callable

import numpy as np

TOKEN = b"bench-federation-limits-token-0123"


def rss_mib(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS")


def small_steps(params: dict, config: dict) -> tuple[dict, int, dict]:
    return {k: np.full(v.shape, 1e-3, v.dtype) for k, v in params.items()}, 10, {}


async def join_time(idle: int) -> float:
    from fedpress.federation import Client, Server

    server = Server(
        "127.0.0.1",
        0,
        {"w": np.zeros(1000, np.float32)},
        rounds=1,
        clients_per_round=1,
        min_clients=1,
        codec="topk:0.1+q8",
        token=TOKEN,
        insecure=True,
        hello_timeout=60.0,
        handshake_timeout=60.0,
    )
    await server.start()
    run = asyncio.ensure_future(server.run())
    writers = []
    for _ in range(idle):
        writers.append((await asyncio.open_connection("127.0.0.1", server.port))[1])
    started = time.perf_counter()
    await Client(f"127.0.0.1:{server.port}", TOKEN, small_steps, insecure=True, reconnect=False).run()
    took = time.perf_counter() - started
    await run
    for w in writers:
        w.close()
    return took


def serve(params: int, port_queue: mp.Queue) -> None:
    from fedpress.federation import Server

    async def main() -> None:
        server = Server(
            "127.0.0.1",
            0,
            {"w": np.zeros(params, np.float32)},
            rounds=1,
            clients_per_round=1,
            min_clients=1,
            codec="topk:0.01+q8",
            token=TOKEN,
            insecure=True,
            round_timeout=600,
            frame_grace=5.0,
            frame_min_rate=16 << 20,
            evaluate_fn=None,
        )
        await server.start()
        port_queue.put((server.port, server.max_frame_bytes))
        await server.run()

    asyncio.run(main())


async def stall(port: int, announce: int, on_task: Callable[[], None]) -> float:
    """Handshake as client "staller", take the TASK, announce ``announce`` bytes, send 95%, stop."""
    from fedpress.federation import protocol as P

    reader, writer = await asyncio.open_connection("127.0.0.1", port)

    async def frame() -> tuple[int, bytes]:
        head = await reader.readexactly(P.HEADER.size)
        _, _, ftype, length = P.HEADER.unpack(head)
        return ftype, await reader.readexactly(length)

    hello = P.Hello("staller", (), None, None).pack()
    writer.write(b"".join(bytes(p) for p in P.encode_frame(P.FrameType.HELLO, hello)))
    _, challenge = await frame()
    nonce = P.new_nonce()
    auth = P.client_mac(TOKEN, challenge, nonce, "staller") + nonce
    writer.write(b"".join(bytes(p) for p in P.encode_frame(P.FrameType.AUTH, auth)))
    _, welcome = await frame()
    _, s2c = P.session_keys(TOKEN, challenge, nonce, "staller", hello, welcome)
    ftype, _ = await frame()  # the TASK (sealed; not checked here)
    assert ftype == P.FrameType.TASK
    await asyncio.sleep(1.0)  # the server is done sending the model
    on_task()
    writer.write(P.HEADER.pack(P.MAGIC, P.PROTOCOL_VERSION, P.FrameType.UPDATE, announce))
    chunk = bytes(1 << 20)
    sent = 0
    while sent < announce * 0.95:
        writer.write(chunk)
        await writer.drain()
        sent += len(chunk)
    stalled = time.perf_counter()
    try:
        await asyncio.wait_for(reader.read(), 600)
    except (ConnectionError, asyncio.TimeoutError):
        pass
    cut = time.perf_counter() - stalled
    writer.close()
    return cut


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--params", type=int, default=25_000_000)
    parser.add_argument("--idle", type=int, default=300)
    args = parser.parse_args()

    took = asyncio.run(join_time(args.idle))
    print(
        f"join: a client completed its handshake and a round in {took:.3f} s while {args.idle} idle "
        "connections from its address were held"
    )

    ctx = mp.get_context("spawn")
    ports: mp.Queue = ctx.Queue()
    proc = ctx.Process(target=serve, args=(args.params, ports), daemon=True)
    proc.start()
    port, max_frame = ports.get(timeout=120)
    time.sleep(0.5)
    model_mib = 4 * args.params / 2**20
    idle = rss_mib(proc.pid)
    before: list[float] = []
    samples: list[float] = []

    async def attack() -> float:
        task = asyncio.ensure_future(stall(port, max_frame, lambda: before.append(rss_mib(proc.pid))))
        while not task.done():
            if before:
                samples.append(rss_mib(proc.pid))
            await asyncio.sleep(0.05)
        return await task

    cut = asyncio.run(attack())
    after = rss_mib(proc.pid)
    proc.kill()
    peak = max(samples) if samples else before[0]
    print(
        f"stall: model {model_mib:.0f} MiB (fp32), max frame {max_frame / 2**20:.0f} MiB; server RSS {idle:.0f} MiB "
        f"listening, {before[0]:.0f} MiB once it had sent the model, peak {peak:.0f} MiB while the client stalled "
        f"at 95% of a max-size frame (+{peak - before[0]:.0f} MiB; the target: under 2x model + 100 MiB = "
        f"{2 * model_mib + 100:.0f} MiB), {after:.0f} MiB after; cut off {cut:.1f} s after it stalled"
    )
    print(f"machine: {os.cpu_count()} cores, Python {sys.version.split()[0]}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
