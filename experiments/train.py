"""Pre-training of small ESM-2 (masked LM on proteins) and iGPT (autoregressive pixels) models.

`run(config, workdir)` trains `config.model.family` ("esm2" | "igpt") with optax AdamW (linear
warmup + cosine decay, global-norm clipping) and checkpoints with an Orbax `CheckpointManager`.

Exact resumption. Everything that determines the next step is either in the checkpoint or a pure
function of it:
  - params, optimizer state (incl. the schedule's step count) and the step: the "state" item;
  - the RNG: a raw uint32 key in the state, split once per step inside the jitted step, so the
    masking of step s is the same whether or not the run was interrupted before it;
  - the data position: batches come from `BatchIterator`, whose position is (epoch, index) with a
    seeded permutation per epoch and a seeded crop per batch; that position is the "data" item
    (JSON) and is checked against the step on restore.
A run killed after the checkpoint at step s and restarted continues from s and reaches bit-identical
parameters (tests/test_train.py). Metrics and eval records are tied to checkpoints: on resume from s
every record after s is dropped (and a run killed before its first checkpoint starts its log afresh),
as is a half-written last line, so `metrics.jsonl` and `train_result.json` read as one uninterrupted run.

Damaged checkpoints: each checkpoint's "data" item records a SHA-256 of the state it was saved with.
A latest checkpoint that cannot be read or does not match it is named in a warning, moved to
`checkpoints_damaged/<step>`, and the run resumes from the newest good one. Only one process trains in
a workdir at a time (`experiments.files.workdir_lock`); a second one exits naming the first.

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

import dataclasses
import functools
import hashlib
import json
import logging
import pathlib
import shutil
import time
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import orbax.checkpoint as ocp
from tqdm.auto import tqdm

from experiments import tensorboard
from experiments.files import CorruptFileError, atomic_write_json, atomic_write_text, workdir_lock
from models import esm2, igpt
from models import palette as palette_lib
from models import protein_tokenizer as ptok

STATE_ITEM, DATA_ITEM = "state", "data"
# The 20 standard amino acids are ids 4..23 (LAGVSERTIDPKQNFYMHWC): the pool for the 10% "random"
# replacements (X, B, U, Z, O are rare/ambiguous and not worth teaching as corruptions).
STANDARD_AA_IDS = (ptok.TOKEN_TO_ID["L"], ptok.TOKEN_TO_ID["C"] + 1)
SPECIAL_IDS = (ptok.CLS_ID, ptok.PAD_ID, ptok.EOS_ID)


# ---------------------------------------------------------------------------------------------------
# Small IO helpers


def _append_jsonl(path: pathlib.Path, record: dict) -> None:
    with open(path, "a") as f:
        f.write(json.dumps(record, sort_keys=True) + "\n")
        f.flush()
    tensorboard.write_scalars(path.parent / "tensorboard", record)  # the same curves for TensorBoard


def _metric_records(path: pathlib.Path) -> list[tuple[str, dict]]:
    """(line, record) pairs of a metrics file; a half-written LAST line (a kill mid-append) is dropped, any
    other unreadable line is a `CorruptFileError` naming the file and line."""
    text = path.read_text(errors="replace")
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


def read_metrics(workdir: pathlib.Path | str) -> list[dict]:
    """All records of `workdir/metrics.jsonl` (empty list if absent; a half-written last line is left out)."""
    path = pathlib.Path(workdir) / "metrics.jsonl"
    if not path.is_file():
        return []
    return [record for _, record in _metric_records(path)]


def _truncate_metrics(path: pathlib.Path, last_step: int | None) -> None:
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
# Data


@dataclasses.dataclass(frozen=True)
class TrainData:
    """A training corpus and its held-out split.

    Attributes:
      family: "esm2" or "igpt".
      train: protein: tuple of int32 residue-id arrays (no specials, uncropped); image: int32
        [N, T] pixel (palette) ids in raster order.
      val: model-ready held-out rows, int32 [N_val, T]: protein `<cls> crop <eos>` right-padded;
        image pixel ids.
      seq_len: T, fixed for every batch (one jit compilation).
      val_labels: int [N_val] class labels (images) or None.
      info: JSON-able summary (sizes, dedup counts, palette size...).
    """

    family: str
    train: Any
    val: np.ndarray
    seq_len: int
    val_labels: np.ndarray | None
    info: dict

    @property
    def num_train(self) -> int:
        return len(self.train)


def split_indices(n: int, val_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Seeded (train, val) index split of range(n): sorted int64 arrays; val gets round(n * fraction) >= 1."""
    if not 0.0 < val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction}")
    perm = np.random.default_rng(seed).permutation(n)
    n_val = max(1, int(round(n * val_fraction)))
    return np.sort(perm[n_val:]), np.sort(perm[:n_val])


