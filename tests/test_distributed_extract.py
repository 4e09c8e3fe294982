"""Extraction on a mesh of all devices of all processes equals the single-device run (the memory planner:
tests/test_extraction_memory.py).

The multi-device runs happen in subprocesses (tests/extract_worker.py; the device count is fixed when jax
starts): 8 fake CPU devices in one process, and 2 processes x 4 devices joined by `jax.distributed` over
localhost. Each is compared with the plain single-device extraction run here, in this 1-device process.
"""

from __future__ import annotations

import json
import pathlib
import signal
import subprocess
import sys

import jax
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from experiments import distributed, extract, files, store
from tests.extract_worker import config_for
from tests.processes import fake_device_env, free_port

WORKER = pathlib.Path(__file__).with_name("extract_worker.py")
REPO = WORKER.parents[1]
TIMEOUT_S = 300


# ---------------------------------------------------------------------------------------------------
# The shared module, in this single process


def test_distributed_module_in_one_process():
    top = distributed.initialize()
    assert top == distributed.topology() == (0, 1, 1, 1, jax.devices()[0].platform)
    assert distributed.is_writer()
    distributed.barrier("alone")  # no-op
    mesh = distributed.make_mesh()
    assert dict(mesh.shape) == {"data": 1, "model": 1}
    params = {"w": np.zeros((3, 5)), "b": np.zeros(5), "s": np.float32(1)}
    assert {k: s.spec for k, s in distributed.param_shardings(params, mesh, fsdp=False).items()} == \
        {"w": P(), "b": P(), "s": P()}
    assert {k: s.spec for k, s in distributed.param_shardings(params, mesh, fsdp=True).items()} == \
        {"w": P(None, "model"), "b": P("model"), "s": P()}
    assert distributed.batch_sharding(mesh, 3).spec == P("data", None, None)
    with pytest.raises(ValueError, match="positive divisor"):
        distributed.make_mesh(3)
    with pytest.raises(ValueError, match="needs all three"):
        distributed.initialize("127.0.0.1:1", None, 0)


# ---------------------------------------------------------------------------------------------------
# Several devices and processes (subprocesses)



def _worker(args: list[str], devices: int) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, str(WORKER), *args], env=fake_device_env(devices), cwd=REPO,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _finish(procs: list[subprocess.Popen], what: str) -> list[int]:
    codes = []
    for proc in procs:
        try:
            out, _ = proc.communicate(timeout=TIMEOUT_S)
        except subprocess.TimeoutExpired:
            for p in procs:
                p.kill()
            pytest.fail(f"{what} hung for {TIMEOUT_S} s")
        codes.append(proc.returncode)
        proc.output = out
    return codes


def _run_ok(procs: list[subprocess.Popen], what: str) -> None:
    codes = _finish(procs, what)
    assert codes == [0] * len(procs), f"{what} failed:\n" + "\n".join(p.output[-4000:] for p in procs)


def _assert_same_store(got: pathlib.Path, want: pathlib.Path) -> None:
    a, b = store.load(store.store_dir(got)), store.load(store.store_dir(want))
    assert sorted(p.name for p in store.store_dir(got).glob("*.*")) == \
        sorted(p.name for p in store.store_dir(want).glob("*.*"))
    assert a.manifest.keys() == b.manifest.keys() and a.manifest["metadata"].keys() == b.manifest["metadata"].keys()
    assert a.manifest["files"] == b.manifest["files"] and a.manifest["fingerprint"] == b.manifest["fingerprint"]
    assert a.ids == b.ids and np.array_equal(a.labels, b.labels)
    for layer_a, layer_b in zip(a.layers, b.layers, strict=True):
        assert float(np.max(np.abs(np.asarray(layer_a) - np.asarray(layer_b)))) <= 1e-6


@pytest.fixture(scope="module")
def single_device(tmp_path_factory) -> dict:
    """The plain single-device stores (this process has one device), per family."""
    out = {}
    for family, batch in (("esm2", 6), ("igpt", 12)):
        workdir = tmp_path_factory.mktemp(f"single_{family}")
        extract.run(config_for(family, batch, "never", 0), workdir)
        out[family] = workdir
    return out


