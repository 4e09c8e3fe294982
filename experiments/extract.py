"""Extraction: dataset -> tokenizer -> model (every layer) -> pooled vectors -> representation store.

`run(config, workdir)` streams batches (length-bucketed, one jit compilation per padded shape) into
`experiments/store.py`'s store; finished batches are skipped on restart and the manifest is written
last. Every model reaches it the same way: a family of `models/registry.py` (`model.family`) or the
researcher's own (`model.encoder=package.module:callable`) is an object keeping the registry's
`Encoder` protocol (num_layers, prepare_batch, pooled_states), turned here into an `Encoder`: a batch
plan over example indices and a function from those indices to float32 (L+1, B, D) pooled states,
each batch checked (shape, layer count, dtype, finite) before it is stored.
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

from experiments import datasets, files, store
from experiments.datasets import Examples, load_examples
from models import registry


@dataclasses.dataclass(frozen=True)
class Encoder:
    """plan: example indices per batch; embed: indices -> float32 (L+1, B, D); description: JSON-able."""

    plan: list[list[int]]
    embed: Callable[[Sequence[int]], np.ndarray]
    description: dict


# ---------------------------------------------------------------------------------------------------
# Datasets: experiments/datasets.py (the built-in loaders, `data.source`, selection)


# ---------------------------------------------------------------------------------------------------
# Encoders: a model family of models/registry.py, or the researcher's own model (`model.encoder`)


def _chunks(order: Sequence[int], size: int) -> list[list[int]]:
    return [list(map(int, order[i : i + size])) for i in range(0, len(order), size)]


def _batch_inputs(inputs: Any, indices: Sequence[int]) -> Any:
    """The examples at `indices`: an array's rows (images) or a list (sequences, texts)."""
    if isinstance(inputs, np.ndarray):
        return inputs[np.asarray(indices, np.int64)]
    return [inputs[i] for i in indices]


def family_model(model_settings: ml_collections.ConfigDict, examples: Examples, batch_size: int,
                 workdir: pathlib.Path) -> registry.Encoder:
    """The configured family's model (`model.family`, `model.source`, ...) as an `Encoder`."""
    name = model_settings.family
    family = registry.family(name)
    if hasattr(family, "check_settings"):  # refusals that need no model come before loading a large one
        family.check_settings(model_settings)
    overrides = model_settings.get("overrides")
    source, path = model_settings.source, model_settings.get("path")
    if source in ("trained", "untrained"):  # a model trained here: its workdir's checkpoint, or its step 0
        from experiments import train

        model, params, _ = train.load_trained(path, step=model_settings.get("step")) if source == "trained" \
            else train.load_untrained(path)
        config = model.config
        if registry.family_of(config) != name:
            raise ValueError(f"{path} holds a trained {registry.family_of(config)} model, not {name}: set "
                             f"model.family={registry.family_of(config)!r}")
    else:
        config, params = registry.load(name, source, path, size=model_settings.get("size"),
                                       seed=model_settings.get("seed", 0),
                                       overrides=overrides.to_dict() if hasattr(overrides, "to_dict") else overrides)
    return family.make_encoder(config, params, model_settings, examples, workdir=workdir, batch_size=batch_size)


def own_model(spec: str) -> tuple[Any, dict]:
    """The researcher's model: `spec` = "package.module:callable", called without arguments.

    Returns:
      (the encoder it returned, checked against the protocol; its record for the results: the spec, the
      callable's qualified name, num_layers and the `description` the encoder gives, if any).
    """
    factory = registry.resolve_encoder_callable(spec)
    name = f"{getattr(factory, '__module__', '?')}.{getattr(factory, '__qualname__', repr(factory))}"
    try:
        encoder = factory()
    except Exception as err:  # the researcher's code: any error, named with where it came from
        raise registry.EncoderError(f"model.encoder={spec!r}: calling {name}() raised "
                                    f"{type(err).__name__}: {err}") from err
    registry.check_encoder(encoder, f"model.encoder={spec!r} ({name}())")
    return encoder, {"encoder": spec, "callable": name, "num_layers": int(encoder.num_layers),
                     "description": getattr(encoder, "description", None)}


