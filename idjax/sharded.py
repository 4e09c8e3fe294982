"""Exact kNN across devices and hosts: query rows sharded over a device mesh, key blocks passed around a ring.

Each of the P devices on the mesh axis holds n_local = ceil(N / P) rows (padding rows are masked by
a global-index vector that travels with them). The steps are `idjax.knn`'s, from the same functions in
`idjax.neighbors`; only where the references live differs. The blocks go around the ring twice
(`lax.ppermute` to the ring neighbour, issued before each step's compute so the transfer can overlap it):
  1. screening: queries and references are centred on `screening_centre` of all N points (one global
     sum) and put in `query_keys`/`reference_keys` form; the reference key blocks travel, and at each
     visit a device computes `screening_scores` (the GEMM form |r|^2 - 2 q.r at the highest precision)
     of its queries against the block, tile by tile, and merges them into a running
     top-(k + EXTRA_CANDIDATES) list with one `lax.top_k` over [running, tile] (a wide tile first selects
     its own best with `smallest_columns`; entries above the running list's last are hidden);
  2. exact re-ranking: the original blocks travel; the candidates are bucketed by the device that owns
     their rows (one integer sort) and, when that block visits, get `exact_sq_distances` (the difference
     form on the original coordinates), chunk by chunk, so every candidate row is gathered once;
     `nearest_by_exact_distance` orders them by (distance, global index).
Self is excluded by global index, so a duplicate of a point is a neighbour at distance 0, as in
`idjax.knn` (which makes room for the point itself with one extra candidate instead: on the ring a
mask by index is needed anyway for the padding rows). Block sizes and the memory per device come from
`idjax.plan_knn` with devices=P, the same formula as on one device: O(N/P (N/P + k D)) per device.

Results equal `idjax.knn` (same screening, same exact re-ranking and (distance, index) order): exactly
on data without float ties, and also with exact ties whenever the distances are computed exactly
(e.g. integer-valued data).

Inputs accepted by `knn_sharded` (the same code runs on one host and, after
`jax.distributed.initialize`, on many):
  * a host (numpy) array (N, D): on one process, or identical on every process; each device receives
    only its own rows;
  * a global `jax.Array` (N, D) living on the mesh's devices, with any sharding (e.g. built with
    `jax.make_array_from_process_local_data`, which needs N divisible by the device count); it is
    padded and resharded by rows inside the compiled program;
  * a `ShardedRows` from `shard_rows(local_rows)`: every process passes only its own contiguous chunk
    of rows (any sizes, global order = process order); no process ever holds all the data.

Outputs are global arrays (N, k): sharded by rows when the mesh axis size divides N, replicated over
the mesh otherwise (jax arrays cannot be sharded unevenly; (N, k) is small next to the data).
`gather_to_host` brings them (or any global array) to numpy on every process; the estimators and
overlaps (`idjax.twonn`, `gride_scaling`, `label_overlap`, `data_overlap`) accept the outputs directly
when they are fully addressable (one host) and need `gather_to_host` first on several hosts.
"""

from __future__ import annotations

import functools
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from idjax import validation
from idjax.neighbors import (
    EXTRA_CANDIDATES,
    GROUP_SIZE,
    Neighbors,
    balanced_block,
    compute_dtype,
    device_memory_bytes,
    exact_sq_distances,
    nearest_by_exact_distance,
    plan_knn,
    query_keys,
    reference_keys,
    screening_centre,
    screening_scores,
    smallest_columns,
)

# Tiles at least this many times GROUP_SIZE * (k + EXTRA_CANDIDATES) columns wide select their own best
# candidates before merging; narrower ones merge directly (the grouped selection would not pay off).
WIDE_TILE_GROUPS = 8


class ShardedRows(NamedTuple):
    """Points spread over the mesh by `shard_rows`, in a padded layout.

    points: (P * n_local, D) global array sharded by rows; padding rows are zero.
    ids: (P * n_local,) int32 global row index of each stored row, -1 for padding.
    positions: (N,) int64 host array, where global row r is stored in `points` (same on every process).
    """

    points: jax.Array
    ids: jax.Array
    positions: np.ndarray
    exponent: int = 0  # points hold the data times 2^-exponent (see `idjax.validation.scale_exponent`)

    @property
    def n(self) -> int:
        return int(self.positions.shape[0])


