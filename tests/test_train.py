"""fedpress.train: data sets, IDX parsing, client partitions, models, training loops, FedAvg."""

from __future__ import annotations

import gzip
import struct
import subprocess
import sys
from pathlib import Path

import fedpress.train as ft
import numpy as np
import pytest
from fedpress.train import loops as ft_loops

REPO = Path(__file__).resolve().parents[1]
MNIST_DIR = REPO.parent / "shared" / "data" / "mnist"
HAVE_MNIST = (MNIST_DIR / "t10k-images-idx3-ubyte.gz").is_file() and (MNIST_DIR / "t10k-labels-idx1-ubyte.gz").is_file()
needs_mnist = pytest.mark.skipif(not HAVE_MNIST, reason=f"MNIST files not found in {MNIST_DIR}")


def _torch():
    return pytest.importorskip("torch")


def _sklearn():
    return pytest.importorskip("sklearn")


@pytest.fixture(scope="module")
def digits():
    _sklearn()
    return ft.load_digits(seed=0)


# ------------------------------------------------------------------ imports --
def test_import_fedpress_does_not_import_torch_or_sklearn():
    code = (
        "import sys, fedpress, fedpress.train\n"
        "bad = [m for m in ('torch', 'sklearn') if m in sys.modules]\n"
        "assert not bad, bad\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=REPO)


def test_missing_extra_gives_clear_import_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "torch", None)
    with pytest.raises(ImportError, match=r"pip install 'fedpress\[train\]'"):
        ft.make_model("digits")
    monkeypatch.setitem(sys.modules, "sklearn.datasets", None)
    with pytest.raises(ImportError, match=r"pip install 'fedpress\[train\]'"):
        ft.load_digits()


# ------------------------------------------------------------------- digits --
def test_digits_shapes_ranges_and_split(digits):
    train, test = digits
    assert (len(train), len(test)) == (1438, 359)
    for d in (train, test):
        assert d.x.dtype == np.float32 and d.x.shape == (len(d), 1, 8, 8)
        assert d.y.dtype == np.int64 and d.y.shape == (len(d),)
        assert d.num_classes == 10 and d.name == "digits"
        assert d.x.min() == 0.0 and d.x.max() == 1.0
    # stratified: every class is ~20% in the test set
    frac = test.class_counts() / (train.class_counts() + test.class_counts())
    assert np.all(np.abs(frac - 0.2) < 0.02)
    # the two sets are disjoint and together are the whole data set
    sk = pytest.importorskip("sklearn.datasets").load_digits()
    full = np.concatenate([train.x, test.x]).reshape(1797, -1)
    ref = (sk.images.reshape(1797, -1) / 16.0).astype(np.float32)
    key = lambda a: sorted(map(bytes, a))  # noqa: E731
    assert key(full) == key(ref)


def test_digits_deterministic_and_seeded(digits):
    train, test = digits
    train2, test2 = ft.load_digits(seed=0)
    assert np.array_equal(train.x, train2.x) and np.array_equal(test.y, test2.y)
    train3, _ = ft.load_digits(seed=1)
    assert not np.array_equal(train.y, train3.y)
    small_train, small_test = ft.load_digits(test_fraction=0.5, seed=0, limit=100)
    assert (len(small_train), len(small_test)) == (50, 50)


def test_stratified_split_exact_sizes():
    labels = np.repeat(np.arange(3), [7, 11, 13])
    for frac in (0.1, 0.25, 0.5, 0.9):
        tr, te = ft.stratified_split(labels, frac, seed=3)
        assert len(te) == round(len(labels) * frac)
        assert np.array_equal(np.sort(np.concatenate([tr, te])), np.arange(len(labels)))
    with pytest.raises(ValueError, match="test_fraction"):
        ft.stratified_split(labels, 1.0, seed=0)


