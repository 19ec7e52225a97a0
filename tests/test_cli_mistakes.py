"""What a user sees when they get something wrong: ``fedpress`` run as a subprocess,
one line naming the problem (and the fix), exit status 2 for a usage mistake and 1
for a runtime failure, never a traceback; a previous run is never lost."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import fedpress as fp
import numpy as np
import pytest
from cli_helpers import server_args

pytest.importorskip("torch")
pytest.importorskip("sklearn")

ENV = {**os.environ, "PYTHONUNBUFFERED": "1"}


def fedpress(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "fedpress.cli", *args], capture_output=True, text=True, timeout=timeout, env=ENV
    )


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for_port(port: int, timeout: float = 30.0) -> None:
    """Until something listens on 127.0.0.1:port (a server subprocess started)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with socket.socket() as probe:
            if probe.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.1)
    raise AssertionError(f"nothing listens on port {port} after {timeout} s")


@pytest.fixture
def token(tmp_path: Path) -> str:
    path = tmp_path / "token"
    path.write_text("x" * 64 + "\n")
    path.chmod(0o600)
    return str(path)


def client_args(token: str, *extra: str, connect: str = "127.0.0.1:9", insecure: bool = True) -> list:
    return [
        "client",
        "--connect",
        connect,
        "--token-file",
        token,
        *(["--insecure"] if insecure else []),
        "--partition",
        "0/2",
        "--log-level",
        "error",
        *extra,
    ]


def assert_one_line(result: subprocess.CompletedProcess, status: int, *needles: str) -> str:
    """The error is the last line of stderr, starts with the command, names the problem."""
    err = result.stderr
    assert result.returncode == status, (result.returncode, err)
    assert "Traceback" not in err, err
    last = err.strip().splitlines()[-1]
    assert last.startswith("fedpress "), err
    for needle in needles:
        assert needle in last, (needle, err)
    return last


MISTAKES = {  # name -> (argv builder, status, what the line must say)
    "bad codec": (lambda t, tok: server_args(t, tok, "--codec", "q3"), 2, ["--codec", "unknown stage", "q3"]),
    "rounds 0": (lambda t, tok: server_args(t, tok, "--rounds", "0"), 2, ["rounds must be"]),
    "mnist without data": (
        lambda t, tok: server_args(t, tok, "--task", "mnist", "--data-dir", str(t / "none")),
        2,
        ["--task mnist", "--data-dir"],
    ),
    "missing token file": (
        lambda t, tok: server_args(t, str(t / "no-token")),
        2,
        ["cannot read the token file", "no-token"],
    ),
    "missing TLS files": (
        lambda t, tok: server_args(
            t, tok, "--tls-cert", str(t / "c.pem"), "--tls-key", str(t / "k.pem"), insecure=False
        ),
        2,
        ["cannot load the certificate", "c.pem"],
    ),
    "connect without port": (lambda t, tok: client_args(tok, connect="127.0.0.1"), 2, ["host:port"]),
    "partition beyond the data": (
        lambda t, tok: client_args(tok, "--partition", "0/2000"),
        2,
        ["--partition 0/2000", "examples"],
    ),
    "partition index": (lambda t, tok: client_args(tok, "--partition", "3/2"), 2, ["partition index 3"]),
    "nothing listening": (
        lambda t, tok: client_args(tok, "--max-retries", "0", connect=f"127.0.0.1:{free_port()}"),
        1,
        ["giving up after 1 failed attempt"],
    ),
    "bad demo codec": (
        lambda t, tok: ["demo", "--codecs", "fp32", "q3", "--out", str(t / "demo")],
        2,
        ["q3", "unknown stage"],
    ),
    "bad frame deadline": (lambda t, tok: client_args(tok, "--frame-grace", "0"), 2, ["frame_grace must be"]),
}


@pytest.mark.parametrize("name", list(MISTAKES))
def test_a_mistake_is_one_line_and_an_exit_status(name, tmp_path, token):
    build, status, needles = MISTAKES[name]
    assert_one_line(fedpress(*build(tmp_path, token)), status, *needles)
    assert not (tmp_path / "demo").exists()  # the demo checks every codec before it runs any


def test_debug_shows_the_traceback(tmp_path, token):
    result = fedpress(*server_args(tmp_path, token, "--rounds", "0", "--debug"))
    assert result.returncode != 0 and "Traceback" in result.stderr


def previous_run(tmp_path: Path) -> dict:
    run = tmp_path / "run"
    run.mkdir()
    files = {"rounds.jsonl": '{"round": 0}\n{"round": 1}\n', "checkpoint.json": "{}", "checkpoint-1.npz": "x"}
    for name, text in files.items():
        (run / name).write_text(text)
    return files


def test_a_previous_run_survives_a_server_started_without_resume(tmp_path, token):
    files = previous_run(tmp_path)
    line = assert_one_line(
        fedpress(*server_args(tmp_path, token)), 2, "holds a previous run", "--resume", "--overwrite"
    )
    assert "rounds.jsonl" in line and "checkpoint" in line
    for name, text in files.items():
        assert (tmp_path / "run" / name).read_text() == text


def test_overwrite_touches_nothing_when_the_port_is_taken(tmp_path, token):
    files = previous_run(tmp_path)
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = fedpress(*server_args(tmp_path, token, "--overwrite", port=port))
    assert_one_line(result, 1, f"cannot serve on 127.0.0.1:{port}", "choose another --port")
    for name, text in files.items():
        assert (tmp_path / "run" / name).read_text() == text
    assert_one_line(fedpress(*server_args(tmp_path, token, "--overwrite", "--resume")), 2, "not allowed with")


