"""Extraction: dataset -> tokenizer -> model (every layer) -> pooled vectors -> representation store.

`run(config, workdir)` streams batches (length-bucketed, one jit compilation per padded shape) into
`experiments/store.py`'s store; finished batches are skipped on restart and the manifest is written
last. Model families plug in through `Encoder`: a batch plan over example indices and a function from
those indices to float32 (L+1, B, D) pooled hidden states.
"""

from __future__ import annotations

import dataclasses
import pathlib
import time
from collections.abc import Callable, Sequence
from typing import Any

import ml_collections
import numpy as np
from absl import logging
from tqdm.auto import tqdm

from experiments import files, store


@dataclasses.dataclass(frozen=True)
class Examples:
    """The dataset to analyse. inputs: sequences, images (uint8 [N,H,W,C]) or texts; labels: (N,) int
    codes or None; groups: (N,) int codes for remote-homology exclusion (e.g. SCOPe family) or None."""

    ids: tuple[str, ...]
    inputs: Any
    labels: np.ndarray | None
    label_names: tuple[str, ...] | None
    groups: np.ndarray | None
    description: dict

    def __len__(self) -> int:
        return len(self.ids)


@dataclasses.dataclass(frozen=True)
class Encoder:
    """plan: example indices per batch; embed: indices -> float32 (L+1, B, D); description: JSON-able."""

    plan: list[list[int]]
    embed: Callable[[Sequence[int]], np.ndarray]
    description: dict


# ---------------------------------------------------------------------------------------------------
# Datasets


def _select(n: int, labels: np.ndarray | None, cfg: ml_collections.ConfigDict) -> np.ndarray:
    """Indices kept: classes with >= min_class_size members, at most per_class each, at most max_examples."""
    rng = np.random.default_rng(cfg.get("seed", 0))
    keep = np.arange(n)
    if labels is not None and cfg.get("min_class_size"):
        counts = np.bincount(labels)
        keep = keep[counts[labels[keep]] >= cfg.min_class_size]
        if len(keep) == 0:
            raise ValueError(f"no class has data.min_class_size={cfg.min_class_size} members (the largest has "
                             f"{counts.max()}): lower --config.data.min_class_size or use a larger dataset")
    if labels is not None and cfg.get("per_class"):
        chosen = []
        for c in np.unique(labels[keep]):
            members = keep[labels[keep] == c]
            chosen.append(rng.permutation(members)[: cfg.per_class])
        keep = np.sort(np.concatenate(chosen))
    if cfg.get("max_examples") and len(keep) > cfg.max_examples:
        keep = np.sort(rng.choice(keep, cfg.max_examples, replace=False))
    return keep


def _recode(labels: np.ndarray | None, names: Sequence[str] | None):
    """Compact label codes 0..C-1 after subsetting (names follow)."""
    if labels is None:
        return None, None
    present, codes = np.unique(labels, return_inverse=True)
    return codes.astype(np.int64), tuple(names[i] for i in present) if names is not None else None


def _opt(value: Any) -> Any:
    """Config fields use "" / 0 for "not set" (ConfigDict fields keep one type); map them to None."""
    return None if value in ("", 0, None) else value


