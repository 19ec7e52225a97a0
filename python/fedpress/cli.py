"""The ``fedpress`` command line.

    fedpress --version
    fedpress bench [--quick] [--json PATH] [--sizes N ...] [--repeat N] [--threads N] [--only K ...] [--memory]
    fedpress inspect FILE [--json]
    fedpress demo [--quick] [--codecs SPEC ...] [--out DIR]
    fedpress sweep --task digits|mnist|module:function --cells CELL ... [--seeds 0 1 2] [--jobs N] --out DIR
    fedpress token --new --out F | --master F --client-id ID [--out F]
    fedpress certificate --out DIR [--host NAME ...]
    fedpress server --port P --rounds R --clients-per-round C --min-clients M --codec SPEC ...
    fedpress client --connect HOST:P --token-file F --task TASK --partition I/N ...

Each subcommand registers itself in ``_SUBCOMMANDS`` with a function that
adds its options and one that runs it, so later ones (demo, inspect) plug in
without touching ``main``. Optional heavy modules (torch) are imported
only when a subcommand runs, so ``fedpress --help`` stays fast.
"""

from __future__ import annotations

import argparse
import errno
import sys
from typing import Any, Callable, Optional, Sequence

from . import __version__
from ._command_errors import CommandError, Interrupted, UsageError

__all__ = ["main", "build_parser", "CommandError", "UsageError"]


def _add_bench(parser: argparse.ArgumentParser) -> None:
    from . import bench

    bench.add_arguments(parser)


def _run_bench(args: argparse.Namespace) -> int:
    from . import bench

    if args.memory and args.only and bench.PIPELINE not in args.only:
        raise UsageError(f"--memory measures the {bench.PIPELINE} group's encodes: add {bench.PIPELINE} to --only")
    return bench.run_from_args(args)


def _add_inspect(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("file", help="a payload file ('-' reads standard input)")
    parser.add_argument("--json", action="store_true", help="print the inspection as JSON")


def _values_label(t: dict) -> str:
    """How a tensor's values were coded: the value code, +rht if rotated (eden rotates by itself)."""
    eden = t.get("eden")
    if eden is not None:
        mode = ":shared" if eden["shared"] else ":mse" if eden["mse_scale"] else ""
        return f"{t['values']}{mode}" + (f" ({eden['outliers']} outliers)" if eden["outliers"] else "")
    return t["values"] + ("+rht" if t["rotated"] else "")


def _run_inspect(args: argparse.Namespace) -> int:
    import json

    from .format import DecodeError, inspect, payload_table_digest

    try:
        if args.file == "-":
            data = sys.stdin.buffer.read()
        else:
            with open(args.file, "rb") as f:
                data = f.read()
    except OSError as exc:
        print(f"fedpress inspect: cannot read {args.file}: {exc.strerror}", file=sys.stderr)
        return 2
    try:
        digest = payload_table_digest(data)
        if digest is not None:
            print(
                f"fedpress inspect: {args.file}: the payload omits its tensor table (digest 0x{digest.hex()}); "
                "only the model it was made for can list its tensors: fedpress.inspect(data, table=model)",
                file=sys.stderr,
            )
            return 1
        info = inspect(data)
    except DecodeError as exc:
        print(f"fedpress inspect: {args.file}: invalid payload: {exc}", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps(info, indent=2))
        return 0
    print(
        f"codec {info['codec']}  format v{info['format_version']}  zstd {'yes' if info['zstd'] else 'no'}"
        f"  seed {info['seed']}"
    )
    rows = [("name", "shape", "dtype", "kind", "values", "count", "bytes", "raw bytes")]
    for t in info["tensors"]:
        rows.append(
            (
                t["name"],
                "x".join(map(str, t["shape"])) or "()",
                t["dtype"],
                t["kind"],
                _values_label(t),
                str(t["count"]),
                str(t["bytes"]),
                str(t["raw_bytes"]),
            )
        )
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for j, r in enumerate(rows):
        print("  ".join(c.ljust(w) if i < 5 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths))))
        if j == 0:
            print("  ".join("-" * w for w in widths))
    print(f"raw {info['raw_bytes']} bytes -> payload {info['payload_bytes']} bytes, ratio {info['ratio']:.1f}x")
    return 0


