"""Intrinsic dimension from a kNN graph: TwoNN (fit and maximum likelihood), GRIDE, scale dependence.

Conventions follow DADApy 0.3.4 (the reference the tests compare against), with one deliberate
difference: neighbour ranks are 1-based with the point itself excluded by index, so column r-1 of
`distances` holds the distance to the r-th neighbour.

Public functions validate on the host and return Python floats / numpy arrays. The `*_from_mus`
kernels are pure, jit-able and vmappable (across scales, layers or bootstrap repeats).

Ties (mu == 1 exactly, r_n1 == r_n2 > 0). Under the model both estimators rest on (locally uniform
density on a d-dimensional manifold), mu = r_n2 / r_n1 has a continuous law (Pareto for TwoNN, the
GRIDE law in general) with P(mu = 1) = 0; even the smallest of N ratios exceeds 1 by about
1 / (N d), far above float resolution. An exact tie therefore means the data are discrete at that
scale (a lattice, quantised or binary values), where the continuous model does not hold and the ID
is not identifiable: on a 1-D lattice every interior point has mu = 1, and the estimators would
return NaN (TwoNN fit), inf (MLE) or the edge of GRIDE's search bracket. Ties are treated as follows:
  * a tie enters the estimate as its measured value, mu = 1 (log mu = 0; GRIDE nudges it by 10 eps,
    as DADApy does), as long as ties cover at most 1/sqrt(N) of the points. Setting the smallest
    fraction p of the ratios to 1 raises the MLE by a relative p / (1 - p) at most (the smallest p
    of the log mu carry at most p of their sum), so this keeps the worst case about within the
    estimate's own relative standard error, 1/sqrt(N);
  * beyond that, the estimate refuses with a ValueError that says how many points tie at which
    ranks and what to do: measure at larger ranks (GRIDE) where the ties vanish; if the values are
    a quantisation of continuous data, dither them (uniform jitter of +-half the quantisation step),
    which restores the continuous law. On a genuine lattice the nearest-neighbour ID is not defined:
    jitter much smaller than the spacing only measures the jitter (mu = 1 + O(jitter) gives an
    ID that grows without bound as the jitter shrinks), and GRIDE refuses it at its bracket edge.
Every result is also checked on the way out: no estimator returns NaN, inf, a non-positive ID or
the edge of GRIDE's bisection bracket silently.
"""

from __future__ import annotations

import functools
import math

import chex
import jax
import jax.numpy as jnp
import numpy as np

from idjax import validation
from idjax.neighbors import (
    EXTRA_CANDIDATES,
    compute_dtype,
    find_duplicates,
    knn,
    knn_in_blocks,
    prepare_points,
)

# DADApy's GRIDE settings: bisection bracket and width, floors for 1 - mu^-d, nudge for mu == 1,
# and the outlier rule mu >= q50 + OUTLIER_SCALE * (q95 - q50).
GRIDE_BRACKET = (1e-3, 1e3)
GRIDE_TOL = 1e-7
GRIDE_SCORE_FLOOR = 2e-7
GRIDE_FISHER_FLOOR = 1e-7
OUTLIER_SCALE = 20.0
_MAX_BISECTIONS = 80  # bracket width 1e6 -> 1e-7 takes 44 halvings; float32 may never reach 1e-7
# A GRIDE result within this relative distance of either bracket end is the bracket, not a maximum.
BRACKET_EDGE = 1e-2


class Estimate(float):
    """A float ID estimate that also says how many points it used and how many were dropped."""

    n_points: int
    n_dropped: int

    def __new__(cls, value: float, n_points: int, n_dropped: int = 0):
        obj = super().__new__(cls, value)
        obj.n_points = int(n_points)
        obj.n_dropped = int(n_dropped)
        return obj

    def __repr__(self) -> str:
        return f"Estimate({float(self)!r}, n_points={self.n_points}, n_dropped={self.n_dropped})"


class _NamedResult(tuple):
    """A tuple with named fields plus `n_dropped`; unpacks like the plain tuple it stands for."""

    _fields: tuple[str, ...] = ()

    def __new__(cls, *values, n_dropped: int = 0):
        obj = super().__new__(cls, values)
        obj.n_dropped = int(n_dropped)
        return obj

    def __getattr__(self, name):
        if name in type(self)._fields:
            return self[type(self)._fields.index(name)]
        raise AttributeError(name)

    def __repr__(self) -> str:
        items = ", ".join(f"{f}={v!r}" for f, v in zip(type(self)._fields, self, strict=True))
        return f"{type(self).__name__}({items}, n_dropped={self.n_dropped})"


