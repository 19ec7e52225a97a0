"""The MNIST bytes-vs-accuracy benchmark of the README: 9 cells x 3 seeds at 20% participation
(Dirichlet 0.5), then the same cells at 10% participation (Dirichlet 0.3).

    python bench/sweep_mnist.py [--out DIR] [--jobs 2] [--data-dir ../shared/data/mnist]

About 12-17 minutes on 2 cores. Each folder gets runs.jsonl, summary.json, summary.md and the plots;
finished runs are kept, so the script can be stopped and started again.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from fedpress.sweep import Settings, run_sweep

_UPLINK_1000X = "topk:0.0023+sign+zstd@server_momentum=0.9,server_decay=0.1,table=digest"
CELLS = [
    "fp32",
    "eden2",
    "topk:0.01+q4+zstd",
    "topk:0.001+q4+zstd",
    _UPLINK_1000X,
    _UPLINK_1000X + ",downlink=topk:0.01+q4+zstd",
    _UPLINK_1000X + ",downlink=topk:0.02+q4+zstd,downlink_mode=client",
    _UPLINK_1000X + ",downlink=topk:0.02+q2+zstd,downlink_mode=client",
    "topk:0.004+sign+zstd@server_momentum=0.9,server_decay=0.1,table=digest,downlink=topk:0.02+q2+zstd,"
    "downlink_mode=client",
]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="sweep-mnist")
    parser.add_argument("--jobs", type=int, default=2)
    parser.add_argument("--data-dir", default=None)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    args = parser.parse_args()
    for name, settings in (
        ("participation-20", Settings()),
        ("participation-10-alpha-0.3", Settings(per_round=5, alpha=0.3)),
    ):
        out = Path(args.out) / name
        run_sweep(["mnist"], CELLS, args.seeds, settings, out, jobs=args.jobs, data_dir=args.data_dir)
        print(f"== {name}\n{(out / 'summary.md').read_text()}")


if __name__ == "__main__":
    main()