def load_examples(cfg: ml_collections.ConfigDict) -> Examples:
    """Reads the configured dataset from local files.

    cfg.name: "scope" (SCOPe ASTRAL FASTA; cfg.label = class|fold|superfamily|family), "uniprot"
    (unlabelled FASTA), "digits" | "mnist" | "cifar10" | "imagenet32" (images), "scope_text" (SCOPe
    header descriptions labelled by class, for text models). Selection knobs: min_class_size,
    per_class, max_examples, seed.
    """
    name = cfg.name
    if name in ("scope", "uniprot"):
        from experiments import protein_datasets

        if name == "scope":
            ds = protein_datasets.read_scope_astral(cfg.path)
            level = cfg.get("label", "superfamily")
            labels, names = ds.labels[level], ds.label_names[level]
            groups = ds.labels["family"]
        else:
            ds = protein_datasets.read_uniprot_fasta(cfg.path)
            labels, names, groups = None, None, None
        keep = _select(len(ds), labels, cfg)
        labels, names = _recode(None if labels is None else labels[keep], names)
        return Examples(tuple(ds.ids[i] for i in keep), tuple(ds.sequences[i] for i in keep), labels, names,
                        None if groups is None else groups[keep], {"dataset": name, "path": str(cfg.path),
                                                                   "n": len(keep)})
    if name in ("digits", "mnist", "cifar10", "imagenet32"):
        from experiments import image_datasets

        ds = image_datasets.load_image_dataset(name, _opt(cfg.get("root")), _opt(cfg.get("split")),
                                               size=_opt(cfg.get("size")), rgb=cfg.get("rgb", False))
        keep = _select(len(ds), ds.labels, cfg)
        labels, names = _recode(ds.labels[keep], ds.class_names)
        return Examples(tuple(f"{name}:{i}" for i in keep), ds.images[keep], labels, names, None,
                        {"dataset": name, "root": str(cfg.get("root")), "size": cfg.get("size"), "n": len(keep)})
    if name == "scope_text":
        from experiments import text_datasets

        ds = text_datasets.scope_text_dataset(cfg.path, text=cfg.get("text", "description"))
        keep = _select(len(ds.texts), ds.labels.astype(np.int64), cfg)
        labels, names = _recode(ds.labels[keep].astype(np.int64), ds.label_names)
        return Examples(tuple(ds.ids[i] for i in keep), tuple(ds.texts[i] for i in keep), labels, names, None,
                        {"dataset": name, "path": str(cfg.path), "n": len(keep)})
    raise ValueError(f"unknown dataset {name!r}: scope, uniprot, digits, mnist, cifar10, imagenet32, scope_text")


# ---------------------------------------------------------------------------------------------------
# Encoders


def _chunks(order: Sequence[int], size: int) -> list[list[int]]:
    return [list(map(int, order[i : i + size])) for i in range(0, len(order), size)]


def _pad_rows(array: np.ndarray, rows: int, fill: int) -> np.ndarray:
    """Pads the batch dimension to `rows` so the last, short batch reuses the compiled shape."""
    if array.shape[0] == rows:
        return array
    pad = np.full((rows - array.shape[0],) + array.shape[1:], fill, array.dtype)
    return np.concatenate([array, pad])


def _round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


