"""ID estimates on manifolds of known dimension at N = 4000: prints the README's accuracy table.

    .venv/bin/python benchmarks/manifold_accuracy.py [--n 4000]

Rows: our synthetic manifolds (experiments/synthetic.py) and scikit-dimension's benchmark
manifolds with ID <= 10. Columns: TwoNN fit (f = 0.9), TwoNN MLE, GRIDE at (n1, n2) = (1, 2) and
(4, 8), and the relative error of TwoNN fit.
"""

from __future__ import annotations

import argparse

import numpy as np

import idjax
from experiments.synthetic import manifold

SYNTHETIC = [("linear", 2), ("linear", 5), ("linear", 10), ("sphere", 2), ("sphere", 5), ("sphere", 10),
             ("cube", 5), ("swiss_roll", 2)]


def datasets(n: int, seed: int = 0) -> list[tuple[str, int, np.ndarray]]:
    import skdim

    out = [(f"{name} d={dim}", 2 if name == "swiss_roll" else dim, manifold(name, n, dim, 32, seed))
           for name, dim in SYNTHETIC]
    bench = skdim.datasets.BenchmarkManifolds(random_state=seed)
    truth = bench.truth["Intrinsic Dimension"]
    for name, x in bench.generate(n=n).items():
        if int(truth[name]) <= 10:
            out.append((f"skdim {name}", int(truth[name]), np.asarray(x, np.float32)))
    return out


def estimates(x: np.ndarray) -> dict[str, float]:
    dist, _ = idjax.knn(x, 8)
    return {
        "twonn_fit": float(idjax.twonn(dist, fraction=0.9, duplicates="drop")),
        "twonn_mle": float(idjax.twonn(dist, method="mle", duplicates="drop")),
        "gride_1_2": idjax.gride(dist, 1, 2, duplicates="drop").id,
        "gride_4_8": idjax.gride(dist, 4, 8, duplicates="drop").id,
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--n", type=int, default=4000)
    args = parser.parse_args()
    print(f"| manifold (N={args.n}) | true ID | TwoNN fit | TwoNN MLE | GRIDE(1,2) | GRIDE(4,8) | TwoNN fit error |")
    print("|---|---|---|---|---|---|---|")
    for name, true_id, x in datasets(args.n):
        e = estimates(x)
        rel = (e["twonn_fit"] - true_id) / true_id
        print(f"| {name} | {true_id} | {e['twonn_fit']:.2f} | {e['twonn_mle']:.2f} | {e['gride_1_2']:.2f} | "
              f"{e['gride_4_8']:.2f} | {rel:+.1%} |")


if __name__ == "__main__":
    main()
