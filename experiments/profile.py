"""Layer profile: per layer one kNN graph, reused for TwoNN (+ decimation), GRIDE scaling and overlaps.

`run(config, workdir)` reads the representation store, computes per layer (cached in
`workdir/profile_layers/`, so a killed run resumes at the next unfinished layer), selects the layer
at the first relative ID minimum after the peak, probes every layer when labels exist, and writes
`results.json`, `profile.npz` and the figures.

The ID that drives the selection is `config.profile.id_estimator`:
  "twonn"            TwoNN fit on all N points (the nearest-neighbour scale).
  "twonn_decimated"  TwoNN mean over disjoint subsets of about N / `decimation_target_ratio` points
                     (the paper's choice for iGPT, where the scaling curve is flat: N / 32).
  "gride"            GRIDE at ranks (n2 / 2, n2) with n2 = `gride_rank` (a larger, fixed scale).
The whole scaling curves (decimation and GRIDE) are saved either way.
"""

from __future__ import annotations

import json
import pathlib
import time

import jax
import ml_collections
import numpy as np
from absl import logging
from tqdm.auto import tqdm

import idjax
from experiments import report, store
from idjax.files import atomic_save_npz, atomic_write_json, load_npz, workdir_lock
from idjax.selection import select_layer


def _common_keep(layers: list[np.ndarray], policy: str) -> tuple[np.ndarray, list[int]]:
    """Rows kept in every layer (so overlaps compare the same points) and duplicates per layer."""
    keep = np.ones(layers[0].shape[0], bool)
    per_layer = []
    for i, x in enumerate(layers):
        dup = idjax.find_duplicates(np.asarray(x))
        per_layer.append(dup.count)
        if dup.count and policy == "error":
            raise ValueError(
                f"layer {i} has {dup.count} duplicate representations (e.g. identical inputs); set "
                "profile.duplicates='drop' to leave them out of every layer"
            )
        keep &= ~dup.is_duplicate
    return np.flatnonzero(keep), per_layer


def knn_graph(x: np.ndarray, k: int, sharded: str = "auto") -> tuple[np.ndarray, np.ndarray]:
    """The kNN graph as host arrays: on one device `idjax.knn`; on several (GPUs, a TPU slice, or hosts
    after `jax.distributed.initialize`) the device ring of `idjax.sharded.knn_sharded`.

    sharded: "auto" (the ring when more than one device is visible), "always" or "never".
    """
    if sharded not in ("auto", "always", "never"):
        raise ValueError(f"profile.sharded must be auto, always or never; got {sharded!r}")
    if sharded == "always" or (sharded == "auto" and jax.device_count() > 1):
        result = idjax.sharded.gather_to_host(idjax.sharded.knn_sharded(x, k))
    else:
        result = idjax.knn(x, k)
    return np.asarray(result.distances), np.asarray(result.indices)


def layer_metrics(x: np.ndarray, labels: np.ndarray | None, cfg: ml_collections.ConfigDict,
                  seed: int) -> dict[str, np.ndarray]:
    """Everything computed from one layer's (N, D) representation and its kNN graph."""
    k_max = min(cfg.k_max, x.shape[0] - 1)
    dist, idx = knn_graph(x, k_max, cfg.get("sharded", "auto"))
    out = {
        "indices": np.asarray(idx),
        "twonn": np.float64(idjax.twonn(dist, fraction=cfg.twonn_fraction)),
        "twonn_mle": np.float64(idjax.twonn(dist, method="mle")),
        "mean_r1": np.float64(dist[:, 0].mean()),
    }
    ids, errs, ranks = idjax.gride_scaling(dist, range_max=min(cfg.gride_range_max, k_max))
    out.update(gride_ids=ids, gride_errs=errs, gride_ranks=ranks,
               gride_scales=np.array([dist[:, r - 1].mean() for r in ranks]))
    if cfg.decimation:
        dec_ids, dec_errs, sizes = idjax.twonn_decimation(x, fraction=cfg.twonn_fraction, seed=seed,
                                                          min_size=cfg.decimation_min_size)
        out.update(decimation_ids=dec_ids, decimation_errs=dec_errs, decimation_sizes=sizes)
    if labels is not None:
        ks = [k for k in cfg.label_ks if k <= k_max]
        out["label_ks"] = np.asarray(ks)
        out["label_overlap"] = np.array([idjax.label_overlap(idx, labels, k) for k in ks])
        out["label_overlap_weighted"] = np.array([idjax.label_overlap(idx, labels, k, weighted=True) for k in ks])
    return out


