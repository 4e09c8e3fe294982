"""Locating the layer of the ID profile that the paper associates with the most semantic content.

The paper's layer is the relative ID minimum after the *first* peak of the profile (Valeriani et al.
2023). On a measured profile "peak" and "minimum" must be told apart from noise, so every comparison
between two layers a < b is a significance test with the layers' standard errors e:

  a significant *drop* from a to b:  ID[a] - ID[b] > max(z * sqrt(e[a]^2 + e[b]^2), min_drop * span)
  a significant *rise* from a to b:  ID[b] - ID[a] > max(z * sqrt(e[a]^2 + e[b]^2), min_rise * span)

with span = max(ID) - min(ID). The error-bar term rejects what the estimator's noise explains; the
span term rejects wiggles that are tiny relative to the profile's own shape when errors are small
or unknown (None counts as 0).

1. **Peak.** A layer p is a significant peak when it is a local maximum (>= both neighbours), there is
   a significant drop from p to the lowest layer after it before the profile first exceeds ID[p], and
   (p > 0) a significant rise into p from the lowest layer before it since the profile last exceeded
   ID[p] (topographic prominence on both sides). The last layer has nothing after it and is never a
   peak. The first peak is the first significant peak among layers >= 1; layer 0 (the input embedding)
   is taken only when no later layer is a significant peak, because a high input ID reflects the raw
   input (pixels, one-hot-like token embeddings), not the model's processing.
2. **Minimum** (branch ``relative_minimum``). The first layer m after the peak that is a local minimum
   (<= both neighbours, so never the last layer), with a significant drop into it from the highest
   layer between the peak and m, and a significant rise out of it to the highest layer after m before
   the profile first falls below ID[m]. Insignificant dips on the way down are passed over. When the
   valley has a floor (layers just before m that do not differ significantly from ID[m]), the selected
   layer is the floor's first layer: those layers are indistinguishable from the minimum, and the
   first of them is where the representation reaches it (the same choice as the plateau start).
3. **Plateau start** (branch ``plateau_start``). Without such a minimum, when the profile falls to a low
   plateau and stays there (as protein language models do): the first layer m after the peak such that
   no later layer differs significantly from it (|ID[j] - ID[m]| within the rise threshold), with at
   least `min_plateau` layers from m to the end, and a significant drop from the peak to the plateau.
4. Otherwise no layer is selected (``selected=None``) and the branch says why:
   ``no_significant_minimum`` (a peak, then a fall to the last layer without a minimum or plateau),
   ``no_significant_peak`` (e.g. an ID that only rises) or ``flat`` (no two layers differ significantly).
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

RELATIVE_MINIMUM = "relative_minimum"
PLATEAU_START = "plateau_start"
NO_SIGNIFICANT_MINIMUM = "no_significant_minimum"
NO_SIGNIFICANT_PEAK = "no_significant_peak"
FLAT = "flat"
BRANCHES = (RELATIVE_MINIMUM, PLATEAU_START, NO_SIGNIFICANT_MINIMUM, NO_SIGNIFICANT_PEAK, FLAT)


class LayerChoice(NamedTuple):
    """peak: the first significant peak (None if none); selected: the chosen layer (None if none);
    branch: which rule fired (one of `BRANCHES`); rule: the same in a sentence, with the layers."""

    peak: int | None
    selected: int | None
    branch: str
    rule: str


def select_layer(ids, errors=None, *, z: float = 2.0, min_drop: float = 0.1, min_rise: float = 0.05,
                 min_plateau: int = 3) -> LayerChoice:
    """The relative ID minimum after the first significant peak (see the module docstring).

    Args:
      ids: (L+1,) ID per layer, input embedding first.
      errors: (L+1,) standard errors of `ids` (None: 0, so only the span fractions guard against noise).
      z: significance of a drop or rise in combined standard errors.
      min_drop: smallest significant drop, as a fraction of the profile's span.
      min_rise: smallest significant rise (and the plateau's tolerance), as a fraction of the span.
      min_plateau: fewest layers (including the last) a final plateau must have.

    Returns:
      LayerChoice(peak, selected, branch, rule).
    """
    ids = np.asarray(ids, np.float64)
    if ids.ndim != 1 or len(ids) < 1:
        raise ValueError(f"need a 1-D ID profile with at least one layer; got shape {ids.shape}")
    if not np.isfinite(ids).all():
        raise ValueError(f"the ID profile contains NaN/inf at layers {np.flatnonzero(~np.isfinite(ids)).tolist()}")
    errors = np.zeros_like(ids) if errors is None else np.asarray(errors, np.float64)
    if errors.shape != ids.shape:
        raise ValueError(f"errors has shape {errors.shape}, ids has {ids.shape}")
    if not np.isfinite(errors).all() or (errors < 0).any():
        raise ValueError("errors must be finite and >= 0 (standard errors of the IDs)")
    if not isinstance(min_plateau, int | np.integer) or min_plateau < 1:
        raise ValueError(f"min_plateau must be an integer >= 1; got {min_plateau!r}")
    for name, value in (("z", z), ("min_drop", min_drop), ("min_rise", min_rise)):
        if not isinstance(value, int | float | np.number) or not np.isfinite(value) or value < 0:
            raise ValueError(f"{name} must be a finite number >= 0; got {value!r}")
    n = len(ids)
    span = float(ids.max() - ids.min())

    def threshold(a: int, b: int, fraction: float) -> float:
        return max(z * float(np.hypot(errors[a], errors[b])), fraction * span)

    def drops(a: int, b: int) -> bool:
        return ids[a] - ids[b] > threshold(a, b, min_drop)

    def rises(a: int, b: int) -> bool:
        return ids[b] - ids[a] > threshold(a, b, min_rise)

    def differ(a: int, b: int) -> bool:
        return abs(ids[a] - ids[b]) > threshold(a, b, min_rise)

    def run_while(start: int, step: int, keep) -> list[int]:
        out, j = [], start
        while 0 <= j < n and keep(ids[j]):
            out.append(j)
            j += step
        return out

    def is_peak(p: int) -> bool:
        if p == n - 1 or ids[p] < ids[p + 1] or (p > 0 and ids[p] < ids[p - 1]):
            return False
        right = run_while(p + 1, 1, lambda v: v <= ids[p])
        if not drops(p, min(right, key=ids.__getitem__)):
            return False
        if p == 0:
            return True
        left = run_while(p - 1, -1, lambda v: v <= ids[p])
        return rises(min(left, key=ids.__getitem__), p)

    def flat(layers: range) -> bool:
        return not any(differ(a, b) for a in layers for b in layers if a < b)

    peaks = [p for p in range(n) if is_peak(p)]
    model_peaks = [p for p in peaks if p > 0]
    if not peaks:
        if flat(range(n)):
            return LayerChoice(None, None, FLAT, "no two layers differ significantly: no layer selected")
        return LayerChoice(None, None, NO_SIGNIFICANT_PEAK,
                           "the profile has no significant peak (e.g. the ID only rises): no layer selected")
    peak = model_peaks[0] if model_peaks else 0
    where = f"the first significant peak (layer {peak})" if peak else "the input layer's peak (layer 0)"
    if not model_peaks:
        where += ", no later layer being a significant peak"
    elif 0 in peaks:
        where += ", layer 0's input peak set aside"

    for m in range(peak + 1, n - 1):
        if ids[m] > ids[m - 1] or ids[m] > ids[m + 1]:
            continue
        top_before = peak + int(np.argmax(ids[peak:m]))
        after = run_while(m + 1, 1, lambda v, m=m: v >= ids[m])
        top_after = max(after, key=ids.__getitem__)
        if drops(top_before, m) and rises(m, top_after):
            floor = m
            while floor - 1 > peak and not differ(floor - 1, m):
                floor -= 1
            detail = f" (the valley floor's first layer; lowest layer {m})" if floor < m else ""
            return LayerChoice(peak, floor, RELATIVE_MINIMUM,
                               f"layer {floor}: the first significant relative minimum{detail} after {where}")
    for m in range(peak + 1, n - min_plateau + 1):
        if not any(differ(m, j) for j in range(m + 1, n)):
            if drops(peak, m + int(np.argmin(ids[m:]))):
                return LayerChoice(peak, m, PLATEAU_START,
                                   f"layer {m}: the start of the low plateau ({n - m} layers) after {where}")
            break
    return LayerChoice(peak, None, NO_SIGNIFICANT_MINIMUM,
                       f"no significant relative minimum or low plateau of >= {min_plateau} layers after {where}:"
                       " no layer selected")
