"""Exact Euclidean k-nearest-neighbour graphs, blocked so memory stays bounded, and duplicate detection.

The kNN graph is the only O(N^2 D) step of a layer profile; everything downstream (TwoNN, GRIDE,
overlaps) reads it in O(N k). Distances come from the GEMM form ||q||^2 + ||r||^2 - 2 q.r at the
highest matmul precision with fp32 (or fp64) accumulation; because that form cancels
catastrophically for near-duplicates, the few candidates it selects are re-ranked with the exact
difference form sum((q - r)^2), which also fixes their reported distances.
"""

from __future__ import annotations

import functools
import math
import os
from typing import NamedTuple

import chex
import jax
import jax.numpy as jnp
import numpy as np

from idjax import validation

DEFAULT_MEMORY_BUDGET_BYTES = 512 * 2**20
# Candidates beyond k re-ranked exactly, so near-ties at the k boundary are decided by exact distances.
EXTRA_CANDIDATES = 8
# Columns per group in the two-stage exact selection (see `smallest_columns`).
GROUP_SIZE = 32
# Gathered candidate rows per exact re-ranking step on CPU (see `rerank_rows`).
RERANK_CHUNK_BYTES = 8 * 2**20


class Neighbors(NamedTuple):
    """The kNN graph. distances: (N, k) ascending; indices: (N, k) int32, rank 1 first."""

    distances: jax.Array
    indices: jax.Array


def compute_dtype(x: jax.Array | np.ndarray) -> jnp.dtype:
    """float64 when the input is float64 and x64 is enabled, else float32 (bf16/fp16 accumulate in fp32)."""
    if jnp.dtype(x.dtype) == jnp.float64 and jax.config.jax_enable_x64:
        return jnp.dtype(jnp.float64)
    return jnp.dtype(jnp.float32)


def device_memory_bytes(device: jax.Device | None = None) -> int:
    """Memory of one device: the allocator limit on GPU/TPU, physical RAM on CPU."""
    device = device or jax.devices()[0]
    stats = None
    try:
        stats = device.memory_stats()
    except Exception:  # CPU backends may not implement memory_stats
        stats = None
    if stats and stats.get("bytes_limit"):
        return int(stats["bytes_limit"])
    return int(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))


class KnnPlan(NamedTuple):
    """How a kNN graph will be computed: rows per query block, and the memory it needs per device."""

    block_size: int
    bytes_per_device: int
    devices: int


