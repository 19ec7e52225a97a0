"""fedpress.sweep: cells, the in-process simulation, resume, reports, the command.

The simulation's bytes are checked against a real federation on loopback
sockets for the same configuration, frame for frame; everything runs on the
digits task with a handful of clients so the file takes seconds.
"""

from __future__ import annotations

import asyncio
import json
import math

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("sklearn")

from fedpress import cli  # noqa: E402
from fedpress._seeds import PURPOSE_TRAINING, derive_seed  # noqa: E402
from fedpress.federation import Client, Server  # noqa: E402
from fedpress.sweep import Settings, SweepError, SweepTask, builtin_task, parse_cell, run_sweep, simulate  # noqa: E402
from fedpress.sweep.report import cell_summaries, run_summary  # noqa: E402
from fedpress.sweep.simulate import ClientTrainer, client_ids, client_metrics, sample_clients  # noqa: E402
from fedpress.train import evaluate, partition, set_params  # noqa: E402

TINY = Settings(clients=6, per_round=3, rounds=4, eval_every=2, alpha=0.5)
TOKEN = b"sweep-test-token-0123456789abcdef"


@pytest.fixture(scope="module")
def digits() -> SweepTask:
    return builtin_task("digits")


def strip_time(rows):
    return [{k: v for k, v in r.items() if k != "seconds"} for r in rows]


# ------------------------------------------------------------------- cells --
@pytest.mark.parametrize(
    "text, canonical",
    [
        ("fp32", "fp32"),
        ("topk:0.01+q4+zstd", "topk:0.01+q4+zstd"),
        (
            "TOPK:0.001+q4+zstd@momentum=0.9,downlink=topk:0.05+q8+zstd",
            "topk:0.001+q4+zstd@momentum=0.9,downlink=topk:0.05+q8+zstd",
        ),
        ("q4@ef=off", "q4@ef=off"),
        ("q4@ef=on", "q4"),
        (
            "topk:0.01+q4@downlink=q8+zstd:3,server_momentum=0.9,momentum=0.9",
            "topk:0.01+q4@momentum=0.9,server_momentum=0.9,downlink=q8+zstd:3",
        ),
        (
            "topk:0.01+q4@warmup=5,warmup_start=0.1,clip=2.5,table=digest,server_lr=2",
            "topk:0.01+q4@clip=2.5,warmup=5,warmup_start=0.1,server_lr=2.0,table=digest",
        ),
        ("q8@momentum=0", "q8"),
        ("topk:0.01+sign@server_decay=0.1,server_momentum=0.8", "topk:0.01+sign@server_momentum=0.8,server_decay=0.1"),
        (
            "topk:0.01+sign@downlink_mode=CLIENT,downlink=topk:0.02+q2+zstd",
            "topk:0.01+sign@downlink=topk:0.02+q2+zstd,downlink_mode=client",
        ),
        ("q4@downlink=q8,downlink_mode=chain", "q4@downlink=q8"),
    ],
)
def test_cells_parse_to_a_canonical_form(text, canonical):
    cell = parse_cell(text)
    assert str(cell) == canonical
    assert parse_cell(str(cell)) == cell


def test_cell_options_reach_the_encoder():
    cell = parse_cell("topk:0.01+q4+zstd@ef=off,momentum=0.5,clip=3,warmup=4,warmup_start=0.2,table=digest")
    assert cell.encoder_options() == {
        "error_feedback": False,
        "momentum": 0.5,
        "clip": 3.0,
        "warmup_rounds": 4,
        "warmup_start": 0.2,
        "table": "digest",
    }
    assert parse_cell("fp32").is_baseline and not parse_cell("fp32@server_momentum=0.9").is_baseline