def chosen_id(metrics: dict, cfg: ml_collections.ConfigDict) -> tuple[float, float]:
    """The (ID, error) of one layer under `cfg.id_estimator`."""
    if cfg.id_estimator == "twonn":
        n = len(metrics["indices"])
        return float(metrics["twonn"]), float(metrics["twonn"]) / np.sqrt(n)
    if cfg.id_estimator == "twonn_decimated":
        sizes = metrics["decimation_sizes"]
        target = sizes[0] / cfg.decimation_target_ratio
        i = int(np.argmin(np.abs(np.log(sizes / target))))
        return float(metrics["decimation_ids"][i]), float(metrics["decimation_errs"][i])
    if cfg.id_estimator == "gride":
        ranks = list(metrics["gride_ranks"])
        if cfg.gride_rank not in ranks:
            raise ValueError(f"profile.gride_rank={cfg.gride_rank} is not among the computed ranks {ranks}")
        i = ranks.index(cfg.gride_rank)
        return float(metrics["gride_ids"][i]), float(metrics["gride_errs"][i])
    raise ValueError(f"unknown id_estimator {cfg.id_estimator!r}: twonn, twonn_decimated, gride")


def compute_profile(reps: store.Representations, cfg: ml_collections.ConfigDict, cache_dir: pathlib.Path,
                    seed: int = 0) -> tuple[dict, dict]:
    """Per-layer metrics (resumable through `cache_dir`), adjacent-layer overlaps and the selection.

    Returns:
      (summary dict for results.json, arrays dict for profile.npz).
    """
    keep, dup_per_layer = _common_keep(reps.layers, cfg.duplicates)
    labels = None if reps.labels is None else np.asarray(reps.labels)[keep]
    n_layers = len(reps.layers)
    per_layer = []
    start = time.perf_counter()
    with tqdm(total=n_layers, desc="profile", unit="layer", dynamic_ncols=True) as bar:
        for layer, x in enumerate(reps.layers):
            cache = cache_dir / f"layer_{layer:03d}.npz"
            if cache.exists():
                metrics = load_npz(cache, fix=f"delete it and re-run the profile to recompute layer {layer}")
            else:
                metrics = layer_metrics(np.asarray(x, np.float32)[keep], labels, cfg, seed + layer)
                atomic_save_npz(cache, **metrics)
            per_layer.append(metrics)
            bar.update(1)
    k_overlap = min(cfg.overlap_k, per_layer[0]["indices"].shape[1])
    adjacent = np.array([idjax.data_overlap(per_layer[i]["indices"], per_layer[i + 1]["indices"], k_overlap)
                         for i in range(n_layers - 1)])
    ids, errs = map(np.array, zip(*[chosen_id(m, cfg) for m in per_layer], strict=True))
    choice = select_layer(ids, errs, window=cfg.selection_window, min_drop=cfg.selection_min_drop,
                          min_rise=cfg.selection_min_rise, z=cfg.selection_z)

    arrays = {
        "id": ids, "id_err": errs,
        "twonn": np.array([m["twonn"] for m in per_layer]),
        "twonn_mle": np.array([m["twonn_mle"] for m in per_layer]),
        "gride_ids": np.stack([m["gride_ids"] for m in per_layer]),
        "gride_errs": np.stack([m["gride_errs"] for m in per_layer]),
        "gride_ranks": per_layer[0]["gride_ranks"],
        "gride_scales": np.stack([m["gride_scales"] for m in per_layer]),
        "adjacent_overlap": adjacent, "kept_indices": keep,
        "relative_depth": np.arange(n_layers) / (n_layers - 1),
    }
    if cfg.decimation:
        arrays.update(decimation_ids=np.stack([m["decimation_ids"] for m in per_layer]),
                      decimation_errs=np.stack([m["decimation_errs"] for m in per_layer]),
                      decimation_sizes=per_layer[0]["decimation_sizes"])
    summary = {
        "n_points": int(len(keep)), "n_layers": n_layers,
        "n_duplicates_dropped": int(reps.layers[0].shape[0] - len(keep)),
        "duplicates_per_layer": dup_per_layer, "id_estimator": cfg.id_estimator,
        "id": ids.tolist(), "id_err": errs.tolist(), "peak_layer": choice.peak, "selected_layer": choice.selected,
        "selection_rule": choice.rule, "adjacent_overlap_k": k_overlap, "adjacent_overlap": adjacent.tolist(),
        "profile_seconds": time.perf_counter() - start,
    }
    if labels is not None:
        arrays.update(label_ks=per_layer[0]["label_ks"],
                      label_overlap=np.stack([m["label_overlap"] for m in per_layer]),
                      label_overlap_weighted=np.stack([m["label_overlap_weighted"] for m in per_layer]))
        ks = per_layer[0]["label_ks"].tolist()
        main_k = ks.index(cfg.overlap_k) if cfg.overlap_k in ks else len(ks) - 1
        best = int(np.argmax(arrays["label_overlap"][:, main_k]))
        summary.update(label_ks=ks, label_overlap=arrays["label_overlap"].tolist(),
                       label_overlap_weighted=arrays["label_overlap_weighted"].tolist(),
                       best_overlap_layer=best, best_overlap_k=ks[main_k])
    return summary, arrays


