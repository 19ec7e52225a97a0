"""The algorithms around the codec, each against a small numpy reference:
DGC's local clipping and density warm-up in the Encoder, server momentum
(FedAvgM), and compressed downlink deltas with server-side error feedback
that a client catches up on exactly after skipped rounds, and the per-client
downlink (one compressed difference from the model each client holds)."""

from __future__ import annotations

import math

import fedpress as fp
import numpy as np
import pytest
from fedpress._seeds import derive_seed
from fedpress.federation.model import (
    ClientDownlink,
    Downlink,
    ServerOptimizer,
    apply_downlink_delta,
    apply_update,
    canonical,
    load_checkpoint,
    make_downlink,
    model_tag,
    save_checkpoint,
)
from fedpress.format import decode


def top_k_reference(acc: np.ndarray, k: int) -> np.ndarray:
    keep = np.argsort(-np.abs(acc), kind="stable")[:k]
    out = np.zeros_like(acc)
    out[keep] = acc[keep]
    return out


# ------------------------------------------------------------ local clipping --
def test_clipping_matches_a_numpy_reference() -> None:
    """DGC with clipping: g <- g * min(1, C/||g||) over all float tensors, then
    momentum correction, error feedback and top-k as before."""
    clip, m, ratio = 3.0, 0.9, 0.05
    rng = np.random.default_rng(7)
    enc = fp.Encoder(f"topk:{ratio}", momentum=m, clip=clip)
    sizes = {"a": 300, "b": 200}
    v = {k: np.zeros(n, np.float32) for k, n in sizes.items()}
    r = {k: np.zeros(n, np.float32) for k, n in sizes.items()}
    n_total = sum(sizes.values())
    k = int(round(ratio * n_total))
    for t in range(5):
        g = {name: (rng.standard_normal(n) * (1 + 2 * t)).astype(np.float32) for name, n in sizes.items()}
        g["steps"] = np.array(t, np.int64)  # integer tensors are neither clipped nor counted in the norm
        norm = math.sqrt(sum(float(np.dot(g[n].astype(np.float64), g[n])) for n in sizes))
        scale = np.float32(clip / norm) if norm > clip else None
        acc = {}
        for name in sizes:
            gi = g[name] * scale if scale is not None else g[name].copy()
            v[name] = v[name] * np.float32(m) + gi if t else gi
            acc[name] = v[name] + r[name]
        flat = np.concatenate([acc["a"], acc["b"]])
        sent_flat = top_k_reference(flat, k)
        sent_ref = {"a": sent_flat[:300], "b": sent_flat[300:]}
        sent = fp.decode(enc.encode(g, seed=t))
        assert int(sent["steps"]) == t
        for name in sizes:
            np.testing.assert_allclose(sent[name], sent_ref[name], rtol=1e-5, atol=1e-6)
            r[name] = acc[name] - sent_ref[name]
            v[name][sent_ref[name] != 0] = 0
            np.testing.assert_allclose(enc.residuals[name], r[name], rtol=1e-5, atol=1e-5)
            np.testing.assert_allclose(enc.velocities[name], v[name], rtol=1e-5, atol=1e-5)
    assert enc.state_dict()["clip"] == clip


def test_clipping_leaves_small_updates_alone() -> None:
    x = {"w": np.full(100, 0.01, np.float32)}
    a = fp.decode(fp.Encoder("fp32", clip=10.0).encode(x, seed=1))
    np.testing.assert_array_equal(a["w"], x["w"])
    b = fp.decode(fp.Encoder("fp32", clip=0.05).encode(x, seed=1))
    assert np.linalg.norm(b["w"]) == pytest.approx(0.05, rel=1e-6)


@pytest.mark.parametrize("bad", [0.0, -1.0, float("nan"), float("inf")])
def test_bad_clip_is_refused(bad: float) -> None:
    with pytest.raises(ValueError, match="clip"):
        fp.Encoder("topk:0.1", clip=bad)


