"""A failure on one process of a multi-process job ends every process promptly, each saying which process
failed and why, and a rerun resumes (experiments/distributed.py's fail-fast handlers).

The jobs are 2 processes x 2 fake CPU devices over localhost running tests/extract_worker.py, whose
test-only hooks inject the failure in process 1: a RuntimeError after it stored its first batch (mid-
extraction, between two collective batches), a RuntimeError before the first collective, or a SIGKILL
after its first batch. Without the handlers the surviving process blocks in a collective or barrier, and
the failing one in JAX's shutdown barrier, until the 100 s heartbeat or 300 s shutdown timeouts, or
for ever (README, multi-host section).

The bound, `BOUND_S` wall seconds for the whole job including JAX's start and the compilation: process 1
fails after its first batch, ~10-20 s into the run on this shared 2-core machine; a recorded failure
reaches the other process within `distributed.POLL_SECONDS` (0.5 s), plus at most `ACK_SECONDS` (5 s)
when process 0 is the one failing; a SIGKILL is seen through JAX's heartbeat check, 10 s here. The
surviving process must also exit within `AFTER_S` of the failing one (measured: the same second).
"""

from __future__ import annotations

import pathlib
import subprocess
import sys
import time

import pytest

from experiments import distributed, files, store
from tests.processes import REPO, fake_device_env, free_port

WORKER = REPO / "tests" / "extract_worker.py"
BOUND_S = 60.0
AFTER_S = 15.0
HEARTBEAT_S = 10


# ---------------------------------------------------------------------------------------------------
# One process: the knobs, and every fail-fast entry point is a no-op


def test_timeouts_from_arguments_environment_and_defaults(monkeypatch):
    for name in distributed.Timeouts._fields:
        monkeypatch.delenv(distributed.timeout_env(name), raising=False)
    assert distributed.timeouts() == distributed.Timeouts() == (300, 30, 3600, 300)
    monkeypatch.setenv("IDJAX_HEARTBEAT_TIMEOUT_SECONDS", "12")
    assert distributed.timeouts(barrier=7) == (300, 12, 7, 300)
    assert distributed.timeouts(heartbeat=5).heartbeat == 5  # the argument wins
    monkeypatch.setenv("IDJAX_HEARTBEAT_TIMEOUT_SECONDS", "x")
    with pytest.raises(ValueError, match="IDJAX_HEARTBEAT_TIMEOUT_SECONDS='x'"):
        distributed.timeouts()
    monkeypatch.delenv("IDJAX_HEARTBEAT_TIMEOUT_SECONDS")
    with pytest.raises(ValueError, match="at least 1 s .*--shutdown_timeout_seconds"):
        distributed.timeouts(shutdown=0)
    with pytest.raises(TypeError, match="unknown timeouts"):
        distributed.initialize(heartbeat_seconds=3)


def test_one_process_fail_job_and_barrier_are_no_ops():
    distributed.initialize()
    distributed.barrier("alone")
    distributed.fail_job("nothing to tell")  # returns: the caller reports and exits as usual


# ---------------------------------------------------------------------------------------------------
# Two processes x 2 devices


def _job(workdir: pathlib.Path, logs: pathlib.Path, inject: list[str]) -> tuple[list[int | None], list[float], str]:
    """Runs the 2-process extraction with `inject` given to process 1; returns (exit codes, None if still running
    after the bound; the seconds each took; each process's output)."""
    port, env = free_port(), {**fake_device_env(2), distributed.timeout_env("heartbeat"): str(HEARTBEAT_S)}
    procs, outputs = [], []
    start = time.monotonic()
    for process in (0, 1):
        outputs.append(open(logs / f"p{process}.log", "w"))  # closed below
        procs.append(subprocess.Popen(
            [sys.executable, str(WORKER), "--workdir", str(workdir), "--coordinator", f"127.0.0.1:{port}",
             "--num-processes", "2", "--process-id", str(process), *(inject if process == 1 else [])],
            env=env, cwd=REPO, stdout=outputs[-1], stderr=subprocess.STDOUT))
    ended: list[float | None] = [None, None]
    while None in ended and time.monotonic() - start < BOUND_S + 60:
        for i, proc in enumerate(procs):
            if ended[i] is None and proc.poll() is not None:
                ended[i] = time.monotonic() - start
        time.sleep(0.1)
    for proc, log in zip(procs, outputs, strict=True):
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        log.close()
    text = "\n".join(f"--- process {i} ---\n" + (logs / f"p{i}.log").read_text()[-4000:] for i in (0, 1))
    return [proc.returncode if e is not None else None for proc, e in zip(procs, ended, strict=True)], \
        [e if e is not None else float("inf") for e in ended], text


