"""Test workers in child processes: fake CPU devices (fixed at jax import, so one process per device
count), and a free localhost port for the coordinator of a several-process jax.distributed job."""

from __future__ import annotations

import os
import pathlib
import socket
import subprocess
import sys

import pytest

from experiments import distributed

REPO = pathlib.Path(__file__).resolve().parents[1]
# A job started from the environment would join the test's processes to it.
DISTRIBUTED_ENV = (distributed.ENV_ADDRESS, distributed.ENV_NUM_PROCESSES, distributed.ENV_PROCESS_ID,
                   *(distributed.timeout_env(name) for name in distributed.Timeouts._fields))


def fake_device_env(devices: int) -> dict[str, str]:
    """This environment with `devices` fake CPU devices, the repository importable, float32 JAX, and no
    multi-process settings inherited."""
    env = dict(os.environ)
    env["XLA_FLAGS"] = f"{env.get('XLA_FLAGS', '')} --xla_force_host_platform_device_count={devices}".strip()
    env["JAX_PLATFORMS"] = "cpu"
    env["PYTHONPATH"] = f"{REPO}{os.pathsep}{env.get('PYTHONPATH', '')}"
    for name in ("JAX_ENABLE_X64", *DISTRIBUTED_ENV):
        env.pop(name, None)
    return env


def free_port() -> int:
    """A localhost TCP port nobody listens on now (for `jax.distributed`'s coordinator)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_worker(worker: pathlib.Path, args: list[str], devices: int, what: str, timeout: float) -> None:
    """Runs `python worker *args` on `devices` fake devices; fails the test, with its output, if it fails or
    runs longer than `timeout` seconds."""
    try:
        proc = subprocess.run([sys.executable, str(worker), *args], env=fake_device_env(devices), cwd=REPO,
                              capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired as err:
        pytest.fail(f"{what} hung for {timeout} s:\n{err.stderr}")
    assert proc.returncode == 0, f"{what} failed:\n{proc.stdout}\n{proc.stderr[-5000:]}"


def run_job(commands: list[list[str]], devices: int, log_dir: pathlib.Path,
            timeout: float) -> tuple[list[int] | None, str]:
    """Starts the commands (one per process of a job) at once on `devices` fake devices each, output to
    log_dir/process<i>.log, and waits. Returns (their exit codes, or None when one ran past `timeout`
    seconds: every process is then killed; the last lines of every log)."""
    started = []
    for i, command in enumerate(commands):
        log = open(log_dir / f"process{i}.log", "w")  # closed below
        started.append((subprocess.Popen(command, env=fake_device_env(devices), cwd=REPO, stdout=log,
                                         stderr=subprocess.STDOUT), log))
    try:
        codes = [proc.wait(timeout=timeout) for proc, _ in started]
    except subprocess.TimeoutExpired:
        codes = None
    finally:
        for proc, log in started:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
            log.close()
    logs = "\n".join((log_dir / f"process{i}.log").read_text()[-3000:] for i in range(len(commands)))
    return codes, logs
