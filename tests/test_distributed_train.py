"""Training over a device mesh: one sharded step equals the single-device step, a sharded run resumes exactly,
and 2 processes x 4 devices train like 1 process x 8 devices with only process 0 writing the shared files.

The device count is fixed when jax starts and this pytest process has 1 device, so the sharded runs happen in
subprocesses (tests/distributed_train_worker.py) that write their results to an npz. Every subprocess has a
timeout, so a hang fails.
"""

from __future__ import annotations

import json
import pathlib
import sys

import jax
import numpy as np
import pytest

from experiments import train
from tests import processes
from tests.distributed_train_worker import CHECKPOINT_EVERY, STEPS, small_config

WORKER = pathlib.Path(__file__).with_name("distributed_train_worker.py")
REPO = WORKER.parents[1]
TIMEOUT_S = 420
SHARED_FILES = {"config.json", "model_config.json", "data_split.json", "metrics.jsonl", "train_result.json",
                "loss_curve.png", "palette.npy"}



def _run(args: list[str], devices: int, what: str) -> None:
    processes.run_worker(WORKER, args, devices, what, TIMEOUT_S)


def _states(results, prefix: str) -> dict[str, np.ndarray]:
    """The state and metrics leaves the worker wrote under `prefix`, keyed by their path without it."""
    return {key[len(prefix):]: results[key] for key in results.files
            if key.startswith(prefix) and key[len(prefix):].startswith(("state", "metrics"))}


def _assert_identical(a: dict, b: dict) -> None:
    assert a.keys() == b.keys() and len(a) > 20
    for key in a:
        np.testing.assert_array_equal(a[key], b[key], err_msg=key)


def _assert_same_up_to_summation_order(want: dict, got: dict, params_atol: float, what: str) -> None:
    """Integer leaves (step, counts, RNG) equal; loss and gradient norm to 1e-6 relative; Adam's moments within
    2^-18 of the leaf's largest magnitude; params (|p| ~ 1) to 2 float32 ulps plus `params_atol`."""
    assert got.keys() == want.keys() and len(want) > 20
    for key, expected in want.items():
        actual, message = got[key], f"{what} {key}"
        if expected.dtype.kind != "f":
            np.testing.assert_array_equal(actual, expected, err_msg=message)
        elif key.startswith("metrics"):
            np.testing.assert_allclose(actual, expected, rtol=1e-6, err_msg=message)
        elif key.startswith("state['params']"):
            np.testing.assert_allclose(actual, expected, rtol=2.4e-7, atol=params_atol, err_msg=message)
        else:
            np.testing.assert_allclose(actual, expected, rtol=0, atol=2.0 ** -18 * np.abs(expected).max(),
                                       err_msg=message)


@pytest.mark.slow
def test_one_sharded_step_equals_the_single_device_step(tmp_path):
    """Data-parallel over 8 devices and FSDP over a (4, 2) mesh: one step from the same state and batch gives
    the single-device (1-device mesh) state. Sharding only changes the order in which float32 sums are taken
    (the gradient's sum over the batch and over the devices' shards), so:
      - loss and gradient norm: relative 1e-6;
      - Adam's moments mu = 0.1 g and nu = 0.001 g^2 (sums over ~1000 tokens): within 2^-18 (4e-6) of the
        leaf's largest magnitude;
      - params p - lr g / (|g| + eps), |p| ~ 1: 2 float32 ulps (2.4e-7 relative) plus 1e-7 absolute, which
        also bounds lr * delta_g / eps at the step's eps = 1e-3 (3e-3 * 1e-8 / 1e-3).
    Equality of the loss alone would not see a wrong batch split: the moments and params would. The 1-device
    mesh step itself equals the plain jitted step bit for bit."""
    out = tmp_path / "step.npz"
    _run(["step", "--out", str(out)], 8, "the 8-device step")
    results = np.load(out)
    single = _states(results, "single/")
    assert int(results["data8/split_leaves"]) == 0 and int(results["fsdp4x2/split_leaves"]) > 10
    _assert_identical(single, _states(results, "plain/"))  # a 1-device mesh changes no bit of today's step
    for layout in ("data8", "fsdp4x2"):
        _assert_same_up_to_summation_order(single, _states(results, f"{layout}/"), params_atol=1e-7, what=layout)
    assert int(results["single/moved_leaves"]) > 10  # the step changed the params it is compared on


