"""Record DADApy 0.3.4's estimator outputs on fixed inputs, for idjax's estimator tests.

Run with the separate numpy<2 venv (``make dadapy-venv``)::

    .venv-dadapy/bin/python tests/reference/make_dadapy_reference.py --out tests/reference/dadapy_reference.npz

The inputs are stored in the npz as well; tests must read them from there rather than regenerating them.
They are built from ``numpy.random.default_rng`` *uniform* draws and integer permutations only, combined
with + - * / (correctly rounded IEEE operations, no BLAS, no libm transcendentals, whose SIMD variants
differ by an ulp between CPUs), so the inputs are bit-identical on every machine. DADApy's outputs are
bit-identical run to run on one machine (BLAS/OpenMP pinned to one thread below); across CPUs the
brute-force kNN of X1 and X1b (sklearn ArgKmin, GEMM form) may differ in the last ulps, hence the
regeneration test's rtol of 1e-12 for floats.

The npz is written with fixed zip timestamps so that regenerating it gives a byte-identical file.

Datasets
--------
X1  (500, 20) float64: 5-dim curved manifold (polynomial/rational features of t ~ U(-1,1)^5, mixed by a
    uniform random 20x20 matrix) + uniform noise of amplitude ~1e-3. kNN by sklearn brute force (D > 15).
X1b (500, 30) float64: the same 500 points through a random nonlinear map h = X1 @ R, X1b = h / (1 + h^2)
    + 0.3 h (a second "representation" of the same examples). kNN brute force.
X2  (400, 10) float64: 3-dim linear subspace (z ~ U(-1,1)^3 times a uniform 3x10 matrix) + uniform noise
    amplitude 0.02. kNN by sklearn KD-tree (D <= 15), i.e. exact differences, self at distance exactly 0.
X3  (300, 6) float64: 4-dim linear subspace in 6 dims where the last 6 points are near copies (offset of
    norm ~1e-4) of points 0..5, so 12 points have huge mu = r2/r1 (exercises GRIDE's mu outlier filter and
    TwoNN's discarded tail). kNN by KD-tree.

Every dataset S in {X1, X1b, X2, X3} goes through ``d = dadapy.Data(S, maxk=64, n_jobs=1)`` and
``d.compute_distances()`` (sklearn NearestNeighbors(n_neighbors=65).kneighbors(S), self in column 0).

Keys (S in {X1, X2, X3} unless stated; N = number of points; all floats float64, all ints int64)
-----------------------------------------------------------------------------------------------
S                        (N, D)   the input coordinates.
S_distances              (N, 65)  ``d.distances``  (column 0 = the point itself, columns 1..64 = neighbours).
S_indices                (N, 65)  ``d.dist_indices``.
X1b, X1b_distances, X1b_indices   the same for X1b (only X1b's graph, no ID estimates).
S_twonn_fit_f0.9         ()  ``d.compute_id_2NN(algorithm="base", mu_fraction=0.9)[0]`` (data_fraction=1:
                             no decimation, the single full-data estimate; curve_fit through the origin).
S_twonn_fit_f0.98        ()  same with ``mu_fraction=0.98``.
S_twonn_neff_f0.9, S_twonn_neff_f0.98   ()  int(N * mu_fraction): number of (smallest) mus kept by the fit.
S_twonn_fit_f0.9_lsq_closed_form, S_twonn_fit_f0.98_lsq_closed_form   ()  NOT a DADApy output: numpy's
                             sum(x*y)/sum(x*x) on the same x = sorted log mu[:n_eff], y = -log(1 - j/N),
                             j = 1..n_eff, to show how far DADApy's curve_fit is from the exact minimiser.
S_twonn_ml               ()  ``d.compute_id_2NN(algorithm="ml")[0]`` = (N-1)/sum(log mu) over all N points.
S_twonn_scale            ()  ``d.compute_id_2NN(...)[2]`` = mean(distances[:, [1, 2]]) (same for all three calls).
S_twonn_mus              (N,)  distances[:, 2] / distances[:, 1] as DADApy computes it (``d.intrinsic_dim_mus``).
S_gride_ids              (6,)  ``d.return_id_scaling_gride(range_max=64)[0]``, (n1, n2) = (1,2),(2,4),...,(32,64).
S_gride_errs             (6,)  ``...[1]``.
S_gride_scales           (6,)  ``...[2]`` with return_ranks=False: mean over points of (r_n1 + r_n2)/2.
S_gride_ranks            (6,)  ``d.return_id_scaling_gride(range_max=64, return_ranks=True)[2]`` = n2 = 2..64.
S_gride_n_kept           (6,)  NOT a DADApy output as such: len(dadapy._utils.utils._filter_mus(...)[0]),
                             the number of mus that survive DADApy's outlier filter at each scale.
S_gride_n{a}_{b}_id      ()  single-scale GRIDE with (n1, n2) = (a, b) for (a, b) in (1,2), (4,8), (3,7):
                             ``d._compute_id_gride_single_scale(0.001, 1000, mus, a, b, 1e-7)[0]`` with
                             mus = distances[:, b] / distances[:, a]. (0.3.4 has no public single-scale GRIDE.)
S_gride_n{a}_{b}_err     ()  ``...[1]``. CAUTION: 0.3.4 computes this error with n2 = 2*n1 whatever n2 is, so
                             for (3, 7) it is the Fisher error of the (3, 6) model evaluated at the (3, 7) id.
S_gride_n3_7_err_true_n2 ()  ``dadapy._utils.utils._fisher_info_scaling(id, mus, 3, 7, eps=5*eps64) ** -0.5``,
                             i.e. the error with the correct n2 (NOT what DADApy returns).
X1_labels                (500,) int64: 4 classes of sizes 50/100/150/200, assigned along the latent direction
                             t0 + 0.3 t1 in blocks, then 15% of the labels permuted among themselves.
X1_label_overlap_k{k}_weighted     ()  ``d.return_label_overlap(labels, k=k)`` (defaults avg=True,
                             weighted=True: points weighted by 1/size of their class), k in {10, 30}.
X1_label_overlap_k{k}_unweighted   ()  ``d.return_label_overlap(labels, k=k, weighted=False)``.
X1_label_overlap_k{k}_per_point    (500,)  ``d.return_label_overlap(labels, k=k, avg=False)``.
X1_label_overlap_cf0.1_weighted    ()  ``d.return_label_overlap(labels, class_fraction=0.1)``: k per point =
                             int(class_size * 0.1) = 5/10/15/20 for classes 0..3.
X1_label_overlap_cf0.1_unweighted  ()  ``...(labels, class_fraction=0.1, weighted=False)``.
X1_label_overlap_cf0.1_per_point   (500,)  ``...(labels, class_fraction=0.1, avg=False)``.
X1_X1b_data_overlap_k{k}           ()  ``d.return_data_overlap(coordinates=X1b, k=k)`` (d built on X1), k in {10, 30}.
X1_X1b_data_overlap_k{k}_per_point (500,)  ``d.return_data_overlap(coordinates=X1b, k=k, avg=False)``.
meta_versions            ()  str: versions of dadapy, numpy, scipy, scikit-learn, python that produced the file.
"""