# ------------------------------------------------------------ density warm-up --
def test_warmup_density_schedule_and_payloads() -> None:
    """Density falls geometrically from warmup_start to the spec's ratio over the warm-up
    (DGC's exponential schedule), and each payload keeps round(density * n) entries."""
    target, start, rounds, n = 0.01, 0.25, 4, 10_000
    enc = fp.Encoder(f"topk:{target}+fp32", warmup_rounds=rounds, warmup_start=start)
    expected = [start * (target / start) ** (t / rounds) for t in range(rounds)] + [target, target]
    assert [enc.density(r) for r in range(1, 7)] == pytest.approx(expected)
    rng = np.random.default_rng(0)
    for r in range(1, 7):
        payload = enc.encode({"w": rng.standard_normal(n).astype(np.float32)}, seed=r, round=r)
        kept = int(np.count_nonzero(decode(payload)["w"]))
        assert kept == int(round(expected[r - 1] * n))
        assert fp.inspect(payload)["codec"] == f"topk:{expected[r - 1]!r}+fp32"
    # Without a round number the encoder counts its own calls.
    own = fp.Encoder(f"topk:{target}", warmup_rounds=rounds, warmup_start=start)
    assert own.density() == pytest.approx(start)
    own.encode({"w": np.ones(100, np.float32)})
    assert own.density() == pytest.approx(expected[1])


def test_warmup_needs_a_sparsifier_and_sane_arguments() -> None:
    with pytest.raises(ValueError, match="sparsifier"):
        fp.Encoder("q8", warmup_rounds=3)
    with pytest.raises(ValueError, match="warmup_start"):
        fp.Encoder("topk:0.01", warmup_rounds=3, warmup_start=0.0)
    with pytest.raises(ValueError, match="warmup_rounds"):
        fp.Encoder("topk:0.01", warmup_rounds=-1)
    # A start below the target is no warm-up at all.
    assert fp.Encoder("topk:0.5", warmup_rounds=3, warmup_start=0.1).density(1) == 0.5


# ------------------------------------------------------------ server momentum --
def test_server_momentum_matches_fedavgm() -> None:
    rng = np.random.default_rng(1)
    params = {"w": rng.standard_normal(50).astype(np.float32), "n": np.array(3, np.int64), "flag": np.array(True)}
    opt = ServerOptimizer(server_lr=0.5, momentum=0.9)
    w, m = params["w"].copy(), np.zeros(50, np.float32)
    for t in range(5):
        mean = {
            "w": rng.standard_normal(50).astype(np.float32),
            "n": np.array(1, np.int64),
            "flag": np.array(t % 2 == 0),
        }
        params = opt.step(params, mean)
        m = np.float32(0.9) * m + mean["w"]
        w = w + np.float32(0.5) * m
        np.testing.assert_allclose(params["w"], w, rtol=1e-6, atol=1e-6)
        assert int(params["n"]) == 3 + t + 1 and bool(params["flag"]) == (t % 2 == 0)
    plain = ServerOptimizer(server_lr=1.0)
    assert plain.step(params, mean)["w"].tolist() == apply_update(params, mean, 1.0)["w"].tolist()
    for bad in (1.0, -0.1, float("nan")):
        with pytest.raises(ValueError, match="momentum"):
            ServerOptimizer(momentum=bad)


