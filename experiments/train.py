"""Pre-training of small models of any family with a training objective (`models/registry.py`):
ESM-2 (masked LM on proteins) and iGPT (autoregressive pixels).

`run(config, workdir)` trains `config.model.family` with optax AdamW (linear warmup + cosine decay,
global-norm clipping) and checkpoints with an Orbax `CheckpointManager`. The family supplies the
model config (`training_config`), the per-token loss (`token_losses`) and the kind of training data
(`TRAINING_DATA`, loaded by `experiments/train_data.py`); nothing here depends on which family it is.

Exact resumption. Everything that determines the next step is either in the checkpoint or a pure
function of it:
  - params, optimizer state (incl. the schedule's step count) and the step: the "state" item;
  - the RNG: a raw uint32 key in the state, split once per step inside the jitted step, so the
    masking of step s is the same whether or not the run was interrupted before it;
  - the data position: batches come from `BatchIterator`, whose position is (epoch, index) with a
    seeded permutation per epoch and a seeded crop per batch; that position is the "data" item
    (JSON) and is checked against the step on restore.
A run killed after the checkpoint at step s and restarted continues from s and reaches bit-identical
parameters (tests/test_train.py; sharded: tests/test_distributed_train.py). Metrics and eval records are
tied to checkpoints: on resume from s every record after s is dropped (and a run killed before its first
checkpoint starts its log afresh), as is a half-written last line, so `metrics.jsonl` and
`train_result.json` read as one uninterrupted run.

Damaged checkpoints: each checkpoint's "data" item records a SHA-256 of the state it was saved with.
A latest checkpoint that cannot be read or does not match it is named in a warning, moved to
`checkpoints_damaged/<step>`, and the run resumes from the newest good one. Only one process trains in
a workdir at a time (`experiments.files.workdir_lock`); a second one exits naming the first.

Devices and processes. The step is jit-compiled over `distributed.make_mesh(config.train.model_parallel)`:
the global batch sharded over "data", params and optimizer state replicated, or (model_parallel > 1, or
`train.fsdp`) sharded over "model". Every process draws the same global batch from `BatchIterator` and
hands its devices only their rows, so 1 device and 8 train on the same batches. Checkpoints hold the
sharded arrays (each process writes its shards; restored into the mesh's shardings). Process 0 alone writes
the shared files (config, metrics, results, TensorBoard, plot); every process runs every step, evaluation
and checkpoint.

Workdir: local or any `etils.epath` URI (gs://bucket/run): every file goes through `experiments.files`
(atomic writes; on an object store an append rewrites the object, see `files.append_bytes`) and the
checkpoints through Orbax, which writes gs:// itself (TensorStore).

Workdir layout:
  config.json        the ConfigDict (written atomically at the start; checked on resume)
  model_config.json  the model's dataclass config ({"family", "config"}), for `load_trained`
  palette.npy        iGPT only: the colour palette, k-means on the training split
  data_split.json    which examples are held out (ids / indices) and the dataset summary
  metrics.jsonl      one JSON object per line: kind "train" (loss, lr, grad_norm, tokens/s,
                     examples/s) or "eval" (held-out loss), each flushed as written
  checkpoints/<step>/{state,data}   Orbax, atomic (uncommitted saves are ignored on restore)
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import time
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import orbax.checkpoint as ocp
from etils import epath
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P
from tqdm.auto import tqdm

from experiments import distributed, tensorboard
from experiments.files import (
    CorruptFileError,
    absolute,
    append_bytes,
    atomic_save_figure,
    atomic_write_json,
    atomic_write_text,
    workdir_lock,
)
from experiments.train_data import BatchIterator, TrainData, load_data
from models import registry

STATE_ITEM, DATA_ITEM = "state", "data"


# ---------------------------------------------------------------------------------------------------
# Small IO helpers


def _append_jsonl(path: epath.Path, record: dict) -> None:
    append_bytes(path, (json.dumps(record, sort_keys=True) + "\n").encode())
    tensorboard.write_scalars(path.parent / "tensorboard", record)  # the same curves for TensorBoard


def _metric_records(path: epath.Path) -> list[tuple[str, dict]]:
    """(line, record) pairs of a metrics file; a half-written LAST line (a kill mid-append) is dropped, any
    other unreadable line is a `CorruptFileError` naming the file and line."""
    text = path.read_bytes().decode(errors="replace")
    lines = text.split("\n")
    out = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
            if not isinstance(record, dict) or "step" not in record or "kind" not in record:
                raise ValueError("not a metrics record")
        except ValueError as e:
            if number == len(lines) and not text.endswith("\n"):
                logging.warning("%s: dropping a half-written last line (%d characters)", path, len(line))
                continue
            raise CorruptFileError(
                f"{path} is damaged: line {number} is not a metrics record ({e}). Delete that line (deleting the "
                "file instead loses the records up to the last checkpoint: a resumed run does not rewrite them)") from e
        out.append((line, record))
    return out


def read_metrics(workdir: epath.PathLike) -> list[dict]:
    """All records of `workdir/metrics.jsonl` (empty list if absent; a half-written last line is left out)."""
    path = epath.Path(workdir) / "metrics.jsonl"
    if not path.is_file():
        return []
    return [record for _, record in _metric_records(path)]


def _truncate_metrics(path: epath.Path, last_step: int | None) -> None:
    """Keeps only records with step <= last_step: what a run resumed from the checkpoint at `last_step`
    would have written. None (no checkpoint: training starts over) keeps nothing."""
    if not path.is_file():
        return
    if last_step is None:
        path.unlink()
        return
    lines = [line for line, record in _metric_records(path) if record["step"] <= last_step]
    atomic_write_text(path, "".join(ln + "\n" for ln in lines))


# ---------------------------------------------------------------------------------------------------
# Models, losses, optimizer


def training_family(config: ml_collections.ConfigDict):
    """The module of `config.model.family`, which must have a training objective."""
    return registry.trainable_family(config.model.family)


def make_model_config(config: ml_collections.ConfigDict, data: TrainData) -> Any:
    """The model's dataclass config from `config.model` and the data (sequence length, palette size)."""
    return training_family(config).training_config(config.model, data)