def test_dataset_validates():
    x = np.zeros((4, 1, 2, 2), np.float64)
    d = ft.Dataset(x, [0, 1, 2, 1], 3, "toy")
    assert d.x.dtype == np.float32 and d.y.dtype == np.int64 and len(d) == 4
    assert np.array_equal(d.subset([1, 3]).y, [1, 1])
    with pytest.raises(ValueError, match="N, C, H, W"):
        ft.Dataset(np.zeros((4, 4)), np.zeros(4), 3, "toy")
    with pytest.raises(ValueError, match="shape"):
        ft.Dataset(x, np.zeros(3), 3, "toy")
    with pytest.raises(ValueError, match="labels"):
        ft.Dataset(x, [0, 1, 2, 3], 3, "toy")


# -------------------------------------------------------------------- MNIST --
@needs_mnist
def test_mnist_real_files():
    train, test = ft.load_mnist_idx(MNIST_DIR, seed=0)
    assert (len(train), len(test)) == (8000, 2000)
    for d in (train, test):
        assert d.x.dtype == np.float32 and d.x.shape[1:] == (1, 28, 28)
        assert d.y.dtype == np.int64 and d.name == "mnist" and d.num_classes == 10
        assert d.x.min() == 0.0 and d.x.max() == 1.0
        assert np.all(d.class_counts() > 0.08 * len(d))
    total = train.class_counts() + test.class_counts()
    assert total.sum() == 10000 and total[1] == 1135  # the t10k label histogram
    train2, test2 = ft.load_task("mnist", data_dir=MNIST_DIR, seed=0)
    assert np.array_equal(train.y, train2.y) and np.array_equal(test.x, test2.x)
    small_train, small_test = ft.load_mnist_idx(MNIST_DIR, limit=500, seed=1)
    assert (len(small_train), len(small_test)) == (400, 100)


@needs_mnist
def test_load_task_mnist_default_dir(monkeypatch):
    monkeypatch.chdir(REPO)
    train, test = ft.load_task("mnist")
    assert (len(train), len(test)) == (8000, 2000)


def _idx_images(images: np.ndarray, magic: int = 2051) -> bytes:
    n, h, w = images.shape
    return struct.pack(">IIII", magic, n, h, w) + images.astype(np.uint8).tobytes()


def _idx_labels(labels: np.ndarray, magic: int = 2049) -> bytes:
    return struct.pack(">II", magic, len(labels)) + labels.astype(np.uint8).tobytes()


def _write(path: Path, data: bytes) -> None:
    path.write_bytes(gzip.compress(data) if path.suffix == ".gz" else data)


