"""The payload path against the kernels it is built on: what orchestration costs.

A thin entry point; the measuring code is :mod:`fedpress._bench_pipeline`, so that
``fedpress bench --only pipeline`` runs the same rows from anywhere.

    python bench/pipeline.py [--n 25.6M] [--repeat 5] [--clients 100] [--memory] [--json PATH]

Each row times a call users make (Encoder, Codec.encode, Aggregator, decode) and the bare
kernel underneath it, on the same float32 update of N elements, in this process, and prints
their ratio; one row prints top-k in streaming reads of its input, and --memory adds the peak
memory of one encode (a fresh process per row). The targets are those of issue 13; the exit
status is 0 whatever the ratios are (a benchmark, not a test).
"""

from __future__ import annotations

import sys

try:
    from fedpress._bench_pipeline import main
except ImportError as exc:  # the compiled core is only there once installed
    sys.exit(f"cannot import fedpress ({exc}); install it first: pip install -e .")

__all__ = ["main"]

if __name__ == "__main__":
    sys.exit(main())