import os

# Pin every thread pool before numpy/scipy/sklearn load their BLAS/OpenMP runtimes.
for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS", "BLIS_NUM_THREADS"):
    os.environ[_var] = "1"

import argparse  # noqa: E402
import io  # noqa: E402
import platform  # noqa: E402
import warnings  # noqa: E402
import zipfile  # noqa: E402

import numpy as np  # noqa: E402

MAXK = 64
RANGE_MAX = 64
SINGLE_SCALE_PAIRS = ((1, 2), (4, 8), (3, 7))
OVERLAP_KS = (10, 30)
TWONN_FRACTIONS = (0.9, 0.98)


# --------------------------------------------------------------------------------------------------
# Deterministic inputs: uniform draws and + - * / only.


def _matmul(a, b):
    """a @ b by explicit accumulation over the inner index (elementwise IEEE ops, no BLAS)."""
    out = np.zeros((a.shape[0], b.shape[1]), dtype=np.float64)
    for j in range(a.shape[1]):
        out = out + a[:, j : j + 1] * b[j : j + 1, :]
    return out


def _noise(rng, shape):
    """Zero-mean, roughly bell-shaped noise in [-1.5, 1.5] from three uniforms (no transcendental calls)."""
    return rng.uniform(size=shape) + rng.uniform(size=shape) + rng.uniform(size=shape) - 1.5


def make_x1():
    rng = np.random.default_rng(20250101)
    t = rng.uniform(-1.0, 1.0, size=(500, 5))
    roll1 = t[:, [1, 2, 3, 4, 0]]
    roll2 = t[:, [2, 3, 4, 0, 1]]
    feats = np.concatenate([t, t * t, t * roll1, t / (1.0 + roll2 * roll2)], axis=1)  # (500, 20)
    mix = rng.uniform(-1.0, 1.0, size=(20, 20)) / 4.0
    x = _matmul(feats, mix) + 1e-3 * _noise(rng, (500, 20))
    return x, t