def build_model(model_config: Any) -> Any:
    """The Flax module of a model config of any family."""
    return registry.family(registry.family_of(model_config)).Model(model_config)


def init_params(model_config: Any, seed: int) -> Any:
    """float32 params (inner dict) from `seed`, with the models' own initializers."""
    return registry.family(registry.family_of(model_config)).init_params(model_config, seed)


def make_loss_fns(model_config: Any, train_settings: ml_collections.ConfigDict) -> tuple[Callable, Callable]:
    """(train_loss(params, batch, key) -> (loss, aux), eval_sums(params, batch, valid, key) -> (sum, count)).

    The family's `token_losses` gives a per-token loss and weight (ESM-2: the masked positions; iGPT:
    every pixel); the loss is their weighted mean over the batch.
    """
    token_losses = registry.trainable_family(registry.family_of(model_config)).token_losses(model_config,
                                                                                            train_settings)

    def train_loss(params, batch, key):
        losses, weights = token_losses(params, batch, key)
        count = weights.sum()
        return (losses * weights).sum() / jnp.maximum(count, 1.0), {"predicted_tokens": count}

    def eval_sums(params, batch, valid, key):
        losses, weights = token_losses(params, batch, key)
        weights = weights * valid[:, None]
        return (losses * weights).sum(), weights.sum()

    return train_loss, eval_sums


def make_schedule(train_settings: ml_collections.ConfigDict) -> optax.Schedule:
    """Linear warmup 0 -> lr over warmup_steps, then cosine decay to lr * end_lr_fraction at `steps`."""
    lr = train_settings.learning_rate
    return optax.warmup_cosine_decay_schedule(
        init_value=0.0, peak_value=lr, warmup_steps=train_settings.warmup_steps,
        decay_steps=max(train_settings.steps, train_settings.warmup_steps + 1),
        end_value=lr * train_settings.end_lr_fraction,
    )


def make_optimizer(train_settings: ml_collections.ConfigDict) -> optax.GradientTransformation:
    """Global-norm clipping, then AdamW. Weight decay only on matrices (kernels, embeddings), not on
    biases or norm scales, the usual choice for transformers."""
    decay_mask = lambda params: jax.tree.map(lambda p: p.ndim >= 2, params)
    return optax.chain(
        optax.clip_by_global_norm(train_settings.grad_clip_norm),
        optax.adamw(make_schedule(train_settings), b1=train_settings.b1, b2=train_settings.b2, eps=train_settings.eps,
                    weight_decay=train_settings.weight_decay,
                    mask=decay_mask),
    )