class GrideEstimate(_NamedResult):
    """(id, err) at one pair of ranks."""

    _fields = ("id", "err")


class GrideScaling(_NamedResult):
    """(ids, errs, ranks): ids/errs (S,) float, ranks (S,) int = n2 of each scale (n1 = n2 / 2)."""

    _fields = ("ids", "errs", "ranks")


class DecimationScaling(_NamedResult):
    """(ids, errs, sizes): TwoNN mean over repeats, its standard error, and the subset size, (S,) each."""

    _fields = ("ids", "errs", "sizes")


# ---------------------------------------------------------------------------------------------
# Pure kernels on ratios mu (jit-able, vmappable).


def twonn_from_mus(mus: jax.Array, valid: jax.Array | None = None, *, method: str = "fit",
                   fraction: float = 0.9, n_keep: jax.Array | int | None = None) -> jax.Array:
    """TwoNN from ratios mu_i = r_i2 / r_i1.

    Args:
      mus: (N,) ratios >= 1.
      valid: (N,) bool, which points take part (others are ignored as if absent); None = all.
      method: "fit": least squares through the origin of y_j = -log(1 - j/N) on the n smallest log mu
        (j = 1..n, denominator N as in DADApy); "mle": (N - 1) / sum(log mu).
      fraction: kept fraction for "fit": n = int(N * fraction), evaluated in float64 on the host.
      n_keep: overrides n (needed when `valid` is traced: the host computes int(N * fraction) exactly,
        since N * fraction in float32 can fall just below an integer).

    Returns:
      scalar ID.
    """
    chex.assert_rank(mus, 1)
    chex.assert_type(mus, float)
    dtype = mus.dtype
    if valid is None:
        valid = jnp.ones(mus.shape, bool)
        if n_keep is None:
            n_keep = int(mus.shape[0] * fraction)
    elif n_keep is None:
        raise ValueError("pass n_keep = int(valid.sum() * fraction) together with a `valid` mask")
    chex.assert_shape(valid, mus.shape)
    log_mu = jnp.where(valid, jnp.log(jnp.where(valid, mus, 1.0)), 0.0)
    n = jnp.sum(valid).astype(dtype)
    if method == "mle":
        return (n - 1.0) / jnp.sum(log_mu)
    if method != "fit":
        raise ValueError(f"method must be 'fit' or 'mle'; got {method!r}")
    x = jnp.sort(jnp.where(valid, log_mu, jnp.inf))
    j = jnp.arange(1, mus.shape[0] + 1, dtype=dtype)
    use = j <= jnp.asarray(n_keep, dtype)
    y = jnp.where(use, -jnp.log1p(-jnp.where(use, j / n, 0.0)), 0.0)
    x = jnp.where(use, x, 0.0)
    return jnp.sum(x * y) / jnp.sum(x * x)


def _gride_neg_score(d, log_mu, valid, n1, n2, n):
    """Minus the derivative of the GRIDE log-likelihood in d (DADApy's sign convention)."""
    one_minus = 1.0 - jnp.exp(-d * log_mu)
    one_minus = jnp.where(one_minus < GRIDE_SCORE_FLOOR, GRIDE_SCORE_FLOOR, one_minus)
    terms = ((1.0 - n2 + n1) / one_minus + n2 - 1.0) * log_mu
    return jnp.sum(jnp.where(valid, terms, 0.0)) - (n - 1.0) / d


def gride_log_likelihood(d, mus, valid, n1, n2) -> jax.Array:
    """The GRIDE log-likelihood of ID `d` for ratios mu = r_n2 / r_n1 (valid points only)."""
    chex.assert_rank(mus, 1)
    chex.assert_shape(valid, mus.shape)
    dtype = mus.dtype
    n = jnp.sum(valid).astype(dtype)
    log_mu = jnp.where(valid, jnp.log(jnp.where(valid, mus, 2.0)), 1.0)
    k = n2 - n1
    log_beta = jax.scipy.special.gammaln(k) + jax.scipy.special.gammaln(n1) - jax.scipy.special.gammaln(n2)
    terms = (k - 1.0) * jnp.log(jnp.expm1(d * log_mu)) - ((n2 - 1.0) * d + 1.0) * log_mu
    return (n - 1.0) * jnp.log(d) + jnp.sum(jnp.where(valid, terms, 0.0)) - n * log_beta


