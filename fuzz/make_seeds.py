"""Writes the seed corpus of the fuzz harnesses: valid payloads of many codec specs
and valid federation frames, so the fuzzers start past the header and checksum
checks instead of having to discover the format.

    python fuzz/make_seeds.py [OUT]        # OUT defaults to fuzz/corpus

writes OUT/payload/seed-* and OUT/frames/seed-* (deterministic: same bytes every
run; existing files of the same name are overwritten, others are left alone).
"""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))

import fedpress as fp  # noqa: E402 - after the sys.path line above
import numpy as np  # noqa: E402 - after the sys.path line above
from fedpress.federation import protocol as P  # noqa: E402 - after the sys.path line above
from fedpress.format.registry import KIND_RAW  # noqa: E402 - after the sys.path line above
from fedpress.format.writer import Entry, write_payload  # noqa: E402 - after the sys.path line above
from fuzz_checks import KEY, small_update  # noqa: E402 - after the sys.path line above

# Every stage of python/fedpress/codec.py at least once: sparsifiers, rht, every value
# format and eden mode, zstd with and without a level (tests/test_payload_fuzz.py's SPECS
# and more).
SPECS = [
    "fp32",
    "fp16",
    "bf16",
    "q8",
    "q4",
    "q2",
    "sign",
    "topk:0.01",
    "topk:0.01+q4",
    "topk:0.001+q4+zstd",
    "randk:0.01+fp16",
    "q8+zstd:3",
    "rht+q2+zstd",
    "thresh:0.2",
    "topk:0.2+q8+zstd:1",
    "randk:0.3+q2",
    "topk:0.3+sign",
    "topk:0.25+bf16+zstd",
    "rht+fp16",
    "rht+q8",
    "rht+sign+zstd",
    "thresh:0.1+bf16",
    "randk:0.2+q4+zstd",
    "eden1",
    "eden2",
    "eden3",
    "eden4",
    "eden8",
    "eden4:shared",
    "eden2:shared",
    "eden8+zstd",
    "eden1:mse",
    "topk:0.1+eden2:mse",
    "randk:0.2+eden3:shared",
    "thresh:0.3+eden4",
]
DIGEST_SPECS = [
    "fp32",
    "q4",
    "topk:0.01+q4",
    "topk:0.001+q4+zstd",
    "randk:0.01+fp16",
    "rht+q2+zstd",
    "sign",
    "eden3",
    "eden4:shared",
    "topk:0.1+eden2:mse",
]


def label(text: str) -> str:
    return "".join(c if c.isalnum() else "_" for c in text)


def payload_seeds() -> dict:
    update = small_update()
    rng = np.random.default_rng(7)
    long = {"x": (rng.standard_normal(300) * 0.1).astype(np.float32)}  # sparse forms win here
    seeds = {}
    for spec in SPECS:
        seeds[f"seed-{label(spec)}"] = fp.Codec(spec).encode(update, seed=99)
    for spec in DIGEST_SPECS:
        seeds[f"seed-{label(spec)}-digest"] = fp.Codec(spec, table="digest").encode(update, seed=99)
    for spec in ("topk:0.05+q4", "randk:0.05+fp16", "thresh:0.05+q8", "topk:0.05+eden2", "eden4:shared", "rht+q4"):
        seeds[f"seed-long-{label(spec)}"] = fp.Codec(spec, rht_block=64).encode(long, seed=5)
    seeds["seed-per_tensor-topk_0.2_q4"] = fp.Codec("topk:0.2+q4", per_tensor=True).encode(update, seed=3)
    seeds["seed-q4-bucket16"] = fp.Codec("q4", bucket=16).encode(update, seed=3)
    seeds["seed-eden4_shared-rotation_seed"] = fp.Codec("eden4:shared", rht_block=16).encode(
        long, seed=4, rotation_seed=12345
    )
    spiky = np.random.default_rng(11).standard_t(2, 1000).astype(np.float32)
    spiky[17] = 400.0  # beyond the clip after rotation: shared-mode outliers
    for spec in ("eden1:shared", "eden3:shared"):
        seeds[f"seed-outliers-{label(spec)}"] = fp.Codec(spec, rht_block=256).encode(
            {"x": spiky}, seed=3, rotation_seed=4
        )
    # Float tensors sent raw: valid format-v1 payloads no Codec writes.
    raw_floats = [
        Entry(
            name="b",
            dtype="bfloat16",
            shape=(3,),
            kind=KIND_RAW,
            count=3,
            values=np.array([0x3F80, 0xC000, 0], "<u2").tobytes(),
        ),
        Entry(
            name="f",
            dtype="float32",
            shape=(1, 2),
            kind=KIND_RAW,
            count=2,
            values=np.array([1.5, -2], "<f4").tobytes(),
        ),
        Entry(name="h", dtype="float16", shape=(), kind=KIND_RAW, count=1, values=np.array([0.25], "<f2").tobytes()),
    ]
    seeds["seed-raw-floats"] = write_payload("fp32", 1, raw_floats, None)
    seeds["seed-empty-update"] = fp.Codec("fp32").encode({}, seed=0)
    seeds["seed-raw-only"] = fp.Codec("q8+zstd").encode(
        {
            "i8": np.arange(-4, 4, dtype=np.int8),
            "u64": np.array([0, 2**40], np.uint64),
            "b": np.array([[True], [False]]),
        },
        seed=0,
    )
    return seeds


