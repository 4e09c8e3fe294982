"""What each layer of a model trained here knows, against the same network untrained and a feature baseline.

    launch.py --config=configs/probe_study.py:TRAINING_WORKDIR --workdir=OUT

Three representation stores, each extracted by `experiments.extract.run` (resumable, fingerprinted):
  OUT/trained/    the trained model (model.source "trained").
  OUT/untrained/  the same architecture at the initialisation its training started from (model.source
                  "random" with the trained model's config as overrides and the training seed).
  OUT/features/   one layer of input features through the per-layer `arrays` path: amino-acid
                  composition (ESM-2) or the palette-quantised grey pixels the model sees (iGPT).
The probes are then computed from the stores with `experiments.probe.probe_layers`:
  ESM-2, SCOPe (`data.path`): "class" (the classes `study.classes`): linear and kNN probes on a seeded
    stratified split (`probe.test_fraction`), label overlap; "superfamily_remote" (superfamilies with
    >= 2 families and >= `study.min_superfamily_members` domains): leave-one-out kNN accuracy and
    superfamily overlap with same-family neighbours excluded, and with all neighbours.
  iGPT, its training data (the `experiments.probe_study:training_images` data source): both probes fitted
    on the training split and scored on the held-out split; label overlap on the held-out split.
k = `probe.knn_k` for every kNN and overlap. Writes OUT/probe_study.json (checksummed) and
OUT/probe_layers.png + .pdf.
"""

from __future__ import annotations

import copy
import hashlib
import json
import time
from collections.abc import Sequence

import ml_collections
import numpy as np
from absl import logging
from etils import epath

from experiments import datasets, extract, files, probe, store

STORES = ("trained", "untrained", "features")
# Any size key of each family: every field of the trained model's config is given as an override.


def data_kind(config: ml_collections.ConfigDict) -> str:
    """What the studied model was trained on ("proteins" | "images", the family's TRAINING_DATA): it decides
    the tasks (SCOPe classes and remote homology | held-out images) and the feature baseline."""
    from models import registry

    return registry.trainable_family(config.model.family).TRAINING_DATA


def training_images(cfg: ml_collections.ConfigDict) -> datasets.Examples:
    """Data source: the images a model trained here learned from (`data.path` = its training workdir), the
    training split first, then the held-out split (ids "train:i", "val:i"), RGB as training reads them."""
    from experiments import train, train_data

    data = train.load_config(cfg.path).data
    train_split, held_out = train_data.load_image_splits(data)
    return datasets.Examples(
        np.concatenate([train_split.images, held_out.images]),
        np.concatenate([train_split.labels, held_out.labels]),
        [f"train:{i}" for i in range(len(train_split))] + [f"val:{i}" for i in range(len(held_out))],
        train_split.class_names,
        description={"images": data.name, "n_train": len(train_split), "n_held_out": len(held_out)})


def aa_composition(sequences: Sequence[str]) -> np.ndarray:
    """Amino-acid composition: float32 [N, 20], fractions of the 20 standard residues."""
    letters = "ACDEFGHIKLMNPQRSTVWY"
    table = np.full(256, -1, np.int64)
    table[np.frombuffer(letters.encode(), np.uint8)] = np.arange(20)
    out = np.zeros((len(sequences), 20), np.float32)
    for i, s in enumerate(sequences):
        codes = table[np.frombuffer(s.upper().encode(), np.uint8)]
        codes = codes[codes >= 0]
        out[i] = np.bincount(codes, minlength=20) / max(len(codes), 1)
    return out


def quantised_pixels(images: np.ndarray, colours: np.ndarray) -> np.ndarray:
    """The grey level of every pixel after quantisation to the model's palette: float32 [N, H * W]."""
    from models import palette

    rgb = images if images.shape[-1] == 3 else np.repeat(images, 3, axis=-1)
    tokens = palette.quantize(rgb, colours)
    return palette.dequantize(tokens, colours, shape=tuple(rgb.shape[1:3]))[..., 0].reshape(len(rgb), -1) \
        .astype(np.float32)


# ---------------------------------------------------------------------------------------------------
# The stores