def gride_from_mus(mus: jax.Array, valid: jax.Array, n1, n2, *, remove_outliers: bool = True
                   ) -> tuple[jax.Array, jax.Array]:
    """GRIDE maximum-likelihood ID and its Cramer-Rao error from ratios mu = r_n2 / r_n1.

    Args:
      mus: (N,) ratios >= 1. mu == 1 exactly is nudged by 10 eps as in DADApy.
      valid: (N,) bool.
      n1, n2: ranks, n1 < n2 (Python or traced scalars, so this vmaps across scales).
      remove_outliers: drop mu >= q50 + 20 (q95 - q50) before the fit, as DADApy does.

    Returns:
      (id, err), scalars. The bisection runs on [1e-3, 1e3] to width 1e-7 like DADApy's.
    """
    chex.assert_rank(mus, 1)
    chex.assert_type(mus, float)
    chex.assert_shape(valid, mus.shape)
    dtype = mus.dtype
    n1 = jnp.asarray(n1, dtype)
    n2 = jnp.asarray(n2, dtype)
    eps = jnp.finfo(dtype).eps
    mus = jnp.where(mus == 1.0, mus + 10.0 * eps, mus)
    fit_valid = valid
    if remove_outliers:
        q95, q50 = jnp.nanpercentile(jnp.where(valid, mus, jnp.nan), jnp.array([95.0, 50.0], dtype))
        fit_valid = valid & (mus < q50 + OUTLIER_SCALE * (q95 - q50))
    log_mu = jnp.log(jnp.where(valid, mus, 2.0))
    n_fit = jnp.sum(fit_valid).astype(dtype)

    lo, hi = (jnp.asarray(b, dtype) for b in GRIDE_BRACKET)
    sign_hi = jnp.sign(_gride_neg_score(hi, log_mu, fit_valid, n1, n2, n_fit))

    def cond(state):
        lo, hi, it = state
        return (jnp.abs(lo - hi) > GRIDE_TOL) & (it < _MAX_BISECTIONS)

    def body(state):
        lo, hi, it = state
        mid = (lo + hi) / 2.0
        same = jnp.sign(_gride_neg_score(mid, log_mu, fit_valid, n1, n2, n_fit)) * sign_hi > 0
        return jnp.where(same, lo, mid), jnp.where(same, mid, hi), it + 1

    lo, hi, _ = jax.lax.while_loop(cond, body, (lo, hi, jnp.asarray(0)))
    d = (lo + hi) / 2.0

    # Fisher information over all valid mu (DADApy evaluates it before outlier removal).
    n_all = jnp.sum(valid).astype(dtype)
    mu_minus_d = jnp.exp(-d * log_mu)
    one_minus = jnp.maximum(1.0 - mu_minus_d, GRIDE_FISHER_FLOOR)
    info_terms = jnp.where(valid, (log_mu / one_minus) ** 2 * mu_minus_d, 0.0)
    fisher = n_all / d**2 + (n2 - n1 - 1.0) * jnp.sum(info_terms)
    return d, 1.0 / jnp.sqrt(fisher)


_gride_from_mus_jit = jax.jit(gride_from_mus, static_argnames=("remove_outliers",))
_gride_scales_jit = jax.jit(jax.vmap(gride_from_mus, in_axes=(1, 1, 0, 0)))
_twonn_jit = jax.jit(twonn_from_mus, static_argnames=("method",))


# ---------------------------------------------------------------------------------------------
# Host-level API with validation and the duplicates policy.


def _valid_points(distances, duplicates: str) -> tuple[np.ndarray, int]:
    """(N,) mask of the points that take part under the duplicates policy, and how many were dropped.

    A point is a duplicate when its nearest neighbour is at distance 0; under "drop" it is left out
    at every rank, so all estimators on one graph use the same points.
    """
    validation.check_duplicates_policy(duplicates)
    zero = np.asarray(distances[:, 0]) <= 0.0
    n_zero = int(zero.sum())
    if n_zero and duplicates == "error":
        raise ValueError(
            f"{n_zero} of {len(zero)} points have a zero distance to their nearest neighbour "
            "(duplicate points), which makes distance ratios infinite. Remove duplicates first "
            "(idjax.find_duplicates) or pass duplicates='drop' to leave those points out."
        )
    if len(zero) - n_zero < 3:
        raise ValueError(f"only {len(zero) - n_zero} points remain after dropping duplicates; need >= 3")
    return ~zero, n_zero


