"""Representation store: pooled vectors for every layer, streamed batch by batch, resumable.

Layout of `<workdir>/representations/`:
  plan.json              the batch plan (example indices per batch) and a fingerprint of what is
                         extracted; written first. A restart with a different plan is refused.
  batches/00012.npz      one finished batch: reps (L+1, B, D) float32 + example indices; each written
                         to a temporary name and renamed, so a file that exists is complete.
  batches/p00001/00013.npz   the same, written by process 1 of a multi-process job (batch b belongs to
                         process b % process_count); every reader looks in both places.
  layer_000.npy ...      (N, D) per layer, in dataset order, written after the last batch.
  labels.npy, ids.json   labels (if any) and example ids in dataset order.
  manifest.json          written LAST, listing every file with its shape, size and SHA-256: a store
                         without it is incomplete and is never read as a result.

Processes (`experiments/distributed.py`): the batch files are per process; plan.json, the layer files,
labels.npy, ids.json and manifest.json are shared and written by process 0 only (`open_plan`,
`finalize` are no-ops elsewhere; `open_plan` ends with a barrier so every process sees the plan).

Paths: the directory may be local or on an object store (`gs://...`, any `etils.epath` path); every file
goes through `experiments.files` (atomic, checksummed). The layer files are memory-mapped, which needs a
local file system, so a remote store differs in two places, by design:
  finalize  assembles each layer in a local scratch file (a temporary directory under
            `tempfile.gettempdir()`, i.e. $TMPDIR: it needs room for the layers), hashes it there, uploads it
            atomically (`files.publish`) and checks the uploaded size against the manifest; the scratch
            directory is removed whatever happens.
  load      reads each layer whole into memory (`mmap` does not apply), one download per file, its SHA-256
            checked on the bytes read (`files.read_recorded_npy`); memory must hold the layers.
A local store is unchanged: layers memory-mapped in place, renamed into place, no copy.

Integrity: batch files and plan.json / manifest.json carry their own checksums (`experiments.files`); the
layer files, labels.npy and ids.json are checked against the manifest's sizes on every `load` and
against its SHA-256s when `load(verify=True)` (the default: one streamed, multi-threaded pass over the
files, about 1 GB/s per core). A damaged file is a `CorruptFileError` naming it and what to delete.
A full disk during `finalize` is an `OSError` naming the layer file (its space is reserved before it is
memory-mapped) and leaves the batches intact: free space and re-run to finish.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import hashlib
import json
import os
import tempfile
from collections.abc import Sequence
from typing import Any, NamedTuple

import numpy as np
from etils import epath
from tqdm.auto import tqdm

from experiments import distributed, files
from experiments.files import atomic_save_npy, atomic_save_npz, atomic_write_json

MANIFEST = "manifest.json"
PLAN = "plan.json"


class StoreError(RuntimeError):
    """The store is incomplete, inconsistent with the requested extraction, or corrupt."""


def fingerprint(obj: Any) -> str:
    """A short stable hash of a JSON-able description (model, data, pooling) of an extraction."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


POINTER = "store.json"


def store_dir(workdir: epath.PathLike) -> epath.Path:
    """The store a workdir uses: `workdir/representations`, or the shared store its `store.json` names
    (sweep entries with the same extraction fingerprint share one, `shared_store_home`). A remote one has its
    ".." collapsed (`files.canonical_path`): an object store would not interpret it."""
    workdir = epath.Path(workdir)
    pointer = workdir / POINTER
    if pointer.is_file():
        record = files.read_json(pointer, fix=f"delete it and re-run (the entry then extracts into {workdir})")
        linked = workdir / record["representations"]
        return linked if files.local_path(workdir) is not None else files.canonical_path(linked)
    return workdir / "representations"


def shared_store_home(stores: epath.PathLike, extraction_fingerprint: str) -> epath.Path:
    """The directory of the store of one extraction fingerprint among shared stores: `stores/<fingerprint>/`
    holds `representations/` and whatever else produced it (a fitted iGPT palette)."""
    return epath.Path(stores) / extraction_fingerprint


def point_to_store(workdir: epath.PathLike, home: epath.PathLike, extraction_fingerprint: str) -> None:
    """Makes `workdir` use the store in `home` (a relative link in `workdir/store.json`, so the tree can move)."""
    workdir = epath.Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    relative = files.relative_path(epath.Path(home) / "representations", workdir)
    atomic_write_json(workdir / POINTER, {"representations": relative, "fingerprint": extraction_fingerprint},
                      checksum=True)


