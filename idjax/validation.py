"""Input checks with messages that name the problem. Run on the host, before anything is compiled."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np


def as_points(x, name: str = "x", *, min_points: int = 2) -> jax.Array | np.ndarray:
    """Checks that `x` is a finite real (N, D) array with N >= min_points; returns it unchanged."""
    if not hasattr(x, "shape") or not hasattr(x, "dtype"):
        x = np.asarray(x)
    if x.ndim != 2:
        raise ValueError(f"{name} must be a 2-D array (N points, D features); got shape {tuple(x.shape)}")
    if not (jnp.issubdtype(x.dtype, jnp.floating) or jnp.issubdtype(x.dtype, jnp.integer)):
        raise TypeError(f"{name} must have a real numeric dtype; got {x.dtype}")
    if x.shape[0] < min_points:
        raise ValueError(f"{name} has {x.shape[0]} points; at least {min_points} are needed")
    if x.shape[1] < 1:
        raise ValueError(f"{name} has zero features (shape {tuple(x.shape)})")
    if jnp.issubdtype(x.dtype, jnp.floating):
        finite = np.isfinite(x) if isinstance(x, np.ndarray) else jnp.isfinite(x)
        if not bool(finite.all()):
            bad = np.argwhere(~np.asarray(finite))
            raise ValueError(
                f"{name} contains {len(bad)} NaN/inf entries (first at row {bad[0][0]}, column {bad[0][1]})"
            )
    return x


def check_k(k: int, available: int, *, what: str = "neighbours", n_points: int | None = None) -> None:
    """Checks 1 <= k <= available, naming the sample size when it is too small."""
    if not isinstance(k, int | np.integer) or isinstance(k, bool):
        raise TypeError(f"k must be an integer; got {k!r}")
    if k < 1:
        raise ValueError(f"k must be >= 1; got {k}")
    if k > available:
        size = f" with N = {n_points} points" if n_points is not None else ""
        raise ValueError(f"k = {k} {what} requested but only {available} are available{size}; need N > k")


def as_distances(distances, name: str = "distances", *, min_columns: int = 1) -> np.ndarray | jax.Array:
    """Checks a (N, k) kNN distance matrix (rank 1 first): finite, non-negative, ascending rows."""
    if not hasattr(distances, "shape"):
        distances = np.asarray(distances)
    if distances.ndim != 2:
        raise ValueError(f"{name} must be 2-D (N points, k neighbours); got shape {tuple(distances.shape)}")
    if distances.shape[1] < min_columns:
        raise ValueError(
            f"{name} has {distances.shape[1]} neighbour columns but this estimate needs at least "
            f"{min_columns}; recompute the kNN graph with k >= {min_columns}"
        )
    if distances.shape[0] < 3:
        raise ValueError(f"{name} has {distances.shape[0]} points; at least 3 are needed")
    arr = np.asarray(distances)
    if not np.isfinite(arr).all():
        raise ValueError(f"{name} contains NaN/inf")
    if (arr < 0).any():
        raise ValueError(f"{name} contains negative values")
    if (np.diff(arr, axis=1) < 0).any():
        raise ValueError(f"{name} rows must be sorted ascending (rank 1 first)")
    return distances


def as_labels(labels, n_points: int, name: str = "labels") -> np.ndarray:
    """Checks a (N,) vector of integer-like (or hashable) labels of the right length; returns int codes."""
    arr = np.asarray(labels)
    if arr.ndim != 1:
        raise ValueError(f"{name} must be 1-D; got shape {arr.shape}")
    if arr.shape[0] != n_points:
        raise ValueError(f"{name} has length {arr.shape[0]} but there are {n_points} points")
    if arr.dtype.kind == "f" and not np.isfinite(arr).all():
        raise ValueError(f"{name} contains NaN/inf")
    _, codes = np.unique(arr, return_inverse=True)
    return codes.astype(np.int32).ravel()


def check_duplicates_policy(policy: str) -> None:
    if policy not in ("error", "drop"):
        raise ValueError(f"duplicates must be 'error' or 'drop'; got {policy!r}")