@pytest.mark.parametrize(
    "text, message",
    [
        ("", "empty spec"),
        ("topk:2+q4", "ratio must be in"),
        ("q4@", "nothing after '@'"),
        ("q4@speed=3", "unknown option 'speed'"),
        ("q4@momentum", "needs a value"),
        ("q4@momentum=1", "momentum='1' must be a number in [0.0, 1.0)"),
        ("q4@momentum=abc", "must be a number"),
        ("q4@ef=maybe", "ef must be on or off"),
        ("q4@warmup=2", "warmup needs a sparsifier"),
        ("q4@warmup=1.5", "whole number"),
        ("q4@clip=0", "clip must be positive"),
        ("q4@downlink=q5", "downlink: bad stage 'q5'"),
        ("q4@downlink=eden4:shared", "shared-rotation"),
        ("q4@table=none", "table must be inline or digest"),
        ("q4@server_decay=2", "server_decay='2' must be a number in [0.0, 1.0]"),
        ("q4@momentum=0.5,momentum=0.9", "given twice"),
        ("q4@downlink_mode=client", "downlink_mode=client needs downlink=SPEC"),
        ("q4@downlink=q8,downlink_mode=peer", "downlink_mode must be chain or client"),
    ],
)
def test_bad_cells_name_the_problem(text, message):
    with pytest.raises(ValueError) as info:
        parse_cell(text)
    assert message in str(info.value)


def test_settings_are_checked():
    with pytest.raises(ValueError, match="per_round"):
        Settings(clients=4, per_round=5)
    with pytest.raises(ValueError, match="target"):
        Settings(target=1.5)
    with pytest.raises(ValueError, match="rounds"):
        Settings(rounds=0)
    assert Settings(clients=50, per_round=5).participation == 0.1


# -------------------------------------------------------------- simulation --
def test_simulation_is_deterministic_and_counts_every_round(digits):
    cell = "topk:0.1+q4+zstd@momentum=0.9,downlink=topk:0.2+q8+zstd,server_momentum=0.5"
    a = simulate(digits, cell, 3, TINY)
    b = simulate(digits, parse_cell(cell), 3, TINY)
    assert strip_time(a) == strip_time(b)
    assert [r["round"] for r in a] == list(range(TINY.rounds + 1))
    assert [r["test_accuracy"] is not None for r in a] == [True, False, True, False, True]
    up = down = 0
    for r in a:
        up += r["uplink_bytes"]
        down += r["downlink_bytes"]
        assert (r["uplink_total"], r["downlink_total"], r["total_bytes"]) == (up, down, up + down)
        assert r["uplink_bytes"] >= r["uplink_payload_bytes"] and r["downlink_bytes"] >= r["downlink_payload_bytes"]
    assert a[0]["uplink_bytes"] == a[0]["downlink_bytes"] == 0
    assert all(r["full_models"] == 0 for r in a)  # the initial model is built by every client
    other = simulate(digits, cell, 4, TINY)
    assert strip_time(other) != strip_time(a)


def test_fp32_baseline_sends_the_full_model_both_ways(digits):
    rows = simulate(digits, "fp32", 0, TINY)
    n_params = sum(v.size for v in __import__("fedpress.train", fromlist=["x"]).init_params("digits").values())
    for r in rows[1:]:
        assert r["full_models"] == TINY.per_round
        assert r["downlink_payload_bytes"] > TINY.per_round * 4 * n_params
        assert r["uplink_payload_bytes"] > TINY.per_round * 4 * n_params


def test_accuracy_matches_an_independent_evaluation(digits):
    """The last row's accuracy is the global model's: recompute it from a plain FedAvg in numpy
    over the same client updates (fp32, no momentum: the mean update applied once a round)."""
    s = Settings(clients=4, per_round=2, rounds=2, eval_every=1)
    rows = simulate(digits, "fp32", 1, s)
    ids = client_ids(s.clients)
    shares = partition(digits.train.y, s.clients, scheme="dirichlet", alpha=s.alpha, seed=1)
    trainer = ClientTrainer(digits, s, 1)
    from fedpress.train import get_params

    params = get_params(digits.model_fn(1))
    for r in (1, 2):
        sampled = sample_clients(1, r, range(len(ids)), 2)
        updates = [
            trainer.train(params, digits.train.subset(shares[i]), derive_seed(1, PURPOSE_TRAINING, int(i)), r)
            for i in sampled
        ]
        total = sum(n for _, n, _ in updates)
        params = {
            k: (v + sum(u[k].astype(np.float64) * n for u, n, _ in updates) / total).astype(np.float32)
            for k, v in params.items()
        }
    model = digits.model_fn(0)
    set_params(model, params)
    loss, acc = evaluate(model, digits.test)
    assert rows[-1]["test_accuracy"] == pytest.approx(acc, abs=1e-9)
    assert rows[-1]["test_loss"] == pytest.approx(loss, rel=1e-4)


