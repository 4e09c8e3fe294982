"""Locating the layer of the ID profile that the paper associates with the most semantic content.

The profile rises to a peak, falls to a relative minimum, then plateaus or forms a second, shallower
peak. The rule (documented in the README and tested against hand-made profiles), on the raw profile
with its error bars:

1. The peak is the layer of the largest ID.
2. Walking forward from the peak, the selected layer is the first layer m that
   (a) is the lowest within +-`window` layers (not looking back past the peak),
   (b) lies at least `min_drop` x depth below the peak (depth = peak - lowest ID after it), and
   (c) is followed by a significant rise: within the next `window` layers the ID climbs above ID[m]
       by more than max(`z` x the combined error bar, `min_rise` x depth). A dip that noise could
       explain is therefore passed over, and so is a minimum at the very last layer.
3. If no layer qualifies (e.g. a profile that only decreases), the lowest layer after the peak.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np


class LayerChoice(NamedTuple):
    """peak: index of the ID maximum; selected: index of the relative minimum after it."""

    peak: int
    selected: int
    rule: str


def select_layer(ids, errors=None, *, window: int = 2, min_drop: float = 0.1, min_rise: float = 0.05,
                 z: float = 2.0) -> LayerChoice:
    """Picks the first significant relative minimum of the ID profile after its global maximum.

    Args:
      ids: (L+1,) ID per layer, input embedding first.
      errors: (L+1,) standard errors of `ids` (None: treated as 0, so only `min_rise` guards noise).
      window: a minimum must be the lowest within +-window layers, and the rise must come within
        `window` layers after it.
      min_drop: fraction of the depth the minimum must lie below the peak.
      min_rise: fraction of the depth the following rise must at least reach.
      z: significance of the rise in combined standard errors.

    Returns:
      LayerChoice(peak, selected, rule).
    """
    ids = np.asarray(ids, np.float64)
    if ids.ndim != 1 or len(ids) < 1:
        raise ValueError(f"need a 1-D ID profile with at least one layer; got shape {ids.shape}")
    if not np.isfinite(ids).all():
        raise ValueError(f"the ID profile contains NaN/inf at layers {np.flatnonzero(~np.isfinite(ids)).tolist()}")
    errors = np.zeros_like(ids) if errors is None else np.asarray(errors, np.float64)
    if errors.shape != ids.shape:
        raise ValueError(f"errors has shape {errors.shape}, ids has {ids.shape}")
    peak = int(np.argmax(ids))
    after = np.arange(peak + 1, len(ids))
    if len(after) == 0:
        return LayerChoice(peak, peak, "peak at the last layer: no minimum after it")
    depth = ids[peak] - ids[peak:].min()
    for m in after[:-1]:
        neighbourhood = ids[max(peak, m - window) : m + window + 1]
        following = slice(m + 1, m + window + 1)
        rise = ids[following] - ids[m]
        noise = z * np.sqrt(errors[m] ** 2 + errors[following] ** 2)
        significant_rise = np.any(rise > np.maximum(noise, min_rise * depth))
        if ids[m] <= neighbourhood.min() and ids[peak] - ids[m] >= min_drop * depth and significant_rise:
            return LayerChoice(peak, int(m), f"first significant relative minimum (window {window}, z {z})")
    return LayerChoice(peak, int(after[np.argmin(ids[after])]), "lowest layer after the peak (no significant minimum)")
