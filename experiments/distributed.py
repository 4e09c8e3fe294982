"""Multi-process jobs: JAX's distributed runtime, the device mesh, and which process writes what.

One job may run as several processes (one per host, or per GPU), joined by `jax.distributed`: every
process runs the same program, the jitted computations span the devices of all processes (a
`jax.sharding.Mesh` with axes ("data", "model")), and the processes share the workdir (a shared file
system). Process 0 is the writer of shared outputs (plan.json, manifest.json, results.json, figures,
sweep files); every process writes only its own shard files; `barrier` orders the two where one side
reads the other's files. A single process (the default) makes all of this a no-op.

Start: `initialize(coordinator_address, num_processes, process_id)` (the `--coordinator_address`,
`--num_processes`, `--process_id` flags of `launch.py`), else the environment variables
IDJAX_COORDINATOR_ADDRESS / IDJAX_NUM_PROCESSES / IDJAX_PROCESS_ID, else JAX's own detection of a
cluster (TPU pods, SLURM), else one process.
"""

from __future__ import annotations

import os
from typing import Any, NamedTuple

import jax
import numpy as np
from absl import logging
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

ENV_ADDRESS, ENV_NUM_PROCESSES, ENV_PROCESS_ID = "IDJAX_COORDINATOR_ADDRESS", "IDJAX_NUM_PROCESSES", "IDJAX_PROCESS_ID"
DATA_AXIS, MODEL_AXIS = "data", "model"

_initialized: list[bool] = []  # set once jax.distributed has been started here (initialize is idempotent)


class Topology(NamedTuple):
    process_index: int
    process_count: int
    local_device_count: int
    device_count: int
    platform: str


def _cluster_detected() -> bool:
    """An environment where `jax.distributed.initialize()` finds the coordinator by itself."""
    return "SLURM_JOB_ID" in os.environ and int(os.environ.get("SLURM_NTASKS", "1")) > 1 or \
        "TPU_WORKER_HOSTNAMES" in os.environ and "," in os.environ["TPU_WORKER_HOSTNAMES"]


def _from_env(name: str, value: Any, convert: Any) -> Any:
    if value is not None:
        return value
    raw = os.environ.get(name)
    if raw in (None, ""):
        return None
    try:
        return convert(raw)
    except ValueError as err:
        raise ValueError(f"environment variable {name}={raw!r} is not valid ({err}); set it to an integer "
                         "or unset it") from None


def initialize(coordinator_address: str | None = None, num_processes: int | None = None,
               process_id: int | None = None) -> Topology:
    """Joins this process to a multi-process job when one is asked for or detected; logs and returns the topology.

    Arguments win over the IDJAX_* environment variables; without either, `jax.distributed.initialize()`
    runs only on a detected cluster (SLURM with several tasks, a multi-host TPU slice). Calling it again
    is a no-op. One process with no request: nothing is started.
    """
    address = _from_env(ENV_ADDRESS, coordinator_address, str)
    count = _from_env(ENV_NUM_PROCESSES, num_processes, int)
    index = _from_env(ENV_PROCESS_ID, process_id, int)
    asked = any(v is not None for v in (address, count, index))
    if not _initialized and (asked or _cluster_detected()):
        if asked and (address is None or count is None or index is None):
            raise ValueError("a multi-process start needs all three of --coordinator_address (host:port of "
                             "process 0), --num_processes and --process_id (or IDJAX_COORDINATOR_ADDRESS, "
                             f"IDJAX_NUM_PROCESSES, IDJAX_PROCESS_ID); got address={address!r}, "
                             f"num_processes={count!r}, process_id={index!r}")
        if asked and not 0 <= index < count:
            raise ValueError(f"process_id={index} is outside [0, num_processes={count}); number the processes "
                             f"0..{count - 1}")
        if count != 1:
            # Collectives between the CPU devices of several processes (fake-device tests, CPU clusters);
            # only the CPU client reads this option.
            jax.config.update("jax_cpu_collectives_implementation", "gloo")
            jax.distributed.initialize(coordinator_address=address, num_processes=count, process_id=index)
        _initialized.append(True)
    top = topology()
    # One process: a debug line only, so a command that fails early still prints its error alone.
    log = logging.info if top.process_count > 1 else logging.debug
    log("topology: process %d of %d, %d local / %d global %s devices", top.process_index, top.process_count,
        top.local_device_count, top.device_count, top.platform)
    return top


def topology() -> Topology:
    return Topology(jax.process_index(), jax.process_count(), jax.local_device_count(), jax.device_count(),
                    jax.devices()[0].platform)


def is_writer() -> bool:
    """Process 0 writes the shared outputs; the others write only their own shard files."""
    return jax.process_index() == 0


def barrier(name: str) -> None:
    """Waits until every process reaches the barrier `name` (no-op for one process)."""
    if jax.process_count() > 1:
        multihost_utils.sync_global_devices(name)


def make_mesh(model_parallel: int = 1) -> Mesh:
    """All devices of all processes as a ("data", "model") mesh of shape (device_count // model_parallel,
    model_parallel); the "model" axis runs within a process where possible (its collectives are the fastest)."""
    count = jax.device_count()
    if model_parallel < 1 or count % model_parallel:
        raise ValueError(f"model_parallel={model_parallel} must be a positive divisor of the {count} devices")
    try:
        # Auto axes: the families' jitted functions take sharded inputs and let the compiler propagate them.
        return jax.make_mesh((count // model_parallel, model_parallel), (DATA_AXIS, MODEL_AXIS),
                             axis_types=(jax.sharding.AxisType.Auto,) * 2, devices=jax.devices())
    except (ValueError, NotImplementedError, AssertionError):  # topologies mesh_utils does not know
        devices = np.array(jax.devices()).reshape(count // model_parallel, model_parallel)
        return Mesh(devices, (DATA_AXIS, MODEL_AXIS))


def _leaf_sharding(leaf: Any, mesh: Mesh, fsdp: bool) -> NamedSharding:
    shape = tuple(np.shape(leaf))
    parts = mesh.shape[MODEL_AXIS]
    if fsdp and shape:
        sizes = [(size, axis) for axis, size in enumerate(shape) if size % parts == 0]
        if sizes:
            axis = max(sizes, key=lambda t: (t[0], -t[1]))[1]  # the largest divisible axis, the first on a tie
            return NamedSharding(mesh, P(*([None] * axis + [MODEL_AXIS])))
    return NamedSharding(mesh, P())


def param_shardings(params: Any, mesh: Mesh, fsdp: bool) -> Any:
    """A pytree of `NamedSharding` like `params`: replicated (P()) when not `fsdp`; with `fsdp` each leaf's
    largest axis divisible by the "model" axis size is sharded over "model" (a leaf without one is replicated)."""
    return jax.tree_util.tree_map(lambda leaf: _leaf_sharding(leaf, mesh, fsdp), params)


def batch_sharding(mesh: Mesh, ndim: int) -> NamedSharding:
    """The leading (batch) axis of an `ndim`-dimensional array over "data", the other axes replicated."""
    return NamedSharding(mesh, P(DATA_AXIS, *([None] * (ndim - 1))))
