"""Comparing two kNN graphs in a way that holds on every CPU.

Two correct kNN computations on the same data agree exactly on their neighbours except where two
candidates lie at distances equal within floating-point rounding: there, the order (and, at the k-th
place, which of the tied points is kept) depends on the last bits of each distance, which change with
the BLAS, the SIMD width and XLA's summation order, i.e. with the machine. A test that compares index
arrays exactly therefore passes on one CPU and fails on another. `assert_same_neighbours` accepts a
different index only where that is the case: the reference lists a point at the same distance within
the tolerance, or the position ties with the reference's k-th distance (a tied point just outside the
reference's list). Everything else must be identical.

Comparisons of integer-valued coordinates (exact squared distances in float32/float64) stay exact in
the tests: that arithmetic is exact on every machine.
"""

from __future__ import annotations

import numpy as np


def assert_same_neighbours(dist, idx, ref_dist, ref_idx, *, rtol: float, atol: float = 0.0, what: str = "") -> None:
    """Asserts that (dist, idx) is the graph (ref_dist, ref_idx) up to neighbours tied within rounding.

    Args:
      dist, idx: (N, k) distances (ascending per row) and neighbour indices under test.
      ref_dist, ref_idx: (N, k) the reference graph.
      rtol, atol: the distance tolerance; also what counts as a tie.
      what: a label for the failure message.
    """
    dist, idx = np.asarray(dist, np.float64), np.asarray(idx)
    ref_dist, ref_idx = np.asarray(ref_dist, np.float64), np.asarray(ref_idx)
    assert idx.shape == ref_idx.shape, f"{what}: shape {idx.shape} vs reference {ref_idx.shape}"
    np.testing.assert_allclose(dist, ref_dist, rtol=rtol, atol=atol, err_msg=what)
    for row in range(idx.shape[0]):
        assert len(set(idx[row].tolist())) == idx.shape[1], f"{what}: row {row} repeats a neighbour"
    for row, col in zip(*np.nonzero(idx != ref_idx), strict=True):
        d = ref_dist[row, col]
        tol = atol + rtol * abs(d)
        tied = np.abs(ref_dist[row] - d) <= tol
        listed_at_same_distance = idx[row, col] in ref_idx[row, tied]
        ties_with_kth = abs(ref_dist[row, -1] - d) <= tol
        assert listed_at_same_distance or ties_with_kth, (
            f"{what}: row {row}, rank {col + 1}: neighbour {idx[row, col]} where the reference has "
            f"{ref_idx[row, col]} at distance {d!r}, and no reference neighbour ties with it within rtol={rtol}"
        )
