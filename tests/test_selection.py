"""Layer selection on hand-made ID profiles of every shape the rule distinguishes."""

import numpy as np
import pytest

from idjax.selection import (
    BRANCHES,
    FLAT,
    NO_SIGNIFICANT_MINIMUM,
    NO_SIGNIFICANT_PEAK,
    PLATEAU_START,
    RELATIVE_MINIMUM,
    select_layer,
)


def test_paper_shape_rise_fall_plateau():
    choice = select_layer([5, 12, 20, 24, 18, 11, 8, 9, 9.5, 9.2, 9.4])
    assert (choice.peak, choice.selected, choice.branch) == (3, 6, RELATIVE_MINIMUM)
    assert "layer 6" in choice.rule and "layer 3" in choice.rule


def test_tall_late_peak_does_not_replace_the_first_peak():
    # The global maximum (layer 10) comes after the first peak; the paper's layer is the minimum after layer 3.
    choice = select_layer([5, 9, 12, 14, 11, 8, 6, 9, 12, 15, 16, 15, 14])
    assert (choice.peak, choice.selected, choice.branch) == (3, 6, RELATIVE_MINIMUM)


def test_high_input_layer_is_set_aside_for_the_models_own_peak():
    choice = select_layer([18, 9, 12, 15, 13, 10, 7, 5, 6, 8, 9, 9])
    assert (choice.peak, choice.selected, choice.branch) == (3, 7, RELATIVE_MINIMUM)
    assert "layer 0" in choice.rule


def test_input_layer_peak_is_used_when_no_later_peak_is_significant():
    # The demo's profile shape: the pixel embedding is the peak, the ID minimum comes right after it.
    ids = [11.7, 8.8, 9.3, 9.8, 10.8]
    choice = select_layer(ids, np.array(ids) / np.sqrt(1797))
    assert (choice.peak, choice.selected, choice.branch) == (0, 1, RELATIVE_MINIMUM)
    # A wiggle after the input peak (9 -> 9.2 -> 9.1) is no peak of the model's own.
    assert select_layer([18, 9, 9.2, 9.1, 8, 10]).peak == 0


def test_low_plateau_selects_its_start():
    choice = select_layer([6, 10, 14, 16, 12, 8, 6, 6.1, 5.9, 6.0, 6.1, 5.95])
    assert (choice.peak, choice.selected, choice.branch) == (3, 6, PLATEAU_START)
    # The small trained ESM-2's profile: input peak, then flat within the error bars from layer 1.
    choice = select_layer([14.4, 12.8, 13.2, 13.2, 13.2], np.full(5, 0.18))
    assert (choice.peak, choice.selected, choice.branch) == (0, 1, PLATEAU_START)


def test_plateau_needs_min_plateau_layers():
    ids = [6, 10, 14, 16, 12, 8, 6, 6.1]
    assert select_layer(ids, min_plateau=2).branch == PLATEAU_START
    choice = select_layer(ids, min_plateau=3)
    assert (choice.selected, choice.branch) == (None, NO_SIGNIFICANT_MINIMUM)


def test_shallow_minimum_is_significant_or_not_by_its_error_bars():
    ids = [5, 10, 14, 16, 12, 10, 8, 8.8, 9.2, 9.0, 9.1]
    # Rise 8 -> 9.2 = 1.2 > 2 x hypot(0.2, 0.2) = 0.57: a real minimum.
    choice = select_layer(ids, np.full(len(ids), 0.2))
    assert (choice.selected, choice.branch) == (6, RELATIVE_MINIMUM)
    # The same rise within 2 x hypot(0.5, 0.5) = 1.41: no minimum; the tail from layer 6 is a plateau.
    choice = select_layer(ids, np.full(len(ids), 0.5))
    assert (choice.selected, choice.branch) == (6, PLATEAU_START)


def test_insignificant_dip_is_passed_over_for_the_real_minimum():
    errors = np.ones(11)
    # Layer 4 is a local minimum, but the rise after it (1.2) is within 2 combined standard errors.
    assert select_layer([5, 14, 22, 20, 12, 12.9, 13.2, 8, 10, 11, 11], errors).selected == 7
    # The same shape with a significant rise is a real minimum.
    assert select_layer([5, 14, 22, 20, 12, 16, 17, 8, 10, 11, 11], errors).selected == 4
    # Without error bars the span fraction min_rise (5%) guards against tiny wiggles.
    assert select_layer([5, 14, 22, 20, 12, 12.3, 12.2, 8, 10, 11, 11]).selected == 7


def test_first_valley_wins_over_a_lower_last_layer():
    assert select_layer([3, 10, 6, 7, 8, 2]).selected == 2


def test_monotone_increase_has_no_peak():
    choice = select_layer(np.arange(1.0, 11.0))
    assert (choice.peak, choice.selected, choice.branch) == (None, None, NO_SIGNIFICANT_PEAK)
    assert "no layer selected" in choice.rule


def test_monotone_decrease_has_no_minimum():
    choice = select_layer(np.arange(10.0, 0.0, -1.0), np.full(10, 0.1))
    assert (choice.peak, choice.selected, choice.branch) == (0, None, NO_SIGNIFICANT_MINIMUM)


def test_flat_profile():
    assert select_layer([5, 5.1, 4.9, 5, 5.05], np.full(5, 0.2)).branch == FLAT
    assert select_layer([3.0, 3.0, 3.0]) == (None, None, FLAT, select_layer([3.0, 3.0, 3.0]).rule)
    # The same wiggles with tight error bars are a profile: the wiggle at layer 1 is a significant peak.
    assert select_layer([5, 5.1, 4.9, 5, 5.05], np.full(5, 0.01)).branch in BRANCHES


def test_validation():
    with pytest.raises(ValueError, match="at least one layer"):
        select_layer([])
    assert select_layer([1, 2]).branch == NO_SIGNIFICANT_PEAK
    assert select_layer([2, 1]).branch == NO_SIGNIFICANT_MINIMUM
    with pytest.raises(ValueError, match="NaN"):
        select_layer([1, np.nan, 2, 3])
    with pytest.raises(ValueError, match="errors has shape"):
        select_layer([1, 2, 3], [1, 2])
    with pytest.raises(ValueError, match="finite and >= 0"):
        select_layer([1, 2, 3], [1, -2, 1])
    with pytest.raises(ValueError, match="finite and >= 0"):
        select_layer([1, 2, 3], [1, np.nan, 1])
    for bad in ({"z": -1.0}, {"min_drop": np.nan}, {"min_rise": -0.1}, {"z": "2"}):
        with pytest.raises(ValueError, match=f"{next(iter(bad))} must be a finite number >= 0"):
            select_layer([1, 3, 2, 4], **bad)
    for bad in (0, -1, 2.5):
        with pytest.raises(ValueError, match="min_plateau must be an integer >= 1"):
            select_layer([1, 3, 2, 4], min_plateau=bad)
