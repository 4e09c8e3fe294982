"""Checkpoint I/O shared by every model family: Hugging Face safetensors directories and Orbax.

A checkpoint path may be local or any `etils.epath` URI (gs://bucket/...), read through epath's backends. Orbax
reads and writes gs:// itself: its arrays go through TensorStore's own drivers (GCS among them), not through epath,
so a store that only fsspec serves (the in-memory one of the tests) cannot hold an Orbax checkpoint.

Model files own their key mapping (HF name -> Flax path, with any transpose); this module owns
reading, validating and saving. No torch here: fair-esm `.pt` files are read in `models/esm2.py`
through the optional torch extra.
"""

from __future__ import annotations

import json
import math
import os
import re
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import jax
import numpy as np
from etils import epath

from experiments.files import absolute, atomic_write_json, local_path

PathLike = str | os.PathLike

SAFETENSORS_FILE = "model.safetensors"
SAFETENSORS_INDEX = "model.safetensors.index.json"


class CheckpointError(ValueError):
    """A checkpoint is missing, corrupt, or does not match the model it is loaded into."""


def unwrap_params(params: Mapping[str, Any]) -> Mapping[str, Any]:
    """The params tree, given either that tree or Flax's variables dict {"params": tree, ...}.

    Every family accepts both forms; no family has a submodule named "params", so the key is unambiguous.
    """
    return params["params"] if "params" in params else params


class HFConfig(dict):
    """A parsed config.json: a plain dict that also remembers which file it came from (for messages)."""

    source: str = "config.json"


def read_hf_config(path: PathLike) -> HFConfig:
    """Reads `config.json` from a HF checkpoint directory (or the file itself); it must hold a JSON object."""
    path = epath.Path(path)
    file = path / "config.json" if path.is_dir() else path
    if not file.is_file():
        raise CheckpointError(f"no config.json at {file}")
    try:
        data = json.loads(file.read_text())
    except json.JSONDecodeError as err:
        raise CheckpointError(f"{file} is not valid JSON: {err}") from err
    if not isinstance(data, dict):
        raise CheckpointError(f"{file} must hold a JSON object of config fields; got a JSON {type(data).__name__}")
    config = HFConfig(data)
    config.source = str(file)
    return config


REQUIRED = object()  # marks a config field without a default


def config_field(hf: Mapping[str, Any], key: str, kind: type, default: Any = REQUIRED, *,
                 aliases: tuple[str, ...] = (), positive: bool = False, nonnegative: bool = False) -> Any:
    """One typed field of a HF config.json: the single reader every `config_from_hf` uses.

    JSON has real booleans and numbers, so nothing is coerced: "false" is not a bool (it would read as
    True), 64.9 is not an int (it would become 64; 64.0 is accepted), true is not an int.

    Args:
      hf: the parsed config (an `HFConfig` names its file in messages).
      key: the field; `aliases` are other names HF accepts for it (attribute maps), tried in order.
      kind: bool, int, float (an integer value is accepted for a float) or str.
      default: the value when absent (and for an explicit null); REQUIRED makes absence an error.
      positive / nonnegative: bound numbers to > 0 / >= 0.

    Raises:
      CheckpointError naming the file, the key, the value and what was expected.
    """
    if not isinstance(hf, Mapping):
        raise CheckpointError(f"a config must be a mapping of fields (config.json object); got {type(hf).__name__}")
    source = getattr(hf, "source", "config.json")
    present = next((name for name in (key, *aliases) if name in hf and hf[name] is not None), None)
    if present is None:
        if default is REQUIRED:
            raise CheckpointError(f"{source} has no {key!r} field, which this model needs")
        return default
    value = hf[present]
    if kind is float:
        ok = isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)
    elif kind is int:
        if isinstance(value, float) and value.is_integer():  # 64.0 is 64; 64.9 is refused below
            value = int(value)
        ok = isinstance(value, int) and not isinstance(value, bool)
    else:
        ok = isinstance(value, kind)
    if not ok:
        raise CheckpointError(
            f"{source}: field {present!r} must be a {'finite ' if kind is float else ''}JSON {kind.__name__}; "
            f"got {value!r} ({type(value).__name__})"
        )
    if kind is float:
        value = float(value)
    if positive and value <= 0 or nonnegative and value < 0:
        raise CheckpointError(f"{source}: field {present!r} must be {'> 0' if positive else '>= 0'}; got {value!r}")
    return value


