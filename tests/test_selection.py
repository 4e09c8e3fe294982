"""Layer selection on hand-made ID profiles."""

import numpy as np
import pytest

from idjax.selection import select_layer


def test_rise_fall_plateau():
    ids = [5, 12, 20, 24, 18, 11, 8, 9, 9.5, 9.2, 9.4]
    assert select_layer(ids) == (3, 6, select_layer(ids).rule)


def test_second_shallow_peak():
    assert select_layer([4, 15, 22, 16, 10, 7, 9, 13, 12, 11]).selected == 5


def test_dip_within_the_error_bars_is_passed_over():
    errors = np.ones(11)
    # Layer 4 is a local minimum, but the rise after it (1.2) is within 2 combined standard errors.
    ids = [5, 14, 22, 20, 12, 12.9, 13.2, 8, 10, 11, 11]
    assert select_layer(ids, errors).selected == 7
    # The same shape with a significant rise is a real minimum.
    ids = [5, 14, 22, 20, 12, 16, 17, 8, 10, 11, 11]
    assert select_layer(ids, errors).selected == 4
    # Without error bars the relative floor min_rise (5% of the depth) guards against tiny wiggles.
    assert select_layer([5, 14, 22, 20, 12, 12.3, 12.2, 8, 10, 11, 11]).selected == 7


def test_monotone_decrease_after_peak_picks_lowest():
    choice = select_layer([3, 10, 9, 8, 7, 6, 5])
    assert choice.selected == 6 and "lowest layer" in choice.rule


def test_first_valley_wins_over_a_lower_last_layer():
    # The paper's layer is the end of the first peak, even if the ID falls further at the very end.
    assert select_layer([3, 10, 6, 7, 8, 2]).selected == 2


def test_validation():
    with pytest.raises(ValueError, match="at least one layer"):
        select_layer([])
    assert select_layer([1, 2]).selected == 1  # too short for a minimum: the peak itself
    with pytest.raises(ValueError, match="NaN"):
        select_layer([1, np.nan, 2, 3])
    with pytest.raises(ValueError, match="errors has shape"):
        select_layer([1, 2, 3], [1, 2])
