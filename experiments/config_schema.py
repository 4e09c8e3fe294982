"""What every config key may hold, checked once before any work (launch.py, `idjax.profile`).

A wrong value is reported with its key and the allowed values, e.g.
`config.profile.duplicates='maybe': must be one of drop, error`, instead of running with a silent
default or failing deep inside a job. Keys are dotted paths; a training config nested in an analysis
config (`training.train.steps`) is checked under its own keys (`train.steps`).
"""

from __future__ import annotations

import difflib
import numbers
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import ml_collections

from models import registry

Check = Callable[[Any], str | None]  # None when the value is fine, else what it must be


def _is_int(v: Any) -> bool:
    return isinstance(v, numbers.Integral) and not isinstance(v, bool)


def _is_real(v: Any) -> bool:
    return isinstance(v, numbers.Real) and not isinstance(v, bool)


def choice(*allowed: str) -> Check:
    return lambda v: None if v in allowed else f"must be one of {', '.join(allowed)}"


def integer(low: int, high: int | None = None, *, optional: bool = False) -> Check:
    """An int in [low, high]; with `optional`, also None (meaning "not set")."""
    bound = f">= {low}" if high is None else f"in [{low}, {high}]"

    def check(v):
        if v is None and optional:
            return None
        if _is_int(v) and v >= low and (high is None or v <= high):
            return None
        return f"must be an integer {bound}" + (" (or None)" if optional else "")
    return check


def real(low: float, high: float, *, low_open: bool = False, high_open: bool = False) -> Check:
    lo, hi = ("(" if low_open else "["), (")" if high_open else "]")

    def check(v):
        if not _is_real(v) or v != v:
            return f"must be a number in {lo}{low}, {high}{hi}"
        if (v <= low if low_open else v < low) or (v >= high if high_open else v > high):
            return f"must be a number in {lo}{low}, {high}{hi}"
        return None
    return check


def boolean(v: Any) -> str | None:
    return None if isinstance(v, bool) else "must be True or False"


def text(v: Any) -> str | None:
    return None if isinstance(v, str) else "must be a string"


def optional_text(v: Any) -> str | None:
    return None if v is None or isinstance(v, str) else "must be a string or None"


def int_list(low: int) -> Check:
    def check(v):
        if isinstance(v, (list, tuple)) and len(v) > 0 and all(_is_int(i) and i >= low for i in v):
            return None
        return f"must be a non-empty tuple of integers >= {low}"
    return check


def anything(v: Any) -> str | None:
    return None


def callable_spec(returns: str) -> Callable[[Any], str | None]:
    """Unset, or "package.module:callable" naming `returns` (imported when the job starts)."""
    def check(v: Any) -> str | None:
        if v is None:
            return None
        module, sep, attribute = v.partition(":") if isinstance(v, str) else ("", "", "")
        if sep and all(part.isidentifier() for part in (*module.split("."), *attribute.split("."))):
            return None
        return f"must be 'package.module:callable' naming {returns} (or unset)"
    return check


encoder_spec = callable_spec("a function that returns the encoder")
data_source = callable_spec("a function data_config -> experiments.datasets.Examples")


EXPERIMENT_NAMES = ("extract", "profile", "probe", "probe_study", "train", "full", "synthetic")
DATASETS = ("scope", "uniprot", "digits", "mnist", "cifar10", "imagenet32", "scope_text", "arrays")

