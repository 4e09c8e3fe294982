"""The model families the pipeline knows, and the one protocol each implements.

A family is a module in `models/` with these names (the pipeline calls nothing else):

  Config                  frozen dataclass of hyper-parameters, `to_dict()` / `Config.from_dict(d)`
  Model                   the Flax module: `Model(config)`
  SOURCES                 checkpoint kinds `load` reads (besides GENERIC_SOURCES, which every family gets:
                          "random" here from `get_config` + `init_params`; "trained" / "untrained", a
                          training workdir's model, in `experiments/extract.py` via `experiments/train.py`)
  get_config(size, **overrides) -> Config
  init_params(config, seed) -> params        float32, the inner tree (no {"params": ...} wrapper)
  param_shapes(config) -> tree of ShapeDtypeStruct, without allocating
  load(source, path) -> (config, params)           float32
  save(path, config, params) / restore(path) -> (config, params)    Orbax, config in the metadata
  make_encoder(config, params, settings, examples, *, workdir, batch_size) -> Encoder
      `settings` is the run's `config.model` (the family's own knobs in `settings.<family>`),
      `examples` every example the run analyses (`.ids`, `.inputs`: tokenizer lengths, a palette
      fitted on the images), `batch_size` the extraction's (a family may pad to it)
  check_settings(settings)   optional: refuses bad settings before the model is loaded
  PATHLESS_SOURCES           optional: sources that need no model.path

and, if it can be trained here (`experiments/train.py`):

  TRAINING_DATA           "proteins" | "images" (`experiments/train_data.py`)
  LOSS_NAME               the training loss, for the loss curve's axis
  training_config(model_settings, data) -> Config     from a training config's `model` block
  token_losses(config, train_settings) -> fn(params, batch, key) -> (per-token loss, weights) [B, T]

`Encoder` is the inference part of the protocol. A researcher's own model implements only that
(`model.encoder=pkg.module:make_encoder`), see `resolve_encoder_callable` and `check_encoder`.
"""

from __future__ import annotations

import dataclasses
import importlib
import json
from collections.abc import Callable, Sequence
from types import ModuleType
from typing import Any, Protocol, runtime_checkable

# Family name -> module. Adding a family: write models/<name>.py with the names above, add one line here.
FAMILIES: dict[str, str] = {
    "esm2": "models.esm2",
    "igpt": "models.igpt",
    "bert": "models.bert",
}

GENERIC_SOURCES = ("random", "trained", "untrained")
ENCODER_MEMBERS = ("num_layers", "prepare_batch", "pooled_states")


class EncoderError(ValueError):
    """A model given as `model.encoder` that cannot be imported or does not keep the protocol."""


@runtime_checkable
class Encoder(Protocol):
    """A model ready for extraction: what the pipeline needs from any model.

    num_layers: L; the pooled states have L + 1 rows (the embedding output, then one per layer).
    prepare_batch(examples): a batch of the dataset's examples (sequences, uint8 images [B, H, W, C]
      or texts) -> the model's input, any object `pooled_states` accepts.
    pooled_states(inputs): float32 [L + 1, B, D], one pooled vector per layer and example.
    Optional: `sort_key(example) -> number` (examples of similar key share a batch: length bucketing)
    and `description` (a JSON-able dict recorded in the store and results.json).
    """

    num_layers: int

    def prepare_batch(self, examples: Sequence[Any]) -> Any: ...

    def pooled_states(self, inputs: Any) -> Any: ...


@dataclasses.dataclass(frozen=True)
class FamilyEncoder:
    """The `Encoder` a built-in family returns: plain functions over its config and params."""

    num_layers: int
    prepare_batch: Callable[[Sequence[Any]], Any]
    pooled_states: Callable[[Any], Any]
    description: dict
    sort_key: Callable[[Any], float] | None = None


def to_host(states: Any) -> Any:
    """A family's pooled states as numpy: a global array spanning several processes (extraction on a
    multi-process mesh) is gathered first, a collective every process reaches; anything else as is."""
    import jax
    import numpy as np
    from jax.experimental import multihost_utils

    if isinstance(states, jax.Array) and not states.is_fully_addressable:
        return np.asarray(multihost_utils.process_allgather(states, tiled=True))
    return np.asarray(states)


def names() -> tuple[str, ...]:
    return tuple(FAMILIES)


def family(name: str) -> ModuleType:
    """The module of family `name`; a ValueError naming the known families otherwise."""
    if name not in FAMILIES:
        raise ValueError(f"unknown model family {name!r}: one of {', '.join(FAMILIES)} (or set model.encoder to "
                         "your own model, pkg.module:callable)")
    return importlib.import_module(FAMILIES[name])


def trainable() -> tuple[str, ...]:
    """Families with a training objective (`token_losses`)."""
    return tuple(name for name in FAMILIES if hasattr(family(name), "token_losses"))


def trainable_family(name: str) -> ModuleType:
    module = family(name)
    if not hasattr(module, "token_losses"):
        raise ValueError(f"model family {name!r} has no training objective here; trainable: {', '.join(trainable())}")
    return module


def family_of(config: Any) -> str:
    """The family name of a config dataclass instance."""
    for name in FAMILIES:
        if isinstance(config, family(name).Config):
            return name
    raise TypeError(f"{type(config).__name__} is not the Config of any family ({', '.join(FAMILIES)})")


