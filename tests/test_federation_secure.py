"""Secure aggregation in the TCP federation (fedpress.federation.secure): real sockets on
127.0.0.1. The server learns only the round's sum, which equals the plain integer sum of
the same codes bit for bit: a secure run and a plain run of the same intB codec, seeds
and clients reach the same model, with clients failing or falling silent mid-protocol."""

from __future__ import annotations

import asyncio
from typing import Any, Optional

import numpy as np
import pytest
from fedpress.federation import Client, Server
from test_federation import TOKEN, Harness, evaluate_fn, make_data, run_async

CODEC = "int8:clip=0.05:nmax=512"  # weighted by 128 examples each: sums of weight 512
DIM = 16


def params() -> dict[str, np.ndarray]:
    return {"w": np.zeros(DIM, np.float32), "b": np.zeros(1, np.float32)}


def server_settings(*, secure: bool, **overrides: Any) -> dict[str, Any]:
    """The Server options of these tests' runs: 3 rounds of 4 clients on loopback."""
    options: dict[str, Any] = dict(
        rounds=3,
        clients_per_round=4,
        codec=CODEC,
        token=TOKEN,
        round_timeout=10.0,
        evaluate_fn=evaluate_fn(),
        insecure=True,
        secure_aggregation=secure,
        secagg_timeout=3.0,
        shutdown_timeout=3.0,
        seed=5,
    )
    options.update(overrides)
    return options


def train_fn(seed: int, fail_rounds: tuple[int, ...] = ()):
    x, y = make_data(seed)

    def train(model: dict, config: dict) -> tuple[dict, int, dict]:
        if config["round"] in fail_rounds:
            raise RuntimeError("this client fails this round")
        w, b = model["w"].copy(), model["b"].copy()
        for _ in range(5):
            err = x @ w + b[0] - y
            w -= 0.1 * (x.T @ err) / len(y)
            b -= 0.1 * np.float32(err.mean())
        return {"w": w - model["w"], "b": b - model["b"]}, len(y), {}

    return train


def run(
    secure: bool,
    *,
    fail: Optional[dict[int, tuple[int, ...]]] = None,
    silent: tuple[int, ...] = (),
    **server_options: Any,
) -> Any:
    """4 clients, 3 rounds; ``fail``: client -> rounds its training fails (it shares keys,
    then sends no masked update); ``silent``: clients that never answer an unmask request."""

    async def body(h: Harness) -> tuple[Server, list[dict], list[Client]]:
        server = Server("127.0.0.1", 0, params(), **server_settings(secure=secure, **server_options))
        await server.start()
        clients = []
        for i in range(4):
            client = Client(
                f"127.0.0.1:{server.port}",
                TOKEN,
                train_fn(i, (fail or {}).get(i, ())),
                client_id=f"c{i}",
                insecure=True,
                seed=11,
                error_feedback=False,
                backoff=0.05,
                max_retries=40,
                shutdown_timeout=3.0,
            )
            if i in silent:

                async def mute(conn: Any, message: Any) -> None:
                    return None

                client._on_unmask_request = mute  # type: ignore[method-assign]
            clients.append(client)
        tasks = [h.spawn(c.run()) for c in clients]
        history = await server.run()
        await asyncio.gather(*tasks)
        return server, history, clients

    return run_async(body, timeout=60.0)


def test_secure_rounds_reach_the_plain_sum_bit_for_bit() -> None:
    plain_server, plain_rows, _ = run(False)
    server, rows, clients = run(True)
    for name, value in plain_server.params.items():
        np.testing.assert_array_equal(server.params[name], value)
    for row in rows[1:]:
        assert row["status"] == "ok" and len(row["completed"]) == 4
        sa = row["secure_aggregation"]
        assert sa["clients"] == 4 and sa["survivors"] == ["c0", "c1", "c2", "c3"] and sa["dropped"] == []
        assert sa["modulus_bits"] == 8 + 9 + 1 and sa["length"] == DIM + 1 and sa["error"] is None
        assert sa["protocol_uplink_wire_bytes"] > 0 and sa["protocol_downlink_wire_bytes"] > 0
        assert all(row["clients"][c]["weight"] == 128.0 for c in row["completed"])  # example counts
    assert rows[-1]["test_loss"] < rows[0]["test_loss"]
    # The masked payloads carry m-bit residues: bigger than the plain 8-bit codes.
    assert rows[1]["uplink_payload_bytes"] > plain_rows[1]["uplink_payload_bytes"]
    assert all(c.stats["secagg_uplink_bytes"] > 0 for c in clients)