# The analysis config (configs/base.py) and the profile options of `idjax.profile`.
ANALYSIS: dict[str, Check] = {
    "experiment": choice(*EXPERIMENT_NAMES),
    "name": text,
    "seed": integer(0),
    "training": anything,  # checked with TRAINING below when set
    "model.family": lambda v: choice(*registry.names())(v),
    "model.encoder": encoder_spec,
    "model.source": choice("hf", "fair_esm", "orbax", "trained", "untrained", "random", "minilm"),
    "model.step": integer(0, optional=True),
    "model.path": optional_text,
    "model.size": optional_text,
    "model.overrides": anything,  # free-form model config fields, checked by the model's config class
    "model.seed": integer(0),
    "model.esm2.dtype": choice("float32", "bfloat16", "float16"),
    "model.esm2.pooling": choice("mean", "cls"),
    "model.esm2.long_policy": choice("error", "crop", "windows"),
    "model.esm2.max_residues": integer(1, 1022),
    "model.esm2.unknown": choice("error", "X"),
    "model.esm2.attention": choice("auto", "einsum", "heads_major", "heads_major_deferred", "xla", "cudnn"),
    "model.igpt.stream": choice("paper", "residual"),
    "model.igpt.palette": optional_text,
    "model.bert.normalize": boolean,
    "data.name": choice(*DATASETS),
    "data.source": data_source,
    "data.path": optional_text,
    "data.root": optional_text,
    "data.split": optional_text,
    "data.size": integer(1, optional=True),
    "data.rgb": boolean,
    "data.label": choice("class", "fold", "superfamily", "family"),
    "data.min_class_size": integer(1, optional=True),
    "data.per_class": integer(1, optional=True),
    "data.max_examples": integer(1, optional=True),
    "data.heldout_of": optional_text,
    "data.seed": integer(0),
    "data.text": choice("description", "description+organism"),
    "extract.batch_size": lambda v: None if v == "auto" or integer(1)(v) is None else
    "must be an integer >= 1 or 'auto'",
    "extract.sharding": choice("auto", "always", "never"),
    "extract.model_parallel": integer(0),
    "extract.device_memory_bytes": integer(0),
    "extract.memory_headroom": real(0, 1, low_open=True),
    "profile.k_max": integer(2),
    "profile.sharded": choice("auto", "always", "never"),
    "profile.processes": choice("auto", "layers", "ring"),
    "profile.verify_store": boolean,
    "profile.twonn_fraction": real(0, 1, low_open=True),
    "profile.gride_range_max": integer(2),
    "profile.decimation": boolean,
    "profile.decimation_min_size": integer(3),
    "profile.decimation_target_ratio": real(1, float("inf")),
    "profile.id_estimator": choice("twonn", "twonn_decimated", "gride", "gride_plateau"),
    "profile.decimation_min_subset": integer(0),
    "profile.gride_rank": integer(2, optional=True),
    "profile.label_ks": int_list(1),
    "profile.overlap_k": integer(1),
    "profile.duplicates": choice("drop", "error"),
    "profile.selection_min_plateau": integer(2),
    "profile.selection_min_drop": real(0, 1),
    "profile.selection_min_rise": real(0, 1),
    "profile.selection_z": real(0, float("inf")),
    "probe.enabled": boolean,
    "probe.linear": boolean,
    "probe.steps": integer(1),
    "probe.test_fraction": real(0, 1, low_open=True, high_open=True),
    "probe.knn_k": integer(1),
    "probe.remote_homology": boolean,
    "probe.seed": integer(0),
    "study.classes": lambda v: None if isinstance(v, str) and v and set(v) <= set("abcdefg") else (
        "must be SCOP class letters from 'abcdefg', e.g. 'abcd'"),
    "study.min_superfamily_members": integer(2),
    "study.untrained": boolean,
}

# configs/train_*.py
TRAINING: dict[str, Check] = {
    "experiment": choice("train"),
    "seed": integer(0),
    "model.family": lambda v: choice(*registry.trainable())(v),
    "model.name": text,
    "model.num_layers": integer(1),
    "model.embed_dim": integer(1),
    "model.num_heads": integer(1),
    "model.ffn_dim": integer(1, optional=True),
    "model.esm2.token_dropout": boolean,
    "model.dtype": choice("float32", "bfloat16"),
    "data.name": choice("digits", "mnist", "cifar10"),
    "data.fasta": text,
    "data.root": optional_text,
    "data.split": optional_text,
    "data.size": integer(1, optional=True),
    "data.n_colors": integer(2),
    "data.max_residues": integer(1, 1022),
    "data.scope_fasta": optional_text,
    "data.scope_holdout_families": real(0, 1, low_open=True, high_open=True),
    "data.val_fraction": real(0, 1, low_open=True, high_open=True),
    "data.split_seed": integer(0),
    "data.max_sequences": integer(1, optional=True),
    "data.max_train_examples": integer(1, optional=True),
    "data.max_eval_examples": integer(1, optional=True),
    "train.steps": integer(1),
    "train.batch_size": integer(1),
    "train.eval_batch_size": integer(1),
    "train.learning_rate": real(0, float("inf"), low_open=True),
    "train.warmup_steps": integer(0),
    "train.end_lr_fraction": real(0, 1),
    "train.weight_decay": real(0, float("inf")),
    "train.b1": real(0, 1, high_open=True),
    "train.b2": real(0, 1, high_open=True),
    "train.eps": real(0, float("inf"), low_open=True),
    "train.grad_clip_norm": real(0, float("inf"), low_open=True),
    "train.mask_prob": real(0, 1, low_open=True, high_open=True),
    "train.mask_token_prob": real(0, 1),
    "train.random_token_prob": real(0, 1),
    "train.log_interval": integer(1),
    "train.eval_interval": integer(1),
    "train.progress_bar": boolean,
    "train.model_parallel": integer(1),
    "train.fsdp": boolean,
    "checkpoint.interval": integer(1),
    "checkpoint.max_to_keep": integer(1),
    "checkpoint.async_save": boolean,
    "checkpoint.keep_steps": lambda v: None if v in ((), [], None) else int_list(0)(v),
}