def test_the_server_gives_up_waiting_for_clients_and_says_how_many_came(tmp_path, token):
    result = fedpress(
        *server_args(tmp_path, token, "--min-clients", "2", "--clients-per-round", "2", "--wait-timeout", "1")
    )
    assert_one_line(result, 1, "waited 1 s for 2 clients, 0 connected", "--min-clients", "--wait-timeout")


def test_ctrl_c_stops_the_server_cleanly(tmp_path, token):
    proc = subprocess.Popen(
        [sys.executable, "-m", "fedpress.cli", *server_args(tmp_path, token, "--log-level", "info")],
        stderr=subprocess.PIPE,
        text=True,
        env=ENV,
    )
    assert proc.stderr is not None
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and "listening on" not in proc.stderr.readline():
        pass
    proc.send_signal(signal.SIGINT)
    err = proc.communicate(timeout=30)[1]
    assert proc.returncode == 130, err
    assert "Traceback" not in err and err.strip().splitlines()[-1] == "fedpress server: interrupted"


def test_inspect_into_a_closed_pipe_is_quiet(tmp_path):
    model = {f"layer{i}": np.ones(4, np.float32) for i in range(200)}
    path = tmp_path / "update.fp"
    path.write_bytes(fp.Codec("q8").encode(model))
    cmd = f"{sys.executable} -m fedpress.cli inspect --json {path} | head -n 1"
    result = subprocess.run(["bash", "-o", "pipefail", "-c", cmd], capture_output=True, text=True, env=ENV, timeout=60)
    assert result.stdout.strip() == "{" and result.stderr == "", result.stderr
    assert result.returncode == 0
    assert json.loads(fedpress("inspect", "--json", str(path)).stdout)["codec"] == "q8"


def test_a_tls_client_stops_at_once_against_a_plain_server(tmp_path, token):
    assert fedpress("certificate", "--out", str(tmp_path / "tls")).returncode == 0
    port = free_port()
    server = subprocess.Popen(
        [sys.executable, "-m", "fedpress.cli", *server_args(tmp_path, token, "--wait-timeout", "60", port=port)],
        stderr=subprocess.PIPE,
        text=True,
        env=ENV,
    )
    try:
        wait_for_port(port)
        started = time.monotonic()
        result = fedpress(
            *client_args(
                token, "--tls-ca", str(tmp_path / "tls" / "cert.pem"), connect=f"127.0.0.1:{port}", insecure=False
            )
        )
    finally:
        server.kill()
        server.communicate()
    # retried 10 times with back-off this would take half a minute
    assert time.monotonic() - started < 15
    assert_one_line(result, 1, "does not speak TLS", "connect with --insecure")


def test_every_option_has_help_text_and_shows_its_default():
    from fedpress.cli import build_parser

    parser = build_parser()
    commands = next(a for a in parser._actions if isinstance(a, __import__("argparse")._SubParsersAction))
    missing = [
        f"{name} {action.option_strings[0]}"
        for name, sub in commands.choices.items()
        for action in sub._actions
        if action.option_strings and not action.help
    ]
    assert not missing, missing
    text = " ".join(commands.choices["server"].format_help().split())  # unwrapped
    assert "(default: 300.0)" in text and "(default: 0.0.0.0)" in text  # --wait-timeout, --host
    assert "(default: None)" not in text and "(default: False)" not in text


def test_a_world_readable_token_is_warned_about(tmp_path, token):
    Path(token).chmod(0o644)
    result = fedpress(*server_args(tmp_path, token, "--rounds", "0"))
    assert f"the token file {token} can be read by other users (mode 0644): chmod 600 {token}" in result.stderr
    Path(token).chmod(0o600)
    assert "can be read by other users" not in fedpress(*server_args(tmp_path, token, "--rounds", "0")).stderr


def test_a_wrong_token_and_a_certificate_for_another_name(tmp_path, token):
    """A TLS server whose certificate names 127.0.0.1 only: a client with another token is
    told to check it; one that connects as localhost is told the certificate does not match."""
    assert fedpress("certificate", "--out", str(tmp_path / "tls"), "--host", "127.0.0.1").returncode == 0
    other = tmp_path / "other"
    other.write_text("y" * 64)
    other.chmod(0o600)
    port = free_port()
    server = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "fedpress.cli",
            *server_args(
                tmp_path,
                token,
                "--wait-timeout",
                "60",
                "--tls-cert",
                str(tmp_path / "tls" / "cert.pem"),
                "--tls-key",
                str(tmp_path / "tls" / "key.pem"),
                port=port,
                insecure=False,
            ),
        ],
        stderr=subprocess.PIPE,
        text=True,
        env=ENV,
    )
    try:
        wait_for_port(port)
        ca = ["--tls-ca", str(tmp_path / "tls" / "cert.pem")]
        wrong = fedpress(*client_args(str(other), *ca, connect=f"127.0.0.1:{port}", insecure=False))
        renamed = fedpress(*client_args(token, *ca, connect=f"localhost:{port}", insecure=False))
    finally:
        server.kill()
        server.communicate()
    assert_one_line(wrong, 1, "the server rejected the token", "check --token-file")
    assert_one_line(renamed, 1, "certificate this client does not trust", "fedpress certificate --host NAME")


def test_info_by_default_and_quiet_on_request(tmp_path, token):
    base = server_args(tmp_path, token, "--wait-timeout", "1")
    base.remove("--log-level")
    base.remove("error")
    talkative = fedpress(*base).stderr
    assert "listening on 127.0.0.1:" in talkative and "waiting for clients: 0 of the 1 needed connected" in talkative
    quiet = fedpress(*base, "--quiet").stderr
    assert "listening on" not in quiet and "waited 1 s for 1 clients" in quiet.strip().splitlines()[-1]
