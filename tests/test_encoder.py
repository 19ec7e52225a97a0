"""fp.Encoder: error feedback, momentum correction and persisted state."""

from __future__ import annotations

import copy
import pickle

import fedpress as fp
import numpy as np
import pytest

HAVE_RHT = hasattr(fp.ops, "rht")
EF_SPECS = [
    "topk:0.01+q4",
    "randk:0.1+fp16",
    "sign",
    "q2",
    "topk:0.01",
    "topk:0.001+q4+zstd",
    pytest.param("rht+q2+zstd", marks=pytest.mark.skipif(not HAVE_RHT, reason="no ops.rht yet")),
]


def rounds(n_rounds: int, seed: int = 0, dtype=np.float32) -> list:
    """Updates of a small model: two float tensors and an integer one."""
    rng = np.random.default_rng(seed)
    out = []
    for t in range(n_rounds):
        out.append(
            {
                "conv": (rng.standard_t(3, (40, 50)) * 0.1).astype(dtype),
                "bias": (rng.standard_normal(300) * 0.01 + 0.001 * t).astype(dtype),
                "steps": np.array([t, 2 * t], np.int64),
            }
        )
    return out


# ------------------------------------------------------------ error feedback --
@pytest.mark.parametrize("spec", EF_SPECS)
def test_error_feedback_conserves_the_update(spec: str) -> None:
    """Nothing is lost: what was sent plus what is still owed equals what came in."""
    enc = fp.Encoder(spec, error_feedback=True)
    updates = rounds(6)
    sent = {k: np.zeros(v.shape, np.float64) for k, v in updates[0].items() if v.dtype.kind == "f"}
    for t, u in enumerate(updates):
        dec = fp.decode(enc.encode(u, seed=100 + t))
        np.testing.assert_array_equal(dec["steps"], u["steps"])
        for k in sent:
            sent[k] += dec[k]
    assert set(enc.residuals) == set(sent)
    for k in sent:
        total = sum(u[k].astype(np.float64) for u in updates)
        r = enc.residuals[k]
        assert r.dtype == np.float32 and r.shape == total.shape
        lhs = sent[k] + r
        np.testing.assert_allclose(lhs, total, rtol=1e-5, atol=1e-5 * np.abs(total).max())
    assert enc.rounds == len(updates)
    ref_norm = np.sqrt(sum(float(np.sum(r.astype(np.float64) ** 2)) for r in enc.residuals.values()))
    assert enc.residual_norm() == pytest.approx(ref_norm, rel=1e-5)


def test_error_feedback_sends_what_plain_top_k_drops() -> None:
    """Small entries that top-k never picks on their own go out once they have
    accumulated: every entry of a constant update is eventually sent."""
    x = np.linspace(0.5, 1.0, 1000).astype(np.float32)
    enc = fp.Encoder("topk:0.05")
    seen = np.zeros(x.size, bool)
    for t in range(40):
        seen |= fp.decode(enc.encode({"x": x}, seed=t))["x"] != 0
    assert seen.all()
    once = fp.decode(fp.Codec("topk:0.05").encode({"x": x}, seed=0))["x"] != 0
    assert once.sum() == 50


def test_first_round_equals_the_codec() -> None:
    u = rounds(1)[0]
    for spec in ("topk:0.01+q4", "sign", "randk:0.1+fp16"):
        assert fp.Encoder(spec).encode(u, seed=7) == fp.Codec(spec).encode(u, seed=7)


def test_without_error_feedback_no_residuals() -> None:
    enc = fp.Encoder("topk:0.01+q4", error_feedback=False)
    for t, u in enumerate(rounds(4)):
        payload = enc.encode(u, seed=t)
        assert payload == fp.Codec("topk:0.01+q4").encode(u, seed=t)  # stateless: the codec alone
    assert enc.residuals == {}
    assert enc.state_dict()["residuals"] == {}
    assert enc.residual_norm() == 0.0