def test_user_task_with_tabular_data():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((300, 5)).astype(np.float32)
    y = (x[:, 0] + x[:, 1] > 0).astype(np.int64)

    task = SweepTask("blobs", model_fn=_linear_model, train=(x[:240], y[:240]), test=(x[240:], y[240:]))
    rows = simulate(task, "topk:0.5+q8", 0, Settings(clients=4, per_round=2, rounds=5, eval_every=1, lr=0.5))
    assert rows[-1]["test_accuracy"] > 0.7
    with pytest.raises(ValueError, match="labels"):
        SweepTask("bad", model_fn=_linear_model, train=(x, x[:, 0]), test=(x, y))
    with pytest.raises(TypeError, match="Dataset or an"):
        SweepTask("bad", model_fn=_linear_model, train=x, test=(x, y))


def _linear_model(seed: int):
    torch.manual_seed(seed)
    return torch.nn.Linear(5, 2)


# ------------------------------------------------ bytes against the federation --
def _federation(task: SweepTask, cell_text: str, seed: int, s: Settings):
    """The same configuration as simulate(), on real sockets: rows of the server."""
    cell = parse_cell(cell_text)
    ids = client_ids(s.clients)
    shares = partition(task.train.y, s.clients, scheme=s.partition, alpha=s.alpha, seed=seed)
    from fedpress.train import get_params

    params0 = get_params(task.model_fn(seed))
    evaluator = task.model_fn(seed)

    def evaluate_fn(params):
        set_params(evaluator, params)
        loss, acc = evaluate(evaluator, task.test)
        return {"loss": loss, "accuracy": acc}

    def train_fn_for(i):
        trainer = ClientTrainer(task, s, seed)
        data = task.train.subset(shares[i])

        def train_fn(params, config):
            update, n, loss = trainer.train(params, data, derive_seed(seed, PURPOSE_TRAINING, i), int(config["round"]))
            return update, n, client_metrics(loss)

        return train_fn

    async def main():
        server = Server(
            "127.0.0.1",
            0,
            params0,
            rounds=s.rounds,
            clients_per_round=s.per_round,
            min_clients=s.clients,
            codec=cell.spec,
            downlink=cell.downlink,
            token=TOKEN,
            round_timeout=60,
            seed=seed,
            evaluate_fn=evaluate_fn,
            downlink_history=s.rounds,
            server_lr=cell.server_lr,
            server_momentum=cell.server_momentum,
            server_lr_decay=cell.server_decay,
            downlink_mode=cell.downlink_mode,
            secure_aggregation=cell.secagg,
            clip_norm=cell.clip if cell.secagg or cell.dp is not None else None,
            dp_noise_multiplier=cell.dp,
            insecure=True,
        )
        await server.start()
        opts = cell.encoder_options()
        codec_options = {"table": opts.pop("table")} if "table" in opts else {}
        clients = [
            Client(
                f"127.0.0.1:{server.port}",
                TOKEN,
                train_fn_for(i),
                client_id=cid,
                initial_params=params0,
                seed=seed,
                error_feedback=opts["error_feedback"],
                momentum=opts["momentum"],
                clip=opts["clip"],
                warmup_rounds=opts["warmup_rounds"],
                warmup_start=opts["warmup_start"],
                codec_options=codec_options,
                train_in_thread=False,
                insecure=True,
            )
            for i, cid in enumerate(ids)
        ]
        tasks = [asyncio.ensure_future(c.run()) for c in clients]
        try:
            history = await asyncio.wait_for(server.run(), 120)
            await asyncio.wait_for(asyncio.gather(*tasks), 30)
        finally:
            for t in tasks:
                t.cancel()
        return history, clients

    return asyncio.run(main())


