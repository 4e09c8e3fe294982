"""The profile stage on 2 processes x 4 fake CPU devices equals the single-process profile.

Both ways of spreading a profile over processes run in one 2-process job (tests/profile_worker.py):
whole layers per process ("layers", 5 layers over 2 processes, so the last round is uneven) and every
layer on the device ring across both processes ("ring"). The reference is the same stage run here, in
one process on one device. Tolerance: neighbour indices exactly (Gaussian data: no distance ties within
float32 rounding), every estimate to 1e-5 relative (the ring sums distances in another order; the
estimators themselves run the same code on the same host arrays).
"""

import sys

import numpy as np
import pytest

from configs import base
from experiments import files, profile, store
from tests import processes
from tests.conftest import REPO_ROOT

TIMEOUT_S = 300


def profile_config(mode: str):
    """The profile options of both the 2-process job and the reference (`processes` picks the mode)."""
    config = base.analysis_config()
    config.profile.k_max = 16
    config.profile.gride_range_max = 16
    config.profile.label_ks = (5, 10)
    config.profile.overlap_k = 10
    config.profile.decimation_min_size = 20
    config.probe.enabled = False
    if mode != "single":
        config.profile.processes = mode
    return config


def _store(directory):
    rng = np.random.default_rng(3)
    n, dims = 320, (3, 6, 9, 4, 5)
    layers = [(rng.normal(size=(n, d)) @ rng.normal(size=(d, 12))).astype(np.float32) for d in dims]
    labels = np.arange(n) % 3
    store.open_plan(directory, [list(range(n))], {"synthetic": True})
    store.write_batch(directory, 0, np.stack(layers), np.arange(n))
    store.finalize(directory, n, labels=labels, ids=[str(i) for i in range(n)], metadata={"model": "synthetic"})



@pytest.mark.slow
def test_two_processes_give_the_single_process_profile(tmp_path):
    home = tmp_path / "stores" / "fp"
    _store(home / "representations")
    for name in ("single", "layers", "ring"):
        store.point_to_store(tmp_path / name, home, "fp")
    port = processes.free_port()
    runs = f"layers={tmp_path / 'layers'},ring={tmp_path / 'ring'}"
    commands = [[sys.executable, str(REPO_ROOT / "tests" / "profile_worker.py"), "--runs", runs, "--process-id",
                 str(pid), "--num-processes", "2", "--port", str(port)] for pid in range(2)]
    codes, logs = processes.run_job(commands, 4, tmp_path, TIMEOUT_S)
    assert codes == [0, 0], f"2-process profile failed or hung ({codes}):\n{logs}"

    single = profile.run(profile_config("single"), tmp_path / "single")
    assert single["process_mode"] == "single"
    reference = files.load_npz(tmp_path / "single" / "profile.npz", fix="")
    for mode in ("layers", "ring"):
        results = files.read_json(tmp_path / mode / "results.json", fix="")
        assert results["process_mode"] == mode
        assert (results["peak_layer"], results["selected_layer"]) == (single["peak_layer"], single["selected_layer"])
        arrays = files.load_npz(tmp_path / mode / "profile.npz", fix="")
        assert sorted(arrays) == sorted(reference)
        for name, expected in reference.items():
            if np.issubdtype(expected.dtype, np.integer):
                np.testing.assert_array_equal(arrays[name], expected, err_msg=f"{mode}: {name}")
            else:
                np.testing.assert_allclose(arrays[name], expected, rtol=1e-5, atol=0, err_msg=f"{mode}: {name}")
    # Layers were computed where the mode says: per process in "layers" (each process cached its own).
    cached = sorted(p.name for p in (tmp_path / "layers" / "profile_layers").glob("layer_*_graph.npz"))
    assert cached == [f"layer_{i:03d}_graph.npz" for i in range(5)]