# --------------------------------------------- downlink with server-side EF --
def test_downlink_error_feedback_and_exact_catch_up() -> None:
    """replica += decode(C(global - replica)) each round, so what a round does not send
    stays in global - replica and goes out later; a client that skipped rounds applies
    the deltas it missed and holds exactly the server's replica."""
    rng = np.random.default_rng(5)
    params = canonical(
        {"w": rng.standard_normal(4000).astype(np.float32), "b": rng.standard_normal(10).astype(np.float32)}
    )
    dl = Downlink("topk:0.05+q8+zstd", params, history=100, seed=9)
    assert dl.tag == model_tag(params)  # a client that built the same model knows this tag
    replica = {k: v.copy() for k, v in params.items()}
    held = {"early": dl.tag, "late": dl.tag}
    codec = fp.Codec("topk:0.05+q8+zstd")
    client_models = {"early": dict(replica), "late": dict(replica)}
    global_model = dict(params)
    for t in range(1, 7):
        global_model = {k: v + (0.1 * rng.standard_normal(v.shape)).astype(np.float32) for k, v in global_model.items()}
        dl.advance(global_model)
        # The numpy reference of one downlink step, with the same payload seed.
        delta = {k: global_model[k] - replica[k] for k in replica}
        sent = decode(codec.encode(delta, seed=derive_seed(9, "downlink", t)))
        replica = {k: replica[k] + sent[k] for k in replica}
        for k in replica:
            np.testing.assert_array_equal(dl.replica[k], replica[k])
        # Server-side error feedback: the lag is exactly what was not sent.
        for k in replica:
            np.testing.assert_allclose(global_model[k] - dl.replica[k], delta[k] - sent[k], atol=1e-6)
        for name in ["early"] if t % 3 else ["early", "late"]:
            kind, base, payloads = dl.plan(held[name], True)
            assert kind == "delta" and base == held[name]
            assert len(payloads) == (1 if name == "early" else 3)
            for p in payloads:
                client_models[name] = apply_downlink_delta(client_models[name], decode(p))
            held[name] = dl.tag
            for k in replica:
                np.testing.assert_array_equal(client_models[name][k], dl.replica[k])
    # A client that holds something else gets the full model.
    kind, _, payloads = dl.plan(b"\x00" * 16, True)
    assert kind == "full" and decode(payloads[0])["w"].tolist() == dl.replica["w"].tolist()


def test_downlink_falls_back_to_the_full_model_when_the_chain_is_longer() -> None:
    params = canonical({"w": np.zeros(100, np.float32)})
    dl = Downlink("fp32", params, history=50, seed=0)
    first = dl.tag
    for t in range(3):
        dl.advance({"w": np.full(100, t + 1.0, np.float32)})
    kind, _, payloads = dl.plan(first, True)
    assert kind == "full" and len(payloads) == 1  # three fp32 deltas outweigh one fp32 model


def _drift(rng, model):
    return {k: v + (0.1 * rng.standard_normal(v.shape)).astype(np.float32) for k, v in model.items()}


def test_client_downlink_is_error_feedback_per_client() -> None:
    """held <- held + decode(C(global - held)) each time a client is sampled, whatever it
    skipped: one payload per task, and what was not sent stays in that client's lag."""
    rng = np.random.default_rng(3)
    params = canonical(
        {"w": rng.standard_normal(5000).astype(np.float32), "b": rng.standard_normal(10).astype(np.float32)}
    )
    spec = "topk:0.05+q8+zstd"
    dl = make_downlink(spec, params, "client", seed=4)
    assert isinstance(dl, ClientDownlink) and dl.tag == model_tag(params)
    codec = fp.Codec(spec)
    ref = {c: dict(params) for c in ("a", "b", "c")}  # the numpy reference of each client's model
    tags = dict.fromkeys(ref, dl.tag)
    global_model = dict(params)
    sizes = {"a": [], "c": []}
    for t in range(1, 9):
        global_model = _drift(rng, global_model)
        dl.advance(global_model)
        sampled = ["a"] + (["b"] if t == 5 else []) + (["c"] if t % 4 == 0 else [])
        for c in sampled:
            kind, base, tag, payloads = dl.task_for(c, tags[c], True)
            assert kind == "delta" and base == tags[c] and tag != base and len(payloads) == 1
            delta = {k: global_model[k] - ref[c][k] for k in params}
            expected = codec.encode(delta, seed=derive_seed(4, "downlink", c, t))
            assert payloads[0] == expected
            sent = decode(payloads[0])
            ref[c] = {k: ref[c][k] + sent[k] for k in params}
            for k in params:  # the client applies it as Client does, and the server knows the result
                np.testing.assert_array_equal(apply_downlink_delta(dl.held_model(c, base), sent)[k], ref[c][k])
                np.testing.assert_array_equal(dl.held_model(c, tag)[k], ref[c][k])
                np.testing.assert_allclose(global_model[k] - ref[c][k], delta[k] - sent[k], atol=1e-6)
            dl.confirm(c, tag)
            assert list(dl.models[c]) == [tag]  # the model it held before is forgotten
            tags[c] = tag
            sizes.setdefault(c, []).append(len(payloads[0]))
    # A client that skipped three rounds pays one payload, not three.
    assert max(sizes["c"]) < 1.5 * max(sizes["a"])