def init_state(model_config, optimizer: optax.GradientTransformation, seed: int) -> dict:
    """{params, opt_state, step, rng}: everything the jitted step reads, as one checkpointable pytree."""
    params = init_params(model_config, seed)
    # A raw uint32 key (not a typed key array): plain arrays checkpoint everywhere.
    rng = jax.random.key_data(jax.random.fold_in(jax.random.key(seed), 1))
    return {"params": params, "opt_state": optimizer.init(params), "step": jnp.asarray(0, jnp.int32), "rng": rng}


def make_train_step(train_loss: Callable, optimizer: optax.GradientTransformation) -> Callable:
    """(state, batch) -> (state, metrics), to be jit-compiled (`_step_functions`). The step key is split off
    the state's RNG.

    No buffer donation: Orbax may still be reading the previous state's buffers on CPU, where
    host "copies" can alias device memory; these models are small enough not to need it.
    """

    def train_step(state, batch):
        rng, step_key = jax.random.split(jax.random.wrap_key_data(state["rng"]))
        (loss, aux), grads = jax.value_and_grad(train_loss, has_aux=True)(state["params"], batch, step_key)
        updates, opt_state = optimizer.update(grads, state["opt_state"], state["params"])
        params = optax.apply_updates(state["params"], updates)
        new_state = {"params": params, "opt_state": opt_state, "step": state["step"] + 1,
                     "rng": jax.random.key_data(rng)}
        return new_state, {"loss": loss, "grad_norm": optax.global_norm(grads), **aux}

    return train_step


@functools.lru_cache(maxsize=8)
def _step_functions(model_config: Any, train_json: str, mesh: Mesh,
                    fsdp: bool) -> tuple[optax.GradientTransformation, Callable, Callable, optax.Schedule, dict]:
    """(optimizer, jitted train_step, jitted eval_sums, schedule, state shardings), cached per (model config,
    config.train, mesh) so repeated runs in one process (resume, tests) reuse the compiled steps.

    train_step(state, batch [B, T] sharded over "data") -> (state, metrics replicated);
    eval_sums(params, rows [B, T] and valid [B] sharded over "data", key data uint32 [2]) -> (sum, count).
    """
    train_settings = ml_collections.ConfigDict(json.loads(train_json))
    optimizer = make_optimizer(train_settings)
    train_loss, eval_sums = make_loss_fns(model_config, train_settings)
    shardings = state_shardings(jax.eval_shape(functools.partial(init_state, model_config, optimizer, 0)), mesh, fsdp)
    replicated = NamedSharding(mesh, P())
    train_step = jax.jit(make_train_step(train_loss, optimizer), in_shardings=(shardings, distributed.batch_sharding(
        mesh, 2)), out_shardings=(shardings, replicated))
    eval_step = jax.jit(lambda params, rows, valid, key: eval_sums(params, rows, valid, jax.random.wrap_key_data(key)),
                        in_shardings=(shardings["params"], distributed.batch_sharding(mesh, 2),
                                      distributed.batch_sharding(mesh, 1), replicated), out_shardings=replicated)
    return optimizer, train_step, eval_step, make_schedule(train_settings), shardings


def evaluate(eval_sums: Callable, params: Any, val: np.ndarray, batch_size: int, seed: int, mesh: Mesh) -> float:
    """Held-out loss (per predicted token) over every row of `val` [N, T], in fixed-size batches sharded over
    the "data" axis of `mesh`; every process calls it.

    The masking key of eval batch i is fold_in(key(seed), i): the same corruption at every evaluation,
    so the curve measures the model, not masking noise. The last batch is padded with ignored rows.
    """
    total, count = 0.0, 0.0
    base = jax.random.key(seed)
    replicated = NamedSharding(mesh, P())
    for i, start in enumerate(range(0, len(val), batch_size)):
        rows = val[start : start + batch_size]
        valid = np.zeros(batch_size, np.float32)
        valid[: len(rows)] = 1.0
        if len(rows) < batch_size:
            filler = np.repeat(rows[:1], batch_size - len(rows), axis=0)
            rows = np.concatenate([rows, filler])
        key = to_mesh(jax.random.key_data(jax.random.fold_in(base, i)), replicated)
        s, c = eval_sums(params, global_batch(rows, distributed.batch_sharding(mesh, 2)),
                         global_batch(valid, distributed.batch_sharding(mesh, 1)), key)
        total, count = total + float(host_copy(s)), count + float(host_copy(c))
    return total / max(count, 1.0)


