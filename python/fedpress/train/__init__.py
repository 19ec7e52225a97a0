"""Training for the federation and the demo: data sets, client partitions, models, loops.

    from fedpress.train import load_task, client_partition, make_model, get_params
    from fedpress.train import make_train_fn, make_evaluate_fn

    train, test = load_task("digits", seed=0)                      # or "mnist", data_dir=...
    part = client_partition(train, index=0, num_clients=4, scheme="iid", seed=0)
    global_params = get_params(make_model("digits", seed=0))
    train_fn = make_train_fn("digits", part, epochs=1, lr=0.1, seed=0)
    update, num_examples, metrics = train_fn(global_params, {"round": 1})
    make_evaluate_fn("digits", test)(global_params)               # {"loss", "accuracy", ...}

Importing this package needs only numpy; torch and scikit-learn (the ``train``
extra: ``pip install 'fedpress[train]'``) are imported when a function needs them.
The built-in ``digits`` task (``builtin_task``, what the command line runs) trains
a numpy MLP (``fedpress.train.mlp``) and needs no torch; ``make_model("digits")``
is the same network in torch.
"""

from __future__ import annotations

from .datasets import TASKS, Dataset, default_mnist_dir, load_digits, load_mnist_idx, load_task, stratified_split
from .loops import evaluate, make_evaluate_fn, make_train_fn, param_delta, round_seed, train_local
from .models import get_params, init_params, make_model, set_params
from .partition import SCHEMES, client_partition, partition, partition_dirichlet, partition_iid, partition_shards
from .task import BUILTIN_TASKS, Task, builtin_task, resolve_task

__all__ = [
    "Dataset",
    "TASKS",
    "load_digits",
    "load_mnist_idx",
    "load_task",
    "default_mnist_dir",
    "stratified_split",
    "SCHEMES",
    "partition",
    "partition_iid",
    "partition_dirichlet",
    "partition_shards",
    "client_partition",
    "make_model",
    "get_params",
    "set_params",
    "init_params",
    "train_local",
    "evaluate",
    "make_train_fn",
    "make_evaluate_fn",
    "round_seed",
    "param_delta",
    "Task",
    "BUILTIN_TASKS",
    "builtin_task",
    "resolve_task",
]