def default_mesh(axis_name: str = "data") -> Mesh:
    """A 1-D mesh over all devices of all processes (process-major order, as `jax.devices()` lists them)."""
    return Mesh(np.asarray(jax.devices()), (axis_name,))


def _check_mesh(mesh: Mesh | None, axis_name: str) -> Mesh:
    mesh = default_mesh(axis_name) if mesh is None else mesh
    if axis_name not in mesh.axis_names:
        raise ValueError(f"axis_name {axis_name!r} is not an axis of the mesh {dict(mesh.shape)}")
    return mesh


def process_row_range(n: int, process_id: int | None = None, num_processes: int | None = None) -> tuple[int, int]:
    """A balanced contiguous split of N rows over processes: (start, stop) of this process's chunk.

    Convenience for loaders that feed `shard_rows`: process p loads rows start..stop-1.
    """
    p = jax.process_index() if process_id is None else int(process_id)
    count = jax.process_count() if num_processes is None else int(num_processes)
    return p * n // count, (p + 1) * n // count


def _row_layout(mesh: Mesh, axis_name: str, n_pad: int) -> list[slice]:
    """This process's row slices of a (n_pad, ...) array sharded by rows, ascending, deduplicated.

    `make_array_from_process_local_data` maps local rows onto exactly these slices, in this order.
    """
    index_map = NamedSharding(mesh, P(axis_name)).addressable_devices_indices_map((n_pad,))
    starts = sorted({(idx[0].start or 0, idx[0].stop) for idx in index_map.values()})
    return [slice(a, b) for a, b in starts]


def _allgather_host(values: np.ndarray) -> np.ndarray:
    """(n_processes, ...) stack of one equally shaped host array from every process."""
    if jax.process_count() == 1:
        return values[None]
    return np.asarray(multihost_utils.process_allgather(values))


def shard_rows(local_rows, *, mesh: Mesh | None = None, axis_name: str = "data") -> ShardedRows:
    """Builds the sharded point set from each process's own chunk of rows (a collective call).

    Args:
      local_rows: (n_p, D) host array held by this process: its contiguous chunk of the data set. The
        global row order is process 0's rows, then process 1's, ... Chunks may differ in size.
      mesh, axis_name: the device mesh and the axis the rows are sharded over (default: all devices).

    Returns:
      ShardedRows for `knn_sharded`. Each process's rows land on its own devices; none is copied to
      another host.
    """
    mesh = _check_mesh(mesh, axis_name)
    local, biggest = validation.checked_points(local_rows, "local_rows", min_points=0)
    local = np.asarray(local)
    shapes = _allgather_host(np.asarray(local.shape, np.int64))
    biggest = float(_allgather_host(np.asarray([biggest], np.float64)).max())
    integer = bool(_allgather_host(np.asarray([np.issubdtype(local.dtype, np.integer)])).any())
    if len(set(shapes[:, 1].tolist())) != 1:
        raise ValueError(f"processes hold rows of different dimension: {shapes[:, 1].tolist()}")
    counts = shapes[:, 0]
    if int(counts.sum()) < 2:
        raise ValueError(f"the processes hold {int(counts.sum())} rows in all; at least 2 are needed")
    n_dev = mesh.shape[axis_name]
    slices_per_process = _allgather_host(np.asarray([len(_row_layout(mesh, axis_name, n_dev))], np.int64))[:, 0]
    if len(set(slices_per_process.tolist())) != 1:
        raise ValueError(f"processes hold different numbers of row shards: {slices_per_process.tolist()}")
    per_process = int(slices_per_process[0])
    n_local = max(1, math.ceil(int(counts.max()) / per_process))
    n_pad = n_dev * n_local
    layout = _row_layout(mesh, axis_name, n_pad)
    m = per_process * n_local
    me = jax.process_index()
    offset = int(counts[:me].sum())
    count = int(counts[me])
    dtype = np.dtype(compute_dtype(local))
    exponent = validation.scale_exponent(biggest, dtype, integer=integer, dim=local.shape[1], name="local_rows")
    padded = np.zeros((m, local.shape[1]), dtype)
    padded[:count] = np.ldexp(local.astype(np.float64), -exponent) if exponent else local
    ids = np.full((m,), -1, np.int32)
    ids[:count] = offset + np.arange(count, dtype=np.int32)
    points = jax.make_array_from_process_local_data(
        NamedSharding(mesh, P(axis_name, None)), padded, (n_pad, local.shape[1]))
    id_array = jax.make_array_from_process_local_data(NamedSharding(mesh, P(axis_name)), ids, (n_pad,))
    stored_at = np.concatenate([np.arange(s.start, s.stop) for s in layout])[:m]
    local_positions = np.full((m,), -1, np.int64)
    local_positions[:count] = stored_at[:count]
    all_positions = _allgather_host(local_positions)
    positions = np.concatenate([all_positions[p, : counts[p]] for p in range(len(counts))])
    return ShardedRows(points, id_array, positions, exponent)