# ---------------------------------------------------------------------------------------------------
# Devices: the mesh, the shardings of state and batches


def training_mesh(train_settings: ml_collections.ConfigDict) -> tuple[Mesh, bool]:
    """(mesh over every device of every process, whether params and optimizer state are sharded) for
    `config.train`: model_parallel (size of the "model" axis, default 1) and fsdp (default False)."""
    model_parallel = int(train_settings.get("model_parallel", 1))
    fsdp = bool(train_settings.get("fsdp", False))
    if fsdp and model_parallel == 1:
        raise ValueError("train.fsdp=True shards params and optimizer state over the 'model' mesh axis, whose size "
                         "train.model_parallel is 1 (nothing to shard over): set train.model_parallel to a divisor "
                         f"> 1 of the device count {jax.device_count()}, or train.fsdp=False")
    mesh = distributed.make_mesh(model_parallel)
    check_batch_sizes(train_settings, mesh.shape["data"])
    return mesh, fsdp or model_parallel > 1


def check_batch_sizes(train_settings: ml_collections.ConfigDict, data_parallel: int) -> None:
    """The training and evaluation batches are split evenly over the "data" mesh axis of size `data_parallel`."""
    for key in ("batch_size", "eval_batch_size"):
        if train_settings[key] % data_parallel:
            raise ValueError(f"train.{key}={train_settings[key]} is not a multiple of the 'data' mesh axis "
                             f"({data_parallel} = devices / train.model_parallel): each device takes an equal share "
                             f"of the batch; use a multiple of {data_parallel}")


def state_shardings(state: Any, mesh: Mesh, fsdp: bool) -> dict:
    """A NamedSharding per leaf of a training state (concrete or abstract): params and optimizer state
    as `distributed.param_shardings`, the step and the RNG replicated."""
    replicated = NamedSharding(mesh, P())
    return {"params": distributed.param_shardings(state["params"], mesh, fsdp),
            "opt_state": distributed.param_shardings(state["opt_state"], mesh, fsdp),
            "step": replicated, "rng": replicated}


def to_mesh(tree: Any, shardings: Any) -> Any:
    """Host or single-device arrays holding the same values on every process -> global arrays laid out
    as `shardings` (a matching pytree); each process places only the pieces its devices hold."""

    def put(leaf, sharding):
        host = np.asarray(jax.device_get(leaf))
        return jax.make_array_from_callback(host.shape, sharding, lambda index: host[index])

    return jax.tree.map(put, tree, shardings)


def process_rows(sharding: NamedSharding, shape: tuple[int, ...]) -> slice:
    """The rows of a [B, ...] array that this process's devices hold under `sharding` (one contiguous block:
    `distributed.make_mesh` puts each process's devices consecutively)."""
    spans = sorted({(index[0].start or 0, shape[0] if index[0].stop is None else index[0].stop)
                    for index in sharding.addressable_devices_indices_map(shape).values()})
    for (_, stop), (start, _) in zip(spans, spans[1:], strict=False):
        if start != stop:
            raise ValueError(f"this process's devices hold the non-contiguous rows {spans} of a batch of {shape[0]}; "
                             "make train.model_parallel divide the local device count")
    return slice(spans[0][0], spans[-1][1])


def global_batch(batch: np.ndarray, sharding: NamedSharding) -> jax.Array:
    """The global batch [B, ...] (the same on every process) as one jax.Array sharded as `sharding`, each
    process contributing only its own rows."""
    return jax.make_array_from_process_local_data(sharding, batch[process_rows(sharding, batch.shape)], batch.shape)


def host_copy(x: jax.Array | np.ndarray) -> np.ndarray:
    """The whole value of an array on this host; an array spread over other processes' devices is gathered
    (a collective: every process must call it, in the same order)."""
    if isinstance(x, jax.Array) and not x.is_fully_addressable:
        return np.asarray(multihost_utils.process_allgather(x, tiled=True))
    return np.asarray(jax.device_get(x))


# ---------------------------------------------------------------------------------------------------
# Checkpoints


def keep_steps(checkpoint_settings: ml_collections.ConfigDict) -> tuple[int, ...]:
    """Steps checkpointed in addition to every `interval` and never deleted (e.g. log-spaced steps for a
    profile-over-training sweep; 0 is the untrained initialisation)."""
    return tuple(sorted({int(s) for s in (checkpoint_settings.get("keep_steps") or ())}))


