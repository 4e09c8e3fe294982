"""Extraction: dataset -> tokenizer -> model (every layer) -> pooled vectors -> representation store.

`run(config, workdir)` streams batches (length-bucketed, one jit compilation per padded shape) into
`experiments/store.py`'s store; finished batches are skipped on restart and the manifest is written
last. Every model reaches it the same way: a family of `models/registry.py` (`model.family`) or the
researcher's own (`model.encoder=package.module:callable`) is an object keeping the registry's
`Encoder` protocol (num_layers, prepare_batch, pooled_states), turned here into an `Encoder`: a batch
plan over example indices and a function from those indices to float32 (L+1, B, D) pooled states,
each batch checked (shape, layer count, dtype, finite) before it is stored.

Devices and processes (`experiments/distributed.py`): a family's model runs on a mesh of all devices of all
processes (`extract.sharding`): its params are placed once, replicated or FSDP-sharded over "model"
(`place_params`), and each batch's model inputs are sharded over "data" (`place_batch`), so every family's
jitted (params, batch) function runs data-parallel without knowing it. Every process takes part in every
batch; batch b is stored by process b % process_count, in its own folder (`store.batch_path`). The
researcher's own model runs per process, without the mesh, on that process's batches only.
`extract.batch_size="auto"` takes the batch size and the FSDP degree from `plan_extraction`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import time
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import jax
import ml_collections
import numpy as np
from absl import logging
from etils import epath
from tqdm.auto import tqdm

from experiments import datasets, distributed, files, store
from experiments.datasets import Examples, load_examples
from models import registry


@dataclasses.dataclass(frozen=True)
class Encoder:
    """plan: example indices per batch; embed: indices -> float32 (L+1, B, D); description: JSON-able."""

    plan: list[list[int]]
    embed: Callable[[Sequence[int]], np.ndarray]
    description: dict
    collective: bool = False  # embed is a computation over every process's devices: all processes call it


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


# ---------------------------------------------------------------------------------------------------
# Memory plan and placement on the mesh


class ExtractionPlan(NamedTuple):
    """batch_per_device: examples per device of the "data" axis; model_parallel: devices each param is split
    over (1: replicated; > 1: FSDP over "model"); the byte counts the plan was made from, per device."""

    batch_per_device: int
    model_parallel: int
    fsdp: bool
    param_bytes_per_device: int
    example_bytes: int
    usable_bytes: int


def example_bytes(seq_len: int, width: int, num_layers: int, dtype_bytes: int, *, num_heads: int | None = None,
                  ffn_dim: int | None = None) -> int:
    """Activation bytes of one example of `seq_len` tokens in a family's pooled extraction (`pooled_hidden_states`).

    dtype_bytes x T x (4 D + 2 F) for the live [T, D] and [T, F] tensors of one block (F = `ffn_dim`, default
    4 D), plus 4 x 3 H T^2 for the float32 attention scores (H = `num_heads`, default D / 64: logits,
    probabilities, and the copy XLA's `dot_product_attention` keeps), plus the float32 pooled (L + 1) x D output
    and the int32 token arrays. Every layer's [T, D] state is pooled as it comes and not kept: XLA's temporary
    memory for ESM-2 is the same at 2 and 16 layers. Checked against XLA's compiled memory analysis of each
    family on CPU (`benchmarks/extraction_bench.py --memory`, `tests/test_extraction_memory.py`): the plan
    (params + batch x this) is an upper bound of XLA's arguments + temporaries + outputs and at most 4x them
    (measured 1.1-2.5x for the published ESM-2, iGPT and MiniLM sizes with heads_major attention; activations
    alone 1.4-2.9x; the xla attention implementation keeps all three score copies and comes closest).
    """
    heads = num_heads or max(1, width // 64)
    ffn = ffn_dim or 4 * width
    return int(dtype_bytes * seq_len * (4 * width + 2 * ffn) + 4 * 3 * heads * seq_len * seq_len
               + 4 * (num_layers + 1) * width + 8 * seq_len)


def plan_extraction(*, device_memory_bytes: int, param_bytes: int, seq_len: int, width: int, num_layers: int,
                    devices: int, dtype_bytes: int = 4, headroom: float = 0.9, max_batch_per_device: int = 256,
                    model_parallel: int = 0, num_heads: int | None = None, ffn_dim: int | None = None
                    ) -> ExtractionPlan:
    """The batch size per device and the param sharding an extraction fits in.

    Per device: usable = headroom * device_memory_bytes must hold the params (param_bytes / m with FSDP over
    m devices; m = 1 is replicated), one layer's params gathered whole for its computation when m > 1
    (param_bytes / num_layers), and batch_per_device * `example_bytes(...)`. The smallest m (a divisor of
    `devices`, 1 first) that leaves room for one example is taken, unless `model_parallel` fixes it (0: choose).

    Raises:
      MemoryError naming what would fit: fewer residues (a shorter seq_len), bfloat16, more devices or
      model_parallel=N.
    """
    for name, value in (("device_memory_bytes", device_memory_bytes), ("param_bytes", param_bytes),
                        ("seq_len", seq_len), ("width", width), ("num_layers", num_layers), ("devices", devices),
                        ("dtype_bytes", dtype_bytes), ("max_batch_per_device", max_batch_per_device)):
        if int(value) < 1:
            raise ValueError(f"plan_extraction: {name}={value} must be a positive integer")
    if not 0 < headroom <= 1:
        raise ValueError(f"plan_extraction: headroom={headroom} must be in (0, 1]")
    usable = int(headroom * device_memory_bytes)
    per_example = example_bytes(seq_len, width, num_layers, dtype_bytes, num_heads=num_heads, ffn_dim=ffn_dim)
    layer = -(-param_bytes // num_layers)
    if model_parallel:
        if devices % model_parallel:
            raise ValueError(f"extract.model_parallel={model_parallel} must divide the {devices} devices")
        choices = [model_parallel]
    else:
        choices = [m for m in range(1, devices + 1) if devices % m == 0]

    def free(m: int) -> int:
        return usable - (param_bytes if m == 1 else -(-param_bytes // m) + layer)

    for m in choices:
        if free(m) >= per_example:
            batch = min(max_batch_per_device, free(m) // per_example)
            return ExtractionPlan(int(batch), m, m > 1, param_bytes if m == 1 else -(-param_bytes // m) + layer,
                                  per_example, usable)
    gib = 2.0**30
    best = max(choices)
    need_devices = next((m for m in range(best + 1, 1 << 16) if usable - param_bytes / m - layer >= per_example), None)
    fixes = [f"shorter sequences (one example of {seq_len} tokens needs {per_example / gib:.2f} GiB of "
             "activations: lower esm2.max_residues or crop)"]
    if dtype_bytes > 2:
        fixes.append("bfloat16 (model.<family>.dtype='bfloat16': half the params and most activations)")
    if need_devices is not None:
        fixes.append(f"more devices: params split over {need_devices} devices "
                     f"(--config.extract.model_parallel={need_devices}) fit")
    raise MemoryError(
        f"the model does not fit: {param_bytes / gib:.2f} GiB of params (split over at most {best} device(s): "
        f"{free(best) / gib:.2f} GiB left of {usable / gib:.2f} GiB usable per device) and "
        f"{per_example / gib:.2f} GiB per example; what would fit: " + "; ".join(fixes))


def device_memory_bytes(settings: ml_collections.ConfigDict) -> int:
    """Memory of one device: `extract.device_memory_bytes` if set, else the device's `memory_stats()`
    bytes_limit, else (CPU) the host's physical memory shared by its local devices."""
    if settings.get("device_memory_bytes"):
        return int(settings.device_memory_bytes)
    stats = None
    try:
        stats = jax.local_devices()[0].memory_stats()
    except Exception:  # platforms without memory statistics
        stats = None
    if stats and stats.get("bytes_limit"):
        return int(stats["bytes_limit"])
    import os

    return int(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // jax.local_device_count())


def _first_attribute(config: Any, names: Sequence[str]) -> int | None:
    return next((int(getattr(config, n)) for n in names if getattr(config, n, None) is not None), None)


def model_dims(config: Any) -> dict:
    """width, num_layers, num_heads and ffn_dim (None where the config has none) of a family's config, as
    `example_bytes` and `plan_extraction` take them."""
    return {"width": _first_attribute(config, ("embed_dim", "n_embd", "hidden_size")),
            "num_layers": _first_attribute(config, ("num_layers", "n_layer")),
            "num_heads": _first_attribute(config, ("num_heads", "n_head")),
            "ffn_dim": _first_attribute(config, ("ffn_dim",))}


def _planner_inputs(config: Any, params: Any, model_settings: ml_collections.ConfigDict,
                    examples: Examples) -> dict:
    """seq_len, the `model_dims`, param and activation dtype bytes of a family model, for `plan_extraction`."""
    own = model_settings.get(model_settings.family) or {}
    dtype = own.get("dtype", getattr(config, "dtype", "float32")) if hasattr(own, "get") else "float32"
    dtype_bytes = 2 if str(dtype) in ("bfloat16", "float16") else 4
    dims = model_dims(config)
    if isinstance(examples.inputs, np.ndarray):  # images: one token per pixel and a start token
        seq_len = int(np.prod(examples.inputs.shape[1:3])) + 1
    else:  # sequences, texts: characters + 2 specials bound the tokens
        seq_len = max(len(x) for x in examples.inputs) + 2
        if hasattr(own, "get") and own.get("max_residues"):
            seq_len = min(seq_len, int(own.max_residues) + 2)
        positions = _first_attribute(config, ("n_positions", "max_position_embeddings"))
        seq_len = min(seq_len, positions) if positions else seq_len
        seq_len = -(-seq_len // 16) * 16  # the encoders pad token arrays to a multiple of 16 positions
    if dims["width"] is None or dims["num_layers"] is None:
        raise ValueError(f"extract.batch_size='auto' cannot read the width and layer count of {type(config).__name__}"
                         "; set extract.batch_size to an integer")
    param_bytes = sum(int(np.size(leaf)) * (dtype_bytes if np.issubdtype(np.asarray(leaf).dtype, np.floating)
                                            else np.asarray(leaf).dtype.itemsize)
                      for leaf in jax.tree_util.tree_leaves(params))
    return {"seq_len": seq_len, **dims, "dtype_bytes": dtype_bytes, "param_bytes": param_bytes}


def use_mesh(settings: ml_collections.ConfigDict) -> bool:
    """Whether families run on the device mesh: `extract.sharding` always, or auto with more than one device."""
    mode = settings.get("sharding", "auto")
    return mode == "always" or (mode == "auto" and jax.device_count() > 1)


def place_params(params: Any, mesh: jax.sharding.Mesh, fsdp: bool) -> Any:
    """`params` as global arrays on `mesh` (replicated, or FSDP over "model"); every process holds the same values."""
    shardings = distributed.param_shardings(params, mesh, fsdp)

    def put(leaf: Any, sharding: jax.sharding.NamedSharding) -> jax.Array:
        return jax.make_array_from_callback(np.shape(leaf), sharding, lambda index: np.asarray(leaf[index]))

    return jax.tree_util.tree_map(put, params, shardings)


def place_batch(inputs: Any, mesh: jax.sharding.Mesh) -> Any:
    """A family's model input with every array of rank >= 2 (the [B, T] token arrays) as a global array with
    its rows over "data" (rows padded to a multiple of the "data" size by repeating the last row: the families
    keep only their first `rows` outputs); lower-rank entries (row owners, counts) stay on the host."""
    parts = mesh.shape[distributed.DATA_AXIS]

    def put(leaf: Any) -> Any:
        if not isinstance(leaf, np.ndarray) or leaf.ndim < 2:
            return leaf
        extra = -len(leaf) % parts
        if extra:
            leaf = np.concatenate([leaf, np.repeat(leaf[-1:], extra, axis=0)])
        sharding = distributed.batch_sharding(mesh, leaf.ndim)
        return jax.make_array_from_callback(leaf.shape, sharding, lambda index: leaf[index])

    return jax.tree_util.tree_map(put, inputs)


def _load_family(model_settings: ml_collections.ConfigDict) -> tuple[Any, Any, Any]:
    """The configured family's (module, config, params) (`model.family`, `model.source`, ...)."""
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
    return family, config, params


def family_model(model_settings: ml_collections.ConfigDict, examples: Examples, batch_size: int | str,
                 workdir: epath.PathLike, extract_settings: ml_collections.ConfigDict | None = None,
                 ) -> tuple[registry.Encoder, int, jax.sharding.Mesh | None]:
    """The configured family's model as a registry `Encoder`, with its global batch size and its mesh.

    With the mesh (`use_mesh(extract_settings)`), params are placed on it once here (replicated, or FSDP over
    "model" when `extract.model_parallel` > 1 or the memory plan says they do not fit one device).
    `batch_size="auto"`: `plan_extraction`'s batch per device times the "data" axis size.
    """
    family, config, params = _load_family(model_settings)
    settings = extract_settings if extract_settings is not None else ml_collections.ConfigDict()
    mesh = None
    model_parallel = int(settings.get("model_parallel", 0) or 0)
    if batch_size == "auto":
        devices = jax.device_count() if use_mesh(settings) else 1
        plan = plan_extraction(device_memory_bytes=device_memory_bytes(settings), devices=devices,
                               model_parallel=model_parallel, headroom=settings.get("memory_headroom", 0.9),
                               **_planner_inputs(config, params, model_settings, examples))
        model_parallel = plan.model_parallel
        batch_size = plan.batch_per_device * (devices // model_parallel)
        logging.info("extraction memory plan: %s; global batch %d", plan, batch_size)
    if use_mesh(settings):
        mesh = distributed.make_mesh(max(1, model_parallel))
        params = place_params(params, mesh, fsdp=max(1, model_parallel) > 1)
    encoder = family.make_encoder(config, params, model_settings, examples, workdir=workdir, batch_size=batch_size)
    return encoder, int(batch_size), mesh


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


def encoder_for(model: Any, examples: Examples, batch_size: int, description: dict, where: str,
                mesh: jax.sharding.Mesh | None = None) -> Encoder:
    """The extraction `Encoder` of any model keeping the protocol (`registry.Encoder`): batches of similar
    `sort_key` (when the model has one), each checked on the way out (`check_pooled`). With `mesh`, the
    model's inputs are placed on it (`place_batch`) and embedding is collective over the processes."""
    sort_key = getattr(model, "sort_key", None)
    order = np.arange(len(examples)) if sort_key is None else \
        np.argsort(np.array([sort_key(x) for x in examples.inputs]), kind="stable")
    plan = _chunks(order, batch_size)
    num_layers = int(model.num_layers)
    batch_of = {chunk[0]: b for b, chunk in enumerate(plan)}  # for messages: which batch failed
    seen_dim: list[int] = []

    def embed(indices: Sequence[int]) -> np.ndarray:
        batch = batch_of.get(int(indices[0]), -1)
        inputs = model.prepare_batch(_batch_inputs(examples.inputs, indices))
        states = model.pooled_states(inputs if mesh is None else place_batch(inputs, mesh))
        states = check_pooled(states, batch=batch, rows=len(indices), num_layers=num_layers,
                              dim=seen_dim[0] if seen_dim else None, where=where)
        seen_dim[:] = [states.shape[2]]
        return states

    return Encoder(plan, embed, description, collective=mesh is not None and jax.process_count() > 1)


def build_encoder(model_settings: ml_collections.ConfigDict, examples: Examples, batch_size: int | str,
                  workdir: epath.PathLike, extract_settings: ml_collections.ConfigDict | None = None) -> Encoder:
    """The configured model as an extraction `Encoder`: `model.encoder` (the researcher's own, per process,
    no mesh) if set, else `model.family` (on the mesh when `extract_settings` ask for it: `use_mesh`)."""
    if model_settings.get("encoder"):
        if batch_size == "auto":
            raise ValueError("extract.batch_size='auto' plans the memory of a built-in family; the researcher's own "
                             "model (model.encoder) needs an integer extract.batch_size")
        model, description = own_model(model_settings.encoder)
        return encoder_for(model, examples, batch_size, description, f"model.encoder={model_settings.encoder!r}")
    model, batch_size, mesh = family_model(model_settings, examples, batch_size, workdir, extract_settings)
    return encoder_for(model, examples, batch_size, model.description, f"model.family={model_settings.family!r}",
                       mesh=mesh)


# ---------------------------------------------------------------------------------------------------
# The job


RESUME_TOLERANCE = 1e-3  # of the stored batch's largest magnitude: another platform's rounding passes


def check_same_model(directory: epath.PathLike, encoder: Encoder, batch: int) -> None:
    """Before a resumed extraction adds batches: the model must still give stored batch `batch`.

    The store's fingerprint sees the config, not the model's code or an unseeded initialisation; a model
    that changed between runs would otherwise mix two networks' outputs in one store without a sign.
    A collective encoder: every process calls this with the same `batch`.
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


def run(config: ml_collections.ConfigDict, workdir: epath.PathLike) -> dict:
    """Extracts pooled representations of every layer into the workdir's store (resumable):
    `workdir/representations`, or the shared store `workdir/store.json` names (`store.point_to_store`).

    Holds the workdir's lock (`experiments.files.workdir_lock`; one per process of a multi-process job): a
    second job on the same workdir is refused. A shared store's directory is locked too, waiting: of several
    jobs reaching one store, the first extracts and the others then find it complete.

    Files: each process writes only its own batch files (`store.batch_path`); process 0 writes the shared
    plan.json, the layer files, labels.npy, ids.json and manifest.json (`store.open_plan`, `store.finalize`),
    after barriers that order them with the other processes' batch files.

    The workdir may be local or remote (gs://...: `experiments.store` says what differs there).
    """
    workdir = epath.Path(workdir)
    directory = store.store_dir(workdir)
    home = files.canonical_path(directory.parent)  # one lock path per store, however an entry's link names it
    process = jax.process_index()
    with files.workdir_lock(workdir, "extract", process_index=process):
        if home == files.canonical_path(workdir):
            return _run(config, directory)
        with contextlib.ExitStack() as held:
            try:
                held.enter_context(files.workdir_lock(home, "extract", process_index=process))
            except files.WorkdirBusyError:  # only a job that really waits says so
                logging.info("waiting for the shared store %s: another job is extracting it", directory)
                held.enter_context(files.workdir_lock(home, "extract", wait=True, process_index=process))
            return _run(config, directory)


def _run(config: ml_collections.ConfigDict, directory: epath.Path) -> dict:
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
    encoder = build_encoder(config.model, examples, config.extract.batch_size, directory.parent, config.extract)
    description = {"model": encoder.description, "data": examples.description, "ids_head": list(examples.ids[:5]),
                   "config_fingerprint": requested}
    store.open_plan(directory, encoder.plan, description)
    me, processes = jax.process_index(), jax.process_count()
    done = store.finished_batches(directory)
    distributed.barrier("extract: batches listed")  # nobody writes a batch before every process has listed them
    todo = [b for b in range(len(encoder.plan)) if b not in done]
    mine = [b for b in todo if store.batch_owner(b, processes) == me]
    if done and todo:
        logging.info("resuming extraction: %d of %d batches already stored", len(done), len(encoder.plan))
        # The last stored batch of the job (collective embedding) or of this process (per-process model).
        own_done = [b for b in done if store.batch_owner(b, processes) == me]
        if encoder.collective or own_done:
            check_same_model(directory, encoder, max(done if encoder.collective else own_done))
    start = time.perf_counter()
    with tqdm(total=len(examples), initial=len(examples) - sum(len(encoder.plan[b]) for b in todo), desc="extract",
              unit="ex", dynamic_ncols=True, disable=not distributed.is_writer()) as bar:
        for b in todo if encoder.collective else mine:  # a collective batch needs every process
            indices = encoder.plan[b]
            reps = encoder.embed(indices)
            if b in mine:
                store.write_batch(directory, b, reps, np.asarray(indices), process=me, process_count=processes)
            bar.update(len(indices) * (processes if not encoder.collective else 1))
    elapsed = time.perf_counter() - start
    distributed.barrier("extract: batches stored")
    store.finalize(directory, len(examples), labels=examples.labels, ids=examples.ids,
                   metadata={**description, "label_names": examples.label_names,
                             "groups": None if examples.groups is None else examples.groups.tolist(),
                             "extract_seconds": elapsed, "batches_computed_this_run": len(todo)})
    distributed.barrier("extract: manifest written")
    manifest = store.read_manifest(directory)
    logging.info("extracted %d examples x %d layers in %.1f s", len(examples), manifest["n_layers"], elapsed)
    return manifest