def _without_locations(obj: Any) -> Any:
    """`obj` without its "locations" entries, at any depth: where files were found is recorded in the
    description but is not part of what was extracted, so a moved checkout or a relatively named workdir
    resumes."""
    if isinstance(obj, dict):
        return {key: _without_locations(value) for key, value in obj.items() if key != "locations"}
    if isinstance(obj, list | tuple):
        return [_without_locations(value) for value in obj]
    return obj


def open_plan(directory: epath.PathLike, batches: Sequence[Sequence[int]], description: dict) -> None:
    """Writes plan.json (process 0), or checks that an existing one describes the same extraction (every
    process, after a barrier that waits for process 0's plan)."""
    directory = epath.Path(directory)
    plan = {"fingerprint": fingerprint(_without_locations(description)), "description": description,
            "batches": [list(map(int, b)) for b in batches]}
    path = directory / PLAN
    if distributed.is_writer() and not path.exists():
        atomic_write_json(path, plan, checksum=True)
    distributed.barrier("store: plan written")
    if path.exists():
        old = files.read_json(path, fix=f"delete {directory} and re-run the extraction")
        if old["fingerprint"] != plan["fingerprint"] or old["batches"] != plan["batches"]:
            raise StoreError(
                f"{directory} holds a partial extraction of something else (fingerprint {old['fingerprint']} "
                f"vs {plan['fingerprint']}); use another workdir or delete {directory}"
            )


def batch_owner(index: int, process_count: int) -> int:
    """The process that stores batch `index`."""
    return index % process_count


def batch_path(directory: epath.PathLike, index: int, *, process: int = 0, process_count: int = 1) -> epath.Path:
    """Where `process` of `process_count` writes batch `index` (a single process: directly in batches/)."""
    folder = epath.Path(directory) / "batches"
    return (folder if process_count == 1 else folder / f"p{process:05d}") / f"{index:05d}.npz"


def _batch_files(directory: epath.PathLike) -> dict[int, epath.Path]:
    """Every stored batch, whichever process wrote it: index -> file."""
    folder = epath.Path(directory) / "batches"
    if not folder.is_dir():
        return {}
    return {int(p.stem): p for pattern in ("*.npz", "p[0-9]*/*.npz") for p in sorted(folder.glob(pattern))}


def _stored_batch(directory: epath.PathLike, index: int) -> epath.Path:
    return _batch_files(directory).get(index, batch_path(directory, index))


def finished_batches(directory: epath.PathLike) -> set[int]:
    """Indices of batches whose files exist (complete by construction: written atomically), of every process."""
    return set(_batch_files(directory))


def write_batch(directory: epath.PathLike, index: int, reps: np.ndarray, example_indices: np.ndarray, *,
                process: int = 0, process_count: int = 1) -> None:
    """Stores one batch: reps (L+1, B, D), example_indices (B,), in `process`'s own folder."""
    reps = np.asarray(reps, np.float32)
    if reps.ndim != 3 or reps.shape[1] != len(example_indices):
        raise StoreError(f"batch {index}: reps shape {reps.shape} does not match {len(example_indices)} examples")
    if not np.isfinite(reps).all():
        raise StoreError(f"batch {index}: the model produced NaN/inf representations")
    atomic_save_npz(batch_path(directory, index, process=process, process_count=process_count), reps=reps,
                    indices=np.asarray(example_indices, np.int64))


def read_batch(directory: epath.PathLike, index: int) -> np.ndarray:
    """The stored (L+1, B, D) float32 representations of batch `index` (checksum verified)."""
    path = _stored_batch(directory, index)
    return files.load_npz(path, fix=_batch_fix(path))["reps"]


def _batch_fix(path: epath.PathLike) -> str:
    return f"delete {path} and re-run the extraction (that batch is recomputed, the others are kept)"


def _layer_fix(directory: epath.Path) -> str:
    return (f"delete {directory / MANIFEST} and re-run the extraction to rebuild the layer files from the stored "
            f"batches (or delete {directory} to extract again from scratch)")


