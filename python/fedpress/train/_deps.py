"""Lazy imports of the optional training dependencies (the ``train`` extra)."""

from __future__ import annotations

from typing import Any

_HINT = "pip install 'fedpress[train]'"


def require_torch() -> Any:
    """The ``torch`` module, or an ImportError naming the extra to install."""
    try:
        import torch
    except ImportError as exc:
        raise ImportError(f"fedpress.train needs PyTorch, which is not installed: {_HINT}") from exc
    return torch


def require_sklearn_datasets() -> Any:
    """``sklearn.datasets``, or an ImportError naming the extra to install."""
    try:
        import sklearn.datasets
    except ImportError as exc:
        raise ImportError(
            f"fedpress.train needs scikit-learn for the digits data set, which is not installed: {_HINT}"
        ) from exc
    return sklearn.datasets
