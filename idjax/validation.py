"""Input checks with messages that name the problem. Run on the host, before anything is compiled."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np


def max_abs(x) -> float:
    """Largest |entry| of a real array, as max(max x, -min x) (no temporary |x|; one fused reduction
    on device): NaN if any entry is NaN, inf if any is +-inf."""
    if x.size == 0:
        return 0.0
    if isinstance(x, np.ndarray):
        return max(float(np.max(x)), -float(np.min(x)))  # floats: abs(int64 min) would overflow in int
    return float(_max_abs_device(x))


@jax.jit
def _max_abs_device(x: jax.Array) -> jax.Array:
    x = x.astype(jnp.float32) if jnp.issubdtype(x.dtype, jnp.integer) else x
    return jnp.maximum(jnp.max(x), -jnp.min(x))


def checked_points(x, name: str = "x", *, min_points: int = 2) -> tuple[jax.Array | np.ndarray, float]:
    """Checks that `x` is a finite real (N, D) array with N >= min_points; returns (x unchanged, max |x|).

    One pass over the data: the largest magnitude is NaN/inf exactly when some entry is, and it is
    what `scale_exponent` needs, so finiteness and scale come from the same reduction.
    """
    if not hasattr(x, "shape") or not hasattr(x, "dtype"):
        x = np.asarray(x)
    if x.ndim != 2:
        raise ValueError(f"{name} must be a 2-D array (N points, D features); got shape {tuple(x.shape)}")
    if not (jnp.issubdtype(x.dtype, jnp.floating) or jnp.issubdtype(x.dtype, jnp.integer)):
        raise TypeError(f"{name} must have a real numeric dtype (float or int); got {x.dtype}")
    if x.shape[0] < min_points:
        raise ValueError(f"{name} has {x.shape[0]} points; at least {min_points} are needed")
    if x.shape[1] < 1:
        raise ValueError(f"{name} has zero features (shape {tuple(x.shape)})")
    biggest = max_abs(x)
    if not math.isfinite(biggest):
        bad = np.argwhere(~np.isfinite(np.asarray(x)))
        raise ValueError(
            f"{name} contains {len(bad)} NaN/inf entries (first at row {bad[0][0]}, column {bad[0][1]})"
        )
    return x, biggest


def as_points(x, name: str = "x", *, min_points: int = 2) -> jax.Array | np.ndarray:
    """Checks that `x` is a finite real (N, D) array with N >= min_points; returns it unchanged."""
    return checked_points(x, name, min_points=min_points)[0]


# Data whose largest magnitude lies in [2^-SAFE_EXPONENT, 2^SAFE_EXPONENT] are used as they are: their
# squared distances (and the GEMM form's |q|^2 + |r|^2) stay normal floats in float32 for any practical
# D. Outside it they are rescaled by a power of two, which is exact in binary floating point.
SAFE_EXPONENT = 32
def scale_exponent(biggest: float, dtype, *, integer: bool, dim: int = 1, name: str = "x") -> int:
    """The exponent e such that x * 2^-e is safe to compute distances on in `dtype` (0 for ordinary data).

    Euclidean neighbours and every ID estimate are invariant under scaling, and scaling by 2^-e (and
    the distances back by 2^e) is exact, so data at any magnitude give the graph they give at unit
    scale. Raises where `dtype` cannot represent the data or their distances:
      * integers above 2^(mantissa bits + 1) (2^24 for float32), which would merge when cast;
      * magnitudes whose distances fall outside the dtype's range (about 1e-30..1e30 in float32).
    """
    info = jnp.finfo(dtype)
    if integer:
        exact = 2 ** (info.nmant + 1)
        if biggest > exact:
            raise ValueError(
                f"{name} holds integers up to {biggest:.0f}, beyond 2^{info.nmant + 1} = {exact}, the largest "
                f"range {jnp.dtype(dtype).name} represents exactly (distinct values would merge). Subtract an "
                "offset, or pass float64 data with jax_enable_x64 enabled."
            )
        return 0
    if biggest == 0.0 or 2.0**-SAFE_EXPONENT <= biggest <= 2.0**SAFE_EXPONENT:
        return 0
    exponent = math.frexp(biggest)[1] - 1  # biggest * 2^-exponent lies in [1, 2)
    # Distances are scaled back to the caller's units: the largest, < 2^(exponent + 2) sqrt(D), must not
    # overflow, and the smallest the data resolve, biggest * 2^-(mantissa bits), must stay a normal float.
    top = int(info.maxexp) - 3 - math.ceil(math.log2(max(dim, 1)) / 2)
    bottom = int(info.minexp) + int(info.nmant) + 1
    if not bottom <= exponent <= top:
        raise ValueError(
            f"{name} has entries of magnitude up to {biggest:.3g}; its distances cannot be represented in "
            f"{jnp.dtype(dtype).name} (usable magnitudes about {2.0**bottom:.0e}..{2.0**top:.0e} at D = {dim}). "
            "Rescale the data (the ID is scale-invariant) or pass float64 data with jax_enable_x64 enabled."
        )
    return exponent


def scaled(x, exponent: int, dtype) -> jax.Array:
    """x * 2^-exponent as a `dtype` jax array, scaling before a narrowing cast (float64 -> float32) so
    nothing overflows, after it otherwise."""
    if exponent == 0:
        return jnp.asarray(x, dtype)
    if jnp.dtype(x.dtype).itemsize > jnp.dtype(dtype).itemsize:
        return jnp.asarray(np.ldexp(np.asarray(x, np.float64), -exponent), dtype)
    return jnp.asarray(x, dtype) * jnp.asarray(2.0**-exponent, dtype)


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
    if not (jnp.issubdtype(distances.dtype, jnp.floating) or jnp.issubdtype(distances.dtype, jnp.integer)):
        raise TypeError(f"{name} must be real (float) distances; got dtype {distances.dtype}")
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


def as_neighbor_indices(indices, n_points: int, name: str = "indices"):
    """Checks that every neighbour index of an (N, k) integer matrix names one of the N points.

    An index outside [0, N) would be clamped or wrapped by JAX's gather and give a plausible-looking
    overlap; one min/max reduction rules that out.
    """
    if indices.size == 0:
        return indices
    lo, hi = (np.min(indices), np.max(indices)) if isinstance(indices, np.ndarray) else (
        jnp.min(indices), jnp.max(indices))
    if int(lo) < 0 or int(hi) >= n_points:
        arr = np.asarray(indices)
        row, col = np.argwhere((arr < 0) | (arr >= n_points))[0]
        raise ValueError(
            f"{name} holds neighbour index {int(arr[row, col])} (row {row}, column {col}); indices must lie in "
            f"[0, {n_points}) for {n_points} points. Pass the kNN indices of these same points."
        )
    return indices


def check_optional_positive(value, name: str) -> None:
    """Checks that an optional size argument (block size, memory budget) is None or a positive integer."""
    if value is not None and (isinstance(value, bool) or not isinstance(value, int | np.integer) or value < 1):
        raise ValueError(f"{name} must be a positive integer or None; got {value!r}")


def check_duplicates_policy(policy: str) -> None:
    if policy not in ("error", "drop"):
        raise ValueError(f"duplicates must be 'error' or 'drop'; got {policy!r}")