@pytest.mark.parametrize(
    "cell",
    [
        "fp32",
        "topk:0.1+q4+zstd@momentum=0.9,clip=5,warmup=2,downlink=topk:0.3+q8+zstd,server_momentum=0.5,table=digest,"
        "server_decay=0.2",
        "q8+zstd@ef=off,downlink=q8",
        "topk:0.2+q4+zstd@server_momentum=0.5,downlink=topk:0.2+q4+zstd,downlink_mode=client",
        "int8:clip=0.05:nmax=4096@secagg=on,clip=2,downlink=q8+zstd",  # with the protocol's SECAGG frames
    ],
)
def test_bytes_equal_the_federation(digits, cell):
    s = Settings(clients=4, per_round=2, rounds=3, eval_every=1)
    rows = simulate(digits, cell, 5, s)
    history, clients = _federation(digits, cell, 5, s)
    assert [h["round"] for h in history] == [0, 1, 2, 3]
    for sim, fed in zip(rows[1:], history[1:]):
        assert fed["status"] == "ok" and sorted(fed["completed"]) == sorted(fed["sampled"])
        assert sim["uplink_payload_bytes"] == fed["uplink_payload_bytes"]
        assert sim["downlink_payload_bytes"] == fed["downlink_payload_bytes"]
        if sim["round"] < s.rounds:  # the last server row also holds the BYE frames
            assert sim["uplink_bytes"] == fed["uplink_wire_bytes"]
            assert sim["downlink_bytes"] == fed["downlink_wire_bytes"]
        assert sim["test_loss"] == pytest.approx(fed["test_loss"], rel=1e-6)
        assert sim["test_accuracy"] == pytest.approx(fed["test_accuracy"], abs=0.01)  # summed in another order
    assert sum(c.stats["full_models"] for c in clients) == sum(r["full_models"] for r in rows)


# ------------------------------------------------------------ sweep + resume --
def test_sweep_writes_reports_and_resumes(tmp_path, digits):
    out = tmp_path / "sweep"
    cells = ["fp32", "topk:0.1+q4+zstd@momentum=0.9"]
    summary = run_sweep([digits], cells, [0, 1], TINY, out, progress=False)
    for name in (
        "runs.jsonl",
        "summary.json",
        "summary.md",
        "sweep.json",
        "accuracy_vs_uplink.png",
        "accuracy_vs_total_bytes.png",
    ):
        assert (out / name).exists(), name
    rows = [json.loads(line) for line in (out / "runs.jsonl").read_text().splitlines()]
    assert len(rows) == 4 * (TINY.rounds + 1)
    assert {
        "task",
        "cell",
        "seed",
        "round",
        "test_accuracy",
        "test_loss",
        "uplink_bytes",
        "downlink_bytes",
        "uplink_total",
        "downlink_total",
    } <= set(rows[0])
    assert len(summary["runs"]) == 4 and len(summary["cells"]) == 2
    base, topk = summary["cells"]
    assert base["uplink_ratio"] == 1.0 and topk["uplink_ratio"] > 10
    assert topk["total_ratio"] > 1 and topk["participation"] == 0.5
    md = (out / "summary.md").read_text()
    assert "`topk:0.1+q4+zstd@momentum=0.9`" in md and "participation" in md

    # The same command again runs nothing; one more cell runs only that cell.
    before = (out / "runs.jsonl").read_text()
    calls = []
    run_sweep([digits], cells, [0, 1], TINY, out, progress=False)
    assert (out / "runs.jsonl").read_text() == before
    import fedpress.sweep.runner as runner

    real = runner.simulate

    def counting(task, cell, seed, settings, **kw):
        calls.append((cell, seed))
        return real(task, cell, seed, settings, **kw)

    runner.simulate = counting
    try:
        summary = run_sweep([digits], cells + ["q8+zstd"], [0, 1], TINY, out, progress=False)
    finally:
        runner.simulate = real
    assert calls == [("q8+zstd", 0), ("q8+zstd", 1)]
    assert (out / "runs.jsonl").read_text().startswith(before)
    assert len(summary["cells"]) == 3

    # A run cut short (its rows partly written) runs again; the others stay.
    lines = (out / "runs.jsonl").read_text().splitlines()
    (out / "runs.jsonl").write_text("\n".join(lines[:-2]) + '\n{"torn')
    calls.clear()
    runner.simulate = counting
    try:
        run_sweep([digits], cells + ["q8+zstd"], [0, 1], TINY, out, progress=False)
    finally:
        runner.simulate = real
    assert calls == [("q8+zstd", 1)]
    again = [json.loads(line) for line in (out / "runs.jsonl").read_text().splitlines()]
    assert strip_time(again) == strip_time([json.loads(line) for line in lines])


