"""Datasets: a dataset is a function of the data config that returns `Examples`.

The built-in datasets (`LOADERS`: scope, uniprot, digits, mnist, cifar10, imagenet32, scope_text) and
the researcher's own (`--config.data.source=mypackage.module:load`) go through the same path:

    def load(data_config: ml_collections.ConfigDict) -> Examples

`load_examples(data_config)` calls the configured loader, checks what it returned (type, lengths,
integer labels), applies the selection knobs that every source shares (`min_class_size`,
`per_class`, `max_examples`, `seed`) and recodes the labels to 0..C-1 over the kept examples.
`identity(examples)` is what the representation store's fingerprint records about the data (the
loader's name, its description, a digest of the ids, labels and groups), so changed data re-extracts.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import ml_collections
import numpy as np
from etils import epath


@dataclasses.dataclass(frozen=True)
class Examples:
    """The examples to analyse, as a loader returns them.

    inputs: N protein sequences or texts (a sequence of str), or images (uint8 [N, H, W, C]).
    labels: (N,) non-negative integer class codes, or None.
    ids: N distinct strings naming the examples (default: "<dataset>:<index>").
    label_names: the name of each class code (`label_names[c]` for code c), or None.
    groups: (N,) integer codes of groups whose members never vote for each other in remote-homology
      probes (e.g. the SCOPe family), or None.
    description: JSON-able facts about the data (file, version, ...), stored with the results.

    `load_examples` returns them with ids as a tuple of str and labels recoded to 0..C-1 (int64).
    """

    inputs: Any
    labels: np.ndarray | Sequence[int] | None = None
    ids: Sequence[str] | None = None
    label_names: Sequence[str] | None = None
    groups: np.ndarray | Sequence[int] | None = None
    description: Mapping[str, Any] | None = None

    def __len__(self) -> int:
        return len(self.inputs)


Loader = Callable[[ml_collections.ConfigDict], Examples]


class DataSourceError(ValueError):
    """The configured data source cannot be imported or returned something unusable; says what to fix."""


# ---------------------------------------------------------------------------------------------------
# The built-in datasets: each one function of the data config, returning every example (unselected)


def scope(cfg: ml_collections.ConfigDict) -> Examples:
    """SCOPe ASTRAL FASTA (`data.path`) labelled at `data.label` (class|fold|superfamily|family); groups: family."""
    from experiments import protein_datasets

    ds = protein_datasets.read_scope_astral(cfg.path)
    level = cfg.get("label") or "superfamily"
    return Examples(ds.sequences, ds.labels[level], ds.ids, ds.label_names[level], ds.labels["family"],
                    {"path": str(cfg.path), "label": level})


def uniprot(cfg: ml_collections.ConfigDict) -> Examples:
    """UniProt FASTA (`data.path`), unlabelled."""
    from experiments import protein_datasets

    ds = protein_datasets.read_uniprot_fasta(cfg.path)
    return Examples(ds.sequences, None, ds.ids, description={"path": str(cfg.path)})


def images(name: str, cfg: ml_collections.ConfigDict) -> Examples:
    """An image dataset of `experiments.image_datasets` (`data.root`, `data.split`, `data.size`, `data.rgb`)."""
    from experiments import image_datasets

    ds = image_datasets.load_image_dataset(name, cfg.get("root"), cfg.get("split"), size=cfg.get("size"),
                                           rgb=cfg.get("rgb", False))
    return Examples(ds.images, ds.labels, ds.ids, ds.class_names,
                    description={"root": str(cfg.get("root")), "split": cfg.get("split"), "size": cfg.get("size")})


def scope_text(cfg: ml_collections.ConfigDict) -> Examples:
    """SCOPe header descriptions (`data.path`, `data.text`) labelled by SCOP class, for text models."""
    from experiments import text_datasets

    ds = text_datasets.scope_text_dataset(cfg.path, text=cfg.get("text") or "description")
    return Examples(ds.texts, ds.labels.astype(np.int64), ds.ids, ds.label_names, description={"path": str(cfg.path)})


LOADERS: dict[str, Loader] = {
    "scope": scope,
    "uniprot": uniprot,
    **{name: functools.partial(images, name) for name in ("digits", "mnist", "cifar10", "imagenet32")},
    "scope_text": scope_text,
}


# ---------------------------------------------------------------------------------------------------
# The researcher's own data


def resolve_source(spec: str) -> Loader:
    """The function named by `data.source` ("package.module:function"), imported.

    Raises:
      DataSourceError naming the module or attribute that is missing and how to make it importable.
    """
    from models import registry

    return registry.import_callable(spec, "config.data.source", DataSourceError,
                                    "a function load(data_config) -> experiments.datasets.Examples (e.g. "
                                    "'mydata.loaders:load')")


def loader_for(cfg: ml_collections.ConfigDict) -> tuple[str, Loader]:
    """(dataset name, loader): `data.source` when set, else the built-in `data.name`."""
    if cfg.get("source"):
        return str(cfg.source), resolve_source(cfg.source)
    if cfg.name not in LOADERS:
        raise DataSourceError(f"unknown dataset config.data.name={cfg.name!r}: one of {', '.join(LOADERS)} (or "
                              "'arrays' for per-layer arrays), or set --config.data.source=package.module:function")
    return cfg.name, LOADERS[cfg.name]


def _integer_codes(values: Any, n: int, what: str, where: str) -> np.ndarray | None:
    """(N,) int64 codes >= 0 from `values`, or a DataSourceError naming `what` and the fix."""
    if values is None:
        return None
    array = np.asarray(values)
    if array.ndim != 1 or len(array) != n:
        raise DataSourceError(f"{where}: {what} have shape {array.shape} but there are {n} examples; give one "
                              f"{what[:-1]} per example, shape ({n},)")
    if array.dtype == bool or not (np.issubdtype(array.dtype, np.integer) or (
            np.issubdtype(array.dtype, np.floating) and np.isfinite(array).all() and (array == np.round(array)).all())):
        raise DataSourceError(f"{where}: {what} must be integer codes, got dtype {array.dtype} (e.g. "
                              f"{array.ravel()[:3].tolist()}); map them to 0..C-1 (np.unique(x, return_inverse=True)) "
                              "and return the names as label_names")
    array = array.astype(np.int64)
    if n and array.min() < 0:
        raise DataSourceError(f"{where}: {what} must be >= 0, found {int(array.min())} at index "
                              f"{int(np.argmin(array))}")
    return array


def check_examples(examples: Any, where: str) -> Examples:
    """`examples` checked and normalised (ids a tuple of str, labels and groups int64, description a dict).

    Raises:
      DataSourceError naming `where` (the dataset) and the problem: not an `Examples`, inputs neither
      strings nor uint8 [N, H, W, C] images, labels/groups/ids of the wrong length, non-integer or
      negative labels, label codes without a name, duplicate ids, a description that is not JSON.
    """
    if not isinstance(examples, Examples):
        raise DataSourceError(f"{where} returned a {type(examples).__name__}; it must return "
                              "experiments.datasets.Examples(inputs, labels=..., ids=..., label_names=...)")
    inputs = examples.inputs
    if isinstance(inputs, np.ndarray):
        if inputs.ndim != 4 or inputs.dtype != np.uint8:
            raise DataSourceError(f"{where}: image inputs must be uint8 [N, H, W, C]; got {inputs.dtype} "
                                  f"{inputs.shape} (grayscale: add a channel axis, x[..., None])")
    elif isinstance(inputs, str) or not isinstance(inputs, Sequence):
        raise DataSourceError(f"{where}: inputs must be a list of strings (sequences, texts) or a uint8 "
                              f"[N, H, W, C] array; got {type(inputs).__name__}")
    else:
        bad = next((i for i, x in enumerate(inputs) if not isinstance(x, str)), None)
        if bad is not None:
            raise DataSourceError(f"{where}: inputs[{bad}] is a {type(inputs[bad]).__name__}; a list of inputs "
                                  "must hold strings (images: one uint8 [N, H, W, C] array)")
        inputs = tuple(inputs)
    n = len(inputs)
    if n == 0:
        raise DataSourceError(f"{where} returned no examples")
    labels = _integer_codes(examples.labels, n, "labels", where)
    groups = _integer_codes(examples.groups, n, "groups", where)
    names = None if examples.label_names is None else tuple(str(x) for x in examples.label_names)
    if names is not None and labels is not None and labels.max() >= len(names):
        raise DataSourceError(f"{where}: label code {int(labels.max())} has no name ({len(names)} label_names); "
                              "give one name per code 0..C-1")
    ids = tuple(str(i) for i in examples.ids) if examples.ids is not None else tuple(str(i) for i in range(n))
    if len(ids) != n:
        raise DataSourceError(f"{where}: {len(ids)} ids for {n} examples; give one id per example")
    if len(set(ids)) != n:
        seen: set[str] = set()
        dup = next(i for i in ids if i in seen or seen.add(i))
        raise DataSourceError(f"{where}: id {dup!r} occurs more than once; ids must be distinct")
    description = dict(examples.description or {})
    try:
        json.dumps(description)
    except (TypeError, ValueError) as err:
        raise DataSourceError(f"{where}: the description must be JSON-able (strings, numbers, lists, dicts): {err}") \
            from err
    return Examples(inputs, labels, ids, names, groups, description)


# ---------------------------------------------------------------------------------------------------
# Selection, the same for every source


def select_indices(n: int, labels: np.ndarray | None, cfg: ml_collections.ConfigDict) -> np.ndarray:
    """Sorted indices kept: classes with >= `min_class_size` members, at most `per_class` of each (a seeded
    random choice), then at most `max_examples` (seeded). Unset knobs (None) keep everything."""
    rng = np.random.default_rng(cfg.get("seed") or 0)
    keep = np.arange(n)
    min_class_size, per_class, max_examples = (cfg.get(k) for k in ("min_class_size", "per_class", "max_examples"))
    if labels is not None and min_class_size:
        counts = np.bincount(labels)
        keep = keep[counts[labels[keep]] >= min_class_size]
        if len(keep) == 0:
            raise ValueError(f"no class has data.min_class_size={min_class_size} members (the largest has "
                             f"{counts.max()}): lower --config.data.min_class_size or use a larger dataset")
    if labels is not None and per_class:
        chosen = [rng.permutation(keep[labels[keep] == c])[:per_class] for c in np.unique(labels[keep])]
        keep = np.sort(np.concatenate(chosen))
    if max_examples and len(keep) > max_examples:
        keep = np.sort(rng.choice(keep, max_examples, replace=False))
    return keep


MIN_EXAMPLES = 3


def load_examples(cfg: ml_collections.ConfigDict) -> Examples:
    """The configured dataset (`data.source` or `data.name`), checked, selected and with labels coded 0..C-1.

    Returns:
      `Examples` whose description is {"dataset": name, **the loader's description, "n": kept}.

    Raises:
      DataSourceError (a ValueError) for an unusable source or return value, ValueError when the
      selection leaves fewer than 3 examples.
    """
    name, loader = loader_for(cfg)
    where = f"data source {name!r}" if cfg.get("source") else f"dataset {name!r}"
    full = check_examples(loader(cfg), where)
    pool = np.arange(len(full)) if not cfg.get("heldout_of") else heldout_indices(full.ids, cfg.heldout_of, where)
    keep = pool[select_indices(len(pool), None if full.labels is None else full.labels[pool], cfg)]
    if len(keep) < MIN_EXAMPLES:
        raise ValueError(f"{where}: {len(full)} examples, {len(keep)} left after selection (min_class_size="
                         f"{cfg.get('min_class_size')}, per_class={cfg.get('per_class')}, max_examples="
                         f"{cfg.get('max_examples')}); need at least {MIN_EXAMPLES}: loosen --config.data.* or add "
                         "data")
    labels, names = full.labels, full.label_names
    if labels is not None:
        present, labels = np.unique(labels[keep], return_inverse=True)
        labels = labels.astype(np.int64).ravel()
        names = None if names is None else tuple(names[i] for i in present)
    inputs = full.inputs[keep] if isinstance(full.inputs, np.ndarray) else tuple(full.inputs[i] for i in keep)
    description = {"dataset": name, **full.description, "n": int(len(keep))}
    if cfg.get("heldout_of"):  # which examples is in the ids' digest; where the run lives is not identity
        description["heldout_of"] = {"train_ids": int(len(full) - len(pool)),
                                     "locations": {"run": str(cfg.heldout_of)}}
    return Examples(inputs, labels, tuple(full.ids[i] for i in keep), names,
                    None if full.groups is None else full.groups[keep], description)


def heldout_indices(ids: Sequence[str], training_run: str, where: str = "the dataset") -> np.ndarray:
    """Sorted indices of the examples a trained model never saw: those whose id is not among the
    "train_ids" of `training_run`'s data_split.json (a training workdir, or a checkpoint exported from one;
    local or any `etils.epath` URI such as gs://).

    Raises:
      DataSourceError when the record is missing or when no id of the dataset is a training id (then the
      dataset is not the one the model was trained on, and "held out" would mean everything).
    """
    record = epath.Path(training_run) / "data_split.json"
    try:
        train_ids = set(json.loads(record.read_text())["train_ids"])
    except FileNotFoundError as err:
        raise DataSourceError(f"data.heldout_of={training_run!r}: no {record.name} there (a training workdir or an "
                              "exported checkpoint directory holds one)") from err
    except (KeyError, json.JSONDecodeError, UnicodeDecodeError, TypeError) as err:
        raise DataSourceError(f"data.heldout_of={training_run!r}: {record} has no list 'train_ids' ({err!r}); "
                              "re-export the checkpoint or retrain to record it") from err
    trained = np.array([example_id in train_ids for example_id in ids], bool)
    if not trained.any():
        example = next(iter(train_ids), None)
        raise DataSourceError(f"data.heldout_of={training_run!r}: none of the {len(ids)} ids of {where} (e.g. "
                              f"{ids[0]!r}) is among the run's {len(train_ids)} training ids (e.g. {example!r}): point "
                              "data.* at the data the model was trained on (same file and split)")
    return np.flatnonzero(~trained)


def _digest(values: Any) -> str | None:
    if values is None:
        return None
    if isinstance(values, np.ndarray):
        return hashlib.sha256(np.ascontiguousarray(values).tobytes() + str(values.dtype).encode()).hexdigest()[:16]
    return hashlib.sha256("\0".join(values).encode()).hexdigest()[:16]


def identity(examples: Examples) -> dict:
    """What the store's fingerprint records about the data: the description (which names the dataset or
    the source function) and digests of the ids, labels and groups."""
    return {"description": examples.description, "ids": _digest(examples.ids), "labels": _digest(examples.labels),
            "groups": _digest(examples.groups)}