def esm2_encoder(cfg: ml_collections.ConfigDict, examples: Examples, batch_size: int) -> Encoder:
    """ESM-2 from a HF dir, a fair-esm .pt, an Orbax conversion, a training workdir, or random init."""
    from models import esm2, protein_tokenizer

    source = cfg.source
    if source == "hf":
        config, params = esm2.load_hf(cfg.path)
    elif source == "fair_esm":
        config, params = esm2.load_fair_esm(cfg.path)
    elif source == "orbax":
        config, params = esm2.restore_converted(cfg.path)
    elif source == "trained":
        from experiments import train

        model, params, _ = train.load_trained(cfg.path)
        config = model.config
    elif source == "random":
        config = esm2.get_config(cfg.size)
        params = esm2.init_params(config, seed=cfg.get("seed", 0))
    else:
        raise ValueError(f"unknown ESM-2 source {source!r}: hf, fair_esm, orbax, trained, random")
    if cfg.get("dtype", "float32") != "float32":  # one cast for every source
        params = esm2.cast_params(params, cfg.dtype)
        config = dataclasses.replace(config, dtype=cfg.dtype)
    model = esm2.ESM2(config)
    long_policy = cfg.get("long_policy", "crop")
    tokenized = [protein_tokenizer.tokenize(seq, seq_id=sid, unknown=cfg.get("unknown", "error"),
                                            long_policy=long_policy, max_residues=cfg.get("max_residues", 1022))
                 for sid, seq in zip(examples.ids, examples.inputs, strict=True)]
    lengths = np.array([max(len(p) for p in t.pieces) for t in tokenized])
    order = np.argsort(lengths, kind="stable")  # length bucketing: similar lengths share a batch
    pooling = cfg.get("pooling", "mean")

    def embed(indices: Sequence[int]) -> np.ndarray:
        pieces = [(row, p) for row, i in enumerate(indices) for p in tokenized[i].pieces]
        width = _round_up(max(len(p) for _, p in pieces), 16)
        tokens = np.full((_round_up(len(pieces), 8), width), protein_tokenizer.PAD_ID, np.int32)
        for r, (_, p) in enumerate(pieces):
            tokens[r, : len(p)] = p
        pooled = np.asarray(esm2.pooled_hidden_states(model, params, tokens, pooling=pooling))[:, : len(pieces)]
        # Windows of one long sequence: average weighted by residues per window.
        weights = np.array([len(p) - 2 for _, p in pieces], np.float64)
        owner = np.array([row for row, _ in pieces])
        out = np.zeros((pooled.shape[0], len(indices), pooled.shape[2]), np.float64)
        np.add.at(out, (slice(None), owner), pooled * weights[None, :, None])
        out /= np.bincount(owner, weights=weights)[None, :, None]
        return out.astype(np.float32)

    cropped = sum(t.policy_applied != "none" for t in tokenized)
    return Encoder(_chunks(order, batch_size), embed,
                   {"family": "esm2", "source": source, "path": str(cfg.get("path")), "config": config.to_dict(),
                    "pooling": pooling, "long_policy": long_policy, "n_long_sequences": int(cropped),
                    "dtype": cfg.get("dtype", "float32")})


FIT_PALETTE = "fit"


def palette_source(cfg: ml_collections.ConfigDict) -> tuple[str, pathlib.Path | None]:
    """Where an iGPT's colour palette comes from: (kind, file), decided before any model is loaded.

    `cfg.palette` set to a file (`preprocessor_config.json`, `.npy`) or a directory holding one:
    ("file", it). `cfg.palette == "fit"`: ("fitted", None), k-means on the analysed images. Unset: a HF
    checkpoint (source "hf") uses its own clusters ("checkpoint") and is refused without them, since its
    colour ids mean the colours it was trained on, which a palette fitted here does not reproduce; a
    model trained here uses the palette saved with it ("trained"); a random init gets a fitted one.
    """
    from models import palette

    chosen = _opt(cfg.get("palette"))
    if chosen == FIT_PALETTE:
        return "fitted", None
    if chosen is not None:
        path = pathlib.Path(chosen)
        return "file", (palette.checkpoint_palette(path) or path) if path.is_dir() else path
    if cfg.source == "hf":
        found = palette.checkpoint_palette(cfg.path)
        if found is None:
            raise palette.PaletteError(
                f"the pretrained iGPT checkpoint {cfg.path} has no colour clusters (no {palette.PREPROCESSOR_CONFIG} "
                f"with 'clusters', no {palette.KMEANS_CENTERS}); its colour ids mean the colours it was trained "
                "on, so a palette fitted here would feed it other colours. Set model.palette to the checkpoint's "
                f"clusters file (its {palette.PREPROCESSOR_CONFIG} or OpenAI's {palette.KMEANS_CENTERS}), or "
                f"model.palette={FIT_PALETTE!r} to fit a k-means palette on the analysed images anyway"
            )
        return "checkpoint", found
    if cfg.source == "trained":
        return "trained", pathlib.Path(cfg.path) / "palette.npy"
    return "fitted", None