def test_a_client_that_fails_after_sharing_keys_is_unmasked_away() -> None:
    """c2's training fails in round 2: its masks are reconstructed from the others' shares
    and the round's sum is the other three's, as in the plain run."""
    plain_server, _, _ = run(False, fail={2: (2,)})
    server, rows, _ = run(True, fail={2: (2,)})
    assert rows[2]["status"] == "ok" and rows[2]["failed"] == ["c2"]
    assert rows[2]["secure_aggregation"]["dropped"] == ["c2"]
    for name, value in plain_server.params.items():
        np.testing.assert_array_equal(server.params[name], value)


def test_a_client_silent_at_unmasking_does_not_lose_the_round() -> None:
    """c1 sends its masked update but never answers the unmask request: the threshold of
    the others' shares is enough."""
    plain_server, _, _ = run(False)
    server, rows, _ = run(True, silent=(1,))
    assert all(r["status"] == "ok" and len(r["completed"]) == 4 for r in rows[1:])
    for name, value in plain_server.params.items():
        np.testing.assert_array_equal(server.params[name], value)


def test_secure_aggregation_refuses_what_it_cannot_sum() -> None:
    base: dict[str, Any] = dict(rounds=1, clients_per_round=4, token=TOKEN, insecure=True, secure_aggregation=True)
    with pytest.raises(ValueError, match="must be intB"):
        Server("127.0.0.1", 0, params(), codec="q8", **base)
    with pytest.raises(ValueError, match="drop the sparsifier"):
        Server("127.0.0.1", 0, params(), codec="randk:0.1+int8", **base)
    with pytest.raises(ValueError, match="nmax=2 is below"):
        Server("127.0.0.1", 0, params(), codec="int8:nmax=2", **base)
    with pytest.raises(ValueError, match="in the clear"):
        Server("127.0.0.1", 0, {**params(), "steps": np.zeros((), np.int64)}, codec="int8", **base)
    with pytest.raises(ValueError, match="plain mean"):
        Server("127.0.0.1", 0, params(), codec="int8", aggregation="median", **base)
    with pytest.raises(ValueError, match="unsafe"):
        Server("127.0.0.1", 0, params(), codec="int8", dropout_tolerance=0.6, **base)


def test_the_server_command_says_what_secure_aggregation_needs(tmp_path) -> None:
    from cli_helpers import run_cli, server_args

    token = tmp_path / "token"
    token.write_text("t" * 32)
    token.chmod(0o600)
    with pytest.raises(SystemExit, match=r"(?s)\[2\].*must be intB"):
        run_cli(server_args(tmp_path, str(token), "--secure-aggregation", "--clients-per-round", "4"))
    with pytest.raises(SystemExit, match=r"(?s)\[2\].*unsafe"):
        run_cli(
            server_args(
                tmp_path,
                str(token),
                "--secure-aggregation",
                "--clients-per-round",
                "4",
                "--min-clients",
                "4",
                "--codec",
                "int8",
                "--dropout-tolerance",
                "0.6",
            )
        )


def test_a_shared_random_subset_is_summed_securely() -> None:
    """randk:R:shared: the round's clients keep the same half of the coordinates (from the
    round's seed); the secure sum over it equals the plain one."""
    codec = "randk:0.5:shared+int8:clip=0.05:nmax=512"
    plain_server, plain_rows, _ = run(False, codec=codec)
    server, rows, _ = run(True, codec=codec)
    assert all(r["status"] == "ok" for r in rows[1:])
    assert rows[1]["secure_aggregation"]["length"] == round(0.5 * DIM) + 1  # w's half, and b's one entry
    for name, value in plain_server.params.items():
        np.testing.assert_array_equal(server.params[name], value)
    assert rows[1]["uplink_payload_bytes"] < plain_rows[1]["uplink_payload_bytes"] * 4
