"""kNN graph and whole-layer-profile speed: idjax against FAISS, scikit-learn and DADApy, in one run.

    .venv/bin/python benchmarks/knn_bench.py [--n 20000] [--d 512] [--k 64] [--repeats 3]
                                             [--skip-dadapy] [--idjax-only]

On a GPU/TPU host, `--idjax-only` skips the CPU reference tools (numpy, FAISS, scikit-learn, DADApy)
and reports idjax alone, with the device's own blocked GEMM (jnp, highest precision) as the roofline.

Same data for every tool (float32 Gaussian with a low-rank structure, like pooled representations).
Times are the best of `--repeats` after one warm-up (compilation excluded for idjax and reported
separately). DADApy runs in the numpy<2 venv `.venv-dadapy` (make dadapy-venv) on the same data,
in a subprocess that times only its own calls; its rows are left out if that venv is missing.
GFLOP/s counts the 2 N^2 D flops of the distance GEMM.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import subprocess
import sys
import tempfile
import time

import numpy as np

REPO = pathlib.Path(__file__).resolve().parents[1]
DADAPY_PYTHON = REPO / ".venv-dadapy" / "bin" / "python"

DADAPY_SCRIPT = r"""
import json, sys, time
import numpy as np
from dadapy import Data
x = np.load(sys.argv[1]); y = np.load(sys.argv[2]); labels = np.load(sys.argv[3]); k = int(sys.argv[4])
repeats = int(sys.argv[5])
best_knn, best_profile = np.inf, np.inf
for _ in range(repeats):
    t0 = time.perf_counter()
    d = Data(x.astype(np.float64), maxk=k, n_jobs=2, verbose=False)
    d.compute_distances()
    t1 = time.perf_counter()
    d.compute_id_2NN(algorithm="base", mu_fraction=0.9)
    d.return_id_scaling_gride(range_max=k)
    d.return_label_overlap(labels, k=30)
    d.return_data_overlap(coordinates=y.astype(np.float64), k=30)
    t2 = time.perf_counter()
    best_knn = min(best_knn, t1 - t0)
    # The profile as a researcher runs it: the layer's own graph, the estimates, both overlaps
    # (the data overlap needs the other layer's graph, which DADApy recomputes here).
    best_profile = min(best_profile, t2 - t0)
