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
        d32, i32 = idjax.knn(x, 16)
        t32, g32 = float(idjax.twonn(d32)), idjax.gride(d32, 8, 16).id
        for dtype in (jnp.bfloat16, jnp.float16):
            low = jnp.asarray(x, dtype)
            dl, il = idjax.knn(low, 16)
            overlap = idjax.data_overlap(i32, il, args.k)
            tl = float(idjax.twonn(dl, duplicates="drop"))
            gl = idjax.gride(dl, 8, 16, duplicates="drop").id
            name = jnp.dtype(dtype).name
            print(f"| {i} | {name} | {overlap:.3f} | {(tl - t32) / t32:+.2%} | {(gl - g32) / g32:+.2%} |")


if __name__ == "__main__":
    main()
