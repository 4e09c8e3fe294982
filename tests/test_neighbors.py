"""idjax.knn against a brute-force numpy reference, duplicates, validation."""

import jax
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import idjax
from tests.neighbour_checks import assert_same_neighbours


def brute_force(x, k, y=None):
    """float64 numpy reference: distances ascending, ties to the lower index, self excluded by index."""
    x = np.asarray(x, np.float64)
    ref = x if y is None else np.asarray(y, np.float64)
    d = np.sqrt(((x[:, None, :] - ref[None, :, :]) ** 2).sum(-1))
    if y is None:
        np.fill_diagonal(d, np.inf)
    idx = np.argsort(d, axis=1, kind="stable")[:, :k]
    return np.take_along_axis(d, idx, 1), idx


@settings(max_examples=25, deadline=None)
@given(
    n=st.integers(6, 70),
    dim=st.integers(1, 9),
    k_frac=st.floats(0.05, 1.0),
    seed=st.integers(0, 2**31 - 1),
    block=st.sampled_from([None, 8, 16]),
)
def test_knn_matches_brute_force(n, dim, k_frac, seed, block):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, dim)).astype(np.float32)
    k = max(1, int(k_frac * (n - 1)))
    dist, idx = idjax.knn(x, k, block_size=block)
    ref_d, ref_i = brute_force(x, k)
    np.testing.assert_allclose(np.asarray(dist), ref_d, rtol=1e-5, atol=1e-5)
    # Index sets may only differ where two distances tie within float32 resolution.
    mismatch = np.asarray(idx) != ref_i
    if mismatch.any():
        np.testing.assert_allclose(np.asarray(dist)[mismatch], ref_d[mismatch], rtol=1e-5)


def test_chunked_exact_reranking_equals_one_gather(monkeypatch):
    """The CPU re-ranking in cache-sized row chunks (with a remainder chunk) gives the same neighbours;
    distances agree to float32 rounding (XLA may order the feature sum differently per shape)."""
    from idjax import neighbors

    rng = np.random.default_rng(11)
    x = rng.normal(size=(203, 24)).astype(np.float32)
    assert neighbors.rerank_rows(18, 24, 4) >= 96  # the default: one gather per 96-row block here
    whole = idjax.knn(x, 9, block_size=96)
    monkeypatch.setattr(neighbors, "RERANK_CHUNK_BYTES", 7 * 18 * 24 * 4)  # 7 rows at a time
    assert neighbors.rerank_rows(18, 24, 4) == 7
    chunked = idjax.knn(x, 9, block_size=96)
    assert_same_neighbours(chunked.distances, chunked.indices, whole.distances, whole.indices, rtol=1e-6)
    ref_d, ref_i = brute_force(x, 9)
    assert_same_neighbours(chunked.distances, chunked.indices, ref_d, ref_i, rtol=1e-6)
    assert neighbors.rerank_rows(18, 24, 4, platform="gpu") == 0  # accelerators: one wide gather


def test_knn_shapes_dtypes_and_query_mode():
    rng = np.random.default_rng(1)
    x = rng.normal(size=(50, 4)).astype(np.float32)
    y = rng.normal(size=(30, 4)).astype(np.float32)
    dist, idx = idjax.knn(x, 5, y=y)
    assert dist.shape == (50, 5) and dist.dtype == np.float32 and idx.dtype == np.int32
    ref_d, ref_i = brute_force(x, 5, y)
    assert_same_neighbours(dist, idx, ref_d, ref_i, rtol=1e-6)


def test_knn_float64_under_x64():
    rng = np.random.default_rng(2)
    x = rng.normal(size=(40, 3))
    with jax.enable_x64(True):
        dist, idx = idjax.knn(x, 4)
        assert dist.dtype == np.float64
        ref_d, ref_i = brute_force(x, 4)
        assert_same_neighbours(dist, idx, ref_d, ref_i, rtol=1e-12)


