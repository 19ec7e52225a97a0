"""Kernel benchmark: fedpress kernels against numpy / torch / zstd peers.

A thin entry point; the benchmark itself is :mod:`fedpress.bench`, so that
``fedpress bench`` runs the same code from anywhere.

    python bench/kernels.py                        # N = 1M, 11.7M, 25.6M
    python bench/kernels.py --quick                # under 30 s
    python bench/kernels.py --sizes 25.6M --repeat 3 --json out.json
"""

from __future__ import annotations

import sys

try:
    from fedpress.bench import main
except ImportError as exc:  # the compiled core is only there once installed
    sys.exit(f"cannot import fedpress ({exc}); install it first: pip install -e .")

__all__ = ["main"]

if __name__ == "__main__":
    sys.exit(main())
