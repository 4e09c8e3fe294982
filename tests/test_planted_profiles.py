"""The ID that drives selection, the estimator agreement, and the rule on layers of known (planted) ID."""

import tempfile
from pathlib import Path

import numpy as np
import pytest

from benchmarks import planted_profiles
from configs import base, paper
from experiments import profile, store


def test_decimation_level_keeps_a_sensible_subset_size():
    cfg = base.analysis_config().profile
    sizes = np.array([2000, 1000, 500, 250, 125, 62, 31])
    cfg.decimation_min_subset = 0
    assert sizes[profile.decimation_level(sizes, cfg)] == 62  # N / 32: the paper's ratio alone
    cfg.decimation_min_subset = 256
    assert sizes[profile.decimation_level(sizes, cfg)] == 250
    big = np.array([64000, 32000, 16000, 8000, 4000, 2000, 1000])
    assert big[profile.decimation_level(big, cfg)] == 2000  # large N: N / 32, the floor does not bind


def test_scale_plateau_takes_the_flattest_pair_of_scales():
    ids = np.array([20.0, 14.0, 10.0, 9.8, 9.0, 7.0])
    assert profile.scale_plateau(ids, np.array([1, 1, 1, 2, 1, 1.0])) == (9.9, 2.0)


def _reps(layers):
    n = layers[0].shape[0]
    return store.Representations(layers, None, [str(i) for i in range(n)], {"metadata": {}})


def test_profile_records_the_branch_and_the_estimator_agreement():
    dims = [4, 8, 12, 8, 5, 7, 9]
    layers = planted_profiles.planted_layers(dims, 600, 0.0, seed=0)
    cfg = base.analysis_config().profile
    with tempfile.TemporaryDirectory() as cache:
        summary, arrays = profile.compute_profile(_reps(layers), cfg, Path(cache))
    assert (summary["peak_layer"], summary["selected_layer"], summary["selection_branch"]) == (2, 4, "relative_minimum")
    assert "layer 4" in summary["selection_rule"]
    agreement = summary["estimator_agreement"]
    assert agreement["estimators"] == ["twonn", "gride", "twonn_decimated"]
    np.testing.assert_allclose(agreement["id"]["twonn"], arrays["twonn"])
    table = np.array([agreement["id"][name] for name in agreement["estimators"]])
    np.testing.assert_allclose(agreement["relative_spread"], np.ptp(table, 0) / np.median(table, 0))
    assert agreement["max_relative_spread"] < 0.3  # noise-free manifolds: every scale sees the planted ID


def test_profile_without_a_minimum_selects_nothing_and_says_so():
    layers = planted_profiles.planted_layers([3, 5, 7, 9, 11], 400, 0.0, seed=1)
    cfg = base.analysis_config().profile
    cfg.decimation = False
    with tempfile.TemporaryDirectory() as cache:
        summary, _ = profile.compute_profile(_reps(layers), cfg, Path(cache))
    assert summary["selected_layer"] is None and summary["selection_branch"] == "no_significant_peak"


def test_unknown_estimator_and_missing_decimation_are_named():
    metrics = {"indices": np.zeros((10, 2)), "twonn": 3.0}
    cfg = base.analysis_config().profile
    with pytest.raises(ValueError, match="unknown id_estimator 'twonm'"):
        profile.chosen_id(metrics, cfg, "twonm")
    with pytest.raises(ValueError, match="profile.decimation=True"):
        profile.chosen_id(metrics, cfg, "twonn_decimated")


def test_paper_preset():
    config = paper.get_config("igpt,s")
    assert config.model.family == "igpt" and config.model.size == "s"
    assert (config.profile.overlap_k, config.profile.twonn_fraction, config.profile.id_estimator) == (
        10, 0.98, "twonn_decimated")
    assert config.profile.decimation_target_ratio == 32 and config.profile.decimation_min_subset == 0
    assert 10 in config.profile.label_ks and 30 in config.profile.label_ks
    protein = paper.get_config("esm2,650M")
    assert (protein.profile.overlap_k, protein.profile.twonn_fraction) == (10, 0.98)
    assert protein.profile.id_estimator == "twonn" and protein.model.size == "650M"
    with pytest.raises(ValueError, match="family one of"):
        paper.get_config("vit")


@pytest.mark.slow
def test_planted_layer_is_found_up_to_noise_at_the_nearest_neighbour_distance():
    # The default estimator, every shape, noise 0-1x the nearest-neighbour distance, through the API and
    # the pipeline's profile code (the benchmark asserts they agree).
    result = planted_profiles.run(800, seeds=1, noise_levels=(0.0, 0.5, 1.0), verbose=False,
                                  estimators=[base.analysis_config().profile.id_estimator])
    assert result["max_api_pipeline_diff"] < 1e-6
    misses = [d for d in result["details"] if not d[-1]]
    assert not misses, misses
