"""Exact Euclidean k-nearest-neighbour graphs, blocked so memory stays bounded, and duplicate detection.

The kNN graph is the only O(N^2 D) step of a layer profile; everything downstream (TwoNN, GRIDE,
overlaps) reads it in O(N k). Distances come from the GEMM form ||q||^2 + ||r||^2 - 2 q.r at the
highest matmul precision with fp32 (or fp64) accumulation; because that form cancels
catastrophically for near-duplicates, the few candidates it selects are re-ranked with the exact
difference form sum((q - r)^2), which also fixes their reported distances.
"""

from __future__ import annotations

import functools
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
    """How a kNN graph will be computed: query rows per block, and the memory it needs per device."""

    block_size: int
    bytes_per_device: int
    devices: int


def plan_knn(n: int, dim: int, k: int, *, devices: int = 1, memory_bytes: int | None = None,
             itemsize: int = 4, memory_budget_bytes: int | None = None, block_size: int | None = None) -> KnnPlan:
    """Chooses the query block size of `knn` (devices=1) and of the ring of `idjax.sharded.knn_sharded`
    (devices=P) from one memory model, or says what would fit.

    With rows = ceil(N / P) query rows per device, columns = the reference rows one block is compared
    with at a time (all N on one device, one visiting block of N / P rows on the ring) and s = k + 8
    screened candidates per query, one device holds
      fixed:     the points (N D references and N D queries on one device; on the ring its own block, the
                 visiting block and its incoming copy, 3 rows D) and the candidate lists and outputs
                 (rows k (itemsize + 4) bytes on one device; on the ring the running lists of both
                 passes and the re-ranking buffers, 12 rows s words);
      per block: for each of its query rows, the (1, columns) score row and two transient copies of it
                 (3 columns words), its gathered candidate rows and their differences for the exact
                 re-ranking (2 s D words) and its candidate lists (4 s words). The re-ranking term is
                 a whole block's candidates, what accelerators gather at once; on CPU (`rerank_rows`)
                 and on the ring (chunks of at most one block's candidates) it is an upper bound.
    The block is the largest multiple of 8 in [8, 4096] whose working set fits
    min(memory_budget_bytes, usable memory - fixed), where usable is half the device memory (the rest
    of the program keeps room), then balanced: rows are cut into ceil(rows / block) equal blocks
    (rounded up to a multiple of 8), so the last block is not mostly padding. An explicit `block_size`
    replaces the first step (the cap, rounded down to a multiple of 8; balanced the same way).

    Raises:
      MemoryError naming the sizes and what would fit (fewer points, or more devices).
    """
    sizes = {"n": n, "dim": dim, "k": k, "devices": devices, "itemsize": itemsize}
    for name, value in sizes.items():
        if isinstance(value, bool) or not isinstance(value, int | np.integer) or value < 1:
            raise ValueError(f"plan_knn: {name} must be a positive integer; got {value!r}")
    validation.check_optional_positive(memory_bytes, "memory_bytes")
    validation.check_optional_positive(memory_budget_bytes, "memory_budget_bytes")
    validation.check_optional_positive(block_size, "block_size")
    memory = memory_bytes or device_memory_bytes()
    usable = memory // 2
    rows = -(-n // devices)
    ring = devices > 1
    columns = rows if ring else n
    k_search = min(k + EXTRA_CANDIDATES, max(n - 1, 1))
    held_rows = 3 * rows if ring else 2 * n
    lists = 12 * rows * k_search * itemsize if ring else rows * k * (itemsize + 4)
    fixed = itemsize * held_rows * dim + lists
    per_row = itemsize * (3 * columns + 2 * k_search * dim + 4 * k_search)
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
    if block_size is None:
        budget = min(usable - fixed, memory_budget_bytes or DEFAULT_MEMORY_BUDGET_BYTES)
        block_size = max(8, min(4096, int(budget // per_row) // 8 * 8))
    block = balanced_block(rows, int(block_size))
    return KnnPlan(block, int(fixed + block * per_row), devices)


def balanced_block(rows: int, block_size: int) -> int:
    """Rows per block for `rows` query rows in blocks of at most `block_size`: a multiple of 8 (at least 8,
    at most block_size rounded down to a multiple of 8), equal across the blocks, so the last block is not
    mostly padding."""
    cap = max(8, block_size // 8 * 8)
    block = -(-rows // -(-rows // cap))  # ceil(rows / number of blocks) <= cap
    return -(-block // 8) * 8


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


def screening_centre(points_sum: jax.Array, n_points: int | jax.Array) -> jax.Array:
    """The point subtracted from queries and references before screening: their mean, rounded to integers. (D,).

    Distances are translation invariant; centring shrinks |q|^2 + |r|^2 and with it the GEMM form's
    rounding error (representations often sit far from the origin). The centre is rounded to integers
    so integer-valued data stay exact (exact ties keep resolving to the lower index); the exact
    re-ranking uses the original coordinates, since centring may round them. Takes the coordinate sum
    (D,) of the reference points rather than the points, so a sharded caller can pass a sum over devices.
    """
    return jnp.round(points_sum / n_points)


def _key_padding(dim: int) -> int:
    """Columns appended to D-dimensional points in the screening GEMM: the constant column and zeros up
    to a multiple of 8."""
    return 8 - dim % 8 if dim % 8 else 8


def query_keys(centred_queries: jax.Array) -> jax.Array:
    """(B, D) centred queries -> (B, D + pad) GEMM operand [q, 1, 0, ...] (see `screening_scores`)."""
    rows, dim = centred_queries.shape
    pad = _key_padding(dim)
    ones = jnp.ones((rows, 1), centred_queries.dtype)
    return jnp.concatenate([centred_queries, ones, jnp.zeros((rows, pad - 1), centred_queries.dtype)], 1)


def reference_keys(centred_ref: jax.Array, rows: int | None = None) -> jax.Array:
    """(M, D) centred references -> (rows, D + pad) GEMM operand [-2 r, |r|^2, 0, ...] (see `screening_scores`).

    rows >= M (default M) pads with rows whose score is +inf, never selected.
    """
    n_ref, dim = centred_ref.shape
    pad = _key_padding(dim)
    ref_sq = jnp.sum(centred_ref * centred_ref, axis=-1)
    keys = jnp.concatenate([-2.0 * centred_ref, ref_sq[:, None], jnp.zeros((n_ref, pad - 1), centred_ref.dtype)], 1)
    if rows is None or rows == n_ref:
        return keys
    keys = jnp.pad(keys, ((0, rows - n_ref), (0, 0)))
    return keys.at[n_ref:, dim].set(jnp.inf)


def screening_scores(query_key: jax.Array, ref_key: jax.Array) -> jax.Array:
    """(B, D + pad), (M, D + pad) -> (B, M) screening scores |r|^2 - 2 q.r = |q - r|^2 - |q|^2.

    One GEMM at the highest precision, accumulated in the inputs' dtype, yields the ranking key
    directly (|q|^2 is constant per query row, so it is left out): this saves a full elementwise pass
    over the (B, M) block, about a third of the GEMM's own time on CPU. The form cancels for close
    pairs, so it only screens candidates; `exact_sq_distances` decides.
    """
    return jnp.matmul(query_key, ref_key.T, precision=jax.lax.Precision.HIGHEST,
                      preferred_element_type=query_key.dtype)


def exact_sq_distances(query: jax.Array, ref: jax.Array, candidates: jax.Array) -> jax.Array:
    """sum((q - ref[c])^2) over features for each candidate c of one query: (D,), (M, D), (C,) -> (C,).

    The difference form is exact up to one rounding per feature, also for near duplicates; vmap it over queries.
    """
    diff = query[None, :] - ref[candidates]
    return jnp.sum(diff * diff, axis=-1)


def nearest_by_exact_distance(sq_distances: jax.Array, ids: jax.Array, k: int) -> tuple[jax.Array, jax.Array]:
    """(B, C) exact squared distances and the candidates' global indices -> the k nearest, (B, k) distances
    ascending and (B, k) indices, ties to the lower index (a sort on (distance, index))."""
    sq_distances, ids = jax.lax.sort((sq_distances, ids), dimension=-1, num_keys=2)
    return jnp.sqrt(sq_distances[:, :k]), ids[:, :k]


def rerank_rows(n_candidates: int, dim: int, itemsize: int, platform: str | None = None) -> int:
    """Query rows re-ranked at a time. On CPU, as many as keep the gathered candidate rows within
    RERANK_CHUNK_BYTES (cache-sized: 5x faster than gathering a whole block at once, same neighbours);
    on accelerators the whole block at once (0), where one wide gather is what the hardware wants.
    `platform` defaults to JAX's default backend."""
    if (platform or jax.default_backend()) != "cpu":
        return 0
    return max(1, RERANK_CHUNK_BYTES // (n_candidates * dim * itemsize))


def knn_block(queries: jax.Array, query_key: jax.Array, query_ids: jax.Array, ref: jax.Array, ref_key: jax.Array,
              *, k: int, n_candidates: int, exclude_self: bool, rerank_rows: int) -> tuple[jax.Array, jax.Array]:
    """The k nearest references of one block of queries: screening, then exact re-ranking.

    Args:
      queries: (B, D) original coordinates; query_key: (B, D + pad) their `query_keys`;
      query_ids: (B,) int32 their indices among the references (used when exclude_self).
      ref: (M, D) original coordinates; ref_key: (M', D + pad) their `reference_keys`, M' >= M.
      k: neighbours kept; n_candidates: candidates screened (k + EXTRA_CANDIDATES, plus one for the point
        itself when exclude_self: its score is the smallest, so one extra candidate makes room for it and
        it is excluded by index, never by position: duplicates of a point are real neighbours).
      rerank_rows: query rows re-ranked at a time (`rerank_rows`), 0 = all at once.

    Returns:
      (B, k) distances ascending and (B, k) int32 indices, ties to the lower index.
    """
    candidates = smallest_columns(screening_scores(query_key, ref_key), n_candidates)
    block_rows = queries.shape[0]
    if 0 < rerank_rows < block_rows:
        # The barrier keeps XLA from fusing the selection into the loop below (measured: 6-10x
        # slower at N <= 2336, where the selection is one top_k over all columns).
        q_c, cand_c = jax.lax.optimization_barrier((queries, candidates))
        d2 = jax.lax.map(lambda qc: exact_sq_distances(qc[0], ref, qc[1]), (q_c, cand_c), batch_size=rerank_rows)
    else:
        d2 = jax.vmap(exact_sq_distances, in_axes=(0, None, 0))(queries, ref, candidates)
    if exclude_self:
        d2 = jnp.where(candidates == query_ids[:, None], jnp.inf, d2)
    return nearest_by_exact_distance(d2, candidates, k)


def knn_in_blocks(queries: jax.Array, ref: jax.Array, *, k: int, k_search: int, block_size: int,
                  exclude_self: bool, rerank_rows: int) -> tuple[jax.Array, jax.Array]:
    """Exact kNN of (N, D) queries among (M, D) references, `block_size` query rows at a time: pure and
    jit-able (static keywords), vmappable over point sets.

    Returns (N, k) distances ascending and (N, k) int32 indices into ref; with exclude_self the queries
    are the references and each row's own index is excluded.
    """
    chex.assert_rank([queries, ref], 2)
    chex.assert_equal_shape([queries, ref], dims=1)
    chex.assert_type([queries, ref], float)
    n_query = queries.shape[0]
    n_ref = ref.shape[0]
    n_blocks = -(-n_query // block_size)
    padded = jnp.pad(queries, ((0, n_blocks * block_size - n_query), (0, 0)))
    centre = screening_centre(jnp.sum(ref, axis=0), n_ref)
    # Reference rows are padded to a multiple of GROUP_SIZE with an infinite score, never selected, so
    # the grouped selection never pads the (b, M) block itself.
    ref_key = reference_keys(ref - centre, rows=-(-n_ref // GROUP_SIZE) * GROUP_SIZE)
    query_key = query_keys(padded - centre)
    block = functools.partial(knn_block, ref=ref, ref_key=ref_key, k=k,
                              n_candidates=k_search + 1 if exclude_self else k_search,
                              exclude_self=exclude_self, rerank_rows=rerank_rows)
    if n_blocks == 1:
        dist, idx = block(padded, query_key, jnp.arange(block_size, dtype=jnp.int32))
        return dist[:n_query], idx[:n_query]
    blocks = (padded.reshape(n_blocks, block_size, -1), query_key.reshape(n_blocks, block_size, -1),
              jnp.arange(n_blocks * block_size, dtype=jnp.int32).reshape(n_blocks, block_size))
    dist, idx = jax.lax.map(lambda b: block(*b), blocks)
    return dist.reshape(-1, k)[:n_query], idx.reshape(-1, k)[:n_query]


_knn_blocks = jax.jit(knn_in_blocks, static_argnames=("k", "k_search", "block_size", "exclude_self", "rerank_rows"))


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
      block_size: at most this many query rows per block (see `plan_knn`); default from `memory_budget_bytes`.
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
    block_size = balanced_block(x.shape[0], plan_knn(ref.shape[0], ref.shape[1], k, itemsize=dtype.itemsize,
                                                     memory_budget_bytes=memory_budget_bytes,
                                                     block_size=block_size).block_size)
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
