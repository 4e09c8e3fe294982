"""Figures and tables: axes fit small overlaps (ESM-2's 0.03-0.2), integer layer ticks, chance levels, PDF."""

import matplotlib.pyplot as plt
import numpy as np

from experiments import report


def _run(n_layers=6, name="run"):
    depth = np.arange(n_layers) / (n_layers - 1)
    overlap = np.linspace(0.03, 0.2, n_layers)[:, None]
    results = {"selected_layer": 3, "peak_layer": 1, "id_estimator": "twonn", "selection_rule": "first minimum",
               "label_ks": [30], "best_overlap_k": 30, "adjacent_overlap_k": 30, "chance_label_overlap": 0.02,
               "chance_accuracy": 0.1, "id": list(range(n_layers)), "id_err": [0.1] * n_layers, "n_points": 100,
               "adjacent_overlap": [0.5] * (n_layers - 1), "label_overlap": overlap.tolist()}
    arrays = {"relative_depth": depth, "id": np.array([10, 14, 12, 9, 11, 12.0])[:n_layers],
              "id_err": np.full(n_layers, 0.3), "label_overlap": overlap,
              "label_overlap_err": np.full((n_layers, 1), 0.01),
              "adjacent_overlap": np.full(n_layers - 1, 0.5), "adjacent_overlap_err": np.full(n_layers - 1, 0.01),
              "linear_probe_accuracy": np.linspace(0.3, 0.5, n_layers), "gride_ranks": np.array([2, 4, 8]),
              "gride_ids": np.full((n_layers, 3), 9.0), "gride_errs": np.full((n_layers, 3), 0.2)}
    return name, results, arrays


def test_overlap_axis_fits_the_data_with_chance(tmp_path, monkeypatch):
    limits = {}
    real_save = report._save

    def spy(fig, path):
        limits[path.stem] = [(ax.get_ylim(), list(ax.get_xticks())) for ax in fig.axes]
        return real_save(fig, path)

    monkeypatch.setattr(report, "_save", spy)
    paths = report.write_figures(tmp_path, [_run()])
    (low, high), ticks = limits["label_overlap"][0]
    assert 0 <= low <= 0.02 and 0.2 < high < 0.25  # not a flat line on a 0-1 axis; chance (0.02) visible
    assert ticks == [0, 1, 2, 3, 4, 5]  # integer layer ticks
    (low, high), _ = limits["label_overlap"][1]
    assert low <= 0.1 and 0.5 < high < 0.6  # probe accuracy panel with its chance level
    for path in paths:
        assert path.with_suffix(".pdf").read_bytes()[:4] == b"%PDF"
    plt.close("all")


def test_summary_markdown_marks_peak_selected_and_chance():
    _, results, _ = _run()
    table = report.summary_markdown(results)
    rows = [line for line in table.splitlines() if line.startswith("| ") and "---" not in line][1:]
    assert len(rows) == 6 and rows[1].endswith("| peak |") and rows[3].endswith("| **selected** |")
    assert "rule: first minimum" in table and "Chance: overlap with labels 0.020" in table