def _hash_files(paths: Sequence[epath.PathLike], desc: str, work: Any) -> list:
    """work(path, progress) for every path, on a few threads (hashlib releases the GIL), with one progress bar."""
    total = sum(files.file_size(p) for p in paths)
    with tqdm(total=total, desc=desc, unit="B", unit_scale=True, dynamic_ncols=True, leave=False) as bar, \
            concurrent.futures.ThreadPoolExecutor(max(1, min(8, os.cpu_count() or 1))) as pool:
        return list(pool.map(lambda p: work(p, bar.update), paths))


def finalize(directory: epath.PathLike, n_examples: int, *, labels: np.ndarray | None, ids: Sequence[str],
             metadata: dict) -> None:
    """Assembles per-layer arrays in dataset order from the batch files, then writes the manifest (process 0;
    the other processes return at once). A remote `directory`: each layer is assembled in local scratch and
    uploaded (module docstring)."""
    if not distributed.is_writer():
        return
    directory = epath.Path(directory)
    plan = files.read_json(directory / PLAN, fix=f"delete {directory} and re-run the extraction")
    n_batches = len(plan["batches"])
    missing = sorted(set(range(n_batches)) - finished_batches(directory))
    if missing:
        raise StoreError(f"cannot finalize {directory}: batches {missing[:10]} are missing")
    if sorted(i for batch in plan["batches"] for i in batch) != list(range(n_examples)):
        raise StoreError(f"the plan of {directory} does not cover examples 0..{n_examples - 1} exactly once")
    stored = _batch_files(directory)
    first = files.load_npz(stored[0], fix=_batch_fix(stored[0]))["reps"]
    n_layers, _, dim = first.shape
    del first
    names = [f"layer_{layer:03d}.npy" for layer in range(n_layers)]
    with contextlib.ExitStack() as scratch_dir:
        # Memory maps need a local file system: a local store assembles its layers in place, a remote one in a
        # local scratch directory that is removed on the way out.
        scratch = files.local_path(directory) or files.local_path(
            scratch_dir.enter_context(tempfile.TemporaryDirectory(prefix="idjax-layers-")))
        records = _assemble_layers(directory, scratch, names, stored, plan, n_examples, dim)
    shapes = {name: [n_examples, int(dim)] for name in names}
    checksums = dict(zip(names, records, strict=True))
    if labels is not None:
        checksums["labels.npy"] = atomic_save_npy(directory / "labels.npy", np.asarray(labels))
        shapes["labels.npy"] = [len(labels)]
    atomic_write_json(directory / "ids.json", list(map(str, ids)))
    checksums["ids.json"] = files.file_record(directory / "ids.json")
    shapes["ids.json"] = [len(ids)]
    manifest = {"n_examples": n_examples, "n_layers": int(n_layers), "dim": int(dim), "files": shapes,
                "checksums": checksums, "fingerprint": plan["fingerprint"], "metadata": metadata}
    atomic_write_json(directory / MANIFEST, manifest, checksum=True)


def _assemble_layers(directory: epath.Path, scratch: Any, names: Sequence[str], stored: dict[int, epath.Path],
                     plan: dict, n_examples: int, dim: int) -> list[dict]:
    """Streams the batches into one memory-mapped (n_examples, dim) file per layer in the local directory
    `scratch`, then publishes each as `directory/<name>` (`files.publish`: a rename, or an upload); returns
    their size + SHA-256 records, hashed before publishing."""
    # Batch by batch, so memory stays at one batch even for 90k examples x 37 layers x 2560 dims (34 GB);
    # each file is published when complete.
    tmp_paths = [scratch / f".{name}.tmp" for name in names]
    try:
        outputs = []
        for tmp in tmp_paths:
            try:
                out = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.float32, shape=(n_examples, dim))
            except OSError as e:
                raise OSError(e.errno, f"{e.strerror}: cannot create {tmp} (free space and re-run to resume)",
                              str(tmp)) from e
            # Disk space is claimed now: a full disk here is an OSError, not a SIGBUS in the copy below.
            files.preallocate(tmp, out.offset + out.nbytes)
            outputs.append(out)
        for b, rows_planned in enumerate(plan["batches"]):
            path = stored[b]
            part = files.load_npz(path, fix=_batch_fix(path))
            reps, rows = part["reps"], part["indices"]
            if rows.tolist() != rows_planned:
                raise files.CorruptFileError(f"{path} holds examples {rows[:5].tolist()}..., the plan says "
                                             f"{rows_planned[:5]}...: {_batch_fix(path)}")
            if reps.shape[0] != len(names) or reps.shape[2] != dim:
                raise StoreError(f"batch {b} has shape {reps.shape}, batch 0 has ({len(names)}, *, {dim})")
            for layer, out in enumerate(outputs):
                out[rows] = reps[layer]
        for out in outputs:
            out.flush()
        del outputs, out  # closes the memory maps before their files are hashed and published
        records = _hash_files(tmp_paths, "checksum layers", lambda p, progress: {
            "bytes": files.file_size(p), "sha256": files.sha256_file(p, progress)})
        for tmp, name, record in zip(tmp_paths, names, records, strict=True):
            files.publish(tmp, directory / name)
            files.check_size(directory / name, record, fix=f"re-run the extraction to publish {name} again")
        return records
    finally:
        for tmp in tmp_paths:  # a failed finalize gives its space back; the batches stay for the re-run
            tmp.unlink(missing_ok=True)