def _ratios(distances, n1: int, n2: int, duplicates: str) -> tuple[jax.Array, jax.Array, int]:
    """mu = r_n2 / r_n1 and the validity mask under the duplicates policy; also the dropped count."""
    distances = validation.as_distances(distances, min_columns=n2)
    valid, n_zero = _valid_points(distances, duplicates)
    check_ties(distances, valid, [(n1, n2)])
    dtype = compute_dtype(distances)
    d = jnp.asarray(distances, dtype)
    valid = jnp.asarray(valid)
    mus = jnp.where(valid, d[:, n2 - 1] / jnp.where(valid, d[:, n1 - 1], 1.0), 1.0)
    return mus, valid, n_zero


def max_tie_fraction(n_points: int) -> float:
    """The largest fraction of tied ratios (mu == 1) an estimate on N points accepts: 1/sqrt(N)."""
    return 1.0 / math.sqrt(n_points)


def check_ties(distances, valid: np.ndarray, rank_pairs: list[tuple[int, int]]) -> None:
    """Refuses rank pairs (n1, n2) at which more than 1/sqrt(N) of the valid points have r_n1 == r_n2.

    See the module docstring for why exact ties mean the ID is not identifiable at that scale.
    """
    valid = np.asarray(valid)
    n_valid = int(valid.sum())
    limit = max_tie_fraction(n_valid)
    bad = []
    for n1, n2 in rank_pairs:
        tied = int(np.sum(valid & (np.asarray(distances[:, n2 - 1]) == np.asarray(distances[:, n1 - 1]))))
        if tied > limit * n_valid:
            bad.append(f"{tied} of {n_valid} points at (n1, n2) = ({n1}, {n2})")
    if bad:
        fine = [f"({a}, {b})" for a, b in rank_pairs if not any(f"({a}, {b})" in item for item in bad)]
        larger = f" (here: {', '.join(fine)})" if fine else ""
        raise ValueError(
            f"tied neighbour distances, r_n1 == r_n2 exactly (mu = 1): {'; '.join(bad)}, more than "
            f"1/sqrt(N) = {limit:.1%} of the points. Under the TwoNN/GRIDE model mu is continuous with "
            "P(mu = 1) = 0, so ties mean the data are discrete (a lattice, quantised or binary values) at this "
            "scale and the ID is not identifiable there. Estimate at larger ranks where the ties vanish"
            f"{larger}; if the values are quantised continuous data, dither them (uniform jitter of +-half the "
            "quantisation step). On a true lattice the ID at this scale is not defined."
        )


def _checked_id(value: float, what: str) -> float:
    """Refuses a non-finite or non-positive ID (a degenerate input the checks before did not catch)."""
    if not math.isfinite(value) or value <= 0.0:
        raise ValueError(
            f"{what} gave ID = {value}: the distance ratios are degenerate (e.g. (almost) all equal to 1). "
            "Check the data for ties or quantisation; see idjax.intrinsic_dim's docstring on ties."
        )
    return value


def _checked_gride(d: np.ndarray, what: str) -> np.ndarray:
    """Refuses GRIDE IDs at the edge of the bisection bracket: the likelihood has no maximum inside it."""
    d = np.atleast_1d(np.asarray(d, np.float64))
    lo, hi = GRIDE_BRACKET
    edge = ~np.isfinite(d) | (d <= lo * (1 + BRACKET_EDGE)) | (d >= hi * (1 - BRACKET_EDGE))
    if edge.any():
        raise ValueError(
            f"{what}: the likelihood has no maximum inside the search bracket [{lo:g}, {hi:g}] (the bisection "
            f"ended at {d[edge][0]:.4g}); the distance ratios are degenerate at this scale (ties, quantised "
            "data, or too few points). Check the data, or use other ranks."
        )
    return d


def twonn(distances, *, method: str = "fit", fraction: float = 0.9, duplicates: str = "error") -> Estimate:
    """TwoNN intrinsic dimension from a kNN distance matrix.

    Args:
      distances: (N, k) ascending neighbour distances, k >= 2, self excluded (as `idjax.knn` gives).
      method: "fit" (DADApy's "base": linear fit through the origin on the `fraction` smallest
        log mu) or "mle" ((N - 1) / sum log mu).
      fraction: kept fraction for "fit" (DADApy default 0.9; the paper's scripts use 0.98).
      duplicates: "error" (default) or "drop" points whose nearest neighbour is at distance 0.

    Returns:
      Estimate (a float) with `.n_points` used and `.n_dropped`.
    """
    if method not in ("fit", "mle"):
        raise ValueError(f"method must be 'fit' or 'mle'; got {method!r}")
    if not 0.0 < fraction <= 1.0:
        raise ValueError(f"fraction must be in (0, 1]; got {fraction}")
    mus, valid, n_dropped = _ratios(distances, 1, 2, duplicates)
    n_keep = int(int(valid.sum()) * fraction)
    if method == "fit" and n_keep < 2:
        raise ValueError(f"fraction={fraction} keeps {n_keep} points; the fit needs at least 2")
    value = float(_twonn_jit(mus, valid, method=method, fraction=fraction, n_keep=n_keep))
    return Estimate(_checked_id(value, f"TwoNN ({method})"), int(valid.sum()), n_dropped)