def _varying(a: jax.Array, axis_name: str) -> jax.Array:
    """Marks a per-device value created inside shard_map (a constant) as varying over the ring axis,
    so it can be a loop carry next to values that do."""
    return jax.lax.pcast(a, axis_name, to="varying")


def _around_the_ring(visit, state, block: jax.Array, block_ids: jax.Array, *, axis_name: str, n_dev: int):
    """Calls visit(state, block, block_ids, owner) for the block of every device, starting with this one's.

    Device j sends the block it holds to j - 1, so at step s this device holds device (me + s)'s block.
    The next block is sent before the current one is used, so the transfer can overlap the compute.
    Returns the final state.
    """
    me = jax.lax.axis_index(axis_name)
    step = functools.partial(_ring_step, visit=visit, me=me, axis_name=axis_name, n_dev=n_dev)
    state, block, block_ids = jax.lax.fori_loop(0, n_dev - 1, step, (state, block, block_ids))
    return visit(state, block, block_ids, (me + n_dev - 1) % n_dev)


def _ring_step(step, carry, *, visit, me, axis_name: str, n_dev: int):
    """One step of `_around_the_ring`: send the held block on, then visit it."""
    state, block, block_ids = carry
    ring = [(j, (j - 1) % n_dev) for j in range(n_dev)]  # device j sends its block to j - 1
    next_block = jax.lax.ppermute(block, axis_name, ring)
    next_ids = jax.lax.ppermute(block_ids, axis_name, ring)
    return visit(state, block, block_ids, (me + step) % n_dev), next_block, next_ids