def load_palette_for(kind: str, path: pathlib.Path | None, images: np.ndarray, n_colors: int, *, seed: int,
                     workdir: pathlib.Path) -> tuple[np.ndarray, dict]:
    """The palette `palette_source` named, loaded (or fitted on `images` and saved as workdir/palette.npy).

    Returns:
      (float32 [K, 3] palette in [-1, 1], the record for the results: {"kind", "path", "n_colors", "digest"}).
    """
    from models import palette

    if kind == "fitted":
        colours = palette.fit_palette(images if images.shape[-1] == 3 else np.repeat(images, 3, -1), n_colors,
                                      seed=seed)
        path = palette.save_palette(workdir / "palette.npy", colours)
    else:
        colours = palette.load_palette(path)
    return colours, {"kind": kind, "path": str(path), "n_colors": len(colours),
                     "digest": palette.palette_digest(colours)}


def igpt_encoder(cfg: ml_collections.ConfigDict, examples: Examples, batch_size: int,
                 workdir: pathlib.Path) -> Encoder:
    """iGPT from a HF dir, a training workdir, or random init; images quantized with the palette
    `palette_source` names."""
    from models import igpt, palette

    source = cfg.source
    palette_kind, palette_path = palette_source(cfg)  # a refusal comes before loading a large model
    if source == "hf":
        config, params = igpt.load_hf(cfg.path)
    elif source == "trained":
        from experiments import train

        model, params, _ = train.load_trained(cfg.path)
        config = model.config
    elif source == "random":
        overrides = dict(cfg.get("overrides") or {}) if not hasattr(cfg.get("overrides"), "to_dict") \
            else cfg.overrides.to_dict()
        config = igpt.igpt_config(cfg.size, **overrides)
        params = igpt.init_params(config, cfg.get("seed", 0))
    else:
        raise ValueError(f"unknown iGPT source {source!r}: hf, trained, random")
    images = examples.inputs
    colours, palette_record = load_palette_for(palette_kind, palette_path, images, config.n_colors,
                                               seed=cfg.get("seed", 0), workdir=workdir)
    if images.shape[-1] == 1:
        images = np.repeat(images, 3, axis=-1)
    pixels = palette.quantize(images, colours)
    if pixels.shape[1] > config.n_positions:
        raise ValueError(f"images give {pixels.shape[1]} pixels but the model has {config.n_positions} positions")
    if len(colours) != config.n_colors:
        raise ValueError(f"palette has {len(colours)} colours but the model expects {config.n_colors}")
    tokens = igpt.add_start_token(pixels, config.start_token)
    model = igpt.IGPT(config)
    stream = cfg.get("stream", "paper")

    def embed(indices: Sequence[int]) -> np.ndarray:
        batch = _pad_rows(tokens[np.asarray(indices)], batch_size, config.start_token)
        return np.asarray(igpt.pooled_representations(model, params, batch, stream=stream))[:, : len(indices)]

    return Encoder(_chunks(np.arange(len(examples)), batch_size), embed,
                   {"family": "igpt", "source": source, "path": str(cfg.get("path")), "stream": stream,
                    "config": dataclasses.asdict(config),
                    "palette": {key: value for key, value in palette_record.items() if key != "path"},
                    "locations": {"palette": palette_record["path"]}})


def bert_encoder(cfg: ml_collections.ConfigDict, examples: Examples, batch_size: int) -> Encoder:
    """BERT-family encoder from a HF dir ("minilm" = the packaged all-MiniLM-L6-v2 checkpoint)."""
    from models import bert, text_tokenizer

    path = bert.minilm_checkpoint_dir() if cfg.source == "minilm" else pathlib.Path(cfg.path)
    config, params = bert.load_hf(path)
    model = bert.Bert(config)
    tok = text_tokenizer.load_tokenizer(path)
    lengths = np.array([len(e.ids) for e in tok.tokenizer.encode_batch(list(examples.inputs))])
    order = np.argsort(lengths, kind="stable")

    def embed(indices: Sequence[int]) -> np.ndarray:
        enc = text_tokenizer.encode_batch(tok, [examples.inputs[i] for i in indices], pad_to_multiple_of=16)
        ids = _pad_rows(enc["input_ids"], _round_up(len(indices), 8), tok.pad_id)
        mask = _pad_rows(enc["attention_mask"], ids.shape[0], 0)
        mask[len(indices) :, 0] = 1  # filler rows attend to one token so no row is empty
        pooled = bert.pooled_hidden_states(model, params, ids, mask, normalize=cfg.get("normalize", False))
        return np.asarray(pooled)[:, : len(indices)]

    return Encoder(_chunks(order, batch_size), embed,
                   {"family": "bert", "source": cfg.source, "path": str(path),
                    "normalize": cfg.get("normalize", False)})