def check_pooled(states: Any, *, batch: int, rows: int, num_layers: int, dim: int | None, where: str) -> np.ndarray:
    """`states` as float32 (L+1, rows, D) or an `EncoderError` naming batch `batch` and what is wrong."""
    if not isinstance(states, np.ndarray):
        try:
            states = np.asarray(states)
        except Exception as err:
            raise registry.EncoderError(f"{where}: pooled_states of batch {batch} returned a "
                                        f"{type(states).__name__} that is not an array ({err})") from err
    if states.ndim != 3 or states.shape[1] != rows:
        raise registry.EncoderError(f"{where}: pooled_states of batch {batch} has shape {states.shape}; expected "
                                    f"(num_layers + 1, {rows}, dim) = ({num_layers + 1}, {rows}, D) for its {rows} "
                                    "examples")
    if states.shape[0] != num_layers + 1:
        raise registry.EncoderError(f"{where}: pooled_states of batch {batch} has {states.shape[0]} layers but "
                                    f"num_layers = {num_layers} promises {num_layers + 1} (the embedding output + "
                                    "one per layer); the layer count must be the same for every batch")
    if dim is not None and states.shape[2] != dim:
        raise registry.EncoderError(f"{where}: pooled_states of batch {batch} has dimension {states.shape[2]}, "
                                    f"earlier batches {dim}; every batch must give the same D")
    if states.dtype != np.float32:
        raise registry.EncoderError(f"{where}: pooled_states of batch {batch} is {states.dtype}, not float32; "
                                    "return states.astype(np.float32)")
    if not np.isfinite(states).all():
        layer, row, column = (int(i[0]) for i in np.nonzero(~np.isfinite(states)))
        raise registry.EncoderError(f"{where}: pooled_states of batch {batch} holds {states[layer, row, column]} "
                                    f"(first at layer {layer}, example {row} of the batch, column {column}); "
                                    "the representations must be finite")
    return states


def encoder_for(model: Any, examples: Examples, batch_size: int, description: dict, where: str) -> Encoder:
    """The extraction `Encoder` of any model keeping the protocol (`registry.Encoder`): batches of similar
    `sort_key` (when the model has one), each checked on the way out (`check_pooled`)."""
    sort_key = getattr(model, "sort_key", None)
    order = np.arange(len(examples)) if sort_key is None else \
        np.argsort(np.array([sort_key(x) for x in examples.inputs]), kind="stable")
    plan = _chunks(order, batch_size)
    num_layers = int(model.num_layers)
    batch_of = {chunk[0]: b for b, chunk in enumerate(plan)}  # for messages: which batch failed
    seen_dim: list[int] = []

    def embed(indices: Sequence[int]) -> np.ndarray:
        batch = batch_of.get(int(indices[0]), -1)
        states = model.pooled_states(model.prepare_batch(_batch_inputs(examples.inputs, indices)))
        states = check_pooled(states, batch=batch, rows=len(indices), num_layers=num_layers,
                              dim=seen_dim[0] if seen_dim else None, where=where)
        seen_dim[:] = [states.shape[2]]
        return states

    return Encoder(plan, embed, description)


def build_encoder(model_settings: ml_collections.ConfigDict, examples: Examples, batch_size: int,
                  workdir: pathlib.Path) -> Encoder:
    """The configured model as an extraction `Encoder`: `model.encoder` (the researcher's own) if set,
    else `model.family`."""
    if model_settings.get("encoder"):
        model, description = own_model(model_settings.encoder)
        return encoder_for(model, examples, batch_size, description, f"model.encoder={model_settings.encoder!r}")
    model = family_model(model_settings, examples, batch_size, workdir)
    return encoder_for(model, examples, batch_size, model.description, f"model.family={model_settings.family!r}")


# ---------------------------------------------------------------------------------------------------
# The job


RESUME_TOLERANCE = 1e-3  # of the stored batch's largest magnitude: another platform's rounding passes