def _read_safetensors_file(file: epath.Path) -> dict[str, np.ndarray]:
    from safetensors import SafetensorError
    from safetensors.numpy import load, load_file

    if not file.is_file():
        raise CheckpointError(f"safetensors file not found: {file}")
    local = local_path(file)
    try:
        # A local file is memory-mapped by safetensors; a remote one is read whole, then parsed.
        return load_file(str(local)) if local is not None else load(file.read_bytes())
    except (SafetensorError, OSError, ValueError, TypeError, AttributeError) as err:
        raise CheckpointError(
            f"cannot read safetensors file {file} ({file.stat().length} bytes): {err}. "
            "The file is truncated or corrupt; re-download or re-convert it."
        ) from err


def _bf16_safe_read(file: epath.Path) -> dict[str, np.ndarray]:
    """Reads a safetensors file; bfloat16 tensors (unsupported by safetensors.numpy) via ml_dtypes."""
    try:
        return _read_safetensors_file(file)
    except CheckpointError as err:
        # numpy has no bfloat16 (nor float8): those files take the reader below, which names any
        # tensor whose dtype it does not support either.
        if not any(word in str(err).lower() for word in ("bf16", "bfloat16", "float8", "f8_")):
            raise
    # Slow path: parse the header ourselves so bfloat16 checkpoints load without torch.
    import ml_dtypes

    dtypes = {
        "F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": ml_dtypes.bfloat16,
        "I64": np.int64, "I32": np.int32, "I16": np.int16, "I8": np.int8, "U8": np.uint8, "BOOL": np.bool_,
    }
    raw = file.read_bytes()
    size = len(raw)
    try:
        header_len = int.from_bytes(raw[:8], "little")
        header = json.loads(raw[8 : 8 + header_len])
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise CheckpointError(f"cannot read the safetensors header of {file} ({size} bytes): {err}") from err
    base = 8 + header_len
    out = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        if info.get("dtype") not in dtypes:
            raise CheckpointError(
                f"{file}: tensor {name!r} has dtype {info.get('dtype')!r}, which is not supported "
                f"(supported: {', '.join(dtypes)})"
            )
        dtype = np.dtype(dtypes[info["dtype"]])
        start, end = info["data_offsets"]
        shape = [int(n) for n in info["shape"]]
        expected = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
        if not 0 <= start <= end or end - start != expected or base + end > size:
            raise CheckpointError(
                f"{file} ({size} bytes): tensor {name!r} ({info['dtype']}, shape {shape}) needs {expected} bytes "
                f"at offsets [{start}, {end}) of the data, which the file does not hold. The file is truncated "
                "or corrupt; re-download or re-convert it."
            )
        out[name] = np.frombuffer(raw[base + start : base + end], dtype=dtype).reshape(shape)
    return out


def load_hf_state_dict(path: PathLike) -> dict[str, np.ndarray]:
    """Loads every tensor of a HF checkpoint as numpy arrays.

    `path` is a directory holding `model.safetensors` or the sharded `model.safetensors.index.json`
    (+ shards), or a single `.safetensors` file.
    """
    path = epath.Path(path)
    if path.is_file():
        return _bf16_safe_read(path)
    if not path.is_dir():
        raise CheckpointError(f"checkpoint path does not exist: {path}")
    index = path / SAFETENSORS_INDEX
    if index.is_file():
        try:
            weight_map: dict[str, str] = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError) as err:
            raise CheckpointError(f"{index} is not a valid safetensors index: {err}") from err
        state: dict[str, np.ndarray] = {}
        for shard in sorted(set(weight_map.values())):
            state.update(_bf16_safe_read(path / shard))
        missing = sorted(set(weight_map) - set(state))
        if missing:
            raise CheckpointError(f"{index} lists tensors absent from its shards: {missing[:10]}")
        return state
    single = path / SAFETENSORS_FILE
    if single.is_file():
        return _bf16_safe_read(single)
    listing = sorted(p.name for p in path.iterdir())
    raise CheckpointError(
        f"{path} holds neither {SAFETENSORS_FILE} nor {SAFETENSORS_INDEX} (found: {listing}). "
        "PyTorch .bin checkpoints are not read; convert them with save_pretrained(safe_serialization=True)."
    )