def read_fasta(path: pathlib.Path | str) -> list[tuple[str, str]]:
    """(header without '>', sequence) pairs of a FASTA file, in file order."""
    from experiments import protein_datasets

    return [(r.header, r.sequence) for r in protein_datasets.read_fasta(path)]


def wrap_and_pad(residues: np.ndarray, seq_len: int) -> np.ndarray:
    """int32 [n <= seq_len - 2] residue ids -> int32 [seq_len]: `<cls> residues <eos> <pad>...`."""
    out = np.full(seq_len, ptok.PAD_ID, np.int32)
    out[0] = ptok.CLS_ID
    out[1 : 1 + len(residues)] = residues
    out[1 + len(residues)] = ptok.EOS_ID
    return out


def load_protein_data(dc: ml_collections.ConfigDict) -> tuple[TrainData, dict]:
    """The masked-LM corpus: FASTA -> residue ids, exact duplicates removed, seeded held-out split.

    Exact duplicate sequences (the E. coli proteome has several, e.g. the insA/insB copies of IS
    elements) are reduced to one copy BEFORE splitting, so no held-out sequence is also a training
    sequence. Near-identical paralogs are not filtered (the proteome has no homology-reduced split).
    Held-out rows are cropped to their first `max_residues` residues (deterministic); training
    sequences are cropped at a random, seeded offset each time they are drawn (`BatchIterator`).
    """
    records = read_fasta(dc.fasta)
    if dc.get("max_sequences"):
        records = records[: dc.max_sequences]
    seen: dict[str, int] = {}
    unique = []
    for header, seq in records:
        if seq.upper() in seen:
            continue
        seen[seq.upper()] = len(unique)
        unique.append((header, seq))
    ids = [ptok.residue_ids(seq, seq_id=h.split()[0], unknown="X")[0] for h, seq in unique]
    train_idx, val_idx = split_indices(len(ids), dc.val_fraction, dc.split_seed)
    max_res = int(dc.max_residues)
    seq_len = _round_up(max_res + 2, 8)
    val_idx = val_idx[: dc.get("max_eval_examples") or len(val_idx)]
    val = np.stack([wrap_and_pad(ids[i][:max_res], seq_len) for i in val_idx])
    train = tuple(ids[i] for i in train_idx)
    lengths = np.array([len(x) for x in ids])
    info = {
        "source": str(dc.fasta), "records": len(records), "unique_sequences": len(unique),
        "duplicates_removed": len(records) - len(unique), "train_sequences": len(train),
        "val_sequences": int(len(val_idx)), "max_residues": max_res, "seq_len": seq_len,
        "longer_than_crop": int((lengths > max_res).sum()),
    }
    split = {"train_ids": [unique[i][0].split()[0] for i in train_idx],
             "val_ids": [unique[i][0].split()[0] for i in val_idx]}
    return TrainData("esm2", train, val, seq_len, None, info), split


def _round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


def load_image_splits(dc: ml_collections.ConfigDict):
    """(train ImageDataset, val ImageDataset) as RGB uint8, resized to `dc.size` if set.

    Datasets with a predefined test split (CIFAR-10 ConvNetJS: batches 0-3 / 50) use it; the others
    (sklearn digits, the MNIST test set that is all we have offline) get a seeded split.
    """
    from experiments import image_datasets

    size = dc.get("size")
    if dc.name in ("cifar10", "cifar10_convnetjs"):
        train = image_datasets.load_image_dataset(dc.name, dc.root, "train", size=size, rgb=True)
        val = image_datasets.load_image_dataset(dc.name, dc.root, "test", size=size, rgb=True)
    else:
        full = image_datasets.load_image_dataset(dc.name, dc.get("root"), dc.get("split"), size=size, rgb=True)
        train_idx, val_idx = split_indices(len(full), dc.val_fraction, dc.split_seed)
        train, val = full.subset(train_idx), full.subset(val_idx)
    if dc.get("max_train_examples"):
        train = train.subset(slice(0, dc.max_train_examples))
    if dc.get("max_eval_examples"):
        val = val.subset(slice(0, dc.max_eval_examples))
    return train, val


