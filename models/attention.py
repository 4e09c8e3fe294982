"""Softmax attention implementations that give the same float32 result, and the timed choice among them.

Which one is fastest depends on the backend, the CPU and the shape: XLA's CPU compiler turns the
[B, T, H, hd] einsums into transposes around small batched GEMMs, its softmax makes several passes over
the [B, H, T, T] logits, and the balance between the two moves with T and with the CPU's cache and GEMM
kernels. So "auto" measures instead of guessing: the first time a (platform, processor, dtype, shape
bucket) is seen, every candidate runs on random inputs of that shape and the fastest is kept, in memory
and in a JSON file under the user cache directory, so later processes on the same machine reuse it.

Implementations (q is scaled before the call; key_mask is bool [B, T], false at padding):
  einsum         logits and weighted sum as [B, T, H, hd] einsums, float32 softmax.
  heads_major    q, k, v transposed once to [B, H, T, hd]; padding as an additive bias; float32 softmax.
  heads_major_deferred  as heads_major, but the softmax's division is applied to the [B, H, T, hd] output
                 (T / hd times fewer divisions, one pass less over the logits).
  xla, cudnn     `jax.nn.dot_product_attention` with that implementation (cudnn: GPU, bf16/fp16 only).
All keep padding rows finite (a finite fill, never -inf) and are checked against each other and against
HF transformers by tests/test_esm2.py and tests/test_attention.py. Matmul precision is not part of the
choice: a lower precision changes the outputs, which the choice must not do.

Cache: `$IDJAX_CACHE_DIR/attention_choice.json` (default `$XDG_CACHE_HOME/idjax`, else `~/.cache/idjax`),
one entry per key with every candidate's time; delete the file to measure again. Writes are atomic;
two processes probing at once may each write, and the last one's entries win (the other's are measured
again next time). In a multi-process JAX job only process 0 measures, and every other process takes its
choice through JAX's coordination service (`experiments.distributed.share_from_writer`; not a collective,
since the choice is made while the model is traced), so all of them compile the same program.
"""

from __future__ import annotations

import functools
import logging
import math
import os
import pathlib
import platform
import time
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

log = logging.getLogger(__name__)

IMPLEMENTATIONS = ("einsum", "heads_major", "heads_major_deferred", "xla", "cudnn")
CHOICES = ("auto", *IMPLEMENTATIONS)
CACHE_FILE = "attention_choice.json"
# Below this many multiply-adds in q.k (B * H * T * T * hd) every candidate takes microseconds and a probe
# would cost more than it could save: "auto" then takes heads_major without measuring.
MIN_PROBED_WORK = 1 << 22
PROBE_REPEATS = 3

_FILL = float(jnp.finfo(jnp.float32).min)  # a finite "minus infinity": all-padding rows stay finite


def _einsum(q, k, v, key_mask, precision):
    logits = jnp.einsum("bqhd,bkhd->bhqk", q, k, precision=precision, preferred_element_type=jnp.float32)
    logits = jnp.where(key_mask[:, None, None, :], logits, _FILL)
    probs = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
    return jnp.einsum("bhqk,bkhd->bqhd", probs, v, precision=precision)


def _heads_major(q, k, v, key_mask, precision, *, deferred: bool):
    q, k, v = (x.transpose(0, 2, 1, 3) for x in (q, k, v))  # [B, H, T, hd]
    logits = jnp.einsum("bhqd,bhkd->bhqk", q, k, precision=precision, preferred_element_type=jnp.float32)
    if deferred:
        logits = jnp.where(key_mask[:, None, None, :], logits, _FILL)
        weights = jnp.exp(logits - logits.max(axis=-1, keepdims=True))
        out = jnp.einsum("bhqk,bhkd->bhqd", weights.astype(v.dtype), v, precision=precision,
                         preferred_element_type=jnp.float32)
        out = (out / weights.sum(axis=-1, keepdims=True)).astype(v.dtype)
    else:
        bias = jnp.where(key_mask, 0.0, _FILL).astype(jnp.float32)[:, None, None, :]
        probs = jax.nn.softmax(logits + bias, axis=-1).astype(v.dtype)
        out = jnp.einsum("bhqk,bhkd->bhqd", probs, v, precision=precision)
    return out.transpose(0, 2, 1, 3)


def attend(q: jax.Array, k: jax.Array, v: jax.Array, key_mask: jax.Array, *, implementation: str,
           precision: str | None = None) -> jax.Array:
    """Softmax attention over the keys where `key_mask` is true; q already scaled.

    Args:
      q, k, v: [B, T, H, hd] (same dtype).
      key_mask: bool [B, T].
      implementation: one of `CHOICES`; "auto" resolves through `choose` on the (static) shapes.
      precision: every matmul's precision (None: the backend default).

    Returns:
      [B, T, H, hd] in v.dtype.
    """
    if implementation == "auto":
        implementation = choose(q.shape, q.dtype)
    if implementation == "einsum":
        return _einsum(q, k, v, key_mask, precision)
    if implementation in ("heads_major", "heads_major_deferred"):
        return _heads_major(q, k, v, key_mask, precision, deferred=implementation == "heads_major_deferred")
    if implementation in ("xla", "cudnn"):
        return jax.nn.dot_product_attention(q, k, v, mask=key_mask[:, None, None, :], scale=1.0,
                                            implementation=implementation)
    raise ValueError(f"attention implementation must be one of {', '.join(CHOICES)}, got {implementation!r}")


