"""idjax.sharded.knn_sharded: equal to single-device idjax.knn on 8 fake CPU devices and on 2 processes x 4 devices.

The device count is fixed when jax starts and this pytest process has 1 device, so the multi-device
runs happen in subprocesses (tests/sharded_worker.py) that write their results to an npz; this file
compares them with idjax.knn computed here. Every subprocess has a timeout, so a hang fails.
"""

from __future__ import annotations

import json
import pathlib
import subprocess
import sys

import jax
import numpy as np
import pytest

import idjax
from idjax import sharded
from tests import processes
from tests.neighbour_checks import assert_same_neighbours
from tests.processes import fake_device_env

WORKER = pathlib.Path(__file__).with_name("sharded_worker.py")
REPO = WORKER.parents[1]
TIMEOUT_S = 240



def _data(path: pathlib.Path, n: int, dim: int, dtype, seed: int) -> dict:
    """Gaussian points with exact duplicates (pairs and a triple), a second representation, labels,
    and integer-valued points whose distances tie exactly and often."""
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, dim)).astype(dtype)
    x[n // 2: n // 2 + 20] = x[:20]
    x[n - 3:] = x[5]
    y = (x @ rng.normal(size=(dim, dim)).astype(dtype) + 0.3 * rng.normal(size=(n, dim))).astype(dtype)
    data = {"x": x, "y": y, "labels": rng.integers(0, 4, size=n),
            "ties": rng.integers(-2, 3, size=(n, 6)).astype(dtype)}
    np.savez(path, **data)
    return data


def _run(args: list[str], devices: int, what: str) -> None:
    processes.run_worker(WORKER, args, devices, what, TIMEOUT_S)


def _assert_same(dist, idx, ref: idjax.Neighbors, what: str) -> None:
    ref_d, ref_i = np.asarray(ref.distances), np.asarray(ref.indices)
    assert dist.dtype == ref_d.dtype and idx.dtype == np.int32, what
    # Same neighbours; distances to float32 rounding (XLA's summation order may differ per tile shape),
    # so only neighbours tied within it may swap.
    assert_same_neighbours(dist, idx, ref_d, ref_i, rtol=1e-6, what=what)


def _assert_estimates(results, prefix: str, dist, idx, other_idx, labels) -> None:
    assert float(results[f"{prefix}/twonn"]) == pytest.approx(float(idjax.twonn(dist, duplicates="drop")), rel=1e-6)
    np.testing.assert_allclose(results[f"{prefix}/gride"],
                               idjax.gride_scaling(dist, range_max=8, duplicates="drop").ids, rtol=1e-6)
    assert float(results[f"{prefix}/label_overlap"]) == pytest.approx(idjax.label_overlap(idx, labels, 8))
    assert float(results[f"{prefix}/data_overlap"]) == pytest.approx(idjax.data_overlap(idx, other_idx, 8))


def test_eight_devices_equal_single_device(tmp_path):
    n, ks = 1003, (1, 64)  # 1003 = 8 * 125 + 3: padded, masked rows; outputs replicated
    data = _data(tmp_path / "x.npz", n, 24, np.float32, seed=0)
    _run(["devices", "--data", str(tmp_path / "x.npz"), "--out", str(tmp_path / "out.npz"),
          "--k", ",".join(map(str, ks)), "--block-size", "40"], 8, "8-device worker")
    r = np.load(tmp_path / "out.npz")
    assert int(r["device_count"]) == 8
    x = data["x"]
    for k in ks:
        _assert_same(r[f"host/{k}/distances"], r[f"host/{k}/indices"], idjax.knn(x, k), f"host input, k={k}")
        assert str(r[f"host/{k}/spec"]) == "()"
    ref = idjax.knn(x, 64)
    # Duplicates are neighbours at distance 0, never the point itself.
    assert (r["host/64/indices"] != np.arange(n)[:, None]).all()
    assert r["host/64/distances"][n // 2, 0] == 0 and r["host/64/indices"][n // 2, 0] == 0
    _assert_same(r["rows/distances"], r["rows/indices"], ref, "ShardedRows input")
    _assert_same(r["global/distances"], r["global/indices"], idjax.knn(x[:1000], 64), "global jax.Array input")
    assert str(r["global/spec"]) == "('data', None)"  # 1000 = 8 * 125: sharded by rows
    _assert_same(r["ties/distances"], r["ties/indices"], idjax.knn(data["ties"], 64), "integer data with ties")
    other = idjax.knn(data["y"], 64).indices
    np.testing.assert_array_equal(r["other/indices"], np.asarray(other))
    _assert_estimates(r, "sharded", ref.distances, ref.indices, other, data["labels"])


def test_eight_devices_float64_under_x64(tmp_path):
    n = 517
    _data(tmp_path / "x.npz", n, 16, np.float64, seed=1)
    _run(["devices", "--data", str(tmp_path / "x.npz"), "--out", str(tmp_path / "out.npz"), "--k", "16", "--x64",
          "--minimal"], 8, "8-device float64 worker")
    r = np.load(tmp_path / "out.npz")
    data = np.load(tmp_path / "x.npz")
    with jax.enable_x64(True):
        ref = idjax.knn(data["x"], 16)
        assert ref.distances.dtype == np.float64
        _assert_same(r["host/16/distances"], r["host/16/indices"], ref, "float64")
        _assert_same(r["rows/distances"], r["rows/indices"], ref, "float64 ShardedRows")
        _assert_same(r["ties/distances"], r["ties/indices"], idjax.knn(data["ties"], 16), "float64 ties")



@pytest.mark.slow
def test_two_processes_four_devices_each(tmp_path):
    n, ks = 1203, (40,)
    data = _data(tmp_path / "x.npz", n, 32, np.float32, seed=2)
    port = processes.free_port()
    commands = [[sys.executable, str(WORKER), "multiprocess", "--data", str(tmp_path / "x.npz"), "--out",
                 str(tmp_path / "out.npz"), "--k", ",".join(map(str, ks)), "--process-id", str(pid),
                 "--num-processes", "2", "--port", str(port)] for pid in range(2)]
    codes, logs = processes.run_job(commands, 4, tmp_path, TIMEOUT_S)
    assert codes is not None, f"2-process run hung for {TIMEOUT_S} s:\n{logs}"
    assert codes == [0, 0], f"2-process run failed {codes}:\n{logs}"
    r = np.load(tmp_path / "out.npz")
    assert int(r["device_count"]) == 8 and int(r["local_device_count"]) == 4
    x = data["x"]
    for k in ks:
        _assert_same(r[f"rows/{k}/distances"], r[f"rows/{k}/indices"], idjax.knn(x, k), f"2 processes, k={k}")
    ref = idjax.knn(x, max(ks))
    _assert_same(r["global/distances"], r["global/indices"], idjax.knn(x[:1200], max(ks)), "global array")
    other = idjax.knn(data["y"], max(ks)).indices
    np.testing.assert_array_equal(r["other/indices"], np.asarray(other))
    _assert_estimates(r, "gathered", ref.distances, ref.indices, other, data["labels"])


# In this process (1 device): the same code on a 1-device mesh, checks and helpers.


def test_one_device_mesh_and_estimators_accept_outputs():
    rng = np.random.default_rng(3)
    x = rng.normal(size=(300, 8)).astype(np.float32)
    nbrs = sharded.knn_sharded(x, 10, block_size=64)
    ref = idjax.knn(x, 10)
    _assert_same(np.asarray(nbrs.distances), np.asarray(nbrs.indices), ref, "1 device")
    assert isinstance(nbrs, idjax.Neighbors)
    assert idjax.twonn(nbrs.distances) == pytest.approx(idjax.twonn(ref.distances))
    host = sharded.gather_to_host(nbrs)
    assert isinstance(host, idjax.Neighbors) and isinstance(host.indices, np.ndarray)
    dist, idx = sharded.knn_sharded(jax.numpy.asarray(x, jax.numpy.bfloat16), 5)
    assert dist.dtype == np.float32


def test_wide_tiles_select_their_own_candidates_first(monkeypatch):
    """A tile at least WIDE_TILE_GROUPS * 32 * (k + 8) columns wide is pre-selected before the merge:
    same neighbours as idjax.knn, with exact ties (integer data) still going to the lower index."""
    monkeypatch.setattr(sharded, "WIDE_TILE_GROUPS", 1)  # 32 * 13 = 416 columns suffice for k = 5
    rng = np.random.default_rng(12)
    for x in (rng.normal(size=(613, 8)).astype(np.float32), rng.integers(-2, 3, size=(617, 6)).astype(np.float32)):
        nbrs = sharded.knn_sharded(x, 5, block_size=128)
        _assert_same(np.asarray(nbrs.distances), np.asarray(nbrs.indices), idjax.knn(x, 5), "wide tiles")


def test_checks_and_memory_plan():
    x = np.random.default_rng(4).normal(size=(20, 3)).astype(np.float32)
    with pytest.raises(ValueError, match="need N > k"):
        sharded.knn_sharded(x, 20)
    bad = x.copy()
    bad[3, 1] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        sharded.knn_sharded(bad, 2)
    with pytest.raises(ValueError, match="not an axis"):
        sharded.knn_sharded(x, 2, mesh=sharded.default_mesh("rows"))
    assert sharded.process_row_range(10, 1, 3) == (3, 6)
    # Unblocked (one tile of all local queries), memory per device is O(N/P (N/P + k D)): at small D the
    # (N/P, N/P) tile dominates and shrinks by P^2.
    one, eight = (idjax.plan_knn(80_000, 8, 64, devices=p, block_size=10**9, memory_bytes=2**50).bytes_per_device
                  for p in (1, 8))
    assert one / 70 < eight < one / 30
    # Blocked by the default budget, the tile stays near 512 MiB and only the local rows shrink.
    assert idjax.plan_knn(80_000, 512, 64, devices=8, memory_bytes=64 * 2**30).bytes_per_device < 700 * 2**20


SCALED_SCRIPT = """
import json, sys
import numpy as np, jax
import idjax
from idjax import sharded
assert jax.device_count() == 4
x = np.random.default_rng(3).normal(size=(203, 5))
base = idjax.knn(x.astype(np.float32), 7)
base_id = float(idjax.twonn(base.distances))
out = {}
for dtype in ("float32", "float64"):
    for exponent in (-20, -10, 10, 20):
        scaled = (x * 10.0**exponent).astype(dtype)
        for form, data in (("host", scaled), ("rows", sharded.shard_rows(scaled))):
            dist, idx = sharded.gather_to_host(sharded.knn_sharded(data, 7))
            out[f"{dtype}-{exponent}-{form}"] = [
                bool(np.array_equal(idx, np.asarray(base.indices))),
                float(np.max(np.abs(dist / 10.0**exponent / np.asarray(base.distances) - 1))),
                abs(float(idjax.twonn(dist)) / base_id - 1)]
try:
    sharded.knn_sharded(x * 1e200, 7)
    out["refused-1e200"] = False
except ValueError as err:
    out["refused-1e200"] = "cannot be represented in float32" in str(err)
print(json.dumps(out))
"""


def test_scaled_copies_give_the_same_graph_on_four_devices():
    """x 1e-20 ... x 1e20 (float32 and float64, host arrays and shard_rows) give the ring the same
    neighbours, distances scaled exactly and the same TwoNN as unit-scale data; x 1e200 is refused."""
    proc = subprocess.run([sys.executable, "-c", SCALED_SCRIPT], env=fake_device_env(4), cwd=REPO, capture_output=True,
                          text=True, timeout=TIMEOUT_S)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out.pop("refused-1e200") is True
    assert len(out) == 16
    for name, (same_indices, distance_error, id_error) in out.items():
        assert same_indices, name
        assert distance_error < 1e-5 and id_error < 1e-5, (name, distance_error, id_error)


OFFSET_SCRIPT = """
import sys
import numpy as np, jax
from idjax import sharded
assert jax.device_count() == 4
x = np.load(sys.argv[1])
dist, idx = sharded.gather_to_host(sharded.knn_sharded(x, 9, block_size=64))
np.savez(sys.argv[2], distances=dist, indices=idx)
"""


def test_ring_centres_offset_data_like_the_single_device_path(tmp_path):
    """Points of unit spread 1e4 from the origin (float32): uncentred, |q|^2 + |r|^2 - 2 q.r loses the
    distances entirely (rounding ~1e2 against squared distances ~1e1), so only the screening's centring lets
    the ring find the true neighbours. Both paths must equal a float64 brute force of the stored points."""
    rng = np.random.default_rng(21)
    x = (rng.normal(size=(403, 16)) + 1e4).astype(np.float32)
    np.save(tmp_path / "x.npy", x)
    proc = subprocess.run([sys.executable, "-c", OFFSET_SCRIPT, str(tmp_path / "x.npy"), str(tmp_path / "out.npz")],
                          env=fake_device_env(4), cwd=REPO, capture_output=True, text=True, timeout=TIMEOUT_S)
    assert proc.returncode == 0, proc.stderr[-3000:]
    ring = np.load(tmp_path / "out.npz")
    exact = x.astype(np.float64)
    d = np.sqrt(((exact[:, None, :] - exact[None, :, :]) ** 2).sum(-1))
    np.fill_diagonal(d, np.inf)
    ref_i = np.argsort(d, axis=1, kind="stable")[:, :9]
    ref_d = np.take_along_axis(d, ref_i, 1)
    assert_same_neighbours(ring["distances"], ring["indices"], ref_d, ref_i, rtol=1e-5, what="ring, offset data")
    single = idjax.knn(x, 9)
    assert_same_neighbours(single.distances, single.indices, ref_d, ref_i, rtol=1e-5, what="one device, offset data")
    assert_same_neighbours(ring["distances"], ring["indices"], single.distances, single.indices, rtol=1e-6,
                           what="ring vs one device, offset data")


def test_both_paths_take_their_blocks_from_plan_knn(monkeypatch):
    """idjax.knn and the ring on a 1-device mesh solve the same per-device problem, so plan_knn must give
    them the same query block, for the default budget and for a budget that forces several blocks."""
    from idjax import neighbors

    used = {}
    single_kernel, ring_program = neighbors._knn_blocks, sharded._program

    def record_single(*args, block_size, **kwargs):
        used["single"] = block_size
        return single_kernel(*args, block_size=block_size, **kwargs)

    def record_ring(mesh, axis_name, n, n_pad, k, k_search, block, *rest):
        used["ring"] = block
        return ring_program(mesh, axis_name, n, n_pad, k, k_search, block, *rest)

    monkeypatch.setattr(neighbors, "_knn_blocks", record_single)
    monkeypatch.setattr(sharded, "_program", record_ring)
    x = np.random.default_rng(22).normal(size=(1001, 24)).astype(np.float32)
    for budget in (None, 2**20):
        plan = idjax.plan_knn(1001, 24, 7, memory_budget_bytes=budget)
        idjax.knn(x, 7, memory_budget_bytes=budget)
        sharded.knn_sharded(x, 7, memory_budget_bytes=budget)
        assert used["single"] == used["ring"] == plan.block_size, (budget, used, plan)
    assert plan.block_size < 1001  # the small budget gives several blocks, balanced: 1001 rows in equal blocks
    assert -(-1001 // plan.block_size) * plan.block_size - 1001 < 8 * -(-1001 // plan.block_size)