def load_image_data(dc: ml_collections.ConfigDict, workdir: pathlib.Path | None) -> tuple[TrainData, dict]:
    """Quantized images: palette fitted by k-means on the TRAINING split only (saved to workdir)."""
    train, val = load_image_splits(dc)
    pal_path = None if workdir is None else workdir / "palette.npy"
    if pal_path is not None and pal_path.is_file():
        pal = palette_lib.load_palette(pal_path)  # resume: never refit
    else:
        pal = palette_lib.fit_palette(train.images, dc.n_colors, seed=dc.split_seed)
        if pal_path is not None:
            palette_lib.save_palette(pal_path, pal)
    tr = palette_lib.quantize(train.images, pal).astype(np.int32)
    va = palette_lib.quantize(val.images, pal).astype(np.int32)
    info = {"source": dc.name, "train_images": int(tr.shape[0]), "val_images": int(va.shape[0]),
            "image_shape": list(train.images.shape[1:3]), "n_colors": int(dc.n_colors), "seq_len": int(tr.shape[1]),
            "colours_used_train": int(np.unique(tr).size)}
    split = {"train_labels_counts": np.bincount(train.labels).tolist(),
             "val_labels_counts": np.bincount(val.labels).tolist()}
    return TrainData("igpt", tr, va, int(tr.shape[1]), np.asarray(val.labels), info), split


def load_data(config: ml_collections.ConfigDict, workdir: pathlib.Path | None = None) -> tuple[TrainData, dict]:
    """The corpus for `config.model.family` (and, for iGPT, the palette in `workdir`)."""
    if config.model.family == "esm2":
        return load_protein_data(config.data)
    if config.model.family == "igpt":
        return load_image_data(config.data, workdir)
    raise ValueError(f"config.model.family must be 'esm2' or 'igpt', got {config.model.family!r}")