def _screen_tile(tile, lists, block_key, block_ids, owner, *, query_key, query_ids, me, n_local: int, block: int,
                 k_search: int):
    """Merges one tile of `block` local queries' screening scores against a visiting block into the
    running lists (see `_screen_visit`)."""
    start = tile * block
    qk = jax.lax.dynamic_slice_in_dim(query_key, start, block)
    qid = jax.lax.dynamic_slice_in_dim(query_ids, start, block)
    old = [jax.lax.dynamic_slice_in_dim(a, start, block) for a in lists]
    use_lo = owner < me
    cur_d = jnp.where(use_lo, old[0], old[2])
    cur_p = jnp.where(use_lo, old[1], old[3])
    scores = screening_scores(qk, block_key)
    # Padding keys (id -1) and self (same global id) never count: by index, not by position.
    scores = jnp.where((block_ids[None, :] < 0) | (block_ids[None, :] == qid[:, None]), jnp.inf, scores)
    # Nothing above the running list's last entry can enter it (an equal one loses the tie to the
    # earlier position); hiding those entries makes the heap-based CPU top_k much cheaper.
    scores = jnp.where(scores <= cur_d[:, -1:], scores, jnp.inf)
    if scores.shape[1] >= WIDE_TILE_GROUPS * GROUP_SIZE * k_search:
        # A wide tile first gives up its own best k_search (grouped exact selection, ties to the lower
        # column), so the merge below is one small top_k.
        tile_cols = smallest_columns(scores, k_search)
        scores = jnp.take_along_axis(scores, tile_cols, axis=1)
    else:
        tile_cols = None
    both = jnp.concatenate([cur_d, scores], axis=1)
    _, sel = jax.lax.top_k(-both, k_search)
    new_d = jnp.take_along_axis(both, sel, axis=1)
    kept = jnp.take_along_axis(cur_p, jnp.minimum(sel, k_search - 1), axis=1)
    from_tile = jnp.maximum(sel - k_search, 0)
    if tile_cols is not None:
        from_tile = jnp.take_along_axis(tile_cols, jnp.minimum(from_tile, k_search - 1), axis=1)
    new_p = jnp.where(sel < k_search, kept, owner * n_local + from_tile)
    updated = [jnp.where(use_lo, new_d, old[0]), jnp.where(use_lo, new_p, old[1]),
               jnp.where(use_lo, old[2], new_d), jnp.where(use_lo, old[3], new_p)]
    return tuple(jax.lax.dynamic_update_slice_in_dim(a, u, start, axis=0) for a, u in zip(lists, updated, strict=True))


def _screen_visit(lists, block_key, block_ids, owner, *, n_tiles: int, **tile_args):
    """Screening of all local queries against one visiting block, tile by tile.

    lists: (lo_d, lo_p, hi_d, hi_p), each (rows, k_search): the running best screening scores and
    padded positions (owner * n_local + row, which ascends with the global index) of candidates from
    blocks owned by lower devices (visited after the ring wraps) and from the rest. top_k breaks ties by
    lower position, so keeping the two apart keeps each in (score, position) order; they are merged
    lower-first at the end.
    """
    tile = functools.partial(_screen_tile, block_key=block_key, block_ids=block_ids, owner=owner, **tile_args)
    if n_tiles == 1:
        return tile(0, lists)
    return jax.lax.fori_loop(0, n_tiles, tile, lists)