def _manager(workdir: epath.Path, checkpoint_settings: ml_collections.ConfigDict) -> ocp.CheckpointManager:
    kept = keep_steps(checkpoint_settings)
    # The newest `max_to_keep` checkpoints (for resumption) plus the `keep_steps` ones (for analysis).
    policy = ocp.checkpoint_managers.LatestN(checkpoint_settings.max_to_keep) if not kept else \
        ocp.checkpoint_managers.AnyPreservationPolicy([ocp.checkpoint_managers.LatestN(checkpoint_settings.max_to_keep),
                                                       ocp.checkpoint_managers.CustomSteps(list(kept))])
    options = ocp.CheckpointManagerOptions(
        preservation_policy=policy, enable_async_checkpointing=checkpoint_settings.get("async_save", True), create=True,
    )
    return ocp.CheckpointManager(absolute(workdir) / "checkpoints", options=options,
                                 item_names=(STATE_ITEM, DATA_ITEM))


class CheckpointError(RuntimeError):
    """A checkpoint cannot be read or does not match the checksum recorded when it was saved."""


def state_digest(state: Any) -> str:
    """SHA-256 of a state pytree: every leaf's path, dtype, shape and bytes of its whole (global) value, so the
    same on every process and for every sharding. Sharded over several processes it gathers (a collective)."""
    h = hashlib.sha256()
    leaves, _ = jax.tree_util.tree_flatten_with_path(state)
    for path, leaf in leaves:
        a = np.ascontiguousarray(host_copy(leaf))
        h.update(f"{jax.tree_util.keystr(path)}\0{a.dtype.str}\0{a.shape}\0".encode())
        h.update(a.tobytes())
    return h.hexdigest()


def _restore(mngr: ocp.CheckpointManager, step: int, template: dict) -> tuple[dict, dict]:
    """(state, data) of checkpoint `step`, laid out as `template`'s shardings (a leaf without one: on this
    process's first device); `CheckpointError` naming the step if it is unreadable or damaged."""
    local = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    abstract = jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=getattr(x, "sharding", None) or local), template)
    where = f"checkpoint {step} ({mngr.directory / str(step)})"
    try:
        out = mngr.restore(step, args=ocp.args.Composite(
            **{STATE_ITEM: ocp.args.StandardRestore(abstract), DATA_ITEM: ocp.args.JsonRestore()}))
    except Exception as e:  # Orbax / TensorStore / json raise many types for a damaged checkpoint
        raise CheckpointError(f"{where} cannot be read: {type(e).__name__}: {str(e)[:400]}") from e
    state, data = out[STATE_ITEM], out[DATA_ITEM]
    if not isinstance(data, dict):
        raise CheckpointError(f"{where}: its data item is {type(data).__name__}, not the saved position")
    recorded = data.get("state_sha256")
    if recorded is not None and state_digest(state) != recorded:
        raise CheckpointError(f"{where} is damaged: its state does not match the SHA-256 recorded when it was saved")
    return state, data


def _restore_newest_good(mngr: ocp.CheckpointManager, template: dict) -> tuple[int, dict, dict, list[int]] | None:
    """(step, state, data, damaged newer steps) of the newest checkpoint that restores and verifies, or None
    if there is no checkpoint. Each damaged one is named in a warning; none good is a `CheckpointError`."""
    steps = sorted(mngr.all_steps(), reverse=True)
    damaged = []
    for step in steps:
        try:
            state, data = _restore(mngr, step, template)
        except CheckpointError as e:
            logging.warning("%s; falling back to the previous checkpoint", e)
            damaged.append(step)
            continue
        return step, state, data, damaged
    if steps:
        raise CheckpointError(f"no checkpoint under {mngr.directory} can be restored (steps {steps} are damaged, "
                              "see the warnings above); delete that directory to train from scratch")
    return None


def _save_checkpoint(mngr: ocp.CheckpointManager, step: int, state: dict, iterator: BatchIterator) -> None:
    mngr.save(step, args=ocp.args.Composite(**{
        STATE_ITEM: ocp.args.StandardSave(state),
        DATA_ITEM: ocp.args.JsonSave({**iterator.state(), "state_sha256": state_digest(state)})}), force=True)