class BatchIterator:
    """Deterministic, checkpointable batches: the position is the pair (epoch, index).

    Epoch e visits the training examples in `default_rng([seed, e]).permutation(N)` order, in
    N // batch_size full batches (the remainder is dropped for that epoch, a different one each epoch).
    Protein sequences longer than the crop are cut at an offset drawn from
    `default_rng([seed, e, index])`, so a batch depends only on (seed, epoch, index), never on history.
    """

    def __init__(self, data: TrainData, batch_size: int, seed: int, *, max_residues: int | None = None,
                 epoch: int = 0, index: int = 0):
        if data.num_train < batch_size:
            raise ValueError(f"{data.num_train} training examples < batch_size {batch_size}")
        self.data, self.batch_size, self.seed = data, int(batch_size), int(seed)
        self.max_residues = max_residues
        self.steps_per_epoch = data.num_train // self.batch_size
        self.epoch, self.index = int(epoch), int(index)
        self._perm_epoch, self._perm = -1, None

    def state(self) -> dict[str, int]:
        """JSON-able position of the NEXT batch."""
        return {"epoch": self.epoch, "index": self.index, "seed": self.seed, "batch_size": self.batch_size}

    @classmethod
    def from_state(cls, data: TrainData, state: dict, **kwargs) -> BatchIterator:
        return cls(data, state["batch_size"], state["seed"], epoch=state["epoch"], index=state["index"], **kwargs)

    @staticmethod
    def position_after(step: int, steps_per_epoch: int) -> dict[str, int]:
        epoch, index = divmod(int(step), steps_per_epoch)
        return {"epoch": epoch, "index": index}

    def _permutation(self) -> np.ndarray:
        if self._perm_epoch != self.epoch:
            self._perm = np.random.default_rng([self.seed, self.epoch]).permutation(self.data.num_train)
            self._perm_epoch = self.epoch
        return self._perm

    def __iter__(self) -> BatchIterator:
        return self

    def __next__(self) -> np.ndarray:
        rows = self._permutation()[self.index * self.batch_size : (self.index + 1) * self.batch_size]
        if self.data.family == "igpt":
            batch = self.data.train[rows]
        else:
            rng = np.random.default_rng([self.seed, self.epoch, self.index])
            batch = np.stack([self._crop(self.data.train[i], rng) for i in rows])
        self.index += 1
        if self.index == self.steps_per_epoch:
            self.epoch, self.index = self.epoch + 1, 0
        return batch

    def _crop(self, residues: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        n, m = len(residues), self.max_residues
        # One draw per row whether or not it is cropped, so every row's offset is independent of the others.
        start = int(rng.integers(0, max(n - m, 0) + 1))
        return wrap_and_pad(residues[start : start + m], self.data.seq_len)


# ---------------------------------------------------------------------------------------------------
# Masking (ESM / BERT 15% with 80-10-10)


def mask_tokens(
    key: jax.Array,
    tokens: jax.Array,
    *,
    mask_prob: float = 0.15,
    mask_token_prob: float = 0.8,
    random_token_prob: float = 0.1,
    mask_id: int = ptok.MASK_ID,
    special_ids: Sequence[int] = SPECIAL_IDS,
    random_range: tuple[int, int] = STANDARD_AA_IDS,
) -> tuple[jax.Array, jax.Array]:
    """ESM's masked-LM corruption.

    Each token that is not special (<cls>, <pad>, <eos>) is selected independently with probability
    `mask_prob`; a selected token becomes <mask> with probability 0.8, a uniformly random standard
    amino acid with 0.1 (which may equal the original, as in BERT/ESM), and stays unchanged with 0.1.
    The loss is computed on the selected positions only.

    Args:
      key: a jax PRNG key.
      tokens: int32 [B, T].

    Returns:
      (inputs int32 [B, T], selected bool [B, T]); the targets are `tokens`.
    """
    k_sel, k_how, k_rand = jax.random.split(key, 3)
    eligible = ~jnp.isin(tokens, jnp.asarray(special_ids, tokens.dtype))
    selected = eligible & (jax.random.uniform(k_sel, tokens.shape) < mask_prob)
    u = jax.random.uniform(k_how, tokens.shape)
    to_mask = selected & (u < mask_token_prob)
    to_random = selected & (u >= mask_token_prob) & (u < mask_token_prob + random_token_prob)
    random_tokens = jax.random.randint(k_rand, tokens.shape, random_range[0], random_range[1], tokens.dtype)
    inputs = jnp.where(to_mask, jnp.asarray(mask_id, tokens.dtype), jnp.where(to_random, random_tokens, tokens))
    return inputs, selected


# ---------------------------------------------------------------------------------------------------
# Models, losses, optimizer


def model_config(config: ml_collections.ConfigDict, data: TrainData) -> esm2.ESM2Config | igpt.IGPTConfig:
    """The model dataclass config from `config.model` (and, for iGPT, the palette size and image length)."""
    mc = config.model
    if mc.family == "esm2":
        return esm2.ESM2Config(
            num_layers=mc.num_layers, embed_dim=mc.embed_dim, num_heads=mc.num_heads,
            ffn_dim=mc.get("mlp_dim"), token_dropout=mc.get("token_dropout", True),
            max_positions=data.seq_len, dtype=mc.get("dtype", "float32"), name=mc.get("name", "custom"),
        )
    return igpt.IGPTConfig(
        vocab_size=config.data.n_colors + 1, n_positions=data.seq_len, n_embd=mc.embed_dim,
        n_layer=mc.num_layers, n_head=mc.num_heads, n_inner=mc.get("mlp_dim"), dtype=mc.get("dtype", "float32"),
    )


def _model_config_json(mcfg) -> dict:
    family = "esm2" if isinstance(mcfg, esm2.ESM2Config) else "igpt"
    body = mcfg.to_dict() if family == "esm2" else dataclasses.asdict(mcfg)
    return {"family": family, "config": body}


def _model_config_from_json(d: dict):
    if d["family"] == "esm2":
        return esm2.ESM2Config.from_dict(d["config"])
    return igpt.IGPTConfig(**d["config"])


def build_model(mcfg) -> Any:
    return esm2.ESM2(mcfg) if isinstance(mcfg, esm2.ESM2Config) else igpt.IGPT(mcfg)


def init_params(mcfg, seed: int) -> Any:
    """float32 params (inner dict) from `seed`, with the models' own initializers."""
    if isinstance(mcfg, esm2.ESM2Config):
        return esm2.init_params(mcfg, seed)
    return igpt.init_params(mcfg, seed)


def make_loss_fns(mcfg, tc: ml_collections.ConfigDict) -> tuple[Callable, Callable]:
    """(train_loss(params, batch, key) -> (loss, aux), eval_sums(params, batch, valid, key) -> (sum, count)).

    ESM-2: mean cross-entropy over the selected (masked) positions of the batch; iGPT: mean next-pixel
    cross-entropy in nats per pixel (with the start token prepended).
    """
    model = build_model(mcfg)
    if isinstance(mcfg, esm2.ESM2Config):
        masking = dict(mask_prob=tc.mask_prob, mask_token_prob=tc.mask_token_prob,
                       random_token_prob=tc.random_token_prob)

        def token_losses(params, tokens, key):
            inputs, selected = mask_tokens(key, tokens, **masking)
            logits = model.apply({"params": params}, inputs)["logits"].astype(jnp.float32)
            ce = optax.softmax_cross_entropy_with_integer_labels(logits, tokens)
            return ce, selected.astype(jnp.float32)

    else:

        def token_losses(params, pixels, key):
            del key
            logits = model.apply({"params": params}, igpt.add_start_token(pixels, mcfg.start_token))["logits"]
            ce = optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), pixels)
            return ce, jnp.ones_like(ce)

    def train_loss(params, batch, key):
        ce, w = token_losses(params, batch, key)
        count = w.sum()
        return (ce * w).sum() / jnp.maximum(count, 1.0), {"predicted_tokens": count}

    def eval_sums(params, batch, valid, key):
        ce, w = token_losses(params, batch, key)
        w = w * valid[:, None]
        return (ce * w).sum(), w.sum()

    return train_loss, eval_sums


