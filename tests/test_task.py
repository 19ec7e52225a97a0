"""--task module:function: one contract (fedpress.train.Task) for server, client, demo
and sweep, and the examples that bring their own model."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("torch")
pytest.importorskip("sklearn")

from fedpress.train import Task, make_evaluate_fn, make_train_fn, resolve_task  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
ENV = {**os.environ, "PYTHONUNBUFFERED": "1"}


def test_builtin_and_user_tasks_resolve(monkeypatch):
    digits = resolve_task("digits")
    assert digits.name == "digits" and len(digits.train) == 1438 and len(digits.test) == 359
    monkeypatch.chdir(ROOT)  # the current directory is searched for the module
    task = resolve_task("examples.custom_task:build")
    assert isinstance(task, Task) and task.name == "spirals" and len(task.train) == 2400
    params = {k: v.detach().numpy() for k, v in task.model_fn(3).state_dict().items()}
    again = {k: v.detach().numpy() for k, v in task.model_fn(3).state_dict().items()}
    assert all(np.array_equal(params[k], again[k]) for k in params)
    update, n, _ = make_train_fn(task, task.train, seed=1)(params, {"round": 1})
    assert n == 2400 and set(update) == set(params) and any(np.abs(u).max() > 0 for u in update.values())
    assert 0.0 <= make_evaluate_fn(task, task.test)(params)["accuracy"] <= 1.0


@pytest.mark.parametrize(
    "text, message",
    [
        ("cifar", "unknown task 'cifar'"),
        ("no_such_module_x:build", "cannot import"),
        ("examples.custom_task:nothing", "has no function 'nothing'"),
        ("examples.custom_task:build", "must return a fedpress.train.Task, got int"),
    ],
)
def test_bad_tasks_are_named(text, message, monkeypatch):
    monkeypatch.chdir(ROOT)
    if message.startswith("must return"):
        import examples.custom_task as module

        monkeypatch.setattr(module, "build", lambda: 42)
    with pytest.raises(ValueError, match=message):
        resolve_task(text)


def test_a_user_task_through_server_and_clients(tmp_path):
    """`fedpress server` and two `fedpress client`s on examples/custom_task.py."""
    token = tmp_path / "token"
    token.write_text("t" * 64)
    common = ["--task", "examples.custom_task:build", "--seed", "3"]
    server = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "fedpress.cli",
            "server",
            "--host",
            "127.0.0.1",
            "--port",
            "0",
            "--rounds",
            "2",
            "--clients-per-round",
            "2",
            "--min-clients",
            "2",
            "--codec",
            "topk:0.1+q8",
            "--token-file",
            str(token),
            "--out",
            str(tmp_path / "run"),
            "--insecure",
            *common,
        ],
        cwd=ROOT,
        stderr=subprocess.PIPE,
        text=True,
        env=ENV,
    )
    clients = []
    try:
        assert server.stderr is not None
        port = None
        for _ in range(200):
            line = server.stderr.readline()
            if "listening on 127.0.0.1:" in line:
                port = line.split("listening on 127.0.0.1:")[1].split()[0]
                break
        assert port, "no listening line"
        clients = [
            subprocess.run(
                [
                    sys.executable,
                    "-m",
                    "fedpress.cli",
                    "client",
                    "--connect",
                    f"127.0.0.1:{port}",
                    "--token-file",
                    str(token),
                    "--insecure",
                    "--partition",
                    f"{i}/2",
                    "--seeded-model",
                    *common,
                ],
                cwd=ROOT,
                capture_output=True,
                text=True,
                env=ENV,
                timeout=120,
            )
            if i == 1
            else subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "fedpress.cli",
                    "client",
                    "--connect",
                    f"127.0.0.1:{port}",
                    "--token-file",
                    str(token),
                    "--insecure",
                    "--partition",
                    f"{i}/2",
                    "--seeded-model",
                    *common,
                ],
                cwd=ROOT,
                stderr=subprocess.PIPE,
                text=True,
                env=ENV,
            )
            for i in (0, 1)
        ]
        err = server.communicate(timeout=120)[1]
        assert server.returncode == 0, err
        assert clients[1].returncode == 0, clients[1].stderr
        assert clients[0].wait(timeout=60) == 0
    finally:
        for p in [server, *[c for c in clients if isinstance(c, subprocess.Popen)]]:
            if p.poll() is None:
                p.kill()
            p.communicate()
    rows = [line for line in (tmp_path / "run" / "rounds.jsonl").read_text().splitlines()]
    assert len(rows) == 3 and '"status": "ok"' in rows[-1]
    assert "round 2/2 ok" in err and "accuracy 0." in err


def test_the_python_federation_example_runs():
    result = subprocess.run(
        [sys.executable, str(ROOT / "examples" / "python_federation.py"), "--rounds", "2"],
        capture_output=True,
        text=True,
        timeout=120,
        env=ENV,
    )
    assert result.returncode == 0, result.stderr
    assert "accuracy" in result.stdout and "uplink" in result.stdout