def test_sweep_refuses_other_settings_without_overwrite(tmp_path, digits):
    out = tmp_path / "s"
    run_sweep([digits], ["fp32"], [0], TINY, out, progress=False)
    other = Settings(clients=6, per_round=3, rounds=3, eval_every=2)
    with pytest.raises(SweepError, match="rounds: 4 -> 3"):
        run_sweep([digits], ["fp32"], [0], other, out, progress=False)
    summary = run_sweep([digits], ["fp32"], [0], other, out, progress=False, overwrite=True)
    assert summary["runs"][0]["rounds"] == 3


def test_parallel_jobs_give_the_same_rows(tmp_path):
    cells = ["fp32", "topk:0.2+q4+zstd@downlink=q8+zstd"]
    run_sweep(["digits"], cells, [0, 1], TINY, tmp_path / "one", progress=False, jobs=1)
    run_sweep(["digits"], cells, [0, 1], TINY, tmp_path / "two", progress=False, jobs=2)
    key = lambda r: (r["cell"], r["seed"], r["round"])  # noqa: E731
    one = sorted(strip_time(json.loads(x) for x in (tmp_path / "one/runs.jsonl").read_text().splitlines()), key=key)
    two = sorted(strip_time(json.loads(x) for x in (tmp_path / "two/runs.jsonl").read_text().splitlines()), key=key)
    assert one == two


# ---------------------------------------------------------------- reports --
def _run(cell, seed, accs, up, down, target=0.9):
    rows = []
    tu = td = 0
    for r, a in enumerate(accs):
        tu += up if r else 0
        td += down if r else 0
        rows.append(
            {
                "task": "t",
                "cell": cell,
                "seed": seed,
                "round": r,
                "test_accuracy": a,
                "test_loss": 1.0,
                "uplink_total": tu,
                "downlink_total": td,
                "total_bytes": tu + td,
                "uplink_payload_bytes": 0,
                "downlink_payload_bytes": 0,
                "seconds": 1.0,
            }
        )
    return run_summary(rows, target)


def test_summaries_against_hand_computed_numbers():
    runs = [
        _run("fp32", 0, [0.1, 0.5, 0.92, 0.95], 1000, 1000),
        _run("fp32", 1, [0.1, 0.6, 0.93, 0.97], 1000, 1000),
        _run("q8", 0, [0.1, 0.4, 0.85, 0.93], 100, 500),
        _run("q8", 1, [0.1, 0.5, 0.91, 0.96], 100, 500),
    ]
    assert runs[0]["round_to_target"] == 2 and runs[0]["total_bytes_to_target"] == 4000
    assert runs[2]["round_to_target"] == 3 and runs[2]["total_bytes_to_target"] == 1800
    assert runs[0]["mean_last_accuracy"] == pytest.approx((0.5 + 0.92 + 0.95) / 3)
    base, q8 = cell_summaries(runs, participation=0.2)
    assert q8["final_accuracy_mean"] == pytest.approx(0.945)
    assert q8["final_accuracy_std"] == pytest.approx(math.sqrt(2 * 0.015**2))
    assert q8["gap_points"] == pytest.approx(100 * ((0.93 - 0.95) + (0.96 - 0.97)) / 2)
    assert q8["uplink_ratio"] == pytest.approx(10.0) and q8["total_ratio"] == pytest.approx(6000 / 1800)
    assert q8["to_target_ratio"] == pytest.approx((4000 + 4000) / (1800 + 1200))
    assert q8["participation"] == 0.2 and base["gap_points"] == 0.0


