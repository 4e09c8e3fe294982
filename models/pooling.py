"""Pooling of per-token hidden states to one vector per example, shared by every model family."""

from __future__ import annotations

import jax
import jax.numpy as jnp


@jax.jit
def masked_mean(hidden: jax.Array, mask: jax.Array) -> jax.Array:
    """Mean over the positions where `mask` is true, accumulated in float32.

    Args:
      hidden: (..., B, T, D) hidden states (any float dtype; bf16 is fine).
      mask: (B, T) bool/int, true at the positions to average (e.g. residues, not specials/padding).

    Returns:
      (..., B, D) float32 means. An all-false row is an error upstream; here it yields 0, never NaN.
    """
    weights = mask.astype(jnp.float32)
    total = jnp.einsum("...btd,bt->...bd", hidden.astype(jnp.float32), weights,
                       precision=jax.lax.Precision.HIGHEST)
    count = jnp.maximum(weights.sum(-1), 1.0)
    return total / count[:, None]


@jax.jit
def first_token(hidden: jax.Array) -> jax.Array:
    """The vector at position 0 (`<cls>` / start token): (..., B, T, D) -> (..., B, D) float32."""
    return hidden[..., 0, :].astype(jnp.float32)