def _frame(ftype: int, *parts: bytes) -> bytes:
    return b"".join(bytes(p) for p in P.encode_frame(ftype, *parts))


def _sealed(sealer: P.FrameSealer, ftype: int, *parts: bytes) -> bytes:
    return b"".join(bytes(p) for p in sealer.seal(ftype, *parts))


def frame_seeds() -> dict:
    T = P.FrameType
    update = small_update()
    full = fp.Codec("fp32").encode({"w": update["w"], "i": update["i"]}, seed=1)
    delta1 = fp.Codec("topk:0.1+q4+zstd").encode(update, seed=2)
    delta2 = fp.Codec("eden3", table="digest").encode(update, seed=3)
    tag, base = bytes(range(16)), bytes(range(16, 32))
    bodies = {
        "hello": P.Hello("client-7", ("downlink-delta",), tag, "topk:0.01+q4+zstd").pack(),
        "hello-minimal": P.Hello("c").pack(),
        "challenge": bytes(range(100, 132)),
        "auth": P.Auth(bytes(range(32)), bytes(range(32, 64))).pack(),
        "welcome": P.Welcome(
            bytes(32),
            {
                "features": ["downlink-delta"],
                "round_timeout": 30.5,
                "codec": "q8",
                "rounds": 10,
                "nested": {"a": [1, 2.5, None, True, "x"]},
            },
        ).pack(),
        "task-full": b"".join(P.Task(3, P.TASK_FULL, tag, b"", {"lr": 0.01, "epochs": 1}, [full]).parts()),
        "task-delta": b"".join(P.Task(4, P.TASK_DELTA, tag, base, {}, [delta1, delta2]).parts()),
        "update": b"".join(bytes(p) for p in P.Update(3, 128, {"loss": 0.25, "acc": 0.9}, delta1).parts()),
        "update-failed": b"".join(bytes(p) for p in P.Update(3, 0, {"error": "oom"}, b"", P.UPDATE_FAILED).parts()),
        "error": P.pack_error(P.ErrorCode.AUTH, "authentication failed"),
        "bye": P.pack_text("round limit reached"),
    }
    types = {
        "hello": T.HELLO,
        "hello-minimal": T.HELLO,
        "challenge": T.CHALLENGE,
        "auth": T.AUTH,
        "welcome": T.WELCOME,
        "task-full": T.TASK,
        "task-delta": T.TASK,
        "update": T.UPDATE,
        "update-failed": T.UPDATE,
        "error": T.ERROR,
        "bye": T.BYE,
    }
    seeds = {}
    for name, body in bodies.items():
        seeds[f"seed-frame-{name}"] = _frame(types[name], body)
        seeds[f"seed-body-{name}"] = body
        seeds[f"seed-sealed-{name}"] = _sealed(P.FrameSealer(KEY), types[name], body)
    # One connection each way: the handshake in the clear, then sealed frames in sequence.
    seeds["seed-stream-client"] = _frame(T.HELLO, bodies["hello"]) + _frame(T.AUTH, bodies["auth"])
    sealer = P.FrameSealer(KEY)
    seeds["seed-stream-sealed"] = (
        _sealed(sealer, T.UPDATE, bodies["update"])
        + _sealed(sealer, T.ERROR, bodies["error"])
        + _sealed(sealer, T.BYE, bodies["bye"])
    )
    sealer = P.FrameSealer(KEY)
    seeds["seed-stream-server"] = _sealed(sealer, T.TASK, bodies["task-full"]) + _sealed(sealer, T.BYE, b"")
    seeds["seed-frame-empty-bye"] = _frame(T.BYE)
    seeds["seed-json"] = P.dumps_json({"a": [1, {"b": None}], "c": "d", "e": 1.5e300})
    seeds["seed-json-deep-40"] = b'{"a":' + b"[" * 40 + b"]" * 40 + b"}"  # beyond MAX_JSON_DEPTH
    seeds["seed-json-deep-1900"] = b'{"a":' + b"[" * 1900 + b"]" * 1900 + b"}"  # beyond the recursion limit
    hello_head = bytes((P.PROTOCOL_VERSION, 0, 2, 0)) + b"c7"
    seeds["seed-body-hello-wrong-types"] = hello_head + b'{"features":[1],"model":"0011","codec":7}'
    seeds["seed-frame-hello-wrong-types"] = _frame(T.HELLO, hello_head + b'{"features":"x","model":5,"codec":null}')
    return seeds


def main(argv: list) -> int:
    out = Path(argv[1]) if len(argv) > 1 else ROOT / "fuzz" / "corpus"
    for sub, seeds in (("payload", payload_seeds()), ("frames", frame_seeds())):
        directory = out / sub
        directory.mkdir(parents=True, exist_ok=True)
        for name, data in seeds.items():
            (directory / name).write_bytes(data)
        total = sum(len(d) for d in seeds.values())
        print(f"{directory}: {len(seeds)} seeds, {total} bytes")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