def test_mesh_knobs_are_checked():
    """fsdp without a "model" axis to shard over, and batches that do not split evenly, are refused by name."""
    config = small_config()
    config.train.fsdp = True
    with pytest.raises(ValueError, match="train.fsdp=True .* train.model_parallel is 1"):
        train.training_mesh(config.train)
    config = small_config()
    config.train.batch_size = 12
    with pytest.raises(ValueError, match=r"train.batch_size=12 is not a multiple of the 'data' mesh axis \(8"):
        train.check_batch_sizes(config.train, 8)
    config.train.model_parallel = 3
    with pytest.raises(ValueError, match="model_parallel=3 must be a positive divisor of the 1 devices"):
        train.training_mesh(config.train)


@pytest.mark.slow
def test_sharded_run_crashed_midway_resumes_to_the_uninterrupted_state(tmp_path):
    """8 devices, data-parallel: a run that crashes at step 6 (after the checkpoint at 4) resumes from 4 into
    the mesh's shardings and ends bit for bit where an uninterrupted run ends (params, optimizer state, step,
    RNG), with the same log."""
    full, crashed = tmp_path / "full", tmp_path / "crashed"
    _run(["train", "--workdir", str(full), "--out", str(tmp_path / "full.npz")], 8, "the uninterrupted run")
    _run(["train", "--workdir", str(crashed), "--out", str(tmp_path / "crashed.npz"), "--crash-at", "6"], 8,
         "the crashed and resumed run")
    a, b = np.load(tmp_path / "full.npz"), np.load(tmp_path / "crashed.npz")
    assert int(a["resumed_from"]) == -1 and int(b["resumed_from"]) == CHECKPOINT_EVERY
    assert b["checkpoints_after_crash"].tolist() == [CHECKPOINT_EVERY]
    assert int(b["final_step"]) == STEPS and int(b["state['step']"]) == STEPS
    _assert_identical(_states(a, ""), _states(b, ""))
    strip = lambda workdir: [(r["kind"], r["step"], r["loss"], r.get("grad_norm")) for r in train.read_metrics(workdir)]
    assert strip(full) == strip(crashed) and strip(full)[-1][:2] == ("eval", STEPS)



@pytest.mark.slow
def test_two_processes_train_resume_and_match_one_process(tmp_path):
    """2 processes x 4 fake devices over localhost (jax.distributed, gloo), FSDP over a (4, 2) mesh whose
    params span both processes: they crash at step 6, resume from the checkpoint at 4 (each process restoring
    its shards), and end with the state of one process x 8 devices run uninterrupted (to the rounding of another
    summation order); process 1 opened no shared file for writing; the checkpoint loads in this single-device
    process."""
    workdir, port = tmp_path / "two", processes.free_port()
    commands = [[sys.executable, str(WORKER), "train", "--workdir", str(workdir), "--out", str(tmp_path / "two.npz"),
                 "--crash-at", "6", "--model-parallel", "2", "--process-id", str(pid), "--num-processes", "2",
                 "--port", str(port)] for pid in (0, 1)]
    codes, logs = processes.run_job(commands, 4, tmp_path, TIMEOUT_S)
    assert codes == [0, 0], f"the 2-process run failed or hung ({codes}):\n{logs}"
    _run(["train", "--workdir", str(tmp_path / "one"), "--out", str(tmp_path / "one.npz"), "--model-parallel", "2"],
         8, "the 1-process 8-device run")

    two, one = np.load(tmp_path / "two.npz"), np.load(tmp_path / "one.npz")
    assert int(two["resumed_from"]) == CHECKPOINT_EVERY and int(two["final_step"]) == STEPS
    assert int(two["split_leaves"]) > 10  # the restored params really are sharded
    # gloo sums the processes' gradients in another order than one process sums its 8 devices': the states
    # agree to that rounding, carried through 12 steps (each adds up to lr * delta_g / eps ~ 3e-8 to a param's
    # difference; 7.5e-9 measured).
    _assert_same_up_to_summation_order(_states(one, ""), _states(two, ""), params_atol=2e-7, what="2 processes")
    writes = [set(json.loads((tmp_path / f"two.npz.writes{pid}.json").read_text())) for pid in (0, 1)]
    assert SHARED_FILES <= writes[0] and any(path.startswith("tensorboard") for path in writes[0])
    shared_writes_1 = {path for path in writes[1] if not path.startswith("checkpoints")}
    assert shared_writes_1 <= {".", ".idjax.lock.process1"}, shared_writes_1  # ".": mkdir of the workdir
    assert json.loads((workdir / "train_result.json").read_text())["final_step"] == STEPS
    # The multi-process, sharded checkpoint loads in one single-device process for extraction.
    _, params, _ = train.load_trained(workdir)
    for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]:
        np.testing.assert_array_equal(np.asarray(leaf), two[f"state['params']{jax.tree_util.keystr(path)}"])
