"""Layer profile: per layer one kNN graph, reused for TwoNN (+ decimation), GRIDE scaling and overlaps.

`run(config, workdir)` reads the representation store, computes per layer (cached in
`workdir/profile_layers/`, so a killed run resumes at the next unfinished layer), selects the layer
at the first relative ID minimum after the peak, probes every layer when labels exist, and writes
`results.json`, `profile.npz` and the figures.

Every cached result (per layer: the kNN graph, the IDs from it, the decimation curve, the label
overlaps; the linear and the neighbour probes) is stored with the key of what produced it: the
store's fingerprint, a content hash of the layer, a hash of the kept point indices (and labels), and
exactly the options it depends on (the graph: k_max; the rest: `ID_OPTIONS`, ...). A file whose key differs is
recomputed and replaced, never read, so a rerun under changed options or after a re-extraction gives
a fresh run's numbers while redoing only what the change affects.

The ID that drives the selection is `config.profile.id_estimator`:
  "twonn"            TwoNN fit on all N points (the nearest-neighbour scale, the most noise-sensitive).
  "twonn_decimated"  TwoNN mean over disjoint subsets of about max(N / `decimation_target_ratio`,
                     `decimation_min_subset`) points (the paper's choice for iGPT: N / 32).
  "gride"            GRIDE at ranks (n2 / 2, n2) with n2 = `gride_rank` (unset: the largest computed rank
                     up to 64, i.e. GRIDE(32, 64) whenever k_max, gride_range_max and N allow it).
  "gride_plateau"    per layer, GRIDE where its scaling curve is flattest (see `scale_plateau`).
The whole scaling curves (decimation and GRIDE) are saved either way, and `results.json` lists, per
layer, TwoNN, decimated TwoNN and GRIDE at `gride_rank` with their relative spread
(`estimator_agreement`). `selection_branch` says which branch of the rule fired (idjax/selection.py);
`selected_layer` is null when the profile has no significant peak or minimum.

Several processes (`jax.distributed`) share the work as `process_mode` decides: whole layers per process,
or every layer on the device ring across processes; process 0 probes and writes the files.
"""

from __future__ import annotations

import hashlib
import io
import json
import time
from collections.abc import Callable, Sequence

import jax
import ml_collections
import numpy as np
from absl import logging
from etils import epath
from jax.experimental import multihost_utils
from tqdm.auto import tqdm

import idjax
from experiments import distributed, files, report, store
from experiments.files import CorruptFileError, atomic_save_npz, atomic_write_json, load_npz, workdir_lock
from idjax.selection import select_layer


def _common_keep(layers: list[np.ndarray], policy: str) -> tuple[np.ndarray, list[int]]:
    """Rows kept in every layer (so overlaps compare the same points) and duplicates per layer."""
    keep = np.ones(layers[0].shape[0], bool)
    per_layer = []
    for i, x in enumerate(layers):
        duplicates = idjax.find_duplicates(np.asarray(x))
        per_layer.append(duplicates.count)
        if duplicates.count and policy == "error":
            raise ValueError(
                f"layer {i} has {duplicates.count} duplicate representations (e.g. identical inputs); set "
                "profile.duplicates='drop' to leave them out of every layer"
            )
        keep &= ~duplicates.is_duplicate
    return np.flatnonzero(keep), per_layer