def _assert_ended_promptly(codes: list, seconds: list[float], output: str) -> None:
    assert None not in codes and 0 not in codes, f"exit codes {codes}:\n{output}"
    assert max(seconds) < BOUND_S, f"the job took {seconds} s:\n{output}"
    assert seconds[0] - seconds[1] < AFTER_S, f"process 0 outlived process 1 by {seconds[0] - seconds[1]:.1f} s"


@pytest.mark.slow
@pytest.mark.parametrize("inject,why", [(["--raise-after", "1"], "injected failure in process 1 after storing 1"),
                                        (["--raise-at-start"], "injected failure in process 1 before the first")],
                         ids=["raise-mid-extraction", "raise-before-first-collective"])
def test_an_exception_in_one_process_ends_every_process_with_its_reason(tmp_path, inject, why):
    codes, seconds, output = _job(tmp_path / "w", tmp_path, inject)
    _assert_ended_promptly(codes, seconds, output)
    assert codes == [distributed.PEER_FAILED_EXIT_CODE, distributed.FAILED_EXIT_CODE], output
    zero, one = (pathlib.Path(tmp_path / f"p{i}.log").read_text() for i in (0, 1))
    assert f"stopping process 0: process 1 of the job failed: RuntimeError: {why}" in zero, output
    assert f"process 1 of 2 failed: RuntimeError: {why}" in one, output
    assert not store.is_complete(store.store_dir(tmp_path / "w"))


@pytest.mark.slow
def test_a_killed_process_ends_the_job_and_a_rerun_resumes(tmp_path):
    """SIGKILL leaves no record: process 0 ends either through its broken collective (gloo notices the closed
    connection), saying a peer was lost, or through JAX's heartbeat check (10 s here), naming the dead task 1."""
    codes, seconds, output = _job(tmp_path / "w", tmp_path, ["--kill-after", "1"])
    _assert_ended_promptly(codes, seconds, output)
    assert codes[1] == -9, output
    assert seconds[0] - seconds[1] < HEARTBEAT_S + 5, f"process 0 outlived process 1 by {seconds[0] - seconds[1]} s"
    zero = (tmp_path / "p0.log").read_text()
    assert ("The following tasks are unhealthy (stopped sending heartbeats):\n1\n" in zero
            or "a collective with another process of the job broke" in zero), output
    directory = store.store_dir(tmp_path / "w")
    stored = store.finished_batches(directory)
    assert stored and not store.is_complete(directory)
    codes, seconds, output = _job(tmp_path / "w", tmp_path, [])
    assert codes == [0, 0], output
    n_batches = len(files.read_json(directory / store.PLAN, fix="")["batches"])
    assert store.read_manifest(directory)["metadata"]["batches_computed_this_run"] == n_batches - len(stored)


BARRIER_JOB = """
import sys, time
from experiments import distributed
process = int(sys.argv[2])
distributed.initialize(f"127.0.0.1:{sys.argv[1]}", 2, process, barrier=3)
if process == 1:
    time.sleep(60)  # hung, or busy elsewhere
distributed.barrier("test: both here")
"""


@pytest.mark.slow
def test_a_barrier_timeout_names_the_process_that_did_not_arrive(tmp_path):
    """Process 1 never reaches the barrier: after the 3 s barrier timeout process 0 fails naming it, and the
    failure ends process 1 too."""
    port, logs = free_port(), []
    start = time.monotonic()
    procs = []
    for process in (0, 1):
        logs.append(open(tmp_path / f"p{process}.log", "w"))  # closed below
        procs.append(subprocess.Popen([sys.executable, "-c", BARRIER_JOB, str(port), str(process)],
                                      env=fake_device_env(1), cwd=REPO, stdout=logs[-1], stderr=subprocess.STDOUT))
    try:
        codes = [proc.wait(timeout=BOUND_S) for proc in procs]
    finally:
        for proc, log in zip(procs, logs, strict=True):
            if proc.poll() is None:
                proc.kill()
                proc.wait()
            log.close()
    zero, one = ((tmp_path / f"p{i}.log").read_text() for i in (0, 1))
    assert codes == [distributed.FAILED_EXIT_CODE, distributed.PEER_FAILED_EXIT_CODE], zero + one
    assert time.monotonic() - start < 50  # not the 60 s process 1 would sleep
    assert "BarrierError: barrier 'test: both here' failed after waiting up to 3 s; processes that did not " \
           "arrive: 1 " in zero, zero
    assert "stopping process 1: process 0 of the job failed: BarrierError" in one, one