def make_schedule(tc: ml_collections.ConfigDict) -> optax.Schedule:
    """Linear warmup 0 -> lr over warmup_steps, then cosine decay to lr * end_lr_fraction at `steps`."""
    return optax.warmup_cosine_decay_schedule(
        init_value=0.0, peak_value=tc.learning_rate, warmup_steps=tc.warmup_steps,
        decay_steps=max(tc.steps, tc.warmup_steps + 1), end_value=tc.learning_rate * tc.end_lr_fraction,
    )


def make_optimizer(tc: ml_collections.ConfigDict) -> optax.GradientTransformation:
    """Global-norm clipping, then AdamW. Weight decay only on matrices (kernels, embeddings), not on
    biases or norm scales, the usual choice for transformers."""
    decay_mask = lambda params: jax.tree.map(lambda p: p.ndim >= 2, params)
    return optax.chain(
        optax.clip_by_global_norm(tc.grad_clip_norm),
        optax.adamw(make_schedule(tc), b1=tc.b1, b2=tc.b2, eps=tc.eps, weight_decay=tc.weight_decay,
                    mask=decay_mask),
    )


def init_state(mcfg, optimizer: optax.GradientTransformation, seed: int) -> dict:
    """{params, opt_state, step, rng}: everything the jitted step reads, as one checkpointable pytree."""
    params = init_params(mcfg, seed)
    # A raw uint32 key (not a typed key array): plain arrays checkpoint everywhere.
    rng = jax.random.key_data(jax.random.fold_in(jax.random.key(seed), 1))
    return {"params": params, "opt_state": optimizer.init(params), "step": jnp.asarray(0, jnp.int32), "rng": rng}


def make_train_step(train_loss: Callable, optimizer: optax.GradientTransformation) -> Callable:
    """jit-compiled (state, batch) -> (state, metrics). The step key is split off the state's RNG.

    No buffer donation: Orbax may still be reading the previous state's buffers on CPU, where
    host "copies" can alias device memory; these models are small enough not to need it.
    """

    @jax.jit
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
def _step_functions(mcfg, train_json: str) -> tuple[optax.GradientTransformation, Callable, Callable, optax.Schedule]:
    """(optimizer, jitted train_step, jitted eval_sums, schedule), cached per (model config, config.train)
    so repeated runs in one process (resume, tests) reuse the compiled steps."""
    tc = ml_collections.ConfigDict(json.loads(train_json))
    optimizer = make_optimizer(tc)
    train_loss, eval_sums = make_loss_fns(mcfg, tc)
    return optimizer, make_train_step(train_loss, optimizer), jax.jit(eval_sums), make_schedule(tc)