def test_client_downlink_lossless_spec_holds_the_global_model() -> None:
    rng = np.random.default_rng(8)
    params = canonical({"w": rng.standard_normal(300).astype(np.float32)})
    dl = ClientDownlink("fp32", params)
    tag, model = dl.tag, params
    for t in range(3):
        dl.advance(_drift(rng, params if t == 0 else dl.params))
        kind, _, tag, payloads = dl.task_for("x", tag, True)
        model = apply_downlink_delta(model, decode(payloads[0]))
        np.testing.assert_allclose(model["w"], dl.params["w"], atol=1e-6)
        dl.confirm("x", tag)
    # The global did not move (a failed round): what is left to send is nothing.
    assert not decode(dl.task_for("x", tag, True)[3][0])["w"].any()
    full_tag = dl.task_for("y", None, True)[2]
    assert dl.task_for("y", full_tag, True)[3] == []  # holds the exact global: an empty delta


def test_downlink_delta_of_integer_tensors_saturates() -> None:
    # Non-float tensors take the delta's values in their own dtype, saturating: the value
    # a uint8 buffer is sent as cannot wrap around.
    model = {"u8": np.array([3, 250], np.uint8), "w": np.array([1.0, 2.0], np.float32)}
    delta = {"u8": np.array([-4, 300], np.int64), "w": np.array([0.5, -1.0], np.float32)}
    out = apply_downlink_delta(model, delta)
    assert out["u8"].dtype == np.uint8 and out["u8"].tolist() == [0, 255]
    assert out["w"].tolist() == [1.5, 1.0]
    assert model["u8"].tolist() == [3, 250]  # new arrays: the held model is left as it was
    with pytest.raises(ValueError, match=r"downlink delta for 'u8': NaN or infinity has no value as uint8"):
        apply_downlink_delta(model, {**delta, "u8": np.array([np.nan, 1.0])})


def test_downlink_delta_of_a_bfloat16_tensor() -> None:
    ml_dtypes = pytest.importorskip("ml_dtypes")  # ml_dtypes' bfloat16 is a float tensor (kind "V")
    model = {"bf": np.array([1.0, 2.0], ml_dtypes.bfloat16)}
    out = apply_downlink_delta(model, {"bf": np.array([0.5, -1.0], np.float32)})
    assert out["bf"].dtype == model["bf"].dtype and out["bf"].astype(np.float32).tolist() == [1.5, 1.0]


def test_client_downlink_retries_fallbacks_and_memory_bound() -> None:
    rng = np.random.default_rng(1)
    params = canonical({"w": rng.standard_normal(400).astype(np.float32)})
    dl = ClientDownlink("topk:0.1+q8", params, seed=0, max_clients=2)
    dl.advance(_drift(rng, params))
    first = dl.initial[0]
    _, _, t1, _ = dl.task_for("a", first, True)
    # "a" never answered: it still holds the initial model, and either tag gets a delta.
    kind, base, _, _ = dl.task_for("a", first, True)
    assert (kind, base) == ("delta", first)
    _, _, t2, _ = dl.task_for("a", first, True)
    assert dl.task_for("a", t2, True)[0] == "delta"
    # Unknown tags, no delta support, or no tag at all: the full model (then the exact global).
    for held, ok in ((b"\x01" * 16, True), (first, False), (None, True)):
        kind, base, tag, payloads = dl.task_for("b", held, ok)
        assert kind == "full" and base == bytes(16) and tag == dl.tag
        np.testing.assert_array_equal(decode(payloads[0])["w"], dl.params["w"])
    # At most two clients remembered: the least recently sampled is forgotten.
    dl.task_for("c", first, True)
    assert list(dl.models) == ["b", "c"]
    assert dl.task_for("a", t2, True)[0] == "full"
    with pytest.raises(ValueError, match="needs a downlink codec"):
        make_downlink(None, params, "client")
    with pytest.raises(ValueError, match="downlink mode"):
        make_downlink("q8", params, "lazy")