# A conversion rule: HF key -> transform of the numpy tensor. Model files build a dict
# {flax_path_tuple: (hf_key, transform)} and hand it to `convert_state_dict`.
Transform = Callable[[np.ndarray], np.ndarray]


def identity(x: np.ndarray) -> np.ndarray:
    return x


def transpose(x: np.ndarray) -> np.ndarray:
    """torch Linear weights are [out, in]; Flax Dense kernels are [in, out]."""
    return np.ascontiguousarray(x.T)


def convert_state_dict(
    state: Mapping[str, np.ndarray],
    rules: Mapping[tuple[str, ...], tuple[str, Transform]],
    expected: Any,
    *,
    ignore: Iterable[str] = (),
    dtype: Any = np.float32,
) -> dict:
    """Builds a Flax params tree from a state dict, failing loudly on any mismatch.

    Args:
      state: HF key -> array.
      rules: Flax param path (tuple of names, without the leading 'params') -> (HF key, transform).
      expected: a params tree of ShapeDtypeStructs (e.g. `jax.eval_shape(model.init, ...)['params']`);
        every leaf must be covered by a rule and match its shape.
      ignore: regexes of HF keys that may be present but are not parameters (buffers, unused heads).
      dtype: dtype of the returned leaves.

    Returns:
      The nested params dict.

    Raises:
      CheckpointError naming every missing, unexpected and mis-shaped key.
    """
    flat_expected = {
        tuple(getattr(k, "key", getattr(k, "name", str(k))) for k in path): leaf
        for path, leaf in jax.tree_util.tree_flatten_with_path(expected)[0]
    }
    ignore_re = [re.compile(p) for p in ignore]
    missing, mis_shaped, uncovered = [], [], []
    params: dict = {}
    used = set()
    for flax_path, leaf in flat_expected.items():
        if flax_path not in rules:
            uncovered.append("/".join(flax_path))
            continue
        hf_key, fn = rules[flax_path]
        if hf_key not in state:
            missing.append(hf_key)
            continue
        value = fn(np.asarray(state[hf_key]))
        used.add(hf_key)
        if tuple(value.shape) != tuple(leaf.shape):
            mis_shaped.append(f"{hf_key}: checkpoint {tuple(value.shape)} vs model {tuple(leaf.shape)}")
            continue
        node = params
        for name in flax_path[:-1]:
            node = node.setdefault(name, {})
        node[flax_path[-1]] = np.asarray(value, dtype=dtype)
    unexpected = sorted(
        k for k in state if k not in used and not any(r.fullmatch(k) or r.search(k) for r in ignore_re)
    )
    problems = []
    if uncovered:
        problems.append(f"model parameters with no conversion rule: {uncovered}")
    if missing:
        problems.append(f"missing checkpoint keys: {missing}")
    if mis_shaped:
        problems.append(f"mis-shaped keys: {mis_shaped}")
    if unexpected:
        problems.append(f"unexpected checkpoint keys: {unexpected}")
    if problems:
        raise CheckpointError("checkpoint does not match the model; " + "; ".join(problems))
    return params


def save_orbax(path: PathLike, params: Any, metadata: Mapping[str, Any] | None = None) -> None:
    """Saves converted params (and a JSON-able metadata dict, e.g. the model config) with Orbax.

    The write is atomic: Orbax finalizes into `path` only after all data is on disk.
    """
    import orbax.checkpoint as ocp

    path = absolute(path)
    with ocp.StandardCheckpointer() as ckptr:
        ckptr.save(path / "params", params, force=True)
        ckptr.wait_until_finished()
    atomic_write_json(path / "metadata.json", dict(metadata or {}))


def restore_orbax(path: PathLike) -> tuple[Any, dict[str, Any]]:
    """Restores (params, metadata) written by `save_orbax`, as host numpy arrays."""
    import orbax.checkpoint as ocp

    path = absolute(path)
    if not (path / "params").is_dir():
        raise CheckpointError(f"no Orbax params checkpoint under {path}")
    with ocp.StandardCheckpointer() as ckptr:
        params = ckptr.restore(path / "params")
    meta_file = path / "metadata.json"
    metadata = json.loads(meta_file.read_text()) if meta_file.is_file() else {}
    return params, metadata
