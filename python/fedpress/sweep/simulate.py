"""One FedAvg run in one process: the clients, the server and the bytes between them.

No sockets, but every byte is the byte ``fedpress server`` and ``fedpress
client`` would exchange for the same configuration: the TASK frames come from
the federation's own downlink (``make_downlink``:
the full fp32 model, the chain of compressed deltas since the model a client
holds, or with ``downlink_mode=client`` one compressed difference per client),
the UPDATE frames from the federation's own frame layout around the client's
payload, the round config from ``round_config``,
the client sampling and every seed as the server and a client with ``seed=``
draw them. Clients start from the initial model they build themselves from the
run's seed (``Client(initial_params=...)``), so it never crosses the wire; a
client that has not yet been sampled, or that skipped rounds, catches up with
the deltas it missed (or the full model, when that is smaller). Each simulated
client applies what it receives to the model it holds, as ``Client`` does.

Each simulated client reports ``{"loss": training loss}`` as its metrics, rounded to
six decimals (``client_metrics``). The server sums the updates in the order
they arrive, the simulation in the order the clients were sampled: the global
models can differ in the last bit, which the rounding keeps out of the bytes.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from functools import partial
from types import ModuleType
from typing import Any, Callable, Optional, Union

import numpy as np

from .._seeds import PURPOSE_PAYLOAD, PURPOSE_TRAINING, derive_seed
from .._update_math import update_table
from ..aggregate import Aggregator
from ..encoder import Encoder
from ..federation import protocol as P
from ..federation.dp import run_privacy
from ..federation.model import (
    ServerOptimizer,
    align_update,
    apply_downlink_delta,
    canonical,
    make_downlink,
    zero_reference,
)
from ..federation.secure import SecureRound, client_round, masked_codes, secure_settings
from ..federation.server import round_config, sample_clients
from ..format import decode
from ..privacy import clip_update
from ..secagg import DEFAULT_DROPOUT_TOLERANCE, SecAggClient, SecAggError
from ..train.loops import evaluate, param_delta, round_seed, train_local
from ..train.models import get_params, set_params
from ..train.partition import partition
from ..train.task import Task, builtin_task
from .cell import Cell, parse_cell

__all__ = [
    "Settings",
    "SweepTask",
    "builtin_task",
    "simulate",
    "client_ids",
    "sample_clients",
    "ClientTrainer",
    "frame_bytes",
    "client_metrics",
]


@dataclass(frozen=True)
class Settings:
    """The federation every cell of a sweep runs in (the issue's MNIST setting by default)."""

    clients: int = 50
    per_round: int = 10
    alpha: float = 0.5  # Dirichlet label skew; partition="iid" ignores it
    partition: str = "dirichlet"
    rounds: int = 100
    local_epochs: int = 1
    lr: float = 0.05
    batch_size: int = 32
    local_momentum: float = 0.0
    eval_every: int = 5  # the last round is always evaluated, and round 0
    target: float = 0.95
    downlink_history: int = 0  # deltas kept for clients that skipped rounds; 0: all rounds

    def __post_init__(self) -> None:
        for name in ("clients", "per_round", "rounds", "local_epochs", "batch_size", "eval_every"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")
        if self.per_round > self.clients:
            raise ValueError(f"per_round ({self.per_round}) cannot exceed clients ({self.clients})")
        if not self.alpha > 0:
            raise ValueError(f"alpha must be positive, got {self.alpha}")
        if not self.lr > 0:
            raise ValueError(f"lr must be positive, got {self.lr}")
        if not 0.0 <= self.local_momentum < 1.0:
            raise ValueError(f"local_momentum must be in [0, 1), got {self.local_momentum}")
        if not 0.0 < self.target <= 1.0:
            raise ValueError(f"target must be an accuracy in (0, 1], got {self.target}")
        if self.downlink_history < 0:
            raise ValueError(f"downlink_history must be >= 0, got {self.downlink_history}")

    @property
    def participation(self) -> float:
        return self.per_round / self.clients

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


#: The sweep's name for ``fedpress.train.Task`` (the same class).
SweepTask = Task


def client_ids(n: int) -> list[str]:
    """The ids of a sweep's clients (as a federation would name them)."""
    return [f"client-{i:04d}" for i in range(n)]


def frame_bytes(ftype: int, parts: list) -> int:
    """Bytes of one federation frame sent after the handshake, on the wire: header,
    body and the tag that seals it (no TLS)."""
    return sum(memoryview(p).nbytes for p in P.encode_frame(ftype, *parts)) + P.TRAILER_BYTES


class ClientTrainer:
    """Local training of the simulated clients: one torch model, reloaded per call.

    ``train(params, data, client_seed, r)`` -> (update, num_examples, loss), where
    the update is local minus received (float32), the example order of round ``r``
    comes from ``round_seed(client_seed, r)`` as in ``make_train_fn``.
    """

    def __init__(self, task: SweepTask, settings: Settings, seed: int) -> None:
        self.model = task.model_fn(seed)
        self.settings = settings

    def train(
        self, params: Mapping[str, np.ndarray], data: Any, client_seed: int, r: int
    ) -> tuple[dict[str, np.ndarray], int, float]:
        s = self.settings
        set_params(self.model, params)
        stats = train_local(
            self.model,
            data,
            epochs=s.local_epochs,
            batch_size=s.batch_size,
            lr=s.lr,
            momentum=s.local_momentum,
            seed=round_seed(client_seed, r),
        )
        update = {k: param_delta(v, params[k]) for k, v in get_params(self.model).items()}
        return update, int(stats["num_examples"]), float(stats["loss"])


def client_metrics(train_loss: float) -> dict[str, float]:
    """The metrics a simulated client puts in its UPDATE frame."""
    return {"loss": round(float(train_loss), 6)}


def _receive(model: Mapping[str, np.ndarray], kind: str, payloads: list) -> dict[str, np.ndarray]:
    """The model a client holds after a TASK (as ``Client`` applies it)."""
    if kind == "full":
        return decode(payloads[0])
    for payload in payloads:
        model = apply_downlink_delta(model, decode(payload))
    return dict(model)


def _secure_setup(sa: SecureRound) -> dict[str, SecAggClient]:
    """Steps 1 to 4b of a secure round between the simulated clients and server, every
    message counted as its SECAGG frame: each client's protocol state, ready to mask."""
    clients = {cid: client_round(sa.config(), cid) for cid in sa.clients}
    for cid, client in clients.items():
        message = client.advertise()
        sa.count("uplink", message)
        sa.server.receive_advertise(sa.index(cid), message)
    for cid, client in clients.items():
        keys = sa.server.keys_for(sa.index(cid))
        sa.count("downlink", keys)
        message = client.share_keys(keys)
        sa.count("uplink", message)
        sa.server.receive_shares(sa.index(cid), message)
    for cid, client in clients.items():
        routed = sa.server.shares_for(sa.index(cid))
        sa.count("downlink", routed)
        message = client.report(routed)
        sa.count("uplink", message)
        sa.server.receive_report(sa.index(cid), message)
    reported = set(sa.server.reported)
    for cid, client in clients.items():
        if sa.index(cid) in reported:  # out of the round, as the federation leaves it out
            continue
        verdict = sa.server.verdict()
        sa.count("downlink", verdict)
        client.exclude(verdict)
    return {cid: client for cid, client in clients.items() if sa.index(cid) not in reported}


def _secure_unmask(sa: SecureRound, state: Mapping[str, SecAggClient]) -> np.ndarray:
    """Steps 5 and 6: the survivors' shares, and the correction out of the sum."""
    request = sa.server.unmask_request()
    for cid, client in state.items():
        if sa.index(cid) in sa.server.survivors:
            sa.count("downlink", request)
            message = client.unmask(request)
            sa.count("uplink", message)
            sa.server.receive_unmask(sa.index(cid), message)
    return sa.server.correction()


def _client_seed(seed: int, index: int) -> int:
    """The seed client ``index`` trains from, as the command line's client derives it."""
    return derive_seed(seed, PURPOSE_TRAINING, index)


def _optional_torch() -> Optional[ModuleType]:
    """torch, or None where it is not installed: a numpy task (digits) runs without it."""
    try:
        import torch
    except ImportError:
        return None
    return torch


def simulate(
    task: SweepTask,
    cell: Union[Cell, str],
    seed: int,
    settings: Settings = Settings(),
    *,
    on_round: Optional[Callable[[dict[str, Any]], None]] = None,
) -> list[dict[str, Any]]:
    """Runs one (cell, seed) and returns its rows: round 0 (the initial model) and one per
    round, with the bytes each direction carried and, on evaluated rounds, the test
    accuracy and loss of the server's global model."""
    torch = _optional_torch()
    cell = parse_cell(cell) if isinstance(cell, str) else cell
    s = settings
    started = time.perf_counter()
    threads = torch.get_num_threads() if torch is not None else 0
    if torch is not None:
        torch.set_num_threads(1)  # results must not depend on the machine's core count
    try:
        ids = client_ids(s.clients)
        index_of = {cid: i for i, cid in enumerate(ids)}
        shares = partition(task.train.y, s.clients, scheme=s.partition, alpha=s.alpha, seed=seed)
        data = {cid: task.train.subset(idx) for cid, idx in zip(ids, shares)}
        trainer = ClientTrainer(task, s, seed)
        params = canonical(get_params(trainer.model))
        evaluator = task.model_fn(seed)
        downlink = make_downlink(
            cell.downlink, params, cell.downlink_mode, history=s.downlink_history or s.rounds, seed=seed
        )
        # (tag, model) each client holds: every client built the initial model itself.
        held = dict.fromkeys(ids, (downlink.tag, params))
        encoders = {cid: Encoder(cell.spec, **cell.encoder_options()) for cid in ids}
        optimizer = ServerOptimizer(cell.server_lr, cell.server_momentum, decay=cell.server_decay, rounds=s.rounds)
        reference = zero_reference(params)
        shared_rotation = encoders[ids[0]].codec.spec.shares_rotation
        secure = secure_settings(cell.spec, params, s.per_round, DEFAULT_DROPOUT_TOLERANCE) if cell.secagg else None
        private = None
        if cell.dp is not None:  # no amplification by sampling claimed: fixed-size sampling is not Poisson's
            private = run_privacy(
                noise_multiplier=cell.dp,
                target_epsilon=None,
                clip_norm=cell.clip,
                delta=1e-5,
                sampling_rate=1.0,
                rounds=s.rounds,
                clients_per_round=s.per_round,
                secure=secure,
            )
        noise_rng = np.random.default_rng()  # DP noise never comes from the run's seed
        base = {"task": task.name, "cell": str(cell), "seed": int(seed)}
        totals = {"uplink": 0, "downlink": 0}
        rows: list[dict[str, Any]] = []

        def emit(r: int, up: int, down: int, up_payload: int, down_payload: int, extra: dict) -> None:
            totals["uplink"] += up
            totals["downlink"] += down
            evaluated = r == 0 or r == s.rounds or r % s.eval_every == 0
            acc = loss = None
            if evaluated:
                set_params(evaluator, params)
                loss, acc = evaluate(evaluator, task.test)
            row = dict(
                base,
                round=r,
                test_accuracy=acc,
                test_loss=loss,
                uplink_bytes=up,
                downlink_bytes=down,
                uplink_total=totals["uplink"],
                downlink_total=totals["downlink"],
                total_bytes=totals["uplink"] + totals["downlink"],
                uplink_payload_bytes=up_payload,
                downlink_payload_bytes=down_payload,
                seconds=round(time.perf_counter() - started, 3),
                **extra,
            )
            rows.append(row)
            if on_round is not None:
                on_round(row)

        emit(0, 0, 0, 0, 0, {"clients": 0, "full_models": 0})
        for r in range(1, s.rounds + 1):
            skellam = None if private is None else private.skellam
            config = round_config(
                seed,
                r,
                s.rounds,
                cell.spec,
                clip_norm=cell.clip if cell.secagg or private is not None else None,
                skellam_mu=None if skellam is None else skellam.client_mu,
            )
            sampled = sample_clients(seed, r, ids, s.per_round)
            aggregator = Aggregator(table=update_table(params) if cell.table == "digest" else None)
            aggregator.add(reference, 0.0)
            up = down = up_payload = down_payload = full = failed = 0
            sa = None if secure is None else SecureRound(r, sampled, secure, seed, config["rotation_seed"])
            masking: dict[str, Callable[[np.ndarray], np.ndarray]] = {}
            state: dict[str, SecAggClient] = {}
            if sa is not None:
                config.update(secagg={**sa.config(), "weighted": private is None, "weight_cap": None})
                state = _secure_setup(sa)
                masking = {
                    cid: partial(masked_codes, c, None if skellam is None else skellam.client_mu, noise_rng)
                    for cid, c in state.items()
                }
            for cid in sampled:
                index = index_of[cid]
                kind, base_tag, tag, payloads = downlink.task_for(cid, held[cid][0], True)
                task_frame = P.Task(r, P.TASK_FULL if kind == "full" else P.TASK_DELTA, tag, base_tag, config, payloads)
                down += frame_bytes(P.FrameType.TASK, task_frame.parts())
                down_payload += task_frame.payload_bytes
                full += kind == "full"
                model = _receive(held[cid][1], kind, payloads)
                if sa is not None and cid not in masking:  # left out by the verdict: no update counts
                    failed += 1
                    continue
                update, n, train_loss = trainer.train(model, data[cid], _client_seed(seed, index), r)
                try:
                    payload = encoders[cid].encode(
                        align_update(update, model),
                        seed=derive_seed(seed, PURPOSE_PAYLOAD, cid, r),
                        round=r,
                        rotation_seed=config["rotation_seed"] if shared_rotation else None,
                        mask=masking.get(cid),
                        weight=n if sa is not None and private is None else 1,
                    )
                except ValueError:  # a diverged model's update (NaN): the client reports a failure
                    failed += 1
                    continue
                update_frame = P.Update(r, n, client_metrics(train_loss), payload)
                up += frame_bytes(P.FrameType.UPDATE, update_frame.parts())
                up_payload += update_frame.payload_bytes
                if private is not None and sa is None:  # central DP: the server clips what it decodes
                    aggregator.add_update(clip_update(decode(payload, table=params), private.clip_norm)[0], 1.0)
                else:
                    aggregator.add(payload, 1.0 if private is not None else float(n))
                if sa is not None:
                    sa.server.receive_masked(sa.index(cid))
                held[cid] = (tag, model)
                downlink.confirm(cid, tag)
            extra: dict[str, Any] = {"clients": len(sampled), "full_models": full}
            if failed:
                extra["failed_clients"] = failed
            released = failed < len(sampled)
            if sa is not None and released:
                try:
                    aggregator.unmask(_secure_unmask(sa, state))
                except SecAggError:  # too many failed clients to unmask: the round is lost
                    released = False
                extra["secure_aggregation"] = sa.summary()
                up += sa.frame_bytes["uplink"]
                down += sa.frame_bytes["downlink"]
            if released:
                mean = aggregator.result(copy=False)
                if private is not None:
                    if sa is None:
                        mean = private.noisy_mean(mean, float(len(sampled) - failed), s.per_round, noise_rng)
                    private.accountant.step()
                if all(np.isfinite(v).all() for v in mean.values()):  # as the server, keeps a model that would not be
                    params = optimizer.step(params, mean, round=r)
            if private is not None:
                extra["privacy"] = private.record()
            downlink.advance(params)
            emit(r, up, down, up_payload, down_payload, extra)
        return rows
    finally:
        if torch is not None:
            torch.set_num_threads(threads)