def test_client_downlink_survives_a_checkpoint(tmp_path) -> None:
    rng = np.random.default_rng(2)
    params = canonical({"w": rng.standard_normal(600).astype(np.float32), "n": np.array([3], np.int64)})
    dl = ClientDownlink("topk:0.1+q4+zstd", params, seed=6)
    dl.advance(_drift(rng, params))
    held = {c: dl.task_for(c, dl.initial[0], True)[2] for c in ("a", "b")}
    dl.confirm("a", held["a"])  # "b" has not answered yet: two models kept for it
    dl.advance(_drift(rng, dl.params))
    save_checkpoint(tmp_path, 2, dl.params, {}, dl)
    meta, saved, arrays = load_checkpoint(tmp_path)
    again = ClientDownlink("topk:0.1+q4+zstd", saved, seed=6)
    again.restore(meta["downlink"], arrays, list(saved))
    assert again.tag == dl.tag and again.version == dl.version and list(again.models) == list(dl.models)
    for c in ("a", "b"):
        assert dl.task_for(c, held[c], True)[3] == again.task_for(c, held[c], True)[3]


def test_server_lr_decay_follows_a_half_cosine() -> None:
    rounds, lr, floor = 11, 2.0, 0.1
    opt = ServerOptimizer(server_lr=lr, momentum=0.5, decay=floor, rounds=rounds)
    expected = [lr * (floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * t / (rounds - 1)))) for t in range(rounds)]
    assert [opt.lr(r) for r in range(1, rounds + 1)] == pytest.approx(expected)
    assert opt.lr(1) == pytest.approx(lr) and opt.lr(rounds) == pytest.approx(lr * floor)
    params, m, w = {"w": np.zeros(4, np.float32)}, np.zeros(4, np.float32), np.zeros(4, np.float32)
    rng = np.random.default_rng(2)
    for r in range(1, rounds + 1):
        g = rng.standard_normal(4).astype(np.float32)
        params = opt.step(params, {"w": g}, round=r)
        m = np.float32(0.5) * m + g
        w = w + np.float32(expected[r - 1]) * m
        np.testing.assert_allclose(params["w"], w, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="number of rounds"):
        ServerOptimizer(decay=0.1)
    with pytest.raises(ValueError, match="fraction"):
        ServerOptimizer(decay=1.5, rounds=3)


def test_server_momentum_survives_a_resume(tmp_path) -> None:
    """The checkpoint holds the momentum buffers, so a resumed server takes the same steps."""
    from fedpress.federation import Server

    params = {"w": np.arange(6, dtype=np.float32), "n": np.array(0, np.int64)}
    first = Server(
        "127.0.0.1",
        0,
        params,
        rounds=3,
        clients_per_round=1,
        token=b"t" * 32,
        out_dir=tmp_path,
        insecure=True,
        server_momentum=0.9,
    )
    first._prepare_state()
    first.params = first.optimizer.step(first.params, {"w": np.ones(6, np.float32), "n": np.array(0, np.int64)})
    first._checkpoint(1)
    second = Server(
        "127.0.0.1",
        0,
        params,
        rounds=3,
        clients_per_round=1,
        token=b"t" * 32,
        out_dir=tmp_path,
        insecure=True,
        server_momentum=0.9,
        resume=True,
    )
    second._prepare_state()
    assert second.round == 1
    np.testing.assert_array_equal(second.optimizer.buffers["w"], np.ones(6, np.float32))
    mean = {"w": np.full(6, 2.0, np.float32), "n": np.array(0, np.int64)}
    np.testing.assert_array_equal(
        second.optimizer.step(second.params, mean)["w"], first.optimizer.step(first.params, mean)["w"]
    )