def config_to_json(config: Any) -> dict:
    """{"family", "config"}: what `model_config.json` of a training workdir holds."""
    return {"family": family_of(config), "config": config.to_dict()}


def config_from_json(record: dict) -> Any:
    """Inverse of `config_to_json` (also reads the files written before the families shared one protocol)."""
    if not isinstance(record, dict) or "family" not in record or "config" not in record:
        raise ValueError(f"a model config record needs 'family' and 'config', got {json.dumps(record)[:200]}")
    return family(record["family"]).Config.from_dict(record["config"])


def load(name: str, source: str, path: str | None, *, size: str | None = None, overrides: dict | None = None,
         seed: int = 0) -> tuple[Any, Any]:
    """(config, params) of family `name` from `source`.

    "random": `get_config(size, **overrides)` initialised with `seed`; any other source is the family's
    own `load` (its `SOURCES`). The sources that read a training workdir ("trained", "untrained") belong
    to the pipeline (`experiments.extract.family_model` through `experiments.train`), not to models/.
    `path` (`model.path`) is local or any `etils.epath` URI (gs://bucket/...): the families read HF files through
    epath and Orbax checkpoints through Orbax, which opens gs:// itself.
    """
    module = family(name)
    if source == "random":
        if not size:
            raise ValueError(f"model.source='random' needs model.size (a {name} size key) to build the model")
        config = module.get_config(size, **dict(overrides or {}))
        return config, module.init_params(config, seed)
    if source not in module.SOURCES:
        raise ValueError(f"model family {name!r} cannot load source {source!r}: one of "
                         f"{', '.join(module.SOURCES + GENERIC_SOURCES)}")
    if not path and source not in getattr(module, "PATHLESS_SOURCES", ()):
        raise ValueError(f"model.source={source!r} reads a checkpoint: set model.path")
    return module.load(source, path)


# ---------------------------------------------------------------------------------------------------
# The researcher's own model


def import_callable(spec: str, setting: str, error: type[Exception], returns: str) -> Callable[..., Any]:
    """`"pkg.module:attribute"` (dots allowed in attribute) -> that callable, imported; `error` naming the
    setting, what is missing and how to fix it otherwise. `returns` describes what the callable should be
    (e.g. "a function load(data_config) -> Examples"). Used for every plug-in setting (model.encoder,
    data.source), so they fail the same way."""
    module_name, sep, attribute = str(spec).partition(":")
    if not sep or not module_name or not attribute:
        raise error(f"{setting}={spec!r} must be 'package.module:callable' naming {returns}")
    try:
        module = importlib.import_module(module_name)
    except ImportError as err:
        raise error(f"{setting}={spec!r}: cannot import module {module_name!r} ({err}); put the directory holding "
                    "its package on PYTHONPATH, or pip install it") from err
    target: Any = module
    for part in attribute.split("."):
        if not hasattr(target, part):
            public = sorted(n for n in dir(module) if not n.startswith("_") and callable(getattr(module, n)))
            raise error(f"{setting}={spec!r}: module {module_name!r} ({getattr(module, '__file__', '?')}) has no "
                        f"attribute {attribute!r}; its callables: {', '.join(public) or 'none'}")
        target = getattr(target, part)
    if not callable(target):
        raise error(f"{setting}={spec!r}: {attribute!r} is a {type(target).__name__}, not a callable; name {returns}")
    return target


def resolve_encoder_callable(spec: str) -> Callable[[], Any]:
    """`"pkg.module:make_encoder"` -> that callable; an `EncoderError` naming what is missing otherwise."""
    return import_callable(spec, "model.encoder", EncoderError, "a callable returning the encoder (e.g. "
                           "'mypackage.models:make_encoder')")


def check_encoder(encoder: Any, where: str) -> None:
    """Raises `EncoderError` unless `encoder` has every member of the inference protocol."""
    missing = [m for m in ENCODER_MEMBERS if not hasattr(encoder, m)]
    if missing:
        raise EncoderError(f"{where} returned a {type(encoder).__name__} without {', '.join(missing)}: an encoder "
                           "needs num_layers (int), prepare_batch(examples) and pooled_states(inputs) -> float32 "
                           "(num_layers + 1, batch, dim)")
    layers = encoder.num_layers
    if isinstance(layers, bool) or not isinstance(layers, int) or layers < 1:
        raise EncoderError(f"{where}: num_layers must be a positive int, got {layers!r}")
    for member in ("prepare_batch", "pooled_states"):
        if not callable(getattr(encoder, member)):
            raise EncoderError(f"{where}: {member} must be callable, got {type(getattr(encoder, member)).__name__}")
    sort_key = getattr(encoder, "sort_key", None)
    if sort_key is not None and not callable(sort_key):
        raise EncoderError(f"{where}: sort_key must be callable (example -> number) or absent")
    description = getattr(encoder, "description", None)
    if description is not None:
        try:
            json.dumps(description)
        except (TypeError, ValueError) as err:
            raise EncoderError(f"{where}: description must be a JSON-able dict ({err})") from err
        if not isinstance(description, dict):
            raise EncoderError(f"{where}: description must be a dict, got {type(description).__name__}")
