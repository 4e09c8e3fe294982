"""Geometry of synthetic manifolds of known dimension: the estimators' sanity check and the first demo."""

from __future__ import annotations

import pathlib

import ml_collections
import numpy as np

import idjax
from experiments.files import atomic_write_json


def manifold(name: str, n: int, dim: int, ambient: int, seed: int = 0) -> np.ndarray:
    """Points on a manifold of intrinsic dimension `dim` (except 'swiss_roll': 2) in R^ambient.

    linear: standard Gaussian in a random dim-subspace (no boundary); cube: uniform in [-1, 1]^dim
    (its boundary biases every nearest-neighbour estimator low as dim grows); sphere: uniform on
    S^dim (dim + 1 coordinates); swiss_roll: the 2-D roll in R^3. Then padded with zeros and randomly
    rotated into R^ambient.
    """
    rng = np.random.default_rng(seed)
    if name == "linear":
        z = rng.normal(size=(n, dim))
    elif name == "cube":
        z = rng.uniform(-1, 1, size=(n, dim))
    elif name == "sphere":
        z = rng.normal(size=(n, dim + 1))
        z /= np.linalg.norm(z, axis=1, keepdims=True)
    elif name == "swiss_roll":
        t = 1.5 * np.pi * (1 + 2 * rng.uniform(size=n))
        h = 21 * rng.uniform(size=n)
        z = np.stack([t * np.cos(t), h, t * np.sin(t)], axis=1)
    else:
        raise ValueError(f"unknown manifold {name!r}; choose linear, cube, sphere or swiss_roll")
    if z.shape[1] > ambient:
        raise ValueError(f"ambient dimension {ambient} < embedding dimension {z.shape[1]}")
    padded = np.hstack([z, np.zeros((n, ambient - z.shape[1]))])
    rotation, _ = np.linalg.qr(rng.normal(size=(ambient, ambient)))
    return (padded @ rotation).astype(np.float32)


def run(config: ml_collections.ConfigDict, workdir: pathlib.Path) -> dict:
    """Estimates TwoNN / GRIDE on each configured manifold and writes results.json."""
    results = {}
    for name, dim in config.manifolds:
        x = manifold(name, config.n_points, dim, config.ambient_dim, seed=config.seed)
        dist, _ = idjax.knn(x, config.k_max)
        scaling = idjax.gride_scaling(dist, range_max=config.k_max)
        results[f"{name}_{dim}"] = {
            "true_id": 2 if name == "swiss_roll" else dim,
            "twonn": float(idjax.twonn(dist, fraction=config.twonn_fraction)),
            "gride_ids": scaling.ids.tolist(),
            "gride_ranks": scaling.ranks.tolist(),
        }
        print(f"{name:>10} d={results[f'{name}_{dim}']['true_id']:>2}  TwoNN {results[f'{name}_{dim}']['twonn']:.2f}"
              f"  GRIDE(n2={scaling.ranks[-1]}) {scaling.ids[-1]:.2f}")
    out = workdir / "results.json"
    atomic_write_json(out, results, checksum=True)
    print(f"results written to {out}")
    return results