def _add_demo(parser: argparse.ArgumentParser) -> None:
    from . import demo

    demo.add_arguments(parser)


def _run_demo(args: argparse.Namespace) -> int:
    from . import demo

    return demo.run_from_args(args)


def _add_sweep(parser: argparse.ArgumentParser) -> None:
    from .sweep import command

    command.add_arguments(parser)


def _run_sweep(args: argparse.Namespace) -> int:
    from .sweep import command

    return command.run_from_args(args)


def _read_token(path: str) -> bytes:
    import os
    import stat

    try:
        with open(path, "rb") as f:
            mode = os.fstat(f.fileno()).st_mode
            token = f.read().strip()
        if os.name == "posix" and mode & (stat.S_IRWXG | stat.S_IRWXO):
            print(
                f"fedpress: WARNING: the token file {path} can be read by other users (mode "
                f"{stat.S_IMODE(mode):04o}): chmod 600 {path}",
                file=sys.stderr,
            )
    except OSError as exc:
        raise UsageError(f"cannot read the token file {path}: {exc.strerror}") from None
    if len(token) < 16:
        raise UsageError(f"the token in {path} is shorter than 16 bytes")
    return token


def _add_log_level(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--log-level",
        default="info",
        choices=["debug", "info", "warning", "error"],
        help="what goes to stderr: info (default) says where it listens or connects, TLS or "
        "not, who joins and one line per round",
    )
    parser.add_argument("--quiet", action="store_true", help="warnings and errors only (--log-level warning)")


def _setup_logging(level: str, quiet: bool = False) -> None:
    import logging

    if quiet and level in ("debug", "info"):
        level = "warning"
    logging.basicConfig(
        level=getattr(logging, level.upper()),
        stream=sys.stderr,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )


def _add_token(parser: argparse.ArgumentParser) -> None:
    what = parser.add_mutually_exclusive_group(required=True)
    what.add_argument("--new", action="store_true", help="make a fresh random token (a shared or a master token)")
    what.add_argument("--master", metavar="FILE", help="derive a client's token from this master token file")
    parser.add_argument("--client-id", metavar="ID", help="with --master: the client whose token to derive")
    parser.add_argument(
        "--out",
        metavar="FILE",
        default=None,
        help="write the token to FILE (mode 0600; an existing file is kept unless --force); default: standard output",
    )
    parser.add_argument("--force", action="store_true", help="overwrite --out if it exists")


def _run_token(args: argparse.Namespace) -> int:
    import os
    import secrets

    from .federation.protocol import check_client_id, client_token

    if args.master is not None:
        if not args.client_id:
            raise UsageError("--master needs --client-id ID (the client whose token to derive)")
        try:
            check_client_id(args.client_id)
        except ValueError as exc:
            raise UsageError(f"{exc}") from None
        token = client_token(_read_token(args.master), args.client_id)
    else:
        if args.client_id:
            raise UsageError("--client-id goes with --master FILE")
        token = secrets.token_hex(32).encode("ascii")
    if args.out is None:
        sys.stdout.write(token.decode("ascii") + "\n")
        return 0
    flags = os.O_WRONLY | os.O_CREAT | (os.O_TRUNC if args.force else os.O_EXCL)
    try:
        fd = os.open(args.out, flags, 0o600)
    except FileExistsError:
        raise UsageError(f"{args.out} exists; pass --force to replace it") from None
    except OSError as exc:
        raise CommandError(f"cannot write {args.out}: {exc.strerror}") from None
    with os.fdopen(fd, "wb") as f:
        f.write(token + b"\n")
    if args.force:
        os.chmod(args.out, 0o600)
    print(f"fedpress token: wrote {args.out}", file=sys.stderr)
    return 0