def trained_model(config: ml_collections.ConfigDict) -> tuple[epath.Path, ml_collections.ConfigDict, dict]:
    """(training workdir, its run config, its model config fields), checked against `config.model`."""
    from experiments import train

    path = epath.Path(config.model.path)
    if not (path / "config.json").is_file() or not (path / "model_config.json").is_file():
        raise FileNotFoundError(f"config.model.path={path} is not a training workdir (no config.json and "
                                "model_config.json); pass the --workdir of a configs/train_*.py run")
    run_config = train.load_config(path)
    saved = json.loads((path / "model_config.json").read_text())
    if saved["family"] != config.model.family:
        raise ValueError(f"config.model.family={config.model.family!r} but {path} holds an {saved['family']} model; "
                         f"set --config.model.family={saved['family']}")
    return path, run_config, saved["config"]


def store_configs(config: ml_collections.ConfigDict) -> dict[str, ml_collections.ConfigDict]:
    """The extraction configs of the trained and the untrained store (the features store: `features_config`)."""
    path, run_config, _ = trained_model(config)
    trained = copy.deepcopy(config)
    with trained.unlocked():
        trained.experiment = "extract"
        trained.model.source = "trained"
        trained.model.path = str(path)
        if data_kind(config) == "proteins":
            # As the study always read SCOPe: unknown letters as X, crops of the length the model trained on.
            trained.model.esm2.update(unknown="X", long_policy="crop", max_residues=int(run_config.data.max_residues))
            if config.data.name != "scope" or config.data.get("source"):
                raise ValueError("the ESM-2 probe study reads SCOPe: set --config.data.name=scope and data.path to "
                                 "the ASTRAL FASTA (no data.source)")
            trained.data.label = "superfamily"
        else:
            trained.data.source = f"{__name__}:training_images"
            trained.data.path = str(path)
        for knob in ("min_class_size", "per_class", "max_examples"):
            trained.data[knob] = None  # the study picks its own subsets from every example
    untrained = copy.deepcopy(trained)
    with untrained.unlocked():
        untrained.model.source = "untrained"
    return {"trained": trained, "untrained": untrained}


def features_config(config: ml_collections.ConfigDict, trained: ml_collections.ConfigDict,
                    workdir: epath.PathLike) -> ml_collections.ConfigDict:
    """Writes the feature baseline of the trained store's examples as a one-layer array directory (named by
    its content, so other features never meet an old store) and returns the config that stores it."""
    examples = datasets.load_examples(trained.data)
    if data_kind(config) == "proteins":
        features = aa_composition(examples.inputs)
    else:
        from models import palette

        features = quantised_pixels(examples.inputs, palette.load_palette(epath.Path(config.model.path) /
                                                                           "palette.npy"))
    digest = hashlib.sha256(np.ascontiguousarray(features).tobytes()).hexdigest()[:12]
    directory = epath.Path(workdir) / "features" / f"input_{digest}"
    if not (directory / "layer_0.npy").is_file():
        files.atomic_save_npy(directory / "labels.npy", examples.labels)
        files.atomic_save_npy(directory / "layer_0.npy", features)  # written last: its presence means complete
    out = copy.deepcopy(trained)
    with out.unlocked():
        out.data.update(name="arrays", source=None, path=str(directory))
    return out


def _load(workdir: epath.Path, verify: bool) -> store.Representations:
    return store.load(store.store_dir(workdir), verify=verify)


# ---------------------------------------------------------------------------------------------------
# The probes


def esm2_scores(reps: store.Representations, tasks: dict, config: ml_collections.ConfigDict) -> dict:
    """The ESM-2 study's probes of one store (rows as in the trained store; `tasks` from `esm2_tasks`)."""
    k, pc = config.probe.knn_k, config.probe
    cls_rows, cls_labels, split = tasks["class_rows"], tasks["class_labels"], tasks["class_split"]
    cls = probe.probe_layers(probe.LayerRows(reps.layers, cls_rows), cls_labels, split=split, knn_k=k, overlap_k=k,
                             steps=pc.steps, seed=pc.seed)
    rh_rows = tasks["remote_rows"]
    layers = probe.LayerRows(reps.layers, rh_rows)
    superfamily, family = tasks["labels"][rh_rows], tasks["groups"][rh_rows]
    excluded = probe.probe_layers(layers, superfamily, groups=family, linear=False, knn_k=k, overlap_k=k)
    every = probe.probe_layers(layers, superfamily, linear=False, knn_k=k, overlap_k=k)
    return {"class": {name: values.tolist() for name, values in cls.items()},
            "superfamily_remote": {"knn_accuracy_family_excluded": excluded["knn_accuracy"].tolist(),
                                   "overlap_family_excluded": excluded["label_overlap"].tolist(),
                                   "knn_accuracy_all_neighbours": every["knn_accuracy"].tolist(),
                                   "overlap_all_neighbours": every["label_overlap"].tolist()}}