def _set_aside_damaged(workdir: epath.Path, step: int) -> epath.Path:
    """Moves checkpoint `step` to `checkpoints_damaged/<step>` (replacing one set aside there before), out of the
    way of new saves; returns where it went. Locally a rename; on an object store epath's rename, a copy of
    every object then a delete (a kill in between leaves both copies, and the next resume moves it again)."""
    target = workdir / "checkpoints_damaged" / str(step)
    target.rmtree(missing_ok=True)
    target.parent.mkdir(parents=True, exist_ok=True)
    (workdir / "checkpoints" / str(step)).rename(target)
    return target


def _check_resume_config(workdir: epath.Path, config: ml_collections.ConfigDict) -> None:
    """A resumed run must train the same model on the same data: compare with the saved config."""
    saved_path = workdir / "config.json"
    if not saved_path.is_file():
        return
    saved = json.loads(saved_path.read_text())
    now = json.loads(config.to_json_best_effort())
    for section in ("model", "data", "seed"):
        if saved.get(section) != now.get(section):
            raise ValueError(
                f"{workdir} holds a run with a different config.{section}: saved {saved.get(section)} vs "
                f"now {now.get(section)}; use a fresh workdir"
            )
    saved_train, now_train = saved.get("train") or {}, now.get("train") or {}
    changed = sorted(key for key in saved_train.keys() | now_train.keys() if saved_train.get(key) != now_train.get(key))
    if changed:
        # Allowed (e.g. training longer), but e.g. a new `steps` reshapes the cosine schedule from the
        # resumed step on, so the run matches neither config run uninterrupted.
        logging.warning("resuming %s with changed config.train: %s", workdir,
                        ", ".join(f"{key} {saved_train.get(key)} -> {now_train.get(key)}" for key in changed))


# ---------------------------------------------------------------------------------------------------
# The training loop


def train(
    config: ml_collections.ConfigDict,
    workdir: epath.PathLike,
    *,
    on_step: Callable[[int], None] | None = None,
) -> dict:
    """Trains (or resumes) in `workdir`; see `run`.

    Args:
      on_step: called with the global step after each step (and after its checkpoint, if any, has
        been handed to Orbax). An exception raised here aborts the run like a crash would.
    """
    workdir = epath.Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    # Each process of a multi-process job holds its own lock: they share the workdir, a second job is refused.
    with workdir_lock(workdir, "train", process_index=jax.process_index()):
        return _train(config, workdir, on_step)