def evaluate(eval_sums: Callable, params: Any, val: np.ndarray, batch_size: int, seed: int) -> float:
    """Held-out loss (per predicted token) over every row of `val` [N, T], in fixed-size batches.

    The masking key of eval batch i is fold_in(key(seed), i): the same corruption at every evaluation,
    so the curve measures the model, not masking noise. The last batch is padded with ignored rows.
    """
    total, count = 0.0, 0.0
    base = jax.random.key(seed)
    for i, start in enumerate(range(0, len(val), batch_size)):
        rows = val[start : start + batch_size]
        valid = np.zeros(batch_size, np.float32)
        valid[: len(rows)] = 1.0
        if len(rows) < batch_size:
            filler = np.repeat(rows[:1], batch_size - len(rows), axis=0)
            rows = np.concatenate([rows, filler])
        s, c = eval_sums(params, jnp.asarray(rows), jnp.asarray(valid), jax.random.fold_in(base, i))
        total, count = total + float(s), count + float(c)
    return total / max(count, 1.0)


# ---------------------------------------------------------------------------------------------------
# Checkpoints


def keep_steps(cc: ml_collections.ConfigDict) -> tuple[int, ...]:
    """Steps checkpointed in addition to every `interval` and never deleted (e.g. log-spaced steps for a
    profile-over-training sweep; 0 is the untrained initialisation)."""
    return tuple(sorted({int(s) for s in (cc.get("keep_steps") or ())}))


def _manager(workdir: pathlib.Path, cc: ml_collections.ConfigDict) -> ocp.CheckpointManager:
    kept = keep_steps(cc)
    # The newest `max_to_keep` checkpoints (for resumption) plus the `keep_steps` ones (for analysis).
    policy = ocp.checkpoint_managers.LatestN(cc.max_to_keep) if not kept else \
        ocp.checkpoint_managers.AnyPreservationPolicy([ocp.checkpoint_managers.LatestN(cc.max_to_keep),
                                                       ocp.checkpoint_managers.CustomSteps(list(kept))])
    options = ocp.CheckpointManagerOptions(
        preservation_policy=policy, enable_async_checkpointing=cc.get("async_save", True), create=True,
    )
    return ocp.CheckpointManager((workdir / "checkpoints").absolute(), options=options,
                                 item_names=(STATE_ITEM, DATA_ITEM))


class CheckpointError(RuntimeError):
    """A checkpoint cannot be read or does not match the checksum recorded when it was saved."""


def state_digest(state: Any) -> str:
    """SHA-256 of a state pytree: every leaf's path, dtype, shape and bytes (on the host)."""
    h = hashlib.sha256()
    leaves, _ = jax.tree_util.tree_flatten_with_path(jax.device_get(state))
    for path, leaf in leaves:
        a = np.ascontiguousarray(leaf)
        h.update(f"{jax.tree_util.keystr(path)}\0{a.dtype.str}\0{a.shape}\0".encode())
        h.update(a.tobytes())
    return h.hexdigest()


def _restore(mngr: ocp.CheckpointManager, step: int, template: dict) -> tuple[dict, dict]:
    """(state, data) of checkpoint `step`; `CheckpointError` naming the step if it is unreadable or damaged."""
    abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=getattr(x, "sharding", None)),
                            template)
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


def _check_resume_config(workdir: pathlib.Path, config: ml_collections.ConfigDict) -> None:
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
    workdir: pathlib.Path | str,
    *,
    on_step: Callable[[int], None] | None = None,
) -> dict:
    """Trains (or resumes) in `workdir`; see `run`.

    Args:
      on_step: called with the global step after each step (and after its checkpoint, if any, has
        been handed to Orbax). An exception raised here aborts the run like a crash would.
    """
    workdir = pathlib.Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    with workdir_lock(workdir, "train"):
        return _train(config, workdir, on_step)