def check_same_model(directory: pathlib.Path, encoder: Encoder, batch: int) -> None:
    """Before a resumed extraction adds batches: the model must still give stored batch `batch`.

    The store's fingerprint sees the config, not the model's code or an unseeded initialisation; a model
    that changed between runs would otherwise mix two networks' outputs in one store without a sign.
    """
    stored = store.read_batch(directory, batch)
    again = encoder.embed(encoder.plan[batch])
    difference = float(np.max(np.abs(again - stored))) if again.shape == stored.shape else float("inf")
    if not difference <= RESUME_TOLERANCE * max(1.0, float(np.max(np.abs(stored)))):
        raise store.StoreError(
            f"the model now gives other outputs for stored batch {batch} of {directory} (largest difference "
            f"{difference:.3g}): it changed since those batches were stored (new weights or code, or an "
            "unseeded random initialisation). Make the model deterministic (seed it), or delete "
            f"{directory} to extract again")


def _reads_arrays(config: ml_collections.ConfigDict) -> bool:
    return config.data.name == "arrays" and not config.data.get("source")


def extraction_fingerprint(config: ml_collections.ConfigDict, examples: Examples | None = None) -> str:
    """What an extraction produces, as a short hash: the model and data configs and the data the loader
    returns (its description and a digest of its ids and labels), so changed data re-extracts; no model
    is loaded. `examples`: the loaded data (loaded here when None)."""
    arrays = _reads_arrays(config)
    if examples is None and not arrays:
        examples = load_examples(config.data)
    return store.fingerprint({**{key: config[key].to_dict() for key in ("model", "data")},
                              **({} if arrays else {"examples": datasets.identity(examples)})})


def run(config: ml_collections.ConfigDict, workdir: pathlib.Path) -> dict:
    """Extracts pooled representations of every layer into the workdir's store (resumable):
    `workdir/representations`, or the shared store `workdir/store.json` names (`store.point_to_store`).

    Holds the workdir's lock (`experiments.files.workdir_lock`): a second job on the same workdir is refused.
    A shared store's directory is locked too, waiting: of several jobs reaching one store, the first
    extracts and the others then find it complete.
    """
    workdir = pathlib.Path(workdir)
    directory = store.store_dir(workdir)
    home = directory.parent.resolve()  # one lock path per store, however an entry's link names it
    with files.workdir_lock(workdir, "extract"):
        if home == workdir.resolve():
            return _run(config, directory)
        if not store.is_complete(directory):
            logging.info("waiting for the shared store %s (another job may be extracting it)", directory)
        with files.workdir_lock(home, "extract", wait=True):
            return _run(config, directory)


def _run(config: ml_collections.ConfigDict, directory: pathlib.Path) -> dict:
    arrays = _reads_arrays(config)
    examples = None if arrays else load_examples(config.data)
    requested = extraction_fingerprint(config, examples)
    if store.is_complete(directory):
        manifest = store.read_manifest(directory)
        if manifest["metadata"].get("config_fingerprint") != requested:
            raise store.StoreError(
                f"{directory} holds representations of a different model or dataset (config fingerprint "
                f"{manifest['metadata'].get('config_fingerprint')} vs {requested}); use another workdir (or delete "
                f"{directory} to extract again)"
            )
        logging.info("representations already complete in %s; skipping extraction", directory)
        return manifest
    if arrays:  # the user's own per-layer arrays: no model
        from experiments import array_data

        return array_data.extract(config, directory, requested)
    # Files that produced the store (a fitted iGPT palette) live beside it, shared with it.
    encoder = build_encoder(config.model, examples, config.extract.batch_size, directory.parent)
    description = {"model": encoder.description, "data": examples.description, "ids_head": list(examples.ids[:5]),
                   "config_fingerprint": requested}
    store.open_plan(directory, encoder.plan, description)
    done = store.finished_batches(directory)
    todo = [b for b in range(len(encoder.plan)) if b not in done]
    n_done = sum(len(encoder.plan[b]) for b in done)
    if done:
        logging.info("resuming extraction: %d of %d batches already stored", len(done), len(encoder.plan))
        if todo:
            check_same_model(directory, encoder, max(done))
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