def test_knn_bfloat16_input_accumulates_in_float32():
    rng = np.random.default_rng(3)
    x = rng.normal(size=(64, 16)).astype(jax.numpy.bfloat16)
    dist, idx = idjax.knn(x, 3)
    assert dist.dtype == np.float32
    ref_d, ref_i = brute_force(np.asarray(x, np.float32), 3)
    np.testing.assert_allclose(np.asarray(dist), ref_d, rtol=1e-5)


def test_near_duplicates_are_exact():
    # The GEMM form cancels catastrophically for points 1e-4 apart at norm 1e3; the exact
    # re-ranking must recover the true distance.
    rng = np.random.default_rng(4)
    base = rng.normal(size=(20, 8)).astype(np.float32) * 1000
    x = np.vstack([base, base + np.float32(1e-2)])
    dist, idx = idjax.knn(x, 1)
    ref_d, ref_i = brute_force(x, 1)
    assert_same_neighbours(dist, idx, ref_d, ref_i, rtol=1e-3)


def test_self_excluded_by_index_not_position():
    x = np.array([[0.0, 0.0], [0.0, 0.0], [1.0, 0.0], [3.0, 0.0]], np.float32)
    dist, idx = idjax.knn(x, 2)
    # Point 1 is an exact copy of point 0: each is the other's neighbour at distance 0.
    assert idx[0, 0] == 1 and idx[1, 0] == 0
    assert dist[0, 0] == 0 and dist[1, 0] == 0
    assert (np.asarray(idx) != np.arange(4)[:, None]).all()


def test_find_duplicates():
    x = np.array([[1.0, 2.0], [0.0, 0.0], [1.0, 2.0], [-0.0, 0.0], [5.0, 5.0]])
    dup = idjax.find_duplicates(x)
    assert dup.count == 2
    np.testing.assert_array_equal(dup.is_duplicate, [False, False, True, True, False])
    np.testing.assert_array_equal(dup.first_occurrence, [0, 1, 0, 1, 4])
    np.testing.assert_array_equal(dup.keep, [0, 1, 4])


@pytest.mark.parametrize(
    "x, k, message",
    [
        (np.zeros(5), 2, "2-D"),
        (np.zeros((3, 2, 2)), 2, "2-D"),
        (np.array([[0.0, 1.0], [np.nan, 1.0], [2.0, 2.0]]), 1, "NaN"),
        (np.array([[0.0, 1.0], [np.inf, 1.0], [2.0, 2.0]]), 1, "NaN/inf"),
        (np.random.default_rng(0).normal(size=(5, 2)), 5, "need N > k"),
        (np.random.default_rng(0).normal(size=(5, 2)), 0, "k must be >= 1"),
        (np.array([["a", "b"], ["c", "d"]]), 1, "numeric"),
    ],
)
def test_knn_rejects_bad_input(x, k, message):
    with pytest.raises((ValueError, TypeError), match=message):
        idjax.knn(x, k)


def test_knn_rejects_dimension_mismatch():
    with pytest.raises(ValueError, match="dimension"):
        idjax.knn(np.zeros((4, 3)), 1, y=np.zeros((4, 2)))


@pytest.mark.parametrize("k", [1, 7, 40])
def test_grouped_selection_path_with_many_ties(k):
    # Integer coordinates: many exactly tied distances, resolved to the lower index like a stable sort.
    # Squared distances of small integers are exact in float32 on every machine, so this stays exact.
    rng = np.random.default_rng(5)
    x = rng.integers(0, 4, size=(1500, 3)).astype(np.float32)
    x = np.unique(x, axis=0)
    x = np.vstack([x, rng.integers(0, 40, size=(1500, 3)).astype(np.float32)])
    dist, idx = idjax.knn(x, k, block_size=128)
    ref_d, ref_i = brute_force(x, k)
    np.testing.assert_allclose(np.asarray(dist), ref_d, rtol=1e-6)
    np.testing.assert_array_equal(np.asarray(idx), ref_i)


