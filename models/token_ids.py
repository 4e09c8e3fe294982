"""Token ids entering a model, checked once at the boundary: an id outside the vocabulary would be
looked up by Flax's `Embed` as a NaN row (ids >= vocab size are not clamped) or wrap to the last
token (-1), giving plausible-looking hidden states.

Concrete arrays (numpy, jax, lists) are checked on the host with one min/max; traced values (inside
`jax.jit`, `grad`) cannot be inspected and are left alone, so every public entry point checks its
concrete input before its jitted call.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np


def check_token_ids(tokens, vocab_size: int, *, name: str = "token ids", what: str = "vocabulary size"):
    """Returns `tokens` unchanged after checking it is an integer array with every id in [0, vocab_size).

    Raises:
      TypeError for a non-integer dtype; ValueError naming the first bad id, its position and the
      vocabulary size.
    """
    if isinstance(tokens, jax.core.Tracer):
        return tokens
    arr = tokens if hasattr(tokens, "dtype") and hasattr(tokens, "shape") else np.asarray(tokens)
    if not (jnp.issubdtype(arr.dtype, jnp.integer) or arr.dtype == bool):
        raise TypeError(f"{name} must be integers; got dtype {arr.dtype}")
    if arr.size == 0:
        return tokens
    # A concrete array can meet a jit trace as a closed-over constant: evaluate its min/max now
    # rather than staging them into the trace.
    with jax.ensure_compile_time_eval():
        lo, hi = (np.min(arr), np.max(arr)) if isinstance(arr, np.ndarray) else (jnp.min(arr), jnp.max(arr))
    if int(lo) < 0 or int(hi) >= vocab_size:
        host = np.asarray(arr)
        position = tuple(int(i) for i in np.argwhere((host < 0) | (host >= vocab_size))[0])
        raise ValueError(
            f"{name} contain id {int(host[position])} at position {position}, outside [0, {vocab_size}) for "
            f"{what} {vocab_size}; tokenize with this model's own tokenizer/palette"
        )
    return tokens