def esm2_tasks(trained: store.Representations, config: ml_collections.ConfigDict) -> tuple[dict, dict]:
    """Rows, labels and split of the class task and rows of the remote-homology task; and their sizes."""
    names = trained.manifest["metadata"]["label_names"]
    labels = np.asarray(trained.labels)
    groups = np.asarray(trained.manifest["metadata"]["groups"])
    letters = np.array([names[c].split(".")[0] for c in labels])
    classes = list(config.study.classes)
    missing = sorted(set(classes) - set(letters.tolist()))
    if missing:
        raise ValueError(f"config.study.classes={config.study.classes!r}: no domain of class {missing} in the data")
    class_rows = np.flatnonzero(np.isin(letters, classes))
    class_labels = np.unique(letters[class_rows], return_inverse=True)[1].ravel()
    split = probe.split_indices(class_labels, test_fraction=config.probe.test_fraction, seed=config.probe.seed)
    remote_rows = probe.remote_homology_subset(labels, groups, min_groups=2,
                                               min_members=config.study.min_superfamily_members)
    if len(remote_rows) <= config.probe.knn_k:
        raise ValueError(f"only {len(remote_rows)} domains are in superfamilies with >= 2 families and >= "
                         f"{config.study.min_superfamily_members} domains; lower config.study.min_superfamily_members")
    sizes = {"classes": config.study.classes, "n_class_domains": len(class_rows),
             "class_counts": np.bincount(class_labels).tolist(), "n_remote_domains": len(remote_rows),
             "n_superfamilies": int(np.unique(labels[remote_rows]).size),
             "n_families": int(np.unique(groups[remote_rows]).size)}
    return {"class_rows": class_rows, "class_labels": class_labels, "class_split": split,
            "remote_rows": remote_rows, "labels": labels, "groups": groups}, sizes


def igpt_scores(reps: store.Representations, labels: np.ndarray, split: tuple[np.ndarray, np.ndarray],
                config: ml_collections.ConfigDict) -> dict:
    """The iGPT study's probes of one store: fitted on the training split, scored on the held-out split."""
    k, pc = config.probe.knn_k, config.probe
    scores = probe.probe_layers(reps.layers, labels, split=split, knn_k=k, steps=pc.steps, seed=pc.seed)
    held_out = split[1]
    scores.update(probe.probe_layers(probe.LayerRows(reps.layers, held_out), labels[held_out], linear=False,
                                     knn_k=None, overlap_k=k))
    return {name: values.tolist() for name, values in scores.items()}


# ---------------------------------------------------------------------------------------------------
# The job


def run(config: ml_collections.ConfigDict, workdir: epath.PathLike) -> dict:
    """Extracts the three stores under `workdir` (each resumable), probes them, writes probe_study.json and
    the figure. Holds the workdir's lock."""
    workdir = epath.Path(workdir)
    with files.workdir_lock(workdir, "probe_study"):
        return _run(config, workdir)


