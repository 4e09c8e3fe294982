"""Neighbourhood overlap: between two representations of the same points, and with labels.

Both read kNN index matrices (N, k) with the point itself excluded (as `idjax.knn` returns them).
"""

from __future__ import annotations

import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np

from idjax import validation


def _check_indices(indices, k: int, name: str = "indices") -> jax.Array:
    if not hasattr(indices, "shape"):
        indices = np.asarray(indices)
    if indices.ndim != 2:
        raise ValueError(f"{name} must be 2-D (N points, k neighbours); got shape {tuple(indices.shape)}")
    if not jnp.issubdtype(indices.dtype, jnp.integer):
        raise TypeError(f"{name} must be integer neighbour indices; got dtype {indices.dtype}")
    validation.check_k(k, indices.shape[1], what=f"neighbour columns of {name}")
    return jnp.asarray(validation.as_neighbor_indices(indices[:, :k], indices.shape[0], name), jnp.int32)


@functools.partial(jax.jit, static_argnames=("num_classes", "weighted"))
def label_overlap_per_point(indices: jax.Array, labels: jax.Array, *, num_classes: int | None = None,
                            weighted: bool = False) -> jax.Array:
    """Per point, the fraction of its k neighbours that share its label: (N, k), (N,) -> (N,).

    `weighted` has no effect per point; it is accepted so both variants share one signature.
    """
    del num_classes, weighted
    chex.assert_rank(indices, 2)
    chex.assert_type(indices, int)
    chex.assert_shape(labels, (indices.shape[0],))
    return jnp.mean(labels[indices] == labels[:, None], axis=1, dtype=jnp.float32)


def label_overlap(indices, labels, k: int, *, weighted: bool = False, per_point: bool = False):
    """Mean over points of the fraction of each point's k nearest neighbours that share its label.

    Args:
      indices: (N, >= k) neighbour indices, self excluded.
      labels: (N,) labels (any hashable values).
      k: neighbours considered.
      weighted: False: plain mean over points (DADApy 0.3.4). True: each point weighted by
        1 / (size of its class), i.e. the mean of per-class means, so large classes don't dominate
        (DADApy's later default).
      per_point: return the (N,) per-point fractions instead of the mean.

    Returns:
      float (or (N,) numpy array with per_point=True).
    """
    idx = _check_indices(indices, k)
    codes = validation.as_labels(labels, idx.shape[0])
    fractions = label_overlap_per_point(idx, jnp.asarray(codes))
    if per_point:
        return np.asarray(fractions)
    if not weighted:
        return float(jnp.mean(fractions))
    counts = np.bincount(codes)
    weights = 1.0 / counts[codes]
    return float(np.sum(np.asarray(fractions, np.float64) * weights) / np.sum(weights))


@jax.jit
def data_overlap_per_point(indices_a: jax.Array, indices_b: jax.Array) -> jax.Array:
    """|kNN_A(i) ∩ kNN_B(i)| / k per point: (N, k), (N, k) -> (N,)."""
    chex.assert_rank(indices_a, 2)
    chex.assert_equal_shape([indices_a, indices_b])
    chex.assert_type([indices_a, indices_b], int)
    k = indices_a.shape[1]
    shared = jnp.any(indices_a[:, :, None] == indices_b[:, None, :], axis=2)
    return jnp.sum(shared, axis=1, dtype=jnp.float32) / k


def data_overlap(indices_a, indices_b, k: int, *, per_point: bool = False):
    """Mean over points of the shared fraction of the k nearest neighbours in two representations.

    Args:
      indices_a, indices_b: (N, >= k) neighbour indices of the same N points in representations A, B.
      k: neighbours considered.
      per_point: return the (N,) per-point overlaps instead of the mean.
    """
    a = _check_indices(indices_a, k, "indices_a")
    b = _check_indices(indices_b, k, "indices_b")
    if a.shape[0] != b.shape[0]:
        raise ValueError(f"indices_a has {a.shape[0]} points but indices_b has {b.shape[0]}; they must "
                         "describe the same points")
    overlaps = data_overlap_per_point(a, b)
    return np.asarray(overlaps) if per_point else float(jnp.mean(overlaps))
