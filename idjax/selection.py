"""Locating the layer of the ID profile that the paper associates with the most semantic content.

The profile rises to a peak, falls to a relative minimum, then plateaus or forms a second, shallower
peak. The rule (documented in the README and tested against hand-made profiles):

1. Smooth the profile with a centred running median of width 3 (the two end layers are kept as
   they are), so one noisy layer can neither create nor hide a minimum.
2. The peak is the global maximum of the smoothed profile.
3. The selected layer is the first layer after the peak that is a minimum of the smoothed profile
   within +-`window` layers and lies at least `min_drop` (relative to the peak height above the
   profile's lowest value) below the peak, with at least one layer after it (so the profile can be
   seen to turn). If none qualifies (e.g. a profile that only decreases), it is the smoothed global
   minimum after the peak.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np


class LayerChoice(NamedTuple):
    """peak: index of the ID maximum; selected: index of the relative minimum after it; smoothed: (L+1,)."""

    peak: int
    selected: int
    smoothed: np.ndarray
    rule: str


def running_median(values: np.ndarray, width: int = 3) -> np.ndarray:
    """Centred running median; the first and last `width // 2` values are kept unchanged."""
    values = np.asarray(values, np.float64)
    half = width // 2
    out = values.copy()
    for i in range(half, len(values) - half):
        out[i] = np.median(values[i - half : i + half + 1])
    return out


def select_layer(ids, *, window: int = 2, min_drop: float = 0.1, smooth: bool = True) -> LayerChoice:
    """Picks the first relative minimum of the ID profile after its global maximum.

    Args:
      ids: (L+1,) ID per layer, input embedding first.
      window: a minimum must be the lowest within +-window layers (of the smoothed profile).
      min_drop: it must sit at least this fraction of (peak - lowest) below the peak.
      smooth: apply the width-3 running median first.

    Returns:
      LayerChoice(peak, selected, smoothed, rule).
    """
    ids = np.asarray(ids, np.float64)
    if ids.ndim != 1 or len(ids) < 3:
        raise ValueError(f"need a 1-D ID profile of at least 3 layers; got shape {ids.shape}")
    if not np.isfinite(ids).all():
        raise ValueError(f"the ID profile contains NaN/inf at layers {np.flatnonzero(~np.isfinite(ids)).tolist()}")
    profile = running_median(ids) if smooth else ids
    peak = int(np.argmax(profile))
    after = np.arange(peak + 1, len(profile))
    if len(after) == 0:
        return LayerChoice(peak, peak, profile, "peak at the last layer: no minimum after it")
    depth = profile[peak] - profile[peak:].min()
    for layer in after[:-1]:
        lo, hi = max(peak, layer - window), min(len(profile), layer + window + 1)
        is_local_min = profile[layer] <= profile[lo:hi].min()
        deep_enough = profile[peak] - profile[layer] >= min_drop * depth
        if is_local_min and deep_enough and depth > 0:
            return LayerChoice(peak, int(layer), profile, f"first relative minimum within +-{window} after the peak")
    return LayerChoice(peak, int(after[np.argmin(profile[after])]), profile, "global minimum after the peak")
