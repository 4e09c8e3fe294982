"""The trained models shipped in checkpoints/ re-profile to the numbers the README reports for them."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from experiments import files
from tests.conftest import REPO_ROOT

pytestmark = pytest.mark.slow

# README, "The paper's claims on models trained here": the iGPT's last step (8000) on its 2000 held-out
# MNIST images, GRIDE(32, 64), overlap with labels at k = 30, linear probe.
IGPT_ID = [4.52, 5.14, 5.44, 5.75, 5.92, 6.33, 6.52, 6.85, 7.04]
IGPT_LABEL_OVERLAP = [0.279, 0.443, 0.495, 0.553, 0.613, 0.653, 0.669, 0.681, 0.627]
IGPT_LINEAR_PROBE = [0.764, 0.880, 0.902, 0.920, 0.956, 0.956, 0.960, 0.960, 0.950]


def test_shipped_igpt_reprofiles_to_the_readme_numbers(shared_data, tmp_path):
    out = tmp_path / "igpt"
    args = [sys.executable, str(REPO_ROOT / "launch.py"),
            "--config=configs/over_training.py:igpt,checkpoints/igpt_mnist_deep", f"--workdir={out}"]
    env = dict(os.environ, PYTHONPATH=str(REPO_ROOT), IDJAX_SHARED_DATA=str(shared_data))
    run = subprocess.run(args, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=1800)
    assert run.returncode == 0, run.stderr[-3000:]
    results = files.read_json(out / "results.json", fix="rerun", require_checksum=True)
    assert results["n_points"] == 2000 and results["data"]["heldout_of"]["train_ids"] == 8000
    assert results["model"]["palette"]["kind"] == "checkpoint"  # the colours it was trained with
    # The README prints two or three decimals; a rerun on another CPU moves them by float rounding only.
    np.testing.assert_allclose(results["id"], IGPT_ID, atol=0.006)
    k = results["label_ks"].index(30)
    np.testing.assert_allclose(np.asarray(results["label_overlap"])[:, k], IGPT_LABEL_OVERLAP, atol=0.0006)
    np.testing.assert_allclose(results["probes"]["linear_probe_accuracy"], IGPT_LINEAR_PROBE, atol=0.0006)
    assert (results["peak_layer"], results["selected_layer"], results["selection_branch"]) == \
        (None, None, "no_significant_peak")
    assert (results["best_overlap_layer"], results["probes"]["best_probe_layer"]) == (7, 6)
    readme = (REPO_ROOT / "README.md").read_text()
    assert " | ".join(f"{v:.2f}" for v in IGPT_ID) in readme


def test_shipped_checkpoints_are_small_and_complete():
    for name, step in (("igpt_mnist_deep", 8000), ("esm2_scope_deep", 10000)):
        root = REPO_ROOT / "checkpoints" / name
        size = sum(f.stat().st_size for f in root.rglob("*") if f.is_file())
        assert size <= 20 * 2**20, (name, size)
        assert (root / f"step_{step}" / "metadata.json").is_file()
        split = json.loads((root / "data_split.json").read_text())
        assert len(split["train_ids"]) > 1000
    assert (REPO_ROOT / "checkpoints" / "igpt_mnist_deep" / "step_8000" / "kmeans_centers.npy").is_file()