def _rerank_chunk(state, keys, key_ids, owner, *, slots, flat_pos, queries, n_local: int, k_search: int,
                  chunk: int, stop):
    """Exact squared distances of one chunk of candidates owned by `owner`, written at their sorted slots."""
    c, exact_sorted, ids_sorted = state
    f = jax.lax.dynamic_slice_in_dim(slots, c, chunk)
    valid = c + jnp.arange(chunk, dtype=jnp.int32) < stop
    key_row = jnp.clip(flat_pos[f] - owner * n_local, 0, n_local - 1)
    exact = jax.vmap(exact_sq_distances, in_axes=(0, None, 0))(queries[f // k_search], keys, key_row[:, None])[:, 0]
    old_e = jax.lax.dynamic_slice_in_dim(exact_sorted, c, chunk)
    old_i = jax.lax.dynamic_slice_in_dim(ids_sorted, c, chunk)
    exact_sorted = jax.lax.dynamic_update_slice_in_dim(exact_sorted, jnp.where(valid, exact, old_e), c, 0)
    ids_sorted = jax.lax.dynamic_update_slice_in_dim(ids_sorted, jnp.where(valid, key_ids[key_row], old_i), c, 0)
    return c + chunk, exact_sorted, ids_sorted


def _rerank_visit(buffers, keys, key_ids, owner, *, bounds, **chunk_args):
    """Exact re-ranking of every candidate owned by the visiting block, chunk by chunk; the candidates are
    sorted by owner, so this owner's are slots bounds[owner] .. bounds[owner + 1] - 1."""
    stop = bounds[owner + 1]
    body = functools.partial(_rerank_chunk, keys=keys, key_ids=key_ids, owner=owner, stop=stop, **chunk_args)
    _, exact_sorted, ids_sorted = jax.lax.while_loop(lambda s: s[0] < stop, body, (bounds[owner], *buffers))
    return exact_sorted, ids_sorted


def _ring_kernel(x_local, id_local, centre, *, axis_name: str, n_dev: int, k: int, k_search: int, block: int,
                 chunk: int):
    """Per-device body of the ring search: (n_local, D), (n_local,), (D,) -> (n_local, k), (n_local, k).

    The same steps as `idjax.knn`, with the references spread over the ring:
    Pass 1 (screening): queries and references centred on `centre` (`screening_centre` of all N points),
    in `query_keys`/`reference_keys` form; the reference key blocks go once around the ring and each
    visit merges the block's `screening_scores` into the running top-k_search by one top_k over
    [running, tile] per query tile (`_screen_visit`).
    Pass 2 (exact re-ranking): the original blocks go around again; the candidates, bucketed by owner
    with one integer sort, get `exact_sq_distances` from the visiting block in chunks, so each
    candidate row is gathered once. `nearest_by_exact_distance` then orders them by (exact distance,
    global index), as `idjax.knn` does.
    """
    n_local, _ = x_local.shape
    dtype = x_local.dtype
    me = jax.lax.axis_index(axis_name)
    n_tiles = -(-n_local // block)
    rows = n_tiles * block
    ring = functools.partial(_around_the_ring, axis_name=axis_name, n_dev=n_dev)
    queries = jnp.pad(x_local, ((0, rows - n_local), (0, 0)))
    query_ids = jnp.pad(id_local, (0, rows - n_local), constant_values=-1)
    centred = x_local - centre

    # ---- pass 1: screening.
    empty_d = _varying(jnp.full((rows, k_search), jnp.inf, dtype), axis_name)
    empty_p = _varying(jnp.zeros((rows, k_search), jnp.int32), axis_name)
    query_key = query_keys(jnp.pad(centred, ((0, rows - n_local), (0, 0))))
    visit = functools.partial(_screen_visit, n_tiles=n_tiles, query_key=query_key, query_ids=query_ids, me=me,
                              n_local=n_local, block=block, k_search=k_search)
    lo_d, lo_p, hi_d, hi_p = ring(visit, (empty_d, empty_p, empty_d, empty_p), reference_keys(centred), id_local)
    _, sel = jax.lax.top_k(-jnp.concatenate([lo_d, hi_d], axis=1), k_search)
    positions = jnp.take_along_axis(jnp.concatenate([lo_p, hi_p], axis=1), sel, axis=1)

    # ---- pass 2: exact distances of the candidates, bucketed by the device that owns their rows.
    total = rows * k_search
    flat_pos = positions.reshape(-1)
    order = jnp.sort((flat_pos // n_local) * total + jnp.arange(total, dtype=jnp.int32))
    bounds = jnp.searchsorted(order, jnp.arange(n_dev + 1, dtype=jnp.int32) * total).astype(jnp.int32)
    order = jnp.pad(order, (0, chunk), constant_values=n_dev * total)
    slots = order % total
    buffers = (_varying(jnp.zeros((total + chunk,), dtype), axis_name),
               _varying(jnp.zeros((total + chunk,), jnp.int32), axis_name))
    visit = functools.partial(_rerank_visit, bounds=bounds, slots=slots, flat_pos=flat_pos, queries=queries,
                              n_local=n_local, k_search=k_search, chunk=chunk)
    exact_sorted, ids_sorted = ring(visit, buffers, x_local, id_local)
    exact = jnp.zeros((total,), dtype).at[slots[:total]].set(exact_sorted[:total]).reshape(rows, k_search)
    ids = jnp.zeros((total,), jnp.int32).at[slots[:total]].set(ids_sorted[:total]).reshape(rows, k_search)
    dist, idx = nearest_by_exact_distance(exact, ids, k)
    return dist[:n_local], idx[:n_local]


@functools.lru_cache(maxsize=64)
def _program(mesh: Mesh, axis_name: str, n: int, n_pad: int, k: int, k_search: int, block: int, chunk: int,
             dtype_name: str, compact: bool):
    n_dev = mesh.shape[axis_name]
    dtype = jnp.dtype(dtype_name)
    rows = NamedSharding(mesh, P(axis_name, None))
    vector = NamedSharding(mesh, P(axis_name))
    out = rows if n % n_dev == 0 else NamedSharding(mesh, P())
    kernel = jax.shard_map(
        functools.partial(_ring_kernel, axis_name=axis_name, n_dev=n_dev, k=k, k_search=k_search, block=block,
                          chunk=chunk),
        mesh=mesh, in_specs=(P(axis_name, None), P(axis_name), P()),
        out_specs=(P(axis_name, None), P(axis_name, None)))

    def run(x, ids, positions):
        x = x.astype(dtype)
        if x.shape[0] < n_pad:
            x = jnp.pad(x, ((0, n_pad - x.shape[0]), (0, 0)))
        x = jax.lax.with_sharding_constraint(x, rows)
        if ids is None:
            arange = jnp.arange(n_pad, dtype=jnp.int32)
            ids = jax.lax.with_sharding_constraint(jnp.where(arange < n, arange, -1), vector)
        # Padding rows are zero, so the sum over all stored rows is the sum over the N points.
        centre = screening_centre(jnp.sum(x, axis=0), n)
        dist, idx = kernel(x, ids, centre)
        if compact:
            dist, idx = dist[positions], idx[positions]
        else:
            dist, idx = dist[:n], idx[:n]
        return jax.lax.with_sharding_constraint(dist, out), jax.lax.with_sharding_constraint(idx, out)

    return jax.jit(run)


def _chunk_entries(n_local: int, block: int, k_search: int, n_dev: int) -> int:
    """Candidates per exact re-ranking chunk: about a quarter of one owner's share, and at most one block's
    candidates (block * k_search), the re-ranking memory `idjax.plan_knn` budgets for."""
    total = math.ceil(n_local / block) * block * k_search
    if (n_dev + 1) * total >= 2**31:
        raise ValueError(
            f"{n_local} rows per device x {k_search} candidates is too many to bucket with int32 keys; "
            "use more devices (or fewer points / a smaller k)")
    return int(min(max(256, math.ceil(total / (4 * n_dev) / 256) * 256), block * k_search))


def _max_abs(x: jax.Array) -> float:
    """Largest |entry| of a global array (NaN/inf if any entry is), as `validation.max_abs` on one host."""
    replicated = NamedSharding(x.sharding.mesh, P()) if isinstance(x.sharding, NamedSharding) else None
    check = jax.jit(lambda a: jnp.max(jnp.abs(a.astype(jnp.float32) if jnp.issubdtype(a.dtype, jnp.integer) else a)),
                    out_shardings=replicated)
    return float(check(x))


def knn_sharded(
    x,
    k: int,
    *,
    mesh: Mesh | None = None,
    axis_name: str = "data",
    block_size: int | None = None,
    memory_budget_bytes: int | None = None,
) -> Neighbors:
    """Exact Euclidean nearest neighbours 1..k of every row of `x` among all rows, sharded over a mesh axis.

    Args:
      x: (N, D) points: a host array (one process, or the same on every process), a global jax.Array on
        the mesh's devices (any sharding, any number of processes), or a `ShardedRows` from `shard_rows`.
        float32/64; bf16/fp16 and integers are accumulated in fp32.
      k: number of neighbours (1 <= k <= N - 1); each point is excluded from its own list by index.
      mesh: device mesh (default: a 1-D mesh over all devices); rows are sharded over `axis_name`
        and replicated over any other axes.
      block_size: at most this many local query rows per distance tile (see `idjax.plan_knn`); default
        from `memory_budget_bytes`.
      memory_budget_bytes: bound on one tile's working set (default 512 MiB, as `idjax.knn`).

    Returns:
      Neighbors(distances (N, k) ascending float32 (float64 under x64 with float64 input),
                indices (N, k) int32 global row indices): global arrays sharded by rows if the axis
      size divides N, else replicated over the mesh. Equal to `idjax.knn(x, k)`, including its
      power-of-two rescaling of data at extreme magnitudes and its refusals.
    """
    validation.check_optional_positive(block_size, "block_size")
    validation.check_optional_positive(memory_budget_bytes, "memory_budget_bytes")
    mesh = _check_mesh(mesh, axis_name)
    n_dev = mesh.shape[axis_name]
    positions = None
    if isinstance(x, ShardedRows):
        n, dim = x.n, x.points.shape[1]
        dtype = compute_dtype(x.points)
        sharding = x.points.sharding
        if (not isinstance(sharding, NamedSharding) or sharding.mesh != mesh
                or tuple(sharding.spec)[:1] != (axis_name,)):
            raise ValueError("ShardedRows was built for another mesh or axis; call shard_rows with this mesh")
        points, ids = x.points, x.ids
        exponent = x.exponent
        n_pad = points.shape[0]
        if not np.array_equal(x.positions, np.arange(n)):
            positions = np.asarray(x.positions, np.int32)
    else:
        if isinstance(x, jax.Array) and not x.is_fully_addressable:
            if x.ndim != 2:
                raise ValueError(f"x must be a 2-D array (N points, D features); got shape {tuple(x.shape)}")
            if not set(x.sharding.device_set) <= set(mesh.devices.flat):
                raise ValueError("x lives on devices outside the mesh; pass the mesh it is sharded over")
            biggest = _max_abs(x)
            if not math.isfinite(biggest):
                raise ValueError("x contains NaN/inf entries")
        else:
            x, biggest = validation.checked_points(x, "x")
            if isinstance(x, jax.Array) and not set(x.sharding.device_set) <= set(mesh.devices.flat):
                x = np.asarray(x)
        n, dim = x.shape
        dtype = compute_dtype(x)
        exponent = validation.scale_exponent(biggest, dtype, integer=bool(jnp.issubdtype(x.dtype, jnp.integer)),
                                             dim=dim)
        n_pad = n_dev * max(1, math.ceil(n / n_dev))
        if not isinstance(x, jax.Array):  # each device receives only its own rows
            host = np.zeros((n_pad, dim), dtype)
            host[:n] = np.ldexp(np.asarray(x, np.float64), -exponent) if exponent else np.asarray(x).astype(dtype)
            x = jax.make_array_from_process_local_data(NamedSharding(mesh, P(axis_name, None)), host, host.shape)
        elif exponent:  # a device array: scaled on its devices (exact), keeping its sharding
            x = jax.jit(lambda a: a.astype(dtype) * jnp.asarray(2.0**-exponent, dtype))(x)
        points, ids = x, None
    validation.check_k(k, n - 1, what="neighbours", n_points=n)
    k_search = min(k + EXTRA_CANDIDATES, n - 1)
    itemsize = jnp.dtype(dtype).itemsize
    n_local = n_pad // n_dev
    local_device = next(d for d in mesh.devices.flat if d.process_index == jax.process_index())
    plan = plan_knn(n, dim, k, devices=n_dev, itemsize=itemsize, memory_budget_bytes=memory_budget_bytes,
                    block_size=block_size, memory_bytes=device_memory_bytes(local_device))
    block = balanced_block(n_local, plan.block_size)
    chunk = _chunk_entries(n_local, block, k_search, n_dev)
    program = _program(mesh, axis_name, int(n), int(n_pad), int(k), int(k_search), int(block), chunk,
                       jnp.dtype(dtype).name, positions is not None)
    dist, idx = program(points, ids, positions)
    if exponent:
        dist = dist * jnp.asarray(2.0**exponent, dist.dtype)
    return Neighbors(dist, idx)


def gather_to_host(value):
    """A global jax.Array (or a tuple of them, e.g. `Neighbors`) as numpy on every process.

    On several processes this is a collective (`process_allgather`): every process must call it.
    """
    if isinstance(value, tuple):
        gathered = [gather_to_host(v) for v in value]
        return type(value)(*gathered) if hasattr(value, "_fields") else type(value)(gathered)
    if isinstance(value, jax.Array) and not value.is_fully_addressable:
        return np.asarray(multihost_utils.process_allgather(value, tiled=True))
    return np.asarray(value)
