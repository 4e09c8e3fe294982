"""Representation store: pooled vectors for every layer, streamed batch by batch, resumable.

Layout of `<workdir>/representations/`:
  plan.json              the batch plan (example indices per batch) and a fingerprint of what is
                         extracted; written first. A restart with a different plan is refused.
  batches/00012.npz      one finished batch: reps (L+1, B, D) float32 + example indices; each written
                         to a temporary name and renamed, so a file that exists is complete.
  layer_000.npy ...      (N, D) per layer, in dataset order, written after the last batch.
  labels.npy, ids.json   labels (if any) and example ids in dataset order.
  manifest.json          written LAST, listing every file with its shape: a store without it is
                         incomplete and is never read as a result.
"""

from __future__ import annotations

import hashlib
import json
import os
import pathlib
from collections.abc import Sequence
from typing import Any, NamedTuple

import numpy as np

from idjax.files import atomic_save_npy, atomic_save_npz, atomic_write_json

MANIFEST = "manifest.json"
PLAN = "plan.json"


class StoreError(RuntimeError):
    """The store is incomplete, inconsistent with the requested extraction, or corrupt."""


def fingerprint(obj: Any) -> str:
    """A short stable hash of a JSON-able description (model, data, pooling) of an extraction."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


def store_dir(workdir: pathlib.Path) -> pathlib.Path:
    return pathlib.Path(workdir) / "representations"


def open_plan(directory: pathlib.Path, batches: Sequence[Sequence[int]], description: dict) -> None:
    """Writes plan.json, or checks that an existing one describes the same extraction."""
    plan = {"fingerprint": fingerprint(description), "description": description,
            "batches": [list(map(int, b)) for b in batches]}
    path = directory / PLAN
    if path.exists():
        old = json.loads(path.read_text())
        if old["fingerprint"] != plan["fingerprint"] or old["batches"] != plan["batches"]:
            raise StoreError(
                f"{directory} holds a partial extraction of something else (fingerprint {old['fingerprint']} "
                f"vs {plan['fingerprint']}); use another workdir or delete {directory}"
            )
        return
    atomic_write_json(path, plan)


def batch_path(directory: pathlib.Path, index: int) -> pathlib.Path:
    return directory / "batches" / f"{index:05d}.npz"


def finished_batches(directory: pathlib.Path) -> set[int]:
    """Indices of batches whose files exist (complete by construction: written atomically)."""
    folder = directory / "batches"
    if not folder.is_dir():
        return set()
    return {int(p.stem) for p in folder.glob("*.npz")}


def write_batch(directory: pathlib.Path, index: int, reps: np.ndarray, example_indices: np.ndarray) -> None:
    """Stores one batch: reps (L+1, B, D), example_indices (B,)."""
    reps = np.asarray(reps, np.float32)
    if reps.ndim != 3 or reps.shape[1] != len(example_indices):
        raise StoreError(f"batch {index}: reps shape {reps.shape} does not match {len(example_indices)} examples")
    if not np.isfinite(reps).all():
        raise StoreError(f"batch {index}: the model produced NaN/inf representations")
    atomic_save_npz(batch_path(directory, index), reps=reps, indices=np.asarray(example_indices, np.int64))


def finalize(directory: pathlib.Path, n_examples: int, *, labels: np.ndarray | None, ids: Sequence[str],
             metadata: dict) -> None:
    """Assembles per-layer arrays in dataset order from the batch files, then writes the manifest."""
    plan = json.loads((directory / PLAN).read_text())
    missing = sorted(set(range(len(plan["batches"]))) - finished_batches(directory))
    if missing:
        raise StoreError(f"cannot finalize {directory}: batches {missing[:10]} are missing")
    n_batches = len(plan["batches"])
    order = np.concatenate([np.load(batch_path(directory, b))["indices"] for b in range(n_batches)])
    if sorted(order.tolist()) != list(range(n_examples)):
        raise StoreError(f"batches of {directory} do not cover examples 0..{n_examples - 1} exactly once")
    # Stream batch by batch into one memory-mapped file per layer, so memory stays at one batch even
    # for 90k examples x 37 layers x 2560 dims (34 GB); each file is renamed into place when complete.
    with np.load(batch_path(directory, 0)) as first:
        n_layers, _, dim = first["reps"].shape
    names = [f"layer_{layer:03d}.npy" for layer in range(n_layers)]
    tmp_paths = [directory / f".{name}.tmp" for name in names]
    outputs = [np.lib.format.open_memmap(t, mode="w+", dtype=np.float32, shape=(n_examples, dim)) for t in tmp_paths]
    for b in range(n_batches):
        with np.load(batch_path(directory, b)) as part:
            reps, rows = part["reps"], part["indices"]
        if reps.shape[0] != n_layers or reps.shape[2] != dim:
            raise StoreError(f"batch {b} has shape {reps.shape}, batch 0 has ({n_layers}, *, {dim})")
        for layer, out in enumerate(outputs):
            out[rows] = reps[layer]
    for out in outputs:
        out.flush()
    del outputs  # closes the memory maps before their files are renamed into place
    for tmp, name in zip(tmp_paths, names, strict=True):
        os.replace(tmp, directory / name)
    files = {name: [n_examples, int(dim)] for name in names}
    if labels is not None:
        atomic_save_npy(directory / "labels.npy", np.asarray(labels))
        files["labels.npy"] = [len(labels)]
    atomic_write_json(directory / "ids.json", list(map(str, ids)))
    files["ids.json"] = [len(ids)]
    manifest = {"n_examples": n_examples, "n_layers": int(n_layers), "dim": int(dim),
                "files": files, "fingerprint": plan["fingerprint"], "metadata": metadata}
    atomic_write_json(directory / MANIFEST, manifest)


class Representations(NamedTuple):
    """layers: list of (N, D) float32 arrays (input embedding first); labels: (N,) or None."""

    layers: list[np.ndarray]
    labels: np.ndarray | None
    ids: list[str]
    manifest: dict


def is_complete(directory: pathlib.Path) -> bool:
    return (pathlib.Path(directory) / MANIFEST).is_file()


def load(directory: pathlib.Path, *, mmap: bool = True) -> Representations:
    """Reads a finished store; refuses an incomplete one."""
    directory = pathlib.Path(directory)
    if not is_complete(directory):
        raise StoreError(f"{directory} has no {MANIFEST}: the extraction did not finish (re-run it to resume)")
    manifest = json.loads((directory / MANIFEST).read_text())
    layers = []
    for layer in range(manifest["n_layers"]):
        name = f"layer_{layer:03d}.npy"
        arr = np.load(directory / name, mmap_mode="r" if mmap else None)
        if list(arr.shape) != manifest["files"][name]:
            raise StoreError(f"{directory / name} has shape {arr.shape}, manifest says {manifest['files'][name]}")
        layers.append(arr)
    labels = np.load(directory / "labels.npy", allow_pickle=False) if "labels.npy" in manifest["files"] else None
    ids = json.loads((directory / "ids.json").read_text())
    return Representations(layers, labels, ids, manifest)