def test_codec_options_pass_through() -> None:
    u = rounds(1)[0]
    a = fp.Encoder("topk:0.01", per_tensor=True).encode(u, seed=1)
    assert a == fp.Codec("topk:0.01", per_tensor=True).encode(u, seed=1)
    assert a != fp.Codec("topk:0.01").encode(u, seed=1)


def test_integer_tensors_pass_through() -> None:
    enc = fp.Encoder("topk:0.01+q2", momentum=0.9)
    for t in range(3):
        u = {
            "w": np.ones(100, np.float32) * t,
            "ids": np.arange(7, dtype=np.int32) * t,
            "mask": np.array([t % 2 == 0, True]),
            "count": np.array(2**40 + t, np.uint64),
        }
        dec = fp.decode(enc.encode(u, seed=t))
        for k in ("ids", "mask", "count"):
            assert dec[k].dtype == u[k].dtype and dec[k].shape == u[k].shape
            np.testing.assert_array_equal(dec[k], u[k])
    assert set(enc.residuals) == {"w"}
    assert set(enc.velocities) == {"w"}


def test_encoder_keeps_float_dtypes() -> None:
    """Payloads from an Encoder decode like the Codec's: names, shapes and dtypes
    of the update (float64 and float16 tensors stay float64 and float16)."""
    u = {
        "w64": np.linspace(-1, 1, 200),
        "h16": np.linspace(-1, 1, 50).astype(np.float16),
        "f32": np.linspace(-1, 1, 30).astype(np.float32),
    }
    for spec in ("fp32", "topk:0.1+q8"):
        dec = fp.decode(fp.Encoder(spec).encode(u, seed=1))
        codec_dec = fp.decode(fp.Codec(spec).encode(u, seed=1))
        assert {k: v.dtype for k, v in dec.items()} == {k: v.dtype for k, v in u.items()}
        assert {k: v.dtype for k, v in codec_dec.items()} == {k: v.dtype for k, v in u.items()}
        assert [t["dtype"] for t in fp.inspect(fp.Encoder(spec).encode(u, seed=1))["tensors"]] == [
            "float64",
            "float16",
            "float32",
        ]


def test_encoder_accepts_torch() -> None:
    torch = pytest.importorskip("torch")
    enc = fp.Encoder("topk:0.1+q8")
    w = torch.randn(20, 30, generator=torch.Generator().manual_seed(0), requires_grad=True)
    dec = fp.decode(enc.encode({"w": w, "b": w.detach()[:, ::2], "n": torch.tensor(3)}, seed=0))
    assert dec["w"].shape == (20, 30) and dec["b"].shape == (20, 15) and dec["n"] == 3
    assert set(enc.residuals) == {"w", "b"}


def test_encoder_type_errors() -> None:
    with pytest.raises(TypeError):
        fp.Encoder("q8").encode([("a", np.zeros(2))])  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        fp.Encoder("q9")


# ------------------------------------------------------------------- momentum --
def test_momentum_runs_and_differs() -> None:
    updates = rounds(4)
    plain, mom = fp.Encoder("topk:0.01+q4"), fp.Encoder("topk:0.01+q4", momentum=0.9)
    outs = [(plain.encode(u, seed=t), mom.encode(u, seed=t)) for t, u in enumerate(updates)]
    assert outs[0][0] == outs[0][1]  # no history yet
    assert any(a != b for a, b in outs[1:])
    assert set(mom.velocities) == {"conv", "bias"}
    assert plain.velocities == {}
    for _a, b in outs:
        assert set(fp.decode(b)) == {"conv", "bias", "steps"}


