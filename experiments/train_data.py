"""Training corpora: the held-out split, the loaders, and the deterministic, checkpointable batches.

A family trains on one kind of data (`TRAINING_DATA` in its module): "proteins" (FASTA -> residue ids,
masked LM) or "images" (quantized pixels, next-pixel prediction). `BatchIterator`'s position is the
pair (epoch, index), so a batch depends only on (seed, epoch, index) and a resumed run sees the same
batches as an uninterrupted one.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Sequence
from typing import Any

import ml_collections
import numpy as np
from etils import epath

from experiments.probe import split_indices
from models import palette as palette_lib
from models import protein_tokenizer as ptok

DATA_KINDS = ("proteins", "images")

@dataclasses.dataclass(frozen=True)
class TrainData:
    """A training corpus and its held-out split.

    Attributes:
      kind: "proteins" or "images" (`DATA_KINDS`).
      train: proteins: tuple of int32 residue-id arrays (no specials, uncropped); images: int32
        [N, T] pixel (palette) ids in raster order.
      val: model-ready held-out rows, int32 [N_val, T]: proteins `<cls> crop <eos>` right-padded;
        images pixel ids.
      seq_len: T, fixed for every batch (one jit compilation).
      val_labels: int [N_val] class labels (images) or None.
      info: JSON-able summary (sizes, dedup counts, palette size...).
    """

    kind: str
    train: Any
    val: np.ndarray
    seq_len: int
    val_labels: np.ndarray | None
    info: dict

    @property
    def num_train(self) -> int:
        return len(self.train)

    def real_tokens(self, batch: np.ndarray) -> int:
        """Tokens of a batch [B, T] that are not padding (throughput counts only these)."""
        return int((batch != ptok.PAD_ID).sum()) if self.kind == "proteins" else int(batch.size)


def read_fasta(path: str | os.PathLike) -> list[tuple[str, str]]:
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


def load_protein_data(data_config: ml_collections.ConfigDict) -> tuple[TrainData, dict]:
    """The masked-LM corpus: FASTA -> residue ids, exact duplicates removed, seeded held-out split.

    Exact duplicate sequences (the E. coli proteome has several, e.g. the insA/insB copies of IS
    elements) are reduced to one copy BEFORE splitting, so no held-out sequence is also a training
    sequence. Near-identical paralogs are not filtered (the proteome has no homology-reduced split).
    Held-out rows are cropped to their first `max_residues` residues (deterministic); training
    sequences are cropped at a random, seeded offset each time they are drawn (`BatchIterator`).

    With `data_config.scope_fasta` set, SCOPe domains join the corpus, split by FAMILY: a seeded
    fraction `scope_holdout_families` of the families is held out whole, so a held-out domain's
    superfamily was learned only from other families (the remote-homology setting) and its superfamily
    label still means something when the held-out domains are analysed. Training proteins that contain
    a held-out domain's sequence verbatim are dropped too (SCOPe domains are cut from such proteins).
    The held-out domains' ids are written to data_split.json ("scope_holdout_ids") for the analysis.
    """
    records = read_fasta(data_config.fasta)
    if data_config.get("max_sequences"):
        records = records[: data_config.max_sequences]
    unique = _unique_records(records)
    ids = [ptok.residue_ids(seq, seq_id=h.split()[0], unknown="X")[0] for h, seq in unique]
    train_idx, val_idx = split_indices(len(ids), test_fraction=data_config.val_fraction, seed=data_config.split_seed,
                                       stratify=False)
    max_res = int(data_config.max_residues)
    seq_len = ptok.round_up(max_res + 2, 8)
    cap = data_config.get("max_eval_examples") or len(val_idx)
    scope_fasta = data_config.get("scope_fasta")
    if scope_fasta:
        cap = -(-cap // 2)  # half the evaluated rows from each source
    val_idx = val_idx[:cap]
    val_rows = [ids[i][:max_res] for i in val_idx]
    train = [ids[i] for i in train_idx]
    train_names = [unique[i][0].split()[0] for i in train_idx]
    lengths = np.array([len(x) for x in ids])
    info = {
        "source": str(data_config.fasta), "records": len(records), "unique_sequences": len(unique),
        "duplicates_removed": len(records) - len(unique), "train_sequences": len(train),
        "val_sequences": int(len(val_idx)), "max_residues": max_res, "seq_len": seq_len,
        "longer_than_crop": int((lengths > max_res).sum()),
    }
    split = {"train_ids": train_names, "val_ids": [unique[i][0].split()[0] for i in val_idx]}
    if scope_fasta:
        scope_train, scope_val, scope_split = _scope_family_split(data_config, [unique[i][1] for i in train_idx])
        contained = set(scope_split.pop("proteins_containing_holdout"))
        kept = [i for i in range(len(train)) if i not in contained]
        scope_ids = [ptok.residue_ids(seq, seq_id=sid, unknown="X")[0] for sid, seq in scope_train]
        train = [train[i] for i in kept] + scope_ids
        split["train_ids"] = [train_names[i] for i in kept] + [sid for sid, _ in scope_train]
        held = scope_val[:cap]
        val_rows += [ptok.residue_ids(seq, seq_id=sid, unknown="X")[0][:max_res] for sid, seq in held]
        split["val_ids"] += [sid for sid, _ in held]
        split.update(scope_split)
        info.update({"scope_source": str(scope_fasta), "scope_train_domains": len(scope_train),
                     "scope_holdout_domains": len(scope_val),
                     "scope_holdout_families": data_config.scope_holdout_families,
                     "proteins_dropped_containing_holdout": len(contained), "train_sequences": len(train),
                     "val_sequences": len(val_rows)})
    val = np.stack([wrap_and_pad(row, seq_len) for row in val_rows])
    return TrainData("proteins", tuple(train), val, seq_len, None, info), split


def _unique_records(records: Sequence[tuple[str, str]]) -> list[tuple[str, str]]:
    """The first record of each distinct (case-insensitive) sequence, in file order."""
    seen: set[str] = set()
    unique = []
    for header, seq in records:
        if seq.upper() not in seen:
            seen.add(seq.upper())
            unique.append((header, seq))
    return unique


def _scope_family_split(data_config: ml_collections.ConfigDict, other_train_sequences: Sequence[str]):
    """SCOPe domains split by family: (train [(sid, seq)], held-out [(sid, seq)] in a seeded order, record).

    The record lists the held-out families and domain ids, and (key "proteins_containing_holdout", popped
    by the caller) the indices of `other_train_sequences` that contain a held-out domain verbatim.
    """
    from experiments import protein_datasets

    scope = protein_datasets.read_scope_astral(data_config.scope_fasta)
    families = scope.labels["family"]
    n_families = int(families.max()) + 1
    fraction = float(data_config.scope_holdout_families)
    if not 0.0 < fraction < 1.0:
        raise ValueError(f"data.scope_holdout_families must be in (0, 1), got {fraction}")
    rng = np.random.default_rng(data_config.split_seed)
    held_families = np.sort(rng.permutation(n_families)[: max(1, round(n_families * fraction))])
    held = np.isin(families, held_families)
    held_order = rng.permutation(np.flatnonzero(held))
    train_rows = [(scope.ids[i], scope.sequences[i]) for i in np.flatnonzero(~held)]
    held_rows = [(scope.ids[i], scope.sequences[i]) for i in held_order]
    # Held-out domains cut verbatim from a training protein: found through 12-mer anchors, then confirmed.
    anchor = 12
    by_kmer: dict[str, list[int]] = {}
    for row, seq in enumerate(other_train_sequences):
        seq = seq.upper()
        for start in range(len(seq) - anchor + 1):
            by_kmer.setdefault(seq[start : start + anchor], []).append(row)
    containing = set()
    for _, domain in held_rows:
        for row in by_kmer.get(domain[:anchor], ()):
            if domain in other_train_sequences[row].upper():
                containing.add(row)
    record = {"scope_holdout_family_names": [scope.label_names["family"][f] for f in held_families],
              "scope_holdout_ids": sorted(sid for sid, _ in held_rows),
              "proteins_containing_holdout": sorted(containing)}
    return train_rows, held_rows, record


def load_image_splits(data_config: ml_collections.ConfigDict):
    """(train ImageDataset, val ImageDataset) as RGB uint8, resized to `data_config.size` if set.

    Datasets with a predefined test split (CIFAR-10 ConvNetJS: batches 0-3 / 50) use it; the others
    (sklearn digits, the MNIST test set that is all we have offline) get a seeded split.
    """
    from experiments import image_datasets

    size = data_config.get("size")
    if data_config.name in ("cifar10", "cifar10_convnetjs"):
        train = image_datasets.load_image_dataset(data_config.name, data_config.root, "train", size=size, rgb=True)
        val = image_datasets.load_image_dataset(data_config.name, data_config.root, "test", size=size, rgb=True)
    else:
        full = image_datasets.load_image_dataset(data_config.name, data_config.get("root"), data_config.get("split"),
                                                 size=size, rgb=True)
        train_idx, val_idx = split_indices(len(full), test_fraction=data_config.val_fraction,
                                           seed=data_config.split_seed, stratify=False)
        train, val = full.subset(train_idx), full.subset(val_idx)
    if data_config.get("max_train_examples"):
        train = train.subset(slice(0, data_config.max_train_examples))
    if data_config.get("max_eval_examples"):
        val = val.subset(slice(0, data_config.max_eval_examples))
    return train, val


def load_image_data(data_config: ml_collections.ConfigDict, workdir: epath.PathLike | None) -> tuple[TrainData, dict]:
    """Quantized images: palette fitted by k-means on the TRAINING split only (saved to workdir)."""
    train, val = load_image_splits(data_config)
    palette_path = None if workdir is None else epath.Path(workdir) / "palette.npy"
    if palette_path is not None and palette_path.is_file():
        colours = palette_lib.load_palette(palette_path)  # resume: never refit
    else:
        colours = palette_lib.fit_palette(train.images, data_config.n_colors, seed=data_config.split_seed)
        if palette_path is not None:
            palette_lib.save_palette(palette_path, colours)
    train_pixels = palette_lib.quantize(train.images, colours).astype(np.int32)
    val_pixels = palette_lib.quantize(val.images, colours).astype(np.int32)
    info = {"source": data_config.name, "train_images": int(train_pixels.shape[0]),
            "val_images": int(val_pixels.shape[0]), "image_shape": list(train.images.shape[1:3]),
            "n_colors": int(data_config.n_colors), "seq_len": int(train_pixels.shape[1]),
            "colours_used_train": int(np.unique(train_pixels).size)}
    split = {"train_labels_counts": np.bincount(train.labels).tolist(),
             "val_labels_counts": np.bincount(val.labels).tolist(),
             "train_ids": list(train.ids), "val_ids": list(val.ids)}
    data = TrainData("images", train_pixels, val_pixels, int(train_pixels.shape[1]), np.asarray(val.labels), info)
    return data, split


def load_data(kind: str, data_config: ml_collections.ConfigDict,
              workdir: epath.PathLike | None = None) -> tuple[TrainData, dict]:
    """The corpus of `kind` ("proteins" | "images"; for images, the palette in `workdir`)."""
    if kind == "proteins":
        return load_protein_data(data_config)
    if kind == "images":
        return load_image_data(data_config, workdir)
    raise ValueError(f"unknown training data kind {kind!r}: one of {', '.join(DATA_KINDS)}")


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
        if self.data.kind == "images":
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