def _fake(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    return rng.integers(0, 256, (n, 28, 28), dtype=np.uint8), np.arange(n, dtype=np.uint8) % 10


@pytest.mark.parametrize("ext", ["", ".gz"])
def test_mnist_small_idx_files(tmp_path, ext):
    images, labels = _fake(50, 0)
    _write(tmp_path / f"t10k-images-idx3-ubyte{ext}", _idx_images(images))
    _write(tmp_path / f"t10k-labels-idx1-ubyte{ext}", _idx_labels(labels))
    train, test = ft.load_mnist_idx(tmp_path, test_fraction=0.2, seed=0)
    assert (len(train), len(test)) == (40, 10)
    assert train.x.shape == (40, 1, 28, 28) and train.x.dtype == np.float32
    # every example is an original image with its label, scaled by 1/255
    x = np.concatenate([train.x, test.x])
    y = np.concatenate([train.y, test.y])
    back = np.rint(x[:, 0] * 255).astype(np.uint8)
    order = {bytes(img): i for i, img in enumerate(images)}
    idx = np.array([order[bytes(img)] for img in back])
    assert np.array_equal(np.sort(idx), np.arange(50)) and np.array_equal(y, labels[idx])
    assert np.array_equal(test.class_counts(), np.ones(10))  # stratified
    # with train-* present: train files are the training set, t10k the test set
    tr_images, tr_labels = _fake(30, 1)
    _write(tmp_path / f"train-images-idx3-ubyte{ext}", _idx_images(tr_images))
    _write(tmp_path / f"train-labels-idx1-ubyte{ext}", _idx_labels(tr_labels))
    train, test = ft.load_mnist_idx(tmp_path)
    assert (len(train), len(test)) == (30, 50)
    assert np.array_equal(train.y, tr_labels) and np.array_equal(test.y, labels)
    assert np.allclose(train.x[:, 0] * 255, tr_images)
    train, test = ft.load_mnist_idx(tmp_path, limit=20)
    assert (len(train), len(test)) == (20, 20)


def _corrupt_cases():
    images, labels = _fake(20, 0)
    good_i, good_l = _idx_images(images), _idx_labels(labels)
    return {
        "bad image magic": (_idx_images(images, magic=2049), good_l, "magic"),
        "bad label magic": (good_i, _idx_labels(labels, magic=2051), "magic"),
        "truncated images": (good_i[:-100], good_l, "truncated"),
        "truncated header": (good_i[:10], good_l, "truncated"),
        "trailing bytes": (good_i + b"\0", good_l, "trailing"),
        "count mismatch": (good_i, _idx_labels(labels[:19]), "19 labels"),
        "wrong dims": (_idx_images(images.reshape(20, 28, 28)[:, :27, :]), good_l, "27x28"),
        "zero items": (_idx_images(images[:0]), _idx_labels(labels[:0]), "no items"),
        "label out of range": (good_i, _idx_labels(labels + 1), "label 10"),
    }


@pytest.mark.parametrize("ext", ["", ".gz"])
@pytest.mark.parametrize("case", list(_corrupt_cases()))
def test_mnist_corrupt_files(tmp_path, case, ext):
    img, lab, message = _corrupt_cases()[case]
    _write(tmp_path / f"t10k-images-idx3-ubyte{ext}", img)
    _write(tmp_path / f"t10k-labels-idx1-ubyte{ext}", lab)
    with pytest.raises(ValueError, match=message):
        ft.load_mnist_idx(tmp_path)


def test_mnist_bad_gzip_and_missing_files(tmp_path):
    images, labels = _fake(20, 0)
    gz = gzip.compress(_idx_images(images))
    (tmp_path / "t10k-images-idx3-ubyte.gz").write_bytes(gz[: len(gz) // 2])  # truncated stream
    (tmp_path / "t10k-labels-idx1-ubyte.gz").write_bytes(gzip.compress(_idx_labels(labels)))
    with pytest.raises(ValueError, match="gzip"):
        ft.load_mnist_idx(tmp_path)
    (tmp_path / "t10k-images-idx3-ubyte.gz").write_bytes(_idx_images(images))  # not gzip at all
    with pytest.raises(ValueError, match="gzip"):
        ft.load_mnist_idx(tmp_path)
    (tmp_path / "t10k-images-idx3-ubyte.gz").unlink()
    with pytest.raises(ValueError, match="t10k-images-idx3-ubyte"):
        ft.load_mnist_idx(tmp_path)
    with pytest.raises(FileNotFoundError):
        ft.load_mnist_idx(tmp_path / "nowhere")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(FileNotFoundError, match="t10k"):
        ft.load_mnist_idx(empty)
    with pytest.raises(ValueError, match="unknown task"):
        ft.load_task("cifar")


# ---------------------------------------------------------------- partition --
LABELS = np.random.default_rng(0).integers(0, 10, 1000)


def _check_partition(parts, n, num_clients):
    assert len(parts) == num_clients
    assert all(p.dtype == np.int64 and p.size > 0 for p in parts)
    assert all(np.all(np.diff(p) > 0) for p in parts)  # sorted, no duplicates
    joined = np.concatenate(parts)
    assert joined.size == n and np.array_equal(np.sort(joined), np.arange(n))


SCHEME_CALLS = {
    "iid": lambda y, k, s: ft.partition_iid(y, k, seed=s),
    "dirichlet": lambda y, k, s: ft.partition_dirichlet(y, k, alpha=0.3, seed=s),
    "dirichlet-tiny-alpha": lambda y, k, s: ft.partition_dirichlet(y, k, alpha=0.01, seed=s),
    "shards": lambda y, k, s: ft.partition_shards(y, k, shards_per_client=2, seed=s),
}


@pytest.mark.parametrize("num_clients", [1, 4, 10, 50])
@pytest.mark.parametrize("scheme", list(SCHEME_CALLS))
def test_partitions_disjoint_covering_deterministic(scheme, num_clients):
    call = SCHEME_CALLS[scheme]
    parts = call(LABELS, num_clients, 0)
    _check_partition(parts, LABELS.size, num_clients)
    again = call(LABELS, num_clients, 0)
    assert all(np.array_equal(a, b) for a, b in zip(parts, again))
    if num_clients > 1:
        other = call(LABELS, num_clients, 1)
        assert any(not np.array_equal(a, b) for a, b in zip(parts, other))


def test_iid_partition_balanced():
    sizes = [p.size for p in ft.partition_iid(LABELS, 7, seed=0)]
    assert max(sizes) - min(sizes) <= 1


def _skew(parts, labels):
    """Mean over clients of the largest class share: 1 = one class per client."""
    return float(np.mean([np.bincount(labels[p], minlength=10).max() / p.size for p in parts]))


def test_dirichlet_skew_grows_as_alpha_shrinks():
    skews = [
        np.mean([_skew(ft.partition_dirichlet(LABELS, 10, alpha=a, seed=s), LABELS) for s in range(3)])
        for a in (100.0, 1.0, 0.1)
    ]
    assert skews[0] < skews[1] < skews[2]
    assert skews[0] < 0.2 and skews[2] > 0.5
    parts = ft.partition_dirichlet(LABELS, 10, alpha=0.5, seed=0, min_size=30)
    assert min(p.size for p in parts) >= 30


def test_shards_give_about_two_labels_per_client():
    parts = ft.partition_shards(LABELS, 10, shards_per_client=2, seed=0)
    distinct = [np.unique(LABELS[p]).size for p in parts]
    top2 = [np.sort(np.bincount(LABELS[p], minlength=10))[-2:].sum() / p.size for p in parts]
    assert max(distinct) <= 4 and np.median(distinct) <= 3
    assert min(top2) >= 0.6 and np.mean(top2) >= 0.8  # two labels hold most of each client's data
    # (an IID client's two largest classes hold ~30%)
    assert max(p.size for p in parts) - min(p.size for p in parts) <= 2  # equal shards


def test_partition_errors():
    with pytest.raises(ValueError, match="cannot give"):
        ft.partition_iid(LABELS[:5], 10, seed=0)
    with pytest.raises(ValueError, match="alpha"):
        ft.partition_dirichlet(LABELS, 4, alpha=0.0, seed=0)
    with pytest.raises(ValueError, match="cannot give"):
        ft.partition_shards(LABELS[:10], 6, shards_per_client=2, seed=0)
    with pytest.raises(ValueError, match="scheme"):
        ft.partition(LABELS, 4, scheme="round-robin")


@pytest.mark.parametrize("scheme", ["iid", "dirichlet", "shards"])
def test_client_partition(scheme):
    rng = np.random.default_rng(1)
    data = ft.Dataset(rng.random((200, 1, 2, 2), dtype=np.float32), rng.integers(0, 10, 200), 10, "toy")
    shares = [ft.client_partition(data, i, 5, scheme=scheme, alpha=0.5, seed=2) for i in range(5)]
    assert all(len(s) > 0 and s.name == "toy" and s.num_classes == 10 for s in shares)
    assert sum(len(s) for s in shares) == 200
    rows = sorted(bytes(r) for s in shares for r in s.x.reshape(len(s), -1))
    assert rows == sorted(bytes(r) for r in data.x.reshape(200, -1))
    with pytest.raises(ValueError, match="client index"):
        ft.client_partition(data, 5, 5)


# ------------------------------------------------------------------- models --
@pytest.mark.parametrize("task, shape", [("digits", (3, 1, 8, 8)), ("mnist", (3, 1, 28, 28))])
def test_models_shapes_and_seeded_init(task, shape):
    torch = _torch()
    state = torch.random.get_rng_state()
    model = ft.make_model(task, seed=0)
    assert torch.equal(state, torch.random.get_rng_state())  # global RNG untouched
    assert model(torch.zeros(shape)).shape == (3, 10)
    a, b, c = (ft.get_params(ft.make_model(task, seed=s)) for s in (0, 0, 1))
    assert list(a) == list(model.state_dict())
    assert all(np.array_equal(a[k], b[k]) for k in a)
    assert not all(np.array_equal(a[k], c[k]) for k in a)
    assert all(v.dtype == np.float32 for v in a.values())
    with pytest.raises(ValueError, match="unknown task"):
        ft.make_model("resnet")


def test_get_set_params_round_trip():
    torch = _torch()
    model = ft.make_model("digits", seed=0)
    params = ft.get_params(model)
    params["1.weight"][:] = 0.0  # a copy: the model is unaffected
    assert float(model.state_dict()["1.weight"].abs().sum()) > 0
    other = ft.get_params(ft.make_model("digits", seed=5))
    ft.set_params(model, other)
    assert all(np.array_equal(v, other[k]) for k, v in ft.get_params(model).items())
    # read-only float64 arrays and tensors are accepted (and no warning is raised)
    ro = {k: np.array(v, np.float64) for k, v in params.items()}
    for v in ro.values():
        v.setflags(write=False)
    ft.set_params(model, ro)
    assert np.array_equal(ft.get_params(model)["1.weight"], np.zeros((64, 64), np.float32))
    ft.set_params(model, {k: torch.from_numpy(v) for k, v in other.items()})
    assert np.array_equal(ft.get_params(model)["3.bias"], other["3.bias"])


def test_set_params_mismatch_errors_leave_model_unchanged():
    model = ft.make_model("digits", seed=0)
    before = ft.get_params(model)
    good = ft.get_params(ft.make_model("digits", seed=1))
    missing = dict(good)
    del missing["3.bias"]
    with pytest.raises(ValueError, match=r"missing \['3.bias'\]"):
        ft.set_params(model, missing)
    with pytest.raises(ValueError, match=r"unexpected \['extra'\]"):
        ft.set_params(model, {**good, "extra": np.zeros(1)})
    bad_shape = {**good, "1.weight": np.zeros((64, 63), np.float32)}
    with pytest.raises(ValueError, match=r"1\.weight: got \(64, 63\), model has \(64, 64\)"):
        ft.set_params(model, bad_shape)
    after = ft.get_params(model)
    assert all(np.array_equal(before[k], after[k]) for k in before)
    with pytest.raises(ValueError, match="missing"):
        ft.set_params(model, ft.get_params(ft.make_model("mnist")))


def test_set_params_converts_each_value_as_an_update_is_converted():
    # Into each tensor's own dtype through _update_math.to_dtype: integers saturate and
    # round (no wrap-around), bools threshold at 0.5, float64 keeps its precision,
    # bfloat16 tensors are accepted, NaN for an integer tensor is refused by name.
    torch = _torch()
    model = torch.nn.Module()
    buffers = {
        "u8": torch.zeros(3, dtype=torch.uint8),
        "i16": torch.zeros(2, dtype=torch.int16),
        "f64": torch.zeros(1, dtype=torch.float64),
        "bf": torch.zeros(2, dtype=torch.bfloat16),
        "flag": torch.zeros(2, dtype=torch.bool),
    }
    for name, value in buffers.items():
        model.register_buffer(name, value)
    params = {
        "u8": np.array([-1.0, 256.0, 3.6]),
        "i16": np.array([40000, -40000], np.int64),
        "f64": np.array([0.1]),
        "bf": torch.tensor([1.5, -2.0], dtype=torch.bfloat16),
        "flag": np.array([0.2, 0.9]),
    }
    ft.set_params(model, params)
    state = model.state_dict()
    assert state["u8"].tolist() == [0, 255, 4]
    assert state["i16"].tolist() == [32767, -32768]
    assert state["f64"].item() == 0.1  # not rounded through float32
    assert state["bf"].tolist() == [1.5, -2.0]
    assert state["flag"].tolist() == [False, True]
    before = {k: v.clone() for k, v in model.state_dict().items()}
    for bad, match in (
        ({**params, "u8": np.array([np.nan, 1.0, 2.0])}, r"u8: NaN or infinity has no value as uint8"),
        ({**params, "i16": np.array(["a", "b"])}, r"i16: .*unsupported dtype"),
    ):
        with pytest.raises(ValueError, match=match):
            ft.set_params(model, bad)
        assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_integer_buffers():
    torch = _torch()
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(4, 3), torch.nn.BatchNorm1d(3))
    params = ft.get_params(model)
    assert params["2.num_batches_tracked"].dtype == np.int64
    model(torch.randn(5, 1, 2, 2))  # training-mode forward: counters and running stats move
    after = ft.get_params(model)
    assert after["2.num_batches_tracked"] == 1
    ft.set_params(model, params)
    assert ft.get_params(model)["2.num_batches_tracked"] == 0
    delta = ft_loops.param_delta(after["2.num_batches_tracked"], params["2.num_batches_tracked"])
    assert delta.dtype == np.int64 and delta == 1


# -------------------------------------------------------------------- loops --
def test_train_local_deterministic(digits):
    torch = _torch()
    train, _ = digits
    state = torch.random.get_rng_state()
    runs = []
    for seed in (0, 0, 1):
        model = ft.make_model("digits", seed=0)
        stats = ft.train_local(model, train, epochs=1, batch_size=64, lr=0.1, seed=seed)
        assert stats["num_examples"] == len(train) and stats["steps"] == 23 and np.isfinite(stats["loss"])
        runs.append(ft.get_params(model))
    assert torch.equal(state, torch.random.get_rng_state())
    assert all(np.array_equal(runs[0][k], runs[1][k]) for k in runs[0])
    assert not np.array_equal(runs[0]["1.weight"], runs[2]["1.weight"])
    with pytest.raises(ValueError, match="epochs"):
        ft.train_local(model, train, epochs=0)


def test_centralised_digits_reaches_90_percent(digits):
    _torch()
    train, test = digits
    model = ft.make_model("digits", seed=0)
    loss0, acc0 = ft.evaluate(model, test)
    stats = ft.train_local(model, train, epochs=5, batch_size=32, lr=0.05, momentum=0.9, seed=0)
    loss, acc = ft.evaluate(model, test)
    assert acc0 < 0.3 and loss < loss0 and stats["loss"] < 0.5
    assert acc >= 0.90, acc


def test_train_fn_update_plus_global_is_local(digits):
    _torch()
    train, test = digits
    part = ft.client_partition(train, 1, 4, seed=0)
    global_params = ft.init_params("digits", seed=0)
    train_fn = ft.make_train_fn("digits", part, epochs=1, lr=0.1, batch_size=32, seed=7)
    update, n, metrics = train_fn(global_params, {"epochs": 2})
    assert n == len(part) and metrics["num_examples"] == n and metrics["epochs"] == 2
    assert np.isfinite(metrics["train_loss"]) and metrics["loss"] == metrics["train_loss"]
    assert list(update) == list(global_params) and all(u.dtype == np.float32 for u in update.values())
    model = ft.make_model("digits", seed=123)
    ft.set_params(model, global_params)
    ft.train_local(model, part, epochs=2, batch_size=32, lr=0.1, seed=metrics["seed"])
    local = ft.get_params(model)
    for k in global_params:
        np.testing.assert_allclose(global_params[k] + update[k], local[k], rtol=0, atol=1e-6)
    # the cached model is reset every call: same inputs, same update
    again, _, _ = train_fn(global_params, {"epochs": 2})
    assert all(np.array_equal(update[k], again[k]) for k in update)
    # rounds shuffle differently; "seed" and "lr" override
    r1, _, m1 = train_fn(global_params, {"round": 1})
    r2, _, m2 = train_fn(global_params, {"round": 2})
    assert m1["seed"] != m2["seed"] and not np.array_equal(r1["1.weight"], r2["1.weight"])
    _, _, m3 = train_fn(global_params, {"seed": 99, "lr": 0.01})
    assert m3["seed"] == 99 and m3["lr"] == 0.01 and m3["steps"] == metrics["steps"] // 2
    # evaluate_fn
    evaluate_fn = ft.make_evaluate_fn("digits", test)
    res = evaluate_fn(global_params)
    assert set(res) >= {"loss", "accuracy"} and 0.0 <= res["accuracy"] <= 1.0
    trained = {k: global_params[k] + update[k] for k in global_params}
    assert evaluate_fn(trained)["loss"] < res["loss"]


def _fedavg(train_fns, global_params, rounds, evaluate_fn):
    accuracies = []
    for r in range(1, rounds + 1):
        results = [fn(global_params, {"round": r}) for fn in train_fns]
        total = sum(n for _, n, _ in results)
        global_params = {
            k: (v + sum(u[k] * (n / total) for u, n, _ in results)).astype(v.dtype) for k, v in global_params.items()
        }
        accuracies.append(evaluate_fn(global_params)["accuracy"])
    return global_params, accuracies


def test_fedavg_by_hand_on_digits(digits):
    _torch()
    train, test = digits
    train_fns = [
        ft.make_train_fn(
            "digits",
            ft.client_partition(train, i, 4, scheme="iid", seed=0),
            epochs=2,
            lr=0.05,
            batch_size=32,
            momentum=0.9,
            seed=i,
        )
        for i in range(4)
    ]
    _, accuracies = _fedavg(train_fns, ft.init_params("digits", seed=0), 5, ft.make_evaluate_fn("digits", test))
    assert accuracies[-1] >= 0.85, accuracies
    assert accuracies[-1] > accuracies[0]


def test_fedavg_through_fp32_payloads_matches_by_hand(digits):
    _torch()
    import fedpress as fp

    train, _ = digits
    global_params = ft.init_params("digits", seed=0)
    results = [
        ft.make_train_fn("digits", ft.client_partition(train, i, 3, scheme="dirichlet", seed=0), lr=0.1, seed=i)(
            global_params, {"round": 1}
        )
        for i in range(3)
    ]
    agg = fp.Aggregator()
    for update, n, _ in results:
        agg.add(fp.Codec("fp32").encode(update), weight=n)
    mean = agg.result()
    total = sum(n for _, n, _ in results)
    for k in global_params:
        np.testing.assert_allclose(mean[k], sum(u[k] * (n / total) for u, n, _ in results), rtol=0, atol=1e-6)


@needs_mnist
def test_mnist_cnn_learns():
    _torch()
    train, test = ft.load_mnist_idx(MNIST_DIR, seed=0)
    model = ft.make_model("mnist", seed=0)
    ft.train_local(model, train.subset(np.arange(2000)), epochs=1, lr=0.05, momentum=0.9, seed=0)
    loss, acc = ft.evaluate(model, test)
    assert acc >= 0.8, acc
