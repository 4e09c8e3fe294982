"""Extraction on a mesh of all devices of all processes equals the single-device run; the memory planner.

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
GB = 10**9


# ---------------------------------------------------------------------------------------------------
# The memory planner, on synthetic numbers worked out by hand

ESM2_15B = {"param_count": 15_135_000_000, "width": 5120, "num_layers": 48, "seq_len": 1024}


def _example_bytes_by_hand(seq_len: int, width: int, num_layers: int, dtype_bytes: int) -> int:
    hidden_states = (num_layers + 1) * seq_len * width  # every layer's output, kept until pooled
    one_block = 12 * seq_len * width  # residual, q, k, v, attention out, 4 D feed-forward, ...
    scores = seq_len * seq_len * (width // 64)  # one T x T matrix per 64-channel head
    return (hidden_states + one_block + scores) * dtype_bytes


def test_esm2_15b_on_80gb_devices_needs_fsdp_in_float32_not_in_bfloat16():
    usable = 0.9 * 0.75 * 80 * GB  # JAX preallocates 75% of an 80 GB GPU; the plan fills 90% of that: 54 GB
    m = ESM2_15B
    fp32_params = 4 * m["param_count"]  # 60.5 GB > 54 GB: replicated does not fit
    plan = extract.plan_extraction(device_memory_bytes=int(0.75 * 80 * GB), param_bytes=fp32_params,
                                   seq_len=m["seq_len"], width=m["width"], num_layers=m["num_layers"], devices=8)
    # Over 2 devices: 30.27 GB of params + one layer gathered (1.26 GB) leaves 22.47 GB; one 1024-residue
    # example: 61 * 1024 * 5120 + 1024^2 * 80 = 403.7M values, 1.615 GB in float32 -> 13 per device.
    per_example = _example_bytes_by_hand(1024, 5120, 48, 4)
    assert per_example == 4 * (61 * 1024 * 5120 + 1024 * 1024 * 80) == 1_614_807_040
    assert (plan.model_parallel, plan.fsdp) == (2, True)
    assert plan.batch_per_device == int((usable - fp32_params / 2 - fp32_params / 48) // per_example) == 13
    bf16 = extract.plan_extraction(device_memory_bytes=int(0.75 * 80 * GB), param_bytes=2 * m["param_count"],
                                   seq_len=1024, width=5120, num_layers=48, devices=8, dtype_bytes=2)
    # Replicated: 54 - 30.27 = 23.73 GB over 0.807 GB per example -> 29 per device, no FSDP.
    assert (bf16.model_parallel, bf16.fsdp) == (1, False)
    assert bf16.batch_per_device == int((usable - 2 * m["param_count"]) // (per_example // 2)) == 29


def test_plan_that_cannot_fit_names_what_would():
    with pytest.raises(MemoryError) as err:  # 15B float32 on one 24 GB device
        extract.plan_extraction(device_memory_bytes=24 * GB, param_bytes=4 * ESM2_15B["param_count"], seq_len=1024,
                                width=5120, num_layers=48, devices=1)
    message = str(err.value)
    for needle in ("does not fit", "shorter sequences", "bfloat16", "more devices",
                   "--config.extract.model_parallel=4"):  # 21.6 GB usable: 60.5/3 + 1.26 + 1.61 = 23.1 too much,
        assert needle in message, message  # 60.5/4 + 1.26 + 1.61 = 18.0 fits
    # A fixed model_parallel is used as given; a count that does not divide the devices is refused.
    plan = extract.plan_extraction(device_memory_bytes=80 * GB, param_bytes=8 * GB, seq_len=100, width=64,
                                   num_layers=4, devices=8, model_parallel=4)
    assert (plan.model_parallel, plan.param_bytes_per_device) == (4, 2 * GB + 2 * GB)
    assert plan.batch_per_device == 256  # capped
    with pytest.raises(ValueError, match="must divide the 8 devices"):
        extract.plan_extraction(device_memory_bytes=80 * GB, param_bytes=GB, seq_len=100, width=64, num_layers=4,
                                devices=8, model_parallel=3)
    with pytest.raises(ValueError, match="seq_len=0"):
        extract.plan_extraction(device_memory_bytes=GB, param_bytes=GB, seq_len=0, width=64, num_layers=4, devices=1)


@pytest.mark.slow  # initialises the model twice: ~5-15 s on a shared 2-core machine
def test_auto_batch_size_takes_the_plan():
    """extract.batch_size="auto" on one device: the plan's batch per device is the encoder's batch size."""
    config = config_for("esm2", "auto", "never", 0, n=12)
    budget = 1_300_000
    config.extract.device_memory_bytes = budget
    examples = extract.load_examples(config.data)
    encoder = extract.build_encoder(config.model, examples, "auto", None, config.extract)
    # Tiny ESM-2: 2 layers, width 64, float32; the longest protein + <cls> and <eos> tokens.
    longest = max(len(s) for s in examples.inputs) + 2
    params = extract._load_family(config.model)[2]
    param_bytes = 4 * sum(int(np.size(x)) for x in jax.tree_util.tree_leaves(params))
    want = int((0.9 * budget - param_bytes) // _example_bytes_by_hand(longest, 64, 2, 4))
    assert 1 < want < 12
    assert [len(b) for b in encoder.plan][:-1] == [want] * (12 // want - (12 % want == 0))
    with pytest.raises(ValueError, match="integer extract.batch_size"):
        extract.build_encoder(_own_model_settings(), examples, "auto", None, config.extract)


def _own_model_settings():
    settings = config_for("esm2", 6, "never", 0).model
    settings.encoder = "tests.extract_worker:proteins"
    return settings


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