def _train(config: ml_collections.ConfigDict, workdir: epath.Path, on_step: Callable[[int], None] | None) -> dict:
    train_settings, checkpoint_settings = config.train, config.checkpoint
    t_start = time.perf_counter()

    writer = distributed.is_writer()
    mesh, fsdp = training_mesh(train_settings)
    # Process 0 first: it fits and saves the iGPT palette that the other processes then read.
    if writer:
        data, split = load_data(training_family(config).TRAINING_DATA, config.data, workdir)
    distributed.barrier("train: data loaded")
    if not writer:
        data, split = load_data(training_family(config).TRAINING_DATA, config.data, workdir)
    model_config = make_model_config(config, data)
    optimizer, train_step, eval_sums, schedule, shardings = _step_functions(
        model_config, train_settings.to_json(sort_keys=True), mesh, fsdp)
    batch_sharding = distributed.batch_sharding(mesh, 2)

    _check_resume_config(workdir, config)
    if writer:
        atomic_write_text(workdir / "config.json", config.to_json_best_effort(indent=2))
        atomic_write_text(workdir / "model_config.json", json.dumps(registry.config_to_json(model_config), indent=2))
        atomic_write_text(workdir / "data_split.json", json.dumps({"info": data.info, **split}))

    state = to_mesh(init_state(model_config, optimizer, config.seed), shardings)
    n_params = int(sum(x.size for x in jax.tree.leaves(state["params"])))
    iterator = BatchIterator(data, train_settings.batch_size, config.seed, max_residues=config.data.get("max_residues"))
    metrics_path = workdir / "metrics.jsonl"
    mngr = _manager(workdir, checkpoint_settings)
    resumed_from = None
    try:
        restored = _restore_newest_good(mngr, state)
        if restored is not None and restored[3]:  # damaged newer checkpoints: out of the way of new saves
            mngr.close()
            for step in restored[3] if writer else ():
                target = _set_aside_damaged(workdir, step)
                logging.warning("moved damaged checkpoint %d to %s; resuming from checkpoint %d", step, target,
                                restored[0])
            distributed.barrier("train: damaged checkpoints moved")
            mngr = _manager(workdir, checkpoint_settings)
        latest = None if restored is None else restored[0]
        if writer:
            _truncate_metrics(metrics_path, latest)
        if latest is not None:
            _, state, data_state, _ = restored
            expected = BatchIterator.position_after(latest, iterator.steps_per_epoch)
            if {k: data_state[k] for k in expected} != expected or data_state["seed"] != config.seed:
                raise ValueError(f"checkpoint {latest}: data position {data_state} does not match step {latest}")
            iterator = BatchIterator.from_state(data, data_state, max_residues=config.data.get("max_residues"))
            resumed_from = int(latest)
        start = int(state["step"])
        kept = set(keep_steps(checkpoint_settings))
        if latest is None:  # a fresh start (a run resumed from a step-0 checkpoint has this record already)
            loss0 = evaluate(eval_sums, state["params"], data.val, train_settings.eval_batch_size, config.seed, mesh)
            if writer:
                _append_jsonl(metrics_path, {"kind": "eval", "step": 0, "loss": loss0,
                                             "time_s": time.perf_counter() - t_start})
            if 0 in kept:  # after the record: a kill in between starts afresh rather than losing it
                _save_checkpoint(mngr, 0, state, iterator)

        bar = tqdm(total=train_settings.steps, initial=start,
                   disable=not (writer and train_settings.get("progress_bar", True)),
                   desc=f"train {model_config.__class__.__name__}", dynamic_ncols=True)
        pending, tokens, examples = [], 0, 0
        t_log, compile_s = time.perf_counter(), None
        for step in range(start + 1, train_settings.steps + 1):
            batch = next(iterator)
            state, m = train_step(state, global_batch(batch, batch_sharding))
            pending.append(m)
            if compile_s is None:  # the first step of a run compiles: keep it out of the throughput
                jax.block_until_ready(m)
                compile_s = time.perf_counter() - t_log
                t_log = time.perf_counter()
            else:
                tokens += data.real_tokens(batch)
                examples += batch.shape[0]
            if step % train_settings.log_interval == 0 or step == train_settings.steps:
                # The loss is averaged over every step since the last record (the same steps whether
                # or not the run was resumed in between), throughput over the timed ones.
                fetched = jax.tree.map(host_copy, pending)
                dt = max(time.perf_counter() - t_log, 1e-9)
                rec = {
                    "kind": "train", "step": step,
                    "loss": float(np.mean([f["loss"] for f in fetched])),
                    "grad_norm": float(np.mean([f["grad_norm"] for f in fetched])),
                    "lr": float(schedule(step - 1)),
                    "tokens_per_s": tokens / dt if examples else None,
                    "examples_per_s": examples / dt if examples else None,
                    "time_s": time.perf_counter() - t_start,
                }
                if writer:
                    _append_jsonl(metrics_path, rec)
                bar.set_postfix(loss=f"{rec['loss']:.3f}", tok_s=f"{(rec['tokens_per_s'] or 0):.0f}")
                pending, tokens, examples, t_log = [], 0, 0, time.perf_counter()
            t_pause = time.perf_counter()
            if step % train_settings.eval_interval == 0 or step == train_settings.steps:
                loss = evaluate(eval_sums, state["params"], data.val, train_settings.eval_batch_size, config.seed, mesh)
                if writer:
                    _append_jsonl(metrics_path, {"kind": "eval", "step": step, "loss": loss,
                                                 "time_s": time.perf_counter() - t_start})
            if step % checkpoint_settings.interval == 0 or step == train_settings.steps or step in kept:
                _save_checkpoint(mngr, step, state, iterator)
            t_log += time.perf_counter() - t_pause  # evaluation and checkpointing are not training throughput
            bar.update(1)
            if on_step is not None:
                on_step(step)
        bar.close()
        mngr.wait_until_finished()
    finally:
        mngr.close()
    distributed.barrier("train: finished")  # every process reads the metrics process 0 has written by now

    evals = [r for r in read_metrics(workdir) if r["kind"] == "eval"]
    result = {
        "family": config.model.family, "final_step": int(state["step"]), "resumed_from": resumed_from,
        "num_params": n_params, "eval_loss": [(r["step"], r["loss"]) for r in evals],
        "final_eval_loss": evals[-1]["loss"] if evals else None, "data": data.info,
        "compile_s": compile_s if train_settings.steps > start else None, "wall_time_s": time.perf_counter() - t_start,
        "workdir": str(workdir),
    }
    if writer:
        atomic_write_json(workdir / "train_result.json", result, checksum=True)
        plot_metrics(workdir)
    return result