def _run(config: ml_collections.ConfigDict, workdir: epath.Path) -> dict:
    start = time.perf_counter()
    configs = store_configs(config)
    if not config.study.untrained:
        del configs["untrained"]
    configs["features"] = features_config(config, configs["trained"], workdir)
    extract_start = time.perf_counter()
    for name, store_config in configs.items():
        logging.info("probe study: extracting the %s store", name)
        extract.run(store_config, workdir / name)
    extract_seconds = time.perf_counter() - extract_start
    reps = {name: _load(workdir / name, config.profile.verify_store) for name in configs}
    ids = reps["trained"].ids
    for name, other in reps.items():
        if name != "features" and list(other.ids) != list(ids):
            raise store.StoreError(f"{workdir / name} holds other examples than {workdir / 'trained'}; delete "
                                   f"{workdir / name} and re-run")
        if len(other.layers[0]) != len(ids):
            raise store.StoreError(f"{workdir / name} holds {len(other.layers[0])} rows, the trained store "
                                   f"{len(ids)}; delete {workdir / name} and re-run")
    baseline = "aa_composition" if data_kind(config) == "proteins" else "pixels"
    names = {"trained": "trained", "untrained": "untrained", "features": baseline}
    result = {"name": config.name, "workdir": str(config.model.path), "family": config.model.family,
              "k": config.probe.knn_k, "probe_steps": config.probe.steps,
              "data": reps["trained"].manifest["metadata"]["data"],
              "stores": {name: reps[name].manifest["fingerprint"] for name in reps}}
    if data_kind(config) == "proteins":
        tasks, sizes = esm2_tasks(reps["trained"], config)
        result.update(sizes, max_residues=int(configs["trained"].model.esm2.max_residues))
        for name, r in reps.items():
            result[names[name]] = esm2_scores(r, tasks, config)
    else:
        labels = np.asarray(reps["trained"].labels)
        n_train = reps["trained"].manifest["metadata"]["data"]["n_train"]
        split = (np.arange(n_train), np.arange(n_train, len(labels)))
        result.update(n_train=int(n_train), n_test=int(len(labels) - n_train), stream=config.model.igpt.stream)
        for name, r in reps.items():
            result[names[name]] = igpt_scores(r, labels, split, config)
    result["extract_seconds"] = extract_seconds
    result["wall_seconds"] = time.perf_counter() - start
    figure = plot_probes(result, workdir / "probe_layers.png")
    result["figures"] = [str(figure), str(figure.with_suffix(".pdf"))]
    files.atomic_write_json(workdir / "probe_study.json", result, checksum=True)
    print(json.dumps({key: result[key] for key in ("trained", "wall_seconds")}, indent=1))
    print(f"results: {workdir / 'probe_study.json'}; figure: {figure}")
    return result


def study_curves(result: dict) -> dict[str, list[float]]:
    """The figure's named per-layer curves (a one-layer baseline is one value)."""
    t = result["trained"]
    if "superfamily_remote" in t:  # the protein study's tasks
        remote = t["superfamily_remote"]
        curves = {"class: linear probe": t["class"]["linear_probe"], "class: kNN": t["class"]["knn_accuracy"],
                  "superfamily kNN, family excluded": remote["knn_accuracy_family_excluded"],
                  "superfamily kNN, all neighbours": remote["knn_accuracy_all_neighbours"],
                  "class: linear probe, untrained": result.get("untrained", {}).get("class", {}).get("linear_probe"),
                  "class: linear probe, AA composition": result["aa_composition"]["class"]["linear_probe"]}
    else:
        curves = {"linear probe": t["linear_probe"], "kNN": t["knn_accuracy"],
                  "linear probe, untrained": result.get("untrained", {}).get("linear_probe"),
                  "linear probe, pixels": result["pixels"]["linear_probe"]}
    return {name: values for name, values in curves.items() if values}


def plot_probes(result: dict, path: epath.Path) -> epath.Path:
    """The per-layer probe curves as PNG (`path`) and PDF beside it, each written atomically."""
    from experiments import report

    plt = report.plt
    fig, ax = plt.subplots(figsize=(report.WIDTH * 1.5, report.HEIGHT * 1.3))
    curves = study_curves(result)
    ax.set_xticks(range(max(len(ys) for ys in curves.values())))  # whole layers only
    for name, ys in curves.items():
        if len(ys) == 1:  # a baseline with one "layer": a horizontal line
            ax.axhline(ys[0], ls="--", lw=1, color="gray", label=name)
        else:
            ax.plot(range(len(ys)), ys, "o-", ms=3, label=name)
    report._style(ax, "layer (0 = embeddings)", "accuracy")
    ax.set_title(f"{epath.Path(result['workdir']).name}: per-layer probes (k={result['k']})")
    ax.legend(fontsize=6)
    fig.tight_layout()
    for suffix in (".png", ".pdf"):
        files.atomic_save_figure(fig, path.with_suffix(suffix))
    plt.close(fig)
    return path