def _train(config: ml_collections.ConfigDict, workdir: pathlib.Path, on_step: Callable[[int], None] | None) -> dict:
    tc, cc = config.train, config.checkpoint
    t_start = time.perf_counter()

    data, split = load_data(config, workdir)
    mcfg = model_config(config, data)
    optimizer, train_step, eval_sums, schedule = _step_functions(mcfg, tc.to_json(sort_keys=True))

    _check_resume_config(workdir, config)
    atomic_write_text(workdir / "config.json", config.to_json_best_effort(indent=2))
    atomic_write_text(workdir / "model_config.json", json.dumps(_model_config_json(mcfg), indent=2))
    atomic_write_text(workdir / "data_split.json", json.dumps({"info": data.info, **split}))

    state = init_state(mcfg, optimizer, config.seed)
    n_params = int(sum(x.size for x in jax.tree.leaves(state["params"])))
    iterator = BatchIterator(data, tc.batch_size, config.seed, max_residues=config.data.get("max_residues"))
    metrics_path = workdir / "metrics.jsonl"
    mngr = _manager(workdir, cc)
    resumed_from = None
    try:
        restored = _restore_newest_good(mngr, state)
        if restored is not None and restored[3]:  # damaged newer checkpoints: out of the way of new saves
            mngr.close()
            for step in restored[3]:
                target = workdir / "checkpoints_damaged" / str(step)
                shutil.rmtree(target, ignore_errors=True)
                target.parent.mkdir(exist_ok=True)
                shutil.move(workdir / "checkpoints" / str(step), target)
                logging.warning("moved damaged checkpoint %d to %s; resuming from checkpoint %d", step, target,
                                restored[0])
            mngr = _manager(workdir, cc)
        latest = None if restored is None else restored[0]
        _truncate_metrics(metrics_path, latest)
        if latest is not None:
            _, state, data_state, _ = restored
            expected = BatchIterator.position_after(latest, iterator.steps_per_epoch)
            if {k: data_state[k] for k in expected} != expected or data_state["seed"] != config.seed:
                raise ValueError(f"checkpoint {latest}: data position {data_state} does not match step {latest}")
            iterator = BatchIterator.from_state(data, data_state, max_residues=config.data.get("max_residues"))
            resumed_from = int(latest)
        start = int(state["step"])
        kept = set(keep_steps(cc))
        if latest is None:  # a fresh start (a run resumed from a step-0 checkpoint has this record already)
            loss0 = evaluate(eval_sums, state["params"], data.val, tc.eval_batch_size, config.seed)
            _append_jsonl(metrics_path, {"kind": "eval", "step": 0, "loss": loss0,
                                         "time_s": time.perf_counter() - t_start})
            if 0 in kept:  # after the record: a kill in between starts afresh rather than losing it
                _save_checkpoint(mngr, 0, state, iterator)

        bar = tqdm(total=tc.steps, initial=start, disable=not tc.get("progress_bar", True),
                   desc=f"train {mcfg.__class__.__name__}", dynamic_ncols=True)
        pending, tokens, examples = [], 0, 0
        t_log, compile_s = time.perf_counter(), None
        for step in range(start + 1, tc.steps + 1):
            batch = next(iterator)
            state, m = train_step(state, jnp.asarray(batch))
            pending.append(m)
            if compile_s is None:  # the first step of a run compiles: keep it out of the throughput
                jax.block_until_ready(m)
                compile_s = time.perf_counter() - t_log
                t_log = time.perf_counter()
            else:
                tokens += int((batch != ptok.PAD_ID).sum()) if data.family == "esm2" else batch.size
                examples += batch.shape[0]
            if step % tc.log_interval == 0 or step == tc.steps:
                # The loss is averaged over every step since the last record (the same steps whether
                # or not the run was resumed in between), throughput over the timed ones.
                fetched = jax.device_get(pending)
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
                _append_jsonl(metrics_path, rec)
                bar.set_postfix(loss=f"{rec['loss']:.3f}", tok_s=f"{(rec['tokens_per_s'] or 0):.0f}")
                pending, tokens, examples, t_log = [], 0, 0, time.perf_counter()
            t_pause = time.perf_counter()
            if step % tc.eval_interval == 0 or step == tc.steps:
                loss = evaluate(eval_sums, state["params"], data.val, tc.eval_batch_size, config.seed)
                _append_jsonl(metrics_path, {"kind": "eval", "step": step, "loss": loss,
                                             "time_s": time.perf_counter() - t_start})
            if step % cc.interval == 0 or step == tc.steps or step in kept:
                _save_checkpoint(mngr, step, state, iterator)
            t_log += time.perf_counter() - t_pause  # evaluation and checkpointing are not training throughput
            bar.update(1)
            if on_step is not None:
                on_step(step)
        bar.close()
        mngr.wait_until_finished()
    finally:
        mngr.close()

    evals = [r for r in read_metrics(workdir) if r["kind"] == "eval"]
    result = {
        "family": data.family, "final_step": int(state["step"]), "resumed_from": resumed_from,
        "num_params": n_params, "eval_loss": [(r["step"], r["loss"]) for r in evals],
        "final_eval_loss": evals[-1]["loss"] if evals else None, "data": data.info,
        "compile_s": compile_s if tc.steps > start else None, "wall_time_s": time.perf_counter() - t_start,
        "workdir": str(workdir),
    }
    atomic_write_json(workdir / "train_result.json", result, checksum=True)
    plot_metrics(workdir)
    return result


