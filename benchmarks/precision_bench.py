"""Effect of bf16 / fp16 representations on the kNN graph and the ID (distances accumulate in fp32).

    .venv/bin/python benchmarks/precision_bench.py [--store workdirs/minilm/representations]

With a representation store, every layer is used; otherwise a synthetic 10-D manifold in 384-D.
Prints, per layer and dtype: overlap of the k=10 neighbour sets with the float32 graph, and the
relative change of TwoNN and GRIDE(n2=16).
"""

from __future__ import annotations

import argparse
import pathlib

import jax.numpy as jnp
import numpy as np

import idjax
from experiments import store
from experiments.synthetic import manifold


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--store", type=pathlib.Path, default=None)
    parser.add_argument("--k", type=int, default=10)
    args = parser.parse_args()
    if args.store and store.is_complete(args.store):
        layers = [np.asarray(x, np.float32) for x in store.load(args.store).layers]
        source = str(args.store)
    else:
        layers = [manifold("sphere", 3000, 10, 384, seed=0) * 5.0]
        source = "synthetic 10-D sphere in 384-D"
    print(f"source: {source}; k = {args.k}\n")
    print("| layer | dtype | neighbour-set overlap with fp32 | TwoNN rel. change | GRIDE(n2=16) rel. change |")
    print("|---|---|---|---|---|")
    for i, x in enumerate(layers):
        x = x[idjax.find_duplicates(x).keep]
        dist_f32, idx_f32 = idjax.knn(x, 16)
        twonn_f32, gride_f32 = float(idjax.twonn(dist_f32)), idjax.gride(dist_f32, 8, 16).id
        for dtype in (jnp.bfloat16, jnp.float16):
            low = jnp.asarray(x, dtype)
            dist_low, idx_low = idjax.knn(low, 16)
            overlap = idjax.data_overlap(idx_f32, idx_low, args.k)
            twonn_low = float(idjax.twonn(dist_low, duplicates="drop"))
            gride_low = idjax.gride(dist_low, 8, 16, duplicates="drop").id
            name = jnp.dtype(dtype).name
            print(f"| {i} | {name} | {overlap:.3f} | {(twonn_low - twonn_f32) / twonn_f32:+.2%} | "
                  f"{(gride_low - gride_f32) / gride_f32:+.2%} |")


if __name__ == "__main__":
    main()
