"""Estimators against DADApy 0.3.4 on identical inputs (tests/reference/dadapy_reference.npz).

The npz is made by tests/reference/make_dadapy_reference.py in the numpy<2 venv (see its docstring
for every key); tests/test_dadapy_regeneration.py checks that it still reproduces. DADApy's graph has
the point itself in column 0; ours excludes it, so DADApy column r is our column r - 1.
Tolerances: relative 1e-6 with x64, 1e-4 in float32.
"""

import pathlib

import chex
import jax
import numpy as np
import pytest

import idjax
from tests.neighbour_checks import assert_same_neighbours

REF = np.load(pathlib.Path(__file__).parent / "reference" / "dadapy_reference.npz")
DATASETS = ["X1", "X2", "X3"]
PRECISIONS = [pytest.param(True, 1e-6, id="x64"), pytest.param(False, 1e-4, id="float32")]


def close(ours, theirs, rtol):
    chex.assert_trees_all_close(np.asarray(ours, np.float64), np.asarray(theirs, np.float64), rtol=rtol, atol=0)


def dadapy_graph(name, x64):
    dist, idx = REF[f"{name}_distances"][:, 1:], REF[f"{name}_indices"][:, 1:]
    return (dist if x64 else dist.astype(np.float32)), idx


@pytest.mark.parametrize("name", DATASETS + ["X1b"])
def test_knn_graph_equals_dadapy(name):
    with jax.enable_x64(True):
        dist, idx = idjax.knn(REF[name], 64)
    # DADApy's distances come from another machine's BLAS (GEMM form): equal to 1e-9, and neighbours
    # may swap only where two distances tie within that tolerance (X3's near copies tie exactly).
    assert_same_neighbours(dist, idx, REF[f"{name}_distances"][:, 1:], REF[f"{name}_indices"][:, 1:],
                           rtol=1e-9, what=name)


@pytest.mark.parametrize("x64, rtol", PRECISIONS)
@pytest.mark.parametrize("name", DATASETS)
def test_twonn(name, x64, rtol):
    with jax.enable_x64(x64):
        dist, _ = dadapy_graph(name, x64)
        for fraction in (0.9, 0.98):
            close(idjax.twonn(dist, method="fit", fraction=fraction), REF[f"{name}_twonn_fit_f{fraction}"], rtol)
        close(idjax.twonn(dist, method="mle"), REF[f"{name}_twonn_ml"], rtol)


@pytest.mark.parametrize("x64, rtol", PRECISIONS)
@pytest.mark.parametrize("name", DATASETS)
def test_twonn_on_our_own_graph(name, x64, rtol):
    # End to end from coordinates: our kNN + our TwoNN vs DADApy's kNN + TwoNN.
    with jax.enable_x64(x64):
        dist, _ = idjax.knn(REF[name] if x64 else REF[name].astype(np.float32), 2)
        close(idjax.twonn(dist, fraction=0.9), REF[f"{name}_twonn_fit_f0.9"], rtol * 10)


@pytest.mark.parametrize("x64, rtol", PRECISIONS)
@pytest.mark.parametrize("name", DATASETS)
def test_gride_scaling(name, x64, rtol):
    with jax.enable_x64(x64):
        dist, _ = dadapy_graph(name, x64)
        ids, errs, ranks = idjax.gride_scaling(dist, range_max=64)
    np.testing.assert_array_equal(ranks, REF[f"{name}_gride_ranks"])
    close(ids, REF[f"{name}_gride_ids"], rtol)
    close(errs, REF[f"{name}_gride_errs"], rtol)


@pytest.mark.parametrize("x64, rtol", PRECISIONS)
@pytest.mark.parametrize("name", DATASETS)
def test_gride_single_scale(name, x64, rtol):
    with jax.enable_x64(x64):
        dist, _ = dadapy_graph(name, x64)
        for n1, n2 in [(1, 2), (4, 8)]:
            est = idjax.gride(dist, n1, n2)
            close(est.id, REF[f"{name}_gride_n{n1}_{n2}_id"], rtol)
            close(est.err, REF[f"{name}_gride_n{n1}_{n2}_err"], rtol)
        # For n2 != 2 n1, DADApy 0.3.4 reports the error of the (n1, 2 n1) model; ours uses the true n2.
        est = idjax.gride(dist, 3, 7)
        close(est.id, REF[f"{name}_gride_n3_7_id"], rtol)
        close(est.err, REF[f"{name}_gride_n3_7_err_true_n2"], rtol)


@pytest.mark.parametrize("x64, rtol", PRECISIONS)
def test_label_overlap(x64, rtol):
    _, idx = dadapy_graph("X1", x64)
    labels = REF["X1_labels"]
    for k in (10, 30):
        close(idjax.label_overlap(idx, labels, k), REF[f"X1_label_overlap_k{k}_unweighted"], rtol)
        close(idjax.label_overlap(idx, labels, k, weighted=True), REF[f"X1_label_overlap_k{k}_weighted"], rtol)
        close(idjax.label_overlap(idx, labels, k, per_point=True), REF[f"X1_label_overlap_k{k}_per_point"], rtol)


@pytest.mark.parametrize("x64, rtol", PRECISIONS)
def test_data_overlap(x64, rtol):
    _, idx_a = dadapy_graph("X1", x64)
    _, idx_b = dadapy_graph("X1b", x64)
    for k in (10, 30):
        close(idjax.data_overlap(idx_a, idx_b, k), REF[f"X1_X1b_data_overlap_k{k}"], rtol)
        close(idjax.data_overlap(idx_a, idx_b, k, per_point=True), REF[f"X1_X1b_data_overlap_k{k}_per_point"], rtol)