def test_smallest_columns_is_exact():
    from idjax.neighbors import smallest_columns

    rng = np.random.default_rng(6)
    d2 = rng.random((20, 3001)).astype(np.float32)
    d2[:, 100:140] = 0.5  # a block of ties
    # Integer values: ties everywhere, including at the group-minimum bound that hides candidates.
    ties = rng.integers(0, 40, size=(20, 3001)).astype(np.float32)
    for values in (d2, ties):
        for count in (1, 9, 72):
            got = np.asarray(smallest_columns(jax.numpy.asarray(values), count))
            want = np.argsort(values, axis=1, kind="stable")[:, :count]
            np.testing.assert_array_equal(got, want)


def test_screening_scores_are_squared_distances_less_the_query_norm():
    from idjax import neighbors

    rng = np.random.default_rng(7)
    q = (rng.normal(size=(13, 10)) + 3.4).astype(np.float32)
    r = (rng.normal(size=(40, 10)) + 3.4).astype(np.float32)
    centre = neighbors.screening_centre(jax.numpy.sum(r, axis=0), 40)
    np.testing.assert_array_equal(np.asarray(centre), np.round(r.astype(np.float64).mean(0)))
    scores = np.asarray(neighbors.screening_scores(neighbors.query_keys(q - centre),
                                                   neighbors.reference_keys(r - centre, rows=64)))
    assert scores.shape == (13, 64) and np.isinf(scores[:, 40:]).all()  # padding rows are never selected
    q64, r64, c64 = q.astype(np.float64), r.astype(np.float64), np.asarray(centre, np.float64)
    want = ((q64[:, None] - r64[None]) ** 2).sum(-1) - ((q64 - c64) ** 2).sum(-1)[:, None]
    np.testing.assert_allclose(scores[:, :40], want, atol=1e-4)


def test_nearest_by_exact_distance_breaks_ties_by_index():
    from idjax import neighbors

    d2 = jax.numpy.asarray([[4.0, 1.0, 1.0, 0.0], [9.0, 9.0, 9.0, 1.0]])
    ids = jax.numpy.asarray([[3, 7, 2, 9], [5, 1, 4, 8]], jax.numpy.int32)
    dist, idx = neighbors.nearest_by_exact_distance(d2, ids, 3)
    np.testing.assert_array_equal(np.asarray(dist), [[0.0, 1.0, 1.0], [1.0, 3.0, 3.0]])
    np.testing.assert_array_equal(np.asarray(idx), [[9, 2, 7], [8, 1, 4]])


def test_decimation_subsets_search_like_knn_on_offset_data():
    """The decimation's batched small searches use knn's kernel, centring included: points of unit spread
    1e4 from the origin (float32), where the uncentred GEMM form loses the distances, still give the two
    nearest neighbours of a float64 brute force of the stored points."""
    from idjax import intrinsic_dim

    subsets = (np.random.default_rng(8).normal(size=(3, 150, 8)) + 1e4).astype(np.float32)
    got = np.asarray(intrinsic_dim._two_nearest_dense(jax.numpy.asarray(subsets)))
    assert got.shape == (3, 150, 2)
    for subset, dist in zip(subsets, got, strict=True):
        ref_d, _ = brute_force(subset, 2)
        np.testing.assert_allclose(dist, ref_d, rtol=1e-5)


def test_memory_plan_bounds_the_block_and_says_what_fits():
    plan = idjax.plan_knn(20000, 512, 64, memory_bytes=24 * 2**30)
    assert 8 <= plan.block_size <= 4096 and plan.block_size % 8 == 0
    small = idjax.plan_knn(20000, 512, 64, memory_bytes=24 * 2**30, memory_budget_bytes=16 * 2**20)
    assert small.block_size < plan.block_size
    with pytest.raises(MemoryError, match=r"N=90000 .* D=2560 .* points on one device, or about \d+ devices"):
        idjax.plan_knn(90000, 2560, 64, memory_bytes=1 * 2**30)
    sharded = idjax.plan_knn(90000, 2560, 64, devices=8, memory_bytes=16 * 2**30)
    assert sharded.bytes_per_device < 8 * 2**30
