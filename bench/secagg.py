"""Secure aggregation's cost per round: time and bytes, against the plain round it secures.

    python bench/secagg.py [--clients 100] [--length 214090] [--tolerance 0.3 0.1] [--bits 4] [--repeat 3]

For each dropout tolerance, one round of ``fedpress.secagg`` with ``--clients`` clients
and a vector of ``--length`` codes (214,090: the MNIST CNN of the sweep), 30% of the
clients dropped after sharing keys (their masks removed by the survivors' shares):

* the server's protocol time (routing, the unmask request, the correction) and each
  client's (keys, shares, masking, unmasking), on this machine, one thread;
* the round's extra wall-clock time in a deployment, where clients run on their own
  devices at once: the server's time plus the slowest client's;
* the same with every client run one after another on this machine (the sweep's
  in-process simulation);
* the bytes: a masked intB payload in bits per coordinate (exactly m = B + ceil(log2 N) + 1,
  plus a fixed head), the protocol's messages per client, against fp32 and Flower's
  SecAgg+ (int64 per coordinate).

Timings are of this machine (say which when you quote them); the exit status is 0.
"""

from __future__ import annotations

import argparse
import math
import sys
import time

import numpy as np

try:
    import fedpress as fp
    from fedpress.format.intcodes import modulus_bits
    from fedpress.secagg import SecAggClient, SecAggParams, SecAggServer
except ImportError as exc:  # the compiled core is only there once installed
    sys.exit(f"cannot import fedpress ({exc}); install it first: pip install -e .")


def one_round(n: int, length: int, bits: int, tolerance: float, dropped_fraction: float) -> dict:
    m = modulus_bits(bits, n)
    params = SecAggParams(
        client_ids=list(range(n)), modulus_bits=m, length=length, seed=bytes(32), dropout_tolerance=tolerance
    )
    server = SecAggServer(params)
    clients = {i: SecAggClient(params, i) for i in range(n)}
    client_seconds = dict.fromkeys(clients, 0.0)
    server_seconds = 0.0
    up = down = 0

    def timed(fn, *args, who=None):
        nonlocal server_seconds
        t = time.perf_counter()
        out = fn(*args)
        spent = time.perf_counter() - t
        if who is None:
            server_seconds += spent
        else:
            client_seconds[who] += spent
        return out

    for i, c in clients.items():
        msg = timed(c.advertise, who=i)
        up += len(msg)
        timed(server.receive_advertise, i, msg)
    for i, c in clients.items():
        keys = timed(server.keys_for, i)
        down += len(keys)
        msg = timed(c.share_keys, keys, who=i)
        up += len(msg)
        timed(server.receive_shares, i, msg)
    dropped = set(range(n - int(dropped_fraction * n), n))
    rng = np.random.default_rng(0)
    codes = {i: rng.integers(0, 1 << bits, length, dtype=np.uint64) for i in clients}
    total = np.zeros(length, np.uint64)
    for i, c in clients.items():
        routed = timed(server.shares_for, i)
        down += len(routed)
        if i in dropped:
            continue
        msg = timed(c.report, routed, who=i)
        up += len(msg)
        timed(server.receive_report, i, msg)
    for i, c in clients.items():
        if i in dropped or i in server.reported:
            continue
        verdict = timed(server.verdict)
        down += len(verdict)
        timed(c.exclude, verdict, who=i)
        masked = timed(c.mask, codes[i], who=i)
        total += masked
        timed(server.receive_masked, i)
    request = timed(server.unmask_request)
    for i, c in clients.items():
        if i in dropped:
            continue
        down += len(request)
        msg = timed(c.unmask, request, who=i)
        up += len(msg)
        timed(server.receive_unmask, i, msg)
    correction = timed(server.correction)
    mask = np.uint64((1 << m) - 1)
    plain = sum(codes[i] for i in clients if i not in dropped) & mask
    assert np.array_equal((total - correction) & mask, plain), "the unmasked sum is not the plain sum"
    busiest = max(client_seconds.values())
    return {
        "m": m,
        "degree": params.degree,
        "threshold": params.threshold,
        "server_s": server_seconds,
        "client_max_s": busiest,
        "clients_total_s": sum(client_seconds.values()),
        "deployment_s": server_seconds + busiest,
        "one_machine_s": server_seconds + sum(client_seconds.values()),
        "protocol_up_per_client": up / n,
        "protocol_down_per_client": down / n,
    }


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--clients", type=int, default=100)
    ap.add_argument("--length", type=int, default=214_090)
    ap.add_argument("--bits", type=int, default=4)
    ap.add_argument("--tolerance", type=float, nargs="+", default=[0.3, 0.1])
    ap.add_argument("--dropped", type=float, default=None, help="fraction dropped (default: the tolerance)")
    ap.add_argument("--repeat", type=int, default=3)
    args = ap.parse_args(argv)
    n, length, bits = args.clients, args.length, args.bits
    m = modulus_bits(bits, n)
    update = {"w": np.random.default_rng(1).standard_normal(length).astype(np.float32) * 1e-3}
    plain = len(fp.Codec(f"int{bits}:clip=0.004:nmax={n}").encode(update))
    masked = len(fp.Codec(f"int{bits}:clip=0.004:nmax={n}").encode(update, mask=lambda c: c))
    print(f"{n} clients, {length:,} coordinates, int{bits}: m = {bits} + ceil(log2 {n}) + 1 = {m} bits")
    print(
        f"masked payload: {masked:,} bytes = {8 * masked / length:.3f} bits per coordinate "
        f"(codes {math.ceil(length * m / 8):,} bytes, exactly {m} bits each, + {masked - math.ceil(length * m / 8)} "
        f"bytes of header, table and section head); plain int{bits}: {plain:,}; fp32: {4 * length:,} "
        f"({32 * length / (8 * masked):.1f}x the masked); Flower SecAgg+ int64: {8 * length:,} "
        f"({64 * length / (8 * masked):.1f}x)"
    )
    print(
        f"{'tolerance':>9} {'degree':>6} {'t':>4} {'server s':>9} {'client max s':>12} {'deployment s':>13} "
        f"{'all on one machine s':>21} {'protocol up B/client':>21} {'down B/client':>14}"
    )
    for tolerance in args.tolerance:
        runs = [
            one_round(n, length, bits, tolerance, tolerance if args.dropped is None else args.dropped)
            for _ in range(args.repeat)
        ]
        best = min(runs, key=lambda r: r["one_machine_s"])
        print(
            f"{tolerance:9.2f} {best['degree']:6d} {best['threshold']:4d} {best['server_s']:9.3f} "
            f"{best['client_max_s']:12.3f} {best['deployment_s']:13.3f} {best['one_machine_s']:21.3f} "
            f"{best['protocol_up_per_client']:21,.0f} {best['protocol_down_per_client']:14,.0f}"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
