"""Does the layer-selection rule find the planted layer? Synthetic "layers" with a known ID per layer.

Each layer is a curved d-dimensional manifold in R^D (alternately the sphere S^d and a random
nonlinear graph t -> (t, sin(t M)), both randomly rotated into R^D and scaled to unit rms norm), with
isotropic Gaussian noise
whose rms displacement is `noise` x the median (over layers) mean nearest-neighbour distance. The planted ID per
layer follows profiles shaped like the paper's and like the hard cases of the rule (a taller second
peak, an input layer with the highest ID, a fall to a low plateau). For every candidate ID estimator
the profile goes through `idjax.selection.select_layer`, and the table reports in how many runs
(shapes x seeds) the selected layer is the planted one (the plateau start within one layer).

Every candidate is computed twice, through the public API (idjax.knn / twonn / gride_scaling /
twonn_decimation) and through the pipeline's profile code (experiments.profile.compute_profile on an
in-memory representation set); the script checks that both give the same IDs and selections.

  python benchmarks/planted_profiles.py                     # the README table (N = 1000, 3 seeds)
  python benchmarks/planted_profiles.py --n 800 --seeds 1   # quicker
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np

import idjax
from configs import base
from experiments import profile, store
from idjax.selection import PLATEAU_START, select_layer

# (planted ID per layer, planted layer, the branch that should fire)
PROFILES = {
    "paper": ([6, 9, 12, 14, 12, 9, 7, 8, 10, 11, 11, 10, 10], 6, "relative_minimum"),
    "tall late peak": ([5, 9, 12, 14, 11, 8, 6, 9, 12, 15, 16, 15, 14], 6, "relative_minimum"),
    "high input layer": ([18, 9, 12, 15, 13, 10, 7, 5, 6, 8, 9, 9, 9], 7, "relative_minimum"),
    "low plateau": ([6, 10, 14, 16, 12, 9, 6, 6, 6, 6, 6, 6, 6], 6, PLATEAU_START),
}
NOISE_LEVELS = (0.0, 0.5, 1.0, 2.0)
AMBIENT = 48


def clean_layer(dim: int, n: int, seed: int, ambient: int = AMBIENT) -> np.ndarray:
    """(n, ambient) float64 points on a curved `dim`-manifold (S^dim or a random nonlinear graph), randomly
    rotated, centred and scaled to unit rms norm."""
    rng = np.random.default_rng(seed)
    if seed % 2 == 0:
        z = rng.normal(size=(n, dim + 1))
        z /= np.linalg.norm(z, axis=1, keepdims=True)
    else:
        t = rng.normal(size=(n, dim))
        z = np.hstack([t, np.sin(t @ rng.normal(scale=1 / np.sqrt(dim), size=(dim, dim)) * 1.5)])
    rotation, _ = np.linalg.qr(rng.normal(size=(ambient, z.shape[1])))
    x = z @ rotation.T
    x -= x.mean(0)
    return x / np.sqrt((x**2).sum(1).mean())  # unit rms norm, as normalised hidden states have


def planted_layers(dims: list[int], n: int, noise: float, seed: int) -> list[np.ndarray]:
    """One (n, AMBIENT) float32 layer per planted ID, with isotropic Gaussian noise of rms displacement
    `noise` x the median over layers of the clean mean nearest-neighbour distance: one noise scale for the
    whole network, as a representation's noise does not shrink with its ID, so low-ID layers (small NN
    distances) are perturbed most at their own nearest-neighbour scale."""
    clean = [clean_layer(d, n, 1000 * seed + 17 * i) for i, d in enumerate(dims)]
    nn_distance = np.median([np.asarray(idjax.knn(x.astype(np.float32), 1).distances).mean() for x in clean])
    rng = np.random.default_rng(seed + 1)
    scale = noise * nn_distance / np.sqrt(AMBIENT)
    return [(x + rng.normal(scale=scale, size=x.shape)).astype(np.float32) for x in clean]


def candidates(cfg) -> dict[str, str]:
    """Candidate name -> profile.id_estimator, with the config tweak each needs applied in `configure`."""
    names = {"TwoNN (all N)": "twonn"}
    for ratio in (4, 8, 32):
        names[f"TwoNN decimated N/{ratio}"] = f"twonn_decimated:{ratio}"
    names["TwoNN decimated N/32, >= 256 pts"] = "twonn_decimated:32:256"
    for rank in (4, 8, 16, 32, 64):
        names[f"GRIDE n2={rank}"] = f"gride:{rank}"
    names["GRIDE scale plateau"] = "gride_plateau"
    return names


def configure(cfg, spec: str):
    cfg = cfg.copy_and_resolve_references()
    name, *args = spec.split(":")
    cfg.id_estimator = name
    if name == "twonn_decimated" and args:
        cfg.decimation_target_ratio = int(args[0])
        cfg.decimation_min_subset = int(args[1]) if len(args) > 1 else 0
    if name == "gride" and args:
        cfg.gride_rank = int(args[0])
    return cfg


def api_layer_metrics(x: np.ndarray, cfg, seed: int) -> dict:
    """The per-layer metrics the candidates need, from the public API alone."""
    dist, idx = idjax.knn(x, cfg.k_max)
    ids, errs, ranks = idjax.gride_scaling(dist, range_max=cfg.gride_range_max)
    decimation = idjax.twonn_decimation(x, fraction=cfg.twonn_fraction, seed=seed, min_size=cfg.decimation_min_size)
    return {"indices": np.asarray(idx), "twonn": float(idjax.twonn(dist, fraction=cfg.twonn_fraction)),
            "gride_ids": ids, "gride_errs": errs, "gride_ranks": ranks,
            "decimation_ids": decimation.ids, "decimation_errs": decimation.errs, "decimation_sizes": decimation.sizes}


def hit(selected, planted: int, expected_branch: str) -> bool:
    if selected is None:
        return False
    tolerance = 1 if expected_branch == PLATEAU_START else 0
    return abs(selected - planted) <= tolerance


def run(n: int, seeds: int, noise_levels=NOISE_LEVELS, shapes=None, verbose: bool = True,
        estimators: list[str] | None = None) -> dict:
    """Hits per (candidate, noise) over shapes x seeds, the API-vs-pipeline check, and per run
    (candidate, noise, shape, seed, selected, branch, ID profile, hit). `estimators`: only these
    `profile.id_estimator` values with the default config's settings instead of every candidate."""
    cfg = base.analysis_config().profile
    specs = candidates(cfg) if estimators is None else {f"{e} (default settings)": e for e in estimators}
    shapes = shapes or list(PROFILES)
    hits = {(name, noise): 0 for name in specs for noise in noise_levels}
    details = []
    max_api_pipeline_diff = 0.0
    for noise in noise_levels:
        for shape in shapes:
            dims, planted, expected_branch = PROFILES[shape]
            for seed in range(seeds):
                layers = planted_layers(dims, n, noise, seed)
                api = [api_layer_metrics(x, cfg, seed + i) for i, x in enumerate(layers)]
                reps = store.Representations(layers, None, [str(i) for i in range(n)], {"metadata": {}})
                with tempfile.TemporaryDirectory() as cache:
                    _, arrays = profile.compute_profile(reps, cfg, Path(cache), seed=seed)
                pipeline = [{"indices": api[i]["indices"], "twonn": arrays["twonn"][i],
                             "gride_ids": arrays["gride_ids"][i], "gride_errs": arrays["gride_errs"][i],
                             "gride_ranks": arrays["gride_ranks"], "decimation_ids": arrays["decimation_ids"][i],
                             "decimation_errs": arrays["decimation_errs"][i],
                             "decimation_sizes": arrays["decimation_sizes"]} for i in range(len(dims))]
                for name, spec in specs.items():
                    c = configure(cfg, spec)
                    ids_api, errs_api = map(np.array, zip(*[profile.chosen_id(m, c) for m in api], strict=True))
                    ids_pipe, errs_pipe = map(np.array, zip(*[profile.chosen_id(m, c) for m in pipeline], strict=True))
                    max_api_pipeline_diff = max(max_api_pipeline_diff, float(np.max(np.abs(ids_api / ids_pipe - 1))))
                    kwargs = dict(z=c.selection_z, min_drop=c.selection_min_drop, min_rise=c.selection_min_rise,
                                  min_plateau=c.selection_min_plateau)
                    choice = select_layer(ids_api, errs_api, **kwargs)
                    if select_layer(ids_pipe, errs_pipe, **kwargs).selected != choice.selected:
                        max_api_pipeline_diff = np.inf
                    ok = hit(choice.selected, planted, expected_branch)
                    hits[(name, noise)] += ok
                    details.append((name, noise, shape, seed, choice.selected, choice.branch, np.round(ids_api, 1), ok))
                if verbose:
                    print(f"  noise {noise} x NN, {shape}, seed {seed}: done", flush=True)
    return {"hits": hits, "runs": len(shapes) * seeds, "specs": specs, "noise_levels": noise_levels,
            "details": details, "max_api_pipeline_diff": max_api_pipeline_diff}


def table(result: dict) -> str:
    noise_levels = result["noise_levels"]
    runs = result["runs"]
    lines = ["| ID estimator | " + " | ".join(f"noise {v:g} x NN" for v in noise_levels) + " | all |",
             "|---|" + "---:|" * (len(noise_levels) + 1)]
    for name in result["specs"]:
        row = [result["hits"][(name, v)] for v in noise_levels]
        lines.append(f"| {name} | " + " | ".join(f"{h}/{runs}" for h in row)
                     + f" | {sum(row)}/{runs * len(noise_levels)} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=1000, help="points per layer")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--details", action="store_true", help="print every run's selection and ID profile")
    args = parser.parse_args()
    start = time.perf_counter()
    result = run(args.n, args.seeds)
    if args.details:
        for row in result["details"]:
            print(*row)
    print(f"\nplanted layer selected (plateau start within one layer), runs = {len(PROFILES)} shapes x "
          f"{args.seeds} seeds, N = {args.n}, D = {AMBIENT}, {len(PROFILES['paper'][0])} layers:\n")
    print(table(result))
    print(f"\nAPI vs pipeline: max relative ID difference {result['max_api_pipeline_diff']:.1e} "
          f"(inf: a selection differed); {time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    main()
