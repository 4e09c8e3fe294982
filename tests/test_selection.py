"""Layer selection on hand-made ID profiles."""

import numpy as np
import pytest

from idjax.selection import running_median, select_layer


def test_rise_fall_plateau():
    ids = [5, 12, 20, 24, 18, 11, 8, 9, 9.5, 9.2, 9.4]
    choice = select_layer(ids)
    assert choice.peak in (2, 3) and choice.selected == 6


def test_second_shallow_peak():
    ids = [4, 15, 22, 16, 10, 7, 9, 13, 12, 11]
    assert select_layer(ids).selected == 5


def test_noisy_single_layer_neither_creates_nor_hides_a_minimum():
    # A single-layer dip at 4 (noise) must not be chosen; the true valley is at 7.
    ids = [5, 14, 22, 20, 12, 17, 14, 8, 10, 11, 11]
    assert select_layer(ids).selected == 7
    # A single-layer spike must not be taken as the peak.
    ids = [5, 40, 10, 14, 16, 12, 8, 9, 10]
    choice = select_layer(ids)
    assert choice.peak in (2, 3, 4) and choice.selected == 6


def test_monotone_decrease_after_peak_picks_lowest():
    choice = select_layer([3, 10, 9, 8, 7, 6, 5])
    assert choice.selected == 6 and "global minimum" in choice.rule


def test_validation():
    with pytest.raises(ValueError, match="at least 3"):
        select_layer([1, 2])
    with pytest.raises(ValueError, match="NaN"):
        select_layer([1, np.nan, 2, 3])


def test_running_median():
    np.testing.assert_allclose(running_median([1, 9, 2, 8, 3]), [1, 2, 8, 3, 3])