def knn_graph(x: np.ndarray, k: int, sharded: str = "auto", *, local: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """The kNN graph as host arrays: on one device `idjax.knn`; on several (GPUs, a TPU slice, or hosts
    after `jax.distributed.initialize`) the device ring of `idjax.sharded.knn_sharded`.

    sharded: "auto" (the ring when more than one device is visible), "always" or "never".
    local: only this process's devices (a layer profiled by one process of several), no collective.
    """
    if sharded not in ("auto", "always", "never"):
        raise ValueError(f"profile.sharded must be auto, always or never; got {sharded!r}")
    devices = jax.local_devices() if local else jax.devices()
    if sharded == "always" or (sharded == "auto" and len(devices) > 1):
        mesh = jax.sharding.Mesh(np.array(devices), ("data",))
        result = idjax.sharded.gather_to_host(idjax.sharded.knn_sharded(x, k, mesh=mesh))
    else:
        result = idjax.knn(x, k)
    return np.asarray(result.distances), np.asarray(result.indices)


PROCESS_MODES = ("auto", "layers", "ring")


def process_mode(n_points: int, dim: int, k: int, cfg: ml_collections.ConfigDict) -> str:
    """How the layers of a profile are spread over the processes of a multi-process job:

      "single"  one process: every layer on its devices (the ring over them when it has several).
      "layers"  whole layers over processes: process p profiles layers i with i % process_count == p on its
                own devices, and the results are gathered; no collective inside a layer.
      "ring"    every layer on the device ring across all processes, one layer after another.

    `profile.processes="auto"` takes "layers" when one layer's kNN search fits one process's devices
    (`idjax.plan_knn` with the local device count: its memory model, half of each device's memory) and
    "ring" when only the memory of every process together holds it. Process 0 decides for all, so hosts
    with different memory cannot disagree.
    """
    if jax.process_count() == 1:
        return "single"
    choice = cfg.get("processes", "auto")
    if choice not in PROCESS_MODES:
        raise ValueError(f"profile.processes must be one of {', '.join(PROCESS_MODES)}; got {choice!r}")
    if choice == "auto":
        try:
            idjax.plan_knn(n_points, dim, k, devices=jax.local_device_count())
            choice = "layers"
        except MemoryError:
            choice = "ring"
    code = multihost_utils.broadcast_one_to_all(np.int32(PROCESS_MODES.index(choice)))
    return PROCESS_MODES[int(code)]


def _pack(arrays: dict[str, np.ndarray]) -> np.ndarray:
    buffer = io.BytesIO()
    np.savez(buffer, **arrays)
    return np.frombuffer(buffer.getvalue(), np.uint8)


def gather_layers(mine: dict[int, dict[str, np.ndarray]], n_layers: int) -> list[dict[str, np.ndarray]]:
    """Every layer's metrics on every process, from the layers each computed (layer i on process
    i % process_count). Exact: the arrays travel as bytes (float64 stays float64), one round of
    `multihost_utils.process_allgather` per process_count layers."""
    count, me = jax.process_count(), jax.process_index()
    per_layer: list = [None] * n_layers
    for start in range(0, n_layers, count):
        payload = _pack(mine[start + me]) if start + me < n_layers else np.zeros(0, np.uint8)
        sizes = np.asarray(multihost_utils.process_allgather(np.array([payload.size], np.int32))).reshape(count)
        padded = np.zeros(int(sizes.max()), np.uint8)
        padded[: payload.size] = payload
        everyone = np.asarray(multihost_utils.process_allgather(padded)).reshape(count, -1)
        for p in range(min(count, n_layers - start)):
            with np.load(io.BytesIO(everyone[p, : sizes[p]].tobytes()), allow_pickle=False) as stored:
                per_layer[start + p] = {name: stored[name] for name in stored.files}
    return per_layer


# Which profile options each cached per-layer result depends on. Every other option (the ID that drives
# the selection, the selection thresholds, overlap_k) acts only on cached results, so changing it
# recomputes nothing; `sharded` picks where the graph is computed, not what it is.
ID_OPTIONS = ("twonn_fraction", "gride_range_max")
DECIMATION_OPTIONS = ("twonn_fraction", "decimation_min_size")
LABEL_OPTIONS = ("label_ks",)
PROBE_LINEAR_OPTIONS = ("steps", "seed", "test_fraction")
PROBE_NEIGHBOUR_OPTIONS = ("knn_k", "remote_homology")
_CACHE_FORMAT = 1
_KEY = "__cache_key__"


def array_digest(array: np.ndarray, chunk_bytes: int = 1 << 26) -> str:
    """Content hash of an (N, ...) array (shape, dtype and values), read in row chunks of about 64 MiB
    so a memory-mapped (N, D) layer is never loaded whole."""
    array = np.asarray(array)
    h = hashlib.sha256()  # hardware-accelerated on current CPUs: the fastest of hashlib here
    h.update(repr((array.shape, array.dtype.str)).encode())
    flat = array.reshape(len(array), -1)
    rows = max(1, chunk_bytes // max(1, flat.shape[1] * flat.itemsize))
    for start in range(0, len(flat), rows):
        h.update(np.ascontiguousarray(flat[start : start + rows]))  # a view when already contiguous
    return h.hexdigest()[:32]


def read_cache_entry(path: epath.PathLike, key: str) -> dict[str, np.ndarray] | None:
    """The arrays of the cache file `path` if it was written for exactly `key`, else None.

    The single read path of every cached result: a file written for another key (other data, other
    points, other options), an older format or an unreadable file is never returned as a result.
    """
    if not epath.Path(path).is_file():
        return None
    try:
        stored = load_npz(path, fix="it is recomputed")  # checksum: a damaged or swapped file is never read
    except CorruptFileError as err:
        logging.warning("%s; recomputing it", err)
        return None
    if _KEY not in stored or str(stored[_KEY]) != key:
        return None
    return {name: value for name, value in stored.items() if name != _KEY}


def write_cache_entry(path: epath.PathLike, key: str, arrays: dict[str, np.ndarray]) -> None:
    """The single write path of every cached result: the arrays and the key that produced them, atomically."""
    atomic_save_npz(path, **{_KEY: np.array(key)}, **arrays)


def _cache_text(key: dict) -> str:
    return json.dumps({"format": _CACHE_FORMAT, **key}, sort_keys=True)


def cached(path: epath.PathLike, key: dict, compute: Callable[[], dict], *,
           collective: bool = False) -> dict[str, np.ndarray]:
    """`compute()` as numpy arrays, read from `path` when it holds the result for `key`, else computed and
    stored there (replacing whatever the file held). A hit and a fresh computation return the same values.

    collective: `compute` is a collective of every process (the device ring across processes), so it
    runs on all of them unless every process has the result: one process's hit cannot leave the others
    waiting in the ring.
    """
    text = _cache_text(key)
    hit = read_cache_entry(path, text)
    if collective and jax.process_count() > 1:
        everyone = np.asarray(multihost_utils.process_allgather(np.array([hit is not None])))
        hit = hit if bool(everyone.all()) else None
    if hit is not None:
        return hit
    arrays = {name: np.asarray(value) for name, value in compute().items()}
    write_cache_entry(path, text, arrays)
    return arrays


def _options(cfg: ml_collections.ConfigDict, names: tuple[str, ...]) -> dict:
    return {name: cfg.get(name) for name in names}


def id_metrics(dist: np.ndarray, cfg: ml_collections.ConfigDict) -> dict[str, np.ndarray]:
    """TwoNN (fit and MLE), mean r1 and the GRIDE scaling curve from one layer's (N, k) distances."""
    ids, errs, ranks = idjax.gride_scaling(dist, range_max=min(cfg.gride_range_max, dist.shape[1]))
    return {"twonn": np.float64(idjax.twonn(dist, fraction=cfg.twonn_fraction)),
            "twonn_mle": np.float64(idjax.twonn(dist, method="mle")),
            "mean_r1": np.float64(dist[:, 0].mean()),
            "gride_ids": ids, "gride_errs": errs, "gride_ranks": ranks,
            "gride_scales": np.array([dist[:, r - 1].mean() for r in ranks])}


def decimation_metrics(x: np.ndarray, cfg: ml_collections.ConfigDict, seed: int) -> dict[str, np.ndarray]:
    """TwoNN on disjoint subsets of N/2^i points of one layer's (N, D) representation."""
    ids, errs, sizes = idjax.twonn_decimation(x, fraction=cfg.twonn_fraction, seed=seed,
                                              min_size=cfg.decimation_min_size)
    return {"decimation_ids": ids, "decimation_errs": errs, "decimation_sizes": sizes}


def label_metrics(idx: np.ndarray, labels: np.ndarray, label_ks) -> dict[str, np.ndarray]:
    """Overlap with labels (plain and class-weighted) at every k of `label_ks` the (N, k) graph reaches."""
    ks = [k for k in label_ks if k <= idx.shape[1]]
    return {"label_ks": np.asarray(ks),
            "label_overlap": np.array([idjax.label_overlap(idx, labels, k) for k in ks]),
            "label_overlap_weighted": np.array([idjax.label_overlap(idx, labels, k, weighted=True) for k in ks])}


def layer_metrics(x, keep: np.ndarray, labels: np.ndarray | None, cfg: ml_collections.ConfigDict, seed: int, *,
                  layer: int, identity: dict, cache_dir: epath.PathLike, local: bool = False) -> dict[str, np.ndarray]:
    """Everything computed from one layer's representation, each part cached under the key of exactly
    what produced it: the kNN graph (data, points, k), the IDs from it (+ twonn_fraction,
    gride_range_max), the decimation curve (data, points, its options, seed) and the label overlaps
    (graph, labels, label_ks). A changed option recomputes only the parts it enters.

    x: the stored (N_all, D) layer; keep: the (N,) rows used; labels: (N,) or None;
    identity: `store_identity(reps, keep)`; local: the graph on this process's devices only (`knn_graph`).
    """
    data = {"store": identity["store"], "layer": layer, "layer_digest": identity["layer_digests"][layer],
            "kept_digest": identity["kept_digest"]}
    k = min(cfg.k_max, len(keep) - 1)

    def rows() -> np.ndarray:
        return np.asarray(x, np.float32)[keep]

    def graph() -> dict[str, np.ndarray]:
        dist, idx = knn_graph(rows(), k, cfg.get("sharded", "auto"), local=local)
        return {"distances": dist, "indices": idx}

    def entry(part: str) -> epath.Path:
        return epath.Path(cache_dir) / f"layer_{layer:03d}_{part}.npz"

    neighbours = cached(entry("graph"), {"result": "knn_graph", **data, "k": k}, graph, collective=not local)
    out = {"indices": neighbours["indices"]}
    out.update(cached(entry("ids"), {"result": "ids", **data, "k": k, **_options(cfg, ID_OPTIONS)},
                      lambda: id_metrics(neighbours["distances"], cfg)))
    if cfg.decimation:
        out.update(cached(entry("decimation"),
                          {"result": "decimation", **data, "seed": seed, **_options(cfg, DECIMATION_OPTIONS)},
                          lambda: decimation_metrics(rows(), cfg, seed)))
    if labels is not None:
        out.update(cached(entry("labels"),
                          {"result": "labels", **data, "k": k, "labels_digest": identity["labels_digest"],
                           **_options(cfg, LABEL_OPTIONS)},
                          lambda: label_metrics(neighbours["indices"], labels, cfg.label_ks)))
    return out


ID_ESTIMATORS = ("twonn", "twonn_decimated", "gride", "gride_plateau")


def decimation_level(sizes: np.ndarray, cfg: ml_collections.ConfigDict) -> int:
    """Index of the decimation level whose subset size is closest (in log) to
    max(N / decimation_target_ratio, decimation_min_subset): the paper's N / 32, but never so few
    points that TwoNN on each subset is mostly noise (N / 32 of 2,000 points would be 62)."""
    target = max(sizes[0] / cfg.decimation_target_ratio, cfg.get("decimation_min_subset", 0))
    return int(np.argmin(np.abs(np.log(np.asarray(sizes, np.float64) / target))))


def scale_plateau(ids: np.ndarray, errs: np.ndarray) -> tuple[float, float]:
    """The ID where a scaling curve (ascending scales) is flattest: the mean of the two consecutive
    scales with the smallest |log ID change|, and the larger of their errors."""
    steps = np.abs(np.diff(np.log(ids)))
    i = int(np.argmin(steps))
    return float(ids[i : i + 2].mean()), float(max(errs[i], errs[i + 1]))


def chosen_id(metrics: dict, cfg: ml_collections.ConfigDict, estimator: str | None = None) -> tuple[float, float]:
    """The (ID, error) of one layer under `estimator` (default `cfg.id_estimator`)."""
    estimator = estimator or cfg.id_estimator
    if estimator == "twonn":
        n = len(metrics["indices"])
        return float(metrics["twonn"]), float(metrics["twonn"]) / np.sqrt(n)
    if estimator == "twonn_decimated":
        if "decimation_ids" not in metrics:
            raise ValueError("id_estimator 'twonn_decimated' needs profile.decimation=True")
        i = decimation_level(metrics["decimation_sizes"], cfg)
        return float(metrics["decimation_ids"][i]), float(metrics["decimation_errs"][i])
    if estimator == "gride":
        ranks = [int(r) for r in metrics["gride_ranks"]]
        rank = gride_rank(cfg, ranks)
        if rank not in ranks:
            raise ValueError(f"profile.gride_rank={rank} is not among the computed ranks {ranks}; set "
                             "profile.gride_rank to one of them (or leave it unset: the largest up to 64)")
        i = ranks.index(rank)
        return float(metrics["gride_ids"][i]), float(metrics["gride_errs"][i])
    if estimator == "gride_plateau":
        return scale_plateau(np.asarray(metrics["gride_ids"]), np.asarray(metrics["gride_errs"]))
    raise ValueError(f"unknown id_estimator {estimator!r}: {', '.join(ID_ESTIMATORS)}")


DEFAULT_GRIDE_RANK = 64  # GRIDE(32, 64): the planted-profile benchmark's choice (README)


def gride_rank(cfg: ml_collections.ConfigDict, computed: Sequence[int]) -> int:
    """n2 of the GRIDE(n2 / 2, n2) ID: `profile.gride_rank` when set, else the largest computed rank up to
    DEFAULT_GRIDE_RANK (so a smaller `k_max` or dataset uses the largest scale it has)."""
    if cfg.get("gride_rank") is not None:
        return int(cfg.gride_rank)
    usable = [int(r) for r in computed if int(r) <= DEFAULT_GRIDE_RANK]
    if not usable:
        raise ValueError(f"no GRIDE rank was computed (ranks {list(computed)}); raise profile.k_max and "
                         "profile.gride_range_max to at least 2")
    return max(usable)


def check_id_estimator(cfg: ml_collections.ConfigDict, n_points: int) -> None:
    """Refuses, before any layer is computed, an ID estimator the profile options cannot provide."""
    if cfg.id_estimator not in ID_ESTIMATORS:
        raise ValueError(f"unknown id_estimator {cfg.id_estimator!r}: {', '.join(ID_ESTIMATORS)}")
    if cfg.id_estimator == "twonn_decimated" and not cfg.decimation:
        raise ValueError("id_estimator 'twonn_decimated' needs profile.decimation=True")
    largest = min(cfg.k_max, cfg.gride_range_max, n_points - 1)
    if cfg.id_estimator == "gride" and cfg.get("gride_rank") is not None and cfg.gride_rank > largest:
        raise ValueError(
            f"profile.gride_rank={cfg.gride_rank} needs neighbours up to that rank, but only rank {largest} is "
            f"computed (k_max={cfg.k_max}, gride_range_max={cfg.gride_range_max}, {n_points} points); lower "
            "profile.gride_rank to a power of two <= that or raise k_max and gride_range_max")


def estimator_agreement(per_layer: list[dict], cfg: ml_collections.ConfigDict) -> dict:
    """Per layer, the IDs of TwoNN (all N), decimated TwoNN (when computed) and GRIDE at `gride_rank`, and
    their relative spread (max - min) / median, so that disagreement between scales is visible."""
    computed = [int(r) for r in per_layer[0]["gride_ranks"]]
    rank = gride_rank(cfg, computed) if computed else None
    gride_computed = rank in computed
    names = ["twonn"] + (["gride"] if gride_computed else []) + (
        ["twonn_decimated"] if "decimation_ids" in per_layer[0] else [])
    ids = {name: [chosen_id(m, cfg, name)[0] for m in per_layer] for name in names}
    table = np.array([ids[name] for name in names])
    spread = (table.max(0) - table.min(0)) / np.median(table, axis=0)
    return {"estimators": names, "gride_rank": rank, "id": ids,
            "relative_spread": spread.tolist(), "max_relative_spread": float(spread.max()),
            "max_spread_layer": int(np.argmax(spread))}


def overlap_uncertainty(per_layer: list[dict], labels: np.ndarray | None, k_overlap: int) -> tuple[dict, dict]:
    """Standard errors over points of the mean overlaps (std / sqrt(N): the limit of a bootstrap over
    points) and the chance levels: a random neighbour shares the label with probability sum_c p_c^2,
    and always guessing the largest class scores max_c p_c."""
    n = per_layer[0]["indices"].shape[0]
    adjacent_err = np.array([
        np.std(np.asarray(idjax.data_overlap(a["indices"], b["indices"], k_overlap, per_point=True))) / np.sqrt(n)
        for a, b in zip(per_layer[:-1], per_layer[1:], strict=True)])
    arrays, summary = {"adjacent_overlap_err": adjacent_err}, {"adjacent_overlap_err": adjacent_err.tolist()}
    if labels is not None:
        ks = [int(k) for k in per_layer[0]["label_ks"]]
        label_err = np.array([[np.std(np.asarray(idjax.label_overlap(m["indices"], labels, k, per_point=True)))
                               / np.sqrt(n) for k in ks] for m in per_layer])
        p = np.bincount(np.asarray(labels)) / len(labels)
        arrays["label_overlap_err"] = label_err
        summary.update(label_overlap_err=label_err.tolist(), chance_label_overlap=float(np.sum(p ** 2)),
                       chance_accuracy=float(p.max()))
    return arrays, summary


def compute_profile(reps: store.Representations, cfg: ml_collections.ConfigDict, cache_dir: epath.PathLike,
                    seed: int = 0) -> tuple[dict, dict]:
    """Per-layer metrics (resumable through `cache_dir`), adjacent-layer overlaps and the selection.

    Returns:
      (summary dict for results.json, arrays dict for profile.npz).
    """
    if len(reps.layers) < 2:
        raise ValueError(f"the representations hold {len(reps.layers)} layer; a layer profile needs at least 2 "
                         "(a one-layer store can be probed: --config.experiment=probe)")
    keep, dup_per_layer = _common_keep(reps.layers, cfg.duplicates)
    check_id_estimator(cfg, len(keep))
    labels = None if reps.labels is None else np.asarray(reps.labels)[keep]
    n_layers = len(reps.layers)
    identity = store_identity(reps, keep)
    start = time.perf_counter()
    mode = process_mode(len(keep), reps.layers[0].shape[1], min(cfg.k_max, len(keep) - 1), cfg)
    mine = [layer for layer in range(n_layers)
            if mode != "layers" or layer % jax.process_count() == jax.process_index()]
    computed = {}
    with tqdm(total=len(mine), desc="profile", unit="layer", dynamic_ncols=True) as bar:
        for layer in mine:
            computed[layer] = layer_metrics(reps.layers[layer], keep, labels, cfg, seed + layer, layer=layer,
                                            identity=identity, cache_dir=cache_dir, local=mode == "layers")
            bar.update(1)
    per_layer = gather_layers(computed, n_layers) if mode == "layers" else [computed[i] for i in range(n_layers)]
    k_overlap = min(cfg.overlap_k, per_layer[0]["indices"].shape[1])
    adjacent = np.array([idjax.data_overlap(per_layer[i]["indices"], per_layer[i + 1]["indices"], k_overlap)
                         for i in range(n_layers - 1)])
    ids, errs = map(np.array, zip(*[chosen_id(m, cfg) for m in per_layer], strict=True))
    extra_arrays, extra_summary = overlap_uncertainty(per_layer, labels, k_overlap)
    choice = select_layer(ids, errs, z=cfg.selection_z, min_drop=cfg.selection_min_drop,
                          min_rise=cfg.selection_min_rise, min_plateau=cfg.selection_min_plateau)

    arrays = {
        "id": ids, "id_err": errs,
        "twonn": np.array([m["twonn"] for m in per_layer]),
        "twonn_mle": np.array([m["twonn_mle"] for m in per_layer]),
        "gride_ids": np.stack([m["gride_ids"] for m in per_layer]),
        "gride_errs": np.stack([m["gride_errs"] for m in per_layer]),
        "gride_ranks": per_layer[0]["gride_ranks"],
        "gride_scales": np.stack([m["gride_scales"] for m in per_layer]),
        "adjacent_overlap": adjacent, "kept_indices": keep,
        "relative_depth": np.arange(n_layers) / (n_layers - 1), **extra_arrays,
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
        "selection_branch": choice.branch, "estimator_agreement": estimator_agreement(per_layer, cfg),
        "selection_rule": choice.rule, "adjacent_overlap_k": k_overlap, "adjacent_overlap": adjacent.tolist(),
        "profile_seconds": time.perf_counter() - start, "process_mode": mode, **extra_summary,
        "representations_identity": identity,
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


def store_identity(reps: store.Representations, keep: np.ndarray) -> dict:
    """What a cached result computed from these representations depends on: the store's fingerprint,
    a content hash of every layer, and which points are kept (and their labels)."""
    labels = None if reps.labels is None else np.asarray(reps.labels)[keep]
    return {"store": reps.manifest.get("fingerprint"),
            "layer_digests": [array_digest(x) for x in reps.layers],
            "kept_digest": array_digest(np.asarray(keep, np.int64)),
            "labels_digest": None if labels is None else array_digest(labels)}


def run_probes(reps: store.Representations, keep: np.ndarray, cfg: ml_collections.ConfigDict,
               overlap_k: int = 30, *, cache_dir: epath.PathLike, identity: dict | None = None) -> dict:
    """Linear-probe and kNN-classifier accuracy per layer (labels required).

    With `cfg.remote_homology` and group labels in the store (SCOPe families), the kNN probe and a
    remote-homology label overlap skip neighbours of the query's own family, on the points whose
    superfamily spans at least two families (the only ones it can be measured on).

    The linear probes and the neighbour probes are cached in `cache_dir`, each under the store's
    identity (`store_identity`), the kept points and exactly the probe options it depends on.
    """
    from experiments import probe

    cache_dir = epath.Path(cache_dir)
    identity = identity or store_identity(reps, keep)
    layers = probe.LayerRows(reps.layers, keep)  # one layer in memory at a time, not all of them
    labels = np.asarray(reps.labels)[keep]
    groups = reps.manifest["metadata"].get("groups")
    groups = None if groups is None or not cfg.remote_homology else np.asarray(groups)[keep]
    out = {}
    if cfg.linear:
        linear = cached(cache_dir / "probes_linear.npz",
                        {"result": "linear_probe", **identity, **_options(cfg, PROBE_LINEAR_OPTIONS)},
                        lambda: {"accuracy": probe.probe_layers(
                            layers, labels, knn_k=None, steps=cfg.steps, seed=cfg.seed,
                            test_fraction=cfg.test_fraction)["linear_probe"]})
        out["linear_probe_accuracy"] = linear["accuracy"].tolist()

    def neighbour_probes() -> dict:
        rows, y, families = layers, labels, groups
        result = {}
        if families is not None:
            subset = probe.remote_homology_subset(y, families)
            if len(subset) < cfg.knn_k + 2:
                raise ValueError(f"only {len(subset)} points have a superfamily spanning two families; "
                                 "remote-homology probing needs more (lower data.min_class_size or add data)")
            rows, y, families = rows.take_rows(subset), y[subset], families[subset]
            result["remote_homology_points"] = len(subset)
        scores = probe.probe_layers(rows, y, groups=families, linear=False, knn_k=cfg.knn_k,
                                    overlap_k=None if families is None else overlap_k)
        result["knn_accuracy"] = scores["knn_accuracy"]
        if families is not None:
            result["remote_homology_label_overlap"] = scores["label_overlap"]
        return result

    key = {"result": "neighbour_probes", **identity, **_options(cfg, PROBE_NEIGHBOUR_OPTIONS),
           "groups_digest": None if groups is None else array_digest(groups),
           "overlap_k": None if groups is None else overlap_k}  # only the remote-homology overlap uses it
    neighbours = cached(cache_dir / "probes_neighbours.npz", key, neighbour_probes)
    if groups is not None:
        out["remote_homology_points"] = int(neighbours["remote_homology_points"])
        out["remote_homology_label_overlap"] = neighbours["remote_homology_label_overlap"].tolist()
    out["knn_accuracy"] = neighbours["knn_accuracy"].tolist()
    out["knn_k"] = cfg.knn_k
    out["remote_homology"] = groups is not None
    key = "linear_probe_accuracy" if cfg.linear else "knn_accuracy"
    out["best_probe_layer"] = int(np.argmax(out[key]))
    out["best_probe_metric"] = key
    return out


def run_probe_only(config: ml_collections.ConfigDict, workdir: epath.PathLike) -> dict:
    """Probes every layer of the stored representations; writes probes.json."""
    workdir = epath.Path(workdir)
    with workdir_lock(workdir, "probe"):
        return _run_probe_only(config, workdir)


def _run_probe_only(config: ml_collections.ConfigDict, workdir: epath.Path) -> dict:
    reps = store.load(store.store_dir(workdir), verify=config.profile.get("verify_store", True))
    if reps.labels is None:
        raise ValueError(f"the representations in {workdir} have no labels to probe")
    keep, _ = _common_keep(reps.layers, config.profile.duplicates)
    probes = run_probes(reps, keep, config.probe, config.profile.overlap_k, cache_dir=workdir / "profile_layers")
    atomic_write_json(workdir / "probes.json", probes, checksum=True)
    print(f"best probe layer ({probes['best_probe_metric']}): {probes['best_probe_layer']}; {workdir / 'probes.json'}")
    return probes


def run(config: ml_collections.ConfigDict, workdir: epath.PathLike) -> dict:
    """Profiles the representations in `workdir` (local or remote) and writes results.json, profile.npz and
    figures.

    Holds the workdir's lock (`experiments.files.workdir_lock`): a second job on the same workdir is refused.
    """
    with workdir_lock(workdir, "profile", process_index=jax.process_index()):
        return _run(config, epath.Path(workdir))


def _run(config: ml_collections.ConfigDict, workdir: epath.Path) -> dict:
    directory = store.store_dir(workdir)
    reps = store.load(directory, verify=config.profile.get("verify_store", True))
    logging.info("profiling %d layers x %d examples (devices: %s)", len(reps.layers), len(reps.ids), jax.devices())
    job_start = time.perf_counter()
    summary, arrays = compute_profile(reps, config.profile, workdir / "profile_layers", seed=config.get("seed", 0))
    probe_start = time.perf_counter()
    writer = distributed.is_writer()  # every process computes its share; process 0 probes and writes
    if writer and reps.labels is not None and config.get("probe") and config.probe.enabled:
        probes = run_probes(reps, arrays["kept_indices"], config.probe, config.profile.overlap_k,
                            cache_dir=workdir / "profile_layers", identity=summary["representations_identity"])
        summary["probes"] = probes
        for key in ("linear_probe_accuracy", "knn_accuracy", "remote_homology_label_overlap"):
            if key in probes:
                arrays[key] = np.asarray(probes[key])
    meta = reps.manifest["metadata"]
    results = {"name": config.get("name", workdir.name), "model": meta.get("model"), "data": meta.get("data"),
               "label_names": meta.get("label_names"), **summary,
               "representations": {"path": files.relative_path(directory, workdir),
                                   "fingerprint": meta.get("config_fingerprint")},
               "config": json.loads(config.to_json_best_effort())}
    results["provenance"] = report.provenance(results["config"])
    results["wall_seconds"] = {"extract": meta.get("extract_seconds"), "profile": probe_start - job_start,
                               "probes": time.perf_counter() - probe_start}
    if not writer:
        return results
    atomic_save_npz(workdir / "profile.npz", **arrays)
    # Figures are redrawn from these results on every run, and results.json (which lists them) is
    # written last: a figure an earlier run drew and this one does not (e.g. label overlap, once the
    # labels are gone) is removed rather than left beside results it does not show.
    previous = _previous_figures(workdir / "results.json")
    figures = [str(f) for f in report.write_figures(workdir, [(results["name"], results, arrays)])]
    for stale in previous - {epath.Path(f).name for f in figures}:
        (workdir / stale).unlink(missing_ok=True)
    results["figures"] = figures
    report.write_report_md(workdir, results, figures)
    atomic_write_json(workdir / "results.json", results, checksum=True)
    print("\n" + report.summary_markdown(results))
    print(f"results: {workdir / 'results.json'}, report: {workdir / 'report.md'}")
    return results


def _previous_figures(results_file: epath.Path) -> set[str]:
    """File names of the figures an earlier results.json in this workdir lists (a workdir may have been
    moved or copied since, so only the names count, taken in this workdir)."""
    try:
        return {epath.Path(f).name for f in json.loads(results_file.read_text()).get("figures", [])}
    except (OSError, ValueError, AttributeError, TypeError):
        return set()
