"""The paper's claims per training step (experiments/over_training.py), on hand-made profiles."""

import json

from experiments import over_training


def _results(ids, peak, selected, branch, best_overlap, best_probe, adjacent):
    return {"id": ids, "id_err": [0.1] * len(ids), "peak_layer": peak, "selected_layer": selected,
            "selection_branch": branch, "best_overlap_layer": best_overlap, "id_estimator": "gride", "n_points": 100,
            "label_ks": [10, 30], "best_overlap_k": 30, "adjacent_overlap": adjacent,
            "label_overlap": [[0.2 * i, 0.1 * i] for i in range(len(ids))],
            "probes": {"best_probe_layer": best_probe, "best_probe_metric": "linear_probe_accuracy",
                       "linear_probe_accuracy": [0.5] * len(ids)}}


# Layers 0..8: rises to a peak at 2, falls to a minimum at 4, then a plateau; consecutive-layer overlap
# low while the representation is reshaped and flat near 0.9 from layer 4 on.
PAPER_SHAPE = _results([5, 9, 12, 8, 6, 6.5, 6.4, 6.6, 6.5], 2, 4, "relative_minimum", 4, 5,
                       [0.3, 0.4, 0.5, 0.6, 0.9, 0.92, 0.95, 0.93, None])
RISING = _results([4, 5, 6, 7, 8, 9, 10, 11, 12], None, None, "no_significant_peak", 8, 8,
                  [0.5] * 8 + [None])


def test_the_paper_shape_satisfies_every_claim():
    claims = over_training.step_claims(PAPER_SHAPE)
    assert {name: claims[name]["holds"] for name in over_training.CLAIMS} == dict.fromkeys(over_training.CLAIMS, True)
    assert claims["overlap_plateau"]["after"] == [0.9, 0.92, 0.95, 0.93]


def test_each_claim_fails_for_its_own_reason():
    rising = over_training.step_claims(RISING)
    assert not any(rising[name]["holds"] for name in over_training.CLAIMS)
    input_peak = over_training.step_claims({**PAPER_SHAPE, "peak_layer": 0})  # only the input is a peak
    assert not input_peak["early_peak"]["holds"] and not input_peak["minimum_after"]["holds"]
    late_peak = over_training.step_claims({**PAPER_SHAPE, "peak_layer": 5})  # past half the depth (8 / 2)
    assert not late_peak["early_peak"]["holds"]
    far_probe = over_training.step_claims({**PAPER_SHAPE, "probes": {**PAPER_SHAPE["probes"], "best_probe_layer": 6}})
    assert not far_probe["semantic_layer"]["holds"] and far_probe["early_peak"]["holds"]
    wobbly = over_training.step_claims({**PAPER_SHAPE, "adjacent_overlap": [0.3, 0.4, 0.5, 0.6, 0.9, 0.7, 0.95, 0.93,
                                                                           None]})
    assert not wobbly["overlap_plateau"]["holds"] and wobbly["overlap_plateau"]["range_after"] > 0.1


def test_summary_table_and_figures_from_a_sweep_directory(tmp_path, capsys):
    for step, results in ((0, RISING), (30, RISING), (1000, PAPER_SHAPE)):
        (tmp_path / f"step_{step:06d}").mkdir()
        (tmp_path / f"step_{step:06d}" / "results.json").write_text(json.dumps(results))
    summary = over_training.summarize(tmp_path)
    assert summary["steps"] == [0, 30, 1000]
    assert summary["emerges"] == {"holds": True, "first_step": 0, "final_step": 1000, "shape_at_first": False,
                                  "shape_at_final": True}
    assert not over_training.summarize(tmp_path)["per_step"]["30"]["early_peak"]["holds"]
    over_training.main([str(tmp_path)])
    table = (tmp_path / "claims.md").read_text()
    assert "| 1. an early ID peak in the learned layers | holds | peak at layer 2 of 8 (ID 12.00) | does not hold |" \
        in table
    assert json.loads((tmp_path / "claims.json").read_text())["final"]["emerges"] is True
    for name in ("over_training", "id_heatmap"):
        assert (tmp_path / f"{name}.png").stat().st_size > 10_000 and (tmp_path / f"{name}.pdf").is_file()
    (tmp_path / "step_000000" / "results.json").unlink()  # without the untrained control it cannot be decided
    assert over_training.summarize(tmp_path)["emerges"]["holds"] is None
    assert "| 5. the profile emerges with training (claims 1-2 absent at step 0, present at the end) | not decidable " \
        "| needs the untrained control (step 0) and a later step; the sweep has steps 30, 1000 | |" \
        in over_training.claims_table(over_training.summarize(tmp_path))