def _add_certificate(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", required=True, metavar="DIR", help="writes DIR/cert.pem and DIR/key.pem (0600)")
    parser.add_argument(
        "--host",
        action="append",
        default=None,
        metavar="NAME",
        help="a DNS name or IP address the clients connect to (repeat; default: localhost and 127.0.0.1)",
    )
    parser.add_argument("--days", type=int, default=30, help="validity (default 30)")
    parser.add_argument("--force", action="store_true", help="replace existing files")


def _run_certificate(args: argparse.Namespace) -> int:
    import os

    from .federation.tls import self_signed_certificate

    hosts = args.host or ["localhost", "127.0.0.1"]
    try:
        os.makedirs(args.out, exist_ok=True)
        cert, key = os.path.join(args.out, "cert.pem"), os.path.join(args.out, "key.pem")
        self_signed_certificate(cert, key, hosts, days=args.days, overwrite=args.force)
    except FileExistsError as exc:
        raise UsageError(f"{exc}; pass --force to replace it") from None
    except ValueError as exc:
        raise UsageError(f"{exc}") from None
    except OSError as exc:
        raise CommandError(f"cannot write to {args.out}: {exc.strerror}") from None
    print(
        f"fedpress certificate: wrote {cert} and {key} (self-signed, for {', '.join(hosts)}, {args.days} days)\n"
        f"  server: --tls-cert {cert} --tls-key {key}\n  clients: --tls-ca {cert}",
        file=sys.stderr,
    )
    return 0


def _add_server(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--host", default="0.0.0.0", help="address to listen on (0.0.0.0: every interface)")
    parser.add_argument("--port", type=int, required=True, help="TCP port to listen on")
    parser.add_argument("--rounds", type=int, required=True, help="federated rounds to run")
    parser.add_argument("--clients-per-round", type=int, required=True, help="clients sampled each round")
    parser.add_argument("--min-clients", type=int, required=True, help="connected clients needed before a round starts")
    parser.add_argument("--min-fit", type=int, default=1, help="valid updates a round needs to change the model")
    parser.add_argument(
        "--codec",
        required=True,
        metavar="SPEC",
        help="uplink codec the clients use, e.g. topk:0.01+q4+zstd (see docs/specs.md)",
    )
    parser.add_argument(
        "--downlink",
        default=None,
        metavar="SPEC",
        help="codec of the model deltas sent to clients (default: the full model, fp32)",
    )
    tokens = parser.add_mutually_exclusive_group(required=True)
    tokens.add_argument("--token-file", metavar="FILE", help="one token shared by every client")
    tokens.add_argument(
        "--master-token-file",
        metavar="FILE",
        help="per-client tokens: each client holds `fedpress token --master FILE --client-id ID`, "
        "so one client cannot claim another's id",
    )
    parser.add_argument("--tls-cert", default=None, metavar="FILE", help="the server's certificate (PEM)")
    parser.add_argument("--tls-key", default=None, metavar="FILE", help="its private key (PEM)")
    parser.add_argument(
        "--insecure",
        action="store_true",
        help="serve plain TCP without TLS (frames stay authenticated; models and updates travel "
        "in clear): only for loopback and trusted networks",
    )
    parser.add_argument(
        "--task",
        default="digits",
        metavar="TASK",
        help="digits (bundled with scikit-learn), mnist (--data-dir) or module:function returning a "
        "fedpress.train.Task (your model and data; see docs/tasks.md)",
    )
    parser.add_argument("--data-dir", default=None, help="folder of the MNIST IDX files, for --task mnist")
    parser.add_argument(
        "--round-timeout",
        type=float,
        default=120.0,
        metavar="S",
        help="seconds a round waits for the sampled clients' updates",
    )
    parser.add_argument(
        "--wait-timeout",
        type=float,
        default=300.0,
        metavar="S",
        help="seconds a round waits for --min-clients to connect before the server gives up (0: for ever)",
    )
    parser.add_argument("--server-lr", type=float, default=1.0, help="server learning rate on the mean update")
    parser.add_argument(
        "--server-momentum",
        type=float,
        default=0.0,
        metavar="BETA",
        help="server momentum (FedAvgM): keeps applying what rarely-sampled clients sent",
    )
    parser.add_argument(
        "--server-lr-decay",
        type=float,
        default=None,
        metavar="F",
        help="the server lr falls along a half cosine to F times itself in the last round",
    )
    parser.add_argument(
        "--downlink-history",
        type=int,
        default=8,
        metavar="N",
        help="downlink deltas kept for clients that skipped rounds (then: the full model)",
    )
    parser.add_argument(
        "--downlink-mode",
        choices=["chain", "client"],
        default="chain",
        help="chain: every client catches up with the deltas it missed; client: the server keeps "
        "each client's model and sends it one compressed difference (needs --downlink; "
        "one model of server memory per client)",
    )
    parser.add_argument(
        "--downlink-clients",
        type=int,
        default=None,
        metavar="N",
        help="with --downlink-mode client: the most client models kept (default: all)",
    )
    parser.add_argument(
        "--max-examples",
        type=int,
        default=None,
        metavar="N",
        help="the most num_examples one client's update may weigh (larger claims are cut to N)",
    )
    parser.add_argument(
        "--max-share",
        type=float,
        default=None,
        metavar="F",
        help="the largest fraction of a round's total weight one client may hold",
    )
    parser.add_argument(
        "--clip-norm",
        type=float,
        default=None,
        metavar="C",
        help="scale each decoded update to at most L2 norm C before averaging",
    )
    parser.add_argument(
        "--aggregate",
        default="mean",
        metavar="RULE",
        help="mean (FedAvg, default), median or trimmed:F (coordinate-wise over the decoded "
        "updates; tolerates a minority of arbitrary updates)",
    )
    privacy = parser.add_argument_group("privacy")
    privacy.add_argument(
        "--secure-aggregation",
        action="store_true",
        help="the server learns only each round's sum (Bonawitz et al. 2017 / SecAgg+): needs an intB "
        "--codec, e.g. int8:clip=0.01; clients follow without an option; every update weighs the same",
    )
    privacy.add_argument(
        "--dropout-tolerance",
        type=float,
        default=0.3,
        metavar="F",
        help="with --secure-aggregation: the fraction of a round's clients that may drop out and the sum "
        "still be unmasked",
    )
    privacy.add_argument(
        "--dp-noise-multiplier",
        type=float,
        default=None,
        metavar="Z",
        help="differential privacy: clients clip to --clip-norm C, the server adds Gaussian noise of Z*C to the sum "
        "(with --secure-aggregation: each client adds its share of Skellam noise to its codes); rounds.jsonl gives "
        "epsilon",
    )
    privacy.add_argument(
        "--dp-target-epsilon",
        type=float,
        default=None,
        metavar="E",
        help="instead of --dp-noise-multiplier: the smallest noise that keeps the whole run at epsilon <= E",
    )
    privacy.add_argument(
        "--dp-delta", type=float, default=1e-5, metavar="D", help="the delta of the (epsilon, delta) guarantee"
    )
    privacy.add_argument(
        "--dp-sampling-rate",
        type=float,
        default=1.0,
        metavar="Q",
        help="the fraction of the client population sampled per round, for the accountant (1: no amplification)",
    )
    limits = parser.add_argument_group("connection limits")
    limits.add_argument(
        "--max-frame-bytes",
        type=int,
        default=None,
        metavar="N",
        help="largest frame a client may send (default: twice the model's float32 size + 1 MiB)",
    )
    limits.add_argument(
        "--hello-timeout",
        type=float,
        default=2.0,
        metavar="S",
        help="seconds from connect to a complete HELLO (TLS included); idle sockets are dropped",
    )
    limits.add_argument(
        "--handshake-timeout",
        type=float,
        default=10.0,
        metavar="S",
        help="seconds from connect to the end of the handshake",
    )
    limits.add_argument(
        "--max-pending",
        type=int,
        default=256,
        metavar="N",
        help="connections in their handshake at once; a further one evicts the oldest",
    )
    limits.add_argument(
        "--max-pending-per-address", type=int, default=16, metavar="N", help="the same, per client IP address"
    )
    limits.add_argument(
        "--frame-grace",
        type=float,
        default=30.0,
        metavar="S",
        help="a frame body must arrive within S seconds plus its size at --frame-min-rate",
    )
    limits.add_argument(
        "--frame-min-rate",
        type=float,
        default=64 * 1024,
        metavar="B",
        help="bytes per second a frame body must keep up",
    )
    limits.add_argument(
        "--inflight-bytes",
        type=int,
        default=None,
        metavar="N",
        help="frame bytes being received at once over all clients (default: 4 max frames, >= 64 MiB)",
    )
    parser.add_argument("--seed", type=int, default=0, help="seed of the initial model and the client sampling")
    parser.add_argument("--out", required=True, metavar="DIR", help="where rounds.jsonl and the checkpoints go")
    run = parser.add_mutually_exclusive_group()
    run.add_argument(
        "--resume",
        action="store_true",
        help="continue from the last checkpoint in --out (partial writes there are removed)",
    )
    run.add_argument(
        "--overwrite",
        action="store_true",
        help="replace the previous run in --out (without it, or --resume, a previous run is an error)",
    )
    _add_log_level(parser)


def _run_server(args: argparse.Namespace) -> int:
    import asyncio
    import ssl

    from .codec import parse_spec
    from .federation import RunExistsError, Server, WaitTimeout, server_context
    from .robust import AggregationRule
    from .train import get_params, make_evaluate_fn

    _setup_logging(args.log_level, args.quiet)
    for flag, spec in (("--codec", args.codec), ("--downlink", args.downlink)):
        try:
            if spec:
                parse_spec(spec)
        except ValueError as exc:
            raise UsageError(f"{flag}: {exc}") from None
    try:
        AggregationRule.parse(args.aggregate)
    except ValueError as exc:
        raise UsageError(f"--aggregate: {exc}") from None
    for flag, value, ok in [
        ("--max-examples", args.max_examples, lambda v: v >= 1),
        ("--max-share", args.max_share, lambda v: 0 < v <= 1),
        ("--clip-norm", args.clip_norm, lambda v: 0 < v < float("inf")),
    ]:
        if value is not None and not ok(value):
            raise UsageError(f"{flag} out of range: {value}")
    if args.downlink_mode == "client" and not args.downlink:
        raise UsageError("--downlink-mode client needs --downlink SPEC (the codec of the differences)")
    if args.downlink_clients is not None and args.downlink_clients < 1:
        raise UsageError(f"--downlink-clients must be at least 1, got {args.downlink_clients}")
    context = None
    if args.tls_cert or args.tls_key:
        if not (args.tls_cert and args.tls_key):
            raise UsageError("--tls-cert and --tls-key go together")
        if args.insecure:
            raise UsageError("--insecure means no TLS; drop it or --tls-cert/--tls-key")
        try:
            context = server_context(args.tls_cert, args.tls_key)
        except (OSError, ssl.SSLError) as exc:
            raise UsageError(f"cannot load the certificate {args.tls_cert} and key {args.tls_key}: {exc}") from None
    elif not args.insecure:
        raise UsageError(
            "no TLS: give --tls-cert FILE --tls-key FILE (`fedpress certificate --out "
            "DIR --host NAME` makes a self-signed pair for a test deployment), or --insecure for plain "
            "TCP on a trusted network"
        )
    else:
        print(
            "fedpress server: WARNING: --insecure: plain TCP, models and updates travel in clear "
            "(frames are still authenticated)",
            file=sys.stderr,
        )
    task = _load_task(args)
    options = dict(
        evaluate_fn=make_evaluate_fn(task, task.test),
        out_dir=args.out,
        resume=args.resume,
        overwrite=args.overwrite,
        seed=args.seed,
        ssl_context=context,
        wait_timeout=args.wait_timeout or None,
    )
    try:
        server = Server(
            host=args.host,
            port=args.port,
            initial_params=get_params(task.model_fn(args.seed)),
            rounds=args.rounds,
            clients_per_round=args.clients_per_round,
            min_clients=args.min_clients,
            codec=args.codec,
            downlink=args.downlink,
            token=_read_token(args.token_file) if args.token_file else None,
            master_token=_read_token(args.master_token_file) if args.master_token_file else None,
            round_timeout=args.round_timeout,
            min_fit=args.min_fit,
            server_lr=args.server_lr,
            server_momentum=args.server_momentum,
            server_lr_decay=args.server_lr_decay,
            downlink_history=args.downlink_history,
            downlink_mode=args.downlink_mode,
            downlink_clients=args.downlink_clients,
            max_examples=args.max_examples,
            max_share=args.max_share,
            clip_norm=args.clip_norm,
            aggregation=args.aggregate,
            max_frame_bytes=args.max_frame_bytes,
            hello_timeout=args.hello_timeout,
            handshake_timeout=args.handshake_timeout,
            max_pending=args.max_pending,
            max_pending_per_address=args.max_pending_per_address,
            frame_grace=args.frame_grace,
            frame_min_rate=args.frame_min_rate,
            inflight_bytes=args.inflight_bytes,
            insecure=context is None,
            secure_aggregation=args.secure_aggregation,
            dropout_tolerance=args.dropout_tolerance,
            dp_noise_multiplier=args.dp_noise_multiplier,
            dp_target_epsilon=args.dp_target_epsilon,
            dp_delta=args.dp_delta,
            dp_sampling_rate=args.dp_sampling_rate,
            **options,
        )
    except RunExistsError as exc:
        raise UsageError(
            str(exc).replace("resume=True, --resume", "--resume").replace("overwrite=True, --overwrite", "--overwrite")
        ) from None
    except ValueError as exc:  # a setting out of range: the user's mistake, not a traceback
        raise UsageError(f"{exc}") from None
    try:
        asyncio.run(server.run())
    except WaitTimeout as exc:  # before OSError: a TimeoutError is one
        raise CommandError(
            f"{exc}; start more clients, lower --min-clients or raise --wait-timeout" + _resume_hint(server)
        ) from None
    except OSError as exc:  # the port is taken, the address is not this machine's...
        raise CommandError(
            f"cannot serve on {args.host}:{args.port}: {exc.strerror or exc}"
            + (
                " (another server runs there? choose another --port)"
                if getattr(exc, "errno", None) == errno.EADDRINUSE
                else ""
            )
        ) from None
    except KeyboardInterrupt:
        raise Interrupted("interrupted" + _resume_hint(server)) from None
    return 0


def _resume_hint(server: Any) -> str:
    """Where the run stands on disk, and how to continue it."""
    if server.out_dir is None or not server.round:
        return ""
    return f"; {server.out_dir} has the checkpoint of round {server.round} of {server.rounds}: add --resume to continue"


def _load_task(args: argparse.Namespace) -> Any:
    from .train import resolve_task

    try:
        return resolve_task(args.task, data_dir=args.data_dir)
    except ValueError as exc:  # it names --task and the fix
        raise UsageError(str(exc)) from None


def _add_client(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--connect", required=True, metavar="HOST:PORT", help="the server's address and port")
    parser.add_argument(
        "--token-file", required=True, metavar="FILE", help="this client's token (`fedpress token`; keep it mode 0600)"
    )
    parser.add_argument(
        "--task",
        default="digits",
        metavar="TASK",
        help="the server's --task: digits, mnist (--data-dir) or module:function returning a fedpress.train.Task",
    )
    parser.add_argument("--data-dir", default=None, help="folder of the MNIST IDX files, for --task mnist")
    parser.add_argument("--partition", required=True, metavar="I/N", help="this client's share: I of N")
    parser.add_argument(
        "--scheme",
        choices=["iid", "dirichlet", "shards"],
        default=None,
        help="how the training set is split (default: iid, or dirichlet with --alpha)",
    )
    parser.add_argument("--alpha", type=float, default=None, help="Dirichlet concentration (non-IID)")
    parser.add_argument(
        "--codec",
        default=None,
        metavar="SPEC",
        help="override the server's codec (not in a round under secure aggregation, whose codec is the server's)",
    )
    parser.add_argument(
        "--tls-ca",
        default=None,
        metavar="FILE",
        help="CA file the server's certificate must chain to (for a self-signed server: its "
        "certificate); default: the system's CAs",
    )
    parser.add_argument(
        "--insecure",
        action="store_true",
        help="connect in plain TCP without TLS: only for loopback and trusted networks",
    )
    parser.add_argument("--epochs", type=int, default=1, help="local epochs per round")
    parser.add_argument("--lr", type=float, default=0.05, help="local SGD learning rate")
    parser.add_argument("--momentum", type=float, default=0.9, help="SGD momentum of local training")
    parser.add_argument("--ef", choices=["on", "off"], default="on", help="error feedback")
    parser.add_argument(
        "--momentum-correction",
        type=float,
        default=None,
        metavar="BETA",
        help="DGC momentum correction with momentum-factor masking in the encoder",
    )
    parser.add_argument("--clip", type=float, default=None, help="largest L2 norm of an update before compression")
    parser.add_argument("--warmup-rounds", type=int, default=0, help="DGC density warm-up over the first rounds")
    parser.add_argument("--warmup-start", type=float, default=0.25, help="kept fraction in the first warm-up round")
    parser.add_argument(
        "--table",
        choices=["inline", "digest"],
        default="inline",
        help="digest: payloads carry only an 8-byte digest of the tensor table",
    )
    parser.add_argument(
        "--seeded-model",
        action="store_true",
        help="build the initial model from --seed (as the server does) instead of downloading it",
    )
    parser.add_argument("--seed", type=int, default=0, help="seed of the partition and local training")
    parser.add_argument(
        "--client-id",
        default=None,
        metavar="ID",
        help="this client's name on the server (default: client-I from --partition)",
    )
    parser.add_argument(
        "--max-retries",
        type=int,
        default=10,
        metavar="N",
        help="consecutive failed connection attempts before giving up (0: no retry)",
    )
    parser.add_argument(
        "--frame-grace",
        type=float,
        default=30.0,
        metavar="S",
        help="a frame from the server must arrive within S seconds plus its size at "
        "--frame-min-rate, or the client reconnects",
    )
    parser.add_argument(
        "--frame-min-rate",
        type=float,
        default=64 * 1024,
        metavar="B",
        help="bytes per second a frame from the server must keep up",
    )
    _add_log_level(parser)


def _run_client(args: argparse.Namespace) -> int:
    import asyncio
    import ssl

    from ._seeds import PURPOSE_TRAINING, derive_seed
    from .federation import AuthenticationError, Client, FederationError, client_context, parse_address
    from .train import client_partition, get_params, make_train_fn

    _setup_logging(args.log_level, args.quiet)
    try:
        index_text, total_text = args.partition.split("/")
        index, total = int(index_text), int(total_text)
    except ValueError:
        raise UsageError(f"--partition must look like 0/8, got {args.partition!r}") from None
    if not 0 <= index < total:
        raise UsageError(f"partition index {index} outside 0..{total - 1}")
    scheme = args.scheme or ("dirichlet" if args.alpha is not None else "iid")
    task = _load_task(args)
    train = task.train
    try:
        part = client_partition(train, index, total, scheme=scheme, alpha=args.alpha or 0.5, seed=args.seed)
    except ValueError as exc:
        raise UsageError(f"--partition {args.partition}: {exc}") from None
    context = None
    if args.insecure:
        if args.tls_ca:
            raise UsageError("--insecure means no TLS; drop it or --tls-ca")
        print("fedpress client: WARNING: --insecure: plain TCP, models and updates travel in clear", file=sys.stderr)
    else:
        try:
            context = client_context(args.tls_ca)
        except (OSError, ssl.SSLError) as exc:
            raise UsageError(f"cannot load the CA file {args.tls_ca}: {exc}") from None
    try:
        parse_address(args.connect)
    except ValueError as exc:
        raise UsageError(f"--connect: {exc}") from None
    try:
        client = Client(
            args.connect,
            token=_read_token(args.token_file),
            train_fn=make_train_fn(
                task,
                part,
                epochs=args.epochs,
                lr=args.lr,
                momentum=args.momentum,
                seed=derive_seed(args.seed, PURPOSE_TRAINING, index),
            ),
            codec=args.codec,
            error_feedback=args.ef == "on",
            momentum=args.momentum_correction,
            clip=args.clip,
            warmup_rounds=args.warmup_rounds,
            warmup_start=args.warmup_start,
            codec_options={"table": args.table} if args.table != "inline" else None,
            initial_params=(get_params(task.model_fn(args.seed)) if args.seeded_model else None),
            client_id=args.client_id or f"client-{index}",
            ssl_context=context,
            insecure=context is None,
            max_retries=args.max_retries,
            frame_grace=args.frame_grace,
            frame_min_rate=args.frame_min_rate,
        )
    except ValueError as exc:
        raise UsageError(f"{exc}") from None
    try:
        asyncio.run(client.run())
    except ssl.SSLCertVerificationError as exc:
        reason = str(exc.verify_message or exc).rstrip(".")
        raise CommandError(
            f"the server at {args.connect} presented a certificate this client does not trust: "
            f"{reason}; connect with a name the certificate was made for "
            "(`fedpress certificate --host NAME`) and its --tls-ca"
        ) from None
    except AuthenticationError as exc:
        raise CommandError(
            f"{exc}: check --token-file (the server's token, or with per-client tokens the one "
            f"`fedpress token --master` derived for --client-id {client.client_id})"
        ) from None
    except (FederationError, ConnectionError, ssl.SSLError) as exc:  # what a user can fix: no traceback
        raise CommandError(f"{exc}") from None
    except KeyboardInterrupt:
        raise Interrupted("interrupted") from None
    return 0


# name -> (one-line help, add options, run); run returns the exit status.
_SUBCOMMANDS: dict[
    str,
    tuple[str, Callable[[argparse.ArgumentParser], None], Callable[[argparse.Namespace], int]],
] = {
    "bench": (
        "time every kernel against numpy / torch / zstd peers and check they agree, then the payload path "
        "against its kernels",
        _add_bench,
        _run_bench,
    ),
    "demo": (
        "a real federation on loopback sockets for several codecs: accuracy against bytes on the wire",
        _add_demo,
        _run_demo,
    ),
    "sweep": (
        "bytes against accuracy: simulate FedAvg over tasks x cells x seeds, count the federation's bytes",
        _add_sweep,
        _run_sweep,
    ),
    "token": (
        "make a token file: a fresh shared or master token, or a client's token derived from a master",
        _add_token,
        _run_token,
    ),
    "certificate": (
        "make a self-signed TLS certificate and key for a test deployment",
        _add_certificate,
        _run_certificate,
    ),
    "server": (
        "run a federation server (TLS, or --insecure plain TCP) on a training task",
        _add_server,
        _run_server,
    ),
    "client": (
        "run a federation client on a partition of a training task",
        _add_client,
        _run_client,
    ),
    "inspect": (
        "show what a payload file holds: codec, tensors, sections, bytes and ratio",
        _add_inspect,
        _run_inspect,
    ),
}


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows an option's default after its help, unless there is nothing to show (no
    default, a flag) or the help already says it."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if action.default in (None, False, argparse.SUPPRESS) or "default" in text or not action.option_strings:
            return text
        return super()._get_help_string(action) or text


def build_parser() -> argparse.ArgumentParser:
    """The top-level parser with one subparser per subcommand."""
    parser = argparse.ArgumentParser(
        prog="fedpress",
        description="Compress federated-learning updates: fast kernels, a safe wire format.",
    )
    parser.add_argument("--version", action="version", version=f"fedpress {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (help_text, add, run) in _SUBCOMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text, formatter_class=_HelpFormatter)
        add(p)
        p.add_argument("--debug", action="store_true", help="on an error, show the traceback")
        p.set_defaults(_run=run)
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Entry point of the ``fedpress`` console script; returns the exit status:
    0, 1 for a failure, 2 for a usage mistake, 130 for Ctrl-C. Errors are one line on
    stderr; ``--debug`` shows the traceback instead."""
    parser = build_parser()
    args = parser.parse_args(argv)
    run = getattr(args, "_run", None)
    if run is None:
        parser.print_help()
        return 2
    name = f"fedpress {args.command}"
    try:
        return int(run(args))
    except CommandError as exc:
        if args.debug:
            raise
        print(f"{name}: {exc}", file=sys.stderr)
        return exc.status
    except KeyboardInterrupt:
        if args.debug:
            raise
        print(f"{name}: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # `fedpress inspect --json | head`: the reader has gone
        _silence_stdout()
        return 0
    except Exception as exc:  # noqa: BLE001 - anything else is a bug or an environment problem
        if args.debug:
            raise
        print(f"{name}: {type(exc).__name__}: {exc} (--debug shows the traceback)", file=sys.stderr)
        return 1


def _silence_stdout() -> None:
    """Points stdout at /dev/null so that the interpreter's final flush of what is
    still buffered for a closed pipe raises nothing more."""
    import os

    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError):
        pass


if __name__ == "__main__":
    sys.exit(main())