print(json.dumps({"knn": best_knn, "profile": best_profile}))
"""


def best_time(fn, repeats: int) -> float:
    best = np.inf
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def make_data(n: int, d: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    latent = rng.normal(size=(n, 32)).astype(np.float32)
    x = latent @ rng.normal(size=(32, d)).astype(np.float32) + 0.1 * rng.normal(size=(n, d)).astype(np.float32)
    y = np.tanh(x @ rng.normal(size=(d, d)).astype(np.float32) / np.sqrt(d))
    labels = (latent[:, 0] > 0).astype(np.int64) + 2 * (latent[:, 1] > 0)
    return x.astype(np.float32), y.astype(np.float32), labels


def add_reference_tools(rows: list[tuple[str, float]], x: np.ndarray, k: int, repeats: int) -> None:
    """FAISS IndexFlatL2 (if installed) and scikit-learn brute force on the same data, on the CPU."""
    try:
        import faiss

        def run_faiss():
            index = faiss.IndexFlatL2(x.shape[1])
            index.add(x)
            index.search(x, k + 1)

        rows.append(("FAISS IndexFlatL2", best_time(run_faiss, repeats)))
    except ImportError:
        print("faiss not installed; skipping", file=sys.stderr)

    from sklearn.neighbors import NearestNeighbors

    rows.append(("scikit-learn brute force", best_time(
        lambda: NearestNeighbors(n_neighbors=k + 1, algorithm="brute").fit(x).kneighbors(x), 1)))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=20000)
    parser.add_argument("--d", type=int, default=512)
    parser.add_argument("--k", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--skip-dadapy", action="store_true")
    parser.add_argument("--idjax-only", action="store_true", help="skip numpy, FAISS, scikit-learn and DADApy")
    args = parser.parse_args()

    import jax
    import jax.numpy as jnp

    import idjax

    x, y, labels = make_data(args.n, args.d)
    n, d, k = args.n, args.d, args.k
    flops = 2.0 * n * n * d
    rows: list[tuple[str, float]] = []
    # idjax reads the data where it lives, as the other tools do: on the device, put there once and
    # not inside every timed call (on a GPU that copy alone is ~1 GB for N = 100000, D = 2560).
    x_device, y_device = jax.device_put(x), jax.device_put(y)

    t0 = time.perf_counter()
    jax.block_until_ready(idjax.knn(x_device, k))
    compile_s = time.perf_counter() - t0
    t_idjax = best_time(lambda: jax.block_until_ready(idjax.knn(x_device, k)), args.repeats)
    rows.append(("idjax.knn", t_idjax))

    def knn_and_twonn():
        dist, _ = idjax.knn(x_device, k)
        return idjax.twonn(dist, fraction=0.9)

    float(knn_and_twonn())
    rows.append(("idjax.knn + idjax.twonn", best_time(lambda: float(knn_and_twonn()), args.repeats)))

    block = 2048
    if args.idjax_only:
        # One (block, N) product at a time, each reduced to its max so the N^2 products are never all
        # held at once (40 GB at N = 100000); the max reads the block once, a small cost next to the GEMM.
        def gemm(a):
            blocks = jnp.pad(a, ((0, -n % block), (0, 0))).reshape(-1, block, d)
            return jax.lax.map(lambda q: jnp.matmul(q, a.T, precision=jax.lax.Precision.HIGHEST).max(), blocks)

        gemm = jax.jit(gemm)
        jax.block_until_ready(gemm(x_device))
        t_gemm = best_time(lambda: jax.block_until_ready(gemm(x_device)), args.repeats)
        rows.append(("jnp GEMM only on the device (x @ x.T, no selection)", t_gemm))
    else:
        t_gemm = best_time(lambda: [x[i : i + block] @ x.T for i in range(0, n, block)], args.repeats)
        rows.append(("numpy GEMM only (x @ x.T, no selection)", t_gemm))
        add_reference_tools(rows, x, k, args.repeats)

    # A whole layer profile: kNN graph, TwoNN, GRIDE to rank k, overlap with labels and with the next
    # layer (whose graph a profile computes anyway, so it is included here too).
    def idjax_profile():
        dist, idx = idjax.knn(x_device, k)
        idjax.twonn(dist, fraction=0.9)
        idjax.gride_scaling(dist, range_max=k)
        idjax.label_overlap(idx, labels, 30)
        _, idx_y = idjax.knn(y_device, 30)
        idjax.data_overlap(idx, idx_y, 30)

    idjax_profile()
    t_profile = best_time(idjax_profile, args.repeats)

    dadapy = None
    if not (args.skip_dadapy or args.idjax_only) and DADAPY_PYTHON.exists():
        with tempfile.TemporaryDirectory() as tmp:
            paths = [os.path.join(tmp, f"{name}.npy") for name in ("x", "y", "labels")]
            for path, arr in zip(paths, (x, y, labels), strict=True):
                np.save(path, arr)
            env = dict(os.environ, OMP_NUM_THREADS="2")
            out = subprocess.run([str(DADAPY_PYTHON), "-c", DADAPY_SCRIPT, *paths, str(k), "1"],
                                 capture_output=True, text=True, env=env, check=True)
            dadapy = json.loads(out.stdout.strip().splitlines()[-1])
            rows.append(("DADApy compute_distances", dadapy["knn"]))

    print(f"\nkNN graph, N={n}, D={d}, k={k}, float32, {jax.devices()[0].platform} ({jax.devices()[0].device_kind}), "
          f"{os.cpu_count()} cores (idjax compile: {compile_s:.2f} s)\n")
    print("| tool | time (s) | GFLOP/s | idjax speed-up |")
    print("|---|---|---|---|")
    for name, seconds in rows:
        print(f"| {name} | {seconds:.4f} | {flops / seconds / 1e9:.0f} | {seconds / t_idjax:.2f}x |")
    gemm_name = "the device's jnp" if args.idjax_only else "the numpy"
    print(f"\nidjax.knn reaches {t_gemm / t_idjax:.0%} of {gemm_name} GEMM rate on the same data.")
    print("\n| whole layer profile (kNN + TwoNN + GRIDE to k + label and data overlap) | time (s) | idjax speed-up |")
    print("|---|---|---|")
    print(f"| idjax | {t_profile:.3f} | 1.00x |")
    if dadapy is not None:
        print(f"| DADApy 0.3.4 | {dadapy['profile']:.3f} | {dadapy['profile'] / t_profile:.1f}x |")


if __name__ == "__main__":
    main()