def gride(distances, n1: int = 1, n2: int = 2, *, duplicates: str = "error") -> GrideEstimate:
    """GRIDE intrinsic dimension and error at neighbour ranks (n1, n2), 1 <= n1 < n2 <= k.

    Returns:
      GrideEstimate (id, err) that unpacks as a pair and carries `.n_dropped`.
    """
    if not (isinstance(n1, int | np.integer) and isinstance(n2, int | np.integer)) or not 1 <= n1 < n2:
        raise ValueError(f"need integer ranks 1 <= n1 < n2; got n1={n1}, n2={n2}")
    mus, valid, n_dropped = _ratios(distances, int(n1), int(n2), duplicates)
    d, err = _gride_from_mus_jit(mus, valid, n1, n2)
    _checked_gride(d, f"GRIDE at (n1, n2) = ({n1}, {n2})")
    return GrideEstimate(float(d), float(err), n_dropped=n_dropped)


def gride_ranks(range_max: int, n_neighbors: int) -> np.ndarray:
    """n2 = 2, 4, 8, ... <= min(range_max, n_neighbors): the scales of `gride_scaling`."""
    top = min(range_max, n_neighbors)
    if top < 2:
        raise ValueError(f"GRIDE needs at least 2 neighbours (range_max={range_max}, k={n_neighbors})")
    return 2 ** np.arange(1, int(math.log2(top)) + 1)


