"""`fedpress certificate`, `fedpress server` and `fedpress client` as a user
runs them: TLS by default, plain TCP only with --insecure, logs on stderr."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
from cli_helpers import run_cli, server_args
from fedpress import cli

pytest.importorskip("torch")
pytest.importorskip("sklearn")


def fedpress(*args: str, **kw) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "fedpress.cli", *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kw
    )


def test_certificate_command_writes_a_pair_and_keeps_existing_files(tmp_path, capsys):
    out = tmp_path / "tls"
    assert cli.main(["certificate", "--out", str(out), "--host", "fl.example.org", "--host", "10.0.0.7"]) == 0
    assert (out / "key.pem").stat().st_mode & 0o777 == 0o600
    assert b"BEGIN CERTIFICATE" in (out / "cert.pem").read_bytes()
    assert "--tls-ca" in capsys.readouterr().err
    key = (out / "key.pem").read_bytes()
    with pytest.raises(SystemExit, match="exists; pass --force"):
        run_cli(["certificate", "--out", str(out)])
    assert (out / "key.pem").read_bytes() == key
    assert cli.main(["certificate", "--out", str(out), "--force"]) == 0
    assert (out / "key.pem").read_bytes() != key
    with pytest.raises(SystemExit, match="not a host name"):
        run_cli(["certificate", "--out", str(tmp_path / "x"), "--host", "two words"])


def test_server_and_client_refuse_plain_tcp_unless_told(tmp_path):
    token = tmp_path / "token"
    token.write_text("t" * 32)
    server = server_args(tmp_path, str(token), insecure=False)
    with pytest.raises(SystemExit, match="no TLS: give --tls-cert FILE --tls-key FILE"):
        run_cli(server)
    with pytest.raises(SystemExit, match="--insecure means no TLS"):
        run_cli(server + ["--insecure", "--tls-cert", "c", "--tls-key", "k"])
    with pytest.raises(SystemExit, match="cannot load the certificate"):
        run_cli(server + ["--tls-cert", str(tmp_path / "none.pem"), "--tls-key", str(tmp_path / "none.key")])
    client = ["client", "--connect", "127.0.0.1:1", "--token-file", str(token), "--partition", "0/2"]
    with pytest.raises(SystemExit, match="cannot load the CA file"):
        run_cli(client + ["--tls-ca", str(tmp_path / "none.pem")])
    with pytest.raises(SystemExit, match="--insecure means no TLS"):
        run_cli(client + ["--insecure", "--tls-ca", str(token)])
    assert not (tmp_path / "run").exists()


def test_a_tls_federation_from_the_command_line(tmp_path):
    """A self-signed pair from `fedpress certificate`, a server with per-client
    tokens, two clients that verify it: one round; the server's stderr says
    where it listens, TLS, the joins and the round; a plain-TCP client fails."""
    assert cli.main(["certificate", "--out", str(tmp_path)]) == 0
    assert cli.main(["token", "--new", "--out", str(tmp_path / "master")]) == 0
    for i in (0, 1):
        assert (
            cli.main(
                [
                    "token",
                    "--master",
                    str(tmp_path / "master"),
                    "--client-id",
                    f"site-{i}",
                    "--out",
                    str(tmp_path / f"site-{i}"),
                ]
            )
            == 0
        )
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    server = fedpress(
        "server",
        "--host",
        "127.0.0.1",
        "--port",
        "0",
        "--rounds",
        "1",
        "--clients-per-round",
        "2",
        "--min-clients",
        "2",
        "--codec",
        "topk:0.1+q8",
        "--master-token-file",
        str(tmp_path / "master"),
        "--tls-cert",
        str(tmp_path / "cert.pem"),
        "--tls-key",
        str(tmp_path / "key.pem"),
        "--out",
        str(tmp_path / "run"),
        "--round-timeout",
        "60",
        env=env,
    )
    clients: list[subprocess.Popen] = []
    try:
        assert server.stderr is not None
        lines = []
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            line = server.stderr.readline()
            lines.append(line)
            match = re.search(r"listening on 127\.0\.0\.1:(\d+) \(TLS\)", line)
            if match or not line:
                break
        assert match, "".join(lines)
        port = match.group(1)
        # A plain-TCP client first (before the round can end): told at once, never retried.
        plain = fedpress(
            "client",
            "--connect",
            f"127.0.0.1:{port}",
            "--token-file",
            str(tmp_path / "site-0"),
            "--client-id",
            "site-0",
            "--partition",
            "0/2",
            "--insecure",
            env=env,
        )
        _, plain_err = plain.communicate(timeout=120)
        assert plain.returncode != 0 and "Traceback" not in plain_err
        assert "speaks TLS: connect with --tls-ca FILE" in plain_err and "giving up" not in plain_err
        clients = [
            fedpress(
                "client",
                "--connect",
                f"127.0.0.1:{port}",
                "--token-file",
                str(tmp_path / f"site-{i}"),
                "--client-id",
                f"site-{i}",
                "--partition",
                f"{i}/2",
                "--tls-ca",
                str(tmp_path / "cert.pem"),
                env=env,
            )
            for i in (0, 1)
        ]
        err = server.communicate(timeout=120)[1]
        assert server.returncode == 0, err
        for c in clients:
            c_err = c.communicate(timeout=60)[1]
            assert c.returncode == 0, c_err
            assert "connected to 127.0.0.1" in c_err
    finally:
        for p in [server, *clients]:
            if p.poll() is None:
                p.kill()
                p.communicate()
    log = "".join(lines) + err
    assert "client site-0 joined" in log and "client site-1 joined" in log
    assert re.search(r"round 1/1 ok: accuracy 0\.\d+, clients 2/2, up [\d.]+ kB, down [\d.]+ kB", log), log
    assert "plain TCP" not in log
    rows = (tmp_path / "run" / "rounds.jsonl").read_text().splitlines()
    assert len(rows) == 2 and Path(tmp_path / "run" / "checkpoint.json").exists()