def build_encoder(model_cfg: ml_collections.ConfigDict, examples: Examples, batch_size: int,
                  workdir: pathlib.Path) -> Encoder:
    family = model_cfg.family
    if family == "esm2":
        return esm2_encoder(model_cfg, examples, batch_size)
    if family == "igpt":
        return igpt_encoder(model_cfg, examples, batch_size, workdir)
    if family == "bert":
        return bert_encoder(model_cfg, examples, batch_size)
    raise ValueError(f"unknown model family {family!r}: esm2, igpt, bert")


# ---------------------------------------------------------------------------------------------------
# The job


def run(config: ml_collections.ConfigDict, workdir: pathlib.Path) -> dict:
    """Extracts pooled representations of every layer into `workdir/representations` (resumable).

    Holds the workdir's lock (`experiments.files.workdir_lock`): a second job on the same workdir is refused.
    """
    with files.workdir_lock(workdir, "extract"):
        return _run(config, pathlib.Path(workdir))


def _run(config: ml_collections.ConfigDict, workdir: pathlib.Path) -> dict:
    directory = store.store_dir(workdir)
    # What is extracted, from the config alone (cheap: no model is loaded to decide whether to skip).
    requested = store.fingerprint({key: config[key].to_dict() for key in ("model", "data")})
    if store.is_complete(directory):
        manifest = store.read_manifest(directory)
        if manifest["metadata"].get("config_fingerprint") != requested:
            raise store.StoreError(
                f"{directory} holds representations of a different model or dataset (config fingerprint "
                f"{manifest['metadata'].get('config_fingerprint')} vs {requested}); use another workdir"
            )
        logging.info("representations already complete in %s; skipping extraction", directory)
        return manifest
    if config.data.name == "arrays":  # the user's own per-layer arrays: no model
        from experiments import array_data

        return array_data.extract(config, directory, requested)
    examples = load_examples(config.data)
    if len(examples) < 3:
        raise ValueError(f"the dataset selection left {len(examples)} examples; need at least 3")
    encoder = build_encoder(config.model, examples, config.extract.batch_size, workdir)
    description = {"model": encoder.description, "data": examples.description, "ids_head": list(examples.ids[:5]),
                   "config_fingerprint": requested}
    store.open_plan(directory, encoder.plan, description)
    done = store.finished_batches(directory)
    todo = [b for b in range(len(encoder.plan)) if b not in done]
    n_done = sum(len(encoder.plan[b]) for b in done)
    if done:
        logging.info("resuming extraction: %d of %d batches already stored", len(done), len(encoder.plan))
    start = time.perf_counter()
    with tqdm(total=len(examples), initial=n_done, desc="extract", unit="ex", dynamic_ncols=True) as bar:
        for b in todo:
            indices = encoder.plan[b]
            reps = encoder.embed(indices)
            store.write_batch(directory, b, reps, np.asarray(indices))
            bar.update(len(indices))
    elapsed = time.perf_counter() - start
    store.finalize(directory, len(examples), labels=examples.labels, ids=examples.ids,
                   metadata={**description, "label_names": examples.label_names,
                             "groups": None if examples.groups is None else examples.groups.tolist(),
                             "extract_seconds": elapsed, "batches_computed_this_run": len(todo)})
    manifest = store.read_manifest(directory)
    logging.info("extracted %d examples x %d layers in %.1f s", len(examples), manifest["n_layers"], elapsed)
    return manifest