def make_x1b(x1):
    rng = np.random.default_rng(20250102)
    r = rng.uniform(-1.0, 1.0, size=(20, 30)) * 0.5
    h = _matmul(x1, r)
    return h / (1.0 + h * h) + 0.3 * h


def make_labels(t):
    rng = np.random.default_rng(20250103)
    n = t.shape[0]
    order = np.argsort(t[:, 0] + 0.3 * t[:, 1], kind="stable")
    labels = np.empty(n, dtype=np.int64)
    sizes = (50, 100, 150, 200)
    start = 0
    for cls, size in enumerate(sizes):
        labels[order[start : start + size]] = cls
        start += size
    # permute the labels of 15% of the points among themselves (class sizes unchanged)
    chosen = rng.permutation(n)[: int(0.15 * n)]
    labels[chosen] = labels[chosen[rng.permutation(chosen.size)]]
    return labels


def make_x2():
    rng = np.random.default_rng(20250104)
    z = rng.uniform(-1.0, 1.0, size=(400, 3))
    basis = rng.uniform(-1.0, 1.0, size=(3, 10))
    return _matmul(z, basis) + 0.02 * _noise(rng, (400, 10))


def make_x3():
    rng = np.random.default_rng(20250105)
    z = rng.uniform(-1.0, 1.0, size=(300, 4))
    basis = rng.uniform(-1.0, 1.0, size=(4, 6))
    x = _matmul(z, basis) + 0.01 * _noise(rng, (300, 6))
    # the last 6 points become near copies of points 0..5
    x[-6:] = x[:6] + 1e-4 * rng.uniform(-1.0, 1.0, size=(6, 6))
    return x


# --------------------------------------------------------------------------------------------------
# DADApy calls.


def _data(x):
    from dadapy import Data

    d = Data(coordinates=x, maxk=MAXK, n_jobs=1)
    d.compute_distances()
    assert d.distances.shape == (x.shape[0], MAXK + 1)
    return d


def _lsq_closed_form(mus, fraction):
    n = mus.shape[0]
    n_eff = int(n * fraction)
    x = np.sort(np.log(mus))[:n_eff]
    y = -np.log(1.0 - np.arange(1, n_eff + 1) / n)
    return float(np.sum(x * y) / np.sum(x * x))


def graph_entries(name, x, d):
    return {
        name: x,
        f"{name}_distances": np.asarray(d.distances, dtype=np.float64),
        f"{name}_indices": np.asarray(d.dist_indices, dtype=np.int64),
    }


