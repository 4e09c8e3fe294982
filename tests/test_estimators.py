"""Estimator behaviour: invariances (hypothesis), duplicates policy, validation, jit/vmap of kernels."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import idjax
from experiments.synthetic import manifold


def _profile(x, labels, k=10):
    dist, idx = idjax.knn(x, 16)
    return (
        float(idjax.twonn(dist)),
        float(idjax.twonn(dist, method="mle")),
        idjax.gride_scaling(dist, range_max=16).ids,
        idjax.label_overlap(idx, labels, k),
        idx,
    )


@settings(max_examples=10, deadline=None)
@given(seed=st.integers(0, 2**16), scale=st.floats(0.01, 100.0), shift=st.floats(-50.0, 50.0))
def test_invariant_under_rotation_translation_scaling(seed, scale, shift):
    rng = np.random.default_rng(seed)
    x = manifold("sphere", 300, 3, 6, seed=seed).astype(np.float64)
    labels = rng.integers(0, 3, size=300)
    rotation, _ = np.linalg.qr(rng.normal(size=(6, 6)))
    y = scale * (x @ rotation) + shift
    with jax.enable_x64(True):  # float64 so the invariance is exact up to rounding, not fp32 noise
        a = _profile(x, labels)
        b = _profile(y, labels)
    np.testing.assert_allclose(a[0], b[0], rtol=1e-6)
    np.testing.assert_allclose(a[1], b[1], rtol=1e-6)
    np.testing.assert_allclose(a[2], b[2], rtol=1e-6)
    assert a[3] == pytest.approx(b[3], abs=1e-12)
    assert idjax.data_overlap(a[4], b[4], 10) == pytest.approx(1.0)


def test_overlaps_by_hand():
    idx_a = np.array([[1, 2], [0, 2], [0, 1], [2, 1]])
    idx_b = np.array([[2, 3], [2, 0], [3, 0], [0, 1]])
    np.testing.assert_allclose(idjax.data_overlap(idx_a, idx_b, 2, per_point=True), [0.5, 1.0, 0.5, 0.5])
    labels = np.array(["a", "a", "b", "b"])
    fractions = idjax.label_overlap(idx_a, labels, 2, per_point=True)
    np.testing.assert_allclose(fractions, [0.5, 0.5, 0.0, 0.5])
    assert idjax.label_overlap(idx_a, labels, 2) == pytest.approx(0.375)
    labels3 = np.array([0, 0, 0, 1])  # class sizes 3 and 1: weighted = mean of class means
    idx3 = np.array([[1, 3], [0, 2], [0, 3], [0, 1]])
    fractions3 = idjax.label_overlap(idx3, labels3, 2, per_point=True)
    np.testing.assert_allclose(fractions3, [0.5, 1.0, 0.5, 0.0])
    assert idjax.label_overlap(idx3, labels3, 2, weighted=True) == pytest.approx((2.0 / 3 + 0.0) / 2)


def test_duplicates_policy():
    x = manifold("linear", 200, 3, 5, seed=1)
    x = np.vstack([x, x[:7]])
    dist, _ = idjax.knn(x, 8)
    with pytest.raises(ValueError, match="14 of 207 points .* duplicate"):
        idjax.twonn(dist)
    with pytest.raises(ValueError, match="duplicate"):
        idjax.gride_scaling(dist, range_max=8)
    est = idjax.twonn(dist, duplicates="drop")
    assert est.n_dropped == 14 and est.n_points == 193 and np.isfinite(est)
    scaling = idjax.gride_scaling(dist, range_max=8, duplicates="drop")
    assert scaling.n_dropped == 14 and np.isfinite(scaling.ids).all()
    ids, errs, ranks = scaling  # unpacks as the plain triple
    np.testing.assert_array_equal(ranks, [2, 4, 8])
    estimate = idjax.gride(dist, 2, 4, duplicates="drop")
    assert estimate.n_dropped == 14 and np.isfinite(estimate.id)
    with pytest.raises(ValueError, match="duplicate rows"):
        idjax.twonn_decimation(x)
    assert idjax.twonn_decimation(x, duplicates="drop").n_dropped == 7
    with pytest.raises(ValueError, match="'error' or 'drop'"):
        idjax.twonn(dist, duplicates="ignore")


@pytest.mark.parametrize(
    "call, message",
    [
        (lambda d: idjax.twonn(d[:, :1]), "at least 2"),
        (lambda d: idjax.twonn(d, method="ransac"), "'fit' or 'mle'"),
        (lambda d: idjax.twonn(d, fraction=0.0), "fraction"),
        (lambda d: idjax.gride(d, 4, 32), "at least 32"),
        (lambda d: idjax.gride(d, 3, 3), "n1 < n2"),
        (lambda d: idjax.gride_scaling(d, range_max=64), "k >= 64"),
        (lambda d: idjax.twonn(np.where(d > 0.5, np.nan, d)), "NaN"),
        (lambda d: idjax.twonn(d[:, ::-1]), "ascending"),
        (lambda d: idjax.twonn(d[0]), "2-D"),
    ],
)
def test_estimators_reject_bad_input(call, message):
    dist, _ = idjax.knn(manifold("linear", 100, 2, 3), 16)
    with pytest.raises(ValueError, match=message):
        call(np.asarray(dist))


def test_overlaps_reject_bad_input():
    idx = np.zeros((10, 4), np.int32)
    with pytest.raises(ValueError, match="length 9 but there are 10 points"):
        idjax.label_overlap(idx, np.zeros(9), 3)
    with pytest.raises(ValueError, match="only 4 are available"):
        idjax.label_overlap(idx, np.zeros(10), 5)
    with pytest.raises(ValueError, match="same points"):
        idjax.data_overlap(idx, idx[:5], 3)
    with pytest.raises(TypeError, match="integer"):
        idjax.data_overlap(idx.astype(float), idx, 3)


def test_kernels_jit_and_vmap_across_layers_and_scales():
    # Three "layers" of different ID; GRIDE vmapped over layers and scales equals per-call results.
    layers = [manifold("linear", 400, d, 12, seed=d) for d in (2, 4, 6)]
    dists = [np.asarray(idjax.knn(x, 8)[0]) for x in layers]
    mus = jnp.stack([d[:, 3] / d[:, 1] for d in dists])  # (L, N): n1=2, n2=4
    valid = jnp.ones(mus.shape, bool)
    ids, errs = jax.jit(jax.vmap(idjax.gride_from_mus, in_axes=(0, 0, None, None)))(mus, valid, 2, 4)
    for layer, d in enumerate(dists):
        single = idjax.gride(d, 2, 4)
        assert float(ids[layer]) == pytest.approx(single.id, rel=1e-6)
        assert float(errs[layer]) == pytest.approx(single.err, rel=1e-5)
    assert ids[0] < ids[1] < ids[2]


def test_gride_maximises_the_likelihood():
    dist, _ = idjax.knn(manifold("sphere", 500, 4, 8), 8)
    d_hat, _ = idjax.gride(dist, 2, 4)
    mus = jnp.asarray(dist[:, 3] / dist[:, 1])
    valid = jnp.ones(mus.shape, bool)
    log_likelihood = lambda d: float(idjax.gride_log_likelihood(d, mus, valid, 2, 4))  # noqa: E731
    assert log_likelihood(d_hat) >= max(log_likelihood(d_hat * 1.01), log_likelihood(d_hat * 0.99))


def test_decimation_shapes_and_accuracy():
    x = manifold("linear", 2000, 4, 10)
    ids, errs, sizes = idjax.twonn_decimation(x, min_size=50)
    np.testing.assert_array_equal(sizes, [2000, 1000, 500, 250, 125, 62])
    assert np.all(np.abs(ids - 4) < 0.6) and np.all(errs > 0)