def run(config: ml_collections.ConfigDict, workdir: pathlib.Path) -> dict:
    """Trains `config.model.family` ("esm2" masked LM | "igpt" autoregressive pixels) in `workdir`.

    Resumes from the latest checkpoint in `workdir/checkpoints` if there is one (exactly: same
    params, optimizer state, RNG and data position as an uninterrupted run).

    Returns:
      dict with final_step, resumed_from, num_params, eval_loss [(step, loss)], final_eval_loss,
      data summary, compile_s, wall_time_s (also written to workdir/train_result.json).
    """
    return train(config, workdir)


# ---------------------------------------------------------------------------------------------------
# Downstream


def load_config(workdir: pathlib.Path | str) -> ml_collections.ConfigDict:
    """The ConfigDict a run in `workdir` was started with."""
    return ml_collections.ConfigDict(json.loads((pathlib.Path(workdir) / "config.json").read_text()))


def load_trained(workdir: pathlib.Path | str, step: int | None = None) -> tuple[Any, Any, ml_collections.ConfigDict]:
    """The trained model of a workdir for extraction: (flax module, params, run config).

    Args:
      workdir: a `run` workdir.
      step: which checkpoint (default the latest).

    Returns:
      (`esm2.ESM2` or `igpt.IGPT` module, params (inner dict, float32 jax arrays), ConfigDict). For
      iGPT, quantize inputs with `palette.load_palette(workdir / "palette.npy")` and prepend the start
      token (`igpt.add_start_token`).
    """
    workdir = pathlib.Path(workdir)
    config = load_config(workdir)
    mcfg = _model_config_from_json(json.loads((workdir / "model_config.json").read_text()))
    with ocp.CheckpointManager((workdir / "checkpoints").absolute(), item_names=(STATE_ITEM, DATA_ITEM)) as mngr:
        template = jax.eval_shape(functools.partial(init_state, mcfg, make_optimizer(config.train), 0))
        if step is not None:
            state, _ = _restore(mngr, step, template)
        elif (restored := _restore_newest_good(mngr, template)) is not None:
            state = restored[1]
        else:
            raise FileNotFoundError(f"no checkpoint under {workdir / 'checkpoints'}")
    return build_model(mcfg), state["params"], config


def plot_metrics(
    workdir: pathlib.Path | str, out: pathlib.Path | str | None = None, title: str | None = None
) -> pathlib.Path:
    """Training loss (per log interval) and held-out loss vs step from metrics.jsonl -> PNG (default
    workdir/loss_curve.png)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    workdir = pathlib.Path(workdir)
    recs = read_metrics(workdir)
    tr = [(r["step"], r["loss"]) for r in recs if r["kind"] == "train"]
    ev = [(r["step"], r["loss"]) for r in recs if r["kind"] == "eval"]
    fig, ax = plt.subplots(figsize=(6, 4), dpi=120)
    if tr:
        ax.plot(*zip(*tr, strict=True), lw=1, alpha=0.6, label="train (mean over log interval)")
    if ev:
        ax.plot(*zip(*ev, strict=True), "o-", lw=1.5, ms=3, label="held-out")
    family = json.loads((workdir / "model_config.json").read_text())["family"]
    ax.set_xlabel("step")
    ax.set_ylabel("masked-token cross-entropy (nats)" if family == "esm2" else "next-pixel cross-entropy (nats)")
    ax.set_title(title or workdir.name)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    out = pathlib.Path(out) if out is not None else workdir / "loss_curve.png"
    fig.savefig(out)
    plt.close(fig)
    return out
