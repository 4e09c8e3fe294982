"""Estimator accuracy on manifolds of known intrinsic dimension (N = 4000), as in the README table."""

import pytest

import idjax
from benchmarks.manifold_accuracy import datasets

# Known failures of every nearest-neighbour estimator at this N, listed in the README table rather than
# hidden: a 10-D cube (boundary effects, -10.0%), Mbeta (strongly non-uniform density) and the curved
# paraboloids Mp2/Mp3 (curvature at the scale of the nearest neighbours).
KNOWN_HARD = {"skdim M10a_Cubic", "skdim Mbeta", "skdim Mp2_Paraboloid", "skdim Mp3_Paraboloid"}

CASES = datasets(4000)


@pytest.mark.parametrize("name, true_id, x", [c for c in CASES if c[0] not in KNOWN_HARD], ids=lambda v: str(v)[:30])
def test_within_ten_percent(name, true_id, x):
    dist, _ = idjax.knn(x, 8)
    # GRIDE at larger ranks measures a larger scale, where curved manifolds (the 2-D helix) legitimately
    # look different; the 10% claim is about the nearest-neighbour scale.
    for estimate in (idjax.twonn(dist, fraction=0.9), idjax.twonn(dist, method="mle"), idjax.gride(dist, 1, 2).id):
        assert abs(float(estimate) - true_id) <= 0.1 * true_id, (name, float(estimate))


def test_hard_cases_are_the_documented_ones():
    # The exclusion list must stay honest: each excluded manifold really is outside 10%, or at its edge.
    for name, true_id, x in CASES:
        if name in KNOWN_HARD:
            dist, _ = idjax.knn(x, 8)
            assert float(idjax.twonn(dist)) < 0.905 * true_id, name