# configs/synthetic.py
SYNTHETIC: dict[str, Check] = {
    "experiment": choice("synthetic"),
    "n_points": integer(3),
    "ambient_dim": integer(1),
    "k_max": integer(2),
    "twonn_fraction": real(0, 1, low_open=True),
    "seed": integer(0),
    "manifolds": anything,
}


class ConfigError(ValueError):
    """A config value or key that cannot be used; the message names the key and what it may hold."""


def flatten(config: Mapping | ml_collections.ConfigDict, prefix: str = "") -> dict[str, Any]:
    """{"profile.k_max": 64, ...}; a nested ConfigDict under `model.overrides` stays one value."""
    out = {}
    items = config.items() if not isinstance(config, ml_collections.ConfigDict) else config.items()
    for key, value in items:
        name = f"{prefix}{key}"
        if isinstance(value, (ml_collections.ConfigDict, dict)) and name not in ("model.overrides", "training"):
            out.update(flatten(value, name + "."))
        else:
            out[name] = value
    return out


def schema_for(config: Mapping | ml_collections.ConfigDict) -> dict[str, Check]:
    experiment = config.get("experiment")
    if experiment == "train":
        return TRAINING
    if experiment == "synthetic":
        return SYNTHETIC
    return ANALYSIS


def suggest(key: str, known: Iterable[str]) -> str:
    """' (did you mean profile.k_max?)' for a near miss, else ''."""
    close = difflib.get_close_matches(key, list(known), n=1, cutoff=0.6)
    return f" (did you mean {close[0]}?)" if close else ""


def problems(config: Mapping | ml_collections.ConfigDict, schema: Mapping[str, Check] | None = None,
             prefix: str = "config.") -> list[str]:
    """Every problem with `config`, one message each (empty when it is fine)."""
    schema = schema_for(config) if schema is None else schema
    found = []
    values = flatten(config)
    for key, value in values.items():
        if key not in schema:
            found.append(f"{prefix}{key} is not a known key{suggest(key, schema)}")
            continue
        why = schema[key](value)
        if why:
            found.append(f"{prefix}{key}={value!r}: {why}")
    if schema is ANALYSIS:
        found += _cross_checks(values, prefix)
        training = values.get("training")
        if training:
            found += problems(training, TRAINING, prefix=f"{prefix}training.")
    return found


def _cross_checks(values: dict[str, Any], prefix: str) -> list[str]:
    found = []
    k_max, rank = values.get("profile.k_max"), values.get("profile.gride_rank")
    range_max = values.get("profile.gride_range_max")
    if (values.get("profile.id_estimator") == "gride" and _is_int(rank) and _is_int(range_max) and range_max >= 2
            and (not _is_int(k_max) or k_max >= 2)):
        top = min(range_max, k_max if _is_int(k_max) else rank)
        ranks = [2 ** i for i in range(1, 64) if 2 ** i <= top]
        if rank not in ranks:
            found.append(f"{prefix}profile.gride_rank={rank}: with id_estimator='gride' it must be one of the "
                         f"computed ranks {ranks} (powers of two up to min(k_max, gride_range_max))")
    return found


def validate(config: Mapping | ml_collections.ConfigDict, schema: Mapping[str, Check] | None = None,
             prefix: str = "config.") -> None:
    """Raises ConfigError listing every problem (each names its key and the allowed values)."""
    found = problems(config, schema, prefix)
    if found:
        raise ConfigError("; ".join(found))