# ---------------------------------------------------------------- command --
def test_command_runs_and_reports_mistakes(tmp_path, capsys):
    out = tmp_path / "cmd"
    args = [
        "sweep",
        "--task",
        "digits",
        "--cells",
        "fp32",
        "topk:0.1+q8+zstd",
        "--seeds",
        "0",
        "--clients",
        "4",
        "--per-round",
        "2",
        "--rounds",
        "2",
        "--eval-every",
        "1",
        "--out",
        str(out),
        "--no-progress",
    ]
    assert cli.main(args) == 0
    printed = capsys.readouterr()
    assert "| `topk:0.1+q8+zstd` |" in printed.out
    assert (out / "summary.json").exists()
    assert cli.main(args[:5] + ["q4@bogus=1"] + args[6:]) == 2
    err = capsys.readouterr().err
    assert err.strip().splitlines()[-1] == (
        "fedpress sweep: cell 'q4@bogus=1': unknown option 'bogus'; known: "
        "ef, momentum, clip, warmup, warmup_start, server_momentum, server_lr, "
        "server_decay, downlink, downlink_mode, table, secagg, dp"
    )
    bad_rounds = args[:]
    bad_rounds[bad_rounds.index("--rounds") + 1] = "3"
    assert cli.main(bad_rounds) == 2
    assert "other settings" in capsys.readouterr().err
    assert cli.main(["sweep", "--task", "cifar", "--cells", "fp32", "--out", str(tmp_path / "x")]) == 2
    assert "unknown task" in capsys.readouterr().err


def test_secure_and_private_cells(digits):
    """secagg=on: the secure round's summary in every row, its protocol bytes in the
    uplink and downlink; dp=Z: the accountant's epsilon after each round."""
    s = Settings(clients=4, per_round=4, rounds=3, eval_every=1)
    plain = simulate(digits, "int8:clip=0.05:nmax=4096", 2, s)
    secure = simulate(digits, "int8:clip=0.05:nmax=4096@secagg=on", 2, s)
    for p, q in zip(plain[1:], secure[1:]):
        assert q["secure_aggregation"]["survivors"] == client_ids(4)
        protocol = q["secure_aggregation"]["protocol_uplink_wire_bytes"]
        assert protocol > 0 and q["uplink_bytes"] - protocol > p["uplink_bytes"]  # 21-bit residues, not 8-bit codes
        assert q["test_loss"] == p["test_loss"]  # the same weighted integer sum, masked or not
    private = simulate(digits, "int8:clip=0.05:nmax=128@secagg=on,clip=1,dp=0.5", 2, s)
    expected = []
    from fedpress.privacy import PrivacyAccountant

    for r, row in enumerate(private[1:], start=1):
        assert row["privacy"]["mechanism"] == "skellam" and row["privacy"]["rounds"] == r
        expected.append(row["privacy"]["epsilon"])
    assert expected == sorted(expected) and expected[0] > 0
    central = simulate(digits, "q8@clip=1,dp=0.5", 2, s)
    accountant = PrivacyAccountant(0.5, 1.0, 1e-5)
    accountant.step(3)
    assert central[-1]["privacy"]["epsilon"] == pytest.approx(accountant.epsilon)
    with pytest.raises(ValueError, match="dp needs clip"):
        parse_cell("q8@dp=1")
    with pytest.raises(ValueError, match="secagg sums integer codes"):
        parse_cell("q8@secagg=on")