class Representations(NamedTuple):
    """layers: list of (N, D) float32 arrays (input embedding first); labels: (N,) or None."""

    layers: list[np.ndarray]
    labels: np.ndarray | None
    ids: list[str]
    manifest: dict


def is_complete(directory: epath.PathLike) -> bool:
    return (epath.Path(directory) / MANIFEST).is_file()


def read_manifest(directory: epath.PathLike) -> dict:
    """The manifest of a finished store, checked against its own checksum."""
    directory = epath.Path(directory)
    return files.read_json(directory / MANIFEST, fix=f"delete it and re-run the extraction to rewrite it from the "
                                                     f"stored batches (or delete {directory} to start over)")


def load(directory: epath.PathLike, *, mmap: bool = True, verify: bool = True) -> Representations:
    """Reads a finished store; refuses an incomplete or damaged one.

    Args:
      mmap: memory-map the layer files (read on access) instead of reading them into memory. A remote store
        is always read into memory (module docstring).
      verify: check every file against the manifest's SHA-256 (one streamed pass, multi-threaded, with
        a progress bar: ~30 s for 34 GB on one core; a remote layer: on the bytes downloaded to load it).
        Sizes are always checked.

    Raises:
      StoreError if the store is incomplete; CorruptFileError naming a damaged file and what to delete.
    """
    directory = epath.Path(directory)
    if not is_complete(directory):
        raise StoreError(f"{directory} has no {MANIFEST}: the extraction did not finish (re-run it to resume)")
    manifest = read_manifest(directory)
    fix = _layer_fix(directory)
    checksums = manifest.get("checksums")
    if checksums is None:
        raise files.CorruptFileError(f"{directory / MANIFEST} records no checksums (written by an older version, "
                                     f"whose batch files have none either): delete {directory} and re-run the "
                                     "extraction")
    for name, record in checksums.items():
        files.check_size(directory / name, record, fix=fix)
    local = files.local_path(directory)
    layer_names = [f"layer_{layer:03d}.npy" for layer in range(manifest["n_layers"])]
    if verify:
        # A remote layer is verified on the bytes downloaded to load it, not downloaded twice.
        names = [name for name in checksums if local is not None or name not in layer_names]

        def check(path: epath.Path, progress: Any) -> None:
            files.verify_file(path, checksums[path.name], fix=fix, progress=progress)

        _hash_files([directory / name for name in names], "verify store", check)
    layers = []
    for name in layer_names:
        if local is None:
            arr = files.read_recorded_npy(directory / name, checksums[name], fix=fix, verify=verify)
        else:
            try:
                arr = np.load(local / name, mmap_mode="r" if mmap else None, allow_pickle=False)
            except (ValueError, OSError, EOFError) as e:
                raise files.CorruptFileError(f"{directory / name} is damaged: unreadable ({e}). {fix}") from e
        if list(arr.shape) != manifest["files"][name]:
            raise StoreError(f"{directory / name} has shape {arr.shape}, manifest says {manifest['files'][name]}")
        layers.append(arr)
    labels = None
    if "labels.npy" in manifest["files"]:
        try:
            with (directory / "labels.npy").open("rb") as f:
                labels = np.load(f, allow_pickle=False)
        except (ValueError, OSError, EOFError) as e:
            raise files.CorruptFileError(f"{directory / 'labels.npy'} is damaged: unreadable ({e}). {fix}") from e
    ids = files.read_json(directory / "ids.json", fix=fix)
    return Representations(layers, labels, ids, manifest)