@pytest.mark.slow
@pytest.mark.parametrize("family,batch,model_parallel", [("esm2", 6, 0), ("igpt", 12, 0), ("esm2", 6, 2)],
                         ids=["esm2", "igpt-padded-rows", "esm2-fsdp"])
def test_eight_devices_equal_single_device(single_device, tmp_path, family, batch, model_parallel):
    """Data-parallel over 8 fake devices (igpt's 12-row batches padded to 16), and with FSDP params over
    "model" = 2 (batches over "data" = 4): the same store as one device."""
    workdir = tmp_path / "sharded"
    _run_ok([_worker(["--family", family, "--workdir", str(workdir), "--batch-size", str(batch),
                      "--model-parallel", str(model_parallel), "--record", str(tmp_path / "rec.json")], 8)],
            "8-device extraction")
    record = json.loads((tmp_path / "rec.json").read_text())
    assert record["topology"]["device_count"] == 8
    _assert_same_store(workdir, single_device[family])


SHARED = {"representations/plan.json", "representations/manifest.json", "representations/ids.json",
          "representations/labels.npy", "representations/layer_000.npy", "representations/layer_001.npy",
          "representations/layer_002.npy"}


def _two_processes(workdir: pathlib.Path, tmp_path: pathlib.Path, tag: str, kill_after: int = 0) -> list:
    port = free_port()
    procs = []
    for process in (0, 1):
        args = ["--family", "esm2", "--workdir", str(workdir), "--coordinator", f"127.0.0.1:{port}",
                "--num-processes", "2", "--process-id", str(process),
                "--record", str(tmp_path / f"{tag}{process}.json")]
        if kill_after and process == 1:
            args += ["--kill-after", str(kill_after)]
        procs.append(_worker(args, 4))
    return procs


@pytest.mark.slow
def test_two_processes_equal_single_device_and_only_process_0_writes_shared_files(single_device, tmp_path):
    workdir = tmp_path / "mp"
    _run_ok(_two_processes(workdir, tmp_path, "rec"), "2 x 4 extraction")
    _assert_same_store(workdir, single_device["esm2"])
    zero, one = (set(json.loads((tmp_path / f"rec{p}.json").read_text())["written"]) for p in (0, 1))
    n_batches = len(files.read_json(store.store_dir(workdir) / store.PLAN, fix="")["batches"])
    assert one == {f"representations/batches/p00001/{b:05d}.npz" for b in range(1, n_batches, 2)}
    assert zero == SHARED | {f"representations/batches/p00000/{b:05d}.npz" for b in range(0, n_batches, 2)}


@pytest.mark.slow
def test_two_processes_resume_after_one_is_killed(single_device, tmp_path):
    """Process 1 is SIGKILLed after storing 1 batch (process 0 is then stopped too, as a job scheduler would);
    rerun, each process computes only what is missing, the last stored batch is re-embedded as the model check,
    and the store equals the single-device one."""
    workdir = tmp_path / "mp"
    procs = _two_processes(workdir, tmp_path, "killed", kill_after=1)
    try:
        procs[1].wait(timeout=TIMEOUT_S)
    finally:
        procs[0].send_signal(signal.SIGKILL)
    _finish(procs, "killed run")
    assert procs[1].returncode == -signal.SIGKILL
    directory = store.store_dir(workdir)
    before = store.finished_batches(directory)
    one_before = {b for b in before if b % 2 == 1}
    assert len(one_before) == 1 and not store.is_complete(directory)
    _run_ok(_two_processes(workdir, tmp_path, "resumed"), "resumed 2 x 4 extraction")
    _assert_same_store(workdir, single_device["esm2"])
    n_batches = len(files.read_json(directory / store.PLAN, fix="")["batches"])
    one = set(json.loads((tmp_path / "resumed1.json").read_text())["written"])
    assert one == {f"representations/batches/p00001/{b:05d}.npz" for b in range(1, n_batches, 2) if b not in before}
    zero = set(json.loads((tmp_path / "resumed0.json").read_text())["written"])
    assert zero - SHARED == {f"representations/batches/p00000/{b:05d}.npz" for b in range(0, n_batches, 2)
                             if b not in before}