def gride_scaling(distances, range_max: int = 64, *, duplicates: str = "error") -> GrideScaling:
    """GRIDE at every scale (n1, n2) = (2^(i-1), 2^i), n2 = 2, 4, ... <= range_max.

    Args:
      distances: (N, k) ascending neighbour distances with k >= range_max (or the largest power of
        two <= k is used when k < range_max and the caller did not ask for more than it has).
      range_max: the largest n2.
      duplicates: "error" or "drop" points whose nearest neighbour is at distance 0 (dropped from
        every scale so all scales use the same points).

    Returns:
      GrideScaling(ids (S,), errs (S,), ranks (S,) = n2), carrying `.n_dropped`.
    """
    distances = validation.as_distances(distances, min_columns=2)
    if range_max > distances.shape[1]:
        raise ValueError(
            f"range_max = {range_max} needs neighbours up to rank {range_max} but the kNN graph has "
            f"k = {distances.shape[1]}; recompute it with k >= {range_max}"
        )
    ranks = gride_ranks(range_max, distances.shape[1])
    # A positive rank-1 distance makes every ratio finite, so one mask serves all scales.
    valid, n_dropped = _valid_points(distances, duplicates)
    check_ties(distances, valid, [(int(r // 2), int(r)) for r in ranks])
    valid = jnp.asarray(valid)
    dtype = compute_dtype(distances)
    d = jnp.asarray(distances, dtype)
    safe = jnp.where(valid[:, None], d, 1.0)
    mus = safe[:, ranks - 1] / safe[:, ranks // 2 - 1]
    valids = jnp.broadcast_to(valid[:, None], mus.shape)
    ids, errs = _gride_scales_jit(mus, valids, jnp.asarray(ranks // 2, dtype), jnp.asarray(ranks, dtype))
    _checked_gride(ids, "GRIDE scaling")
    return GrideScaling(np.asarray(ids), np.asarray(errs), ranks, n_dropped=n_dropped)


def _twonn_on_subsets(subsets: jax.Array, *, method: str, fraction: float) -> np.ndarray:
    """TwoNN on each of R subsets (R, S, D), with a fresh exact kNN inside each subset."""
    repeats, size, _ = subsets.shape
    if size > 2048:  # few, large subsets: the blocked kNN, one subset at a time
        dist = jnp.stack([knn(subset, 2).distances for subset in subsets])
    else:  # many small subsets: one dense batched search, cheap to compile
        dist = _two_nearest_dense(subsets.astype(compute_dtype(subsets)))
    if bool((dist[..., 0] <= 0).any()):
        raise ValueError("a decimation subset contains duplicate points")
    tied = int(jnp.sum(dist[..., 1] == dist[..., 0]))
    if tied > max_tie_fraction(size) * repeats * size:
        raise ValueError(
            f"tied neighbour distances, r1 == r2 exactly (mu = 1), at {tied} of {repeats * size} points in the "
            f"decimation subsets of {size} points, more than 1/sqrt({size}) = {max_tie_fraction(size):.1%}. "
            "Under the TwoNN model P(mu = 1) = 0, so the data are discrete at this scale and the ID is not "
            "identifiable there; use GRIDE at larger ranks, or dither quantised data (uniform jitter of +-half "
            "the quantisation step)."
        )
    ids = np.asarray(_twonn_batched(dist[..., 1] / dist[..., 0], method, fraction))
    for value in ids:
        _checked_id(float(value), f"TwoNN ({method}) on a decimation subset of {size} points")
    return ids


@jax.jit
def _two_nearest_dense(subsets: jax.Array) -> jax.Array:
    """(R, S, D) -> (R, S, 2): distances to the two nearest other points of the same subset.

    `idjax.knn`'s kernel with each subset as one block, vmapped over the subsets (one compilation for
    many small searches, where a blocked search per subset would compile and launch R times).
    """
    size = subsets.shape[1]
    one_subset = functools.partial(knn_in_blocks, k=2, k_search=min(2 + EXTRA_CANDIDATES, size - 1),
                                   block_size=size, exclude_self=True, rerank_rows=0)
    return jax.vmap(lambda points: one_subset(points, points)[0])(subsets)


@functools.partial(jax.jit, static_argnums=(1, 2))
def _twonn_batched(mus: jax.Array, method: str, fraction: float) -> jax.Array:
    return jax.vmap(lambda m: twonn_from_mus(m, method=method, fraction=fraction))(mus)


def twonn_decimation(
    x,
    *,
    fraction: float = 0.9,
    method: str = "fit",
    min_size: int = 20,
    seed: int = 0,
    duplicates: str = "error",
) -> DecimationScaling:
    """TwoNN scale dependence by decimation.

    For i = 0, 1, ...: shuffle the N points once per level, cut them into 2^i disjoint subsets of
    size round(N / 2^i) (the last points left over are unused), estimate TwoNN on each subset with a
    fresh kNN inside it, and report the mean and the standard error std / sqrt(repeats). Smaller
    subsets probe larger scales. At i = 0 (one repeat) the error is the asymptotic MLE error ID/sqrt(N).

    Args:
      x: (N, D) points.
      fraction, method: as in `twonn`.
      min_size: smallest subset size (levels stop before going below it).
      seed: permutation seed.
      duplicates: "error" or "drop" exact duplicate rows of x before decimating.

    Returns:
      DecimationScaling(ids, errs, sizes), each (S,), sizes descending; `.n_dropped` duplicates.
    """
    validation.check_duplicates_policy(duplicates)
    # The ID is scale-invariant: data at extreme magnitudes are rescaled by a power of two (exact).
    (x,), _ = prepare_points([x], ["x"], min_points=3)
    dup = find_duplicates(x)
    if dup.count:
        if duplicates == "error":
            raise ValueError(
                f"x has {dup.count} duplicate rows; remove them or pass duplicates='drop'"
            )
        x = np.asarray(x)[dup.keep]
    n = x.shape[0]
    if n < max(min_size, 3):
        raise ValueError(f"decimation needs at least {max(min_size, 3)} distinct points; got {n}")
    rng = np.random.default_rng(seed)
    ids, errs, sizes = [], [], []
    level = 0
    while round(n / 2**level) >= max(min_size, 3):
        size = round(n / 2**level)
        repeats = n // size
        order = rng.permutation(n)
        subsets = jnp.asarray(x)[order[: repeats * size]].reshape(repeats, size, -1)
        est = _twonn_on_subsets(subsets, method=method, fraction=fraction)
        ids.append(est.mean())
        errs.append(est.std() / math.sqrt(repeats) if repeats > 1 else est[0] / math.sqrt(size))
        sizes.append(size)
        level += 1
    return DecimationScaling(np.asarray(ids), np.asarray(errs), np.asarray(sizes), n_dropped=dup.count)