def run(config: ml_collections.ConfigDict, workdir: epath.PathLike) -> dict:
    """Trains `config.model.family` (ESM-2: masked LM, iGPT: autoregressive pixels) in `workdir`.

    Resumes from the latest checkpoint in `workdir/checkpoints` if there is one (exactly: same
    params, optimizer state, RNG and data position as an uninterrupted run).

    Returns:
      dict with final_step, resumed_from, num_params, eval_loss [(step, loss)], final_eval_loss,
      data summary, compile_s, wall_time_s (also written to workdir/train_result.json).
    """
    return train(config, workdir)


# ---------------------------------------------------------------------------------------------------
# Downstream


def load_config(workdir: epath.PathLike) -> ml_collections.ConfigDict:
    """The ConfigDict a run in `workdir` was started with."""
    return ml_collections.ConfigDict(json.loads((epath.Path(workdir) / "config.json").read_text()))


def load_trained(workdir: epath.PathLike, step: int | None = None) -> tuple[Any, Any, ml_collections.ConfigDict]:
    """The trained model of a workdir for extraction: (flax module, params, run config).

    Args:
      workdir: a `run` workdir.
      step: which checkpoint (default the latest).

    Returns:
      (the family's Flax module, params (inner dict, float32 jax arrays), ConfigDict). For iGPT,
      quantize inputs with `palette.load_palette(workdir / "palette.npy")` and prepend the start token
      (`igpt.add_start_token`). `model_config.json` of every earlier version is read
      (`registry.config_from_json`).
    """
    workdir = epath.Path(workdir)
    config = load_config(workdir)
    model_config = registry.config_from_json(json.loads((workdir / "model_config.json").read_text()))
    with ocp.CheckpointManager(absolute(workdir) / "checkpoints", item_names=(STATE_ITEM, DATA_ITEM)) as mngr:
        template = jax.eval_shape(functools.partial(init_state, model_config, make_optimizer(config.train), 0))
        if step is not None:
            state, _ = _restore(mngr, step, template)
        elif (restored := _restore_newest_good(mngr, template)) is not None:
            state = restored[1]
        else:
            raise FileNotFoundError(f"no checkpoint under {workdir / 'checkpoints'}")
    return build_model(model_config), state["params"], config


def load_untrained(workdir: epath.PathLike) -> tuple[Any, Any, ml_collections.ConfigDict]:
    """A training workdir's model as its run initialised it (step 0): (flax module, params, run config).

    Needs no checkpoint: the initialisation is a pure function of the model config and the run's seed.
    """
    workdir = epath.Path(workdir)
    config = load_config(workdir)
    model_config = registry.config_from_json(json.loads((workdir / "model_config.json").read_text()))
    return build_model(model_config), init_params(model_config, int(config.seed)), config


def plot_metrics(
    workdir: epath.PathLike, out: epath.PathLike | None = None, title: str | None = None
) -> epath.Path:
    """Training loss (per log interval) and held-out loss vs step from metrics.jsonl -> PNG (default
    workdir/loss_curve.png; the format follows the suffix), written atomically."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    workdir = epath.Path(workdir)
    recs = read_metrics(workdir)
    tr = [(r["step"], r["loss"]) for r in recs if r["kind"] == "train"]
    ev = [(r["step"], r["loss"]) for r in recs if r["kind"] == "eval"]
    fig, ax = plt.subplots(figsize=(6, 4), dpi=120)
    if tr:
        ax.plot(*zip(*tr, strict=True), lw=1, alpha=0.6, label="train (mean over log interval)")
    if ev:
        ax.plot(*zip(*ev, strict=True), "o-", lw=1.5, ms=3, label="held-out")
    family = registry.family(json.loads((workdir / "model_config.json").read_text())["family"])
    ax.set_xlabel("step")
    ax.set_ylabel(family.LOSS_NAME)
    ax.set_title(title or workdir.name)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    out = epath.Path(out) if out is not None else workdir / "loss_curve.png"
    atomic_save_figure(fig, out)
    plt.close(fig)
    return out