# ---------------------------------------------------------------------------------------------------
# The timed choice


def cache_path() -> pathlib.Path:
    """Where measured choices are kept (see the module docstring)."""
    root = os.environ.get("IDJAX_CACHE_DIR") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache"), "idjax")
    return pathlib.Path(root) / CACHE_FILE


def processor_name() -> str:
    """The accelerator's device kind, or on CPU the processor's model name (so an Intel and an AMD host differ)."""
    device = jax.devices()[0]
    if device.platform != "cpu":
        return device.device_kind
    try:
        for line in pathlib.Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _bucket(n: int) -> int:
    return 1 << max(0, math.ceil(math.log2(max(n, 1))))


def choice_key(shape: Sequence[int], dtype) -> str:
    """Cache key: platform, processor, jax version, dtype and the shape rounded up to powers of two (B * H, T)
    with the exact head size."""
    b, t, h, hd = shape
    device = jax.devices()[0]
    return (f"{device.platform}|{processor_name()}|jax {jax.__version__}|{jnp.dtype(dtype).name}|"
            f"bh{_bucket(b * h)}|t{_bucket(t)}|hd{hd}")


def candidates(dtype) -> tuple[str, ...]:
    """The implementations worth timing on this backend for `dtype`."""
    names = ["einsum", "heads_major", "heads_major_deferred", "xla"]
    if jax.devices()[0].platform == "gpu" and jnp.dtype(dtype) in (jnp.bfloat16, jnp.float16):
        names.append("cudnn")
    return tuple(names)


def time_candidates(shape: Sequence[int], dtype, names: Sequence[str], repeats: int = PROBE_REPEATS) -> dict:
    """{name: best seconds of `repeats`} for each implementation on random inputs of `shape` [B, T, H, hd].

    Passes alternate between candidates, so a load change on a shared machine hits all of them alike.
    A candidate that fails to compile here (e.g. cudnn without a GPU) is left out.
    """
    b, t, h, hd = shape
    rng = np.random.default_rng(0)
    q, k, v = (jnp.asarray(rng.normal(size=shape).astype(np.float32) * hd**-0.5, dtype) for _ in range(3))
    key_mask = jnp.asarray(np.arange(t)[None, :] < rng.integers(t // 2 + 1, t + 1, size=(b, 1)))
    fns = {}
    for name in names:
        fn = jax.jit(functools.partial(attend, implementation=name))
        try:
            jax.block_until_ready(fn(q, k, v, key_mask))
        except Exception as e:  # noqa: BLE001 - an implementation unsupported here is simply not a candidate
            log.info("attention %s not available for %s %s: %s", name, shape, jnp.dtype(dtype).name, e)
            continue
        fns[name] = fn
    best = {name: math.inf for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            start = time.perf_counter()
            jax.block_until_ready(fn(q, k, v, key_mask))
            best[name] = min(best[name], time.perf_counter() - start)
    return best


def _read_cache(path: pathlib.Path) -> dict:
    from experiments import files

    try:
        entries = files.read_json(path, fix="delete it (it only caches measurements)")
    except files.CorruptFileError as e:
        if path.exists():
            log.warning("ignoring the attention-choice cache: %s", e)
        return {}
    return entries if isinstance(entries, dict) else {}


_chosen: dict[str, str] = {}


def choose(shape: Sequence[int], dtype, *, measure: Callable[..., dict] | None = None) -> str:
    """The fastest implementation for q of `shape` [B, T, H, hd] and `dtype` on this machine.

    Looked up in memory, then in the cache file; measured (and recorded in both) when neither has it.
    Work below `MIN_PROBED_WORK` is not measured (heads_major). Called at trace time (shapes are static):
    the measurement runs its own compiled functions on concrete inputs while the caller's trace waits.
    measure: `time_candidates` unless given (tests pass their own).
    """
    b, t, h, hd = shape
    if b * h * t * t * hd < MIN_PROBED_WORK:
        return "heads_major"
    key = choice_key(shape, dtype)
    if key not in _chosen:
        from experiments import distributed

        # Process 0 measures (or reads its cache) and the others take its answer: every process then compiles
        # the same program. Not a JAX collective: this runs while the caller's function is being traced.
        _chosen[key] = distributed.share_from_writer(f"attention/{key}", lambda: _measured_choice(key, shape, dtype,
                                                                                                 measure))
    return _chosen[key]


def _measured_choice(key: str, shape: Sequence[int], dtype, measure: Callable | None) -> str:
    """This process's choice for `key`: from the cache file, else measured now and recorded."""
    path = cache_path()
    entry = _read_cache(path).get(key)
    if not (isinstance(entry, dict) and entry.get("choice") in IMPLEMENTATIONS):
        seconds = (measure or time_candidates)(shape, dtype, candidates(dtype))
        entry = {"choice": min(seconds, key=seconds.get), "shape": list(shape),
                 "ms": {name: round(s * 1e3, 3) for name, s in seconds.items()}}
        log.info("attention for %s: %s (measured, ms: %s)", key, entry["choice"], entry["ms"])
        _record(path, key, entry)
    return entry["choice"]


def _record(path: pathlib.Path, key: str, entry: dict) -> None:
    from experiments import files

    if jax.process_index() != 0:
        return
    try:
        files.atomic_write_json(path, {**_read_cache(path), key: entry})
    except OSError as e:  # a read-only home only costs a new measurement in the next process
        log.warning("could not record the attention choice in %s: %s", path, e)