def id_entries(name, d):
    from dadapy._utils import utils as ut

    out = {}
    n = d.N
    scale = None
    for f in TWONN_FRACTIONS:
        ide, err, scale_f = d.compute_id_2NN(algorithm="base", mu_fraction=f)
        assert err == 0.0
        scale = scale_f if scale is None else scale
        assert scale_f == scale
        out[f"{name}_twonn_fit_f{f}"] = np.float64(ide)
        out[f"{name}_twonn_neff_f{f}"] = np.int64(int(n * f))
        out[f"{name}_twonn_fit_f{f}_lsq_closed_form"] = np.float64(_lsq_closed_form(np.array(d.intrinsic_dim_mus), f))
    ide, err, scale_ml = d.compute_id_2NN(algorithm="ml")
    assert err == 0.0 and scale_ml == scale
    out[f"{name}_twonn_ml"] = np.float64(ide)
    out[f"{name}_twonn_scale"] = np.float64(scale)
    out[f"{name}_twonn_mus"] = np.array(d.intrinsic_dim_mus, dtype=np.float64)

    dist_before = d.distances.copy()
    ids, errs, scales = d.return_id_scaling_gride(range_max=RANGE_MAX)
    ids_r, errs_r, ranks = d.return_id_scaling_gride(range_max=RANGE_MAX, return_ranks=True)
    assert np.array_equal(ids, ids_r) and np.array_equal(errs, errs_r)
    # the stored-distances branch must have been used (no recomputation of the kNN)
    assert np.array_equal(d.distances, dist_before)
    out[f"{name}_gride_ids"] = np.asarray(ids, dtype=np.float64)
    out[f"{name}_gride_errs"] = np.asarray(errs, dtype=np.float64)
    out[f"{name}_gride_scales"] = np.asarray(scales, dtype=np.float64)
    out[f"{name}_gride_ranks"] = np.asarray(ranks, dtype=np.int64)
    n_kept = []
    for n2 in np.asarray(ranks):
        mus = d.distances[:, n2] / d.distances[:, n2 // 2]
        n_kept.append(len(ut._filter_mus(d.dtype, mus.copy(), n2 // 2, n2)[0]))
    out[f"{name}_gride_n_kept"] = np.asarray(n_kept, dtype=np.int64)

    for n1, n2 in SINGLE_SCALE_PAIRS:
        mus = d.distances[:, n2] / d.distances[:, n1]
        ide, err = d._compute_id_gride_single_scale(0.001, 1000, mus.copy(), n1, n2, 1e-7)
        out[f"{name}_gride_n{n1}_{n2}_id"] = np.float64(ide)
        out[f"{name}_gride_n{n1}_{n2}_err"] = np.float64(err)
        if n2 != 2 * n1:
            fisher = ut._fisher_info_scaling(ide, mus.copy(), n1, n2, eps=5 * d.eps)
            out[f"{name}_gride_n{n1}_{n2}_err_true_n2"] = np.float64(fisher**-0.5)
    return out


def overlap_entries(d1, labels, x1b, d1b):
    from dadapy._utils.utils import compute_nn_distances

    out = {"X1_labels": labels}
    for k in OVERLAP_KS:
        out[f"X1_label_overlap_k{k}_weighted"] = np.float64(d1.return_label_overlap(labels, k=k))
        out[f"X1_label_overlap_k{k}_unweighted"] = np.float64(d1.return_label_overlap(labels, k=k, weighted=False))
        out[f"X1_label_overlap_k{k}_per_point"] = np.asarray(
            d1.return_label_overlap(labels, k=k, avg=False), dtype=np.float64
        )
    out["X1_label_overlap_cf0.1_weighted"] = np.float64(d1.return_label_overlap(labels, class_fraction=0.1))
    out["X1_label_overlap_cf0.1_unweighted"] = np.float64(
        d1.return_label_overlap(labels, class_fraction=0.1, weighted=False)
    )
    out["X1_label_overlap_cf0.1_per_point"] = np.asarray(
        d1.return_label_overlap(labels, class_fraction=0.1, avg=False), dtype=np.float64
    )
    for k in OVERLAP_KS:
        out[f"X1_X1b_data_overlap_k{k}"] = np.float64(d1.return_data_overlap(coordinates=x1b, k=k))
        out[f"X1_X1b_data_overlap_k{k}_per_point"] = np.asarray(
            d1.return_data_overlap(coordinates=x1b, k=k, avg=False), dtype=np.float64
        )
        # DADApy recomputes X1b's kNN with k+1 columns; it must agree with the stored 65-column graph.
        _, idx_k = compute_nn_distances(x1b, k)
        assert np.array_equal(idx_k, d1b.dist_indices[:, : k + 1]), "X1b kNN differs between k and maxk"
    return out


def build():
    from importlib.metadata import version

    import scipy
    import sklearn

    assert version("dadapy") == "0.3.4", f"need dadapy 0.3.4, found {version('dadapy')}"
    x1, t = make_x1()
    x1b = make_x1b(x1)
    labels = make_labels(t)
    x2 = make_x2()
    x3 = make_x3()

    out = {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        d1 = _data(x1)
        out.update(graph_entries("X1", x1, d1))
        out.update(id_entries("X1", d1))
        d1b = _data(x1b)
        out.update(graph_entries("X1b", x1b, d1b))
        out.update(overlap_entries(d1, labels, x1b, d1b))
        for name, x in (("X2", x2), ("X3", x3)):
            d = _data(x)
            out.update(graph_entries(name, x, d))
            out.update(id_entries(name, d))

    out["meta_versions"] = np.array(
        f"dadapy {version('dadapy')}; numpy {np.__version__}; scipy {scipy.__version__}; "
        f"scikit-learn {sklearn.__version__}; python {platform.python_version()}"
    )
    return out


def save_npz(path, arrays):
    """np.savez_compressed equivalent with fixed zip timestamps and key order (byte-reproducible)."""
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        for key in sorted(arrays):
            buf = io.BytesIO()
            np.lib.format.write_array(buf, np.asanyarray(arrays[key]), allow_pickle=False)
            info = zipfile.ZipInfo(key + ".npy", date_time=(1980, 1, 1, 0, 0, 0))
            info.compress_type = zipfile.ZIP_DEFLATED
            info.external_attr = 0o644 << 16
            zf.writestr(info, buf.getvalue())


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, help="output .npz path")
    args = parser.parse_args()
    arrays = build()
    save_npz(args.out, arrays)
    print(f"wrote {len(arrays)} arrays to {args.out} ({os.path.getsize(args.out)} bytes)")


if __name__ == "__main__":
    main()