def run_probes(reps: store.Representations, keep: np.ndarray, cfg: ml_collections.ConfigDict,
               overlap_k: int = 30) -> dict:
    """Linear-probe and kNN-classifier accuracy per layer (labels required).

    With `cfg.remote_homology` and group labels in the store (SCOPe families), the kNN probe and a
    remote-homology label overlap skip neighbours of the query's own family, on the points whose
    superfamily spans at least two families (the only ones it can be measured on).
    """
    from experiments import probe

    layers = probe.LayerRows(reps.layers, keep)  # one layer in memory at a time, not all of them
    labels = np.asarray(reps.labels)[keep]
    groups = reps.manifest["metadata"].get("groups")
    groups = None if groups is None or not cfg.remote_homology else np.asarray(groups)[keep]
    out = {}
    if cfg.linear:
        out["linear_probe_accuracy"] = probe.linear_probe_accuracy(
            layers, labels, steps=cfg.steps, seed=cfg.seed, test_fraction=cfg.test_fraction).tolist()
    if groups is not None:
        subset = probe.remote_homology_subset(labels, groups)
        if len(subset) < cfg.knn_k + 2:
            raise ValueError(f"only {len(subset)} points have a superfamily spanning two families; "
                             "remote-homology probing needs more (lower data.min_class_size or add data)")
        layers, labels, groups = layers.take_rows(subset), labels[subset], groups[subset]
        out["remote_homology_points"] = int(len(subset))
        overlap = probe.label_overlap_per_layer(layers, labels, overlap_k, groups)
        out["remote_homology_label_overlap"] = overlap.tolist()
    out["knn_accuracy"] = probe.knn_accuracy(layers, labels, k=cfg.knn_k, groups=groups, test_fraction=None).tolist()
    out["knn_k"] = cfg.knn_k
    out["remote_homology"] = groups is not None
    key = "linear_probe_accuracy" if cfg.linear else "knn_accuracy"
    out["best_probe_layer"] = int(np.argmax(out[key]))
    out["best_probe_metric"] = key
    return out


def run_probe_only(config: ml_collections.ConfigDict, workdir: pathlib.Path) -> dict:
    """Probes every layer of the stored representations; writes probes.json."""
    workdir = pathlib.Path(workdir)
    with workdir_lock(workdir, "probe"):
        return _run_probe_only(config, workdir)


def _run_probe_only(config: ml_collections.ConfigDict, workdir: pathlib.Path) -> dict:
    reps = store.load(store.store_dir(workdir), verify=config.profile.get("verify_store", True))
    if reps.labels is None:
        raise ValueError(f"the representations in {workdir} have no labels to probe")
    keep, _ = _common_keep(reps.layers, config.profile.duplicates)
    probes = run_probes(reps, keep, config.probe, config.profile.overlap_k)
    atomic_write_json(workdir / "probes.json", probes, checksum=True)
    print(f"best probe layer ({probes['best_probe_metric']}): {probes['best_probe_layer']}; {workdir / 'probes.json'}")
    return probes


def run(config: ml_collections.ConfigDict, workdir: pathlib.Path) -> dict:
    """Profiles the representations in `workdir` and writes results.json, profile.npz and figures.

    Holds the workdir's lock (`idjax.files.workdir_lock`): a second job on the same workdir is refused.
    """
    with workdir_lock(workdir, "profile", process_index=jax.process_index()):
        return _run(config, pathlib.Path(workdir))


def _run(config: ml_collections.ConfigDict, workdir: pathlib.Path) -> dict:
    reps = store.load(store.store_dir(workdir), verify=config.profile.get("verify_store", True))
    logging.info("profiling %d layers x %d examples (devices: %s)", len(reps.layers), len(reps.ids), jax.devices())
    summary, arrays = compute_profile(reps, config.profile, workdir / "profile_layers", seed=config.get("seed", 0))
    if reps.labels is not None and config.get("probe") and config.probe.enabled:
        probes = run_probes(reps, arrays["kept_indices"], config.probe, config.profile.overlap_k)
        summary["probes"] = probes
        for key in ("linear_probe_accuracy", "knn_accuracy", "remote_homology_label_overlap"):
            if key in probes:
                arrays[key] = np.asarray(probes[key])
    meta = reps.manifest["metadata"]
    results = {"name": config.get("name", workdir.name), "model": meta.get("model"), "data": meta.get("data"),
               "label_names": meta.get("label_names"), **summary,
               "config": json.loads(config.to_json_best_effort())}
    atomic_save_npz(workdir / "profile.npz", **arrays)
    atomic_write_json(workdir / "results.json", results, checksum=True)
    figures = report.write_figures(workdir, [(results["name"], results, arrays)])
    results["figures"] = [str(f) for f in figures]
    atomic_write_json(workdir / "results.json", results, checksum=True)
    return results