def test_momentum_matches_a_numpy_reference() -> None:
    """Momentum correction as documented (DGC): v = m*v + g; compress v plus the
    residual; entries that went out stop carrying velocity."""
    m, ratio = 0.9, 0.02
    rng = np.random.default_rng(3)
    enc = fp.Encoder(f"topk:{ratio}", momentum=m)
    n = 2000
    k = int(round(ratio * n))
    v = np.zeros(n, np.float32)
    r = np.zeros(n, np.float32)
    for t in range(6):
        g = rng.standard_normal(n).astype(np.float32)
        v = v * np.float32(m) + g if t else g.copy()
        acc = v + r
        keep = np.argsort(-np.abs(acc), kind="stable")[:k]
        sent_ref = np.zeros(n, np.float32)
        sent_ref[keep] = acc[keep]
        r = acc - sent_ref
        v[keep] = 0
        sent = fp.decode(enc.encode({"g": g}, seed=t))["g"]
        np.testing.assert_allclose(sent, sent_ref, rtol=1e-6, atol=1e-6)
        np.testing.assert_allclose(enc.residuals["g"], r, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(enc.velocities["g"], v, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("momentum", [-0.1, 1.0, 1.5, float("nan"), float("inf")])
def test_invalid_momentum(momentum: float) -> None:
    with pytest.raises(ValueError):
        fp.Encoder("topk:0.01", momentum=momentum)


def test_zero_momentum_is_allowed() -> None:
    u = rounds(2)
    a, b = fp.Encoder("topk:0.01+q4", momentum=0.0), fp.Encoder("topk:0.01+q4")
    for t in range(2):
        assert a.encode(u[t], seed=t) == b.encode(u[t], seed=t)


# ---------------------------------------------------------------------- state --
@pytest.mark.parametrize("momentum", [None, 0.9])
@pytest.mark.parametrize("spec", ["topk:0.01+q4", "randk:0.1+fp16", "sign+zstd"])
def test_state_dict_round_trip_continues_identically(spec: str, momentum) -> None:
    updates = rounds(7, seed=5)
    never_restarted = fp.Encoder(spec, momentum=momentum)
    first = fp.Encoder(spec, momentum=momentum)
    for t in range(3):
        assert never_restarted.encode(updates[t], seed=t) == first.encode(updates[t], seed=t)
    state = pickle.loads(pickle.dumps(first.state_dict()))
    assert state["spec"] == str(fp.parse_spec(spec))
    for k, r in first.residuals.items():
        np.testing.assert_array_equal(state["residuals"][k], r)
    restored = fp.Encoder(spec, momentum=momentum)
    restored.load_state_dict(state)
    # the state is copied in and out: later changes to either side do not leak
    for arr in list(state["residuals"].values()) + list(state["velocities"].values()):
        arr += 1000
    for t in range(3, 7):
        assert restored.encode(updates[t], seed=t) == never_restarted.encode(updates[t], seed=t), f"round {t}"
    for k in never_restarted.residuals:
        np.testing.assert_array_equal(restored.residuals[k], never_restarted.residuals[k])
    assert restored.rounds == never_restarted.rounds == 7


def test_state_dict_is_a_copy() -> None:
    enc = fp.Encoder("topk:0.01+q4")
    enc.encode(rounds(1)[0], seed=0)
    state = enc.state_dict()
    before = copy.deepcopy(enc.residuals)
    for r in state["residuals"].values():
        r[...] = 12345
    for k in before:
        np.testing.assert_array_equal(enc.residuals[k], before[k])


def test_residuals_of_a_model_share_one_allocation_and_a_new_shape_gets_its_own() -> None:
    """The residuals are made together, views of one buffer (huge pages for a large model,
    where an array per tensor faults 4 KiB at a time); a tensor whose shape changes gets a
    fresh zero residual and the others keep what they hold."""
    enc = fp.Encoder("topk:0.05+q4")
    first, second = rounds(2)
    enc.encode(first, seed=1)
    assert sorted(enc.residuals) == ["bias", "conv"]
    assert all(r.base is not None for r in enc.residuals.values())
    assert len({id(r.base) for r in enc.residuals.values()}) == 1
    for name, r in enc.residuals.items():
        assert r.shape == first[name].shape and r.dtype == np.float32 and r.flags.writeable
    kept = enc.residuals["bias"].copy()
    assert np.any(kept != 0)
    changed = dict(second, conv=second["conv"].reshape(50, 40)[:25])
    payload = enc.encode(changed, seed=2)
    assert enc.residuals["conv"].shape == (25, 40)
    got = fp.decode(payload)
    # conv's residual started from zero: what it holds plus what was sent is this round's update.
    np.testing.assert_allclose(enc.residuals["conv"] + got["conv"], changed["conv"], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(enc.residuals["bias"] + got["bias"], kept + second["bias"], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("per_tensor", [False, True])
def test_a_failed_encode_leaves_no_new_residual(per_tensor: bool) -> None:
    """An encode that fails puts back the residuals it made: a tensor seen for the first
    time has none afterwards, and one whose shape changed keeps its old residual."""
    rng = np.random.default_rng(12)
    enc = fp.Encoder("topk:0.05+q4", per_tensor=per_tensor)
    enc.encode({"a": rng.standard_normal(500).astype(np.float32)}, seed=1)
    kept = enc.residuals["a"].copy()
    bad = {
        "a": rng.standard_normal((10, 20)).astype(np.float32),  # a new shape
        "b": rng.standard_normal(300).astype(np.float32),  # a new tensor
    }
    bad["b"][7] = np.nan
    with pytest.raises(ValueError, match="tensor 'b' holds NaN"):
        enc.encode(bad, seed=2)
    assert sorted(enc.residuals) == ["a"] and enc.residuals["a"].shape == (500,)
    np.testing.assert_array_equal(enc.residuals["a"], kept)


@pytest.mark.parametrize("error_feedback", [True, False])
def test_a_nan_update_does_not_stay_in_the_momentum(error_feedback: bool) -> None:
    """A failed encode puts the velocities back: a NaN update is refused once, and the
    encoder goes on from where it was (it used to keep the NaN and fail every later encode)."""
    data = rounds(3, seed=4)
    enc = fp.Encoder("topk:0.05+q4", momentum=0.9, error_feedback=error_feedback)
    twin = fp.Encoder("topk:0.05+q4", momentum=0.9, error_feedback=error_feedback)
    for e in (enc, twin):
        e.encode(data[0], seed=1)
    bad = dict(data[1], conv=data[1]["conv"].copy())
    bad["conv"][3, 4] = np.nan
    with pytest.raises(ValueError, match="tensor 'conv' holds NaN"):
        enc.encode(bad, seed=2)
    for name in twin.velocities:
        np.testing.assert_array_equal(enc.velocities[name], twin.velocities[name])
    assert enc.encode(data[2], seed=3) == twin.encode(data[2], seed=3)


@pytest.mark.parametrize("error_feedback", [True, False])
def test_a_nan_in_any_tensor_leaves_every_velocity_exactly(error_feedback: bool) -> None:
    """Every update is checked before the first velocity is stepped (in place): a NaN in
    the last tensor leaves the first's velocity, and the residuals, bit for bit."""
    rng = np.random.default_rng(31)
    enc = fp.Encoder("topk:0.05+q4", momentum=0.9, error_feedback=error_feedback, clip=50.0)
    first = {"a": rng.standard_normal(700).astype(np.float32), "b": rng.standard_normal(300).astype(np.float64)}
    enc.encode(first, seed=1)
    before = copy.deepcopy(enc.state_dict())
    bad = {"a": rng.standard_normal(700).astype(np.float32), "b": rng.standard_normal(300)}
    bad["b"][-1] = np.inf
    with pytest.raises(ValueError, match="tensor 'b' holds NaN or infinity"):
        enc.encode(bad, seed=2)
    after = enc.state_dict()
    for kind in ("velocities", "residuals"):
        assert after[kind].keys() == before[kind].keys()
        for name, value in before[kind].items():
            np.testing.assert_array_equal(after[kind][name], value, err_msg=f"{kind}[{name!r}]")


@pytest.mark.parametrize("error_feedback", [True, False])
@pytest.mark.parametrize("momentum", [0.0, 0.5, 0.001])
@pytest.mark.parametrize("clip", [None, 0.5])
def test_a_failure_after_the_velocity_step_leaves_it_exactly(monkeypatch, error_feedback, momentum, clip) -> None:
    """A failure once the update has gone into the state (here the codec raising): the
    velocities come back bit for bit (with error feedback the step waits for the payload;
    without, the new velocity is a new array and the old one is put back), the residuals to
    within a rounding, and the encoder goes on."""
    rng = np.random.default_rng(32)
    enc = fp.Encoder("topk:0.1+q8", momentum=momentum, clip=clip, error_feedback=error_feedback)
    ups = [{"w": rng.standard_normal(5000).astype(np.float32), "b": rng.standard_normal(40).astype(np.float32)}]
    ups.append({k: (rng.standard_normal(v.shape) * 1e3).astype(np.float32) for k, v in ups[0].items()})
    enc.encode(ups[0], seed=1)
    before = copy.deepcopy(enc.state_dict())

    def broken(*args, **kwargs):
        raise RuntimeError("the link went down")

    monkeypatch.setattr(enc.codec, "encode", broken)
    with pytest.raises(RuntimeError, match="link went down"):
        enc.encode(ups[1], seed=2)
    monkeypatch.undo()
    for name, v in before["velocities"].items():
        np.testing.assert_array_equal(enc.velocities[name], v, err_msg=name)
    for name, r in before["residuals"].items():
        np.testing.assert_allclose(enc.residuals[name], r, rtol=1e-5, atol=1e-3)
    assert fp.decode(enc.encode(ups[1], seed=2)).keys() == ups[1].keys()


@pytest.mark.parametrize("momentum", [None, 0.9])
def test_a_failure_between_parts_takes_back_only_what_went_in(monkeypatch, momentum) -> None:
    """The residual takes a clipped (or momentum) update a part at a time: a failure after
    the first part takes back that part only, not the parts never added."""
    from fedpress import encoder as encoder_module

    n = 3 * encoder_module._PART
    rng = np.random.default_rng(34)
    enc = fp.Encoder("topk:0.01", momentum=momentum, clip=1.0)
    enc.encode({"w": rng.standard_normal(n).astype(np.float32)}, seed=1)
    before = enc.residuals["w"].copy()
    original = encoder_module._float32_parts
    calls = []
    target = 1 if momentum is None else 2  # (with momentum, the finiteness check comes first)

    def failing(*args, **kwargs):
        calls.append(1)
        mine = len(calls)
        for i, item in enumerate(original(*args, **kwargs)):
            if mine == target and i == 1:  # the residual's step, as its second part comes
                raise MemoryError("no room for a part")
            yield item

    monkeypatch.setattr(encoder_module, "_float32_parts", failing)
    update = {"w": rng.standard_normal(n).astype(np.float32)}
    with pytest.raises(MemoryError):
        enc.encode(update, seed=2)
    monkeypatch.undo()
    assert len(calls) == target + 1  # the step, then its undo
    np.testing.assert_allclose(enc.residuals["w"], before, rtol=1e-5, atol=1e-6)


def test_a_velocity_from_a_fortran_ordered_update_keeps_stepping() -> None:
    """A velocity made from an update in any memory order is C-ordered state, stepped and
    masked in place every round (one made F-ordered was never stepped again)."""
    rng = np.random.default_rng(35)
    for error_feedback in (True, False):
        enc = fp.Encoder("topk:0.1", momentum=0.9, error_feedback=error_feedback)
        twin = fp.Encoder("topk:0.1", momentum=0.9, error_feedback=error_feedback)
        for t in range(3):
            g = rng.standard_normal((50, 40)).astype(np.float32)
            a = enc.encode({"w": np.asfortranarray(g)}, seed=t)
            b = twin.encode({"w": g}, seed=t)
            assert a == b
            np.testing.assert_array_equal(enc.velocities["w"], twin.velocities["w"])
            assert enc.velocities["w"].flags.c_contiguous


def test_momentum_and_clipping_step_large_updates_a_part_at_a_time() -> None:
    """The velocity, the clipped residual and the clip norm are computed a part at a time
    (no whole copy of the update): the same values as whole-array numpy arithmetic."""
    from fedpress import encoder as encoder_module

    rng = np.random.default_rng(33)
    n = 3 * encoder_module._PART + 123  # several parts and a partial one
    ups = [rng.standard_normal(n).astype(np.float32) for _ in range(2)]
    enc = fp.Encoder("topk:0.01", momentum=0.9, clip=100.0)
    v = np.zeros(n, np.float32)
    r = np.zeros(n, np.float32)
    for t, g in enumerate(ups):
        norm = np.sqrt(np.sum(g.astype(np.float64) ** 2))
        scaled = g * np.float32(100.0 / norm)
        v = v * np.float32(0.9) + scaled if t else scaled.copy()
        acc = r + v
        sent = fp.decode(enc.encode({"w": g}, seed=t))["w"]
        np.testing.assert_array_equal(enc.velocities["w"][sent == 0], v[sent == 0])
        r = acc - sent
        v[sent != 0] = 0.0
        np.testing.assert_array_equal(enc.residuals["w"], r)


def test_load_state_dict_different_spec() -> None:
    enc = fp.Encoder("topk:0.01+q4")
    enc.encode(rounds(1)[0], seed=0)
    state = enc.state_dict()
    for other in ("topk:0.02+q4", "topk:0.01+q8", "randk:0.01+q4", "topk:0.01+q4+zstd"):
        with pytest.raises(ValueError):
            fp.Encoder(other).load_state_dict(state)
    # the same spec written differently is the same spec
    fp.Encoder("topk:0.010+q4").load_state_dict(state)


def test_load_state_dict_ratio_differs_in_the_seventh_digit() -> None:
    state = fp.Encoder("topk:0.1234567").state_dict()
    with pytest.raises(ValueError):
        fp.Encoder("topk:0.1234568").load_state_dict(state)


# ------------------------------------------------- fused error-feedback top-k --
@pytest.mark.parametrize("spec", ["topk:0.01+q4+zstd", "topk:0.05+fp16", "topk:0.02+eden3", "topk:0.01+sign"])
def test_fused_error_feedback_equals_the_definition(spec: str) -> None:
    """The fused path (ef_topk, then an O(k) correction for the rounding of what was
    sent) keeps exactly residual = (residual + update) - what the receiver decodes."""
    rng = np.random.default_rng(7)
    enc = fp.Encoder(spec)
    residual = np.zeros(50_000, np.float32)
    for r in range(4):
        u = rng.standard_normal(50_000).astype(np.float32)
        payload = enc.encode({"w": u}, seed=r)
        meant = residual + u
        residual = meant - fp.decode(payload)["w"]
        np.testing.assert_array_equal(enc.residuals["w"], residual)
        # what the codec alone sends for the same vector and seed: the same bytes
        assert payload == fp.Codec(spec).encode({"w": meant}, seed=r)


@pytest.mark.parametrize("per_tensor", [True, False])
@pytest.mark.parametrize("momentum", [None, 0.5])
def test_every_path_keeps_the_definition(per_tensor: bool, momentum) -> None:
    """per_tensor top-k runs fused per tensor; a global top-k over two tensors, and
    momentum, take the general path: every one keeps residual = meant - decoded."""
    rng = np.random.default_rng(8)
    enc = fp.Encoder("topk:0.02+q8", momentum=momentum, per_tensor=per_tensor)
    residual = {"a": np.zeros(3000, np.float32), "b": np.zeros(200, np.float32)}
    velocity = {"a": np.zeros(3000, np.float32), "b": np.zeros(200, np.float32)}
    for r in range(3):
        u = {"a": rng.standard_normal(3000).astype(np.float32), "b": rng.standard_normal(200).astype(np.float32)}
        payload = enc.encode(u, seed=r)
        decoded = fp.decode(payload)
        for name in u:
            g = u[name]
            if momentum is not None:
                velocity[name] = np.float32(momentum) * velocity[name] + g if r else g.copy()
                g = velocity[name].copy()
                velocity[name][decoded[name] != 0] = 0.0
            meant = residual[name] + g
            residual[name] = meant - decoded[name]
            np.testing.assert_array_equal(enc.residuals[name], residual[name])


@pytest.mark.parametrize(
    "spec", ["q4", "q8+zstd", "sign", "eden4", "eden2:mse", "int8", "fp16", "bf16", "fp32", "rht+q4", "q2"]
)
def test_dense_specs_take_the_payload_out_of_the_residual(spec: str) -> None:
    """Without a sparsifier, the residual loses what the receiver decodes, taken from the
    payload into the residual in place (no decoded copy): residual = meant - decoded, bit
    for bit, round after round, with the value section written in place by the codec (the
    payload is the codec's own for the same input and seed)."""
    rng = np.random.default_rng(40)
    enc = fp.Encoder(spec, rht_block=1024)
    residual = {"a": np.zeros((30, 70), np.float32), "b": np.zeros(17, np.float32)}
    for r in range(3):
        u = {"a": rng.standard_normal((30, 70)).astype(np.float32), "b": rng.standard_normal(17).astype(np.float32)}
        u["steps"] = np.array(r)
        meant = {name: residual[name] + u[name] for name in residual}
        payload = enc.encode(u, seed=r)
        assert payload == fp.Codec(spec, rht_block=1024).encode({**meant, "steps": u["steps"]}, seed=r)
        decoded = fp.decode(payload)
        for name in residual:
            residual[name] = meant[name] - decoded[name]
            np.testing.assert_array_equal(enc.residuals[name], residual[name], err_msg=f"round {r}, {name}")


def test_a_payload_beyond_a_receivers_limits_is_still_taken_out() -> None:
    """A constant float64 tensor under zstd expands past what a receiver accepts from an
    untrusted payload (DEFAULT_LIMITS' max_expansion): the encoder reads its own payload
    back all the same (the frozen layer of a real model; pages of zeros, never written)."""
    z = {"w": np.zeros(1 << 25)}
    enc = fp.Encoder("sign+zstd")
    payload = enc.encode(z, seed=1)
    with pytest.raises(fp.DecodeError, match="declares"):
        fp.decode(payload)
    enc.encode(z, seed=2)
    assert enc.rounds == 2 and not enc.residuals["w"].any()


@pytest.mark.parametrize("spec", ["randk:0.01", "randk:0.05+q4", "randk:0.2:shared+int8"])
def test_randk_refuses_a_nan_it_would_not_send(spec: str) -> None:
    """random-k reads only the entries it keeps; a NaN elsewhere is refused all the same,
    by name, before it enters the residual (where it would fail a later round at random)."""
    rng = np.random.default_rng(45)
    enc = fp.Encoder(spec)
    kw = {"rotation_seed": 9} if ":shared" in spec else {}
    enc.encode({"w": rng.standard_normal(4000).astype(np.float32)}, seed=1, **kw)
    before = enc.residuals["w"].copy()
    bad = rng.standard_normal(4000).astype(np.float32)
    bad[1234] = np.nan
    with pytest.raises(ValueError, match="tensor 'w' holds NaN"):
        enc.encode({"w": bad}, seed=2, **kw)
    np.testing.assert_array_equal(enc.residuals["w"], before)
    assert np.isfinite(fp.decode(enc.encode({"w": np.zeros(4000, np.float32)}, seed=3, **kw))["w"]).all()


@pytest.mark.parametrize("spec", ["q4", "fp16"])
def test_an_interrupt_as_the_payload_is_taken_out_puts_it_back(monkeypatch, spec: str) -> None:
    """An interrupt raised as (or right after) the payload is taken out of the residuals,
    a Ctrl-C that arrives during the kernel: the take-out is put back before the update is
    taken out, and the residuals are as they were."""
    from fedpress import encoder as encoder_module

    rng = np.random.default_rng(44)
    enc = fp.Encoder(spec)
    enc.encode({"w": rng.standard_normal(3000).astype(np.float32)}, seed=1)
    before = enc.residuals["w"].copy()
    original = encoder_module.prepare_accumulation

    def interrupted(*args, **kwargs):
        add = original(*args, **kwargs)

        def add_then_interrupt() -> None:
            add()
            raise KeyboardInterrupt

        return add_then_interrupt

    monkeypatch.setattr(encoder_module, "prepare_accumulation", interrupted)
    with pytest.raises(KeyboardInterrupt):
        enc.encode({"w": rng.standard_normal(3000).astype(np.float32)}, seed=2)
    np.testing.assert_allclose(enc.residuals["w"], before, rtol=1e-5, atol=1e-6)
    assert enc.rounds == 1


def test_randk_refuses_a_residual_that_overflows() -> None:
    """Finite updates whose sum overflows the residual: refused the round it happens, by
    name, the overflowed entry zeroed (all that can be said of it) and the rest kept."""
    enc = fp.Encoder("randk:0.05+fp32")
    u = np.zeros(1000, np.float32)
    u[7] = 3e38
    enc.encode({"a": u}, seed=1)  # entry 7 most likely kept back in the residual
    while enc.residuals["a"][7] == 0:  # (until a round keeps it back)
        enc.encode({"a": u}, seed=enc.rounds + 1)
    with pytest.raises(ValueError, match="tensor 'a': the update plus what earlier rounds did not send overflows"):
        for seed in range(100, 110):  # until it is not sent, and the sum overflows
            enc.encode({"a": u}, seed=seed)
            assert np.isfinite(enc.residuals["a"]).all()
    assert np.isfinite(enc.residuals["a"]).all()


def test_dense_take_out_checks_and_names_its_arguments() -> None:
    from fedpress.format import accumulate

    rng = np.random.default_rng(43)
    u = {"s": rng.standard_normal(100).astype(np.float32), "t": rng.standard_normal(50).astype(np.float32)}
    payload = fp.Codec("q4").encode(u, seed=1)
    accs = {name: np.zeros(v.size, np.float32) for name, v in u.items()}
    frozen = np.zeros(50, np.float32)
    frozen.setflags(write=False)
    for bad, error, match in [
        ({"s": accs["s"], "t": frozen}, ValueError, r"accs\['t'\] is read-only"),
        ({"s": accs["s"], "t": accs["s"][:50]}, ValueError, r"accs\['t'\] shares memory with accs\['s'\]"),
        ([accs["s"]], TypeError, "accs must be a mapping"),
    ]:
        with pytest.raises(error, match=match):
            accumulate(payload, bad)
    writable = bytearray(fp.Codec("fp32").encode(u, seed=1))  # a sum inside the payload itself
    with pytest.raises(ValueError, match=r"accs\['s'\] shares memory with the payload"):
        accumulate(writable, {"s": np.frombuffer(writable, np.float32, 100)})
    for weight, error in [
        (True, TypeError),
        ("1", TypeError),
        (float("nan"), ValueError),
        (float("inf"), ValueError),
        (1e39, ValueError),  # finite in float64, not in float32
        (10**400, ValueError),
    ]:
        with pytest.raises(error, match="weight"):
            accumulate(payload, accs, weight)
    assert not any(a.any() for a in accs.values())


@pytest.mark.parametrize("n", [100, 300_000])
def test_a_failed_encode_takes_its_update_back_out(n: int) -> None:
    """A NaN in the update raises a one-line error naming the tensor; the residual is
    what it was (to a rounding), and zero where the update was not finite."""
    rng = np.random.default_rng(9)
    enc = fp.Encoder("topk:0.01+q4+zstd")
    enc.encode({"w": rng.standard_normal(n).astype(np.float32)}, seed=1)
    before = enc.residuals["w"].copy()
    bad = rng.standard_normal(n).astype(np.float32)
    bad[n // 2] = np.nan
    with pytest.raises(ValueError, match="tensor 'w' holds NaN"):
        enc.encode({"w": bad}, seed=2)
    after = enc.residuals["w"]
    assert after[n // 2] == 0 and np.isfinite(after).all()
    keep = np.arange(n) != n // 2
    np.testing.assert_allclose(after[keep], before[keep], rtol=0, atol=1e-6)
    assert enc.rounds == 1
    enc.encode({"w": rng.standard_normal(n).astype(np.float32)}, seed=3)  # and it goes on