def plan_knn(n: int, dim: int, k: int, *, devices: int = 1, memory_bytes: int | None = None,
             itemsize: int = 4, memory_budget_bytes: int | None = None) -> KnnPlan:
    """Chooses the query block size from N, D, k and the device memory, or says what would fit.

    Per device: the reference points it holds (N/P rows on a ring, all N on one device), its queries,
    the (N/P, k) outputs, and one block's working set (~3 (b, N/P) matrices + b (k+8) D candidates).
    Uses at most half the device memory, so the rest of the program keeps room.

    Raises:
      MemoryError naming the sizes and what would fit (fewer points, or more devices).
    """
    sizes = {"n": n, "dim": dim, "k": k, "devices": devices, "itemsize": itemsize}
    for name, value in sizes.items():
        if isinstance(value, bool) or not isinstance(value, int | np.integer) or value < 1:
            raise ValueError(f"plan_knn: {name} must be a positive integer; got {value!r}")
    validation.check_optional_positive(memory_bytes, "memory_bytes")
    validation.check_optional_positive(memory_budget_bytes, "memory_budget_bytes")
    memory = memory_bytes or device_memory_bytes()
    usable = memory // 2
    rows = -(-n // devices)
    ref_rows = n if devices == 1 else 2 * rows  # a ring holds its own block and the one in flight
    k_search = min(k + EXTRA_CANDIDATES, max(n - 1, 1))
    fixed = itemsize * (ref_rows * dim + rows * dim) + rows * k * (itemsize + 4)
    per_row = itemsize * (3 * ref_rows + 2 * k_search * dim + 4 * k_search)
    if fixed + 8 * per_row > usable:
        gib = 2**30
        fit_points = int(usable / (itemsize * 2 * dim + k * (itemsize + 4) + 8 * itemsize * 3))
        more_devices = -(-(fixed + 8 * per_row) // usable) * devices
        raise MemoryError(
            f"a kNN graph of N={n} points of dimension D={dim} with k={k} needs about "
            f"{(fixed + 8 * per_row) / gib:.1f} GiB per device on {devices} device(s), but only "
            f"{usable / gib:.1f} GiB (half of {memory / gib:.1f} GiB) is usable. Options: at most ~{fit_points} "
            f"points on one device, or about {more_devices} devices with idjax.sharded.knn_sharded."
        )
    budget = min(usable - fixed, memory_budget_bytes or DEFAULT_MEMORY_BUDGET_BYTES)
    block = max(8, min(4096, int(budget // per_row) // 8 * 8))
    return KnnPlan(block, int(fixed + block * per_row), devices)


def smallest_columns(d2: jax.Array, count: int, group_size: int = GROUP_SIZE) -> jax.Array:
    """Column indices of the `count` smallest entries of each row of d2 (b, n), exactly.

    Two stages instead of one top_k over all n columns (the bottleneck on CPU): split each row into
    groups of `group_size` columns and rank the groups by their minimum. Every one of the `count`
    smallest entries lies in a group whose minimum is <= the count-th smallest value, and at most
    `count` groups have such a minimum, so the `count` best groups contain them all; a second top_k
    over those count * group_size entries finishes exactly. Ties resolve to the lower column as in
    a single top_k.
    """
    b, n = d2.shape
    n_groups = -(-n // group_size)
    if n_groups <= count:
        return jax.lax.top_k(-d2, count)[1]
    if n % group_size:  # callers that can, pad the GEMM instead: this pad copies the whole block
        d2 = jnp.pad(d2, ((0, 0), (0, n_groups * group_size - n)), constant_values=jnp.inf)
    groups = d2.reshape(b, n_groups, group_size)
    group_min = groups.min(axis=-1)
    _, best_groups = jax.lax.top_k(-group_min, count)
    best_groups = jnp.sort(best_groups, axis=-1)  # ascending columns, so ties keep the lower index
    candidates = jnp.take_along_axis(groups, best_groups[:, :, None], axis=1).reshape(b, -1)
    # The chosen groups' minima are `count` entries <= the largest of them, so no entry above it can
    # be selected: hiding those (all but a few beyond `count`) halves the cost of the heap-based CPU
    # top_k, with the same result. (The bound is recomputed from the minima rather than taken from
    # top_k's values: using those makes XLA's CPU top_k several times slower.)
    bound = jnp.take_along_axis(group_min, best_groups, axis=1).max(axis=1, keepdims=True)
    candidates = jnp.where(candidates <= bound, candidates, jnp.inf)
    _, position = jax.lax.top_k(-candidates, count)
    return jnp.take_along_axis(best_groups, position // group_size, axis=1) * group_size + position % group_size


def _exact_sq_distances(q: jax.Array, ref: jax.Array, candidates: jax.Array) -> jax.Array:
    """sum((q - ref[c])^2) over features for each candidate c of one query: (D,), (N, D), (c,) -> (c,)."""
    diff = q[None, :] - ref[candidates]
    return jnp.sum(diff * diff, axis=-1)


def rerank_rows(n_candidates: int, dim: int, itemsize: int, platform: str | None = None) -> int:
    """Query rows re-ranked at a time. On CPU, as many as keep the gathered candidate rows within
    RERANK_CHUNK_BYTES (cache-sized: 5x faster than gathering a whole block at once, same neighbours);
    on accelerators the whole block at once (0), where one wide gather is what the hardware wants.
    `platform` defaults to JAX's default backend."""
    if (platform or jax.default_backend()) != "cpu":
        return 0
    return max(1, RERANK_CHUNK_BYTES // (n_candidates * dim * itemsize))


@functools.partial(jax.jit, static_argnames=("k", "k_search", "block_size", "exclude_self", "rerank_rows"))
def _knn_blocks(queries: jax.Array, ref: jax.Array, *, k: int, k_search: int, block_size: int,
                exclude_self: bool, rerank_rows: int) -> tuple[jax.Array, jax.Array]:
    chex.assert_rank([queries, ref], 2)
    chex.assert_equal_shape([queries, ref], dims=1)
    chex.assert_type([queries, ref], float)
    n_query, dim = queries.shape
    n_ref = ref.shape[0]
    n_blocks = -(-n_query // block_size)
    padded = jnp.pad(queries, ((0, n_blocks * block_size - n_query), (0, 0)))
    # Distances are translation invariant; centering shrinks |q|^2 + |r|^2 and with it the GEMM form's
    # rounding error (representations often sit far from the origin). The centre is rounded to integers
    # so integer-valued data stay exact (exact ties keep resolving to the lower index), and the exact
    # recomputation uses the original coordinates, since centering may round them.
    center = jnp.round(jnp.mean(ref, axis=0))
    centered_ref = ref - center
    centered_queries = padded - center
    ref_sq = jnp.sum(centered_ref * centered_ref, axis=-1)
    # One GEMM yields the ranking key |r|^2 - 2 q.r directly (|q|^2 is constant per row): queries get
    # a column of ones, references -2 r and a column |r|^2, padded to a multiple of 8 columns. This
    # saves a full elementwise pass over the (b, N) block, about a third of the GEMM's own time on CPU.
    # Reference rows are padded to a multiple of GROUP_SIZE with an infinite key, never selected.
    extra = 8 - dim % 8 if dim % 8 else 8
    ref_rows = -(-n_ref // GROUP_SIZE) * GROUP_SIZE
    ref_key = jnp.concatenate([-2.0 * centered_ref, ref_sq[:, None], jnp.zeros((n_ref, extra - 1), ref.dtype)], 1)
    ref_key = jnp.pad(ref_key, ((0, ref_rows - n_ref), (0, 0)))
    ref_key = ref_key.at[n_ref:, dim].set(jnp.inf)
    ones = jnp.ones((padded.shape[0], 1), padded.dtype)
    query_key = jnp.concatenate([centered_queries, ones, jnp.zeros((padded.shape[0], extra - 1), padded.dtype)], 1)
    n_candidates = k_search + 1 if exclude_self else k_search

    def one_block(block_index):
        start = block_index * block_size
        q = jax.lax.dynamic_slice_in_dim(padded, start, block_size)
        qk = jax.lax.dynamic_slice_in_dim(query_key, start, block_size)
        keys = jnp.matmul(qk, ref_key.T, precision=jax.lax.Precision.HIGHEST, preferred_element_type=q.dtype)
        rows = start + jnp.arange(block_size, dtype=jnp.int32)
        # The point itself has the smallest key (distance 0), so one extra candidate makes room for it;
        # it is excluded below by index, never by position: duplicates of a point are real neighbours.
        candidates = smallest_columns(keys, n_candidates)
        # Exact re-ranking of every candidate by differences of the original coordinates: the GEMM
        # form cancels for close pairs, and exact distances make ties (and results across the
        # single-device and sharded paths) deterministic.
        if 0 < rerank_rows < block_size:
            # The barrier keeps XLA from fusing the selection into the loop below (measured: 6-10x
            # slower at N <= 2336, where the selection is one top_k over all columns).
            q_c, cand_c = jax.lax.optimization_barrier((q, candidates))
            d2 = jax.lax.map(lambda qc: _exact_sq_distances(qc[0], ref, qc[1]), (q_c, cand_c),
                             batch_size=rerank_rows)
        else:
            d2 = jax.vmap(_exact_sq_distances, in_axes=(0, None, 0))(q, ref, candidates)
        if exclude_self:
            d2 = jnp.where(candidates == rows[:, None], jnp.inf, d2)
        # Sort by (distance, index) so ties resolve to the lower index, deterministically.
        d2, candidates = jax.lax.sort((d2, candidates), dimension=-1, num_keys=2)
        return jnp.sqrt(d2[:, :k]), candidates[:, :k]

    dist, idx = jax.lax.map(one_block, jnp.arange(n_blocks))
    return dist.reshape(-1, k)[:n_query], idx.reshape(-1, k)[:n_query]


def knn(
    x: jax.Array | np.ndarray,
    k: int,
    *,
    y: jax.Array | np.ndarray | None = None,
    block_size: int | None = None,
    memory_budget_bytes: int | None = None,
) -> Neighbors:
    """Exact Euclidean nearest neighbours 1..k of every row of `x`.

    Args:
      x: (N, D) query points (float32/64, bf16/fp16 accepted and accumulated in fp32).
      k: number of neighbours.
      y: optional (M, D) reference set; if given, neighbours of each x row are searched among y and
        nothing is excluded. If absent, neighbours are searched in x itself and each point is excluded
        from its own list by index (so an exact duplicate appears as a neighbour at distance 0).
      block_size: query rows per block; default from `memory_budget_bytes`.
      memory_budget_bytes: bound on the working set of one block (default 512 MiB).

    Returns:
      Neighbors(distances (N, k) ascending float32 (float64 under x64 with float64 input),
                indices (N, k) int32).

    Data at any magnitude the output dtype can hold give the graph they give at unit scale: outside
    [2^-32, 2^32] they are rescaled internally by a power of two (exact) and the distances scaled
    back; integers float32 cannot represent exactly, or magnitudes whose distances float32 cannot
    hold (outside about 4e-31..2e37), are refused with a ValueError.
    """
    arrays, exponent = prepare_points([x] if y is None else [x, y], ["x", "y"])
    x, ref = arrays[0], arrays[-1]
    if ref.shape[1] != x.shape[1]:
        raise ValueError(f"x has dimension {x.shape[1]} but y has dimension {ref.shape[1]}")
    available = ref.shape[0] - (1 if y is None else 0)
    validation.check_k(k, available, what="neighbours", n_points=ref.shape[0])
    dtype = x.dtype
    k_search = min(k + EXTRA_CANDIDATES, available)  # one more is added for the point itself
    validation.check_optional_positive(block_size, "block_size")
    validation.check_optional_positive(memory_budget_bytes, "memory_budget_bytes")
    if block_size is None:
        block_size = plan_knn(ref.shape[0], ref.shape[1], k, itemsize=dtype.itemsize,
                              memory_budget_bytes=memory_budget_bytes).block_size
    block_size = int(min(block_size, max(8, math.ceil(x.shape[0] / 8) * 8)))
    n_candidates = k_search + (1 if y is None else 0)
    dist, idx = _knn_blocks(x, ref, k=int(k), k_search=int(k_search), block_size=block_size,
                            exclude_self=y is None,
                            rerank_rows=rerank_rows(n_candidates, ref.shape[1], dtype.itemsize,
                                                    platform=next(iter(ref.devices())).platform))
    if exponent:
        dist = dist * jnp.asarray(2.0**exponent, dist.dtype)
    return Neighbors(dist, idx)


def prepare_points(arrays, names, *, min_points: int = 2) -> tuple[list[jax.Array], int]:
    """Validates (N, D) point sets and returns them in one compute dtype (the first one's), all scaled
    by the same 2^-exponent, with that exponent (0 for data of ordinary magnitude).

    The exponent comes from the largest magnitude over all sets (`validation.scale_exponent`), which
    is also the finiteness check, so the data are read once.
    """
    checked = [validation.checked_points(a, name, min_points=min_points)
               for a, name in zip(arrays, names[: len(arrays)], strict=True)]
    dtype = compute_dtype(checked[0][0])
    integer = any(jnp.issubdtype(a.dtype, jnp.integer) for a, _ in checked)
    exponent = validation.scale_exponent(max(b for _, b in checked), dtype, integer=integer,
                                         dim=checked[0][0].shape[1], name=" and ".join(names[: len(arrays)]))
    return [validation.scaled(a, exponent, dtype) for a, _ in checked], exponent


class Duplicates(NamedTuple):
    """Exact duplicate rows. is_duplicate: (N,) bool, True for every copy after the first occurrence;
    first_occurrence: (N,) int, index of the first row equal to each row."""

    is_duplicate: np.ndarray
    first_occurrence: np.ndarray

    @property
    def count(self) -> int:
        return int(self.is_duplicate.sum())

    @property
    def keep(self) -> np.ndarray:
        """Indices of the rows to keep (first occurrences), ascending."""
        return np.flatnonzero(~self.is_duplicate)


def find_duplicates(x: jax.Array | np.ndarray) -> Duplicates:
    """Finds rows of `x` (N, D) that exactly equal an earlier row (0.0 and -0.0 count as equal)."""
    x = validation.as_points(x, "x", min_points=1)
    arr = np.ascontiguousarray(np.asarray(x) + 0.0)  # + 0.0 maps -0.0 to 0.0 before comparing bytes
    rows = arr.view(np.dtype((np.void, arr.dtype.itemsize * arr.shape[1]))).ravel()
    _, first, inverse = np.unique(rows, return_index=True, return_inverse=True)
    first_occurrence = first[inverse.ravel()]
    return Duplicates(first_occurrence != np.arange(len(rows)), first_occurrence)
